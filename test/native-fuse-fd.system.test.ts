// The addon never asks a client's filesystem about an fd the client sent before it knows the fd is a socket. A client
// that serves a FUSE mount (root here; `fusermount` or an unprivileged user namespace elsewhere) can let nobody cache
// a file's attributes: every fstat of it is then a GETATTR the mount answers when it likes, and the caller waits as
// uninterruptibly as a close waits for FLUSH (test/daemon-fuse-fd). test/fixtures/fuse-flush-hang.py, given a hold,
// answers another process's GETATTR only that many seconds later. Before the fix socketInode (the daemon's check of a
// released fd), sameSocket and discard (every fd a message should not have carried) each began with an fstat, and
// the daemon's thread waited in it.
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { receiveMessage, waitForEvents } from './fixtures/native-helpers.js';
import { spawnChild } from './helpers/children.js';

const fixture = join(import.meta.dirname, 'fixtures', 'fuse-flush-hang.py');
const HOLD_SECONDS = 5;
const cleanups: Array<() => unknown> = [];

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

describe('an fd of a file on a FUSE mount the client serves, whose every stat waits for the mount', () => {
  it('socketInode, sameSocket and discard never stat it: none waits for the mount', async () => {
    const directory = mkdtempSync(join(tmpdir(), 'sockpool-fuse-native-'));
    const mountpoint = join(directory, 'mount');
    const path = join(directory, 'link.sock');
    cleanups.push(() => rmSync(directory, { recursive: true, force: true }));
    const listener = native.seqpacketListen(path, 4);
    cleanups.push(() => native.close(listener));
    mkdirSync(mountpoint);
    const child = spawnChild('python3', [fixture, path, mountpoint, `hold=${HOLD_SECONDS}`], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    // Whatever the outcome, the held FLUSH is answered before this process ends (a thread stuck in close() would keep
    // it from exiting).
    cleanups.push(
      () =>
        new Promise<void>((resolve) => {
          child.once('close', () => resolve());
          child.stdin!.end('finish\n');
        }),
    );
    const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
    const next = async () => JSON.parse((await lines.next()).value as string) as { event: string };
    expect(await next()).toEqual({ event: 'sent' });
    await waitForEvents(listener, native.READABLE);
    const link = native.accept(listener)!;
    cleanups.push(() => native.close(link));
    const { fds } = await receiveMessage(link, 1024, 1);
    expect(fds).toHaveLength(1);
    const fd = fds[0]!;

    const timed = (what: string, call: () => unknown) => {
      const started = performance.now();
      const result = call();
      expect(performance.now() - started, what).toBeLessThan((HOLD_SECONDS * 1000) / 2);
      return result;
    };
    expect(timed('socketInode', () => native.socketInode(fd))).toBe(-1);
    expect(timed('sameSocket', () => native.sameSocket(link, fd))).toBe(false);
    expect(timed('sameSocket', () => native.sameSocket(fd, fd))).toBe(false);
    timed('discard', () => native.discard(fd));
    // Its close went to the addon's closing thread (DeferredCloser), where the mount holds its FLUSH.
    expect(await next()).toMatchObject({ event: 'flush' });
  }, 60_000);
});
