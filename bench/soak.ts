// The soak: sockpoold and two clients (one with worker threads, one with `threads: 0`) under a steady mixed load for
// minutes, watched window by window for what a long-running service must not do: leak fds, grow without bound, slow
// down, or fail a request. Issue 14's "everything else stays" check for the hot-path changes, and a guard for any
// change that holds something per request or per lease.
//
//   npm run build && node dist/bench/soak.js [--minutes N] [--window-s N] [--in-flight N]
//
// (Give it minutes: in its first minute a client's RSS still grows as its heaps size themselves, and a 30 s run
// reads that as RSS that keeps growing.)
//
// Each client (fixtures/soak-client.ts, a process of its own) keeps `--in-flight` requests going (default 4) against
// an echo origin (Node's http server, a process of its own: fixtures/echo-origin.ts), in a mix of keep-alive
// requests, fresh leases (`connection: close`), fetch() with a streamed body and requests cancelled as they start;
// every answer is checked to be the request's own. Every `--window-s` (default 10 s) each client reports its window
// (requests, failures, latencies, its open fds), this process reads the daemon's fds from /proc, and
// each of the three processes is asked, through its inspector (`--inspect` on a loopback port of its own), for a full
// garbage collection and the heap left after it, in every thread (lib/inspector-heap.ts): what a leak in JavaScript
// would grow. Every process's RSS is read after that collection.
// At the end, bench/lib/soak-verdicts.ts compares the first and the last third of the windows (after the first):
// fds and the heap flat, requests/s and the p99 held, no failure; and the trend (MB a minute) of RSS beyond the heap V8
// keeps committed (its young generation widens in steps under load, by V8's choice: shown, not judged). Results:
// bench/results/soak-<date>.json.
//
// Nothing is timed in this process's own loop but the windows; its own fds and memory are not watched (it only reads
// /proc and JSON lines).
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { option } from './lib/args.js';
import { type BenchDaemon, repoRoot, startBenchDaemon } from './lib/daemon.js';
import { type EchoOrigin, startEchoOrigin } from './lib/echo-origins.js';
import { type InspectedHeap, inspectHeap, inspectorUrl } from './lib/inspector-heap.js';
import { formatJson, stamp } from './lib/json.js';
import { type BenchChild, fdCount, procStatusBytes, spawnChild } from './lib/proc.js';
import { runBench } from './lib/run.js';
import { type SoakWindow, soakVerdicts } from './lib/soak-verdicts.js';
import { median, table } from './lib/stats.js';

const minutes = option('--minutes', 10);
const windowS = option('--window-s', 10);
const inFlight = option('--in-flight', 4);

interface ClientWindow {
  completed: number;
  aborted: number;
  failures: number;
  failureSamples: string[];
  p50Ms: number;
  p99Ms: number;
  fds: number;
}

const CLIENTS = [
  { name: 'worker threads', threads: 1 },
  { name: 'threads: 0', threads: 0 },
] as const;

let daemon: BenchDaemon | undefined;
let origin: EchoOrigin | undefined;
const clients: BenchChild[] = [];
const inspected: InspectedHeap[] = [];
const tmp = mkdtempSync(join(os.tmpdir(), 'sockpool-soak-'));

