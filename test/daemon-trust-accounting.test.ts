// The daemon's own accounting of what a client holds and causes, against a real daemon and raw protocol clients:
// a lease whose send failed (the client hung up right after its acquire) is not charged to its uid for good; a
// socket a client released while keeping a copy is shut down when the pool drops it, so the copy dies with the
// daemon's count (maxPerOrigin holds); a second pending acquire under one request id is refused, so a disconnect
// cancels everything its client had waiting; and an acquire for a host name that gives up keeps its uid's lookup
// charged while the DNS query it started runs (maxLookupsPerUid bounds lookups in flight, not acquires); waits
// for rate tokens end with their client's session; replies a client does not read are bounded in bytes.

import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, readlinkSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Socket } from 'node:net';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import { readSoftFdLimit } from '../daemon/quotas.js';
import * as native from '../shared/native.js';
import { type DaemonProcess, eventually, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { openRawClient, RawClient } from './helpers/raw-client.js';
import { pathOrigin } from './helpers/trust.js';

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

let nextId = 1;
async function stats(raw: RawClient): Promise<Record<string, number>> {
  const reply = await raw.request({ type: 'stats', id: nextId++ });
  return (reply.message as unknown as { stats: Record<string, number> }).stats;
}

/** An HTTP origin that counts the TCP connections open at it now, and those it accepted. */
async function countingOrigin(): Promise<{ port: number; open: () => number; accepted: () => number }> {
  let open = 0;
  let accepted = 0;
  const server = http.createServer((request, response) => response.end(request.url));
  server.keepAliveTimeout = 60_000;
  server.on('connection', (socket) => {
    open++;
    accepted++;
    socket.on('close', () => open--);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  cleanups.push(() => {
    server.closeAllConnections();
    server.close();
  });
  return { port: (server.address() as AddressInfo).port, open: () => open, accepted: () => accepted };
}

async function get(fd: number, path: string): Promise<string> {
  const socket = new Socket({ fd: native.dup(fd), readable: true, writable: true });
  socket.on('error', () => {});
  let text = '';
  socket.setEncoding('latin1');
  socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
  return await new Promise<string>((resolve, reject) => {
    socket.on('data', (chunk) => {
      text += chunk;
      if (text.endsWith(path)) {
        socket.destroy();
        resolve(path);
      }
    });
    socket.on('close', () => reject(new Error(`closed with ${JSON.stringify(text)}`)));
  });
}

describe('per-uid lease quota', () => {
  it('does not count a lease whose send failed (the client hung up right after its acquire) against the uid forever', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxLeasesPerUid: 1 },
      pool: { defaults: { minIdle: 1, maxIdle: 2 } },
    });
    const observer = openRawClient(sockpoold.socketPath, cleanups);
    // The origin's pool exists once it was named (minIdle then keeps one socket warm).
    const first = await observer.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    expect(first.message).toMatchObject({ type: 'lease' });
    await observer.request({ type: 'closed', id: 2, leaseId: (first.message as { leaseId: number }).leaseId });
    for (const fd of first.fds) native.close(fd);
    for (let round = 0; round < 5; round++) {
      let last: unknown;
      await eventually(
        async () => {
          last = await stats(observer);
          return (last as { idle: number }).idle >= 1;
        },
        () => `a warm socket idle (round ${round}): ${JSON.stringify(last)}`,
      );
      // A client that asks for a warm socket and hangs up at once: the daemon's lease send fails (EPIPE).
      const hostile = new RawClient(sockpoold.socketPath);
      hostile.sendJson({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
      hostile.close();
      await eventually(async () => (await stats(observer)).clients === 1, 'the hostile client gone');
      await eventually(async () => (await stats(observer)).leases === 0, 'no lease left');
    }
    // No lease is held by anyone: the uid's one lease is free.
    const honest = openRawClient(sockpoold.socketPath, cleanups);
    const lease = await honest.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: origin.port });
    for (const fd of lease.fds) native.close(fd);
    expect(lease.message).toEqual(expect.objectContaining({ type: 'lease' }));
  });
});

