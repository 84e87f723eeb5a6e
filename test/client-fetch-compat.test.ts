// fetch() as a drop-in for Node's own fetch (undici): the same calls made with globalThis.fetch and client.fetch()
// against the same local origin give the same Response (status, statusText, url and redirected, also on a clone)
// and the origin sees the same request (framing headers included). A real daemon, real origins.
import { once } from 'node:events';
import type { IncomingMessage, ServerResponse } from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient, SockpoolError } from '../client/index.js';
import { httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let origin: Origin;
/** A port the daemon may connect to where nothing listens. */
let closedPort: number;
/** An origin that answers every request with a head a Response cannot hold (a header name with a space in it,
 *  which curl passes on), and half of its body: the rest never comes. Its connections, to see them closed. */
let badHead: net.Server;
const badHeadSockets = new Set<net.Socket>();
/** An origin that records each request's head as it came, request line and all (Node's HTTP parser refuses a
 *  method that is not an upper-case one it knows, such as `patch`), and answers each with a short body. */
let rawOrigin: net.Server;
const rawHeads: string[][] = [];
let daemon: DaemonProcess;
let client: SockpoolClient;
/** Requests /undecodable-slow got. */
let undecodableTries = 0;

interface Echo {
  method: string;
  headers: Record<string, string | undefined>;
  body: string;
}

function handler(request: IncomingMessage, response: ServerResponse): void {
  const chunks: Buffer[] = [];
  request.on('data', (chunk: Buffer) => chunks.push(chunk));
  request.on('end', () => {
    const url = new URL(request.url ?? '/', 'http://origin');
    if (url.pathname === '/status') {
      response.statusCode = Number(url.searchParams.get('code'));
      const message = url.searchParams.get('message');
      if (message !== null) response.statusMessage = message;
      response.end([204, 304].includes(response.statusCode) ? undefined : 'body');
      return;
    }
    if (url.pathname === '/undecodable-slow') {
      // A coding fetch() cannot decode (it asks again without decoding), each answer 600 ms late.
      undecodableTries++;
      setTimeout(() => {
        response.writeHead(200, { 'content-encoding': 'x-unknown' });
        response.end('coded');
      }, 600);
      return;
    }
    if (url.pathname === '/slow') {
      setTimeout(() => response.end('slow'), 2_000);
      return;
    }
    if (url.pathname === '/hang-up') {
      request.socket.destroy();
      return;
    }
    if (url.pathname === '/half') {
      response.writeHead(200, { 'content-length': '1000000' });
      response.write(Buffer.alloc(100_000));
      setTimeout(() => (url.searchParams.has('cut') ? request.socket.destroy() : response.end()), 300);
      return;
    }
    if (url.pathname === '/to-fragment') {
      response.writeHead(302, { location: '/echo#there' });
      response.end();
      return;
    }
    if (url.pathname === '/moved' || url.pathname === '/r307') {
      response.writeHead(url.pathname === '/r307' ? 307 : 302, { location: '/echo' });
      response.end('moved');
      return;
    }
    const echo: Echo = {
      method: request.method ?? '',
      headers: request.headers as Record<string, string>,
      body: Buffer.concat(chunks).toString(),
    };
    response.writeHead(200, { 'content-type': 'application/json' });
    response.end(JSON.stringify(echo));
  });
}

beforeAll(async () => {
  origin = await httpOrigin(handler);
  const closed = await httpOrigin(handler);
  closedPort = closed.port;
  await closed.close();
  badHead = net.createServer((socket) => {
    badHeadSockets.add(socket);
    socket.on('close', () => badHeadSockets.delete(socket));
    socket.on('error', () => {});
    socket.once('data', () => socket.write('HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 10\r\n\r\nhello'));
  });
  badHead.listen(0, '127.0.0.1');
  await once(badHead, 'listening');
  rawOrigin = net.createServer((socket) => {
    socket.on('error', () => {});
    let head = '';
    socket.on('data', (data: Buffer) => {
      head += data.toString('latin1');
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      rawHeads.push(head.slice(0, end).split('\r\n'));
      socket.end('HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok');
    });
  });
  rawOrigin.listen(0, '127.0.0.1');
  await once(rawOrigin, 'listening');
  daemon = await startTestDaemon([
    origin.port,
    closedPort,
    (badHead.address() as net.AddressInfo).port,
    (rawOrigin.address() as net.AddressInfo).port,
  ]);
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
});

afterAll(async () => {
  await client?.close();
  await daemon?.stop();
  await origin?.close();
  for (const socket of badHeadSockets) socket.destroy();
  badHead?.close();
  rawOrigin?.close();
});

const url = (path: string) => `http://127.0.0.1:${origin.port}${path}`;
const sockpoolFetch: typeof fetch = (input, init) => client.fetch(input as string | URL | Request, init);

/** What a caller sees of a response: everything but the body's own bytes. */
async function seen(response: Response) {
  return {
    status: response.status,
    statusText: response.statusText,
    ok: response.ok,
    url: response.url,
    redirected: response.redirected,
    nullBody: response.body === null,
    text: await response.text(),
  };
}

describe('fetch() answers as Node’s fetch does', () => {
  it('gives the status line’s reason phrase as statusText, and any status the origin sends (LinkedIn’s 999 too)', async () => {
    for (const path of [
      '/status?code=200',
      '/status?code=201',
      '/status?code=204',
      '/status?code=304',
      '/status?code=404',
      '/status?code=503',
      '/status?code=200&message=Fine%20Indeed',
      '/status?code=299&message=Odd',
      '/status?code=999&message=Request%20denied',
      '/status?code=600',
    ]) {
      const expected = await seen(await fetch(url(path)));
      expect(await seen(await client.fetch(url(path))), path).toEqual(expected);
    }
    // The same from a worker thread (the head crosses the thread's lane), not only from the caller's runtime.
    const threaded = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, inlineWhenIdle: false });
    try {
      const path = '/status?code=999&message=Request%20denied';
      expect(await seen(await threaded.fetch(url(path)))).toEqual(await seen(await fetch(url(path))));
    } finally {
      await threaded.close();
    }
  });

  it('gives the url without its fragment, as Node’s fetch does (the request’s, or a Location’s)', async () => {
    for (const path of ['/status?code=200#here', '/to-fragment', '/moved#here']) {
      const { text: _node, ...expected } = await seen(await fetch(url(path)));
      const { text: _ours, ...ours } = await seen(await client.fetch(url(path)));
      expect(ours, path).toEqual(expected);
      expect(expected.url).not.toContain('#');
    }
  });

  it('keeps url and redirected on a clone, as on the response itself', async () => {
    for (const f of [fetch, sockpoolFetch]) {
      const response = await f(url('/moved'));
      const copy = response.clone();
      // A clone of a clone too.
      const second = copy.clone();
      expect(copy).toMatchObject({ url: url('/echo'), redirected: true, statusText: 'OK' });
      expect(second).toMatchObject({ url: url('/echo'), redirected: true, statusText: 'OK' });
      expect(await seen(copy)).toEqual(await seen(response));
      await second.arrayBuffer();
    }
    const odd = await client.fetch(url('/status?code=999'));
    expect(odd.clone().status).toBe(999);
    await odd.arrayBuffer();
  });
});

