// One libcurl Multi per worker thread, running many transfers at once over sockets handed in by the daemon.
// curl keeps its connection cache (keep-alive, HTTP/2 multiplexing) in the Multi across transfers.
//
// Easy handles are created once, with the three socket callbacks set for good, and reused from a free list:
// curl remembers, in every connection it keeps, the CLOSESOCKETFUNCTION (and its data pointer) of the handle that
// opened it, so those handles must outlive their connections. close() closes the Multi first (its connections go
// through CLOSESOCKETFUNCTION while every handle is alive), then the handles.

import { CURL_SOCKET_BAD, CurlCode, CurlSockOpt, Easy, Multi } from 'node-libcurl';
import { ErrorCodes, type PlainError, SockpoolError, toPlainError } from '../shared/errors.js';
import { originOfUrl } from '../shared/origin.js';
import type { SocketSlot, SocketSupply } from './socket-supply.js';

export interface TransferRequest {
  url: string;
  method: string;
  headers: Array<[string, string]>;
  body?: Uint8Array | undefined;
  timeoutMs: number;
  /** Time allowed for the daemon to hand over a socket. */
  acquireTimeoutMs: number;
  caFile?: string | undefined;
  /** Skip TLS verification (explicit opt-out). */
  insecure?: boolean | undefined;
  /** With no daemon, let curl connect by itself instead of failing. */
  directFallback?: boolean | undefined;
}

export interface TransferTimings {
  acquireMs: number;
  connectMs: number;
  tlsMs: number;
  ttfbMs: number;
  totalMs: number;
}

export interface TransferResult {
  status: number;
  headers: Array<[string, string]>;
  body: Uint8Array;
  url: string;
  httpVersion: string;
  /** True when the transfer ran over a socket that was already connected before it started. */
  warm: boolean;
  /** How the connection was obtained: a daemon lease, curl's cache, or curl's own connect (fallback). */
  connection: 'leased' | 'reused' | 'direct';
  timings: TransferTimings;
}

export type TransferOutcome = { ok: true; result: TransferResult } | { ok: false; error: PlainError };

interface HandleState {
  easy: Easy;
  /** The socket prepared for the transfer this handle runs now. */
  slot: SocketSlot | undefined;
  /** A callback threw: the transfer fails with this error. */
  callbackError: Error | undefined;
  finish: ((code: CurlCode, error: Error | undefined) => void) | undefined;
  headers: Array<[string, string]>;
  chunks: Buffer[];
  bodyBytes: number;
  upload: Uint8Array | undefined;
  uploadOffset: number;
}

/** curl errors that mean the connection we handed over was dead (reset, closed before any response). */
const DEAD_CONNECTION_CODES = new Set<number>([
  CurlCode.CURLE_SEND_ERROR,
  CurlCode.CURLE_RECV_ERROR,
  CurlCode.CURLE_GOT_NOTHING,
  CurlCode.CURLE_SSL_CONNECT_ERROR,
]);
const IDEMPOTENT_METHODS = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE', 'TRACE']);
const MAX_FREE_HANDLES = 256;

export class CurlEngine {
  #multi = new Multi();
  #supply: SocketSupply;
  #states = new Map<Easy, HandleState>();
  #free: HandleState[] = [];
  /** Origins whose connections multiplex (HTTP/2): one connection serves every transfer. */
  #multiplexed = new Set<string>();
  /** Last address the daemon connected each origin to: curl's DNS cache is pinned to it (RESOLVE). */
  #pinned = new Map<string, string>();
  #closed = false;

