// What one thread hop costs on this machine, against the kernel's floor (issue 14). The default client's sequential
// caller pays a round trip between its thread and a worker thread on every request (the request out, the outcome
// back); plain node-libcurl pays none. This measures that round trip with nothing else running:
//   - the kernel's floor: two threads of a C program (bench/fixtures/thread-hop.c, compiled here with `cc`) waking
//     each other through eventfds, each waiting in epoll_wait as an event loop does, pinned to two CPUs ("cross")
//     or both to CPU 0 ("same");
//   - Node: two threads exchanging a small message over a MessagePort with 'message' events, as the lanes do
//     (client/thread-lanes.ts, worker/lane.ts), on whichever CPUs the scheduler picks, and pinned to one CPU
//     (taskset -c 0);
//   - sockpool's lanes themselves: a sequential caller's requests through ThreadLanes to a thread whose lane
//     (worker/lane.ts) answers each a turn later with a small response (bench/fixtures/lane-echo.ts):
//     the default client's round trip without curl, the daemon or an origin;
// and prints the ceiling it puts on a sequential caller: a request that takes T µs on one thread takes at least
// T + hop with the hop, so the ratio to plain node-libcurl is at most T / (T + hop). T is --request-us (default 100:
// plain node-libcurl's keep-alive request over loopback on this kind of machine, bench/peers.ts --keep-alive-only).
//
//   npm run build && node dist/bench/thread-hop.js [--rounds N] [--count N] [--request-us T]
//
// Results go to bench/results/thread-hop-<date>.json. Each figure is the median of the rounds.

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MessageChannel, Worker } from 'node:worker_threads';
import { ThreadLanes } from '../client/thread-lanes.js';
import { epochNow, type TransferRequest } from '../worker/curl-engine.js';
import { LANE, type ThreadAnnouncement } from '../worker/lane-protocol.js';
import { flag, option } from './lib/args.js';
import { formatJson, stamp } from './lib/json.js';
import { median, table } from './lib/stats.js';

const repoRoot = join(import.meta.dirname, '..', '..');

interface Hop {
  /** Mean wall time per round trip, µs. */
  wallUs: number;
  /** The process's CPU time per round trip (both threads), µs. */
  cpuUs: number;
}

// --node-child / --lanes-child: one Node measurement in this process (the parent runs it under taskset or not),
// printed as JSON.
if (flag('--node-child') || flag('--lanes-child')) {
  const count = option('--count', 20_000);
  console.log(JSON.stringify(flag('--node-child') ? await nodePingPong(count) : await lanesRoundTrips(count)));
  process.exit(0);
}

async function lanesRoundTrips(count: number): Promise<Hop> {
  const lanes = new ThreadLanes(64);
  const thread = new Worker(join(import.meta.dirname, 'fixtures', 'lane-echo.js'));
  thread.on('message', (message: ThreadAnnouncement) => {
    if (message[LANE]) lanes.attach(message[LANE]);
  });
  const request = (): TransferRequest => ({
    url: 'http://127.0.0.1:9/x',
    method: 'GET',
    headers: [],
    deadline: epochNow() + 60_000,
    timeoutMs: 60_000,
  });
  const sequential = async (n: number) => {
    for (let i = 0; i < n; i++) {
      const outcome = await lanes.run(request(), undefined);
      if (!outcome.ok) throw new Error('the echo lane failed a request');
    }
  };
  await sequential(1_000); // untimed: the lane attached, both sides' code warmed up
  const wall = performance.now();
  const cpu = process.cpuUsage();
  await sequential(count);
  const used = process.cpuUsage(cpu);
  const hop = { wallUs: ((performance.now() - wall) * 1000) / count, cpuUs: (used.user + used.system) / count };
  lanes.close();
  await thread.terminate();
  return hop;
}

