// A client closed while its worker threads are still starting: piscina terminates them mid-load, and that must end
// the threads, not the process. Two such aborts were seen: require() of the ES task module
// failing an assertion in Node's CommonJS facade (the threads now load it with import(), worker/task-entry.cts),
// and the addon's module init rethrowing as a C++ exception when it could not throw into a terminating thread
// (native/binding.gyp). Both were rare (the second about one close in 350 under a stress loop), so this test is a
// smoke test of the path, run in a child process; the loop in NOTES.md is the stress version.
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

const fixture = fileURLToPath(new URL('./fixtures/client-close-while-starting.mjs', import.meta.url));
let daemon: DaemonProcess;

beforeAll(async () => {
  daemon = await startTestDaemon([]);
});

afterAll(async () => {
  await daemon?.stop();
});

it('closing clients at every stage of their threads start leaves the process running and no fd open', async () => {
  const { stdout } = await promisify(execFile)(
    process.execPath,
    [fixture, JSON.stringify({ socketPath: daemon.socketPath, rounds: 16, spanMs: 200 })],
    { timeout: 60_000 },
  );
  const { before, after } = JSON.parse(stdout.trim().split('\n').at(-1) ?? '{}') as { before: number; after: number };
  expect(before).toBeGreaterThan(0);
  expect(after).toBe(before);
});
