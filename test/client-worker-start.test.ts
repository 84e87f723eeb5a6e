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
const fixtures = fileURLToPath(new URL('./fixtures/', import.meta.url));
const taskModule = join(root, 'dist', 'worker', 'task.js');
const installs: string[] = [];

/** A copy of the compiled client in a directory of its own, without dist/worker/task.js (the caller writes its
 *  own there, or none). */
function installWithoutTask(): string {
  const install = mkdtempSync(join(tmpdir(), 'sockpool-broken-install-'));
  installs.push(install);
  // Named "sockpool", as the addon's loader looks for it (shared/native.ts); dependencies and the addon as built.
  writeFileSync(join(install, 'package.json'), JSON.stringify({ name: 'sockpool', type: 'module' }));
  symlinkSync(join(root, 'node_modules'), join(install, 'node_modules'));
  symlinkSync(join(root, 'native'), join(install, 'native'));
  for (const part of ['client', 'worker', 'shared', 'daemon']) {
    cpSync(join(root, 'dist', part), join(install, 'dist', part), {
      recursive: true,
      filter: (source) => source !== taskModule,
    });
  }
  return install;
}

let install: string;

beforeAll(() => {
  install = installWithoutTask();
});

afterAll(() => {
  for (const dir of installs) rmSync(dir, { recursive: true, force: true });
});

async function runFixture(name: string, ...args: string[]) {
  const { stdout } = await promisify(execFile)(process.execPath, [join(fixtures, name), ...args], { timeout: 50_000 });
  return stdout
    .trim()
    .split('\n')
    .map(
      (line) =>
        JSON.parse(line) as { name?: string; code?: string; message?: string; closed?: boolean; before?: number },
    );
}

// With two threads, the first failure leaves the other starting (and piscina starts a replacement): the client
// fails fast only once every one of them has failed.
it.each([1, 2])(
  'fails requests with SOCKPOOL_ERR_WORKER_START and the cause when no worker thread can start (%i threads)',
  async (threads) => {
    const lines = await runFixture('client-without-threads.mjs', join(install, 'dist'), String(threads));
    const closed = lines.at(-1)!;
    expect(closed.closed).toBe(true);
    expect(closed.before).toBeGreaterThan(0);
    expect(closed).toEqual({ closed: true, before: closed.before, after: closed.before });
    const outcomes = lines.slice(0, -1);
    expect(outcomes.map(({ name, code }) => [name, code])).toEqual([
      ['stats, while the thread starts', 'SOCKPOOL_ERR_WORKER_START'],
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
  },
);

it('runs requests on the thread that started when another could not', async () => {
  const install = installWithoutTask();
  // The first thread to load the task module fails; the others load the real one, after a pause, so that the
  // failure reaches the caller while the second thread still starts.
  const worker = join(install, 'dist', 'worker');
  cpSync(taskModule, join(worker, 'task-real.js'));
  writeFileSync(
    join(worker, 'task.js'),
    [
      "import { openSync } from 'node:fs';",
      "const flag = new URL('./first-thread-failed', import.meta.url);",
      'let first = false;',
      "try { openSync(flag, 'wx'); first = true; } catch (error) { if (error.code !== 'EEXIST') throw error; }",
      "if (first) throw Object.assign(new Error('the first thread fails on purpose'), { code: 'TEST_FIRST_THREAD' });",
      'await new Promise((resolve) => setTimeout(resolve, 300));',
      "export default (await import('./task-real.js')).default;",
      '',
    ].join('\n'),
  );
  const lines = await runFixture('client-first-thread-fails.mjs', join(install, 'dist'));
  const closed = lines.at(-1)!;
  expect(closed).toEqual({ closed: true, before: closed.before, after: closed.before });
  // They ran on a thread: the daemon's socket does not exist. Before, the first thread's failure failed them with
  // SOCKPOOL_ERR_WORKER_START while the second thread still started.
  expect(lines.slice(0, -1).map(({ name, code }) => [name, code])).toEqual([
    ['buffered 1', 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE'],
    ['buffered 2', 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE'],
    ['buffered 3', 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE'],
  ]);
});

// A thread that dies is replaced by piscina, but not once a thread failed to start (piscina then starts none any
// more). A client of two threads whose first thread crashed and whose replacement could not start (its cause was
// only kept while the second thread ran) lost its last thread when the second one crashed: its requests then
// waited for a lane that never came, until their deadlines (SOCKPOOL_ERR_TIMEOUT), and close() waited for them.
it('fails requests fast once the last thread is gone and its replacements could not start', async () => {
  const install = installWithoutTask();
  const control = mkdtempSync(join(tmpdir(), 'sockpool-thread-control-'));
  installs.push(control);
  const worker = join(install, 'dist', 'worker');
  cpSync(taskModule, join(worker, 'task-real.js'));
  writeFileSync(
    join(worker, 'task.js'),
    [
      "import { existsSync, writeFileSync } from 'node:fs';",
      "import { threadId } from 'node:worker_threads';",
      `const file = (name) => ${JSON.stringify(control)} + '/' + name;`,
      "if (existsSync(file('fail-start'))) throw Object.assign(new Error('threads cannot start now'), { code: 'TEST_NO_START' });",
      "const task = (await import('./task-real.js')).default;",
      "writeFileSync(file('started-' + threadId), '');",
      'setInterval(() => {',
      "  if (existsSync(file('crash-' + threadId))) throw new Error('worker crashed (test)');",
      '}, 10).unref();',
      'export default task;',
      '',
    ].join('\n'),
  );
  const lines = await runFixture('client-replacement-fails.mjs', join(install, 'dist'), control);
  const closed = lines.at(-1)!;
  expect(closed).toMatchObject({ closed: true, after: closed.before, threads: 3 });
  const outcomes = lines.slice(0, -1);
  expect(outcomes.map(({ name, code }) => [name, code])).toEqual([
    ['buffered', 'SOCKPOOL_ERR_WORKER_START'],
    ['streamed', 'SOCKPOOL_ERR_WORKER_START'],
  ]);
  for (const { message } of outcomes) expect(message).toContain('threads cannot start now');
});
