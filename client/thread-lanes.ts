// The caller's ends of the worker threads' lanes (../worker/lane-protocol.ts): requests go to the thread with the
// fewest in flight (at most `perThread` each; beyond that they wait here, in order), gathered per turn of this
// thread's event loop into one message per thread; outcomes come back the same way. A streamed request (stream())
// has a port of its own on its lane (../worker/lane-port.ts), whose messages go in the same batches.
//
// Which thread a request goes to also depends on its origin (origin affinity). Each thread has a connection cache
// of its own (curl's), so a request that lands on a thread holding no connection to its origin leases a new one:
// with two threads a crawler's https mix leased about a quarter more connections (TLS handshakes) than one thread
// did (docs/benchmarks.md, "One connection cache against two"). Every outcome says how many connections to its origin
// the thread holds idle as it ends (lane-protocol.ts: one number in the reply, no message of its own), kept here per
// lane and origin less the requests to that origin sent there since. Two choices use it:
// - A request made while several lanes have room goes to one holding an idle connection to its origin, if that lane
//   has at most HOME_SLACK more in flight than the least busy one; else to the least busy one. Steady keep-alive load
//   to one origin stays balanced: every lane holds idle connections to it, and the least busy of those is taken.
// - While every slot is taken (a crawler's frontier waits in the client's queue), the slot that frees is on the
//   thread whose request ended, and a request that goes there finds its origin's connection only if the queue picks
//   one whose origin that thread holds: the queue asks claimIdle() for the waiters near its head
//   (request-queue.ts) and takes the first whose origin a lane with room holds idle, claiming that connection; the
//   request, entering here, goes to the lane that claimed it.
// The queue owns the choice of which waiter starts (order, throttled origins, the lookahead), this class which lane
// a request goes to and what each lane holds: so the queue only asks, per origin, and knows nothing of lanes.
//
// Every buffered request's deadline is kept here too, on one timer (a thread can be too busy to fail it in time):
// at the deadline, or when the caller's signal fires, the request fails here at once and the thread is told to
// cancel it. That timer also keeps the process alive while requests are in flight (the lanes' ports are unref'd).
// A streamed request's deadline and signal are its channel's business (SockpoolClient#run: its timer keeps the
// process alive, and it cancels over the request's port).

import { type MessagePort, receiveMessageOnPort } from 'node:worker_threads';
import { ErrorCodes, SockpoolError, toPlainError } from '../shared/errors.js';
import { IdTable } from '../shared/id-table.js';
import { epochNow, type TransferOutcome, type TransferRequest, timeoutError } from '../worker/curl-engine.js';
import { type Deadline, Deadlines } from '../worker/deadlines.js';
import { LanePort } from '../worker/lane-port.js';
import {
  CALL_ABORTABLE,
  CALL_PORT,
  CALL_SLOTS,
  type LaneCalls,
  type LaneReplies,
  pushAbortCall,
  pushPortEvent,
  pushRequestCall,
  type ReplyHandlers,
  readReplies,
  removeCall,
  takeDetachedCalls,
} from '../worker/lane-protocol.js';
import type { RequestPort } from '../worker/stream-protocol.js';
import { abortedError, detachedBodyError } from '../worker/transfer-runtime.js';

interface Lane {
  port: MessagePort;
  inFlight: number;
  /** Connections to each origin (by key) the thread holds idle, as its last outcome of the origin said, less the
   *  requests to it sent (or claimed) since; zeros are kept (IDLE_ORIGINS_KEPT bounds them). */
  idle: Map<string, number>;
  /** Idle connections claimed for a request the client's queue starts (claimIdle), by origin, until it enters. */
  claimed: Map<string, number>;
  /** Their sum: slots of the lane promised to requests on their way. */
  claimedCount: number;
  outbox: LaneCalls;
  /** Buffers the outbox moves (a streamed request body's chunks). */
  transfer: ArrayBuffer[];
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
  /** A streamed request's end of its port; undefined for a buffered one. */
  port: LanePort | undefined;
  /** What the port posted before the request had a lane (it waited for room): message, transfer, …; sent after
   *  the request. */
  early: unknown[] | undefined;
  /** Its origin's key (UrlTarget.key), for the lane choice; undefined: any lane. */
  originKey: string | undefined;
}

