// The wait for a hung relay thread's end after terminate() (daemon/tls-relay.ts, ended): counted in the thread's
// available time, so a thread kept waiting for a CPU is given the time it waited, but within a bound of wall time,
// since the thread's handshakes (their fds, their places) wait with it. A real worker blocked in read(2) on a FIFO
// (terminate() cannot reach it), its wait for a CPU stood in for by a reading that grows with wall time (a thread
// that never gets a CPU).

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

it('gives up on a thread that never gets a CPU after the wall limit, and sees one that ends within it', async () => {
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
    const since = performance.now();
    // All of its time a wait for a CPU: its available time never passes the limit, only the wall limit ends the wait.
    const starved = () => performance.now() - since;
    expect(await ended(blocked, 50, { runDelayMs: starved, wallLimitMs: 400 })).toBe(false);
    // Let go: it ends (the terminate() above still stands).
    writeFileSync(fifo, 'x');
    expect(await ended(blocked, 50, { runDelayMs: starved, wallLimitMs: 60_000 })).toBe(true);
  } finally {
    // A failed check leaves the worker blocked: let it go (no reader any more: ENXIO, nothing to do).
    try {
      const writer = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
      writeSync(writer, 'x');
      closeSync(writer);
    } catch {}
    rmSync(dir, { recursive: true, force: true });
  }
});
