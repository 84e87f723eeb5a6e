// A worker thread's lane: one MessagePort per thread, opened by the thread when it starts, that carries the
// thread's requests and their outcomes in batches, beside piscina. A task through piscina costs a message each way
// per request, each waking the other thread, plus piscina's own bookkeeping; over the lane, the requests a caller
// makes in one turn of its event loop go to the thread in one message, and the outcomes the thread has at the end
// of one of its turns come back in one. A request that streams a body either way (requestStream(), fetch(), a
// streamed upload) has a port of its own on the lane (lane-port.ts): its messages (stream-protocol.ts: head, body
// chunks, credit, aborts) travel in the same batches, tagged with its id, so a small fetch() costs no MessageChannel
// and usually one lane message back. Only prewarm and stats go through piscina.
//
// The thread posts `{ [LANE]: port }` on its parentPort once (piscina hands it to the pool's 'message' listeners);
// the caller keeps the other end. If the thread dies, the caller's end closes and the requests in flight on that
// lane fail with SOCKPOOL_ERR_WORKER_EXITED. Response bodies are transferred (moved), never copied.

import type { MessagePort } from 'node:worker_threads';
import type { PlainError } from '../shared/errors.js';
import type { TransferOutcome, TransferRequest, TransferResult } from './curl-engine.js';

/** The key of the message that hands the caller a thread's lane: `{ [LANE]: port, threadId }`. */
export const LANE = 'sockpoolLane';

/** The key of the message a thread posts instead when it could not start (task-entry.cts, which cannot import this
 *  module and spells the key out): `{ [STARTUP_FAILED]: { message, code }, threadId }`. Once no thread can start,
 *  the caller fails the requests waiting for a lane at once instead of at their deadlines. */
export const STARTUP_FAILED = 'sockpoolStartupFailed';

/** What a thread posts on its parentPort when it starts (piscina's 'message' event on the caller's side). */
export interface ThreadAnnouncement {
  [LANE]?: MessagePort;
  [STARTUP_FAILED]?: { message: string; code: string | undefined };
  threadId?: number;
}

// The messages are flat arrays of primitives, a fixed number of slots per call or reply, not an object per call:
// a structured clone pays for every object and array it copies, and a request or an outcome as objects is a
// handful of each (the request, its header pairs; the outcome, its result, timings and header pairs).
// docs/benchmarks.md ("Tenth session") has what the flat form saved.

/** Caller → thread: one message, CALL_SLOTS values per call. A request to run:
 *  `id, url, method, headers (name, value, name, value, …), body, deadline, timeoutMs, flags, maxBodyBytes (-1:
 *  none)` (CALL_ABORTABLE,
 *  CALL_PORT, CALL_STREAM_RESPONSE, CALL_DECOMPRESS; `body`: the bytes, or for a streamed request body its declared length, -1 when
 *  none was declared). A cancellation of buffered request `id` (the caller already failed it: its signal fired or
 *  its deadline passed there): `id, error (a PlainError), 0, …`. A port event of request `id`: `id, PORT_MESSAGE,
 *  message, 0, …` or `id, PORT_CLOSE, 0, …`. The second slot tells them apart: a URL string, an object, a number. */
export type LaneCalls = unknown[];

export const CALL_SLOTS = 9;

/** A buffered request's flag: an abort for it may follow (the caller gave an AbortSignal). */
export const CALL_ABORTABLE = 1;
/** The request has a port of its own on the lane (lane-port.ts): its port events follow, tagged with its id. */
export const CALL_PORT = 2;
/** The response body streams over the request's port (TransferRequest.streamResponse). */
const CALL_STREAM_RESPONSE = 4;
/** TransferRequest.decompress. */
const CALL_DECOMPRESS = 8;
/** The flags that describe the request itself, not how it travels. */
const REQUEST_FLAGS = CALL_STREAM_RESPONSE | CALL_DECOMPRESS;

/** Slot 1 of a call or a reply that is an event of a request's port: a message (slot 2), or the port closed. Never a
 *  status (a reply's) nor a URL (a call's). */
const PORT_MESSAGE = -1;
const PORT_CLOSE = -2;

