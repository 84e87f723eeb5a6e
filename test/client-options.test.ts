// The client's options checked by its constructor: a value of the wrong type is refused there with
// SOCKPOOL_ERR_INVALID_ARGUMENT naming the option, before any thread, link or request exists. Found in review: such
// values used to reach curl (caFile: a throw inside the worker, the caller's process crashed or the request never
// settled), the daemon link (socketPath: SOCKPOOL_ERR_DAEMON_UNAVAILABLE at the first request), or were taken by
// their truthiness (insecure: "false" turned TLS verification off).
import { describe, expect, it } from 'vitest';
import { SockpoolClient, type SockpoolClientOptions } from '../client/index.js';

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
