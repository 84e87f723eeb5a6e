// Each uid's share of the relay threads' handshake CPU, and each origin's within the daemon's own refills
// (daemon/relay-cpu.ts): pure logic, with the clock given.
// The relay threads' measuring and the queue's holding back are tested with a real relay thread in
// test/daemon-trust-relay-cpu.test.ts.
import { describe, expect, it } from 'vitest';
import { DAEMON_UID } from '../daemon/fair-queue.js';
import { CPU_HALF_LIFE_MS, CPU_SHARE, DAEMON_OVERDRAW, RelayCpuShares } from '../daemon/relay-cpu.js';

describe('RelayCpuShares', () => {
  it('bounds a uid at its share of every relay thread: the rate times the mean lifetime of the decay', () => {
    const limit = (CPU_SHARE * CPU_HALF_LIFE_MS * 1_000) / Math.LN2;
    expect(new RelayCpuShares(1).limitMicros).toBeCloseTo(limit);
    expect(new RelayCpuShares(4).limitMicros).toBeCloseTo(4 * limit);
  });

  it('leaves an honest burst alone: 300 handshakes of 2 ms each, then 16 more under way at once', () => {
    const shares = new RelayCpuShares(1);
    for (let index = 0; index < 300; index++) shares.charge(1000, 2_000, 2_000, 0);
    expect(shares.mayStart(1000, 16, 0)).toBe(true);
    expect(shares.waitMs(1000, 16, 0)).toBe(0);
  });

  it('holds a costly uid back until its cost decays, then lets one start, not two; other uids are not touched', () => {
    const shares = new RelayCpuShares(1);
    const check = 370_000;
    // Four costly checks: over the limit.
    for (let index = 0; index < 4; index++) shares.charge(1000, check, check, 0);
    expect(shares.costOf(1000, 0)).toBe(4 * check);
    expect(shares.mayStart(1000, 0, 0)).toBe(false);
    expect(shares.mayStart(2000, 16, 0)).toBe(true);
    const wait = shares.waitMs(1000, 0, 0);
    expect(wait).toBeCloseTo(CPU_HALF_LIFE_MS * Math.log2((4 * check) / shares.limitMicros));
    expect(shares.mayStart(1000, 0, wait - 1)).toBe(false);
    expect(shares.mayStart(1000, 0, wait + 1)).toBe(true);
    // One under way is expected to cost its peak: a second waits.
    expect(shares.mayStart(1000, 1, wait + 1)).toBe(false);
    expect(shares.waitMs(1000, 1, wait + 1)).toBeGreaterThan(0);
  });

  it('decays the peak with the cost: a uid whose one handshake was costly is served at full rate again later', () => {
    const shares = new RelayCpuShares(1);
    shares.charge(1000, 370_000, 370_000, 0);
    expect(shares.mayStart(1000, 2, 0)).toBe(false);
    const later = 10 * CPU_HALF_LIFE_MS;
    expect(shares.mayStart(1000, 16, later)).toBe(true);
  });

  it('forgets the uids whose cost decayed to nothing (a bound on its records)', () => {
    const shares = new RelayCpuShares(1);
    for (let uid = 0; uid < 1_000; uid++) shares.charge(uid, 1_000, 1_000, 0);
    expect(shares.recordCount).toBe(1_000);
    // Long after, new uids' charges sweep them once the records doubled since the last sweep (1,024 here).
    const later = 40 * CPU_HALF_LIFE_MS;
    for (let uid = 5_000; uid < 5_030; uid++) shares.charge(uid, 1_000, 1_000, later);
    expect(shares.recordCount).toBe(30);
    for (let uid = 0; uid < 1_000; uid += 100) expect(shares.costOf(uid, later)).toBe(0);
  });

  it("charges the daemon's refills per origin: a costly origin's are held, another origin's go on", () => {
    const shares = new RelayCpuShares(1);
    const check = 370_000;
    // The daemon's refills of a costly origin: over the daemon's share.
    for (let index = 0; index < 3; index++) shares.charge(DAEMON_UID, check, check, 0, 'costly:443');
    expect(shares.mayStart(DAEMON_UID, 0, 0, { key: 'costly:443', started: 0 })).toBe(false);
    expect(shares.waitMs(DAEMON_UID, 0, 0, { key: 'costly:443', started: 0 })).toBeGreaterThan(0);
    // Another origin's refills (cheap, some under way) are not held for it.
    for (let index = 0; index < 50; index++) shares.charge(DAEMON_UID, 2_000, 2_000, 0, 'cheap:443');
    expect(shares.mayStart(DAEMON_UID, 4, 0, { key: 'cheap:443', started: 4 })).toBe(true);
    expect(shares.waitMs(DAEMON_UID, 4, 0, { key: 'cheap:443', started: 4 })).toBe(0);
    expect(shares.mayStart(DAEMON_UID, 4, 0, { key: 'new:443', started: 0 })).toBe(true);
    // The costly one is paced as before: once the daemon's cost decayed under its share, one starts.
    const wait = shares.waitMs(DAEMON_UID, 0, 0, { key: 'costly:443', started: 0 });
    expect(shares.mayStart(DAEMON_UID, 0, wait + 1, { key: 'costly:443', started: 0 })).toBe(true);
    // A uid's share is its own, whatever the daemon's refills cost.
    expect(shares.mayStart(1000, 16, 0)).toBe(true);
  });

  it("holds every origin's refills once the daemon's took two shares (prewarms of many costly origins cannot multiply it)", () => {
    const shares = new RelayCpuShares(1);
    const check = 370_000;
    for (let origin = 0; origin < 8; origin++) {
      for (let index = 0; index < 2; index++) shares.charge(DAEMON_UID, check, check, 0, `costly-${origin}:443`);
    }
    expect(shares.costOf(DAEMON_UID, 0)).toBeGreaterThan(DAEMON_OVERDRAW * shares.limitMicros);
    for (let origin = 0; origin < 8; origin++) {
      expect(shares.mayStart(DAEMON_UID, 0, 0, { key: `costly-${origin}:443`, started: 0 })).toBe(false);
    }
    expect(shares.mayStart(DAEMON_UID, 0, 0, { key: 'new:443', started: 0 })).toBe(false);
    // Once the daemon's cost decayed under the overdraw (with the new origin's expected cost: none known), it may.
    const wait = shares.waitMs(DAEMON_UID, 0, 0, { key: 'new:443', started: 0 });
    expect(shares.mayStart(DAEMON_UID, 0, wait + 1, { key: 'new:443', started: 0 })).toBe(true);
  });

  it("bounds the daemon's refills of many costly origins over time: under two shares of the thread together", () => {
    // 20 costly origins refilled for a minute, each as soon as it may (one under way at a time each, 400 ms each,
    // charged at its end): the rule's equal part of the share, decaying per origin, would let each start again
    // once its own cost decayed under its part, ever more often together as origins are added.
    const shares = new RelayCpuShares(1);
    const check = 370_000;
    const origins = Array.from({ length: 20 }, (_, index) => ({ key: `costly-${index}:443`, endsAt: -1, expected: 0 }));
    let charged = 0;
    let underWay = 0;
    const MINUTE = 60_000;
    for (let now = 0; now <= MINUTE; now += 10) {
      for (const origin of origins) {
        if (origin.endsAt >= 0 && now >= origin.endsAt) {
          shares.daemonEnded(origin.expected);
          shares.charge(DAEMON_UID, check, check, now, origin.key);
          charged += check;
          origin.endsAt = -1;
          underWay--;
        }
        const started = origin.endsAt >= 0 ? 1 : 0;
        if (started === 0 && shares.mayStart(DAEMON_UID, underWay, now, { key: origin.key, started })) {
          origin.endsAt = now + 400;
          origin.expected = shares.daemonStarted(origin.key, now);
          underWay++;
        }
      }
    }
    // Two shares of a thread for a minute, and one check under way per origin at the start.
    expect(charged).toBeLessThanOrEqual(DAEMON_OVERDRAW * CPU_SHARE * MINUTE * 1_000 + 20 * check);
  });

  it("forgets the daemon's origins whose cost decayed to nothing, as it forgets uids", () => {
    const shares = new RelayCpuShares(1);
    for (let origin = 0; origin < 1_000; origin++) shares.charge(DAEMON_UID, 1_000, 1_000, 0, `o${origin}:443`);
    // The origins and the daemon's own total.
    expect(shares.recordCount).toBe(1_001);
    const later = 40 * CPU_HALF_LIFE_MS;
    for (let origin = 5_000; origin < 5_030; origin++) shares.charge(DAEMON_UID, 1_000, 1_000, later, `o${origin}:443`);
    expect(shares.recordCount).toBe(31);
  });
});
