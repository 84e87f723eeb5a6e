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
// - Received fds belong to the onMessage handler from the moment it is called, whether it returns or throws. A
//   handler's throw does not stop the batch it came in: the later messages are delivered all the same, and the
//   error (AggregateError for several) is thrown once the batch is done.

import type { Buffer } from 'node:buffer';
import { ErrorCodes, SockpoolError } from './errors.js';
import * as native from './native.js';

export interface ChannelHandlers {
  onMessage(data: Buffer, fds: number[]): void;
  /** A message arrived truncated (too large, or too many fds); it and its fds are already dropped. */
  onBadMessage?(error: Error): void;
  /** Called once, when the peer hung up (error undefined) or the socket failed. */
  onClose(error?: Error): void;
  /**
   * Called once, as onClose, but before the channel closes its socket: the socket is still open (what the peer left
   * unread can be read, SIOCOUTQ; queued messages withdrawn). onClose follows, after the close.
   */
  onClosing?(error?: Error): void;
}

interface Outgoing {
  data: Uint8Array;
  fds: number[];
}

/** A message that waits in a channel's queue for the peer to read (send's answer): withdraw() takes it back. */
export type QueuedMessage = object;

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
  /**
   * Shared with other channels (the daemon: one per uid, for all that uid's sessions): how many messages they may read
   * together in one turn of the event loop. Without it a channel reads up to DRAIN_LIMIT per wakeup on its own.
   */
  turns?: TurnBudget;
  /**
   * The peer's uid: the fds it sent that the channel discards (its socket's unread messages at the close, a batch's
   * messages not delivered) take that uid's share of the closing threads (native.discard).
   */
  peerUid?: number;
}

/**
 * Messages a group of channels may read together in one turn of the event loop. The per-wakeup bound of a channel
 * alone made the loop fair per connection: a uid with S sessions, each flooding, had S × DRAIN_LIMIT of its
 * messages handled before another uid's one was read. Now at most `perTurn` are read between two refills, and a
 * refill comes at most once per turn (one setImmediate for all budgets, in the check phase of the turn that spent
 * half of it).
 *
 * A message that held several requests (a bundle: SeqpacketChannel.spendTurns) may take the budget below 0, as what
 * one batch holds is known only once it is read. What it took past the budget is owed: each refill pays it back
 * first (and the next refill is due at once while the budget is short), so a group that sends bundles has no more
 * requests read over the turns than one that sends them one a message; only one batch may come early.
 *
 * A channel whose group has nothing left waits: its messages stay in the kernel (fds included, still the socket's)
 * and it joins the group's waiting line. The refill gives the new budget to that line first, in order (a channel
 * still short when the budget runs out again goes to the end of the line), so the channels of a group take turns:
 * epoll reports level-triggered sockets in the same order turn after turn, and without the line the first of them
 * would take the whole budget for as long as it had 64 queued. A channel that is not waiting is read when libuv
 * reports it (uv_poll is level-triggered: epoll without EPOLLET, so what is left unread is reported again).
 * A closed channel leaves the line (forget).
 *
 * The refill is scheduled only once half the budget is spent: a group that reads a few messages a turn schedules
 * nothing most turns (an idle loop, nothing at all), and it still gets at least half the budget in any turn.
 */
export class TurnBudget {
  /** Budgets whose refill is scheduled (one setImmediate for all), and the list the refill swaps in. */
  static #due: TurnBudget[] = [];
  static #spare: TurnBudget[] = [];
  static #refill = (): void => {
    const due = TurnBudget.#due;
    // Swapped first: what the waiting channels read below spends the new budget, and schedules the next refill.
    TurnBudget.#due = TurnBudget.#spare;
    TurnBudget.#spare = due;
    for (const budget of due) {
      // What bundles took past the budget is paid back first (see the header; forgiven, a uid's bundles had a whole
      // batch of them read every turn).
      budget.#left = Math.min(budget.perTurn, budget.#left + budget.perTurn);
      budget.#refillDue = false;
      if (budget.#left <= budget.perTurn / 2) budget.#scheduleRefill();
    }
    try {
      for (const budget of due) budget.#serveWaiting();
    } finally {
      // (Emptied even if a handler threw: a list left full would be swapped back in, and no refill scheduled again.)
      due.length = 0;
    }
  };
  readonly perTurn: number;
  #left: number;
  #refillDue = false;
  /** The channels waiting for this budget, in order (a Set keeps insertion order; adding one present moves nothing). */
  #waiting = new Set<() => void>();

