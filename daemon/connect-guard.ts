// The daemon's kernel backstop for "a lent socket connects nowhere else" (docs/security.md). A client holding a lease
// has its own copy of the socket: it can reset the connection through it (`connect()` with AF_UNSPEC) and connect
// that socket again, to any address the daemon's network reaches, the policy's refusals included. The daemon cannot
// forbid a syscall on another process's copy; the kernel can. cgroup BPF programs on connect4 and connect6 run for
// every connect() of a socket created in the cgroup they are attached to, whoever holds it: attached to the daemon's
// own cgroup, they refuse (EPERM) every connect() of a socket the daemon registered. The addon registers each socket
// the moment the daemon's own connect() has started (connectStart), both ends of the TLS relays' loopback pairs, and
// (daemon.ts) sockets taken back from systemd's fd store. Registration lives on the socket (socket storage), so it
// ends with the socket and costs one bpf() call per connection, none per handoff. The programs run for sockets
// created in the cgroup attached to at start (or below it): a daemon moved elsewhere afterwards makes sockets they
// do not cover. The programs leave storage on every socket whose connect() they see, and connectStart registers only
// a socket that has it, so the connector asks native.guardCovers (one more bpf() per connect, only where the guard
// is enforced) before a socket's release check may trust the guard (lease-guard's UsageMark.reconnectRefused).
//
// Needs CAP_BPF and CAP_NET_ADMIN to set up (root, or the unit's AmbientCapabilities=); a registration afterwards
// needs none. Without them the guard is `unsupported` and everything else works as before: the lease's end still
// shuts the socket down and a release of a reconnected socket is refused (docs/security.md).
//
// Applied by the sockpoold command (command.ts) before the daemon starts. A Sockpoold embedded in another program
// (the tests) has no guard: attaching programs to the embedding program's cgroup is that program's decision.
//
// Then the command drops CAP_BPF, and CAP_NET_ADMIN unless a policy sets `mark` (SO_MARK needs it): nothing else
// the daemon does needs them. Capabilities are per thread: threads that exist already (V8's, no code of ours) keep
// theirs, as with the bind restriction.
//
// fd ownership: the guard's map and links are the addon's until the process exits (native/sockpool_native.cc); the
// self-check's sockets are closed there.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Counter, type Registry } from 'prom-client';
import * as native from '../shared/native.js';
import type { SockpoolConfig } from './config.js';
import { registerStateGauge } from './metrics.js';

export interface ConnectGuardReport {
  /**
   * enforced: attached, and the self-check's reconnect was refused; unsupported: no privilege (or a system call
   * filter refused bpf()), no cgroup v2, or a kernel without what the guard needs; off: `connectGuard = false`;
   * failed: set up, but the self-check's reconnect went through (or failed some other way).
   */
  state: 'enforced' | 'unsupported' | 'off' | 'failed';
  /** The cgroup v2 directory the programs are attached to. */
  cgroup?: string;
  detail?: string;
}

/** A Sockpoold embedded in another program: the process entry point did not run (see the header). */
export const EMBEDDED_UNGUARDED: ConnectGuardReport = {
  state: 'off',
  detail: 'embedded: no guard set up by sockpoold',
};

const CAP_NET_ADMIN = 12;
const CAP_BPF = 39;

export function startConnectGuard(enabled: boolean): ConnectGuardReport {
  if (!enabled) return { state: 'off', detail: 'connectGuard = false' };
  const cgroup = ownCgroupDirectory();
  if (cgroup === undefined) return { state: 'unsupported', detail: 'this process is in no cgroup v2 hierarchy' };
  let check: string | null;
  try {
    check = native.startConnectGuard(cgroup);
  } catch (error) {
    const failure = error as Error & { code?: string };
    if (failure.code === 'EPERM' || failure.code === 'EACCES') {
      return {
        state: 'unsupported',
        cgroup,
        detail: `${failure.message}: needs CAP_BPF and CAP_NET_ADMIN (root, or the unit's AmbientCapabilities=), and bpf() let through by any system call filter`,
      };
    }
    if (failure.code === 'EINVAL' || failure.code === 'ENOSYS' || failure.code === 'EOPNOTSUPP') {
      return { state: 'unsupported', cgroup, detail: `this kernel refused the guard: ${failure.message}` };
    }
    return { state: 'failed', cgroup, detail: failure.message };
  }
  if (check === 'EPERM') return { state: 'enforced', cgroup, detail: 'self-check: a reconnect was refused' };
  return {
    state: 'failed',
    cgroup,
    detail:
      check === null
        ? 'self-check: a registered socket connected again'
        : `self-check: the reconnect failed with ${check}`,
  };
}

/**
 * Drops what the guard's set-up needed and the daemon does not need again. `keepNetAdmin`: some policy sets `mark`.
 * Harmless where the process never had them.
 */
export function dropGuardCapabilities(keepNetAdmin: boolean): void {
  native.dropCapabilities(keepNetAdmin ? [CAP_BPF] : [CAP_BPF, CAP_NET_ADMIN]);
}

/**
 * The cgroup v2 directory of this process: its `0::` line in /proc/self/cgroup under the cgroup2 mount point
 * (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host).
 */
export function ownCgroupDirectory(): string | undefined {
  const line = readFileSync('/proc/self/cgroup', 'utf8')
    .split('\n')
    .find((entry) => entry.startsWith('0::'));
  if (line === undefined) return undefined;
  // mountinfo: "id parent major:minor root mountpoint options ... - fstype source superoptions"
  const mount = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((entry) => entry.split(' '))
    .find((fields) => fields[fields.indexOf('-') + 1] === 'cgroup2');
  const mountPoint = mount?.[4];
  if (mountPoint === undefined) return undefined;
  return join(mountPoint, line.slice(3));
}

/** Whether any origin policy sets `mark` (SO_MARK), which needs CAP_NET_ADMIN at every connect. */
export function policiesSetMarks(config: SockpoolConfig): boolean {
  return config.pool.defaults.mark !== undefined || config.pool.origins.some((origin) => origin.mark !== undefined);
}

const STATES: ConnectGuardReport['state'][] = ['enforced', 'unsupported', 'off', 'failed'];

/**
 * `sockpool_connect_guard{state}`: 1 for the guard's state, 0 for the others (an alert asks for "enforced"); and the
 * counter of sockets connected that the guard does not cover, returned for the daemon to count them (the state reads
 * `enforced` all the same: an alert on it alone would not see them).
 */
export function registerConnectGuardMetrics(registry: Registry, report: ConnectGuardReport): Counter {
  registerStateGauge(
    registry,
    'sockpool_connect_guard',
    "The kernel's refusal of any connect() of a socket the daemon connected (cgroup BPF): 1 for its state.",
    STATES,
    report.state,
  );
  return new Counter({
    name: 'sockpool_connect_guard_uncovered_connects_total',
    help: 'Sockets the daemon connected while its guard was enforced that the guard does not cover (the daemon moved out of the cgroup it attached to): their lent copies can connect elsewhere until their lease ends.',
    registers: [registry],
  });
}
