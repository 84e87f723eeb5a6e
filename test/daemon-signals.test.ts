// sockpoold's signals around its start and its stop, against the real daemon child process: a SIGHUP while it
// starts (Node's default action for it is to end the process) reloads once the start has finished; a SIGHUP once a
// stop has begun is ignored (no reload of closed pools, no RELOADING=1 or READY=1 to systemd after STOPPING=1).
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { PoolSnapshot } from '../daemon/client-view.js';
import { startServer } from './fixtures/native-helpers.js';
import { NotifySocket } from './fixtures/systemd-notify-socket.js';
import { spawnChild } from './helpers/children.js';
import { daemonMain, eventually, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'sockpoold-signals-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Whether a SIGHUP sent to the process waits to be delivered (ShdPnd: signals pending for the whole process). */
function sighupPending(pid: number): boolean {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return false; // gone: delivered, with the default action
  }
  const mask = /^ShdPnd:\s*([0-9a-f]+)$/m.exec(status)?.[1] ?? '0';
  return (BigInt(`0x${mask}`) & 1n) !== 0n; // SIGHUP is signal 1: bit 0
}

async function stats(raw: RawClient): Promise<PoolSnapshot> {
  const reply = await raw.request({ type: 'stats', id: 999_999 });
  return (reply.message as unknown as { stats: PoolSnapshot }).stats;
}

