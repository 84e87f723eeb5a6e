// bench/lib/soak-verdicts.ts: what a soak run must show, judged from its windows. Pure logic on made-up windows: a
// steady run passes, noise in RSS included; a leak of fds or heap, RSS that keeps growing (even slowly), a slowdown, a
// p99 that grows or one failed request is each caught; the first window (the warm-up) is not compared; too short a
// run says so.
import { describe, expect, it } from 'vitest';
import { FD_SLACK, type SoakWindow, slope, soakThirds, soakVerdicts } from '../bench/lib/soak-verdicts.js';

const MB = 1024 * 1024;

function windows(count: number, change: (i: number, window: SoakWindow) => void = () => {}): SoakWindow[] {
  return Array.from({ length: count }, (_, i) => {
    const window: SoakWindow = {
      atS: (i + 1) * 10,
      perSecond: 5_000,
      p99Ms: 2,
      failures: 0,
      fds: { daemon: 40, client: 30 },
      heap: { daemon: 20 * MB, client: 30 * MB },
      committed: { daemon: 30 * MB, client: 40 * MB },
      rss: { daemon: 80 * MB, client: 120 * MB },
    };
    change(i, window);
    return window;
  });
}

const missed = (verdicts: ReturnType<typeof soakVerdicts>) =>
  verdicts.filter((verdict) => !verdict.met).map((verdict) => verdict.aim);

describe('soak verdicts', () => {
  it('a steady run meets every aim, with noise in RSS and V8’s committed heap growing in steps; the warm-up window is not compared', () => {
    const verdicts = soakVerdicts(
      windows(13, (i, window) => {
        if (i === 0) {
          window.perSecond = 500;
          window.p99Ms = 50;
          window.heap = { daemon: 60 * MB, client: 60 * MB };
        }
        // Up and down by a few MB from reading to reading; the first window far below (heaps still sizing).
        window.rss.daemon = i === 0 ? 40 * MB : [100, 104, 97][i % 3]! * MB;
        // V8 widens the client's young generation twice, RSS with it: its own sizing, not a leak.
        const widened = i < 4 ? 0 : i < 9 ? 48 * MB : 112 * MB;
        window.committed.client = 40 * MB + widened;
        window.rss.client = 120 * MB + widened;
      }),
    );
    expect(missed(verdicts)).toEqual([]);
    expect(verdicts).toHaveLength(9);
  });

  it('catches an fd leak in one process, a heap and an RSS that keep growing, a slowdown and a growing p99', () => {
    const leaking = soakVerdicts(
      windows(13, (i, window) => {
        window.fds.client = 30 + i * 5;
        window.heap.client = 30 * MB + i * 2 * MB;
        // 2 MB a window of 10 s: 12 MB a minute. And 0.3 MB a window (1.8 MB a minute), under noise of ±1 MB.
        window.rss.daemon = 80 * MB + i * 2 * MB;
        window.rss.client = 120 * MB + i * 0.3 * MB + (i % 2 === 0 ? MB : -MB);
        window.perSecond = 5_000 - i * 300;
        window.p99Ms = 2 + i;
      }),
    );
    expect(missed(leaking)).toEqual([
      'requests/s, last third ≥ 0.85× the first',
      'p99, last third ≤ 2× the first',
      `client: open fds flat (last third ≤ first + ${FD_SLACK})`,
      'client: heap after a full collection flat (last third ≤ first × 1.1 + 4 MB)',
      "daemon: RSS beyond V8's committed heap, after a full collection, grows ≤ 1 MB a minute",
      "client: RSS beyond V8's committed heap, after a full collection, grows ≤ 1 MB a minute",
    ]);
  });

  it('fails a run with one failed request, and one too short to compare', () => {
    const oneFailed = windows(10, (i, window) => {
      if (i === 7) window.failures = 1;
    });
    expect(missed(soakVerdicts(oneFailed))).toEqual(['no request failed where none should']);
    expect(missed(soakVerdicts(windows(3)))).toEqual(['at least four windows to compare']);
    expect(soakThirds([1, 2, 3, 4, 5, 6, 7, 8])).toEqual({ first: [2, 3], last: [7, 8] });
    expect(slope([0, 1, 2, 3], [5, 7, 9, 11])).toBe(2);
    expect(slope([1, 1], [3, 9])).toBe(0);
  });
});
