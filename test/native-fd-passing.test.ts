// The addon's AF_UNIX side, with real processes and sockets: SCM_RIGHTS between processes, the truncation paths
// (every fd that arrived is closed), EOF, sd_notify-style datagrams with fds, listen/accept/SO_PEERCRED.
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectTcp } from '../daemon/tcp-connect.js';
import * as native from '../shared/native.js';
import {
  catchError,
  fdCount,
  receiveMessage,
  socketClosed,
  startServer,
  type TestServer,
  waitForEvents,
  warmUpChildProcesses,
} from './fixtures/native-helpers.js';
import { spawnChild } from './helpers/children.js';

const senderFixture = fileURLToPath(new URL('./fixtures/native-fd-sender.mjs', import.meta.url));

function abstractName(): string {
  return `@sockpool-test-${process.pid}-${randomBytes(6).toString('hex')}`;
}

let directory: string;
let server: TestServer;

beforeAll(async () => {
  await warmUpChildProcesses();
  directory = mkdtempSync(join(tmpdir(), 'sockpool-native-'));
  server = await startServer();
});

afterAll(async () => {
  await server.close();
  rmSync(directory, { recursive: true, force: true });
});

describe('fd passing between processes', () => {
  it('a TCP connection opened by a child keeps working in the parent after the child exits', async () => {
    const before = fdCount();
    const path = join(directory, 'handover.sock');
    const listener = native.seqpacketListen(path, 4);
    const child = spawnChild(process.execPath, [senderFixture, path, String(server.port)], {
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    const exited = once(child, 'exit');

    await waitForEvents(listener, native.READABLE);
    const link = native.accept(listener);
    expect(link).not.toBeNull();
    const message = await receiveMessage(link!, 1024, 4);
    expect(await exited).toEqual([0, null]);

    // One fd arrived, tracked for this thread until ownership moves.
    expect(message.fds).toHaveLength(1);
    const fd = message.fds[0]!;
    expect(native.trackedFds()).toContain(fd);
    const { localPort } = JSON.parse(message.data.toString()) as { localPort: number };
    expect(native.localAddress(fd)).toEqual({ family: 4, address: '127.0.0.1', port: localPort });
    await server.waitForConnections(1);
    const serverSide = server.connections.at(-1)!;
    expect(serverSide.remotePort).toBe(localPort);

    // The child closed its end of the link and exited: EOF.
    expect(await receiveMessage(link!, 1024, 4)).toMatchObject({ eof: true, fds: [] });

    // Ownership passes to net.Socket, which will close the fd: untrack it first.
    native.untrack(fd);
    expect(native.trackedFds()).not.toContain(fd);
    const socket = new net.Socket({ fd, readable: true, writable: true });
    socket.write('ping through a passed fd');
    const [echoed] = (await once(socket, 'data')) as [Buffer];
    expect(echoed.toString()).toBe('ping through a passed fd');
    socket.destroy();
    await once(socket, 'close');
    await socketClosed(serverSide);

    native.close(link!);
    native.close(listener);
    rmSync(path);
    expect(fdCount()).toBe(before);
  });
});

describe('recvMessage truncation', () => {
  async function openConnections(count: number): Promise<{ fds: number[]; serverSides: net.Socket[] }> {
    const already = server.connections.length;
    const fds = await Promise.all(
      Array.from({ length: count }, () => connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 })),
    );
    await server.waitForConnections(already + count);
    return { fds, serverSides: server.connections.slice(already, already + count) };
  }

  it('more fds than maxFds: SOCKPOOL_ERR_FD_TRUNCATED, and every fd of the message is closed', async () => {
    const before = fdCount();
    const [sender, receiver] = native.seqpacketPair();
    const { fds, serverSides } = await openConnections(3);
    const serverClosed = serverSides.map((socket) => socketClosed(socket));
    expect(native.sendMessage(sender, Buffer.from('three fds'), fds)).toBe(9);
    for (const fd of fds) native.close(fd); // the message in flight holds the only copies now

    const error = catchError(() => native.recvMessage(receiver, 64, 1));
    expect(error).toMatchObject({ code: native.NativeErrorCodes.FD_TRUNCATED, syscall: 'recvmsg' });
    expect(error.message).toMatch(/^recvmsg SOCKPOOL_ERR_FD_TRUNCATED/);
    expect(native.trackedFds()).toEqual([]);
    // All three connections really closed: the server sees each one end.
    await Promise.all(serverClosed);

    // The socket is still usable for the next message.
    expect(native.sendMessage(sender, Buffer.from('next'))).toBe(4);
    expect(native.recvMessage(receiver, 64, 1)).toMatchObject({ fds: [], eof: false });
    native.close(sender);
    native.close(receiver);
    expect(fdCount()).toBe(before);
  });

  it('maxFds 0 refuses any fd', async () => {
    const before = fdCount();
    const [sender, receiver] = native.seqpacketPair();
    const { fds, serverSides } = await openConnections(1);
    const serverClosed = socketClosed(serverSides[0]!);
    native.sendMessage(sender, Buffer.from('one fd'), fds);
    native.close(fds[0]!);
    expect(catchError(() => native.recvMessage(receiver, 64, 0))).toMatchObject({
      code: 'SOCKPOOL_ERR_FD_TRUNCATED',
      syscall: 'recvmsg',
    });
    await serverClosed;
    native.close(sender);
    native.close(receiver);
    expect(fdCount()).toBe(before);
  });

  it('a message longer than maxBytes: SOCKPOOL_ERR_MSG_TRUNCATED, and its fds are closed', async () => {
    const before = fdCount();
    const [sender, receiver] = native.seqpacketPair();
    const { fds, serverSides } = await openConnections(2);
    const serverClosed = serverSides.map((socket) => socketClosed(socket));
    native.sendMessage(sender, Buffer.alloc(100, 1), fds);
    for (const fd of fds) native.close(fd);

    const error = catchError(() => native.recvMessage(receiver, 10, 4));
    expect(error).toMatchObject({ code: native.NativeErrorCodes.MSG_TRUNCATED, syscall: 'recvmsg', fdsClosed: 2 });
    await Promise.all(serverClosed);
    expect(native.trackedFds()).toEqual([]);
    native.close(sender);
    native.close(receiver);
    expect(fdCount()).toBe(before);
  });
});