describe('sockets a client released while keeping a copy', () => {
  it('are shut down when the daemon drops them: a kept copy does not outlive the daemon’s count (maxPerOrigin 1)', async () => {
    const origin = await countingOrigin();
    const sockpoold = await daemon(origin.port, { pool: { defaults: { maxPerOrigin: 1, maxIdle: 0 } } });
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const kept: number[] = [];
    cleanups.push(() => {
      for (const fd of kept) native.close(fd);
    });
    for (let round = 0; round < 3; round++) {
      const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
      expect(lease.message).toMatchObject({ type: 'lease' });
      const fd = lease.fds[0]!;
      kept.push(fd);
      // Released unused, without its fd (the client keeps its own copy open).
      const leaseId = (lease.message as { leaseId: number }).leaseId;
      const released = await raw.request({ type: 'release', id: nextId++, leaseId, withoutFd: true });
      expect(released.message).toMatchObject({ type: 'ok' });
    }
    // The daemon counts nothing at the origin: the copies the client kept are dead (they were live connections,
    // three with maxPerOrigin 1, before the daemon shut the dropped sockets down).
    expect(await stats(raw)).toMatchObject({ leased: 0, idle: 0 });
    const states = kept.map((fd) => native.probe(fd).state);
    const answers = await Promise.allSettled(kept.map((fd, index) => get(fd, `/kept-${index}`)));
    expect({ states, served: answers.filter((a) => a.status === 'fulfilled').length }).toEqual({
      states: ['eof', 'eof', 'eof'],
      served: 0,
    });
    // (The origin's side closes when its 'close' events come.)
    await eventually(
      () => origin.open() === 0,
      () => `the origin's connections closed (${origin.open()} open)`,
    );
  });
});

describe('sockets kept for one uid (released unused)', () => {
  it("are bounded per uid across origins (maxKeptPerUid): the uid's oldest are closed, its newest lent again warm, another origin's shared socket kept", async () => {
    // One uid acquiring and releasing unused across many origins made the daemon keep every such socket for it (up
    // to pool.maxIdleTotal, 10,000: daemon fds and connections at the origins), pushing shared ones out of that budget.
    const origins = await Promise.all([1, 2, 3, 4, 5].map(() => countingOrigin()));
    const shared = await countingOrigin();
    const ports = [...origins, shared].map((origin) => origin.port);
    const args = ['--allow', '127.0.0.1/32', ...ports.flatMap((port) => ['--allow-port', String(port)])];
    // (No predicted idle target: the origins acquired twice would get a shared socket refilled at a sweep.)
    const config = { quotas: { maxKeptPerUid: 3 }, pool: { predictive: false, defaults: { maxIdle: 4 } } };
    const sockpoold = await startDaemon({ args: [...args, '--config', writeConfigFile(config, cleanups)] });
    cleanups.push(() => sockpoold.stop());
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    await stats(raw); // (the daemon accepted the client: its end of the connection is counted in `before`)
    const before = sockpoold.fdCount();
    const prewarm = await raw.request({
      type: 'prewarm',
      id: nextId++,
      host: '127.0.0.1',
      port: shared.port,
      count: 1,
    });
    expect(prewarm.message).toMatchObject({ type: 'ok' });
    await eventually(async () => (await stats(raw)).idle === 1, 'the shared socket warm');
    const acquire = async (port: number) => {
      const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port });
      expect(lease.message).toMatchObject({ type: 'lease' });
      return { ...(lease.message as unknown as { leaseId: number; warm: boolean }), fd: lease.fds[0]! };
    };
    for (const origin of origins) {
      const lease = await acquire(origin.port);
      // Released unused: the daemon keeps its own copy for this uid alone.
      native.close(lease.fd);
      const released = await raw.request({ type: 'release', id: nextId++, leaseId: lease.leaseId, withoutFd: true });
      expect(released.message).toMatchObject({ type: 'ok' });
      expect((await stats(raw)).keptIdle).toBeLessThanOrEqual(3);
    }
    expect(await stats(raw)).toMatchObject({ keptIdle: 3, idle: 4, leased: 0 });
    // The daemon holds the bound's sockets and the shared one, not one for every release.
    expect(sockpoold.fdCount()).toBeLessThanOrEqual(before + 4);
    // The two oldest were closed: their origins saw the connections end; the newest three are open.
    await eventually(
      () => origins[0]!.open() === 0 && origins[1]!.open() === 0,
      () => `the oldest closed at their origins (${origins.map((origin) => origin.open())})`,
    );
    expect(origins.map((origin) => origin.open())).toEqual([0, 0, 1, 1, 1]);
    // The newest three are lent again to the same uid, warm: no new connection at their origins.
    const again = [];
    for (const origin of origins.slice(2)) again.push(await acquire(origin.port));
    expect(again.map((lease) => lease.warm)).toEqual([true, true, true]);
    expect(origins.map((origin) => origin.accepted())).toEqual([1, 1, 1, 1, 1]);
    expect((await stats(raw)).keptIdle).toBe(0);
    // The other origin's shared socket was never pushed out: it is lent warm too.
    const sharedLease = await acquire(shared.port);
    expect({ warm: sharedLease.warm, accepted: shared.accepted() }).toEqual({ warm: true, accepted: 1 });
    for (const lease of [...again, sharedLease]) {
      native.close(lease.fd);
      await raw.request({ type: 'closed', id: nextId++, leaseId: lease.leaseId });
    }
    await eventually(async () => (await stats(raw)).leased === 0, 'the leases ended');
    expect(sockpoold.fdCount()).toBeLessThanOrEqual(before);
  });
});

