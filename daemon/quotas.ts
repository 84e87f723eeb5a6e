// Per-uid quotas: what one uid may hold at once in the daemon, whatever number of connections it opens. The
// per-connection limits (access.maxLeasesPerClient, maxPendingPerClient) stay as a first line (counting the same leases
// ended unread: overLeaseLimit); these bound a uid that opens many connections. Every refusal is a SOCKPOOL_ERR_QUOTA
// with the quota's name in the message.
//
// Counted per uid: sessions (connections), leases held, acquires pending, acquires pending for a host name (each
// may need a DNS lookup; IP literals need none), prewarm demand (sockets asked for, refilled over a window) and
// `stats` requests (each walks every pool; refilled each second). And its share of the event loop: the messages its
// sessions may have read in one turn, together (TurnBudget, shared/seqpacket-channel.ts).
// A uid's entry is kept once made (one small record per uid that ever connected), so closing and reopening
// connections does not refill its prewarm allowance.

import { isIP } from 'node:net';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { TurnBudget } from '../shared/seqpacket-channel.js';
import type { SockpoolConfig } from './config.js';

export type QuotaConfig = SockpoolConfig['quotas'];

/** Prewarm demand refills at maxPrewarmPerUid sockets per this window. */
export const PREWARM_WINDOW_MS = 10_000;
/** `stats` requests refill at maxStatsPerUid per this window. */
export const STATS_WINDOW_MS = 1_000;

interface UidUsage {
  sessions: number;
  leases: number;
  /**
   * Leases ended while their replies may still wait unread in a session's socket (chargeUnread): each reply's fd is
   * in flight in the kernel, counted against the daemon's RLIMIT_NOFILE, until the client reads it or leaves.
   */
  unreadLeases: number;
  pending: number;
  /** Token requests waiting (startWait): pending too for maxPendingPerUid, but no lease to come of them. */
  waits: number;
  lookups: number;
  /** Prewarm sockets still allowed (a token bucket holding at most maxPrewarmPerUid). */
  prewarmTokens: number;
  prewarmUpdatedAt: number;
  /** `stats` requests still allowed (a token bucket holding at most maxStatsPerUid). */
  statsTokens: number;
  statsUpdatedAt: number;
  /** Its sessions' reads per turn of the loop, together: a uid with many sessions gets one session's turns. */
  turns: TurnBudget;
}

