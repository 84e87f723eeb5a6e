// Room at an origin's cap (maxPerOrigin) that a client's connection cache holds: curl keeps a kept-alive connection
// idle after its request, and its lease holds one of the origin's slots until curl closes it (minutes). Within one
// thread, a transfer waiting for a socket takes a connection that frees there (worker/socket-supply.ts); across
// clients (or threads) the daemon asks the holders to give idle ones back (`reclaim`, docs/protocol.md), and a
// connection with a request in flight is never taken. Real daemon, real clients, a real kept-alive origin.
import { afterEach, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import * as native from '../shared/native.js';
import { daemonStats, fdCount, startTestDaemon } from './fixtures/client-helpers.js';
import { countingOrigin } from './helpers/counting-origin.js';
import { eventually } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A kept-alive origin answering after `delayMs`, a daemon capping it at one connection, and `clients` clients. */
async function capped(delayMs: number, clients: number, threads = 1, inlineWhenIdle = true) {
  const origin = await countingOrigin(delayMs, true);
  cleanups.push(() => origin.close());
  const daemon = await startTestDaemon([origin.port], {
    config: { pool: { origins: [{ match: `127.0.0.1:${origin.port}`, maxPerOrigin: 1 }] } },
  });
  cleanups.push(() => daemon.stop());
  // This process's fds before the clients: each client's thread opens its event loop's fds (epoll, eventfd, signal
  // pipe, io_uring) on its own schedule once constructed, so a count taken after the constructors held some of them
  // and let as many leaked fds through.
  const fdsBeforeClients = fdCount();
  const made = Array.from({ length: clients }, () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads, inlineWhenIdle });
    cleanups.push(() => client.close());
    return client;
  });
  return { origin, daemon, url: `http://127.0.0.1:${origin.port}/x`, clients: made, fdsBeforeClients };
}

function statuses(results: PromiseSettledResult<{ status: number }>[]): Array<number | string> {
  return results.map((result) =>
    result.status === 'fulfilled' ? result.value.status : String((result.reason as { code?: string }).code),
  );
}

