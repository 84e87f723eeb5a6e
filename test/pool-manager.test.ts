// PoolManager in-process (daemon/pool-manager.ts): the warming policy and what it learns, over origin pools whose
// connects are real loopback connections from a fake connector, with fake timers moving the manager's clock
// (performance.now) and its sweep. Covered: the predictive idle target (demand rate × connect time), minIdle, the
// global idle cap and its share-out by demand, learning an origin's idle lifetime from peer closes (the shorter
// observation wins, a floor, a server restart is not learned) and recycling before it, retiring unused pools,
// refused prewarms, warm-on-start from the store's history (within warmOnStartSockets), reconfiguration (idle
// sockets a reloaded policy refuses are closed) and close. No fd is left behind.
import { mkdtempSync, rmSync } from 'node:fs';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { parseConfig, type SockpoolConfigInput } from '../daemon/config.js';
import { LocalSlots, slotKeeper } from '../daemon/fleet/slots.js';
import { LeaseTable, returnedSocket } from '../daemon/leases.js';
import { createMetrics, type MetricsSnapshot } from '../daemon/metrics.js';
import type { Handoff } from '../daemon/origin-pool.js';
import { PoolManager } from '../daemon/pool-manager.js';
import { StateStore } from '../daemon/store.js';
import type { TlsRelays } from '../daemon/tls-relay.js';
import { SYSTEM_TRUST, TlsSessions } from '../daemon/tls-sessions.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import type { Origin } from '../shared/origin.js';
import { nextTurn, until, useFakeClock } from './fixtures/fake-clock.js';
import { FakeConnector } from './fixtures/fake-connector.js';
import { fdCount } from './fixtures/native-helpers.js';
import { createTestPki } from './helpers/tls.js';

const BUSY: Origin = { host: 'busy.test', port: 443 };
const QUIET: Origin = { host: 'quiet.test', port: 443 };
const SWEEP_MS = 500;

let connector: FakeConnector;
let managers: PoolManager[];
let held: Array<Handoff & { originKey: string }>;
let fdsBefore: number;
const cleanups: Array<() => void | Promise<void>> = [];

beforeEach(async () => {
  fdsBefore = fdCount();
  connector = await FakeConnector.start();
  managers = [];
  held = [];
  useFakeClock();
});

afterEach(async () => {
  vi.useRealTimers();
  for (const manager of managers) manager.close(false);
  for (const handoff of held.splice(0)) native.close(handoff.fd);
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  await connector.close();
  expect(fdCount()).toBe(fdsBefore);
});

/** Closes a store (again: idempotent) and waits for its thread, which holds fds until it has ended. */
async function closeStore(store: StateStore): Promise<void> {
  store.close();
  await store.threadEnded();
}

function manager(pool: NonNullable<SockpoolConfigInput['pool']> = {}, store?: StateStore): PoolManager {
  const created = new PoolManager({
    config: parseConfig({ pool }, 'test'),
    connector,
    log: pino({ level: 'silent' }),
    ...(store ? { store } : {}),
  });
  managers.push(created);
  return created;
}

function originStats(from: PoolManager, origin: Origin) {
  const stats = from.snapshot().origins.find((entry) => entry.origin === `${origin.host}:${origin.port}`);
  if (!stats) throw new Error(`no pool for ${origin.host}`);
  return stats;
}

const idleOf = (from: PoolManager, origin: Origin) => originStats(from, origin).idle;

/** `count` acquires whose leases end at once (curl used and closed each socket): demand without idle sockets. */
async function demand(from: PoolManager, origin: Origin, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const handoff = await from.acquire(origin, 1_000);
    native.close(handoff.fd);
    from.leaseEnded(handoff.originKey);
  }
}

/**
 * A manager of `config` on the fake connector whose warm TLS sessions come from a relay that "handshakes" at once (a
 * session's fd is the TCP socket's); closed after the test.
 */
function withInstantRelays(config: ReturnType<typeof parseConfig>): PoolManager {
  const relays = {
    open: async (fd: number) => ({ fd, handshakeMs: 1, info: { protocol: 'TLSv1.3' }, relayThread: 1 }),
  } as unknown as TlsRelays;
  const pools = new PoolManager({
    config,
    connector,
    log: pino({ level: 'silent' }),
    tls: new TlsSessions(config, connector, relays),
  });
  managers.push(pools);
  return pools;
}

