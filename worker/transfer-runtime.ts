// One thread's transfer machinery: a link to the daemon, the socket supply, and one CurlEngine (one libcurl
// Multi), running requests with their cancellation and streamed bodies. A piscina worker thread holds one
// (worker/task.ts); a client created with `threads: 0` holds one in the caller's own thread.
//
// Cancellation never terminates a thread: each request gets a Cancellation, cancelled by its deadline (a timer)
// or by an `abort` message on the request's own MessagePort, and the engine cancels just that transfer.
//
// fds: the daemon link's socket and leased fds not yet handed to curl are tracked by the addon (closed if the
// thread dies); fds curl owns are closed through CLOSESOCKETFUNCTION. See socket-supply.ts for each step.

import { ErrorCodes, fromPlainError, SockpoolError, toPlainError } from '../shared/errors.js';
import { Cancellation, type CancelSignal } from './cancellation.js';
import {
  type ClientPolicy,
  CurlEngine,
  epochNow,
  type OutcomeCallback,
  type TransferOutcome,
  type TransferRequest,
  timeoutError,
} from './curl-engine.js';
import { DaemonLink } from './daemon-link.js';
import { type Deadline, Deadlines } from './deadlines.js';
import { isDetached } from './lane-protocol.js';
import { PortSink } from './response-sink.js';
import { SocketSupply } from './socket-supply.js';
import type { CallerMessage, RequestPort } from './stream-protocol.js';
import { tlsTrustOf } from './tls-trust.js';
import { PortSource } from './upload-source.js';

export interface RuntimeConfig {
  socketPath: string;
  /** Connections curl may keep in this thread's cache. */
  maxConnects: number;
  /** The client's options that apply to every request. */
  policy: ClientPolicy;
}

export type RuntimeTask =
  /** `port`: the request's own port (abort, streamed bodies): a MessagePort, or a LocalPort in the caller's
   *  thread; see stream-protocol.ts. */
  | { kind: 'request'; request: TransferRequest; port?: RequestPort | undefined }
  /** `lookahead`: the client's queue announcing its waiting requests' origins (the daemon may warm TCP for those). */
  | {
      kind: 'prewarm';
      origins: Array<{ host: string; port: number; count: number; https: boolean }>;
      lookahead?: boolean;
    }
  | { kind: 'stats' };

export type RuntimeResult =
  | TransferOutcome
  | { ok: true; stats: Record<string, unknown> }
  | { ok: true; granted: Array<number | null> }
  | { ok: true }
  | { ok: false; error: ReturnType<typeof toPlainError> };

/** The error a request fails with when the caller's AbortSignal fires (its reason is the cause). */
export function abortedError(signal: Pick<CancelSignal, 'reason'>): SockpoolError {
  const reason = signal.reason as { message?: unknown } | undefined;
  const detail = typeof reason?.message === 'string' ? `: ${reason.message}` : '';
  return new SockpoolError(ErrorCodes.ABORTED, `request aborted${detail}`, {}, { cause: signal.reason });
}

/** The error of a request whose body bytes the caller detached (transferred their ArrayBuffer) before it was sent. */
export function detachedBodyError(): SockpoolError {
  return new SockpoolError(
    ErrorCodes.INVALID_ARGUMENT,
    'the request body was detached (its ArrayBuffer transferred) before the request was sent',
  );
}

export class TransferRuntime {
  readonly #link: DaemonLink;
  readonly #engine: CurlEngine;
  readonly #proxy: string | undefined;
  /** What https prewarms say the client verifies against (tls-trust.ts). */
  readonly #tlsTrust: string | undefined;
  /** Tasks running (requests, prewarm, stats), and whoever waits for none to be (idle()). */
  #running = 0;
  #onIdle: (() => void) | undefined;
  /** Every request's deadline (epoch ms), on one timer. */
  readonly #deadlines = new Deadlines(epochNow);

