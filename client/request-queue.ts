// The client's queue, and what it tells the daemon about it. A client runs at most `capacity` requests at once
// (threads × concurrencyPerThread; `threads: 0` counts as one thread); later ones wait here, in order, until a
// running one ends. A crawler that hands over its whole frontier thus leaves most of it waiting here, and the
// daemon could be warming sockets for it: the queue announces the first `origins` distinct origins among the
// waiting requests (a `prewarm` each), once while the origin has requests waiting. It asks for as many sockets as
// requests wait for the origin, at most `socketsPerOrigin`, and at most the origin's share of the slots: requests
// leave the queue in order, so while it drains the ones running at once are about the next `capacity` of it, of
// which ⌈capacity × its waiters / all waiters⌉ are the origin's. More were never lent: its other requests run one
// after another over the connections the first ones leave in the client's cache (a crawler's frontier of 500
// requests over 100 origins, 32 at once, had about half its announced sockets go unused, each a connection the
// origin accepted for nothing; docs/benchmarks.md, twenty-first session). For an https origin, less the requests
// running to it now: it may speak HTTP/2, where their connection carries the waiting requests too, and an https origin they
// already cover is passed over without taking a place in the lookahead. An http origin speaks HTTP/1.1: one
// connection per request at once, and those of its running requests stay in the connection cache of the worker
// thread that ran them (no use to a waiting request that starts on another thread), while the origins a crawler
// visits most run more requests at once at times than they do now; so they are not taken off. When an announced
// origin's last waiting request starts (or gives up), the lookahead moves on to the next origin not yet looked at.
// A crawler queues its frontier in one synchronous loop, tens of microseconds a request, and the lookahead used to
// wait for the loop to end: with 500 requests the daemon heard of the next origins only as the first requests'
// responses came back, and their requests found the warm sockets still connecting. So a burst is looked at in parts,
// each time LOOK_EARLY_AFTER requests are waiting that the lookahead has not looked at yet, and once more after it;
// an origin announced in an early part, whose requests go on coming, is topped up to what it would have been asked
// for had the whole burst been in (and an https origin passed over is looked at again once its waiters outnumber
// its running requests).
// The daemon's prewarm quota per uid still bounds what all this asks for; announcing is best effort and never fails
// a request.
//
// The waiting list is an array with a head index: waiters before `#head` have left it (started, or gave up: a
// waiter that gave up stays in place, marked, and is skipped). `#cursor` is how far the lookahead has looked:
// every origin of a waiter between `#head` and `#cursor` is announced (or was, while it still has waiters), so each
// waiter is looked at once. A waiter that gives up lets go of its request at once (its deadline entry held it, body
// and all), and once many have given up behind the head they are dropped from the array (#dropGone): while every
// slot stays taken (slow origins, bodies nobody reads) the head does not move, and a caller whose requests keep
// timing out in the queue would otherwise grow it without bound (found in review; test/request-queue.test.ts).
//
// Throttled origins. A request holds its slot while it waits for a token of a rate-limited origin, so requests to
// such an origin, queued ahead of others, could take every slot and hold up the rest of the queue for as long as
// the origin's rate makes them wait (4 slots, 8 requests to an origin at 1 request/s: a request to another origin
// behind them waited 4–5 s). Once a request of an origin waited for its token (the client tells throttled()), the
// origin's requests together with every other throttled origin's hold at most half the slots (THROTTLED_SHARE), but
// for slots lent while nothing else waits (below): a waiter of a throttled origin that finds that share taken is
// parked, in order, and starts before later waiters once the share has room; the waiters behind it go on. Most of a
// throttled origin's requests wait for its tokens anyway, so the share costs it little, and the rest of the queue gets
// every slot that frees beyond the share.
// The share is there for the other requests: while none of them waits, the parked waiters borrow free slots, all but a
// reserve. Once every waiter left is parked, they start, in order, beyond the share while fewer than the slots less the
// reserve (THROTTLED_RESERVE, a quarter, at least 1) run, whatever runs there (a request of a marked origin arriving
// while nothing waits, likewise). (Without lending, once every origin with waiters was marked, half a crawler's slots
// sat idle; found in review.) A lent slot is not taken back, and a lent request holds it while it waits for its token
// (seconds at low rates), so the reserve is never lent: lending every free slot made a request to another origin
// arriving later wait for the first running request to end, up to about 1 s behind an origin at 1 request/s and 10 s at
// 0.1 request/s, the wait the share is there to prevent (found in review). So a request to another origin arriving
// later (or a parked one once its mark ended: below) starts at once in a reserved slot, as long as fewer than the
// reserve's slots of such requests arrive while the lent slots are held. Beyond that it waits for the first slot that
// frees, lent or not, and that slot is its own: while any waiter not parked waits nothing is lent (the queue is full
// then), and parked waiters start before it only within the share. The reserve splits what the share leaves: the
// throttled origins may run three quarters of the slots while nothing else waits (one origin's rate bounds it anyway;
// many marked origins run up to half as many requests again), and a burst of a quarter of the slots to other origins
// starts at once. With 1 or 2 slots nothing is lent beyond the share.
//
// The mark does not last for ever: a crawler whose origin was rate-limited once in the morning would keep it to half
// the slots all day (found in review). It ends THROTTLED_HOLD_MS after the origin's last request that waited (each
// one that waits, while marked too, starts the time again): an origin whose rate still holds its requests back
// goes on sending waits and stays marked. The time is read only for marked origins, as one of their requests enters
// or leaves, where a waiter finds the share taken, and, while waiters are parked, as any request leaves and on a
// timer set for the first mark's end: seen only by its own requests, a mark could end unseen while its waiters
// stayed parked behind a share held by requests waiting minutes for their tokens, slots free, until their deadlines
// failed them (found in review); and an origin marked once whose requests then ran long (a large download, a stream
// read slowly) kept them in the share after its mark ended, so another throttled origin's requests parked behind
// them, slots free, for as long as their own mark lasted (found in a later review). Every mark's end is looked for
// there, not only a parked origin's (no sooner than the first mark can end: one clock read). Where an ended mark is
// seen, its parked waiters go back to the head of the queue, in order, and start first. (So every parked waiter's
// origin is marked. With lending, the slots free beside parked waiters are the reserve's: an ended mark's waiters
// are requests like any other, and the timer starts them there.) An origin can also stop
// waiting only because the share holds it under its rate (rate × the time a request takes ≤ the share); its mark
// then ends, its requests take more slots, wait, and mark it again: a flap, which costs the rest of the queue what
// the origin's first requests cost before the queue knew (the slots it took before one of them ended having waited,
// held until their tokens come). So that it cannot repeat every minute, an origin marked again within
// its last hold of that mark ending keeps the new one twice as long (up to THROTTLED_HOLD_MAX_MS); one marked later
// than that starts again at THROTTLED_HOLD_MS. A mark is counted over time, not over requests in a row that did
// not wait: while marked, the share itself keeps requests from waiting, so such a count would end the mark soonest
// exactly where it works. (An idle origin's record, mark and all, can also be dropped with the others: see below.)
//
// A redirect's next hop (`ahead`) is part of a request that already waited its turn here: it waits before every other
// waiter (after the parked ones, which came before it), in order among hops. Entering as a new request, each hop
// waited behind everything queued since its chain began, within the chain's one deadline: a crawler's redirected
// URLs (http to https, to www) waited the whole queue again per hop and timed out where URLs without a redirect did
// not (found in review). The slot its last hop left has gone to the first waiter by then: a hop waits for the next.
//
// How many may wait. By default, as many as the caller makes (`maxQueued` Infinity): each waiter already has a
// deadline, and a crawler may hand over its whole frontier. With `maxQueued` set, a request that would wait while that
// many already wait (parked ones included) fails at once with SOCKPOOL_ERR_LIMIT, leaving nothing behind: a service
// that fans out per incoming request sheds load there instead of growing its latency and memory (the capacity is the
// client's, so its caller cannot tell from outside whether a request would wait).
//
// Origin affinity. A slot that frees is on the worker thread whose request ended, and each thread has a connection
// cache of its own: a waiter whose origin that thread holds no connection to leases a new one (an https origin: a TLS
// handshake), while one a few places behind it could have reused one. So the queue asks the client (`claimIdle`,
// ThreadLanes.claimIdle, which says why the lanes own the rest) whether a thread with room holds an idle connection to
// a waiter's origin, for the head first and then for the waiters behind it, up to AFFINITY_WINDOW of them, and
// starts the first that does; none does: the head. Order stays near FIFO and nothing starves: a head passed over
// AFFINITY_MAX_PASSES times starts next, whatever its origin. Only waiters in #waiters are taken so (not parked ones,
// nor a redirect's hops), and none of a throttled origin (they wait for the share's room). One taken out of order is
// marked gone where it stands, as a waiter that gave up is, and passed by the head later.
//
// The per-origin records are not deleted when an origin's last request leaves: a Map that adds and deletes per
// request keeps garbage alive past young-generation GCs (../shared/id-table.ts). An idle record stays, ready for the
// origin's next request, until IDLE_ORIGINS_KEPT of them have piled up; then the Map is rebuilt whole with the busy
// ones (docs/benchmarks.md, "The queue's Map churn", has what it saves).

