// The fleet's shared state kept honest, with in-process Fleet members against a real redis-server
// (test/helpers/redis.ts): a member started while Redis was down still hears the `freed` channel once Redis is up; a
// connect refused once and no longer wanted leaves no entry in the origin's queue to hold a free slot from the
// others; a member with a short slotTtlMs does not cut short the keys a live member's slots are counted in (the
// fleet stays within its cap); and a fleet.redis database the server does not have leaves the fleet unavailable
// instead of writing to database 0. A member asked for slots or tokens before its first heartbeat waits for it. The
// members counted for local shares do not fall after an outage, and a member that never counted them refuses. A
// heartbeat over very many origins still goes through, and states none that Redis never counted.
import { once } from 'node:events';
import { createServer } from 'node:net';
import pino from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig } from '../daemon/config.js';
import { Fleet } from '../daemon/fleet/fleet.js';
import { startTestDaemon } from './fixtures/client-helpers.js';
import { eventually } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { type RedisServer, startRedis } from './helpers/redis.js';

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
const log = pino({ level: 'silent' });

describe('the freed channel', () => {
  it('a member started while Redis was down hears the freed channel once Redis is up', async () => {
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'downatstart', heartbeatMs: 100, slotTtlMs: 300 } },
      'test',
    ).fleet;
    await redis.kill();
    // Its fallback poll is out of reach: only the channel can wake it in time (as in fleet.system.test.ts).
    const asker = new Fleet(config, log, { slotWaitHeardMs: 600_000 });
    await asker.start();
    cleanups.push(() => asker.close());
    expect(asker.available).toBe(false);
    await redis.start();
    const holder = new Fleet(config, log);
    await holder.start();
    cleanups.push(() => holder.close());
    await eventually(() => asker.available, 'the asker connected', 15_000);
    // Past the trust window after an outage (max(slotTtlMs, 2 s + 2 heartbeats)): slot decisions are Redis's again.
    await new Promise((resolve) => setTimeout(resolve, 2_600));
    // Both members should be subscribed to the freed channel by now.
    const subscribers = (await redis.cli('PUBSUB', 'NUMSUB', 'sockpool:{downatstart}:freed')).trim().split('\n')[1];
    expect(subscribers, 'subscribers of the freed channel').toBe('2');
    const origin = '127.0.0.1:20';
    expect(await holder.takeSlot(origin, 1, false, () => true)).toBe(true);
    let waiting = true;
    cleanups.push(() => {
      waiting = false;
    });
    const taken = asker.takeSlot(origin, 1, true, () => waiting);
    await eventually(() => asker.counters.slotWaits === 1, 'the asker waiting for the slot');
    holder.releaseSlots(origin, 1);
    const outcome = await Promise.race([
      taken,
      new Promise<string>((resolve) => setTimeout(() => resolve('not woken within 5 s'), 5_000)),
    ]);
    expect(outcome).toBe(true);
  });
});

