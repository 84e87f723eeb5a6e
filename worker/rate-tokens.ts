// Request tokens of rate-limited origins, on the worker's side: every request to an origin whose rate the daemon
// told us (a lease's `rate`) takes a token before it goes out, whether curl then opens a connection or reuses one.
// Tokens come in small batches from the daemon (protocol `tokens`), so most requests spend one already held and
// send nothing. Origins without a rate cost one Map lookup: no message at all. A request to an origin whose rate we
// do not know yet is charged by the daemon on its acquire (such a request always needs a connection: curl has none
// cached there); an acquire says `tokenTaken` when the request took its token here.
//
// One `tokens` request per origin at a time: requests that find the batch empty while one is under way wait for it
// and spend from the batch it fills; only those still without a token then ask again. (Each asking for a batch of
// its own, a burst of N requests took up to N batches: tokens that expired unspent, lost to the whole fleet, and
// waits the origin's rate did not call for.) A request whose deadline comes before the one under way's asks for
// its own single token instead, so that it never waits past its deadline behind another request. A refusal
// (SOCKPOOL_ERR_RATE_LIMITED: the next token comes at T at the earliest) is kept for the origin: every request
// waiting with a deadline before T fails with it at once, where each asked again for itself before.
//
// A batch request asks for the rate's batch (batchSize) while the worker spends what it asks for; tokens it cannot
// spend within TOKEN_LIFETIME_MS expire, charged to the origin's rate all the same. So once some expired unspent,
// the next batch request asks for what the last one left spent (at least one), and the size grows back, doubling,
// only as batches are spent whole; requests waiting together ask for as many at once whatever the last batches did.
// (Each asking for the rate's batch, a thread sending one request every 2 s to an origin at 100 requests/s took 10
// tokens a request: twenty such threads took the origin's whole rate for 10 requests/s, and others waited.)
//
// The daemon waits at most MAX_TIMEOUT_MS for a token (the protocol's bound). A request with more time left that
// the daemon refuses (SOCKPOOL_ERR_RATE_LIMITED: the next token comes later than that) waits here until the token
// is within that bound, and asks again; it fails only when the token would come after its own deadline. The link's
// close (close()) ends such waits, and every other, with its error: the link would refuse the next ask anyway, and
// the sleep, up to the request's whole deadline, held the request and its timer (the process) until it ended.
//
// A request cancelled while it waits (its AbortSignal, its thread's close) stops waiting at once; the wait it
// started goes on for the requests that share it, and the token it would have spent stays in the batch for them.
// Once no request waits for what a `tokens` request under way brings (each cancelled, or handed a given-back token),
// it is cancelled in the daemon too (protocol `cancel`, which drops the wait from the origin's queue there): left
// to go on, it took the origin's next token, maybe 10 s later, for a batch where it could expire unspent, ahead of
// every other client's wait. Tokens the daemon granted before the cancel reached it still come, to the batch.
//
// A token taken for a request that then never went out (its acquire refused, timed out or cancelled, the daemon
// link dropped, the request cancelled first, the engine closed as its socket came, or curl ended it before it wrote
// any of it: curl-engine.ts #unsent) is given back (giveBack), once: to the origin's oldest request waiting for
// one, else to the batch, and only until it would have expired in the batch anyway (as the daemon's
// RateLimiter.giveBack): a given-back token never lives longer, so requests that fail over and over can neither
// save tokens up for a burst nor keep one alive. Lost instead, at 0.1 request/s the next request waited 10 s.

import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { originKey } from '../shared/origin.js';
import { MAX_TIMEOUT_MS } from '../shared/protocol.js';
import { batchSize, type RateParams, rateLimitedError, TOKEN_LIFETIME_MS, TokenBatch } from '../shared/rate.js';
import { Cancellation, type CancelSignal } from './cancellation.js';

/** The most tokens a worker asks for at once. */
const MAX_WORKER_BATCH = 16;

/**
 * A request whose deadline comes less than this before the batch request under way (its `until`) waits for that one
 * rather than asking a token of its own. Requests of one burst have deadlines a few ms apart in any order (a deadline
 * is set when the request starts, not when it reaches here), and a token of its own for each that is a little earlier
 * was one more than the burst needed whenever the batch request's own waiters were served meanwhile (11 granted for
 * a burst of 10; test/client-rate-tokens). Within this the only difference is how a request fails whose token comes
 * between its deadline and the batch request's: timed out rather than refused.
 */
const SHARED_ASK_SLACK_MS = 100;

