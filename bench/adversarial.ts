// Honest latency beside hostile clients (issue 10): an honest SockpoolClient (threads: 0, 4 requests in flight)
// fetches from a loopback HTTP origin through sockpoold, in rounds that alternate between a quiet daemon and one
// that hostile client processes (test/fixtures/hostile-client.mjs) attack at the same time: write-then-release,
// closed-while-keeping-the-fd, prewarm floods, garbage with fds, and a flood of sessions. Run as root, the hostile
// processes are another uid (nobody), as on a shared host; otherwise the same uid (then the per-uid quotas they hit
// are the honest client's too, and the run says so).
//
//   npm run build && node dist/bench/adversarial.js [--rounds N] [--requests N]
//
// Prints p50/p99 of the honest requests in each phase and the ratio hostile/quiet (the aim: p99 within 2x). Every
// honest answer is checked: a body that is not the request's own path fails the run.
//
// Where the time goes, per phase: the honest latency split into the acquire (the daemon's answer, as the client
// saw it) and the rest (curl and the HTTP exchange with the origin), and the CPU each party used: the daemon, this
// process (the honest client), the origin, the hostile processes (and their launcher), and the whole machine (/proc/stat: other users of the cores included). `--hostile-nice N` runs the hostile
// processes at that nice level: what is left of the gap then is the work they cause, not their own CPU.
// `--fresh`: every honest request asks for `connection: close`, so each takes a new lease through the daemon
// (otherwise curl keeps its connection and most honest requests never reach the daemon).
// `--pin` and `--cpu-groups` (root) place the parties on the cores as a real host would (see each option below).
// The origin is a process of its own (lib/echo-origins.ts: nginx, or with `--origin node` Node's http server),
// standing for a remote host: the honest and the hostile clients' requests all go to it, as to one shared site.
// The hostile processes are started by a launcher process, never by this one (see startLauncher). Each repeats its
// attack until the phase ends, and a hostile phase is measured from when every one of them has started: a round's
// phase lasts a fraction of a second, shorter than five Node start-ups on the daemon's core, so a phase measured
// from their spawn measured those start-ups more than the attack.
// `--control`: the same run with no hostile process in the "hostile" phases either (an A/A run): how far the ratio
// strays from 1 on this machine with no attack at all, the noise any attack's ratio is read against.
// `--rate N`: the honest client sends N requests a second on a fixed schedule (an open loop, as an API caller's
// traffic arrives) instead of 4 in flight back to back (a closed loop that runs the daemon as fast as it answers,
// where any other load on its core turns into queueing).
// `--modes a,b`: only those hostile modes. `--daemon-main PATH` and `--daemon-node-args 'FLAGS'`: another build's
// daemon (A/B runs of a daemon change with the same benchmark), Node flags for the daemon (a profile).

import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { SockpoolClient } from '../client/client.js';
import type { LauncherSettings } from './fixtures/hostile-launcher.js';
import { option, optionText } from './lib/args.js';
import { CpuGroups } from './lib/cpu-groups.js';
import { type BenchDaemon, repoRoot, startBenchDaemon } from './lib/daemon.js';
import { type EchoOrigin, type EchoOriginKind, nginxInstalled, startEchoOrigin } from './lib/echo-origins.js';
import { type BenchChild, cpuTimeMs, spawnChild } from './lib/proc.js';
import { runBench } from './lib/run.js';
import { median, round, Samples, summarize, table } from './lib/stats.js';

const rounds = option('--rounds', 6);
const requestsPerRound = option('--requests', 1_000);
/**
 * Quiet requests before the measured rounds, for at least this long (s). In A/A runs (--control) the honest p99 of
 * both phases was 2-10x higher and jumped from round to round for about the first 30 s of the run (the cause was not
 * found), and a ratio over those rounds measured that noise more than the attack (A/A ratios up to 2.2x); a
 * long-running daemon is past it.
 */
