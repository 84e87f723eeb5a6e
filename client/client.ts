// SockpoolClient: runs in the caller's thread. It validates requests, sends them to a piscina pool of worker
// threads (each running libcurl over sockets the daemon hands in) and rebuilds results and typed errors. Buffered
// requests go over each thread's lane (thread-lanes.ts), the others as piscina tasks. A request alone in flight
// runs in the caller's own thread instead (`inlineWhenIdle`), and so do requests made while others run as long as
// the caller's event loop keeps up (`inlineWhileResponsive`, loop-responsiveness.ts); with `threads: 0` every
// request does.
//
// A request that needs more than a task and its result (an AbortSignal, a streamed request or response body) also
// gets a MessagePort of its own (caller-channel.ts ↔ task.ts): cancellation reaches the one transfer in the worker
// that way, and the thread keeps running. piscina's own task cancellation (which terminates the thread) is never
// used for requests.

import { Buffer } from 'node:buffer';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';
import type { Worker } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { ErrorCodes, fromPlainError, SockpoolError } from '../shared/errors.js';
import { PROXY_NAME } from '../shared/origin.js';
import { MAX_PREWARM_COUNT } from '../shared/protocol.js';
import { RecentMap } from '../shared/recent-map.js';
import {
  epochNow,
  type TransferOutcome,
  type TransferRequest,
  type TransferResult,
  timeoutError,
} from '../worker/curl-engine.js';
import { LANE, STARTUP_FAILED, type ThreadAnnouncement } from '../worker/lane-protocol.js';
import { decodable } from '../worker/response-decoder.js';
import type { ResponseHead } from '../worker/stream-protocol.js';
import type { Task, TaskResult, WorkerConfig } from '../worker/task.js';
import { abortedError, type RuntimeResult, TransferRuntime } from '../worker/transfer-runtime.js';
import type { UrlTarget } from '../worker/url-target.js';
import { type BodyStream, CallerChannel } from './caller-channel.js';
import { type LoopClock, LoopResponsiveness } from './loop-responsiveness.js';
import { discardBody, followRedirects, type Hop, redirectMode } from './redirects.js';
import { type AnnouncedOrigin, type AnnounceOptions, RequestQueue } from './request-queue.js';
import { ThreadLanes } from './thread-lanes.js';
import {
  type BodyInput,
  type ClassifiedBody,
  checkFraming,
  classifyBody,
  fetchMethod,
  invalid,
  isStreamBody,
  type PrewarmTarget,
  type RequestOptions,
  validateAcquireTimeout,
  validateMaxBodyBytes,
  validatePath,
  validatePrewarm,
  validateRequest,
  validateRetry,
  validateSignal,
  validateTimeout,
} from './validate.js';

export { type RequestOptions, validateRequest } from './validate.js';

/**
 * Worker threads when the options name none: one per CPU the caller's own thread leaves, at least 1 and at most 2.
 * A worker thread more than the CPUs can run beside the caller's thread does not add throughput, it adds hops: each
 * thread sleeps and is woken for its share of the requests, and on 2 CPUs the second thread's wake-ups and context
 * switches cost more CPU per request than its parallelism gives back (docs/benchmarks.md, "One worker thread on two
 * CPUs").
 */
export function defaultThreads(cpus: number = availableParallelism()): number {
  return Math.min(2, Math.max(1, Math.floor(cpus) - 1));
}

/** `concurrencyPerThread` when neither it nor `threads` is given: DEFAULT_TRANSFERS spread over `threads`. */
export function defaultConcurrencyPerThread(threads: number): number {
  return Math.ceil(DEFAULT_TRANSFERS / Math.max(1, threads));
}

/** Transfers one thread runs at once when `threads` is given and `concurrencyPerThread` is not. */
export const DEFAULT_CONCURRENCY_PER_THREAD = 64;
/** Transfers the client runs at once when neither is given: as two threads of DEFAULT_CONCURRENCY_PER_THREAD. */
export const DEFAULT_TRANSFERS = 128;

export interface SockpoolClientOptions {
  /** sockpoold's socket. Default: $SOCKPOOL_SOCKET, else /run/sockpool/sockpoold.sock as root, else
   *  ./.sockpool/sockpoold.sock. */
  socketPath?: string;
  /** Worker threads. Default: one per CPU the caller's own thread leaves, at most 2 (defaultThreads()). */
  threads?: number;
  /** Transfers one thread runs at once on its libcurl Multi. Default 64; with `threads` left to its default,
   *  128 ÷ threads (the default client runs 128 at once, on one thread or two). Given alone, it is per thread of
   *  a machine-dependent count: a client that wants a total names both. */
  concurrencyPerThread?: number;
  /**
   * Requests that may wait in the client's queue at once (beyond threads × concurrencyPerThread running); one more
   * fails at once with SOCKPOOL_ERR_LIMIT (field `maxQueued`), unsent. Default Infinity: no bound (a crawler may
   * queue its whole frontier; each waiting request still has its deadline).
   */
  maxQueued?: number;
  /** Default per-request timeout, from the call to the end of the body. Default 30000 ms. */
  timeoutMs?: number;
  /**
   * Default for every request (fetch() included): the most bytes a response body may have, after decoding; beyond
   * them the request fails with SOCKPOOL_ERR_BODY_TOO_LARGE. Default Infinity (no limit, as Node's fetch and
   * undici): a crawler that buffers what it fetches should set one.
   */
  maxBodyBytes?: number;
  /** How long a request may wait for the daemon to hand over a socket. Default 10000 ms, at most 600000. */
  acquireTimeoutMs?: number;
  /** With the daemon down: fail ('fail', default) or let curl connect by itself ('direct'). */
  fallback?: 'fail' | 'direct';
  /** CA bundle for HTTPS verification (default: the system store). */
  caFile?: string;
  /** Disable TLS verification. Only for tests against throwaway servers. */
  insecure?: boolean;
  /**
   * The name of a forward proxy in the daemon's configuration (`[[proxies]]`): the daemon opens a CONNECT tunnel
   * through it to each origin and lends the tunnel, over which curl speaks to the origin as if directly (TLS
   * included). A client cannot give a proxy's address: only the daemon's configuration says where proxies are.
   * Default: none (environment variables such as http_proxy are ignored).
   */
  proxy?: string;
  /**
   * Retry policy for a handed connection that turns out dead under the request (reset, EOF before any response):
   * `deadConnection` (default true) runs such a request once more on a fresh socket when its method is in
   * `methods` (default the idempotent ones: GET HEAD OPTIONS PUT DELETE TRACE).
   */
  retry?: { deadConnection?: boolean; methods?: string[] };
  /**
   * Requests waiting in the client's queue (beyond threads × concurrencyPerThread running) announce their origins
   * to the daemon, which warms sockets for them before they start: the first `origins` distinct origins among the
   * waiting requests (default 64), each once while it has requests waiting, with as many sockets as requests wait
   * for it, at most `socketsPerOrigin` (default 4) and at most its share of the running slots (see
   * request-queue.ts), for an https origin less the requests running to it (HTTP/2 carries them all over one
   * connection). The daemon's prewarm quota per uid bounds it. `false`: off.
   */
  announce?: false | { origins?: number; socketsPerOrigin?: number };
  /**
   * With worker threads: a request made while the client has no other request in flight (buffered or streamed)
   * runs in the caller's own thread, as with `threads: 0` (default true). For one request at a time the two
   * thread hops cost more than the transfer's own work, and the caller's thread would only wait for them;
   * requests made while others run go to the worker threads. `false`: every request goes to a worker thread
   * (curl's work never runs on the caller's event loop).
   */
  inlineWhenIdle?: boolean;
  /**
   * With `inlineWhenIdle`: requests made while others run also run in the caller's own thread, as long as its event
   * loop keeps up (default true; client/loop-responsiveness.ts). After a turn of the loop held it past a lag limit
   * (the caller's own work, or curl's grown past one thread), new requests go to the worker threads for a while,
   * where curl keeps reading while the caller's loop is busy. `false`: only a lone request runs here.
   */
  inlineWhileResponsive?: boolean;
}

export type SockpoolTimings = TransferResult['timings'] & { queueMs: number };

