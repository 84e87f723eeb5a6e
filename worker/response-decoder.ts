// Decoding of a compressed response body (`decompress`), done here and not by curl. curl 7.88 goes on decoding the
// rest of a read into its pause buffer after WRITEFUNCTION paused (up to 64 MiB, uncounted): a stream the caller did
// not read held that much of a hostile origin's compression bomb, each. curl now hands the body on as it came
// (HTTP_CONTENT_DECODING off; it still sends its Accept-Encoding), and a DecodingSink between curl and the response's
// sink decodes it with node:zlib streams, whose backpressure reaches curl: the sink refusing decoded bytes pauses the
// decoder, the decoder's input filling up refuses curl's chunk, and curl pauses (CURL_WRITEFUNC_PAUSE). A paused
// stream holds its response window and a decoder's buffers (tens of KiB; a zstd window up to 8 MiB, a brotli one up
// to 16 MiB), and maxBodyBytes counts decoded bytes as they are made.
//
// A body without a Content-Encoding (or only identity) passes through untouched: no zlib object, no copy. A small
// buffered body (request()) in one coding is decoded whole once curl is done, on this thread, as curl decoded it:
// streams cost a hop to libuv's threadpool per chunk (a 48 KB gzip page took 2.4 times as long to fetch).

import { Buffer, constants as bufferConstants } from 'node:buffer';
import type { Transform } from 'node:stream';
import {
  brotliDecompressSync,
  constants,
  createBrotliDecompress,
  createGunzip,
  createInflate,
  createInflateRaw,
  createZstdDecompress,
  gunzipSync,
  inflateRawSync,
  inflateSync,
  zstdDecompressSync,
} from 'node:zlib';
import { BufferSink, type ResponseSink } from './response-sink.js';
import type { ResponseHead } from './stream-protocol.js';

/** Codings decoded here; identity and none have nothing to undo. Any other fails the body, as curl failed it. */
const DECODED_CODINGS: ReadonlySet<string> = new Set(['gzip', 'x-gzip', 'deflate', 'br', 'zstd']);
const NO_CODINGS: ReadonlySet<string> = new Set(['identity', 'none']);
/** curl's bound on stacked codings (MAX_ENCODE_STACK): a response naming more fails (curl fails it itself, as it
 *  reads the head, while it is told to ask for codings; this is for the case it would not). */
const MAX_CODINGS = 5;
/** A zstd frame says how large a window its decoder needs (memory a hostile origin chooses; zstd's own bound lets
 *  it ask for 128 MiB): at most 8 MiB, as RFC 9659 has HTTP's zstd coding use (browsers refuse larger ones too). */
const ZSTD_WINDOW_LOG_MAX = 23;
/** A buffered body in one coding is kept coded up to this many bytes and decoded whole at its end (see the header);
 *  a longer one goes through the decoder streams from there. */
const WHOLE_MAX = 256 * 1024;

/** Why decoding failed: past maxBodyBytes, or a body that does not decode (the message says why). */
export type DecodeFailure = { kind: 'too-large' } | { kind: 'coding'; message: string };

/** The codings a response's head names, in the order they were applied; undefined when there is nothing to undo. */
export function codingsOf(headers: Array<[string, string]>): string[] | undefined {
  const codings: string[] = [];
  for (const [name, value] of headers) {
    if (name.toLowerCase() !== 'content-encoding') continue;
    for (const part of value.split(',')) {
      const coding = part.trim().toLowerCase();
      if (coding !== '') codings.push(coding);
    }
  }
  return codings.every((coding) => NO_CODINGS.has(coding)) ? undefined : codings;
}

/** Whether a body with these response headers is decoded as `decompress` asks (no codings, or only codings known
 *  here): fetch() asks again without decoding for one that is not (SockpoolClient.fetch). */
export function decodable(headers: Array<[string, string]>): boolean {
  const codings = codingsOf(headers);
  return !codings || codings.every(known);
}

function known(coding: string): boolean {
  return DECODED_CODINGS.has(coding) || NO_CODINGS.has(coding);
}

/** Decodes what curl writes (when the head names codings) into `inner`; see the header. One per transfer. */
export class DecodingSink implements ResponseSink {
  readonly inner: ResponseSink;
  readonly #limit: number;
  /** The head's codings (undefined: none, the body passes through); the decoders, made at the first body byte. */
  #codings: string[] | undefined;
  #stages: Transform[] | undefined;
  /** A buffered body's coded chunks while it may be decoded whole (see WHOLE_MAX), and their bytes. */
  #whole: Buffer[] | undefined;
  #wholeBytes = 0;
  #decoded = 0;
  /** Decoded chunks the inner sink refused (the last decoder is paused meanwhile). */
  #held: Buffer[] = [];
  /** A chunk of curl's was refused (the first decoder's input is full): curl is paused until it drains. */
  #refused = false;
  #failure: DecodeFailure | undefined;
  /** finish()'s callback, while the rest decodes. */
  #done: ((failure: DecodeFailure | undefined) => void) | undefined;
  #onWritable: (() => void) | undefined;
  #onFailure: ((failure: DecodeFailure) => void) | undefined;

