// OriginPool in-process (daemon/origin-pool.ts): a fake connector hands out real loopback TCP connections the test
// controls from the server side, and fake timers move the pool's clock (performance.now) and timers. Covered:
// handoffs (warm and fresh, giveBack), maxPerOrigin with a FIFO queue of waiters and acquire timeouts, failed and
// refused connects (the oldest waiter fails, refills back off), the refill target and prewarm bounds, recycling
// (timers and the check before a handoff), dropping idle sockets the server closes, resets or writes to, the
// idle TTL, eviction, detach/adopt, and close. Every test ends with as many fds open as it started with.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import type net from 'node:net';
import { afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { defaultConfig, type OriginPolicy, policyFor } from '../daemon/config.js';
import type { ConnectedSocket } from '../daemon/connector.js';
import {
  type ConnectPurpose,
  type DropReason,
  type Handoff,
  OriginPool,
  type OriginPoolEvents,
} from '../daemon/origin-pool.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import type { Origin } from '../shared/origin.js';
import { nextTurn, until, useFakeClock } from './fixtures/fake-clock.js';
import { FakeConnector } from './fixtures/fake-connector.js';
import {
  fdCount,
  lingerZeroThroughCopy,
  stateAfterClose,
  waitForEvents,
  warmUpChildProcesses,
} from './fixtures/native-helpers.js';

const ORIGIN: Origin = { host: 'origin.test', port: 443 };
const KEY = 'origin.test:443';

function policy(overrides: Partial<OriginPolicy> = {}): OriginPolicy {
  return { ...policyFor(defaultConfig(), ORIGIN.host, ORIGIN.port), ...overrides };
}

/** What the pool reported through its events. */
class Recorder implements OriginPoolEvents {
  idle = 0;
  connects = 0;
  drops: Array<{ reason: DropReason; idleMs: number; ageMs: number }> = [];
  failures: Error[] = [];
  idleChanged(_pool: OriginPool, delta: number): void {
    this.idle += delta;
  }
  dropped(_pool: OriginPool, reason: DropReason, idleMs: number, ageMs: number): void {
    this.drops.push({ reason, idleMs, ageMs });
  }
  connected(): void {
    this.connects++;
  }
  connectFailed(_pool: OriginPool, error: Error): void {
    this.failures.push(error);
  }
  /** Times the pool said acquires wait for room only a lease's end can make. */
  waitingForRoomCount = 0;
  waitingForRoom(): void {
    this.waitingForRoomCount++;
  }
  get reasons(): DropReason[] {
    return this.drops.map((drop) => drop.reason);
  }
  /** Per purpose: sockets opened, lent for the first time, closed never lent ("purpose:reason"). */
  opens: ConnectPurpose[] = [];
  lends: ConnectPurpose[] = [];
  unlent: string[] = [];
  opened(_pool: OriginPool, purpose: ConnectPurpose): void {
    this.opens.push(purpose);
  }
  lent(_pool: OriginPool, purpose: ConnectPurpose): void {
    this.lends.push(purpose);
  }
  neverLent(_pool: OriginPool, purpose: ConnectPurpose, reason: DropReason): void {
    this.unlent.push(`${purpose}:${reason}`);
  }
}

let connector: FakeConnector;
let events: Recorder;
let pools: OriginPool[];
/** Handoffs the test holds (it owns their fds): closed after the test if it did not close them itself. */
let held: Handoff[];
let fdsBefore: number;

beforeAll(async () => {
  await warmUpChildProcesses(); // (a test below starts a child: libuv's lazily opened fds are open before any count)
});

beforeEach(async () => {
  fdsBefore = fdCount();
  connector = await FakeConnector.start();
  events = new Recorder();
  pools = [];
  held = [];
  useFakeClock();
});

afterEach(async () => {
  vi.useRealTimers();
  for (const pool of pools) pool.close();
  for (const handoff of held.splice(0)) if (isOpen(handoff.fd)) native.close(handoff.fd);
  await connector.close();
  expect(fdCount()).toBe(fdsBefore);
});

function pool(overrides: Partial<OriginPolicy> = {}): OriginPool {
  const created = new OriginPool(KEY, ORIGIN, policy(overrides), connector, events);
  pools.push(created);
  return created;
}

async function acquire(from: OriginPool, timeoutMs = 1_000): Promise<Handoff> {
  const handoff = await from.acquire(timeoutMs);
  held.push(handoff);
  return handoff;
}

/** Ends a lease the way the handoff server learns it: curl closed the socket. */
function endLease(from: OriginPool, handoff: Handoff): void {
  native.close(handoff.fd);
  held.splice(held.indexOf(handoff), 1);
  from.leaseEnded();
}

/** Gives a leased socket back unused (ownership of the fd passes to the pool). */
function giveBack(from: OriginPool, handoff: Handoff): void {
  held.splice(held.indexOf(handoff), 1);
  from.giveBack(handoff);
}

function isOpen(fd: number): boolean {
  try {
    native.probe(fd);
    return true;
  } catch {
    return false;
  }
}

/** Records when a promise settles, so a test can assert that it has not (yet). */
function track<T>(promise: Promise<T>) {
  const state: { settled: boolean; value?: T; error?: unknown } = { settled: false };
  promise.then(
    (value) => Object.assign(state, { settled: true, value }),
    (error: unknown) => Object.assign(state, { settled: true, error }),
  );
  return state;
}

describe('OriginPool handoffs', () => {
  it('tells what each connect was for, which sockets were lent, and which closed never lent', async () => {
    const origin = pool({ maxIdle: 2 });
    // A lookahead's two connects go idle; an acquire takes one: lent, and announced demand met (the pool manager
    // does not count it toward the idle target, warm-target.ts).
    expect(origin.prewarm(2, 1000, 'lookahead')).toBe(2);
    await until(() => origin.idleCount === 2, 'the two announced sockets');
    expect(events.opens).toEqual(['lookahead', 'lookahead']);
    const warm = await acquire(origin);
    expect(warm).toMatchObject({ warm: true, announced: true });
    expect(events.lends).toEqual(['lookahead']);
    // Given back and lent again: not its first lend, not counted again.
    giveBack(origin, warm);
    const again = await acquire(origin);
    expect(again.announced).toBeUndefined();
    expect(events.lends).toEqual(['lookahead']);
    giveBack(origin, again);
    // The pool closes: of its two idle sockets, the one never lent is counted so.
    origin.close();
    expect(events.unlent).toEqual(['lookahead:shutdown']);

    // An acquire that comes while a prewarm connects is served by whichever connect completes first.
    connector.manual = true;
    const other = pool({ maxIdle: 2 });
    expect(other.prewarm(1, 1000)).toBe(1);
    const waiting = track(other.acquire(1_000, 1000));
    expect(connector.pending).toHaveLength(2); // (the prewarm's, and the waiter's own)
    await connector.pending[0]!.succeed();
    await until(() => waiting.settled, 'the waiter served');
    held.push(waiting.value as Handoff);
    expect(waiting.value).toMatchObject({ warm: false, announced: true });
    // The waiter's own connect, no longer needed, goes idle: never lent when the pool closes.
    await connector.pending[1]!.succeed();
    await until(() => other.idleCount === 1, 'the late connect idle');
    other.close();
    expect(events.opens).toEqual(['lookahead', 'lookahead', 'prewarm', 'acquire']);
    expect(events.lends).toEqual(['lookahead', 'prewarm']);
    expect(events.unlent).toEqual(['lookahead:shutdown', 'acquire:shutdown']);
  });

  it('connects for an acquire when nothing is idle; a socket given back is handed out again, warm', async () => {
    const origin = pool();
    const fresh = await acquire(origin);
    expect(fresh.warm).toBe(false);
    expect(origin.leasedCount).toBe(1);
    expect(connector.calls).toBe(1);

    giveBack(origin, fresh);
    expect(origin.idleCount).toBe(1);
    expect(origin.leasedCount).toBe(0);

    const warm = await acquire(origin);
    expect(warm.warm).toBe(true);
    expect(warm.fd).toBe(fresh.fd);
    expect(connector.calls).toBe(1);
    endLease(origin, warm);
    expect(origin.total).toBe(0);
  });

  it('closes a socket given back after its server closed it, instead of pooling it', async () => {
    const origin = pool();
    const handoff = await acquire(origin);
    const peer = connector.peerOf(handoff.fd);
    peer.end();
    await waitForEvents(handoff.fd, native.READABLE); // the FIN has arrived
    giveBack(origin, handoff);
    expect(origin.idleCount).toBe(0);
    expect(origin.leasedCount).toBe(0);
    await once(peer, 'close'); // the pool closed its end
  });
});

describe('OriginPool slots and waiters', () => {
  it('holds acquires beyond maxPerOrigin in a FIFO queue and serves them as slots free up', async () => {
    const origin = pool({ maxPerOrigin: 2 });
    const first = await acquire(origin);
    const second = await acquire(origin);
    const served: string[] = [];
    const third = acquire(origin).then((handoff) => {
      served.push('third');
      return handoff;
    });
    const fourth = acquire(origin).then((handoff) => {
      served.push('fourth');
      return handoff;
    });
    expect(origin.waitingCount).toBe(2);
    await nextTurn();
    expect(connector.calls).toBe(2); // the queue does not connect past the limit

    // A lease given back unused goes straight to the oldest waiter.
    giveBack(origin, second);
    const thirdHandoff = await third;
    expect(thirdHandoff.fd).toBe(second.fd);
    expect(thirdHandoff.warm).toBe(true);
    // A lease that ended frees a slot: a connect for the next waiter.
    endLease(origin, first);
    const fourthHandoff = await fourth;
    expect(fourthHandoff.warm).toBe(false);
    expect(served).toEqual(['third', 'fourth']);
    expect(connector.calls).toBe(3);
    expect(origin.waitingCount).toBe(0);
    expect(origin.leasedCount).toBe(2);
  });

  it('fails an acquire that waited past its timeout with SOCKPOOL_ERR_ACQUIRE_TIMEOUT', async () => {
    const origin = pool({ maxPerOrigin: 1 });
    const leased = await acquire(origin);
    const waiting = track(origin.acquire(250));
    await vi.advanceTimersByTimeAsync(249);
    expect(waiting.settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    expect(waiting.error).toBeInstanceOf(SockpoolError);
    expect((waiting.error as SockpoolError).code).toBe(ErrorCodes.ACQUIRE_TIMEOUT);
    expect(origin.waitingCount).toBe(0);
    // The slot that frees up later is not spent on the waiter that gave up.
    endLease(origin, leased);
    await nextTurn();
    expect(connector.calls).toBe(1);
    expect(origin.total).toBe(0);
  });

  it('gives a failed connect to the oldest waiter and keeps the others waiting for theirs', async () => {
    connector.manual = true;
    const origin = pool();
    const older = track(origin.acquire(1_000));
    const younger = track(origin.acquire(1_000));
    expect(connector.pending).toHaveLength(2);
    const refused = Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
    // The younger waiter's connect fails first: the failure still goes to the oldest waiter (queue order).
    connector.pending[1]!.fail(refused);
    await until(() => older.settled, 'the older waiter fails');
    expect(older.error).toBe(refused);
    expect(younger.settled).toBe(false);
    expect(events.failures).toEqual([refused]);
    await connector.pending[0]!.succeed();
    await until(() => younger.settled, 'the younger waiter is served');
    held.push(younger.value!);
    expect(younger.value!.warm).toBe(false);
    expect(connector.pending).toHaveLength(2); // no third connect: nobody else was waiting
  });

  it('rejects waiters with SOCKPOOL_ERR_SHUTTING_DOWN on close and closes a connect that arrives afterwards', async () => {
    connector.manual = true;
    const origin = pool();
    const waiting = track(origin.acquire(1_000));
    origin.close();
    await until(() => waiting.settled, 'the waiter fails');
    expect((waiting.error as SockpoolError).code).toBe(ErrorCodes.SHUTTING_DOWN);
    await connector.pending[0]!.succeed();
    await once(connector.peers[0]!, 'close'); // the late socket was closed, not pooled
    expect(origin.idleCount).toBe(0);
    await expect(origin.acquire(1_000)).rejects.toMatchObject({ code: ErrorCodes.SHUTTING_DOWN });
  });
});

describe('OriginPool warming', () => {
  it('refills to max(minIdle, target), bounded by maxIdle and by maxPerOrigin', async () => {
    const origin = pool({ minIdle: 1, maxIdle: 3, maxPerOrigin: 4 });
    origin.setRefillTarget(0);
    await until(() => origin.idleCount === 1, 'minIdle reached');
    origin.setRefillTarget(10);
    await until(() => origin.idleCount === 3, 'maxIdle reached');
    expect(connector.calls).toBe(3);

    // A handoff is refilled (4 sockets in all)...
    await acquire(origin);
    await until(() => origin.idleCount === 3, 'refilled after a handoff');
    expect(connector.calls).toBe(4);
    // ...but not beyond maxPerOrigin.
    await acquire(origin);
    await nextTurn();
    expect(origin.idleCount).toBe(2);
    expect(origin.total).toBe(4);
    expect(connector.calls).toBe(4);
  });

  it('prewarm connects once, up to the count and maxIdle, and nothing is refilled after', async () => {
    const origin = pool({ maxIdle: 4 });
    origin.prewarm(10);
    expect(origin.connectingCount).toBe(4);
    origin.prewarm(2); // already covered by the connects in flight
    expect(connector.calls).toBe(4);
    await until(() => origin.idleCount === 4, 'prewarmed');
    await acquire(origin);
    await nextTurn();
    expect(origin.idleCount).toBe(3);
    expect(connector.calls).toBe(4);
  });

  it('stops refilling while connects fail and starts again when the backoff has passed', async () => {
    const origin = pool({ minIdle: 2 });
    connector.failures.push(Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' }));
    origin.setRefillTarget(0);
    await until(() => origin.idleCount === 1 && events.failures.length === 1, 'one connect failed, one did not');
    expect(connector.calls).toBe(2);
    // One failure: 500 ms of backoff. Refills (sweeps) before then start nothing.
    await vi.advanceTimersByTimeAsync(499);
    origin.sweep(performance.now());
    expect(connector.calls).toBe(2);
    await vi.advanceTimersByTimeAsync(1);
    origin.sweep(performance.now());
    expect(connector.calls).toBe(3);
    await until(() => origin.idleCount === 2, 'refilled to minIdle');
  });

  it('holds a lowered maxIdle and maxPerOrigin at once: idle sockets past them close, kept ones first, then the oldest', async () => {
    const origin = pool({ maxIdle: 8, maxPerOrigin: 8 });
    origin.prewarm(1);
    await until(() => origin.idleCount === 1, 'the first prewarmed');
    await vi.advanceTimersByTimeAsync(1_000);
    origin.prewarm(4);
    await until(() => origin.idleCount === 4, 'three more prewarmed');
    // One lent to uid 7 and released unused: kept idle for that uid.
    const lent = await origin.acquire(1_000, 7);
    origin.giveBack(lent, 7, true);
    const leased = await acquire(origin);
    expect([origin.idleCount, origin.total]).toEqual([3, 4]);

    origin.policyChanged(policy({ maxIdle: 2, maxPerOrigin: 2 }));
    // Two closed (total 2: one leased, one idle): the kept one, then the oldest (the one a second older).
    expect(events.drops.map((drop) => drop.reason)).toEqual(['excess', 'excess']);
    expect(events.drops[1]!.ageMs).toBeGreaterThanOrEqual(1_000);
    expect([origin.idleCount, origin.total]).toEqual([1, 2]);
    // So the origin is held to two: the idle one (a shared one, not the uid's kept one) goes out, and none is left.
    held.push(origin.takeWarm(7)!);
    expect(held.at(-1)!.kept).toBeUndefined();
    expect(origin.takeWarm()).toBeUndefined();
    endLease(origin, leased);
  });

  it('keeps leases released unused beside a full shared supply, lends them to their uid first, trims only shared ones at a lowered maxIdle, and keeps none at maxIdle 0', async () => {
    const origin = pool({ maxIdle: 2, maxPerOrigin: 8 });
    origin.prewarm(2);
    await until(() => origin.idleCount === 2, 'prewarmed');
    const lent = [(await origin.acquire(1_000, 7))!, (await origin.acquire(1_000, 7))!];
    origin.prewarm(2);
    await until(() => origin.idleCount === 2, 'prewarmed again');
    // Two shared idle (maxIdle), and the uid's two leases come back unused: kept for it, none closed.
    for (const handoff of lent) origin.giveBack(handoff, 7, true);
    expect([origin.idleCount, events.reasons]).toEqual([4, []]);
    // A lowered maxIdle trims the shared supply only.
    origin.policyChanged(policy({ maxIdle: 1, maxPerOrigin: 8 }));
    expect([origin.idleCount, events.reasons]).toEqual([3, ['excess']]);
    // The uid takes its kept sockets before the shared one.
    const taken = [origin.takeWarm(7)!, origin.takeWarm(7)!, origin.takeWarm(7)!];
    held.push(...taken);
    expect(taken.map((handoff) => handoff.kept === true)).toEqual([true, true, false]);
    for (const handoff of taken) {
      held.splice(held.indexOf(handoff), 1);
      origin.giveBack(handoff, 7, true);
    }
    expect(origin.idleCount).toBe(3);
    // maxIdle 0 (an operator's, or a pool the pool manager retires): every idle socket closes, and none is kept.
    origin.policyChanged(policy({ minIdle: 0, maxIdle: 0, maxPerOrigin: 8 }));
    expect(origin.idleCount).toBe(0);
    const last = await origin.acquire(1_000, 7);
    origin.giveBack(last, 7, true);
    expect([origin.idleCount, origin.total]).toEqual([0, 0]);
  });

  it("keeps a uid's shared idle supply up while another uid holds many leases and gives them back unused", async () => {
    // A lease released unused comes back kept for its own uid: it must not lower the shared supply of a uid whose
    // leases are used (the refill's room for returns did, one share per pool).
    const maxIdle = 4;
    const origin = pool({ minIdle: maxIdle, maxIdle, maxPerOrigin: 64 });
    origin.setRefillTarget(0);
    await until(() => origin.idleCount === maxIdle, 'minIdle reached');
    const releasing = 1001;
    const using = 1002;
    const lease = async (uid: number): Promise<Handoff> => {
      const handoff = await origin.acquire(1_000, uid);
      held.push(handoff);
      return handoff;
    };
    const settled = async (what: string) => {
      await nextTurn();
      await until(() => origin.connectingCount === 0, what);
    };
    const rounds = 8;
    const warmForUsing: boolean[] = [];
    for (let round = 0; round < rounds; round++) {
      const taken: Handoff[] = [];
      for (let count = 0; count < 2 * maxIdle; count++) taken.push(await lease(releasing));
      await settled('the refills while one uid holds its leases');
      const used = await lease(using);
      warmForUsing.push(used.warm);
      native.close(used.fd);
      held.splice(held.indexOf(used), 1);
      origin.leaseEnded(using);
      for (const handoff of taken) {
        held.splice(held.indexOf(handoff), 1);
        origin.giveBack(handoff, releasing, true);
      }
      await settled('the refills after the leases came back');
    }
    // As in a pool without the releasing uid: every acquire of the other finds a shared socket.
    expect(warmForUsing, 'warm handoffs of the uid whose leases are used, per round').toEqual(Array(rounds).fill(true));
  });

  it('connects nothing for a uid that gives its leases back unused while another uid draws on the pool', async () => {
    // Sockets kept for a uid are not held to maxIdle: the releasing uid's returns always fit, it takes them again
    // before any shared socket, and the refill replaces only what the other uid draws (one connect per draw).
    const maxIdle = 4;
    const origin = pool({ minIdle: maxIdle, maxIdle, maxPerOrigin: 64 });
    origin.setRefillTarget(0);
    await until(() => origin.idleCount === maxIdle, 'minIdle reached');
    const releasing = 1001;
    const drawing = 1002;
    const out: Handoff[] = [];
    let draws = 0;
    const warmDraws: boolean[] = [];
    // Each step the releasing uid takes one more lease and gives its oldest back unused (two out at every moment);
    // every other step the drawing uid uses a lease (closed: a shared socket gone, refilled).
    const step = async (index: number) => {
      const handoff = await origin.acquire(1_000, releasing);
      held.push(handoff);
      out.push(handoff);
      if (out.length > 2) {
        const oldest = out.shift()!;
        held.splice(held.indexOf(oldest), 1);
        origin.giveBack(oldest, releasing, true);
      }
      if (index % 2 === 0) {
        const used = await origin.acquire(1_000, drawing);
        warmDraws.push(used.warm);
        native.close(used.fd);
        origin.leaseEnded(drawing);
        draws++;
      }
      // (A turn for the pump a handoff schedules: a refill it wants has started.)
      await nextTurn();
    };
    for (let index = 0; index < 20; index++) await step(index);
    await until(() => origin.connectingCount === 0, 'the refills of the first steps');
    const callsBefore = connector.calls;
    const drawsBefore = draws;
    const dropsBefore = events.drops.length;
    for (let index = 0; index < 100; index++) await step(index);
    await nextTurn();
    await until(() => origin.connectingCount === 0, 'the refills of the last steps');
    expect(
      connector.calls - callsBefore - (draws - drawsBefore),
      'connects over 100 steps of the releasing uid, less one per draw of the other uid',
    ).toBe(0);
    expect(events.reasons.slice(dropsBefore), 'sockets closed over those steps').toEqual([]);
    expect(warmDraws.every((warm) => warm)).toBe(true);
    for (const handoff of out.splice(0)) {
      held.splice(held.indexOf(handoff), 1);
      origin.giveBack(handoff, releasing, true);
    }
  });

  it('backs its refills off while every socket it connects gets bytes before any request (a proxy talking after its 200)', async () => {
    // A proxy that sends a byte after its 200 (or an origin behind it that speaks first): each tunnel it pools is
    // dropped as soon as it is watched ('data'), and the refill connected again at once, every 50 ms, for as long as
    // minIdle (or demand) asked: 200 connects in 10 s.
    connector.greeting = 'x';
    const origin = pool({ minIdle: 1 });
    origin.setRefillTarget(0);
    for (let step = 0; step < 100; step++) {
      await vi.advanceTimersByTimeAsync(100);
      origin.sweep(performance.now());
      await nextTurn();
    }
    expect(new Set(events.reasons)).toEqual(new Set(['data']));
    // Backed off as for failed connects: 500 ms, 1 s, 2 s, 4 s, ... after each such drop.
    expect(connector.calls).toBeLessThanOrEqual(6);
    // Once its sockets stay quiet, the next refill after the backoff keeps one.
    connector.greeting = undefined;
    await vi.advanceTimersByTimeAsync(30_000);
    origin.sweep(performance.now());
    await until(() => origin.idleCount === 1, 'a quiet socket kept');
    await vi.advanceTimersByTimeAsync(1_000);
    expect(origin.idleCount).toBe(1);
  });

  it('refills at once after a socket whose server wrote only after a while (a 408 at its idle timeout)', async () => {
    const origin = pool({ minIdle: 1 });
    origin.setRefillTarget(0);
    await until(() => origin.idleCount === 1, 'minIdle reached');
    await vi.advanceTimersByTimeAsync(5_000);
    connector.peers[0]!.end('HTTP/1.1 408 Request Timeout\r\n\r\n');
    await until(() => events.drops.length === 1, 'the socket with the 408 dropped');
    expect(events.reasons).toEqual(['data']);
    // Not a peer that speaks first: the next socket comes at once, no backoff.
    await until(() => origin.idleCount === 1, 'refilled');
    expect(connector.calls).toBe(2);
  });

  it('makes no background connects to an origin the policy refused until the policy changes', async () => {
    connector.refuse.add(ORIGIN.host);
    const origin = pool({ minIdle: 1 });
    origin.setRefillTarget(0);
    await until(() => events.failures.length === 1, 'the refusal');
    expect((events.failures[0] as SockpoolError).code).toBe(ErrorCodes.POLICY);
    await vi.advanceTimersByTimeAsync(60_000); // far past any backoff
    origin.sweep(performance.now());
    expect(connector.calls).toBe(1);
    connector.refuse.clear();
    origin.policyChanged(policy({ minIdle: 1 }));
    await until(() => origin.idleCount === 1, 'warm again after the policy changed');
    expect(connector.calls).toBe(2);
  });
});

describe('OriginPool recycling and dead idle sockets', () => {
  it('closes an idle socket at the recycle point', async () => {
    const origin = pool();
    origin.prewarm(1);
    await until(() => origin.idleCount === 1, 'prewarmed');
    const peer = connector.peers[0]!;
    origin.setRecycleAfter(1_000);
    await vi.advanceTimersByTimeAsync(999);
    expect(origin.idleCount).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(origin.idleCount).toBe(0);
    expect(events.reasons).toEqual(['recycled']);
    expect(events.drops[0]!.idleMs).toBe(1_000);
    await once(peer, 'close');
  });

  it('never hands out a socket idle past the recycle point, even before its timer ran', async () => {
    const origin = pool();
    origin.prewarm(1);
    await until(() => origin.idleCount === 1, 'prewarmed');
    await vi.advanceTimersByTimeAsync(100);
    origin.setRecycleAfter(100); // due now: its timer has not run yet when the acquire comes
    const handoff = await acquire(origin);
    expect(handoff.warm).toBe(false);
    expect(events.reasons).toEqual(['recycled']);
    expect(connector.calls).toBe(2);
  });

  it('recycles a socket given back unused as old as it is: its origin has seen it idle since it connected', async () => {
    const origin = pool();
    origin.setRecycleAfter(1_000);
    origin.prewarm(1);
    await until(() => origin.idleCount === 1, 'prewarmed');
    await vi.advanceTimersByTimeAsync(600);
    const lent = await acquire(origin);
    expect(lent.warm).toBe(true);
    await vi.advanceTimersByTimeAsync(300);
    origin.giveBack(lent, 0, true); // released unused by a client: nothing went over it
    held.splice(held.indexOf(lent), 1);
    await vi.advanceTimersByTimeAsync(100); // 1,000 ms after its connect, 100 ms after it came back
    expect(events.reasons).toEqual(['recycled']);
    expect(origin.idleCount).toBe(0);
  });

  it('drops idle sockets whose server closes, resets or writes to them', async () => {
    const origin = pool();
    origin.prewarm(3);
    await until(() => origin.idleCount === 3, 'prewarmed');
    await nextTurn();
    const [closing, resetting, writing] = connector.peers as [net.Socket, net.Socket, net.Socket];
    await vi.advanceTimersByTimeAsync(5_000); // long enough for the idle sockets' pollers to be armed
    closing.end();
    await until(() => events.drops.length === 1, 'the closed socket dropped');
    resetting.resetAndDestroy();
    await until(() => events.drops.length === 2, 'the reset socket dropped');
    writing.write('unexpected');
    await until(() => events.drops.length === 3, 'the socket with stray bytes dropped');
    expect(events.reasons).toEqual(['eof', 'error', 'data']);
    expect(events.drops[0]).toMatchObject({ idleMs: 5_000, ageMs: 5_000 });
    expect(origin.idleCount).toBe(0);
    expect(events.idle).toBe(0);
  });

  it('drops an idle socket ready in a way its probe cannot see (timestamps a kept copy asked for), instead of probing it at every turn', async () => {
    // A client that kept a copy of a socket it gave back turns on transmit timestamps through that copy and sends a
    // byte (Python: Node cannot set SO_TIMESTAMPING): the socket's error queue then holds an entry, an error event
    // for as long as nobody reads it with MSG_ERRQUEUE, while a peek finds nothing to read and TCP_INFO says
    // ESTABLISHED. The watch is level-triggered: a pool that took that for a spurious wakeup was called again at
    // every turn (the daemon's thread spinning) until the socket left the pool.
    const origin = pool();
    const lent = await acquire(origin);
    const copy = native.dup(lent.fd);
    giveBack(origin, lent);
    await vi.advanceTimersByTimeAsync(5_000); // long enough for the idle socket's watch to be armed
    const client = spawn(
      'python3',
      [
        '-c',
        'import socket; s = socket.socket(fileno=3); ' +
          's.setsockopt(socket.SOL_SOCKET, 37, (1 << 1) | (1 << 4) | (1 << 11)); s.send(b"G")',
      ],
      { stdio: ['ignore', 'ignore', 'inherit', copy] },
    );
    const [code] = await once(client, 'exit');
    native.close(copy);
    expect(code).toBe(0);
    await until(() => events.drops.length === 1, 'the socket dropped');
    expect(events.reasons).toEqual(['error']);
    expect(origin.idleCount).toBe(0);
  });

  it('ages out idle sockets past idleTtlMs when swept', async () => {
    const origin = pool({ idleTtlMs: 1_000 });
    origin.prewarm(1);
    await until(() => origin.idleCount === 1, 'prewarmed');
    await vi.advanceTimersByTimeAsync(999);
    origin.sweep(performance.now());
    expect(origin.idleCount).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    origin.sweep(performance.now());
    expect(origin.idleCount).toBe(0);
    expect(events.reasons).toEqual(['ttl']);
  });

  it('evicts the oldest idle socket first', async () => {
    const origin = pool();
    const older = await acquire(origin);
    const newer = await acquire(origin);
    giveBack(origin, older);
    giveBack(origin, newer);
    const olderPeer = connector.peerOf(older.fd);
    expect(origin.evictOne()).toBe(true);
    expect(events.reasons).toEqual(['evicted']);
    await once(olderPeer, 'close');
    expect((await acquire(origin)).fd).toBe(newer.fd);
    expect(origin.evictOne()).toBe(false);
  });

  it('closes a socket no client had without the linger disarm, and one kept for a uid with it, after a shutdown', async () => {
    // Seen from the server side: a linger {1, 0} set through a copy of each socket (as only a client holding one
    // could) makes a close that keeps it reset the connection (CLOSE, 7); a close that turns it off ends it with
    // a FIN (CLOSE_WAIT, 8). A socket the connector made that no client had (connectedPeer) cannot carry a linger
    // the daemon did not set, so its close skips the setsockopt; one a client had keeps the disarm.
    const origin = pool();
    const shared = await acquire(origin);
    const kept = await acquire(origin);
    expect(shared.connectedPeer).toBeDefined();
    giveBack(origin, shared);
    held.splice(held.indexOf(kept), 1);
    origin.giveBack(kept, 0, true); // released unused by a client, which may keep a copy
    const [sharedPeer, keptPeer] = [connector.peerOf(shared.fd), connector.peerOf(kept.fd)];
    await lingerZeroThroughCopy(shared.fd);
    await lingerZeroThroughCopy(kept.fd);
    expect(origin.evictOne()).toBe(true); // the oldest: the shared one
    expect(stateAfterClose(sharedPeer)).toBe(7);
    expect(origin.evictOne()).toBe(true);
    expect(stateAfterClose(keptPeer)).toBe(8);
    expect(events.reasons).toEqual(['evicted', 'evicted']);
  });

  it("a socket a client had goes out again without the connector's peer (connectedPeer): its next mark reads it", async () => {
    const origin = pool();
    const handoff = await acquire(origin);
    held.splice(held.indexOf(handoff), 1);
    origin.giveBack(handoff, 0, true);
    const again = await acquire(origin);
    expect(again).toMatchObject({ fd: handoff.fd, warm: true, kept: true });
    expect(again.connectedPeer).toBeUndefined();
  });

  it('says a socket was adopted only when it kept or lent it, not when it closed it at once past maxIdle', async () => {
    const origin = pool();
    origin.prewarm(2);
    await until(() => origin.idleCount === 2, 'prewarmed');
    const [first, second] = origin.detachIdle() as [ConnectedSocket, ConnectedSocket];
    const successor = pool({ maxIdle: 1 });
    expect([successor.adopt(first), successor.adopt(second)]).toEqual([true, false]);
    expect(successor.idleCount).toBe(1);
    expect(events.reasons).toEqual(['excess']);
  });

  it('detaches its idle sockets for the fd store, and a new pool adopts the live ones', async () => {
    const origin = pool();
    origin.prewarm(2);
    await until(() => origin.idleCount === 2, 'prewarmed');
    const detached = origin.detachIdle();
    expect(detached).toHaveLength(2);
    expect(origin.idleCount).toBe(0);
    expect(events.idle).toBe(0);
    const [live, dead] = detached as [(typeof detached)[0], (typeof detached)[0]];
    const deadPeer = connector.peerOf(dead.fd);
    deadPeer.end();
    await waitForEvents(dead.fd, native.READABLE);

    const successor = pool();
    expect(successor.adopt(live)).toBe(true);
    expect(successor.adopt(dead)).toBe(false); // closed by adopt
    await once(deadPeer, 'close');
    expect(successor.idleCount).toBe(1);
    const handoff = await acquire(successor);
    expect(handoff).toMatchObject({ fd: live.fd, warm: true });
  });
});
