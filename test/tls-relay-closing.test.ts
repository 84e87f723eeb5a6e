// What a relay thread (daemon/tls-relay-thread.ts, from dist/: npx tsc -p .) holds once its sessions' clients went:
// each origin's TLS is ended cleanly (close_notify, FIN) and its answer waited for, but a bounded number of them at
// once (`closingOrigins`, given by TlsRelays: its part of RELAY_CLOSING_ORIGINS), and each for a bounded time
// (ORIGIN_CLOSE_MS): past them the origin's connection is reset, as every lease's end reset it before. A client
// ending lease after lease at origins that never answer the close so piles up no origin sockets. The thread is
// started here as TlsRelays starts it, with a part of 2; the origins are this process's node:tls servers over a
// loopback pair per session (silent ones: they read, never answer, never end their side), and a client's end is
// reset as the daemon resets it when a lease ends (connect AF_UNSPEC). The sockets of this process, the thread's
// included, are counted before and after, checked before the thread ends (its teardown would close what it still
// held).
import { readFileSync } from 'node:fs';
import { Socket } from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RelayRequest } from '../daemon/tls-relay.js';
import * as native from '../shared/native.js';
import { pollUntil, socketCount, socketsBackTo } from './fixtures/native-helpers.js';
import { repoRoot } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

type ThreadMessage =
  | { t: 'ready'; id: number; fd: number }
  | { t: 'failed'; id: number; code: string }
  | { t: 'cpu'; id: number };

let pki: TestPki;
beforeAll(() => {
  pki = createTestPki(['localhost']);
});
afterAll(() => pki.cleanup());

/** An origin's side of one session: what it went through, in order ('end', 'error CODE', 'close'). */
interface Origin {
  tls: tls.TLSSocket;
  tcp: Socket;
  fd: number;
  seen: string[];
  received: string;
}

/** A relay thread that may keep `closingOrigins` origin connections closing at once. */
function startThread(closingOrigins: number) {
  const counters = new SharedArrayBuffer(6 * 8);
  /** The bytes the thread read from its clients (its counters' first: tls-relay-thread.ts COUNTER). */
  const bytesToOrigin = () => new Float64Array(counters)[0]!;
  // Its beat and its tid (TlsRelays#spawn).
  const heartbeat = new SharedArrayBuffer(2 * 4);
  /** The thread's scheduling state now (/proc: S asleep, R running or waiting for a CPU), once it said its tid. */
  const state = (): string | undefined => {
    const tid = Atomics.load(new Int32Array(heartbeat), 1);
    if (tid === 0) return undefined;
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
    } catch {
      return undefined;
    }
  };
  const worker = new Worker(join(repoRoot, 'dist', 'daemon', 'tls-relay-thread.js'), {
    workerData: { closingOrigins, counters, heartbeat, nice: 0 },
  });
  const said: ThreadMessage[] = [];
  worker.on('message', (message: ThreadMessage) => said.push(message));
  const origins = new Map<number, Origin>();
  /**
   * Session `id` to a silent origin (allowHalfOpen: a close_notify or FIN read leaves its side open), or with
   * `streams`, one that answers the client's first bytes with a response without end (as fast as it is taken);
   * resolves with the client's end (and its fd) once the thread made it.
   */
  const open = async (id: number, streams = false): Promise<{ client: Socket; fd: number }> => {
    const [near, far] = native.loopbackPair();
    const tcp = new Socket({ fd: far, readable: true, writable: true, allowHalfOpen: true });
    tcp.on('error', () => {});
    const session = new tls.TLSSocket(tcp, { isServer: true, cert: pki.cert, key: pki.key });
    (session as unknown as { allowHalfOpen: boolean }).allowHalfOpen = true;
    const origin: Origin = { tls: session, tcp, fd: far, seen: [], received: '' };
    const block = Buffer.alloc(64 * 1024, 'r');
    const pump = () => {
      while (!session.destroyed && session.write(block));
    };
    session.on('drain', pump);
    session.on('data', (chunk: Buffer) => {
      origin.received += chunk.toString();
      if (streams && origin.received === chunk.toString()) pump();
    });
    session.on('end', () => origin.seen.push('end'));
    session.on('error', (error: Error & { code?: string }) => origin.seen.push(`error ${error.code}`));
    session.on('close', () => origin.seen.push('close'));
    origins.set(id, origin);
    const request: RelayRequest = {
      t: 'open',
      id,
      fd: near,
      host: 'localhost',
      port: 443,
      ca: pki.ca.toString(),
      contextKey: 'test-ca',
      timeoutMs: 30_000,
    };
    worker.postMessage(request);
    // Its result (a `cpu` report may come before it).
    const result = () => said.find((message) => message.id === id && message.t !== 'cpu');
    await pollUntil(
      () => result() !== undefined,
      () => `session ${id}'s handshake`,
    );
    const made = result()!;
    expect(made.t).toBe('ready');
    const fd = (made as { fd: number }).fd;
    const client = new Socket({ fd, readable: true, writable: true });
    client.on('error', () => {});
    return { client, fd };
  };
  /** Session `id` lent to `uid`, as TlsRelays.lent tells its thread when the daemon lends it. */
  const lend = (id: number, uid: number) => {
    const request: RelayRequest = { t: 'lease', id, uid };
    worker.postMessage(request);
  };
  return { worker, open, lend, origins, bytesToOrigin, state };
}

