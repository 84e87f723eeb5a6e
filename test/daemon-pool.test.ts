// sockpoold as a real child process, real TCP servers on loopback, a bare protocol client: handoffs, refill,
// limits and the fair queue, leases freed on disconnect, bad input, reload, restart from history, fd counts.
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import type { PoolSnapshot } from '../daemon/client-view.js';
import { MIGRATIONS, StateStore } from '../daemon/store.js';
import * as native from '../shared/native.js';
import { MAX_MESSAGE_BYTES } from '../shared/protocol.js';
import { startServer, type TestServer } from './fixtures/native-helpers.js';
import { spawnChild } from './helpers/children.js';
import {
  type DaemonProcess,
  eventually,
  logRecords,
  repoRoot,
  startDaemon,
  writeConfigFile,
} from './helpers/daemon.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function server(onConnection?: Parameters<typeof startServer>[1]): Promise<TestServer> {
  const started = await startServer('127.0.0.1', onConnection);
  cleanups.push(() => started.close());
  return started;
}

async function daemon(port: number, extraArgs: string[] = [], config?: object): Promise<DaemonProcess> {
  const args = ['--allow', '127.0.0.1/32', '--allow-port', String(port), ...extraArgs];
  const started = await startDaemon({ args: config ? [...args, '--config', writeConfig(config)] : args });
  cleanups.push(() => started.stop());
  return started;
}

function writeConfig(config: object): string {
  return writeConfigFile(config, cleanups);
}

function client(socketPath: string): RawClient {
  return openRawClient(socketPath, cleanups);
}

/** What a stats reply carries (the daemon's view for this client's uid). */
type Stats = PoolSnapshot;

async function stats(raw: RawClient, id = 999_999): Promise<Stats> {
  const reply = await raw.request({ type: 'stats', id });
  return (reply.message as unknown as { stats: Stats }).stats;
}

/** Writes through the fd and reads the echo back: proves it is a live connection to the echo server. */
async function roundTrip(fd: number, text: string): Promise<string> {
  native.untrack(fd);
  const socket = new Socket({ fd, readable: true, writable: true });
  socket.write(text);
  const [chunk] = (await once(socket, 'data')) as [Buffer];
  socket.destroy();
  return chunk.toString();
}

describe('handoff', () => {
  it('answers hello and hands out a connected fd the server sees once', async () => {
    const echo = await server();
    // No predictive warming: a spare warmed in the background would be a second connection the server sees.
    const sockpoold = await daemon(echo.port, [], { pool: { predictive: false } });
    const raw = client(sockpoold.socketPath);
    const hello = await raw.request({ type: 'hello', id: 1, version: 1 });
    expect(hello.message).toMatchObject({ type: 'hello', version: 1, server: 'sockpoold' });
    const lease = await raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port });
    expect(lease.message).toMatchObject({ type: 'lease', id: 2, address: '127.0.0.1', port: echo.port, warm: false });
    expect(lease.fds).toHaveLength(1);
    expect(await roundTrip(lease.fds[0]!, 'ping')).toBe('ping');
    expect(echo.connections).toHaveLength(1);
  });

  it('refills after a handoff and serves the next acquire warm', async () => {
    const echo = await server();
    const sockpoold = await daemon(echo.port, [], { pool: { defaults: { minIdle: 2 } } });
    const raw = client(sockpoold.socketPath);
    expect(
      (await raw.request({ type: 'prewarm', id: 1, host: '127.0.0.1', port: echo.port, count: 2 })).message,
    ).toMatchObject({ type: 'ok' });
    await eventually(async () => (await stats(raw)).idle === 2, 'two idle sockets');
    const lease = await raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port });
    expect(lease.message).toMatchObject({ type: 'lease', warm: true });
    for (const fd of lease.fds) native.close(fd);
    await eventually(async () => (await stats(raw)).idle === 2, 'refilled to two idle sockets');
    // The echo server accepts in this process and may lag the daemon's connects.
    await eventually(() => echo.connections.length === 3, 'three connections accepted');
  });

  it('never hands out a socket its server already closed', async () => {
    // The server closes every connection 300 ms after accepting it, before any request.
    const closing = await server((socket) => setTimeout(() => socket.end(), 300));
    const sockpoold = await daemon(closing.port, [], { pool: { defaults: { minIdle: 1 } } });
    const raw = client(sockpoold.socketPath);
    await raw.request({ type: 'prewarm', id: 1, host: '127.0.0.1', port: closing.port, count: 1 });
    for (let i = 0; i < 8; i++) {
      await sleep(120);
      const lease = await raw.request({ type: 'acquire', id: 10 + i, host: '127.0.0.1', port: closing.port });
      expect(lease.message?.type).toBe('lease');
      const probe = native.probe(lease.fds[0]!);
      native.close(lease.fds[0]!);
      // Handed out alive: it may die later (the server's timer), but never before the handoff.
      expect(['alive', 'eof']).toContain(probe.state);
      if ((lease.message as { warm: boolean }).warm) expect(probe.state).toBe('alive');
      await raw.request({ type: 'closed', id: 100 + i, leaseId: (lease.message as { leaseId: number }).leaseId });
    }
    const snapshot = await stats(raw);
    expect(snapshot.origins).toHaveLength(1);
  });
});

