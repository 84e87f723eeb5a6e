// sockpoold stops on SIGTERM even when nobody reads its log any more (the journal restarted, or the process that
// piped its stderr died): pino's exit-time synchronous flush used to retry the write to the broken pipe for ever.
// A real daemon child process; its stdout and stderr pipes are closed on our side before the signal, which is sent
// as soon as its socket exists: possibly before its start has finished (then it stops right after it).
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { spawnChild } from './helpers/children.js';
import { daemonMain, eventually } from './helpers/daemon.js';

describe('sockpoold stop', () => {
  it('exits cleanly on SIGTERM after its log pipe broke', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-stop-'));
    const socketPath = join(dir, 'sockpoold.sock');
    const child = spawnChild(
      process.execPath,
      [daemonMain, '--socket', socketPath, '--state-dir', dir, '--allow', '127.0.0.1/32', '--log-level', 'debug'],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    try {
      await eventually(() => existsSync(socketPath), 'the daemon listens');
      child.stdout!.destroy();
      child.stderr!.destroy();
      child.kill('SIGTERM');
      // A bound, not a timing claim: a daemon stuck in its exit flush never exits at all.
      const outcome = await Promise.race([
        exited,
        new Promise<string>((resolve) => setTimeout(() => resolve('still running'), 15_000)),
      ]);
      expect(outcome).toBe(0);
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
  });
});
