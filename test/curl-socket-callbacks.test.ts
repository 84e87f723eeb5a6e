// node-libcurl's socket callbacks, added by patches/node-libcurl+5.1.2.patch: OPENSOCKETFUNCTION hands curl a TCP
// connection we made ourselves, SOCKOPTFUNCTION tells curl it is already connected, CLOSESOCKETFUNCTION gets it
// back. Real servers (HTTP and HTTPS with a CA made here), in the main thread and in worker threads; a worker
// terminated while curl caches a connection must not leak its fd (the addon closes it natively when no JavaScript
// can run), and neither must a handle that is garbage collected.
//
// Where the connected sockets come from: Node cannot duplicate an fd, so a test lends curl the fd of a net.Socket.
// Node keeps owning that fd: the socket is paused before it connects (Node never starts reading it), curl's
// CLOSESOCKETFUNCTION returns 0 without closing it, and socket.destroy() closes it once curl is done. The leak tests
// instead let curl open its own sockets (CLOSESOCKETFUNCTION only), which the callback closes with fs.closeSync.
import { once } from 'node:events';
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { createRequire } from 'node:module';
import net from 'node:net';
import { Worker } from 'node:worker_threads';
import {
  CURL_SOCKET_BAD,
  Curl,
  CurlCode,
  type CurlSockAddr,
  CurlSockOpt,
  CurlSockType,
  Easy,
  Multi,
} from 'node-libcurl';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { nativeAddonPath } from '../shared/native.js';
import { runChildToEnd } from './helpers/children.js';
import { eventually } from './helpers/daemon.js';
import { requirePrerequisite } from './helpers/require.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

const libcurlPath = createRequire(import.meta.url).resolve('node-libcurl');
const AF_INET = 2;
const SOCK_STREAM = 1;
const IPPROTO_TCP = 6;

function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

/** What /proc says fd `fd` of this process is (e.g. `socket:[1234]`), or null when it is not open. */
function fdTarget(fd: number): string | null {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return null;
  }
}

