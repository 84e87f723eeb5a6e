// The relay threads of sockpoold: worker threads, each with its own event loop, that hold the warm TLS sessions and
// move their plaintext (tls-relay-thread.ts). The loop that serves acquires never touches a TLS byte, so TCP
// handoffs keep their latency while a relay is busy.
//
// open() passes a connected TCP fd to a thread (ownership passes with it) and resolves, once the handshake is done,
// with the main thread's end of a loopback TCP connection (native.loopbackPair) whose other end the thread relays:
// a socket that behaves to the pool and to curl like one connected to the origin, in plaintext. Closing that fd (or the client closing its copy) ends the session.

import { Worker } from 'node:worker_threads';
import { Gauge, type Registry } from 'prom-client';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import type { Logger } from './log.js';

/** What a handshake negotiated; sent to the client with a relayed lease. */
export interface TlsSessionInfo {
  /** 'TLSv1.3' or 'TLSv1.2'. */
  version: string;
  /** 'h2' or 'http/1.1' (http/1.1 when the server chose no protocol). */
  alpn: string;
  cipher: string;
  /** SHA-256 of the verified leaf certificate (DER), lower-case hex. */
  certSha256: string;
}

export type TlsFailureReason =
  | 'expired'
  | 'not-yet-valid'
  | 'host-name-mismatch'
  | 'unknown-ca'
  | 'revoked'
  | 'timeout'
  | 'handshake'
  | 'connection';

/** What a handshake needs besides the socket. PEM text, read by the daemon (a client never sees the key). */
export interface TlsHandshakeParams {
  host: string;
  port: number;
  /** Trusted CAs (replacing the system store); undefined: the system store. */
  ca?: string | undefined;
  /** Client certificate and key (mTLS). */
  cert?: string | undefined;
  key?: string | undefined;
  timeoutMs: number;
}

export type RelayRequest = { t: 'open'; id: number; fd: number } & TlsHandshakeParams;

export type RelayResponse =
  | { t: 'ready'; id: number; fd: number; handshakeMs: number; info: TlsSessionInfo }
  | { t: 'failed'; id: number; code: string; message: string; reason: TlsFailureReason };

/** Totals over all relay threads. */
export interface RelayCounters {
  bytesToOrigin: number;
  bytesFromOrigin: number;
  handshakes: number;
  handshakeFailures: number;
  /** TLS sessions alive (idle or leased). */
  sessions: number;
  /** CPU time the relay threads used, µs. */
  cpuMicros: number;
}

const COUNTER_SLOTS = 6;

export interface RelayedSession {
  /** The main thread's end of the pair; belongs to the caller. */
  fd: number;
  handshakeMs: number;
  info: TlsSessionInfo;
}

interface RelayThread {
  worker: Worker;
  counters: Float64Array;
  pending: Map<number, { resolve(session: RelayedSession): void; reject(error: Error): void; where: string }>;
  exited: boolean;
}

export class TlsRelays {
  /** Started on demand, up to #threadCount; a thread that died is replaced at the next open. */
  #threads: Array<RelayThread | undefined> = [];
  #threadCount: number;
  #next = 0;
  #nextId = 1;
  #log: Logger;
  #closed = false;

  constructor(threadCount: number, log: Logger) {
    this.#log = log;
    this.#threadCount = threadCount;
  }

  /** Handshakes over `fd` (ownership passes here at once) in a relay thread. Rejects with SOCKPOOL_ERR_TLS. */
  open(fd: number, params: TlsHandshakeParams): Promise<RelayedSession> {
    const where = `${params.host}:${params.port}`;
    if (this.#closed) {
      native.close(fd);
      return Promise.reject(new SockpoolError(ErrorCodes.SHUTTING_DOWN, 'sockpoold is stopping'));
    }
    const index = this.#next++ % this.#threadCount;
    let thread = this.#threads[index];
    if (!thread || thread.exited) {
      thread = this.#spawn();
      this.#threads[index] = thread;
    }
    const id = this.#nextId++;
    return new Promise<RelayedSession>((resolve, reject) => {
      thread.pending.set(id, { resolve, reject, where });
      const request: RelayRequest = { t: 'open', id, fd, ...params };
      // From here the thread owns fd (its net.Socket closes it).
      thread.worker.postMessage(request);
    });
  }

