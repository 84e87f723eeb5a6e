// The connect guard (daemon/connect-guard.ts): cgroup BPF programs on the daemon's cgroup refuse every connect() of
// a socket the daemon connected, whoever holds it. Root: the programs need CAP_BPF and CAP_NET_ADMIN, and the
// hostile client runs as another uid with no network of its own (`unshare -n`), the sandboxed client of
// docs/security.md, whose only way out is a socket the daemon lent.
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ownCgroupDirectory } from '../daemon/connect-guard.js';
import { encodeFdName } from '../daemon/sd-notify.js';
import { connectTcp } from '../daemon/tcp-connect.js';
import * as native from '../shared/native.js';
import { spawnChild } from './helpers/children.js';
import { daemonMain, eventually, repoRoot } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { pathOrigin, startSharedDaemon } from './helpers/trust.js';

const SANDBOXED_UID = 65534;
const CAP_NET_ADMIN = 12;
const CAP_BPF = 39;

beforeAll(() => {
  if (process.getuid?.() !== 0) {
    throw new Error('daemon-connect-guard.system.test.ts sets up cgroup BPF programs and needs root');
  }
});

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

const daemon = (port: number, config: object = {}) => startSharedDaemon(port, config, cleanups);

/** A listener in the daemon's network that counts the connections it gets: where a hostile client would go. */
async function elsewhere(): Promise<{ port: number; connections: () => number }> {
  let connections = 0;
  const server: Server = createServer((socket) => {
    connections++;
    socket.destroy();
  });
  server.listen(0, '127.0.0.1');
  await new Promise((resolve) => server.once('listening', resolve));
  cleanups.push(() => new Promise((resolve) => server.close(resolve)));
  return { port: (server.address() as { port: number }).port, connections: () => connections };
}

/** reconnect-client.py as the sandboxed client: another uid, in a network namespace of its own (no network). */
async function sandboxedReconnect(socketPath: string, port: number, target: number) {
  const { stdout } = await promisify(execFile)(
    'unshare',
    [
      '--net',
      '--',
      'setpriv',
      `--reuid=${SANDBOXED_UID}`,
      `--regid=${SANDBOXED_UID}`,
      '--clear-groups',
      // The system's Python: a per-user one (pyenv's shims under /root) is out of another uid's reach.
      '/usr/bin/python3',
      join(repoRoot, 'test', 'fixtures', 'reconnect-client.py'),
      socketPath,
      String(port),
      String(target),
    ],
    { timeout: 30_000 },
  );
  return JSON.parse(stdout.trim()) as Record<string, number | string>;
}

async function guardState(socketPath: string): Promise<unknown> {
  const raw = openRawClient(socketPath, cleanups);
  const reply = await raw.request({ type: 'stats', id: 1 });
  return (reply.message as unknown as { stats: { connectGuard: unknown } }).stats.connectGuard;
}

/**
 * sockpoold (the command, as root: its guard enforced) in a cgroup of its own below this process's, made for it; the
 * cgroup is removed at cleanup. `env`: more of its environment (LISTEN_PID is its own); `passed`: an fd it gets as
 * fd 3 (systemd's LISTEN_FDS). Returns its socket, its pid and what it printed so far.
 */