async function withDeadline<T>(what: string, promise: Promise<T>, timeoutMs = 5_000): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting until ${what}`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Whether this host can listen on `address` (IPv6 loopback can be disabled). */
/** Runs `script` in a Node process of its own (`args` after it, as process.argv[1...]), within 10 s. */
function runScript(script: string, ...args: string[]): ReturnType<typeof runChildToEnd> {
  return withDeadline('the process exits', runChildToEnd(process.execPath, ['-e', script, ...args]), 10_000);
}

async function canListen(address: string): Promise<boolean> {
  const probe = net.createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      probe.once('error', reject);
      probe.listen(0, address, resolve);
    });
    return true;
  } catch {
    return false;
  } finally {
    probe.close();
  }
}

interface TestServer {
  port: number;
  /** Every TCP connection the server accepted. */
  connections: net.Socket[];
  close(): Promise<void>;
}

async function startServer(pki?: TestPki): Promise<TestServer> {
  const handler: http.RequestListener = (request, response) => {
    response.end(`hello from ${request.url}`);
  };
  const server = pki ? https.createServer({ key: pki.key, cert: pki.cert }, handler) : http.createServer(handler);
  // Idle keep-alive connections must stay until the test closes them from the client side.
  server.keepAliveTimeout = 60_000;
  const connections: net.Socket[] = [];
  server.on('connection', (socket: net.Socket) => connections.push(socket));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as net.AddressInfo;
  return {
    port,
    connections,
    close: async () => {
      server.closeAllConnections();
      server.close();
      await once(server, 'close');
    },
  };
}

/** The part of a net.Socket's libuv handle we need. */
interface TcpHandle {
  fd: number;
  readStop(): number;
}

/** A TCP connection made by Node, whose fd we lend to curl (see the ownership note at the top). */
async function connectedSocket(port: number): Promise<{ socket: net.Socket; fd: number }> {
  const socket = net.connect({ host: '127.0.0.1', port });
  socket.pause(); // before 'connect': Node then never starts reading this socket
  await once(socket, 'connect');
  const handle = (socket as unknown as { _handle: TcpHandle })._handle;
  handle.readStop();
  expect(handle.fd).toBeGreaterThan(2);
  return { socket, fd: handle.fd };
}

interface Calls {
  open: { purpose: CurlSockType; address: CurlSockAddr }[];
  sockopt: { fd: number; purpose: CurlSockType }[];
  close: number[];
}

/** Makes curl use `fd` for its connection, and records the callbacks. */
function lendSocket(curl: Curl, fd: number): Calls {
  const calls: Calls = { open: [], sockopt: [], close: [] };
  curl.setOpt('OPENSOCKETFUNCTION', (purpose, address) => {
    calls.open.push({ purpose, address: { ...address } });
    return fd;
  });
  curl.setOpt('SOCKOPTFUNCTION', (socketFd, purpose) => {
    calls.sockopt.push({ fd: socketFd, purpose });
    return CurlSockOpt.AlreadyConnected;
  });
  curl.setOpt('CLOSESOCKETFUNCTION', (socketFd) => {
    calls.close.push(socketFd);
    return 0; // Node owns the fd and closes it
  });
  return calls;
}

interface CurlFailure extends Error {
  code?: number;
  cause?: unknown;
}

/** Performs `curl` (through node-libcurl's shared Multi handle) and closes it. */
function run(curl: Curl): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    curl.on('end', (status, body) => {
      curl.close();
      resolve({ status, body: String(body) });
    });
    curl.on('error', (error: CurlFailure, code) => {
      curl.close();
      error.code ??= code;
      reject(error);
    });
    curl.perform();
  });
}

function runFailure(curl: Curl): Promise<CurlFailure> {
  return run(curl).then(
    () => {
      throw new Error('the transfer succeeded');
    },
    (error: CurlFailure) => error,
  );
}

let pki: TestPki;
let server: TestServer;
let tlsServer: TestServer;

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  server = await startServer();
  tlsServer = await startServer(pki);
  // A first worker that loads the addon sets up what a process keeps (libuv's and libcurl's lazily opened fds),
  // so that the fd counts of the worker tests only see what those tests open.
  const warmUp = new Worker(`require(${JSON.stringify(libcurlPath)});`, { eval: true });
  await once(warmUp, 'exit');
});

afterAll(async () => {
  await server?.close();
  await tlsServer?.close();
  pki?.cleanup();
});

/**
 * Connects to `target` ourselves and lends the socket to a Curl set up by `configure` (curl closes the connection
 * when the transfer ends). Checks that the server saw exactly that one connection and that curl took, used and
 * closed our fd once; returns the response.
 */
async function runOverLentSocket(
  target: TestServer,
  configure: (curl: Curl) => void,
): Promise<{ status: number; body: string }> {
  const before = target.connections.length;
  const { socket, fd } = await connectedSocket(target.port);
  try {
    const curl = new Curl();
    configure(curl);
    curl.setOpt('FORBID_REUSE', true);
    const calls = lendSocket(curl, fd);
    const response = await run(curl);
    const accepted = target.connections.slice(before);
    expect(accepted).toHaveLength(1);
    expect(accepted[0]?.remotePort).toBe(socket.localPort);
    expectLentOnce(calls, fd, target.port);
    return response;
  } finally {
    socket.destroy();
  }
}

/** curl took our socket exactly once, for a connection to 127.0.0.1:port, was told it is connected, closed it. */
function expectLentOnce(calls: Calls, fd: number, port: number): void {
  expect(calls.open).toEqual([
    {
      purpose: CurlSockType.Ipcxn,
      address: {
        family: AF_INET,
        socktype: SOCK_STREAM,
        protocol: IPPROTO_TCP,
        address: '127.0.0.1',
        port: port,
      },
    },
  ]);
  expect(calls.sockopt).toEqual([{ fd, purpose: CurlSockType.Ipcxn }]);
  expect(calls.close).toEqual([fd]);
}

describe('a connection made by us, used by curl', () => {
  it('carries an HTTP transfer: one connection, the callbacks see our fd', async () => {
    const response = await runOverLentSocket(server, (curl) => {
      curl.setOpt('URL', `http://sockpool.test:${server.port}/plain`);
      curl.setOpt('RESOLVE', [`sockpool.test:${server.port}:127.0.0.1`]);
    });
    expect(response).toEqual({ status: 200, body: 'hello from /plain' });
  });

  it('carries an HTTPS transfer with certificate verification', async () => {
    const response = await runOverLentSocket(tlsServer, (curl) => {
      curl.setOpt('URL', `https://localhost:${tlsServer.port}/secure`);
      curl.setOpt('RESOLVE', [`localhost:${tlsServer.port}:127.0.0.1`]);
      // node-libcurl sets CAINFO_BLOB to Node's CA list, and a blob wins over CAINFO: trust only our CA.
      curl.setOpt('CAINFO_BLOB', null);
      curl.setOpt('CAINFO', pki.caFile);
      curl.setOpt('SSL_VERIFYPEER', true);
      curl.setOpt('SSL_VERIFYHOST', 2);
    });
    expect(response).toEqual({ status: 200, body: 'hello from /secure' });
  });

  it('works with Easy and Multi, and a duplicated handle calls its callbacks with itself as this', async () => {
    const { socket, fd } = await connectedSocket(server.port);
    const multi = new Multi();
    const original = new Easy();
    const closedBy: unknown[] = [];
    original.setOpt('URL', `http://127.0.0.1:${server.port}/dup`);
    original.setOpt('FORBID_REUSE', true);
    original.setOpt('OPENSOCKETFUNCTION', () => fd);
    original.setOpt('SOCKOPTFUNCTION', () => CurlSockOpt.AlreadyConnected);
    original.setOpt('CLOSESOCKETFUNCTION', function (this: Easy | undefined) {
      closedBy.push(this);
      return 0;
    });
    const chunks: Buffer[] = [];
    original.setOpt('WRITEFUNCTION', (data) => {
      chunks.push(Buffer.from(data));
      return data.length;
    });
    const copy = original.dupHandle();
    original.close();

    await multi.perform(copy);
    multi.removeHandle(copy);
    expect(Buffer.concat(chunks).toString()).toBe('hello from /dup');
    expect(closedBy).toEqual([copy]);
    copy.close();
    multi.close();
    socket.destroy();
  });
});

