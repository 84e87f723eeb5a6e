// TCP through the addon, against real listeners: connectTcp on IPv4/IPv6 loopback, refused connects, socket
// options, and probe() of idle connections. What needs root (a timed-out connect through a network namespace, socket
// marks) is in native-tcp.system.test.ts.
import { spawnSync } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import net from 'node:net';
import { beforeAll, describe, expect, it } from 'vitest';
import { connectTcp } from '../daemon/tcp-connect.js';
import * as native from '../shared/native.js';
import {
  catchError,
  fdCount,
  lingerZeroThroughCopy,
  receiveMessage,
  startServer,
  stateAfterClose,
  waitForEvents,
  warmUpChildProcesses,
} from './fixtures/native-helpers.js';
import { requirePrerequisite } from './helpers/require.js';

/** Whether this host can bind `address` (IPv6 loopback can be disabled). */
async function canListen(address: string): Promise<boolean> {
  const server = net.createServer();
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, address, resolve);
    });
    return true;
  } catch {
    return false;
  } finally {
    server.close();
  }
}

const hasIpv6Loopback = await canListen('::1');

beforeAll(async () => {
  await warmUpChildProcesses();
});

describe('connectTcp', () => {
  for (const host of ['127.0.0.1', '::1']) {
    const family = host === '::1' ? 6 : 4;
    it(`connects to ${host} and the connection carries data`, async () => {
      if (family === 6) requirePrerequisite(hasIpv6Loopback, 'an IPv6 loopback address (::1)');
      const server = await startServer(host);
      const before = fdCount();
      const fd = await connectTcp(host, server.port, {
        timeoutMs: 10_000,
        sourceAddress: host,
        noDelay: true,
        keepAlive: { idleSec: 30, intervalSec: 5, count: 3 },
        userTimeoutMs: 20_000,
        device: 'lo',
      });
      // Ownership passed to us: connectTcp no longer tracks it.
      expect(native.trackedFds()).not.toContain(fd);
      expect(native.peerAddress(fd)).toEqual({ family, address: host, port: server.port });
      // The release check's peer, read inside the TCP_INFO call: the same peer, as words.
      const info = new Float64Array(native.TCP_INFO_FIELDS);
      native.tcpInfo(fd, info, true);
      const words = info.subarray(native.TcpInfoField.peer, native.TcpInfoField.peer + native.PEER_WORDS);
      expect(native.peerText(words)).toBe(`${host === '::1' ? '0:0:0:0:0:0:0:1' : host} ${server.port}`);
      const local = native.localAddress(fd);
      expect(local).toMatchObject({ family, address: host });
      await server.waitForConnections(1);
      expect(server.connections[0]!.remotePort).toBe(local.port);
      expect(native.socketError(fd)).toBeNull();

      expect(native.sendMessage(fd, Buffer.from('hello over tcp'))).toBe(14);
      const echoed = await receiveMessage(fd, 64, 0);
      expect(echoed.data.toString()).toBe('hello over tcp');

      native.close(fd);
      await server.allClosed();
      expect(fdCount()).toBe(before);
      await server.close();
    });
  }

  it('rejects with ECONNREFUSED on a closed port, and leaves nothing open', async () => {
    const server = await startServer();
    const port = server.port;
    await server.close();
    const before = fdCount();
    await expect(connectTcp('127.0.0.1', port, { timeoutMs: 10_000 })).rejects.toMatchObject({
      code: 'ECONNREFUSED',
      errno: -111,
      syscall: 'connect',
      address: '127.0.0.1',
      port,
      message: `connect ECONNREFUSED 127.0.0.1:${port}`,
    });
    expect(native.trackedFds()).toEqual([]);
    expect(fdCount()).toBe(before);
  });

  it('rejects bad options before connecting, and closes the socket', async () => {
    const server = await startServer();
    const before = fdCount();
    await expect(connectTcp('127.0.0.1', server.port, { timeoutMs: 1000, device: 'nosuchdev0' })).rejects.toMatchObject(
      { code: 'ENODEV', syscall: 'setsockopt' },
    );
    await expect(connectTcp('127.0.0.1', server.port, { timeoutMs: 1000, sourceAddress: '::1' })).rejects.toMatchObject(
      { code: 'ERR_INVALID_IP_ADDRESS' },
    );
    await expect(connectTcp('localhost', server.port, { timeoutMs: 1000 })).rejects.toMatchObject({
      code: 'ERR_INVALID_IP_ADDRESS',
    });
    await expect(connectTcp('127.0.0.1', server.port, { timeoutMs: 1000, family: 6 })).rejects.toMatchObject({
      code: 'ERR_INVALID_ARG_VALUE',
    });
    expect(server.connections).toHaveLength(0);
    expect(fdCount()).toBe(before);
    await server.close();
  });
});

