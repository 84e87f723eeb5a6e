// Streaming through SockpoolClient: response bodies arrive as ReadableStreams (requestStream, fetch) and request
// bodies can be streams, with backpressure across the thread boundary (credit over the request's MessagePort,
// curl paused with CURL_WRITEFUNC_PAUSE / CURL_READFUNC_PAUSE), so neither side is buffered whole: the client
// process's RSS grows by far less than the size moved. Real daemon child process, real HTTP server.
//
// Memory is measured as what is held, not as garbage waiting for a collector: every stream chunk is a fresh
// buffer (the consumer owns it), and V8 lets up to 64 MB of such garbage pile up per isolate before it collects.
// So the tests run a full GC in the caller's thread and in the worker thread (through the inspector, test/helpers/worker-threads.ts) every few MB, as memory
// pressure would; a body buffered whole would still show up in full.
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { RESPONSE_WINDOW, UPLOAD_WINDOW } from '../worker/stream-protocol.js';
import { daemonStats, eventually, fdCount, rss, startTestDaemon } from './fixtures/client-helpers.js';
import { spawnChild } from './helpers/children.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { collectGarbage } from './helpers/worker-threads.js';

// gc() in this thread and, since the flag is process-wide, in the worker threads created after this line.
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const MB = 1024 * 1024;
const RESPONSE_BYTES = 50 * MB;
const UPLOAD_BYTES = 20 * MB;
const GC_EVERY = MB;

/** The largest size the kernel lets a TCP socket buffer grow to (the third field of tcp_rmem / tcp_wmem). */
const kernelMax = (file: string) => Number(readFileSync(file, 'utf8').trim().split(/\s+/)[2]);

/** Byte i of every test body. */
const patternByte = (i: number) => i % 251;
/** One period-aligned block of the pattern: repeated, it is the pattern (no allocation per chunk). */
const PATTERN = Uint8Array.from({ length: 251 * 256 }, (_, i) => patternByte(i));

function patternChunk(offset: number, length: number): Uint8Array {
  const start = offset % 251;
  if (start === 0 && length <= PATTERN.length) return PATTERN.subarray(0, length);
  return Uint8Array.from({ length }, (_, i) => patternByte(offset + i));
}

/** Checks bytes against the pattern as they stream past; returns the count. */
class PatternCheck {
  bytes = 0;
  mismatches = 0;
  add(chunk: Uint8Array): void {
    for (let i = 0; i < chunk.length; i += 997) if (chunk[i] !== patternByte(this.bytes + i)) this.mismatches++;
    this.bytes += chunk.length;
  }
}

let origin: { port: number; child: ChildProcess };
let daemon: DaemonProcess;
let client: SockpoolClient;

