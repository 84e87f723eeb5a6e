// A bounded Map whose entries each belong to the uid whose connect made or last renewed them: the connector's
// memories of hosts and ports that every uid's connects read (learned-families.ts, the resolver's failure marks).
// Past `maxEntries` the entry dropped is the least recently set of the uid that holds the most. So one uid reaching
// thousands of host:ports (a crawler, or junk on purpose) pushes out its own entries, never those of a uid that holds
// fewer: each uid keeps at least an equal share of the table, and one alone may use all of it.
//
// (Finding the uid that holds the most scans the uids holding entries: a few, one per local user at most.)

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

  /** Sets `key` for `uid`: it is `uid`'s from now on (whoever held it), its most recent. */
  set(key: string, value: V, uid: number): void {
    this.#unown(key);
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
    let largest: Set<string> | undefined;
    for (const keys of this.#byUid.values()) {
      if (!largest || keys.size > largest.size) largest = keys;
    }
    const oldest = largest?.values().next();
    if (!oldest || oldest.done) return false;
    return this.delete(oldest.value);
  }
}
