// The acquires waiting for a slot of one origin, fair across uids: when a slot frees, it goes to the waiting uid
// that holds the fewest of the origin's slots (ties: see `served` below, then the longest waiting), and within a uid
// in arrival order. So while other uids wait, no uid's share of maxPerOrigin grows past theirs; with nobody else
// waiting, one uid may use every slot. Owners also say which uid they served (`served`: the pool, the connect gate): ties then go to the
// uid served least recently, so uids tied at the fewest take turns (a uid whose lease or connect just ended, holding
// as few as the others again, does not win the tie with its older waiters).
//
// The order is kept as it changes rather than found by a walk over the waiting uids at each pick (a pool's pump and
// the connect gate pick at every acquire, release and connect, and a shared daemon may have thousands of uids
// waiting): the waiting uids sit in a heap by that order (keyed-heap.ts), each change of a uid's waiters, count or
// turn marks that uid, and the next pick puts just the marked uids back in place (a walk up or down the heap each)
// before it reads the first. An owner that orders by more than the queue knows (FairRule: connects under way that
// cover some waiters, what a uid holds of the origin's other pools) keeps an order of its own (order()) and tells it
// of each uid whose part changed (FairOrder.recount).
import { KeyedHeap } from './keyed-heap.js';

export interface UidWaiter {
  uid: number;
}

/** A waiter with its place in arrival order (the last tie-break between uids). */
export interface Arrival<T> {
  readonly waiter: T;
  readonly seq: number;
}

/**
 * What an order of the waiting uids adds to what the queue knows: `extra(uid)`, added to the uid's count (connects
 * under way for it; what it holds of the origin's other pools); `candidate(uid, waiting)`, the waiter of the uid the
 * order considers, given the uid's waiters in arrival order (by default its first; undefined: none of its waiters).
 */
export interface FairRule<T> {
  extra?: (uid: number) => number;
  candidate?: (uid: number, waiting: ReadonlyArray<Arrival<T>>) => Arrival<T> | undefined;
}

/** A uid's place in an order: what sorts it, read when it was last put in place. */
interface Place<T> {
  count: number;
  servedAt: number;
  arrival: Arrival<T>;
}

/**
 * Whether an acquire waits now for what is queued (Admittable.urgent). One with `watch` (FairWaitQueue.waiting) says
 * when its answer changes: the queues holding its entries then sort them as it changes instead of asking it at each
 * pick; a plain function is asked at each pick.
 */
export interface Urgent {
  (): boolean;
  /** Calls `listener` after each change of the answer; returns the call that stops it. */
  readonly watch?: (listener: () => void) => () => void;
}

/**
 * The waiting uids of a FairWaitQueue in the fair order under a rule (FairWaitQueue.order): fewest counted, then
 * served least recently, then the longest waiting candidate.
 */
export class FairOrder<T> {
  readonly #heap: KeyedHeap<number, Place<T>>;
  /** Waiting uids whose place may have changed since the heap last placed them. */
  readonly #stale = new Set<number>();
  /** The heap is to be built anew from every waiting uid. */
  #rebuild = false;
  readonly #place: (uid: number) => Place<T> | undefined;
  readonly #waits: (uid: number) => boolean;
  readonly #waitingUids: () => Iterable<number>;

  /** (Made by FairWaitQueue.order.) */
  constructor(
    before: (a: Place<T>, b: Place<T>) => boolean,
    place: (uid: number) => Place<T> | undefined,
    waits: (uid: number) => boolean,
    waitingUids: () => Iterable<number>,
  ) {
    this.#heap = new KeyedHeap(before);
    this.#place = place;
    this.#waits = waits;
    this.#waitingUids = waitingUids;
  }

  /** The waiter of the uid first in this order (not removed); undefined when no uid has a candidate. */
  peek(): T | undefined {
    return this.#first()?.arrival.waiter;
  }

  /** The count of the uid first in this order; undefined when no uid has a candidate. */
  leastCount(): number | undefined {
    return this.#first()?.count;
  }

