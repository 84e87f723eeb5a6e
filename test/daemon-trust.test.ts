// sockpoold trusts no client: hostile client processes (test/fixtures/hostile-client.mjs) speak the raw protocol
// beside an honest client, against a real daemon and a real HTTP origin on loopback. Each hostile action is
// checked to fail in its stated way, and the honest client's answers are all its own.
// Tests that need clients of different uids are in daemon-trust.system.test.ts (root).
import { execFile, fork } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { type AddressInfo, createServer, Socket } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import { ACCEPTS_PER_WAKEUP } from '../daemon/handoff-server.js';
import { REFUSAL_LOG_WINDOW_MS, REFUSALS_LOGGED } from '../daemon/log.js';
import * as native from '../shared/native.js';
import { MAX_MESSAGE_BYTES } from '../shared/protocol.js';
import { waitForEvents } from './fixtures/native-helpers.js';
import { trackChild } from './helpers/children.js';
import {
  type DaemonProcess,
  eventually,
  logRecords,
  repoRoot,
  startDaemon,
  writeConfigFile,
} from './helpers/daemon.js';
import { openRawClient, RawClient } from './helpers/raw-client.js';
import { honestRequest, hostileClient, pathOrigin, runHostile } from './helpers/trust.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function daemon(port: number, config: object = {}): Promise<DaemonProcess> {
  const args = ['--allow', '127.0.0.1/32', '--allow-port', String(port)];
  const started = await startDaemon({ args: [...args, '--config', writeConfigFile(config, cleanups)] });
  cleanups.push(() => started.stop());
  return started;
}

function client(socketPath: string): RawClient {
  return openRawClient(socketPath, cleanups);
}

let nextId = 1;
const runPython = (script: string, args: string[]) =>
  promisify(execFile)('python3', [script, ...args], { timeout: 30_000 });

async function stats(raw: RawClient): Promise<{ leased: number; idle: number; leases: number; waiting: number }> {
  const reply = await raw.request({ type: 'stats', id: nextId++ });
  return (reply.message as unknown as { stats: { leased: number; idle: number; leases: number; waiting: number } })
    .stats;
}