describe('forward proxies', () => {
  /** A proxy that answers every CONNECT with `answer`, then echoes (the tunnel's far end); records the requests. */
  async function connectProxy(answer: (target: string) => string) {
    const requests: string[] = [];
    const proxy = await server((socket) => {
      let head = '';
      const onData = (chunk: Buffer) => {
        head += chunk.toString('latin1');
        const end = head.indexOf('\r\n\r\n');
        if (end === -1) return;
        socket.off('data', onData);
        const target = /^CONNECT (\S+) HTTP\/1\.1\r\n/.exec(head)?.[1] ?? '?';
        requests.push(head.slice(0, end));
        socket.write(answer(target));
        socket.pipe(socket);
      };
      socket.on('data', onData);
    });
    return { proxy, requests };
  }

  it('tunnels a proxied origin through a configured proxy, by name, in a pool of its own', async () => {
    const { proxy, requests } = await connectProxy((target) =>
      target.startsWith('teapot.example') ? 'HTTP/1.1 418 No\r\n\r\n' : 'HTTP/1.1 200 Connection established\r\n\r\n',
    );
    const sockpoold = await daemon(proxy.port, ['--allow-port', '443'], {
      proxies: [{ name: 'corp', url: `http://127.0.0.1:${proxy.port}` }],
      egress: { denyHosts: ['denied.example'] },
      pool: { predictive: false }, // one acquire, one tunnel: no refills behind it
    });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: 'origin.example', port: 443, proxy: 'corp' });
    expect(lease.message).toMatchObject({ type: 'lease', address: '127.0.0.1', host: 'origin.example', port: 443 });
    // The daemon asked for the tunnel; what the client writes goes through it (here: echoed by the far end).
    expect(requests).toEqual(['CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443']);
    expect(await roundTrip(lease.fds[0]!, 'via proxy')).toBe('via proxy');
    expect(proxy.connections).toHaveLength(1);
    const snapshot = await stats(raw);
    expect(snapshot.origins).toEqual([expect.objectContaining({ origin: 'origin.example:443 via corp' })]);

    // A status other than 200 is a typed error carrying it; the socket is closed, nothing is lent.
    const teapot = await raw.request({ type: 'acquire', id: 2, host: 'teapot.example', port: 443, proxy: 'corp' });
    expect(teapot.fds).toEqual([]);
    expect(teapot.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_PROXY',
      fields: { proxy: 'corp', status: 418, target: 'teapot.example:443' },
    });
    // The origin's name is checked against the policy before the proxy hears of it.
    const denied = await raw.request({ type: 'acquire', id: 3, host: 'denied.example', port: 443, proxy: 'corp' });
    expect(denied.message).toMatchObject({ code: 'SOCKPOOL_ERR_POLICY', fields: { reason: 'host-denied' } });
    // Only configured proxies, by name: an unknown name, and an address (the old form), are refused.
    const unknown = await raw.request({ type: 'acquire', id: 4, host: 'origin.example', port: 443, proxy: 'nope' });
    expect(unknown.message).toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT', fields: { proxy: 'nope' } });
    const address = await raw.request({
      type: 'acquire',
      id: 5,
      host: 'origin.example',
      port: 443,
      proxy: { host: '10.0.0.1', port: 3128 },
    });
    expect(address.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
    expect(requests).toHaveLength(2);
    // A tunnel released unused passes the release check (its peer is the proxy, as when it was lent): pooled for
    // this uid and lent again warm, with no CONNECT more.
    const fresh = await raw.request({ type: 'acquire', id: 6, host: 'origin.example', port: 443, proxy: 'corp' });
    const leaseId = (fresh.message as { leaseId: number }).leaseId;
    const released = await raw.request({ type: 'release', id: 7, leaseId, withoutFd: true });
    native.close(fresh.fds[0]!);
    expect(released.message).toMatchObject({ type: 'ok', id: 7 });
    const again = await raw.request({ type: 'acquire', id: 8, host: 'origin.example', port: 443, proxy: 'corp' });
    expect(again.message).toMatchObject({ type: 'lease', warm: true });
    for (const fd of again.fds) native.close(fd);
    expect(requests).toHaveLength(3);
  });

  it("asks the proxy for the origin's one spelling: a name in lower case, IPv6 in brackets; CR/LF never reach it", async () => {
    const { proxy, requests } = await connectProxy(() => 'HTTP/1.1 200 Connection established\r\n\r\n');
    const sockpoold = await daemon(proxy.port, ['--allow-port', '443'], {
      proxies: [{ name: 'corp', url: `http://127.0.0.1:${proxy.port}` }],
      pool: { predictive: false },
    });
    const raw = client(sockpoold.socketPath);
    await stats(raw); // the session is open
    const fds = sockpoold.fdCount();
    // (The protocol takes ASCII hosts only: a client turns an IDN into punycode, as its URL parser does.)
    const spellings = [
      { host: 'XN--BCHER-KVA.Example.', line: 'xn--bcher-kva.example:443' },
      { host: '2606:4700:0:0:0:0:0:1111', line: '[2606:4700::1111]:443' },
      { host: '::ffff:8.8.8.8', line: '8.8.8.8:443' },
    ];
    let id = 1;
    for (const { host, line } of spellings) {
      const lease = await raw.request({ type: 'acquire', id: id++, host, port: 443, proxy: 'corp' });
      expect(lease.message, `${host}: ${JSON.stringify(lease.message)}`).toMatchObject({ type: 'lease' });
      for (const fd of lease.fds) native.close(fd);
      await raw.request({ type: 'closed', id: id++, leaseId: (lease.message as { leaseId: number }).leaseId });
      expect(requests.at(-1), host).toBe(`CONNECT ${line} HTTP/1.1\r\nHost: ${line}`);
    }
    // A host that would end the request line or add a header is refused before any connect.
    const injections = [
      'a.example\r\nX-Injected: 1',
      'a.example:443 HTTP/1.1\r\n',
      'a.example\n',
      'a.\u010d\u010a.example',
    ];
    for (const host of injections) {
      const refused = await raw.request({ type: 'acquire', id: id++, host, port: 443, proxy: 'corp' });
      expect(refused.fds).toEqual([]);
      expect(refused.message, JSON.stringify(host)).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
    }
    expect(requests).toHaveLength(spellings.length);
    await eventually(
      () => sockpoold.fdCount() === fds,
      () => `the daemon holds no fd more than before: ${fds} then, ${sockpoold.fdCount()} now`,
    );
  });

  it('closes on reload the idle tunnels through a proxy whose URL changed, and tunnels through the new one', async () => {
    const ok = () => 'HTTP/1.1 200 Connection established\r\n\r\n';
    const before = await connectProxy(ok);
    const after = await connectProxy(ok);
    const ports = [before.proxy.port, after.proxy.port, 443];
    const configOf = (proxyPort: number) => ({
      proxies: [{ name: 'corp', url: `http://127.0.0.1:${proxyPort}` }],
      egress: { allow: ['127.0.0.1/32'], allowPorts: ports },
      pool: { predictive: false }, // the prewarmed tunnels only: no refills behind them
    });
    const configPath = writeConfig(configOf(before.proxy.port));
    const sockpoold = await startDaemon({ args: ['--config', configPath] });
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    await raw.request({ type: 'prewarm', id: 1, host: 'origin.example', port: 443, proxy: 'corp', count: 2 });
    await before.proxy.waitForConnections(2);
    await eventually(async () => (await stats(raw)).idle === 2, 'two tunnels idle');

    // corp now names the other proxy: the two tunnels through the old one are closed at once.
    writeFileSync(configPath, JSON.stringify(configOf(after.proxy.port)));
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('"idleClosedByPolicy":2'), 'reload closed two');
    await before.proxy.allClosed();
    expect((await stats(raw)).idle).toBe(0);
    const lease = await raw.request({ type: 'acquire', id: 2, host: 'origin.example', port: 443, proxy: 'corp' });
    expect(lease.message).toMatchObject({ type: 'lease', warm: false });
    expect(await roundTrip(lease.fds[0]!, 'via the new proxy')).toBe('via the new proxy');
    expect(after.requests).toEqual(['CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443']);
    expect(before.requests).toHaveLength(2);
  });

  it('shuts down a tunnel released unused after its proxy moved: a copy the client kept is dead too', async () => {
    const ok = () => 'HTTP/1.1 200 Connection established\r\n\r\n';
    const before = await connectProxy(ok);
    const after = await connectProxy(ok);
    const ports = [before.proxy.port, after.proxy.port, 443];
    const configOf = (proxyPort: number) => ({
      proxies: [{ name: 'corp', url: `http://127.0.0.1:${proxyPort}` }],
      egress: { allow: ['127.0.0.1/32'], allowPorts: ports },
      pool: { predictive: false },
    });
    const configPath = writeConfig(configOf(before.proxy.port));
    const sockpoold = await startDaemon({ args: ['--config', configPath] });
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: 'origin.example', port: 443, proxy: 'corp' });
    expect(lease.message).toMatchObject({ type: 'lease' });
    const kept = lease.fds[0]!;
    cleanups.push(() => native.close(kept));

    // corp moves while the tunnel is lent.
    writeFileSync(configPath, JSON.stringify(configOf(after.proxy.port)));
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('configuration reloaded'), 'reloaded');

    // The client gives the tunnel back unused and keeps its own copy of the fd (`withoutFd`). The tunnel
    // leads through a proxy the configuration no longer names, so the daemon does not pool it; it must end the
    // connection for every copy, as it does for any lease it ends, not just close its own fd.
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const released = await raw.request({ type: 'release', id: 2, leaseId, withoutFd: true });
    expect(released.message).toMatchObject({ type: 'ok', id: 2 });
    expect(native.probe(kept).state).not.toBe('alive');
    await before.proxy.allClosed();
  });
});