describe('callbacks that refuse or fail', () => {
  it('OPENSOCKETFUNCTION returning CURL_SOCKET_BAD fails with CURLE_COULDNT_CONNECT and connects nothing', async () => {
    const before = server.connections.length;
    const curl = new Curl();
    curl.setOpt('URL', `http://127.0.0.1:${server.port}/refused`);
    curl.setOpt('OPENSOCKETFUNCTION', () => CURL_SOCKET_BAD);
    const error = await runFailure(curl);
    expect(error.code).toBe(CurlCode.CURLE_COULDNT_CONNECT);
    // A marker connection through the same (first in, first out) accept queue: a connect curl made came in before.
    const marker = net.connect({ host: '127.0.0.1', port: server.port, localAddress: '127.0.0.2' });
    marker.on('error', () => {});
    const isMarker = (socket: net.Socket) => socket.remoteAddress === '127.0.0.2';
    await eventually(() => server.connections.some(isMarker), 'the marker connection accepted');
    marker.destroy();
    expect(server.connections.filter((socket) => !isMarker(socket)).length).toBe(before);
  });

  it('OPENSOCKETFUNCTION gets IPv6 addresses without brackets', async () => {
    requirePrerequisite(await canListen('::1'), 'an IPv6 loopback address (::1)');
    const addresses: CurlSockAddr[] = [];
    const curl = new Curl();
    curl.setOpt('URL', 'http://[::1]:8/');
    curl.setOpt('OPENSOCKETFUNCTION', (_purpose, address) => {
      addresses.push({ ...address });
      return CURL_SOCKET_BAD;
    });
    expect((await runFailure(curl)).code).toBe(CurlCode.CURLE_COULDNT_CONNECT);
    expect(addresses).toEqual([{ family: 10, socktype: SOCK_STREAM, protocol: IPPROTO_TCP, address: '::1', port: 8 }]);
  });

  it('an OPENSOCKETFUNCTION that throws fails the transfer with its error', async () => {
    const curl = new Curl();
    curl.setOpt('URL', `http://127.0.0.1:${server.port}/throws`);
    curl.setOpt('OPENSOCKETFUNCTION', () => {
      throw new Error('no socket for you');
    });
    const error = await runFailure(curl);
    expect(error.code).toBe(CurlCode.CURLE_ABORTED_BY_CALLBACK);
    expect(error.cause).toBeInstanceOf(Error);
    expect((error.cause as Error).message).toBe('no socket for you');

    // Easy#perform, synchronous: the error is thrown from perform().
    const easy = new Easy();
    easy.setOpt('URL', `http://127.0.0.1:${server.port}/throws-sync`);
    easy.setOpt('OPENSOCKETFUNCTION', () => {
      throw new Error('still no socket');
    });
    expect(() => easy.perform()).toThrow('still no socket');
    easy.close();
  });

  it('an OPENSOCKETFUNCTION returning something else than an fd fails the transfer with a TypeError', async () => {
    const curl = new Curl();
    curl.setOpt('URL', `http://127.0.0.1:${server.port}/wrong-type`);
    curl.setOpt('OPENSOCKETFUNCTION', (() => 'not an fd') as unknown as () => number);
    const error = await runFailure(curl);
    expect(error.cause).toBeInstanceOf(TypeError);
    expect((error.cause as Error).message).toMatch(/OPENSOCKET callback must be a file descriptor/);
  });

  it('a SOCKOPTFUNCTION that throws fails the transfer with its error', async () => {
    const curl = new Curl();
    curl.setOpt('URL', `http://127.0.0.1:${server.port}/sockopt-throws`);
    curl.setOpt('SOCKOPTFUNCTION', () => {
      throw new Error('bad socket options');
    });
    const error = await runFailure(curl);
    expect(error.code).toBe(CurlCode.CURLE_ABORTED_BY_CALLBACK);
    expect((error.cause as Error).message).toBe('bad socket options');
  });

  it('a CLOSESOCKETFUNCTION that throws still gets the socket closed', async () => {
    const curl = new Curl();
    let socketFd = -1;
    let target: string | null = null;
    curl.setOpt('URL', `http://127.0.0.1:${server.port}/close-throws`);
    curl.setOpt('FORBID_REUSE', true); // the transfer ends by closing its connection
    curl.setOpt('SOCKOPTFUNCTION', (fd) => {
      socketFd = fd;
      target = fdTarget(fd);
      return CurlSockOpt.Ok;
    });
    curl.setOpt('CLOSESOCKETFUNCTION', () => {
      throw new Error('cannot close');
    });
    // The error fails the transfer, and curl's socket is closed natively.
    const error = await runFailure(curl);
    expect((error.cause as Error).message).toBe('cannot close');
    expect(target).toMatch(/^socket:/);
    expect(fdTarget(socketFd)).not.toBe(target);
  });

  it('a CLOSESOCKETFUNCTION that returns 2 leaves the close to node-libcurl, which closes the socket after it', async () => {
    const curl = new Curl();
    let socketFd = -1;
    let target: string | null = null;
    let openInCallback = false;
    curl.setOpt('URL', `http://127.0.0.1:${server.port}/close-natively`);
    curl.setOpt('FORBID_REUSE', true);
    curl.setOpt('SOCKOPTFUNCTION', (fd) => {
      socketFd = fd;
      target = fdTarget(fd);
      return CurlSockOpt.Ok;
    });
    curl.setOpt('CLOSESOCKETFUNCTION', (fd) => {
      openInCallback = fdTarget(fd) === target;
      return 2;
    });
    expect(await run(curl)).toEqual({ status: 200, body: 'hello from /close-natively' });
    expect(openInCallback).toBe(true);
    expect(fdTarget(socketFd)).not.toBe(target);
  });

  it('a CLOSESOCKETFUNCTION returning 2, its thread terminated inside it, has the socket closed once: no other fd of that number', async () => {
    // What worker/socket-supply.ts does: the callback ends the lease and leaves the close to node-libcurl. A callback
    // that closed the fd itself and was then cut short (its worker terminated before it returned) had the number
    // closed natively a second time: by then another thread's fd (a reviewing helper showed it with /dev/null).
    const shared = new Int32Array(new SharedArrayBuffer(8));
    const worker = new Worker(
      `
      const { workerData } = require('node:worker_threads');
      const { Curl } = require(workerData.libcurlPath);
      const shared = workerData.shared;
      const curl = new Curl();
      curl.setOpt('URL', 'http://127.0.0.1:' + workerData.port + '/');
      curl.setOpt('FORBID_REUSE', true);
      curl.setOpt('CLOSESOCKETFUNCTION', (fd) => {
        Atomics.store(shared, 1, fd);
        Atomics.store(shared, 0, 1);
        Atomics.notify(shared, 0);
        for (;;) {} // cut short here by terminate(), before it returns 2
      });
      curl.perform();
      `,
      { eval: true, workerData: { libcurlPath, port: server.port, shared } },
    );
    while (Atomics.load(shared, 0) === 0) await new Promise((resolve) => setTimeout(resolve, 5));
    const fd = Atomics.load(shared, 1);
    const socket = fdTarget(fd);
    expect(socket).toMatch(/^socket:/);
    await worker.terminate();
    // The socket is closed (natively, once) …
    expect(fdTarget(fd)).not.toBe(socket);
    // … and a file of this thread that takes the number afterwards stays open: nothing closes that number again.
    const mine = openSync('/dev/null', 'r');
    try {
      await new Promise((resolve) => setTimeout(resolve, 50));
      expect(fdTarget(mine)).toBe('/dev/null');
    } finally {
      closeSync(mine);
    }
  });

  it('an OPENSOCKETFUNCTION whose thread is terminated after it returned, in the microtasks after it, still hands curl the fd: nothing left open', async () => {
    // What worker/socket-supply.ts does: the callback gives up its hold on the fd (untrack) and returns it. node-libcurl
    // called it through MakeCallback, which, for a callback at the top of the stack (curl opens sockets from its
    // timer), runs the microtask queue before returning, and a terminate() landing there lost the returned value: curl
    // got CURL_SOCKET_BAD and the fd, owned by nobody, stayed open with its connection.
    const shared = new Int32Array(new SharedArrayBuffer(8));
    const worker = new Worker(
      `
      const { workerData } = require('node:worker_threads');
      const { Curl } = require(workerData.libcurlPath);
      const native = require(workerData.addonPath);
      const shared = workerData.shared;
      const curl = new Curl();
      curl.setOpt('URL', 'http://127.0.0.1:' + workerData.port + '/');
      curl.setOpt('OPENSOCKETFUNCTION', () => {
        const fd = native.tcpSocket(4); // not tracked: the callback hands it on, as the worker's supply does
        native.connectStart(fd, '127.0.0.1', workerData.port);
        Atomics.store(shared, 1, fd);
        Promise.resolve().then(() => {
          Atomics.store(shared, 0, 1);
          Atomics.notify(shared, 0);
          for (;;) {} // cut short here by terminate()
        });
        return fd;
      });
      curl.setOpt('SOCKOPTFUNCTION', () => 2); // CURL_SOCKOPT_ALREADY_CONNECTED
      curl.perform();
      setInterval(() => {}, 5); // a turn of the loop runs the microtasks, wherever else they did not run
      `,
      { eval: true, workerData: { libcurlPath, addonPath: nativeAddonPath, port: server.port, shared } },
    );
    const deadline = Date.now() + 5_000;
    while (Atomics.load(shared, 0) === 0 && Date.now() < deadline)
      await new Promise((resolve) => setTimeout(resolve, 5));
    expect(Atomics.load(shared, 0)).toBe(1);
    const fd = Atomics.load(shared, 1);
    const socket = fdTarget(fd);
    expect(socket).toMatch(/^socket:/);
    await worker.terminate();
    await eventually(() => fdTarget(fd) !== socket, 'the socket is closed with the thread', 5_000);
  });

  it('null restores the default behaviour', async () => {
    const curl = new Curl();
    curl.setOpt('URL', `http://127.0.0.1:${server.port}/reset`);
    curl.setOpt('OPENSOCKETFUNCTION', () => CURL_SOCKET_BAD);
    curl.setOpt('SOCKOPTFUNCTION', () => CurlSockOpt.Error);
    curl.setOpt('CLOSESOCKETFUNCTION', () => 1);
    curl.setOpt('OPENSOCKETFUNCTION', null);
    curl.setOpt('SOCKOPTFUNCTION', null);
    curl.setOpt('CLOSESOCKETFUNCTION', null);
    expect(await run(curl)).toEqual({ status: 200, body: 'hello from /reset' });
  });
});

