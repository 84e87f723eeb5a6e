// A `reclaim` notice after the daemon restarted: lease ids are the daemon process's own and start again at 1, so
// the new daemon's notice can name the id of a lease curl still holds from the old one (an idle keep-alive
// connection, maybe to another origin). The link tells the socket supply which connection the notice came on, and
// only that connection's leases are given back. The "daemon" is a real SOCK_SEQPACKET listener in this process (as
// test/daemon-link.test.ts's), a fresh daemon "process" per connection; the link and the supply are the
// production code.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import {
  decodeClientMessage,
  encodeMessage,
  MAX_FDS_PER_MESSAGE,
  MAX_MESSAGE_BYTES,
  PROTOCOL_VERSION,
} from '../shared/protocol.js';
import { SeqpacketChannel } from '../shared/seqpacket-channel.js';
import { DaemonLink } from '../worker/daemon-link.js';
import { CLOSE_NATIVELY, SocketSupply } from '../worker/socket-supply.js';
import { eventually } from './helpers/daemon.js';

interface FakeDaemon {
  path: string;
  /** The daemon "process" dies: every connection closes; the next one counts lease ids from 1 again. */
  restart(): void;
  /** Sends `reclaim` on the newest connection. */
  reclaim(leaseIds: number[]): void;
  /** Whether the socket lent under (connection number, lease id) was shut down or closed at the worker's end. */
  ended(connection: number, leaseId: number): boolean;
  close(): void;
}

/** Answers hello and leases one end of a socketpair per acquire (keeping the far end); nothing else. */
function fakeDaemon(): FakeDaemon {
  const path = join(mkdtempSync(join(tmpdir(), 'sockpool-reclaim-')), 'fake.sock');
  const listenFd = native.seqpacketListen(path, 16);
  const channels: SeqpacketChannel[] = [];
  const farEnds = new Map<string, number>();
  const limits = { maxMessageBytes: MAX_MESSAGE_BYTES, maxFdsPerMessage: MAX_FDS_PER_MESSAGE };
  const listener = new native.Poller(listenFd, () => {
    for (let fd = native.accept(listenFd); fd !== null; fd = native.accept(listenFd)) {
      const connection = channels.length + 1;
      let nextLease = 1;
      const channel: SeqpacketChannel = new SeqpacketChannel(
        fd,
        {
          onMessage: (data, fds) => {
            for (const extra of fds) native.close(extra);
            const message = decodeClientMessage(data, false);
            if (message.type === 'hello') {
              channel.send(
                encodeMessage({
                  type: 'hello',
                  id: message.id,
                  version: PROTOCOL_VERSION,
                  server: 'sockpoold',
                  serverVersion: 'test',
                  maxMessageBytes: MAX_MESSAGE_BYTES,
                }),
              );
            } else if (message.type === 'acquire') {
              const [near, far] = native.seqpacketPair();
              const leaseId = nextLease++;
              farEnds.set(`${connection}/${leaseId}`, far);
              const lease = { type: 'lease' as const, id: message.id, leaseId, host: message.host };
              const reply = { ...lease, port: message.port, address: '127.0.0.1', family: 4 as const, warm: false };
              channel.send(encodeMessage({ ...reply, connectMs: 0 }), [near]); // (the channel owns near now)
            }
          },
          onClose: () => {},
        },
        limits,
      );
      channels.push(channel);
    }
  });
  listener.start(native.READABLE);
  return {
    path,
    restart: () => {
      for (const channel of channels) channel.close();
    },
    reclaim: (leaseIds) => channels.at(-1)!.send(encodeMessage({ type: 'reclaim', id: null, leaseIds })),
    ended: (connection, leaseId) => native.probe(farEnds.get(`${connection}/${leaseId}`)!).state === 'eof',
    close: () => {
      listener.close();
      for (const channel of channels) channel.close();
      for (const far of farEnds.values()) native.close(far);
      native.close(listenFd);
    },
  };
}

let daemon: FakeDaemon | undefined;
let link: DaemonLink | undefined;

afterEach(() => {
  link?.close();
  daemon?.close();
});

const HTTP = { secure: false, timeoutMs: 1_000, force: false };

it("a reclaim from a restarted daemon leaves alone the old daemon's lease that has the same id", async () => {
  daemon = fakeDaemon();
  link = new DaemonLink({ socketPath: daemon.path, requestTimeoutMs: 2_000 });
  const supply = new SocketSupply(link);

  // Origin A: a transfer gets lease 1 of the first daemon; curl takes the socket and keeps it idle afterwards.
  const slotA = await supply.prepare({ host: 'a.test', port: 80 }, 'a.test:80', HTTP);
  expect(slotA.lease?.leaseId).toBe(1);
  const fdA = supply.open(slotA);
  supply.finish(slotA);

  // The daemon restarts; the link connects again at the next request.
  daemon.restart();
  await eventually(() => !link!.connected, 'the link to see the daemon gone');
  // Origin B: lease 1 of the new daemon, idle in curl's cache too.
  const slotB = await supply.prepare({ host: 'b.test', port: 80 }, 'b.test:80', HTTP);
  expect(slotB.lease?.leaseId).toBe(1);
  const fdB = supply.open(slotB);
  supply.finish(slotB);

  // The new daemon asks for its lease 1 back: B's connection is shut down...
  daemon.reclaim([1]);
  await eventually(() => daemon!.ended(2, 1), "B's connection to be given back");
  // ...and A's, the old daemon's lease 1 that the new daemon knows nothing of, stays open (before: shut down too).
  expect(daemon.ended(1, 1)).toBe(false);

  // curl closes them (CLOSESOCKETFUNCTION ends the lease; node-libcurl closes the fd after it: CLOSE_NATIVELY).
  for (const fd of [fdB, fdA]) {
    expect(supply.close(fd)).toBe(CLOSE_NATIVELY);
    native.close(fd);
  }
});
