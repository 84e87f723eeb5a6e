// A fleet of real daemons sharing one real redis-server (docs/fleet.md): connection caps across daemons under load
// from all of them, the slots of a SIGKILLed daemon coming back after the heartbeat expiry, Redis killed and
// restarted mid-load, rate limits across daemons, no Redis call on the warm handoff path, and bad fleet
// configuration refused with the key named. The origin is a real HTTP server that counts its open connections;
// it closes each connection after its answer (`Connection: close`), so every request is one connection, one slot.
// The order of a take and a heartbeat in Redis is set with CLIENT PAUSE and a fleet member's fake heartbeat timer.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { parseConfig } from '../daemon/config.js';
import { Fleet } from '../daemon/fleet/fleet.js';
import * as native from '../shared/native.js';
import { daemonStats, fdCount, startTestDaemon } from './fixtures/client-helpers.js';
import { countingOrigin } from './helpers/counting-origin.js';
import { type DaemonProcess, daemonMain, eventually, writeConfigFile } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { type RedisServer, startRedis } from './helpers/redis.js';

const run = promisify(execFile);

interface FleetStats {
  state: string;
  members: number;
  heldSlots: number;
  slotWaits: number;
  fallbackSlots: number;
  fallbackTokens: number;
  outages: number;
}

async function fleetStats(daemon: DaemonProcess): Promise<FleetStats> {
  const stats = (await daemonStats(daemon.socketPath)) as unknown as { fleet: FleetStats };
  return stats.fleet;
}

let redis: RedisServer;
const cleanups: Array<() => unknown> = [];

beforeAll(async () => {
  redis = await startRedis();
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  // A test that killed Redis and failed before starting it again leaves it up for the next (each failure its own).
  await redis.ensureRunning();
});

afterAll(async () => {
  await redis?.close();
});

/** `count` daemons of one fleet (own sockets and state dirs), allowed to reach `port`. */
async function startFleet(
  count: number,
  port: number,
  pool: Record<string, unknown>,
  fleet: Record<string, unknown> = {},
): Promise<DaemonProcess[]> {
  const daemons = await Promise.all(
    Array.from({ length: count }, () =>
      startTestDaemon([port], {
        config: { pool, fleet: { redis: redis.url, heartbeatMs: 200, slotTtlMs: 5_000, ...fleet } },
      }),
    ),
  );
  cleanups.push(() => Promise.all(daemons.map((daemon) => daemon.stop())));
  await eventually(
    async () => (await Promise.all(daemons.map(fleetStats))).every((stats) => stats.members === count),
    'every daemon sees the whole fleet',
  );
  return daemons;
}

function clientOf(daemon: DaemonProcess, concurrency: number): SockpoolClient {
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, concurrencyPerThread: concurrency });
  cleanups.push(() => client.close());
  return client;
}

