// Relay cost on loopback (issue 11 aims): what relaying a warm TLS session costs against a client doing its own TLS.
//
//   1. HTTPS keep-alive, sequential small requests: sockpool with `threads: 0` over a relayed warm TLS session
//      against plain node-libcurl doing its own TLS on one kept-alive connection (aim: at least 0.8×);
//   2. a 100 MiB HTTPS download: sockpool (requestStream, threads: 0) over the relay against the curl CLI's own
//      HTTPS download (aim: at least 0.5×);
//   3. the daemon's relay CPU per MiB relayed (the relay threads' CPU counter over the downloads).
// Rounds alternate the peers. The origin (node:https, HTTP/1.1, a throwaway CA) runs in a child process, so that
// the blocking node-libcurl peer and the origin do not share a loop.
//
//   node dist/bench/relay.js [--quick] [--mib 100] [--out FILE]
//
// Results: bench/results/relay-<date>.json and an SVG chart of the ratios beside it.

import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { dirname, join } from 'node:path';
import { SockpoolClient } from '../client/index.js';
import { createTestPki } from '../test/helpers/tls.js';
import { flag, option, optionText } from './lib/args.js';
import { repoRoot, startBenchDaemon } from './lib/daemon.js';
import { BenchDaemonClient } from './lib/daemon-client.js';
import { formatJson, stamp } from './lib/json.js';
import { barChartSvg } from './lib/svg.js';

const require = createRequire(import.meta.url);
const { Easy } = require('node-libcurl') as typeof import('node-libcurl');

const quick = flag('--quick');
const mib = option('--mib', quick ? 20 : 100);
const rounds = quick ? 2 : 3;
const requests = quick ? 500 : 2000;

const ORIGIN = `
const https = require('node:https');
const [cert, key] = [process.env.CERT, process.env.KEY];
const block = Buffer.alloc(64 * 1024, 7);
const server = https.createServer({ cert, key }, (req, res) => {
  const big = /^\\/big\\?(\\d+)$/.exec(req.url);
  if (!big) { res.end('x'.repeat(100)); return; }
  const total = Number(big[1]);
  res.writeHead(200, { 'content-length': String(total) });
  let sent = 0;
  const write = () => {
    while (sent < total) {
      const n = Math.min(block.length, total - sent);
      sent += n;
      if (!res.write(n === block.length ? block : block.subarray(0, n))) { res.once('drain', write); return; }
    }
    res.end();
  };
  write();
});
server.keepAliveTimeout = 600000;
server.listen(0, '127.0.0.1', () => process.stdout.write(server.address().port + '\\n'));
`;

function progress(text: string): void {
  process.stderr.write(`\r\x1b[K${text}`);
}

