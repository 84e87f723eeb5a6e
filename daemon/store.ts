// The daemon's memory across restarts, in SQLite (better-sqlite3) at `<stateDir>/sockpool.sqlite`: the origins it
// has seen with their counters, connect latency, learned idle lifetime and demand rate, and a per-minute demand
// history. At start the pool manager asks `topOrigins` which origins to warm first.
//
// Nothing here touches the disk on the handoff path. `recordAcquire`, `recordConnect`, `recordConnectFailure` and
// `recordIdleLifetime` only update a Map; a flush writes everything accumulated, in slices (below), from an unref'd
// timer (`startAutoFlush`). The database is in WAL mode with synchronous=NORMAL: a commit survives the
// process being killed at any moment (the WAL is in the OS page cache), so a crash loses at most what was recorded
// since the last flush. A power loss may also lose the last commits before a checkpoint, never corrupt the file.
// The WAL file goes back to at most WAL_SIZE_LIMIT when it starts over after a complete checkpoint.
//
// What a client cannot bloat: only origins that connected get a row (an origin whose every connect failed, or
// that the policy refused, leaves nothing); the `origins` table holds at most `maxOrigins` rows, those without
// demand (reached only by prewarms) evicted first, then the least recently seen (with their demand history) of the
// uid holding the most rows. A row is held by the uid whose acquire brought the origin in (its `uid`), as the
// connector's tables are (uid-share-map.ts): one uid's acquires to many origins that connect (a wildcard domain the
// policy allows) push out its own history, never that of a uid holding fewer, and `topOrigins` takes each holder's
// busiest in turn, so that uid's origins do not take every place (and socket) warm-on-start has. What waits for a
// flush is bounded too, however long flushes fail (a locked file, a full disk): at most `maxOrigins` origins
// (#pendingOf) and PENDING_MINUTES per-minute demand entries among them (#addDemand). And
// the timer's flushes write in slices of at most SLICE_BUDGET_MS of event-loop time, continuing on the next turn,
// so a flood of new origins never holds the loop for long (bench/store-flush.ts measures it with 100,000 origins).
// `topOrigins` (warm-on-start) writes what is pending in such slices too, awaited, and leaves out of its ranking the
// rows over the cap, evicted after it in such slices; `flush()` (tests, the bench) writes in them too, resolved once
// all it owed is committed; `close()` (the stop) prepares committed
// slices, paced to the store's thread (below) that commits them and closes the file, until a quarter of
// CLOSE_BUDGET_MS is left for that thread to finish, drops what is left, and returns by the budget whatever the disk
// does: a thread still waiting for the disk then is left to the process's exit, the state directory locked until it
// ends (threadLeft).
// While the timer runs, that thread, with a second connection, also copies the WAL into the database file (the
// checkpoint, with its fsync), and commits every slice of the timer's, topOrigins' and flush()'s: the event loop only
// reads (the rows a slice updates, the rows the eviction and the prune pick) and prepares the slice's writes, then
// hands them over (#sliceAsync) and prepares the next once the thread said the last one committed (one in flight, so
// what it reads is what the last one wrote). On the event loop, SQLite's automatic checkpoint at the end of a commit
// was the longest part of a slice, and then the commit that starts the WAL over after a complete checkpoint (its
// header's sync, and truncating a grown file to WAL_SIZE_LIMIT: the kernel's time freeing its cached pages). A slice that fails on the thread (a locked file, a full disk) is undone as one committed
// on the event loop was (#undo): its origins pending, merged with what was recorded meanwhile. Without the thread (a
// history in memory, a thread that cannot start, no auto flush, a thread that died until another is started:
// #checkpointerDied), slices are committed on the event loop.
//
// Wall-clock time (Date.now) is right here, unlike in the rest of the daemon: these timestamps must mean the same
// thing after a restart or a reboot.

