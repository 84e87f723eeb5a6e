// Deadlines: every request deadline of a runtime on one timer (worker/deadlines.ts). Real timers: deadlines expire
// in order, a removed one never does, an earlier deadline added after a later one is not held up by it, and the
// timer keeps a process alive exactly while a deadline is pending (a child process shows whether it exits).
import { spawnSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { Deadlines } from '../worker/deadlines.js';

const now = () => performance.now();
const distDeadlines = fileURLToPath(new URL('../dist/worker/deadlines.js', import.meta.url));

describe('Deadlines', () => {
  it('expires in deadline order, skips removed ones, and is empty afterwards', async () => {
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
    await sleep(120);
    expect(expired).toEqual(['a', 'b', 'c']);
    expect(deadlines.size).toBe(0);
    deadlines.close();
  });

  it('an earlier deadline added after a later one fires on time, not with the later one', async () => {
    const deadlines = new Deadlines(now);
    let firedAt = 0;
    const start = now();
    deadlines.add(start + 5_000, () => {});
    deadlines.add(start + 30, () => {
      firedAt = now();
    });
    await sleep(200);
    expect(firedAt).toBeGreaterThan(0);
    expect(deadlines.size).toBe(1);
    deadlines.close();
  });

  it('many deadlines added and removed in random order: each pending one expires once, none of the removed', async () => {
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
    await sleep(150);
    for (let i = 0; i < 200; i++) expect(fired.get(i) ?? 0).toBe(removed.has(i) ? 0 : 1);
    deadlines.close();
  });

  it('keeps the process alive while a deadline is pending, and not after it was removed', () => {
    const script = (removeIt: boolean) => `
      import { Deadlines } from ${JSON.stringify(distDeadlines)};
      const deadlines = new Deadlines(() => performance.now());
      const entry = deadlines.add(performance.now() + 300, () => console.log('expired'));
      ${removeIt ? 'deadlines.remove(entry);' : ''}
    `;
    const run = (removeIt: boolean) =>
      spawnSync(process.execPath, ['--input-type=module', '-e', script(removeIt)], {
        encoding: 'utf8',
        timeout: 10_000,
      });
    const pending = run(false);
    expect(pending.status).toBe(0);
    expect(pending.stdout.trim()).toBe('expired');
    const removed = run(true);
    expect(removed.status).toBe(0);
    expect(removed.stdout.trim()).toBe('');
  });
});