describe('the queue of waiters', () => {
  it('a connect refused once and no longer wanted leaves no entry in the queue that holds a free slot', async () => {
    const config = parseConfig({ fleet: { redis: redis.url, name: 'stalequeue' } }, 'test').fleet;
    const [holder, quitter, other] = [new Fleet(config, log), new Fleet(config, log), new Fleet(config, log)];
    for (const member of [holder, quitter, other]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    const origin = '127.0.0.1:21';
    const queue = async () => (await redis.cli('ZRANGE', `sockpool:{stalequeue}:waiters:${origin}`, '0', '-1')).trim();
    expect(await holder.takeSlot(origin, 1, false, () => true)).toBe(true);
    // A waiter's connect (wait: true) whose acquire timed out or was served while its take was under way: refused,
    // then not wanted any more. It never waited, so nothing of this daemon waits for the origin.
    expect(await quitter.takeSlot(origin, 1, true, () => false)).toBe(false);
    expect(quitter.counters.slotWaits).toBe(0);
    // The slot frees; nobody waits for it: another member's refill (wait: false) should get it.
    holder.releaseSlots(origin, 1);
    await eventually(
      async () => (await redis.cli('HLEN', `sockpool:{stalequeue}:slots:${origin}`)).trim() === '0',
      'released',
    );
    const queued = await queue();
    const took = await other.takeSlot(origin, 1, false, () => true);
    expect({ queued, took }).toEqual({ queued: '', took: true });
  });
});

describe('a member asked before it has joined', () => {
  // The daemon serves clients before its fleet's first heartbeat has come back (Daemon.start): a connect or a
  // rate-limited acquire in that window must wait for the fleet's answer, not decide alone as if Redis were down.
  const newcomer = (name: string, onUnavailable: 'local' | 'refuse' = 'local') =>
    new Fleet(parseConfig({ fleet: { redis: redis.url, name, onUnavailable } }, 'test').fleet, log);

  it('waits for its first heartbeat: a slot the fleet has none left of is refused, not granted alone', async () => {
    const holder = newcomer('earlyslot');
    await holder.start();
    cleanups.push(() => holder.close());
    const origin = '127.0.0.1:23';
    const cap = 2;
    expect([
      await holder.takeSlot(origin, cap, false, () => true),
      await holder.takeSlot(origin, cap, false, () => true),
    ]).toEqual([true, true]);
    const late = newcomer('earlyslot');
    cleanups.push(() => late.close());
    // Asked before start(): alone, its share by the one member it knows of (itself) is the whole cap.
    const taken = late.takeSlot(origin, cap, false, () => true);
    await late.start();
    expect({ granted: await taken, fallbackSlots: late.counters.fallbackSlots }).toEqual({
      granted: false,
      fallbackSlots: 0,
    });
  });

  it('in `refuse` mode, is not refused for a Redis that is up', async () => {
    const late = newcomer('earlyrefuse', 'refuse');
    cleanups.push(() => late.close());
    const taken = late.takeSlot('127.0.0.1:24', 2, false, () => true);
    await late.start();
    expect({ granted: await taken, refused: late.counters.refused }).toEqual({ granted: true, refused: 0 });
  });

  it('takes request tokens from the fleet, not from a share of its own', async () => {
    const holder = newcomer('earlytokens');
    await holder.start();
    cleanups.push(() => holder.close());
    const params = { requestsPerSecond: 0.1, burst: 3 };
    const everything = (share: { burst: number }) => ({ granted: share.burst, waitMs: 0 });
    const origin = '127.0.0.1:25';
    expect((await holder.takeTokens(origin, params, 3, everything)).granted).toBe(3);
    const late = newcomer('earlytokens');
    cleanups.push(() => late.close());
    const taken = late.takeTokens(origin, params, 3, everything);
    await late.start();
    expect({ granted: (await taken).granted, fallbackTokens: late.counters.fallbackTokens }).toEqual({
      granted: 0,
      fallbackTokens: 0,
    });
  });
});

describe('a member that starts to wait for a slot', () => {
  it('tells the members holding that origin’s slots at once, not at their next heartbeat', async () => {
    // Heartbeats 20 s apart: what the heartbeat would tell comes far too late for the test's wait.
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'contended', heartbeatMs: 20_000, slotTtlMs: 60_000 } },
      'test',
    ).fleet;
    const [holder, asker] = [new Fleet(config, log), new Fleet(config, log)];
    for (const member of [holder, asker]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    const contended: string[] = [];
    holder.onContended = (key) => contended.push(key);
    asker.onContended = (key) => contended.push(`asker ${key}`);
    const origin = '127.0.0.1:26';
    expect(await holder.takeSlot(origin, 1, false, () => true)).toBe(true);
    let waiting = true;
    cleanups.push(() => {
      waiting = false;
    });
    void asker.takeSlot(origin, 1, true, () => waiting);
    // (The holder then asks its clients to give back connections of the origin idle in their caches: PoolManager.)
    await eventually(() => contended.length > 0, 'the holder told of the wait', 5_000);
    expect(contended).toEqual([origin]);
  });

  it('acts on notices for one origin at most every 100 ms: each asks every client holding a lease of it', async () => {
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'noticegap', heartbeatMs: 20_000, slotTtlMs: 60_000 } },
      'test',
    ).fleet;
    const holder = new Fleet(config, log);
    await holder.start();
    cleanups.push(() => holder.close());
    const contended: string[] = [];
    holder.onContended = (key) => contended.push(key);
    const origin = '127.0.0.1:27';
    expect(await holder.takeSlot(origin, 1, false, () => true)).toBe(true);
    // Ten notices at once (as a busy cap's grants queue other members again and again), then one more later.
    const notice = ['PUBLISH', 'sockpool:{noticegap}:contended', `other sockpool:{noticegap}:slots:${origin}`];
    await redis.cli('EVAL', `for i = 1, 10 do redis.call(unpack(ARGV)) end return 1`, '0', ...notice);
    await eventually(() => contended.length > 0, 'the first notice acted on', 5_000);
    await new Promise((resolve) => setTimeout(resolve, 150));
    await redis.cli(...notice);
    await eventually(() => contended.length > 1, 'the later notice acted on', 5_000);
    expect(contended).toEqual([origin, origin]);
  });
});

