// The client's options checked by its constructor: a value of the wrong type is refused there with
// SOCKPOOL_ERR_INVALID_ARGUMENT naming the option, before any thread, link or request exists. Found in review: such
// values used to reach curl (caFile: a throw inside the worker, the caller's process crashed or the request never
// settled), the daemon link (socketPath: SOCKPOOL_ERR_DAEMON_UNAVAILABLE at the first request), or were taken by
// their truthiness (insecure: "false" turned TLS verification off). And a request's options: null is none (as
// Node's fetch takes init null), headers of the wrong shape are refused, typed, before anything is sent (a string
// went out as headers named 0, 1, …). A real daemon and origin for those.
import { afterAll, beforeAll, describe, expect, expectTypeOf, it } from 'vitest';
import { type HeadersInput, SockpoolClient, type SockpoolClientOptions } from '../client/index.js';
import { httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

/** What the constructor does with these options: 'accepted' (the client closed again), or the refusal's code and
 *  message. */
async function construct(options: SockpoolClientOptions): Promise<string> {
  let client: SockpoolClient;
  try {
    // (No request is made: no daemon is needed.)
    client = new SockpoolClient({ socketPath: '/nonexistent/sockpoold.sock', threads: 0, ...options });
  } catch (error) {
    const { name, code, message } = error as Error & { code?: string };
    return `${name} ${code}: ${message}`;
  }
  await client.close();
  return 'accepted';
}

describe('paths', () => {
  it('caFile and socketPath must be non-empty strings; anything else is refused, typed, naming the option', async () => {
    for (const option of ['caFile', 'socketPath'] as const) {
      for (const value of [123, '', null, ['/etc/ssl/ca.pem'], { path: '/x' }]) {
        expect(await construct({ [option]: value as never }), `${option}: ${JSON.stringify(value)}`).toMatch(
          new RegExp(`^SockpoolError SOCKPOOL_ERR_INVALID_ARGUMENT: ${option} must be`),
        );
      }
    }
    expect(await construct({ caFile: '/etc/ssl/certs/ca-certificates.crt' })).toBe('accepted');
  });
});

describe('TLS verification and retries', () => {
  it('insecure must be a boolean: the string "false" (read from the environment) is refused, not taken as true', async () => {
    for (const value of ['false', 'true', 0, 1, null]) {
      expect(await construct({ insecure: value as never }), JSON.stringify(value)).toMatch(
        /^SockpoolError SOCKPOOL_ERR_INVALID_ARGUMENT: insecure must be true or false/,
      );
    }
    expect(await construct({ insecure: false })).toBe('accepted');
  });

  it('inlineWhenIdle and inlineWhileResponsive must be booleans; anything else is refused, typed, naming the option', async () => {
    for (const option of ['inlineWhenIdle', 'inlineWhileResponsive'] as const) {
      for (const value of ['false', 0, 1, null, {}]) {
        expect(
          await construct({ threads: 1, [option]: value as never }),
          `${option}: ${JSON.stringify(value)}`,
        ).toMatch(new RegExp(`^SockpoolError SOCKPOOL_ERR_INVALID_ARGUMENT: ${option} must be a boolean`));
      }
      expect(await construct({ threads: 1, [option]: false })).toBe('accepted');
    }
  });

  it('retry is { deadConnection?: boolean, methods?: method names }; anything else is refused, typed', async () => {
    for (const retry of [
      'off',
      null,
      { deadConnection: 'no' },
      { methods: 'GET' },
      { methods: [5] },
      { methods: null },
      { methods: ['GET', 'NOT A METHOD'] },
    ]) {
      expect(await construct({ retry: retry as never }), JSON.stringify(retry)).toMatch(
        /^SockpoolError SOCKPOOL_ERR_INVALID_ARGUMENT: retry/,
      );
    }
    expect(await construct({ retry: { deadConnection: false, methods: ['get', 'PATCH'] } })).toBe('accepted');
    expect(await construct({ retry: {} })).toBe('accepted');
  });
});

describe("a request's options", () => {
  let origin: Origin;
  let daemon: DaemonProcess;
  let client: SockpoolClient;
  /** The x-* headers each request reached the origin with. */
  const arrived: Array<Record<string, string>> = [];

  beforeAll(async () => {
    origin = await httpOrigin((request, response) => {
      arrived.push(
        Object.fromEntries(Object.entries(request.headers).filter(([name]) => name.startsWith('x-'))) as Record<
          string,
          string
        >,
      );
      response.end(`${request.method} ${request.url}`);
    });
    daemon = await startTestDaemon([origin.port]);
    client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
  });

  afterAll(async () => {
    await client?.close();
    await daemon?.stop();
    await origin?.close();
  });

  it('null options are no options, as fetch(url, null) is for Node’s fetch', async () => {
    const url = `http://127.0.0.1:${origin.port}/null`;
    const outcome = (call: () => Promise<unknown>) =>
      (async () => call())().then(
        () => 'resolved',
        (error: Error) => `${error.name}: ${error.message}`,
      );
    expect({
      request: await outcome(() => client.request(url, null as never)),
      requestStream: await outcome(() => client.requestStream(url, null as never).then((r) => r.body.cancel())),
      fetch: await outcome(() => client.fetch(url, null as never).then((r) => r.text())),
      nodeFetch: await outcome(() => fetch(url, null as never).then((r) => r.text())),
    }).toEqual({ request: 'resolved', requestStream: 'resolved', fetch: 'resolved', nodeFetch: 'resolved' });
  });

  it('headers are an object, [name, value] pairs or a Headers-like iterable; anything else is refused, typed', async () => {
    const url = `http://127.0.0.1:${origin.port}/headers`;
    arrived.length = 0;
    for (const headers of ['x-a: 1', 5, [null], [['x-a']], [['x-a', '1', '2']], ['x-a'], { 'x-a': 1 }]) {
      const outcome = await (async () => client.request(url, { headers: headers as never }))().then(
        () => 'resolved',
        (error: Error & { code?: string }) => `${error.name} ${error.code}`,
      );
      expect(outcome, JSON.stringify(headers)).toBe('SockpoolError SOCKPOOL_ERR_INVALID_ARGUMENT');
    }
    expect(arrived).toEqual([]);
    for (const headers of [
      { 'x-a': '1' },
      [['x-a', '1']],
      new Headers({ 'x-a': '1' }),
      new Map([['x-a', '1']]),
    ] as const) {
      await client.request(url, { headers: headers as never });
    }
    expect(arrived).toEqual([{ 'x-a': '1' }, { 'x-a': '1' }, { 'x-a': '1' }, { 'x-a': '1' }]);
  });

  // Checked when the project compiles (tsc -p . takes the tests in): a Map was taken at run time, but the type named
  // only an object, an array of pairs and a Headers, so a typed caller needed a cast.
  it('types headers as what they take: HeadersInput names a Map and any iterable of pairs, not a string', async () => {
    expectTypeOf<Map<string, string>>().toExtend<HeadersInput>();
    expectTypeOf<ReadonlyMap<string, string>>().toExtend<HeadersInput>();
    expectTypeOf<Iterable<[string, string]>>().toExtend<HeadersInput>();
    expectTypeOf<Array<readonly [string, string]>>().toExtend<HeadersInput>();
    expectTypeOf<Headers>().toExtend<HeadersInput>();
    expectTypeOf<Record<string, string>>().toExtend<HeadersInput>();
    expectTypeOf<string>().not.toExtend<HeadersInput>();
    expectTypeOf<Map<string, number>>().not.toExtend<HeadersInput>();
    const url = `http://127.0.0.1:${origin.port}/headers`;
    arrived.length = 0;
    const headers = new Map([['x-a', '1']]);
    await client.request(url, { headers });
    await client.requestStream(url, { headers }).then((response) => response.body.cancel());
    // @ts-expect-error: a string is refused (SOCKPOOL_ERR_INVALID_ARGUMENT at run time)
    await expect(client.request(url, { headers: 'x-a: 1' })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
    });
    expect(arrived).toEqual([{ 'x-a': '1' }, { 'x-a': '1' }]);
  });
});