describe('socket options', () => {
  it('apply without error on a TCP socket', () => {
    const before = fdCount();
    const fd = native.tcpSocket(4);
    native.setNoDelay(fd, true);
    native.setNoDelay(fd, false);
    native.setKeepAlive(fd, true, 60, 10, 5);
    native.setKeepAlive(fd, false);
    native.setUserTimeout(fd, 30_000);
    // Changing or removing a device binding once made needs CAP_NET_RAW: that is in the system tier.
    native.bindToDevice(fd, 'lo');
    native.bindAddress(fd, '127.0.0.1', 0);
    expect(native.localAddress(fd)).toMatchObject({ family: 4, address: '127.0.0.1' });
    native.close(fd);
    expect(fdCount()).toBe(before);
  });

  it('report failures as thrown errors', () => {
    const fd = native.tcpSocket(4);
    expect(catchError(() => native.bindToDevice(fd, 'nosuchdev0'))).toMatchObject({
      code: 'ENODEV',
      syscall: 'setsockopt',
    });
    expect(catchError(() => native.bindToDevice(fd, 'x'.repeat(16)))).toMatchObject({ code: 'ENODEV' });
    expect(catchError(() => native.setKeepAlive(fd, true, 1_000_000))).toMatchObject({
      code: 'EINVAL',
      syscall: 'setsockopt',
      message: 'setsockopt EINVAL TCP_KEEPIDLE',
    });
    expect(catchError(() => native.peerAddress(fd))).toMatchObject({ code: 'ENOTCONN', syscall: 'getpeername' });
    const info = new Float64Array(native.TCP_INFO_FIELDS);
    expect(catchError(() => native.tcpInfo(fd, info, true))).toMatchObject({
      code: 'ENOTCONN',
      syscall: 'getpeername',
    });
    expect(() => native.tcpInfo(fd, new Float64Array(5), true)).toThrow(TypeError);
    expect(() => native.connectStart(fd, 'not-an-ip', 80)).toThrow(TypeError);
    // A family that is not the socket's (an IPv4 socket told 6): the address does not parse as one, or the kernel
    // refuses the connect; never a connect somewhere else.
    expect(() => native.connectStart(fd, '127.0.0.1', 80, 6)).toThrow(TypeError);
    expect(catchError(() => native.connectStart(fd, '::1', 80, 6))).toMatchObject({ syscall: 'connect' });
    expect(() => native.connectStart(fd, '127.0.0.1', 80, 5 as 4)).toThrow(RangeError);
    expect(() => native.setNoDelay(-1, true)).toThrow(RangeError);
    native.close(fd);
    const [left, right] = native.seqpacketPair();
    expect(catchError(() => native.setNoDelay(left, true))).toMatchObject({ syscall: 'setsockopt' });
    expect(catchError(() => native.localAddress(left))).toMatchObject({ code: 'EAFNOSUPPORT' });
    native.close(left);
    native.close(right);
  });
});

