// The pools of one origin that share its `maxPerOrigin`. Its plain sockets, its warm TLS sessions and its tunnels
// through each proxy are pools of their own (the pool manager keys them apart), but the origin's servers see every
// one of those connections, so the cap counts them together, grouped as `maxPerOriginFleet`'s slots are (fleetKey:
// host and port alone, fleet/slots.ts). Asked only where a connect is decided (an origin pool's pump, a prewarm's
// connects) and where a connection closes, never on a warm handoff, which neither opens nor closes one; an origin
// reached one way only has a group of one, and its pool counts itself alone as before.
//
// Room at the cap goes to the pools whose acquires wait for it, in turns: a pool that took room for a waiter goes
// behind the others still waiting, so the direct pool's backlog (its own leases ending one after another) does not
// starve an acquire through a proxy that holds none. Warming (refills, prewarms) takes only room no acquire of the
// origin waits for, and an acquire waiting at a cap the other pools fill with idle sockets closes one of those (its
// own pool's would be handed to it): a waiter before warmth, so the pools' minIdle and prewarms share the cap and,
// together, never pass it.

import type { OriginPool } from './origin-pool.js';

export class OriginCap {
  readonly #pools = new Set<OriginPool>();
  /** Pools whose acquires wait for room, in turn order (a Set keeps insertion order); stale entries are skipped. */
  readonly #turns = new Set<OriginPool>();
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
    this.#turns.delete(pool);
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

  /** Whether `pool` may take room at the cap for its waiters now: no pool ahead of it in turns still waits. */
  mayTake(pool: OriginPool): boolean {
    for (const turn of this.#turns) {
      if (turn === pool) return true;
      if (turn.uncoveredWaiters > 0) return false;
      this.#turns.delete(turn);
    }
    return true;
  }

  /** Whether an acquire of the origin waits for room in any of its pools (warming takes none then). */
  waiting(): boolean {
    for (const pool of this.#pools) if (pool.uncoveredWaiters > 0) return true;
    return false;
  }

  /** `pool` has acquires waiting for room: it takes its turn, behind the pools already waiting. */
  wait(pool: OriginPool): void {
    this.#turns.add(pool);
  }

  /** `pool` took room for a waiter: its turn is over (it waits again behind the others, if it still waits). */
  took(pool: OriginPool): void {
    this.#turns.delete(pool);
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
   * A connection of the origin closed: the pools waiting for room are served in turns, at the next turn of the event
   * loop (the pool it closed in may be in the midst of a walk over its sockets).
   */
  roomFreed(): void {
    if (this.#turns.size === 0 || this.#wakeScheduled) return;
    this.#wakeScheduled = true;
    setImmediate(() => {
      this.#wakeScheduled = false;
      this.#wake();
    });
  }

  #wake(): void {
    for (;;) {
      const head = this.#head();
      if (!head) return;
      head.roomMayHaveCome();
      // It took nothing (no room, or it cannot connect now): the pools behind it get none either.
      if (this.#head() === head) return;
    }
  }

  /** The first pool in turns whose acquires still wait for room. */
  #head(): OriginPool | undefined {
    for (const turn of this.#turns) {
      if (turn.uncoveredWaiters > 0) return turn;
      this.#turns.delete(turn);
    }
    return undefined;
  }
}
