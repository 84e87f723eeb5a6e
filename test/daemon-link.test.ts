// The worker's link to sockpoold when the daemon goes away at the worst moment: it answers hello and hangs up
// before the requests queued behind that hello are sent (a daemon killed right after accepting a worker). Every
// queued request must fail at once with SOCKPOOL_ERR_DAEMON_UNAVAILABLE, not wait for its own deadline, and the
// link must reconnect afterwards. The "daemon" here is a real SOCK_SEQPACKET listener in this process that speaks
// the real protocol (hello) and then closes; the link and its channel are the production code.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCodes } from '../shared/errors.js';
import * as native from '../shared/native.js';
import {
  type ClientMessage,
  decodeClientBundle,
  decodeClientMessage,
  encodeMessage,
  FrameType,
  MAX_FDS_PER_MESSAGE,
  MAX_MESSAGE_BYTES,
  PROTOCOL_VERSION,
} from '../shared/protocol.js';
import { SeqpacketChannel } from '../shared/seqpacket-channel.js';
import { DaemonLink } from '../worker/daemon-link.js';
import { startTestDaemon } from './fixtures/client-helpers.js';
import { fdCount, startServer } from './fixtures/native-helpers.js';
import { startDaemon } from './helpers/daemon.js';

type Behaviour =
  | 'hangup-after-hello'
  | 'serve'
  | 'silent'
  | 'framing-1'
  | 'framing-3'
  | 'lease-fds-lost'
  | 'late-lease'
  | 'error-fd'
  | 'stalled';

interface FakeDaemon {
  path: string;
  /** Connections accepted so far. */
  accepted(): number;
  /** 'framing-1': each release received, with how many fds it carried. */
  releases: Array<{ leaseId: number; fds: number }>;
  /** Leases the link said were `closed`. */
  closed: number[];
  /** 'framing-3': the types of the requests in each packet, in order (a bundle holds several). */
  packets: string[][];
  /** Acquires received so far. */
  acquires(): number;
  /** 'stalled': the ids of the acquires read since resume(), in the order read. */
  acquireIds: number[];
  /** 'stalled': starts reading its connections, answering each acquire as 'serve' does. */
  resume(): void;
  close(): void;
}

/**
 * Listens on a fresh path; each connection is a SeqpacketChannel (which owns and closes its fd). `behaviour`
 * 'hangup-after-hello': answers hello, then closes the connection at once. 'serve': answers hello, and every
 * acquire with an error reply (enough to show the link is back). 'silent': answers hello, then nothing.
 * 'framing-1': a daemon of binary framing 1 (before the release without an fd): agrees to framing 1, leases one
 * end of a socketpair per acquire and records each release. 'lease-fds-lost': leases with two fds, more than a
 * message may carry: the link's addon drops them (as when its fd table is full) and the lease arrives without its
 * socket. 'late-lease': as 'framing-1', but each lease is sent LATE_LEASE_MS after its acquire (the link does not
 * know `cancel`: a lease comes for an acquire given up). 'error-fd': answers each acquire with an error that
 * carries an fd (one end of a socketpair). 'framing-3': as 'framing-1', agreeing to framing 3 (bundles), and
 * recording the requests of each packet (`packets`). 'stalled': answers hello, then reads nothing more until resume()
 * (what the link sends piles up in the socket's buffer), and then answers as 'serve' does.
 */
