// A client against a real sockpoold whose origin has a rate (requestsPerSecond, burst): the worker's request
// tokens (worker/rate-tokens.ts, protocol `tokens`) and the waits it asks the daemon for.
// - A burst of requests that finds the worker's batch empty sends one `tokens` request, not one each: it takes
//   no more tokens than it has requests (before: up to a batch per request, left to expire unspent).
// - A request whose deadline is more than the protocol's longest wait (timeoutMs 600000) away still gets its
//   token: the link asks the daemon to wait at most that (before: the daemon refused the message, and every
//   such request failed with SOCKPOOL_ERR_PROTOCOL). The same for an acquire asked for a longer wait.
// - acquireTimeoutMs over that bound is refused by the client's constructor (before: accepted, then every
//   acquire failed with SOCKPOOL_ERR_PROTOCOL).
// - A request cancelled while it waits for a token ends at once (before: only when the token came).
// - A token the worker took for a request that never went out (its acquire failed to connect, or was cancelled at
//   the cap) is spent by the next request (before: lost, and at 0.1 request/s the next one was refused).
// - A token the worker took for a request cancelled before curl wrote any of it (an https origin that held its TLS
//   handshake) is spent by the next request (before: lost, and at a token a minute the next one was refused).
// - A token due past the protocol's longest wait, which the worker waits for itself, is no longer waited for once
//   the link closes: the wait fails with SOCKPOOL_ERR_CLOSED at once (before: it went on until its sleep ended).
// - A request cancelled while its worker's `tokens` request waits in the daemon cancels that wait there (protocol
//   `cancel` by its id, answered SOCKPOOL_ERR_ABORTED): before, it stayed first in the origin's queue and took the
//   next token for a worker batch where nobody wanted it.
import { once } from 'node:events';
import http from 'node:http';
import https from 'node:https';
import net, { type AddressInfo } from 'node:net';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { ErrorCodes } from '../shared/errors.js';
import { MAX_TIMEOUT_MS } from '../shared/protocol.js';
import { TOKEN_LIFETIME_MS } from '../shared/rate.js';
import { DaemonLink } from '../worker/daemon-link.js';
import {
  daemonStats,
  echoHandler,
  eventually,
  httpOrigin,
  type Origin,
  startTestDaemon,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { createTestPki } from './helpers/tls.js';

let origin: Origin;
/** One per client mode below (threads: 0, 1), each with its burst unspent. */
let slow: Origin[];
/** A token every 5 s, and an acquireTimeoutMs of its own (1 s) shorter than the defaults' (10 s). */
let quick: Origin;
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = await httpOrigin(echoHandler());
  slow = [await httpOrigin(echoHandler()), await httpOrigin(echoHandler())];
  quick = await httpOrigin(echoHandler());
  // 100 requests/s, burst 10: a worker's batch is 10 tokens (a tenth of a second of the rate). `slow`: a token a
  // minute.
  daemon = await startTestDaemon([origin.port, quick.port, ...slow.map((each) => each.port)], {
    config: {
      pool: {
        defaults: { requestsPerSecond: 100, burst: 10 },
        origins: [
          ...slow.map((each) => ({ match: `127.0.0.1:${each.port}`, requestsPerSecond: 1 / 60, burst: 1 })),
          { match: `127.0.0.1:${quick.port}`, requestsPerSecond: 0.2, burst: 1, acquireTimeoutMs: 1_000 },
        ],
      },
    },
  });
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
  for (const each of slow ?? []) await each.close();
  await quick?.close();
});

async function tokensGranted(): Promise<number> {
  return ((await daemonStats(daemon.socketPath)) as unknown as { rates: { granted: number } }).rates.granted;
}