describe('key expiry set by members of different settings', () => {
  it("a member with a short slotTtlMs does not expire a live member's slots (the fleet stays within its cap)", async () => {
    // Both settings are valid (slotTtlMs >= 3 × heartbeatMs); members of one fleet need not share them.
    const slow = parseConfig(
      { fleet: { redis: redis.url, name: 'mixedttl', heartbeatMs: 20_000, slotTtlMs: 60_000 } },
      'test',
    ).fleet;
    const fast = parseConfig(
      { fleet: { redis: redis.url, name: 'mixedttl', heartbeatMs: 100, slotTtlMs: 300 } },
      'test',
    ).fleet;
    const [holder, quick, other] = [new Fleet(slow, log), new Fleet(fast, log), new Fleet(fast, log)];
    for (const member of [holder, quick, other]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    const origin = '127.0.0.1:22';
    const cap = 2;
    // The holder (alive, heartbeat every 20 s, slots good for 60 s) holds one slot.
    expect(await holder.takeSlot(origin, cap, false, () => true)).toBe(true);
    // The quick member takes the other and gives it back: its take set the origin's hash to expire in 3 s.
    expect(await quick.takeSlot(origin, cap, false, () => true)).toBe(true);
    quick.releaseSlots(origin, 1);
    await new Promise((resolve) => setTimeout(resolve, 3_500));
    // The holder still holds its slot and is alive: only one more slot is free.
    const slots = (await redis.cli('HGETALL', `sockpool:{mixedttl}:slots:${origin}`)).trim();
    const first = await other.takeSlot(origin, cap, false, () => true);
    const second = await other.takeSlot(origin, cap, false, () => true);
    expect({ holderInRedis: slots.includes(holder.id), granted: [first, second] }).toEqual({
      holderInRedis: true,
      granted: [true, false],
    });
  });
});

describe('slots given back while slot decisions stay local after an outage', () => {
  it('leave Redis counting no fewer than the member holds: a slot granted locally is not taken off its count', async () => {
    // A long heartbeat and slot ttl: within the test only the recovery heartbeat states the counts (and the trust
    // window after the outage, max(slotTtlMs, 2 s + 2 heartbeats), outlasts the test).
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'afteroutage', heartbeatMs: 60_000, slotTtlMs: 180_000 } },
      'test',
    ).fleet;
    const member = new Fleet(config, log);
    await member.start();
    cleanups.push(() => member.close());
    const origin = '127.0.0.1:21';
    const countInRedis = async () =>
      Number((await redis.cli('HGET', `sockpool:{afteroutage}:slots:${origin}`, member.id)).trim() || 0);
    expect(await member.takeSlot(origin, 2, false, () => true)).toBe(true);
    expect(await countInRedis()).toBe(1);
    await redis.kill();
    await eventually(() => !member.available, 'the member saw the outage', 15_000);
    await redis.start(); // empty: the recovery heartbeat states the one slot held
    await eventually(() => member.available, 'the member back', 15_000);
    await eventually(async () => (await countInRedis()) === 1, 'the held slot stated again', 15_000);
    // Within the trust window: granted from the member's local share (cap 2, one member), which Redis does not count.
    expect(await member.takeSlot(origin, 2, false, () => true)).toBe(true);
    expect(member.held(origin)).toBe(2);
    member.releaseSlots(origin, 1);
    await new Promise((resolve) => setTimeout(resolve, 300));
    // The member holds one; Redis must count at least that until the next heartbeat states it, or another member
    // could take a slot past the cap meanwhile.
    expect(member.held(origin)).toBe(1);
    expect(await countInRedis()).toBeGreaterThanOrEqual(1);
  }, 60_000);
});