describe('fleet-wide connection caps', () => {
  it('three daemons under load from all three: the origin never sees more than maxPerOriginFleet at once', async () => {
    const origin = await countingOrigin(15);
    cleanups.push(() => origin.close());
    const cap = 4;
    const daemons = await startFleet(3, origin.port, { defaults: { maxPerOriginFleet: cap } });
    const before = fdCount();
    const clients = daemons.map((daemon) => clientOf(daemon, 12));
    const perClient = 40;
    const results = await Promise.all(
      clients.flatMap((client, c) =>
        Array.from({ length: perClient }, (_, i) => client.request(`http://127.0.0.1:${origin.port}/c${c}/${i}`)),
      ),
    );
    expect(results.every((response) => response.status === 200)).toBe(true);
    expect(origin.requests).toBe(3 * perClient);
    // Held, and reached: the cap was the limit, not the load.
    const stats = await Promise.all(daemons.map(fleetStats));
    expect(origin.maxOpen, JSON.stringify(stats)).toBeLessThanOrEqual(cap);
    expect(origin.maxOpen).toBe(cap);
    expect(stats.reduce((sum, s) => sum + s.slotWaits, 0)).toBeGreaterThan(0);
    for (const client of clients) await client.close();
    // Every slot given back once the connections closed.
    await eventually(
      async () => (await Promise.all(daemons.map(fleetStats))).every((s) => s.heldSlots === 0),
      'slots released',
    );
    expect(fdCount()).toBe(before);
    // And Redis counts none of them any more: a count left there would hold the cap against the whole fleet.
    await eventually(
      async () => (await redis.cli('HLEN', `sockpool:{default}:slots:127.0.0.1:${origin.port}`)).trim() === '0',
      'Redis counts no slot of the origin',
    );
  });

  it('a take that Redis refused after a heartbeat had stated it as held leaves no slot behind', async () => {
    // Members in this process, so that each take is made once (a daemon's connect asks again until it gets one), and
    // their heartbeats beat when the test says (a fake setInterval; Redis commands and their timeouts run as ever).
    // A heartbeat states the takes still under way as held: Redis may have granted them already.
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    cleanups.push(() => vi.useRealTimers());
    // (Memberships outlive the test: a member the test does not beat for stays in.)
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'refused', heartbeatMs: 100, slotTtlMs: 60_000 } },
      'test',
    ).fleet;
    const beat = () => vi.advanceTimersByTime(config.heartbeatMs);
    const log = pino({ level: 'silent' });
    const [holder, asker, other] = [new Fleet(config, log), new Fleet(config, log), new Fleet(config, log)];
    for (const member of [holder, asker, other]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    const origin = '127.0.0.1:9';
    const cap = 1;
    expect(await holder.takeSlot(origin, cap, false, () => true)).toBe(true);
    // Redis holds the asker's take while the asker's heartbeat is sent behind it: Redis refuses the take (the cap is
    // reached), then applies the heartbeat that stated it as held.
    const askerInRedis = async () =>
      (await redis.cli('CLIENT', 'LIST')).split('\n').find((line) => line.includes(`name=sockpoold/${asker.id} `));
    cleanups.push(() => redis.cli('CLIENT', 'UNPAUSE'));
    await redis.cli('CLIENT', 'PAUSE', '30000', 'WRITE');
    const take = asker.takeSlot(origin, cap, false, () => true);
    await eventually(async () => / flags=b /.test((await askerInRedis()) ?? ''), "the asker's take held by the pause");
    beat();
    await eventually(async () => !/ qbuf=0 /.test((await askerInRedis()) ?? ' qbuf=0 '), 'its heartbeat behind it');
    await redis.cli('CLIENT', 'UNPAUSE');
    expect(await take).toBe(false);
    expect(asker.held(origin)).toBe(0);
    // The holder gives its slot back: nobody holds one, so another member gets it, at once (no heartbeat since;
    // before, the asker's count stayed in Redis, and no later heartbeat of the asker named the origin again).
    holder.releaseSlots(origin, 1);
    await eventually(
      () => other.takeSlot(origin, cap, false, () => true),
      'another member takes the slot nobody holds',
    );
    expect(await redis.cli('HGETALL', `sockpool:{refused}:slots:${origin}`)).toBe(`${other.id}\n1\n`);
  });

  it('a slot given back while Redis was unavailable is stated by the next heartbeat', async () => {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval'] });
    cleanups.push(() => vi.useRealTimers());
    const config = parseConfig({ fleet: { redis: redis.url, name: 'skipped', heartbeatMs: 100 } }, 'test').fleet;
    const member = new Fleet(config, pino({ level: 'silent' }));
    await member.start();
    cleanups.push(() => member.close());
    const slots = (origin: string) => redis.cli('HGETALL', `sockpool:{skipped}:slots:${origin}`);
    // A slot of one origin taken in Redis; no heartbeat has stated it (the heartbeats beat when the test says).
    expect(await member.takeSlot('127.0.0.1:1', 4, false, () => true)).toBe(true);
    expect(await slots('127.0.0.1:1')).toBe(`${member.id}\n1\n`);
    // A take of another origin over 1 s (Redis paused): Redis counts as unavailable, the connection stays up.
    cleanups.push(() => redis.cli('CLIENT', 'UNPAUSE'));
    await redis.cli('CLIENT', 'PAUSE', '30000', 'WRITE');
    expect(await member.takeSlot('127.0.0.1:2', 4, false, () => true)).toBe(true); // its local share
    expect(member.state).toBe('unavailable');
    // Given back meanwhile: not sent to Redis. Redis answers again; the next heartbeat states the origin's count.
    member.releaseSlots('127.0.0.1:1', 1);
    await redis.cli('CLIENT', 'UNPAUSE');
    await eventually(async () => {
      vi.advanceTimersByTime(config.heartbeatMs);
      return member.state === 'connected' && (await slots('127.0.0.1:1')).trim() === '';
    }, 'Redis counts no slot of the origin given back');
  });

  it("a connect waiting for a slot is woken by another member's release (the freed channel), not by polling", async () => {
    const config = parseConfig({ fleet: { redis: redis.url, name: 'freed' } }, 'test').fleet;
    const log = pino({ level: 'silent' });
    // The asker's fallback poll is longer than the test may take: only the channel can wake it in time.
    const [holder, asker] = [new Fleet(config, log), new Fleet(config, log, { slotWaitHeardMs: 600_000 })];
    for (const member of [holder, asker]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    const origin = '127.0.0.1:10';
    expect(await holder.takeSlot(origin, 1, false, () => true)).toBe(true);
    let waiting = true;
    const taken = asker.takeSlot(origin, 1, true, () => waiting);
    await eventually(() => asker.counters.slotWaits === 1, 'the asker waiting for the slot');
    holder.releaseSlots(origin, 1);
    expect(await taken).toBe(true);
    expect(asker.held(origin)).toBe(1);
    waiting = false;
  });

  it('a freed slot goes to the member that waits for it, then round robin; a member that stops waiting leaves the queue', async () => {
    // No heartbeat inside the test: a heartbeat states each member's own count, and every member here still counts
    // the slot the test freed behind its back, so one that came between a free and the next take undid the free (a
    // loaded run took longer than the default second).
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'fair', heartbeatMs: 60_000, slotTtlMs: 180_000 } },
      'test',
    ).fleet;
    const log = pino({ level: 'silent' });
    // Waiting members wake only when the test publishes on the freed channel (their fallback poll is out of reach).
    const quiet = { slotWaitHeardMs: 600_000 };
    const [holder, waiter, other] = [
      new Fleet(config, log),
      new Fleet(config, log, quiet),
      new Fleet(config, log, quiet),
    ];
    for (const member of [holder, waiter, other]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    const origin = '127.0.0.1:11';
    const slotsKey = `sockpool:{fair}:slots:${origin}`;
    const queue = async () => (await redis.cli('ZRANGE', `sockpool:{fair}:waiters:${origin}`, '0', '-1')).trim();
    // The slot is freed without a word (as a dead member's expire): nobody is woken.
    const freeSilently = (member: Fleet) => redis.cli('HDEL', slotsKey, member.id);
    const wakeAll = () => redis.cli('PUBLISH', 'sockpool:{fair}:freed', slotsKey);
    expect(await holder.takeSlot(origin, 1, false, () => true)).toBe(true);

    let waiting = true;
    const first = waiter.takeSlot(origin, 1, true, () => waiting);
    await eventually(() => waiter.counters.slotWaits === 1, 'the waiter waiting');
    expect(await queue()).toBe(waiter.id);
    // Free, but the waiter was first: another member's take that does not wait (a refill, a prewarm) is refused.
    await freeSilently(holder);
    expect(await other.takeSlot(origin, 1, false, () => true)).toBe(false);
    await wakeAll();
    expect(await first).toBe(true);
    expect(await queue()).toBe('');

    // Round robin: `other` waits, then the waiter again; the waiter's slot frees and everyone is woken: `other` first.
    const others = other.takeSlot(origin, 1, true, () => true);
    await eventually(() => other.counters.slotWaits === 1, 'the other member waiting');
    const second = waiter.takeSlot(origin, 1, true, () => waiting);
    await eventually(() => waiter.counters.slotWaits === 2, 'the waiter waiting again');
    expect(await queue()).toBe(`${other.id}\n${waiter.id}`);
    await freeSilently(waiter);
    await wakeAll();
    expect(await others).toBe(true);
    expect(await queue()).toBe(waiter.id);

    // The waiter gives up: it leaves the queue, so a slot freed later is free for any member at once.
    waiting = false;
    await wakeAll();
    expect(await second).toBe(false);
    await eventually(async () => (await queue()) === '', 'the waiter out of the queue');
    await freeSilently(other);
    expect(await holder.takeSlot(origin, 1, false, () => true)).toBe(true);
  });

  it("a slot held by a connection idle in another member's client cache goes to the member that waits", async () => {
    // A kept-alive origin: the first client's curl keeps its connection (and so its daemon's fleet slot) after the
    // request. The other member's heartbeat-borne wait makes the holder ask its client for idle leases (`reclaim`).
    const origin = await countingOrigin(0, true);
    cleanups.push(() => origin.close());
    const [holder, waiter] = await startFleet(2, origin.port, {
      origins: [{ match: `127.0.0.1:${origin.port}`, maxPerOriginFleet: 1 }],
    });
    const url = `http://127.0.0.1:${origin.port}/idle`;
    expect((await clientOf(holder!, 1).request(url)).status).toBe(200);
    expect((await fleetStats(holder!)).heldSlots).toBe(1);
    // Before: the waiting member's request timed out (the slot stayed with the idle connection for minutes).
    expect((await clientOf(waiter!, 1).request(url, { timeoutMs: 10_000 })).status).toBe(200);
    expect(origin.maxOpen).toBe(1);
  });

  it('a daemon killed with SIGKILL: its slots come back after the heartbeat expiry', async () => {
    const origin = await countingOrigin(0, true);
    cleanups.push(() => origin.close());
    const [a, b] = await startFleet(
      2,
      origin.port,
      { defaults: { maxPerOriginFleet: 2, maxIdle: 2 } },
      { slotTtlMs: 1_000 },
    );
    // Daemon a takes both slots and holds them: two leases it handed out and nobody closes.
    const holder = openRawClient(a!.socketPath, cleanups);
    const held: number[] = [];
    for (const id of [1, 2]) {
      const reply = await holder.request({ type: 'acquire', id, host: '127.0.0.1', port: origin.port });
      expect(reply.message).toMatchObject({ type: 'lease' });
      held.push(...reply.fds);
    }
    cleanups.push(() => {
      for (const fd of held) native.close(fd);
    });
    // Daemon b cannot connect while a lives: the fleet is full.
    const waiter = openRawClient(b!.socketPath, cleanups);
    const refused = await waiter.request({
      type: 'acquire',
      id: 1,
      host: '127.0.0.1',
      port: origin.port,
      timeoutMs: 300,
    });
    expect(refused.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT' });
    a!.child.kill('SIGKILL');
    // Within the expiry (slotTtlMs 1 s), b gets a slot: it waits on the fleet, never on a.
    const granted = await waiter.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: origin.port });
    expect(granted.message?.type).toBe('lease');
    for (const fd of granted.fds) native.close(fd);
    await a!.stop();
  });
});

