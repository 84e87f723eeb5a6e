// An idle sockpoold sleeps. It runs for weeks under systemd, mostly waiting: every periodic wakeup it does not need
// is CPU and power taken from the host for nothing. What used to wake it: prom-client's event-loop delay sampler (a
// 10 ms timer, now only when the metrics endpoint serves it), the close watchdog's 25 ms look (now parked while no
// watched call runs; native/sockpool_native.cc, "The close watchdog"), the pool's sweep (now only while there are
// pools) and the status line for systemd (now only with a notify socket).
import { readdirSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { type DaemonProcess, startDaemon } from './helpers/daemon.js';

const daemons: DaemonProcess[] = [];
afterEach(async () => {
  await Promise.all(daemons.splice(0).map((daemon) => daemon.stop()));
});

/** Times each thread of `pid` went to sleep so far (voluntary context switches), by thread id; V8's own platform
 *  threads are left out (their work is the JavaScript engine's, not the daemon's timers). */
function sleepsByThread(pid: number): Map<string, { name: string; sleeps: number }> {
  const threads = new Map<string, { name: string; sleeps: number }>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
      if (name === 'V8Worker') continue;
      const status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
      threads.set(tid, { name, sleeps: Number(/^voluntary_ctxt_switches:\s+(\d+)$/m.exec(status)?.[1]) });
    } catch {
      // The thread ended between the listing and the read.
    }
  }
  return threads;
}

describe('an idle daemon', () => {
  it('sleeps: its threads together wake a few times a second, not a hundred (no metrics endpoint: no event-loop sampler; the close watchdog parked)', async () => {
    const daemon = await startDaemon();
    daemons.push(daemon);
    const pid = daemon.child.pid!;
    // A client that connects and hangs up: the daemon closes its end through a watched call, so the watchdog has
    // looked at least once before it parks.
    const link = native.seqpacketConnect(daemon.socketPath);
    native.close(link);
    // The watchdog parks after about a second without a watched call.
    await sleep(2_000);
    const before = sleepsByThread(pid);
    await sleep(3_000);
    const after = sleepsByThread(pid);
    let wakes = 0;
    const byThread: string[] = [];
    for (const [tid, { name, sleeps }] of after) {
      const woke = sleeps - (before.get(tid)?.sleeps ?? 0);
      wakes += woke;
      if (woke > 0) byThread.push(`${name}(${tid}) ${woke}`);
    }
    // Before: about 100 a second from the sampler and 40 from the watchdog, over 400 in these 3 s (either alone over
    // 100); now a few in all. The bound leaves room for a loaded machine.
    expect(wakes, byThread.join(', ')).toBeLessThan(60);
  });
});