import { mkdirSync, renameSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import process from 'node:process';
import { MessageChannel, type MessagePort, receiveMessageOnPort, Worker } from 'node:worker_threads';
import Database from 'better-sqlite3';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { originOfKey } from '../shared/origin.js';
import { StateDirLock } from './state-lock.js';
import { heaviestHolder } from './uid-share-map.js';

/** Schema migrations, oldest first: entry i takes `PRAGMA user_version` from i to i + 1. Append; never edit. */
export const MIGRATIONS: readonly string[] = [
  `
  CREATE TABLE origins (
    origin_key TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,               -- ms since the epoch
    last_seen INTEGER NOT NULL,                -- ms since the epoch (last acquire, connect or observation)
    acquires INTEGER NOT NULL DEFAULT 0,
    hits INTEGER NOT NULL DEFAULT 0,           -- acquires served from a warm idle socket
    misses INTEGER NOT NULL DEFAULT 0,         -- acquires that waited for a new connection
    connect_failures INTEGER NOT NULL DEFAULT 0,
    connect_ms_avg REAL,                       -- EWMA of connect time
    learned_idle_lifetime_ms INTEGER,          -- how long the origin's servers keep a silent connection (estimate)
    demand_rate_per_s REAL NOT NULL DEFAULT 0, -- exponentially decaying acquire rate, as of demand_updated_at
    demand_updated_at INTEGER NOT NULL DEFAULT 0
  ) WITHOUT ROWID;
  CREATE INDEX origins_last_seen ON origins (last_seen);
  CREATE TABLE demand_history (
    origin_key TEXT NOT NULL,
    minute INTEGER NOT NULL,                   -- floor(ms since the epoch / 60000)
    acquires INTEGER NOT NULL,
    PRIMARY KEY (origin_key, minute)
  ) WITHOUT ROWID;
  CREATE INDEX demand_history_minute ON demand_history (minute);
  `,
  // Eviction order (#evictSome): origins no acquire ever asked for (reached only by prewarms) first, then the least
  // recently seen; an index range scan, as the plain last_seen order was.
  `
  CREATE INDEX origins_eviction ON origins (acquires > 0, last_seen);
  `,
  // Older versions learned idle lifetimes from sockets a client had: one ended early by the copy its client kept
  // taught the origin 250 ms (the floor), recycling every idle socket within 200 ms at every later start. Those
  // cannot be told from real ones, so every lifetime under 1 s goes, once: no common server drops silent
  // connections that soon, and a real one is learned again from the first idle socket its server closes.
  `
  UPDATE origins SET learned_idle_lifetime_ms = NULL WHERE learned_idle_lifetime_ms < 1000;
  `,
  // Each row's holder (#evictSome, topOrigins): the uid whose acquire brought the origin in; NULL for a row no
  // acquire asked for yet, and for every row older versions wrote (whose uids were never known: together they are
  // one holder, as a uid's rows are). The index is the per-holder eviction order, an index range scan.
  `
  ALTER TABLE origins ADD COLUMN uid INTEGER;
  CREATE INDEX origins_uid_eviction ON origins (uid, acquires > 0, last_seen);
  `,
];

export interface StateStoreOptions {
  /** Wall clock in ms since the epoch (tests move it). Default Date.now. */
  now?: () => number;
  /** Demand history older than this is deleted. Default 7 days. */
  demandHistoryDays?: number;
  /** Origins not seen for this long are forgotten. Default 30 days. */
  originRetentionDays?: number;
  /** Half-life of an acquire's weight in the `topOrigins` score. Default 6 hours. */
  scoreHalfLifeMs?: number;
  /** Time constant of the stored demand rate. Default 60 s. */
  demandRateWindowMs?: number;
  /**
   * Most origins kept in history; past it those without demand (no acquire) are evicted first, then the least
   * recently seen of the uid holding the most rows. Default 100,000.
   */
  maxOrigins?: number;
  /**
   * Told when the database file was corrupt (or not a database) and was moved aside to `movedTo`, with the SQLite
   * error: the store then starts with an empty history (the history only warms; losing it costs no correctness).
   */
  onCorrupt?: (info: { path: string; movedTo: string; err: string }) => void;
  /**
   * Told when another process held the file's write lock and the schema migrations wait for a later start: the file
   * is at schema `version`, `migration` (version + 1) is the first that waits, `newest` the schema this version
   * knows, `err` SQLite's word for it. Without it the file stays at its old schema in silence, start after start.
   */
  /**
   * Told when the timer's flushes start failing (a full disk, a read-only or locked file, a page found corrupt), once
   * per run of failures, with SQLite's code (`SQLITE_FULL`, `SQLITE_BUSY`...) and the origins waiting: they stay
   * pending (bounded) and the next tick tries again. Without it the history stopped being written in silence.
   */
  onFlushFailing?: (info: { path: string; sqliteCode: string | undefined; err: string; pending: number }) => void;
  /**
   * Given, a file that cannot be opened for any reason but a refusal (a file from a newer sockpoold) and one SQLite
   * finds corrupt (moved aside: onCorrupt) no longer fails the open: the store runs on a history in memory only (the
   * file untouched, nothing written to it; the next start tries the file again) and this is told why, with SQLite's
   * code (`SQLITE_FULL` a full disk, `SQLITE_CANTOPEN` an unopenable -wal or a directory the daemon cannot write,
   * `SQLITE_READONLY`, `SQLITE_IOERR_*`). The history only warms: a full disk must not keep the daemon from serving.
   */
  onUnavailable?: (info: { path: string; sqliteCode: string | undefined; err: string }) => void;
  /**
   * Told when the checkpointer (the store thread committing the flushes' slices, with its file open) ends while the auto
   * flush runs: an error (`err`, its message) or an exit of its own (`err` says its code). The flushes' slices are
   * committed on the event loop until a new one is open: one is started at once (`restartInMs` 0) unless one was
   * started after a death less than THREAD_RESTART_INTERVAL_MS ago (a thread that keeps dying): then in `restartInMs`.
   */
  onThreadEnded?: (info: { path: string; thread: string; err: string; restartInMs: number }) => void;
  /** Told when a timer's flush succeeds again after onFlushFailing, with how many ticks failed meanwhile. */
  onFlushRecovered?: (info: { path: string; failures: number }) => void;
  /**
   * Told when the rows a ranking found over the cap (topOrigins: a start after a stop that wrote past it, or a lower
   * cap) are evicted, in the timer's slices after the ranking returned: `overCap` rows were over it then.
   */
  onOverCapEvicted?: (info: { path: string; overCap: number }) => void;
  /**
   * Told after each slice of a flush (the timer's, flush()'s, topOrigins') where its time went (bench/store-flush.ts):
   * costs a clock reading around each statement, so only for measuring.
   */
  onSlice?: (timing: SliceTiming) => void;
  onMigrationDeferred?: (info: {
    path: string;
    version: number;
    migration: number;
    newest: number;
    err: string;
  }) => void;
  /**
   * The daemon's: the store first takes the state directory's lock (state-lock.ts) and holds it until close, or until
   * the store's thread ends when close() returned without it (threadLeft). Held by
   * another daemon: the open fails with that refusal, onUnavailable or not (a second daemon is refused, not run on a
   * history in memory). A lock file that cannot be opened is an unavailable file like the database's.
   */
  lockStateDir?: boolean;
}

/** An origin as `topOrigins` ranks it for warm-on-start. */
export interface TopOrigin {
  originKey: string;
  host: string;
  port: number;
  /** Recency-weighted acquires: each acquire counts 1, halved every `scoreHalfLifeMs` of age. */
  score: number;
  learnedIdleLifetimeMs: number | null;
  /**
   * The demand rate the last time the origin was in use, halved for every `scoreHalfLifeMs` since (as the score
   * weighs acquires): not decayed with the rate's own window, which leaves ~0 after a restart, but a burst a day ago
   * is not asked for again in full.
   */
  demandRatePerS: number;
  connectMsAvg: number | null;
  lastSeen: number;
}

/**
 * Where one slice's time went (StateStoreOptions.onSlice), in ms: wall time (performance.now) and CPU time of the
 * event loop's thread (process.threadCpuUsage: the checkpointer's CPU is not in it).
 */
export interface SliceTiming {
  /** Origins written, rows evicted; the statements the slice's commit runs (SLICE_WRITES_MAX at most on the thread). */
  origins: number;
  evicted: number;
  statements: number;
  /** The whole slice on the event loop, from its start to its return. */
  wallMs: number;
  cpuMs: number;
  /** Reading the rows the origins update (#write's select). */
  readMs: number;
  /** Preparing the origins' writes (their rows and demand minutes: run by the commit). */
  writeMs: number;
  /** The eviction's pick of its rows (the index scans), and preparing its deletes (run by the commit). */
  evictPickMs: number;
  evictDeleteMs: number;
  /** The prune's picks, and preparing its deletes. */
  pruneMs: number;
  /**
   * The commit's part on the event loop: BEGIN, the statements and COMMIT when committed here, the hand-off (a
   * message) when the store's thread commits.
   */
  commitMs: number;
  commitCpuMs: number;
  /** The part of commitCpuMs spent in the kernel (writes, a truncation of the WAL file). */
  commitSystemMs: number;
  /** From the hand-off to the store thread's answer (not on the event loop): 0 when committed here. */
  threadMs: number;
}

/** One row of `origins`, as stored (after a flush). */
export interface OriginRecord {
  originKey: string;
  host: string;
  port: number;
  firstSeen: number;
  lastSeen: number;
  acquires: number;
  hits: number;
  misses: number;
  connectFailures: number;
  connectMsAvg: number | null;
  learnedIdleLifetimeMs: number | null;
  demandRatePerS: number;
  demandUpdatedAt: number;
}

const DAY_MS = 86_400_000;
const MINUTE_MS = 60_000;
/** Weight of a new connect time in the connect-latency EWMA. */
const CONNECT_EWMA_ALPHA = 0.2;
/** How fast the learned idle lifetime rises again after a longer observation (it drops at once on a shorter one). */
const IDLE_LIFETIME_RISE = 0.1;
const PRUNE_INTERVAL_MS = 10 * MINUTE_MS;
/**
 * Event-loop time one slice of a timed flush may spend writing before it commits and yields. The aim is no slice
 * over 20 ms; the commit (the slice's pages into the WAL) comes on top, hence the margin.
 */
const SLICE_BUDGET_MS = 5;
/**
 * Statements one slice hands to the store thread at most, whatever its budget: the hand-off copies them (a message)
 * on the event loop, and preparing is cheaper than committing, so the budget alone let a slice gather thousands.
 */
export const SLICE_WRITES_MAX = 500;
/**
 * Per-minute demand entries the pending records hold, all together (#minutesPerOrigin shares it among the at most
 * maxOrigins records; with more than 100,000 of them, PENDING_MINUTES_PER_ORIGIN_MIN each): about 50 bytes of heap
 * each, and each a statement of the next flush. Past a record's share its oldest entries are merged (#mergeOldest),
 * not dropped.
 */
const PENDING_MINUTES = 200_000;
/** A record's share of PENDING_MINUTES at most: an hour of minutes in use is resolution enough for any ranking. */
const PENDING_MINUTES_PER_ORIGIN_MAX = 60;
/**
 * A record's share at least, whatever maxOrigins (the bound is then this many per record): the minute a flush
 * interval (statsFlushMs, 2 s by default) started in and the one it ended in, so that a flush that succeeds merges
 * nothing.
 */
const PENDING_MINUTES_PER_ORIGIN_MIN = 2;

function minutesPerOriginOf(maxOrigins: number): number {
  return Math.min(
    PENDING_MINUTES_PER_ORIGIN_MAX,
    Math.max(PENDING_MINUTES_PER_ORIGIN_MIN, Math.floor(PENDING_MINUTES / maxOrigins)),
  );
}

/**
 * Time close() spends on what is pending at most (the daemon's stop), whatever the disk does. The unit's
 * TimeoutStopSec= is 15 s, and the stop spends up to 1 s on STOPPING=1, 10 s handing idle sockets to systemd's fd store
 * and 3 s ending the relay threads before it (daemon.ts): the history has the last second. Written in one
 * transaction, a large backlog of pending origins could outlast the stop, and systemd's SIGKILL rolled it all back; a
 * disk whose syncs stall took the stop there all the same (see close()).
 */
export const CLOSE_BUDGET_MS = 1_000;
/**
 * A slice of close()'s writing: each is committed, so what a SIGKILL in the middle loses is one slice. Longer than
 * SLICE_BUDGET_MS (fewer commits): nothing else runs on the event loop at the stop.
 */
const CLOSE_SLICE_MS = 50;
/** Rows one statement of eviction or pruning deletes at most (each is an index range scan). */
const DELETE_BATCH = 500;

/**
 * A checkpointer that died (StateStoreOptions.onThreadEnded) is started again at most once per this: one that keeps
 * dying is not started in a loop, each start a thread's boot and an open of the file; the event loop commits meanwhile.
 */
const THREAD_RESTART_INTERVAL_MS = 30_000;
/** Slices of one long flush after which the checkpointer is asked again (the WAL stays bounded meanwhile). */
const SLICES_PER_CHECKPOINT = 16;
/**
 * Bytes the WAL file is truncated to when a commit starts it over after a complete checkpoint (journal_size_limit).
 * Without it the file kept the size of the largest transaction ever written (a flush at close of many origins)
 * for good. About SQLite's default autocheckpoint (1000 pages of 4 KiB): the WAL's usual size, so a file in steady
 * use is not truncated and grown again at every reset.
 */
export const WAL_SIZE_LIMIT = 4 * 1024 * 1024;
/** SQLite's own default, back in force when no checkpointer runs. */
const AUTOCHECKPOINT_PAGES = 1000;

/**
 * The store's thread: the checkpointer and the flushes' writer while the auto flush runs, and the writer of close()
 * (started then if none runs). An eval'd worker, so that the same code runs from daemon/*.ts (in-process tests) and
 * from dist/. It owns a second connection. Asked with a number, it runs a PASSIVE checkpoint: PASSIVE never waits for
 * the daemon's connection and never blocks its writes (what it cannot copy now, the next request copies). Asked with
 * a slice's writes (`runs`: statements by name, their SQL in its workerData `sql`, given once at its start), it commits each message in one transaction,
 * counts it done in the shared `flags`, with close()'s origins committed; a flush's slice (with an `id`) it says
 * committed there by its id before it answers (a thread that ends in between leaves it known committed), answers
 * on the `errors` port (committed or failed, read without the event loop) and wakes the event loop with a message to
 * read it; close()'s are answered there only when they fail. Asked to close, it closes its connection (the last one: SQLite checkpoints the whole WAL, with its
 * syncs, here and not on the event loop), says so in `flags`, and ends. However it ends, its exit path says so in
 * `flags` (ENDED), its connection closed first.
 */
const STORE_THREAD_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const flags = new Int32Array(workerData.flags);
const [OPEN, COMMITTED, DONE, SLICES, COMMITTED_SLICE, ENDED] = [0, 1, 2, 3, 4, 5];
const signal = (index, value) => {
  Atomics.store(flags, index, value);
  Atomics.notify(flags, index);
};
let db;
// The thread's end, whatever ends it (its code's, an error thrown, process.exit()), said in the flags as it happens:
// its exit event reaches the event loop only once that runs, and a close() in the same turn waited its whole budget
// for a thread that was gone. Its connection is closed first (a no-op once closed), so ENDED means nothing of it is
// left on the disk's side. Every flag a waiter may be blocked on is notified.
process.on('exit', () => {
  try {
    if (db && db.open) db.close();
  } finally {
    Atomics.store(flags, ENDED, 1);
    for (const index of [OPEN, DONE, SLICES, ENDED]) Atomics.notify(flags, index);
  }
});
// Everything up to the open in the try, the module's loading too: a failure before OPEN is said there, else close()
// waited for this thread's connection (OPEN 0) until its budget was spent, and named it as left.
try {
  const Database = require(workerData.betterSqlite3);
  db = new Database(workerData.path, { fileMustExist: true });
  db.exec('PRAGMA busy_timeout = 0; PRAGMA synchronous = NORMAL');
  db.pragma('journal_size_limit = ' + workerData.walSizeLimit);
  // The checkpointer's first checkpoint, a writer's first read: the WAL and its index are open, and the database
  // file's shared lock is held (in WAL mode, until the connection closes), before OPEN, so the daemon's connection
  // is no longer the last one.
  if (workerData.checkpointer) db.pragma('wal_checkpoint(PASSIVE)');
  else db.prepare('SELECT count(*) FROM sqlite_master').get();
} catch (error) {
  signal(OPEN, -1);
  // close() may be waiting for a slice to be done: it is not coming.
  Atomics.notify(flags, SLICES);
  throw error;
}
signal(OPEN, 1);
parentPort.postMessage({ ready: true });
const statements = new Map();
const statement = (sql) => {
  let prepared = statements.get(sql);
  if (!prepared) {
    prepared = db.prepare(sql);
    statements.set(sql, prepared);
  }
  return prepared;
};
parentPort.on('message', (message) => {
  if (typeof message === 'number') {
    try {
      const [result] = db.pragma('wal_checkpoint(PASSIVE)');
      parentPort.postMessage({ log: result.log, checkpointed: result.checkpointed });
    } catch (error) {
      parentPort.postMessage({ error: String((error && error.message) || error) });
    }
  } else if (message.runs) {
    let failed;
    try {
      db.transaction(() => {
        for (const [name, params] of message.runs) {
          if (Array.isArray(params)) statement(workerData.sql[name]).run(...params);
          else statement(workerData.sql[name]).run(params);
        }
      })();
      Atomics.add(flags, COMMITTED, message.origins);
      // A flush's slice is said committed before it is answered: a thread that ends in between (an error, an exit)
      // leaves it known committed, not undone and written again (StateStore.#abandonInFlight).
      if (message.id !== undefined) Atomics.store(flags, COMMITTED_SLICE, message.id);
    } catch (error) {
      // A locked file or a full disk: the slice is rolled back. Said on this port, read without the event loop (close()
      // counts its slices' origins dropped and throws the first such error; a flush's slice is pended again).
      failed = { message: String((error && error.message) || error), code: error && error.code };
    }
    if (message.id !== undefined || failed) workerData.errors.postMessage({ id: message.id, failed });
    Atomics.add(flags, SLICES, 1);
    Atomics.notify(flags, SLICES);
    // A flush's slice: the event loop reads the result (above) when this wakes it.
    if (message.id !== undefined) parentPort.postMessage({ slice: message.id });
  } else if (message.close) {
    try {
      db.close();
    } finally {
      signal(DONE, 1);
      parentPort.close();
    }
  }
});
`;
/** Indexes of the store thread's shared flags (STORE_THREAD_SOURCE): its connection open (1, or -1: failed to). */
const THREAD_OPEN = 0;
/** Origins of close()'s slices the thread committed. */
const THREAD_COMMITTED = 1;
/** The thread closed its connection: nothing of the store is left on the disk's side. */
const THREAD_DONE = 2;
/** close()'s slices the thread is done with, committed or failed. */
const THREAD_SLICES = 3;
/** The id of the last flush's slice the thread committed (0: none), stored before its answer. */
const THREAD_COMMITTED_SLICE = 4;
/** The thread has ended (1), its connection closed: set by its own exit path, before its exit event is seen. */
const THREAD_ENDED = 5;
/** The flags' length. */
const THREAD_FLAGS = 6;

/**
 * The store thread whose flags these are commits nothing more: it could not open the file (THREAD_OPEN -1), or it has
 * ended (THREAD_ENDED), which its flags say before its exit event reaches the event loop.
 */
function threadGone(flags: Int32Array): boolean {
  return Atomics.load(flags, THREAD_OPEN) === -1 || Atomics.load(flags, THREAD_ENDED) === 1;
}

/** What the checkpointer answered last: frames in the WAL and frames copied into the database file. */
export interface CheckpointResult {
  log: number;
  checkpointed: number;
}

/** What the handoff path accumulated for one origin since the last flush. */
interface Pending {
  firstSeen: number;
  lastSeen: number;
  acquires: number;
  hits: number;
  misses: number;
  connectFailures: number;
  // The connect samples folded so that, for a stored average `old`, the EWMA over them is `old * decay + sum`
  // (and `fresh` when there is no stored average yet): O(1) memory however many connects happen between flushes.
  connects: number;
  connectDecay: number;
  connectSum: number;
  connectFresh: number;
  idleLifetimeChanged: boolean;
  /**
   * The learned lifetime before this record changed it: what the file holds (a row's, written by an earlier flush
   * or loaded at open), undefined when none. A record dropped at the pending bound puts it back (#pendingOf).
   */
  learnedBefore: number | undefined;
  /** The uid of the first acquire recorded (the new row's holder); undefined while none was. */
  uid: number | undefined;
  /**
   * Whose record it is at the pending bound (#pendingOf): `uid` once an acquire is recorded, before that the uid whose
   * connect made the record (a miss's acquirer, a prewarm's uid: recordConnect), null for the daemon's own (refills,
   * warm-on-start). Not the row's holder: a row no acquire asked for is held by no uid (#write).
   */
  group: Holder;
  /**
   * The minutes (floor(ms / 60000)) with acquires, oldest first, and the acquires of each (parallel arrays): at most
   * #minutesPerOrigin entries, none older than the history keeps (#addDemand).
   */
  minutes: number[];
  minuteAcquires: number[];
}

interface OriginRow {
  origin_key: string;
  host: string;
  port: number;
  first_seen: number;
  last_seen: number;
  acquires: number;
  hits: number;
  misses: number;
  connect_failures: number;
  connect_ms_avg: number | null;
  learned_idle_lifetime_ms: number | null;
  demand_rate_per_s: number;
  demand_updated_at: number;
  /** The holder (see MIGRATIONS[3]); NULL when none, or on a file whose migration to schema 4 waits. */
  uid: number | null;
}

/** What a run of flush()'s or topOrigins' slices owes (StateStore.#prepare): the pending origins when it was asked. */
interface Owed {
  records: number;
  by: 'flush' | 'ranking';
}

/** The statements a slice's writes run (StateStore.#writes), by name: the store thread prepares them from their SQL. */
type WriteName = 'upsert' | 'addDemand' | 'forget' | 'forgetDemand' | 'forgetMinute' | 'unstamp';

/**
 * One slice's writes, prepared on the event loop and committed in one transaction (by the store thread, or here
 * without one: StateStore.#commitHere): each a statement and its parameters.
 */
interface ThreadSlice {
  runs: Array<[WriteName, unknown[] | Record<string, unknown>]>;
  /** Origins written (close() counts those committed). */
  origins: number;
}

/**
 * A slice of a flush (the timer's, flush()'s, topOrigins'), prepared (StateStore.#prepare): its writes, and what holds
 * in memory once they are committed, or is undone if they fail.
 */
interface PreparedSlice extends ThreadSlice {
  /** The records written, each with what it held then: the record itself starts again from nothing meanwhile. */
  written: Array<[string, Pending, Pending]>;
  /** Rows evicted or pruned: their learned lifetimes are forgotten once committed. */
  forgotten: string[];
  evicted: number;
  /** The row counts before the slice (#write, #evictSome and the prune change them as they prepare). */
  rowCount: number;
  held: Map<Holder, number>;
  /** The pruning is complete as of this time once committed (#lastPrune). */
  prunedAt: number | undefined;
  /** More to do after it: another slice follows. */
  more: boolean;
  owed: Owed | undefined;
  /** Where its time went, while onSlice is given. */
  timing: SliceTiming | undefined;
}

/** What the store thread says of a slice whose commit failed. */
interface SliceFailure {
  message: string;
  code?: string;
}

/** The rows an eviction slice picked already, so that the next batch's pick (not yet committed) skips them. */
interface EvictionCursor {
  unused: number;
  of: Map<Holder, number>;
}

/** The slice the store thread is committing (one at a time: the next is prepared once it is told of this one). */
interface InFlight {
  id: number;
  slice: PreparedSlice;
  /** The thread's flags and where it tells the result (read with receiveMessageOnPort), and its count once done. */
  flags: Int32Array;
  results: MessagePort;
  doneAt: number;
  worker: Worker;
  handedAt: number;
  /** Its thread was stopped meanwhile (stopAutoFlush): it ends once this is committed. */
  terminateAfter: boolean;
  /** Resolved with the failure, if any, once the result is read (#settle). */
  settled: Promise<{ failed?: SliceFailure }>;
  settle: (result: { failed?: SliceFailure }) => void;
}

/**
 * A record written by a slice starts again from nothing (the slice holds what it had: returned), so that what is
 * recorded while the slice is committed is kept apart, pending after it (StateStore.#apply) or merged back if the
 * commit fails (#mergeEarlier). Its first-seen time, holder and group stay.
 */
function restart(pending: Pending): Pending {
  const before = { ...pending };
  pending.acquires = 0;
  pending.hits = 0;
  pending.misses = 0;
  pending.connectFailures = 0;
  pending.connects = 0;
  pending.connectDecay = 1;
  pending.connectSum = 0;
  pending.connectFresh = 0;
  pending.idleLifetimeChanged = false;
  pending.minutes = [];
  pending.minuteAcquires = [];
  return before;
}

/** Nothing recorded in a record since it was written (restart). */
function isEmpty(pending: Pending): boolean {
  return (
    pending.acquires === 0 &&
    pending.connects === 0 &&
    pending.connectFailures === 0 &&
    !pending.idleLifetimeChanged &&
    pending.minutes.length === 0
  );
}

function emptySliceTiming(): SliceTiming {
  return {
    origins: 0,
    evicted: 0,
    statements: 0,
    wallMs: 0,
    cpuMs: 0,
    readMs: 0,
    writeMs: 0,
    evictPickMs: 0,
    evictDeleteMs: 0,
    pruneMs: 0,
    commitMs: 0,
    commitCpuMs: 0,
    commitSystemMs: 0,
    threadMs: 0,
  };
}

/** Who holds a row: a uid, or null for rows no acquire of a known uid brought in (see MIGRATIONS[3]). */
type Holder = number | null;

/**
 * Brings a database to the newest schema, one transaction per migration. Refuses a database newer than
 * `migrations` (a downgraded sockpoold must not write into a schema it does not know). Returns the versions.
 */
export function migrate(
  db: Database.Database,
  migrations: readonly string[] = MIGRATIONS,
  name = db.name,
): { from: number; to: number } {
  const from = db.prepare<[], number>('PRAGMA user_version').pluck().get() ?? 0;
  if (from > migrations.length) {
    throw new SockpoolError(
      ErrorCodes.CONFIG,
      `${name}: state schema version ${from} is newer than this sockpoold knows (${migrations.length}); ` +
        'use a newer sockpoold or another state directory',
      { path: name, version: from },
    );
  }
  for (let version = from; version < migrations.length; version++) {
    const sql = migrations[version] ?? '';
    db.transaction(() => {
      db.exec(sql);
      db.exec(`PRAGMA user_version = ${version + 1}`);
    })();
  }
  return { from, to: migrations.length };
}

/**
 * The oldest schema this version's statements run on: the migrations after it add an index (2), forget values (3)
 * and add the holder column (4: below it, every row is the one holder null; see #hasHolders).
 */
const STATEMENTS_NEED_SCHEMA = 1;

function schemaVersion(db: Database.Database): number {
  return db.prepare<[], number>('PRAGMA user_version').pluck().get() ?? 0;
}

/** SQLite could not take a lock another connection holds (SQLITE_BUSY and its extended codes). */
function isBusy(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' && code.startsWith('SQLITE_BUSY');
}

function maxOriginsOf(value: number | undefined): number {
  return Math.max(1, Math.floor(value ?? 100_000));
}

/** SQLite found the file corrupt, or not a database at all (SQLITE_CORRUPT and its extended codes, SQLITE_NOTADB). */
function isCorruption(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' && /^SQLITE_(CORRUPT|NOTADB)/.test(code);
}

/** A failure to open the state database, as a SOCKPOOL_ERR_CONFIG naming the file (one already typed is kept). */
function openError(path: string, error: unknown): Error {
  if (error instanceof SockpoolError) return error;
  const code = (error as { code?: unknown }).code;
  return new SockpoolError(
    ErrorCodes.CONFIG,
    `${path}: cannot open the state database: ${(error as Error).message}`,
    { path, ...(typeof code === 'string' ? { sqliteCode: code } : {}) },
    { cause: error },
  );
}

export class StateStore {
  readonly path: string;
  readonly #db: Database.Database;
  readonly #now: () => number;
  readonly #historyMinutes: number;
  readonly #originRetentionMs: number;
  readonly #scoreHalfLifeMinutes: number;
  readonly #rateWindowMs: number;
  #pending = new Map<string, Pending>();
  /** The pending origins per group (Pending.group), first recorded first: see #pendingOf. */
  #pendingBy = new Map<Holder, Set<string>>();
  /** Learned idle lifetimes: all of them, loaded at open and kept current in memory (the store is the only writer). */
  #learned = new Map<string, number>();
  #timer: NodeJS.Timeout | undefined;
  /** A run of slices in progress (#runSlices: on setImmediate), so ticks do not overlap. */
  #slicing = false;
  /** The run of slices goes on until nothing is left, timer or not (the eviction a ranking left: topOrigins). */
  #slicingUntilDone = false;
  /** Rows over the cap when a ranking left their eviction to #runSlices, until they are evicted (onOverCapEvicted). */
  #overCapAtRanking: number | undefined;
  #checkpointer: Worker | undefined;
  #checkpointPending = false;
  #checkpointAgain = false;
  /** Commits since the last checkpoint request. */
  #uncheckpointed = false;
  #checkpointerReady: Promise<void> = Promise.resolve();
  /** The store thread's shared flags (THREAD_OPEN...), name and end: the checkpointer's, then close()'s writer's. */
  #threadFlags: Int32Array | undefined;
  #threadName = '';
  #threadEnded: Promise<void> = Promise.resolve();
  /** Where the store thread tells close()'s slices that failed (read with receiveMessageOnPort). */
  #threadErrors: MessagePort | undefined;
  /** The store thread close() stopped waiting for (its name), if any. */
  #threadLeft: string | undefined;
  /**
   * A store thread ended with an error before its connection was open (its error event: Node could not start it, or
   * its code failed before the open): close() starts no other, which would fail the same way, and commits on the event
   * loop, as without a thread.
   */
  #threadsFail = false;
  /** When a checkpointer was last started after a death (performance.now()), and the restart waiting, if any. */
  #restartedAt: number | undefined;
  #restartTimer: NodeJS.Timeout | undefined;
  readonly #onThreadEnded: StateStoreOptions['onThreadEnded'];
  #slicesSinceCheckpoint = 0;
  #checkpoints = 0;
  #lastCheckpoint: CheckpointResult | undefined;
  #maxOrigins: number;
  /** Per-minute demand entries a pending record holds at most (minutesPerOriginOf maxOrigins). */
  #minutesPerOrigin: number;
  #flushMs = 0;
  /** Rows in `origins` (counted at open, kept current by inserts, evictions and prunes). */
  #rowCount = 0;
  /** Rows in `origins` per holder, as #rowCount (a few entries: one per uid that brought origins in). */
  #held = new Map<Holder, number>();
  /** The file has the holder column (schema 4); false only while its migration waits (a lock at start). */
  readonly #hasHolders: boolean;
  #lastPrune = 0;
  #closed = false;
  /** A history in memory only (the file could not be opened: onUnavailable): no checkpointer, nothing on disk. */
  readonly #inMemory: boolean;
  /** The state directory's lock (StateStore.open's lockStateDir), let go after the last write. */
  readonly #lock: StateDirLock | undefined;
  /** Timer flushes failed in a row (0 while they succeed): onFlushFailing is told at the first only. */
  #failures = 0;
  readonly #onFlushFailing: StateStoreOptions['onFlushFailing'];
  readonly #onFlushRecovered: StateStoreOptions['onFlushRecovered'];
  readonly #onOverCapEvicted: StateStoreOptions['onOverCapEvicted'];
  readonly #onSlice: StateStoreOptions['onSlice'];
  /** The slice under way's timing, while onSlice is given. */
  #timing: SliceTiming | undefined;
  /** The slices' writes (#prepare), by name: their SQL (for the store thread) and, on this connection, statements. */
  readonly #writeSql: Record<WriteName, string>;
  readonly #writes: Record<WriteName, Database.Statement>;
  /** The slice the store thread is committing, if any (#settle); numbered by #slices. */
  #inFlight: InFlight | undefined;
  #slices = 0;
  /** Slices handed to the current store thread (its THREAD_SLICES counts those it is done with). */
  #handed = 0;
  /** The last slice wrote origins: the next one evicts or prunes first if due, so a steady flood does not starve them. */
  #wroteLast = false;
  readonly #statements: {
    select: Database.Statement<[string], OriginRow>;
    prunableDemand: Database.Statement<[number, number, number, number], { origin_key: string; minute: number }>;
    future: Database.Statement<[number, number, number], string>;
    prunable: Database.Statement<[number, number, number], { origin_key: string; uid: Holder }>;
    unused: Database.Statement<[number, number], { origin_key: string; uid: Holder }>;
    oldestOf: Database.Statement<[Holder, number, number], string>;
    unusedHeld: Database.Statement<[], { uid: Holder; rows: number }>;
    nthOldestUsedOf: Database.Statement<[Holder, number], { last_seen: number; origin_key: string }>;
    held: Database.Statement<[], { uid: Holder; rows: number }>;
    top: Database.Statement<
      [{ nowMinute: number; sinceMinute: number; halfLifeMinutes: number; limit: number; cuts: string }],
      {
        origin_key: string;
        host: string;
        port: number;
        score: number;
        learned_idle_lifetime_ms: number | null;
        demand_rate_per_s: number;
        demand_updated_at: number;
        connect_ms_avg: number | null;
        last_seen: number;
      }
    >;
  };

  /**
   * Opens (creating if needed) `<stateDir>/sockpool.sqlite`; the directory is created with mode 0750. A file SQLite
   * finds corrupt or not a database is moved aside (with its -wal and -shm) to `sockpool.sqlite.corrupt-<time>` and
   * a new one created (options.onCorrupt is told); any other failure is a SOCKPOOL_ERR_CONFIG naming the file.
   * With options.lockStateDir, the directory's lock is taken first (another daemon holding it: that refusal).
   */
  static open(stateDir: string, options: StateStoreOptions = {}): StateStore {
    mkdirSync(stateDir, { recursive: true, mode: 0o750 });
    const path = join(stateDir, 'sockpool.sqlite');
    let lock: StateDirLock | undefined;
    try {
      if (options.lockStateDir) lock = StateDirLock.take(stateDir);
      return StateStore.#openOrSetAside(path, options, lock);
    } catch (error) {
      // A refusal (SockpoolError of our own, no cause: a newer schema, another daemon on the directory) stands;
      // anything else the file (or the lock file) or its disk did.
      if (!options.onUnavailable || !(error instanceof SockpoolError) || error.cause === undefined) {
        lock?.release();
        throw error;
      }
      const sqliteCode = error.fields.sqliteCode;
      const failedPath = error.fields.path;
      options.onUnavailable({
        path: typeof failedPath === 'string' ? failedPath : path,
        sqliteCode: typeof sqliteCode === 'string' ? sqliteCode : undefined,
        err: error.message,
      });
      // The lock, when taken, is kept: a second daemon on the directory is still refused while this one runs on memory.
      try {
        return StateStore.#openFile(':memory:', options, path, lock);
      } catch (memoryError) {
        lock?.release();
        throw memoryError;
      }
    }
  }

  /** StateStore.open without the fallback to memory: a corrupt file moved aside, any other failure thrown. */
  static #openOrSetAside(path: string, options: StateStoreOptions, lock: StateDirLock | undefined): StateStore {
    try {
      return StateStore.#openFile(path, options, path, lock);
    } catch (error) {
      if (!isCorruption(error)) throw openError(path, error);
      const movedTo = `${path}.corrupt-${new Date().toISOString().replace(/[:.]/g, '-')}`;
      try {
        renameSync(path, movedTo);
        for (const suffix of ['-wal', '-shm']) {
          try {
            renameSync(path + suffix, movedTo + suffix);
          } catch (renameError) {
            if ((renameError as { code?: string }).code !== 'ENOENT') throw renameError;
          }
        }
      } catch (renameError) {
        throw openError(path, renameError);
      }
      options.onCorrupt?.({ path, movedTo, err: (error as Error).message });
      try {
        return StateStore.#openFile(path, options, path, lock);
      } catch (retryError) {
        throw openError(path, retryError);
      }
    }
  }

  /**
   * Opens `file` (':memory:' for a history in memory only) as the state database named `path`; the store holds
   * `lock` from then on (released at close), the caller until then.
   */
  static #openFile(
    file: string,
    options: StateStoreOptions,
    path = file,
    lock: StateDirLock | undefined = undefined,
  ): StateStore {
    const db = new Database(file);
    try {
      // busy_timeout first: setting journal_mode may wait for a lock (another process on the file).
      db.exec('PRAGMA busy_timeout = 2000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL');
      // Per connection: this one's commits are the ones that start the WAL over (the checkpointer only copies it).
      db.pragma(`journal_size_limit = ${WAL_SIZE_LIMIT}`);
      // The open reads the schema and counts rows by an index: a torn page of a table (a disk, a copy cut short) was
      // found only by the statements touching it, so the file was kept and every flush and warming failed on it, at
      // every start. quick_check reads every page (about 0.1 s for a file of 100,000 origins) and so sends such a file
      // aside as one SQLite cannot read at all (StateStore.open).
      const check = db.prepare<[], string>('PRAGMA quick_check(1)').pluck().get();
      if (check !== 'ok') {
        throw Object.assign(new Error(`quick_check: ${check ?? 'no answer'}`), { code: 'SQLITE_CORRUPT' });
      }
      try {
        migrate(db, MIGRATIONS, path);
      } catch (error) {
        // Another process holds the write lock (a backup tool, an operator's sqlite3 shell) at the first start after
        // an upgrade: the history only warms, so the start goes on with the file as it is and the migrations wait for
        // a start without the lock (this version's statements run on any schema from STATEMENTS_NEED_SCHEMA; until
        // then the file lacks the eviction index and keeps the lifetimes schema 3 forgets). The daemon logs that the
        // migrations wait (onMigrationDeferred): the operator would otherwise never learn why the schema stays old.
        const version = schemaVersion(db);
        if (!isBusy(error) || version < STATEMENTS_NEED_SCHEMA) throw error;
        options.onMigrationDeferred?.({
          path,
          version,
          migration: version + 1,
          newest: MIGRATIONS.length,
          err: (error as Error).message,
        });
      }
      // Once open, a lock held by another process (an operator's sqlite3 shell, a backup tool) fails a flush at once
      // instead of holding the event loop for busy_timeout at every flush tick: what was not written stays pending
      // (bounded) for the next. The daemon is the file's only writer; its checkpointer's PASSIVE checkpoints never
      // block a writer.
      db.exec('PRAGMA busy_timeout = 0');
      return new StateStore(db, path, options, file === ':memory:', lock);
    } catch (error) {
      db.close();
      throw error;
    }
  }

  private constructor(
    db: Database.Database,
    path: string,
    options: StateStoreOptions,
    inMemory: boolean,
    lock: StateDirLock | undefined,
  ) {
    this.#db = db;
    this.#lock = lock;
    this.path = path;
    this.#inMemory = inMemory;
    this.#now = options.now ?? Date.now;
    this.#onFlushFailing = options.onFlushFailing;
    this.#onFlushRecovered = options.onFlushRecovered;
    this.#onThreadEnded = options.onThreadEnded;
    this.#onOverCapEvicted = options.onOverCapEvicted;
    this.#onSlice = options.onSlice;
    this.#historyMinutes = Math.ceil(((options.demandHistoryDays ?? 7) * DAY_MS) / MINUTE_MS);
    this.#originRetentionMs = (options.originRetentionDays ?? 30) * DAY_MS;
    this.#scoreHalfLifeMinutes = (options.scoreHalfLifeMs ?? 6 * 3_600_000) / MINUTE_MS;
    this.#rateWindowMs = options.demandRateWindowMs ?? MINUTE_MS;
    this.#maxOrigins = maxOriginsOf(options.maxOrigins);
    this.#minutesPerOrigin = minutesPerOriginOf(this.#maxOrigins);
    this.#hasHolders =
      db.prepare<[], number>("SELECT count(*) FROM pragma_table_info('origins') WHERE name = 'uid'").pluck().get() ===
      1;
    // Without the column (its migration waits), every row is the holder null: the eviction order is then the plain
    // one of the older versions.
    const holder = this.#hasHolders ? 'uid' : 'NULL';
    const withHolder = (sql: string) => (this.#hasHolders ? sql : '');
    const upsertSql = `
        INSERT INTO origins (origin_key, host, port, first_seen, last_seen, acquires, hits, misses, connect_failures,
                             connect_ms_avg, learned_idle_lifetime_ms, demand_rate_per_s, demand_updated_at
                             ${withHolder(', uid')})
        VALUES (@origin_key, @host, @port, @first_seen, @last_seen, @acquires, @hits, @misses, @connect_failures,
                @connect_ms_avg, @learned_idle_lifetime_ms, @demand_rate_per_s, @demand_updated_at
                ${withHolder(', @uid')})
        ON CONFLICT (origin_key) DO UPDATE SET
          last_seen = excluded.last_seen, acquires = excluded.acquires, hits = excluded.hits,
          misses = excluded.misses, connect_failures = excluded.connect_failures,
          connect_ms_avg = excluded.connect_ms_avg, learned_idle_lifetime_ms = excluded.learned_idle_lifetime_ms,
          demand_rate_per_s = excluded.demand_rate_per_s, demand_updated_at = excluded.demand_updated_at
          ${withHolder(', uid = excluded.uid')}`;
    this.#statements = {
      select: db.prepare('SELECT * FROM origins WHERE origin_key = ?'),
      // The prune's and the eviction's picks take LIMIT and OFFSET: a slice picks batch after batch before its writes
      // are committed (#prepare), each after those it picked already. So each has an ORDER BY that names a whole key
      // (an index's columns and the primary key after them), the oldest first: an OFFSET into an order SQL does not
      // promise (SQLite's scan of the day) could take a row twice and skip another. Each is the order of an index
      // range scan, never a sort of the table: the demand's two ranges (past the history, ahead of the clock) as two
      // scans of demand_history_minute merged (one scan with an OR reads the whole index, the history kept too).
      prunableDemand: db.prepare(`
        SELECT origin_key, minute FROM demand_history WHERE minute < ?
        UNION ALL SELECT origin_key, minute FROM demand_history WHERE minute > ?
        ORDER BY minute, origin_key LIMIT ? OFFSET ?`),
      future: db
        .prepare<[number, number, number], string>(
          'SELECT origin_key FROM origins WHERE last_seen > ? ORDER BY last_seen, origin_key LIMIT ? OFFSET ?',
        )
        .pluck(),
      prunable: db.prepare(`
        SELECT origin_key, ${holder} AS uid FROM origins WHERE last_seen < ?
          AND NOT EXISTS (SELECT 1 FROM demand_history d WHERE d.origin_key = origins.origin_key)
        ORDER BY last_seen, origin_key LIMIT ? OFFSET ?`),
      // The expressions are the indexes' (origins_eviction, origins_uid_eviction), written the same way so that
      // SQLite uses them: each an index range scan, never a sort of the table. Ties of last_seen go by origin_key,
      // the indexes' last column (the primary key): named, so that #evictionCuts finds the same rows.
      unused: db.prepare(
        `SELECT origin_key, ${holder} AS uid FROM origins WHERE (acquires > 0) = 0 ORDER BY last_seen, origin_key
         LIMIT ? OFFSET ?`,
      ),
      oldestOf: db
        .prepare<[Holder, number, number], string>(
          `SELECT origin_key FROM origins WHERE ${holder} IS ? ORDER BY acquires > 0, last_seen, origin_key
           LIMIT ? OFFSET ?`,
        )
        .pluck(),
      unusedHeld: db.prepare(
        `SELECT ${holder} AS uid, count(*) AS rows FROM origins WHERE (acquires > 0) = 0 GROUP BY 1`,
      ),
      nthOldestUsedOf: db.prepare(`
        SELECT last_seen, origin_key FROM origins WHERE ${holder} IS ? AND (acquires > 0) = 1
        ORDER BY last_seen, origin_key LIMIT 1 OFFSET ?`),
      held: db.prepare(`SELECT ${holder} AS uid, count(*) AS rows FROM origins GROUP BY 1`),
      // Each holder's origins ranked by score (but those the eviction over the cap takes: @cuts, #evictionCuts),
      // then the holders' firsts (the busiest first among them), their
      // seconds, and so on: one holder's many busy origins take every other place at most while others have any.
      top: db.prepare(`
        WITH scored AS (
          SELECT o.origin_key, o.host, o.port, o.learned_idle_lifetime_ms, o.demand_rate_per_s, o.demand_updated_at,
                 o.connect_ms_avg, o.last_seen, ${this.#hasHolders ? 'o.uid' : 'NULL'} AS uid,
                 SUM(d.acquires * pow(2.0, -((@nowMinute - d.minute) * 1.0 / @halfLifeMinutes))) AS score
          FROM demand_history d JOIN origins o ON o.origin_key = d.origin_key
          WHERE d.minute >= @sinceMinute AND d.minute <= @nowMinute AND o.port > 0
            AND NOT EXISTS (SELECT 1 FROM json_each(@cuts) AS cut
              WHERE cut.value ->> 0 IS ${this.#hasHolders ? 'o.uid' : 'NULL'}
                AND (o.last_seen, o.origin_key) <= (cut.value ->> 1, cut.value ->> 2))
          GROUP BY o.origin_key
        )
        SELECT origin_key, host, port, learned_idle_lifetime_ms, demand_rate_per_s, demand_updated_at, connect_ms_avg,
               last_seen, score,
               row_number() OVER (PARTITION BY uid ORDER BY score DESC, last_seen DESC, origin_key) AS turn
        FROM scored
        ORDER BY turn, score DESC, last_seen DESC, origin_key
        LIMIT @limit`),
    };
    const writes: Record<WriteName, string> = {
      upsert: upsertSql,
      addDemand: `
        INSERT INTO demand_history (origin_key, minute, acquires) VALUES (?, ?, ?)
        ON CONFLICT (origin_key, minute) DO UPDATE SET acquires = acquires + excluded.acquires`,
      forget: 'DELETE FROM origins WHERE origin_key = ?',
      forgetDemand: 'DELETE FROM demand_history WHERE origin_key = ?',
      forgetMinute: 'DELETE FROM demand_history WHERE origin_key = ? AND minute = ?',
      unstamp: `UPDATE origins SET last_seen = @now, demand_updated_at = min(demand_updated_at, @now)
                WHERE origin_key = @originKey`,
    };
    this.#writeSql = writes;
    this.#writes = Object.fromEntries(Object.entries(writes).map(([name, sql]) => [name, db.prepare(sql)])) as Record<
      WriteName,
      Database.Statement
    >;
    this.#recount();
    const learned = db.prepare<[], { origin_key: string; learned: number }>(
      'SELECT origin_key, learned_idle_lifetime_ms AS learned FROM origins WHERE learned IS NOT NULL',
    );
    for (const row of learned.all()) this.#learned.set(row.origin_key, row.learned);
    // The first flush prunes (#lastPrune is 0): the timer's, or flush().
  }

  // -------------------------------------------------------------------------------------------------------------
  // The handoff path: memory only.

  #pendingOf(originKey: string, now: number, uid?: number): Pending {
    let pending = this.#pending.get(originKey);
    if (!pending) {
      // At most maxOrigins pending: a flush that keeps failing (a full disk, a file locked by another process)
      // leaves everything pending, and without a bound every origin any client touched grew the daemon's memory
      // for as long as that lasted. The first recorded since the last flush of the holder with the most pending
      // goes, as the cap would evict it anyway (least recently seen of that holder; an origin recorded again since
      // is kept at its first place: an approximation), and a lifetime it taught since with it (set back to the row's, or
      // forgotten for an origin without one: else kept in memory for good for an origin that never gets a row). So one uid's flood of new origins between two flushes drops its own
      // records, not another uid's; a record made by a connect counts for the uid whose connect it was (Pending.group),
      // so a flood of one uid's prewarm connects drops its own, not another uid's miss between its connect and its
      // acquire.
      if (this.#pending.size >= this.#maxOrigins) {
        const heaviest = heaviestHolder(Array.from(this.#pendingBy, ([uid, keys]) => [uid, keys.size] as const));
        const dropped = heaviest && this.#pendingBy.get(heaviest.holder)?.values().next().value;
        const record = dropped === undefined ? undefined : this.#pending.get(dropped);
        if (dropped !== undefined && record) {
          this.#unpend(dropped, record);
          // Back to the file's: forgetting it (as before) lost a lifetime the origin's row still held, from memory
          // (and from the warming it steers) until a restart loaded it again.
          if (record.idleLifetimeChanged) {
            if (record.learnedBefore === undefined) this.#learned.delete(dropped);
            else this.#learned.set(dropped, record.learnedBefore);
          }
        }
      }
      pending = {
        firstSeen: now,
        lastSeen: now,
        acquires: 0,
        hits: 0,
        misses: 0,
        connectFailures: 0,
        connects: 0,
        connectDecay: 1,
        connectSum: 0,
        connectFresh: 0,
        idleLifetimeChanged: false,
        learnedBefore: undefined,
        uid: undefined,
        group: uid ?? null,
        minutes: [],
        minuteAcquires: [],
      };
      this.#pending.set(originKey, pending);
      this.#pendBy(originKey, pending.group);
    } else {
      pending.lastSeen = now;
    }
    return pending;
  }

  /**
   * An acquire for `originKey` by a client of `uid` (its SO_PEERCRED: the daemon's own word, never the client's);
   * `hit` when a warm idle socket served it. The first uid recorded holds the origin's row if it is new (#evictSome).
   */
  recordAcquire(originKey: string, outcome: { hit: boolean }, uid?: number): void {
    const now = this.#now();
    const pending = this.#pendingOf(originKey, now, uid);
    pending.acquires++;
    if (pending.uid === undefined && uid !== undefined) {
      pending.uid = uid;
      if (pending.group !== uid) {
        this.#unpendBy(originKey, pending.group);
        pending.group = uid;
        this.#pendBy(originKey, uid);
      }
    }
    if (outcome.hit) pending.hits++;
    else pending.misses++;
    this.#addDemand(pending, Math.floor(now / MINUTE_MS), now);
  }

  /**
   * Counts an acquire in its minute's entry. While flushes keep failing (a locked file, a full disk) a record gained
   * an entry every minute it was used, without bound (three days of 200 origins: 864,000 entries, 46 MB of heap, and
   * a flush of 5 s at close), so: an entry older than the history keeps (`demandHistoryDays`) goes, as the next prune
   * would delete it and topOrigins counts none; past #minutesPerOrigin the two oldest are merged (#mergeOldest), which
   * keeps every acquire and the ranking's score and loses only the minute resolution of the oldest demand.
   */
  #addDemand(pending: Pending, minute: number, now: number): void {
    const { minutes, minuteAcquires } = pending;
    // Minutes come in order, so this is the last entry or a new one after it; a clock set back goes further in.
    let index = minutes.length;
    while (index > 0 && (minutes[index - 1] ?? 0) > minute) index--;
    if (index > 0 && minutes[index - 1] === minute) {
      minuteAcquires[index - 1] = (minuteAcquires[index - 1] ?? 0) + 1;
      return;
    }
    minutes.splice(index, 0, minute);
    minuteAcquires.splice(index, 0, 1);
    const oldestKept = Math.floor(now / MINUTE_MS) - this.#historyMinutes;
    let stale = 0;
    while (stale < minutes.length && (minutes[stale] ?? 0) < oldestKept) stale++;
    if (stale > 0) {
      minutes.splice(0, stale);
      minuteAcquires.splice(0, stale);
    }
    while (minutes.length > this.#minutesPerOrigin) this.#mergeOldest(pending);
  }

  /**
   * Merges a record's two oldest minute entries into one, at the minute where topOrigins' score (each acquire halved
   * every `scoreHalfLifeMs` of age) weighs their sum as it weighed the two: halving is memoryless, so the score is the
   * same at any later time, and the merged minute lies between the two (the order holds). Only where in that span
   * the acquires fell is lost. The minute stays fractional until written (#write rounds it: 0.1% of its score at the
   * default half-life, once): rounded at each merge, an old entry merged with each newer minute in turn stayed at its
   * own minute every time, and the score of what it took in was lost bit by bit.
   */
  #mergeOldest(pending: Pending): void {
    const { minutes, minuteAcquires } = pending;
    const [older = 0, newer = 0] = minutes;
    const [olderAcquires = 0, newerAcquires = 0] = minuteAcquires;
    const acquires = olderAcquires + newerAcquires;
    const halfLife = this.#scoreHalfLifeMinutes;
    // Relative to the newer minute: 2 ** (minute / halfLife) of an epoch minute overflows.
    const merged =
      newer + halfLife * Math.log2((olderAcquires * 2 ** ((older - newer) / halfLife) + newerAcquires) / acquires);
    minutes.splice(0, 2, Math.min(newer, Math.max(older, merged)));
    minuteAcquires.splice(0, 2, acquires);
  }

  /** A connection to `originKey` completed after `ms`; `uid`: whose connect it was (a waiter's, a prewarm's), if any. */
  recordConnect(originKey: string, ms: number, uid?: number): void {
    if (!Number.isFinite(ms) || ms < 0) return;
    const pending = this.#pendingOf(originKey, this.#now(), uid);
    const keep = 1 - CONNECT_EWMA_ALPHA;
    pending.connectFresh = pending.connects === 0 ? ms : pending.connectFresh * keep + ms * CONNECT_EWMA_ALPHA;
    pending.connectDecay *= keep;
    pending.connectSum = pending.connectSum * keep + ms * CONNECT_EWMA_ALPHA;
    pending.connects++;
  }

  /** Every address of `originKey` failed (or the connect timed out); `uid` as for recordConnect. */
  recordConnectFailure(originKey: string, uid?: number): void {
    this.#pendingOf(originKey, this.#now(), uid).connectFailures++;
  }

  /**
   * The origin's server closed an idle connection that had been silent for `ms`. The estimate is conservative:
   * a shorter observation replaces it at once (a socket handed out just after the server closed it costs a failed
   * request); a longer one raises it only by a tenth of the difference. Note that a pool recycling sockets before
   * the estimate never observes a longer lifetime: raising it needs an occasional socket kept past the estimate.
   */
  recordIdleLifetime(originKey: string, ms: number): void {
    if (!Number.isFinite(ms) || ms <= 0) return;
    // The record first: making it may drop another at the bound, which sets that one's lifetime back (never this one's).
    const pending = this.#pendingOf(originKey, this.#now());
    const current = this.#learned.get(originKey);
    if (!pending.idleLifetimeChanged) {
      pending.learnedBefore = current;
      pending.idleLifetimeChanged = true;
    }
    const next = current === undefined || ms < current ? ms : current + (ms - current) * IDLE_LIFETIME_RISE;
    this.#learned.set(originKey, Math.round(next));
  }

  #pendBy(originKey: string, uid: Holder): void {
    let keys = this.#pendingBy.get(uid);
    if (!keys) {
      keys = new Set();
      this.#pendingBy.set(uid, keys);
    }
    keys.add(originKey);
  }

  #unpendBy(originKey: string, uid: Holder): void {
    const keys = this.#pendingBy.get(uid);
    keys?.delete(originKey);
    if (keys?.size === 0) this.#pendingBy.delete(uid);
  }

  /** Forgets a pending origin (written, or dropped at the bound). */
  #unpend(originKey: string, pending: Pending): void {
    this.#pending.delete(originKey);
    this.#unpendBy(originKey, pending.group);
  }

  /** The learned idle lifetime of an origin (in memory: includes what is not flushed yet), or undefined. */
  learnedIdleLifetime(originKey: string): number | undefined {
    return this.#learned.get(originKey);
  }

  /** Origins with statistics waiting for the next flush. */
  get pendingOrigins(): number {
    return this.#pending.size;
  }

  /** Per-minute demand entries waiting for the next flush, all origins together (for tests: O(pending origins)). */
  get pendingDemandEntries(): number {
    let entries = 0;
    for (const pending of this.#pending.values()) entries += pending.minutes.length;
    return entries;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Off the handoff path: flushing and reading.

  /**
   * Writes everything recorded before the call, evicts what is over the cap and prunes when due (the first flush
   * does), in the timer's slices (SLICE_BUDGET_MS of event-loop time each, yielding between them): resolved once all
   * of that is committed (unless the store is closed meanwhile: close() writes what is left), with the number of
   * origins it wrote. In one transaction, as it was, a large pending set held the event loop for as long. Records
   * made while it runs are not waited for (the timer writes them), so a flood of new origins cannot keep it from
   * resolving. A write that fails (a locked file, a full disk) rejects, what it did not write still pending. For tests
   * and the bench: the daemon's writing is the timer's (startAutoFlush).
   */
  async flush(): Promise<number> {
    if (this.#closed) return 0;
    const owed: Owed = { records: this.#pending.size, by: 'flush' };
    const records = owed.records;
    while (await this.#sliceAsync(SLICE_BUDGET_MS, owed)) {
      this.#noteOverCapEvicted();
      await new Promise((resolve) => setImmediate(resolve));
    }
    this.#noteOverCapEvicted();
    return records - owed.records;
  }

  /**
   * One slice of a timed flush, committed here on the event loop (for tests, and a history in memory: the timer's,
   * flush()'s and topOrigins' slices are committed by the store's thread while it runs, #sliceAsync). Throws what the
   * commit threw, the slice undone (#undo). Returns true when there is more to do. A slice the store's thread is
   * committing is waited for first (blocking: a test's), CLOSE_BUDGET_MS at most; then true, doing nothing.
   */
  flushSlice(budgetMs = SLICE_BUDGET_MS): boolean {
    if (this.#closed) return false;
    if (this.#inFlight && this.#settleInFlight(performance.now() + CLOSE_BUDGET_MS, false)) return true;
    const slice = this.#prepare(budgetMs);
    this.#commitHere(slice);
    return slice.more;
  }

  /**
   * One slice (#prepare: flushSlice's, or with `owed` one of flush()'s or topOrigins'), committed by the store's thread
   * when it runs (the auto flush's), else here; resolved once committed, with whether there is more to do, rejected
   * with the commit's failure (the slice undone: #undo). One slice at a time: a slice in flight (another caller's) is
   * waited for first, so the rows a slice reads are those the one before wrote.
   */
  async #sliceAsync(budgetMs: number, owed?: Owed): Promise<boolean> {
    // Looked at again after each wait, and the slice prepared and handed over in the same turn as the last look: two
    // callers waiting for the same slice (the timer's run, flush()) would otherwise both hand one over. Prepared at
    // once when nothing is in flight (the timer's tick prepares in its own turn).
    for (let inFlight = this.#inFlight; inFlight; inFlight = this.#inFlight) await inFlight.settled;
    if (this.#closed) return false;
    const slice = this.#prepare(budgetMs, owed);
    const thread = this.#writer();
    if (!thread || slice.runs.length === 0) {
      this.#commitHere(slice);
      return slice.more;
    }
    const { failed } = await this.#hand(slice, thread);
    if (failed) throw Object.assign(new Error(failed.message), { code: failed.code });
    return slice.more;
  }

  /**
   * Resolves once no slice of a flush is in flight: the store's thread said it committed it, or that it failed (for
   * tests and the bench: the timer's tick hands its slice to the thread and returns).
   */
  async idle(): Promise<void> {
    for (let inFlight = this.#inFlight; inFlight; inFlight = this.#inFlight) await inFlight.settled;
  }

  /**
   * The store thread that commits the flushes' slices: the checkpointer, while it runs and could open the file (one
   * that ended in this turn, its exit event not seen yet, is not handed a slice it would never answer).
   */
  #writer(): Worker | undefined {
    const worker = this.#checkpointer;
    const flags = this.#threadFlags;
    if (!worker || !flags || threadGone(flags)) return undefined;
    return worker;
  }

  /**
   * Prepares one slice, reading only: pending origins (at most `owed.records` of them, the first recorded, with
   * `owed`), or else evictions over the cap, or else pruning, until `budgetMs` is spent, looked at after each origin
   * (its row and at most #minutesPerOrigin demand minutes) and each batch of DELETE_BATCH evictions or prunes. One
   * kind of work a slice: its reads see none of its own writes (committed after), so an eviction must not pick a row
   * the same slice updates, nor the prune of origins one whose demand the slice deletes. After a slice that wrote
   * origins, eviction and pruning go first when due, so a steady flood of new origins does not starve them.
   * flush()'s slices evict and prune as the timer's but ask for no checkpoint (the timer's next slice asks); the
   * ranking's neither evict nor prune (topOrigins leaves out what the eviction takes, and counts no demand the prune
   * would delete). The row counts change as it prepares; #undo sets them back if the commit fails.
   */
  #prepare(budgetMs: number, owed?: Owed): PreparedSlice {
    const started = performance.now();
    const timing = this.#onSlice ? emptySliceTiming() : undefined;
    const cpuStarted = timing ? process.threadCpuUsage() : undefined;
    this.#timing = timing;
    const slice: PreparedSlice = {
      runs: [],
      origins: 0,
      written: [],
      forgotten: [],
      evicted: 0,
      rowCount: this.#rowCount,
      held: new Map(this.#held),
      prunedAt: undefined,
      more: false,
      owed,
      timing,
    };
    const evicts = owed?.by !== 'ranking';
    const now = this.#now();
    const pruneDue = evicts && now - this.#lastPrune >= PRUNE_INTERVAL_MS;
    const overCap = evicts && this.#rowCount > this.#maxOrigins;
    const writesDue = this.#pending.size > 0 && (!owed || owed.records > 0);
    const maxRuns = this.#writer() ? SLICE_WRITES_MAX : Number.POSITIVE_INFINITY;
    // Statements the slice may still take (#prepareWrites, #evictSome and #pruneSome size what they add by it).
    const room = () => maxRuns - slice.runs.length;
    const overBudget = () => performance.now() - started >= budgetMs || room() <= 0;
    try {
      if (writesDue && !(this.#wroteLast && (overCap || pruneDue))) {
        const all = this.#prepareWrites(slice, now, overBudget, room);
        slice.more = !all || (evicts && (this.#rowCount > this.#maxOrigins || pruneDue));
      } else {
        if (overCap) {
          const cursor: EvictionCursor = { unused: 0, of: new Map() };
          for (;;) {
            const rows = this.#rowCount;
            if (!this.#evictSome(slice, cursor, room())) break;
            slice.evicted += rows - this.#rowCount;
            if (overBudget()) break;
          }
        }
        if (slice.runs.length > 0) slice.more = true;
        else if (pruneDue) {
          // (Also when the counts said over the cap and no row was found to evict: the prune is not held up by that.)
          const pruneStarted = performance.now();
          slice.more = this.#preparePrune(slice, now, overBudget, room) || writesDue;
          if (timing) timing.pruneMs += performance.now() - pruneStarted;
        } else slice.more = writesDue;
      }
    } catch (error) {
      this.#undo(slice);
      throw error;
    } finally {
      this.#timing = undefined;
    }
    if (timing && cpuStarted) {
      timing.origins = slice.written.length;
      timing.evicted = slice.evicted;
      timing.statements = slice.runs.length;
      timing.wallMs = performance.now() - started;
      const used = process.threadCpuUsage(cpuStarted);
      timing.cpuMs = (used.user + used.system) / 1000;
    }
    return slice;
  }

  /**
   * The pending origins' writes into `slice` until `overBudget` (checked after each origin: one carries up to
   * #minutesPerOrigin demand entries, 60 statements) or until the next does not fit in `room` (SLICE_WRITES_MAX), each
   * record starting again from nothing (what it held goes into `slice.written`, #undo's to merge back). True when it
   * wrote all it owed.
   */
  #prepareWrites(slice: PreparedSlice, now: number, overBudget: () => boolean, room: () => number): boolean {
    const owed = slice.owed;
    for (const [originKey, pending] of this.#pending) {
      if (owed && slice.written.length >= owed.records) return true;
      // Its row and its demand minutes must fit (but the first: a slice takes at least one).
      if (slice.written.length > 0 && 1 + pending.minutes.length > room()) return false;
      this.#write(originKey, pending, now, slice);
      slice.origins++;
      slice.written.push([originKey, pending, restart(pending)]);
      if (overBudget()) return owed !== undefined && slice.written.length >= owed.records;
    }
    return true;
  }

  /**
   * The prune's writes into `slice` (see #pruneSome): true when it found something (another slice follows, reading
   * what this one left), false when nothing is left to prune (committed, the prune is complete: prunedAt).
   */
  #preparePrune(slice: PreparedSlice, now: number, overBudget: () => boolean, room: () => number): boolean {
    for (const kind of ['demand', 'future', 'origins'] as const) {
      let picked = 0;
      for (;;) {
        const limit = Math.min(DELETE_BATCH, room());
        const found = this.#pruneSome(slice, now, kind, picked, limit);
        picked += found;
        if (found < limit || overBudget()) break;
      }
      if (picked > 0) return true;
    }
    slice.prunedAt = now;
    return false;
  }

  /**
   * Commits a prepared slice on the event loop's connection (no store thread, or nothing to write), then applies it
   * (#apply); a commit that fails is rolled back, the slice undone (#undo), and the failure thrown.
   */
  #commitHere(slice: PreparedSlice): void {
    const timing = slice.timing;
    const started = timing ? performance.now() : 0;
    const cpuStarted = timing ? process.threadCpuUsage() : undefined;
    try {
      if (slice.runs.length > 0) this.#db.transaction(() => this.#runHere(slice.runs))();
    } catch (error) {
      this.#undo(slice);
      throw error;
    } finally {
      // (The timer's ticks with nothing to write are not told.)
      this.#sliceTimed(slice, started, cpuStarted, slice.runs.length > 0);
    }
    this.#apply(slice);
  }

  /** Runs a slice's writes on the event loop's connection (in the caller's transaction). */
  #runHere(runs: ThreadSlice['runs']): void {
    for (const [name, params] of runs) {
      if (Array.isArray(params)) this.#writes[name].run(...params);
      else this.#writes[name].run(params);
    }
  }

  /** Tells onSlice of a slice, with its commit's part on the event loop (from `started`). */
  #sliceTimed(slice: PreparedSlice, started: number, cpuStarted: NodeJS.CpuUsage | undefined, tell = true): void {
    const timing = slice.timing;
    if (!timing || !cpuStarted) return;
    const used = process.threadCpuUsage(cpuStarted);
    timing.commitMs = performance.now() - started;
    timing.commitCpuMs = (used.user + used.system) / 1000;
    timing.commitSystemMs = used.system / 1000;
    timing.wallMs += timing.commitMs;
    timing.cpuMs += timing.commitCpuMs;
    if (tell) this.#onSlice?.(timing);
  }

  /**
   * Hands a prepared slice to the store's thread, which commits it on its connection (the event loop never waits for
   * a commit or its sync); resolved once the thread says it did (#settle, from the message that wakes the event loop).
   */
  #hand(slice: PreparedSlice, worker: Worker): Promise<{ failed?: SliceFailure }> {
    const timing = slice.timing;
    const started = timing ? performance.now() : 0;
    const cpuStarted = timing ? process.threadCpuUsage() : undefined;
    // From 1 to the flags' Int32 range, round and round: never 0, the flag of a thread that committed none.
    const id = (this.#slices % 0x7fff_ffff) + 1;
    this.#slices = id;
    let settle: (result: { failed?: SliceFailure }) => void = () => {};
    const settled = new Promise<{ failed?: SliceFailure }>((resolve) => {
      settle = resolve;
    });
    this.#inFlight = {
      id,
      slice,
      flags: this.#threadFlags as Int32Array,
      results: this.#threadErrors as MessagePort,
      doneAt: ++this.#handed,
      handedAt: performance.now(),
      worker,
      terminateAfter: false,
      settled,
      settle,
    };
    // Origins 0: the thread's count of origins committed is close()'s.
    worker.postMessage({ id, runs: slice.runs, origins: 0 });
    // Told once the thread answers (#settle), with how long it took.
    this.#sliceTimed(slice, started, cpuStarted, false);
    return settled;
  }

  /** Reads what the store's thread said of the slice in flight, if it said it yet (never waits). */
  #readResults(): void {
    const inFlight = this.#inFlight;
    if (!inFlight) return;
    for (;;) {
      const received = receiveMessageOnPort(inFlight.results);
      if (!received) return;
      const { id, failed } = received.message as { id: number | undefined; failed?: SliceFailure };
      if (id === inFlight.id) {
        this.#settle(inFlight, failed);
        return;
      }
    }
  }

  /** The slice in flight is committed (or `failed`): applied or undone, and whoever waits for it told. */
  #settle(inFlight: InFlight, failed: SliceFailure | undefined): void {
    if (this.#inFlight !== inFlight) return;
    this.#inFlight = undefined;
    if (failed) this.#undo(inFlight.slice);
    else this.#apply(inFlight.slice);
    const timing = inFlight.slice.timing;
    if (timing) {
      timing.threadMs = performance.now() - inFlight.handedAt;
      this.#onSlice?.(timing);
    }
    // Its thread stopped meanwhile (stopAutoFlush): it ends now that its commit is done (with its port, if another
    // thread has been started since).
    if (inFlight.terminateAfter) void inFlight.worker.terminate();
    if (inFlight.results !== this.#threadErrors) inFlight.results.close();
    inFlight.settle({ failed });
  }

  /**
   * A committed slice's effects in memory: the learned lifetimes of the rows it deleted forgotten, the prune's time,
   * its records unpended (or, given more since, moved to the end as records made anew), a checkpoint asked for.
   */
  #apply(slice: PreparedSlice): void {
    this.#wroteLast = slice.written.length > 0;
    for (const originKey of slice.forgotten) {
      // A lifetime learned since the row was picked (recorded while the slice was committed) is its record's, written
      // with it: kept. The row it was learned over is gone, so the record dropped at the bound forgets it (#pendingOf).
      const record = this.#pending.get(originKey);
      if (record?.idleLifetimeChanged) record.learnedBefore = undefined;
      else this.#learned.delete(originKey);
    }
    if (slice.prunedAt !== undefined) this.#lastPrune = slice.prunedAt;
    for (const [originKey, pending] of slice.written) {
      // Dropped at the pending bound meanwhile: nothing of it is pending.
      if (this.#pending.get(originKey) !== pending) continue;
      this.#unpend(originKey, pending);
      if (!isEmpty(pending)) {
        this.#pending.set(originKey, pending);
        this.#pendBy(originKey, pending.group);
      }
    }
    if (slice.owed) slice.owed.records -= slice.written.length;
    // A slice that wrote nothing (the timer's usual tick) asks for nothing.
    if (slice.runs.length > 0 || slice.prunedAt !== undefined) this.#uncheckpointed = true;
    if (
      this.#uncheckpointed &&
      slice.owed?.by !== 'flush' &&
      (!slice.more || ++this.#slicesSinceCheckpoint >= SLICES_PER_CHECKPOINT)
    ) {
      this.#requestCheckpoint();
    }
  }

  /**
   * A slice whose commit failed (a full disk, a file locked by another process; rolled back): what it changed in
   * memory as it was prepared is set back, so nothing is lost and nothing counted twice. The row counts are those of
   * before (a row count left raised by a failed insert made a later flush evict rows that were not over the cap, down
   * to none, and then loop for good), and each record written gets back what it held, merged before what was
   * recorded since (#mergeEarlier), at its place: pending as if the slice never ran. A record dropped at the pending
   * bound meanwhile stays dropped, its learned lifetime set back to the file's (the drop's was the slice's, never
   * committed), unless the origin was recorded anew with a lifetime learned since: that one is kept.
   */
  #undo(slice: PreparedSlice): void {
    this.#rowCount = slice.rowCount;
    this.#held = slice.held;
    for (const [originKey, pending, before] of slice.written) {
      const current = this.#pending.get(originKey);
      if (current === pending) this.#mergeEarlier(pending, before);
      else if (current?.idleLifetimeChanged) {
        // Dropped and recorded anew, with a lifetime learned since: that one stands; what the file holds is still
        // what it held before the slice.
        if (before.idleLifetimeChanged) current.learnedBefore = before.learnedBefore;
      } else if (before.idleLifetimeChanged) {
        // (Also when the dropped record had learned one since: its drop set back to the slice's, never committed.)
        if (before.learnedBefore === undefined) this.#learned.delete(originKey);
        else this.#learned.set(originKey, before.learnedBefore);
      }
    }
  }

  /** Puts what `earlier` held (a record's, before a slice that failed) back into `record`, before what it has since. */
  #mergeEarlier(record: Pending, earlier: Pending): void {
    record.firstSeen = Math.min(record.firstSeen, earlier.firstSeen);
    record.lastSeen = Math.max(record.lastSeen, earlier.lastSeen);
    record.acquires += earlier.acquires;
    record.hits += earlier.hits;
    record.misses += earlier.misses;
    record.connectFailures += earlier.connectFailures;
    if (earlier.connects > 0) {
      if (record.connects === 0) {
        record.connectFresh = earlier.connectFresh;
        record.connectDecay = earlier.connectDecay;
        record.connectSum = earlier.connectSum;
      } else {
        // The EWMA folded over the earlier samples, then over the later ones (see Pending.connects).
        record.connectFresh = earlier.connectFresh * record.connectDecay + record.connectSum;
        record.connectSum = earlier.connectSum * record.connectDecay + record.connectSum;
        record.connectDecay *= earlier.connectDecay;
      }
      record.connects += earlier.connects;
    }
    if (earlier.idleLifetimeChanged) {
      record.idleLifetimeChanged = true;
      record.learnedBefore = earlier.learnedBefore;
    }
    const minutes: number[] = [];
    const acquires: number[] = [];
    let i = 0;
    let j = 0;
    while (i < earlier.minutes.length || j < record.minutes.length) {
      const a = earlier.minutes[i];
      const b = record.minutes[j];
      if (b === undefined || (a !== undefined && a < b)) {
        minutes.push(a as number);
        acquires.push(earlier.minuteAcquires[i++] ?? 0);
      } else if (a === b) {
        minutes.push(a);
        acquires.push((earlier.minuteAcquires[i++] ?? 0) + (record.minuteAcquires[j++] ?? 0));
      } else {
        minutes.push(b);
        acquires.push(record.minuteAcquires[j++] ?? 0);
      }
    }
    record.minutes = minutes;
    record.minuteAcquires = acquires;
    while (record.minutes.length > this.#minutesPerOrigin) this.#mergeOldest(record);
  }

  #requestCheckpoint(): void {
    if (!this.#checkpointer || this.#closed) return;
    if (this.#checkpointPending) {
      // Asked while one runs: once more after it, so the last commits are copied too.
      this.#checkpointAgain = true;
      return;
    }
    this.#checkpointPending = true;
    this.#checkpointAgain = false;
    this.#uncheckpointed = false;
    this.#slicesSinceCheckpoint = 0;
    this.#checkpointer.postMessage(0);
  }

  /** Starts the checkpointer thread; from now on commits leave the WAL to it. */
  #startCheckpointer(): void {
    if (this.#checkpointer || this.#closed || this.#inMemory) return;
    let worker: Worker;
    try {
      worker = this.#startThread('sockpoold state checkpointer', true);
    } catch {
      // No thread can be created (a pids limit, TasksMax=: ERR_WORKER_INIT_FAILED): the commits checkpoint as SQLite
      // does without it (wal_autocheckpoint stays on), on the event loop. It threw out of startAutoFlush, and the
      // daemon's start with it.
      return;
    }
    let ready: () => void = () => {};
    this.#checkpointerReady = new Promise((resolve) => {
      ready = resolve;
    });
    worker.on('message', (message: CheckpointResult | { error: string } | { ready: true } | { slice: number }) => {
      if ('ready' in message) {
        ready();
        return;
      }
      if ('slice' in message) {
        this.#readResults();
        return;
      }
      this.#checkpointPending = false;
      if (!('error' in message)) {
        this.#checkpoints++;
        this.#lastCheckpoint = message;
      } // else a locked or full disk: the next request tries again.
      if (this.#checkpointAgain) this.#requestCheckpoint();
    });
    const flags = this.#threadFlags as Int32Array;
    const name = this.#threadName;
    // A thread that cannot run (or dies) hands checkpoints back to the commits, as without it. One that ends without an
    // error event (an exit of its own: none of its code does, but its modules or Node may) is stopped as one that died:
    // else it stayed the writer, and every slice handed to it waited for good (the timer's run, flush(), topOrigins).
    // One that had its file open is started again (#checkpointerDied): its error event comes before its exit.
    const ended = (err: string) => {
      const wasWriter = this.#checkpointer === worker;
      if (wasWriter) this.#stopCheckpointer();
      this.#abandonInFlight(worker);
      if (wasWriter && Atomics.load(flags, THREAD_OPEN) === 1) this.#checkpointerDied(name, err);
    };
    worker.on('error', (error) => ended(String(error?.message ?? error)));
    worker.on('exit', (code) => {
      ready();
      ended(`exited with code ${code}`);
    });
    this.#db.pragma('wal_autocheckpoint = 0');
    this.#checkpointer = worker;
  }

  /**
   * The checkpointer (its file open) died while the auto flush runs: a new one is started, at once or, within
   * THREAD_RESTART_INTERVAL_MS of the last start after a death, once that is over (the event loop commits meanwhile);
   * onThreadEnded is told which. Without it the event loop committed every slice for the rest of the run, the commits
   * (and their syncs) the thread is there to take off it. One that failed before its open is not started again: it
   * would fail the same way (#threadsFail).
   */
  #checkpointerDied(thread: string, err: string): void {
    if (this.#closed || !this.#timer) return;
    const now = performance.now();
    const restartInMs =
      this.#restartedAt === undefined
        ? 0
        : Math.max(0, Math.ceil(this.#restartedAt + THREAD_RESTART_INTERVAL_MS - now));
    if (restartInMs === 0) this.#restartCheckpointer();
    else if (!this.#restartTimer) {
      this.#restartTimer = setTimeout(() => {
        this.#restartTimer = undefined;
        this.#restartCheckpointer();
      }, restartInMs);
      this.#restartTimer.unref();
    }
    this.#onThreadEnded?.({ path: this.path, thread, err, restartInMs });
  }

  #restartCheckpointer(): void {
    if (this.#closed || !this.#timer || this.#checkpointer) return;
    this.#restartedAt = performance.now();
    this.#startCheckpointer();
  }

  /** Starts a store thread (STORE_THREAD_SOURCE) with its shared flags; unref'd: it never keeps the process alive. */
  #startThread(name: string, checkpointer: boolean): Worker {
    const flags = new SharedArrayBuffer(THREAD_FLAGS * Int32Array.BYTES_PER_ELEMENT);
    const errors = new MessageChannel();
    // (A slice in flight on the thread before keeps its port until its answer is read: #settle closes it.)
    if (this.#inFlight?.results !== this.#threadErrors) this.#threadErrors?.close();
    this.#threadErrors = errors.port1;
    let worker: Worker;
    try {
      worker = new Worker(STORE_THREAD_SOURCE, {
        transferList: [errors.port2],
        eval: true,
        name,
        workerData: {
          path: this.path,
          betterSqlite3: createRequire(import.meta.url).resolve('better-sqlite3'),
          flags,
          checkpointer,
          walSizeLimit: WAL_SIZE_LIMIT,
          errors: errors.port2,
          // The statements slices name (`runs`), given once: a slice carries only names and parameters.
          sql: this.#writeSql,
        },
      });
    } catch (error) {
      // (No thread: its error port goes with it. The callers go on without a thread.)
      errors.port1.close();
      errors.port2.close();
      this.#threadErrors = undefined;
      throw error;
    }
    worker.unref();
    const shared = new Int32Array(flags);
    // One that cannot open the file ends with an error, its flags saying so (THREAD_OPEN -1), and the close acts on
    // them. One that ends with an error before its open (Node could not start it: its code never ran) said nothing
    // there: said here, for a close to come, and no other thread is started (#threadsFail).
    worker.on('error', () => {
      if (Atomics.load(shared, THREAD_OPEN) === 1) return;
      this.#threadsFail = true;
      Atomics.store(shared, THREAD_OPEN, -1);
      Atomics.notify(shared, THREAD_OPEN);
      Atomics.notify(shared, THREAD_SLICES);
    });
    this.#threadFlags = shared;
    this.#handed = 0;
    this.#threadName = name;
    this.#threadEnded = new Promise((resolve) => worker.once('exit', () => resolve()));
    return worker;
  }

  /**
   * The store thread committing the slice in flight ended (an error, an exit): what it said is read; a slice it never
   * answered for is applied if its flags say it committed it (it ended between its commit and its answer: undone, it
   * was written again, counted twice), else undone (#undo), its origins pending again.
   */
  #abandonInFlight(worker: Worker): void {
    if (this.#inFlight?.worker !== worker) return;
    this.#readResults();
    const inFlight = this.#inFlight;
    if (inFlight?.worker !== worker) return;
    this.#settleAbandoned(inFlight);
  }

  /** Settles a slice whose thread ended without answering: committed if its flags say so, else undone. */
  #settleAbandoned(inFlight: InFlight): void {
    const committed = Atomics.load(inFlight.flags, THREAD_COMMITTED_SLICE) === inFlight.id;
    this.#settle(inFlight, committed ? undefined : { message: 'the store thread ended' });
  }

  #stopCheckpointer(): void {
    const worker = this.#checkpointer;
    if (!worker) return;
    this.#checkpointer = undefined;
    this.#checkpointPending = false;
    // Its connection closes with the thread; a checkpoint it was running completes or is rolled back by SQLite. A
    // slice it is committing is let finish first (#settle ends it), else whether it was committed is not known.
    if (this.#inFlight?.worker === worker) this.#inFlight.terminateAfter = true;
    else void worker.terminate();
    if (!this.#closed) this.#db.pragma(`wal_autocheckpoint = ${AUTOCHECKPOINT_PAGES}`);
  }

  /**
   * Resolves once the checkpointer thread has its connection open (or has failed: then the commits checkpoint), so
   * that a daemon reports ready with every fd it keeps already open.
   */
  checkpointerReady(): Promise<void> {
    return this.#checkpointerReady;
  }

  /** Checkpoints the checkpointer thread completed, and its last answer (for tests and the bench). */
  get checkpoints(): { count: number; last: CheckpointResult | undefined } {
    return { count: this.#checkpoints, last: this.#lastCheckpoint };
  }

  /**
   * Evicts up to DELETE_BATCH origins over the cap (fewer if the slice has room for fewer: `room` statements); true when it evicted any. Origins without demand go first (no
   * acquire ever: a uid's prewarms within its allowance must not push out the history of origins clients used),
   * then the least recently seen of the holder with the most rows (heaviestHolder, the rule of the connector's
   * tables): one uid's acquires to ever more origins push out its own, and each holder keeps at least an equal share.
   * Taken from that holder at once: as many as it leads the next by (at least one), so the rule holds batch by batch.
   */
  #evictSome(slice: PreparedSlice, cursor: EvictionCursor, room: number): boolean {
    // Two statements a row (its row, its demand): no more than the slice has room for.
    const excess = Math.min(DELETE_BATCH, this.#rowCount - this.#maxOrigins, Math.floor(room / 2));
    if (excess <= 0) return false;
    const timing = this.#timing;
    const pickStarted = timing ? performance.now() : 0;
    let victims = this.#statements.unused.all(excess, cursor.unused);
    cursor.unused += victims.length;
    if (victims.length === 0) {
      const heaviest = heaviestHolder(this.#held);
      if (heaviest) {
        const uid = heaviest.holder;
        const count = Math.min(excess, Math.max(1, heaviest.lead));
        // After the rows of that holder this slice picked already: its rows without demand (all picked by now, the
        // first pick above found none left) come first in this order.
        victims = this.#statements.oldestOf
          .all(uid, count, cursor.of.get(uid) ?? 0)
          .map((origin_key) => ({ origin_key, uid }));
      }
    }
    const deleteStarted = timing ? performance.now() : 0;
    if (timing) timing.evictPickMs += deleteStarted - pickStarted;
    for (const { origin_key: originKey, uid } of victims) {
      slice.runs.push(['forget', [originKey]], ['forgetDemand', [originKey]]);
      slice.forgotten.push(originKey);
      cursor.of.set(uid, (cursor.of.get(uid) ?? 0) + 1);
      this.#unhold(uid);
    }
    // No rows where the counts say there are: they are wrong, never loop on them (take the table's, as it is when
    // this slice picked nothing yet).
    if (victims.length === 0 && slice.runs.length === 0) this.#recount();
    if (timing) timing.evictDeleteMs += performance.now() - deleteStarted;
    return victims.length > 0;
  }

  /**
   * Where the eviction of the rows over the cap (#evictSome, batch after batch until the cap holds) will stop, per
   * holder it takes rows with demand from: the last of them, as [holder, last_seen, origin_key] in its eviction order
   * (the ranking leaves out that row and those before it: topOrigins). Worked out on the row counts as #evictSome
   * takes them: the rows without demand first (none ranks: demand comes with acquires), then batch by batch the
   * oldest of the heaviest holder (heaviestHolder, in #held's order for ties), so the same rows as long as nothing is
   * written meanwhile. What the timer writes before the eviction ends (an origin seen again, new rows) may change
   * which rows go, as it may whenever rows stand over the cap.
   */
  #evictionCuts(): Array<[Holder, number, string]> {
    let excess = this.#rowCount - this.#maxOrigins;
    if (excess <= 0) return [];
    const held = new Map(this.#held);
    for (const { uid, rows } of this.#statements.unusedHeld.all()) {
      excess -= rows;
      const left = (held.get(uid) ?? 0) - rows;
      if (left > 0) held.set(uid, left);
      else held.delete(uid);
    }
    const taken = new Map<Holder, number>();
    while (excess > 0) {
      const heaviest = heaviestHolder(held);
      if (!heaviest) break;
      const count = Math.min(excess, DELETE_BATCH, Math.max(1, heaviest.lead));
      const left = (held.get(heaviest.holder) ?? 0) - count;
      if (left > 0) held.set(heaviest.holder, left);
      else held.delete(heaviest.holder);
      taken.set(heaviest.holder, (taken.get(heaviest.holder) ?? 0) + count);
      excess -= count;
    }
    const cuts: Array<[Holder, number, string]> = [];
    for (const [uid, count] of taken) {
      const last = this.#statements.nthOldestUsedOf.get(uid, count - 1);
      if (last) cuts.push([uid, last.last_seen, last.origin_key]);
    }
    return cuts;
  }

  /** Counts the rows, per holder, from the table (at open, and should the counts kept in memory be wrong). */
  #recount(): void {
    this.#held = new Map();
    this.#rowCount = 0;
    for (const { uid, rows } of this.#statements.held.all()) {
      this.#held.set(uid, rows);
      this.#rowCount += rows;
    }
  }

  #hold(uid: Holder): void {
    this.#held.set(uid, (this.#held.get(uid) ?? 0) + 1);
    this.#rowCount++;
  }

  #unhold(uid: Holder): void {
    const rows = (this.#held.get(uid) ?? 0) - 1;
    if (rows > 0) this.#held.set(uid, rows);
    else this.#held.delete(uid);
    this.#rowCount--;
  }

  /** Prepares one pending origin's writes into `out` (its row, read here, updated; its demand minutes). */
  #write(originKey: string, pending: Pending, now: number, out: ThreadSlice): void {
    const timing = this.#timing;
    const readStarted = timing ? performance.now() : 0;
    const old = this.#statements.select.get(originKey);
    const writeStarted = timing ? performance.now() : 0;
    if (timing) timing.readMs += writeStarted - readStarted;
    // Only origins that connected are remembered: failures and refusals of an origin never reached leave no row.
    if (!old && pending.acquires === 0 && pending.connects === 0 && !pending.idleLifetimeChanged) return;
    // A row keeps its holder: another uid's acquire renews it (last_seen) but takes nothing over, else a uid knowing
    // another's origins could make them its own and push them out as its oldest. A row no acquire of a known uid
    // brought in (a prewarm's, an older version's) is taken by the first that comes.
    const oldHolder: Holder = old?.uid ?? null;
    const holder: Holder = oldHolder ?? pending.uid ?? null;
    if (!old) this.#hold(holder);
    else if (holder !== oldHolder) {
      this.#unhold(oldHolder);
      this.#hold(holder);
    }
    let connectMsAvg = old?.connect_ms_avg ?? null;
    if (pending.connects > 0) {
      connectMsAvg =
        connectMsAvg === null ? pending.connectFresh : connectMsAvg * pending.connectDecay + pending.connectSum;
    }
    let demandRate = old?.demand_rate_per_s ?? 0;
    let demandUpdatedAt = old?.demand_updated_at ?? 0;
    if (pending.acquires > 0) {
      // Exponentially decaying rate: each acquire adds 1/window and the sum decays with time constant `window`;
      // for a steady rate r it converges to r. The acquires since the last flush count as happening now.
      const elapsed = Math.max(0, now - demandUpdatedAt);
      demandRate =
        demandRate * Math.exp(-elapsed / this.#rateWindowMs) + (pending.acquires * 1000) / this.#rateWindowMs;
      demandUpdatedAt = now;
    }
    let host = originKey;
    let port = 0;
    if (old && old.port > 0) {
      host = old.host;
      port = old.port;
    } else {
      try {
        // A warm TLS pool's key or a proxied origin's (its proxy is read from the key again when warmed).
        ({ host, port } = originOfKey(originKey));
      } catch {
        // Not host:port (a key format of a later version?): kept, but never warmed from history.
      }
    }
    const row: OriginRow = {
      origin_key: originKey,
      host,
      port,
      first_seen: old?.first_seen ?? pending.firstSeen,
      last_seen: Math.max(old?.last_seen ?? 0, pending.lastSeen),
      acquires: (old?.acquires ?? 0) + pending.acquires,
      hits: (old?.hits ?? 0) + pending.hits,
      misses: (old?.misses ?? 0) + pending.misses,
      connect_failures: (old?.connect_failures ?? 0) + pending.connectFailures,
      connect_ms_avg: connectMsAvg,
      learned_idle_lifetime_ms: this.#learned.get(originKey) ?? old?.learned_idle_lifetime_ms ?? null,
      demand_rate_per_s: demandRate,
      demand_updated_at: demandUpdatedAt,
      uid: holder,
    };
    out.runs.push(['upsert', row as unknown as Record<string, unknown>]);
    // A merged entry's minute is kept unrounded in memory (#mergeOldest) and rounded once, here; two that round to the
    // same minute add up (the statement's upsert).
    pending.minutes.forEach((minute, index) => {
      const demand: [string, number, number] = [originKey, Math.round(minute), pending.minuteAcquires[index] ?? 0];
      out.runs.push(['addDemand', demand]);
    });
    if (timing) timing.writeMs += performance.now() - writeStarted;
  }

  /**
   * Picks up to `limit` rows (DELETE_BATCH, or what the slice has room for) to prune after the `offset` this slice picked already, of one kind, and puts their
   * writes into `slice`; returns how many. The kinds, each in its own slices (#preparePrune): demand history older than
   * `demandHistoryDays`, then what a clock ahead stamped (below), then origins unseen for `originRetentionDays` with no
   * demand left.
   *
   * What a clock that ran ahead stamped in what is now the future goes too: its demand (an acquire a year ahead
   * weighed 2^1460 in the ranking, first at every start for that year) and its `last_seen`, pulled back to now (it
   * was the most recently seen for that year: evicted and pruned last, after real origins).
   */
  #pruneSome(
    slice: PreparedSlice,
    now: number,
    kind: 'demand' | 'future' | 'origins',
    offset: number,
    limit: number,
  ): number {
    if (kind === 'demand') {
      const nowMinute = Math.floor(now / MINUTE_MS);
      const rows = this.#statements.prunableDemand.all(nowMinute - this.#historyMinutes, nowMinute, limit, offset);
      for (const { origin_key: originKey, minute } of rows) slice.runs.push(['forgetMinute', [originKey, minute]]);
      return rows.length;
    }
    if (kind === 'future') {
      const keys = this.#statements.future.all(now, limit, offset);
      for (const originKey of keys) slice.runs.push(['unstamp', { now, originKey }]);
      return keys.length;
    }
    const origins = this.#statements.prunable.all(now - this.#originRetentionMs, limit, offset);
    for (const { origin_key: originKey, uid } of origins) {
      slice.runs.push(['forget', [originKey]]);
      this.#unhold(uid);
      // Its learned lifetime goes with it, as an eviction's (once committed): else kept in memory for good.
      slice.forgotten.push(originKey);
    }
    return origins.length;
  }

  /**
   * Flushes every `ms` from an unref'd timer (it never keeps the process alive), in slices (#prepare), and leaves the
   * slices' commits and the WAL's checkpoints to the checkpointer thread while it runs (#sliceAsync).
   */
  startAutoFlush(ms: number): void {
    this.stopAutoFlush();
    this.#startCheckpointer();
    this.#startTimer(ms);
  }

  /**
   * A reload: a new cap on the history (origins over it are evicted by the next flush, as #evictSome orders them)
   * and, when the timer runs, a new flush interval.
   */
  configure(options: { maxOrigins?: number; flushMs?: number }): void {
    if (options.maxOrigins !== undefined) {
      this.#maxOrigins = maxOriginsOf(options.maxOrigins);
      // A higher cap lowers each record's share of the pending minutes: the records over it are merged down now.
      this.#minutesPerOrigin = minutesPerOriginOf(this.#maxOrigins);
      for (const pending of this.#pending.values()) {
        while (pending.minutes.length > this.#minutesPerOrigin) this.#mergeOldest(pending);
      }
    }
    if (options.flushMs !== undefined && this.#timer && options.flushMs !== this.#flushMs) {
      this.#startTimer(options.flushMs);
    }
  }

  #startTimer(ms: number): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#flushMs = ms;
    this.#timer = setInterval(() => this.#runSlices(false), ms);
    this.#timer.unref();
  }

  /**
   * Runs slices (#sliceAsync), the next prepared on the turn after the last one is committed, while there is more to
   * do: a tick of the timer's
   * (stopAutoFlush ends it), or with `untilDone` until nothing is left, timer or not (the eviction a ranking left:
   * topOrigins). One run at a time: a run under way takes `untilDone` over. A failure ends the run, said once a run
   * of failures (onFlushFailing); the timer's next tick tries again.
   */
  #runSlices(untilDone: boolean): void {
    if (untilDone) this.#slicingUntilDone = true;
    if (this.#slicing) return;
    this.#slicing = true;
    const slice = async () => {
      let more = false;
      try {
        more = await this.#sliceAsync(SLICE_BUDGET_MS);
        this.#noteOverCapEvicted();
        if (this.#failures > 0) {
          const failures = this.#failures;
          this.#failures = 0;
          this.#onFlushRecovered?.({ path: this.path, failures });
        }
      } catch (error) {
        // A full disk or a locked file: the statistics stay pending and the next tick tries again; said once a run.
        if (this.#failures++ === 0) {
          const code = (error as { code?: unknown }).code;
          this.#onFlushFailing?.({
            path: this.path,
            sqliteCode: typeof code === 'string' ? code : undefined,
            err: (error as Error).message,
            pending: this.#pending.size,
          });
        }
      }
      if (more && !this.#closed && (this.#timer || this.#slicingUntilDone)) setImmediate(() => void slice());
      else {
        this.#slicing = false;
        this.#slicingUntilDone = false;
      }
    };
    void slice();
  }

  /** Tells onOverCapEvicted, once the rows a ranking left over the cap are evicted (by whichever slices). */
  #noteOverCapEvicted(): void {
    if (this.#overCapAtRanking === undefined || this.#rowCount > this.#maxOrigins) return;
    const overCap = this.#overCapAtRanking;
    this.#overCapAtRanking = undefined;
    this.#onOverCapEvicted?.({ path: this.path, overCap });
  }

  /** Rows in the origins table (history), for tests and the bench. */
  get originCount(): number {
    return this.#rowCount;
  }

  stopAutoFlush(): void {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    clearTimeout(this.#restartTimer);
    this.#restartTimer = undefined;
    this.#stopCheckpointer();
  }

  /**
   * The origins most likely needed, best first: ranked by recent demand (each acquire in the demand history
   * weighs 1, halved every `scoreHalfLifeMs` of age). Writes first what is pending, so it includes what was just
   * recorded; a write that fails (the file locked by another process, a full disk) leaves that to the timer, and what
   * is stored is ranked: the history only warms, and warm-on-start must not fail the start.
   *
   * That writing is in slices, as the timer's, yielding the event loop between them (the daemon serves from before
   * its warm-on-start). It writes what was pending when called and no more (the first recorded), so records made
   * while it waits (a flood of new origins) cannot keep it from ranking; the timer writes those.
   *
   * Rows over the cap are not waited for: a start can find up to maxOrigins of them (a stop writes what is pending
   * without evicting: close(); a lower cap in the configuration), whose eviction, sliced, took warm-on-start and READY
   * past a second (proportional to the rows over: a cap lowered by a million rows, past the unit's start timeout).
   * The ranking leaves out the rows that eviction takes (#evictionCuts: its order worked out on the row counts), and
   * the eviction runs after it in the timer's slices, timer or not (#runSlices; onOverCapEvicted is told when it is
   * done). Pruning is left to the timer too (the first flush after a start prunes, #lastPrune being 0): nothing the
   * ranking counts is pruned. Ranks nothing once the store is closed.
   */
  async topOrigins(limit: number): Promise<TopOrigin[]> {
    if (limit <= 0) return [];
    const owed: Owed = { records: this.#pending.size, by: 'ranking' };
    try {
      while (owed.records > 0 && (await this.#sliceAsync(SLICE_BUDGET_MS, owed))) {
        await new Promise((resolve) => setImmediate(resolve));
      }
    } catch {}
    // A slice in flight (the timer's, a flush()'s): the ranking reads the rows and the counts once it is committed, in
    // the turn of the look that found none in flight. Through idle(), another waiter for the same slice (a flush())
    // handed its next one in between, whose counts, lowered as it was prepared, left its evictions out of the cuts.
    for (let inFlight = this.#inFlight; inFlight; inFlight = this.#inFlight) await inFlight.settled;
    if (this.#closed) return [];
    const now = this.#now();
    const nowMinute = Math.floor(now / MINUTE_MS);
    const rows = this.#statements.top.all({
      nowMinute,
      sinceMinute: nowMinute - this.#historyMinutes,
      halfLifeMinutes: this.#scoreHalfLifeMinutes,
      limit: Math.floor(limit),
      cuts: JSON.stringify(this.#evictionCuts()),
    });
    if (this.#rowCount > this.#maxOrigins) {
      this.#overCapAtRanking ??= this.#rowCount - this.#maxOrigins;
      // From the next turn: the ranking is returned first.
      setImmediate(() => this.#runSlices(true));
    }
    return rows.map((row) => ({
      originKey: row.origin_key,
      host: row.host,
      port: row.port,
      score: row.score,
      learnedIdleLifetimeMs: row.learned_idle_lifetime_ms,
      demandRatePerS:
        row.demand_rate_per_s *
        2 ** (-Math.max(0, now - row.demand_updated_at) / MINUTE_MS / this.#scoreHalfLifeMinutes),
      connectMsAvg: row.connect_ms_avg,
      lastSeen: row.last_seen,
    }));
  }

  /** The stored row of one origin (flushed data only), or undefined. */
  origin(originKey: string): OriginRecord | undefined {
    const row = this.#statements.select.get(originKey);
    if (!row) return undefined;
    return {
      originKey: row.origin_key,
      host: row.host,
      port: row.port,
      firstSeen: row.first_seen,
      lastSeen: row.last_seen,
      acquires: row.acquires,
      hits: row.hits,
      misses: row.misses,
      connectFailures: row.connect_failures,
      connectMsAvg: row.connect_ms_avg,
      learnedIdleLifetimeMs: row.learned_idle_lifetime_ms,
      demandRatePerS: row.demand_rate_per_s,
      demandUpdatedAt: row.demand_updated_at,
    };
  }

  /**
   * Stops the timer, writes what is pending and closes the database, for at most `budgetMs` (the daemon's stop has
   * that long), whatever the disk does. Idempotent. The writing is a timed flush's pending origins, in the order they
   * were first recorded since the last flush, in committed slices of CLOSE_SLICE_MS; evictions and pruning are left
   * to the next start (the row counts are taken from the table at open): its ranking evicts, in slices (topOrigins),
   * and its timer's first flush prunes. Returns the pending origins not
   * seen committed when it returned, counters, connect times, demand minutes and all (a lifetime learned from one stays
   * in the file only if written before): those it had no time to prepare are dropped, those handed to the store thread
   * may still be committed by it if the process lives on.
   *
   * Nothing here waits for a sync of the disk on the event loop: a commit that starts the WAL over syncs its header,
   * and the last connection to close checkpoints the whole WAL with two syncs more, each as slow as the disk is (a
   * stalled disk took the stop into systemd's SIGKILL). So the event loop only reads (the rows the slices update) and
   * hands the slices to the store thread, which commits them on its own connection and closes it last; the event
   * loop's connection closes once that one is open, never as the last (it then checkpoints nothing). Skipping the
   * checkpoint alone would not do (better-sqlite3 has no SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, and the header's sync is
   * needed: SQLite warns that without it a restarted WAL can corrupt the file at a power loss, so synchronous=OFF is
   * not an option either). The close waits for the thread until the budget is spent, then returns without it
   * (threadLeft names it; the state directory stays locked until it ends): abandoning it is a crash to SQLite, which
   * its WAL recovers at the next open; the process must then end without joining the thread (daemon/command.ts:
   * _exit), since process.exit() would wait for its sync. A thread that cannot open the file, cannot be created (a
   * pids limit) or fails before its open (its code, a module it loads: said in its flags), leaves the commits to the
   * event loop's connection, as before the thread, and so does a close after a store thread ended with an error before
   * its open (#threadsFail: the checkpointer's, seen as an event while the event loop ran), and a close whose writer
   * has ended, as its flags say (THREAD_ENDED: a checkpointer that died in the same turn, its exit event not seen yet,
   * or a writer that dies during the close): what it was handed and never did is committed here. A writer Node cannot start
   * in close() itself says so only as an event, which close() does not see while it waits: that one still holds it for
   * the budget.
   */
  close(budgetMs = CLOSE_BUDGET_MS): number {
    if (this.#closed) return 0;
    if (this.#inMemory) return this.#closeInMemory(budgetMs);
    const deadline = performance.now() + budgetMs;
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    clearTimeout(this.#restartTimer);
    this.#restartTimer = undefined;
    // Closed first: a slice settled below asks the thread for no checkpoint (#requestCheckpoint), whose syncs would come
    // before close()'s slices; the close of the thread's connection checkpoints.
    this.#closed = true;
    // A flush's slice the store thread is committing: its answer first (the rows the preparing reads must be those it
    // wrote; failed, its origins are pending again), waited for while the preparing may. A thread still in it then (a
    // stalled disk) would take what is prepared behind it no sooner: nothing is.
    const stalled = this.#settleInFlight(deadline - budgetMs / 4);
    const pending = this.#pending.size;
    // The checkpointer, when it runs, is the writer: its connection is open already.
    let thread = this.#checkpointer;
    let flags = this.#threadFlags as Int32Array;
    if (!thread) {
      try {
        // A thread that failed to start before (the checkpointer's error event: #threadsFail) would fail again: this
        // close waited for the new one's connection until its budget was spent, since close() cannot see an error
        // event while it waits (Atomics.wait) and a thread Node could not start says nothing in the flags.
        if (this.#threadsFail) throw new Error('a store thread failed to start before');
        thread = this.#startThread('sockpoold state writer', false);
        flags = this.#threadFlags as Int32Array;
      } catch {
        // No thread can be created (a pids limit, TasksMax=: ERR_WORKER_INIT_FAILED), or none starts: as one that
        // cannot open the file, the slices are committed here and ours closes as the last. It threw out of close()
        // with the store marked closed, its connection open, the directory locked and every pending origin dropped.
        flags = new Int32Array(THREAD_FLAGS);
        flags[THREAD_OPEN] = -1;
      }
    }
    this.#checkpointer = undefined;
    /** Waits on one of the flags until `done` says so, the thread failed to open, or `until`; returns the flag. */
    const waitUntil = (index: number, done: (value: number) => boolean, until = deadline): number => {
      for (;;) {
        const value = Atomics.load(flags, index);
        const left = until - performance.now();
        if (done(value) || threadGone(flags) || left <= 0) return value;
        Atomics.wait(flags, index, value, left);
      }
    };
    const waitFor = (index: number): number => waitUntil(index, (value) => value !== 0);
    // The thread commits a slice while the next is prepared, so it finishes about one slice after the preparing: the
    // preparing ends with a quarter of the budget left for that and the file's closing, and waits whenever the thread
    // falls behind by a slice (a slow disk: what the thread has no time for is not prepared). Else the thread trails
    // a preparing that takes the whole budget, and on any disk a close with much pending returns without it (the
    // daemon's stop unclean, what the thread had not committed lost with the process).
    const prepareUntil = deadline - budgetMs / 4;
    const sliceMs = Math.min(CLOSE_SLICE_MS, budgetMs / 8);
    // The thread's count of slices done includes the flushes' it committed before.
    let handed = Atomics.load(flags, THREAD_SLICES);
    let ourConnectionClosed = false;
    const closeOurs = () => {
      if (ourConnectionClosed) return;
      ourConnectionClosed = true;
      try {
        this.#db.close();
      } finally {
        thread?.postMessage({ close: true });
      }
    };
    // A read that fails (a page found corrupt) ends the preparing; the close goes on, and throws it at the end.
    let failure: unknown;
    // A thread that cannot open the file (THREAD_OPEN -1: the directory moved away, no fd left) commits nothing, nor
    // does one that has ended (THREAD_ENDED: the checkpointer died in this turn, its exit event unseen, or the writer
    // dies during the close): their slices are committed here instead, on the event loop's connection, as before the
    // thread. Those handed to a thread are kept with the THREAD_SLICES count at which it is done with them (`at`), so
    // that those it never did are committed here if it is gone.
    let committedHere = 0;
    const commitHere = (slice: ThreadSlice) => {
      if (failure || performance.now() >= deadline) return;
      try {
        this.#db.transaction(() => {
          this.#runHere(slice.runs);
        })();
        committedHere += slice.origins;
      } catch (error) {
        failure = error;
      }
    };
    const handedSlices: Array<{ slice: ThreadSlice; at: number }> = [];
    try {
      const now = this.#now();
      let slice: ThreadSlice = { runs: [], origins: 0 };
      let sliceStarted = performance.now();
      const send = () => {
        if (slice.origins > 0) {
          waitUntil(THREAD_SLICES, (done) => done >= handed, prepareUntil);
          if (threadGone(flags)) commitHere(slice);
          else {
            thread?.postMessage(slice);
            handedSlices.push({ slice, at: ++handed });
          }
        }
        slice = { runs: [], origins: 0 };
        sliceStarted = performance.now();
      };
      for (const [originKey, record] of this.#pending) {
        if (stalled || performance.now() >= prepareUntil) break;
        this.#write(originKey, record, now, slice);
        slice.origins++;
        if (performance.now() - sliceStarted >= sliceMs) send();
      }
      send();
    } catch (error) {
      failure ??= error;
    }
    this.#pending.clear();
    this.#pendingBy.clear();
    const open = waitFor(THREAD_OPEN);
    // Ours stays open until the thread is done with what it was handed: a thread that ends meanwhile leaves the rest
    // to it. (Not the last connection while the thread's is open: its close checkpoints nothing.)
    if (open === 1) waitUntil(THREAD_SLICES, (done) => done >= handed);
    const gone = threadGone(flags);
    if (gone) {
      const done = Atomics.load(flags, THREAD_SLICES);
      for (const { slice, at } of handedSlices) if (at > done) commitHere(slice);
    }
    const releaseLock = () => this.#lock?.release();
    try {
      if (open !== 0 || gone) closeOurs();
      else {
        // Not open yet (a thread started just now, on a loaded machine): ours closes once it is, if the process lives.
        thread?.once('message', closeOurs);
        thread?.once('exit', closeOurs);
      }
    } catch (error) {
      failure ??= error;
    }
    // A thread that could not open the file (THREAD_OPEN -1) or has ended: ours closed as the last, as before the thread.
    if (!gone && (open === 0 || (open === 1 && waitFor(THREAD_DONE) === 0 && !threadGone(flags)))) {
      this.#threadLeft = this.#threadName;
      // The directory stays locked while the thread may still write: a second daemon would start on it (its counts
      // read from a table this one's thread then changes). The daemon ends with _exit, and the lock goes when the
      // process does, so after its last thread; a process that lives on (an embedder) lets it go at the thread's end.
      thread?.once('exit', releaseLock);
    } else releaseLock();
    let sliceFailure: SliceFailure | undefined;
    for (let received = this.#threadErrors && receiveMessageOnPort(this.#threadErrors); received; ) {
      const { id, failed } = received.message as { id: number | undefined; failed?: SliceFailure };
      if (id === undefined) sliceFailure ??= failed;
      received = receiveMessageOnPort(this.#threadErrors as MessagePort);
    }
    this.#threadErrors?.close();
    // A slice that failed (a file locked by another process, a full disk), as a flush's failure: the daemon logs it.
    failure ??= sliceFailure && Object.assign(new Error(sliceFailure.message), { code: sliceFailure.code });
    if (failure) throw failure;
    return pending - Atomics.load(flags, THREAD_COMMITTED) - committedHere;
  }

  /**
   * Waits (blocking, until `until` at most) for the store thread to be done with the slice in flight, if any, and
   * settles it (#settle). True when it was not done by then: with `letGo` the slice is let go (close() prepares
   * nothing behind it), whoever waited for it told it is over (the store is closing); else it stays in flight.
   */
  #settleInFlight(until: number, letGo = true): boolean {
    const inFlight = this.#inFlight;
    if (!inFlight) return false;
    for (;;) {
      const done = Atomics.load(inFlight.flags, THREAD_SLICES);
      const left = until - performance.now();
      if (done >= inFlight.doneAt || threadGone(inFlight.flags) || left <= 0) break;
      Atomics.wait(inFlight.flags, THREAD_SLICES, done, left);
    }
    this.#readResults();
    if (this.#inFlight !== inFlight) return false;
    // A thread that could not open the file committed nothing: the slice's origins are pending again.
    if (Atomics.load(inFlight.flags, THREAD_OPEN) === -1) {
      this.#settle(inFlight, { message: 'the store thread could not open the file' });
      return false;
    }
    // One that ended without answering (its exit event not seen yet): as its exit event would (#abandonInFlight).
    if (Atomics.load(inFlight.flags, THREAD_ENDED) === 1) {
      this.#settleAbandoned(inFlight);
      return false;
    }
    if (!letGo) return true;
    this.#inFlight = undefined;
    inFlight.settle({});
    return true;
  }

  /** close() of a history in memory: nothing on a disk; its slices are committed here, as the file's once were. */
  #closeInMemory(budgetMs: number): number {
    this.stopAutoFlush();
    const deadline = performance.now() + budgetMs;
    try {
      while (this.flushSlice(Math.min(CLOSE_SLICE_MS, deadline - performance.now()))) {
        if (performance.now() >= deadline) break;
      }
      return this.#pending.size;
    } finally {
      this.#closed = true;
      try {
        this.#db.close();
      } finally {
        this.#lock?.release();
      }
    }
  }

  /**
   * The store thread close() stopped waiting for, by name (its sync held by the disk past the budget), or undefined.
   * The process must end without joining it: process.exit() would wait for the sync. The state directory's lock is
   * held until it has ended.
   */
  get threadLeft(): string | undefined {
    return this.#threadLeft;
  }

  /** Resolves once the store thread has ended (after close(): everything written that will be; for tests). */
  threadEnded(): Promise<void> {
    return this.#threadEnded;
  }
}