/** The inode of the socket `fd` is, or null. */
function socketInode(fd: number): number | null {
  const inode = /^socket:\[(\d+)\]$/.exec(fdTarget(fd) ?? '')?.[1];
  return inode === undefined ? null : Number(inode);
}

/** The files (by inode) that some epoll instance of this process watches, from /proc's fdinfo of each instance. */
function polledInodes(): Set<number> {
  const inodes = new Set<number>();
  for (const entry of readdirSync('/proc/self/fd')) {
    if (fdTarget(Number(entry)) !== 'anon_inode:[eventpoll]') continue;
    let info = '';
    try {
      info = readFileSync(`/proc/self/fdinfo/${entry}`, 'utf8');
    } catch {
      continue; // closed meanwhile
    }
    for (const match of info.matchAll(/^tfd:.*\bino:([0-9a-f]+)/gm)) inodes.add(Number.parseInt(match[1]!, 16));
  }
  return inodes;
}

/** A second fd of the same socket, made as the daemon gets its copy of a leased one (SCM_RIGHTS). */
function copyOf(fd: number): number {
  const [one, other] = native.seqpacketPair();
  try {
    native.sendMessage(one, new Uint8Array([1]), fd);
    const received = native.recvMessage(other, 16, 1);
    const copy = received?.fds[0];
    if (copy === undefined) throw new Error('no copy of the fd arrived');
    return copy;
  } finally {
    native.close(one);
    native.close(other);
  }
}

