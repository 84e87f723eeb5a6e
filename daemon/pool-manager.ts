// All origins: one OriginPool per origin key, the warming policy (minIdle, predictive demand, prewarm, learned
// idle lifetimes), and the global cap on idle sockets. Like undici's agent over its pools: it only routes and
// decides targets; the sockets themselves live in the origin pools.

import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { canonicalOrigin, type Origin, originKey, originOfKey } from '../shared/origin.js';
import { snapshotOf } from './client-view.js';
import { type OriginPolicy, policyFor, type SockpoolConfig } from './config.js';
import type { ConnectedSocket, Connector } from './connector.js';
import { fleetKey, type SlotKeeper } from './fleet/slots.js';
import { KeptSockets } from './kept-sockets.js';
import { endConnection, type UsageMark } from './lease-guard.js';
import { type Logger, LogLimiter, REFUSAL_LOG_WINDOW_MS, REFUSALS_LOGGED } from './log.js';
import type { Metrics } from './metrics.js';
import { OriginCap } from './origin-cap.js';
import {
  CONNECT_PURPOSES,
  type ConnectPurpose,
  cancelledError,
  type DropReason,
  type Handoff,
  type IdleSocket,
  OriginPool,
  type OriginPoolEvents,
} from './origin-pool.js';
import { changedProxies } from './proxy-tunnel.js';
import type { StateStore } from './store.js';
import {
  isTlsPoolKey,
  readTlsFiles,
  type TlsFiles,
  type TlsSessions,
  type TlsTrust,
  tlsPoolKey,
} from './tls-sessions.js';
import { predictedTarget, rateForTarget } from './warm-target.js';

/** Per-origin demand and learning, kept beside the pool (it survives the pool being retired). */
interface OriginStats {
  /** Exponentially decaying demand rate, per second: acquires and announced sockets (stats, the idle cap, fleet). */
  ratePerS: number;
  rateUpdatedAt: number;
  /**
   * The same for acquires no announced socket met (and replayed rates: history, fleet shares): what the predictive
   * idle target follows (warm-target.ts).
   */
  unannouncedRatePerS: number;
  unannouncedUpdatedAt: number;
  /** EWMA of connect time, ms. */
  connectMs: number;
  hits: number;
  misses: number;
  /** How long the origin's servers keep a silent connection (conservative: drops at once, rises slowly). */
  learnedIdleLifetimeMs: number | undefined;
  /** When the last peer close of an idle socket was seen, and the socket's age then (restart detection). */
  lastPeerCloseAt: number;
  lastPeerCloseAgeMs: number;
  /** The uids that named this origin (acquire, prewarm, warm): whose `stats` show it (client-view.ts). */
  uids: Set<number>;
  /** Connects opened ahead of an acquire (every purpose but `acquire`), those of them lent, and sockets of any
   *  purpose closed without ever having been lent (see ConnectPurpose). */
  warmed: number;
  warmedLent: number;
  neverLent: number;
}

/** Per ConnectPurpose: connects opened, sockets lent for the first time, sockets closed never lent (stats `warming`). */
type PurposeCounts = Record<ConnectPurpose, number>;
function purposeCounts(): PurposeCounts {
  return Object.fromEntries(CONNECT_PURPOSES.map((purpose) => [purpose, 0])) as PurposeCounts;
}

/** A configuration with what applying it needs that could fail already done (PoolManager.prepare). */
/** What a warming opens: relayed TLS sessions, or TCP connections (where the daemon keeps no sessions for it). */
export type WarmKind = 'tls' | 'tcp';

export interface PreparedConfig {
  readonly config: SockpoolConfig;
  /** The TLS files it names, read; undefined without warm TLS. */
  readonly tlsFiles: TlsFiles | undefined;
}

function isPrepared(next: SockpoolConfig | PreparedConfig): next is PreparedConfig {
  return 'config' in next && 'tlsFiles' in next;
}

export interface PoolManagerOptions {
  config: SockpoolConfig;
  connector: Connector;
  log: Logger;
  metrics?: Metrics;
  store?: StateStore;
  /** Warm TLS (tls-sessions.ts); without it every lease is a TCP socket. */
  tls?: TlsSessions;
  /** Connection slots under `maxPerOriginFleet` (fleet/slots.ts); without it that key is not enforced. */
  slots?: SlotKeeper;
  /**
   * The idle sockets kept at most, every origin's together: pool.maxIdleTotal, or fewer when the daemon's fd table has
   * no room for that many (quotas.ts idleSocketsFitting); asked at each sweep and idle socket. Without it,
   * pool.maxIdleTotal.
   */
  maxIdleTotal?: () => number;
}

const SWEEP_INTERVAL_MS = 500;
/** Recycle an idle socket at this fraction of the learned server idle lifetime. */
const RECYCLE_MARGIN = 0.8;
/** Peer closes of idle sockets closer together than this, with ages further apart than the spread, are a restart. */
const RESTART_WINDOW_MS = 50;
const RESTART_AGE_SPREAD = 0.2;
/** No origin is believed to drop silent connections sooner than this (protects against one odd observation). */
const MIN_LEARNED_LIFETIME_MS = 250;

/** While acquires wait for room at an origin's cap, the clients holding its leases are asked this often. */
const RECLAIM_INTERVAL_MS = 100;

/** The connect time warm-on-start counts its budget with for an origin whose history has none (ms). */
const UNKNOWN_CONNECT_MS = 1_000;

/** Connects prewarms start in one turn of the event loop; the rest wait for the next turn (#startPrewarms). */
const PREWARM_CONNECTS_PER_TURN = 16;

export class PoolManager {
  #pools = new Map<string, OriginPool>();
  /**
   * The pools of each origin (by fleetKey: host and port) that share its maxPerOrigin (origin-cap.ts), kept while
   * one of them is.
   */
  #caps = new Map<string, OriginCap>();
  #stats = new Map<string, OriginStats>();
  #config: SockpoolConfig;
  #connector: Connector;
  #log: Logger;
  #metrics: Metrics | undefined;
  #store: StateStore | undefined;
  #tls: TlsSessions | undefined;
  #slots: SlotKeeper | undefined;
  #maxIdleTotal: () => number;
  /** Connect failures are logged per uid up to a bound (see the connectFailed event). */
  readonly #failureLog = new LogLimiter(REFUSALS_LOGGED, REFUSAL_LOG_WINDOW_MS);
  #idleTotal = 0;
  /** Idle sockets kept for one uid (released unused), in every pool: at most `quotas.maxKeptPerUid` per uid. */
  readonly #kept = new KeptSockets<IdleSocket>(() => this.#config.quotas.maxKeptPerUid);
  /** Daemon-wide, per purpose (see OriginStats.warmed): the `warming` figures of an admin's `stats`. */
  readonly #warming = { opened: purposeCounts(), lent: purposeCounts(), neverLent: purposeCounts() };
  #hits = 0;
  #misses = 0;
  #sweepTimer: NodeJS.Timeout | undefined;
  #started = false;
  #closed = false;
  /**
   * Prewarms not started yet (see #startPrewarms), each with the uid that asked (whose connects they are at the
   * connect gate); connects started by prewarms in this turn, and the next turn.
   */
  #prewarms: Array<{ pool: OriginPool; count: number; uid: number; purpose: ConnectPurpose; left?: number }> = [];
  #prewarmsThisTurn = 0;
  #prewarmTurn: NodeJS.Immediate | undefined;
  /**
   * The connects the queued prewarms may still start (each entry's `left`, or its `count` before its first turn), by
   * pool: a second prewarm of an origin in one turn finds the first's connects still queued here.
   */
  readonly #prewarmsQueuedFor = new Map<OriginPool, number>();
  /** The sum of #prewarmsQueuedFor's counts, kept as they change: the cap's room reads it at every prewarm. */
  #prewarmsQueued = 0;
  /**
   * The sum of every origin's decayed demand rate (OriginStats.ratePerS) as of #ratesSumAt, kept as rates change:
   * all decay with one time constant, so the sum decays as each does. The share of a full cap (#capRoom) reads it at
   * every prewarm and refill: walking every pool there made a burst of prewarms at a full cap cost pools × prewarms.
   * Counted afresh at each sweep, so rounding does not drift.
   */
  #ratesSum = 0;
  #ratesSumAt = performance.now();
  /** Connects under way for no waiter, every pool's (the connectingAheadChanged event): idle sockets to come. */
  #connectingAhead = 0;
  #events: OriginPoolEvents;
  /** Pools whose waiting acquires have their leases' clients asked to give idle ones back, and the one re-ask timer. */
  #reclaiming = new Set<OriginPool>();
  #reclaimTimer: NodeJS.Timeout | undefined;
  /**
   * Asks the clients holding leases of these pools (by key) to end those idle in their connection caches (the handoff
   * server sends `reclaim`, reading the lease table once for all of them); set once the server exists.
   */
  onReclaim: ((poolKeys: string[]) => void) | undefined;
  /** When the last reload happened: a socket connected before it is checked again when it comes back idle. */
  #reloadedAt = Number.NEGATIVE_INFINITY;
  /** Per proxy name, the reload that changed its URL or removed it: tunnels connected before it are closed. */
  #proxyChangedAt = new Map<string, number>();
  /** What is left of `pool.warmOnStartSockets` (read at start only): the history's rates spend it, then the fleet's
   *  shares at start (#startRate). */
  #warmOnStartLeft: number;