  constructor(perTurn: number = DRAIN_LIMIT) {
    if (!(perTurn >= 1)) throw new RangeError('a turn budget needs at least 1 message');
    this.perTurn = perTurn;
    this.#left = perTurn;
  }

  /** How many of `wanted` may be read now (0: wait). */
  allow(wanted: number): number {
    // (Below 0 after a bundle: the group waits for the refills that pay it back.)
    return this.#left < wanted ? Math.max(0, this.#left) : wanted;
  }

  /** `count` messages were read. */
  spend(count: number): void {
    this.#left -= count;
    if (this.#refillDue || this.#left > this.perTurn / 2) return;
    this.#scheduleRefill();
  }

  #scheduleRefill(): void {
    this.#refillDue = true;
    if (TurnBudget.#due.length === 0) setImmediate(TurnBudget.#refill);
    TurnBudget.#due.push(this);
  }

  /** A channel found nothing left: `resume` reads it at a refill, in its place in the line. */
  wait(resume: () => void): void {
    this.#waiting.add(resume);
  }

  /** The channel closed: it leaves the line. */
  forget(resume: () => void): void {
    this.#waiting.delete(resume);
  }

  #serveWaiting(): void {
    // Each resumed channel reads until it is empty (it leaves the line) or the budget is spent (it is back at the end).
    while (this.#left > 0 && this.#waiting.size > 0) {
      const next = this.#waiting.values().next().value as () => void;
      this.#waiting.delete(next);
      next();
    }
  }
}

export class SeqpacketChannel {
  readonly fd: number;
  #poller: native.Poller;
  #handlers: ChannelHandlers;
  #options: Required<Omit<ChannelOptions, 'turns' | 'peerUid'>>;
  #queue: Outgoing[] = [];
  #queuedBytes = 0;
  #closed = false;
  #watching = 0;
  #turns: TurnBudget | undefined;
  #peerUid: number | undefined;
  /** The errors the handlers threw while a batch was delivered (#deliver), thrown once it is done. */
  #thrown: unknown[] | undefined;
  /** This channel's place in its budget's waiting line (one function for its whole life). */
  #resume: () => void;
  /** whenFlushed()'s callers, called once the queue is empty or the channel closed. */
  #flushWaiters: Array<() => void> | undefined;

