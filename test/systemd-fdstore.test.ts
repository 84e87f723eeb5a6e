// The real sockpoold (dist/daemon/main.js) and systemd's fd store, with systemd played by the test: it binds the
// NOTIFY_SOCKET, keeps what arrives with FDSTORE=1, and passes the handoff socket and the stored sockets back as
// LISTEN_FDS/LISTEN_FDNAMES at the next start, as systemd does on a restart. Checks the daemon's side of the warm
// restart without booting systemd (test/systemd-lab.system.test.ts does it under the real one): every idle socket stored on
// SIGTERM even when the notify queue is full; at the next start the live ones adopted, dead, forbidden and unknown
// ones closed, every stored name removed (FDSTOREREMOVE=1) before READY=1; the first acquire served warm on a
// connection the origin already had; the socket file of a socket-activated daemon left alone.
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, Server as HttpServer } from 'node:http';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { connectedAtFromTag, decodeFdName, encodeFdName } from '../daemon/sd-notify.js';
import { connectTcp } from '../daemon/tcp-connect.js';
import * as native from '../shared/native.js';
import { closeQuietly, NotifySocket } from './fixtures/systemd-notify-socket.js';
import { spawnChild } from './helpers/children.js';
import { daemonMain, eventually } from './helpers/daemon.js';
import { RawClient } from './helpers/raw-client.js';

const workDir = mkdtempSync(join(tmpdir(), 'sockpool-fdstore-'));
const children: ChildProcess[] = [];
const toClose: number[] = [];

/** A TCP server on 127.0.0.1 that counts the connections it accepted and those still open. */
interface CountingServer {
  port: number;
  connections: number;
  open: number;
  close(): void;
}

async function listen(server: Server | HttpServer): Promise<number> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no port');
  return address.port;
}

async function countingServer(
  kind: 'http' | 'hold' | 'hang-up',
): Promise<CountingServer & { server: Server | HttpServer }> {
  const sockets = new Set<Socket>();
  const server =
    kind === 'http'
      ? createHttpServer((_request, response) => response.end('hello\n'))
      : createServer((socket) => {
          if (kind === 'hang-up') socket.end();
        });
  if (server instanceof HttpServer) {
    // Idle connections stay until the test ends.
    server.keepAliveTimeout = 0;
    server.headersTimeout = 0;
    server.requestTimeout = 0;
  }
  const counts = {
    server,
    port: 0,
    connections: 0,
    open: 0,
    close() {
      for (const socket of sockets) socket.destroy();
      server.close();
    },
  };
  server.on('connection', (socket: Socket) => {
    counts.connections++;
    counts.open++;
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => {
      counts.open--;
      sockets.delete(socket);
    });
  });
  counts.port = await listen(server);
  return counts;
}

interface Sockpoold {
  child: ChildProcess;
  output(): string;
  exited: Promise<number | null>;
}

/**
 * Starts the daemon the way systemd does: `fds` at 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (its own
 * pid, through a shell that execs node), and NOTIFY_SOCKET.
 */
function startSockpoold(
  notify: NotifySocket,
  fds: Array<{ fd: number; name: string }>,
  config: string,
  extraEnv: Record<string, string> = {},
): Sockpoold {
  const {
    LISTEN_PID: _p,
    LISTEN_FDS: _f,
    LISTEN_FDNAMES: _n,
    NOTIFY_SOCKET: _s,
    WATCHDOG_USEC: _w,
    ...env
  } = process.env;
  const args = [daemonMain, '--config', config, '--state-dir', join(workDir, 'state'), '--log-level', 'debug'];
  // --socket points elsewhere: a socket-activated daemon must neither use nor create it.
  args.push('--socket', join(workDir, 'not-used.sock'));
  const child = spawnChild('/bin/sh', ['-c', 'LISTEN_PID=$$ exec "$@"', 'sh', process.execPath, ...args], {
    env: {
      ...env,
      NOTIFY_SOCKET: notify.path,
      LISTEN_FDS: String(fds.length),
      LISTEN_FDNAMES: fds.map((entry) => entry.name).join(':'),
      ...extraEnv,
    },
    stdio: ['ignore', 'pipe', 'pipe', ...fds.map((entry) => entry.fd)],
  });
  children.push(child);
  let output = '';
  child.stdout!.on('data', (chunk) => {
    output += chunk;
  });
  child.stderr!.on('data', (chunk) => {
    output += chunk;
  });
  // 'close', not 'exit': by then the child's stdout is read to the end, so output() has its last lines.
  const exited = once(child, 'close').then(([code]) => code as number | null);
  return { child, output: () => output, exited };
}

