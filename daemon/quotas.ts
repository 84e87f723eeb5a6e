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
//
// And, shared by all uids, the daemon's fd table (its RLIMIT_NOFILE): per-uid quotas alone cannot keep it, since a
// few uids holding leases to maxLeasesPerUid fill it (a TCP lease keeps one daemon fd, a relayed warm TLS lease three),
// and then the daemon cannot accept, connect or relay for anyone. So each uid's lease fds (its leases' and, counted
// as relayed, its pending acquires') come out of one budget (leaseFdBudget), by the rule the resolver's system
// lookups and the relay's handshake places use: a uid holding h starts another only while more than h stay free
// after it. One uid alone gets half the budget, k uids about a (k+1)th each, and a (k+1)th stays free for the next.

import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { TurnBudget } from '../shared/seqpacket-channel.js';
import type { SockpoolConfig } from './config.js';

export type QuotaConfig = SockpoolConfig['quotas'];

/** Prewarm demand refills at maxPrewarmPerUid sockets per this window. */
export const PREWARM_WINDOW_MS = 10_000;
/** `stats` requests refill at maxStatsPerUid per this window. */
export const STATS_WINDOW_MS = 1_000;

/** Daemon fds a TCP lease keeps: its copy of the connection. */
export const TCP_LEASE_FDS = 1;
/**
 * Daemon fds a relayed warm TLS lease (or idle session) keeps: its end of the loopback pair, the relay thread's end,
 * the origin's socket. A pending acquire is charged this many too: whether it becomes relayed is known only once its
 * lease is made (an https acquire may get a TCP socket, warmTlsOnMiss "tcp"), and a connect under way holds fds too.
 */
export const RELAYED_LEASE_FDS = 3;
/**
 * Fds the daemon keeps out of the lease budget for what it holds whatever the leases: its listeners, the history
 * store's files, its threads' (libuv, relay threads, the close watchdog) eventfds and epoll fds, and client
 * connections (one fd each: bounded per uid by maxSessionsPerUid, not by this; past this reserve they come out of the
 * share the fair-share rule always leaves free).
 */
export const FD_RESERVE = 512;

/**
 * The daemon fds all uids' leases together may hold: the soft RLIMIT_NOFILE (`fdLimit`) less what the daemon needs
 * besides (see FD_RESERVE), its idle sockets (pool.maxIdleTotal, each maybe a relayed session: three fds) and its
 * connects in flight (quotas.maxConnectsInFlight: warming connects are no acquire's), but never less than half of
 * it: with the defaults those needs (31,024) are more than a smaller table has (a daemon started without the unit,
 * under a lower hard limit), and a budget of nothing would refuse every acquire. Past the half, the daemon's own needs
 * come out of what the fair share leaves free (at least as much as the biggest holder holds). Under the shipped
 * unit (LimitNOFILE 65,536, the defaults) 34,512: one uid alone may hold half, 17,256, more than maxLeasesPerUid
 * (4,096) relayed leases take (12,288).
 */
export function leaseFdBudget(fdLimit: number, config: Pick<SockpoolConfig, 'pool' | 'quotas'>): number {
  const needed = RELAYED_LEASE_FDS * config.pool.maxIdleTotal + config.quotas.maxConnectsInFlight + FD_RESERVE;
  return fdLimit - Math.min(needed, Math.floor(fdLimit / 2));
}

