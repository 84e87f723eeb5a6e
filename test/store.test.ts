import type { ChildProcess } from 'node:child_process';
import {
  chownSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { StateDirLock } from '../daemon/state-lock.js';
import { MIGRATIONS, migrate, SLICE_WRITES_MAX, StateStore, WAL_SIZE_LIMIT } from '../daemon/store.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { nextTurn, useFakeClock } from './fixtures/fake-clock.js';
import { fdCount } from './fixtures/native-helpers.js';
import { spawnChild } from './helpers/children.js';
import { eventually } from './helpers/daemon.js';

const repo = resolve(import.meta.dirname, '..');
const MINUTE = 60_000;
const HOUR = 60 * MINUTE;

/**
 * Transactions committed to a WAL file since its last reset: frames whose salt matches the header and whose
 * "database size after commit" field is set (https://www.sqlite.org/fileformat.html#the_write_ahead_log).
 */
function walCommits(databasePath: string): number {
  const wal = `${databasePath}-wal`;
  if (!existsSync(wal)) return 0;
  const bytes = readFileSync(wal);
  if (bytes.length < 32) return 0;
  const pageSize = bytes.readUInt32BE(8);
  const salt1 = bytes.readUInt32BE(16);
  const salt2 = bytes.readUInt32BE(20);
  let commits = 0;
  for (let offset = 32; offset + 24 + pageSize <= bytes.length; offset += 24 + pageSize) {
    if (bytes.readUInt32BE(offset + 8) !== salt1 || bytes.readUInt32BE(offset + 12) !== salt2) break;
    if (bytes.readUInt32BE(offset + 4) !== 0) commits++;
  }
  return commits;
}

// Databases and statements the tests open stay referenced until the test process ends (they are few).
const neverCollected: object[] = [];
function openDatabase(path: string, options?: Database.Options): Database.Database {
  const db = new Database(path, options);
  neverCollected.push(db);
  return db;
}
function statement(db: Database.Database, sql: string): Database.Statement {
  const prepared = db.prepare(sql);
  neverCollected.push(prepared);
  return prepared;
}
/** The first column of the first row. */
function value(db: Database.Database, sql: string, ...params: unknown[]): unknown {
  return statement(db, sql)
    .pluck()
    .get(...params);
}
/** The first column of every row. */
function column(db: Database.Database, sql: string, ...params: unknown[]): unknown[] {
  return statement(db, sql)
    .pluck()
    .all(...params);
}

/** A second, independent connection to the state file: what another process would see. */
function reader(stateDir: string): Database.Database {
  return openDatabase(join(stateDir, 'sockpool.sqlite'), { readonly: true });
}

let dir: string;
let clock: number;
const now = () => clock;
const open = (stateDir = dir) => StateStore.open(stateDir, { now });

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'sockpool-store-'));
  clock = Date.UTC(2025, 0, 15, 12, 0, 0);
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('StateStore.open', () => {
  it('creates the state directory with mode 0750, the database in WAL mode at the newest schema', () => {
    const stateDir = join(dir, 'a', 'state');
    const store = open(stateDir);
    expect(statSync(stateDir).mode & 0o777).toBe(0o750);
    expect(store.path).toBe(join(stateDir, 'sockpool.sqlite'));
    const db = reader(stateDir);
    expect(value(db, 'PRAGMA journal_mode')).toBe('wal');
    expect(value(db, 'PRAGMA user_version')).toBe(MIGRATIONS.length);
    const tables = column(db, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name");
    expect(tables).toEqual(['demand_history', 'origins']);
    db.close();
    store.close();
  });

  it('moves a corrupt file aside and starts with an empty history, saying where', async () => {
    // A torn or foreign file: SQLite says SQLITE_NOTADB at the first statement. The history only warms, so a
    // daemon that stopped on it would be restarted by systemd into the same failure, for ever.
    const path = join(dir, 'sockpool.sqlite');
    const garbage = Buffer.alloc(8192, 0x5a);
    writeFileSync(path, garbage);
    const told: Array<{ path: string; movedTo: string; err: string }> = [];
    const store = StateStore.open(dir, { now, onCorrupt: (info) => told.push(info) });
    expect(told).toEqual([
      { path, movedTo: expect.stringMatching(/\/sockpool\.sqlite\.corrupt-[\dTZ-]+$/), err: expect.any(String) },
    ]);
    const movedTo = told[0]!.movedTo;
    expect(readFileSync(movedTo)).toEqual(garbage);
    store.recordAcquire('fresh.example:443', { hit: false });
    await store.flush();
    expect(store.origin('fresh.example:443')?.acquires).toBe(1);
    store.close();
    const db = reader(dir);
    expect(value(db, 'PRAGMA user_version')).toBe(MIGRATIONS.length);
    db.close();
  });

  it('moves aside a file corrupt past the pages an open reads (a torn page in the middle): every flush failed on it, start after start', async () => {
    // The open reads the schema and counts rows by an index; a page of the table itself torn (a disk, a copy cut
    // short) was found only by the statements that touch it: the file stayed, warming failed and every flush failed
    // with SQLITE_CORRUPT, at every start, for good.
    const path = join(dir, 'sockpool.sqlite');
    const store = open();
    for (let index = 0; index < 2000; index++) {
      store.recordAcquire(`o${index}.example:443`, { hit: false }, 1000);
      store.recordConnect(`o${index}.example:443`, 5);
    }
    await store.flush();
    store.close();
    const torn = readFileSync(path);
    torn.fill(0x5a, 4096 * 3, 4096 * 4);
    writeFileSync(path, torn);
    const told: Array<{ path: string; movedTo: string; err: string }> = [];
    const reopened = StateStore.open(dir, { now, onCorrupt: (info) => told.push(info) });
    expect(told).toEqual([{ path, movedTo: expect.stringMatching(/\.corrupt-/), err: expect.any(String) }]);
    expect(readFileSync(told[0]!.movedTo)).toEqual(torn);
    reopened.recordAcquire('fresh.example:443', { hit: false });
    await reopened.flush();
    expect(reopened.origin('fresh.example:443')?.acquires).toBe(1);
    reopened.close();
  });

  it('with onUnavailable, runs on a history in memory when the file cannot be opened (its -wal unopenable, a full disk), saying why, the file untouched', async () => {
    // Found in review: a full disk or an unopenable -wal failed the start with SOCKPOOL_ERR_CONFIG (exit 2, which the
    // unit does not restart): the whole service down for a history that only warms.
    const path = join(dir, 'sockpool.sqlite');
    const first = open();
    first.recordAcquire('kept.example:443', { hit: false });
    await first.flush();
    first.close();
    const before = readFileSync(path);
    mkdirSync(`${path}-wal`);
    const told: unknown[] = [];
    const store = StateStore.open(dir, { now, onUnavailable: (info) => told.push(info) });
    expect(told).toEqual([{ path, sqliteCode: 'SQLITE_CANTOPEN', err: expect.stringContaining(path) }]);
    store.startAutoFlush(20);
    store.recordAcquire('fresh.example:443', { hit: false });
    await store.flush();
    expect(store.origin('fresh.example:443')?.acquires).toBe(1);
    expect(store.origin('kept.example:443')).toBeUndefined();
    expect(store.close()).toBe(0);
    expect(readFileSync(path)).toEqual(before);
    expect(readdirSync(dir).sort()).toEqual(['sockpool.sqlite', 'sockpool.sqlite-wal']);
  });

  it('with onUnavailable, still refuses a file from a newer sockpoold (a downgrade), as without it', () => {
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    db.exec(`PRAGMA user_version = ${MIGRATIONS.length + 1}`);
    db.close();
    const told: unknown[] = [];
    expect(() => StateStore.open(dir, { now, onUnavailable: (info) => told.push(info) })).toThrow(/newer/);
    expect(told).toEqual([]);
  });

  it('reports any other failure to open the file as SOCKPOOL_ERR_CONFIG naming it, and leaves the file alone', () => {
    // Another connection (as another process would) holds the file locked past the busy timeout.
    const path = join(dir, 'sockpool.sqlite');
    const holder = openDatabase(path);
    holder.exec('BEGIN EXCLUSIVE');
    let caught: unknown;
    try {
      open();
    } catch (error) {
      caught = error;
    }
    holder.exec('COMMIT');
    holder.close();
    expect(caught).toBeInstanceOf(SockpoolError);
    expect((caught as SockpoolError).code).toBe(ErrorCodes.CONFIG);
    expect((caught as SockpoolError).message).toContain(path);
    expect((caught as SockpoolError).fields).toMatchObject({ path, sqliteCode: 'SQLITE_BUSY' });
    expect(readdirSync(dir).filter((name) => name.includes('corrupt'))).toEqual([]);
  });
});

describe('the state directory lock (lockStateDir)', () => {
  const locked = (onUnavailable?: () => void) =>
    StateStore.open(dir, { now, lockStateDir: true, ...(onUnavailable ? { onUnavailable } : {}) });

  it('refuses a second store on the directory with SOCKPOOL_ERR_CONFIG naming it and the holder, onUnavailable or not, while a reader still reads the file; close lets it go', async () => {
    const first = locked();
    first.recordAcquire('kept.example:443', { hit: false });
    await first.flush();
    const told: unknown[] = [];
    let caught: unknown;
    try {
      locked(() => told.push('unavailable'));
    } catch (error) {
      caught = error;
    }
    // Refused, not run on a history in memory.
    expect(told).toEqual([]);
    expect(caught).toBeInstanceOf(SockpoolError);
    const lockFile = join(dir, 'sockpool.lock');
    expect((caught as SockpoolError).code).toBe(ErrorCodes.CONFIG);
    expect((caught as SockpoolError).message).toBe(
      `another sockpoold is using the state directory ${dir} (pid ${process.pid} holds ${lockFile})`,
    );
    expect((caught as SockpoolError).fields).toEqual({ key: 'stateDir', path: dir, lockFile, pid: process.pid });
    // The history file keeps its own locking: an operator's reader (sqlite3 shell, backup) reads it meanwhile.
    expect(column(reader(dir), 'SELECT origin_key FROM origins')).toEqual(['kept.example:443']);
    expect(first.close()).toBe(0);
    const second = locked();
    expect(second.origin('kept.example:443')?.acquires).toBe(1);
    second.close();
  });

  it('runs on a history in memory when the lock file cannot be opened, saying so with its path, and still locks out a second store on the directory when only the database is unavailable', () => {
    const lockFile = join(dir, 'sockpool.lock');
    mkdirSync(lockFile);
    const told: unknown[] = [];
    const store = locked(() => told.push('unavailable'));
    const noLock = StateStore.open(dir, { now, lockStateDir: true, onUnavailable: (info) => told.push(info) });
    expect(told).toEqual([
      'unavailable',
      { path: lockFile, sqliteCode: 'SQLITE_CANTOPEN', err: expect.stringContaining(lockFile) },
    ]);
    expect(existsSync(join(dir, 'sockpool.sqlite'))).toBe(false);
    store.close();
    noLock.close();
    rmSync(lockFile, { recursive: true });

    // The database unopenable (a directory in its place), the lock file fine: in memory, holding the lock.
    mkdirSync(join(dir, 'sockpool.sqlite'));
    const inMemory = locked(() => told.push('database unavailable'));
    expect(told.at(-1)).toBe('database unavailable');
    expect(() => locked(() => told.push('second'))).toThrow(/another sockpoold is using the state directory/);
    expect(told.at(-1)).toBe('database unavailable');
    inMemory.close();
    locked(() => told.push('after close')).close();
    expect(told.at(-1)).toBe('after close');
  });

  it('keeps the directory locked while the store thread still writes after close() returned without it, and lets it go when that thread ends', async () => {
    // Before: the lock went with the close, so a second daemon could start on the directory (its counts read from a
    // table the first one's thread was still writing) while the first one's thread wrote on.
    const first = locked();
    first.recordConnect('pending.example:443', 5);
    // No time at all: the close returns before its thread (started by it: no auto flush) has even opened the file.
    first.close(0);
    expect(first.threadLeft).toBe('sockpoold state writer');
    expect(() => locked()).toThrow(/another sockpoold is using the state directory/);
    await first.threadEnded();
    const second = locked();
    expect(second.close()).toBe(0);
    expect(second.threadLeft).toBeUndefined();
    await second.threadEnded();
  });
});

describe('batching', () => {
  it('writes nothing until flush, then everything in one transaction', async () => {
    const store = open();
    await store.flush(); // the first flush also prunes; start counting after it
    const database = store.path;
    const commitsBefore = walCommits(database);
    const walSizeBefore = statSync(`${database}-wal`).size;

    for (let origin = 0; origin < 300; origin++) {
      const key = `host${origin}.example:443`;
      for (let minute = 0; minute < 3; minute++) {
        clock += MINUTE;
        store.recordAcquire(key, { hit: minute > 0 });
      }
      store.recordConnect(key, 10 + origin);
      if (origin % 10 === 0) store.recordConnectFailure(key);
      if (origin % 7 === 0) store.recordIdleLifetime(key, 20_000);
    }
    expect(store.pendingOrigins).toBe(300);
    expect(walCommits(database)).toBe(commitsBefore);
    expect(statSync(`${database}-wal`).size).toBe(walSizeBefore);
    const db = reader(dir);
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(0);

    // Within one slice's budget (a clock of work that does not move: flush() writes in the timer's slices), one
    // transaction for all of it.
    const stillClock = vi.spyOn(performance, 'now').mockReturnValue(0);
    try {
      expect(await store.flush()).toBe(300);
    } finally {
      stillClock.mockRestore();
    }
    expect(walCommits(database) - commitsBefore).toBe(1);
    expect(store.pendingOrigins).toBe(0);
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(300);
    expect(value(db, 'SELECT sum(acquires) FROM demand_history')).toBe(900);
    expect(value(db, 'SELECT sum(connect_failures) FROM origins')).toBe(30);

    // Nothing pending: a flush writes nothing.
    expect(await store.flush()).toBe(0);
    expect(walCommits(database) - commitsBefore).toBe(1);
    db.close();
    store.close();
  });

  it('truncates the WAL back to WAL_SIZE_LIMIT once a checkpoint copied it all (it kept its peak size for good)', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 100_000 });
    const wal = `${store.path}-wal`;
    for (let origin = 0; origin < 40_000; origin++) {
      store.recordAcquire(`w${origin}.example:443`, { hit: false });
      store.recordConnect(`w${origin}.example:443`, 5);
    }
    // One transaction (one slice of flush(): a clock of work that does not move): the WAL grows past the limit;
    // SQLite's automatic checkpoint at its end copies it all (no checkpointer thread without the auto flush).
    const stillClock = vi.spyOn(performance, 'now').mockReturnValue(0);
    try {
      await store.flush();
    } finally {
      stillClock.mockRestore();
    }
    expect(statSync(wal).size).toBeGreaterThan(WAL_SIZE_LIMIT);
    // The next commit starts the WAL over from its beginning, and then truncates the file to the limit.
    clock += 1000;
    store.recordAcquire('one.example:443', { hit: false });
    await store.flush();
    expect(statSync(wal).size).toBeLessThanOrEqual(WAL_SIZE_LIMIT);
    store.close();
  });

  it('accumulates counters and averages across flushes and reopenings', async () => {
    let store = open();
    const key = 'example.com:443';
    store.recordAcquire(key, { hit: false });
    store.recordAcquire(key, { hit: true });
    store.recordConnect(key, 10);
    store.recordConnect(key, 20);
    store.recordConnectFailure(key);
    await store.flush();
    const first = store.origin(key);
    expect(first).toMatchObject({
      host: 'example.com',
      port: 443,
      acquires: 2,
      hits: 1,
      misses: 1,
      connectFailures: 1,
    });
    expect(first?.firstSeen).toBe(clock);
    // EWMA (alpha 0.2) seeded with the first sample: 10, then 10 * 0.8 + 20 * 0.2.
    expect(first?.connectMsAvg).toBeCloseTo(12, 10);
    store.close();

    clock += HOUR;
    store = open();
    store.recordAcquire(key, { hit: true });
    store.recordConnect(key, 30);
    store.recordConnect(key, 40);
    store.close(); // close flushes
    store = open();
    const second = store.origin(key);
    expect(second).toMatchObject({ acquires: 3, hits: 2, misses: 1, connectFailures: 1, lastSeen: clock });
    expect(second?.firstSeen).toBe(clock - HOUR);
    expect(second?.connectMsAvg).toBeCloseTo((12 * 0.8 + 30 * 0.2) * 0.8 + 40 * 0.2, 10);
    store.close();
  });

  it('keeps a decaying demand rate per origin', async () => {
    const store = open();
    const key = 'rate.example:443';
    for (let index = 0; index < 60; index++) store.recordAcquire(key, { hit: true });
    await store.flush();
    expect(store.origin(key)?.demandRatePerS).toBeCloseTo(1, 10); // 60 acquires / 60 s window
    clock += MINUTE;
    for (let index = 0; index < 60; index++) store.recordAcquire(key, { hit: true });
    await store.flush();
    expect(store.origin(key)?.demandRatePerS).toBeCloseTo(Math.exp(-1) + 1, 10);
    store.close();
  });

  it('flushes from a timer', async () => {
    const store = open();
    useFakeClock();
    try {
      store.startAutoFlush(20);
      store.recordAcquire('timer.example:80', { hit: false });
      vi.advanceTimersByTime(19);
      expect(store.pendingOrigins).toBe(1);
      vi.advanceTimersByTime(1);
      // The tick's slice is committed by the store's thread: pending until the thread says it is.
      await store.idle();
    } finally {
      vi.useRealTimers();
    }
    expect(store.pendingOrigins).toBe(0);
    expect(store.origin('timer.example:80')?.acquires).toBe(1);
    store.close();
    expect(await store.flush()).toBe(0); // closed: a no-op
    store.close(); // idempotent
  });

  it('takes a new flush interval on reload (configure)', async () => {
    const store = open();
    useFakeClock();
    try {
      store.startAutoFlush(20);
      store.configure({ flushMs: 1000 });
      store.recordAcquire('timer.example:80', { hit: false });
      vi.advanceTimersByTime(999);
      expect(store.pendingOrigins).toBe(1);
      vi.advanceTimersByTime(1);
      await store.idle();
    } finally {
      vi.useRealTimers();
    }
    expect(store.pendingOrigins).toBe(0);
    store.close();
  });
});

