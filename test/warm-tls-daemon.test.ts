// Warm TLS in the daemon, seen through the bare protocol: sessions completed ahead of need (prewarm) and handed
// over as one end of a loopback TCP connection with what was negotiated; plain HTTP/1.1 and HTTP/2 spoken over that fd
// reach real node:https and node:http2 origins verified against a throwaway CA; a client that trusts otherwise
// gets a TCP socket; certificate failures come back as SOCKPOOL_ERR_TLS with their reason; a session the server
// closes while idle is never handed out; the daemon's fds come back to where they were. Real daemon process.
import { createHash, X509Certificate } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RELAY_THREAD_NICE } from '../daemon/tls-relay.js';
import * as native from '../shared/native.js';
import type { LeaseReply } from '../shared/protocol.js';
import {
  echoHandler,
  eventually,
  h2Origin,
  httpsOrigin,
  type Origin,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import { exchangeOverFd } from './fixtures/native-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let otherPki: TestPki;
let h1: Origin;
let h2: Origin;
let daemon: DaemonProcess;
let trust: string;
const cleanups: Array<() => unknown> = [];

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  otherPki = createTestPki(['localhost']);
  trust = createHash('sha256').update(readFileSync(pki.caFile)).digest('hex');
  h1 = await httpsOrigin(pki, echoHandler());
  h2 = await h2Origin(pki, (request, response) => {
    response.end(`h2 ${request.method} ${request.url} ${request.headers[':scheme']} ${request.headers[':authority']}`);
  });
  daemon = await startTestDaemon([h1.port, h2.port], {
    extraArgs: warmTlsArgs(pki.caFile, [h1.port, h2.port], [`localhost:${h1.port}`, `localhost:${h2.port}`]),
  });
});

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await daemon?.stop();
  await h1?.close();
  await h2?.close();
  pki?.cleanup();
  otherPki?.cleanup();
});

async function acquire(raw: RawClient, id: number, port: number, tls?: { trust: string }) {
  const reply = await raw.request({ type: 'acquire', id, host: 'localhost', port, ...(tls ? { tls } : {}) });
  return reply;
}

