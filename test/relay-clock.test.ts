// The relay threads' available time (daemon/relay-clock.ts), from fake readings: wall time less the time a thread
// waited for a CPU. The real threads' readings are in test/daemon-trust-relay-cpu ("kept waiting for a CPU").

import { once } from 'node:events';
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import {
  availableSilenceMs,
  ownThreadIds,
  ownTid,
  RelayAvailableClock,
  SHARE_CLOCK_READ_MS,
  schedstatAvailable,
  startedTid,
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

  // How TlsRelays learns a relay thread's tid before the thread runs a line of it (its start judged in its available
  // time from its spawn): the one thread new Worker() added, which is there once the constructor returns.
  it("finds a thread started since a listing by the one tid added: a worker's, as the worker reads its own", async () => {
    const before = ownThreadIds();
    // The worker stays alive until terminated: one that ended after posting its tid was gone (its schedstat with
    // it) when a clean-clone run read its wait.
    const worker = new Worker(
      `const { readlinkSync } = require('node:fs');
      require('node:worker_threads').parentPort.postMessage(Number(readlinkSync('/proc/thread-self').split('/').pop()));
      setInterval(() => {}, 60_000);`,
      { eval: true },
    );
    const tid = startedTid(before);
    const [own] = (await once(worker, 'message')) as [number];
    expect(tid).toBeGreaterThan(0);
    expect(tid).toBe(own);
    // A new thread's wait for a CPU counts from its start (what TlsRelays takes as the start's whole wait).
    expect(threadRunDelayMs(tid)).toBeGreaterThanOrEqual(0);
    await worker.terminate();
  });

  it('finds none when none, or more than one, thread was started since the listing', async () => {
    const before = ownThreadIds();
    expect(startedTid(before)).toBe(0);
    expect(startedTid(undefined)).toBe(0);
    const workers = [0, 1].map(() => new Worker('', { eval: true }));
    expect(startedTid(before)).toBe(0);
    await Promise.all(workers.map((worker) => worker.terminate()));
  });
});
