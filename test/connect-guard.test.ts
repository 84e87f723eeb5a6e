import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { repoRoot, startDaemon } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';
import { openRawClient } from './helpers/raw-client.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

describe('connect guard set-up', () => {
  it('a capability drop a system call filter refuses is a warning: the daemon starts and serves', async () => {
    // As a unit file older than the guard would run it: its SystemCallFilter= lacks capset (before: the command
    // threw at start and the daemon never came up).
    const sockpoold = await startDaemon({
      args: ['--allow', '127.0.0.1/32', '--allow-port', '9'],
      wrap: ['python3', join(repoRoot, 'test', 'fixtures', 'deny-capset.py')],
    });
    cleanups.push(() => sockpoold.stop());
    expect(sockpoold.output()).toContain('could not drop the connect guard set-up capabilities');
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    expect((await raw.request({ type: 'hello', id: 1, version: 1 })).message).toMatchObject({ type: 'hello' });
  });

  it('reports its state in stats and the sockpool_connect_guard gauge: enforced as root, unsupported (why) otherwise', async () => {
    const metricsPort = await freePort();
    const sockpoold = await startDaemon({ args: ['--metrics-port', String(metricsPort)] });
    cleanups.push(() => sockpoold.stop());
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const reply = await raw.request({ type: 'stats', id: 1 });
    const guard = (reply.message as unknown as { stats: { connectGuard: { state: string; detail: string } } }).stats
      .connectGuard;
    const state = process.getuid?.() === 0 ? 'enforced' : 'unsupported';
    expect(guard.state).toBe(state);
    if (state === 'unsupported') expect(guard.detail).toMatch(/needs CAP_BPF and CAP_NET_ADMIN/);
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(text).toContain(`sockpool_connect_guard{state="${state}"} 1`);
    expect(text).toContain('sockpool_connect_guard{state="off"} 0');
  });
});
