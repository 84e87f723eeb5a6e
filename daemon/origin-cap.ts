// The pools of one origin that share its `maxPerOrigin`. Its plain sockets, its warm TLS sessions and its tunnels
// through each proxy are pools of their own (the pool manager keys them apart), but the origin's servers see every
// one of those connections, so the cap counts them together, grouped as `maxPerOriginFleet`'s slots are (fleetKey:
// host and port alone, fleet/slots.ts). Asked only where a connect is decided (an origin pool's pump, a prewarm's
// connects) and where a connection closes, never on a warm handoff, which neither opens nor closes one; an origin
// reached one way only has a group of one, and its pool counts itself alone as before.
//
// Room at the cap goes to the acquires that wait for it in all the origin's pools, fairly across uids as a pool's
// own queue is (fair-queue.ts), counted over the whole origin: to the uid that holds the fewest of the origin's
// connections (its leases and the connects under way for it, in every pool), among those tied the uid that took room
// least recently, then the longest waiting acquire (in whatever pool). So a uid waiting in several pools (direct and
// warm TLS, through a proxy) has one turn a round across them, as one waiting in one pool, and while another uid
// waits its share of the cap grows no larger than that one's by spreading its acquires over pools; the direct pool's
// backlog (its own leases ending one after another) does not starve an acquire through a proxy that waited first.
// A pool choosing among its own waiters (for an idle socket of its own, for a failed connect's error) counts what
// each uid holds of the whole origin too (heldBy), so a socket a uid gives back in one pool does not go straight to
// its next acquire there while a uid holding less of the origin waits.
// The order is kept as it changes rather than found by a walk at each turn (a pump and a release ask at every connect
// decided, and a shared daemon may have thousands of uids waiting at one origin): per pool, its waiting uids in a heap
// by that order (keyed-heap.ts), each with what it holds of the whole origin; a pool tells the cap of each uid whose
// waiters, leases or connects changed (changed), and the next turn() puts just those uids back in place, reading
// each pool once for them. So a turn costs the pools' firsts and, for each uid changed since, its place in each
// heap, not a walk over the uids. A pool joining or leaving orders them all anew (rare: the first acquire of another
// way of reaching the origin, a pool retired), as does a change while the origin has one pool (nobody asks it then).
// Warming (refills, prewarms) takes only room no acquire of the origin waits for, and an acquire waiting at a cap the
// other pools fill with idle sockets closes one of those (its own pool's would be handed to it): a waiter before
// warmth, so the pools' minIdle and prewarms share the cap and, together, never pass it.

import { KeyedHeap } from './keyed-heap.js';
import type { OriginPool } from './origin-pool.js';

/** Uids changed since the last turn() are kept at least up to this many (see changed()). */
const MIN_CHANGED_KEPT = 64;

/** Whose turn room at the cap is: a uid, and the pool its longest waiting acquire that no connect covers waits in. */
export interface CapTurn {
  pool: OriginPool;
  uid: number;
}

/** A uid's first acquire waiting in one pool that no connect covers, with what orders it (see turn()). */
interface Candidate {
  uid: number;
  /** What the uid holds of the origin (heldBy). */
  held: number;
  /** Its #tookAt; -1 when it took none. */
  tookAt: number;
  /** The acquire's place in arrival order. */
  arrived: number;
}

export class OriginCap {
  /** Each pool, with its uids waiting uncovered, by turn order (their first acquires). */
  readonly #pools = new Map<OriginPool, KeyedHeap<number, Candidate>>();
  /** Uids whose waiters or holdings changed since the heaps last placed them. */
  readonly #changed = new Set<number>();
  /** The heaps are to be built anew from every pool (the pools changed, or changes were not kept). */
  #reorder = true;
  /**
   * Per uid, the turn it last took room at (`took`), while acquires of the origin wait: among uids holding as many,
   * the one that took least recently (or never) goes first, as in a pool's queue (fair-queue.ts, `served`).
   */
  readonly #tookAt = new Map<number, number>();
  #turns = 0;
  #wakeScheduled = false;
  #visited = 0;

  /** Uid entries turn() has read from the pools or compared so far: its work, which the tests bound (none times it). */
  get visited(): number {
    return this.#visited;
  }

  /** How many pools the origin has: with one, that pool counts itself alone (OriginPool skips the group). */
  get size(): number {
    return this.#pools.size;
  }

