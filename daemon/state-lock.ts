// One sockpoold per state directory. Two daemons on one `stateDir` (with different sockets, so the socket's own
// check never meets them) each warmed the same origins from one history and flushed their counters over each other's.
// The first daemon holds a kernel lock on `<stateDir>/sockpool.lock` for its life; a second finds it held and is
// refused (StateStore.open lets the refusal stand: no history in memory for it).
//
// The lock is SQLite's own, taken through better-sqlite3 (Node has no flock): the lock file opened as a database,
// in exclusive locking mode, with a transaction begun and never ended. SQLite takes it with fcntl (POSIX record
// locks), which the kernel drops when the process ends however it ends (SIGKILL included), so no stale lock survives
// a crash, and which SQLite also checks between connections of one process (a second store in the same process is
// refused as a second process is). Nothing is ever written: the file stays empty. The history file itself keeps its
// normal locking, so an operator's sqlite3 shell or a backup tool reads it while the daemon runs, as before.
//
// Nothing but SQLite may open the lock file in this process: closing any other fd on it would drop the process's
// POSIX locks on it (fcntl's rule). The holder's pid comes from /proc/locks, which names the file by device and inode.

import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';

const LOCK_FILE = 'sockpool.lock';

export class StateDirLock {
  readonly path: string;
  #db: Database.Database | undefined;

  private constructor(path: string, db: Database.Database) {
    this.path = path;
    this.#db = db;
  }

  /**
   * Takes the lock of `stateDir` (an existing directory), without waiting. Held by another daemon: a
   * SOCKPOOL_ERR_CONFIG without a cause (a refusal), naming the directory and, when the kernel says, the holder's
   * pid. The lock file cannot be opened or locked for another reason (a read-only directory, a full disk): a
   * SOCKPOOL_ERR_CONFIG with the SQLite error as its cause and the file as `path`.
   */
  static take(stateDir: string): StateDirLock {
    const path = join(stateDir, LOCK_FILE);
    let db: Database.Database;
    try {
      // timeout 0: a held lock answers SQLITE_BUSY at once (the default busy handler would wait 5 s for it).
      db = new Database(path, { timeout: 0 });
    } catch (error) {
      throw lockFileError(path, error);
    }
    try {
      // The journal in memory: closing the connection with its transaction open (release) otherwise wrote a rollback
      // journal and synced it and the directory, so the stop's last step waited for the disk (store.ts, close).
      db.exec('PRAGMA journal_mode = MEMORY; PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE');
    } catch (error) {
      db.close();
      if (!isBusy(error)) throw lockFileError(path, error);
      const pid = lockHolderPid(path);
      throw new SockpoolError(
        ErrorCodes.CONFIG,
        `another sockpoold is using the state directory ${stateDir} (${
          pid === undefined ? 'another process' : `pid ${pid}`
        } holds ${path})`,
        { key: 'stateDir', path: stateDir, lockFile: path, ...(pid === undefined ? {} : { pid }) },
      );
    }
    return new StateDirLock(path, db);
  }

  /** Lets the directory go (the stop, after the history's last write). Idempotent. */
  release(): void {
    this.#db?.close();
    this.#db = undefined;
  }
}

/**
 * The pid holding a POSIX lock on `path`, from /proc/locks ("1: POSIX  ADVISORY  WRITE <pid> <maj>:<min>:<inode>
 * <start> <end>", the device in hex). Undefined when the kernel does not say: no /proc, a holder in a pid namespace
 * this one cannot see (pid 0), or a file system whose stat reports another device than its locks are on (a stacked
 * one, such as overlayfs, may).
 */
function lockHolderPid(path: string): number | undefined {
  let locks: string;
  let device: string;
  try {
    const stat = statSync(path, { bigint: true });
    // glibc's encoding of st_dev; /proc/locks prints the kernel's major and minor.
    const major = ((stat.dev >> 8n) & 0xfffn) | ((stat.dev >> 32n) & ~0xfffn);
    const minor = (stat.dev & 0xffn) | ((stat.dev >> 12n) & ~0xffn);
    device = `${hex(major)}:${hex(minor)}:${stat.ino}`;
    locks = readFileSync('/proc/locks', 'utf8');
  } catch {
    return undefined;
  }
  for (const line of locks.split('\n')) {
    const fields = line.trim().split(/\s+/);
    // An entry blocked behind a lock ("1: -> POSIX ...") waits for it; it holds nothing.
    if (fields[1] !== 'POSIX' || fields[5] !== device) continue;
    const pid = Number(fields[4]);
    if (Number.isInteger(pid) && pid > 0) return pid;
  }
  return undefined;
}

function hex(value: bigint): string {
  return value.toString(16).padStart(2, '0');
}

function isBusy(error: unknown): boolean {
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' && code.startsWith('SQLITE_BUSY');
}

function lockFileError(path: string, error: unknown): SockpoolError {
  const code = (error as { code?: unknown }).code;
  return new SockpoolError(
    ErrorCodes.CONFIG,
    `${path}: cannot lock the state directory: ${(error as Error).message}`,
    { path, ...(typeof code === 'string' ? { sqliteCode: code } : {}) },
    { cause: error },
  );
}