/** TCP_INFO's tcpi_state of a connection its peer reset (CLOSE); a FIN alone leaves it in CLOSE_WAIT (8). */
const TCP_CLOSE = 7;

/**
 * Whether `origin`'s connection was reset after it read an end (close_notify and FIN): its socket, which read an
 * end and neither reads nor writes any more (allowHalfOpen), sees the reset only in its TCP state. (Open still: its
 * fd is its own.)
 */
function resetAfterEnd(origin: Origin): boolean {
  return !origin.seen.includes('close') && native.probe(origin.fd).tcpState === TCP_CLOSE;
}

/** The client speaks: its request reaches the origin. */
async function speak(client: Socket, origin: Origin): Promise<void> {
  client.write('request\n');
  await pollUntil(
    () => origin.received === 'request\n',
    () => `the request at the origin (${JSON.stringify(origin.received)})`,
  );
}

describe('a relay thread whose clients went', () => {
  it('keeps at most its part of origin connections closing: past it, resets them at once; the silent ones it reset at their bound', async () => {
    const before = socketCount();
    const thread = startThread(2);
    const clients: Array<{ client: Socket; fd: number }> = [];
    for (let id = 1; id <= 5; id++) {
      const session = await thread.open(id);
      // Each lent to a uid of its own: no uid's share (see the next test) holds one back.
      thread.lend(id, 1000 + id);
      await speak(session.client, thread.origins.get(id)!);
      clients.push(session);
    }
    // All five clients go at once: the first two origin connections get close_notify and FIN and are waited for,
    // the three others are reset.
    for (const { fd } of clients) native.disconnect(fd);
    const origins = [...thread.origins.values()];
    await pollUntil(
      () => origins.every((origin) => origin.seen.length > 0),
      () => `every origin's end (${JSON.stringify(origins.map((origin) => origin.seen))})`,
    );
    const first = origins.map((origin) => origin.seen[0]);
    expect(first.filter((seen) => seen === 'end')).toHaveLength(2);
    expect(first.filter((seen) => seen === 'error ECONNRESET')).toHaveLength(3);
    // The two never answer: at their bound, the thread resets them too.
    const closing = origins.filter((origin) => origin.seen[0] === 'end');
    await pollUntil(
      () => closing.every(resetAfterEnd),
      () => `the closing ones reset (${JSON.stringify(closing.map((origin) => native.probe(origin.fd)))})`,
    );
    for (const { client } of clients) client.destroy();
    for (const origin of origins) origin.tcp.destroy();
    await socketsBackTo(before);
    await thread.worker.terminate();
  }, 30_000);

  it("gives each uid a fair share of its closing places: one uid's ended sessions leave another uid's a place", async () => {
    const before = socketCount();
    const thread = startThread(4);
    // Uid 1001 holds four sessions, uid 1002 one; all to silent origins, which never answer the close.
    const clients: Array<{ client: Socket; fd: number }> = [];
    for (let id = 1; id <= 5; id++) {
      const session = await thread.open(id);
      thread.lend(id, id <= 4 ? 1001 : 1002);
      await speak(session.client, thread.origins.get(id)!);
      clients.push(session);
    }
    // Uid 1001's four clients go: while more places are free than it holds, its origins close cleanly; the rest are
    // reset. (Before: all four places were its, and uid 1002's lease end reset its origin.)
    for (const { fd } of clients.slice(0, 4)) native.disconnect(fd);
    const first = [1, 2, 3, 4].map((id) => thread.origins.get(id)!);
    await pollUntil(
      () => first.every((origin) => origin.seen.length > 0),
      () => `uid 1001's origins' ends (${JSON.stringify(first.map((origin) => origin.seen))})`,
    );
    // Uid 1002's client goes while uid 1001's are still closing: its origin reads close_notify and FIN.
    native.disconnect(clients[4]!.fd);
    const other = thread.origins.get(5)!;
    await pollUntil(
      () => other.seen.length > 0,
      () => `uid 1002's origin's end (${JSON.stringify(other.seen)})`,
    );
    expect(other.seen[0]).toBe('end');
    // Uid 1001 closed two (it held two, and two were free): its two others were reset at once.
    expect(first.map((origin) => origin.seen[0]).sort()).toEqual([
      'end',
      'end',
      'error ECONNRESET',
      'error ECONNRESET',
    ]);
    // All three reset at their bound (silent origins).
    const closing = [...thread.origins.values()].filter((origin) => origin.seen[0] === 'end');
    await pollUntil(
      () => closing.every(resetAfterEnd),
      () => `the closing ones reset (${JSON.stringify(closing.map((origin) => native.probe(origin.fd)))})`,
    );
    for (const { client } of clients) client.destroy();
    for (const origin of thread.origins.values()) origin.tcp.destroy();
    await socketsBackTo(before);
    await thread.worker.terminate();
  }, 30_000);

  it("drops what it holds from a client that reset its end: the origin gets only what went to its TLS socket before, then the relay's end", async () => {
    const before = socketCount();
    const thread = startThread(2);
    const { client, fd } = await thread.open(1);
    thread.lend(1, 1001);
    const origin = thread.origins.get(1)!;
    await speak(client, origin);
    // The origin reads nothing for now: a request body far larger than every buffer on the way fills them, then the
    // relay's own (it stops reading its client's end while FLOW_BOUND bytes or more wait for the origin's TLS socket).
    origin.tls.pause();
    client.write(Buffer.alloc(16 * 1024 * 1024, 'b'));
    await relayReadsStopped(thread, client);
    const read = thread.bytesToOrigin();
    // The client resets its end with its request cut off (its unsent bytes are dropped by its kernel), then the
    // origin reads again.
    native.disconnect(fd);
    client.destroy();
    origin.tls.resume();
    await pollUntil(
      () => origin.seen.length > 0,
      () => `the origin's end (${origin.received.length} bytes read)`,
    );
    // A clean end (close_notify, FIN), after no byte the relay still held: at least FLOW_BOUND of them were, none
    // went, and nothing more was read from the client's end, whose kernel still queued bytes it had taken. (Before:
    // all of them went, the relay reading the queue to its end before it saw the reset.)
    expect(origin.seen).toEqual(['end']);
    expect(thread.bytesToOrigin()).toBe(read);
    const body = origin.received.length - 'request\n'.length;
    expect(body).toBeLessThanOrEqual(read - 'request\n'.length - 64 * 1024);
    // The origin answers the close: the relay's end of it closes cleanly too.
    origin.tls.end();
    await pollUntil(
      () => origin.seen.includes('close'),
      () => `the origin's close (${JSON.stringify(origin.seen)})`,
    );
    expect(origin.seen).toEqual(['end', 'close']);
    origin.tcp.destroy();
    await socketsBackTo(before);
    await thread.worker.terminate();
  }, 60_000);

  it('forwards all a client sent before its clean end, what the relay held included, to an origin slow to read it', async () => {
    const before = socketCount();
    const thread = startThread(2);
    const { client } = await thread.open(1);
    thread.lend(1, 1001);
    const origin = thread.origins.get(1)!;
    await speak(client, origin);
    origin.tls.pause();
    const size = 16 * 1024 * 1024;
    // The whole request, then the client's half-close (FIN) while the relay holds part of it.
    client.end(Buffer.alloc(size, 'b'));
    await relayReadsStopped(thread, client);
    origin.tls.resume();
    await pollUntil(
      () => origin.seen.length > 0,
      () => `the origin's end (${origin.received.length} bytes read)`,
    );
    expect(origin.seen).toEqual(['end']);
    expect(origin.received.length).toBe('request\n'.length + size);
    origin.tls.end();
    await pollUntil(
      () => origin.seen.includes('close'),
      () => `the origin's close (${JSON.stringify(origin.seen)})`,
    );
    client.destroy();
    origin.tcp.destroy();
    await socketsBackTo(before);
    await thread.worker.terminate();
  }, 60_000);

  it('resets an origin that goes on sending a response once its client went', async () => {
    const before = socketCount();
    const thread = startThread(2);
    // The origin answers with a response without end, which the client reads for a while, then goes.
    const { client, fd } = await thread.open(1, true);
    const origin = thread.origins.get(1)!;
    let read = 0;
    client.on('data', (chunk: Buffer) => {
      read += chunk.length;
    });
    await speak(client, origin);
    await pollUntil(
      () => read > 1024 * 1024,
      () => `the response flowing (${read} bytes read)`,
    );
    native.disconnect(fd);
    await pollUntil(
      // (A reset reaches a writer that read the end as EPIPE.)
      () => resetAfterEnd(origin) || origin.seen.some((seen) => /^error (ECONNRESET|EPIPE)$/.test(seen)),
      () => `the origin connection reset (${JSON.stringify(origin.seen)}, ${JSON.stringify(native.probe(origin.fd))})`,
    );
    client.destroy();
    origin.tcp.destroy();
    await socketsBackTo(before);
    await thread.worker.terminate();
  }, 30_000);
});

/**
 * Waits until the relay stopped reading the client's end (its count of bytes read held for five polls) with the
 * client still holding bytes it could not send: every buffer on the way is full.
 */
async function relayReadsStopped(
  thread: { bytesToOrigin(): number; state(): string | undefined },
  client: Socket,
): Promise<void> {
  let seen = -1;
  let unchanged = 0;
  await pollUntil(
    () => {
      // Asleep with bytes waiting for it, and its count the same at each reading: it stopped reading. (A count that
      // stays while the thread waits for a CPU says nothing: a run at a load of 20 took that for the stop, and the
      // thread read 64 KiB more once it ran.)
      const now = thread.bytesToOrigin();
      const asleep = thread.state() === 'S';
      unchanged = asleep && now === seen ? unchanged + 1 : 0;
      seen = now;
      return unchanged >= 5 && client.writableLength > 0;
    },
    () =>
      `the relay's reads stopped (${thread.bytesToOrigin()} bytes read, ${client.writableLength} unsent, thread ${thread.state()})`,
  );
}
