// The watch that unsticks curl 7.88's HTTP/2 transfers after a resumed pause (worker/h2-stall-watch.ts): a transfer
// that is running, not paused and received nothing for an interval is kicked; a paused one is not; a finished one
// is dropped. The real stall is covered by test/warm-tls-streaming.test.ts.
import { describe, expect, it, vi } from 'vitest';
import { H2StallWatch, type StallWatched } from '../worker/h2-stall-watch.js';

function transfer(state: { paused?: boolean; running?: boolean }, onKick: () => void = () => {}) {
  const watched: StallWatched & { kicks: number } = {
    received: 0,
    kicks: 0,
    running: () => state.running !== false,
    paused: () => state.paused === true,
    kick: () => {
      watched.kicks++;
      onKick();
    },
  };
  return watched;
}

describe('H2StallWatch', () => {
  it('kicks a stalled transfer, never a paused one, and drops finished ones', async () => {
    const watch = new H2StallWatch(5);
    try {
      let kicked!: () => void;
      const twice = new Promise<void>((resolve) => {
        kicked = resolve;
      });
      const stalled = transfer({}, () => {
        if (stalled.kicks === 2) kicked();
      });
      const paused = transfer({ paused: true });
      const finished = { running: false };
      const done = transfer(finished);
      for (const t of [stalled, paused, done]) watch.watch(t);
      watch.watch(stalled); // (idempotent)
      await twice;
      expect(paused.kicks).toBe(0);
      expect(done.kicks).toBe(0);
      expect(watch.kicks).toBeGreaterThanOrEqual(2);
    } finally {
      watch.close();
    }
  });
});

describe('H2StallWatch, a transfer watched for less than an interval', () => {
  it('is not kicked at the first tick after it came: only once it received nothing for a whole interval', () => {
    // Found in review (sixteenth session): relayed HTTP/2 transfers are watched from their start, and one added just
    // before a tick was kicked at it, having received nothing only because it had just begun (maybe before curl gave
    // it a connection, where curl_easy_pause answers CURLE_BAD_FUNCTION_ARGUMENT and the kick fails the transfer).
    vi.useFakeTimers();
    const watch = new H2StallWatch(100);
    try {
      const early = transfer({});
      watch.watch(early);
      vi.advanceTimersByTime(90);
      const late = transfer({});
      watch.watch(late);
      vi.advanceTimersByTime(10); // the first tick: `early` silent for 100 ms (it started the timer), `late` for 10
      expect({ early: early.kicks, late: late.kicks }).toEqual({ early: 1, late: 0 });
      vi.advanceTimersByTime(100); // both silent for a whole interval since that tick
      expect({ early: early.kicks, late: late.kicks }).toEqual({ early: 2, late: 1 });
    } finally {
      watch.close();
      vi.useRealTimers();
    }
  });
});
