// SeqpacketChannel's share of the event loop (shared/seqpacket-channel.ts): channels sharing a TurnBudget (the
// daemon: one per uid) read that many messages together per turn of the loop, whatever number of connections they
// are, while a channel of another budget reads its own in the same turn. Real socketpairs, in-process; counted per
// loop turn (one `await setImmediate` is one poll phase), never timed.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { SeqpacketChannel, TurnBudget } from '../shared/seqpacket-channel.js';
import { fdCount } from './fixtures/native-helpers.js';

const LIMITS = { maxMessageBytes: 1024, maxFdsPerMessage: 4 };

interface Reader {
  channel: SeqpacketChannel;
  /** Our end of the pair: the test writes here, the channel reads the other. */
  peer: number;
  /** Sequence numbers received, in order. */
  seen: number[];
}

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

/**
 * Into the check phase: an immediate scheduled from there runs after exactly one poll phase (from a poll-phase
 * callback, where a test may start, it would run before any).
 */
async function fromCheckPhase(): Promise<void> {
  await nextTurn();
}

/**
 * A channel with `count` messages already queued for it (numbered 0..count-1; every `fdEvery`-th carries an fd, a
 * socketpair end, closed by the handler that receives it). `delivered` counts its group's messages.
 */
function reader(count: number, turns: TurnBudget | undefined, delivered: { count: number }, fdEvery = 16): Reader {
  const [mine, peer] = native.seqpacketPair();
  for (let n = 0; n < count; n++) {
    const fds: number[] = [];
    if (n % fdEvery === 0) {
      const [a, b] = native.seqpacketPair();
      native.close(a);
      fds.push(b);
    }
    expect(native.sendMessage(peer, Buffer.from(String(n)), fds)).not.toBeNull();
    // The kernel holds its own copy in the message now.
    for (const fd of fds) native.close(fd);
  }
  const seen: number[] = [];
  const channel = new SeqpacketChannel(
    mine,
    {
      onMessage: (data, fds) => {
        for (const fd of fds) native.close(fd);
        seen.push(Number(data.toString()));
        delivered.count++;
      },
      onClose: () => {},
    },
    { ...LIMITS, turns },
  );
  const made = { channel, peer, seen };
  cleanups.push(() => {
    channel.close();
    native.close(peer);
  });
  return made;
}

