// A minimal sockpoold client for benchmarks: one SOCK_SEQPACKET connection driven by the addon's Poller (as the
// worker's daemon link is), replies dispatched by id to plain callbacks so the timed path has no promise hops.
//
// fd ownership: fds that arrive with a reply belong to the reply's callback (it must close, release or keep them);
// replies nobody waits for have their fds closed here.
import * as native from '../../shared/native.js';
import {
  BINARY_FRAMING,
  BUNDLES,
  type ClientMessage,
  type DaemonMessage,
  decodeDaemonMessage,
  encodeBundle,
  encodeFor,
  encodeFrame,
  MAX_MESSAGE_BYTES,
  RELEASE_WITHOUT_FD,
} from '../../shared/protocol.js';

/** Messages per recvmmsg. */
const RECV_BATCH = 16;

export type ReplyHandler = (message: DaemonMessage, fds: number[]) => void;

export class BenchDaemonClient {
  readonly fd: number;
  #poller: native.Poller;
  #handlers = new Map<number, ReplyHandler>();
  #nextId = 1;
  #closed = false;
  onClose: ((why: string) => void) | undefined;
  /** Ask for binary framing in hello (the worker's link does); false: JSON only, as clients before it. */
  readonly wantBinary: boolean;
  /** The daemon agreed to binary framing. */
  binary = false;
  /** The daemon's framing takes a release without its fd (the client closes its copy). */
  releaseWithoutFd = false;
  /** The daemon's framing takes bundles (several requests in one packet, as the worker's link sends them). */
  bundles = false;

  constructor(socketPath: string, options: { binary?: boolean } = {}) {
    this.wantBinary = options.binary ?? true;
    this.fd = native.seqpacketConnect(socketPath);
    this.#poller = new native.Poller(this.fd, (status) => this.#drain(status));
    this.#poller.start(native.READABLE | native.DISCONNECT);
  }

  nextId(): number {
    const id = this.#nextId;
    this.#nextId = id >= 2 ** 31 - 1 ? 1 : id + 1;
    return id;
  }

  /** Sends one message; `onReply` gets the reply with the same id. The caller keeps ownership of `fds`. */
  send(message: Record<string, unknown>, fds: number[] = [], onReply?: ReplyHandler): void {
    if (onReply) this.#handlers.set(message.id as number, onReply);
    const sent = native.sendMessage(this.fd, encodeFor(this.binary, message as ClientMessage), fds);
    if (sent === null) throw new Error('daemon socket is full (benchmark sends faster than the daemon reads)');
  }

  /** Sends fd-less frames in one packet (a bundle); `onReply` gets the reply to the last one (its id). */
  sendBundle(messages: Record<string, unknown>[], onReply: ReplyHandler): void {
    const last = messages[messages.length - 1]!;
    this.#handlers.set(last.id as number, onReply);
    const frames = messages.map((message) => encodeFrame(message as ClientMessage)!);
    if (native.sendMessage(this.fd, encodeBundle(frames), []) === null) {
      throw new Error('daemon socket is full (benchmark sends faster than the daemon reads)');
    }
  }

  request(message: Record<string, unknown>): Promise<{ message: DaemonMessage; fds: number[] }> {
    return new Promise((resolve) => this.send(message, [], (reply, fds) => resolve({ message: reply, fds })));
  }

  async hello(): Promise<void> {
    const ask = (binary: boolean) =>
      this.request({
        type: 'hello',
        id: this.nextId(),
        version: 1,
        client: 'bench',
        ...(binary ? { binary: BINARY_FRAMING } : {}),
      });
    let { message } = await ask(this.wantBinary);
    // A daemon from before binary framing (--daemon PATH) refuses the field: ask again plainly.
    if (message.type === 'error' && this.wantBinary) ({ message } = await ask(false));
    if (message.type !== 'hello') throw new Error(`hello refused: ${JSON.stringify(message)}`);
    this.binary = (message.binary ?? 0) >= 1;
    this.releaseWithoutFd = (message.binary ?? 0) >= RELEASE_WITHOUT_FD;
    this.bundles = (message.binary ?? 0) >= BUNDLES;
  }

  async stats(): Promise<Record<string, unknown> & { idle: number; connecting: number; rssBytes?: number }> {
    const { message } = await this.request({ type: 'stats', id: this.nextId() });
    if (message.type !== 'stats') throw new Error(`stats refused: ${JSON.stringify(message)}`);
    return message.stats as Record<string, unknown> & { idle: number; connecting: number };
  }

  async prewarm(host: string, port: number, count: number): Promise<void> {
    const { message } = await this.request({ type: 'prewarm', id: this.nextId(), host, port, count });
    if (message.type !== 'ok') throw new Error(`prewarm refused: ${JSON.stringify(message)}`);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#poller.close();
    native.close(this.fd);
  }

