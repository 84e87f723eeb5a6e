// The caller's loop lag that decides where SockpoolClient runs requests made while others run
// (client/loop-responsiveness.ts): pure logic on a fake clock. The client's use of it, with a real daemon and a
// blocked worker thread, is in test/client-inline.test.ts.
import { describe, expect, it } from 'vitest';
import {
  LAG_LIMIT_MS,
  type LoopClock,
  LoopResponsiveness,
  PROBE_INTERVAL_MS,
  SLOW_HOLD_MS,
} from '../client/loop-responsiveness.js';

/** Timers that fire only when the test says so, each at the time the test sets. */
class FakeClock implements LoopClock {
  time = 0;
  readonly pending = new Map<number, { callback: () => void; at: number }>();
  #next = 1;
  now(): number {
    return this.time;
  }
  setTimeout(callback: () => void, ms: number): unknown {
    const handle = this.#next++;
    this.pending.set(handle, { callback, at: this.time + ms });
    return handle;
  }
  clearTimeout(handle: unknown): void {
    this.pending.delete(handle as number);
  }
  /** The pending timer fires `lateMs` after it was due (the loop was held that long). */
  fire(lateMs = 0): void {
    expect(this.pending.size).toBe(1);
    const [handle, timer] = [...this.pending][0]!;
    this.pending.delete(handle);
    this.time = timer.at + lateMs;
    timer.callback();
  }
}

function setUp(): { clock: FakeClock; loop: LoopResponsiveness; inFlight: { now: boolean } } {
  const clock = new FakeClock();
  const inFlight = { now: true };
  return { clock, loop: new LoopResponsiveness(() => inFlight.now, clock), inFlight };
}

describe('LoopResponsiveness', () => {
  it('keeps no timer until a request starts, and one at a time while requests are in flight', () => {
    const { clock, loop, inFlight } = setUp();
    expect(clock.pending.size).toBe(0);
    expect(loop.responsive).toBe(true);
    loop.watch();
    loop.watch();
    expect(clock.pending.size).toBe(1);
    clock.fire();
    expect(clock.pending.size).toBe(1);
    inFlight.now = false;
    clock.fire();
    // The first probe that finds nothing in flight schedules none: an idle client wakes nothing.
    expect(clock.pending.size).toBe(0);
    loop.watch();
    expect(clock.pending.size).toBe(1);
  });

  it('a probe late past the lag limit sends requests to the threads for the hold, then here again', () => {
    const { clock, loop } = setUp();
    loop.watch();
    clock.fire(LAG_LIMIT_MS);
    expect(loop.responsive).toBe(true);
    clock.fire(LAG_LIMIT_MS + 1);
    const lateAt = clock.time;
    expect(loop.responsive).toBe(false);
    // Prompt probes within the hold do not end it.
    clock.fire();
    expect(loop.responsive).toBe(false);
    clock.time = lateAt + SLOW_HOLD_MS - 1;
    expect(loop.responsive).toBe(false);
    clock.time = lateAt + SLOW_HOLD_MS;
    expect(loop.responsive).toBe(true);
  });

  it('measures each probe from when it was scheduled, every PROBE_INTERVAL_MS', () => {
    const { clock, loop } = setUp();
    clock.time = 1_000;
    loop.watch();
    expect([...clock.pending.values()][0]!.at).toBe(1_000 + PROBE_INTERVAL_MS);
    clock.fire(3);
    expect([...clock.pending.values()][0]!.at).toBe(1_000 + 2 * PROBE_INTERVAL_MS + 3);
  });

  it('close() cancels the pending probe, and nothing probes after it', () => {
    const { clock, loop } = setUp();
    loop.watch();
    loop.close();
    expect(clock.pending.size).toBe(0);
    loop.watch();
    expect(clock.pending.size).toBe(0);
  });
});