  constructor(fd: number, handlers: ChannelHandlers, options: ChannelOptions) {
    this.fd = fd;
    this.#handlers = handlers;
    const { turns, peerUid, ...limits } = options;
    this.#turns = turns;
    this.#peerUid = peerUid;
    this.#resume = () => this.#drain();
    this.#options = { maxQueuedMessages: 4096, maxQueuedBytes: Number.POSITIVE_INFINITY, ...limits };
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

  /** How many messages wait for the peer to read (past what the kernel's socket buffer holds). */
  get queuedMessages(): number {
    return this.#queue.length;
  }

  /**
   * Calls `then` once no message waits any more (sent, or withdrawn) or the channel closed: at once (synchronously)
   * when that is so now. For a sender that holds back what it has not sent yet while the peer is not reading, rather
   * than queue it up to maxQueuedMessages and fail the channel.
   */
  whenFlushed(then: () => void): void {
    if (this.#closed || this.#queue.length === 0) then();
    else if (this.#flushWaiters === undefined) this.#flushWaiters = [then];
    else this.#flushWaiters.push(then);
  }

  /**
   * `count` more requests were read than messages: a message that held several (a bundle) takes as much of its group's
   * turn budget as they would have taken coming one by one.
   */
  spendTurns(count: number): void {
    if (count > 0) this.#turns?.spend(count);
  }

  /**
   * Queues one message; takes ownership of `fds` unless `borrowed` (see the header). Returns the message when it
   * waits in the queue (the peer's buffer is full), for withdraw(); undefined when it went out or was dropped.
   */
  send(data: Uint8Array, fds: number[] = [], options?: { borrowed: boolean }): QueuedMessage | undefined {
    const borrowed = options?.borrowed === true;
    if (this.#closed) {
      if (!borrowed) for (const fd of fds) native.close(fd);
      return undefined;
    }
    if (this.#queue.length === 0 && this.#sendNow({ data, fds }, borrowed)) return undefined;
    if (
      this.#queue.length >= this.#options.maxQueuedMessages ||
      this.#queuedBytes + data.byteLength > this.#options.maxQueuedBytes
    ) {
      if (!borrowed) for (const fd of fds) native.close(fd);
      this.#fail(new SockpoolError(ErrorCodes.LIMIT, 'peer is not reading: send queue full'));
      return undefined;
    }
    let owned = fds;
    if (borrowed && fds.length > 0) {
      // The message waits: the queue holds copies of its own, closed once sent, withdrawn or when the channel closes.
      owned = [];
      try {
        for (const fd of fds) owned.push(native.dup(fd));
      } catch (error) {
        for (const fd of owned) native.close(fd);
        this.#fail(error as Error);
        return undefined;
      }
    }
    const message: Outgoing = { data, fds: owned };
    this.#queue.push(message);
    this.#queuedBytes += data.byteLength;
    this.#watch(native.READABLE | native.WRITABLE | native.DISCONNECT);
    return message;
  }

  /**
   * Takes back a message send() queued, if it still waits (not sent, the channel open), closing the fds it holds;
   * true when it did. The daemon withdraws a lease's reply when the lease ends before the client read it: the copy
   * of the lease's fd the queue holds stayed open in the daemon until the client read (or left), one fd per ended
   * lease whatever the lease quotas said. (A message goes out whole or not at all: SOCK_SEQPACKET.)
   */
  withdraw(message: QueuedMessage): boolean {
    const index = this.#closed ? -1 : this.#queue.indexOf(message as Outgoing);
    if (index === -1) return false;
    const taken = this.#queue.splice(index, 1)[0]!;
    this.#queuedBytes -= taken.data.byteLength;
    for (const fd of taken.fds) native.close(fd);
    if (this.#queue.length === 0) {
      this.#watch(native.READABLE | native.DISCONNECT);
      this.#flushed();
    }
    return true;
  }

  /**
   * Closes the socket and every fd still queued. Does not call onClose. The socket is discarded, not just closed:
   * messages the peer sent that were never read may carry fds, which must not be dropped by the kernel in this
   * thread (native.discard).
   */
  close(): void {
    if (this.#closeQueue()) native.discard(this.fd, this.#peerUid);
  }

  /**
   * Closes as close() does but leaves the socket open: its fd becomes the caller's (to close with native.discard,
   * for the same reason). For a caller that must go on looking at the socket without a new fd for it.
   */
  closeKeepingSocket(): void {
    this.#closeQueue();
  }

  /** close() but the socket's own fd; false when it was closed already. */
  #closeQueue(): boolean {
    if (this.#closed) return false;
    this.#closed = true;
    this.#poller.close();
    this.#turns?.forget(this.#resume);
    for (const message of this.#queue) for (const fd of message.fds) native.close(fd);
    this.#queue = [];
    this.#queuedBytes = 0;
    this.#flushed();
    return true;
  }

  /** The queue is empty, or the channel closed: whenFlushed()'s callers run, in order. */
  #flushed(): void {
    const waiters = this.#flushWaiters;
    if (waiters === undefined) return;
    this.#flushWaiters = undefined;
    for (const then of waiters) then();
  }

  /**
   * Sends at once if the kernel takes it; false when it would block (nothing closed then). A broken socket
   * fails the channel. `borrowed`: the fds stay open (the caller's).
   */
  #sendNow(message: Outgoing, borrowed = false): boolean {
    try {
      const fds = message.fds;
      // No fds, no argument; one, as a number: what the addon reads fastest (every lease carries one).
      const sent =
        fds.length === 0
          ? native.sendMessage(this.fd, message.data)
          : native.sendMessage(this.fd, message.data, fds.length === 1 ? fds[0] : fds);
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
    if (!this.#closed) {
      this.#watch(native.READABLE | native.DISCONNECT);
      this.#flushed();
    }
  }

  #drain(): void {
    // Bounded per wakeup so one busy peer cannot starve the others on this loop, and by the group's budget for this
    // turn (TurnBudget) so that many peers of one uid cannot either. One recvmmsg takes every message queued now (up
    // to a batch): no extra read just to learn that nothing more is waiting.
    const turns = this.#turns;
    for (let received = 0; received < DRAIN_LIMIT && !this.#closed; ) {
      const wanted = turns === undefined ? BATCH : turns.allow(BATCH);
      if (wanted === 0) {
        // The group's turn is spent: what is queued waits in the kernel, this channel in the group's line.
        turns!.wait(this.#resume);
        return;
      }
      let batch: Array<native.ReceivedMessage | native.NativeError> | null;
      try {
        batch = native.recvMessages(this.fd, this.#options.maxMessageBytes, this.#options.maxFdsPerMessage, wanted);
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
      turns?.spend(batch.length);
      const open = this.#deliver(batch);
      // A handler's throw is still the caller's (libuv's: the process's uncaught exception), but only once the batch
      // is delivered: thrown at once it left the batch's later messages, fds and all, open in nobody's hands.
      const thrown = this.#thrown;
      if (thrown !== undefined) {
        this.#thrown = undefined;
        if (thrown.length === 1) throw thrown[0];
        throw new AggregateError(thrown, `${thrown.length} message handlers threw in one batch`);
      }
      // Fewer than asked for: the queue was empty when it was read; the next wakeup brings the rest.
      if (!open || batch.length < wanted) return;
    }
  }

  /**
   * Hands each message of a batch to the handlers, whatever one of them throws (collected in #thrown): the messages
   * came in one recvmmsg, and had they come one a wakeup each would have been delivered. False when the channel
   * closed (the fds of the messages not delivered are closed here).
   */
  #deliver(batch: Array<native.ReceivedMessage | native.NativeError>): boolean {
    for (let i = 0; i < batch.length; i++) {
      const message = batch[i]!;
      if (this.#closed) {
        // Closed by a handler: the fds of the messages not delivered are ours to close.
        for (const rest of batch.slice(i)) {
          if (!(rest instanceof Error)) for (const fd of rest.fds) native.discard(fd, this.#peerUid);
        }
        return false;
      }
      try {
        if (message instanceof Error) {
          // A truncated message lost its fds (the addon closed them); the stream itself is still sound.
          this.#handlers.onBadMessage?.(message);
        } else if (message.eof) {
          this.#fail(undefined);
          return false;
        } else {
          this.#handlers.onMessage(message.data, message.fds);
        }
      } catch (error) {
        if (this.#thrown === undefined) this.#thrown = [error];
        else this.#thrown.push(error);
      }
    }
    return !this.#closed;
  }

  #fail(error: Error | undefined): void {
    if (this.#closed) return;
    this.#handlers.onClosing?.(error);
    this.close();
    this.#handlers.onClose(error);
  }
}

/** Messages per recvmmsg, and per wakeup of one channel. */
const BATCH = 16;
const DRAIN_LIMIT = 64;
