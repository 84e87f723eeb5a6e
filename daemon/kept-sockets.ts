// Idle sockets kept for one uid (a client released them unused and may hold a copy: see OriginPool.giveBack), across
// every origin pool, bounded per uid by `quotas.maxKeptPerUid` (issue 10: every resource a client can consume has a
// bound per uid). Without it one uid that acquires and releases unused across many origins made the daemon hold up
// to `pool.maxIdleTotal` sockets for it alone (daemon fds, connections at the origins) and pushed other uids' warm
// shared sockets out of that global budget.
//
// One structure counts and orders: per uid, a Map in insertion order from each kept socket to the pool holding it. The
// count is its size, the oldest its first entry: nothing derived that could drift from the sockets themselves.
// A socket's entry is made when it goes idle kept for its uid and removed wherever it leaves its pool's idle set
// (OriginPool: lent again to its uid, or closed for any reason, #drop).

/** What holds a kept socket (its origin pool) and closes it when the bound says so. */
export interface KeptHolder<Socket> {
  /** Closes `socket` (shut down first: the client may hold a copy), and calls released for it. */
  dropKept(socket: Socket): void;
}

export class KeptSockets<Socket extends object = object> {
  readonly #byUid = new Map<number, Map<Socket, KeptHolder<Socket>>>();
  readonly #limit: () => number;

  /** `limit`: the uid's bound, read at each keep (a reload may change it). */
  constructor(limit: () => number) {
    this.#limit = limit;
  }

  /**
   * `socket` is idle now in `holder`, kept for `uid`. When the uid then has more than its bound, its oldest are
   * dropped, in whatever pool: never the socket just kept (the bound is at least 1), never a shared socket or another
   * uid's. O(1) unless something is dropped (no allocation but the Map's entry: this is every such release's path).
   */
  keep(uid: number, socket: Socket, holder: KeptHolder<Socket>): void {
    let kept = this.#byUid.get(uid);
    if (!kept) {
      kept = new Map();
      this.#byUid.set(uid, kept);
    }
    kept.set(socket, holder);
    this.#trim(kept, this.#limit());
  }

  /**
   * `socket` left its pool's idle set (lent again, or closed): no longer counted for `uid`. A uid's map stays when
   * emptied (one per uid that ever kept a socket, as quotas.ts keeps a record per uid): a client cycling one socket
   * (released unused, lent again) would otherwise make and drop a Map at every turn.
   */
  released(uid: number, socket: Socket): void {
    this.#byUid.get(uid)?.delete(socket);
  }

  /** Sockets kept for `uid` now. */
  countOf(uid: number): number {
    return this.#byUid.get(uid)?.size ?? 0;
  }

  /** Sockets kept for any uid now (an admin's stats: one look per uid that ever kept one). */
  get total(): number {
    let total = 0;
    for (const kept of this.#byUid.values()) total += kept.size;
    return total;
  }

  /** Every uid held to the bound now in force (a reload that lowered it): the oldest over it are dropped. */
  trimAll(): void {
    const limit = this.#limit();
    for (const kept of [...this.#byUid.values()]) this.#trim(kept, limit);
  }

  #trim(kept: Map<Socket, KeptHolder<Socket>>, limit: number): void {
    // Each entry leaves the map before its drop runs: the pool's close then finds nothing to remove (released is a
    // no-op), and a drop that failed to close its socket could not loop here.
    while (kept.size > Math.max(1, limit)) {
      const [oldest, holder] = kept.entries().next().value!;
      kept.delete(oldest);
      holder.dropKept(oldest);
    }
  }
}
