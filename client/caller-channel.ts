// The caller's end of a request's port (see stream-protocol.ts): it forwards cancellation to the worker, pumps a
// streamed request body into it under the upload window, and turns the response head and body chunks coming back
// into a promise and a ReadableStream whose reads grant the worker more credit.
//
// The port is one of two kinds, neither a MessageChannel (making one and sending a message through it costs about
// as much as the rest of a small request, docs/benchmarks.md, tenth session):
// - on a worker thread's lane (`port`, from ThreadLanes.stream: ../worker/lane-port.ts), when a worker thread runs
//   the request: its messages travel in the lane's batches;
// - otherwise an in-thread LocalPort pair (threads: 0, or a request alone in flight; local-port.ts), whose other end
//   (`workerPort`) goes to the runtime in this thread with the task.
// This end closes when the response is complete, fails or is cancelled (the worker's end then cancels the transfer
// if it still runs). Neither kind holds a handle: while the transfer runs, its deadline timer (SockpoolClient#run)
// keeps the process alive (and, with a LocalPort pair, the immediates that deliver its last messages after that).

import { ErrorCodes, fromPlainError, SockpoolError, toPlainError } from '../shared/errors.js';
import {
  type CallerMessage,
  RESPONSE_WINDOW,
  type RequestPort,
  type ResponseHead,
  UPLOAD_CHUNK,
  UPLOAD_WINDOW,
  type WorkerMessage,
} from '../worker/stream-protocol.js';
import { LocalPort } from './local-port.js';

export type BodyStream = ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

export interface CallerChannelOptions {
  /** The response body comes back as a stream (else the worker returns it whole through piscina). */
  streamResponse: boolean;
  /** A request body to send in chunks. */
  upload?: BodyStream | undefined;
  /** The content-length the caller declared for `upload`: the body must be exactly that long (see #pump). */
  uploadLength?: number | undefined;
  /** The caller's end of the request's port on a worker thread's lane (ThreadLanes.stream). */
  port?: RequestPort | undefined;
  /** What the response body fails with for a failure (fetch(): as Node's fetch's body fails); default the failure. */
  bodyFailure?: ((error: Error) => unknown) | undefined;
}

export class CallerChannel {
  /** Without `port`: the other end of an in-thread pair, for the runtime in this thread (with the task). */
  readonly workerPort: RequestPort | undefined;
  /** Resolves with the response head (streamed responses only). */
  readonly head: Promise<ResponseHead>;
  /** The response body (streamed responses only). */
  readonly body: ReadableStream<Uint8Array> | undefined;
  #port: RequestPort;
  #done = false;
  #resolveHead!: (head: ResponseHead) => void;
  #rejectHead!: (error: Error) => void;
  #body: ReadableStreamDefaultController<Uint8Array> | undefined;
  /** Response bytes received, and the consumed count last granted to the worker. */
  #received = 0;
  #granted = 0;
  /** Request body bytes curl has read (worker's acks), and a pump waiting for them. */
  #acked = 0;
  #wakePump: (() => void) | undefined;
  /** The request body being read, until it is read to its end: close() cancels it (even while a read is pending). */
  #source: UploadSource | undefined;
  #bodyFailure: ((error: Error) => unknown) | undefined;
  /** The response's end came: the body closes once the reader has taken what is queued (#closeIfDrained). */
  #ended = false;
  /** The response body is over for the reader: read to its end, failed or cancelled. */
  #bodyOver = false;
  /** Stops following the caller's signal (followSignal), if it does. */
  #unfollow: (() => void) | undefined;

