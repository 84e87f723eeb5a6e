// daemon/sd-notify.ts and daemon/listen-fds.ts against real sockets and processes: the test binds the datagram socket
// systemd would ($NOTIFY_SOCKET) and reads what a child process running the compiled module sends; socket
// activation comes from the real systemd-socket-activate. Fixtures import dist/ (npm run build).
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { classifyListenFds, listenFds } from '../daemon/listen-fds.js';
import {
  connectedAtFromTag,
  connectedAtTag,
  decodeFdName,
  encodeFdName,
  isCongestion,
  isValidFdName,
  Notifier,
  retryWhileCongested,
  watchdogUsec,
} from '../daemon/sd-notify.js';
import * as native from '../shared/native.js';
import { NotifySocket } from './fixtures/systemd-notify-socket.js';
import { spawnChild } from './helpers/children.js';

const projectRoot = fileURLToPath(new URL('..', import.meta.url));
const node = process.execPath;
const notifyFixture = join(projectRoot, 'test/fixtures/systemd-notify-fixture.mjs');
const listenFixture = join(projectRoot, 'test/fixtures/systemd-listen-fixture.mjs');

const workDir = mkdtempSync(join(tmpdir(), 'sockpool-notify-'));
const children: ChildProcess[] = [];
const notifySockets: NotifySocket[] = [];
let echoServer: Server;
let echoPort = 0;
let echoConnections = 0;
const echoSockets = new Set<Socket>();

beforeAll(async () => {
  for (const file of ['dist/daemon/sd-notify.js', 'dist/daemon/listen-fds.js', 'dist/shared/native.js']) {
    if (!existsSync(join(projectRoot, file))) throw new Error(`${file} missing: run npm run build first`);
  }
  echoServer = createServer((socket) => {
    echoConnections++;
    echoSockets.add(socket);
    socket.on('close', () => echoSockets.delete(socket));
    socket.on('error', () => {});
    socket.pipe(socket);
  });
  echoServer.listen(0, '127.0.0.1');
  await once(echoServer, 'listening');
  const address = echoServer.address();
  if (address === null || typeof address === 'string') throw new Error('no echo port');
  echoPort = address.port;
});

afterEach(() => {
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
  for (const socket of notifySockets.splice(0)) socket.close();
});

afterAll(async () => {
  for (const socket of echoSockets) socket.destroy();
  echoServer.close();
  rmSync(workDir, { recursive: true, force: true });
});

let socketCounter = 0;
function notifySocket(abstract = false): NotifySocket {
  socketCounter++;
  const path = abstract
    ? `@sockpool-test-${process.pid}-${socketCounter}-${Date.now()}`
    : join(workDir, `notify-${socketCounter}.sock`);
  const socket = new NotifySocket(path);
  notifySockets.push(socket);
  return socket;
}

