// The fair queues across uids (daemon/fair-queue.ts) at scale and against the walk they replaced: an origin pool's
// own queue (FairWaitQueue, with real pools, a fake connector handing out real loopback connections and fake timers
// for the acquires' timeouts) and the connect gate's (AdmissionQueue, through ConnectGate with a connector the test
// settles by hand). Covered: what a pick costs with thousands of uids waiting, counted as the uid entries the queue
// reads or compares (`visited`), never as time; and that each pick is the one the old walk over every waiting uid
// gives (a copy of it is kept below), after every step of seeded random runs. Every pool test ends with as many fds
// open as it started with.
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { defaultConfig, policyFor } from '../daemon/config.js';
import { ConnectGate } from '../daemon/connect-gate.js';
import { AdmissionQueue, type Admittable, FairWaitQueue, type UidWaiter, type Urgent } from '../daemon/fair-queue.js';
import { OriginCap } from '../daemon/origin-cap.js';
import type { Handoff, OriginPool } from '../daemon/origin-pool.js';
import * as native from '../shared/native.js';
import type { Origin } from '../shared/origin.js';
import { nextTurn, until } from './fixtures/fake-clock.js';
import { handSettledConnector } from './fixtures/fake-connector.js';
import { poolBed } from './fixtures/pool-bed.js';
import { seededRandom } from './helpers/seeded-random.js';

const HOST = 'origin.test';

/**
 * The most uid entries the queue may read or compare per event (a waiter queued, a count changed, a pick), on average
 * over a run, whatever the number of uids waiting: each uid changed is put back in place once (a walk up or down a
 * heap of the waiting uids) before a pick reads the first. A walk over every waiting uid at each pick, with 5,000
 * waiting, reads thousands per pick: quadratic over the run.
 */
const VISITS_PER_EVENT = 200;