describe('PoolManager warming', () => {
  it('keeps the predicted number of sockets idle: ⌈rate × connect time × 2⌉ + 1 while there is demand', async () => {
    connector.connectMs = 1_000;
    const pools = manager({ predictiveWindowMs: 10_000 });
    pools.start();
    // 10 acquires in a moment, over a 10 s window: 1 acquire/s; one connect takes 1 s.
    await demand(pools, BUSY, 10);
    expect(idleOf(pools, BUSY)).toBe(0);
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    // The rate decayed to 0.95/s by the sweep: ⌈0.95 × 1 × 2⌉ + 1 = 3.
    await until(() => idleOf(pools, BUSY) === 3, 'three sockets warmed');
    expect(connector.calls).toBe(13);
    expect(originStats(pools, BUSY)).toMatchObject({ misses: 10, hits: 0, connectMs: 1_000 });

    // The warmed sockets are handed out warm.
    const handoff = await pools.acquire(BUSY, 1_000);
    held.push(handoff);
    expect(handoff.warm).toBe(true);
    expect(originStats(pools, BUSY).hits).toBe(1);
  });

  it("counts a client's prewarm as demand, as that many acquires, and an admin's warm not", async () => {
    connector.connectMs = 1_000;
    const pools = manager({ predictiveWindowMs: 10_000 });
    pools.start();
    // uid 1000 announces one socket's worth of demand; an admin warms QUIET (a one-shot, not demand).
    pools.prewarm(BUSY, 1, undefined, 1000);
    pools.warm(QUIET, 1);
    expect(originStats(pools, BUSY).demandRatePerS).toBeCloseTo(0.1, 3);
    expect(originStats(pools, QUIET).demandRatePerS).toBe(0);
    expect([...(pools.usersOf(`${BUSY.host}:${BUSY.port}`) ?? [])]).toEqual([1000]);
    expect([...(pools.usersOf(`${QUIET.host}:${QUIET.port}`) ?? [])]).toEqual([0]);
    await until(() => pools.snapshot().idle === 2, 'both prewarms arrived');
    // The announced demand is served by its own connect: the sweeps add nothing to it (the old predicted target,
    // ⌈0.095 × 1 × 2⌉ + 1 = 2, opened a second socket nobody had asked for), nor to the admin's.
    for (let sweep = 0; sweep < 3; sweep++) await vi.advanceTimersByTimeAsync(SWEEP_MS);
    await nextTurn();
    expect(pools.snapshot()).toMatchObject({ idle: 2, connecting: 0 });
    expect(connector.calls).toBe(2);
  });

  it('keeps nothing warm for announced demand once met, nor for one unannounced acquire; repeated ones are followed', async () => {
    const pools = manager({ predictiveWindowMs: 10_000 });
    pools.start();
    const sweeps = async (count: number) => {
      for (let sweep = 0; sweep < count; sweep++) await vi.advanceTimersByTimeAsync(SWEEP_MS);
      await nextTurn();
    };
    // A client's queue announces four requests to BUSY, and four acquires take the four sockets (curl keeps them).
    pools.prewarm(BUSY, 4, undefined, 1000, true);
    await until(() => idleOf(pools, BUSY) === 4, 'the announced sockets');
    for (let i = 0; i < 4; i++) {
      const handoff = await pools.acquire(BUSY, 1_000, undefined, 1000);
      expect(handoff.warm).toBe(true);
      held.push(handoff);
    }
    // QUIET: one acquire nobody announced.
    held.push(await pools.acquire(QUIET, 1_000));
    await sweeps(3);
    // Nothing refilled: BUSY's demand was announced and met, QUIET's did not repeat.
    expect(pools.snapshot()).toMatchObject({ idle: 0, connecting: 0 });
    expect(connector.calls).toBe(5);
    expect(pools.warming()).toMatchObject({
      opened: { lookahead: 4, acquire: 1, refill: 0 },
      lent: { lookahead: 4, acquire: 1 },
    });
    // Two more unannounced acquires of QUIET, soon after: its demand repeats, and one socket is kept warm for it.
    held.push(await pools.acquire(QUIET, 1_000));
    held.push(await pools.acquire(QUIET, 1_000));
    await sweeps(1);
    await until(() => idleOf(pools, QUIET) === 1 && pools.snapshot().connecting === 0, 'QUIET kept warm');
    expect(idleOf(pools, BUSY)).toBe(0);
    expect(connector.calls).toBe(8);
    expect(pools.warming().opened.refill).toBe(1);
  });

  it('counts the sockets closed without ever having been lent, by what opened them', async () => {
    const pools = manager({ defaults: { maxIdle: 2 } });
    pools.start();
    pools.prewarm(BUSY, 2, undefined, 1000);
    pools.warm(QUIET, 1);
    await until(() => pools.snapshot().idle === 3, 'warmed');
    const handoff = await pools.acquire(BUSY, 1_000);
    expect(handoff.warm).toBe(true);
    held.push(handoff);
    const rows = (from: PoolManager) => from.snapshot().origins.map((row) => [row.origin, row.warmed, row.warmedLent]);
    expect(rows(pools)).toEqual([
      ['busy.test:443', 2, 1],
      ['quiet.test:443', 1, 0],
    ]);
    // The pools close (a daemon stopping): the two sockets never lent are counted, by purpose.
    pools.close(false);
    expect(pools.warming()).toMatchObject({
      opened: { prewarm: 2, warm: 1 },
      lent: { prewarm: 1, warm: 0 },
      neverLent: { prewarm: 1, warm: 1 },
    });
  });

  it('warms nothing ahead of demand when predictive warming is off, and minIdle regardless', async () => {
    const pools = manager({ predictive: false, defaults: { minIdle: 2 } });
    pools.start();
    await demand(pools, BUSY, 10);
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    await until(() => idleOf(pools, BUSY) === 2, 'minIdle warmed');
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    expect(connector.calls).toBe(12);
  });

  it('prewarms the number asked for, bounded by maxIdle, and later sweeps open nothing more', async () => {
    const pools = manager({ defaults: { minIdle: 0, maxIdle: 6 } });
    pools.start();
    pools.prewarm(BUSY, 4);
    await until(() => idleOf(pools, BUSY) === 4, 'four prewarmed');
    await vi.advanceTimersByTimeAsync(10 * SWEEP_MS);
    expect(connector.calls).toBe(4);
    expect(idleOf(pools, BUSY)).toBe(4);
    pools.prewarm(BUSY, 20);
    await until(() => idleOf(pools, BUSY) === 6, 'maxIdle prewarmed');
    await vi.advanceTimersByTimeAsync(10 * SWEEP_MS);
    expect(connector.calls).toBe(6);
    expect(originStats(pools, BUSY)).toMatchObject({ idle: 6, connecting: 0, hits: 0, misses: 0 });
  });

  it('starts a burst of prewarms 16 connects per turn of the event loop; an acquire meanwhile connects at once', async () => {
    const pools = manager({ defaults: { minIdle: 0, maxIdle: 16 } });
    pools.start();
    const burst = Array.from({ length: 10 }, (_, i): Origin => ({ host: `burst${i}.test`, port: 443 }));
    // (What a client's queue announcing many origins at once sends.)
    for (const origin of burst) pools.prewarm(origin, 4);
    expect(connector.calls).toBe(16);
    // The daemon's thread is free for whatever came meanwhile: an acquire's connect does not wait for the burst.
    const acquired = pools.acquire(QUIET, 1_000);
    expect(connector.calls).toBe(17);
    await nextTurn();
    expect(connector.calls).toBe(33);
    await until(() => burst.every((origin) => idleOf(pools, origin) === 4), 'every prewarmed socket idle');
    expect(connector.calls).toBe(41);
    held.push(await acquired);
  });

  it('starts one large prewarm 16 connects per turn too (a single entry is split across turns)', async () => {
    const pools = manager({ defaults: { minIdle: 0, maxIdle: 64, maxPerOrigin: 64 } });
    pools.start();
    pools.prewarm(BUSY, 40);
    expect(connector.calls).toBe(16);
    await nextTurn();
    expect(connector.calls).toBe(32);
    await nextTurn();
    expect(connector.calls).toBe(40);
    await until(() => idleOf(pools, BUSY) === 40, 'every prewarmed socket idle');
    expect(connector.calls).toBe(40);
  });

  it('starts one large prewarm once: connects that fail at once are not started again turn after turn', async () => {
    const pools = manager({ defaults: { minIdle: 0, maxIdle: 64, maxPerOrigin: 64 } });
    pools.start();
    // An origin whose connects fail before the next turn (a cached NXDOMAIN, a port that refuses on loopback).
    for (let i = 0; i < 200; i++) connector.failures.push(new SockpoolError(ErrorCodes.CONNECT, 'refused'));
    pools.prewarm(BUSY, 40);
    for (let turn = 0; turn < 8; turn++) await nextTurn();
    // The prewarm asked for 40: it starts 40 connects in all, over turns, and not a single one more.
    expect(connector.calls).toBe(40);
    connector.failures.splice(0);
  });

  it('evicts from the least-wanted origin when idle sockets exceed the global cap', async () => {
    const pools = manager({ maxIdleTotal: 3 });
    await demand(pools, BUSY, 5);
    pools.prewarm(QUIET, 2);
    pools.prewarm(BUSY, 1);
    await until(() => connector.calls === 8 && pools.snapshot().idle === 3, 'the prewarms arrived');
    // Two leases of the busy origin (its idle socket and a new connect) come back unused: four idle sockets for a
    // cap of three, and the one evicted is the quiet origin's (no demand per idle socket), whichever came last.
    const leases = [await pools.acquire(BUSY, 1_000), await pools.acquire(BUSY, 1_000)];
    for (const lease of leases) pools.giveBack(lease.originKey, lease);
    expect(connector.calls).toBe(9);
    expect(idleOf(pools, BUSY)).toBe(2);
    expect(idleOf(pools, QUIET)).toBe(1);
    expect(pools.snapshot().idle).toBe(3);
  });

  it("cuts a prewarm to the global idle cap's room: what is idle, connecting and queued everywhere counts", async () => {
    const pools = manager({ maxIdleTotal: 5 });
    pools.start();
    // Both in one turn: the first's connects are under way or queued when the second asks. The second, as much in
    // demand, gets its part of the cap (half, rounded down), not the whole rest of it.
    const granted = [pools.prewarm(QUIET, 4), pools.prewarm(BUSY, 4)];
    await until(() => connector.calls >= 6 && pools.snapshot().connecting === 0, 'the prewarms arrived');
    for (let turn = 0; turn < 4; turn++) await nextTurn();
    expect(connector.calls).toBe(6);
    expect(granted).toEqual([4, 2]);
    expect(pools.snapshot().idle).toBe(5);
    // Full, each origin at its part: nothing more is connected, for a prewarm or an admin's warm.
    expect(pools.prewarm(BUSY, 4)).toBe(0);
    expect(pools.warm(QUIET, 4)).toEqual({ warming: 'tcp', granted: 0 });
    for (let turn = 0; turn < 4; turn++) await nextTurn();
    expect(connector.calls).toBe(6);
    expect(pools.snapshot().idle).toBe(5);
  });

  it('grants a second prewarm of an origin in one turn only what the first, still queued, leaves', async () => {
    const pools = manager({ defaults: { minIdle: 0, maxIdle: 16, maxPerOrigin: 16 } });
    pools.start();
    const charged: number[] = [];
    const take = (room: number) => {
      charged.push(room);
      return room;
    };
    // The busy origin's 16 take this turn's connects (PREWARM_CONNECTS_PER_TURN): the quiet origin's prewarms queue.
    expect(pools.prewarm(BUSY, 16, undefined, 1, false, take)).toBe(16);
    // Two clients announce the quiet origin in the same turn: 6 asked, then 10 (16 in all, its maxIdle).
    expect(pools.prewarm(QUIET, 6, undefined, 1, false, take)).toBe(6);
    expect(pools.prewarm(QUIET, 10, undefined, 2, false, take)).toBe(4);
    expect(pools.prewarm(QUIET, 4, undefined, 2, false, take)).toBe(0);
    expect(charged).toEqual([16, 6, 4]);
    await until(() => idleOf(pools, QUIET) === 10 && pools.snapshot().connecting === 0, 'the quiet prewarms arrived');
    for (let turn = 0; turn < 4; turn++) await nextTurn();
    expect(connector.calls).toBe(26);
  });

  it('keeps a pool whose warm is still queued through a sweep that retires unused pools', async () => {
    const pools = manager({ defaults: { minIdle: 0, maxIdle: 16, maxPerOrigin: 16 } });
    pools.start();
    // The busy origin's 16 take this turn's connects: the admin's warm of the quiet origin (no demand counted, so
    // its pool looks unused) waits for the next turn, and a sweep comes first.
    expect(pools.prewarm(BUSY, 16)).toBe(16);
    expect(pools.warm(QUIET, 4)).toEqual({ warming: 'tcp', granted: 4 });
    vi.advanceTimersByTime(SWEEP_MS);
    for (let turn = 0; turn < 4; turn++) await nextTurn();
    await until(() => pools.snapshot().connecting === 0, 'the connects done');
    expect(connector.calls).toBe(20);
    expect(idleOf(pools, QUIET)).toBe(4);
  });

  it("lets a prewarm at a full cap take its origin's part of it by demand, not first come", async () => {
    const pools = manager({ maxIdleTotal: 5, predictiveWindowMs: 10_000 });
    pools.start();
    // The cap full: two of the quiet origin's (demand 0.2/s), three of the busy one's (0.3/s).
    expect([pools.prewarm(QUIET, 2), pools.prewarm(BUSY, 3)]).toEqual([2, 3]);
    await until(() => connector.calls === 5 && pools.snapshot().idle === 5, 'the cap full');
    // Ten asked for the busy origin (seven more): 1.0/s of 1.2 with them, its part of 5 is 4 (the cap's eviction keeps
    // it so), one more than it has.
    expect(pools.prewarm(BUSY, 10)).toBe(1);
    await until(() => connector.calls === 6 && pools.snapshot().connecting === 0, 'the busy prewarm arrived');
    for (let turn = 0; turn < 4; turn++) await nextTurn();
    expect([idleOf(pools, BUSY), idleOf(pools, QUIET)]).toEqual([4, 1]);
    expect(connector.calls).toBe(6);
  });

  it('shares the global idle budget out by demand, the busiest origin first', async () => {
    connector.connectMs = 1_000;
    const pools = manager({ maxIdleTotal: 4, predictiveWindowMs: 10_000 });
    pools.start();
    // Predicted: quiet ⌈0.285 × 1 × 2⌉ + 1 = 2, busy ⌈0.95 × 1 × 2⌉ + 1 = 3; the quiet pool was created first.
    await demand(pools, QUIET, 3);
    await demand(pools, BUSY, 10);
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    await until(() => pools.snapshot().idle === 4 && pools.snapshot().connecting === 0, 'the budget warmed');
    expect(idleOf(pools, BUSY)).toBe(3);
    expect(idleOf(pools, QUIET)).toBe(1);
  });

  it('connects no refill that a full global idle cap would evict: a minIdle origin waits for room', async () => {
    const KEPT: Origin = { host: 'keep.test', port: 443 };
    const pools = manager({ maxIdleTotal: 4, origins: [{ match: 'keep.test:443', minIdle: 2 }] });
    pools.start();
    expect(pools.warm(KEPT, 2).granted).toBe(2);
    await until(() => idleOf(pools, KEPT) === 2, 'the minIdle origin warm');
    // A client prewarms the whole cap for another origin: its demand takes the cap, the minIdle origin's sockets
    // (no demand) are evicted.
    expect(pools.prewarm(BUSY, 4, undefined, 1000)).toBe(4);
    await until(() => idleOf(pools, BUSY) === 4 && pools.snapshot().connecting === 0, 'the prewarm arrived');
    expect(idleOf(pools, KEPT)).toBe(0);
    const calls = connector.calls;
    // Ten seconds of sweeps: the minIdle origin's refill would be evicted on arrival, so none is connected.
    await vi.advanceTimersByTimeAsync(20 * SWEEP_MS);
    await nextTurn();
    expect(connector.calls).toBe(calls);
    expect(pools.snapshot().idle).toBe(4);
    // Once the prewarmed sockets age out (idleTtlMs), there is room: minIdle is refilled.
    await vi.advanceTimersByTimeAsync(60_000);
    await until(() => idleOf(pools, KEPT) === 2 && pools.snapshot().connecting === 0, 'minIdle refilled');
    expect(connector.calls).toBe(calls + 2);
  });

  it("refills an origin at a full cap up to its part of it by demand, evicting others' prewarmed sockets, then stops", async () => {
    connector.connectMs = 1_000;
    const pools = manager({ maxIdleTotal: 4, predictiveWindowMs: 10_000 });
    pools.start();
    // The cap full of the quiet origin's prewarmed sockets (0.4/s of announced demand: no refill target).
    expect(pools.prewarm(QUIET, 4, undefined, 1000)).toBe(4);
    await until(() => idleOf(pools, QUIET) === 4 && pools.snapshot().connecting === 0, 'the cap full');
    // The busy origin's acquires (1.0/s, unannounced) predict 3 idle; its part of the cap is ⌊4 × 1.0 / 1.4⌋ = 2.
    await demand(pools, BUSY, 10);
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    await until(() => idleOf(pools, BUSY) === 2 && pools.snapshot().connecting === 0, 'the busy refill');
    const calls = connector.calls;
    await vi.advanceTimersByTimeAsync(10 * SWEEP_MS);
    await nextTurn();
    expect([idleOf(pools, BUSY), idleOf(pools, QUIET)]).toEqual([2, 2]);
    expect(connector.calls).toBe(calls);
  });

  it('makes no pool for a prewarm granted 0 at a full cap, and its share of the cap costs no walk over the pools', async () => {
    const pools = manager({ maxIdleTotal: 1 });
    expect(pools.prewarm(BUSY, 1, undefined, 1000)).toBe(1);
    await until(() => pools.snapshot().idle === 1, 'the cap full');
    // 200 origins with demand (an acquire each) and nothing idle.
    for (let i = 0; i < 200; i++) await demand(pools, { host: `o${i}.test`, port: 443 }, 1);
    expect(pools.snapshot().originCount).toBe(201);
    const calls = connector.calls;
    // The decayed demand rates read (one Math.exp each) by 100 prewarms of new origins, all granted 0.
    const exp = vi.spyOn(Math, 'exp');
    for (let i = 0; i < 100; i++) expect(pools.prewarm({ host: `p${i}.test`, port: 443 }, 1, undefined, 1000)).toBe(0);
    const rateReads = exp.mock.calls.length;
    exp.mockRestore();
    // Before: each made a pool (uncharged, with stats) and read the rate of every pool there was, 200 and more.
    expect(pools.snapshot().originCount).toBe(201);
    expect(rateReads).toBeLessThanOrEqual(100 * 4);
    expect(connector.calls).toBe(calls);
  });

  it('retires a pool with nothing in it once its demand has decayed, and refuses prewarms the policy refuses', async () => {
    // (Predictive warming off: with it, the demand would keep a socket warm, and the pool alive, until its TTL.)
    const pools = manager({ predictive: false, predictiveWindowMs: 10_000 });
    pools.start();
    await demand(pools, BUSY, 1);
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    expect(pools.snapshot().originCount).toBe(1);
    // 0.1/s decays below 0.001/s after 10 s × ln(100) ≈ 46 s.
    await vi.advanceTimersByTimeAsync(45_000);
    expect(pools.snapshot().originCount).toBe(1);
    await vi.advanceTimersByTimeAsync(2_000);
    expect(pools.snapshot().originCount).toBe(0);

    connector.refuse.add(QUIET.host);
    expect(() => pools.prewarm(QUIET, 3)).toThrow(expect.objectContaining({ code: ErrorCodes.POLICY }));
    expect(pools.snapshot().originCount).toBe(0);
    expect(connector.calls).toBe(1);
  });
});