it('a burst of 10 requests within the burst takes no more than 10 tokens', async () => {
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, timeoutMs: 5_000 });
  try {
    const url = `http://127.0.0.1:${origin.port}/`;
    // The first request teaches the worker the origin's rate (its lease says so).
    await client.request(url);
    // The burst refills (10 tokens in 100 ms).
    await new Promise((resolve) => setTimeout(resolve, 300));
    const before = await tokensGranted();
    const responses = await Promise.all(Array.from({ length: 10 }, () => client.request(url)));
    expect(responses.map((response) => response.status)).toEqual(Array(10).fill(200));
    expect((await tokensGranted()) - before).toBeLessThanOrEqual(10);
  } finally {
    await client.close();
  }
});

it('a request with timeoutMs over the protocol bound to an origin whose rate is known gets its token', async () => {
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, timeoutMs: MAX_TIMEOUT_MS + 100_000 });
  try {
    const url = `http://127.0.0.1:${origin.port}/long`;
    // The first request teaches the worker the rate (the daemon charged its token on the acquire)...
    expect((await client.request(url)).status).toBe(200);
    // ...the next one takes its token through `tokens`, with the request's whole remaining time.
    const before = await tokensGranted();
    expect((await client.request(url)).status).toBe(200);
    expect(await tokensGranted()).toBeGreaterThan(before);
  } finally {
    await client.close();
  }
});

it('an acquire asked for a wait over the protocol bound waits as long as the daemon allows', async () => {
  const link = new DaemonLink({ socketPath: daemon.socketPath });
  try {
    const lease = await link.acquire('127.0.0.1', origin.port, MAX_TIMEOUT_MS + 100_000);
    link.release(lease);
  } finally {
    link.close();
  }
});

it('a request cancelled while it waits for its token ends at once (before: it waited for the token)', async () => {
  for (const threads of [0, 1]) {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads, timeoutMs: 120_000 });
    try {
      const url = `http://127.0.0.1:${slow[threads]!.port}/`;
      // The first request spends the burst (the daemon charges it on the acquire, and the lease tells the runtime
      // the origin's rate): the next token is a minute away.
      expect((await client.request(url)).status).toBe(200);
      const controller = new AbortController();
      const waiting = client.request(url, { signal: controller.signal });
      waiting.catch(() => {});
      // Cancelled while it waits for the token (the abort reaches it wherever it is; the test's bound is well
      // short of the token's minute).
      setTimeout(() => controller.abort(new Error('not any more')), 100);
      await expect(waiting).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
    } finally {
      await client.close();
    }
  }
}, 20_000);

it("a tokens request that names no timeoutMs waits its origin's acquireTimeoutMs, not the defaults'", async () => {
  const cleanups: Array<() => unknown> = [];
  const raw = openRawClient(daemon.socketPath, cleanups);
  try {
    await raw.request({ type: 'hello', id: 1, version: 1 });
    const target = { host: '127.0.0.1', port: quick.port, count: 1 };
    expect((await raw.request({ type: 'tokens', id: 2, ...target, timeoutMs: 1_000 })).message).toMatchObject({
      type: 'tokens',
      granted: 1,
    });
    // The next token is 5 s away: past the origin's 1 s (before: it waited the defaults' 10 s, and was granted).
    expect((await raw.request({ type: 'tokens', id: 3, ...target })).message).toMatchObject({
      type: 'error',
      code: ErrorCodes.RATE_LIMITED,
    });
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup();
  }
});

it('refuses acquireTimeoutMs over the protocol bound, naming it', () => {
  const options = { socketPath: daemon.socketPath, threads: 0, acquireTimeoutMs: MAX_TIMEOUT_MS + 1 };
  expect(() => new SockpoolClient(options)).toThrow(
    expect.objectContaining({
      code: ErrorCodes.INVALID_ARGUMENT,
      message: expect.stringContaining('acquireTimeoutMs'),
    }),
  );
  // The bound itself is fine.
  return new SockpoolClient({ ...options, acquireTimeoutMs: MAX_TIMEOUT_MS }).close();
});

