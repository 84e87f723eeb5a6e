// One libcurl Multi per worker thread, running many transfers at once over sockets handed in by the daemon.
// curl keeps its connection cache (keep-alive, HTTP/2 multiplexing) in the Multi across transfers.
//
// Easy handles are created once, with their callbacks set for good, and reused from a free list. curl remembers,
// in every connection it keeps, the CLOSESOCKETFUNCTION (and its data pointer) of the handle that opened it; the
// patched node-libcurl counts references to that data, so a connection may outlive its handle (the callback then
// runs with `this` undefined): a handle the full free list has no room for is closed (#keep), as is one resting
// beyond MAX_RESTING_HANDLES (#release). close() closes the Multi first (its connections go through
// CLOSESOCKETFUNCTION), then the handles. The callbacks act on the handle's current transfer (`HandleState.current`),
// which each transfer sets and clears.
//
// A transfer's body goes to a ResponseSink (whole, or streamed to the caller with backpressure: WRITEFUNCTION
// answers CURL_WRITEFUNC_PAUSE while the sink is full; with `decompress`, through a DecodingSink: curl decodes
// nothing, response-decoder.ts says why) and its request body comes from an UploadSource (READFUNCTION
// answers CURL_READFUNC_PAUSE while a streamed body has nothing buffered); Easy.pause resumes either direction.
// A CancelSignal (cancellation.ts) cancels a transfer wherever it is: waiting for a socket (the acquire is dropped,
// a late lease goes back to the daemon) or inside curl (the handle leaves the Multi; curl closes a connection left
// mid-response through CLOSESOCKETFUNCTION). The signal's reason is the error the transfer fails with.

import { Buffer } from 'node:buffer';
import {
  CURL_SOCKET_BAD,
  CurlCode,
  CurlHttpVersion,
  CurlPause,
  CurlPreReqFunc,
  CurlReadFunc,
  CurlSockOpt,
  CurlWriteFunc,
  Easy,
  Multi,
} from 'node-libcurl';
import { ErrorCodes, type PlainError, SockpoolError, toPlainError } from '../shared/errors.js';
import { originKey } from '../shared/origin.js';
import type { LeaseTls } from '../shared/protocol.js';
import { RecentMap } from '../shared/recent-map.js';
import { Cancellation, type CancelSignal } from './cancellation.js';
import { H2StallWatch, type StallWatched } from './h2-stall-watch.js';
import type { RateTokens } from './rate-tokens.js';
import { type DecodeFailure, DecodingSink } from './response-decoder.js';
import { BufferSink, type ResponseSink } from './response-sink.js';
import type { SocketSlot, SocketSupply } from './socket-supply.js';
import type { ResponseHead } from './stream-protocol.js';
import { tlsTrustOf } from './tls-trust.js';
import { BufferSource, READ_PAUSE, type UploadSource } from './upload-source.js';
import { type UrlTarget, urlTarget } from './url-target.js';

export interface TransferRequest {
  url: string;
  method: string;
  headers: Array<[string, string]>;
  /** A request body given whole. */
  body?: Uint8Array | undefined;
  /** The request body arrives in chunks over the request's port (`length` from a content-length header, if any). */
  streamedBody?: { length: number | undefined } | undefined;
  /** Stream the response body over the request's port instead of returning it. */
  streamResponse?: boolean | undefined;
  /** Ask for a compressed body (curl's Accept-Encoding: the codings it knows) and get it decoded (a DecodingSink). */
  decompress?: boolean | undefined;
  /** The most body bytes (after decoding) the response may have: beyond them the transfer stops and fails with
   *  SOCKPOOL_ERR_BODY_TOO_LARGE. None when undefined. */
  maxBodyBytes?: number | undefined;
  /** When the request must be over, in ms since the epoch (performance.timeOrigin + performance.now()). */
  deadline: number;
  /** The timeout the deadline came from (for error messages). */
  timeoutMs: number;
}

/** What is the same for every request of a client: the engine gets it once (a worker thread in its workerData),
 *  so that each request (cloned to a worker thread) carries only its own fields. */
export interface ClientPolicy {
  /** Time allowed for the daemon to hand over a socket. */
  acquireTimeoutMs: number;
  caFile?: string | undefined;
  /** Skip TLS verification (explicit opt-out). */
  insecure?: boolean | undefined;
  /** With no daemon, let curl connect by itself instead of failing. */
  directFallback?: boolean | undefined;
  /** The daemon's proxy, by name: lent sockets are CONNECT tunnels through it, curl speaks to the origin over them. */
  proxy?: string | undefined;
  /** Run a request whose handed connection died once more (default true), for these methods (default idempotent). */
  retryDeadConnection?: boolean | undefined;
  retryMethods?: string[] | undefined;
}

export interface TransferTimings {
  acquireMs: number;
  connectMs: number;
  tlsMs: number;
  ttfbMs: number;
  totalMs: number;
  /** The time spent waiting for tokens of the origin's rate (requestsPerSecond), every attempt's (acquireMs is the
   *  last attempt's): part of acquireMs for a transfer run once; 0 without a rate. */
  tokenWaitMs: number;
  /** The time the acquires waited while the origin was at its cap (maxPerOrigin, a fleet slot), every attempt's, as
   *  tokenWaitMs. */
  capWaitMs: number;
  /** The time the request waited in the client's queue: the client's to say (SockpoolTimings); 0 until then. */
  queueMs?: number;
}

/** A finished transfer: the final response's head, with the whole transfer's timings, and its body. */
export interface TransferResult extends ResponseHead {
  /** The whole body (empty when it was streamed). */
  body: Uint8Array;
}

/** How a relayed https response got there: the daemon's handshake's TLS version and ALPN protocol. */
export interface RelayedTls {
  version: string;
  alpn: string;
  by: 'daemon';
}

export type TransferOutcome = { ok: true; result: TransferResult } | { ok: false; error: PlainError };

/** Who gets a transfer's outcome, and how many connections to its origin the thread's curl holds idle as it ends
 *  (SocketSupply.idleConnections: what a thread's lane tells the caller, ../client/thread-lanes.ts): a function, or
 *  an object whose transferEnded does (one that exists per request anyway, such as the runtime's RequestRun: no
 *  closure more per request). */
export type TransferDone = OutcomeCallback | { transferEnded: OutcomeCallback };
export type OutcomeCallback = (outcome: TransferOutcome, idleToOrigin: number) => void;

function settle(done: TransferDone, outcome: TransferOutcome, idleToOrigin: number): void {
  if (typeof done === 'function') done(outcome, idleToOrigin);
  else done.transferEnded(outcome, idleToOrigin);
}

/** Where one transfer's bodies go and come from, and what cancels it. */
export interface TransferIO {
  sink: ResponseSink;
  source: UploadSource | undefined;
  /** Aborting fails the transfer with `signal.reason` (a SockpoolError: ABORTED or TIMEOUT). */
  signal: CancelSignal;
}

/** One request's way through the engine: its attempts (a retry is another), and where its outcome goes. */
interface Transfer {
  request: TransferRequest;
  io: TransferIO;
  /** The request's URL, parsed once (see url-target.ts). */
  target: UrlTarget;
  /** Its origin's key (with the client's proxy, if any). */
  key: string;
  /** Attempts made before this one. */
  attempt: number;
  /** Ask the daemon for a socket whatever the prediction says (the last attempt was starved or its connection died). */
  forceSocket: boolean;
  /** An attempt waited for another transfer's new HTTP/2 connection (socket-supply.ts, `join`) and was starved all the
   *  same, not for want of room: later ones do not wait. */
  joined: boolean;
  /** The last attempt joined a connection others shared (socket-supply.ts `shared`): the origin multiplexes, this
   *  one may join another although its first response has not said so yet. */
  rejoin: boolean;
  /** Attempts run again so, not counted in `attempt` (at most MAX_REJOINS). */
  rejoins: number;
  retriedDead: boolean;
  /** Time its attempts waited for tokens of a rate-limited origin (rate-tokens.ts), in all. */
  tokenWaitMs: number;
  /** Time its attempts' acquires waited at the origin's cap (the leases' capWaitMs), in all. */
  capWaitMs: number;
  /** The current attempt's part of tokenWaitMs. */
  attemptTokenWaitMs: number;
  /** The current attempt took a token of its rate-limited origin here: when it expires (rate-tokens.ts; given back
   *  when the attempt's request never went out). */
  token: number | undefined;
  done: TransferDone;
}

/** One attempt of a transfer on a handle. */
interface Attempt {
  seq: number;
  transfer: Transfer;
  request: TransferRequest;
  io: TransferIO;
  slot: SocketSlot | undefined;
  mode: 'leased' | 'direct';
  /** The request's URL, parsed once (see url-target.ts). */
  target: UrlTarget;
  originKey: string;
  secure: boolean;
  /** The connection is a warm TLS session the daemon relays: curl speaks plaintext HTTP over it. */
  relay: LeaseTls | undefined;
  acquireMs: number;
  tokenWaitMs: number;
  capWaitMs: number;
  /** The final response's head went to the sink. */
  headSent: boolean;
  /** The reason phrase of the last status line HEADERFUNCTION saw ('' over HTTP/2, which has none); curl has no
   *  getinfo for it, and fetch() gives it as statusText. Only transfers with a HEADERFUNCTION (see #configure). */
  statusText: string | undefined;
  /** CurlPause bits in force. */
  pause: number;
  /** curl has it (curl_multi_add_handle returned): see #unsent. */
  added: boolean;
  /** Relayed HTTP/2 transfers that were paused once: watched for curl 7.88's lost WINDOW_UPDATE (h2-stall-watch.ts). */
  stallWatch: StallWatched | undefined;
  /** Body bytes curl wrote, and what the request allows (Infinity: no limit, or a DecodingSink counts them decoded). */
  bodyBytes: number;
  maxBodyBytes: number;
  /** The body went past maxBodyBytes: WRITEFUNCTION stopped the transfer (curl's CURLE_WRITE_ERROR). */
  tooLarge: boolean;
  /** The request may go out once more on a new connection (the retry policy allows it, and it has not yet). */
  mayResend: boolean;
  /** curl asked for a new connection after it had sent the request: its own retry (see openSocket). */
  resent: boolean;
  /** nghttp2 refused to send the request's header block (its bound, see h2HeaderBlockOver): found in openSocket. */
  headerBlock: number | undefined;
}