describe('PoolManager sweep', () => {
  it('runs only while there are pools: no timer before the first one, none once the last is retired', async () => {
    const pools = manager({ predictive: false, predictiveWindowMs: 10_000 });
    const timersBefore = vi.getTimerCount();
    pools.start();
    await vi.advanceTimersByTimeAsync(SWEEP_MS * 3);
    expect(vi.getTimerCount()).toBe(timersBefore);
    await demand(pools, BUSY, 1);
    expect(vi.getTimerCount()).toBeGreaterThan(timersBefore);
    await vi.advanceTimersByTimeAsync(47_000);
    expect(pools.snapshot().originCount).toBe(0);
    expect(vi.getTimerCount()).toBe(timersBefore);
    // A new pool arms it again: its demand is swept (and decays, and retires it) as before.
    await demand(pools, QUIET, 1);
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    expect(pools.snapshot().originCount).toBe(1);
    await vi.advanceTimersByTimeAsync(47_000);
    expect(pools.snapshot().originCount).toBe(0);
  });
});

describe('PoolManager learned idle lifetime', () => {
  it('learns from a peer close and recycles the other idle sockets at 80% of it', async () => {
    const pools = manager();
    pools.start();
    pools.warm(BUSY, 2);
    await until(() => idleOf(pools, BUSY) === 2, 'prewarmed');
    await vi.advanceTimersByTimeAsync(3_000);
    connector.peers[0]!.end(); // the server drops a connection silent for 3 s
    await until(() => originStats(pools, BUSY).learnedIdleLifetimeMs !== null, 'the lifetime learned');
    expect(originStats(pools, BUSY).learnedIdleLifetimeMs).toBe(3_000);
    // The other socket has been idle 3 s, past 80% of that (2.4 s): recycled.
    await vi.advanceTimersByTimeAsync(0);
    expect(idleOf(pools, BUSY)).toBe(0);

    // A socket warmed now is recycled at 2.4 s of idleness, before the server would close it.
    pools.warm(BUSY, 1);
    await until(() => idleOf(pools, BUSY) === 1, 'warmed again');
    const peer = connector.peers[2]!;
    await vi.advanceTimersByTimeAsync(2_399);
    expect(idleOf(pools, BUSY)).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(idleOf(pools, BUSY)).toBe(0);
    await until(() => peer.destroyed, 'the recycled socket closed');
  });

  it('lets a shorter observation win at once, never below the floor', async () => {
    const pools = manager();
    pools.prewarm(BUSY, 1);
    await until(() => idleOf(pools, BUSY) === 1, 'prewarmed');
    await vi.advanceTimersByTimeAsync(3_000);
    connector.peers[0]!.end();
    await until(() => originStats(pools, BUSY).learnedIdleLifetimeMs === 3_000, 'learned 3 s');

    pools.prewarm(BUSY, 1);
    await until(() => idleOf(pools, BUSY) === 1, 'warmed again');
    await vi.advanceTimersByTimeAsync(1_000);
    connector.peers[1]!.end();
    await until(() => originStats(pools, BUSY).learnedIdleLifetimeMs === 1_000, 'learned 1 s');

    pools.prewarm(BUSY, 1);
    await until(() => idleOf(pools, BUSY) === 1, 'warmed once more');
    await vi.advanceTimersByTimeAsync(100); // (past the restart window: closes 50 ms apart are a restart)
    connector.peers[2]!.end(); // one odd early close: the estimate does not go below 250 ms
    await until(() => originStats(pools, BUSY).learnedIdleLifetimeMs === 250, 'the floor');
  });

  it('does not learn from sockets of different ages closing together (a server restart)', async () => {
    const pools = manager();
    pools.prewarm(BUSY, 1);
    await until(() => idleOf(pools, BUSY) === 1, 'the first socket');
    await vi.advanceTimersByTimeAsync(1_000);
    pools.prewarm(BUSY, 2);
    await until(() => idleOf(pools, BUSY) === 2, 'the second socket');
    await vi.advanceTimersByTimeAsync(2_000);
    // Ages 3 s and 2 s, closed within the same moment: the first close is learned, the second is a restart.
    connector.peers[0]!.end();
    await until(() => originStats(pools, BUSY).learnedIdleLifetimeMs === 3_000, 'the first close learned');
    connector.peers[1]!.end();
    await until(() => idleOf(pools, BUSY) === 0, 'the second socket dropped');
    expect(originStats(pools, BUSY).learnedIdleLifetimeMs).toBe(3_000);
  });
});

