// One origin, one key, against sockpoold as a real child process: a client speaking the raw protocol names one IP
// literal in every spelling the URL parser accepts (and its IPv4-mapped IPv6 spellings), and the daemon keeps one
// pool for it — one stats row, one row in its SQLite history — and judges it by one name: a denyHosts entry naming
// the address refuses every spelling. Hosts that are no host, and IPv6 zone ids, are refused with
// SOCKPOOL_ERR_INVALID_ARGUMENT.

import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { startServer } from './fixtures/native-helpers.js';
import { startDaemon, writeConfigFile } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

const SPELLINGS = [
  '127.0.0.1',
  '127.1',
  '127.0.1',
  '2130706433',
  '0x7f000001',
  '0X7F000001',
  '0x7f.1',
  '0177.0.0.1',
  '0177.0.0.01',
  '127.0.0.1.',
  '::ffff:127.0.0.1',
  '::ffff:7f00:1',
];

interface OriginRow {
  origin: string;
  hits: number;
  misses: number;
}

describe('origin keys in sockpoold', () => {
  it('every spelling of one IP literal lands in one pool: one stats row, one SQLite row', async () => {
    const echo = await startServer('127.0.0.1');
    cleanups.push(() => echo.close());
    const sockpoold = await startDaemon({ args: ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)] });
    cleanups.push(() => sockpoold.stop());
    const raw = openRawClient(sockpoold.socketPath, cleanups);

    let id = 0;
    for (const host of SPELLINGS) {
      const lease = await raw.request({ type: 'acquire', id: ++id, host, port: echo.port });
      expect(lease.message, host).toMatchObject({ type: 'lease', address: '127.0.0.1', port: echo.port });
      expect(lease.fds).toHaveLength(1);
      // The fd is ours (received); we close it and say so, which ends the lease.
      for (const fd of lease.fds) native.close(fd);
      const leaseId = (lease.message as { leaseId: number }).leaseId;
      expect((await raw.request({ type: 'closed', id: ++id, leaseId })).message).toMatchObject({ type: 'ok' });
    }
    const prewarm = await raw.request({ type: 'prewarm', id: ++id, host: '0x7f.0.0.1', port: echo.port, count: 1 });
    expect(prewarm.message).toMatchObject({ type: 'ok' });

    const reply = await raw.request({ type: 'stats', id: ++id });
    const origins = (reply.message as unknown as { stats: { origins: OriginRow[] } }).stats.origins;
    expect(origins.map((origin) => origin.origin)).toEqual([`127.0.0.1:${echo.port}`]);
    expect(origins[0]!.hits + origins[0]!.misses).toBe(SPELLINGS.length);

    // The history is written when the daemon stops (and on its flush timer before that).
    expect(await sockpoold.stop()).toBe(0);
    const db = new Database(join(sockpoold.stateDir, 'sockpool.sqlite'), { readonly: true });
    try {
      const rows = db.prepare('SELECT origin_key FROM origins').all() as Array<{ origin_key: string }>;
      expect(rows.map((row) => row.origin_key)).toEqual([`127.0.0.1:${echo.port}`]);
    } finally {
      db.close();
    }
  });

  it('a denyHosts entry naming an IP literal refuses it in every spelling, the IPv4-mapped ones included', async () => {
    const echo = await startServer('127.0.0.1');
    cleanups.push(() => echo.close());
    // allow opens the address: the denied host literal is the only thing refusing it.
    const config = writeConfigFile(
      { egress: { allow: ['127.0.0.1/32'], allowPorts: [echo.port], denyHosts: ['127.0.0.1'] } },
      cleanups,
    );
    const sockpoold = await startDaemon({ args: ['--config', config] });
    cleanups.push(() => sockpoold.stop());
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    let id = 0;
    const outcomes: Record<string, unknown> = {};
    for (const host of ['127.0.0.1', '2130706433', '::ffff:127.0.0.1', '::ffff:7f00:1']) {
      const reply = await raw.request({ type: 'acquire', id: ++id, host, port: echo.port });
      for (const fd of reply.fds) native.close(fd);
      const message = reply.message as { type: string; address?: string; fields?: { reason?: string } };
      outcomes[host] = message.type === 'lease' ? `lease to ${message.address}` : message.fields?.reason;
    }
    expect(outcomes).toEqual({
      '127.0.0.1': 'host-denied',
      '2130706433': 'host-denied',
      '::ffff:127.0.0.1': 'host-denied',
      '::ffff:7f00:1': 'host-denied',
    });
  });

  it('refuses hosts that are none, and IPv6 zone ids, with SOCKPOOL_ERR_INVALID_ARGUMENT', async () => {
    const sockpoold = await startDaemon({ args: ['--allow', '127.0.0.1/32', '--allow-port', '80'] });
    cleanups.push(() => sockpoold.stop());
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ type: 'acquire', host: 'fe80::1%eth0', port: 80 }, 'zone-id'],
      [{ type: 'acquire', host: 'fe80::1%25eth0', port: 80 }, 'zone-id'],
      [{ type: 'acquire', host: '1.2.3.999', port: 80 }, 'ipv4'],
      [{ type: 'acquire', host: 'a..b', port: 80 }, 'host-name'],
      [{ type: 'prewarm', host: 'fe80::1%eth0', port: 80, count: 1 }, 'zone-id'],
      [{ type: 'prewarm', host: '256.0.0.1', port: 80, count: 1 }, 'ipv4'],
    ];
    let id = 0;
    for (const [request, reason] of cases) {
      const reply = await raw.request({ ...request, id: ++id });
      expect(reply.message, JSON.stringify(request)).toMatchObject({
        type: 'error',
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
        fields: { reason },
      });
      expect(reply.fds).toEqual([]);
    }
    // Refused requests leave nothing behind, and the session is still good.
    const reply = await raw.request({ type: 'stats', id: ++id });
    expect((reply.message as unknown as { stats: { origins: unknown[] } }).stats.origins).toEqual([]);
  });
});