describe('pending acquires of a client that disconnects', () => {
  it('refuses a second acquire under a pending id, so that the disconnect cancels everything its client had waiting', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { maxPerOrigin: 1 } } });
    const holder = openRawClient(sockpoold.socketPath, cleanups);
    const held = await holder.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    expect(held.message).toMatchObject({ type: 'lease' });
    cleanups.push(() => {
      for (const fd of held.fds) native.close(fd);
    });
    // An acquire waits behind the held slot; a second one under its id is refused at once, and does not wait.
    const waiting = new RawClient(sockpoold.socketPath);
    const acquire = { type: 'acquire', id: 7, host: '127.0.0.1', port: origin.port, timeoutMs: 600_000 };
    waiting.sendJson(acquire);
    await eventually(async () => (await stats(holder)).waiting === 1, 'one acquire waiting');
    const duplicate = await waiting.request(acquire);
    expect(duplicate.message).toMatchObject({
      type: 'error',
      id: 7,
      code: 'SOCKPOOL_ERR_PROTOCOL',
      message: 'acquire 7 is already pending',
    });
    expect((await stats(holder)).waiting).toBe(1);
    // The first one's id is free again once it settled: a new acquire under it is taken.
    waiting.close();
    await eventually(async () => (await stats(holder)).clients === 1, 'the waiting client gone');
    // Nothing waits for a gone client.
    await eventually(async () => (await stats(holder)).waiting === 0, 'no acquire waiting');
  });
});

describe('maxLookupsPerUid', () => {
  it('bounds the DNS lookups one uid can cause, also when its acquires give up before the lookup ends', async () => {
    const { startDnsServer } = await import('./helpers/dns-server.js');
    const names = Array.from({ length: 12 }, (_, i) => `n${i}.test`);
    const dns = await startDnsServer(
      Object.fromEntries(names.map((name) => [name, { a: ['127.0.0.1'], delayMs: 3_000 }])),
    );
    cleanups.push(() => dns.close());
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxLookupsPerUid: 2 },
      dns: { servers: [dns.server] },
    });
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const seen: string[] = [];
    for (const host of names) {
      const reply = await raw.request({ type: 'acquire', id: nextId++, host, port: origin.port, timeoutMs: 1 });
      seen.push((reply.message as { code?: string }).code ?? reply.message!.type);
    }
    await eventually(() => dns.queries.length > 0, 'lookups started');
    await new Promise((resolve) => setTimeout(resolve, 300));
    const lookedUp = new Set(dns.queries.map((query) => query.name)).size;
    // At most maxLookupsPerUid names being looked up for this uid at once (all answers take 3 s).
    expect({ seen: seen[0], lookedUp }).toEqual({ seen: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT', lookedUp: 2 });
  });
});