  /**
   * What the rule reads of `uid` (its extra, its candidate) changed: it is put back in place at the next pick. Only
   * waiting uids are kept to be placed (an owner may tell of every uid leasing, and an order may go unasked for long).
   */
  recount(uid: number): void {
    if (this.#rebuild) return;
    if (this.#waits(uid)) {
      this.#stale.add(uid);
      return;
    }
    this.#stale.delete(uid);
    this.#heap.delete(uid);
  }

  /**
   * What the rule reads changed for every uid (the origin's pools changed): built anew at the next pick. What it held
   * goes now: that pick may never come (a pool whose origin is then reached one way only no longer asks its order by
   * the whole origin), and the places held the waiters of the time, long gone.
   */
  recountAll(): void {
    this.#rebuild = true;
    this.#stale.clear();
    this.#heap.clear();
  }

  /** (FairWaitQueue) Nobody waits any more. */
  clear(): void {
    this.#heap.clear();
    this.#stale.clear();
    this.#rebuild = false;
  }

  #first(): Place<T> | undefined {
    if (this.#rebuild) {
      this.#rebuild = false;
      this.#heap.clear();
      for (const uid of this.#waitingUids()) this.#stale.add(uid);
    }
    for (const uid of this.#stale) {
      const place = this.#place(uid);
      if (place === undefined) this.#heap.delete(uid);
      else this.#heap.set(uid, place);
    }
    this.#stale.clear();
    return this.#heap.peek();
  }
}

export class FairWaitQueue<T extends UidWaiter> {
  /** Per uid, its waiters in arrival order; each entry remembers its arrival number. */
  #byUid = new Map<number, Array<Arrival<T>>>();
  #seq = 0;
  #length = 0;
  /** Slots of this origin each uid holds now (leases, counted by the pool). */
  #held = new Map<number, number>();
  /**
   * Per uid, the turn it was last served at (`served`), since the last waiter left (remove): among the uids tied at
   * the fewest held, the one served longest ago (or never) goes first. Without it, when the count of the uid just served
   * drops at once (a connect that finished), that uid ties with the others again and wins the tie by its older
   * waiters: at the connect gate's limit of 1, one uid's backlog all went before another uid's one connect.
   */
  #servedAt = new Map<number, number>();
  #turn = 0;
  #visited = 0;
  /** The orders kept of the waiting uids: the queue's own (peek) first, then the owners' (order()). */
  readonly #orders: Array<FairOrder<T>> = [];
  readonly #own: FairOrder<T>;
  readonly #changed: ((uid: number) => void) | undefined;
  readonly #waitingListeners = new Set<() => void>();

  /** Whether anyone waits here (the pool's connects are urgent while so), telling its watchers as that changes. */
  readonly waiting: Urgent = Object.assign(() => this.#length > 0, {
    watch: (listener: () => void) => {
      this.#waitingListeners.add(listener);
      return () => {
        this.#waitingListeners.delete(listener);
      };
    },
  });

  /**
   * `changed`: told of each uid whose waiters or count changed, as it changes (the origin's cap keeps its order of
   * the uids waiting in all the origin's pools by them: origin-cap.ts).
   */
  constructor(changed?: (uid: number) => void) {
    this.#changed = changed;
    this.#own = this.order({});
  }

  get length(): number {
    return this.#length;
  }

  /**
   * Uid entries its picks have read or compared, and its orders were told of (#touch), so far: their work, which the
   * tests bound (none times it).
   */
  get visited(): number {
    return this.#visited;
  }

