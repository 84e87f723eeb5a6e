// The thread's end of its lane (lane-protocol.ts): runs the requests that come in on the runtime and sends their
// outcomes back, gathered per turn of this thread's event loop, with their bodies' memory moved.
//
// A caller that answers each response with its next request (a sequential loop) would find this thread asleep every
// time, and waking a thread costs more than a keep-alive request over loopback. So when the last outcome in flight
// goes out, the thread keeps polling its lane (receiveMessageOnPort) for a short while before its event loop
// sleeps. The spin adapts: after a few in a row that found nothing, the thread stops spinning and only tries again
// now and then, so that a caller with gaps between its requests costs no CPU.

import { MessageChannel, type MessagePort, parentPort, receiveMessageOnPort, threadId } from 'node:worker_threads';
import { fromPlainError } from '../shared/errors.js';
import { IntMap } from '../shared/id-table.js';
import { Cancellation } from './cancellation.js';
import type { TransferOutcome } from './curl-engine.js';
import { LANE, type LaneCall, type LaneReply } from './lane-protocol.js';
import type { TransferRuntime } from './transfer-runtime.js';

/** How long the thread polls its lane after its last outcome went out (ms). */
const SPIN_MS = 0.1;
/** Spins in a row that found nothing before spinning stops; then one try in RETRY_EVERY. */
const MAX_MISSES = 4;
const RETRY_EVERY = 32;

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
  #outbox: LaneReply[] = [];
  #transfer: ArrayBuffer[] = [];
  #flushing = false;
  /** A spin is queued (an immediate). */
  #spinQueued: NodeJS.Immediate | undefined;
  /** Requests running here. */
  #inFlight = 0;
  /** Spins in a row that found nothing, and chances to spin skipped since. */
  #misses = 0;
  #skipped = 0;

  constructor(runtime: TransferRuntime, port: MessagePort) {
    this.#runtime = runtime;
    this.#port = port;
    port.on('message', (calls: LaneCall[]) => this.#receive(calls));
    // piscina keeps the thread alive; the lane does not have to.
    port.unref();
  }

  #receive(calls: LaneCall[]): void {
    for (const call of calls) {
      if ('abort' in call) this.#cancellations.get(call.id)?.cancel(fromPlainError(call.abort));
      else this.#run(call.id, call);
    }
  }

  #run(id: number, call: Extract<LaneCall, { request: unknown }>): void {
    let cancellation: Cancellation | undefined;
    if (call.abortable) {
      cancellation = new Cancellation();
      this.#cancellations.set(id, cancellation);
    }
    this.#inFlight++;
    this.#runtime.startRequest(call.request, undefined, cancellation, (outcome) => {
      this.#inFlight--;
      if (cancellation) this.#cancellations.delete(id);
      this.#reply(id, outcome);
    });
  }

  #reply(id: number, outcome: TransferOutcome): void {
    this.#outbox.push({ id, outcome });
    // The body's memory moves to the caller's thread (exact-size, never a pooled slice: response-sink.ts).
    if (outcome.ok && outcome.result.body.byteLength > 0)
      this.#transfer.push(outcome.result.body.buffer as ArrayBuffer);
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
    // The spin in an immediate, never in a microtask: microtasks also run at the end of curl's own callbacks
    // (inside curl_multi_socket_action), and the spin may start requests, whose addHandle curl refuses there
    // (CURLM_RECURSIVE_API_CALL).
    if (this.#inFlight === 0 && !this.#spinQueued) this.#spinQueued = setImmediate(() => this.#spin());
  }

  /** Polls the lane for the caller's next requests for up to SPIN_MS (see the header). */
  #spin(): void {
    this.#spinQueued = undefined;
    if (this.#inFlight !== 0) return;
    if (this.#misses >= MAX_MISSES) {
      if (++this.#skipped < RETRY_EVERY) return;
      this.#skipped = 0;
    }
    const until = performance.now() + SPIN_MS;
    do {
      const received = receiveMessageOnPort(this.#port);
      if (received) {
        this.#misses = 0;
        this.#receive(received.message as LaneCall[]);
        return;
      }
    } while (performance.now() < until);
    this.#misses++;
  }
}
