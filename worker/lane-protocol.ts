// A worker thread's lane: one MessagePort per thread, opened by the thread when it starts, that carries buffered
// requests (request(), no streamed body either way) and their outcomes in batches, beside piscina. A task through
// piscina costs a message each way per request, each waking the other thread, plus piscina's own bookkeeping; over
// the lane, the requests a caller makes in one turn of its event loop go to the thread in one message, and the
// outcomes the thread has at the end of one of its turns come back in one. Requests that stream a body, prewarm
// and stats still go through piscina (with a request's own port when it needs one: stream-protocol.ts).
//
// The thread posts `{ [LANE]: port }` on its parentPort once (piscina hands it to the pool's 'message' listeners);
// the caller keeps the other end. If the thread dies, the caller's end closes and the requests in flight on that
// lane fail with SOCKPOOL_ERR_WORKER_EXITED. Response bodies are transferred (moved), never copied.

import type { MessagePort } from 'node:worker_threads';
import type { PlainError } from '../shared/errors.js';
import type { TransferOutcome, TransferRequest } from './curl-engine.js';

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

/** Caller → thread, in arrays (one message per turn of the caller's event loop). */
export type LaneCall =
  /** Run a request. `abortable`: an `abort` for it may follow (the caller gave an AbortSignal). */
  | { id: number; request: TransferRequest; abortable?: boolean }
  /** Cancel request `id` (the caller already failed it: its signal fired or its deadline passed there). */
  | { id: number; abort: PlainError };

/** Thread → caller, in arrays: the outcome of request `id`. */
export interface LaneReply {
  id: number;
  outcome: TransferOutcome;
}