describe('released sockets', () => {
  it('closes a socket released after a write: over 1,000 tries the honest client never gets an answer it did not ask for', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { minIdle: 4, maxIdle: 8 } } });
    const raw = client(sockpoold.socketPath);
    let honestDone = 0;
    let warm = 0;
    let stop = false;
    const honest = (async () => {
      while (!stop) {
        const path = `/honest-${honestDone}`;
        const answer = await honestRequest(raw, origin.port, path);
        expect(answer.body).toBe(path);
        if (answer.warm) warm++;
        honestDone++;
      }
    })();
    const seen = await runHostile(['write-release', sockpoold.socketPath, origin.port, 1000]);
    stop = true;
    await honest;
    // Every poisoned release was refused in its stated way and closed.
    expect(seen).toEqual({ 'SOCKPOOL_ERR_PROTOCOL:used': 1000 });
    expect(honestDone).toBeGreaterThan(0);
    expect(warm).toBeGreaterThan(0);
    // Nothing ever completed a poisoned request: each connection that carried one was closed before anyone else
    // could write on it (an unfinished request is never answered).
    expect(origin.seen.get('/poisoned')).toBeUndefined();
    await eventually(async () => (await stats(raw)).leased === 0, 'every lease ended');
  });

  it('the hostile client of the adversarial benchmark (HOSTILE_REPEAT) says it is ready, then writes and releases on a new connection each pass until killed, each release refused', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const child = trackChild(
      fork(hostileClient, ['write-release', sockpoold.socketPath, String(origin.port), '2'], {
        env: { ...process.env, HOSTILE_REPEAT: '1' },
        stdio: ['ignore', 'pipe', 'inherit', 'ipc'],
      }),
      'hostile-client write-release (repeat)',
    );
    cleanups.push(() => {
      child.kill('SIGKILL');
    });
    const [ready] = (await Promise.race([once(child, 'message'), once(child, 'exit').then(() => ['exited'])])) as [
      unknown,
    ];
    expect(ready).toBe('ready');
    const passes: unknown[] = [];
    for await (const line of createInterface({ input: child.stdout! })) {
      passes.push(JSON.parse(line));
      if (passes.length === 3) break;
    }
    expect(passes).toEqual(Array(3).fill({ 'SOCKPOOL_ERR_PROTOCOL:used': 2 }));
    // Still attacking: only a kill ends it.
    expect(child.exitCode).toBeNull();
  });

  it('pools a socket released unused, for the same uid, and hands it out warm', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const released = await raw.request({ type: 'release', id: 2, leaseId, withoutFd: true });
    native.close(lease.fds[0]!);
    expect(released.message).toMatchObject({ type: 'ok', id: 2 });
    // Its origin's row counts it idle, and kept (for this uid, beside the shared supply).
    const stats = await raw.request({ type: 'stats', id: 3 });
    const row = (stats.message as unknown as { stats: { origins: Array<{ idle: number; keptIdle: number }> } }).stats
      .origins[0]!;
    expect(row.keptIdle).toBe(1);
    expect(row.idle).toBeGreaterThanOrEqual(row.keptIdle);
    const again = await honestRequest(raw, origin.port, '/after-release');
    expect(again).toEqual({ body: '/after-release', warm: true });
  });

  it('closes a released socket the peer wrote to, and answers the release with reason "used"', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    const fd = lease.fds[0]!;
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    // A whole request and its answer, unread: sent and received bytes both changed.
    const copy = native.dup(fd);
    const socket = new Socket({ fd: copy, readable: false, writable: true });
    await new Promise<void>((resolve) => socket.write('GET /used HTTP/1.1\r\nHost: x\r\n\r\n', () => resolve()));
    socket.destroy();
    await eventually(() => native.probe(fd).state === 'data', 'the answer arrived');
    const released = await raw.request({ type: 'release', id: 2, leaseId, withoutFd: true });
    expect(released.message).toMatchObject({
      type: 'error',
      id: 2,
      code: 'SOCKPOOL_ERR_PROTOCOL',
      fields: { reason: 'used', leaseId },
    });
    // Our copy is dead: the daemon shut the connection down.
    await waitForEvents(fd, native.READABLE | native.DISCONNECT);
    expect((await stats(raw)).leased).toBe(0);
    native.close(fd);
  });

  it('ends a lease released with another socket’s fd (reason "foreign"): its connection is shut down, not pooled', async () => {
    // With fds let in (access.acceptClientFds): the fd that comes back must be a copy of the lease's own socket.
    // Anything else is closed as the client may have prepared it, and the lease's connection ends.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      access: { acceptClientFds: true },
      pool: { predictive: false, defaults: { minIdle: 0 } },
    });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    const fd = lease.fds[0]!;
    cleanups.push(() => native.close(fd));
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const [other, otherPeer] = native.seqpacketPair();
    const released = await raw.request({ type: 'release', id: nextId++, leaseId }, [other]);
    native.close(other);
    native.close(otherPeer);
    expect(released.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_PROTOCOL',
      fields: { reason: 'foreign', leaseId },
    });
    // The lease's own connection is dead for the copy the client kept, and nothing went back to the pool.
    await waitForEvents(fd, native.READABLE | native.DISCONNECT);
    expect(native.probe(fd).state).toBe('eof');
    expect(await stats(raw)).toMatchObject({ leased: 0, idle: 0 });
  });

  it('closes a released socket its client disconnected and connected elsewhere through its copy (reason "used")', async () => {
    // connect() with AF_UNSPEC resets a TCP connection and every TCP_INFO counter with it: connected again (to any
    // peer the daemon's network reaches), the socket is established with nothing sent or received, the same socket
    // (inode) as lent. Only its peer tells.
    // Without the connect guard, which refuses that connect where the daemon may set it up (as root: CI runs this
    // tier as root; test/daemon-connect-guard.system): this is the check that holds without it.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { connectGuard: false, pool: { defaults: { minIdle: 0 } } });
    const { stdout } = await runPython(join(repoRoot, 'test', 'fixtures', 'reconnect-client.py'), [
      sockpoold.socketPath,
      String(origin.port),
    ]);
    const seen = JSON.parse(stdout.trim()) as Record<string, number | string>;
    // Refused, and the next lease of the origin is a socket to the origin, not to the client's own peer.
    expect(seen).toMatchObject({ reconnected: 1, release: 'SOCKPOOL_ERR_PROTOCOL:used', next: origin.port });
  });

  it('shuts down a socket released unused when the copy its client kept writes on it while it sits idle', async () => {
    // Kept for its uid, the socket counts as idle, in no lease: its client could use the copy it kept as a working
    // connection that no lease quota counts, for as long as the socket sat idle (idleTtlMs), as long as nothing came
    // back on it (the idle watch sees input only): an upload, a request the origin is slow to answer.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { minIdle: 0, idleTtlMs: 600_000 } } });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const fd = lease.fds[0]!;
    cleanups.push(() => native.close(fd));
    const released = await raw.request({ type: 'release', id: nextId++, leaseId, withoutFd: true });
    expect(released.message).toMatchObject({ type: 'ok' });
    expect((await stats(raw)).idle).toBe(1);
    // A request the origin waits for the end of: nothing comes back, the socket is never readable.
    expect(native.sendMessage(fd, Buffer.from('GET /kept HTTP/1.1\r\nHost: x\r\n'), [])).toBeGreaterThan(0);
    await eventually(() => native.probe(fd).state !== 'alive', 'the copy kept across the release is dead');
    // The next lease is another socket: its request gets its own answer.
    expect((await honestRequest(raw, origin.port, '/after-kept')).body).toBe('/after-kept');
  });

  it('keeps the age of a socket released unused: lent and given back again and again, it still ends at idleTtlMs', async () => {
    // The origin has seen the connection idle since it was made (a pooled socket never carried a request), so a
    // release must not make it young again: lent and released over and over, it stayed in the pool for good, past
    // idleTtlMs (the hard cap on an idle socket's age) and past any learned lifetime, as old as the origin's keep-alive.
    const origin = await pathOrigin(cleanups);
    // No refill and no predictive warming: the only socket of the origin is the one cycled.
    const sockpoold = await daemon(origin.port, {
      pool: { predictive: false, defaults: { minIdle: 0, idleTtlMs: 1000 } },
    });
    const raw = client(sockpoold.socketPath);
    const cycle = async () => {
      const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
      const fd = lease.fds[0]!;
      const inode = native.socketInode(fd);
      const leaseId = (lease.message as { leaseId: number }).leaseId;
      const released = await raw.request({ type: 'release', id: nextId++, leaseId, withoutFd: true });
      native.close(fd);
      expect(released.message).toMatchObject({ type: 'ok' });
      return inode;
    };
    const first = await cycle();
    let cycles = 0;
    await eventually(
      async () => {
        await sleep(50);
        cycles++;
        return (await cycle()) !== first;
      },
      () => `the first socket still lent after ${cycles} cycles`,
      15_000,
    );
  });
});