  constructor(supply: SocketSupply) {
    this.#supply = supply;
    this.#multi.onMessage((error, easy, code) => {
      const state = this.#states.get(easy);
      if (!state?.finish) return;
      const finish = state.finish;
      state.finish = undefined;
      this.#multi.removeHandle(easy);
      finish(code, error ?? undefined);
    });
  }

  get activeTransfers(): number {
    return this.#multi.getCount();
  }

  async run(request: TransferRequest): Promise<TransferOutcome> {
    try {
      return { ok: true, result: await this.#runWithRetry(request) };
    } catch (error) {
      return { ok: false, error: toPlainError(error) };
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    // Connections close through CLOSESOCKETFUNCTION now, while every handle still exists.
    this.#multi.close();
    for (const state of this.#states.values()) state.easy.close();
    this.#states.clear();
    this.#free = [];
  }

  async #runWithRetry(request: TransferRequest): Promise<TransferResult> {
    const url = new URL(request.url);
    const origin = originOfUrl(url);
    const idempotent = IDEMPOTENT_METHODS.has(request.method);
    let forceSocket = false;
    let retriedDead = false;
    for (let attempt = 0; ; attempt++) {
      const started = performance.now();
      let slot: SocketSlot;
      try {
        slot = await this.#supply.prepare(origin.host, origin.port, {
          timeoutMs: request.acquireTimeoutMs,
          force: forceSocket,
          multiplexed: this.#multiplexed.has(`${origin.host}:${origin.port}`),
        });
      } catch (error) {
        const code = (error as { code?: string }).code;
        if (request.directFallback && code === ErrorCodes.DAEMON_UNAVAILABLE) {
          const direct = await this.#perform(request, undefined, performance.now() - started, 'direct');
          if (direct instanceof TransferFailure) throw direct.error;
          return direct;
        }
        throw error;
      }
      const acquireMs = performance.now() - started;
      const result = await this.#perform(request, slot, acquireMs, 'leased').finally(() => this.#supply.finish(slot));
      if (result instanceof TransferFailure) {
        // curl needed a new connection and we had not prepared one: once more, with a socket.
        if (slot.starved && !slot.taken && attempt < 2) {
          forceSocket = true;
          continue;
        }
        // The handed (or cached) connection died under the request: one retry on a fresh socket.
        if (idempotent && !retriedDead && DEAD_CONNECTION_CODES.has(result.curlCode)) {
          retriedDead = true;
          forceSocket = true;
          continue;
        }
        throw result.error;
      }
      if (result.httpVersion === '2') this.#multiplexed.add(`${origin.host}:${origin.port}`);
      return result;
    }
  }

  #handle(): HandleState {
    const reused = this.#free.pop();
    if (reused) return reused;
    const easy = new Easy();
    const state: HandleState = {
      easy,
      slot: undefined,
      callbackError: undefined,
      finish: undefined,
      headers: [],
      chunks: [],
      bodyBytes: 0,
      upload: undefined,
      uploadOffset: 0,
    };
    // Ownership of a leased fd passes to curl when this returns it.
    easy.setOpt('OPENSOCKETFUNCTION', () => (state.slot ? this.#supply.open(state.slot) : CURL_SOCKET_BAD));
    easy.setOpt('SOCKOPTFUNCTION', () => CurlSockOpt.AlreadyConnected);
    // Every socket curl closes was one of ours (direct-fallback transfers use curl's default close).
    easy.setOpt('CLOSESOCKETFUNCTION', (fd: number) => this.#supply.close(fd));
    easy.setOpt('HEADERFUNCTION', (data: Buffer) => {
      const line = data.toString('latin1').replace(/\r?\n$/, '');
      if (line.startsWith('HTTP/')) state.headers = [];
      else {
        const colon = line.indexOf(':');
        if (colon > 0) state.headers.push([line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim()]);
      }
      return data.length;
    });
    easy.setOpt('WRITEFUNCTION', (data: Buffer) => {
      state.chunks.push(Buffer.from(data));
      state.bodyBytes += data.length;
      return data.length;
    });
    easy.setOpt('READFUNCTION', (buffer: Buffer) => {
      const upload = state.upload;
      if (!upload) return 0;
      const count = Math.min(buffer.length, upload.length - state.uploadOffset);
      buffer.set(upload.subarray(state.uploadOffset, state.uploadOffset + count));
      state.uploadOffset += count;
      return count;
    });
    easy.setOpt('NOSIGNAL', true);
    this.#states.set(easy, state);
    return state;
  }

  #release(state: HandleState): void {
    state.slot = undefined;
    state.chunks = [];
    state.headers = [];
    state.upload = undefined;
    if (this.#free.length < MAX_FREE_HANDLES) this.#free.push(state);
    // Beyond the free list the handle stays alive (see the header) but unused; the Multi closes with the engine.
  }

  #configure(state: HandleState, request: TransferRequest, slot: SocketSlot | undefined): void {
    const { easy } = state;
    const url = new URL(request.url);
    const origin = originOfUrl(url);
    easy.setOpt('URL', request.url);
    easy.setOpt('CUSTOMREQUEST', request.method);
    easy.setOpt('NOBODY', request.method === 'HEAD');
    easy.setOpt(
      'HTTPHEADER',
      request.headers.map(([name, value]) => `${name}: ${value}`),
    );
    easy.setOpt('TIMEOUT_MS', request.timeoutMs);
    easy.setOpt('ACCEPT_ENCODING', null);
    if (request.body !== undefined) {
      state.upload = request.body;
      state.uploadOffset = 0;
      easy.setOpt('POST', true);
      easy.setOpt('POSTFIELDSIZE_LARGE', request.body.length);
    } else {
      easy.setOpt('POST', false);
      easy.setOpt('HTTPGET', request.method === 'GET');
    }
    // node-libcurl defaults CAINFO_BLOB to Node's bundled CAs, and a blob beats CAINFO: clear it so that curl
    // verifies against the CA file given, or else the system store (libcurl's built-in default path).
    easy.setOpt('CAINFO_BLOB', null);
    easy.setOpt('CAINFO', request.caFile ?? null);
    easy.setOpt('SSL_VERIFYPEER', request.insecure ? 0 : 1);
    easy.setOpt('SSL_VERIFYHOST', request.insecure ? 0 : 2);
    easy.setOpt('PIPEWAIT', true);
    if (slot) {
      // Pin curl's DNS to the address the daemon connected to: the worker never resolves (it may have no network).
      const address = slot.lease?.address ?? this.#pinned.get(slot.originKey);
      if (slot.lease) this.#pinned.set(slot.originKey, slot.lease.address);
      const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
      if (address) {
        const literal = address.includes(':') ? `[${address}]` : address;
        easy.setOpt('RESOLVE', [`${host}:${origin.port}:${literal}`]);
      }
    } else {
      easy.setOpt('RESOLVE', null);
    }
  }

  #perform(
    request: TransferRequest,
    slot: SocketSlot | undefined,
    acquireMs: number,
    mode: 'leased' | 'direct',
  ): Promise<TransferResult | TransferFailure> {
    if (this.#closed) return Promise.reject(new SockpoolError(ErrorCodes.CLOSED, 'worker is closing'));
    const state = this.#handle();
    state.slot = slot;
    state.callbackError = undefined;
    try {
      this.#configure(state, request, slot);
      if (mode === 'direct') {
        // curl connects by itself: default socket callbacks for this transfer.
        state.easy.setOpt('OPENSOCKETFUNCTION', null);
        state.easy.setOpt('SOCKOPTFUNCTION', null);
      }
    } catch (error) {
      this.#release(state);
      return Promise.reject(error);
    }
    return new Promise((resolve) => {
      state.finish = (code, error) => {
        const easy = state.easy;
        if (mode === 'direct') {
          easy.setOpt('OPENSOCKETFUNCTION', () => (state.slot ? this.#supply.open(state.slot) : CURL_SOCKET_BAD));
          easy.setOpt('SOCKOPTFUNCTION', () => CurlSockOpt.AlreadyConnected);
        }
        if (code !== CurlCode.CURLE_OK) {
          const message = error?.message ?? `curl error ${code}`;
          const failure = new TransferFailure(
            code,
            new SockpoolError(ErrorCodes.TRANSFER, `${request.method} ${request.url}: ${message}`, {
              curlCode: code,
            }),
          );
          if (code === CurlCode.CURLE_OPERATION_TIMEDOUT) {
            failure.error = new SockpoolError(ErrorCodes.TIMEOUT, `${request.method} ${request.url}: timed out`, {
              curlCode: code,
              timeoutMs: request.timeoutMs,
            });
          }
          this.#release(state);
          resolve(failure);
          return;
        }
        const info = (name: Parameters<Easy['getInfo']>[0]) => Number(easy.getInfo(name).data ?? 0);
        const status = info('RESPONSE_CODE');
        const connectUs = info('CONNECT_TIME_T');
        const tlsUs = info('APPCONNECT_TIME_T');
        const httpVersionCode = info('HTTP_VERSION');
        const body = Buffer.concat(state.chunks, state.bodyBytes);
        const reused = slot !== undefined && !slot.taken;
        const result: TransferResult = {
          status,
          headers: state.headers,
          body,
          url: String(easy.getInfo('EFFECTIVE_URL').data ?? request.url),
          httpVersion: httpVersionCode === 3 ? '2' : httpVersionCode === 1 ? '1.0' : '1.1',
          warm: mode === 'leased' && (reused || slot?.lease?.warm === true),
          connection: mode === 'direct' ? 'direct' : reused ? 'reused' : 'leased',
          timings: {
            acquireMs,
            connectMs: connectUs / 1000,
            tlsMs: tlsUs > 0 ? (tlsUs - connectUs) / 1000 : 0,
            ttfbMs: info('STARTTRANSFER_TIME_T') / 1000,
            totalMs: info('TOTAL_TIME_T') / 1000,
          },
        };
        this.#release(state);
        resolve(result);
      };
      this.#multi.addHandle(state.easy);
    });
  }
}

class TransferFailure {
  curlCode: number;
  error: SockpoolError;
  constructor(curlCode: number, error: SockpoolError) {
    this.curlCode = curlCode;
    this.error = error;
  }
}
