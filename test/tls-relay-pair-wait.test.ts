// A warm TLS relay thread (daemon/tls-relay-thread.ts, from dist/: npx tsc -p .) keeps relaying its sessions while
// one session's loopback pair waits for its own connection (daemon/loopback-pair.ts): a local user spraying
// 127.0.0.1 ports can make that wait last a second or more where the kernel refuses the pair's socket filter, and
// the thread relays other clients' sessions. The thread is started here as TlsRelays starts it, plus its test seam
// (`testSeams`): an `open` with `spray` has 9 strangers land on each of its pair's listeners before ours, which fills
// their queues, so that our SYN waits for its retransmit (a second) and the pair waits with it; the thread says so
// (`pair-waiting`). The origin is this process's node:tls echo server over a loopback pair per session; the sockets
// of this process (the thread's included) are counted before and after (sockets only: see test/tls-relay-queue's
// note on the thread's own fds).
import { once } from 'node:events';
import { Socket } from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitForLoopbackPair } from '../daemon/loopback-pair.js';
import type { RelayRequest } from '../daemon/tls-relay.js';
import * as native from '../shared/native.js';
import { pollUntil, socketCount, socketsBackTo } from './fixtures/native-helpers.js';
import { repoRoot } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

type ThreadMessage =
  | { t: 'ready'; id: number; fd: number }
  | { t: 'failed'; id: number; code: string }
  | { t: 'pair-waiting'; id: number };

let pki: TestPki;
beforeAll(() => {
  pki = createTestPki(['localhost']);
});
afterAll(() => pki.cleanup());

/** A relay thread with its test seam, and what it said, in order. */
function startThread() {
  const worker = new Worker(join(repoRoot, 'dist', 'daemon', 'tls-relay-thread.js'), {
    workerData: {
      counters: new SharedArrayBuffer(6 * 8),
      // Its beat and its tid (TlsRelays#spawn).
      heartbeat: new SharedArrayBuffer(2 * 4),
      nice: 0,
      testSeams: true,
    },
  });
  const said: ThreadMessage[] = [];
  const listeners = new Set<() => void>();
  worker.on('message', (message: ThreadMessage) => {
    said.push(message);
    for (const listener of listeners) listener();
  });
  /** Resolves with the thread's first message of kind `t` about session `id`. */
  const next = <T extends ThreadMessage['t']>(id: number, ...kinds: T[]) =>
    new Promise<Extract<ThreadMessage, { t: T }>>((resolve) => {
      const look = () => {
        const found = said.find((message) => message.id === id && (kinds as string[]).includes(message.t));
        if (!found) return;
        listeners.delete(look);
        resolve(found as Extract<ThreadMessage, { t: T }>);
      };
      listeners.add(look);
      look();
    });
  const origins = new Map<number, { tls: tls.TLSSocket; tcp: Socket }>();
  /**
   * Session `id`: a TCP connection to an echo origin (a loopback pair: the thread gets one end, this process's TLS
   * server the other) handed to the thread, which owns it from the message on.
   */
  const open = (id: number, spray = false, timeoutMs = 30_000) => {
    const [near, far] = native.loopbackPair();
    const tcp = new Socket({ fd: far, readable: true, writable: true });
    tcp.on('error', () => {});
    const origin = new tls.TLSSocket(tcp, {
      isServer: true,
      cert: pki.cert,
      key: pki.key,
    });
    origin.on('error', () => {});
    origin.on('data', (chunk: Buffer) => origin.write(chunk));
    origins.set(id, { tls: origin, tcp });
    const request: RelayRequest = {
      t: 'open',
      id,
      fd: near,
      host: 'localhost',
      port: 443,
      ca: pki.ca.toString(),
      contextKey: 'test-ca',
      timeoutMs,
      spray,
    };
    worker.postMessage(request);
  };
  return { worker, said, next, open, origins };
}

/** One round trip through a relayed session: resolves with what came back. */
function echo(client: Socket, text: string): Promise<string> {
  return new Promise((resolve) => {
    let got = '';
    const onData = (chunk: Buffer) => {
      got += chunk.toString();
      if (got.length >= text.length) {
        client.off('data', onData);
        resolve(got);
      }
    };
    client.on('data', onData);
    client.write(text);
  });
}