/** The origin runs in a child process (test/fixtures/client-stream-origin.mjs): this process is the client only. */
async function startOrigin(): Promise<{ port: number; child: ChildProcess }> {
  const child = spawnChild(process.execPath, [join(import.meta.dirname, 'fixtures', 'client-stream-origin.mjs')], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const [line] = (await once(createInterface({ input: child.stdout! }), 'line')) as [string];
  return { port: Number(line), child };
}

beforeAll(async () => {
  origin = await startOrigin();
  daemon = await startTestDaemon([origin.port]);
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
  // Load and run every path once (worker thread, libcurl, the daemon link, both stream directions) before measuring.
  await client.request(`http://127.0.0.1:${origin.port}/warmup`);
  const warm = await client.requestStream(`http://127.0.0.1:${origin.port}/big?bytes=${4 * MB}`);
  for await (const _ of warm.body);
  await client.request(`http://127.0.0.1:${origin.port}/upload`, { method: 'POST', body: generate(4 * MB) });
});

afterAll(async () => {
  await client?.close();
  await daemon?.stop();
  origin?.child.kill();
});

/** The pattern, `total` bytes, in chunks of one pattern block (GC every few MB, see the header). */
async function* generate(total: number): AsyncGenerator<Uint8Array> {
  for (let offset = 0; offset < total; offset += PATTERN.length) {
    if (offset % GC_EVERY < PATTERN.length) await collect();
    yield patternChunk(offset, Math.min(PATTERN.length, total - offset));
  }
}

/** A full GC in this thread and in the client's worker thread. */
async function collect(): Promise<void> {
  gc();
  await collectGarbage();
}

/** Runs `work` while sampling RSS; returns the largest growth over the RSS before it. */
async function peakRssGrowth(work: () => Promise<void>): Promise<number> {
  await collect();
  const before = rss();
  let peak = before;
  const sampler = setInterval(() => {
    peak = Math.max(peak, rss());
  }, 5);
  try {
    await work();
  } finally {
    clearInterval(sampler);
  }
  peak = Math.max(peak, rss());
  return peak - before;
}

describe('streamed response bodies', () => {
  it('requestStream delivers a 50 MB body as a stream; RSS grows by far less than the body', async () => {
    const check = new PatternCheck();
    let status = 0;
    const growth = await peakRssGrowth(async () => {
      const response = await client.requestStream(`http://127.0.0.1:${origin.port}/big`);
      status = response.status;
      expect(response.headers).toContainEqual(['content-length', String(RESPONSE_BYTES)]);
      for await (const chunk of response.body) {
        check.add(chunk);
        if (check.bytes % GC_EVERY < chunk.length) await collect();
      }
    });
    expect(status).toBe(200);
    expect(check.bytes).toBe(RESPONSE_BYTES);
    expect(check.mismatches).toBe(0);
    expect(growth).toBeLessThan(RESPONSE_BYTES / 2);
  });

  it('a slow reader applies backpressure all the way to the server (curl pauses, the server waits for drain)', async () => {
    // What may sit between the server's writes and a reader that stopped: the server's socket send buffer and the
    // worker's receive buffer (at most the kernel's tcp_wmem / tcp_rmem maximum), the worker's window in flight to
    // this thread and the stream's queue (a window each), and a little in curl and in the server's own buffer.
    const bound =
      kernelMax('/proc/sys/net/ipv4/tcp_wmem') + kernelMax('/proc/sys/net/ipv4/tcp_rmem') + 2 * RESPONSE_WINDOW + MB;
    // A body beyond that: without backpressure the server would write all of it.
    const total = bound + 16 * MB;
    const id = 'backpressure';
    const progress = async (): Promise<{ written: number; waiting: boolean; done: boolean }> =>
      (await fetch(`http://127.0.0.1:${origin.port}/progress?id=${id}`)).json() as Promise<{
        written: number;
        waiting: boolean;
        done: boolean;
      }>;
    const response = await client.requestStream(`http://127.0.0.1:${origin.port}/big?bytes=${total}&id=${id}`);
    const reader = response.body.getReader();
    const first = await reader.read();
    expect(first.done).toBe(false);
    // Nothing more is read: the worker runs at most its window ahead, curl pauses, the kernel buffers fill and the
    // server is held back, waiting for 'drain' with the same count on consecutive looks (or it wrote everything,
    // which fails below).
    let held = await progress();
    let steady = 0;
    await eventually(async () => {
      const now = await progress();
      steady = now.done || (now.waiting && now.written === held.written) ? steady + 1 : 0;
      held = now;
      return steady >= 5;
    }, 'the server stops writing');
    expect(held.done).toBe(false);
    expect(held.written).toBeLessThanOrEqual(bound);
    // Reading again releases it: everything arrives, in order.
    const check = new PatternCheck();
    check.add(first.value!);
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      check.add(value);
    }
    expect(check.bytes).toBe(total);
    expect(check.mismatches).toBe(0);
    expect(await progress()).toMatchObject({ written: total, done: true });
  });

  it('fetch() returns a Response whose body streams', async () => {
    const check = new PatternCheck();
    const growth = await peakRssGrowth(async () => {
      const response = await client.fetch(`http://127.0.0.1:${origin.port}/big`);
      expect(response.ok).toBe(true);
      expect(response.headers.get('content-length')).toBe(String(RESPONSE_BYTES));
      for await (const chunk of response.body!) {
        check.add(chunk);
        if (check.bytes % GC_EVERY < chunk.length) await collect();
      }
    });
    expect(check.bytes).toBe(RESPONSE_BYTES);
    expect(check.mismatches).toBe(0);
    expect(growth).toBeLessThan(RESPONSE_BYTES / 2);
  });

  it('cancelling a body mid-way ends that transfer only: its connection and lease are closed, nothing leaks', async () => {
    const fdsBefore = fdCount();
    const response = await client.requestStream(`http://127.0.0.1:${origin.port}/big`);
    const reader = response.body.getReader();
    await reader.read();
    await reader.cancel();
    // curl dropped the half-read connection: the daemon sees the lease closed; the worker has no fd of it left.
    await eventually(async () => (await daemonStats(daemon.socketPath)).leased <= 1, 'lease closed');
    const next = await client.request(`http://127.0.0.1:${origin.port}/after-cancel`);
    expect(next.body.toString()).toBe('small');
    await eventually(() => fdCount() <= fdsBefore, `client fds back to ${fdsBefore} (now ${fdCount()})`);
  });
});

