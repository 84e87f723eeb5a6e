// Runs sockpoold (compiled, from dist/) as a real child process for tests, with its own socket and state
// directory in a temp dir, and stops it at the end (test/helpers/children.ts ends one a test left running).
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { spawnChild } from './children.js';

export const repoRoot = join(import.meta.dirname, '..', '..');
export const daemonMain = join(repoRoot, 'dist', 'daemon', 'main.js');

/**
 * daemon/tls-relay.js as built in dist/: a TlsRelays made in a test starts its relay threads from the built
 * tls-relay-thread.js beside it (its Worker's URL), not from the sources vitest runs.
 */
export async function builtTlsRelays(): Promise<typeof import('../../daemon/tls-relay.js')> {
  return (await import(join(repoRoot, 'dist', 'daemon', 'tls-relay.js'))) as typeof import('../../daemon/tls-relay.js');
}

export interface DaemonProcess {
  child: ChildProcess;
  socketPath: string;
  stateDir: string;
  /** Everything the daemon logged so far (JSON lines). */
  output(): string;
  /** SIGTERM and wait; returns the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  /** Open fds of the daemon process. */
  fdCount(): number;
}

const READY_TIMEOUT_MS = 45_000;

export interface StartDaemonOptions {
  args?: string[];
  env?: NodeJS.ProcessEnv;
  stateDir?: string;
  /** Node's own options, before the daemon's script (e.g. ['--inspect=127.0.0.1:0']). */
  nodeArgs?: string[];
  /** Prefix the command (e.g. ['ip', 'netns', 'exec', 'ns']). */
  wrap?: string[];
  socketPath?: string;
}

export async function startDaemon(options: StartDaemonOptions = {}): Promise<DaemonProcess> {
  if (!existsSync(daemonMain)) throw new Error(`${daemonMain} missing: run npm run build first`);
  const stateDir = options.stateDir ?? mkdtempSync(join(tmpdir(), 'sockpoold-test-'));
  const socketPath = options.socketPath ?? join(stateDir, 'sockpoold.sock');
  const argv = [
    process.execPath,
    ...(options.nodeArgs ?? []),
    daemonMain,
    '--socket',
    socketPath,
    '--state-dir',
    stateDir,
    '--log-level',
    'debug',
    ...(options.args ?? []),
  ];
  const command = [...(options.wrap ?? []), ...argv];
  // Reaped at the end of the test that started it (or of the file, from a beforeAll), and killed with the test's fork.
  const child = spawnChild(command[0]!, command.slice(1), {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...options.env },
    what: `sockpoold on ${socketPath}`,
  });
  let output = '';
  // 'close', not 'exit': by then stdout and stderr are read to the end, so output() has the last lines.
  const exited = once(child, 'close');
  // Ready when the daemon logs so: waited for on its output, with a bound generous enough for a loaded machine.
  const ready = new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`sockpoold did not become ready within ${READY_TIMEOUT_MS} ms:\n${output}`));
    }, READY_TIMEOUT_MS);
    const onData = (chunk: Buffer) => {
      output += chunk;
      if (output.includes('sockpoold ready')) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      // Output may still be arriving: report it once both streams are read.
      void exited.then(() => reject(new Error(`sockpoold exited early (${code ?? signal}):\n${output}`)));
    });
  });
  await ready;
  return {
    child,
    socketPath,
    stateDir,
    output: () => output,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill(signal);
      const [code] = (await exited) as [number | null];
      return code;
    },
    fdCount: () => readdirSync(`/proc/${child.pid}/fd`).length,
  };
}

/** Polls `check` until it returns true or the deadline passes (no wall-clock assertions: only a bound). */
export async function eventually(
  check: () => boolean | Promise<boolean>,
  what: string | (() => string),
  timeoutMs = 10_000,
) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for: ${typeof what === 'function' ? what() : what}`);
    }
    await sleep(20);
  }
}

let configFiles = 0;
/** Writes a daemon configuration as a JSON file in the temp dir; it is removed at cleanup. */
export function writeConfigFile(config: object, cleanups: Array<() => unknown>): string {
  const path = join(tmpdir(), `sockpoold-config-${process.pid}-${configFiles++}.json`);
  writeFileSync(path, JSON.stringify(config));
  cleanups.push(() => rmSync(path, { force: true }));
  return path;
}

/** The daemon's log records (JSON lines) with message `msg`. */
export function logRecords(daemon: DaemonProcess, msg: string): Array<Record<string, unknown>> {
  return daemon
    .output()
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((record) => record.msg === msg);
}

/** One unlabelled metric's value from the daemon's Prometheus endpoint on `port` (undefined when it is not there). */
export async function metricValue(port: number, name: string): Promise<number | undefined> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const line = text.split('\n').find((entry) => entry.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.slice(name.length + 1));
}
