// Request tokens of rate-limited origins, on the worker's side: every request to an origin whose rate the daemon
// told us (a lease's `rate`) takes a token before it goes out, whether curl then opens a connection or reuses one.
// Tokens come in small batches from the daemon (protocol `tokens`), so most requests spend one already held and
// send nothing. Origins without a rate cost one Map lookup: no message at all. A request to an origin whose rate we
// do not know yet is charged by the daemon on its acquire (such a request always needs a connection: curl has none
// cached there); an acquire says `tokenTaken` when the request took its token here.

import { originKey } from '../shared/origin.js';
import { batchSize, type RateParams, TokenBatch } from '../shared/rate.js';

/** The most tokens a worker asks for at once. */
const MAX_WORKER_BATCH = 16;

export interface TokenLink {
  /** Tokens of host:port from the daemon: resolves with how many (>= 1), or rejects (SOCKPOOL_ERR_RATE_LIMITED...). */
  tokens(host: string, port: number, count: number, timeoutMs: number): Promise<number>;
}

export class RateTokens {
  #link: TokenLink;
  #now: () => number;
  /** host:port -> its rate, as the last lease for it said. */
  #rates = new Map<string, RateParams>();
  #batches = new Map<string, TokenBatch>();

  constructor(link: TokenLink, now: () => number = () => performance.now()) {
    this.#link = link;
    this.#now = now;
  }

  /** A lease arrived for host:port: its `rate` (or none) is the origin's from now on. */
  learn(host: string, port: number, rate: RateParams | undefined): void {
    const key = originKey({ host, port });
    if (rate) this.#rates.set(key, rate);
    else if (this.#rates.delete(key)) this.#batches.delete(key);
  }

  /** Whether requests to host:port take tokens (its rate is known). */
  rated(host: string, port: number): boolean {
    return this.#rates.size > 0 && this.#rates.has(originKey({ host, port }));
  }

  /** Takes one token for a request to host:port (none needed: resolves at once, synchronously undefined). */
  take(host: string, port: number, timeoutMs: number): Promise<void> | undefined {
    if (this.#rates.size === 0) return undefined;
    const key = originKey({ host, port });
    const rate = this.#rates.get(key);
    if (!rate) return undefined;
    let batch = this.#batches.get(key);
    if (!batch) {
      batch = new TokenBatch();
      this.#batches.set(key, batch);
    }
    if (batch.spend(this.#now())) return undefined;
    const held = batch;
    return this.#link
      .tokens(host, port, batchSize(rate, MAX_WORKER_BATCH), Math.max(1, Math.ceil(timeoutMs)))
      .then((granted) => held.add(granted - 1, this.#now()));
  }
}