async function ready(notify: NotifySocket, daemon: Sockpoold) {
  const exit = daemon.exited.then((code) => {
    throw new Error(`sockpoold exited (${code}) before READY=1:\n${daemon.output()}`);
  });
  exit.catch(() => {});
  return Promise.race([notify.waitFor((text) => text.startsWith('READY=1'), 15_000), exit]);
}

async function rawClient(socketPath: string): Promise<RawClient> {
  const client = new RawClient(socketPath);
  const hello = await client.request({ type: 'hello', id: 1, version: 1 });
  expect(hello.message).toMatchObject({ type: 'hello' });
  return client;
}

async function stats(client: RawClient, id: number): Promise<{ idle: number; hits: number }> {
  const reply = await client.request({ type: 'stats', id });
  return (reply.message as unknown as { stats: { idle: number; hits: number } }).stats;
}

let origin: Awaited<ReturnType<typeof countingServer>>;
let hangUp: Awaited<ReturnType<typeof countingServer>>;
let forbidden: Awaited<ReturnType<typeof countingServer>>;
let quiet: Awaited<ReturnType<typeof countingServer>>;
let deniedByName: Awaited<ReturnType<typeof countingServer>>;
let config: string;

beforeAll(async () => {
  if (!existsSync(daemonMain)) throw new Error(`${daemonMain} missing: run npm run build first`);
  origin = await countingServer('http');
  hangUp = await countingServer('hang-up');
  forbidden = await countingServer('hold');
  quiet = await countingServer('hold');
  deniedByName = await countingServer('hold');
  config = join(workDir, 'sockpoold.json');
  // forbidden.port is not allowed: a stored socket to it must not be adopted. Nor one stored under a host name
  // the policy now denies, whatever address it is connected to (stored sockets are checked as if new).
  writeFileSync(
    config,
    JSON.stringify({
      egress: {
        allow: ['127.0.0.1/32'],
        allowPorts: [origin.port, hangUp.port, quiet.port, deniedByName.port],
        denyHosts: ['denied.test'],
      },
      pool: { defaults: { maxIdle: 64 } },
    }),
  );
});

afterEach(() => {
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
  for (const fd of toClose.splice(0)) closeQuietly(fd);
});

afterAll(() => {
  for (const server of [origin, hangUp, forbidden, quiet, deniedByName]) server?.close();
  rmSync(workDir, { recursive: true, force: true });
});

