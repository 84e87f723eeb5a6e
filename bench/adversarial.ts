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

import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import { join } from 'node:path';
import { SockpoolClient } from '../client/client.js';
import { option } from './lib/args.js';
import { type BenchDaemon, repoRoot, startBenchDaemon } from './lib/daemon.js';
import { runBench } from './lib/run.js';
import { round, Samples, summarize, table } from './lib/stats.js';

const rounds = option('--rounds', 6);
const requestsPerRound = option('--requests', 1_000);
const inFlight = 4;
const hostileUid = process.getuid?.() === 0 ? 65534 : undefined;
const hostileClient = join(repoRoot, 'test', 'fixtures', 'hostile-client.mjs');

function log(text: string): void {
  process.stderr.write(`${text}\n`);
}

let daemon: BenchDaemon | undefined;
let client: SockpoolClient | undefined;
let server: http.Server | undefined;
const dir = mkdtempSync(join(os.tmpdir(), 'sockpool-adversarial-'));
const hostiles = new Set<ChildProcess>();
let attacking = false;

/** Keeps one hostile mode running (a new process as soon as the last one ends) while `attacking`. */
function keepAttacking(args: string[]): Promise<void> {
  return new Promise((resolve) => {
    const next = () => {
      if (!attacking) {
        resolve();
        return;
      }
      const child = spawn(process.execPath, [hostileClient, ...args], {
        stdio: 'ignore',
        ...(hostileUid === undefined ? {} : { uid: hostileUid, gid: hostileUid }),
      });
      hostiles.add(child);
      child.once('exit', () => {
        hostiles.delete(child);
        next();
      });
    };
    next();
  });
}

async function main(): Promise<void> {
  server = http.createServer((request, response) => {
    response.setHeader('content-type', 'text/plain');
    response.end(request.url);
  });
  server.keepAliveTimeout = 60_000;
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as AddressInfo).port;
  daemon = await startBenchDaemon({
    dir,
    config: { access: { socketMode: '0666' }, pool: { defaults: { minIdle: 8, maxIdle: 32 } } },
    args: ['--allow', '127.0.0.1/32', '--allow-port', String(port)],
  });
  chmodSync(dir, 0o755);
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
  const origin = `http://127.0.0.1:${port}`;
  let next = 0;
  const request = async (samples: Samples) => {
    const path = `/honest-${next++}`;
    const started = performance.now();
    const response = await client!.request(`${origin}${path}`);
    samples.push((performance.now() - started) * 1000);
    if (response.status !== 200 || response.body.toString() !== path) {
      throw new Error(`honest request ${path} got ${response.status} ${JSON.stringify(response.body.toString())}`);
    }
  };
  const phase = async (samples: Samples) => {
    let issued = 0;
    await Promise.all(
      Array.from({ length: inFlight }, async () => {
        while (issued++ < requestsPerRound) await request(samples);
      }),
    );
  };
  log(`warm-up; hostile clients run as ${hostileUid === undefined ? 'this uid' : `uid ${hostileUid}`}`);
  await phase(new Samples());
  const quiet = new Samples();
  const hostile = new Samples();
  for (let i = 0; i < rounds; i++) {
    await phase(quiet);
    attacking = true;
    const socket = daemon.socketPath;
    const attacks = [
      keepAttacking(['write-release', socket, String(port), '200']),
      keepAttacking(['closed-keep', socket, String(port), '50']),
      keepAttacking(['prewarm', socket, String(port), '50']),
      keepAttacking(['garbage', socket, '20']),
    ];
    const flood = spawn(process.execPath, [hostileClient, 'sessions', socket, '100'], {
      stdio: 'ignore',
      ...(hostileUid === undefined ? {} : { uid: hostileUid, gid: hostileUid }),
    });
    hostiles.add(flood);
    await phase(hostile);
    attacking = false;
    flood.kill('SIGKILL');
    hostiles.delete(flood);
    for (const child of hostiles) child.kill('SIGKILL');
    await Promise.all(attacks);
    log(`round ${i + 1}/${rounds} done`);
  }
  const q = summarize(quiet.values());
  const h = summarize(hostile.values());
  const ms = (us: number) => String(round(us / 1000, 2));
  console.log(
    table([
      ['phase', 'requests', 'p50 ms', 'p99 ms', 'max ms'],
      ['quiet', String(q.count), ms(q.p50), ms(q.p99), ms(q.max)],
      ['hostile', String(h.count), ms(h.p50), ms(h.p99), ms(h.max)],
    ]),
  );
  console.log(
    `p50 ratio ${round(h.p50 / q.p50, 2)}, p99 ratio ${round(h.p99 / q.p99, 2)} (aim: p99 within 2x); ` +
      `every honest answer was its own (${q.count + h.count} checked)`,
  );
}

runBench(
  main,
  async () => {
    attacking = false;
    for (const child of hostiles) child.kill('SIGKILL');
    await client?.close();
    await daemon?.stop();
    server?.closeAllConnections();
    server?.close();
    rmSync(dir, { recursive: true, force: true });
  },
  log,
);