describe('a reload that leaves the dns section as it was', () => {
  it('keeps the DNS cache (and the lookups under way): the next connect asks no DNS server again', async () => {
    const { startDnsServer } = await import('./helpers/dns-server.js');
    const dns = await startDnsServer({ 'kept.test': { a: ['127.0.0.1'], ttl: 300 } });
    cleanups.push(() => dns.close());
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { dns: { servers: [dns.server] }, pool: { predictive: false } });
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const first = await raw.request({ type: 'acquire', id: nextId++, host: 'kept.test', port: origin.port });
    expect(first.message).toMatchObject({ type: 'lease' });
    const asked = dns.count('kept.test', 'A');
    expect(asked).toBeGreaterThan(0);
    sockpoold.child.kill('SIGHUP');
    await eventually(() => sockpoold.output().includes('configuration reloaded'), 'reloaded');
    // The first lease is still held: this acquire needs a connect of its own, so a lookup unless cached.
    const second = await raw.request({ type: 'acquire', id: nextId++, host: 'kept.test', port: origin.port });
    expect(second.message).toMatchObject({ type: 'lease' });
    for (const fd of [...first.fds, ...second.fds]) native.close(fd);
    expect(dns.count('kept.test', 'A')).toBe(asked);
  });
});

describe('connects waiting at maxConnectsInFlight', () => {
  it('are not started when their turn comes if nobody wants them any more: no lookup, no connect for a gone acquire', async () => {
    const { startDnsServer } = await import('./helpers/dns-server.js');
    // `slow.test` holds the one connect slot for 2 s (its answer is late); the `gone*.test` acquires give up while
    // their connects wait behind it; `later.test` is wanted when its turn comes, after theirs.
    const gone = Array.from({ length: 5 }, (_, i) => `gone${i}.test`);
    const dns = await startDnsServer({
      'slow.test': { a: ['127.0.0.1'], delayMs: 2_000 },
      ...Object.fromEntries([...gone, 'later.test'].map((name) => [name, { a: ['127.0.0.1'] }])),
    });
    cleanups.push(() => dns.close());
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxConnectsInFlight: 1 },
      dns: { servers: [dns.server] },
      pool: { predictive: false },
    });
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    raw.sendJson({ type: 'acquire', id: nextId++, host: 'slow.test', port: origin.port, timeoutMs: 10_000 });
    await eventually(() => dns.queries.some((query) => query.name === 'slow.test'), 'the slow lookup under way');
    for (const host of gone) {
      const reply = await raw.request({ type: 'acquire', id: nextId++, host, port: origin.port, timeoutMs: 1 });
      expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT' });
    }
    // Queued after them, and wanted: by the time it is leased, their turns have come and gone.
    const later = await raw.request({ type: 'acquire', id: nextId++, host: 'later.test', port: origin.port });
    expect(later.message).toMatchObject({ type: 'lease' });
    for (const fd of later.fds) native.close(fd);
    expect(dns.queries.filter((query) => query.name.startsWith('gone')).map((query) => query.name)).toEqual([]);
  });
});

/** A `tokens` request for one token of 127.0.0.1:port. */
function tokensRequest(id: number, port: number, timeoutMs: number) {
  return { type: 'tokens', id, host: '127.0.0.1', port, count: 1, timeoutMs };
}