describe('what the daemon learns', () => {
  it("a copy kept across a release cannot teach the origin's idle lifetime: ending it early is not the server's timeout", async () => {
    const origin = await pathOrigin(cleanups);
    // No predictive refills: the only idle socket is the one released.
    const sockpoold = await daemon(origin.port, { pool: { predictive: false } });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    const fd = lease.fds[0]!;
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const kept = native.dup(fd);
    const released = await raw.request({ type: 'release', id: nextId++, leaseId, withoutFd: true });
    native.close(fd);
    expect(released.message).toMatchObject({ type: 'ok' });
    expect((await stats(raw)).idle).toBe(1);
    // The kept copy ends the connection while the daemon holds it idle: its watch sees the end and drops it.
    native.shutdown(kept);
    await eventually(async () => (await stats(raw)).idle === 0, 'the idle socket dropped');
    const row = (
      (await raw.request({ type: 'stats', id: nextId++ })).message as unknown as {
        stats: { origins: Array<{ learnedIdleLifetimeMs: number | null }> };
      }
    ).stats.origins[0];
    // The origin keeps connections silent for 60 s; one the client ended after a few ms taught nothing (it used to
    // set 250 ms for every uid: each idle socket of the origin recycled after 200 ms, and so after a restart).
    expect(row?.learnedIdleLifetimeMs).toBeNull();
    native.close(kept);
  });
});

describe('refused origins', () => {
  it('acquires the policy refuses (by port, proxy name or address), for thousands of distinct origins, leave no pool behind', async () => {
    const origin = await pathOrigin(cleanups);
    // Names that resolve where the policy does not go: refused at their address, after the lookup.
    const names = Array.from({ length: 50 }, (_, i) => `refused${i}.test`);
    const sockpoold = await daemon(origin.port, {
      pool: { predictive: false },
      dns: { resolve: names.map((name) => `${name}:${origin.port}:127.0.0.2`) },
    });
    const raw = client(sockpoold.socketPath);
    for (const host of names) {
      const reply = await raw.request({ type: 'acquire', id: nextId++, host, port: origin.port });
      expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_POLICY' });
    }
    // Ports the policy refuses (only origin.port is allowed), and proxies the configuration lacks: each a distinct
    // origin. Each acquire is answered with its refusal; none may leave a pool (and its stats) for the sweep to find
    // minutes later, once its demand decayed (a client could grow the daemon's memory and sweep without bound).
    const refused = 2_000;
    for (let i = 0; i < refused; i++) {
      const message =
        i % 2 === 0
          ? { type: 'acquire', id: nextId++, host: '127.0.0.1', port: 20_000 + i }
          : { type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port, proxy: `nope${i}` };
      const reply = await raw.request(message);
      expect(reply.message).toMatchObject({
        type: 'error',
        code: i % 2 === 0 ? 'SOCKPOOL_ERR_POLICY' : 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      });
    }
    const view = (await raw.request({ type: 'stats', id: nextId++ })).message as unknown as {
      stats: { originCount: number };
    };
    expect(view.stats.originCount).toBe(0);
    // The allowed origin still works, and is the one pool.
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    expect(lease.message).toMatchObject({ type: 'lease' });
    native.close(lease.fds[0]!);
  });

  it("logs a uid's refusals up to REFUSALS_LOGGED per window: a client cannot flood the journal", async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const started = performance.now();
    const raw = client(sockpoold.socketPath);
    const refused = 2_000;
    for (let i = 0; i < refused; i++) {
      const reply = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: 20_000 + (i % 500) });
      expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_POLICY' });
    }
    const lines = () =>
      sockpoold
        .output()
        .split('\n')
        .filter((line) => line.includes('"msg":"refused"'));
    // The metrics count every refusal; the log keeps the first ones of each window.
    await eventually(() => lines().length >= REFUSALS_LOGGED, 'the first refusals logged');
    expect(lines().length).toBeLessThanOrEqual(REFUSALS_LOGGED * windowsSince(started));
    expect(lines()[0]).toContain(`"uid":${process.getuid!()}`);
  });

  it("logs the connect failures of a uid's acquires up to REFUSALS_LOGGED per window too", async () => {
    // A port nobody listens on: every connect is refused by the kernel at once. Distinct names, distinct pools.
    const closed = createServer().listen(0, '127.0.0.1');
    await once(closed, 'listening');
    const port = (closed.address() as AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    const names = Array.from({ length: 300 }, (_, i) => `dead${i}.test`);
    const sockpoold = await daemon(port, { dns: { resolve: names.map((name) => `${name}:${port}:127.0.0.1`) } });
    const started = performance.now();
    const raw = client(sockpoold.socketPath);
    for (const host of names) {
      const reply = await raw.request({ type: 'acquire', id: nextId++, host, port });
      expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_CONNECT' });
    }
    // This uid's lines: the daemon's own connects (a refill after a failure, uid -1 in the log) have a limit of
    // their own (a loaded run counted one of them with this uid's 50).
    const lines = () =>
      sockpoold
        .output()
        .split('\n')
        .filter((line) => line.includes('"msg":"connect failed"') && line.includes(`"uid":${process.getuid!()},`));
    await eventually(() => lines().length >= REFUSALS_LOGGED, 'the first failures logged');
    expect(lines().length).toBeLessThanOrEqual(REFUSALS_LOGGED * windowsSince(started));
  });
});
it.each([
  ['maxSessionsPerUid', { quotas: { maxSessionsPerUid: 1 } }, 'client refused by quota'],
  ['access control', { access: { allowUids: [process.getuid!() === 1 ? 2 : 1] } }, 'client refused by access control'],
])("logs a uid's refused connections (%s) up to REFUSALS_LOGGED per window too", async (_, config, what) => {
  // A connection the daemon refuses costs the client a connect; each was a warning of its own, at the client's
  // pace: any uid that reaches the socket (in its group, or past a quota) could fill the journal.
  const origin = await pathOrigin(cleanups);
  const sockpoold = await daemon(origin.port, config);
  const started = performance.now();
  // The one session maxSessionsPerUid leaves. (Access control refuses it too, and may hang up before a request of
  // it goes out: a clean-clone run's send met EPIPE; so it only sends where it is let in.)
  const first = client(sockpoold.socketPath);
  if ('quotas' in config) await first.request({ type: 'hello', id: nextId++, version: 1 });
  const refused = 500;
  for (let i = 0; i < refused; i++) {
    const raw = new RawClient(sockpoold.socketPath);
    try {
      const reply = await raw.receive();
      // A missing reply names the connection and what the daemon said of refusals it could not send.
      if (reply.message === null) {
        const unsent = JSON.stringify(logRecords(sockpoold, 'refusal not sent'));
        expect.fail(`connection ${i} read the end without its reply; refusals not sent: ${unsent}`);
      }
      expect(reply.message).toMatchObject({ type: 'error', id: null });
    } finally {
      raw.close();
    }
  }
  const lines = () =>
    sockpoold
      .output()
      .split('\n')
      .filter((line) => line.includes(`"msg":"${what}"`));
  await eventually(() => lines().length >= REFUSALS_LOGGED, 'the first refusals logged');
  expect(lines().length).toBeLessThanOrEqual(REFUSALS_LOGGED * windowsSince(started));
  expect(lines()[0]).toContain(`"uid":${process.getuid!()}`);
});

