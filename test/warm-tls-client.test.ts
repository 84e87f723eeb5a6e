// Warm TLS end to end through SockpoolClient: curl speaks plaintext HTTP/1.1, or HTTP/2 with prior knowledge, over
// a session the daemon completed and relays, while the caller and the origin see https as from a direct request
// (URL, Host, :scheme, :authority). A client that verifies otherwise (its own CA bundle, insecure) gets TCP and
// does TLS itself; a certificate failure in the daemon is SOCKPOOL_ERR_TLS; many
// concurrent relayed transfers keep their bodies intact; fds come back. Real daemon, real node:https/http2 origins.
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  eventually,
  fdCount,
  h2Origin,
  httpsOrigin,
  type Origin,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let h1: Origin;
let h2: Origin;
let daemon: DaemonProcess;
let client: SockpoolClient;
/** What the origins saw of the last request. */
const seen = { host: '', scheme: '', authority: '', encrypted: false };

/** Answers `METHOD path bytes sha256` of the request body; `/big?n` sends n bytes of a pattern. */
function answer(
  request: { method?: string; url?: string; on(event: string, listener: (chunk: Buffer) => void): unknown },
  response: { end(text: string | Buffer): void; write(chunk: Buffer): boolean; once(e: string, l: () => void): void },
) {
  const big = /^\/big\?(\d+)$/.exec(request.url ?? '');
  if (big) {
    const total = Number(big[1]);
    let sent = 0;
    const write = () => {
      while (sent < total) {
        const chunk = pattern(Math.min(total - sent, 64 * 1024), sent);
        sent += chunk.length;
        if (!response.write(chunk)) {
          response.once('drain', write);
          return;
        }
      }
      response.end('');
    };
    write();
    return;
  }
  const hash = createHash('sha256');
  let bytes = 0;
  request.on('data', (chunk: Buffer) => {
    bytes += chunk.length;
    hash.update(chunk);
  });
  request.on('end', () => response.end(`${request.method} ${request.url} ${bytes} ${hash.digest('hex')}`));
}

/** Bytes `offset` to `offset + length` of an endless pattern with a period prime to every buffer size. */
function pattern(length: number, offset = 0): Buffer {
  const buffer = Buffer.alloc(length);
  for (let i = 0; i < length; i++) buffer[i] = (offset + i) % 251;
  return buffer;
}

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  h1 = await httpsOrigin(pki, (request, response) => {
    seen.host = request.headers.host ?? '';
    seen.encrypted = (request.socket as { encrypted?: boolean }).encrypted === true;
    answer(request, response);
  });
  h2 = await h2Origin(pki, (request, response) => {
    seen.scheme = String(request.headers[':scheme']);
    seen.authority = String(request.headers[':authority']);
    answer(request, response);
  });
  daemon = await startTestDaemon([h1.port, h2.port], {
    extraArgs: warmTlsArgs(pki.caFile, [h1.port, h2.port]),
  });
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile });
});

afterAll(async () => {
  await client?.close();
  await daemon?.stop();
  await h1?.close();
  await h2?.close();
  pki?.cleanup();
});

