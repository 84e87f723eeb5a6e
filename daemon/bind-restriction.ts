// The daemon's own kernel backstop for "sockpoold binds no IP port" (docs/security.md). With Landlock's network
// rules (Linux 6.7 and later) the process allows itself TCP binds to two ports only: 0, an ephemeral port the kernel
// picks (the warm TLS relay's loopback pairs, a `sourceAddress` for connects), and `metricsPort` when it is set.
// The unit's `SocketBindDeny=any` says the same, but only a systemd built with its BPF framework enforces it
// (Debian 12's is not); Landlock needs no privilege and no systemd, so it holds for a daemon started by hand too.
//
// Applied by the sockpoold command (command.ts) before the daemon starts, so that the threads the daemon starts (the
// history's checkpointer, the TLS relays, libuv's thread pool) inherit it. Landlock restricts the calling thread and
// what it starts afterwards: threads Node started before (V8's platform threads, which run no code of ours) are not
// restricted. A Sockpoold embedded in another program (the tests) is left alone: the restriction is process-wide
// policy, the embedding program's to decide.
//
// A self-check shows the kernel enforcing it: a port the kernel has just handed out (bound to port 0, then closed)
// is bound again by its number, which must be refused with EACCES.
//
// fd ownership: the self-check's two sockets are closed here.

import type { Registry } from 'prom-client';
import * as native from '../shared/native.js';
import { registerStateGauge } from './metrics.js';

export interface BindRestrictionReport {
  /**
   * enforced: in force, and the self-check was refused; unsupported: this kernel's Landlock has no network rules
   * (or no Landlock at all); off: `restrictBind = false`; unverified: in force, but the self-check could not tell
   * (its port was taken meanwhile); failed: the restriction could not be applied, or a bind it should refuse passed.
   */
  state: 'enforced' | 'unsupported' | 'off' | 'unverified' | 'failed';
  /** The kernel's Landlock ABI version (0: none). */
  abi: number;
  /** The ports binds are allowed to (empty unless applied). */
  allowedPorts: number[];
  detail?: string;
}

/** A Sockpoold embedded in another program: the process entry point did not run (see the header). */
export const EMBEDDED_UNRESTRICTED: BindRestrictionReport = {
  state: 'off',
  abi: 0,
  allowedPorts: [],
  detail: 'embedded: not restricted by sockpoold',
};

export function restrictBinds(enabled: boolean, metricsPort: number): BindRestrictionReport {
  if (!enabled) return { state: 'off', abi: 0, allowedPorts: [], detail: 'restrictBind = false' };
  const allowedPorts = metricsPort > 0 ? [0, metricsPort] : [0];
  let result: native.BindRestriction;
  try {
    result = native.restrictTcpBind(allowedPorts);
  } catch (error) {
    return { state: 'failed', abi: 0, allowedPorts: [], detail: (error as Error).message };
  }
  if (!result.applied) {
    return {
      state: 'unsupported',
      abi: result.abi,
      allowedPorts: [],
      detail: result.blocked
        ? 'a system call filter refused the Landlock calls (allow landlock_create_ruleset, landlock_add_rule, landlock_restrict_self)'
        : result.abi === 0
          ? 'the kernel has no Landlock, or it is not enabled'
          : `Landlock ABI ${result.abi} has no network rules (ABI 4, Linux 6.7)`,
    };
  }
  return { ...selfCheck(), abi: result.abi, allowedPorts };
}

const STATES: BindRestrictionReport['state'][] = ['enforced', 'unsupported', 'off', 'unverified', 'failed'];

/**
 * `sockpool_bind_restriction{state}`: 1 for the state the daemon is in, 0 for the others, so that an alert can ask
 * for `state="enforced"`.
 */
export function registerBindRestrictionMetrics(registry: Registry, report: BindRestrictionReport): void {
  registerStateGauge(
    registry,
    'sockpool_bind_restriction',
    "The daemon's own TCP bind restriction (Landlock): 1 for its state.",
    STATES,
    report.state,
  );
}

/** Binds a port the kernel just handed out, by number: the restriction must refuse it. */
function selfCheck(): Pick<BindRestrictionReport, 'state' | 'detail'> {
  let port: number;
  const first = native.tcpSocket(4);
  try {
    native.bindAddress(first, '127.0.0.1', 0);
    port = native.localAddress(first).port;
  } catch (error) {
    return { state: 'unverified', detail: `self-check: no ephemeral port (${(error as Error).message})` };
  } finally {
    native.close(first);
  }
  const second = native.tcpSocket(4);
  try {
    native.bindAddress(second, '127.0.0.1', port);
    return { state: 'failed', detail: `self-check: a bind to 127.0.0.1:${port} was not refused` };
  } catch (error) {
    const code = (error as { code?: string }).code;
    if (code === 'EACCES') return { state: 'enforced', detail: `self-check: a bind to port ${port} was refused` };
    return { state: 'unverified', detail: `self-check: the bind to port ${port} failed with ${code}` };
  } finally {
    native.close(second);
  }
}
