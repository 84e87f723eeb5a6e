// A Map of the most recently set keys, bounded, for caches on a per-request or per-lease path (parsed URLs, the
// address curl is pinned to per origin).
//
// It never deletes. A Map that keeps deleting and adding rehashes again and again (a delete that leaves it sparse
// shrinks it too), and V8 links each table a Map leaves behind to the next one (for iterators): once one of those
// tables is promoted to the old generation, every later table, and every value they held, survives the
// young-generation GCs that follow (../shared/id-table.ts has the numbers). Here, when the current generation is
// full it is set aside whole as the previous one and a new Map begins; a key found only in the previous generation
// moves into the current one. So the last `generation` keys set or found are always kept, at most twice as many.

export class RecentMap<K, V> {
  readonly #generation: number;
  #current = new Map<K, V>();
  #previous = new Map<K, V>();

  constructor(generation: number) {
    this.#generation = generation;
  }

  get(key: K): V | undefined {
    const value = this.#current.get(key);
    if (value !== undefined) return value;
    const kept = this.#previous.get(key);
    if (kept !== undefined) this.set(key, kept);
    return kept;
  }

  set(key: K, value: V): void {
    if (this.#current.size >= this.#generation && !this.#current.has(key)) {
      this.#previous = this.#current;
      this.#current = new Map();
    }
    this.#current.set(key, value);
  }
}
