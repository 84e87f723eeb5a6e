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
  ThreadSilence,
  type ThreadWaitReading,
  threadWaitReading,
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

describe('ThreadSilence', () => {
  /** A reading: its run_delay and time on a CPU (ms), runnable (state R) or not. */
  const read = (waitedMs: number, ranMs: number, runnable: boolean): ThreadWaitReading => ({
    waitedMs,
    ranMs,
    runnable,
  });

  it('is wall time since it was heard less its wait for a CPU since; a new thread waited 0 at its spawn', () => {
    const silence = new ThreadSilence(1_000, 0);
    // Its start waited 2 s of the 4 (asleep when read): 2 s of silence.
    silence.read(5_000, read(2_000, 40, false));
    expect(silence.wallMs(5_000)).toBe(4_000);
    expect(silence.silentMs(5_000)).toBe(2_000);
    silence.heard(5_000);
    silence.read(8_000, read(2_500, 45, false));
    expect(silence.silentMs(8_000)).toBe(2_500);
    // Its wait unknown at its spawn (no schedstat), or no reading at all: wall time.
    const unknown = new ThreadSilence(1_000, undefined);
    unknown.read(5_000, read(2_000, 40, false));
    expect(unknown.silentMs(5_000)).toBe(4_000);
    const unread = new ThreadSilence(1_000, 0);
    unread.read(5_000, undefined);
    expect(unread.silentMs(5_000)).toBe(4_000);
  });

  // The kernel adds a wait to run_delay only when the thread next gets a CPU: a relay thread (nice 10) runnable but
  // kept waiting on a loaded host for longer than tls.relayHangMs read no more wait than at its last beat, and the
  // watchdog took it for hung (ending every session it relayed) before it could run again.
  it('counts a thread runnable at the last check, and not run since, as waiting all along: it is never silent so', () => {
    const silence = new ThreadSilence(0, 0);
    silence.read(0, read(0, 50, true));
    silence.heard(0);
    for (let at = 1_000; at <= 10_000; at += 1_000) {
      silence.read(at, read(0, 50, true));
      expect(silence.silentMs(at)).toBe(0);
    }
    // It runs: the kernel adds the 10 s it waited (and 200 ms from before its beat), counted already.
    silence.read(11_000, read(10_200, 52, false));
    expect(silence.silentMs(11_000)).toBe(800);
    // Runnable when read again, asleep at the last check or run since: it may be waiting since its wake or its last
    // run, so the stretch less its run counts as a wait until a check tells; asleep, its run_delay holds all it waited.
    silence.read(12_000, read(10_200, 52, true));
    expect(silence.silentMs(12_000)).toBe(800);
    silence.read(13_000, read(10_200, 60, true));
    expect(silence.silentMs(13_000)).toBe(1_808);
    silence.read(14_000, read(10_500, 62, false));
    expect(silence.silentMs(14_000)).toBe(3_500);
  });

  // A wait begun between two checks (the thread asleep at the first, or run since): before, it was silence until the
  // thread ran again, so a thread woken into a long wait for a CPU came that much closer to being taken for hung, and
  // a hung thread's end after terminate() (ended(), read as the watchdog reads) to being said left running.
  it('never counts a wait begun between two checks as silence: the stretch less its run counts until a check tells', () => {
    const silence = new ThreadSilence(0, 0);
    silence.read(0, read(0, 50, false));
    silence.heard(0);
    // Woken 200 ms after the beat, kept waiting since: 200 ms of silence, at most.
    silence.read(1_000, read(0, 50, true));
    expect(silence.silentMs(1_000)).toBe(0);
    silence.read(2_000, read(0, 50, true));
    expect(silence.silentMs(2_000)).toBe(0);
    // It ran 5 ms after its 1.85 s wait and sleeps: its silence is known, 250 ms.
    silence.read(2_100, read(1_850, 55, false));
    expect(silence.silentMs(2_100)).toBe(250);
  });

  // The count at a reading may hold a wait under way that the thread had not begun (it runs, then waits): taken as the
  // start of the silence when the thread is heard, it would make a later silence longer than it was. What the thread
  // surely waited by then (its run_delay) is that start.
  it('starts a silence over from what the thread surely waited when heard, not from a wait that may be under way', () => {
    const silence = new ThreadSilence(0, 0);
    silence.read(0, read(0, 50, false));
    silence.heard(0);
    // Heard at 1 s, runnable and run since (10 ms): a wait may be under way. It ran until 0.9 s, then waited 1 s,
    // ran 10 ms and went to sleep: 100 ms of silence since it was heard.
    silence.read(1_000, read(0, 60, true));
    silence.heard(1_000);
    silence.read(2_000, read(1_000, 70, false));
    expect(silence.silentMs(2_000)).toBeLessThanOrEqual(100);
  });

  it('is silence as before for a thread that runs without beating (a loop) or sleeps (blocked in a system call)', () => {
    // A loop: runnable at every check and its time on a CPU moving; its waits count, the rest is silence.
    const loop = new ThreadSilence(0, 0);
    loop.read(0, read(0, 50, true));
    loop.heard(0);
    for (let at = 1_000; at <= 6_000; at += 1_000) loop.read(at, read(at / 10, 50 + at - at / 10, true));
    expect(loop.silentMs(6_000)).toBe(5_400);
    // Blocked: asleep at every check, its time on a CPU and its wait still: all silence.
    const blocked = new ThreadSilence(0, 0);
    blocked.read(0, read(0, 50, false));
    blocked.heard(0);
    for (let at = 1_000; at <= 6_000; at += 1_000) blocked.read(at, read(0, 50, false));
    expect(blocked.silentMs(6_000)).toBe(6_000);
    // Blocked after a last run seen runnable: the stretch it ran in is not a wait, the sleep after it neither.
    const slept = new ThreadSilence(0, 0);
    slept.read(0, read(0, 50, true));
    slept.heard(0);
    slept.read(1_000, read(0, 51, false));
    for (let at = 2_000; at <= 6_000; at += 1_000) slept.read(at, read(0, 51, false));
    expect(slept.silentMs(6_000)).toBe(6_000);
  });

  it('keeps the wait counted over a reading it could not take, and starts over when heard', () => {
    const silence = new ThreadSilence(0, 0);
    silence.read(0, read(0, 50, true));
    silence.heard(0);
    silence.read(1_000, read(0, 50, true));
    // (The thread gone from /proc, or its tid not known any more: the last count stands.)
    silence.read(2_000, undefined);
    expect(silence.silentMs(2_000)).toBe(1_000);
    silence.heard(2_000);
    silence.read(3_000, read(0, 50, true));
    // Runnable at the last reading (before the gap) and not run since: waited all along.
    expect(silence.silentMs(3_000)).toBe(0);
  });
});