/**
 * One Multi and one Easy as the engine runs them: curl opens its sockets, CLOSESOCKETFUNCTION closes them (so the
 * patch keeps a resting connection's poll between transfers, see src/Multi.cc in the patch).
 */
function keepingClient(port: number) {
  const multi = new Multi();
  const easy = new Easy();
  const opened: number[] = [];
  const closed: number[] = [];
  easy.setOpt('SOCKOPTFUNCTION', (fd) => {
    opened.push(fd);
    return CurlSockOpt.Ok;
  });
  easy.setOpt('CLOSESOCKETFUNCTION', (fd) => {
    closed.push(fd);
    closeSync(fd);
    return 0;
  });
  easy.setOpt('WRITEFUNCTION', (data: Buffer) => data.length);
  let finished: ((code: CurlCode) => void) | undefined;
  multi.onMessage((_error, handle, code) => {
    multi.removeHandle(handle);
    const finish = finished;
    finished = undefined;
    // (node-libcurl calls this without a callback scope: the outcome goes out in an immediate, whose scope runs
    // the promise's continuations.)
    setImmediate(() => finish?.(code));
  });
  let open = true;
  return {
    opened,
    closed,
    transfer(path: string): Promise<void> {
      easy.setOpt('URL', `http://127.0.0.1:${port}${path}`);
      return withDeadline(
        `${path} is answered`,
        new Promise<void>((resolve, reject) => {
          finished = (code) => (code === CurlCode.CURLE_OK ? resolve() : reject(new Error(`curl code ${code}`)));
          multi.addHandle(easy);
        }),
      );
    },
    close(): void {
      if (!open) return;
      open = false;
      multi.close(); // closes the cached connection, through CLOSESOCKETFUNCTION
      easy.close();
    },
  };
}

