// The time a relay thread could run: wall time less the time it spent runnable but waiting for a CPU. The relay
// threads run at nice 10 (tls-relay.ts, RELAY_THREAD_NICE): on a loaded host such a thread can wait on the run queue
// for seconds while its work (a costly certificate check: hundreds of ms of CPU in one call) goes on. Two mechanisms
// that measured it in wall time took that wait for something else:
// - the watchdog (tls-relay.ts, #watch) took a starved thread for hung (its heartbeat did not move for
//   tls.relayHangMs of wall time) and ended every session it relayed;
// - the per-uid CPU share (relay-cpu.ts) decayed each uid's cost over wall time the thread could not use, so a costly
//   uid got many handshakes under way at once.
// Both now count the thread's available time: on a quiet machine that is wall time (a thread waits microseconds for a
// CPU), on a loaded one it runs as slowly as the thread is kept waiting. A thread that truly hangs still gets judged:
// a busy loop runs (its waits cover only the part of the silence another task had the CPU), and a thread blocked in a
// system call sleeps, which is not waiting for a CPU.
//
// Linux keeps that wait per thread (CONFIG_SCHED_INFO): /proc/self/task/<tid>/schedstat holds the thread's time on a
// CPU, its time waiting on a run queue (run_delay) and its timeslices, the first two in ns. The main thread learns a
// relay thread's tid at its spawn (startedTid: the one thread new Worker() added, before the thread runs anything, so
// that its start, mostly a new isolate built before any module of ours runs, is judged in available time too), and
// each relay thread stores its own in its heartbeat's buffer at start (tls-relay-thread.ts), which is believed first.
// A new thread's run_delay starts at 0, so all of it is its start's wait. The main thread reads the file at its spawn
// and at most once per watchdog check (and, while a hung thread ends, once per wait for it) and, for the share, once
// per SHARE_CLOCK_READ_MS while handshakes are dispatched, each time with the thread's state
// (/proc/self/task/<tid>/stat: whether it is runnable), since the kernel adds a wait to run_delay only when the thread
// next runs: a thread runnable when read may be waiting since its last run, and is counted so until a reading tells
// (countedWaitMs, the one rule of both): never on the handoff path. Without the file (a kernel without
// schedstat) both fall back to wall time, said once in the log and in the stats (`relayClock`).

import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

/**
 * How long the share's clock (RelayAvailableClock) keeps a reading: the decay's half-life is seconds, so a reading
 * this old is close enough, and a dispatch burst reads the threads' files once.
 */
export const SHARE_CLOCK_READ_MS = 50;

/** This thread's tid (Linux): what the main thread reads its schedstat by; 0 when /proc does not tell. */
export function ownTid(): number {
  try {
    // "<pid>/task/<tid>"
    const tid = Number(readlinkSync('/proc/thread-self').split('/').pop());
    return Number.isSafeInteger(tid) && tid > 0 ? tid : 0;
  } catch {
    return 0;
  }
}

/** The tids of this process's threads; undefined when /proc does not tell. */
export function ownThreadIds(): Set<number> | undefined {
  try {
    return new Set(readdirSync('/proc/self/task').map(Number));
  } catch {
    return undefined;
  }
}

/**
 * The tid of the one thread this process started since `before` was listed (ownThreadIds); 0 when none was, or more
 * than one (another thread started one meanwhile: which is which cannot be told).
 */
export function startedTid(before: Set<number> | undefined): number {
  const now = before && ownThreadIds();
  if (!now) return 0;
  let started = 0;
  for (const tid of now) {
    if (before.has(tid)) continue;
    if (started !== 0) return 0;
    started = tid;
  }
  return started;
}

/** Whether this kernel keeps run-queue waits per thread (CONFIG_SCHED_INFO). */
export function schedstatAvailable(): boolean {
  return schedstatAt('/proc/thread-self/schedstat') !== undefined;
}

