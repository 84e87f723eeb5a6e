// What an acquire's `tokenTaken` may claim: the tokens of a rate-limited origin the daemon itself granted the
// acquire's uid (protocol `tokens`) and that are still within their lifetime. A worker takes tokens in batches for
// the requests it sends, on connections it keeps alive (unseen here) and on new ones (an acquire saying `tokenTaken`,
// its request's token taken already); the daemon cannot tell which of its granted tokens went where, but it can hold
// each acquire's claim to one token it granted that uid for that origin and nobody claimed yet. So a client that says
// `tokenTaken` on every acquire gets new connections no faster than the tokens it was granted (charged at the rate
// like any others); what it sends on connections it holds is beyond the daemon's sight.
//
// A claim comes back when no connection came of it (its acquire got no lease), and once when the lease's connection
// ended with nothing received from the origin (the daemon's copy of the socket says so): no request was answered on
// it, and the worker gives its token back when its request never went out (a TLS handshake cancelled, a connection
// lost before the request was written) and spends it on the next. Once only: a client closing every connection
// before the origin answers (a request sent blind on plain http) gets two connections a token at the most.
//
// Per uid, not per session: the uid is the trust unit of the quotas (quotas.ts), and one client's worker threads
// each have their own daemon connection. Counts with expiry, not a record per token: per uid and origin, the tokens
// granted within one BUCKET_MS share the latest expiry among them (so at most CLAIM_LIFETIME_MS / BUCKET_MS + 1
// counts an origin), and a uid holds claimable tokens for at most MAX_ORIGINS_PER_UID origins at once (grants for
// more are not recorded: their claims are charged, never refused).

import { TOKEN_LIFETIME_MS } from '../../shared/rate.js';

/**
 * A worker's token lives TOKEN_LIFETIME_MS from when the `tokens` reply reached it, and its acquire reaches the daemon
 * after the request took it: the daemon's count outlives the grant by this much more, so that an honest worker's claim
 * in flight, or behind a busy event loop on either side, is not charged a second token.
 */
export const CLAIM_GRACE_MS = 250;
/** How long after its grant a token may be claimed (at the least; BUCKET_MS more at the most). */
export const CLAIM_LIFETIME_MS = TOKEN_LIFETIME_MS + CLAIM_GRACE_MS;
/** Tokens granted one uid for one origin within this share one count (the latest expiry among them). */
export const BUCKET_MS = 50;
/** The most origins one uid holds claimable tokens for at once. */
export const MAX_ORIGINS_PER_UID = 1024;

/** Claimable tokens of one uid for one origin, oldest first: a count and when its tokens expire. */
type Counts = Array<{ count: number; expiresAt: number }>;

/** One uid's claimable tokens of one origin: as granted, and given back after a lease the origin answered nothing
 *  on (restored: not given back that way again). */
interface Held {
  fresh: Counts;
  restored: Counts;
}

/** A claimed token: when it expires, and whether it was given back after a lease the origin answered nothing on. */
export interface Claim {
  expiresAt: number;
  restored: boolean;
}

export class TokenClaims {
  #now: () => number;
  /** uid -> origin key -> its claimable tokens (an origin with none left goes, and a uid with no origin). */
  #uids = new Map<number, Map<string, Held>>();
  /** When the next sweep of expired counts may run (grant: once a CLAIM_LIFETIME_MS, or at a uid's cap). */
  #sweepAt = 0;

  constructor(now: () => number) {
    this.#now = now;
  }

  /** Uids with claimable tokens recorded (expired ones not swept yet included). */
  get uids(): number {
    return this.#uids.size;
  }

