// Structured logs (JSON lines on stderr, which systemd's journal keeps). One logger; modules take children.
import pino, { type Logger } from 'pino';

export type { Logger };

export function createLogger(level: string): Logger {
  return pino({ level, base: { service: 'sockpoold' } }, pino.destination({ fd: 2, sync: false }));
}
