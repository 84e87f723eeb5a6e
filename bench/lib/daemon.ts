// Starts the compiled sockpoold (dist/daemon/main.js) for a benchmark: its own socket, state directory and JSON
// config file in `dir`, a raised fd limit, logs at `warn` so logging stays off the measured path. Ready when
// a hello round trip succeeds.
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { BenchDaemonClient } from './daemon-client.js';
import { type BenchChild, spawnChild } from './proc.js';

export const repoRoot = join(import.meta.dirname, '..', '..', '..');
export const daemonMain = join(repoRoot, 'dist', 'daemon', 'main.js');

export interface BenchDaemonOptions {
  /** Directory for the socket, the state and the config file (created). */
  dir: string;
  /** The config file's contents (JSON). */
  config: Record<string, unknown>;
  /** Extra command-line flags (--allow, --allow-port, ...). */
  args: string[];
  /** Node flags for the daemon (e.g. --cpu-prof). */
  nodeArgs?: string[];
  /** Wraps the command (e.g. strace); then `pid` is the wrapper's. */
  wrap?: string[];
  nofile?: number;
  /** Another build's main.js (A/B comparisons of a daemon change); default dist/daemon/main.js. */
  main?: string;
  /** Runs the daemon in a session of its own (see SpawnOptions.ownSession). */
  ownSession?: boolean;
}

export interface BenchDaemon {
  process: BenchChild;
  pid: number;
  socketPath: string;
  stop(): Promise<void>;
}

export async function startBenchDaemon(options: BenchDaemonOptions): Promise<BenchDaemon> {
  const main = options.main ?? daemonMain;
  if (!existsSync(main)) throw new Error(`${main} missing: run npm run build first`);
  mkdirSync(options.dir, { recursive: true });
  const socketPath = join(options.dir, 'sockpoold.sock');
  const configPath = join(options.dir, 'sockpoold.json');
  writeFileSync(configPath, `${JSON.stringify(options.config, null, 2)}\n`);
  const child = spawnChild(
    [
      process.execPath,
      ...(options.nodeArgs ?? []),
      main,
      '--config',
      configPath,
      '--socket',
      socketPath,
      '--state-dir',
      join(options.dir, 'state'),
      '--log-level',
      'warn',
      ...options.args,
    ],
    { nofile: options.nofile ?? 65536, wrap: options.wrap, ownSession: options.ownSession },
  );
  // Generous: on a loaded machine a cold start (Node, SQLite, the configuration) has taken over 15 s.
  const deadline = performance.now() + 60_000;
  for (;;) {
    if (child.child.exitCode !== null || child.child.signalCode !== null) {
      throw new Error(`sockpoold exited early:\n${child.stderr()}`);
    }
    if (existsSync(socketPath)) {
      try {
        const probe = new BenchDaemonClient(socketPath);
        await probe.hello();
        probe.close();
        break;
      } catch {}
    }
    if (performance.now() > deadline) {
      await child.stop('SIGKILL');
      throw new Error(`sockpoold did not answer hello within 60 s:\n${child.stderr()}`);
    }
    await sleep(20);
  }
  return { process: child, pid: child.pid, socketPath, stop: () => child.stop('SIGTERM') };
}