describe('probe', () => {
  it('alive, data, eof and error on real connections', async () => {
    const server = await startServer('127.0.0.1', () => {});
    const before = fdCount();
    // Connects, then returns our fd and the server's side of the connection.
    const connect = async (): Promise<[number, net.Socket]> => {
      const expected = server.connections.length + 1;
      const fd = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 });
      await server.waitForConnections(expected);
      return [fd, server.connections[expected - 1]!];
    };

    const [quiet] = await connect();
    expect(native.probe(quiet)).toEqual({ state: 'alive', tcpState: 1 });

    const [chatty, chattyServer] = await connect();
    chattyServer.write('unexpected');
    await waitForEvents(chatty, native.READABLE);
    expect(native.probe(chatty)).toEqual({ state: 'data', tcpState: 1 });
    expect(native.probe(chatty).state).toBe('data'); // peeking consumed nothing

    const [ended, endedServer] = await connect();
    endedServer.end();
    await waitForEvents(ended, native.READABLE);
    expect(native.probe(ended)).toEqual({ state: 'eof', tcpState: 8 }); // CLOSE_WAIT

    const [reset, resetServer] = await connect();
    resetServer.resetAndDestroy();
    await waitForEvents(reset, native.READABLE);
    expect(native.probe(reset)).toMatchObject({ state: 'error', error: 'ECONNRESET' });

    const unconnected = native.tcpSocket(4);
    native.bindAddress(unconnected, '127.0.0.1', 0);
    expect(native.probe(unconnected)).toMatchObject({ state: 'error', error: 'ENOTCONN' });

    for (const fd of [quiet, chatty, ended, reset, unconnected]) native.close(fd);
    await server.allClosed();
    expect(fdCount()).toBe(before);
    await server.close();
  });

  it('says `data` for bytes a peek offset hides (SO_PEEK_OFF, set through a copy a client holds), and `alive` without', async () => {
    const server = await startServer('127.0.0.1', () => {});
    const before = fdCount();
    const fd = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 });
    await server.waitForConnections(1);
    // A child process sets it through its inherited copy, as a client would through a lent one: an option of the
    // socket, not of the fd (TCP has it since Linux 6.10). Past the 10 bytes sent below, a peek sees none of them.
    const script = `
import socket
s = socket.socket(fileno=3)
try:
    s.setsockopt(socket.SOL_SOCKET, 42, 100)  # SO_PEEK_OFF
except OSError as error:
    print('unsupported', error.errno)
else:
    print('set', s.getsockopt(socket.SOL_SOCKET, 42))
s.detach()
`;
    const child = spawnSync('python3', ['-c', script], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe', fd] });
    requirePrerequisite(
      child.stdout === 'set 100\n',
      `SO_PEEK_OFF on TCP sockets (Linux 6.10+): ${child.stdout}${child.stderr}`,
    );
    expect(native.probe(fd)).toEqual({ state: 'alive', tcpState: 1 });

    server.connections[0]!.write('0123456789');
    await waitForEvents(fd, native.READABLE);
    expect(native.probe(fd)).toEqual({ state: 'data', tcpState: 1 });

    native.close(fd);
    await server.allClosed();
    expect(fdCount()).toBe(before);
    await server.close();
  });

  it('works on unix sockets (no tcpState)', () => {
    const [left, right] = native.seqpacketPair();
    expect(native.probe(left)).toEqual({ state: 'alive' });
    native.sendMessage(right, Buffer.from('x'));
    expect(native.probe(left)).toEqual({ state: 'data' });
    native.recvMessage(left, 8, 0);
    native.close(right);
    expect(native.probe(left)).toEqual({ state: 'eof' });
    native.close(left);
  });
});

describe('tcpInfo', () => {
  it('writes into the addon’s own array (tcpInfoScratch) what it writes into a caller’s, for each flag', async () => {
    const server = await startServer('127.0.0.1', (socket) => socket.pause());
    const fd = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 });
    await server.waitForConnections(1);
    server.connections[0]!.write('ab'); // unread input: SIOCINQ is read with withMark
    const own = new Float64Array(native.TCP_INFO_FIELDS);
    await until(() => {
      native.tcpInfo(fd, own);
      return own[native.TcpInfoField.bytesReceived] === 2;
    });
    const scratch = native.tcpInfoScratch;
    for (const [withPeer, withMark] of [
      [false, false],
      [true, false],
      [false, true],
      [true, true],
    ] as const) {
      // Each read writes only its own fields: both arrays start from the same other values.
      own.fill(-1);
      scratch.fill(-1);
      native.tcpInfo(fd, own, withPeer, withMark);
      native.tcpInfo(fd, scratch, withPeer, withMark);
      expect(Array.from(scratch)).toEqual(Array.from(own));
      expect(scratch[native.TcpInfoField.peer]).toBe(withPeer ? 4 * 65536 + server.port : -1);
      expect(scratch[native.TcpInfoField.inq]).toBe(withMark ? 2 : -1);
    }
    // An error is the syscall's, as with a caller's array.
    const unconnected = native.tcpSocket(4);
    expect(catchError(() => native.tcpInfo(unconnected, scratch, true))).toMatchObject({ syscall: 'getpeername' });
    native.close(unconnected);
    native.close(fd);
    await server.close();
  });

  it('with withMark reads the inode, the peer, the counters and both queue lengths in one call', async () => {
    const server = await startServer('127.0.0.1', (socket) => socket.pause()); // it reads nothing
    const before = fdCount();
    const fd = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 });
    await server.waitForConnections(1);
    const peerSide = server.connections[0]!;
    const info = new Float64Array(native.TCP_INFO_FIELDS);
    const { tcpState, bytesSent, bytesAcked, bytesReceived, notsentBytes, inode, outq, inq } = native.TcpInfoField;
    const read = () => {
      native.tcpInfo(fd, info, true, true);
      return info;
    };
    // Fresh: nothing sent, received or queued; the ack of our SYN is the one byte acknowledged.
    const peer = [4 * 65536 + server.port, 0x7f000001, 0, 0];
    expect(Array.from(read())).toEqual([1, 0, 1, 0, 0, ...peer, native.socketInode(fd), 0, 0]);
    // Input nobody read: SIOCINQ says how much.
    peerSide.write('xyz');
    await until(() => read()[inq] === 3);
    expect(info[bytesReceived]).toBe(3);
    expect(info[outq]).toBe(0);
    expect(native.tcpCounters(fd)).toMatchObject({ inq: 3, outq: 0 });
    // Output the peer does not take: written until the socket would block, part of it not even sent.
    const chunk = Buffer.alloc(1 << 16, 'a');
    let written = 0;
    for (let sent = native.sendMessage(fd, chunk); sent !== null; sent = native.sendMessage(fd, chunk)) written += sent;
    read();
    expect(info[notsentBytes]).toBeGreaterThan(0);
    expect(info[outq]).toBeGreaterThanOrEqual(info[notsentBytes]!);
    expect(info[outq]).toBeLessThanOrEqual(written);
    expect(info[bytesSent]! + info[notsentBytes]!).toBeGreaterThanOrEqual(written);
    expect(info[bytesAcked]).toBeGreaterThan(1);
    expect(info[inq]).toBe(3);
    native.close(fd);
    peerSide.destroy(); // paused, it would not see the reset
    // Not established (the peer's FIN: CLOSE_WAIT): the queues as the ioctls say.
    const ended = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 });
    await server.waitForConnections(2);
    server.connections[1]!.end('xyz');
    await until(() => {
      native.tcpInfo(ended, info, true, true);
      return info[tcpState] === 8;
    });
    expect([info[inode], info[outq], info[inq]]).toEqual([native.socketInode(ended), 0, 3]);
    native.close(ended);

    const unconnected = native.tcpSocket(4);
    expect(catchError(() => native.tcpInfo(unconnected, info, true, true))).toMatchObject({
      code: 'ENOTCONN',
      syscall: 'getpeername',
    });
    native.tcpInfo(unconnected, info, false, true);
    expect([info[tcpState], info[inode], info[outq], info[inq]]).toEqual([7, native.socketInode(unconnected), 0, 0]);
    expect(() => native.tcpInfo(unconnected, new Float64Array(9), true, true)).toThrow(TypeError);
    native.close(unconnected);
    const [left, right] = native.seqpacketPair();
    // Not TCP: TCP_INFO fails.
    expect(catchError(() => native.tcpInfo(left, info, false, true))).toMatchObject({ syscall: 'getsockopt' });
    native.close(left);
    native.close(right);
    const file = openSync('/dev/null', 'r');
    expect(catchError(() => native.tcpInfo(file, info, false, true))).toMatchObject({
      code: 'ENOTSOCK',
      syscall: 'fstat',
    });
    closeSync(file);
    await server.allClosed();
    expect(fdCount()).toBe(before);
    await server.close();
  });
});

