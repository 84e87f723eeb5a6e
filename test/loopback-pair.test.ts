// The warm TLS relay's loopback pair (native.loopbackPair: two TCP sockets over 127.0.0.1 connected to each other)
// against another local user, who can connect to any 127.0.0.1 port, the pair's short-lived listener included. The
// seam is loopbackPair's `strangers` (or its single attempt, loopbackPairListen then loopbackPairTry): these tests land
// connections of their own ("strangers") on the listener, as a user spraying 127.0.0.1 ports can, before ours.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { catchError, fdCount, receiveMessage, waitForEvents, warmUpChildProcesses } from './fixtures/native-helpers.js';
import { repoRoot } from './helpers/daemon.js';

const TCP_ESTABLISHED = 1;
const TCP_SYN_SENT = 2;
const TCP_CLOSE_WAIT = 8;

beforeAll(async () => {
  await warmUpChildProcesses();
});

/** Connections from this process to `port` (non-blocking: started, not waited for). Their fds are the caller's. */
function strangers(port: number, count: number): number[] {
  const fds: number[] = [];
  for (let i = 0; i < count; i++) {
    const fd = native.tcpSocket(4);
    fds.push(fd);
    native.connectStart(fd, '127.0.0.1', port, 4);
  }
  return fds;
}

/**
 * Whether `accepted` is the server end of a stranger's connection: one of `theirs`, all sent to `listenerPort`. A
 * connection is both its ends, not a port: the kernel picks a connect()'s port per destination, so a stranger sent to
 * the first attempt's listener may have the very port our client got for the second's; the pair is still ours.
 */
function isStrangers(accepted: number, theirs: number[], listenerPort: number): boolean {
  if (native.localAddress(accepted).port !== listenerPort) return false;
  const peer = native.peerAddress(accepted);
  return theirs.some((fd) => {
    const from = native.localAddress(fd);
    return from.port === peer.port && from.address === peer.address;
  });
}

/**
 * The pair's two ends are connected to each other, and to nothing else: each end's peer is the other end, and
 * bytes written on either arrive on the other.
 */
async function expectConnectedToEachOther([accepted, connecting]: [number, number]): Promise<void> {
  expect(native.peerAddress(accepted)).toEqual(native.localAddress(connecting));
  expect(native.peerAddress(connecting)).toEqual(native.localAddress(accepted));
  expect(native.sendMessage(accepted, Buffer.from('to the connecting end'))).toBe(21);
  expect((await receiveMessage(connecting, 64, 0)).data.toString()).toBe('to the connecting end');
  expect(native.sendMessage(connecting, Buffer.from('to the accepted end'))).toBe(19);
  expect((await receiveMessage(accepted, 64, 0)).data.toString()).toBe('to the accepted end');
}

