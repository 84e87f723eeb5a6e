// How the warm TLS relay (daemon/tls-relay-thread.ts) ends a relayed connection, as a direct TLS client would see
// it: an origin's half-close leaves the client's direction open; a client that half-closes after its request still
// gets a response that comes late (the relay lingers while the origin is silent for less than its idle timeout),
// then a clean end; an origin that resets the connection mid-response reaches the client as a reset (ECONNRESET
// after the bytes that came before), never as a clean end that would make a truncated body look complete; and the
// daemon's fds come back to where they were. Real daemon process, a raw node:tls origin with a throwaway CA whose
// behaviour each test picks by the first line the client sends; the 6 s pause is the scenario (a slow origin,
// longer than the relay's former fixed 5 s linger), not a wait for an event.
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { LeaseReply } from '../shared/protocol.js';
import { eventually, startTestDaemon, warmOneTlsSession, warmTlsArgs } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let server: net.Server;
let port: number;
let daemon: DaemonProcess;
let trust: string;
let raw: RawClient;
/** The daemon's fds with its relay thread started and one warm session idle (three fds: its two ends and TCP). */
let fdsWhileIdle: number;
const cleanups: Array<() => unknown> = [];
/** How the origin's TCP connection of the `hold` case ended (set by the test that sends it). */
let holdOutcome: ((how: string) => void) | undefined;
/** What the origin received in the `halfclose` case, once the client's direction ended. */
let halfCloseReceived: Promise<string> | undefined;

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  trust = createHash('sha256').update(readFileSync(pki.caFile)).digest('hex');
  server = net.createServer({ allowHalfOpen: true }, (tcp) => {
    tcp.on('error', () => {});
    const socket = new tls.TLSSocket(tcp, { isServer: true, cert: pki.cert, key: pki.key });
    let got = '';
    socket.on('error', (error: Error & { code?: string }) => {
      if (got.startsWith('hold\n')) holdOutcome?.(`error ${error.code}`);
    });
    socket.on('close', () => {
      if (got.startsWith('hold\n')) holdOutcome?.('close');
    });
    socket.on('data', (chunk: Buffer) => {
      got += chunk.toString();
      if (got === 'halfclose\n') {
        // The origin half-closes at once and keeps reading what the client still sends.
        socket.end('bye');
        halfCloseReceived = new Promise((resolve) => {
          socket.on('end', () => resolve(got));
          socket.on('close', () => resolve(got));
        });
      }
      if (got === 'hold\n') {
        // Bytes the client will never read: its close is then a reset, which the relay reads as the client failing.
        socket.write('unread');
      }
      if (got.startsWith('reset\n')) {
        // Half a response, then a TCP reset.
        socket.write('partial-', () => setTimeout(() => tcp.resetAndDestroy(), 200));
      }
    });
    socket.on('end', () => {
      if (got.startsWith('late\n')) {
        // A slow response: it comes 6 s after the client's half-close.
        setTimeout(() => socket.end('late reply'), 6_000);
      } else socket.end();
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  port = (server.address() as net.AddressInfo).port;
  daemon = await startTestDaemon([port], { extraArgs: warmTlsArgs(pki.caFile, [port], [`localhost:${port}`]) });
  raw = openRawClient(daemon.socketPath, cleanups);
  // The relay thread starts with the first handshake: one session warmed ahead, which the first test takes.
  await warmOneTlsSession(raw, port, trust);
  fdsWhileIdle = daemon.fdCount();
});

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await daemon?.stop();
  server?.close();
  pki?.cleanup();
});

/** A relayed session (connected for this acquire), its lease id and the raw client that holds the lease. */
async function relayedSocket(id: number) {
  const reply = await raw.request({ type: 'acquire', id, host: 'localhost', port, tls: { trust } });
  const lease = reply.message as LeaseReply;
  expect(lease.type).toBe('lease');
  expect(lease.tls).toBeDefined();
  const socket = new net.Socket({ fd: reply.fds[0]!, readable: true, writable: true, allowHalfOpen: true });
  return { socket, end: () => raw.sendJson({ type: 'closed', leaseId: lease.leaseId }) };
}

