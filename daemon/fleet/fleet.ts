// A daemon's membership in a fleet: what several sockpoold on several hosts share through one Redis (docs/fleet.md).
// File descriptors never leave a host; what is shared is what the fleet owes each origin (connection slots under
// `maxPerOriginFleet`, request tokens under `requestsPerSecond`/`burst`) and what the fleet has seen of demand.
//
// Nothing here is on the warm handoff path: slots are taken when this daemon connects and given back when a
// connection closes (origin-pool.ts calls the SlotKeeper below); tokens are taken in batches (rate-limiter.ts).
//
// Redis down: `fleet.onUnavailable = "local"` keeps going with this daemon's share of each limit (the limit divided
// by the members last seen), counted in `fallbacks` and logged once per outage; `"refuse"` fails new connects and
// token requests with SOCKPOOL_ERR_FLEET_UNAVAILABLE. ioredis reconnects with backoff; the first heartbeat after a
// reconnect states again every slot this daemon holds (Redis may have restarted empty). A daemon that has never
// counted the members (Redis down since it started) refuses in either mode: it has no share to go by.
//
// Slot counts in Redis: a take or a release changes this daemon's count by one (HINCRBY), a heartbeat states it
// whole. Every command goes over one connection, so Redis applies them in the order they were sent. A count Redis
// may hold wrong (a heartbeat counted a take that came back refused, an answer was lost, a release failed or was
// skipped while Redis was unavailable) is corrected at once where this daemon knows the error, else by the next
// heartbeat; a count Redis kept too high would hold the fleet's cap against every member for as long as this
// daemon lives.

import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import process from 'node:process';
import { Redis } from 'ioredis';
import { ErrorCodes, SockpoolError } from '../../shared/errors.js';
import { parseRedisUrl, type SockpoolConfig } from '../config.js';
import type { Logger } from '../log.js';
import { ForgetfulMap } from './forgetful-map.js';
import type { Grant, RateParams } from './gcra.js';
import {
  HEARTBEAT_SCRIPT,
  LEAVE_SCRIPT,
  RATE_RESTATE_SCRIPT,
  RATE_SCRIPT,
  RELEASE_SLOTS_SCRIPT,
  TAKE_SLOTS_SCRIPT,
  UNWAIT_SCRIPT,
} from './scripts.js';
import { capNow, SLOT_POLL_MS, type SlotCap, type SlotLedger } from './slots.js';

type FleetConfig = SockpoolConfig['fleet'];

/** How long one Redis command may take before this daemon counts Redis as unavailable for it. */
const COMMAND_TIMEOUT_MS = 1_000;
/** Reconnect backoff: 50 ms doubling up to 2 s. */
const MAX_RECONNECT_DELAY_MS = 2_000;
/**
 * How often a connect waiting for a slot asks again while this daemon hears the fleet's `freed` channel (a release
 * wakes it at once): for slots freed without a word, those of a daemon whose heartbeat expired. Without the
 * channel it asks every SLOT_POLL_MS to 2 × SLOT_POLL_MS.
 */
const SLOT_WAIT_HEARD_MS = 250;
/**
 * A daemon in an origin's queue of waiters (scripts.ts, TAKE_SLOTS_SCRIPT) that has not asked for this long is
 * dropped from it: its waiting connects ask at least every SLOT_WAIT_HEARD_MS, so it stopped waiting (or died)
 * without a word, and the daemons behind it wait at most this long for that entry.
 */
const WAITER_TTL_MS = 4 * SLOT_WAIT_HEARD_MS;
/**
 * A member hears that another waits for an origin (the `contended` channel) at most this often per origin: at a
 * busy cap every grant can queue a member again, and each notice asks every client holding a lease of the origin.
 */
const CONTENDED_NOTICE_GAP_MS = 100;
/**
 * Origins a heartbeat (or a clean leave) passes to one script call. Spread into one call, the keys and counts of
 * some 40,000 origins (a daemon that connected to many during an outage) overflowed V8's stack ("Maximum call stack
 * size exceeded") at every heartbeat: the daemon never rejoined. One script over them all would also hold Redis
 * from every other member for as long as it ran.
 */
const HEARTBEAT_ORIGINS = 1_000;
/** Rates seen ahead kept before those that are not are forgotten (a ForgetfulMap, as the local GCRA's TATs). */
const RATES_SEEN = 10_000;

/** Where each HEARTBEAT_ORIGINS-long chunk of `length` origins starts: one chunk at least, as a call with no origin
 *  still renews (or ends) the membership. */
function chunkStarts(length: number): number[] {
  const starts = [0];
  for (let start = HEARTBEAT_ORIGINS; start < length; start += HEARTBEAT_ORIGINS) starts.push(start);
  return starts;
}

export interface FleetOptions {
  /** SLOT_WAIT_HEARD_MS, for tests that must see a waiting connect woken by the channel alone. */
  slotWaitHeardMs?: number;
}

export type FleetState = 'connecting' | 'connected' | 'unavailable';