export interface SockpoolResponse extends Omit<TransferResult, 'body' | 'timings'> {
  body: Buffer;
  timings: SockpoolTimings;
  /** Set when redirects were followed to it (`redirect: 'follow'`); `url` is then the last hop's. */
  redirected?: true;
}

/** A response whose body is still arriving. Read it to the end or cancel it: a body nobody reads holds its
 *  transfer (paused) until the request's timeout. */
export interface SockpoolStreamResponse extends Omit<ResponseHead, 'timings'> {
  body: ReadableStream<Uint8Array>;
  /** Timings up to the response head (totalMs: until then). */
  timings: SockpoolTimings;
  /** Set when redirects were followed to it (`redirect: 'follow'`); `url` is then the last hop's. */
  redirected?: true;
}

/** What prewarm() asked for one origin (targets of one origin merged) and how many connects the daemon granted it. */
export interface PrewarmGrant {
  host: string;
  port: number;
  /** Idle sockets asked for. */
  count: number;
  /** Connects the daemon starts: what its idle pool can keep and the uid's prewarm allowance leave; undefined from a
   *  daemon that does not say. */
  granted: number | undefined;
}

export function defaultSocketPath(): string {
  if (process.env.SOCKPOOL_SOCKET) return process.env.SOCKPOOL_SOCKET;
  return process.getuid?.() === 0 ? '/run/sockpool/sockpoold.sock' : join(process.cwd(), '.sockpool', 'sockpoold.sock');
}

/** The compiled entry of the worker threads (dist/worker/task-entry.cjs, which loads task.js), beside this file's
 *  dist/client/ or found from the sources. */
function taskFile(): string {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.js')) return join(dirname(here), '..', 'worker', 'task-entry.cjs');
  const compiled = join(dirname(here), '..', 'dist', 'worker', 'task-entry.cjs');
  if (!existsSync(compiled)) throw new Error(`${compiled} is missing: run npm run build`);
  return compiled;
}

/** What #prepared needs besides the checked request and its body. */
interface PreparedTimes {
  timeoutMs: number;
  streamResponse: boolean;
  decompress: boolean;
  maxBodyBytes: number | undefined;
}

/** What run() needs to start a request, after validation. */
interface Prepared {
  request: TransferRequest;
  signal: AbortSignal | undefined;
  upload: BodyStream | undefined;
  queued: number;
  /** The request's URL, parsed: its origin is what the client's queue announces. */
  target: UrlTarget;
  /** A redirect's next hop (or fetch()'s second try): it waits before the others in the queue (request-queue.ts). */
  ahead: boolean;
}

/** A streamed request started (#startStreamed): its channel, its outcome, and on a thread's lane a way to read at once
 *  what the lane has brought for it (ThreadLanes.stream). */
interface Streamed {
  channel: CallerChannel;
  started: Promise<RuntimeResult>;
  readArrived?: (() => boolean) | undefined;
}

/** Where an origin's requests ran lately (inlineWhenIdle): its idle connections are there, in that runtime's curl
 *  cache, and a lone request that runs elsewhere takes a new one. */
interface OriginRoute {
  /** Its requests last ran in the caller's thread, and its connections with them. Set when one runs there; cleared
   *  when its requests in company go to the threads, where their connections then are (those idle here may be gone
   *  by the time its mark ends: it is new here again, held to the caller's thread's share in company). */
  ranInline: boolean;
  /** Lone requests to it sent to the threads (where its connections were) since it last had company. */
  loneOnThreads: number;
  /** Its requests running in the caller's runtime (#inline) now (#countedHere): counted on the route, which each
   *  request looks up anyway, and not in a Map of its own, which would add and delete a key per request. */
  runningHere: number;
  /** When its requests in company last went to the threads (the caller's loop slow, or the caller's thread full):
   *  they stay there for ORIGIN_ON_THREADS_MS (inlineWhileResponsive). */
  onThreadsSince?: number;
}

/** For tests (not in the package's index): the clock the client's probes of the caller's loop read (LoopClock), so
 *  that a test of where requests in company go decides when the loop is slow, not the machine's load. */
export const LOOP_CLOCK = Symbol('loop-clock');
/** SockpoolClientOptions with what only tests give. */
export type TestClientOptions = SockpoolClientOptions & { [LOOP_CLOCK]?: LoopClock };

/** Origins whose route is remembered (RecentMap: at most twice as many in all). Routes still in use (#routeInUse),
 *  up to half as many, are not pushed out by a flood of other origins; while they take that room, a route in no use
 *  is remembered for the last half as many origins at least. */
export const ROUTES_KEPT = 1024;

/** Lone requests in a row that follow an origin's connections to the threads before one runs in the caller's
 *  thread after all: a caller that has become sequential then pays one new connection and no hops from there on. */
const LONE_ON_THREADS_BEFORE_INLINE = 4;

/**
 * Requests made while others run that the caller's thread takes on at once (inlineWhileResponsive): of origins new
 * here in all, and of each origin already here its own; more go to the worker threads. Enough for the requests an
 * API caller keeps in flight to skip the thread hops; few enough that an origin whose requests move to the threads
 * when the loop turns slow leaves at most this many connections idle here (one that ran all of a burst of 128 here
 * left 128, and the threads opened as many again).
 */
export const INLINE_IN_COMPANY = 16;
/**
 * How long an origin whose requests in company went to the threads keeps them there (inlineWhileResponsive): each
 * runtime has its own curl connection cache, and an origin whose requests alternate between the two opens
 * connections in both (a crawl whose burst filled the caller's thread's share leased a quarter more, each a TLS
 * handshake for https). Long enough that an origin moves at most that often; short enough that a caller's loop
 * that was slow once comes back to running here.
 */
export const ORIGIN_ON_THREADS_MS = 5_000;

/** piscina tasks one thread may run beyond concurrencyPerThread requests: prewarm and stats never wait behind
 *  requests (the client's own queue holds those back), so that announcing a waiting request's origin is not
 *  itself waiting. */
const CONTROL_TASKS_PER_THREAD = 4;
/** A wait this long for tokens or at the origin's cap is the origin's limits at work, not a round trip to the
 *  daemon: the origin is throttled (#noteThrottled). */
const THROTTLED_WAIT_MS = 50;

export class SockpoolClient {
  /** The worker threads; undefined with `threads: 0` (the runtime then lives in this thread). */
  #pool: Piscina | undefined;
  /** The worker threads' lanes: buffered requests go there, not through piscina (worker/lane-protocol.ts). */
  #lanes: ThreadLanes | undefined;
  /** Threads that have not exited yet, as seen whenever piscina drops one: piscina terminates a thread that failed
   *  or crashed without waiting for it, and close() waits for their exits too, so that no thread (with its event
   *  loop's fds) outlives it. Each leaves the set when it exits. */
  readonly #threadsNotExited = new Set<Worker>();
  /** threads: 0 — the runtime in this thread, for every request. */
  #local: TransferRuntime | undefined;
  /** With worker threads and `inlineWhenIdle`: the runtime in this thread for a request made while nothing else
   *  is in flight, made at the first such request (its daemon session and curl's connection cache with it);
   *  undefined until then, or when inlineWhenIdle is off, or if it could not be made (requests then go to the
   *  threads). */
  #inline: TransferRuntime | undefined;
  /** Whether a lone request may run in this thread (inlineWhenIdle, and the runtime could be made). */
  #inlineWanted: boolean;
  /** With `inlineWhileResponsive`: whether the caller's loop keeps up, for requests made while others run. */
  readonly #loop: LoopResponsiveness | undefined;
  /** Where each recent origin's requests ran (only with #inlineWanted); a route in use is kept (#routeInUse). */
  readonly #routes = new RecentMap<string, OriginRoute>(ROUTES_KEPT, (key, route) => this.#routeInUse(key, route));
  readonly #workerData: WorkerConfig;
  #options: Required<
    Omit<
      SockpoolClientOptions,
      | 'caFile'
      | 'proxy'
      | 'retry'
      | 'announce'
      | 'inlineWhenIdle'
      | 'inlineWhileResponsive'
      | 'maxBodyBytes'
      | 'maxQueued'
    >
  > & {
    retry: { deadConnection: boolean; methods: string[] };
    /** undefined: no limit. */
    maxBodyBytes: number | undefined;
    caFile: string | undefined;
    proxy: string | undefined;
  };
  /** Requests beyond the client's concurrency wait here, and announce their origins. */
  readonly #queue: RequestQueue;
  #closing: Promise<void> | undefined;
  /** Requests that make more than one now (#chain), and close()'s wait for none. */
  #chains = 0;
  #chainsDone: Array<() => void> = [];