export interface TokenLink {
  /** Tokens of host:port from the daemon: resolves with how many (>= 1), or rejects (SOCKPOOL_ERR_RATE_LIMITED...).
   *  The daemon is asked to wait at most MAX_TIMEOUT_MS of `timeoutMs`. When `stop` is cancelled the daemon is asked
   *  to drop the wait, and its answer still comes (the tokens it granted first, or SOCKPOOL_ERR_ABORTED). */
  tokens(host: string, port: number, count: number, timeoutMs: number, stop?: CancelSignal): Promise<number>;
}

/** An origin's tokens held here, and its `tokens` request under way (the one that fills the batch). */
interface OriginTokens {
  batch: TokenBatch;
  asking: Promise<void> | undefined;
  /** The deadline (this clock) of the request that asked: a wait for `asking` ends by then. */
  askingUntil: number;
  /** Requests waiting for a token, oldest first: a token given back goes to the first (see giveBack). */
  waiting: Set<Waiting>;
  /** Of each `tokens` request under way: cancels it when nobody waits for it any more (#recheck runs them). */
  asks: Set<() => void>;
  /** The daemon's last SOCKPOOL_ERR_RATE_LIMITED for the origin, and the earliest (this clock) its next token can
   *  come: a waiting request whose deadline comes before that fails with it instead of asking again. Dropped when
   *  the rate changes, or an ask of this worker's that the daemon had queued is cancelled (#ask). */
  refused: { until: number } | undefined;
}

/** A request waiting for a token in #wait. */
interface Waiting {
  signal: CancelSignal | undefined;
  /** The request's deadline (this.#now's clock): a shared ask waits no longer than its waiters' earliest. */
  deadline: number;
  /** A token given back was handed to it: when it expires. */
  handed: number | undefined;
  /** Resolves when one is. */
  woken: Promise<undefined>;
  wake(): void;
}

export class RateTokens {
  #link: TokenLink;
  #now: () => number;
  /** host:port -> its rate, as the last lease for it said. */
  #rates = new Map<string, RateParams>();
  #origins = new Map<string, OriginTokens>();
  /** Cancelled when the link closes (close()), with its error. */
  #closing = new Cancellation();

  constructor(link: TokenLink, now: () => number = () => performance.now()) {
    this.#link = link;
    this.#now = now;
  }

  /** The link closed: every wait for a token fails with `reason` (its own error) now, and every later one at once. */
  close(reason: Error): void {
    this.#closing.cancel(reason);
  }

