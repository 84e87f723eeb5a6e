// Structured logs (JSON lines on stderr, which systemd's journal keeps). One logger; modules take children.
import pino, { type Logger } from 'pino';

export type { Logger };

export function createLogger(level: string): Logger {
  return pino({ level, base: { service: 'sockpoold' } }, pino.destination({ fd: 2, sync: false }));
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