/** A schedstat file's time on a CPU and run_delay (ns); undefined when it cannot be read or makes no sense. */
function schedstatAt(path: string): { ranNs: number; waitedNs: number } | undefined {
  try {
    const fields = readFileSync(path, 'latin1').split(' ');
    const ranNs = Number(fields[0]);
    const waitedNs = Number(fields[1]);
    return fields.length >= 3 && ranNs >= 0 && waitedNs >= 0 && Number.isFinite(ranNs) && Number.isFinite(waitedNs)
      ? { ranNs, waitedNs }
      : undefined;
  } catch {
    return undefined;
  }
}

/**
 * How long a thread was silent in its available time: the wall time since its last beat less what it waited for a
 * CPU since then (never less than 0; without both counts of its wait, the wall time). Its waits as ThreadSilence
 * counts them (countedWaitMs).
 */
export function availableSilenceMs(
  nowMs: number,
  beatAtMs: number,
  runDelayMs: number | undefined,
  runDelayAtBeatMs: number | undefined,
): number {
  const wall = nowMs - beatAtMs;
  if (runDelayMs === undefined || runDelayAtBeatMs === undefined) return wall;
  return Math.max(0, wall - Math.max(0, runDelayMs - runDelayAtBeatMs));
}

/**
 * A thread's schedstat at one moment, with whether it was runnable (running or waiting for a CPU) just after: what
 * the share's clock (RelayAvailableClock) and the watchdog (ThreadSilence) read of each relay thread.
 */
export interface ThreadWaitReading {
  /** Its total wait on a run queue (run_delay), ms: a wait is added only when the thread next gets a CPU. */
  waitedMs: number;
  /**
   * Its total time on a CPU, ms (a running thread's up to its last scheduler tick or switch: the kernel does not bring
   * it up to date for the read, so two readings closer than a tick may find a running thread not moved).
   */
  ranMs: number;
  /** Whether it was runnable (state R) when read, after its schedstat. */
  runnable: boolean;
}

/**
 * Thread `tid`'s (of this process) schedstat and state (ThreadWaitReading); undefined when they cannot be read. The
 * state is read after the schedstat: a thread runnable then and with no more time on a CPU at the next reading cannot
 * have slept in between (a thread goes to sleep only by running), so it waited for a CPU all along (countedWaitMs).
 */
export function threadWaitReading(tid: number): ThreadWaitReading | undefined {
  if (tid <= 0) return undefined;
  const read = schedstatAt(`/proc/self/task/${tid}/schedstat`);
  if (read === undefined) return undefined;
  let stat: string;
  try {
    stat = readFileSync(`/proc/self/task/${tid}/stat`, 'latin1');
  } catch {
    return undefined; // gone since
  }
  // "pid (comm) state …": the name may hold spaces and parentheses, the state follows the last ')'.
  const runnable = stat.charAt(stat.lastIndexOf(')') + 2) === 'R';
  return { waitedMs: read.waitedNs / 1e6, ranMs: read.ranNs / 1e6, runnable };
}

/** A thread's reading with the wait counted for it so far (ms, at least its run_delay then): see countedWaitMs. */
export type CountedWaitReading = ThreadWaitReading & { countedMs: number };

/**
 * A thread's wait for a CPU counted so far (ms) at `reading`, `stretchMs` of wall time after `before` (its last
 * reading; undefined: none, its run_delay is the count): never less than it truly waited, the wait under way
 * included, so that neither the share's clock (RelayAvailableClock) nor the watchdog's silence (ThreadSilence) runs
 * ahead of the thread's time. The kernel adds a wait to run_delay only when the thread next gets a CPU, so a reading
 * alone misses the wait under way:
 * - a thread asleep when read (not runnable) has no wait under way: its run_delay is all it waited (a count above it,
 *   from the rules below, is given back);
 * - a thread runnable at the last reading that has not run since waited all of the stretch (it cannot have gone to
 *   sleep without running), which counts at once, and its run_delay, when it catches up, counts only past it;
 * - a thread runnable when read that ran in the stretch, or was asleep at its start, may have been waiting since its
 *   last run or its wake: at most the stretch less its time on a CPU, less the waits it finished in the stretch (its
 *   run_delay's growth past what was counted at `before`), which counts until a reading tells.
 * Readings further apart than a scheduler tick (ThreadWaitReading.ranMs): the watchdog's a second apart, the share's
 * at least SHARE_CLOCK_READ_MS.
 */
