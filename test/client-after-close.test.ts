// A client after close(): every method refuses with SOCKPOOL_ERR_CLOSED and starts nothing. Found in review: stats()
// after close() ran a piscina task, which started a worker thread again (with its daemon session and event loop's
// fds) that nothing would ever close, and kept the caller's process from exiting. Real daemon child process, real
// HTTP origin; threads counted with the worker_threads diagnostics channel.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { echoHandler, fdCount, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { liveWorkers } from './helpers/worker-threads.js';

let origin: Origin;
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = await httpOrigin(echoHandler());
  daemon = await startTestDaemon([origin.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
});

describe('after close()', () => {
  for (const threads of [0, 1]) {
    it(`request, requestStream, fetch, prewarm and stats reject with SOCKPOOL_ERR_CLOSED, starting no thread and opening no fd (threads ${threads})`, async () => {
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads, inlineWhenIdle: false });
      const url = `http://127.0.0.1:${origin.port}/`;
      expect((await client.request(url)).status).toBe(200);
      await client.close();
      const fdsBefore = fdCount();
      const outcomes: Record<string, unknown> = {};
      for (const [name, call] of Object.entries({
        request: () => client.request(url),
        requestStream: () => client.requestStream(url),
        prewarm: () => client.prewarm(url),
        stats: () => client.stats(),
      })) {
        outcomes[name] = await call().then(
          () => 'resolved',
          (error: { code?: string }) => error.code,
        );
      }
      outcomes.fetch = await client.fetch(url).then(
        () => 'resolved',
        (error: { code?: string }) => error.code,
      );
      expect({ outcomes, threads: liveWorkers().length, fds: fdCount() }).toEqual({
        outcomes: {
          request: 'SOCKPOOL_ERR_CLOSED',
          requestStream: 'SOCKPOOL_ERR_CLOSED',
          prewarm: 'SOCKPOOL_ERR_CLOSED',
          stats: 'SOCKPOOL_ERR_CLOSED',
          fetch: 'SOCKPOOL_ERR_CLOSED',
        },
        threads: 0,
        fds: fdsBefore,
      });
    });
  }
});