describe('limits and the fair queue', () => {
  it('counts leases of two client processes against maxPerOrigin and frees them when one exits', async () => {
    const echo = await server();
    const sockpoold = await daemon(echo.port, [], { pool: { defaults: { maxPerOrigin: 2, maxIdle: 2 } } });
    // Another process takes both slots and holds them.
    const holder = spawnChild(
      process.execPath,
      [
        join(repoRoot, 'test', 'fixtures', 'lease-holder.mjs'),
        sockpoold.socketPath,
        '127.0.0.1',
        String(echo.port),
        '2',
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    cleanups.push(() => holder.kill('SIGKILL'));
    const [line] = (await once(holder.stdout!, 'data')) as [Buffer];
    expect(line.toString().trim()).toBe('held 2');
    // This process waits in the queue...
    const second = client(sockpoold.socketPath);
    second.sendJson({ type: 'acquire', id: 7, host: '127.0.0.1', port: echo.port, timeoutMs: 20_000 });
    await eventually(async () => (await stats(second, 50)).waiting === 1, 'second client queued');
    expect((await stats(second, 51)).leased).toBe(2);
    // ...until the other process dies: the daemon ends its leases and serves the queue.
    holder.kill('SIGKILL');
    const reply = await second.receive();
    expect(reply.message).toMatchObject({ type: 'lease', id: 7 });
    for (const fd of reply.fds) native.close(fd);
  });

  it('fails a queued acquire at its deadline with SOCKPOOL_ERR_ACQUIRE_TIMEOUT', async () => {
    const echo = await server();
    const sockpoold = await daemon(echo.port, [], { pool: { defaults: { maxPerOrigin: 1, maxIdle: 1 } } });
    const raw = client(sockpoold.socketPath);
    const held = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    expect(held.message?.type).toBe('lease');
    const late = await raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port, timeoutMs: 200 });
    expect(late.message).toMatchObject({ type: 'error', id: 2, code: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT' });
    for (const fd of held.fds) native.close(fd);
  });

  it('takes an unused fd back with release and hands it out again warm', async () => {
    const echo = await server();
    // No predictive warming: a spare warmed in the background (a sweep on a slow machine) would be a second
    // connection, and the warm lease might be that spare rather than the released fd. The release carries its fd
    // (a client before binary framing 2), which the daemon takes only when it lets fds in (access.acceptClientFds).
    const sockpoold = await daemon(echo.port, [], { pool: { predictive: false }, access: { acceptClientFds: true } });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const released = await raw.request({ type: 'release', id: 2, leaseId }, lease.fds);
    native.close(lease.fds[0]!);
    expect(released.message).toMatchObject({ type: 'ok', id: 2 });
    const again = await raw.request({ type: 'acquire', id: 3, host: '127.0.0.1', port: echo.port });
    expect(again.message).toMatchObject({ type: 'lease', warm: true });
    expect(await roundTrip(again.fds[0]!, 'same')).toBe('same');
    expect(echo.connections).toHaveLength(1);
  });

  it('refuses a release that carries some other fd, and closes it', async () => {
    const echo = await server();
    // Fds let in (access.acceptClientFds): by default the kernel refuses any at the client (test/daemon-trust).
    const sockpoold = await daemon(echo.port, [], { access: { acceptClientFds: true } });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const [mine, theirs] = native.seqpacketPair();
    const reply = await raw.request({ type: 'release', id: 2, leaseId }, [theirs]);
    native.close(theirs);
    expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
    // The daemon closed its copy (before its reply): our end sees EOF, ours being the only one left. ('alive' is
    // the daemon keeping it: `not.toBe('data')` let that pass.)
    expect(native.probe(mine).state).toBe('eof');
    native.close(mine);
    for (const fd of lease.fds) native.close(fd);
  });
});

describe('bad input', () => {
  it('answers malformed, oversize and wrong-fd messages with typed errors, then disconnects a persistent offender', async () => {
    const echo = await server();
    // Fds let in (access.acceptClientFds): by default the kernel refuses any at the client (test/daemon-trust).
    const sockpoold = await daemon(echo.port, [], { access: { acceptClientFds: true } });
    const baseline = sockpoold.fdCount();
    const raw = client(sockpoold.socketPath);
    const cases: Array<[Uint8Array, number[]]> = [
      [Buffer.from('not json'), []],
      [Buffer.from('{"type":"acquire","id":1}'), []],
      [Buffer.from('{"type":"acquire","id":2,"host":"a b","port":80}'), []],
      [Buffer.from('{"type":"acquire","id":3,"host":"x","port":70000}'), []],
      [Buffer.from('{"type":"nope","id":4}'), []],
      [Buffer.from([0xff, 0xfe, 0x00]), []],
      [Buffer.from(JSON.stringify({ type: 'stats', id: 5, pad: 'x'.repeat(MAX_MESSAGE_BYTES) })), []],
    ];
    for (const [bytes, fds] of cases) {
      raw.sendBytes(bytes, fds);
      const reply = await raw.receive();
      expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
    }
    // An acquire that carries an fd: the fd is closed by the daemon, the message refused.
    const [keep, sent] = native.seqpacketPair();
    raw.sendBytes(Buffer.from(JSON.stringify({ type: 'stats', id: 6 })), [sent]);
    native.close(sent);
    expect((await raw.receive()).message).toMatchObject({ type: 'error', id: 6, code: 'SOCKPOOL_ERR_PROTOCOL' });
    await eventually(() => native.probe(keep).state === 'eof', 'daemon closed the fd it was sent');
    native.close(keep);
    // More garbage than maxBadMessages (10): the daemon hangs up. It counts the 8 bad messages above too, so it may
    // hang up before the last of these is sent: a send then fails with EPIPE, which is the point.
    for (let i = 0; i < 10; i++) {
      try {
        raw.sendBytes(Buffer.from(`garbage ${i}`));
      } catch (error) {
        if ((error as { code?: string }).code !== 'EPIPE') throw error;
        break;
      }
    }
    let eof = false;
    for (let i = 0; i < 20 && !eof; i++) eof = (await raw.receive()).eof;
    expect(eof).toBe(true);
    // Still serving others, with no fd left behind.
    const other = client(sockpoold.socketPath);
    expect((await other.request({ type: 'hello', id: 1, version: 1 })).message).toMatchObject({ type: 'hello' });
    other.close();
    cleanups.pop();
    await eventually(() => sockpoold.fdCount() === baseline, `daemon fd count back to ${baseline}`);
  });

  it('refuses a protocol version it does not speak', async () => {
    const echo = await server();
    const sockpoold = await daemon(echo.port);
    const raw = client(sockpoold.socketPath);
    const reply = await raw.request({ type: 'hello', id: 1, version: 99 });
    expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
  });

  it('refuses a destination the egress policy forbids with SOCKPOOL_ERR_POLICY', async () => {
    const echo = await server();
    const sockpoold = await startDaemon(); // defaults: loopback refused, ports 80 and 443 only
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    const loopback = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: 443 });
    expect(loopback.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_POLICY' });
    const port = await raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port });
    expect(port.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_POLICY' });
    expect(echo.connections).toHaveLength(0);
    await eventually(() => sockpoold.output().includes('refused'), 'refusal logged');
  });
});

