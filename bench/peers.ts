// Peers benchmark (issue 4, Performance): sockpool against Node's fetch (undici), plain node-libcurl and the curl
// CLI, in the same run, on loopback and over an emulated round trip (../shared/tools/rttlink, 20 ms by default):
//
//   1. the first request to each of 100 origins, HTTP and HTTPS (TLS 1.3): cold for the peers (a fresh agent, Multi
//      or curl process per origin), over a socket sockpoold warmed for sockpool (the origins were announced with
//      prewarm, as a crawler announces its next hosts, and the daemon was left to finish);
//   2. steady keep-alive load to one origin: sequential, and 16 in flight; req/s against plain node-libcurl; sockpool's
//      default client, the client with `threads: 0`, and (`sockpool, in company on threads`) the default client with
//      `inlineWhileResponsive: false`, whose requests in company always take the thread hops;
//   3. a crawler mix: requests over the origins with Zipf weights, 32 in flight; sockpool with the hosts announced
//      (prewarm), and without: names sockpoold has never seen, every request handed at once to a client that runs
//      32 at a time, so that the waiting ones announce their origins from the client's queue (the aim: at least 90%
//      of the announced speed-up over the fastest peer);
//   4. loopback throughput, 64 in flight, against undici.
// Peers run interleaved (each origin, round or run rotates the order) so drift hits all alike.
//
//   node dist/bench/peers.js [--quick] [--rtt-ms 20] [--loopback-only] [--origins N] [--out FILE]
//                            [--warm-tls [--warm-tls-on-miss]] [--first-only] [--crawl-only] [--lab-only] [--keep-alive-only]
//                            [--rounds N] [--profile] [--baseline DIR] [--trace]
//   node dist/bench/peers.js --charts-from FILE.json
//
// --warm-tls: sockpoold keeps warm TLS sessions for every https origin (docs/warm-tls.md), so sockpool's first
// HTTPS requests run over a session the daemon completed and relays; --warm-tls-on-miss adds
// `warmTlsOnMiss = "tcp"` (an acquire with no session idle gets a TCP lease). --first-only: scenario 1 alone. --crawl-only:
// scenario 3 alone. --lab-only: no loopback set. --keep-alive-only: scenario 2 alone, on loopback, for node-libcurl
// and the two sockpool clients (the runs issue 14's aims are about). --rounds N: rounds of every load run.
// --profile: node-libcurl's and sockpool's runner processes (worker threads included) run under node --cpu-prof;
// profiles in bench/results/profiles/peers-<date>/<peer>/. --baseline DIR: the two sockpool clients of another
// build (its dist/, e.g. of main) run beside this build's in the same rounds, for an A/B of a client change.
// --trace: sockpool's crawler runs keep every request's detail (host, end time, warm, timings) in the JSON.
//
// The lab needs root and ../shared beside the checkout; without them only the loopback part runs (and says so).
// docs/benchmarks.md explains the output; results go to bench/results/peers-<date>.json, with one SVG chart per
// scenario and set beside it (peers-<date>-<set>-<scenario>.svg, scenario first | keep-alive | crawl | throughput).
// --charts-from FILE.json redraws the charts of an earlier result file. While it runs, a progress line on stderr
// says which scenario, round and client (overwriting itself on a terminal, plain lines in a pipe).

import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { defaultThreads } from '../client/index.js';
import { createTestPki, type TestPki } from '../test/helpers/tls.js';
import type { Announce, FirstResult, LoadResult, PeerName } from './fixtures/peer-runner.js';
import { certificateNames, OriginSet, type Scheme, zipfOrigins } from './lab/origins.js';
import { inLab, LAB_ALLOW_CIDR, LAB_HOSTS_PREFIX, labDown, labUnavailable, labUp, verifyRoute } from './lab/rttlink.js';
import { flag, option, optionText } from './lib/args.js';
import { type BenchDaemon, repoRoot, startBenchDaemon } from './lib/daemon.js';
import { BenchDaemonClient } from './lib/daemon-client.js';
import { freePorts } from './lib/free-ports.js';
import { formatJson, stamp } from './lib/json.js';
import {
  type ChartContext,
  type ChartSet,
  PEER_LABEL as LABEL,
  peersCharts,
  roundRatios,
  variantLabel,
} from './lib/peers-charts.js';
import { type BenchChild, spawnChild, threadsCpuMs } from './lib/proc.js';
import { Progress } from './lib/progress.js';
import { runBench } from './lib/run.js';
import { type LatencySummary, median, round, roundSummary, summarize, table } from './lib/stats.js';

// ---------------------------------------------------------------------------------------------------------------
// Settings.

const quick = flag('--quick');
const settings = {
  quick,
  rttMs: option('--rtt-ms', 20),
  loopbackOnly: flag('--loopback-only') || flag('--keep-alive-only'),
  warmTls: flag('--warm-tls') || flag('--warm-tls-on-miss'),
  warmTlsOnMiss: flag('--warm-tls-on-miss'),
  firstOnly: flag('--first-only'),
  crawlOnly: flag('--crawl-only'),
  labOnly: flag('--lab-only'),
  keepAliveOnly: flag('--keep-alive-only'),
  profile: flag('--profile'),
  /** sockpool's crawler runs keep every request's detail in the JSON (LoadResult.trace). */
  trace: flag('--trace'),
  /** Another build's dist/ whose sockpool clients run beside this one's in the keep-alive runs (A/B). */
  baseline: optionText('--baseline'),
  origins: Math.min(250, option('--origins', quick ? 20 : 100)),
  warmupOrigins: 4,
  /** Rounds of the keep-alive, crawler and throughput runs (each rotates the peers' order). */
  /** Loopback runs last about a second: more of them, so that a GC pause or a scheduler hiccup is not the result. */
  rounds: { lab: option('--rounds', quick ? 1 : 3), loopback: option('--rounds', quick ? 1 : 5) },
  keepAlive: {
    concurrency: 16,
    lab: { sequential: quick ? 30 : 100, concurrent: quick ? 240 : 800 },
    // Loopback requests take 0.03-0.1 ms: enough of them that a GC pause or a scheduler hiccup is not the result.
    loopback: { sequential: quick ? 1_500 : 6_000, concurrent: quick ? 6_000 : 24_000 },
  },
  crawl: { requests: quick ? 150 : 500, concurrency: 32, maxAnnouncedPerOrigin: 8, seed: 4242 },
  throughput: { requests: quick ? 4_000 : 20_000, concurrency: 64 },
  bodyBytes: 1_024,
  /** Untimed requests each client makes when it starts (JIT; sockpool's worker threads). */
  jitWarmupRequests: quick ? 200 : 1_000,
  // Loopback ports are picked free at the start (bench/lib/free-ports.ts): two runs at once do not collide.
  ports: { lab: { http: 80, https: 443 }, loopback: { http: 0, https: 0 } },
};

