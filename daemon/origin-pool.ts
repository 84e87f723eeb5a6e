// The sockets of one origin: idle ones kept warm and watched, a count of leased ones, connects in flight, and a
// fair FIFO queue of acquires waiting for a slot under `maxPerOrigin`.
//
// fd ownership: an idle socket's fd belongs to this pool (closed by #drop). acquire() resolves with an fd that
// then belongs to the caller (the handoff server, which sends it and closes its copy). giveBack() hands one back.
//
// Slots: maxPerOrigin bounds leased + idle + connecting, across all clients (a crawler's politeness limit), and
// across the origin's pools (plain, warm TLS, each proxy's: origin-cap.ts), counted where a connect is decided.
// Waiters queue fairly across uids (fair-queue.ts). A socket a client gave back unused is idle again but kept for
// that client's uid alone (`ownerUid`): the client may still hold a copy of it. Those count against their uid's
// bound across all pools (kept-sockets.ts, the pool manager's): entered when kept idle, left in #takeIdle and #drop.
// maxIdle bounds the shared idle supply only: a kept socket is bounded by its uid's quota, the global idle cap (the
// pool manager's) and maxPerOrigin (it counts in the origin's total as any idle socket), never closed for a shared
// one's room, so a lease released unused always fits, whoever else draws on the pool.

import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import type { Origin } from '../shared/origin.js';
import { type FdWatch, watchFd } from '../shared/poll-set.js';
import type { OriginPolicy } from './config.js';
import { ConnectAbandoned } from './connect-gate.js';
import { type ConnectedSocket, type Connector, connectedPart } from './connector.js';
import { type FairOrder, FairWaitQueue } from './fair-queue.js';
import type { SlotKeeper } from './fleet/slots.js';
import type { KeptHolder, KeptSockets } from './kept-sockets.js';
import { checkIdle, endConnection, markOf, type UsageMark } from './lease-guard.js';
import type { OriginCap } from './origin-cap.js';

export interface Handoff extends ConnectedSocket {
  /** True when the socket was idle in the pool; false when it was connected for this acquire. */
  warm: boolean;
  /** The socket's identity and counters as of this handoff's probe (undefined: not read yet). */
  mark?: UsageMark | undefined;
  /** How long the acquire it served waited while the origin was at its cap (maxPerOrigin, a fleet slot), if at all. */
  capWaitMs?: number;
  /**
   * A client of the uid it goes to had it before (released unused, kept for that uid): that client may hold a copy.
   * Given back without a lease (its acquire was cancelled, its client gone), it is kept for that uid again (giveBack's
   * `lent`), never shared.
   */
  kept?: boolean;
  /**
   * Opened for a client's announcement (a prewarm, a queue's lookahead) and lent for the first time now: the acquire
   * it serves was announced demand, met (see warm-target.ts). Set only when true.
   */
  announced?: boolean;
  /**
   * The purpose the socket was opened for when this is its first lending (set only then): a handoff that never
   * reaches a client goes back as never lent (giveBack's `unlent`; PoolManager, a trust mismatch).
   */
  firstLent?: ConnectPurpose;
}

/** Why an idle socket was closed; `quota`: its uid had more kept than `quotas.maxKeptPerUid` (kept-sockets.ts). */
export type DropReason =
  | 'eof'
  | 'error'
  | 'data'
  | 'ttl'
  | 'recycled'
  | 'evicted'
  | 'excess'
  | 'shutdown'
  | 'refused'
  | 'quota'
  | 'relay-hung';

/**
 * Why a connect was started: for an acquire that waits (`acquire`), the pool's own refill toward its target
 * (`refill`: minIdle, predicted demand), a client's prewarm (`prewarm`; `lookahead`: its queue's guess from waiting
 * requests), an operator's `warm`, or warm-on-start and the fleet's shares (`start`). Counted per connect opened and
 * per socket closed without ever having been lent (PoolManager: stats `warming`, metrics).
 */
export const CONNECT_PURPOSES = ['acquire', 'refill', 'prewarm', 'lookahead', 'warm', 'start'] as const;
export type ConnectPurpose = (typeof CONNECT_PURPOSES)[number];

/** What the pool tells the pool manager (stats, metrics, the global idle cap). */
export interface OriginPoolEvents {
  idleChanged(pool: OriginPool, delta: number): void;
  /**
   * Connects under way for no waiter (refills, prewarms, warms) went up or down by `delta`: each becomes an idle
   * socket if it succeeds, so the pool manager counts them against the global idle cap's room for prewarms.
   */
  connectingAheadChanged?(pool: OriginPool, delta: number): void;
  /**
   * An idle socket was closed. `lent`: a client had it (released unused, kept for its uid): what happened to it may
   * be that client's doing through a copy it kept, not the origin's.
   */
  dropped(pool: OriginPool, reason: DropReason, idleMs: number, ageMs: number, lent: boolean): void;
  /** `uid`: whose connect it was, as for connectFailed (the history store's pending records count it: store.ts). */
  connected(pool: OriginPool, connectMs: number, uid: number | undefined): void;
  /** A connect made for `purpose` completed: a socket was opened at the origin. */
  opened(pool: OriginPool, purpose: ConnectPurpose): void;
  /** A socket opened for `purpose` was lent for the first time (handed out to an acquire). */
  lent(pool: OriginPool, purpose: ConnectPurpose): void;
  /** A socket opened for `purpose` was closed without ever having been lent (`reason`: why it was closed). */
  neverLent(pool: OriginPool, purpose: ConnectPurpose, reason: DropReason): void;
  /** `uid`: whose connect it was (a waiter's or a prewarm's; undefined: the pool's own refill). */
  connectFailed(pool: OriginPool, error: Error, uid: number | undefined): void;
  /** Acquires wait for room that only a lease's end can make (see OriginPool.waitingForRoom). */
  waitingForRoom(pool: OriginPool): void;
  /**
   * Whether the global idle cap keeps one more refill socket of this pool rather than evict it (or another one of
   * this pool's) as soon as it arrives; without it, always. Asked before each refill connect.
   */
  refillRoom?(pool: OriginPool): boolean;
}

/** An idle socket of a pool (exported as a type for KeptSockets, whose entries these are). */
export interface IdleSocket extends ConnectedSocket {
  /**
   * When it came into the pool (the idle watch's delay). Not how long the origin has seen it idle: no socket in the
   * pool ever carried a request (a released one only comes back unused), so that is since `connectedAt`, which the
   * recycling before the learned lifetime counts from, as the lifetime is learned (the pool manager's ageMs).
   */
  idleSince: number;
  /**
   * Watches for EOF, reset or stray bytes. Armed once the socket has been idle IDLE_WATCH_DELAY_MS (see
   * #armSoon): a socket that circulates (released and acquired again within that time, as under load) never
   * touches epoll. Until then the probe before every handoff is the guard, and a dead socket is closed a little
   * later than it could have been.
   */
  poller: FdWatch | undefined;
  /** Closes the socket before the origin's servers would (learned idle lifetime); unref'd. */
  recycleTimer: NodeJS.Timeout | undefined;
  /** Set for a socket a client released: only that uid may have it (shared sockets: undefined). */
  ownerUid: number | undefined;
  /** Identity and counters when it went idle: the handoff's one probe compares against them (lease-guard.ts). */
  mark: UsageMark | undefined;
  /** Why it was connected, while it has never been lent (undefined once lent, and for a socket given back). */
  unlent: ConnectPurpose | undefined;
}