  /**
   * An order of the waiting uids kept under `rule` as they change (see the top of this file); the owner tells it of
   * each uid whose part of the rule changed (FairOrder.recount).
   */
  order(rule: FairRule<T>): FairOrder<T> {
    const { extra, candidate } = rule;
    const order = new FairOrder<T>(
      (a, b) => this.#before(a, b),
      (uid) => {
        this.#visited++;
        const waiting = this.#byUid.get(uid);
        const arrival = waiting === undefined ? undefined : candidate ? candidate(uid, waiting) : waiting[0];
        if (arrival === undefined) return undefined;
        const count = (this.#held.get(uid) ?? 0) + (extra ? extra(uid) : 0);
        return { count, servedAt: this.#servedAt.get(uid) ?? -1, arrival };
      },
      (uid) => this.#byUid.has(uid),
      () => this.#byUid.keys(),
    );
    this.#orders.push(order);
    // (Uids already waiting are placed at its first pick.)
    order.recountAll();
    return order;
  }

  /** Whether `a` goes first: fewer counted; among those tied, served less recently (or never); then waited longer. */
  #before(a: Place<T>, b: Place<T>): boolean {
    this.#visited++;
    if (a.count !== b.count) return a.count < b.count;
    if (a.servedAt !== b.servedAt) return a.servedAt < b.servedAt;
    return a.arrival.seq < b.arrival.seq;
  }

  /** `uid`'s waiters, count or turn changed: every order puts it back in place at its next pick (or drops it). */
  #touch(uid: number): void {
    this.#visited += this.#orders.length;
    for (const order of this.#orders) order.recount(uid);
  }

  /**
   * `uid`'s count or turn changed: as #touch, where it waits. A uid that waits for nothing is in no order (each drops
   * a uid when its last waiter leaves, remove()), so a warm handoff and its release, the common case, tell none.
   */
  #touchWaiting(uid: number): void {
    if (this.#byUid.has(uid)) this.#touch(uid);
  }

  /** Queues `waiter`; returns it with its place in arrival order. */
  push(waiter: T): Arrival<T> {
    let queue = this.#byUid.get(waiter.uid);
    if (!queue) {
      queue = [];
      this.#byUid.set(waiter.uid, queue);
    }
    const arrival = { waiter, seq: this.#seq++ };
    queue.push(arrival);
    this.#length++;
    this.#touch(waiter.uid);
    this.#changed?.(waiter.uid);
    if (this.#length === 1) this.#waitingChanged();
    return arrival;
  }

  /**
   * The waiter the next free slot goes to (not removed). With none waiting, the order is not asked: every release
   * into a pool nobody waits at asks (what it was told of meanwhile is placed at the next pick that has waiters).
   */
  peek(): T | undefined {
    return this.#length === 0 ? undefined : this.#own.peek();
  }

  /**
   * As peek(), among the waiters for which `matches` is true (each uid's first such one); scans every waiter (the
   * warm-TLS handshake queue's `mayStart`: AdmissionQueue.take).
   */
  peekWhere(matches: (waiter: T) => boolean): T | undefined {
    let best: { place: Place<T>; uid: number } | undefined;
    for (const [uid, queue] of this.#byUid) {
      this.#visited++;
      const arrival = queue.find((entry) => matches(entry.waiter));
      if (!arrival) continue;
      const place = { count: this.#held.get(uid) ?? 0, servedAt: this.#servedAt.get(uid) ?? -1, arrival };
      if (!best || this.#before(place, best.place)) best = { place, uid };
    }
    return best?.place.arrival.waiter;
  }

  /**
   * Each uid's first waiter that `covered` does not count out, as the pool's uncovered order skips them (the origin's
   * cap, when it orders the waiting uids of all the origin's pools anew: origin-cap.ts).
   */
  forEachUncovered(covered: (uid: number) => number, visit: (waiter: T) => void): void {
    for (const [uid, queue] of this.#byUid) {
      this.#visited++;
      const entry = queue[covered(uid)];
      if (entry) visit(entry.waiter);
    }
  }

  /**
   * As peek(), except that among the uids tied for the fewest held, `uid`'s first waiter goes before the longest
   * waiting (a slot made for `uid` serves it when fairness allows).
   */
  peekFor(uid: number | undefined): T | undefined {
    const next = this.peek();
    const own = uid === undefined ? undefined : this.#byUid.get(uid)?.[0]?.waiter;
    if (!next || !own) return next;
    return (this.#held.get(uid!) ?? 0) <= (this.#held.get(next.uid) ?? 0) ? own : next;
  }

  /** The longest-waiting waiter of `uid` (not removed); undefined when that uid waits for nothing here. */
  firstOf(uid: number): T | undefined {
    return this.#byUid.get(uid)?.[0]?.waiter;
  }

  /** The waiter of `uid` with `index` of its waiters before it (not removed); undefined when it has no more. */
  nthOf(uid: number, index: number): T | undefined {
    return this.#byUid.get(uid)?.[index]?.waiter;
  }

  shift(): T | undefined {
    const waiter = this.peek();
    if (waiter) this.remove(waiter);
    return waiter;
  }

  /** The longest-waiting waiter of `uid`, removed; undefined when that uid waits for nothing here. */
  shiftOf(uid: number): T | undefined {
    const head = this.#byUid.get(uid)?.[0];
    if (!head) return undefined;
    this.remove(head.waiter);
    return head.waiter;
  }

  hasWaiterOf(uid: number): boolean {
    return this.#byUid.has(uid);
  }

  remove(waiter: T): boolean {
    const queue = this.#byUid.get(waiter.uid);
    if (!queue) return false;
    const index = queue.findIndex((entry) => entry.waiter === waiter);
    if (index === -1) return false;
    queue.splice(index, 1);
    if (queue.length === 0) this.#byUid.delete(waiter.uid);
    this.#length--;
    this.#touch(waiter.uid);
    this.#changed?.(waiter.uid);
    // Turns matter only among waiters: those of a queue that emptied are forgotten (a bound on the map, too).
    if (this.#length === 0) {
      this.#servedAt.clear();
      this.#waitingChanged();
    }
    return true;
  }

  /** Every waiter, removed (the pool is closing). */
  drain(): T[] {
    const all = [...this.#byUid.values()].flat().sort((a, b) => a.seq - b.seq);
    const uids = [...this.#byUid.keys()];
    this.#byUid.clear();
    const had = this.#length;
    this.#length = 0;
    for (const order of this.#orders) order.clear();
    if (this.#changed) for (const uid of uids) this.#changed(uid);
    if (had > 0) this.#waitingChanged();
    // (Turns are kept: AdmissionQueue's sweep drains and queues again what is still wanted.)
    return all.map((entry) => entry.waiter);
  }

  /** Waiters of `uid` queued before `waiter` (all of that uid's when `waiter` is not queued). */
  aheadOf(waiter: T): number {
    const queue = this.#byUid.get(waiter.uid);
    if (!queue) return 0;
    const index = queue.findIndex((entry) => entry.waiter === waiter);
    return index === -1 ? queue.length : index;
  }

  /** The count held() or setHeld() keeps for `uid`; undefined when it holds none (or was never counted). */
  heldOf(uid: number): number | undefined {
    return this.#held.get(uid);
  }

  /** Sets `uid`'s count to any number, kept even at 0 or below (for owners whose count is not a number of slots). */
  setHeld(uid: number, count: number): void {
    this.#held.set(uid, count);
    this.#touchWaiting(uid);
    this.#changed?.(uid);
  }

  /** The least count among the uids waiting now; undefined when nobody waits. */
  leastHeldWaiting(): number | undefined {
    return this.#own.leastCount();
  }

  /** `uid` was served now: among uids tied at the fewest held, those served longer ago (or never) go before it. */
  served(uid: number): void {
    this.#servedAt.set(uid, this.#turn++);
    this.#touchWaiting(uid);
  }

  /** A slot of this origin was taken (`+1`) or given up (`-1`) by `uid`. */
  held(uid: number, delta: 1 | -1): void {
    const count = (this.#held.get(uid) ?? 0) + delta;
    if (count <= 0) this.#held.delete(uid);
    else this.#held.set(uid, count);
    this.#touchWaiting(uid);
    this.#changed?.(uid);
  }

  #waitingChanged(): void {
    for (const listener of this.#waitingListeners) listener();
  }
}

/** Whose turn a connect or handshake no client asked for (a refill) is: a party of its own. */
export const DAEMON_UID = -1;

/** The queue is swept no sooner than at this length. */
const MIN_SWEEP_AT = 64;

/** What waits for its turn at a bounded resource (the connect gate, the warm-TLS handshake queue). */
export interface Admittable extends UidWaiter {
  /** Whether an acquire waits for it now: those go first. */
  urgent: Urgent | undefined;
  /** Whether it is still needed: one that is not when its turn comes (or at a sweep) is dropped, never started. */
  wanted: (() => boolean) | undefined;
}

/** The queued entries of one `urgent` function (a pool's: FairWaitQueue.waiting), with its answer as last known. */
interface UrgentSource<T> {
  ask: Urgent;
  urgent: boolean;
  entries: Set<T>;
  /** Stops watching it; undefined for one that cannot be watched (asked at each take). */
  unwatch: (() => void) | undefined;
}

/**
 * The order of the connect gate (connect-gate.ts) and of the warm-TLS handshake queue (tls-relay.ts): those an
 * acquire waits for at that moment first, each kind fairly across uids (the uid with the fewest started and not yet
 * done; ties to the uid started from the queue least recently; arrival order within a uid); one no longer wanted
 * is handed to `drop` instead of started, at its turn or, once many are queued, at a sweep before another is queued
 * (the queue may then grow to twice what is left).
 * Whether an entry is urgent is kept per `urgent` function as it changes (a pool's says so: Urgent.watch), with each
 * uid's urgent entries in arrival order and the uids by their first one in an order of the queue (FairOrder), so a
 * take reads neither every queued entry nor every uid. A function that cannot be watched is asked at each take, once
 * for all its entries.
 */
export class AdmissionQueue<T extends Admittable> {
  /** Its `held` counts are each uid's started and not done. */
  #queue = new FairWaitQueue<T>();
  /** Each queued entry with its place in arrival order. */
  readonly #arrivals = new Map<T, Arrival<T>>();
  /** The `urgent` functions of the queued entries. */
  readonly #sources = new Map<Urgent, UrgentSource<T>>();
  /** Those that cannot be watched. */
  readonly #unwatched = new Set<UrgentSource<T>>();
  /** Per uid, its queued entries an acquire waits for now, in arrival order. */
  readonly #urgentOf = new Map<number, Array<Arrival<T>>>();
  /** The uids with urgent entries, by their first one. */
  readonly #urgentFirst = this.#queue.order({ candidate: (uid) => this.#urgentOf.get(uid)?.[0] });
  #visited = 0;
  #sweepAt = MIN_SWEEP_AT;
  #drop: (entry: T) => void;

  constructor(drop: (entry: T) => void) {
    this.#drop = drop;
  }

  get length(): number {
    return this.#queue.length;
  }

  /** Uid entries its takes have read or compared so far (FairWaitQueue.visited, and urgency sorted). */
  get visited(): number {
    return this.#queue.visited + this.#visited;
  }

  push(entry: T): void {
    if (this.#queue.length >= this.#sweepAt) this.#sweep();
    this.#enqueue(entry);
  }

  /**
   * The next to start, counted as started for its uid; undefined when none is left (those not wanted dropped), or
   * none of those left may start: `mayStart(uid, started, queued)`, given how many of the uid's are started and not
   * done, says whether one more of that uid's (`queued`, one of them) may (the others wait their turn as before).
   */
  take(mayStart?: (uid: number, started: number, queued: T) => boolean): T | undefined {
    const may = mayStart && ((queued: T) => mayStart(queued.uid, this.#queue.heldOf(queued.uid) ?? 0, queued));
    while (this.#queue.length > 0) {
      for (const source of this.#unwatched) this.#ask(source);
      // (With `mayStart`, finding the fairest that may start scans the queue.)
      const next = may
        ? (this.#queue.peekWhere((queued) => this.#isUrgent(queued) && may(queued)) ?? this.#queue.peekWhere(may))
        : (this.#urgentFirst.peek() ?? this.#queue.peek());
      if (next === undefined) return undefined;
      this.#remove(next);
      if (next.wanted?.() === false) {
        this.#drop(next);
        continue;
      }
      this.#queue.held(next.uid, +1);
      this.#queue.served(next.uid);
      return next;
    }
    return undefined;
  }

  /** One of `uid`'s started without waiting here. */
  started(uid: number): void {
    this.#queue.held(uid, +1);
  }

  /** One of `uid`'s started ones is done. */
  done(uid: number): void {
    this.#queue.held(uid, -1);
  }

  /** Every queued one, removed, in arrival order. */
  drain(): T[] {
    this.#forget();
    return this.#queue.drain();
  }

  #sweep(): void {
    this.#forget();
    // (Drained in arrival order and queued again in it: the order within each uid is kept.)
    for (const entry of this.#queue.drain()) {
      if (entry.wanted?.() === false) this.#drop(entry);
      else this.#enqueue(entry);
    }
    this.#sweepAt = Math.max(MIN_SWEEP_AT, 2 * this.#queue.length);
  }

  #enqueue(entry: T): void {
    const arrival = this.#queue.push(entry);
    this.#arrivals.set(entry, arrival);
    const ask = entry.urgent;
    if (ask === undefined) return;
    let source = this.#sources.get(ask);
    if (source === undefined) {
      this.#visited++;
      const created: UrgentSource<T> = { ask, urgent: ask() === true, entries: new Set(), unwatch: undefined };
      if (ask.watch) created.unwatch = ask.watch(() => this.#ask(created));
      else this.#unwatched.add(created);
      this.#sources.set(ask, created);
      source = created;
    }
    source.entries.add(entry);
    if (source.urgent) this.#sortUrgent(arrival, true);
  }

  #remove(entry: T): void {
    const arrival = this.#arrivals.get(entry)!;
    this.#arrivals.delete(entry);
    const source = entry.urgent === undefined ? undefined : this.#sources.get(entry.urgent);
    if (source !== undefined) {
      source.entries.delete(entry);
      if (source.urgent) this.#sortUrgent(arrival, false);
      if (source.entries.size === 0) this.#unwatch(source);
    }
    this.#queue.remove(entry);
  }

  #isUrgent(entry: T): boolean {
    return entry.urgent !== undefined && this.#sources.get(entry.urgent)?.urgent === true;
  }

  /** Asks `source` again: its entries move into or out of their uids' urgent ones when its answer changed. */
  #ask(source: UrgentSource<T>): void {
    this.#visited++;
    const urgent = source.ask() === true;
    if (urgent === source.urgent) return;
    source.urgent = urgent;
    for (const entry of source.entries) this.#sortUrgent(this.#arrivals.get(entry)!, urgent);
  }

  /** Puts `arrival` in (`urgent`) or takes it out of its uid's urgent entries, at its place in arrival order. */
  #sortUrgent(arrival: Arrival<T>, urgent: boolean): void {
    this.#visited++;
    const uid = arrival.waiter.uid;
    let list = this.#urgentOf.get(uid);
    if (list === undefined) {
      if (!urgent) return;
      list = [];
      this.#urgentOf.set(uid, list);
    }
    let low = 0;
    let high = list.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (list[middle]!.seq < arrival.seq) low = middle + 1;
      else high = middle;
    }
    if (urgent) list.splice(low, 0, arrival);
    else if (list[low] === arrival) list.splice(low, 1);
    if (list.length === 0) this.#urgentOf.delete(uid);
    this.#urgentFirst.recount(uid);
  }

  #unwatch(source: UrgentSource<T>): void {
    source.unwatch?.();
    this.#unwatched.delete(source);
    this.#sources.delete(source.ask);
  }

  /** Nothing is queued any more (a drain): no source is watched. */
  #forget(): void {
    for (const source of this.#sources.values()) source.unwatch?.();
    this.#sources.clear();
    this.#unwatched.clear();
    this.#arrivals.clear();
    this.#urgentOf.clear();
  }
}