async function daemonInCgroup(
  port: number,
  config: object,
  env: Record<string, string> = {},
  passed?: number,
): Promise<{ socketPath: string; pid: number; cgroup: string; output: () => string }> {
  const cgroup = join(ownCgroupDirectory()!, `sockpool-guard-test-${process.pid}-${cgroupsMade++}`);
  mkdirSync(cgroup);
  const work = mkdtempSync(join(tmpdir(), 'sockpool-guard-cgroup-'));
  cleanups.push(() => rmSync(work, { recursive: true, force: true }));
  const file = join(work, 'config.json');
  writeFileSync(file, JSON.stringify({ egress: { allow: ['127.0.0.1/32'], allowPorts: [port] }, ...config }));
  const socketPath = join(work, 'sockpoold.sock');
  const { LISTEN_PID: _p, LISTEN_FDS: _f, LISTEN_FDNAMES: _n, NOTIFY_SOCKET: _s, ...inherited } = process.env;
  const child = spawnChild(
    '/bin/sh',
    [
      '-c',
      // LISTEN_PID (its own pid) only with fds passed: the daemon refuses the one without the other.
      'echo $$ > "$0/cgroup.procs" && { [ -z "$LISTEN_FDS" ] || export LISTEN_PID=$$; } && exec "$@"',
      cgroup,
      process.execPath,
      daemonMain,
      '--config',
      file,
      '--socket',
      socketPath,
      '--state-dir',
      join(work, 'state'),
      '--log-level',
      'debug',
    ],
    {
      env: { ...inherited, ...env },
      stdio: passed === undefined ? ['ignore', 'pipe', 'pipe'] : ['ignore', 'pipe', 'pipe', passed],
      what: 'sockpoold in a cgroup of its own',
    },
  );
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    output += chunk;
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    output += chunk;
  });
  const exited = once(child, 'close');
  cleanups.push(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await exited;
    }
    rmdirSync(cgroup);
  });
  await eventually(() => output.includes('sockpoold ready') || child.exitCode !== null, 'sockpoold ready');
  return { socketPath, pid: child.pid!, cgroup, output: () => output };
}

let cgroupsMade = 0;

/** The capability sets of a process's main thread, as bit masks. */
function capabilities(pid: number): { effective: bigint; permitted: bigint } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const mask = (name: string) => BigInt(`0x${new RegExp(`^${name}:\\s*([0-9a-f]+)`, 'm').exec(status)![1]}`);
  return { effective: mask('CapEff'), permitted: mask('CapPrm') };
}

const has = (mask: bigint, capability: number) => (mask >> BigInt(capability)) & 1n;