describe('what a client cannot bloat', () => {
  it('records only origins that connected: failures and refusals of an origin never reached leave no row', async () => {
    const store = open();
    for (let origin = 0; origin < 200; origin++) store.recordConnectFailure(`junk${origin}.example:443`);
    store.recordConnect('real.example:443', 12);
    store.recordConnectFailure('real.example:443');
    expect(await store.flush()).toBe(201);
    const db = reader(dir);
    expect(column(db, 'SELECT origin_key FROM origins')).toEqual(['real.example:443']);
    expect(store.originCount).toBe(1);
    // A failure of an origin that did connect before is still counted.
    store.recordConnectFailure('real.example:443');
    await store.flush();
    expect(store.origin('real.example:443')?.connectFailures).toBe(2);
    db.close();
    store.close();
  });

  it('keeps at most maxOrigins, evicting the least recently seen with their demand history', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 100 });
    for (let origin = 0; origin < 250; origin++) {
      clock += 1000;
      store.recordAcquire(`o${origin}.example:443`, { hit: false });
      store.recordConnect(`o${origin}.example:443`, 5);
      store.recordIdleLifetime(`o${origin}.example:443`, 30_000);
    }
    await store.flush();
    const db = reader(dir);
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(100);
    expect(store.originCount).toBe(100);
    expect(value(db, 'SELECT min(origin_key) FROM origins')).toBe('o150.example:443');
    expect(value(db, "SELECT count(*) FROM demand_history WHERE origin_key = 'o0.example:443'")).toBe(0);
    expect(store.learnedIdleLifetime('o0.example:443')).toBeUndefined();
    expect(store.learnedIdleLifetime('o249.example:443')).toBe(30_000);
    // An origin seen again moves to the recent end and survives the next evictions.
    clock += 1000;
    store.recordAcquire('o150.example:443', { hit: true });
    for (let origin = 250; origin < 260; origin++) store.recordAcquire(`o${origin}.example:443`, { hit: false });
    await store.flush();
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(100);
    expect(store.origin('o150.example:443')).toBeDefined();
    expect(store.origin('o151.example:443')).toBeUndefined();
    // The count survives a reopening.
    store.close();
    const again = StateStore.open(dir, { now, maxOrigins: 100 });
    expect(again.originCount).toBe(100);
    again.close();
    db.close();
  });

  it('evicts origins without demand (reached only by prewarms) first, then the least recently seen', async () => {
    // One uid's prewarms (within its allowance) make rows that no acquire ever asked for: at the cap they must not
    // push out the history of origins that clients used.
    const store = StateStore.open(dir, { now, maxOrigins: 4 });
    for (let origin = 0; origin < 3; origin++) {
      clock += 1000;
      store.recordAcquire(`used${origin}.example:443`, { hit: false });
      store.recordConnect(`used${origin}.example:443`, 5);
    }
    await store.flush();
    for (let origin = 0; origin < 50; origin++) {
      clock += 1000;
      store.recordConnect(`prewarmed${origin}.example:443`, 5); // a prewarm's connect: no acquire
    }
    await store.flush();
    const db = reader(dir);
    expect(column(db, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'prewarmed49.example:443',
      'used0.example:443',
      'used1.example:443',
      'used2.example:443',
    ]);
    // Among origins with demand, the least recently seen goes first.
    clock += 1000;
    store.recordAcquire('used0.example:443', { hit: true });
    store.recordAcquire('used3.example:443', { hit: false });
    store.recordAcquire('used4.example:443', { hit: false });
    await store.flush();
    expect(column(db, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'used0.example:443',
      'used2.example:443',
      'used3.example:443',
      'used4.example:443',
    ]);
    expect(store.originCount).toBe(4);
    db.close();
    store.close();
  });

  it("keeps another uid's history at the cap: one uid's acquires to ever more origins push out its own oldest", async () => {
    // One uid's acquires to thousands of origins that connect (a wildcard domain the policy allows) evicted every
    // other uid's history: the least recently seen went first, whoever's they were.
    const A = 1000;
    const B = 1001;
    const store = StateStore.open(dir, { now, maxOrigins: 10 });
    for (let origin = 0; origin < 3; origin++) {
      clock += 1000;
      store.recordAcquire(`b${origin}.example:443`, { hit: false }, B);
      store.recordConnect(`b${origin}.example:443`, 5);
    }
    await store.flush();
    for (let origin = 0; origin < 50; origin++) {
      clock += 1000;
      store.recordAcquire(`a${origin}.example:443`, { hit: false }, A);
      store.recordConnect(`a${origin}.example:443`, 5);
      if (origin % 10 === 9) await store.flush();
    }
    // Another uid's acquire renews a row but takes nothing over: b0 stays B's (else A could make B's origins its own
    // and push them out as its oldest).
    clock += 1000;
    store.recordAcquire('b0.example:443', { hit: true }, A);
    await store.flush();
    const db = reader(dir);
    const rows = () => column(db, 'SELECT origin_key FROM origins ORDER BY last_seen, origin_key');
    expect(rows()).toEqual([
      'b1.example:443',
      'b2.example:443',
      ...[43, 44, 45, 46, 47, 48, 49].map((origin) => `a${origin}.example:443`),
      'b0.example:443',
    ]);
    expect(value(db, "SELECT uid FROM origins WHERE origin_key = 'b0.example:443'")).toBe(B);
    expect(store.originCount).toBe(10);
    store.close();
    // The counts per uid survive a reopening: A's next origins still push out A's own.
    const again = StateStore.open(dir, { now, maxOrigins: 10 });
    for (let origin = 50; origin < 60; origin++) {
      clock += 1000;
      again.recordAcquire(`a${origin}.example:443`, { hit: false }, A);
    }
    await again.flush();
    expect(rows().filter((key) => String(key).startsWith('b'))).toHaveLength(3);
    // A uid holding fewer takes its share back from the one holding the most: equal shares at the cap.
    for (let origin = 3; origin < 8; origin++) {
      clock += 1000;
      again.recordAcquire(`b${origin}.example:443`, { hit: false }, B);
    }
    await again.flush();
    expect(column(db, 'SELECT uid, count(*) FROM origins GROUP BY uid ORDER BY uid')).toEqual([A, B]);
    expect(value(db, 'SELECT count(*) FROM origins WHERE uid = ?', A)).toBe(5);
    expect(value(db, 'SELECT count(*) FROM origins WHERE uid = ?', B)).toBe(5);
    expect(again.originCount).toBe(10);
    db.close();
    again.close();
  });

  it('takes a lower maxOrigins on reload (configure): the next flush evicts down to it', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 100 });
    for (let origin = 0; origin < 5; origin++) {
      clock += 1000;
      store.recordConnect(`o${origin}.example:443`, 5);
    }
    await store.flush();
    expect(store.originCount).toBe(5);
    store.configure({ maxOrigins: 2 });
    clock += 1000;
    store.recordConnect('o5.example:443', 5);
    await store.flush();
    expect(store.originCount).toBe(2);
    const db = reader(dir);
    expect(column(db, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'o4.example:443',
      'o5.example:443',
    ]);
    db.close();
    store.close();
  });

  it('a flush that fails (the file locked by another process) changes nothing: the next one evicts to the cap', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 2 });
    for (const name of ['a', 'b']) {
      clock += 1000;
      store.recordConnect(`${name}.example:443`, 5);
    }
    await store.flush();
    clock += 1000;
    store.recordConnect('c.example:443', 5);
    // Another process holds the write lock: each flush fails, and everything stays pending.
    const other = openDatabase(join(dir, 'sockpool.sqlite'));
    other.exec('PRAGMA busy_timeout = 0; BEGIN IMMEDIATE');
    for (let attempt = 0; attempt < 3; attempt++) expect(() => store.flushSlice()).toThrow(/locked|busy/i);
    expect(store.pendingOrigins).toBe(1);
    expect(store.originCount).toBe(2);
    other.exec('ROLLBACK');
    other.close();
    // Once the lock is gone the flush ends (it used to evict every row, then loop for good on an empty table).
    let slices = 0;
    while (store.flushSlice() && slices < 100) slices++;
    expect(slices).toBeLessThan(100);
    const db = reader(dir);
    expect(column(db, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'b.example:443',
      'c.example:443',
    ]);
    expect(store.originCount).toBe(2);
    db.close();
    store.close();
  });

  it("says once when the timer's flushes start failing, with SQLite's code, and once when one succeeds again", async () => {
    // Found in review: every failure (a full disk, a read-only or locked file, a page found corrupt) was swallowed,
    // so the history could stop being written for good without a word to the operator.
    const failing: unknown[] = [];
    const recovered: unknown[] = [];
    const store = StateStore.open(dir, {
      now,
      onFlushFailing: (info) => failing.push(info),
      onFlushRecovered: (info) => recovered.push(info),
    });
    const other = openDatabase(join(dir, 'sockpool.sqlite'));
    useFakeClock();
    try {
      store.startAutoFlush(20);
      store.recordAcquire('locked.example:443', { hit: false });
      other.exec('PRAGMA busy_timeout = 0; BEGIN IMMEDIATE');
      // Each tick's slice is committed (or not) by the store's thread: its answer is taken before the next tick.
      const tick = async (ticks: number) => {
        for (let index = 0; index < ticks; index++) {
          vi.advanceTimersByTime(20);
          await store.idle();
          await nextTurn();
        }
      };
      await tick(3);
      expect(failing).toEqual([
        { path: store.path, sqliteCode: expect.stringMatching(/^SQLITE_BUSY/), err: expect.any(String), pending: 1 },
      ]);
      expect(recovered).toEqual([]);
      other.exec('ROLLBACK');
      await tick(1);
      expect(recovered).toEqual([{ path: store.path, failures: 3 }]);
      await tick(2);
      expect(failing).toHaveLength(1);
      expect(recovered).toHaveLength(1);
    } finally {
      vi.useRealTimers();
    }
    expect(store.origin('locked.example:443')?.acquires).toBe(1);
    other.close();
    store.close();
  });

  it('holds at most maxOrigins origins pending while flushes keep failing (a locked file, a full disk)', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 100 });
    await store.flush();
    const other = openDatabase(join(dir, 'sockpool.sqlite'));
    other.exec('PRAGMA busy_timeout = 0; BEGIN IMMEDIATE');
    // Clients keep meeting new origins; every timed flush fails and everything stays pending.
    for (let round = 0; round < 10; round++) {
      for (let origin = 0; origin < 1000; origin++) store.recordConnect(`r${round}-${origin}.example:443`, 5);
      expect(() => store.flushSlice()).toThrow(/locked|busy/i);
    }
    // It grew by every origin any client touched, without bound, for as long as the disk stayed full.
    expect(store.pendingOrigins).toBeLessThanOrEqual(100);
    other.exec('ROLLBACK');
    other.close();
    while (store.flushSlice()) {}
    expect(store.originCount).toBe(100);
    store.close();
  });

  /**
   * `origins` origins acquired once a minute for three days while another process holds the file's lock (a locked
   * file, a full disk: every timed flush fails), then written. Returns the most entries held pending meanwhile.
   */
  async function lockedForThreeDays(store: StateStore, origins: number): Promise<number> {
    await store.flush();
    const other = openDatabase(join(dir, 'sockpool.sqlite'));
    other.exec('PRAGMA busy_timeout = 0; BEGIN IMMEDIATE');
    let mostPending = 0;
    for (let minute = 0; minute < 3 * 24 * 60; minute++) {
      clock += MINUTE;
      for (let origin = 0; origin < origins; origin++)
        store.recordAcquire(`m${origin}.example:443`, { hit: true }, 1000);
      if (minute % 60 === 0) expect(() => store.flushSlice()).toThrow(/locked|busy/i);
      mostPending = Math.max(mostPending, store.pendingDemandEntries);
    }
    other.exec('ROLLBACK');
    other.close();
    await store.flush();
    return mostPending;
  }

  /** topOrigins' score of an origin acquired once a minute for the last `minutes` minutes, each minute apart. */
  function scoreOfEveryMinute(minutes: number): number {
    let score = 0;
    for (let age = 0; age < minutes; age++) score += 2 ** (-age / (6 * 60));
    return score;
  }

  it('holds at most 60 demand minutes per pending origin while flushes keep failing, merging the oldest: no acquire and no ranking lost', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 20 });
    const mostPending = await lockedForThreeDays(store, 20);
    const db = reader(dir);
    // It held one entry per origin per minute: 86,400, all written by the one flush at the end.
    expect(value(db, 'SELECT count(*) FROM demand_history')).toBeLessThanOrEqual(20 * 60);
    expect(mostPending).toBeLessThanOrEqual(20 * 60);
    expect(value(db, 'SELECT sum(acquires) FROM demand_history')).toBe(20 * 3 * 24 * 60);
    db.close();
    // The merged entries weigh in the ranking what the minutes they took in weighed (to a rounding of their minute).
    const [top] = await store.topOrigins(1);
    expect(top?.score).toBeCloseTo(scoreOfEveryMinute(3 * 24 * 60), 0);
    store.close();
  });

  it('shares 200,000 pending demand minutes among the history cap (historyMaxOrigins): 2 per origin at 100,000', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 100_000 });
    const mostPending = await lockedForThreeDays(store, 20);
    const db = reader(dir);
    expect(value(db, 'SELECT count(*) FROM demand_history')).toBeLessThanOrEqual(20 * 2);
    expect(mostPending).toBeLessThanOrEqual(20 * 2);
    expect(value(db, 'SELECT sum(acquires) FROM demand_history')).toBe(20 * 3 * 24 * 60);
    db.close();
    const [top] = await store.topOrigins(1);
    expect(top?.score).toBeCloseTo(scoreOfEveryMinute(3 * 24 * 60), 0);
    store.close();
  });

  it('drops a pending demand minute older than the history keeps (demandHistoryDays): the prune would, and no ranking counts it', async () => {
    // A history of 5 minutes, so that the flush below, 8 minutes after the last, does not prune (every 10 minutes).
    const store = StateStore.open(dir, { now, demandHistoryDays: 5 / (24 * 60) });
    await store.flush();
    store.recordAcquire('sparse.example:443', { hit: true }, 1000);
    clock += 8 * MINUTE;
    store.recordAcquire('sparse.example:443', { hit: true }, 1000);
    const pending = store.pendingDemandEntries;
    await store.flush();
    const db = reader(dir);
    expect(column(db, 'SELECT minute FROM demand_history')).toEqual([Math.floor(clock / MINUTE)]);
    db.close();
    expect(pending).toBe(1);
    store.close();
  });

  it("drops one uid's own pending origins at that bound, not another uid's (a flood between two flushes)", async () => {
    const A = 1000;
    const B = 1001;
    const store = StateStore.open(dir, { now, maxOrigins: 10 });
    await store.flush();
    const other = openDatabase(join(dir, 'sockpool.sqlite'));
    other.exec('PRAGMA busy_timeout = 0; BEGIN IMMEDIATE');
    store.recordConnect('b0.example:443', 5); // a miss: the connect is recorded before its acquire
    store.recordAcquire('b0.example:443', { hit: false }, B);
    store.recordAcquire('b1.example:443', { hit: true }, B);
    for (let origin = 0; origin < 50; origin++) {
      clock += 1000;
      store.recordConnect(`a${origin}.example:443`, 5);
      store.recordAcquire(`a${origin}.example:443`, { hit: false }, A);
    }
    expect(() => store.flushSlice()).toThrow(/locked|busy/i);
    expect(store.pendingOrigins).toBe(10);
    other.exec('ROLLBACK');
    other.close();
    while (store.flushSlice()) {}
    const db = reader(dir);
    expect(column(db, "SELECT origin_key FROM origins WHERE origin_key LIKE 'b%' ORDER BY origin_key")).toEqual([
      'b0.example:443',
      'b1.example:443',
    ]);
    expect(value(db, 'SELECT min(origin_key) FROM origins WHERE uid = ?', A)).toBe('a42.example:443');
    db.close();
    store.close();
  });

  it("drops one uid's own prewarm connects' pending records at that bound, not another uid's miss between its connect and its acquire", async () => {
    const A = 1000;
    const B = 1001;
    const store = StateStore.open(dir, { now, maxOrigins: 10 });
    await store.flush();
    // A miss of uid B's: its connect is recorded before its acquire.
    store.recordConnect('b0.example:443', 7, B);
    // Meanwhile uid A's prewarms connect to fifty origins (connects only, no acquire).
    for (let origin = 0; origin < 50; origin++) {
      clock += 1000;
      store.recordConnect(`a${origin}.example:443`, 5, A);
    }
    store.recordAcquire('b0.example:443', { hit: false }, B);
    expect(store.pendingOrigins).toBe(10);
    await store.flush();
    const db = reader(dir);
    // B's record kept whole (its connect time with it), held by B; A's the last nine of its own, held by no uid (no
    // acquire asked for them).
    expect(value(db, 'SELECT connect_ms_avg FROM origins WHERE origin_key = ?', 'b0.example:443')).toBe(7);
    expect(value(db, 'SELECT uid FROM origins WHERE origin_key = ?', 'b0.example:443')).toBe(B);
    expect(column(db, "SELECT origin_key FROM origins WHERE origin_key LIKE 'a%' ORDER BY last_seen")).toEqual(
      Array.from({ length: 9 }, (_, i) => `a${41 + i}.example:443`),
    );
    expect(value(db, "SELECT count(*) FROM origins WHERE origin_key LIKE 'a%' AND uid IS NOT NULL")).toBe(0);
    db.close();
    store.close();
  });

  it('a slice looks at its time budget after each origin it writes, not after each sixteenth', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 100 });
    await store.flush();
    // Each origin with a full record of demand minutes: sixteen of them were 16 x 61 statements past the budget.
    for (let minute = 0; minute < 60; minute++) {
      clock += MINUTE;
      for (let origin = 0; origin < 20; origin++) store.recordAcquire(`b${origin}.example:443`, { hit: true }, 1000);
    }
    expect(store.flushSlice(0)).toBe(true);
    expect(store.pendingOrigins).toBe(19);
    store.close();
  });

  it('a timed flush writes in slices and yields between them, ending with everything written', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 1000 });
    await store.flush();
    for (let origin = 0; origin < 3000; origin++) store.recordConnect(`s${origin}.example:443`, 5);
    // A budget of 0 ms: each slice writes one origin and says there is more. (The last 1000 recorded are pending,
    // maxOrigins: about 1000 slices.)
    let slices = 0;
    while (store.flushSlice(0)) slices++;
    expect(slices).toBeGreaterThan(50);
    expect(store.pendingOrigins).toBe(0);
    expect(store.originCount).toBe(1000);
    const db = reader(dir);
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(1000);
    db.close();
    store.close();
  });
});

