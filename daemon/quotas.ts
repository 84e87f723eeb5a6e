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
// or enough uids holding maxSessionsPerUid connections each, and then the daemon cannot accept, connect or relay for
// anyone. So every fd a uid makes the daemon hold comes out of one budget (leaseFdBudget): its leases' (and, counted
// as relayed, its pending acquires'), its connections (one each, and one for each hung-up connection's end kept
// to watch its unread replies) and the fds in flight in its unread replies (one for each lease ended unread). One
// budget, not one per kind: the table does not care which kind an fd is, and a uid's mix (many connections and few
// leases, or the reverse) is its own business. The rule is the one the resolver's system lookups and the relay's
// handshake places use: a uid holding h takes more only while more than h stay free after it. One uid alone gets
// half the budget, k uids about a (k+1)th each, and a (k+1)th stays free for the next.
//
// Fds in flight are in that budget because the kernel counts them against the same number: a sendmsg with
// SCM_RIGHTS fails with ETOOMANYREFS while the sending user's fds in flight (every process of the daemon's user
// together: user_struct.unix_inflight, net/unix; the daemon alone under the shipped unit's DynamicUser) exceed the
// sender's RLIMIT_NOFILE, unless it has CAP_SYS_RESOURCE or CAP_SYS_ADMIN (the shipped unit keeps neither). Every fd
// the daemon sends is a `lease` reply's: a live lease's fd in flight is covered by its lease fds (one at least), one
// ended unread is charged here as one (chargeUnread, never fewer than may still be unread), so the fds in flight
// never pass the sum this budget bounds, and the budget is below RLIMIT_NOFILE. (Counting both in one sum is
// conservative for each: an fd in flight of an ended lease is no longer in the table, a live lease's may be in both.)

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
 * Fds the daemon keeps out of the budget for what it holds whatever its clients do: its listeners, the history
 * store's files, its threads' (libuv, relay threads, the close watchdog) eventfds and epoll fds, the origin sockets
 * the relay threads are closing after their leases ended (RELAY_CLOSING_ORIGINS at most, tls-relay.ts), and the one
 * fd an accept takes before the connection is refused (client connections are in the budget: UidQuotas.openSession).
 */
export const FD_RESERVE = 512;

/**
 * The daemon fds all uids' leases, connections and fds in flight together may hold (the name is from when leases
 * alone were in it, kept as the `stats` field's): the soft RLIMIT_NOFILE (`fdLimit`) less what the daemon needs
 * besides (see FD_RESERVE), its idle sockets (as many of pool.maxIdleTotal as fit: idleSocketsFitting, each maybe a
 * relayed session: three fds) and its connects in flight (quotas.maxConnectsInFlight: warming connects are no
 * acquire's), but never less than half of it: a budget of nothing would refuse every acquire. Past the half (only
 * when the connects in flight and FD_RESERVE alone take more than half the table), the daemon's own needs come out
 * of what the fair share leaves free (at least as much as the biggest holder holds). Under the shipped unit
 * (LimitNOFILE 65,536, the defaults) 34,512: one uid alone may hold half, 17,256, more than maxLeasesPerUid (4,096)
 * relayed leases and maxSessionsPerUid (64) connections take (12,352).
 */
export function leaseFdBudget(fdLimit: number, config: Pick<SockpoolConfig, 'pool' | 'quotas'>): number {
  const needed =
    RELAYED_LEASE_FDS * idleSocketsFitting(fdLimit, config) + config.quotas.maxConnectsInFlight + FD_RESERVE;
  return fdLimit - Math.min(needed, Math.floor(fdLimit / 2));
}

/**
 * The idle sockets the daemon keeps at most (pool-manager.ts): pool.maxIdleTotal, or fewer when its three fds each
 * would not fit in the half of the table kept out of the budget beside the connects in flight and FD_RESERVE. The
 * defaults' 10,000 need a table of about 62,000: on a smaller one (a daemon started without the unit, under a lower
 * hard limit, or a prlimit on a running one) the idle pool would otherwise take fds the fair share counts as free.
 */
