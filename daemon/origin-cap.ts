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
// Warming (refills, prewarms) takes only room no acquire of the origin waits for, and an acquire waiting at a cap the
// other pools fill with idle sockets closes one of those (its own pool's would be handed to it): a waiter before
// warmth, so the pools' minIdle and prewarms share the cap and, together, never pass it.

import type { OriginPool } from './origin-pool.js';

/** Whose turn room at the cap is: a uid, and the pool its longest waiting acquire that no connect covers waits in. */
export interface CapTurn {
  pool: OriginPool;
  uid: number;
}

export class OriginCap {
  readonly #pools = new Set<OriginPool>();
  /**
   * Per uid, the turn it last took room at (`took`), while acquires of the origin wait: among uids holding as many,
   * the one that took least recently (or never) goes first, as in a pool's queue (fair-queue.ts, `served`).
   */
  readonly #tookAt = new Map<number, number>();
  #turns = 0;
  #wakeScheduled = false;

  /** How many pools the origin has: with one, that pool counts itself alone (OriginPool skips the group). */
  get size(): number {
    return this.#pools.size;
  }

  join(pool: OriginPool): void {
    this.#pools.add(pool);
  }

  leave(pool: OriginPool): void {
    this.#pools.delete(pool);
  }

  /** The pool keys of the origin (the clients holding their leases are asked for idle ones together). */
  keys(): string[] {
    return [...this.#pools].map((pool) => pool.key);
  }

  /** The origin's connections: leased, idle and connecting, in all its pools. */
  total(): number {
    let total = 0;
    for (const pool of this.#pools) total += pool.total;
    return total;
  }

  /** Acquires of the origin, in all its pools, that wait for room (no connect under way covers them). */
  waitingCount(): number {
    let waiting = 0;
    for (const pool of this.#pools) waiting += Math.max(0, pool.uncoveredWaiters);
    return waiting;
  }

  /** What `uid` holds of the origin: its leases and the connects under way for it, in all the origin's pools. */
  heldBy(uid: number): number {
    let held = 0;
    for (const pool of this.#pools) held += pool.heldBy(uid);
    return held;
  }

  /** Whether `pool` may take room at the cap for its waiters now: the turn is none other pool's. */
  mayTake(pool: OriginPool): boolean {
    const turn = this.turn();
    return turn === undefined || turn.pool === pool;
  }

  /** Whether an acquire of the origin waits for room in any of its pools (warming takes none then). */
  waiting(): boolean {
    for (const pool of this.#pools) if (pool.uncoveredWaiters > 0) return true;
    return false;
  }

  /**
   * Whose turn room at the cap is (see the top of this file), among the acquires of every pool that no connect under
   * way covers; undefined when none waits.
   */
  turn(): CapTurn | undefined {
    let best: { pool: OriginPool; uid: number; arrived: number; held: number; tookAt: number } | undefined;
    const heldOf = new Map<number, number>();
    for (const pool of this.#pools) {
      if (pool.uncoveredWaiters <= 0) continue;
      pool.forEachUncovered((uid, arrived) => {
        let held = heldOf.get(uid);
        if (held === undefined) {
          held = this.heldBy(uid);
          heldOf.set(uid, held);
        }
        const tookAt = this.#tookAt.get(uid) ?? -1;
        const before =
          best === undefined ||
          held < best.held ||
          (held === best.held && (tookAt < best.tookAt || (tookAt === best.tookAt && arrived < best.arrived)));
        if (before) best = { pool, uid, arrived, held, tookAt };
      });
    }
    // Turns matter only among waiters: once none is left in any pool they are forgotten (a bound on the map, too).
    if (best === undefined && this.#tookAt.size > 0 && ![...this.#pools].some((pool) => pool.waitingCount > 0)) {
      this.#tookAt.clear();
    }
    return best === undefined ? undefined : { pool: best.pool, uid: best.uid };
  }

  /** Room was taken for a waiter of `uid` (a connect, or a connection lent again rather than closed). */
  took(uid: number): void {
    this.#tookAt.set(uid, this.#turns++);
  }

  /**
   * Closes an idle socket of another pool than `pool` to make room for `pool`'s waiters at the cap. Returns whether
   * one was closed.
   */
  evictFor(pool: OriginPool): boolean {
    for (const other of this.#pools) if (other !== pool && other.yieldIdle()) return true;
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