describe('warm TLS sessions', () => {
  it("runs its relay thread at a nice value above the main thread's (handoffs go first on a shared core)", async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    await raw.request({ type: 'prewarm', id: 1, host: 'localhost', port: h1.port, count: 1, tls: { trust } });
    // Field 19 of /proc/PID/task/TID/stat is the thread's nice value (after the parenthesised name).
    const niceOf = (tid: string) => {
      const stat = readFileSync(`/proc/${daemon.child.pid}/task/${tid}/stat`, 'utf8');
      return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]);
    };
    await eventually(
      () => readdirSync(`/proc/${daemon.child.pid}/task`).some((tid) => niceOf(tid) === RELAY_THREAD_NICE),
      'a relay thread at its nice value',
    );
    expect(niceOf(String(daemon.child.pid))).toBe(0);
  });

  it('hands over a prewarmed, verified session over which plain HTTP/1.1 reaches the origin', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    const prewarm = await raw.request({
      type: 'prewarm',
      id: 1,
      host: 'localhost',
      port: h1.port,
      count: 1,
      tls: { trust },
    });
    expect(prewarm.message?.type).toBe('ok');
    await eventually(async () => {
      const stats = await raw.request({ type: 'stats', id: 2 });
      const origins = (stats.message as unknown as { stats: { origins: Array<{ origin: string; idle: number }> } })
        .stats.origins;
      return origins.some((origin) => origin.origin === `localhost:${h1.port} tls` && origin.idle === 1);
    }, 'a warm TLS session');
    // An idle session holds three fds in the daemon: the TCP socket, and both ends of the pair.
    const fdsWhileIdle = daemon.fdCount();
    const reply = await acquire(raw, 3, h1.port, { trust });
    const lease = reply.message as LeaseReply;
    expect(lease.type).toBe('lease');
    expect(lease.warm).toBe(true);
    expect(lease.tls).toMatchObject({ version: 'TLSv1.3', alpn: 'http/1.1' });
    expect(lease.tls?.certSha256).toBe(new X509Certificate(pki.cert).fingerprint256.replaceAll(':', '').toLowerCase());
    expect(reply.fds).toHaveLength(1);
    // Not the origin's TCP socket: one end of a loopback connection to the relay.
    expect(native.peerAddress(reply.fds[0]!).port).not.toBe(h1.port);
    const response = await exchangeOverFd(
      reply.fds[0]!,
      'GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n',
    );
    expect(response).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(response).toMatch(/GET \/hello 0$/);
    raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
    const stats = await raw.request({ type: 'stats', id: 4 });
    const relay = (stats.message as unknown as { stats: { tls: Record<string, number> } }).stats.tls;
    expect(relay.handshakes).toBeGreaterThanOrEqual(1);
    expect(relay.bytesToOrigin).toBeGreaterThan(0);
    expect(relay.bytesFromOrigin).toBeGreaterThanOrEqual(response.length);
    await eventually(
      () => daemon.fdCount() === fdsWhileIdle - 3,
      'the daemon closed the session (pair and TCP socket)',
    );
  });

  it("makes sessions for a client queue's lookahead too (warmTlsOnMiss is 'session' here)", async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    const before = await raw.request({ type: 'stats', id: 1 });
    const idleOf = (reply: typeof before, key: string) =>
      (reply.message as unknown as { stats: { origins: Array<{ origin: string; idle: number }> } }).stats.origins.find(
        (origin) => origin.origin === key,
      )?.idle ?? 0;
    const sessionsBefore = idleOf(before, `localhost:${h2.port} tls`);
    const prewarm = await raw.request({
      type: 'prewarm',
      id: 2,
      host: 'localhost',
      port: h2.port,
      count: sessionsBefore + 1,
      tls: { trust },
      lookahead: true,
    });
    expect(prewarm.message?.type).toBe('ok');
    await eventually(
      async () => idleOf(await raw.request({ type: 'stats', id: 3 }), `localhost:${h2.port} tls`) > sessionsBefore,
      'one more warm TLS session',
    );
    expect(idleOf(await raw.request({ type: 'stats', id: 4 }), `localhost:${h2.port}`)).toBe(0);
  });

  it('negotiates h2 by ALPN; HTTP/2 with prior knowledge goes through', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    const reply = await acquire(raw, 1, h2.port, { trust });
    const lease = reply.message as LeaseReply;
    expect(lease.tls?.alpn).toBe('h2');
    const fd = reply.fds[0]!;
    const session = http2.connect(`http://localhost:${h2.port}`, {
      createConnection: () => new net.Socket({ fd, readable: true, writable: true }),
    });
    const stream = session.request({ ':path': '/two', ':scheme': 'https', ':authority': 'localhost' });
    stream.setEncoding('utf8');
    let body = '';
    stream.on('data', (chunk: string) => {
      body += chunk;
    });
    await once(stream, 'end');
    session.close();
    expect(body).toBe('h2 GET /two https localhost');
    raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
  });

  it('gives a client that trusts something else (or says nothing about TLS) a TCP socket', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    for (const [id, tls] of [
      [1, { trust: 'system' }],
      [2, undefined],
    ] as const) {
      const reply = await acquire(raw, id, h1.port, tls);
      const lease = reply.message as LeaseReply;
      expect(lease.type).toBe('lease');
      expect(lease.tls).toBeUndefined();
      expect(native.peerAddress(reply.fds[0]!).port).toBe(h1.port);
      native.close(reply.fds[0]!);
      raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
    }
  });

  it('never hands out a session the server closed while it was idle', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    await raw.request({ type: 'prewarm', id: 1, host: 'localhost', port: h1.port, count: 2, tls: { trust } });
    await eventually(() => h1.sockets.size >= 2, 'two sessions at the origin');
    const idle = async () => {
      const stats = await raw.request({ type: 'stats', id: 2 });
      const origins = (stats.message as unknown as { stats: { origins: Array<{ origin: string; idle: number }> } })
        .stats.origins;
      return origins.find((origin) => origin.origin === `localhost:${h1.port} tls`)?.idle ?? 0;
    };
    await eventually(async () => (await idle()) === 2, 'two idle sessions');
    for (const socket of h1.sockets) socket.end();
    await eventually(async () => (await idle()) === 0, 'the closed sessions dropped');
    const reply = await acquire(raw, 3, h1.port, { trust });
    const lease = reply.message as LeaseReply;
    expect(lease.warm).toBe(false);
    const response = await exchangeOverFd(
      reply.fds[0]!,
      'GET /after HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n',
    );
    expect(response).toMatch(/GET \/after 0$/);
    raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
  });

  it('closes a relayed session released unused (its use cannot be counted); a foreign fd never reaches the daemon', async () => {
    const raw = openRawClient(daemon.socketPath, cleanups);
    const reply = await acquire(raw, 1, h1.port, { trust });
    const lease = reply.message as LeaseReply;
    const kept = native.dup(reply.fds[0]!);
    const released = await raw.request({ type: 'release', id: 2, leaseId: lease.leaseId, withoutFd: true });
    native.close(reply.fds[0]!);
    expect(released.message?.type).toBe('ok');
    // The daemon ended the session's pair (a reset): a copy kept across the release sees it.
    await eventually(() => native.probe(kept).state !== 'alive', 'the released session closed');
    native.close(kept);
    const again = await acquire(raw, 3, h1.port, { trust });
    const second = again.message as LeaseReply;
    expect(second.type).toBe('lease');
    const [mine, theirs] = native.loopbackPair();
    // The kernel refuses it at the sender (SO_PASSRIGHTS); a daemon that lets fds in refuses it itself
    // (test/daemon-pool "refuses a release that carries some other fd").
    expect(() => raw.sendJson({ type: 'release', id: 4, leaseId: second.leaseId }, [mine])).toThrow(
      expect.objectContaining({ code: 'EPERM' }),
    );
    native.close(mine);
    native.close(theirs);
    native.close(again.fds[0]!);
    raw.sendJson({ type: 'closed', leaseId: second.leaseId });
    // Released without its fd (binary framing 2's release; JSON says the same): closed all the same.
    const third = await acquire(raw, 5, h1.port, { trust });
    const withoutFd = await raw.request({
      type: 'release',
      id: 6,
      leaseId: (third.message as LeaseReply).leaseId,
      withoutFd: true,
    });
    expect(withoutFd.message?.type).toBe('ok');
    await eventually(() => native.probe(third.fds[0]!).state !== 'alive', 'the session released without its fd closed');
    native.close(third.fds[0]!);
  });
});