describe('PoolManager with its store and configuration', () => {
  it('warms the origins the store ranks first, with their learned idle lifetime, skipping refused ones', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-pool-manager-'));
    const store = StateStore.open(dir, { now: () => 1_000_000 });
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    cleanups.push(() => closeStore(store));
    store.recordAcquire('busy.test:443', { hit: false });
    store.recordAcquire('busy.test:443', { hit: false });
    store.recordIdleLifetime('busy.test:443', 4_000);
    store.recordAcquire('quiet.test:443', { hit: false });
    await store.flush();
    connector.refuse.add(QUIET.host);

    const pools = manager({ defaults: { minIdle: 2 } }, store);
    expect(await pools.warmFromHistory(10)).toBe(1);
    await until(() => idleOf(pools, BUSY) === 2, 'warmed from history');
    expect(originStats(pools, BUSY).learnedIdleLifetimeMs).toBe(4_000);
    expect(pools.snapshot().originCount).toBe(1);
  });

  it('warms proxied origins of its history through their proxy, where the configuration still names it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-pool-manager-'));
    const store = StateStore.open(dir, { now: () => 1_000_000 });
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    cleanups.push(() => closeStore(store));
    store.recordAcquire('busy.test:443 via corp', { hit: false });
    store.recordAcquire('busy.test:443 via corp', { hit: false });
    store.recordAcquire('quiet.test:443 via gone', { hit: false });
    await store.flush();
    connector.proxies = new Set(['corp']);
    const pools = new PoolManager({
      config: parseConfig(
        { pool: { defaults: { minIdle: 1 } }, proxies: [{ name: 'corp', url: 'http://127.0.0.1:3128' }] },
        'test',
      ),
      connector,
      log: pino({ level: 'silent' }),
      store,
    });
    managers.push(pools);
    // Its key names the proxy: the pool warmed is the one an acquire through `corp` takes (not the direct one).
    expect(await pools.warmFromHistory(10)).toBe(1);
    await until(() => pools.snapshot().idle === 1, 'warmed from history');
    expect(pools.snapshot().origins.map((row) => [row.origin, row.idle])).toEqual([['busy.test:443 via corp', 1]]);
  });

  it('takes a proxy named "tls" for a proxy, not for a warm TLS pool: its warm says tcp, its history warms through it', async () => {
    // A warm TLS pool's key ends with " tls"; a proxied origin's with " via NAME", so a proxy named "tls" ends the
    // same. TLS is never relayed through a proxy: such a key is the proxy's.
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-pool-manager-'));
    const store = StateStore.open(dir, { now: () => 1_000_000 });
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    cleanups.push(() => closeStore(store));
    store.recordAcquire('busy.test:443 via tls', { hit: false });
    store.recordAcquire('busy.test:443 via tls', { hit: false });
    await store.flush();
    connector.proxies = new Set(['tls']);
    const config = parseConfig({ proxies: [{ name: 'tls', url: 'http://127.0.0.1:3128' }] }, 'test');
    const pools = new PoolManager({ config, connector, log: pino({ level: 'silent' }), store });
    managers.push(pools);
    expect(await pools.warmFromHistory(10)).toBe(1);
    await until(() => pools.snapshot().idle === 1, 'warmed from history');
    expect(pools.snapshot().origins.map((row) => [row.origin, row.idle])).toEqual([['busy.test:443 via tls', 1]]);
    expect(pools.warm({ host: 'quiet.test', port: 443, proxy: 'tls' }, 1).warming).toBe('tcp');
    await until(() => pools.snapshot().idle === 2, 'warmed');
  });

  it('warms from history within warmOnStartSockets: the replayed demand rates ask for that many sockets in all', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-pool-manager-'));
    // A 1 ms rate window: each acquire adds 1000/s to the stored rate (a busy origin without 10,000 acquires here).
    const store = StateStore.open(dir, { now: () => 1_000_000, demandRateWindowMs: 1 });
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    cleanups.push(() => closeStore(store));
    // One uid's busy origins: each replayed rate alone asks for maxIdle (16) sockets (rate × 10 ms × 2 + a spare).
    for (let origin = 0; origin < 5; origin++) {
      for (let acquire = 0; acquire < 10 - origin; acquire++) {
        store.recordAcquire(`busy${origin}.test:443`, { hit: false });
      }
      store.recordConnect(`busy${origin}.test:443`, 10);
    }
    await store.flush();

    const pools = manager({ warmOnStartSockets: 10 }, store);
    pools.start();
    expect(await pools.warmFromHistory(10)).toBe(5);
    // Each origin its first socket; the busiest takes the 10 the budget has (it wants 15 more): 15 in all, where
    // the replayed rates opened 5 × 16 = 80.
    for (let sweep = 0; sweep < 4; sweep++) {
      await vi.advanceTimersByTimeAsync(SWEEP_MS);
      await until(() => pools.snapshot().idle >= Math.min(15, connector.calls), 'the connects of this sweep');
    }
    expect(connector.calls).toBe(15);
    await until(() => pools.snapshot().idle === 15, 'warmed from history');
    expect(idleOf(pools, { host: 'busy0.test', port: 443 })).toBe(11);
  });

  it("keeps another uid's origin in history past one uid's acquires to ever more origins, and warms it at the next start", async () => {
    // One uid's acquires to historyMaxOrigins origins that connect (a wildcard domain) pushed every other uid's
    // history out, and its busiest origins took every place warm-on-start had.
    const A = 1000;
    const B = 1001;
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-pool-manager-'));
    // A wall clock that moves a second at each reading: each acquire is seen after the one before.
    let clock = 1_000_000;
    const tick = () => {
      clock += 1000;
      return clock;
    };
    const store = StateStore.open(dir, { now: tick, maxOrigins: 6 });
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    cleanups.push(() => closeStore(store));
    const before = manager({}, store);
    const acquireAs = async (origin: Origin, uid: number) => {
      const handoff = await before.acquire(origin, 1_000, undefined, uid);
      native.close(handoff.fd);
      before.leaseEnded(handoff.originKey, uid);
    };
    for (let index = 0; index < 3; index++) await acquireAs(QUIET, B);
    for (let origin = 0; origin < 20; origin++) {
      for (let index = 0; index < 5; index++) await acquireAs({ host: `a${origin}.test`, port: 443 }, A);
      if (origin % 5 === 4) await store.flush();
    }
    before.close(false);
    expect(store.originCount).toBe(6);
    expect(store.origin('quiet.test:443')?.acquires).toBe(3);

    // The next start: two places for warm-on-start, one for each uid's busiest.
    const after = manager({}, store);
    expect(await after.warmFromHistory(2)).toBe(2);
    await until(() => after.snapshot().idle === 2, 'warmed from history');
    expect(idleOf(after, QUIET)).toBe(1);
    expect(idleOf(after, { host: 'a19.test', port: 443 })).toBe(1);
  });

  it('warms the fleet’s busiest origins at start within what warmOnStartSockets leaves', async () => {
    // Found in review: a fleet member's start gave each of the fleet's busiest origins its share of the fleet's rate
    // with no such budget, each share alone asking for maxIdle (16) sockets: 5 × 16 = 80 connects at start.
    const pools = manager({ warmOnStartSockets: 10 });
    pools.start();
    const fleet = Array.from({ length: 5 }, (_, n) => ({ host: `fleet${n}.test`, port: 443, ratePerS: 10_000 - n }));
    expect(pools.shareDemand(fleet, true)).toBe(5);
    for (let sweep = 0; sweep < 4; sweep++) {
      await vi.advanceTimersByTimeAsync(SWEEP_MS);
      await until(() => connector.openPeers === connector.calls, 'the connects of this sweep');
    }
    // Each origin its first socket, and at most the 10 the budget has beyond them.
    expect(connector.calls).toBeGreaterThanOrEqual(5);
    expect(connector.calls).toBeLessThanOrEqual(15);
  });

  it('closes on reload the idle sockets whose origin the new egress policy refuses, and keeps the others', async () => {
    const pools = manager();
    pools.warm(BUSY, 1);
    pools.warm(QUIET, 2);
    await until(() => pools.snapshot().idle === 3, 'prewarmed');
    connector.refuse.add(QUIET.host); // the reloaded egress policy (the connector's) no longer allows it
    expect(pools.reconfigure(parseConfig({}, 'reload'))).toBe(2);
    expect(pools.snapshot().idle).toBe(1); // (the emptied pool, with no demand, is retired by the same sweep)
    expect(idleOf(pools, BUSY)).toBe(1);
    await until(() => connector.openPeers === 1, 'the refused sockets closed');
    expect(connector.calls).toBe(3);
  });

  it('judges a socket given back whose connect began before the reload though it completed after (a TLS handshake)', async () => {
    connector.manual = true;
    connector.recordStart = true;
    const pools = manager();
    const acquiring = pools.acquire(QUIET, 60_000);
    await until(() => connector.pending.length === 1, 'the connect began');
    vi.advanceTimersByTime(10);
    connector.refuse.add(QUIET.host); // the reloaded egress policy refuses the origin
    pools.reconfigure(parseConfig({}, 'reload'));
    vi.advanceTimersByTime(10);
    // The connect completes after the reload (a connector that did not judge it then lends it all the same).
    await connector.pending[0]!.succeed();
    const lent = await acquiring;
    expect(lent.connectedAt).toBeGreaterThan(lent.startedAt!);
    pools.giveBack(lent.originKey, lent, 0, true);
    expect(idleOf(pools, QUIET)).toBe(0);
    expect(pools.snapshot().leased).toBe(0);
    await until(() => connector.openPeers === 0, 'the refused socket closed');
  });

  it('closes on reload the idle tunnels of a proxy whose URL changed or that was removed, and those lent before', async () => {
    const proxies = [
      { name: 'corp', url: 'http://10.0.0.1:3128' },
      { name: 'lab', url: 'http://10.0.0.2:3128' },
      { name: 'edge', url: 'http://10.0.0.3:3128' },
    ];
    const pools = new PoolManager({
      config: parseConfig({ proxies }, 'test'),
      connector,
      log: pino({ level: 'silent' }),
    });
    managers.push(pools);
    const viaCorp: Origin = { ...BUSY, proxy: 'corp' };
    const viaLab: Origin = { ...BUSY, proxy: 'lab' };
    const viaEdge: Origin = { ...BUSY, proxy: 'edge' };
    pools.warm(viaCorp, 2);
    pools.warm(viaLab, 1);
    pools.warm(viaEdge, 1);
    pools.warm(BUSY, 1);
    await until(() => pools.snapshot().idle === 5, 'warmed');
    // A corp tunnel lent before the reload, given back unused after it.
    const lent = await pools.acquire(viaCorp, 1_000);
    const idle = (origin: Origin) =>
      pools.snapshot().origins.find((entry) => entry.origin === `${origin.host}:${origin.port} via ${origin.proxy}`)
        ?.idle;
    expect(idle(viaCorp)).toBe(1);

    // corp now points elsewhere, lab is gone, edge is as it was.
    const reloaded = parseConfig({ proxies: [{ name: 'corp', url: 'http://10.0.0.9:3128' }, proxies[2]!] }, 'reload');
    expect(pools.reconfigure(reloaded)).toBe(2);
    expect(idle(viaCorp)).toBe(0);
    expect(idleOf(pools, BUSY)).toBe(1);
    expect(idle(viaEdge)).toBe(1);
    pools.giveBack(lent.originKey, lent, 0, true);
    expect(idle(viaCorp)).toBe(0);
    expect(pools.snapshot().leased).toBe(0);
    // Closed: the corp and lab tunnels idle at the reload, and the corp tunnel lent before it. (The corp pool's
    // demand, one acquire, may already be refilling it through the new URL.)
    await until(() => connector.peers.filter((peer) => peer.destroyed).length === 3, 'the old tunnels closed');

    // Tunnels through the new corp URL are pooled as usual (the refill for its demand, and this warm).
    pools.warm(viaCorp, 1);
    await until(() => (idle(viaCorp) ?? 0) >= 1, 'a new corp tunnel');
  });

  it('retires the pool of a proxy a reload removed, minIdle or not, and connects nothing more through it', async () => {
    const proxies = [{ name: 'lab', url: 'http://10.0.0.2:3128' }];
    const pool = { defaults: { minIdle: 2 } };
    const pools = new PoolManager({
      config: parseConfig({ proxies, pool }, 'test'),
      connector,
      log: pino({ level: 'silent' }),
    });
    managers.push(pools);
    pools.start();
    const viaLab: Origin = { ...BUSY, proxy: 'lab' };
    pools.warm(viaLab, 1);
    const labKey = `${BUSY.host}:${BUSY.port} via lab`;
    await until(() => pools.snapshot().origins.find((entry) => entry.origin === labKey)?.idle === 2, 'minIdle');
    const calls = connector.calls;
    expect(pools.reconfigure(parseConfig({ proxies: [], pool }, 'reload'))).toBe(2);
    // Before: minIdle kept the pool refilling through a proxy that is no more (each connect failing, for ever).
    await vi.advanceTimersByTimeAsync(SWEEP_MS * 2);
    await nextTurn();
    expect(pools.snapshot().origins.map((entry) => entry.origin)).not.toContain(labKey);
    expect(connector.calls).toBe(calls);
  });

  it('retires the warm TLS sessions pool of an origin a reload turned warm TLS off for, minIdle or not', async () => {
    const input = (warm: string[]) => ({ pool: { origins: [{ match: 'busy.test:443', minIdle: 2 }] }, tls: { warm } });
    const pools = withInstantRelays(parseConfig(input(['busy.test:443']), 'test'));
    pools.start();
    expect(pools.warm(BUSY, 2, SYSTEM_TRUST)).toEqual({ warming: 'tls', granted: 2 });
    const sessionsKey = `${BUSY.host}:${BUSY.port} tls`;
    await until(() => pools.snapshot().idle === 2, 'two sessions warm');
    // One lent before the reload, released unused after it.
    const lent = await pools.acquire(BUSY, 1_000, SYSTEM_TRUST);
    expect(lent.originKey).toBe(sessionsKey);

    pools.reconfigure(parseConfig(input([]), 'reload'));
    // An https client gets a TCP socket now: no acquire reaches the sessions pool, so it keeps nothing.
    expect(pools.snapshot().origins.find((entry) => entry.origin === sessionsKey)?.idle).toBe(0);
    const tcp = await pools.acquire(BUSY, 1_000, SYSTEM_TRUST);
    expect(tcp.originKey).toBe(`${BUSY.host}:${BUSY.port}`);
    native.close(tcp.fd);
    pools.leaseEnded(tcp.originKey);
    pools.giveBack(lent.originKey, lent, 0, true);
    // Before: its idle sessions stayed, and minIdle made new ones (handshakes at the origin for nobody) for ever.
    await vi.advanceTimersByTimeAsync(SWEEP_MS * 2);
    await nextTurn();
    expect(pools.snapshot().origins.map((entry) => entry.origin)).not.toContain(sessionsKey);
    // The origin's TCP pool (minIdle 2) is what is kept warm now.
    await until(() => idleOf(pools, BUSY) === 2 && pools.snapshot().idle === 2, 'the TCP pool warm');
  });

  it('an acquire waiting for a session across a reload that changed its trust: the session goes back never lent, the demand counted once', async () => {
    const pki = createTestPki(['localhost']);
    cleanups.push(() => pki.cleanup());
    const input = (caFile?: string) => ({
      pool: { predictive: false },
      tls: { warm: ['busy.test:443'], ...(caFile === undefined ? {} : { caFile }) },
    });
    const config = parseConfig(input(), 'test');
    const pools = withInstantRelays(config);
    connector.manual = true;
    const acquiring = pools.acquire(BUSY, 60_000, SYSTEM_TRUST);
    await until(() => connector.pending.length === 1, "the session's connect");
    // The daemon trusts a CA file now; the acquire asked for the system store. The session its connect makes is
    // verified against the file: it goes back, and the acquire takes the origin's TCP socket.
    pools.reconfigure(parseConfig(input(pki.caFile), 'reload'));
    await connector.pending.shift()!.succeed();
    await until(() => connector.pending.length === 1, 'the TCP connect');
    await connector.pending.shift()!.succeed();
    const handoff = await acquiring;
    held.push(handoff);
    expect(handoff.originKey).toBe(`${BUSY.host}:${BUSY.port}`);
    const sessionsKey = `${BUSY.host}:${BUSY.port} tls`;
    const rows = pools.snapshot().origins;
    expect(rows.find((row) => row.origin === sessionsKey)?.idle).toBe(1);
    // One acquire: one acquire's demand, whichever pool holds it (the clock stands still: nothing decayed).
    const oneAcquire = Number((1000 / config.pool.predictiveWindowMs).toFixed(3));
    expect(rows.reduce((sum, row) => sum + row.demandRatePerS, 0)).toBe(oneAcquire);
    // The TCP socket was lent; the session never was, and closed unlent it counts as such.
    expect(pools.warming().lent.acquire).toBe(1);
    pools.close(false);
    expect(pools.warming()).toMatchObject({ opened: { acquire: 2 }, lent: { acquire: 1 }, neverLent: { acquire: 1 } });
  });

  it('an acquire given up in the turn it is served an idle socket: no hit, no demand, never lent, the socket idle again', async () => {
    const pools = manager({ predictive: false });
    expect(pools.warm(BUSY, 1)).toEqual({ warming: 'tcp', granted: 1 });
    await until(() => idleOf(pools, BUSY) === 1, 'the warmed socket idle');
    const before = originStats(pools, BUSY);
    // Cancelled (or its client gone) right behind it, as the handoff server reads both in one turn.
    const cancel = new AbortController();
    const acquiring = pools.acquire(BUSY, 1_000, undefined, 0, cancel.signal);
    cancel.abort();
    // Before: served all the same, counted a hit and demand, lent to nobody.
    await expect(acquiring).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
    expect(originStats(pools, BUSY)).toMatchObject({
      idle: 1,
      leased: 0,
      hits: 0,
      misses: 0,
      demandRatePerS: before.demandRatePerS,
    });
    expect(pools.snapshot()).toMatchObject({ hits: 0, misses: 0 });
    expect(pools.warming().lent.warm).toBe(0);
    // It goes out, counted, to the next acquire.
    const handoff = await pools.acquire(BUSY, 1_000);
    held.push(handoff);
    expect(handoff.warm).toBe(true);
    expect(originStats(pools, BUSY)).toMatchObject({ hits: 1, leased: 1 });
    expect(pools.warming().lent.warm).toBe(1);
  });

  for (const when of ['before', 'in the same turn'] as const) {
    it(`warmTlsOnMiss tcp: an acquire given up ${when} it would take an idle session takes none: no hit, no demand, never lent`, async () => {
      const pools = withInstantRelays(
        parseConfig(
          { pool: { predictive: false, defaults: { warmTlsOnMiss: 'tcp' } }, tls: { warm: ['busy.test:443'] } },
          'test',
        ),
      );
      expect(pools.warm(BUSY, 1, SYSTEM_TRUST)).toEqual({ warming: 'tls', granted: 1 });
      const sessionsKey = `${BUSY.host}:${BUSY.port} tls`;
      const sessions = () => pools.snapshot().origins.find((row) => row.origin === sessionsKey)!;
      await until(() => sessions()?.idle === 1, 'the warmed session idle');
      const demandBefore = sessions().demandRatePerS;
      const cancel = new AbortController();
      if (when === 'before') cancel.abort();
      const acquiring = pools.acquire(BUSY, 1_000, SYSTEM_TRUST, 0, cancel.signal);
      cancel.abort();
      // Before: the session went out to nobody, counted a hit, demand and lent (an already aborted signal unread).
      await expect(acquiring).rejects.toMatchObject({ code: ErrorCodes.ABORTED });
      expect(sessions()).toMatchObject({
        idle: 1,
        leased: 0,
        hits: 0,
        misses: 0,
        warmedLent: 0,
        demandRatePerS: demandBefore,
      });
      expect(pools.snapshot()).toMatchObject({ hits: 0, misses: 0 });
      expect(pools.warming().lent.warm).toBe(0);
      // Nothing was taken from the TCP pool either.
      expect(pools.snapshot().origins.find((row) => row.origin === `${BUSY.host}:${BUSY.port}`)).toBeUndefined();
      const handoff = await pools.acquire(BUSY, 1_000, SYSTEM_TRUST);
      held.push(handoff);
      expect(handoff.originKey).toBe(sessionsKey);
      expect(sessions()).toMatchObject({ hits: 1, warmedLent: 1 });
    });
  }

  it('keeps a minIdle pool whose acquire the policy refused at its address, and warms it after a reload allows it', async () => {
    const pool = { defaults: { minIdle: 1 } };
    const pools = manager(pool);
    pools.start();
    // The acquire's connect and the minIdle refill both meet the policy at the address (the name passed the check).
    const refused = () => new SockpoolError(ErrorCodes.POLICY, 'address refused', { reason: 'address-denied' });
    connector.failures.push(refused(), refused());
    await expect(pools.acquire(BUSY, 1_000)).rejects.toMatchObject({ code: ErrorCodes.POLICY });
    // Before: the refused acquire retired the pool at once, minIdle or not, and nothing warmed the origin again.
    expect(pools.snapshot().origins.map((entry) => entry.origin)).toContain(`${BUSY.host}:${BUSY.port}`);
    pools.reconfigure(parseConfig({ pool }, 'reload'));
    // At once: the backoff of connects the old policy refused is not the reloaded policy's (it waited 1 s here).
    await vi.advanceTimersByTimeAsync(SWEEP_MS);
    await until(() => idleOf(pools, BUSY) === 1, 'minIdle warmed after the reload');
  });

  it('a reload that changes maxPerOriginFleet reaches a connect already waiting for a slot', async () => {
    const pools = new PoolManager({
      // (No predictive warming: a refill started after the reload would take the new slot and serve the waiter.)
      config: parseConfig({ pool: { predictive: false, defaults: { maxPerOriginFleet: 1 } } }, 'test'),
      connector,
      log: pino({ level: 'silent' }),
      slots: slotKeeper(new LocalSlots()),
    });
    managers.push(pools);
    held.push(await pools.acquire(BUSY, 60_000));
    let second: (Handoff & { originKey: string }) | undefined;
    void pools.acquire(BUSY, 60_000).then((handoff) => {
      second = handoff;
      held.push(handoff);
    });
    // Its connect waits for the one slot (asking again every SLOT_POLL_MS)...
    await vi.advanceTimersByTimeAsync(200);
    expect(second).toBeUndefined();
    // ...and takes the second one the reload makes (before: it asked under the cap of its start, for ever).
    pools.reconfigure(parseConfig({ pool: { predictive: false, defaults: { maxPerOriginFleet: 2 } } }, 'reload'));
    await vi.advanceTimersByTimeAsync(200);
    await until(() => second !== undefined, 'the waiting acquire served');
    expect(connector.calls).toBe(2);
  });

  it('applies a new configuration to existing pools at once, and hands idle sockets over on a detaching close', async () => {
    const pools = manager();
    pools.prewarm(BUSY, 1);
    await until(() => idleOf(pools, BUSY) === 1, 'prewarmed');
    pools.reconfigure(parseConfig({ pool: { defaults: { minIdle: 3 } } }, 'reload'));
    await until(() => idleOf(pools, BUSY) === 3, 'the new minIdle');

    const detached = pools.close(true);
    expect(detached).toHaveLength(3);
    expect(detached.every(({ origin }) => origin.host === BUSY.host)).toBe(true);
    // Ownership passed to the caller: these are live sockets only it closes.
    for (const { socket } of detached) {
      expect(native.probe(socket.fd).state).toBe('alive');
      native.close(socket.fd);
    }
    await expect(pools.acquire(BUSY, 1_000)).rejects.toMatchObject({ code: ErrorCodes.SHUTTING_DOWN });
  });
});