describe('the members counted for local shares around an outage', () => {
  const takeAll = async (member: Fleet, origin: string, cap: number, tries: number) => {
    for (let i = 0; i < tries; i++) await member.takeSlot(origin, cap, false, () => true);
  };
  /** Two members of fleet `name`, each holding 2 of `origin`'s cap of 4, both having counted two members. */
  const twoHoldingHalf = async (name: string, heartbeatMs: number, slotTtlMs: number, origin: string) => {
    const config = parseConfig({ fleet: { redis: redis.url, name, heartbeatMs, slotTtlMs } }, 'test').fleet;
    const [a, b] = [new Fleet(config, log), new Fleet(config, log)];
    for (const member of [a, b]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    await takeAll(a, origin, 4, 2);
    await takeAll(b, origin, 4, 2);
    await eventually(() => a.members === 2 && b.members === 2, 'both have counted two members', 12_000);
    return { config, a, b };
  };

  it('the first member back in a Redis restarted empty still counts the members before the outage', async () => {
    // Long heartbeats: after the restart each member's recovery heartbeat is its only one within the test, and the
    // first to rejoin is counted alone by Redis.
    const origin = '127.0.0.1:40';
    const cap = 4;
    const { a, b } = await twoHoldingHalf('restartempty', 5_000, 15_000, origin);
    await redis.kill();
    await redis.start(); // empty
    await eventually(() => a.available && b.available, 'both back', 15_000);
    // Within the trust window slot decisions are each member's share: 4 / 2 members, already held.
    await takeAll(a, origin, cap, 4);
    await takeAll(b, origin, cap, 4);
    expect({ total: a.held(origin) + b.held(origin), members: [a.members, b.members] }).toEqual({
      total: cap,
      members: [2, 2],
    });
  }, 30_000);

  it('grants no fresh burst from a Redis restarted empty: its members state again the rates they knew', async () => {
    // 1 token every 20 s, burst 4: the burst a spends now is not back before the test ends.
    const origin = '127.0.0.1:42';
    const params = { requestsPerSecond: 0.05, burst: 4 };
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'rateafterrestart', heartbeatMs: 5_000, slotTtlMs: 15_000 } },
      'test',
    ).fleet;
    const [a, b] = [new Fleet(config, log), new Fleet(config, log)];
    for (const member of [a, b]) {
      await member.start();
      cleanups.push(() => member.close());
    }
    const notLocal = (): never => {
      throw new Error('tokens from Redis were expected, not from the local share');
    };
    const before = (await a.takeTokens(origin, params, 4, notLocal)).granted;
    await redis.kill();
    await redis.start(); // empty: the rate's state is gone with it
    await eventually(() => a.available && b.available, 'both back', 15_000);
    // b took none before: it knows nothing of the rate, and asks first.
    const afterB = (await b.takeTokens(origin, params, 4, notLocal)).granted;
    const afterA = (await a.takeTokens(origin, params, 4, notLocal)).granted;
    expect({ before, afterB, afterA }).toEqual({ before: 4, afterB: 0, afterA: 0 });
  }, 30_000);

  it('grants no fresh burst for a rate whose key Redis lost while its member stayed connected (a flush, an eviction)', async () => {
    const origin = '127.0.0.1:43';
    const params = { requestsPerSecond: 0.05, burst: 4 };
    const config = parseConfig(
      { fleet: { redis: redis.url, name: 'ratekeylost', heartbeatMs: 5_000, slotTtlMs: 15_000 } },
      'test',
    ).fleet;
    const member = new Fleet(config, log);
    await member.start();
    cleanups.push(() => member.close());
    const notLocal = (): never => {
      throw new Error('tokens from Redis were expected, not from the local share');
    };
    const before = (await member.takeTokens(origin, params, 4, notLocal)).granted;
    await redis.cli('FLUSHALL');
    const after = await member.takeTokens(origin, params, 4, notLocal);
    expect({ before, after: after.granted, stillConnected: member.available }).toEqual({
      before: 4,
      after: 0,
      stillConnected: true,
    });
  }, 30_000);

  it('a member started while Redis is down refuses slots and tokens until it has counted the members', async () => {
    const origin = '127.0.0.1:41';
    const cap = 4;
    const { config, a, b } = await twoHoldingHalf('startdown', 300, 3_000, origin);
    await redis.kill();
    // b restarts while Redis is down (a new member, which has seen no other); a keeps its 2 by its share.
    await b.close();
    const late = new Fleet(config, log);
    await late.start();
    cleanups.push(() => late.close());
    const outcomes: string[] = [];
    const attempt = async (taking: Promise<unknown>) => {
      outcomes.push(await taking.then(String, (error: { code?: string }) => String(error.code)));
    };
    await attempt(late.takeSlot(origin, cap, false, () => true));
    await attempt(late.takeTokens(origin, { requestsPerSecond: 1, burst: 4 }, 4, () => ({ granted: 4, waitMs: 0 })));
    await takeAll(a, origin, cap, 4);
    // Back in a Redis restarted empty, within the trust window: the count Redis gives may still miss members.
    await redis.start();
    await eventually(() => late.available, 'the late member joined', 15_000);
    await attempt(late.takeSlot(origin, cap, false, () => true));
    expect({ outcomes, late: late.held(origin), a: a.held(origin), refused: late.counters.refused }).toEqual({
      outcomes: Array(3).fill('SOCKPOOL_ERR_FLEET_UNAVAILABLE'),
      late: 0,
      a: 2,
      refused: 3,
    });
  }, 30_000);
});

