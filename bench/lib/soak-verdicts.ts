// What a soak run (bench/soak.ts) must show, from its windows: nothing grows that should stay flat (open fds, the
// heap that survives a full collection, RSS), nothing slows (requests a second, the p99), and nothing fails. Pure:
// the windows in, the verdicts out.
//
// The windows after the first (the warm-up: code compiled, pools warmed) are cut in thirds. Fds, the heap after a
// full collection, the rate and the p99 compare the first third with the last, as medians: one window that a stall
// of the VM stretched moves neither. RSS, read right after a full collection (before it, V8 lets garbage pile up for
// minutes: the daemon's RSS went from 130 to 256 MB and back to 116 in one run), is judged without the heap V8 keeps
// committed after that collection, by its trend: the least-squares slope over the windows after the first, in MB a
// minute. A native leak grows it steadily, however slowly; noise does not. (V8's committed heap is left out because
// it grows in steps for reasons of V8's own: under a high allocation rate it widens its young generation, by tens of
// MB at a time and up to its limit, and keeps the pages with no garbage in them; a fetch()-heavy client's went from
// 16 to 128 MB so in two minutes, its live heap flat. A leak in JavaScript is the heap after a collection, judged
// above.) The bounds leave room for what varies without leaking: fds in flight at the moment of a reading, the heap's
// own sizing.

import { median } from './stats.js';

export interface SoakWindow {
  /** Seconds from the start of the run to the window's end. */
  atS: number;
  /** Requests a second in the window (all kinds). */
  perSecond: number;
  /** The window's p99 latency (ms) of the requests that completed. */
  p99Ms: number;
  /** Requests that failed where none should (a wrong body, an error other than the expected cancellation). */
  failures: number;
  /** Of each process watched, by name, read at the window's end: open fds, the heap (V8's and external memory) left
   *  after a full collection, the heap V8 keeps committed after it (all threads' heapTotal), and RSS after it
   *  (bytes). */
  fds: Record<string, number>;
  heap: Record<string, number>;
  committed: Record<string, number>;
  rss: Record<string, number>;
}

export interface SoakVerdict {
  aim: string;
  value: string;
  met: boolean;
}

/** Open fds may differ by this many between the thirds (in flight at the reading). */
export const FD_SLACK = 8;
/** The heap after a full collection may grow by this share plus this many bytes between the thirds. */
export const HEAP_GROWTH_SHARE = 0.1;
export const HEAP_SLACK_BYTES = 4 * 1024 * 1024;
/** RSS after a full collection, less V8's committed heap, may grow by at most this many MB a minute (its
 *  least-squares slope). */
export const MAX_RSS_MB_PER_MINUTE = 1;
/** The last third keeps at least this share of the first third's rate; its p99 at most this multiple. */
export const MIN_RATE_SHARE = 0.85;
export const MAX_P99_GROWTH = 2;

/** The first and last thirds of the windows after the first; undefined with fewer than four windows. */
export function soakThirds<T>(windows: T[]): { first: T[]; last: T[] } | undefined {
  const steady = windows.slice(1);
  if (steady.length < 3) return undefined;
  const third = Math.floor(steady.length / 3);
  return {
    first: steady.slice(0, third),
    last: steady.slice(steady.length - third),
  };
}

const mb = (bytes: number) => (bytes / 1024 / 1024).toFixed(1);

/** The least-squares slope of `values` over `times`. */
export function slope(times: number[], values: number[]): number {
  const n = times.length;
  const meanT = times.reduce((sum, t) => sum + t, 0) / n;
  const meanV = values.reduce((sum, v) => sum + v, 0) / n;
  let covariance = 0;
  let variance = 0;
  for (let i = 0; i < n; i++) {
    covariance += (times[i]! - meanT) * (values[i]! - meanV);
    variance += (times[i]! - meanT) ** 2;
  }
  return variance === 0 ? 0 : covariance / variance;
}

export function soakVerdicts(windows: SoakWindow[]): SoakVerdict[] {
  const failures = windows.reduce((sum, window) => sum + window.failures, 0);
  const verdicts: SoakVerdict[] = [
    { aim: 'no request failed where none should', value: `${failures} failed`, met: failures === 0 },
  ];
  const thirds = soakThirds(windows);
  if (!thirds) {
    verdicts.push({ aim: 'at least four windows to compare', value: `${windows.length} windows`, met: false });
    return verdicts;
  }
  const { first, last } = thirds;
  const rateFirst = median(first.map((window) => window.perSecond));
  const rateLast = median(last.map((window) => window.perSecond));
  verdicts.push({
    aim: `requests/s, last third ≥ ${MIN_RATE_SHARE}× the first`,
    value: `${Math.round(rateFirst)} → ${Math.round(rateLast)} (${(rateLast / rateFirst).toFixed(2)}×)`,
    met: rateLast >= MIN_RATE_SHARE * rateFirst,
  });
  const p99First = median(first.map((window) => window.p99Ms));
  const p99Last = median(last.map((window) => window.p99Ms));
  verdicts.push({
    aim: `p99, last third ≤ ${MAX_P99_GROWTH}× the first`,
    value: `${p99First.toFixed(2)} → ${p99Last.toFixed(2)} ms`,
    met: p99Last <= MAX_P99_GROWTH * p99First,
  });
  for (const name of Object.keys(windows[0]!.fds)) {
    const before = median(first.map((window) => window.fds[name]!));
    const after = median(last.map((window) => window.fds[name]!));
    verdicts.push({
      aim: `${name}: open fds flat (last third ≤ first + ${FD_SLACK})`,
      value: `${before} → ${after}`,
      met: after <= before + FD_SLACK,
    });
  }
  for (const name of Object.keys(windows[0]!.heap)) {
    const before = median(first.map((window) => window.heap[name]!));
    const after = median(last.map((window) => window.heap[name]!));
    verdicts.push({
      aim: `${name}: heap after a full collection flat (last third ≤ first × ${1 + HEAP_GROWTH_SHARE} + ${HEAP_SLACK_BYTES / 1024 / 1024} MB)`,
      value: `${mb(before)} → ${mb(after)} MB`,
      met: after <= before * (1 + HEAP_GROWTH_SHARE) + HEAP_SLACK_BYTES,
    });
  }
  const steady = windows.slice(1);
  for (const name of Object.keys(windows[0]!.rss)) {
    const beyondV8 = (window: SoakWindow) => window.rss[name]! - window.committed[name]!;
    const perMinute = slope(
      steady.map((window) => window.atS / 60),
      steady.map((window) => beyondV8(window) / 1024 / 1024),
    );
    const before = median(first.map(beyondV8));
    const after = median(last.map(beyondV8));
    const rssBefore = median(first.map((window) => window.rss[name]!));
    const rssAfter = median(last.map((window) => window.rss[name]!));
    verdicts.push({
      aim: `${name}: RSS beyond V8's committed heap, after a full collection, grows ≤ ${MAX_RSS_MB_PER_MINUTE} MB a minute`,
      value: `${perMinute.toFixed(2)} MB a minute (${mb(before)} → ${mb(after)} MB; all RSS ${mb(rssBefore)} → ${mb(rssAfter)} MB)`,
      met: perMinute <= MAX_RSS_MB_PER_MINUTE,
    });
  }
  return verdicts;
}