describe('flush()', () => {
  it('writes in slices that yield the event loop, and resolves once everything pending before the call is written, not waiting for what is recorded meanwhile', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 100_000 });
    await store.flush(); // the first flush also prunes
    for (let origin = 0; origin < 3000; origin++) store.recordAcquire(`p${origin}.example:443`, { hit: false }, 1000);
    const db = reader(dir);
    // What another connection sees of the history at each turn of the event loop while the flush is under way, and
    // new origins recorded at each of those turns (a client flooding them).
    const seen: number[] = [];
    let flooded = 0;
    let flushed = false;
    const watch = () => {
      if (flushed) return;
      seen.push(value(db, 'SELECT count(*) FROM origins') as number);
      for (let origin = 0; origin < 10; origin++)
        store.recordAcquire(`flood${flooded++}.example:443`, { hit: false }, 1001);
      setImmediate(watch);
    };
    setImmediate(watch);
    // Each look at the clock 1 ms later: a slice ends after the fifth origin (SLICE_BUDGET_MS, 5 looks).
    let ms = 0;
    const clockOfWork = vi.spyOn(performance, 'now').mockImplementation(() => ms++);
    let written: number;
    try {
      written = await store.flush();
    } finally {
      clockOfWork.mockRestore();
      flushed = true;
    }
    // Before: all 3000 in one transaction, the event loop held for all of it (a watcher saw nothing in between).
    expect(seen, 'the history seen between the transactions of the flush').not.toEqual([]);
    const counts = [0, ...seen];
    for (let index = 1; index < counts.length; index++) {
      expect(counts[index]! - counts[index - 1]!).toBeLessThanOrEqual(5);
    }
    expect(written).toBe(3000);
    expect(value(db, "SELECT count(*) FROM origins WHERE origin_key LIKE 'p%'")).toBe(3000);
    expect(value(db, "SELECT sum(acquires) FROM demand_history WHERE origin_key LIKE 'p%'")).toBe(3000);
    expect(flooded).toBeGreaterThan(0);
    expect(store.pendingOrigins).toBeGreaterThan(0);
    db.close();
    store.close();
  });
});

