// Warm handoff benchmark (issue 3): how close sockpoold's acquire → lease comes to the raw cost of passing one fd
// between two Node processes, how many handoffs per second it sustains with 8 requesters in flight, and how much
// memory it needs to hold 10,000 idle warm sockets. One run measures the baselines and sockpoold side by side.
//
//   npm run bench                      full run (about a minute on 2 cores)
//   node dist/bench/handoff.js --quick short run (a few seconds of each part)
//
// Flags: --quick, --no-memory, --sockets N (memory part, default 10000), --origins N (default 100),
// --profile (daemon under node --cpu-prof, profile in bench/results/profiles), --strace (daemon under strace -c -f,
// summary in bench/results/), --out FILE (JSON results; default bench/results/handoff-<date>.json).
// docs/benchmarks.md explains every line of the output.

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import * as native from '../shared/native.js';
import { type BenchDaemon, repoRoot, startBenchDaemon } from './lib/daemon.js';
import { BenchDaemonClient, runHandoffs } from './lib/daemon-client.js';
import { type BenchChild, cpuTimeMs, fdCount, nofileLimit, procStatusBytes, spawnChild } from './lib/proc.js';
import { type LatencySummary, round, roundSummary, Samples, summarize, table } from './lib/stats.js';

// ---------------------------------------------------------------------------------------------------------------
// Settings.