export interface FleetCounters {
  /** Slots and tokens granted by this daemon's share alone while Redis was unavailable (`local` mode). */
  fallbackSlots: number;
  fallbackTokens: number;
  /** Connects and token requests refused while Redis was unavailable (`refuse` mode). */
  refused: number;
  /** Times Redis became unavailable. */
  outages: number;
  /** Connects that found the fleet's cap reached and waited for a slot. */
  slotWaits: number;
}

export interface FleetDemand {
  host: string;
  port: number;
  ratePerS: number;
}

interface RedisWithScripts extends Redis {
  fleetTakeSlots(...args: Array<string | number>): Promise<[number, number]>;
  fleetReleaseSlots(...args: Array<string | number>): Promise<number>;
  fleetHeartbeat(...args: Array<string | number>): Promise<[number, number[]]>;
  fleetRate(...args: Array<string | number>): Promise<[number, string, string]>;
  fleetRateRestate(...args: Array<string | number>): Promise<number>;
  fleetLeave(...args: Array<string | number>): Promise<number>;
  fleetUnwait(...args: Array<string | number>): Promise<number>;
}

export class Fleet implements SlotLedger {
  /** This daemon in the fleet: host, pid and a random part (a restarted daemon is a new member). */
  readonly id = `${hostname()}:${process.pid}:${randomBytes(4).toString('hex')}`;
  readonly #config: FleetConfig;
  readonly #redisUrl: string;
  readonly #log: Logger;
  readonly #redis: RedisWithScripts;
  /** A second connection, subscribed to the `freed` channel (a subscribed connection can send nothing else). */
  readonly #subscriber: Redis;
  readonly #prefix: string;
  readonly #slotWaitHeardMs: number;
  /** How long a daemon that stopped asking stays in an origin's queue of waiters (TAKE_SLOTS_SCRIPT). */
  readonly #waiterTtlMs: number;
  /** Connects waiting for a slot, by origin: each one's wake-up (a `freed` message, or its own timer). */
  readonly #slotWaiters = new Map<string, Set<() => void>>();
  /** Origin -> when (performance.now()) this daemon last acted on a `contended` notice for it. */
  readonly #contendedAt = new Map<string, number>();
  /** Connects of this daemon waiting for a slot, by origin: the last to stop without one takes it out of the queue. */
  readonly #waitingConnects = new Map<string, number>();
  /**
   * Origins whose queue of waiters in Redis has this daemon in it: a take that asked to wait was refused, and no
   * slot Redis granted since took it out. Left when no connect of this daemon waits for one any more, whatever
   * ended the wait (no longer wanted before it began, a local grant, a failure): an entry nobody stands behind
   * would hold a free slot from every other member until it goes stale.
   */
  readonly #queued = new Set<string>();
  /** The subscription to the `freed` channel was confirmed (ioredis renews it after a reconnect by itself). */
  #subscribed = false;
  #subscribing: Promise<void> | undefined;
  /** Set when Redis refused the database `fleet.redis` names: ioredis then goes on in database 0, which this
   *  daemon must not write to. The fleet stays unavailable until the configuration is fixed. */
  #wrongDatabase: Error | undefined;
  #state: FleetState = 'connecting';
  /**
   * Settles when start()'s first try to join has (whether Redis answered or not), or at close(). The daemon serves
   * clients before its fleet has joined: until then a slot or token decision waits for it (#joinTried) rather than
   * deciding alone as if Redis were down, where this daemon, counting only itself, would take the whole cap.
   */
  #joined!: () => void;
  readonly #firstJoin = new Promise<void>((resolve) => {
    this.#joined = resolve;
  });
  /**
   * Live members by which this daemon's share of a limit is reckoned (at least this one): the count at the last
   * heartbeat, but never lower, within the trust window after an outage, than the count before it (#countMembers).
   */
  #members = 1;
  /**
   * A count of the fleet's members this daemon can go by: set at the first heartbeat outside a trust window. A
   * daemon that has never had one (Redis was down since it started, or is still within the trust window after
   * it) does not know how many members share a limit: counting only itself it would take the whole cap and rate
   * while the others hold their shares, so it refuses what needs the fleet until then (#whileUnavailable).
   */
  #membersKnown = false;
  /** Origin key -> slots this daemon holds (granted and not given back). */
  #held = new Map<string, number>();
  /**
   * Takes sent to Redis and not answered yet, by origin: a heartbeat sent meanwhile states them as held (Redis may
   * have counted them already; stating fewer would let another daemon past the cap until the next heartbeat). One
   * that comes back refused is then given back (#tryTakeSlot).
   */
  #taking = new Map<string, number>();
  /**
   * Origins with takes under way -> how many heartbeat statements have stated them (held and taking) since: a take
   * answered after one was sent meanwhile was stated as held by it. Dropped when no take of the origin is under way.
   */
  #takingStated = new Map<string, number>();
  /** The heartbeat under way (one at a time), and one queued after it (#heartbeat). */
  #heartbeatRun: Promise<void> | undefined;
  #heartbeatQueued: Promise<void> | undefined;
  /**
   * Origins whose count in Redis may differ from what this daemon holds and takes, so the next heartbeat states
   * them too: one a take was sent to Redis for (granted, or its answer lost) or a heartbeat stated above 0 (only a
   * statement of 0 ends either), and such an origin's release that failed or was skipped. Never an origin only
   * granted locally (#giveBack): the map stays within the origins Redis counts or was asked for. By the number of the mark: a heartbeat's success clears only the marks made
   * before it was sent (a release skipped while it was under way is stated by the next one).
   */
  #restate = new Map<string, number>();
  #marks = 0;
  /**
   * Origin -> until when (performance.now()) the TAT of its rate that Redis last answered lies ahead: each take says
   * so, and a reconnect states it again (RATE_SCRIPT, RATE_RESTATE_SCRIPT). A Redis that restarted empty forgot
   * every rate, and granted a fresh burst on top of the one just spent.
   */
  #rateSeen = new ForgetfulMap<string, number>(RATES_SEEN, (until, now) => until <= now);
  #heartbeatTimer: NodeJS.Timeout | undefined;
  /**
   * After an outage, slot decisions stay local until every live member has had time to reconnect and state its
   * slots again (a Redis that restarted empty knows none of them): until this performance.now().
   */
  #trustSlotsAfter = 0;
  #hadOutage = false;
  #closed = false;
  readonly counters: FleetCounters = { fallbackSlots: 0, fallbackTokens: 0, refused: 0, outages: 0, slotWaits: 0 };
  /**
   * At a heartbeat: another member waits for a slot of this origin (fleet key) while this daemon holds some. The
   * daemon asks its clients to give back leases idle in their connection caches (PoolManager.reclaimFleetKey).
   */
  onContended: ((key: string) => void) | undefined;

  constructor(config: FleetConfig, log: Logger, options: FleetOptions = {}) {
    if (config.redis === undefined) throw new SockpoolError(ErrorCodes.INTERNAL, 'a fleet needs fleet.redis');
    const target = parseRedisUrl(config.redis);
    if (!target) throw new SockpoolError(ErrorCodes.CONFIG, `fleet.redis: not a redis:// URL`, { key: 'fleet.redis' });
    this.#config = config;
    this.#redisUrl = config.redis;
    this.#log = log;
    this.#prefix = `sockpool:{${config.name}}:`;
    this.#slotWaitHeardMs = options.slotWaitHeardMs ?? SLOT_WAIT_HEARD_MS;
    this.#waiterTtlMs = Math.max(WAITER_TTL_MS, 4 * this.#slotWaitHeardMs);
    // The URL carries host, port, db and credentials; ioredis parses it. No offline queue: a command while Redis is
    // down fails at once, and the caller falls back as configured instead of waiting.
    this.#redis = new Redis(config.redis, {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      commandTimeout: COMMAND_TIMEOUT_MS,
      connectTimeout: COMMAND_TIMEOUT_MS,
      retryStrategy: (times) => Math.min(MAX_RECONNECT_DELAY_MS, 50 * 2 ** Math.min(times, 6)),
      // (Redis refuses a client name with a space, and ioredis ignores the refusal.)
      connectionName: `sockpoold/${this.id}`,
    }) as RedisWithScripts;
    this.#redis.defineCommand('fleetTakeSlots', { numberOfKeys: 4, lua: TAKE_SLOTS_SCRIPT });
    this.#redis.defineCommand('fleetUnwait', { numberOfKeys: 2, lua: UNWAIT_SCRIPT });
    this.#redis.defineCommand('fleetReleaseSlots', { numberOfKeys: 1, lua: RELEASE_SLOTS_SCRIPT });
    this.#redis.defineCommand('fleetHeartbeat', { lua: HEARTBEAT_SCRIPT });
    this.#redis.defineCommand('fleetRate', { numberOfKeys: 1, lua: RATE_SCRIPT });
    this.#redis.defineCommand('fleetRateRestate', { lua: RATE_RESTATE_SCRIPT });
    this.#redis.defineCommand('fleetLeave', { lua: LEAVE_SCRIPT });
    // Rejoin at once when the connection is back: Redis may have restarted empty, or expired us while we were away.
    // The heartbeat's success is what makes the fleet available again.
    this.#redis.on('ready', () => void this.#heartbeat(true));
    this.#redis.on('error', (error: Error) => {
      // A failed SELECT comes as an error before 'ready' (its reply precedes the ready check's), and ioredis then
      // carries on in database 0.
      if (/DB index is out of range|invalid DB index/i.test(error.message)) this.#refuseDatabase(error);
      this.#unavailable(error);
    });
    this.#redis.on('close', () => this.#unavailable(new Error('connection closed')));
    // ioredis subscribes again by itself after a reconnect; while it is away, waiting connects poll (#waitForSlot).
    this.#subscriber = this.#redis.duplicate({ connectionName: `sockpoold/${this.id}/freed` });
    this.#subscriber.on('error', (error: Error) =>
      this.#log.debug({ err: error.message }, 'fleet: the freed channel connection failed; waiting connects poll'),
    );
    // Subscribed at the first 'ready', whenever that comes (Redis may be down at start); ioredis renews it after.
    this.#subscriber.on('ready', () => void this.#subscribeFreed());
    this.#subscriber.on('message', (channel: string, message: string) => {
      if (channel === this.#contendedChannel()) {
        // "DAEMON SLOTS-HASH": another member started to wait for a slot of an origin; if this daemon holds some,
        // its clients are asked for connections of it idle in their caches (as the heartbeat would, later).
        const space = message.indexOf(' ');
        const origin = message.slice(space + 1 + this.#slotsKey('').length);
        if (message.slice(0, space) === this.id || this.held(origin) === 0) return;
        const now = performance.now();
        if (now - (this.#contendedAt.get(origin) ?? Number.NEGATIVE_INFINITY) < CONTENDED_NOTICE_GAP_MS) return;
        if (this.#contendedAt.size >= 10_000) this.#contendedAt.clear();
        this.#contendedAt.set(origin, now);
        this.onContended?.(origin);
        return;
      }
      const origin = message.slice(this.#slotsKey('').length);
      for (const wake of [...(this.#slotWaiters.get(origin) ?? [])]) wake();
    });
  }

  /** host:port/db of the fleet's Redis (never its credentials): for logs and status. */
  get redisTarget(): string {
    const target = parseRedisUrl(this.#redisUrl)!;
    const host = target.host.includes(':') ? `[${target.host}]` : target.host;
    return `${target.tls ? 'rediss' : 'redis'}://${host}:${target.port}/${target.db}`;
  }

  get state(): FleetState {
    return this.#state;
  }

  get available(): boolean {
    return this.#state === 'connected';
  }

  get members(): number {
    return this.#members;
  }

  get config(): FleetConfig {
    return this.#config;
  }

  /**
   * Connects and joins (the first heartbeat). Redis down at start is not fatal: the daemon starts in the mode
   * `onUnavailable` says and joins when Redis comes.
   */
  async start(): Promise<void> {
    try {
      await this.#redis.connect();
      await this.#heartbeat();
    } catch (error) {
      this.#unavailable(error as Error);
    }
    this.#joined();
    try {
      await this.#subscriber.connect();
      await this.#subscribeFreed();
    } catch (error) {
      // Redis down at start: ioredis connects when it comes, and its 'ready' subscribes; meanwhile waiting connects
      // poll.
      this.#log.debug({ err: (error as Error).message }, 'fleet: not subscribed to the freed channel yet');
    }
    this.#heartbeatTimer = setInterval(() => void this.#heartbeat(), this.#config.heartbeatMs);
    this.#heartbeatTimer.unref();
  }

  /** Subscribes to the `freed` channel once; a failure is retried at the subscriber's next 'ready'. */
  #subscribeFreed(): Promise<void> {
    if (this.#subscribed || this.#closed || this.#wrongDatabase) return Promise.resolve();
    this.#subscribing ??= this.#subscriber
      .subscribe(this.#freedChannel(), this.#contendedChannel())
      .then(
        () => {
          this.#subscribed = true;
        },
        (error: Error) => {
          this.#log.debug(
            { err: error.message },
            'fleet: subscribing to the freed channel failed; waiting connects poll',
          );
        },
      )
      .finally(() => {
        this.#subscribing = undefined;
      });
    return this.#subscribing;
  }

  /** Redis refused the database of `fleet.redis`: nothing goes to Redis from now on (see #wrongDatabase). */
  #refuseDatabase(error: Error): void {
    if (this.#wrongDatabase) return;
    this.#wrongDatabase = error;
    this.#log.error(
      { redis: this.redisTarget, err: error.message, key: 'fleet.redis' },
      'fleet: Redis has no such database (fleet.redis); the fleet stays unavailable until the configuration names one it has',
    );
    this.#redis.disconnect(false);
    this.#subscriber.disconnect(false);
  }

  /** Leaves the fleet: this daemon's slots are given back at once rather than at their expiry. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#joined();
    clearInterval(this.#heartbeatTimer);
    if (this.available) {
      const keys = [...new Set([...this.#held.keys(), ...this.#restate.keys()])].map((key) => this.#slotsKey(key));
      const calls: Array<Promise<number>> = [];
      // In chunks, as the heartbeat (HEARTBEAT_ORIGINS); each call removes the membership again.
      for (const start of chunkStarts(keys.length)) {
        const chunk = keys.slice(start, start + HEARTBEAT_ORIGINS);
        calls.push(
          this.#redis.fleetLeave(1 + chunk.length, this.#membersKey(), ...chunk, this.id, this.#freedChannel()),
        );
      }
      try {
        await Promise.all(calls);
      } catch (error) {
        this.#log.warn({ err: (error as Error).message }, 'fleet: leaving failed; slots free at their expiry');
      }
    }
    this.#redis.disconnect(false);
    this.#subscriber.disconnect(false);
    for (const waiters of [...this.#slotWaiters.values()]) for (const wake of [...waiters]) wake();
  }

  // -------------------------------------------------------------------------------------------------------------
  // Connection slots.

  /** Slots this daemon holds for `key`. */
  held(key: string): number {
    return this.#held.get(key) ?? 0;
  }

  /** Slots held for every origin. */
  heldTotal(): number {
    let total = 0;
    for (const count of this.#held.values()) total += count;
    return total;
  }

  /**
   * One slot of `key` under the fleet cap `cap`. `wait`: while the fleet is full, ask again until a slot frees or
   * `wanted()` says the connect is no longer needed (then false). Without `wait`, false at once when full.
   * Throws SOCKPOOL_ERR_FLEET_UNAVAILABLE in `refuse` mode while Redis is unavailable.
   */
  async takeSlot(key: string, cap: SlotCap, wait: boolean, wanted: () => boolean): Promise<boolean> {
    let counted = false;
    try {
      for (;;) {
        if (this.#closed) return false;
        // (#tryTakeSlot counts a slot it grants as held, in the same turn as it decides.)
        if (await this.#tryTakeSlot(key, capNow(cap), wait)) return true;
        if (!wait || !wanted()) return false;
        if (!counted) {
          this.counters.slotWaits++;
          this.#waitingConnects.set(key, (this.#waitingConnects.get(key) ?? 0) + 1);
        }
        counted = true;
        await this.#waitForSlot(key);
        if (!wanted()) return false;
      }
    } finally {
      if (counted) this.#stopWaiting(key);
      if (!this.#waitingConnects.has(key)) this.#leaveQueue(key);
    }
  }

  /** A connect that waited for a slot of `key` stops waiting. */
  #stopWaiting(key: string): void {
    const left = (this.#waitingConnects.get(key) ?? 1) - 1;
    if (left > 0) this.#waitingConnects.set(key, left);
    else this.#waitingConnects.delete(key);
  }

  /**
   * No connect of this daemon waits for a slot of `key`: if a refused take put the daemon in the origin's queue (and
   * no grant from Redis took it out), it leaves it. Failed or unavailable, the entry goes stale.
   */
  #leaveQueue(key: string): void {
    if (!this.#queued.delete(key) || !this.available || this.#closed) return;
    this.#redis.fleetUnwait(this.#waitersKey(key), this.#askedKey(key), this.id).catch((error: Error) => {
      this.#log.debug({ err: error.message, origin: key }, 'fleet: leaving the queue failed; the entry goes stale');
    });
  }

  /**
   * Until a slot of `key` may have freed: a `freed` message for it, else (for slots freed without a word) a while;
   * without the channel, SLOT_POLL_MS to twice that.
   */
  #waitForSlot(key: string): Promise<void> {
    const heard = this.#subscribed && this.#subscriber.status === 'ready';
    const ms = heard ? this.#slotWaitHeardMs : SLOT_POLL_MS + Math.random() * SLOT_POLL_MS;
    return new Promise<void>((resolve) => {
      let waiters = this.#slotWaiters.get(key);
      if (!waiters) {
        waiters = new Set();
        this.#slotWaiters.set(key, waiters);
      }
      const wake = () => {
        clearTimeout(timer);
        waiters.delete(wake);
        if (waiters.size === 0 && this.#slotWaiters.get(key) === waiters) this.#slotWaiters.delete(key);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      waiters.add(wake);
    });
  }

  /** A connection this daemon holds without having connected it (the fd store): counted, stated at the heartbeat. */
  countSlot(key: string): void {
    this.#held.set(key, this.held(key) + 1);
  }

  /** Gives back `count` slots of `key` (a connection closed, a connect failed or was not needed). */
  releaseSlots(key: string, count: number): void {
    const held = this.held(key);
    const released = Math.min(held, count);
    if (released <= 0) return;
    if (held === released) this.#held.delete(key);
    else this.#held.set(key, held - released);
    this.#giveBack(key, released);
  }

  /**
   * Lowers this daemon's count of `key` in Redis by `count`; unavailable or failed, the next heartbeat states it.
   * So too while slot decisions stay local after an outage (#trustSlotsAfter): a slot granted from the local share
   * then is not in Redis's count until the next heartbeat, and taking one off for it would leave Redis counting
   * fewer than this daemon holds, room another member could take past the cap. Restated, Redis counts the slot
   * given back until then instead: more than held, never fewer.
   *
   * Only an origin Redis may count for this daemon is marked (one in #restate: taken from Redis, or stated by a
   * heartbeat, and not stated 0 since). A slot granted locally during an outage of an origin Redis never counted
   * leaves nothing to correct: marking it too let the marks grow with every origin connected to during an outage,
   * for the next heartbeat to state.
   */
  #giveBack(key: string, count: number): void {
    if (!this.available || performance.now() < this.#trustSlotsAfter) {
      if (this.#restate.has(key)) this.#markRestate(key);
      return;
    }
    this.#redis.fleetReleaseSlots(this.#slotsKey(key), this.id, count, this.#freedChannel()).catch((error: Error) => {
      this.#markRestate(key);
      this.#log.debug({ err: error.message, origin: key }, 'fleet: release failed; the next heartbeat corrects it');
    });
  }

  #markRestate(key: string): void {
    this.#restate.set(key, ++this.#marks);
  }

  /** `wait`: refused, this daemon joins the origin's queue of waiters (scripts.ts, TAKE_SLOTS_SCRIPT). */
  async #tryTakeSlot(key: string, cap: number, wait: boolean): Promise<boolean> {
    const joining = this.#joinTried();
    if (joining) await joining;
    if (this.available && performance.now() >= this.#trustSlotsAfter) {
      this.#taking.set(key, (this.#taking.get(key) ?? 0) + 1);
      // From here Redis may count a slot of this origin for this daemon (granted, or an answer lost): marked, so
      // that a release skipped later (#giveBack) is stated, and a heartbeat states 0 for it once none is held.
      this.#markRestate(key);
      const statedBefore = this.#takingStated.get(key) ?? 0;
      try {
        const [granted] = await this.#redis.fleetTakeSlots(
          this.#slotsKey(key),
          this.#membersKey(),
          this.#waitersKey(key),
          this.#askedKey(key),
          this.id,
          cap,
          1,
          this.#config.slotTtlMs * 10,
          this.#config.slotTtlMs,
          wait ? 1 : 0,
          this.#waiterTtlMs,
          this.#contendedChannel(),
        );
        // (The script queues a refused take that asks to wait, and takes a granted one out of the queue.)
        if (granted === 1) this.#queued.delete(key);
        else if (wait) this.#queued.add(key);
        if (granted !== 1) {
          // A heartbeat sent while this take was under way stated it as held, and Redis applied that statement after
          // refusing the take: that slot is given back (sent after the heartbeat, so applied after it too). Left
          // there, nothing would state this origin again while this daemon held none of it: a slot nobody holds,
          // counted against the cap for every member until this daemon stops.
          if ((this.#takingStated.get(key) ?? 0) !== statedBefore) this.#giveBack(key, 1);
          return false;
        }
        this.#held.set(key, this.held(key) + 1);
        return true;
      } catch (error) {
        // Redis may have counted the slot before the answer was lost: the next heartbeat states the true count (the
        // mark made before the take).
        this.#unavailable(error as Error);
      } finally {
        const taking = (this.#taking.get(key) ?? 1) - 1;
        if (taking > 0) this.#taking.set(key, taking);
        else {
          this.#taking.delete(key);
          this.#takingStated.delete(key);
        }
      }
    }
    this.#whileUnavailable();
    this.counters.fallbackSlots++;
    // This daemon's share of the cap, by the members last seen (at least one slot: a fleet member is never shut out).
    // Decided and counted in one step: connects asking in the same turn each see the ones granted before them.
    if (this.held(key) >= this.#localShare(cap)) return false;
    this.#held.set(key, this.held(key) + 1);
    return true;
  }

  /** Before the first try to join has ended, its end (the connect is bounded by COMMAND_TIMEOUT_MS); after, nothing. */
  #joinTried(): Promise<void> | undefined {
    return this.#state === 'connecting' ? this.#firstJoin : undefined;
  }

  /** This daemon's share of a fleet-wide cap while Redis is unavailable: the cap / the members last seen, at least 1. */
  #localShare(cap: number): number {
    return Math.max(1, Math.floor(cap / this.#members));
  }

  // -------------------------------------------------------------------------------------------------------------
  // Request tokens (rate-limiter.ts batches them).

  /** Up to `wanted` tokens of `key` from the fleet's GCRA; in `local` mode while Redis is down, from `local`. */
  async takeTokens(
    key: string,
    params: RateParams,
    wanted: number,
    local: (share: RateParams) => Grant,
  ): Promise<Grant> {
    const joining = this.#joinTried();
    if (joining) await joining;
    if (this.available) {
      try {
        const [granted, waitMs, tatAhead] = await this.#redis.fleetRate(
          this.#rateKey(key),
          1000 / params.requestsPerSecond,
          params.burst,
          wanted,
          Math.max(0, (this.#rateSeen.get(key) ?? 0) - performance.now()),
        );
        const now = performance.now();
        this.#rateSeen.set(key, now + Number(tatAhead), now);
        return { granted: Number(granted), waitMs: Number(waitMs) };
      } catch (error) {
        this.#unavailable(error as Error);
      }
    }
    this.#whileUnavailable();
    const grant = local({
      requestsPerSecond: params.requestsPerSecond / this.#members,
      burst: Math.max(1, Math.floor(params.burst / this.#members)),
    });
    this.counters.fallbackTokens += grant.granted;
    return grant;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Demand (shared warming).

  /** States this daemon's per-origin demand (replacing the last statement); it expires unless stated again. */
  async publishDemand(entries: ReadonlyArray<{ key: string; host: string; port: number; ratePerS: number }>) {
    if (!this.available) return;
    const key = this.#demandKey(this.id);
    const fields: string[] = [];
    for (const entry of entries) fields.push(JSON.stringify([entry.host, entry.port]), entry.ratePerS.toFixed(3));
    try {
      const multi = this.#redis.multi().del(key);
      if (fields.length > 0) multi.hset(key, ...fields).pexpire(key, this.#config.demandPublishMs * 3);
      await multi.exec();
    } catch (error) {
      this.#log.debug({ err: (error as Error).message }, 'fleet: demand not published');
    }
  }

  /** The fleet's demand (every live member's, summed), busiest first; empty while Redis is unavailable. */
  async fleetDemand(limit: number): Promise<FleetDemand[]> {
    if (!this.available || limit <= 0) return [];
    try {
      const members = await this.#redis.zrange(this.#membersKey(), '0', '-1');
      const pipeline = this.#redis.pipeline();
      for (const member of members) pipeline.hgetall(this.#demandKey(member));
      const replies = (await pipeline.exec()) ?? [];
      const sums = new Map<string, number>();
      for (const [error, value] of replies) {
        if (error || value === null || typeof value !== 'object') continue;
        for (const [field, rate] of Object.entries(value as Record<string, string>)) {
          sums.set(field, (sums.get(field) ?? 0) + Number(rate));
        }
      }
      const demand: FleetDemand[] = [];
      for (const [field, ratePerS] of sums) {
        try {
          const [host, port] = JSON.parse(field) as [unknown, unknown];
          if (typeof host === 'string' && typeof port === 'number' && Number.isFinite(ratePerS)) {
            demand.push({ host, port, ratePerS });
          }
        } catch {
          // A field this version did not write: skipped.
        }
      }
      return demand.sort((a, b) => b.ratePerS - a.ratePerS).slice(0, limit);
    } catch (error) {
      this.#log.debug({ err: (error as Error).message }, 'fleet: demand not read');
      return [];
    }
  }

  snapshot() {
    return {
      name: this.#config.name,
      id: this.id,
      redis: this.redisTarget,
      state: this.#state,
      members: this.#members,
      onUnavailable: this.#config.onUnavailable,
      shareWarming: this.#config.shareWarming,
      heldSlots: this.heldTotal(),
      ...this.counters,
    };
  }

  // -------------------------------------------------------------------------------------------------------------

  /**
   * One heartbeat at a time: a tick while one is under way waits for that one (a busy Redis made them overlap, each
   * adding its work to the last's). `again`: one more after the one under way (a reconnect: the one under way was
   * sent on the connection that closed), at most one queued.
   */
  #heartbeat(again = false): Promise<void> {
    const running = this.#heartbeatRun;
    if (running) {
      if (!again) return running;
      this.#heartbeatQueued ??= running.then(() => {
        this.#heartbeatQueued = undefined;
        return this.#heartbeat();
      });
      return this.#heartbeatQueued;
    }
    const run = this.#stateAll().finally(() => {
      if (this.#heartbeatRun === run) this.#heartbeatRun = undefined;
    });
    this.#heartbeatRun = run;
    return run;
  }

  async #stateAll(): Promise<void> {
    // Also while `unavailable` with the connection up (a command timed out): a heartbeat that succeeds ends that.
    if (this.#closed || this.#wrongDatabase || this.#redis.status !== 'ready') return;
    const keys = [...new Set([...this.#held.keys(), ...this.#taking.keys(), ...this.#restate.keys()])];
    // Back after an outage (or at the first join): the rates this daemon saw ahead, stated before anything else this
    // connection sends, so that its own takes after find them even in a Redis that restarted empty. (Its failure is
    // the heartbeat's, awaited after the chunks: caught here either way, never an unhandled rejection.)
    const restating = Promise.all(this.#state === 'connected' ? [] : this.#restateRates()).then(
      () => undefined,
      (error: Error) => error,
    );
    try {
      // In script calls of HEARTBEAT_ORIGINS origins each (one with none if no origin is stated), one after the
      // other, so that each has COMMAND_TIMEOUT_MS of its own: sent together, the last of fifty waited behind the
      // others' work in Redis, and a busy Redis timed every heartbeat of a member holding 50,000 origins out, which
      // then never rejoined. Each chunk's counts are read as it is sent: Redis applies it after every take and
      // release this daemon sent before and before those it sends after (one connection), so no statement is older
      // than what follows it. Each renews the membership (the same ZADD again) and answers the members; each chunk
      // that succeeds clears its own origins' marks, so a heartbeat cut short by an outage leaves only the rest.
      let members = 0;
      for (const start of chunkStarts(keys.length)) {
        if (this.#closed) return;
        const chunk = keys.slice(start, start + HEARTBEAT_ORIGINS);
        const counts = chunk.map((key) => this.held(key) + (this.#taking.get(key) ?? 0));
        const markedBefore = this.#marks;
        for (const [index, key] of chunk.entries()) {
          if (counts[index]! > 0) this.#markRestate(key);
          const stated = this.#takingStated.get(key);
          if (this.#taking.has(key)) this.#takingStated.set(key, (stated ?? 0) + 1);
        }
        const [chunkMembers, contended] = await this.#redis.fleetHeartbeat(
          1 + 2 * chunk.length,
          this.#membersKey(),
          ...chunk.map((key) => this.#slotsKey(key)),
          ...chunk.map((key) => this.#askedKey(key)),
          this.id,
          this.#config.slotTtlMs,
          this.#config.slotTtlMs * 10,
          this.#waiterTtlMs,
          ...counts,
        );
        members = chunkMembers;
        for (const index of contended) {
          const key = chunk[index - 1];
          if (key !== undefined) this.onContended?.(key);
        }
        for (const [index, key] of chunk.entries()) {
          if (counts[index] === 0 && (this.#restate.get(key) ?? 0) <= markedBefore) this.#restate.delete(key);
        }
      }
      const restateFailed = await restating;
      if (restateFailed) throw restateFailed;
      if (this.#state !== 'connected') {
        this.#log.info({ redis: this.redisTarget }, 'fleet: Redis available again');
        if (this.#hadOutage) {
          this.#trustSlotsAfter =
            performance.now() + Math.max(this.#config.slotTtlMs, MAX_RECONNECT_DELAY_MS + 2 * this.#config.heartbeatMs);
        }
      }
      // (The last chunk's count: Redis answered it after the others.)
      this.#countMembers(members);
      this.#state = 'connected';
    } catch (error) {
      this.#unavailable(error as Error);
    }
  }

  /** RATE_RESTATE_SCRIPT for every rate seen ahead, in calls of HEARTBEAT_ORIGINS origins (none if there is none). */
  #restateRates(): Array<Promise<number>> {
    const now = performance.now();
    const keys: string[] = [];
    const ahead: number[] = [];
    for (const [key, until] of this.#rateSeen.entries()) {
      if (until <= now) continue;
      keys.push(this.#rateKey(key));
      ahead.push(until - now);
    }
    const calls: Array<Promise<number>> = [];
    for (let start = 0; start < keys.length; start += HEARTBEAT_ORIGINS) {
      const chunk = keys.slice(start, start + HEARTBEAT_ORIGINS);
      calls.push(
        this.#redis.fleetRateRestate(chunk.length, ...chunk, ...ahead.slice(start, start + HEARTBEAT_ORIGINS)),
      );
    }
    return calls;
  }

  /**
   * The live members Redis counted at a heartbeat. Within the trust window after an outage the count may be low: a
   * Redis that restarted empty counts only the members that have rejoined so far, and the first one back would
   * count itself alone and take the whole cap locally while the others still hold their shares. So until the
   * window ends the count never falls below the one before the outage (a higher one is taken: smaller shares).
   */
  #countMembers(members: number): void {
    if (performance.now() < this.#trustSlotsAfter) {
      this.#members = Math.max(1, members, this.#members);
      return;
    }
    this.#members = Math.max(1, members);
    this.#membersKnown = true;
  }

  /**
   * Before a decision from this daemon's share (Redis unavailable, or slot decisions local after an outage). In
   * `refuse` mode nothing that needs the fleet goes ahead without Redis; in either mode a daemon that has never
   * counted the fleet's members (#membersKnown) has no share to go by.
   */
  #whileUnavailable(): void {
    if (this.#config.onUnavailable === 'refuse' && !this.available) {
      this.counters.refused++;
      throw new SockpoolError(
        ErrorCodes.FLEET_UNAVAILABLE,
        `the fleet's Redis (${this.redisTarget}) is unavailable and fleet.onUnavailable is "refuse"`,
        { redis: this.redisTarget },
      );
    }
    if (!this.#membersKnown) {
      this.counters.refused++;
      throw new SockpoolError(
        ErrorCodes.FLEET_UNAVAILABLE,
        `this daemon has not yet counted the members of the fleet (its Redis, ${this.redisTarget}, has been unavailable or just came back since it started), so it has no share of the fleet's limits to go by`,
        { redis: this.redisTarget },
      );
    }
  }

  #unavailable(error: Error): void {
    if (this.#closed) return;
    if (this.#state !== 'unavailable') {
      this.#hadOutage = true;
      this.counters.outages++;
      this.#log.warn(
        { redis: this.redisTarget, err: error.message, mode: this.#config.onUnavailable },
        this.#config.onUnavailable === 'local'
          ? "fleet: Redis unavailable; this daemon's share of each fleet limit applies until it is back"
          : 'fleet: Redis unavailable; connects and tokens that need the fleet are refused until it is back',
      );
    }
    this.#state = 'unavailable';
  }

  #freedChannel(): string {
    return `${this.#prefix}freed`;
  }
  #contendedChannel(): string {
    return `${this.#prefix}contended`;
  }
  #membersKey(): string {
    return `${this.#prefix}members`;
  }
  #slotsKey(origin: string): string {
    return `${this.#prefix}slots:${origin}`;
  }

  #waitersKey(origin: string): string {
    return `${this.#prefix}waiters:${origin}`;
  }
  #askedKey(origin: string): string {
    return `${this.#prefix}asked:${origin}`;
  }
  #rateKey(origin: string): string {
    return `${this.#prefix}rate:${origin}`;
  }
  #demandKey(member: string): string {
    return `${this.#prefix}demand:${member}`;
  }
}
