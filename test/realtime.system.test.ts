// realtimePriority where the kernel allows it (root): the daemon's main thread alone runs under SCHED_RR; the
// threads it starts afterwards (libuv's pool, the history's thread) start under the normal policy
// (SCHED_RESET_ON_FORK), so that work a client can make unbounded (a relayed download) never runs real-time.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CpuGroups } from '../bench/lib/cpu-groups.js';
import { startDaemon } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { SCHED_OTHER, SCHED_RR, threadPolicies } from './helpers/thread-policy.js';

beforeAll(() => {
  if (process.getuid?.() !== 0) throw new Error('realtime.system.test.ts sets a real-time policy and needs root');
});

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

describe('realtimePriority, allowed', () => {
  it('puts the main thread alone under SCHED_RR: the threads it starts afterwards run under the normal policy', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-realtime-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'sockpoold.toml'), 'realtimePriority = 3\n');
    // A CPU group with a real-time budget: where the kernel has real-time group scheduling (cgroup v1's cpu
    // hierarchy, as on this VM) a group without one refuses the policy even to root.
    const groups = CpuGroups.create('sockpool-realtime-test');
    cleanups.push(() => groups.close());
    const group = groups.group('daemon');
    groups.realtimeBudget(group, 0.5);
    const sockpoold = await startDaemon({ args: ['--config', join(dir, 'sockpoold.toml')], wrap: groups.wrap(group) });
    cleanups.push(() => sockpoold.stop());
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const reply = await raw.request({ type: 'stats', id: 1 });
    expect((reply.message as unknown as { stats: { realtime: unknown } }).stats.realtime).toEqual({
      state: 'on',
      priority: 3,
      detail: 'main thread under SCHED_RR at priority 3',
    });
    const pid = sockpoold.child.pid!;
    const threads = threadPolicies(pid);
    expect(threads.find((thread) => thread.tid === pid)).toMatchObject({ policy: SCHED_RR, rtPriority: 3 });
    const others = threads.filter((thread) => thread.tid !== pid);
    // Threads the daemon started after the call: libuv's pool and the history's worker thread.
    expect(others.map((thread) => thread.name)).toEqual(expect.arrayContaining(['libuv-worker', 'sockpoold state']));
    expect(others.filter((thread) => thread.policy !== SCHED_OTHER)).toEqual([]);
  });
});