const argv = process.argv.slice(2);
const flag = (name: string) => argv.includes(name);
function option(name: string, fallback: number): number {
  const index = argv.indexOf(name);
  if (index === -1) return fallback;
  const value = Number(argv[index + 1]);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${name} needs a positive number`);
  return value;
}
function optionText(name: string): string | undefined {
  const index = argv.indexOf(name);
  return index === -1 ? undefined : argv[index + 1];
}

const quick = flag('--quick');
const settings = {
  quick,
  /** Sequential samples per case and round; the rounds interleave the cases so drift hits all alike. */
  samplesPerRound: quick ? 1_000 : 5_000,
  rounds: quick ? 2 : 4,
  warmupRequests: quick ? 500 : 2_000,
  throughputMs: quick ? 1_000 : 4_000,
  inFlight: 8,
  memorySockets: option('--sockets', quick ? 2_000 : 10_000),
  memoryOrigins: option('--origins', quick ? 20 : 100),
  memory: !flag('--no-memory'),
  profile: flag('--profile'),
  strace: flag('--strace'),
};

const AIMS = { p50Ratio: 1.5, p99Ratio: 3, handoffsPerS: 20_000, rssBytes: 200 * 1024 * 1024 };
const HOST = '127.0.0.1';
const fixtures = join(import.meta.dirname, 'fixtures');
const resultsDir = join(repoRoot, 'bench', 'results');
const node = process.execPath;

function log(text: string): void {
  process.stderr.write(`${text}\n`);
}

// ---------------------------------------------------------------------------------------------------------------
// Baseline (a): 1-byte request, reply carrying one fd (SCM_RIGHTS), on a SOCK_SEQPACKET connection; the fd is
// closed on receipt. Both sides are driven by the addon's Poller, as sockpoold and its clients are.

class ScmBaseline {
  readonly fd: number;
  #poller: native.Poller;
  #onReply: (() => void) | undefined;
  static readonly request = Buffer.from([0x71]);

  constructor(path: string) {
    this.fd = native.seqpacketConnect(path);
    this.#poller = new native.Poller(this.fd, () => {
      for (;;) {
        const message = native.recvMessage(this.fd, 64, 1);
        if (message === null) return;
        if (message.eof) throw new Error('scm-server hung up');
        for (const fd of message.fds) native.close(fd);
        this.#onReply?.();
      }
    });
    this.#poller.start(native.READABLE | native.DISCONNECT);
  }

  /** `count` request/response pairs with `inFlight` outstanding; each latency goes to `onSample` (µs). */
  run(count: number, inFlight: number, onSample: (us: number) => void): Promise<{ count: number; elapsedMs: number }> {
    return new Promise((resolve) => {
      const sentAt: number[] = []; // FIFO: replies come back in request order on one connection
      let head = 0;
      let issued = 0;
      let done = 0;
      const started = performance.now();
      const issue = () => {
        issued++;
        sentAt.push(performance.now());
        if (native.sendMessage(this.fd, ScmBaseline.request, []) === null) throw new Error('scm-server not reading');
      };
      this.#onReply = () => {
        const now = performance.now();
        onSample((now - sentAt[head++]!) * 1000);
        done++;
        if (issued < count) issue();
        else if (done === count) {
          this.#onReply = undefined;
          resolve({ count, elapsedMs: now - started });
        }
      };
      for (let i = 0; i < inFlight && i < count; i++) issue();
    });
  }

  close(): void {
    this.#poller.close();
    native.close(this.fd);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Baseline (b): newline-delimited JSON request/response over a Unix stream socket with node:net.

class JsonBaseline {
  #socket: net.Socket;
  #buffered = '';
  #onReply: (() => void) | undefined;

  private constructor(socket: net.Socket) {
    this.#socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      this.#buffered += chunk;
      let newline = this.#buffered.indexOf('\n');
      while (newline !== -1) {
        JSON.parse(this.#buffered.slice(0, newline));
        this.#buffered = this.#buffered.slice(newline + 1);
        this.#onReply?.();
        newline = this.#buffered.indexOf('\n');
      }
    });
  }

  static async connect(path: string): Promise<JsonBaseline> {
    const socket = net.connect(path);
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new JsonBaseline(socket);
  }

  run(count: number, onSample: (us: number) => void): Promise<void> {
    return new Promise((resolve) => {
      let issued = 0;
      let sentAt = 0;
      const issue = () => {
        issued++;
        sentAt = performance.now();
        this.#socket.write(`${JSON.stringify({ type: 'acquire', id: issued, host: HOST, port: 443 })}\n`);
      };
      this.#onReply = () => {
        onSample((performance.now() - sentAt) * 1000);
        if (issued < count) issue();
        else {
          this.#onReply = undefined;
          resolve();
        }
      };
      issue();
    });
  }

  close(): void {
    this.#socket.destroy();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The run.

interface ThroughputResult {
  name: string;
  requesters: string;
  handoffs: number;
  elapsedMs: number;
  perSecond: number;
  latency: LatencySummary;
  warmFraction: number;
  daemonCpuPercent: number | null;
  daemonCpuUsPerHandoff: number | null;
}

const children: BenchChild[] = [];
const daemons: BenchDaemon[] = [];
const tmp = mkdtempSync(join(os.tmpdir(), 'sockpool-bench-'));

async function start(command: string[], nofile?: number): Promise<BenchChild> {
  const child = spawnChild(command, { nofile });
  children.push(child);
  return child;
}

async function main(): Promise<void> {
  const startedAt = new Date();
  const wallStart = performance.now();
  log(`sockpool warm handoff benchmark${quick ? ' (--quick)' : ''}: node ${process.version}, ${os.cpus().length} CPUs`);

  // Origin server, baseline servers, daemon.
  const sink = await start([node, join(fixtures, 'tcp-sink.js'), '1']);
  const [originPort] = (await sink.nextMessage<{ ports: number[] }>((m) => Array.isArray(m.ports))).ports;
  const port = originPort!;
  const scmPath = join(tmp, 'scm.sock');
  const jsonPath = join(tmp, 'json.sock');
  const scmServer = await start([node, join(fixtures, 'scm-server.js'), scmPath, String(port)]);
  const jsonServer = await start([node, join(fixtures, 'json-server.js'), jsonPath]);
  await scmServer.nextMessage((m) => m.ready === true);
  await jsonServer.nextMessage((m) => m.ready === true);

  const profileDir = join(resultsDir, 'profiles');
  const straceFile = join(resultsDir, `strace-${stamp(startedAt)}.txt`);
  if (settings.profile) mkdirSync(profileDir, { recursive: true });
  if (settings.strace) mkdirSync(resultsDir, { recursive: true });
  const daemon = await startBenchDaemon({
    dir: join(tmp, 'handoff'),
    config: {
      pool: {
        maxIdleTotal: 1_000,
        warmOnStartOrigins: 0,
        defaults: { minIdle: 32, maxIdle: 64, maxPerOrigin: 256, idleTtlMs: 3_600_000 },
      },
    },
    args: ['--allow', '127.0.0.1/32', '--allow-port', String(port)],
    nodeArgs: settings.profile ? ['--cpu-prof', '--cpu-prof-dir', profileDir] : [],
    wrap: settings.strace ? ['strace', '-c', '-f', '-o', straceFile] : undefined,
  });
  daemons.push(daemon);
  const client = new BenchDaemonClient(daemon.socketPath);
  await client.hello();
  await client.prewarm(HOST, port, 64);
  await until(async () => (await client.stats()).idle >= 64, 'prewarm of 64 sockets', 10_000);

  const scm = new ScmBaseline(scmPath);
  const json = await JsonBaseline.connect(jsonPath);

  // Warm-up: JIT, caches, the daemon's pool.
  log('warming up');
  await scm.run(settings.warmupRequests, 1, () => {});
  await json.run(settings.warmupRequests, () => {});
  let warmCount = 0;
  let totalCount = 0;
  const countWarm = (warm: boolean) => {
    totalCount++;
    if (warm) warmCount++;
  };
  await runHandoffs(client, {
    host: HOST,
    port,
    inFlight: 1,
    maxHandoffs: settings.warmupRequests,
    durationMs: 60_000,
    release: 'ack',
    onSample: (_us, warm) => countWarm(warm),
  });

  // 1 + 2a. Sequential latency, interleaved rounds.
  const scmSamples = new Samples(settings.samplesPerRound * settings.rounds);
  const jsonSamples = new Samples(settings.samplesPerRound * settings.rounds);
  const handoffSamples = new Samples(settings.samplesPerRound * settings.rounds);
  const sequentialCpuStart = safeCpu(daemon.pid);
  let sequentialHandoffs = 0;
  for (let round = 0; round < settings.rounds; round++) {
    log(`sequential latency: round ${round + 1}/${settings.rounds}`);
    await scm.run(settings.samplesPerRound, 1, (us) => scmSamples.push(us));
    await json.run(settings.samplesPerRound, (us) => jsonSamples.push(us));
    const { handoffs } = await runHandoffs(client, {
      host: HOST,
      port,
      inFlight: 1,
      maxHandoffs: settings.samplesPerRound,
      durationMs: 600_000,
      release: 'ack',
      onSample: (us, warm) => {
        handoffSamples.push(us);
        countWarm(warm);
      },
    });
    sequentialHandoffs += handoffs;
  }
  const sequentialCpuMs = diffCpu(sequentialCpuStart, safeCpu(daemon.pid));
  const scmSummary = summarize(scmSamples.values());
  const jsonSummary = summarize(jsonSamples.values());
  const handoffSummary = summarize(handoffSamples.values());

  // 2b. Throughput with 8 requesters in flight.
  const throughput: ThroughputResult[] = [];
  {
    log(`throughput: raw SCM_RIGHTS, ${settings.inFlight} pipelined`);
    const samples = new Samples();
    const started = performance.now();
    let count = 0;
    while (performance.now() - started < settings.throughputMs) {
      await scm.run(10_000, settings.inFlight, (us) => samples.push(us));
      count += 10_000;
    }
    const elapsedMs = performance.now() - started;
    throughput.push({
      name: '(a) raw SCM_RIGHTS req/resp',
      requesters: `1 connection, ${settings.inFlight} pipelined`,
      handoffs: count,
      elapsedMs,
      perSecond: (count / elapsedMs) * 1000,
      latency: summarize(samples.values()),
      warmFraction: Number.NaN,
      daemonCpuPercent: null,
      daemonCpuUsPerHandoff: null,
    });
  }
  const measure = async (
    name: string,
    requesters: string,
    run: (onSample: (us: number, warm: boolean) => void) => Promise<{ handoffs: number; elapsedMs: number }>,
  ) => {
    log(`throughput: ${name}, ${requesters}`);
    const samples = new Samples();
    let warm = 0;
    const cpuBefore = safeCpu(daemon.pid);
    const { handoffs, elapsedMs } = await run((us, isWarm) => {
      samples.push(us);
      countWarm(isWarm);
      if (isWarm) warm++;
    });
    const cpuMs = diffCpu(cpuBefore, safeCpu(daemon.pid));
    throughput.push({
      name,
      requesters,
      handoffs,
      elapsedMs,
      perSecond: (handoffs / elapsedMs) * 1000,
      latency: summarize(samples.values()),
      warmFraction: handoffs === 0 ? 0 : warm / samples.length,
      daemonCpuPercent: cpuMs === null ? null : (cpuMs / elapsedMs) * 100,
      daemonCpuUsPerHandoff: cpuMs === null ? null : (cpuMs * 1000) / handoffs,
    });
  };
  await measure('sockpoold warm handoff', `1 connection, ${settings.inFlight} pipelined`, (onSample) =>
    runHandoffs(client, {
      host: HOST,
      port,
      inFlight: settings.inFlight,
      maxHandoffs: Number.POSITIVE_INFINITY,
      durationMs: settings.throughputMs,
      release: 'fire',
      onSample,
    }),
  );
  await measure('sockpoold warm handoff', `${settings.inFlight} connections, 1 process`, async (onSample) => {
    const links = Array.from({ length: settings.inFlight }, () => new BenchDaemonClient(daemon.socketPath));
    await Promise.all(links.map((link) => link.hello()));
    const started = performance.now();
    const runs = await Promise.all(
      links.map((link) =>
        runHandoffs(link, {
          host: HOST,
          port,
          inFlight: 1,
          maxHandoffs: Number.POSITIVE_INFINITY,
          durationMs: settings.throughputMs,
          release: 'fire',
          onSample,
        }),
      ),
    );
    const elapsedMs = performance.now() - started;
    for (const link of links) link.close();
    return { handoffs: runs.reduce((sum, run) => sum + run.handoffs, 0), elapsedMs };
  });
  await measure('sockpoold warm handoff', `${settings.inFlight} processes, 1 each`, async (onSample) => {
    const clients = await Promise.all(
      Array.from({ length: settings.inFlight }, () =>
        start([
          node,
          join(fixtures, 'handoff-client.js'),
          daemon.socketPath,
          HOST,
          String(port),
          '1',
          '1',
          String(settings.throughputMs),
        ]),
      ),
    );
    await Promise.all(clients.map((child) => child.nextMessage((m) => m.ready === true)));
    for (const child of clients) child.send('go');
    const results = await Promise.all(
      clients.map((child) =>
        child.nextMessage<{ handoffs: number; elapsedMs: number; warm: number; samples: number[] }>(
          (m) => typeof m.handoffs === 'number',
        ),
      ),
    );
    for (const result of results) {
      result.samples.forEach((us, i) => {
        onSample(us, i < result.warm); // per-process warm count; exact split does not matter for the fraction
      });
    }
    for (const child of clients) await child.stop();
    // Conservative: the processes started within a millisecond of each other; take the longest run.
    return {
      handoffs: results.reduce((sum, r) => sum + r.handoffs, 0),
      elapsedMs: Math.max(...results.map((r) => r.elapsedMs)),
    };
  });

  const daemonStats = await client.stats();
  scm.close();
  json.close();
  client.close();
  const handoffRss = procStatusBytes(daemon.pid, 'VmRSS');
  await daemon.stop();

  // 3. Memory: idle warm sockets across many origins.
  const memory = settings.memory ? await measureMemory() : null;

  // Report.
  const ratio = (value: number, base: number) => value / base;
  const seq = {
    p50VsA: ratio(handoffSummary.p50, scmSummary.p50),
    p50VsB: ratio(handoffSummary.p50, jsonSummary.p50),
    p99VsA: ratio(handoffSummary.p99, scmSummary.p99),
    p99VsB: ratio(handoffSummary.p99, jsonSummary.p99),
  };
  const warmFraction = totalCount === 0 ? 0 : warmCount / totalCount;
  const daemonCpuUsPerSequentialHandoff =
    sequentialCpuMs === null ? null : (sequentialCpuMs * 1000) / Math.max(1, sequentialHandoffs);
  const best = throughput.filter((t) => t.name.startsWith('sockpoold'));
  const aims = {
    p50: { aim: `p50 ≤ ${AIMS.p50Ratio}× raw (a)`, value: seq.p50VsA, met: seq.p50VsA <= AIMS.p50Ratio },
    p99: { aim: `p99 ≤ ${AIMS.p99Ratio}× raw (a) p99`, value: seq.p99VsA, met: seq.p99VsA <= AIMS.p99Ratio },
    throughput: best.map((t) => ({
      aim: `> ${AIMS.handoffsPerS} handoffs/s, ${t.requesters}`,
      value: t.perSecond,
      met: t.perSecond > AIMS.handoffsPerS,
    })),
    memory:
      memory === null
        ? null
        : {
            aim: `RSS < ${AIMS.rssBytes / 1024 / 1024} MB holding ${memory.idleSockets} idle sockets`,
            value: memory.rssAfter,
            met: memory.rssAfter < AIMS.rssBytes && memory.idleSockets >= settings.memorySockets,
          },
  };

  const us = (value: number) => value.toFixed(1);
  const x = (value: number) => `${value.toFixed(2)}x`;
  const out: string[] = [];
  out.push('');
  out.push(
    `sockpool warm handoff benchmark — ${startedAt.toISOString()} — node ${process.version}, ` +
      `${os.cpus().length} × ${os.cpus()[0]?.model ?? 'cpu'}, Linux ${os.release()}${quick ? ' — QUICK RUN' : ''}`,
  );
  out.push('');
  out.push(
    `Sequential request/response latency, µs (${settings.rounds} interleaved rounds × ${settings.samplesPerRound} ` +
      'samples each, after warm-up):',
  );
  out.push(
    table([
      ['case', 'p50', 'p90', 'p99', 'p99.9', 'max', 'p50 / (a)', 'p50 / (b)', 'p99 / (a) p99'],
      ...[
        ['(a) raw SCM_RIGHTS req/resp, addon', scmSummary],
        ['(b) JSON req/resp, node:net unix stream', jsonSummary],
        ['sockpoold warm handoff: acquire → lease', handoffSummary],
      ].map(([name, s]) => {
        const summary = s as LatencySummary;
        return [
          name as string,
          us(summary.p50),
          us(summary.p90),
          us(summary.p99),
          us(summary.p999),
          us(summary.max),
          x(summary.p50 / scmSummary.p50),
          x(summary.p50 / jsonSummary.p50),
          x(summary.p99 / scmSummary.p99),
        ];
      }),
    ]),
  );
  out.push(
    `warm fraction of all sockpoold handoffs: ${(warmFraction * 100).toFixed(2)}% (${warmCount}/${totalCount}); ` +
      `daemon CPU per sequential handoff (incl. the acked release): ${
        daemonCpuUsPerSequentialHandoff === null ? 'n/a' : `${daemonCpuUsPerSequentialHandoff.toFixed(1)} µs`
      }`,
  );
  out.push('');
  out.push(
    `Throughput, ${settings.inFlight} requesters in flight, ${settings.throughputMs} ms each (release fire-and-forget):`,
  );
  out.push(
    table([
      ['case', 'requesters', 'per second', 'p50 µs', 'p99 µs', 'warm', 'daemon CPU', 'daemon µs/handoff'],
      ...throughput.map((t) => [
        t.name,
        t.requesters,
        Math.round(t.perSecond).toLocaleString('en-US'),
        us(t.latency.p50),
        us(t.latency.p99),
        Number.isNaN(t.warmFraction) ? '-' : `${(t.warmFraction * 100).toFixed(1)}%`,
        t.daemonCpuPercent === null ? '-' : `${t.daemonCpuPercent.toFixed(0)}%`,
        t.daemonCpuUsPerHandoff === null ? '-' : t.daemonCpuUsPerHandoff.toFixed(1),
      ]),
    ]),
  );
  if (memory) {
    out.push('');
    out.push(`Memory: daemon holding idle warm sockets (${memory.origins} origins on ${HOST}):`);
    out.push(
      table([
        ['idle sockets', 'RSS before', 'RSS after', 'peak RSS (VmHWM)', 'bytes per socket', 'daemon fds', 'warm-up'],
        [
          String(memory.idleSockets),
          mb(memory.rssBefore),
          mb(memory.rssAfter),
          mb(memory.hwm),
          Math.round(memory.bytesPerSocket).toLocaleString('en-US'),
          String(memory.fds),
          `${(memory.warmMs / 1000).toFixed(1)} s`,
        ],
      ]),
    );
  }
  out.push('');
  out.push('Aims (issue 3):');
  const verdict = (met: boolean) => (met ? 'MET' : 'MISSED');
  out.push(`  ${verdict(aims.p50.met)}  ${aims.p50.aim}: ${x(aims.p50.value)}`);
  out.push(`  ${verdict(aims.p99.met)}  ${aims.p99.aim}: ${x(aims.p99.value)}`);
  for (const t of aims.throughput) {
    out.push(`  ${verdict(t.met)}  ${t.aim}: ${Math.round(t.value).toLocaleString('en-US')}/s`);
  }
  if (aims.memory) out.push(`  ${verdict(aims.memory.met)}  ${aims.memory.aim}: ${mb(aims.memory.value)}`);
  if (settings.profile) out.push(`CPU profile of the handoff daemon: ${profileDir}`);
  if (settings.strace) out.push(`strace -c of the handoff daemon: ${straceFile}`);
  out.push(`(run took ${((performance.now() - wallStart) / 1000).toFixed(1)} s)`);
  process.stdout.write(`${out.join('\n')}\n`);

  const results = {
    benchmark: 'handoff',
    date: startedAt.toISOString(),
    quick,
    machine: {
      node: process.version,
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model ?? null,
      kernel: os.release(),
      totalMemBytes: os.totalmem(),
    },
    settings,
    sequential: {
      rawScm: roundSummary(scmSummary),
      jsonNet: roundSummary(jsonSummary),
      handoff: roundSummary(handoffSummary),
      ratios: {
        p50VsA: round(seq.p50VsA, 3),
        p50VsB: round(seq.p50VsB, 3),
        p99VsA: round(seq.p99VsA, 3),
        p99VsB: round(seq.p99VsB, 3),
      },
      daemonCpuUsPerHandoff: daemonCpuUsPerSequentialHandoff === null ? null : round(daemonCpuUsPerSequentialHandoff),
    },
    warmFraction: round(warmFraction, 5),
    throughput: throughput.map((t) => ({
      ...t,
      perSecond: Math.round(t.perSecond),
      elapsedMs: round(t.elapsedMs),
      latency: roundSummary(t.latency),
      warmFraction: Number.isNaN(t.warmFraction) ? null : round(t.warmFraction, 5),
      daemonCpuPercent: t.daemonCpuPercent === null ? null : round(t.daemonCpuPercent),
      daemonCpuUsPerHandoff: t.daemonCpuUsPerHandoff === null ? null : round(t.daemonCpuUsPerHandoff),
    })),
    handoffDaemon: { rssBytes: handoffRss, hits: daemonStats.hits, misses: daemonStats.misses },
    memory,
    aims,
    durationS: round((performance.now() - wallStart) / 1000),
  };
  const outFile = optionText('--out') ?? join(resultsDir, `handoff-${stamp(startedAt)}.json`);
  mkdirSync(join(outFile, '..'), { recursive: true });
  writeFileSync(outFile, `${JSON.stringify(results, null, 2)}\n`);
  log(`results written to ${outFile}`);
}

interface MemoryResult {
  origins: number;
  idleSockets: number;
  rssBefore: number;
  rssAfter: number;
  hwm: number;
  bytesPerSocket: number;
  fds: number;
  daemonNofile: number;
  serverNofile: number;
  serverAccepted: number;
  warmMs: number;
}

async function measureMemory(): Promise<MemoryResult> {
  const origins = settings.memoryOrigins;
  const perOrigin = Math.ceil(settings.memorySockets / origins);
  const target = perOrigin * origins;
  log(`memory: ${origins} origins × ${perOrigin} idle sockets`);
  const sink = await start([node, join(fixtures, 'tcp-sink.js'), String(origins)], 65_536);
  const { ports } = await sink.nextMessage<{ ports: number[] }>((m) => Array.isArray(m.ports));
  const daemon = await startBenchDaemon({
    dir: join(tmp, 'memory'),
    config: {
      pool: {
        maxIdleTotal: target + 1_000,
        warmOnStartOrigins: 0,
        defaults: { minIdle: perOrigin, maxIdle: perOrigin, maxPerOrigin: perOrigin + 16, idleTtlMs: 3_600_000 },
      },
    },
    args: ['--allow', '127.0.0.0/8', ...ports.flatMap((p) => ['--allow-port', String(p)])],
    nofile: 65_536,
  });
  daemons.push(daemon);
  const daemonNofile = nofileLimit(daemon.pid);
  const serverNofile = nofileLimit(sink.pid);
  if (Math.min(daemonNofile, serverNofile) < target + 256) {
    throw new Error(
      `fd limits too low for ${target} sockets (daemon ${daemonNofile}, server ${serverNofile}); ` +
        'raise the hard RLIMIT_NOFILE or pass --sockets',
    );
  }
  const client = new BenchDaemonClient(daemon.socketPath);
  await client.hello();
  await sleep(1_000);
  const rssBefore = procStatusBytes(daemon.pid, 'VmRSS');
  const started = performance.now();
  const batch = 10;
  for (let i = 0; i < ports.length; i += batch) {
    const slice = ports.slice(i, i + batch);
    for (const p of slice) await client.prewarm(HOST, p, perOrigin);
    const want = Math.min(target, (i + slice.length) * perOrigin);
    await until(async () => (await client.stats()).idle >= want, `${want} idle sockets`, 60_000);
  }
  const warmMs = performance.now() - started;
  // Let the connect burst's garbage be collected as it would be in a daemon that has been up a while.
  await sleep(3_000);
  const stats = await client.stats();
  const rssAfter = procStatusBytes(daemon.pid, 'VmRSS');
  const hwm = procStatusBytes(daemon.pid, 'VmHWM');
  const fds = fdCount(daemon.pid);
  sink.send('count');
  const { accepted } = await sink.nextMessage<{ accepted: number }>((m) => typeof m.accepted === 'number');
  client.close();
  await daemon.stop();
  await sink.stop();
  return {
    origins,
    idleSockets: stats.idle,
    rssBefore,
    rssAfter,
    hwm,
    bytesPerSocket: (rssAfter - rssBefore) / Math.max(1, stats.idle),
    fds,
    daemonNofile,
    serverNofile,
    serverAccepted: accepted,
    warmMs,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Helpers.

async function until(check: () => Promise<boolean>, what: string, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await check())) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** CPU ms of a process, or null when it cannot be read (e.g. wrapped in strace: the pid is strace's). */
function safeCpu(pid: number): number | null {
  if (settings.strace) return null;
  try {
    return cpuTimeMs(pid);
  } catch {
    return null;
  }
}

function diffCpu(before: number | null, after: number | null): number | null {
  return before === null || after === null ? null : after - before;
}

function mb(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function stamp(date: Date): string {
  return date
    .toISOString()
    .replace(/[:.]/g, '-')
    .replace(/-\d{3}Z$/, 'Z');
}

async function cleanup(): Promise<void> {
  for (const daemon of daemons) await daemon.stop().catch(() => {});
  for (const child of children) await child.stop().catch(() => {});
  rmSync(tmp, { recursive: true, force: true });
}

main().then(
  async () => {
    await cleanup();
    process.exit(0);
  },
  async (error: unknown) => {
    log(`benchmark failed: ${(error as Error).stack ?? String(error)}`);
    await cleanup();
    process.exit(1);
  },
);