describe('warm TLS through SockpoolClient', () => {
  it('HTTP/1.1: the caller sees https, the origin the Host of an https request; TLS was the daemon’s', async () => {
    await client.prewarm([{ host: 'localhost', port: h1.port, count: 1 }]);
    const response = await client.request(`https://localhost:${h1.port}/one?x=1`, { method: 'POST', body: 'abc' });
    expect(response.status).toBe(200);
    expect(response.body.toString()).toMatch(/^POST \/one\?x=1 3 /);
    expect(response.url).toBe(`https://localhost:${h1.port}/one?x=1`);
    expect(response.tls).toEqual({ version: 'TLSv1.3', alpn: 'http/1.1', by: 'daemon' });
    expect(response.timings.tlsMs).toBe(0);
    expect(response.httpVersion).toBe('1.1');
    expect(seen.host).toBe(`localhost:${h1.port}`);
    expect(seen.encrypted).toBe(true);
    // Keep-alive: the next request reuses curl's plaintext connection to the relay.
    const again = await client.request(`https://localhost:${h1.port}/two`);
    expect(again.connection).toBe('reused');
    expect(again.tls?.by).toBe('daemon');
  });

  it('HTTP/2 with prior knowledge: the origin sees :scheme https and the https :authority', async () => {
    const response = await client.request(`https://localhost:${h2.port}/h2`);
    expect(response.status).toBe(200);
    expect(response.httpVersion).toBe('2');
    expect(response.tls).toEqual({ version: 'TLSv1.3', alpn: 'h2', by: 'daemon' });
    expect(seen.scheme).toBe('https');
    expect(seen.authority).toBe(`localhost:${h2.port}`);
    // Concurrent requests multiplex over the one relayed connection.
    const bodies = await Promise.all(
      Array.from({ length: 20 }, (_, i) => client.request(`https://localhost:${h2.port}/m${i}`)),
    );
    expect(bodies.map((r) => r.body.toString().split(' ')[1])).toEqual(Array.from({ length: 20 }, (_, i) => `/m${i}`));
  });

  it('gives clients that verify otherwise a TCP socket: they do TLS themselves', async () => {
    // A bundle with the same CA but other bytes is another trust: the daemon's check is not the one asked for.
    const bundle = join(pki.dir, 'bundle.pem');
    writeFileSync(bundle, Buffer.concat([readFileSync(pki.caFile), Buffer.from('\n')]));
    for (const options of [{ caFile: bundle }, { insecure: true }]) {
      const other = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, ...options });
      try {
        const response = await other.request(`https://localhost:${h1.port}/own`);
        expect(response.status).toBe(200);
        expect(response.tls).toBeUndefined();
        expect(response.timings.tlsMs).toBeGreaterThan(0);
      } finally {
        await other.close();
      }
    }
  });

  it('runs 200 concurrent relayed transfers with intact bodies, and gives every fd back', async () => {
    // The origins run in this process: their server-side sockets (one per session the daemon keeps, and it may keep
    // more after this burst) are not the client's.
    const clientFds = () => fdCount() - h1.openSockets() - h2.openSockets();
    // On a client of its own, made after the count and closed before the check: no thread but its own starts or ends
    // between the two (a thread opens its event loop's fds on its own schedule after the constructor returns, and a
    // count taken meanwhile lets as many leaked fds through). The file's client stays up through both; its thread,
    // started in beforeAll, may still be starting when this test runs alone: stats() waits for it.
    await client.stats();
    const before = clientFds();
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile });
    const requests = Array.from({ length: 200 }, (_, i) => {
      const body = pattern(1000 + i);
      return own
        .request(`https://localhost:${h1.port}/c${i}`, { method: 'POST', body })
        .then((response) => [
          response.body.toString(),
          `POST /c${i} ${body.length} ${createHash('sha256').update(body).digest('hex')}`,
        ]);
    });
    for (const [got, want] of await Promise.all(requests)) expect(got).toBe(want);
    await own.close();
    await eventually(() => clientFds() <= before, `client fds back to ${before} (now ${clientFds()})`);
  });
});

describe('certificate failure in the daemon', () => {
  it('reaches the caller as SOCKPOOL_ERR_TLS with the reason', async () => {
    const wrong = createTestPki(['localhost']);
    // The daemon trusts pki's CA; this origin's certificate comes from another CA, and the client trusts pki's too.
    const origin = await httpsOrigin(wrong, (_request, response) => response.end('never'));
    const strict = await startTestDaemon([origin.port], {
      extraArgs: warmTlsArgs(pki.caFile, [origin.port]),
    });
    const other = new SockpoolClient({ socketPath: strict.socketPath, threads: 1, caFile: pki.caFile });
    try {
      await expect(other.request(`https://localhost:${origin.port}/`)).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_TLS',
        reason: 'unknown-ca',
      });
    } finally {
      await other.close();
      await strict.stop();
      await origin.close();
      wrong.cleanup();
    }
  });
});