const warmUpSeconds = option('--warm-up-s', 30);
const hostileNice = option('--hostile-nice', 0);
/**
 * `--modes a,b`: only these hostile modes (write-release, closed-keep, prewarm, garbage, sessions; all by default),
 * to tell which of them an honest tail comes from.
 */
const hostileModes = optionText('--modes')?.split(',');
for (const mode of hostileModes ?? []) {
  if (!['write-release', 'closed-keep', 'prewarm', 'garbage', 'sessions'].includes(mode)) {
    throw new Error(`--modes: unknown hostile mode ${mode}`);
  }
}
/** `--daemon-main PATH`: another build's daemon/main.js (A/B runs of a daemon change against the same benchmark). */
const daemonMain = optionText('--daemon-main');
/** `--daemon-node-args 'FLAGS'`: Node flags for the daemon (e.g. `--cpu-prof --cpu-prof-dir DIR`), space-separated. */
const daemonNodeArgs = optionText('--daemon-node-args')?.split(' ').filter(Boolean);
/** Every honest request on a fresh lease (`connection: close`): each one goes through the daemon's acquire. */
const fresh = process.argv.includes('--fresh');
const control = process.argv.includes('--control');
/** Honest requests a second, sent on a schedule whatever the answers (0: a closed loop of `inFlight`). */
const rate = option('--rate', 0);
/**
 * The hostile processes run in sessions of their own (setsid), as processes of other services and users do on a
 * shared host. With the kernel's autogroup scheduling (sched_autogroup_enabled, on by default on desktops and this
 * VM) a session is one scheduling group: hostile processes started in this benchmark's own session would split the
 * honest client's CPU share among themselves, whatever the daemon does. `--same-session` starts them that way
 * (and the daemon too, which otherwise runs in a session of its own, as the system service it is).
 */
const ownSessions = !process.argv.includes('--same-session');
/**
 * `--pin`: the honest side (this process: the honest client) on CPU 0, the daemon and every hostile process on
 * CPU 1. The hostile processes can then take no CPU from the honest client itself, only from the daemon that serves
 * both, as on a host where the honest service has cores of its own: what is left of the gap is what the attack
 * costs through the daemon.
 */
const pin = process.argv.includes('--pin');
const onDaemonCpu = pin ? ['taskset', '-c', '1'] : [];
/**
 * `--origin-cpu N` (with --pin; default 0, the honest side's core): where the origin runs. It stands for a remote
 * host, which this machine has no core for: on either core it shares a CPU with someone, and every connection a
 * hostile client has the daemon open to it costs it an accept and a parser there.
 */
const originCpu = option('--origin-cpu', 0);
/**
 * `--origin nginx|node` (default nginx when it is installed). Node's server spends a few hundred µs of its one event
 * loop on each connection it accepts: in keep-alive runs the hostile clients' connects (about 200 a second) then
 * queued the honest requests behind them at the origin, a p99 of 5-7 ms against 1 ms quiet, with no honest acquire
 * reaching the daemon (docs/benchmarks.md, nineteenth session). nginx, as a remote site would, accepts them in µs.
 */
const originKind = (optionText('--origin') ?? (nginxInstalled() ? 'nginx' : 'node')) as EchoOriginKind;
if (originKind !== 'nginx' && originKind !== 'node') throw new Error('--origin is nginx or node');
const onOriginCpu = pin ? ['taskset', '-c', String(originCpu)] : [];
/**
 * `--cpu-groups` (root): each party in a CPU control group of its own, as systemd runs them on a shared host: the
 * daemon as its service (at the unit's CPUWeight), the honest side as another and every hostile process in one
 * group for their uid (user-65534.slice), both at the default weight. The cores are then shared between the three
 * groups, however many processes the hostile uid starts (bench/lib/cpu-groups.ts).
 */