interface Waiter {
  uid: number;
  resolve(handoff: Handoff): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
  settled: boolean;
  /** #roomWaitClock() when it began to wait. */
  roomWaitAtStart: number;
  /** Its place in the order acquires came in, across every pool (the longest waiting first at the origin's cap). */
  arrived: number;
}

/** The next Waiter.arrived. */
let arrivals = 0;

export class OriginPool implements KeptHolder<IdleSocket> {
  readonly key: string;
  readonly origin: Origin;
  policy: OriginPolicy;
  /** Newest last: handoffs take the most recently connected socket, the least likely to be closed by a timeout. */
  #idle: IdleSocket[] = [];
  /** How many of #idle are shared (no ownerUid): counted as they come and go, as every handoff asks (#refillWanted). */
  #sharedIdle = 0;
  #leased = 0;
  #connecting = 0;
  /** Connects started for waiters (the rest are refills and prewarms). */
  #connectingForWaiters = 0;
  /** Those connects by the uid each counts for at the connect gate (see #startConnect). */
  #connectingFor = new Map<number, number>();
  /** (Each change of a uid's waiters or leases here reorders that uid at the origin's cap.) */
  #waiters = new FairWaitQueue<Waiter>((uid) => this.#cap?.changed(uid));
  /**
   * The waiters by turn for a new connect (#nextUncoveredUid): each uid's first waiter that no connect under way for
   * its uid covers, those connects counted as held. Told of each change of #connectingFor.
   */
  readonly #uncovered = this.#waiters.order({
    extra: (uid) => this.#connectingFor.get(uid) ?? 0,
    candidate: (uid, waiting) => waiting[this.#connectingFor.get(uid) ?? 0],
  });
  /**
   * The waiters by what each uid holds of the whole origin (#nextToServe, with the origin's other pools); the cap
   * tells it of each uid whose holding changed in any of them (originChanged).
   */
  #byWholeOrigin: FairOrder<Waiter> | undefined;
  /**
   * Whether an acquire waits here now: the connector may put this origin's connects first (a relay's handshakes); it
   * tells the queues of those connects as it changes (Urgent.watch).
   */
  readonly #hasWaiters = this.#waiters.waiting;
  readonly #open = () => !this.#closed;
  #refillTarget = 0;
  /** Idle time after which a socket is closed by us before the server closes it; undefined until learned. */
  #recycleAfterMs: number | undefined;
  /** The egress policy refused this origin: no background connects until the configuration changes. */
  #refused = false;
  #closed = false;
  #connector: Connector;
  #events: OriginPoolEvents;
  /** Consecutive failed background connects; refills back off while the origin is failing. */
  #failures = 0;
  /**
   * Consecutive sockets dropped for bytes that came before any request, never lent, within STRAY_BYTES_MS of their
   * connect (an origin that speaks first, a proxy talking after its 200): refills back off as for failed connects.
   * Reset when a socket is lent.
   */
  #strayBytes = 0;
  #backoffUntil = 0;
  /** `maxPerOriginFleet` (fleet/slots.ts): a connect first takes a slot, a closed connection gives it back. */
  #slots: SlotKeeper | undefined;
  /** Slots this pool holds, and connects still waiting for theirs (counted in #connecting meanwhile). */
  #slotsHeld = 0;
  #awaitingSlot = 0;
  /** Time waited for room so far (closed periods), and since when it waits now (see #roomWaitClock). */
  #roomWaitTotal = 0;
  #roomWaitSince: number | undefined;
  /** The sockets kept for each uid across pools, bounded per uid (the pool manager's); without it, no such bound. */
  #kept: KeptSockets<IdleSocket> | undefined;
  /** The origin's pools that share its maxPerOrigin (origin-cap.ts); without it, this pool alone. */
  #cap: OriginCap | undefined;

  constructor(
    key: string,
    origin: Origin,
    policy: OriginPolicy,
    connector: Connector,
    events: OriginPoolEvents,
    slots?: SlotKeeper,
    kept?: KeptSockets<IdleSocket>,
    cap?: OriginCap,
  ) {
    this.key = key;
    this.origin = origin;
    this.policy = policy;
    this.#connector = connector;
    this.#events = events;
    this.#slots = slots;
    this.#kept = kept;
    this.#cap = cap;
    if (cap !== undefined) {
      this.#byWholeOrigin = this.#waiters.order({
        extra: (uid) => cap.heldBy(uid) - (this.#waiters.heldOf(uid) ?? 0),
      });
    }
    cap?.join(this);
  }

  /** Of the idle sockets, those kept for one uid (released unused): beside the shared ones maxIdle bounds. */
  get keptIdleCount(): number {
    return this.#idle.length - this.#sharedIdle;
  }

  get idleCount(): number {
    return this.#idle.length;
  }
  get leasedCount(): number {
    return this.#leased;
  }
  get connectingCount(): number {
    return this.#connecting;
  }
  /** Connects under way for no waiter (refills, prewarms, warms): idle sockets to come if they succeed. */
  get connectingAheadCount(): number {
    return this.#connecting - this.#connectingForWaiters;
  }
  get waitingCount(): number {
    return this.#waiters.length;
  }
  /** Uid entries its fair queue read or compared to choose among its waiters (FairWaitQueue.visited); for tests. */
  get waitersVisited(): number {
    return this.#waiters.visited;
  }
  get total(): number {
    return this.#idle.length + this.#leased + this.#connecting;
  }
  /** Acquires waiting that no connect under way covers: they wait for room at the cap (or connect at the next pump). */
  get uncoveredWaiters(): number {
    return this.#waiters.length - this.#connectingForWaiters;
  }

  /**
   * For the origin's cap (OriginCap.turn): each uid's first acquire waiting here that the connects under way for its
   * uid do not cover, with its place in arrival order.
   */
  forEachUncovered(visit: (uid: number, arrived: number) => void): void {
    this.#waiters.forEachUncovered(
      (uid) => this.#connectingFor.get(uid) ?? 0,
      (waiter) => visit(waiter.uid, waiter.arrived),
    );
  }

  /**
   * For the origin's cap: the place in arrival order of `uid`'s first acquire waiting here that the connects under way
   * for its uid do not cover (as forEachUncovered); undefined when it has none.
   */
  firstUncoveredOf(uid: number): number | undefined {
    return this.#waiters.nthOf(uid, this.#connectingFor.get(uid) ?? 0)?.arrived;
  }

  /** What `uid` holds of this pool's connections: its leases and the connects under way for its waiters. */
  heldBy(uid: number): number {
    return (this.#waiters.heldOf(uid) ?? 0) + (this.#connectingFor.get(uid) ?? 0);
  }

  /** The origin's pools share its cap (origin-cap.ts); an origin reached one way only has this pool alone. */
  #shared(): OriginCap | undefined {
    const cap = this.#cap;
    return cap !== undefined && cap.size > 1 ? cap : undefined;
  }

  /** The connections maxPerOrigin counts: this pool's, and those of the origin's other pools. */
  #originTotal(): number {
    return this.#shared()?.total() ?? this.total;
  }

  /** For an acquire's timeout: what the origin's other pools hold of its cap, where it has others. */
  #originWide(): string {
    const shared = this.#shared();
    return shared === undefined ? '' : `; ${shared.total()} connections in all the origin's pools`;
  }

  /**
   * The waiter an idle socket of this pool goes to (one kept for a uid only if it is that uid's): the fairest by what
   * each uid holds here, or, with the origin's other pools, by what it holds of the whole origin (origin-cap.ts), as
   * room at the cap goes. By this pool's counts alone, a socket a uid gave back went straight to that uid's next
   * acquire whenever the uid held less here, however much it held through the other ways, while a uid holding less
   * of the origin waited.
   */
  #nextToServe(): Waiter | undefined {
    const shared = this.#shared();
    return shared === undefined ? this.#waiters.peek() : this.#byWholeOrigin!.peek();
  }

  /**
   * For the origin's cap: what `uid` holds of the origin (in this pool or another) changed; undefined `uid`: the
   * origin's pools changed, and with them what every uid holds.
   */
  originChanged(uid?: number): void {
    if (uid === undefined) this.#byWholeOrigin?.recountAll();
    else this.#byWholeOrigin?.recount(uid);
  }

  /** Whether this pool's waiters may take room at the cap now: the turn there is no other pool's. */
  #mayTake(): boolean {
    return this.#shared()?.mayTake(this) ?? true;
  }

  /** Whether warming (a refill, a prewarm) may connect now: room under the cap that no acquire of the origin waits for. */
  #roomForWarming(): boolean {
    const shared = this.#shared();
    if (shared === undefined) return this.total < this.policy.maxPerOrigin;
    return shared.total() < this.policy.maxPerOrigin && !shared.waiting();
  }

  /**
   * Acquires wait and nothing under way will serve them: the origin is at maxPerOrigin, or their connects wait for
   * a fleet slot. Only a lease that ends makes room then, and a client's connection cache may hold idle leases for a
   * long time (the pool manager asks their clients to give those back: HandoffServer.reclaim).
   */
  /**
   * How long the pool has waited for room, in all (ms): the time waitingForRoom was true, as #pump sees it. A served
   * waiter's capWaitMs is how much of this passed while it waited.
   */
  #roomWaitClock(): number {
    return this.#roomWaitTotal + (this.#roomWaitSince === undefined ? 0 : performance.now() - this.#roomWaitSince);
  }

  get waitingForRoom(): boolean {
    const waiting = this.#waiters.length;
    if (waiting === 0) return false;
    if (this.#awaitingSlot > 0) return true;
    return (
      waiting > this.#connectingForWaiters && (this.#originTotal() >= this.policy.maxPerOrigin || !this.#mayTake())
    );
  }

  /**
   * Resolves with a live connected socket for a client of `uid`; ownership of its fd passes to the caller. `signal`:
   * the client gave the acquire up (`cancel`): a waiting one leaves the queue and rejects with SOCKPOOL_ERR_ABORTED.
   */
  acquire(timeoutMs: number, uid = 0, signal?: AbortSignal): Promise<Handoff> {
    if (this.#closed) return Promise.reject(new SockpoolError(ErrorCodes.SHUTTING_DOWN, 'pool is closing'));
    if (signal?.aborted) return Promise.reject(cancelledError(this.key));
    const warm = this.takeWarm(uid);
    if (warm) return Promise.resolve(warm);
    return new Promise<Handoff>((resolve, reject) => {
      const waiter: Waiter = {
        uid,
        resolve,
        reject,
        settled: false,
        roomWaitAtStart: this.#roomWaitClock(),
        arrived: arrivals++,
        timer: setTimeout(() => {
          this.#removeWaiter(waiter);
          reject(
            new SockpoolError(
              ErrorCodes.ACQUIRE_TIMEOUT,
              `no connection to ${this.key} within ${timeoutMs} ms (maxPerOrigin ${this.policy.maxPerOrigin}, ` +
                `${this.#leased} leased, ${this.#waiters.length} waiting${this.#originWide()})`,
              { origin: this.key, timeoutMs },
            ),
          );
        }, timeoutMs),
      };
      this.#waiters.push(waiter);
      signal?.addEventListener(
        'abort',
        () => {
          // (A connect started for it goes to the next waiter, or idle, as at a timeout.)
          if (waiter.settled) return;
          this.#removeWaiter(waiter);
          reject(cancelledError(this.key));
        },
        { once: true },
      );
      this.#pump();
    });
  }

  /**
   * A checked idle socket for a client of `uid` at once (acquire's warm path), or undefined when none is idle. `now`:
   * performance.now(), from a caller that read it in this turn.
   */
  takeWarm(uid = 0, now = performance.now()): Handoff | undefined {
    if (this.#closed) return undefined;
    const warm = this.#takeIdle(uid, now);
    if (warm) this.#waiters.held(uid, +1);
    return warm;
  }

  /** A lease of `uid` ended (the socket is closed): its slot is free. */
  leaseEnded(uid = 0): void {
    this.#leased = Math.max(0, this.#leased - 1);
    this.#waiters.held(uid, -1);
    this.#connectionsGone();
    this.#pump();
  }

  /**
   * A lease of `uid` came back unused: the fd returns to the pool (or is closed if it is dead or not wanted).
   * `lent`: the client had the socket (it may keep a copy), so it is kept for `uid` alone; a socket that never
   * reached the client is shared again. `checked`: the mark the release check just read (lease-guard.ts): the
   * socket is known to be established and quiet, so it is not probed again. `unlent`: the handoff never reached a
   * client and was its socket's first lending (Handoff.firstLent, the caller having undone the `lent` event): it
   * comes back never lent, counted as such wherever it ends.
   */
  giveBack(socket: ConnectedSocket, uid = 0, lent = false, checked?: UsageMark, unlent?: ConnectPurpose): void {
    this.#leased = Math.max(0, this.#leased - 1);
    this.#waiters.held(uid, -1);
    if (checked && !this.#closed) {
      this.#addIdle(socket, lent ? uid : undefined, checked, unlent);
      return;
    }
    const probe = native.probe(socket.fd);
    if (this.#closed || probe.state !== 'alive' || !isEstablished(probe.tcpState)) {
      closePooled(socket, lent);
      this.#connectionsGone();
      if (unlent !== undefined) {
        const reason = this.#closed ? 'shutdown' : probe.state === 'alive' ? 'error' : probe.state;
        this.#events.neverLent(this, unlent, reason);
      }
      this.#pump();
      return;
    }
    this.#addIdle(socket, lent ? uid : undefined, undefined, unlent);
  }

  /**
   * A client announced demand: make `count` idle sockets available soon. One-shot: connects start now, up to
   * maxIdle and maxPerOrigin, and nothing is left pending for later. Returns how many connects it started. (The pool
   * manager spreads a large one over turns with prewarmWanted and startPrewarmConnects.)
   */
  prewarm(count: number, uid?: number, purpose: ConnectPurpose = 'prewarm'): number {
    return this.startPrewarmConnects(this.prewarmWanted(count), uid, purpose);
  }

  /** The connects a prewarm of `count` calls for now: up to maxIdle, less what is idle (shared) or connecting. */
  prewarmWanted(count: number): number {
    const have = this.#sharedIdleCount() + this.connectingAheadCount;
    return Math.max(0, Math.min(count, this.policy.maxIdle) - have);
  }

  /**
   * Starts up to `count` of a prewarm's connects (of `uid`'s), within maxPerOrigin (room no acquire of the origin
   * waits for: #roomForWarming); returns how many it started.
   */
  startPrewarmConnects(count: number, uid?: number, purpose: ConnectPurpose = 'prewarm'): number {
    let started = 0;
    for (; started < count && !this.#closed && this.#roomForWarming(); started++) {
      this.#startConnect(purpose, uid);
    }
    return started;
  }

  /** The pool manager learned how long the origin's servers keep silent connections. */
  setRecycleAfter(ms: number | undefined): void {
    if (ms === this.#recycleAfterMs) return;
    this.#recycleAfterMs = ms;
    for (const socket of this.#idle) this.#scheduleRecycle(socket);
  }

  /**
   * The policy changed (reload): refused origins may be tried again, and a lowered maxIdle or maxPerOrigin holds at
   * once. Past maxPerOrigin idle sockets are closed, those kept for one uid first (no supply for the others), then the
   * oldest; past maxIdle, the oldest shared ones (maxIdle bounds only those). Otherwise they stayed, and were lent,
   * beyond the new cap until each aged out. A maxIdle of 0 closes every idle socket, kept ones too (#keepsNothing: a
   * pool the pool manager retires is given that).
   */
  policyChanged(policy: OriginPolicy): void {
    this.policy = policy;
    while (this.#idle.length > 0 && (this.#keepsNothing() || this.#originTotal() > policy.maxPerOrigin)) {
      this.#drop(this.#idle.find((idle) => idle.ownerUid !== undefined) ?? this.#idle[0]!, 'excess');
    }
    while (this.#sharedIdle > policy.maxIdle) {
      this.#drop(this.#idle.find((idle) => idle.ownerUid === undefined)!, 'excess');
    }
    if (this.#refused) {
      // The backoff counted the old policy's refusals: the new one is tried at once.
      this.#refused = false;
      this.#failures = 0;
      this.#backoffUntil = 0;
    }
    this.#pump();
  }

  /** The pool manager's computed idle target (minIdle, predictive demand), bounded here by the policy. */
  setRefillTarget(target: number): void {
    this.#refillTarget = target;
    this.#pump();
  }

  /** Drops idle sockets past their age limit (idleTtlMs); recycling before the learned lifetime has timers. */
  sweep(now: number): void {
    for (const socket of [...this.#idle]) {
      if (now - socket.connectedAt >= this.policy.idleTtlMs) this.#drop(socket, 'ttl');
      else if (socket.ownerUid !== undefined) this.#checkKept(socket);
    }
    this.#pump();
  }

  /**
   * A socket kept for the uid that released it, at each sweep: the copy its client may have kept can use it while it
   * sits here, and the idle watch sees only what comes in (bytes, EOF, a reset). Without this a client wrote on it
   * (an upload, a request the origin is slow to answer) for as long as idleTtlMs, a working connection no lease
   * counts. Its counters against its mark (one TCP_INFO read, lease-guard.ts): anything sent, or received and read
   * already, and it is dropped, shut down for the copy too.
   */
  #checkKept(socket: IdleSocket): void {
    const verdict = checkIdle(socket.fd, socket.mark);
    if (typeof verdict === 'string') this.#drop(socket, verdict);
    else socket.mark = verdict;
  }

  /** Closes every idle socket `refused` says no to (a reloaded egress policy); returns how many. */
  dropIdleWhere(refused: (socket: ConnectedSocket) => boolean, reason: DropReason = 'refused'): number {
    let dropped = 0;
    for (const socket of [...this.#idle]) {
      if (!refused(socket)) continue;
      this.#drop(socket, reason);
      dropped++;
    }
    return dropped;
  }

  /** Closes the least valuable idle socket (the oldest); used by the global idle cap. */
  evictOne(): boolean {
    const oldest = this.#idle[0];
    if (!oldest) return false;
    this.#drop(oldest, 'evicted');
    return true;
  }

  /**
   * Closes an idle socket for another pool of the origin whose acquires wait at the cap (OriginCap.evictFor): one
   * kept for a uid first (no supply for the others), else the oldest. Its pump comes at the next turn: the waiting
   * pool takes the room now.
   */
  yieldIdle(): boolean {
    const socket = this.#idle.find((idle) => idle.ownerUid !== undefined) ?? this.#idle[0];
    if (!socket) return false;
    this.#drop(socket, 'evicted');
    this.#pumpSoon();
    return true;
  }

  /**
   * Room for a connection of the origin may have come (another of its pools closed one: OriginCap.roomFreed):
   * waiters are served and connects started as at any pump.
   */
  roomMayHaveCome(): void {
    this.#pump();
  }

  /**
   * Takes the idle sockets out of the pool (for the fd store at shutdown); the caller owns them. Sockets kept for
   * one uid are closed instead: after a restart nothing would remember whose they are.
   */
  detachIdle(): ConnectedSocket[] {
    for (const socket of this.#idle.filter((idle) => idle.ownerUid !== undefined)) this.#drop(socket, 'shutdown');
    const sockets = this.#idle;
    this.#idle = [];
    this.#sharedIdle = 0;
    for (const socket of sockets) {
      socket.poller?.close();
      clearTimeout(socket.recycleTimer);
    }
    this.#events.idleChanged(this, -sockets.length);
    this.#connectionsGone();
    return sockets.map(connectedPart);
  }

  /**
   * Adopts an already connected socket (the fd store after a restart); it is probed first. Returns whether the pool
   * kept it (or lent it): false for one it closed, dead, past maxIdle or past the global idle cap.
   */
  adopt(socket: ConnectedSocket): boolean {
    const probe = native.probe(socket.fd);
    if (this.#closed || probe.state !== 'alive' || !isEstablished(probe.tcpState)) {
      native.close(socket.fd);
      return false;
    }
    this.#slots?.count(this);
    this.#slotsHeld++;
    return this.#addIdle(socket);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#armTimer);
    this.#armTimer = undefined;
    for (const waiter of this.#waiters.drain()) {
      this.#removeWaiter(waiter);
      waiter.reject(new SockpoolError(ErrorCodes.SHUTTING_DOWN, `sockpoold is stopping; ${this.key} unavailable`));
    }
    for (const socket of [...this.#idle]) this.#drop(socket, 'shutdown');
    this.#connectionsGone();
    this.#cap?.leave(this);
  }

  /**
   * Connections of this pool are gone: their fleet slots are given back, and the origin's other pools waiting at its
   * cap are told (their room may have come).
   */
  #connectionsGone(): void {
    this.#settleSlots();
    this.#shared()?.roomFreed();
  }

  /** Gives back the slots of connections that are gone (a no-op without a fleet cap: nothing is held). */
  #settleSlots(): void {
    const extra = this.#slotsHeld - (this.total - this.#awaitingSlot);
    if (extra <= 0) return;
    this.#slotsHeld -= extra;
    this.#slots?.release(this, extra);
  }

  /**
   * Those kept for `uid` first, then the shared sockets, newest first among each. Kept ones first: no other uid can
   * take them, and a shared one taken while they sat idle was refilled, while the uid's next release kept one more
   * (a connect per handoff for a client that gives its leases back unused, and kept sockets piling up to its
   * quota). Every candidate is probed right before the handoff (one TCP_INFO read: checkIdle; for a socket released
   * within RECENT_CHECK_MS, the release check's read) so a closed or used socket is never handed out, and one idle
   * past the recycle point (its server may close it any moment) is dropped instead.
   */
  #takeIdle(uid: number, now = performance.now()): Handoff | undefined {
    // (Only where this pool holds kept sockets and the uid has any, in some pool: the common handoff scans once.)
    const mayHaveKept = this.#idle.length > this.#sharedIdle && (this.#kept?.countOf(uid) ?? 1) > 0;
    return (mayHaveKept ? this.#takeNewest(uid, now) : undefined) ?? this.#takeNewest(undefined, now);
  }

  /** #takeIdle's scan: the newest live socket whose ownerUid is `owner` (undefined: a shared one). */
  #takeNewest(owner: number | undefined, now: number): Handoff | undefined {
    for (let index = this.#idle.length - 1; index >= 0; index = Math.min(index - 1, this.#idle.length - 1)) {
      const socket = this.#idle[index]!;
      if (socket.ownerUid !== owner) continue;
      const recycle = this.#recycleAfterMs !== undefined && now - socket.connectedAt >= this.#recycleAfterMs;
      const checked = recycle ? 'recycled' : checkIdle(socket.fd, socket.mark, now);
      if (typeof checked !== 'string') {
        // (Mostly the newest: pop() makes no array of the removed, as splice() does.)
        if (index === this.#idle.length - 1) this.#idle.pop();
        else this.#idle.splice(index, 1);
        if (socket.ownerUid !== undefined) this.#kept?.released(socket.ownerUid, socket);
        else this.#sharedIdle--;
        socket.poller?.close();
        clearTimeout(socket.recycleTimer);
        this.#events.idleChanged(this, -1);
        this.#leased++;
        if (this.#mayNeedPump()) this.#pumpSoon();
        const handoff = handoffOf(socket, true, checked, socket.ownerUid !== undefined);
        if (socket.unlent !== undefined) this.#firstLent(handoff, socket.unlent);
        return handoff;
      }
      this.#drop(socket, checked);
    }
    return undefined;
  }

  /** A socket #addIdle does not keep: closed, its connection counted gone and its drop told; false (not kept). */
  #closeArriving(
    socket: ConnectedSocket,
    ownerUid: number | undefined,
    purpose: ConnectPurpose | undefined,
    reason: 'evicted' | 'excess',
  ): false {
    closePooled(socket, ownerUid !== undefined);
    this.#connectionsGone();
    this.#events.dropped(this, reason, 0, performance.now() - socket.connectedAt, ownerUid !== undefined);
    if (purpose !== undefined) this.#events.neverLent(this, purpose, reason);
    return false;
  }

  /**
   * `mark`: the socket's quiet mark when the caller just read it (a release); otherwise it is read here. Returns
   * whether the socket was kept idle or lent (false: closed as excess, or evicted at once by the global idle cap).
   */
  #addIdle(socket: ConnectedSocket, ownerUid?: number, mark?: UsageMark, purpose?: ConnectPurpose): boolean {
    // The turn at the origin's cap is an acquire's of another of its pools (origin-cap.ts): the connection is closed,
    // for its room. Handed to a waiter here, or kept idle for one, a backlog of releases (keep-alive clients giving each
    // lease back with another acquire queued) kept the room in this pool for as long as it lasted.
    const shared = this.#shared();
    const turn = shared?.turn();
    if (turn !== undefined && turn.pool !== this) {
      return this.#closeArriving(socket, ownerUid, purpose, 'evicted');
    }
    // A socket kept for one uid goes to a waiter of that uid when the slot is that uid's turn anyway, or when the
    // waiters ahead of it still have room to connect: a uid releasing unused with an acquire of its own queued must
    // not keep the slot for good while a uid holding fewer waits at the cap (each lease is new, so maxLeaseMs never
    // ends it). Otherwise it is kept idle and the pump below closes it for the waiter whose turn it is. (With the
    // origin's other pools, the turn is the uid's whose it is across them.)
    const next = (turn === undefined ? undefined : this.#waiters.firstOf(turn.uid)) ?? this.#nextToServe();
    let waiter = next;
    if (ownerUid !== undefined && next !== undefined && next.uid !== ownerUid) {
      const roomForOthers =
        this.#connectingForWaiters + (this.policy.maxPerOrigin - this.#originTotal() - 1) >= this.#waiters.length - 1;
      waiter = roomForOthers ? this.#waiters.shiftOf(ownerUid) : undefined;
    }
    if (waiter) {
      const handoff = handoffOf(socket, true, mark, ownerUid !== undefined);
      if (purpose !== undefined) this.#firstLent(handoff, purpose);
      this.#leased++;
      // Room at the cap kept for it rather than closed: its uid's turn there.
      shared?.took(waiter.uid);
      this.#serve(handoff, waiter);
      return true;
    }
    // maxIdle bounds the shared supply alone: a socket kept for its uid is never excess by it (its uid's quota, the
    // global idle cap and maxPerOrigin bound those). Counted together, a lease released unused at a full idle set was
    // closed (or a kept one made room for a refill's), the uid took a shared socket next, and the refill replaced it:
    // a connect and a close per handoff, or, with room left for the returns, less shared supply for every other uid.
    if (this.#keepsNothing() || (ownerUid === undefined && this.#sharedIdle >= this.policy.maxIdle)) {
      return this.#closeArriving(socket, ownerUid, purpose, 'excess');
    }
    const idle = connectedPart(socket) as IdleSocket;
    // Idle since the release check it just passed, in this turn (its mark's checkedAt), or else since now.
    idle.idleSince =
      mark !== undefined && mark.checkedAt !== Number.NEGATIVE_INFINITY ? mark.checkedAt : performance.now();
    idle.poller = undefined;
    idle.recycleTimer = undefined;
    idle.ownerUid = ownerUid;
    idle.unlent = purpose;
    // A client had it: no longer one that never left the daemon (see ConnectedSocket.connectedPeer).
    if (ownerUid !== undefined) idle.connectedPeer = undefined;
    // Read once when a socket enters the pool from elsewhere (a connect, the fd store), not per handoff; a connect's
    // peer is the one its policy check read (ConnectedSocket.connectedPeer).
    idle.mark = mark ?? markOf(socket.fd, idle.connectedPeer, socket.reconnectRefused);
    this.#idle.push(idle);
    if (ownerUid === undefined) this.#sharedIdle++;
    // Counted for its uid before anything below can close it (the global idle cap), and at once: past the uid's
    // bound its oldest kept socket, in whatever pool, is closed now (never this one; see kept-sockets.ts).
    if (ownerUid !== undefined) this.#kept?.keep(ownerUid, idle, this);
    this.#armSoon();
    this.#scheduleRecycle(idle);
    this.#events.idleChanged(this, +1);
    // (The global idle cap may have evicted it at once: then it is no longer the newest idle socket, nor idle.)
    const kept = this.#idle.at(-1) === idle;
    // Kept for its uid while another uid waits: the pump gives its slot to that waiter (not at the next sweep, and
    // not back to its own uid's next acquire, warm, in between).
    if (ownerUid !== undefined && this.#waiters.length > 0) this.#pump();
    return kept;
  }

  /**
   * Idle sockets any uid may take (those kept for one uid are no supply for the others), up to `atMost` (none when
   * that is below 1).
   */
  #sharedIdleCount(atMost = Number.POSITIVE_INFINITY): number {
    return Math.max(0, Math.min(this.#sharedIdle, atMost));
  }

  /**
   * Nothing is kept idle here, not even a lease released unused: maxIdle 0 (an operator's "no pool at this origin",
   * or a pool the pool manager retires: its proxy removed, its warm TLS turned off).
   */
  #keepsNothing(): boolean {
    return this.policy.maxIdle === 0;
  }

  /**
   * Refill connects the shared supply lacks: the target (up to maxIdle, which bounds shared sockets only) less shared
   * idle sockets and refill connects in flight. Sockets kept for a uid are neither supply nor in the way: a lease
   * released unused fits beside a full shared supply (#addIdle), so no room is left for leases expected back.
   */
  #refillWanted(): number {
    const target = Math.min(this.policy.maxIdle, Math.max(this.policy.minIdle, this.#refillTarget));
    const inFlight = this.connectingAheadCount;
    return target - inFlight - this.#sharedIdleCount(target - inFlight);
  }

  #armTimer: NodeJS.Timeout | undefined;
  /** Starts watching every socket idle for IDLE_WATCH_DELAY_MS and not watched yet (one timer per pool). */
  #armSoon(): void {
    if (this.#armTimer || this.#closed) return;
    this.#armTimer = setTimeout(() => {
      this.#armTimer = undefined;
      const now = performance.now();
      let waiting = false;
      for (const idle of this.#idle) {
        if (idle.poller) continue;
        if (now - idle.idleSince < IDLE_WATCH_DELAY_MS) {
          waiting = true;
          continue;
        }
        // Any readiness on an idle socket (EOF, RST, unexpected bytes) means it is no longer safe to hand out.
        idle.poller = watchFd(idle.fd, () => this.#onIdleEvent(idle));
        idle.poller.start(native.READABLE | native.DISCONNECT);
      }
      if (waiting) this.#armSoon();
    }, IDLE_WATCH_DELAY_MS);
    this.#armTimer.unref();
  }

  #scheduleRecycle(socket: IdleSocket): void {
    clearTimeout(socket.recycleTimer);
    socket.recycleTimer = undefined;
    if (this.#recycleAfterMs === undefined) return;
    const dueInMs = Math.max(0, this.#recycleAfterMs - (performance.now() - socket.connectedAt));
    socket.recycleTimer = setTimeout(() => {
      this.#drop(socket, 'recycled');
      this.#pump();
    }, dueInMs);
    socket.recycleTimer.unref();
  }

  #onIdleEvent(socket: IdleSocket): void {
    if (!this.#idle.includes(socket)) return;
    const probe = native.probe(socket.fd);
    // No spurious wakeups here: the watch's epoll set reports only what the kernel finds ready, level-triggered, so
    // ready yet `alive` is what a peek cannot see (an error queue's entries: timestamps or zero-copy notices that a
    // client keeping a copy asked for), reported again at every turn until the socket leaves. Not safe: dropped.
    const reason = probe.state === 'alive' && isEstablished(probe.tcpState) ? 'error' : dropReason(probe.state);
    this.#drop(socket, reason);
    this.#pump();
  }

  /**
   * Closes a socket kept for its uid because that uid keeps more than its bound (KeptSockets calls it), while another
   * socket goes idle (maybe in this pool, in #addIdle): its slot goes to a waiter at the next turn, not in the midst
   * of that.
   */
  dropKept(socket: IdleSocket): void {
    this.#drop(socket, 'quota');
    this.#pumpSoon();
  }

  #drop(socket: IdleSocket, reason: DropReason): void {
    const index = this.#idle.indexOf(socket);
    if (index === -1) return;
    this.#idle.splice(index, 1);
    if (socket.ownerUid === undefined) this.#sharedIdle--;
    if (reason === 'data' && socket.unlent !== undefined && performance.now() - socket.connectedAt < STRAY_BYTES_MS) {
      // Its next one would get the same, and be dropped the same, as soon as watched: without this, refills connected
      // again at once, every IDLE_WATCH_DELAY_MS, for as long as minIdle or demand asked. (Bytes after a while are a
      // server's word at its idle timeout, such as a 408: the socket lived; the next one is made at once.)
      this.#strayBytes++;
      const backoff = Math.min(30_000, 250 * 2 ** Math.min(this.#strayBytes, 7));
      this.#backoffUntil = Math.max(this.#backoffUntil, performance.now() + backoff);
    }
    if (socket.ownerUid !== undefined) this.#kept?.released(socket.ownerUid, socket);
    socket.poller?.close();
    clearTimeout(socket.recycleTimer);
    closePooled(socket, socket.ownerUid !== undefined);
    this.#connectionsGone();
    const now = performance.now();
    this.#events.idleChanged(this, -1);
    this.#events.dropped(this, reason, now - socket.idleSince, now - socket.connectedAt, socket.ownerUid !== undefined);
    if (socket.unlent !== undefined) this.#events.neverLent(this, socket.unlent, reason);
  }

  /** A socket opened for `purpose` goes out for the first time in `handoff`. */
  #firstLent(handoff: Handoff, purpose: ConnectPurpose): void {
    this.#strayBytes = 0;
    if (purpose === 'prewarm' || purpose === 'lookahead') handoff.announced = true;
    handoff.firstLent = purpose;
    this.#events.lent(this, purpose);
  }

  /** Resolves `waiter` (default: the next in fair order) with a socket already counted as leased. */
  #serve(handoff: Handoff, chosen?: Waiter): void {
    const waiter = chosen ?? this.#waiters.shift();
    if (!waiter) throw new SockpoolError(ErrorCodes.INTERNAL, '#serve without a waiter');
    if (chosen) this.#waiters.remove(chosen);
    this.#waiters.held(waiter.uid, +1);
    // Its turn: when a lease of another uid ends and the two hold as many, that other uid goes first.
    this.#waiters.served(waiter.uid);
    clearTimeout(waiter.timer);
    waiter.settled = true;
    const capWaitMs = this.#roomWaitClock() - waiter.roomWaitAtStart;
    if (capWaitMs > 0) handoff.capWaitMs = capWaitMs;
    waiter.resolve(handoff);
  }

  #removeWaiter(waiter: Waiter): void {
    this.#waiters.remove(waiter);
    clearTimeout(waiter.timer);
    waiter.settled = true;
  }

  #pumpScheduled = false;
  /**
   * Whether a pump after a handoff could do anything: serve a waiter, or start a refill connect because the idle
   * supply fell below the target. Most warm handoffs leave the pool above its target (and the socket often comes
   * back in the same turn): they schedule nothing, which spares the event loop a turn that polls without waiting.
   * This pool's own total, not the origin's (origin-cap.ts): a handoff changes neither, and the pump asks the cap.
   */
  #mayNeedPump(): boolean {
    return this.#waiters.length > 0 || (this.total < this.policy.maxPerOrigin && this.#refillWanted() > 0);
  }

  #pumpSoon(): void {
    if (this.#pumpScheduled) return;
    this.#pumpScheduled = true;
    setImmediate(() => {
      this.#pumpScheduled = false;
      this.#pump();
    });
  }

  /** Serves waiters from idle sockets, then starts the connects that waiters and the refill target call for. */
  #pump(): void {
    if (this.#closed) return;
    for (let next = this.#nextToServe(); next; next = this.#nextToServe()) {
      const warm = this.#takeIdle(next.uid);
      if (!warm) break;
      this.#serve(warm, next);
    }
    const limit = this.policy.maxPerOrigin;
    const shared = this.#shared();
    // Sockets kept for one uid hold slots that waiting clients of other uids need: free them. So do the idle sockets
    // of the origin's other pools, which no waiter here can take (not before those pools' waiters had their turn).
    while (this.#waiters.length > this.#connectingForWaiters && this.#originTotal() >= limit && this.#mayTake()) {
      const kept = this.#idle.find((idle) => idle.ownerUid !== undefined);
      if (kept) this.#drop(kept, 'evicted');
      else if (!shared?.evictFor(this)) break;
    }
    // Waiters first: one connect per waiter not already covered by a connect in flight (with the origin's other
    // pools, for the uid whose turn it is across them, while it is this pool's).
    while (this.#waiters.length > this.#connectingForWaiters && this.#originTotal() < limit) {
      const turn = shared?.turn();
      if (turn !== undefined && turn.pool !== this) break;
      this.#startConnect('acquire', turn?.uid ?? this.#nextUncoveredUid());
      if (turn !== undefined) shared!.took(turn.uid);
    }
    if (this.waitingForRoom) {
      this.#roomWaitSince ??= performance.now();
      this.#events.waitingForRoom(this);
    } else if (this.#roomWaitSince !== undefined) {
      this.#roomWaitTotal += performance.now() - this.#roomWaitSince;
      this.#roomWaitSince = undefined;
    }
    if (this.#refused || performance.now() < this.#backoffUntil) return;
    // Within the global idle cap's room: at a full cap a refill's socket was evicted on arrival (often from this
    // pool), and this pump connected again at once, in a loop bounded only by the connect time.
    while (this.#refillWanted() > 0 && this.#roomForWarming() && (this.#events.refillRoom?.(this) ?? true)) {
      this.#startConnect('refill');
    }
  }

  /**
   * `uid`: whose connect it is at the connect gate (ConnectGate): a waiter's is the uid of the first waiter, in fair
   * order, that the connects already under way for waiters do not cover (the uid first in the queue would count
   * every connect as its own, and another uid's acquire here would wait behind that uid's whole backlog at the
   * gate); a prewarm's, the uid that announced it; a refill's, nobody's (undefined).
   */
  #startConnect(purpose: ConnectPurpose, uid = purpose === 'acquire' ? this.#nextUncoveredUid() : undefined): void {
    const forWaiter = purpose === 'acquire';
    this.#connecting++;
    if (forWaiter) {
      this.#connectingForWaiters++;
      if (uid !== undefined) {
        this.#connectingFor.set(uid, (this.#connectingFor.get(uid) ?? 0) + 1);
        this.#uncovered.recount(uid);
        this.#cap?.changed(uid);
      }
    } else {
      this.#events.connectingAheadChanged?.(this, +1);
    }
    // A waiter's connect waits for a fleet slot while someone still waits; a refill or prewarm only takes a free one.
    const slot = this.#slots?.take(this, forWaiter, () => !this.#closed && (!forWaiter || this.#waiters.length > 0));
    if (slot === undefined) {
      this.#connect(purpose, uid);
      return;
    }
    this.#awaitingSlot++;
    slot.then(
      (granted) => {
        this.#awaitingSlot--;
        if (granted) {
          this.#slotsHeld++;
          this.#connect(purpose, uid);
          return;
        }
        // Not needed any more, or the fleet is full for a refill: try again later, quietly.
        this.#connecting--;
        this.#shared()?.roomFreed();
        if (forWaiter) this.#waiterConnectEnded(uid);
        else {
          this.#events.connectingAheadChanged?.(this, -1);
          this.#backoffUntil = performance.now() + FLEET_FULL_BACKOFF_MS;
        }
        this.#pump();
      },
      (error: Error) => {
        this.#awaitingSlot--;
        this.#connectFailed(forWaiter, uid, error);
      },
    );
  }

  #connect(purpose: ConnectPurpose, uid: number | undefined): void {
    const forWaiter = purpose === 'acquire';
    // A waiter's connect is still needed when its turn comes at the gate if a waiter is left to serve, or the refill
    // target is not met. A refill's or prewarm's while the pool is open: one the pool manager retired, or a reload
    // removed, meanwhile starts no lookup, connect or handshake only to be closed. (Otherwise they are bounded where
    // they start: a prewarm by its uid's allowance; a prewarm is not held to the refill target, so it is no test.)
    const wanted = forWaiter
      ? () => !this.#closed && (this.#waiters.length > 0 || this.#refillWanted() > 0)
      : this.#open;
    this.#connector.connect(this.origin, this.policy, this.#hasWaiters, wanted, uid).then(
      (socket) => {
        // A backstop (the connector itself starts over when a reload overtook the connect): a socket made under a
        // configuration replaced since is neither handed out nor kept idle; its slot goes to a connect made anew.
        if (!this.#closed && this.#connector.stale?.(this.origin, socket)) {
          native.close(socket.fd);
          this.#connect(purpose, uid);
          return;
        }
        this.#connecting--;
        if (forWaiter) this.#waiterConnectEnded(uid);
        else this.#events.connectingAheadChanged?.(this, -1);
        this.#failures = 0;
        this.#events.connected(this, socket.connectMs, uid);
        this.#events.opened(this, purpose);
        if (this.#closed) {
          native.close(socket.fd);
          this.#connectionsGone();
          this.#events.neverLent(this, purpose, 'shutdown');
          return;
        }
        if (this.#waiters.length > 0) {
          // Its uid's waiter when fairness allows: a waiter of another uid that came first has a connect of its own.
          // With the origin's other pools, the connect was its uid's turn across them (origin-cap.ts): its uid's.
          const handoff = handoffOf(socket, false, undefined);
          this.#firstLent(handoff, purpose);
          this.#leased++;
          const turnOf = uid !== undefined && this.#shared() !== undefined ? this.#waiters.firstOf(uid) : undefined;
          this.#serve(handoff, turnOf ?? this.#waiters.peekFor(uid));
        } else {
          this.#addIdle(socket, undefined, undefined, purpose);
        }
        this.#pump();
      },
      (error: Error) => this.#connectFailed(forWaiter, uid, error),
    );
  }

  /** The uid a new connect for waiters counts for: see #startConnect. */
  #nextUncoveredUid(): number | undefined {
    return (this.#uncovered.peek() ?? this.#waiters.peek())?.uid;
  }

  /** A connect started for waiters and counted for `uid` ended (served, failed, or not needed). */
  #waiterConnectEnded(uid: number | undefined): void {
    this.#connectingForWaiters--;
    if (uid === undefined) return;
    const count = (this.#connectingFor.get(uid) ?? 0) - 1;
    if (count <= 0) this.#connectingFor.delete(uid);
    else this.#connectingFor.set(uid, count);
    this.#uncovered.recount(uid);
    this.#cap?.changed(uid);
  }

  #connectFailed(forWaiter: boolean, uid: number | undefined, error: Error): void {
    this.#connecting--;
    if (forWaiter) this.#waiterConnectEnded(uid);
    else this.#events.connectingAheadChanged?.(this, -1);
    this.#connectionsGone();
    if (error instanceof ConnectAbandoned) {
      // Nobody wanted it any more: not a failure of the origin's (no backoff, no waiter failed).
      this.#pump();
      return;
    }
    this.#failures++;
    if ((error as { code?: string }).code === ErrorCodes.POLICY) this.#refused = true;
    this.#backoffUntil = performance.now() + Math.min(30_000, 250 * 2 ** Math.min(this.#failures, 7));
    this.#events.connectFailed(this, error, uid);
    // The waiter the connect would have served gets the failure (its uid's when fairness allows, else the next in
    // fair order; with the origin's other pools, its uid's, whose turn across them the connect was, as in #connect):
    // queue order is kept and nobody waits on a dead origin until timeout.
    if (forWaiter && this.#waiters.length > 0) {
      const turnOf = uid !== undefined && this.#shared() !== undefined ? this.#waiters.firstOf(uid) : undefined;
      const waiter = turnOf ?? this.#waiters.peekFor(uid)!;
      this.#waiters.remove(waiter);
      clearTimeout(waiter.timer);
      waiter.settled = true;
      waiter.reject(error);
    }
    this.#pump();
  }
}

/** The acquire's client gave it up (`cancel`). */
export function cancelledError(origin: string): SockpoolError {
  return new SockpoolError(ErrorCodes.ABORTED, `the client gave up its acquire of ${origin}`, { origin });
}

/**
 * Bytes within this long of a socket's connect, before any request, make a speaking-first peer (see #strayBytes);
 * later ones end a socket that lived.
 */
const STRAY_BYTES_MS = 1_000;

/** A refill that found the fleet's cap reached waits this long before it tries again. */
const FLEET_FULL_BACKOFF_MS = 250;

/**
 * How long a socket stays idle before it is watched (../shared/poll-set.ts). Sockets that circulate faster never
 * touch epoll (a watch costs an epoll_ctl to start and one to stop); slower ones are watched.
 */
const IDLE_WATCH_DELAY_MS = 50;

function dropReason(state: native.ProbeResult['state']): DropReason {
  return state === 'data' ? 'data' : state === 'error' ? 'error' : 'eof';
}

/** tcpi_state 1 is TCP_ESTABLISHED; undefined means not a TCP socket (never pooled). */
function isEstablished(tcpState: number | undefined): boolean {
  return tcpState === 1;
}

function handoffOf(socket: ConnectedSocket, warm: boolean, mark: UsageMark | undefined, kept = false): Handoff {
  const handoff = connectedPart(socket) as Handoff;
  handoff.warm = warm;
  handoff.mark = mark;
  // (Set only when true: the common handoff builds no field more.) A client had it: see addIdle.
  if (kept) {
    handoff.kept = true;
    handoff.connectedPeer = undefined;
  }
  return handoff;
}

/**
 * Closes a socket of the pool. One that a client had (`lent`: released to the pool for its uid) is shut down
 * first: the client may have kept a copy of the fd, and a plain close would leave that copy a live connection
 * that no count of the daemon's holds (maxPerOrigin, the uid's leases, maxLeaseMs); its close disarms the linger a
 * client may have set through that copy. One the connector made that never left the daemon (connectedPeer) has no
 * linger but the kernel's default, so it is closed without the disarm (one setsockopt a socket's life less); any
 * other (the fd store's, a relay's end) gets the disarm, as its history is not known here.
 */
function closePooled(socket: ConnectedSocket, lent: boolean): void {
  if (lent) endConnection(socket.fd);
  else if (socket.connectedPeer !== undefined) native.closeNeverShared(socket.fd);
  else native.close(socket.fd);
}
