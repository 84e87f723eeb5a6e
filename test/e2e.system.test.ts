// The whole chain (test/fixtures/e2e-chain.ts) with a client that has no network at all: it runs in a network
// namespace with no interfaces (unshare -n, root), so the connection the origin sees can only be the one the daemon
// opened and handed over.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Chain, startChain } from './fixtures/e2e-chain.js';

let chain: Chain;
beforeAll(async () => {
  chain = await startChain();
});
afterAll(async () => {
  await chain?.stop();
});

describe('end to end, client without a network', () => {
  it('a client with no network at all (unshare -n) completes HTTP and HTTPS requests through the daemon', async () => {
    const { http, https } = chain;
    const httpBefore = http.connections.length;
    const httpsBefore = https.connections.length;
    const results = await chain.client(
      {
        caFile: chain.pki.caFile,
        requests: [
          { url: `http://127.0.0.1:${http.port}/sandboxed`, options: { method: 'POST', body: 'payload' } },
          { url: `https://localhost:${https.port}/secure` },
        ],
      },
      true,
    );
    expect(results[0]).toMatchObject({ ok: true, status: 200, body: 'POST /sandboxed payload' });
    expect(results[1]).toMatchObject({ ok: true, status: 200, body: 'GET /secure ' });
    expect(http.connections.length - httpBefore).toBe(1);
    expect(https.connections.length - httpsBefore).toBe(1);
  });

  it('the sandboxed client cannot reach what the daemon refuses', async () => {
    const [result] = await chain.client({ requests: [{ url: 'http://127.0.0.1:9/forbidden' }] }, true);
    expect(result).toMatchObject({ ok: false, code: 'SOCKPOOL_ERR_POLICY' });
  });
});