async function main(): Promise<void> {
  const startedAt = new Date();
  origin = await startEchoOrigin('node', { dir: join(tmp, 'origin'), repoRoot });
  daemon = await startBenchDaemon({
    dir: join(tmp, 'daemon'),
    config: { pool: { predictive: true } },
    args: ['--allow', '127.0.0.0/8', '--allow-port', String(origin.port)],
    nodeArgs: [INSPECT],
  });
  const heaps = [await inspectorOf(daemon.process)];
  const originUrl = `http://127.0.0.1:${origin.port}`;
  for (const { threads } of CLIENTS) {
    const child = spawnChild([
      process.execPath,
      INSPECT,
      join(repoRoot, 'dist', 'bench', 'fixtures', 'soak-client.js'),
      JSON.stringify({ socketPath: daemon.socketPath, originUrl, threads, inFlight }),
    ]);
    await child.nextMessage((message: { ready?: boolean }) => message.ready === true);
    clients.push(child);
    heaps.push(await inspectorOf(child));
  }
  const windowCount = Math.max(4, Math.round((minutes * 60) / windowS));
  console.log(
    `soak: ${windowCount} windows of ${windowS} s; ${CLIENTS.map((c) => c.name).join(' and ')}, ${inFlight} in flight each`,
  );
  const windows: SoakWindow[] = [];
  const rows: string[][] = [
    [
      'window',
      'req/s',
      'p50 ms',
      'p99 ms',
      'cancelled',
      'failed',
      'fds: daemon / clients',
      'heap after GC MB',
      'V8 committed MB',
      'RSS MB: daemon / clients',
    ],
  ];
  const samples: string[] = [];
  const started = performance.now();
  let last = started;
  for (let w = 0; w < windowCount; w++) {
    await new Promise((resolve) => setTimeout(resolve, windowS * 1000));
    const replies = await Promise.all(
      clients.map((child) => {
        const reply = child.nextMessage((message: { window?: ClientWindow }) => message.window !== undefined);
        child.send('window');
        return reply.then((message) => (message as { window: ClientWindow }).window);
      }),
    );
    const now = performance.now();
    const seconds = (now - last) / 1000;
    // (The full collections below are not part of the next window's time: each stops its process for a few ms.)
    const afterGc = await Promise.all(heaps.map((heap) => heap.afterFullGc()));
    last = performance.now();
    const window: SoakWindow = {
      atS: (last - started) / 1000,
      perSecond: replies.reduce((sum, reply) => sum + reply.completed + reply.aborted, 0) / seconds,
      // (The clients' p99s, the larger: a window's tail is whichever client had it.)
      p99Ms: Math.max(...replies.map((reply) => reply.p99Ms)),
      failures: replies.reduce((sum, reply) => sum + reply.failures, 0),
      fds: { daemon: fdCount(daemon.pid) },
      heap: { daemon: afterGc[0]!.heapUsed + afterGc[0]!.external },
      committed: { daemon: afterGc[0]!.heapTotal },
      rss: { daemon: procStatusBytes(daemon.pid, 'VmRSS') },
    };
    CLIENTS.forEach((client, i) => {
      window.fds[client.name] = replies[i]!.fds;
      window.heap[client.name] = afterGc[i + 1]!.heapUsed + afterGc[i + 1]!.external;
      window.committed[client.name] = afterGc[i + 1]!.heapTotal;
      // (Read here, after the full collection, as the daemon's: the client's own reading came before it, with up to a
      // window's garbage in it, which V8 lets grow for minutes as it sizes its heap.)
      window.rss[client.name] = procStatusBytes(clients[i]!.pid, 'VmRSS');
    });
    for (const reply of replies) samples.push(...reply.failureSamples);
    windows.push(window);
    rows.push([
      String(w + 1),
      String(Math.round(window.perSecond)),
      median(replies.map((reply) => reply.p50Ms)).toFixed(2),
      window.p99Ms.toFixed(2),
      String(replies.reduce((sum, reply) => sum + reply.aborted, 0)),
      String(window.failures),
      Object.values(window.fds).join(' / '),
      Object.values(window.heap)
        .map((bytes) => mb(bytes, 1))
        .join(' / '),
      Object.values(window.committed)
        .map((bytes) => mb(bytes, 0))
        .join(' / '),
      Object.values(window.rss)
        .map((bytes) => mb(bytes, 0))
        .join(' / '),
    ]);
    process.stderr.write(`[progress] window ${w + 1}/${windowCount}\n`);
  }
  console.log(table(rows));
  if (samples.length > 0) console.log(`failures (first of each window):\n  ${samples.join('\n  ')}`);

  // The clients stop and close: every fd they held must be gone (their fds back to what a process starts with is
  // not asked: Node's own vary), and the daemon's lease fds with them.
  const stopped = await Promise.all(
    clients.map((child) => {
      const reply = child.nextMessage((message: { stopped?: unknown }) => message.stopped !== undefined);
      child.send('stop');
      return reply;
    }),
  );
  const verdicts = soakVerdicts(windows);
  console.log('\nAims:');
  for (const verdict of verdicts) {
    console.log(`  ${verdict.met ? 'met   ' : 'MISSED'}  ${verdict.aim}: ${verdict.value}`);
  }
  const resultsDir = join(repoRoot, 'bench', 'results');
  mkdirSync(resultsDir, { recursive: true });
  const outFile = join(resultsDir, `soak-${stamp(startedAt)}.json`);
  writeFileSync(
    outFile,
    formatJson({
      benchmark: 'soak',
      date: startedAt.toISOString(),
      settings: { minutes, windowS, inFlight, clients: CLIENTS },
      windows,
      stopped,
      verdicts,
      loadAverage: os.loadavg(),
    }),
  );
  console.log(`results written to ${outFile}`);
  if (verdicts.some((verdict) => !verdict.met)) process.exitCode = 1;
}

const mb = (bytes: number, digits: number) => (bytes / 1024 / 1024).toFixed(digits);

/** Each process's inspector, on a loopback port the kernel picks. */
const INSPECT = '--inspect=127.0.0.1:0';

async function inspectorOf(child: BenchChild): Promise<InspectedHeap> {
  for (let waited = 0; ; waited += 50) {
    const url = inspectorUrl(child.stderr());
    if (url) {
      const heap = await inspectHeap(url);
      inspected.push(heap);
      return heap;
    }
    if (waited > 10_000) throw new Error(`no inspector URL on stderr:\n${child.stderr()}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function cleanup(): Promise<void> {
  for (const heap of inspected) heap.close();
  for (const child of clients) await child.stop();
  await daemon?.stop();
  await origin?.stop();
  rmSync(tmp, { recursive: true, force: true });
}

runBench(main, cleanup, (text) => console.error(text));
