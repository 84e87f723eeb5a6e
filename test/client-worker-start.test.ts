// A client whose worker threads cannot start (here: an install missing the task module; the same path serves an
// addon that does not load) fails its requests at once with SOCKPOOL_ERR_WORKER_START and the cause, instead of
// holding them until their deadlines; it still closes, and leaves no fd open. Run in a child process over a copy of
// the compiled client with worker/task.js left out.
import { execFile } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, it } from 'vitest';

const root = fileURLToPath(new URL('..', import.meta.url));
const fixture = fileURLToPath(new URL('./fixtures/client-without-threads.mjs', import.meta.url));
let install: string;

beforeAll(() => {
  install = mkdtempSync(join(tmpdir(), 'sockpool-broken-install-'));
  // Named "sockpool", as the addon's loader looks for it (shared/native.ts); dependencies and the addon as built.
  writeFileSync(join(install, 'package.json'), JSON.stringify({ name: 'sockpool', type: 'module' }));
  symlinkSync(join(root, 'node_modules'), join(install, 'node_modules'));
  symlinkSync(join(root, 'native'), join(install, 'native'));
  const taskModule = join(root, 'dist', 'worker', 'task.js');
  for (const part of ['client', 'worker', 'shared', 'daemon']) {
    cpSync(join(root, 'dist', part), join(install, 'dist', part), {
      recursive: true,
      filter: (source) => source !== taskModule,
    });
  }
});

afterAll(() => {
  if (install) rmSync(install, { recursive: true, force: true });
});

it('fails requests with SOCKPOOL_ERR_WORKER_START and the cause when no worker thread can start', async () => {
  const { stdout } = await promisify(execFile)(process.execPath, [fixture, join(install, 'dist')], { timeout: 50_000 });
  const lines = stdout
    .trim()
    .split('\n')
    .map(
      (line) =>
        JSON.parse(line) as { name?: string; code?: string; message?: string; closed?: boolean; before?: number },
    );
  const closed = lines.at(-1)!;
  expect(closed.closed).toBe(true);
  expect(closed.before).toBeGreaterThan(0);
  expect(closed).toEqual({ closed: true, before: closed.before, after: closed.before });
  const outcomes = lines.slice(0, -1);
  expect(outcomes.map(({ name, code }) => [name, code])).toEqual([
    ['buffered', 'SOCKPOOL_ERR_WORKER_START'],
    ['streamed', 'SOCKPOOL_ERR_WORKER_START'],
    ['prewarm', 'SOCKPOOL_ERR_WORKER_START'],
    ['buffered, later 1', 'SOCKPOOL_ERR_WORKER_START'],
    ['buffered, later 2', 'SOCKPOOL_ERR_WORKER_START'],
    ['buffered, later 3', 'SOCKPOOL_ERR_WORKER_START'],
  ]);
  for (const { message } of outcomes) {
    expect(message).toContain('no worker thread of the client could start');
    expect(message).toContain('task.js');
    expect(message).toContain('ERR_MODULE_NOT_FOUND');
  }
});