it('logs a refusal whose one reply did not go out, and serves the sessions it let in', async () => {
  // A refused client that shut its socket down before the daemon got to it reads nothing: the daemon says so in its
  // log (with the reply's code and the send's errno) instead of dropping it silently.
  const origin = await pathOrigin(cleanups);
  const sockpoold = await daemon(origin.port, { quotas: { maxSessionsPerUid: 1 } });
  const first = client(sockpoold.socketPath);
  await first.request({ type: 'hello', id: nextId++, version: 1 });
  const unsent = () => logRecords(sockpoold, 'refusal not sent');
  // The daemon may accept one between our connect and our shutdown, and then its reply goes out: try again.
  for (let attempt = 0; attempt < 50 && unsent().length === 0; attempt++) {
    const raw = new RawClient(sockpoold.socketPath);
    native.shutdown(raw.fd);
    raw.close();
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  await eventually(() => unsent().length > 0, 'a refusal not sent logged');
  expect(unsent()[0]).toMatchObject({ uid: process.getuid!(), code: 'SOCKPOOL_ERR_QUOTA', err: 'EPIPE' });
  const reply = await first.request({ type: 'stats', id: nextId++ });
  expect(reply.message).toMatchObject({ type: 'stats' });
});

describe('lease ends are enforced', () => {
  it('shuts a connection down on `closed`: a copy the client kept is dead', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const seen = await runHostile(['closed-keep', sockpoold.socketPath, origin.port, 20]);
    expect(seen).toEqual({ 'probe:eof': 20, 'write:EPIPE': 20 });
    expect(origin.seen.size).toBe(0);
  });

  it('shuts every lease of a client that disconnects', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const raw = new RawClient(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    const fd = lease.fds[0]!;
    raw.close();
    await waitForEvents(fd, native.READABLE | native.DISCONNECT);
    expect(native.probe(fd).state).toBe('eof');
    native.close(fd);
  });

  it('ends a lease at quotas.maxLeaseMs and frees its slot for the next acquire', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxLeaseMs: 300 },
      pool: { defaults: { maxPerOrigin: 1 } },
    });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    const fd = lease.fds[0]!;
    // The only slot is held; the next acquire waits for it and gets it once the daemon ends the first lease.
    const next = raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    await waitForEvents(fd, native.READABLE | native.DISCONNECT);
    expect(native.probe(fd).state).toBe('eof');
    native.close(fd);
    const second = await next;
    expect(second.message).toMatchObject({ type: 'lease', id: 2 });
    for (const other of second.fds) native.close(other);
  });
});

