// One direction of a relayed warm TLS session (tls-relay-thread.ts: origin to client, client to origin): what the
// source reads goes to the destination one write at a time; what comes while a write is on its way is held as bytes
// (relay-bytes.ts, Joined), and the source's reads stop while FLOW_BOUND bytes or more are held.
//
// Not the streams' own backpressure (write() until it says false, then pause() the source until 'drain'): a
// Writable takes what it is given up to its high-water mark in bytes, and a paused Readable goes on reading up to its
// own, each holding the source's chunks as they came, a Buffer and its bookkeeping each (hundreds of bytes). An origin
// chooses its TLS records' sizes (one byte each) as a client chooses its writes', and a client that reads nothing
// (or an origin) leaves them there: one session held some 100 MB of the daemon's memory that way
// (test/daemon-trust-relay-memory). Here the destination has at most one write's entries, the source stops reading at
// once (its stream handle's readStop: no Readable buffer fills behind it), and what a TLS socket still hands over
// after that (every record of the read it made) is joined with the rest.

import type { Buffer } from 'node:buffer';
import process from 'node:process';
import type { Writable } from 'node:stream';
import { Joined } from './relay-bytes.js';

/**
 * Bytes held for the destination while a write is on its way, past which the source stops reading: a few reads of
 * bulk data, which so still flows one write behind another.
 */
const FLOW_BOUND = 64 * 1024;

/**
 * A source's reads, stopped and started again (its stream handle's readStop and readStart). `start` may find the
 * source gone instead (its end reset meanwhile) and end the Flow there (end(true)): what is held then never goes.
 */
export interface Reads {
  stop(): void;
  start(): void;
}

export class Flow {
  readonly #to: Writable;
  readonly #reads: Reads;
  readonly #held = new Joined();
  #writing = false;
  #flushScheduled = false;
  #stopped = false;
  #ended = false;

  constructor(to: Writable, reads: Reads) {
    this.#to = to;
    this.#reads = reads;
  }

  /** Bytes on their way: held, or in the destination (its socket is full), also those written with end(). */
  get busy(): boolean {
    return this.#writing || this.#held.length > 0 || this.#to.writableLength > 0;
  }

  push(chunk: Buffer): void {
    this.#held.push(chunk);
    // The records TLS decrypts from one read come as separate chunks in the same tick: they go out together (one
    // writev) once the tick's chunks are in.
    if (!this.#writing && !this.#flushScheduled) {
      this.#flushScheduled = true;
      process.nextTick(this.#flush);
    }
    if (!this.#stopped && this.#held.length >= FLOW_BOUND) {
      this.#stopped = true;
      this.#reads.stop();
    }
  }

  /**
   * The source ended: what is held goes after what is on its way, then the destination's end. `discard`: the source
   * was reset, its bytes not all sent: what is held is dropped (what is on its way, already in the destination,
   * still goes), as a reset drops what its sender's kernel had not sent yet.
   */
  end(discard = false): void {
    if (this.#ended) return;
    this.#ended = true;
    const held = this.#held.take();
    if (!discard) this.#write(held);
    this.#to.end();
  }

  readonly #flush = (): void => {
    this.#flushScheduled = false;
    if (this.#writing || this.#ended || this.#to.destroyed) return;
    if (this.#stopped) {
      // Reads start again before what is held goes: a source that was reset while they were stopped is found there
      // (its reset reads only after the bytes its kernel still queues), and what is held is dropped (end(true)).
      this.#stopped = false;
      this.#reads.start();
      // (Or the session ended there, its destination destroyed.)
      if (this.#ended || this.#to.destroyed) return;
    }
    const entries = this.#held.take();
    if (entries.length === 0) return;
    this.#writing = true;
    this.#write(entries, this.#written);
  };

  readonly #written = (error?: Error | null): void => {
    this.#writing = false;
    if (!error) this.#flush();
  };

  /** `entries` in one writev; `done` after the last. */
  #write(entries: Buffer[], done?: (error?: Error | null) => void): void {
    if (entries.length > 1) this.#to.cork();
    for (let index = 0; index < entries.length; index++) {
      if (index === entries.length - 1 && done) this.#to.write(entries[index], done);
      else this.#to.write(entries[index]);
    }
    if (entries.length > 1) this.#to.uncork();
  }
}
