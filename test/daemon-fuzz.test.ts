// Protocol fuzzing, seeded and bounded: thousands of mutated, truncated, oversize and random messages, some with
// fds attached, from several clients at once. The daemon must answer or hang up, never crash, and hold no fd it
// did not hold before once the clients are gone.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { type ClientMessage, encodeFrame, FrameType, MAX_MESSAGE_BYTES } from '../shared/protocol.js';
import { startServer, type TestServer } from './fixtures/native-helpers.js';
import { type DaemonProcess, eventually, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { RawClient } from './helpers/raw-client.js';
import { seededRandom } from './helpers/seeded-random.js';

const seed = Number(process.env.SOCKPOOL_FUZZ_SEED ?? Date.now() % 1_000_000);
let echo: TestServer;
let sockpoold: DaemonProcess;
const configCleanups: Array<() => unknown> = [];

beforeAll(async () => {
  echo = await startServer('127.0.0.1');
  // Fds let in (access.acceptClientFds), so that the messages carrying them reach the daemon's decoding and
  // discard: by default the kernel refuses them at the sender (EPERM), tested in test/daemon-trust.
  const config = writeConfigFile({ access: { acceptClientFds: true } }, configCleanups);
  sockpoold = await startDaemon({
    args: ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port), '--config', config],
  });
});

afterAll(async () => {
  await sockpoold?.stop();
  await echo?.close();
  for (const cleanup of configCleanups) cleanup();
});

function mutate(next: () => number, port: number): Buffer {
  const valid = [
    { type: 'hello', id: 1, version: 1 },
    { type: 'acquire', id: 2, host: '127.0.0.1', port },
    { type: 'prewarm', id: 3, host: '127.0.0.1', port, count: 2 },
    { type: 'release', id: 4, leaseId: 1 },
    { type: 'closed', leaseId: 2 },
    { type: 'stats', id: 5 },
  ];
  const pick = <T>(items: T[]): T => items[Math.floor(next() * items.length)]!;
  const base = JSON.stringify(pick(valid));
  if (next() < 0.35) return mutateFrame(next, port, pick);
  switch (Math.floor(next() * 8)) {
    case 0: // random bytes
      return Buffer.from(Array.from({ length: 1 + Math.floor(next() * 200) }, () => Math.floor(next() * 256)));
    case 1: // truncated JSON
      return Buffer.from(base.slice(0, Math.floor(next() * base.length)) || '{');
    case 2: {
      // one byte flipped
      const bytes = Buffer.from(base);
      bytes[Math.floor(next() * bytes.length)] = Math.floor(next() * 256);
      return bytes;
    }
    case 3: // wrong types in every field
      return Buffer.from(
        JSON.stringify({
          type: pick(['acquire', 'release', 42, null]),
          id: pick([-1, 1.5, 'x', 2 ** 40]),
          host: pick([[], {}, '', 'a'.repeat(300)]),
          port: pick([0, 70000, '80', null]),
        }),
      );
    case 4: // extra keys
      return Buffer.from(JSON.stringify({ ...JSON.parse(base), extra: pick([1, 'x', { nested: true }]) }));
    case 5: // oversize
      return Buffer.from(
        JSON.stringify({ type: 'stats', id: 6, pad: 'x'.repeat(MAX_MESSAGE_BYTES + Math.floor(next() * 1000)) }),
      );
    case 6: // deep nesting
      return Buffer.from(`${'['.repeat(5000)}${']'.repeat(5000)}`);
    default: // a valid message
      return Buffer.from(base);
  }
}

