// State store writes with a large history (issue 10): with 100,000 origins already in the SQLite history and the
// cap at 100,000, how long does one slice of a timed flush hold the event loop while (a) 20,000 known origins are
// updated, (b) 20,000 new origins arrive (each evicts the least recently seen one), (c) old demand history is
// pruned? And warm-on-start's ranking (synchronous but for what is pending), and flush() (in the same slices).
// The aim: no write holds the loop more than 20 ms. Prints each phase's slices (count, max, p99: the event loop's part
// of each, its preparing and its hand-off to the store's thread, or its commit without the thread), the event-loop
// delay seen by a 1 ms timer running beside them (perf_hooks.monitorEventLoopDelay), the longest time the thread took
// to commit one, and the phase's three longest slices broken down (printLongest). Wall time includes time the process
// was not scheduled (a loaded machine); "cpu" is the event loop's own CPU time in the slice (process.threadCpuUsage).
//
//   npm run build && node dist/bench/store-flush.js [--origins N]

import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { type SliceTiming, StateStore } from '../daemon/store.js';

const originsArg = process.argv.indexOf('--origins');
const ORIGINS = originsArg === -1 ? 100_000 : Number(process.argv[originsArg + 1]);
const MINUTE = 60_000;

const dir = mkdtempSync(join(tmpdir(), 'sockpool-store-bench-'));
let clock = Date.UTC(2026, 0, 1);
/** The slices' breakdowns (onSlice) since the last phase began, with the WAL file's size before and after. */
let timings: Array<SliceTiming & { walBefore: number; walAfter: number }> = [];
const walBytes = () => statSync(join(dir, 'sockpool.sqlite-wal'), { throwIfNoEntry: false })?.size ?? 0;
let wal = 0;
const store = StateStore.open(dir, {
  now: () => clock,
  maxOrigins: ORIGINS,
  onSlice: (timing) => {
    const walBefore = wal;
    wal = walBytes();
    timings.push({ ...timing, walBefore, walAfter: wal });
  },
});
// As in the daemon: the auto flush, whose checkpointer thread takes the WAL's checkpoints and the slices' commits off
// the event loop. Its timer runs each phase below (a short interval then, an hour between phases). `--no-checkpointer`
// measures without the thread: the slices are then committed on the event loop, run here one by one.
const autoFlush = !process.argv.includes('--no-checkpointer');
if (autoFlush) store.startAutoFlush(3_600_000);

function record(prefix: string, count: number): void {
  for (let index = 0; index < count; index++) {
    const key = `${prefix}${index}.example.com:443`;
    store.recordAcquire(key, { hit: index % 2 === 0 });
    store.recordConnect(key, 10 + (index % 50));
  }
}

/**
 * Runs the phase's slices: the daemon's timer (every 5 ms) until everything is written, evicted and pruned and its
 * slices stop, or without the thread flushSlice() a turn at a time. Each measured by the store (onSlice).
 */
async function slices(label: string): Promise<void> {
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  const ticker = setInterval(() => {}, 1);
  timings = [];
  if (autoFlush) {
    store.configure({ flushMs: 5 });
    let seen = -1;
    for (let quiet = 0; quiet < 10; ) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      // (A slice the store thread is still committing is waited for: its run goes on after it.)
      await store.idle();
      const done = store.pendingOrigins === 0 && store.originCount <= ORIGINS && timings.length === seen;
      quiet = done ? quiet + 1 : 0;
      seen = timings.length;
    }
    store.configure({ flushMs: 3_600_000 });
  } else {
    while (store.flushSlice()) await new Promise((resolve) => setImmediate(resolve));
  }
  clearInterval(ticker);
  delay.disable();
  const durations = timings.map((timing) => timing.wallMs).sort((a, b) => a - b);
  const cpu = timings.map((timing) => timing.cpuMs).sort((a, b) => a - b);
  const thread = timings.map((timing) => timing.threadMs).sort((a, b) => a - b);
  const p99 = durations[Math.min(durations.length - 1, Math.floor(durations.length * 0.99))] ?? 0;
  console.log(
    `${label.padEnd(44)} slices ${String(durations.length).padStart(5)}  max ${durations.at(-1)?.toFixed(2)} ms  ` +
      `p99 ${p99.toFixed(2)} ms  cpu max ${cpu.at(-1)?.toFixed(2)} ms  loop delay max ${(delay.max / 1e6).toFixed(2)} ms  ` +
      `thread's commit max ${thread.at(-1)?.toFixed(2)} ms`,
  );
  printLongest(timings);
}

/**
 * The phase's three longest slices, where their time went (StateStoreOptions.onSlice): wall and the event loop's own
 * CPU (the store thread's is not in it), the commit's part on the event loop (its hand-off to the thread, or BEGIN,
 * the statements and COMMIT without one: sys is the kernel's part, as in truncating the WAL file, whose size before
 * and after is shown) against the preparing (reads of the rows updated, building the origins' statements, the
 * eviction's pick and its deletes, pruning), and the thread's time to commit it. A slice whose wall time grows with no
 * CPU behind it waited (the disk, a lock, the process not scheduled).
 */
function printLongest(slices: Array<SliceTiming & { walBefore: number; walAfter: number }>): void {
  const ms = (value: number) => value.toFixed(1);
  for (const t of [...slices].sort((a, b) => b.wallMs - a.wallMs).slice(0, 3)) {
    console.log(
      `    slice ${ms(t.wallMs)} ms (cpu ${ms(t.cpuMs)}): commit ${ms(t.commitMs)} (cpu ${ms(t.commitCpuMs)}, ` +
        `sys ${ms(t.commitSystemMs)}; WAL ${(t.walBefore / 2 ** 20).toFixed(1)} -> ${(t.walAfter / 2 ** 20).toFixed(1)} MiB), ` +
        `reads ${ms(t.readMs)}, writes ${ms(t.writeMs)}, evict pick ${ms(t.evictPickMs)} + delete ${ms(t.evictDeleteMs)}, ` +
        `prune ${ms(t.pruneMs)}; thread ${ms(t.threadMs)}; ${t.origins} origins, ${t.evicted} evicted`,
    );
  }
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