/**
 * store.close() on a clock of work, not time: each look at the clock (one per origin prepared, and the waits for the
 * store thread) is 1 ms later. Returns what close() returned.
 */
function closeOnClockOfWork(store: StateStore): number {
  let ms = 0;
  const clockOfWork = vi.spyOn(performance, 'now').mockImplementation(() => ms++);
  try {
    return store.close();
  } finally {
    clockOfWork.mockRestore();
  }
}

describe('close', () => {
  it('prepares what is pending for at most CLOSE_BUDGET_MS (the stop has that long), and drops and counts the origins not seen committed', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 10_000 });
    await store.flush();
    for (let origin = 0; origin < 3000; origin++) store.recordConnect(`c${origin}.example:443`, 5);
    const dropped = closeOnClockOfWork(store);
    // The store thread commits what it was handed, whether the close waited for it or not.
    await store.threadEnded();
    const db = reader(dir);
    const written = value(db, 'SELECT count(*) FROM origins') as number;
    db.close();
    // It wrote all 3000 in one transaction, however long that took (past the stop's end, where a SIGKILL rolls it
    // all back).
    expect(written).toBeLessThanOrEqual(1000);
    expect(written).toBeGreaterThan(0);
    // What it had no time to prepare is dropped; what it did not see committed before returning is counted with it.
    expect(dropped).toBeGreaterThanOrEqual(3000 - written);
  });
  it('ends with its thread done when the disk keeps up, however much is pending: the thread commits what it was handed and closes the file within the budget', async () => {
    // Before: the event loop prepared until the budget was spent and the thread's commits trailed it, so every close
    // with more pending than the budget covers returned without its thread (the daemon's stop then ended as unclean,
    // status 1, and what the thread had not committed yet was lost with the process).
    const store = StateStore.open(dir, { now, maxOrigins: 10_000 });
    await store.flush();
    for (let origin = 0; origin < 3000; origin++) store.recordConnect(`c${origin}.example:443`, 5);
    const dropped = closeOnClockOfWork(store);
    expect(store.threadLeft).toBeUndefined();
    const db = reader(dir);
    const written = value(db, 'SELECT count(*) FROM origins') as number;
    db.close();
    expect(written).toBeGreaterThan(0);
    expect(dropped).toBe(3000 - written);
    await store.threadEnded();
  });

  it('commits on the event loop, as before the store thread, what it prepared when that thread cannot open the file', async () => {
    // Its thread opens the file by its path: the state directory moved away while the store ran, it finds none.
    const store = open();
    await store.flush();
    for (let origin = 0; origin < 100; origin++) store.recordConnect(`c${origin}.example:443`, 5);
    const fdsBefore = fdCount();
    const moved = `${dir}-moved`;
    renameSync(dir, moved);
    try {
      expect(store.close()).toBe(0);
      expect(store.threadLeft).toBeUndefined();
      await store.threadEnded();
      const db = reader(moved);
      expect(value(db, 'SELECT count(*) FROM origins')).toBe(100);
      db.close();
    } finally {
      renameSync(moved, dir);
    }
    // The store's connection (the file, its WAL and index) and the thread's event loop closed.
    expect(fdCount()).toBe(fdsBefore - 3);
  });

  it('commits on the event loop what is pending, closes the file and lets the directory go when no thread can be created for its writer', async () => {
    const { child, output } = await childUnderThreadLimit('close-no-thread');
    try {
      child.stdin?.write('close\n');
      await eventually(
        () => /^fds \d+$/m.test(output()),
        () => `the child's store closed: ${output()}`,
        30_000,
      );
      // Before: new Worker threw (ERR_WORKER_INIT_FAILED) out of close(), the store marked closed with its
      // connection open, the directory locked and every pending origin dropped.
      expect(output()).toMatch(/^closed 0$/m);
      expect(output()).toMatch(/^fds 0$/m);
      // While the child lives: the directory is free for the next daemon, and what was pending is in the file.
      StateDirLock.take(dir).release();
      const db = reader(dir);
      expect(value(db, "SELECT count(*) FROM origins WHERE origin_key LIKE 'pending%'")).toBe(100);
      db.close();
    } finally {
      child.stdin?.write('exit\n');
    }
  });
});

describe('close when its thread fails to start', () => {
  /** A store-child.ts child in `mode` whose store threads fail as `fails` says (store-thread-fails.cjs); once ready. */
  async function childWithFailingThreads(mode: string, fails: 'start' | 'load') {
    return readyStoreChild(dir, mode, ['--require', join(repo, 'test/fixtures/store-thread-fails.cjs')], {
      env: { ...process.env, STORE_THREAD_FAILS: fails },
    });
  }

  it.each([
    ['close-thread-fails', 'load'],
    ['auto-thread-fails', 'load'],
    ['auto-thread-fails', 'start'],
  ] as const)(
    '%s (%s): commits on the event loop and lets the directory go, not waiting for a thread that failed',
    async (mode, fails) => {
      const { child, output } = await childWithFailingThreads(mode, fails);
      try {
        child.stdin?.write('close\n');
        await eventually(
          () => /^closed /m.test(output()),
          () => `the child's store closed: ${output()}`,
          30_000,
        );
        // Before: the close waited for the thread's connection until its budget was spent, dropped every pending origin
        // and named the thread as left (the directory locked until the process ended).
        expect(output()).toMatch(/^closed 0 -$/m);
        StateDirLock.take(dir).release();
        const db = reader(dir);
        expect(value(db, "SELECT count(*) FROM origins WHERE origin_key LIKE 'pending%'")).toBe(100);
        db.close();
      } finally {
        const exited = child.exitCode === null ? new Promise((resolve) => child.once('exit', resolve)) : undefined;
        child.stdin?.write('exit\n');
        await exited;
      }
    },
  );
});

