// Politeness per origin (`requestsPerSecond`, `burst`): every request to a rate-limited origin takes a token before
// it goes out. Workers ask in batches (protocol `tokens`, handoff-server.ts); the daemon grants from its own batch,
// refilled from the fleet's GCRA in Redis (fleet.ts), or, without a fleet, from a GCRA of its own (a daemon alone
// is a fleet of one). A request that would wait past its deadline fails with SOCKPOOL_ERR_RATE_LIMITED and the wait
// it would have needed. Origins without a rate never get here.

import { ErrorCodes, SockpoolError } from '../../shared/errors.js';
import type { Origin } from '../../shared/origin.js';
import { batchSize, type RateParams, TokenBatch } from '../../shared/rate.js';
import { policyFor, type SockpoolConfig } from '../config.js';
import type { Fleet } from './fleet.js';
import { ForgetfulMap } from './forgetful-map.js';
import { type Grant, LocalGcra } from './gcra.js';
import { fleetKey } from './slots.js';

/** The most tokens the daemon asks Redis for at once (batchSize caps it lower for slow rates). */
const MAX_DAEMON_BATCH = 64;
/** Batches kept before spent or expired ones are forgotten (ForgetfulMap). */
const MAX_BATCHES = 10_000;
/** The most tokens one `tokens` request may be granted. */
export const MAX_TOKENS_PER_REQUEST = 1000;

export interface RateCounters {
  /** Tokens handed to requests. */
  granted: number;
  /** Requests refused with SOCKPOOL_ERR_RATE_LIMITED. */
  limited: number;
  /** Times a request waited for its token. */
  waits: number;
}

export class RateLimiter {
  #config: SockpoolConfig;
  #fleet: Fleet | undefined;
  #local: LocalGcra;
  #now: () => number;
  /** A spent or expired batch is the same as none: clients naming ever more origins under a default rate cannot
   *  grow this without bound (as LocalGcra's TATs). */
  #batches = new ForgetfulMap<string, TokenBatch>(MAX_BATCHES, (batch, now) => batch.held(now) === 0);
  /** fleetKey -> the batch being asked of Redis for it now (settles when the answer is in, never rejects). */
  #asking = new Map<string, Promise<void>>();
  /** fleetKey -> its rate, or null when it has none (policyFor is not cheap enough for every acquire). */
  #params = new Map<string, RateParams | null>();
  /** Some policy (the defaults or an origin entry) has a rate: without one, every origin is answered at once. */
  #anyRate: boolean;
  readonly counters: RateCounters = { granted: 0, limited: 0, waits: 0 };

  constructor(config: SockpoolConfig, fleet: Fleet | undefined, now: () => number = () => performance.now()) {
    this.#config = config;
    this.#fleet = fleet;
    this.#now = now;
    this.#local = new LocalGcra(now);
    this.#anyRate = hasAnyRate(config);
  }

  /** A reload: rates are read again. */
  configure(config: SockpoolConfig): void {
    this.#config = config;
    this.#anyRate = hasAnyRate(config);
    this.#params.clear();
  }

  /** The origin's rate, or undefined when it has none. */
  paramsFor(origin: Origin): RateParams | undefined {
    // (Every acquire asks: a daemon with no rate configured pays no key and no lookup for it.)
    if (!this.#anyRate) return undefined;
    const key = fleetKey(origin);
    let params = this.#params.get(key);
    if (params === undefined) {
      const policy = policyFor(this.#config, origin.host, origin.port);
      params =
        policy.requestsPerSecond === undefined
          ? null
          : { requestsPerSecond: policy.requestsPerSecond, burst: policy.burst ?? 1 };
      if (this.#params.size > 10_000) this.#params.clear();
      this.#params.set(key, params);
    }
    return params ?? undefined;
  }

  /**
   * Between 1 and `wanted` tokens of `origin`, waiting for the first as long as `timeoutMs` allows. Throws
   * SOCKPOOL_ERR_RATE_LIMITED (with `waitMs`) when the wait would be longer. `signal`: the client gave the request
   * up (a `cancel`, its disconnect): the wait ends with SOCKPOOL_ERR_ABORTED and takes no token, or a client that
   * asks and hangs up, over and over, would leave waits behind without bound, each racing the clients still there
   * for every token.
   */
  async take(
    origin: Origin,
    params: RateParams,
    wanted: number,
    timeoutMs: number,
    signal?: AbortSignal,
  ): Promise<number> {
    const key = fleetKey(origin);
    const deadline = this.#now() + timeoutMs;
    let waited = false;
    for (;;) {
      if (signal?.aborted) throw abortedError(key);
      const grant = await this.#grant(key, params, wanted);
      if (grant.granted > 0) {
        this.counters.granted += grant.granted;
        return grant.granted;
      }
      const left = deadline - this.#now();
      if (grant.waitMs > left) {
        this.counters.limited++;
        const waitMs = Math.ceil(grant.waitMs);
        throw new SockpoolError(
          ErrorCodes.RATE_LIMITED,
          `${key} is limited to ${params.requestsPerSecond} requests/s (burst ${params.burst}): the next token ` +
            `comes in ${waitMs} ms, past the request's deadline (${Math.max(0, Math.floor(left))} ms left)`,
          { origin: key, waitMs, requestsPerSecond: params.requestsPerSecond, burst: params.burst },
        );
      }
      if (!waited) this.counters.waits++;
      waited = true;
      await sleep(Math.max(1, Math.ceil(grant.waitMs)), signal);
    }
  }

  async #grant(key: string, params: RateParams, wanted: number): Promise<Grant> {
    const fleet = this.#fleet;
    if (!fleet) return this.#local.take(key, wanted, params);
    // A fleet: from this daemon's batch first, then a new batch from Redis (the rest kept for the next requests).
    // One batch asked of Redis per origin at a time: requests that find the batch empty meanwhile wait for it and
    // spend from it (each asking for a batch of its own, a burst took a batch per request, and the tokens it did not
    // spend expired, lost to the whole fleet); one that finds it spent after that asks next.
    for (;;) {
      let batch = this.#batches.get(key);
      if (!batch) {
        batch = new TokenBatch();
        this.#batches.set(key, batch, this.#now());
      }
      let spent = 0;
      while (spent < wanted && batch.spend(this.#now())) spent++;
      if (spent > 0) return { granted: spent, waitMs: 0 };
      const asking = this.#asking.get(key);
      if (asking) {
        await asking;
        continue;
      }
      const ask = Math.max(wanted, batchSize(params, MAX_DAEMON_BATCH));
      const held = batch;
      const granting = fleet
        .takeTokens(key, params, ask, (share) => this.#local.take(key, ask, share))
        .then((grant) => {
          if (grant.granted > wanted) held.add(grant.granted - wanted, this.#now());
          return { granted: Math.min(wanted, grant.granted), waitMs: grant.waitMs };
        });
      const settled = granting.then(
        () => {},
        () => {},
      );
      this.#asking.set(key, settled);
      try {
        return await granting;
      } finally {
        if (this.#asking.get(key) === settled) this.#asking.delete(key);
      }
    }
  }
}

/** Resolves after `ms`, or at once when `signal` aborts (the loop above then throws). */
function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    }
  });
}

function abortedError(origin: string): SockpoolError {
  return new SockpoolError(ErrorCodes.ABORTED, `the client gave up its wait for a token of ${origin}`, { origin });
}

function hasAnyRate(config: SockpoolConfig): boolean {
  return (
    config.pool.defaults.requestsPerSecond !== undefined ||
    config.pool.origins.some((entry) => entry.requestsPerSecond !== undefined)
  );
}
