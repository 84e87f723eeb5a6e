// GCRA (the generic cell rate algorithm): a rate limit kept as one number per origin, the theoretical arrival time
// (TAT) of the next request. With an emission interval T = 1000 / requestsPerSecond ms and a burst of B, a grant of
// k tokens at time `now` is allowed while max(TAT, now) + k·T <= now + B·T, and moves TAT there. Over any window W
// at most B + W / T tokens are granted. The same arithmetic runs in Redis (scripts.ts, RATE_SCRIPT, with Redis's
// clock) for a fleet and here for a daemon alone or a fleet whose Redis is down; test/fleet-logic.test.ts checks it
// with an injected clock.

import type { RateParams } from '../../shared/rate.js';
import { ForgetfulMap } from './forgetful-map.js';

export type { RateParams };

export interface Grant {
  /** Tokens granted now (0..wanted). */
  granted: number;
  /** When none was granted: how long until one would be, ms (0 otherwise). */
  waitMs: number;
  /** A fleet member's tokens (of its batch, or of Redis): when the first of them would expire in a batch (see
   *  RateLimiter.giveBack), on the limiter's clock. */
  expiresAt?: number;
}

/** Emission interval: ms between two tokens at the sustained rate. */
export function emissionIntervalMs(params: RateParams): number {
  return 1000 / params.requestsPerSecond;
}

/**
 * Up to `wanted` tokens at `now` (ms, any monotonic origin shared with `tat`); returns the grant and the new TAT.
 * `tat` undefined: the origin has not been asked for yet (a full burst is available).
 */
export function gcraTake(
  tat: number | undefined,
  now: number,
  wanted: number,
  params: RateParams,
): Grant & { tat: number } {
  const interval = emissionIntervalMs(params);
  const start = Math.max(tat ?? now, now);
  const granted = Math.min(wanted, gcraRoom(tat, now, params));
  if (granted > 0) return { granted, waitMs: 0, tat: start + granted * interval };
  return { granted: 0, waitMs: Math.max(0, start + interval - (now + params.burst * interval)), tat: start };
}

/** Tokens a take at `now` could be granted at once (`tat` as gcraTake's): the room left under the burst tolerance. */
export function gcraRoom(tat: number | undefined, now: number, params: RateParams): number {
  const interval = emissionIntervalMs(params);
  const start = Math.max(tat ?? now, now);
  // In whole tokens (a hair of float slack so exact multiples count).
  return Math.max(0, Math.floor((now + params.burst * interval - start) / interval + 1e-9));
}

/** TATs kept before those in the past are forgotten (ForgetfulMap). */
const MAX_TATS = 10_000;

/**
 * A rate kept in this process: GCRA over an injected clock (performance.now by default). `unknownStartsEmpty`: an
 * origin it has no TAT for starts with its burst spent (TAT at now + burst × interval), so its first token comes one
 * interval on. A fleet member's share while Redis is down is such a rate: the fleet's burst may have just been spent
 * in Redis, and a full burst of each member's share on top of it went past the fleet's rate at every outage's start.
 */
export class LocalGcra {
  /**
   * Origins whose TAT is past are back to a full burst, the same as never asked: those are forgotten. (Starting
   * empty, a forgotten origin starts empty again: stricter, never past the rate.)
   */
  #tat = new ForgetfulMap<string, number>(MAX_TATS, (tat, now) => tat < now);
  #now: () => number;
  #unknownStartsEmpty: boolean;

  constructor(now: () => number = () => performance.now(), options: { unknownStartsEmpty?: boolean } = {}) {
    this.#now = now;
    this.#unknownStartsEmpty = options.unknownStartsEmpty ?? false;
  }

  /** Tokens a take could be granted now (gcraRoom). */
  room(key: string, params: RateParams): number {
    return gcraRoom(this.#tatOf(key, this.#now(), params), this.#now(), params);
  }

  take(key: string, wanted: number, params: RateParams): Grant {
    const now = this.#now();
    const result = gcraTake(this.#tatOf(key, now, params), now, wanted, params);
    this.#tat.set(key, result.tat, now);
    return { granted: result.granted, waitMs: result.waitMs };
  }

  #tatOf(key: string, now: number, params: RateParams): number | undefined {
    const tat = this.#tat.get(key);
    if (tat !== undefined || !this.#unknownStartsEmpty) return tat;
    return now + params.burst * emissionIntervalMs(params);
  }
}
