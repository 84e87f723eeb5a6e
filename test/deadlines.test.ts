// Deadlines: every request deadline of a runtime on one timer (worker/deadlines.ts). On the fake clock (timers and
// performance.now move together): deadlines expire in order and exactly when due, a removed one never does, an
// earlier deadline added after a later one is not held up by it. With real timers, in a child process: the timer
// keeps a process alive exactly while a deadline is pending (the child shows whether it exits).
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { Deadlines } from '../worker/deadlines.js';
import { useFakeClock } from './fixtures/fake-clock.js';

const now = () => performance.now();
const distDeadlines = fileURLToPath(new URL('../dist/worker/deadlines.js', import.meta.url));

describe('Deadlines', () => {
  beforeEach(() => useFakeClock());
  afterEach(() => {
    vi.useRealTimers();
  });

  it('expires in deadline order, each when due, skips removed ones, and is empty afterwards', () => {
    const deadlines = new Deadlines(now);
    const expired: string[] = [];
    const start = now();
    deadlines.add(start + 60, () => expired.push('c'));
    const removed = deadlines.add(start + 20, () => expired.push('removed'));
    deadlines.add(start + 10, () => expired.push('a'));
    deadlines.add(start + 40, () => expired.push('b'));
    deadlines.remove(removed);
    deadlines.remove(removed); // twice: nothing happens
    expect(deadlines.size).toBe(3);
    vi.advanceTimersByTime(9);
    expect(expired).toEqual([]);
    vi.advanceTimersByTime(1);
    expect(expired).toEqual(['a']);
    vi.advanceTimersByTime(29);
    expect(expired).toEqual(['a']);
    vi.advanceTimersByTime(1);
    expect(expired).toEqual(['a', 'b']);
    vi.advanceTimersByTime(20);
    expect(expired).toEqual(['a', 'b', 'c']);
    expect(deadlines.size).toBe(0);
    deadlines.close();
  });

  it('an earlier deadline added after a later one fires on time, not with the later one', () => {
    const deadlines = new Deadlines(now);
    let firedAt = 0;
    const start = now();
    deadlines.add(start + 5_000, () => {});
    deadlines.add(start + 30, () => {
      firedAt = now();
    });
    vi.advanceTimersByTime(29);
    expect(firedAt).toBe(0);
    vi.advanceTimersByTime(1);
    expect(firedAt).toBe(start + 30);
    expect(deadlines.size).toBe(1);
    deadlines.close();
  });

  it('many deadlines added and removed in random order: each pending one expires once, when due, none of the removed', () => {
    const deadlines = new Deadlines(now);
    const start = now();
    const fired = new Map<number, number>();
    const entries = Array.from({ length: 200 }, (_, i) =>
      deadlines.add(start + 20 + ((i * 37) % 50), () => fired.set(i, (fired.get(i) ?? 0) + 1)),
    );
    const removed = new Set<number>();
    for (let i = 0; i < 200; i += 3) {
      deadlines.remove(entries[i]!);
      removed.add(i);
    }
    // Step by step through the range (20..69 ms): at each moment exactly the pending ones due so far have fired.
    for (let at = 0; at <= 80; at++) {
      vi.advanceTimersByTime(at === 0 ? 0 : 1);
      const due = entries.flatMap((entry, i) => (!removed.has(i) && entry.at - start <= at ? [`${i}:1`] : []));
      expect([...fired].map(([i, times]) => `${i}:${times}`).sort(), `at ${at} ms`).toEqual(due.sort());
    }
    deadlines.close();
  });

  it('keeps the process alive while a deadline is pending, and not after it was removed (real timers)', async () => {
    vi.useRealTimers();
    const script = (removeIt: boolean) => `
      import { Deadlines } from ${JSON.stringify(distDeadlines)};
      const deadlines = new Deadlines(() => performance.now());
      const entry = deadlines.add(performance.now() + 300, () => console.log('expired'));
      ${removeIt ? 'deadlines.remove(entry);' : ''}
    `;
    // (Both children at once; a child still running at the timeout is killed, and execFile rejects.)
    const run = (removeIt: boolean) =>
      promisify(execFile)(process.execPath, ['--input-type=module', '-e', script(removeIt)], {
        encoding: 'utf8',
        timeout: 10_000,
      });
    const [pending, removed] = await Promise.all([run(false), run(true)]);
    expect(pending.stdout.trim()).toBe('expired');
    expect(removed.stdout.trim()).toBe('');
  });
});
