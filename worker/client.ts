// SockpoolClient: runs in the caller's thread. It validates requests, sends them to a piscina pool of worker
// threads (each running libcurl over sockets the daemon hands in) and rebuilds results and typed errors.

import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Piscina } from 'piscina';
import { ErrorCodes, fromPlainError, SockpoolError } from '../shared/errors.js';
import type { TransferRequest, TransferResult } from './curl-engine.js';
import type { Task, TaskResult, WorkerConfig } from './task.js';

export interface SockpoolClientOptions {
  /** sockpoold's socket. Default: $SOCKPOOL_SOCKET, else /run/sockpool/sockpoold.sock as root, else
   *  ./.sockpool/sockpoold.sock. */
  socketPath?: string;
  /** Worker threads. Default 2. */
  threads?: number;
  /** Transfers one thread runs at once on its libcurl Multi. Default 64. */
  concurrencyPerThread?: number;
  /** Default per-request timeout. Default 30000 ms. */
  timeoutMs?: number;
  /** How long a request may wait for the daemon to hand over a socket. Default 10000 ms. */
  acquireTimeoutMs?: number;
  /** With the daemon down: fail ('fail', default) or let curl connect by itself ('direct'). */
  fallback?: 'fail' | 'direct';
  /** CA bundle for HTTPS verification (default: the system store). */
  caFile?: string;
  /** Disable TLS verification. Only for tests against throwaway servers. */
  insecure?: boolean;
}

export interface RequestOptions {
  method?: string;
  headers?: Record<string, string> | Array<[string, string]> | Headers;
  body?: string | Uint8Array;
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface SockpoolResponse extends Omit<TransferResult, 'body' | 'timings'> {
  body: Buffer;
  timings: TransferResult['timings'] & { queueMs: number };
}

export function defaultSocketPath(): string {
  if (process.env.SOCKPOOL_SOCKET) return process.env.SOCKPOOL_SOCKET;
  return process.getuid?.() === 0 ? '/run/sockpool/sockpoold.sock' : join(process.cwd(), '.sockpool', 'sockpoold.sock');
}

/** The compiled task module: beside this file in dist/, or dist/worker/task.js when running from sources. */
function taskFile(): string {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith('.js')) return join(dirname(here), 'task.js');
  const compiled = join(dirname(here), '..', 'dist', 'worker', 'task.js');
  if (!existsSync(compiled)) throw new Error(`${compiled} is missing: run npm run build`);
  return compiled;
}

const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
const FORBIDDEN_VALUE = /[\r\n\0]/;

function invalid(message: string, fields: Record<string, string> = {}): SockpoolError {
  return new SockpoolError(ErrorCodes.INVALID_ARGUMENT, message, fields);
}

