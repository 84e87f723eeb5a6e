// shared/id-table.ts: ids are unique while values come and go, a deleted id finds nothing (even once its slot holds
// a new value), and the table holds what was added and not deleted.
import { describe, expect, it } from 'vitest';
import { IdTable, IntMap } from '../shared/id-table.js';

describe('IdTable', () => {
  it('gives out unique ids, reuses slots, and never answers an id that was deleted', () => {
    const table = new IdTable<string>();
    const a = table.add('a');
    const b = table.add('b');
    expect(a).not.toBe(b);
    expect(table.get(a)).toBe('a');
    expect(table.size).toBe(2);
    expect(table.delete(a)).toBe(true);
    expect(table.delete(a)).toBe(false);
    expect(table.get(a)).toBeUndefined();
    // The next value takes a's slot, under an id of its own: a stale `a` still finds nothing.
    const c = table.add('c');
    expect(c).not.toBe(a);
    expect(table.get(c)).toBe('c');
    expect(table.get(a)).toBeUndefined();
    expect(table.delete(a)).toBe(false);
    expect(table.get(c)).toBe('c');
    expect(table.values().sort()).toEqual(['b', 'c']);
    expect(table.size).toBe(2);
  });

  it('keeps ids unique over many adds and deletes with few values at once', () => {
    const table = new IdTable<number>();
    const seen = new Set<number>();
    const live: number[] = [];
    for (let i = 0; i < 10_000; i++) {
      const id = table.add(i);
      expect(seen.has(id)).toBe(false);
      seen.add(id);
      live.push(id);
      if (live.length > 4) expect(table.delete(live.shift()!)).toBe(true);
    }
    expect(table.size).toBe(4);
    expect(live.map((id) => table.get(id))).toEqual([9_996, 9_997, 9_998, 9_999]);
  });

  it('IntMap: keys the caller chooses, with size, deletes and a copy of the entries', () => {
    const map = new IntMap<string>();
    expect(map.set(7, 'seven').set(3, 'three').set(7, 'SEVEN').size).toBe(2);
    expect(map.get(7)).toBe('SEVEN');
    expect(map.get(4)).toBeUndefined();
    expect(map.entries()).toEqual([
      [3, 'three'],
      [7, 'SEVEN'],
    ]);
    // Deleting while going through the entries is safe: they are a copy.
    for (const [key] of map.entries()) expect(map.delete(key)).toBe(true);
    expect(map.size).toBe(0);
    expect(map.delete(3)).toBe(false);
  });
});