  counters(): RelayCounters {
    const totals: RelayCounters = {
      bytesToOrigin: 0,
      bytesFromOrigin: 0,
      handshakes: 0,
      handshakeFailures: 0,
      sessions: 0,
      cpuMicros: 0,
    };
    for (const thread of this.#threads) {
      if (!thread) continue;
      const c = thread.counters;
      totals.bytesToOrigin += c[0]!;
      totals.bytesFromOrigin += c[1]!;
      totals.handshakes += c[2]!;
      totals.handshakeFailures += c[3]!;
      totals.sessions += c[4]!;
      totals.cpuMicros += c[5]!;
    }
    return totals;
  }

  /** Ends every relay thread; their sessions close with them (Node closes a thread's handles). */
  async close(): Promise<void> {
    this.#closed = true;
    await Promise.all(this.#threads.map((thread) => thread?.worker.terminate()));
  }

  #spawn(): RelayThread {
    const shared = new SharedArrayBuffer(COUNTER_SLOTS * Float64Array.BYTES_PER_ELEMENT);
    const worker = new Worker(new URL('./tls-relay-thread.js', import.meta.url), {
      workerData: { counters: shared },
      name: 'sockpoold tls relay',
    });
    const thread: RelayThread = { worker, counters: new Float64Array(shared), pending: new Map(), exited: false };
    worker.unref();
    worker.on('message', (message: RelayResponse) => {
      const waiter = thread.pending.get(message.id);
      if (!waiter) {
        // Nobody waits (cannot happen while the thread lives): the pair's end is ours to close.
        if (message.t === 'ready') native.close(message.fd);
        return;
      }
      thread.pending.delete(message.id);
      if (message.t === 'ready') {
        waiter.resolve({ fd: message.fd, handshakeMs: message.handshakeMs, info: message.info });
      } else {
        waiter.reject(
          new SockpoolError(
            ErrorCodes.TLS,
            `TLS handshake with ${waiter.where} failed (${message.reason}): ${message.message}`,
            { reason: message.reason, tlsCode: message.code },
          ),
        );
      }
    });
    const fail = (why: string) => {
      thread.exited = true;
      for (const waiter of thread.pending.values()) {
        waiter.reject(new SockpoolError(ErrorCodes.TLS, `TLS relay thread ended: ${why}`, { reason: 'connection' }));
      }
      thread.pending.clear();
    };
    worker.on('error', (error) => {
      this.#log.error({ err: error.message }, 'TLS relay thread failed');
      fail(error.message);
    });
    worker.on('exit', (code) => fail(`exit code ${code}`));
    return thread;
  }
}

/** The relay threads' counters as Prometheus gauges (read at scrape time; nothing on the relay path). */
export function registerRelayMetrics(registry: Registry, relays: TlsRelays): void {
  const gauge = (name: string, help: string, read: (counters: RelayCounters) => number) =>
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read(relays.counters()));
      },
    });
  gauge(
    'sockpool_tls_relay_bytes_to_origin',
    'Plaintext bytes relayed from clients to origins',
    (c) => c.bytesToOrigin,
  );
  gauge(
    'sockpool_tls_relay_bytes_from_origin',
    'Plaintext bytes relayed from origins to clients',
    (c) => c.bytesFromOrigin,
  );
  gauge('sockpool_tls_handshakes', 'Warm TLS handshakes completed', (c) => c.handshakes);
  gauge('sockpool_tls_handshake_failures', 'Warm TLS handshakes that failed', (c) => c.handshakeFailures);
  gauge('sockpool_tls_sessions', 'Warm TLS sessions alive (idle or leased)', (c) => c.sessions);
  gauge('sockpool_tls_relay_cpu_seconds', 'CPU time of the relay threads', (c) => c.cpuMicros / 1e6);
}
