// What a warm TLS relay thread keeps of an idle session's origin (tls-relay-thread.ts: what it sends before the
// client speaks, MAX_EARLY_BYTES at most), kept as bytes, never as the chunks they came in. TLS gives each record it
// decrypts as a chunk of its own (a Buffer and its bookkeeping: a few hundred bytes of the thread's memory), and the
// origin chooses its records' sizes: one byte each, 23 on the wire. Kept as chunks, 60,000 one-byte records held
// ~40 MB of the daemon's memory for one idle session, so that a uid's few dozen sessions to such an origin (prewarmed,
// or lent and not spoken on yet) took the unit's MemoryMax (test/daemon-trust-relay-memory). Here they take their
// bytes, in a buffer at most twice as large and never larger than its holder's bound.
import { Buffer } from 'node:buffer';

/** Chunks kept as they came before they are copied into the buffer (the common case, a few records: no copy). */
const CHUNKS_BEFORE_COPY = 16;

/** Bytes in arrival order: at most CHUNKS_BEFORE_COPY chunks as they came, after one buffer grown by doubling. */
export class Bytes {
  /** The buffer grows by doubling up to this (then to what is held): its holder keeps no more. */
  readonly #most: number;
  #chunks: Buffer[] = [];
  #buffer: Buffer | undefined;
  /** Bytes at the start of #buffer; the chunks come after them. */
  #copied = 0;
  #length = 0;

  constructor(most = Number.POSITIVE_INFINITY) {
    this.#most = most;
  }

  get length(): number {
    return this.#length;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#length += chunk.length;
    if (this.#chunks.length > CHUNKS_BEFORE_COPY) this.#copy();
  }

  /** Everything held, as one Buffer (undefined when nothing is); empty after. */
  take(): Buffer | undefined {
    if (this.#length === 0) return undefined;
    let all: Buffer;
    if (this.#copied === 0 && this.#chunks.length === 1) all = this.#chunks[0]!;
    else if (this.#copied === 0) all = Buffer.concat(this.#chunks, this.#length);
    else {
      this.#copy();
      all = this.#buffer!.subarray(0, this.#copied);
    }
    this.clear();
    return all;
  }

  clear(): void {
    this.#chunks = [];
    this.#buffer = undefined;
    this.#copied = 0;
    this.#length = 0;
  }

  /** The chunks into the buffer, grown to twice its size (at most #most, or to what is held, if more) when they do
   *  not fit. */
  #copy(): void {
    if (this.#buffer === undefined || this.#buffer.length < this.#length) {
      const grown = Buffer.allocUnsafe(Math.max(this.#length, Math.min(2 * (this.#buffer?.length ?? 0), this.#most)));
      this.#buffer?.copy(grown, 0, 0, this.#copied);
      this.#buffer = grown;
    }
    for (const chunk of this.#chunks) {
      chunk.copy(this.#buffer, this.#copied);
      this.#copied += chunk.length;
    }
    this.#chunks = [];
  }
}

/** Chunks at least this long are kept as they came (bulk data: TLS's 16 KiB records, a socket's reads), never copied;
 *  shorter ones are copied together, so that what they cost is their bytes, not a Buffer each. */
const SMALL_CHUNK = 1024;
/** The buffers short chunks are copied into. */
const JOIN_BYTES = 4 * 1024;

/**
 * Bytes on their way to a relay's destination (relay-flow.ts), in arrival order, as few Buffers: chunks under
 * SMALL_CHUNK are copied together into buffers of JOIN_BYTES, longer ones are kept as they came. So what is held
 * costs about its bytes whatever the chunks were (a Buffer per one-byte record cost hundreds of bytes), and bulk data
 * is not copied.
 */
export class Joined {
  #entries: Buffer[] = [];
  /** The buffer short chunks are copied into: its bytes from #start to #end are held (those before were taken, and
   *  may still be on their way: never written over). */
  #join: Buffer | undefined;
  #start = 0;
  #end = 0;
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#length += chunk.length;
    if (chunk.length >= SMALL_CHUNK) {
      this.#close();
      this.#entries.push(chunk);
      return;
    }
    if (this.#join === undefined || this.#end + chunk.length > this.#join.length) {
      this.#close();
      this.#join = Buffer.allocUnsafe(JOIN_BYTES);
      this.#start = 0;
      this.#end = 0;
    }
    chunk.copy(this.#join, this.#end);
    this.#end += chunk.length;
  }

  /** Everything held, in order (an empty array when nothing is); empty after. */
  take(): Buffer[] {
    this.#close();
    const entries = this.#entries;
    this.#entries = [];
    this.#length = 0;
    return entries;
  }

  /** What the join buffer holds becomes an entry; short chunks after it go on filling the buffer's rest. */
  #close(): void {
    if (this.#join === undefined || this.#end === this.#start) return;
    this.#entries.push(this.#join.subarray(this.#start, this.#end));
    this.#start = this.#end;
  }
}