/** Binary frames (shared/protocol.ts): valid ones, and each way one can be broken. */
function mutateFrame(next: () => number, port: number, pick: <T>(items: T[]) => T): Buffer {
  const valid: ClientMessage[] = [
    { type: 'acquire', id: 7, host: '127.0.0.1', port },
    { type: 'acquire', id: 8, host: '127.0.0.1', port, timeoutMs: 500, tls: { trust: 'system' } },
    { type: 'release', id: 9, leaseId: 1 },
    { type: 'release', leaseId: 2 },
    { type: 'closed', leaseId: 3 },
    { type: 'closed', id: 10, leaseId: 4 },
  ];
  const frame = encodeFrame(pick(valid))!;
  switch (Math.floor(next() * 7)) {
    case 0: // truncated
      return frame.subarray(0, Math.max(1, Math.floor(next() * frame.length)));
    case 1: {
      // one byte flipped (type, flags, ids, lengths, text)
      const bytes = Buffer.from(frame);
      bytes[Math.floor(next() * bytes.length)] = Math.floor(next() * 256);
      return bytes;
    }
    case 2: // trailing garbage
      return Buffer.concat([frame, Buffer.from([Math.floor(next() * 256)])]);
    case 3: // a frame type byte, then random bytes
      return Buffer.from([
        pick(Object.values(FrameType)),
        ...Array.from({ length: Math.floor(next() * 64) }, () => Math.floor(next() * 256)),
      ]);
    case 4: {
      // impossible numbers: NaN, negative or fractional lease ids, id over 2^31-1
      const bytes = Buffer.from(frame);
      if (bytes[0] === FrameType.acquire) bytes.writeUInt32LE(0xffffffff, 2);
      else bytes.writeDoubleLE(pick([Number.NaN, -1, 1.5, 2 ** 60, 0]), 6);
      return bytes;
    }
    default: // valid
      return frame;
  }
}

describe('protocol fuzzing', () => {
  it(`survives thousands of malformed messages with and without fds (seed ${seed})`, async () => {
    const next = seededRandom(seed);
    const baseline = sockpoold.fdCount();
    // Half the clients negotiate binary framing first, so frames reach both the frame decoder and the refusal of
    // frames on a JSON-only connection.
    const open = () => {
      const client = new RawClient(sockpoold.socketPath);
      if (next() < 0.5) client.sendJson({ type: 'hello', id: 1, version: 1, binary: 1 });
      return client;
    };
    const alive = new Set(Array.from({ length: 4 }, open));
    let sent = 0;
    let hungUp = 0;
    const replace = (gone: RawClient) => {
      alive.delete(gone);
      gone.close();
      hungUp++;
      alive.add(open());
    };
    for (let round = 0; round < 3000; round++) {
      const client = [...alive][Math.floor(next() * alive.size)]!;
      const fds: number[] = [];
      // Sometimes attach fds: a socketpair end or a duplicate-ish pipe of our own (closed by us after sending).
      if (next() < 0.15) {
        const [mine, theirs] = native.seqpacketPair();
        native.close(mine);
        fds.push(theirs);
      }
      try {
        client.sendBytes(mutate(next, echo.port), fds);
        sent++;
      } catch {
        // The daemon hung up on this client (too many bad messages): a new one takes its place.
        replace(client);
      }
      for (const fd of fds) native.close(fd);
      // Drain replies now and then; close any fd a lease brought.
      if (round % 50 === 49) {
        for (const other of [...alive]) {
          for (;;) {
            let message: native.ReceivedMessage | null;
            try {
              message = native.recvMessage(other.fd, MAX_MESSAGE_BYTES * 4, 4);
            } catch {
              message = { data: Buffer.alloc(0), fds: [], eof: true };
            }
            if (message === null) break;
            for (const fd of message.fds) native.close(fd);
            if (message.eof) {
              replace(other);
              break;
            }
          }
        }
      }
    }
    expect(sent).toBeGreaterThan(2500);
    expect(hungUp).toBeGreaterThan(0); // persistent offenders were disconnected
    for (const client of alive) client.close();
    // Still alive and serving.
    const check = new RawClient(sockpoold.socketPath);
    const hello = await check.request({ type: 'hello', id: 1, version: 1 });
    expect(hello.message).toMatchObject({ type: 'hello' });
    check.close();
    expect(sockpoold.child.exitCode).toBeNull();
    // Every fd the fuzzing brought in was closed: only idle pool sockets (prewarmed) may remain above baseline.
    await eventually(async () => {
      const probe = new RawClient(sockpoold.socketPath);
      const reply = await probe.request({ type: 'stats', id: 2 });
      probe.close();
      const idle = (reply.message as unknown as { stats: { idle: number; leased: number } }).stats;
      return sockpoold.fdCount() <= baseline + idle.idle && idle.leased === 0;
    }, `daemon fds back to baseline ${baseline} plus idle sockets (seed ${seed})`);
  }, 120_000);
});
