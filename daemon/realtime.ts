// The daemon's main thread under a real-time policy, when the operator asks for it (`realtimePriority`).
//
// Why: every honest client's acquire waits for the main thread. On a core it shares with busy processes (another
// uid's, hostile or not) the fair scheduler lets a woken daemon wait until the running process's slice ends, up to a
// scheduler tick (4 ms at HZ=250) when the kernel preempts only at ticks: CPUWeight= sets the daemon's share over
// time, not that wait (bench/adversarial.ts --fresh, docs/benchmarks.md). Under SCHED_RR the woken main thread runs
// at once.
//
// Why only the main thread, and why off by default: a real-time thread that a client can keep busy takes its core
// from everything else on it. The main thread's work per turn is bounded per uid (daemon/quotas.ts), and the kernel
// throttles real-time threads at its sched_rt_runtime_us (95% of each second by default), so what it can take is
// about one core. The relay threads (a client's download, as fast as it can read), the history's thread and V8's
// and libuv's helpers are not bounded that way: SCHED_RESET_ON_FORK starts every thread the main thread creates
// afterwards under the normal policy (the threads that exist before, V8's, keep theirs). The shipped unit keeps
// `RestrictRealtime=yes`; an operator who wants this lifts it in a drop-in and grants `LimitRTPRIO=` (docs/config.md).
//
// Best effort: a refusal (no privilege, a system call filter, no real-time budget in the daemon's CPU cgroup where
// the kernel has real-time group scheduling) is reported and the daemon runs under the normal policy.
import type { Registry } from 'prom-client';
import * as native from '../shared/native.js';
import { registerStateGauge } from './metrics.js';

export interface RealtimeReport {
  /** on: the main thread runs under SCHED_RR; off: `realtimePriority = 0`; refused: the kernel said no (detail). */
  state: 'on' | 'off' | 'refused';
  priority: number;
  detail?: string;
}

const STATES = ['on', 'off', 'refused'] as const;

/** A Sockpoold embedded in another program: its scheduling is that program's. */
export const EMBEDDED_SCHEDULING: RealtimeReport = {
  state: 'off',
  priority: 0,
  detail: 'embedded: not set by sockpoold',
};

/** Called by the sockpoold command on its main thread (the policy is the calling thread's), before the daemon starts. */
export function applyRealtimePriority(priority: number): RealtimeReport {
  if (priority === 0) return { state: 'off', priority, detail: 'realtimePriority = 0' };
  try {
    native.setRealtimePriority(priority);
  } catch (error) {
    const failure = error as Error & { code?: string };
    return {
      state: 'refused',
      priority,
      detail:
        failure.code === 'EPERM'
          ? `${failure.message}: needs CAP_SYS_NICE or LimitRTPRIO=${priority} (and RestrictRealtime=no) in the unit, and a real-time budget in the daemon's CPU cgroup where the kernel has real-time group scheduling (cpu.rt_runtime_us)`
          : failure.message,
    };
  }
  return { state: 'on', priority, detail: `main thread under SCHED_RR at priority ${priority}` };
}

export function registerRealtimeMetrics(registry: Registry, report: RealtimeReport): void {
  registerStateGauge(
    registry,
    'sockpool_realtime',
    "The daemon's main thread under SCHED_RR (realtimePriority): 1 for its state.",
    STATES,
    report.state,
  );
}