describe('fetch() sends what Node’s fetch sends', () => {
  /** The request as the origin saw it: method, body and the headers that frame or describe it. */
  async function sent(f: typeof fetch, input: string | Request, init?: RequestInit) {
    const echo = (await (await f(input, init)).json()) as Echo;
    const { headers } = echo;
    return {
      method: echo.method,
      body: echo.body,
      'content-length': headers['content-length'],
      'transfer-encoding': headers['transfer-encoding'],
      'content-type': headers['content-type'],
      'user-agent': headers['user-agent'],
      'x-custom': headers['x-custom'],
    };
  }

  it('frames a POST or PUT without a body with content-length: 0 (servers may answer 411 without it)', async () => {
    for (const method of ['POST', 'PUT', 'GET', 'DELETE']) {
      expect(await sent(sockpoolFetch, url('/echo'), { method }), method).toEqual(
        await sent(fetch, url('/echo'), { method }),
      );
    }
  });

  it('frames a PATCH or QUERY without a body with content-length: 0 too, as Node’s fetch does (a lower-case patch not)', async () => {
    const rawUrl = `http://127.0.0.1:${(rawOrigin.address() as net.AddressInfo).port}/m`;
    const framing = async (f: typeof fetch, method: string) => {
      rawHeads.length = 0;
      await (await f(rawUrl, { method })).arrayBuffer();
      return rawHeads[0]!
        .filter((line) => /^(content-length|transfer-encoding):/i.test(line))
        .map((line) => line.toLowerCase());
    };
    for (const method of ['PATCH', 'QUERY', 'patch', 'query', 'PURGE']) {
      expect(await framing(sockpoolFetch, method), method).toEqual(await framing(fetch, method));
    }
    expect(await framing(sockpoolFetch, 'PATCH')).toEqual(['content-length: 0']);
  });

  it('normalizes only DELETE, GET, HEAD, OPTIONS, POST and PUT to upper case, as Node’s fetch does, and sends other methods as given', async () => {
    const rawUrl = `http://127.0.0.1:${(rawOrigin.address() as net.AddressInfo).port}/m`;
    /** The request line the origin received for a fetch of `method`. */
    const requestLine = async (f: typeof fetch, method: string) => {
      rawHeads.length = 0;
      await (await f(rawUrl, { method })).arrayBuffer();
      expect(rawHeads).toHaveLength(1);
      return rawHeads[0]![0];
    };
    const methods = ['patch', 'Patch', 'PATCH', 'get', 'Delete', 'options', 'post', 'put', 'head', 'purge', 'mkcol'];
    for (const method of methods) {
      expect(await requestLine(sockpoolFetch, method), method).toBe(await requestLine(fetch, method));
    }
    expect(await requestLine(sockpoolFetch, 'patch')).toBe('patch /m HTTP/1.1');
    // A Request normalizes its method the same way (and fetch() sends what it says).
    rawHeads.length = 0;
    await (await client.fetch(new Request(rawUrl, { method: 'purge' }))).arrayBuffer();
    expect(rawHeads[0]![0]).toBe('purge /m HTTP/1.1');
    // CONNECT in any case is refused before anything is sent, as Node's fetch refuses it.
    for (const method of ['connect', 'CONNECT', 'Connect']) {
      await expect(client.fetch(rawUrl, { method }), method).rejects.toMatchObject({
        name: 'TypeError',
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      });
      await expect(client.request(rawUrl, { method }), method).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      });
    }
    // A method that is no token is refused as given, not once upper-cased (`optıons`, a dotless ı, upper-cases to
    // OPTIONS), as Node's fetch and http.request refuse it.
    for (const method of ['optıons', 'ﬀ']) {
      await expect(fetch(rawUrl, { method }), method).rejects.toThrow(TypeError);
      await expect(client.fetch(rawUrl, { method }), method).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      });
      await expect(client.request(rawUrl, { method }), method).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      });
    }
    // request() and requestStream() upper-case every method, as Node's http.request does.
    rawHeads.length = 0;
    await client.request(rawUrl, { method: 'patch' });
    const streamed = await client.requestStream(rawUrl, { method: 'purge' });
    await new Response(streamed.body).arrayBuffer();
    expect(rawHeads.map((head) => head[0])).toEqual(['PATCH /m HTTP/1.1', 'PURGE /m HTTP/1.1']);
  });

  it('sends a Request object’s body with its length, and again at a 307 (as Node does for a body it holds)', async () => {
    const make = (path = '/echo') =>
      new Request(url(path), { method: 'POST', body: '{"a":1}', headers: { 'x-custom': 'yes' } });
    const expected = await sent(fetch, make());
    expect(expected['content-length']).toBe('7');
    expect(await sent(sockpoolFetch, make())).toEqual(expected);
    expect(await sent(fetch, make('/r307'))).toEqual(expected);
    expect(await sent(sockpoolFetch, make('/r307'))).toEqual(expected);
    // init.body null leaves the Request's body in place (the Fetch standard's "input or init body").
    expect(await sent(sockpoolFetch, make(), { body: null })).toEqual(await sent(fetch, make(), { body: null }));
    const used = make();
    await client.fetch(used).then((response) => response.arrayBuffer());
    expect(used.bodyUsed).toBe(true);
  });

  it('says user-agent: node unless told otherwise, as Node’s fetch does', async () => {
    expect(await sent(sockpoolFetch, url('/echo'))).toEqual(await sent(fetch, url('/echo')));
    const own = { headers: { 'user-agent': 'crawler/1.0' } };
    expect(await sent(sockpoolFetch, url('/echo'), own)).toEqual(await sent(fetch, url('/echo'), own));
  });

  it('takes a Request’s signal unless init names one (null: none)', async () => {
    const aborted = () => new Request(url('/echo'), { signal: AbortSignal.abort() });
    expect((await client.fetch(aborted(), { signal: null })).status).toBe(200);
    await expect(client.fetch(aborted())).rejects.toThrow();
  });
});

