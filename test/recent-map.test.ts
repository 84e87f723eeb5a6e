// shared/recent-map.ts: the last `generation` keys set or found are kept, at most twice as many, and a later value
// wins over an older one set aside in the previous generation.
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
});
