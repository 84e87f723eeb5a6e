// A binary heap of values, each under a key that finds it again, so that one entry can move or leave without a walk
// over the others: for an order whose entries change one at a time while many wait (the uids waiting at an origin's
// cap: origin-cap.ts; in a pool's or the connect gate's fair queue: fair-queue.ts). Setting or deleting an entry
// costs a walk up or down the heap (log n comparisons), reading the first nothing.

export class KeyedHeap<K, V> {
  readonly #before: (a: V, b: V) => boolean;
  /** The heap, first at 0; each entry's index is in #indexOf. */
  #entries: Array<{ key: K; value: V }> = [];
  readonly #indexOf = new Map<K, number>();

  /** `before(a, b)`: whether `a` comes before `b` (a strict order: never both ways). */
  constructor(before: (a: V, b: V) => boolean) {
    this.#before = before;
  }

  get size(): number {
    return this.#entries.length;
  }

  /** The value that comes first (not removed); undefined when none is in. */
  peek(): V | undefined {
    return this.#entries[0]?.value;
  }

  /** Puts `value` in under `key`, in place of the one there was. */
  set(key: K, value: V): void {
    const index = this.#indexOf.get(key);
    if (index === undefined) {
      this.#entries.push({ key, value });
      this.#place(this.#entries.length - 1);
      return;
    }
    this.#entries[index]!.value = value;
    this.#place(index);
  }

  /** Takes out the value under `key`; false when there was none. */
  delete(key: K): boolean {
    const index = this.#indexOf.get(key);
    if (index === undefined) return false;
    this.#indexOf.delete(key);
    const last = this.#entries.pop()!;
    if (index < this.#entries.length) {
      this.#entries[index] = last;
      this.#place(index);
    }
    return true;
  }

  clear(): void {
    this.#entries = [];
    this.#indexOf.clear();
  }

  /** Moves the entry at `index` up or down to where its value belongs, and records the indexes it changed. */
  #place(index: number): void {
    const entries = this.#entries;
    const entry = entries[index]!;
    let at = index;
    while (at > 0) {
      const parent = (at - 1) >> 1;
      if (!this.#before(entry.value, entries[parent]!.value)) break;
      entries[at] = entries[parent]!;
      this.#indexOf.set(entries[at]!.key, at);
      at = parent;
    }
    if (at === index) {
      for (;;) {
        const left = 2 * at + 1;
        if (left >= entries.length) break;
        const right = left + 1;
        const child =
          right < entries.length && this.#before(entries[right]!.value, entries[left]!.value) ? right : left;
        if (!this.#before(entries[child]!.value, entry.value)) break;
        entries[at] = entries[child]!;
        this.#indexOf.set(entries[at]!.key, at);
        at = child;
      }
    }
    entries[at] = entry;
    this.#indexOf.set(entry.key, at);
  }
}