  /** `count` tokens of `key` granted to `uid` now: claimable until CLAIM_LIFETIME_MS from now. */
  grant(uid: number, key: string, count: number): void {
    if (count <= 0) return;
    const now = this.#now();
    if (now >= this.#sweepAt) this.#sweep(now);
    const held = this.#heldOf(uid, key, now);
    if (!held) return;
    const counts = held.fresh;
    dropExpired(counts, now);
    const expiresAt = now + CLAIM_LIFETIME_MS;
    const last = counts[counts.length - 1];
    // Joined to the last count while it lives at least as long; else a count of their own that lives BUCKET_MS
    // longer, for the grants joining it: a token is claimable up to BUCKET_MS late, never early (an early expiry
    // would charge an honest claim a second token).
    if (last && last.expiresAt >= expiresAt) last.count += count;
    else counts.push({ count, expiresAt: expiresAt + BUCKET_MS });
  }

  /** One of `uid`'s tokens of `key` for an acquire that says `tokenTaken` (the one expiring first), or undefined when
   *  none is left to claim (the acquire is charged one). */
  claim(uid: number, key: string): Claim | undefined {
    const origins = this.#uids.get(uid);
    const held = origins?.get(key);
    if (!held) return undefined;
    const now = this.#now();
    dropExpired(held.fresh, now);
    dropExpired(held.restored, now);
    const fresh = held.fresh[0];
    const restored = held.restored[0];
    const fromRestored = restored !== undefined && (fresh === undefined || restored.expiresAt < fresh.expiresAt);
    const counts = fromRestored ? held.restored : held.fresh;
    const oldest = counts[0];
    if (oldest && --oldest.count === 0) counts.shift();
    if (held.fresh.length === 0 && held.restored.length === 0) {
      origins!.delete(key);
      if (origins!.size === 0) this.#uids.delete(uid);
    }
    return oldest && { expiresAt: oldest.expiresAt, restored: fromRestored };
  }

  /**
   * A claimed token given back (`restored`: after a lease the origin answered nothing on, so not given back that way
   * again; else as claimed, its acquire having got no lease): claimable again until it would have expired anyway,
   * never longer.
   */
  unclaim(uid: number, key: string, claim: Claim): void {
    const now = this.#now();
    if (claim.expiresAt <= now) return;
    const held = this.#heldOf(uid, key, now);
    if (!held) return;
    const counts = claim.restored ? held.restored : held.fresh;
    dropExpired(counts, now);
    let at = counts.length;
    while (at > 0 && counts[at - 1]!.expiresAt > claim.expiresAt) at--;
    const before = counts[at - 1];
    if (before?.expiresAt === claim.expiresAt) before.count++;
    else counts.splice(at, 0, { count: 1, expiresAt: claim.expiresAt });
  }

  /** The tokens of `uid` for `key`, made if the uid has room for another origin (undefined: it has none). */
  #heldOf(uid: number, key: string, now: number): Held | undefined {
    let origins = this.#uids.get(uid);
    if (!origins) {
      origins = new Map();
      this.#uids.set(uid, origins);
    }
    let held = origins.get(key);
    if (held) return held;
    if (origins.size >= MAX_ORIGINS_PER_UID) {
      // Expired counts may make room: swept at most once a BUCKET_MS (a uid at its cap grants as fast as it asks).
      if (now < this.#sweepAt - CLAIM_LIFETIME_MS + BUCKET_MS) return undefined;
      this.#sweep(now);
      if (origins.size >= MAX_ORIGINS_PER_UID) return undefined;
      // (The sweep dropped the uid's map if it emptied it.)
      if (this.#uids.get(uid) !== origins) this.#uids.set(uid, origins);
    }
    held = { fresh: [], restored: [] };
    origins.set(key, held);
    return held;
  }

  /** Drops every count expired at `now`, and the origins and uids left with none. Each count is made by a grant and
   *  lives CLAIM_LIFETIME_MS: a sweep a lifetime walks each at most twice. */
  #sweep(now: number): void {
    this.#sweepAt = now + CLAIM_LIFETIME_MS;
    for (const [uid, origins] of this.#uids) {
      for (const [key, held] of origins) if (!alive(held.fresh, now) && !alive(held.restored, now)) origins.delete(key);
      if (origins.size === 0) this.#uids.delete(uid);
    }
  }
}

/** Drops the counts expired at `now` (the oldest first). */
function dropExpired(counts: Counts, now: number): void {
  while (counts.length > 0 && counts[0]!.expiresAt <= now) counts.shift();
}

/** Whether any of the counts is still claimable at `now` (the last expires last). */
function alive(counts: Counts, now: number): boolean {
  return counts.length > 0 && counts[counts.length - 1]!.expiresAt > now;
}