describe('turns of the event loop', () => {
  it("reads at most one budget's worth per loop turn across all the connections sharing it, the rest in later turns, in order", async () => {
    await fromCheckPhase();
    const before = fdCount();
    const flooding = new TurnBudget();
    const other = new TurnBudget();
    const floodDelivered = { count: 0 };
    const otherDelivered = { count: 0 };
    // Eight connections of one uid with 64 messages each, queued before the one of another uid.
    const floods = Array.from({ length: 8 }, () => reader(64, flooding, floodDelivered));
    const honest = reader(1, other, otherDelivered);

    await nextTurn();
    // One turn: the flooding uid's 64 (not 8 × 64), and the other uid's one message in the same turn.
    expect(floodDelivered.count).toBe(flooding.perTurn);
    expect(otherDelivered.count).toBe(1);
    expect(honest.seen).toEqual([0]);

    // The rest, at most a budget per turn: the messages left unread are reported readable again (level-triggered).
    const perTurn = [floodDelivered.count];
    for (let turn = 0; turn < 20 && floodDelivered.count < 8 * 64; turn++) {
      const was = floodDelivered.count;
      await nextTurn();
      perTurn.push(floodDelivered.count - was);
    }
    expect(floodDelivered.count).toBe(8 * 64);
    expect(perTurn).toEqual(Array(8).fill(64));
    // None lost, none reordered, on each connection.
    const all = Array.from({ length: 64 }, (_, n) => n);
    for (const flood of floods) expect(flood.seen).toEqual(all);

    // Idle: nothing read, so no refill is scheduled (the loop does not spin).
    await nextTurn();
    await nextTurn();
    expect(process.getActiveResourcesInfo().filter((kind) => kind === 'Immediate')).toEqual([]);

    for (const cleanup of cleanups.splice(0).reverse()) cleanup();
    expect(fdCount()).toBe(before);
  });

  it('gives the turns of a budget to its connections in turn: one that always has more queued does not hold the others back', async () => {
    await fromCheckPhase();
    const before = fdCount();
    const turns = new TurnBudget();
    const delivered = { count: 0 };
    // Queued first (epoll reports it first, turn after turn), and with four turns' worth.
    const busy = reader(4 * 64, turns, delivered);
    const others = Array.from({ length: 3 }, () => reader(64, turns, delivered));

    // Four turns: one each, in turn (it was the busy one's four, the others' none).
    for (let turn = 0; turn < 4; turn++) await nextTurn();
    expect(delivered.count).toBe(4 * 64);
    expect(busy.seen.length).toBe(64);
    for (const other of others) expect(other.seen.length).toBe(64);

    for (let turn = 0; turn < 10 && busy.seen.length < 4 * 64; turn++) await nextTurn();
    expect(busy.seen).toEqual(Array.from({ length: 4 * 64 }, (_, n) => n));
    for (const cleanup of cleanups.splice(0).reverse()) cleanup();
    expect(fdCount()).toBe(before);
  });

  it('takes what one message held beyond itself (a bundle) from the budget: past what is left, nothing is read until the refills have paid it back', async () => {
    await fromCheckPhase();
    const turns = new TurnBudget(8);
    expect(turns.allow(16)).toBe(8);
    turns.spend(4);
    // A bundle's requests beyond its first, more than the budget has left.
    turns.spend(10);
    expect(turns.allow(16)).toBe(0);
    // The refill pays the 6 owed first; the next, due at once, the rest.
    await nextTurn();
    expect(turns.allow(16)).toBe(2);
    await nextTurn();
    expect(turns.allow(16)).toBe(8);
  });

  it('carries what bundles took past a turn into the turns after it: a connection whose every message holds 16 requests has no more than a budget of them read a turn, over many turns', async () => {
    await fromCheckPhase();
    const before = fdCount();
    const turns = new TurnBudget();
    const perMessage = 16;
    const count = 128;
    const [mine, peer] = native.seqpacketPair();
    for (let n = 0; n < count; n++) expect(native.sendMessage(peer, Buffer.from(String(n)), [])).not.toBeNull();
    const seen: number[] = [];
    const channel: SeqpacketChannel = new SeqpacketChannel(
      mine,
      {
        onMessage: (data) => {
          seen.push(Number(data.toString()));
          // As the daemon's #onBundle does for a bundle's requests past its first.
          channel.spendTurns(perMessage - 1);
        },
        onClose: () => {},
      },
      { ...LIMITS, turns },
    );
    cleanups.push(() => {
      channel.close();
      native.close(peer);
    });

    const turnsCounted = 16;
    for (let turn = 0; turn < turnsCounted; turn++) await nextTurn();
    // One batch read at once may overshoot what is left (its messages' requests are known only once read); over the
    // turns, no more than a budget a turn. (Forgiven at each refill, it was a whole batch of bundles every turn.)
    expect(seen.length * perMessage).toBeLessThanOrEqual(turnsCounted * turns.perTurn + 16 * perMessage);
    expect(seen.length).toBeGreaterThan(0);

    // Not stalled by the debt: the rest comes, in order, and then the loop is idle.
    for (let turn = 0; turn < 200 && seen.length < count; turn++) await nextTurn();
    expect(seen).toEqual(Array.from({ length: count }, (_, n) => n));
    for (let turn = 0; turn < 8; turn++) await nextTurn();
    expect(process.getActiveResourcesInfo().filter((kind) => kind === 'Immediate')).toEqual([]);

    for (const cleanup of cleanups.splice(0).reverse()) cleanup();
    expect(fdCount()).toBe(before);
  });

  it('closes a connection that waits for its turn with its queued fds, and the others sharing the budget go on', async () => {
    await fromCheckPhase();
    const before = fdCount();
    const turns = new TurnBudget();
    const delivered = { count: 0 };
    // Every message carries an fd.
    const first = reader(128, turns, delivered, 1);
    const second = reader(128, turns, delivered, 1);

    await nextTurn();
    expect(delivered.count).toBe(64);
    // One of them took the turn; the other waits with its 128 messages (and 128 fds) in the kernel.
    const [served, waiting] = first.seen.length > 0 ? [first, second] : [second, first];
    expect(served.seen.length).toBe(64);
    expect(waiting.seen).toEqual([]);
    waiting.channel.close();

    for (let turn = 0; turn < 5 && served.seen.length < 128; turn++) await nextTurn();
    expect(served.seen).toEqual(Array.from({ length: 128 }, (_, n) => n));
    expect(waiting.seen).toEqual([]);

    for (const cleanup of cleanups.splice(0).reverse()) cleanup();
    expect(fdCount()).toBe(before);
  });
});

