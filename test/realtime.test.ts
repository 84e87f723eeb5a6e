// realtimePriority (daemon/realtime.ts): the refusal and the default, which any user can see. That the policy is
// applied where it is allowed, to the main thread alone, is in test/realtime.system.test.ts (root).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { startDaemon } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';
import { openRawClient } from './helpers/raw-client.js';
import { SCHED_OTHER, threadPolicies } from './helpers/thread-policy.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function realtimeStats(socketPath: string): Promise<{ state: string; priority: number; detail: string }> {
  const raw = openRawClient(socketPath, cleanups);
  const reply = await raw.request({ type: 'stats', id: 1 });
  return (reply.message as unknown as { stats: { realtime: { state: string; priority: number; detail: string } } })
    .stats.realtime;
}

async function metricsText(port: number): Promise<string> {
  return (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
}

describe('realtimePriority', () => {
  it('refused by the kernel: a warning saying what it needs, and the daemon starts and serves under the normal policy', async () => {
    const metricsPort = await freePort();
    const sockpoold = await startDaemon({
      args: ['--config', configFile('realtimePriority = 1'), '--metrics-port', String(metricsPort)],
      // No real-time priority allowed by the limit, and (as root) no CAP_SYS_NICE, whoever runs the test.
      wrap: [
        'prlimit',
        '--rtprio=0',
        ...(process.getuid?.() === 0 ? ['setpriv', '--inh-caps=-sys_nice', '--bounding-set=-sys_nice'] : []),
      ],
    });
    cleanups.push(() => sockpoold.stop());
    expect(sockpoold.output()).toContain('real-time scheduling refused: the daemon runs without it');
    const realtime = await realtimeStats(sockpoold.socketPath);
    expect(realtime).toMatchObject({ state: 'refused', priority: 1 });
    expect(realtime.detail).toMatch(/^sched_setscheduler EPERM: needs CAP_SYS_NICE or LimitRTPRIO=1/);
    expect(threadPolicies(sockpoold.child.pid!).every((thread) => thread.policy === SCHED_OTHER)).toBe(true);
    const text = await metricsText(metricsPort);
    expect(text).toContain('sockpool_realtime{state="refused"} 1');
    expect(text).toContain('sockpool_realtime{state="on"} 0');
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    expect((await raw.request({ type: 'hello', id: 2, version: 1 })).message).toMatchObject({ type: 'hello' });
  });

  it('is off by default: stats and the gauge say so, and no thread of the daemon runs under a real-time policy', async () => {
    const metricsPort = await freePort();
    const sockpoold = await startDaemon({ args: ['--metrics-port', String(metricsPort)] });
    cleanups.push(() => sockpoold.stop());
    expect(await realtimeStats(sockpoold.socketPath)).toEqual({
      state: 'off',
      priority: 0,
      detail: 'realtimePriority = 0',
    });
    expect(threadPolicies(sockpoold.child.pid!).every((thread) => thread.policy === SCHED_OTHER)).toBe(true);
    expect(await metricsText(metricsPort)).toContain('sockpool_realtime{state="off"} 1');
  });
});

function configFile(text: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'sockpool-realtime-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'sockpoold.toml');
  writeFileSync(path, `${text}\n`);
  return path;
}
