// `maxBodyBytes`: a response body larger than the limit (counted after decoding, so a small compressed body that
// decodes into a large one counts at its decoded size) stops its transfer there and fails with
// SOCKPOOL_ERR_BODY_TOO_LARGE: request() before any body is returned, requestStream() and fetch() through the body
// stream. A body of exactly the limit passes. Against a real daemon and a real origin, on a worker thread's lane and
// with threads: 0; an endless body shows the transfer is stopped, not read to its end; nothing is left open.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { gzipSync, zstdCompressSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { eventually, fdCount, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

const SIZE = 100_000;
const body = Buffer.alloc(SIZE, 'a');
/** The response window of a streamed body (worker/stream-protocol.ts RESPONSE_WINDOW), and a little more. */
const WINDOW = 1024 * 1024;
const PAST_WINDOW = WINDOW + 100;
/** 1 MiB of one byte: gzip makes it about a thousandth of that. */
const bomb = gzipSync(Buffer.alloc(1 << 20, 'b'));

/** 128 MiB of zeros in about 4 KB: two zstd frames of 64 MiB each, all of it inside one of curl's reads. */
const zstdBomb = (() => {
  const frame = zstdCompressSync(Buffer.alloc(64 << 20));
  return Buffer.concat([frame, frame]);
})();
/** Connections that carried a zstd bomb and have closed (only the client closes them: keep-alive). */
let zstdBombsClosed = 0;

let origin: Origin;
let daemon: DaemonProcess;
/** Endless responses begun, and the bytes each wrote before its connection closed. */
let endlessStarted = 0;
const endlessWritten: number[] = [];
let clients: Array<[string, SockpoolClient]>;

function handler(request: IncomingMessage, response: ServerResponse): void {
  switch (request.url) {
    case '/exact':
      response.writeHead(200, { 'content-length': String(SIZE) });
      response.end(body);
      return;
    case '/window':
      // The whole response window at once, the rest a moment later: it reaches curl while the caller has read
      // nothing, so the sink refuses it, and curl offers it again when the caller reads (from Easy.pause()).
      response.writeHead(200, { 'content-length': String(PAST_WINDOW) });
      response.write(Buffer.alloc(WINDOW, 'w'));
      setTimeout(() => response.end(Buffer.alloc(PAST_WINDOW - WINDOW, 'x')), 200);
      return;
    case '/large':
      response.writeHead(200, { 'content-length': String(4 * WINDOW) });
      response.end(Buffer.alloc(4 * WINDOW, 'l'));
      return;
    case '/moved': {
      // A redirect with a page of its own, larger than the limits below ("Moved: click here").
      const page = Buffer.alloc(20_000, 'r');
      response.writeHead(302, { location: '/exact', 'content-length': String(page.length) });
      response.end(page);
      return;
    }
    case '/bomb':
      response.writeHead(200, { 'content-encoding': 'gzip', 'content-length': String(bomb.length) });
      response.end(bomb);
      return;
    case '/zstd-bomb':
      request.socket.once('close', () => zstdBombsClosed++);
      response.writeHead(200, { 'content-encoding': 'zstd', 'content-length': String(zstdBomb.length) });
      response.end(zstdBomb);
      return;
    case '/endless': {
      // Chunked, never ending: only the client stopping the transfer (closing its connection) ends it.
      endlessStarted++;
      response.writeHead(200);
      const chunk = Buffer.alloc(64 * 1024, 'e');
      let written = 0;
      const pump = () => {
        while (!response.destroyed && written < 1 << 30) {
          written += chunk.length;
          if (!response.write(chunk)) return void response.once('drain', pump);
        }
      };
      response.on('close', () => endlessWritten.push(written));
      pump();
      return;
    }
    default:
      response.end('small');
  }
}

beforeAll(async () => {
  origin = await httpOrigin(handler);
  daemon = await startTestDaemon([origin.port]);
  clients = [
    ['a worker thread', new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, inlineWhenIdle: false })],
    ['threads: 0', new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 })],
  ];
  // The thread up before anything is counted (its curl Multi holds a socketpair).
  for (const [, client] of clients) await client.stats();
});