export class UidQuotas {
  #config: () => QuotaConfig;
  #now: () => number;
  #usage = new Map<number, UidUsage>();
  #settleUnread: (uid: number) => void;
  /** The uid's charges for leases ended unread once settled (overLeaseLimit's `settle`: made once, not per acquire). */
  #settleUid = (uid: number): number => {
    this.#settleUnread(uid);
    return this.#of(uid).unreadLeases;
  };

  /**
   * `settleUnread`: brings a uid's charges for leases ended unread (chargeUnread) down to what may still be unread,
   * asked before an acquire is refused for them (they are charged without a look, so may be stale).
   */
  constructor(
    config: () => QuotaConfig,
    now: () => number = () => performance.now(),
    settleUnread: (uid: number) => void = () => {},
  ) {
    this.#config = config;
    this.#now = now;
    this.#settleUnread = settleUnread;
  }

  /**
   * A new connection from `uid`; throws SOCKPOOL_ERR_QUOTA past maxSessionsPerUid. Returns the uid's turn budget, for
   * the connection's channel.
   */
  openSession(uid: number): TurnBudget {
    const usage = this.#of(uid);
    const limit = this.#config().maxSessionsPerUid;
    if (usage.sessions >= limit) {
      throw quotaError(uid, 'maxSessionsPerUid', limit, `uid ${uid} already has ${limit} connections to sockpoold`);
    }
    usage.sessions++;
    return usage.turns;
  }

  closeSession(uid: number): void {
    const usage = this.#of(uid);
    usage.sessions = Math.max(0, usage.sessions - 1);
  }

  /**
   * An acquire from `uid` starts waiting; throws SOCKPOOL_ERR_QUOTA past maxPendingPerUid, maxLeasesPerUid (leases
   * held, leases ended with their replies unread, and acquires pending) or, for a host name, maxLookupsPerUid. Pair with acquireSettled.
   */
  startAcquire(uid: number, host: string): void {
    const usage = this.#of(uid);
    const config = this.#config();
    if (usage.pending + usage.waits >= config.maxPendingPerUid) {
      throw quotaError(
        uid,
        'maxPendingPerUid',
        config.maxPendingPerUid,
        `uid ${uid} has ${usage.pending} acquires and ${usage.waits} token requests pending`,
      );
    }
    if (
      overLeaseLimit(config.maxLeasesPerUid, usage.leases + usage.pending, usage.unreadLeases, this.#settleUid, uid)
    ) {
      throw quotaError(
        uid,
        'maxLeasesPerUid',
        config.maxLeasesPerUid,
        `uid ${uid} holds ${usage.leases} leases, ${usage.unreadLeases} ended with their replies unread, with ` +
          `${usage.pending} acquires pending`,
      );
    }
    const needsLookup = isIP(host) === 0;
    if (needsLookup && usage.lookups >= config.maxLookupsPerUid) {
      throw quotaError(
        uid,
        'maxLookupsPerUid',
        config.maxLookupsPerUid,
        `uid ${uid} has ${usage.lookups} acquires for host names pending`,
      );
    }
    usage.pending++;
    if (needsLookup) usage.lookups++;
  }

  /**
   * A `tokens` request from `uid` may wait for a rate's tokens: it counts as pending, as an acquire does (per
   * connection alone, a uid's waits grew with every connection it opened); throws SOCKPOOL_ERR_QUOTA past
   * maxPendingPerUid. Not against maxLeasesPerUid: no lease comes of a wait (counted there, a uid's waits for tokens
   * refused acquires its leases left room for). Pair with waitSettled.
   */
  startWait(uid: number): void {
    const usage = this.#of(uid);
    const limit = this.#config().maxPendingPerUid;
    if (usage.pending + usage.waits >= limit) {
      throw quotaError(
        uid,
        'maxPendingPerUid',
        limit,
        `uid ${uid} has ${usage.pending} acquires and ${usage.waits} token requests pending`,
      );
    }
    usage.waits++;
  }

  waitSettled(uid: number): void {
    const usage = this.#of(uid);
    usage.waits = Math.max(0, usage.waits - 1);
  }

  /**
   * The acquire settled; `leased` when it became a lease (counted until leaseEnded). `lookupInFlight`: for an
   * acquire for a host name that got no lease (it timed out, was cancelled, its client left), the DNS query for
   * that name still running, if any: the uid's lookup stays charged until it ends, or a uid could start any number
   * of lookups with acquires that give up at once.
   */
  acquireSettled(
    uid: number,
    host: string,
    leased: boolean,
    lookupInFlight?: (host: string) => Promise<unknown> | undefined,
  ): void {
    const usage = this.#of(uid);
    usage.pending = Math.max(0, usage.pending - 1);
    if (isIP(host) === 0) {
      const lookup = leased ? undefined : lookupInFlight?.(host);
      if (lookup) {
        const release = () => {
          usage.lookups = Math.max(0, usage.lookups - 1);
        };
        lookup.then(release, release);
      } else usage.lookups = Math.max(0, usage.lookups - 1);
    }
    if (leased) usage.leases++;
  }

  leaseEnded(uid: number): void {
    const usage = this.#of(uid);
    usage.leases = Math.max(0, usage.leases - 1);
  }

  /**
   * `count` leases of `uid` ended while their replies may still wait unread in the kernel, each with its fd in flight:
   * they count against maxLeasesPerUid as leases until releaseUnread (the session's output was read, or it closed).
   */
  chargeUnread(uid: number, count: number): void {
    this.#of(uid).unreadLeases += count;
  }

  releaseUnread(uid: number, count: number): void {
    const usage = this.#of(uid);
    usage.unreadLeases = Math.max(0, usage.unreadLeases - count);
  }

  /**
   * A prewarm of `count` sockets from `uid`: returns how many it may have (its demand is capped, not refused, while
   * some allowance is left); throws SOCKPOOL_ERR_QUOTA when none is left.
   */
  takePrewarm(uid: number, count: number): number {
    const usage = this.#of(uid);
    const limit = this.#config().maxPrewarmPerUid;
    const now = this.#now();
    usage.prewarmTokens = Math.min(
      limit,
      usage.prewarmTokens + ((now - usage.prewarmUpdatedAt) * limit) / PREWARM_WINDOW_MS,
    );
    usage.prewarmUpdatedAt = now;
    const granted = Math.min(count, Math.floor(usage.prewarmTokens));
    if (granted <= 0) {
      throw quotaError(
        uid,
        'maxPrewarmPerUid',
        limit,
        `uid ${uid} asked for more than ${limit} prewarmed sockets within ${PREWARM_WINDOW_MS / 1000} s`,
      );
    }
    usage.prewarmTokens -= granted;
    return granted;
  }

  /**
   * A `stats` request from `uid` (not an admin's): each walks the daemon's pools, so a uid looping on it could hold
   * the event loop from every other uid's acquires. Throws SOCKPOOL_ERR_QUOTA past maxStatsPerUid a second (a bucket
   * of that many, so a burst of `sockpool status` runs passes).
   */
  takeStats(uid: number): void {
    const usage = this.#of(uid);
    const limit = this.#config().maxStatsPerUid;
    const now = this.#now();
    usage.statsTokens = Math.min(limit, usage.statsTokens + ((now - usage.statsUpdatedAt) * limit) / STATS_WINDOW_MS);
    usage.statsUpdatedAt = now;
    if (usage.statsTokens < 1) {
      throw quotaError(
        uid,
        'maxStatsPerUid',
        limit,
        `uid ${uid} asked for stats more than ${limit} times within ${STATS_WINDOW_MS / 1000} s`,
      );
    }
    usage.statsTokens -= 1;
  }

  /** What a uid uses now (stats and tests). */
  usageOf(uid: number): { sessions: number; leases: number; unreadLeases: number; pending: number; lookups: number } {
    const usage = this.#usage.get(uid);
    return {
      sessions: usage?.sessions ?? 0,
      leases: usage?.leases ?? 0,
      unreadLeases: usage?.unreadLeases ?? 0,
      // (Acquires and token requests: what maxPendingPerUid counts.)
      pending: (usage?.pending ?? 0) + (usage?.waits ?? 0),
      lookups: usage?.lookups ?? 0,
    };
  }

  #of(uid: number): UidUsage {
    let usage = this.#usage.get(uid);
    if (!usage) {
      usage = {
        sessions: 0,
        leases: 0,
        unreadLeases: 0,
        pending: 0,
        waits: 0,
        lookups: 0,
        prewarmTokens: this.#config().maxPrewarmPerUid,
        prewarmUpdatedAt: this.#now(),
        statsTokens: this.#config().maxStatsPerUid,
        statsUpdatedAt: this.#now(),
        turns: new TurnBudget(),
      };
      this.#usage.set(uid, usage);
    }
    return usage;
  }
}

/**
 * Whether `held` (leases held and acquires pending) with `unread` (the charges for leases ended with their replies
 * maybe unread) reach `limit`. The charges, made without a look and maybe stale, are settled first (`settle(key)`,
 * one ioctl per charged session, returning what is left charged) only when they are what would make it. The one rule
 * for maxLeasesPerUid here and access.maxLeasesPerClient (handoff-server.ts): both count the fds a client's unread
 * replies hold in flight. (`settle` and `key` apart, not a closure: no allocation per acquire.)
 */
export function overLeaseLimit<K>(
  limit: number,
  held: number,
  unread: number,
  settle: (key: K) => number,
  key: K,
): boolean {
  if (held + unread < limit) return false;
  return unread === 0 || held + settle(key) >= limit;
}

function quotaError(uid: number, quota: string, limit: number, what: string): SockpoolError {
  return new SockpoolError(ErrorCodes.QUOTA, `${what} (quotas.${quota} = ${limit})`, { uid, quota, limit });
}