async function main(): Promise<void> {
  const startedAt = new Date();
  const pki = createTestPki(['localhost']);
  const dir = mkdtempSync(join(os.tmpdir(), 'sockpool-bench-relay-'));
  const origin = spawn(process.execPath, ['-e', ORIGIN], {
    env: { ...process.env, CERT: pki.cert.toString(), KEY: pki.key.toString() },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const [line] = (await once(origin.stdout!, 'data')) as [Buffer];
  const port = Number(line.toString().trim());
  const base = `https://localhost:${port}`;
  const daemon = await startBenchDaemon({
    dir: join(dir, 'daemon'),
    config: { pool: { predictive: false } },
    args: ['--allow', '127.0.0.1/32', '--allow-port', String(port), '--warm-tls', '*', '--ca-file', pki.caFile],
  });
  const stats = new BenchDaemonClient(daemon.socketPath);
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, caFile: pki.caFile });
  const easy = new Easy();
  easy.setOpt('CAINFO_BLOB', null as unknown as string);
  easy.setOpt('CAINFO', pki.caFile);
  easy.setOpt('RESOLVE', [`localhost:${port}:127.0.0.1`]);
  easy.setOpt('WRITEFUNCTION', (data: Buffer) => data.length);
  easy.setOpt('URL', `${base}/small`);
  const results = {
    keepAlive: [] as Array<{ round: number; sockpoolReqPerS: number; libcurlReqPerS: number; ratio: number }>,
    download: [] as Array<{ round: number; sockpoolMiBPerS: number; curlMiBPerS: number; ratio: number }>,
    relayCpuMsPerMiB: 0,
  };
  try {
    // Warm-up: the relayed session and curl's connection exist before timing.
    for (let i = 0; i < 50; i++) {
      const response = await client.request(`${base}/small`);
      if (response.tls?.by !== 'daemon') throw new Error('not relayed: is warm TLS on?');
      easy.perform();
    }
    for (let round = 1; round <= rounds; round++) {
      const order = round % 2 === 0 ? ['libcurl', 'sockpool'] : ['sockpool', 'libcurl'];
      const perS: Record<string, number> = {};
      for (const peer of order) {
        progress(`keep-alive round ${round}/${rounds}: ${peer} (${requests} requests)`);
        const t0 = performance.now();
        if (peer === 'sockpool') for (let i = 0; i < requests; i++) await client.request(`${base}/small`);
        else for (let i = 0; i < requests; i++) easy.perform();
        perS[peer] = requests / ((performance.now() - t0) / 1000);
      }
      results.keepAlive.push({
        round,
        sockpoolReqPerS: Math.round(perS.sockpool!),
        libcurlReqPerS: Math.round(perS.libcurl!),
        ratio: Number((perS.sockpool! / perS.libcurl!).toFixed(3)),
      });
    }
    const bytes = mib * 1024 * 1024;
    const before = (await stats.stats()).tls as { cpuMicros: number; bytesFromOrigin: number };
    for (let round = 1; round <= rounds; round++) {
      const order = round % 2 === 0 ? ['curl', 'sockpool'] : ['sockpool', 'curl'];
      const rate: Record<string, number> = {};
      for (const peer of order) {
        progress(`download round ${round}/${rounds}: ${peer} (${mib} MiB)`);
        const t0 = performance.now();
        if (peer === 'sockpool') {
          const response = await client.requestStream(`${base}/big?${bytes}`, { timeoutMs: 600_000 });
          let got = 0;
          for await (const chunk of response.body) got += chunk.length;
          if (got !== bytes) throw new Error(`sockpool got ${got} of ${bytes} bytes`);
        } else {
          execFileSync('curl', [
            '-sS',
            '-o',
            '/dev/null',
            '--cacert',
            pki.caFile,
            '--resolve',
            `localhost:${port}:127.0.0.1`,
            `${base}/big?${bytes}`,
          ]);
        }
        rate[peer] = mib / ((performance.now() - t0) / 1000);
      }
      results.download.push({
        round,
        sockpoolMiBPerS: Number(rate.sockpool!.toFixed(1)),
        curlMiBPerS: Number(rate.curl!.toFixed(1)),
        ratio: Number((rate.sockpool! / rate.curl!).toFixed(3)),
      });
    }
    // The relay threads publish their CPU once a second.
    await new Promise((resolve) => setTimeout(resolve, 1200));
    const after = (await stats.stats()).tls as { cpuMicros: number; bytesFromOrigin: number };
    const relayedMiB = (after.bytesFromOrigin - before.bytesFromOrigin) / (1024 * 1024);
    results.relayCpuMsPerMiB = Number(((after.cpuMicros - before.cpuMicros) / 1000 / relayedMiB).toFixed(3));
    progress('');
  } finally {
    easy.close();
    await client.close();
    stats.close();
    await daemon.stop();
    origin.kill();
    rmSync(dir, { recursive: true, force: true });
    pki.cleanup();
  }
  const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
  const summary = {
    keepAliveRatioMedian: median(results.keepAlive.map((r) => r.ratio)),
    downloadRatioMedian: median(results.download.map((r) => r.ratio)),
    relayCpuMsPerMiB: results.relayCpuMsPerMiB,
    aims: { keepAlive: 0.8, download: 0.5 },
  };
  const report = {
    bench: 'relay',
    startedAt: startedAt.toISOString(),
    machine: { cpus: os.cpus().length, loadAverage: os.loadavg(), note: 'shared with other sessions' },
    settings: { quick, mib, rounds, requests },
    results,
    summary,
  };
  const outFile = optionText('--out') ?? join(repoRoot, 'bench', 'results', `relay-${stamp(startedAt)}.json`);
  mkdirSync(dirname(outFile), { recursive: true });
  writeFileSync(outFile, formatJson(report));
  writeFileSync(
    outFile.replace(/\.json$/, '.svg'),
    barChartSvg({
      title: 'Warm TLS relay on loopback: sockpool ÷ peer (median of rounds; higher is better)',
      bars: [
        { label: 'keep-alive req/s vs node-libcurl (own TLS)', value: summary.keepAliveRatioMedian, aim: 0.8 },
        { label: `${mib} MiB download vs curl CLI (own TLS)`, value: summary.downloadRatioMedian, aim: 0.5 },
      ],
    }),
  );
  console.log(JSON.stringify(summary));
  console.log(`results: ${outFile}`);
}

await main();
