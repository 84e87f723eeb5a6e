// A Map of the most recently set keys, bounded, for caches on a per-request or per-lease path (parsed URLs, the
// address curl is pinned to per origin, the client's routes per origin).
//
// It never deletes. A Map that keeps deleting and adding rehashes again and again (a delete that leaves it sparse
// shrinks it too), and V8 links each table a Map leaves behind to the next one (for iterators): once one of those
// tables is promoted to the old generation, every later table, and every value they held, survives the
// young-generation GCs that follow (../shared/id-table.ts has the numbers). Here, when the current generation is
// full it is set aside whole as the previous one and a new Map begins; a key found only in the previous generation
// moves into the current one. So the last `generation` keys set or found are always kept, at most twice as many
// (with `keep`, below: fewer).
//
// An entry still in use, however long ago it was set or found (the owner's `keep` says which: an origin's route
// while its requests run or its mark lasts), is carried into the new generation when the one it is in is dropped,
// so that a flood of other keys does not make the owner forget it. At most half a generation is carried at a swap
// (the oldest first: they lead the generation they are carried into), so that a new generation always has room for
// half a generation of new keys: the bound of twice `generation` holds, and a swap's walk over the dropped
// generation is paid for by the keys set since the one before. Entries in use beyond that are dropped as before.
// The carried entries take room of the generations they are in: of the keys set or found lately, and not in use,
// the last `generation` are kept while few are carried, and at least the last half generation (and one) however many.

export class RecentMap<K, V> {
  readonly #generation: number;
  /** Whether an entry of a generation about to be dropped is still in use: carried into the new one. */
  readonly #keep: ((key: K, value: V) => boolean) | undefined;
  #current = new Map<K, V>();
  #previous = new Map<K, V>();

  constructor(generation: number, keep?: (key: K, value: V) => boolean) {
    this.#generation = generation;
    this.#keep = keep;
  }

  /** Entries held, in both generations (a key found in the previous one is in both): at most twice `generation`. */
  get size(): number {
    return this.#current.size + this.#previous.size;
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
      const dropped = this.#previous;
      this.#previous = this.#current;
      this.#current = new Map();
      if (this.#keep) this.#carry(dropped, this.#keep);
    }
    this.#current.set(key, value);
  }

  /** Entries of the dropped generation still in use go into the new one, at most half a generation of them. A key
   *  also in the generation set aside was found or set since: that entry is the one kept. */
  #carry(dropped: Map<K, V>, keep: (key: K, value: V) => boolean): void {
    const room = Math.floor(this.#generation / 2);
    for (const [key, value] of dropped) {
      if (this.#current.size >= room) return;
      if (!this.#previous.has(key) && keep(key, value)) this.#current.set(key, value);
    }
  }
}