import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { epochNow, type TransferRequest, timeoutError } from '../worker/curl-engine.js';
import { Deadlines } from '../worker/deadlines.js';
import { abortedError } from '../worker/transfer-runtime.js';
import type { UrlTarget } from '../worker/url-target.js';

/** What the client's `announce` option sets. */
export interface AnnounceOptions {
  /** Distinct origins among the waiting requests announced at once (the lookahead). */
  origins: number;
  /** Sockets asked for per origin: as many as requests wait for it, at most this. */
  socketsPerOrigin: number;
}

/** One origin as the queue announces it (what `prewarm` takes). */
export interface AnnouncedOrigin {
  host: string;
  port: number;
  count: number;
  https: boolean;
}

interface Waiter {
  target: UrlTarget;
  /** Set once the waiter left the queue: it started, or its deadline passed, or its signal fired. */
  gone: boolean;
  /** In #parked (a throttled origin's, waiting for the throttled share to have room), not in #waiters. */
  parked: boolean;
  /** In #ahead (a redirect's next hop: see the header), not in #waiters. */
  ahead: boolean;
  /** Not counted in #unseen: the lookahead looked at it, or it left #waiters (or never was there: parked, ahead). */
  seen: boolean;
  start: () => void;
  fail: (error: Error) => void;
  deadline: ReturnType<Deadlines['add']> | undefined;
  signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
}