/** Checks everything curl would otherwise be handed blindly: URL scheme, method token, header names and values. */
export function validateRequest(
  url: string | URL,
  options: RequestOptions,
): {
  url: URL;
  method: string;
  headers: Array<[string, string]>;
} {
  let parsed: URL;
  try {
    parsed = new URL(String(url));
  } catch {
    throw invalid(`invalid URL: ${JSON.stringify(String(url))}`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw invalid(`unsupported URL scheme ${parsed.protocol} (http and https only)`, { url: parsed.href });
  }
  if (parsed.username || parsed.password) throw invalid('credentials in the URL are not supported');
  const method = (options.method ?? 'GET').toUpperCase();
  if (!TOKEN.test(method)) throw invalid(`invalid HTTP method ${JSON.stringify(options.method)}`);
  if (method === 'CONNECT') throw invalid('CONNECT is not supported');
  const headers: Array<[string, string]> = [];
  const source =
    options.headers instanceof Headers
      ? [...options.headers.entries()]
      : Array.isArray(options.headers)
        ? options.headers
        : Object.entries(options.headers ?? {});
  for (const [name, value] of source) {
    if (!TOKEN.test(name)) throw invalid(`invalid header name ${JSON.stringify(name)}`);
    if (typeof value !== 'string' || FORBIDDEN_VALUE.test(value)) {
      throw invalid(`invalid value for header ${name}: CR, LF and NUL are not allowed`);
    }
    headers.push([name, value]);
  }
  return { url: parsed, method, headers };
}

export class SockpoolClient {
  #pool: Piscina;
  #options: Required<Omit<SockpoolClientOptions, 'caFile'>> & { caFile: string | undefined };
  #closing: Promise<void> | undefined;

  constructor(options: SockpoolClientOptions = {}) {
    const threads = options.threads ?? 2;
    const concurrency = options.concurrencyPerThread ?? 64;
    if (!Number.isInteger(threads) || threads < 1) throw invalid('threads must be a positive integer');
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw invalid('concurrencyPerThread must be a positive integer');
    }
    if (options.fallback !== undefined && options.fallback !== 'fail' && options.fallback !== 'direct') {
      throw invalid("fallback must be 'fail' or 'direct'");
    }
    this.#options = {
      socketPath: options.socketPath ?? defaultSocketPath(),
      threads,
      concurrencyPerThread: concurrency,
      timeoutMs: options.timeoutMs ?? 30_000,
      acquireTimeoutMs: options.acquireTimeoutMs ?? 10_000,
      fallback: options.fallback ?? 'fail',
      caFile: options.caFile,
      insecure: options.insecure ?? false,
    };
    const workerData: WorkerConfig = { socketPath: this.#options.socketPath };
    this.#pool = new Piscina({
      filename: taskFile(),
      minThreads: threads,
      maxThreads: threads,
      concurrentTasksPerWorker: concurrency,
      // Idle workers must keep their event loops running (daemon link, curl's connection cache).
      atomics: 'disabled',
      idleTimeout: Number.POSITIVE_INFINITY,
      workerData,
    });
  }

  async request(url: string | URL, options: RequestOptions = {}): Promise<SockpoolResponse> {
    if (this.#closing) throw new SockpoolError(ErrorCodes.CLOSED, 'client is closed');
    const checked = validateRequest(url, options);
    options.signal?.throwIfAborted();
    const body = typeof options.body === 'string' ? Buffer.from(options.body) : options.body;
    const request: TransferRequest = {
      url: checked.url.href,
      method: checked.method,
      headers: checked.headers,
      body,
      timeoutMs: options.timeoutMs ?? this.#options.timeoutMs,
      acquireTimeoutMs: this.#options.acquireTimeoutMs,
      caFile: this.#options.caFile,
      insecure: this.#options.insecure,
      directFallback: this.#options.fallback === 'direct',
    };
    const queued = performance.now();
    const outcome = (await this.#pool.run({ kind: 'request', request } satisfies Task)) as TaskResult;
    if (!outcome.ok) throw fromPlainError(outcome.error);
    if (!('result' in outcome)) throw new SockpoolError(ErrorCodes.PROTOCOL, 'worker returned no result');
    const result = outcome.result;
    const elapsed = performance.now() - queued;
    return {
      ...result,
      body: Buffer.from(result.body.buffer, result.body.byteOffset, result.body.byteLength),
      timings: { ...result.timings, queueMs: Math.max(0, elapsed - result.timings.totalMs - result.timings.acquireMs) },
    };
  }

  /** A standard fetch Response over request(). */
  async fetch(input: string | URL | Request, init: RequestInit = {}): Promise<Response> {
    const url = input instanceof Request ? input.url : input;
    const method = init.method ?? (input instanceof Request ? input.method : 'GET');
    const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
    let body: Uint8Array | undefined;
    const rawBody = init.body ?? (input instanceof Request && input.body ? await input.arrayBuffer() : undefined);
    if (rawBody !== undefined && rawBody !== null) {
      body = new Uint8Array(await new Response(rawBody as ConstructorParameters<typeof Response>[0]).arrayBuffer());
    }
    const response = await this.request(url, {
      method,
      headers,
      body,
      signal: init.signal ?? undefined,
    });
    const nullBody = method.toUpperCase() === 'HEAD' || [101, 204, 205, 304].includes(response.status);
    const result = new Response(nullBody ? null : new Uint8Array(response.body), {
      status: response.status,
      headers: response.headers,
    });
    Object.defineProperty(result, 'url', { value: response.url });
    return result;
  }

  async prewarm(origins: Array<{ host: string; port: number; count?: number }>): Promise<void> {
    const task: Task = {
      kind: 'prewarm',
      origins: origins.map((origin) => ({ host: origin.host, port: origin.port, count: origin.count ?? 1 })),
    };
    const outcome = (await this.#pool.run(task)) as TaskResult;
    if (!outcome.ok) throw fromPlainError(outcome.error);
  }

  async stats(): Promise<Record<string, unknown>> {
    const outcome = (await this.#pool.run({ kind: 'stats' } satisfies Task)) as TaskResult;
    if (!outcome.ok) throw fromPlainError(outcome.error);
    return 'stats' in outcome ? outcome.stats : {};
  }

  /** Waits for in-flight requests, then stops the worker threads. */
  close(): Promise<void> {
    this.#closing ??= this.#pool.close();
    return this.#closing;
  }
}
