// The acquires waiting for a slot of one origin, fair across uids: when a slot frees, it goes to the waiting uid
// that holds the fewest of the origin's slots (ties: see `served` below, then the longest waiting), and within a uid
// in arrival order. So while other uids wait, no uid's share of maxPerOrigin grows past theirs; with nobody else
// waiting, one uid may use every slot. Owners also say which uid they served (`served`: the pool, the connect gate): ties then go to the
// uid served least recently, so uids tied at the fewest take turns (a uid whose lease or connect just ended, holding
// as few as the others again, does not win the tie with its older waiters).

export interface UidWaiter {
  uid: number;
}

interface Entry<T> {
  waiter: T;
  seq: number;
}

export class FairWaitQueue<T extends UidWaiter> {
  /** Per uid, its waiters in arrival order; each entry remembers its arrival number. */
  #byUid = new Map<number, Array<Entry<T>>>();
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
  readonly #changed: ((uid: number) => void) | undefined;

  /**
   * `changed`: told of each uid whose waiters or count changed, as it changes (the origin's cap keeps its order of
   * the uids waiting in all the origin's pools by them: origin-cap.ts).
   */
  constructor(changed?: (uid: number) => void) {
    this.#changed = changed;
  }

  get length(): number {
    return this.#length;
  }

  push(waiter: T): void {
    let queue = this.#byUid.get(waiter.uid);
    if (!queue) {
      queue = [];
      this.#byUid.set(waiter.uid, queue);
    }
    queue.push({ waiter, seq: this.#seq++ });
    this.#length++;
    this.#changed?.(waiter.uid);
  }

  /** The waiter the next free slot goes to (not removed). */
  peek(): T | undefined {
    return this.#fairest((queue) => queue[0]);
  }

  /** As peek(), among the waiters for which `matches` is true (each uid's first such one); scans every waiter. */
  peekWhere(matches: (waiter: T) => boolean): T | undefined {
    return this.#fairest((queue) => queue.find((entry) => matches(entry.waiter)));
  }

  /**
   * The waiter the next free slot goes to among those `covered` does not count out: a uid's first `covered(uid)`
   * waiters (those that slots already on their way will serve) are skipped, and those slots count as held. (The
   * pool: whose turn a new connect for waiters is, when connects already under way cover some of them.)
   */
  peekUncovered(covered: (uid: number) => number): T | undefined {
    return this.#fairest((queue, uid) => queue[covered(uid)], covered);
  }

  /**
   * As peek(), with `extra(uid)` added to each uid's count (the pool: what each uid holds of the origin's other pools,
   * whose cap this one shares: origin-cap.ts).
   */
  peekCounting(extra: (uid: number) => number): T | undefined {
    return this.#fairest((queue) => queue[0], extra);
  }

  /**
   * Each uid's first waiter that `covered` does not count out, as peekUncovered skips them (the origin's cap, when
   * it orders the waiting uids of all the origin's pools anew: origin-cap.ts).
   */
  forEachUncovered(covered: (uid: number) => number, visit: (waiter: T) => void): void {
    for (const [uid, queue] of this.#byUid) {
      const entry = queue[covered(uid)];
      if (entry) visit(entry.waiter);
    }
  }

  /**
   * Of each uid's candidate (`candidate` of its queue), the one whose uid holds the fewest (plus `extra(uid)`),
   * ties to the longest waiting.
   */
  #fairest(
    candidate: (queue: Array<Entry<T>>, uid: number) => Entry<T> | undefined,
    extra?: (uid: number) => number,
  ): T | undefined {
    let best: Entry<T> | undefined;
    let bestHeld = 0;
    let bestServedAt = -1;
    for (const [uid, queue] of this.#byUid) {
      const entry = candidate(queue, uid);
      if (!entry) continue;
      const held = (this.#held.get(uid) ?? 0) + (extra ? extra(uid) : 0);
      const servedAt = this.#servedAt.get(uid) ?? -1;
      const before =
        !best ||
        held < bestHeld ||
        (held === bestHeld && (servedAt < bestServedAt || (servedAt === bestServedAt && entry.seq < best.seq)));
      if (before) {
        best = entry;
        bestHeld = held;
        bestServedAt = servedAt;
      }
    }
    return best?.waiter;
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
    this.#changed?.(waiter.uid);
    // Turns matter only among waiters: those of a queue that emptied are forgotten (a bound on the map, too).
    if (this.#length === 0) this.#servedAt.clear();
    return true;
  }

  /** Every waiter, removed (the pool is closing). */
  drain(): T[] {
    const all = [...this.#byUid.values()].flat().sort((a, b) => a.seq - b.seq);
    const uids = [...this.#byUid.keys()];
    this.#byUid.clear();
    this.#length = 0;
    if (this.#changed) for (const uid of uids) this.#changed(uid);
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
    this.#changed?.(uid);
  }

  /** The least count among the uids waiting now; undefined when nobody waits. */
  leastHeldWaiting(): number | undefined {
    let least: number | undefined;
    for (const uid of this.#byUid.keys()) {
      const held = this.#held.get(uid) ?? 0;
      if (least === undefined || held < least) least = held;
    }
    return least;
  }

  /** `uid` was served now: among uids tied at the fewest held, those served longer ago (or never) go before it. */
  served(uid: number): void {
    this.#servedAt.set(uid, this.#turn++);
  }

  /** A slot of this origin was taken (`+1`) or given up (`-1`) by `uid`. */
  held(uid: number, delta: 1 | -1): void {
    const count = (this.#held.get(uid) ?? 0) + delta;
    if (count <= 0) this.#held.delete(uid);
    else this.#held.set(uid, count);
    this.#changed?.(uid);
  }
}

/** Whose turn a connect or handshake no client asked for (a refill) is: a party of its own. */
export const DAEMON_UID = -1;

/** The queue is swept no sooner than at this length. */
const MIN_SWEEP_AT = 64;

/** What waits for its turn at a bounded resource (the connect gate, the warm-TLS handshake queue). */
export interface Admittable extends UidWaiter {
  /** Whether an acquire waits for it now: those go first. */
  urgent: (() => boolean) | undefined;
  /** Whether it is still needed: one that is not when its turn comes (or at a sweep) is dropped, never started. */
  wanted: (() => boolean) | undefined;
}

/**
 * The order of the connect gate (connect-gate.ts) and of the warm-TLS handshake queue (tls-relay.ts): those an
 * acquire waits for at that moment first, each kind fairly across uids (the uid with the fewest started and not yet
 * done; ties to the uid started from the queue least recently; arrival order within a uid); one no longer wanted
 * is handed to `drop` instead of started, at its turn or, once many are queued, at a sweep before another is queued
 * (the queue may then grow to twice what is left).
 */
export class AdmissionQueue<T extends Admittable> {
  /** Its `held` counts are each uid's started and not done. */
  #queue = new FairWaitQueue<T>();
  #sweepAt = MIN_SWEEP_AT;
  #drop: (entry: T) => void;

  constructor(drop: (entry: T) => void) {
    this.#drop = drop;
  }

  get length(): number {
    return this.#queue.length;
  }

  push(entry: T): void {
    if (this.#queue.length >= this.#sweepAt) this.#sweep();
    this.#queue.push(entry);
  }

  /**
   * The next to start, counted as started for its uid; undefined when none is left (those not wanted dropped), or
   * none of those left may start: `mayStart(uid, started, queued)`, given how many of the uid's are started and not
   * done, says whether one more of that uid's (`queued`, one of them) may (the others wait their turn as before).
   */
  take(mayStart?: (uid: number, started: number, queued: T) => boolean): T | undefined {
    const may = mayStart && ((queued: T) => mayStart(queued.uid, this.#queue.heldOf(queued.uid) ?? 0, queued));
    while (this.#queue.length > 0) {
      // (Finding an urgent one scans the queue.)
      const next = may
        ? (this.#queue.peekWhere((queued) => queued.urgent?.() === true && may(queued)) ?? this.#queue.peekWhere(may))
        : (this.#queue.peekWhere((queued) => queued.urgent?.() === true) ?? this.#queue.peek());
      if (next === undefined) return undefined;
      this.#queue.remove(next);
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
    return this.#queue.drain();
  }

  #sweep(): void {
    // (Drained in arrival order and queued again in it: the order within each uid is kept.)
    for (const entry of this.#queue.drain()) {
      if (entry.wanted?.() === false) this.#drop(entry);
      else this.#queue.push(entry);
    }
    this.#sweepAt = Math.max(MIN_SWEEP_AT, 2 * this.#queue.length);
  }
}