/** Queues a request: buffered (`CALL_ABORTABLE` if the caller may abort it), or with a port (`CALL_PORT`). */
export function pushRequestCall(calls: LaneCalls, id: number, request: TransferRequest, flags: number): void {
  const streamed = request.streamedBody;
  calls.push(
    id,
    request.url,
    request.method,
    flatHeaders(request.headers),
    streamed ? (streamed.length ?? -1) : request.body,
    request.deadline,
    request.timeoutMs,
    flags | (request.streamResponse ? CALL_STREAM_RESPONSE : 0) | (request.decompress ? CALL_DECOMPRESS : 0),
    request.maxBodyBytes ?? -1,
  );
}

/** Queues an event of request `id`'s port (caller → thread: `slots` CALL_SLOTS; thread → caller: REPLY_SLOTS): a
 *  message, or (`message` undefined) the port's close. */
export function pushPortEvent(queue: unknown[], slots: number, id: number, message: unknown): void {
  queue.push(id, message === undefined ? PORT_CLOSE : PORT_MESSAGE, message ?? 0);
  for (let slot = 3; slot < slots; slot++) queue.push(0);
}

export function pushAbortCall(calls: LaneCalls, id: number, error: PlainError): void {
  calls.push(id, error, 0, 0, 0, 0, 0, 0, 0);
}

/**
 * Takes out of calls not sent yet the requests whose body bytes can no longer be cloned (the caller detached their
 * ArrayBuffer, e.g. by transferring it, after handing them over) and returns their ids: postMessage would throw a
 * DataCloneError for the whole batch, losing the other calls in it. Bodies are the caller's own bytes, not copied
 * (a copy per request costs more than this look).
 */
export function takeDetachedCalls(calls: LaneCalls): number[] | undefined {
  let ids: number[] | undefined;
  for (let i = 0; i < calls.length; ) {
    const body = calls[i + 4];
    if (typeof calls[i + 1] === 'string' && body instanceof Uint8Array && isDetached(body)) {
      ids ??= [];
      ids.push(calls[i] as number);
      calls.splice(i, CALL_SLOTS);
    } else i += CALL_SLOTS;
  }
  return ids;
}

/** Whether a view's buffer was detached (transferred): then it reads as empty and cannot be cloned. */
export function isDetached(bytes: Uint8Array): boolean {
  return (bytes.buffer as ArrayBuffer & { detached?: boolean }).detached === true;
}

/** Takes buffered request `id` out of calls not sent yet; false if it is not among them. */
export function removeCall(calls: LaneCalls, id: number): boolean {
  for (let i = 0; i < calls.length; i += CALL_SLOTS) {
    if (calls[i] === id && typeof calls[i + 1] === 'string') {
      calls.splice(i, CALL_SLOTS);
      return true;
    }
  }
  return false;
}

/** What a port event's reader does with it. */
export interface PortEvents {
  portMessage(id: number, message: unknown): void;
  portClose(id: number): void;
}

/** What the thread does with the calls it reads. `flags`: CALL_ABORTABLE, CALL_PORT. */
export interface CallHandlers extends PortEvents {
  run(id: number, request: TransferRequest, flags: number): void;
  abort(id: number, error: PlainError): void;
}

/** Reads one message of calls, in order. */
export function readCalls(calls: LaneCalls, handlers: CallHandlers): void {
  for (let i = 0; i + CALL_SLOTS <= calls.length; i += CALL_SLOTS) {
    const id = calls[i] as number;
    const url = calls[i + 1];
    if (typeof url === 'string') {
      const body = calls[i + 4];
      const flags = calls[i + 7] as number;
      const maxBodyBytes = calls[i + 8] as number;
      const streamed = typeof body === 'number';
      handlers.run(
        id,
        {
          url,
          method: calls[i + 2] as string,
          headers: pairedHeaders(calls[i + 3] as string[]),
          body: streamed ? undefined : (body as Uint8Array | undefined),
          streamedBody: streamed ? { length: body < 0 ? undefined : body } : undefined,
          streamResponse: (flags & CALL_STREAM_RESPONSE) !== 0,
          decompress: (flags & CALL_DECOMPRESS) !== 0,
          maxBodyBytes: maxBodyBytes < 0 ? undefined : maxBodyBytes,
          deadline: calls[i + 5] as number,
          timeoutMs: calls[i + 6] as number,
        },
        flags & ~REQUEST_FLAGS,
      );
    } else if (typeof url === 'number') readPortEvent(calls, i, handlers);
    else handlers.abort(id, url as PlainError);
  }
}

