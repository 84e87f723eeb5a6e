// The pure logic behind the daemon's trust boundary, in-process: the fair wait queue across uids, per-uid quotas
// (with an injected clock), the global connect gate (a connector the test settles by hand), and the origin pool's
// per-uid handling of released sockets (a fake connector with real loopback connections).
import { closeSync, openSync, writeSync } from 'node:fs';
import { type AddressInfo, createServer, Socket } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { defaultConfig, type OriginPolicy, policyFor } from '../daemon/config.js';
import { ConnectGate } from '../daemon/connect-gate.js';
import type { ConnectedSocket, Connector } from '../daemon/connector.js';
import { FairWaitQueue } from '../daemon/fair-queue.js';
import {
  checkIdle,
  checkReturned,
  endConnection,
  markOf,
  RECENT_CHECK_MS,
  usedSinceLent,
} from '../daemon/lease-guard.js';
import { LogLimiter } from '../daemon/log.js';
import { type Handoff, OriginPool, type OriginPoolEvents } from '../daemon/origin-pool.js';
import {
  FD_RESERVE,
  FdLimit,
  idleSocketsFitting,
  leaseFdBudget,
  overLeaseLimit,
  PREWARM_WINDOW_MS,
  type QuotaConfig,
  RELAYED_LEASE_FDS,
  readSoftFdLimit,
  SETTLE_ALL_MIN_INTERVAL_MS,
  STATS_WINDOW_MS,
  TCP_LEASE_FDS,
  UidQuotas,
} from '../daemon/quotas.js';
import { ErrorCodes } from '../shared/errors.js';
import * as native from '../shared/native.js';
import type { Origin } from '../shared/origin.js';
import { FakeConnector, handSettledConnector } from './fixtures/fake-connector.js';
import { fdCount } from './fixtures/native-helpers.js';

describe('FairWaitQueue', () => {
  const waiter = (uid: number, name: string) => ({ uid, name });

  it('is FIFO within one uid', () => {
    const queue = new FairWaitQueue<{ uid: number; name: string }>();
    for (const name of ['a', 'b', 'c']) queue.push(waiter(1, name));
    expect([queue.shift()?.name, queue.shift()?.name, queue.shift()?.name]).toEqual(['a', 'b', 'c']);
    expect(queue.length).toBe(0);
    expect(queue.shift()).toBeUndefined();
  });

  it('serves the waiting uid that holds the fewest slots first, then the longest waiting', () => {
    const queue = new FairWaitQueue<{ uid: number; name: string }>();
    queue.held(1, +1);
    queue.held(1, +1);
    queue.push(waiter(1, 'busy-early'));
    queue.push(waiter(2, 'idle-late'));
    queue.push(waiter(3, 'idle-later'));
    expect(queue.shift()?.name).toBe('idle-late');
    queue.held(2, +1);
    // uid 3 holds 0, uid 1 holds 2, uid 2 (nothing waiting) holds 1.
    expect(queue.shift()?.name).toBe('idle-later');
    queue.held(3, +1);
    expect(queue.shift()?.name).toBe('busy-early');
  });

  it('alternates between two uids that both keep asking, whatever their order of arrival', () => {
    const queue = new FairWaitQueue<{ uid: number; name: string }>();
    for (let i = 0; i < 6; i++) queue.push(waiter(1, `one-${i}`));
    for (let i = 0; i < 2; i++) queue.push(waiter(2, `two-${i}`));
    const served: number[] = [];
    for (let next = queue.shift(); next; next = queue.shift()) {
      served.push(next.uid);
      queue.held(next.uid, +1);
    }
    expect(served).toEqual([1, 2, 1, 2, 1, 1, 1, 1]);
  });

  it('removes a waiter (timeout) and takes the oldest waiter of one uid', () => {
    const queue = new FairWaitQueue<{ uid: number; name: string }>();
    const a = waiter(1, 'a');
    queue.push(a);
    queue.push(waiter(2, 'b'));
    queue.push(waiter(1, 'c'));
    expect(queue.remove(a)).toBe(true);
    expect(queue.remove(a)).toBe(false);
    expect(queue.shiftOf(1)?.name).toBe('c');
    expect(queue.hasWaiterOf(1)).toBe(false);
    expect(queue.shiftOf(1)).toBeUndefined();
    expect(queue.drain().map((entry) => entry.name)).toEqual(['b']);
    expect(queue.length).toBe(0);
  });

  it("skips each uid's covered waiters for a new slot, and prefers a uid's own waiter only among the fewest held", () => {
    const queue = new FairWaitQueue<{ uid: number; name: string }>();
    for (let i = 0; i < 3; i++) queue.push(waiter(1, `one-${i}`));
    queue.push(waiter(2, 'two-0'));
    // The pool's order for a new connect (OriginPool's #uncovered): uid 1's first `covered` waiters skipped.
    let covered = 3;
    const coveredOf = (uid: number) => (uid === 1 ? covered : 0);
    const uncovered = queue.order({ extra: coveredOf, candidate: (uid, waiting) => waiting[coveredOf(uid)] });
    // uid 1's three waiters are covered by slots on their way: the next one is uid 2's, though uid 1 came first.
    expect(uncovered.peek()?.name).toBe('two-0');
    // Covered slots count as held: one of uid 1's covered, none of uid 2's: uid 2 first.
    covered = 1;
    uncovered.recount(1);
    expect(uncovered.peek()?.name).toBe('two-0');
    covered = 0;
    uncovered.recount(1);
    expect(uncovered.peek()?.name).toBe('one-0');
    // Both hold none: uid 2's own slot serves uid 2; once uid 2 holds more than uid 1, the fair order wins.
    expect(queue.peekFor(2)?.name).toBe('two-0');
    expect(queue.peekFor(undefined)?.name).toBe('one-0');
    expect(queue.peekFor(3)?.name).toBe('one-0');
    queue.held(2, +1);
    expect(queue.peekFor(2)?.name).toBe('one-0');
  });
});

