// Politeness per origin (`requestsPerSecond`, `burst`): every request to a rate-limited origin takes a token before
// it goes out. Workers ask in batches (protocol `tokens`, handoff-server.ts); the daemon grants from its own batch,
// refilled from the fleet's GCRA in Redis (fleet.ts), or, without a fleet, from a GCRA of its own (a daemon alone
// is a fleet of one, and takes from it only what it grants: no batch to expire). A batch asked of Redis shrinks once
// tokens of the last ones expired unspent (#ask). A grant takes at most half of what is at hand (shareOf), so that
// one uid asking for many leaves some for the uid asking next. Requests that find no token at hand wait in the origin's queue, fair across uids (#join): only
// its head asks for the next token or waits for it to come due (#pump). A request whose turn would come past its
// deadline fails with SOCKPOOL_ERR_RATE_LIMITED and the earliest wait its turn needed. Origins without a rate never
// get here. An acquire's `tokenTaken` is believed only against the tokens granted its uid (token-claims.ts: claim).

import { ErrorCodes, SockpoolError } from '../../shared/errors.js';
import type { Origin } from '../../shared/origin.js';
import { batchSize, type RateParams, rateLimitedError, TOKEN_LIFETIME_MS, TokenBatch } from '../../shared/rate.js';
import { policyFor, type SockpoolConfig } from '../config.js';
import { FairWaitQueue, type UidWaiter } from '../fair-queue.js';
import type { Fleet } from './fleet.js';
import { ForgetfulMap } from './forgetful-map.js';
import { emissionIntervalMs, type Grant, LocalGcra } from './gcra.js';
import { fleetKey } from './slots.js';
import { type Claim, TokenClaims } from './token-claims.js';

/** The most tokens the daemon asks Redis for at once (batchSize caps it lower for slow rates). */
const MAX_DAEMON_BATCH = 64;
/** Batches kept before spent or expired ones are forgotten (ForgetfulMap). */
const MAX_BATCHES = 10_000;
/** The most tokens one `tokens` request may be granted. */
export const MAX_TOKENS_PER_REQUEST = 1000;

export interface RateCounters {
  /** Tokens handed to requests (one given back and handed again counts again). */
  granted: number;
  /** Requests refused with SOCKPOOL_ERR_RATE_LIMITED. */
  limited: number;
  /** Times a request waited for its token. */
  waits: number;
  /** Acquires whose `tokenTaken` was believed: a token granted their uid (`tokens`) was left to claim. */
  claimsBelieved: number;
  /** Acquires that said `tokenTaken` with none left to claim (never granted, claimed already, or expired): charged. */
  claimsCharged: number;
}

export class RateLimiter {
  #config: SockpoolConfig;
  #fleet: Fleet | undefined;
  #local: LocalGcra;
  /**
   * A fleet member's rates while Redis is unavailable (its share of each), new at each outage (Fleet's `outages`
   * counter): what it granted in an earlier outage says nothing of what the fleet spent since, so each origin starts
   * empty again (LocalGcra's unknownStartsEmpty).
   */
  #outageRates: { outage: number; gcra: LocalGcra } | undefined;
  #now: () => number;
  /** A spent or expired batch is the same as none: clients naming ever more origins under a default rate cannot
   *  grow this without bound (as LocalGcra's TATs). (One forgotten takes what its next ask should be with it: that
   *  ask is for the rate's batch again.) */
  #batches = new ForgetfulMap<string, TokenBatch>(MAX_BATCHES, (batch, now) => batch.held(now) === 0);
  /** fleetKey -> the requests waiting for its tokens, while any do. */
  #waits = new Map<string, OriginWaits>();
  /** fleetKey -> its rate, or null when it has none (policyFor is not cheap enough for every acquire). */
  #params = new Map<string, RateParams | null>();
  /** Some policy (the defaults or an origin entry) has a rate: without one, every origin is answered at once. */
  #anyRate: boolean;
  /** Tokens granted to uids through `tokens`, that their acquires' `tokenTaken` may claim. */
  #claims: TokenClaims;
  readonly counters: RateCounters = { granted: 0, limited: 0, waits: 0, claimsBelieved: 0, claimsCharged: 0 };
  /** Set once the daemon stops (close): every take fails with it. */
  #closedWith: Error | undefined;

