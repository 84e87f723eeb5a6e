// A request curl would refuse for its size fails before anything is queued, with SOCKPOOL_ERR_INVALID_ARGUMENT and a
// message that says why, rather than with SOCKPOOL_ERR_TRANSFER after a socket was leased for it (nothing was sent):
// curl takes a URL of at most 8,000,000 characters (CURL_MAX_INPUT_LENGTH: a longer one is refused by setopt, and the
// transfer failed with curlCode 3, "URL using bad/illegal format or missing URL"), and builds a request head (request
// line and headers) of at most 1 MiB less one byte (DYN_HTTP_REQUEST: one longer failed with curlCode 27, "Out of
// memory"), which a URL of a little over 1 MiB passes first. A real origin counts what reaches it.
import { once } from 'node:events';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

/** Answers each request head with a short body; counts connections and bytes. */
let origin: net.Server;
let connections = 0;
let received = 0;
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = net.createServer((socket) => {
    connections++;
    socket.on('error', () => {});
    let head = '';
    socket.on('data', (data: Buffer) => {
      received += data.length;
      head += data.toString('latin1');
      if (!head.includes('\r\n\r\n')) return;
      head = '';
      socket.write('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
    });
  });
  origin.listen(0, '127.0.0.1');
  await once(origin, 'listening');
  daemon = await startTestDaemon([(origin.address() as net.AddressInfo).port]);
});

afterAll(async () => {
  await daemon?.stop();
  origin?.close();
});

const base = () => `http://127.0.0.1:${(origin.address() as net.AddressInfo).port}`;
/** 1 MiB: curl's request head holds one byte less. */
const MIB = 1024 * 1024;

describe.each([
  { threads: 1, label: 'a worker thread' },
  { threads: 0, label: 'threads: 0' },
])('with $label', ({ threads }) => {
  let client: SockpoolClient;

  beforeAll(() => {
    client = new SockpoolClient({ socketPath: daemon.socketPath, threads, timeoutMs: 20_000 });
  });

  afterAll(async () => {
    await client?.close();
  });

  /** The outcome of `call` and what reached the origin meanwhile. */
  async function outcome(call: () => Promise<unknown>) {
    connections = 0;
    received = 0;
    const result = await call().then(
      () => ({ code: 'resolved', message: '' }),
      (error: Error & { code?: string; curlCode?: number }) => ({
        code: error.code,
        // (fetch()'s TypeError "fetch failed" has the typed error as its cause.)
        message: error instanceof TypeError ? (error.cause as Error).message : error.message,
        curlCode: error.curlCode,
        cause: (error.cause as { code?: string } | undefined)?.code,
      }),
    );
    return { ...result, connections, received };
  }

  it('refuses a URL longer than curl takes (8,000,000 characters) before anything is queued, typed', async () => {
    for (const url of [`${base()}/${'a'.repeat(8_000_000)}`, `${base()}/short#${'f'.repeat(8_000_000)}`]) {
      expect(await outcome(() => client.request(url))).toMatchObject({
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
        message: expect.stringMatching(/URL is 80000\d\d characters long: curl takes at most 8000000/),
        connections: 0,
        received: 0,
      });
    }
    expect(
      await outcome(() => client.fetch(`${base()}/${'a'.repeat(8_000_000)}`).then((response) => response.text())),
    ).toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT', cause: 'SOCKPOOL_ERR_INVALID_ARGUMENT', connections: 0 });
  });

  it('refuses a request whose head (request line and headers) is longer than curl builds (1 MiB), typed', async () => {
    const long = `${base()}/${'a'.repeat(MIB)}`;
    const hugeHeader = { 'x-huge': 'h'.repeat(MIB) };
    for (const call of [
      () => client.request(long),
      () => client.requestStream(long).then((response) => response.body.cancel()),
      () => client.request(`${base()}/`, { headers: hugeHeader }),
      () => client.request(`${base()}/?${'q'.repeat(MIB / 2)}`, { headers: { 'x-half': 'h'.repeat(MIB / 2) } }),
      () => client.fetch(long).then((response) => response.text()),
    ]) {
      expect(await outcome(call)).toMatchObject({
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
        message: expect.stringContaining('curl builds at most 1048575'),
        connections: 0,
        received: 0,
      });
    }
    // A head well within the limit is sent whole.
    const within = `${base()}/${'a'.repeat(MIB - 1024)}`;
    expect(await outcome(() => client.request(within))).toMatchObject({ code: 'resolved', connections: 1 });
    expect(received).toBeGreaterThan(MIB - 1024);
  });
});
