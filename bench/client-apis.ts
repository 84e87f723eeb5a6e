// The client's own APIs against each other, over loopback keep-alive (issue 14): `request()` (buffered),
// `requestStream()` and `fetch()` (streamed responses, each body read to the end), sequentially and with N in
// flight, for the default client (worker threads) and `threads: 0`, over http and https. What it shows: what a
// streamed request costs over a buffered one, and where each runs best. bench/peers.ts compares `request()` with
// other clients; this one compares sockpool with itself, and with another build (`--baseline DIR`: that build's
// dist/, whose clients run in the same rounds, for an A/B of a client change).
//
//   npm run build && node dist/bench/client-apis.js [--rounds N] [--seconds S] [--concurrency N] [--baseline DIR]
//     [--http-only | --https-only] [--api request|stream|fetch]
//
// Every client runs in this process (the origin and the daemon are child processes, started before anything is
// measured: a spawn from the measured process would make it pay for a fork). Each round runs every client once,
// in an order that alternates between rounds; each figure is the median of the rounds. CPU is this process's
// (every thread: the caller's, the worker threads', V8's) per request. Results go to
// bench/results/client-apis-<date>.json.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { flag, option, optionText } from './lib/args.js';
import { formatJson, stamp } from './lib/json.js';
import { startLoopbackLab } from './lib/loopback-lab.js';
import { median, table } from './lib/stats.js';

type Api = 'request' | 'stream' | 'fetch';
type Scheme = 'http' | 'https';

/** The part of SockpoolClient this benchmark uses (this build's or the baseline's). */
interface ApiClient {
  request(url: string): Promise<{ status: number; body: Uint8Array }>;
  requestStream(url: string): Promise<{ status: number; body: ReadableStream<Uint8Array> }>;
  fetch(url: string): Promise<Response>;
  close(): Promise<void>;
}

interface Variant {
  name: string;
  client: ApiClient;
}

const BODY_BYTES = 1024;
const rounds = option('--rounds', 3);
const seconds = option('--seconds', 1.5);
const concurrency = option('--concurrency', 16);
const baseline = optionText('--baseline');
const onlyApi = optionText('--api') as Api | undefined;
const schemes: Scheme[] = flag('--http-only') ? ['http'] : flag('--https-only') ? ['https'] : ['http', 'https'];
const apis: Api[] = onlyApi ? [onlyApi] : ['request', 'stream', 'fetch'];

const repoRoot = join(import.meta.dirname, '..', '..');
const lab = await startLoopbackLab('client-apis', BODY_BYTES);
const { daemon, pki } = lab;

async function clientsOf(dist: string, label: string): Promise<Variant[]> {
  const { SockpoolClient } = (await import(join(dist, 'client', 'index.js'))) as {
    SockpoolClient: new (options: Record<string, unknown>) => ApiClient;
  };
  const options = { socketPath: daemon.socketPath, caFile: pki.caFile };
  return [
    { name: `${label}default`, client: new SockpoolClient(options) },
    { name: `${label}threads: 0`, client: new SockpoolClient({ ...options, threads: 0 }) },
  ];
}

const variants = [
  ...(await clientsOf(join(repoRoot, 'dist'), '')),
  ...(baseline ? await clientsOf(resolve(baseline), 'baseline, ') : []),
];

/** One request through `api`, its body read to the end; throws unless it is the origin's 200 and whole body. */
async function once(client: ApiClient, api: Api, url: string): Promise<void> {
  let status: number;
  let bytes = 0;
  if (api === 'request') {
    const response = await client.request(url);
    status = response.status;
    bytes = response.body.byteLength;
  } else if (api === 'stream') {
    const response = await client.requestStream(url);
    status = response.status;
    for await (const chunk of response.body) bytes += chunk.byteLength;
  } else {
    const response = await client.fetch(url);
    status = response.status;
    bytes = (await response.arrayBuffer()).byteLength;
  }
  if (status !== 200 || bytes !== BODY_BYTES) throw new Error(`${api} ${url}: status ${status}, ${bytes} bytes`);
}

/** Requests for `seconds`, `width` at a time: requests per second and CPU µs per request. */
async function load(client: ApiClient, api: Api, url: string, width: number): Promise<[number, number]> {
  let count = 0;
  const cpuBefore = process.cpuUsage();
  const started = performance.now();
  const end = started + seconds * 1000;
  const loop = async () => {
    while (performance.now() < end) {
      await once(client, api, url);
      count++;
    }
  };
  await Promise.all(Array.from({ length: width }, loop));
  const elapsedS = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  return [count / elapsedS, (cpu.user + cpu.system) / count];
}

interface Row {
  scheme: Scheme;
  api: Api;
  inFlight: number;
  client: string;
  reqPerS: number;
  cpuUsPerReq: number;
  rounds: number[];
}

const rows: Row[] = [];
for (const scheme of schemes) {
  const url = lab.url(scheme);
  // Warm every client: its threads up, connections in each runtime, the code compiled.
  for (const { client } of variants) {
    for (const api of apis) await load(client, api, url, concurrency);
  }
  for (const api of apis) {
    for (const width of [1, concurrency]) {
      const rates = variants.map(() => [] as number[]);
      const cpus = variants.map(() => [] as number[]);
      for (let round = 0; round < rounds; round++) {
        const order = variants.map((_, i) => i);
        if (round % 2 === 1) order.reverse();
        for (const i of order) {
          const [rate, cpu] = await load(variants[i]!.client, api, url, width);
          rates[i]!.push(rate);
          cpus[i]!.push(cpu);
        }
      }
      variants.forEach((variant, i) => {
        rows.push({
          scheme,
          api,
          inFlight: width,
          client: variant.name,
          reqPerS: Math.round(median(rates[i]!)),
          cpuUsPerReq: Math.round(median(cpus[i]!)),
          rounds: rates[i]!.map(Math.round),
        });
      });
      process.stderr.write(`[progress] ${scheme} ${api} ${width} in flight done\n`);
    }
  }
}

for (const { client } of variants) await client.close();
await lab.close();

/** request()'s figure for the same scheme, load and client (the ratio column), none for request() itself. */
const requestRate = (row: Row) =>
  row.api === 'request'
    ? undefined
    : rows.find(
        (other) =>
          other.api === 'request' &&
          other.scheme === row.scheme &&
          other.inFlight === row.inFlight &&
          other.client === row.client,
      )?.reqPerS;

console.log(
  `\nLoopback keep-alive, ${BODY_BYTES}-byte bodies, median of ${rounds} rounds of ${seconds} s; ` +
    '"/ request()": the same client and load through request()\n',
);
console.log(
  table([
    ['scheme', 'api', 'in flight', 'client', 'req/s', 'CPU µs/req', '/ request()', 'per round'],
    ...rows.map((row) => {
      const base = requestRate(row);
      return [
        row.scheme,
        row.api,
        String(row.inFlight),
        row.client,
        row.reqPerS.toLocaleString('en-US'),
        String(row.cpuUsPerReq),
        base ? `${(row.reqPerS / base).toFixed(2)}x` : '',
        row.rounds.join(' '),
      ];
    }),
  ]),
);
const resultsDir = join(repoRoot, 'bench', 'results');
mkdirSync(resultsDir, { recursive: true });
const file = join(resultsDir, `client-apis-${stamp(new Date())}.json`);
writeFileSync(file, `${formatJson({ rounds, seconds, concurrency, baseline, rows })}\n`);
console.log(`\nresults written to ${file}`);