describe('a heartbeat after an outage that touched many origins', () => {
  const outageMember = async (name: string) => {
    const config = parseConfig({ fleet: { redis: redis.url, name, heartbeatMs: 300, slotTtlMs: 1_000 } }, 'test').fleet;
    const member = new Fleet(config, log);
    await member.start();
    cleanups.push(() => member.close());
    await redis.kill();
    await eventually(() => !member.available, 'the member saw the outage', 15_000);
    return member;
  };
  const commandCalls = async (command: string) => {
    const line = (await redis.cli('INFO', 'commandstats')).split('\n').find((l) => l.startsWith(`cmdstat_${command}:`));
    return Number(/calls=(\d+)/.exec(line ?? '')?.[1] ?? 0);
  };

  it('rejoins holding slots of 50,000 origins, and states every one of them', async () => {
    const member = await outageMember('manyorigins');
    // Granted locally (its share of each origin's cap), all held when Redis comes back.
    const origins = 50_000;
    for (let i = 0; i < origins; i++) await member.takeSlot(`o${i}.example:443`, 10, false, () => true);
    expect(member.heldTotal()).toBe(origins);
    await redis.start(); // empty: the recovery heartbeat states every origin held
    // (Fifty chunks of 1,000 origins: longer on a busy machine.)
    await eventually(() => member.available, 'the member back in the fleet', 60_000);
    const stated = await redis.cli(
      'EVAL',
      "return #redis.call('KEYS', ARGV[1])",
      '0',
      'sockpool:{manyorigins}:slots:*',
    );
    expect(Number(stated.trim())).toBe(origins);
  }, 120_000);

  it('states none of the origins granted only locally and given back during the outage', async () => {
    const member = await outageMember('localonly');
    for (let i = 0; i < 2_000; i++) {
      const origin = `o${i}.example:443`;
      expect(await member.takeSlot(origin, 10, false, () => true)).toBe(true);
      member.releaseSlots(origin, 1);
    }
    await redis.start(); // empty, its command counts from 0
    await eventually(() => member.available, 'the member back in the fleet', 15_000);
    // The recovery heartbeat ran (its membership ZADD); a statement of 0 is an HDEL, and Redis never counted these.
    expect({ heartbeats: (await commandCalls('zadd')) > 0, statedZero: await commandCalls('hdel') }).toEqual({
      heartbeats: true,
      statedZero: 0,
    });
  }, 60_000);
});

describe('the fleet.redis database', () => {
  it('a database the server does not have is not silently replaced by db 0', async () => {
    // redis-server's default is 16 databases; parseRedisUrl accepts /0 to /99.
    const config = parseConfig(
      { fleet: { redis: `${redis.url.replace(/\/0$/, '')}/42`, name: 'wrongdb' } },
      'test',
    ).fleet;
    const member = new Fleet(config, log);
    await member.start();
    cleanups.push(() => member.close());
    await new Promise((resolve) => setTimeout(resolve, 500));
    // Its membership (and so its slots, rates, demand) lands in db 0, shared with whatever fleet uses db 0.
    const membersInDb0 = (await redis.cli('-n', '0', 'ZRANGE', 'sockpool:{wrongdb}:members', '0', '-1')).trim();
    expect({ state: member.state, membersInDb0 }).toEqual({ state: 'unavailable', membersInDb0: '' });
  });
});

describe('a token charged to an acquire that ends without a lease', () => {
  it('goes back to the member’s batch: the next acquire spends it instead of being refused for the rate', async () => {
    // A loopback port nothing listens on: each connect is refused after the acquire's charge took its token.
    const server = createServer().listen(0, '127.0.0.1');
    await once(server, 'listening');
    const { port } = server.address() as { port: number };
    server.close();
    await once(server, 'close');
    // One request per 10 s, burst 1: the first acquire takes the only token there is for 10 s.
    const daemon = await startTestDaemon([port], {
      config: {
        fleet: { redis: redis.url, name: 'chargeback' },
        pool: { origins: [{ match: `127.0.0.1:${port}`, requestsPerSecond: 0.1, burst: 1 }] },
      },
    });
    cleanups.push(() => daemon.stop());
    const raw = openRawClient(daemon.socketPath, cleanups);
    const acquire = (id: number) => raw.request({ type: 'acquire', id, host: '127.0.0.1', port, timeoutMs: 2_000 });
    const first = await acquire(1);
    expect(first.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_CONNECT' });
    // No request went out with that token: the next acquire is charged it (it was refused at once, its turn 10 s
    // away, past its 2 s), and meets the refused port in turn.
    const second = await acquire(2);
    expect(second.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_CONNECT' });
  }, 30_000);
});
