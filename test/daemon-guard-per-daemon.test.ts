// Two daemons embedded in one process: whether the release check trusts the kernel to refuse a reconnect of a lent
// socket (the connect guard enforced, connect-guard.ts) is the daemon's own, recorded on each socket it connects: a
// daemon told of no guard reads the peer at every release, whatever another daemon of the process was told. The
// guard itself is not set up here (that needs root: test/daemon-connect-guard.system); the other daemon is given an
// enforced report, which its connector checks per socket against the kernel (native.guardCovers).
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import { parseConfig } from '../daemon/config.js';
import { EMBEDDED_UNGUARDED } from '../daemon/connect-guard.js';
import { Sockpoold } from '../daemon/daemon.js';
import { createLogger } from '../daemon/log.js';
import { fdCount } from './fixtures/native-helpers.js';
import { eventually, repoRoot } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';
import { RawClient } from './helpers/raw-client.js';
import { pathOrigin } from './helpers/trust.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function embedded(port: number, enforced: boolean): Promise<Sockpoold> {
  const work = mkdtempSync(join(tmpdir(), 'sockpool-guard-per-daemon-'));
  cleanups.push(() => rmSync(work, { recursive: true, force: true }));
  const config = parseConfig(
    {
      socket: join(work, 'sockpoold.sock'),
      stateDir: join(work, 'state'),
      egress: { allow: ['127.0.0.1/32'], allowPorts: [port] },
      pool: { defaults: { minIdle: 0 } },
      metricsPort: await freePort(),
    },
    'test',
  );
  const sockpoold = await Sockpoold.start({
    config,
    log: createLogger('error'),
    connectGuard: enforced ? { state: 'enforced', detail: 'told so by the test' } : EMBEDDED_UNGUARDED,
  });
  cleanups.push(() => sockpoold.stop({ storeIdle: false }));
  return sockpoold;
}

/** reconnect-client.py: disconnects its lease through its copy, connects it to its own listener, releases it. */
async function reconnect(socketPath: string, port: number): Promise<Record<string, number | string>> {
  const { stdout } = await promisify(execFile)(
    'python3',
    [join(repoRoot, 'test', 'fixtures', 'reconnect-client.py'), socketPath, String(port)],
    { timeout: 30_000 },
  );
  return JSON.parse(stdout.trim()) as Record<string, number | string>;
}

describe('the connect guard is trusted per daemon', () => {
  it('a daemon with no guard reads the peer at release though a daemon constructed after it in the same process has its guard enforced', async () => {
    const before = fdCount();
    const origin = await pathOrigin(cleanups);
    const unguarded = await embedded(origin.port, false);
    // Constructed last: a process-wide trust followed it, and the unguarded daemon skipped its peer read too.
    const guarded = await embedded(origin.port, true);
    // The unguarded daemon's socket, connected elsewhere through the client's copy: refused at release, and the next
    // lease of the origin goes to the origin.
    expect(await reconnect(unguarded.socketPath, origin.port)).toMatchObject({
      reconnected: 1,
      release: 'SOCKPOOL_ERR_PROTOCOL:used',
      next: origin.port,
    });
    // The daemon told its guard is enforced asked the kernel for each socket it connected: no guard covers them in
    // this process, so its release check reads the peer as well.
    expect(await reconnect(guarded.socketPath, origin.port)).toMatchObject({
      reconnected: 1,
      release: 'SOCKPOOL_ERR_PROTOCOL:used',
      next: origin.port,
    });
    // ...and its stats say so: its guard reads `enforced`, yet the sockets it connected are not covered.
    const guardOf = async (daemon: Sockpoold) => {
      const client = new RawClient(daemon.socketPath);
      try {
        const reply = await client.request({ type: 'stats', id: 1 });
        return (reply.message as unknown as { stats: { connectGuard: Record<string, unknown> } }).stats.connectGuard;
      } finally {
        client.close();
      }
    };
    expect(await guardOf(guarded)).toMatchObject({ state: 'enforced', uncoveredConnects: expect.any(Number) });
    expect((await guardOf(guarded)).uncoveredConnects).toBeGreaterThanOrEqual(2);
    expect(await guardOf(unguarded)).not.toHaveProperty('uncoveredConnects');
    // ...and so does its counter, for an alert (the state gauge still reads enforced).
    const uncoveredOf = async (daemon: Sockpoold) => {
      const text = await (await fetch(`http://127.0.0.1:${daemon.metricsPort}/metrics`)).text();
      return Number(/^sockpool_connect_guard_uncovered_connects_total (\d+)$/m.exec(text)?.[1]);
    };
    expect(await uncoveredOf(guarded)).toBe((await guardOf(guarded)).uncoveredConnects);
    expect(await uncoveredOf(unguarded)).toBe(0);
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
    // (The origin's sockets and the stopped daemons' deferred closes end after their callers return.)
    await eventually(() => fdCount() === before, `the fd count back to ${before}`);
    expect(fdCount()).toBe(before);
  });
});
