// Origin affinity between requests and worker threads (client/thread-lanes.ts, client/request-queue.ts): each thread
// has its own curl connection cache, so a crawler's request that lands on a thread holding no connection to its
// origin leases a new one. Real daemon child process, one real HTTP origin under many host names (pinned to
// 127.0.0.1 by the daemon's dns.resolve: each name is an origin of its own to curl), counting the connections it
// accepts; announcing is off, so every connection it accepts is one a thread leased.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { echoHandler, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { seededRandom } from './helpers/seeded-random.js';

const ORIGINS = 16;
const THREADS = 2;
const PER_THREAD = 4;
const REQUESTS = 400;
const name = (n: number) => `o${n}.affinity.test`;

let origin: Origin;
let daemon: DaemonProcess;

beforeAll(async () => {
  // (1 ms of server time: the requests overlap, and slots free one by one.)
  origin = await httpOrigin(echoHandler(1));
  const names = Array.from({ length: ORIGINS }, (_, n) => `${name(n)}:${origin.port}:127.0.0.1`);
  daemon = await startTestDaemon([origin.port], { config: { dns: { resolve: names } } });
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
});

describe('origin affinity', () => {
  it('a crawler mix over two threads reuses the threads’ connections: a freed slot goes to a waiter whose origin its thread holds', async () => {
    const client = new SockpoolClient({
      socketPath: daemon.socketPath,
      threads: THREADS,
      concurrencyPerThread: PER_THREAD,
      inlineWhenIdle: false,
      announce: false,
    });
    try {
      // Every origin once, so that each has a connection on one of the threads.
      const url = (n: number, path: string) => `http://${name(n)}:${origin.port}/${path}`;
      await Promise.all(Array.from({ length: ORIGINS }, (_, n) => client.request(url(n, 'first'))));
      const before = origin.connections();
      // A skewed mix (a few origins take most requests, as a crawler's do), all queued at once.
      const random = seededRandom(12);
      const mix = Array.from({ length: REQUESTS }, () => Math.floor(ORIGINS * random() ** 2));
      const responses = await Promise.all(mix.map((n, i) => client.request(url(n, `mix/${i}`))));
      expect(responses.every((response) => response.status === 200)).toBe(true);
      const leased = origin.connections() - before;
      // A freed slot goes to a waiter whose origin its thread holds, so the mix needs a new connection only where
      // more of an origin's requests run at once than its thread holds connections to it (the most asked origins, a
      // few times). Without that, a freed slot took the head of the queue whatever its origin, and each thread ended
      // up with connections of its own to most origins, as many as it ran requests to the origin at once.
      // (8–16 on a quiet machine, 28 once in a clean-clone CI run at load ~5, where slots free in a different order;
      // 66–82 with claimIdle always refusing: the bound sits between.)
      expect(leased).toBeLessThanOrEqual(40);
    } finally {
      await client.close();
    }
  });
});