interface HandleState {
  easy: Easy;
  current: Attempt | undefined;
  /** Ends the current attempt (`finishAttempt` while one runs in curl, else undefined): taken (and cleared) by whoever
   *  ends it first. */
  finish: ((code: CurlCode, error: Error | undefined, abortReason?: unknown) => void) | undefined;
  /** The handle's `finish`, made once with the handle (not a closure per attempt): it ends `current`. */
  finishAttempt: (code: CurlCode, error: Error | undefined, abortReason?: unknown) => void;
  /** Listens on the current attempt's signal (made once with the handle, as finishAttempt): cancels the attempt. */
  onAbort: () => void;
  /** The plain option values last set on this handle: setOpt is skipped when a transfer wants the same again. */
  options: Map<string, PlainOption | ((data: Buffer) => number) | (() => number)>;
  /** The method and body length (null: none, -1: unknown) the request-method options were last set for. */
  method: string | undefined;
  bodyLength: number | null | undefined;
  /** HEADERFUNCTION, for transfers that need the head as soon as it is complete. */
  onHeader: (data: Buffer) => number;
  /** OPENSOCKETFUNCTION: the current attempt's leased fd, once (ownership passes to curl), else CURL_SOCKET_BAD. */
  openSocket: () => number;
  /** PREREQFUNCTION, for a transfer of a group sharing a new connection (socket-supply.ts): it got a connection
   *  (`prerequest`). */
  onPrereq: () => number;
  /**
   * When a handle taken out of the Multi before curl finished its transfer (aborted, a deadline, a body that failed
   * to decode, an error lifting a pause) may carry a transfer again (performance.now()); 0 when it may now. curl
   * 7.88 goes on handing bytes of an HTTP/2 stream removed mid-body to the handle that carried it (frames already on
   * their way, or read and not yet processed, before its RST_STREAM takes effect), and a handle reused at once gave
   * them to its next response: 2,469,318 bytes for a body of 2,272,746 (test/client-body-limit-h2). curl_easy_reset
   * does not stop it (the stream still points at the handle), a handle not reused does: so such a handle rests
   * (not after a transfer asked to speak HTTP/1.1: see #takeOut).
   */
  restUntil: number;
  /** Whether the handle collects the body (Easy.collectBody) rather than giving it to WRITEFUNCTION. */
  collecting: boolean;
}

type PlainOption = string | number | boolean | null;

/** curl errors that mean the connection we handed over was dead (reset, closed before any response). */
const DEAD_CONNECTION_CODES = new Set<number>([
  CurlCode.CURLE_SEND_ERROR,
  CurlCode.CURLE_RECV_ERROR,
  CurlCode.CURLE_GOT_NOTHING,
  CurlCode.CURLE_SSL_CONNECT_ERROR,
  // curl found its cached connection dead and could not rewind the body for its own retry
  CurlCode.CURLE_SEND_FAIL_REWIND,
]);
/** CURLINFO_HTTP_VERSION's values (CURL_HTTP_VERSION_*) as the versions responses report. */
const HTTP_VERSIONS: Record<number, string> = { 1: '1.0', 2: '1.1', 3: '2', 30: '3' };
const HTTP_1_0 = 1;
const HTTP_1_1 = 2;
/** The body of a result whose body was streamed (never transferred: task.ts moves non-empty bodies only). */
const EMPTY_BODY = new Uint8Array(0);
/** HTTPHEADER of a request without headers of its own. */
const NO_HEADERS: string[] = [];
const IDEMPOTENT_METHODS = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE', 'TRACE']);
const MAX_FREE_HANDLES = 256;
/** Times a transfer starved on a full HTTP/2 connection it joined joins another (socket-supply.ts, the header), not
 *  counted as attempts. Groups are as large as a connection carried, so once is the rule; beyond them it runs again
 *  as a starved transfer does (its own socket). */
const MAX_REJOINS = 3;
/** Handles resting at once (HandleState.restUntil): beyond them the one that has rested longest is closed (#release).
 *  Unbounded, 1,000 HTTP/2 streams cancelled a second kept about 10,000 handles (some 460 MB) alive until they woke. */
const MAX_RESTING_HANDLES = 256;
/** How long a handle taken out of the Multi mid-transfer rests before it carries another (HandleState.restUntil):
 *  long past the round trip its stream's RST_STREAM takes. */
const HANDLE_REST_MS = 10_000;
/** Origins whose last address (and relayed session) is remembered (a crawler meets many origins): the last half
 *  of them at least (RecentMaps, set per lease: a Map deleting and re-adding per lease kept every lease's objects
 *  past the young-generation GCs, ../shared/recent-map.ts). */
const MAX_PINNED = 10_000;
const CURL_SEEKFUNC_OK = 0;
const CURL_SEEKFUNC_CANTSEEK = 2;

const TIME_ORIGIN = performance.timeOrigin;

/** Now, in ms since the epoch, comparable across threads. */
export function epochNow(): number {
  return TIME_ORIGIN + performance.now();
}

function bodyTooLargeError(request: TransferRequest): SockpoolError {
  return new SockpoolError(
    ErrorCodes.BODY_TOO_LARGE,
    `${request.method} ${request.url}: the response body is larger than maxBodyBytes (${request.maxBodyBytes} bytes)`,
    { maxBodyBytes: request.maxBodyBytes ?? 0 },
  );
}

export function timeoutError(request: Pick<TransferRequest, 'method' | 'url' | 'timeoutMs'>): SockpoolError {
  return new SockpoolError(
    ErrorCodes.TIMEOUT,
    `${request.method} ${request.url}: timed out after ${request.timeoutMs} ms`,
    {
      timeoutMs: request.timeoutMs,
    },
  );
}

export class CurlEngine {
  #multi = new Multi();
  #supply: SocketSupply;
  #policy: ClientPolicy;
  #states = new Map<Easy, HandleState>();
  #free: HandleState[] = [];
  /** Handles resting after a transfer taken out mid-way (HandleState.restUntil), oldest first. */
  #resting: HandleState[] = [];
  /** Last address the daemon connected each origin to, as curl's RESOLVE entry (host:port:address): curl's DNS
   *  cache is pinned to it. */
  #pinned = new RecentMap<string, string>(MAX_PINNED / 2);
  /** https origins whose last lease was a relayed warm TLS session: curl's cached connection to them is plaintext
   *  (an http:// URL), so a transfer without a lease of its own asks curl for that one. null: the last lease was
   *  not relayed (a RecentMap never deletes, as #pinned). */
  #relayed = new RecentMap<string, LeaseTls | null>(MAX_PINNED / 2);
  /** What this client verifies https against, for the daemon (tls-trust.ts); undefined: TCP leases only. */
  #tlsTrust: string | undefined;
  #seq = 0;
  /** responseHead's numbers (status, version, timings), read right after each call. */
  #headNumbers = new Float64Array(6);
  /**
   * Where a collected body that fits is copied (takeBody) in the caller's thread, to be copied on into a Buffer from
   * Node's pool: cheaper than a Buffer the addon makes for it. Only read in the call that filled it. Undefined where
   * bodies move to another thread, which needs each to own exactly its memory (response-sink.ts).
   */
  readonly #bodyScratch: Uint8Array | undefined;
  #closed = false;
  /** Rate-limited origins: a token per request before it goes out (rate-tokens.ts). */
  #rateTokens: RateTokens | undefined;
  #stallWatch = new H2StallWatch();
  /** Transfers curl finished, to complete in the next immediate (see the constructor): each as its finish
   *  function, curl's code and error, flat (no closure per transfer), in the first #completedCount entries (the
   *  array is reused: see #completeFinished). */
  #completed: Array<HandleState['finish'] | CurlCode | Error | undefined> = [];
  #completedCount = 0;
  /** The array #completed was, emptied, for the next batch (undefined while a batch is being finished): two arrays
   *  taking turns instead of one per batch. */
  #completedSpare: Array<HandleState['finish'] | CurlCode | Error | undefined> | undefined = [];
  /** #completeFinished as the immediate's callback, made once. */
  readonly #completeSoon = () => this.#completeFinished();
  /** Transfers started and not finished (their handle's `finish` set): whether curl may still call into this thread's
   *  JavaScript for another transfer in this turn (see the constructor). */
  #running = 0;
  /** See addsDeferred. */
  #addsDeferred = 0;