describe('PoolManager and a socket given back unused after a reload', () => {
  it('judges it by the new policy only when its lease began before the reload: the handoff path pays no check after', async () => {
    // As HandoffServer.#release gives it back (returnedSocket): with only its connect time, every release of a socket
    // connected before any reload paid an egress check (connector.checkHeld) on the handoff path, for its whole life.
    const pools = manager();
    const table = new LeaseTable();
    const lend = async () => {
      const handoff = await pools.acquire(QUIET, 1_000);
      return table.create({
        clientId: 1,
        originKey: handoff.originKey,
        origin: QUIET,
        address: handoff.address,
        peerPort: handoff.port!,
        family: handoff.family,
        connectedAt: handoff.connectedAt,
        uid: 0,
        fd: handoff.fd,
        mark: undefined,
      });
    };
    const across = await lend(); // leased across the reload: judged when it comes back
    vi.advanceTimersByTime(10);
    pools.reconfigure(parseConfig({}, 'reload'));
    vi.advanceTimersByTime(10);
    const checks = vi.spyOn(connector, 'checkHeld');
    table.end(across.leaseId, 1);
    pools.giveBack(across.originKey, returnedSocket(across), 0, true);
    expect(checks).toHaveBeenCalledTimes(1);
    for (let i = 0; i < 20; i++) {
      const lease = await lend(); // the same socket, leased after the reload
      table.end(lease.leaseId, 1);
      pools.giveBack(lease.originKey, returnedSocket(lease), 0, true);
    }
    expect(checks).toHaveBeenCalledTimes(1);
  });
});

