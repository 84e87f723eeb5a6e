// 1,000 relayed transfers at once: each on a warm TLS session of its own (HTTP/1.1, so 1,000 sessions, 1,000 loopback
// pairs and 1,000 TCP connections to the origin), each body checked by SHA-256 at both ends; afterwards every fd
// comes back, in the client and in the daemon (whose sessions the origin closes). Real daemon, real node:https origin.
// System tier: it needs some 4,000 open files per process (Node raises its soft limit to the hard one) and takes
// about half a minute on a loaded 2-core machine, mostly for the 1,000 handshakes made first.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  type daemonStats,
  eventually,
  fdCount,
  httpsOrigin,
  type Origin,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

const TRANSFERS = 1000;

let pki: TestPki;
let origin: Origin;
let daemon: DaemonProcess;
/** Requests waiting at the origin: none is answered before all of them arrived (they are truly concurrent). */
const waiting: Array<() => void> = [];

/** The soft limit on open files of a process (Node raises its own to the hard limit at start). */
function openFileLimit(pid: number | 'self'): number {
  const line = readFileSync(`/proc/${pid}/limits`, 'utf8')
    .split('\n')
    .find((l) => l.startsWith('Max open files'));
  return Number(line?.split(/\s+/)[3]);
}

function bodyOf(i: number): Buffer {
  return Buffer.alloc(4096 + i, i % 251);
}

beforeAll(async () => {
  // The test process holds the origin's 1,000 sockets and curl's 1,000; the daemon about 3 per session.
  const limit = openFileLimit('self');
  if (limit < 4 * TRANSFERS) {
    throw new Error(`this test needs ${4 * TRANSFERS} open files per process; the limit here is ${limit} (ulimit -Hn)`);
  }
  pki = createTestPki(['localhost']);
  origin = await httpsOrigin(pki, (request, response) => {
    const hash = createHash('sha256');
    let bytes = 0;
    request.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      bytes += chunk.length;
    });
    request.on('end', () => {
      const digest = hash.digest('hex');
      const reply = () => {
        // The answer carries the request's digest and a body of its own for the client to check.
        const path = request.url ?? '';
        const own = bodyOf(Number(path.slice(3)));
        response.setHeader('x-request-sha256', `${bytes} ${digest}`);
        response.end(own);
      };
      waiting.push(reply);
      if (waiting.length === TRANSFERS) for (const answer of waiting.splice(0)) answer();
    });
  });
  daemon = await startTestDaemon([origin.port], {
    extraArgs: warmTlsArgs(pki.caFile, [origin.port]),
    config: {
      pool: { defaults: { maxPerOrigin: 2 * TRANSFERS, maxIdle: 2 * TRANSFERS } },
      access: { maxPendingPerClient: TRANSFERS },
      // Handshakes with time to spare: the machine may be loaded (the test is not about them).
      tls: { handshakeTimeoutMs: 60_000 },
      quotas: {
        maxPendingPerUid: 2 * TRANSFERS,
        maxLookupsPerUid: 2 * TRANSFERS,
        maxPrewarmPerUid: 2 * TRANSFERS,
      },
    },
  });
  expect(openFileLimit(daemon.child.pid!)).toBeGreaterThanOrEqual(4 * TRANSFERS);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
  pki?.cleanup();
});

describe('1,000 concurrent relayed transfers', () => {
  it('keeps every body intact both ways and gives every fd back', async () => {
    const clientBefore = fdCount();
    let daemonBefore = 0;
    const client = new SockpoolClient({
      socketPath: daemon.socketPath,
      threads: 2,
      concurrencyPerThread: TRANSFERS / 2,
      caFile: pki.caFile,
      timeoutMs: 120_000,
      acquireTimeoutMs: 120_000,
    });
    try {
      // The sessions are made first (1,000 handshakes on a shared 2-core machine take their time): what is tested is
      // the relay of 1,000 transfers at once, each on a warm session.
      const idleSessions = async () =>
        ((await client.stats()) as unknown as Awaited<ReturnType<typeof daemonStats>>).origins.find(
          (o) => o.origin === `localhost:${origin.port} tls`,
        )?.idle ?? 0;
      // The daemon's baseline: its relay thread started (it holds a few fds of its own) with one session, which
      // goes at the end with the others. (Closing it now would teach the pool a short idle lifetime.)
      await client.prewarm([{ host: 'localhost', port: origin.port, count: 1, https: true }]);
      await eventually(async () => (await idleSessions()) >= 1, 'the relay thread started', 60_000);
      daemonBefore = daemon.fdCount();
      await client.prewarm([{ host: 'localhost', port: origin.port, count: TRANSFERS, https: true }]);
      await eventually(
        async () => (await idleSessions()) >= TRANSFERS,
        `${TRANSFERS} warm TLS sessions (${await idleSessions()} idle, ${origin.connections()} at the origin)`,
        200_000,
      );
      const results = await Promise.all(
        Array.from({ length: TRANSFERS }, async (_, i) => {
          const body = bodyOf(i).subarray(0, 1000 + i);
          const response = await client.request(`https://localhost:${origin.port}/c/${i}`, {
            method: 'POST',
            body,
          });
          const sent = `${body.length} ${createHash('sha256').update(body).digest('hex')}`;
          const got = response.headers.find(([name]) => name === 'x-request-sha256')?.[1];
          return response.tls?.by === 'daemon' && got === sent && response.body.equals(bodyOf(i))
            ? 'intact'
            : `#${i} broken`;
        }),
      );
      expect(results.filter((r) => r !== 'intact')).toEqual([]);
      expect(origin.connections()).toBeGreaterThanOrEqual(TRANSFERS);
    } finally {
      await client.close();
    }
    await eventually(() => fdCount() <= clientBefore, `client fds back to ${clientBefore} (now ${fdCount()})`);
    // The sessions went back to the pool idle (curl closed its ends: released, not reused, so closed); once the
    // origin drops its side too, nothing of them is left in the daemon.
    for (const socket of origin.sockets) socket.destroy();
    await eventually(
      () => daemon.fdCount() <= daemonBefore,
      `daemon fds back to ${daemonBefore} (now ${daemon.fdCount()})`,
      60_000,
    );
  }, 300_000);
});