  /** `maxConnects`: idle connections curl keeps (its default, 4 × the transfers running at that moment, would close
   *  keep-alive connections whenever the load dips). */
  constructor(
    supply: SocketSupply,
    policy: ClientPolicy,
    options: {
      maxConnects?: number;
      rateTokens?: RateTokens;
      /** The results go to a caller in this thread, never moved to another: their bodies may be pooled slices. */
      callerThread?: boolean;
    } = {},
  ) {
    this.#supply = supply;
    if (options.callerThread) this.#bodyScratch = new Uint8Array(16 * 1024);
    this.#rateTokens = options.rateTokens;
    this.#policy = policy;
    this.#tlsTrust = tlsTrustOf(policy);
    this.#multi.setOpt('MAXCONNECTS', options.maxConnects ?? 256);
    // node-libcurl calls this after curl's socket action returned, without a callback scope (Function::Call, not
    // MakeCallback), and what a finish settles continues at the next microtask checkpoint. The handle leaves the
    // Multi at once; when to finish the transfer depends on what else runs:
    // - The only transfer running (a sequential caller): right here. Its continuations run in the same turn of the
    //   loop: from the poll phase, Node drains the microtasks in its check phase (in the scope it opens for native
    //   immediates); from curl's timer (libuv's timer phase, before the poll phase that may wait for seconds) our
    //   patch opens a callback scope that drains them when curl returns (test/curl-socket-callbacks "what onMessage
    //   settles from %s continues in the same turn of the loop"). An immediate later cost a keep-alive request
    //   about 5 µs between its response and the next one.
    // - Others still running: in the next immediate, all the transfers curl finished in the turn together. Finished
    //   here, their continuations would run wherever the next checkpoint comes, and with other sockets ready in the
    //   same poll phase that is at the end of one of curl's callbacks for another transfer (a MakeCallback), inside
    //   curl: the caller's next request could not be added there (CURLM_RECURSIVE_API_CALL, retried an immediate
    //   later), and with 16 in flight the client fell to three quarters of node-libcurl's rate.
    this.#multi.onMessage((error, easy, code) => {
      const state = this.#states.get(easy);
      if (!state?.finish) return;
      const finish = state.finish;
      state.finish = undefined;
      this.#running--;
      this.#multi.removeHandle(easy);
      if (this.#running === 0 && this.#completedCount === 0) {
        try {
          finish(code, error ?? undefined);
        } catch (thrown) {
          // node-libcurl swallows what this callback throws: a fault here must still be seen, as uncaught.
          queueMicrotask(() => {
            throw thrown;
          });
        }
        return;
      }
      const completed = this.#completed;
      const count = this.#completedCount;
      completed[count] = finish;
      completed[count + 1] = code;
      completed[count + 2] = error ?? undefined;
      this.#completedCount = count + 3;
      if (count === 0) setImmediate(this.#completeSoon);
    });
  }

  /** curl handles alive (each until the engine closes): for tests. */
  get handles(): number {
    return this.#states.size;
  }

  /** curl handles resting after a transfer taken out mid-way (HandleState.restUntil), among `handles`: for tests. */
  get resting(): number {
    return this.#resting.length;
  }

  /** Transfers that were started inside one of curl's callbacks, and added to curl a turn later: for tests. */
  get addsDeferred(): number {
    return this.#addsDeferred;
  }

  /** Finishes the transfers curl finished (in an immediate, or at close()). */
  #completeFinished(): void {
    const completed = this.#completed;
    const count = this.#completedCount;
    if (count === 0) return;
    // (A finish may end in close(), which comes here again: that call takes another array, this one is left alone.)
    this.#completed = this.#completedSpare ?? [];
    this.#completedCount = 0;
    this.#completedSpare = undefined;
    for (let i = 0; i < count; i += 3) {
      const finish = completed[i] as NonNullable<HandleState['finish']>;
      finish(completed[i + 1] as CurlCode, completed[i + 2] as Error | undefined);
    }
    // Emptied in place, its storage kept (the functions and errors it held let go).
    completed.fill(undefined, 0, count);
    this.#completedSpare = completed;
  }

  /** Runs a transfer to the end (retrying as the rules allow); never throws. */
  run(request: TransferRequest, io?: Partial<TransferIO>): Promise<TransferOutcome> {
    return new Promise((resolve) => this.start(request, io, resolve));
  }

  /**
   * run() without a promise of its own: `done` gets the outcome, once (maybe before start returns, for a request
   * that cannot start). A keep-alive request thus costs one promise in all, made by whoever waits for it.
   */
  start(request: TransferRequest, io: Partial<TransferIO> | undefined, done: TransferDone): void {
    let sink = io?.sink ?? new BufferSink(this.#bodyScratch === undefined);
    if (request.decompress) sink = new DecodingSink(sink, request.maxBodyBytes);
    let source = io?.source;
    if (!source && request.body !== undefined) source = new BufferSource(request.body);
    let target: UrlTarget;
    try {
      target = urlTarget(request.url);
    } catch (error) {
      settle(done, { ok: false, error: toPlainError(error) }, 0);
      return;
    }
    const proxy = this.#policy.proxy;
    const transfer: Transfer = {
      request,
      io: { sink, source, signal: io?.signal ?? new Cancellation() },
      target,
      key: proxy ? originKey({ ...target.origin, proxy }) : target.key,
      attempt: 0,
      forceSocket: false,
      joined: false,
      rejoin: false,
      rejoins: 0,
      retriedDead: false,
      tokenWaitMs: 0,
      capWaitMs: 0,
      attemptTokenWaitMs: 0,
      token: undefined,
      done,
    };
    this.#attempt(transfer);
  }

  /** Starts the transfer's next attempt: a token (rate-limited origins), a socket when one is needed, then curl. */
  #attempt(transfer: Transfer): void {
    const { request, io } = transfer;
    if (io.signal.aborted) {
      this.#fail(transfer, io.signal.reason);
      return;
    }
    const started = performance.now();
    transfer.attemptTokenWaitMs = 0;
    transfer.token = undefined;
    const remaining = request.deadline - (TIME_ORIGIN + started);
    if (remaining <= 0) {
      this.#fail(transfer, timeoutError(request));
      return;
    }
    // An origin known to speak HTTP/2: a header block nghttp2 will not send fails now, before a token or a socket is
    // taken for it (see h2HeaderBlockOver). Sent, it hung until its deadline on a reused connection.
    if (transfer.target.secure && this.#supply.multiplexes(transfer.key) === true) {
      const bound = h2HeaderBlockOver(request, transfer.target, io.source);
      if (bound !== undefined) {
        this.#fail(transfer, headerBlockError(request, bound));
        return;
      }
    }
    // Each attempt is a request the origin sees: each takes a token of a rate-limited origin.
    let taking: Promise<void> | undefined;
    try {
      taking = this.#takeToken(transfer, remaining);
    } catch (error) {
      this.#prepareFailed(transfer, error, started, remaining);
      return;
    }
    if (taking) {
      taking.then(
        () => this.#prepare(transfer, started, remaining),
        (error: unknown) => this.#prepareFailed(transfer, error, started, remaining),
      );
      return;
    }
    this.#prepare(transfer, started, remaining);
  }

  /**
   * The transfer's token if its origin is rate-limited (rate-tokens.ts): taken at once (undefined: go on now), or a
   * promise that takes it and counts the wait in the transfer's token waits (go on once it resolves). Throws, or
   * rejects, when none comes in `timeoutMs` (refused, cancelled).
   */
  #takeToken(transfer: Transfer, timeoutMs: number): Promise<void> | undefined {
    const rateTokens = this.#rateTokens;
    if (!rateTokens) return undefined;
    const { host, port } = transfer.target.origin;
    const token = rateTokens.take(host, port, timeoutMs, transfer.io.signal);
    if (!(token instanceof Promise)) {
      transfer.token = token;
      return undefined;
    }
    const askedAt = performance.now();
    return token.then((expiresAt) => {
      transfer.token = expiresAt;
      const waitMs = performance.now() - askedAt;
      transfer.attemptTokenWaitMs += waitMs;
      transfer.tokenWaitMs += waitMs;
    });
  }

  #prepare(transfer: Transfer, started: number, remaining: number): void {
    const { io, target } = transfer;
    const policy = this.#policy;
    const { secure, origin } = target;
    let preparing: SocketSlot | Promise<SocketSlot>;
    try {
      preparing = this.#supply.prepare(origin, transfer.key, {
        proxy: policy.proxy,
        secure,
        timeoutMs: Math.min(policy.acquireTimeoutMs, remaining),
        force: transfer.forceSocket,
        join: !transfer.joined,
        rejoin: transfer.rejoin,
        signal: io.signal,
        tlsTrust: secure ? this.#tlsTrust : undefined,
        tokenTaken: transfer.token !== undefined,
      });
    } catch (error) {
      this.#prepareFailed(transfer, error, started, remaining);
      return;
    }
    if (!(preparing instanceof Promise)) {
      this.#prepared(transfer, preparing, started, remaining, false);
      return;
    }
    preparing.then(
      (slot) => this.#prepared(transfer, slot, started, remaining, true),
      (error: unknown) => this.#prepareFailed(transfer, error, started, remaining),
    );
  }

  /**
   * The attempt has its slot. A transfer that joined another's socket without a token (its origin's rate was not
   * known here when it started: the socket's lease, which the daemon charged, is what told us) takes its token now,
   * before it goes out: it sends a request of its own over that connection, and a burst of them to an origin not
   * seen before went out all at once whatever the origin's rate.
   */
  #prepared(transfer: Transfer, slot: SocketSlot, started: number, remaining: number, waited: boolean): void {
    if (!slot.joined || slot.lease || transfer.token !== undefined) {
      this.#perform(transfer, slot, performance.now() - started, waited);
      return;
    }
    const tokenFailed = (error: unknown): void => {
      // (The slot holds no socket: finishing it only takes the transfer out of its origin's count.)
      this.#supply.finish(slot);
      this.#prepareFailed(transfer, error, started, remaining);
    };
    let taking: Promise<void> | undefined;
    try {
      taking = this.#takeToken(transfer, transfer.request.deadline - (TIME_ORIGIN + performance.now()));
    } catch (error) {
      tokenFailed(error);
      return;
    }
    if (taking) {
      taking.then(() => this.#perform(transfer, slot, performance.now() - started, true), tokenFailed);
      return;
    }
    this.#perform(transfer, slot, performance.now() - started, waited);
  }

  /** No token or no socket for the attempt: the daemon is down (maybe direct), or the request fails. */
  #prepareFailed(transfer: Transfer, error: unknown, started: number, remaining: number): void {
    const code = (error as { code?: string } | undefined)?.code;
    const policy = this.#policy;
    // Never direct when a proxy is named: that would bypass the proxy the caller asked for.
    if (
      policy.directFallback &&
      !policy.proxy &&
      code === ErrorCodes.DAEMON_UNAVAILABLE &&
      !transfer.io.signal.aborted
    ) {
      this.#perform(transfer, undefined, performance.now() - started);
      return;
    }
    // No request goes out with the attempt's token.
    this.#giveBackToken(transfer);
    // The daemon waited as long as the request's own deadline allowed (not acquireTimeoutMs): the request timed
    // out, whichever of the two timers fired first.
    if (code === ErrorCodes.ACQUIRE_TIMEOUT && remaining < policy.acquireTimeoutMs) {
      this.#fail(transfer, timeoutError(transfer.request));
      return;
    }
    this.#fail(transfer, error);
  }

  /** An attempt ended (`slot`: its socket; none for a direct one): the transfer ends, or runs again. */
  #attemptEnded(transfer: Transfer, slot: SocketSlot | undefined, result: TransferResult | TransferFailure): void {
    // A join that found the shared connection full (starved while others of its group got on: it multiplexes) joins
    // another, in a group no larger than a connection carried; not counted as an attempt (nothing was sent, and each
    // group's connection carries some), up to MAX_REJOINS times.
    const shared = slot !== undefined && this.#supply.shared(slot);
    const rejoin =
      shared && slot.starved && !(result instanceof TransferFailure && result.resent) && transfer.rejoins < MAX_REJOINS;
    transfer.rejoin = false;
    if (slot) {
      this.#supply.finish(slot);
      // A join that could not put the transfer on the shared connection (starved at its first connect: it turned out
      // HTTP/1.1) is not tried again. One whose connection died after the request went out (curl wanted it sent
      // again: `resent`) was no fault of the join: the transfers that lost it together share the next one.
      if (slot.joined && slot.starved && !rejoin && !(result instanceof TransferFailure && result.resent)) {
        transfer.joined = true;
      }
    }
    if (!(result instanceof TransferFailure)) {
      const sink = transfer.io.sink;
      const whole = sink instanceof DecodingSink ? sink.inner : sink;
      if (whole instanceof BufferSink) result.body = whole.body();
      settle(transfer.done, { ok: true, result }, this.#supply.idleConnections(transfer.key));
      return;
    }
    const { io, request } = transfer;
    // Nothing of the request went out (never handed to curl, or curl wrote none of it: starved, cancelled or failed
    // before it was sent): the token it took went nowhere (the next attempt, if any, spends it).
    if (result.unsent) this.#giveBackToken(transfer);
    // A direct attempt (the daemon down) is never retried. Nothing can be retried once cancelled, once the caller
    // saw the response head, or when a streamed request body was already read from.
    if (!slot || result.aborted || io.sink.committed) {
      this.#fail(transfer, result.error);
      return;
    }
    if (rejoin && rewound(io)) {
      transfer.rejoin = true;
      transfer.rejoins++;
      transfer.forceSocket = true;
      this.#attempt(transfer);
      return;
    }
    // curl needed a new connection and we had not prepared one: once more, with a socket. (Not when curl wanted it
    // to send the request again: that is the dead-connection rule's to decide, below.)
    if (slot.starved && !slot.taken && !result.resent && transfer.attempt < 2 && rewound(io)) {
      this.#retry(transfer);
      return;
    }
    // The handed (or cached) connection died under the request: one retry on a fresh socket.
    if (
      !transfer.retriedDead &&
      (result.resent || DEAD_CONNECTION_CODES.has(result.curlCode)) &&
      retryable(this.#policy, request) &&
      rewound(io)
    ) {
      transfer.retriedDead = true;
      // Streams of a shared connection the server refused (beyond its SETTINGS, sent before they came in) or that
      // died with it: the next attempt may join a new one even before the origin's first response said HTTP/2.
      transfer.rejoin = shared;
      this.#retry(transfer);
      return;
    }
    this.#fail(transfer, result.error);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#stallWatch.close();
    // Nothing is left hanging: transfers curl finished are completed now (their handles still open), and the ones
    // still running fail with SOCKPOOL_ERR_CLOSED.
    this.#completeFinished();
    const closing = new SockpoolError(ErrorCodes.CLOSED, 'the client is closing');
    for (const state of this.#states.values()) {
      if (state.finish) this.#takeOut(state, CurlCode.CURLE_ABORTED_BY_CALLBACK, closing);
    }
    // Connections close through CLOSESOCKETFUNCTION now, while every handle still exists.
    this.#multi.close();
    for (const state of this.#states.values()) state.easy.close();
    this.#states.clear();
    this.#free = [];
    this.#resting = [];
  }

  /** The attempt's token (if it took one) was not spent: back to the worker's tokens (rate-tokens.ts giveBack). */
  #giveBackToken(transfer: Transfer): void {
    const expiresAt = transfer.token;
    if (expiresAt === undefined) return;
    transfer.token = undefined;
    const { host, port } = transfer.target.origin;
    this.#rateTokens?.giveBack(host, port, expiresAt);
  }

  #retry(transfer: Transfer): void {
    transfer.forceSocket = true;
    transfer.attempt++;
    this.#attempt(transfer);
  }

  #fail(transfer: Transfer, error: unknown): void {
    // (Its decoders freed now, not when collected.)
    if (transfer.io.sink instanceof DecodingSink) transfer.io.sink.reset();
    settle(transfer.done, { ok: false, error: toPlainError(error) }, this.#supply.idleConnections(transfer.key));
  }

  #handle(): HandleState {
    if (this.#resting.length > 0) this.#wakeRested();
    const reused = this.#free.pop();
    if (reused) return reused;
    const easy = new Easy();
    // Set only while a transfer needs the head before the end (see #configure): curl's blank line ends a head.
    const onHeader = (data: Buffer) => {
      if (data.length <= 2) this.#onHeadEnd(state);
      // A status line ("HTTP/1.1 404 Not Found", "HTTP/2 200"): each header block starts with one.
      else if (data[0] === 0x48 && data[4] === 0x2f && state.current) state.current.statusText = reasonPhrase(data);
      return data.length;
    };
    const state: HandleState = {
      easy,
      current: undefined,
      finish: undefined,
      finishAttempt: (code, error, abortReason) => this.#finishAttempt(state, code, error, abortReason),
      onAbort: () => {
        // (Removed from a signal whenever its attempt ends: only the current attempt's own signal calls this.)
        const attempt = state.current;
        if (!state.finish || !attempt || !attempt.io.signal.aborted) return;
        this.#takeOut(state, CurlCode.CURLE_ABORTED_BY_CALLBACK, attempt.io.signal.reason);
      },
      options: new Map(),
      onHeader,
      openSocket: () => {
        const attempt = state.current;
        const slot = attempt?.slot;
        if (!slot) return CURL_SOCKET_BAD;
        // A request already sent (REQUEST_SIZE counts what this attempt wrote; each attempt starts at 0): curl is
        // retrying it by itself, as it does when a reused connection dies before any response comes (HTTP/1.1
        // keep-alive or every stream of an HTTP/2 connection closed under them) or a stream is refused (GOAWAY,
        // REFUSED_STREAM). The origin may have acted on it: a request the retry policy does not let run again
        // (POST by default) gets no socket and fails as a dead connection; otherwise curl goes on (a socket of the
        // slot's, or none: starved, and #attemptEnded runs it again under the dead-connection rule, once).
        // Found in review: a POST on a reused HTTP/2 connection that closed went out twice, once more per starved
        // retry (test/client-h2-edges.test.ts).
        if (Number(state.easy.getInfo('REQUEST_SIZE').data) > 0) {
          // Not a refusal by the origin: nghttp2 refused to send a header block this large and closed the stream
          // itself (REFUSED_STREAM, "send it again"), nothing written; on a new connection it refuses it again (plain
          // curl tries five and fails with curlCode 56). No socket, and #finishAttempt says what happened: before,
          // it failed as a connect failure (curlCode 7, deadConnection) after a second connection for the resend.
          // (Only an HTTP/2 stream is resent from a connection curl did not reuse; an origin known to speak
          // HTTP/1.x never gets here for its header block.)
          if (attempt.secure && this.#supply.multiplexes(attempt.originKey) !== false) {
            attempt.headerBlock = h2HeaderBlockOver(attempt.request, attempt.target, attempt.io.source);
            if (attempt.headerBlock !== undefined) return CURL_SOCKET_BAD;
          }
          attempt.resent = true;
          if (!attempt.mayResend) return CURL_SOCKET_BAD;
        }
        return this.#supply.open(slot);
      },
      onPrereq: () => {
        const slot = state.current?.slot;
        if (slot) this.#supply.prerequest(slot);
        return CurlPreReqFunc.Ok;
      },
      method: undefined,
      bodyLength: undefined,
      restUntil: 0,
      collecting: false,
    };
    try {
      this.#setUp(state);
    } catch (error) {
      // (Not in #states yet: nothing else would ever close it.)
      easy.close();
      throw error;
    }
    this.#states.set(easy, state);
    return state;
  }

  /** Sets a new handle's callbacks and what is the same for every transfer of this engine; throws what curl
   *  refuses. */
  #setUp(state: HandleState): void {
    const { easy } = state;
    this.#useLeasedSockets(state, true);
    // Every socket curl closes comes here: leased ones end their lease; direct-fallback ones are just closed.
    // (May run with `this` undefined after the handle closed: it uses nothing but the supply.)
    easy.setOpt('CLOSESOCKETFUNCTION', (fd: number) => this.#supply.close(fd));
    easy.setOpt('WRITEFUNCTION', (data: Buffer) => {
      const attempt = state.current;
      // The Buffer is curl's data copied for us: the sink may keep it, or transfer (detach) it to another thread.
      const length = data.length;
      if (!attempt) return length;
      // Counted as curl writes it, decoded: a small compressed body can decode into a large one. Anything but
      // `length` makes curl stop the transfer (and close its connection, which is mid-body).
      if (attempt.bodyBytes + length > attempt.maxBodyBytes) {
        attempt.tooLarge = true;
        return 0;
      }
      if (!attempt.io.sink.write(data)) {
        // curl keeps the chunk and offers it again once resumed: counted only when a sink takes it.
        attempt.pause |= CurlPause.Recv;
        return CurlWriteFunc.Pause;
      }
      attempt.bodyBytes += length;
      if (attempt.stallWatch) attempt.stallWatch.received += length;
      return length;
    });
    easy.setOpt('READFUNCTION', (buffer: Buffer) => {
      const attempt = state.current;
      const source = attempt?.io.source;
      if (!attempt || !source) return 0;
      const count = source.read(buffer);
      if (count === READ_PAUSE) {
        attempt.pause |= CurlPause.Send;
        return CurlReadFunc.Pause;
      }
      return count;
    });
    // curl rewinds the body when it retries on a new connection by itself.
    easy.setOpt('SEEKFUNCTION', (offset: number) =>
      offset === 0 && state.current?.io.source?.rewind() ? CURL_SEEKFUNC_OK : CURL_SEEKFUNC_CANTSEEK,
    );
    easy.setOpt('NOSIGNAL', true);
    // curl never decodes a body (a DecodingSink does, with `decompress`): curl 7.88 decodes the rest of a read into
    // its pause buffer after WRITEFUNCTION paused, up to 64 MiB a transfer (response-decoder.ts), and decodes a
    // compressed Transfer-Encoding ("gzip, chunked") whatever ACCEPT_ENCODING says, which no request asks for
    // (Node's fetch passes it on coded too). Chunked framing is not a decoding: curl still undoes it.
    easy.setOpt('HTTP_CONTENT_DECODING', false);
    // What is the same for every transfer of this engine is set once per handle.
    // node-libcurl defaults CAINFO_BLOB to Node's bundled CAs, and a blob beats CAINFO: clear it so that curl
    // verifies against the CA file given, or else the system store (libcurl's built-in default path).
    easy.setOpt('CAINFO_BLOB', null);
    const policy = this.#policy;
    if (policy.caFile !== undefined) easy.setOpt('CAINFO', policy.caFile);
    easy.setOpt('SSL_VERIFYPEER', policy.insecure ? 0 : 1);
    easy.setOpt('SSL_VERIFYHOST', policy.insecure ? 0 : 2);
    // Never a proxy of curl's own, nor one from the environment (http_proxy and friends): the daemon decides where
    // sockets go, and opens the CONNECT tunnel itself when the client named one of its proxies. '' means no proxy.
    easy.setOpt('PROXY', '');
  }

  /** A header block ended (HEADERFUNCTION's blank line): the final response's head goes to the sink at once. */
  #onHeadEnd(state: HandleState): void {
    const attempt = state.current;
    // Transfers waiting to share this one's connection go on (any header block: the connection is up).
    if (attempt?.slot?.first) this.#supply.responded(attempt.slot);
    if (!attempt || attempt.headSent) return;
    const head: ResponseHead = this.#head(state.easy, attempt, undefined);
    // 1xx blocks (and a proxy's CONNECT reply, whose code is not RESPONSE_CODE) come before the final head.
    if (head.status < 200) return;
    attempt.headSent = true;
    if (attempt.statusText !== undefined) head.statusText = attempt.statusText;
    const sink = attempt.io.sink;
    sink.head(head);
    // Coded bytes are not the body's: the DecodingSink counts the body as it decodes it.
    if (sink instanceof DecodingSink && sink.decoding) attempt.maxBodyBytes = Number.POSITIVE_INFINITY;
  }

  /**
   * The response's head, from one native call (status, version, timings, headers); learns the protocol. `body` (a
   * result's, set later) and the timings' `queueMs` (the client's) are in the object from the start: a property
   * added to an object made without it goes to a store of its own, an allocation more per response.
   */
  #head(easy: Easy, attempt: Attempt, body: Uint8Array | undefined): ResponseHead & { body: Uint8Array | undefined } {
    const numbers = this.#headNumbers;
    // "name\nvalue\n…" in one string (one N-API string, not two per header set one by one into an array).
    const joined = easy.responseHead(numbers);
    const flat = joined === '' ? [] : joined.split('\n');
    const status = numbers[0]!;
    const connectUs = numbers[2]!;
    const appConnectUs = numbers[3]!;
    const reused = attempt.slot !== undefined && !attempt.slot.taken;
    const httpVersion = HTTP_VERSIONS[numbers[1]!] ?? '1.1';
    if (attempt.secure && status >= 200) this.#supply.learnProtocol(attempt.originKey, httpVersion === '2');
    const headers: Array<[string, string]> = new Array(flat.length / 2);
    for (let i = 0; i < flat.length; i += 2) headers[i / 2] = [flat[i]!, flat[i + 1]!];
    return {
      status,
      headers,
      // (Redirects are not followed: the URL is the request's.)
      url: attempt.target.href,
      httpVersion,
      warm: attempt.mode === 'leased' && (reused || attempt.slot?.lease?.warm === true),
      connection: attempt.mode === 'direct' ? 'direct' : reused ? 'reused' : 'leased',
      tls: attempt.relay && { version: attempt.relay.version, alpn: attempt.relay.alpn, by: 'daemon' },
      timings: {
        acquireMs: attempt.acquireMs,
        connectMs: connectUs / 1000,
        tlsMs: appConnectUs > 0 ? (appConnectUs - connectUs) / 1000 : 0,
        ttfbMs: numbers[4]! / 1000,
        totalMs: numbers[5]! / 1000,
        tokenWaitMs: attempt.tokenWaitMs,
        capWaitMs: attempt.capWaitMs,
        queueMs: 0,
      },
      body,
    };
  }

  /** A sink or source has room or data again: lift that direction's pause, if this attempt is still running. */
  #resume(state: HandleState, seq: number, direction: CurlPause): void {
    const attempt = state.current;
    if (!attempt || attempt.seq !== seq || !state.finish || (attempt.pause & direction) === 0) return;
    attempt.pause &= ~direction;
    // (Watched from its start when its relay was known then; else from its first resume, as before.)
    if (direction === CurlPause.Recv && attempt.relay?.alpn === 'h2' && !attempt.stallWatch) {
      this.#watchStall(state, attempt);
    }
    // May call WRITEFUNCTION at once with the data curl held back (which may pause again).
    this.#paused(state, attempt, state.easy.pause(attempt.pause));
  }

  /**
   * Watches a transfer over a relayed HTTP/2 connection for curl 7.88's lost WINDOW_UPDATE (h2-stall-watch.ts), from
   * its start: not only a stream that paused stalls. After a stream of the connection was cancelled mid-body, the
   * next one on it stalled until its deadline in about one run of three (the cancelled stream's unread data held
   * the connection's window); kicked, it goes on (test/client-body-limit-h2, "a stream cancelled mid-body").
   */
  #watchStall(state: HandleState, attempt: Attempt): void {
    attempt.stallWatch = {
      received: 0,
      running: () => state.current === attempt && state.finish !== undefined,
      paused: () => (attempt.pause & CurlPause.Recv) !== 0,
      kick: () => {
        const code = state.easy.pause(attempt.pause | CurlPause.Recv);
        // curl 7.88 answers CURLE_BAD_FUNCTION_ARGUMENT for a transfer with no connection yet (still waiting for
        // its socket): nothing is stalled there, and that is no reason to fail it.
        if (code === CurlCode.CURLE_BAD_FUNCTION_ARGUMENT) return;
        this.#paused(state, attempt, code);
        // May call WRITEFUNCTION, as below.
        if (state.current === attempt) this.#paused(state, attempt, state.easy.pause(attempt.pause));
      },
    };
    this.#stallWatch.watch(attempt.stallWatch);
  }

  /**
   * What curl_easy_pause returned. Lifting a pause runs the callbacks with the data curl held back, and one of them
   * may fail the transfer there (WRITEFUNCTION past maxBodyBytes: CURLE_WRITE_ERROR). curl then returns the error and
   * leaves the transfer as it is, never to be driven again: it ends here, as an abort does, or it would stall until
   * its deadline.
   */
  #paused(state: HandleState, attempt: Attempt, code: CurlCode): void {
    if (code === CurlCode.CURLE_OK || state.current !== attempt || !state.finish) return;
    this.#takeOut(state, code);
  }

  /**
   * Ends the handle's transfer before curl finished it: out of the Multi at once (curl closes a connection left
   * mid-response, through CLOSESOCKETFUNCTION), and the handle rests before it carries another (restUntil) when its
   * transfer may have been a stream of an HTTP/2 connection. Not one asked to speak HTTP/1.1 (http://, a relayed
   * http/1.1 session), nor one whose response came over HTTP/1.x (an https origin that chose it): curl closes an
   * HTTP/1.1 connection left mid-response, so nothing of it can reach the handle again, and a rest would only cost a
   * new handle per cancellation (a timeout against a slow site, a body cancelled after its head).
   */
  #takeOut(state: HandleState, code: CurlCode, abortReason?: unknown): void {
    try {
      this.#multi.removeHandle(state.easy);
    } catch (error) {
      // From a microtask that ran at the end of one of curl's own callbacks (an in-thread request's caller, whose
      // signal cancels at once, awaiting something settled there), where curl refuses the call
      // (CURLM_RECURSIVE_API_CALL): on the next turn, unless the transfer ended meanwhile. (Thrown, it left the
      // handle in the Multi with its finish taken: the transfer never ended, and closing the Multi aborted the
      // process.)
      if (this.#closed || !/within callback/i.test((error as Error).message)) throw error;
      const attempt = state.current;
      setImmediate(() => {
        if (!this.#closed && state.finish && state.current === attempt) this.#takeOut(state, code, abortReason);
      });
      return;
    }
    const finish = state.finish!;
    state.finish = undefined;
    this.#running--;
    if (mayBeStream(state)) state.restUntil = performance.now() + HANDLE_REST_MS;
    finish(code, undefined, abortReason);
  }

  #release(state: HandleState): void {
    state.current = undefined;
    if (state.restUntil !== 0) {
      // Taken out mid-transfer (#takeOut): it rests before it carries another. With MAX_RESTING_HANDLES resting
      // already, the one that has rested longest is closed instead, never to carry another: what the rest keeps from
      // a handle is reuse, and curl keeps no pointer to a handle it took out (7.88's curl_multi_remove_handle sends
      // the stream's RST_STREAM and clears the handle from the stream: later frames of it find none and are
      // dropped), so it is closed as #keep closes one the free list has no room for, and its connections carry on.
      if (this.#resting.length >= MAX_RESTING_HANDLES) this.#wakeRested();
      if (this.#resting.length >= MAX_RESTING_HANDLES) this.#close(this.#resting.shift()!);
      this.#resting.push(state);
      return;
    }
    this.#keep(state);
  }

  /**
   * A handle free to carry another transfer: on the free list, or closed when the list is full. Kept alive unused
   * instead, as it was, each burst of more transfers at once than the list holds (concurrencyPerThread above it, or
   * HTTP/2 streams cancelled faster than their rest frees handles) left its excess alive until the engine closed, and
   * the next burst made as many new ones (about 46 KiB each). The connections it opened stay in curl's cache (see the
   * header).
   */
  #keep(state: HandleState): void {
    if (this.#free.length < MAX_FREE_HANDLES) {
      this.#free.push(state);
      return;
    }
    this.#close(state);
  }

  /** Closes a handle out of the Multi for good; the connections it opened stay in curl's cache (see the header). */
  #close(state: HandleState): void {
    this.#states.delete(state.easy);
    state.easy.close();
  }

  /** Handles whose rest is over go back to the free list (in the order they came: the oldest first). */
  #wakeRested(): void {
    const now = performance.now();
    while (this.#resting.length > 0 && this.#resting[0]!.restUntil <= now) {
      const state = this.#resting.shift()!;
      state.restUntil = 0;
      this.#keep(state);
    }
  }

  #configure(state: HandleState, attempt: Attempt): void {
    const { easy } = state;
    // Options are set per transfer, but most repeat from one to the next on a reused handle: only changes reach
    // curl (setOption, setListOption). Each setOpt is a native call: a keep-alive request makes none.
    const { request, slot, io, target: urlTarget, relay } = attempt;
    // Over a relayed warm TLS session curl speaks plaintext: the http:// form of the URL, the https authority.
    setOption(state, 'URL', relay ? (urlTarget.plainHref ?? request.url) : request.url);
    // The request-method options interact in curl (POST, HTTPGET and NOBODY each undo the others' effect): all
    // of them are set together, whenever the method or the kind of body changes.
    const bodyLength = io.source ? (io.source.length ?? -1) : null;
    if (state.method !== request.method || state.bodyLength !== bodyLength) {
      state.method = request.method;
      state.bodyLength = bodyLength;
      easy.setOpt('CUSTOMREQUEST', request.method);
      easy.setOpt('NOBODY', request.method === 'HEAD');
      if (io.source) {
        easy.setOpt('POST', true);
        // -1: length unknown, sent chunked over HTTP/1.1
        easy.setOpt('POSTFIELDSIZE_LARGE', io.source.length ?? -1);
      } else {
        easy.setOpt('POST', false);
        easy.setOpt('HTTPGET', request.method === 'GET');
      }
    }
    if (request.headers.length === 0 && !io.source && !relay) setListOption(state, 'HTTPHEADER', '', NO_HEADERS);
    else {
      // curl reads "Name:" with nothing after it as "do not send Name" (and drops its own Accept or Host so):
      // an empty value goes as "Name;", curl's way of sending "Name:" empty.
      const headers = request.headers.map(([name, value]) =>
        value === '' || value.trim() === '' ? `${name};` : `${name}: ${value}`,
      );
      if (relay) headers.unshift(...relayHeaders(request, urlTarget, relay));
      if (io.source) {
        // No "Expect: 100-continue" round trip before a large or streamed body, unless the caller asks for one; and
        // no content-type the caller did not give (curl sends a form type with any body it POSTs, Node's fetch
        // none for bytes or a stream).
        let expect = false;
        let contentType = false;
        for (const [name] of request.headers) {
          const lower = name.toLowerCase();
          if (lower === 'expect') expect = true;
          else if (lower === 'content-type') contentType = true;
        }
        if (!expect) headers.push('Expect:');
        if (!contentType) headers.push('Content-Type:');
      }
      setListOption(state, 'HTTPHEADER', headers.join('\n'), () => headers);
    }
    // '': curl sends every coding it knows (gzip, deflate, br, zstd here); null: no Accept-Encoding. It decodes
    // none of them (HTTP_CONTENT_DECODING off, see #handle): a DecodingSink does.
    setOption(state, 'ACCEPT_ENCODING', request.decompress ? '' : null);
    // A backstop only: the runtime's own timer at the deadline cancels the transfer first (even while it is
    // paused). The whole timeout, not what is left of it, so that it repeats from one request to the next.
    setOption(state, 'TIMEOUT_MS', Math.max(1, Math.ceil(request.timeoutMs)));
    // The head is taken from curl when the transfer ends (one native call, no callback per header line), unless
    // it is needed before: a streamed response, the first response of an https origin (HTTP/2 or not decides
    // how the next transfers to it get their sockets; see socket-supply.ts), or one over a connection others wait
    // to share (`responded`).
    // With decompress, the head's codings choose the decoders before the body comes.
    const headEarly =
      request.streamResponse === true ||
      request.decompress === true ||
      slot?.first !== undefined ||
      (attempt.secure && !this.#supply.knowsProtocol(attempt.originKey));
    setOption(state, 'HEADERFUNCTION', headEarly ? state.onHeader : null);
    // A transfer of a group sharing a new connection says when it got one (socket-supply.ts `prerequest`); no
    // callback for the others.
    setOption(state, 'PREREQFUNCTION', slot?.first || slot?.joined ? state.onPrereq : null);
    // A group's first opens a connection with the socket it brought, not one of curl's that has room for a moment:
    // that room is for the joiners of the group that brought it (socket-supply.ts, the header).
    setOption(state, 'FRESH_CONNECT', slot?.first !== undefined && slot.lease !== undefined);
    // http: HTTP/1.1 only (no multiplexing, so curl never waits on a connection to learn whether it can).
    // https: HTTP/2 when ALPN agrees; PIPEWAIT makes transfers started meanwhile wait for the first connection
    // and multiplex over it instead of asking for sockets of their own (curl 7.88 waits so only while it knows no
    // HTTP/2 connection to the origin: socket-supply.ts says what is done beyond).
    // Relayed: the daemon's ALPN decided, HTTP/2 with prior knowledge or HTTP/1.1. curl 7.88 fails a transfer that
    // asks for prior knowledge and is then given an existing HTTP/2 connection (CURLE_HTTP2, nothing sent), so
    // prior knowledge is asked only by a transfer that brings its own fresh session; the others ask for "HTTP/2
    // over TLS", which to an http:// URL means reuse of the HTTP/2 connection curl has (or else HTTP/1.1, which
    // never happens: without a lease of its own a transfer that needs a connection is starved and run again).
    if (relay) {
      const h2 = relay.alpn === 'h2';
      const fresh = slot?.lease !== undefined;
      setOption(
        state,
        'HTTP_VERSION',
        h2 ? (fresh ? CurlHttpVersion.V2PriorKnowledge : CurlHttpVersion.V2Tls) : CurlHttpVersion.V1_1,
      );
      setOption(state, 'PIPEWAIT', h2);
    } else {
      setOption(state, 'HTTP_VERSION', attempt.secure ? CurlHttpVersion.V2Tls : CurlHttpVersion.V1_1);
      setOption(state, 'PIPEWAIT', attempt.secure);
    }
    if (slot) {
      // Pin curl's DNS to the address the daemon connected to: the worker never resolves (it may have no network).
      if (slot.lease) {
        // Through a proxy the lent socket is a tunnel to the origin: curl connects "to the origin" as well.
        const target = { host: urlTarget.hostname, port: urlTarget.origin.port };
        const host = target.host.startsWith('[') ? target.host.slice(1, -1) : target.host;
        const address = slot.lease.address;
        const literal = address.includes(':') ? `[${address}]` : address;
        this.#pinned.set(slot.originKey, `${host}:${target.port}:${literal}`);
      }
      const entry = this.#pinned.get(slot.originKey);
      if (entry && (state.options.get('RESOLVE') !== entry || !state.options.has('RESOLVE'))) {
        setListOption(state, 'RESOLVE', entry, [entry]);
      }
    } else {
      setListOption(state, 'RESOLVE', '', null);
    }
    // A buffered body is collected in the handle and taken once at the end (Easy.collectBody, takeBody in
    // #finishAttempt): no WRITEFUNCTION call per chunk, which was the costliest part of a small keep-alive response.
    // Not over a relayed HTTP/2 session, whose stall watch counts what WRITEFUNCTION receives. Set at every attempt
    // that collects, and ended by takeBody at every attempt's end: what curl writes to a handle with no transfer (an
    // HTTP/2 stream's late frames after its transfer was taken out) goes to WRITEFUNCTION, which drops it.
    if (io.sink instanceof BufferSink && relay?.alpn !== 'h2') {
      easy.collectBody(Math.min(attempt.maxBodyBytes, Number.MAX_SAFE_INTEGER));
      state.collecting = true;
    } else if (state.collecting) {
      // (An attempt that collected and ended before curl ran it, without takeBody.)
      easy.collectBody(-1);
      state.collecting = false;
    }
    // curl connects by itself: its default socket callbacks for this attempt (restored when it ends).
    if (attempt.mode === 'direct') this.#useLeasedSockets(state, false);
  }

  /** Runs one attempt in curl; its end (success or TransferFailure) goes to #attemptEnded. */
  /** `waitedForSocket`: the slot came later (an acquire, or a wait for a connection of the origin's to free). */
  #perform(transfer: Transfer, slot: SocketSlot | undefined, acquireMs: number, waitedForSocket = false): void {
    if (this.#closed) {
      const closing = new SockpoolError(ErrorCodes.CLOSED, 'worker is closing');
      this.#attemptEnded(transfer, slot, unsentFailure(0, closing));
      return;
    }
    const { request, io, target, key } = transfer;
    // A token the daemon charged on this attempt's acquire (its origin's rate not known here yet) was waited for
    // there: part of the transfer's token wait too.
    const charged = slot?.lease?.tokenWaitMs;
    if (charged !== undefined) transfer.tokenWaitMs += charged;
    // A wait at the origin's cap: the daemon's acquire says so (capWaitMs); at an origin that counts as at its cap
    // here (contended: curl's own connections are taken in turn), the whole wait for a socket but for its token.
    // (Only asked of a slot that came later: a socket at hand waited for nothing, the common keep-alive case.)
    if (waitedForSocket && this.#supply.contended(key)) {
      transfer.capWaitMs += Math.max(0, acquireMs - transfer.attemptTokenWaitMs);
    } else if (slot?.lease?.capWaitMs !== undefined) transfer.capWaitMs += slot.lease.capWaitMs;
    let state: HandleState;
    try {
      state = this.#handle();
    } catch (error) {
      // curl refused an option the engine sets on every handle (one of the client's that its validation let
      // through): this transfer fails, its slot goes back. Thrown on, it escaped from a promise callback (an
      // unhandled rejection) and the transfer never settled, not even at its deadline.
      this.#attemptEnded(transfer, slot, unsentFailure(0, setupError(error, request)));
      return;
    }
    const attempt: Attempt = {
      seq: ++this.#seq,
      transfer,
      request,
      io,
      slot,
      mode: slot ? 'leased' : 'direct',
      target,
      originKey: key,
      secure: target.secure,
      relay: target.secure ? this.#relayOf(key, slot) : undefined,
      acquireMs,
      tokenWaitMs: transfer.tokenWaitMs,
      capWaitMs: transfer.capWaitMs,
      headSent: false,
      statusText: undefined,
      pause: 0,
      added: false,
      stallWatch: undefined,
      bodyBytes: 0,
      maxBodyBytes: request.maxBodyBytes ?? Number.POSITIVE_INFINITY,
      tooLarge: false,
      mayResend: !transfer.retriedDead && retryable(this.#policy, request),
      resent: false,
      headerBlock: undefined,
    };
    state.current = attempt;
    try {
      this.#configure(state, attempt);
    } catch (error) {
      this.#restoreSocketCallbacks(state, attempt);
      this.#release(state);
      this.#attemptEnded(transfer, slot, unsentFailure(0, setupError(error, request)));
      return;
    }
    // (A BufferSink never refuses a chunk: nothing to resume.)
    if (!(io.sink instanceof BufferSink)) io.sink.onWritable(() => this.#resume(state, attempt.seq, CurlPause.Recv));
    io.source?.onReadable(() => this.#resume(state, attempt.seq, CurlPause.Send));
    const { signal } = io;
    // A body that fails to decode (or decodes past maxBodyBytes) stops the transfer as an abort does.
    if (io.sink instanceof DecodingSink) {
      io.sink.onFailure((failure) => {
        if (!state.finish || state.current !== attempt) return;
        this.#takeOut(state, CurlCode.CURLE_BAD_CONTENT_ENCODING, decodeError(failure, request));
      });
    }
    state.finish = state.finishAttempt;
    this.#running++;
    if (signal.aborted) {
      state.finish = undefined;
      this.#running--;
      this.#restoreSocketCallbacks(state, attempt);
      this.#release(state);
      this.#attemptEnded(transfer, slot, unsentFailure(CurlCode.CURLE_ABORTED_BY_CALLBACK, signal.reason));
      return;
    }
    signal.addEventListener('abort', state.onAbort, { once: true });
    if (attempt.relay?.alpn === 'h2') this.#watchStall(state, attempt);
    try {
      this.#multi.addHandle(state.easy);
      attempt.added = true;
    } catch (error) {
      // Started from a microtask that ran at the end of one of curl's own callbacks (inside
      // curl_multi_socket_action: a retry after the daemon link failed there), where curl refuses the call
      // (CURLM_RECURSIVE_API_CALL): add it on the next turn, unless the attempt ended meanwhile.
      if (!/within callback/i.test((error as Error).message)) {
        state.finish = undefined;
        this.#running--;
        signal.removeEventListener('abort', state.onAbort);
        this.#restoreSocketCallbacks(state, attempt);
        this.#release(state);
        this.#attemptEnded(transfer, slot, unsentFailure(0, error));
        return;
      }
      this.#addsDeferred++;
      setImmediate(() => {
        if (state.current !== attempt || !state.finish) return;
        this.#multi.addHandle(state.easy);
        attempt.added = true;
      });
    }
  }

  /** The handle's attempt ended (its `finish`): curl finished it (`code`, `error`), or it was taken out
   *  (`abortReason`). */
  #finishAttempt(state: HandleState, code: CurlCode, error: Error | undefined, abortReason?: unknown): void {
    const attempt = state.current!;
    const { transfer, slot, request, io } = attempt;
    io.signal.removeEventListener('abort', state.onAbort);
    this.#restoreSocketCallbacks(state, attempt);
    if (state.collecting) {
      // The body the handle collected (#configure): into the sink as one chunk, or past maxBodyBytes (curl then
      // failed the transfer with CURLE_WRITE_ERROR, as when WRITEFUNCTION refuses a chunk). Taken whatever the end,
      // so that the handle holds none of it; taking it ends the collecting.
      const scratch = this.#bodyScratch;
      const taken = scratch ? state.easy.takeBody(scratch) : state.easy.takeBody();
      state.collecting = false;
      if (taken === null) attempt.tooLarge = true;
      else if (abortReason === undefined && code === CurlCode.CURLE_OK) {
        const body = typeof taken === 'number' ? Buffer.copyBytesFrom(scratch!, 0, taken) : taken;
        if (body.length > 0) {
          io.sink.write(body);
          attempt.bodyBytes += body.length;
        }
      }
    }
    if (abortReason !== undefined) {
      const failure = new TransferFailure(code, abortReason, true);
      failure.unsent = transfer.token !== undefined && this.#unsent(state, attempt);
      this.#release(state);
      this.#attemptEnded(transfer, slot, failure);
      return;
    }
    if (attempt.headerBlock !== undefined && code !== CurlCode.CURLE_OK) {
      // Nothing of it went out (see openSocket): never run again, and its token (if any) was not spent.
      const failure = new TransferFailure(
        CurlCode.CURLE_HTTP2_STREAM,
        headerBlockError(request, attempt.headerBlock),
        true,
      );
      failure.unsent = true;
      this.#release(state);
      this.#attemptEnded(transfer, slot, failure);
      return;
    }
    if (code !== CurlCode.CURLE_OK) {
      const message = error?.message ?? `curl error ${code}`;
      const failure =
        code === CurlCode.CURLE_OPERATION_TIMEDOUT
          ? new TransferFailure(code, timeoutError(request), true)
          : attempt.tooLarge
            ? new TransferFailure(code, bodyTooLargeError(request), true)
            : attempt.resent
              ? resentFailure(code, request)
              : new TransferFailure(
                  code,
                  new SockpoolError(ErrorCodes.TRANSFER, `${request.method} ${request.url}: ${message}`, {
                    curlCode: code,
                    deadConnection: DEAD_CONNECTION_CODES.has(code),
                  }),
                );
      failure.unsent = transfer.token !== undefined && this.#unsent(state, attempt);
      this.#release(state);
      this.#attemptEnded(transfer, slot, failure);
      return;
    }
    const head = this.#head(state.easy, attempt, EMPTY_BODY);
    if (!attempt.headSent) {
      attempt.headSent = true;
      // The head did not end a header block first (no HEADERFUNCTION: a buffered response, the common case). A
      // BufferSink has no use for it; other sinks get a copy: the head becomes the result below, and a port in this
      // thread (client/local-port.ts) does not clone what it carries.
      if (!(io.sink instanceof BufferSink)) io.sink.head({ ...head });
    }
    this.#release(state);
    // The head becomes the result (#attemptEnded puts a buffered body in).
    const result = head as TransferResult;
    if (io.sink instanceof DecodingSink) this.#finishDecoding(transfer, slot, io.sink, result);
    else this.#attemptEnded(transfer, slot, result);
  }

  /**
   * Whether nothing of an attempt curl ended (failed or taken out) went out: its token was not spent. REQUEST_SIZE
   * counts what curl wrote of the request, from 0 at the transfer's start in curl (its own resends included: see
   * openSocket). Before that start, in the turn it was added, it is still the handle's last transfer's: an attempt
   * ended then counts as sent when that was not 0, so that a token is never given back for a request that went out.
   * Only asked of attempts that took a token (a native call).
   */
  #unsent(state: HandleState, attempt: Attempt): boolean {
    return !attempt.added || Number(state.easy.getInfo('REQUEST_SIZE').data) === 0;
  }

  /**
   * curl is done with a body it handed on coded: the transfer ends once the rest is decoded (a stream's caller may
   * still be reading it), or fails; its cancellation still applies meanwhile. The socket's slot ends now (curl's
   * connection is idle already).
   */
  #finishDecoding(transfer: Transfer, slot: SocketSlot | undefined, sink: DecodingSink, result: TransferResult): void {
    if (slot) this.#supply.finish(slot);
    const { signal } = transfer.io;
    let settled = false;
    const settle = (outcome: TransferResult | TransferFailure) => {
      if (settled) return;
      settled = true;
      signal.removeEventListener('abort', onAbort);
      this.#attemptEnded(transfer, undefined, outcome);
    };
    const onAbort = () => settle(new TransferFailure(CurlCode.CURLE_ABORTED_BY_CALLBACK, signal.reason, true));
    if (signal.aborted) {
      onAbort();
      return;
    }
    signal.addEventListener('abort', onAbort, { once: true });
    sink.finish((failure) =>
      settle(
        failure
          ? new TransferFailure(CurlCode.CURLE_BAD_CONTENT_ENCODING, decodeError(failure, transfer.request), true)
          : result,
      ),
    );
  }

  /** The warm TLS session an attempt's connection is: its lease's, or (none) the one curl keeps for the origin. */
  #relayOf(key: string, slot: SocketSlot | undefined): LeaseTls | undefined {
    if (!slot) return undefined;
    const lease = slot.lease;
    if (!lease) return this.#relayed.get(key) ?? undefined;
    if (lease.tls || this.#relayed.get(key)) this.#relayed.set(key, lease.tls ?? null);
    return lease.tls;
  }

  #restoreSocketCallbacks(state: HandleState, attempt: Attempt): void {
    if (attempt.mode === 'direct') this.#useLeasedSockets(state, true);
  }

  /** curl's socket callbacks: ours (the leased fd, already connected), or curl's own for a direct-fallback attempt. */
  #useLeasedSockets(state: HandleState, leased: boolean): void {
    state.easy.setOpt('OPENSOCKETFUNCTION', leased ? state.openSocket : null);
    state.easy.setOpt('SOCKOPTFUNCTION', leased ? alreadyConnected : null);
  }
}

