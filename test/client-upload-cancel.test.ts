// A streamed request body is stopped when its request ends before the body did (a timeout, an abort): the caller's
// side pumps it to the runtime, and a source that has stalled (no next chunk coming) is cancelled while its read is
// pending. A ReadableStream is cancelled (the reason given to its source) and its lock released; a Node Readable is
// destroyed, its fd closed (fds counted in this process); any other AsyncIterable is asked to return(). A body read
// to its end is left as it is. And fetch() streams an AsyncIterable or a Node Readable body as it is read (as Node's
// fetch does) under its signal and timeout, instead of reading it whole first (a stalled one hung fetch() for ever).
// Each case on a worker thread and with threads: 0. Real daemon child process, real HTTP server.
import { once } from 'node:events';
import { type AddressInfo, createServer, type Server, type Socket, connect as tcpConnect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { eventually, fdCount, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

/** What the origin received for each path: bytes so far, the body, whether it ended. */
interface Upload {
  bytes: number;
  chunks: Buffer[];
  ended: boolean;
}
const uploads = new Map<string, Upload>();
let origin: Origin;
/** The far ends of the sockets used as Node Readable bodies (socketBody()). */
let feeder: Server;
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = await httpOrigin((request, response) => {
    const upload: Upload = { bytes: 0, chunks: [], ended: false };
    uploads.set(request.url!, upload);
    request.on('data', (chunk: Buffer) => {
      upload.bytes += chunk.length;
      upload.chunks.push(chunk);
    });
    request.on('end', () => {
      upload.ended = true;
      response.end(`${request.method} ${request.url} ${Buffer.concat(upload.chunks).toString()}`);
    });
  });
  feeder = createServer();
  feeder.listen(0, '127.0.0.1');
  await once(feeder, 'listening');
  daemon = await startTestDaemon([origin.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
  await new Promise((resolve) => feeder?.close(resolve));
});

let paths = 0;
const path = (name: string) => `/${name}-${++paths}`;
const url = (at: string) => `http://127.0.0.1:${origin.port}${at}`;
const received = (at: string) => uploads.get(at)?.bytes ?? 0;
const text = (value: string) => new TextEncoder().encode(value);

/** fds of this process, less the server-side sockets of the origin (it runs in this process too). */
const clientFds = () => fdCount() - origin.openSockets();

/** A Node Readable body: a TCP socket, and `feed`, its far end in this process (it closes when the body does). */
async function socketBody(): Promise<{ body: Socket; feed: Socket }> {
  const accepted = once(feeder, 'connection') as Promise<[Socket]>;
  const body = tcpConnect((feeder.address() as AddressInfo).port, '127.0.0.1');
  await once(body, 'connect');
  const [feed] = await accepted;
  feed.on('error', () => {});
  feed.on('end', () => feed.destroy());
  return { body, feed };
}

/** How a promise settled ('resolved', or the error's code), once it has. */
function track(promise: Promise<unknown>): { outcome: string | undefined } {
  const state: { outcome: string | undefined } = { outcome: undefined };
  promise.then(
    () => {
      state.outcome = 'resolved';
    },
    (error) => {
      // (A DOMException's code is a number: its name says which.)
      state.outcome = typeof error?.code === 'string' ? error.code : error?.name;
    },
  );
  return state;
}

const modes = [
  ['a worker thread', { threads: 1, inlineWhenIdle: false }],
  ['threads: 0', { threads: 0 }],
] as const;

describe.each(modes)('request(), %s: a stalled upload is stopped when its request ends', (_name, mode) => {
  it('a timeout cancels a ReadableStream body (its reader released); one read to its end is not cancelled', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    try {
      // Read to its end: every chunk sent once, in order; nothing cancelled, nothing left locked.
      let wholeCancelled = false;
      const parts = ['one;', 'two;', 'three;', 'four'];
      const whole = new ReadableStream<Uint8Array>({
        pull(controller) {
          const part = parts.shift();
          if (part === undefined) controller.close();
          else controller.enqueue(text(part));
        },
        cancel() {
          wholeCancelled = true;
        },
      });
      const sent = path('whole');
      const response = await client.request(url(sent), { method: 'POST', body: whole });
      expect({ body: response.body.toString(), cancelled: wholeCancelled, locked: whole.locked }).toEqual({
        body: `POST ${sent} one;two;three;four`,
        cancelled: false,
        locked: false,
      });

      // Stalled after its first chunk: the timeout cancels it with a reason, and lets go of it.
      let reason: unknown;
      let pulls = 0;
      const stalled = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (++pulls === 1) controller.enqueue(text('first;'));
          return new Promise(() => {}); // the rest never comes
        },
        cancel(why) {
          reason = why;
        },
      });
      const at = path('timeout');
      await expect(client.request(url(at), { method: 'POST', body: stalled, timeoutMs: 300 })).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_TIMEOUT',
      });
      await eventually(() => reason !== undefined, 'the stalled body was cancelled', 5_000);
      expect({ reason: reason instanceof Error, locked: stalled.locked, ended: uploads.get(at)?.ended }).toEqual({
        reason: true,
        locked: false,
        ended: false,
      });
    } finally {
      await client.close();
    }
  }, 20_000);

  it('an abort cancels a ReadableStream body waiting for its next chunk', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    try {
      let cancelled = false;
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(text('first;'));
        },
        pull() {
          return new Promise(() => {});
        },
        cancel() {
          cancelled = true;
        },
      });
      const controller = new AbortController();
      const at = path('abort');
      const pending = client.request(url(at), { method: 'POST', body, signal: controller.signal });
      await eventually(() => received(at) === 6, 'the first chunk reached the origin', 5_000);
      controller.abort();
      await expect(pending).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_ABORTED' });
      await eventually(() => cancelled, 'the stalled body was cancelled', 5_000);
      expect(body.locked).toBe(false);
    } finally {
      await client.close();
    }
  }, 20_000);

  it('an abort destroys a Node Readable body (a socket) waiting for its next chunk: its fd is closed', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    try {
      await client.request(url('/warmup')); // the client's thread, daemon link and connection exist before counting
      const fdsBefore = clientFds();
      const { body, feed } = await socketBody();
      feed.write('first;'); // and then nothing
      const controller = new AbortController();
      const at = path('readable');
      const pending = client.request(url(at), { method: 'POST', body, signal: controller.signal });
      await eventually(() => received(at) === 6, 'the first chunk reached the origin', 5_000);
      controller.abort();
      await expect(pending).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_ABORTED' });
      await eventually(() => body.destroyed, 'the stalled socket body was destroyed', 5_000);
      await eventually(
        () => clientFds() <= fdsBefore,
        () => `fds back to ${fdsBefore} (now ${clientFds()})`,
        5_000,
      );
    } finally {
      await client.close();
    }
  }, 20_000);

  it('a timeout asks any other AsyncIterable body to return(); one read to its end is not asked', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    try {
      /** An iterable of `parts`, then of a next chunk that never comes (with `stall`), counting return() calls. */
      const iterable = (parts: string[], stall: boolean) => {
        const state = { returns: 0 };
        const body: AsyncIterable<Uint8Array> = {
          [Symbol.asyncIterator]: () => ({
            next: () => {
              const part = parts.shift();
              if (part !== undefined) return Promise.resolve({ done: false, value: text(part) });
              return stall ? new Promise(() => {}) : Promise.resolve({ done: true, value: undefined });
            },
            return: () => {
              state.returns++;
              return Promise.resolve({ done: true, value: undefined });
            },
          }),
        };
        return { body, state };
      };
      const whole = iterable(['one;', 'two'], false);
      const sent = path('iterable');
      const response = await client.request(url(sent), { method: 'POST', body: whole.body });
      expect({ body: response.body.toString(), returns: whole.state.returns }).toEqual({
        body: `POST ${sent} one;two`,
        returns: 0,
      });

      const stalled = iterable(['first;'], true);
      await expect(
        client.request(url(path('iterable-timeout')), { method: 'POST', body: stalled.body, timeoutMs: 300 }),
      ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_TIMEOUT' });
      await eventually(() => stalled.state.returns === 1, 'the stalled iterator was asked to return', 5_000);
    } finally {
      await client.close();
    }
  }, 20_000);
});