  /** `callerThread`: the runtime runs in the client's own thread (threads: 0, inline requests), its results never
   *  moved to another thread (CurlEngine). */
  constructor(config: RuntimeConfig, clientName: string, callerThread = false) {
    this.#link = new DaemonLink({ socketPath: config.socketPath, clientName });
    this.#engine = new CurlEngine(new SocketSupply(this.#link), config.policy, {
      maxConnects: config.maxConnects,
      rateTokens: this.#link.rateTokens,
      callerThread,
    });
    this.#proxy = config.policy.proxy;
    this.#tlsTrust = tlsTrustOf(config.policy);
  }

  async handle(task: RuntimeTask): Promise<RuntimeResult> {
    switch (task.kind) {
      case 'request':
        return this.runRequest(task.request, task.port);
      case 'prewarm':
        return this.#counted(async () => {
          // With a proxy named, the tunnels through it are what the requests will use: warm those.
          const proxy = this.#proxy;
          const granted = await Promise.all(
            task.origins.map((origin) => {
              const trust = origin.https ? this.#tlsTrust : undefined;
              return this.#link.prewarm(
                origin.host,
                origin.port,
                origin.count,
                proxy,
                trust ? { trust } : undefined,
                task.lookahead === true,
              );
            }),
          );
          // (null: a daemon before `granted`; a structured clone keeps null, not undefined, in an array.)
          return { ok: true, granted: granted.map((each) => each ?? null) };
        });
      case 'stats':
        return this.#counted(async () => ({ ok: true, stats: await this.#link.stats() }));
    }
  }

  /** Runs a daemon request as one of this runtime's tasks (idle() waits for it); its failure becomes the result. */
  async #counted(work: () => Promise<RuntimeResult>): Promise<RuntimeResult> {
    this.#running++;
    try {
      return await work();
    } catch (error) {
      return { ok: false, error: toPlainError(error) };
    } finally {
      this.#ended();
    }
  }

  #ended(): void {
    if (--this.#running === 0) this.#onIdle?.();
  }

  /** Tasks running here now (requests, and prewarm and stats where this runtime runs them). */
  get running(): number {
    return this.#running;
  }

  /** Resolves once no task is running here (at once if none is). */
  idle(): Promise<void> {
    if (this.#running === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const previous = this.#onIdle;
      this.#onIdle = () => {
        this.#onIdle = undefined;
        previous?.();
        resolve();
      };
    });
  }

  /** Closes curl's connections (through CLOSESOCKETFUNCTION, so the daemon hears `closed`), then the link. */
  close(): void {
    this.#deadlines.close();
    this.#engine.close();
    this.#link.close();
  }

  /**
   * One request. `port`: its own MessagePort (abort, streamed bodies; a worker thread's requests). `signal`: the
   * caller's AbortSignal, when the runtime runs in the caller's thread (`threads: 0`) and needs no port for it, or
   * the cancellation of a request that came over the thread's lane (lane.ts).
   */
  runRequest(request: TransferRequest, port: RequestPort | undefined, signal?: CancelSignal): Promise<TransferOutcome> {
    return new Promise((resolve) => this.startRequest(request, port, signal, resolve));
  }

  /** runRequest() without a promise of its own: `done` gets the outcome, once. */
  startRequest(
    request: TransferRequest,
    port: RequestPort | undefined,
    signal: CancelSignal | undefined,
    done: OutcomeCallback,
  ): void {
    // (In the caller's thread the body is the caller's own view: one detached since reads as empty. Refused, as over
    // a thread's lane, where it cannot be cloned.)
    if (request.body !== undefined && isDetached(request.body)) {
      port?.close();
      done({ ok: false, error: toPlainError(detachedBodyError()) }, 0);
      return;
    }
    let sink: PortSink | undefined;
    let source: PortSource | undefined;
    if (port) {
      if (request.streamResponse) sink = new PortSink(port);
      if (request.streamedBody) source = new PortSource(port, request.streamedBody.length);
    }
    const run = new RequestRun(request, signal, port, sink, done, this.#requestEnded);
    this.#deadlines.insert(run);
    if (signal) signal.addEventListener('abort', run, { once: true });
    if (port) {
      port.on('message', (message: CallerMessage) => {
        switch (message.t) {
          case 'abort':
          case 'body-error':
            run.cancel(fromPlainError(message.error));
            return;
          case 'credit':
            sink?.credit(message.consumed);
            return;
          case 'data':
            source?.push(message.data);
            return;
          case 'end':
            source?.end();
            return;
        }
      });
      // The caller's end closed before the transfer ended: nobody wants the rest. (A port pair in one thread emits
      // 'close' on both ends, this one too when the transfer's end closes it: no error is made for nothing then,
      // an Error's stack costs more than the rest of a small request's end.)
      port.on('close', () => {
        if (!run.finished) run.cancel(new SockpoolError(ErrorCodes.ABORTED, 'the caller closed the request'));
      });
    }
    this.#running++;
    // (Without a port: the sink and source are the engine's defaults.)
    this.#engine.start(request, port ? { sink, source, signal: run } : { signal: run }, run);
  }

  /** A request's transfer ended (RequestRun.transferEnded): made once, not a closure per request. */
  readonly #requestEnded = (run: RequestRun, outcome: TransferOutcome, idleToOrigin: number): void => {
    // The caller's signal fired after curl finished the transfer and before the outcome reached the caller (which
    // waits for the port's messages, below), when there was nothing left to cancel: the request still fails, as one
    // aborted a moment earlier would (its caller saw abort() before it settled).
    if (outcome.ok && run.aborted && run.callerSignal?.aborted) {
      outcome = { ok: false, error: toPlainError(run.reason) };
    }
    const sink = run.sink;
    if (sink) {
      if (outcome.ok) sink.end();
      else sink.fail(outcome.error);
    }
    this.#deadlines.remove(run);
    this.#ended();
    run.callerSignal?.removeEventListener('abort', run);
    const port = run.port;
    if (port === undefined) {
      run.done(outcome, idleToOrigin);
      return;
    }
    port.close();
    // After the head and chunks the port still holds for the caller (an in-thread pair delivers them in a later turn).
    if (port.whenDelivered) port.whenDelivered(() => run.done(outcome, idleToOrigin));
    else run.done(outcome, idleToOrigin);
  };
}