describe('per-uid quotas', () => {
  it('refuses connections past maxSessionsPerUid with SOCKPOOL_ERR_QUOTA, and takes new ones once some close', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { quotas: { maxSessionsPerUid: 3 } });
    const child = trackChild(
      execFile(process.execPath, [hostileClient, 'sessions', sockpoold.socketPath, '5']),
      'hostile-client sessions',
    );
    cleanups.push(() => child.kill('SIGKILL'));
    const [line] = (await once(child.stdout!, 'data')) as [Buffer];
    expect(JSON.parse(line.toString())).toEqual({ hello: 3, SOCKPOOL_ERR_QUOTA: 2 });
    // The log comes through a pipe that may lag the refusal the client read.
    await eventually(() => sockpoold.output().includes('client refused by quota'), 'the refusal logged');
    child.kill('SIGKILL');
    await once(child, 'exit');
    await eventually(async () => {
      const raw = client(sockpoold.socketPath);
      return (await raw.request({ type: 'hello', id: 1, version: 1 })).message?.type === 'hello';
    }, 'a new connection accepted once the flood is gone');
  });

  it('a hostile mix of lease messages leaves every count at zero and no fd behind', async () => {
    const origin = await pathOrigin(cleanups);
    // With fds let in (access.acceptClientFds: older kernels, older clients): a forged and a foreign fd among them.
    const sockpoold = await daemon(origin.port, {
      access: { acceptClientFds: true },
      quotas: { maxPendingPerUid: 3, maxLeasesPerUid: 3 },
      pool: { predictive: false, defaults: { minIdle: 0, maxIdle: 2, maxPerOrigin: 2 } },
    });
    const watcher = client(sockpoold.socketPath);
    await stats(watcher);
    const baseline = sockpoold.fdCount();
    const acquire = (raw: RawClient, id: number) =>
      raw.request({ type: 'acquire', id, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    const leaseOf = (reply: Awaited<ReturnType<RawClient['request']>>) => {
      expect(reply.message).toMatchObject({ type: 'lease' });
      return { leaseId: (reply.message as { leaseId: number }).leaseId, fd: reply.fds[0]! };
    };
    // A holds both slots and queues a third acquire; then, read in one batch: L1 released unused, the waiting
    // acquire cancelled, L2 released with L1's fd (foreign), an unknown lease closed, a second acquire under a
    // pending id, and the hang-up.
    const a = new RawClient(sockpoold.socketPath);
    const l1 = leaseOf(await acquire(a, 1));
    const l2 = leaseOf(await acquire(a, 2));
    a.sendJson({ type: 'acquire', id: 3, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    await eventually(async () => (await stats(watcher)).waiting === 1, 'the third acquire waits');
    // Another client (same uid) forges A's lease ids: refused, A's leases untouched.
    const b = client(sockpoold.socketPath);
    const forgedClose = await b.request({ type: 'closed', id: 50, leaseId: l1.leaseId });
    expect(forgedClose.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
    const [pipeRead, pipeWrite] = native.seqpacketPair();
    const forgedRelease = await b.request({ type: 'release', id: 51, leaseId: l2.leaseId }, [pipeRead]);
    native.close(pipeRead);
    native.close(pipeWrite);
    expect(forgedRelease.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
    expect(native.probe(l1.fd).state).toBe('alive');
    expect(native.probe(l2.fd).state).toBe('alive');
    // An fd on a message that takes none.
    const [extraRead, extraWrite] = native.seqpacketPair();
    const withFd = await b.request({ type: 'stats', id: 52 }, [extraRead]);
    native.close(extraRead);
    native.close(extraWrite);
    expect(withFd.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
    sockpoold.child.kill('SIGSTOP');
    try {
      a.sendJson({ type: 'release', leaseId: l1.leaseId }, [l1.fd]);
      a.sendJson({ type: 'cancel', acquireId: 3 });
      a.sendJson({ type: 'release', leaseId: l2.leaseId }, [l1.fd]);
      a.sendJson({ type: 'closed', leaseId: 999_999 });
      a.sendJson({ type: 'acquire', id: 4, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
      a.sendJson({ type: 'acquire', id: 4, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
      a.close();
    } finally {
      sockpoold.child.kill('SIGCONT');
    }
    native.close(l1.fd);
    native.close(l2.fd);
    await eventually(async () => {
      const now = await stats(watcher);
      return now.leased === 0 && now.leases === 0 && now.waiting === 0;
    }, "A's leases and acquires ended");
    // B takes a lease and hangs up holding it; C's acquire is cancelled before any answer.
    leaseOf(await acquire(b, 53));
    b.close();
    const c = new RawClient(sockpoold.socketPath);
    c.sendJson({ type: 'acquire', id: 60, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    c.sendJson({ type: 'cancel', acquireId: 60 });
    c.close();
    await eventually(async () => {
      const now = await stats(watcher);
      return now.leased === 0 && now.leases === 0;
    }, 'every lease ended');
    // The uid's counts are back to zero: a new client holds as many leases as the quota allows.
    const d = client(sockpoold.socketPath);
    const held = [leaseOf(await acquire(d, 70)), leaseOf(await acquire(d, 71))];
    // The third waits for a slot (maxPerOrigin 2): its uid has room for exactly one more lease, no less (a count
    // left behind would refuse it), no more (a fourth is refused).
    d.sendJson({ type: 'acquire', id: 72, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    const fourth = await acquire(d, 73);
    expect(fourth.message).toMatchObject({ code: 'SOCKPOOL_ERR_QUOTA', fields: { quota: 'maxLeasesPerUid' } });
    expect((await stats(watcher)).waiting).toBe(1);
    d.sendJson({ type: 'cancel', acquireId: 72 });
    for (const lease of held) {
      d.sendJson({ type: 'closed', leaseId: lease.leaseId });
      native.close(lease.fd);
    }
    await eventually(async () => (await stats(watcher)).leased === 0, 'the leases ended');
    // No fd behind: the daemon holds its idle sockets and the two open sessions more than at the start.
    await eventually(
      async () => sockpoold.fdCount() === baseline + (await stats(watcher)).idle + 1,
      'no fd left behind',
    );
  });

  it('bounds pending acquires and leases per uid across connections', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxPendingPerUid: 2, maxLeasesPerUid: 3 },
      pool: { defaults: { maxPerOrigin: 1 } },
    });
    const first = client(sockpoold.socketPath);
    const held = await first.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    expect(held.message).toMatchObject({ type: 'lease' });
    // Two more connections of the same uid each queue one acquire behind the held slot...
    const second = client(sockpoold.socketPath);
    const third = client(sockpoold.socketPath);
    const queued = [
      second.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 }),
      third.request({ type: 'acquire', id: 3, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 }),
    ];
    await eventually(async () => (await stats(first)).leased === 1, 'one lease held');
    // ...and a fourth connection is over the uid's pending quota.
    const fourth = client(sockpoold.socketPath);
    const refused = await fourth.request({ type: 'acquire', id: 4, host: '127.0.0.1', port: origin.port });
    expect(refused.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_QUOTA',
      fields: { quota: 'maxPendingPerUid', limit: 2 },
    });
    expect((refused.message as { message: string }).message).toContain('quotas.maxPendingPerUid = 2');
    first.sendJson({ type: 'closed', leaseId: (held.message as { leaseId: number }).leaseId });
    for (const fd of held.fds) native.close(fd);
    const granted = await queued[0]!;
    expect(granted.message).toMatchObject({ type: 'lease' });
    for (const fd of granted.fds) native.close(fd);
  });

  it('caps prewarm demand per uid: cut to what is left, then SOCKPOOL_ERR_QUOTA', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxPrewarmPerUid: 3 },
      pool: { defaults: { maxIdle: 16 } },
    });
    const seen = await runHostile(['prewarm', sockpoold.socketPath, origin.port, 5]);
    expect(seen.ok).toBeGreaterThanOrEqual(1);
    expect(seen.SOCKPOOL_ERR_QUOTA).toBeGreaterThanOrEqual(1);
    expect((seen.ok ?? 0) + (seen.SOCKPOOL_ERR_QUOTA ?? 0)).toBe(5);
    const raw = client(sockpoold.socketPath);
    // The demand announced was cut to 3 sockets in all.
    await eventually(async () => (await stats(raw)).idle >= 1, 'prewarmed sockets idle');
    expect((await stats(raw)).idle).toBeLessThanOrEqual(3);
    // What was granted counts as demand (0.1/s per socket over the 10 s window), and no more: 5 × 1000 asked
    // would be 500/s. (A token or two may refill while the rounds run; decay takes some off.)
    const reply = await raw.request({ type: 'stats', id: nextId++ });
    const [row] = (reply.message as unknown as { stats: { origins: Array<{ demandRatePerS: number }> } }).stats.origins;
    expect(row?.demandRatePerS).toBeGreaterThan(0.1);
    expect(row?.demandRatePerS).toBeLessThanOrEqual(0.5);
  });

  it('refuses a bad prewarm with its own typed error without spending the uid’s allowance on it', async () => {
    // A client's queue announces whatever its waiting requests name: a host the policy denies, a port it does not
    // allow, a proxy the configuration lacks, a host that is none. Each is refused with its own error, and none of
    // them may use up the allowance the uid's good announcements need (they warm nothing).
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxPrewarmPerUid: 4 },
      egress: { denyHosts: ['denied.test'] },
      pool: { defaults: { maxIdle: 16 } },
    });
    const raw = client(sockpoold.socketPath);
    const bad: Array<[object, string]> = [
      [{ host: 'denied.test', port: origin.port }, 'SOCKPOOL_ERR_POLICY'],
      [{ host: '127.0.0.1', port: 9 }, 'SOCKPOOL_ERR_POLICY'],
      [{ host: '127.0.0.1', port: origin.port, proxy: 'nowhere' }, 'SOCKPOOL_ERR_INVALID_ARGUMENT'],
      [{ host: 'fe80::1%eth0', port: origin.port }, 'SOCKPOOL_ERR_INVALID_ARGUMENT'],
    ];
    for (let round = 0; round < 3; round++) {
      for (const [target, code] of bad) {
        const reply = await raw.request({ type: 'prewarm', id: nextId++, ...target, count: 4 });
        expect(reply.message).toMatchObject({ type: 'error', code });
      }
    }
    // The whole allowance is still there for a good one.
    const good = await raw.request({ type: 'prewarm', id: nextId++, host: '127.0.0.1', port: origin.port, count: 4 });
    expect(good.message).toMatchObject({ type: 'ok' });
    await eventually(async () => (await stats(raw)).idle === 4, 'the four sockets asked for');
  });
});

