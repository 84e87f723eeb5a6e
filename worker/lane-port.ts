// A request's own port on a worker thread's lane (lane-protocol.ts): the part of MessagePort's interface a
// streamed request uses (stream-protocol.ts's RequestPort), one end in the caller's thread (client/thread-lanes.ts)
// and one in the worker thread (lane.ts), with no MessageChannel of its own. What one end posts goes into its
// lane's next batch, tagged with the request's id; the lane's reader on the other side hands it to that end.
//
// What a MessagePort guarantees, and the request's channel relies on, holds here too: messages arrive in order (one
// lane, one batch after another), in a later turn of the other thread, and a close stops sending both ways.
// Unlike a MessagePort, 'close' is emitted on the end whose peer closed, not on the end that closed itself: the
// only listener (the worker's runtime: "the caller's end closed before the transfer ended") wants exactly that.
// The worker's end never posts its close: the request's outcome, which follows its last message on the same lane,
// ends the caller's end (ThreadLanes).

import { EventEmitter } from 'node:events';
import type { RequestPort } from './stream-protocol.js';

export class LanePort extends EventEmitter implements RequestPort {
  readonly #send: (message: unknown, transfer: ArrayBuffer[] | undefined) => void;
  readonly #sendClose: () => void;
  #closed = false;

  /** `send` queues a message for the other end; `sendClose` tells it this end closed. */
  constructor(send: (message: unknown, transfer: ArrayBuffer[] | undefined) => void, sendClose: () => void) {
    super();
    this.#send = send;
    this.#sendClose = sendClose;
  }

  get closed(): boolean {
    return this.#closed;
  }

  postMessage(message: unknown, transfer?: ArrayBuffer[]): void {
    if (!this.#closed) this.#send(message, transfer);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#sendClose();
  }

  /** A message from the other end (dropped once this end is closed). */
  deliver(message: unknown): void {
    if (!this.#closed) this.emit('message', message);
  }

  /** The other end closed, after its last message: nothing more goes either way. */
  peerClosed(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.emit('close');
  }
}