const cpuGroups = process.argv.includes('--cpu-groups') ? CpuGroups.create('sockpool-adversarial') : undefined;
const honestGroup = cpuGroups?.group('honest');
/** The daemon group's weight: the shipped unit's `CPUWeight=` (systemd/sockpoold.service) unless `--daemon-weight`. */
const unitCpuWeight = Number(
  /^CPUWeight=(\d+)$/m.exec(readFileSync(join(repoRoot, 'systemd', 'sockpoold.service'), 'utf8'))?.[1] ?? 100,
);
const daemonWeight = option('--daemon-weight', unitCpuWeight);
const daemonGroup = cpuGroups?.group('daemon', daemonWeight);
const hostileGroup = cpuGroups?.group('hostile');
/**
 * `--daemon-rt` (with --cpu-groups): the daemon's main thread under SCHED_RR priority 1 (`realtimePriority = 1`,
 * daemon/realtime.ts): a woken daemon then preempts the hostile processes on its core at once instead of waiting for
 * the end of their slice. Its group gets a real-time budget of 90% (bench/lib/cpu-groups.ts).
 */
const daemonRealtime = process.argv.includes('--daemon-rt');
if (daemonRealtime && !daemonGroup) throw new Error('--daemon-rt needs --cpu-groups');
if (daemonRealtime) cpuGroups!.realtimeBudget(daemonGroup!, 0.9);
/** The origin in a group of its own too: a remote host's work is nobody's share on this one. */
const originGroup = cpuGroups?.group('origin');
const inFlight = 4;
const hostileUid = process.getuid?.() === 0 ? 65534 : undefined;
const hostileClient = join(repoRoot, 'test', 'fixtures', 'hostile-client.mjs');

/** Busy CPU time (ms) of the whole machine, all cores, from /proc/stat (everything but idle and iowait). */
function machineBusyMs(): number {
  const [, ...ticks] = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/);
  const values = ticks.map(Number);
  const busy = values.reduce((sum, value) => sum + value, 0) - values[3]! - values[4]!;
  return (busy * 1000) / 100;
}

interface CpuMark {
  at: number;
  daemon: number;
  self: number;
  origin: number;
  /** Connections the origin accepted so far (the daemon's connects for every client). */
  originConnections: number;
  hostile: number;
  machine: number;
}

async function cpuMark(): Promise<CpuMark> {
  const { ms: hostile } = await launcherCommand<{ ms: number }>({ t: 'cpu' });
  const accepted = await origin!.accepted();
  const self = process.cpuUsage();
  return {
    at: performance.now(),
    daemon: cpuTimeMs(daemon!.pid),
    self: (self.user + self.system) / 1000,
    origin: cpuTimeMs(origin!.pid),
    originConnections: accepted,
    hostile,
    machine: machineBusyMs(),
  };
}

/** CPU used between marks, summed over phases, in ms; and the connections the origin accepted. */
class CpuTally {
  wallMs = 0;
  daemon = 0;
  self = 0;
  origin = 0;
  originConnections = 0;
  hostile = 0;
  machine = 0;
  add(from: CpuMark, to: CpuMark): void {
    this.wallMs += to.at - from.at;
    this.originConnections += to.originConnections - from.originConnections;
    this.daemon += to.daemon - from.daemon;
    this.self += to.self - from.self;
    this.origin += to.origin - from.origin;
    this.hostile += to.hostile - from.hostile;
    this.machine += to.machine - from.machine;
  }
}

/** " (N ended by themselves and were started again: MODE exit CODE ×N, …)", or nothing. */
function describeEndedEarly(endedEarly: Record<string, number>): string {
  const entries = Object.entries(endedEarly);
  if (entries.length === 0) return '';
  const total = entries.reduce((sum, [, count]) => sum + count, 0);
  return ` (${total} ended by themselves and were started again: ${entries.map(([what, count]) => `${what} ×${count}`).join(', ')})`;
}

function log(text: string): void {
  process.stderr.write(`${text}\n`);
}