describe('RelayAvailableClock', () => {
  /**
   * A clock over fake readings: `waits` each thread's run_delay (ms; undefined: unknown); `ran` its time on a CPU
   * (0 unless set), `runnable` the threads runnable when read (none unless added).
   */
  function clock() {
    let wall = 1_000;
    const waits = new Map<string, number | undefined>();
    const ran = new Map<string, number>();
    const runnable = new Set<string>();
    const relayClock = new RelayAvailableClock(() => wall);
    const readings = function* (): Iterable<[string, ThreadWaitReading | undefined]> {
      for (const [key, waitedMs] of waits) {
        yield [
          key,
          waitedMs === undefined ? undefined : { waitedMs, ranMs: ran.get(key) ?? 0, runnable: runnable.has(key) },
        ];
      }
    };
    return {
      waits,
      ran,
      runnable,
      advance: (ms: number) => {
        wall += ms;
      },
      now: () => relayClock.now(readings),
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
    c.waits.set('a', 800);
    c.now();
    c.advance(1_000);
    // A wait counted when the thread next ran may hold some of an earlier stretch's: the clock stands still.
    c.waits.set('a', 2_000);
    expect(c.now()).toBe(start + 200);
    c.waits.set('b', 9_000);
    c.advance(1_000);
    c.waits.set('a', 2_500);
    // a waited 500 ms, b (new) is not counted yet; the 200 ms counted past the last stretch are owed.
    expect(c.now()).toBe(start + 500);
    // A thread gone (or its reading unknown) leaves the mean.
    c.waits.delete('a');
    c.waits.set('b', undefined);
    c.advance(1_000);
    expect(c.now()).toBe(start + 1_500);
  });

  // The kernel adds a wait to run_delay only when the thread next gets a CPU. A relay thread (nice 10) kept waiting
  // for a second, read every SHARE_CLOCK_READ_MS or so while handshakes are dispatched: before, each reading in the
  // wait moved the clock as wall time and the wait, counted at once when the thread ran, could stop it for that one
  // stretch only; the rest was lost, and the clock ran ahead by most of every wait (a costly uid's cost then decayed
  // early: three handshakes under way in test/daemon-trust-relay-cpu under load).
  it('owes a wait counted after the stretches it was in: the clock gives them back over the next ones', () => {
    const c = clock();
    c.waits.set('a', 0);
    const start = c.now();
    // The thread asleep at the first reading, then waiting from just after it: not known to be waiting.
    for (let reading = 0; reading < 10; reading++) {
      c.advance(100);
      c.now();
    }
    c.advance(100);
    c.ran.set('a', 3);
    c.waits.set('a', 1_000);
    c.now();
    // 1.1 s of wall time, 1 s of it waiting: the readings in the wait moved the clock, the debt holds it until the
    // next second of the thread's time has paid it.
    for (let reading = 0; reading < 9; reading++) {
      c.advance(100);
      c.now();
    }
    c.advance(100);
    expect(c.now()).toBe(start + 1_100);
    c.advance(100);
    expect(c.now()).toBe(start + 1_200);
  });

  it('counts a thread runnable at the last reading, and not run since, as waiting all along: the clock stands still', () => {
    const c = clock();
    c.waits.set('a', 0);
    c.runnable.add('a');
    const start = c.now();
    for (let reading = 0; reading < 10; reading++) {
      c.advance(100);
      expect(c.now()).toBe(start);
    }
    // It runs: the kernel adds the second it waited, counted already; it ran 3 ms and went to sleep.
    c.advance(100);
    c.ran.set('a', 3);
    c.waits.set('a', 1_050);
    c.runnable.delete('a');
    expect(c.now()).toBe(start + 50);
    // Runnable when read, asleep at the last reading or run since: it may be waiting since its wake or its last run,
    // so the stretch less its run counts until a reading tells; asleep, its run_delay holds all it waited.
    c.runnable.add('a');
    c.advance(100);
    expect(c.now()).toBe(start + 50);
    c.ran.set('a', 5);
    c.advance(100);
    expect(c.now()).toBe(start + 152);
    c.runnable.delete('a');
    c.advance(100);
    expect(c.now()).toBe(start + 350);
  });

  // A wait that begins between two readings: the thread asleep at one (or running, its time on a CPU moving since),
  // runnable at the next, its wait not in run_delay until it runs again. Before, that stretch moved the clock as wall
  // time and the wait, once counted, was owed: the clock ran ahead of the thread's time by the wait under way, and the
  // dispatch decides at its readings (a costly uid's second handshake started so in a traced run of
  // test/daemon-trust-relay-cpu under load). Now a thread runnable when read may be waiting
  // since its last run: the stretch less its run (and less the waits it finished in it) counts as its wait until a
  // reading tells (asleep: every wait it had is in run_delay), so the clock is never ahead, at most behind by that.
  it("never runs ahead of the threads' time: a wait begun between two readings counts until a reading tells", () => {
    const c = clock();
    c.waits.set('a', 0);
    const start = c.now();
    // Asleep at the first reading; woken 200 ms later and kept waiting since: its time was 200 ms.
    c.advance(1_000);
    c.runnable.add('a');
    expect(c.now()).toBe(start);
    // It ran 10 ms (its 850 ms wait in run_delay now) and went to sleep: its time was 250 ms of the 1.1 s.
    c.advance(100);
    c.ran.set('a', 10);
    c.waits.set('a', 850);
    c.runnable.delete('a');
    expect(c.now()).toBe(start + 250);
    // Starved: it runs 10 ms in each stretch and waits again, runnable at every reading; run_delay holds each wait
    // only once it ran. Its time is its runs, and the clock never gets ahead of it.
    c.runnable.add('a');
    let truth = 250;
    for (let stretch = 1; stretch <= 5; stretch++) {
      c.advance(500);
      truth += 10;
      c.ran.set('a', 10 + 10 * stretch);
      // The waits it ended so far: 90 ms before its first run, 490 ms before each one after.
      c.waits.set('a', 850 + 90 + 490 * (stretch - 1));
      expect(c.now()).toBeLessThanOrEqual(start + truth);
    }
    // It runs once more and sleeps: all of its waits in run_delay, the clock at its time (3.7 s less 3.39 s).
    c.advance(100);
    c.ran.set('a', 70);
    c.waits.set('a', 850 + 90 + 490 * 5);
    c.runnable.delete('a');
    expect(c.now()).toBe(start + 310);
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
    // The share's clock's reading: this thread is running as it reads itself (state R), and has run.
    const reading = threadWaitReading(tid);
    expect(reading?.runnable).toBe(true);
    expect(reading?.ranMs).toBeGreaterThan(0);
    expect(reading?.waitedMs).toBeGreaterThanOrEqual(0);
    expect(threadWaitReading(0)).toBeUndefined();
    expect(threadWaitReading(2 ** 31 - 2)).toBeUndefined();
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
    expect(threadWaitReading(tid)?.waitedMs).toBeGreaterThanOrEqual(0);
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
