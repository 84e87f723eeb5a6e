// The relay threads' closing places (daemon/tls-relay-thread.ts, clientGone: an origin's TLS closed cleanly once its
// relayed lease ended, its answer waited for a short bound) shared per uid, through a real daemon: the handoff server
// tells the relay thread whose lease a session is (TlsRelays.lent). Root: one client runs as another uid (nobody,
// 65534) under setpriv. The origin is a node:tls server in this process that never answers a close (allowHalfOpen),
// so every clean close holds its place to the bound; how each connection ended at the origin is its first event: `end`
// (close_notify, then FIN) or `error ECONNRESET` (reset). The daemon's fds are counted before and after: past the
// places, a lease's end takes the reset path, which once left a daemon fd open (NOTES, thirty-second session).

import { createHash } from 'node:crypto';
import { chmodSync, mkdtempSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RELAY_CLOSING_ORIGINS } from '../daemon/tls-relay.js';
import type { LeaseReply } from '../shared/protocol.js';
import { eventually, startTestDaemon, warmTlsArgs } from './fixtures/client-helpers.js';
import { spawnChild } from './helpers/children.js';
import { type DaemonProcess, repoRoot } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

const NOBODY = 65534;
/** Uid 65534's leases: more than every closing place, so that before, it took them all. */
const LEASES = RELAY_CLOSING_ORIGINS + 8;

let pki: TestPki;
let trust: string;
let port: number;
let daemon: DaemonProcess;
/** Each connection the origin accepted: its tag (the first line a client sent; '' for none) and its events. */
const connections: Array<{ tag: string; seen: string[] }> = [];
const cleanups: Array<() => unknown> = [];

beforeAll(async () => {
  if (process.getuid?.() !== 0) throw new Error('warm-tls-closing-share.system.test.ts runs a client as another uid');
  pki = createTestPki(['localhost']);
  trust = createHash('sha256').update(readFileSync(pki.caFile)).digest('hex');
  const sockets = new Set<tls.TLSSocket>();
  const server = tls.createServer({ cert: pki.cert, key: pki.key, allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    const connection = { tag: '', seen: [] as string[] };
    connections.push(connection);
    let got = '';
    socket.on('data', (chunk: Buffer) => {
      got += chunk.toString();
      if (connection.tag === '' && got.includes('\n')) connection.tag = got.split('\n', 1)[0]!;
    });
    socket.on('end', () => connection.seen.push('end'));
    socket.on('error', (error: Error & { code?: string }) => connection.seen.push(`error ${error.code}`));
    socket.on('close', () => connection.seen.push('close'));
  });
  server.listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('listening', resolve));
  // (A connection that read an end and was then reset sees nothing more: it is destroyed here.)
  cleanups.push(() => {
    for (const socket of sockets) socket.destroy();
    return new Promise((resolve) => server.close(resolve));
  });
  port = (server.address() as net.AddressInfo).port;
  // The socket in a directory every uid may traverse, open to every uid.
  const dir = mkdtempSync(join(tmpdir(), 'sockpoold-closing-share-'));
  chmodSync(dir, 0o755);
  daemon = await startTestDaemon([port], {
    socketPath: join(dir, 'sockpoold.sock'),
    config: { access: { socketMode: '0666' } },
    extraArgs: warmTlsArgs(pki.caFile, [port], [`localhost:${port}`]),
  });
});

afterAll(async () => {
  await daemon?.stop();
  for (const cleanup of cleanups.reverse()) await cleanup();
  pki?.cleanup();
});

/**
 * A client as uid 65534 that takes `count` relayed leases, says `held`, and exits (its session with the daemon gone,
 * the daemon ends every one of its leases at once) once its stdin closes. `resets`: it resets each lease's socket
 * itself first (connect AF_UNSPEC on its copy, the daemon's copy still held), then says `held`.
 */
function nobodyHolding(count: number, resets = false) {
  const script = `
    const native = require(${JSON.stringify(join(repoRoot, 'native/build/Release/sockpool_native.node'))});
    const [socketPath, port, trust, count, resets] = process.argv.slice(1);
    const fd = native.seqpacketConnect(socketPath);
    for (let id = 1; id <= Number(count); id++) {
      const acquire = { type: 'acquire', id, host: 'localhost', port: Number(port), tls: { trust } };
      native.sendMessage(fd, Buffer.from(JSON.stringify(acquire)), []);
    }
    let leases = 0;
    const poll = () => {
      // The raw binding answers [data, fds, eof] (shared/native.ts names the fields).
      for (let received; (received = native.recvMessage(fd, 65536, 4)); ) {
        if (received[2]) { console.log('eof'); process.exit(1); }
        const message = JSON.parse(received[0].toString());
        if (message.type !== 'lease') { console.log(JSON.stringify(message)); process.exit(1); }
        if (resets === 'resets') native.disconnect(received[1][0]);
        if (++leases === Number(count)) {
          console.log('held');
          process.stdin.on('data', () => {}).on('end', () => process.exit(0));
          return;
        }
      }
      setTimeout(poll, 5);
    };
    poll();`;
  const args = ['-e', script, daemon.socketPath, String(port), trust, String(count), resets ? 'resets' : ''];
  const child = spawnChild(process.execPath, args, {
    stdio: ['pipe', 'pipe', 'inherit'],
    uid: NOBODY,
    gid: NOBODY,
    what: 'a client as uid 65534',
  });
  cleanups.push(() => child.kill('SIGKILL'));
  const lines: string[] = [];
  createInterface({ input: child.stdout! }).on('line', (line) => lines.push(line));
  return { child, lines };
}