let daemon: BenchDaemon | undefined;
let client: SockpoolClient | undefined;
let origin: EchoOrigin | undefined;
const dir = mkdtempSync(join(os.tmpdir(), 'sockpool-adversarial-'));
/**
 * The hostile processes are started by a launcher process (fixtures/hostile-launcher.ts), not by this one: a spawn
 * forks the process it is called in, and this one is the honest side being measured (see the launcher's header).
 * The launcher runs where the hostile processes run (the daemon's CPU with --pin, the hostile CPU group).
 */
let launcher: BenchChild | undefined;

function startLauncher(): BenchChild {
  const settings: LauncherSettings = {
    hostileClient,
    prefix: onDaemonCpu,
    nice: hostileNice,
    ownSessions,
    uid: hostileUid,
    modes: hostileModes,
  };
  return spawnChild(
    [process.execPath, join(repoRoot, 'dist', 'bench', 'fixtures', 'hostile-launcher.js'), JSON.stringify(settings)],
    { wrap: [...(hostileGroup ? cpuGroups!.wrap(hostileGroup) : []), ...onDaemonCpu], ownSession: ownSessions },
  );
}

/** One command to the launcher, and its answer. */
async function launcherCommand<T>(message: object): Promise<T> {
  launcher!.send(JSON.stringify(message));
  return launcher!.nextMessage<T>();
}