describe('UidQuotas', () => {
  const config = (overrides: Partial<QuotaConfig> = {}): QuotaConfig => ({ ...defaultConfig().quotas, ...overrides });

  it('counts sessions per uid and refuses past maxSessionsPerUid with SOCKPOOL_ERR_QUOTA', () => {
    const quotas = new UidQuotas(() => config({ maxSessionsPerUid: 2 }));
    quotas.openSession(1000);
    quotas.openSession(1000);
    expect(() => quotas.openSession(1000)).toThrow(
      expect.objectContaining({ code: ErrorCodes.QUOTA, quota: 'maxSessionsPerUid', uid: 1000, limit: 2 }),
    );
    quotas.openSession(1001);
    quotas.closeSession(1000);
    quotas.openSession(1000);
    expect(quotas.usageOf(1000).sessions).toBe(2);
  });

  it("counts a uid's token waits against maxPendingPerUid, not against its leases (maxLeasesPerUid)", () => {
    const quotas = new UidQuotas(() => config({ maxPendingPerUid: 3, maxLeasesPerUid: 2 }));
    quotas.startAcquire(7, '192.0.2.1');
    quotas.acquireSettled(7, '192.0.2.1', true);
    // One lease held, two requests of its clients waiting for a rate's tokens: the second lease is within the quota.
    quotas.startWait(7);
    quotas.startWait(7);
    quotas.startAcquire(7, '192.0.2.2');
    expect(() => quotas.startWait(7)).toThrow(expect.objectContaining({ quota: 'maxPendingPerUid' }));
    quotas.acquireSettled(7, '192.0.2.2', true);
    expect(() => quotas.startAcquire(7, '192.0.2.3')).toThrow(expect.objectContaining({ quota: 'maxLeasesPerUid' }));
    quotas.waitSettled(7);
    quotas.waitSettled(7);
    expect(quotas.usageOf(7)).toMatchObject({ leases: 2, pending: 0 });
  });

  it('counts leases ended with their replies unread against maxLeasesPerUid until they are released', () => {
    const quotas = new UidQuotas(() => config({ maxLeasesPerUid: 2 }));
    quotas.startAcquire(7, '192.0.2.1');
    quotas.acquireSettled(7, '192.0.2.1', true);
    quotas.leaseEnded(7);
    quotas.chargeUnread(7, 1);
    quotas.startAcquire(7, '192.0.2.2');
    // One charged, one pending: the uid's quota is full until the charge goes.
    expect(() => quotas.startAcquire(7, '192.0.2.3')).toThrow(
      expect.objectContaining({ code: ErrorCodes.QUOTA, quota: 'maxLeasesPerUid' }),
    );
    expect(quotas.usageOf(7)).toMatchObject({ leases: 0, unreadLeases: 1, pending: 1 });
    quotas.releaseUnread(7, 1);
    quotas.startAcquire(7, '192.0.2.3');
    expect(quotas.usageOf(7)).toMatchObject({ unreadLeases: 0, pending: 2 });
  });

  describe("the lease fd budget's fair share", () => {
    /** Quotas whose per-uid lease limit is far above `budget`: only the fair share binds. */
    const withBudget = (budget: number) =>
      new UidQuotas(
        () => config({ maxLeasesPerUid: 10_000 }),
        undefined,
        undefined,
        () => budget,
      );
    /** Takes leases for `uid` (each with `leaseFds`) until refused; returns how many it got and the refusal. */
    const takeAll = (quotas: UidQuotas, uid: number, leaseFds: number) => {
      for (let taken = 0; ; taken++) {
        try {
          quotas.startAcquire(uid, '192.0.2.1');
        } catch (error) {
          return { taken, error };
        }
        quotas.acquireSettled(uid, '192.0.2.1', true, undefined, leaseFds);
      }
    };

    it("refuses a uid's acquire unless more fds stay free than it would hold, so another uid still gets leases", () => {
      const quotas = withBudget(100);
      // Alone, a uid gets half the budget: after n TCP leases and this acquire (charged as relayed, 3), n + 3 held,
      // 100 - n - 3 free; 47 leases (with maxLeasesPerUid alone: 10,000, every fd of the daemon's and more).
      const first = takeAll(quotas, 1, TCP_LEASE_FDS);
      expect(first.taken).toBe(47);
      expect(first.error).toMatchObject({ code: ErrorCodes.QUOTA, quota: 'leaseFds', uid: 1, limit: 100 });
      expect((first.error as Error).message).toContain("of the daemon's fd budget of 100 would stay free");
      // Another uid gets about half of what is left, and a third half of that: something stays free for the next.
      expect(takeAll(quotas, 2, TCP_LEASE_FDS).taken).toBe(24);
      expect(takeAll(quotas, 3, TCP_LEASE_FDS).taken).toBe(12);
      expect(quotas.leaseFdsInUse()).toEqual({ leaseFds: 83, sessionFds: 0, leaseFdBudget: 100 });
      // The first uid's leases ended, its fds are free for the others again.
      for (let i = 0; i < 47; i++) quotas.leaseEnded(1, TCP_LEASE_FDS);
      expect(quotas.usageOf(1).leaseFds).toBe(0);
      quotas.startAcquire(3, '192.0.2.1');
      expect(quotas.usageOf(3).leaseFds).toBe(12 + RELAYED_LEASE_FDS);
    });

    it('counts a relayed lease as three fds and a pending acquire as three until its lease is made', () => {
      const quotas = withBudget(100);
      // 3n + 3 held after the acquire, 100 - 3n - 3 free: 16 relayed leases.
      expect(takeAll(quotas, 1, RELAYED_LEASE_FDS).taken).toBe(16);
      expect(quotas.usageOf(1)).toMatchObject({ leases: 16, leaseFds: 48 });
      // Pending acquires hold three each until settled: without a lease, the charge goes.
      quotas.startAcquire(2, '192.0.2.1');
      quotas.startAcquire(2, '192.0.2.1');
      expect(quotas.usageOf(2).leaseFds).toBe(6);
      expect(quotas.leaseFdsInUse().leaseFds).toBe(54);
      quotas.acquireSettled(2, '192.0.2.1', false);
      quotas.acquireSettled(2, '192.0.2.1', true, undefined, TCP_LEASE_FDS);
      expect(quotas.usageOf(2)).toMatchObject({ leases: 1, leaseFds: 1, pending: 0 });
      expect(quotas.leaseFdsInUse().leaseFds).toBe(49);
    });

    it("lets a lone uid reach maxLeasesPerUid in relayed leases under the shipped unit's LimitNOFILE (65,536)", () => {
      const defaults = defaultConfig();
      const budget = leaseFdBudget(65_536, defaults);
      expect(budget).toBe(34_512);
      const quotas = new UidQuotas(
        () => defaults.quotas,
        undefined,
        undefined,
        () => budget,
      );
      const alone = takeAll(quotas, 1, RELAYED_LEASE_FDS);
      expect(alone.taken).toBe(defaults.quotas.maxLeasesPerUid);
      expect(alone.error).toMatchObject({ quota: 'maxLeasesPerUid' });
      // And the budget keeps at least half the table for leases when the daemon's other needs would take more.
      expect(leaseFdBudget(20_000, defaults)).toBe(10_000);
    });

    /** Opens sessions for `uid` until refused; returns how many it got and the refusal. */
    const openAll = (quotas: UidQuotas, uid: number) => {
      for (let opened = 0; ; opened++) {
        try {
          quotas.openSession(uid);
        } catch (error) {
          return { opened, error };
        }
      }
    };
    /** Sessions far above `budget` too: only the fair share binds. */
    const withSessionBudget = (budget: number) =>
      new UidQuotas(
        () => config({ maxLeasesPerUid: 10_000, maxSessionsPerUid: 10_000 }),
        undefined,
        undefined,
        () => budget,
      );

    it("refuses a uid's connection unless more fds stay free than it would hold, with its leases counted, so another uid still connects", () => {
      const quotas = withSessionBudget(100);
      // Alone: after n connections and this one, n + 1 held and 100 - n - 1 free: 49 (with maxSessionsPerUid alone,
      // 10,000: a hundred times the budget).
      const first = openAll(quotas, 1);
      expect(first.opened).toBe(49);
      expect(first.error).toMatchObject({ code: ErrorCodes.QUOTA, quota: 'sessionFds', uid: 1, limit: 100 });
      expect((first.error as Error).message).toContain("of the daemon's fd budget of 100 would stay free");
      expect(quotas.usageOf(1)).toMatchObject({ sessions: 49, sessionFds: 49 });
      // Another uid's leases and connections come out of what is left, by the same rule: it holds ten TCP leases, so
      // n + 11 held against 100 - 49 - 10 - n - 1 free: 15 connections.
      for (let i = 0; i < 10; i++) {
        quotas.startAcquire(2, '192.0.2.1');
        quotas.acquireSettled(2, '192.0.2.1', true, undefined, TCP_LEASE_FDS);
      }
      expect(openAll(quotas, 2).opened).toBe(15);
      expect(quotas.leaseFdsInUse()).toEqual({ leaseFds: 10, sessionFds: 64, leaseFdBudget: 100 });
      // And its leases the other way: connections count in an acquire's share (uid 2 would hold 28 fds, 23 would stay free).
      expect(() => quotas.startAcquire(2, '192.0.2.1')).toThrow(expect.objectContaining({ quota: 'leaseFds' }));
      // The first uid's connections closed, the fds are free again.
      for (let i = 0; i < 49; i++) quotas.closeSession(1);
      quotas.openSession(2);
      expect(quotas.usageOf(2)).toMatchObject({ sessions: 16, sessionFds: 16, leaseFds: 10 });
    });

    it("counts the kept copy of a hung-up connection's end in its uid's share until it is closed", () => {
      const quotas = withSessionBudget(10);
      quotas.openSession(1);
      quotas.openSession(1);
      // The daemon hung up on both with replies unread: their connections go, a watched copy of each stays.
      quotas.closeSession(1);
      quotas.closeSession(1);
      quotas.watchOpened(1);
      quotas.watchOpened(1);
      expect(quotas.usageOf(1)).toMatchObject({ sessions: 0, sessionFds: 2 });
      // Two more connections (3 held, 7 free; 4 held, 6 free), not a third (5 held, 5 free).
      quotas.openSession(1);
      quotas.openSession(1);
      expect(() => quotas.openSession(1)).toThrow(expect.objectContaining({ quota: 'sessionFds' }));
      quotas.watchClosed(1);
      quotas.watchClosed(1);
      quotas.openSession(1);
      expect(quotas.usageOf(1)).toMatchObject({ sessions: 3, sessionFds: 3 });
    });

    it("counts each lease ended with its reply unread as an fd in its uid's share, so the fds in flight stay under the budget", () => {
      const quotas = withSessionBudget(100);
      // A uid that never reads, ending each lease by its guessed id: each lease's fd goes from the daemon's table to
      // flight (the kernel's count against RLIMIT_NOFILE). u in flight, the acquire's 3: u + 3 held, 100 - u - 3
      // free: 47 (with maxLeasesPerUid alone, 10,000; the kernel fails every send past RLIMIT_NOFILE).
      let inFlight = 0;
      let refusal: unknown;
      for (; inFlight < 10_000; inFlight++) {
        try {
          quotas.startAcquire(1, '192.0.2.1');
        } catch (error) {
          refusal = error;
          break;
        }
        quotas.acquireSettled(1, '192.0.2.1', true, undefined, TCP_LEASE_FDS);
        quotas.leaseEnded(1, TCP_LEASE_FDS);
        quotas.chargeUnread(1, 1);
      }
      expect(inFlight).toBe(47);
      expect(refusal).toMatchObject({ code: ErrorCodes.QUOTA, quota: 'leaseFds', uid: 1, limit: 100 });
      expect((refusal as Error).message).toContain('47 in flight in unread replies');
      // Its connections too; another uid still gets leases out of what is left (n + 3 held, 100 - 48 - n - 3 free).
      expect(() => quotas.openSession(1)).not.toThrow();
      expect(takeAll(quotas, 2, TCP_LEASE_FDS).taken).toBe(23);
      // Read (or its connection closed): its share is back.
      quotas.closeSession(1);
      quotas.releaseUnread(1, 47);
      quotas.startAcquire(1, '192.0.2.1');
      expect(quotas.usageOf(1)).toMatchObject({ unreadLeases: 0, leaseFds: RELAYED_LEASE_FDS });
    });

    it("settles a uid's unread charges before refusing it its share for them", () => {
      let settles = 0;
      const quotas = new UidQuotas(
        () => config({ maxLeasesPerUid: 10_000, maxSessionsPerUid: 10_000 }),
        undefined,
        (uid) => {
          settles++;
          quotas.releaseUnread(uid, 40);
        },
        () => 100,
      );
      quotas.chargeUnread(1, 50);
      // 50 + 1 held, 100 - 50 - 1 free: refused but for the charges, which the client had read (40 of them).
      quotas.openSession(1);
      expect(settles).toBe(1);
      expect(quotas.usageOf(1)).toMatchObject({ sessions: 1, unreadLeases: 10 });
      // Within its share: no settle (no ioctl on a connection or acquire that passes).
      quotas.openSession(1);
      quotas.startAcquire(1, '192.0.2.1');
      expect(settles).toBe(1);
    });

    it("settles every uid's unread charges before refusing a uid its share when theirs could make the difference, at most every SETTLE_ALL_MIN_INTERVAL_MS", () => {
      let now = 0;
      let settledAll = 0;
      // Uid 2 ended 50 leases unread and has read 40 of those replies since: charges the periodic settle has not
      // paid back yet.
      let stale = 40;
      const quotas: UidQuotas = new UidQuotas(
        () => config({ maxLeasesPerUid: 10_000, maxSessionsPerUid: 10_000 }),
        () => now,
        undefined,
        () => 100,
        () => {
          settledAll++;
          quotas.releaseUnread(2, stale);
          stale = 0;
        },
      );
      quotas.chargeUnread(2, 50);
      // Within its share against the stale charges (n + 1 held, 100 - 50 - n - 1 free): no settle.
      for (let i = 0; i < 24; i++) quotas.openSession(1);
      expect(settledAll).toBe(0);
      // Past it, every uid's charges are settled first: 10 left, so 44 (n + 1 held, 100 - 10 - n - 1 free).
      expect(openAll(quotas, 1).opened).toBe(20);
      expect(settledAll).toBe(1);
      expect(quotas.usageOf(1).sessions).toBe(44);
      expect(quotas.usageOf(2).unreadLeases).toBe(10);
      // A uid refused again at once does not settle everyone's again (an ioctl per charged session each time)...
      expect(() => quotas.openSession(1)).toThrow(expect.objectContaining({ quota: 'sessionFds' }));
      expect(settledAll).toBe(1);
      // ...until the interval has passed.
      now += SETTLE_ALL_MIN_INTERVAL_MS;
      expect(() => quotas.openSession(1)).toThrow(expect.objectContaining({ quota: 'sessionFds' }));
      expect(settledAll).toBe(2);
    });

    it('fits the idle pool, the connects in flight and the reserve beside the budget in any table with room for the last two', () => {
      const defaults = defaultConfig();
      // The shipped unit's table holds the defaults' 10,000 idle sockets; this VM's hard limit (20,000) does not.
      expect(idleSocketsFitting(65_536, defaults)).toBe(10_000);
      expect(idleSocketsFitting(20_000, defaults)).toBe(2_992);
      expect(idleSocketsFitting(Number.POSITIVE_INFINITY, defaults)).toBe(10_000);
      const small = { ...defaults, quotas: { ...defaults.quotas, maxConnectsInFlight: 16 } };
      expect(idleSocketsFitting(1_500, small)).toBe(74);
      for (const fdLimit of [1_500, 2_048, 4_096, 20_000, 40_000, 62_000, 65_536, 1_048_576]) {
        for (const config of [defaults, small]) {
          const besides = config.quotas.maxConnectsInFlight + FD_RESERVE;
          if (besides > fdLimit / 2) continue;
          const idle = idleSocketsFitting(fdLimit, config);
          expect(leaseFdBudget(fdLimit, config) + RELAYED_LEASE_FDS * idle + besides).toBeLessThanOrEqual(fdLimit);
          expect(leaseFdBudget(fdLimit, config)).toBeGreaterThanOrEqual(fdLimit / 2);
        }
      }
      // A table too small for the connects in flight and the reserve: no idle socket, the budget still half of it.
      expect(idleSocketsFitting(1_000, defaults)).toBe(0);
      expect(leaseFdBudget(1_000, defaults)).toBe(500);
    });

    it('keeps the last RLIMIT_NOFILE read when it cannot be read again (out of fds), and takes a new one', () => {
      const reads: Array<number | undefined> = [1_500, undefined, 3_000, 3_000];
      const limit = new FdLimit(() => reads.shift());
      expect(limit.value).toBe(1_500);
      expect(limit.refresh()).toBe(false);
      expect(limit.value).toBe(1_500);
      expect(limit.refresh()).toBe(true);
      expect(limit.value).toBe(3_000);
      expect(limit.refresh()).toBe(false);
      expect(readSoftFdLimit('/nonexistent/limits')).toBeUndefined();
      expect(readSoftFdLimit()).toBeGreaterThan(0);
    });

    it("lets a lone uid reach maxSessionsPerUid beside maxLeasesPerUid relayed leases under the shipped unit's LimitNOFILE (65,536)", () => {
      const defaults = defaultConfig();
      const budget = leaseFdBudget(65_536, defaults);
      const quotas = new UidQuotas(
        () => defaults.quotas,
        undefined,
        undefined,
        () => budget,
      );
      const sessions = openAll(quotas, 1);
      expect(sessions.opened).toBe(defaults.quotas.maxSessionsPerUid);
      expect(sessions.error).toMatchObject({ quota: 'maxSessionsPerUid' });
      const leases = takeAll(quotas, 1, RELAYED_LEASE_FDS);
      expect(leases.taken).toBe(defaults.quotas.maxLeasesPerUid);
      expect(leases.error).toMatchObject({ quota: 'maxLeasesPerUid' });
    });
  });

  it("settles a uid's unread charges (charged without a look) before refusing an acquire for them", () => {
    const settled: number[] = [];
    const quotas = new UidQuotas(
      () => config({ maxLeasesPerUid: 1 }),
      undefined,
      (uid) => {
        settled.push(uid);
        if (settled.length === 1) quotas.releaseUnread(uid, 1);
      },
    );
    quotas.chargeUnread(7, 1);
    // Settled: the client had read its reply, so the acquire goes ahead.
    quotas.startAcquire(7, '192.0.2.1');
    quotas.acquireSettled(7, '192.0.2.1', true);
    quotas.leaseEnded(7);
    quotas.chargeUnread(7, 1);
    // Settled, still unread: refused.
    expect(() => quotas.startAcquire(7, '192.0.2.2')).toThrow(expect.objectContaining({ quota: 'maxLeasesPerUid' }));
    expect(settled).toEqual([7, 7]);
  });

  it('overLeaseLimit settles the unread charges only when they are what would refuse, and counts what is left', () => {
    const settled: string[] = [];
    const settle = (key: string) => {
      settled.push(key);
      return key === 'read' ? 0 : 2;
    };
    // Under the limit with the charges: no settle (no ioctl on an acquire that passes).
    expect(overLeaseLimit(4, 1, 2, settle, 'read')).toBe(false);
    // Over without charges: refused, nothing to settle.
    expect(overLeaseLimit(4, 4, 0, settle, 'read')).toBe(true);
    expect(settled).toEqual([]);
    // Over with charges: settled; the client had read (none left): passes; still unread: refused.
    expect(overLeaseLimit(4, 2, 3, settle, 'read')).toBe(false);
    expect(overLeaseLimit(4, 2, 3, settle, 'unread')).toBe(true);
    expect(settled).toEqual(['read', 'unread']);
  });

  it('bounds pending acquires, leases and host-name acquires per uid', () => {
    const quotas = new UidQuotas(() => config({ maxPendingPerUid: 3, maxLeasesPerUid: 4, maxLookupsPerUid: 1 }));
    quotas.startAcquire(7, 'example.com');
    expect(() => quotas.startAcquire(7, 'other.example')).toThrow(
      expect.objectContaining({ code: ErrorCodes.QUOTA, quota: 'maxLookupsPerUid' }),
    );
    // IP literals need no lookup.
    quotas.startAcquire(7, '192.0.2.1');
    quotas.startAcquire(7, '2001:db8::1');
    expect(() => quotas.startAcquire(7, '192.0.2.2')).toThrow(expect.objectContaining({ quota: 'maxPendingPerUid' }));
    quotas.acquireSettled(7, 'example.com', true);
    quotas.acquireSettled(7, '192.0.2.1', true);
    quotas.acquireSettled(7, '2001:db8::1', true);
    expect(quotas.usageOf(7)).toEqual({
      sessions: 0,
      leases: 3,
      leaseFds: 3,
      sessionFds: 0,
      unreadLeases: 0,
      pending: 0,
      lookups: 0,
    });
    quotas.startAcquire(7, '192.0.2.3');
    expect(() => quotas.startAcquire(7, '192.0.2.4')).toThrow(expect.objectContaining({ quota: 'maxLeasesPerUid' }));
    quotas.leaseEnded(7);
    quotas.startAcquire(7, '192.0.2.4');
  });

  it('keeps a host-name acquire that got no lease charged as a lookup until the DNS query it started ends', async () => {
    const quotas = new UidQuotas(() => config({ maxLookupsPerUid: 1 }));
    let answer!: () => void;
    const query = new Promise<void>((resolve) => {
      answer = resolve;
    });
    const inFlight = (host: string) => (host === 'slow.example' ? query : undefined);
    quotas.startAcquire(7, 'slow.example');
    // It timed out (no lease) while its name's query runs: still one lookup of this uid's.
    quotas.acquireSettled(7, 'slow.example', false, inFlight);
    expect(quotas.usageOf(7)).toMatchObject({ pending: 0, lookups: 1 });
    expect(() => quotas.startAcquire(7, 'other.example')).toThrow(
      expect.objectContaining({ quota: 'maxLookupsPerUid' }),
    );
    answer();
    await query;
    await Promise.resolve();
    expect(quotas.usageOf(7)).toMatchObject({ lookups: 0 });
    // No query in flight, or a lease (the lookup is over): released at once.
    quotas.startAcquire(7, 'other.example');
    quotas.acquireSettled(7, 'other.example', false, inFlight);
    quotas.startAcquire(7, 'slow.example');
    quotas.acquireSettled(7, 'slow.example', true, () => new Promise(() => {}));
    expect(quotas.usageOf(7)).toMatchObject({ lookups: 0, leases: 1 });
  });

  it('cuts prewarm demand to the allowance left, refills it over the window, and refuses when none is left', () => {
    let now = 0;
    const quotas = new UidQuotas(
      () => config({ maxPrewarmPerUid: 10 }),
      () => now,
    );
    expect(quotas.takePrewarm(1, 4)).toBe(4);
    expect(quotas.takePrewarm(1, 100)).toBe(6);
    expect(() => quotas.takePrewarm(1, 1)).toThrow(expect.objectContaining({ quota: 'maxPrewarmPerUid' }));
    // Another uid has its own allowance; closing and reopening sessions does not refill one.
    expect(quotas.takePrewarm(2, 100)).toBe(10);
    quotas.openSession(1);
    quotas.closeSession(1);
    expect(() => quotas.takePrewarm(1, 1)).toThrow(expect.objectContaining({ code: ErrorCodes.QUOTA }));
    now += PREWARM_WINDOW_MS / 2;
    expect(quotas.takePrewarm(1, 100)).toBe(5);
    now += PREWARM_WINDOW_MS * 10;
    expect(quotas.takePrewarm(1, 100)).toBe(10);
  });

  it('logs up to `burst` lines per window per key, then leaves them out and says how many at the next one logged', () => {
    let now = 0;
    const limiter = new LogLimiter(2, 1000, () => now);
    expect([limiter.take(1), limiter.take(1), limiter.take(1), limiter.take(1)]).toEqual([0, 0, undefined, undefined]);
    // Another key has its own.
    expect(limiter.take(2)).toBe(0);
    now += 1000;
    expect([limiter.take(1), limiter.take(1), limiter.take(1)]).toEqual([2, 0, undefined]);
    now += 5000;
    expect(limiter.take(1)).toBe(1);
  });

  it('lets a uid ask for stats maxStatsPerUid times a second, a burst of that many, then SOCKPOOL_ERR_QUOTA', () => {
    let now = 0;
    const quotas = new UidQuotas(
      () => config({ maxStatsPerUid: 3 }),
      () => now,
    );
    for (let i = 0; i < 3; i++) quotas.takeStats(1);
    expect(() => quotas.takeStats(1)).toThrow(
      expect.objectContaining({ code: ErrorCodes.QUOTA, quota: 'maxStatsPerUid', uid: 1, limit: 3 }),
    );
    // Another uid's allowance is its own.
    quotas.takeStats(2);
    // Half the window refills one and a half; a long pause refills the burst, never more.
    now += STATS_WINDOW_MS / 2;
    quotas.takeStats(1);
    expect(() => quotas.takeStats(1)).toThrow(expect.objectContaining({ quota: 'maxStatsPerUid' }));
    now += STATS_WINDOW_MS * 100;
    for (let i = 0; i < 3; i++) quotas.takeStats(1);
    expect(() => quotas.takeStats(1)).toThrow(expect.objectContaining({ quota: 'maxStatsPerUid' }));
  });
});