function fakeDaemon(behaviour: () => Behaviour): FakeDaemon {
  const path = join(mkdtempSync(join(tmpdir(), 'sockpool-link-')), 'fake.sock');
  const listenFd = native.seqpacketListen(path, 16);
  const channels: SeqpacketChannel[] = [];
  const releases: FakeDaemon['releases'] = [];
  const closed: number[] = [];
  const packets: string[][] = [];
  /** 'stalled': the connections' fds, while nobody reads them (their channels closed, keeping the socket). */
  const stalled: number[] = [];
  const acquireIds: number[] = [];
  /** 'stalled': the channels resume() made on those fds. */
  const readers: SeqpacketChannel[] = [];
  let acquires = 0;
  let nextLease = 1;
  const limits = { maxMessageBytes: MAX_MESSAGE_BYTES, maxFdsPerMessage: MAX_FDS_PER_MESSAGE };
  const listener = new native.Poller(listenFd, () => {
    for (let fd = native.accept(listenFd); fd !== null; fd = native.accept(listenFd)) {
      const mode = behaviour();
      const channel: SeqpacketChannel = new SeqpacketChannel(
        fd,
        {
          onMessage: (data, fds) => {
            if (mode === 'framing-3' && data[0] !== '{'.charCodeAt(0)) {
              const messages =
                data[0] === FrameType.bundle ? decodeClientBundle(data) : [decodeClientMessage(data, true)];
              packets.push(messages.map((message) => message.type));
              for (const message of messages) handle(message, fds);
              return;
            }
            handle(decodeClientMessage(data, mode === 'framing-1'), fds);
          },
          onClose: () => {},
        },
        limits,
      );
      const handle = (message: ClientMessage, fds: number[]) => {
        if (message.type === 'acquire') acquires++;
        if (message.type === 'hello') {
          channel.send(
            encodeMessage({
              type: 'hello',
              id: message.id,
              version: PROTOCOL_VERSION,
              server: 'sockpoold',
              serverVersion: 'test',
              maxMessageBytes: MAX_MESSAGE_BYTES,
              ...(mode === 'framing-1' && message.binary !== undefined ? { binary: 1 } : {}),
              ...(mode === 'framing-3' && message.binary !== undefined ? { binary: 3 } : {}),
            }),
          );
          if (mode === 'hangup-after-hello') channel.close();
          if (mode === 'stalled') {
            channel.closeKeepingSocket();
            stalled.push(channel.fd);
          }
        } else if (
          message.type === 'acquire' &&
          (mode === 'framing-1' || mode === 'framing-3' || mode === 'lease-fds-lost' || mode === 'late-lease')
        ) {
          const [ours, theirs] = native.seqpacketPair();
          native.close(ours);
          const lease = { type: 'lease' as const, id: message.id, leaseId: nextLease++, host: message.host };
          const reply = { ...lease, port: message.port, address: '127.0.0.1', family: 4 as const, warm: true };
          const fds = mode === 'lease-fds-lost' ? [theirs, native.dup(theirs)] : [theirs];
          const send = () => {
            if (channel.closed) for (const fd of fds) native.close(fd);
            else channel.send(encodeMessage({ ...reply, connectMs: 0 }), fds);
          };
          if (mode === 'late-lease') setTimeout(send, LATE_LEASE_MS);
          else send();
        } else if (message.type === 'acquire' && mode === 'error-fd') {
          const [ours, theirs] = native.seqpacketPair();
          native.close(ours);
          const error = { type: 'error' as const, id: message.id, code: ErrorCodes.POLICY, message: 'test' };
          channel.send(encodeMessage(error), [theirs]);
        } else if (message.type === 'closed') {
          closed.push(message.leaseId);
        } else if (message.type === 'release') {
          releases.push({ leaseId: message.leaseId, fds: fds.length });
          for (const fd of fds) native.close(fd);
        } else if (message.type === 'acquire' && mode === 'serve') {
          channel.send(encodeMessage({ type: 'error', id: message.id, code: ErrorCodes.POLICY, message: 'test' }));
        }
      };
      channels.push(channel);
    }
  });
  listener.start(native.READABLE);
  return {
    path,
    accepted: () => channels.length,
    releases,
    closed,
    packets,
    acquires: () => acquires,
    acquireIds,
    resume: () => {
      for (const fd of stalled.splice(0)) {
        const reader: SeqpacketChannel = new SeqpacketChannel(
          fd,
          {
            onMessage: (data) => {
              const message = decodeClientMessage(data, false);
              if (message.type !== 'acquire') return;
              acquireIds.push(message.id);
              reader.send(encodeMessage({ type: 'error', id: message.id, code: ErrorCodes.POLICY, message: 'test' }));
            },
            onClose: () => {},
          },
          limits,
        );
        readers.push(reader);
      }
    },
    close: () => {
      listener.close();
      for (const channel of [...channels, ...readers]) channel.close();
      for (const fd of stalled.splice(0)) native.close(fd);
      native.close(listenFd);
    },
  };
}

/** How long after its acquire a 'late-lease' daemon sends the lease. */
const LATE_LEASE_MS = 200;

/** How an acquire of example.test:80 on the link ended: 'lease', or its error's code. */
const acquireOutcome = (timeoutMs: number): Promise<string> =>
  link!.acquire('example.test', 80, timeoutMs).then(
    () => 'lease',
    (error: { code?: string }) => error.code ?? 'untyped',
  );

let daemon: FakeDaemon | undefined;
let link: DaemonLink | undefined;