describe('an origin pool with thousands of uids waiting', () => {
  const bed = poolBed(HOST);
  const { pools, held } = bed;
  const pool = bed.pool;

  /** An acquire of `uid` left waiting: `handoff` is set once it is served (the test then owns the fd). */
  function waiting(from: OriginPool, uid: number) {
    const state: { uid: number; from: OriginPool; handoff?: Handoff } = { uid, from };
    from.acquire(600_000, uid).then(
      (handoff) => {
        state.handoff = handoff;
        held.push(handoff);
      },
      () => {},
    );
    return state;
  }

  /**
   * Queues an acquire of each of `uids` uids (alternately in `direct` and `other`) behind a lease of uid 0 at a cap of
   * 1, then ends the lease served four times over: each end makes room for the next uid, in order of arrival (all
   * hold none). Returns the visits of the queueing and of each lease's end.
   */
  async function queueAndServe(uids: number, direct: OriginPool, other: OriginPool) {
    const visited = () => pools.reduce((sum, each) => sum + each.waitersVisited, 0);
    let lease = await direct.acquire(1_000, 0);
    held.push(lease);
    let leaseOf = { uid: 0, from: direct };
    let before = visited();
    const queued: Array<ReturnType<typeof waiting>> = [];
    for (let uid = 1; uid <= uids; uid++) queued.push(waiting(uid % 2 === 0 ? other : direct, uid));
    const queueing = visited() - before;
    const ends: number[] = [];
    for (let round = 1; round <= 4; round++) {
      before = visited();
      held.splice(held.indexOf(lease), 1);
      native.close(lease.fd);
      leaseOf.from.leaseEnded(leaseOf.uid);
      await until(() => queued.some((state) => state.handoff !== undefined), 'one more served');
      await nextTurn();
      ends.push(visited() - before);
      const served = queued.filter((state) => state.handoff !== undefined);
      expect(served.map((state) => state.uid)).toEqual([round]);
      queued.splice(queued.indexOf(served[0]!), 1);
      lease = served[0]!.handoff!;
      leaseOf = served[0]!;
    }
    return { queueing, ends };
  }

  it('chooses among its waiters without reading every waiting uid at each pick: 5,000 uids waiting in one pool', async () => {
    const uids = 5_000;
    const direct = pool(1);
    const { queueing, ends } = await queueAndServe(uids, direct, direct);
    // Each acquire's pump asks the queue whose turn it is (no socket to serve it with); each lease's end asks it a few
    // times (the connect's uid, the waiter served). The first end also places every uid in the order for a new
    // connect, which nothing asked while they queued: a cost of the queueing, paid once.
    expect(queueing + ends.reduce((sum, end) => sum + end, 0)).toBeLessThanOrEqual(VISITS_PER_EVENT * (uids + 4));
    for (const end of ends.slice(1)) expect(end).toBeLessThanOrEqual(VISITS_PER_EVENT);
    expect(direct.waitingCount).toBe(uids - 4);
  });

  it("chooses among its waiters by what each uid holds of the whole origin without reading every waiting uid at each pick: 5,000 uids waiting in two pools sharing the origin's cap", async () => {
    const uids = 5_000;
    const cap = new OriginCap();
    const direct = pool(1, cap);
    const corp = pool(1, cap, 'corp');
    const { queueing, ends } = await queueAndServe(uids, direct, corp);
    expect(queueing + ends.reduce((sum, end) => sum + end, 0)).toBeLessThanOrEqual(VISITS_PER_EVENT * (uids + 4));
    for (const end of ends.slice(1)) expect(end).toBeLessThanOrEqual(VISITS_PER_EVENT);
    expect(cap.waitingCount()).toBe(uids - 4);
  });

  it("gives an idle socket to the waiter whose uid holds the fewest of the whole origin when a uid's holding changed in another of the origin's pools", async () => {
    const cap = new OriginCap();
    const direct = pool(5, cap);
    const corp = pool(5, cap, 'corp');
    held.push(await corp.acquire(1_000, 1));
    const corpLease = await corp.acquire(1_000, 5);
    const directLease = await direct.acquire(1_000, 9);
    // Two acquires wait in the direct pool, each covered by a connect under way (none waits for room at the cap).
    bed.connector.manual = true;
    const first = waiting(direct, 1);
    const second = waiting(direct, 2);
    await nextTurn();
    expect(bed.connector.pending).toHaveLength(2);
    // uid 2 takes a socket of the corp pool: it holds as many of the origin as uid 1 (a lease and a connect each).
    corp.giveBack(corpLease, 5, false);
    const warm = corp.takeWarm(2)!;
    held.push(warm);
    expect([cap.heldBy(1), cap.heldBy(2)]).toEqual([2, 2]);
    // A socket comes back idle in the direct pool: the tie goes to the longest waiting, uid 1 (uid 2 held fewer
    // when the direct pool last placed it).
    direct.giveBack(directLease, 9, false);
    await nextTurn();
    expect([first.handoff !== undefined, second.handoff !== undefined]).toEqual([true, false]);
    bed.connector.manual = false;
    for (const pending of bed.connector.pending.splice(0)) await pending.succeed();
    await until(() => second.handoff !== undefined, 'the second acquire served');
  });

  it('tells none of its orders of the waiting uids of a warm handoff or its release while nobody waits: the warm path pays for no order', async () => {
    // Every pool has its origin's cap (the pool manager gives each one), so its queue keeps three orders; a uid that
    // waits for nothing is in none of them, and a change of its count has nothing to put back in place.
    const direct = pool(8, new OriginCap());
    const first = await direct.acquire(1_000, 7);
    direct.giveBack(first, 7, false);
    const before = direct.waitersVisited;
    for (let round = 0; round < 100; round++) {
      const warm = direct.takeWarm(7)!;
      expect(warm.warm).toBe(true);
      direct.giveBack(warm, 7, false, warm.mark);
    }
    expect(direct.waitersVisited - before).toBe(0);
    expect(direct.idleCount).toBe(1);
  });

  it('gives an idle socket by what each uid holds of the origin in its pools left when one of them closes', async () => {
    const cap = new OriginCap();
    const direct = pool(8, cap);
    const corp = pool(8, cap, 'corp');
    const lab = pool(8, cap, 'lab');
    held.push(await lab.acquire(1_000, 1), await lab.acquire(1_000, 1), await corp.acquire(1_000, 2));
    const directLease = await direct.acquire(1_000, 9);
    bed.connector.manual = true;
    const first = waiting(direct, 1);
    const second = waiting(direct, 2);
    await nextTurn();
    expect(bed.connector.pending).toHaveLength(2);
    // uid 1 holds three of the origin (two through lab, a connect), uid 2 two; lab closes: uid 1 holds one.
    lab.close();
    expect([cap.heldBy(1), cap.heldBy(2)]).toEqual([1, 2]);
    direct.giveBack(directLease, 9, false);
    await nextTurn();
    expect([first.handoff !== undefined, second.handoff !== undefined]).toEqual([true, false]);
    bed.connector.manual = false;
    for (const pending of bed.connector.pending.splice(0)) await pending.succeed();
    await until(() => second.handoff !== undefined, 'the second acquire served');
  });
});