describe('fleet-wide rates', () => {
  it('three daemons under load: no faster than requestsPerSecond across them; past the deadline: RATE_LIMITED', async () => {
    const origin = await countingOrigin(0, true);
    cleanups.push(() => origin.close());
    const rate = 20;
    const daemons = await startFleet(3, origin.port, {
      origins: [{ match: `127.0.0.1:${origin.port}`, requestsPerSecond: rate, burst: 1 }],
    });
    const clients = daemons.map((daemon) => clientOf(daemon, 8));
    const perClient = 20;
    const arrivals: number[] = [];
    const started = performance.now();
    const results = await Promise.all(
      clients.flatMap((client, c) =>
        Array.from({ length: perClient }, (_, i) =>
          client.request(`http://127.0.0.1:${origin.port}/r${c}/${i}`).then((response) => {
            arrivals.push(performance.now());
            return response;
          }),
        ),
      ),
    );
    expect(results.every((response) => response.status === 200)).toBe(true);
    expect(origin.requests).toBe(3 * perClient);
    // GCRA with burst 1: the n-th token is granted no sooner than (n - 1) / rate after the first. A lower bound on
    // the time taken (load only makes it longer): the fleet held the rate, it did not multiply it by three.
    const last = Math.max(...arrivals);
    expect(last - started).toBeGreaterThanOrEqual(((3 * perClient - 1) / rate) * 1000 * 0.98);
    const stats = await Promise.all(daemons.map((daemon) => daemonStats(daemon.socketPath)));
    const granted = stats.reduce((sum, s) => sum + (s as unknown as { rates: { granted: number } }).rates.granted, 0);
    expect(granted).toBeGreaterThanOrEqual(3 * perClient);

    // A request that cannot get a token before its deadline fails, saying how long it would have waited.
    const slowOrigin = await countingOrigin(0, true);
    cleanups.push(() => slowOrigin.close());
    const [slowDaemon] = await startFleet(
      1,
      slowOrigin.port,
      { origins: [{ match: `127.0.0.1:${slowOrigin.port}`, requestsPerSecond: 0.2, burst: 1 }] },
      { name: 'slow' },
    );
    const slowClient = clientOf(slowDaemon!, 2);
    expect((await slowClient.request(`http://127.0.0.1:${slowOrigin.port}/first`)).status).toBe(200);
    const refused = await slowClient.request(`http://127.0.0.1:${slowOrigin.port}/second`, { timeoutMs: 500 }).then(
      () => undefined,
      (error: { code: string; waitMs?: number }) => error,
    );
    expect(refused?.code).toBe('SOCKPOOL_ERR_RATE_LIMITED');
    expect(refused?.waitMs).toBeGreaterThan(500);
    expect(slowOrigin.requests).toBe(1);
  });
});

