// One request at a time over loopback keep-alive (issue 14's sequential aim): the `threads: 0` client's request()
// against plain node-libcurl's loop (one Multi, a reused Easy, URL and RESOLVE set per request, as
// fixtures/peer-runner.ts does), all in this process, with CPU and allocation per request. bench/peers.ts measures
// the aim itself (each client in a process of its own); this one says where a difference in the client's own work
// per request comes from, and A/Bs a change (`--baseline DIR`: another build's dist/, whose `threads: 0` client
// runs in the same rounds).
//
//   npm run build && node dist/bench/sequential.js [--rounds N] [--requests N] [--https] [--baseline DIR]
//     [--heap] [--cpu-prof DIR] [--only sockpool|baseline|libcurl]
//
// Each round runs every variant once (`--requests` each, default 5,000), in an order that alternates between rounds;
// figures are medians of the rounds (a ratio: the median of the rounds' ratios, each of two runs next to each other).
// CPU is this process's (all its threads) per request. The variants share one heap: a garbage collection one of
// them causes (or objects one keeps past scavenges) is paid by whichever runs then, so a change in garbage shows in
// no variant's CPU here; `--only sockpool|baseline|libcurl` runs one variant alone, and a few such processes in
// turn are the A/B for that (docs/benchmarks.md, twentieth session). --heap: afterwards, each
// variant's allocations per request from V8's sampling heap profiler, young objects included (what the scavenges
// collect is most of it). --cpu-prof DIR: afterwards, a CPU profile of each variant's run (one .cpuprofile each;
// node dist/bench/profile-summary.js DIR summarizes; with --heap, each heap profile as a .heapprofile beside it).

import { mkdirSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import type { Easy } from 'node-libcurl';
import { flag, option, optionText } from './lib/args.js';
import { startLoopbackLab } from './lib/loopback-lab.js';
import { median, table } from './lib/stats.js';

const BODY_BYTES = 1024;
const rounds = option('--rounds', 5);
const requests = option('--requests', 5_000);
const baseline = optionText('--baseline');
const heap = flag('--heap');
const cpuProfileDir = optionText('--cpu-prof');
const scheme = flag('--https') ? 'https' : 'http';

const repoRoot = join(import.meta.dirname, '..', '..');
const lab = await startLoopbackLab('sequential', BODY_BYTES);
const { daemon, pki } = lab;
const url = lab.url(scheme);

interface Variant {
  name: string;
  /** One request, its whole body in; throws unless it is the origin's 200 and body. */
  once(): Promise<void>;
  close(): Promise<void>;
}

async function sockpoolOf(dist: string, name: string): Promise<Variant> {
  const { SockpoolClient } = (await import(join(dist, 'client', 'index.js'))) as {
    SockpoolClient: new (
      options: Record<string, unknown>,
    ) => {
      request(url: string): Promise<{ status: number; body: Uint8Array }>;
      close(): Promise<void>;
    };
  };
  const client = new SockpoolClient({ socketPath: daemon.socketPath, caFile: pki.caFile, threads: 0 });
  return {
    name,
    once: async () => {
      const response = await client.request(url);
      if (response.status !== 200 || response.body.byteLength !== BODY_BYTES) {
        throw new Error(`${name}: status ${response.status}, ${response.body.byteLength} bytes`);
      }
    },
    close: () => client.close(),
  };
}

/** Plain node-libcurl as bench/fixtures/peer-runner.ts runs it (CurlSession), one transfer at a time. */
async function libcurl(): Promise<Variant> {
  const { Easy, Multi } = await import('node-libcurl');
  const multi = new Multi();
  multi.setOpt('MAXCONNECTS', 256);
  let waiting: ((code: number) => void) | undefined;
  multi.onMessage((_error, easy, code) => {
    multi.removeHandle(easy);
    const resolveIt = waiting;
    waiting = undefined;
    // (No callback scope here: the next turn delivers the outcome, as peer-runner.ts does.)
    setImmediate(() => resolveIt?.(code));
  });
  const easy: Easy = new Easy();
  let bytes = 0;
  easy.setOpt('NOSIGNAL', true);
  easy.setOpt('CAINFO_BLOB', null);
  easy.setOpt('CAINFO', pki.caFile);
  easy.setOpt('WRITEFUNCTION', (data: Buffer) => {
    bytes += data.length;
    return data.length;
  });
  const resolveEntry = `127.0.0.1:${scheme === 'http' ? lab.httpPort : lab.httpsPort}:127.0.0.1`;
  return {
    name: 'node-libcurl',
    once: () => {
      bytes = 0;
      easy.setOpt('URL', url);
      easy.setOpt('RESOLVE', [resolveEntry]);
      return new Promise<void>((resolveIt, reject) => {
        waiting = (code) => {
          const status = Number(easy.getInfo('RESPONSE_CODE').data ?? 0);
          if (code !== 0 || status !== 200 || bytes !== BODY_BYTES) {
            reject(new Error(`node-libcurl: code ${code}, status ${status}, ${bytes} bytes`));
          } else resolveIt();
        };
        multi.addHandle(easy);
      });
    },
    close: async () => {
      await new Promise((resolveIt) => setImmediate(resolveIt));
      multi.close();
      easy.close();
    },
  };
}

const only = optionText('--only');
const variants: Variant[] = [
  ...(only === undefined || only === 'sockpool' ? [await sockpoolOf(join(repoRoot, 'dist'), 'threads: 0')] : []),
  ...(baseline && (only === undefined || only === 'baseline')
    ? [await sockpoolOf(resolve(baseline), 'threads: 0 (baseline)')]
    : []),
  ...(only === undefined || only === 'libcurl' ? [await libcurl()] : []),
];
const libcurlAt = variants.findIndex((variant) => variant.name === 'node-libcurl');
const baselineAt = variants.findIndex((variant) => variant.name.endsWith('(baseline)'));

async function run(variant: Variant, count: number): Promise<{ cpuUs: number; rate: number }> {
  const cpuBefore = process.cpuUsage();
  const started = performance.now();
  for (let i = 0; i < count; i++) await variant.once();
  const elapsedS = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  return { cpuUs: (cpu.user + cpu.system) / count, rate: count / elapsedS };
}

// Warm-up: connections made, code compiled.
for (const variant of variants) await run(variant, 2_000);

const cpus = variants.map(() => [] as number[]);
const rates = variants.map(() => [] as number[]);
for (let round = 0; round < rounds; round++) {
  const order = variants.map((_, i) => i);
  if (round % 2 === 1) order.reverse();
  for (const i of order) {
    const { cpuUs, rate } = await run(variants[i]!, requests);
    cpus[i]!.push(cpuUs);
    rates[i]!.push(rate);
  }
}

function fileName(variant: Variant): string {
  return variant.name.replace(/[^a-z0-9]+/gi, '-').replace(/-$/, '');
}

/** Bytes allocated per request (sampled, young objects included). */
const allocated = new Map<string, number>();
if (heap || cpuProfileDir) {
  const session = new Session();
  session.connect();
  if (cpuProfileDir) mkdirSync(cpuProfileDir, { recursive: true });
  for (const variant of variants) {
    if (heap) {
      await session.post('HeapProfiler.enable');
      await session.post('HeapProfiler.startSampling', {
        samplingInterval: 256,
        includeObjectsCollectedByMajorGC: true,
        includeObjectsCollectedByMinorGC: true,
      });
      await run(variant, requests);
      const { profile } = await session.post('HeapProfiler.stopSampling');
      let bytes = 0;
      const pending = [profile.head];
      while (pending.length > 0) {
        const node = pending.pop()!;
        bytes += node.selfSize;
        pending.push(...node.children);
      }
      allocated.set(variant.name, bytes / requests);
      if (cpuProfileDir) {
        writeFileSync(join(cpuProfileDir, `${fileName(variant)}.heapprofile`), JSON.stringify(profile));
      }
      await session.post('HeapProfiler.disable');
    }
    if (cpuProfileDir) {
      await session.post('Profiler.enable');
      await session.post('Profiler.setSamplingInterval', { interval: 100 });
      await session.post('Profiler.start');
      await run(variant, requests);
      const { profile } = await session.post('Profiler.stop');
      const file = join(cpuProfileDir, `${fileName(variant)}.cpuprofile`);
      writeFileSync(file, JSON.stringify(profile));
      await session.post('Profiler.disable');
    }
  }
  session.disconnect();
}

for (const variant of variants) await variant.close();
await lab.close();

const load = loadavg().map((value) => value.toFixed(1));
console.log(
  `\n${scheme} keep-alive, one request at a time, ${BODY_BYTES}-byte bodies, median of ${rounds} rounds of ` +
    `${requests} requests (load average ${load.join(' ')})\n`,
);
console.log(
  table([
    [
      'client',
      'CPU µs/req',
      'req/s',
      'req/s / node-libcurl',
      'CPU / node-libcurl',
      'CPU / baseline',
      'KB allocated/req',
      'CPU µs/req per round',
    ],
    ...variants.map((variant, i) => {
      const kb = allocated.get(variant.name);
      return [
        variant.name,
        median(cpus[i]!).toFixed(1),
        Math.round(median(rates[i]!)).toString(),
        libcurlAt < 0 ? '' : `${median(rates[i]!.map((rate, r) => rate / rates[libcurlAt]![r]!)).toFixed(2)}x`,
        libcurlAt < 0 ? '' : `${median(cpus[i]!.map((cpu, r) => cpu / cpus[libcurlAt]![r]!)).toFixed(2)}x`,
        baselineAt < 0 ? '' : `${median(cpus[i]!.map((cpu, r) => cpu / cpus[baselineAt]![r]!)).toFixed(2)}x`,
        kb === undefined ? '' : (kb / 1024).toFixed(2),
        cpus[i]!.map((cpu) => cpu.toFixed(0)).join(' '),
      ];
    }),
  ]),
);
