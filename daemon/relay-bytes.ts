// What a warm TLS relay thread keeps of an idle session's origin (tls-relay-thread.ts: what it sends before the
// client speaks, MAX_EARLY_BYTES at most), kept as bytes, never as the chunks they came in. TLS gives each record it
// decrypts as a chunk of its own (a Buffer and its bookkeeping: a few hundred bytes of the thread's memory), and the
// origin chooses its records' sizes: one byte each, 23 on the wire. Kept as chunks, 60,000 one-byte records held
// ~40 MB of the daemon's memory for one idle session, so that a uid's few dozen sessions to such an origin (prewarmed,
// or lent and not spoken on yet) took the unit's MemoryMax (test/daemon-trust-relay-memory). Here they take their
// bytes, in a buffer at most twice as large and never larger than its holder's bound.

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