describe('recvMessages (recvmmsg)', () => {
  it('takes every queued message in one call; a truncated one is an error in its place with its fds closed', () => {
    const before = fdCount();
    const [sender, receiver] = native.seqpacketPair();
    expect(native.recvMessages(receiver, 64, 1, 16)).toBeNull();
    const [fd, extraA] = native.seqpacketPair(); // fds to pass: one fits, two are too many
    const extraB = native.dup(extraA);
    native.sendMessage(sender, Buffer.from('first'));
    native.sendMessage(sender, Buffer.from('with fd'), [fd]);
    native.sendMessage(sender, Buffer.from('too many'), [extraA, extraB]);
    native.sendMessage(sender, Buffer.alloc(100, 1));
    native.sendMessage(sender, Buffer.from('last'));
    for (const sent of [fd, extraA, extraB]) native.close(sent);

    const batch = native.recvMessages(receiver, 64, 1, 16)!;
    expect(batch).toHaveLength(5);
    expect(batch[0]).toMatchObject({ fds: [], eof: false });
    expect((batch[0] as native.ReceivedMessage).data.toString()).toBe('first');
    const withFd = batch[1] as native.ReceivedMessage;
    expect(withFd.fds).toHaveLength(1);
    expect(native.trackedFds()).toEqual(withFd.fds);
    expect(batch[2]).toMatchObject({ code: native.NativeErrorCodes.FD_TRUNCATED, fdsClosed: 2 });
    expect(batch[3]).toMatchObject({ code: native.NativeErrorCodes.MSG_TRUNCATED });
    expect((batch[4] as native.ReceivedMessage).data.toString()).toBe('last');
    native.close(withFd.fds[0]!);
    expect(native.recvMessages(receiver, 64, 1, 16)).toBeNull();

    // At most maxCount per call; the list ends at EOF.
    for (const text of ['a', 'b', 'c']) native.sendMessage(sender, Buffer.from(text));
    expect(native.recvMessages(receiver, 64, 1, 2)).toHaveLength(2);
    native.close(sender);
    const tail = native.recvMessages(receiver, 64, 1, 16)!;
    expect(tail.map((m) => (m instanceof Error ? m.message : m.eof ? 'eof' : m.data.toString()))).toEqual(['c', 'eof']);
    native.close(receiver);
    expect(native.trackedFds()).toEqual([]);
    expect(fdCount()).toBe(before);
  });

  it('reads an empty packet as an empty message, not the end: only a peer that shut down ends the stream', () => {
    const before = fdCount();
    const [sender, receiver] = native.seqpacketPair();
    const text = (m: native.ReceivedMessage | Error) =>
      m instanceof Error ? m.message : m.eof ? 'eof' : `[${m.data}]`;
    native.sendMessage(sender, Buffer.alloc(0));
    native.sendMessage(sender, Buffer.from('after'));
    native.sendMessage(sender, Buffer.alloc(0));
    expect(native.recvMessages(receiver, 64, 1, 16)!.map(text)).toEqual(['[]', '[after]', '[]']);
    native.sendMessage(sender, Buffer.alloc(0));
    expect(native.recvMessage(receiver, 64, 1)).toMatchObject({ eof: false, fds: [] });
    // Shut down after one more empty packet: that packet and the end read alike, and are the end.
    native.sendMessage(sender, Buffer.alloc(0));
    native.close(sender);
    expect(native.recvMessages(receiver, 64, 1, 16)!.map(text)).toEqual(['eof']);
    expect(native.recvMessage(receiver, 64, 1)).toMatchObject({ eof: true });
    native.close(receiver);
    expect(fdCount()).toBe(before);
  });
});