describe('room at an origin’s cap held by idle kept-alive connections', () => {
  it('goes to another client: the holder gives its idle connection back, and connects again when it needs one', async () => {
    // (Counted before the clients were made: the origin and the daemon are open; the clients' threads, leases and
    // connections come after.)
    const { origin, daemon, url, clients, fdsBeforeClients: before } = await capped(0, 2);
    const [a, b] = clients as [SockpoolClient, SockpoolClient];
    expect((await a.request(url)).status).toBe(200);
    // a's connection is idle in its cache and holds the one slot. Before: b waited until its deadline.
    expect((await b.request(url, { timeoutMs: 5_000 })).status).toBe(200);
    expect((await daemonStats(daemon.socketPath)).reclaimNotices).toBeGreaterThanOrEqual(1);
    expect((await a.request(url, { timeoutMs: 5_000 })).status).toBe(200);
    expect(origin.maxOpen).toBe(1);
    await Promise.all(clients.map((client) => client.close()));
    // The reclaimed lease's fd too: curl closed its dead connection, or the client's close did.
    await eventually(() => fdCount() <= before, `fd count back to ${before}`);
  });

  it('within one client, the transfers waiting for a socket run one after another on the connection it holds', async () => {
    // (Every request in the thread: a lone first request would run in the caller's thread, in another cache.)
    const { origin, daemon, url, clients } = await capped(0, 1, 1, false);
    const [client] = clients as [SockpoolClient];
    expect((await client.request(url)).status).toBe(200);
    const results = await Promise.allSettled(
      Array.from({ length: 8 }, () => client.request(url, { timeoutMs: 60_000 })),
    );
    expect(statuses(results)).toEqual(Array(8).fill(200));
    // All of them over the first connection: a freed connection goes to the next transfer, no new connect.
    expect(origin.requests).toBe(9);
    expect(origin.maxOpen).toBe(1);
    // The acquires given up were cancelled at the daemon (`cancel`), not left queued until their deadline (a minute
    // here), where each would have taken a connection only to give it back.
    await eventually(async () => (await daemonStats(daemon.socketPath)).waiting === 0, 'no acquire left waiting');
    expect(origin.accepted).toBe(1);
  });

  it('is never taken from a request in flight: the other client waits until it ends', async () => {
    const { origin, url, clients } = await capped(300, 2);
    const [a, b] = clients as [SockpoolClient, SockpoolClient];
    expect((await a.request(url)).status).toBe(200);
    // a's second request is in flight on its connection (the origin answers after 300 ms) while b waits for room:
    // the daemon asks a every 100 ms, and a gives nothing back until its request is over.
    const slow = a.request(url, { timeoutMs: 5_000 });
    await eventually(() => origin.requests === 2, 'a’s second request at the origin');
    const waiting = b.request(url, { timeoutMs: 5_000 });
    const results = await Promise.allSettled([slow, waiting]);
    expect(statuses(results)).toEqual([200, 200]);
    expect(origin.maxOpen).toBe(1);
  });

  it('several origins at their caps at once: each waiting client gets its room when the holder’s requests end', async () => {
    const origins = [await countingOrigin(300, true), await countingOrigin(300, true)];
    for (const origin of origins) cleanups.push(() => origin.close());
    const daemon = await startTestDaemon(
      origins.map((origin) => origin.port),
      {
        config: {
          pool: { origins: origins.map((origin) => ({ match: `127.0.0.1:${origin.port}`, maxPerOrigin: 1 })) },
        },
      },
    );
    cleanups.push(() => daemon.stop());
    const [a, b] = [0, 1].map(() => {
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
      cleanups.push(() => client.close());
      return client;
    }) as [SockpoolClient, SockpoolClient];
    const urls = origins.map((origin) => `http://127.0.0.1:${origin.port}/x`);
    // a's requests are in flight at both origins while b waits at both caps: the first asks find nothing idle, and
    // the daemon's later asks (one for both pools together) get both connections back once a's requests are over.
    const slow = urls.map((url) => a.request(url, { timeoutMs: 5_000 }));
    await eventually(() => origins.every((origin) => origin.requests === 1), 'a’s requests at both origins');
    const waiting = urls.map((url) => b.request(url, { timeoutMs: 5_000 }));
    expect(statuses(await Promise.allSettled([...slow, ...waiting]))).toEqual([200, 200, 200, 200]);
    for (const origin of origins) expect(origin.maxOpen).toBe(1);
    expect((await daemonStats(daemon.socketPath)).reclaimNotices).toBeGreaterThanOrEqual(2);
  });

  it('a client that gives an acquire up cancels it: the daemon drops it from the queue and lends it nothing', async () => {
    const { origin, daemon } = await capped(0, 0);
    // Raw clients: they ask for no reclaim notices, so the holder's lease stays where it is.
    const holder = openRawClient(daemon.socketPath, cleanups);
    const lease = await holder.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port });
    expect(lease.message).toMatchObject({ type: 'lease' });
    const raw = openRawClient(daemon.socketPath, cleanups);
    expect((await raw.request({ type: 'hello', id: 1, version: 1 })).message).toMatchObject({ cancel: true });
    raw.sendJson({ type: 'acquire', id: 2, host: '127.0.0.1', port: origin.port, timeoutMs: 60_000 });
    await eventually(async () => (await daemonStats(daemon.socketPath)).waiting === 1, 'the acquire waits at the cap');
    raw.sendJson({ type: 'cancel', acquireId: 2 });
    await eventually(async () => (await daemonStats(daemon.socketPath)).waiting === 0, 'the acquire is dropped');
    // A client that hangs up with an acquire waiting: the acquire leaves the queue with it, not at its deadline.
    const leaver = openRawClient(daemon.socketPath, cleanups);
    leaver.sendJson({ type: 'acquire', id: 1, host: '127.0.0.1', port: origin.port, timeoutMs: 60_000 });
    await eventually(async () => (await daemonStats(daemon.socketPath)).waiting === 1, 'the leaver’s acquire waits');
    leaver.close();
    await eventually(async () => (await daemonStats(daemon.socketPath)).waiting === 0, 'it left with its client');
    // The room frees: nothing goes to the cancelled acquire (the next message the raw client gets is its own reply).
    for (const fd of lease.fds) native.close(fd);
    holder.sendJson({ type: 'closed', leaseId: (lease.message as { leaseId: number }).leaseId });
    await eventually(async () => (await daemonStats(daemon.socketPath)).leased === 0, 'the holder’s lease ended');
    expect((await raw.request({ type: 'stats', id: 3 })).message).toMatchObject({ type: 'stats', id: 3 });
    expect(origin.accepted).toBe(1);
  });
});