const AIMS = {
  firstHttp: 1.8,
  firstHttps: 1.4,
  /** With --warm-tls (issue 11): sockpool's first HTTPS request over a session the daemon completed and relays. */
  firstHttpsWarmTls: 2.5,
  keepAliveOfLibcurl: 0.95,
  throughputOfUndici: 1,
  /** Crawler mix in the lab: sockpool's speed-up over the fastest peer with hosts not announced / announced. */
  unannouncedOfAnnounced: 0.9,
};
/**
 * Issue 14's keep-alive aims on loopback, req/s over plain node-libcurl's: the default client (worker threads)
 * sequential and with 16 in flight, and the client with `threads: 0` in both modes. (In the lab: issue 4's 0.95.)
 */
const LOOPBACK_KEEP_ALIVE_AIMS: Record<'sockpool' | 'sockpool-inline', Record<'sequential' | 'concurrent', number>> = {
  sockpool: { sequential: 0.8, concurrent: 0.95 },
  'sockpool-inline': { sequential: 1, concurrent: 1 },
};
const PEERS: PeerName[] = settings.keepAliveOnly ? ['libcurl', 'sockpool'] : ['undici', 'libcurl', 'curl', 'sockpool'];
/** The runners profiled with --profile: the compared clients. */
const PROFILED: PeerName[] = ['libcurl', 'sockpool', 'sockpool-inline'];
const SCHEMES: Scheme[] = ['http', 'https'];
const fixtures = join(import.meta.dirname, 'fixtures');
const resultsDir = join(repoRoot, 'bench', 'results');
const node = process.execPath;
const tmp = mkdtempSync(join(os.tmpdir(), 'sockpool-peers-'));
const profileDir = join(resultsDir, 'profiles', `peers-${stamp(new Date())}`);

const progress = new Progress();

function log(text: string): void {
  progress.log(text);
}

// ---------------------------------------------------------------------------------------------------------------
// Processes: origin servers, sockpoold, one runner per peer.

const daemons: BenchDaemon[] = [];
const children: BenchChild[] = [];
let labStarted = false;

interface Reply {
  id: number;
  ok: boolean;
  result?: unknown;
  error?: string;
}

class Runner {
  readonly peer: PeerName;
  /** The label of its rows: the peer, or `<peer> (baseline)` for a sockpool client from --baseline's build. */
  readonly variant: string;
  #child: BenchChild;
  #nextId = 0;

  constructor(peer: PeerName, baselineDist?: string) {
    this.peer = peer;
    this.variant = baselineDist ? `${peer} (baseline)` : peer;
    const profile = settings.profile && PROFILED.includes(peer);
    if (profile) mkdirSync(join(profileDir, peer), { recursive: true });
    const nodeArgs = profile ? ['--cpu-prof', '--cpu-prof-dir', join(profileDir, peer)] : [];
    const clientModule = baselineDist ? [join(baselineDist, 'client', 'index.js')] : [];
    this.#child = spawnChild([node, ...nodeArgs, join(fixtures, 'peer-runner.js'), peer, ...clientModule], {
      nofile: 65_536,
    });
    children.push(this.#child);
  }

  async call<T>(op: string, payload: Record<string, unknown> = {}, timeoutMs = 180_000): Promise<T> {
    const id = ++this.#nextId;
    this.#child.send(JSON.stringify({ id, op, ...payload }));
    const reply = await this.#child.nextMessage<Reply>((message) => message.id === id, timeoutMs);
    if (!reply.ok) throw new Error(`${this.peer} ${op}: ${reply.error}`);
    return reply.result as T;
  }

  async stop(): Promise<void> {
    await this.call('close', {}, 30_000).catch(() => {});
    // The runner exits by itself after `close`; under --cpu-prof it writes its profiles first.
    const { child } = this.#child;
    if (child.exitCode === null && child.signalCode === null) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 30_000);
        child.once('exit', () => resolve(clearTimeout(timer)));
      });
    }
    await this.#child.stop();
  }
}

/** Hands out the zones of a set (../lab/origins.ts): one per load run, never twice. */
class Zones {
  #next = 0;
  #count: number;

  constructor(count: number) {
    this.#count = count;
  }