describe('ConnectGate', () => {
  /** A connector whose connects the test settles by hand. */
  function manualConnector() {
    const pending: Array<{ resolve: (socket: ConnectedSocket) => void; reject: (error: Error) => void }> = [];
    const connector: Connector = {
      checkTarget() {},
      checkHeld() {},
      connect: () => new Promise((resolve, reject) => pending.push({ resolve, reject })),
    };
    return { connector, pending };
  }
  const socket = (fd: number): ConnectedSocket => ({
    fd,
    address: '192.0.2.1',
    family: 4,
    connectedAt: 0,
    connectMs: 1,
  });
  const origin: Origin = { host: 'example.com', port: 443 };
  const policy = policyFor(defaultConfig(), origin.host, origin.port);
  const turn = () => new Promise((resolve) => setImmediate(resolve));

  it('runs at most the limit at once, starts queued connects in arrival order as others finish or fail', async () => {
    const { connector, pending } = manualConnector();
    const gate = new ConnectGate(connector, () => 2);
    const results = [1, 2, 3, 4].map(() => gate.connect(origin, policy));
    // Settled (and checked) at the end; a rejection is not unhandled meanwhile.
    for (const result of results) result.catch(() => {});
    await turn();
    expect(pending).toHaveLength(2);
    expect([gate.inFlight, gate.queued]).toEqual([2, 2]);
    pending[0]!.resolve(socket(101));
    await turn();
    expect(pending).toHaveLength(3);
    pending[1]!.reject(new Error('refused'));
    await turn();
    expect(pending).toHaveLength(4);
    expect([gate.inFlight, gate.queued]).toEqual([2, 0]);
    pending[2]!.resolve(socket(103));
    pending[3]!.resolve(socket(104));
    const settled = await Promise.allSettled(results);
    expect(settled.map((result) => result.status)).toEqual(['fulfilled', 'rejected', 'fulfilled', 'fulfilled']);
    expect(gate.inFlight).toBe(0);
  });

  it('starts the queued connect of the uid with the fewest in flight next, in arrival order within a uid', async () => {
    const uids: Array<number | undefined> = [];
    const pending: Array<() => void> = [];
    const connector: Connector = {
      checkTarget() {},
      checkHeld() {},
      connect: (_origin, _policy, _urgent, _wanted, uid) => {
        uids.push(uid);
        return new Promise((resolve) => pending.push(() => resolve(socket(200 + pending.length))));
      },
    };
    const gate = new ConnectGate(connector, () => 2);
    // uid 1 fills the gate and queues three more; uid 2 comes after with two.
    const results = [1, 1, 1, 1, 1, 2, 2].map((uid) => gate.connect(origin, policy, undefined, undefined, uid));
    await turn();
    expect(uids).toEqual([1, 1]);
    pending[0]!();
    await turn();
    // uid 2 holds none in flight, uid 1 holds one: uid 2 goes first.
    expect(uids).toEqual([1, 1, 2]);
    pending[1]!();
    await turn();
    // One each in flight: the longest waiting (uid 1's third) goes.
    expect(uids).toEqual([1, 1, 2, 1]);
    for (let index = 2; index < 7; index++) {
      pending[index]!();
      await turn();
    }
    expect(uids).toEqual([1, 1, 2, 1, 2, 1, 1]);
    await Promise.all(results);
    expect(gate.inFlight).toBe(0);
  });

  /**
   * Queues `backlogs` (uid → count, in that order of arrival) behind a gate of `limit`, then finishes the oldest
   * connect in flight one at a time; the uids in the order their connects started.
   */
  async function admissionOrder(limit: number, backlogs: Array<[number, number]>): Promise<number[]> {
    const { connector, started: uids, finish } = handSettledConnector(300);
    const gate = new ConnectGate(connector, () => limit);
    const results = backlogs.flatMap(([uid, count]) =>
      Array.from({ length: count }, () => gate.connect(origin, policy, undefined, undefined, uid)),
    );
    await turn();
    for (let index = 0; index < results.length; index++) {
      finish[index]!();
      await turn();
    }
    await Promise.all(results);
    expect(gate.inFlight).toBe(0);
    return uids;
  }

  it("admits another uid's connect within a turn or two at a limit of 1, not after one uid's whole backlog", async () => {
    // uid 1 started one and queued 19 before uid 2's one connect: the finishing connect's uid is not the one to
    // win the tie at "none in flight" again and again.
    const order = await admissionOrder(1, [
      [1, 20],
      [2, 1],
    ]);
    expect(order.indexOf(2)).toBeLessThanOrEqual(2);
  });

  it('takes turns between uids tied at the fewest in flight, at any limit, so none waits behind the others', async () => {
    // Two uids with backlogs and a third that comes last with one connect: it starts within one round of turns.
    for (const limit of [1, 2]) {
      const order = await admissionOrder(limit, [
        [1, 10],
        [2, 10],
        [3, 1],
      ]);
      expect(order.indexOf(3), `limit ${limit}: ${order.join(',')}`).toBeLessThanOrEqual(limit + 2);
    }
    // Three uids with backlogs at a limit of 1: after the one uid 1 started at once, round robin.
    const order = await admissionOrder(1, [
      [1, 6],
      [2, 6],
      [3, 6],
    ]);
    expect(order.slice(1, 16), order.join(',')).toEqual([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]);
  });
});