describe('streamed request bodies', () => {
  it('an AsyncIterable body of 20 MB is sent chunked without being buffered whole', async () => {
    let reply: { bytes: number; mismatches: number; chunked: boolean } | undefined;
    const growth = await peakRssGrowth(async () => {
      const response = await client.request(`http://127.0.0.1:${origin.port}/upload`, {
        method: 'POST',
        body: generate(UPLOAD_BYTES),
      });
      reply = JSON.parse(response.body.toString());
    });
    expect(reply).toEqual({ bytes: UPLOAD_BYTES, mismatches: 0, chunked: true });
    expect(growth).toBeLessThan(UPLOAD_BYTES / 2);
  });

  it('a ReadableStream body through fetch (duplex half), with a content-length: sent as is, not chunked', async () => {
    const total = 4 * MB;
    let offset = 0;
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (offset >= total) {
          controller.close();
          return;
        }
        const length = Math.min(100_000, total - offset);
        controller.enqueue(patternChunk(offset, length));
        offset += length;
      },
    });
    const response = await client.fetch(`http://127.0.0.1:${origin.port}/upload`, {
      method: 'PUT',
      headers: { 'content-length': String(total) },
      body: stream,
      duplex: 'half',
    } as RequestInit);
    expect(await response.json()).toEqual({ bytes: total, mismatches: 0, chunked: false });
  });

  it('the caller stream is pulled only as fast as curl sends (upload window)', async () => {
    const total = 64 * MB;
    let produced = 0;
    async function* counted(): AsyncGenerator<Uint8Array> {
      const chunk = new Uint8Array(MB);
      while (produced < total) {
        produced += chunk.length;
        yield chunk;
      }
    }
    const pending = client.request(`http://127.0.0.1:${origin.port}/slow-upload`, { method: 'POST', body: counted() });
    // The server reads nothing until released: the pulls stop (the same count on consecutive looks), and what was
    // pulled is bounded by the upload window plus what the kernel's socket buffers can hold (their maximum sizes),
    // plus one chunk.
    let last = -1;
    let steady = 0;
    await eventually(() => {
      steady = produced > 0 && produced === last ? steady + 1 : 0;
      last = produced;
      return steady >= 5;
    }, 'the caller stream is no longer pulled');
    const bound =
      UPLOAD_WINDOW + kernelMax('/proc/sys/net/ipv4/tcp_wmem') + kernelMax('/proc/sys/net/ipv4/tcp_rmem') + MB;
    expect(bound).toBeLessThan(total);
    expect(produced).toBeLessThan(bound);
    await fetch(`http://127.0.0.1:${origin.port}/release-upload`);
    const response = await pending;
    expect(response.body.toString()).toBe(String(total));
  });

  it('a request body stream that fails fails the request with SOCKPOOL_ERR_REQUEST_BODY', async () => {
    async function* broken(): AsyncGenerator<Uint8Array> {
      yield new Uint8Array(1000);
      throw new Error('disk on fire');
    }
    await expect(
      client.request(`http://127.0.0.1:${origin.port}/upload`, { method: 'POST', body: broken() }),
    ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_REQUEST_BODY' });
    // and the client is fine afterwards
    const next = await client.request(`http://127.0.0.1:${origin.port}/ok`);
    expect(next.status).toBe(200);
  });
});