  join(pool: OriginPool): void {
    this.#pools.set(pool, new KeyedHeap((a: Candidate, b: Candidate) => this.#before(a, b)));
    this.#reorder = true;
    for (const each of this.#pools.keys()) each.originChanged();
  }

  leave(pool: OriginPool): void {
    this.#pools.delete(pool);
    this.#reorder = true;
    for (const each of this.#pools.keys()) each.originChanged();
  }

  /**
   * The waiters, leases or connects under way of `uid` changed in a pool of the origin: its place in the turn order
   * is found again at the next turn() (and in each pool's order of its own waiters by the whole origin). With one
   * pool, nobody asks the cap (the pool counts itself alone): the order is built anew if it ever is. Nor while nobody
   * waits at the cap: the uids changed meanwhile (every uid leasing through a busy origin) are not kept past twice
   * the uids ordered, when ordering them all anew costs no more.
   */
  changed(uid: number): void {
    // Each pool orders its own waiters by what their uids hold of the whole origin, too (OriginPool.originChanged).
    for (const pool of this.#pools.keys()) pool.originChanged(uid);
    if (this.#reorder) return;
    if (this.#pools.size < 2 || (this.#changed.size >= MIN_CHANGED_KEPT && this.#changedPastOrdered())) {
      this.#reorder = true;
      this.#changed.clear();
      return;
    }
    this.#changed.add(uid);
  }

  /** Whether more uids changed than twice the uids the heaps order now. */
  #changedPastOrdered(): boolean {
    let ordered = 0;
    for (const heap of this.#pools.values()) ordered += heap.size;
    return this.#changed.size >= 2 * ordered;
  }

  /** The pool keys of the origin (the clients holding their leases are asked for idle ones together). */
  keys(): string[] {
    return [...this.#pools.keys()].map((pool) => pool.key);
  }

  /** The origin's connections: leased, idle and connecting, in all its pools. */
  total(): number {
    let total = 0;
    for (const pool of this.#pools.keys()) total += pool.total;
    return total;
  }

  /** Acquires of the origin, in all its pools, that wait for room (no connect under way covers them). */
  waitingCount(): number {
    let waiting = 0;
    for (const pool of this.#pools.keys()) waiting += Math.max(0, pool.uncoveredWaiters);
    return waiting;
  }

  /** What `uid` holds of the origin: its leases and the connects under way for it, in all the origin's pools. */
  heldBy(uid: number): number {
    let held = 0;
    for (const pool of this.#pools.keys()) held += pool.heldBy(uid);
    return held;
  }

  /** Whether `pool` may take room at the cap for its waiters now: the turn is none other pool's. */
  mayTake(pool: OriginPool): boolean {
    const turn = this.turn();
    return turn === undefined || turn.pool === pool;
  }

  /** Whether an acquire of the origin waits for room in any of its pools (warming takes none then). */
  waiting(): boolean {
    for (const pool of this.#pools.keys()) if (pool.uncoveredWaiters > 0) return true;
    return false;
  }

  /**
   * Whose turn room at the cap is (see the top of this file), among the acquires of every pool that no connect under
   * way covers; undefined when none waits.
   */
  turn(): CapTurn | undefined {
    this.#update();
    let best: { pool: OriginPool; first: Candidate } | undefined;
    for (const [pool, heap] of this.#pools) {
      if (pool.uncoveredWaiters <= 0) continue;
      const first = heap.peek();
      if (first !== undefined && (best === undefined || this.#before(first, best.first))) best = { pool, first };
    }
    // Turns matter only among waiters: once none is left in any pool they are forgotten (a bound on the map, too).
    if (best === undefined && this.#tookAt.size > 0 && ![...this.#pools.keys()].some((pool) => pool.waitingCount > 0)) {
      this.#tookAt.clear();
    }
    return best === undefined ? undefined : { pool: best.pool, uid: best.first.uid };
  }

  /**
   * Whether `a` goes before `b`: its uid holds fewer of the origin; among those tied, took room less recently (or
   * never); then it waited longer. (No two acquires arrived together: a strict order.)
   */
  #before(a: Candidate, b: Candidate): boolean {
    this.#visited++;
    if (a.held !== b.held) return a.held < b.held;
    if (a.tookAt !== b.tookAt) return a.tookAt < b.tookAt;
    return a.arrived < b.arrived;
  }

  /** Puts the uids changed since the last turn back in place in every pool's heap (or all of them anew). */
  #update(): void {
    if (this.#reorder) {
      this.#reorder = false;
      this.#changed.clear();
      for (const [pool, heap] of this.#pools) {
        heap.clear();
        pool.forEachUncovered((uid) => {
          this.#visited++;
          this.#changed.add(uid);
        });
      }
    }
    for (const uid of this.#changed) this.#place(uid);
    this.#changed.clear();
  }

  /** Puts `uid` in place in each pool's heap where it waits uncovered, and out of the others. */
  #place(uid: number): void {
    this.#visited += 2 * this.#pools.size;
    const held = this.heldBy(uid);
    const tookAt = this.#tookAt.get(uid) ?? -1;
    for (const [pool, heap] of this.#pools) {
      const arrived = pool.firstUncoveredOf(uid);
      if (arrived === undefined) heap.delete(uid);
      else heap.set(uid, { uid, held, tookAt, arrived });
    }
  }

  /** Room was taken for a waiter of `uid` (a connect, or a connection lent again rather than closed). */
  took(uid: number): void {
    this.#tookAt.set(uid, this.#turns++);
    this.changed(uid);
  }

  /**
   * Closes an idle socket of another pool than `pool` to make room for `pool`'s waiters at the cap. Returns whether
   * one was closed.
   */
  evictFor(pool: OriginPool): boolean {
    for (const other of this.#pools.keys()) if (other !== pool && other.yieldIdle()) return true;
    return false;
  }

  /**
   * A connection of the origin closed: the acquires waiting for room are served in turns, at the next turn of the
   * event loop (the pool it closed in may be in the midst of a walk over its sockets).
   */
  roomFreed(): void {
    if (this.#wakeScheduled || !this.waiting()) return;
    this.#wakeScheduled = true;
    setImmediate(() => {
      this.#wakeScheduled = false;
      this.#wake();
    });
  }

  #wake(): void {
    for (let turn = this.turn(); turn !== undefined; ) {
      const turns = this.#turns;
      turn.pool.roomMayHaveCome();
      const next = this.turn();
      // It took nothing (no room, or it cannot connect now) and the turn is still its: the others get none either.
      if (this.#turns === turns && next?.pool === turn.pool && next.uid === turn.uid) return;
      turn = next;
    }
  }
}
