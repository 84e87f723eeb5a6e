// resetSocket (daemon/socket-reset.ts): a reset right after an end() in the same turn — the warm-TLS relay's
// teardown when a client half-closes and then fails — closes the socket with a RST and leaves nothing that keeps the
// thread from ending. With Node's socket.resetAndDestroy() in its place, the handle is never closed and the worker's
// terminate() never resolves (how a warm-TLS sockpoold's stop hung): the fixture's process then runs until this test
// kills it.
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { repoRoot } from './helpers/daemon.js';
import { createTestPki } from './helpers/tls.js';

const fixture = join(import.meta.dirname, 'fixtures', 'reset-after-end.mjs');
const resetModule = join(repoRoot, 'dist', 'daemon', 'socket-reset.js');
const pki = createTestPki(['localhost']);
afterAll(() => pki.cleanup());

interface Outcome {
  peer: string;
  terminated: boolean;
  socketFdsBefore: number;
  socketFdsAfter: number;
}

function runFixture(tls: boolean): Promise<Outcome> {
  const settings = {
    resetModule,
    tls: tls ? { ca: pki.ca.toString(), cert: pki.cert.toString(), key: pki.key.toString() } : null,
  };
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [fixture, JSON.stringify(settings)],
      { timeout: 20_000, killSignal: 'SIGKILL' },
      (error, stdout, stderr) => {
        if (error) {
          const how = error.killed ? 'still running after 20 s (the worker never terminated)' : error.message;
          reject(new Error(`reset-after-end: ${how}\n${stderr}`));
          return;
        }
        resolve(JSON.parse(stdout.trim().split('\n').at(-1)!) as Outcome);
      },
    );
  });
}

describe('resetSocket', () => {
  it('resets a socket whose end() is still pending, and the worker thread that did it can be terminated', async () => {
    const outcome = await runFixture(false);
    expect(outcome.peer).toBe('error ECONNRESET');
    expect(outcome.terminated).toBe(true);
    expect(outcome.socketFdsAfter).toBe(outcome.socketFdsBefore);
  });

  it('resets the TCP socket under a TLS socket just ended (the relay resetting an origin), and the worker ends', async () => {
    const outcome = await runFixture(true);
    // The close_notify the TLS end wrote reaches the origin before the reset does.
    expect(outcome.peer).toMatch(/^(end|error ECONNRESET)$/);
    expect(outcome.terminated).toBe(true);
    expect(outcome.socketFdsAfter).toBe(outcome.socketFdsBefore);
  });
});
