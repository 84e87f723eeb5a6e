// TCP through the addon where it needs root: a connect that times out (through a veth whose far end drops
// everything, in a network namespace made here) and socket marks (SO_MARK needs CAP_NET_ADMIN). System tier.
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { markOf } from '../daemon/lease-guard.js';
import { connectTcp } from '../daemon/tcp-connect.js';
import * as native from '../shared/native.js';
import { fdCount, startServer, warmUpChildProcesses } from './fixtures/native-helpers.js';
import { runChildToEnd, spawnChild } from './helpers/children.js';

const setMarkFixture = fileURLToPath(new URL('./fixtures/native-setmark.mjs', import.meta.url));
const repairSendFixture = fileURLToPath(new URL('./fixtures/tcp-repair-send.py', import.meta.url));

/** The mark the kernel shows for our TCP connection from local port `port` (ss -e prints `fwmark:0x...`). */
function kernelMark(port: number): string | undefined {
  const listing = execFileSync('ss', ['-tnHe', 'src', `127.0.0.1:${port}`], { encoding: 'utf8' });
  return /fwmark:(0x[0-9a-f]+)/.exec(listing)?.[1];
}

beforeAll(async () => {
  await warmUpChildProcesses();
});

describe('connectTcp (root)', () => {
  // A veth pair whose far end sits in a fresh network namespace; a permanent neighbour entry sends our SYNs to a
  // MAC address nobody has, so they vanish: no reply, no ICMP, the connect can only time out.
  it('rejects with ETIMEDOUT when SYNs go unanswered', async () => {
    const suffix = process.pid % 100_000;
    const namespace = `sockpool-test-${process.pid}`;
    const hostSide = `spt${suffix}h`;
    const farSide = `spt${suffix}f`;
    const subnet = `198.18.${process.pid % 256}`;
    const ip = (...args: string[]) => execFileSync('ip', args, { stdio: 'pipe' });
    ip('netns', 'add', namespace);
    try {
      ip('link', 'add', hostSide, 'type', 'veth', 'peer', 'name', farSide, 'netns', namespace);
      ip('addr', 'add', `${subnet}.1/30`, 'dev', hostSide);
      ip('link', 'set', hostSide, 'up');
      ip('-n', namespace, 'link', 'set', farSide, 'up');
      ip('neigh', 'replace', `${subnet}.2`, 'lladdr', '02:00:00:00:53:02', 'dev', hostSide, 'nud', 'permanent');

      const before = fdCount();
      await expect(connectTcp(`${subnet}.2`, 80, { timeoutMs: 200 })).rejects.toMatchObject({
        code: 'ETIMEDOUT',
        errno: -110,
        syscall: 'connect',
        address: `${subnet}.2`,
        port: 80,
      });
      expect(native.trackedFds()).toEqual([]);
      expect(fdCount()).toBe(before);
    } finally {
      try {
        ip('link', 'del', hostSide);
      } catch {
        // already gone with the namespace
      }
      ip('netns', 'del', namespace);
    }
  });

  it('marks the connection before its SYN (SO_MARK, as root)', async () => {
    const server = await startServer('127.0.0.1');
    const before = fdCount();
    const fd = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000, mark: 0x5350 });
    const { port } = native.localAddress(fd);
    expect(kernelMark(port)).toBe('0x5350');
    native.close(fd);
    await server.allClosed();
    expect(fdCount()).toBe(before);
    await server.close();
  });
});

describe('socket options (root)', () => {
  it('setMark applies any 32-bit mark, and a device binding can be removed again, as root', () => {
    const before = fdCount();
    const fd = native.tcpSocket(4);
    native.setMark(fd, 0xffffffff);
    native.setMark(fd, 0);
    // Changing a device binding once made needs CAP_NET_RAW.
    native.bindToDevice(fd, 'lo');
    native.bindToDevice(fd, '');
    native.close(fd);
    expect(fdCount()).toBe(before);
  });

  it('setMark without CAP_NET_ADMIN throws EPERM (unprivileged child)', async () => {
    const { code, stdout } = await runChildToEnd(process.execPath, [setMarkFixture], { uid: 65534, gid: 65534 });
    expect(code).toBe(0);
    expect(JSON.parse(stdout)).toEqual({
      thrown: true,
      code: 'EPERM',
      errno: -1,
      syscall: 'setsockopt',
      message: 'setsockopt EPERM SO_MARK',
    });
  });
});

describe('tcpInfo withMark (root)', () => {
  // TCP_INFO shows an empty send queue without SIOCOUTQ only when nothing is unsent, nothing was ever sent and
  // nothing is unacknowledged (the addon's TcpInfo). A send queue restored with TCP_REPAIR (CAP_NET_ADMIN) counts as
  // sent without being transmitted: bytes_sent stays 0, only tcpi_unacked tells.
  it('reads SIOCOUTQ for a send queue restored with TCP_REPAIR, which bytes_sent does not count', async () => {
    const server = await startServer('127.0.0.1', () => {});
    const before = fdCount();
    const fd = await connectTcp('127.0.0.1', server.port, { timeoutMs: 10_000 });
    await server.waitForConnections(1);
    const child = spawnChild('python3', [repairSendFixture, 'hello'], { stdio: ['ignore', 'inherit', 'inherit', fd] });
    const [code] = await once(child, 'exit');
    expect(code).toBe(0);
    const info = new Float64Array(native.TCP_INFO_FIELDS);
    native.tcpInfo(fd, info, true, true);
    const { tcpState, bytesSent, notsentBytes, outq, inq } = native.TcpInfoField;
    expect([info[tcpState], info[bytesSent], info[notsentBytes], info[outq], info[inq]]).toEqual([1, 0, 0, 5, 0]);
    // So the mark of such a socket (one adopted from the fd store after a restore) is not quiet.
    expect(markOf(fd)).toMatchObject({ bytesSent: 0, quiet: false });
    native.close(fd); // in repair mode: closed without a FIN or a reset, so the server side is ended here
    server.connections[0]!.destroy();
    await server.allClosed();
    expect(fdCount()).toBe(before);
    await server.close();
  });
});