async function nodePingPong(count: number): Promise<Hop> {
  const { port1, port2 } = new MessageChannel();
  // The peer answers every message at once, as a worker lane answers a request with its outcome.
  const peer = new Worker(
    `const { workerData: port } = require('node:worker_threads');
     port.on('message', (message) => port.postMessage(message));`,
    { eval: true, workerData: port2, transferList: [port2] },
  );
  const message = [{ id: 1, outcome: { ok: true, status: 200 } }];
  const roundTrips = (n: number) =>
    new Promise<void>((resolve) => {
      let left = n;
      const onMessage = () => {
        if (--left === 0) {
          port1.off('message', onMessage);
          resolve();
        } else port1.postMessage(message);
      };
      port1.on('message', onMessage);
      port1.postMessage(message);
    });
  await roundTrips(1_000); // untimed: the peer's code warmed up
  const wall = performance.now();
  const cpu = process.cpuUsage();
  await roundTrips(count);
  const used = process.cpuUsage(cpu);
  const hop = { wallUs: ((performance.now() - wall) * 1000) / count, cpuUs: (used.user + used.system) / count };
  port1.close();
  await peer.terminate();
  return hop;
}

const rounds = option('--rounds', 5);
const count = option('--count', 20_000);
const requestUs = option('--request-us', 100);

function compileFloor(dir: string): string | undefined {
  const binary = join(dir, 'thread-hop');
  const compiled = spawnSync(
    'cc',
    ['-O2', '-pthread', join(repoRoot, 'bench', 'fixtures', 'thread-hop.c'), '-o', binary],
    {
      encoding: 'utf8',
    },
  );
  if (compiled.error || compiled.status !== 0) {
    console.log(`the kernel's floor not measured: cc failed (${compiled.error?.message ?? compiled.stderr.trim()})`);
    return undefined;
  }
  return binary;
}

function floor(binary: string, placement: 'cross' | 'same'): Hop {
  const [wallUs, cpuUs] = execFileSync(binary, [String(count * 2), placement], { encoding: 'utf8' })
    .trim()
    .split(' ')
    .map(Number);
  return { wallUs: wallUs!, cpuUs: cpuUs! };
}

function node(pinned: boolean, child = '--node-child'): Hop {
  const command = [process.execPath, import.meta.filename, child, '--count', String(count)];
  const [file, ...args] = pinned ? ['taskset', '-c', '0', ...command] : command;
  return JSON.parse(execFileSync(file!, args, { encoding: 'utf8' })) as Hop;
}

const cases: Array<{ name: string; measure: () => Hop }> = [];
const dir = mkdtempSync(join(tmpdir(), 'sockpool-thread-hop-'));
const binary = compileFloor(dir);
if (binary) {
  cases.push({ name: 'kernel floor (C, eventfd + epoll), two CPUs', measure: () => floor(binary, 'cross') });
  cases.push({ name: 'kernel floor (C, eventfd + epoll), one CPU', measure: () => floor(binary, 'same') });
}
cases.push({ name: "Node MessagePort 'message', unpinned", measure: () => node(false) });
cases.push({ name: "Node MessagePort 'message', one CPU", measure: () => node(true) });
cases.push({ name: 'sockpool lanes, an echo thread, unpinned', measure: () => node(false, '--lanes-child') });
cases.push({ name: 'sockpool lanes, an echo thread, one CPU', measure: () => node(true, '--lanes-child') });

const results: Array<{ name: string; rounds: Hop[]; wallUs: number; cpuUs: number; ceiling: number }> = [];
for (const { name, measure } of cases) {
  const measured: Hop[] = [];
  for (let round = 0; round < rounds; round++) measured.push(measure());
  const wallUs = median(measured.map((hop) => hop.wallUs));
  results.push({
    name,
    rounds: measured,
    wallUs,
    cpuUs: median(measured.map((hop) => hop.cpuUs)),
    ceiling: requestUs / (requestUs + wallUs),
  });
}
rmSync(dir, { recursive: true, force: true });

console.log(
  `One round trip between two threads, µs (median of ${rounds} rounds of ${count}); ceiling = the most a sequential ` +
    `caller with one such round trip per request can reach against a ${requestUs} µs request without it`,
);
console.log(
  table([
    ['case', 'wall µs', 'CPU µs', 'per-round wall µs', 'ceiling'],
    ...results.map((result) => [
      result.name,
      result.wallUs.toFixed(1),
      result.cpuUs.toFixed(1),
      result.rounds.map((hop) => hop.wallUs.toFixed(1)).join(' '),
      `${result.ceiling.toFixed(2)}x`,
    ]),
  ]),
);
const resultsDir = join(repoRoot, 'bench', 'results');
mkdirSync(resultsDir, { recursive: true });
const file = join(resultsDir, `thread-hop-${stamp(new Date())}.json`);
writeFileSync(file, `${formatJson({ rounds, count, requestUs, results })}\n`);
console.log(`results written to ${file}`);
