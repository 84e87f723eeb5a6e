// Each uid's share of the relay threads' handshake CPU (daemon/relay-cpu.ts): pure logic, with the clock given.
// The relay threads' measuring and the queue's holding back are tested with a real relay thread in
// test/daemon-trust-relay-cpu.test.ts.
import { describe, expect, it } from 'vitest';
import { CPU_HALF_LIFE_MS, CPU_SHARE, RelayCpuShares } from '../daemon/relay-cpu.js';

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
});
