// A bounded Map whose entries each belong to the uid whose connect brought them in: the connector's memories of hosts
// and ports that every uid's connects read (learned-families.ts, the resolver's failure marks and DNS cache). Past
// `maxEntries` the entry dropped is the least recently set of the uid that holds the most. So one uid reaching
// thousands of host:ports (a crawler, or junk on purpose) pushes out its own entries, never those of a uid that holds
// fewer: each uid keeps at least an equal share of the table, and one alone may use all of it.
//
// An entry set again by another uid (its connect reached the same host:port) stays its holder's, renewed: had it
// become the setter's, a uid knowing another's host:ports could take their entries over and then push them out as
// its own oldest. So only a uid's own new keys add to what it holds, and no uid changes what another holds. (An entry
// that a heavy uid brought in and a light one uses goes with the heavy uid's oldest; the light uid's next connect
// brings it in again, as its own: one lookup or race, once.)
//
// (Finding the uid that holds the most scans the uids holding entries: heaviestHolder.)

/**
 * The holder of the most (the first found of equals) and by how many it leads the next: who gives up an entry when a
 * table shared by uids is over its cap (this map; the history store's origins, store.ts). Scans the holders: a few,
 * one per local user at most.
 */
export function heaviestHolder<K>(sizes: Iterable<readonly [K, number]>): { holder: K; lead: number } | undefined {
  let heaviest: { holder: K; size: number } | undefined;
  let next = 0;
  for (const [holder, size] of sizes) {
    if (!heaviest || size > heaviest.size) {
      next = heaviest?.size ?? 0;
      heaviest = { holder, size };
    } else if (size > next) next = size;
  }
  return heaviest && { holder: heaviest.holder, lead: heaviest.size - next };
}

interface Owned<V> {
  value: V;
  uid: number;
}

export class UidShareMap<V> {
  readonly #entries = new Map<string, Owned<V>>();
  /** Per uid, the keys it holds, least recently set first. */
  readonly #byUid = new Map<number, Set<string>>();
  readonly #maxEntries: number;

  constructor(maxEntries: number) {
    this.#maxEntries = maxEntries;
  }

  get size(): number {
    return this.#entries.size;
  }

  get(key: string): V | undefined {
    return this.#entries.get(key)?.value;
  }

  /** Sets `key`: a new key is `uid`'s, one held already stays its holder's; either way the holder's most recent. */
  set(key: string, value: V, uid: number): void {
    const owned = this.#entries.get(key);
    if (owned) {
      owned.value = value;
      const keys = this.#byUid.get(owned.uid)!;
      keys.delete(key); // re-insert: each uid's keys are kept least recently set first
      keys.add(key);
      return;
    }
    this.#entries.set(key, { value, uid });
    let keys = this.#byUid.get(uid);
    if (!keys) {
      keys = new Set();
      this.#byUid.set(uid, keys);
    }
    keys.add(key);
    while (this.#entries.size > this.#maxEntries) {
      if (!this.#dropOne()) break;
    }
  }

  delete(key: string): boolean {
    this.#unown(key);
    return this.#entries.delete(key);
  }

  clear(): void {
    this.#entries.clear();
    this.#byUid.clear();
  }

  /** How many entries `uid` holds. */
  heldBy(uid: number): number {
    return this.#byUid.get(uid)?.size ?? 0;
  }

  #unown(key: string): void {
    const owned = this.#entries.get(key);
    if (!owned) return;
    const keys = this.#byUid.get(owned.uid);
    keys?.delete(key);
    if (keys?.size === 0) this.#byUid.delete(owned.uid);
  }

  /** Drops the least recently set entry of the uid holding the most; false when there is none. */
  #dropOne(): boolean {
    const heaviest = heaviestHolder(Array.from(this.#byUid, ([uid, keys]) => [uid, keys.size] as const));
    const oldest = heaviest && this.#byUid.get(heaviest.holder)?.values().next();
    if (!oldest || oldest.done) return false;
    return this.delete(oldest.value);
  }
}
