// A warm-TLS sockpoold whose relay thread never ends still stops: the stop waits for the thread's terminate() a
// bounded time (daemon/tls-relay.ts, RELAY_TERMINATE_LIMIT_MS), logs the thread by name, finishes (history written,
// sockets closed) and the process ends with _exit, status 1, instead of process.exit(), which joins worker threads
// and would wait for ever. The thread is made to never end from outside, as a debugger would (no hook in the
// daemon): the daemon runs with --inspect, and through its inspector the relay thread is told to read a FIFO that
// nobody writes, so it blocks in read(2), where terminate() (which stops JavaScript, not a system call) cannot reach
// it. Without that the same daemon stops with status 0 and no such line. A stop that fails part-way (made to throw the
// same way, through the inspector) with such a thread exits 1 too, its failure logged and its history written. A
// session lent when the daemon stops or is killed ends for its client with a reset, never a clean end, as the relay
// ends every session its origin did not end cleanly. Real daemon child processes, a real node:https origin, a
// throwaway CA.

import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import * as native from '../shared/native.js';
import type { LeaseReply } from '../shared/protocol.js';
import {
  eventually,
  fdCount,
  httpsOrigin,
  type Origin,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import { type DaemonProcess, logRecords, repoRoot } from './helpers/daemon.js';
import { DaemonInspector } from './helpers/inspector.js';
import { openRawClient } from './helpers/raw-client.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let origin: Origin;
let dir: string;
let fifo: string;
const daemons: DaemonProcess[] = [];
/** Linux's TCP_CLOSE_WAIT (include/net/tcp_states.h): the peer's FIN arrived, this side has not closed. */
const TCP_CLOSE_WAIT = 8;

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  origin = await httpsOrigin(pki, (request, response) => {
    if (request.url === '/complete') {
      // Ended cleanly: all of it, then the connection's close (close_notify and FIN).
      response.writeHead(200, { connection: 'close', 'content-length': String(64 * 1024) });
      response.end(Buffer.alloc(64 * 1024, 0x62));
      return;
    }
    if (request.url !== '/until-close') {
      response.end('ok');
      return;
    }
    // A body read until the connection closes (no length, no chunks): its first 64 KiB, then nothing more, so it is
    // not over when the daemon stops. Only a reset tells its client that.
    request.resume();
    response.writeHead(200, { connection: 'close' });
    response.write(Buffer.alloc(64 * 1024, 0x61));
  });
  dir = mkdtempSync(join(tmpdir(), 'sockpool-stop-bound-'));
  fifo = join(dir, 'relay-block');
  execFileSync('mkfifo', [fifo]);
});