describe('a relayed lease that ends', () => {
  it('ends its relay and the origin connection with it, even before a silent origin that ignores the close', async () => {
    // The lease's end sent the relay a FIN, which it took for the client's half-close: it closed its TLS write side
    // and lingered up to a minute for an answer nobody would read, holding the origin's connection and its fds past
    // the lease, outside maxLeasesPerUid and maxPerOrigin: 12 of them at an origin capped at 2. Now the relay ends
    // the origin's TLS (close_notify, FIN) and resets the connection of an origin that has not answered within its
    // short bound (tls-relay-thread.ts, ORIGIN_CLOSE_MS).
    const open = new Set<net.Socket>();
    // A socket that read an end (FIN) reads no more here, so a reset after it shows only in its TCP state (CLOSE).
    const connected = () =>
      [...open].filter((tcp) => {
        const fd = (tcp as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
        return fd !== undefined && fd >= 0 && native.probe(fd).tcpState !== 7;
      }).length;
    const silent = net.createServer({ allowHalfOpen: true }, (tcp) => {
      open.add(tcp);
      tcp.on('close', () => open.delete(tcp));
      tcp.on('error', () => {});
      const session = new tls.TLSSocket(tcp, { isServer: true, cert: pki.cert, key: pki.key });
      (session as unknown as { allowHalfOpen: boolean }).allowHalfOpen = true;
      session.on('error', () => {});
      session.on('data', () => {}); // reads, never answers, never ends its side
    });
    silent.listen(0, '127.0.0.1');
    await once(silent, 'listening');
    const port = (silent.address() as net.AddressInfo).port;
    const capped = await startTestDaemon([port], {
      extraArgs: warmTlsArgs(pki.caFile, [port], [`localhost:${port}`]),
      config: { quotas: { maxLeasesPerUid: 2 }, pool: { defaults: { maxPerOrigin: 2 } } },
    });
    try {
      const raw = openRawClient(capped.socketPath, cleanups);
      for (let id = 1; id <= 12; id++) {
        const reply = await acquire(raw, id, port, { trust });
        const lease = reply.message as LeaseReply;
        expect(lease).toMatchObject({ type: 'lease', tls: { version: expect.any(String) } });
        const fd = reply.fds[0]!;
        // The client's request goes out (the session is spoken on), then its lease ends.
        expect(
          native.sendMessage(fd, Buffer.from(`GET /${id} HTTP/1.1\r\nHost: localhost\r\n\r\n`), []),
        ).toBeGreaterThan(0);
        native.close(fd);
        raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
      }
      // (At most maxPerOrigin: the pool may keep idle sessions there again, as warm TLS does.)
      await eventually(
        () => connected() <= 2,
        () => `origin connections still open: ${connected()}`,
        // (Well within the relay's minute of lingering it ended with before; room for a loaded host's relay thread.)
        30_000,
      );
    } finally {
      await capped.stop();
      for (const socket of open) socket.destroy();
      silent.close();
    }
  });
});

describe('a client that trusts the system store', () => {
  it("gets a session the relay verified against the system store, not Node's bundled roots", async () => {
    // The client's curl verifies against the system store; the relay, given no CA for "system", used Node's bundled
    // Mozilla list, which differs from it (each holds roots the other lacks). Here the system store (SSL_CERT_FILE,
    // an empty SSL_CERT_DIR) holds the test CA alone: a relay verifying against it hands over the session, one
    // verifying against Node's bundled roots refused the origin (unknown-ca).
    const emptyDir = mkdtempSync(join(tmpdir(), 'sockpool-no-certs-'));
    const systemOnly = await startTestDaemon([h1.port], {
      extraArgs: ['--warm-tls', `localhost:${h1.port}`, '--resolve', `localhost:${h1.port}:127.0.0.1`],
      env: { SSL_CERT_FILE: pki.caFile, SSL_CERT_DIR: emptyDir },
    });
    try {
      const raw = openRawClient(systemOnly.socketPath, cleanups);
      const reply = await acquire(raw, 1, h1.port, { trust: 'system' });
      for (const fd of reply.fds) native.close(fd);
      expect(reply.message).toMatchObject({ type: 'lease', tls: { version: expect.any(String) } });
    } finally {
      await systemOnly.stop();
      rmSync(emptyDir, { recursive: true, force: true });
    }
  });
});

describe('certificate failures', () => {
  let strict: DaemonProcess;
  let expiredPki: TestPki;
  let expired: Origin;
  beforeAll(async () => {
    expiredPki = createTestPki(['localhost'], { expired: true });
    expired = await httpsOrigin(expiredPki, echoHandler());
    strict = await startTestDaemon([h1.port, expired.port], {
      extraArgs: [
        '--warm-tls',
        '*',
        '--ca-file',
        otherPki.caFile,
        '--resolve',
        `localhost:${h1.port}:127.0.0.1`,
        '--resolve',
        `wrong.test:${h1.port}:127.0.0.1`,
        '--resolve',
        `localhost:${expired.port}:127.0.0.1`,
      ],
      config: {
        pool: {
          origins: [
            { match: `*:${expired.port}`, caFile: expiredPki.caFile },
            { match: 'wrong.test:*', caFile: pki.caFile },
          ],
        },
      },
    });
  });
  afterAll(async () => {
    await strict?.stop();
    await expired?.close();
    expiredPki?.cleanup();
  });

  async function failure(host: string, port: number, caFile: string) {
    const raw = openRawClient(strict.socketPath, cleanups);
    const trustOf = createHash('sha256').update(readFileSync(caFile)).digest('hex');
    const reply = await raw.request({ type: 'acquire', id: 1, host, port, tls: { trust: trustOf } });
    expect(reply.fds).toHaveLength(0);
    return reply.message;
  }

  it('reports a certificate for another host name as SOCKPOOL_ERR_TLS host-name-mismatch', async () => {
    // The origin entry makes the daemon trust h1's CA for wrong.test: the chain verifies, the name does not.
    const message = await failure('wrong.test', h1.port, pki.caFile);
    expect(message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_TLS',
      fields: { reason: 'host-name-mismatch' },
    });
  });

  it('reports an expired certificate as SOCKPOOL_ERR_TLS expired', async () => {
    const message = await failure('localhost', expired.port, expiredPki.caFile);
    expect(message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_TLS', fields: { reason: 'expired' } });
  });

  it('reports an unknown CA as SOCKPOOL_ERR_TLS with its reason', async () => {
    const raw = openRawClient(strict.socketPath, cleanups);
    const otherTrust = createHash('sha256').update(readFileSync(otherPki.caFile)).digest('hex');
    const reply = await raw.request({
      type: 'acquire',
      id: 1,
      host: 'localhost',
      port: h1.port,
      tls: { trust: otherTrust },
    });
    expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_TLS', fields: { reason: 'unknown-ca' } });
    expect(reply.fds).toHaveLength(0);
  });
});
