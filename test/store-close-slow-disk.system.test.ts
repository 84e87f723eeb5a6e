// The store's close at the daemon's stop on a disk whose syncs never end: the fixture child (test/fixtures/store-child,
// modes close-*) runs under strace, which holds every fsync and fdatasync of it at the syscall's entry for an hour.
// What the close does on the event loop's thread must not wait for one: the stop would run into systemd's SIGKILL
// (TimeoutStopSec=). Seen structurally, never by timing: the thread's /proc syscall says where it is held, and the
// close returns while another thread is held in a sync. In the system tier: it needs strace (ptrace).
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { StateDirLock } from '../daemon/state-lock.js';
import { spawnChild } from './helpers/children.js';
import { eventually } from './helpers/daemon.js';

const repo = resolve(import.meta.dirname, '..');
/** x86_64 syscall numbers (/proc/<pid>/task/<tid>/syscall gives the number first). */
const SYNCS: Record<string, string> = { '74': 'fsync', '75': 'fdatasync' };

/** The threads of `pid` stopped in fsync or fdatasync now, with the call's name. */
function threadsInSync(pid: number): Array<{ tid: number; call: string }> {
  const held: Array<{ tid: number; call: string }> = [];
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return held;
  }
  for (const tid of tids) {
    let syscall = '';
    try {
      syscall = readFileSync(`/proc/${pid}/task/${tid}/syscall`, 'utf8');
    } catch {
      continue;
    }
    const call = SYNCS[syscall.split(' ')[0] ?? ''];
    if (call) held.push({ tid: Number(tid), call });
  }
  return held;
}

/** A thread's state letter (R, S, D, t, Z...) from /proc, or undefined once it is gone. */
function threadState(pid: number, tid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  } catch {
    return undefined;
  }
}

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'sockpool-store-slow-'));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

/**
 * The fixture child (store-child.ts in `mode`) run to "ready", then strace holding every fsync and fdatasync of it.
 * `output()`: its stdout and stderr so far; `exited`: its exit code and signal.
 */
