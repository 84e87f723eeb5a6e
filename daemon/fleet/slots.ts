// Connection slots under `maxPerOriginFleet`: how an origin pool asks before it connects and gives back when a
// connection closes (origin-pool.ts, through the SlotKeeper it is given). With a fleet the slots are the fleet's
// (fleet.ts, in Redis); without one the daemon is a fleet of one and counts them here. Either way the key is the
// origin's host and port alone: plain, warm TLS and proxied pools of one origin share its slots (the origin's
// servers see all of those connections).

import { originKey } from '../../shared/origin.js';
import type { OriginPool } from '../origin-pool.js';

/** What an origin pool needs of the slot owner. */
export interface SlotKeeper {
  /**
   * A slot for one more connection of `pool`: resolves true when taken, false when not (`wait` false and none free,
   * or `wanted()` turned false while waiting). undefined: the pool's origin has no fleet cap (connect at once).
   */
  take(pool: OriginPool, wait: boolean, wanted: () => boolean): Promise<boolean> | undefined;
  /** `count` connections of `pool` that held slots are gone. */
  release(pool: OriginPool, count: number): void;
  /** A connection came without a connect (taken back from the fd store): counted, never refused. */
  count(pool: OriginPool): void;
}

/** An origin's cap, or how to read it: a take that waits reads it at each try, so a reload reaches it. */
export type SlotCap = number | (() => number);

export function capNow(cap: SlotCap): number {
  return typeof cap === 'number' ? cap : cap();
}

/** Where slots are counted: the fleet's Redis (fleet.ts) or this process (LocalSlots). */
export interface SlotLedger {
  takeSlot(key: string, cap: SlotCap, wait: boolean, wanted: () => boolean): Promise<boolean>;
  releaseSlots(key: string, count: number): void;
  countSlot(key: string): void;
}

/** The key slots and rates are kept under: host and port, whatever the pool (TLS, proxy) in front. */
export function fleetKey(origin: { host: string; port: number }): string {
  return originKey({ host: origin.host, port: origin.port });
}

export function slotKeeper(ledger: SlotLedger): SlotKeeper {
  return {
    take(pool, wait, wanted) {
      if (pool.policy.maxPerOriginFleet === undefined) return undefined;
      // Read at each try from the pool's policy, which a reload replaces: a connect waiting for a slot under the old
      // cap is held to the new one (no cap any more: the take succeeds, and the slot is given back as any other).
      const cap = () => pool.policy.maxPerOriginFleet ?? Number.MAX_SAFE_INTEGER;
      return ledger.takeSlot(fleetKey(pool.origin), cap, wait, wanted);
    },
    release(pool, count) {
      ledger.releaseSlots(fleetKey(pool.origin), count);
    },
    count(pool) {
      ledger.countSlot(fleetKey(pool.origin));
    },
  };
}

/** How often a connect waiting for a slot asks again. */
export const SLOT_POLL_MS = 20;

/** A daemon without a fleet: its own connections under the cap. */
export class LocalSlots implements SlotLedger {
  #held = new Map<string, number>();

  held(key: string): number {
    return this.#held.get(key) ?? 0;
  }

  async takeSlot(key: string, cap: SlotCap, wait: boolean, wanted: () => boolean): Promise<boolean> {
    for (;;) {
      if (this.held(key) < capNow(cap)) {
        this.countSlot(key);
        return true;
      }
      if (!wait || !wanted()) return false;
      await new Promise((resolve) => setTimeout(resolve, SLOT_POLL_MS));
      if (!wanted()) return false;
    }
  }

  releaseSlots(key: string, count: number): void {
    const left = this.held(key) - count;
    if (left > 0) this.#held.set(key, left);
    else this.#held.delete(key);
  }

  countSlot(key: string): void {
    this.#held.set(key, this.held(key) + 1);
  }
}
