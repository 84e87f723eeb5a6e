// Happy Eyeballs benchmark (issue 13): the first request to a dual-stack host whose IPv6 path drops packets
// silently, through sockpool (nothing warm, nothing learned) against the curl CLI (`--resolve` with both addresses;
// curl races the families itself).
//
//   node dist/bench/happy-eyeballs.js [--rtt-ms 20] [--rounds 10] [--rttlink PATH] [--out FILE]
//
// The lab, all in namespaces of this run's own (root only; ../shared/tools/rttlink beside the checkout):
//
//   he-client-PID   sockpoold and curl run here. `void0` is a TUN device nobody reads: 2001:db8:dead::/64 is
//                   routed to it, so IPv6 SYNs vanish without an answer. rttlink runs in this namespace, so its
//                   delay line (--rtt-ms) joins it to
//   he-far-PID      where every 198.18.x.y is local: the origin server (HTTP/1.1 on port 80).
//
// Each host `rN.<case>.test` is pinned to [2001:db8:dead::10] and 198.18.0.10, and a new name is used in every
// round, so sockpool never has a warm socket or a learned family for it. Cases, in an order rotated per round:
//   sockpool         the daemon's default attempt delay (250 ms)
//   sockpool-200     the daemon with connectAttemptDelayMs 200 (curl's default)
//   curl             curl's default Happy Eyeballs timeout (200 ms)
//   curl-250         curl --happy-eyeballs-timeout-ms 250 (the daemon's default)
//   acquire          the daemon alone: a raw `acquire` (wall time to the lease, and the lease's connectMs)
// plus one sample of sockpool with racing off (maxRacingAttempts 0: IPv6 first, until the connect timeout), which
// is how the daemon connected before.
//
// sockpool's time is the caller's wall time of client.request() (threads: 0, after warm-up requests to another
// host); curl's is its own time_total (process start not included). docs/benchmarks.md has a run's figures.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { SockpoolClient } from '../client/index.js';
import * as native from '../shared/native.js';
import { createTestPki } from '../test/helpers/tls.js';
import { rttlinkPath as defaultRttlinkPath } from './lab/rttlink.js';
import { option, optionText } from './lib/args.js';
import { type BenchDaemon, repoRoot, startBenchDaemon } from './lib/daemon.js';
import { BenchDaemonClient } from './lib/daemon-client.js';
import { formatJson, stamp } from './lib/json.js';
import { type BenchChild, spawnChild } from './lib/proc.js';
import { runBench } from './lib/run.js';
import { round, table } from './lib/stats.js';

const settings = {
  rttMs: option('--rtt-ms', 20),
  rounds: option('--rounds', 10),
  port: 80,
  v6: '2001:db8:dead::10',
  v4: '198.18.0.10',
  connectTimeoutMs: 5_000,
};
/** `--rttlink PATH` for a checkout without ../shared beside it (a worktree). */
const rttlinkPath = optionText('--rttlink') ?? defaultRttlinkPath;
const CLIENT_NS = `he-client-${process.pid}`;
const FAR_NS = `he-far-${process.pid}`;
const CASES = ['sockpool', 'sockpool-200', 'curl', 'curl-250', 'acquire'] as const;
type Case = (typeof CASES)[number];

const log = (text: string) => process.stdout.write(`${text}\n`);
const children: BenchChild[] = [];
let daemon: BenchDaemon | undefined;
let client: SockpoolClient | undefined;
let workDir: string | undefined;

function sh(argv: string[]): string {
  const result = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' });
  if (result.status !== 0) throw new Error(`${argv.join(' ')} failed: ${result.stderr || result.stdout}`);
  return result.stdout;
}

const inClient = (argv: string[]) => ['ip', 'netns', 'exec', CLIENT_NS, ...argv];
/**
 * rttlink runs in the client namespace, so its end of the delay line and its routes are there, not on the host. Only
 * the network namespace is entered: under `ip netns exec` (a mount namespace of its own) the namespace rttlink
 * creates would not be visible to anyone else.
 */
const rttlinkInClient = (args: string[]) => ['nsenter', `--net=/run/netns/${CLIENT_NS}`, rttlinkPath, ...args];

