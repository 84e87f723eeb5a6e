// Starving threads of a CPU as a loaded host does, without root: the tests of the relay threads' available time
// (daemon/relay-clock.ts) pin a process to one CPU beside busy loops and read how long its threads waited for it.

import { type ChildProcess, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, readFileSync } from 'node:fs';
import { expect, onTestFinished } from 'vitest';
import { getCurrentTest } from 'vitest/suite';
import { spawnChild } from './children.js';

/**
 * Starves the relay threads as a loaded host does: the threads of process `of` (this one by default; and the relay
 * threads it starts from now on, which inherit it) pinned to one CPU with `hogs` busy loops at this process's nice
 * (0): a relay thread (nice 10) gets a small part of that CPU and waits on its run queue most of the time. A normal
 * user may do all of it. Returns the undo: every hog killed and its exit awaited, the affinity put back (once, however
 * often it is called). Called in a test, the undo runs when the test ends too: a test that times out never runs its
 * `finally`, and its hogs (spawned plainly) lived on pinned to that CPU for good, slowing every later test there (a
 * timed-out run of test/daemon-trust-relay-cpu left one, and the runs after it timed out in turn). The hogs are the
 * test process's children too (spawnChild): the kernel kills them if it dies.
 */
export function starveOneCpu(hogs: number, of = process.pid): () => Promise<void> {
  const pid = String(of);
  const mask = execFileSync('taskset', ['-p', pid], { encoding: 'utf8' }).trim().split(' ').pop()!;
  execFileSync('taskset', ['-a', '-p', '-c', '0', pid], { stdio: 'ignore' });
  const children: ChildProcess[] = [];
  for (let index = 0; index < hogs; index++) {
    children.push(
      spawnChild('taskset', ['-c', '0', 'sh', '-c', 'while :; do :; done'], { stdio: 'ignore', what: 'a busy loop' }),
    );
  }
  let undone = false;
  const undo = async () => {
    if (undone) return;
    undone = true;
    const exits = children.map((child) =>
      child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : once(child, 'exit'),
    );
    for (const child of children) child.kill('SIGKILL');
    await Promise.all(exits);
    expect(children.filter((child) => child.exitCode === null && child.signalCode === null)).toEqual([]);
    execFileSync('taskset', ['-a', '-p', mask, pid], { stdio: 'ignore' });
  };
  if (getCurrentTest()) onTestFinished(undo);
  return undo;
}

/** The threads (tids) of process `of` (this one by default). */
export function threadIds(of: number | 'self' = 'self'): Set<string> {
  return new Set(readdirSync(`/proc/${of}/task`));
}

/**
 * How long thread `tid` of process `of` has waited on a run queue in all (its schedstat's run_delay), ms; 0 once it
 * is gone.
 */
export function runDelayMs(tid: string, of: number | 'self' = 'self'): number {
  try {
    return Number(readFileSync(`/proc/${of}/task/${tid}/schedstat`, 'utf8').split(' ')[1]) / 1e6;
  } catch {
    return 0;
  }
}
