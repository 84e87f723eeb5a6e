// sockpoold SIGKILLed while it relays warm TLS sessions: the kernel closes the relay's end of each loopback pair, so
// every relayed transfer ends at once, with a typed error, and the client's retry policy applies as to any dead
// connection: an idempotent request that had no response yet runs again (here on curl's own connection: fallback
// 'direct', there is no daemon any more), a POST fails with deadConnection, a response cut mid-body fails with the
// transfer's error. Real daemon child process, real node:https origin, a throwaway CA.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  eventually,
  fdCount,
  httpsOrigin,
  type Origin,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let origin: Origin;
let daemon: DaemonProcess;
/** Requests the origin has seen, by path (the held ones get no answer until their connection dies). */
const seen = new Map<string, number>();

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  origin = await httpsOrigin(pki, (request, response) => {
    const path = request.url ?? '';
    const count = (seen.get(path) ?? 0) + 1;
    seen.set(path, count);
    request.resume();
    if (path === '/stream') {
      // A head and the first MiB, then nothing more: the transfer is mid-body when the daemon dies.
      response.writeHead(200, { 'content-length': String(64 * 1024 * 1024) });
      response.write(Buffer.alloc(1024 * 1024, 1));
      return;
    }
    // The first request of each path is held (no answer); a retry is answered at once.
    if (count === 1) return;
    response.end(`${request.method} ${path} answered on attempt ${count}`);
  });
  daemon = await startTestDaemon([origin.port], {
    extraArgs: warmTlsArgs(pki.caFile, [origin.port]),
  });
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
  pki?.cleanup();
});

describe('sockpoold SIGKILLed mid-relay', () => {
  it('ends every relayed transfer with a typed error; the retry policy applies', async () => {
    const before = fdCount();
    const client = new SockpoolClient({
      socketPath: daemon.socketPath,
      threads: 1,
      caFile: pki.caFile,
      fallback: 'direct',
      timeoutMs: 60_000,
    });
    try {
      const base = `https://localhost:${origin.port}`;
      const streamed = await client.requestStream(`${base}/stream`);
      expect(streamed.tls?.by).toBe('daemon');
      const reader = streamed.body.getReader();
      expect((await reader.read()).value?.length).toBeGreaterThan(0);
      // Settled at once into values: a rejection is looked at below, never left unhandled meanwhile.
      const get = client.request(`${base}/get`).catch((error: Error) => error);
      const post = client.request(`${base}/post`, { method: 'POST', body: 'once' }).catch((error: Error) => error);
      await eventually(() => seen.has('/get') && seen.has('/post'), 'both requests at the origin');

      daemon.child.kill('SIGKILL');

      // The GET had no response yet: run again, on curl's own connection (no daemon now), and answered.
      const retried = await get;
      if (retried instanceof Error) throw retried;
      expect(retried.body.toString()).toBe('GET /get answered on attempt 2');
      expect(retried.connection).toBe('direct');
      // The POST is not idempotent: it fails, saying the connection died under it.
      expect(await post).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', deadConnection: true });
      expect(seen.get('/post')).toBe(1);
      // The stream was cut mid-body: its reader fails with the transfer's error, never a silent short body.
      const cut = await (async () => {
        for (;;) {
          const { done } = await reader.read();
          if (done) return 'ended without an error';
        }
      })().catch((error: { code?: string }) => error.code);
      expect(cut).toBe('SOCKPOOL_ERR_TRANSFER');
    } finally {
      await client.close();
    }
    await eventually(() => fdCount() <= before, `client fds back to ${before} (now ${fdCount()})`);
  });
});
