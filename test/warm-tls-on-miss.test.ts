// `warmTlsOnMiss = "tcp"`: an https acquire of a warm TLS origin that finds no session idle gets a TCP lease and the
// client does TLS itself, instead of waiting for a handshake (a crawler that does not announce its hosts would
// otherwise pay the daemon's handshake and the relay for every connection it opens). An idle session still goes to
// the acquire; the miss and a client queue's lookahead are demand for TCP sockets, while the application's prewarm
// still makes sessions; fds come back. Real daemon process, real node:https origins. (The mTLS side, never a TCP
// lease for an origin with a client certificate, is in warm-tls-mtls.test.ts.)
import { once } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import * as native from '../shared/native.js';
import type { LeaseReply } from '../shared/protocol.js';
import { tlsTrustOf } from '../worker/tls-trust.js';
import {
  echoHandler,
  eventually,
  fdCount,
  httpsOrigin,
  type Origin,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let origin: Origin;
/** An origin no test warms: every acquire to it is a miss. */
let untouched: Origin;
/** Answers after a while: a request to it keeps a client's only slot taken. */
let slow: Origin;
/** Only ever named by a request waiting in a client's queue (its lookahead). */
let queued: Origin;
/** Accepts and never answers: a TLS handshake with it stays under way until the test ends. */
let silent: net.Server;
let silentPort: number;
const silentSockets = new Set<net.Socket>();
let daemon: DaemonProcess;
let trust: string;
const cleanups: Array<() => unknown> = [];
const REFUSED_NAMES = Array.from({ length: 20 }, (_, i) => `refused${i}.test`);

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  trust = tlsTrustOf({ caFile: pki.caFile })!;
  origin = await httpsOrigin(pki, echoHandler());
  untouched = await httpsOrigin(pki, echoHandler());
  slow = await httpsOrigin(pki, echoHandler(1_000));
  queued = await httpsOrigin(pki, echoHandler());
  silent = net.createServer((socket) => {
    silentSockets.add(socket);
    socket.on('close', () => silentSockets.delete(socket));
  });
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  silentPort = (silent.address() as net.AddressInfo).port;
  daemon = await startTestDaemon([origin.port, untouched.port, slow.port, queued.port, silentPort], {
    extraArgs: [
      ...warmTlsArgs(pki.caFile, [origin.port, untouched.port, slow.port, queued.port, silentPort]),
      // Names that resolve where the policy does not go (only 127.0.0.1 is allowed): refused after the lookup.
      ...REFUSED_NAMES.flatMap((name) => ['--resolve', `${name}:${origin.port}:127.0.0.2`]),
    ],
    config: { pool: { defaults: { warmTlsOnMiss: 'tcp' } } },
  });
});

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await daemon?.stop();
  await origin?.close();
  await untouched?.close();
  await slow?.close();
  await queued?.close();
  for (const socket of silentSockets) socket.destroy();
  await new Promise<void>((resolve) => (silent ? silent.close(() => resolve()) : resolve()));
  pki?.cleanup();
});

interface OriginRow {
  origin: string;
  idle: number;
  connecting: number;
  demandRatePerS: number;
  misses: number;
  hits: number;
}

async function originRows(raw: ReturnType<typeof openRawClient>, id: number): Promise<OriginRow[]> {
  const stats = await raw.request({ type: 'stats', id });
  return (stats.message as unknown as { stats: { origins: OriginRow[] } }).stats.origins;
}

/** TLS (verified against the test CA) and one HTTP/1.1 request over a handed TCP fd; the answer's text. */
async function httpsOver(fd: number, path: string): Promise<string> {
  const socket = tls.connect({
    socket: new net.Socket({ fd, readable: true, writable: true }),
    servername: 'localhost',
    ca: pki.ca,
  });
  await once(socket, 'secureConnect');
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  socket.write(`GET ${path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`);
  await once(socket, 'end');
  const closed = once(socket, 'close');
  socket.destroy(); // closes the fd (net.Socket owned it since it was handed over)
  await closed;
  return Buffer.concat(chunks).toString();
}

