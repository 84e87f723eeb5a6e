// The thread's end of its lane (lane-protocol.ts): runs the requests that come in on the runtime and sends their
// outcomes back, gathered per turn of this thread's event loop, with their bodies' memory moved; a request with a
// port of its own gets its end here (lane-port.ts), whose messages travel in the same batches.
//
// When a batch goes: an outcome is ready in an immediate (curl-engine.ts completes transfers there, in a callback
// scope) or, for the only transfer running, as curl reports it (in node-libcurl's completion callback, which has no
// callback scope: the check phase of that turn drains the microtasks); either way a microtask after it sends the
// outcomes of that turn together. A port message may be posted from inside curl's callbacks (the head, from
// HEADERFUNCTION): port messages go out in an immediate (or with the next outcomes, whichever comes first).
//
// The thread does not spin for a sequential caller's next request: it sleeps in its event loop like any other. Until
// the ninth session it polled its lane for 0.1 ms after its last outcome went out; on a quiet machine that cost
// 15–45 µs of CPU per sequential request and saved no time (bench/thread-hop.ts's lanes case, and the keep-alive
// runs of bench/peers.ts, in docs/benchmarks.md).

import { MessageChannel, type MessagePort, parentPort, threadId } from 'node:worker_threads';
import { fromPlainError, type PlainError } from '../shared/errors.js';
import { IntMap } from '../shared/id-table.js';
import { Cancellation } from './cancellation.js';
import type { TransferOutcome, TransferRequest } from './curl-engine.js';
import { LanePort } from './lane-port.js';
import {
  CALL_ABORTABLE,
  CALL_PORT,
  type CallHandlers,
  LANE,
  type LaneCalls,
  type LaneReplies,
  pushPortEvent,
  pushReply,
  REPLY_SLOTS,
  readCalls,
} from './lane-protocol.js';
import type { TransferRuntime } from './transfer-runtime.js';

/** Opens this thread's lane and announces it to the caller's thread (through piscina's 'message' event), with the
 *  thread's id (the caller counts the threads still starting). */
export function openLane(runtime: TransferRuntime): void {
  const { port1, port2 } = new MessageChannel();
  new WorkerLane(runtime, port1);
  parentPort!.postMessage({ [LANE]: port2, threadId }, [port2]);
}

class WorkerLane implements CallHandlers {
  readonly #runtime: TransferRuntime;
  readonly #port: MessagePort;
  /** Requests the caller may cancel, by id (an IntMap: a Map with a delete per request keeps garbage alive,
   *  ../shared/id-table.ts). */
  readonly #cancellations = new IntMap<Cancellation>();
  /** This thread's ends of the requests' ports, by id, until their transfers end or the caller closes them. */
  readonly #ports = new IntMap<LanePort>();
  #outbox: LaneReplies = [];
  #transfer: ArrayBuffer[] = [];
  /** A flush is queued: a microtask (after outcomes), an immediate (after port messages). */
  #microtaskQueued = false;
  #immediate: NodeJS.Immediate | undefined;

  constructor(runtime: TransferRuntime, port: MessagePort) {
    this.#runtime = runtime;
    this.#port = port;
    port.on('message', (calls: LaneCalls) => this.#receive(calls));
    // piscina keeps the thread alive; the lane does not have to.
    port.unref();
  }

  #receive(calls: LaneCalls): void {
    readCalls(calls, this);
  }

  abort(id: number, error: PlainError): void {
    this.#cancellations.get(id)?.cancel(fromPlainError(error));
  }

  run(id: number, request: TransferRequest, flags: number): void {
    if ((flags & CALL_PORT) !== 0) {
      this.#runWithPort(id, request);
      return;
    }
    let cancellation: Cancellation | undefined;
    if ((flags & CALL_ABORTABLE) !== 0) {
      cancellation = new Cancellation();
      this.#cancellations.set(id, cancellation);
    }
    this.#runtime.startRequest(request, undefined, cancellation, (outcome, idleToOrigin) => {
      if (cancellation) this.#cancellations.delete(id);
      this.#reply(id, outcome, idleToOrigin);
    });
  }

  /** A streamed request: its port's messages go out tagged with its id; the runtime closes the port at the end. */
  #runWithPort(id: number, request: TransferRequest): void {
    const port = new LanePort(
      (message, transfer) => this.#postPortMessage(id, message, transfer),
      // Closed by the runtime as the transfer ends, before its outcome (nothing to tell the caller: the outcome
      // follows on the lane).
      () => this.#ports.delete(id),
    );
    this.#ports.set(id, port);
    this.#runtime.startRequest(request, port, undefined, (outcome, idleToOrigin) =>
      this.#reply(id, outcome, idleToOrigin),
    );
  }

  portMessage(id: number, message: unknown): void {
    this.#ports.get(id)?.deliver(message);
  }

  /** The caller closed its end (cancelled, or gave up the response): the runtime cancels the transfer. */
  portClose(id: number): void {
    const port = this.#ports.get(id);
    if (!port) return;
    this.#ports.delete(id);
    port.peerClosed();
  }

  #postPortMessage(id: number, message: unknown, transfer: ArrayBuffer[] | undefined): void {
    pushPortEvent(this.#outbox, REPLY_SLOTS, id, message);
    if (transfer) for (const buffer of transfer) this.#transfer.push(buffer);
    this.#immediate ??= setImmediate(() => {
      this.#immediate = undefined;
      this.#flush();
    });
  }

  #reply(id: number, outcome: TransferOutcome, idleToOrigin: number): void {
    // The body's memory moves to the caller's thread (exact-size, never a pooled slice: response-sink.ts).
    const body = pushReply(this.#outbox, id, outcome, idleToOrigin);
    if (body) this.#transfer.push(body);
    if (this.#microtaskQueued) return;
    this.#microtaskQueued = true;
    // After the other transfers curl finished in the same turn have replied too (they complete together, in one
    // immediate: see curl-engine.ts): one message for all of them.
    queueMicrotask(() => {
      this.#microtaskQueued = false;
      this.#flush();
    });
  }

  #flush(): void {
    if (this.#outbox.length === 0) return;
    if (this.#immediate) {
      clearImmediate(this.#immediate);
      this.#immediate = undefined;
    }
    const outbox = this.#outbox;
    const transfer = this.#transfer;
    this.#outbox = [];
    this.#transfer = [];
    this.#port.postMessage(outbox, transfer);
  }
}
