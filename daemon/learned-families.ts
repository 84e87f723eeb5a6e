// What Happy Eyeballs races taught about each host (the connector keys it by host and port): which address family
// won its last race and which family failed or was outrun (silent, or slower than the attempt delay). A later connect
// to that host starts with the family that won, so a host whose IPv6 path drops packets costs the attempt delay once
// per expiry, not on every connect. Entries expire (the network may be repaired). Past `maxEntries` (a crawler meets
// millions of hosts) the oldest go first, of the uid whose races taught the most (uid-share-map.ts): one uid's
// thousands of host:ports do not push out what the other uids' races taught. Time comes from an injected clock.

import { DAEMON_UID } from './fair-queue.js';
import type { Family, FamilyOutcome } from './happy-eyeballs.js';
import { UidShareMap } from './uid-share-map.js';

export interface LearnedFamily {
  /** The family that won the last race to this host. */
  family: Family;
  /** Families that failed or were outrun in that race. */
  failed: Family[];
  /** Milliseconds until this is forgotten. */
  expiresInMs: number;
}

/** Ten minutes: long enough to spare most connects the delay, short enough to notice a repaired path. */
export const LEARNED_FAMILY_TTL_MS = 600_000;
export const LEARNED_FAMILY_MAX_ENTRIES = 10_000;

interface Entry {
  family: Family;
  failed: Family[];
  expiresAt: number;
}

export class LearnedFamilies {
  readonly #entries: UidShareMap<Entry>;
  readonly #ttlMs: number;
  readonly #now: () => number;

  constructor(options: { ttlMs?: number; maxEntries?: number; now?: () => number } = {}) {
    this.#ttlMs = options.ttlMs ?? LEARNED_FAMILY_TTL_MS;
    this.#entries = new UidShareMap(options.maxEntries ?? LEARNED_FAMILY_MAX_ENTRIES);
    this.#now = options.now ?? (() => performance.now());
  }

  get size(): number {
    return this.#entries.size;
  }

  /** The family to start with for `host`, when a race taught one and it has not expired. */
  preferred(host: string): Family | undefined {
    return this.#live(host)?.family;
  }

  describe(host: string): LearnedFamily | undefined {
    const entry = this.#live(host);
    if (!entry) return undefined;
    return { family: entry.family, failed: [...entry.failed], expiresInMs: Math.round(entry.expiresAt - this.#now()) };
  }

  /**
   * The outcome of one race between both families. A win teaches something when the other family did worse
   * (failed, or was outrun), or when it confirms `defaultFamily`. A win of the other family while the default was
   * never tried (its DNS answer came after the resolution delay) teaches nothing, and neither does a race nobody
   * won (what failed then is the resolver's per-address business). A new entry is `uid`'s (the uid the race's
   * connect was for); another uid's race teaching it again renews it, still its first teacher's (uid-share-map.ts).
   */
  record(host: string, families: Record<Family, FamilyOutcome>, defaultFamily: Family, uid = DAEMON_UID): void {
    const winner = families[6] === 'won' ? 6 : families[4] === 'won' ? 4 : undefined;
    if (winner === undefined) return;
    const loser = winner === 6 ? 4 : 6;
    const worse = (family: Family) => families[family] === 'failed' || families[family] === 'outrun';
    if (!worse(loser) && winner !== defaultFamily) return;
    const failed = ([6, 4] as const).filter(worse);
    this.#entries.set(host, { family: winner, failed, expiresAt: this.#now() + this.#ttlMs }, uid);
  }

  clear(): void {
    this.#entries.clear();
  }

  #live(host: string): Entry | undefined {
    const entry = this.#entries.get(host);
    if (entry && entry.expiresAt <= this.#now()) {
      this.#entries.delete(host);
      return undefined;
    }
    return entry;
  }
}
