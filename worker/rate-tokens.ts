// Request tokens of rate-limited origins, on the worker's side: every request to an origin whose rate the daemon
// told us (a lease's `rate`) takes a token before it goes out, whether curl then opens a connection or reuses one.
// Tokens come in small batches from the daemon (protocol `tokens`), so most requests spend one already held and
// send nothing. Origins without a rate cost one Map lookup: no message at all. A request to an origin whose rate we
// do not know yet is charged by the daemon on its acquire (such a request always needs a connection: curl has none
// cached there); an acquire says `tokenTaken` when the request took its token here.
//
// One `tokens` request per origin at a time: requests that find the batch empty while one is under way wait for it
// and spend from the batch it fills; only those still without a token then ask again. (Each asking for a batch of
// its own, a burst of N requests took up to N batches: tokens that expired unspent, lost to the whole fleet, and
// waits the origin's rate did not call for.) A request whose deadline comes before the one under way's asks for
// its own single token instead, so that it never waits past its deadline behind another request.
//
// The daemon waits at most MAX_TIMEOUT_MS for a token (the protocol's bound). A request with more time left that
// the daemon refuses (SOCKPOOL_ERR_RATE_LIMITED: the next token comes later than that) waits here until the token
// is within that bound, and asks again; it fails only when the token would come after its own deadline.
//
// A request cancelled while it waits (its AbortSignal, its thread's close) stops waiting at once; the wait it
// started goes on for the requests that share it, and the token it would have spent stays in the batch for them.

import { ErrorCodes } from '../shared/errors.js';
import { originKey } from '../shared/origin.js';
import { MAX_TIMEOUT_MS } from '../shared/protocol.js';
import { batchSize, type RateParams, TokenBatch } from '../shared/rate.js';
import type { CancelSignal } from './cancellation.js';

/** The most tokens a worker asks for at once. */
const MAX_WORKER_BATCH = 16;

export interface TokenLink {
  /** Tokens of host:port from the daemon: resolves with how many (>= 1), or rejects (SOCKPOOL_ERR_RATE_LIMITED...).
   *  The daemon is asked to wait at most MAX_TIMEOUT_MS of `timeoutMs`. */
  tokens(host: string, port: number, count: number, timeoutMs: number): Promise<number>;
}

/** An origin's tokens held here, and its `tokens` request under way (the one that fills the batch). */
interface OriginTokens {
  batch: TokenBatch;
  asking: Promise<void> | undefined;
  /** The deadline (this clock) of the request that asked: a wait for `asking` ends by then. */
  askingUntil: number;
}

export class RateTokens {
  #link: TokenLink;
  #now: () => number;
  /** host:port -> its rate, as the last lease for it said. */
  #rates = new Map<string, RateParams>();
  #origins = new Map<string, OriginTokens>();

  constructor(link: TokenLink, now: () => number = () => performance.now()) {
    this.#link = link;
    this.#now = now;
  }

  /** A lease arrived for host:port: its `rate` (or none) is the origin's from now on. */
  learn(host: string, port: number, rate: RateParams | undefined): void {
    const key = originKey({ host, port });
    if (rate) this.#rates.set(key, rate);
    else if (this.#rates.delete(key)) this.#origins.delete(key);
  }

  /** Whether requests to host:port take tokens (its rate is known). */
  rated(host: string, port: number): boolean {
    return this.#rates.size > 0 && this.#rates.has(originKey({ host, port }));
  }

  /** Takes one token for a request to host:port (none needed: resolves at once, synchronously undefined). A
   *  cancelled `signal` rejects the wait with its reason at once, and the token is not spent. */
  take(host: string, port: number, timeoutMs: number, signal?: CancelSignal): Promise<void> | undefined {
    if (this.#rates.size === 0) return undefined;
    const key = originKey({ host, port });
    if (!this.#rates.has(key)) return undefined;
    if (this.#originOf(key).batch.spend(this.#now())) return undefined;
    const waiting = this.#wait(host, port, key, this.#now() + timeoutMs, signal);
    if (!signal) return waiting;
    return new Promise<void>((resolve, reject) => {
      const onAbort = (): void => reject(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      waiting.then(
        () => {
          signal.removeEventListener('abort', onAbort);
          resolve();
        },
        (error: unknown) => {
          signal.removeEventListener('abort', onAbort);
          reject(error);
        },
      );
    });
  }

  #originOf(key: string): OriginTokens {
    let origin = this.#origins.get(key);
    if (!origin) {
      origin = { batch: new TokenBatch(), asking: undefined, askingUntil: 0 };
      this.#origins.set(key, origin);
    }
    return origin;
  }

  /** A token for a request whose origin's batch was empty, by `deadline`. */
  async #wait(host: string, port: number, key: string, deadline: number, signal?: CancelSignal): Promise<void> {
    for (;;) {
      // (Looked up again each time: a lease may have said meanwhile that the origin has no rate any more.)
      const rate = this.#rates.get(key);
      if (!rate || signal?.aborted) return;
      const origin = this.#originOf(key);
      if (origin.batch.spend(this.#now())) return;
      if (origin.asking && origin.askingUntil <= deadline) {
        // It ends (with tokens, or refused) before this request's deadline: spend from what it brings.
        await origin.asking.then(ignore, ignore);
        continue;
      }
      if (origin.asking) {
        // The request under way may wait past this one's deadline: a token of its own, on its own deadline.
        await this.#ask(host, port, 1, deadline, origin.batch, signal);
        return;
      }
      const count = batchSize(rate, MAX_WORKER_BATCH);
      const asking = this.#ask(host, port, count, deadline, origin.batch, signal).finally(() => {
        if (origin.asking === asking) origin.asking = undefined;
      });
      origin.asking = asking;
      origin.askingUntil = deadline;
      await asking;
      return;
    }
  }

  /** Asks the daemon for `count` tokens: one is the caller's (unless it was cancelled meanwhile), the rest go to
   *  `batch`. */
  async #ask(
    host: string,
    port: number,
    count: number,
    deadline: number,
    batch: TokenBatch,
    signal: CancelSignal | undefined,
  ): Promise<void> {
    for (;;) {
      const left = Math.max(1, Math.ceil(deadline - this.#now()));
      try {
        const granted = await this.#link.tokens(host, port, count, left);
        batch.add(signal?.aborted ? granted : granted - 1, this.#now());
        return;
      } catch (error) {
        // The daemon waited at most MAX_TIMEOUT_MS: a token due after that, but before the deadline, is waited for
        // here (until it is due within that bound), then asked for again.
        const waitMs = rateLimitedWait(error);
        if (left <= MAX_TIMEOUT_MS || waitMs === undefined || waitMs > deadline - this.#now()) throw error;
        await sleep(Math.max(1, waitMs - MAX_TIMEOUT_MS), signal);
        // Cancelled meanwhile: requests that shared this wait ask for themselves.
        if (signal?.aborted) return;
      }
    }
  }
}

function ignore(): void {}

/** Waits `ms`, or until `signal` is cancelled: the timer goes with the request (it could hold a process that closed
 *  its client for minutes). */
function sleep(ms: number, signal: CancelSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** A SOCKPOOL_ERR_RATE_LIMITED refusal's wait for the next token (ms), if the error is one. */
function rateLimitedWait(error: unknown): number | undefined {
  const { code, fields } = error as { code?: unknown; fields?: { waitMs?: unknown } };
  if (code !== ErrorCodes.RATE_LIMITED) return undefined;
  const waitMs = fields?.waitMs;
  return typeof waitMs === 'number' && Number.isFinite(waitMs) ? waitMs : undefined;
}