afterAll(async () => {
  for (const [, client] of clients ?? []) await client.close();
  await daemon?.stop();
  await origin?.close();
});

const url = (path: string) => `http://127.0.0.1:${origin.port}${path}`;
const tooLarge = (limit: number) => ({ code: 'SOCKPOOL_ERR_BODY_TOO_LARGE', fields: { maxBodyBytes: limit } });

describe('maxBodyBytes', () => {
  it('lets a body of exactly the limit through and fails one byte over, with a typed error', async () => {
    for (const [, client] of clients) {
      expect((await client.request(url('/exact'), { maxBodyBytes: SIZE })).body.length).toBe(SIZE);
      await expect(client.request(url('/exact'), { maxBodyBytes: SIZE - 1 })).rejects.toMatchObject(tooLarge(SIZE - 1));
      const error = await client.request(url('/exact'), { maxBodyBytes: 10 }).catch((e: Error) => e);
      expect((error as Error).message).toContain('larger than maxBodyBytes (10 bytes)');
      // The next request on the same client is served (a connection of its own: the stopped one was closed).
      expect((await client.request(url('/small'), { maxBodyBytes: 5 })).body.toString()).toBe('small');
    }
  });

  it('counts the decoded size: a small gzip body that decodes to 1 MiB fails, its compressed bytes pass', async () => {
    for (const [, client] of clients) {
      const limit = 64 * 1024;
      expect(bomb.length).toBeLessThan(limit);
      await expect(client.request(url('/bomb'), { decompress: true, maxBodyBytes: limit })).rejects.toMatchObject(
        tooLarge(limit),
      );
      const packed = await client.request(url('/bomb'), { maxBodyBytes: limit });
      expect(packed.body.length).toBe(bomb.length);
    }
  });

  it('stops an endless body near the limit instead of reading it', async () => {
    for (const [, client] of clients) {
      const before = endlessWritten.length;
      await expect(client.request(url('/endless'), { maxBodyBytes: 1 << 20 })).rejects.toMatchObject(tooLarge(1 << 20));
      // The origin saw its connection closed (the transfer was stopped), long before its 1 GiB.
      await eventually(() => endlessWritten.length > before, 'the endless response closed');
      expect(endlessWritten.at(-1)).toBeLessThan(256 << 20);
    }
  });

  it('fails a streamed body after its head, for requestStream() and fetch()', async () => {
    for (const [, client] of clients) {
      const streamed = await client.requestStream(url('/endless'), { maxBodyBytes: 200_000 });
      expect(streamed.status).toBe(200);
      await expect(new Response(streamed.body).arrayBuffer()).rejects.toMatchObject(tooLarge(200_000));
    }
    const limited = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, maxBodyBytes: 50_000 });
    try {
      const response = await limited.fetch(url('/exact'));
      expect(response.status).toBe(200);
      const failure = await response.arrayBuffer().catch((error: unknown) => error);
      // The body stream fails with the typed error (Response may wrap it as its cause).
      const typed = (failure as { cause?: unknown }).cause ?? failure;
      expect(typed).toMatchObject(tooLarge(50_000));
      // A request's own limit overrides the client's.
      expect((await limited.request(url('/exact'), { maxBodyBytes: Number.POSITIVE_INFINITY })).body.length).toBe(SIZE);
      await expect(limited.request(url('/exact'))).rejects.toMatchObject(tooLarge(50_000));
    } finally {
      await limited.close();
    }
  });

  it('counts a chunk curl offers again after a pause once: a streamed body of exactly the limit, read late or slowly, arrives whole', async () => {
    for (const [, client] of clients) {
      // Read late: the chunk past the window is refused, then offered again from Easy.pause() (a failure there
      // used to leave the transfer stalled until its timeout).
      const late = await client.requestStream(url('/window'), { maxBodyBytes: PAST_WINDOW, timeoutMs: 10_000 });
      await sleep(500);
      expect((await new Response(late.body).arrayBuffer()).byteLength).toBe(PAST_WINDOW);
      // Read slowly: curl pauses again and again.
      const slow = await client.requestStream(url('/large'), { maxBodyBytes: 4 * WINDOW, timeoutMs: 20_000 });
      let bytes = 0;
      for await (const chunk of slow.body) {
        bytes += chunk.byteLength;
        await sleep(2);
      }
      expect(bytes).toBe(4 * WINDOW);
      // One byte less, read late: fails with the typed error (not a timeout), when the chunk is offered again.
      const over = await client.requestStream(url('/window'), { maxBodyBytes: PAST_WINDOW - 1, timeoutMs: 10_000 });
      await sleep(500);
      await expect(new Response(over.body).arrayBuffer()).rejects.toMatchObject(tooLarge(PAST_WINDOW - 1));
    }
  });

  it("fails a paused stream whose compressed body outgrows curl's pause buffer with the typed error, not curl's out of memory", async () => {
    for (const [where, client] of clients) {
      const closed = zstdBombsClosed;
      const streamed = await client.requestStream(url('/zstd-bomb'), {
        decompress: true,
        maxBodyBytes: 8 << 20,
        timeoutMs: 20_000,
      });
      // Nothing read: the response window fills and curl pauses, decoding the rest of its read into its pause
      // buffer (64 MiB in curl 7.88) where WRITEFUNCTION never counts it, until that overflows and curl ends the
      // transfer (CURLE_OUT_OF_MEMORY) and closes its connection.
      await eventually(() => zstdBombsClosed > closed, `${where}: the bomb's connection closed`);
      await expect(new Response(streamed.body).arrayBuffer(), where).rejects.toMatchObject(tooLarge(8 << 20));
    }
  });

  it("bounds the body the caller gets, not a redirect's: followed by request(), requestStream() and fetch()", async () => {
    const limited = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, maxBodyBytes: SIZE });
    try {
      for (const [, client] of [...clients, ['limited', limited] as const]) {
        const followed = await client.request(url('/moved'), { redirect: 'follow', maxBodyBytes: SIZE });
        expect(followed).toMatchObject({ status: 200, redirected: true });
        expect(followed.body.length).toBe(SIZE);
        const streamed = await client.requestStream(url('/moved'), { redirect: 'follow', maxBodyBytes: SIZE });
        expect((await new Response(streamed.body).arrayBuffer()).byteLength).toBe(SIZE);
        // The final body over the limit still fails, through a followed redirect too.
        await expect(
          client.request(url('/moved'), { redirect: 'follow', maxBodyBytes: SIZE - 1 }),
        ).rejects.toMatchObject(tooLarge(SIZE - 1));
      }
      expect((await (await limited.fetch(url('/moved'))).arrayBuffer()).byteLength).toBe(SIZE);
    } finally {
      await limited.close();
    }
  });

  it('rejects a limit that is not a whole number of bytes', async () => {
    const [, client] = clients[0]!;
    for (const bad of [-1, 1.5, Number.NaN, '100', null]) {
      await expect(client.request(url('/small'), { maxBodyBytes: bad as number })).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
        message: expect.stringContaining('maxBodyBytes'),
      });
      expect(() => new SockpoolClient({ socketPath: daemon.socketPath, maxBodyBytes: bad as number })).toThrow(
        /maxBodyBytes/,
      );
    }
  });

  it('leaves no fd open once the client is closed', async () => {
    const clientFds = () => fdCount() - origin.openSockets();
    // Every endless response of the tests before has closed (a socket the origin still counts until its 'close'
    // event would hide one of the client's).
    await eventually(() => endlessWritten.length === endlessStarted, 'the endless responses closed');
    const before = clientFds();
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, maxBodyBytes: 1000 });
    await expect(own.request(url('/endless'))).rejects.toMatchObject(tooLarge(1000));
    await expect(own.request(url('/bomb'), { decompress: true })).rejects.toMatchObject(tooLarge(1000));
    const streamed = await own.requestStream(url('/exact'));
    await expect(new Response(streamed.body).arrayBuffer()).rejects.toMatchObject(tooLarge(1000));
    await own.close();
    await eventually(() => clientFds() <= before, `client fds back to ${before} (now ${clientFds()})`);
  });
});
