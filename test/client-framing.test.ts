// What the client lets through to the wire as a request's framing and headers, against a real daemon and origin,
// on a worker thread and with threads: 0. A content-length must say what is sent: one that does not match a whole
// body (or a non-zero one without a body, or two of them), and any transfer-encoding, are refused with
// SOCKPOOL_ERR_INVALID_ARGUMENT before anything is sent. Sent as given, `content-length: 0` with a body made the
// origin read the body as a request of its own on the kept-alive connection, and the next request there got its
// answer. A header with an empty value is sent empty: curl reads "Name:" as "do not send Name", which also dropped
// curl's own Accept. A request with a body carries no content-type the caller did not give (curl's own form type
// is taken out, as Node's fetch sends none for bytes or a stream).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let origin: Origin;
let daemon: DaemonProcess;
/** Every request the origin read: its path, body size and headers. */
const seen: Array<{ url: string; bytes: number; headers: Record<string, unknown> }> = [];

beforeAll(async () => {
  origin = await httpOrigin((request, response) => {
    let bytes = 0;
    request.on('data', (chunk: Buffer) => {
      bytes += chunk.length;
    });
    request.on('end', () => {
      seen.push({ url: request.url ?? '', bytes, headers: request.headers });
      response.end(`${request.method} ${request.url} ${bytes}`);
    });
  });
  daemon = await startTestDaemon([origin.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
});

const modes = [
  ['a worker thread', { threads: 1, inlineWhenIdle: false }],
  ['threads: 0', { threads: 0 }],
] as const;

describe.each(modes)('request framing and headers (%s)', (_name, mode) => {
  it('refuses a content-length that does not say what is sent, before anything is sent; the connection stays in step', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    const url = (path: string) => `http://127.0.0.1:${origin.port}${path}`;
    const invalid = (message: string) => ({
      code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      message: expect.stringContaining(message),
    });
    try {
      const before = seen.length;
      // A request hidden in a body sent under content-length 0.
      const smuggle = 'GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n';
      await expect(
        client.request(url('/cl'), { method: 'POST', headers: { 'content-length': '0' }, body: smuggle }),
      ).rejects.toMatchObject(invalid(`content-length 0 does not match the body, ${smuggle.length} bytes`));
      await expect(
        client.request(url('/cl'), { method: 'POST', headers: { 'content-length': '3' }, body: 'four' }),
      ).rejects.toMatchObject(invalid('does not match'));
      await expect(client.request(url('/cl'), { headers: { 'content-length': '5' } })).rejects.toMatchObject(
        invalid('does not match the body, 0 bytes'),
      );
      await expect(
        client.request(url('/cl'), {
          method: 'POST',
          headers: [
            ['content-length', '4'],
            ['Content-Length', '4'],
          ],
          body: 'four',
        }),
      ).rejects.toMatchObject(invalid('more than one content-length'));
      await expect(
        client.request(url('/cl'), { method: 'POST', headers: { 'transfer-encoding': 'chunked' }, body: 'four' }),
      ).rejects.toMatchObject(invalid('transfer-encoding cannot be set'));
      // Nothing of those reached the origin; the next requests are answered in step.
      expect((await client.request(url('/next'))).body.toString()).toBe('GET /next 0');
      const matching = await client.request(url('/match'), {
        method: 'POST',
        headers: { 'content-length': '4' },
        body: 'four',
      });
      expect(matching.body.toString()).toBe('POST /match 4');
      expect(seen.slice(before).map((entry) => entry.url)).toEqual(['/next', '/match']);
    } finally {
      await client.close();
    }
  });

  it('holds a streamed body to its declared content-length: nothing past it is sent, and one that ends short fails at its end', async () => {
    // curl sends what it is given after the length it declared: the rest of a longer stream reached the origin as a
    // request of its own on the kept-alive connection (on a worker thread the next request got its answer), and a
    // shorter one left the origin waiting for the rest until the request's deadline.
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    const url = (path: string) => `http://127.0.0.1:${origin.port}${path}`;
    const streamOf = (...parts: string[]) =>
      new ReadableStream<Uint8Array>({
        start(controller) {
          for (const part of parts) controller.enqueue(new TextEncoder().encode(part));
          controller.close();
        },
      });
    try {
      const before = seen.length;
      const smuggle = 'GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n';
      await expect(
        client.request(url('/long'), {
          method: 'POST',
          headers: { 'content-length': '5' },
          body: streamOf('hello', smuggle),
        }),
      ).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_REQUEST_BODY',
        message: expect.stringContaining('longer than its content-length, 5 bytes'),
      });
      // (A deadline past the test's own: ending short fails at the body's end, not at it.)
      await expect(
        client.request(url('/short'), {
          method: 'POST',
          headers: { 'content-length': '100' },
          body: streamOf('hello'),
          timeoutMs: 120_000,
        }),
      ).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_REQUEST_BODY',
        message: expect.stringContaining("ended after 5 of its content-length's 100 bytes"),
      });
      expect((await client.request(url('/next'))).body.toString()).toBe('GET /next 0');
      const exact = await client.request(url('/exact'), {
        method: 'POST',
        headers: { 'content-length': '10' },
        body: streamOf('hello', 'world'),
      });
      expect(exact.body.toString()).toBe('POST /exact 10');
      expect(seen.slice(before).map((entry) => entry.url)).not.toContain('/smuggled');
      expect(seen.slice(before).map((entry) => entry.url)).toContain('/next');
    } finally {
      await client.close();
    }
  });

  it('sends a header with an empty value as an empty header, not dropped (nor curl’s own Accept with it)', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    try {
      const before = seen.length;
      await client.request(`http://127.0.0.1:${origin.port}/empty-header`, {
        headers: { 'x-empty': '', accept: '', 'x-spaces': '  ', 'x-kept': 'value' },
      });
      const headers = seen[before]!.headers;
      expect({
        xEmpty: headers['x-empty'],
        accept: headers.accept,
        xSpaces: headers['x-spaces'],
        xKept: headers['x-kept'],
      }).toEqual({ xEmpty: '', accept: '', xSpaces: '', xKept: 'value' });
    } finally {
      await client.close();
    }
  });

  it('sends no content-type the caller did not give (curl adds a form type to any request with a body)', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    const url = `http://127.0.0.1:${origin.port}/typed`;
    try {
      const before = seen.length;
      await client.request(url, { method: 'POST', body: Buffer.from('bytes') });
      await client.request(url, { method: 'PUT', body: 'text' });
      await client.request(url, {
        method: 'POST',
        body: new ReadableStream({
          start(controller) {
            controller.enqueue(new TextEncoder().encode('streamed'));
            controller.close();
          },
        }),
      });
      await client.request(url, { method: 'POST', body: 'a=1', headers: { 'content-type': 'application/x-test' } });
      // fetch() types what the Fetch standard types (a string body is text/plain), and nothing else.
      await client.fetch(url, { method: 'POST', body: 'text' });
      await client.fetch(url, { method: 'POST', body: new Uint8Array([1, 2, 3]) });
      expect(seen.slice(before).map((request) => [request.bytes, request.headers['content-type']])).toEqual([
        [5, undefined],
        [4, undefined],
        [8, undefined],
        [3, 'application/x-test'],
        [4, 'text/plain;charset=UTF-8'],
        [3, undefined],
      ]);
    } finally {
      await client.close();
    }
  });
});