export function idleSocketsFitting(fdLimit: number, config: Pick<SockpoolConfig, 'pool' | 'quotas'>): number {
  const room = Math.floor(fdLimit / 2) - config.quotas.maxConnectsInFlight - FD_RESERVE;
  return Math.min(config.pool.maxIdleTotal, Math.max(0, Math.floor(room / RELAYED_LEASE_FDS)));
}

/**
 * This process's soft RLIMIT_NOFILE (/proc/self/limits): Infinity when unlimited, undefined when it cannot be read
 * (a process out of fds has none to open the file with).
 */
export function readSoftFdLimit(limits = '/proc/self/limits'): number | undefined {
  let text: string;
  try {
    text = readFileSync(limits, 'utf8');
  } catch {
    return undefined;
  }
  const value = Number(/^Max open files\s+(\S+)/m.exec(text)?.[1]);
  return Number.isSafeInteger(value) && value > 0 ? value : Number.POSITIVE_INFINITY;
}

/**
 * The soft RLIMIT_NOFILE the fd budget and the idle pool's size are reckoned from. Read at start and again by
 * refresh() (the daemon's reload and a slow timer, FD_LIMIT_RECHECK_MS): a `prlimit --pid` on a running daemon, or an
 * operator's raised LimitNOFILE= applied the same way, is followed without a restart. A read that fails keeps the
 * last value: out of fds is when the daemon can least afford to believe its table unlimited.
 */
export class FdLimit {
  #read: () => number | undefined;
  #value: number;

  constructor(read: () => number | undefined = () => readSoftFdLimit()) {
    this.#read = read;
    this.#value = read() ?? Number.POSITIVE_INFINITY;
  }

  get value(): number {
    return this.#value;
  }

