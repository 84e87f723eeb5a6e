// What a connect costs the daemon: its CPU (every thread, from /proc, ns precision) and, with --strace, its syscalls
// per loopback connect, while it prewarms fresh origins. Each round starts a new set of origin ports (a tcp-sink
// process: accepts and holds every connection), prewarms every origin to `--per-origin` sockets (at most the pool's
// maxIdle, 16) and waits until the sink has accepted them all and the daemon has had 100 ms to finish with them (its
// mark, the idle watch after 50 ms). With `--compare MAIN` (another build's dist/daemon/main.js) both daemons run,
// the rounds taking turns, and the ratios are per paired round. The first round of each daemon is reported apart
// (cold code: a daemon's first thousand connects cost it several times the later ones). `--strace` adds one round
// per daemon under `strace -c` (root, or ptrace allowed): the syscalls of a socket's life in the pool, from its
// connect to its drop when the round's origins close.
//
//   npm run build:all && node dist/bench/connect.js [--rounds N] [--origins N] [--per-origin N]
//     [--compare OTHER/dist/daemon/main.js] [--strace]
//
// The daemons and the sinks are child processes; nothing is spawned from a measured process. Results go to
// bench/results/connect-<date>.json.

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { flag, option, optionText } from './lib/args.js';
import { type BenchDaemon, repoRoot, startBenchDaemon } from './lib/daemon.js';
import { BenchDaemonClient } from './lib/daemon-client.js';
import { formatJson, stamp } from './lib/json.js';
import { attachStrace, type SyscallCount, spawnChild, threadsCpuMs } from './lib/proc.js';
import { median, table } from './lib/stats.js';

const rounds = option('--rounds', 8);
const origins = option('--origins', 50);
const perOrigin = Math.min(16, option('--per-origin', 16));
const compareMain = optionText('--compare') === undefined ? undefined : resolve(optionText('--compare')!);
const strace = flag('--strace');
const connects = origins * perOrigin;
const fixtures = join(import.meta.dirname, 'fixtures');
const resultsDir = join(repoRoot, 'bench', 'results');

interface Subject {
  label: string;
  daemon: BenchDaemon;
  client: BenchDaemonClient;
  /** Per timed round: daemon CPU µs per connect, and ms from the prewarms to the last accept. */
  cpuUs: number[];
  wallMs: number[];
  coldCpuUs?: number;
  syscalls?: SyscallCount[];
}

const tmp = mkdtempSync(join(tmpdir(), 'sockpool-bench-connect-'));

async function startSubject(label: string, main?: string): Promise<Subject> {
  const daemon = await startBenchDaemon({
    dir: join(tmp, label),
    main,
    // Every port on loopback allowed (the sinks' ports are the kernel's choice), prewarms without the per-uid
    // allowance's bound, no warming of its own.
    config: {
      pool: { predictive: false, warmOnStartOrigins: 0 },
      egress: { allowPorts: [] },
      quotas: { maxPrewarmPerUid: 1_000_000 },
    },
    args: ['--allow', '127.0.0.0/8'],
  });
  const client = new BenchDaemonClient(daemon.socketPath);
  await client.hello();
  return { label, daemon, client, cpuUs: [], wallMs: [] };
}

/** One round for `subject`: fresh origins, each prewarmed; the daemon's CPU per connect and the round's wall time. */
async function round(subject: Subject): Promise<{ cpuUs: number; wallMs: number }> {
  const sink = spawnChild([process.execPath, join(fixtures, 'tcp-sink.js'), String(origins)]);
  try {
    const { ports } = await sink.nextMessage<{ ports: number[] }>((message) => Array.isArray(message.ports));
    const cpuBefore = threadsCpuMs(subject.daemon.pid);
    const started = performance.now();
    await Promise.all(ports.map((port) => subject.client.prewarm('127.0.0.1', port, perOrigin)));
    let accepted = 0;
    const deadline = started + 30_000;
    while (accepted < connects) {
      if (performance.now() > deadline)
        throw new Error(`${subject.label}: ${accepted} of ${connects} connects in 30 s`);
      sink.send('count');
      ({ accepted } = await sink.nextMessage<{ accepted: number }>((message) => message.accepted !== undefined));
      if (accepted < connects) await sleep(5);
    }
    const wallMs = performance.now() - started;
    // The daemon's own end of the last connects (the mark, the idle watch armed after 50 ms).
    await sleep(100);
    return { cpuUs: ((threadsCpuMs(subject.daemon.pid) - cpuBefore) * 1000) / connects, wallMs };
  } finally {
    // Its connections end with it: the daemon drops those idle sockets before the next round's are counted.
    await sink.stop();
    await sleep(300);
  }
}