/** Resolves when `socket` closed, whether after an end or an error (once() would reject on the error). */
function closed(socket: net.Socket): Promise<unknown> {
  return new Promise((resolve) => socket.once('close', resolve));
}

describe('how the warm TLS relay ends a connection', () => {
  it("an origin's half-close leaves the client's direction open", async () => {
    const { socket, end } = await relayedSocket(1);
    let received = '';
    socket.on('data', (chunk: Buffer) => {
      received += chunk.toString();
    });
    socket.on('error', () => {});
    socket.write('halfclose\n');
    await once(socket, 'end');
    expect(received).toBe('bye');
    socket.write('after');
    socket.end();
    await eventually(() => halfCloseReceived !== undefined, 'the origin half-closed');
    const got = await halfCloseReceived;
    socket.destroy();
    end();
    expect(got).toBe('halfclose\nafter');
  }, 20_000);

  it('a client that half-closes after its request still gets a response that takes 6 s, then a clean end', async () => {
    const { socket, end } = await relayedSocket(2);
    let received = '';
    let error: (Error & { code?: string }) | undefined;
    socket.on('data', (chunk: Buffer) => {
      received += chunk.toString();
    });
    socket.on('error', (failure) => {
      error = failure;
    });
    socket.write('late\n');
    socket.end();
    await closed(socket);
    end();
    // As over a direct TLS connection: the response, then EOF.
    expect({ received, error: error?.code }).toEqual({ received: 'late reply', error: undefined });
  }, 20_000);

  it("an origin's reset mid-response reaches the client as a reset, not as a clean end", async () => {
    const { socket, end } = await relayedSocket(3);
    let received = '';
    let ended = false;
    let error: (Error & { code?: string }) | undefined;
    socket.on('data', (chunk: Buffer) => {
      received += chunk.toString();
    });
    socket.on('end', () => {
      ended = true;
    });
    socket.on('error', (failure) => {
      error = failure;
    });
    socket.write('reset\n');
    // Whichever comes first: a clean end (which the client could not tell from a complete response) or an error.
    await new Promise((resolve) => {
      socket.once('end', resolve);
      socket.once('error', resolve);
    });
    socket.destroy();
    end();
    // A direct TLS client reads what came before the reset, then ECONNRESET.
    expect({ received, ended, error: error?.code }).toEqual({
      received: 'partial-',
      ended: false,
      error: 'ECONNRESET',
    });
  }, 20_000);

  it("a client that abandons a response with bytes unread ends the origin's connection, and the daemon carries on", async () => {
    const { socket, end } = await relayedSocket(4);
    const originSaw = new Promise<string>((resolve) => {
      holdOutcome = resolve;
    });
    socket.on('error', () => {});
    // The client gives up on a response with bytes unread (as curl does when it abandons a transfer): at the lease's
    // end the daemon resets the lent socket, and the relay, its client gone, ends the origin's TLS (close_notify,
    // FIN), resetting it only if the origin has not closed within its bound (test/warm-tls-origin-close).
    let unread = 0;
    socket.once('readable', () => {
      unread = socket.readableLength;
    });
    socket.write('hold\n');
    await eventually(async () => unread > 0 || socket.readableLength > 0, "the origin's bytes");
    socket.destroy();
    end();
    // A close (this origin answers the relay's close_notify with its own end), or a reset: either way the origin's
    // connection is gone.
    expect(await originSaw).toMatch(/^(error ECONNRESET|close)$/);
    // The daemon is alive and still answers.
    const stats = await raw.request({ type: 'stats', id: 0 });
    expect(stats.message?.type).toBe('stats');
  }, 20_000);

  it("every relayed connection's fds are closed once it ended", async () => {
    await eventually(
      () => daemon.fdCount() === fdsWhileIdle - 3,
      () =>
        `${daemon.fdCount()} daemon fds against ${fdsWhileIdle - 3} expected (${fdsWhileIdle} with one session idle)`,
    );
  });
});