describe('token waits of a client that disconnects', () => {
  it('end with its session: a reconnect loop leaves no waiter behind to take the tokens other clients wait for', async () => {
    const origin = await pathOrigin(cleanups);
    // A token every 250 ms, a burst of one: spent at once below.
    const sockpoold = await daemon(origin.port, {
      access: { maxPendingPerClient: 4 },
      pool: { defaults: { requestsPerSecond: 4, burst: 1 } },
    });
    const tokens = (id: number, timeoutMs = 600_000) => tokensRequest(id, origin.port, timeoutMs);
    const observer = openRawClient(sockpoold.socketPath, cleanups);
    expect((await observer.request(tokens(nextId++))).message).toMatchObject({ type: 'tokens', granted: 1 });
    // A client that asks for tokens and hangs up, over and over: each session is within its limits, but the
    // waits it leaves behind would add up without bound and race every other client for each token.
    for (let round = 0; round < 20; round++) {
      const hostile = new RawClient(sockpoold.socketPath);
      for (let i = 0; i < 4; i++) hostile.sendJson(tokens(i + 1));
      // (The stats reply comes after the four requests were taken in.)
      await hostile.request({ type: 'stats', id: 99 });
      hostile.close();
    }
    // Every hung-up session is gone before the count is read: a token granted after it went to nobody.
    await eventually(async () => (await stats(observer)).clients === 1, 'the hung-up clients are gone');
    const before = (await stats(observer)) as unknown as { rates: { granted: number } };
    const honest = await observer.request(tokens(nextId++, 30_000));
    expect(honest.message).toMatchObject({ type: 'tokens', granted: 1 });
    // Nobody but the honest client got a token: the hung-up clients' waits ended with their sessions.
    const after = (await stats(observer)) as unknown as { rates: { granted: number } };
    expect(after.rates.granted - before.rates.granted).toBe(1);
  });
});

