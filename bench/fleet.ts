// The fleet's aims (issue 12, docs/fleet.md), on one machine: three sockpoold sharing one real redis-server.
//
// 1. Cap: maxPerOriginFleet = 10 for one origin, load from clients of all three daemons (more requests in flight
//    than the cap). The origin, a bare TCP server answering with `Connection: close`, counts its open connections
//    (a FIN the kernel has delivered counts as closed, read or not): the most at once must be <= 10.
// 2. Rate: requestsPerSecond = 50 (burst 5) for another origin, load from all three for --seconds (default 30):
//    the rate the origin saw over the run, from its first request to its last, must be within 5% of 50.
//
// `npm run bench:fleet [-- --seconds 30]`. Prints a table and JSON; exits 1 when an aim is missed.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SockpoolClient } from '../client/client.js';
import { type CountingOrigin, countingOrigin } from '../test/helpers/counting-origin.js';
import { type RedisServer, startRedis } from '../test/helpers/redis.js';
import { option } from './lib/args.js';
import { type BenchDaemon, startBenchDaemon } from './lib/daemon.js';
import { runBench } from './lib/run.js';

const seconds = option('--seconds', 30);
const CAP = 10;
const RATE = 50;
// A little burst absorbs timer and scheduling jitter (with burst 1 a token not asked for the moment it is due is lost); over
// the run it adds at most BURST requests.
const BURST = 5;

let redis: RedisServer | undefined;
const daemons: BenchDaemon[] = [];
const clients: SockpoolClient[] = [];
const origins: CountingOrigin[] = [];
const dirs: string[] = [];

async function main(): Promise<void> {
  redis = await startRedis();
  // Answers after 5 ms: the cap's origin closes each connection after it (one request, one slot).
  const capped = await countingOrigin(5);
  const rated = await countingOrigin(5, true);
  origins.push(capped, rated);
  for (let i = 0; i < 3; i++) {
    const dir = mkdtempSync(join(tmpdir(), 'sockpool-bench-fleet-'));
    dirs.push(dir);
    daemons.push(
      await startBenchDaemon({
        dir,
        config: {
          fleet: { redis: redis.url },
          pool: {
            predictive: false,
            origins: [
              { match: `127.0.0.1:${capped.port}`, maxPerOriginFleet: CAP },
              { match: `127.0.0.1:${rated.port}`, requestsPerSecond: RATE, burst: BURST },
            ],
          },
        },
        args: ['--allow', '127.0.0.1/32', '--allow-port', String(capped.port), '--allow-port', String(rated.port)],
      }),
    );
  }
  for (const daemon of daemons) {
    clients.push(new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, concurrencyPerThread: 16 }));
  }

  // 1. The cap: 3 × 16 requests in flight against a cap of 10, for a third of the run.
  const capUntil = performance.now() + (seconds * 1000) / 3;
  let capRequests = 0;
  let capFailures = 0;
  // Requests answered through each daemon: the fleet's queue of waiters shares the slots out between them.
  const capAnswered = clients.map(() => 0);
  await Promise.all(
    clients.flatMap((client, daemon) =>
      Array.from({ length: 16 }, async () => {
        while (performance.now() < capUntil) {
          try {
            await client.request(`http://127.0.0.1:${capped.port}/c${capRequests++}`);
            capAnswered[daemon]!++;
          } catch {
            capFailures++;
          }
        }
      }),
    ),
  );

  // 2. The rate: 3 × 16 requests in flight against 50/s, for the whole run.
  const rateUntil = performance.now() + seconds * 1000;
  let rateFailures = 0;
  await Promise.all(
    clients.flatMap((client) =>
      Array.from({ length: 16 }, async (_, i) => {
        while (performance.now() < rateUntil) {
          try {
            await client.request(`http://127.0.0.1:${rated.port}/r${i}`, { timeoutMs: 60_000 });
          } catch {
            rateFailures++;
          }
        }
      }),
    ),
  );
  const first = rated.arrivals[0] ?? 0;
  const last = rated.arrivals.at(-1) ?? 0;
  const measured = (rated.arrivals.length - 1) / ((last - first) / 1000);
  const capOk = capped.maxOpen <= CAP && capFailures === 0;
  const rateOk = Math.abs(measured - RATE) / RATE <= 0.05 && rateFailures === 0;
  const result = {
    cap: {
      cap: CAP,
      maxOpenAtOrigin: capped.maxOpen,
      requests: capped.arrivals.length,
      failures: capFailures,
      answeredPerDaemon: capAnswered,
    },
    rate: {
      rate: RATE,
      measuredPerS: Number(measured.toFixed(2)),
      errorPercent: Number(((Math.abs(measured - RATE) / RATE) * 100).toFixed(2)),
      requests: rated.arrivals.length,
      seconds: Number(((last - first) / 1000).toFixed(1)),
      failures: rateFailures,
    },
  };
  console.log(
    `cap ${CAP}: the origin saw at most ${capped.maxOpen} open at once over ${capped.arrivals.length} requests (${capOk ? 'aim met' : 'AIM MISSED'}); answered through each daemon: ${capAnswered.join(', ')}`,
  );
  console.log(
    `rate ${RATE}/s: ${result.rate.measuredPerS}/s over ${result.rate.seconds} s, ${result.rate.requests} requests, ` +
      `${result.rate.errorPercent}% off (${rateOk ? 'aim met' : 'AIM MISSED'})`,
  );
  console.log(JSON.stringify(result));
  if (!capOk || !rateOk) throw new Error('an aim was missed');
}

runBench(
  main,
  async () => {
    for (const client of clients) await client.close().catch(() => {});
    for (const daemon of daemons) await daemon.stop().catch(() => {});
    for (const served of origins) await served.close().catch(() => {});
    await redis?.close();
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  },
  (text) => console.error(text),
);
