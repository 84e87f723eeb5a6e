// What a client may see (daemon/client-view.ts): the `stats` reply of a uid that is not an admin lists only the
// origins its uid named, with totals over those origins and its own usage; an admin's lists every origin with the
// daemon's process-wide figures. Who is an admin. Pure logic; the same with real uids is in
// client-view.system.test.ts.
import { describe, expect, it } from 'vitest';
import {
  isAdminUid,
  type OriginRow,
  type PoolSnapshot,
  STATS_MAX_ORIGINS,
  snapshotOf,
  statsView,
} from '../daemon/client-view.js';

function row(origin: string, fields: Partial<OriginRow> = {}): OriginRow {
  return { origin, idle: 1, leased: 0, connecting: 0, waiting: 0, hits: 0, misses: 0, demandRatePerS: 0, ...fields };
}

const snapshot = (origins: OriginRow[]): PoolSnapshot => snapshotOf(origins);

const pool = snapshot([
  row('a.test:443', { idle: 2, leased: 1, hits: 3, misses: 1, demandRatePerS: 1 }),
  row('b.test:443', { idle: 5, leased: 4, hits: 10, misses: 0, demandRatePerS: 9 }),
  row('c.test:80', { idle: 1, leased: 0, hits: 0, misses: 4, demandRatePerS: 0.5 }),
]);
const users = new Map<string, Set<number>>([
  ['a.test:443', new Set([1000])],
  ['b.test:443', new Set([2000])],
  ['c.test:80', new Set([1000, 2000])],
]);
const processWide = () => ({ clients: 7, leases: 5, rssBytes: 123 });
const own = () => ({ sessions: 1, leases: 1, pending: 0 });

describe('statsView', () => {
  it("shows a uid that is not an admin only its own uid's origins, totals over them, and its own usage", () => {
    const view = statsView(pool, { uid: 1000, admin: false }, (key) => users.get(key), processWide, own);
    expect(view).toEqual({
      view: 'uid',
      uid: 1000,
      idle: 3,
      leased: 1,
      connecting: 0,
      waiting: 0,
      hits: 3,
      misses: 5,
      hitRate: 3 / 8,
      originCount: 2,
      originsOmitted: 0,
      origins: [pool.origins[0], pool.origins[2]],
      own: { sessions: 1, leases: 1, pending: 0 },
    });
    // Nothing process-wide, and nothing of b.test, which only uid 2000 named.
    expect(JSON.stringify(view)).not.toContain('b.test');
    expect(view).not.toHaveProperty('clients');
    expect(view).not.toHaveProperty('rssBytes');
  });

  it('shows a uid that named nothing an empty view, not an error', () => {
    const view = statsView(pool, { uid: 3000, admin: false }, (key) => users.get(key), processWide, own);
    expect(view).toMatchObject({ view: 'uid', originCount: 0, origins: [], idle: 0, hitRate: 0 });
  });

  it('shows an admin every origin, busiest first, with the process-wide figures', () => {
    const view = statsView(pool, { uid: 0, admin: true }, () => undefined, processWide, own);
    expect(view).toMatchObject({ view: 'all', idle: 8, originCount: 3, clients: 7, leases: 5, rssBytes: 123 });
    expect((view.origins as OriginRow[]).map((entry) => entry.origin)).toEqual([
      'b.test:443',
      'a.test:443',
      'c.test:80',
    ]);
    expect(view).not.toHaveProperty('own');
  });

  it('lists at most STATS_MAX_ORIGINS rows in either view and says how many were left out', () => {
    const many = snapshot(Array.from({ length: STATS_MAX_ORIGINS + 7 }, (_, i) => row(`h${i}.test:80`)));
    const everyone = () => new Set([1000]);
    for (const admin of [true, false]) {
      const view = statsView(many, { uid: 1000, admin }, everyone, processWide, own);
      expect((view.origins as OriginRow[]).length).toBe(STATS_MAX_ORIGINS);
      expect(view).toMatchObject({ originCount: STATS_MAX_ORIGINS + 7, originsOmitted: 7 });
    }
  });
});

describe('isAdminUid', () => {
  it("counts root, the daemon's own uid and access.adminUids as admins, nobody else", () => {
    expect(isAdminUid(0, [], 998)).toBe(true);
    expect(isAdminUid(998, [], 998)).toBe(true);
    expect(isAdminUid(1000, [1000, 1001], 998)).toBe(true);
    expect(isAdminUid(1002, [1000, 1001], 998)).toBe(false);
    expect(isAdminUid(65534, [], 998)).toBe(false);
  });
});
