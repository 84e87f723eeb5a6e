// The thread's end of its lane (lane-protocol.ts): runs the requests that come in on the runtime and sends their
// outcomes back, gathered per turn of this thread's event loop, with their bodies' memory moved.
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
import { LANE, type LaneCalls, type LaneReplies, pushReply, readCalls } from './lane-protocol.js';
import type { TransferRuntime } from './transfer-runtime.js';

/** Opens this thread's lane and announces it to the caller's thread (through piscina's 'message' event), with the
 *  thread's id (the caller counts the threads still starting). */
export function openLane(runtime: TransferRuntime): void {
  const { port1, port2 } = new MessageChannel();
  new WorkerLane(runtime, port1);
  parentPort!.postMessage({ [LANE]: port2, threadId }, [port2]);
}

class WorkerLane {
  readonly #runtime: TransferRuntime;
  readonly #port: MessagePort;
  /** Requests the caller may cancel, by id (an IntMap: a Map with a delete per request keeps garbage alive,
   *  ../shared/id-table.ts). */
  readonly #cancellations = new IntMap<Cancellation>();
  #outbox: LaneReplies = [];
  #transfer: ArrayBuffer[] = [];
  #flushing = false;

  constructor(runtime: TransferRuntime, port: MessagePort) {
    this.#runtime = runtime;
    this.#port = port;
    port.on('message', (calls: LaneCalls) => this.#receive(calls));
    // piscina keeps the thread alive; the lane does not have to.
    port.unref();
  }

  #receive(calls: LaneCalls): void {
    readCalls(calls, this.#run, this.#abort);
  }

  readonly #abort = (id: number, error: PlainError): void => {
    this.#cancellations.get(id)?.cancel(fromPlainError(error));
  };

  readonly #run = (id: number, request: TransferRequest, abortable: boolean): void => {
    let cancellation: Cancellation | undefined;
    if (abortable) {
      cancellation = new Cancellation();
      this.#cancellations.set(id, cancellation);
    }
    this.#runtime.startRequest(request, undefined, cancellation, (outcome) => {
      if (cancellation) this.#cancellations.delete(id);
      this.#reply(id, outcome);
    });
  };

  #reply(id: number, outcome: TransferOutcome): void {
    // The body's memory moves to the caller's thread (exact-size, never a pooled slice: response-sink.ts).
    const body = pushReply(this.#outbox, id, outcome);
    if (body) this.#transfer.push(body);
    if (this.#flushing) return;
    this.#flushing = true;
    // After the other transfers curl finished in the same turn have replied too (they complete together, in one
    // immediate: see curl-engine.ts): one message for all of them.
    queueMicrotask(() => this.#flush());
  }

  #flush(): void {
    const outbox = this.#outbox;
    const transfer = this.#transfer;
    this.#outbox = [];
    this.#transfer = [];
    this.#flushing = false;
    this.#port.postMessage(outbox, transfer);
  }
}