async function labUp(): Promise<void> {
  sh(['ip', 'netns', 'add', CLIENT_NS]);
  sh(['ip', '-n', CLIENT_NS, 'link', 'set', 'lo', 'up']);
  sh(['ip', '-n', CLIENT_NS, 'tuntap', 'add', 'dev', 'void0', 'mode', 'tun']);
  sh(['ip', '-n', CLIENT_NS, 'link', 'set', 'void0', 'up']);
  sh(['ip', '-n', CLIENT_NS, '-6', 'route', 'add', '2001:db8:dead::/64', 'dev', 'void0']);
  sh(rttlinkInClient(['up', '--rtt-ms', String(settings.rttMs), '--ns', FAR_NS, '--daemon']));
  const deadline = performance.now() + 5_000;
  while (!existsSync(`/run/rttlink-${FAR_NS}.pid`)) {
    if (performance.now() > deadline) throw new Error('rttlink: the delay line did not start');
    await sleep(20);
  }
  // The IPv4 host goes through the delay line; the IPv6 one into void0; nothing else is routed.
  const v4Route = sh(['ip', '-n', CLIENT_NS, '-o', 'route', 'get', settings.v4]);
  const v6Route = sh(['ip', '-n', CLIENT_NS, '-o', '-6', 'route', 'get', settings.v6]);
  if (!v4Route.includes('dev rtl')) throw new Error(`route to ${settings.v4}: ${v4Route}`);
  if (!v6Route.includes('dev void0')) throw new Error(`route to ${settings.v6}: ${v6Route}`);
}

function labDown(): void {
  const down = rttlinkInClient(['down', '--ns', FAR_NS]);
  spawnSync(down[0]!, down.slice(1));
  spawnSync('ip', ['netns', 'del', FAR_NS]);
  spawnSync('ip', ['netns', 'del', CLIENT_NS]);
}

const host = (label: string, index: number) => `r${index}.${label}.test`;
const pin = (name: string) => `${name}:${settings.port}:[${settings.v6}],${settings.v4}`;

/** One curl CLI run inside the client namespace; curl's own time_total and time_connect, ms. */
function curl(name: string, extra: string[]): { totalMs: number; connectMs: number; address: string } {
  const out = sh(
    inClient([
      'curl',
      '-sS',
      '-o',
      '/dev/null',
      '--max-time',
      '10',
      '-w',
      '%{time_total} %{time_connect} %{remote_ip}',
      '--resolve',
      pin(name),
      ...extra,
      `http://${name}/`,
    ]),
  );
  const [total, connect, address] = out.trim().split(' ');
  return { totalMs: Number(total) * 1000, connectMs: Number(connect) * 1000, address: address ?? '' };
}