describe("a connection resting in curl's cache between transfers", () => {
  it('keeps its poll (no new one per transfer), and leaves epoll before its fd is closed, though a copy of the socket stays open', async () => {
    const before = server.connections.length;
    const client = keepingClient(server.port);
    let copy = -1;
    try {
      await client.transfer('/rest/1');
      expect(client.opened).toHaveLength(1);
      const fd = client.opened[0]!;
      const inode = socketInode(fd);
      expect(inode).not.toBeNull();
      // No transfer runs: the socket is still watched, by the poll kept for the next one.
      expect(polledInodes().has(inode!)).toBe(true);
      await client.transfer('/rest/2');
      expect(client.opened).toEqual([fd]);
      expect(server.connections.length - before).toBe(1);

      // The daemon holds a copy of every leased socket: closing the client's fd does not end the socket then, and
      // a registration left in epoll would go on reporting it under a number the process gives to the next fd.
      copy = copyOf(fd);
      client.close();
      expect(client.closed).toEqual([fd]);
      expect(socketInode(copy)).toBe(inode);
      expect(polledInodes().has(inode!)).toBe(false);
    } finally {
      client.close();
      if (copy >= 0) native.close(copy);
    }
  });

  it('an origin closing a resting connection stops its poll (no turn of the loop per readiness), and the next transfer connects again', async () => {
    const before = server.connections.length;
    const client = keepingClient(server.port);
    try {
      await client.transfer('/closed-by-origin/1');
      const fd = client.opened[0]!;
      const inode = socketInode(fd)!;
      expect(polledInodes().has(inode)).toBe(true);
      const serverSide = server.connections.slice(before);
      expect(serverSide).toHaveLength(1);
      serverSide[0]!.destroy();
      // The socket is readable (end of stream) for good. A poll still running would see that in every turn of the
      // loop and keep the registration; the stopped poll lets libuv drop it at the next report, while curl still
      // holds the fd (it looks at the connection only when a transfer wants it).
      await eventually(() => !polledInodes().has(inode), 'the socket leaves epoll');
      expect(socketInode(fd)).toBe(inode);
      expect(client.closed).toEqual([]);

      await client.transfer('/closed-by-origin/2');
      expect(client.closed).toEqual([fd]);
      expect(client.opened).toHaveLength(2);
      expect(server.connections.length - before).toBe(2);
    } finally {
      client.close();
    }
  });

  it('does not keep a process alive: one that made a keep-alive transfer and closed nothing exits by itself', async () => {
    const { code: exitCode, stdout: output } = await runScript(
      `
      const { closeSync } = require('node:fs');
      const { Easy, Multi } = require(process.argv[1]);
      const multi = new Multi();
      const easy = new Easy();
      easy.setOpt('URL', 'http://127.0.0.1:' + process.argv[2] + '/exits');
      easy.setOpt('CLOSESOCKETFUNCTION', (fd) => (closeSync(fd), 0));
      easy.setOpt('WRITEFUNCTION', (data) => data.length);
      multi.onMessage((error, handle, code) => {
        multi.removeHandle(handle);
        process.stdout.write('code ' + code + '\\n');
      });
      multi.addHandle(easy);
      `,
      libcurlPath,
      String(server.port),
    );
    expect(output).toBe('code 0\n');
    expect(exitCode).toBe(0);
  });
});

describe('completions', () => {
  // The engine (worker/curl-engine.ts) finishes the only transfer running inside onMessage: what that settles must
  // continue in that turn of the loop, not at the thread's next event. A completion from the poll phase (curl read the answer when
  // the socket turned readable) is followed by Node's check phase, which drains the microtasks. One from libuv's
  // timer phase, which comes after the check phase, needs the callback scope the patch opens around curl's timer
  // callback: here curl sends over a socket handed to it connected (OPENSOCKETFUNCTION, CURL_SOCKOPT_ALREADY_CONNECTED)
  // from its timer, and the origin's answer is already there when it polls right after (the origin answers on
  // accept), so it reads it and finishes inside that callback. In a process of its own, where nothing else wakes the
  // loop (the next event it would get is a timer 5 s later); turns of the loop counted by libuv (uvMetricsInfo).
  it.each([
    ['the poll phase (an answer read when the socket turned readable)', 'poll'],
    ['the timer phase (an answer there as curl sends from its timer)', 'timer'],
  ])('what onMessage settles from %s continues in the same turn of the loop', async (_phase, mode) => {
    // Answers every connection at once, asked or not.
    const early = net.createServer((socket) => {
      socket.on('error', () => {});
      socket.on('data', () => {});
      socket.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
    });
    early.listen(0, '127.0.0.1');
    await once(early, 'listening');
    const earlyPort = (early.address() as net.AddressInfo).port;
    try {
      const { code: exitCode, stdout: output } = await runScript(
        `
        const net = require('node:net');
        const { Easy, Multi, CurlSockOpt } = require(process.argv[1]);
        const [mode, port, earlyPort] = process.argv.slice(2);
        const said = (what) => {
          process.stdout.write(what);
          process.exit(0);
        };
        const multi = new Multi();
        const easy = new Easy();
        easy.setOpt('WRITEFUNCTION', (data) => data.length);
        const turn = () => performance.nodeTiming.uvMetricsInfo.loopCount;
        multi.onMessage((error, handle, code) => {
          multi.removeHandle(handle);
          const reported = turn();
          Promise.resolve().then(() => said('continuation ' + code + ', turns later: ' + (turn() - reported)));
        });
        const start = () => {
          // The next event this process would get otherwise.
          setTimeout(() => said('timer'), 5000);
          multi.addHandle(easy);
        };
        if (mode === 'poll') {
          easy.setOpt('URL', 'http://127.0.0.1:' + port + '/turn');
          start();
        } else {
          // Node owns the fd and closes it (exit); the answer is in it before curl gets it.
          const socket = net.connect({ host: '127.0.0.1', port: Number(earlyPort) });
          socket.pause();
          socket.once('connect', () => {
            const fd = socket._handle.fd;
            socket._handle.readStop();
            easy.setOpt('URL', 'http://127.0.0.1:' + earlyPort + '/turn');
            easy.setOpt('OPENSOCKETFUNCTION', () => fd);
            easy.setOpt('SOCKOPTFUNCTION', () => CurlSockOpt.AlreadyConnected);
            easy.setOpt('CLOSESOCKETFUNCTION', () => 0);
            // (Time for the answer to arrive: were it late, curl would read it from the poll phase.)
            setTimeout(start, 100);
          });
        }
        `,
        libcurlPath,
        mode,
        String(server.port),
        String(earlyPort),
      );
      expect(exitCode).toBe(0);
      expect(output).toBe('continuation 0, turns later: 0');
    } finally {
      early.close();
    }
  });
});

