// Compressed bodies (`decompress`, and fetch() always): curl asks for the codings it decodes and decodes them, on
// a worker thread's lane and in the caller's thread alike, buffered and streamed; the response's headers stay as the
// server sent them. Without it nothing is asked and the body is the server's bytes. A real origin that compresses
// only what the request accepted.
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { type AddressInfo, createServer, type Server } from 'node:net';
import { brotliCompressSync, constants, deflateRawSync, deflateSync, gzipSync, zstdCompressSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

const CODERS: Record<string, (data: Buffer) => Buffer> = {
  gzip: gzipSync,
  deflate: deflateSync,
  br: brotliCompressSync,
  zstd: zstdCompressSync,
};
/** Codings for stacks: `raw` is raw deflate (no zlib header) sent as deflate, as some servers send it;
 *  `identity` is nothing. */
const STACKABLE: Record<string, (data: Buffer) => Buffer> = {
  raw: deflateRawSync,
  identity: (data) => data,
  // zstd whose frame asks for a 32 MiB window (over 8 MiB of input makes zstd keep the window it is given).
  wide: (data) =>
    zstdCompressSync(Buffer.concat(Array.from({ length: 48 }, () => data)), {
      params: { [constants.ZSTD_c_windowLog]: 25 },
    }),
};
const SENT_AS: Record<string, string> = { raw: 'deflate', wide: 'zstd' };
/** 256 KiB that compress well but not to nothing: a line repeated with its number. */
const plain = Buffer.from(Array.from({ length: 6_000 }, (_, i) => `line ${i} of a compressible body\n`).join(''));
const plainHash = createHash('sha256').update(plain).digest('hex');
const sha256 = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

let origin: Origin;
/** Answers `GET /te?coding=X` with the body compressed in X as a transfer coding (`Transfer-Encoding: X, chunked`),
 *  which no request asks for (curl sends no TE): a hostile or broken origin. Node's http cannot send that. */
let teOrigin: Server;
/** Requests answered with a forced Content-Encoding. */
let forcedRequests = 0;
let daemon: DaemonProcess;
/** On a worker thread's lane (every request goes there), and with threads: 0 (in this thread). */
let clients: Array<[string, SockpoolClient]>;

/** /coded?coding=X: the body in coding X if the request accepted X, else as is; says what Accept-Encoding came. */
function handler(request: IncomingMessage, response: ServerResponse): void {
  const url = new URL(request.url ?? '/', 'http://origin.test');
  const coding = url.searchParams.get('coding') ?? 'gzip';
  const accepted = request.headers['accept-encoding'] ?? '';
  const headers: Record<string, string> = { 'x-seen-accept-encoding': String(accepted || '(none)') };
  let body: Buffer<ArrayBufferLike> = plain;
  const forced = url.searchParams.get('force');
  const stack = url.searchParams.get('stack');
  if (stack) {
    // Codings applied in the order named (the last one named is undone first), or a body that is not what it says.
    const codings = stack.split(',');
    body = plain;
    for (const coding of codings) body = (STACKABLE[coding] ?? CODERS[coding]!)(body);
    if (url.searchParams.has('corrupt')) body = Buffer.concat([body.subarray(0, 20), Buffer.alloc(64, 0xff)]);
    headers['content-encoding'] = codings.map((coding) => SENT_AS[coding] ?? coding).join(', ');
  } else if (forced) {
    forcedRequests++;
    headers['content-encoding'] = forced;
  } else if (
    String(accepted)
      .split(/\s*,\s*/)
      .includes(coding)
  ) {
    body = CODERS[coding]!(plain);
    headers['content-encoding'] = coding;
  }
  headers['content-length'] = String(body.length);
  response.writeHead(200, headers);
  response.end(body);
}

beforeAll(async () => {
  origin = await httpOrigin(handler);
  teOrigin = createServer((socket) => {
    socket.once('data', (data) => {
      const coding = /coding=(\w+)/.exec(data.toString('latin1'))?.[1] ?? 'gzip';
      const body = CODERS[coding]!(plain);
      const head = `HTTP/1.1 200 OK\r\nTransfer-Encoding: ${coding}, chunked\r\nConnection: close\r\n\r\n`;
      socket.end(
        Buffer.concat([Buffer.from(`${head}${body.length.toString(16)}\r\n`), body, Buffer.from('\r\n0\r\n\r\n')]),
      );
    });
    socket.on('error', () => {});
  });
  teOrigin.listen(0, '127.0.0.1');
  await once(teOrigin, 'listening');
  daemon = await startTestDaemon([origin.port, (teOrigin.address() as AddressInfo).port]);
  clients = [
    ['a worker thread', new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, inlineWhenIdle: false })],
    ['threads: 0', new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 })],
  ];
});

