// The wait for a hung relay thread's end after terminate() (daemon/tls-relay.ts, ended): counted in the thread's
// available time, so a thread kept waiting for a CPU is given the time it waited, but within a bound of wall time,
// since the thread's handshakes (their fds, their places) wait with it. A real worker blocked in read(2) on a FIFO
// (terminate() cannot reach it), its wait for a CPU stood in for by fake readings (a thread that never gets a CPU).

import { execFileSync } from 'node:child_process';
import {
  closeSync,
  constants,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { expect, it } from 'vitest';
import type { ThreadWaitReading } from '../daemon/relay-clock.js';
import { ended } from '../daemon/tls-relay.js';
import { eventually } from './helpers/daemon.js';

/** Whether this process's thread named `name` is in read(2) (x86-64's syscall 0) now. */
function inRead(name: string): boolean {
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      if (readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim() !== name) continue;
      return readFileSync(`/proc/self/task/${tid}/syscall`, 'utf8').startsWith('0 ');
    } catch {
      // (A thread that ended meanwhile.)
    }
  }
  return false;
}

/**
 * A worker blocked in read(2) on a FIFO (terminate() cannot reach it), given to `check` with `release`, which lets
 * it go (it then ends: a terminate() already called still stands).
 */
async function withBlockedWorker(check: (worker: Worker, release: () => void) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'relay-terminate-'));
  const fifo = join(dir, 'block');
  execFileSync('mkfifo', [fifo]);
  const blocked = new Worker(
    `const fs = require('node:fs');
    require('node:worker_threads').parentPort.postMessage('blocking');
    fs.readSync(fs.openSync(${JSON.stringify(fifo)}, fs.constants.O_RDWR), Buffer.alloc(1));`,
    { eval: true, name: 'fifo-reader' },
  );
  try {
    await new Promise((resolve) => blocked.once('message', resolve));
    // In read(2) itself, not only on its way (terminate() would end it there).
    await eventually(() => inRead('fifo-reader'), 'the worker blocked in read(2)');
    await check(blocked, () => writeFileSync(fifo, 'x'));
  } finally {
    // A failed check leaves the worker blocked: let it go (no reader any more: ENXIO, nothing to do).
    try {
      const writer = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
      writeSync(writer, 'x');
      closeSync(writer);
    } catch {}
    rmSync(dir, { recursive: true, force: true });
  }
}

it('gives up on a thread that never gets a CPU after the wall limit, and sees one that ends within it', async () => {
  await withBlockedWorker(async (blocked, release) => {
    const since = performance.now();
    // All of its time a wait for a CPU, added to its run_delay as it goes: its available time never passes the
    // limit, only the wall limit ends the wait.
    const starved = (): ThreadWaitReading => ({ waitedMs: performance.now() - since, ranMs: 0, runnable: false });
    expect(await ended(blocked, 50, { waitReading: starved, wallLimitMs: 400 })).toBe(false);
    release();
    expect(await ended(blocked, 50, { waitReading: starved, wallLimitMs: 60_000 })).toBe(true);
  });
});

// The kernel adds a wait to run_delay only when the thread next gets a CPU: a thread kept waiting all along reads
// runnable, with its time on a CPU and its run_delay where they were. Counted by run_delay alone, that wait was
// silence, and the thread's time to end ran out while it had had none of it.
it('gives a thread runnable at every reading, its run_delay still, the wait under way: it ends within it', async () => {
  await withBlockedWorker(async (blocked, release) => {
    let readings = 0;
    const keptWaiting = (): ThreadWaitReading => {
      // Let go once it has been found kept waiting for a CPU twice past terminate().
      if (++readings === 3) release();
      return { waitedMs: 0, ranMs: 40, runnable: true };
    };
    expect(await ended(blocked, 50, { waitReading: keptWaiting, wallLimitMs: 60_000 })).toBe(true);
    expect(readings).toBeGreaterThanOrEqual(3);
  });
});

// A starved thread (nice 10 beside busy loops) runs a little now and then and waits for a CPU between: when read it is
// runnable, its time on a CPU moved since the last reading, and the wait it is in is not in its run_delay yet (the
// kernel adds it once the thread runs). Counted as silence, that wait used up the thread's time to end while it had run
// a few ms of it (a thread said left running long before the wall limit, in a whole test run); it now counts as a wait
// until a reading tells.
it('gives a thread that runs a little between readings, kept waiting between, the wait under way: it ends within it', async () => {
  await withBlockedWorker(async (blocked, release) => {
    const since = performance.now();
    let readings = 0;
    let runs = 0;
    let lastAt: number | undefined;
    const runsBetweenWaits = (): ThreadWaitReading => {
      const at = performance.now() - since;
      // It ran 1 ms just after each earlier reading, waiting for a CPU all the rest: its run_delay holds the waits up
      // to its last run, the one since is under way.
      const waitedMs = lastAt === undefined ? 0 : Math.max(0, lastAt - runs);
      if (lastAt !== undefined) runs++;
      lastAt = at;
      // Let go once it has been read so three times past terminate().
      if (++readings === 4) release();
      return { waitedMs, ranMs: 40 + runs, runnable: true };
    };
    expect(await ended(blocked, 50, { waitReading: runsBetweenWaits, wallLimitMs: 60_000 })).toBe(true);
    expect(readings).toBeGreaterThanOrEqual(4);
  });
});