describe('fd accounting', () => {
  it('keeps the daemon fd count stable across thousands of handoffs', async () => {
    const echo = await server();
    const sockpoold = await daemon(echo.port, [], { pool: { defaults: { maxIdle: 4 } } });
    const raw = client(sockpoold.socketPath);
    await raw.request({ type: 'acquire', id: 0, host: '127.0.0.1', port: echo.port }).then((r) => {
      for (const fd of r.fds) native.close(fd);
      return raw.request({ type: 'closed', id: 1, leaseId: (r.message as { leaseId: number }).leaseId });
    });
    // Baseline once the refills it started are in (connecting sockets become idle ones: same fds).
    await eventually(async () => (await stats(raw)).connecting === 0, 'refills settled');
    const baseline = sockpoold.fdCount();
    for (let i = 0; i < 2000; i++) {
      const lease = await raw.request({ type: 'acquire', id: 10 + i * 2, host: '127.0.0.1', port: echo.port });
      const leaseId = (lease.message as { leaseId: number }).leaseId;
      if (i % 2 === 0) {
        await raw.request({ type: 'release', id: 11 + i * 2, leaseId, withoutFd: true });
        native.close(lease.fds[0]!);
      } else {
        native.close(lease.fds[0]!);
        raw.sendJson({ type: 'closed', leaseId });
      }
    }
    const snapshot = await stats(raw);
    expect(snapshot.leased).toBe(0);
    // Idle sockets may differ by maxIdle at most; a refill the sweep starts at any moment adds a connecting fd for a
    // while, so connecting sockets are not counted (a leak of one fd per handoff would be hundreds over). (Under a
    // heavily loaded machine a refill's SYN once went unanswered for over 10 s: the origin's accept queue
    // overflowed; the connect times out and is tried again, which is not what this test is about.)
    let last = '';
    await eventually(
      async () => {
        const { connecting, idle } = await stats(raw);
        const count = sockpoold.fdCount();
        last = `${count} fds against ${baseline} at the baseline, ${idle} idle, ${connecting} connecting`;
        return Math.abs(count - connecting - baseline) <= 4;
      },
      () => `daemon fd count back near baseline (last: ${last})`,
    );
  });
});