/** One origin's requests in the queue: how many wait, how many hold a slot, whether the lookahead has looked at it
 *  (and announced it, or passed it over because the requests running to it, an https origin, cover what waits), and
 *  whether it is throttled (see the header). Idle while both counts are 0. */
interface OriginRequests {
  waiting: number;
  running: number;
  looked: 'no' | 'announced' | 'passed';
  /** Sockets announced for the origin while it is 'announced' (what a top-up adds to). */
  asked: number;
  throttled: boolean;
  /** While throttled: when the mark ends, unless a request waits again before then (see the header). */
  throttledUntil: number;
  /** How long the origin's current or last mark lasts after its last wait. */
  throttledHoldMs: number;
  /** When its last mark ended (-Infinity: never marked, or none ended). */
  throttledEndedAt: number;
  /** Its waiters in #parked still waiting. */
  parked: number;
}

/** A burst is looked at each time this many waiters past the lookahead's cursor are in (see the header): a few
 *  messages to the daemon for a whole frontier, the first of them while the caller is still queueing. */
const LOOK_EARLY_AFTER = 64;

/** Idle origin records kept before the records are rebuilt with the busy ones only (see the header). */
const IDLE_ORIGINS_KEPT = 1024;

/** Waiters before the head are dropped from the array once this many have piled up (and they are most of it); so
 *  are waiters that gave up, after the head. */
const COMPACT_AFTER = 1024;

const noop = () => {};

/** Waiters looked at, from the head, for one whose origin a thread with room holds idle; and how many times the head
 *  may be passed over so (see the header). */
const AFFINITY_WINDOW = 16;
const AFFINITY_MAX_PASSES = 16;

/** The part of the slots that requests to throttled origins may hold together (see the header). */
const THROTTLED_SHARE = 0.5;

/** The part of the slots never lent beyond the share (at least 1): while the lent slots are held, requests to other
 *  origins arriving start at once there (see the header). */
const THROTTLED_RESERVE = 0.25;

/** A throttled mark ends this long after the origin's last request that waited; a mark that comes back soon after
 *  one ended lasts twice as long as that one, up to the max (see the header). */
const THROTTLED_HOLD_MS = 60_000;
const THROTTLED_HOLD_MAX_MS = 16 * 60_000;

export class RequestQueue {
  readonly #capacity: number;
  /** The most waiters at once (see the header). */
  readonly #maxWaiting: number;
  readonly #lookahead: AnnounceOptions | undefined;
  readonly #announce: (origins: AnnouncedOrigin[]) => void;
  /** Requests holding a slot (from enter() to leave()). */
  #running = 0;
  /** Slots that requests to throttled origins may hold together, and how many they hold. */
  readonly #throttledCapacity: number;
  /** Parked waiters start beyond the share while fewer requests than this run and nothing else waits (the slots less
   *  the reserve: see the header). */
  readonly #lendBelow: number;
  #throttledRunning = 0;
  /** Waiters of throttled origins that found the throttled share taken, in order; `#parkedHead` as for #waiters. */
  #parked: Waiter[] = [];
  #parkedHead = 0;
  /** Waiters in #parked that are still waiting (also counted in #waiting). */
  #parkedWaiting = 0;
  /** The origins of those waiters (all marked). */
  #parkedOrigins = new Set<OriginRequests>();
  /** Every marked origin (those with parked waiters among them), and no mark ends before `#marksEndFrom` (a bound
   *  from below: each wait moves a mark's end later). While waiters are parked, a timer is set for the first end. */
  #marked = new Set<OriginRequests>();
  #marksEndFrom = Number.POSITIVE_INFINITY;
  #markTimer: ReturnType<typeof setTimeout> | undefined;
  /** When it fires (the marks' clock). */
  #markTimerAt = Number.POSITIVE_INFINITY;
  /** Waiters that go before #waiters (a redirect's next hops), in order; `#aheadHead` as for #waiters. */
  #ahead: Waiter[] = [];
  #aheadHead = 0;
  #waiters: Waiter[] = [];
  #head = 0;
  #cursor = 0;
  /** Waiters still in the queue. */
  #waiting = 0;
  /** Waiters at or after `#head` that gave up (marked, still in the array). */
  #gone = 0;
  /** By origin key: every origin with waiters or (https, announcing on) running requests, and some idle ones. */
  #origins = new Map<string, OriginRequests>();
  /** Idle records in #origins. */
  #idleOrigins = 0;
  /** Origins with waiters that were announced. */
  #announced = 0;
  #lookPending = false;
  /** Waiters in #waiters the lookahead has not looked at yet (see Waiter.seen). */
  #unseen = 0;
  /** Origins looked at before that got more waiters since: the next look tops them up (see the header). */
  #lookAgain = new Map<OriginRequests, UrlTarget>();
  /** Whoever waits for the queue to be empty and no request to hold a slot (close()). */
  #onIdle: Array<() => void> = [];
  /** Deadlines of the waiters, on one timer. */
  readonly #deadlines = new Deadlines(epochNow);
  /** The clock of the throttled marks (ms). */
  readonly #now: () => number;
  /** Whether a thread with room holds an idle connection to the origin (claimed for the waiter if so; see the
   *  header); undefined: no threads. */
  readonly #claimIdle: ((key: string) => boolean) | undefined;
  /** The head the count below is for, and how many waiters behind it started before it (see the header). */
  #passedHead: Waiter | undefined;
  #headPasses = 0;

