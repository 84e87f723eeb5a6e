// Large bodies through the warm-TLS relay, both directions, HTTP/1.1 and HTTP/2: 64 MiB down (read as a stream)
// and 64 MiB up (sent as a stream), each checked by SHA-256 at the far end. This is the relay's backpressure test:
// the caller reads slower than the origin writes and curl sends faster than the origin reads, so every buffer on
// the way (curl, the loopback pair, the relay thread, TLS, the origin's TCP socket) fills and drains many times.
// Real daemon, real node:https and node:http2 origins.
import { createHash } from 'node:crypto';
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

const MiB = 1024 * 1024;
const SIZE = 64 * MiB + 17;
const CHUNK = 256 * 1024;

let pki: TestPki;
let h1: Origin;
let h2: Origin;
let daemon: DaemonProcess;
let client: SockpoolClient;

/** Bytes `offset` to `offset + length` of an endless pattern whose period (251) is prime to every buffer size. */
const period = Buffer.from(Array.from({ length: 251 * 1100 }, (_, i) => i % 251));
function pattern(length: number, offset: number): Buffer {
  const start = offset % 251;
  return period.subarray(start, start + length);
}
const expectedHash = (() => {
  const hash = createHash('sha256');
  for (let sent = 0; sent < SIZE; sent += CHUNK) hash.update(pattern(Math.min(CHUNK, SIZE - sent), sent));
  return hash.digest('hex');
})();

async function* upload(): AsyncGenerator<Uint8Array> {
  for (let sent = 0; sent < SIZE; sent += CHUNK) yield pattern(Math.min(CHUNK, SIZE - sent), sent);
}

/** `/down?n` sends n bytes of the pattern (with backpressure); anything else answers `bytes sha256` of the body. */
function answer(
  request: { url?: string; on(event: string, listener: (chunk: Buffer) => void): unknown },
  response: { end(text: string): void; write(chunk: Buffer): boolean; once(e: string, l: () => void): void },
) {
  const down = /^\/down\?(\d+)$/.exec(request.url ?? '');
  if (down) {
    const total = Number(down[1]);
    let sent = 0;
    const write = () => {
      while (sent < total) {
        const chunk = pattern(Math.min(total - sent, CHUNK), sent);
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
  request.on('end', () => response.end(`${bytes} ${hash.digest('hex')}`));
}

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  h1 = await httpsOrigin(pki, answer);
  h2 = await h2Origin(pki, answer);
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

describe.each([
  ['HTTP/1.1', () => h1.port, '1.1'],
  ['HTTP/2', () => h2.port, '2'],
])('64 MiB through the warm-TLS relay over %s', (_name, port, version) => {
  it('downloads intact, read as a stream', async () => {
    const response = await client.requestStream(`https://localhost:${port()}/down?${SIZE}`, { timeoutMs: 300_000 });
    expect(response.tls?.by).toBe('daemon');
    expect(response.httpVersion).toBe(version);
    const hash = createHash('sha256');
    let bytes = 0;
    for await (const chunk of response.body) {
      hash.update(chunk);
      bytes += chunk.length;
    }
    expect(bytes).toBe(SIZE);
    expect(hash.digest('hex')).toBe(expectedHash);
  });

  it('uploads intact, sent as a stream', async () => {
    const response = await client.request(`https://localhost:${port()}/up`, {
      method: 'PUT',
      body: upload(),
      timeoutMs: 300_000,
    });
    expect(response.tls?.by).toBe('daemon');
    expect(response.body.toString()).toBe(`${SIZE} ${expectedHash}`);
  });
});

it('gives every fd back', async () => {
  const before = fdCount();
  const other = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, caFile: pki.caFile });
  const response = await other.request(`https://localhost:${h1.port}/up`, { method: 'PUT', body: upload() });
  expect(response.body.toString()).toBe(`${SIZE} ${expectedHash}`);
  await other.close();
  await eventually(() => fdCount() <= before, `client fds back to ${before} (now ${fdCount()})`);
});
