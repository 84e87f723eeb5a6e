// The daemon's waits for a rate-limited origin's tokens (daemon/fleet/rate-limiter.ts), on vitest's fake clock: one
// queue per origin whose head alone asks for the next token (N waiters and a token due: one ask, one timer, not N),
// served fair across uids (a uid with one waiter is not served after every waiter of a uid with many), a waiter
// whose turn cannot come before its deadline refused at once, a cancelled one gone at once; alone and as a fleet
// member whose tokens come asynchronously (Redis's answer, here a stub over a GCRA on the same clock).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { parseConfig } from '../daemon/config.js';
import { LocalGcra } from '../daemon/fleet/gcra.js';
import { RateLimiter } from '../daemon/fleet/rate-limiter.js';
import { ErrorCodes } from '../shared/errors.js';
import type { RateParams } from '../shared/rate.js';
import { useFakeClock } from './fixtures/fake-clock.js';

const origin = { host: 'slow.example', port: 443 };
/** 10 requests/s: a token every 100 ms, one at a time. */
const config = parseConfig(
  { pool: { origins: [{ match: 'slow.example:443', requestsPerSecond: 10, burst: 1 }] } },
  'test',
);
const INTERVAL = 100;

/** A fleet whose Redis answers a turn later, from a GCRA on the test's clock; counts its asks. */
function stubFleet() {
  const gcra = new LocalGcra(() => performance.now());
  const fleet = {
    asks: 0,
    async takeTokens(key: string, params: RateParams, wanted: number) {
      fleet.asks++;
      await new Promise((resolve) => setImmediate(resolve));
      return gcra.take(key, wanted, params);
    },
  };
  return fleet;
}

type Mode = 'alone' | 'fleet member';

function limiterFor(mode: Mode) {
  const fleet = mode === 'fleet member' ? stubFleet() : undefined;
  const limiter = new RateLimiter(config, fleet as unknown as ConstructorParameters<typeof RateLimiter>[1]);
  return { limiter, fleet, params: limiter.paramsFor(origin)! };
}

/** A take whose outcome the test reads without awaiting it. */
function waiter(limiter: RateLimiter, params: RateParams, uid: number, timeoutMs = 60_000, signal?: AbortSignal) {
  const state: { granted?: number; error?: { code?: string; fields?: Record<string, unknown> } } = {};
  limiter.take(origin, params, 1, timeoutMs, signal, uid).then(
    (granted) => {
      state.granted = granted;
    },
    (error) => {
      state.error = error;
    },
  );
  return state;
}

/** Lets the fleet stub's setImmediate answers and the promises after them run (setImmediate is not faked). */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

