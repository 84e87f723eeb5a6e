// A real redis-server (the Debian package) for tests and benchmarks: on a free loopback port, in its own temp dir,
// with no persistence (`--save ''`, no AOF), so that a restart on the same port comes back empty like a crashed
// Redis without a disk. `kill()` is SIGKILL (an outage); `start()` again brings it back on the same port.
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnChild } from './children.js';
import { freePort } from './free-port.js';

export interface RedisServer {
  port: number;
  url: string;
  /** Starts it (again) on the same port; resolves once it accepts connections. */
  start(): Promise<void>;
  /** SIGKILL, and wait for the exit. */
  kill(): Promise<void>;
  /** start() unless it runs: after a test that killed it failed before starting it again, the next tests find it up. */
  ensureRunning(): Promise<void>;
  /** Runs redis-cli against it and returns its output (tests read INFO, MONITOR-free counters, keys). */
  cli(...args: string[]): Promise<string>;
  close(): Promise<void>;
}

export async function startRedis(): Promise<RedisServer> {
  // On an address of loopback's /8 of its own, not 127.0.0.1: a test that kills it and starts it again leaves its port
  // free in between, and a server of another test (or another run) taking that port on 127.0.0.1 no longer takes it
  // from this Redis (seen once: a whole file's fleet tests failed behind one such restart).
  const host = `127.${1 + Math.floor(Math.random() * 200)}.${Math.floor(Math.random() * 256)}.${1 + Math.floor(Math.random() * 254)}`;
  const port = await freePort(host);
  const dir = mkdtempSync(join(tmpdir(), 'sockpool-redis-'));
  let child: ChildProcess | undefined;
  const start = async () => {
    const started = spawnChild(
      'redis-server',
      ['--port', String(port), '--bind', host, '--save', '', '--appendonly', 'no', '--dir', dir],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    child = started;
    let output = '';
    await new Promise<void>((resolve, reject) => {
      const onData = (chunk: Buffer) => {
        output += chunk;
        if (output.includes('Ready to accept connections')) resolve();
      };
      started.stdout!.on('data', onData);
      started.stderr!.on('data', onData);
      started.once('error', reject);
      started.once('exit', (code) => reject(new Error(`redis-server exited (${code}):\n${output}`)));
    });
  };
  const kill = async () => {
    const running = child;
    child = undefined;
    if (!running || running.exitCode !== null || running.signalCode !== null) return;
    const exited = once(running, 'exit');
    running.kill('SIGKILL');
    await exited;
  };
  const cli = (...args: string[]) =>
    new Promise<string>((resolve, reject) => {
      const run = spawn('redis-cli', ['-h', host, '-p', String(port), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
      let output = '';
      run.stdout.on('data', (chunk: Buffer) => {
        output += chunk;
      });
      run.once('error', reject);
      // 'close', not 'exit': its pipes are closed by then (tests count their fds).
      run.once('close', (code) => (code === 0 ? resolve(output) : reject(new Error(`redis-cli exited ${code}`))));
    });
  await start();
  return {
    port,
    url: `redis://${host}:${port}/0`,
    start,
    kill,
    async ensureRunning() {
      if (child === undefined || child.exitCode !== null || child.signalCode !== null) await start();
    },
    cli,
    async close() {
      await kill();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