async function childUnderHeldSyncs(mode: string) {
  const child = spawnChild(
    process.execPath,
    ['--import', join(repo, 'test/fixtures/register-ts.mjs'), join(repo, 'test/fixtures/store-child.ts'), dir, mode],
    { stdio: ['pipe', 'pipe', 'pipe'] },
  );
  let output = '';
  child.stdout?.on('data', (chunk) => {
    output += chunk;
  });
  child.stderr?.on('data', (chunk) => {
    output += chunk;
  });
  const exited = new Promise<[number | null, NodeJS.Signals | null]>((done) =>
    child.once('exit', (code, signal) => done([code, signal])),
  );
  await eventually(
    () => output.includes('ready\n'),
    () => `the child ready: ${output}`,
    30_000,
  );
  const pid = child.pid ?? 0;
  const strace = spawnChild(
    'strace',
    ['-f', '-p', String(pid), '-e', 'trace=fsync,fdatasync', '-e', 'inject=fsync,fdatasync:delay_enter=3600s'],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let traced = '';
  strace.stderr?.on('data', (chunk) => {
    traced += chunk;
  });
  await eventually(() => traced.includes('attached'), 'strace attached to every thread of the child');
  return { child, pid, strace, exited, output: () => output };
}

/**
 * Waits until `done` (a step of the child's ended) or the child's event-loop thread is found held in a sync (for an
 * hour: it cannot be missed); returns the sync's name in the second case.
 */
async function heldOnEventLoop(pid: number, done: () => boolean, what: () => string): Promise<string | undefined> {
  let heldThere: string | undefined;
  await eventually(
    () => {
      const main = threadsInSync(pid).find(({ tid }) => tid === pid);
      if (main) heldThere = main.call;
      return heldThere !== undefined || done();
    },
    what,
    30_000,
  );
  return heldThere;
}

describe("the store's close on a disk whose syncs never end", () => {
  /**
   * Runs the fixture child to "ready", holds its syncs under strace, closes the store, and ends the child as the
   * daemon's command does. Returns what the close said.
   */
  async function closeUnderHeldSyncs(mode: 'close-restarted' | 'close-appended' | 'close-in-flight') {
    const { child, pid, strace, exited, output: outputOf } = await childUnderHeldSyncs(mode);
    expect(threadsInSync(pid)).toEqual([]);

    child.stdin?.write('close\n');
    // Either close() returns, or the event loop's thread is found held in a sync.
    const heldThere = await heldOnEventLoop(
      pid,
      () => outputOf().includes('closed '),
      () => `close() returned or the event loop held in a sync: ${outputOf()}`,
    );
    expect(heldThere, `close() is held on the event loop's thread in ${heldThere}`).toBeUndefined();
    const [, dropped, left] = /closed (\d+) (\S+)/.exec(outputOf()) ?? [];
    // The store's own thread went on with the writing and is held in a sync of its own: the close did not wait for it,
    // and says so (the daemon names it among the threads left and ends the process without joining it).
    expect(left).not.toBe('-');
    await eventually(() => threadsInSync(pid).some(({ tid }) => tid !== pid), "the store's thread held in a sync");
    expect(threadsInSync(pid).some(({ tid }) => tid === pid)).toBe(false);
    // The process ends as the daemon's does (_exit): its event loop's thread is gone while the store's is still held
    // in the sync. (No process can end before a sync in flight returns: the last thread goes when the disk lets it.)
    child.stdin?.write('exit\n');
    await eventually(() => threadState(pid, pid) === 'Z', "the event loop's thread ended");
    // Waited for, not read once: the exit's SIGKILL wakes the held thread from its stop, and until it has run to its
    // exit stop (still in the sync's call: strace answers nothing) /proc says it is "running" (a CI run at a load of
    // 18 read it so, between the two stops: "expected 0 to be greater than 0").
    await eventually(() => threadsInSync(pid).length > 0, "the store's thread still held in its sync after the exit");
    // Its state directory is still locked: a second daemon starting now is refused, not run on a file whose last
    // writer is still at work (it would read its counts from a table that thread then changes).
    let refusal = 'the lock taken';
    try {
      StateDirLock.take(dir).release();
    } catch (error) {
      refusal = (error as Error).message;
    }
    expect(refusal, 'a second daemon refused while the first one is held in a sync').toMatch(
      /^another sockpoold is using the state directory/,
    );
    // The disk lets the sync go (strace, held up by the exit, answers nothing but SIGKILL): the process is gone, with
    // the status it asked for.
    strace.kill('SIGKILL');
    expect(await exited).toEqual([0, null]);
    // The process gone, the directory is free.
    StateDirLock.take(dir).release();
    return { dropped: Number(dropped) };
  }

  /** The file as the next start finds it: intact, with every row committed before the stop. */
  function reopened(): { db: Database.Database; pending: number } {
    const db = new Database(join(dir, 'sockpool.sqlite'));
    expect(db.prepare('PRAGMA integrity_check').pluck().get()).toBe('ok');
    expect(db.prepare("SELECT count(*) FROM origins WHERE origin_key LIKE 'committed%'").pluck().get()).toBe(1000);
    expect(db.prepare("SELECT sum(acquires) FROM origins WHERE origin_key LIKE 'committed%'").pluck().get()).toBe(1000);
    const pending = db.prepare("SELECT count(*) FROM origins WHERE origin_key LIKE 'pending%'").pluck().get();
    return { db, pending: pending as number };
  }

  it("lets the state directory's lock go without a sync (the stop's last step before it ends)", async () => {
    // Before: closing the lock's connection, its exclusive transaction open, wrote a rollback journal and synced it
    // and the directory, three syncs on the event loop after the history's close.
    const { child, pid, strace, exited, output: outputOf } = await childUnderHeldSyncs('lock');
    child.stdin?.write('release\n');
    const heldThere = await heldOnEventLoop(
      pid,
      () => outputOf().includes('released\n'),
      () => `the lock released or the event loop held in a sync: ${outputOf()}`,
    );
    expect(heldThere, `the lock's release is held in ${heldThere}`).toBeUndefined();
    StateDirLock.take(dir).release();
    strace.kill('SIGKILL');
    child.kill('SIGKILL');
    await exited;
  });

  it('returns while the sync a restarted WAL needs is held, and the file reopens intact with every committed row', async () => {
    const { dropped } = await closeUnderHeldSyncs('close-restarted');
    const { db, pending } = reopened();
    // What the close did not see committed is counted as dropped; what it saw committed is in the file.
    expect(pending).toBeGreaterThanOrEqual(100_000 - dropped);
    db.close();
  });

  it("returns while the commit of a flush's slice handed to the store thread is held in its sync, and the file reopens intact", async () => {
    // The store thread commits the timer's and flush()'s slices: close() waits for the one in flight (its rows must be
    // those the close's preparing reads) only while the preparing may, and prepares nothing behind one still held.
    const { dropped } = await closeUnderHeldSyncs('close-in-flight');
    // The slice was held (it restarts the WAL): nothing was prepared behind it, all that was pending is counted dropped.
    expect(dropped).toBe(100_000);
    const { db, pending } = reopened();
    expect(pending).toBeGreaterThanOrEqual(100_000 - dropped);
    db.close();
  });

  it("returns while the last checkpoint's sync is held, and the file reopens intact with what the close committed", async () => {
    const { dropped } = await closeUnderHeldSyncs('close-appended');
    const { db, pending } = reopened();
    expect(db.prepare("SELECT acquires FROM origins WHERE origin_key = 'appended.example:443'").pluck().get()).toBe(1);
    expect(pending).toBeGreaterThanOrEqual(100_000 - dropped);
    // The close's commits appended to the WAL (no header to sync) and are in the file: its thread was held only at
    // the end, in the checkpoint of the last connection.
    expect(pending).toBeGreaterThan(0);
    db.close();
  });
});