  /** `announce` gets each batch of origins to announce; it must not throw (the caller ignores its failures).
   *  `maxWaiting`: the client's `maxQueued`. `now` is the clock the throttled marks end by (tests pass their own).
   *  `claimIdle`: ThreadLanes.claimIdle, for the origin affinity (see the header). */
  constructor(
    capacity: number,
    lookahead: AnnounceOptions | undefined,
    announce: (origins: AnnouncedOrigin[]) => void,
    maxWaiting = Number.POSITIVE_INFINITY,
    now: () => number = epochNow,
    claimIdle?: (key: string) => boolean,
  ) {
    this.#now = now;
    this.#claimIdle = claimIdle;
    this.#capacity = capacity;
    this.#maxWaiting = maxWaiting;
    this.#throttledCapacity = Math.max(1, Math.floor(capacity * THROTTLED_SHARE));
    this.#lendBelow = capacity - Math.max(1, Math.floor(capacity * THROTTLED_RESERVE));
    this.#lookahead = lookahead && lookahead.origins > 0 ? lookahead : undefined;
    this.#announce = announce;
  }

  /** Requests holding a slot (running, or about to). */
  get running(): number {
    return this.#running;
  }

  /** Requests to the origin (by key) holding a slot: running, in either runtime. */
  runningTo(key: string): number {
    return this.#origins.get(key)?.running ?? 0;
  }

  /** Requests waiting for a slot. */
  get waiting(): number {
    return this.#waiting;
  }

  /** Origin records held, busy and idle (bounded: see the header). */
  get originRecords(): number {
    return this.#origins.size;
  }

