// The addon's closing threads (native DeferredCloser: the owner, which closes the fds discard() leaves to it, and the
// watcher, which hands its queue on when a close is held) are started at the first deferred close. A system with no
// thread to give right then (a unit's TasksMax, a pids cgroup at its limit: std::thread throws) must not leave the
// closer without them for the rest of the process: a later deferred close tries again. Each case runs in a child
// process of its own (the closer is one per process, made once), put in a pids cgroup of the test's own whose limit
// is the child's thread count (plus `room`) while it makes its first deferred close, then lifted. Root: the cgroup.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { requirePrerequisite } from './helpers/require.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A pids cgroup of this test's own (v1's pids hierarchy, or v2 with the pids controller), removed after the test. */
function pidsCgroup(): string {
  const v1 = '/sys/fs/cgroup/pids';
  const v2 = '/sys/fs/cgroup';
  let parent: string | undefined;
  if (existsSync(join(v1, 'cgroup.procs'))) parent = v1;
  else if (existsSync(join(v2, 'cgroup.subtree_control'))) {
    if (readFileSync(join(v2, 'cgroup.subtree_control'), 'utf8').split(/\s+/).includes('pids')) parent = v2;
  }
  requirePrerequisite(parent !== undefined && process.getuid?.() === 0, 'root and a pids cgroup controller');
  const path = join(parent!, `sockpool-closer-test-${process.pid}-${cleanups.length}`);
  mkdirSync(path);
  // (Its child has exited by then: an empty cgroup is removed with rmdir.)
  cleanups.push(() => rmdirSync(path));
  return path;
}

interface Outcome {
  /** Whether each /dev/null fd handed to discard() is still open at the end (first: under the limit; second: after). */
  open: [boolean, boolean];
  /** The child's threads by name at the end. */
  closers: number;
  watchers: number;
  /** Whether the first deferred close found the limit (no thread could be started then). */
  limited: boolean;
}

/**
 * In a child process in `cgroup`: one deferred close (discard of a /dev/null fd) with the cgroup's pids.max at the
 * child's task count plus `room`, then the limit lifted and another deferred close; waits (up to a bound) for both fds
 * to be closed and the closing threads to be there.
 */
function run(cgroup: string, room: number): Outcome {
  const nativeModule = join(import.meta.dirname, '..', 'dist', 'shared', 'native.js');
  const script = `
    import { openSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
    import * as native from ${JSON.stringify(nativeModule)};
    const cgroup = ${JSON.stringify(cgroup)};
    const sleep = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
    const isOpen = (fd) => { try { readlinkSync('/proc/self/fd/' + fd); return true; } catch { return false; } };
    const named = (name) => readdirSync('/proc/self/task').filter((task) => {
      try { return readFileSync('/proc/self/task/' + task + '/comm', 'utf8') === name + '\\n'; } catch { return false; }
    }).length;
    // (libuv opens a reserve fd at its first stream: before ours, so that it cannot take a number ours left.)
    const out = process.stdout;
    const first = openSync('/dev/null', 'r');
    const second = openSync('/dev/null', 'r');
    writeFileSync(cgroup + '/cgroup.procs', String(process.pid));
    const tasks = readdirSync('/proc/self/task').length;
    writeFileSync(cgroup + '/pids.max', String(tasks + ${room}));
    native.discard(first);
    sleep(300);
    const limited = named('sockpool-close') + named('sockpool-cwatch') < 2;
    writeFileSync(cgroup + '/pids.max', 'max');
    native.discard(second);
    for (let waited = 0; waited < 5000; waited += 50) {
      if (!isOpen(first) && !isOpen(second) && named('sockpool-cwatch') === 1) break;
      sleep(50);
    }
    out.write(JSON.stringify({
      open: [isOpen(first), isOpen(second)],
      closers: named('sockpool-close'),
      watchers: named('sockpool-cwatch'),
      limited,
    }) + '\\n');
  `;
  const child = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    encoding: 'utf8',
    timeout: 20_000,
  });
  expect(child.stderr).toBe('');
  expect(child.status).toBe(0);
  return JSON.parse(child.stdout) as Outcome;
}

describe("the addon's closing threads, when the system has no thread to give at the first deferred close", () => {
  it('neither thread could start: a later deferred close starts them, and both fds are closed', () => {
    const outcome = run(pidsCgroup(), 0);
    expect(outcome).toEqual({ open: [false, false], closers: 1, watchers: 1, limited: true });
  });

  it('the owner started, the watcher could not: a later deferred close starts the watcher', () => {
    const outcome = run(pidsCgroup(), 1);
    expect(outcome).toEqual({ open: [false, false], closers: 1, watchers: 1, limited: true });
  });
});
