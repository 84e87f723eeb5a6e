// The relay threads' available time (daemon/relay-clock.ts), from fake readings: wall time less the time a thread
// waited for a CPU. The real threads' readings are in test/daemon-trust-relay-cpu ("kept waiting for a CPU").

import { describe, expect, it } from 'vitest';
import {
  availableSilenceMs,
  ownTid,
  RelayAvailableClock,
  SHARE_CLOCK_READ_MS,
  schedstatAvailable,
  threadRunDelayMs,
} from '../daemon/relay-clock.js';

describe('availableSilenceMs', () => {
  it('is wall time less the wait for a CPU since the beat', () => {
    // 6 s of wall time, 5.5 s of it waiting on the run queue: 0.5 s the thread could have run.
    expect(availableSilenceMs(16_000, 10_000, 7_500, 2_000)).toBe(500);
  });

  it('is wall time when a thread never waited (a busy loop alone on a CPU, a thread blocked in a system call)', () => {
    expect(availableSilenceMs(16_000, 10_000, 2_000, 2_000)).toBe(6_000);
  });

  it('is wall time without both readings, and never below 0', () => {
    expect(availableSilenceMs(16_000, 10_000, undefined, 2_000)).toBe(6_000);
    expect(availableSilenceMs(16_000, 10_000, 7_500, undefined)).toBe(6_000);
    // A wait counted when the thread next ran may hold some from before the beat.
    expect(availableSilenceMs(11_000, 10_000, 4_000, 2_000)).toBe(0);
    expect(availableSilenceMs(11_000, 10_000, 1_000, 2_000)).toBe(1_000);
  });
});

describe('RelayAvailableClock', () => {
  function clock() {
    let wall = 1_000;
    const waits = new Map<string, number | undefined>();
    const relayClock = new RelayAvailableClock(() => wall);
    return {
      waits,
      advance: (ms: number) => {
        wall += ms;
      },
      now: () => relayClock.now(() => waits.entries()),
      standsStillMs: () => relayClock.standsStillMs,
    };
  }

  it('moves as wall time while the threads do not wait, and with no thread', () => {
    const c = clock();
    const start = c.now();
    c.advance(1_000);
    expect(c.now()).toBe(start + 1_000);
    c.waits.set('a', 10);
    c.now();
    c.advance(2_000);
    expect(c.now()).toBe(start + 3_000);
  });

  it('moves by wall time less the mean wait of the threads', () => {
    const c = clock();
    c.waits.set('a', 0);
    c.waits.set('b', 0);
    const start = c.now();
    c.advance(4_000);
    // One thread kept waiting 3.6 s of the 4, the other idle (not waiting): the threads' time is 4 − 1.8.
    c.waits.set('a', 3_600);
    expect(c.now()).toBe(start + 2_200);
  });

  it('never goes back, and counts a new thread from its first reading', () => {
    const c = clock();
    c.waits.set('a', 0);
    const start = c.now();
    c.advance(1_000);
    c.waits.set('a', 5_000);
    expect(c.now()).toBe(start);
    c.waits.set('b', 9_000);
    c.advance(1_000);
    c.waits.set('a', 5_500);
    // a waited 500 ms, b (new) is not counted yet.
    expect(c.now()).toBe(start + 500);
    // A thread gone (or its reading unknown) leaves the mean.
    c.waits.delete('a');
    c.waits.set('b', undefined);
    c.advance(1_000);
    expect(c.now()).toBe(start + 1_500);
  });

  it('reads at most once per SHARE_CLOCK_READ_MS, standing still between', () => {
    const c = clock();
    const start = c.now();
    c.advance(SHARE_CLOCK_READ_MS - 1);
    expect(c.now()).toBe(start);
    expect(c.standsStillMs()).toBe(1);
    c.advance(1);
    expect(c.now()).toBe(start + SHARE_CLOCK_READ_MS);
    expect(c.standsStillMs()).toBe(SHARE_CLOCK_READ_MS);
  });
});

describe('the readings', () => {
  it('read this thread: its tid, and its wait from its schedstat', () => {
    // (This kernel keeps schedstat; a kernel without it falls back to wall time: daemon/tls-relay.ts.)
    expect(schedstatAvailable()).toBe(true);
    const tid = ownTid();
    expect(tid).toBeGreaterThan(0);
    expect(threadRunDelayMs(tid)).toBeGreaterThanOrEqual(0);
    expect(threadRunDelayMs(0)).toBeUndefined();
    expect(threadRunDelayMs(2 ** 31 - 2)).toBeUndefined();
  });
});