describe.each(modes)('fetch(), %s: AsyncIterable and Node Readable bodies are streamed', (_name, mode) => {
  it('an AsyncIterable body is sent as it is read, and its signal cancels one that has stalled', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode });
    let settled = true;
    try {
      // The second chunk is made only once the origin has the first: a body read whole before sending never ends.
      const sent = path('fetch-iterable');
      async function* streamed() {
        yield text('first;');
        await eventually(() => received(sent) === 6, 'the first chunk reached the origin', 5_000);
        yield text('second');
      }
      const init = { method: 'POST', body: streamed(), duplex: 'half' };
      const response = await client.fetch(url(sent), init as unknown as RequestInit);
      expect(await response.text()).toBe(`POST ${sent} first;second`);

      const at = path('fetch-stalled');
      async function* stalled() {
        yield text('first;');
        await new Promise(() => {}); // the rest never comes
      }
      const controller = new AbortController();
      const stalledInit = { method: 'POST', body: stalled(), duplex: 'half', signal: controller.signal };
      settled = false;
      const state = track(client.fetch(url(at), stalledInit as unknown as RequestInit));
      await eventually(() => received(at) === 6, 'the first chunk reached the origin', 5_000);
      controller.abort();
      await eventually(() => state.outcome !== undefined, 'fetch() settled', 5_000);
      settled = true;
      // (fetch() rejects with the signal's reason, as Node's fetch does.)
      expect({ outcome: state.outcome, ended: uploads.get(at)?.ended }).toEqual({
        outcome: 'AbortError',
        ended: false,
      });
    } finally {
      // (Without streaming, close() would wait for the fetch() that hung: not awaited then.)
      if (settled) await client.close();
      else void client.close();
    }
  }, 20_000);

  it('a Node Readable body is sent as it is read; one that has stalled times out, is destroyed and its fd closed', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, ...mode, timeoutMs: 500 });
    let settled = true;
    try {
      // (Its own longer timeout: the first request starts the thread and the daemon link, which a loaded machine
      // can take longer than the 500 ms the stalled body below is given. A clean-clone run failed so.)
      await client.request(url('/warmup'), { timeoutMs: 10_000 });
      const fdsBefore = clientFds();
      // The rest is written only once the origin has the first chunk; then the socket ends.
      const sent = path('fetch-readable');
      const whole = await socketBody();
      whole.feed.write('first;');
      void eventually(() => received(sent) === 6, 'the first chunk reached the origin', 5_000).then(
        () => whole.feed.end('second'),
        () => whole.feed.destroy(),
      );
      const init = { method: 'PUT', body: whole.body, duplex: 'half' };
      const response = await client.fetch(url(sent), init as unknown as RequestInit);
      expect(await response.text()).toBe(`PUT ${sent} first;second`);

      const at = path('fetch-readable-stalled');
      const stalled = await socketBody();
      stalled.feed.write('first;'); // and then nothing
      settled = false;
      const state = track(client.fetch(url(at), { method: 'PUT', body: stalled.body, duplex: 'half' } as RequestInit));
      await eventually(() => state.outcome !== undefined, 'fetch() settled', 5_000);
      settled = true;
      expect({ outcome: state.outcome, ended: uploads.get(at)?.ended === true }).toEqual({
        outcome: 'SOCKPOOL_ERR_TIMEOUT',
        ended: false,
      });
      await eventually(() => stalled.body.destroyed, 'the stalled socket body was destroyed', 5_000);
      await eventually(
        () => clientFds() <= fdsBefore,
        () => `fds back to ${fdsBefore} (now ${clientFds()})`,
        5_000,
      );
    } finally {
      if (settled) await client.close();
      else void client.close();
    }
  }, 20_000);
});