describe('sockpoold and the fd store', () => {
  it('stores its idle sockets on SIGTERM, past a full notify queue, and is warm again after the restart', async () => {
    const socketPath = join(workDir, 'sockpoold.sock');
    const listener = native.seqpacketListen(socketPath, 64);
    toClose.push(listener);
    chmodSync(socketPath, 0o600); // as a .socket unit's SocketMode= would; the daemon must leave it so

    // ---- First life: socket-activated, warm 40 connections, SIGTERM. ----
    const notify1 = new NotifySocket(join(workDir, 'notify-1.sock'));
    const first = startSockpoold(notify1, [{ fd: listener, name: 'sockpoold' }], config);
    const ready1 = await ready(notify1, first);
    expect(ready1.text).toMatch(/^READY=1\nSTATUS=idle \d+, leased \d+, origins \d+, hit rate [\d.]+%, clients \d+$/);
    // (Its log reaches us through a pipe, which may lag the READY=1 datagram.)
    await eventually(() => first.output().includes('socket-activated'), 'the socket-activated log line');
    const client1 = await rawClient(socketPath);
    await client1.request({ type: 'prewarm', id: 2, host: '127.0.0.1', port: origin.port, count: 40 });
    let id = 10;
    await eventually(async () => (await stats(client1, id++)).idle === 40, '40 idle sockets');
    // The origin's accept loop runs in this process and may lag the daemon's connects by a few.
    await eventually(() => origin.connections === 40, 'the origin accepted all 40');
    client1.close();

    // PID 1 busy: the notify queue is full (net.unix.max_dgram_qlen datagrams); the daemon must wait, not drop
    // sockets.
    notify1.busy();
    first.child.kill('SIGTERM');
    await eventually(() => first.output().includes('sd_notify queue full: waiting for room'), 'the daemon waiting');
    expect(first.child.exitCode).toBeNull();
    notify1.resume();
    expect(await first.exited).toBe(0);
    expect(first.output()).toMatch(/"stored":40,"idle":40,.*"msg":"sockpoold stopped"/);
    // It waited for room each time, never gave up on a notification.
    expect(first.output()).not.toContain('sd_notify failed');
    const texts = notify1.texts();
    expect(texts.findIndex((text) => text.startsWith('STOPPING=1'))).toBeGreaterThan(-1);

    const stored: Array<{ fd: number; name: string }> = [];
    for (const message of notify1.messages) {
      const match = /^FDSTORE=1\nFDNAME=(\S+)$/.exec(message.text);
      if (!match) continue;
      const name = match[1]!;
      const decoded = decodeFdName(name);
      expect(decoded).toMatchObject({ host: '127.0.0.1', port: origin.port });
      // The tag is the second the socket connected: within this test's run.
      const connectedAt = connectedAtFromTag(decoded?.tag);
      expect(connectedAt).not.toBeNull();
      expect(Math.abs(Date.now() - connectedAt!)).toBeLessThan(60_000);
      for (const fd of message.fds) {
        expect(native.probe(fd).state).toBe('alive');
        stored.push({ fd, name });
      }
    }
    expect(stored).toHaveLength(40);
    // systemd's copies keep the connections: the origin saw none close.
    expect(origin.open).toBe(40);
    // The socket file is systemd's: not unlinked, not chmod-ed.
    expect(statSync(socketPath).mode & 0o777).toBe(0o600);
    expect(existsSync(join(workDir, 'not-used.sock'))).toBe(false);

    // ---- What else a store may hold: a socket whose peer hung up, one to a port the policy no longer allows,
    // and an fd under a name that is not ours. ----
    const dead = await connectTcp('127.0.0.1', hangUp.port, { timeoutMs: 5000 });
    const refused = await connectTcp('127.0.0.1', forbidden.port, { timeoutMs: 5000 });
    const refusedByName = await connectTcp('127.0.0.1', deniedByName.port, { timeoutMs: 5000 });
    const [unknown, unknownPeer] = native.seqpacketPair();
    toClose.push(unknownPeer);
    await eventually(() => native.probe(dead).state === 'eof', 'the hang-up server to close');
    const extra = [
      { fd: dead, name: encodeFdName({ host: '127.0.0.1', port: hangUp.port }) },
      { fd: refused, name: encodeFdName({ host: '127.0.0.1', port: forbidden.port }) },
      { fd: refusedByName, name: encodeFdName({ host: 'denied.test', port: deniedByName.port }) },
      { fd: unknown, name: 'stored' },
    ];

    // ---- Second life: the listener and the stored fds passed back. ----
    const notify2 = new NotifySocket(join(workDir, 'notify-2.sock'));
    const second = startSockpoold(notify2, [{ fd: listener, name: 'sockpoold' }, ...stored, ...extra], config);
    const ready2 = await ready(notify2, second);
    // Every stored name removed from the store before READY=1.
    const names = new Set([...stored, ...extra].map((entry) => entry.name));
    const removed = notify2.messages
      .filter((message) => message.atMs <= ready2.atMs)
      .map((message) => /^FDSTOREREMOVE=1\nFDNAME=(\S+)$/.exec(message.text)?.[1])
      .filter((name) => name !== undefined);
    expect(new Set(removed)).toEqual(names);
    // Like systemd, close the store's copies now.
    for (const entry of [...stored, ...extra]) native.close(entry.fd);
    await eventually(
      () => /"stored":43,"adopted":40,.*taken back from the fd store/.test(second.output()),
      `the adoption logged:\n${second.output()}`,
    );

    const client2 = await rawClient(socketPath);
    expect(await stats(client2, 2)).toMatchObject({ idle: 40 });
    const lease = await client2.request({ type: 'acquire', id: 3, host: '127.0.0.1', port: origin.port });
    expect(lease.message).toMatchObject({ type: 'lease', warm: true });
    expect(lease.fds).toHaveLength(1);
    toClose.push(...lease.fds);
    expect(origin.connections).toBe(40);
    expect(origin.open).toBe(40);
    // The dropped ones are closed in the daemon too: nothing holds them any more.
    await eventually(() => forbidden.open === 0, 'the forbidden connection to close');
    await eventually(() => deniedByName.open === 0, 'the connection stored under a denied name to close');
    client2.close();

    second.child.kill('SIGTERM');
    expect(await second.exited).toBe(0);
    expect(statSync(socketPath).mode & 0o777).toBe(0o600);
    notify1.close();
    notify2.close();
  }, 30_000);

  it('a start that fails (its metricsPort taken) asks systemd to forget no stored socket', async () => {
    const socketPath = join(workDir, 'failing.sock');
    const listener = native.seqpacketListen(socketPath, 64);
    toClose.push(listener);
    const taken = createServer();
    const metricsPort = await listen(taken);
    try {
      const storedFd = await connectTcp('127.0.0.1', origin.port, { timeoutMs: 5000 });
      toClose.push(storedFd);
      const failingConfig = join(workDir, 'metrics-taken.json');
      writeFileSync(
        failingConfig,
        JSON.stringify({ egress: { allow: ['127.0.0.1/32'], allowPorts: [origin.port] }, metricsPort }),
      );
      const notify = new NotifySocket(join(workDir, 'notify-failing.sock'));
      const daemon = startSockpoold(
        notify,
        [
          { fd: listener, name: 'sockpoold' },
          { fd: storedFd, name: encodeFdName({ host: '127.0.0.1', port: origin.port }) },
        ],
        failingConfig,
      );
      expect(await daemon.exited).not.toBe(0);
      expect(daemon.output()).toContain('sockpoold failed to start');
      // The store keeps its copy for the next start: nothing was removed, and nothing said ready.
      expect(notify.texts().filter((text) => /FDSTOREREMOVE|READY=1/.test(text))).toEqual([]);
      notify.close();
    } finally {
      taken.close();
    }
  }, 30_000);

  it('stores at most $FDSTORE sockets (systemd >= 254 sets it), the origins in demand first', async () => {
    const socketPath = join(workDir, 'limited.sock');
    const listener = native.seqpacketListen(socketPath, 64);
    toClose.push(listener);
    const notify = new NotifySocket(join(workDir, 'notify-limited.sock'));
    const daemon = startSockpoold(notify, [{ fd: listener, name: 'sockpoold' }], config, { FDSTORE: '5' });
    await ready(notify, daemon);
    const client = await rawClient(socketPath);
    // Demand for `origin`: two acquires, each lease given back unused (it returns to the idle pool).
    for (const id of [2, 3]) {
      const lease = await client.request({ type: 'acquire', id, host: '127.0.0.1', port: origin.port });
      const leaseId = (lease.message as unknown as { leaseId: number }).leaseId;
      client.sendJson({ type: 'release', leaseId, withoutFd: true });
      for (const fd of lease.fds) native.close(fd);
    }
    await client.request({ type: 'prewarm', id: 4, host: '127.0.0.1', port: origin.port, count: 4 });
    await client.request({ type: 'prewarm', id: 5, host: '127.0.0.1', port: quiet.port, count: 4 });
    let id = 10;
    await eventually(async () => (await stats(client, id++)).idle >= 8, '8 idle sockets');
    client.close();

    daemon.child.kill('SIGTERM');
    expect(await daemon.exited).toBe(0);
    const stored = notify.messages
      .filter((message) => message.text.startsWith('FDSTORE=1'))
      .flatMap((message) => message.fds.map(() => decodeFdName(message.text.split('FDNAME=')[1] ?? '')?.port));
    expect(stored).toHaveLength(5);
    expect(stored.slice(0, 4)).toEqual([origin.port, origin.port, origin.port, origin.port]);
    expect(stored[4]).toBe(quiet.port);
    // What was not stored was closed: the store (the test) holds the one quiet socket it got, nobody else.
    await eventually(() => quiet.open === 1, 'the unstored sockets to close');
    notify.close();
    await eventually(() => quiet.open === 0, 'the stored one to close with the store');
  }, 30_000);
});
