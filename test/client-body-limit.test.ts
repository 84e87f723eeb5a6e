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
import { eventually, fdCount, httpOrigin, type Origin, rss, startTestDaemon } from './fixtures/client-helpers.js';
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
/** 1 MiB of hex text (compresses about in half) as one gzip member: /gzip-endless sends it again and again. */
const hexText = (() => {
  const bytes = Buffer.alloc(512 * 1024);
  let state = 1;
  for (let i = 0; i < bytes.length; i++) {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    bytes[i] = state >>> 24;
  }
  return Buffer.from(bytes.toString('hex'));
})();
const hexMember = gzipSync(hexText);
/** Coded bytes /gzip-endless has written so far (its latest response), and whether its connection closed. */
let endlessCoded = 0;
let endlessCodedClosed = false;
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
    case '/gzip-long':
      // Four gzip members of the hex text: longer coded than a buffered body is kept to be decoded whole.
      response.writeHead(200, { 'content-encoding': 'gzip', 'content-length': String(4 * hexMember.length) });
      response.end(Buffer.concat([hexMember, hexMember, hexMember, hexMember]));
      return;
    case '/gzip-endless': {
      // A compressed body that never ends, written as fast as the client takes it.
      endlessCoded = 0;
      endlessCodedClosed = false;
      response.writeHead(200, { 'content-encoding': 'gzip' });
      const pump = () => {
        while (!response.destroyed && endlessCoded < 1 << 30) {
          endlessCoded += hexMember.length;
          if (!response.write(hexMember)) return void response.once('drain', pump);
        }
      };
      response.on('close', () => {
        endlessCodedClosed = true;
      });
      pump();
      return;
    }
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
      // Any limit, however large, is a bound the decoder takes (node:zlib refuses one past a Buffer's largest).
      const huge = await client.request(url('/bomb'), { decompress: true, maxBodyBytes: Number.MAX_SAFE_INTEGER });
      expect(huge.body.length).toBe(1 << 20);
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

  it('holds a paused stream of a compression bomb to a few MiB: curl pauses, nothing decodes ahead of the reader, and the body read later is whole', async () => {
    // Two unread streams of a 128 MiB zstd bomb (4 KB on the wire) on each client. curl 7.88 decoded the rest of
    // each read into its pause buffer after WRITEFUNCTION paused, uncounted, up to 64 MiB a stream before failing
    // it (CURLE_OUT_OF_MEMORY); decoded by us, each holds its response window and a decoder's buffers.
    const closed = zstdBombsClosed;
    const before = rss();
    let peak = before;
    const streams = [];
    for (const [, client] of clients) {
      for (let i = 0; i < 2; i++) {
        streams.push(await client.requestStream(url('/zstd-bomb'), { decompress: true, timeoutMs: 30_000 }));
      }
    }
    // Time for whatever would decode ahead of the reader to do so (not a timing assertion: nothing should happen).
    for (let i = 0; i < 50; i++) {
      await sleep(20);
      peak = Math.max(peak, rss());
    }
    expect(zstdBombsClosed, 'no bomb failed while paused').toBe(closed);
    expect(peak - before, 'memory held by four paused bombs').toBeLessThan(40 << 20);
    // Read later, one arrives whole (not failed by an overflow while paused); the others are cancelled.
    let bytes = 0;
    for await (const chunk of streams[0]!.body) bytes += chunk.byteLength;
    expect(bytes).toBe(128 << 20);
    for (const streamed of streams.slice(1)) await streamed.body.cancel();
  });

  it('ends a compressed stream curl has finished but the reader has not read at its deadline, and the client closes', async () => {
    // The whole bomb is in curl's first read: curl's transfer is over, the decoding is not (it waits for the reader).
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, inlineWhenIdle: false });
    // The thread started and the origin's connection made first: the short deadline below is for the reader, not for
    // a thread starting on a loaded machine (a clean-clone CI run beside other work timed out at the head).
    expect((await own.request(url('/exact'))).status).toBe(200);
    const streamed = await own.requestStream(url('/zstd-bomb'), { decompress: true, timeoutMs: 1000 });
    await sleep(1500);
    await expect(new Response(streamed.body).arrayBuffer()).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_TIMEOUT' });
    // The worker's transfer ended too: close() waits for every transfer there.
    await own.close();
  });

  it('pauses curl when a compressed stream is not read: the decoder stops taking coded bytes, and the origin is held back', async () => {
    for (const [where, client] of clients) {
      const before = rss();
      const streamed = await client.requestStream(url('/gzip-endless'), { decompress: true, timeoutMs: 30_000 });
      // Unread for a while (time for the origin to write all it can: not a timing assertion).
      let peak = before;
      for (let i = 0; i < 50; i++) {
        await sleep(20);
        peak = Math.max(peak, rss());
      }
      // Held back by the response window, the decoder's buffers and the sockets' buffers: a few MiB, not the 1 GiB
      // the origin would write to a reader that keeps up.
      expect(endlessCoded, where).toBeLessThan(48 << 20);
      expect(peak - before, where).toBeLessThan(48 << 20);
      // Read on, the decoded body is the origin's text, member after member.
      const reader = streamed.body.getReader();
      const got: Uint8Array[] = [];
      let bytes = 0;
      while (bytes < 3 * hexText.length) {
        const { value } = await reader.read();
        got.push(value!);
        bytes += value!.byteLength;
      }
      const text = Buffer.concat(got);
      for (let i = 0; i < 3; i++) {
        expect(text.subarray(i * hexText.length, (i + 1) * hexText.length).equals(hexText), where).toBe(true);
      }
      await reader.cancel();
      await eventually(() => endlessCodedClosed, `${where}: the endless compressed response closed`);
    }
  });

  it('decodes a long buffered compressed body as it comes, and counts it decoded', async () => {
    // (A short one is decoded whole at its end; past 256 KiB coded the decoder streams take over from there.)
    expect(4 * hexMember.length).toBeGreaterThan(256 * 1024);
    for (const [where, client] of clients) {
      const response = await client.request(url('/gzip-long'), { decompress: true, maxBodyBytes: 4 * hexText.length });
      expect(response.body.equals(Buffer.concat([hexText, hexText, hexText, hexText])), where).toBe(true);
      await expect(
        client.request(url('/gzip-long'), { decompress: true, maxBodyBytes: 4 * hexText.length - 1 }),
        where,
      ).rejects.toMatchObject(tooLarge(4 * hexText.length - 1));
    }
  });

  it('counts decoded bytes against maxBodyBytes: a zstd bomb fails at the limit, buffered, or streamed and read late', async () => {
    for (const [where, client] of clients) {
      await expect(
        client.request(url('/zstd-bomb'), { decompress: true, maxBodyBytes: 8 << 20 }),
        where,
      ).rejects.toMatchObject(tooLarge(8 << 20));
      const streamed = await client.requestStream(url('/zstd-bomb'), {
        decompress: true,
        maxBodyBytes: 8 << 20,
        timeoutMs: 20_000,
      });
      await sleep(200);
      let bytes = 0;
      const failure = await (async () => {
        for await (const chunk of streamed.body) bytes += chunk.byteLength;
      })().catch((error: unknown) => error);
      expect(failure, where).toMatchObject(tooLarge(8 << 20));
      // The reader got up to the limit, never past it.
      expect(bytes, where).toBeLessThanOrEqual(8 << 20);
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
