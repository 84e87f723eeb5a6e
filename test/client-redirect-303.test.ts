// A 303 answering a request with a streamed body (a ReadableStream or an AsyncIterable, read once as it was sent):
// the next hop is a GET without a body and without the headers that described it, as the Fetch standard says
// (303: GET, body dropped, content headers dropped). Suspected (NOTES.md, "seen, not reproduced"): the streamed body,
// already read, kept for the next hop, which would then go out with an empty chunked body. Checked against a real
// loopback origin that records what each hop receives (method, headers, body), for fetch() and for request() and
// requestStream() with redirect: 'follow', with a worker thread and with `threads: 0`, and against Node's own fetch.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

interface Received {
  method: string;
  path: string;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

let origin: Origin;
let daemon: DaemonProcess;
/** What the origin received, hop by hop, since the test last emptied it. */
const received: Received[] = [];

function handler(request: IncomingMessage, response: ServerResponse): void {
  const chunks: Buffer[] = [];
  request.on('data', (chunk: Buffer) => chunks.push(chunk));
  request.on('end', () => {
    const path = request.url ?? '/';
    received.push({
      method: request.method ?? '',
      path,
      headers: request.headers,
      body: Buffer.concat(chunks).toString(),
    });
    if (path === '/r303') {
      response.writeHead(303, { location: '/target' });
      response.end('see other');
      return;
    }
    response.end('done');
  });
}

beforeAll(async () => {
  origin = await httpOrigin(handler);
  daemon = await startTestDaemon([origin.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
});

const url = (path: string) => `http://127.0.0.1:${origin.port}${path}`;

function readableStream(text: string): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(new TextEncoder().encode(text));
      controller.close();
    },
  });
}

async function* asyncIterable(text: string): AsyncGenerator<Uint8Array> {
  yield new TextEncoder().encode(text);
}

/** The two hops the origin received for one request to /r303: the first with the streamed body, the second as it
 *  must be (a GET, nothing of the body or its headers), the rest of the headers kept. */
function expectSeeOther(method: string, withLength = false): void {
  expect(received.map(({ method, path }) => `${method} ${path}`)).toEqual([`${method} /r303`, 'GET /target']);
  const [first, second] = received as [Received, Received];
  expect(first.body).toBe('streamed');
  expect(first.headers['content-type']).toBe('text/plain');
  if (withLength) expect(first.headers['content-length']).toBe('8');
  else expect(first.headers['transfer-encoding']).toBe('chunked');
  expect(second.body).toBe('');
  expect(
    {
      'content-type': second.headers['content-type'],
      'content-length': second.headers['content-length'],
      'transfer-encoding': second.headers['transfer-encoding'],
    },
    `the hop after a 303 of a ${method}`,
  ).toEqual({ 'content-type': undefined, 'content-length': undefined, 'transfer-encoding': undefined });
  expect(second.headers['x-kept']).toBe('yes');
}

const headers = { 'content-type': 'text/plain', 'x-kept': 'yes' };

it('Node’s own fetch: a POST with a streamed body, answered 303, is followed by a GET without body or content headers', async () => {
  received.length = 0;
  const response = await fetch(url('/r303'), {
    method: 'POST',
    body: readableStream('streamed'),
    headers,
    duplex: 'half',
  } as RequestInit);
  expect(await response.text()).toBe('done');
  expectSeeOther('POST');
});

describe.each([
  { threads: 1, label: 'a worker thread' },
  { threads: 0, label: 'threads: 0' },
])('a 303 of a request with a streamed body, with $label', ({ threads }) => {
  let client: SockpoolClient;

  beforeAll(() => {
    client = new SockpoolClient({ socketPath: daemon.socketPath, threads });
  });

  afterAll(async () => {
    await client?.close();
  });

  it('fetch(): a POST, PUT or GET with a ReadableStream or AsyncIterable body is followed by a GET without body or content headers', async () => {
    for (const method of ['POST', 'PUT', 'GET']) {
      for (const body of [readableStream('streamed'), asyncIterable('streamed')]) {
        received.length = 0;
        const response = await client.fetch(url('/r303'), { method, body, headers, duplex: 'half' } as RequestInit);
        expect(response.redirected).toBe(true);
        expect(await response.text()).toBe('done');
        expectSeeOther(method);
      }
    }
    // With the length given, the hop after the 303 does not say it either.
    received.length = 0;
    const sized = await client.fetch(url('/r303'), {
      method: 'POST',
      body: readableStream('streamed'),
      headers: { ...headers, 'content-length': '8' },
      duplex: 'half',
    } as RequestInit);
    expect(await sized.text()).toBe('done');
    expectSeeOther('POST', true);
  });

  it("request() and requestStream() with redirect: 'follow': a POST or GET with a streamed body is followed by a GET without body or content headers", async () => {
    for (const method of ['POST', 'GET']) {
      for (const body of [readableStream('streamed'), asyncIterable('streamed')]) {
        received.length = 0;
        const response = await client.request(url('/r303'), { method, body, headers, redirect: 'follow' });
        expect(response).toMatchObject({ status: 200, redirected: true, url: url('/target') });
        expect(response.body.toString()).toBe('done');
        expectSeeOther(method);
      }
      received.length = 0;
      const streamed = await client.requestStream(url('/r303'), {
        method,
        body: readableStream('streamed'),
        headers,
        redirect: 'follow',
      });
      expect(await new Response(streamed.body).text()).toBe('done');
      expectSeeOther(method);
    }
  });
});
