// A client that serves a FUSE mount (root here; `fusermount` or an unprivileged user namespace elsewhere) sends
// sockpoold an fd of a file on it. Whoever closes that fd waits for the mount's answer to FLUSH, uninterruptibly:
// no signal, not even SIGKILL, ends the wait (test/fixtures/fuse-flush-hang.py never answers). Before the fix the
// daemon's thread closed it and served nobody until the FUSE connection was aborted. Now the kernel refuses the fd
// at the sender (SO_PASSRIGHTS = 0 on the daemon's listener, Linux 6.16), and where fds are let in (an older
// kernel, `access.acceptClientFds`) a non-socket fd is closed in a thread of its own (native DeferredCloser).
import type { ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { spawnChild } from './helpers/children.js';
import { type DaemonProcess, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { honestHello, RawClient } from './helpers/raw-client.js';

const fixture = join(import.meta.dirname, 'fixtures', 'fuse-flush-hang.py');
const cleanups: Array<() => unknown> = [];

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

interface FuseClient {
  /** The next event the fixture prints (JSON lines). */
  next(): Promise<{ event: string; errno?: string; pid?: number }>;
  /** Answers every FLUSH it holds, unmounts, and exits. */
  finish(): Promise<void>;
}

/**
 * `settings`, the fixture's: `hold=SECONDS` (the file's every stat asks the mount, which answers another process's only
 * that much later), `uid=UID` (the mount is that user's, as fusermount makes it: every other user, the daemon's
 * included, is refused its files' attributes).
 */
function startFuseClient(socketPath: string, ...settings: string[]): FuseClient {
  const mountpoint = mkdtempSync(join(tmpdir(), 'sockpool-fuse-'));
  chmodSync(mountpoint, 0o755); // (a `uid` client opens the file as that user)
  const child: ChildProcess = spawnChild('python3', [fixture, socketPath, mountpoint, ...settings], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  let finished: Promise<void> | undefined;
  const finish = () => {
    finished ??= new Promise<void>((resolve) => {
      child.once('close', () => {
        rmSync(mountpoint, { recursive: true, force: true });
        resolve();
      });
      child.stdin!.end('finish\n');
    });
    return finished;
  };
  // Whatever the test's outcome, the held FLUSH is answered before the daemon is stopped (a process with a thread
  // stuck in close() cannot finish exiting).
  cleanups.push(finish);
  return {
    async next() {
      const line = await lines.next();
      if (line.done) throw new Error('the FUSE client exited early');
      return JSON.parse(line.value);
    },
    finish,
  };
}

function clientFdsState(sockpoold: DaemonProcess): string {
  const ready = sockpoold
    .output()
    .split('\n')
    .find((line) => line.includes('sockpoold ready'));
  return JSON.parse(ready!).clientFds;
}

describe('an fd of a file on a FUSE mount the client serves', () => {
  it('is refused by the kernel at the client: the daemon never holds it, and serves others', async () => {
    const sockpoold = await startDaemon();
    cleanups.push(() => sockpoold.stop());
    const fdsBefore = sockpoold.fdCount();
    const fuse = startFuseClient(sockpoold.socketPath);
    // This host's kernel has SO_PASSRIGHTS (Linux 6.16); an older one says 'unsupported' and lets the fd in, which
    // the next test's path then covers.
    expect(clientFdsState(sockpoold)).toBe('refused');
    expect(await fuse.next()).toEqual({ event: 'send-refused', errno: 'EPERM' });
    await honestHello(sockpoold.socketPath);
    await fuse.finish();
    expect(sockpoold.fdCount()).toBe(fdsBefore);
  }, 30_000);

  it('let in (access.acceptClientFds), is closed off the daemon thread: its close hangs, the daemon serves on', async () => {
    const config = writeConfigFile({ access: { acceptClientFds: true } }, cleanups);
    const sockpoold = await startDaemon({ args: ['--config', config] });
    cleanups.push(() => sockpoold.stop());
    expect(clientFdsState(sockpoold)).toBe('accepted');
    const fuse = startFuseClient(sockpoold.socketPath);
    expect(await fuse.next()).toEqual({ event: 'sent' });
    // The daemon discards the fd (a hello takes none), and its close is held by the mount: before the fix the
    // daemon's own thread was the one waiting, and the hello below was never answered.
    expect(await fuse.next()).toMatchObject({ event: 'flush' });
    await honestHello(sockpoold.socketPath);
    const again = new RawClient(sockpoold.socketPath);
    cleanups.push(() => again.close());
    expect((await again.request({ type: 'hello', id: 8, version: 1 })).message).toMatchObject({ id: 8 });
    await fuse.finish();
    // Once answered, the close returns and the daemon stops cleanly.
    expect(await sockpoold.stop()).toBe(0);
  }, 30_000);

  it('let in, a file whose every stat waits for the mount: the daemon discards it without a stat, and serves on', async () => {
    // Before the fix the discard began with an fstat, a GETATTR the mount held (here for 600 s, until the test's end):
    // the hello below was never answered.
    await discardsAndServesOn('hold=600');
  }, 30_000);

  it("let in, a file on a mount of another user's (fusermount's, no allow_other): closed off the daemon thread too", async () => {
    // The kernel refuses the daemon the file's attributes (EACCES) but not its FLUSH. Before the fix the discard's
    // fstat failed, the fd was taken for a socket, and the daemon's own thread closed it: the hello below waited for
    // the mount's answer to that FLUSH.
    await discardsAndServesOn('uid=65534');
  }, 30_000);
});

/**
 * A daemon letting client fds in is sent a file on the fixture's mount (started with `mountOption`): it discards it,
 * the mount sees the FLUSH, an honest client's hello is answered meanwhile, and the daemon stops cleanly.
 */
async function discardsAndServesOn(mountOption: string): Promise<void> {
  const config = writeConfigFile({ access: { acceptClientFds: true } }, cleanups);
  const sockpoold = await startDaemon({ args: ['--config', config] });
  cleanups.push(() => sockpoold.stop());
  const fuse = startFuseClient(sockpoold.socketPath, mountOption);
  expect(await fuse.next()).toEqual({ event: 'sent' });
  expect(await fuse.next()).toMatchObject({ event: 'flush' });
  await honestHello(sockpoold.socketPath);
  await fuse.finish();
  expect(await sockpoold.stop()).toBe(0);
}
