// What SockpoolClient does over the sockets the daemon hands it: HTTPS verified against a CA made for the test
// (SNI by host name, the daemon pinned to 127.0.0.1 for it), HTTP/2 multiplexing of many concurrent requests over
// one handed fd (ALPN h2 with our CAINFO), one retry of an idempotent request whose handed connection turns out
// dead, and typed refusals of bad input. Real daemon child process, real servers on 127.0.0.1.
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  echoHandler,
  h2Origin,
  httpsOrigin,
  type Origin,
  originStats,
  startTestDaemon,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let https: Origin;
let h2: Origin;
let h2Streams = 0;
let h2MaxConcurrent = 0;
let flaky: { port: number; connections: number; perPath: Map<string, number>; close(): Promise<void> };
let daemon: DaemonProcess;
let client: SockpoolClient;

/**
 * An HTTP/1.1 server whose first connection for each path dies the moment the request arrives (reset, no
 * response): from the client's side the handed connection was dead when the request went out. Later
 * connections answer `200 <path> <attempt>` and close.
 */
async function flakyServer() {
  const perPath = new Map<string, number>();
  const state = { connections: 0 };
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    state.connections++;
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    let buffered = '';
    socket.on('data', (chunk) => {
      buffered += chunk.toString('latin1');
      const end = buffered.indexOf('\r\n\r\n');
      if (end < 0) return;
      const [, path = '/'] = /^[A-Z]+ (\S+)/.exec(buffered) ?? [];
      buffered = '';
      const attempt = (perPath.get(path) ?? 0) + 1;
      perPath.set(path, attempt);
      if (attempt === 1) {
        socket.resetAndDestroy();
        return;
      }
      // One request per connection, so that each request goes out over a connection just handed over.
      const body = `${path} ${attempt}`;
      socket.end(`HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    get connections() {
      return state.connections;
    },
    perPath,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  https = await httpsOrigin(pki, echoHandler());
  h2 = await h2Origin(pki, (request, response) => {
    if (request.url === '/big') {
      // 8 MB, written as the client takes it.
      const chunk = Buffer.alloc(64 * 1024, 7);
      let left = 128;
      const write = () => {
        while (left > 0) {
          left--;
          if (!response.write(chunk)) {
            response.once('drain', write);
            return;
          }
        }
        response.end();
      };
      write();
      return;
    }
    h2Streams++;
    h2MaxConcurrent = Math.max(h2MaxConcurrent, h2Streams);
    // A little server time, so that the requests are in flight together.
    setTimeout(() => {
      h2Streams--;
      response.setHeader('x-stream', request.url);
      response.end(`h2 ${request.url}`);
    }, 30);
  });
  flaky = await flakyServer();
  daemon = await startTestDaemon([https.port, h2.port, flaky.port], {
    extraArgs: ['--resolve', `localhost:${https.port}:127.0.0.1`, '--resolve', `localhost:${h2.port}:127.0.0.1`],
  });
  // (Requests in company on the thread whatever this loop does: the connection counts below are HTTP/2's, not where
  // the client ran a request; a slow turn of this loop under load sent one of them to the other runtime, a second
  // connection. Where requests run: test/client-inline.test.ts.)
  client = new SockpoolClient({
    socketPath: daemon.socketPath,
    threads: 1,
    caFile: pki.caFile,
    inlineWhileResponsive: false,
  });
});

afterAll(async () => {
  await client?.close();
  await daemon?.stop();
  await https?.close();
  await h2?.close();
  await flaky?.close();
  pki?.cleanup();
});

describe('HTTPS with a CA of our own', () => {
  it('verifies the server against caFile, by host name (SNI), over the connection the daemon made', async () => {
    const before = https.connections();
    const response = await client.request(`https://localhost:${https.port}/secure`, { method: 'POST', body: 'abc' });
    expect(response.status).toBe(200);
    expect(response.body.toString()).toBe('POST /secure 3');
    expect(response.connection).toBe('leased');
    expect(response.timings.tlsMs).toBeGreaterThan(0);
    expect(https.connections() - before).toBe(1);
  });

  it('refuses a server its CA store does not vouch for, with a typed error (curl 60)', async () => {
    const strict = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
    try {
      await expect(strict.request(`https://localhost:${https.port}/`)).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_TRANSFER',
        curlCode: 60,
      });
    } finally {
      await strict.close();
    }
  });

  it('insecure: true skips verification (explicit opt-out)', async () => {
    const lax = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, insecure: true });
    try {
      expect((await lax.request(`https://localhost:${https.port}/lax`)).status).toBe(200);
    } finally {
      await lax.close();
    }
  });
});

