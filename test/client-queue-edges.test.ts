// The client's queue and lanes where a request goes wrong on its way in (found in review): a request body the caller
// detached after handing it over (its ArrayBuffer transferred) cannot be cloned onto a thread's lane. It must fail
// alone with a typed error, leaving the queue's and the lanes' counts as they were: no uncaught exception, no slot
// held for ever, close() not waiting for it. Real daemon child process, real HTTP origin.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { echoHandler, eventually, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let origin: Origin;
/** An origin whose answers to /hold… wait until released together (one turn of its loop); it records every path. */
let holding: Origin;
let held: Array<() => void> = [];
const holdingSaw: string[] = [];
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = await httpOrigin(echoHandler(20));
  holding = await httpOrigin((request, response) => {
    holdingSaw.push(request.url ?? '');
    const reply = () => response.end(request.url);
    if (request.url?.startsWith('/hold')) held.push(reply);
    else reply();
  });
  daemon = await startTestDaemon([origin.port, holding.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
  await holding?.close();
});

/** Detaches a body's ArrayBuffer, as transferring it to another thread does. */
function detach(body: Uint8Array): void {
  structuredClone(body.buffer, { transfer: [body.buffer as ArrayBuffer] });
}

describe('a request body detached after the call', () => {
  it('while the request waits in the queue (the lane full when it is sent): it fails typed, its slot is given back', async () => {
    const client = new SockpoolClient({
      socketPath: daemon.socketPath,
      threads: 1,
      concurrencyPerThread: 1,
      inlineWhenIdle: false,
    });
    const url = `http://127.0.0.1:${origin.port}/`;
    const first = client.request(url);
    const body = new Uint8Array(16);
    // Waits behind `first`; sent alone on a full lane (the lane's message goes at once) once `first` ends.
    const streamed = client.requestStream(url, { method: 'POST', body });
    const buffered = client.request(url, { method: 'POST', body });
    detach(body);
    expect((await first).status).toBe(200);
    await expect(streamed).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    await expect(buffered).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    // The only slot is free again: the next request runs (it waited for its deadline before), and close() ends.
    expect((await client.request(url, { method: 'POST', body: 'ok' })).body.toString()).toBe('POST / 2');
    await client.close();
  });

  it('in a burst sent together: only that request fails, the others of the batch are answered', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, inlineWhenIdle: false });
    const url = `http://127.0.0.1:${origin.port}/`;
    const body = new Uint8Array(16);
    const before = client.request(`${url}a`);
    const detached = client.request(url, { method: 'POST', body });
    const detachedStream = client.requestStream(url, { method: 'POST', body });
    const after = client.request(`${url}b`, { method: 'POST', body: 'xyz' });
    // (The lane's batch goes at the end of this round of microtasks: it would throw there, uncaught.)
    detach(body);
    await expect(detached).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    await expect(detachedStream).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    expect((await before).body.toString()).toBe('GET /a 0');
    expect((await after).body.toString()).toBe('POST /b 3');
    await client.close();
  });

  it("in the caller's thread (threads: 0), waiting in the queue: it fails the same way, rather than sending an empty body", async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, concurrencyPerThread: 1 });
    const url = `http://127.0.0.1:${origin.port}/`;
    const first = client.request(url);
    const body = new Uint8Array(16);
    const buffered = client.request(url, { method: 'POST', body });
    const streamed = client.requestStream(url, { method: 'POST', body });
    detach(body);
    expect((await first).status).toBe(200);
    await expect(buffered).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    await expect(streamed).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    expect((await client.request(url)).status).toBe(200);
    await client.close();
  });
});

describe('a signal that fires after the queue gave the request its slot, before the request started', () => {
  // One signal for two requests, one running and one waiting behind it for the only slot: the running one's abort
  // listener came first, and failing it gives its slot to the waiting one at once, before that one's own listener
  // in the queue is called (it is removed as the request leaves the queue). The request then starts with its signal
  // already fired: the runtimes and lanes only listen for an abort to come, and it used to go out anyway.
  for (const options of [
    { threads: 0, concurrencyPerThread: 1 },
    { threads: 1, concurrencyPerThread: 1, inlineWhenIdle: false },
  ]) {
    it(`fails with the abort's error and is never sent (${JSON.stringify(options)})`, async () => {
      held = [];
      holdingSaw.length = 0;
      const client = new SockpoolClient({ socketPath: daemon.socketPath, ...options });
      const url = `http://127.0.0.1:${holding.port}`;
      const controller = new AbortController();
      const running = client.request(`${url}/hold`, { signal: controller.signal });
      const waiting = client.request(`${url}/waiting`, { signal: controller.signal });
      await eventually(() => held.length === 1, 'the running request at the origin');
      const reason = new Error('the caller gave up');
      controller.abort(reason);
      const aborted = { code: 'SOCKPOOL_ERR_ABORTED', message: 'request aborted: the caller gave up', cause: reason };
      await expect(running).rejects.toMatchObject(aborted);
      await expect(waiting).rejects.toMatchObject(aborted);
      // The slot is free again, and nothing but the first request and this one reached the origin.
      expect((await client.request(`${url}/after`)).body.toString()).toBe('/after');
      await client.close();
      expect(holdingSaw).toEqual(['/hold', '/after']);
    });
  }
});