/**
 * One request's run in the runtime: its cancellation, its entry among the deadlines (expire() at the deadline),
 * and the listener on the caller's signal (handleEvent), in one object.
 */
class RequestRun extends Cancellation implements Deadline {
  at: number;
  index = -1;
  /** The transfer ended (transferEnded ran). */
  finished = false;
  readonly #request: TransferRequest;
  /** The caller's signal, listened to (handleEvent) until the transfer ends. */
  readonly callerSignal: CancelSignal | undefined;
  /** The request's own port (closed when the transfer ends), and the sink that streams its body there. */
  readonly port: RequestPort | undefined;
  readonly sink: PortSink | undefined;
  /** Whoever started the request: gets the outcome. */
  readonly done: OutcomeCallback;
  /** The runtime's end of a request (its #requestEnded). */
  readonly #ended: (run: RequestRun, outcome: TransferOutcome, idleToOrigin: number) => void;

  constructor(
    request: TransferRequest,
    callerSignal: CancelSignal | undefined,
    port: RequestPort | undefined,
    sink: PortSink | undefined,
    done: OutcomeCallback,
    ended: (run: RequestRun, outcome: TransferOutcome, idleToOrigin: number) => void,
  ) {
    super();
    this.at = request.deadline;
    this.#request = request;
    this.callerSignal = callerSignal;
    this.port = port;
    this.sink = sink;
    this.done = done;
    this.#ended = ended;
  }

  expire(): void {
    this.cancel(timeoutError(this.#request));
  }

  /** The caller's signal fired. */
  handleEvent(): void {
    this.cancel(abortedError(this.callerSignal!));
  }

  /** The engine's outcome (TransferDone). */
  transferEnded(outcome: TransferOutcome, idleToOrigin: number): void {
    this.finished = true;
    this.#ended(this, outcome, idleToOrigin);
  }
}
