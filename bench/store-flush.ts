// State store writes with a large history (issue 10): with 100,000 origins already in the SQLite history and the
// cap at 100,000, how long does one slice of a timed flush hold the event loop while (a) 20,000 known origins are
// updated, (b) 20,000 new origins arrive (each evicts the least recently seen one), (c) old demand history is
// pruned? And warm-on-start's ranking (synchronous but for what is pending), and flush() (in the same slices).
// The aim: no write holds the loop more than 20 ms. Prints each phase's slices (count, max, p99) and the
// event-loop delay seen by a 1 ms timer running beside them (perf_hooks.monitorEventLoopDelay). Wall time includes
// time the process was not scheduled (a loaded machine); "cpu" is the slice's own CPU time (process.cpuUsage).
//
//   npm run build && node dist/bench/store-flush.js [--origins N]

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { StateStore } from '../daemon/store.js';

const originsArg = process.argv.indexOf('--origins');
const ORIGINS = originsArg === -1 ? 100_000 : Number(process.argv[originsArg + 1]);
const MINUTE = 60_000;

const dir = mkdtempSync(join(tmpdir(), 'sockpool-store-bench-'));
let clock = Date.UTC(2026, 0, 1);
const store = StateStore.open(dir, { now: () => clock, maxOrigins: ORIGINS });
// As in the daemon: the auto flush's checkpointer thread takes the WAL's checkpoints off the event loop. (Its timer
// never fires here: the slices below are run and timed one by one.) `--no-checkpointer` measures without it.
if (!process.argv.includes('--no-checkpointer')) store.startAutoFlush(3_600_000);

function record(prefix: string, count: number): void {
  for (let index = 0; index < count; index++) {
    const key = `${prefix}${index}.example.com:443`;
    store.recordAcquire(key, { hit: index % 2 === 0 });
    store.recordConnect(key, 10 + (index % 50));
  }
}

/** Runs timed-flush slices on the event loop as the daemon's timer does, each measured. */
async function slices(label: string): Promise<void> {
  const durations: number[] = [];
  const cpu: number[] = [];
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  const ticker = setInterval(() => {}, 1);
  let more = true;
  while (more) {
    const started = performance.now();
    const cpuStarted = process.cpuUsage();
    more = store.flushSlice();
    durations.push(performance.now() - started);
    const used = process.cpuUsage(cpuStarted);
    cpu.push((used.user + used.system) / 1000);
    await new Promise((resolve) => setImmediate(resolve));
  }
  clearInterval(ticker);
  delay.disable();
  durations.sort((a, b) => a - b);
  cpu.sort((a, b) => a - b);
  const p99 = durations[Math.min(durations.length - 1, Math.floor(durations.length * 0.99))] ?? 0;
  console.log(
    `${label.padEnd(44)} slices ${String(durations.length).padStart(5)}  max ${durations.at(-1)?.toFixed(2)} ms  ` +
      `p99 ${p99.toFixed(2)} ms  cpu max ${cpu.at(-1)?.toFixed(2)} ms  loop delay max ${(delay.max / 1e6).toFixed(2)} ms`,
  );
}

// Fill the history: ORIGINS origins, each with demand in a few minutes, in large synchronous batches.
const fillStarted = performance.now();
for (let batch = 0; batch < ORIGINS; batch += 10_000) {
  for (let index = batch; index < Math.min(ORIGINS, batch + 10_000); index++) {
    const key = `h${index}.example.com:443`;
    store.recordAcquire(key, { hit: false });
    store.recordConnect(key, 20);
  }
  clock += MINUTE;
  await store.flush();
}
console.log(
  `history filled: ${store.originCount} origins in ${((performance.now() - fillStarted) / 1000).toFixed(1)} s`,
);

clock += MINUTE;
record('h', 20_000); // the first 20,000 again: updates of known origins
await slices('(a) 20,000 known origins updated');
clock += MINUTE;
record('new', 20_000); // new origins: 20,000 rows in, 20,000 least recently seen evicted
await slices('(b) 20,000 new origins, as many evicted');
clock += 8 * 24 * 60 * MINUTE; // past the 7-day demand history and into pruning
record('late', 100);
await slices('(c) prune after 8 days, 100 new origins');
{
  // Nothing pending nor over the cap here: the ranking alone, synchronous.
  const started = performance.now();
  await store.topOrigins(50);
  console.log(
    `${'topOrigins(50) (warm-on-start, once at start)'.padEnd(44)} ${(performance.now() - started).toFixed(2)} ms`,
  );
}
{
  // flush() (tests, this bench) writes in the timer's slices too: the loop's delay is what it holds the loop for.
  record('flushed', 5_000);
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  const ticker = setInterval(() => {}, 1);
  const started = performance.now();
  await store.flush();
  clearInterval(ticker);
  delay.disable();
  console.log(
    `${'flush() of 5,000 new origins'.padEnd(44)} ${(performance.now() - started).toFixed(2)} ms  ` +
      `loop delay max ${(delay.max / 1e6).toFixed(2)} ms`,
  );
}
console.log(`checkpoints by the checkpointer thread: ${store.checkpoints.count}`);
store.close();
rmSync(dir, { recursive: true, force: true });