afterAll(async () => {
  // A daemon a failed test left running (its stop hung): killed, so that the file ends.
  for (const daemon of daemons) daemon.child.kill('SIGKILL');
  await origin?.close();
  pki?.cleanup();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** The daemon's stop (SIGTERM), failing after 30 s (a bound, not a timing: the stop itself waits at most 3 s for a
 *  thread) with the daemon's last log lines instead of hanging the file. */
async function stopBounded(daemon: DaemonProcess): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const lines = daemon.output().split('\n').slice(-15).join('\n');
      reject(new Error(`the daemon did not stop within 30 s; its last log lines:\n${lines}`));
    }, 30_000);
  });
  try {
    return await Promise.race([daemon.stop(), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Whether a thread of process `pid` is blocked reading `fifo`: the process holds it open, and a thread of it
 *  sleeps in the kernel's pipe read (its wchan, readable by the daemon's own user: the test's). */
function blockedOnFifo(pid: number, fifo: string): boolean {
  const holds = readdirSync(`/proc/${pid}/fd`).some((fd) => {
    try {
      return readlinkSync(`/proc/${pid}/fd/${fd}`) === fifo;
    } catch {
      return false; // closed meanwhile
    }
  });
  if (!holds) return false;
  return readdirSync(`/proc/${pid}/task`).some((task) => {
    try {
      return /pipe/.test(readFileSync(`/proc/${pid}/task/${task}/wchan`, 'utf8'));
    } catch {
      return false; // ended meanwhile
    }
  });
}

/** Makes the daemon's relay thread (started by a request) block in read(2) on the FIFO, through its inspector: a
 *  JavaScript call that terminate() cannot interrupt. */
async function blockRelayThread(inspector: DaemonInspector, daemon: DaemonProcess): Promise<void> {
  const relay = await inspector.workerSession(/sockpoold tls relay/);
  // Opened read-write: the open returns at once, and no EOF ever comes (the thread is a writer too).
  await inspector.evaluateInWorker(
    relay,
    `setImmediate(() => {
        const fs = process.getBuiltinModule('node:fs');
        fs.readSync(fs.openSync(${JSON.stringify(fifo)}, fs.constants.O_RDWR), Buffer.alloc(1));
      }); undefined`,
  );
  await eventually(() => blockedOnFifo(daemon.child.pid!, fifo), 'the relay thread blocked on the FIFO');
}

/**
 * A warm-TLS daemon under its inspector (worker sessions on), with a client whose first request started the relay
 * thread and was relayed by it. The test stops the daemon (one a failed test left running is killed in afterAll:
 * `daemons`) and closes the client.
 */
async function inspectedDaemonWithRelay(config?: Record<string, unknown>): Promise<{
  daemon: DaemonProcess;
  inspector: DaemonInspector;
  client: SockpoolClient;
}> {
  const daemon = await startTestDaemon([origin.port], {
    extraArgs: warmTlsArgs(pki.caFile, [origin.port]),
    nodeArgs: ['--inspect=127.0.0.1:0'],
    ...(config ? { config } : {}),
  });
  daemons.push(daemon);
  const inspector = await DaemonInspector.connect(daemon.output());
  await inspector.call('NodeWorker.enable', { waitForDebuggerOnStart: false });
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, caFile: pki.caFile });
  expect((await client.request(`https://localhost:${origin.port}/`)).body.toString()).toBe('ok');
  return { daemon, inspector, client };
}

/**
 * A warm-TLS daemon (its origin prewarmed) and a relayed session it lent, taken on the raw protocol and held as a plain
 * socket, as a client reading a body until close does (`paused`: created without reading). The test stops the
 * daemon, destroys the socket and runs `cleanups` (the raw client).
 */
async function relayedLease(options: { paused?: boolean } = {}): Promise<{
  daemon: DaemonProcess;
  socket: net.Socket;
  fd: number;
  cleanups: Array<() => unknown>;
}> {
  const daemon = await startTestDaemon([origin.port], {
    extraArgs: warmTlsArgs(pki.caFile, [origin.port], [`localhost:${origin.port}`]),
  });
  daemons.push(daemon);
  const cleanups: Array<() => unknown> = [];
  const trust = createHash('sha256').update(readFileSync(pki.caFile)).digest('hex');
  const raw = openRawClient(daemon.socketPath, cleanups);
  const reply = await raw.request({ type: 'acquire', id: 1, host: 'localhost', port: origin.port, tls: { trust } });
  expect(reply.message?.type).toBe('lease');
  expect((reply.message as LeaseReply).tls).toBeDefined();
  const fd = reply.fds[0]!;
  // Ownership of the lent fd passes to the net.Socket.
  native.untrack(fd);
  const socket = new net.Socket({
    fd,
    readable: true,
    writable: true,
    pauseOnCreate: options.paused === true,
  } as net.SocketConstructorOpts);
  return { daemon, socket, fd, cleanups };
}

/** How `socket`'s peer ends it: 'end (FIN)', or 'error CODE'. */
function howItEnds(socket: net.Socket): Promise<string> {
  return new Promise((resolve) => {
    socket.once('end', () => resolve('end (FIN)'));
    socket.once('error', (error: NodeJS.ErrnoException) => resolve(`error ${error.code}`));
  });
}

describe('a warm-TLS daemon stopped', () => {
  for (const stuck of [false, true]) {
    it(stuck
      ? 'with a relay thread that never ends: logs it, finishes its stop and exits 1 without joining it'
      : 'with its relay thread ending normally: exits 0', async () => {
      const before = fdCount();
      const daemon = await startTestDaemon([origin.port], {
        extraArgs: warmTlsArgs(pki.caFile, [origin.port]),
        ...(stuck ? { nodeArgs: ['--inspect=127.0.0.1:0'] } : {}),
      });
      daemons.push(daemon);
      const inspector = stuck ? await DaemonInspector.connect(daemon.output()) : undefined;
      await inspector?.call('NodeWorker.enable', { waitForDebuggerOnStart: false });
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, caFile: pki.caFile });
      // The request starts the relay thread (threads start with the first handshake) and is relayed by it.
      expect((await client.request(`https://localhost:${origin.port}/`)).body.toString()).toBe('ok');
      if (inspector) {
        await blockRelayThread(inspector, daemon);
        inspector.close();
      }

      expect(await stopBounded(daemon)).toBe(stuck ? 1 : 0);

      const left = logRecords(daemon, 'TLS relay thread did not end after terminate(); the stop goes on without it');
      const stopped = logRecords(daemon, 'sockpoold stopped');
      // The stop finished either way: history written and sockets closed before this line.
      expect(stopped).toHaveLength(1);
      if (stuck) {
        expect(left).toEqual([expect.objectContaining({ thread: expect.stringMatching(/^TLS relay thread 0 /) })]);
        expect(stopped[0]).toMatchObject({ threadsLeft: [left[0]!.thread] });
        expect(logRecords(daemon, 'unclean stop: threads left running; exiting without joining them')).toHaveLength(1);
      } else {
        expect(left).toEqual([]);
        expect(stopped[0]!.threadsLeft).toBeUndefined();
      }
      // Nothing of the client or of the daemon is left open here.
      await client.close();
      await eventually(() => fdCount() - origin.openSockets() <= before, `fds back to ${before}`);
    }, 60_000);
  }

  // A stop that fails part-way (Sockpoold.stop() rejects) with a relay thread that never ends: the entry point logs
  // "unclean stop" and ends the process with _exit (daemon/command.ts), as it does for a thread left running by a stop
  // that finished; process.exit() there would join the thread and wait for ever (with process.exit(1) put back this
  // test failed: the line logged, the process never ended). The failure is made from outside through the inspector,
  // in the daemon's main thread (no hook in the daemon): its handoff server (found with Runtime.queryObjects) gets a
  // disconnectAll() that throws, which the stop calls before it ends the relay threads. The steps after the failed
  // one that keep what the daemon learned still run: the relay threads are asked to end (this one is named as left
  // running) and the history is written (its timed flush is off here, so only the stop can have written it; before,
  // the rejection skipped both).
  it('whose stop fails part-way, with a relay thread that never ends: writes its history, logs it and exits 1', async () => {
    const before = fdCount();
    const { daemon, inspector, client } = await inspectedDaemonWithRelay({ pool: { statsFlushMs: 600_000 } });
    await blockRelayThread(inspector, daemon);
    // The daemon's own module instance: require() of an ES module already loaded returns that one (import() is not
    // available to the inspector's evaluations).
    const module = join(repoRoot, 'dist', 'daemon', 'handoff-server.js');
    const servers = await inspector.objectsInMain(
      `process.getBuiltinModule('node:module').createRequire(${JSON.stringify(module)})(${JSON.stringify(module)}).HandoffServer.prototype`,
    );
    const patched = await inspector.callInMain(
      servers,
      `function () {
        if (this.length !== 1) return 'handoff servers: ' + this.length;
        this[0].disconnectAll = () => { throw new Error('disconnecting the clients failed (the test)'); };
        return 'patched';
      }`,
    );
    expect(patched).toBe('patched');
    inspector.close();

    expect(await stopBounded(daemon)).toBe(1);
    // Logged before the _exit (the logs are flushed first).
    expect(logRecords(daemon, 'unclean stop')).toEqual([
      expect.objectContaining({ err: 'disconnecting the clients failed (the test)' }),
    ]);
    expect(logRecords(daemon, 'sockpoold stopped')).toEqual([]);
    expect(
      logRecords(daemon, 'TLS relay thread did not end after terminate(); the stop goes on without it'),
    ).toHaveLength(1);
    const db = new Database(join(daemon.stateDir, 'sockpool.sqlite'), { readonly: true });
    try {
      const rows = db.prepare('SELECT origin_key FROM origins').all() as Array<{ origin_key: string }>;
      expect(rows.map((row) => row.origin_key)).toContainEqual(expect.stringContaining(`:${origin.port}`));
    } finally {
      db.close();
    }
    await client.close();
    await eventually(() => fdCount() - origin.openSockets() <= before, `fds back to ${before}`);
  }, 60_000);

  // The relay thread's close of a session it was relaying, by terminate() (the stop) or by the kernel (a kill), is
  // none of its teardowns: before the relay armed the reset of its end of the pair as the pair was made, that close
  // sent FIN, and this client read the cut body as complete ('end (FIN)').
  for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
    it(`by ${signal} while a lent session's response is under way: its client reads a reset, not a clean end`, async () => {
      const { daemon, socket, cleanups } = await relayedLease();
      try {
        let received = 0;
        socket.on('data', (chunk: Buffer) => {
          received += chunk.length;
        });
        const ended = howItEnds(socket);
        socket.write('GET /until-close HTTP/1.1\r\nhost: localhost\r\n\r\n');
        await eventually(() => received >= 64 * 1024, 'the first 64 KiB of the body');

        expect(await daemon.stop(signal)).toBe(signal === 'SIGTERM' ? 0 : null);

        expect(await ended).toBe('error ECONNRESET');
      } finally {
        socket.destroy();
        for (const cleanup of cleanups) await cleanup();
      }
    }, 60_000);

    // The other side of that reset: a clean end that reached the client's socket (the relay's FIN there) stays clean
    // across the stop or kill that follows, though the client has read none of it yet: the armed reset is for the
    // relay's end only, and a reset behind a FIN is not read. (The relay also disarms its reset once its FIN is in the
    // kernel, for a FIN still queued behind bytes a slow client has not taken; this test does not reach that state.)
    it(`by ${signal} after a lent session's origin ended cleanly, before its client read it: the client reads all of it and a clean end`, async () => {
      // Not reading yet: what the relay sends stays in this socket's receive queue, its FIN behind it.
      const { daemon, socket, fd, cleanups } = await relayedLease({ paused: true });
      try {
        socket.write('GET /complete HTTP/1.1\r\nhost: localhost\r\n\r\n');
        // CLOSE_WAIT: the relay's FIN arrived, so everything before it did too.
        await eventually(() => native.tcpCounters(fd, false).tcpState === TCP_CLOSE_WAIT, "the relay's FIN");

        await daemon.stop(signal);

        let received = '';
        const ended = howItEnds(socket);
        socket.on('data', (chunk: Buffer) => {
          received += chunk.toString('latin1');
        });
        socket.resume();
        expect(await ended).toBe('end (FIN)');
        expect(received).toMatch(/^HTTP\/1\.1 200 /);
        expect(received.endsWith(`\r\n\r\n${'b'.repeat(64 * 1024)}`)).toBe(true);
      } finally {
        socket.destroy();
        for (const cleanup of cleanups) await cleanup();
      }
    }, 60_000);
  }

  // The state the stop hung in (NOTES.md, twenty-first session): the relay resets a socket whose shutdown is pending.
  // Here its origin's TLS socket is ended (its TCP shutdown dispatched, not done yet) and, in the same tick, the
  // client's socket fails, so the teardown resets the origin's TCP socket. Driven from outside through the daemon's
  // inspector: the relay thread's own sockets (found with Runtime.queryObjects), its own handlers and teardown. With
  // resetAndDestroy() the reset failed with EINVAL and left that socket's handle open and dropped: the thread's
  // teardown never ended, so this daemon logged the thread as left running and exited 1.
  it('after resetting a session whose origin socket was shutting down: every thread ends, exits 0', async () => {
    const before = fdCount();
    const { daemon, inspector, client } = await inspectedDaemonWithRelay();
    const relay = await inspector.workerSession(/sockpoold tls relay/);
    const tlsSockets = await inspector.objectsInWorker(
      relay,
      "process.getBuiltinModule('node:tls').TLSSocket.prototype",
    );
    const sockets = await inspector.objectsInWorker(relay, "process.getBuiltinModule('node:net').Socket.prototype");
    const outcome = (await inspector.callInWorker(relay, 'Runtime.callFunctionOn', {
      objectId: tlsSockets,
      arguments: [{ objectId: sockets }],
      returnByValue: true,
      functionDeclaration: `function (sockets) {
        const origins = this.filter((socket) => socket._handle && !socket.destroyed);
        const clients = sockets.filter((socket) => socket._handle?.constructor.name === 'TCP' && !origins.some((tls) => tls._parent === socket));
        if (origins.length !== 1 || clients.length !== 1) return 'sessions: ' + origins.length + ', clients: ' + clients.length;
        origins[0].end();
        clients[0].emit('error', Object.assign(new Error('write EPIPE (the test)'), { code: 'EPIPE' }));
        return 'reset';
      }`,
    })) as { result: { value: string } };
    expect(outcome.result.value).toBe('reset');
    inspector.close();

    expect(await stopBounded(daemon)).toBe(0);
    expect(logRecords(daemon, 'TLS relay thread did not end after terminate(); the stop goes on without it')).toEqual(
      [],
    );
    expect(logRecords(daemon, 'sockpoold stopped')).toHaveLength(1);
    await client.close();
    await eventually(() => fdCount() - origin.openSockets() <= before, `fds back to ${before}`);
  }, 60_000);
});