/**
 * What makes a plaintext request over a relayed session look, to the origin, as the https request would: the
 * https authority as Host (curl would write the port of an http:// URL into it) and, for HTTP/2, `:scheme: https`
 * (curl 7.88 takes a `:scheme` header as the pseudo-header; it would say `http`).
 */
function relayHeaders(request: TransferRequest, target: UrlTarget, relay: LeaseTls): string[] {
  const headers: string[] = [];
  if (!request.headers.some(([name]) => name.toLowerCase() === 'host')) headers.push(`Host: ${target.authority}`);
  if (relay.alpn === 'h2') headers.push(':scheme: https');
  return headers;
}

/** A body that did not decode fails as curl failed it (CURLE_BAD_CONTENT_ENCODING); one past maxBodyBytes as any. */
function decodeError(failure: DecodeFailure, request: TransferRequest): SockpoolError {
  if (failure.kind === 'too-large') return bodyTooLargeError(request);
  return new SockpoolError(
    ErrorCodes.TRANSFER,
    `${request.method} ${request.url}: Unrecognized or bad HTTP Content or Transfer-Encoding: ${failure.message}`,
    { curlCode: CurlCode.CURLE_BAD_CONTENT_ENCODING, deadConnection: false },
  );
}

/** Whether the handle's transfer may have been a stream of an HTTP/2 connection: not when it was asked to speak
 *  HTTP/1.1, nor when its response came over HTTP/1.x (CURLINFO_HTTP_VERSION, 0 until a response's status line). */