  /** A lease arrived for host:port: its `rate` (or none) is the origin's from now on. */
  learn(host: string, port: number, rate: RateParams | undefined): void {
    const key = originKey({ host, port });
    if (rate) {
      const before = this.#rates.get(key);
      this.#rates.set(key, rate);
      // A refusal under another rate says nothing about this one.
      if (before && (before.requestsPerSecond !== rate.requestsPerSecond || before.burst !== rate.burst)) {
        const origin = this.#origins.get(key);
        if (origin) origin.refused = undefined;
      }
    } else if (this.#rates.delete(key)) this.#origins.delete(key);
  }

  /** Whether requests to host:port take tokens (its rate is known). */
  rated(host: string, port: number): boolean {
    return this.#rates.size > 0 && this.#rates.has(originKey({ host, port }));
  }

  /** Takes one token for a request to host:port: undefined when none is needed (synchronously), else when the token
   *  taken expires (this clock; for giveBack), at once when one was held, or a promise of it (undefined: none needed
   *  after all, the origin's rate gone meanwhile). A cancelled `signal` rejects the wait with its reason at once,
   *  and the token is not spent. */
  take(
    host: string,
    port: number,
    timeoutMs: number,
    signal?: CancelSignal,
  ): number | Promise<number | undefined> | undefined {
    if (this.#rates.size === 0) return undefined;
    const key = originKey({ host, port });
    if (!this.#rates.has(key)) return undefined;
    const held = this.#originOf(key).batch.spendUntil(this.#now());
    if (held !== undefined) return held;
    const waiting = this.#wait(host, port, key, this.#now() + timeoutMs, signal);
    if (!signal) return waiting;
    return new Promise<number | undefined>((resolve, reject) => {
      const onAbort = (): void => reject(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      waiting.then(
        (expiresAt) => {
          signal.removeEventListener('abort', onAbort);
          // Handed one as it was cancelled: the token was not spent.
          if (signal.aborted && expiresAt !== undefined) this.giveBack(host, port, expiresAt);
          resolve(expiresAt);
        },
        (error: unknown) => {
          signal.removeEventListener('abort', onAbort);
          reject(error);
        },
      );
    });
  }

  /**
   * A token `take` gave (`expiresAt`: what it said) that no request will spend: the request it was taken for never
   * went out. It goes to the origin's oldest request waiting for one, else to the batch, until `expiresAt` and no
   * longer (see the header). An expired one, or one of an origin with no rate any more, is dropped.
   */
  giveBack(host: string, port: number, expiresAt: number): void {
    const now = this.#now();
    const key = originKey({ host, port });
    if (expiresAt <= now || !this.#rates.has(key)) return;
    const origin = this.#originOf(key);
    for (const waiting of origin.waiting) {
      origin.waiting.delete(waiting);
      if (waiting.signal?.aborted) continue;
      waiting.handed = expiresAt;
      waiting.wake();
      this.#recheck(origin);
      return;
    }
    origin.batch.add(1, now, expiresAt - TOKEN_LIFETIME_MS);
  }

  #originOf(key: string): OriginTokens {
    let origin = this.#origins.get(key);
    if (!origin) {
      origin = {
        batch: new TokenBatch(),
        asking: undefined,
        askingUntil: 0,
        waiting: new Set(),
        asks: new Set(),
        refused: undefined,
      };
      this.#origins.set(key, origin);
    }
    return origin;
  }

  /** A token for a request whose origin's batch was empty, by `deadline`: when it expires (undefined: no rate any
   *  more, or cancelled). */
  async #wait(
    host: string,
    port: number,
    key: string,
    deadline: number,
    signal?: CancelSignal,
  ): Promise<number | undefined> {
    let wake!: () => void;
    const woken = new Promise<undefined>((resolve) => {
      wake = () => resolve(undefined);
    });
    const waiting: Waiting = { signal, deadline, handed: undefined, woken, wake };
    // (Its origin's entry at the start: one `learn` drops goes with its waiters, who find no rate below.)
    const entry = this.#originOf(key);
    entry.waiting.add(waiting);
    // Cancelled: a `tokens` request under way may have nobody left to wait for it.
    const onAbort = (): void => this.#recheck(this.#origins.get(key) ?? entry);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (;;) {
        if (waiting.handed !== undefined) return waiting.handed;
        this.#closing.throwIfAborted();
        // (Looked up again each time: a lease may have said meanwhile that the origin has no rate any more.)
        const rate = this.#rates.get(key);
        if (!rate || signal?.aborted) return undefined;
        const origin = this.#originOf(key);
        const held = origin.batch.spendUntil(this.#now());
        if (held !== undefined) return held;
        // A refusal (of its own ask, or of the one it shared) said no token comes before its deadline. (Only the
        // request that asked heard it; the others, their deadlines a little later, asked again, and again.)
        if (origin.refused && origin.refused.until > deadline) {
          // (Told the wait left to it, not the one the refusal told the request that asked.)
          throw rateLimitedError(key, rate, origin.refused.until - this.#now(), deadline - this.#now());
        }
        if (origin.asking && origin.askingUntil <= deadline + SHARED_ASK_SLACK_MS) {
          // It ends (with tokens, or refused) before this request's deadline: spend from what it brings.
          await Promise.race([origin.asking.then(ignore, ignore), woken]);
          continue;
        }
        if (origin.asking) {
          // The request under way may wait past this one's deadline: a token of its own, on its own deadline.
          return this.#handedFirst(
            waiting,
            origin.batch,
            await this.#ask(host, port, 1, deadline, origin, waiting, false),
          );
        }
        // (The rate's batch, less what expired unspent of the last ones: see the header.)
        const count = origin.batch.nextAsk(batchSize(rate, MAX_WORKER_BATCH), origin.waiting.size);
        // On the earliest deadline of the requests waiting now, so that every one of them can wait for it: on this
        // one's (a later request's, after an ask that brought fewer tokens than it asked for), those due sooner
        // asked a token of their own beside it while it counted them too (11 tokens for a burst of 10).
        let until = deadline;
        for (const each of origin.waiting) if (each.deadline < until) until = each.deadline;
        const asking = this.#ask(host, port, count, until, origin, waiting, true);
        const shared = asking.then(ignore, ignore).finally(() => {
          if (origin.asking === shared) origin.asking = undefined;
        });
        origin.asking = shared;
        origin.askingUntil = until;
        // (A token handed to it meanwhile is its own: what the ask brings then all goes to the batch.)
        let own: number | undefined;
        try {
          own = await Promise.race([asking, woken]);
        } catch (error) {
          // Refused on an earlier request's deadline: this one may still wait for a token of its own.
          if (until < deadline && this.#now() < deadline && rateLimitedWait(error) !== undefined) continue;
          throw error;
        }
        return this.#handedFirst(waiting, origin.batch, own);
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      entry.waiting.delete(waiting);
      this.#recheck(this.#origins.get(key) ?? entry);
    }
  }

  /** Runs the checks of the origin's `tokens` requests under way: one nobody waits for any more is cancelled. */
  #recheck(origin: OriginTokens): void {
    for (const check of origin.asks) check();
  }

  /** A waiting request's token: the one handed to it if any (then `own`, come as well, goes to `batch`), else `own`. */
  #handedFirst(waiting: Waiting, batch: TokenBatch, own: number | undefined): number | undefined {
    if (waiting.handed === undefined) return own;
    if (own !== undefined) batch.add(1, this.#now(), own - TOKEN_LIFETIME_MS);
    return waiting.handed;
  }

  /**
   * Asks the daemon for `count` tokens: one is the caller's (unless it was cancelled or handed one meanwhile: when
   * it expires), the rest go to the origin's batch. `shared`: the origin's batch request, which the origin's other
   * waiting requests spend from too; it is cancelled in the daemon once none of them waits (else once the caller
   * does not).
   */
  async #ask(
    host: string,
    port: number,
    count: number,
    deadline: number,
    origin: OriginTokens,
    waiting: Waiting,
    shared: boolean,
  ): Promise<number | undefined> {
    const { signal } = waiting;
    const { batch } = origin;
    const stop = new Cancellation();
    const waits = (each: Waiting): boolean => each.signal?.aborted !== true && each.handed === undefined;
    /** The daemon has this ask (a place in the origin's queue there), not this side's sleep. */
    let inDaemon = false;
    const check = (): void => {
      if (waits(waiting) || (shared && [...origin.waiting].some(waits))) return;
      // Its place in the daemon's queue goes with it: a refusal kept for the origin may have counted it ahead (the
      // daemon's `waitMs` is the refused request's turn, after this worker's asks before it), and its token can
      // come sooner now. (Kept, it failed at once a request the daemon would have served in time.)
      if (inDaemon && !stop.aborted) origin.refused = undefined;
      stop.cancel(new SockpoolError(ErrorCodes.ABORTED, `no request waits for tokens of ${host}:${port} any more`));
    };
    origin.asks.add(check);
    try {
      for (;;) {
        const left = Math.max(1, Math.ceil(deadline - this.#now()));
        inDaemon = true;
        try {
          const granted = await this.#link.tokens(host, port, count, left, stop);
          inDaemon = false;
          if (shared) batch.noteGrant(granted);
          const now = this.#now();
          const served = signal?.aborted === true || waiting.handed !== undefined || stop.aborted;
          batch.add(served ? granted : granted - 1, now);
          return served ? undefined : now + TOKEN_LIFETIME_MS;
        } catch (error) {
          inDaemon = false;
          // Handed a token meanwhile: that one is its own, whatever the daemon answered; cancelled: nobody waits.
          if (waiting.handed !== undefined || stop.aborted) return undefined;
          // The daemon waited at most MAX_TIMEOUT_MS: a token due after that, but before the deadline, is waited for
          // here (until it is due within that bound), then asked for again.
          const waitMs = rateLimitedWait(error);
          if (waitMs !== undefined) origin.refused = { until: this.#now() + waitMs };
          if (left <= MAX_TIMEOUT_MS || waitMs === undefined || waitMs > deadline - this.#now()) throw error;
          await sleep(Math.max(1, waitMs - MAX_TIMEOUT_MS), signal, waiting.woken, this.#closing);
          this.#closing.throwIfAborted();
          // Cancelled or handed a token meanwhile: requests that shared this wait ask for themselves.
          if (signal?.aborted || waiting.handed !== undefined) return undefined;
        }
      }
    } finally {
      origin.asks.delete(check);
    }
  }
}

function ignore(): void {}

/** Waits `ms`, or until `signal` is cancelled, the request is handed a token (`woken`) or the link closes
 *  (`closing`): the timer goes with the request (it could hold a process that closed its client for minutes). */
function sleep(
  ms: number,
  signal: CancelSignal | undefined,
  woken: Promise<undefined>,
  closing: CancelSignal,
): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      closing.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
    closing.addEventListener('abort', done, { once: true });
    woken.then(done);
  });
}

/** A SOCKPOOL_ERR_RATE_LIMITED refusal's wait for the next token (ms), if the error is one. */
function rateLimitedWait(error: unknown): number | undefined {
  const { code, fields } = error as { code?: unknown; fields?: { waitMs?: unknown } };
  if (code !== ErrorCodes.RATE_LIMITED) return undefined;
  const waitMs = fields?.waitMs;
  return typeof waitMs === 'number' && Number.isFinite(waitMs) ? waitMs : undefined;
}
