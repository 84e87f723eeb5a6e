// How a relayed warm TLS lease's end reaches its origin. The client's end of the session's loopback pair ends (the
// daemon resets it when the lease ends: `closed`, a release, the client's session gone; or the client resets it
// itself through its copy), and the relay (daemon/tls-relay-thread.ts) ends the origin's TLS as a direct client's
// clean close would: close_notify, then FIN. It reset the origin's connection instead, so an origin logged a reset
// for every lease. Real daemon process, a Python TLS origin (test/fixtures/close-outcome-origin.py) that tells a
// close_notify from a bare FIN and from a reset, a throwaway CA; the daemon's fds counted before and after.
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import type { LeaseReply } from '../shared/protocol.js';
import { eventually, startTestDaemon, warmOneTlsSession, warmTlsArgs } from './fixtures/client-helpers.js';
import { spawnChild } from './helpers/children.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

const script = join(import.meta.dirname, 'fixtures', 'close-outcome-origin.py');

let pki: TestPki;
let trust: string;
let port: number;
let daemon: DaemonProcess;
let raw: RawClient;
/** The daemon's fds with its relay thread started and one warm session idle (three fds: its two ends and TCP). */
let fdsWhileIdle: number;
/** How the origin saw each tagged connection end (close-outcome-origin.py's `ended TAG HOW`). */
const endings = new Map<string, string>();
const cleanups: Array<() => unknown> = [];

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  trust = createHash('sha256').update(readFileSync(pki.caFile)).digest('hex');
  const certFile = join(pki.dir, 'origin-cert.pem');
  const keyFile = join(pki.dir, 'origin-key.pem');
  writeFileSync(certFile, pki.cert);
  writeFileSync(keyFile, pki.key);
  const origin = spawnChild('python3', [script, certFile, keyFile], {
    stdio: ['ignore', 'pipe', 'inherit'],
    what: 'close-outcome origin',
  });
  cleanups.push(() => origin.kill());
  const lines = createInterface({ input: origin.stdout! });
  port = await new Promise<number>((resolve) => {
    lines.on('line', (line) => {
      const [word, tag, ...how] = line.split(' ');
      if (word === 'port') resolve(Number(tag));
      else if (word === 'ended') endings.set(tag!, how.join(' '));
    });
  });
  daemon = await startTestDaemon([port], { extraArgs: warmTlsArgs(pki.caFile, [port], [`localhost:${port}`]) });
  raw = openRawClient(daemon.socketPath, cleanups);
  // The relay thread starts with the first handshake: one session warmed ahead, which the first test takes.
  await warmOneTlsSession(raw, port, trust);
  fdsWhileIdle = daemon.fdCount();
});

afterAll(async () => {
  await daemon?.stop();
  for (const cleanup of cleanups.reverse()) await cleanup();
  pki?.cleanup();
});

/**
 * A relayed lease from `client` on which a complete exchange went: the client sent its tag, the origin answered it,
 * and the client read the whole answer. Returns the client's socket on the lease's fd and the lease's id.
 */
async function spokenLease(client: RawClient, id: number, tag: string) {
  const reply = await client.request({ type: 'acquire', id, host: 'localhost', port, tls: { trust } });
  const lease = reply.message as LeaseReply;
  expect(lease).toMatchObject({ type: 'lease', tls: { version: expect.any(String) } });
  const fd = reply.fds[0]!;
  const socket = new net.Socket({ fd, readable: true, writable: true, allowHalfOpen: true });
  socket.on('error', () => {});
  let got = '';
  socket.on('data', (chunk: Buffer) => {
    got += chunk.toString();
  });
  socket.write(`${tag}\n`);
  await eventually(
    () => got === `${tag} ok\n`,
    () => `the origin's answer (got ${JSON.stringify(got)})`,
  );
  return { socket, fd, leaseId: lease.leaseId };
}

/** How the origin saw the connection tagged `tag` end. */
async function ending(tag: string): Promise<string> {
  await eventually(() => endings.has(tag), `the origin's end of ${tag}`, 15_000);
  return endings.get(tag)!;
}

describe("a relayed lease's end, at its origin", () => {
  it('a client that closes its end after a complete response: the origin reads close_notify, then FIN', async () => {
    const { socket, leaseId } = await spokenLease(raw, 1, 'closes');
    socket.destroy();
    raw.sendJson({ type: 'closed', leaseId });
    expect(await ending('closes')).toBe('close_notify+fin');
  }, 20_000);

  it('a client that resets its end: the origin reads close_notify, then FIN', async () => {
    const { socket, fd, leaseId } = await spokenLease(raw, 2, 'resets');
    // A reset of the client's end for every copy (connect AF_UNSPEC), while its lease is still held.
    native.disconnect(fd);
    expect(await ending('resets')).toBe('close_notify+fin');
    socket.destroy();
    raw.sendJson({ type: 'closed', leaseId });
  }, 20_000);

  it("a client whose session with the daemon ends (its process gone): the lease's origin reads close_notify, then FIN", async () => {
    const gone = openRawClient(daemon.socketPath, cleanups);
    const { socket } = await spokenLease(gone, 3, 'gone');
    socket.destroy();
    gone.close();
    expect(await ending('gone')).toBe('close_notify+fin');
  }, 20_000);

  it("every ended lease's fds are closed", async () => {
    await eventually(
      () => daemon.fdCount() === fdsWhileIdle - 3,
      () =>
        `${daemon.fdCount()} daemon fds against ${fdsWhileIdle - 3} expected (${fdsWhileIdle} with one session idle)`,
    );
  });
});