function mayBeStream(state: HandleState): boolean {
  if (state.options.get('HTTP_VERSION') === CurlHttpVersion.V1_1) return false;
  const version = Number(state.easy.getInfo('HTTP_VERSION').data);
  return version !== HTTP_1_0 && version !== HTTP_1_1;
}

/** Sets a plain option (or a callback) on the handle unless it has that value already (HandleState.options). */
function setOption(
  state: HandleState,
  name: string,
  value: PlainOption | HandleState['onHeader'] | HandleState['onPrereq'],
): void {
  if (state.options.get(name) === value && state.options.has(name)) return;
  state.options.set(name, value);
  (state.easy.setOpt as (option: string, value: unknown) => unknown)(name, value);
}

/** Sets a list option unless its text (`key`) is the same as last time; `list` is built only when it may have changed
 *  (a function), or given. */
function setListOption(state: HandleState, name: string, key: string, list: string[] | null | (() => string[])): void {
  if (state.options.get(name) === key && state.options.has(name)) return;
  state.options.set(name, key);
  (state.easy.setOpt as (option: string, value: unknown) => unknown)(name, typeof list === 'function' ? list() : list);
}

/** SOCKOPTFUNCTION for a handed socket: connected by the daemon already. */
function alreadyConnected(): number {
  return CurlSockOpt.AlreadyConnected;
}