describe('Redis unavailable', () => {
  it('killed and restarted mid-load: no request lost, local shares while it is down, the fleet again after', async () => {
    const origin = await countingOrigin(10);
    cleanups.push(() => origin.close());
    const cap = 4;
    const daemons = await startFleet(2, origin.port, { defaults: { maxPerOriginFleet: cap } });
    const clients = daemons.map((daemon) => clientOf(daemon, 6));
    let sent = 0;
    const load = async (client: SockpoolClient, rounds: number) => {
      const statuses: number[] = [];
      for (let round = 0; round < rounds; round++) {
        const batch = await Promise.all(
          Array.from({ length: 6 }, () => client.request(`http://127.0.0.1:${origin.port}/l${sent++}`)),
        );
        statuses.push(...batch.map((response) => response.status));
      }
      return statuses;
    };
    const phase = async () => (await Promise.all(clients.map((client) => load(client, 3)))).flat();
    const before = await phase();
    const maxBefore = origin.maxOpen;
    await redis.kill();
    await eventually(
      async () => (await Promise.all(daemons.map(fleetStats))).every((s) => s.state === 'unavailable'),
      'both daemons see Redis gone',
    );
    origin.maxOpen = origin.open; // (the most open at once from here on; the request count goes on)
    const during = await phase();
    const maxDuring = origin.maxOpen;
    await redis.start();
    await eventually(
      async () => (await Promise.all(daemons.map(fleetStats))).every((s) => s.state === 'connected'),
      'both daemons back in the fleet',
    );
    const after = await phase();
    for (const statuses of [before, during, after]) expect(statuses.filter((status) => status !== 200)).toEqual([]);
    expect(origin.requests).toBe(sent);
    const stats = await Promise.all(daemons.map(fleetStats));
    expect(stats.every((s) => s.outages >= 1)).toBe(true);
    expect(stats.reduce((sum, s) => sum + s.fallbackSlots, 0)).toBeGreaterThan(0);
    // With Redis the cap held. While it is down each daemon holds itself to its share (cap / members last seen: 2
    // each), decided and counted in one step: connects asking in the same turn each see the ones granted before
    // them (deciding first and counting after the turn let all six of each client's connects through: 12 open).
    expect(maxBefore, JSON.stringify(stats)).toBe(cap);
    expect(maxDuring, JSON.stringify(stats)).toBeLessThanOrEqual(cap);
    expect(maxDuring).toBeGreaterThan(0);
    // Back in Redis: the members are there again. Each daemon counts the members at its own heartbeat, and the first
    // heartbeat after the restart may come before the other daemon has joined again: the count follows within one.
    await eventually(
      async () => (await Promise.all(daemons.map(fleetStats))).every((s) => s.members === 2),
      'both daemons count two members again',
    );
  });
});

