// Child processes the tests start (daemons, origins, hostile clients, redis, nginx) through spawnChild cannot outlive
// their test process, nor a failed test, nor their file (trackChild, for a child started otherwise: the last two):
// - spawnChild runs each under `setpriv --pdeathsig KILL`, so the kernel kills it when the vitest fork that started it
//   dies, even by SIGKILL, with no hook run (setpriv execs in place: the child's pid, fds, environment and exit
//   status are the program's own). The signal follows the thread that forked: the test's, which with pool `forks`
//   is its process's main thread;
// - one started inside a test (its beforeEach included) that fails or times out is ended when that test ends: vitest
//   abandons a timed-out test with its `finally` never run, and its daemon (fds, socket, CPU) would otherwise live on
//   through the rest of the file's tests;
// - any other one is the file's until its end: tests here start daemons and stop them from the file's afterAll
//   (test/warm-tls-reload, kernel-tls, client-daemon, warm-tls-history), a daemon from beforeAll serves several
//   tests, and the fleet tests restart the file's Redis inside a test. test/helpers/reap-children.ts (a setupFiles
//   entry) ends what is still running after the file's own afterAll hooks, and fails the file naming each one (a leak).
// The registry is per vitest fork (each test file has its own): module state, no locking.
import { type ChildProcess, type SpawnOptions, spawn } from 'node:child_process';
import { once } from 'node:events';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';
import { onTestFinished } from 'vitest';
import { getCurrentTest } from 'vitest/suite';

interface Tracked {
  child: ChildProcess;
  what: string;
}

/** The tracked children still running (removed on their exit). */
const running = new Set<Tracked>();

// A child left running gets SIGTERM (a daemon removes its socket and writes its history) and this long to exit, then
// SIGKILL. SIGKILL's own wait is bounded too, so a child stuck in the kernel (a hung FUSE flush) fails the hook
// instead of hanging it. The same grace for a child its owner already signalled without waiting for its exit.
const STOP_GRACE_MS = 5_000;
const KILL_WAIT_MS = 10_000;
// Taken when this module loads (a setupFiles import, before any test runs): a test that leaves vi.useFakeTimers() on
// must not stop these waits.
const realSetTimeout = globalThis.setTimeout;
const realClearTimeout = globalThis.clearTimeout;

function findOnPath(command: string): string | undefined {
  if (command.includes('/')) return command;
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, command);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {}
  }
  return undefined;
}

let setprivPath: string | undefined;
function setpriv(): string {
  setprivPath ??= findOnPath('setpriv');
  // scripts/ensure-test-tools.mjs installs util-linux (it has setpriv) before `npm test`.
  if (!setprivPath) throw new Error('setpriv (util-linux) not found on PATH: the tests run their children under it');
  return setprivPath;
}

export function isRunning(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

async function exitWithin(child: ChildProcess, ms: number): Promise<boolean> {
  if (!isRunning(child)) return true;
  return new Promise<boolean>((resolve) => {
    const timer = realSetTimeout(() => {
      child.off('exit', onExit);
      resolve(false);
    }, ms);
    const onExit = () => {
      realClearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

/** Ends a tracked child left running; returns a description of it if that was a leak, undefined if not. */
async function reap({ child, what }: Tracked): Promise<string | undefined> {
  if (!isRunning(child)) return undefined;
  // kill() was called and the signal sent: the owner stopped it without waiting for the exit. Not a leak if it exits.
  const stopping = child.killed;
  if (!stopping) child.kill('SIGTERM');
  if (await exitWithin(child, STOP_GRACE_MS)) return stopping ? undefined : `${what} (pid ${child.pid})`;
  const leak = `${what} (pid ${child.pid}${stopping ? ', signalled by its owner' : ''})`;
  child.kill('SIGKILL');
  if (!(await exitWithin(child, KILL_WAIT_MS))) return `${leak}, which did not exit on SIGKILL`;
  return leak;
}

/**
 * Tracks a child started some other way (execFile, or a spawn whose error events the caller needs as they are): ended
 * with the current test if that fails, or at the end of the file if still running then. Returns the child.
 */
export function trackChild<T extends ChildProcess>(child: T, what: string): T {
  const tracked = { child, what };
  running.add(tracked);
  child.once('exit', () => running.delete(tracked));
  const test = getCurrentTest();
  // A child started outside a test (beforeAll, module scope) is the file's anyway.
  if (!test) return child;
  onTestFinished(async () => {
    // A passing test may leave it to the file's afterAll; a failed or timed-out test's child is ended quietly (the
    // failure is already reported).
    if (test.result?.state !== 'pass') await reap(tracked);
  });
  return child;
}

/**
 * child_process.spawn under `setpriv --pdeathsig KILL`, tracked (trackChild). A command not found on PATH is spawned
 * as it is, so the caller still sees the ENOENT 'error' event (setpriv would report it as an exit code instead).
 */
export function spawnChild(
  command: string,
  args: readonly string[],
  options: SpawnOptions & { what?: string } = {},
): ChildProcess {
  const { what = [command, ...args].join(' ').slice(0, 200), ...spawnOptions } = options;
  const resolved = findOnPath(command);
  const child = resolved
    ? spawn(setpriv(), ['--pdeathsig', 'KILL', '--', resolved, ...args], spawnOptions)
    : spawn(command, args, spawnOptions);
  return trackChild(child, what);
}

/**
 * Runs a child (spawnChild, its stderr inherited) to its end: its exit code, signal and everything it wrote to
 * stdout. For the fixtures that run one check (as another user, under a limit) and print what they saw.
 */
export async function runChildToEnd(
  command: string,
  args: readonly string[],
  options: Omit<SpawnOptions, 'stdio'> & { what?: string } = {},
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string }> {
  const child = spawnChild(command, args, { ...options, stdio: ['ignore', 'pipe', 'inherit'] });
  let stdout = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    stdout += chunk;
  });
  const [code, signal] = (await once(child, 'close')) as [number | null, NodeJS.Signals | null];
  return { code, signal, stdout };
}

/** Reaps the file's children still running (the setupFiles entry calls this after the file's afterAll hooks). */
export async function reapFileChildren(): Promise<void> {
  const leaks: string[] = [];
  for (const tracked of [...running]) {
    const leak = await reap(tracked);
    if (leak) leaks.push(leak);
  }
  if (leaks.length > 0) {
    throw new Error(
      `child process still running after the file's afterAll hooks, ended now: ${leaks.join('; ')}. Stop it in the test's finally, or in the afterAll of the file that started it.`,
    );
  }
}