/**
 * A relayed lease of root's (this process), spoken on (`tag`) and held; its relay thread started with it, so that
 * the daemon's fds counted from here on are its leases' alone.
 */
async function rootLease(tag: string) {
  const raw = openRawClient(daemon.socketPath, cleanups);
  const reply = await raw.request({ type: 'acquire', id: 1, host: 'localhost', port, tls: { trust } });
  const lease = reply.message as LeaseReply;
  expect(lease).toMatchObject({ type: 'lease', tls: { version: expect.any(String) } });
  const socket = new net.Socket({ fd: reply.fds[0]!, readable: true, writable: true });
  socket.on('error', () => {});
  socket.write(`${tag}\n`);
  await eventually(() => connections.some((connection) => connection.tag === tag), `${tag}'s request at the origin`);
  return { raw, lease, socket };
}

describe('closing places shared per uid, through the daemon', () => {
  it("one uid ending more leases than there are closing places at once: another uid's lease end still closes its origin cleanly, and no daemon fd is left", async () => {
    // Root's lease (this process), spoken on and held: its end comes last.
    const { raw, lease, socket } = await rootLease('root');
    const fdsBefore = daemon.fdCount();
    // Uid 65534 takes its leases, then goes: every one of them ends at once.
    const nobody = nobodyHolding(LEASES);
    await eventually(
      () => nobody.lines.length > 0,
      () => `uid 65534's leases (${connections.length} connections at the origin)`,
      60_000,
    );
    expect(nobody.lines).toEqual(['held']);
    const theirs = connections.filter((connection) => connection.tag !== 'root');
    expect(theirs).toHaveLength(LEASES);
    nobody.child.stdin!.end();
    await eventually(
      () => theirs.every((connection) => connection.seen.length > 0),
      () => `uid 65534's origins' ends (${theirs.filter((connection) => connection.seen.length > 0).length} ended)`,
    );
    const closedCleanly = theirs.filter((connection) => connection.seen[0] === 'end').length;
    // Root's lease ends while uid 65534's are still closing (the bound is seconds): its origin reads close_notify
    // and FIN.
    socket.destroy();
    raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
    const root = connections.find((connection) => connection.tag === 'root')!;
    await eventually(
      () => root.seen.length > 0,
      () => `root's origin's end (${JSON.stringify(root.seen)})`,
    );
    expect(root.seen[0]).toBe('end');
    // Uid 65534 had at most half the places (a uid holding h takes one more while more than h are free); the rest
    // of its leases' origins were reset at once.
    expect(closedCleanly).toBeGreaterThan(0);
    expect(closedCleanly).toBeLessThanOrEqual(RELAY_CLOSING_ORIGINS / 2);
    // Every lease's fds are closed, the reset ones' too: the daemon is back to what it held before less root's lease
    // (its end of the pair, the relay's, the origin's socket).
    await eventually(
      () => daemon.fdCount() === fdsBefore - 3,
      () => `${daemon.fdCount()} daemon fds against ${fdsBefore - 3} expected (${fdsBefore} with root's lease)`,
    );
  }, 120_000);

  it('one uid resetting more leases than there are closing places while the daemon holds them: no daemon fd is left', async () => {
    const { raw, lease, socket } = await rootLease('root again');
    const fdsBefore = daemon.fdCount();
    const known = connections.length;
    // Each of uid 65534's clients resets its lease's socket (as the unfixed code left an fd after, NOTES), then goes.
    const nobody = nobodyHolding(LEASES, true);
    await eventually(
      () => nobody.lines.length > 0,
      () => `uid 65534's leases (${connections.length - known} connections at the origin)`,
      60_000,
    );
    expect(nobody.lines).toEqual(['held']);
    const theirs = connections.slice(known);
    expect(theirs).toHaveLength(LEASES);
    await eventually(
      () => theirs.every((connection) => connection.seen.length > 0),
      () => `uid 65534's origins' ends (${theirs.filter((connection) => connection.seen.length > 0).length} ended)`,
    );
    // Past its share, the reset path: some origins read a reset at once.
    expect(theirs.filter((connection) => connection.seen[0] === 'error ECONNRESET').length).toBeGreaterThan(0);
    nobody.child.stdin!.end();
    socket.destroy();
    raw.sendJson({ type: 'closed', leaseId: lease.leaseId });
    await eventually(
      () => daemon.fdCount() === fdsBefore - 3,
      () => `${daemon.fdCount()} daemon fds against ${fdsBefore - 3} expected (${fdsBefore} with root's lease)`,
    );
  }, 120_000);
});