describe('a handler that throws', () => {
  it("delivers the rest of the batch a handler threw in (none of its fds left open), then throws the handlers' errors", () => {
    // A child process: a throw out of the channel's handler is that process's uncaught exception (the addon's Poller
    // calls the channel from libuv). Four messages queued before the channel is made come in one recvmmsg, each with
    // an fd; the handler throws at the first and the third. The child counts its own sockets before and after.
    const channel = join(import.meta.dirname, '..', 'dist', 'shared', 'seqpacket-channel.js');
    const script = `
      import { readdirSync, readlinkSync } from 'node:fs';
      import * as native from ${JSON.stringify(join(import.meta.dirname, '..', 'dist', 'shared', 'native.js'))};
      import { SeqpacketChannel } from ${JSON.stringify(channel)};
      // Sockets only: libuv opens its reserve fd (/dev/null) at its first stream, whenever that is.
      const sockets = () => readdirSync('/proc/self/fd').filter((fd) => {
        try { return readlinkSync('/proc/self/fd/' + fd).startsWith('socket:'); } catch { return false; }
      }).length;
      const before = sockets();
      const [mine, peer] = native.seqpacketPair();
      const ends = [];
      for (let n = 0; n < 4; n++) {
        const [end, sent] = native.seqpacketPair();
        native.sendMessage(peer, Buffer.from(String(n)), [sent]);
        native.close(sent);
        ends.push(end);
      }
      const seen = [];
      const uncaught = [];
      process.on('uncaughtException', (error) =>
        uncaught.push(error.name + ': ' + error.message + (error.errors ? ' [' + error.errors.map((e) => e.message).join(', ') + ']' : '')));
      const reader = new SeqpacketChannel(mine, {
        onMessage: (data, received) => {
          for (const fd of received) native.close(fd);
          seen.push(Number(data.toString()));
          if (seen.length % 2 === 1) throw new Error('handler failed on purpose at ' + data.toString());
        },
        onClose: () => {},
      }, { maxMessageBytes: 64, maxFdsPerMessage: 4 });
      setTimeout(() => {
        // Every copy of each message's fd is closed by now: its peer, ours, reads EOF.
        const hungUp = ends.map((end) => native.recvMessage(end, 64, 0)?.eof === true);
        reader.close();
        native.close(peer);
        for (const end of ends) native.close(end);
        process.stdout.write(JSON.stringify({ seen, uncaught, hungUp, left: sockets() - before }) + '\\n');
      }, 200);
    `;
    const run = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
      encoding: 'utf8',
      timeout: 20_000,
    });
    expect(run.stderr).toBe('');
    expect(run.status).toBe(0);
    expect(JSON.parse(run.stdout)).toEqual({
      seen: [0, 1, 2, 3],
      uncaught: [
        'AggregateError: 2 message handlers threw in one batch [handler failed on purpose at 0, handler failed on purpose at 2]',
      ],
      hungUp: [true, true, true, true],
      left: 0,
    });
  });
});
