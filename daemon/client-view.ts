// What a client may see and ask of the whole pool (issue 10, "what a client may see"): the `stats` reply shows a
// client only the origins its own uid named, and only an admin uid sees every origin and may `warm` any origin.
//
// An origin is its uid's once the uid sent `acquire` or `prewarm` for it (a refused acquire included: the client
// named it), or an admin sent `warm` for it. The row shown is the origin pool's, shared by every uid that uses that
// origin (its idle sockets are shared): a client learns the pool's figures for an origin it named, never that some
// other origin exists. Process-wide figures (connected clients, leases of all clients, memory, fd-store, TLS relay
// counters, and whatever else the daemon adds) are the admin view's only; a client sees its own usage instead.
//
// Admins: uid 0, the daemon's own uid (either can read the daemon's memory anyway), and `access.adminUids`. Being
// an admin does not admit a client: access control (allowUids/allowGids, the socket's mode) still decides who
// connects at all.

import { Buffer } from 'node:buffer';
import process from 'node:process';
import { MAX_MESSAGE_BYTES } from '../shared/protocol.js';

/** Origins listed in a `stats` reply, busiest first: the whole list of a crawler would not fit in a message. */
export const STATS_MAX_ORIGINS = 50;

/**
 * Bytes the `stats` object may take in its reply: a message's, less the envelope around it (`{"type":"stats","id":…,
 * "stats":…}`, under 50 bytes) and the digits `originsOmitted` may gain when rows are left out. Fifty rows of
 * origins with long names (a host may have 253 characters) took about 20 KB: every `stats` failed with "reply too
 * large to send", an operator's too where another uid had named those origins.
 */
export const STATS_MAX_BYTES = MAX_MESSAGE_BYTES - 128;

/** The counts a snapshot keeps per origin and in total. */
export interface PoolCounts {
  idle: number;
  leased: number;
  connecting: number;
  waiting: number;
  hits: number;
  misses: number;
}

/** One origin's row in the pool manager's snapshot (the fields the view needs; the rest are passed through). */
export interface OriginRow extends PoolCounts {
  origin: string;
  demandRatePerS: number;
}

export interface PoolSnapshot<Row extends OriginRow = OriginRow> extends PoolCounts {
  hitRate: number;
  originCount: number;
  origins: Row[];
}

/** A snapshot whose totals are the sums over `origins`. */
export function snapshotOf<Row extends OriginRow>(origins: Row[]): PoolSnapshot<Row> {
  const sum = (field: keyof PoolCounts) => origins.reduce((total, row) => total + row[field], 0);
  const hits = sum('hits');
  const misses = sum('misses');
  return {
    idle: sum('idle'),
    leased: sum('leased'),
    connecting: sum('connecting'),
    waiting: sum('waiting'),
    hits,
    misses,
    hitRate: hits + misses === 0 ? 0 : hits / (hits + misses),
    originCount: origins.length,
    origins,
  };
}

/** The client asking: its uid and whether it is an admin (isAdminUid). */
export interface Viewer {
  uid: number;
  admin: boolean;
}

export function isAdminUid(uid: number, adminUids: readonly number[], daemonUid = process.getuid?.()): boolean {
  return uid === 0 || uid === daemonUid || adminUids.includes(uid);
}

/**
 * The `stats` reply for `viewer`. Admins: every origin and the daemon's totals, plus `processWide` (clients,
 * leases, process figures). Others: the origins `usersOf` says their uid named, totals over those origins only,
 * and `own` (the uid's own sessions, leases, pending acquires). Either way at most STATS_MAX_ORIGINS rows.
 */
export function statsView<Row extends OriginRow>(
  snapshot: PoolSnapshot<Row>,
  viewer: Viewer,
  usersOf: (originKey: string) => ReadonlySet<number> | undefined,
  processWide: () => Record<string, unknown>,
  own: () => Record<string, unknown>,
): Record<string, unknown> {
  if (viewer.admin) return fitted({ view: 'all', ...busiestFirst(snapshot), ...processWide() });
  const origins = snapshot.origins.filter((row) => usersOf(row.origin)?.has(viewer.uid) === true);
  const mine = snapshotOf(origins);
  return fitted({ view: 'uid', uid: viewer.uid, ...busiestFirst(mine), own: own() });
}

/**
 * The view within STATS_MAX_BYTES: the least busy of its rows left out (and counted in `originsOmitted`) until it
 * fits. Rows hold ASCII only (origin keys are ASCII by the schema): a row's length is its size in bytes.
 */
function fitted<View extends { origins: unknown[]; originsOmitted: number }>(view: View): View {
  let size = Buffer.byteLength(JSON.stringify(view));
  if (size <= STATS_MAX_BYTES) return view;
  const origins = view.origins;
  let kept = origins.length;
  // Each row is its JSON and a comma.
  while (kept > 0 && size > STATS_MAX_BYTES) size -= JSON.stringify(origins[--kept]).length + 1;
  return { ...view, origins: origins.slice(0, kept), originsOmitted: view.originsOmitted + origins.length - kept };
}

function busiestFirst<Row extends OriginRow>(
  snapshot: PoolSnapshot<Row>,
): PoolSnapshot<Row> & { originsOmitted: number } {
  const origins = [...snapshot.origins]
    .sort((a, b) => b.demandRatePerS - a.demandRatePerS || b.leased + b.idle - (a.leased + a.idle))
    .slice(0, STATS_MAX_ORIGINS);
  return { ...snapshot, origins, originsOmitted: snapshot.origins.length - origins.length };
}
