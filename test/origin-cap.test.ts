// OriginCap in-process (daemon/origin-cap.ts) with real pools: an origin reached several ways (directly and through
// proxies), its pools sharing one maxPerOrigin, a fake connector handing out real loopback connections, fake timers
// for the acquires' timeouts. Covered: what turn() costs with thousands of uids waiting at the origin, counted as
// the uid entries it reads or compares (OriginCap.visited), never as time; and that its answer is the one a walk
// over every waiting uid of every pool gives, through acquires, lease ends, give-backs, connects that succeed and
// fail, cancels and timeouts. Every test ends with as many fds open as it started with.
import { describe, expect, it, vi } from 'vitest';
import { OriginCap } from '../daemon/origin-cap.js';
import type { Handoff, OriginPool } from '../daemon/origin-pool.js';
import * as native from '../shared/native.js';
import { nextTurn, until } from './fixtures/fake-clock.js';
import { poolBed } from './fixtures/pool-bed.js';
import { seededRandom } from './helpers/seeded-random.js';

const HOST = 'origin.test';

const bed = poolBed(HOST);
const { held } = bed;

/** The pool of the origin through `proxy` (directly without one), sharing `cap`. */
function pool(cap: OriginCap, maxPerOrigin: number, proxy?: string): OriginPool {
  return bed.pool(maxPerOrigin, cap, proxy);
}

/** An acquire of `uid` left waiting: `served` gets its handoff (the test then owns the fd), a rejection is kept. */
function waiting(from: OriginPool, uid: number, timeoutMs = 600_000, signal?: AbortSignal) {
  const state: { uid: number; from: OriginPool; handoff?: Handoff; error?: unknown } = { uid, from };
  from.acquire(timeoutMs, uid, signal).then(
    (handoff) => {
      state.handoff = handoff;
      held.push(handoff);
    },
    (error: unknown) => {
      state.error = error;
    },
  );
  return state;
}

/** Ends a held lease as curl closing its connection does. */
function endLease(from: OriginPool, handoff: Handoff, uid: number): void {
  held.splice(held.indexOf(handoff), 1);
  native.close(handoff.fd);
  from.leaseEnded(uid);
}

/** Counts the calls of the cap's turn() (its own from mayTake and its wake, and the pools'). */
function countTurns(cap: OriginCap): { calls: number } {
  const counted = { calls: 0 };
  const turn = cap.turn.bind(cap);
  cap.turn = () => {
    counted.calls++;
    return turn();
  };
  return counted;
}

/**
 * The most uid entries one turn() may read or compare, whatever the number of uids waiting: a few per pool for the
 * uids whose counts or waiters changed since the last turn, and a walk down an ordered structure of the waiting
 * uids (reading every waiting uid of every pool, with 5,000 waiting, is thousands).
 */
const VISITS_PER_TURN = 200;

describe('OriginCap with thousands of uids waiting', () => {
  it("decides whose turn room at the origin's cap is without reading every waiting uid at each turn: 5,000 uids waiting in two pools", async () => {
    const uids = 5_000;
    const cap = new OriginCap();
    const direct = pool(cap, 1);
    const corp = pool(cap, 1, 'corp');
    const turns = countTurns(cap);
    let lease = await direct.acquire(1_000, 0);
    held.push(lease);
    let leaseOf = { uid: 0, from: direct };

    let visited = cap.visited;
    turns.calls = 0;
    const queued: Array<ReturnType<typeof waiting>> = [];
    for (let uid = 1; uid <= uids; uid++) queued.push(waiting(uid % 2 === 0 ? corp : direct, uid));
    expect(cap.waitingCount()).toBe(uids);
    expect(bed.connector.calls).toBe(1);
    // Each acquire asked whose turn it is (the origin being at its cap).
    expect(turns.calls).toBeGreaterThanOrEqual(uids);
    expect(cap.visited - visited).toBeLessThanOrEqual(VISITS_PER_TURN * turns.calls);

    visited = cap.visited;
    expect(cap.turn()).toEqual({ pool: direct, uid: 1 });
    expect(cap.visited - visited).toBeLessThanOrEqual(VISITS_PER_TURN);

    // Each lease that ends makes room for one more: the oldest waiting uid's, every one holding none, in either pool.
    for (let round = 1; round <= 4; round++) {
      visited = cap.visited;
      turns.calls = 0;
      endLease(leaseOf.from, lease, leaseOf.uid);
      await until(() => queued.some((state) => state.handoff !== undefined && state.uid === round), 'one more served');
      await nextTurn();
      expect(queued.filter((state) => state.handoff !== undefined).map((state) => state.uid)).toEqual([round]);
      expect(turns.calls).toBeGreaterThan(0);
      expect(cap.visited - visited).toBeLessThanOrEqual(VISITS_PER_TURN * turns.calls);
      const served = queued.splice(
        queued.findIndex((state) => state.uid === round),
        1,
      )[0]!;
      lease = served.handoff!;
      leaseOf = served;
    }
    expect(cap.waitingCount()).toBe(uids - 4);
    expect(bed.connector.calls).toBe(5);
  });
});