describe('the connect gate with thousands of uids queued', () => {
  it('chooses the next connect without reading every queued uid at each turn: 5,000 uids, half of them urgent, 1,000 turns', async () => {
    const uids = 5_000;
    const turns = 1_000;
    const { connector, started, finish } = handSettledConnector(400);
    const gate = new ConnectGate(connector, () => 1);
    const origin: Origin = { host: HOST, port: 443 };
    const policy = policyFor(defaultConfig(), HOST, 443);
    // An acquire waits for the odd uids' connects (refills and prewarms for the even ones'), told by one function.
    const acquireWaits = () => true;
    const results = [gate.connect(origin, policy, undefined, undefined, 0)];
    const before = gate.visited;
    for (let uid = 1; uid <= uids; uid++) {
      results.push(gate.connect(origin, policy, uid % 2 === 1 ? acquireWaits : undefined, undefined, uid));
    }
    await nextTurn();
    expect(gate.queued).toBe(uids);
    // Each connect that finishes starts the next: the urgent ones first, in arrival order (every uid holds none).
    for (let index = 0; index < turns; index++) {
      finish[index]!();
      await nextTurn();
    }
    expect(started).toEqual([0, ...Array.from({ length: turns }, (_, index) => 2 * index + 1)]);
    expect(gate.visited - before).toBeLessThanOrEqual(VISITS_PER_EVENT * (uids + turns));
    // (The connects left queued or in flight are never settled: nothing of theirs is open.)
    expect(results).toHaveLength(uids + 1);
  });

  it("chooses the next connect without asking every queued connect's pool whether an acquire waits there at each turn: 5,000 pools, 1,000 turns", async () => {
    const uids = 5_000;
    const turns = 1_000;
    const { connector, started, finish } = handSettledConnector(400);
    const gate = new ConnectGate(connector, () => 1);
    const origin: Origin = { host: HOST, port: 443 };
    const policy = policyFor(defaultConfig(), HOST, 443);
    // Each uid's connect is its own pool's (OriginPool passes its waiters' `waiting`); an acquire waits in the odd
    // uids' pools.
    const waits = Array.from({ length: uids + 1 }, () => new FairWaitQueue<{ uid: number }>());
    const acquires = waits.map((queue, uid) => {
      const acquire = { uid };
      if (uid % 2 === 1) queue.push(acquire);
      return acquire;
    });
    const results = [gate.connect(origin, policy, undefined, undefined, 0)];
    const before = gate.visited;
    for (let uid = 1; uid <= uids; uid++) {
      results.push(gate.connect(origin, policy, waits[uid]!.waiting, undefined, uid));
    }
    await nextTurn();
    expect(gate.queued).toBe(uids);
    // The acquires of the first 500 odd uids give up: their connects are no longer urgent.
    for (let uid = 1; uid < 1_000; uid += 2) waits[uid]!.remove(acquires[uid]!);
    for (let index = 0; index < turns; index++) {
      finish[index]!();
      await nextTurn();
    }
    expect(gate.visited - before).toBeLessThanOrEqual(VISITS_PER_EVENT * (uids + turns));
    expect(started).toEqual([0, ...Array.from({ length: turns }, (_, index) => 1_001 + 2 * index)]);
    expect(results).toHaveLength(uids + 1);
  });
});

// The walk each pick made before the orders were kept as they change (daemon/fair-queue.ts as it was), kept here as
// the rule the queues must still follow: what the seeded runs below compare every pick with.
interface OldEntry<T> {
  waiter: T;
  seq: number;
}

