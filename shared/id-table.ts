// Values by an id the table gives out (IdTable) or by an integer key of the caller's (IntMap), for registries that add
// and delete on every request or lease: what is in flight on a worker thread's lane, what waits for the daemon's
// answer, the fds curl owns.
//
// Not a Map, on purpose. A Map that keeps adding and deleting rehashes again and again, and V8 links each hash table
// a Map leaves behind to the next one (so that live iterators can follow). Once one of those tables is promoted to
// the old generation, it keeps every later table young-reachable, and with them every value they held: all the
// requests since the last young-generation GC survived it. A caller thread of the default client that way kept
// about 13 MB alive past each scavenge, grew its young generation to tens of MB and paused for up to 47 ms; with this
// table it keeps kilobytes and pauses for under a millisecond. Here the values sit in arrays, in slots that are
// reused: nothing links one request to the next.
//
// An id is its slot plus SLOTS times the slot's use count, so an id that was deleted is never given out again
// (until a slot has been reused 2^31 times): get() of an old id finds nothing, not a later value.

/** Slots per use count in an id: at most this many values at once. */
const SLOTS = 1 << 21;
const MAX_USES = 2 ** 31;

export class IdTable<T> {
  /** The value in each slot (undefined: free). */
  #values: Array<T | undefined> = [];
  /** The id each slot's value has (or had last). */
  #ids: number[] = [];
  /** Free slots, reused last freed first. */
  #free: number[] = [];
  #size = 0;

  get size(): number {
    return this.#size;
  }

  /** Adds `value`; returns its id. */
  add(value: T): number {
    let slot = this.#free.pop();
    let uses: number;
    if (slot === undefined) {
      slot = this.#values.length;
      if (slot >= SLOTS) throw new RangeError(`IdTable holds at most ${SLOTS} values`);
      uses = 0;
    } else {
      uses = (Math.floor(this.#ids[slot]! / SLOTS) + 1) % MAX_USES;
    }
    const id = uses * SLOTS + slot;
    this.#values[slot] = value;
    this.#ids[slot] = id;
    this.#size++;
    return id;
  }

  get(id: number): T | undefined {
    const slot = id % SLOTS;
    return this.#ids[slot] === id ? this.#values[slot] : undefined;
  }

  /** Deletes the value of `id`; false if there was none. */
  delete(id: number): boolean {
    const slot = id % SLOTS;
    if (this.#ids[slot] !== id || this.#values[slot] === undefined) return false;
    this.#values[slot] = undefined;
    this.#free.push(slot);
    this.#size--;
    return true;
  }

  /** The values now, in slot order. */
  values(): T[] {
    const out: T[] = [];
    for (const value of this.#values) if (value !== undefined) out.push(value);
    return out;
  }
}

/**
 * Values by an integer key the caller chooses (an fd, an id the peer echoes back): a Map's job, for registries that
 * add and delete per lease or per message, without a Map's chain of left-behind tables (see the header). A plain
 * object without a prototype: V8 keeps its integer keys in a dictionary of their own, which links nothing.
 */
export class IntMap<T> {
  #entries: Record<number, T> = Object.create(null);
  #size = 0;

  get size(): number {
    return this.#size;
  }

  get(key: number): T | undefined {
    return this.#entries[key];
  }

  set(key: number, value: T): this {
    if (!(key in this.#entries)) this.#size++;
    this.#entries[key] = value;
    return this;
  }

  /** Deletes `key`; false if it was not there. */
  delete(key: number): boolean {
    if (!(key in this.#entries)) return false;
    delete this.#entries[key];
    this.#size--;
    return true;
  }

  /** The entries now, keys ascending (a copy: deleting while going through it is safe). */
  entries(): Array<[number, T]> {
    return Object.keys(this.#entries).map((key) => [Number(key), this.#entries[Number(key)]!]);
  }
}