/** The retry policy lets this request run again after its connection died. */
function retryable(policy: ClientPolicy, request: TransferRequest): boolean {
  if (policy.retryDeadConnection === false) return false;
  return policy.retryMethods ? policy.retryMethods.includes(request.method) : IDEMPOTENT_METHODS.has(request.method);
}

/** Readies a transfer's bodies for another attempt; false when its request body cannot be sent again. */
function rewound(io: TransferIO): boolean {
  if (io.source && !io.source.rewind()) return false;
  io.sink.reset();
  return true;
}

/**
 * The most nghttp2 (curl 7.88's HTTP/2 library) sends as one request's header block, as it bounds it
 * (max_send_header_block_length, NGHTTP2_MAX_HEADERSLEN: 64 KiB): see h2HeaderBlockOver.
 */
const H2_HEADER_BLOCK_MAX = 65_536;
/** Headers curl 7.88 drops from an HTTP/2 request (connection-specific; `host` becomes `:authority`, `te` is kept
 *  only as "trailers"). */
const H2_DROPPED_HEADERS = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade']);
/** curl 7.88's Accept-Encoding when asked for every coding it knows (ACCEPT_ENCODING ''), in this build. */
const CURL_ACCEPT_ENCODING = 'deflate, gzip, br, zstd';