describe('the warm handoff path', () => {
  it('asks Redis nothing: warm acquires and releases leave the command counts of Redis unchanged', async () => {
    const origin = await countingOrigin(0, true);
    cleanups.push(() => origin.close());
    // Heartbeats and demand far apart: whatever Redis counts during the handoffs would be theirs.
    const [daemon] = await startFleet(
      1,
      origin.port,
      { defaults: { maxPerOriginFleet: 4 } },
      { heartbeatMs: 60_000, slotTtlMs: 180_000, demandPublishMs: 60_000 },
    );
    const raw = openRawClient(daemon!.socketPath, cleanups);
    const acquire = async (id: number) => {
      const reply = await raw.request({ type: 'acquire', id, host: '127.0.0.1', port: origin.port });
      expect(reply.message).toMatchObject({ type: 'lease' });
      return { lease: reply.message as unknown as { leaseId: number; warm: boolean }, fd: reply.fds[0]! };
    };
    // The cold one takes its slot from Redis; it goes back to the pool unused.
    const cold = await acquire(1);
    expect(cold.lease.warm).toBe(false);
    raw.sendJson({ type: 'release', leaseId: cold.lease.leaseId, withoutFd: true });
    native.close(cold.fd);
    const calls = async () => {
      const info = await redis.cli('INFO', 'commandstats');
      let total = 0;
      for (const match of info.matchAll(/^cmdstat_(\w+):calls=(\d+)/gm))
        if (match[1] !== 'info') total += Number(match[2]);
      return total;
    };
    // Wait until the cold release settled (its slot stays: the socket is idle in the pool).
    await eventually(async () => (await fleetStats(daemon!)).heldSlots === 1, 'one slot held');
    const before = await calls();
    for (let id = 2; id < 22; id++) {
      const warm = await acquire(id);
      expect(warm.lease.warm).toBe(true);
      raw.sendJson({ type: 'release', leaseId: warm.lease.leaseId, withoutFd: true });
      native.close(warm.fd);
    }
    expect((await daemonStats(daemon!.socketPath)).hits).toBeGreaterThanOrEqual(20);
    expect(await calls()).toBe(before);
  });
});