class OldFairWaitQueue<T extends UidWaiter> {
  #byUid = new Map<number, Array<OldEntry<T>>>();
  #seq = 0;
  #length = 0;
  #held = new Map<number, number>();
  #servedAt = new Map<number, number>();
  #turn = 0;

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
  }

  peek(): T | undefined {
    return this.#fairest((queue) => queue[0]);
  }

  peekWhere(matches: (waiter: T) => boolean): T | undefined {
    return this.#fairest((queue) => queue.find((entry) => matches(entry.waiter)));
  }

  peekUncovered(covered: (uid: number) => number): T | undefined {
    return this.#fairest((queue, uid) => queue[covered(uid)], covered);
  }

  peekCounting(extra: (uid: number) => number): T | undefined {
    return this.#fairest((queue) => queue[0], extra);
  }

  #fairest(
    candidate: (queue: Array<OldEntry<T>>, uid: number) => OldEntry<T> | undefined,
    extra?: (uid: number) => number,
  ): T | undefined {
    let best: OldEntry<T> | undefined;
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

  peekFor(uid: number | undefined): T | undefined {
    const next = this.peek();
    const own = uid === undefined ? undefined : this.#byUid.get(uid)?.[0]?.waiter;
    if (!next || !own) return next;
    return (this.#held.get(uid!) ?? 0) <= (this.#held.get(next.uid) ?? 0) ? own : next;
  }

  shift(): T | undefined {
    const waiter = this.peek();
    if (waiter) this.remove(waiter);
    return waiter;
  }

  shiftOf(uid: number): T | undefined {
    const head = this.#byUid.get(uid)?.[0];
    if (!head) return undefined;
    this.remove(head.waiter);
    return head.waiter;
  }

  remove(waiter: T): boolean {
    const queue = this.#byUid.get(waiter.uid);
    if (!queue) return false;
    const index = queue.findIndex((entry) => entry.waiter === waiter);
    if (index === -1) return false;
    queue.splice(index, 1);
    if (queue.length === 0) this.#byUid.delete(waiter.uid);
    this.#length--;
    if (this.#length === 0) this.#servedAt.clear();
    return true;
  }

  drain(): T[] {
    const all = [...this.#byUid.values()].flat().sort((a, b) => a.seq - b.seq);
    this.#byUid.clear();
    this.#length = 0;
    return all.map((entry) => entry.waiter);
  }

  heldOf(uid: number): number | undefined {
    return this.#held.get(uid);
  }

  setHeld(uid: number, count: number): void {
    this.#held.set(uid, count);
  }

  leastHeldWaiting(): number | undefined {
    let least: number | undefined;
    for (const uid of this.#byUid.keys()) {
      const held = this.#held.get(uid) ?? 0;
      if (least === undefined || held < least) least = held;
    }
    return least;
  }

  served(uid: number): void {
    this.#servedAt.set(uid, this.#turn++);
  }

  held(uid: number, delta: 1 | -1): void {
    const count = (this.#held.get(uid) ?? 0) + delta;
    if (count <= 0) this.#held.delete(uid);
    else this.#held.set(uid, count);
  }
}

class OldAdmissionQueue<T extends Admittable> {
  #queue = new OldFairWaitQueue<T>();
  #sweepAt = 64;
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

  take(mayStart?: (uid: number, started: number, queued: T) => boolean): T | undefined {
    const may = mayStart && ((queued: T) => mayStart(queued.uid, this.#queue.heldOf(queued.uid) ?? 0, queued));
    while (this.#queue.length > 0) {
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

  started(uid: number): void {
    this.#queue.held(uid, +1);
  }

  done(uid: number): void {
    this.#queue.held(uid, -1);
  }

  drain(): T[] {
    return this.#queue.drain();
  }

  #sweep(): void {
    for (const entry of this.#queue.drain()) {
      if (entry.wanted?.() === false) this.#drop(entry);
      else this.#queue.push(entry);
    }
    this.#sweepAt = Math.max(64, 2 * this.#queue.length);
  }
}

describe('FairWaitQueue picks', () => {
  it('picks as the walk over every waiting uid did after each step of a long seeded run: pushes, removes, shifts, counts, turns, connects covering waiters, holdings elsewhere, drains', () => {
    const next = seededRandom(35);
    const below = (bound: number) => Math.floor(next() * bound);
    type W = { uid: number; id: number };
    const queue = new FairWaitQueue<W>();
    const old = new OldFairWaitQueue<W>();
    // What the owner adds: connects under way covering each uid's first waiters, what each holds elsewhere.
    const covered = new Map<number, number>();
    const elsewhere = new Map<number, number>();
    const coveredOf = (uid: number) => covered.get(uid) ?? 0;
    const elsewhereOf = (uid: number) => elsewhere.get(uid) ?? 0;
    const uncovered = queue.order({ extra: coveredOf, candidate: (uid, waiting) => waiting[coveredOf(uid)] });
    const counting = queue.order({ extra: elsewhereOf });
    let queued: W[] = [];
    let id = 0;
    let sawPicks = 0;
    for (let step = 0; step < 4_000; step++) {
      // One to four changes between the picks compared, so that changes pile up between picks too.
      for (let change = 1 + below(4); change > 0; change--) {
        const uid = 1 + below(12);
        const roll = next();
        if (roll < 0.3) {
          const waiter = { uid, id: id++ };
          queue.push(waiter);
          old.push(waiter);
          queued.push(waiter);
        } else if (roll < 0.38 && queued.length > 0) {
          const waiter = queued[below(queued.length)]!;
          expect(queue.remove(waiter)).toBe(old.remove(waiter));
          queued = queued.filter((each) => each !== waiter);
        } else if (roll < 0.44) {
          const shifted = queue.shift();
          expect(shifted).toBe(old.shift());
          queued = queued.filter((each) => each !== shifted);
        } else if (roll < 0.48) {
          const shifted = queue.shiftOf(uid);
          expect(shifted).toBe(old.shiftOf(uid));
          queued = queued.filter((each) => each !== shifted);
        } else if (roll < 0.6) {
          const delta = next() < 0.5 ? 1 : -1;
          queue.held(uid, delta);
          old.held(uid, delta);
        } else if (roll < 0.63) {
          const count = below(6) - 2;
          queue.setHeld(uid, count);
          old.setHeld(uid, count);
        } else if (roll < 0.72) {
          queue.served(uid);
          old.served(uid);
        } else if (roll < 0.82) {
          covered.set(uid, below(4));
          uncovered.recount(uid);
        } else if (roll < 0.92) {
          elsewhere.set(uid, below(5));
          counting.recount(uid);
        } else if (roll < 0.94) {
          // Every holding elsewhere changed at once (a pool of the origin closed).
          for (const each of elsewhere.keys()) elsewhere.set(each, below(5));
          counting.recountAll();
        } else if (roll < 0.945) {
          expect(queue.drain()).toEqual(old.drain());
          queued = [];
        }
      }
      const uid = 1 + below(12);
      expect({
        step,
        length: queue.length,
        peek: queue.peek(),
        peekFor: queue.peekFor(uid),
        uncovered: uncovered.peek(),
        counting: counting.peek(),
        least: queue.leastHeldWaiting(),
      }).toEqual({
        step,
        length: old.length,
        peek: old.peek(),
        peekFor: old.peekFor(uid),
        uncovered: old.peekUncovered(coveredOf),
        counting: old.peekCounting(elsewhereOf),
        least: old.leastHeldWaiting(),
      });
      if (queue.length > 3) sawPicks++;
    }
    // The run kept several uids waiting for much of it (not only empty answers compared).
    expect(sawPicks).toBeGreaterThan(1_000);
  });

  it('picks as the walk did when its orders go unasked for long stretches: each order asked now and then, waiters matched, whether anyone waits watched and unwatched, orders placed anew while unasked', () => {
    // The pool asks its orders at different moments: its own at each pump, the one for a new connect only when it
    // starts one, the one by the whole origin only while the origin has other pools (then not at all, for as long
    // as it has none). Changes pile up unasked in each meanwhile, uids leave and come back, and an order told that
    // every uid changed (recountAll) may see all its uids gone before it is asked again.
    const next = seededRandom(351);
    const below = (bound: number) => Math.floor(next() * bound);
    type W = { uid: number; id: number };
    const queue = new FairWaitQueue<W>();
    const old = new OldFairWaitQueue<W>();
    const covered = new Map<number, number>();
    const elsewhere = new Map<number, number>();
    const coveredOf = (uid: number) => covered.get(uid) ?? 0;
    const elsewhereOf = (uid: number) => elsewhere.get(uid) ?? 0;
    const uncovered = queue.order({ extra: coveredOf, candidate: (uid, waiting) => waiting[coveredOf(uid)] });
    const counting = queue.order({ extra: elsewhereOf });
    // A watcher of whether anyone waits (a connect queued at the gate): what it last heard.
    let heard: boolean | undefined;
    let unwatch: (() => void) | undefined;
    const watch = () => {
      heard = queue.waiting();
      unwatch = queue.waiting.watch!(() => {
        heard = queue.waiting();
      });
    };
    watch();
    let queued: W[] = [];
    let id = 0;
    const asked = { peek: 0, uncovered: 0, counting: 0, where: 0 };
    let crowded = 0;
    for (let step = 0; step < 6_000; step++) {
      for (let change = 1 + below(6); change > 0; change--) {
        const uid = 1 + below(16);
        const roll = next();
        if (roll < 0.3) {
          const waiter = { uid, id: id++ };
          queue.push(waiter);
          old.push(waiter);
          queued.push(waiter);
        } else if (roll < 0.42 && queued.length > 0) {
          // A waiter anywhere in its uid's queue gives up (a cancel, a deadline, a client gone).
          const waiter = queued[below(queued.length)]!;
          expect(queue.remove(waiter)).toBe(old.remove(waiter));
          queued = queued.filter((each) => each !== waiter);
        } else if (roll < 0.47) {
          const shifted = queue.shiftOf(uid);
          expect(shifted).toBe(old.shiftOf(uid));
          queued = queued.filter((each) => each !== shifted);
        } else if (roll < 0.6) {
          const delta = next() < 0.5 ? 1 : -1;
          queue.held(uid, delta);
          old.held(uid, delta);
        } else if (roll < 0.67) {
          queue.served(uid);
          old.served(uid);
        } else if (roll < 0.77) {
          covered.set(uid, below(3));
          uncovered.recount(uid);
        } else if (roll < 0.87) {
          // A holding in another pool of the origin, of a uid waiting here or not.
          elsewhere.set(uid, below(5));
          counting.recount(uid);
        } else if (roll < 0.9) {
          for (const each of elsewhere.keys()) elsewhere.set(each, below(5));
          counting.recountAll();
        } else if (roll < 0.91) {
          unwatch?.();
          unwatch = undefined;
          if (next() < 0.5) watch();
        } else if (roll < 0.912) {
          expect(queue.drain()).toEqual(old.drain());
          queued = [];
        }
      }
      if (unwatch !== undefined) expect({ step, heard }).toEqual({ step, heard: old.length > 0 });
      expect({ step, length: queue.length }).toEqual({ step, length: old.length });
      if (queue.length > 5) crowded++;
      if (next() < 0.3) {
        expect({ step, peek: queue.peek() }).toEqual({ step, peek: old.peek() });
        asked.peek++;
      }
      if (next() < 0.15) {
        expect({ step, uncovered: uncovered.peek() }).toEqual({ step, uncovered: old.peekUncovered(coveredOf) });
        asked.uncovered++;
      }
      if (next() < 0.1) {
        expect({ step, counting: counting.peek() }).toEqual({ step, counting: old.peekCounting(elsewhereOf) });
        asked.counting++;
      }
      if (next() < 0.1) {
        const odd = (waiter: W) => waiter.id % 2 === 1;
        expect({ step, where: queue.peekWhere(odd) }).toEqual({ step, where: old.peekWhere(odd) });
        asked.where++;
      }
    }
    // Each order asked hundreds of times, mostly with several uids waiting.
    expect(Math.min(asked.peek, asked.uncovered, asked.counting, asked.where)).toBeGreaterThan(300);
    expect(crowded).toBeGreaterThan(3_000);
  });

  it("lets go of the waiters that left once the uids were to be placed anew in an order nobody asked again (the origin's other pool retired)", async () => {
    // An order told that every uid's part changed (recountAll: OriginCap.leave, a pool of the origin retired) is
    // built anew at its next pick; a pool whose origin is then reached one way only never asks its order by the
    // whole origin again, so what that order held kept every waiter of the time alive, long after they left.
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    type W = { uid: number; body: Uint8Array };
    const queue = new FairWaitQueue<W>();
    const wholeOrigin = queue.order({ extra: () => 0 });
    // (In a function of its own: a suspended async test keeps its own last values alive.)
    const queueAndLeave = (): Array<WeakRef<W>> => {
      const refs: Array<WeakRef<W>> = [];
      for (let uid = 1; uid <= 100; uid++) {
        const waiter = { uid, body: new Uint8Array(1024) };
        refs.push(new WeakRef(waiter));
        queue.push(waiter);
      }
      expect(wholeOrigin.peek()?.uid).toBe(1);
      wholeOrigin.recountAll();
      while (queue.length > 0) queue.shift();
      return refs;
    };
    const refs = queueAndLeave();
    // (A WeakRef holds its target until the job that made it ends.)
    await new Promise((resolve) => setImmediate(resolve));
    gc();
    expect(refs.flatMap((ref, i) => (ref.deref() !== undefined ? [i] : []))).toEqual([]);
  });
});

describe('AdmissionQueue takes', () => {
  it('takes as the walk over every queued entry did after each step of a long seeded run: urgency watched and asked, changing, entries no longer wanted, mayStart, sweeps, drains', () => {
    const next = seededRandom(36);
    const below = (bound: number) => Math.floor(next() * bound);
    type E = Admittable & { id: number; want: boolean };
    // Pools whose acquires come and go (their `waiting` is watched), and plain functions asked at each take.
    const pools = Array.from({ length: 4 }, () => new FairWaitQueue<{ uid: number }>());
    const acquires: Array<Array<{ uid: number }>> = pools.map(() => []);
    const plain = [false, true];
    const plainUrgent = plain.map((_, index) => () => plain[index]!);
    const sources: Array<Urgent | undefined> = [undefined, ...pools.map((each) => each.waiting), ...plainUrgent];
    const dropped: number[] = [];
    const oldDropped: number[] = [];
    const queue = new AdmissionQueue<E>((entry) => dropped.push(entry.id));
    const old = new OldAdmissionQueue<E>((entry) => oldDropped.push(entry.id));
    // Whether one more of a uid's may start: a bound per uid and entries some of which never may, as tls-relay's.
    const mayStart = (uid: number, started: number, entry: E) => started < 1 + (uid % 3) && entry.id % 7 !== 0;
    const entries: E[] = [];
    let maxLength = 0;
    let id = 0;
    let sawTakes = 0;
    for (let step = 0; step < 6_000; step++) {
      const roll = next();
      // Long stretches of pushes now and then, so that the queue passes its sweep length.
      const pushing = Math.floor(step / 500) % 3 === 1 ? 0.6 : 0.35;
      if (roll < pushing) {
        const entry: E = {
          uid: below(10) - 1,
          urgent: sources[below(sources.length)],
          wanted: next() < 0.4 ? undefined : () => entry.want,
          want: true,
          id: id++,
        };
        entries.push(entry);
        queue.push(entry);
        old.push(entry);
      } else if (roll < pushing + 0.1) {
        const pool = below(pools.length);
        if (next() < 0.5 || acquires[pool]!.length === 0) {
          const acquire = { uid: 1 };
          acquires[pool]!.push(acquire);
          pools[pool]!.push(acquire);
        } else {
          pools[pool]!.remove(acquires[pool]!.shift()!);
        }
      } else if (roll < pushing + 0.13) {
        const index = below(plain.length);
        plain[index] = !plain[index];
      } else if (roll < pushing + 0.2) {
        // An entry stops being wanted (its acquire gave up): dropped at its turn or at a sweep.
        const entry = entries[entries.length - 1 - below(Math.min(entries.length, 30))];
        if (entry !== undefined) entry.want = false;
      } else if (roll < pushing + 0.24) {
        const uid = below(10) - 1;
        if (next() < 0.5) {
          queue.started(uid);
          old.started(uid);
        } else {
          queue.done(uid);
          old.done(uid);
        }
      } else if (roll < 0.995) {
        const withMay = next() < 0.3;
        const taken = withMay ? queue.take(mayStart) : queue.take();
        const oldTaken = withMay ? old.take(mayStart) : old.take();
        expect({ step, taken: taken?.id }).toEqual({ step, taken: oldTaken?.id });
        if (taken !== undefined) sawTakes++;
        if (taken !== undefined && next() < 0.6) {
          queue.done(taken.uid);
          old.done(taken.uid);
        }
      } else {
        expect(queue.drain().map((entry) => entry.id)).toEqual(old.drain().map((entry) => entry.id));
      }
      expect({ step, length: queue.length, dropped }).toEqual({ step, length: old.length, dropped: oldDropped });
      maxLength = Math.max(maxLength, queue.length);
    }
    // Many takes compared, entries dropped at their turns and at sweeps (past the first sweep length, 64).
    expect(sawTakes).toBeGreaterThan(1_000);
    expect(dropped.length).toBeGreaterThan(30);
    expect(maxLength).toBeGreaterThan(128);
  });
});