describe('connect guard (cgroup BPF)', () => {
  it('a sandboxed client cannot connect a lent socket elsewhere, nor back to its origin, after disconnecting it (EPERM)', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { minIdle: 0 } } });
    expect(await guardState(sockpoold.socketPath)).toMatchObject({ state: 'enforced' });
    const listener = await elsewhere();
    for (const target of [listener.port, origin.port]) {
      const seen = await sandboxedReconnect(sockpoold.socketPath, origin.port, target);
      // Refused by the kernel; the release of the disconnected socket refused too; the next lease goes to the origin.
      expect(seen).toMatchObject({
        reconnected: 0,
        error: 'EPERM',
        release: 'SOCKPOOL_ERR_PROTOCOL:used',
        next: origin.port,
      });
    }
    expect(listener.connections()).toBe(0);
    // The daemon's own connects go on: a request through a fresh lease.
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const lease = await raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: origin.port });
    const socket = new Socket({ fd: lease.fds[0]! });
    const answer = new Promise<string>((resolve) => socket.once('data', (data) => resolve(data.toString())));
    socket.write('GET /after HTTP/1.1\r\nHost: x\r\n\r\n');
    expect(await answer).toMatch(/\/after$/);
    socket.destroy();
  });

  it('connectGuard = false: the same client connects the lent socket elsewhere (what the guard refuses)', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { connectGuard: false, pool: { defaults: { minIdle: 0 } } });
    expect(await guardState(sockpoold.socketPath)).toMatchObject({ state: 'off' });
    const listener = await elsewhere();
    const seen = await sandboxedReconnect(sockpoold.socketPath, origin.port, listener.port);
    expect(seen).toMatchObject({ reconnected: 1, release: 'SOCKPOOL_ERR_PROTOCOL:used', next: origin.port });
    expect(listener.connections()).toBe(1);
  });

  it("reads the peer at the release of a socket taken back from the fd store that was made in another cgroup: the guard's programs do not cover it", async () => {
    const origin = await pathOrigin(cleanups);
    // The stored socket is made here, in this process's cgroup; the daemon runs in a cgroup of its own below it, as
    // after a restart under systemd that made the service's cgroup anew (the guard is attached to the new one, and
    // cgroup BPF programs run for the sockets created in the cgroup they are attached to).
    const stored = await connectTcp('127.0.0.1', origin.port, { timeoutMs: 5000 });
    cleanups.push(() => native.close(stored));
    const { socketPath, output } = await daemonInCgroup(
      origin.port,
      {},
      { LISTEN_FDS: '1', LISTEN_FDNAMES: encodeFdName({ host: '127.0.0.1', port: origin.port }) },
      stored,
    );
    expect(output()).toContain('"adopted":1');
    expect(await guardState(socketPath)).toMatchObject({ state: 'enforced' });
    // The client's lease is the adopted socket: its copy connects it elsewhere (the kernel lets it: not covered),
    // and the release is refused all the same (the peer changed), as where no guard is.
    const { stdout } = await promisify(execFile)(
      '/usr/bin/python3',
      [join(repoRoot, 'test', 'fixtures', 'reconnect-client.py'), socketPath, String(origin.port)],
      { timeout: 30_000 },
    );
    const seen = JSON.parse(stdout.trim()) as Record<string, number | string>;
    expect(seen).toMatchObject({ reconnected: 1, release: 'SOCKPOOL_ERR_PROTOCOL:used', next: origin.port });
  });

  it('reads the peer at the release of a socket made after the daemon was moved to another cgroup: the guard attached at start does not cover it', async () => {
    const origin = await pathOrigin(cleanups);
    // No socket made before the move: the lease is the connect of the acquire, after it.
    const sockpoold = await daemonInCgroup(origin.port, { pool: { defaults: { minIdle: 0 } } });
    expect(await guardState(sockpoold.socketPath)).toMatchObject({ state: 'enforced' });
    // The daemon moved to a sibling of the cgroup its guard is attached to (an operator's or a manager's move):
    // the programs there do not run for the sockets it creates now.
    const moved = `${sockpoold.cgroup}-moved`;
    mkdirSync(moved);
    writeFileSync(join(moved, 'cgroup.procs'), String(sockpoold.pid));
    cleanups.push(() => {
      // Back to the guard's cgroup before the daemon's cleanup stops it and removes that cgroup.
      writeFileSync(join(sockpoold.cgroup, 'cgroup.procs'), String(sockpoold.pid));
      rmdirSync(moved);
    });
    // The client's copy connects the lent socket elsewhere (the kernel lets it: not covered), and the release is
    // refused all the same (the peer changed), as where no guard is.
    const { stdout } = await promisify(execFile)(
      '/usr/bin/python3',
      [join(repoRoot, 'test', 'fixtures', 'reconnect-client.py'), sockpoold.socketPath, String(origin.port)],
      { timeout: 30_000 },
    );
    const seen = JSON.parse(stdout.trim()) as Record<string, number | string>;
    expect(seen).toMatchObject({ reconnected: 1, release: 'SOCKPOOL_ERR_PROTOCOL:used', next: origin.port });
  });

  it('drops CAP_BPF and CAP_NET_ADMIN once set up, and keeps CAP_NET_ADMIN where a policy sets a mark', async () => {
    const origin = await pathOrigin(cleanups);
    const plain = await daemon(origin.port);
    const dropped = capabilities(plain.child.pid!);
    expect([has(dropped.effective, CAP_BPF), has(dropped.permitted, CAP_BPF)]).toEqual([0n, 0n]);
    expect([has(dropped.effective, CAP_NET_ADMIN), has(dropped.permitted, CAP_NET_ADMIN)]).toEqual([0n, 0n]);
    const marked = await daemon(origin.port, { pool: { defaults: { mark: 7 } } });
    const kept = capabilities(marked.child.pid!);
    expect([has(kept.effective, CAP_BPF), has(kept.effective, CAP_NET_ADMIN)]).toEqual([0n, 1n]);
    expect(await guardState(marked.socketPath)).toMatchObject({ state: 'enforced' });
  });
});