describe('the stats reply', () => {
  it('fits in one message whatever the origins are called: long host names leave rows out, not the reply', async () => {
    // 60 origins named with long host names (the schema allows 253 characters): their 50 rows made a reply of
    // about 20 KB, over the 16 KiB a message may hold, and every `stats` (the operator's `sockpool stats` too, where
    // another uid named them) was answered "reply too large to send".
    const origin = await pathOrigin(cleanups);
    const label = (letter: string) => letter.repeat(60);
    const names = Array.from({ length: 60 }, (_, i) => `${label('a')}.${label('b')}.${label('c')}.n${i}.test`);
    const sockpoold = await daemon(origin.port, {
      dns: { resolve: names.map((name) => `${name}:${origin.port}:127.0.0.1`) },
    });
    const raw = client(sockpoold.socketPath);
    for (const host of names) {
      const reply = await raw.request({ type: 'acquire', id: nextId++, host, port: origin.port });
      expect(reply.message).toMatchObject({ type: 'lease' });
    }
    const reply = await raw.request({ type: 'stats', id: nextId++ });
    expect(reply.message).toMatchObject({ type: 'stats' });
    const view = (
      reply.message as unknown as { stats: { origins: unknown[]; originCount: number; originsOmitted: number } }
    ).stats;
    expect(view.originCount).toBe(names.length);
    expect(view.origins.length).toBeGreaterThan(0);
    expect(view.origins.length + view.originsOmitted).toBe(names.length);
  });
});

