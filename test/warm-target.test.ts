// The predictive idle target (daemon/warm-target.ts): pure arithmetic, no sockets.
import { describe, expect, it } from 'vitest';
import { predictedTarget, REPEAT_ACQUIRES, rateForTarget } from '../daemon/warm-target.js';

const WINDOW_MS = 10_000;

describe('predictedTarget', () => {
  it('keeps nothing for an origin whose unannounced acquires did not repeat within the window', () => {
    // One acquire just now: rate × window = 1 (the old threshold, 0.05 acquires a second, kept a socket for it).
    expect(predictedTarget(1000 / WINDOW_MS, 20, WINDOW_MS)).toBe(0);
    expect(predictedTarget(((REPEAT_ACQUIRES - 0.01) * 1000) / WINDOW_MS, 20, WINDOW_MS)).toBe(0);
    expect(predictedTarget(0, 20, WINDOW_MS)).toBe(0);
    // The same rate over a longer window is more acquires within it: repeated.
    expect(predictedTarget(1000 / WINDOW_MS, 20, 2 * WINDOW_MS)).toBe(1);
  });

  it('follows repeated demand: ⌈acquires per connect × 2⌉, and a spare where a second one per connect is likely', () => {
    // Two acquires within the window, fast connects: one socket, no spare (0.2/s × 20 ms = 0.004 per connect).
    expect(predictedTarget(2000 / WINDOW_MS, 20, WINDOW_MS)).toBe(1);
    // 1 acquire/s, 1 s connects: ⌈1 × 2⌉ + 1.
    expect(predictedTarget(1, 1_000, WINDOW_MS)).toBe(3);
    // 100/s, 10 ms connects: ⌈2⌉ + 1.
    expect(predictedTarget(100, 10, WINDOW_MS)).toBe(3);
    // A connect time of 0 counts as 1 ms.
    expect(predictedTarget(1_000, 0, WINDOW_MS)).toBe(3);
  });
});

describe('rateForTarget', () => {
  it('inverts predictedTarget: the highest rate whose target is at most the one granted', () => {
    for (const connectMs of [1, 10, 20, 250, 1_000]) {
      for (const target of [2, 3, 5, 16]) {
        const rate = rateForTarget(target, connectMs, WINDOW_MS);
        if (rate === 0) continue;
        expect(predictedTarget(rate, connectMs, WINDOW_MS), `${target} at ${connectMs} ms`).toBe(target);
        expect(predictedTarget(rate * 1.01, connectMs, WINDOW_MS)).toBe(target + 1);
      }
    }
    expect(rateForTarget(1, 10, WINDOW_MS)).toBe(0);
  });

  it('gives 0 where even the least repeating rate asks for more than the target (very slow connects)', () => {
    // 30 s connects: 1.5 acquires in 10 s is 0.15/s, 4.5 per connect: a target of 2 cannot be had.
    expect(rateForTarget(2, 30_000, WINDOW_MS)).toBe(0);
  });
});
