// Where a transfer's response body goes inside the worker: collected whole (BufferSink, for request()), or sent on
// to the caller's thread in chunks over the request's MessagePort with credit-based backpressure (PortSink, for
// requestStream() and fetch()). The curl engine offers each chunk curl writes; a sink that has no room refuses it,
// and the engine pauses curl's receiving until the sink calls back (see stream-protocol.ts).

import { Buffer } from 'node:buffer';
import type { PlainError } from '../shared/errors.js';
import {
  RESPONSE_CHUNK,
  RESPONSE_WINDOW,
  type RequestPort,
  type ResponseHead,
  type WorkerMessage,
} from './stream-protocol.js';

export interface ResponseSink {
  /** True once the response head went out to the caller: the transfer can no longer be retried. */
  readonly committed: boolean;
  /** The final response's head is complete (status >= 200). */
  head(head: ResponseHead): void;
  /** Offers a chunk (the sink may keep it). false: not taken; curl must pause until the writable callback runs. */
  write(chunk: Buffer): boolean;
  /** The callback to run when a refused write would now be taken. */
  onWritable(callback: () => void): void;
  /** Drops what an attempt collected, before a retry. */
  reset(): void;
}

/** Collects the whole body. Never refuses a chunk. */
export class BufferSink implements ResponseSink {
  readonly committed = false;
  /** Whether the body must own exactly its memory (it moves to another thread): see body(). */
  readonly #exact: boolean;
  /** The first chunk, and the others (an array only for a body of more than one chunk: most small bodies come in
   *  one, and an array and its storage were most of what this sink cost). */
  #first: Buffer | undefined;
  #more: Buffer[] | undefined;
  #bytes = 0;

  constructor(exact = true) {
    this.#exact = exact;
  }

  head(): void {}

  write(chunk: Buffer): boolean {
    if (this.#first === undefined) this.#first = chunk;
    else if (this.#more === undefined) this.#more = [chunk];
    else this.#more.push(chunk);
    this.#bytes += chunk.length;
    return true;
  }

  onWritable(): void {}

  reset(): void {
    this.#first = undefined;
    this.#more = undefined;
    this.#bytes = 0;
  }

  /**
   * The whole body. Exact size and not from Node's shared buffer pool where it moves (is transferred, not copied) to
   * the caller's thread: a pooled slice would drag its whole 8 KiB pool along by structured clone. In the caller's
   * thread, a body of one chunk is that chunk, pooled or not.
   */
  body(): Buffer {
    const first = this.#first;
    if (
      first &&
      !this.#more &&
      (!this.#exact || (first.byteOffset === 0 && first.buffer.byteLength === first.length))
    ) {
      return first;
    }
    const body = Buffer.from(new ArrayBuffer(this.#bytes));
    if (!first) return body;
    body.set(first, 0);
    let offset = first.length;
    for (const chunk of this.#more ?? []) {
      body.set(chunk, offset);
      offset += chunk.length;
    }
    return body;
  }
}

/** Streams the body to the caller over `port`; holds at most RESPONSE_WINDOW bytes the caller has not read. */
export class PortSink implements ResponseSink {
  #port: RequestPort;
  #committed = false;
  #pending: Buffer[] = [];
  #pendingBytes = 0;
  #flushTimer: NodeJS.Immediate | undefined;
  /** Bytes posted to the caller, and bytes the caller says it consumed. */
  #sent = 0;
  #consumed = 0;
  #refused = false;
  #onWritable: (() => void) | undefined;
  #done = false;

  constructor(port: RequestPort) {
    this.#port = port;
  }

  get committed(): boolean {
    return this.#committed;
  }

  head(head: ResponseHead): void {
    this.#committed = true;
    this.#post({ t: 'head', head });
  }

  write(chunk: Buffer): boolean {
    if (this.#done) return true; // the caller is gone; the transfer is being cancelled
    if (this.#sent + this.#pendingBytes - this.#consumed >= RESPONSE_WINDOW) {
      this.#refused = true;
      return false;
    }
    this.#pending.push(chunk);
    this.#pendingBytes += chunk.length;
    if (this.#pendingBytes >= RESPONSE_CHUNK) this.#flush();
    else this.#flushTimer ??= setImmediate(() => this.#flush());
    return true;
  }

  onWritable(callback: () => void): void {
    this.#onWritable = callback;
  }

  reset(): void {
    this.#pending = [];
    this.#pendingBytes = 0;
  }

  /** The caller consumed this many bytes in all (a `credit` message). */
  credit(consumed: number): void {
    if (consumed > this.#consumed) this.#consumed = consumed;
    if (this.#refused && this.#sent + this.#pendingBytes - this.#consumed < RESPONSE_WINDOW) {
      this.#refused = false;
      this.#onWritable?.();
    }
  }

  /** The body is complete. */
  end(): void {
    this.#flush();
    this.#post({ t: 'end' });
    this.#done = true;
  }

  /** The transfer failed (before or after the head). */
  fail(error: PlainError): void {
    this.#pending = [];
    this.#pendingBytes = 0;
    this.#post({ t: 'error', error });
    this.#done = true;
  }

  #flush(): void {
    if (this.#flushTimer) {
      clearImmediate(this.#flushTimer);
      this.#flushTimer = undefined;
    }
    if (this.#pendingBytes === 0) return;
    // curl's chunks arrive in ArrayBuffers of their own (node-libcurl copies each): moved to the caller's thread,
    // not copied, so that this thread makes no garbage per chunk. Any other chunk is copied into one of its own.
    const chunks = this.#pending.map((chunk) =>
      chunk.byteOffset === 0 && chunk.buffer.byteLength === chunk.byteLength && chunk.buffer instanceof ArrayBuffer
        ? new Uint8Array(chunk.buffer)
        : new Uint8Array(chunk),
    );
    this.#pending = [];
    this.#sent += this.#pendingBytes;
    this.#pendingBytes = 0;
    this.#post(
      { t: 'data', chunks },
      chunks.map((chunk) => chunk.buffer as ArrayBuffer),
    );
  }

  #post(message: WorkerMessage, transfer?: ArrayBuffer[]): void {
    if (this.#done) return;
    this.#port.postMessage(message, transfer);
  }
}