describe('shared warming', () => {
  it("a daemon that starts warms the fleet's busiest origin", async () => {
    const origin = await countingOrigin(0, true);
    cleanups.push(() => origin.close());
    const [busy] = await startFleet(1, origin.port, {}, { demandPublishMs: 200 });
    const client = clientOf(busy!, 4);
    for (let i = 0; i < 20; i++)
      expect((await client.request(`http://127.0.0.1:${origin.port}/b${i}`)).status).toBe(200);
    await eventually(
      async () => (await redis.cli('KEYS', 'sockpool:{default}:demand:*')).includes('demand'),
      'demand published',
    );
    const accepted = origin.open;
    const fresh = await startTestDaemon([origin.port], {
      config: { fleet: { redis: redis.url, heartbeatMs: 200, slotTtlMs: 5_000 } },
    });
    cleanups.push(() => fresh.stop());
    await eventually(
      async () => (await daemonStats(fresh.socketPath)).idle >= 1,
      'the new daemon holds a warm socket it was never asked for',
    );
    expect(origin.open).toBeGreaterThan(accepted);
  });
});

describe('configuration', () => {
  it('bad fleet configuration is refused with the key named', async () => {
    const cases: Array<[object, string]> = [
      [{ fleet: { redis: 'http://127.0.0.1:6379' } }, 'fleet.redis'],
      [{ fleet: { redis: redis.url, onUnavailable: 'maybe' } }, 'fleet.onUnavailable'],
      [{ fleet: { name: 'no spaces' } }, 'fleet.name'],
      [{ pool: { defaults: { maxPerOriginFleet: 0 } } }, 'pool.defaults.maxPerOriginFleet'],
      [{ pool: { defaults: { burst: 5 } } }, 'pool.defaults.burst'],
      [{ pool: { origins: [{ match: 'a.example:443', requestsPerSecond: -1 }] } }, 'pool.origins[0].requestsPerSecond'],
    ];
    for (const [config, key] of cases) {
      const path = writeConfigFile(config, cleanups);
      const failure = await run(process.execPath, [daemonMain, '--config', path]).then(
        () => undefined,
        (error: { code: number; stderr: string }) => error,
      );
      expect(failure?.code).toBe(2);
      expect(failure?.stderr).toContain('SOCKPOOL_ERR_CONFIG');
      expect(failure?.stderr).toContain(key);
    }
    const flag = await run(process.execPath, [daemonMain, '--fleet-redis', 'redis://']).then(
      () => undefined,
      (error: { code: number; stderr: string }) => error,
    );
    expect(flag?.stderr).toContain('--fleet-redis');
  });
});