describe('in worker threads', () => {
  it('a worker lends curl its own connection', async () => {
    const worker = new Worker(
      `
      const { parentPort, workerData } = require('node:worker_threads');
      const net = require('node:net');
      const { Curl, CurlSockOpt } = require(workerData.libcurlPath);
      // Ownership as in the main-thread tests: Node owns the fd, curl borrows it.
      const socket = net.connect({ host: '127.0.0.1', port: workerData.port });
      socket.pause();
      socket.once('connect', () => {
        const fd = socket._handle.fd;
        socket._handle.readStop();
        const calls = { open: [], sockopt: [], close: [] };
        const curl = new Curl();
        curl.setOpt('URL', 'http://127.0.0.1:' + workerData.port + '/worker');
        curl.setOpt('FORBID_REUSE', true);
        curl.setOpt('OPENSOCKETFUNCTION', (purpose, address) => (calls.open.push({ purpose, address }), fd));
        curl.setOpt('SOCKOPTFUNCTION', (s, purpose) => (calls.sockopt.push(s), CurlSockOpt.AlreadyConnected));
        curl.setOpt('CLOSESOCKETFUNCTION', (s) => (calls.close.push(s), 0));
        curl.on('end', (status, body) => {
          curl.close();
          socket.destroy();
          parentPort.postMessage({ status, body: String(body), fd, localPort: socket.localPort, calls });
        });
        curl.on('error', (error) => parentPort.postMessage({ error: error.message }));
        curl.perform();
      });
      `,
      { eval: true, workerData: { libcurlPath, port: server.port } },
    );
    try {
      const [report] = await once(worker, 'message');
      expect(report).toMatchObject({ status: 200, body: 'hello from /worker' });
      expect(report.calls.open).toEqual([
        {
          purpose: CurlSockType.Ipcxn,
          address: {
            family: AF_INET,
            socktype: SOCK_STREAM,
            protocol: IPPROTO_TCP,
            address: '127.0.0.1',
            port: server.port,
          },
        },
      ]);
      expect(report.calls.sockopt).toEqual([report.fd]);
      expect(report.calls.close).toEqual([report.fd]);
      expect(server.connections.some((socket) => socket.remotePort === report.localPort)).toBe(true);
    } finally {
      await worker.terminate();
    }
  });

  // The worker lets curl open its socket, keeps the connection in curl's cache (the shared Multi of Curl, or the
  // Easy's own after perform()), then is terminated: its CLOSESOCKETFUNCTION can never run, the addon closes the fd.
  it.each(['Curl', 'Easy'])('a worker terminated while %s caches a connection does not leak its fd', async (mode) => {
    const baseline = fdCount();
    const before = server.connections.length;
    const worker = new Worker(
      `
      const { parentPort, workerData } = require('node:worker_threads');
      const { closeSync } = require('node:fs');
      const { Curl, Easy, CurlSockOpt } = require(workerData.libcurlPath);
      const url = 'http://127.0.0.1:' + workerData.port + '/cached';
      let fd = -1;
      const sockopt = (socketFd) => ((fd = socketFd), CurlSockOpt.Ok);
      // While JavaScript can run, the callback owns closing the socket.
      const closesocket = (socketFd) => {
        closeSync(socketFd);
        parentPort.postMessage({ closed: socketFd });
        return 0;
      };
      if (workerData.mode === 'Easy') {
        globalThis.easy = new Easy();
        easy.setOpt('URL', url);
        easy.setOpt('SOCKOPTFUNCTION', sockopt);
        easy.setOpt('CLOSESOCKETFUNCTION', closesocket);
        easy.setOpt('WRITEFUNCTION', (data) => data.length);
        parentPort.postMessage({ code: easy.perform(), fd });
      } else {
        const curl = new Curl();
        curl.setOpt('URL', url);
        curl.setOpt('SOCKOPTFUNCTION', sockopt);
        curl.setOpt('CLOSESOCKETFUNCTION', closesocket);
        curl.on('end', (status) => {
          // The handle goes, the connection stays in the Multi's cache.
          curl.close();
          parentPort.postMessage({ code: status === 200 ? 0 : status, fd });
        });
        curl.on('error', (error) => parentPort.postMessage({ error: error.message }));
        curl.perform();
      }
      setInterval(() => {}, 1000); // only terminate() ends this worker
      `,
      { eval: true, workerData: { libcurlPath, port: server.port, mode } },
    );
    const messages: unknown[] = [];
    worker.on('message', (message) => messages.push(message));
    await eventually(() => messages.length > 0, 'the worker reports');
    const report = messages[0] as { code: number; fd: number };
    expect(report.code).toBe(0);
    const target = fdTarget(report.fd);
    expect(target).toMatch(/^socket:/);
    const accepted = server.connections.slice(before);
    expect(accepted).toHaveLength(1);
    const serverSide = accepted[0]!;
    const clientClosed = once(serverSide, 'end');

    await worker.terminate();
    // the server reads a FIN: the last copy of the client's fd was closed
    await withDeadline('the server sees the client close', clientClosed);
    expect(fdTarget(report.fd)).not.toBe(target);
    await eventually(() => fdCount() <= baseline, 'the fd count is back to its baseline');
    expect(messages).toEqual([report]); // the JavaScript callback never ran
  });

  // libuv still polls curl's sockets while a terminated worker's environment is torn down, so transfers finish
  // when no JavaScript can run any more: that must neither crash the process nor leak their sockets.
  it('terminating workers while their transfers run leaves the process alive and no fd behind', async () => {
    const baseline = fdCount();
    for (let round = 0; round < 10; round++) {
      const worker = new Worker(
        `
        const { parentPort, workerData } = require('node:worker_threads');
        const { closeSync } = require('node:fs');
        const { Curl } = require(workerData.libcurlPath);
        for (let i = 0; i < 4; i++) {
          const curl = new Curl();
          curl.setOpt('URL', 'http://127.0.0.1:' + workerData.port + '/in-flight/' + i);
          curl.setOpt('CLOSESOCKETFUNCTION', (fd) => (closeSync(fd), 0));
          curl.on('end', () => parentPort.postMessage(i));
          curl.on('error', () => parentPort.postMessage(i));
          curl.perform();
        }
        `,
        { eval: true, workerData: { libcurlPath, port: server.port } },
      );
      await once(worker, 'message');
      await worker.terminate();
    }
    await eventually(() => fdCount() <= baseline, 'the fd count is back to its baseline');
  });

  it('an Easy garbage collected with a cached connection closes it without running JavaScript', async () => {
    const worker = new Worker(
      `
      const { parentPort, workerData } = require('node:worker_threads');
      const { readlinkSync, closeSync } = require('node:fs');
      const v8 = require('node:v8');
      const vm = require('node:vm');
      const { Easy, CurlSockOpt } = require(workerData.libcurlPath);
      v8.setFlagsFromString('--expose-gc');
      const gc = vm.runInNewContext('gc');
      const target = (fd) => { try { return readlinkSync('/proc/self/fd/' + fd); } catch { return null; } };
      let calls = 0;
      function transfer() {
        let fd = -1;
        const easy = new Easy();
        easy.setOpt('URL', 'http://127.0.0.1:' + workerData.port + '/gc');
        easy.setOpt('SOCKOPTFUNCTION', (socketFd) => ((fd = socketFd), CurlSockOpt.Ok));
        easy.setOpt('CLOSESOCKETFUNCTION', (socketFd) => (calls++, closeSync(socketFd), 0));
        easy.setOpt('WRITEFUNCTION', (data) => data.length);
        return { code: easy.perform(), fd }; // easy is unreachable from here on, its connection still cached
      }
      const { code, fd } = transfer();
      const before = target(fd);
      (async () => {
        const deadline = Date.now() + 5000;
        while (target(fd) === before && Date.now() < deadline) {
          gc();
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        parentPort.postMessage({ code, before, after: target(fd), calls });
      })();
      `,
      { eval: true, workerData: { libcurlPath, port: server.port } },
    );
    try {
      const [report] = await once(worker, 'message');
      expect(report.code).toBe(0);
      expect(report.before).toMatch(/^socket:/);
      expect(report.after).not.toBe(report.before);
      expect(report.calls).toBe(0);
    } finally {
      await worker.terminate();
    }
  });
});
