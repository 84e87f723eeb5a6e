// One connected SOCK_SEQPACKET socket, driven by libuv readiness: whole messages in, whole messages out, fds
// attached. Both the daemon (one per client) and the worker (its link to the daemon) use it.
//
// fd ownership:
// - The channel owns its socket fd and closes it in close().
// - send(data, fds) takes ownership of `fds`: they are closed once the kernel has duplicated them into the
//   peer, or when the channel closes before they could be sent. The caller must not use them after send().
// - send(data, fds, { borrowed: true }) leaves `fds` with the caller (the daemon lends the socket it keeps): sent
//   at once, nothing is closed; if the message must wait, the channel queues copies (dup) of its own, so the
//   caller may close its fds whenever it likes.
// - Received fds belong to the onMessage handler from the moment it is called.

import { ErrorCodes, SockpoolError } from './errors.js';
import * as native from './native.js';

export interface ChannelHandlers {
  onMessage(data: Buffer, fds: number[]): void;
  /** A message arrived truncated (too large, or too many fds); it and its fds are already dropped. */
  onBadMessage?(error: Error): void;
  /** Called once, when the peer hung up (error undefined) or the socket failed. */
  onClose(error?: Error): void;
}

interface Outgoing {
  data: Uint8Array;
  fds: number[];
}

export interface ChannelOptions {
  maxMessageBytes: number;
  maxFdsPerMessage: number;
  /** Messages queued while the peer does not read; beyond this the channel closes with an error. */
  maxQueuedMessages?: number;
  /**
   * Bytes of those messages; beyond this the channel closes with an error too. The count alone let a peer that asks
   * and never reads make the daemon hold thousands of replies of up to a message's size each, per connection.
   */
  maxQueuedBytes?: number;
}

export class SeqpacketChannel {
  readonly fd: number;
  #poller: native.Poller;
  #handlers: ChannelHandlers;
  #options: Required<ChannelOptions>;
  #queue: Outgoing[] = [];
  #queuedBytes = 0;
  #closed = false;
  #watching = 0;