async function main(): Promise<void> {
  // Every thread of this process (the honest client runs with threads: 0, but libuv and V8 have threads too).
  if (pin) execFileSync('taskset', ['-apc', '0', String(process.pid)], { stdio: 'ignore' });
  if (honestGroup) cpuGroups!.move(honestGroup, process.pid);
  launcher = startLauncher();
  origin = await startEchoOrigin(originKind, {
    wrap: [...(originGroup ? cpuGroups!.wrap(originGroup) : []), ...onOriginCpu],
    ownSession: ownSessions,
    dir,
    repoRoot,
  });
  const { port } = origin;
  daemon = await startBenchDaemon({
    dir,
    config: {
      access: { socketMode: '0666' },
      pool: { defaults: { minIdle: 8, maxIdle: 32 } },
      ...(daemonRealtime ? { realtimePriority: 1 } : {}),
    },
    args: ['--allow', '127.0.0.1/32', '--allow-port', String(port)],
    ...(daemonMain ? { main: daemonMain } : {}),
    ...(daemonNodeArgs ? { nodeArgs: daemonNodeArgs } : {}),
    // As a system service: a CPU share of its own, not a part of this benchmark's (see ownSessions).
    ownSession: ownSessions,
    ...(pin || daemonGroup ? { wrap: [...(daemonGroup ? cpuGroups!.wrap(daemonGroup) : []), ...onDaemonCpu] } : {}),
  });
  chmodSync(dir, 0o755);
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
  if (daemonRealtime) {
    // A refused policy (no budget, a filter) would make this run a run without it: say so and stop.
    const { realtime } = (await client.stats()) as { realtime: { state: string; detail: string } };
    if (realtime.state !== 'on')
      throw new Error(`--daemon-rt: the daemon's policy is ${realtime.state}: ${realtime.detail}`);
  }
  const originUrl = `http://127.0.0.1:${port}`;
  let next = 0;
  const request = async (samples: PhaseSamples) => {
    const path = `/honest-${next++}`;
    const started = performance.now();
    const response = await client!.request(`${originUrl}${path}`, fresh ? { headers: { connection: 'close' } } : {});
    const totalMs = performance.now() - started;
    samples.total.push(totalMs * 1000);
    samples.acquire.push(response.timings.acquireMs * 1000);
    samples.rest.push((totalMs - response.timings.acquireMs) * 1000);
    // A lease this request asked for: warm from the pool, or connected for it (a miss).
    if (response.timings.acquireMs > 0) {
      samples.leases++;
      if (response.warm) samples.warmLeases++;
    }
    if (response.status !== 200 || response.body.toString() !== path) {
      throw new Error(`honest request ${path} got ${response.status} ${JSON.stringify(response.body.toString())}`);
    }
  };
  const phase = async (samples: PhaseSamples) => {
    let issued = 0;
    const first = samples.total.length;
    const from = await cpuMark();
    if (rate > 0) {
      // Every request whose time has come goes out at each timer tick (timers are about 1 ms apart at best).
      const started = performance.now();
      const sent: Array<Promise<void>> = [];
      while (sent.length < requestsPerRound) {
        const due = Math.min(requestsPerRound, Math.floor(((performance.now() - started) * rate) / 1000) + 1);
        while (sent.length < due) sent.push(request(samples));
        if (sent.length < requestsPerRound) await new Promise((resolve) => setTimeout(resolve, 1000 / rate));
      }
      await Promise.all(sent);
    } else {
      await Promise.all(
        Array.from({ length: inFlight }, async () => {
          while (issued++ < requestsPerRound) await request(samples);
        }),
      );
    }
    samples.cpu.add(from, await cpuMark());
    samples.roundP99s.push(summarize(samples.total.values().subarray(first)).p99);
    samples.roundAcquireP99s.push(summarize(samples.acquire.values().subarray(first)).p99);
  };
  log(
    `warm-up (${warmUpSeconds} s); hostile clients run as ${hostileUid === undefined ? 'this uid' : `uid ${hostileUid}`}`,
  );
  const warmUpUntil = performance.now() + warmUpSeconds * 1000;
  do await phase(new PhaseSamples());
  while (performance.now() < warmUpUntil);
  const quiet = new PhaseSamples();
  const hostile = new PhaseSamples();
  let spawnsSoFar = 0;
  /** Hostile processes that ended by themselves (and were started again), by mode and exit code. */
  let endedEarly: Record<string, number> = {};
  const socketPath = daemon.socketPath;
  const attacked = async () => {
    const spawnsBefore = spawnsSoFar;
    if (!control) await launcherCommand({ t: 'start', socket: socketPath, port });
    await phase(hostile);
    if (!control) {
      ({ spawns: spawnsSoFar, endedEarly } = await launcherCommand<{
        spawns: number;
        endedEarly: Record<string, number>;
      }>({ t: 'stop' }));
    }
    hostile.spawns += spawnsSoFar - spawnsBefore;
  };
  // The two phases take turns going first (quiet first in even rounds, attacked first in odd ones), so that an effect
  // of the order (what the phase before left behind: a drained pool, deferred work) cannot count as the attack's.
  for (let i = 0; i < rounds; i++) {
    if (i % 2 === 0) {
      await phase(quiet);
      await attacked();
    } else {
      await attacked();
      await phase(quiet);
    }
    log(`round ${i + 1}/${rounds} done`);
  }
  const ms = (us: number) => String(round(us / 1000, 2));
  const rows = [
    ['phase', 'requests', 'p50 ms', 'p99 ms', 'max ms', 'acquire p50', 'acquire p99', 'rest p50', 'rest p99'],
  ];
  for (const [name, samples] of [
    ['quiet', quiet],
    ['hostile', hostile],
  ] as const) {
    const total = summarize(samples.total.values());
    const acquire = summarize(samples.acquire.values());
    const rest = summarize(samples.rest.values());
    rows.push([
      name,
      String(total.count),
      ms(total.p50),
      ms(total.p99),
      ms(total.max),
      ms(acquire.p50),
      ms(acquire.p99),
      ms(rest.p50),
      ms(rest.p99),
    ]);
  }
  console.log(table(rows));
  const perRound = (values: number[]) => values.map((us) => ms(us)).join(', ');
  console.log(`p99 per round, ms: quiet ${perRound(quiet.roundP99s)}; hostile ${perRound(hostile.roundP99s)}`);
  console.log(
    `acquire p99 per round, ms: quiet ${perRound(quiet.roundAcquireP99s)}; hostile ${perRound(hostile.roundAcquireP99s)}`,
  );
  // Beside the pooled ratio below: one round of either phase whose tail the machine stretched (a stall of the shared
  // core) moves a pooled p99 over all rounds, but only its own pair's ratio here (as issue 14's aims take the median
  // of paired rounds).
  const pairRatios = hostile.roundP99s.map((us, i) => us / quiet.roundP99s[i]!);
  console.log(
    `p99 ratio per pair of rounds (hostile / quiet): ${pairRatios.map((v) => v.toFixed(2)).join(', ')}; ` +
      `median ${median(pairRatios).toFixed(2)}`,
  );
  // CPU as a share of one core over the phase's wall time (2 cores = 200%).
  const share = (cpuMs: number, tally: CpuTally) => `${round((100 * cpuMs) / tally.wallMs, 0)}%`;
  const cpuRows = [
    [
      'phase',
      'wall s',
      'daemon',
      'honest client',
      'origin',
      'hostile processes',
      'whole machine',
      'honest leases warm',
      'origin accepts/s',
    ],
  ];
  for (const [name, samples] of [
    ['quiet', quiet],
    ['hostile', hostile],
  ] as const) {
    const cpu = samples.cpu;
    cpuRows.push([
      name,
      String(round(cpu.wallMs / 1000, 1)),
      share(cpu.daemon, cpu),
      share(cpu.self, cpu),
      share(cpu.origin, cpu),
      share(cpu.hostile, cpu),
      share(cpu.machine, cpu),
      `${samples.warmLeases}/${samples.leases}`,
      String(round((1000 * cpu.originConnections) / cpu.wallMs, 0)),
    ]);
  }
  console.log(table(cpuRows));
  const q = summarize(quiet.total.values());
  const h = summarize(hostile.total.values());
  console.log(
    `p50 ratio ${round(h.p50 / q.p50, 2)}, p99 ratio ${round(h.p99 / q.p99, 2)} (aim: p99 within 2x); ` +
      `every honest answer was its own (${q.count + h.count} checked); ` +
      `${control ? 'control run: no hostile process in either phase' : `${hostile.spawns} hostile processes started${describeEndedEarly(endedEarly)}`}` +
      `${hostileNice > 0 ? ` at nice ${hostileNice}` : ''}${hostileModes ? ` (modes: ${hostileModes.join(', ')})` : ''}${fresh ? '; a fresh lease per honest request' : ''}${rate > 0 ? `; honest requests at ${rate}/s (open loop)` : `; ${inFlight} honest requests in flight (closed loop)`}${ownSessions ? '' : '; hostile processes in this session'}${pin ? `; honest side on CPU 0, daemon and hostile processes on CPU 1, origin (${originKind}) on CPU ${originCpu}` : `; origin: ${originKind}`}${cpuGroups ? `; honest side, daemon, hostile uid and origin in one CPU group each (daemon weight ${daemonWeight}${daemonRealtime ? ', its main thread SCHED_RR' : ''}, the others 100)` : ''}; load average ${os.loadavg()[0]!.toFixed(1)} on ` +
      `${os.cpus().length} cores`,
  );
}

/** One phase's honest latencies (µs): whole request, the acquire part, the rest; and the CPU it used. */
class PhaseSamples {
  total = new Samples();
  acquire = new Samples();
  rest = new Samples();
  cpu = new CpuTally();
  spawns = 0;
  leases = 0;
  warmLeases = 0;
  /** Each round's p99 of the whole request and of its acquire (µs), in the order the rounds ran. */
  roundP99s: number[] = [];
  roundAcquireP99s: number[] = [];
}

runBench(
  main,
  async () => {
    await launcher?.stop();
    await client?.close();
    await daemon?.stop();
    await origin?.stop();
    rmSync(dir, { recursive: true, force: true });
    cpuGroups?.close();
  },
  log,
);