describe('ConnectGate after a reload raised its limit', () => {
  it('starts the connects already queued before a newcomer, and as many as the new limit allows', async () => {
    const started: number[] = [];
    const connector: Connector = {
      checkTarget() {},
      checkHeld() {},
      connect: (origin) => {
        started.push(origin.port);
        return new Promise(() => {});
      },
    };
    let limit = 1;
    const gate = new ConnectGate(connector, () => limit);
    const policy = policyFor(defaultConfig(), 'example.com', 443);
    const turn = () => new Promise((resolve) => setImmediate(resolve));
    for (const port of [1, 2, 3]) gate.connect({ host: 'example.com', port }, policy).catch(() => {});
    await turn();
    expect(started).toEqual([1]);
    // The reload: room for four at once. The connect in flight has not finished.
    limit = 4;
    gate.connect({ host: 'example.com', port: 4 }, policy).catch(() => {});
    await turn();
    expect(started).toEqual([1, 2, 3, 4]);
    expect([gate.inFlight, gate.queued]).toEqual([4, 0]);
  });
});

describe('ConnectGate with connects an acquire waits for', () => {
  it('starts a queued connect a client waits for before the prewarms queued ahead of it', async () => {
    const started: number[] = [];
    const finish: Array<() => void> = [];
    const connector: Connector = {
      checkTarget() {},
      checkHeld() {},
      connect: (origin) => {
        started.push(origin.port);
        return new Promise((_, reject) => finish.push(() => reject(new Error('done'))));
      },
    };
    const gate = new ConnectGate(connector, () => 1);
    const policy = policyFor(defaultConfig(), 'example.com', 443);
    const turn = () => new Promise((resolve) => setImmediate(resolve));
    const connect = (port: number, urgent: boolean) =>
      gate.connect({ host: 'example.com', port }, policy, () => urgent).catch(() => {});
    connect(1, false);
    // Another client's prewarms queue behind it; then an acquire's connect, which a client waits for.
    for (const port of [2, 3, 4]) connect(port, false);
    connect(5, true);
    await turn();
    expect(started).toEqual([1]);
    finish[0]!();
    await turn();
    expect(started).toEqual([1, 5]);
    finish[1]!();
    await turn();
    expect(started).toEqual([1, 5, 2]);
  });
});