describe('a store thread that ends with a slice in flight', () => {
  /**
   * Runs store-child.ts's thread-dies-answering with the checkpointer ending as STORE_THREAD_FAILS says
   * (store-thread-fails.cjs), as it answers a flush's slice it committed; resolves with the child's output once it
   * printed what the file holds.
   */
  async function threadDyingAsItAnswers(fails: 'answer-throws' | 'answer-exits'): Promise<string> {
    const { child, output } = await readyStoreChild(
      dir,
      'thread-dies-answering',
      ['--require', join(repo, 'test/fixtures/store-thread-fails.cjs')],
      { env: { ...process.env, STORE_THREAD_FAILS: fails } },
    );
    try {
      await eventually(
        () => /^counted /m.test(output()),
        () => `the child's flushes, ranking and close settled: ${output()}`,
        30_000,
      );
      return output();
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  }

  it('a store thread that dies (its error event) between its commit and its answer has the slice committed once: not undone and written again', async () => {
    const output = await threadDyingAsItAnswers('answer-throws');
    // Before: the slice was undone (its 5 acquires pending again), flush() rejected, and the next flush wrote them again.
    expect(/^counted (\S+) after (\S+)$/m.exec(output)?.slice(1)).toEqual(['5', '1']);
    expect(output).toMatch(/^flush resolved$/m);
    expect(output).toMatch(/^ranked counted\.example:443,after\.example:443$/m);
    expect(output).toMatch(/^closed 0$/m);
  });

  it('a store thread that ends without an error event, a slice in flight, is the writer no more: the ranking and flush() after it settle, nothing lost or counted twice', async () => {
    // Before: the ended thread stayed the writer, and the ranking's slice handed to it was never answered.
    const output = await threadDyingAsItAnswers('answer-exits');
    expect(output).toMatch(/^ranked counted\.example:443,after\.example:443$/m);
    expect(output).toMatch(/^flushed 0$/m);
    expect(output).toMatch(/^closed 0$/m);
    expect(/^counted (\S+) after (\S+)$/m.exec(output)?.slice(1)).toEqual(['5', '1']);
    expect(output).toMatch(/^flush resolved$/m);
  });
});

describe('a store thread that ends unseen, or ends at all', () => {
  it.each(['answer-exits', 'answer-throws'] as const)(
    'close() right after the checkpointer ended (%s), its exit event not seen yet, commits everything pending itself and names no thread left',
    async (fails) => {
      const mark = join(dir, 'thread-ending');
      const { child, output } = await readyStoreChild(
        dir,
        'close-thread-ended',
        ['--require', join(repo, 'test/fixtures/store-thread-fails.cjs')],
        { env: { ...process.env, STORE_THREAD_FAILS: fails, STORE_THREAD_ENDING_MARK: mark } },
      );
      try {
        await eventually(
          () => /^counted /m.test(output()),
          () => `the child's store closed: ${output()}`,
          30_000,
        );
        // Before: the close took the ended thread for the writer, waited its whole budget for it, dropped the 100
        // pending origins and named the thread as left.
        expect(output()).toMatch(/^closed 0 -$/m);
        expect(/^counted (\S+) pending (\S+)$/m.exec(output())?.slice(1)).toEqual(['1', '100']);
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL');
      }
    },
  );

  it('a checkpointer that dies is started again, once: a second death within the interval leaves the slices to the event loop, nothing lost or counted twice', async () => {
    const { child, output } = await readyStoreChild(
      dir,
      'thread-restarts',
      ['--require', join(repo, 'test/fixtures/store-thread-fails.cjs')],
      { env: { ...process.env, STORE_THREAD_FAILS: 'answer-exits' } },
    );
    try {
      await eventually(
        () => /^acquires /m.test(output()),
        () => `the child's three flushes and close settled: ${output()}`,
        30_000,
      );
      // Before: no thread was started after the first death (the second flush's slice committed on the event loop).
      // The second thread's death (as it answered the second flush's slice) shows that slice went to a thread.
      const lines = output()
        .split('\n')
        .filter((line) => /^(flush|ended|endings|closed)/.test(line));
      expect(lines).toEqual([
        'ended restarted',
        'flush first resolved',
        'ended deferred',
        'flush second resolved',
        'flush third resolved',
        'endings 2',
        'closed 0',
      ]);
      expect(output()).toMatch(/^acquires 1 1 1$/m);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
  });
});

describe('the checkpointer thread', () => {
  it('when no thread can be created for it (a pids limit), the auto flush runs without it: the timer writes, the close closes', async () => {
    const { child, output } = await childUnderThreadLimit('auto-no-thread');
    try {
      child.stdin?.write('start\n');
      await eventually(
        () => /^(closed \d+|threw .*)$/m.test(output()),
        () => `the child's store started and closed: ${output()}`,
        30_000,
      );
      // Before: new Worker threw (ERR_WORKER_INIT_FAILED) out of startAutoFlush, and the daemon's start with it.
      expect(output()).toMatch(/^started$/m);
      expect(output()).toMatch(/^flushed$/m);
      expect(output()).toMatch(/^closed 0$/m);
      StateDirLock.take(dir).release();
      const db = reader(dir);
      expect(value(db, "SELECT count(*) FROM origins WHERE origin_key LIKE 'auto%'")).toBe(100);
      db.close();
    } finally {
      child.stdin?.write('exit\n');
    }
  });

  it('with the auto flush on, copies the WAL into the database file off the event loop, and stops with it', async () => {
    const fdsBefore = readdirSync('/proc/self/fd').length;
    const store = StateStore.open(dir, { now, maxOrigins: 10_000 });
    // The timer never fires in this test: the slices are run here, as the timer would.
    store.startAutoFlush(3_600_000);
    for (let origin = 0; origin < 3000; origin++) store.recordConnect(`c${origin}.example:443`, 5);
    while (store.flushSlice(0)) {}
    // Every slice's commit went to the WAL; the thread copied all of it (asked again after each run it was busy).
    await eventually(() => {
      const { count, last } = store.checkpoints;
      return count >= 1 && last !== undefined && last.log > 0 && last.checkpointed === last.log;
    }, 'the WAL checkpointed to its last frame');
    store.stopAutoFlush();
    const stopped = store.checkpoints.count;
    store.recordConnect('after.example:443', 5);
    expect(store.flushSlice()).toBe(false);
    expect(store.checkpoints.count).toBe(stopped);
    store.close();
    const db = reader(dir);
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(3001);
    db.close();
    // The thread's connection (the database, its WAL and index) closed with the thread.
    await eventually(() => readdirSync('/proc/self/fd').length <= fdsBefore, 'the store and its thread hold no fd');
  });
});

describe("the timer's slices on the store thread", () => {
  /**
   * Counts, from now on, the writes any better-sqlite3 connection of this thread (the event loop's) makes: each
   * transaction run and each statement run (a write outside one). The store thread loads its own copy of the module,
   * which this does not see. Restored by the returned function.
   */
  function countEventLoopWrites(): { writes: () => number; restore: () => void } {
    let writes = 0;
    const probe = new Database(':memory:');
    const statementPrototype = Object.getPrototypeOf(probe.prepare('SELECT 1'));
    probe.close();
    const originalRun = statementPrototype.run;
    const originalTransaction = Database.prototype.transaction;
    statementPrototype.run = function run(this: unknown, ...params: unknown[]) {
      writes++;
      return originalRun.apply(this, params);
    };
    Database.prototype.transaction = function transaction(this: Database.Database, fn: never) {
      const wrapped = originalTransaction.call(this, fn);
      return Object.assign((...params: never[]) => {
        writes++;
        return wrapped(...params);
      }, wrapped);
    } as typeof Database.prototype.transaction;
    return {
      writes: () => writes,
      restore: () => {
        statementPrototype.run = originalRun;
        Database.prototype.transaction = originalTransaction;
      },
    };
  }

  /**
   * Runs `count` ticks of a 20 ms auto flush, each with the slices its run goes on with (one a turn, each handed to
   * the store thread once it answered for the one before) before the next.
   */
  async function ticks(store: StateStore, count: number): Promise<void> {
    for (let index = 0; index < count; index++) {
      vi.advanceTimersByTime(20);
      for (let turn = 0; turn < 30; turn++) {
        await store.idle();
        await nextTurn();
      }
    }
  }

  it("with the auto flush on, the event loop's connection commits nothing: the store thread commits the timer's writes, evictions and prunes", async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 50 });
    for (let origin = 0; origin < 200; origin++) {
      store.recordAcquire(`e${origin}.example:443`, { hit: false }, 1000 + (origin % 3));
      store.recordConnect(`e${origin}.example:443`, 5);
    }
    await store.checkpointerReady();
    const counted = countEventLoopWrites();
    useFakeClock();
    try {
      store.startAutoFlush(20);
      await ticks(store, 5);
      expect(store.pendingOrigins).toBe(0);
      // Over the cap: evicted by the timer's next slices.
      expect(store.originCount).toBe(50);
      // Eight days on: the demand history is pruned, and the origins it held with it once unseen past the retention.
      clock += 31 * 24 * HOUR;
      store.recordAcquire('late.example:443', { hit: true }, 1000);
      await ticks(store, 10);
      expect(counted.writes()).toBe(0);
    } finally {
      vi.useRealTimers();
      counted.restore();
    }
    const db = reader(dir);
    expect(column(db, 'SELECT origin_key FROM origins')).toEqual(['late.example:443']);
    expect(value(db, "SELECT count(*) FROM demand_history WHERE origin_key <> 'late.example:443'")).toBe(0);
    db.close();
    store.close();
  });

  it("the timer's run and two flush() calls waiting for the same slice hand the store thread one slice at a time: all of them go on to the end", async () => {
    const store = StateStore.open(dir, { now });
    const resolved: number[] = [];
    useFakeClock();
    try {
      store.startAutoFlush(20);
      for (let origin = 0; origin < 2000; origin++) store.recordConnect(`w${origin}.example:443`, 5);
      // The timer's first slice is in flight (at most 500 statements: 2000 origins take several).
      vi.advanceTimersByTime(20);
      for (let call = 0; call < 2; call++) void store.flush().then(() => resolved.push(call));
      await ticks(store, 1);
      // Each waited for the slice in flight and then handed its own over: one handed over while another's was in
      // flight never heard of it, and the flush() or the timer's run waiting for it waited for good.
      await vi.waitFor(() => expect(resolved).toHaveLength(2), { timeout: 10_000 });
      expect(store.pendingOrigins).toBe(0);
      expect(store.originCount).toBe(2000);
      // The timer's runs go on: the next tick writes what is recorded next.
      store.recordConnect('next.example:443', 5);
      await ticks(store, 1);
      expect(store.pendingOrigins).toBe(0);
    } finally {
      vi.useRealTimers();
    }
    store.close();
  });

  it('an origin recorded again while the store thread commits its slice is written once more: nothing lost, nothing counted twice', async () => {
    const store = StateStore.open(dir, { now });
    await store.checkpointerReady();
    useFakeClock();
    try {
      store.startAutoFlush(20);
      store.recordAcquire('again.example:443', { hit: false }, 1000);
      store.recordConnect('again.example:443', 10);
      vi.advanceTimersByTime(20);
      // The tick's slice is in flight: these go to the record, apart from it.
      store.recordAcquire('again.example:443', { hit: true }, 1000);
      store.recordConnect('again.example:443', 20);
      expect(store.pendingOrigins).toBe(1);
      await store.idle();
      expect(store.origin('again.example:443')).toMatchObject({ acquires: 1, hits: 0, misses: 1, connectMsAvg: 10 });
      expect(store.pendingOrigins).toBe(1);
      await ticks(store, 1);
    } finally {
      vi.useRealTimers();
    }
    expect(store.pendingOrigins).toBe(0);
    const record = store.origin('again.example:443');
    expect(record).toMatchObject({ acquires: 2, hits: 1, misses: 1 });
    expect(record?.connectMsAvg).toBeCloseTo(10 * 0.8 + 20 * 0.2, 10);
    store.close();
  });

  it('a slice the store thread fails to commit (the file locked) is pending again, what was recorded meanwhile merged after it', async () => {
    const failing: unknown[] = [];
    const store = StateStore.open(dir, { now, onFlushFailing: (info) => failing.push(info) });
    await store.checkpointerReady();
    const other = openDatabase(join(dir, 'sockpool.sqlite'));
    useFakeClock();
    try {
      store.startAutoFlush(20);
      store.recordAcquire('merged.example:443', { hit: false }, 1000);
      store.recordConnect('merged.example:443', 10);
      store.recordConnect('merged.example:443', 30);
      other.exec('PRAGMA busy_timeout = 0; BEGIN IMMEDIATE');
      vi.advanceTimersByTime(20);
      clock += MINUTE;
      store.recordAcquire('merged.example:443', { hit: true }, 1000);
      store.recordConnect('merged.example:443', 50);
      await store.idle();
      await nextTurn();
      expect(failing).toHaveLength(1);
      expect(store.pendingOrigins).toBe(1);
      expect(store.pendingDemandEntries).toBe(2);
      expect(store.originCount).toBe(0);
      other.exec('ROLLBACK');
      await ticks(store, 1);
    } finally {
      vi.useRealTimers();
    }
    const record = store.origin('merged.example:443');
    expect(record).toMatchObject({ acquires: 2, hits: 1, misses: 1 });
    // The EWMA over 10, 30, 50 in that order, as one record of them would give.
    expect(record?.connectMsAvg).toBeCloseTo((10 * 0.8 + 30 * 0.2) * 0.8 + 50 * 0.2, 10);
    const db = reader(dir);
    expect(
      column(db, "SELECT acquires FROM demand_history WHERE origin_key = 'merged.example:443' ORDER BY minute"),
    ).toEqual([1, 1]);
    db.close();
    other.close();
    store.close();
  });

  it('a lifetime learned while the store thread commits the eviction of its origin is kept, and written with its record', async () => {
    // The eviction's pick is prepared before its commit now: what is recorded in between must not be undone by it.
    const store = StateStore.open(dir, { now, maxOrigins: 20 });
    for (let origin = 0; origin < 12; origin++) {
      clock += 1000;
      store.recordConnect(`o${origin}.example:443`, 5);
    }
    await store.flush();
    store.configure({ maxOrigins: 10 });
    store.startAutoFlush(3_600_000);
    await store.checkpointerReady();
    // Its first slice evicts o0 and o1 (no acquire ever, the least recently seen), handed to the thread at once.
    const flushing = store.flush();
    store.recordIdleLifetime('o0.example:443', 7000);
    await flushing;
    expect(store.origin('o0.example:443')).toBeUndefined();
    expect(store.learnedIdleLifetime('o0.example:443')).toBe(7000);
    await store.flush();
    expect(store.origin('o0.example:443')?.learnedIdleLifetimeMs).toBe(7000);
    store.close();
  });

  it("no slice hands the store thread more than SLICE_WRITES_MAX statements: the eviction's and the prune's neither", async () => {
    const sizes: Array<{ statements: number; evicted: number }> = [];
    const store = StateStore.open(dir, {
      now,
      maxOrigins: 2000,
      onSlice: (timing) => sizes.push({ statements: timing.statements, evicted: timing.evicted }),
    });
    for (let origin = 0; origin < 1600; origin++) store.recordAcquire(`s${origin}.example:443`, { hit: false }, 1000);
    await store.flush();
    store.configure({ maxOrigins: 100 });
    store.startAutoFlush(3_600_000);
    await store.checkpointerReady();
    sizes.length = 0;
    await store.flush();
    expect(store.originCount).toBe(100);
    expect(sizes.some(({ evicted }) => evicted > 0)).toBe(true);
    // Thirty-one days on: the prune deletes the demand minutes of the 100 left, then the origins.
    clock += 31 * 24 * HOUR;
    await store.flush();
    expect(store.originCount).toBe(0);
    expect(Math.max(...sizes.map(({ statements }) => statements))).toBeLessThanOrEqual(SLICE_WRITES_MAX);
    store.close();
  });

  /**
   * A store of one origin at most whose file another connection holds locked, and a flush of x (taught a lifetime of
   * 30 s) handed to the store thread at once: it fails.
   */
  async function lockedFlushOfX() {
    const store = StateStore.open(dir, { now, maxOrigins: 1 });
    store.startAutoFlush(3_600_000);
    await store.checkpointerReady();
    const other = openDatabase(join(dir, 'sockpool.sqlite'));
    other.exec('PRAGMA busy_timeout = 0; BEGIN IMMEDIATE');
    store.recordConnect('x.example:443', 5);
    store.recordIdleLifetime('x.example:443', 30_000);
    return { store, other, flushing: store.flush() };
  }

  it('a slice that fails while its record was dropped at the bound and made anew leaves the new record its lifetime', async () => {
    const { store, other, flushing } = await lockedFlushOfX();
    // The bound (1) drops x's record (written: empty now), then y's; x is recorded anew with a lifetime of its own.
    store.recordConnect('y.example:443', 5);
    store.recordIdleLifetime('x.example:443', 20_000);
    await expect(flushing).rejects.toThrow();
    expect(store.learnedIdleLifetime('x.example:443')).toBe(20_000);
    other.exec('ROLLBACK');
    other.close();
    await store.flush();
    expect(store.origin('x.example:443')?.learnedIdleLifetimeMs).toBe(20_000);
    store.close();
  });

  it('a slice that fails while its record, taught a lifetime since, was dropped at the bound leaves no lifetime the file never held', async () => {
    const { store, other, flushing } = await lockedFlushOfX();
    // x's record learns a lifetime while its slice is in flight, then the bound (1) drops it for y's.
    store.recordIdleLifetime('x.example:443', 20_000);
    store.recordConnect('y.example:443', 5);
    await expect(flushing).rejects.toThrow();
    // The file holds no row of x: nothing learned of it is kept in memory (as for any record dropped at the bound).
    expect(store.learnedIdleLifetime('x.example:443')).toBeUndefined();
    other.exec('ROLLBACK');
    other.close();
    store.close();
  });

  it("close() with a ranking's slice in flight asks the store thread for no checkpoint ahead of its own slices", async () => {
    // A checkpoint syncs the database file: on a slow disk, one asked for at the stop held the thread, and the close's
    // slices behind it, up to the budget. The close of the thread's connection checkpoints what is left anyway.
    const store = StateStore.open(dir, { now });
    store.startAutoFlush(3_600_000);
    await store.checkpointerReady();
    store.recordAcquire('first.example:443', { hit: false }, 1000);
    // Its slice (the last: a checkpoint is asked for once it is committed) is handed to the thread at once.
    const ranking = store.topOrigins(10);
    store.recordAcquire('second.example:443', { hit: false }, 1000);
    expect(store.close()).toBe(0);
    expect(await ranking).toEqual([]);
    await store.threadEnded();
    await nextTurn();
    expect(store.checkpoints.count).toBe(0);
    const db = reader(dir);
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(2);
    db.close();
  });

  it('a ranking waiting for a slice in flight ranks with none in flight: never with the counts of a slice still uncommitted', async () => {
    // Found in review: the ranking waited for the slice in flight, but a flush() waiting for the same slice handed the
    // next one (an eviction) before the ranking read: ranked on counts that slice had lowered already, the rows it was
    // evicting were ranked as kept.
    const store = StateStore.open(dir, { now, maxOrigins: 1000 });
    for (let origin = 0; origin < 400; origin++) {
      clock += 1000;
      store.recordAcquire(`r${origin}.example:443`, { hit: false }, 1000);
    }
    await store.flush();
    store.configure({ maxOrigins: 100 });
    store.startAutoFlush(3_600_000);
    await store.checkpointerReady();
    // The first eviction slice (250 rows: SLICE_WRITES_MAX) in flight; the ranking and a second flush() wait for it.
    const first = store.flush();
    const ranking = store.topOrigins(1000);
    const second = store.flush();
    const ranked = await ranking;
    await Promise.all([first, second]);
    expect(store.originCount).toBe(100);
    expect(ranked).toHaveLength(100);
    expect(ranked.every(({ originKey }) => store.origin(originKey) !== undefined)).toBe(true);
    store.close();
  });
});