afterEach(() => {
  link?.close();
  daemon?.close();
});

describe('DaemonLink when the daemon hangs up right after hello', () => {
  it('fails every request queued behind the hello at once, then reconnects', async () => {
    let mode: Behaviour = 'hangup-after-hello';
    daemon = fakeDaemon(() => mode);
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 5_000 });
    // Five acquires issued before the link exists: they all wait for the same connect + hello. A request left
    // behind would end with the link's own deadline instead (SOCKPOOL_ERR_DAEMON_TIMEOUT, after 2 + 1 s).
    const outcomes = await Promise.all(Array.from({ length: 5 }, () => acquireOutcome(2_000)));
    expect(outcomes).toEqual(Array(5).fill('SOCKPOOL_ERR_DAEMON_UNAVAILABLE'));

    // The daemon behaves again: after the backoff, the link connects anew and requests get answers.
    mode = 'serve';
    const answered = () => acquireOutcome(1_000);
    let outcome = await answered();
    for (let i = 0; i < 50 && outcome === 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE'; i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      outcome = await answered();
    }
    expect(outcome).toBe('SOCKPOOL_ERR_POLICY');
    expect(daemon.accepted()).toBeGreaterThanOrEqual(2);
  });
});

describe('DaemonLink when the daemon accepts requests and never answers them', () => {
  it('fails them with SOCKPOOL_ERR_DAEMON_TIMEOUT, not the caller-side SOCKPOOL_ERR_TIMEOUT', async () => {
    daemon = fakeDaemon(() => 'silent');
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 200 });
    await expect(link.stats()).rejects.toMatchObject({
      code: ErrorCodes.DAEMON_TIMEOUT,
      message: 'sockpoold did not answer stats in 200 ms',
    });
    // An acquire waits for its own timeout plus a margin for the daemon's answer, then fails the same way.
    await expect(link.acquire('example.test', 80, 10)).rejects.toMatchObject({ code: ErrorCodes.DAEMON_TIMEOUT });
    expect(daemon.accepted()).toBe(1);
  });
});

describe('DaemonLink when the daemon reads slower than requests are made', () => {
  it('holds requests back while its queue is full instead of failing the link: aborted ones never go out, the others go in order once the daemon reads', async () => {
    daemon = fakeDaemon(() => 'stalled');
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 5_000 });
    // A caller that starts a request and aborts it once it went out, and never waits for the daemon: 5,000 of them
    // (an acquire and a cancel each), more than the socket's buffer and the channel's queue hold together.
    const outcomes: Array<Promise<string>> = [];
    for (let i = 0; i < 5_000; i++) {
      const controller = new AbortController();
      const pending = link.acquire('example.test', 80, 5_000, controller.signal).then(
        () => 'lease',
        (error: { code?: string }) => (error === controller.signal.reason ? 'aborted' : (error.code ?? 'untyped')),
      );
      await new Promise(setImmediate);
      controller.abort();
      outcomes.push(pending);
    }
    expect(new Set(await Promise.all(outcomes))).toEqual(new Set(['aborted']));
    // Those aborted while they waited left the line (a caller aborting every request would fill it otherwise).
    expect(link.waitingForRoom).toBe(0);
    // Requests made while the daemon still reads nothing wait too; once it reads, they go out, each answered.
    const waiting = Array.from({ length: 100 }, () => acquireOutcome(5_000));
    await new Promise(setImmediate);
    expect(link.waitingForRoom).toBe(100);
    daemon.resume();
    expect(await Promise.all(waiting)).toEqual(Array(100).fill(ErrorCodes.POLICY));
    // All on the one connection (a link whose queue overflowed fails and connects anew), in the order made; of the
    // aborted ones, only those sent before the queue filled.
    expect(daemon.accepted()).toBe(1);
    expect(link.connected).toBe(true);
    const ids = daemon.acquireIds;
    expect(ids).toEqual([...ids].sort((a, b) => a - b));
    expect(ids.length).toBeGreaterThan(100);
    expect(ids.length).toBeLessThan(1_000);
  });
});

describe('DaemonLink when a caller makes more requests in one turn than its loop reads answers in one', () => {
  it('sends them over the turns that follow: each is answered, on the one connection', async () => {
    daemon = fakeDaemon(() => 'serve');
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 5_000 });
    // Sent in one turn, these would have the daemon queue more answers than a client that reads only when its loop
    // turns is allowed to leave unread (the fake daemon's channel has the daemon's bound on messages): it would hang up.
    const outcomes = await Promise.all(Array.from({ length: 6_000 }, () => acquireOutcome(5_000)));
    expect(new Set(outcomes)).toEqual(new Set([ErrorCodes.POLICY]));
    expect(daemon.accepted()).toBe(1);
    expect(daemon.acquires()).toBe(6_000);
  });
});

