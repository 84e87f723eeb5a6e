// Request tokens of a rate-limited origin (`requestsPerSecond`, `burst`), as both sides hold them: the daemon takes
// them in batches from the fleet's Redis (daemon/fleet/), a worker in batches from its daemon (protocol `tokens`).
// A batch is spent within TOKEN_LIFETIME_MS or dropped: tokens kept longer would let a holder spend past the rate
// later. The GCRA arithmetic itself is daemon/fleet/gcra.ts.

import { ErrorCodes, SockpoolError } from './errors.js';

export interface RateParams {
  requestsPerSecond: number;
  burst: number;
}

/**
 * SOCKPOOL_ERR_RATE_LIMITED for a request to `key` whose turn for a token comes in `waitMs` (the earliest: a caller
 * may retry after it), past its deadline (`leftMs` away). The daemon's refusal and the worker's from a refusal it
 * kept (worker/rate-tokens.ts) say the same.
 */
export function rateLimitedError(key: string, params: RateParams, waitMs: number, leftMs: number): SockpoolError {
  const wait = Math.ceil(waitMs);
  return new SockpoolError(
    ErrorCodes.RATE_LIMITED,
    `${key} is limited to ${params.requestsPerSecond} requests/s (burst ${params.burst}): the request's turn for ` +
      `a token comes in ${wait} ms at the earliest, past its deadline (${Math.max(0, Math.floor(leftMs))} ms left)`,
    { origin: key, waitMs: wait, requestsPerSecond: params.requestsPerSecond, burst: params.burst },
  );
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

/**
 * Tokens held for one origin, taken in batches (injected clock). Each batch is spendable until TOKEN_LIFETIME_MS
 * after it was taken, and no longer: tokens added later never lengthen the lifetime of those held already. The
 * oldest are spent first (they expire first). (Holders ask for a batch when theirs is spent: one or two at a time.)
 */
export class TokenBatch {
  /** Batches held, oldest first: tokens left and when they expire. */
  #held: Array<{ tokens: number; expiresAt: number }> = [];
  #tokens = 0;
  #expired = 0;
  /** What the holder's last batch request asked for (nothing yet: the rate's batch next), and `#expired` then. */
  #asked = Number.POSITIVE_INFINITY;
  #expiredAtAsk = 0;
  /** The last batch request was granted less than it asked for (noteGrant). */
  #short = false;

  /** Tokens held, expired ones not dropped yet included. */
  get count(): number {
    return this.#tokens;
  }

  /** Tokens dropped unspent so far, expired (seen as the batch is spent or added to): what a holder asked for beyond
   *  its demand. */
  get expired(): number {
    return this.#expired;
  }

  /**
   * How many tokens the holder's next batch request asks for, `most` being the rate's batch (batchSize): the rate's
   * batch while the holder spends what it asks for; once some expired unspent (the holder asked for more than its
   * demand, and was charged for them all the same), what the last request left spent (at least one), growing back,
   * doubling, only as batches are spent whole; never fewer than the `waiting` requests that will spend it now (up
   * to `most`). (Each asking for the rate's batch, a holder sending one request every 2 s to an origin at 100
   * requests/s took 10 tokens a request: twenty such holders took the origin's whole rate for 10 requests/s.) Call it
   * once per batch request, after a spend found the batch empty (expired tokens are counted as they are dropped).
   */
  nextAsk(most: number, waiting: number): number {
    const expired = this.#expired - this.#expiredAtAsk;
    this.#expiredAtAsk = this.#expired;
    // Granted less than asked (the daemon shares what it has at hand): tokens are scarce, so ask for what still
    // waits, or the asks that follow a burst's part take what nobody will spend.
    const scarce = this.#short;
    this.#short = false;
    const size = scarce ? 1 : expired > 0 ? Math.max(1, this.#asked - expired) : this.#asked * 2;
    this.#asked = Math.min(most, Math.max(size, waiting));
    return this.#asked;
  }

  /** What the holder's last batch request was granted (nextAsk reads it): less than it asked for is scarcity. */
  noteGrant(granted: number): void {
    this.#short = granted < this.#asked;
  }

  /** Tokens still spendable at `now` (0 once every batch expired). */
  held(now: number): number {
    let held = 0;
    for (const batch of this.#held) if (now < batch.expiresAt) held += batch.tokens;
    return held;
  }

  /** Spends one token (of the oldest batch) if one is held and not expired. */
  spend(now: number): boolean {
    return this.spendUntil(now) !== undefined;
  }

  /** spend(), telling when the token spent would have expired (undefined: none held). */
  spendUntil(now: number): number | undefined {
    if (this.#tokens === 0) return undefined;
    this.#dropExpired(now);
    const oldest = this.#held[0];
    if (!oldest) return undefined;
    this.#tokens--;
    if (--oldest.tokens === 0) this.#held.shift();
    return oldest.expiresAt;
  }

  /**
   * Adds `count` tokens taken at `takenAt` (default `now`): they expire TOKEN_LIFETIME_MS after that, the ones held
   * already as before. Tokens given back (taken earlier for a request that never went out) keep their own expiry, in
   * its place among the others: a give-back never lengthens a token's life.
   */
  add(count: number, now: number, takenAt = now): void {
    if (count <= 0) return;
    this.#dropExpired(now);
    const expiresAt = takenAt + TOKEN_LIFETIME_MS;
    if (expiresAt <= now) return;
    let at = this.#held.length;
    while (at > 0 && this.#held[at - 1]!.expiresAt > expiresAt) at--;
    this.#held.splice(at, 0, { tokens: count, expiresAt });
    this.#tokens += count;
  }

  #dropExpired(now: number): void {
    while (this.#held.length > 0 && now >= this.#held[0]!.expiresAt) {
      const { tokens } = this.#held.shift()!;
      this.#tokens -= tokens;
      this.#expired += tokens;
    }
  }
}
