// One epoll set per thread with a watch per fd (shared/poll-set.ts over the native PollSet), against real sockets:
// what each event means, level triggering, wakeups with more ready fds than one read takes, watches closed in the
// middle of a wakeup, the fd rules shared with Pollers, and threads that end with watches open.
import { spawnSync } from 'node:child_process';
import net from 'node:net';
import { join } from 'node:path';
import { setImmediate as nextTurn } from 'node:timers/promises';
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Worker } from 'node:worker_threads';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { type FdWatch, watchFd } from '../shared/poll-set.js';
import { catchError, fdCount, warmUpChildProcesses } from './fixtures/native-helpers.js';
import { eventually } from './helpers/daemon.js';

v8.setFlagsFromString('--expose-gc');
const collectGarbage = runInNewContext('gc') as () => void;

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

beforeAll(async () => {
  await warmUpChildProcesses();
});

/** A SEQPACKET pair whose fds the test closes at cleanup (after their watches). */
function pair(): [number, number] {
  const fds = native.seqpacketPair();
  cleanups.push(() => {
    for (const fd of fds) native.close(fd);
  });
  return fds;
}

/** `count` turns of the event loop, `before` each. */
async function turns(count: number, before?: () => void): Promise<void> {
  for (let i = 0; i < count; i++) {
    before?.();
    await nextTurn();
  }
}

function watched(fd: number, handler: (events: number) => void): FdWatch {
  const watch = watchFd(fd, handler);
  cleanups.push(() => watch.close());
  return watch;
}

