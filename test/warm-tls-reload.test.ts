// Warm TLS sessions across a reload (SIGHUP) that changes the CA file they were verified against: the idle ones
// are closed, and the next session is verified against the new file; a reload that lands while a session's connect
// is still in its DNS lookup (here a DNS answer held back 3 s) makes its handshake verify against the origin entry
// now in force, not the one the connect began with. Otherwise a client that trusts only the new CA would be handed
// a session the daemon verified against the old one: a weaker check than the client asked. A reload that lands
// during a session's handshake and makes the egress policy refuse its origin fails that connect with
// SOCKPOOL_ERR_POLICY (the TCP connect before it was judged by the policy of before): nothing is lent. An acquire
// that waited in the sessions pool across a reload that changed the CA file gets a TCP socket: the session made for
// it was verified against the new file, not the one it asked for.
// Real daemon process, a real node:https origin with a throwaway CA, a real DNS server, the bare protocol.
import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { echoHandler, eventually, httpsOrigin, startTestDaemon, warmTlsArgs } from './fixtures/client-helpers.js';
import { startDaemon, writeConfigFile } from './helpers/daemon.js';
import { startDnsServer } from './helpers/dns-server.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { createTestPki } from './helpers/tls.js';

const cleanups: Array<() => unknown> = [];
afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

const sha256Of = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/** The stats row of a pool (`host:port tls` for warm TLS sessions). */
async function poolStats(raw: RawClient, key: string) {
  const stats = await raw.request({ type: 'stats', id: 0 });
  const origins = (
    stats.message as unknown as { stats: { origins: Array<{ origin: string; idle: number; connecting: number }> } }
  ).stats.origins;
  return origins.find((entry) => entry.origin === key);
}

/**
 * A TCP front for the origin on `originPort` that accepts at once and relays to the origin only once released: a warm
 * TLS session's handshake waits meanwhile, its connect counted as done. Connections after the release are relayed at
 * once.
 */
async function holdingFront(originPort: number) {
  const held: net.Socket[] = [];
  let released = false;
  const relay = (socket: net.Socket) => {
    const upstream = net.connect(originPort, '127.0.0.1');
    upstream.on('error', () => {});
    socket.pipe(upstream).pipe(socket);
  };
  const front = net.createServer((socket) => {
    socket.on('error', () => {});
    if (released) relay(socket);
    else {
      socket.pause();
      held.push(socket);
    }
  });
  await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
  cleanups.push(() => {
    for (const socket of held) socket.destroy();
    front.close();
  });
  return {
    port: (front.address() as net.AddressInfo).port,
    held: () => held.length,
    release: () => {
      released = true;
      for (const socket of held.splice(0)) {
        relay(socket);
        socket.resume();
      }
    },
  };
}

/** A test CA with an https origin it signed (`origin`), and another CA (`otherPki`); removed after the test. */
async function pkisAndOrigin() {
  const pki = createTestPki(['localhost']);
  const otherPki = createTestPki(['localhost']);
  cleanups.push(
    () => pki.cleanup(),
    () => otherPki.cleanup(),
  );
  const origin = await httpsOrigin(pki, echoHandler());
  cleanups.push(() => origin.close());
  return { pki, otherPki, origin };
}

/** A copy of `file` in a directory of its own, for the daemon's CA file a test rewrites in place (same path). */
function rewritableCopy(file: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'sockpool-tls-reload-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const copy = join(dir, 'ca.pem');
  copyFileSync(file, copy);
  return copy;
}