it('a token taken for a request whose acquire then fails goes back to the batch: the next request spends it', async () => {
  // Every response closes its connection: each request needs an acquire (curl keeps nothing to reuse).
  const handler: Parameters<typeof http.createServer>[1] = (_request, response) => {
    response.setHeader('connection', 'close');
    response.end('ok');
  };
  let server = http.createServer(handler).listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  // One request per 10 s, burst 2: the first request (charged by the daemon: the worker does not know the rate
  // yet) and the second (its token taken by the worker) spend both tokens there are for 10 s.
  const rated = await startTestDaemon([port], {
    config: { pool: { origins: [{ match: `127.0.0.1:${port}`, requestsPerSecond: 0.1, burst: 2 }] } },
  });
  const client = new SockpoolClient({ socketPath: rated.socketPath, threads: 0, timeoutMs: 3_000 });
  try {
    const url = `http://127.0.0.1:${port}/`;
    expect((await client.request(url)).status).toBe(200);
    // Nothing listens now: the second request's acquire fails to connect, after the worker took its token.
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await expect(client.request(url)).rejects.toMatchObject({ code: ErrorCodes.CONNECT });
    server = http.createServer(handler).listen(port, '127.0.0.1');
    await once(server, 'listening');
    // No request went out with that token: the third request spends it (before: it was lost, and the next token
    // being 10 s away, past the request's 3 s, the daemon refused it with SOCKPOOL_ERR_RATE_LIMITED).
    expect((await client.request(url)).status).toBe(200);
  } finally {
    await client.close();
    await rated.stop();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}, 20_000);

it('a token taken for a request cancelled while its acquire waits at the cap goes to the next request', async () => {
  // Every response closes its connection; the first one held until the test lets it go.
  const held: Array<() => void> = [];
  const server = http.createServer((request, response) => {
    response.setHeader('connection', 'close');
    if (request.url === '/held') held.push(() => response.end('ok'));
    else response.end('ok');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  // One request per 10 s, burst 3, one connection at a time.
  const rated = await startTestDaemon([port], {
    config: {
      pool: { origins: [{ match: `127.0.0.1:${port}`, requestsPerSecond: 0.1, burst: 3, maxPerOrigin: 1 }] },
    },
  });
  const client = new SockpoolClient({ socketPath: rated.socketPath, threads: 0, timeoutMs: 5_000 });
  try {
    const url = `http://127.0.0.1:${port}/`;
    // The daemon charges the first (the worker learns the rate); the second holds the only connection.
    expect((await client.request(url)).status).toBe(200);
    const holding = client.request(`${url}held`);
    await eventually(() => held.length === 1, 'the held request at the origin');
    // The third takes its token (the burst's last for 10 s), then waits at the cap; it is cancelled there.
    const controller = new AbortController();
    const cancelled = client.request(url, { signal: controller.signal });
    cancelled.catch(() => {});
    await eventually(async () => (await daemonStats(rated.socketPath)).waiting === 1, 'the acquire waiting at the cap');
    controller.abort(new Error('not any more'));
    await expect(cancelled).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
    // The fourth spends the token the third never sent a request with (before: it was lost, and the next token
    // being 10 s away, past the request's 5 s, the fourth failed with SOCKPOOL_ERR_RATE_LIMITED).
    const next = client.request(url);
    held.shift()!();
    expect((await holding).status).toBe(200);
    expect((await next).status).toBe(200);
  } finally {
    await client.close();
    await rated.stop();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}, 20_000);

it("a request cancelled while its worker's tokens request waits in the daemon takes that wait out of the origin's queue", async () => {
  const server = http.createServer((_request, response) => response.end('ok'));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  // A token every 2 s, burst 1.
  const rated = await startTestDaemon([port], {
    config: { pool: { origins: [{ match: `127.0.0.1:${port}`, requestsPerSecond: 0.5, burst: 1 }] } },
  });
  const rates = async () =>
    ((await daemonStats(rated.socketPath)) as unknown as { rates: { granted: number; waits: number } }).rates;
  const cleanups: Array<() => unknown> = [];
  const client = new SockpoolClient({ socketPath: rated.socketPath, threads: 0, timeoutMs: 10_000 });
  try {
    const url = `http://127.0.0.1:${port}/`;
    // The daemon charges the first request the burst's token; its lease tells the worker the rate.
    expect((await client.request(url)).status).toBe(200);
    const before = await rates();
    // The second finds the worker's batch empty: its `tokens` request waits in the daemon for the next token.
    const controller = new AbortController();
    const cancelled = client.request(url, { signal: controller.signal });
    cancelled.catch(() => {});
    await eventually(async () => (await rates()).waits === before.waits + 1, "the worker's wait in the daemon");
    controller.abort(new Error('not any more'));
    await expect(cancelled).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
    // Another client's wait for the next token: it is the only one granted (before: the cancelled request's wait
    // stayed first in the origin's queue and took the next token too, for a worker batch where nobody wanted it).
    const raw = openRawClient(rated.socketPath, cleanups);
    await raw.request({ type: 'hello', id: 1, version: 1 });
    expect(
      (await raw.request({ type: 'tokens', id: 2, host: '127.0.0.1', port, count: 1, timeoutMs: 9_000 })).message,
    ).toMatchObject({ type: 'tokens', granted: 1 });
    expect((await rates()).granted - before.granted).toBe(1);
    // The protocol: a waiting `tokens` request is cancelled by its id, and answered ABORTED; a second one under an
    // id still waiting is refused.
    const target = { host: '127.0.0.1', port, count: 1, timeoutMs: 9_000 };
    raw.sendJson({ type: 'tokens', id: 3, ...target });
    expect((await raw.request({ type: 'tokens', id: 3, ...target })).message).toMatchObject({
      type: 'error',
      code: ErrorCodes.PROTOCOL,
    });
    raw.sendJson({ type: 'cancel', acquireId: 3 });
    expect((await raw.receive()).message).toMatchObject({ type: 'error', id: 3, code: ErrorCodes.ABORTED });
    expect((await rates()).granted - before.granted).toBe(1);
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup();
    await client.close();
    await rated.stop();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}, 30_000);

it('a token taken for a request cancelled in its TLS handshake (nothing sent) goes to the next request', async () => {
  const pki = createTestPki(['localhost']);
  // An https origin whose every response closes its connection (each request needs an acquire).
  const tls = https.createServer({ cert: pki.cert, key: pki.key }, (_request, response) => {
    response.setHeader('connection', 'close');
    response.end('ok');
  });
  // A token lives TOKEN_LIFETIME_MS from when the worker took it, given back or not (shared/rate.ts), and on a loaded
  // machine the steps from the take to the next request's spend (a connect, the handshake seen, the abort, its
  // rejection) took longer now and then: the next request was refused because the token had expired, which says
  // nothing about the give-back. A refusal within TOKEN_LIFETIME_MS of the earliest moment the token can have been
  // taken is the defect; a later one cannot tell the two apart, and the attempt is made again (up to four), each
  // with an origin and a daemon of its own (a fresh burst).
  const attempt = async (): Promise<'served' | 'expired'> => {
    // A TCP front that, while `stall` is set, keeps the connections that come and never answers their handshake;
    // `hellos`: how many of those brought a ClientHello.
    let stall = false;
    const stalled: net.Socket[] = [];
    let hellos = 0;
    const front = net.createServer((socket) => {
      if (stall) {
        stalled.push(socket);
        socket.once('data', () => hellos++);
      } else {
        tls.emit('connection', socket);
      }
    });
    front.listen(0, '127.0.0.1');
    await once(front, 'listening');
    const { port } = front.address() as AddressInfo;
    // A token a minute, burst 2: the first request (charged by the daemon: the worker does not know the rate yet)
    // and the second (its token taken by the worker) spend both there are for a minute.
    const rated = await startTestDaemon([port], {
      config: { pool: { origins: [{ match: `127.0.0.1:${port}`, requestsPerSecond: 1 / 60, burst: 2 }] } },
    });
    // (20 s: the first request's connect and handshake fit in it on a loaded machine; a third request without a
    // token is still refused at once, its turn being a minute away.)
    const client = new SockpoolClient({
      socketPath: rated.socketPath,
      threads: 0,
      timeoutMs: 20_000,
      caFile: pki.caFile,
    });
    try {
      const url = `https://127.0.0.1:${port}/`;
      expect((await client.request(url)).status).toBe(200);
      stall = true;
      const controller = new AbortController();
      // The second request takes its token after this (the worker runs in this thread: the same clock).
      const beforeTake = performance.now();
      const cancelled = client.request(url, { signal: controller.signal });
      cancelled.catch(() => {});
      // (Its ClientHello, not the connection: the daemon connects before it hands the socket over, and an abort
      // then cancels the acquire, not the handshake, and leaves the stalled socket idle in the daemon's pool for the
      // third request.)
      await eventually(() => hellos === 1, 'the second request in its TLS handshake');
      controller.abort(new Error('not any more'));
      await expect(cancelled).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
      stall = false;
      // Nothing of the second request went out: the third spends its token (before: it was lost, and the next token
      // being a minute away, past the request's deadline, the daemon refused it with SOCKPOOL_ERR_RATE_LIMITED).
      try {
        expect((await client.request(url)).status).toBe(200);
        return 'served';
      } catch (error) {
        const expired = performance.now() - beforeTake >= TOKEN_LIFETIME_MS;
        if (expired && (error as { code?: string }).code === ErrorCodes.RATE_LIMITED) return 'expired';
        throw error;
      }
    } finally {
      await client.close();
      await rated.stop();
      for (const socket of stalled) socket.destroy();
      await new Promise<void>((resolve) => front.close(() => resolve()));
    }
  };
  try {
    const outcomes: string[] = [];
    do outcomes.push(await attempt());
    while (outcomes.at(-1) === 'expired' && outcomes.length < 4);
    // Every attempt too slow to tell: the machine, not the give-back; but a test that cannot tell fails.
    expect(outcomes.at(-1), `attempts: ${outcomes.join(', ')}`).toBe('served');
  } finally {
    tls.close();
    pki.cleanup();
  }
}, 150_000);

it('a wait for a token past the protocol bound ends with SOCKPOOL_ERR_CLOSED when the link closes', async () => {
  const server = http.createServer((_request, response) => response.end('ok'));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  // A token an hour, burst 1: after the acquire's, the next is past what the daemon waits (MAX_TIMEOUT_MS).
  const rated = await startTestDaemon([port], {
    config: { pool: { origins: [{ match: `127.0.0.1:${port}`, requestsPerSecond: 1 / 3600, burst: 1 }] } },
  });
  const limited = async () =>
    ((await daemonStats(rated.socketPath)) as unknown as { rates: { limited: number } }).rates.limited;
  const link = new DaemonLink({ socketPath: rated.socketPath });
  try {
    // The acquire spends the burst's token (the daemon charges it), and its lease tells the link the rate.
    link.release(await link.acquire('127.0.0.1', port, 5_000));
    const before = await limited();
    const taking = link.rateTokens.take('127.0.0.1', port, 2 * 3600_000) as Promise<number | undefined>;
    taking.catch(() => {});
    // The daemon refuses (the token is an hour away): the link waits here until it is due within the bound.
    await eventually(async () => (await limited()) > before, 'the refusal');
    // (One more round trip: the refusal, sent before the stats answer above, has reached the link.)
    await daemonStats(rated.socketPath);
    link.close();
    // Before: it waited on, about 50 minutes.
    await expect(taking).rejects.toMatchObject({ code: ErrorCodes.CLOSED });
  } finally {
    link.close();
    await rated.stop();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
}, 10_000);
