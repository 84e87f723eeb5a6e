// shared/recent-map.ts: the last `generation` keys set or found are kept, at most twice as many, and a later value
// wins over an older one set aside in the previous generation; entries the owner says are in use outlast a flood of
// other keys, within the same bound.
import { describe, expect, it } from 'vitest';
import { RecentMap } from '../shared/recent-map.js';

describe('RecentMap', () => {
  it('keeps the last generation of keys at least, twice as many at most, and the latest value of each', () => {
    const map = new RecentMap<string, number>(3);
    for (const [key, value] of [
      ['a', 1],
      ['b', 2],
      ['c', 3],
    ] as const)
      map.set(key, value);
    // A fourth key starts a new generation: a, b, c are set aside, still found.
    map.set('d', 4);
    expect(map.get('a')).toBe(1); // found in the previous generation: moves into the current one (d, a)
    map.set('b', 20); // the current value wins over the one set aside
    expect(map.get('b')).toBe(20);
    // d, a, b fill the current generation; e sets it aside and drops the one before (c is gone).
    map.set('e', 5);
    expect(map.get('c')).toBeUndefined();
    expect([map.get('d'), map.get('a'), map.get('b'), map.get('e')]).toEqual([4, 1, 20, 5]);
  });

  it('an existing key updated in a full generation does not start a new one', () => {
    const map = new RecentMap<string, number>(2);
    map.set('a', 1);
    map.set('b', 2);
    map.set('a', 3);
    map.set('c', 4); // sets aside {a: 3, b: 2}
    map.set('d', 5); // current {c, d}
    map.set('e', 6); // sets aside {c, d}: a and b are gone
    expect(map.get('a')).toBeUndefined();
    expect(map.get('c')).toBe(4);
  });

  it('carries an entry still in use into each new generation, and drops it once it is not', () => {
    const inUse = new Set(['a']);
    const map = new RecentMap<string, number>(4, (key) => inUse.has(key));
    for (const [i, key] of ['a', 'b', 'c', 'd'].entries()) map.set(key, i);
    // Three more generations of other keys: b, c and d are gone; a, in use, was carried each time.
    for (const [i, key] of [...'efghijklmnop'].entries()) map.set(key, 10 + i);
    expect([map.get('a'), map.get('b'), map.get('c'), map.get('d')]).toEqual([0, undefined, undefined, undefined]);
    inUse.clear();
    for (const [i, key] of [...'qrstuvwx'].entries()) map.set(key, 30 + i);
    expect(map.get('a')).toBeUndefined();
  });

  it('with every entry in use, carries at most half a generation (the oldest first) and holds at most twice the generation', () => {
    const map = new RecentMap<number, number>(4, () => true);
    let most = 0;
    for (let key = 0; key < 1_000; key++) {
      map.set(key, key);
      most = Math.max(most, map.size);
    }
    expect(most).toBeLessThanOrEqual(8);
    // The first two, carried at every swap, are still there; those after them were dropped as before.
    expect([map.get(0), map.get(1), map.get(2), map.get(3)]).toEqual([0, 1, undefined, undefined]);
  });
});