describe('OriginCap pools joining and leaving', () => {
  it('orders the waiting uids anew when a pool of the origin closes: what a uid held there no longer counts', async () => {
    const cap = new OriginCap();
    const direct = pool(cap, 4);
    const edge = pool(cap, 4, 'edge');
    const edgeLeases = [await edge.acquire(1_000, 1), await edge.acquire(1_000, 1)];
    held.push(...edgeLeases, await direct.acquire(1_000, 2), await direct.acquire(1_000, 3));
    const first = waiting(direct, 1);
    const second = waiting(direct, 2);
    await nextTurn();
    // uid 1 holds two connections of the origin (through edge), uid 2 one: uid 2's turn, though uid 1 waited longer.
    expect(cap.turn()).toEqual({ pool: direct, uid: 2 });
    edge.close();
    // Its leases (still the client's) are no connections of the origin's pools any more: uid 1 holds the fewest.
    expect(cap.turn()).toEqual({ pool: direct, uid: 1 });
    expect([first.handoff, second.handoff]).toEqual([undefined, undefined]);
    for (const lease of edgeLeases) endLease(edge, lease, 1);
  });
});

describe('OriginCap turns', () => {
  it('names the same turn as a walk over every waiting uid of every pool after each step of a long mixed run: acquires, lease ends, give-backs, connects that succeed and fail, cancels, timeouts, a pool joining and leaving', async () => {
    const cap = new OriginCap();
    const origin = [pool(cap, 3), pool(cap, 3, 'corp'), pool(cap, 3, 'lab')];
    // The turns each uid took, as the cap is told of them, forgotten when it forgets its own (nobody waits).
    const tookAt = new Map<number, number>();
    let took = 0;
    const takeTurn = cap.took.bind(cap);
    cap.took = (uid) => {
      tookAt.set(uid, took++);
      takeTurn(uid);
    };
    const turn = cap.turn.bind(cap);
    cap.turn = () => {
      const result = turn();
      if (result === undefined && origin.every((each) => each.waitingCount === 0)) tookAt.clear();
      return result;
    };
    /** Whose turn it is by the rule of origin-cap.ts, read from every pool. */
    const walked = () => {
      let best: { pool: OriginPool; uid: number; key: [number, number, number] } | undefined;
      for (const each of origin) {
        if (each.uncoveredWaiters <= 0) continue;
        each.forEachUncovered((uid, arrived) => {
          const key: [number, number, number] = [
            origin.reduce((sum, other) => sum + other.heldBy(uid), 0),
            tookAt.get(uid) ?? -1,
            arrived,
          ];
          const before =
            best === undefined ||
            key[0] < best.key[0] ||
            (key[0] === best.key[0] && (key[1] < best.key[1] || (key[1] === best.key[1] && key[2] < best.key[2])));
          if (before) best = { pool: each, uid, key };
        });
      }
      return best === undefined ? undefined : { pool: best.pool.key, uid: best.uid };
    };
    const check = (step: number) => {
      const turnNow = cap.turn();
      expect({ step, turn: turnNow === undefined ? undefined : { pool: turnNow.pool.key, uid: turnNow.uid } }).toEqual({
        step,
        turn: walked(),
      });
    };

    const next = seededRandom(34);
    const pick = <T>(from: T[]): T => from[Math.floor(next() * from.length)]!;
    const acquires: Array<ReturnType<typeof waiting> & { abort: AbortController }> = [];
    const leases: Array<ReturnType<typeof waiting>> = [];
    let sawTurns = 0;
    for (let step = 0; step < 400; step++) {
      for (const state of acquires.splice(0)) {
        if (state.handoff !== undefined) leases.push(state);
        else if (state.error === undefined) acquires.push(state);
      }
      // Another way of reaching the origin comes in use for a while, then its pool closes (its waiters fail).
      if (step === 150) origin.push(pool(cap, 3, 'edge'));
      if (step === 300) origin.pop()!.close();
      const roll = next();
      bed.connector.manual = next() < 0.5;
      if (roll < 0.4) {
        const abort = new AbortController();
        // (The state object itself, which the acquire settles, with its controller.)
        const state = waiting(pick(origin), 1 + Math.floor(next() * 6), 1_000 + next() * 4_000, abort.signal);
        acquires.push(Object.assign(state, { abort }));
      } else if (roll < 0.55 && leases.length > 0) {
        const lease = leases.splice(Math.floor(next() * leases.length), 1)[0]!;
        endLease(lease.from, lease.handoff!, lease.uid);
      } else if (roll < 0.65 && leases.length > 0) {
        const lease = leases.splice(Math.floor(next() * leases.length), 1)[0]!;
        held.splice(held.indexOf(lease.handoff!), 1);
        lease.from.giveBack(lease.handoff!, lease.uid, next() < 0.5);
      } else if (roll < 0.8 && bed.connector.pending.length > 0) {
        const pending = bed.connector.pending.splice(Math.floor(next() * bed.connector.pending.length), 1)[0]!;
        if (next() < 0.75) await pending.succeed();
        else pending.fail(Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' }));
      } else if (roll < 0.9 && acquires.length > 0) {
        pick(acquires).abort.abort();
      } else {
        vi.advanceTimersByTime(500);
      }
      check(step);
      await nextTurn();
      check(step);
      if (cap.turn() !== undefined) sawTurns++;
    }
    // The run kept acquires waiting at the cap for much of it (not only an empty answer compared).
    expect(sawTurns).toBeGreaterThan(50);
    bed.connector.manual = false;
    for (const pending of bed.connector.pending.splice(0)) await pending.succeed();
    await nextTurn();
  });
});
