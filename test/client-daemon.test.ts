// SockpoolClient when the daemon is not there: `fallback: 'direct'` lets curl connect by itself, `'fail'` (the
// default) fails at once with SOCKPOOL_ERR_DAEMON_UNAVAILABLE; and a daemon killed (SIGKILL) while ~100 requests
// are in flight, then started again on the same socket path: every request either succeeds or fails with a typed
// error, the workers reconnect (with backoff), later requests succeed, and no lease of the old daemon is reported
// to the new one. Real daemon child processes, real HTTP server.
import { existsSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  echoHandler,
  eventually,
  httpOrigin,
  type Origin,
  originStats,
  startTestDaemon,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let origin: Origin;
/** Paths of the requests that reached the origin. */
const arrived = new Set<string>();

beforeAll(async () => {
  const echo = echoHandler(50);
  origin = await httpOrigin((request, response) => {
    arrived.add(request.url ?? '');
    echo(request, response);
  });
});

afterAll(async () => {
  await origin?.close();
});

describe('no daemon', () => {
  const missing = join(mkdtempSync(join(tmpdir(), 'sockpool-nodaemon-')), 'absent.sock');

  it("fallback 'direct': curl connects by itself and the request succeeds", async () => {
    expect(existsSync(missing)).toBe(false);
    const client = new SockpoolClient({ socketPath: missing, threads: 1, fallback: 'direct' });
    try {
      const before = origin.connections();
      const responses = await Promise.all([
        client.request(`http://127.0.0.1:${origin.port}/direct-1`),
        client.request(`http://127.0.0.1:${origin.port}/direct-2`, { method: 'POST', body: 'abc' }),
      ]);
      expect(responses.map((response) => response.body.toString())).toEqual(['GET /direct-1 0', 'POST /direct-2 3']);
      expect(responses.map((response) => response.connection)).toEqual(['direct', 'direct']);
      expect(responses.every((response) => !response.warm)).toBe(true);
      expect(origin.connections() - before).toBe(2);
    } finally {
      await client.close();
    }
  });

  it("fallback 'fail' (the default): SOCKPOOL_ERR_DAEMON_UNAVAILABLE, and nothing reaches the server", async () => {
    const client = new SockpoolClient({ socketPath: missing, threads: 1 });
    try {
      const before = origin.connections();
      // The first attempt says why (the kernel's error, kept as the cause); the next ones fail during the backoff.
      const first = await client.request(`http://127.0.0.1:${origin.port}/fail`).catch((error: Error) => error);
      expect(first).toMatchObject({ code: 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE', causeCode: 'ENOENT' });
      expect((first as Error).cause).toMatchObject({ code: 'ENOENT' });
      for (let i = 0; i < 3; i++) {
        await expect(client.request(`http://127.0.0.1:${origin.port}/fail`)).rejects.toMatchObject({
          code: 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE',
          socketPath: missing,
        });
      }
      expect(origin.connections()).toBe(before);
    } finally {
      await client.close();
    }
  });
});

describe('daemon restart under load', () => {
  let daemon: DaemonProcess | undefined;

  afterAll(async () => {
    await daemon?.stop();
  });

  it('SIGKILL with ~100 requests in flight, restart on the same path: typed failures, then success again', async () => {
    daemon = await startTestDaemon([origin.port]);
    const { socketPath } = daemon;
    const client = new SockpoolClient({ socketPath, threads: 2, concurrencyPerThread: 64, timeoutMs: 20_000 });
    try {
      await client.request(`http://127.0.0.1:${origin.port}/before`);
      // Waves of requests: some in curl over leased sockets, some waiting for an acquire, when the daemon dies.
      const outcomes: Array<Promise<string>> = [];
      const byPath = new Map<string, Promise<string>>();
      const unexpected: string[] = [];
      const launch = (count: number, tag: string) => {
        for (let i = 0; i < count; i++) {
          const outcome = client.request(`http://127.0.0.1:${origin.port}/${tag}-${i}`).then(
            (response) => (response.body.toString() === `GET /${tag}-${i} 0` ? 'ok' : 'wrong body'),
            (error: { code?: string; message?: string }) => {
              // Kept whole for the assertion's message when it is not an expected code.
              if (error.code !== 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE') unexpected.push(`${error.code}: ${error.message}`);
              return error.code ?? 'untyped';
            },
          );
          outcomes.push(outcome);
          byPath.set(`/${tag}-${i}`, outcome);
        }
      };
      launch(60, 'a');
      // Requests at the server (it answers after 50 ms) when the daemon dies: curl holds their connections.
      const atServer = () => [...arrived].filter((path) => byPath.has(path));
      await eventually(() => atServer().length >= 10, 'requests in flight at the server');
      launch(40, 'b');
      daemon.child.kill('SIGKILL');
      const inFlightAtKill = atServer();
      await daemon.stop();
      launch(20, 'c'); // while there is no daemon at all
      daemon = await startTestDaemon([origin.port], { socketPath });

      const results = await Promise.all(outcomes);
      const counts: Record<string, number> = {};
      for (const result of results) counts[result] = (counts[result] ?? 0) + 1;
      // Every request ended: with its own response, or with a typed error of the daemon's absence.
      expect(unexpected).toEqual([]);
      expect(Object.keys(counts).filter((key) => !['ok', 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE'].includes(key))).toEqual([]);
      // A request the server had when the daemon died gets its answer: the daemon's death takes no connection.
      expect(await Promise.all(inFlightAtKill.map((path) => byPath.get(path)))).toEqual(inFlightAtKill.map(() => 'ok'));
      expect(counts.ok ?? 0).toBeGreaterThanOrEqual(inFlightAtKill.length);

      // The workers reconnect (after their backoff) and requests succeed again.
      const restarted = daemon;
      await eventually(
        async () =>
          client.request(`http://127.0.0.1:${origin.port}/after`).then(
            (response) => response.status === 200,
            () => false,
          ),
        'a request succeeds through the new daemon',
      );
      const burst = await Promise.all(
        Array.from({ length: 50 }, (_, i) => client.request(`http://127.0.0.1:${origin.port}/later-${i}`)),
      );
      expect(burst.every((response) => response.status === 200)).toBe(true);
      expect(restarted.output()).not.toMatch(/SOCKPOOL_ERR_PROTOCOL/);
    } finally {
      await client.close();
    }
    // Leases of the new daemon were all reported closed; none of the old daemon's were sent to it.
    await eventually(async () => (await originStats(daemon!.socketPath, origin.port)).leased === 0, 'no lease left');
  });
});