  constructor(options: CallerChannelOptions) {
    this.#bodyFailure = options.bodyFailure;
    let port1: RequestPort;
    if (options.port) {
      port1 = options.port;
      this.workerPort = undefined;
    } else [port1, this.workerPort] = LocalPort.pair();
    this.#port = port1;
    this.head = new Promise<ResponseHead>((resolve, reject) => {
      this.#resolveHead = resolve;
      this.#rejectHead = reject;
    });
    // Only streamed responses have a head here; keep an unused rejection from being reported as unhandled.
    this.head.catch(() => {});
    if (options.streamResponse) {
      this.body = new ReadableStream<Uint8Array>(
        {
          start: (controller) => {
            this.#body = controller;
          },
          pull: () => (this.#ended ? this.#closeIfDrained() : this.#grant()),
          cancel: () => {
            this.#bodyIsOver();
            this.abort(new SockpoolError(ErrorCodes.ABORTED, 'the response body was cancelled'));
          },
        },
        { highWaterMark: RESPONSE_WINDOW, size: (chunk) => chunk?.byteLength ?? 0 },
      );
    }
    port1.on('message', (message: WorkerMessage) => this.#onMessage(message));
    if (options.upload) void this.#pump(options.upload, options.uploadLength);
  }

  /** Cancels the transfer in the worker and fails whatever is still open here with `error`. */
  abort(error: Error): void {
    if (this.#done) return;
    this.#post({ t: 'abort', error: toPlainError(error) });
    this.fail(error);
  }

  /** Fails the head and the body with `error` (the worker died, or the request was aborted) and closes. */
  fail(error: Error): void {
    if (this.#done) return;
    this.#rejectHead(error);
    this.#failBody(error);
    this.close(error);
  }

  /**
   * After the transfer ended: `signal` firing still fails the body while the reader has not taken all of it, with
   * `error()`, as Node's fetch fails a body it holds when its signal fires. A small body's transfer ends about when
   * its head arrives, in the worker or in this thread, long before the caller reads it: the signal's listener of the
   * request (SockpoolClient#run) is gone by then. Followed until the body is over (read to its end, failed or
   * cancelled), or until nobody holds the body any more (bodyListeners): a long-lived signal shared by many requests
   * whose bodies are left unread keeps no listener for each.
   */
  followSignal(signal: AbortSignal, error: (signal: AbortSignal) => Error): void {
    if (!this.#body || this.#bodyOver || this.#unfollow) return;
    if (signal.aborted) {
      this.abortBody(error(signal));
      return;
    }
    // (Weakly: the signal may outlive the body by far, and must not keep it and its chunks alive. `error` must not
    // hold the channel either, as a closure over a scope that has it would: a module's function.)
    const channel = new WeakRef(this);
    const listener = () => channel.deref()?.abortBody(error(signal));
    signal.addEventListener('abort', listener, { once: true });
    const unfollow = () => signal.removeEventListener('abort', listener);
    this.#unfollow = unfollow;
    bodyListeners.register(this, unfollow, this);
  }

  /** The caller's signal fired after the transfer ended (followSignal): what the reader has not taken fails. */
  abortBody(error: Error): void {
    if (this.#bodyOver) return;
    if (this.#done) this.#failBody(error);
    // (Its last messages may still be on their way in this thread's port pair: they are dropped.)
    else this.fail(error);
  }

  #failBody(error: Error): void {
    if (!this.#body || this.#bodyOver) return;
    try {
      this.#body.error(this.#bodyFailure ? this.#bodyFailure(error) : error);
    } catch {
      // already closed or errored
    }
    this.#bodyIsOver();
  }

  /** The end came: the body closes once the reader took what is queued (a read past it then says done). */
  #closeIfDrained(): void {
    const body = this.#body;
    if (!body || this.#bodyOver || (body.desiredSize ?? 0) < RESPONSE_WINDOW) return;
    body.close();
    this.#bodyIsOver();
  }

  #bodyIsOver(): void {
    if (this.#bodyOver) return;
    this.#bodyOver = true;
    const unfollow = this.#unfollow;
    if (!unfollow) return;
    this.#unfollow = undefined;
    unfollow();
    bodyListeners.unregister(this);
  }

  /** Closes this end; a request body still being read is cancelled (with `reason`, the failure if there was one). */
  close(reason?: Error): void {
    if (this.#done) return;
    this.#done = true;
    this.#wakePump?.();
    // A body not read to its end (the transfer ended, failed or was cancelled first): stop reading it. A source that
    // has stalled would otherwise keep its reader waiting forever (a ReadableStream left locked, a file or a socket
    // left open).
    const source = this.#source;
    this.#source = undefined;
    source?.cancel(reason ?? new SockpoolError(ErrorCodes.ABORTED, 'the request ended before its body was read'));
    this.#port.close();
  }

  #onMessage(message: WorkerMessage): void {
    if (this.#done) return;
    switch (message.t) {
      case 'head':
        this.#resolveHead(message.head);
        return;
      case 'data':
        for (const chunk of message.chunks) {
          this.#received += chunk.byteLength;
          this.#body?.enqueue(chunk);
        }
        return;
      case 'end':
        // (Closed once drained, not now: until then the caller's signal may still fail it, see followSignal.)
        this.#ended = true;
        this.#closeIfDrained();
        this.close();
        return;
      case 'error':
        this.fail(fromPlainError(message.error));
        return;
      case 'ack':
        this.#acked = Math.max(this.#acked, message.consumed);
        this.#wakePump?.();
        return;
    }
  }

  /** pull(): the reader took data; tell the worker how much has been consumed in all (see stream-protocol.ts). */
  #grant(): void {
    if (!this.#body || this.#done) return;
    const queued = RESPONSE_WINDOW - (this.#body.desiredSize ?? RESPONSE_WINDOW);
    const consumed = this.#received - Math.max(0, queued);
    if (consumed > this.#granted && (consumed - this.#granted >= RESPONSE_WINDOW / 4 || queued <= 0)) {
      this.#granted = consumed;
      this.#post({ t: 'credit', consumed });
    }
  }

  /** Sends the request body, never more than UPLOAD_WINDOW bytes ahead of what curl has read. */
  /**
   * Sends the request body as it is read, within the worker's window. Under a declared content-length the body must
   * be exactly that long, checked before each piece goes: curl sends what it is given after the length it declared,
   * and on a kept-alive connection the origin reads that rest as another request, whose answer the next request on
   * the connection gets. A body shorter than declared fails at its end, not at the deadline (the origin would wait
   * for the rest). Either failure cancels the transfer (`body-error`); curl then closes the connection.
   */
  async #pump(upload: BodyStream, length: number | undefined): Promise<void> {
    let sent = 0;
    let source: UploadSource | undefined;
    try {
      source = this.#source = openSource(upload);
      for (;;) {
        const next = await source.next();
        if (this.#done) return;
        if (next.done) break;
        const chunk = bytesOf(next.value);
        for (let offset = 0; offset < chunk.byteLength; offset += UPLOAD_CHUNK) {
          while (sent - this.#acked >= UPLOAD_WINDOW && !this.#done) {
            await new Promise<void>((resolve) => {
              this.#wakePump = resolve;
            });
            this.#wakePump = undefined;
          }
          if (this.#done) return;
          if (length !== undefined && sent + Math.min(UPLOAD_CHUNK, chunk.byteLength - offset) > length) {
            throw new SockpoolError(
              ErrorCodes.REQUEST_BODY,
              `the request body is longer than its content-length, ${length} bytes; nothing past it is sent`,
              { contentLength: length },
            );
          }
          // A copy in a buffer of its own, transferred (the caller may reuse or pool its chunk).
          const piece = chunk.slice(offset, offset + UPLOAD_CHUNK);
          sent += piece.byteLength; // (before the transfer detaches it)
          this.#post({ t: 'data', data: piece }, [piece.buffer as ArrayBuffer]);
        }
      }
      // Read to its end: nothing left to cancel.
      this.#source = undefined;
      if (length !== undefined && sent !== length) {
        throw new SockpoolError(
          ErrorCodes.REQUEST_BODY,
          `the request body ended after ${sent} of its content-length's ${length} bytes`,
          { contentLength: length, sent },
        );
      }
      this.#post({ t: 'end' });
    } catch (error) {
      const failure =
        error instanceof SockpoolError
          ? error
          : new SockpoolError(ErrorCodes.REQUEST_BODY, `the request body stream failed: ${(error as Error)?.message}`);
      // The source failed, or yielded something other than bytes: it is read no further.
      if (this.#source === source) {
        this.#source = undefined;
        source?.cancel(failure);
      }
      this.#post({ t: 'body-error', error: toPlainError(failure) });
    } finally {
      source?.release();
    }
  }

  #post(message: CallerMessage, transfer?: ArrayBuffer[]): void {
    if (this.#done) return;
    this.#port.postMessage(message, transfer);
  }
}

/** Stops following the signal of a body nobody holds any more (CallerChannel.followSignal). */
const bodyListeners = new FinalizationRegistry<() => void>((unfollow) => unfollow());

/** A request body being read, whichever kind it is, and how to stop reading it. */
interface UploadSource {
  next(): Promise<IteratorResult<unknown>>;
  /** Stops the source, a read pending or not (that read then ends or fails); never throws. */
  cancel(reason: Error): void;
  /** After the last read: lets go of the source (a ReadableStream's lock). */
  release(): void;
}

/**
 * A ReadableStream is read through a reader of its own, which cancel() cancels (a read pending on a stalled source
 * then ends; the lock is released after it). A Node Readable is destroyed (its file or socket closed). Any other
 * AsyncIterable is asked to return(), all that can be done (an async generator waiting inside does so once that wait
 * ends).
 */
function openSource(upload: BodyStream): UploadSource {
  if (upload instanceof ReadableStream) {
    const reader = (upload as ReadableStream<unknown>).getReader();
    return {
      next: () => reader.read() as Promise<IteratorResult<unknown>>,
      cancel: (reason) => void reader.cancel(reason).catch(() => {}),
      release: () => reader.releaseLock(),
    };
  }
  const iterator = (upload as AsyncIterable<unknown>)[Symbol.asyncIterator]();
  const readable = upload as Partial<NodeReadableLike>;
  const cancel =
    typeof readable.destroy === 'function' && typeof readable.pipe === 'function'
      ? // (No error given: destroying with one would emit 'error' on a stream nobody may listen to any more.)
        () => void readable.destroy!()
      : () => {
          try {
            void Promise.resolve(iterator.return?.()).catch(() => {});
          } catch {
            // an iterator whose return() throws: nothing more to do
          }
        };
  return { next: () => iterator.next(), cancel, release: () => {} };
}

/** A Node Readable (or anything like one) as far as cancelling it goes. */
interface NodeReadableLike {
  destroy(error?: Error): unknown;
  pipe(destination: unknown): unknown;
}

/** A streamed body's chunk as a plain Uint8Array (a fresh one: slice() below copies). */
function bytesOf(chunk: unknown): Uint8Array {
  if (chunk instanceof Uint8Array) return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  if (typeof chunk === 'string') return new TextEncoder().encode(chunk);
  if (ArrayBuffer.isView(chunk)) return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  if (chunk instanceof ArrayBuffer) return new Uint8Array(chunk);
  throw new SockpoolError(ErrorCodes.REQUEST_BODY, `a request body stream yielded ${typeof chunk}, not bytes`);
}