describe("the prune's picks", () => {
  const ORIGINS = 600;
  /** The i-th origin's key: the keys' order is the reverse of the origins' (i) order of time. */
  const keyOf = (index: number) => `o${String(ORIGINS - 1 - index).padStart(3, '0')}.example:443`;

  /**
   * A state file holding ORIGINS origins, each with a time of its own in `kind`'s order: unseen past the retention
   * (origins), demand past the history (demand), or seen ahead of the clock (future). Written straight into the file,
   * so that the store's first slice prunes (DELETE_BATCH of them: one batch).
   */
  function historyToPrune(stateDir: string, kind: 'origins' | 'demand' | 'future'): void {
    StateStore.open(stateDir, { now }).close();
    const db = openDatabase(join(stateDir, 'sockpool.sqlite'));
    const insertOrigin = statement(
      db,
      'INSERT INTO origins (origin_key, host, port, first_seen, last_seen, acquires) VALUES (?, ?, 443, ?, ?, 1)',
    );
    const insertDemand = statement(db, 'INSERT INTO demand_history (origin_key, minute, acquires) VALUES (?, ?, 1)');
    db.transaction(() => {
      for (let index = 0; index < ORIGINS; index++) {
        const seen = {
          origins: clock - 31 * 24 * HOUR + index * 1000,
          demand: clock,
          future: clock + 24 * HOUR + index * 1000,
        }[kind];
        insertOrigin.run(keyOf(index), keyOf(index).replace(/:443$/, ''), seen, seen);
        if (kind === 'demand') insertDemand.run(keyOf(index), Math.floor((clock - 8 * 24 * HOUR) / MINUTE) + index);
      }
    })();
    db.close();
  }

  /**
   * Opens the store as StateStore.open does, its connection set to scan in reverse wherever a SELECT has no ORDER BY
   * (SQLite's reverse_unordered_selects, there to find code that relies on an order SQL does not promise).
   */
  function openScanningInReverse(stateDir: string): StateStore {
    const prepare = Database.prototype.prepare;
    const reversed = new WeakSet<object>();
    Database.prototype.prepare = function (this: Database.Database, ...args: Parameters<typeof prepare>) {
      if (!reversed.has(this)) {
        reversed.add(this);
        this.pragma('reverse_unordered_selects = ON');
      }
      return prepare.apply(this, args);
    } as typeof prepare;
    try {
      return StateStore.open(stateDir, { now });
    } finally {
      Database.prototype.prepare = prepare;
    }
  }

  /** What of `kind`'s history is left to prune after the store's first slice (one batch): the origins' indexes. */
  function leftAfterOneBatch(kind: 'origins' | 'demand' | 'future', reverse: boolean): number[] {
    const stateDir = mkdtempSync(join(dir, `${kind}-`));
    historyToPrune(stateDir, kind);
    const store = reverse ? openScanningInReverse(stateDir) : StateStore.open(stateDir, { now });
    // No time for a second batch.
    expect(store.flushSlice(0)).toBe(true);
    store.close();
    const db = reader(stateDir);
    const left = column(
      db,
      {
        origins: 'SELECT origin_key FROM origins',
        demand: 'SELECT origin_key FROM demand_history',
        future: 'SELECT origin_key FROM origins WHERE last_seen > ?',
      }[kind],
      ...(kind === 'future' ? [clock] : []),
    );
    db.close();
    return (left as string[]).map((key) => ORIGINS - 1 - Number(key.slice(1, 4))).sort((a, b) => a - b);
  }

  it('each pick with an OFFSET has an ORDER BY that an index range scan gives: no sort (EXPLAIN QUERY PLAN)', () => {
    const picks: string[] = [];
    const prepare = Database.prototype.prepare;
    Database.prototype.prepare = function (this: Database.Database, ...args: Parameters<typeof prepare>) {
      if (/\bOFFSET\b/.test(args[0])) picks.push(args[0].replace(/\s+/g, ' ').trim());
      return prepare.apply(this, args);
    } as typeof prepare;
    try {
      StateStore.open(dir, { now }).close();
    } finally {
      Database.prototype.prepare = prepare;
    }
    // The prune's three and the eviction's three.
    expect(picks).toHaveLength(6);
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    for (const sql of picks) {
      expect(sql, 'ordered').toMatch(/ORDER BY [^()]*origin_key LIMIT/);
      const parameters = Array.from(sql.matchAll(/\?/g), () => 1);
      const plan = statement(db, `EXPLAIN QUERY PLAN ${sql}`)
        .all(...parameters)
        .map((step) => (step as { detail: string }).detail);
      expect({ sql, plan: plan.filter((step) => /TEMP B-TREE|^SCAN/.test(step)) }).toEqual({ sql, plan: [] });
    }
    db.close();
  });

  it('take the same rows whatever order SQLite scans in (reverse_unordered_selects): the oldest first', () => {
    const newest = Array.from({ length: ORIGINS - 500 }, (_, index) => 500 + index).join(',');
    const left: string[] = [];
    const expected: string[] = [];
    for (const kind of ['origins', 'demand', 'future'] as const) {
      for (const reverse of [false, true]) {
        const indexes = leftAfterOneBatch(kind, reverse);
        // As one line each: the first and last left, and whether they are the newest.
        left.push(
          `${kind} ${reverse ? 'reversed' : 'in order'}: ${indexes[0]}..${indexes.at(-1)} ${indexes.join(',') === newest}`,
        );
        expected.push(`${kind} ${reverse ? 'reversed' : 'in order'}: 500..${ORIGINS - 1} true`);
      }
    }
    // Before: a reversed scan picked the newest (the picks had no ORDER BY: their OFFSETs relied on the order SQLite
    // happens to scan in).
    expect(left).toEqual(expected);
  });
});

describe('learned idle lifetime', () => {
  it('forgets the learned lifetime of an origin pruned for being unseen, as of one evicted', async () => {
    const store = StateStore.open(dir, { now, originRetentionDays: 30, demandHistoryDays: 7 });
    store.recordConnect('gone.example:443', 5);
    store.recordIdleLifetime('gone.example:443', 30_000);
    await store.flush();
    clock += 31 * 24 * HOUR;
    store.recordConnect('here.example:443', 5);
    await store.flush(); // prunes: gone.example was not seen for 31 days
    expect(store.origin('gone.example:443')).toBeUndefined();
    // Kept in memory for good it was a leak (a crawler meets millions of origins), and came back with the origin.
    expect(store.learnedIdleLifetime('gone.example:443')).toBeUndefined();
    store.close();
  });

  it("a pending record dropped at the bound sets the lifetime back to its row's, not forgotten until a restart", async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 1 });
    store.recordConnect('kept.example:443', 5);
    store.recordIdleLifetime('kept.example:443', 30_000);
    await store.flush();
    store.recordIdleLifetime('kept.example:443', 20_000);
    // The bound (maxOrigins, 1) drops kept.example's record, and then fresh.example's, which never had a row.
    store.recordIdleLifetime('fresh.example:443', 40_000);
    store.recordConnect('other.example:443', 5);
    expect(store.pendingOrigins).toBe(1);
    expect(store.origin('kept.example:443')?.learnedIdleLifetimeMs).toBe(30_000);
    expect(store.learnedIdleLifetime('kept.example:443')).toBe(30_000);
    expect(store.learnedIdleLifetime('fresh.example:443')).toBeUndefined();
    store.close();
  });

  it('drops at once to a shorter observation, rises slowly, and survives a restart', () => {
    let store = open();
    const key = 'idle.example:443';
    expect(store.learnedIdleLifetime(key)).toBeUndefined();
    store.recordIdleLifetime(key, 30_000);
    expect(store.learnedIdleLifetime(key)).toBe(30_000); // in memory, before any flush
    store.recordIdleLifetime(key, 12_000);
    expect(store.learnedIdleLifetime(key)).toBe(12_000);
    store.recordIdleLifetime(key, 40_000);
    expect(store.learnedIdleLifetime(key)).toBe(14_800); // 12000 + (40000 - 12000) / 10
    store.recordIdleLifetime(key, Number.NaN);
    store.recordIdleLifetime(key, -5);
    expect(store.learnedIdleLifetime(key)).toBe(14_800);
    store.close();

    store = open();
    expect(store.learnedIdleLifetime(key)).toBe(14_800);
    expect(store.origin(key)?.learnedIdleLifetimeMs).toBe(14_800);
    store.close();
  });
  it('forgets, once, the lifetimes under 1 s that older versions saved (a client keeping a copy taught 250 ms)', () => {
    // A file written before the fix: schema 2, lifetimes learned from sockets a client had ended early.
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    migrate(db, MIGRATIONS.slice(0, 2));
    const insert = statement(
      db,
      `INSERT INTO origins (origin_key, host, port, first_seen, last_seen, learned_idle_lifetime_ms)
       VALUES (?, 'h', 443, ?, ?, ?)`,
    );
    insert.run('poisoned.example:443', clock, clock, 250);
    insert.run('under.example:443', clock, clock, 999);
    insert.run('short.example:443', clock, clock, 1000);
    insert.run('real.example:443', clock, clock, 60_000);
    insert.run('unknown.example:443', clock, clock, null);
    db.close();

    let store = open();
    // Relearned from the first idle socket the server closes; until then idle sockets are kept to idleTtlMs.
    expect(store.learnedIdleLifetime('poisoned.example:443')).toBeUndefined();
    expect(store.origin('poisoned.example:443')?.learnedIdleLifetimeMs).toBeNull();
    expect(store.learnedIdleLifetime('under.example:443')).toBeUndefined();
    expect(store.learnedIdleLifetime('short.example:443')).toBe(1000);
    expect(store.learnedIdleLifetime('real.example:443')).toBe(60_000);
    expect(store.origin('unknown.example:443')?.learnedIdleLifetimeMs).toBeNull();
    // Once: a short lifetime this version learned (from sockets no client had) stays across restarts.
    store.recordIdleLifetime('poisoned.example:443', 300);
    store.close();
    store = open();
    expect(store.learnedIdleLifetime('poisoned.example:443')).toBe(300);
    store.close();
  });
});