describe('lease guard', () => {
  it('sees bytes sent or received since a socket was lent, and its end kills every copy', async () => {
    const before = fdCount();
    const connector = await FakeConnector.start();
    const connected = await connector.connect({ host: 'x', port: 1 }, policyFor(defaultConfig(), 'x', 1));
    const mark = markOf(connected.fd);
    expect(mark).toMatchObject({ quiet: true, inode: native.socketInode(connected.fd) });
    const copy = native.dup(connected.fd); // what the client holds
    expect(usedSinceLent(connected.fd, mark)).toBeUndefined();
    // The client writes through its copy: the daemon's copy shows it.
    const peer = connector.peerOf(connected.fd);
    const received = new Promise((resolve) => peer.once('data', resolve));
    const client = new Socket({ fd: copy, readable: false, writable: true });
    client.write('GET / HTTP/1.1\r\n');
    await received;
    expect(usedSinceLent(connected.fd, mark)).toMatch(/bytes were sent|waiting to be sent/);
    expect(checkIdle(connected.fd, mark)).not.toEqual(mark);
    endConnection(connected.fd);
    await new Promise((resolve) => peer.once('end', resolve));
    client.destroy();
    await connector.close();
    expect(fdCount()).toBe(before);
  });

  it('a full mark: fresh, unread input, input read, output acknowledged, output not sent, not established', async () => {
    const before = fdCount();
    const connector = await FakeConnector.start();
    const policy = policyFor(defaultConfig(), 'x', 1);
    const { fd, connectedPeer } = await connector.connect({ host: 'x', port: 1 }, policy);
    const peerSide = connector.peerOf(fd);
    const peer = [4 * 65536 + native.peerAddress(fd).port, 0x7f000001, 0, 0];
    // Nothing sent, received or queued (the one byte acknowledged is our SYN): quiet.
    const fresh = {
      inode: native.socketInode(fd),
      bytesSent: 0,
      bytesAcked: 1,
      bytesReceived: 0,
      quiet: true,
      reconnectRefused: false,
    };
    expect(markOf(fd)).toEqual({ ...fresh, checkedAt: Number.NEGATIVE_INFINITY, peer });
    // The same mark with the peer the connect's policy check read (the pool's first mark of a connect).
    expect(connectedPeer).toEqual(peer);
    expect(markOf(fd, connectedPeer)).toEqual({ ...fresh, checkedAt: Number.NEGATIVE_INFINITY, peer });
    // A socket of a daemon whose connect guard is enforced: its mark says the kernel refuses its reconnects.
    expect(markOf(fd, connectedPeer, true)).toEqual({
      ...fresh,
      reconnectRefused: true,
      checkedAt: Number.NEGATIVE_INFINITY,
      peer,
    });
    // Input nobody read: counted, not quiet.
    peerSide.write('xyz');
    await until(() => native.tcpCounters(fd).inq === 3);
    expect(markOf(fd)).toEqual({ ...fresh, bytesReceived: 3, quiet: false, checkedAt: Number.NEGATIVE_INFINITY, peer });
    // Read (by whoever holds a copy): quiet again, the count stays.
    expect(native.recvMessage(fd, 8, 0)?.data.toString()).toBe('xyz');
    expect(markOf(fd)).toEqual({ ...fresh, bytesReceived: 3, checkedAt: Number.NEGATIVE_INFINITY, peer });
    // Output the peer acknowledged: quiet.
    expect(native.sendMessage(fd, Buffer.from('ab'))).toBe(2);
    await until(() => native.tcpCounters(fd).bytesAcked === 3);
    expect(markOf(fd)).toEqual({
      ...fresh,
      bytesSent: 2,
      bytesAcked: 3,
      bytesReceived: 3,
      checkedAt: Number.NEGATIVE_INFINITY,
      peer,
    });
    // Output the peer does not take: written until the socket would block, part of it not even sent.
    peerSide.pause();
    const chunk = Buffer.alloc(1 << 16, 'a');
    while (native.sendMessage(fd, chunk) !== null);
    expect(native.tcpCounters(fd).notsentBytes).toBeGreaterThan(0);
    expect(markOf(fd)).toMatchObject({ inode: fresh.inode, bytesReceived: 3, quiet: false, peer });
    expect(markOf(fd)!.bytesSent).toBeGreaterThan(2);
    // Not established: the peer's FIN (CLOSE_WAIT); a socket never connected; not TCP; not a socket.
    const ended = (await connector.connect({ host: 'x', port: 1 }, policy)).fd;
    connector.peerOf(ended).end();
    await until(() => native.tcpCounters(ended).tcpState === 8);
    expect(markOf(ended)).toBeUndefined();
    const unconnected = native.tcpSocket(4);
    const [left, right] = native.seqpacketPair();
    const file = openSync('/dev/null', 'r');
    expect([markOf(unconnected), markOf(left), markOf(file)]).toEqual([undefined, undefined, undefined]);
    closeSync(file);
    for (const socket of [fd, ended, unconnected, left, right]) native.close(socket);
    await connector.close();
    expect(fdCount()).toBe(before);
  });

  it('the release check of a mark that is not quiet reads the queues: unread input refused, read since then passes (quiet from then on), more input or output refused', async () => {
    const before = fdCount();
    const connector = await FakeConnector.start();
    const { fd } = await connector.connect({ host: 'x', port: 1 }, policyFor(defaultConfig(), 'x', 1));
    const peerSide = connector.peerOf(fd);
    peerSide.write('xyz');
    await until(() => native.tcpCounters(fd).inq === 3);
    const mark = markOf(fd)!;
    expect(mark).toMatchObject({ bytesReceived: 3, quiet: false });
    expect(checkReturned(fd, mark)).toBe('3 bytes arrived that nobody read');
    expect(native.recvMessage(fd, 8, 0)?.data.toString()).toBe('xyz');
    const passed = checkReturned(fd, mark);
    expect(passed).toEqual({ ...mark, quiet: true, checkedAt: Number.NEGATIVE_INFINITY });
    peerSide.write('w');
    await until(() => native.tcpCounters(fd).inq === 1);
    expect(checkReturned(fd, mark)).toBe('1 bytes arrived that nobody read');
    native.recvMessage(fd, 8, 0);
    expect(checkReturned(fd, mark)).toBe('1 bytes were received on it');
    native.close(fd);
    await connector.close();
    expect(fdCount()).toBe(before);
  });

  it("one TCP_INFO read (a quiet mark) sees input, input a holder already read, and the peer's close", async () => {
    const before = fdCount();
    const connector = await FakeConnector.start();
    const connected = await connector.connect({ host: 'x', port: 1 }, policyFor(defaultConfig(), 'x', 1));
    const mark = markOf(connected.fd)!;
    expect(mark.quiet).toBe(true);
    // Untouched: the idle check and the release check both pass and hand the same mark on.
    expect(checkIdle(connected.fd, mark)).toBe(mark);
    expect(checkReturned(connected.fd, mark)).toBe(mark);
    // The origin sends a byte nobody asked for.
    const peer = connector.peerOf(connected.fd);
    peer.write('x');
    await until(() => checkIdle(connected.fd, mark) === 'data');
    expect(checkReturned(connected.fd, mark)).toMatch(/1 bytes were received/);
    // A holder of a copy reads it: the queue is empty again, the counters still tell (a MSG_PEEK would not).
    const copy = native.dup(connected.fd);
    const drained = await new Promise<Buffer>((resolve) => {
      const reader = new Socket({ fd: copy, readable: true, writable: false });
      reader.once('data', (chunk: Buffer) => {
        reader.pause();
        reader.destroy();
        resolve(chunk);
      });
    });
    expect(drained.toString()).toBe('x');
    expect(native.tcpCounters(connected.fd).inq).toBe(0);
    expect(checkIdle(connected.fd, mark)).toBe('data');
    expect(checkReturned(connected.fd, mark)).toMatch(/bytes were received/);
    // A socket whose mark was taken after the byte is quiet again; then the origin closes: 'eof'.
    const later = markOf(connected.fd)!;
    expect(checkIdle(connected.fd, later)).toBe(later);
    peer.end();
    await until(() => checkIdle(connected.fd, later) === 'eof');
    expect(checkReturned(connected.fd, later)).toMatch(/not established/);
    native.close(connected.fd);
    await connector.close();
    expect(fdCount()).toBe(before);
  });

  it('reads the peer at a release unless the kernel refuses every reconnect (the connect guard enforced)', async () => {
    const before = fdCount();
    const connector = await FakeConnector.start();
    const connected = await connector.connect({ host: 'x', port: 1 }, policyFor(defaultConfig(), 'x', 1));
    const mark = markOf(connected.fd)!;
    expect(mark.quiet).toBe(true);
    // No connect guard in this process: no socket is covered (what a connector asks before its socket says so).
    expect(native.guardCovers(connected.fd)).toBe(false);
    // A client's copy resets the connection and connects it elsewhere (here nothing refuses it): the same socket,
    // established, nothing sent or received. Only the peer read tells.
    const elsewhere = createServer((socket) => socket.pause());
    await new Promise<void>((resolve) => elsewhere.listen(0, '127.0.0.1', resolve));
    const copy = native.dup(connected.fd);
    expect(native.disconnect(copy)).toBe(true);
    native.connectStart(copy, '127.0.0.1', (elsewhere.address() as AddressInfo).port);
    await until(() => native.tcpCounters(connected.fd).tcpState === 1); // ESTABLISHED
    expect(checkReturned(connected.fd, mark)).toMatch(/connected again, to 127\.0\.0\.1/);
    // A socket connected by a daemon whose guard is enforced (its mark says so): that connect could not have
    // happened, and the release check trusts the kernel: its one TCP_INFO read, no getpeername.
    const guarded = { ...mark, reconnectRefused: true };
    expect(checkReturned(connected.fd, guarded)).toBe(guarded);
    expect(checkReturned(connected.fd, mark)).toMatch(/connected again/);
    for (const fd of [copy, connected.fd]) native.close(fd);
    await new Promise((resolve) => elsewhere.close(resolve));
    await connector.close();
    expect(fdCount()).toBe(before);
  });

  it('an idle check within RECENT_CHECK_MS of a passed release check reuses its read once, in a later turn too', async () => {
    const before = fdCount();
    const connector = await FakeConnector.start();
    const policy = policyFor(defaultConfig(), 'x', 1);
    const first = await connector.connect({ host: 'x', port: 1 }, policy);
    const second = await connector.connect({ host: 'x', port: 1 }, policy);
    const copies = [native.dup(first.fd), native.dup(second.fd)]; // what the releasing client may still hold
    // The checks' clock is passed in: the window is exact here, whatever the machine's load.
    const releasedAt = 1_000;
    const firstMark = markOf(first.fd)!;
    expect(checkReturned(first.fd, firstMark, releasedAt)).toBe(firstMark);
    // Written through the copy after the release check, and the acquire in a later turn: within the window the check
    // is not read again (the release check's snapshot is about as old as any check's is by the time the client
    // uses the socket, and that lease goes to the same uid)...
    writeSync(copies[0]!, 'x');
    await new Promise((resolve) => setImmediate(resolve));
    expect(checkIdle(first.fd, firstMark, releasedAt + RECENT_CHECK_MS)).toBe(firstMark);
    // ...once: the next check reads, and the bytes show.
    expect(checkIdle(first.fd, firstMark, releasedAt + RECENT_CHECK_MS)).toBe('error');
    // A failed release check is never reused.
    expect(checkReturned(first.fd, firstMark, releasedAt)).toMatch(/bytes were sent/);
    expect(checkIdle(first.fd, firstMark, releasedAt)).toBe('error');
    // A release check older than the window is not reused either.
    const secondMark = markOf(second.fd)!;
    expect(checkReturned(second.fd, secondMark, releasedAt)).toBe(secondMark);
    writeSync(copies[1]!, 'x');
    expect(checkIdle(second.fd, secondMark, releasedAt + RECENT_CHECK_MS + 0.001)).toBe('error');
    // Nor a mark no release check passed (read when the socket went idle).
    const third = await connector.connect({ host: 'x', port: 1 }, policy);
    const thirdCopy = native.dup(third.fd);
    const thirdMark = markOf(third.fd)!;
    writeSync(thirdCopy, 'x');
    expect(checkIdle(third.fd, thirdMark, performance.now())).toBe('error');
    for (const fd of [...copies, thirdCopy, first.fd, second.fd, third.fd]) native.close(fd);
    await connector.close();
    expect(fdCount()).toBe(before);
  });
});