  constructor(fd: number, handlers: ChannelHandlers, options: ChannelOptions) {
    this.fd = fd;
    this.#handlers = handlers;
    this.#options = { maxQueuedMessages: 4096, maxQueuedBytes: Number.POSITIVE_INFINITY, ...options };
    this.#poller = new native.Poller(fd, (status, events) => this.#onReady(status, events));
    try {
      this.#watch(native.READABLE | native.DISCONNECT);
    } catch (error) {
      // Not constructed, so the fd stays the caller's: a Poller left on it would make its close() refuse.
      this.#closed = true;
      this.#poller.close();
      throw error;
    }
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Bytes of the messages waiting for the peer to read (past what the kernel's socket buffer holds). */
  get queuedBytes(): number {
    return this.#queuedBytes;
  }

  /** Queues one message; takes ownership of `fds` unless `borrowed` (see the header). */
  send(data: Uint8Array, fds: number[] = [], options?: { borrowed: boolean }): void {
    const borrowed = options?.borrowed === true;
    if (this.#closed) {
      if (!borrowed) for (const fd of fds) native.close(fd);
      return;
    }
    if (this.#queue.length === 0 && this.#sendNow({ data, fds }, borrowed)) return;
    if (
      this.#queue.length >= this.#options.maxQueuedMessages ||
      this.#queuedBytes + data.byteLength > this.#options.maxQueuedBytes
    ) {
      if (!borrowed) for (const fd of fds) native.close(fd);
      this.#fail(new SockpoolError(ErrorCodes.LIMIT, 'peer is not reading: send queue full'));
      return;
    }
    let owned = fds;
    if (borrowed && fds.length > 0) {
      // The message waits: the queue holds copies of its own, closed once sent or when the channel closes.
      owned = [];
      try {
        for (const fd of fds) owned.push(native.dup(fd));
      } catch (error) {
        for (const fd of owned) native.close(fd);
        this.#fail(error as Error);
        return;
      }
    }
    this.#queue.push({ data, fds: owned });
    this.#queuedBytes += data.byteLength;
    this.#watch(native.READABLE | native.WRITABLE | native.DISCONNECT);
  }

  /**
   * Closes the socket and every fd still queued. Does not call onClose. The socket is discarded, not just closed:
   * messages the peer sent that were never read may carry fds, which must not be dropped by the kernel in this
   * thread (native.discard).
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#poller.close();
    for (const message of this.#queue) for (const fd of message.fds) native.close(fd);
    this.#queue = [];
    this.#queuedBytes = 0;
    native.discard(this.fd);
  }

  /**
   * Sends at once if the kernel takes it; false when it would block (nothing closed then). A broken socket
   * fails the channel. `borrowed`: the fds stay open (the caller's).
   */
  #sendNow(message: Outgoing, borrowed = false): boolean {
    try {
      const sent = native.sendMessage(this.fd, message.data, message.fds);
      if (sent === null) return false;
    } catch (error) {
      if (!borrowed) for (const fd of message.fds) native.close(fd);
      this.#fail(error as Error);
      return true;
    }
    // The peer holds its own copies now; ours are closed here.
    if (!borrowed) for (const fd of message.fds) native.close(fd);
    return true;
  }

  #watch(events: number): void {
    if (this.#closed || this.#watching === events) return;
    this.#watching = events;
    this.#poller.start(events);
  }

  #onReady(status: number, events: number): void {
    if (this.#closed) return;
    if (status < 0) {
      this.#fail(Object.assign(new Error(`poll failed (${status})`), { code: 'EIO' }));
      return;
    }
    if (events & native.WRITABLE) this.#flush();
    if (events & (native.READABLE | native.DISCONNECT)) this.#drain();
  }

  #flush(): void {
    while (!this.#closed && this.#queue.length > 0) {
      const head = this.#queue[0]!;
      if (!this.#sendNow(head)) return;
      this.#queue.shift();
      this.#queuedBytes -= head.data.byteLength;
    }
    if (!this.#closed) this.#watch(native.READABLE | native.DISCONNECT);
  }

  #drain(): void {
    // Bounded per wakeup so one busy peer cannot starve the others on this loop. One recvmmsg takes every message
    // queued now (up to a batch): no extra read just to learn that nothing more is waiting.
    for (let received = 0; received < DRAIN_LIMIT && !this.#closed; ) {
      let batch: Array<native.ReceivedMessage | native.NativeError> | null;
      try {
        batch = native.recvMessages(this.fd, this.#options.maxMessageBytes, this.#options.maxFdsPerMessage, BATCH);
      } catch (error) {
        // A peer that hung up with our messages unread is reported once as ECONNRESET; whatever it sent before
        // hanging up (e.g. the reason it refused us) is still queued: read on, EOF follows.
        if ((error as { code?: string }).code === 'ECONNRESET') {
          received++;
          continue;
        }
        this.#fail(error as Error);
        return;
      }
      if (batch === null) return;
      received += batch.length;
      for (let i = 0; i < batch.length; i++) {
        const message = batch[i]!;
        if (this.#closed) {
          // Closed by a handler: the fds of the messages not delivered are ours to close.
          for (const rest of batch.slice(i))
            if (!(rest instanceof Error)) for (const fd of rest.fds) native.discard(fd);
          return;
        }
        if (message instanceof Error) {
          // A truncated message lost its fds (the addon closed them); the stream itself is still sound.
          this.#handlers.onBadMessage?.(message);
          continue;
        }
        if (message.eof) {
          this.#fail(undefined);
          return;
        }
        this.#handlers.onMessage(message.data, message.fds);
      }
      // Fewer than a full batch: the queue was empty when it was read; the next wakeup brings the rest.
      if (batch.length < BATCH) return;
    }
  }

  #fail(error: Error | undefined): void {
    if (this.#closed) return;
    this.close();
    this.#handlers.onClose(error);
  }
}

/** Messages per recvmmsg, and per wakeup of one channel. */
const BATCH = 16;
const DRAIN_LIMIT = 64;