describe('PoolManager snapshot for one uid', () => {
  it("builds the rows of the pools `include` names only: a uid's stats does not pay for every pool", async () => {
    const pools = manager({ predictive: false });
    let rowsBuilt = 0;
    // Called once per row built (the row's learned family): counts the work of a snapshot.
    (connector as unknown as { learnedFamily: () => undefined }).learnedFamily = () => {
      rowsBuilt++;
      return undefined;
    };
    for (let i = 0; i < 20; i++) {
      const handoff = await pools.acquire({ host: `other${i}.test`, port: 443 }, 1_000, undefined, 1000);
      held.push(handoff);
    }
    const mine = await pools.acquire({ host: 'mine.test', port: 443 }, 1_000, undefined, 2000);
    held.push(mine);
    rowsBuilt = 0;
    const view = pools.snapshot((key) => pools.usersOf(key)?.has(2000) === true);
    expect(view.origins.map((row) => row.origin)).toEqual(['mine.test:443']);
    expect(view).toMatchObject({ leased: 1, originCount: 1 });
    expect(rowsBuilt).toBe(1);
    // Without `include`, every pool, with the daemon's totals.
    expect(pools.snapshot()).toMatchObject({ leased: 21, originCount: 21 });
  });
});

describe('PoolManager sockets kept for one uid', () => {
  /** A manager whose uids may each keep `maxKeptPerUid` idle sockets released unused, with its metrics. */
  function keeping(maxKeptPerUid: number, pool: NonNullable<SockpoolConfigInput['pool']> = {}) {
    const metrics = createMetrics(() => ({}) as MetricsSnapshot);
    const created = new PoolManager({
      config: parseConfig({ quotas: { maxKeptPerUid }, pool }, 'test'),
      connector,
      log: pino({ level: 'silent' }),
      metrics,
    });
    managers.push(created);
    const droppedFor = async (reason: string) =>
      (await metrics.deadDropped.get()).values.find((value) => value.labels.reason === reason)?.value ?? 0;
    return { pools: created, droppedFor };
  }
  const origins = ['k1', 'k2', 'k3', 'k4', 'k5'].map((host): Origin => ({ host: `${host}.test`, port: 443 }));
  const SHARED: Origin = { host: 'shared.test', port: 443 };

  /** An acquire of `uid` at `origin` given back unused by its client (kept for `uid`); returns its origin's side. */
  async function releaseUnused(pools: PoolManager, origin: Origin, uid: number) {
    const lent = await pools.acquire(origin, 1_000, undefined, uid);
    const peer = connector.peerOf(lent.fd);
    pools.giveBack(lent.originKey, lent, uid, true);
    return peer;
  }

  it("closes the uid's oldest kept socket in whatever pool past maxKeptPerUid (shut down), and no shared or other uid's one", async () => {
    const { pools, droppedFor } = keeping(3);
    pools.warm(SHARED, 1);
    await until(() => idleOf(pools, SHARED) === 1, 'a shared warm socket');
    const other = await releaseUnused(pools, origins[4]!, 2000);
    const peers: Socket[] = [];
    for (const origin of origins) {
      peers.push(await releaseUnused(pools, origin, 1000));
      expect(pools.keptCount(1000)).toBeLessThanOrEqual(3);
    }
    expect([pools.keptCount(1000), pools.keptCount(2000), pools.keptCount()]).toEqual([3, 1, 4]);
    // The two oldest (k1, k2) are closed, at their origins too (shut down: the client may hold a copy).
    expect(origins.map((origin) => idleOf(pools, origin))).toEqual([0, 0, 1, 1, 2]);
    await until(() => peers[0]!.destroyed && peers[1]!.destroyed, 'the oldest two closed at their origins');
    expect(peers.slice(2).map((peer) => peer.destroyed)).toEqual([false, false, false]);
    expect(await droppedFor('quota')).toBe(2);
    // The newest are lent again to their uid, warm (and no longer counted while lent); uid 2000's stays its own.
    for (const origin of origins.slice(2)) {
      const again = await pools.acquire(origin, 1_000, undefined, 1000);
      held.push(again);
      expect(again).toMatchObject({ warm: true, kept: true });
    }
    expect([pools.keptCount(1000), pools.keptCount(2000)]).toEqual([0, 1]);
    expect(other.destroyed).toBe(false);
    // The shared socket of another origin was never at stake.
    expect(idleOf(pools, SHARED)).toBe(1);
    const shared = await pools.acquire(SHARED, 1_000, undefined, 3000);
    held.push(shared);
    expect(shared.warm).toBe(true);
    expect(connector.calls).toBe(7);
  });

  it('stops counting a kept socket wherever it leaves the idle set: a waiter of another uid, a reload, the sweep, close', async () => {
    const pool = { defaults: { maxPerOrigin: 1, idleTtlMs: 5_000 } };
    const { pools } = keeping(10, pool);
    pools.start();
    for (const origin of origins) await releaseUnused(pools, origin, 1000);
    expect(pools.keptCount(1000)).toBe(5);
    // A waiter of another uid at k1's cap takes the kept socket's slot (it is closed for it).
    const waited = await pools.acquire(origins[0]!, 1_000, undefined, 2000);
    held.push(waited);
    expect(waited.warm).toBe(false);
    expect(pools.keptCount(1000)).toBe(4);
    // A reload whose egress policy refuses k2 closes its idle socket.
    connector.refuse.add(origins[1]!.host);
    pools.reconfigure(parseConfig({ quotas: { maxKeptPerUid: 10 }, pool }, 'reload'));
    expect(pools.keptCount(1000)).toBe(3);
    // A reload that lowers the bound holds at once: the oldest over it closed.
    pools.reconfigure(parseConfig({ quotas: { maxKeptPerUid: 2 }, pool }, 'reload'));
    expect([pools.keptCount(1000), idleOf(pools, origins[2]!)]).toEqual([2, 0]);
    // Past idleTtlMs the sweep ages the rest out.
    await vi.advanceTimersByTimeAsync(5_000 + SWEEP_MS);
    expect([pools.keptCount(1000), pools.keptCount()]).toEqual([0, 0]);
    // Kept again, then the manager closes (shutdown, fd store or not): nothing counted is left.
    await releaseUnused(pools, origins[3]!, 1000);
    expect(pools.keptCount(1000)).toBe(1);
    pools.close(true);
    expect(pools.keptCount()).toBe(0);
  });
});