describe('a relay thread while one pair waits for its own connection', () => {
  it("keeps relaying another session's bytes during the wait, then makes the pair", async () => {
    const before = socketCount();
    const thread = startThread();
    thread.open(1);
    const first = await thread.next(1, 'ready', 'failed');
    expect(first.t).toBe('ready');
    const client = new Socket({ fd: (first as { fd: number }).fd, readable: true, writable: true });
    client.on('error', () => {});
    expect(await echo(client, 'warm-up')).toBe('warm-up');

    // Session 2's pair finds its listeners' queues full, and waits.
    thread.open(2, true);
    await thread.next(2, 'pair-waiting');
    // The order things happen in: session 1's round trips, started once session 2's pair waits, and session 2's
    // outcome. A thread blocked in that wait would relay nothing until the pair was made: its `ready` first.
    const events: string[] = [];
    const second = thread.next(2, 'ready', 'failed').then((message) => {
      events.push(`session 2 ${message.t}`);
      return message;
    });
    for (let round = 1; round <= 3; round++) {
      expect(await echo(client, `round ${round}`)).toBe(`round ${round}`);
      events.push(`session 1 round ${round}`);
    }
    const made = await second;
    expect(events).toEqual(['session 1 round 1', 'session 1 round 2', 'session 1 round 3', 'session 2 ready']);
    // The pair made after the wait is ours, and relays.
    const late = new Socket({ fd: (made as { fd: number }).fd, readable: true, writable: true });
    late.on('error', () => {});
    expect(await echo(late, 'after the wait')).toBe('after the wait');

    for (const socket of [client, late]) socket.destroy();
    for (const origin of thread.origins.values()) origin.tls.destroy();
    await thread.worker.terminate();
    await socketsBackTo(before);
  });

  it("closes the waiting pair when its session's handshake timer ends it meanwhile: nothing left open", async () => {
    const before = socketCount();
    const thread = startThread();
    // The timer (started with the handshake) ends the session during the wait: our SYN's retransmit comes a second
    // after the handshake, the timer 800 ms after its start.
    thread.open(1, true, 800);
    const first = await thread.next(1, 'pair-waiting', 'failed');
    expect(first.t, 'the handshake itself took over 800 ms').toBe('pair-waiting');
    const outcome = await thread.next(1, 'ready', 'failed');
    expect(outcome).toMatchObject({ t: 'failed', code: 'ETIMEDOUT' });
    // Checked before the thread ends (its teardown would close what it still held): the origin's end is this test's.
    for (const origin of thread.origins.values()) origin.tls.destroy();
    await socketsBackTo(before);
    await thread.worker.terminate();
  });

  it('ends the session when its origin hangs up during the wait: the pair closed, nothing left open', async () => {
    const before = socketCount();
    const thread = startThread();
    thread.open(1, true);
    await thread.next(1, 'pair-waiting');
    // The origin ends the connection cleanly (close_notify, FIN) while the pair waits for our SYN's retransmit (a
    // second away). (A reset was seen already: the TLS socket reads ahead, and a read error fails the session.)
    for (const origin of thread.origins.values()) origin.tls.end();
    // Seen now, not once the pair is made: a `ready` would hand out a session whose origin is gone.
    expect(await thread.next(1, 'ready', 'failed')).toMatchObject({ t: 'failed', code: 'EOF' });
    // The wait's listener and client closed with it, checked before the thread ends (its teardown closes the rest).
    await socketsBackTo(before);
    await thread.worker.terminate();
  });

  it("keeps what the origin sends during the wait for the session's client", async () => {
    const before = socketCount();
    const thread = startThread();
    thread.open(1, true);
    await thread.next(1, 'pair-waiting');
    // Unprompted, as an h2 server's SETTINGS: read during the wait, it must still reach the client first.
    for (const origin of thread.origins.values()) origin.tls.write('sent during the wait;');
    const made = await thread.next(1, 'ready', 'failed');
    expect(made.t).toBe('ready');
    const client = new Socket({ fd: (made as { fd: number }).fd, readable: true, writable: true });
    client.on('error', () => {});
    let got = '';
    client.on('data', (chunk: Buffer) => {
      got += chunk.toString();
    });
    client.write(' echoed');
    // In order: the kept bytes, if relayed, come before the echo.
    await pollUntil(
      () => got.endsWith(' echoed'),
      () => `the echo (${JSON.stringify(got)} so far)`,
    );
    expect(got).toBe('sent during the wait; echoed');
    client.destroy();
    for (const origin of thread.origins.values()) origin.tls.destroy();
    await thread.worker.terminate();
    await socketsBackTo(before);
  });

  it('ends the session when its origin sends more than the relay keeps before a request, during the wait', async () => {
    const before = socketCount();
    const thread = startThread();
    thread.open(1, true);
    await thread.next(1, 'pair-waiting');
    // Over MAX_EARLY_BYTES (16 KiB), which relay() would not keep either: not an idle HTTP connection.
    for (const origin of thread.origins.values()) origin.tls.write(Buffer.alloc(80 * 1024, 'x'));
    expect(await thread.next(1, 'ready', 'failed')).toMatchObject({ t: 'failed', code: 'EPROTO' });
    for (const origin of thread.origins.values()) origin.tls.destroy();
    await socketsBackTo(before);
    await thread.worker.terminate();
  });

  it('closes the waiting pair when the thread ends meanwhile (the daemon stopping): nothing left open', async () => {
    const before = socketCount();
    const thread = startThread();
    thread.open(1, true);
    await thread.next(1, 'pair-waiting');
    await thread.worker.terminate();
    for (const origin of thread.origins.values()) origin.tls.destroy();
    await socketsBackTo(before);
  });
});

describe('waitForLoopbackPair', () => {
  it('closes strangers as they come, and gives up after its bound with ETIMEDOUT, closing both fds', async () => {
    const before = socketCount();
    // The client is never connected here: ours never arrives.
    const [listener, client] = native.loopbackPairListen();
    const port = native.localAddress(listener).port;
    const strangers = Array.from({ length: 3 }, () => {
      const socket = new Socket();
      socket.on('error', () => {});
      socket.connect(port, '127.0.0.1');
      return socket;
    });
    const outcome = new Promise<Error | null>((resolve) => {
      waitForLoopbackPair({ listener, client, waitMs: 200 }, (error) => resolve(error));
    });
    // Each stranger is let in and closed: it reads EOF.
    await Promise.all(strangers.map((socket) => once(socket, 'end')));
    const error = (await outcome) as Error & { code?: string };
    expect(error.code).toBe('ETIMEDOUT');
    for (const socket of strangers) socket.destroy();
    await socketsBackTo(before);
  });

  it('once abandoned, never calls back and leaves nothing open', async () => {
    const before = socketCount();
    const [listener, client] = native.loopbackPairListen();
    let called = false;
    const abandon = waitForLoopbackPair({ listener, client, waitMs: 50 }, () => {
      called = true;
    });
    abandon();
    expect(socketCount()).toBe(before);
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(called).toBe(false);
  });
});
