// The caller's ends of the worker threads' lanes (../worker/lane-protocol.ts): buffered requests go to the thread
// with the fewest in flight (at most `perThread` each; beyond that they wait here, in order), gathered per turn of
// this thread's event loop into one message per thread; outcomes come back the same way.
//
// Every request's deadline is kept here too, on one timer (as piscina's queue could hold a task past it, a thread
// can be too busy to fail it in time): at the deadline, or when the caller's signal fires, the request fails here
// at once and the thread is told to cancel it. That timer also keeps the process alive while requests are in
// flight (the lanes' ports are unref'd).

import type { MessagePort } from 'node:worker_threads';
import { ErrorCodes, SockpoolError, toPlainError } from '../shared/errors.js';
import { IdTable } from '../shared/id-table.js';
import { epochNow, type TransferOutcome, type TransferRequest, timeoutError } from '../worker/curl-engine.js';
import { type Deadline, Deadlines } from '../worker/deadlines.js';
import {
  type LaneCalls,
  type LaneReplies,
  pushAbortCall,
  pushRequestCall,
  readReplies,
  removeCall,
} from '../worker/lane-protocol.js';
import { abortedError } from '../worker/transfer-runtime.js';

interface Lane {
  port: MessagePort;
  inFlight: number;
  outbox: LaneCalls;
  /** A flush of the outbox is queued (a microtask). */
  flushing: boolean;
}

interface Pending {
  id: number;
  request: TransferRequest;
  signal: AbortSignal | undefined;
  resolve: (outcome: TransferOutcome) => void;
  reject: (error: Error) => void;
  /** The lane it went to (undefined while it waits here for room). */
  lane: Lane | undefined;
  deadline: Deadline | undefined;
  onAbort: (() => void) | undefined;
  /** Resolved or rejected already (a cancelled request stays counted on its lane until the thread answers). */
  settled: boolean;
}

export class ThreadLanes {
  readonly #perThread: number;
  #lanes: Lane[] = [];
  /** Requests sent to a lane and not answered yet, and requests waiting for room, by id (an IdTable, not a Map:
   *  ../shared/id-table.ts says why). */
  readonly #pending = new IdTable<Pending>();
  #waiting: Pending[] = [];
  readonly #deadlines = new Deadlines(epochNow);
  #onIdle: Array<() => void> = [];
  #closed = false;
  /** Why the last thread that could not start failed (task-entry.cts), while no thread has a lane. */
  #startupFailure: { message: string; code: string | undefined } | undefined;
  /** A thread could not start and no other was starting then: requests fail at once until a lane attaches. */
  #failFast = false;

  constructor(perThread: number) {
    this.#perThread = perThread;
  }