/**
 * nghttp2's bound of the request's HTTP/2 header block when it is more than nghttp2 sends (H2_HEADER_BLOCK_MAX), else
 * undefined. nghttp2 bounds a block at 12 bytes, 5 more for a priority it may add, and for each field 12 bytes with its
 * name and value (nghttp2_hd_deflate_bound); past its limit it sends nothing and closes the stream itself with
 * REFUSED_STREAM (the code that says "send it again"). curl 7.88 then resends the request on a new connection, where
 * the same happens, or, on a connection it reused, never looks at the stream again: the transfer waited until its
 * deadline (plain curl as well). The fields are what curl sends: the pseudo-headers (`:authority` the caller's Host,
 * if given), the caller's headers but the connection-specific ones, and its own Accept, Accept-Encoding (decompress)
 * and Content-Length. Measured against curl 7.88 with nghttp2 1.52 (test/client-h2-edges.test.ts): a block of
 * exactly the limit is sent, one a byte longer is not; a shorter Accept-Encoding than CURL_ACCEPT_ENCODING (another
 * build) is counted a few bytes long.
 */
function h2HeaderBlockOver(
  request: TransferRequest,
  target: UrlTarget,
  source: UploadSource | undefined,
): number | undefined {
  const { href } = target;
  const { headers } = request;
  // Most requests are far below it: the method, the whole URL and every header (each character counted as 3 UTF-8
  // bytes), with room for the names and values curl adds.
  let chars = 0;
  for (const [name, value] of headers) chars += name.length + value.length;
  const room = H2_HEADER_BLOCK_MAX - 17 - 12 * (headers.length + 7) - 128;
  if (request.method.length + href.length + target.authority.length + chars * 3 <= room) return undefined;
  const hash = href.indexOf('#');
  // (The path of an http or https URL starts at the first '/' after the scheme's '//'.)
  const path = (hash < 0 ? href.length : hash) - href.indexOf('/', target.protocol.length + 2);
  let fields = 4;
  let bytes = ':method'.length + request.method.length + ':path'.length + path + ':scheme'.length + 'https'.length;
  let authority = target.authority.length;
  let accept = false;
  let acceptEncoding = false;
  let contentLength = false;
  for (const [name, value] of headers) {
    const lower = name.toLowerCase();
    if (lower === 'host') {
      authority = Buffer.byteLength(value.trimStart());
      continue;
    }
    if (H2_DROPPED_HEADERS.has(lower) || (lower === 'te' && value.trim().toLowerCase() !== 'trailers')) continue;
    if (lower === 'accept') accept = true;
    else if (lower === 'accept-encoding') acceptEncoding = true;
    else if (lower === 'content-length') contentLength = true;
    fields++;
    bytes += name.length + Buffer.byteLength(value.trimStart());
  }
  bytes += ':authority'.length + authority;
  if (!accept) {
    fields++;
    bytes += 'accept'.length + '*/*'.length;
  }
  if (request.decompress && !acceptEncoding) {
    fields++;
    bytes += 'accept-encoding'.length + CURL_ACCEPT_ENCODING.length;
  }
  if (source && source.length !== undefined && !contentLength) {
    fields++;
    bytes += 'content-length'.length + String(source.length).length;
  }
  const bound = 17 + 12 * fields + bytes;
  return bound > H2_HEADER_BLOCK_MAX ? bound : undefined;
}