describe('bad input', () => {
  it('answers a message whose error would name thousands of its unknown keys with that error cut short, not with an unsendable reply and an error in the log', async () => {
    // The schema's error names every unknown key, quoted: a message of 16 KiB of them made an error of over 16 KiB,
    // which could not be sent. The client got "reply too large to send" and the daemon logged an error line ("reply
    // could not be encoded") for each, at any uid's pace: its log was the client's to fill.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { access: { maxBadMessages: 3 } });
    const junk: Record<string, unknown> = { type: 'stats', id: 1 };
    for (let i = 0; JSON.stringify(junk).length < MAX_MESSAGE_BYTES - 16; i++) junk[`k${i}`] = 0;
    const replies: Array<{ code?: string; message?: string }> = [];
    for (let session = 0; session < 5; session++) {
      const raw = client(sockpoold.socketPath);
      for (let i = 0; i < 4; i++) {
        const reply = await raw.request({ ...junk, id: i + 1 });
        expect(reply.eof).toBe(false);
        replies.push(reply.message as { code?: string; message?: string });
      }
      expect((await raw.receive()).eof).toBe(true); // past maxBadMessages: disconnected
    }
    for (const reply of replies) {
      expect(reply).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });
      expect(reply.message).toMatch(/^invalid message: Unrecognized keys: "k0", "k1"/);
    }
    const raw = client(sockpoold.socketPath);
    expect((await honestRequest(raw, origin.port, '/after-junk')).body).toBe('/after-junk');
    expect(sockpoold.output()).not.toContain('reply could not be encoded');
  });

  it('answers an empty message as bad input, not as the client hanging up: its session and leases stay', async () => {
    // On SOCK_SEQPACKET a read of 0 bytes is either an empty packet or the end: only the peer's shutdown tells.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { access: { maxBadMessages: 3 } });
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    expect(lease.message).toMatchObject({ type: 'lease' });
    raw.sendBytes(Buffer.alloc(0));
    const reply = await raw.receive();
    expect(reply.eof).toBe(false);
    expect(reply.message).toMatchObject({ type: 'error', id: null, code: 'SOCKPOOL_ERR_PROTOCOL' });
    // The lease is still this session's: released unused, it is answered.
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const released = await raw.request({ type: 'release', id: nextId++, leaseId, withoutFd: true });
    native.close(lease.fds[0]!);
    expect(released.message).toMatchObject({ type: 'ok' });
    // Empty messages count as bad ones: past maxBadMessages (3; the first empty one counted) the sender is
    // disconnected after its reply, as for any garbage.
    for (let i = 0; i < 3; i++) raw.sendBytes(Buffer.alloc(0));
    const seen: boolean[] = [];
    for (let i = 0; i < 4; i++) seen.push((await raw.receive()).eof);
    expect(seen).toEqual([false, false, false, true]);
    expect(sockpoold.output()).not.toContain('client hung up');
  });
});

describe('bad input with fds', () => {
  it('refuses every fd a client sends at the kernel: each send fails with EPERM and nothing reaches the daemon', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { access: { maxBadMessages: 5 } });
    // This host's kernel has SO_PASSRIGHTS (Linux 6.16); an older one lets fds in (the next test's path).
    expect(((await stats(client(sockpoold.socketPath))) as unknown as { clientFds: string }).clientFds).toBe('refused');
    const before = sockpoold.fdCount();
    const seen = await runHostile(['garbage', sockpoold.socketPath, 20]);
    expect(seen).toEqual({ EPERM: 20, leftOpen: 0 });
    // A release with its fd is refused the same way; without it (what the project's clients send) it is taken.
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    expect(() => raw.sendJson({ type: 'release', id: nextId++, leaseId }, lease.fds)).toThrow(
      expect.objectContaining({ code: 'EPERM' }),
    );
    const released = await raw.request({ type: 'release', id: nextId++, leaseId, withoutFd: true });
    native.close(lease.fds[0]!);
    expect(released.message).toMatchObject({ type: 'ok' });
    expect((await honestRequest(raw, origin.port, '/after-garbage')).body).toBe('/after-garbage');
    // No fd behind: the daemon holds its idle sockets and one more session than at the start.
    await eventually(
      async () => sockpoold.fdCount() === before + 1 + (await stats(raw)).idle,
      'no fd of the garbage held',
    );
  });

  it('let in (access.acceptClientFds): closes every fd that came with a garbage message, and disconnects the sender past maxBadMessages', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { access: { maxBadMessages: 5, acceptClientFds: true } });
    const before = sockpoold.fdCount();
    const seen = await runHostile(['garbage', sockpoold.socketPath, 20]);
    expect(seen.leftOpen).toBe(0);
    expect(seen.eof).toBe(1);
    expect(seen['error:SOCKPOOL_ERR_PROTOCOL']).toBe(6);
    await eventually(() => sockpoold.fdCount() <= before, 'the daemon holds no fd of the garbage');
    const raw = client(sockpoold.socketPath);
    expect((await honestRequest(raw, origin.port, '/after-garbage')).body).toBe('/after-garbage');
  });
});