describe('warm TLS and a reload', () => {
  it('closes the idle sessions verified against a CA file that changed; the next is verified against the new one', async () => {
    const { pki, otherPki, origin } = await pkisAndOrigin();
    // The daemon's CA file, rewritten in place below (same path, other bytes).
    const caFile = rewritableCopy(pki.caFile);
    const daemon = await startTestDaemon([origin.port], {
      extraArgs: warmTlsArgs(caFile, [origin.port], [`localhost:${origin.port}`]),
    });
    cleanups.push(() => daemon.stop());
    const raw = openRawClient(daemon.socketPath, cleanups);
    const idleSessions = async () => {
      const stats = await raw.request({ type: 'stats', id: 0 });
      const origins = (stats.message as unknown as { stats: { origins: Array<{ origin: string; idle: number }> } })
        .stats.origins;
      return origins.find((entry) => entry.origin === `localhost:${origin.port} tls`)?.idle ?? 0;
    };
    const oldTrust = sha256Of(caFile);
    await raw.request({
      type: 'prewarm',
      id: 1,
      host: 'localhost',
      port: origin.port,
      count: 2,
      tls: { trust: oldTrust },
    });
    await eventually(async () => (await idleSessions()) === 2, 'two warm sessions');

    // The CA file now holds another CA, which did not sign the origin's certificate.
    copyFileSync(otherPki.caFile, caFile);
    daemon.child.kill('SIGHUP');
    await eventually(() => daemon.output().includes('"idleClosedByPolicy":2'), 'the reload closed both sessions');
    expect(await idleSessions()).toBe(0);

    // A client trusting only the new CA: the daemon verifies a new session against it, and the origin fails that.
    const reply = await raw.request({
      type: 'acquire',
      id: 2,
      host: 'localhost',
      port: origin.port,
      tls: { trust: sha256Of(caFile) },
    });
    for (const fd of reply.fds) native.close(fd);
    expect(reply.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_TLS',
      message: expect.stringMatching(/unknown-ca/),
    });
  });

  it('a reload during the DNS lookup of a connect: its handshake verifies against the origin entry now in force', async () => {
    const pki = createTestPki(['slow.test']);
    const otherPki = createTestPki(['slow.test']);
    cleanups.push(
      () => pki.cleanup(),
      () => otherPki.cleanup(),
    );
    const origin = await httpsOrigin(pki, echoHandler());
    cleanups.push(() => origin.close());
    const dns = await startDnsServer({ 'slow.test': { a: ['127.0.0.1'], aaaa: [], delayMs: 3_000 } });
    const records = dns.records['slow.test']!;
    cleanups.push(() => dns.close());
    const configOf = (originCa: string) => ({
      pool: { predictive: false, origins: [{ match: `slow.test:${origin.port}`, warmTls: true, caFile: originCa }] },
      // The old CA file stays read after the reload (tls.caFile): only the origin's entry changes.
      tls: { caFile: pki.caFile },
      dns: { servers: [dns.server], timeoutMs: 10_000 },
    });
    const configFile = writeConfigFile(configOf(pki.caFile), cleanups);
    const daemon = await startDaemon({
      args: ['--config', configFile, '--allow', '127.0.0.1/32', '--allow-port', String(origin.port)],
    });
    cleanups.push(() => daemon.stop());
    const raw = openRawClient(daemon.socketPath, cleanups);
    const key = `slow.test:${origin.port} tls`;

    await raw.request({
      type: 'prewarm',
      id: 1,
      host: 'slow.test',
      port: origin.port,
      count: 1,
      tls: { trust: sha256Of(pki.caFile) },
    });
    await eventually(() => dns.count('slow.test') > 0, 'the lookup started');
    // While the DNS answer is held back: the origin's entry now trusts only the other CA, which did not sign the
    // origin's certificate.
    writeFileSync(configFile, JSON.stringify(configOf(otherPki.caFile)));
    daemon.child.kill('SIGHUP');
    await eventually(() => daemon.output().includes('configuration reloaded'), 'the reload');
    // Later lookups are answered at once (the one in flight is still held back).
    records.delayMs = 0;
    await eventually(async () => (await poolStats(raw, key))?.connecting === 0, 'the connect finished');
    // Verified against the new CA, the session failed: none is kept.
    expect((await poolStats(raw, key))?.idle).toBe(0);

    // A client trusting only the new CA: no session verified against the old one is handed to it.
    const reply = await raw.request({
      type: 'acquire',
      id: 2,
      host: 'slow.test',
      port: origin.port,
      tls: { trust: sha256Of(otherPki.caFile) },
    });
    for (const fd of reply.fds) native.close(fd);
    expect(reply.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_TLS',
      message: expect.stringMatching(/unknown-ca/),
    });
  }, 30_000);

  it('a reload during the handshake that makes the egress policy refuse the origin: SOCKPOOL_ERR_POLICY', async () => {
    const { pki, origin } = await pkisAndOrigin();
    const front = await holdingFront(origin.port);
    const port = front.port;
    const egress = { allow: ['127.0.0.1/32'], allowPorts: [port] };
    const configFile = writeConfigFile({ pool: { predictive: false }, egress }, cleanups);
    const daemon = await startDaemon({
      args: [
        '--config',
        configFile,
        '--warm-tls',
        `localhost:${port}`,
        '--ca-file',
        pki.caFile,
        '--resolve',
        `localhost:${port}:127.0.0.1`,
      ],
    });
    cleanups.push(() => daemon.stop());
    const raw = openRawClient(daemon.socketPath, cleanups);
    const trust = sha256Of(pki.caFile);
    const acquiring = raw.request({ type: 'acquire', id: 1, host: 'localhost', port, tls: { trust } });
    await eventually(() => front.held() === 1, 'the TCP connect to the origin completed');

    // The reload: localhost is now a denied host.
    writeFileSync(
      configFile,
      JSON.stringify({ pool: { predictive: false }, egress: { ...egress, denyHosts: ['localhost'] } }),
    );
    daemon.child.kill('SIGHUP');
    await eventually(() => daemon.output().includes('configuration reloaded'), 'the reload');
    // The handshake the reload overtook completes now.
    front.release();
    const reply = await acquiring;
    for (const fd of reply.fds) native.close(fd);
    expect(reply.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_POLICY',
      fields: { reason: 'host-denied' },
    });
    // Nothing kept for the origin either.
    expect((await poolStats(raw, `localhost:${port} tls`))?.idle ?? 0).toBe(0);
  }, 30_000);

  it('an acquire waiting for a session when a reload changes the CA file gets a TCP socket, not a session verified against the new file', async () => {
    const { pki, otherPki, origin } = await pkisAndOrigin();
    const front = await holdingFront(origin.port);
    const port = front.port;
    const caFile = rewritableCopy(pki.caFile);
    const egress = { allow: ['127.0.0.1/32'], allowPorts: [port] };
    const configFile = writeConfigFile({ pool: { predictive: false }, egress }, cleanups);
    const daemon = await startDaemon({
      args: [
        '--config',
        configFile,
        '--warm-tls',
        `localhost:${port}`,
        '--ca-file',
        caFile,
        '--resolve',
        `localhost:${port}:127.0.0.1`,
      ],
    });
    cleanups.push(() => daemon.stop());
    const raw = openRawClient(daemon.socketPath, cleanups);
    const oldTrust = sha256Of(caFile);
    const acquiring = raw.request({ type: 'acquire', id: 1, host: 'localhost', port, tls: { trust: oldTrust } });
    await eventually(() => front.held() === 1, 'the TCP connect to the origin completed, its handshake held');

    // The reload: the CA file now holds a bundle of the origin's CA and another. Other bytes, so another trust, though
    // the origin's certificate still verifies: the handshake the reload overtook is made again with it, and succeeds.
    writeFileSync(caFile, Buffer.concat([readFileSync(pki.caFile), readFileSync(otherPki.caFile)]));
    const newTrust = sha256Of(caFile);
    expect(newTrust).not.toBe(oldTrust);
    daemon.child.kill('SIGHUP');
    await eventually(() => daemon.output().includes('configuration reloaded'), 'the reload');
    front.release();
    const reply = await acquiring;
    for (const fd of reply.fds) native.close(fd);
    // The client verifies against the old file: it gets the origin's TCP socket and does its own TLS. Before, it was
    // handed the session made for it, verified against the new file.
    expect(reply.message).toMatchObject({ type: 'lease' });
    expect(reply.message).not.toHaveProperty('tls');
    // That session went back to the pool, for a client that trusts the new file.
    expect((await poolStats(raw, `localhost:${port} tls`))?.idle).toBe(1);
    const session = await raw.request({ type: 'acquire', id: 2, host: 'localhost', port, tls: { trust: newTrust } });
    for (const fd of session.fds) native.close(fd);
    expect(session.message).toMatchObject({ type: 'lease', warm: true, tls: { version: 'TLSv1.3' } });
  }, 30_000);
});