/** A request whose header block nghttp2 refused to send over HTTP/2 (see h2HeaderBlockOver): nothing was sent. */
function headerBlockError(request: TransferRequest, bound: number): SockpoolError {
  const url = request.url.length <= 200 ? request.url : `${request.url.slice(0, 200)}…`;
  return new SockpoolError(
    ErrorCodes.TRANSFER,
    `${request.method} ${url}: the request's HTTP/2 header block (URL and headers) would be up to ${bound} bytes, ` +
      `more than curl's HTTP/2 library (nghttp2) sends (${H2_HEADER_BLOCK_MAX}): it refused the stream, nothing was sent`,
    { curlCode: CurlCode.CURLE_HTTP2_STREAM, deadConnection: false },
  );
}

/**
 * An attempt whose request curl wanted to send again on a new connection (see openSocket) and that failed: its
 * connection died under it (or its HTTP/2 stream was refused) after it went out; `code` is curl's, of what followed.
 */
function resentFailure(code: number, request: TransferRequest): TransferFailure {
  const error = new SockpoolError(
    ErrorCodes.TRANSFER,
    `${request.method} ${request.url}: the connection died (or the HTTP/2 stream was refused) after the request ` +
      'was sent, before any response',
    { curlCode: code, deadConnection: true },
  );
  return new TransferFailure(code, error, false, true);
}

/** A throw while a transfer was set up in curl (an option curl refused): a SockpoolError as it is, anything else
 *  SOCKPOOL_ERR_INTERNAL naming the request. */
function setupError(error: unknown, request: TransferRequest): unknown {
  if (error instanceof SockpoolError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new SockpoolError(
    ErrorCodes.INTERNAL,
    `${request.method} ${request.url}: curl refused the transfer: ${message}`,
  );
}

/** An attempt that ended before curl had it: nothing of its request went out. */
function unsentFailure(code: number, error: unknown): TransferFailure {
  const failure = new TransferFailure(code, error, true);
  failure.unsent = true;
  return failure;
}

class TransferFailure {
  curlCode: number;
  error: unknown;
  /** Cancelled (abort, timeout): never retried. */
  aborted: boolean;
  /** The request went out and curl wanted to send it again on a new connection (see openSocket). */
  resent: boolean;
  /** Nothing of the request went out (see #unsent): the attempt's token, if it took one, was not spent. */
  unsent = false;
  constructor(curlCode: number, error: unknown, aborted = false, resent = false) {
    this.curlCode = curlCode;
    this.error = error;
    this.aborted = aborted;
    this.resent = resent;
  }
}

/** The reason phrase of a status line as HEADERFUNCTION hands it ("HTTP/1.1 404 Not Found\r\n" → "Not Found";
 *  "HTTP/2 200 \r\n" → ""). Latin-1, as the headers are. */
function reasonPhrase(line: Buffer): string {
  const text = line.toString('latin1').replace(/\r?\n$/, '');
  const match = /^HTTP\/[^ ]+ \d{3}(?: (.*))?$/.exec(text);
  return match?.[1]?.trim() ?? '';
}