  constructor(config: SockpoolConfig, fleet: Fleet | undefined, now: () => number = () => performance.now()) {
    this.#config = config;
    this.#fleet = fleet;
    this.#now = now;
    this.#local = new LocalGcra(now);
    this.#anyRate = hasAnyRate(config);
    this.#claims = new TokenClaims(now);
  }

  /** A reload: rates are read again. */
  configure(config: SockpoolConfig): void {
    this.#config = config;
    this.#anyRate = hasAnyRate(config);
    this.#params.clear();
  }

  /** The origin's rate, or undefined when it has none. */
  paramsFor(origin: Origin): RateParams | undefined {
    // (Every acquire asks: a daemon with no rate configured pays no key and no lookup for it.)
    if (!this.#anyRate) return undefined;
    const key = fleetKey(origin);
    let params = this.#params.get(key);
    if (params === undefined) {
      const policy = policyFor(this.#config, origin.host, origin.port);
      params =
        policy.requestsPerSecond === undefined
          ? null
          : { requestsPerSecond: policy.requestsPerSecond, burst: policy.burst ?? 1 };
      if (this.#params.size > 10_000) this.#params.clear();
      this.#params.set(key, params);
    }
    return params ?? undefined;
  }

  /**
   * Between 1 and `wanted` tokens of `origin`, waiting for the first as long as `timeoutMs` allows. Throws
   * SOCKPOOL_ERR_RATE_LIMITED (with `waitMs`) when the wait would be longer: at once when the next token, or the
   * turn of `uid`'s waiter in the origin's queue, comes past the deadline (`waitMs` the earliest it could come),
   * else at the deadline if other uids' turns pushed it back. `signal`: the client gave the request up (a `cancel`,
   * its disconnect): the wait ends at once with SOCKPOOL_ERR_ABORTED, leaves the queue and takes no token, or a
   * client that asks and hangs up, over and over, would leave waits behind without bound. `onGrant`: told, as the
   * tokens are granted, when they would expire in a batch (a fleet member's only), for giveBack.
   */
  take(
    origin: Origin,
    params: RateParams,
    wanted: number,
    timeoutMs: number,
    signal?: AbortSignal,
    uid = 0,
    onGrant?: (expiresAt: number) => void,
  ): Promise<number> {
    const key = fleetKey(origin);
    if (this.#closedWith) return Promise.reject(this.#closedWith);
    if (signal?.aborted) return Promise.reject(abortedError(key));
    const now = this.#now();
    const deadline = now + timeoutMs;
    let waits = this.#waits.get(key);
    if (!waits) {
      // Nobody waits for this origin: tokens at hand go at once (the daemon's own GCRA, or the batch from Redis).
      const grant = this.#atHand(key, params, wanted);
      if (grant && grant.granted > 0) {
        this.counters.granted += grant.granted;
        if (grant.expiresAt !== undefined) onGrant?.(grant.expiresAt);
        return Promise.resolve(grant.granted);
      }
      if (grant && grant.waitMs > timeoutMs) return Promise.reject(this.#limited(key, params, grant.waitMs, timeoutMs));
      // The queue forms; a fleet member's head asks Redis (dueAt 0: at once).
      waits = { queue: new FairWaitQueue(), dueAt: grant ? now + grant.waitMs : 0, asking: false };
      this.#waits.set(key, waits);
    }
    const queued = waits;
    return new Promise<number>((resolve, reject) => {
      const waiter: TokenWaiter = { uid, wanted, deadline, params, resolve, reject, waited: false, onGrant };
      // Its turn comes after the next token and one token for each waiter of its uid before it, at the earliest.
      const turnIn = this.#turnIn(queued, waiter, now);
      if (turnIn > timeoutMs) {
        reject(this.#limited(key, params, turnIn, timeoutMs));
        if (queued.queue.length === 0 && !queued.asking && !queued.timer) this.#waits.delete(key);
        return;
      }
      this.#join(queued, waiter);
      if (queued.queue.length > 1 || queued.dueAt > now) {
        waiter.waited = true;
        this.counters.waits++;
      }
      waiter.timer = setTimeout(() => {
        // Other uids' turns came first: it fails at its deadline, with the earliest its turn could come now.
        const turn = this.#turnIn(queued, waiter, this.#now());
        if (!queued.queue.remove(waiter)) return;
        this.#settle(waiter);
        reject(this.#limited(key, params, Math.max(1, turn), 0));
      }, timeoutMs);
      if (signal) {
        waiter.signal = signal;
        waiter.onAbort = () => {
          if (!queued.queue.remove(waiter)) return;
          this.#settle(waiter);
          reject(abortedError(key));
        };
        signal.addEventListener('abort', waiter.onAbort, { once: true });
      }
      this.#pump(key, queued);
    });
  }

  /**
   * The daemon stops: every wait for a token ends now with `error` (SOCKPOOL_ERR_SHUTTING_DOWN), while its client's
   * session is still open to be told so, as the pools' waiters are; later takes fail with it at once. Left to the
   * disconnect, the waits were aborted with their replies dropped: their clients saw only the hang-up.
   */
  close(error: Error): void {
    this.#closedWith = error;
    for (const waits of this.#waits.values()) {
      clearTimeout(waits.timer);
      for (let head = waits.queue.peek(); head !== undefined; head = waits.queue.peek()) {
        waits.queue.remove(head);
        this.#settle(head);
        head.reject(error);
      }
    }
    this.#waits.clear();
  }

  /** `count` tokens of `origin` granted to `uid` (a `tokens` reply went out with them): its acquires may claim them. */
  grantedTo(origin: Origin, uid: number, count: number): void {
    this.#claims.grant(uid, fleetKey(origin), count);
  }

  /**
   * An acquire of `uid` to `origin` says `tokenTaken`: when a token granted to that uid is left to claim, it is used
   * up (the claim says when it would have expired, for unclaim); undefined when none is: the acquire is charged one.
   */
  claim(origin: Origin, uid: number): Claim | undefined {
    const claim = this.#claims.claim(uid, fleetKey(origin));
    if (claim === undefined) this.counters.claimsCharged++;
    else this.counters.claimsBelieved++;
    return claim;
  }

  /** A claim whose acquire got no lease: claimable again until it expires. */
  unclaim(origin: Origin, uid: number, claim: Claim): void {
    this.#claims.unclaim(uid, fleetKey(origin), claim);
  }

  /** A claim whose lease ended with nothing received from the origin, not given back so before (`restored`, which
   *  the caller checks first): claimable again until it expires, and never given back so again (token-claims.ts). */
  unanswered(origin: Origin, uid: number, claim: Claim): void {
    this.#claims.unclaim(uid, fleetKey(origin), { expiresAt: claim.expiresAt, restored: true });
  }

  /**
   * `count` tokens that `take` granted and no request will spend: the acquire they were charged to ended without a
   * lease (cancelled, its client gone, its connect failed). `expiresAt`: what take's `onGrant` said. A fleet member
   * gives them to the origin's waiters, or keeps them in its batch, until they would have expired there anyway
   * (TOKEN_LIFETIME_MS after Redis granted them: a give-back never lengthens a token's life, so a client that drops
   * many charged acquires cannot save them up for a burst later). Spent from Redis for nobody, they were lost to the
   * whole fleet. The daemon alone has no batch (its GCRA grants as it goes): they are lost there.
   */
  giveBack(origin: Origin, count: number, expiresAt: number): void {
    const now = this.#now();
    if (!this.#fleet || count <= 0 || expiresAt <= now) return;
    const key = fleetKey(origin);
    // (counters.granted counts them again when they go to another request: it only grows, as its gauge's readers
    // expect.)
    const waits = this.#waits.get(key);
    // (A queue it empties goes when its ask or its wait for the next token ends: a queue has one or the other.)
    if (waits) this.#granted(key, waits, { granted: count, waitMs: 0, expiresAt });
    else this.#batchOf(key).add(count, now, expiresAt - TOKEN_LIFETIME_MS);
  }

  /**
   * Serves the origin's queue: only its head asks for a token (at hand, or of Redis; one ask at a time) or waits for
   * the next one to come due (one timer per origin), and each token granted goes to the waiter the queue puts first.
   * So a token coming due wakes one ask, however many wait (each waiter polling the rate itself, one uid's thousand
   * waits at 100 requests/s made 100,000 wake-ups a second, and whichever poll came first won the token).
   */
  #pump(key: string, waits: OriginWaits): void {
    if (waits.asking || waits.timer) return;
    for (;;) {
      const head = waits.queue.peek();
      if (!head) {
        // Nobody waits: the queue (and its uids' counts) goes; the next take finds tokens at hand or forms a new one.
        if (this.#waits.get(key) === waits) this.#waits.delete(key);
        return;
      }
      const now = this.#now();
      if (now < waits.dueAt) {
        if (head.deadline < waits.dueAt) {
          // The next token comes past its deadline (the error contract: the wait it would have needed).
          waits.queue.remove(head);
          this.#settle(head);
          head.reject(this.#limited(key, head.params, waits.dueAt - now, head.deadline - now));
          continue;
        }
        waits.timer = setTimeout(
          () => {
            waits.timer = undefined;
            // Due (a clock behind the timer asks anyway, as a sleep did).
            waits.dueAt = 0;
            this.#pump(key, waits);
          },
          Math.max(1, Math.ceil(waits.dueAt - now)),
        );
        return;
      }
      const grant = this.#atHand(key, head.params, head.wanted);
      if (!grant) {
        // A fleet member's batch is spent: Redis is asked, for the head; the queue waits for the answer.
        waits.asking = true;
        this.#ask(key, head.params, head.wanted, waits.queue.length).then(
          (answer) => {
            waits.asking = false;
            this.#granted(key, waits, answer);
            this.#pump(key, waits);
          },
          (error: Error) => {
            // Refused (fleet.onUnavailable "refuse"): the waiter that asked fails (if it still waits), the next asks
            // again.
            waits.asking = false;
            if (waits.queue.remove(head)) {
              this.#settle(head);
              head.reject(error);
            }
            this.#pump(key, waits);
          },
        );
        return;
      }
      this.#granted(key, waits, grant);
    }
  }

  /** A grant asked for the head (or tokens given back): its tokens to the waiters first in the queue now (the head
   *  may have left). */
  #granted(key: string, waits: OriginWaits, grant: Grant): void {
    if (grant.granted === 0) {
      // Never a busy loop: the next ask is a timer away.
      waits.dueAt = this.#now() + Math.max(grant.waitMs, 1e-3);
      const head = waits.queue.peek();
      if (head && !head.waited) {
        head.waited = true;
        this.counters.waits++;
      }
      return;
    }
    let left = grant.granted;
    for (let waiter = waits.queue.peek(); waiter && left > 0; waiter = waits.queue.peek()) {
      const tokens = Math.min(left, waiter.wanted);
      left -= tokens;
      waits.queue.remove(waiter);
      this.#settle(waiter);
      // Its uid's count: what the queue orders by (see #join).
      waits.queue.setHeld(waiter.uid, (waits.queue.heldOf(waiter.uid) ?? 0) + tokens);
      this.counters.granted += tokens;
      if (grant.expiresAt !== undefined) waiter.onGrant?.(grant.expiresAt);
      waiter.resolve(tokens);
    }
    // Tokens whose waiters left meanwhile: a fleet member keeps them in its batch (the daemon's own GCRA took them
    // a microtask ago, from nobody: they are lost, at most the few a cancel in that microtask left).
    if (left > 0 && this.#fleet) {
      const now = this.#now();
      this.#batchOf(key).add(left, now, (grant.expiresAt ?? now + TOKEN_LIFETIME_MS) - TOKEN_LIFETIME_MS);
    }
  }

  /**
   * Queues `waiter`, fair across uids. What a uid "holds" here (FairWaitQueue's count): the tokens it was granted
   * through this queue since the queue formed (it goes when nobody waits). The uid with the fewest goes first, so
   * the uids waiting take turns token by token, whatever number of waiters each keeps. A uid that starts waiting
   * starts one below the fewest (its first token comes next, within about one token's interval), or, when it waited
   * before in this queue, at its own count brought within [fewest - 1, fewest]: one that left does not come back
   * with a debt to catch up on, nor owing the others for what it took while they were not waiting.
   */
  #join(waits: OriginWaits, waiter: TokenWaiter): void {
    const queue = waits.queue;
    if (!queue.hasWaiterOf(waiter.uid)) {
      const least = queue.leastHeldWaiting();
      if (least !== undefined) {
        const own = queue.heldOf(waiter.uid);
        queue.setHeld(waiter.uid, own === undefined ? least - 1 : Math.min(least, Math.max(least - 1, own)));
      }
    }
    queue.push(waiter);
  }

  /** The earliest `waiter`'s turn can come, ms from `now`: the next token, then one per waiter of its uid before it. */
  #turnIn(waits: OriginWaits, waiter: TokenWaiter, now: number): number {
    return Math.max(0, waits.dueAt - now) + waits.queue.aheadOf(waiter) * emissionIntervalMs(waiter.params);
  }

  /** A waiter out of the queue: its deadline timer and abort listener go. */
  #settle(waiter: TokenWaiter): void {
    clearTimeout(waiter.timer);
    if (waiter.onAbort) waiter.signal?.removeEventListener('abort', waiter.onAbort);
  }

  #limited(key: string, params: RateParams, waitMs: number, leftMs: number): SockpoolError {
    this.counters.limited++;
    return rateLimitedError(key, params, waitMs, leftMs);
  }

  /**
   * Tokens without waiting: the daemon's own GCRA (granted, or how long until one is), or a fleet member's batch;
   * undefined when that batch is spent (Redis must be asked). At most a share of what is at hand (shareOf).
   */
  #atHand(key: string, params: RateParams, wanted: number): Grant | undefined {
    if (!this.#fleet) return this.#local.take(key, Math.min(wanted, shareOf(this.#local.room(key, params))), params);
    const batch = this.#batches.get(key);
    const most = batch ? Math.min(wanted, shareOf(batch.held(this.#now()))) : 0;
    let spent = 0;
    let expiresAt = Number.POSITIVE_INFINITY;
    while (batch && spent < most) {
      const until = batch.spendUntil(this.#now());
      if (until === undefined) break;
      spent++;
      expiresAt = Math.min(expiresAt, until);
    }
    return spent > 0 ? { granted: spent, waitMs: 0, expiresAt } : undefined;
  }

  #batchOf(key: string): TokenBatch {
    let batch = this.#batches.get(key);
    if (!batch) {
      batch = new TokenBatch();
      this.#batches.set(key, batch, this.#now());
    }
    return batch;
  }

  /** This outage's local rates (#outageRates). */
  #outageRate(): LocalGcra {
    const outage = this.#fleet!.counters.outages;
    if (this.#outageRates?.outage !== outage) {
      this.#outageRates = { outage, gcra: new LocalGcra(this.#now, { unknownStartsEmpty: true }) };
    }
    return this.#outageRates.gcra;
  }

  /**
   * A new batch from Redis, for a request of `wanted` (`waiting` requests in the origin's queue): the rest is kept
   * for the next requests. Only the head of the origin's queue asks, so one batch is asked per origin at a time (each
   * request asking for a batch of its own, a burst took a batch per request, and the tokens it did not spend expired,
   * lost to the whole fleet). The batch is the rate's while this daemon spends what it asks for, and shrinks to what
   * it spent once tokens expire unspent (TokenBatch.nextAsk, as a worker's): asking for the rate's batch whatever its
   * demand, a daemon sending one request every 2 s to an origin at 100 requests/s took 10 tokens of the fleet's rate
   * a request, and a few such daemons took the fleet's whole rate for a trickle.
   */
  async #ask(key: string, params: RateParams, wanted: number, waiting: number): Promise<Grant> {
    const ask = Math.max(wanted, this.#batchOf(key).nextAsk(batchSize(params, MAX_DAEMON_BATCH), waiting));
    const grant = await this.#fleet!.takeTokens(key, params, ask, (share) => this.#outageRate().take(key, ask, share));
    // (Less than asked: the fleet's tokens are scarce, and the next ask is for what waits: TokenBatch.nextAsk.)
    this.#batchOf(key).noteGrant(grant.granted);
    const now = this.#now();
    // The head's share of it (shareOf); the rest is at hand for the waiters after it and the next requests.
    const granted = Math.min(wanted, shareOf(grant.granted), grant.granted);
    if (grant.granted > granted) this.#batchOf(key).add(grant.granted - granted, now);
    return { granted, waitMs: grant.waitMs, expiresAt: now + TOKEN_LIFETIME_MS };
  }
}

/**
 * The most one grant takes of `atHand` tokens (of the GCRA's room, of a batch, of what Redis just granted): half,
 * rounded up, at least one. A request for many tokens (a `tokens` request's `count`, up to 1,000) granted all that
 * was at hand took the origin's whole burst for one uid, and another uid asking right after found none (the fair
 * queue only orders those already waiting); so each grant leaves about as much as it takes. A busy uid asking again
 * gets the rest within a few round trips, well within the rate's tenth of a second.
 */
function shareOf(atHand: number): number {
  return Math.max(1, Math.ceil(atHand / 2));
}

/** A request waiting in an origin's queue for its tokens. */
interface TokenWaiter extends UidWaiter {
  wanted: number;
  /** On the limiter's clock. */
  deadline: number;
  params: RateParams;
  resolve(granted: number): void;
  reject(error: Error): void;
  /** take's `onGrant`. */
  onGrant: ((expiresAt: number) => void) | undefined;
  /** Counted in `waits` already. */
  waited: boolean;
  /** Its deadline. */
  timer?: NodeJS.Timeout;
  signal?: AbortSignal;
  onAbort?: () => void;
}

/** The requests waiting for one origin's tokens, while any do (and while the head asks or waits for the next). */
interface OriginWaits {
  queue: FairWaitQueue<TokenWaiter>;
  /** When the next token comes due (limiter's clock), as the last ask said; 0: ask now. */
  dueAt: number;
  /** Redis is being asked, for the head. */
  asking: boolean;
  /** The wait for dueAt: the only timer the origin's waiters have besides their deadlines. */
  timer?: NodeJS.Timeout;
}

function abortedError(origin: string): SockpoolError {
  return new SockpoolError(ErrorCodes.ABORTED, `the client gave up its wait for a token of ${origin}`, { origin });
}

function hasAnyRate(config: SockpoolConfig): boolean {
  return (
    config.pool.defaults.requestsPerSecond !== undefined ||
    config.pool.origins.some((entry) => entry.requestsPerSecond !== undefined)
  );
}