/** A lane holding an idle connection to a request's origin takes it while it has at most this many more requests in
 *  flight than the least busy lane (see the header). */
const HOME_SLACK = 1;

/** Origins a lane's `idle` may hold before those with none idle are dropped (rebuilding the Map: a delete per
 *  request keeps garbage alive, ../shared/id-table.ts). */
const IDLE_ORIGINS_KEPT = 1024;

function newPending(
  request: TransferRequest,
  signal: AbortSignal | undefined,
  resolve: (outcome: TransferOutcome) => void,
  reject: (error: Error) => void,
  originKey: string | undefined,
): Pending {
  return {
    originKey,
    id: 0,
    request,
    signal,
    resolve,
    reject,
    lane: undefined,
    deadline: undefined,
    onAbort: undefined,
    settled: false,
    port: undefined,
    early: undefined,
  };
}

export class ThreadLanes {
  readonly #perThread: number;
  /** What this end does with each lane's replies (one object: no closure per message). */
  readonly #replyHandlers: ReplyHandlers = {
    outcome: (id, outcome, idleToOrigin) => this.#outcome(id, outcome, idleToOrigin),
    portMessage: (id, message) => this.#pending.get(id)?.port?.deliver(message),
    // (Never sent by a thread: its outcome ends the port.)
    portClose: () => {},
  };
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

  /** Whether a thread of the client is still starting (has announced neither a lane nor a failure). */
  readonly #othersStarting: () => boolean;

  /** `othersStarting`: whether a thread is still starting (by default one is assumed to be: never fails fast when
   *  the last lane is lost). */
  constructor(perThread: number, othersStarting: () => boolean = () => true) {
    this.#perThread = perThread;
    this.#othersStarting = othersStarting;
  }

  /** A thread announced its lane. */
  attach(port: MessagePort): void {
    if (this.#closed) {
      port.close();
      return;
    }
    this.#startupFailure = undefined;
    this.#failFast = false;
    const lane: Lane = {
      port,
      inFlight: 0,
      idle: new Map(),
      claimed: new Map(),
      claimedCount: 0,
      outbox: [],
      transfer: [],
      flushing: false,
    };
    port.on('message', (replies: LaneReplies) => this.#receive(replies));
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
   * second. A lane that attaches later ends all of it. The cause is kept while other threads have lanes too: piscina
   * replaces no thread after one failed to start, so once those threads are gone too (#lost) nothing would run the
   * requests left waiting.
   */
  startupFailed(cause: { message: string; code: string | undefined }, othersStarting: boolean): void {
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
      pending.port?.peerClosed();
      pending.reject(this.startupError()!);
    }
    this.#checkIdle();
  }

  /** Runs a buffered request on a thread; rejects with SOCKPOOL_ERR_TIMEOUT / _ABORTED / _WORKER_EXITED /
   *  _WORKER_START. `originKey`: its origin's key (UrlTarget.key), for the choice of lane (see the header). */
  run(request: TransferRequest, signal: AbortSignal | undefined, originKey?: string): Promise<TransferOutcome> {
    return new Promise<TransferOutcome>((resolve, reject) => this.start(request, signal, resolve, reject, originKey));
  }

  /** run() without a promise of its own: one of `resolve` and `reject` is called, once. */
  start(
    request: TransferRequest,
    signal: AbortSignal | undefined,
    resolve: (outcome: TransferOutcome) => void,
    reject: (error: Error) => void,
    originKey?: string,
  ): void {
    const cannotStart = this.startupError();
    if (cannotStart) {
      reject(cannotStart);
      return;
    }
    const pending = newPending(request, signal, resolve, reject, originKey);
    pending.deadline = this.#deadlines.add(request.deadline, () => this.#expire(pending));
    if (signal) {
      pending.onAbort = () => this.#cancel(pending, abortedError(signal));
      signal.addEventListener('abort', pending.onAbort, { once: true });
    }
    this.#enter(pending);
  }

  /**
   * Runs a request that streams a body either way on a thread, with a port of its own on the thread's lane: the
   * caller's end of it (`port`, for a CallerChannel) and the outcome (rejects with SOCKPOOL_ERR_WORKER_EXITED /
   * _WORKER_START). Its deadline and signal are the caller's to watch: it cancels over the port (an `abort`
   * message, or closing its end). `readArrived`: reads at once what the request's lane has brought, and says whether
   * its outcome was there (for its deadline, whose timer runs before them when this thread was busy: see #expire).
   */
  stream(
    request: TransferRequest,
    originKey?: string,
  ): { port: RequestPort; outcome: Promise<TransferOutcome>; readArrived: () => boolean } {
    let pending!: Pending;
    const outcome = new Promise<TransferOutcome>((resolve, reject) => {
      pending = newPending(request, undefined, resolve, reject, originKey);
    });
    const port = new LanePort(
      (message, transfer) => this.#postPortMessage(pending, message, transfer),
      () => this.#portClosed(pending),
    );
    pending.port = port;
    const cannotStart = this.startupError();
    if (cannotStart) {
      port.peerClosed();
      pending.reject(cannotStart);
    } else this.#enter(pending);
    const readArrived = () => {
      this.#readLane(pending.lane);
      return pending.settled;
    };
    return { port, outcome, readArrived };
  }

  /** A request made: to a lane with room (#pick), or it waits here for one. */
  #enter(pending: Pending): void {
    pending.id = this.#pending.add(pending);
    const lane = this.#waiting.length === 0 ? this.#pick(pending.originKey) : undefined;
    if (lane) this.#send(lane, pending);
    else this.#waiting.push(pending);
  }

  /** A streamed request's port posts: into its lane's next batch, or kept until it has a lane. */
  #postPortMessage(pending: Pending, message: unknown, transfer: ArrayBuffer[] | undefined): void {
    const lane = pending.lane;
    if (!lane) {
      if (pending.early) pending.early.push(message, transfer);
      else pending.early = [message, transfer];
      return;
    }
    pushPortEvent(lane.outbox, CALL_SLOTS, pending.id, message);
    if (transfer) for (const buffer of transfer) lane.transfer.push(buffer);
    this.#flushSoon(lane);
  }

  /**
   * The caller closed a streamed request's end of its port (it failed the request: deadline, signal, a cancelled
   * body). On a lane: the thread cancels the transfer and answers as usual. Still waiting for room: it never goes.
   */
  #portClosed(pending: Pending): void {
    const lane = pending.lane;
    if (lane) {
      // Decided after the lane's message being read: a caller's channel closes its end at the response's `end`,
      // and the outcome that follows it in the same message means the thread is done with the port already (a
      // close sent then would wake the thread for nothing).
      queueMicrotask(() => {
        if (this.#pending.get(pending.id) !== pending || pending.lane !== lane) return;
        pushPortEvent(lane.outbox, CALL_SLOTS, pending.id, undefined);
        this.#flushSoon(lane);
      });
      return;
    }
    if (pending.settled || this.#pending.get(pending.id) !== pending) return;
    this.#waiting.splice(this.#waiting.indexOf(pending), 1);
    this.#pending.delete(pending.id);
    this.#settle(pending);
    pending.reject(new SockpoolError(ErrorCodes.ABORTED, 'the caller closed the request'));
    this.#checkIdle();
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

  /**
   * The lane a request to `originKey` goes to, if one has room (see the header): the one that claimed an idle
   * connection for it, else one holding an idle connection to its origin within HOME_SLACK of the least busy, else
   * the least busy. The connection it will likely take is counted as taken.
   */
  #pick(originKey: string | undefined): Lane | undefined {
    let best: Lane | undefined;
    let home: Lane | undefined;
    for (const lane of this.#lanes) {
      if (lane.inFlight >= this.#perThread) continue;
      if (!best || lane.inFlight < best.inFlight) best = lane;
      if (originKey === undefined) continue;
      if (lane.claimedCount > 0) {
        const claimed = lane.claimed.get(originKey) ?? 0;
        if (claimed > 0) {
          lane.claimed.set(originKey, claimed - 1);
          lane.claimedCount--;
          return lane;
        }
      }
      if ((lane.idle.get(originKey) ?? 0) > 0 && (!home || lane.inFlight < home.inFlight)) home = lane;
    }
    if (home && home.inFlight <= best!.inFlight + HOME_SLACK) {
      home.idle.set(originKey!, home.idle.get(originKey!)! - 1);
      return home;
    }
    return best;
  }

  /**
   * For the client's queue, about to start a waiter to `originKey` while every slot may be taken (see the header):
   * whether a lane with room holds an idle connection to the origin. If one does, that connection is claimed: the
   * request, when it enters, goes to that lane. Claims not used by the time the next replies come in are dropped
   * (the request went elsewhere: it failed before it started, or ran in the caller's thread).
   */
  claimIdle(originKey: string): boolean {
    for (const lane of this.#lanes) {
      if (lane.inFlight + lane.claimedCount >= this.#perThread) continue;
      const idle = lane.idle.get(originKey) ?? 0;
      if (idle === 0) continue;
      lane.idle.set(originKey, idle - 1);
      lane.claimed.set(originKey, (lane.claimed.get(originKey) ?? 0) + 1);
      lane.claimedCount++;
      return true;
    }
    return false;
  }

  /** What the lane's thread said it holds idle to the origin of a request that ended there, less the connections
   *  claimed for requests still on their way to it. */
  #noteIdle(lane: Lane, originKey: string, idleToOrigin: number): void {
    const idle = lane.idle;
    if (idle.size >= IDLE_ORIGINS_KEPT && !idle.has(originKey)) {
      const kept = new Map<string, number>();
      for (const [key, count] of idle) if (count > 0) kept.set(key, count);
      lane.idle = kept;
    }
    lane.idle.set(originKey, Math.max(0, idleToOrigin - (lane.claimed.get(originKey) ?? 0)));
  }

  #send(lane: Lane, pending: Pending): void {
    pending.lane = lane;
    lane.inFlight++;
    const port = pending.port;
    pushRequestCall(
      lane.outbox,
      pending.id,
      pending.request,
      port ? CALL_PORT : pending.signal !== undefined ? CALL_ABORTABLE : 0,
    );
    const early = pending.early;
    if (early) {
      pending.early = undefined;
      for (let i = 0; i < early.length; i += 2) {
        this.#postPortMessage(pending, early[i], early[i + 1] as ArrayBuffer[] | undefined);
      }
    }
    // (Closed while it waited: then it was never sent. Closed in this turn after a message: sent with it.)
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
    this.#flushSoon(lane);
  }

  /** The lane's batch goes at the end of this round of microtasks. */
  #flushSoon(lane: Lane): void {
    if (lane.flushing) return;
    lane.flushing = true;
    queueMicrotask(() => this.#flush(lane));
  }

  #flush(lane: Lane): void {
    lane.flushing = false;
    const outbox = lane.outbox;
    const transfer = lane.transfer;
    lane.outbox = [];
    if (outbox.length === 0 || this.#closed) return;
    // A request whose body the caller detached since cannot be cloned, and postMessage would throw for the whole
    // batch: from a microtask (an uncaught exception), or inside the call that filled the lane (the request's queue
    // slot and every other call of the batch lost, close() waiting for them for good). Found in review
    // (test/client-queue-edges.test.ts). Such a request fails alone, as it would in this thread.
    const detached = takeDetachedCalls(outbox);
    if (outbox.length > 0) {
      if (transfer.length === 0) lane.port.postMessage(outbox);
      else {
        lane.transfer = [];
        lane.port.postMessage(outbox, transfer);
      }
    }
    if (detached) this.#failUnsent(lane, detached);
  }

  /** Requests taken out of `lane`'s batch before it went (takeDetachedCalls): they fail, never having reached the
   *  thread, and their room on the lane goes to requests waiting for it. */
  #failUnsent(lane: Lane, ids: number[]): void {
    for (const id of ids) {
      const pending = this.#pending.get(id);
      if (!pending || pending.lane !== lane) continue;
      this.#pending.delete(id);
      lane.inFlight--;
      pending.port?.peerClosed();
      if (pending.settled) continue;
      this.#settle(pending);
      pending.reject(detachedBodyError());
    }
    this.#dispatchWaiting();
    this.#checkIdle();
  }

  #receive(replies: LaneReplies): void {
    // (Claims made in an earlier turn went unused: see claimIdle.)
    for (const lane of this.#lanes) {
      if (lane.claimedCount === 0) continue;
      lane.claimed.clear();
      lane.claimedCount = 0;
    }
    readReplies(replies, this.#replyHandlers);
    this.#dispatchWaiting();
    this.#checkIdle();
  }

  #outcome(id: number, outcome: TransferOutcome, idleToOrigin: number): void {
    const pending = this.#pending.get(id);
    if (!pending) return;
    this.#pending.delete(id);
    const lane = pending.lane!;
    lane.inFlight--;
    if (pending.originKey !== undefined) this.#noteIdle(lane, pending.originKey, idleToOrigin);
    // (After its last message, in the same batch or an earlier one.)
    pending.port?.peerClosed();
    if (!pending.settled) {
      this.#settle(pending);
      pending.resolve(outcome);
    }
  }

  /**
   * A buffered request's deadline passed here. Its outcome may be waiting on its lane already: this thread's timers
   * run before the messages that came while it was busy (a long synchronous loop of the caller's), and the thread
   * answered in time. What its lane holds is read first (#readLane); a request still without an answer fails.
   */
  #expire(pending: Pending): void {
    this.#readLane(pending.lane);
    this.#cancel(pending, timeoutError(pending.request));
  }

  /** Reads now what the lane has brought and this thread has not read yet (nothing once the lane is gone). */
  #readLane(lane: Lane | undefined): void {
    if (!lane || !this.#lanes.includes(lane)) return;
    for (let received = receiveMessageOnPort(lane.port); received; received = receiveMessageOnPort(lane.port)) {
      this.#receive(received.message as LaneReplies);
    }
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
    lane.transfer = [];
    for (const pending of this.#pending.values()) {
      if (pending.lane !== lane) continue;
      this.#pending.delete(pending.id);
      pending.port?.peerClosed();
      if (pending.settled) continue;
      this.#settle(pending);
      pending.reject(
        this.#closed
          ? new SockpoolError(ErrorCodes.CLOSED, 'client is closed')
          : new SockpoolError(ErrorCodes.WORKER_EXITED, 'the worker thread running the request exited'),
      );
    }
    this.#dispatchWaiting();
    // The last lane gone after a thread could not start: piscina starts no replacement (see startupFailed), and the
    // requests waiting here would wait for their deadlines. (piscina's workerDestroy may have come before this.)
    if (this.#lanes.length === 0 && !this.#closed) this.threadsSettled(this.#othersStarting());
    this.#checkIdle();
  }

  #dispatchWaiting(): void {
    while (this.#waiting.length > 0) {
      const lane = this.#pick(this.#waiting[0]!.originKey);
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