  next(): number {
    if (this.#next >= this.#count) throw new Error(`more than the ${this.#count} zones planned (zonesNeeded)`);
    return ++this.#next;
  }
}

function roundsFor(lab: boolean): number {
  return lab ? settings.rounds.lab : settings.rounds.loopback;
}

/**
 * Zones a set uses: keep-alive (2 schemes x 2 modes), crawler mix (2 schemes x 2 variants, 3 with --baseline),
 * throughput; per round; and the crawl's warm-up rounds.
 */
function zonesNeeded(): number {
  const crawlZones = settings.baseline ? 6 : 4;
  return (
    Math.max(settings.rounds.lab, settings.rounds.loopback) * (4 + crawlZones + 1) +
    KEEP_ALIVE_WARMUP_ROUNDS * 4 +
    CRAWL_WARMUP_ROUNDS * crawlZones
  );
}

/**
 * Untimed keep-alive rounds before the timed ones, for the same reason as the crawl's (below): sockpool's client has
 * more JavaScript on a request's path than node-libcurl, and its per-round ratios kept rising over the first rounds
 * (docs/benchmarks.md, fifth session): a round of a few thousand requests does not finish compiling it.
 */
const KEEP_ALIVE_WARMUP_ROUNDS = 1;

/**
 * Untimed crawl rounds before the timed ones, every variant run as in a timed round (host names of their own): the
 * first crawl after the runners and the daemon started ran on cold code (JIT) and measured that, not the crawl; the
 * first timed round was the slowest of three in most runs, sockpool's not-announced variant most of all (the daemon's
 * connects are in its timed part).
 */
const CRAWL_WARMUP_ROUNDS = 1;

/** The order of the peers for the k-th origin, round or run: rotated, so nobody always goes first. */
function rotate<T>(items: T[], k: number): T[] {
  const shift = k % items.length;
  return [...items.slice(shift), ...items.slice(0, shift)];
}

// ---------------------------------------------------------------------------------------------------------------
// Scenario 1: the first request to each origin.

interface FirstSummary {
  scheme: Scheme;
  peer: PeerName;
  /** requestMs (for the curl CLI: curl's own time_total). */
  latency: LatencySummary;
  /** Wall time seen by the caller (for the curl CLI: process start to exit). */
  wallP50: number;
  errors: number;
  firstError?: string;
  /** Peer over sockpool, of p50 and of mean (sockpool's own row: 1). */
  ratioP50: number;
  ratioMean: number;
  /** Median of each timing the peer reports (sockpool: acquire, queue, TLS, ttfb...; curl: its phases). */
  timingsP50: Record<string, number>;
  /** sockpool: requests that ran over a socket connected before they started, and how they got it. */
  warm?: number;
  connections?: Record<string, number>;
}

async function firstRequests(set: OriginSet, runners: Runner[]): Promise<FirstSummary[]> {
  const announce: Announce = {
    origins: SCHEMES.flatMap((scheme) =>
      Array.from({ length: set.options.origins }, (_, i) => ({
        host: set.host(i + 1),
        port: set.port(scheme),
        count: 1,
        https: scheme === 'https',
      })),
    ),
    timeoutMs: 60_000,
  };
  const prepareUrls = warmupUrls(set);
  progress.update('first requests', 'clients prepare; sockpool announces the origins and waits for the prewarm');
  await Promise.all(
    runners.map((runner) =>
      runner.call('begin', { prepareUrls, announce: runner.peer === 'sockpool' ? announce : undefined }),
    ),
  );
  const summaries: FirstSummary[] = [];
  for (const scheme of SCHEMES) {
    const results = new Map<PeerName, Array<FirstResult | Error>>(PEERS.map((peer) => [peer, []]));
    const started = performance.now();
    for (let n = 1; n <= set.options.origins; n++) {
      const url = set.url(scheme, set.host(n), '/first');
      for (const runner of rotate(runners, n)) {
        progress.update(`first requests, ${scheme}`, `origin ${n}/${set.options.origins}, ${LABEL[runner.peer]}`);
        const result = await runner.call<FirstResult>('first', { url }).catch((error: Error) => error);
        results.get(runner.peer)!.push(result);
      }
    }
    log(`  first requests, ${scheme}: ${((performance.now() - started) / 1000).toFixed(1)} s`);
    const sockpoolP50 = summarizeFirst(results.get('sockpool')!).latency;
    for (const peer of PEERS) {
      const summary = summarizeFirst(results.get(peer)!);
      summaries.push({
        scheme,
        peer,
        ...summary,
        ratioP50: summary.latency.p50 / sockpoolP50.p50,
        ratioMean: summary.latency.mean / sockpoolP50.mean,
      });
    }
  }
  return summaries;
}

function summarizeFirst(
  results: Array<FirstResult | Error>,
): Omit<FirstSummary, 'scheme' | 'peer' | 'ratioP50' | 'ratioMean'> {
  const ok = results.filter((result): result is FirstResult => !(result instanceof Error));
  const failed = results.filter((result): result is Error => result instanceof Error);
  const timingKeys = new Set(ok.flatMap((result) => Object.keys(result.timings ?? {})));
  const timingsP50: Record<string, number> = {};
  for (const key of timingKeys) timingsP50[key] = median(ok.map((result) => result.timings?.[key] ?? Number.NaN));
  const summary: Omit<FirstSummary, 'scheme' | 'peer' | 'ratioP50' | 'ratioMean'> = {
    latency: summarize(ok.map((result) => result.requestMs)),
    wallP50: median(ok.map((result) => result.wallMs)),
    errors: failed.length,
    timingsP50,
  };
  if (failed[0]) summary.firstError = failed[0].message;
  if (ok.some((result) => result.connection !== undefined)) {
    summary.warm = ok.filter((result) => result.warm).length;
    const connections: Record<string, number> = {};
    for (const result of ok) connections[result.connection!] = (connections[result.connection!] ?? 0) + 1;
    summary.connections = connections;
  }
  return summary;
}

function warmupUrls(set: OriginSet): string[] {
  return SCHEMES.flatMap((scheme) =>
    Array.from({ length: set.options.warmupOrigins }, (_, i) => set.url(scheme, set.warmupHost(i + 1), '/warmup')),
  );
}

// ---------------------------------------------------------------------------------------------------------------
// Scenarios 2-4: load runs (keep-alive, crawler mix, throughput).

interface LoadRun {
  scenario: 'keep-alive' | 'crawl' | 'throughput';
  scheme: Scheme;
  /** keep-alive: sequential | concurrent; crawl: the peer, or sockpool announced / unannounced. */
  mode: string;
  variant: string;
  peer: PeerName;
  concurrency: number;
  rounds: LoadResult[];
  /** Medians over the rounds. */
  perSecond: number;
  elapsedMs: number;
  errors: number;
}

/** TCP connections the origin server has accepted so far, per scheme (set by runSet while its server runs). */
let originConnections: (() => Promise<Record<Scheme, number>>) | undefined;
/** sockpoold's stats `warming` so far: sockets opened and first lent, by purpose (crawl runs report each run's). */
type Warming = NonNullable<LoadResult['daemonWarming']>;
let daemonWarming: (() => Promise<Warming>) | undefined;
/** CPU time of the set's sockpoold so far, ms (crawl runs report what each run cost it). */
let daemonCpu: (() => number) | undefined;

interface LoadJob {
  variant: string;
  runner: Runner;
  payload: Record<string, unknown>;
}

/** Runs each job once per round (order rotated per round) and keeps the per-round results. */
async function loadRounds(
  scenario: LoadRun['scenario'],
  scheme: Scheme,
  mode: string,
  concurrency: number,
  rounds: number,
  jobs: (round: number) => LoadJob[],
  warmupRounds = 0,
): Promise<LoadRun[]> {
  const byVariant = new Map<string, { peer: PeerName; rounds: LoadResult[] }>();
  for (let r = 1 - warmupRounds; r <= rounds; r++) {
    for (const job of rotate(jobs(r), r)) {
      const label = r < 1 ? `warm-up round ${r + warmupRounds}/${warmupRounds} (untimed)` : `round ${r}/${rounds}`;
      progress.update(`${scenario}, ${scheme}, ${mode}, ${label}`, variantLabel(job.variant));
      const before = scenario === 'crawl' ? await originConnections?.() : undefined;
      const warmingBefore =
        scenario === 'crawl' && job.runner.peer === 'sockpool' ? await daemonWarming?.() : undefined;
      const cpuBefore = scenario === 'crawl' ? daemonCpu?.() : undefined;
      const result = await job.runner.call<LoadResult>('load', { concurrency, ...job.payload });
      const cpuAfter = cpuBefore === undefined ? undefined : daemonCpu?.();
      const after = before ? await originConnections?.() : undefined;
      if (before && after) result.originConnections = after[scheme] - before[scheme];
      const warmingAfter = warmingBefore ? await daemonWarming?.() : undefined;
      if (warmingBefore && warmingAfter) result.daemonWarming = warmingDelta(warmingBefore, warmingAfter);
      if (cpuBefore !== undefined && cpuAfter !== undefined) result.daemonCpuMs = cpuAfter - cpuBefore;
      if (result.errors > 0) log(`  ${job.variant}: ${result.errors} errors; first: ${result.firstError}`);
      if (r < 1) continue;
      const entry = byVariant.get(job.variant) ?? { peer: job.runner.peer, rounds: [] };
      entry.rounds.push(result);
      byVariant.set(job.variant, entry);
    }
  }
  return [...byVariant].map(([variant, { peer, rounds }]) => ({
    scenario,
    scheme,
    mode,
    variant,
    peer,
    concurrency,
    rounds,
    perSecond: median(rounds.map((result) => result.perSecond)),
    elapsedMs: median(rounds.map((result) => result.elapsedMs)),
    errors: rounds.reduce((sum, result) => sum + result.errors, 0),
  }));
}

function warmingDelta(before: Warming, after: Warming): Warming {
  const delta = (a: Record<string, number>, b: Record<string, number>) =>
    Object.fromEntries(Object.entries(b).map(([purpose, count]) => [purpose, count - (a[purpose] ?? 0)]));
  return { opened: delta(before.opened, after.opened), lent: delta(before.lent, after.lent) };
}

/** One job per runner: the peers, and sockpool's client with `threads: 0` (runner 'sockpool-inline'). */
function jobsFor(runners: Runner[], payload: Record<string, unknown>): LoadJob[] {
  return runners.map((runner) => ({ variant: runner.variant, runner, payload }));
}

async function keepAlive(set: OriginSet, runners: Runner[], zones: Zones, lab: boolean): Promise<LoadRun[]> {
  const counts = lab ? settings.keepAlive.lab : settings.keepAlive.loopback;
  const prepareUrls = warmupUrls(set);
  const runs: LoadRun[] = [];
  for (const scheme of SCHEMES) {
    for (const [mode, concurrency, count] of [
      ['sequential', 1, counts.sequential],
      ['concurrent', settings.keepAlive.concurrency, counts.concurrent],
    ] as const) {
      const started = performance.now();
      runs.push(
        ...(await loadRounds(
          'keep-alive',
          scheme,
          mode,
          concurrency,
          roundsFor(lab),
          () => {
            const url = set.url(scheme, set.host(1, zones.next()), '/keep-alive');
            const payload = { urls: [url], count, warmup: Math.max(10, 2 * concurrency), prepareUrls };
            return jobsFor(runners, payload);
          },
          KEEP_ALIVE_WARMUP_ROUNDS,
        )),
      );
      log(`  keep-alive, ${scheme}, ${mode}: ${((performance.now() - started) / 1000).toFixed(1)} s`);
    }
  }
  return runs;
}

/** `baseline`: --baseline's sockpool runner, whose hosts-not-announced variant runs beside this build's (A/B). */
async function crawl(
  set: OriginSet,
  runners: Runner[],
  zones: Zones,
  lab: boolean,
  baseline: Runner | undefined,
): Promise<LoadRun[]> {
  const { requests, concurrency, maxAnnouncedPerOrigin, seed } = settings.crawl;
  const prepareUrls = warmupUrls(set);
  const sockpool = runners.find((runner) => runner.peer === 'sockpool')!;
  const runs: LoadRun[] = [];
  for (const scheme of SCHEMES) {
    const started = performance.now();
    runs.push(
      ...(await loadRounds(
        'crawl',
        scheme,
        'mix',
        concurrency,
        roundsFor(lab),
        (r) => {
          const mix = zipfOrigins(set.options.origins, requests, seed + r);
          const announcedZone = zones.next();
          const unannouncedZone = zones.next();
          const urls = mix.map((n, i) => set.url(scheme, set.host(n, announcedZone), `/crawl/${r}/${i}`));
          const perOrigin = new Map<number, number>();
          for (const n of mix) perOrigin.set(n, (perOrigin.get(n) ?? 0) + 1);
          const announce: Announce = {
            origins: [...perOrigin].map(([n, count]) => ({
              host: set.host(n, announcedZone),
              port: set.port(scheme),
              count: Math.min(count, maxAnnouncedPerOrigin),
            })),
            timeoutMs: 60_000,
          };
          const unannounced = mix.map((n, i) => set.url(scheme, set.host(n, unannouncedZone), `/crawl/${r}/${i}`));
          const base = { count: requests, warmup: 0, prepareUrls, ...(settings.trace ? { trace: true } : {}) };
          // The baseline's not-announced run needs names neither sockpool client has used (a zone of its own).
          const baselineZone = baseline ? zones.next() : undefined;
          const baselineUrls =
            baselineZone === undefined
              ? []
              : mix.map((n, i) => set.url(scheme, set.host(n, baselineZone), `/crawl/${r}/${i}`));
          return [
            ...runners.map((runner) => ({ variant: runner.peer, runner, payload: { ...base, urls } })),
            // The whole list at once, to a client running `concurrency` at a time: the rest wait in its queue.
            { variant: 'sockpool-unannounced', runner: sockpool, payload: { ...base, urls: unannounced, queue: true } },
            ...(baseline
              ? [
                  {
                    variant: 'sockpool-unannounced (baseline)',
                    runner: baseline,
                    payload: { ...base, urls: baselineUrls, queue: true },
                  },
                ]
              : []),
          ].map((job) => (job.variant === 'sockpool' ? { ...job, payload: { ...job.payload, announce } } : job));
        },
        CRAWL_WARMUP_ROUNDS,
      )),
    );
    log(`  crawler mix, ${scheme}: ${((performance.now() - started) / 1000).toFixed(1)} s`);
  }
  return runs;
}

async function throughput(set: OriginSet, runners: Runner[], zones: Zones): Promise<LoadRun[]> {
  const { requests, concurrency } = settings.throughput;
  const started = performance.now();
  const runs = await loadRounds('throughput', 'http', 'concurrent', concurrency, roundsFor(false), () => {
    const url = set.url('http', set.host(1, zones.next()), '/throughput');
    const payload = { urls: [url], count: requests, warmup: 4 * concurrency, prepareUrls: warmupUrls(set) };
    return jobsFor(runners, payload);
  });
  log(`  throughput: ${((performance.now() - started) / 1000).toFixed(1)} s`);
  return runs;
}

// ---------------------------------------------------------------------------------------------------------------
// One set: servers, daemon, runners, scenarios.

interface SetResult {
  name: 'lab' | 'loopback';
  rttMs: number | null;
  origins: number;
  first: FirstSummary[];
  keepAlive: LoadRun[];
  crawl: LoadRun[];
  throughput: LoadRun[];
  server: unknown;
  durationS: number;
}

async function runSet(set: OriginSet, pki: TestPki, lab: boolean): Promise<SetResult> {
  const started = performance.now();
  log(`${set.name}: ${set.options.origins} origins${lab ? `, ${settings.rttMs} ms round trip` : ''}`);
  const server = spawnChild(
    [
      node,
      join(fixtures, 'peer-origin.js'),
      JSON.stringify({
        hosts: lab ? ['0.0.0.0'] : set.addresses(),
        httpPort: set.port('http'),
        httpsPort: set.port('https'),
        certFile: join(pki.dir, 'server.pem'),
        keyFile: join(pki.dir, 'server.key'),
        bodyBytes: settings.bodyBytes,
      }),
    ],
    { nofile: 65_536, wrap: lab ? inLab() : undefined },
  );
  children.push(server);
  await server.nextMessage((message) => message.ready === true);
  if (lab) verifyRoute();
  originConnections = async () => {
    server.send('stats');
    const { stats } = await server.nextMessage<{ stats: { connections: Record<Scheme, number> } }>(
      (message) => 'stats' in message,
    );
    return stats.connections;
  };

  const daemon = await startBenchDaemon({
    dir: join(tmp, `daemon-${set.name}`),
    config: {
      dns: { resolve: set.resolveEntries() },
      ...(settings.warmTls ? { tls: { warm: ['*'], caFile: pki.caFile } } : {}),
      // Each sockpool variant of a crawler round asks for about 300 sockets (prewarm, or the client's queue
      // announcing); the default allowance (512 per 10 s per uid) would cut whichever variant runs second.
      quotas: { maxPrewarmPerUid: 8_192 },
      pool: {
        maxIdleTotal: 10_000,
        predictive: true,
        warmOnStartOrigins: 0,
        defaults: {
          maxIdle: 16,
          idleTtlMs: 3_600_000,
          ...(settings.warmTlsOnMiss ? { warmTlsOnMiss: 'tcp' } : {}),
        },
      },
    },
    args: [
      '--allow',
      lab ? LAB_ALLOW_CIDR : '127.0.0.0/8',
      '--allow-port',
      String(set.port('http')),
      '--allow-port',
      String(set.port('https')),
    ],
  });
  daemons.push(daemon);
  daemonCpu = () => threadsCpuMs(daemon.pid);
  const statsClient = new BenchDaemonClient(daemon.socketPath);
  await statsClient.hello();
  daemonWarming = async () => ((await statsClient.stats()) as unknown as { warming: Warming }).warming;

  const runners = PEERS.map((peer) => new Runner(peer));
  // The threads: 0 client runs the keep-alive and throughput scenarios only.
  const inline = new Runner('sockpool-inline');
  // --baseline: the two sockpool clients of another build beside this one's, in the same rounds (A/B).
  const baseline = settings.baseline
    ? [new Runner('sockpool', settings.baseline), new Runner('sockpool-inline', settings.baseline)]
    : [];
  const withInline = [...runners, inline, ...baseline];
  const jit = { urls: warmupUrls(set), requests: settings.jitWarmupRequests, concurrency: 16 };
  const pins = set.pins();
  await Promise.all(
    withInline.map((runner) => runner.call('init', { caFile: pki.caFile, pins, socketPath: daemon.socketPath, jit })),
  );

  const zones = new Zones(set.options.zones);
  const only = settings.keepAliveOnly;
  const first = settings.crawlOnly || only ? [] : await firstRequests(set, runners);
  // (Keep-alive only: the default client with requests in company always on its threads, for what the hops cost.)
  const onThreads = new Runner('sockpool-threads');
  if (!settings.firstOnly && !settings.crawlOnly)
    await onThreads.call('init', { caFile: pki.caFile, pins, socketPath: daemon.socketPath, jit });
  const keepAliveRuns =
    settings.firstOnly || settings.crawlOnly ? [] : await keepAlive(set, [...withInline, onThreads], zones, lab);
  const crawlRuns = settings.firstOnly || only ? [] : await crawl(set, runners, zones, lab, baseline[0]);
  const throughputRuns =
    lab || settings.firstOnly || settings.crawlOnly || only ? [] : await throughput(set, withInline, zones);

  originConnections = undefined;
  daemonCpu = undefined;
  daemonWarming = undefined;
  statsClient.close();
  server.send('stats');
  const serverStats = await server.nextMessage((message) => 'stats' in message).catch(() => null);
  await Promise.all([...withInline, onThreads].map((runner) => runner.stop()));
  await daemon.stop();
  await server.stop();
  return {
    name: set.options.name,
    rttMs: lab ? settings.rttMs : null,
    origins: set.options.origins,
    first,
    keepAlive: keepAliveRuns,
    crawl: crawlRuns,
    throughput: throughputRuns,
    server: serverStats,
    durationS: (performance.now() - started) / 1000,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Report.

interface Aim {
  aim: string;
  set: string;
  value: number;
  target: number;
  met: boolean;
  /** Paired rounds behind a ratio aim: the client's req/s, node-libcurl's in the same round, their ratio. */
  rounds?: Array<{ perSecond: number; libcurlPerSecond: number; ratio: number }>;
}

/**
 * What sockpoold opened in a crawl run, by purpose, and how many of those it lent (medians of the rounds): each run
 * has host names of its own, so a socket not lent by the run's end never is (the origin accepted it for nothing).
 * `lent` counts sockets lent at least once, over the whole `load` call: more than the requests the client counts
 * as `leased` (their last attempt ran on a socket curl took from a lease), by a few to about ten a run. Measured
 * (docs/benchmarks.md, twenty-second session), every lending was taken by curl or given back unused (`release`): the
 * difference is the leases a worker brought for a transfer that then ran on a connection curl had freed meanwhile
 * (given back, the request counts as `reused`; a later acquire may get the socket again), a socket taken by an
 * attempt that ran again, and the untimed `prepareUrls` requests when curl's cache had dropped their connections.
 */
function warmingNote(rounds: Warming[]): string {
  const purposes = Object.keys(rounds[0]!.opened).filter((purpose) => rounds.some((r) => r.opened[purpose]! > 0));
  const parts = purposes.map((purpose) => {
    const opened = median(rounds.map((r) => r.opened[purpose] ?? 0));
    const lent = median(rounds.map((r) => r.lent[purpose] ?? 0));
    return `${purpose} ${opened} (lent ${lent})`;
  });
  const total = median(rounds.map((r) => Object.values(r.opened).reduce((a, b) => a + b, 0)));
  const lent = median(rounds.map((r) => Object.values(r.lent).reduce((a, b) => a + b, 0)));
  return `sockpoold opened ${total}, lent ${lent} a round (median; given back unused included): ${parts.join(', ')}`;
}

function ratioText(value: number): string {
  return Number.isFinite(value) ? `${value.toFixed(2)}x` : 'n/a';
}

function ms(value: number): string {
  return Number.isFinite(value) ? value.toFixed(value < 10 ? 2 : 1) : 'n/a';
}

function cpuText(value: number): string {
  return Number.isFinite(value) ? value.toFixed(0) : 'n/a';
}

function perSecond(value: number): string {
  return Number.isFinite(value) ? Math.round(value).toLocaleString('en-US') : 'n/a';
}

/**
 * req/s of `run` against `base`, round by round (both ran in the same round, minutes apart at most, while the
 * machine's speed drifts from round to round), and the median of those ratios.
 */
function pairedRatio(run: LoadRun, base: LoadRun | undefined): number {
  return median(roundRatios(run, base));
}

function setTitle(result: SetResult): string {
  return result.name === 'lab' ? `lab, ${result.rttMs} ms round trip` : 'loopback';
}

/**
 * The crawler-mix aim, per scheme: sockpool's speed-up over the fastest peer (its total time / sockpool's) with the
 * hosts not announced, as a share of the speed-up with them announced (= announced time / not announced time).
 * The aim's text also gives the share of the time saved (fastest peer minus sockpool), a stricter reading.
 */
function crawlAims(result: SetResult, title: string): Aim[] {
  const aims: Aim[] = [];
  for (const scheme of SCHEMES) {
    const runs = result.crawl.filter((run) => run.scheme === scheme);
    const announced = runs.find((run) => run.variant === 'sockpool');
    const peers = runs.filter((run) => run.peer !== 'sockpool');
    if (!announced || peers.length === 0) continue;
    const fastest = peers.reduce((best, run) => (run.elapsedMs < best.elapsedMs ? run : best));
    // This build's not-announced run, and --baseline's (measured against this build's announced run).
    for (const variant of ['sockpool-unannounced', 'sockpool-unannounced (baseline)']) {
      const unannounced = runs.find((run) => run.variant === variant);
      if (!unannounced) continue;
      const speedUpAnnounced = fastest.elapsedMs / announced.elapsedMs;
      const speedUpUnannounced = fastest.elapsedMs / unannounced.elapsedMs;
      const value = speedUpUnannounced / speedUpAnnounced;
      // (Only meaningful when announcing saved time at all.)
      const saved = fastest.elapsedMs - announced.elapsedMs;
      const savedShare = saved > 0 ? (fastest.elapsedMs - unannounced.elapsedMs) / saved : Number.NaN;
      // Per round: announced time / not announced time of the same round (the runs of a round are seconds apart).
      const paired = unannounced.rounds.map(
        (round, r) => (announced.rounds[r]?.elapsedMs ?? Number.NaN) / round.elapsedMs,
      );
      aims.push({
        aim:
          `crawler mix ${scheme}, ${variantLabel(variant).replace('sockpool, ', '')}: speed-up over ` +
          `${variantLabel(fastest.variant)} ${ratioText(speedUpUnannounced)} of the announced ` +
          `${ratioText(speedUpAnnounced)} ` +
          (Number.isFinite(savedShare)
            ? `(time saved: ${Math.round(savedShare * 100)}% of the announced)`
            : '(announcing saved no time over that peer)') +
          `; per round ${paired.map((ratio) => ratio.toFixed(2)).join(', ')}`,
        set: title,
        value,
        target: AIMS.unannouncedOfAnnounced,
        met: value >= AIMS.unannouncedOfAnnounced,
      });
    }
  }
  return aims;
}

function report(sets: SetResult[]): { text: string; aims: Aim[] } {
  const out: string[] = [];
  const aims: Aim[] = [];
  for (const result of sets) {
    const title = setTitle(result);
    out.push('', `== ${title}: ${result.origins} origins (${result.durationS.toFixed(0)} s) ==`, '');

    out.push(
      'First request to each origin, ms (peers cold; sockpool over a prewarmed socket). ratio = peer / sockpool',
    );
    const firstRows = [['scheme', 'client', 'p50', 'mean', 'p90', 'ratio p50', 'ratio mean', 'notes']];
    for (const row of result.first) {
      const notes: string[] = [];
      if (row.peer === 'curl') notes.push(`curl time_total; wall incl. process ${ms(row.wallP50)}`);
      if (row.warm !== undefined) {
        notes.push(`warm ${row.warm}/${row.latency.count}`);
        const t = row.timingsP50;
        notes.push(`acquire ${ms(t.acquireMs ?? Number.NaN)}, tls ${ms(t.tlsMs ?? Number.NaN)}`);
        notes.push(`curl total ${ms(t.totalMs ?? Number.NaN)}`);
      }
      if (row.errors > 0) notes.push(`${row.errors} errors: ${row.firstError}`);
      firstRows.push([
        row.scheme,
        LABEL[row.peer],
        ms(row.latency.p50),
        ms(row.latency.mean),
        ms(row.latency.p90),
        row.peer === 'sockpool' ? '-' : ratioText(row.ratioP50),
        row.peer === 'sockpool' ? '-' : ratioText(row.ratioMean),
        notes.join('; '),
      ]);
    }
    // (Scenarios that did not run, --first-only and the like, print nothing.)
    if (result.first.length > 0) out.push(table(firstRows), '');
    else out.pop();

    out.push(
      'Steady keep-alive to one origin, req/s (median of rounds). ratio = client / node-libcurl, the median of the ' +
        'per-round ratios',
    );
    const keepRows = [
      ['scheme', 'mode', 'client', 'req/s', 'p50 ms', 'CPU µs/req', 'ratio', 'per-round ratios', 'errors'],
    ];
    for (const run of result.keepAlive) {
      const libcurl = result.keepAlive.find(
        (other) => other.scheme === run.scheme && other.mode === run.mode && other.peer === 'libcurl',
      );
      const ratios = roundRatios(run, libcurl);
      const ratio = median(ratios);
      keepRows.push([
        run.scheme,
        `${run.mode} (${run.concurrency})`,
        variantLabel(run.variant),
        perSecond(run.perSecond),
        ms(median(run.rounds.map((r) => r.latency.p50))),
        cpuText(median(run.rounds.map((r) => r.cpuUsPerRequest ?? Number.NaN))),
        ratioText(ratio),
        run.peer === 'libcurl' ? '' : ratios.map((value) => value.toFixed(2)).join(' '),
        String(run.errors),
      ]);
      if ((run.peer === 'sockpool' || run.peer === 'sockpool-inline') && run.variant === run.peer) {
        const target =
          result.name === 'loopback'
            ? LOOPBACK_KEEP_ALIVE_AIMS[run.peer][run.mode as 'sequential' | 'concurrent']
            : AIMS.keepAliveOfLibcurl;
        aims.push({
          aim: `keep-alive ${run.scheme} ${run.mode}: ${variantLabel(run.variant)} req/s / node-libcurl`,
          set: title,
          value: ratio,
          target,
          met: ratio >= target,
          rounds: run.rounds.map((r, i) => ({
            perSecond: r.perSecond,
            libcurlPerSecond: libcurl?.rounds[i]?.perSecond ?? Number.NaN,
            ratio: ratios[i] ?? Number.NaN,
          })),
        });
      }
    }
    if (result.keepAlive.length > 0) out.push(table(keepRows), '');
    else out.pop();

    out.push(
      `Crawler mix: ${settings.crawl.requests} requests, Zipf over ${result.origins} origins, ` +
        `${settings.crawl.concurrency} in flight; total ms (median of rounds). ratio = client / sockpool`,
    );
    const crawlRows = [['scheme', 'client', 'total ms', 'req/s', 'ratio', 'errors', 'notes']];
    for (const run of result.crawl) {
      const sockpool = result.crawl.find((other) => other.scheme === run.scheme && other.variant === 'sockpool');
      const notes: string[] = [];
      const connections = run.rounds[0]?.connections;
      if (connections) {
        const total = run.rounds.reduce((sum, r) => sum + r.count - r.errors, 0);
        const sum = (key: 'warm' | 'leased' | 'reused') =>
          run.rounds.reduce((acc, r) => acc + (r.connections?.[key] ?? 0), 0);
        notes.push(`warm ${sum('warm')}/${total}, leased ${sum('leased')}, reused ${sum('reused')} (all rounds)`);
      }
      const announced = run.rounds.map((r) => r.announceMs).filter((v): v is number => v !== undefined);
      if (announced.length > 0) notes.push(`prewarm took ${ms(median(announced))} (untimed)`);
      const accepted = run.rounds.map((r) => r.originConnections).filter((v): v is number => v !== undefined);
      if (accepted.length > 0) notes.push(`origin accepted ${median(accepted)} connections a round (median)`);
      const warming = run.rounds.map((r) => r.daemonWarming).filter((v): v is Warming => v !== undefined);
      if (warming.length > 0) notes.push(warmingNote(warming));
      const daemonMs = run.rounds.map((r) => r.daemonCpuMs).filter((v): v is number => v !== undefined);
      if (daemonMs.length > 0 && run.peer === 'sockpool') {
        notes.push(
          `sockpoold CPU ${ms(median(daemonMs))} a round${run.variant === 'sockpool' ? ', prewarm included' : ''}`,
        );
      }
      crawlRows.push([
        run.scheme,
        variantLabel(run.variant),
        ms(run.elapsedMs),
        perSecond(run.perSecond),
        run.variant === 'sockpool' ? '-' : ratioText(run.elapsedMs / (sockpool?.elapsedMs ?? Number.NaN)),
        String(run.errors),
        notes.join('; '),
      ]);
    }
    if (result.crawl.length > 0) out.push(table(crawlRows), '');
    else out.pop();
    if (result.name === 'lab') aims.push(...crawlAims(result, title));

    if (result.throughput.length > 0) {
      out.push(
        `Loopback throughput: ${settings.throughput.requests} requests, ${settings.throughput.concurrency} in ` +
          'flight, req/s (median of rounds). ratio = client / undici, the median of the per-round ratios',
      );
      const undici = result.throughput.find((run) => run.peer === 'undici');
      const rows = [['client', 'req/s', 'p50 ms', 'p99 ms', 'ratio', 'errors']];
      for (const run of result.throughput) {
        const ratio = pairedRatio(run, undici);
        rows.push([
          variantLabel(run.variant),
          perSecond(run.perSecond),
          ms(median(run.rounds.map((r) => r.latency.p50))),
          ms(median(run.rounds.map((r) => r.latency.p99))),
          ratioText(ratio),
          String(run.errors),
        ]);
        if ((run.peer === 'sockpool' || run.peer === 'sockpool-inline') && run.variant === run.peer) {
          aims.push({
            aim: `loopback throughput: ${variantLabel(run.variant)} req/s / undici`,
            set: title,
            value: ratio,
            target: AIMS.throughputOfUndici,
            met: ratio >= AIMS.throughputOfUndici,
          });
        }
      }
      out.push(table(rows), '');
    }

    if (result.name === 'lab' && result.first.length > 0) {
      for (const scheme of SCHEMES) {
        const target = scheme === 'http' ? AIMS.firstHttp : settings.warmTls ? AIMS.firstHttpsWarmTls : AIMS.firstHttps;
        const peers = result.first.filter((row) => row.scheme === scheme && row.peer !== 'sockpool');
        const worst = peers.reduce((min, row) => Math.min(min, row.ratioP50), Number.POSITIVE_INFINITY);
        const worstMean = peers.reduce((min, row) => Math.min(min, row.ratioMean), Number.POSITIVE_INFINITY);
        aims.push({
          aim: `first request ${scheme}: lowest peer / sockpool ratio, p50 (mean ${ratioText(worstMean)})`,
          set: title,
          value: worst,
          target,
          met: worst >= target,
        });
      }
    }
  }
  out.push('Aims:');
  for (const aim of aims) {
    out.push(
      `  ${aim.met ? 'met   ' : 'MISSED'}  ${aim.set}: ${aim.aim}: ${ratioText(aim.value)} (aim >= ${aim.target}x)` +
        (aim.rounds ? `; rounds ${aim.rounds.map((r) => r.ratio.toFixed(2)).join(' ')}` : ''),
    );
  }
  return { text: `${out.join('\n')}\n`, aims };
}

// ---------------------------------------------------------------------------------------------------------------
// Main.

/** One SVG per scenario and set beside the JSON: <name>-<set>-<scenario>.svg. */
function writeCharts(outFile: string, sets: ChartSet[], context: ChartContext): string[] {
  const base = outFile.replace(/\.json$/, '');
  return peersCharts(sets, context).map(({ name, svg }) => {
    const file = `${base}-${name}.svg`;
    writeFileSync(file, svg);
    return file;
  });
}

/** --charts-from FILE: redraws the charts of an earlier run from its JSON, beside it. */
function chartsFrom(file: string): void {
  const saved = JSON.parse(readFileSync(file, 'utf8')) as {
    date: string;
    machine: { cpus: number; loadAverageAtStart?: number[]; loadAverage: number[] };
    settings: { warmTls?: boolean };
    sets: ChartSet[];
  };
  const context: ChartContext = {
    date: saved.date,
    loadAverage: [saved.machine.loadAverageAtStart?.[0] ?? Number.NaN, saved.machine.loadAverage[0] ?? Number.NaN],
    cpus: saved.machine.cpus,
    warmTls: saved.settings.warmTls === true,
  };
  for (const chart of writeCharts(file, saved.sets, context)) log(`chart written to ${chart}`);
}

async function main(): Promise<void> {
  const chartsSource = optionText('--charts-from');
  if (chartsSource !== undefined) {
    chartsFrom(chartsSource);
    return;
  }
  const startedAt = new Date();
  const wallStart = performance.now();
  const loadAtStart = os.loadavg();
  log(`sockpool peers benchmark${quick ? ' (--quick)' : ''}: node ${process.version}, ${os.cpus().length} CPUs`);
  log(
    `sockpool: the default client, ${defaultThreads()} worker thread(s) on this machine (defaultThreads()); --baseline rows: that build's default`,
  );
  const setOptions = { origins: settings.origins, warmupOrigins: settings.warmupOrigins, zones: zonesNeeded() };
  const pki = createTestPki(certificateNames(setOptions));
  const sets: SetResult[] = [];
  let labSkipped: string | undefined = settings.loopbackOnly ? '--loopback-only' : labUnavailable();
  try {
    const [httpPort, httpsPort] = await freePorts(2);
    settings.ports.loopback = { http: httpPort!, https: httpsPort! };
    const loopback = new OriginSet({
      name: 'loopback',
      addressPrefix: '127.0.1.',
      httpPort: settings.ports.loopback.http,
      httpsPort: settings.ports.loopback.https,
      ...setOptions,
    });
    if (!settings.labOnly) sets.push(await runSet(loopback, pki, false));
    if (labSkipped === undefined) {
      try {
        await labUp(settings.rttMs);
        labStarted = true;
      } catch (error) {
        labSkipped = (error as Error).message;
      }
    }
    if (labStarted) {
      const lab = new OriginSet({
        name: 'lab',
        addressPrefix: LAB_HOSTS_PREFIX,
        httpPort: settings.ports.lab.http,
        httpsPort: settings.ports.lab.https,
        ...setOptions,
      });
      sets.push(await runSet(lab, pki, true));
    }
  } finally {
    pki.cleanup();
  }
  if (labSkipped !== undefined) log(`latency lab not run: ${labSkipped}; loopback only`);

  const durationS = (performance.now() - wallStart) / 1000;
  const { text, aims } = report(sets);
  progress.clear();
  process.stdout.write(text);
  if (labSkipped !== undefined) process.stdout.write(`(latency lab not run: ${labSkipped})\n`);
  log(
    `done in ${durationS.toFixed(0)} s; load average ${loadAtStart[0]!.toFixed(1)} at the start, ${os.loadavg()[0]!.toFixed(1)} at the end`,
  );

  const results = {
    benchmark: 'peers',
    date: startedAt.toISOString(),
    machine: {
      node: process.version,
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model ?? null,
      kernel: os.release(),
      /** 1, 5 and 15 minute load averages at the start and at the end of the run (2 CPUs shared with others). */
      loadAverageAtStart: loadAtStart.map((value) => round(value, 2)),
      loadAverage: os.loadavg().map((value) => round(value, 2)),
    },
    settings,
    labSkipped: labSkipped ?? null,
    sets: sets.map((set) => ({
      ...set,
      durationS: round(set.durationS),
      first: set.first.map((row) => ({
        ...row,
        latency: roundSummary(row.latency, 2),
        wallP50: round(row.wallP50, 2),
        ratioP50: round(row.ratioP50, 3),
        ratioMean: round(row.ratioMean, 3),
        timingsP50: Object.fromEntries(Object.entries(row.timingsP50).map(([key, value]) => [key, round(value, 3)])),
      })),
      keepAlive: set.keepAlive.map(roundLoadRun),
      crawl: set.crawl.map(roundLoadRun),
      throughput: set.throughput.map(roundLoadRun),
    })),
    aims: aims.map((aim) => ({
      ...aim,
      value: round(aim.value, 3),
      ...(aim.rounds
        ? {
            rounds: aim.rounds.map((r) => ({
              perSecond: Math.round(r.perSecond),
              libcurlPerSecond: Math.round(r.libcurlPerSecond),
              ratio: round(r.ratio, 3),
            })),
          }
        : {}),
    })),
    durationS: round(durationS),
  };
  const outFile = optionText('--out') ?? join(resultsDir, `peers-${stamp(startedAt)}.json`);
  mkdirSync(dirname(outFile), { recursive: true });
  writeFileSync(outFile, formatJson(results));
  log(`results written to ${outFile}`);
  const context: ChartContext = {
    date: results.date,
    loadAverage: [loadAtStart[0]!, os.loadavg()[0]!],
    cpus: results.machine.cpus,
    warmTls: settings.warmTls,
  };
  for (const file of writeCharts(outFile, results.sets, context)) log(`chart written to ${file}`);
  if (settings.profile) log(`CPU profiles (one per process and thread): ${profileDir}`);
}

function roundLoadRun(run: LoadRun) {
  return {
    ...run,
    perSecond: Math.round(run.perSecond),
    elapsedMs: round(run.elapsedMs),
    rounds: run.rounds.map((r) => ({
      ...r,
      elapsedMs: round(r.elapsedMs),
      perSecond: Math.round(r.perSecond),
      latency: roundSummary(r.latency, 3),
      ...(r.announceMs === undefined ? {} : { announceMs: round(r.announceMs) }),
      ...(r.cpuUsPerRequest === undefined ? {} : { cpuUsPerRequest: round(r.cpuUsPerRequest, 1) }),
    })),
  };
}

async function cleanup(): Promise<void> {
  for (const child of children) await child.stop().catch(() => {});
  for (const daemon of daemons) await daemon.stop().catch(() => {});
  if (labStarted) {
    try {
      labDown();
    } catch (error) {
      log(`rttlink down: ${(error as Error).message}`);
    }
    labStarted = false;
  }
  rmSync(tmp, { recursive: true, force: true });
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    log(`${signal}: cleaning up`);
    void cleanup().finally(() => process.exit(130));
  });
}

runBench(main, cleanup, log);