afterAll(async () => {
  for (const [, client] of clients ?? []) await client.close();
  await daemon?.stop();
  await origin?.close();
  teOrigin?.close();
});

const url = (coding: string) => `http://127.0.0.1:${origin.port}/coded?coding=${coding}`;
const header = (headers: Array<[string, string]>, name: string) => headers.find(([key]) => key === name)?.[1];

describe('compressed bodies', () => {
  it('are neither asked for nor decoded by default: request() gets the bytes as sent', async () => {
    for (const [, client] of clients) {
      const response = await client.request(url('gzip'));
      expect(header(response.headers, 'x-seen-accept-encoding')).toBe('(none)');
      expect(header(response.headers, 'content-encoding')).toBeUndefined();
      expect(sha256(response.body)).toBe(plainHash);
    }
  });

  it('with decompress: every coding curl decodes is asked for, and each comes back decoded', async () => {
    for (const [where, client] of clients) {
      for (const coding of Object.keys(CODERS)) {
        const response = await client.request(url(coding), { decompress: true });
        expect(header(response.headers, 'x-seen-accept-encoding'), where).toMatch(/gzip/);
        // The headers are the server's: the coding it used and the compressed length.
        expect(header(response.headers, 'content-encoding'), `${where} ${coding}`).toBe(coding);
        expect(Number(header(response.headers, 'content-length'))).toBeLessThan(plain.length);
        expect(sha256(response.body), `${where} ${coding}`).toBe(plainHash);
      }
    }
  });

  it('streams decoded bodies too (requestStream)', async () => {
    for (const [where, client] of clients) {
      const response = await client.requestStream(url('br'), { decompress: true });
      const hash = createHash('sha256');
      for await (const chunk of response.body) hash.update(chunk);
      expect(hash.digest('hex'), where).toBe(plainHash);
    }
  });

  it('fetch() always decodes, as Node’s fetch does, also under an Accept-Encoding of the caller’s', async () => {
    for (const [where, client] of clients) {
      const response = await client.fetch(url('zstd'));
      expect(response.headers.get('content-encoding'), where).toBe('zstd');
      expect(sha256(new Uint8Array(await response.arrayBuffer())), where).toBe(plainHash);
      const own = await client.fetch(url('gzip'), { headers: { 'accept-encoding': 'gzip' } });
      expect(own.headers.get('x-seen-accept-encoding'), where).toBe('gzip');
      expect(sha256(new Uint8Array(await own.arrayBuffer())), where).toBe(plainHash);
    }
  });

  it('fails a body in a coding curl cannot decode with SOCKPOOL_ERR_TRANSFER (curlCode 61); without decompress, and from fetch(), it is passed on', async () => {
    for (const [where, client] of clients) {
      const odd = `http://127.0.0.1:${origin.port}/coded?force=compress`;
      await expect(client.request(odd, { decompress: true }), where).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_TRANSFER',
        curlCode: 61,
      });
      const raw = await client.request(odd);
      expect(header(raw.headers, 'content-encoding')).toBe('compress');
      expect(sha256(raw.body)).toBe(plainHash);
      // fetch() hands such a body on as it came, as Node's fetch does: a GET is asked again without decoding...
      const fetched = await client.fetch(odd);
      expect(fetched.headers.get('content-encoding'), where).toBe('compress');
      expect(sha256(new Uint8Array(await fetched.arrayBuffer())), where).toBe(plainHash);
      // ... a HEAD has no body to decode: sent once...
      const before = forcedRequests;
      expect((await client.fetch(odd, { method: 'HEAD' })).status, where).toBe(200);
      expect(forcedRequests - before, where).toBe(1);
      // ... a POST is not sent twice: its body fails as curl failed it.
      const posted = await client.fetch(odd, { method: 'POST', body: 'once' });
      await expect(posted.arrayBuffer(), where).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 61 });
    }
  });

  it('undoes stacked codings last applied first, takes raw deflate as deflate, and fails a corrupt body, more than five codings or a zstd window over 8 MiB with curlCode 61', async () => {
    const stacked = (stack: string, extra = '') => `http://127.0.0.1:${origin.port}/coded?stack=${stack}${extra}`;
    for (const [where, client] of clients) {
      for (const stack of ['gzip,br', 'zstd,identity,deflate', 'raw', 'br,raw', 'gzip,gzip,gzip,gzip,gzip']) {
        const response = await client.request(stacked(stack), { decompress: true });
        expect(sha256(response.body), `${where} ${stack}`).toBe(plainHash);
        const streamed = await client.fetch(stacked(stack));
        expect(sha256(new Uint8Array(await streamed.arrayBuffer())), `${where} ${stack} fetch`).toBe(plainHash);
      }
      const failed = { code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 61 };
      for (const [stack, extra] of [
        ['gzip', '&corrupt'],
        ['zstd', '&corrupt'],
        ['gzip,br', '&corrupt'],
        ['gzip,gzip,gzip,gzip,gzip,gzip', ''],
        // A window over RFC 9659's 8 MiB: memory the origin would choose.
        ['wide', ''],
      ] as const) {
        await expect(
          client.request(stacked(stack, extra), { decompress: true }),
          `${where} ${stack}`,
        ).rejects.toMatchObject(failed);
        const streamed = client.requestStream(stacked(stack, extra), { decompress: true });
        await expect(
          streamed.then((response) => new Response(response.body).arrayBuffer()),
          `${where} ${stack} streamed`,
        ).rejects.toMatchObject(failed);
      }
      // Without decompress, the bytes as sent.
      const raw = await client.request(stacked('gzip,br'));
      expect(raw.body.length, where).toBeLessThan(plain.length);
    }
  });

  it('with decompress too, a body compressed in a Transfer-Encoding nobody asked for comes as sent, as Node’s fetch passes it', async () => {
    const port = (teOrigin.address() as AddressInfo).port;
    for (const [where, client] of clients) {
      const sent = CODERS.gzip!(plain);
      const response = await client.request(`http://127.0.0.1:${port}/te?coding=gzip`, { decompress: true });
      expect(header(response.headers, 'transfer-encoding'), where).toBe('gzip, chunked');
      expect(sha256(response.body), where).toBe(sha256(sent));
    }
  });

  it('without decompress, a body compressed in a Transfer-Encoding nobody asked for comes as sent, not decoded', async () => {
    // (curl 7.88 decoded such a body whatever ACCEPT_ENCODING said: a hostile origin chose decoding, and a bomb, for
    // a caller who turned it off. Node's fetch does not decode a transfer coding either.)
    const port = (teOrigin.address() as AddressInfo).port;
    for (const [where, client] of clients) {
      for (const coding of ['gzip', 'deflate']) {
        const sent = CODERS[coding]!(plain);
        const response = await client.request(`http://127.0.0.1:${port}/te?coding=${coding}`);
        expect(header(response.headers, 'transfer-encoding'), where).toBe(`${coding}, chunked`);
        expect(sha256(response.body), `${where} ${coding}`).toBe(sha256(sent));
      }
    }
  });

  it('refuses a decompress that is not a boolean with SOCKPOOL_ERR_INVALID_ARGUMENT', async () => {
    const [, client] = clients[0]!;
    await expect(client.request(url('gzip'), { decompress: 'yes' as unknown as boolean })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      message: 'decompress must be a boolean',
    });
  });
});
