// Request tokens of a rate-limited origin (`requestsPerSecond`, `burst`), as both sides hold them: the daemon takes
// them in batches from the fleet's Redis (daemon/fleet/), a worker in batches from its daemon (protocol `tokens`).
// A batch is spent within TOKEN_LIFETIME_MS or dropped: tokens kept longer would let a holder spend past the rate
// later. The GCRA arithmetic itself is daemon/fleet/gcra.ts.

export interface RateParams {
  requestsPerSecond: number;
  burst: number;
}

/**
 * How many tokens to ask for at once: enough that the asking is rare (a tenth of a second of the rate), never more
 * than the burst (a larger batch would only be refused) nor than `max`, at least one. A holder spends its batch
 * within TOKEN_LIFETIME_MS or loses it (tokens kept longer would let a holder spend past the rate later).
 */
export function batchSize(params: RateParams, max: number): number {
  return Math.max(1, Math.min(max, params.burst, Math.floor(params.requestsPerSecond / 10)));
}

/** How long a token taken in a batch may wait to be spent. */
export const TOKEN_LIFETIME_MS = 1_000;

/** Tokens held for one origin, taken in batches, each batch spendable until it expires (injected clock). */
export class TokenBatch {
  #tokens = 0;
  #expiresAt = 0;

  get count(): number {
    return this.#tokens;
  }

  /** Tokens still spendable at `now` (0 once the batch expired). */
  held(now: number): number {
    return now >= this.#expiresAt ? 0 : this.#tokens;
  }

  /** Spends one token if one is held and not expired. */
  spend(now: number): boolean {
    if (this.#tokens === 0) return false;
    if (now >= this.#expiresAt) {
      this.#tokens = 0;
      return false;
    }
    this.#tokens--;
    return true;
  }

  /** Adds `count` tokens taken at `now` (the older ones' lifetime is renewed with them: they came in order). */
  add(count: number, now: number): void {
    if (count <= 0) return;
    if (now >= this.#expiresAt) this.#tokens = 0;
    this.#tokens += count;
    this.#expiresAt = now + TOKEN_LIFETIME_MS;
  }
}
