// CPU control groups for a benchmark's parties, as systemd arranges them on a real host: a service in a cgroup of
// its own (sockpoold.service), each user's processes in one group per uid (user-UID.slice), all with the same
// weight. The kernel's fair scheduler then shares the cores between the groups, not between processes: a uid that
// starts many processes gets one group's share, not one share per process. Without groups, this VM's autogroup
// scheduling makes every session a group of its own instead (a hostile uid could take a share per session).
//
// Root only. cgroup v2 (`cpu` in /sys/fs/cgroup/cgroup.controllers) or the v1 `cpu` hierarchy (/sys/fs/cgroup/cpu,
// as on this VM's hybrid layout). Groups are made under one parent named for this process and removed by `close`.
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export class CpuGroups {
  readonly #root: string;
  readonly #parent: string;
  readonly #groups: string[] = [];

  private constructor(root: string, parent: string) {
    this.#root = root;
    this.#parent = parent;
  }

  /** Makes the parent group; throws with the reason when this machine cannot (not root, no cpu controller). */
  static create(name: string): CpuGroups {
    if (process.getuid?.() !== 0) throw new Error('CPU groups need root (they write to /sys/fs/cgroup)');
    const v2 = '/sys/fs/cgroup';
    const v1 = '/sys/fs/cgroup/cpu';
    let root: string;
    if (existsSync(join(v2, 'cgroup.controllers'))) {
      if (!readFileSync(join(v2, 'cgroup.controllers'), 'utf8').split(/\s+/).includes('cpu')) {
        throw new Error('cgroup v2 without the cpu controller');
      }
      root = v2;
    } else if (existsSync(join(v1, 'cpu.shares'))) {
      root = v1;
    } else {
      throw new Error('no cpu cgroup controller (neither cgroup v2 with cpu nor /sys/fs/cgroup/cpu)');
    }
    const parent = join(root, `${name}-${process.pid}`);
    mkdirSync(parent);
    // v2: the children may only use the cpu controller if the parent hands it down.
    if (root === v2) writeFileSync(join(parent, 'cgroup.subtree_control'), '+cpu');
    return new CpuGroups(root, parent);
  }

  /**
   * A group with systemd's `CPUWeight=` `weight` (1–10000; 100, the default, is what systemd gives every unit and
   * user slice): v2 cpu.weight, v1 cpu.shares (1024 for 100, as systemd converts it).
   */
  group(name: string, weight = 100): string {
    const path = join(this.#parent, name);
    mkdirSync(path);
    this.#groups.push(path);
    if (this.#root.endsWith('/cpu')) writeFileSync(join(path, 'cpu.shares'), String(Math.round((weight * 1024) / 100)));
    else writeFileSync(join(path, 'cpu.weight'), String(weight));
    return path;
  }

  /**
   * Lets `group`'s processes run under a real-time policy (SCHED_RR, as `CPUSchedulingPolicy=rr` would) for up to
   * `share` of each period. With the v1 hierarchy's RT group scheduling (this VM) a group has no real-time budget
   * until given one, and sched_setscheduler fails with EPERM; the parent's budget must cover the child's. cgroup v2
   * has no per-group real-time budget (only the kernel-wide throttle): nothing to do there.
   */
  realtimeBudget(group: string, share: number): void {
    if (!this.#root.endsWith('/cpu')) return;
    const period = Number(readFileSync(join(group, 'cpu.rt_period_us'), 'utf8'));
    const runtime = String(Math.floor(period * share));
    writeFileSync(join(this.#parent, 'cpu.rt_runtime_us'), runtime);
    writeFileSync(join(group, 'cpu.rt_runtime_us'), runtime);
  }

  /** Moves a process (all its threads) into `group`; what it starts afterwards starts there too. */
  move(group: string, pid: number): void {
    writeFileSync(join(group, 'cgroup.procs'), String(pid));
  }

  /**
   * A command prefix that moves the command's own process into `group` before it runs (`sh` writes its pid, then
   * execs the command in place), so nothing it does runs outside the group. The process must be allowed to write
   * the group's cgroup.procs: root's, such as the daemon.
   */
  wrap(group: string): string[] {
    return ['sh', '-c', 'echo $$ > "$0" && exec "$@"', join(group, 'cgroup.procs')];
  }

  /** Moves whatever is left back to the root group and removes the groups. */
  close(): void {
    for (const group of [...this.#groups, this.#parent]) {
      try {
        const pids = readFileSync(join(group, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean);
        for (const pid of pids) {
          try {
            writeFileSync(join(this.#root, 'cgroup.procs'), pid);
          } catch {
            // Ended meanwhile.
          }
        }
        rmdirSync(group);
      } catch {
        // Already gone, or a process could not be moved out: the group stays until it empties (harmless).
      }
    }
  }
}
