// A client against a real sockpoold whose origin has a rate (requestsPerSecond, burst): the worker's request
// tokens (worker/rate-tokens.ts, protocol `tokens`) and the waits it asks the daemon for.
// - A burst of requests that finds the worker's batch empty sends one `tokens` request, not one each: it takes
//   no more tokens than it has requests (before: up to a batch per request, left to expire unspent).
// - A request whose deadline is more than the protocol's longest wait (timeoutMs 600000) away still gets its
//   token: the link asks the daemon to wait at most that (before: the daemon refused the message, and every
//   such request failed with SOCKPOOL_ERR_PROTOCOL). The same for an acquire asked for a longer wait.
// - acquireTimeoutMs over that bound is refused by the client's constructor (before: accepted, then every
//   acquire failed with SOCKPOOL_ERR_PROTOCOL).
import { afterAll, beforeAll, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { ErrorCodes } from '../shared/errors.js';
import { MAX_TIMEOUT_MS } from '../shared/protocol.js';
import { DaemonLink } from '../worker/daemon-link.js';
import { daemonStats, echoHandler, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let origin: Origin;
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = await httpOrigin(echoHandler());
  // 100 requests/s, burst 10: a worker's batch is 10 tokens (a tenth of a second of the rate).
  daemon = await startTestDaemon([origin.port], {
    config: { pool: { defaults: { requestsPerSecond: 100, burst: 10 } } },
  });
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
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