  /** A thread announced its lane. */
  attach(port: MessagePort): void {
    if (this.#closed) {
      port.close();
      return;
    }
    this.#startupFailure = undefined;
    this.#failFast = false;
    const lane: Lane = { port, inFlight: 0, outbox: [], flushing: false };
    port.on('message', (replies: LaneReplies) => this.#receive(lane, replies));
    // The thread exited (crash, terminate): its requests in flight are lost.
    port.on('close', () => this.#lost(lane));
    port.unref();
    this.#lanes.push(lane);
    this.#dispatchWaiting();
  }

  /**
   * A thread could not start (it posted its cause instead of a lane). Once no thread has a lane and none is still
   * starting (`othersStarting` false), the requests waiting for one fail now, and new ones at once, with
   * SOCKPOOL_ERR_WORKER_START: nothing would run them before their deadlines (piscina starts one replacement for a
   * thread that failed to start, and none after a replacement failed). While another thread may still start, the
   * cause is only kept: a client of two threads whose first fails for a passing reason runs its requests on the
   * second. A lane that attaches later ends all of it.
   */
  startupFailed(cause: { message: string; code: string | undefined }, othersStarting: boolean): void {
    if (this.#lanes.length > 0) return;
    this.#startupFailure = cause;
    this.threadsSettled(othersStarting);
  }

  /**
   * A thread was removed, or one reported: if a thread could not start, none has a lane and none is still
   * starting, the client now fails fast (startupFailed() says why). Called again when piscina removes a thread,
   * since a thread may also end without reporting anything.
   */
  threadsSettled(othersStarting: boolean): void {
    if (this.#startupFailure === undefined || this.#lanes.length > 0 || othersStarting) return;
    this.#failFast = true;
    const waiting = this.#waiting;
    this.#waiting = [];
    for (const pending of waiting) {
      this.#pending.delete(pending.id);
      this.#settle(pending);
      pending.reject(this.startupError()!);
    }
    this.#checkIdle();
  }

  /** Runs a buffered request on a thread; rejects with SOCKPOOL_ERR_TIMEOUT / _ABORTED / _WORKER_EXITED /
   *  _WORKER_START. */
  run(request: TransferRequest, signal: AbortSignal | undefined): Promise<TransferOutcome> {
    return new Promise<TransferOutcome>((resolve, reject) => this.start(request, signal, resolve, reject));
  }

  /** run() without a promise of its own: one of `resolve` and `reject` is called, once. */
  start(
    request: TransferRequest,
    signal: AbortSignal | undefined,
    resolve: (outcome: TransferOutcome) => void,
    reject: (error: Error) => void,
  ): void {
    const cannotStart = this.startupError();
    if (cannotStart) {
      reject(cannotStart);
      return;
    }
    const pending: Pending = {
      id: 0,
      request,
      signal,
      resolve,
      reject,
      lane: undefined,
      deadline: undefined,
      onAbort: undefined,
      settled: false,
    };
    pending.deadline = this.#deadlines.add(request.deadline, () => this.#cancel(pending, timeoutError(request)));
    if (signal) {
      pending.onAbort = () => this.#cancel(pending, abortedError(signal));
      signal.addEventListener('abort', pending.onAbort, { once: true });
    }
    pending.id = this.#pending.add(pending);
    const lane = this.#waiting.length === 0 ? this.#pick() : undefined;
    if (lane) this.#send(lane, pending);
    else this.#waiting.push(pending);
  }

  /** SOCKPOOL_ERR_WORKER_START once no thread has a lane and none can start any more (else undefined): what a
   *  request that needs a thread fails with (piscina's tasks too: the client checks before sending one). */
  startupError(): SockpoolError | undefined {
    return this.#failFast && this.#lanes.length === 0 ? this.#startupErrorOf(this.#startupFailure!) : undefined;
  }

  /** SOCKPOOL_ERR_WORKER_START while no thread has a lane and one could not start, even if another still may: what
   *  a piscina task whose thread failed under it reports (rather than SOCKPOOL_ERR_WORKER_EXITED). */
  threadStartFailure(): SockpoolError | undefined {
    const cause = this.#startupFailure;
    return cause !== undefined && this.#lanes.length === 0 ? this.#startupErrorOf(cause) : undefined;
  }

  #startupErrorOf(cause: { message: string; code: string | undefined }): SockpoolError {
    return new SockpoolError(
      ErrorCodes.WORKER_START,
      `no worker thread of the client could start: ${cause.message}${cause.code ? ` (${cause.code})` : ''}`,
    );
  }

  /** Resolves once no request is in flight or waiting. */
  idle(): Promise<void> {
    if (this.#pending.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#onIdle.push(resolve));
  }

  /** Closes the lanes (after idle(): nothing is in flight). */
  close(): void {
    this.#closed = true;
    this.#deadlines.close();
    const lanes = this.#lanes;
    this.#lanes = [];
    for (const lane of lanes) lane.port.close();
  }

  /** The lane with the fewest requests in flight, if one has room. */
  #pick(): Lane | undefined {
    let best: Lane | undefined;
    for (const lane of this.#lanes) {
      if (lane.inFlight < this.#perThread && (!best || lane.inFlight < best.inFlight)) best = lane;
    }
    return best;
  }

  #send(lane: Lane, pending: Pending): void {
    pending.lane = lane;
    lane.inFlight++;
    pushRequestCall(lane.outbox, pending.id, pending.request, pending.signal !== undefined);
    this.#posted(lane);
  }

  /**
   * A call was queued for the lane's next message: the calls made before the microtasks run out go together (a caller
   * that answers a batch of replies with new requests makes them in the same round of microtasks). A lane that is
   * full now takes no more calls this round, so its message goes at once: a caller that hands over a crawler's
   * whole frontier in one turn has its first requests on their way before it has queued the rest.
   */
  #posted(lane: Lane): void {
    if (lane.inFlight >= this.#perThread) {
      this.#flush(lane);
      return;
    }
    if (lane.flushing) return;
    lane.flushing = true;
    queueMicrotask(() => this.#flush(lane));
  }

  #flush(lane: Lane): void {
    lane.flushing = false;
    const outbox = lane.outbox;
    lane.outbox = [];
    if (outbox.length === 0 || this.#closed) return;
    lane.port.postMessage(outbox);
  }

  #receive(lane: Lane, replies: LaneReplies): void {
    readReplies(replies, (id, outcome) => {
      const pending = this.#pending.get(id);
      if (!pending) return;
      this.#pending.delete(id);
      lane.inFlight--;
      if (!pending.settled) {
        this.#settle(pending);
        pending.resolve(outcome);
      }
    });
    this.#dispatchWaiting();
    this.#checkIdle();
  }

  /** Timeout or the caller's signal: fails the request now, and cancels it in its thread if it went there. */
  #cancel(pending: Pending, error: SockpoolError): void {
    if (pending.settled) return;
    this.#settle(pending);
    const lane = pending.lane;
    const unsent = lane ? removeCall(lane.outbox, pending.id) : false;
    if (lane && !unsent) {
      // At once, not with the next batch: the thread must hear it before whatever the caller does next (closing
      // the connection at the server would make a dead-connection retry of the request it gave up on).
      const abort: LaneCalls = [];
      pushAbortCall(abort, pending.id, toPlainError(error));
      lane.port.postMessage(abort);
    } else {
      // Still here (waiting for room, or in the batch not sent yet): it never reaches a thread.
      if (lane) lane.inFlight--;
      else this.#waiting.splice(this.#waiting.indexOf(pending), 1);
      this.#pending.delete(pending.id);
      this.#dispatchWaiting();
      this.#checkIdle();
    }
    pending.reject(error);
  }

  #settle(pending: Pending): void {
    pending.settled = true;
    if (pending.deadline) this.#deadlines.remove(pending.deadline);
    if (pending.onAbort) pending.signal!.removeEventListener('abort', pending.onAbort);
  }

  /** A thread is gone: its requests fail; the others (and piscina's replacement thread's lane) carry on. */
  #lost(lane: Lane): void {
    const index = this.#lanes.indexOf(lane);
    if (index >= 0) this.#lanes.splice(index, 1);
    lane.outbox = [];
    for (const pending of this.#pending.values()) {
      if (pending.lane !== lane) continue;
      this.#pending.delete(pending.id);
      if (pending.settled) continue;
      this.#settle(pending);
      pending.reject(
        this.#closed
          ? new SockpoolError(ErrorCodes.CLOSED, 'client is closed')
          : new SockpoolError(ErrorCodes.WORKER_EXITED, 'the worker thread running the request exited'),
      );
    }
    this.#dispatchWaiting();
    this.#checkIdle();
  }

  #dispatchWaiting(): void {
    while (this.#waiting.length > 0) {
      const lane = this.#pick();
      if (!lane) return;
      this.#send(lane, this.#waiting.shift()!);
    }
  }

  #checkIdle(): void {
    if (this.#pending.size > 0 || this.#onIdle.length === 0) return;
    const waiters = this.#onIdle;
    this.#onIdle = [];
    for (const resolve of waiters) resolve();
  }
}