describe('replies a client does not read', () => {
  it('are bounded in bytes per session: a client that asks and never reads is disconnected, not buffered for', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const observer = openRawClient(sockpoold.socketPath, cleanups);
    const clients = async () => (await stats(observer)).clients;
    expect(await clients()).toBe(1);
    // 4,000 stats requests, about 500 bytes of reply each (2 MB), and never a read: once the kernel's buffer is
    // full, every reply waited in the daemon's memory (up to 4,096 messages of up to 16 KiB a session, times
    // maxSessionsPerUid: gigabytes for one uid).
    const hoarder = openRawClient(sockpoold.socketPath, cleanups);
    for (let sent = 0; sent < 4000; ) {
      try {
        hoarder.sendJson({ type: 'stats', id: sent + 1 });
        sent++;
      } catch (error) {
        // Hung up on (EPIPE): done. Otherwise the daemon's receive queue is full: it reads on its next turn.
        if ((error as Error).message !== 'socket full') break;
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
    }
    await eventually(async () => (await clients()) === 1, 'the client that never reads is disconnected');
  });

  it("hold no more of the daemon's fds than its leases: a lease ended while its reply waits for the client takes its fd along", async () => {
    // A lease reply the kernel's buffer has no room for waits in the daemon with a copy of the lease's fd. A client
    // that never reads and ends each lease by id (`closed`: lease ids are the daemon's sequence) made the daemon
    // hold one fd for each, whatever its lease quotas: up to 4,096 a session (the queue's message bound), times
    // maxSessionsPerUid: past the daemon's RLIMIT_NOFILE for one uid, and then no client got a socket.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      access: { maxLeasesPerClient: 2 },
      quotas: { maxLeasesPerUid: 4 },
      pool: { defaults: { minIdle: 0, maxIdle: 4 } },
    });
    const observer = openRawClient(sockpoold.socketPath, cleanups);
    const leases = async () => (await stats(observer)).leases;
    const hoarder = openRawClient(sockpoold.socketPath, cleanups);
    const before = sockpoold.fdCount();
    // The kernel's buffer for the hoarder filled first, with stats replies (about 500 bytes each; it holds about 200
    // lease replies): the lease replies then wait in the daemon. (Lease replies in the kernel stay charged to the
    // uid until read, so they could not fill it: its lease quota would refuse the fifth acquire.)
    for (let sent = 0; sent < 400; ) {
      try {
        hoarder.sendJson({ type: 'stats', id: 10_000 + sent });
        sent++;
      } catch (error) {
        if ((error as Error).message !== 'socket full') throw error;
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
    }
    for (let leaseId = 1; leaseId <= 600; leaseId++) {
      try {
        hoarder.sendJson({ type: 'acquire', id: leaseId, host: '127.0.0.1', port: origin.port });
      } catch {
        break; // hung up on: done
      }
      await eventually(async () => (await leases()) === 1, `lease ${leaseId} lent`);
      try {
        hoarder.sendJson({ type: 'closed', leaseId });
      } catch {
        break;
      }
      await eventually(async () => (await leases()) === 0, `lease ${leaseId} ended`);
    }
    // Its leases (none now), the sessions, the idle sockets: the daemon holds nothing else for the hoarder, or it
    // is gone.
    const idle = (await stats(observer)).idle ?? 0;
    expect(sockpoold.fdCount()).toBeLessThanOrEqual(before + idle + 8);
  });

  it("count against its uid's lease quota while they carry fds: a lease ended before its reply was read stays charged until the client reads", async () => {
    // A lease reply the kernel holds (not the daemon) carries a copy of the lease's fd, in flight, counted against
    // the daemon user's RLIMIT_NOFILE until the client reads it, and nothing can take it back. A client that never
    // reads and ends each lease by guessing its id (`closed`; ids are the daemon's sequence) freed its lease quota
    // at once: with a few such uids every lease send would fail (ETOOMANYREFS) for everyone.
    const { replies, observer, again } = await endLeasesUnread({ quotas: { maxLeasesPerUid: 4 } });
    expect(replies.map((reply) => (reply.type === 'lease' ? 'lease' : `${reply.code} ${reply.fields?.quota}`))).toEqual(
      [...Array(4).fill('lease'), ...Array(3).fill('SOCKPOOL_ERR_QUOTA maxLeasesPerUid')],
    );
    // Its socket is drained: the daemon's next look finds nothing unread (no message needed from the client).
    await eventually(async () => (await stats(observer)).unreadLeases === 0, 'the charges released once read');
    expect(await again()).toMatchObject({ type: 'lease' });
  });

  it("count against the connection's maxLeasesPerClient too: one connection that ends its leases unread is refused at its own limit", async () => {
    // The same fds in flight, held by one connection: under a large uid quota, a connection that never read and
    // ended each lease by its guessed id stayed under maxLeasesPerClient (it counted only leases held) while its
    // fds in flight grew up to the uid's whole quota.
    const { replies, again } = await endLeasesUnread({
      access: { maxLeasesPerClient: 4 },
      quotas: { maxLeasesPerUid: 1000 },
    });
    // (Not the uid's quota: 1000.)
    expect(
      replies.map((reply) =>
        reply.type === 'lease' ? 'lease' : `${reply.code} ${/maxLeasesPerClient/.test(reply.message ?? '')}`,
      ),
    ).toEqual([...Array(4).fill('lease'), ...Array(3).fill('SOCKPOOL_ERR_LIMIT true')]);
    // Read: the connection's own settle before refusing finds nothing unread, and it gets leases again.
    expect(await again()).toMatchObject({ type: 'lease' });
  });

  it('stay charged when the daemon hangs up on a client that keeps its end open: its fds are still in flight', async () => {
    // The daemon's hang-up (here the client's half-close; the same for more than maxBadMessages bad messages or
    // MAX_QUEUED_REPLY_BYTES unread) ends the session's leases, but the replies the kernel holds stay in the client's
    // socket, readable, with their fds in flight (charged to the daemon user's RLIMIT_NOFILE), for as long as the
    // client keeps its end open. Before, the hang-up freed the uid's quota at once: with maxLeasesPerUid 4, one uid
    // reconnecting held 4 more fds in flight each round (40 after ten rounds), charged to nobody.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxLeasesPerUid: 4 },
      pool: { defaults: { minIdle: 0, maxIdle: 4 } },
    });
    const observer = openRawClient(sockpoold.socketPath, cleanups);
    // (Sockets only: the history's database opens more files of its own along the way.)
    const sockets = () =>
      readdirSync(`/proc/${sockpoold.child.pid}/fd`).filter((fd) => {
        try {
          return readlinkSync(`/proc/${sockpoold.child.pid}/fd/${fd}`).startsWith('socket:');
        } catch {
          return false;
        }
      }).length;
    await stats(observer); // (the observer's session accepted)
    const socketsBefore = sockets();
    const acquire = (id: number) => ({ type: 'acquire', id, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    const hoarder = openRawClient(sockpoold.socketPath, cleanups);
    for (let id = 1; id <= 4; id++) hoarder.sendJson(acquire(id));
    await eventually(async () => (await stats(observer)).leases === 4, 'four leases lent, their replies unread');
    // shutdown(SHUT_RDWR) of its own end: the daemon reads EOF and hangs up; what it sent stays queued here.
    native.shutdown(hoarder.fd);
    await eventually(async () => (await stats(observer)).clients === 1, 'the hoarder hung up on');
    expect(await stats(observer)).toMatchObject({ leases: 0, unreadLeases: 4 });
    // The same uid again: its four fds in flight leave no room.
    const next = openRawClient(sockpoold.socketPath, cleanups);
    const refused = await next.request(acquire(1));
    for (const fd of refused.fds) native.close(fd);
    expect(refused.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_QUOTA',
      fields: { quota: 'maxLeasesPerUid' },
    });
    // The hoarder reads what was queued for it: the four leases and their fds, then the end.
    expect(await fdsUntilEnd(hoarder)).toBe(4);
    await eventually(async () => (await stats(observer)).unreadLeases === 0, 'the charges released once read');
    const lent = await next.request(acquire(2));
    for (const fd of lent.fds) native.close(fd);
    expect(lent.message).toMatchObject({ type: 'lease' });
    await next.request({ type: 'closed', id: 3, leaseId: (lent.message as { leaseId: number }).leaseId });
    // Nothing of the hoarder's session is left in the daemon (the end it kept to watch the client's reads is closed):
    // its sockets are those before, the next client's session and the idle ones.
    await eventually(
      async () => sockets() === socketsBefore + 1 + ((await stats(observer)).idle ?? 0),
      () => `${sockets()} daemon sockets, ${socketsBefore} before the hoarder`,
    );
  });
  it('stay charged when the daemon hangs up on such a client with its fd table full: following them takes no new fd', async () => {
    // As above, but with every fd the daemon may have in use: before, the copy of the client's end kept to follow
    // the unread replies was a dup, which failed (EMFILE) and dropped the charges, so a uid that filled the table
    // first got fds in flight counted nowhere. The end kept is the session's own socket now.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxLeasesPerUid: 4 },
      pool: { defaults: { minIdle: 0, maxIdle: 4 } },
    });
    const pid = String(sockpoold.child.pid);
    const observer = openRawClient(sockpoold.socketPath, cleanups);
    await stats(observer);
    const acquire = (id: number) => ({ type: 'acquire', id, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    const hoarder = openRawClient(sockpoold.socketPath, cleanups);
    for (let id = 1; id <= 4; id++) hoarder.sendJson(acquire(id));
    await eventually(async () => (await stats(observer)).leases === 4, 'four leases lent, their replies unread');
    // The soft limit at the lowest fd number free: the daemon can open no fd until one of its own closes.
    const softLimit = readSoftFdLimit(`/proc/${pid}/limits`);
    const used = new Set(readdirSync(`/proc/${pid}/fd`).map(Number));
    let lowestFree = 0;
    while (used.has(lowestFree)) lowestFree++;
    await promisify(execFile)('prlimit', ['--pid', pid, `--nofile=${lowestFree}:`]);
    cleanups.push(() => promisify(execFile)('prlimit', ['--pid', pid, `--nofile=${softLimit}:`]).catch(() => {}));
    native.shutdown(hoarder.fd);
    await eventually(async () => (await stats(observer)).clients === 1, 'the hoarder hung up on');
    expect(await stats(observer)).toMatchObject({ leases: 0, unreadLeases: 4 });
    await promisify(execFile)('prlimit', ['--pid', pid, `--nofile=${softLimit}:`]);
    // Read: the charges go, and the end kept is closed (the hoarder sees the end after its four leases).
    expect(await fdsUntilEnd(hoarder)).toBe(4);
    await eventually(async () => (await stats(observer)).unreadLeases === 0, 'the charges released once read');
  });
});