/** Waits (event-loop turns, bounded) until `check` holds: the kernel's counters move when a segment lands. */
async function until(check: () => boolean): Promise<void> {
  for (let i = 0; i < 2_000 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 1));
  expect(check()).toBe(true);
}

/** Pool events nobody listens to here. */
const events: OriginPoolEvents = {
  idleChanged() {},
  dropped() {},
  connected() {},
  connectFailed() {},
  waitingForRoom() {},
  opened() {},
  lent() {},
  neverLent() {},
};

describe('OriginPool with several uids', () => {
  let connector: FakeConnector;
  let pools: OriginPool[];
  let held: Handoff[];
  const ORIGIN: Origin = { host: 'origin.test', port: 443 };

  beforeEach(async () => {
    connector = await FakeConnector.start();
    pools = [];
    held = [];
  });
  afterEach(async () => {
    for (const pool of pools) pool.close();
    for (const handoff of held.splice(0)) native.close(handoff.fd);
    await connector.close();
  });

  function pool(overrides: Partial<OriginPolicy> = {}): OriginPool {
    const policy = { ...policyFor(defaultConfig(), ORIGIN.host, ORIGIN.port), ...overrides };
    const created = new OriginPool('origin.test:443', ORIGIN, policy, connector, events);
    pools.push(created);
    return created;
  }

  it('starts no prewarm queued at the connect gate for a pool closed meanwhile (retired, removed by a reload)', async () => {
    connector.manual = true;
    const gate = new ConnectGate(connector, () => 1);
    const policyOf = (origin: Origin) => policyFor(defaultConfig(), origin.host, origin.port);
    const busy = new OriginPool('origin.test:443', ORIGIN, policyOf(ORIGIN), gate, events);
    const OTHER: Origin = { host: 'other.test', port: 443 };
    const retired = new OriginPool('other.test:443', OTHER, policyOf(OTHER), gate, events);
    pools.push(busy, retired);
    // A slow connect holds the gate's one place; the other pool's prewarm queues behind it.
    const acquired = busy.acquire(5_000, 1000);
    await until(() => connector.pending.length === 1);
    expect(retired.prewarm(1, 2000)).toBe(1);
    expect(gate.queued).toBe(1);
    retired.close();
    await connector.pending[0]!.succeed();
    held.push(await acquired);
    await until(() => gate.queued === 0);
    // Before: its turn came and it looked up, connected (and handshook) for a closed pool, which then closed it.
    expect(connector.calls).toBe(1);
    expect(gate.inFlight).toBe(0);
  });

  it('lends a socket a client released to the same uid only; other uids get a fresh one', async () => {
    const origin = pool();
    const first = await origin.acquire(1_000, 1000);
    origin.giveBack(first, 1000, true);
    const other = await origin.acquire(1_000, 2000);
    held.push(other);
    expect(other.warm).toBe(false);
    expect(other.fd).not.toBe(first.fd);
    const same = await origin.acquire(1_000, 1000);
    held.push(same);
    expect(same).toMatchObject({ warm: true, fd: first.fd });
  });

  it('a socket given back that never reached a client is shared again', async () => {
    const origin = pool();
    const first = await origin.acquire(1_000, 1000);
    origin.giveBack(first, 1000, false);
    const other = await origin.acquire(1_000, 2000);
    held.push(other);
    expect(other).toMatchObject({ warm: true, fd: first.fd });
  });

  it('marks a handoff of a socket kept for its uid, warm or straight from the release, so a giving back keeps it so', async () => {
    const origin = pool({ maxPerOrigin: 1 });
    const first = await origin.acquire(1_000, 1000);
    expect(first.kept).toBeUndefined();
    origin.giveBack(first, 1000, true);
    const warm = await origin.acquire(1_000, 1000);
    expect(warm).toMatchObject({ warm: true, fd: first.fd, kept: true });
    // Straight from the release to a waiter of the same uid.
    const waiting = origin.acquire(1_000, 1000);
    origin.giveBack(warm, 1000, true);
    const served = await waiting;
    expect(served).toMatchObject({ fd: first.fd, kept: true });
    // Its acquire ended without a lease: given back with `kept` as `lent`, another uid gets a fresh socket.
    origin.giveBack(served, 1000, served.kept === true);
    const other = await origin.acquire(5_000, 2000);
    held.push(other);
    expect(other.warm).toBe(false);
  });

  it('closes a socket kept for one uid when another uid waits for the slot it holds', async () => {
    const origin = pool({ maxPerOrigin: 1 });
    const first = await origin.acquire(1_000, 1000);
    origin.giveBack(first, 1000, true);
    expect(origin.idleCount).toBe(1);
    const other = await origin.acquire(5_000, 2000);
    held.push(other);
    expect(other.warm).toBe(false);
    expect(origin.idleCount).toBe(0);
  });

  it("gives a freed slot at maxPerOrigin to the uids waiting in turns, not to one uid's whole queue first", async () => {
    const origin = pool({ maxPerOrigin: 1 });
    const served: Array<{ uid: number; handoff: Handoff }> = [];
    const acquire = (uid: number) =>
      origin.acquire(5_000, uid).then((handoff) => {
        served.push({ uid, handoff });
        held.push(handoff);
      });
    await acquire(1000);
    // uid 1000 queues three more while it holds the slot; uid 2000 then queues one.
    const waits = [1000, 1000, 1000, 2000].map(acquire);
    for (let ended = 0; ended < 4; ended++) {
      const { uid, handoff } = served[ended]!;
      native.close(held.splice(held.indexOf(handoff), 1)[0]!.fd);
      origin.leaseEnded(uid);
      await until(() => served.length === ended + 2);
    }
    await Promise.all(waits);
    // The lease that ends is uid 1000's, which then holds none, as uid 2000 does: the tie goes to uid 2000, served
    // longer ago (never), not to uid 1000's older waiters (before: 1000, 1000, 1000, 1000, 2000).
    expect(served.map(({ uid }) => uid)).toEqual([1000, 2000, 1000, 1000, 1000]);
  });
});