function startFixture(env: Record<string, string>): ChildProcess {
  const { NOTIFY_SOCKET: _n, WATCHDOG_USEC: _u, WATCHDOG_PID: _p, LISTEN_PID: _l, ...inherited } = process.env;
  const child = spawnChild(node, [notifyFixture], {
    env: { ...inherited, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  children.push(child);
  return child;
}

/** The fixture's first stdout line, parsed; fails fast if the child exits first. */
async function firstLine(child: ChildProcess): Promise<unknown> {
  const exit = once(child, 'exit').then(([code, signal]) => {
    throw new Error(`fixture exited (${code ?? signal}) before writing a line`);
  });
  const [data] = (await Promise.race([once(child.stdout!, 'data'), exit])) as [Buffer];
  exit.catch(() => {});
  return JSON.parse(data.toString());
}

async function exited(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null) return child.exitCode;
  const [code] = (await once(child, 'exit')) as [number | null];
  return code;
}

/** Writes through a TCP fd and reads the echo: proves the socket is still connected. */
async function echoThrough(fd: number): Promise<string> {
  native.untrack(fd); // ownership passes to the net.Socket, which closes it
  const socket = new Socket({ fd, readable: true, writable: true });
  try {
    socket.write('still connected');
    const [data] = (await once(socket, 'data')) as [Buffer];
    return data.toString();
  } finally {
    socket.destroy();
  }
}

describe('Notifier through a real NOTIFY_SOCKET', () => {
  it('sends READY, STATUS, watchdog pings, FDSTORE with a live TCP socket, RELOADING and STOPPING', async () => {
    const notify = notifySocket();
    const connectionsBefore = echoConnections;
    const child = startFixture({ NOTIFY_SOCKET: notify.path, WATCHDOG_USEC: '100000', ECHO_PORT: String(echoPort) });
    expect(await firstLine(child)).toEqual({ watchdogIntervalMs: 50, enabled: true });

    expect((await notify.waitFor((text) => text.startsWith('STATUS='))).text).toBe('STATUS=starting');
    const ready = await notify.waitFor((text) => text.startsWith('READY=1'));
    expect(ready.text).toBe('READY=1\nSTATUS=serving');

    const stored = await notify.waitFor((text) => text.startsWith('FDSTORE=1'));
    const name = encodeFdName({ host: '127.0.0.1', port: echoPort });
    expect(stored.text).toBe(`FDSTORE=1\nFDNAME=${name}`);
    expect(stored.fds).toHaveLength(1);
    expect(native.probe(stored.fds[0]!).state).toBe('alive');
    expect(await echoThrough(stored.fds[0]!)).toBe('still connected');
    expect(echoConnections - connectionsBefore).toBe(1); // the same connection, not a new one
    stored.fds.length = 0;

    const removal = await notify.waitFor((text) => text.startsWith('FDSTOREREMOVE=1'));
    expect(removal.text).toBe('FDSTOREREMOVE=1\nFDNAME=o-2001%3Adb8%3A%3A1-443~7');
    expect(removal.fds).toEqual([]);

    // WATCHDOG_USEC=100000: a ping every 50 ms, for as long as it runs (no timing asserted: the pings keep coming).
    const pingsAt = (): number => notify.texts().filter((text) => text === 'WATCHDOG=1').length;
    const before = pingsAt();
    await notify.waitFor(() => pingsAt() - before >= 8);

    child.kill('SIGHUP');
    const reloading = await notify.waitFor((text) => text.startsWith('RELOADING=1'));
    const match = /^RELOADING=1\nMONOTONIC_USEC=(\d+)\nSTATUS=reloading configuration$/.exec(reloading.text);
    expect(match).not.toBeNull();
    // CLOCK_MONOTONIC is system-wide: the child's stamp is close to ours.
    const nowUsec = process.hrtime.bigint() / 1000n;
    const skewUsec = nowUsec - BigInt(match![1]!);
    expect(skewUsec >= 0n && skewUsec < 10_000_000n, `skew ${skewUsec} µs`).toBe(true);
    await notify.waitFor((text) => text === 'READY=1\nSTATUS=reloaded');

    child.kill('SIGTERM');
    await notify.waitFor((text) => text === 'STOPPING=1\nSTATUS=stopping');
    expect(await exited(child)).toBe(0);
  });

  it('does not ping when WATCHDOG_PID names another process', async () => {
    const notify = notifySocket();
    // The mark comes after 4 pings' due times: had a watchdog started, its pings would have arrived first.
    const child = startFixture({
      NOTIFY_SOCKET: notify.path,
      WATCHDOG_USEC: '100000',
      WATCHDOG_PID: '1',
      MARK_AFTER_MS: '200',
    });
    expect(await firstLine(child)).toEqual({ watchdogIntervalMs: null, enabled: true });
    await notify.waitFor((text) => text === 'READY=1\nSTATUS=serving');
    await notify.waitFor((text) => text === 'STATUS=mark');
    expect(notify.texts()).not.toContain('WATCHDOG=1');
    child.kill('SIGTERM');
    expect(await exited(child)).toBe(0);
  });

  it('pings when WATCHDOG_PID is the child itself', async () => {
    // The pid is only known after spawn, so the fixture gets it through a shell that execs node (same pid).
    const notify = notifySocket();
    const { NOTIFY_SOCKET: _n, WATCHDOG_USEC: _u, WATCHDOG_PID: _p, ...inherited } = process.env;
    const child = spawnChild('/bin/sh', ['-c', 'WATCHDOG_PID=$$ exec "$0" "$1"', node, notifyFixture], {
      env: { ...inherited, NOTIFY_SOCKET: notify.path, WATCHDOG_USEC: '100000' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    children.push(child);
    expect(await firstLine(child)).toEqual({ watchdogIntervalMs: 50, enabled: true });
    await notify.waitFor((text) => text === 'WATCHDOG=1');
    child.kill('SIGTERM');
    expect(await exited(child)).toBe(0);
  });

  it('works with an abstract-namespace NOTIFY_SOCKET (@name)', async () => {
    const notify = notifySocket(true);
    const child = startFixture({ NOTIFY_SOCKET: notify.path, WATCHDOG_USEC: '100000', ECHO_PORT: String(echoPort) });
    await notify.waitFor((text) => text === 'READY=1\nSTATUS=serving');
    await notify.waitFor((text) => text === 'WATCHDOG=1');
    const stored = await notify.waitFor((text) => text.startsWith('FDSTORE=1'));
    expect(stored.fds).toHaveLength(1);
    child.kill('SIGTERM');
    await notify.waitFor((text) => text.startsWith('STOPPING=1'));
    expect(await exited(child)).toBe(0);
  });

  it('is a no-op without NOTIFY_SOCKET, and reports a vanished socket as a syscall error', () => {
    const silent = new Notifier({ env: {} });
    expect(silent.enabled).toBe(false);
    silent.ready('x');
    silent.storeFds('o-example.com-443', [0]);
    expect(silent.startWatchdog()).toBeNull();

    const gone = new Notifier({ env: { NOTIFY_SOCKET: join(workDir, 'nobody-listens.sock') } });
    expect(() => gone.ready()).toThrow(expect.objectContaining({ code: 'ENOENT', syscall: 'sendmsg' }));
    expect(() => new Notifier({ env: { NOTIFY_SOCKET: 'relative/path' } })).toThrow(
      expect.objectContaining({ code: 'SOCKPOOL_ERR_CONFIG' }),
    );
  });

  it('reports a full queue as EAGAIN, and retryWhileCongested waits for room or gives up', async () => {
    const notify = notifySocket();
    notify.pause();
    const notifier = new Notifier({ env: { NOTIFY_SOCKET: notify.path } });
    const fill = (): unknown => {
      for (let sent = 0; sent < 100_000; sent++) {
        try {
          notifier.status(`filler ${sent}`);
        } catch (error) {
          return error;
        }
      }
      return undefined;
    };
    // Through unix-dgram (plain messages) and through the addon (FDSTORE=1): the same error.
    const congestion = fill();
    expect(congestion).toMatchObject({ code: 'EAGAIN', syscall: 'sendmsg' });
    expect(isCongestion(congestion)).toBe(true);
    const [mine, peer] = native.seqpacketPair();
    try {
      expect(() => notifier.storeFds('o-example.com-443', [mine])).toThrow(expect.objectContaining({ code: 'EAGAIN' }));
      await expect(retryWhileCongested(() => notifier.status('never'), 30)).rejects.toMatchObject({ code: 'EAGAIN' });
      // Room comes only after the third try failed: success proves it kept trying while the queue was full.
      let tries = 0;
      await retryWhileCongested(() => {
        tries++;
        if (tries === 3) notify.resume();
        notifier.storeFds('o-example.com-443', [mine]);
      }, 5000);
      expect(tries).toBeGreaterThan(3);
      const stored = await notify.waitFor((text) => text === 'FDSTORE=1\nFDNAME=o-example.com-443');
      expect(stored.fds).toHaveLength(1);
    } finally {
      native.close(mine);
      native.close(peer);
    }
    // Anything but congestion is thrown at once.
    const gone = new Notifier({ env: { NOTIFY_SOCKET: join(workDir, 'nobody-listens.sock') } });
    await expect(retryWhileCongested(() => gone.ready(), 5000)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('strips newlines from status text so a value cannot inject assignments', async () => {
    const notify = notifySocket();
    new Notifier({ env: { NOTIFY_SOCKET: notify.path } }).status('one\nREADY=1');
    expect((await notify.waitFor(() => true)).text).toBe('STATUS=one READY=1');
  });
});

describe('watchdogUsec', () => {
  it('follows sd_watchdog_enabled', () => {
    expect(watchdogUsec({}, 10)).toBeNull();
    expect(watchdogUsec({ WATCHDOG_USEC: '3000000' }, 10)).toBe(3_000_000);
    expect(watchdogUsec({ WATCHDOG_USEC: '3000000', WATCHDOG_PID: '10' }, 10)).toBe(3_000_000);
    expect(watchdogUsec({ WATCHDOG_USEC: '3000000', WATCHDOG_PID: '11' }, 10)).toBeNull();
    expect(watchdogUsec({ WATCHDOG_USEC: '0' }, 10)).toBeNull();
    expect(watchdogUsec({ WATCHDOG_USEC: 'soon' }, 10)).toBeNull();
  });
});

describe('FDNAME encoding of origins', () => {
  const cases: Array<[{ host: string; port: number }, string | undefined, string]> = [
    [{ host: 'example.com', port: 443 }, undefined, 'o-example.com-443'],
    [{ host: 'Sub-Domain.Example.COM.', port: 80 }, undefined, 'o-sub-domain.example.com-80'],
    [{ host: '127.0.0.1', port: 8080 }, '12', 'o-127.0.0.1-8080~12'],
    [{ host: '[2001:db8::1]', port: 443 }, undefined, 'o-2001%3Adb8%3A%3A1-443'],
    [{ host: 'fe80::1', port: 443 }, undefined, 'o-fe80%3A%3A1-443'],
    [{ host: 'bücher.example', port: 443 }, undefined, 'o-xn--bcher-kva.example-443'],
    [{ host: '127.1', port: 80 }, undefined, 'o-127.0.0.1-80'],
  ];
  it.each(cases)('encodes %j (tag %s) as %s and back', (origin, tag, name) => {
    expect(encodeFdName(origin, tag)).toBe(name);
    expect(isValidFdName(name)).toBe(true);
    const decoded = decodeFdName(name);
    expect(decoded).not.toBeNull();
    expect(encodeFdName(decoded!, decoded!.tag)).toBe(name);
  });

  it('decodes IPv6 to the canonical bare address', () => {
    expect(decodeFdName('o-2001%3Adb8%3A%3A1-443')).toEqual({ host: '2001:db8::1', port: 443 });
    expect(decodeFdName('o-a-b-c-1-2~x')).toEqual({ host: 'a-b-c-1', port: 2, tag: 'x' });
  });

  it('rejects names that are not ours or not canonical', () => {
    for (const name of [
      'sockpoold',
      'stored',
      'o-example.com',
      'o-example.com-0',
      'o-example.com-65536',
      'o-example.com-080',
      'o--443',
      'o-Example.com-443',
      'o-a%3a-443',
      'o-a%41-443',
      'o-example.com-443~',
      'o-a:b-443',
      'o-b%C3%BCcher.example-443',
      'o-127.1-80',
      'o-fe80%3A%3A1%25eth0-443',
    ]) {
      expect(decodeFdName(name), name).toBeNull();
    }
  });

  it('tags a stored socket with the second it connected', () => {
    const connected = Date.UTC(2026, 10, 25, 17, 0, 12, 345);
    const tag = connectedAtTag(connected);
    expect(tag).toMatch(/^c[0-9a-z]+$/);
    expect(connectedAtFromTag(tag)).toBe(Date.UTC(2026, 10, 25, 17, 0, 12));
    const name = encodeFdName({ host: 'example.com', port: 443 }, tag);
    expect(decodeFdName(name)).toEqual({ host: 'example.com', port: 443, tag });
    expect(connectedAtFromTag(undefined)).toBeNull();
    expect(connectedAtFromTag('12')).toBeNull();
  });

  it('refuses names systemd would refuse', () => {
    expect(() => encodeFdName({ host: `${'a'.repeat(250)}.com`, port: 443 })).toThrow(
      expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }),
    );
    expect(() => encodeFdName({ host: 'example.com', port: 0 })).toThrow();
    expect(() => encodeFdName({ host: 'fe80::1%eth0', port: 443 })).toThrow(
      expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }),
    );
    expect(isValidFdName('a:b')).toBe(false);
    expect(isValidFdName('a\nb')).toBe(false);
    expect(isValidFdName('x'.repeat(256))).toBe(false);
  });
});

describe('listenFds (sd_listen_fds semantics)', () => {
  it('takes fds 3.. only when LISTEN_PID is us, and unsets the variables', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '42', LISTEN_FDS: '2', LISTEN_FDNAMES: 'sockpoold:o-example.com-443' };
    expect(listenFds({ env, pid: 42 })).toEqual([
      { fd: 3, name: 'sockpoold' },
      { fd: 4, name: 'o-example.com-443' },
    ]);
    expect(env).toEqual({});

    const other: NodeJS.ProcessEnv = { LISTEN_PID: '43', LISTEN_FDS: '1' };
    expect(listenFds({ env: other, pid: 42 })).toEqual([]);
    expect(other).toEqual({});

    const unnamed: NodeJS.ProcessEnv = { LISTEN_PID: '42', LISTEN_FDS: '2' };
    expect(listenFds({ env: unnamed, pid: 42, unsetEnvironment: false })).toEqual([
      { fd: 3, name: 'unknown' },
      { fd: 4, name: 'unknown' },
    ]);
    expect(unnamed.LISTEN_FDS).toBe('2');
  });

  it('refuses malformed variables', () => {
    expect(() => listenFds({ env: { LISTEN_PID: '42', LISTEN_FDS: '2', LISTEN_FDNAMES: 'a' }, pid: 42 })).toThrow(
      expect.objectContaining({ code: 'SOCKPOOL_ERR_CONFIG' }),
    );
    expect(() => listenFds({ env: { LISTEN_PID: 'x', LISTEN_FDS: '1' }, pid: 42 })).toThrow();
    expect(listenFds({ env: {}, pid: 42 })).toEqual([]);
  });

  it('classifies a listening seqpacket socket without a name, and origin names', () => {
    const listener = native.seqpacketListen(join(workDir, 'classify.sock'), 4);
    try {
      const result = classifyListenFds([
        { fd: 0, name: 'unknown' },
        { fd: listener, name: 'unknown' },
        { fd: 99, name: 'o-example.com-443' },
      ]);
      expect(result.listener).toEqual({ fd: listener, name: 'unknown' });
      expect(result.origins).toEqual([
        { fd: 99, name: 'o-example.com-443', origin: { host: 'example.com', port: 443 } },
      ]);
      expect(result.other).toEqual([{ fd: 0, name: 'unknown' }]);
    } finally {
      native.close(listener);
    }
  });
});

describe('socket activation through systemd-socket-activate', () => {
  it('hands the fixture its listening socket by name on first connect', async () => {
    const activate = '/usr/bin/systemd-socket-activate';
    if (!existsSync(activate)) {
      throw new Error('systemd-socket-activate not found: install the Debian/Ubuntu package "systemd"');
    }
    const notify = notifySocket();
    const path = join(workDir, 'activated.sock');
    const child = spawnChild(
      activate,
      ['--seqpacket', '-l', path, '--fdname=sockpoold', '-E', `NOTIFY_SOCKET=${notify.path}`, node, listenFixture],
      { stdio: ['ignore', 'inherit', 'inherit'] },
    );
    children.push(child);
    // systemd-socket-activate binds, listens, then waits for the first connection before it execs the program. The
    // path exists from bind() on, and a connect between bind() and listen() is refused: retry until it listens.
    const deadline = Date.now() + 10_000;
    let client: number | undefined;
    while (client === undefined) {
      try {
        if (existsSync(path)) client = native.seqpacketConnect(path);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ECONNREFUSED') throw error;
      }
      if (client !== undefined) break;
      if (Date.now() > deadline) throw new Error('socket never listened');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    try {
      native.sendMessage(client, Buffer.from('hello'));
      const ready = await notify.waitFor((text) => text.startsWith('READY=1'));
      expect(ready.text).toBe('READY=1\nSTATUS=listener=3');
      const reply = await new Promise<Buffer>((resolve, reject) => {
        const poller = new native.Poller(client, (status) => {
          if (status < 0) return reject(new Error(`poll status ${status}`));
          const message = native.recvMessage(client, 65536, 0);
          if (message === null) return;
          poller.close();
          resolve(message.data);
        });
        poller.start(native.READABLE);
      });
      const report = JSON.parse(reply.toString());
      expect(report.received).toBe('hello');
      expect(report.fds).toEqual([{ fd: 3, name: 'sockpoold' }]);
      expect(report.listener).toEqual({ fd: 3, name: 'sockpoold' });
      expect(report.socketInfo).toMatchObject({ type: 5, listening: true, path });
      expect(report.envAfter).toEqual({ LISTEN_PID: null, LISTEN_FDS: null, LISTEN_FDNAMES: null });
      expect(await exited(child)).toBe(0);
    } finally {
      native.close(client);
    }
  });
});