  constructor(options: PoolManagerOptions) {
    this.#config = options.config;
    this.#warmOnStartLeft = options.config.pool.warmOnStartSockets;
    this.#connector = options.connector;
    this.#log = options.log;
    this.#metrics = options.metrics;
    this.#store = options.store;
    this.#tls = options.tls;
    this.#slots = options.slots;
    this.#maxIdleTotal = options.maxIdleTotal ?? (() => this.#config.pool.maxIdleTotal);
    this.#events = {
      idleChanged: (_pool, delta) => {
        this.#idleTotal += delta;
        if (delta > 0) this.#enforceIdleCap();
      },
      connectingAheadChanged: (_pool, delta) => {
        this.#connectingAhead += delta;
      },
      dropped: (pool, reason, idleMs, ageMs, lent) => this.#onDropped(pool, reason, idleMs, ageMs, lent),
      connected: (pool, connectMs, uid) => {
        const stats = this.#statsOf(pool.key);
        stats.connectMs = stats.connectMs === 0 ? connectMs : stats.connectMs * 0.8 + connectMs * 0.2;
        this.#store?.recordConnect(pool.key, connectMs, uid);
        this.#metrics?.connectSeconds.observe(connectMs / 1000);
      },
      connectFailed: (pool, error, uid) => {
        const code = (error as { code?: string }).code ?? 'unknown';
        // Refusals are counted once per refused acquire (see acquire); here only real connect failures.
        if (code === ErrorCodes.POLICY) return;
        this.#store?.recordConnectFailure(pool.key, uid);
        this.#metrics?.connectFailures.inc({ reason: code });
        // A client names origins that fail (dead names and ports) as fast as it likes: logged per uid up to a bound
        // (the daemon's own refills under -1), the next line logged saying how many were left out.
        const fields = { origin: pool.key, uid, code, err: error.message };
        this.#failureLog.warn(this.#log, uid ?? -1, fields, 'connect failed');
      },
      waitingForRoom: (pool) => this.#reclaimFor(pool),
      refillRoom: (pool) => this.#capRoom(pool.key, pool, 1, 0) > 0,
      opened: (pool, purpose) => {
        this.#warming.opened[purpose]++;
        if (purpose !== 'acquire') this.#statsOf(pool.key).warmed++;
        this.#metrics?.socketsOpened.inc({ purpose });
      },
      lent: (pool, purpose) => {
        this.#warming.lent[purpose]++;
        if (purpose !== 'acquire') this.#statsOf(pool.key).warmedLent++;
      },
      neverLent: (pool, purpose, reason) => {
        this.#warming.neverLent[purpose]++;
        // (Stats of a retired pool are gone: not made again for a socket closed on its way out.)
        const stats = this.#stats.get(pool.key);
        if (stats) stats.neverLent++;
        this.#metrics?.socketsNeverLent.inc({ purpose, reason });
      },
    };
  }

  start(): void {
    this.#started = true;
    this.#armSweep();
  }

  /** The sweep runs while there are pools to sweep: a daemon with none (idle, or all retired) is not woken for it. */
  #armSweep(): void {
    if (!this.#started || this.#closed || this.#sweepTimer || this.#pools.size === 0) return;
    this.#sweepTimer = setInterval(() => this.#sweep(), SWEEP_INTERVAL_MS);
    this.#sweepTimer.unref();
  }

  /**
   * Hands out a live socket for `origin` to a client of `uid`; ownership of its fd passes to the caller.
   * `tlsTrust`: the client speaks https and would verify against this (tls-sessions.ts); then the socket may be a
   * relayed warm TLS session.
   */
  acquire(
    origin: Origin,
    timeoutMs: number | undefined,
    tlsTrust?: TlsTrust,
    uid = 0,
    signal?: AbortSignal,
  ): Promise<Handoff & { originKey: string; peerPort: number }> {
    return this.#acquire(origin, timeoutMs, tlsTrust, uid, signal, false);
  }

  /** acquire(); `rerouted`: its demand was counted already, at the pool it first waited in (see the trust check). */
  async #acquire(
    origin: Origin,
    timeoutMs: number | undefined,
    tlsTrust: TlsTrust | undefined,
    uid: number,
    signal: AbortSignal | undefined,
    rerouted: boolean,
  ): Promise<Handoff & { originKey: string; peerPort: number }> {
    if (this.#closed) throw new SockpoolError(ErrorCodes.SHUTTING_DOWN, 'sockpoold is stopping');
    let pool = this.#existingPoolFor(origin, tlsTrust);
    if (!pool) {
      // A pool is made only for an origin the policy lets through, so an acquire refused at once leaves nothing
      // behind: a client naming thousands of refused origins (ports, proxies the configuration lacks) made a pool
      // and stats for each, swept only once their demand had decayed, minutes later.
      this.checkWarmUp(origin);
      pool = this.#poolFor(origin, tlsTrust);
    }
    // Given up already (a rerouted acquire's client, or a token wait's, in the turn it ended): nothing is taken, as
    // OriginPool.acquire takes nothing then.
    if (signal?.aborted) throw cancelledError(pool.key);
    /** The origin's warm TLS pool when this acquire takes a TCP socket instead (warmTlsOnMiss "tcp"). */
    let sessions: OriginPool | undefined;
    if (this.#tcpOnMiss(pool)) {
      // Without an idle session this acquire takes a TCP socket of the origin at once, and is demand for those:
      // with warmTlsOnMiss "tcp" sessions are made only when asked for (prewarm, warm, warm-on-start).
      const session = this.#takeWarmFrom(pool, tlsTrust, uid);
      if (session) return this.#servedAtOnce(pool, session, uid, signal, rerouted);
      sessions = pool;
      pool = this.#poolFor(origin);
    }
    const idle = this.#takeWarmFrom(pool, tlsTrust, uid);
    if (idle) return this.#servedAtOnce(pool, idle, uid, signal, rerouted);
    const stats = this.#statsOf(pool.key);
    stats.uids.add(uid);
    if (!rerouted) this.#bumpRate(stats);
    const waitMs = timeoutMs ?? pool.policy.acquireTimeoutMs;
    const waitFrom = performance.now();
    let handoff: Handoff;
    try {
      handoff = await pool.acquire(waitMs, uid, signal);
    } catch (error) {
      if ((error as { code?: string }).code === ErrorCodes.POLICY) {
        this.#metrics?.refusals.inc({ reason: policyReason(error as Error) });
        // Refused at its addresses (the name resolved where the policy does not go): nothing to keep either, nor
        // the sessions pool this acquire made on its way to the TCP one.
        this.#retireIfEmpty(pool);
        if (sessions) this.#retireIfEmpty(sessions);
      }
      throw error;
    }
    if (!this.#verifiedFor(pool, handoff, tlsTrust, uid)) {
      // A reload changed what the origin's sessions are verified against while this acquire waited in the sessions
      // pool its trust picked: whatever reached it (an idle session, a new one, one given back) was verified against
      // the new trust, which this client never asked for. Routed again by its own trust (to the origin's TCP sockets
      // now), in what is left of its time. It cannot come back here for ever: the session given back was verified
      // against the trust in force or is stale (closed at the give-back), and new ones are made with the trust in
      // force. One acquire is one demand: counted where it first waited, not again where it goes now.
      const left = waitMs - (performance.now() - waitFrom);
      return this.#acquire(origin, Math.max(1, left), tlsTrust, uid, signal, true);
    }
    if (signal?.aborted) {
      // Given up in the turn it was served (a release or a connect for it read in the same turn as its cancel): no
      // client has it. Its demand stays counted (it waited, wanting a socket), not a hit or miss.
      this.giveBackUnsent(pool.key, handoff, uid);
      throw cancelledError(pool.key);
    }
    this.#countHandoff(pool.key, stats, handoff.warm, uid);
    if (handoff.announced !== true) this.#bumpUnannounced(stats);
    return named(pool, handoff);
  }

  /**
   * acquire()'s warm path without a promise: a checked idle socket for `origin` at once, or undefined when none is
   * idle for `uid` (call acquire() then: it waits or connects). The handoff server sends the lease in the turn its
   * acquire arrived, then counts the handoff with countWarmHandoff (bookkeeping that can wait until the lease is
   * out).
   */
  takeWarm(
    origin: Origin,
    tlsTrust?: TlsTrust,
    uid = 0,
    now = performance.now(),
  ): (Handoff & { originKey: string; peerPort: number }) | undefined {
    if (this.#closed) return undefined;
    // Looked up, never made here: acquire() makes a pool once the policy let its origin through.
    const pool = this.#existingPoolFor(origin, tlsTrust);
    const handoff = pool?.takeWarm(uid, now);
    return handoff && this.#verifiedFor(pool!, handoff, tlsTrust, uid) ? named(pool!, handoff) : undefined;
  }

  /**
   * A handoff takeWarm() gave out, counted as the origin's demand and a hit (stats, metrics, history); `announced`:
   * the handoff's (a socket an announcement opened, lent for the first time: not demand for the idle target);
   * `demandCounted`: its acquire's demand rate was counted already (an acquire rerouted at a trust mismatch). `now`:
   * performance.now(), from a caller that read it in this turn.
   */
  countWarmHandoff(
    originKey: string,
    uid: number,
    announced = false,
    demandCounted = false,
    now = performance.now(),
  ): void {
    const stats = this.#statsOf(originKey);
    stats.uids.add(uid);
    if (!demandCounted) this.#bumpRate(stats, 1, now);
    if (!announced) this.#bumpUnannounced(stats, now);
    this.#countHandoff(originKey, stats, true, uid);
  }

  /** takeWarm() once the pool is known, not counted yet (#servedAtOnce). */
  #takeWarmFrom(
    pool: OriginPool,
    tlsTrust: TlsTrust | undefined,
    uid: number,
  ): (Handoff & { originKey: string; peerPort: number }) | undefined {
    const handoff = pool.takeWarm(uid);
    if (!handoff || !this.#verifiedFor(pool, handoff, tlsTrust, uid)) return undefined;
    return named(pool, handoff);
  }

  /**
   * An idle socket acquire() took at once: counted (demand, a hit) only once the turn that read the acquire is over.
   * The handoff server reads an acquire and its client's cancel or hang-up in one turn when they come together: one
   * given up there reaches no client, and goes back never lent, counted as nothing (an acquire given up before it was
   * served is neither a hit nor demand). `rerouted`: its demand was counted already (see the trust check).
   */
  async #servedAtOnce(
    pool: OriginPool,
    handoff: Handoff & { originKey: string; peerPort: number },
    uid: number,
    signal: AbortSignal | undefined,
    rerouted: boolean,
  ): Promise<Handoff & { originKey: string; peerPort: number }> {
    await undefined;
    if (signal?.aborted) {
      this.giveBackUnsent(pool.key, handoff, uid);
      throw cancelledError(pool.key);
    }
    this.countWarmHandoff(pool.key, uid, handoff.announced === true, rerouted);
    return handoff;
  }

  /**
   * Whether a handoff of `pool` may go to a client that asked for `tlsTrust` (TlsSessions.verifiedFor); if not, it is
   * given back (kept for `uid` again if it was: its client may hold a copy), and the pool's rules decide whether it
   * stays. Asked of every handoff an acquire gets, whichever way it came (idle, newly made, given back): the pool was
   * picked by the trust in force when the acquire arrived, which a reload may have changed since. (An idle one taken
   * at once matches: a reload closes the stale ones; asked all the same, as it costs nothing.)
   */
  #verifiedFor(pool: OriginPool, handoff: Handoff, tlsTrust: TlsTrust | undefined, uid: number): boolean {
    if (!this.#tls || this.#tls.verifiedFor(handoff, tlsTrust)) return true;
    this.giveBackUnsent(pool.key, handoff, uid);
    return false;
  }

  /**
   * Whether an acquire of this pool that finds no idle session takes a TCP socket of the origin instead: a warm TLS
   * pool whose policy says `warmTlsOnMiss = "tcp"`. A session still being made is not waited for: under a burst its
   * handshake may queue behind many in the relay thread, and the point of "tcp" is that no acquire waits for a
   * handshake. Never for an origin with a client certificate: the client doing its own TLS has no key to present.
   */
  #tcpOnMiss(pool: OriginPool): boolean {
    return isTlsPoolKey(pool.key) && tcpOnMiss(pool.policy);
  }

  /** Counts a handoff to a client of `uid`, a hit (warm) or a miss (the history keeps whose demand it was). */
  #countHandoff(key: string, stats: OriginStats, warm: boolean, uid: number): void {
    if (warm) {
      stats.hits++;
      this.#hits++;
      this.#metrics?.hits.inc();
    } else {
      stats.misses++;
      this.#misses++;
      this.#metrics?.misses.inc();
    }
    this.#store?.recordAcquire(key, { hit: warm }, uid);
  }

  /** A lease of `uid` ended: its socket is closed. */
  leaseEnded(key: string, uid = 0): void {
    this.#pools.get(key)?.leaseEnded(uid);
  }

  /**
   * A handoff for a client of `uid` that never reached it comes back with its fd (ownership passes to the pool): one
   * a trust mismatch turned away, or one the handoff server had nobody to send to (its acquire cancelled, or its
   * client gone, in the turn it was served). A first lending is undone (the `lent` event counted it for nobody), and
   * the socket goes back never lent, counted lent or never lent again wherever it goes; one kept for `uid` stays so
   * (its client may hold a copy from an earlier lease).
   */
  giveBackUnsent(key: string, handoff: Handoff, uid = 0): void {
    const purpose = handoff.firstLent;
    if (purpose !== undefined) {
      this.#warming.lent[purpose]--;
      if (purpose !== 'acquire') this.#statsOf(key).warmedLent--;
    }
    this.giveBack(key, handoff, uid, handoff.kept === true, undefined, purpose);
  }

  /**
   * A lease of `uid` came back unused with its fd (ownership passes to the pool); `lent`: the client had it, so
   * it is kept for `uid` alone; `checked`: the mark the release check read; `unlent`: it never reached a client
   * (see OriginPool.giveBack).
   */
  giveBack(
    key: string,
    socket: ConnectedSocket,
    uid = 0,
    lent = false,
    checked?: UsageMark,
    unlent?: ConnectPurpose,
  ): void {
    const pool = this.#pools.get(key);
    if (!pool) throw new SockpoolError(ErrorCodes.INTERNAL, `no pool ${key} for a lease`);
    // Lent before a reload, or its connect began before one (a warm TLS session's handshake): judged by the policy
    // now in force, as the idle sockets were at the reload.
    if ((socket.startedAt ?? socket.connectedAt) <= this.#reloadedAt && this.#refusedAfterReload(pool, socket)) {
      // One a client had may still be held in a copy it kept (dup-then-release): shut down for every copy, as the
      // pool does with any lent socket it closes, or the copy would stay a live connection (through a proxy the
      // configuration no longer names, or to an address it now refuses) that no count of the daemon's holds.
      if (lent) endConnection(socket.fd);
      else native.close(socket.fd);
      pool.leaseEnded(uid);
      this.#metrics?.deadDropped.inc({ reason: 'refused' });
      if (unlent !== undefined) this.#events.neverLent(pool, unlent, 'refused');
      return;
    }
    pool.giveBack(socket, uid, lent, checked, unlent);
  }

  /**
   * A client of `uid` announces demand: `count` idle sockets soon, counted as demand as `count` acquires would be in
   * stats and the idle cap's share-out, but not by the predictive target: these connects serve it (warm-target.ts).
   * Cut to what the idle pool can keep (#roomFor), then by `take` (the caller's charge: the per-uid prewarm
   * allowance, quotas.ts), given that room and returning what it grants of it, or throwing (nothing happens then).
   * Returns the connects granted. Throws SOCKPOOL_ERR_POLICY at once for an origin the policy refuses (the connects
   * run in the background).
   */
  prewarm(
    origin: Origin,
    count: number,
    tlsTrust?: TlsTrust,
    uid = 0,
    lookahead = false,
    take: (room: number) => number = (room) => room,
  ): number {
    return this.#warmUp(origin, count, tlsTrust, uid, true, lookahead, take).granted;
  }

  /**
   * An operator's one-shot warming (`sockpool warm`, admins only): `count` idle sockets soon, not demand; cut to
   * the room (#roomFor) like a prewarm. Returns what it warms and how many it granted.
   */
  warm(origin: Origin, count: number, tlsTrust?: TlsTrust, uid = 0): { warming: WarmKind; granted: number } {
    return this.#warmUp(origin, count, tlsTrust, uid, false);
  }

  /**
   * How many connects a prewarm (or warm) of `count` idle sockets of `pool` may start now: what the idle pool can
   * keep of them. The origin's maxIdle less what is idle or connecting for it (OriginPool.prewarmWanted), and the
   * global idle cap in force (pool.maxIdleTotal, or what the fd table fits) less what is idle everywhere, connecting
   * for no waiter, or queued by prewarms not started yet. Past it every connect would be a SYN (and a handshake, with
   * warm TLS) at someone's origin for a socket closed at once (#enforceIdleCap), and a uid's prewarm allowance would
   * be charged for it.
   *
   * A full cap is not first come, first kept: the cap is shared out by demand (#enforceIdleCap evicts from the pool
   * whose demand per idle socket is lowest, so each pool keeps about its demand's part of the cap), and a prewarm
   * (`demand`: its connects counted as demand) may take up to its origin's part with it counted (rounded down: what
   * the eviction would leave it, or a little less), the sockets of origins in less demand giving way. Otherwise one uid's prewarms, up to the cap
   * once, would leave every other uid's prewarms nothing for as long as it renewed them (an idle TTL), however much
   * more those origins were wanted; and each prewarm adds demand its uid's allowance is charged for, so no uid takes
   * a larger part than its allowance buys.
   *
   * `pool`: the origin's pool (key `key`), or its policy where it has none yet: an absent pool has nothing idle,
   * connecting or queued, and is made only for connects granted (#warmUp).
   */
  #roomFor(key: string, pool: OriginPool | OriginPolicy, count: number, demand: boolean): number {
    let wanted: number;
    if (pool instanceof OriginPool) {
      // What the origin will have once its queued prewarms start counts as had: a second prewarm of it in the same
      // turn is granted (and charged for) only what the first leaves, not connects its first turn would cut away.
      wanted = Math.max(0, pool.prewarmWanted(count) - (this.#prewarmsQueuedFor.get(pool) ?? 0));
    } else {
      wanted = Math.max(0, Math.min(count, pool.maxIdle));
    }
    const addedRate = demand ? (wanted * 1000) / this.#config.pool.predictiveWindowMs : 0;
    return this.#capRoom(key, pool instanceof OriginPool ? pool : undefined, wanted, addedRate);
  }

  /**
   * How many of `wanted` more idle sockets of `pool` the global idle cap keeps: the free room (the cap less what is
   * idle, connecting for no waiter, or queued by prewarms, everywhere), or at a full cap what the pool's part of it
   * by demand (its rate plus `addedRate`, rounded down) leaves: the eviction (#enforceIdleCap) takes from a pool
   * above its part, never from one at or below it, so a socket within the part stays and one past it would go.
   * Prewarms (#roomFor) and refills (the refillRoom event) alike: a refill that connected past it had its socket
   * evicted on arrival, and its pool connected again at once. `pool` undefined: the origin (`key`) has none yet.
   * O(1): the sums it reads are kept as they change.
   */
  #capRoom(key: string, pool: OriginPool | undefined, wanted: number, addedRate: number): number {
    const cap = this.#maxIdleTotal();
    const free = cap - this.#idleTotal - this.#connectingAhead - this.#prewarmsQueued;
    if (free >= wanted) return wanted;
    const stats = this.#stats.get(key);
    const own = stats ? this.#decayedRate(stats) : 0;
    const rate = own + addedRate;
    const rates = Math.max(rate, this.#ratesTotal() - own + rate);
    const part = rates > 0 ? Math.floor((cap * rate) / rates) : 0;
    const held = pool ? pool.idleCount + pool.connectingAheadCount + (this.#prewarmsQueuedFor.get(pool) ?? 0) : 0;
    return Math.max(0, free, Math.min(wanted, part - held));
  }

  /** Every origin's decayed demand rate, summed (see #ratesSum); `now`: performance.now(), from a caller that has it. */
  #ratesTotal(now = performance.now()): number {
    this.#ratesSum = Math.max(
      0,
      this.#ratesSum * Math.exp(-(now - this.#ratesSumAt) / this.#config.pool.predictiveWindowMs),
    );
    this.#ratesSumAt = now;
    return this.#ratesSum;
  }

  /** An origin's stats are forgotten (its pool retired): its rate leaves the sum. */
  #forgetStats(key: string): void {
    const stats = this.#stats.get(key);
    if (!stats) return;
    this.#ratesSum = this.#ratesTotal() - this.#decayedRate(stats);
    this.#stats.delete(key);
  }

  /**
   * What prewarm() and warm() refuse before anything starts: SOCKPOOL_ERR_SHUTTING_DOWN, SOCKPOOL_ERR_POLICY for an
   * origin (or its proxy) the egress policy refuses, SOCKPOOL_ERR_INVALID_ARGUMENT for a proxy the configuration
   * lacks. The handoff server asks first, so that a refused prewarm is not charged to the uid's allowance.
   */
  checkWarmUp(origin: Origin): void {
    if (this.#closed) throw new SockpoolError(ErrorCodes.SHUTTING_DOWN, 'sockpoold is stopping');
    try {
      this.#connector.checkTarget(origin);
    } catch (error) {
      this.#metrics?.refusals.inc({ reason: policyReason(error as Error) });
      throw error;
    }
  }

  /**
   * `lookahead`: a client's queue guessing from its waiting requests; it warms what their acquires will take, so
   * with warmTlsOnMiss "tcp" TCP sockets (an acquire without an idle session takes one): no handshake is spent on a
   * guess.
   */
  #warmUp(
    origin: Origin,
    count: number,
    tlsTrust: TlsTrust | undefined,
    uid: number,
    demand: boolean,
    lookahead = false,
    take: (room: number) => number = (room) => room,
  ): { warming: WarmKind; granted: number } {
    this.checkWarmUp(origin);
    const normalised = canonicalOrigin(origin);
    const key = this.#keyOf(normalised, tlsTrust, lookahead);
    const existing = this.#pools.get(key);
    const room = this.#roomFor(
      key,
      existing ?? policyFor(this.#config, normalised.host, normalised.port),
      count,
      demand,
    );
    // No room: nothing is charged (a full idle pool is no fault of the uid's) nor counted as demand. Refused (the
    // uid's allowance used up), or granted 0: no pool is made for it (thousands of origins named at a full cap made
    // a pool and stats each, kept until the sweep found them unused).
    const granted = room === 0 ? 0 : take(room);
    const warming = isTlsPoolKey(key) ? 'tls' : 'tcp';
    if (granted === 0) {
      if (existing) this.#statsOf(key).uids.add(uid);
      return { warming, granted };
    }
    const pool = existing ?? this.#poolFor(origin, tlsTrust, lookahead);
    const stats = this.#statsOf(pool.key);
    stats.uids.add(uid);
    if (demand) this.#bumpRate(stats, granted);
    this.#prewarms.push({
      pool,
      count: granted,
      uid,
      purpose: demand ? (lookahead ? 'lookahead' : 'prewarm') : 'warm',
    });
    this.#queuePrewarms(pool, granted);
    this.#startPrewarms();
    return { warming, granted };
  }

  /**
   * Starts queued prewarms, PREWARM_CONNECTS_PER_TURN connects per turn of the event loop: a burst of them (a
   * client's queue announcing 64 origins at once asks for about 200 sockets) would otherwise keep this thread busy
   * for tens of milliseconds, while the connects of acquires that came before it complete and wait to be handed
   * over. A small prewarm starts in the turn it came in, as before.
   */
  #startPrewarms(): void {
    while (this.#prewarms.length > 0 && this.#prewarmsThisTurn < PREWARM_CONNECTS_PER_TURN && !this.#closed) {
      const entry = this.#prewarms[0]!;
      const budget = PREWARM_CONNECTS_PER_TURN - this.#prewarmsThisTurn;
      // One entry may want more than a turn's budget (up to maxIdle): it stays first and goes on next turn. Its
      // `count` is connects, cut to the room when it was asked (#roomFor); what it starts is fixed at its first turn,
      // cut again to the origin's room then (a prewarm of the origin queued before it may have started since); later
      // turns start the rest, whatever became of the connects started before: counted again each turn, connects that
      // failed at once were wanted again, and the entry started 16 connects a turn to an origin that refuses, for good.
      if (entry.left === undefined) {
        // (Its own queued connects are not yet in flight, so they are not among what prewarmWanted subtracts.)
        entry.left = Math.min(entry.count, entry.pool.prewarmWanted(Number.POSITIVE_INFINITY));
        this.#queuePrewarms(entry.pool, entry.left - entry.count);
      }
      const wanted = Math.min(entry.left, budget);
      const started = entry.pool.startPrewarmConnects(wanted, entry.uid, entry.purpose);
      this.#prewarmsThisTurn += started;
      this.#queuePrewarms(entry.pool, -started);
      entry.left -= started;
      // (Fewer than wanted: the origin's cap is reached, or the pool closed.)
      if (entry.left === 0 || started < wanted) {
        this.#queuePrewarms(entry.pool, -entry.left);
        this.#prewarms.shift();
      }
    }
    if (this.#prewarmsThisTurn === 0 || this.#prewarmTurn) return;
    this.#prewarmTurn = setImmediate(() => {
      this.#prewarmTurn = undefined;
      this.#prewarmsThisTurn = 0;
      this.#startPrewarms();
    });
  }

  /** Counts `delta` connects more (or fewer, negative) as queued by prewarms for `pool`. */
  #queuePrewarms(pool: OriginPool, delta: number): void {
    const before = this.#prewarmsQueuedFor.get(pool) ?? 0;
    const queued = before + delta;
    if (queued > 0) this.#prewarmsQueuedFor.set(pool, queued);
    else this.#prewarmsQueuedFor.delete(pool);
    this.#prewarmsQueued += Math.max(0, queued) - before;
  }

  /** The DNS query for `host` in flight now, if any (see UidQuotas.acquireSettled). */
  readonly lookupInFlight = (host: string): Promise<unknown> | undefined => this.#connector.lookupInFlight?.(host);

  /** Idle sockets kept for `uid` now (released unused: see OriginPool.giveBack), in every pool; without `uid`, for
   *  every uid together. */
  keptCount(uid?: number): number {
    return uid === undefined ? this.#kept.total : this.#kept.countOf(uid);
  }

  /** The uids that named an origin (by pool key), for the `stats` view; undefined for an origin not pooled. */
  usersOf(key: string): ReadonlySet<number> | undefined {
    return this.#stats.get(key)?.uids;
  }

  /**
   * Warms the origins the store ranks most likely needed (warm-on-start from history): each its first socket (or
   * its minIdle), and the demand rate it had (halved for every 6 hours since, topOrigins) as a start for its
   * predicted target. The sockets those rates ask for beyond the first are `pool.warmOnStartSockets` in all, in the
   * store's order (each uid's busiest origin in turn, topOrigins): one uid's busy origins used to open up to `limit`
   * × maxIdle sockets at every start, and then took every place and socket. (What is left of it goes to the fleet's
   * shares, shareDemand.)
   */
  async warmFromHistory(limit: number): Promise<number> {
    if (!this.#store || limit <= 0) return 0;
    // The ranking first writes what is pending in slices, yielding (topOrigins): the manager may be closed by then.
    const ranked = await this.#store.topOrigins(limit);
    if (this.#closed) return 0;
    // Origins the current policy refuses (history from an older configuration, a proxy it no longer names) are
    // skipped quietly. A proxied origin is warmed through its proxy: its key names it.
    const top = ranked.flatMap((entry) => {
      try {
        const { proxy } = originOfKey(entry.originKey);
        const origin: Origin =
          proxy === undefined ? { host: entry.host, port: entry.port } : { host: entry.host, port: entry.port, proxy };
        this.#connector.checkTarget(origin);
        return [{ ...entry, origin }];
      } catch {
        return [];
      }
    });
    let warmed = 0;
    for (const entry of top) {
      // A warm TLS pool is warmed as TLS sessions where the configuration still keeps them for that origin (with the
      // daemon's own trust: the one a relayed client shares); otherwise it is skipped.
      let tlsTrust: TlsTrust | undefined;
      if (isTlsPoolKey(entry.originKey)) {
        if (!this.#tls) continue;
        const origin = canonicalOrigin({ host: entry.host, port: entry.port });
        const policy = policyFor(this.#config, origin.host, origin.port);
        if (!this.#tls.enabled(origin, policy)) continue;
        tlsTrust = this.#tls.trustOf(policy);
      }
      const pool = this.#poolFor(entry.origin, tlsTrust);
      const stats = this.#statsOf(pool.key);
      stats.learnedIdleLifetimeMs = entry.learnedIdleLifetimeMs ?? undefined;
      // The connect time the history knows, until this start's connects refine it: the budget below is counted with
      // it, and the sweep then predicts with (about) the same number.
      if (stats.connectMs === 0 && entry.connectMsAvg !== null && entry.connectMsAvg > 0) {
        stats.connectMs = entry.connectMsAvg;
      }
      const first = Math.max(1, pool.policy.minIdle);
      const rate = this.#startRate(pool, stats, entry.demandRatePerS ?? 0, first);
      this.#replayRate(stats, rate);
      pool.prewarm(first, undefined, 'start');
      warmed++;
    }
    return warmed;
  }

  /**
   * A demand rate replayed at start (the history's, a fleet share) as it may be: what it asks for beyond the
   * origin's `first` socket(s) is taken from what is left of `pool.warmOnStartSockets`, and a rate that asks for
   * more is lowered to what was granted.
   */
  #startRate(pool: OriginPool, stats: OriginStats, rate: number, first: number): number {
    if (!this.#config.pool.predictive) return rate;
    // No connect time known: counted as a slow one (the target only grows with it), so the budget still holds.
    const connectMs = stats.connectMs > 0 ? stats.connectMs : UNKNOWN_CONNECT_MS;
    const windowMs = this.#config.pool.predictiveWindowMs;
    const wanted = Math.max(0, Math.min(pool.policy.maxIdle, predictedTarget(rate, connectMs, windowMs)) - first);
    const granted = Math.min(wanted, this.#warmOnStartLeft);
    this.#warmOnStartLeft -= granted;
    return granted < wanted ? rateForTarget(first + granted, connectMs, windowMs) : rate;
  }

  /**
   * The fleet's demand (fleet/fleet.ts): origins other daemons are busy with, each with this daemon's share of
   * their rate. Those the egress policy refuses are skipped; the others get the share as a floor of their predicted
   * demand (the sweep keeps that many warm) and, with `prewarm` (a daemon that just started), a first socket now.
   * At start (`prewarm`) the shares, busiest first, ask for no more than what the history left of
   * `pool.warmOnStartSockets` beyond those first sockets (each share alone could ask for maxIdle: a fleet's
   * busiest origins made a new member open warmOnStartOrigins × maxIdle); later (fleet.shareWarming) a share is
   * the fleet's current demand, a floor as it is. Returns how many origins were taken.
   */
  shareDemand(entries: ReadonlyArray<{ host: string; port: number; ratePerS: number }>, prewarm: boolean): number {
    if (this.#closed) return 0;
    let taken = 0;
    for (const entry of entries) {
      const origin = { host: entry.host, port: entry.port };
      try {
        this.#connector.checkTarget(origin);
      } catch {
        continue;
      }
      const pool = this.#poolFor(origin);
      const stats = this.#statsOf(pool.key);
      const first = Math.max(1, pool.policy.minIdle);
      const rate = prewarm ? this.#startRate(pool, stats, entry.ratePerS, first) : entry.ratePerS;
      this.#replayRate(stats, rate);
      if (prewarm) pool.prewarm(first, undefined, 'start');
      taken++;
    }
    return taken;
  }

  /** Adopts a socket kept across a restart (fd store); ownership passes to the pool unless it is dead. */
  adopt(origin: Origin, socket: ConnectedSocket): boolean {
    return this.#poolFor(origin).adopt(socket);
  }

  /**
   * What reconfigure needs that can fail, done before anything changes: the TLS files the configuration names are
   * read (SOCKPOOL_ERR_CONFIG naming one that cannot be). A reload prepares, then swaps everything in.
   */
  prepare(config: SockpoolConfig): PreparedConfig {
    return { config, tlsFiles: this.#tls ? readTlsFiles(config) : undefined };
  }

  /**
   * New configuration (SIGHUP): policies are recomputed; warm sockets stay unless the egress policy (already
   * swapped in the connector) now refuses their origin or address, or they are tunnels through a proxy whose URL
   * changed or that was removed: those are closed. Returns how many. Sockets lent before the reload are judged the
   * same way when they come back (giveBack). Given a prepared configuration (prepare) it throws nothing; given a
   * configuration, a TLS file that cannot be read throws before anything changed.
   */
  reconfigure(next: SockpoolConfig | PreparedConfig): number {
    const { config, tlsFiles } = isPrepared(next) ? next : this.prepare(next);
    if (tlsFiles) this.#tls?.configure(config, tlsFiles);
    const now = performance.now();
    for (const name of changedProxies(this.#config.proxies, config.proxies)) this.#proxyChangedAt.set(name, now);
    this.#reloadedAt = now;
    this.#config = config;
    let refused = 0;
    for (const pool of this.#pools.values()) {
      refused += pool.dropIdleWhere((socket) => this.#refusedAfterReload(pool, socket));
      const policy = policyFor(config, pool.origin.host, pool.origin.port);
      // Through a proxy the configuration no longer names, nothing is kept idle or refilled (minIdle would go on
      // connecting, each connect failing, for ever); nor as warm TLS sessions of an origin the configuration no longer
      // keeps them for (no acquire reaches the pool: minIdle made sessions, handshakes at the origin, for nobody). The
      // pool is retired once its leases and waiters are gone.
      pool.policyChanged(this.#retiring(pool, policy) ? { ...policy, minIdle: 0, maxIdle: 0 } : policy);
    }
    // A lowered quotas.maxKeptPerUid holds at once, not only at each uid's next release.
    this.#kept.trimAll();
    this.#sweep();
    return refused;
  }

  /**
   * A relay thread hung (tls-relay.ts): the idle sessions it relayed are closed (a session whose relay no longer
   * moves bytes must not be lent); the pools refill through the thread that takes its place. Returns how many.
   */
  dropRelayedBy(relayThread: number): number {
    let dropped = 0;
    for (const pool of this.#pools.values()) {
      if (isTlsPoolKey(pool.key))
        dropped += pool.dropIdleWhere((socket) => socket.relayThread === relayThread, 'relay-hung');
    }
    this.#sweep();
    return dropped;
  }

  /**
   * Whether a socket held since before a reload must go: a tunnel through a proxy whose URL changed or that was
   * removed since it connected, a warm TLS session verified against (or presenting) files that changed, or a
   * socket the egress policy (already swapped in the connector) now refuses.
   */
  #refusedAfterReload(pool: OriginPool, socket: ConnectedSocket): boolean {
    if (this.#tls?.stale(pool.origin, socket)) return true;
    const proxy = pool.origin.proxy;
    if (proxy !== undefined && socket.connectedAt <= (this.#proxyChangedAt.get(proxy) ?? Number.NEGATIVE_INFINITY)) {
      return true;
    }
    try {
      this.#connector.checkHeld(pool.origin, socket.address);
      return false;
    } catch {
      return true;
    }
  }

  /** Stops everything; returns the idle sockets (ownership passes to the caller) when `detach` is set. */
  close(detach: boolean): Array<{ origin: Origin; socket: ConnectedSocket }> {
    this.#closed = true;
    if (this.#sweepTimer) clearInterval(this.#sweepTimer);
    clearImmediate(this.#prewarmTurn);
    this.#prewarms = [];
    this.#prewarmsQueuedFor.clear();
    this.#prewarmsQueued = 0;
    clearInterval(this.#reclaimTimer);
    this.#reclaiming.clear();
    const detached: Array<{ origin: Origin; socket: ConnectedSocket }> = [];
    for (const pool of this.#pools.values()) {
      // A warm TLS session is process memory (its relay thread ends with us): only TCP sockets outlive a restart.
      if (detach && !isTlsPoolKey(pool.key)) {
        for (const socket of pool.detachIdle()) detached.push({ origin: pool.origin, socket });
      }
      pool.close();
    }
    return detached;
  }

  /**
   * Daemon-wide, per ConnectPurpose: sockets opened, sockets lent for the first time, and sockets closed without
   * ever having been lent (an admin's `stats`: `warming`; metrics: sockpool_sockets_opened_total and
   * sockpool_sockets_never_lent_total). Opened less lent less never lent: sockets idle now that were never lent.
   */
  warming(): { opened: PurposeCounts; lent: PurposeCounts; neverLent: PurposeCounts } {
    return {
      opened: { ...this.#warming.opened },
      lent: { ...this.#warming.lent },
      neverLent: { ...this.#warming.neverLent },
    };
  }

  /**
   * Every pool's row and the daemon's totals; with `include`, only the rows of the pools it names (the pool key), and
   * totals over those: a uid's `stats` (client-view.ts) builds no row of another uid's thousands of pools.
   */
  snapshot(include?: (key: string) => boolean) {
    const pools = include ? [...this.#pools.values()].filter((pool) => include(pool.key)) : [...this.#pools.values()];
    const origins = pools.map((pool) => {
      const stats = this.#statsOf(pool.key);
      return {
        origin: pool.key,
        idle: pool.idleCount,
        keptIdle: pool.keptIdleCount,
        leased: pool.leasedCount,
        connecting: pool.connectingCount,
        waiting: pool.waitingCount,
        hits: stats.hits,
        misses: stats.misses,
        demandRatePerS: Number(this.#decayedRate(stats).toFixed(3)),
        connectMs: Number(stats.connectMs.toFixed(2)),
        learnedIdleLifetimeMs: stats.learnedIdleLifetimeMs ?? null,
        learnedFamily: this.#connector.learnedFamily?.(pool.origin) ?? null,
        warmed: stats.warmed,
        warmedLent: stats.warmedLent,
        neverLent: stats.neverLent,
        ...this.#sharedCapOf(pool),
      };
    });
    if (include) return snapshotOf(origins);
    const total = this.#hits + this.#misses;
    return {
      idle: this.#idleTotal,
      leased: origins.reduce((sum, origin) => sum + origin.leased, 0),
      connecting: origins.reduce((sum, origin) => sum + origin.connecting, 0),
      waiting: origins.reduce((sum, origin) => sum + origin.waiting, 0),
      hits: this.#hits,
      misses: this.#misses,
      hitRate: total === 0 ? 0 : this.#hits / total,
      originCount: origins.length,
      warming: this.warming(),
      origins,
    };
  }

  /**
   * For the row of a pool whose origin is reached more ways than one (origin-cap.ts): its connections in all those
   * pools against the one maxPerOrigin, and the acquires waiting for room at it (a waiter sees why it waits). Only
   * such an origin's rows carry it: the others' own counts are the origin's.
   */
  #sharedCapOf(pool: OriginPool): { sharedCap?: { connections: number; maxPerOrigin: number; waiting: number } } {
    const cap = this.#caps.get(fleetKey(pool.origin));
    if (cap === undefined || cap.size < 2) return {};
    return {
      sharedCap: { connections: cap.total(), maxPerOrigin: pool.policy.maxPerOrigin, waiting: cap.waitingCount() },
    };
  }

  /**
   * The pool of `origin` for a client with `tlsTrust` (its warm TLS sessions where the daemon relays them to such a
   * client, else its TCP sockets), made on first use. `lookahead`: for a client queue's guess, which warms what an
   * acquire without an idle session will take: TCP sockets where the policy says warmTlsOnMiss "tcp".
   */
  #poolFor(origin: Origin, tlsTrust?: TlsTrust, lookahead = false): OriginPool {
    const normalised = canonicalOrigin(origin);
    const key = this.#keyOf(normalised, tlsTrust, lookahead);
    let pool = this.#pools.get(key);
    if (!pool) {
      const policy = policyFor(this.#config, normalised.host, normalised.port);
      const connector = isTlsPoolKey(key) && this.#tls ? this.#tls : this.#connector;
      const capKey = fleetKey(normalised);
      let cap = this.#caps.get(capKey);
      if (!cap) {
        cap = new OriginCap();
        this.#caps.set(capKey, cap);
      }
      pool = new OriginPool(key, normalised, policy, connector, this.#events, this.#slots, this.#kept, cap);
      this.#pools.set(key, pool);
      this.#armSweep();
      const learned = this.#store?.learnedIdleLifetime(key);
      if (learned !== undefined && learned !== null) this.#statsOf(key).learnedIdleLifetimeMs = learned;
    }
    return pool;
  }

  /** The pool #poolFor would give, if it exists. */
  #existingPoolFor(origin: Origin, tlsTrust?: TlsTrust): OriginPool | undefined {
    return this.#pools.get(this.#keyOf(canonicalOrigin(origin), tlsTrust, false));
  }

  /** The key of a (canonical) origin's pool for a client with `tlsTrust`: its warm TLS pool's where it relays. */
  #keyOf(origin: Origin, tlsTrust: TlsTrust | undefined, lookahead: boolean): string {
    const key = originKey(origin);
    if (tlsTrust === undefined || !this.#tls) return key;
    const policy = policyFor(this.#config, origin.host, origin.port);
    return this.#tls.relays(origin, policy, tlsTrust) && !(lookahead && tcpOnMiss(policy)) ? tlsPoolKey(key) : key;
  }

  /**
   * A pool holding and awaiting nothing, forgotten now rather than at a sweep (see #retireUnused). Not one whose
   * policy keeps it warm (minIdle > 0): the operator asked for that origin, and a reload that allows it refills it.
   */
  #retireIfEmpty(pool: OriginPool): void {
    if (pool.total !== 0 || pool.waitingCount !== 0 || pool.policy.minIdle > 0) return;
    if (this.#prewarmsQueuedFor.has(pool)) return; // its granted prewarm starts next turn
    if (this.#pools.get(pool.key) !== pool) return;
    this.#forgetPool(pool);
  }

  /** Closes a pool that holds nothing and forgets it, with its stats (and its origin's cap once it has no pool). */
  #forgetPool(pool: OriginPool): void {
    pool.close();
    this.#pools.delete(pool.key);
    this.#forgetStats(pool.key);
    const capKey = fleetKey(pool.origin);
    if (this.#caps.get(capKey)?.size === 0) this.#caps.delete(capKey);
  }

  #statsOf(key: string): OriginStats {
    let stats = this.#stats.get(key);
    if (!stats) {
      stats = {
        ratePerS: 0,
        rateUpdatedAt: performance.now(),
        unannouncedRatePerS: 0,
        unannouncedUpdatedAt: performance.now(),
        connectMs: 0,
        hits: 0,
        misses: 0,
        learnedIdleLifetimeMs: undefined,
        lastPeerCloseAt: Number.NEGATIVE_INFINITY,
        lastPeerCloseAgeMs: 0,
        uids: new Set(),
        warmed: 0,
        warmedLent: 0,
        neverLent: 0,
      };
      this.#stats.set(key, stats);
    }
    return stats;
  }

  /**
   * Another fleet member waits for a slot of this host and port (fleet.ts, onContended, at a heartbeat): the clients
   * holding leases of its pools (plain, warm TLS, proxied: one fleet key) are asked for their idle ones once.
   */
  reclaimFleetKey(key: string): void {
    if (this.#closed || !this.onReclaim) return;
    const keys = this.#caps.get(key)?.keys() ?? [];
    if (keys.length > 0) this.onReclaim(keys);
  }

  /** The keys of every pool of the origins of `pools`: they share its maxPerOrigin (and fleet slots). */
  #originKeysOf(pools: Iterable<OriginPool>): string[] {
    const keys = new Set<string>();
    for (const pool of pools) {
      for (const key of this.#caps.get(fleetKey(pool.origin))?.keys() ?? [pool.key]) keys.add(key);
    }
    return [...keys];
  }

  /**
   * Acquires wait at the pool's cap: the clients of its origin's leases (any of its pools': they share the cap) are
   * asked at once, and again every RECLAIM_INTERVAL_MS while they still wait (a connection in use now may be idle in
   * its client's cache a moment later). One timer asks for every such pool at once: the lease table is read once a
   * tick, however many pools wait.
   */
  #reclaimFor(pool: OriginPool): void {
    if (this.#closed || !this.onReclaim || this.#reclaiming.has(pool)) return;
    this.#reclaiming.add(pool);
    this.onReclaim(this.#originKeysOf([pool]));
    if (this.#reclaimTimer) return;
    this.#reclaimTimer = setInterval(() => {
      for (const waiting of this.#reclaiming) {
        if (!waiting.waitingForRoom || this.#pools.get(waiting.key) !== waiting) this.#reclaiming.delete(waiting);
      }
      if (this.#closed || this.#reclaiming.size === 0) {
        clearInterval(this.#reclaimTimer);
        this.#reclaimTimer = undefined;
        return;
      }
      this.onReclaim?.(this.#originKeysOf(this.#reclaiming));
    }, RECLAIM_INTERVAL_MS);
    this.#reclaimTimer.unref();
  }

  /** Rate as an exponentially decaying event count: each acquire adds 1/τ, the total decays with time constant τ. */
  #bumpRate(stats: OriginStats, events = 1, now = performance.now()): void {
    // (Every warm handoff comes here, after its lease went out: one clock read for the rates and the sum of rates.)
    const added = (events * 1000) / this.#config.pool.predictiveWindowMs;
    stats.ratePerS = this.#decayedRate(stats, now) + added;
    stats.rateUpdatedAt = now;
    this.#ratesSum = this.#ratesTotal(now) + added;
  }

  #decayedRate(stats: OriginStats, now = performance.now()): number {
    const elapsed = now - stats.rateUpdatedAt;
    return stats.ratePerS * Math.exp(-elapsed / this.#config.pool.predictiveWindowMs);
  }

  /** An acquire no announced socket met: demand the predictive idle target follows (warm-target.ts). */
  #bumpUnannounced(stats: OriginStats, now = performance.now()): void {
    stats.unannouncedRatePerS = this.#decayedUnannounced(stats, now) + 1000 / this.#config.pool.predictiveWindowMs;
    stats.unannouncedUpdatedAt = now;
  }

  #decayedUnannounced(stats: OriginStats, now = performance.now()): number {
    const elapsed = now - stats.unannouncedUpdatedAt;
    return stats.unannouncedRatePerS * Math.exp(-elapsed / this.#config.pool.predictiveWindowMs);
  }

  /** A rate replayed (history, a fleet share) as a floor of both: demand this daemon has not seen yet. */
  #replayRate(stats: OriginStats, rate: number): void {
    const now = performance.now();
    const before = this.#decayedRate(stats, now);
    stats.ratePerS = Math.max(before, rate);
    stats.rateUpdatedAt = now;
    this.#ratesSum = this.#ratesTotal(now) + stats.ratePerS - before;
    stats.unannouncedRatePerS = Math.max(this.#decayedUnannounced(stats), rate);
    stats.unannouncedUpdatedAt = now;
  }

  #onDropped(pool: OriginPool, reason: DropReason, idleMs: number, ageMs: number, lent: boolean): void {
    this.#metrics?.deadDropped.inc({ reason });
    // Only from a socket no client ever had: one released to the pool may have been ended by the copy its client
    // kept (shutdown), and a client must not teach every uid of the origin (and, through the store, every later
    // start) a tiny lifetime that recycles all its idle sockets.
    if (reason === 'eof' && !lent) {
      // The server closed a connection that had sent nothing: learn how long its servers keep such connections.
      const stats = this.#statsOf(pool.key);
      const now = performance.now();
      // Several sockets of different ages closing together is a server restart, not an idle timeout.
      const restart =
        now - stats.lastPeerCloseAt < RESTART_WINDOW_MS &&
        Math.abs(ageMs - stats.lastPeerCloseAgeMs) > RESTART_AGE_SPREAD * Math.max(ageMs, stats.lastPeerCloseAgeMs);
      stats.lastPeerCloseAt = now;
      stats.lastPeerCloseAgeMs = ageMs;
      this.#log.debug({ origin: pool.key, idleMs, ageMs, restart }, 'idle socket closed by peer');
      if (restart) return;
      const observed = Math.max(ageMs, MIN_LEARNED_LIFETIME_MS);
      const learned = stats.learnedIdleLifetimeMs;
      // Conservative: a shorter observation wins at once, a longer one moves the estimate a tenth of the way.
      stats.learnedIdleLifetimeMs =
        learned === undefined || observed < learned ? observed : learned + (observed - learned) / 10;
      this.#store?.recordIdleLifetime(pool.key, observed);
      pool.setRecycleAfter(stats.learnedIdleLifetimeMs * RECYCLE_MARGIN);
    }
  }

  /**
   * Every SWEEP_INTERVAL_MS: age out idle sockets, recycle them before the learned server lifetime, and give each
   * pool its idle target: max(minIdle, predicted demand), the predicted one from the rate of acquires no
   * announcement met (warm-target.ts says why). The global cap is shared out by demand (announced included).
   */
  #sweep(): void {
    if (this.#closed) return;
    const now = performance.now();
    const wants: Array<{ pool: OriginPool; want: number; rate: number }> = [];
    for (const pool of this.#pools.values()) {
      const stats = this.#statsOf(pool.key);
      const rate = this.#decayedRate(stats);
      const predicted = this.#config.pool.predictive
        ? predictedTarget(this.#decayedUnannounced(stats), stats.connectMs, this.#config.pool.predictiveWindowMs)
        : 0;
      // A pool a reload left behind (its proxy removed, its warm TLS turned off) connects nothing more; it is retired
      // once empty.
      const want = this.#retiring(pool) ? 0 : Math.min(pool.policy.maxIdle, Math.max(pool.policy.minIdle, predicted));
      wants.push({ pool, want, rate });
      const learned = stats.learnedIdleLifetimeMs;
      pool.setRecycleAfter(learned === undefined ? undefined : learned * RECYCLE_MARGIN);
      pool.sweep(now);
    }
    // (The running sum of the rates, counted afresh: see #ratesSum.)
    let ratesSum = 0;
    for (const stats of this.#stats.values()) ratesSum += this.#decayedRate(stats);
    this.#ratesSum = ratesSum;
    this.#ratesSumAt = performance.now();
    // Highest demand first gets its share of the global idle budget.
    wants.sort((a, b) => b.rate - a.rate);
    let budget = this.#maxIdleTotal();
    for (const { pool, want } of wants) {
      const granted = Math.max(0, Math.min(want, budget));
      budget -= granted;
      pool.setRefillTarget(granted);
    }
    // The cap may have come down since the last idle socket came (a reload, or the fd table's size: quotas.ts).
    this.#enforceIdleCap();
    this.#retireUnused();
    if (this.#pools.size === 0 && this.#sweepTimer) {
      clearInterval(this.#sweepTimer);
      this.#sweepTimer = undefined;
    }
  }

  /**
   * Pools with nothing in them and no recent demand are forgotten, with their in-memory stats: a crawler meets
   * millions of origins. What is worth keeping (demand, learned idle lifetime) is in the store.
   */
  #retireUnused(): void {
    for (const [key, pool] of this.#pools) {
      if (pool.total !== 0 || pool.waitingCount !== 0) continue;
      const removed = this.#retiring(pool);
      // A prewarm or warm granted and queued for the next turn is not unused (unless it is retiring: it drains).
      if (!removed && this.#prewarmsQueuedFor.has(pool)) continue;
      if (removed || pool.policy.minIdle === 0) {
        const stats = this.#statsOf(key);
        if (removed || this.#decayedRate(stats) < 0.001) this.#forgetPool(pool);
      }
    }
  }

  /**
   * Whether a reload left the pool behind, to be retired once empty: its origin is reached through a proxy the
   * configuration no longer names, or it holds warm TLS sessions of an origin the configuration (`policy`, default
   * the pool's) no longer keeps them for.
   */
  #retiring(pool: OriginPool, policy: OriginPolicy = pool.policy): boolean {
    if (this.#proxyRemoved(pool)) return true;
    return isTlsPoolKey(pool.key) && !this.#tls?.enabled(pool.origin, policy);
  }

  /** Whether the pool's origin is reached through a proxy the configuration no longer names. */
  #proxyRemoved(pool: OriginPool): boolean {
    const proxy = pool.origin.proxy;
    return proxy !== undefined && !this.#config.proxies.some((configured) => configured.name === proxy);
  }

  /** Over the global cap: close idle sockets of the origins least likely needed (lowest demand per idle socket). */
  #enforceIdleCap(): void {
    const cap = this.#maxIdleTotal();
    while (this.#idleTotal > cap) {
      let victim: OriginPool | undefined;
      let lowest = Number.POSITIVE_INFINITY;
      for (const pool of this.#pools.values()) {
        if (pool.idleCount === 0) continue;
        const score = this.#decayedRate(this.#statsOf(pool.key)) / pool.idleCount;
        if (score < lowest) {
          lowest = score;
          victim = pool;
        }
      }
      if (!victim?.evictOne()) return;
    }
  }
}

/** See PoolManager.#tcpOnMiss. */
function tcpOnMiss(policy: OriginPolicy): boolean {
  return policy.warmTlsOnMiss === 'tcp' && policy.clientCert === undefined;
}

function policyReason(error: Error): string {
  const reason = (error as { reason?: unknown }).reason;
  return typeof reason === 'string' ? reason : 'policy';
}

/**
 * The handoff with its pool and peer port named. The pool made the handoff object for this acquire alone and keeps
 * no reference to it, so it is named in place rather than copied (one object per handoff on the warm path).
 */
function named(pool: OriginPool, handoff: Handoff): Handoff & { originKey: string; peerPort: number } {
  const result = handoff as Handoff & { originKey: string; peerPort: number };
  result.originKey = pool.key;
  // The peer is the origin, or the proxy a tunnel goes through (a released fd must be connected to it).
  result.peerPort = handoff.port ?? pool.origin.port;
  return result;
}