export function countedWaitMs(
  before: CountedWaitReading | undefined,
  reading: ThreadWaitReading,
  stretchMs: number,
): number {
  if (before === undefined || !reading.runnable) return reading.waitedMs;
  const ranMs = reading.ranMs - before.ranMs;
  if (before.runnable && ranMs === 0) return Math.max(reading.waitedMs, before.countedMs + stretchMs);
  return Math.max(reading.waitedMs, Math.min(reading.waitedMs, before.countedMs) + stretchMs - ranMs);
}

/**
 * How long one relay thread has been silent in its available time, for the watchdog (tls-relay.ts, #watch): the
 * wall time since it was last heard (its heartbeat moved, or its spawn) less what it waited for a CPU since, counted
 * as the share's clock counts it (countedWaitMs): a thread runnable at a check may be kept waiting since its last
 * run, which is not silence, though the kernel adds it to run_delay only once the thread runs. Counted by run_delay
 * alone, a starved thread's wait under way was silence until it next ran, and one kept
 * waiting longer than tls.relayHangMs was taken for hung, every session it relayed ended. A thread that truly hangs
 * is still silent: a loop runs (its time on a CPU moves), a thread blocked in a system call sleeps. Fed the thread's
 * reading (threadWaitReading) at each check, heard or not.
 */
export class ThreadSilence {
  /** When the thread was last heard, and its run_delay then (undefined: unknown, the silence is wall time). */
  #heardAt: number;
  #waitedAtHeard: number | undefined;
  /** The last reading, its wall time and the wait counted at it (undefined: no reading yet). */
  #last: CountedWaitReading | undefined;
  #lastAt = 0;

  /** From `atMs` (its spawn), its wait then `waitedMs` (a new thread's run_delay starts at 0; undefined: unknown). */
  constructor(atMs: number, waitedMs: number | undefined) {
    this.#heardAt = atMs;
    this.#waitedAtHeard = waitedMs;
  }

  /** The thread's reading at `nowMs`; undefined (not read, or gone) leaves the last one standing. */
  read(nowMs: number, reading: ThreadWaitReading | undefined): void {
    if (reading === undefined) return;
    this.#last = { ...reading, countedMs: countedWaitMs(this.#last, reading, nowMs - this.#lastAt) };
    this.#lastAt = nowMs;
  }

  /**
   * The thread was heard at `nowMs` (read just before): its silence starts over, from what it surely waited by then
   * (its run_delay): the count may hold a wait under way that had not begun, which, taken as the start, would make
   * the silence after it longer than it was.
   */
  heard(nowMs: number): void {
    this.#heardAt = nowMs;
    this.#waitedAtHeard = this.#last?.waitedMs;
  }

  /** The wall time since it was last heard. */
  wallMs(nowMs: number): number {
    return nowMs - this.#heardAt;
  }