/** This process's soft RLIMIT_NOFILE (/proc/self/limits); Infinity when unlimited or unreadable. */
export function softFdLimit(limits = '/proc/self/limits'): number {
  try {
    const line = /^Max open files\s+(\S+)/m.exec(readFileSync(limits, 'utf8'))?.[1];
    const value = Number(line);
    return Number.isSafeInteger(value) && value > 0 ? value : Number.POSITIVE_INFINITY;
  } catch {
    return Number.POSITIVE_INFINITY;
  }
}

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
  /** Daemon fds its leases keep (TCP_LEASE_FDS or RELAYED_LEASE_FDS each); its pending acquires' are 3 × pending. */
  leaseFds: number;
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
  #fdBudget: () => number;
  /** Every uid's leaseFds and pending acquires together (kept as sums: the fair-share check is two compares). */
  #leaseFdsTotal = 0;
  #pendingTotal = 0;
  /** The uid's charges for leases ended unread once settled (overLeaseLimit's `settle`: made once, not per acquire). */
  #settleUid = (uid: number): number => {
    this.#settleUnread(uid);
    return this.#of(uid).unreadLeases;
  };

  /**
   * `settleUnread`: brings a uid's charges for leases ended unread (chargeUnread) down to what may still be unread,
   * asked before an acquire is refused for them (they are charged without a look, so may be stale). `fdBudget`: the
   * daemon fds all uids' leases may hold (leaseFdBudget; asked per acquire, so a reload's pool.maxIdleTotal counts).
   */
  constructor(
    config: () => QuotaConfig,
    now: () => number = () => performance.now(),
    settleUnread: (uid: number) => void = () => {},
    fdBudget: () => number = () => Number.POSITIVE_INFINITY,
  ) {
    this.#config = config;
    this.#now = now;
    this.#settleUnread = settleUnread;
    this.#fdBudget = fdBudget;
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
   * held, leases ended with their replies unread, and acquires pending), its fair share of the lease fd budget or,
   * for a host name, maxLookupsPerUid. Pair with acquireSettled.
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
    // The fair share: after this acquire (charged as relayed) more fds must stay free than the uid would hold.
    const held = usage.leaseFds + RELAYED_LEASE_FDS * (usage.pending + 1);
    const budget = this.#fdBudget();
    const free = budget - this.#leaseFdsTotal - RELAYED_LEASE_FDS * (this.#pendingTotal + 1);
    if (free <= held) {
      throw new SockpoolError(
        ErrorCodes.QUOTA,
        `uid ${uid} holds ${usage.leaseFds} daemon fds in leases with ${usage.pending} acquires pending, and ` +
          `${Math.max(0, free)} of the daemon's lease fd budget of ${budget} would stay free: a uid may take ` +
          `another only while more stay free than it holds (the budget is RLIMIT_NOFILE less the daemon's own ` +
          'fds and pool.maxIdleTotal)',
        { uid, quota: 'leaseFds', limit: budget },
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
    this.#pendingTotal++;
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
   * The acquire settled; `leased` when it became a lease (counted until leaseEnded, with `leaseFds`: RELAYED_LEASE_FDS
   * for a relayed TLS lease, TCP_LEASE_FDS else; pass the same to leaseEnded). `lookupInFlight`: for an
   * acquire for a host name that got no lease (it timed out, was cancelled, its client left), the DNS query for
   * that name still running, if any: the uid's lookup stays charged until it ends, or a uid could start any number
   * of lookups with acquires that give up at once.
   */
  acquireSettled(
    uid: number,
    host: string,
    leased: boolean,
    lookupInFlight?: (host: string) => Promise<unknown> | undefined,
    leaseFds = TCP_LEASE_FDS,
  ): void {
    const usage = this.#of(uid);
    if (usage.pending > 0) {
      usage.pending--;
      this.#pendingTotal--;
    }
    if (isIP(host) === 0) {
      const lookup = leased ? undefined : lookupInFlight?.(host);
      if (lookup) {
        const release = () => {
          usage.lookups = Math.max(0, usage.lookups - 1);
        };
        lookup.then(release, release);
      } else usage.lookups = Math.max(0, usage.lookups - 1);
    }
    if (leased) {
      usage.leases++;
      usage.leaseFds += leaseFds;
      this.#leaseFdsTotal += leaseFds;
    }
  }

  /** A lease of `uid` ended; `leaseFds` as it was counted (acquireSettled). */
  leaseEnded(uid: number, leaseFds = TCP_LEASE_FDS): void {
    const usage = this.#of(uid);
    usage.leases = Math.max(0, usage.leases - 1);
    const freed = Math.min(usage.leaseFds, leaseFds);
    usage.leaseFds -= freed;
    this.#leaseFdsTotal -= freed;
  }

  /** The lease fd budget's use, every uid's together (stats): fds charged (leases and pending acquires) and budget. */
  leaseFdsInUse(): { leaseFds: number; leaseFdBudget: number } {
    return { leaseFds: this.#leaseFdsTotal + RELAYED_LEASE_FDS * this.#pendingTotal, leaseFdBudget: this.#fdBudget() };
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
  usageOf(uid: number): {
    sessions: number;
    leases: number;
    leaseFds: number;
    unreadLeases: number;
    pending: number;
    lookups: number;
  } {
    const usage = this.#usage.get(uid);
    return {
      sessions: usage?.sessions ?? 0,
      leases: usage?.leases ?? 0,
      // (What the fair share counts: its leases' fds, and its pending acquires' as relayed.)
      leaseFds: (usage?.leaseFds ?? 0) + RELAYED_LEASE_FDS * (usage?.pending ?? 0),
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
        leaseFds: 0,
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