  constructor(inner: ResponseSink, maxBodyBytes: number | undefined) {
    this.inner = inner;
    this.#limit = maxBodyBytes ?? Number.POSITIVE_INFINITY;
    inner.onWritable(() => this.#innerWritable());
  }

  get committed(): boolean {
    return this.inner.committed;
  }

  /** The body is decoded here (its head named codings): counted against maxBodyBytes here, decoded. */
  get decoding(): boolean {
    return this.#codings !== undefined;
  }

  head(head: ResponseHead): void {
    const codings = codingsOf(head.headers);
    this.#codings = codings;
    if (this.inner instanceof BufferSink && codings?.length === 1 && DECODED_CODINGS.has(codings[0]!)) this.#whole = [];
    this.inner.head(head);
  }

  write(chunk: Buffer): boolean {
    if (this.#codings === undefined) return this.inner.write(chunk);
    // Failed: curl stays paused until the engine stops the transfer (onFailure).
    if (this.#failure) return false;
    const whole = this.#whole;
    if (whole && this.#wholeBytes + chunk.length <= WHOLE_MAX) {
      whole.push(chunk);
      this.#wholeBytes += chunk.length;
      return true;
    }
    const stages = this.#stages ?? this.#makeStages(this.#codings, whole?.[0] ?? chunk);
    if (!stages) return false;
    const first = stages[0]!;
    if (whole) {
      // Too long to decode whole: what was kept goes in first (once past the input's mark, by WHOLE_MAX at most).
      this.#whole = undefined;
      for (const kept of whole) first.write(kept);
    }
    if (first.writableNeedDrain) {
      this.#refused = true;
      return false;
    }
    first.write(chunk);
    return true;
  }

  onWritable(callback: () => void): void {
    this.#onWritable = callback;
  }

  /** Decoding failed while curl still runs: the callback stops the transfer (never called from inside curl's). */
  onFailure(callback: (failure: DecodeFailure) => void): void {
    this.#onFailure = callback;
  }

  /** Drops the attempt's decoders and what they held (a retry, or the transfer failed). */
  reset(): void {
    this.#destroy();
    this.#codings = undefined;
    this.#whole = undefined;
    this.#wholeBytes = 0;
    this.#decoded = 0;
    this.#failure = undefined;
    this.#done = undefined;
    this.#refused = false;
    this.inner.reset();
  }

  /** curl has written the whole body: `done` once the rest is decoded into the inner sink, or with the failure. */
  finish(done: (failure: DecodeFailure | undefined) => void): void {
    if (this.#whole && this.#wholeBytes > 0 && !this.#failure) {
      done(this.#decodeWhole(this.#codings![0]!, Buffer.concat(this.#whole, this.#wholeBytes)));
      return;
    }
    if (this.#failure || !this.#stages) {
      // (No body came, or only a body that failed.)
      done(this.#failure);
      return;
    }
    this.#done = done;
    this.#stages[0]!.end();
  }

  /** A buffered body kept whole, decoded in one go into the inner sink (a BufferSink); its failure, if it fails. */
  #decodeWhole(coding: string, coded: Buffer): DecodeFailure | undefined {
    this.#whole = undefined;
    const limit = this.#limit;
    let decoded: Buffer;
    try {
      // (One byte past the limit is enough to know; node:zlib refuses a bound past a Buffer's largest.)
      const bound = Number.isFinite(limit) ? Math.min(limit + 1, bufferConstants.MAX_LENGTH) : undefined;
      decoded = decodeWhole(coding, coded, bound);
    } catch (error) {
      const code = (error as { code?: unknown }).code;
      if (code === 'ERR_BUFFER_TOO_LARGE' && Number.isFinite(limit)) return { kind: 'too-large' };
      return { kind: 'coding', message: (error as Error).message };
    }
    if (decoded.length > limit) return { kind: 'too-large' };
    this.#decoded = decoded.length;
    if (decoded.length > 0) this.inner.write(decoded);
    return undefined;
  }

  /** The decoders for the head's codings, last applied first; none (the body fails) for one not known here. */
  #makeStages(codings: string[], first: Buffer): Transform[] | undefined {
    if (codings.length > MAX_CODINGS) {
      this.#fail({ kind: 'coding', message: `Reject response due to ${codings.length} content encodings` });
      return undefined;
    }
    const unknown = codings.find((coding) => !known(coding));
    if (unknown !== undefined) {
      this.#fail({ kind: 'coding', message: `Unrecognized content encoding type: ${unknown}` });
      return undefined;
    }
    const stages: Transform[] = [];
    for (let i = codings.length - 1; i >= 0; i--) {
      const decoder = decoderFor(codings[i]!, stages.length === 0 ? first : undefined);
      if (decoder) stages.push(decoder);
    }
    for (let i = 0; i < stages.length; i++) {
      const stage = stages[i]!;
      stage.on('error', (error: Error) => {
        if (this.#stages === stages) this.#fail({ kind: 'coding', message: error.message });
      });
      if (i + 1 < stages.length) stage.pipe(stages[i + 1]!);
    }
    const last = stages.at(-1)!;
    stages[0]!.on('drain', () => {
      if (this.#stages !== stages || !this.#refused) return;
      this.#refused = false;
      this.#onWritable?.();
    });
    last.on('data', (decoded: Buffer) => {
      if (this.#stages === stages) this.#output(decoded, last);
    });
    last.on('end', () => {
      if (this.#stages !== stages) return;
      const done = this.#done;
      this.#done = undefined;
      done?.(undefined);
    });
    this.#stages = stages;
    return stages;
  }

  #output(decoded: Buffer, last: Transform): void {
    this.#decoded += decoded.length;
    if (this.#decoded > this.#limit) {
      this.#fail({ kind: 'too-large' });
      return;
    }
    if (this.#held.length > 0 || !this.inner.write(decoded)) {
      this.#held.push(decoded);
      last.pause();
    }
  }

  /** The inner sink has room again: what it refused goes first, then the last decoder flows again (or, passing
   *  through, curl's refused chunk is offered again). */
  #innerWritable(): void {
    if (this.#codings === undefined) {
      this.#onWritable?.();
      return;
    }
    const held = this.#held;
    while (held.length > 0) {
      if (!this.inner.write(held[0]!)) return;
      held.shift();
    }
    if (!this.#failure) this.#stages?.at(-1)?.resume();
  }

  #fail(failure: DecodeFailure): void {
    if (this.#failure) return;
    this.#failure = failure;
    this.#destroy();
    const done = this.#done;
    if (done) {
      this.#done = undefined;
      done(failure);
      return;
    }
    // (Maybe from inside WRITEFUNCTION, where curl refuses to have the transfer stopped. Not for a later attempt's:
    // reset() forgets the failure.)
    setImmediate(() => {
      if (this.#failure === failure) this.#onFailure?.(failure);
    });
  }

  #destroy(): void {
    const stages = this.#stages;
    this.#stages = undefined;
    this.#held = [];
    if (stages) for (const stage of stages) stage.destroy();
  }
}

/**
 * A decoder for one coding; undefined for identity. Cut-short gzip, deflate and br bodies give what they decoded, as
 * curl and Node's fetch give it (flushed, not failed at the end); zstd fails there, as Node's fetch fails it. A deflate
 * body that is raw deflate (no zlib header, as some servers send it) is taken as such, as curl and Node's fetch take
 * it, when it is the last coding applied (`first`: the first bytes on the wire).
 */
function decoderFor(coding: string, first: Buffer | undefined): Transform | undefined {
  switch (coding) {
    case 'gzip':
    case 'x-gzip':
      return createGunzip(ZLIB_OPTIONS);
    case 'deflate':
      return isRawDeflate(first) ? createInflateRaw(ZLIB_OPTIONS) : createInflate(ZLIB_OPTIONS);
    case 'br':
      return createBrotliDecompress(BROTLI_OPTIONS);
    case 'zstd':
      return createZstdDecompress(ZSTD_OPTIONS);
    default:
      return undefined;
  }
}

/** decoderFor() in one go, for a body kept whole (one coding known here); throws as node:zlib does, a RangeError
 *  ERR_BUFFER_TOO_LARGE past `maxOutputLength`. */
function decodeWhole(coding: string, coded: Buffer, maxOutputLength: number | undefined): Buffer {
  const limit = maxOutputLength === undefined ? {} : { maxOutputLength };
  switch (coding) {
    case 'deflate':
      return isRawDeflate(coded)
        ? inflateRawSync(coded, { ...ZLIB_OPTIONS, ...limit })
        : inflateSync(coded, { ...ZLIB_OPTIONS, ...limit });
    case 'br':
      return brotliDecompressSync(coded, { ...BROTLI_OPTIONS, ...limit });
    case 'zstd':
      return zstdDecompressSync(coded, { ...ZSTD_OPTIONS, ...limit });
    default:
      return gunzipSync(coded, { ...ZLIB_OPTIONS, ...limit });
  }
}

const ZLIB_OPTIONS = { finishFlush: constants.Z_SYNC_FLUSH };
const BROTLI_OPTIONS = { flush: constants.BROTLI_OPERATION_FLUSH, finishFlush: constants.BROTLI_OPERATION_FLUSH };
const ZSTD_OPTIONS = { params: { [constants.ZSTD_d_windowLogMax]: ZSTD_WINDOW_LOG_MAX } };

/** A deflate body without the zlib header (whose first byte has compression method 8 in its low nibble). */
function isRawDeflate(first: Buffer | undefined): boolean {
  return first !== undefined && first.length > 0 && (first[0]! & 0x0f) !== 0x08;
}