  /** Its silence in its available time at `nowMs` (read just before). */
  silentMs(nowMs: number): number {
    return availableSilenceMs(nowMs, this.#heardAt, this.#last?.countedMs, this.#waitedAtHeard);
  }
}

/**
 * The relay threads' available time for the per-uid CPU share (relay-cpu.ts): a clock that moves as wall time less
 * the mean of what the threads waited for a CPU over the same stretch (the share is a part of every thread's time, so
 * a thread idle and one kept waiting count half each). Never goes back; between readings (SHARE_CLOCK_READ_MS) it
 * stands still. With no thread's reading it moves as wall time.
 *
 * The kernel adds a wait to run_delay only when the thread next gets a CPU, so a reading alone misses the wait under
 * way. A starved nice-10 thread waits hundreds of ms to seconds at a time while the dispatch reads every
 * SHARE_CLOCK_READ_MS or so: each reading in that wait moved the clock as wall time, and the wait, counted at once
 * once the thread ran, could only stop the clock for the one stretch it came in (the clock never goes back); the
 * rest was lost, so the clock ran ahead of the threads' time by most of every wait, and a costly uid's cost and peak
 * decayed early enough to start a third handshake beside two under way. Two things now keep it to the threads' time:
 * - a thread runnable when read counts as waiting since its last run (countedWaitMs): all of the stretch if it was
 *   runnable at the last reading and has not run since, else the stretch less its run and the waits it finished in
 *   it, until a reading tells (asleep: its run_delay is all it waited, and a count above it is given back). So the
 *   clock is never ahead of the threads' time, behind it by a stretch at most; the dispatch decides at its readings,
 *   and a wait begun between two of them (the thread asleep at the first, or run since) moved the clock as wall time
 *   until the thread ran again: a costly uid's second handshake started so in a traced run under load;
 * - a wait counted later than the stretch it was in (one missed by a reading: a thread that ended a wait between
 *   reading its schedstat and its state) is owed: it holds the clock back over the next stretches until paid. The
 *   debt is bounded: the waits counted since a thread's first reading are at most the wall time since then, plus the
 *   one wait under way at that reading.
 */
export class RelayAvailableClock {
  #wall: () => number;
  /** Each thread's last reading, with the wait counted for it so far (ms, at least its run_delay then). */
  #threads = new Map<unknown, CountedWaitReading>();
  /** The clock's time at the last reading, and the wall time then. */
  #time: number;
  #readAt: number;
  /** The threads' mean wait counted past the wall time of the stretch it was counted in (ms): the clock's debt. */
  #owedMs = 0;
  /** No reading yet: the first call reads, whenever it comes. */
  #unread = true;

  constructor(wall: () => number = () => performance.now()) {
    this.#wall = wall;
    this.#readAt = wall();
    this.#time = this.#readAt;
  }

  /**
   * The clock's time (ms) with the threads' readings by `readings` (thread key → its reading, or undefined when
   * unknown) once the last reading is SHARE_CLOCK_READ_MS old (and at the first call).
   */
  now(readings: () => Iterable<[unknown, ThreadWaitReading | undefined]>): number {
    const wall = this.#wall();
    if (!this.#unread && wall - this.#readAt < SHARE_CLOCK_READ_MS) return this.#time;
    this.#unread = false;
    const stretch = wall - this.#readAt;
    const seen = new Map<unknown, CountedWaitReading>();
    let waited = 0;
    let counted = 0;
    for (const [key, reading] of readings()) {
      if (reading === undefined) continue;
      const before = this.#threads.get(key);
      if (before === undefined) {
        seen.set(key, { ...reading, countedMs: reading.waitedMs });
        continue;
      }
      const countedMs = countedWaitMs(before, reading, stretch);
      seen.set(key, { ...reading, countedMs });
      waited += countedMs - before.countedMs;
      counted++;
    }
    this.#threads = seen;
    const mean = counted === 0 ? 0 : waited / counted;
    const moved = stretch - mean - this.#owedMs;
    this.#time += Math.max(0, moved);
    this.#owedMs = Math.max(0, -moved);
    this.#readAt = wall;
    return this.#time;
  }

  /** Wall ms until the clock may move again (a timer set for less would find it where it was). */
  get standsStillMs(): number {
    return Math.max(0, SHARE_CLOCK_READ_MS - (this.#wall() - this.#readAt));
  }
}
