// Where a transfer's request body comes from inside the worker: a buffer given whole (BufferSource), or chunks
// the caller's thread sends over the request's MessagePort as curl reads them (PortSource; see
// stream-protocol.ts). curl's READFUNCTION calls read(); with nothing buffered yet a PortSource answers PAUSE and
// calls back when data arrives, and the engine then resumes curl's sending.

import type { Buffer } from 'node:buffer';
import { type RequestPort, UPLOAD_WINDOW, type WorkerMessage } from './stream-protocol.js';

/** read() has nothing yet: pause sending until the readable callback runs. */
export const READ_PAUSE = Symbol('read-pause');

export interface UploadSource {
  /** Total length when known in advance (else curl sends it chunked on HTTP/1.1). */
  readonly length: number | undefined;
  /** Copies up to target.length bytes into target: their count, 0 at the end, or READ_PAUSE. */
  read(target: Buffer): number | typeof READ_PAUSE;
  /** Back to the first byte for another attempt; false when that is impossible (a stream already read from). */
  rewind(): boolean;
  /** The callback to run when a paused read would now return data or the end. */
  onReadable(callback: () => void): void;
}

export class BufferSource implements UploadSource {
  #data: Uint8Array;
  #offset = 0;

  constructor(data: Uint8Array) {
    this.#data = data;
  }

  get length(): number {
    return this.#data.length;
  }

  read(target: Buffer): number {
    const count = Math.min(target.length, this.#data.length - this.#offset);
    target.set(this.#data.subarray(this.#offset, this.#offset + count));
    this.#offset += count;
    return count;
  }

  rewind(): boolean {
    this.#offset = 0;
    return true;
  }

  onReadable(): void {}
}

export class PortSource implements UploadSource {
  readonly length: number | undefined;
  #port: RequestPort;
  #chunks: Uint8Array[] = [];
  /** Read position in #chunks[0]. */
  #offset = 0;
  #consumed = 0;
  #acked = 0;
  #ended = false;
  #waiting = false;
  #onReadable: (() => void) | undefined;

  constructor(port: RequestPort, length: number | undefined) {
    this.#port = port;
    this.length = length;
  }

  /** A `data` message. */
  push(data: Uint8Array): void {
    if (data.length === 0) return;
    this.#chunks.push(data);
    this.#wake();
  }

  /** An `end` message. */
  end(): void {
    this.#ended = true;
    this.#wake();
  }

  read(target: Buffer): number | typeof READ_PAUSE {
    // Under a declared length curl gets that many bytes and no more, whatever comes (the caller's end refuses a
    // longer body; this holds if it did not): past it, bytes would reach the origin as another request.
    const room = this.length === undefined ? target.length : Math.min(target.length, this.length - this.#consumed);
    if (room <= 0) return 0;
    if (this.#chunks.length === 0) {
      if (this.#ended) return 0;
      this.#waiting = true;
      return READ_PAUSE;
    }
    let count = 0;
    while (count < room && this.#chunks.length > 0) {
      const chunk = this.#chunks[0]!;
      const take = Math.min(room - count, chunk.length - this.#offset);
      target.set(chunk.subarray(this.#offset, this.#offset + take), count);
      count += take;
      this.#offset += take;
      if (this.#offset === chunk.length) {
        this.#chunks.shift();
        this.#offset = 0;
      }
    }
    this.#consumed += count;
    if (this.#consumed - this.#acked >= UPLOAD_WINDOW / 4 || this.#chunks.length === 0) {
      this.#acked = this.#consumed;
      this.#port.postMessage({ t: 'ack', consumed: this.#consumed } satisfies WorkerMessage);
    }
    return count;
  }

  rewind(): boolean {
    return this.#consumed === 0;
  }

  onReadable(callback: () => void): void {
    this.#onReadable = callback;
  }

  #wake(): void {
    if (!this.#waiting) return;
    this.#waiting = false;
    this.#onReadable?.();
  }
}
