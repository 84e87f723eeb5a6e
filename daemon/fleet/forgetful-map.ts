// Per-origin rate state (a GCRA's TATs, the daemon's token batches) that clients can make grow by naming ever more
// origins. Past `limit` entries, `set` forgets the entries `forgettable` says are the same as none (a TAT in the
// past, a batch spent or expired). A scan that leaves the map still over half full of live entries puts the next
// scan at twice its size, so a map of live entries costs amortised O(1) per insert rather than a scan of all of it
// on every new origin; live entries are bounded by the rates themselves (an entry lives as long as its tokens do).

export class ForgetfulMap<K, V> {
  readonly #map = new Map<K, V>();
  readonly #limit: number;
  readonly #forgettable: (value: V, now: number) => boolean;
  /** The size past which the next `set` scans. */
  #scanAt: number;

  constructor(limit: number, forgettable: (value: V, now: number) => boolean) {
    this.#limit = limit;
    this.#forgettable = forgettable;
    this.#scanAt = limit;
  }

  get size(): number {
    return this.#map.size;
  }

  get(key: K): V | undefined {
    return this.#map.get(key);
  }

  entries(): IterableIterator<[K, V]> {
    return this.#map.entries();
  }

  /** Sets `key`; past the scan size, first forgets what is forgettable at `now` (never `key` itself). */
  set(key: K, value: V, now: number): void {
    this.#map.set(key, value);
    if (this.#map.size <= this.#scanAt) return;
    for (const [other, held] of this.#map) {
      if (other !== key && this.#forgettable(held, now)) this.#map.delete(other);
    }
    this.#scanAt = Math.max(this.#limit, 2 * this.#map.size);
  }
}