describe('fetch() fails as Node’s fetch does', () => {
  /** How a rejection looks to code written for Node's fetch. */
  function shape(error: unknown) {
    const e = error as Error & { cause?: unknown };
    return { type: e.constructor.name, name: e.name, message: e.message };
  }

  it('rejects with the signal’s own reason when it aborts: before, while waiting, and while the body streams', async () => {
    for (const f of [fetch, sockpoolFetch]) {
      const before = AbortSignal.abort();
      await expect(f(url('/echo'), { signal: before })).rejects.toBe(before.reason);
      const controller = new AbortController();
      const waiting = f(url('/slow'), { signal: controller.signal });
      setTimeout(() => controller.abort(), 50);
      const waited = await waiting.catch((error: unknown) => error);
      expect(waited).toBe(controller.signal.reason);
      expect(shape(waited)).toMatchObject({ type: 'DOMException', name: 'AbortError' });
      const mine = new Error('mine');
      const custom = new AbortController();
      const aborting = f(url('/slow'), { signal: custom.signal });
      setTimeout(() => custom.abort(mine), 50);
      await expect(aborting).rejects.toBe(mine);
      const timeout = await f(url('/slow'), { signal: AbortSignal.timeout(50) }).catch((error: unknown) => error);
      expect(shape(timeout)).toMatchObject({ type: 'DOMException', name: 'TimeoutError' });
      const streaming = new AbortController();
      const response = await f(url('/half'), { signal: streaming.signal });
      const reader = response.body!.getReader();
      await reader.read();
      streaming.abort();
      await expect(reader.read()).rejects.toBe(streaming.signal.reason);
    }
  });

  it('rejects a failed request with TypeError “fetch failed”, the typed error as its cause (and its code on it)', async () => {
    for (const path of [`http://127.0.0.1:${closedPort}/`, url('/hang-up')]) {
      const node = await fetch(path).catch((error: unknown) => error);
      const ours = (await client.fetch(path).catch((error: unknown) => error)) as TypeError & { code?: string };
      expect(shape(ours), path).toEqual(shape(node));
      expect(ours.cause).toBeInstanceOf(SockpoolError);
      expect(ours.code).toBe((ours.cause as SockpoolError).code);
    }
    const refusedRedirect = await client.fetch(url('/moved'), { redirect: 'error' }).catch((error: unknown) => error);
    expect(shape(refusedRedirect)).toEqual(shape(await fetch(url('/moved'), { redirect: 'error' }).catch((e) => e)));
    expect(refusedRedirect).toMatchObject({ code: 'SOCKPOOL_ERR_REDIRECT', cause: { code: 'SOCKPOOL_ERR_REDIRECT' } });
    // A bad argument is a TypeError too (Node: "Failed to parse URL from ..."), before anything is sent.
    for (const bad of ['not a url', '/relative', 'ftp://127.0.0.1/']) {
      await expect(client.fetch(bad), bad).rejects.toBeInstanceOf(TypeError);
      await expect(fetch(bad), bad).rejects.toBeInstanceOf(TypeError);
    }
  });

  it('rejects a response whose head a Response cannot hold (a header name with a space) with “fetch failed”, as Node’s does, and leaves no transfer behind', async () => {
    const target = `http://127.0.0.1:${(badHead.address() as net.AddressInfo).port}/`;
    const node = await fetch(target).catch((error: unknown) => error);
    for (const threads of [0, 1]) {
      const timeoutMs = 20_000;
      const own = new SockpoolClient({ socketPath: daemon.socketPath, threads, timeoutMs });
      const ours = (await own.fetch(target).catch((error: unknown) => error)) as TypeError & { code?: string };
      expect(shape(ours), `threads ${threads}`).toEqual(shape(node));
      expect(ours.cause).toBeInstanceOf(SockpoolError);
      expect((ours.cause as SockpoolError).message).toMatch(/"bad name" is an invalid header name/i);
      expect(ours.code).toBe('SOCKPOOL_ERR_TRANSFER');
      // The transfer was cancelled, not left holding its slot (and its connection, mid-body) until the deadline:
      // close() has nothing to wait for.
      const closed = await Promise.race([
        own.close().then(() => 'closed'),
        new Promise((resolve) =>
          setTimeout(() => resolve('close() still waiting halfway to the deadline'), timeoutMs / 2),
        ),
      ]);
      expect(closed, `threads ${threads}`).toBe('closed');
    }
  });

  it('fails a body cut short with TypeError “terminated”, as Node’s does', async () => {
    for (const f of [fetch, sockpoolFetch]) {
      const response = await f(url('/half?cut'));
      const failure = await response.arrayBuffer().catch((error: unknown) => error);
      expect(shape(failure)).toEqual({ type: 'TypeError', name: 'TypeError', message: 'terminated' });
    }
  });
});

