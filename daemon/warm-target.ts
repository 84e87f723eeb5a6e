// How many sockets an origin's pool keeps idle beyond what clients announced: the predictive idle target (the pool
// manager's sweep gives each pool this, bounded by minIdle, maxIdle and the global maxIdleTotal; the pool refills
// toward it, OriginPool.#refillWanted). Pure arithmetic, so that the decisions are tested without sockets.
//
// Why the target is what it is. A socket kept idle saves the next acquire one connect, and costs the origin a
// connection for nothing when no acquire takes it; an origin judges a crawler by the connections it opens. So:
//
// - Announced demand is served by its own connects and nothing more. A prewarm (the application's, or a client
//   queue's lookahead) connects what it asks for, once; the acquires that take those sockets were announced and
//   met, and do not count toward the target. Counting both the announcement and its acquires (as the target did,
//   through one demand rate) asked for a socket more at every origin once its announced ones were lent, and few of
//   those refills were ever lent (docs/benchmarks.md, twenty-first session). The demand rate in `stats`, the global idle cap's share-out, the fleet and the history still count
//   announcements as demand; only this target leaves them out.
// - Unannounced acquires are the demand the target follows: their rate, decaying with `pool.predictiveWindowMs`
//   (τ). Where an origin took fewer than REPEAT_ACQUIRES of them within about τ (rate × τ, the estimate's recent
//   count), its demand has not repeated, and nothing is kept for it: a crawler visits most origins once or twice,
//   and a socket left at each after its visit was one unused connection per origin it touched (the old threshold,
//   0.05 acquires a second, made one acquire enough). With client connection caches, an acquire means a client had
//   no connection to reuse: two within τ are demand that grows or recurs, which is what a warm socket is for.
// - Past that, the Envoy-like part as before: the acquires expected during one connect, doubled, rounded up (so
//   that a burst finds sockets while the refill connects), plus a spare where a second acquire within one connect
//   is likely (SPARE_FROM_ACQUIRES_PER_CONNECT); an origin asked for now and then keeps one socket, not two.
//
// warm-on-start and the fleet's shares replay a rate (history, other daemons' demand) as unannounced demand: they
// stand for acquires this daemon has not seen yet. rateForTarget inverts predictedTarget for their budget.

/** Unannounced acquires within about one predictive window (rate × τ) before the origin gets an idle target. */
export const REPEAT_ACQUIRES = 1.5;

/**
 * The predicted target's spare socket (the one that keeps an origin warm while the refill of the socket just
 * handed out connects) is kept only where a second acquire within one connect is this likely (rate × connect time):
 * below it the spare is almost never taken, and a crawler touching many origins a few times each left one unused
 * connection per origin at every server it visited.
 */
export const SPARE_FROM_ACQUIRES_PER_CONNECT = 0.05;

/**
 * The predicted idle target for a rate of unannounced acquires (per s, decaying with time constant `windowMs`) and
 * a connect time (ms), before minIdle, maxIdle and the global cap: 0 below REPEAT_ACQUIRES within the window, else
 * ⌈acquires per connect × 2⌉ plus the spare.
 */
export function predictedTarget(ratePerS: number, connectMs: number, windowMs: number): number {
  if (!(ratePerS > 0) || (ratePerS * windowMs) / 1000 < REPEAT_ACQUIRES) return 0;
  const perConnect = (ratePerS * Math.max(connectMs, 1)) / 1000;
  return Math.ceil(perConnect * 2) + (perConnect >= SPARE_FROM_ACQUIRES_PER_CONNECT ? 1 : 0);
}

/**
 * A rate whose predicted target is at most `target` (the highest, but for rounding): `target` − 1 expected acquires
 * per connect doubled, plus the spare. 0 for a target of 1 (the socket warm-on-start gives every origin anyway), and
 * for a target too low to be had at the least repeating rate (a connect so slow that REPEAT_ACQUIRES within the
 * window already asks for more).
 */
export function rateForTarget(target: number, connectMs: number, windowMs: number): number {
  if (target <= 1) return 0;
  // Just under, so that rounding never makes ⌈perConnect × 2⌉ one more.
  const rate = (((target - 1) / 2) * 1000 * (1 - 1e-9)) / Math.max(connectMs, 1);
  return predictedTarget(rate, connectMs, windowMs) === 0 ? 0 : rate;
}
