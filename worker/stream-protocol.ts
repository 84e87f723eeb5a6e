// Messages on a request's own MessagePort, between the caller's thread (SockpoolClient) and the worker thread that
// runs the transfer. A request gets a port only when it needs one: an AbortSignal, a streamed request body or a
// streamed response body. Buffered requests without a signal go through piscina alone.
//
// Flow control is by credit, in bytes, each side acknowledging what it consumed (absolute counts, so a lost
// acknowledgement is made good by the next): the worker sends response data while `sent - consumed` is below
// RESPONSE_WINDOW, then pauses curl's receiving (CURL_WRITEFUNC_PAUSE) until the caller's reads catch up; the caller
// sends request body data while `sent - acked` is below UPLOAD_WINDOW, and curl's READFUNCTION pauses
// (CURL_READFUNC_PAUSE) when the worker has nothing buffered.

import type { PlainError } from '../shared/errors.js';
import type { RelayedTls, TransferTimings } from './curl-engine.js';

/** Response bytes the worker may have sent beyond what the caller has read. */
export const RESPONSE_WINDOW = 1024 * 1024;
/** Request body bytes the caller may have sent beyond what curl has read. */
export const UPLOAD_WINDOW = 1024 * 1024;
/** The worker gathers response chunks into messages of about this many bytes. */
export const RESPONSE_CHUNK = 64 * 1024;
/** The caller splits request body chunks to at most this size. */
export const UPLOAD_CHUNK = 64 * 1024;

/** A request's port: a MessagePort to a worker thread, or an in-thread LocalPort (client/local-port.ts) when the
 *  runtime runs in the caller's thread. Only this much of MessagePort is used on either side. */
export interface RequestPort {
  postMessage(message: unknown, transfer?: ArrayBuffer[]): void;
  /** 'message' (a CallerMessage or a WorkerMessage) or 'close'. */
  // biome-ignore lint/suspicious/noExplicitAny: as MessagePort's and EventEmitter's own listeners (the message's type is the listener's)
  on(event: 'message' | 'close', listener: (...args: any[]) => void): unknown;
  close(): void;
  /**
   * Calls `then` once the messages this end posted so far have reached the other end: an in-thread pair
   * (client/local-port.ts) delivers them in a later turn, while a transfer's outcome is delivered as curl reports it,
   * so the outcome waits for them (a streamed response's head and chunks come before its end). Ports whose messages
   * travel with the outcome (a thread's lane) have none.
   */
  whenDelivered?(then: () => void): void;
}

/** Status line and headers of the final response, as soon as they are complete. */
export interface ResponseHead {
  status: number;
  headers: Array<[string, string]>;
  url: string;
  httpVersion: string;
  /** True when the transfer ran over a socket that was already connected before it started. */
  warm: boolean;
  /** How the connection was obtained: a daemon lease, curl's cache, or curl's own connect (fallback). */
  connection: 'leased' | 'reused' | 'direct';
  /** Set when the daemon did the TLS: curl spoke plaintext over a warm TLS session it relays (timings.tlsMs 0). */
  tls?: RelayedTls | undefined;
  /** The status line's reason phrase ('' over HTTP/2): streamed heads only (fetch() gives it as statusText). */
  statusText?: string | undefined;
  /** Timings up to the response head (totalMs: until then); a TransferResult's are the whole transfer's. */
  timings: TransferTimings;
}

/** Caller → worker. */
export type CallerMessage =
  /** Cancel the transfer (AbortSignal, timeout seen first by the caller, or the response body was cancelled). */
  | { t: 'abort'; error: PlainError }
  /** Response bytes the caller has consumed so far. */
  | { t: 'credit'; consumed: number }
  /** Request body data, the end of it, or the failure of the caller's stream. */
  | { t: 'data'; data: Uint8Array }
  | { t: 'end' }
  | { t: 'body-error'; error: PlainError };

/** Worker → caller. */
export type WorkerMessage =
  | { t: 'head'; head: ResponseHead }
  /** Response body chunks, in order (their buffers are transferred). */
  | { t: 'data'; chunks: Uint8Array[] }
  | { t: 'end' }
  | { t: 'error'; error: PlainError }
  /** Request body bytes curl has read so far. */
  | { t: 'ack'; consumed: number };
