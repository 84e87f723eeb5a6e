// Structured logs (JSON lines on stderr, which systemd's journal keeps). One logger; modules take children.

import pino, { type Logger } from 'pino';

export type { Logger };

export function createLogger(level: string): Logger {
  return pino({ level, base: { service: 'sockpoold' } }, pino.destination({ fd: 2, sync: false }));
}

/**
 * A uid's lines of one kind logged per REFUSAL_LOG_WINDOW_MS (refusals, connect failures): each one is counted in the
 * metrics all the same.
 */
export const REFUSALS_LOGGED = 50;
export const REFUSAL_LOG_WINDOW_MS = 10_000;

/**
 * Lines a client causes at its own pace (a refusal per acquire it sends): at most `burst` per `windowMs` per key (a
 * uid), so that one client cannot flood the journal (journald then drops the daemon's other lines too) or pino's
 * buffer. `take(key)` answers undefined for a line to leave out, or how many of the key's lines were left out since
 * the last one logged (the line says so).
 */
export class LogLimiter {
  readonly #burst: number;
  readonly #windowMs: number;
  readonly #now: () => number;
  readonly #keys = new Map<number, { windowStart: number; logged: number; leftOut: number }>();

  constructor(burst: number, windowMs: number, now: () => number = () => performance.now()) {
    this.#burst = burst;
    this.#windowMs = windowMs;
    this.#now = now;
  }

  take(key: number): number | undefined {
    const now = this.#now();
    let entry = this.#keys.get(key);
    if (!entry) {
      entry = { windowStart: now, logged: 0, leftOut: 0 };
      this.#keys.set(key, entry);
    } else if (now - entry.windowStart >= this.#windowMs) {
      entry.windowStart = now;
      entry.logged = 0;
    }
    if (entry.logged >= this.#burst) {
      entry.leftOut++;
      return undefined;
    }
    entry.logged++;
    const leftOut = entry.leftOut;
    entry.leftOut = 0;
    return leftOut;
  }

  /** A warning with `fields`, if `key` has a line left in its window; it says how many were left out since the last
   *  one logged (`notLogged`). */
  warn(log: Logger, key: number, fields: Record<string, unknown>, message: string): void {
    const leftOut = this.take(key);
    if (leftOut === undefined) return;
    log.warn(leftOut > 0 ? { ...fields, notLogged: leftOut } : fields, message);
  }
}

/**
 * Writes out what the logger still holds and closes its stream, before process.exit: waited for on the event loop.
 * pino would otherwise flush synchronously at exit, and sonic-boom's synchronous flush retries a write to a broken
 * pipe (EPIPE: the journal, or whoever read stderr, is gone) for ever, so a daemon told to stop would never exit.
 * Ended on the loop instead, a write that fails reports EPIPE and pino stops writing for good. At most `limitMs`.
 */
export function flushLogs(log: Logger, limitMs = 1000): Promise<void> {
  const stream = (log as unknown as Record<symbol, unknown>)[pino.symbols.streamSym] as
    | { end?: () => void; once(event: string, listener: () => void): void }
    | undefined;
  return new Promise((resolve) => {
    if (typeof stream?.end !== 'function') {
      resolve();
      return;
    }
    const timer = setTimeout(resolve, limitMs);
    const done = () => {
      clearTimeout(timer);
      resolve();
    };
    stream.once('close', done);
    stream.once('error', done);
    stream.end();
  });
}