describe('fetch()’s deadline (Node’s fetch has none)', () => {
  it('covers reading a Request’s body: a stream that stalls fails at the signal or at timeoutMs, and is cancelled', async () => {
    // Found in review: the body was read whole (source.arrayBuffer()) before the signal and the deadline applied,
    // so a stalled stream hung the fetch() for good.
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, timeoutMs: 500 });
    const cancelled: unknown[] = [];
    const stalled = () =>
      new Request(url('/echo'), {
        method: 'POST',
        body: new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(new TextEncoder().encode('part'));
            // …and nothing more, ever.
          },
          cancel(reason) {
            cancelled.push(reason);
          },
        }),
        duplex: 'half',
      } as RequestInit);
    const outcome = (promise: Promise<Response>) =>
      Promise.race([
        promise.then(
          () => 'resolved',
          (error: Error & { code?: string }) => error,
        ),
        new Promise((resolve) => setTimeout(() => resolve('still pending 5 s after its deadline'), 5_500)),
      ]);
    try {
      const controller = new AbortController();
      const aborting = own.fetch(stalled(), { signal: controller.signal });
      setTimeout(() => controller.abort(), 50);
      expect(await outcome(aborting)).toBe(controller.signal.reason);
      const timedOut = await outcome(own.fetch(stalled()));
      expect(timedOut).toMatchObject({ name: 'TypeError', message: 'fetch failed', code: 'SOCKPOOL_ERR_TIMEOUT' });
      expect(cancelled).toEqual([controller.signal.reason, (timedOut as Error).cause]);
    } finally {
      await own.close();
    }
  });

  it('is one for both tries of a body asked again (a coding it cannot decode): the second gets what is left', async () => {
    // Found in review: the second try had a full timeoutMs of its own, so one fetch() could take twice as long.
    // Each answer comes 600 ms late: with 1000 ms in all, the second try's has only 400 ms left.
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, timeoutMs: 1_000 });
    undecodableTries = 0;
    try {
      const failure = await own.fetch(url('/undecodable-slow')).then(
        async (response) => `resolved ${response.status} ${await response.text()}`,
        (error: TypeError & { code?: string }) => error,
      );
      expect(failure).toMatchObject({ message: 'fetch failed', code: 'SOCKPOOL_ERR_TIMEOUT' });
      expect(undecodableTries).toBe(2);
    } finally {
      await own.close();
    }
  });

  it('refuses a timeoutMs longer than a Node timer can wait, rather than timing out at once', async () => {
    // A caller who wants a long download or an event stream through fetch() raises the client's timeoutMs; past
    // 2^31 - 1 ms Node runs a timer after 1 ms, and fetch() failed with SOCKPOOL_ERR_TIMEOUT at once.
    expect(() => new SockpoolClient({ socketPath: daemon.socketPath, timeoutMs: 1e10 })).toThrow(
      expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }),
    );
    await expect(client.request(url('/echo'), { timeoutMs: 2 ** 31 })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
    });
    const longest = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, timeoutMs: 2 ** 31 - 1 });
    try {
      const response = await longest.fetch(url('/slow'));
      expect(await response.text()).toBe('slow');
    } finally {
      await longest.close();
    }
  });
});