/** sockpoold as a child process of its own (its state in a temporary directory), its output collected. */
function spawnDaemon(options: {
  nodeArgs?: string[];
  env?: Record<string, string>;
  onOutput?: (output: string, child: ChildProcess) => void;
}): { child: ChildProcess; output(): string; closed: Promise<unknown> } {
  const dir = tempDir();
  const child = spawnChild(
    process.execPath,
    [
      ...(options.nodeArgs ?? []),
      daemonMain,
      '--socket',
      join(dir, 's.sock'),
      '--state-dir',
      dir,
      '--log-level',
      'debug',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...options.env } },
  );
  cleanups.push(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  const closed = once(child, 'close');
  let output = '';
  const onData = (chunk: Buffer) => {
    output += chunk;
    options.onOutput?.(output, child);
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  return { child, output: () => output, closed };
}

/** The daemon survived the SIGHUP, reloaded after it said ready, and stops cleanly. */
async function expectReloadedAfterStart(daemon: ReturnType<typeof spawnDaemon>): Promise<void> {
  const { child, output } = daemon;
  await eventually(
    () => output().includes('configuration reloaded') || child.exitCode !== null || child.signalCode !== null,
    'a reload after the start, or an exit',
    30_000,
  );
  expect({ signal: child.signalCode, exitCode: child.exitCode }).toEqual({ signal: null, exitCode: null });
  expect(output().indexOf('configuration reloaded')).toBeGreaterThan(output().indexOf('sockpoold ready'));
  child.kill('SIGTERM');
  await daemon.closed;
  expect(child.exitCode).toBe(0);
}

describe('SIGHUP', () => {
  it('while the daemon starts: it survives, and reloads once the start has finished', async () => {
    let hupSent = false;
    const daemon = spawnDaemon({
      onOutput: (output, child) => {
        // The bind restriction's line is logged before Sockpoold.start(): the daemon is starting.
        if (!hupSent && output.includes('TCP bind restriction')) {
          hupSent = true;
          child.kill('SIGHUP');
        }
      },
    });
    await expectReloadedAfterStart(daemon);
  }, 40_000);

  it('while the daemon loads its modules: it survives, and reloads once the start has finished', async () => {
    const dir = tempDir();
    const marker = join(dir, 'loading');
    const go = join(dir, 'go');
    // The preload holds the load of daemon.js (one of the modules the command needs) until the test says go.
    const daemon = spawnDaemon({
      nodeArgs: ['--import', join(import.meta.dirname, 'fixtures', 'hold-module-load.mjs')],
      env: { HOLD_MODULE: '/dist/daemon/daemon.js', HOLD_MARKER: marker, HOLD_UNTIL: go },
    });
    const { child } = daemon;
    await eventually(() => existsSync(marker) || child.exitCode !== null, 'the module load to be held', 30_000);
    child.kill('SIGHUP');
    // The signal is delivered at once (the default action would end the process now); then the load goes on.
    await eventually(() => !sighupPending(child.pid!), 'the SIGHUP to be delivered');
    writeFileSync(go, '');
    await expectReloadedAfterStart(daemon);
  }, 40_000);

  it('once a stop has begun: ignored, and nothing after STOPPING=1 says reloading or ready', async () => {
    const echo = await startServer('127.0.0.1');
    cleanups.push(() => echo.close());
    const dir = tempDir();
    const notify = new NotifySocket(join(dir, 'notify.sock'));
    cleanups.push(() => notify.close());
    const configPath = writeConfigFile(
      { egress: { allow: ['127.0.0.1/32'], allowPorts: [echo.port] }, pool: { predictive: false } },
      cleanups,
    );
    const sockpoold = await startDaemon({
      args: ['--config', configPath],
      env: { NOTIFY_SOCKET: notify.path },
      stateDir: dir,
    });
    cleanups.push(() => sockpoold.stop());
    await notify.waitFor((text) => text.startsWith('READY=1'));
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    await raw.request({ type: 'prewarm', id: 1, host: '127.0.0.1', port: echo.port, count: 4 });
    await eventually(async () => (await stats(raw)).idle === 4, 'four idle');
    // PID 1 busy: the stop waits for room in the notify queue to store the idle sockets, so the SIGHUP comes
    // while it is under way.
    notify.busy();
    sockpoold.child.kill('SIGTERM');
    await eventually(() => sockpoold.output().includes('"msg":"stopping"'), 'stopping');
    sockpoold.child.kill('SIGHUP');
    await eventually(
      () => /reload ignored|configuration reloaded|reload failed/.test(sockpoold.output()),
      'the SIGHUP handled',
    );
    notify.resume();
    await once(sockpoold.child, 'close');
    expect(sockpoold.child.exitCode).toBe(0);
    expect(sockpoold.output()).toContain('reload ignored');
    const texts = notify.texts().filter((text) => !text.startsWith('STATUS=filler'));
    const afterStart = texts.slice(texts.findIndex((text) => text.startsWith('READY=1')) + 1);
    const firstLines = afterStart.map((text) => text.split('\n')[0]);
    expect(firstLines).toContain('STOPPING=1');
    expect(firstLines.filter((line) => line === 'READY=1' || line === 'RELOADING=1')).toEqual([]);
  }, 40_000);

  it('while PID 1’s notify queue is full: RELOADING=1 is retried as READY=1 is, and READY=1 comes after it', async () => {
    // Sent once, RELOADING=1 was dropped (its congestion only logged) while READY=1 was retried: under
    // Type=notify-reload systemd would wait for RELOADING=1 until the reload job timed out.
    const dir = tempDir();
    const notify = new NotifySocket(join(dir, 'notify.sock'));
    cleanups.push(() => notify.close());
    const configPath = writeConfigFile({ pool: { predictive: false } }, cleanups);
    const sockpoold = await startDaemon({
      args: ['--config', configPath],
      env: { NOTIFY_SOCKET: notify.path },
      stateDir: dir,
    });
    cleanups.push(() => sockpoold.stop());
    await notify.waitFor((text) => text.startsWith('READY=1'));
    // PID 1 busy: its queue filled to the brim, so the daemon's next notification meets EAGAIN.
    notify.busy();
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('configuration reloaded'), 'the reload done');
    notify.resume(); // PID 1 catches up within the 5 s a notification is retried for
    const readies = () => notify.texts().filter((text) => text.startsWith('READY=1')).length;
    await notify.waitFor(() => readies() >= 2);
    const lines = notify
      .texts()
      .filter((text) => !text.startsWith('STATUS='))
      .map((text) => text.split('\n')[0]);
    expect(lines).toEqual(['READY=1', 'RELOADING=1', 'READY=1']);
  }, 40_000);
});