describe('loopbackPair beside a local user spraying 127.0.0.1 ports', () => {
  it('makes two ends connected to each other, and leaves no fd behind', async () => {
    const before = fdCount();
    for (let i = 0; i < 20; i++) {
      const pair = native.loopbackPair();
      await expectConnectedToEachOther(pair);
      for (const fd of pair) native.close(fd);
    }
    expect(fdCount()).toBe(before);
  });

  it.each([1, 8, 9, 64])(
    'makes the pair with %i strangers landed on its listener before ours (the backlog is 8), never returning one',
    async (count) => {
      const before = fdCount();
      // On the first attempt's listener only (the seam leaves the second unfiltered, as where the kernel refuses the
      // filter, with the first's queue of 8): where they fill its queue, ours is made on the second.
      const theirs: number[] = [];
      let theirListener = 0;
      const pair = native.loopbackPair((port) => {
        if (theirs.length > 0) return;
        theirListener = port;
        theirs.push(...strangers(port, count));
      });
      await expectConnectedToEachOther(pair);
      expect(isStrangers(pair[0], theirs, theirListener)).toBe(false);
      for (const fd of [...pair, ...theirs]) native.close(fd);
      expect(fdCount()).toBe(before);
    },
  );

  it("drops strangers' SYNs on a filtered listener: theirs never connect, ours does", async () => {
    const before = fdCount();
    const [listener, client, filtered] = native.loopbackPairListen(true);
    // Root has CAP_NET_ADMIN, which every kernel accepts a socket filter from (some refuse one without it: the
    // test below covers what loopbackPair does then).
    if (process.getuid?.() === 0) expect(filtered).toBe(true);
    const theirs = strangers(native.localAddress(listener).port, 16);
    const pair = native.loopbackPairTry(listener, client) ?? native.loopbackPairAwait(listener, client, 1_000);
    await expectConnectedToEachOther(pair);
    for (const fd of theirs) {
      const state = native.probe(fd).tcpState;
      if (filtered) {
        // Their SYNs met the filter: no answer, so each still waits for one (SYN_SENT), unless its retransmit a
        // second later found the listener gone (refused). An accepted stranger would be ESTABLISHED, or reset when
        // the listener closed with it queued.
        expect(state).not.toBe(TCP_ESTABLISHED);
        if (state !== TCP_SYN_SENT) expect(native.socketError(fd)).toBe('ECONNREFUSED');
      } else {
        // Unfiltered (the kernel refused the filter): the strangers were let in and closed, never returned.
        expect(native.peerAddress(pair[0]).port).not.toBe(native.localAddress(fd).port);
      }
    }
    for (const fd of [...pair, ...theirs]) native.close(fd);
    expect(fdCount()).toBe(before);
  });

  it.each([false, true])(
    'never returns a stranger sending from our port on another 127/8 address (listener filtered: %s)',
    async (filter) => {
      const before = fdCount();
      const [listener, client, filtered] = native.loopbackPairListen(filter);
      // Unfiltered, our client is bound here (the filtered attempt binds it itself), so that its port is known before
      // our connect: the stranger is queued first, from 127.0.0.2 with our port (other addresses do not clash in bind).
      if (!filter) native.bindAddress(client, '127.0.0.1', 0);
      const stranger = native.tcpSocket(4);
      native.bindAddress(stranger, '127.0.0.2', native.localAddress(client).port);
      native.connectStart(stranger, '127.0.0.1', native.localAddress(listener).port, 4);
      // In the queue before ours (a softirq run late must not reorder them), where nothing drops its SYN.
      if (!filtered) await waitForEvents(listener, native.READABLE);
      const pair = native.loopbackPairTry(listener, client) ?? native.loopbackPairAwait(listener, client, 1_000);
      await expectConnectedToEachOther(pair);
      expect(native.peerAddress(pair[0]).address).toBe('127.0.0.1');
      const state = native.probe(stranger).tcpState;
      if (filtered) {
        // The filter compares the address too: its SYN went unanswered (or, retransmitted, met no listener).
        expect(state).not.toBe(TCP_ESTABLISHED);
        if (state !== TCP_SYN_SENT) expect(native.socketError(stranger)).toBe('ECONNREFUSED');
      } else {
        // Queued before ours, then taken out and closed by the accept that looks for ours: its peer closed it.
        expect(state).toBe(TCP_CLOSE_WAIT);
      }
      for (const fd of [...pair, stranger]) native.close(fd);
      expect(fdCount()).toBe(before);
    },
  );

  it('loopbackPairAwait takes both fds even when its waitMs is refused: closed and untracked, none closed twice', () => {
    const [listener, client] = native.loopbackPairListen(false);
    native.track(listener); // as loopbackPairTry leaves both when it returns null
    native.track(client);
    expect(catchError(() => native.loopbackPairAwait(listener, client, -1))).toMatchObject({
      code: 'ERR_OUT_OF_RANGE',
    });
    // Before the fix both were closed but left tracked: the thread's teardown would close the numbers again.
    expect(native.trackedFds()).not.toContain(listener);
    expect(native.trackedFds()).not.toContain(client);
    expect(catchError(() => native.close(listener))).toMatchObject({ code: 'EBADF' });
    expect(catchError(() => native.close(client))).toMatchObject({ code: 'EBADF' });
  });

  it('makes the pair beside 64 strangers in a process without CAP_NET_ADMIN (a kernel may refuse it the filter)', () => {
    // As root, a child without CAP_NET_ADMIN (setpriv); otherwise this process's user, who has none anyway.
    const nativeModule = join(repoRoot, 'dist', 'shared', 'native.js');
    const source = `import * as native from ${JSON.stringify(nativeModule)};
      const theirs = [];
      let theirListener = 0;
      const [accepted, connecting] = native.loopbackPair((port) => {
        if (theirs.length > 0) return;
        theirListener = port;
        while (theirs.length < 64) {
          const fd = native.tcpSocket(4);
          theirs.push(fd);
          native.connectStart(fd, '127.0.0.1', port, 4);
        }
      });
      const peer = native.peerAddress(accepted);
      const ours = peer.port === native.localAddress(connecting).port;
      // A stranger's connection: from its address and port to its listener (see isStrangers).
      const stranger = native.localAddress(accepted).port === theirListener && theirs.some((fd) => {
        const from = native.localAddress(fd);
        return from.port === peer.port && from.address === peer.address;
      });
      console.log(JSON.stringify({ ours, stranger }));`;
    const command = [
      ...(process.getuid?.() === 0 ? ['setpriv', '--inh-caps=-net_admin', '--bounding-set=-net_admin'] : []),
      process.execPath,
      '--input-type=module',
      '-e',
      source,
    ];
    const out = execFileSync(command[0]!, command.slice(1), { encoding: 'utf8' });
    expect(JSON.parse(out)).toEqual({ ours: true, stranger: false });
  });

  it("makes both attempts' pairs under the daemon's own bind restriction (Landlock: port 0 only)", () => {
    // The second attempt binds its client to 127.0.0.1:0 before connecting: port 0 is what sockpoold allows itself
    // (daemon/bind-restriction.ts). A child process, as the restriction is for good (dist/: npx tsc -p .).
    const nativeModule = join(repoRoot, 'dist', 'shared', 'native.js');
    const source = `import * as native from ${JSON.stringify(nativeModule)};
      const restriction = native.restrictTcpBind([0]);
      const made = [];
      for (const filtered of [false, true]) {
        const [listener, client] = native.loopbackPairListen(filtered);
        const [accepted, connecting] =
          native.loopbackPairTry(listener, client) ?? native.loopbackPairAwait(listener, client, 1_000);
        made.push(native.peerAddress(accepted).port === native.localAddress(connecting).port);
        native.close(accepted);
        native.close(connecting);
      }
      console.log(JSON.stringify({ applied: restriction.applied || restriction.abi < 4, made }));`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', source], { encoding: 'utf8' });
    // applied: in force, or a kernel without Landlock's network rules (nothing to prove there).
    expect(JSON.parse(out)).toEqual({ applied: true, made: [true, true] });
  });
});