describe('DaemonLink releases', () => {
  it('leave their fd out with a daemon of framing 2 (the socket comes back warm), and carry it to one of framing 1', async () => {
    const before = fdCount();
    const echo = await startServer('127.0.0.1');
    const sockpoold = await startDaemon({ args: ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)] });
    try {
      link = new DaemonLink({ socketPath: sockpoold.socketPath, requestTimeoutMs: 5_000 });
      const first = await link.acquire('127.0.0.1', echo.port, 5_000);
      const inode = native.socketInode(first.fd);
      link.release(first); // takes the fd: closed here, the daemon checks its own copy
      const again = await link.acquire('127.0.0.1', echo.port, 5_000);
      expect(again.warm).toBe(true);
      expect(native.socketInode(again.fd)).toBe(inode);
      link.release(again);
      link.close();
      link = undefined;

      // A daemon of framing 1 gets the fd back with the release.
      daemon = fakeDaemon(() => 'framing-1');
      link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 5_000 });
      const old = await link.acquire('example.test', 80, 2_000);
      link.release(old);
      await waitFor(() => daemon!.releases.length === 1);
      expect(daemon.releases).toEqual([{ leaseId: old.leaseId, fds: 1 }]);
    } finally {
      link?.close();
      link = undefined;
      daemon?.close();
      daemon = undefined;
      await sockpoold.stop();
      await echo.close();
    }
    expect(fdCount()).toBe(before);
  });
});

describe('DaemonLink with a daemon of framing 3', () => {
  it('sends releases and closed at the end of the turn, in one packet with an acquire sent in that turn', async () => {
    const before = fdCount();
    daemon = fakeDaemon(() => 'framing-3');
    // (This daemon answers no stats: the request below ends at its deadline.)
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 300 });
    const first = await link.acquire('example.test', 80, 2_000);
    const second = await link.acquire('example.test', 80, 2_000);
    const third = await link.acquire('example.test', 80, 2_000);
    expect(daemon.packets).toEqual([['acquire'], ['acquire'], ['acquire']]);

    // A transfer's end and the next one's start in one turn: one packet, in the order they were sent.
    link.closed(first);
    link.release(second); // fd-less (framing 2 and up): closed here
    const next = link.acquire('example.test', 80, 2_000);
    const fourth = await next;
    expect(daemon.packets.slice(3)).toEqual([['closed', 'release', 'acquire']]);
    expect(daemon.closed).toEqual([first.leaseId]);
    expect(daemon.releases).toEqual([{ leaseId: second.leaseId, fds: 0 }]);

    // Alone in its turn: sent at the turn's end, by itself.
    link.closed(third);
    expect(daemon.packets).toHaveLength(4);
    await waitFor(() => daemon!.closed.length === 2);
    expect(daemon.packets.slice(4)).toEqual([['closed']]);

    // A request that cannot be bundled goes after what is held, in order.
    link.closed(fourth);
    await link.stats().catch(() => undefined);
    expect(daemon.packets.slice(5, 6)).toEqual([['closed']]);
    for (const lease of [first, third, fourth]) native.close(lease.fd);
    link.close();
    link = undefined;
    daemon.close();
    daemon = undefined;
    expect(fdCount()).toBe(before);
  });
});

