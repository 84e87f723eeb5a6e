// A worker thread's own connection to sockpoold: request/response over one SOCK_SEQPACKET socket, with request
// ids, a deadline on every request, and reconnection with backoff when the daemon restarts.
//
// fd ownership: a `lease` reply's fd is tracked by the addon for this thread (closed if the thread dies) and
// belongs to the caller of acquire() once it resolves. release() takes ownership of the fd it is given.

import { ErrorCodes, fromPlainError, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import {
  type ClientMessage,
  type DaemonMessage,
  decodeDaemonMessage,
  encodeMessage,
  type LeaseReply,
  MAX_FDS_PER_MESSAGE,
  MAX_MESSAGE_BYTES,
  PROTOCOL_VERSION,
} from '../shared/protocol.js';
import { SeqpacketChannel } from '../shared/seqpacket-channel.js';

export interface Lease extends LeaseReply {
  fd: number;
}

interface Pending {
  resolve(reply: { message: DaemonMessage; fds: number[] }): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

type Request = ClientMessage extends infer M ? (M extends { id?: number } ? Omit<M, 'id'> : never) : never;

export interface DaemonLinkOptions {
  socketPath: string;
  /** Deadline for replies other than acquire (which carries its own). */
  requestTimeoutMs?: number;
  clientName?: string;
}

const RECONNECT_MIN_MS = 50;
const RECONNECT_MAX_MS = 2000;

export class DaemonLink {
  #options: Required<DaemonLinkOptions>;
  #channel: SeqpacketChannel | undefined;
  #connecting: Promise<SeqpacketChannel> | undefined;
  #pending = new Map<number, Pending>();
  #nextId = 1;
  #closed = false;
  #failures = 0;
  #retryAt = 0;

  constructor(options: DaemonLinkOptions) {
    this.#options = { requestTimeoutMs: 5000, clientName: `worker-${process.pid}`, ...options };
  }

  /** True while a connection to the daemon is open. */
  get connected(): boolean {
    return this.#channel !== undefined && !this.#channel.closed;
  }

  async acquire(host: string, port: number, timeoutMs: number): Promise<Lease> {
    const { message, fds } = await this.#request({ type: 'acquire', host, port, timeoutMs }, timeoutMs + 1000);
    if (message.type !== 'lease' || fds.length !== 1) {
      for (const fd of fds) native.close(fd);
      throw new SockpoolError(ErrorCodes.PROTOCOL, `daemon answered acquire with ${message.type}`);
    }
    return { ...message, fd: fds[0]! };
  }

  async prewarm(host: string, port: number, count: number): Promise<void> {
    await this.#request({ type: 'prewarm', host, port, count }, this.#options.requestTimeoutMs);
  }

  async stats(): Promise<Record<string, unknown>> {
    const { message } = await this.#request({ type: 'stats' }, this.#options.requestTimeoutMs);
    if (message.type !== 'stats') throw new SockpoolError(ErrorCodes.PROTOCOL, 'daemon answered stats wrongly');
    return message.stats;
  }

  /** Gives an unused leased fd back (ownership passes here; it is closed if the daemon is gone). */
  release(leaseId: number, fd: number): void {
    const channel = this.#channel;
    if (!channel || channel.closed) {
      native.close(fd);
      return;
    }
    channel.send(encodeMessage({ type: 'release', leaseId }), [fd]);
  }

  /** Tells the daemon curl closed a leased socket. Fire and forget: a lost link frees the lease anyway. */
  closed(leaseId: number): void {
    const channel = this.#channel;
    if (channel && !channel.closed) channel.send(encodeMessage({ type: 'closed', leaseId }));
  }

  close(): void {
    this.#closed = true;
    this.#channel?.close();
    this.#channel = undefined;
    this.#failAll(new SockpoolError(ErrorCodes.CLOSED, 'daemon link closed'));
  }

  async #request(request: Request, timeoutMs: number): Promise<{ message: DaemonMessage; fds: number[] }> {
    const channel = await this.#connect();
    const id = this.#nextId++;
    if (this.#nextId > 2 ** 31 - 1) this.#nextId = 1;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new SockpoolError(ErrorCodes.TIMEOUT, `daemon did not answer ${request.type} in ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, {
        resolve: (reply) => {
          if (reply.message.type === 'error') {
            for (const fd of reply.fds) native.close(fd);
            reject(fromPlainError(reply.message));
          } else resolve(reply);
        },
        reject,
        timer,
      });
      channel.send(encodeMessage({ ...request, id } as ClientMessage));
    });
  }

  #connect(): Promise<SeqpacketChannel> {
    if (this.#closed) return Promise.reject(new SockpoolError(ErrorCodes.CLOSED, 'daemon link closed'));
    if (this.#channel && !this.#channel.closed) return Promise.resolve(this.#channel);
    this.#connecting ??= this.#open().finally(() => {
      this.#connecting = undefined;
    });
    return this.#connecting;
  }

  async #open(): Promise<SeqpacketChannel> {
    const wait = this.#retryAt - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    let fd: number;
    try {
      fd = native.seqpacketConnect(this.#options.socketPath);
    } catch (error) {
      this.#failures++;
      this.#retryAt = performance.now() + Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** (this.#failures - 1));
      const cause = error as Error & { code?: string };
      throw new SockpoolError(
        ErrorCodes.DAEMON_UNAVAILABLE,
        `cannot reach sockpoold at ${this.#options.socketPath}: ${cause.code ?? cause.message}`,
        { socketPath: this.#options.socketPath, cause: cause.code ?? null },
      );
    }
    // The channel owns fd from here. Tracked: if this thread dies, the addon closes the link, and the daemon
    // then frees every lease this thread held.
    native.track(fd);
    const channel = new SeqpacketChannel(
      fd,
      {
        onMessage: (data, fds) => this.#onMessage(data, fds),
        onClose: (error) => {
          if (this.#channel === channel) this.#channel = undefined;
          this.#failAll(
            new SockpoolError(
              ErrorCodes.DAEMON_UNAVAILABLE,
              `connection to sockpoold lost${error ? `: ${error.message}` : ''}`,
            ),
          );
        },
      },
      { maxMessageBytes: MAX_MESSAGE_BYTES, maxFdsPerMessage: MAX_FDS_PER_MESSAGE },
    );
    this.#channel = channel;
    const id = this.#nextId++;
    const hello = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new SockpoolError(ErrorCodes.DAEMON_UNAVAILABLE, 'sockpoold did not answer hello'));
      }, this.#options.requestTimeoutMs);
      this.#pending.set(id, {
        resolve: ({ message }) => {
          if (message.type === 'error') reject(fromPlainError(message));
          else resolve();
        },
        reject,
        timer,
      });
    });
    channel.send(encodeMessage({ type: 'hello', id, version: PROTOCOL_VERSION, client: this.#options.clientName }));
    try {
      await hello;
    } catch (error) {
      channel.close();
      if (this.#channel === channel) this.#channel = undefined;
      throw error;
    }
    this.#failures = 0;
    return channel;
  }

  #onMessage(data: Buffer, fds: number[]): void {
    let message: DaemonMessage;
    try {
      message = decodeDaemonMessage(data);
    } catch {
      for (const fd of fds) native.close(fd);
      return;
    }
    const id = message.id;
    const pending = id === null ? undefined : this.#pending.get(id);
    if (!pending) {
      // A reply nobody waits for (its request timed out): an fd in it goes back to the daemon, unused.
      if (message.type === 'lease' && fds.length === 1) this.release(message.leaseId, fds[0]!);
      else for (const fd of fds) native.close(fd);
      return;
    }
    this.#pending.delete(id!);
    clearTimeout(pending.timer);
    pending.resolve({ message, fds });
  }

  #failAll(error: Error): void {
    for (const [id, pending] of this.#pending) {
      clearTimeout(pending.timer);
      this.#pending.delete(id);
      pending.reject(error);
    }
  }
}