describe('warmTlsOnMiss = "tcp"', () => {
  it('gives a cold acquire a TCP lease to the origin; an idle session still goes out', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    const cold = await raw.request({ type: 'acquire', id: 1, host: 'localhost', port: origin.port, tls: { trust } });
    const coldLease = cold.message as LeaseReply;
    expect(coldLease.type).toBe('lease');
    expect(coldLease.tls).toBeUndefined();
    expect(coldLease.warm).toBe(false);
    // The origin's own socket: the client's TLS runs over it, verified against what the client trusts.
    expect(native.peerAddress(cold.fds[0]!).port).toBe(origin.port);
    expect(await httpsOver(cold.fds[0]!, '/cold')).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*GET \/cold 0$/);
    raw.sendJson({ type: 'closed', leaseId: coldLease.leaseId });
    let rows = await originRows(raw, 2);
    expect(rows.find((row) => row.origin === `localhost:${origin.port}`)?.misses).toBe(1);

    // An idle session goes out.
    await raw.request({ type: 'prewarm', id: 5, host: 'localhost', port: origin.port, count: 1, tls: { trust } });
    await eventually(async () => {
      rows = await originRows(raw, 6);
      return rows.some((row) => row.origin === `localhost:${origin.port} tls` && row.idle >= 1);
    }, 'an idle warm TLS session');
    const idle = await raw.request({ type: 'acquire', id: 7, host: 'localhost', port: origin.port, tls: { trust } });
    const idleLease = idle.message as LeaseReply;
    expect(idleLease.tls).toBeDefined();
    expect(idleLease.warm).toBe(true);
    native.close(idle.fds[0]!);
    raw.sendJson({ type: 'closed', leaseId: idleLease.leaseId });
  });

  it('does not wait for a session still being made: the acquire gets a TCP lease, demand for TCP sockets', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    const prewarm = await raw.request({
      type: 'prewarm',
      id: 1,
      host: 'localhost',
      port: silentPort,
      count: 1,
      tls: { trust },
    });
    expect(prewarm.message?.type).toBe('ok');
    await eventually(async () => {
      const rows = await originRows(raw, 2);
      return rows.some((row) => row.origin === `localhost:${silentPort} tls` && row.connecting === 1);
    }, 'a session under way (its server never answers the handshake)');
    const reply = await raw.request({ type: 'acquire', id: 3, host: 'localhost', port: silentPort, tls: { trust } });
    const lease = reply.message as LeaseReply;
    expect(lease.type).toBe('lease');
    expect(lease.tls).toBeUndefined();
    expect(native.peerAddress(reply.fds[0]!).port).toBe(silentPort);
    native.close(reply.fds[0]!);
    raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
    const rows = await originRows(raw, 4);
    // The session under way goes on (an idle one serves a later acquire); the miss is demand for TCP sockets.
    expect(rows.find((row) => row.origin === `localhost:${silentPort} tls`)?.connecting).toBe(1);
    expect(rows.find((row) => row.origin === `localhost:${silentPort}`)?.demandRatePerS).toBeGreaterThan(0);
  });

  it('a SockpoolClient request on a miss does TLS itself; the fds of both sides come back', async () => {
    const before = fdCount();
    const daemonBefore = daemon.fdCount();
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile });
    try {
      const response = await client.request(`https://localhost:${untouched.port}/miss`);
      expect(response.status).toBe(200);
      expect(response.body.toString()).toBe('GET /miss 0');
      expect(response.tls?.by).toBeUndefined();
      expect(response.connection).toBe('leased');
      expect(response.timings.tlsMs).toBeGreaterThan(0);
    } finally {
      await client.close();
    }
    await eventually(() => fdCount() <= before, `client fds back to ${before} (now ${fdCount()})`);
    await eventually(
      () => daemon.fdCount() <= daemonBefore,
      `the daemon's fds back to ${daemonBefore} (now ${daemon.fdCount()})`,
    );
  });

  it("warms TCP sockets, not sessions, for what a client's queue announces (lookahead)", async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    // One request at a time: the second waits in the queue behind the slow one, and the queue announces its origin.
    const client = new SockpoolClient({
      socketPath: daemon.socketPath,
      threads: 0,
      concurrencyPerThread: 1,
      caFile: pki.caFile,
    });
    try {
      const first = client.request(`https://localhost:${slow.port}/slow`);
      const second = client.request(`https://localhost:${queued.port}/queued`);
      await eventually(async () => {
        const rows = await originRows(raw, 1);
        return rows.some((row) => row.origin === `localhost:${queued.port}` && row.idle >= 1);
      }, 'a warm TCP socket for the queued request');
      const rows = await originRows(raw, 2);
      expect(rows.find((row) => row.origin === `localhost:${queued.port} tls`)).toBeUndefined();
      expect((await first).status).toBe(200);
      const response = await second;
      expect(response.body.toString()).toBe('GET /queued 0');
      expect(response.warm).toBe(true);
      expect(response.tls?.by).toBeUndefined();
    } finally {
      await client.close();
    }
  });

  it('an https acquire refused at its address leaves no pool behind, neither the TCP one nor the sessions one', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    let id = 1;
    for (const host of REFUSED_NAMES) {
      const reply = await raw.request({ type: 'acquire', id: id++, host, port: origin.port, tls: { trust } });
      expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_POLICY' });
    }
    const rows = await originRows(raw, id++);
    expect(rows.filter((row) => row.origin.startsWith('refused')).map((row) => row.origin)).toEqual([]);
  });

  it('an application prewarm still makes sessions', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, caFile: pki.caFile });
    try {
      await client.prewarm(`https://localhost:${queued.port}/`);
      await eventually(async () => {
        const rows = await originRows(raw, 1);
        return rows.some((row) => row.origin === `localhost:${queued.port} tls` && row.idle >= 1);
      }, 'a warm TLS session for the prewarmed origin');
      const response = await client.request(`https://localhost:${queued.port}/prewarmed`);
      expect(response.tls?.by).toBe('daemon');
    } finally {
      await client.close();
    }
  });
});