function readPortEvent(queue: unknown[], i: number, events: PortEvents): void {
  if (queue[i + 1] === PORT_MESSAGE) events.portMessage(queue[i] as number, queue[i + 2]);
  else events.portClose(queue[i] as number);
}

/** Thread → caller: one message, REPLY_SLOTS values per outcome. A response: `id, status, url, httpVersion,
 *  warm, connection, tls, acquireMs, connectMs, tlsMs, ttfbMs, totalMs, tokenWaitMs, capWaitMs, headers (name, value, …),
 *  body, idle`. A failure:
 *  `id, error (a PlainError), 0, …, idle`. `idle`: the connections to the request's origin the thread holds idle as
 *  it ends (TransferDone), for the caller's choice of thread (../client/thread-lanes.ts). A port event of request `id` (pushPortEvent): `id, PORT_MESSAGE, message, 0, …`.
 *  The second slot tells them apart: a status (positive), an object, a negative number. A request with a port
 *  sends no PORT_CLOSE: its outcome, after its last port message, ends both. */
export type LaneReplies = unknown[];

export const REPLY_SLOTS = 17;

/** Queues an outcome; returns the response body's buffer when it has bytes (the caller moves it: transfer list). */
export function pushReply(
  replies: LaneReplies,
  id: number,
  outcome: TransferOutcome,
  idleToOrigin: number,
): ArrayBuffer | undefined {
  if (!outcome.ok) {
    replies.push(id, outcome.error, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, idleToOrigin);
    return undefined;
  }
  const result = outcome.result;
  const timings = result.timings;
  replies.push(
    id,
    result.status,
    result.url,
    result.httpVersion,
    result.warm,
    result.connection,
    result.tls,
    timings.acquireMs,
    timings.connectMs,
    timings.tlsMs,
    timings.ttfbMs,
    timings.totalMs,
    timings.tokenWaitMs,
    timings.capWaitMs,
    flatHeaders(result.headers),
    result.body,
    idleToOrigin,
  );
  return result.body.byteLength > 0 ? (result.body.buffer as ArrayBuffer) : undefined;
}

/** What the caller does with the replies it reads. */
export interface ReplyHandlers extends PortEvents {
  /** `idleToOrigin`: see LaneReplies. */
  outcome(id: number, outcome: TransferOutcome, idleToOrigin: number): void;
}

/** Reads one message of outcomes and port events, in order. */
export function readReplies(replies: LaneReplies, handlers: ReplyHandlers): void {
  for (let i = 0; i + REPLY_SLOTS <= replies.length; i += REPLY_SLOTS) {
    const id = replies[i] as number;
    const status = replies[i + 1];
    if (typeof status !== 'number') {
      handlers.outcome(id, { ok: false, error: status as PlainError }, replies[i + 16] as number);
      continue;
    }
    if (status < 0) {
      readPortEvent(replies, i, handlers);
      continue;
    }
    handlers.outcome(
      id,
      {
        ok: true,
        result: {
          status,
          headers: pairedHeaders(replies[i + 14] as string[]),
          url: replies[i + 2] as string,
          httpVersion: replies[i + 3] as string,
          warm: replies[i + 4] as boolean,
          connection: replies[i + 5] as TransferResult['connection'],
          tls: replies[i + 6] as TransferResult['tls'],
          timings: {
            acquireMs: replies[i + 7] as number,
            connectMs: replies[i + 8] as number,
            tlsMs: replies[i + 9] as number,
            ttfbMs: replies[i + 10] as number,
            totalMs: replies[i + 11] as number,
            tokenWaitMs: replies[i + 12] as number,
            capWaitMs: replies[i + 13] as number,
          },
          body: replies[i + 15] as Uint8Array,
        },
      },
      replies[i + 16] as number,
    );
  }
}

/** Header pairs as one array of strings (any bytes a header may hold survive: no separator to escape). */
function flatHeaders(headers: Array<[string, string]>): string[] {
  const flat: string[] = new Array(headers.length * 2);
  for (let i = 0; i < headers.length; i++) {
    const [name, value] = headers[i]!;
    flat[i * 2] = name;
    flat[i * 2 + 1] = value;
  }
  return flat;
}

function pairedHeaders(flat: string[]): Array<[string, string]> {
  const headers: Array<[string, string]> = new Array(flat.length / 2);
  for (let i = 0; i < flat.length; i += 2) headers[i / 2] = [flat[i]!, flat[i + 1]!];
  return headers;
}