async function viaSockpool(name: string): Promise<{ totalMs: number; acquireMs: number }> {
  const started = performance.now();
  const response = await client!.request(`http://${name}/`, { timeoutMs: 15_000 });
  const totalMs = performance.now() - started;
  if (response.status !== 200 || response.warm)
    throw new Error(`${name}: status ${response.status}, warm ${response.warm}`);
  return { totalMs, acquireMs: response.timings.acquireMs };
}

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
};

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('needs root (network namespaces)');
  if (!existsSync(rttlinkPath)) throw new Error(`${rttlinkPath} not found (../shared beside the checkout)`);
  await labUp();
  workDir = mkdtempSync(join(os.tmpdir(), 'bench-he-'));
  const pki = createTestPki(['localhost']);
  const node = process.execPath;
  const origin = spawnChild(
    [
      node,
      join(repoRoot, 'dist', 'bench', 'fixtures', 'peer-origin.js'),
      JSON.stringify({
        hosts: ['0.0.0.0'],
        httpPort: settings.port,
        httpsPort: 443,
        certFile: join(pki.dir, 'server.pem'),
        keyFile: join(pki.dir, 'server.key'),
        bodyBytes: 1024,
      }),
    ],
    { wrap: ['ip', 'netns', 'exec', FAR_NS] },
  );
  children.push(origin);
  await origin.nextMessage((message) => message.ready === true, 10_000);

  const names = Array.from({ length: settings.rounds }, (_, index) => index);
  const resolve = [
    `warmup.test:${settings.port}:${settings.v4}`,
    ...names.flatMap((index) => [pin(host('d250', index)), pin(host('d200', index)), pin(host('acq', index))]),
    pin(host('serial', 0)),
  ];
  daemon = await startBenchDaemon({
    dir: join(workDir, 'daemon'),
    config: {
      pool: {
        predictive: false,
        defaults: { connectTimeoutMs: settings.connectTimeoutMs },
        origins: [
          { match: `*.d200.test:${settings.port}`, connectAttemptDelayMs: 200 },
          { match: `*.serial.test:${settings.port}`, maxRacingAttempts: 0 },
        ],
      },
    },
    args: [
      '--allow',
      '198.18.0.0/16',
      '--allow',
      '2001:db8:dead::/64',
      '--allow-port',
      String(settings.port),
      ...resolve.flatMap((entry) => ['--resolve', entry]),
    ],
    wrap: inClient([]),
  });
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
  // Untimed: the client's runtime, curl's first handle, the daemon's first connect (IPv4 only).
  for (let i = 0; i < 20; i++) await client.request(`http://warmup.test/`);
  for (let i = 0; i < 3; i++) curl('warmup.test', []);

  const samples: Record<Case, Array<{ totalMs: number; connectMs: number }>> = {
    sockpool: [],
    'sockpool-200': [],
    curl: [],
    'curl-250': [],
    acquire: [],
  };
  const raw = new BenchDaemonClient(daemon.socketPath);
  for (const index of names) {
    const order = CASES.map((_, k) => CASES[(k + index) % CASES.length]!);
    for (const name of order) {
      if (name === 'acquire') {
        const started = performance.now();
        const { message, fds } = await raw.request({
          type: 'acquire',
          id: raw.nextId(),
          host: host('acq', index),
          port: settings.port,
        });
        const totalMs = performance.now() - started;
        for (const fd of fds) native.close(fd);
        if (message.type !== 'lease' || message.address !== settings.v4)
          throw new Error(`acquire: ${JSON.stringify(message)}`);
        raw.send({ type: 'closed', leaseId: message.leaseId });
        samples.acquire.push({ totalMs, connectMs: message.connectMs });
      } else if (name === 'sockpool' || name === 'sockpool-200') {
        const result = await viaSockpool(host(name === 'sockpool' ? 'd250' : 'd200', index));
        samples[name].push({ totalMs: result.totalMs, connectMs: result.acquireMs });
      } else {
        const extra = name === 'curl-250' ? ['--happy-eyeballs-timeout-ms', '250'] : [];
        const result = curl(host(name, index), extra);
        if (result.address !== settings.v4) throw new Error(`curl connected to ${result.address}`);
        samples[name].push({ totalMs: result.totalMs, connectMs: result.connectMs });
      }
    }
  }
  raw.close();
  const serial = await viaSockpool(host('serial', 0));

  // What the daemon learned and counted: IPv6 silent (cancelled), IPv4 won.
  const stats = new BenchDaemonClient(daemon.socketPath);
  const reply = (await stats.stats()) as unknown as { origins: Array<{ origin: string; learnedFamily: unknown }> };
  stats.close();
  const learned = reply.origins.find((entry) => entry.origin === `${host('d250', 0)}:${settings.port}`)?.learnedFamily;

  const summary = Object.fromEntries(
    CASES.map((name) => [
      name,
      {
        totalMs: round(median(samples[name].map((sample) => sample.totalMs))),
        connectMs: round(median(samples[name].map((sample) => sample.connectMs))),
        minMs: round(Math.min(...samples[name].map((sample) => sample.totalMs))),
        maxMs: round(Math.max(...samples[name].map((sample) => sample.totalMs))),
      },
    ]),
  ) as Record<Case, { totalMs: number; connectMs: number; minMs: number; maxMs: number }>;
  const ratio = (a: Case, b: Case) => round(summary[a].totalMs / summary[b].totalMs, 3);
  const ratios = {
    'sockpool / curl-250 (same delay)': ratio('sockpool', 'curl-250'),
    'sockpool-200 / curl (same delay)': ratio('sockpool-200', 'curl'),
    'sockpool / curl (defaults)': ratio('sockpool', 'curl'),
  };
  // Aim: the acquire within the attempt delay plus one IPv4 round trip (plus the daemon's own few ms), and the
  // request within 10% of curl's at the same delay.
  const aims = {
    acquireWithinDelayPlusRtt: summary.acquire.totalMs <= 250 + settings.rttMs * 1.5,
    within10PercentOfCurlSameDelay:
      ratios['sockpool / curl-250 (same delay)'] <= 1.1 && ratios['sockpool-200 / curl (same delay)'] <= 1.1,
  };

  log(`Happy Eyeballs, first request, IPv6 dropped silently, IPv4 RTT ${settings.rttMs} ms, ${settings.rounds} rounds`);
  log(
    table([
      ['case', 'median total ms', 'min', 'max', 'connect ms (curl), acquire ms (sockpool), daemon connectMs'],
      ...CASES.map((name) => [
        name,
        String(summary[name].totalMs),
        String(summary[name].minMs),
        String(summary[name].maxMs),
        String(summary[name].connectMs),
      ]),
      ['sockpool, racing off (1 sample)', String(round(serial.totalMs)), '', '', String(round(serial.acquireMs))],
    ]),
  );
  for (const [name, value] of Object.entries(ratios)) log(`${name}: ${value}`);
  log(`learned for ${host('d250', 0)}: ${JSON.stringify(learned)}`);
  log(`aims: ${JSON.stringify(aims)}`);

  const out = optionText('--out') ?? join(repoRoot, 'bench', 'results', `happy-eyeballs-${stamp(new Date())}.json`);
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(
    out,
    formatJson({
      settings,
      machine: { cpus: os.cpus().length, kernel: os.release() },
      summary,
      ratios,
      aims,
      samples,
      serial,
      learned,
    }),
  );
  log(`results: ${out}`);
}

async function cleanup(): Promise<void> {
  await client?.close().catch(() => {});
  await daemon?.stop().catch(() => {});
  for (const child of children) await child.stop().catch(() => {});
  labDown();
  if (workDir) rmSync(workDir, { recursive: true, force: true });
}

runBench(main, cleanup, log);