/** Reads `client` to its end: the fds its replies carried (each closed), counted. */
async function fdsUntilEnd(client: { receive(): Promise<{ fds: number[]; eof?: boolean }> }): Promise<number> {
  let received = 0;
  for (;;) {
    const reply = await client.receive();
    received += reply.fds.length;
    for (const fd of reply.fds) native.close(fd);
    if (reply.eof) return received;
  }
}

interface HoarderReply {
  type: string;
  code?: string;
  message?: string;
  fields?: { quota?: string };
}

/**
 * A daemon with `config` (leases to one path origin) and a raw client that never reads: it acquires four leases one
 * after another and ends each by its guessed id (`closed`), which leaves four replies with fds in flight, then sends
 * three more acquires (each ended at once) and a `stats`. Returns its replies in order up to the stats (their fds
 * closed), an observer connection, and `again`: one more acquire's reply once all is read.
 */
async function endLeasesUnread(
  config: object,
): Promise<{ replies: HoarderReply[]; observer: RawClient; again: () => Promise<unknown> }> {
  const origin = await pathOrigin(cleanups);
  const sockpoold = await daemon(origin.port, { ...config, pool: { defaults: { minIdle: 0, maxIdle: 4 } } });
  const observer = openRawClient(sockpoold.socketPath, cleanups);
  const hoarder = openRawClient(sockpoold.socketPath, cleanups);
  const acquire = (id: number) => ({ type: 'acquire', id, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
  for (let leaseId = 1; leaseId <= 4; leaseId++) {
    hoarder.sendJson(acquire(leaseId));
    await eventually(async () => (await stats(observer)).leases === 1, `lease ${leaseId} lent`);
    hoarder.sendJson({ type: 'closed', leaseId });
    await eventually(async () => (await stats(observer)).leases === 0, `lease ${leaseId} ended`);
  }
  expect((await stats(observer)).unreadLeases).toBe(4);
  // Four fds in flight: further acquires are refused, however many leases it ends by guessing.
  for (let leaseId = 5; leaseId <= 7; leaseId++) {
    hoarder.sendJson(acquire(leaseId));
    hoarder.sendJson({ type: 'closed', leaseId });
  }
  hoarder.sendJson({ type: 'stats', id: 100 });
  // Read only once the daemon took in all of them (the hoarder's own output all read, then a turn of the daemon's
  // for the observer): a read racing them would pay the charges off before the later acquires came.
  await eventually(() => native.unreadOutput(hoarder.fd) === 0, "the daemon read the hoarder's messages");
  expect((await stats(observer)).unreadLeases).toBe(4);
  // Its socket read now, in order: the four leases, then the refusals, then the stats reply.
  const replies: HoarderReply[] = [];
  for (;;) {
    const reply = await hoarder.receive();
    for (const fd of reply.fds) native.close(fd);
    if (reply.eof || reply.message?.id === 100) break;
    replies.push(reply.message as HoarderReply);
  }
  const again = async () => {
    const fresh = await hoarder.request(acquire(8));
    for (const fd of fresh.fds) native.close(fd);
    return fresh.message;
  };
  return { replies, observer, again };
}

describe('token waits of one uid across connections', () => {
  it('count against maxPendingPerUid, as acquires do: more connections do not make more room', async () => {
    const origin = await pathOrigin(cleanups);
    // A token every 100 s: after the burst every request waits (or is refused when its deadline is sooner).
    const sockpoold = await daemon(origin.port, {
      quotas: { maxPendingPerUid: 2 },
      pool: { defaults: { requestsPerSecond: 0.01, burst: 1 } },
    });
    const tokens = (id: number, timeoutMs = 600_000) => tokensRequest(id, origin.port, timeoutMs);
    const first = openRawClient(sockpoold.socketPath, cleanups);
    expect((await first.request(tokens(nextId++))).message).toMatchObject({ type: 'tokens', granted: 1 });
    // (Each stats reply comes after the wait before it was taken in.)
    first.sendJson(tokens(nextId++));
    await stats(first);
    const second = openRawClient(sockpoold.socketPath, cleanups);
    second.sendJson(tokens(nextId++));
    await stats(second);
    // The uid waits for two tokens already: a third wait, on a third connection, is over its quota.
    const third = openRawClient(sockpoold.socketPath, cleanups);
    const over = await third.request(tokens(nextId++, 1));
    expect(over.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_QUOTA',
      fields: { quota: 'maxPendingPerUid' },
    });
  });
});