  /** Reads the limit again; returns whether it changed. */
  refresh(): boolean {
    const value = this.#read();
    if (value === undefined || value === this.#value) return false;
    this.#value = value;
    return true;
  }
}

/**
 * How often the daemon reads its RLIMIT_NOFILE again (FdLimit.refresh): one small file read, off the handoff path.
 * Not on EMFILE at accept: with the table full there is no fd to read it with.
 */
export const FD_LIMIT_RECHECK_MS = 5_000;

/**
 * Every uid's unread charges are settled before a refusal (UidQuotas.#overShare) at most this often: a tenth of the
 * handoff server's periodic settle (UNREAD_RECHECK_MS), so a charge read since is paid back within this before it
 * can refuse another uid.
 */
export const SETTLE_ALL_MIN_INTERVAL_MS = 50;

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
  /** Copies of its hung-up connections' ends kept to watch their unread replies (watchOpened): a daemon fd each. */
  watchFds: number;
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
  #settleAllUnread: () => void;
  /** When every uid's charges were last settled before a refusal (#overShare), on the #now clock. */
  #settledAllAt = Number.NEGATIVE_INFINITY;
  #fdBudget: () => number;
  /**
   * Every uid's fds in the budget together, by kind: leaseFds, pending acquires, connections (sessions and watchFds)
   * and unread charges (kept as sums: the fair-share check is a few adds and two compares).
   */
  #leaseFdsTotal = 0;
  #pendingTotal = 0;
  #sessionFdsTotal = 0;
  #unreadTotal = 0;
  /** The uid's charges for leases ended unread once settled (overLeaseLimit's `settle`: made once, not per acquire). */
  #settleUid = (uid: number): number => {
    this.#settleUnread(uid);
    return this.#of(uid).unreadLeases;
  };

  /**
   * `settleUnread`: brings a uid's charges for leases ended unread (chargeUnread) down to what may still be unread,
   * asked before an acquire is refused for them (they are charged without a look, so may be stale). `fdBudget`: the
   * daemon fds all uids' leases may hold (leaseFdBudget; asked per acquire, so a reload's pool.maxIdleTotal and a
   * changed RLIMIT_NOFILE count). `settleAllUnread`: the same for every uid's charges, asked before a uid is refused
   * its share while other uids' charges could make the difference (at most every SETTLE_ALL_MIN_INTERVAL_MS).
   */
  constructor(
    config: () => QuotaConfig,
    now: () => number = () => performance.now(),
    settleUnread: (uid: number) => void = () => {},
    fdBudget: () => number = () => Number.POSITIVE_INFINITY,
    settleAllUnread: () => void = () => {},
  ) {
    this.#config = config;
    this.#now = now;
    this.#settleUnread = settleUnread;
    this.#fdBudget = fdBudget;
    this.#settleAllUnread = settleAllUnread;
  }

  /**
   * A new connection from `uid`; throws SOCKPOOL_ERR_QUOTA past maxSessionsPerUid or its fair share of the fd budget
   * (quota `sessionFds`: a connection is a daemon fd). Returns the uid's turn budget, for the connection's channel.
   */
  openSession(uid: number): TurnBudget {
    const usage = this.#of(uid);
    const limit = this.#config().maxSessionsPerUid;
    if (usage.sessions >= limit) {
      throw quotaError(uid, 'maxSessionsPerUid', limit, `uid ${uid} already has ${limit} connections to sockpoold`);
    }
    if (this.#overShare(uid, usage, 1)) throw this.#shareError(uid, usage, 1, 'sessionFds');
    usage.sessions++;
    this.#sessionFdsTotal++;
    return usage.turns;
  }

  closeSession(uid: number): void {
    const usage = this.#of(uid);
    if (usage.sessions === 0) return;
    usage.sessions--;
    this.#sessionFdsTotal--;
  }

  /**
   * The daemon keeps a hung-up connection's end of `uid`'s to watch its unread replies (handoff-server.ts
   * #keepWatching): a daemon fd in the uid's share, not refused (the charges it follows must be followed), until
   * watchClosed. The uid's next connections and acquires then wait for it to read or close.
   */
  watchOpened(uid: number): void {
    this.#of(uid).watchFds++;
    this.#sessionFdsTotal++;
  }

  watchClosed(uid: number): void {
    const usage = this.#of(uid);
    if (usage.watchFds === 0) return;
    usage.watchFds--;
    this.#sessionFdsTotal--;
  }

  /**
   * An acquire from `uid` starts waiting; throws SOCKPOOL_ERR_QUOTA past maxPendingPerUid, maxLeasesPerUid (leases
   * held, leases ended with their replies unread, and acquires pending), its fair share of the fd budget (quota
   * leaseFds) or, for a host name, maxLookupsPerUid. Pair with acquireSettled.
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
    if (this.#overShare(uid, usage, RELAYED_LEASE_FDS)) {
      throw this.#shareError(uid, usage, RELAYED_LEASE_FDS, 'leaseFds');
    }
    const needsLookup = isHostName(host);
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
    if (isHostName(host)) {
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

  /**
   * The fd budget's use, every uid's together (stats): fds charged for leases (and pending acquires), for
   * connections (and watched copies of hung-up ones), and the budget. (The fds in flight in unread replies, the
   * rest of it, are `unreadLeases`.)
   */
  leaseFdsInUse(): { leaseFds: number; sessionFds: number; leaseFdBudget: number } {
    return {
      leaseFds: this.#leaseFdsTotal + RELAYED_LEASE_FDS * this.#pendingTotal,
      sessionFds: this.#sessionFdsTotal,
      leaseFdBudget: this.#fdBudget(),
    };
  }

  /**
   * `count` leases of `uid` ended while their replies may still wait unread in the kernel, each with its fd in flight:
   * they count against maxLeasesPerUid as leases, and as one fd each in its share of the fd budget (the kernel counts
   * fds in flight against the daemon's RLIMIT_NOFILE), until releaseUnread (the session's output was read, or it
   * closed).
   */
  chargeUnread(uid: number, count: number): void {
    this.#of(uid).unreadLeases += count;
    this.#unreadTotal += count;
  }

  releaseUnread(uid: number, count: number): void {
    const usage = this.#of(uid);
    const released = Math.min(usage.unreadLeases, count);
    usage.unreadLeases -= released;
    this.#unreadTotal -= released;
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
    sessionFds: number;
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
      // (Its connections and the watched copies of its hung-up ones.)
      sessionFds: (usage?.sessions ?? 0) + (usage?.watchFds ?? 0),
      unreadLeases: usage?.unreadLeases ?? 0,
      // (Acquires and token requests: what maxPendingPerUid counts.)
      pending: (usage?.pending ?? 0) + (usage?.waits ?? 0),
      lookups: usage?.lookups ?? 0,
    };
  }

  /**
   * Whether `uid` taking `adding` more fds of the budget is past its fair share: unless more stay free after it than
   * it would hold. (Plain numbers: asked on every acquire and connection.) The charges for unread replies are made
   * without a look, so may be stale; before a refusal they are settled: the uid's own when they are what would
   * refuse it, as for maxLeasesPerUid, then every uid's when the others' charges could make the difference (stale
   * ones are otherwise paid back only at the handoff server's next periodic settle). Only on the way to a refusal,
   * so a connection or acquire within its share never pays; every uid's at most every SETTLE_ALL_MIN_INTERVAL_MS,
   * since that is an ioctl per charged session and a refused uid may ask again at once, as often as it likes.
   */
  #overShare(uid: number, usage: UidUsage, adding: number): boolean {
    if (this.#freeAfter(adding) > heldFds(usage) + adding) return false;
    if (usage.unreadLeases > 0) {
      this.#settleUnread(uid);
      if (this.#freeAfter(adding) > heldFds(usage) + adding) return false;
    }
    const othersUnread = this.#unreadTotal - usage.unreadLeases;
    if (othersUnread === 0 || this.#freeAfter(adding) + othersUnread <= heldFds(usage) + adding) return true;
    const now = this.#now();
    if (now - this.#settledAllAt < SETTLE_ALL_MIN_INTERVAL_MS) return true;
    this.#settledAllAt = now;
    this.#settleAllUnread();
    return this.#freeAfter(adding) <= heldFds(usage) + adding;
  }

  /** Fds of the budget that stay free once `adding` more are taken (every uid's holdings together). */
  #freeAfter(adding: number): number {
    const held =
      this.#leaseFdsTotal + RELAYED_LEASE_FDS * this.#pendingTotal + this.#sessionFdsTotal + this.#unreadTotal;
    return this.#fdBudget() - held - adding;
  }

  #shareError(uid: number, usage: UidUsage, adding: number, quota: 'leaseFds' | 'sessionFds'): SockpoolError {
    const budget = this.#fdBudget();
    return new SockpoolError(
      ErrorCodes.QUOTA,
      `uid ${uid} holds ${heldFds(usage)} daemon fds (${usage.leaseFds} in leases, ${usage.pending} acquires ` +
        `pending, ${usage.sessions + usage.watchFds} connections, ${usage.unreadLeases} in flight in unread ` +
        `replies), and ${Math.max(0, this.#freeAfter(adding))} of the daemon's fd budget of ${budget} would stay ` +
        `free after another ${quota === 'leaseFds' ? 'lease' : 'connection'}: a uid may take more only while more ` +
        "stay free than it holds (the budget is RLIMIT_NOFILE less the daemon's own fds and pool.maxIdleTotal)",
      { uid, quota, limit: budget },
    );
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
        watchFds: 0,
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

let lastHost: string | undefined;
let lastIsName = false;
/** Whether `host` is a name (a DNS lookup), not an IP literal. An acquire asks twice (startAcquire, acquireSettled),
 *  and a client's acquires mostly go to the host of its last one: the last answer is kept (isIP is two regexps). */
function isHostName(host: string): boolean {
  if (host !== lastHost) {
    lastIsName = isIP(host) === 0;
    lastHost = host;
  }
  return lastIsName;
}

/** The fds of the budget a uid holds: its leases', its pending acquires' (as relayed), connections, fds in flight. */
function heldFds(usage: UidUsage): number {
  return usage.leaseFds + RELAYED_LEASE_FDS * usage.pending + usage.sessions + usage.watchFds + usage.unreadLeases;
}

function quotaError(uid: number, quota: string, limit: number, what: string): SockpoolError {
  return new SockpoolError(ErrorCodes.QUOTA, `${what} (quotas.${quota} = ${limit})`, { uid, quota, limit });
}