describe('peerAddress', () => {
  it("with words writes the same read as tcpInfo's withPeer does, IPv4 and IPv6", async () => {
    const hosts = hasIpv6Loopback ? ['127.0.0.1', '::1'] : ['127.0.0.1'];
    const info = new Float64Array(native.TCP_INFO_FIELDS);
    const peerAt = native.TcpInfoField.peer;
    for (const host of hosts) {
      const server = await startServer(host);
      const fd = await connectTcp(host, server.port, { timeoutMs: 10_000 });
      const words = new Float64Array(native.PEER_WORDS).fill(-1);
      expect(native.peerAddress(fd, words)).toEqual({
        address: host,
        family: host === '::1' ? 6 : 4,
        port: server.port,
      });
      native.tcpInfo(fd, info, true);
      expect(Array.from(words)).toEqual(Array.from(info.subarray(peerAt, peerAt + native.PEER_WORDS)));
      expect(() => native.peerAddress(fd, new Float64Array(3))).toThrow(TypeError);
      native.close(fd);
      await server.close();
    }
  });
});

describe('closeNeverShared', () => {
  it('closes without the linger disarm close() makes first (a linger {1, 0} then resets the connection)', async () => {
    const server = await startServer('127.0.0.1', (socket) => socket.pause());
    const before = fdCount();
    const states: Record<string, number> = {};
    const closes = { close: native.close, closeNeverShared: native.closeNeverShared };
    for (const [index, [how, close]] of Object.entries(closes).entries()) {
      const fd = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 });
      await server.waitForConnections(index + 1);
      await lingerZeroThroughCopy(fd);
      close(fd);
      states[how] = stateAfterClose(server.connections[index]!);
    }
    // close(): the linger turned off, a FIN (CLOSE_WAIT); closeNeverShared: the linger kept, a reset (CLOSE).
    expect(states).toEqual({ close: 8, closeNeverShared: 7 });
    for (const socket of server.connections) socket.destroy(); // paused, they would not see the end
    await server.allClosed();
    expect(fdCount()).toBe(before);
    await server.close();
  });
});

/** Waits (event-loop turns, bounded) until `check` holds: the kernel's counters move when a segment lands. */
async function until(check: () => boolean): Promise<void> {
  for (let i = 0; i < 2_000 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 1));
  expect(check()).toBe(true);
}