describe('life cycle', () => {
  it('answers pending acquires with SOCKPOOL_ERR_SHUTTING_DOWN when stopped, and exits cleanly', async () => {
    const echo = await server();
    const sockpoold = await daemon(echo.port, [], { pool: { defaults: { maxPerOrigin: 1, maxIdle: 1 } } });
    const raw = client(sockpoold.socketPath);
    const held = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    expect(held.message?.type).toBe('lease');
    raw.sendJson({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port, timeoutMs: 30_000 });
    await eventually(async () => (await stats(raw, 3)).waiting === 1, 'acquire queued');
    const exited = sockpoold.stop();
    const reply = await raw.receive();
    expect(reply.message).toMatchObject({ type: 'error', id: 2, code: 'SOCKPOOL_ERR_SHUTTING_DOWN' });
    expect(await exited).toBe(0);
    for (const fd of held.fds) native.close(fd);
  });

  it.each(['acquire', 'tokens'] as const)(
    'answers %s requests waiting for an origin’s rate tokens with SOCKPOOL_ERR_SHUTTING_DOWN when stopped',
    async (type) => {
      // Such waits ended only with their session at the disconnect, their replies dropped: the client saw the hang-up.
      const echo = await server();
      // A token every 20 s: the burst's one goes to the first request, the second waits.
      const sockpoold = await daemon(echo.port, [], { pool: { defaults: { requestsPerSecond: 0.05, burst: 1 } } });
      const raw = client(sockpoold.socketPath);
      const ask = (id: number, timeoutMs?: number) => ({
        ...(type === 'acquire' ? { type, id } : { type, id, count: 1 }),
        host: '127.0.0.1',
        port: echo.port,
        ...(timeoutMs !== undefined && { timeoutMs }),
      });
      const first = await raw.request(ask(1) as never);
      expect(first.message?.type).toBe(type === 'acquire' ? 'lease' : 'tokens');
      for (const fd of first.fds) native.close(fd);
      raw.sendJson(ask(2, 30_000) as never);
      await eventually(
        async () => ((await stats(raw, 3)) as unknown as { rates: { waits: number } }).rates.waits === 1,
        'the second request waiting for a token',
      );
      const exited = sockpoold.stop();
      const reply = await raw.receive();
      expect(reply.eof).toBe(false);
      expect(reply.message).toMatchObject({ type: 'error', id: 2, code: 'SOCKPOOL_ERR_SHUTTING_DOWN' });
      expect(await exited).toBe(0);
    },
  );

  it('reloads its configuration on SIGHUP without dropping warm sockets', async () => {
    const echo = await server();
    const configPath = writeConfig({ pool: { defaults: { minIdle: 2 } } });
    const sockpoold = await startDaemon({
      args: ['--config', configPath, '--allow', '127.0.0.1/32', '--allow-port', String(echo.port)],
    });
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    await raw.request({ type: 'prewarm', id: 1, host: '127.0.0.1', port: echo.port, count: 2 });
    await eventually(async () => (await stats(raw)).idle === 2, 'two idle');
    writeFileSync(configPath, JSON.stringify({ pool: { defaults: { minIdle: 3 } } }));
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('configuration reloaded'), 'reload logged');
    await eventually(async () => (await stats(raw)).idle === 3, 'refilled to the new minIdle');
    // The two warm sockets stayed: exactly one more connection.
    expect(await echo.acceptedSoFar()).toBe(3);
    // A broken file keeps the old configuration.
    writeFileSync(configPath, '{ "pool": { "defaults": { "minIdle": "many" } } }');
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('reload failed'), 'reload failure logged');
    expect((await raw.request({ type: 'hello', id: 5, version: 1 })).message?.type).toBe('hello');
  });

  it('closes idle sockets a reloaded egress policy refuses, and keeps the others', async () => {
    const refused = await server();
    const kept = await server();
    const ports = [refused.port, kept.port];
    // The allow list lives in the file (flags are applied again on reload: they could not be taken away).
    const configPath = writeConfig({ egress: { allow: ['127.0.0.1/32'], allowPorts: ports } });
    const sockpoold = await startDaemon({ args: ['--config', configPath] });
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    for (const [index, port] of ports.entries()) {
      await raw.request({ type: 'prewarm', id: index + 1, host: '127.0.0.1', port, count: 2 });
    }
    await refused.waitForConnections(2);
    await kept.waitForConnections(2);
    await eventually(async () => (await stats(raw)).idle === 4, 'four idle');
    // The new policy no longer allows one of the ports: its two idle sockets are closed at once (the server sees
    // them end), the other origin's stay warm.
    writeFileSync(configPath, JSON.stringify({ egress: { allow: ['127.0.0.1/32'], allowPorts: [kept.port] } }));
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('"idleClosedByPolicy":2'), 'reload closed two');
    await refused.allClosed();
    expect((await stats(raw)).idle).toBe(2);
    const lease = await raw.request({ type: 'acquire', id: 10, host: '127.0.0.1', port: kept.port });
    expect(lease.message).toMatchObject({ type: 'lease', warm: true });
    for (const fd of lease.fds) native.close(fd);
    const denied = await raw.request({ type: 'acquire', id: 11, host: '127.0.0.1', port: refused.port });
    expect(denied.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_POLICY', fields: { reason: 'port' } });
  });

  it('ends the sessions of a uid a reload takes out of access.allowUids: told why, their leases shut down', async () => {
    // Checked only at accept, a uid taken out kept every session it had open, served for as long as it stayed.
    const echo = await server();
    const uid = process.getuid!();
    const config = (allowUids: number[]) => ({
      egress: { allow: ['127.0.0.1/32'], allowPorts: [echo.port] },
      access: { allowUids },
      pool: { predictive: false },
    });
    const configPath = writeConfig(config([uid]));
    const sockpoold = await startDaemon({ args: ['--config', configPath] });
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    expect(lease.message?.type).toBe('lease');
    const fd = lease.fds[0]!;
    cleanups.push(() => native.close(fd));
    writeFileSync(configPath, JSON.stringify(config([uid + 12_345])));
    sockpoold.child.kill('SIGHUP');
    const told = await raw.receive();
    expect(told.message).toMatchObject({ type: 'error', id: null, code: 'SOCKPOOL_ERR_ACCESS_DENIED' });
    expect((await raw.receive()).eof).toBe(true);
    // The lease ended with the session: its connection is shut down for the copy the client holds too.
    await eventually(() => native.probe(fd).state !== 'alive', 'the lease of the revoked session shut down');
    await eventually(() => sockpoold.output().includes('"revokedSessions":1'), 'the reload logged one session ended');
  });

  it('refuses a reload whole when a TLS file cannot be read: the egress policy of before stays', async () => {
    const a = await server();
    const b = await server();
    const configPath = writeConfig({ egress: { allow: ['127.0.0.1/32'], allowPorts: [a.port, b.port] } });
    const sockpoold = await startDaemon({ args: ['--config', configPath] });
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    // The new file no longer allows b, and names a CA file that does not exist: reading it fails the reload.
    writeFileSync(
      configPath,
      JSON.stringify({
        egress: { allow: ['127.0.0.1/32'], allowPorts: [a.port] },
        tls: { caFile: '/nonexistent/ca.pem' },
      }),
    );
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('reload failed'), 'reload failure logged');
    expect(sockpoold.output()).toMatch(/tls\.caFile: cannot read \/nonexistent\/ca\.pem/);
    // Nothing of the refused file is in force: b is still allowed.
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: b.port });
    for (const fd of lease.fds) native.close(fd);
    expect(lease.message).toMatchObject({ type: 'lease' });
  });

  it('applies pool.historyMaxOrigins on reload, and warns about the keys read only at start', async () => {
    const servers = await Promise.all([server(), server(), server(), server()]);
    const ports = servers.map((started) => started.port);
    const configOf = (historyMaxOrigins: number, metricsHost: string) => ({
      metricsHost,
      egress: { allow: ['127.0.0.1/32'], allowPorts: ports },
      pool: { predictive: false, statsFlushMs: 50, historyMaxOrigins },
    });
    const configPath = writeConfig(configOf(100, '127.0.0.1'));
    const sockpoold = await startDaemon({ args: ['--config', configPath] });
    cleanups.push(() => sockpoold.stop());
    const raw = client(sockpoold.socketPath);
    let id = 1;
    const touch = async (port: number) => {
      const lease = await raw.request({ type: 'acquire', id: id++, host: '127.0.0.1', port });
      expect(lease.message).toMatchObject({ type: 'lease' });
      for (const fd of lease.fds) native.close(fd);
    };
    for (const port of ports.slice(0, 3)) await touch(port);
    writeFileSync(configPath, JSON.stringify(configOf(1, '::1')));
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('configuration reloaded'), 'reload logged');
    const warnings = sockpoold
      .output()
      .split('\n')
      .filter((line) => line.includes('take effect at the next start'));
    expect(warnings.map((line) => (JSON.parse(line) as { keys: string[] }).keys)).toEqual([['metricsHost']]);
    await touch(ports[3]!);
    // The timer's next flush writes the last origin and evicts down to the new cap (the stop's close only writes:
    // its evictions are the next start's first flush's).
    const db = new Database(join(sockpoold.stateDir, 'sockpool.sqlite'), { readonly: true });
    const origins = () => db.prepare('SELECT origin_key FROM origins').pluck().all();
    await eventually(
      () => JSON.stringify(origins()) === JSON.stringify([`127.0.0.1:${ports[3]}`]),
      () => `only the last origin kept: ${JSON.stringify(origins())}`,
    );
    db.close();
    expect(await sockpoold.stop()).toBe(0);
  });

  it('starts on an empty history when its state database is corrupt, moving the file aside', async () => {
    const stateDir = mkdtempSync(join(tmpdir(), 'sockpoold-test-'));
    const path = join(stateDir, 'sockpool.sqlite');
    // A torn or foreign file: systemd would restart a daemon that stopped on it into the same failure, for ever.
    const garbage = Buffer.alloc(8192, 0x5a);
    writeFileSync(path, garbage);
    const sockpoold = await startDaemon({ stateDir });
    cleanups.push(() => sockpoold.stop());
    const moved = readdirSync(stateDir).filter((name) => name.startsWith('sockpool.sqlite.corrupt-'));
    expect(moved).toHaveLength(1);
    expect(readFileSync(join(stateDir, moved[0]!))).toEqual(garbage);
    const warning = sockpoold
      .output()
      .split('\n')
      .find((line) => line.includes('state database corrupt'));
    expect(JSON.parse(warning ?? '{}')).toMatchObject({ path, movedTo: join(stateDir, moved[0]!) });
    expect(existsSync(path)).toBe(true);
    expect(await sockpoold.stop()).toBe(0);
  });

  it('says at warn, with the SQLite code, when the history stops being written while it serves, and when it is written again', async () => {
    // Found in review: a flush failing for good (a full disk, a read-only or locked file) was never logged.
    const echo = await server();
    const sockpoold = await daemon(echo.port, [], { pool: { statsFlushMs: 50 } });
    const other = new Database(join(sockpoold.stateDir, 'sockpool.sqlite'));
    cleanups.push(() => other.close());
    other.exec('BEGIN IMMEDIATE');
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    for (const fd of lease.fds) native.close(fd);
    expect(lease.message).toMatchObject({ type: 'lease' });
    const failing = () =>
      logRecords(sockpoold, 'history not written: flushes of the state database fail (retried at each tick)');
    await eventually(() => failing().length > 0, 'the failing flushes logged');
    other.exec('ROLLBACK');
    await eventually(
      () => logRecords(sockpoold, 'history written again: a flush of the state database succeeded').length > 0,
      'the recovery logged',
    );
    // (pending: 1, or 0 when the first failing write was the timer's first prune, before the acquire was recorded:
    // since the thirty-fourth session the start's ranking leaves that prune to the timer. What was recorded is
    // checked in the file below.)
    expect(failing()).toEqual([
      expect.objectContaining({
        level: 40,
        sqliteCode: expect.stringMatching(/^SQLITE_BUSY/),
        pending: expect.toSatisfy((pending: number) => pending === 0 || pending === 1),
      }),
    ]);
    expect(await sockpoold.stop()).toBe(0);
    const db = new Database(join(sockpoold.stateDir, 'sockpool.sqlite'), { readonly: true });
    expect(db.prepare('SELECT acquires FROM origins').pluck().all()).toEqual([1]);
    db.close();
  });

  it('starts and serves without history when its state database cannot be opened (an unopenable -wal), saying so at error with the SQLite code', async () => {
    // Found in review: a full disk, a read-only file or an unopenable -wal failed the start with SOCKPOOL_ERR_CONFIG,
    // exit 2, which the unit does not restart (RestartPreventExitStatus=2): the service stayed down.
    const echo = await server();
    const stateDir = mkdtempSync(join(tmpdir(), 'sockpoold-test-'));
    const path = join(stateDir, 'sockpool.sqlite');
    const db = new Database(path);
    db.exec('PRAGMA journal_mode = WAL; CREATE TABLE kept (a)');
    db.close();
    const before = readFileSync(path);
    mkdirSync(`${path}-wal`);
    const sockpoold = await startDaemon({
      stateDir,
      args: ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)],
    });
    cleanups.push(() => sockpoold.stop());
    expect(logRecords(sockpoold, 'state database unavailable: running with a history in memory only')).toEqual([
      expect.objectContaining({ level: 50, path, sqliteCode: 'SQLITE_CANTOPEN' }),
    ]);
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    for (const fd of lease.fds) native.close(fd);
    expect(lease.message).toMatchObject({ type: 'lease' });
    expect(await sockpoold.stop()).toBe(0);
    expect(readFileSync(path)).toEqual(before);
  });

  it('says at warn which schema migration waits when another process holds the write lock of an older file', async () => {
    // Found in review: the start went on (as it should) but said nothing, so the operator never learned why the
    // file stayed at its old schema.
    const stateDir = mkdtempSync(join(tmpdir(), 'sockpoold-test-'));
    const path = join(stateDir, 'sockpool.sqlite');
    const db = new Database(path);
    db.exec('PRAGMA journal_mode = WAL');
    // Schema 1, as the first sockpoold left it.
    db.exec(MIGRATIONS[0]!);
    db.exec('PRAGMA user_version = 1');
    db.close();
    const other = new Database(path);
    other.exec('BEGIN IMMEDIATE');
    cleanups.push(() => other.close());
    cleanups.push(() => other.exec('ROLLBACK'));
    const sockpoold = await startDaemon({ stateDir });
    cleanups.push(() => sockpoold.stop());
    const warnings = sockpoold
      .output()
      .split('\n')
      .filter((line) => line.includes('schema migration'));
    expect(warnings).toHaveLength(1);
    expect(JSON.parse(warnings[0]!)).toMatchObject({
      level: 40,
      path,
      version: 1,
      migration: 2,
      newest: MIGRATIONS.length,
      err: expect.stringMatching(/locked/),
    });
    expect(await sockpoold.stop()).toBe(0);
  });

  /** A daemon that served `acquires` leases of `port` (its history has the origin), stopped. */
  async function stoppedWithHistory(port: number, acquires: number): Promise<DaemonProcess> {
    const first = await daemon(port);
    const raw = client(first.socketPath);
    for (let i = 0; i < acquires; i++) {
      const lease = await raw.request({ type: 'acquire', id: i, host: '127.0.0.1', port });
      for (const fd of lease.fds) native.close(fd);
    }
    raw.close();
    cleanups.pop();
    expect(await first.stop()).toBe(0);
    return first;
  }

  it('warms the origins from its history after a restart', async () => {
    const echo = await server();
    const first = await stoppedWithHistory(echo.port, 5);
    const before = echo.connections.length;
    const second = await startDaemon({
      stateDir: first.stateDir,
      args: ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)],
    });
    cleanups.push(() => second.stop());
    await echo.waitForConnections(before + 1);
    const again = client(second.socketPath);
    await eventually(async () => (await stats(again)).idle >= 1, 'an idle socket warmed from history');
    const lease = await again.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    expect(lease.message).toMatchObject({ type: 'lease', warm: true });
    for (const fd of lease.fds) native.close(fd);
  });
  it('is ready before it evicts what its history holds over pool.historyMaxOrigins, and says when that is done', async () => {
    // A history far over the cap the daemon starts with (a lower pool.historyMaxOrigins; a stop writes past it).
    const stateDir = mkdtempSync(join(tmpdir(), 'sockpoold-test-'));
    const building = StateStore.open(stateDir, { maxOrigins: 20_000 });
    for (let port = 10_000; port < 30_000; port++) building.recordAcquire(`127.0.0.1:${port}`, { hit: false }, 1000);
    await building.flush();
    building.close();
    await building.threadEnded();
    const configPath = writeConfig({
      egress: { allow: ['127.0.0.1/32'], allowPorts: [9] },
      // No tick of the timer before the ranking: the eviction is the one the ranking leaves.
      pool: { historyMaxOrigins: 1_000, statsFlushMs: 600_000 },
    });
    const sockpoold = await startDaemon({ stateDir, args: ['--config', configPath] });
    cleanups.push(() => sockpoold.stop());
    await eventually(
      () => logRecords(sockpoold, 'history evicted down to pool.historyMaxOrigins').length > 0,
      () => `the eviction logged: ${sockpoold.output()}`,
    );
    const lines = sockpoold
      .output()
      .split('\n')
      .filter((line) => line.startsWith('{'))
      .map((line) => (JSON.parse(line) as { msg: string }).msg);
    // Before, READY (and its log line) waited for the eviction: the ranking did it first.
    expect(lines.indexOf('sockpoold ready')).toBeLessThan(
      lines.indexOf('history evicted down to pool.historyMaxOrigins'),
    );
    expect(logRecords(sockpoold, 'history evicted down to pool.historyMaxOrigins')).toEqual([
      expect.objectContaining({ overCap: 19_000, historyMaxOrigins: 1_000 }),
    ]);
    const db = new Database(join(stateDir, 'sockpool.sqlite'), { readonly: true });
    expect(db.prepare('SELECT count(*) FROM origins').pluck().get()).toBe(1_000);
    db.close();
    expect(await sockpoold.stop()).toBe(0);
  });

  it('starts, warms from its history and stops cleanly while another process holds the database write lock', async () => {
    const echo = await server();
    const first = await stoppedWithHistory(echo.port, 3);
    // Another process (an operator's sqlite3 shell, a backup tool) in a write transaction on the file.
    const other = new Database(join(first.stateDir, 'sockpool.sqlite'));
    other.exec('BEGIN IMMEDIATE');
    cleanups.push(() => other.close());
    cleanups.push(() => other.exec('ROLLBACK'));
    const before = echo.connections.length;
    // The history only warms: it used to fail the start (SQLITE_BUSY from the flush before the ranking).
    const second = await startDaemon({
      stateDir: first.stateDir,
      args: ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)],
    });
    cleanups.push(() => second.stop());
    // What is stored can still be read: the origin is warmed.
    await echo.waitForConnections(before + 1);
    // What could not be written is lost at stop, which is still a clean one.
    expect(await second.stop()).toBe(0);
  });
});