describe('accept when out of fds', () => {
  it('stops polling its listener on EMFILE, retries with a growing wait, and serves the waiting clients once fds free up', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await startDaemon({ args: ['--allow', '127.0.0.1/32', '--allow-port', String(origin.port)] });
    cleanups.push(() => sockpoold.stop());
    const observer = client(sockpoold.socketPath);
    expect((await observer.request({ type: 'hello', id: 0, version: 1 })).message).toMatchObject({ type: 'hello' });
    // The daemon's fd table full before the fair share of its fd budget binds (which keeps a uid's own connections
    // from filling it: quotas.ts): its RLIMIT_NOFILE lowered while it runs to room for a few fds more than it holds.
    // The daemon follows the new limit (FD_LIMIT_RECHECK_MS), but a lone uid's share of it, about a quarter of the
    // table, is more than those few.
    await promisify(execFile)('prlimit', ['--pid', String(sockpoold.child.pid), `--nofile=${sockpoold.fdCount() + 8}`]);
    // More clients than the daemon has fds: the first ones are accepted, the rest wait in the backlog.
    const clients: RawClient[] = [];
    for (let i = 0; i < 64; i++) clients.push(client(sockpoold.socketPath));
    for (const [index, raw] of clients.entries()) raw.sendJson({ type: 'hello', id: index, version: 1 });
    await eventually(() => sockpoold.output().includes('accept failed: accepting paused'), 'accepting paused');
    // The wait grows while fds stay short (a later pause waits longer than the first).
    await eventually(
      () => /"retryInMs":(?:[2-9]\d|\d{3,})\b/.test(sockpoold.output()),
      'a longer wait after repeated failures',
    );
    // Out of fds, the daemon still answers its connected clients (a stats reply needs an fd: it fails alone).
    const reply = await observer.request({ type: 'stats', id: 1 });
    expect(reply.message).toMatchObject({ id: 1 });
    // Clients are accepted in the order they connected: each one is answered once enough of those before it have
    // left and freed their fds, however many that takes.
    for (const [index, raw] of clients.entries()) {
      const hello = await raw.receive();
      expect(hello.message).toMatchObject({ type: 'hello', id: index });
      raw.close();
    }
  });
});

describe('accept floods', () => {
  it('accepts at most ACCEPTS_PER_WAKEUP connections per wakeup: a connect flood does not hold up a request already queued', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { quotas: { maxSessionsPerUid: 1000 } });
    const observer = client(sockpoold.socketPath);
    expect((await observer.request({ type: 'hello', id: 0, version: 1 })).message).toMatchObject({ type: 'hello' });
    // The daemon stopped, 300 connections queue in its backlog, then the observer's request: the daemon finds them
    // all waiting at once when it goes on, the listener first (ready first). Counted, not timed.
    const pid = sockpoold.child.pid!;
    process.kill(pid, 'SIGSTOP');
    cleanups.push(() => process.kill(pid, 'SIGCONT'));
    await eventually(() => /^\d+ \(.*\) T/.test(readFileSync(`/proc/${pid}/stat`, 'utf8')), 'daemon stopped');
    const flood: number[] = [];
    cleanups.push(() => {
      for (const fd of flood) native.close(fd);
    });
    for (let i = 0; i < 300; i++) flood.push(native.seqpacketConnect(sockpoold.socketPath));
    observer.sendJson({ type: 'stats', id: 1 });
    process.kill(pid, 'SIGCONT');
    const reply = await observer.receive();
    const clients = (reply.message as unknown as { stats: { clients: number } }).stats.clients;
    // Before: every queued connection was accepted first (301 clients when the stats were taken).
    expect(clients).toBeLessThanOrEqual(1 + ACCEPTS_PER_WAKEUP);
    // And the rest in the next wakeups: every one of them a client.
    await eventually(
      async () => ((await stats(observer)) as unknown as { clients: number }).clients === 301,
      'every queued connection accepted',
    );
  });
});

/** The log windows (REFUSAL_LOG_WINDOW_MS) a flood begun at `started` may have reached: a loaded machine can take
 *  longer than one (a clean-clone run logged 52 lines for 50 a window), and each new window logs its own first lines. */
function windowsSince(started: number): number {
  return Math.floor((performance.now() - started) / REFUSAL_LOG_WINDOW_MS) + 1;
}