describe('recvMessages buffers', () => {
  it('grows its buffers for a larger maxBytes or maxCount, and a kept Buffer survives later reads', () => {
    const before = fdCount();
    const [sender, receiver] = native.seqpacketPair();
    native.sendMessage(sender, Buffer.from('small'));
    const first = native.recvMessages(receiver, 16, 0, 1)!;
    const kept = (first[0] as native.ReceivedMessage).data;
    const big = Buffer.alloc(60_000, 7);
    native.sendMessage(sender, big);
    for (let i = 0; i < 40; i++) native.sendMessage(sender, Buffer.from(`m${i}`));
    const second = native.recvMessages(receiver, 64 * 1024, 1, native.MAX_BATCH)!;
    expect(second).toHaveLength(41);
    expect((second[0] as native.ReceivedMessage).data.equals(big)).toBe(true);
    expect(second.slice(1).map((m) => (m as native.ReceivedMessage).data.toString())).toEqual(
      Array.from({ length: 40 }, (_, i) => `m${i}`),
    );
    expect(kept.toString()).toBe('small');
    native.close(sender);
    native.close(receiver);
    expect(fdCount()).toBe(before);
  });
});

describe('seqpacket basics', () => {
  it('recvMessage: null when nothing is waiting, eof after the peer closes', () => {
    const before = fdCount();
    const [left, right] = native.seqpacketPair();
    expect(native.recvMessage(right, 64, 4)).toBeNull();
    expect(native.sendMessage(left, Buffer.from('hello'))).toBe(5);
    const message = native.recvMessage(right, 64, 4);
    expect(message?.data.toString()).toBe('hello');
    expect(message).toMatchObject({ fds: [], eof: false });
    native.close(left);
    expect(native.recvMessage(right, 64, 4)).toMatchObject({ eof: true, fds: [] });
    expect(native.recvMessage(right, 64, 4)).toMatchObject({ eof: true });
    native.close(right);
    expect(fdCount()).toBe(before);
  });

  it('sendMessage returns null instead of blocking when the peer does not read', () => {
    const [left, right] = native.seqpacketPair();
    const chunk = Buffer.alloc(16 * 1024);
    let sent = 0;
    while (native.sendMessage(left, chunk) !== null) sent++;
    expect(sent).toBeGreaterThan(0);
    native.close(left);
    native.close(right);
  });

  it('sendMessage to a closed peer throws EPIPE (no SIGPIPE)', () => {
    const [left, right] = native.seqpacketPair();
    native.close(right);
    expect(catchError(() => native.sendMessage(left, Buffer.from('x')))).toMatchObject({
      code: 'EPIPE',
      errno: -32,
      syscall: 'sendmsg',
      message: 'sendmsg EPIPE',
    });
    native.close(left);
  });

  it('listen, accept and SO_PEERCRED on a path and in the abstract namespace', () => {
    const before = fdCount();
    for (const path of [join(directory, 'listen.sock'), abstractName()]) {
      const listener = native.seqpacketListen(path, 8);
      expect(native.accept(listener)).toBeNull();
      const client = native.seqpacketConnect(path);
      const accepted = native.accept(listener);
      expect(accepted).not.toBeNull();
      const self = { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() };
      expect(native.peerCredentials(accepted!)).toEqual(self);
      expect(native.peerCredentials(client)).toEqual(self);
      // SO_PEERGROUPS: the supplementary groups SO_PEERCRED leaves out (allowGids counts them).
      // (Node's getgroups() adds the effective gid to the list when it is not a supplementary group itself.)
      const groups = (list: number[]) => [...new Set([...list, process.getegid!()])].sort((a, b) => a - b);
      expect(groups(native.peerGroups(accepted!))).toEqual(groups(process.getgroups!()));
      native.sendMessage(client, Buffer.from('over the listener'));
      expect(native.recvMessage(accepted!, 64, 0)?.data.toString()).toBe('over the listener');
      native.close(client);
      native.close(accepted!);
      native.close(listener);
    }
    rmSync(join(directory, 'listen.sock'));
    expect(fdCount()).toBe(before);
  });

  it('errors keep Node’s shape', () => {
    const missing = join(directory, 'missing', 'nothing.sock');
    expect(catchError(() => native.seqpacketConnect(missing))).toMatchObject({
      code: 'ENOENT',
      errno: -2,
      syscall: 'connect',
      message: `connect ENOENT ${missing}`,
    });

    // A socket file whose listener is gone: ECONNREFUSED. The file stays: listen never unlinks.
    const stale = join(directory, 'stale.sock');
    native.close(native.seqpacketListen(stale, 1));
    expect(catchError(() => native.seqpacketConnect(stale))).toMatchObject({ code: 'ECONNREFUSED', errno: -111 });
    expect(catchError(() => native.seqpacketListen(stale, 1))).toMatchObject({
      code: 'EADDRINUSE',
      syscall: 'bind',
    });
    rmSync(stale);

    expect(catchError(() => native.close(1_000_000))).toMatchObject({ code: 'EBADF', syscall: 'close' });
    expect(() => native.seqpacketConnect(`/${'x'.repeat(200)}`)).toThrow(/ENAMETOOLONG/);
  });

  it('a wrong buffer or fd list is refused with a typed error before anything is sent', () => {
    const [left, right] = native.seqpacketPair();
    const before = fdCount();
    const invalid = (action: () => unknown): NodeJS.ErrnoException => {
      try {
        action();
      } catch (error) {
        return error as NodeJS.ErrnoException;
      }
      throw new Error('expected an error');
    };
    // The data: a Uint8Array (a Buffer is one), not another kind of typed array of the same bytes.
    expect(invalid(() => native.sendMessage(left, 'text' as never))).toMatchObject({
      name: 'TypeError',
      code: 'ERR_INVALID_ARG_TYPE',
      message: 'The "data" argument must be an instance of Uint8Array',
    });
    expect(invalid(() => native.sendMessage(left, new Int8Array(4) as never)).code).toBe('ERR_INVALID_ARG_TYPE');
    // The fds: at most SCM_MAX_FD, each a non-negative integer.
    expect(invalid(() => native.sendMessage(left, Buffer.from('x'), new Array(254).fill(0)))).toMatchObject({
      name: 'RangeError',
      code: 'ERR_OUT_OF_RANGE',
      message: 'at most 253 fds fit in one message (SCM_MAX_FD)',
    });
    expect(invalid(() => native.sendMessage(left, Buffer.from('x'), [0, -1])).code).toBe('ERR_OUT_OF_RANGE');
    expect(invalid(() => native.sendMessage(left, Buffer.from('x'), [0, 'one' as never])).code).toBe(
      'ERR_INVALID_ARG_TYPE',
    );
    // One fd may come as a number, held to the same rule; anything else that is no array is refused.
    for (const fd of [-1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 31]) {
      expect(invalid(() => native.sendMessage(left, Buffer.from('x'), fd)).code, `fd ${fd}`).toBe('ERR_OUT_OF_RANGE');
    }
    expect(invalid(() => native.sendMessage(left, Buffer.from('x'), '3' as never))).toMatchObject({
      name: 'TypeError',
      code: 'ERR_INVALID_ARG_TYPE',
      message: 'The "fds" argument must be an array or one fd',
    });
    expect(native.recvMessage(right, 64, 4)).toBeNull();
    // The output arrays of the TCP reads: a Float64Array, long enough for what is asked.
    expect(invalid(() => native.tcpInfo(left, new Float32Array(12) as never)).message).toBe(
      'out must be a Float64Array of at least 5 elements',
    );
    expect(invalid(() => native.tcpInfo(left, new Float64Array(4))).message).toBe(
      'out must be a Float64Array of at least 5 elements',
    );
    expect(invalid(() => native.tcpInfo(left, new Float64Array(9), true, true)).message).toBe(
      'out must be a Float64Array of at least 12 elements with withMark',
    );
    expect(invalid(() => native.tcpInfo(left, new Float64Array(5), true)).message).toBe(
      'out must be a Float64Array of at least 9 elements with withPeer',
    );
    expect(invalid(() => native.peerAddress(left, new Float64Array(3))).message).toBe(
      'words must be a Float64Array of at least 4 elements',
    );
    // With valid arguments the same calls reach the kernel (a seqpacket socket has no TCP_INFO).
    expect(invalid(() => native.tcpInfo(left, new Float64Array(12), false, true))).toMatchObject({
      code: 'ENOTSUP',
      syscall: 'getsockopt',
    });
    expect(native.sendMessage(left, Buffer.from('x'), [])).toBe(1);
    expect(native.recvMessage(right, 64, 4)?.data.toString()).toBe('x');
    // One fd as a number goes as the one-element array would: the receiver gets a copy of that socket.
    expect(native.sendMessage(left, Buffer.from('y'), left)).toBe(1);
    const withFd = native.recvMessage(right, 64, 4);
    expect(withFd?.data.toString()).toBe('y');
    expect(withFd?.fds).toHaveLength(1);
    expect(native.sameSocket(withFd!.fds[0]!, left)).toBe(true);
    native.close(withFd!.fds[0]!);
    expect(fdCount()).toBe(before);
    native.close(left);
    native.close(right);
  });

  it('close refuses an fd that a Poller still watches', () => {
    const [left, right] = native.seqpacketPair();
    const poller = new native.Poller(left, () => {});
    poller.start(native.READABLE);
    expect(catchError(() => native.close(left))).toMatchObject({ code: native.NativeErrorCodes.FD_POLLED });
    // A second Poller on the same fd in the same thread is refused by libuv.
    expect(catchError(() => new native.Poller(left, () => {}))).toMatchObject({
      code: 'EEXIST',
      syscall: 'uv_poll_init',
    });
    poller.close();
    poller.close();
    expect(catchError(() => poller.start(native.READABLE))).toMatchObject({
      code: native.NativeErrorCodes.POLLER_CLOSED,
    });
    native.close(left);
    native.close(right);
  });
});