  #drain(status: number): void {
    if (this.#closed) return;
    if (status < 0) {
      this.#hangUp(`poll status ${status}`);
      return;
    }
    // Until nothing is left, up to RECV_BATCH a read, as the raw baseline's requester reads (scm-baseline.ts).
    for (;;) {
      const batch = native.recvMessages(this.fd, MAX_MESSAGE_BYTES, 1, RECV_BATCH);
      if (batch === null) return;
      for (const received of batch) {
        if (received instanceof Error) throw received;
        if (received.eof) {
          this.#hangUp('daemon hung up');
          return;
        }
        const message = decodeDaemonMessage(received.data);
        const handler = message.id === null ? undefined : this.#handlers.get(message.id);
        if (!handler) {
          for (const fd of received.fds) native.close(fd);
          if (message.type === 'error') throw new Error(`unexpected daemon error: ${JSON.stringify(message)}`);
          continue;
        }
        this.#handlers.delete(message.id!);
        handler(message, received.fds);
        if (this.#closed) return;
      }
    }
  }

  /** Every reply still awaited becomes an error reply, so nobody waits forever on a daemon that is gone. */
  #hangUp(why: string): void {
    this.close();
    const waiting = [...this.#handlers];
    this.#handlers.clear();
    for (const [id, handler] of waiting) {
      handler({ type: 'error', id, code: 'BENCH_DAEMON_GONE', message: why }, []);
    }
    this.onClose?.(why);
  }
}

export interface HandoffRunOptions {
  host: string;
  port: number;
  /** Requests kept in flight on this connection. */
  inFlight: number;
  /** Stop issuing after this many handoffs or this much time, whichever comes first. */
  maxHandoffs: number;
  durationMs: number;
  /**
   * 'ack': release with an id and wait for its ok before the next acquire, so each timed interval holds exactly
   * one acquire → lease (sequential latency). 'fire': release without id (no reply, as the worker does) and send
   * the next acquire at once (throughput).
   */
  release: 'ack' | 'fire';
  /** Called with each latency sample (µs) and whether the lease was warm. */
  onSample(us: number, warm: boolean): void;
}

/**
 * Runs acquire → lease (fd received: usable) → release loops on `client`. Resolves with the handoffs done and
 * the elapsed ms from the first send to the last lease.
 */
export function runHandoffs(
  client: BenchDaemonClient,
  options: HandoffRunOptions,
): Promise<{ handoffs: number; elapsedMs: number }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const deadline = started + options.durationMs;
    let issued = 0;
    let done = 0;
    let outstanding = 0;
    let last = started;
    let failed = false;
    client.onClose = (why) => {
      failed = true;
      reject(new Error(why));
    };
    const finish = () => {
      client.onClose = undefined;
      resolve({ handoffs: done, elapsedMs: last - started });
    };
    /** Sends an acquire; `release` (fd-less) goes with it in one bundle, as the worker's link bundles them. */
    const issue = (release?: Record<string, unknown>) => {
      issued++;
      outstanding++;
      const sentAt = performance.now();
      const acquire = { type: 'acquire', id: client.nextId(), host: options.host, port: options.port };
      const onLease: ReplyHandler = (reply, fds) => {
        const now = performance.now();
        if (failed) return;
        if (reply.type !== 'lease' || fds.length !== 1) {
          for (const fd of fds) native.close(fd);
          failed = true;
          reject(new Error(`acquire failed: ${JSON.stringify(reply)}`));
          return;
        }
        done++;
        last = now;
        options.onSample((now - sentAt) * 1000, reply.warm);
        const fd = fds[0]!;
        const more = issued < options.maxHandoffs && now < deadline;
        if (options.release === 'fire') {
          outstanding--;
          if (client.releaseWithoutFd) {
            const release = { type: 'release', leaseId: reply.leaseId, withoutFd: true };
            native.close(fd); // the daemon holds its copy
            if (more && client.bundles) issue(release);
            else {
              client.send(release);
              if (more) issue();
            }
          } else {
            client.send({ type: 'release', leaseId: reply.leaseId }, [fd]);
            native.close(fd); // the daemon holds its copy now
            if (more) issue();
          }
          if (!more && outstanding === 0) finish();
          return;
        }
        const release = { type: 'release', id: client.nextId(), leaseId: reply.leaseId };
        const withoutFd = client.releaseWithoutFd;
        client.send(withoutFd ? { ...release, withoutFd } : release, withoutFd ? [] : [fd], (ok) => {
          if (ok.type !== 'ok') {
            failed = true;
            reject(new Error(`release failed: ${JSON.stringify(ok)}`));
            return;
          }
          outstanding--;
          if (more) issue();
          else if (outstanding === 0) finish();
        });
        native.close(fd);
      };
      if (release) client.sendBundle([release, acquire], onLease);
      else client.send(acquire, [], onLease);
    };
    for (let i = 0; i < options.inFlight && i < options.maxHandoffs; i++) issue();
  });
}