describe('DaemonLink bundling an acquire the daemon refuses', () => {
  it('sends it alone: only it fails, the release held with it takes effect, and the requests pending on the link wait on', async () => {
    // A port-0 URL passes the client's checks, and the daemon refuses the acquire frame: alone, that request fails
    // with its own id. Bundled with a held release, the whole bundle was one bad message with no id: the release was
    // never applied (the lease held at the daemon till the link closed) and every request pending on the link failed.
    const before = fdCount();
    const echo = await startServer('127.0.0.1');
    const narrow = await startServer('127.0.0.1');
    const sockpoold = await startTestDaemon([echo.port, narrow.port], {
      config: { pool: { origins: [{ match: `127.0.0.1:${narrow.port}`, maxPerOrigin: 1 }] } },
    });
    try {
      link = new DaemonLink({ socketPath: sockpoold.socketPath, requestTimeoutMs: 5_000 });
      const holder = await link.acquire('127.0.0.1', narrow.port, 5_000);
      // Waits at the origin's cap (maxPerOrigin 1) until `holder` ends.
      const waiting = link.acquire('127.0.0.1', narrow.port, 20_000);
      const first = await link.acquire('127.0.0.1', echo.port, 5_000);
      const inode = native.socketInode(first.fd);

      link.release(first); // held for the turn (framing 3)
      const refused = await link.acquire('127.0.0.1', 0, 5_000).then(
        () => 'leased',
        (error: { code?: string; message?: string }) => `${error.code} ${error.message}`,
      );
      expect(refused).toMatch(/^SOCKPOOL_ERR_PROTOCOL invalid binary acquire frame: port must be 1-65535/);

      // The release took effect: the same socket comes back warm.
      const again = await link.acquire('127.0.0.1', echo.port, 5_000);
      expect(again.warm).toBe(true);
      expect(native.socketInode(again.fd)).toBe(inode);
      // The acquire pending at the cap is still pending: it gets the room `holder` leaves.
      link.closed(holder);
      native.close(holder.fd);
      const served = await waiting;
      expect(served.port).toBe(narrow.port);
      link.release(served);
      link.release(again);
    } finally {
      link?.close();
      link = undefined;
      await sockpoold.stop();
      await echo.close();
      await narrow.close();
    }
    expect(fdCount()).toBe(before);
  });
});

describe('DaemonLink when a lease comes for an acquire given up', () => {
  it('gives it back to the daemon with its fd (released, not kept or leaked)', async () => {
    // A daemon that does not take `cancel` (or whose cancel crossed the lease on the way) answers an acquire the
    // caller has stopped waiting for: the lease is nobody's, and its socket must go back, not stay open here with the
    // lease counted against the uid until the link closes.
    const before = fdCount();
    daemon = fakeDaemon(() => 'late-lease');
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 5_000 });
    const controller = new AbortController();
    const acquire = link.acquire('example.test', 80, 5_000, controller.signal);
    await waitFor(() => daemon!.acquires() === 1);
    controller.abort(new Error('given up'));
    await expect(acquire).rejects.toThrow('given up');
    await waitFor(() => daemon!.releases.length === 1);
    expect({ releases: daemon.releases, closed: daemon.closed }).toEqual({
      releases: [{ leaseId: 1, fds: 1 }],
      closed: [],
    });
    link.close();
    link = undefined;
    daemon.close();
    daemon = undefined;
    expect(fdCount()).toBe(before);
  });
});

describe('DaemonLink when an error reply carries fds', () => {
  it('fails the acquire with the error and closes the fds', async () => {
    const before = fdCount();
    daemon = fakeDaemon(() => 'error-fd');
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 5_000 });
    await expect(link.acquire('example.test', 80, 5_000)).rejects.toMatchObject({ code: ErrorCodes.POLICY });
    link.close();
    link = undefined;
    daemon.close();
    daemon = undefined;
    expect(fdCount()).toBe(before);
  });
});

describe('DaemonLink when a lease arrives without its socket', () => {
  it('fails the acquire at once and ends the lease at the daemon, which counted it against the uid till the link closed', async () => {
    // The addon drops the fds of a message it cannot take whole (this process's fd table full, here two fds where
    // one may come): the lease reply was dropped with them, and its acquire waited for its deadline while the daemon
    // kept the lease lent to this link (its quotas, the origin's cap) until the link closed.
    const before = fdCount();
    daemon = fakeDaemon(() => 'lease-fds-lost');
    link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 60_000 });
    const outcome = await link.acquire('example.test', 80, 60_000).then(
      () => 'leased',
      (error: { code?: string; message?: string }) => `${error.code} ${error.message}`,
    );
    // (Its deadline is a minute away, past the test's timeout: failed at once, not at it.)
    expect(outcome).toMatch(/^SOCKPOOL_ERR_INTERNAL the socket of lease 1 did not arrive/);
    await waitFor(() => daemon!.closed.length === 1);
    expect(daemon.closed).toEqual([1]);
    link.close();
    link = undefined;
    daemon.close();
    daemon = undefined;
    expect(fdCount()).toBe(before);
  });
});

/** Waits (event-loop turns, bounded) until `check` holds. */
async function waitFor(check: () => boolean): Promise<void> {
  for (let i = 0; i < 500 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 10));
  expect(check()).toBe(true);
}