describe('OriginPool connects at the connect gate', () => {
  let connector: FakeConnector;
  let pools: OriginPool[];

  beforeEach(async () => {
    connector = await FakeConnector.start();
    connector.manual = true;
    pools = [];
  });
  afterEach(async () => {
    for (const pool of pools) pool.close();
    await connector.close();
  });

  it("counts a waiter's connect for its own uid, and serves it to that uid, not behind another uid's backlog", async () => {
    // What the gate starts, in order: the origin's host and the uid the connect counts for.
    const started: Array<[string, number | undefined]> = [];
    const recorder: Connector = {
      checkTarget: (origin) => connector.checkTarget(origin),
      checkHeld: (origin, address) => connector.checkHeld(origin, address),
      connect: (origin, policy, _urgent, _wanted, uid) => {
        started.push([origin.host, uid]);
        return connector.connect(origin, policy);
      },
    };
    const gate = new ConnectGate(recorder, () => 2);
    const poolOf = (host: string) => {
      const origin: Origin = { host, port: 443 };
      const created = new OriginPool(`${host}:443`, origin, policyFor(defaultConfig(), host, 443), gate, events);
      pools.push(created);
      return created;
    };
    const [a, b] = [poolOf('a.test'), poolOf('b.test')];
    const settled: Handoff[] = [];
    const acquire = (pool: OriginPool, uid: number) => {
      const result = pool.acquire(10_000, uid);
      result.then((handoff) => settled.push(handoff)).catch(() => {});
      return result;
    };
    try {
      // uid 1000's backlog: four connects to b.test (two run, two queue), then one to a.test; then uid 2000's one
      // acquire of a.test, where uid 1000 waits first.
      for (let i = 0; i < 4; i++) acquire(b, 1000);
      acquire(a, 1000);
      const own = acquire(a, 2000);
      await until(() => connector.pending.length === 2);
      expect(gate.queued).toBe(4);
      // One of uid 1000's connects ends: uid 2000 holds none in flight, so its connect goes next.
      await connector.pending[0]!.succeed();
      await until(() => started.length === 3);
      expect(started[2]).toEqual(['a.test', 2000]);
      // And its connect serves uid 2000's acquire, not uid 1000's older one at a.test (whose own connect waits behind
      // uid 1000's backlog).
      await until(() => connector.pending.length === 3);
      await connector.pending[2]!.succeed();
      const handoff = await own;
      expect(handoff.warm).toBe(false);
      expect(a.waitingCount).toBe(1);
    } finally {
      for (const handoff of settled) native.close(handoff.fd);
    }
  });
});
