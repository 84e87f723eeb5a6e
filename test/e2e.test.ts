// The whole chain once, with real processes (test/fixtures/e2e-chain.ts): sockpoold as a child process, a client
// process running a piscina pool of libcurl workers, and local HTTP and HTTPS origins that record every connection
// they accept. The same chain with a client that has no network at all is in e2e.system.test.ts (unshare -n).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Chain, startChain } from './fixtures/e2e-chain.js';

let chain: Chain;
beforeAll(async () => {
  chain = await startChain();
});
afterAll(async () => {
  await chain?.stop();
});

describe('end to end', () => {
  it('a client process gets an HTTP response over the connection the daemon opened', async () => {
    const { http } = chain;
    const before = http.connections.length;
    const [result] = await chain.client({ requests: [{ url: `http://127.0.0.1:${http.port}/hello` }] }, false);
    expect(result).toMatchObject({ ok: true, status: 200, body: 'GET /hello ', connection: 'leased' });
    expect(http.connections.length - before).toBe(1);
  });

  it('rejects invalid input with typed errors before anything reaches curl', async () => {
    const { http } = chain;
    const results = await chain.client(
      {
        requests: [
          { url: 'ftp://127.0.0.1/x' },
          { url: `http://127.0.0.1:${http.port}/`, options: { method: 'GE T' } },
          { url: `http://127.0.0.1:${http.port}/`, options: { headers: { 'x-bad': 'a\r\nInjected: 1' } } },
          { url: 'not a url' },
        ],
      },
      false,
    );
    expect(results).toHaveLength(4);
    for (const result of results) expect(result).toMatchObject({ ok: false, code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
  });
});