describe('a signal that is not an AbortSignal', () => {
  it('is refused before the request enters the queue, leaving no slot and no deadline behind', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, inlineWhenIdle: false });
    const url = `http://127.0.0.1:${origin.port}/`;
    const notASignal = { aborted: false } as unknown as AbortSignal;
    for (const call of [
      () => client.request(url, { signal: notASignal, timeoutMs: 200 }),
      () => client.requestStream(url, { signal: notASignal, timeoutMs: 200 }),
      () => client.fetch(url, { signal: notASignal }),
    ]) {
      await expect(call()).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    }
    // Requests waiting on the lane past the refused one's deadline are untouched by it.
    const later = await Promise.all(
      Array.from({ length: 3 }, (_, i) =>
        new Promise((resolve) => setTimeout(resolve, 300)).then(() => client.request(`${url}${i}`)),
      ),
    );
    expect(later.map((response) => response.body.toString())).toEqual(['GET /0 0', 'GET /1 0', 'GET /2 0']);
    await client.close();
  });
});

describe('maxQueued', () => {
  it('a request that would wait while maxQueued already wait fails at once with SOCKPOOL_ERR_LIMIT; the others run', async () => {
    const client = new SockpoolClient({
      socketPath: daemon.socketPath,
      threads: 0,
      concurrencyPerThread: 1,
      maxQueued: 1,
    });
    const url = `http://127.0.0.1:${origin.port}/`;
    const running = client.request(`${url}a`);
    const waiting = client.request(`${url}b`);
    // One runs, one waits: a third (of any kind) has no room, and fails without being sent.
    for (const call of [
      () => client.request(`${url}c`),
      () => client.requestStream(`${url}c`),
      () => client.fetch(`${url}c`),
    ]) {
      await expect(call()).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_LIMIT', maxQueued: 1 });
    }
    expect((await running).body.toString()).toBe('GET /a 0');
    expect((await waiting).body.toString()).toBe('GET /b 0');
    // Room again once the queue is empty.
    const more = [client.request(`${url}d`), client.request(`${url}e`)];
    expect((await Promise.all(more)).map((response) => response.body.toString())).toEqual(['GET /d 0', 'GET /e 0']);
    await client.close();
  });

  it.each([
    ['a worker thread', { threads: 1, inlineWhenIdle: false }],
    ['threads: 0', { threads: 0 }],
  ] as const)(
    'does not refuse a redirect chain its next hop: the chain was let in and waited its turn (%s)',
    async (_name, mode) => {
      // On a worker thread the hop before still holds its slot when the next enters (its outcome not back yet): with
      // another request waiting, every chain failed at its second hop with SOCKPOOL_ERR_LIMIT.
      const redirecting = await httpOrigin((request, response) => {
        if (request.url === '/redirect') {
          response.writeHead(302, { location: '/final' });
          response.end();
        } else setTimeout(() => response.end(request.url), request.url === '/slow' ? 100 : 0);
      });
      const sockpoold = await startTestDaemon([redirecting.port]);
      const client = new SockpoolClient({
        socketPath: sockpoold.socketPath,
        concurrencyPerThread: 1,
        maxQueued: 1,
        ...mode,
      });
      const url = (path: string) => `http://127.0.0.1:${redirecting.port}${path}`;
      try {
        const outcomes: string[] = [];
        for (let round = 0; round < 3; round++) {
          const settled = await Promise.allSettled([
            client.request(url('/redirect'), { redirect: 'follow' }),
            client.request(url('/slow')),
          ]);
          for (const each of settled) {
            outcomes.push(
              each.status === 'fulfilled' ? each.value.body.toString() : (each.reason as { code: string }).code,
            );
          }
        }
        expect(outcomes).toEqual(['/final', '/slow', '/final', '/slow', '/final', '/slow']);
      } finally {
        await client.close();
        await sockpoold.stop();
        await redirecting.close();
      }
    },
  );

  it('is a whole number >= 0 or Infinity (the default: no bound)', () => {
    for (const maxQueued of [-1, 1.5, Number.NaN, '8']) {
      expect(() => new SockpoolClient({ socketPath: daemon.socketPath, maxQueued: maxQueued as number })).toThrow(
        expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }),
      );
    }
  });
});
