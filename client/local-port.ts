// A pair of ports inside one thread, with the part of MessagePort's interface a request's channel uses
// (stream-protocol.ts: postMessage, the 'message' and 'close' events, close()), for a streamed request whose
// runtime runs in the caller's own thread (`threads: 0`, or a request alone in flight): making a MessageChannel and
// sending a message through it costs about as much as the rest of such a request (docs/benchmarks.md, tenth
// session).
//
// What a MessagePort guarantees, and the channel relies on, holds here too:
// - Messages arrive in order, in a later turn (an immediate), never inside the sender's call: the worker's side
//   posts from curl's callbacks, which must not run the caller's code (it may pause or resume the transfer). The
//   transfer's outcome, delivered as curl reports it, waits for them (whenDelivered).
// - close() on either end stops sending both ways; messages already sent are still delivered, then both ends
//   emit 'close'.
// Unlike a MessagePort, a message is not cloned: the receiver gets the sender's object. Both sides post fresh
// objects and move the chunks they send (a sender never touches a chunk again), so nothing is shared in use.

import { EventEmitter } from 'node:events';
import type { RequestPort } from '../worker/stream-protocol.js';

export class LocalPort extends EventEmitter implements RequestPort {
  #peer!: LocalPort;
  /** Messages for this end not yet delivered. */
  #inbox: unknown[] = [];
  #scheduled = false;
  /** No more sending either way (set on both ends by close()). */
  #closed = false;
  /** 'close' is owed once the inbox is delivered. */
  #closeOwed = false;
  /** What waits for the inbox to be delivered (the peer's whenDelivered). */
  #afterDelivery: Array<() => void> | undefined;

  /** Two connected ends. */
  static pair(): [LocalPort, LocalPort] {
    const one = new LocalPort();
    const other = new LocalPort();
    one.#peer = other;
    other.#peer = one;
    return [one, other];
  }

  postMessage(message: unknown, _transfer?: ArrayBuffer[]): void {
    if (this.#closed) return;
    this.#peer.#deliverLater(message);
  }

  /** Calls `then` once what this end posted so far was delivered to the other: at once when nothing waits. */
  whenDelivered(then: () => void): void {
    const peer = this.#peer;
    if (peer.#inbox.length === 0) {
      then();
      return;
    }
    peer.#afterDelivery ??= [];
    peer.#afterDelivery.push(then);
  }

  close(): void {
    if (this.#closed) return;
    for (const end of [this, this.#peer]) {
      end.#closed = true;
      end.#closeOwed = true;
      end.#schedule();
    }
  }

  #deliverLater(message: unknown): void {
    this.#inbox.push(message);
    this.#schedule();
  }

  #schedule(): void {
    if (this.#scheduled) return;
    this.#scheduled = true;
    setImmediate(() => this.#deliver());
  }

  #deliver(): void {
    this.#scheduled = false;
    const inbox = this.#inbox;
    this.#inbox = [];
    for (const message of inbox) this.emit('message', message);
    const after = this.#afterDelivery;
    if (after) {
      this.#afterDelivery = undefined;
      for (const then of after) then();
    }
    // (Messages a listener posted to this end meanwhile go in the next immediate, before the owed 'close'.)
    if (this.#inbox.length > 0) {
      this.#schedule();
      return;
    }
    if (this.#closeOwed) {
      this.#closeOwed = false;
      this.emit('close');
    }
  }
}