describe('watchFd', () => {
  it('reports WRITABLE when a connect ends, READABLE when bytes arrive, DISCONNECT when the peer hangs up', async () => {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => new Promise((resolve) => server.close(resolve)));
    const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
    const fd = native.tcpSocket(4);
    cleanups.push(() => native.close(fd));
    const seen: number[] = [];
    const watch = watched(fd, (events) => seen.push(events));
    native.connectStart(fd, '127.0.0.1', (server.address() as net.AddressInfo).port);
    watch.start(native.WRITABLE);
    await eventually(() => seen.length > 0, 'the connect to end');
    expect(seen[0]! & native.WRITABLE).toBe(native.WRITABLE);
    expect(native.socketError(fd)).toBeNull();

    seen.length = 0;
    watch.start(native.READABLE | native.DISCONNECT);
    const peer = await accepted;
    peer.write('x');
    await eventually(() => seen.length > 0, 'the byte');
    expect(seen[0]).toBe(native.READABLE);
    watch.stop();
    native.recvMessage(fd, 16, 0); // the byte (a stream socket reads as one message)
    seen.length = 0;
    watch.start(native.READABLE | native.DISCONNECT);
    peer.end();
    await eventually(() => seen.some((events) => (events & native.DISCONNECT) !== 0), 'the hang-up');
  });

  it('reports the events asked for when a connect is refused (an error event), and SO_ERROR says why', async () => {
    const server = net.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address() as net.AddressInfo;
    await new Promise((resolve) => server.close(resolve)); // nothing listens there now
    const fd = native.tcpSocket(4);
    cleanups.push(() => native.close(fd));
    const seen: number[] = [];
    const watch = watched(fd, (events) => seen.push(events));
    native.connectStart(fd, '127.0.0.1', port);
    watch.start(native.WRITABLE);
    await eventually(() => seen.length > 0, 'the refusal');
    expect(seen[0]! & native.WRITABLE).toBe(native.WRITABLE);
    expect(native.socketError(fd)).toBe('ECONNREFUSED');
  });

  it('is level-triggered: a message left unread is reported again at the next turn, until it is read', async () => {
    const [a, b] = pair();
    let calls = 0;
    watched(a, () => calls++).start(native.READABLE);
    native.sendMessage(b, new Uint8Array([1]));
    await eventually(() => calls >= 3, 'three reports of the same message');
    native.recvMessage(a, 16, 0);
    const after = calls;
    await turns(5);
    expect(calls - after).toBeLessThanOrEqual(1); // (one report may already have been read before the message was)
  });

  it('serves 600 ready fds (more than one read of 256 takes), each handler once per turn while it stays ready', async () => {
    const called = new Map<number, number>();
    const pairs = Array.from({ length: 600 }, () => pair());
    pairs.forEach(([a], i) => {
      watched(a, () => {
        called.set(i, (called.get(i) ?? 0) + 1);
        native.recvMessage(a, 16, 0);
      }).start(native.READABLE);
    });
    for (const [, b] of pairs) native.sendMessage(b, new Uint8Array([7]));
    await eventually(
      () => called.size === 600,
      () => `${called.size} of 600 handlers called`,
    );
    expect([...called.values()].every((count) => count === 1)).toBe(true);
  });

  /**
   * Two watches whose fds are ready in the same wakeup; the one called first silences the other (`silence`: close or
   * stop it) before the other's event, already read, is delivered. Resolves once the wakeup and a few more turns
   * are over, with the handlers called in order and the two watches in that order.
   */
  async function oneSilencesTheOther(silence: (other: FdWatch) => void) {
    const calls: FdWatch[] = [];
    const watches: FdWatch[] = [];
    for (const [index, [fd, peer]] of [pair(), pair()].entries()) {
      const watch = watched(fd, () => {
        calls.push(watch);
        native.recvMessage(fd, 16, 0);
        silence(watches[1 - index]!);
      });
      watches.push(watch);
      watch.start(native.READABLE);
      native.sendMessage(peer, new Uint8Array([index]));
    }
    await eventually(() => calls.length > 0, 'a handler');
    await turns(3);
    const [called] = calls;
    return { calls, called: called!, silenced: watches.find((watch) => watch !== called)! };
  }

  it('a watch closed earlier in the same wakeup gets none of its events, even when a new watch took its slot', async () => {
    let replacement: { fd: number; watch: FdWatch; calls: number } | undefined;
    const { calls } = await oneSilencesTheOther((other) => {
      other.close();
      // The closed watch's slot is reused at once, for a watch of a fd that is ready too: the event already read
      // for the old watch must not reach the new handler.
      const [fd, peer] = pair();
      native.sendMessage(peer, new Uint8Array([9]));
      replacement = { fd, watch: watched(fd, () => replacement!.calls++), calls: 0 };
    });
    expect(calls).toHaveLength(1);
    // The new watch has not started: nothing may reach it; once started, its own event does.
    expect(replacement!.calls).toBe(0);
    replacement!.watch.start(native.READABLE);
    await eventually(() => replacement!.calls > 0, 'the replacement once started');
    native.recvMessage(replacement!.fd, 16, 0);
  });

  it('a watch stopped earlier in the same wakeup gets none of its events (and gets them again once restarted)', async () => {
    const { calls, silenced } = await oneSilencesTheOther((other) => other.stop());
    expect(calls).toHaveLength(1);
    silenced.start(native.READABLE);
    await eventually(() => calls.length === 2, 'the stopped watch, restarted');
  });

  it('a native PollSet nobody references stays alive while it has members (as a started Poller), then may go', async () => {
    const [a, b] = pair();
    let seen = 0;
    let set: native.PollSet | undefined = new native.PollSet(new Int32Array(8), () => {
      seen++;
      native.recvMessage(a, 16, 0);
    });
    set.add(a, native.READABLE, 1);
    const held = new WeakRef(set);
    set = undefined;
    await turns(3, collectGarbage);
    expect(held.deref()).toBeDefined();
    native.sendMessage(b, new Uint8Array([1]));
    await eventually(() => seen === 1, 'the set reports after a collection');
    // Without members nothing pins it.
    held.deref()!.remove(a);
    await turns(3, collectGarbage);
    expect(held.deref()).toBeUndefined();
  });

  it('shares the fd rules of Pollers: close() refuses a watched fd, one watcher per fd, and both free after close', () => {
    const [a] = pair();
    const watch = watched(a, () => {});
    watch.start(native.READABLE);
    expect(catchError(() => native.close(a)).code).toBe('SOCKPOOL_ERR_FD_POLLED');
    const twice = watchFd(a, () => {});
    expect(catchError(() => twice.start(native.READABLE)).code).toBe('EEXIST');
    twice.close();
    expect(() => new native.Poller(a, () => {})).toThrow(/EEXIST/);
    watch.close();
    const poller = new native.Poller(a, () => {});
    poller.start(native.READABLE);
    expect(catchError(() => watchFd(a, () => {}).start(native.READABLE)).code).toBe('EEXIST');
    poller.close();
  });

  it('opens no fd per watch: 1,000 watches started and closed leave the fd count as it was', () => {
    const [a] = pair();
    const before = fdCount();
    for (let i = 0; i < 1_000; i++) {
      const watch = watchFd(a, () => {});
      watch.start(native.READABLE | native.DISCONNECT);
      watch.close();
    }
    expect(fdCount()).toBe(before);
  });

  it("a thread that ends with watches open leaves no fd behind (its set's epoll fd) and the process runs on", async () => {
    const [a, b] = pair();
    const before = fdCount();
    const worker = new Worker(
      `
      const { workerData, parentPort } = require('node:worker_threads');
      import(workerData.pollSet).then(({ watchFd }) => {
        watchFd(workerData.fd, () => {}).start(1);
        parentPort.postMessage('watching');
      });
      `,
      { eval: true, workerData: { pollSet: join(import.meta.dirname, '..', 'dist', 'shared', 'poll-set.js'), fd: a } },
    );
    await new Promise((resolve) => worker.once('message', resolve));
    expect(fdCount()).toBeGreaterThan(before); // the thread's loop, and its set's epoll fd
    await worker.terminate();
    expect(fdCount()).toBe(before);
    // The fd itself was the test's, and is free to watch here again.
    const watch = watched(a, () => {});
    watch.start(native.READABLE);
    native.sendMessage(b, new Uint8Array([1]));
    native.recvMessage(a, 16, 0);
  });

  it('a native PollSet whose buffer was transferred away never writes into that memory: it closes and throws', () => {
    // A child process: the set's complaint is that thread's uncaught exception. transfer() to the same length hands
    // the very memory to the new ArrayBuffer (`moved`): before the fix the set went on writing its pairs there (or,
    // to another length, into freed memory).
    const script = `
      const native = require(${JSON.stringify(native.nativeAddonPath)});
      const [a, b] = native.seqpacketPair();
      const buffer = new Int32Array(8);
      const set = new native.PollSet(buffer, (count) => process.stdout.write('callback ' + count + '\\n'));
      const moved = new Int32Array(buffer.buffer.transfer());
      process.on('uncaughtException', (error) => process.stdout.write(error.code + ': ' + error.message + '\\n'));
      native.sendMessage(b, Buffer.from('x'));
      set.add(a, native.READABLE, 7);
      setTimeout(() => {
        process.stdout.write('moved ' + Array.from(moved).join(',') + '\\n');
        set.close();
        native.close(a);
        native.close(b);
      }, 200);
    `;
    const run = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 20_000 });
    expect(run.status).toBe(0);
    expect(run.stdout.split('\n')).toEqual([
      'ERR_INVALID_STATE: PollSet: its buffer was detached (transferred) or shrunk; the set is closed and watches nothing',
      'moved 0,0,0,0,0,0,0,0',
      '',
    ]);
  });

  it('keeps no event loop alive without members: a process that only loads it exits', () => {
    const module = join(import.meta.dirname, '..', 'dist', 'shared', 'poll-set.js');
    const run = spawnSync(process.execPath, ['--input-type=module', '-e', `import ${JSON.stringify(module)};`], {
      timeout: 20_000,
    });
    expect(run.error).toBeUndefined();
    expect(run.status).toBe(0);
  });
});