const subjects = [await startSubject('this build')];
if (compareMain) subjects.push(await startSubject('compare build', compareMain));

for (const subject of subjects) subject.coldCpuUs = (await round(subject)).cpuUs;
for (let i = 0; i < rounds; i++) {
  const order = i % 2 === 0 ? subjects : [...subjects].reverse();
  for (const subject of order) {
    const { cpuUs, wallMs } = await round(subject);
    subject.cpuUs.push(cpuUs);
    subject.wallMs.push(wallMs);
  }
  process.stderr.write(`[progress] round ${i + 1}/${rounds}\n`);
}
if (strace) {
  for (const subject of subjects) {
    const detach = await attachStrace(subject.daemon.pid, join(tmp, `strace-${subject.label.replace(' ', '-')}`));
    await round(subject);
    subject.syscalls = await detach();
  }
}

for (const subject of subjects) {
  subject.client.close();
  await subject.daemon.stop();
}
rmSync(tmp, { recursive: true, force: true });

const fixed = (value: number, digits = 1) => value.toFixed(digits);
console.log(
  `\nDaemon CPU per loopback connect (prewarm of ${origins} fresh origins × ${perOrigin}, ${connects} connects a ` +
    `round; median of ${rounds} rounds after an untimed first one)\n`,
);
console.log(
  table([
    ['build', 'CPU µs/connect', 'per round', 'first round', 'round ms (median)'],
    ...subjects.map((subject) => [
      subject.label,
      fixed(median(subject.cpuUs)),
      subject.cpuUs.map((value) => fixed(value, 0)).join(' '),
      fixed(subject.coldCpuUs ?? Number.NaN, 0),
      fixed(median(subject.wallMs), 0),
    ]),
  ]),
);
if (subjects.length === 2) {
  const [mine, theirs] = subjects as [Subject, Subject];
  const ratios = mine.cpuUs.map((value, i) => value / theirs.cpuUs[i]!);
  console.log(
    `\nA/B, this ÷ compare build, CPU per connect per paired round: ${ratios.map((r) => fixed(r, 2)).join(' ')} ` +
      `(median ${fixed(median(ratios), 2)})`,
  );
}
if (strace) {
  for (const subject of subjects) {
    const calls = subject.syscalls ?? [];
    const total = calls.reduce((sum, entry) => sum + entry.calls, 0);
    console.log(
      `\nSyscalls of the ${subject.label}'s daemon in one round (strace -c, every thread; the round's connects ` +
        `and, once its origins close, the drops of those sockets): ${total} in all, ${fixed(total / connects)} a connect`,
    );
    console.log(
      table([
        ['syscall', 'calls', 'per connect', 'errors'],
        ...calls
          .slice(0, 16)
          .map((entry) => [entry.syscall, String(entry.calls), fixed(entry.calls / connects, 2), String(entry.errors)]),
      ]),
    );
  }
}

mkdirSync(resultsDir, { recursive: true });
const outFile = join(resultsDir, `connect-${stamp(new Date())}.json`);
writeFileSync(
  outFile,
  formatJson({
    origins,
    perOrigin,
    rounds,
    subjects: subjects.map(({ label, cpuUs, wallMs, coldCpuUs, syscalls }) => ({
      label,
      main: label === 'this build' ? 'dist/daemon/main.js' : compareMain,
      cpuUsPerConnect: cpuUs,
      wallMs,
      coldCpuUsPerConnect: coldCpuUs,
      syscalls,
    })),
  }),
);
console.log(`\nresults written to ${outFile}`);