  /**
   * A request wants to run: undefined when it has a slot at once, else a promise that resolves when it gets one
   * (in order of arrival) and rejects with SOCKPOOL_ERR_TIMEOUT at the request's deadline or SOCKPOOL_ERR_ABORTED
   * when its signal fires, while it waits; one that would wait while `maxWaiting` already wait gets a promise
   * rejected with SOCKPOOL_ERR_LIMIT at once, and is not in the queue. A request that got a slot must give it back
   * with leave(). `ahead`: a redirect's next hop, which waits before the others (see the header).
   */
  enter(
    target: UrlTarget,
    request: TransferRequest,
    signal: AbortSignal | undefined,
    ahead = false,
  ): Promise<void> | undefined {
    let origin = this.#busy(target.key);
    if (
      origin.throttled &&
      (!this.#stillThrottled(origin) || (this.#throttledRunning >= this.#throttledCapacity && this.#noticeEndedMarks()))
    ) {
      // The mark ended (or, the share taken, another origin's that held it): parked waiters start first (they came
      // before this request). Starting them may have rebuilt the records (#maybeIdle), dropping this one if it was
      // idle: it is looked up again.
      this.#startWaiting();
      origin = this.#origins.get(target.key) ?? this.#busy(target.key);
    }
    // (Parked waiters wait for the throttled share only: a request to another origin may start past them.)
    const roomInQueue = this.#running < this.#capacity && this.#waiting === this.#parkedWaiting;
    const throttledFull = origin.throttled && this.#throttledRunning >= this.#throttledCapacity;
    // (The share taken, a slot beyond the reserve is lent while nothing else waits, none parked: see the header.)
    const lent = this.#parkedWaiting === 0 && this.#running < this.#lendBelow;
    if (roomInQueue && (!throttledFull || lent)) {
      this.#running++;
      origin.running++;
      if (origin.throttled) this.#throttledRunning++;
      return undefined;
    }
    // (Not a chain's next hop, `ahead`: the request it continues was let in and waited its turn. On a worker thread
    // the hop before still holds its slot when the next enters, its outcome not back yet, and was refused here.)
    if (this.#waiting >= this.#maxWaiting && !ahead) {
      // (Counted as nothing: #busy took the record out of the idle ones.)
      this.#maybeIdle(origin);
      return Promise.reject(
        new SockpoolError(
          ErrorCodes.LIMIT,
          `${this.#waiting} requests already wait in the client's queue (maxQueued ${this.#maxWaiting})`,
          { maxQueued: this.#maxWaiting },
        ),
      );
    }
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = {
        target,
        gone: false,
        parked: roomInQueue,
        ahead: ahead && !roomInQueue,
        seen: roomInQueue || ahead,
        start: resolve,
        fail: reject,
        deadline: undefined,
        signal,
        onAbort: undefined,
      };
      waiter.deadline = this.#deadlines.add(request.deadline, () => this.#giveUp(waiter, timeoutError(request)));
      if (signal) {
        waiter.onAbort = () => this.#giveUp(waiter, abortedError(signal));
        signal.addEventListener('abort', waiter.onAbort, { once: true });
      }
      this.#waiting++;
      origin.waiting++;
      if (waiter.parked) {
        this.#park(waiter, origin);
        return;
      }
      if (waiter.ahead) {
        this.#ahead.push(waiter);
        return;
      }
      this.#waiters.push(waiter);
      this.#unseen++;
      if (!this.#lookahead) return;
      if (origin.looked !== 'no') {
        this.#lookAgain.set(origin, target);
        this.#lookLater();
      }
      if (this.#announced < this.#lookahead.origins) {
        if (this.#unseen >= LOOK_EARLY_AFTER) this.#lookAhead();
        else this.#lookLater();
      }
    });
  }

  /**
   * A request to `target` waited for a token of its origin's rate: from now on, until the mark ends, the origin's
   * requests count in the throttled share (see the header), the ones running now included. Call it before that
   * request's leave().
   */
  throttled(target: UrlTarget): void {
    const origin = this.#origins.get(target.key);
    if (origin === undefined) return;
    const now = this.#now();
    if (!origin.throttled) {
      // (Marked again within its last hold of that mark ending: it held the origin back, so this one lasts longer.)
      origin.throttledHoldMs =
        now - origin.throttledEndedAt < origin.throttledHoldMs
          ? Math.min(origin.throttledHoldMs * 2, THROTTLED_HOLD_MAX_MS)
          : THROTTLED_HOLD_MS;
      origin.throttled = true;
      this.#throttledRunning += origin.running;
      this.#marked.add(origin);
    }
    origin.throttledUntil = now + origin.throttledHoldMs;
    this.#marksEndFrom = Math.min(this.#marksEndFrom, origin.throttledUntil);
    // (A new mark may end before the one the timer is set for: its end frees the share too.)
    if (this.#parkedOrigins.size > 0 && origin.throttledUntil < this.#markTimerAt) {
      this.#clearMarkTimer();
      this.#armMarkTimer();
    }
  }

  /** A request to `target` that held a slot is over: the slot goes to the next waiter. */
  leave(target: UrlTarget): void {
    // Marks that ended meanwhile, while waiters are parked (see the header): those of their origins start first.
    if (this.#parkedOrigins.size > 0) this.#noticeEndedMarks();
    this.#running--;
    const origin = this.#origins.get(target.key)!;
    // (Before its count goes down: a mark that ends takes the origin's running requests, this one included, out of
    // the share.)
    const throttled = origin.throttled && this.#stillThrottled(origin);
    origin.running--;
    if (throttled) this.#throttledRunning--;
    this.#maybeIdle(origin);
    this.#startWaiting();
    this.#compact();
    if (this.#running === 0 && this.#waiting === 0 && this.#onIdle.length > 0) {
      const waiting = this.#onIdle;
      this.#onIdle = [];
      for (const resolve of waiting) resolve();
    }
  }

  /** Starts waiters while slots are free: parked ones first, while the throttled share has room, then the others in
   *  order (one of a marked origin that finds the share taken parks), then parked ones in lent slots. */
  #startWaiting(): void {
    // Parked waiters came before every waiter still in #waiters: they go first, while the throttled share has room.
    this.#startParked();
    // Then a redirect's next hops (see the header).
    while (this.#running < this.#capacity && this.#aheadHead < this.#ahead.length) {
      const waiter = this.#ahead[this.#aheadHead]!;
      if (waiter.gone) {
        this.#aheadHead++;
        continue;
      }
      const origin = this.#origins.get(waiter.target.key)!;
      if (this.#shareTaken(origin)) {
        if (this.#noticeEndedMarks()) {
          this.#startParked();
          continue;
        }
        this.#aheadHead++;
        waiter.ahead = false;
        this.#park(waiter, origin);
        continue;
      }
      this.#aheadHead++;
      waiter.ahead = false;
      this.#start(waiter);
    }
    while (this.#running < this.#capacity && this.#head < this.#waiters.length) {
      const waiter = this.#waiters[this.#head]!;
      if (waiter.gone) {
        this.#head++;
        this.#gone--;
        continue;
      }
      const origin = this.#origins.get(waiter.target.key)!;
      if (this.#shareTaken(origin)) {
        // Marks that ended unseen may hold the share (see the header): once they are ended, the parked waiters that
        // can start go first, and the head is looked at again (an ended mark's parked waiters are there now).
        if (this.#noticeEndedMarks()) {
          this.#startParked();
          continue;
        }
        this.#head++;
        this.#seen(waiter);
        this.#park(waiter, origin);
        continue;
      }
      // (A mark that just ended put its parked waiters back at the head, before this one: they go first.)
      if (this.#waiters[this.#head] !== waiter) continue;
      const affine = this.#affine(waiter);
      if (affine !== waiter) {
        // (Marked gone where it stands, as one that gave up: the head passes it later.)
        this.#gone++;
        this.#start(affine);
        continue;
      }
      this.#head++;
      this.#start(waiter);
    }
    // Slots still free: every waiter left is parked, and the share borrows them, all but the reserve (see the header).
    this.#startParked(true);
  }

  /** The waiter to start in the head's place (see the header): the head if a thread with room holds an idle connection
   *  to its origin, else the first waiter behind it within AFFINITY_WINDOW whose origin one does, else the head. */
  #affine(head: Waiter): Waiter {
    const claimIdle = this.#claimIdle;
    if (claimIdle === undefined || claimIdle(head.target.key)) return head;
    if (this.#passedHead !== head) {
      this.#passedHead = head;
      this.#headPasses = 0;
    }
    if (this.#headPasses >= AFFINITY_MAX_PASSES) return head;
    let looked = 1;
    for (let index = this.#head + 1; index < this.#waiters.length && looked < AFFINITY_WINDOW; index++) {
      const waiter = this.#waiters[index]!;
      if (waiter.gone) continue;
      looked++;
      if (this.#origins.get(waiter.target.key)!.throttled || !claimIdle(waiter.target.key)) continue;
      this.#headPasses++;
      return waiter;
    }
    return head;
  }

  /** Whether `origin` is marked and the throttled share taken (its mark ends here if its time is up). */
  #shareTaken(origin: OriginRequests): boolean {
    return origin.throttled && this.#throttledRunning >= this.#throttledCapacity && this.#stillThrottled(origin);
  }

  /** Starts parked waiters, in order, while a slot is free and the throttled share has room, or, `lend`, while fewer
   *  than the slots less the reserve run (only when nothing else waits: see the header). */
  #startParked(lend = false): void {
    while (
      this.#running < this.#capacity &&
      (this.#throttledRunning < this.#throttledCapacity || (lend && this.#running < this.#lendBelow)) &&
      this.#parkedHead < this.#parked.length
    ) {
      const waiter = this.#parked[this.#parkedHead++]!;
      if (waiter.gone) continue;
      this.#parkedLeft(waiter);
      this.#start(waiter);
    }
  }

  /** A waiter of the marked `origin` waits in #parked for the throttled share to have room. */
  #park(waiter: Waiter, origin: OriginRequests): void {
    waiter.parked = true;
    this.#parked.push(waiter);
    this.#parkedWaiting++;
    if (origin.parked++ > 0) return;
    this.#parkedOrigins.add(origin);
    // (A timer set for a later end, another origin's longer mark, is set again for this one's.)
    if (origin.throttledUntil < this.#markTimerAt) this.#clearMarkTimer();
    this.#armMarkTimer();
  }

  /** A parked waiter leaves #parked (it starts, or gives up). */
  #parkedLeft(waiter: Waiter): void {
    this.#parkedWaiting--;
    const origin = this.#origins.get(waiter.target.key)!;
    if (--origin.parked === 0) this.#parkedOrigins.delete(origin);
    if (this.#parkedOrigins.size === 0) this.#clearMarkTimer();
  }

  /** The mark of `origin` ended: its parked waiters go back to the head of #waiters, in order (they came before every
   *  waiter there), and start as slots free. */
  #unpark(origin: OriginRequests): void {
    const moved: Waiter[] = [];
    const kept: Waiter[] = [];
    for (let index = this.#parkedHead; index < this.#parked.length; index++) {
      const waiter = this.#parked[index]!;
      if (waiter.gone) continue;
      if (this.#origins.get(waiter.target.key) === origin) {
        waiter.parked = false;
        moved.push(waiter);
      } else kept.push(waiter);
    }
    this.#parked = kept;
    this.#parkedHead = 0;
    this.#parkedWaiting -= moved.length;
    origin.parked = 0;
    this.#parkedOrigins.delete(origin);
    if (this.#parkedOrigins.size === 0) this.#clearMarkTimer();
    // (Looked at already, as parked waiters are: the lookahead's cursor stays past them.)
    this.#cursor = moved.length + Math.max(0, this.#cursor - this.#head);
    this.#waiters = moved.concat(this.#waiters.slice(this.#head));
    this.#head = 0;
  }

  /** Ends the marks whose time is up (their parked waiters go back to the head): whether any ended. */
  #noticeEndedMarks(): boolean {
    const now = this.#now();
    if (now < this.#marksEndFrom) return false;
    let ended = false;
    let next = Number.POSITIVE_INFINITY;
    for (const origin of this.#marked) {
      if (now < origin.throttledUntil) next = Math.min(next, origin.throttledUntil);
      else ended = !this.#stillThrottled(origin) || ended;
    }
    this.#marksEndFrom = next;
    return ended;
  }

  /** While waiters are parked: a timer at the end of the first mark (that end may move later, each wait pushing it:
   *  the timer then looks again). Unref'd: the waiters' deadlines hold the process. */
  #armMarkTimer(): void {
    if (this.#markTimer !== undefined || this.#parkedOrigins.size === 0) return;
    let until = Number.POSITIVE_INFINITY;
    for (const origin of this.#marked) until = Math.min(until, origin.throttledUntil);
    this.#markTimerAt = until;
    this.#markTimer = setTimeout(
      () => {
        this.#markTimer = undefined;
        this.#markTimerAt = Number.POSITIVE_INFINITY;
        this.#noticeEndedMarks();
        this.#startWaiting();
        this.#compact();
        this.#armMarkTimer();
      },
      Math.max(0, until - this.#now()),
    );
    this.#markTimer.unref?.();
  }

  #clearMarkTimer(): void {
    if (this.#markTimer === undefined) return;
    clearTimeout(this.#markTimer);
    this.#markTimer = undefined;
    this.#markTimerAt = Number.POSITIVE_INFINITY;
  }

  /** Whether the marked `origin` is still throttled; a mark whose time is up ends here (see the header), and the
   *  origin's running requests leave the throttled share. */
  #stillThrottled(origin: OriginRequests): boolean {
    const now = this.#now();
    if (now < origin.throttledUntil) return true;
    origin.throttled = false;
    origin.throttledEndedAt = now;
    this.#marked.delete(origin);
    this.#throttledRunning -= origin.running;
    if (origin.parked > 0) this.#unpark(origin);
    return false;
  }

  /** Resolves once nothing waits and no request holds a slot (at once if so now). */
  idle(): Promise<void> {
    if (this.#running === 0 && this.#waiting === 0) return Promise.resolve();
    return new Promise((resolve) => this.#onIdle.push(resolve));
  }

  /** A waiter gets its slot. */
  #start(waiter: Waiter): void {
    this.#left(waiter);
    this.#running++;
    const origin = this.#busy(waiter.target.key);
    origin.running++;
    if (origin.throttled) this.#throttledRunning++;
    waiter.start();
  }

  #giveUp(waiter: Waiter, error: Error): void {
    if (waiter.gone) return;
    // (Before #left: the origin's record may be dropped once idle.)
    if (waiter.parked) this.#parkedLeft(waiter);
    this.#left(waiter);
    const fail = waiter.fail;
    waiter.start = waiter.fail = noop;
    fail(error);
    if (waiter.parked) {
      // (Marked in #parked, passed by leave(); dropped with the others once most of #parked gave up.)
      if (this.#parked.length - this.#parkedHead >= COMPACT_AFTER + 2 * this.#parkedWaiting) {
        this.#parked = this.#parked.slice(this.#parkedHead).filter((parked) => !parked.gone);
        this.#parkedHead = 0;
      }
      return;
    }
    // (A hop that gave up stays in #ahead, marked, until leave() passes it: hops come only as slots free.)
    if (waiter.ahead) return;
    // (It stays in the array, marked, until leave() passes it or #dropGone drops it: waiters exist only while every
    // slot is taken.)
    this.#gone++;
    this.#dropGone();
  }

  /** Drops the waiters that gave up from the array once they are many and most of what is left of it. */
  #dropGone(): void {
    if (this.#gone < COMPACT_AFTER || this.#gone * 2 < this.#waiters.length - this.#head) return;
    const kept: Waiter[] = [];
    let cursor = 0;
    for (let index = this.#head; index < this.#waiters.length; index++) {
      const waiter = this.#waiters[index]!;
      if (waiter.gone) continue;
      kept.push(waiter);
      // (The lookahead has looked at the waiters before the cursor: it stays past the same ones.)
      if (index < this.#cursor) cursor = kept.length;
    }
    this.#waiters = kept;
    this.#head = 0;
    this.#cursor = cursor;
    this.#gone = 0;
  }

  /** The waiter leaves the queue: its deadline and abort listener go, and its origin has one waiter less. */
  #left(waiter: Waiter): void {
    waiter.gone = true;
    this.#seen(waiter);
    this.#waiting--;
    if (waiter.deadline) this.#deadlines.remove(waiter.deadline);
    if (waiter.onAbort) waiter.signal!.removeEventListener('abort', waiter.onAbort);
    // (The deadline's callback holds the request, body and all; a waiter that gave up may stay in the array a while.)
    waiter.deadline = undefined;
    waiter.signal = undefined;
    waiter.onAbort = undefined;
    const origin = this.#origins.get(waiter.target.key)!;
    if (--origin.waiting > 0) return;
    const looked = origin.looked;
    origin.looked = 'no';
    origin.asked = 0;
    if (looked === 'announced') {
      this.#announced--;
      this.#lookLater();
    }
    this.#maybeIdle(origin);
  }

  /** The record of `key` (made if missing), about to count one more request: it is not idle now. */
  #busy(key: string): OriginRequests {
    const origin = this.#origins.get(key);
    if (origin === undefined) {
      const made: OriginRequests = {
        waiting: 0,
        running: 0,
        looked: 'no',
        asked: 0,
        throttled: false,
        throttledUntil: 0,
        throttledHoldMs: 0,
        throttledEndedAt: Number.NEGATIVE_INFINITY,
        parked: 0,
      };
      this.#origins.set(key, made);
      return made;
    }
    if (origin.waiting === 0 && origin.running === 0) this.#idleOrigins--;
    return origin;
  }

  /** After a count went down: an idle record is counted, and too many of them are dropped (rebuilding the Map). */
  #maybeIdle(origin: OriginRequests): void {
    if (origin.waiting !== 0 || origin.running !== 0) return;
    if (++this.#idleOrigins <= IDLE_ORIGINS_KEPT) return;
    const busy = new Map<string, OriginRequests>();
    for (const [key, kept] of this.#origins) if (kept.waiting !== 0 || kept.running !== 0) busy.set(key, kept);
    this.#origins = busy;
    // (A mark of a record dropped goes with it, as before: it counted nothing in the share.)
    for (const marked of this.#marked) if (marked.waiting === 0 && marked.running === 0) this.#marked.delete(marked);
    this.#idleOrigins = 0;
  }

  /** Sockets the lookahead asks for `origin`: its waiters, capped, at most its share of the slots (see the header),
   *  less its running requests for https. */
  #wanted(origin: OriginRequests, target: UrlTarget): number {
    const share = Math.ceil((this.#capacity * origin.waiting) / Math.max(1, this.#waiting));
    const waiting = Math.min(origin.waiting, this.#lookahead!.socketsPerOrigin, share);
    return waiting - (target.secure ? origin.running : 0);
  }

  /** The waiter no longer counts among those the lookahead has not looked at (looked at, started, gave up, parked). */
  #seen(waiter: Waiter): void {
    if (waiter.seen) return;
    waiter.seen = true;
    this.#unseen--;
  }

  /** Looks ahead once the caller's current burst of requests is in (a crawler queues its frontier in one go). */
  #lookLater(): void {
    if (this.#lookPending) return;
    this.#lookPending = true;
    queueMicrotask(() => {
      this.#lookPending = false;
      this.#lookAhead();
    });
  }

  /** Announces origins of waiters past the cursor until `origins` distinct ones are announced. */
  #lookAhead(): void {
    const lookahead = this.#lookahead;
    if (!lookahead) return;
    const batch: AnnouncedOrigin[] = [];
    if (this.#cursor < this.#head) this.#cursor = this.#head;
    while (this.#announced < lookahead.origins && this.#cursor < this.#waiters.length) {
      const waiter = this.#waiters[this.#cursor++]!;
      if (waiter.gone) continue;
      this.#seen(waiter);
      const origin = this.#origins.get(waiter.target.key)!;
      if (origin.looked !== 'no') continue;
      const count = this.#wanted(origin, waiter.target);
      if (count <= 0) {
        origin.looked = 'passed';
        continue;
      }
      origin.looked = 'announced';
      origin.asked = count;
      this.#announced++;
      const { host, port } = waiter.target.origin;
      batch.push({ host, port, https: waiter.target.secure, count });
    }
    // Origins looked at in an earlier part of the burst whose requests went on coming (see the header): topped up to
    // what their waiters now ask for; one passed over is announced once its waiters outnumber its running requests.
    for (const [origin, target] of this.#lookAgain) {
      if (origin.looked === 'no') continue;
      const count = this.#wanted(origin, target);
      if (count <= origin.asked) continue;
      if (origin.looked === 'passed') {
        if (this.#announced >= lookahead.origins) continue;
        origin.looked = 'announced';
        this.#announced++;
      }
      // (The new total, not the difference: a prewarm's count is how many sockets the daemon should have idle or
      // connecting for the origin, and it connects what is missing. Sent as a difference, a top-up asked for fewer
      // than the first announcement had already started, and connected nothing.)
      const { host, port } = target.origin;
      batch.push({ host, port, https: target.secure, count });
      origin.asked = count;
    }
    this.#lookAgain.clear();
    if (batch.length > 0) this.#announce(batch);
  }

  /** Drops waiters before the head once they are many and most of the array. */
  #compact(): void {
    if (this.#parkedHead >= COMPACT_AFTER && this.#parkedHead * 2 >= this.#parked.length) {
      this.#parked = this.#parked.slice(this.#parkedHead);
      this.#parkedHead = 0;
    }
    if (this.#aheadHead === this.#ahead.length) {
      // (Only when there is something to drop: setting an array's length is a call into the runtime, about a µs,
      // and most requests never had a waiter ahead.)
      if (this.#aheadHead > 0) {
        this.#ahead.length = 0;
        this.#aheadHead = 0;
      }
    } else if (this.#aheadHead >= COMPACT_AFTER && this.#aheadHead * 2 >= this.#ahead.length) {
      this.#ahead = this.#ahead.slice(this.#aheadHead);
      this.#aheadHead = 0;
    }
    if (this.#head < COMPACT_AFTER || this.#head * 2 < this.#waiters.length) return;
    this.#waiters = this.#waiters.slice(this.#head);
    this.#cursor = Math.max(0, this.#cursor - this.#head);
    this.#head = 0;
  }
}