describe("PoolManager maxPerOrigin across an origin's pools", () => {
  const PROXIES = [
    { name: 'corp', url: 'http://10.0.0.1:3128' },
    { name: 'lab', url: 'http://10.0.0.2:3128' },
  ];
  const viaCorp: Origin = { ...BUSY, proxy: 'corp' };
  const viaLab: Origin = { ...BUSY, proxy: 'lab' };

  /**
   * A manager whose BUSY is reached directly, through `corp` and `lab`, and as warm TLS sessions (a relay that
   * "handshakes" at once: the session's fd is the TCP socket's), with these defaults; no predictive warming.
   */
  function sharing(defaults: Record<string, unknown>): PoolManager {
    return withInstantRelays(
      parseConfig(
        { proxies: PROXIES, pool: { predictive: false, defaults }, tls: { warm: ['busy.test:443'] } },
        'test',
      ),
    );
  }

  /** An acquire left waiting; `handoff` once served (then held, closed by afterEach); `error` once failed. */
  function waiting(pools: PoolManager, origin: Origin, tlsTrust?: typeof SYSTEM_TRUST, uid = 0) {
    const state: { handoff?: Handoff & { originKey: string }; error?: unknown } = {};
    pools.acquire(origin, 600_000, tlsTrust, uid).then(
      (handoff) => {
        state.handoff = handoff;
        held.push(handoff);
      },
      (error: unknown) => {
        state.error = error;
      },
    );
    return state;
  }

  /** Ends a held lease as curl closing its connection does. */
  function endLease(pools: PoolManager, handoff: Handoff & { originKey: string }, uid = 0): void {
    held.splice(held.indexOf(handoff), 1);
    native.close(handoff.fd);
    pools.leaseEnded(handoff.originKey, uid);
  }

  const turns = async (count = 5) => {
    for (let turn = 0; turn < count; turn++) await nextTurn();
  };

  it('holds maxPerOrigin across the pools of one host and port: direct, through each proxy and warm TLS together', async () => {
    const pools = sharing({ maxPerOrigin: 2 });
    const direct = await pools.acquire(BUSY, 1_000);
    const corp = await pools.acquire(viaCorp, 1_000);
    held.push(direct, corp);
    expect([direct.originKey, corp.originKey]).toEqual(['busy.test:443', 'busy.test:443 via corp']);
    const lab = waiting(pools, viaLab);
    const tls = waiting(pools, BUSY, SYSTEM_TRUST);
    await turns();
    // Before: each pool had the whole cap, and BUSY had 4 connections at once.
    expect(connector.calls).toBe(2);
    expect(pools.snapshot()).toMatchObject({ leased: 2, waiting: 2, connecting: 0 });

    // A lease of the direct pool ends: the acquire through lab (the first to wait) takes its room, not more.
    endLease(pools, direct);
    await until(() => lab.handoff !== undefined, 'the lab acquire served');
    expect(lab.handoff!.originKey).toBe('busy.test:443 via lab');
    await turns();
    expect(tls.handoff).toBeUndefined();
    expect(connector.calls).toBe(3);
    await until(() => connector.openPeers === 2, 'two connections open at the origin');

    // The corp lease ends: the warm TLS acquire is served.
    endLease(pools, corp);
    await until(() => tls.handoff !== undefined, 'the TLS acquire served');
    expect(tls.handoff!.originKey).toBe('busy.test:443 tls');
    await until(() => connector.openPeers === 2, 'still two connections open at the origin');
    expect(connector.calls).toBe(4);
  });

  it("gives room freed at the origin's cap to its pools in turn: the direct pool's backlog does not starve a proxy's acquire", async () => {
    const pools = sharing({ maxPerOrigin: 1 });
    const first = await pools.acquire(BUSY, 1_000);
    held.push(first);
    const corp = waiting(pools, viaCorp);
    const direct = [waiting(pools, BUSY), waiting(pools, BUSY)];
    await turns();
    expect(connector.calls).toBe(1);
    // The direct pool's own lease ends, its own acquires waiting: the corp acquire waited first and goes first.
    endLease(pools, first);
    await until(() => corp.handoff !== undefined, 'the corp acquire served');
    await turns();
    expect(direct.map((state) => state.handoff)).toEqual([undefined, undefined]);
    // Then the direct pool's turn.
    endLease(pools, corp.handoff!);
    await until(() => direct[0]!.handoff !== undefined, 'the first direct acquire served');
    expect(direct[1]!.handoff).toBeUndefined();
    expect(connector.calls).toBe(3);
  });

  it("gives a connection released unused at the origin's cap to the pool whose acquire waited first: the direct pool's backlog of keep-alive releases does not starve a proxy's acquire", async () => {
    const pools = sharing({ maxPerOrigin: 1 });
    let lease: Handoff & { originKey: string } = await pools.acquire(BUSY, 1_000);
    const corp = waiting(pools, viaCorp);
    let next = waiting(pools, BUSY);
    await turns();
    expect(connector.calls).toBe(1);
    // The direct pool's clients keep a backlog (each lease released unused, as curl keeping connections alive does,
    // with another direct acquire queued behind it). The corp acquire waited first: it must be served, not wait for
    // the direct backlog to end.
    let holding = true;
    for (let round = 0; round < 5 && corp.handoff === undefined; round++) {
      const queued = waiting(pools, BUSY);
      pools.giveBack(lease.originKey, lease, 0, true);
      holding = false;
      await turns();
      if (next.handoff === undefined) break;
      held.splice(held.indexOf(next.handoff), 1);
      lease = next.handoff;
      holding = true;
      next = queued;
    }
    if (holding) held.push(lease);
    await until(() => corp.handoff !== undefined, 'the corp acquire served');
    expect(corp.handoff!.originKey).toBe('busy.test:443 via corp');
    await until(() => connector.openPeers === 1, 'one connection open at the origin');
  });

  it("gives room at the origin's cap to its waiting uids in turns across its pools: a uid waiting in two pools has one turn a round, not one in each", async () => {
    const pools = sharing({ maxPerOrigin: 1 });
    // uid 1 holds the room, and waits through corp and directly; uid 2 waits directly only.
    let lease: Handoff & { originKey: string } = await pools.acquire(BUSY, 1_000, undefined, 1);
    let uid = 1;
    held.push(lease);
    const queued = {
      corp1: waiting(pools, viaCorp, undefined, 1),
      direct1: waiting(pools, BUSY, undefined, 1),
      other1: waiting(pools, BUSY, undefined, 2),
      corp2: waiting(pools, viaCorp, undefined, 1),
      direct2: waiting(pools, BUSY, undefined, 1),
      other2: waiting(pools, BUSY, undefined, 2),
    };
    await turns();
    expect(connector.calls).toBe(1);
    const served: string[] = [];
    for (let round = 0; round < 6; round++) {
      // The lease holding the room ends (as its uid's): the room goes to one waiter.
      endLease(pools, lease, uid);
      await until(() => Object.values(queued).filter((state) => state.handoff).length === round + 1, 'one more served');
      const [name, state] = Object.entries(queued).find(
        ([name, state]) => state.handoff !== undefined && !served.includes(name),
      )!;
      served.push(name);
      lease = state.handoff!;
      uid = name.startsWith('other') ? 2 : 1;
    }
    // Before: turns went by pool (corp, direct, corp, direct, ...): uid 1 had a turn in each pool a round, 1 2 1 1 2 1.
    // Now by uid, uid 2 waiting in one pool as often as uid 1 in two, each uid's waiters oldest first.
    expect(served).toEqual(['corp1', 'other1', 'direct1', 'other2', 'corp2', 'direct2']);
    await until(() => connector.openPeers === 1, 'one connection open at the origin');
  });

  it("gives room at the origin's cap to the waiting uid that holds the fewest of it in all its pools: a uid holding a lease takes no more through another pool while another uid waits", async () => {
    const pools = sharing({ maxPerOrigin: 2 });
    held.push(await pools.acquire(BUSY, 1_000, undefined, 1));
    const second = await pools.acquire(BUSY, 1_000, undefined, 1);
    held.push(second);
    const corp = waiting(pools, viaCorp, undefined, 1);
    const other = waiting(pools, BUSY, undefined, 2);
    await turns();
    expect(connector.calls).toBe(2);
    // uid 1 holds one of the two still as its other lease ends: the room is uid 2's, though uid 1's corp acquire
    // waited first (before: corp's turn came first, and uid 1 held the whole cap while uid 2 waited).
    endLease(pools, second, 1);
    await until(() => other.handoff !== undefined || corp.handoff !== undefined, 'one acquire served');
    await turns();
    expect(other.handoff?.originKey).toBe('busy.test:443');
    expect(corp.handoff).toBeUndefined();
  });

  it("lends a socket kept for a uid to that uid's waiter only when that uid holds no more of the origin, in all its pools, than the other waiting uids: else its room goes to the uid holding fewer", async () => {
    const pools = sharing({ maxPerOrigin: 4 });
    held.push(await pools.acquire(viaCorp, 1_000, undefined, 1), await pools.acquire(viaCorp, 1_000, undefined, 1));
    const mine = await pools.acquire(BUSY, 1_000, undefined, 1);
    held.push(mine, await pools.acquire(BUSY, 1_000, undefined, 2));
    // The direct pool alone: uid 1 holds 1, uid 2 holds 1. The origin: uid 1 holds 3, uid 2 holds 1.
    const first = waiting(pools, BUSY, undefined, 1);
    const second = waiting(pools, BUSY, undefined, 2);
    await turns();
    expect(connector.calls).toBe(4);
    // uid 1 gives its direct lease back unused: kept for it, its room is uid 2's turn (it holds the fewest of the
    // origin). Before, the direct pool's pump lent it at once to uid 1's waiter, by the pool's own counts (uid 1
    // then holding none there): uid 1 held 4 of the 4 while uid 2 waited.
    held.splice(held.indexOf(mine), 1);
    pools.giveBack(mine.originKey, mine, 1, true);
    await until(() => second.handoff !== undefined || first.handoff !== undefined, 'one acquire served');
    await turns();
    expect(second.handoff).toMatchObject({ originKey: 'busy.test:443', warm: false });
    expect(first.handoff).toBeUndefined();
    expect(connector.calls).toBe(5);
  });

  it("hands a shared socket given back while every waiter's connect is under way to the waiter whose uid holds the fewest of the origin in all its pools", async () => {
    const pools = sharing({ maxPerOrigin: 10 });
    held.push(await pools.acquire(viaCorp, 1_000, undefined, 1), await pools.acquire(viaCorp, 1_000, undefined, 1));
    const unsent = await pools.acquire(BUSY, 1_000, undefined, 2);
    held.push(unsent);
    connector.manual = true;
    const first = waiting(pools, BUSY, undefined, 1);
    const second = waiting(pools, BUSY, undefined, 2);
    await until(() => connector.pending.length === 2, "both waiters' connects under way");
    // uid 2's lease never reached its client: back, shared. The direct pool alone: uid 1 and uid 2 hold none there
    // but the connect under way for each, uid 1 waiting longer. The origin: uid 1 holds 2 more, through corp.
    held.splice(held.indexOf(unsent), 1);
    pools.giveBack(unsent.originKey, unsent, 2, false);
    await until(() => first.handoff !== undefined || second.handoff !== undefined, 'one acquire served');
    expect(second.handoff).toMatchObject({ originKey: 'busy.test:443', warm: true });
    expect(first.handoff).toBeUndefined();
    for (const pending of connector.pending.splice(0)) await pending.succeed();
    await until(() => first.handoff !== undefined, "uid 1's acquire served by a connect");
  });

  it("gives a failed connect's error to the waiter of the uid whose turn at the origin's cap the connect was, not to the fairest by its pool's own counts", async () => {
    const pools = sharing({ maxPerOrigin: 4 });
    held.push(await pools.acquire(viaCorp, 1_000, undefined, 1), await pools.acquire(viaCorp, 1_000, undefined, 1));
    held.push(await pools.acquire(BUSY, 1_000, undefined, 2));
    const third = await pools.acquire(BUSY, 1_000, undefined, 3);
    held.push(third);
    // The direct pool alone: uid 1 holds none, uid 2 one. The origin: uid 1 holds 2, uid 2 one.
    const first = waiting(pools, BUSY, undefined, 1);
    const second = waiting(pools, BUSY, undefined, 2);
    await turns();
    expect(connector.calls).toBe(4);
    connector.failures.push(Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' }));
    // The room uid 3's lease leaves is uid 2's turn (it holds the fewest of the origin): the connect is its, and so is
    // its failure. Before, the direct pool's queue gave it to uid 1's waiter (holding none there).
    endLease(pools, third, 3);
    await until(() => first.error !== undefined || second.error !== undefined, 'a waiter failed');
    expect(second.error).toMatchObject({ code: 'ECONNREFUSED' });
    expect(first.error).toBeUndefined();
    // The other waits on: a connect of its own serves it.
    await until(() => first.handoff !== undefined, "uid 1's acquire served");
    expect(connector.calls).toBe(6);
  });

  it("shows in every row of the origin's pools the connections of all of them against maxPerOrigin, and the acquires waiting at it", async () => {
    const pools = sharing({ maxPerOrigin: 2 });
    held.push(await pools.acquire(BUSY, 1_000));
    held.push(await pools.acquire(viaCorp, 1_000));
    waiting(pools, viaCorp);
    waiting(pools, BUSY);
    waiting(pools, BUSY);
    held.push(await pools.acquire(QUIET, 1_000));
    await turns();
    const sharedCap = { connections: 2, maxPerOrigin: 2, waiting: 3 };
    const rows = pools.snapshot().origins;
    expect(rows.find((row) => row.origin === 'busy.test:443')).toMatchObject({ leased: 1, waiting: 2, sharedCap });
    expect(rows.find((row) => row.origin === 'busy.test:443 via corp')).toMatchObject({ waiting: 1, sharedCap });
    // An origin reached one way only has its row's own counts: no such field.
    expect(rows.find((row) => row.origin === 'quiet.test:443')).not.toHaveProperty('sharedCap');
    // A uid's view builds only the rows it names: the figure is the origin's all the same.
    const mine = pools.snapshot((key) => key === 'busy.test:443 via corp').origins;
    expect(mine).toEqual([expect.objectContaining({ origin: 'busy.test:443 via corp', sharedCap })]);
  });

  it('serves the acquires waiting in every pool of the origin when a reload raises its cap, whichever pool it reaches first', async () => {
    const pools = sharing({ maxPerOrigin: 1 });
    held.push(await pools.acquire(BUSY, 1_000));
    const corp = waiting(pools, viaCorp);
    const direct = waiting(pools, BUSY);
    await turns();
    expect(connector.calls).toBe(1);
    // The direct pool hears of the reload first, behind corp in turns: it leaves the room to corp, and takes what
    // corp leaves at the reload's sweep.
    pools.reconfigure(
      parseConfig({ proxies: PROXIES, pool: { predictive: false, defaults: { maxPerOrigin: 3 } } }, 'reload'),
    );
    await until(() => corp.handoff !== undefined && direct.handoff !== undefined, 'both acquires served');
    expect(connector.calls).toBe(3);
  });

  it("closes another pool's idle socket of the origin for an acquire waiting at the cap: waiters before warmth", async () => {
    const pools = sharing({ maxPerOrigin: 2 });
    pools.warm(BUSY, 2);
    await until(() => idleOf(pools, BUSY) === 2, 'two direct sockets warm');
    const peers = connector.peers;
    // Before: the corp pool connected past the cap (3 connections); without the eviction it waited for ever (the
    // direct pool's idle sockets are no use to it).
    const corp = await pools.acquire(viaCorp, 1_000);
    held.push(corp);
    expect(corp.warm).toBe(false);
    expect(idleOf(pools, BUSY)).toBe(1);
    await until(() => peers.filter((peer) => peer.destroyed).length === 1, 'the oldest direct socket closed');
    expect(peers[0]!.destroyed).toBe(true);
    await until(() => connector.openPeers === 2, 'two connections open at the origin');
  });

  it("keeps the warming of an origin's pools within its one cap: minIdle and prewarms of each together never pass it", async () => {
    const pools = sharing({ maxPerOrigin: 3, minIdle: 2 });
    pools.start();
    pools.warm(BUSY, 2);
    pools.warm(viaCorp, 2);
    pools.warm(BUSY, 2, SYSTEM_TRUST);
    await until(() => pools.snapshot().idle >= 3 && pools.snapshot().connecting === 0, 'the warms arrived');
    for (let sweep = 0; sweep < 3; sweep++) await vi.advanceTimersByTimeAsync(SWEEP_MS);
    await turns();
    // Before: each pool kept its own minIdle of 2 (6 connections).
    expect(pools.snapshot()).toMatchObject({ idle: 3, connecting: 0 });
    expect(connector.calls).toBe(3);
  });

  it('asks the clients holding leases of every pool of the origin to give idle ones back while an acquire waits at its cap', async () => {
    const pools = sharing({ maxPerOrigin: 1 });
    const asked: string[][] = [];
    pools.onReclaim = (keys) => asked.push([...keys].sort());
    held.push(await pools.acquire(BUSY, 1_000));
    const corp = waiting(pools, viaCorp);
    await turns();
    expect(corp.handoff).toBeUndefined();
    // The lease that holds the room is the direct pool's: its clients are asked too.
    expect(asked[0]).toEqual(['busy.test:443', 'busy.test:443 via corp']);
  });

  it('hands an idle socket out warm at the origin cap, connecting and closing nothing in its other pools', async () => {
    const pools = sharing({ maxPerOrigin: 2 });
    pools.warm(BUSY, 1);
    await until(() => idleOf(pools, BUSY) === 1, 'a direct socket warm');
    held.push(await pools.acquire(viaCorp, 1_000));
    expect(connector.calls).toBe(2);
    // The warm path, as the handoff server takes it (in the turn the acquire came), and as acquire() takes it.
    const warm = pools.takeWarm(BUSY);
    expect(warm).toMatchObject({ warm: true, originKey: 'busy.test:443' });
    pools.giveBack(warm!.originKey, warm!, 0, false);
    const again = await pools.acquire(BUSY, 1_000);
    held.push(again);
    expect(again.warm).toBe(true);
    await turns();
    expect(connector.calls).toBe(2);
    expect(connector.peers.filter((peer) => peer.destroyed)).toEqual([]);
    expect(pools.snapshot()).toMatchObject({ leased: 2, idle: 0, connecting: 0, waiting: 0 });
  });
});