  /** The worker threads this client runs (0: the runtime in the caller's thread): `threads`, or defaultThreads(). */
  get threads(): number {
    return this.#options.threads;
  }

  constructor(options: SockpoolClientOptions = {}) {
    const threads = options.threads ?? defaultThreads();
    // With the default thread count the client runs DEFAULT_TRANSFERS at once whatever that count is on this
    // machine (a crawler's 100 requests in flight must not queue because it got one thread where it got two).
    const concurrency =
      options.concurrencyPerThread ??
      (options.threads === undefined ? defaultConcurrencyPerThread(threads) : DEFAULT_CONCURRENCY_PER_THREAD);
    if (!Number.isInteger(threads) || threads < 0) throw invalid('threads must be an integer >= 0');
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw invalid('concurrencyPerThread must be a positive integer');
    }
    if (options.fallback !== undefined && options.fallback !== 'fail' && options.fallback !== 'direct') {
      throw invalid("fallback must be 'fail' or 'direct'");
    }
    if (options.inlineWhenIdle !== undefined && typeof options.inlineWhenIdle !== 'boolean') {
      throw invalid('inlineWhenIdle must be a boolean');
    }
    if (options.inlineWhileResponsive !== undefined && typeof options.inlineWhileResponsive !== 'boolean') {
      throw invalid('inlineWhileResponsive must be a boolean');
    }
    // (A string such as "false", read from the environment, would turn verification off by its truthiness.)
    if (options.insecure !== undefined && typeof options.insecure !== 'boolean') {
      throw invalid('insecure must be true or false (a boolean)');
    }
    const maxQueued = options.maxQueued ?? Number.POSITIVE_INFINITY;
    if (maxQueued !== Number.POSITIVE_INFINITY && (!Number.isSafeInteger(maxQueued) || maxQueued < 0)) {
      throw invalid('maxQueued must be a whole number >= 0, or Infinity');
    }
    this.#options = {
      socketPath:
        options.socketPath === undefined
          ? defaultSocketPath()
          : validatePath(options.socketPath, 'socketPath', "sockpoold's socket"),
      threads,
      concurrencyPerThread: concurrency,
      timeoutMs: validateTimeout(options.timeoutMs ?? 30_000),
      maxBodyBytes: options.maxBodyBytes === undefined ? undefined : validateMaxBodyBytes(options.maxBodyBytes),
      acquireTimeoutMs: validateAcquireTimeout(options.acquireTimeoutMs ?? 10_000),
      fallback: options.fallback ?? 'fail',
      caFile: options.caFile === undefined ? undefined : validatePath(options.caFile, 'caFile', 'a CA bundle'),
      insecure: options.insecure ?? false,
      proxy: options.proxy === undefined ? undefined : validateProxyName(options.proxy),
      retry: validateRetry(options.retry),
    };
    const workerData: WorkerConfig = {
      socketPath: this.#options.socketPath,
      maxConnects: Math.max(16, concurrency * 4),
      policy: {
        acquireTimeoutMs: this.#options.acquireTimeoutMs,
        caFile: this.#options.caFile,
        insecure: this.#options.insecure,
        proxy: this.#options.proxy,
        retryDeadConnection: this.#options.retry.deadConnection,
        retryMethods: this.#options.retry.methods,
        directFallback: this.#options.fallback === 'direct',
      },
    };
    this.#workerData = workerData;
    this.#inlineWanted = threads > 0 && (options.inlineWhenIdle ?? true);
    this.#loop =
      this.#inlineWanted && (options.inlineWhileResponsive ?? true)
        ? new LoopResponsiveness(() => this.#queue.running > 0, (options as TestClientOptions)[LOOP_CLOCK])
        : undefined;
    this.#queue = new RequestQueue(
      Math.max(1, threads) * concurrency,
      validateAnnounce(options.announce),
      (origins) => this.#announce(origins),
      maxQueued,
      undefined,
      threads === 0 ? undefined : (key) => this.#lanes?.claimIdle(key) ?? false,
    );
    if (threads === 0) {
      // In the caller's own thread: no thread hops per request (the fastest for keep-alive loads), at the price
      // of running curl's callbacks on the caller's event loop.
      this.#local = new TransferRuntime(workerData, `sockpool-client-${process.pid}`, true);
      return;
    }
    this.#pool = new Piscina({
      filename: taskFile(),
      minThreads: threads,
      maxThreads: threads,
      concurrentTasksPerWorker: concurrency + CONTROL_TASKS_PER_THREAD,
      // Idle workers must keep their event loops running (daemon link, curl's connection cache).
      atomics: 'disabled',
      // No per-task run and wait-time histograms: nobody reads them, and each task would pay for them.
      recordTiming: false,
      idleTimeout: Number.POSITIVE_INFINITY,
      workerData,
    });
    // A thread that dies with no task of its own is replaced by piscina; its requests (if any) already failed.
    this.#pool.on('error', () => {});
    const pool = this.#pool;
    // Each thread (a replacement too) announces its lane when it starts, or why it could not start, with its id:
    // the lanes fail requests fast only once no thread is still starting (see ThreadLanes.startupFailed).
    const reported = new Set<number>();
    const othersStarting = () => pool.threads.some((thread) => !reported.has(thread.threadId));
    const lanes = new ThreadLanes(concurrency, othersStarting);
    this.#lanes = lanes;
    pool.on('message', (message: ThreadAnnouncement) => {
      if (typeof message?.threadId === 'number') reported.add(message.threadId);
      if (message?.[LANE]) lanes.attach(message[LANE]);
      else if (message?.[STARTUP_FAILED]) lanes.startupFailed(message[STARTUP_FAILED], othersStarting());
    });
    // A thread removed (failed, exited) may have been the last one starting, and one may end without a word.
    // Checked in a microtask: piscina emits this before it drops the thread from `threads` (and then starts its
    // replacement, if it starts one).
    pool.on('workerDestroy', () => {
      // The dropped thread is still among `threads` here (terminated, not yet exited).
      for (const thread of pool.threads) this.#trackExit(thread);
      queueMicrotask(() => lanes.threadsSettled(othersStarting()));
    });
  }

  /** One request; the response body is buffered whole. */
  request(url: string | URL, options?: RequestOptions | null): Promise<SockpoolResponse> {
    // (null: no options, as Node's fetch takes init null.)
    options ??= NO_OPTIONS;
    if (options.redirect !== undefined && options.redirect !== 'manual') {
      // Each hop streamed, as requestStream() follows them: a redirect's own body is read past or cancelled (its
      // maxBodyBytes does not fail the chain: the caller never gets that body), the last hop's is buffered here.
      return this.requestStream(url, options).then(bufferedResponse);
    }
    let preparing: Prepared | Promise<Prepared>;
    try {
      preparing = this.#prepare(url, options, false);
    } catch (error) {
      return Promise.reject(error);
    }
    if (preparing instanceof Promise || preparing.upload) return this.#requestWaiting(preparing);
    const prepared = preparing;
    const waiting = this.#queue.enter(prepared.target, prepared.request, prepared.signal, prepared.ahead);
    if (waiting) return this.#requestWaiting(prepared, waiting);
    // The common case, without an async frame: one promise, settled when the outcome comes back.
    return new Promise((resolve, reject) => this.#start(prepared, resolve, reject));
  }

  /** request() for what needs awaiting first: a Blob body read, a place in the queue, a streamed request body. */
  async #requestWaiting(preparing: Prepared | Promise<Prepared>, waiting?: Promise<void>): Promise<SockpoolResponse> {
    let prepared: Prepared;
    if (waiting === undefined) ({ prepared, waiting } = await this.#enter(preparing));
    else prepared = preparing as Prepared;
    const { request, signal, upload, queued, target } = prepared;
    if (waiting) await waiting;
    if (!upload) return new Promise((resolve, reject) => this.#start(prepared, resolve, reject));
    try {
      // A streamed request body needs a port of its own.
      const { channel, started, readArrived } = await this.#startStreamed(request, target.key, upload);
      const result = (await this.#run(request, channel, signal, started, readArrived)) as TransferResult &
        SockpoolResponse;
      this.#noteThrottled(target, result.timings);
      return response(result, queued);
    } catch (error) {
      this.#noteThrottled(target, error as { code?: string });
      throw error;
    } finally {
      this.#queue.leave(target);
    }
  }

  /**
   * Enters a prepared request into the queue (its place, or the wait for one). One whose Blob body is still being read
   * counts as a chain until it is in (#chain): close() called meanwhile waits for it, as for any request made before
   * it, instead of finding the queue empty and closing the runtimes under it.
   */
  async #enter(
    preparing: Prepared | Promise<Prepared>,
  ): Promise<{ prepared: Prepared; waiting: Promise<void> | undefined }> {
    if (!(preparing instanceof Promise)) {
      const { target, request, signal, ahead } = preparing;
      return { prepared: preparing, waiting: this.#queue.enter(target, request, signal, ahead) };
    }
    this.#chains++;
    try {
      const prepared = await preparing;
      return {
        prepared,
        waiting: this.#queue.enter(prepared.target, prepared.request, prepared.signal, prepared.ahead),
      };
    } finally {
      // (After the enter: the queue holds it when close() looks there.)
      this.#chainEnded();
    }
  }

  /**
   * Runs a buffered request that holds a slot in the queue (given back here): on a worker thread's lane, or in
   * this thread (threads: 0, or alone in flight with inlineWhenIdle). In both the signal goes to the runtime
   * itself: no port.
   */
  #start(prepared: Prepared, resolve: (response: SockpoolResponse) => void, reject: (error: Error) => void): void {
    const { request, signal, queued, target } = prepared;
    // A signal that fired after the queue gave the request its slot (e.g. when the request holding that slot was
    // aborted by the same signal, which frees it before this request's own listener there is called): the runtimes
    // and lanes below only listen for an abort to come, and the request would go out regardless.
    if (signal?.aborted) {
      this.#queue.leave(target);
      reject(abortedError(signal));
      return;
    }
    const finish = (outcome: TransferOutcome) => {
      this.#noteThrottled(target, outcome.ok ? outcome.result.timings : outcome.error);
      this.#queue.leave(target);
      if (outcome.ok) resolve(response(outcome.result as TransferResult & SockpoolResponse, queued));
      // Cancelled by the caller: the error carries the signal's reason as its cause, on a lane or in this thread.
      else if (signal?.aborted && outcome.error.code === ErrorCodes.ABORTED) reject(abortedError(signal));
      else reject(fromPlainError(outcome.error));
    };
    if (this.#local) {
      // threads: 0 (a request that cannot start ends through `finish` too).
      this.#local.startRequest(request, undefined, signal, finish);
      return;
    }
    const fail = (error: Error) => {
      this.#queue.leave(target);
      reject(error);
    };
    if (!this.#mayRunHere(target.key)) {
      this.#startAsConfigured(request, signal, finish, fail, target.key);
      return;
    }
    queueMicrotask(() => {
      // A signal fired in the same turn, after request() returned: neither way would hear it any more (a lane only
      // listens for an abort to come, and the request went out regardless to the threads).
      if (signal?.aborted) {
        fail(abortedError(signal));
        return;
      }
      const inline = this.#hereRuntime(target.key);
      if (!inline) this.#startAsConfigured(request, signal, finish, fail, target.key);
      else {
        const ended = this.#countedHere(target.key);
        inline.startRequest(request, undefined, signal, (outcome) => {
          ended();
          finish(outcome);
        });
      }
    });
  }

  /** A request that waited for its origin's rate tokens or at its connection cap (or was refused for its rate)
   *  makes the origin throttled in the queue (request-queue.ts) until the mark ends, a minute or more after the last
   *  such request: its requests and the other throttled origins' start only within half the slots while other
   *  requests wait; while nothing else waits, they borrow free slots beyond that, all but a reserve (a quarter) where
   *  requests to other origins that come later start at once. */
  #noteThrottled(target: UrlTarget, seen: { tokenWaitMs?: number; capWaitMs?: number; code?: string }): void {
    if (
      (seen.tokenWaitMs ?? 0) >= THROTTLED_WAIT_MS ||
      (seen.capWaitMs ?? 0) >= THROTTLED_WAIT_MS ||
      seen.code === ErrorCodes.RATE_LIMITED
    ) {
      this.#queue.throttled(target);
    }
  }

  /**
   * Whether a request may run in this thread: it holds the queue's only slot now (inlineWhenIdle), or the caller's
   * loop keeps up (inlineWhileResponsive). The caller then asks #hereRuntime at the end of its turn (a microtask),
   * so that requests made together (a burst, an HTTP/2 fan-out) run in one runtime together and share its
   * connections. Otherwise the request keeps company on a thread, and its origin's route says so.
   */
  #mayRunHere(key: string): boolean {
    if (!this.#inlineWanted) return false;
    this.#loop?.watch();
    if (this.#queue.running === 1 || this.#loop?.responsive) return true;
    this.#inCompany(key);
    return false;
  }

  /** At the end of the caller's turn: the runtime in this thread if the request is still alone in flight and its
   *  origin's route sends it here, or if it has company, the caller's loop keeps up, fewer than INLINE_IN_COMPANY
   *  run here (or, for an origin already here, fewer than that of its own) and the origin's requests in company did
   *  not go to the threads within ORIGIN_ON_THREADS_MS (the origin's lone requests then run here too: its
   *  connections are here). The caller counts a request it starts here (#countedHere). */
  #hereRuntime(key: string): TransferRuntime | undefined {
    if (this.#queue.running === 1) return this.#loneRunsInline(key) ? this.#inlineRuntime() : undefined;
    const now = performance.now();
    const route = this.#routeOf(key);
    route.loneOnThreads = 0;
    // On the threads: the origin's requests in company went there lately, and its connections with them (its lone
    // requests follow them: #loneRunsInline).
    if (route.onThreadsSince !== undefined && now - route.onThreadsSince < ORIGIN_ON_THREADS_MS) {
      route.ranInline = false;
      return undefined;
    }
    // To go there: the caller's loop is slow, or the origin is new here and the caller's thread runs its share in
    // company (an origin whose requests run here stays here past that share: splitting it between the runtimes
    // would open connections in both).
    if (!this.#loop?.responsive || (!route.ranInline && (this.#inline?.running ?? 0) >= INLINE_IN_COMPANY)) {
      route.onThreadsSince = now;
      route.ranInline = false;
      return undefined;
    }
    // An origin here that runs INLINE_IN_COMPANY of its own here: the rest to the threads, the origin still here
    // (unmarked: its next requests come back here once it runs fewer). A slow turn then leaves at most that many of
    // its connections idle here.
    if (route.runningHere >= INLINE_IN_COMPANY) return undefined;
    route.onThreadsSince = undefined;
    route.ranInline = true;
    return this.#inlineRuntime();
  }

  /**
   * Whether a lone request to this origin runs in the caller's thread: yes where its requests last ran here (a
   * connection to it may be idle here), or where none ran anywhere yet (as far as the routes remember); where its
   * last requests ran on the threads, after LONE_ON_THREADS_BEFORE_INLINE lone requests in a row went there (each
   * reusing their connection).
   */
  #loneRunsInline(key: string): boolean {
    const route = this.#routes.get(key);
    if (route === undefined) {
      this.#routes.set(key, { ranInline: true, loneOnThreads: 0, runningHere: 0 });
      return true;
    }
    if (route.ranInline) return true;
    if (++route.loneOnThreads < LONE_ON_THREADS_BEFORE_INLINE) return false;
    route.ranInline = true;
    return true;
  }

  /** A request to this origin starts in the caller's runtime (#inline): counted on its route until the returned
   *  callback. (The route is kept while the request runs: #routeInUse. Past that, the count of a route a flood
   *  pushed out ends with it, and the origin's new route counts from 0.) */
  #countedHere(key: string): () => void {
    const route = this.#routeOf(key);
    route.runningHere++;
    return () => {
      route.runningHere--;
    };
  }

  /** A request to this origin runs beside others, on a thread. */
  #inCompany(key: string): void {
    const route = this.#routeOf(key);
    route.loneOnThreads = 0;
    route.onThreadsSince = performance.now();
    route.ranInline = false;
  }

  /** Whether the origin's route still decides where its requests go: some of them run (in either runtime), or its
   *  requests in company are on the threads for a while yet. Forgotten, the origin would count as new here, and
   *  its next requests could run here while its connections are on the threads (or the other way round). */
  #routeInUse(key: string, route: OriginRoute): boolean {
    if (this.#queue.runningTo(key) > 0) return true;
    return route.onThreadsSince !== undefined && performance.now() - route.onThreadsSince < ORIGIN_ON_THREADS_MS;
  }

  /** The origin's route, made (nothing ran here yet) if it has none. */
  #routeOf(key: string): OriginRoute {
    let route = this.#routes.get(key);
    if (route === undefined) {
      route = { ranInline: false, loneOnThreads: 0, runningHere: 0 };
      this.#routes.set(key, route);
    }
    return route;
  }

  /** A buffered request where the `threads` option puts it: a worker thread's lane, or (threads: 0) the runtime in
   *  this thread. */
  #startAsConfigured(
    request: TransferRequest,
    signal: AbortSignal | undefined,
    finish: (outcome: TransferOutcome) => void,
    fail: (error: Error) => void,
    originKey: string,
  ): void {
    if (this.#lanes) this.#lanes.start(request, signal, finish, fail, originKey);
    else this.#local!.startRequest(request, undefined, signal, finish);
  }

  /** The runtime for lone requests in this thread, made on first use; undefined (for good) if it cannot be made:
   *  the worker threads then run every request. */
  #inlineRuntime(): TransferRuntime | undefined {
    if (this.#inline) return this.#inline;
    try {
      this.#inline = new TransferRuntime(this.#workerData, `sockpool-client-${process.pid}`, true);
    } catch {
      // (Nothing is lost: the threads have their own runtimes, and a request they cannot run says why.)
      this.#inlineWanted = false;
    }
    return this.#inline;
  }

  /** One request whose response body is a stream, resolved as soon as the response head is in. */
  async requestStream(url: string | URL, options?: RequestOptions | null): Promise<SockpoolStreamResponse> {
    options ??= NO_OPTIONS;
    if (options.redirect !== undefined && options.redirect !== 'manual') {
      return this.#following(
        url,
        options,
        (hopUrl, hop) => this.requestStream(hopUrl, hop),
        // A redirect's body: read to its end (its connection stays in curl's cache), or cancelled on a failure.
        (response, failed) => (failed ? response.body.cancel() : discardBody(response.body)),
      );
    }
    const { prepared, waiting } = await this.#enter(this.#prepare(url, options, true));
    const { request, signal, upload, queued, target } = prepared;
    if (waiting) await waiting;
    let streamed: Streamed;
    try {
      streamed = await this.#startStreamed(request, target.key, upload, (options as InternalOptions)[BODY_FAILURE]);
    } catch (error) {
      // The slot is held from here: a start that throws must give it back, or the queue runs one request less for
      // good and close() waits for it for ever (found in review with a body detached while queued, which threw
      // from the lane's postMessage; test/client-queue-edges.test.ts).
      this.#queue.leave(target);
      throw error;
    }
    const { channel, started, readArrived } = streamed;
    // The run ends when the transfer does (the body read or cancelled); its failures (and a dead worker) fail the
    // head or the body. The slot is held until then.
    this.#run(request, channel, signal, started, readArrived)
      .catch((error: Error) => {
        this.#noteThrottled(target, error as { code?: string });
        channel.fail(error);
      })
      .finally(() => this.#queue.leave(target));
    const head = await channel.head;
    this.#noteThrottled(target, head.timings);
    return { ...head, body: channel.body!, timings: { ...head.timings, queueMs: queueMs(queued, head.timings) } };
  }

  /**
   * A standard fetch Response over requestStream(): the body streams. Redirects are followed as the Fetch standard
   * says (`init.redirect`: 'follow' by default, 'manual' returns the 3xx response, 'error' rejects), each hop a
   * request of its own through the daemon (client/redirects.ts).
   */
  async fetch(input: string | URL | Request, init?: RequestInit | null): Promise<Response> {
    // (null: no init, as Node's fetch takes it.)
    init ??= NO_INIT;
    // (Read before anything can fail: a rejection is the signal's reason once it has fired.)
    const signal =
      (init.signal !== undefined ? init.signal : input instanceof Request ? input.signal : null) ?? undefined;
    try {
      return await this.#fetch(input, init, signal);
    } catch (error) {
      throw fetchFailure(error, signal, 'fetch failed');
    }
  }

  async #fetch(input: string | URL | Request, init: RequestInit, signal: AbortSignal | undefined): Promise<Response> {
    const source = input instanceof Request ? input : undefined;
    const headers = new Headers(init.headers ?? source?.headers);
    // As Node's fetch says who it is ('node'): some servers refuse a request without one (GitHub's API: 403).
    if (!headers.has('user-agent')) headers.set('user-agent', 'node');
    // A Request's body is read whole, as bytes: Node's fetch sends a body a Request holds (a string, JSON, bytes)
    // with its content-length and sends it again at a 307/308; streamed as the Request's ReadableStream, it went
    // chunked (a server wanting a length answers 411) and could not follow a 307/308. (A Request hides whether its
    // body came from a stream; to stream an upload, give the stream in `init.body`.)
    // (init.body null: the Request's body, as the Fetch standard takes "input or init body".)
    // One deadline covers the whole fetch(): reading a Request's body, each try (and each redirect), the body.
    const timeoutMs = this.#options.timeoutMs;
    const deadline = performance.now() + timeoutMs;
    const raw =
      init.body != null
        ? init.body
        : source?.body
          ? await readRequestBody(source, signal, timeoutMs, () =>
              timeoutError({ method: source.method, url: source.url, timeoutMs }),
            )
          : null;
    let body: BodyInput | undefined;
    if (raw !== null && raw !== undefined) {
      if (raw instanceof Uint8Array || raw instanceof ArrayBuffer) body = raw;
      // ReadableStreams, AsyncIterables, Node Readables: streamed as they are read (as Node's fetch does), under the
      // request's signal and deadline, never buffered first.
      else if (isStreamBody(raw as BodyInput)) body = raw as BodyInput;
      else {
        // Strings, Blobs, FormData, URLSearchParams: bytes and content type as fetch would send them.
        const wrapped = new Response(raw as ConstructorParameters<typeof Response>[0]);
        const type = wrapped.headers.get('content-type');
        if (type && !headers.has('content-type')) headers.set('content-type', type);
        body = new Uint8Array(await wrapped.arrayBuffer());
      }
    }
    // Normalized as the Fetch standard says (and Node's fetch does): `delete` goes as DELETE, `patch` as `patch`.
    const method = fetchMethod(init.method ?? source?.method ?? 'GET');
    // A POST or PUT without a body says content-length: 0, as the Fetch standard says, and a PATCH or QUERY too, as
    // Node's fetch (undici) sends it: curl would send no length at all, which some servers answer with 411 Length
    // Required.
    if (body === undefined && PAYLOAD_METHODS.has(method)) body = new Uint8Array(0);
    const url = source ? source.url : (input as string | URL);
    // As Node's fetch: compressed bodies asked for and decoded, redirects followed unless told otherwise.
    const options: InternalOptions = {
      method,
      headers,
      body,
      // (init.signal null: no signal, even where the Request has one.)
      signal,
      decompress: true,
      redirect: redirectMode(init.redirect ?? source?.redirect, 'follow'),
      [CONTINUING]: true,
      [METHOD_AS_GIVEN]: true,
      // The body fails as Node's fetch's does (the signal's reason, or TypeError 'terminated').
      [BODY_FAILURE]: (error: Error) => fetchFailure(error, signal, 'terminated'),
    };
    return this.#chain(async () => {
      let response = await this.requestStream(url, {
        ...options,
        timeoutMs: timeLeft(deadline, timeoutMs, method, String(url)),
      });
      if (
        !decodable(response.headers) &&
        !hasNullBody(response.status, method) &&
        REPEATABLE_METHODS.has(method) &&
        !isStreamBody(body)
      ) {
        // A coding not known fails the body (Node's fetch hands it on as it came): asked again, not decoded.
        await response.body.cancel();
        // (What is left of the fetch()'s time, not a timeoutMs of its own: one fetch() could take twice as long.)
        const again: InternalOptions = {
          ...options,
          decompress: false,
          [AHEAD]: true,
          timeoutMs: timeLeft(deadline, timeoutMs, method, String(url)),
        };
        response = await this.requestStream(url, again);
      }
      try {
        // (A HEAD stays a HEAD through any redirect.)
        return fetchResponse(response, method);
      } catch (error) {
        // A head a Response cannot hold: its body is cancelled, or its transfer held its slot (and its connection,
        // mid-body) until the deadline, and close() waited for it.
        await response.body.cancel().catch(() => {});
        throw error;
      }
    });
  }

  /**
   * Runs a request that makes more than one (redirects followed, fetch()'s second try) as one: refused once the
   * client is closing, and close() waits for it; the requests it makes pass `CONTINUING` (#prepare lets them through
   * while the client closes).
   */
  async #chain<T>(work: () => Promise<T>): Promise<T> {
    if (this.#closing) throw new SockpoolError(ErrorCodes.CLOSED, 'client is closed');
    this.#chains++;
    try {
      return await work();
    } finally {
      this.#chainEnded();
    }
  }

  #chainEnded(): void {
    if (--this.#chains === 0) for (const done of this.#chainsDone.splice(0)) done();
  }

  /**
   * A request with `redirect` 'follow' or 'error' (client/redirects.ts): `send` makes each hop (a request of its
   * own, `redirect: 'manual'`, with what is left of the request's `timeoutMs`), `drop` disposes of a redirect's
   * body. The response says `redirected` when it came through any.
   */
  async #following<R extends SockpoolResponse | SockpoolStreamResponse>(
    url: string | URL,
    options: RequestOptions,
    send: (url: string, options: InternalOptions) => Promise<R>,
    drop: (response: R, failed: boolean) => Promise<void>,
  ): Promise<R> {
    // (request() and requestStream() come here for 'follow' and 'error' only: anything else throws here.)
    const mode = redirectMode(options.redirect, 'follow') as 'follow' | 'error';
    const timeoutMs = options.timeoutMs === undefined ? this.#options.timeoutMs : validateTimeout(options.timeoutMs);
    const deadline = performance.now() + timeoutMs;
    const first: Hop = {
      url: String(url),
      // (As the request will send it: nextHop compares methods.)
      method: (options as InternalOptions)[METHOD_AS_GIVEN]
        ? String(options.method ?? 'GET')
        : String(options.method ?? 'GET').toUpperCase(),
      headers: options.headers,
      body: options.body,
    };
    // (A hop after the first waits before the other requests in the queue: its chain already waited its turn. So
    // does the first of fetch()'s second try.)
    const ahead = (options as InternalOptions)[AHEAD];
    const sendHop = (hop: Hop) =>
      send(hop.url, { ...hopOptions(options, hop, deadline, timeoutMs), [AHEAD]: hop !== first || ahead });
    return this.#chain(async () => {
      const { response, followed } = await followRedirects(first, mode, sendHop, drop);
      if (followed > 0) response.redirected = true;
      return response;
    });
  }

  /**
   * Asks the daemon to warm sockets to these origins: URLs (strings or URL objects: their origin, one socket each)
   * or `{ host, port, count?, https? }` (`https`, default port 443: warm TLS sessions where the daemon would relay
   * them to this client). One target or an array; targets of one origin are merged, their counts added.
   * Resolves with each merged origin and how many connects the daemon granted it: what its idle pool can keep and the
   * uid's prewarm allowance leave (`granted` undefined from a daemon that does not say).
   */
  async prewarm(origins: PrewarmTarget | PrewarmTarget[]): Promise<PrewarmGrant[]> {
    if (this.#closing) throw new SockpoolError(ErrorCodes.CLOSED, 'client is closed');
    // Canonical hosts (the daemon keys them so again): bad input fails here, before any thread.
    const targets = validatePrewarm(origins);
    const task: Task = { kind: 'prewarm', origins: targets };
    const outcome = await this.#dispatch(task);
    if (!outcome.ok) throw fromPlainError(outcome.error);
    const granted = 'granted' in outcome ? outcome.granted : [];
    return targets.map(({ host, port, count }, index) => ({ host, port, count, granted: granted[index] ?? undefined }));
  }

  async stats(): Promise<Record<string, unknown>> {
    // (As prewarm: a piscina task after close() would start a worker thread again, which nothing would close.)
    if (this.#closing) throw new SockpoolError(ErrorCodes.CLOSED, 'client is closed');
    const task: Task = { kind: 'stats' };
    const outcome = await this.#dispatch(task);
    if (!outcome.ok) throw fromPlainError(outcome.error);
    return 'stats' in outcome ? outcome.stats : {};
  }

  /** Waits for in-flight requests (streamed bodies included), then stops the worker threads. */
  close(): Promise<void> {
    // Requests already made run first, those still waiting in the queue included, and every redirect they follow.
    this.#closing ??= this.#chainsIdle()
      .then(() => this.#queue.idle())
      .then(() => (this.#pool ? this.#closePool(this.#pool, this.#lanes!) : this.#closeLocal()));
    return this.#closing;
  }

  #chainsIdle(): Promise<void> {
    if (this.#chains === 0) return Promise.resolve();
    return new Promise((resolve) => this.#chainsDone.push(resolve));
  }

  /** Waits for the requests on the lanes, then for piscina's tasks, and stops the threads; resolves once every
   *  thread has exited. */
  async #closePool(pool: Piscina, lanes: ThreadLanes): Promise<void> {
    // (No request can start any more: close() waited for the queue, and #prepare refuses new ones.)
    if (this.#inline) {
      await this.#inline.idle();
      this.#inline.close();
    }
    this.#loop?.close();
    await lanes.idle();
    lanes.close();
    await pool.close();
    await Promise.all(Array.from(this.#threadsNotExited, (thread) => once(thread, 'exit')));
  }

  #trackExit(thread: Worker): void {
    // threadId is -1 once the thread has exited (piscina may drop it from inside its 'exit' event, too late for a
    // listener added now).
    if (thread.threadId === -1 || this.#threadsNotExited.has(thread)) return;
    this.#threadsNotExited.add(thread);
    thread.once('exit', () => this.#threadsNotExited.delete(thread));
  }

  /** Origins of waiting requests, announced to the daemon (best effort: a refusal, a quota, a daemon down are
   *  the requests' business when they run). */
  #announce(origins: AnnouncedOrigin[]): void {
    this.#dispatch({ kind: 'prewarm', origins, lookahead: true }).catch(() => {});
  }

  /** threads: 0 — wait for this client's requests to finish, then close curl's connections and the link. */
  async #closeLocal(): Promise<void> {
    await this.#local?.idle();
    this.#local?.close();
  }

  /** One task, on a worker thread or (threads: 0) here; a dead thread becomes SOCKPOOL_ERR_WORKER_EXITED. */
  #dispatch(task: Task): Promise<TaskResult> {
    if (this.#local) {
      // (The runtime counts its tasks: close() waits for them with idle().)
      return this.#local.handle(task);
    }
    const pool = this.#pool!;
    const cannotStart = this.#lanes!.startupError();
    if (cannotStart) return Promise.reject(cannotStart);
    return (pool.run(task) as Promise<TaskResult>).catch(async (error) => {
      // A thread that cannot start posts why on its parentPort and then fails; piscina's rejection comes through
      // another port, so it may be handled first. Both are in by the end of this turn's poll: the cause is known
      // then (SOCKPOOL_ERR_WORKER_START rather than _WORKER_EXITED).
      await new Promise((resolve) => setImmediate(resolve));
      return this.#threadFailure(error);
    });
  }

  /** Validates a request (throws a typed error) and builds what the runtime gets; a promise only while a Blob
   *  body is read. */
  #prepare(url: string | URL, options: InternalOptions, streamResponse: boolean): Prepared | Promise<Prepared> {
    if (this.#closing && options[CONTINUING] !== true) throw new SockpoolError(ErrorCodes.CLOSED, 'client is closed');
    const queued = performance.now();
    const checked = validateRequest(url, options, options[METHOD_AS_GIVEN] === true);
    const timeoutMs = options.timeoutMs === undefined ? this.#options.timeoutMs : validateTimeout(options.timeoutMs);
    const signal = validateSignal(options.signal);
    if (signal?.aborted) throw abortedError(signal);
    if (options.decompress !== undefined && typeof options.decompress !== 'boolean') {
      throw invalid('decompress must be a boolean');
    }
    const decompress = options.decompress === true;
    const maxBodyBytes =
      options.maxBodyBytes === undefined ? this.#options.maxBodyBytes : validateMaxBodyBytes(options.maxBodyBytes);
    const body = classifyBody(options.body);
    const times = {
      timeoutMs,
      signal,
      streamResponse,
      decompress,
      maxBodyBytes,
      queued,
      ahead: options[AHEAD] === true,
    };
    if (body instanceof Promise) return body.then((read) => this.#prepared(checked, read, times));
    return this.#prepared(checked, body, times);
  }

  #prepared(
    checked: ReturnType<typeof validateRequest>,
    body: ClassifiedBody,
    {
      timeoutMs,
      signal,
      streamResponse,
      decompress,
      maxBodyBytes,
      queued,
      ahead,
    }: Omit<Prepared, 'request' | 'upload' | 'target'> & PreparedTimes,
  ): Prepared {
    const declared = checkFraming(checked.headers, body);
    const request: TransferRequest = {
      url: checked.target.href,
      method: checked.method,
      headers: checked.headers,
      body: body.bytes,
      streamedBody: body.stream ? { length: declared } : undefined,
      streamResponse,
      decompress,
      maxBodyBytes,
      deadline: epochNow() + timeoutMs,
      timeoutMs,
    };
    return { request, signal, upload: body.stream, queued, target: checked.target, ahead };
  }

  /**
   * Starts a streamed request (either way) with its channel: on the runtime in this thread when one runs it, else on
   * a worker thread's lane, with a port of its own there. `started` is its outcome. In this thread: with
   * `threads: 0`, the client's own runtime; with worker threads, the caller's runtime where a buffered request would
   * run (#mayRunHere, #hereRuntime: decided at the end of the caller's turn). Decided before the request's channel is
   * made: a request that stays in this thread needs no MessageChannel.
   */
  async #startStreamed(
    request: TransferRequest,
    key: string,
    upload: BodyStream | undefined,
    bodyFailure?: (error: Error) => unknown,
  ): Promise<Streamed> {
    const streamResponse = request.streamResponse === true;
    let runtime = this.#local;
    if (runtime === undefined && this.#mayRunHere(key)) {
      // (The requests the caller made in the same turn enter the queue in the microtasks queued before this one.)
      await null;
      // Decided and started in one go: the runtime counts the request (its share in company, INLINE_IN_COMPANY) before
      // the next stream made in this turn asks (an await between them let every stream of a burst run here).
      runtime = this.#hereRuntime(key);
    }
    if (runtime) {
      const uploadLength = request.streamedBody?.length;
      const channel = new CallerChannel({ streamResponse, upload, uploadLength, bodyFailure });
      const started = runtime.handle({ kind: 'request', request, port: channel.workerPort });
      if (runtime !== this.#local) {
        const ended = this.#countedHere(key);
        started.then(ended, ended);
      }
      return { channel, started };
    }
    const stream = this.#lanes!.stream(request, key);
    return {
      channel: new CallerChannel({
        streamResponse,
        upload,
        uploadLength: request.streamedBody?.length,
        port: stream.port,
        bodyFailure,
      }),
      started: stream.outcome,
      readArrived: stream.readArrived,
    };
  }

  /**
   * Waits for a streamed request's outcome (`started`); rejects with the transfer's typed error,
   * SOCKPOOL_ERR_TIMEOUT at the deadline even while the request waits for room on a thread (the runtime enforces
   * the same deadline), SOCKPOOL_ERR_ABORTED when the signal fires, or SOCKPOOL_ERR_WORKER_EXITED when the thread
   * died. Cancellations reach the runtime over the channel.
   */
  async #run(
    request: TransferRequest,
    channel: CallerChannel,
    signal: AbortSignal | undefined,
    started: Promise<RuntimeResult>,
    readArrived?: () => boolean,
  ): Promise<TransferResult> {
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const cancelled = new Promise<never>((_, reject) => {
      const cancel = (error: SockpoolError) => {
        channel.abort(error);
        reject(error);
      };
      // (On a thread's lane its outcome may have come in time and wait behind this timer, this thread having been busy
      // past the deadline: read first, see ThreadLanes#expire.)
      timer = setTimeout(
        () => readArrived?.() || cancel(timeoutError(request)),
        Math.max(0, request.deadline - epochNow()),
      );
      if (signal) {
        onAbort = () => cancel(abortedError(signal));
        signal.addEventListener('abort', onAbort, { once: true });
        // (Fired while the request waited for its place or its runtime: the listener will never be called.)
        if (signal.aborted) onAbort();
      }
    });
    try {
      const outcome = await Promise.race([started, cancelled]);
      if (!outcome.ok) throw fromPlainError(outcome.error);
      if (!('result' in outcome)) throw new SockpoolError(ErrorCodes.PROTOCOL, 'worker returned no result');
      // The transfer ended; its body may still be unread here, and the signal still fails what is left of it.
      if (signal && request.streamResponse) channel.followSignal(signal, abortedError);
      return outcome.result;
    } catch (error) {
      channel?.fail(error as Error);
      throw error;
    } finally {
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener('abort', onAbort);
      if (!request.streamResponse) channel?.close();
    }
  }

  /** piscina rejected the task itself: the thread died (crash, terminate) or the pool is closing. */
  #threadFailure(error: unknown): never {
    const message = error instanceof Error ? error.message : String(error);
    if (this.#closing) throw new SockpoolError(ErrorCodes.CLOSED, `client is closed (${message})`);
    // A task sent while its thread was still starting, and the thread could not start.
    const cannotStart = this.#lanes?.threadStartFailure();
    if (cannotStart) throw cannotStart;
    throw new SockpoolError(ErrorCodes.WORKER_EXITED, `the worker thread running the request exited: ${message}`);
  }
}

/** A streamed response read whole: its body (failing as the stream does, e.g. SOCKPOOL_ERR_BODY_TOO_LARGE) in one
 *  Buffer, `totalMs` to its end. */
async function bufferedResponse(response: SockpoolStreamResponse): Promise<SockpoolResponse> {
  const headAt = performance.now();
  const chunks: Uint8Array[] = [];
  for await (const chunk of response.body) chunks.push(chunk);
  // (A streamed head's totalMs is curl's at the head, which may lag its ttfbMs.)
  const { totalMs, ttfbMs } = response.timings;
  const timings = { ...response.timings, totalMs: Math.max(totalMs, ttfbMs) + (performance.now() - headAt) };
  return { ...response, body: Buffer.concat(chunks), timings };
}

/**
 * A Request's body read whole, under the fetch()'s signal and within `timeoutMs`: when either fires first the body
 * is cancelled (its stream's cancel gets the reason) and the read rejects with the signal's reason or `timedOut()`.
 * Read with Request.arrayBuffer(), a stream that stalled hung the fetch() for good: neither applied yet. A body
 * already used or locked rejects as arrayBuffer() does.
 */
async function readRequestBody(
  source: Request,
  signal: AbortSignal | undefined,
  timeoutMs: number,
  timedOut: () => SockpoolError,
): Promise<Uint8Array> {
  const stream = source.body!;
  if (source.bodyUsed || stream.locked) return new Uint8Array(await source.arrayBuffer());
  const reader = stream.getReader();
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const stopped = new Promise<never>((_, reject) => {
    const stop = (reason: unknown) => {
      reject(reason);
      reader.cancel(reason).catch(() => {});
    };
    timer = setTimeout(() => stop(timedOut()), timeoutMs);
    if (signal) {
      onAbort = () => stop(signal.reason);
      signal.addEventListener('abort', onAbort, { once: true });
      // (Fired before the fetch() began: the listener will never be called.)
      if (signal.aborted) onAbort();
    }
  });
  const read = async () => {
    const chunks: Uint8Array[] = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return Buffer.concat(chunks);
      chunks.push(value);
    }
  };
  try {
    return await Promise.race([read(), stopped]);
  } finally {
    clearTimeout(timer);
    if (onAbort) signal?.removeEventListener('abort', onAbort);
  }
}

/** A request's options when none are given (only ever read): not a new object per call. */
const NO_OPTIONS: RequestOptions = Object.freeze({});
/** fetch()'s init when none is given (only ever read). */
const NO_INIT: RequestInit = Object.freeze({});

/** Methods whose fetch() without a body says content-length: 0: POST and PUT (the Fetch standard), PATCH and QUERY
 *  (undici's, which expects a payload of these four; case-sensitive, as there: a `patch` says nothing). */
const PAYLOAD_METHODS = new Set(['POST', 'PUT', 'PATCH', 'QUERY']);

/** Methods a fetch() may send again to get a body it cannot decode as it came (no side effects, RFC 9110). */
const REPEATABLE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/** Marks a request made by a request that makes several (SockpoolClient#chain): it runs while the client closes. */
const CONTINUING = Symbol('continuing');

/** Marks a redirect's next hop, or fetch()'s second try: part of a request the client's queue already let run, it
 *  waits there before the others (request-queue.ts). */
const AHEAD = Symbol('ahead');

/** fetch()'s own: what a streamed response body fails with, for a failure of the transfer (fetchFailure). */
const BODY_FAILURE = Symbol('body-failure');

/** fetch()'s own: its method is sent as given (it normalized it as the Fetch standard says: fetchMethod), not
 *  upper-cased as request()'s is. */
const METHOD_AS_GIVEN = Symbol('method-as-given');

type InternalOptions = RequestOptions & {
  [CONTINUING]?: true;
  [AHEAD]?: true;
  [METHOD_AS_GIVEN]?: true;
  [BODY_FAILURE]?: (error: Error) => unknown;
};

/**
 * A failure as Node's fetch reports it, for code written for it: once the signal has fired, its reason (as the Fetch
 * standard says: an AbortError, a TimeoutError for AbortSignal.timeout(), or the caller's own); else a TypeError
 * ('fetch failed', a body's 'terminated') whose cause is the typed error, with its `code` and fields copied on it
 * (branch on `error.code` as for request()). Anything else (a TypeError of a Request's body) as it is.
 */
function fetchFailure(error: unknown, signal: AbortSignal | undefined, message: string): unknown {
  if (signal?.aborted) return signal.reason;
  if (!(error instanceof SockpoolError)) return error;
  const failure = new TypeError(message, { cause: error });
  const { name: _name, ...fields } = error;
  return Object.assign(failure, fields);
}

/** One hop's options: the request's own, with the hop's method, headers and body, redirects not followed (the
 *  caller follows them), and what is left of its time (`timeoutMs` covers the whole chain). */
function hopOptions(options: RequestOptions, hop: Hop, deadline: number, totalMs: number): InternalOptions {
  return {
    ...options,
    method: hop.method,
    headers: hop.headers,
    body: hop.body,
    redirect: 'manual',
    timeoutMs: timeLeft(deadline, totalMs, hop.method, hop.url),
    [CONTINUING]: true,
  };
}

/** What is left (whole ms, rounded up) of a deadline (performance.now() ms) that `totalMs` set for a request made of
 *  several (redirects, fetch()'s tries); SOCKPOOL_ERR_TIMEOUT when nothing is. */
function timeLeft(deadline: number, totalMs: number, method: string, url: string): number {
  const left = deadline - performance.now();
  if (left <= 0) {
    throw new SockpoolError(ErrorCodes.TIMEOUT, `${method} ${url}: timed out after ${totalMs} ms`, {
      timeoutMs: totalMs,
    });
  }
  return Math.ceil(left);
}

/** A response that has no body to read (as fetch() sees it). */
function hasNullBody(status: number, method: string): boolean {
  return method === 'HEAD' || [101, 204, 205, 304].includes(status);
}

/**
 * A streamed response as a standard Response. Throws SOCKPOOL_ERR_TRANSFER (before anything reads the body) for a
 * header that Headers refuses and curl passed on (a name with a space in it, a NUL in a value): Node's fetch fails
 * such a response ('fetch failed', its HTTP parser's error the cause) rather than dropping the header.
 */
function fetchResponse(response: SockpoolStreamResponse, method: string): Response {
  let headers: Headers;
  try {
    headers = new Headers(response.headers);
  } catch (error) {
    throw new SockpoolError(
      ErrorCodes.TRANSFER,
      `${method} ${response.url}: the response has a header that is not valid HTTP: ${(error as Error).message}`,
      {},
      { cause: error },
    );
  }
  const nullBody = hasNullBody(response.status, method);
  if (nullBody) {
    // Let the (empty) transfer finish normally, so that curl keeps its connection.
    response.body.pipeTo(new WritableStream()).catch(() => {});
  }
  // The Response constructor takes only 200-599 and refuses a reason phrase with control characters; Node's fetch
  // passes on whatever the origin said (LinkedIn answers crawlers 999): such a status is set on the object below.
  const { status } = response;
  const statusText = REASON_PHRASE.test(response.statusText ?? '') ? (response.statusText ?? '') : '';
  const result = new Response(nullBody ? null : response.body, {
    status: status >= 200 && status <= 599 ? status : 599,
    statusText,
    headers,
  });
  // (A Response's url has no fragment, as the Fetch standard serializes it: curl's URL is the request's, with it.)
  const hash = response.url.indexOf('#');
  const url = hash < 0 ? response.url : response.url.slice(0, hash);
  return fetchFields(result, { url, redirected: response.redirected === true, status });
}

/** A status line's reason phrase as the Response constructor takes it (RFC 9110: HTAB, SP, VCHAR, obs-text). */
const REASON_PHRASE = /^[\t\x20-\x7e\x80-\xff]*$/;

/** What fetch() knows of a response that a Response cannot be constructed with (`url`, `redirected`, a status
 *  outside 200-599), set on the object; its clone() gets them too (Response.prototype.clone would drop them). */
function fetchFields(result: Response, fields: { url: string; redirected: boolean; status: number }): Response {
  Object.defineProperty(result, 'url', { value: fields.url });
  if (fields.redirected) Object.defineProperty(result, 'redirected', { value: true });
  if (fields.status !== result.status) Object.defineProperty(result, 'status', { value: fields.status });
  Object.defineProperty(result, 'clone', { value: () => fetchFields(Response.prototype.clone.call(result), fields) });
  return result;
}

/** A buffered result becomes the response in place (it is this request's own object). */
function response(result: TransferResult & SockpoolResponse, queued: number): SockpoolResponse {
  const body: Uint8Array = result.body;
  // (A body that crossed from a worker thread arrives as a plain Uint8Array over the moved memory.)
  if (!Buffer.isBuffer(body)) result.body = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  result.timings.queueMs = queueMs(queued, result.timings);
  return result;
}

function queueMs(queued: number, timings: { totalMs: number; acquireMs: number }): number {
  return Math.max(0, performance.now() - queued - timings.totalMs - timings.acquireMs);
}

/** The `announce` option with its defaults; undefined when off. */
function validateAnnounce(announce: SockpoolClientOptions['announce']): AnnounceOptions | undefined {
  if (announce === false) return undefined;
  if (announce !== undefined && (typeof announce !== 'object' || announce === null)) {
    throw invalid('announce must be false or { origins?, socketsPerOrigin? }');
  }
  const origins = announce?.origins ?? 64;
  // Requests that wait behind others to the same origin mostly reuse those connections (keep-alive), so a few
  // sockets per origin cover it; more mostly go unused and cost the daemon and the origin a connect each.
  const socketsPerOrigin = announce?.socketsPerOrigin ?? 4;
  if (!Number.isInteger(origins) || origins < 1) throw invalid('announce.origins must be a positive integer');
  if (!Number.isInteger(socketsPerOrigin) || socketsPerOrigin < 1 || socketsPerOrigin > MAX_PREWARM_COUNT) {
    throw invalid(`announce.socketsPerOrigin must be an integer from 1 to ${MAX_PREWARM_COUNT}`);
  }
  return { origins, socketsPerOrigin };
}

/** A proxy's name as the daemon's configuration spells it; a URL or anything else is a typed error. */
function validateProxyName(proxy: unknown): string {
  if (typeof proxy !== 'string' || !PROXY_NAME.test(proxy)) {
    throw invalid(
      `proxy must be the name of a proxy in the daemon's configuration (proxies), such as "corp"; ` +
        `got ${JSON.stringify(proxy)} (a client cannot choose a proxy's address)`,
    );
  }
  return proxy;
}