/**
 * In another process, on its copy of `fd` (fd 3 there), or on a socket of its own that it connected to 127.0.0.1:
 * disconnects (AF_UNSPEC) and connects again, to 127.0.0.1 or ::1 as the socket's family. "ok" or the errno's name.
 */
async function reconnectCopy(
  fd: number | 'own',
  v4Port: number,
  v6Port: number,
  how: 'connect' | 'fastopen' = 'connect',
): Promise<string> {
  const script = [
    'import ctypes, errno, socket, sys',
    'libc = ctypes.CDLL(None, use_errno=True)',
    's = socket.socket(fileno=3) if sys.argv[3] == "copy" else socket.create_connection(("127.0.0.1", int(sys.argv[1])))',
    'assert s.fileno() == 3 or sys.argv[3] == "own"',
    'libc.connect(3, ctypes.byref((ctypes.c_ubyte * 16)()), 16)',
    's.setblocking(True)',
    'target = ("127.0.0.1", int(sys.argv[1])) if s.family == socket.AF_INET else ("::1", int(sys.argv[2]))',
    'try:',
    // TCP Fast Open: sendto() with MSG_FASTOPEN connects too, through the same kernel path and hook.
    '    s.sendto(b"x", socket.MSG_FASTOPEN, target) if sys.argv[4] == "fastopen" else s.connect(target)',
    '    print("ok")',
    'except OSError as e:',
    '    print(errno.errorcode[e.errno])',
  ].join('\n');
  const args = [String(v4Port), String(v6Port), fd === 'own' ? 'own' : 'copy', how];
  const child = spawnChild('python3', ['-c', script, ...args], {
    stdio: ['ignore', 'pipe', 'inherit', fd === 'own' ? 'ignore' : fd],
  });
  let out = '';
  child.stdout!.on('data', (data: Buffer) => {
    out += data.toString();
  });
  await once(child, 'close');
  return out.trim();
}

describe('the native guard, in this process', () => {
  it('refuses a reconnect of both ends of a loopback pair and of IPv4 and IPv6 sockets connectStart connected, Fast Open too', async () => {
    // This test process's cgroup; the programs go with the process (vitest runs each file in a process of its own).
    expect(native.startConnectGuard(ownCgroupDirectory()!)).toBe('EPERM');
    // The copies' disconnects reset these connections: their ends here are dropped at once.
    const drop = (socket: Socket) => {
      socket.on('error', () => undefined);
      socket.destroy();
    };
    const v4 = createServer(drop);
    const v6 = createServer(drop);
    await new Promise((resolve) => v4.listen(0, '127.0.0.1', () => resolve(undefined)));
    await new Promise((resolve) => v6.listen(0, '::1', () => resolve(undefined)));
    cleanups.push(
      () => v4.close(),
      () => v6.close(),
    );
    const v4Port = (v4.address() as { port: number }).port;
    const v6Port = (v6.address() as { port: number }).port;
    const fds = [...native.loopbackPair()];
    for (const [family, address, port] of [
      [4, '127.0.0.1', v4Port],
      [6, '::1', v6Port],
    ] as const) {
      const fd = native.tcpSocket(family);
      native.connectStart(fd, address, port);
      fds.push(fd);
    }
    // Each registered, and connectStart's also seen by the programs at its connect: covered (native.guardCovers).
    expect(fds.map((fd) => native.guardCovers(fd))).toEqual([true, true, true, true]);
    // Unregistered: a socket the other process connected itself disconnects and connects again.
    const results = await Promise.all([...fds, 'own' as const].map((fd) => reconnectCopy(fd, v4Port, v6Port)));
    expect(results).toEqual(['EPERM', 'EPERM', 'EPERM', 'EPERM', 'ok']);
    // A connect by TCP Fast Open (sendto with MSG_FASTOPEN) is refused the same way; its own socket's goes through.
    expect(await reconnectCopy(fds[2]!, v4Port, v6Port, 'fastopen')).toBe('EPERM');
    expect(await reconnectCopy('own', v4Port, v6Port, 'fastopen')).toBe('ok');
    for (const fd of fds) native.close(fd);
  });
});
