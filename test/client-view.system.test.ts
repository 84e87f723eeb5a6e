// What a client may see, with real uids (root: the clients run as other uids through the `sockpool` CLI): `stats`
// and `status` show a uid only the origins it named, the full view and `warm` need an admin uid (root, the
// daemon's own uid, access.adminUids), and a non-admin's `warm` is refused with SOCKPOOL_ERR_ACCESS_DENIED. The
// filtering logic alone is in client-view.test.ts.
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { startServer } from './fixtures/native-helpers.js';
import { spawnChild } from './helpers/children.js';
import { type DaemonProcess, eventually, repoRoot, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { pathOrigin } from './helpers/trust.js';

const run = promisify(execFile);
const cli = join(repoRoot, 'dist', 'client', 'cli.js');

/** Two client uids that are not admins (nobody, and one with no passwd entry), and one named in adminUids. */
const CLIENT_UID = 65534;
const OTHER_CLIENT_UID = 65532;
const ADMIN_UID = 65533;

beforeAll(() => {
  if (process.getuid?.() !== 0) {
    throw new Error('client-view.system.test.ts runs clients as other uids and needs root (npm run test:system)');
  }
});

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function daemon(ports: number[], config: object = {}): Promise<DaemonProcess> {
  const args = ports.flatMap((port) => ['--allow-port', String(port)]);
  const file = writeConfigFile({ access: { socketMode: '0666', adminUids: [ADMIN_UID] }, ...config }, cleanups);
  const started = await startDaemon({ args: ['--allow', '127.0.0.1/32', ...args, '--config', file] });
  chmodSync(dirname(started.socketPath), 0o755);
  cleanups.push(() => started.stop());
  return started;
}

/** `sockpool ARGS` as `uid` (undefined: this process's uid, root); rejects with stderr on a non-zero exit. */
function sockpool(socketPath: string, uid: number | undefined, ...args: string[]) {
  return run(process.execPath, [cli, '--socket', socketPath, ...args], {
    timeout: 30_000,
    ...(uid === undefined ? {} : { uid, gid: uid }),
  });
}

interface StatsView {
  view: 'all' | 'uid';
  uid?: number;
  originCount: number;
  origins: Array<{ origin: string; idle: number; sharedCap?: object }>;
  own?: { sessions: number };
  clients?: number;
}

async function statsAs(socketPath: string, uid: number | undefined): Promise<StatsView> {
  return JSON.parse((await sockpool(socketPath, uid, 'stats', '--json')).stdout) as StatsView;
}

describe('what a client may see', () => {
  it("shows each uid only its own uid's origins; an admin uid sees every origin", async () => {
    const a = await pathOrigin(cleanups);
    const b = await pathOrigin(cleanups);
    const sockpoold = await daemon([a.port, b.port]);
    const originA = `127.0.0.1:${a.port}`;
    const originB = `127.0.0.1:${b.port}`;
    // One request each, through the pool, as two different uids.
    expect((await sockpool(sockpoold.socketPath, CLIENT_UID, 'get', `http://${originA}/from-a`)).stdout).toBe(
      '/from-a',
    );
    expect((await sockpool(sockpoold.socketPath, OTHER_CLIENT_UID, 'get', `http://${originB}/from-b`)).stdout).toBe(
      '/from-b',
    );

    const mine = await statsAs(sockpoold.socketPath, CLIENT_UID);
    expect(mine).toMatchObject({ view: 'uid', uid: CLIENT_UID, originCount: 1 });
    expect(mine.origins.map((row) => row.origin)).toEqual([originA]);
    expect(mine.own?.sessions).toBe(1); // the CLI's own connection
    expect(mine).not.toHaveProperty('clients');
    const theirs = await statsAs(sockpoold.socketPath, OTHER_CLIENT_UID);
    expect(theirs.origins.map((row) => row.origin)).toEqual([originB]);

    const status = (await sockpool(sockpoold.socketPath, CLIENT_UID, 'status')).stdout;
    expect(status).toContain(`uid ${CLIENT_UID}'s origins 1`);
    expect(status).not.toContain('clients');

    // An admin by access.adminUids, and root: every origin, with the process-wide figures.
    for (const uid of [ADMIN_UID, undefined]) {
      const all = await statsAs(sockpoold.socketPath, uid);
      expect(all.view).toBe('all');
      expect(all.origins.map((row) => row.origin).sort()).toEqual([originA, originB].sort());
      expect(all.clients).toBeGreaterThanOrEqual(1);
    }
    expect((await sockpool(sockpoold.socketPath, undefined, 'status')).stdout).toMatch(/origins 2, .*clients \d+/);
  });

  it("refuses a non-admin uid's warm with SOCKPOOL_ERR_ACCESS_DENIED; an admin uid warms any origin", async () => {
    const a = await pathOrigin(cleanups);
    const sockpoold = await daemon([a.port]);
    const origin = `127.0.0.1:${a.port}`;
    const refused = await sockpool(sockpoold.socketPath, CLIENT_UID, 'warm', origin, '2').then(
      () => undefined,
      (error: { code: number; stderr: string }) => error,
    );
    expect(refused?.code).toBe(1);
    expect(refused?.stderr).toContain('SOCKPOOL_ERR_ACCESS_DENIED');
    expect(refused?.stderr).toContain(`uid ${CLIENT_UID} is not one`);
    // Nothing was warmed, and the refused uid was not made a user of the origin.
    expect((await statsAs(sockpoold.socketPath, undefined)).originCount).toBe(0);

    expect((await sockpool(sockpoold.socketPath, ADMIN_UID, 'warm', origin, '2')).stdout).toContain('warming 2');
    await eventually(
      async () => (await statsAs(sockpoold.socketPath, ADMIN_UID)).origins[0]?.idle === 2,
      'two idle sockets warmed by the admin uid',
    );
    // The client uid named nothing: it still sees no origin.
    expect((await statsAs(sockpoold.socketPath, CLIENT_UID)).originCount).toBe(0);
  });

  it("shows a uid the shared cap of an origin it named through a proxy, counting every uid's connections to the origin, and not the pool it did not name", async () => {
    const origin = await startServer('127.0.0.1');
    cleanups.push(() => origin.close());
    // A proxy that answers every CONNECT with 200, then echoes.
    const proxy = await startServer('127.0.0.1', (socket) => {
      socket.once('data', () => {
        socket.write('HTTP/1.1 200 Connection established\r\n\r\n');
        socket.pipe(socket);
      });
    });
    cleanups.push(() => proxy.close());
    const sockpoold = await daemon([origin.port, proxy.port], {
      proxies: [{ name: 'corp', url: `http://127.0.0.1:${proxy.port}` }],
      pool: { predictive: false, defaults: { maxPerOrigin: 3 } },
    });
    const key = `127.0.0.1:${origin.port}`;
    // Root holds one lease directly; CLIENT_UID, in a process of its own, two through corp.
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const direct = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    expect(direct.message).toMatchObject({ type: 'lease' });
    cleanups.push(() => {
      for (const fd of direct.fds) native.close(fd);
    });
    const holder = spawnChild(
      process.execPath,
      [
        join(repoRoot, 'test', 'fixtures', 'lease-holder.mjs'),
        sockpoold.socketPath,
        '127.0.0.1',
        String(origin.port),
        '2',
        'corp',
      ],
      { stdio: ['ignore', 'pipe', 'inherit'], uid: CLIENT_UID, gid: CLIENT_UID },
    );
    cleanups.push(async () => {
      holder.kill('SIGKILL');
      if (holder.exitCode === null && holder.signalCode === null) await once(holder, 'exit');
    });
    const [line] = (await once(holder.stdout!, 'data')) as [Buffer];
    expect(line.toString()).toBe('held 2\n');

    const sharedCap = { connections: 3, maxPerOrigin: 3, waiting: 0 };
    const mine = await statsAs(sockpoold.socketPath, CLIENT_UID);
    expect(mine.origins).toEqual([expect.objectContaining({ origin: `${key} via corp`, sharedCap })]);
    // A uid that named neither way sees no row of the origin, shared cap or not.
    expect((await statsAs(sockpoold.socketPath, OTHER_CLIENT_UID)).origins).toEqual([]);
    // An admin sees both rows, with the same figures.
    const all = await statsAs(sockpoold.socketPath, ADMIN_UID);
    expect(all.origins.filter((row) => row.origin.startsWith(key)).map((row) => [row.origin, row.sharedCap])).toEqual(
      expect.arrayContaining([
        [key, sharedCap],
        [`${key} via corp`, sharedCap],
      ]),
    );
  });
});