describe('sendDatagram (sd_notify FDSTORE)', () => {
  it('delivers fds with the datagram, to an abstract name and to a path', () => {
    const before = fdCount();
    for (const name of [abstractName(), join(directory, 'notify.sock')]) {
      const receiver = native.datagramBind(name);
      const [stored, peer] = native.seqpacketPair();
      native.sendDatagram(name, Buffer.from('FDSTORE=1\nFDNAME=idle-0'), [stored]);
      native.close(stored); // the receiver holds its own copy now

      const message = native.recvMessage(receiver, 4096, 8);
      expect(message?.data.toString()).toBe('FDSTORE=1\nFDNAME=idle-0');
      expect(message?.fds).toHaveLength(1);
      const copy = message!.fds[0]!;
      // The received fd is the same socket: what goes in through it comes out at the peer.
      native.sendMessage(copy, Buffer.from('through the stored copy'));
      expect(native.recvMessage(peer, 64, 0)?.data.toString()).toBe('through the stored copy');

      native.sendDatagram(name, Buffer.from('READY=1'));
      expect(native.recvMessage(receiver, 4096, 8)).toMatchObject({ fds: [], eof: false });

      native.close(copy);
      native.close(peer);
      native.close(receiver);
    }
    rmSync(join(directory, 'notify.sock'));
    expect(fdCount()).toBe(before);
  });

  it('reports a missing receiver as ECONNREFUSED / ENOENT and leaks nothing', () => {
    const before = fdCount();
    const name = abstractName();
    expect(catchError(() => native.sendDatagram(name, Buffer.from('READY=1')))).toMatchObject({
      code: 'ECONNREFUSED',
      syscall: 'sendmsg',
      address: name,
    });
    expect(catchError(() => native.sendDatagram(join(directory, 'none.sock'), Buffer.from('x')))).toMatchObject({
      code: 'ENOENT',
    });
    expect(fdCount()).toBe(before);
  });
});