describe('HTTP/2 multiplexing over one handed fd', () => {
  it('runs 100 concurrent requests as streams of one connection: 1 TCP connection, 1 lease', async () => {
    const requests = Array.from({ length: 100 }, (_, i) => client.request(`https://localhost:${h2.port}/s${i}`));
    const responses = await Promise.all(requests);
    expect(responses.map((response) => response.body.toString())).toEqual(
      Array.from({ length: 100 }, (_, i) => `h2 /s${i}`),
    );
    for (const response of responses) expect(response.httpVersion).toBe('2');
    // Each stream's own headers (curl's header API, per transfer), names as HTTP/2 sends them (lower case).
    responses.forEach((response, i) => {
      expect(response.status).toBe(200);
      expect(response.headers).toContainEqual(['x-stream', `/s${i}`]);
    });
    // ALPN chose h2 over our CAINFO-verified TLS, and the requests really overlapped on the server ...
    expect(h2MaxConcurrent).toBeGreaterThan(1);
    // ... over the one connection the daemon made and handed over once.
    expect(h2.connections()).toBe(1);
    expect(await originStats(daemon.socketPath, h2.port, 'localhost')).toEqual({ idle: 0, leased: 1, handoffs: 1 });
    // Later requests keep using it.
    expect((await client.request(`https://localhost:${h2.port}/later`)).connection).toBe('reused');
    expect(h2.connections()).toBe(1);
  });
});

describe('streaming over HTTP/2', () => {
  it('a slow reader pauses its stream only; the body arrives whole, other streams flow meanwhile', async () => {
    const response = await client.requestStream(`https://localhost:${h2.port}/big`);
    expect(response.httpVersion).toBe('2');
    const reader = response.body.getReader();
    let bytes = (await reader.read()).value!.length;
    // While this stream is paused (the reader is not reading), another request multiplexes through.
    expect((await client.request(`https://localhost:${h2.port}/meanwhile`)).body.toString()).toBe('h2 /meanwhile');
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      bytes += value.length;
    }
    expect(bytes).toBe(128 * 64 * 1024);
    expect(h2.connections()).toBe(1);
  });
});

describe('a handed connection that is dead at request time', () => {
  it('GET is retried once on a fresh connection and succeeds', async () => {
    const before = flaky.connections;
    const response = await client.request(`http://127.0.0.1:${flaky.port}/get-once`);
    expect(response.body.toString()).toBe('/get-once 2');
    expect(flaky.connections - before).toBe(2);
  });

  it('POST is not retried: it fails with a typed error saying the connection died', async () => {
    const before = flaky.connections;
    await expect(
      client.request(`http://127.0.0.1:${flaky.port}/post-once`, { method: 'POST', body: 'x' }),
    ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', deadConnection: true });
    expect(flaky.perPath.get('/post-once')).toBe(1);
    expect(flaky.connections - before).toBe(1);
  });
});

describe('retry policy', () => {
  it('retry.deadConnection false fails a GET on a dead handed connection instead of retrying it', async () => {
    const strict = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, retry: { deadConnection: false } });
    try {
      const before = flaky.connections;
      await expect(strict.request(`http://127.0.0.1:${flaky.port}/get-strict`)).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_TRANSFER',
        deadConnection: true,
      });
      expect(flaky.connections - before).toBe(1);
    } finally {
      await strict.close();
    }
  });
});

describe('invalid input is refused before it reaches a worker', () => {
  const bad: Array<[string, () => Promise<unknown>]> = [
    ['a header name with a space', () => client.request('http://127.0.0.1:1/', { headers: { 'bad name': 'x' } })],
    ['NUL in a header value', () => client.request('http://127.0.0.1:1/', { headers: [['x-a', 'a\0b']] })],
    ['LF alone in a header value', () => client.request('http://127.0.0.1:1/', { headers: { 'x-a': 'a\nb' } })],
    ['credentials in the URL', () => client.request('http://user:pw@127.0.0.1:1/')],
    ['CONNECT', () => client.request('http://127.0.0.1:1/', { method: 'CONNECT' })],
    ['a method with CR LF', () => client.request('http://127.0.0.1:1/', { method: 'GET\r\nX: y' })],
    ['a negative timeout', () => client.request('http://127.0.0.1:1/', { timeoutMs: -1 })],
    ['a body of the wrong type', () => client.request('http://127.0.0.1:1/', { body: 42 as unknown as string })],
    [
      'a bad content-length with a streamed body',
      () =>
        client.request('http://127.0.0.1:1/', {
          method: 'POST',
          headers: { 'content-length': '12abc' },
          body: new ReadableStream(),
        }),
    ],
    ['a javascript: URL through fetch', () => client.fetch('javascript:alert(1)')],
  ];
  for (const [what, call] of bad) {
    it(`refuses ${what} with SOCKPOOL_ERR_INVALID_ARGUMENT`, async () => {
      await expect(call()).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
    });
  }
});