describe.each<Mode>(['alone', 'fleet member'])('token waits (%s)', (mode) => {
  beforeEach(() => useFakeClock());
  afterEach(() => {
    vi.restoreAllMocks();
    vi.useRealTimers();
  });

  it('N waiters and one token due: the head alone asks and sets a timer, not every waiter', async () => {
    const { limiter, fleet, params } = limiterFor(mode);
    // The burst's one token goes at once; the next is due in 100 ms.
    expect(await limiter.take(origin, params, 1, 60_000, undefined, 1)).toBe(1);
    const waiters = Array.from({ length: 50 }, () => waiter(limiter, params, 1));
    await settle();
    const timers = vi.spyOn(globalThis, 'setTimeout');
    const asksBefore = fleet?.asks ?? 0;
    await vi.advanceTimersByTimeAsync(INTERVAL);
    await settle();
    expect(waiters.filter((w) => w.granted === 1)).toHaveLength(1);
    // One wake-up for the token due (and the next one's timer), not one per waiter.
    expect(timers.mock.calls.length).toBeLessThanOrEqual(2);
    if (fleet) expect(fleet.asks - asksBefore).toBeLessThanOrEqual(2);
    // The rest are served one per interval, in arrival order (one uid).
    for (let i = 0; i < 10; i++) {
      await vi.advanceTimersByTimeAsync(INTERVAL);
      await settle();
    }
    expect(waiters.slice(0, 11).every((w) => w.granted === 1)).toBe(true);
    expect(waiters.slice(11).every((w) => w.granted === undefined && w.error === undefined)).toBe(true);
  });

  it('a uid with one waiter gets the next token, not one after every waiter of a uid with many', async () => {
    const { limiter, params } = limiterFor(mode);
    expect(await limiter.take(origin, params, 1, 60_000, undefined, 1)).toBe(1);
    const many = Array.from({ length: 20 }, () => waiter(limiter, params, 1));
    await settle();
    // Two tokens go to uid 1 (nobody else waits), then uid 2 asks.
    await vi.advanceTimersByTimeAsync(INTERVAL * 2);
    await settle();
    expect(many.filter((w) => w.granted === 1)).toHaveLength(2);
    const other = waiter(limiter, params, 2);
    await settle();
    await vi.advanceTimersByTimeAsync(INTERVAL);
    await settle();
    expect(other.granted).toBe(1);
    expect(many.filter((w) => w.granted === 1)).toHaveLength(2);
    // Then they take turns: uid 2 asking again waits behind one more of uid 1's.
    const again = waiter(limiter, params, 2);
    await settle();
    await vi.advanceTimersByTimeAsync(INTERVAL);
    await settle();
    expect(many.filter((w) => w.granted === 1)).toHaveLength(3);
    expect(again.granted).toBeUndefined();
    await vi.advanceTimersByTimeAsync(INTERVAL);
    await settle();
    expect(again.granted).toBe(1);
  });

  it('a waiter whose turn comes after its deadline fails at once with the wait; a cancelled one leaves at once', async () => {
    const { limiter, params } = limiterFor(mode);
    expect(await limiter.take(origin, params, 1, 60_000, undefined, 1)).toBe(1);
    // Next token in 100 ms, then one each 100 ms: of uid 1's waiters with 250 ms, the first two can make it.
    // (The first asks alone: a fleet member learns when the next token is due from Redis's answer.)
    const waiters = [waiter(limiter, params, 1, 250)];
    await settle();
    waiters.push(...Array.from({ length: 9 }, () => waiter(limiter, params, 1, 250)));
    await settle();
    expect(waiters.slice(0, 2).every((w) => w.error === undefined)).toBe(true);
    for (const w of waiters.slice(2)) {
      expect(w.error).toMatchObject({ code: ErrorCodes.RATE_LIMITED, fields: { origin: 'slow.example:443' } });
      // The wait it would have needed: its turn (after the two queued), at the earliest.
      expect(w.error!.fields!.waitMs).toBeGreaterThanOrEqual(3 * INTERVAL - 1);
    }
    // Another uid's waiter is not behind uid 1's in the estimate.
    const other = waiter(limiter, params, 2, 150);
    // A cancelled wait fails at once and takes no token: the next one goes to the waiter after it.
    const cancel = new AbortController();
    const cancelled = waiter(limiter, params, 3, 60_000, cancel.signal);
    await settle();
    expect(other.error).toBeUndefined();
    cancel.abort();
    await settle();
    expect(cancelled.error).toMatchObject({ code: ErrorCodes.ABORTED });
    // uid 2 (the fewest tokens of those waiting) gets the next token, uid 1's first waiter the one after; its
    // second, pushed back past its deadline by uid 2's turn, fails as soon as the next token is known to come later.
    await vi.advanceTimersByTimeAsync(INTERVAL);
    await settle();
    expect([other.granted, waiters[0]!.granted]).toEqual([1, undefined]);
    await vi.advanceTimersByTimeAsync(INTERVAL);
    await settle();
    expect(waiters[0]!.granted).toBe(1);
    expect(waiters[1]!.error).toMatchObject({ code: ErrorCodes.RATE_LIMITED, fields: { waitMs: INTERVAL } });
    expect(limiter.counters).toMatchObject({ granted: 3, limited: 9 });
  });
  it('a waiter pushed back past its deadline by other uids’ turns fails at that deadline, not later', async () => {
    const { limiter, params } = limiterFor(mode);
    expect(await limiter.take(origin, params, 1, 60_000, undefined, 1)).toBe(1);
    const first = waiter(limiter, params, 1);
    await settle();
    const second = waiter(limiter, params, 1, 250);
    // Two uids come: each gets a turn before uid 1's, which pushes uid 1's second past its 250 ms.
    const others = [waiter(limiter, params, 2), waiter(limiter, params, 3)];
    await settle();
    expect(second.error).toBeUndefined();
    await vi.advanceTimersByTimeAsync(INTERVAL * 2);
    await settle();
    expect(others.map((w) => w.granted)).toEqual([1, 1]);
    expect(second.error).toBeUndefined();
    await vi.advanceTimersByTimeAsync(INTERVAL / 2);
    expect(second.error).toMatchObject({ code: ErrorCodes.RATE_LIMITED });
    expect(second.error!.fields!.waitMs).toBeGreaterThanOrEqual(INTERVAL / 2);
    await vi.advanceTimersByTimeAsync(INTERVAL / 2);
    await settle();
    expect(first.granted).toBe(1);
  });
});

describe('token waits of a fleet member whose Redis refuses', () => {
  it('a refused ask fails the head that asked; the next waiter asks again', async () => {
    let asks = 0;
    const fleet = {
      async takeTokens() {
        asks++;
        await new Promise((resolve) => setImmediate(resolve));
        if (asks === 1) throw Object.assign(new Error('fleet unavailable'), { code: ErrorCodes.FLEET_UNAVAILABLE });
        return { granted: 1, waitMs: 0 };
      },
    };
    const limiter = new RateLimiter(config, fleet as unknown as ConstructorParameters<typeof RateLimiter>[1]);
    const params = limiter.paramsFor(origin)!;
    const first = limiter.take(origin, params, 1, 1_000, undefined, 1);
    const second = limiter.take(origin, params, 1, 1_000, undefined, 2);
    await expect(first).rejects.toMatchObject({ code: ErrorCodes.FLEET_UNAVAILABLE });
    expect(await second).toBe(1);
    expect(asks).toBe(2);
  });
});
