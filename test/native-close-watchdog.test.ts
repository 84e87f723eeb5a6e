// The close watchdog (native startCloseWatchdog): a close that waits out a linger the addon could not turn off ends
// anyway. Here the kernel itself drops a lingering TCP socket queued in a Unix socket that a process closes unread
// (native.close, not discard: nothing drains the queue first), the stand-in for every such close no DisarmLinger
// reaches (a client setting SO_LINGER again on its copy of a lent socket between the daemon's disarm and its close).
// The linger is 600 s; without the watchdog the close would return after it, and the test would time out.
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { spawnChild } from './helpers/children.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** The first line of `child`'s stdout that is `line` (resolves), or its exit first (rejects). */
function nextLine(child: ChildProcess, line: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let text = '';
    const onData = (chunk: Buffer) => {
      text += chunk.toString();
      if (text.split('\n').includes(line)) {
        child.stdout!.off('data', onData);
        child.off('exit', onExit);
        resolve();
      }
    };
    const onExit = (code: number | null) => reject(new Error(`exited (${code}) before printing ${line}`));
    child.stdout!.on('data', onData);
    child.once('exit', onExit);
  });
}

describe('the close watchdog', () => {
  // Parked: after about a second with no watched call the watchdog sleeps until the next one wakes it, so that an
  // idle daemon does not wake 40 times a second (test/daemon-idle).
  it.each([
    ['running', 0],
    ['parked (idle for 2 s before the close)', 2_000],
  ])(
    "ends a close that waits for a lingering socket's linger (dropped by the kernel, never disarmed), the watchdog %s",
    async (_state, idleMs) => {
      const socketPath = join(tmpdir(), `sockpool-close-watchdog-${process.pid}.sock`);
      rmSync(socketPath, { force: true });
      cleanups.push(() => rmSync(socketPath, { force: true }));
      const closer = spawnChild(
        process.execPath,
        [join(import.meta.dirname, 'fixtures', 'close-lingering.mjs'), socketPath, 'watchdog'],
        {
          stdio: ['pipe', 'pipe', 'inherit'],
        },
      );
      cleanups.push(() => closer.kill('SIGKILL'));
      await nextLine(closer, 'listening');
      const sender = spawnChild(
        'python3',
        [join(import.meta.dirname, 'fixtures', 'linger-client.py'), 'send', socketPath, '600'],
        {
          stdio: ['ignore', 'pipe', 'inherit'],
        },
      );
      cleanups.push(() => sender.kill());
      await nextLine(sender, 'sent');
      await sleep(idleMs);
      closer.stdin!.write('go\n');
      // (A close still waiting out the 600 s linger prints nothing; the test's timeout then fails it.)
      await nextLine(closer, 'closed');
      const [code] = await once(closer, 'exit');
      expect(code).toBe(0);
    },
    30_000,
  );
});
