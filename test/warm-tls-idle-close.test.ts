// An origin that closes idle TLS connections after 1 s (node:https keepAliveTimeout) while a client sends requests
// with pauses around that second: no request fails. The daemon learns the lifetime and never hands out a session
// the server closed (the relay passes the server's EOF to its end of the pair); curl's own kept-alive connection to
// the relay may be found dead at reuse, and an idempotent request then runs again on a fresh session. Real daemon,
// real origin; the pauses are the scenario (idle gaps), not waits for an event.
import { once } from 'node:events';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { startTestDaemon, warmTlsArgs } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let server: https.Server;
let port: number;
let daemon: DaemonProcess;

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  server = https.createServer({ cert: pki.cert, key: pki.key }, (request, response) => {
    request.resume();
    request.on('end', () => response.end(`${request.method} ${request.url}`));
  });
  // The origin closes a connection after a second of silence (a TLS close_notify, then FIN).
  server.keepAliveTimeout = 1000;
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  port = (server.address() as AddressInfo).port;
  daemon = await startTestDaemon([port], {
    extraArgs: warmTlsArgs(pki.caFile, [port]),
    config: { pool: { predictive: true } },
  });
});

afterAll(async () => {
  await daemon?.stop();
  server?.closeAllConnections();
  await new Promise((resolve) => server?.close(resolve));
  pki?.cleanup();
});

describe('an origin that closes idle TLS sessions after 1 s', () => {
  it('gives no failed request, whatever the pauses between requests', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile });
    try {
      await client.prewarm([{ host: 'localhost', port: port, count: 2, https: true }]);
      const pausesMs = [0, 200, 950, 1000, 1050, 500, 1200, 0, 1500, 990, 1010, 300, 2000, 1000, 0, 1100];
      const failures: string[] = [];
      let relayed = 0;
      for (const [i, pause] of pausesMs.entries()) {
        await sleep(pause);
        // Two at once: one may take curl's kept-alive connection, the other a session of its own.
        const outcomes = await Promise.allSettled([
          client.request(`https://localhost:${port}/r${i}a`),
          client.request(`https://localhost:${port}/r${i}b`),
        ]);
        for (const [j, outcome] of outcomes.entries()) {
          if (outcome.status === 'rejected') {
            const error = outcome.reason as { code?: string; message?: string };
            failures.push(`after ${pause} ms: ${error.code}: ${error.message}`);
          } else {
            expect(outcome.value.body.toString()).toBe(`GET /r${i}${j === 0 ? 'a' : 'b'}`);
            if (outcome.value.tls?.by === 'daemon') relayed++;
          }
        }
      }
      expect(failures).toEqual([]);
      expect(relayed).toBe(2 * pausesMs.length);
    } finally {
      await client.close();
    }
  }, 120_000);
});
