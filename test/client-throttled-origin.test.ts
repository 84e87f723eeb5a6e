// A rate-limited origin's requests must not hold up the client's queue for other origins (client/request-queue.ts,
// "Throttled origins"): a request holds its slot while it waits for its origin's token, and the queue is first in,
// first out, so requests to an origin at 1 request/s, queued ahead, took every slot. Real daemon child process,
// real loopback origins; the order of the answers is asserted, never a duration.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { echoHandler, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let slow: Origin;
let capped: Origin;
let other: Origin;
let daemon: DaemonProcess;

beforeAll(async () => {
  slow = await httpOrigin(echoHandler());
  // One connection at a time, each answer after 500 ms: its requests wait at the cap, one after another.
  capped = await httpOrigin(echoHandler(500));
  other = await httpOrigin(echoHandler());
  daemon = await startTestDaemon([slow.port, capped.port, other.port], {
    config: {
      pool: {
        origins: [
          { match: `127.0.0.1:${slow.port}`, requestsPerSecond: 1, burst: 1 },
          { match: `127.0.0.1:${capped.port}`, maxPerOrigin: 1 },
        ],
      },
    },
  });
});

afterAll(async () => {
  await daemon?.stop();
  await slow?.close();
  await capped?.close();
  await other?.close();
});

/** Eight requests to `url(i)`, then one to the other origin: the order in which they finished. */
async function finishOrder(client: SockpoolClient, url: (i: number) => string): Promise<string[]> {
  const finished: string[] = [];
  const track = (name: string, pending: Promise<unknown>) => pending.then(() => finished.push(name));
  const all = Array.from({ length: 8 }, (_, i) => track(`limited${i}`, client.request(url(i))));
  all.push(track('other', client.request(`http://127.0.0.1:${other.port}/o`)));
  await Promise.all(all);
  return finished;
}

describe('an origin at its connection cap (maxPerOrigin 1)', () => {
  for (const threads of [0, 1]) {
    it(`does not hold up a request to another origin queued behind its requests (threads: ${threads})`, async () => {
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads, concurrencyPerThread: 4 });
      try {
        // One at a time through the one connection: the second request's acquire waits at the cap for the first
        // (500 ms), and the queue learns the origin is throttled when it ends; the other origin's request starts
        // then, before the third capped request can end (after 1.5 s). Before, it waited behind the first five.
        const order = await finishOrder(client, (i) => `http://127.0.0.1:${capped.port}/c${i}`);
        expect(order.indexOf('other')).toBeLessThan(3);
        // Every one answered (finishOrder rejects on a failure): a request that started later used to take the
        // connection that freed from the ones waiting for it at the cap, which then timed out (threads: 0: 3 of 8,
        // SOCKPOOL_ERR_ACQUIRE_TIMEOUT).
        expect(order).toHaveLength(9);
      } finally {
        await client.close();
      }
    }, 30_000);
  }
});

describe('an origin whose rate makes its requests wait', () => {
  for (const threads of [0, 1]) {
    it(`does not hold up a request to another origin queued behind its requests (threads: ${threads})`, async () => {
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads, concurrencyPerThread: 4 });
      try {
        const finished: string[] = [];
        const track = (name: string, pending: Promise<unknown>) => pending.then(() => finished.push(name));
        // Eight requests at 1 request/s take 7 s; all four slots are theirs at first. The queue learns the origin is
        // throttled from the first request that waited for its token (the second, after about 1 s): from then on
        // its requests hold at most two slots, and the other origin's request starts then, long before the third
        // slow request can have its token.
        const all = Array.from({ length: 8 }, (_, i) =>
          track(`slow${i}`, client.request(`http://127.0.0.1:${slow.port}/s${i}`)),
        );
        all.push(track('other', client.request(`http://127.0.0.1:${other.port}/o`)));
        await Promise.all(all);
        expect(finished.indexOf('other')).toBeLessThan(3);
        // (Before, it was always behind the first five: it got a slot only when the fifth slow request ended.)
      } finally {
        await client.close();
      }
    }, 30_000);
  }
});