describe('crash durability', () => {
  const children: ChildProcess[] = [];
  afterEach(() => {
    for (const child of children) child.kill('SIGKILL');
  });

  function startChild(mode: 'flush' | 'auto' | 'churn' | 'control'): ChildProcess {
    const child = spawnChild(
      process.execPath,
      ['--import', join(repo, 'test/fixtures/register-ts.mjs'), join(repo, 'test/fixtures/store-child.ts'), dir, mode],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.push(child);
    return child;
  }

  /** Runs the fixture child until it prints "ready", then kills it with SIGKILL. */
  async function runAndKill(mode: 'flush' | 'auto'): Promise<void> {
    const child = startChild(mode);
    let stderr = '';
    child.stderr?.on('data', (chunk) => {
      stderr += chunk;
    });
    await new Promise<void>((ready, fail) => {
      child.stdout?.on('data', (chunk: Buffer) => {
        if (chunk.toString().includes('ready')) ready();
      });
      child.once('exit', (code) => fail(new Error(`child exited (${code}) before ready: ${stderr}`)));
    });
    const exited = new Promise((done) => child.once('exit', (_code, signal) => done(signal)));
    child.kill('SIGKILL');
    expect(await exited).toBe('SIGKILL');
  }

  /** Runs the fixture child to its end: exit code, signal, output. */
  async function runToEnd(mode: 'churn' | 'control') {
    const child = startChild(mode);
    let output = '';
    child.stdout?.on('data', (chunk) => {
      output += chunk;
    });
    child.stderr?.on('data', (chunk) => {
      output += chunk;
    });
    const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((done) =>
      child.once('exit', (exitCode, exitSignal) => done([exitCode, exitSignal])),
    );
    return { code, signal, output };
  }

  it('survives the GC collecting better-sqlite3 objects (12.x aborted here on Node >= 24.19; 13 fixed it)', async () => {
    // The control leaves Database and Statement objects to the GC under pressure, as better-sqlite3 12 could not.
    // (Two independent children, run side by side: the control uses an in-memory database.)
    const [control, churn] = await Promise.all([runToEnd('control'), runToEnd('churn')]);
    expect(control, control.output).toMatchObject({ code: 0, signal: null });
    expect(churn, churn.output).toMatchObject({ code: 0, signal: null });
    expect(churn.output).toContain('done');
  });

  it('keeps what was flushed before a SIGKILL and loses only what was not', async () => {
    await runAndKill('flush');
    expect(existsSync(join(dir, 'sockpool.sqlite-wal'))).toBe(true); // never checkpointed: the data is in the WAL
    const store = StateStore.open(dir);
    expect(store.origin('flushed.example:443')).toMatchObject({ acquires: 5, hits: 3, misses: 2, connectMsAvg: 12 });
    expect(store.learnedIdleLifetime('flushed.example:443')).toBe(15_000);
    expect(store.origin('never-flushed.example:443')).toBeUndefined();
    store.close();
  });

  it('keeps what the auto-flush timer wrote before a SIGKILL', async () => {
    await runAndKill('auto');
    const store = StateStore.open(dir);
    expect(store.origin('auto.example:80')?.acquires).toBe(7);
    store.close();
  });
});

describe('migrations', () => {
  it('migrates a file at an older version (0: created by something else, no tables)', () => {
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    db.exec('CREATE TABLE unrelated (x INTEGER)');
    db.exec('INSERT INTO unrelated VALUES (42)');
    expect(value(db, 'PRAGMA user_version')).toBe(0);
    db.close();

    const store = open();
    store.recordAcquire('example.com:443', { hit: true });
    store.close();
    const after = reader(dir);
    expect(value(after, 'PRAGMA user_version')).toBe(MIGRATIONS.length);
    expect(value(after, 'SELECT x FROM unrelated')).toBe(42);
    expect(value(after, 'SELECT acquires FROM origins')).toBe(1);
    after.close();
  });

  it('runs each pending migration once, in order, keeping the data', () => {
    const store = open();
    store.recordAcquire('kept.example:443', { hit: false });
    store.close();

    const later = [...MIGRATIONS, 'ALTER TABLE origins ADD COLUMN note TEXT', "UPDATE origins SET note = 'v' || 3"];
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    expect(migrate(db, later)).toEqual({ from: MIGRATIONS.length, to: MIGRATIONS.length + 2 });
    expect(value(db, 'PRAGMA user_version')).toBe(MIGRATIONS.length + 2);
    expect(statement(db, 'SELECT origin_key, acquires, note FROM origins').get()).toEqual({
      origin_key: 'kept.example:443',
      acquires: 1,
      note: 'v3',
    });
    expect(migrate(db, later)).toEqual({ from: MIGRATIONS.length + 2, to: MIGRATIONS.length + 2 }); // nothing to do
    db.close();
  });

  it('gives a file of the first schema (older sockpoold) the eviction index, and evicts rows without demand first', async () => {
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    migrate(db, MIGRATIONS.slice(0, 1));
    const insert = statement(
      db,
      'INSERT INTO origins (origin_key, host, port, first_seen, last_seen, acquires) VALUES (?, ?, 443, ?, ?, ?)',
    );
    insert.run('used.example:443', 'used.example', clock - 2000, clock - 2000, 5);
    insert.run('prewarmed.example:443', 'prewarmed.example', clock - 1000, clock - 1000, 0);
    db.close();
    const store = StateStore.open(dir, { now, maxOrigins: 2 });
    store.recordAcquire('new.example:443', { hit: false });
    await store.flush();
    const after = reader(dir);
    expect(column(after, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'origins'")).toContain(
      'origins_eviction',
    );
    expect(column(after, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'new.example:443',
      'used.example:443',
    ]);
    after.close();
    store.close();
  });

  it('opens a file of an older schema while another process holds its write lock: the history is read, the migrations wait', () => {
    // The first start after an upgrade, with a backup tool (or an operator's sqlite3 shell) writing: the migrations
    // cannot run, and the start must not fail for it (a locked file fails neither the start nor the stop).
    const path = join(dir, 'sockpool.sqlite');
    const db = openDatabase(path);
    db.exec('PRAGMA journal_mode = WAL');
    migrate(db, MIGRATIONS.slice(0, 1));
    statement(
      db,
      'INSERT INTO origins (origin_key, host, port, first_seen, last_seen, acquires) VALUES (?, ?, 443, ?, ?, ?)',
    ).run('used.example:443', 'used.example', clock, clock, 5);
    db.close();
    const other = openDatabase(path);
    other.exec('BEGIN IMMEDIATE');
    const told: unknown[] = [];
    try {
      const store = StateStore.open(dir, { now, onMigrationDeferred: (info) => told.push(info) });
      expect(store.origin('used.example:443')?.acquires).toBe(5);
      // Said once, with the migration that waits and why: the daemon logs it (it used to wait in silence).
      expect(told).toEqual([
        { path, version: 1, migration: 2, newest: MIGRATIONS.length, err: expect.stringMatching(/locked/) },
      ]);
      // (Its last flush fails under the lock, as at the daemon's stop, which logs it: closed all the same.)
      store.recordConnect('pending.example:443', 5);
      expect(() => store.close()).toThrow(/locked/);
    } finally {
      other.exec('ROLLBACK');
    }
    // The next start without the lock migrates, and has nothing to say.
    StateStore.open(dir, { now, onMigrationDeferred: (info) => told.push(info) }).close();
    expect(told).toHaveLength(1);
    const after = reader(dir);
    expect(value(after, 'PRAGMA user_version')).toBe(MIGRATIONS.length);
    after.close();
  });

  it('gives a file of schema 3 (older sockpoold) the holder column: its rows are one holder, a uid holding fewer keeps its own', async () => {
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    migrate(db, MIGRATIONS.slice(0, 3));
    const insert = statement(
      db,
      'INSERT INTO origins (origin_key, host, port, first_seen, last_seen, acquires) VALUES (?, ?, 443, ?, ?, 1)',
    );
    for (let origin = 0; origin < 4; origin++) {
      insert.run(`old${origin}.example:443`, `old${origin}.example`, clock + origin, clock + origin);
    }
    db.close();
    clock += 1000;
    const store = StateStore.open(dir, { now, maxOrigins: 4 });
    expect(store.originCount).toBe(4);
    store.recordAcquire('new0.example:443', { hit: false }, 1000);
    await store.flush();
    clock += 1000;
    store.recordAcquire('new1.example:443', { hit: false }, 1000);
    await store.flush();
    const after = reader(dir);
    expect(value(after, 'PRAGMA user_version')).toBe(MIGRATIONS.length);
    expect(column(after, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'origins'")).toContain(
      'origins_uid_eviction',
    );
    // The older rows (uids never known) hold 3, the uid 1: the next eviction is theirs, though the uid's is older.
    expect(column(after, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'new0.example:443',
      'new1.example:443',
      'old2.example:443',
      'old3.example:443',
    ]);
    expect(value(after, "SELECT uid FROM origins WHERE origin_key = 'old3.example:443'")).toBeNull();
    clock += 1000;
    store.recordAcquire('new2.example:443', { hit: false }, 1000);
    await store.flush();
    expect(column(after, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'new1.example:443',
      'new2.example:443',
      'old2.example:443',
      'old3.example:443',
    ]);
    after.close();
    store.close();
  });

  it('keeps writing a file whose holder column waits for its migration (a lock at start): the least recently seen go first', async () => {
    const path = join(dir, 'sockpool.sqlite');
    const db = openDatabase(path);
    db.exec('PRAGMA journal_mode = WAL');
    migrate(db, MIGRATIONS.slice(0, 3));
    db.close();
    const other = openDatabase(path);
    other.exec('BEGIN IMMEDIATE');
    const told: unknown[] = [];
    const store = StateStore.open(dir, { now, maxOrigins: 2, onMigrationDeferred: (info) => told.push(info) });
    other.exec('ROLLBACK');
    expect(told).toEqual([{ path, version: 3, migration: 4, newest: MIGRATIONS.length, err: expect.any(String) }]);
    for (let origin = 0; origin < 4; origin++) {
      clock += 1000;
      store.recordAcquire(`o${origin}.example:443`, { hit: false }, 1000 + origin);
      await store.flush();
    }
    expect((await store.topOrigins(5)).map((entry) => entry.originKey)).toEqual(['o3.example:443', 'o2.example:443']);
    store.close();
    const after = reader(dir);
    expect(column(after, 'SELECT origin_key FROM origins ORDER BY origin_key')).toEqual([
      'o2.example:443',
      'o3.example:443',
    ]);
    after.close();
    // The next start migrates.
    StateStore.open(dir, { now }).close();
    const migrated = reader(dir);
    expect(value(migrated, 'PRAGMA user_version')).toBe(MIGRATIONS.length);
    migrated.close();
  });

  it('rolls back a migration that fails, leaving the version where it was', () => {
    open().close();
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    const broken = [...MIGRATIONS, 'ALTER TABLE origins ADD COLUMN half INTEGER; SELECT * FROM no_such_table'];
    expect(() => migrate(db, broken)).toThrow(/no_such_table/);
    expect(value(db, 'PRAGMA user_version')).toBe(MIGRATIONS.length);
    const columns = column(db, 'SELECT name FROM pragma_table_info(?)', 'origins');
    expect(columns).not.toContain('half');
    db.close();
  });

  it('refuses a file from a newer sockpoold without touching it', () => {
    const db = openDatabase(join(dir, 'sockpool.sqlite'));
    db.exec(`PRAGMA user_version = ${MIGRATIONS.length + 5}`);
    db.close();
    let caught: unknown;
    try {
      open();
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(SockpoolError);
    expect((caught as SockpoolError).code).toBe(ErrorCodes.CONFIG);
    expect((caught as SockpoolError).message).toMatch(/schema version \d+ is newer than this sockpoold knows/);
    const after = reader(dir);
    expect(value(after, 'PRAGMA user_version')).toBe(MIGRATIONS.length + 5);
    after.close();
  });
});

describe('topOrigins', () => {
  it('ranks by recent demand, each acquire halved every 6 hours of age', async () => {
    const store = open();
    const start = clock;
    // heavy.example: 1000 acquires three days ago (weight 2^-12 each: score about 0.24).
    clock = start - 72 * HOUR;
    for (let index = 0; index < 1000; index++) store.recordAcquire('heavy.example:443', { hit: true });
    store.recordIdleLifetime('heavy.example:443', 9_000);
    await store.flush();
    // recent.example: 50 an hour ago (score about 44.5); light.example: 10 now (score 10).
    clock = start - HOUR;
    for (let index = 0; index < 50; index++) store.recordAcquire('recent.example:443', { hit: true });
    clock = start;
    for (let index = 0; index < 10; index++) store.recordAcquire('[2001:db8::1]:8443', { hit: false });
    // Not host:port: kept, never proposed for warming.
    store.recordAcquire('not-an-origin', { hit: false });

    const top = await store.topOrigins(10); // includes what was not flushed yet
    expect(top.map((entry) => entry.originKey)).toEqual([
      'recent.example:443',
      '[2001:db8::1]:8443',
      'heavy.example:443',
    ]);
    expect(top[0]?.score).toBeCloseTo(50 * 2 ** (-1 / 6), 6);
    expect(top[1]).toMatchObject({ host: '2001:db8::1', port: 8443, score: 10 });
    expect(top[2]?.score).toBeCloseTo(1000 * 2 ** -12, 6);
    expect(top[2]).toMatchObject({ host: 'heavy.example', port: 443, learnedIdleLifetimeMs: 9_000 });
    expect(top[0]?.demandRatePerS).toBeGreaterThan(0);

    expect((await store.topOrigins(1)).map((entry) => entry.originKey)).toEqual(['recent.example:443']);
    expect(await store.topOrigins(0)).toEqual([]);
    store.close();
  });

  it("takes each uid's busiest origins in turn: one uid's many busy origins do not take every place", async () => {
    // warmFromHistory warms the first warmOnStartOrigins of this list and spends pool.warmOnStartSockets in its
    // order: ranked by score alone, one uid's busiest origins took all of both.
    const A = 1000;
    const B = 1001;
    const store = open();
    for (let origin = 0; origin < 10; origin++) {
      for (let index = 0; index < 100 - origin; index++)
        store.recordAcquire(`a${origin}.example:443`, { hit: false }, A);
    }
    for (let index = 0; index < 5; index++) store.recordAcquire('b0.example:443', { hit: false }, B);
    for (let index = 0; index < 3; index++) store.recordAcquire('b1.example:443', { hit: false }, B);
    expect((await store.topOrigins(5)).map((entry) => entry.originKey)).toEqual([
      'a0.example:443',
      'b0.example:443',
      'a1.example:443',
      'b1.example:443',
      'a2.example:443',
    ]);
    expect((await store.topOrigins(5))[1]?.score).toBe(5);
    store.close();
  });

  it('replays a demand rate halved for every 6 hours since it was last seen (a burst a day ago is not demand now)', async () => {
    const store = open();
    for (let index = 0; index < 600; index++) store.recordAcquire('burst.example:443', { hit: false });
    await store.flush();
    const stored = store.origin('burst.example:443')!.demandRatePerS;
    expect(stored).toBeCloseTo(10, 6); // 600 acquires over the 60 s window
    expect((await store.topOrigins(1))[0]?.demandRatePerS).toBeCloseTo(stored, 6); // a restart right after: all of it
    clock += 12 * HOUR;
    expect((await store.topOrigins(1))[0]?.demandRatePerS).toBeCloseTo(stored / 4, 6);
    clock += 12 * HOUR;
    expect((await store.topOrigins(1))[0]?.demandRatePerS).toBeCloseTo(stored / 16, 6);
    expect(store.origin('burst.example:443')!.demandRatePerS).toBe(stored); // the stored value is left as it was
    store.close();
  });

  it('forgets demand older than the history window', async () => {
    const store = StateStore.open(dir, { now, demandHistoryDays: 1 });
    clock -= 2 * 24 * HOUR;
    store.recordAcquire('old.example:443', { hit: true });
    await store.flush();
    clock += 2 * 24 * HOUR;
    store.recordAcquire('new.example:443', { hit: true });
    expect((await store.topOrigins(10)).map((entry) => entry.originKey)).toEqual(['new.example:443']);
    // Pruned from the table too, by the timer's next flush (the ranking leaves pruning to it: it counts none of that).
    while (store.flushSlice()) {}
    const db = reader(dir);
    expect(value(db, "SELECT count(*) FROM demand_history WHERE origin_key = 'old.example:443'")).toBe(0);
    db.close();
    store.close();
  });
  it('a clock that ran ahead and was set back: what it stamped neither outranks real demand nor outlives the cap', async () => {
    const store = StateStore.open(dir, { now, maxOrigins: 2 });
    const right = clock;
    // A year ahead (a wrong RTC at boot, until NTP steps the clock back): one acquire of future.example.
    clock = right + 365 * 24 * HOUR;
    store.recordAcquire('future.example:443', { hit: false });
    await store.flush();
    // Set right: a store opened now (the next start) sees real demand for busy.example.
    store.close();
    clock = right;
    const again = StateStore.open(dir, { now, maxOrigins: 2 });
    await again.flush(); // a start's first flush (before its warm-on-start ranking)
    clock += MINUTE;
    for (let index = 0; index < 100; index++) again.recordAcquire('busy.example:443', { hit: false });
    // One acquire stamped a year ahead weighed 2^1460 (Infinity) and came first at every start for a year.
    expect((await again.topOrigins(2)).map((entry) => entry.originKey)).toEqual(['busy.example:443']);
    // And it was the most recently seen for a year: the least recently seen real origins went before it.
    clock += MINUTE;
    again.recordAcquire('next.example:443', { hit: false });
    await again.flush();
    expect(again.origin('busy.example:443')).toBeDefined();
    expect(again.origin('future.example:443')).toBeUndefined();
    again.close();
  });

  it('ranks what a start finds over the cap without waiting for its eviction, leaving out the rows it takes, and evicts them after in slices that yield the event loop', async () => {
    // A file of far more rows than maxOrigins: a stop writes what is pending without evicting (close()), up to
    // maxOrigins new origins, and a lower cap (another configuration) leaves the same. The ranking waited for their
    // eviction, and warm-on-start and READY with it, for as long as it took (about 1.5 s for 100,000 rows).
    const A = 1000;
    const B = 1001;
    const C = 1002;
    const start = clock;
    const building = StateStore.open(dir, { now, maxOrigins: 20_000 });
    // A's busiest origin is its least recently seen: the eviction takes it, so no ranking may offer it.
    for (let index = 0; index < 100; index++) building.recordAcquire('a-old.example:443', { hit: false }, A);
    clock += MINUTE;
    for (let origin = 0; origin < 9_499; origin++) building.recordAcquire(`a${origin}.example:443`, { hit: false }, A);
    // B's busiest is first of its rows seen in the same minute (by origin_key): at this cap the eviction takes B's
    // oldest too (A and B end level, one row at a time), b0 among them.
    for (let index = 0; index < 50; index++) building.recordAcquire('b0.example:443', { hit: false }, B);
    for (let origin = 1; origin < 499; origin++) building.recordAcquire(`b${origin}.example:443`, { hit: false }, B);
    await building.flush();
    expect(building.originCount).toBe(9_999);
    building.close();
    await building.threadEnded();

    clock = start + 2 * MINUTE;
    const told: Array<{ path: string; overCap: number }> = [];
    const store = StateStore.open(dir, { now, maxOrigins: 600, onOverCapEvicted: (info) => told.push(info) });
    expect(store.originCount).toBe(9_999);
    // Recorded after the open, before the ranking (the daemon serves from before its warm-on-start).
    for (let index = 0; index < 3; index++) store.recordAcquire('fresh.example:443', { hit: false }, C);
    const db = reader(dir);
    // What another connection sees of the history at each turn of the event loop while the eviction is under way.
    const seen: number[] = [];
    let evicted = false;
    const watch = () => {
      if (evicted) return;
      seen.push(value(db, 'SELECT count(*) FROM origins') as number);
      setImmediate(watch);
    };
    // Each look at the clock 1 ms later: a slice of the eviction ends after the batch (DELETE_BATCH, 500 rows) that
    // spends its budget (SLICE_BUDGET_MS, 5 looks), so at most 2500 rows a transaction.
    let ms = 0;
    const clockOfWork = vi.spyOn(performance, 'now').mockImplementation(() => ms++);
    try {
      const ranked = await store.topOrigins(10_000);
      // Before: the ranking came once the 9,400 rows over the cap were evicted.
      expect(store.originCount, 'the rows when the ranking came').toBe(10_000);
      setImmediate(watch);
      const keys = ranked.map((entry) => entry.originKey);
      expect(keys).not.toContain('a-old.example:443');
      expect(keys).not.toContain('b0.example:443');
      expect(keys.slice(0, 1)).toEqual(['fresh.example:443']);
      expect(keys).toHaveLength(600);
      // Asked again while the eviction is under way: the same, of what is left.
      await new Promise((resolve) => setImmediate(resolve));
      expect(store.originCount).toBeLessThan(10_000);
      expect((await store.topOrigins(3)).map((entry) => entry.originKey)).toEqual(keys.slice(0, 3));
      await eventually(
        () => told.length > 0,
        () => `the eviction done: ${store.originCount} rows`,
      );
      evicted = true;
      // Exactly the rows the eviction kept, in the same order.
      expect((await store.topOrigins(10_000)).map((entry) => entry.originKey)).toEqual(keys);
    } finally {
      clockOfWork.mockRestore();
      evicted = true;
    }
    expect(told).toEqual([{ path: join(dir, 'sockpool.sqlite'), overCap: 9_400 }]);
    expect(seen.length).toBeGreaterThan(1);
    const counts = [10_000, ...seen, 600];
    for (let index = 1; index < counts.length; index++) {
      expect(counts[index - 1]! - counts[index]!).toBeLessThanOrEqual(2_500);
    }
    expect(store.origin('a-old.example:443')).toBeUndefined();
    expect(store.origin('b0.example:443')).toBeUndefined();
    expect(store.originCount).toBe(600);
    expect(value(db, 'SELECT count(*) FROM origins')).toBe(600);
    expect(value(db, "SELECT acquires FROM origins WHERE origin_key = 'fresh.example:443'")).toBe(3);
    expect(store.pendingOrigins).toBe(0);
    db.close();
    store.close();
  });

  it('ranks once what was pending when asked is written, however many new origins are recorded while it waits', async () => {
    // A client flooding new origins at the start: were the ranking to wait for nothing pending, it would wait (and
    // warm-on-start and READY with it) for as long as the flood lasts.
    const building = StateStore.open(dir, { now, maxOrigins: 5_000 });
    for (let origin = 0; origin < 5_000; origin++)
      building.recordAcquire(`old${origin}.example:443`, { hit: false }, 1000);
    await building.flush();
    building.close();
    await building.threadEnded();
    clock += MINUTE;
    const store = StateStore.open(dir, { now, maxOrigins: 100 });
    for (let index = 0; index < 5; index++) store.recordAcquire('asked.example:443', { hit: false }, 1001);
    for (let origin = 0; origin < 20; origin++) store.recordAcquire(`also${origin}.example:443`, { hit: false }, 1001);
    let flooded = 0;
    let ranked = false;
    const flood = () => {
      if (ranked) return;
      for (let origin = 0; origin < 100; origin++)
        store.recordAcquire(`flood${flooded++}.example:443`, { hit: false }, 1002);
      setImmediate(flood);
    };
    setImmediate(flood);
    // Each look at the clock 1 ms later: a slice ends after the fifth origin.
    let ms = 0;
    const clockOfWork = vi.spyOn(performance, 'now').mockImplementation(() => ms++);
    let top: Awaited<ReturnType<StateStore['topOrigins']>>;
    try {
      top = await store.topOrigins(2);
    } finally {
      clockOfWork.mockRestore();
      ranked = true;
    }
    expect(flooded).toBeGreaterThan(0);
    expect(top[0]?.originKey).toBe('asked.example:443');
    expect(store.origin('also19.example:443')?.acquires).toBe(1);
    expect(store.pendingOrigins).toBeGreaterThan(0);
    // The timer writes the flood, and evicts down to the cap.
    while (store.flushSlice()) {}
    expect(store.originCount).toBe(100);
    store.close();
  });
});

/**
 * A store-child.ts child in `mode` under a real thread limit (a pids cgroup, TasksMax=): the child lowers its own
 * RLIMIT_NPROC when told, which binds a uid other than root's (as root, the child runs as nobody, on a directory it
 * owns). Resolves once it is ready; `output` is its stdout and stderr so far.
 */
async function childUnderThreadLimit(
  mode: string,
): Promise<{ child: ReturnType<typeof spawnChild>; output: () => string }> {
  const asRoot = process.getuid?.() === 0;
  if (asRoot) chownSync(dir, 65534, 65534);
  return readyStoreChild(dir, mode, [], asRoot ? { uid: 65534, gid: 65534 } : {});
}

/**
 * A store-child.ts child in `mode` on `dir`, `nodeFlags` before the fixture, spawned with `options`. Resolves once it
 * is ready; `output` is its stdout and stderr so far.
 */
async function readyStoreChild(
  dir: string,
  mode: string,
  nodeFlags: string[],
  options: Parameters<typeof spawnChild>[2],
): Promise<{ child: ReturnType<typeof spawnChild>; output: () => string }> {
  const child = spawnChild(
    process.execPath,
    [
      ...nodeFlags,
      '--import',
      join(repo, 'test/fixtures/register-ts.mjs'),
      join(repo, 'test/fixtures/store-child.ts'),
      dir,
      mode,
    ],
    { stdio: ['pipe', 'pipe', 'pipe'], ...options },
  );
  let output = '';
  child.stdout?.on('data', (chunk) => {
    output += chunk;
  });
  child.stderr?.on('data', (chunk) => {
    output += chunk;
  });
  await eventually(
    () => output.includes('ready\n'),
    () => `the child ready: ${output}`,
    30_000,
  );
  return { child, output: () => output };
}
