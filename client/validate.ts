// Everything a caller passes is checked in the caller's thread, before it reaches a worker or curl: URL scheme,
// method token, header names and values (no CR, LF or NUL: no header injection), the body's type, the timeout.

import { Buffer } from 'node:buffer';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { canonicalOrigin, originKey } from '../shared/origin.js';
import { MAX_PREWARM_COUNT, MAX_TIMEOUT_MS } from '../shared/protocol.js';
import { MAX_TIMER_MS } from '../shared/timers.js';
import { type UrlTarget, urlTarget } from '../worker/url-target.js';
import type { BodyStream } from './caller-channel.js';

/**
 * A request's headers, as they are taken (headerEntries): a plain object of names and values, an array of
 * [name, value] pairs, a Headers, a Map, or any other iterable of [name, value] pairs. Anything else (a string) is
 * refused with SOCKPOOL_ERR_INVALID_ARGUMENT.
 */
export type HeadersInput =
  | Record<string, string>
  | ReadonlyArray<readonly [string, string]>
  | Headers
  | ReadonlyMap<string, string>
  | Iterable<readonly [string, string]>;

/** A request body: given whole, or streamed (ReadableStream or any AsyncIterable of bytes). */
export type BodyInput = string | Uint8Array | ArrayBuffer | ArrayBufferView | Blob | BodyStream;

export interface RequestOptions {
  method?: string;
  headers?: HeadersInput;
  body?: BodyInput | null;
  /** Overrides the client's timeoutMs for this request: acquire, connect, transfer and (streamed) body reading. */
  timeoutMs?: number;
  signal?: AbortSignal | null;
  /**
   * Ask for a compressed body and get it decoded: curl sends `Accept-Encoding` with the codings it knows (gzip,
   * deflate, br, zstd) unless you send your own, and the worker decodes whichever of them the response uses (with
   * backpressure: a stream not read holds a bounded amount, however well it compresses). The response's
   * headers stay as the server sent them (`content-encoding`, `content-length` of the compressed body), as with
   * Node's fetch. Default false (the body as sent); fetch() always decodes.
   */
  decompress?: boolean;
  /**
   * The most bytes the response body may have, counted after decoding (`decompress`); beyond them the transfer
   * stops, its connection is closed, and the request (or, streamed, the body) fails with
   * SOCKPOOL_ERR_BODY_TOO_LARGE. Overrides the client's `maxBodyBytes`; `Infinity`: no limit.
   */
  maxBodyBytes?: number;
  /**
   * What a redirect (301, 302, 303, 307, 308) does: 'manual' (the default for request() and requestStream())
   * returns it; 'follow' (fetch()'s default) follows it, when it has a Location, as the Fetch standard says, each
   * hop a request of its own through the daemon, `timeoutMs` covering them all (client/redirects.ts); 'error' fails
   * with SOCKPOOL_ERR_REDIRECT.
   */
  redirect?: 'follow' | 'manual' | 'error';
}

const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
const FORBIDDEN_VALUE = /[\r\n\0]/;

export function invalid(message: string, fields: Record<string, string> = {}): SockpoolError {
  return new SockpoolError(ErrorCodes.INVALID_ARGUMENT, message, fields);
}

/** A URL the client can reach: http or https, no credentials. `what` starts the error messages. */
function checkedTarget(url: string | URL, what = ''): UrlTarget {
  let target: UrlTarget;
  try {
    target = urlTarget(typeof url === 'string' ? url : String(url));
  } catch {
    throw invalid(`${what}invalid URL: ${JSON.stringify(String(url))}`);
  }
  if (target.protocol !== 'http:' && target.protocol !== 'https:') {
    throw invalid(`${what}unsupported URL scheme ${target.protocol} (http and https only)`, { url: target.href });
  }
  if (target.credentials) throw invalid(`${what}credentials in the URL are not supported`);
  if (target.href.length > CURL_MAX_INPUT_LENGTH) {
    throw invalid(
      `${what}the URL is ${target.href.length} characters long: curl takes at most ${CURL_MAX_INPUT_LENGTH}`,
      { url: shortened(target.href) },
    );
  }
  return target;
}

/**
 * The longest string curl takes for an option (CURL_MAX_INPUT_LENGTH in curl's lib/setopt.c): a longer URL is refused
 * by setopt and the transfer failed with curlCode 3 ("URL using bad/illegal format or missing URL"), after a socket was
 * leased for it. (Only a URL with a long fragment, which is not sent, gets here: REQUEST_HEAD_MAX comes first.)
 */
export const CURL_MAX_INPUT_LENGTH = 8_000_000;

/**
 * The longest request head curl builds, request line and headers (DYN_HTTP_REQUEST in curl's lib/dynbuf.h is 1 MiB,
 * its terminating NUL included; HTTP/2 requests are built there too in curl 7.88): a longer one failed the transfer
 * with curlCode 27 ("Out of memory") after a socket was leased for it, nothing sent.
 */
export const REQUEST_HEAD_MAX = 1024 * 1024 - 1;

/**
 * What curl adds to the head of a request besides its request line, Host and the caller's headers, at most: Accept,
 * Accept-Encoding (decompress), Content-Length or Transfer-Encoding, ':scheme' over a relayed HTTP/2 session, the
 * blank line. A head this close to REQUEST_HEAD_MAX is refused, though curl might have built it.
 */
const CURL_HEAD_ALLOWANCE = 128;

/** A URL for an error's fields: a long one cut (the whole of it made errors of megabytes). */
function shortened(href: string): string {
  return href.length <= 200 ? href : `${href.slice(0, 200)}…`;
}

/**
 * Throws SOCKPOOL_ERR_INVALID_ARGUMENT when the request's head would be longer than curl builds (REQUEST_HEAD_MAX),
 * counting its request line (method, path and query: no fragment), Host and the caller's headers (`headerChars`: their
 * names and values, in UTF-16 units) and what curl adds (CURL_HEAD_ALLOWANCE).
 */
function checkHeadLength(
  target: UrlTarget,
  method: string,
  headers: Array<[string, string]>,
  headerChars: number,
): void {
  const { href } = target;
  const hash = href.indexOf('#');
  // (The path of an http or https URL starts at the first '/' after the scheme's '//'.)
  const requestTarget = (hash < 0 ? href.length : hash) - href.indexOf('/', target.protocol.length + 2);
  // "METHOD target HTTP/1.1\r\n" and "Host: authority\r\n".
  const fixed = method.length + 1 + requestTarget + 11 + 6 + target.authority.length + 2;
  // Each header as "name: value\r\n".
  const framing = headers.length * 4 + CURL_HEAD_ALLOWANCE;
  if (fixed + framing + headerChars * 3 <= REQUEST_HEAD_MAX) return;
  // (Values go to curl as UTF-8: counted in bytes only when they might tip it.)
  let headerBytes = 0;
  for (const [name, value] of headers) headerBytes += name.length + Buffer.byteLength(value);
  const length = fixed + framing + headerBytes;
  if (length <= REQUEST_HEAD_MAX) return;
  throw invalid(
    `the request head (request line and headers) would be about ${length} bytes: curl builds at most ` +
      `${REQUEST_HEAD_MAX} (1 MiB), and a head within ${CURL_HEAD_ALLOWANCE} bytes of that is refused`,
    { url: shortened(href) },
  );
}

/**
 * Checks everything curl would otherwise be handed blindly: URL scheme, method token, header names and values. The
 * method is upper-cased, as Node's http.request does, unless `methodAsGiven` (fetch(), which normalized it as the
 * Fetch standard says: fetchMethod).
 */
export function validateRequest(
  url: string | URL,
  options: Pick<RequestOptions, 'method' | 'headers'>,
  methodAsGiven = false,
): {
  target: UrlTarget;
  method: string;
  headers: Array<[string, string]>;
} {
  const target = checkedTarget(url);
  const method =
    options.method === undefined || options.method === null ? 'GET' : checkMethod(options.method, methodAsGiven);
  const headers: Array<[string, string]> = [];
  const given: unknown = options.headers;
  if (given === undefined || given === null) {
    checkHeadLength(target, method, headers, 0);
    return { target, method, headers };
  }
  let headerChars = 0;
  for (const entry of headerEntries(given)) {
    // (A pair, as the Headers constructor takes them: [null] or ['x-a'] was a raw TypeError, or a header sent wrong.)
    if (!Array.isArray(entry) || entry.length !== 2) {
      throw invalid(`headers: each entry must be a [name, value] pair, got ${describe(entry)}`);
    }
    const [name, value] = entry;
    if (typeof name !== 'string' || !TOKEN.test(name)) throw invalid(`invalid header name ${JSON.stringify(name)}`);
    if (typeof value !== 'string')
      throw invalid(`the value of header ${name} must be a string, got ${describe(value)}`);
    if (FORBIDDEN_VALUE.test(value)) throw invalid(`invalid value for header ${name}: CR, LF and NUL are not allowed`);
    headers.push([name, value]);
    headerChars += name.length + value.length;
  }
  checkHeadLength(target, method, headers, headerChars);
  return { target, method, headers };
}

/** A request's headers as entries: a Headers, an array of pairs or any iterable of them (a Map, another realm's
 *  Headers), or a plain object's own entries. Anything else is refused: a string was iterated (or its indices taken)
 *  into headers named 0, 1, … */
function headerEntries(given: unknown): Iterable<unknown> {
  if (given instanceof Headers) return given.entries();
  if (typeof given !== 'object' || given === null) {
    throw invalid(`headers must be an object, an array of [name, value] pairs or a Headers, got ${describe(given)}`);
  }
  if (Array.isArray(given)) return given;
  if (typeof (given as Partial<Iterable<unknown>>)[Symbol.iterator] === 'function') return given as Iterable<unknown>;
  return Object.entries(given);
}

/** Methods already checked, upper-cased (a caller uses a handful), and those checked to be sent as given. */
const checkedMethods = new Map<string, string>();
const methodsAsGiven = new Map<string, string>();

function checkMethod(given: string, asGiven: boolean): string {
  const checked = asGiven ? methodsAsGiven : checkedMethods;
  const known = checked.get(given);
  if (known) return known;
  // (Checked as given: upper-cased first, `optıons` (a dotless ı) became OPTIONS, and `ﬀ` FF.)
  if (!TOKEN.test(String(given))) throw invalid(`invalid HTTP method ${JSON.stringify(given)}`);
  const method = asGiven ? String(given) : String(given).toUpperCase();
  // (In any case: the Fetch standard forbids it so, and `connect` would reach curl as given.)
  if (method.toUpperCase() === 'CONNECT') throw invalid('CONNECT is not supported');
  // (Bounded: a caller inventing methods without end gets them checked each time beyond this.)
  if (checked.size < 64) checked.set(given, method);
  return method;
}

/** The methods the Fetch standard upper-cases, whatever case they are given in ("normalize a method"). */
const NORMALIZED_METHODS = new Set(['DELETE', 'GET', 'HEAD', 'OPTIONS', 'POST', 'PUT']);

/**
 * A fetch() method as the Fetch standard normalizes it, and Node's fetch (undici) sends it: DELETE, GET, HEAD,
 * OPTIONS, POST and PUT upper-cased whatever their case (`delete` goes as DELETE), any other method as given (`patch`
 * goes as `patch`, which servers may not know as PATCH: method names are case-sensitive). Checked later
 * (validateRequest with `methodAsGiven`).
 */
export function fetchMethod(given: unknown): string {
  const method = String(given);
  const upper = method.toUpperCase();
  // (Byte-case-insensitively, as the standard says: `optıons` is not OPTIONS, and is refused as no token.)
  return NORMALIZED_METHODS.has(upper) && TOKEN.test(method) ? upper : method;
}

export function validateTimeout(timeoutMs: unknown, what = 'timeoutMs'): number {
  if (typeof timeoutMs !== 'number' || !Number.isFinite(timeoutMs) || timeoutMs <= 0) {
    throw invalid(`${what} must be a positive number of milliseconds`);
  }
  // Node runs a longer timer after 1 ms (TimeoutOverflowWarning): a streamed request or fetch() timed out at once,
  // and the worker's deadline timer fired every millisecond. (About 24.8 days: long enough for any download.)
  if (timeoutMs > MAX_TIMER_MS) throw invalid(`${what} must be at most ${MAX_TIMER_MS} ms (the longest Node timer)`);
  return timeoutMs;
}

/**
 * A request's `signal`: none, or something that is an AbortSignal as far as the client uses one (as undici's own
 * check: `aborted`, addEventListener, removeEventListener). Anything else used to fail only where the queue or a lane
 * listened to it, after the request held a slot or a deadline: a raw TypeError, the slot never given back (close()
 * waiting for good), and at the deadline an uncaught exception (found in review; test/client-queue-edges.test.ts).
 */
export function validateSignal(signal: unknown): AbortSignal | undefined {
  if (signal === undefined || signal === null) return undefined;
  const candidate = signal as Partial<AbortSignal>;
  if (
    typeof candidate.aborted !== 'boolean' ||
    typeof candidate.addEventListener !== 'function' ||
    typeof candidate.removeEventListener !== 'function'
  ) {
    throw invalid('signal must be an AbortSignal');
  }
  return signal as AbortSignal;
}

/** A file path option of the client's (`what` names it, `meaning` says what it is the path of): a non-empty
 *  string. Anything else reached curl (caFile: setOpt threw inside a transfer) or the daemon link (socketPath). */
export function validatePath(value: unknown, what: string, meaning: string): string {
  if (typeof value !== 'string' || value === '') {
    throw invalid(`${what} must be the path of ${meaning} (a non-empty string), got ${describe(value)}`);
  }
  return value;
}

/** Methods a request whose handed connection died runs again by default: the idempotent ones (RFC 9110). */
const DEFAULT_RETRY_METHODS = ['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE', 'TRACE'];

/** The `retry` option with its defaults: `deadConnection` a boolean, `methods` method names (upper-cased). Anything
 *  else used to be read by its truthiness, or failed with a raw TypeError (`methods.map`, `toUpperCase`). */
export function validateRetry(retry: unknown): { deadConnection: boolean; methods: string[] } {
  if (retry === undefined) return validateRetry({});
  if (typeof retry !== 'object' || retry === null || Array.isArray(retry)) {
    throw invalid(`retry must be { deadConnection?, methods? }, got ${describe(retry)}`);
  }
  const { deadConnection = true, methods = DEFAULT_RETRY_METHODS } = retry as Record<string, unknown>;
  if (typeof deadConnection !== 'boolean') {
    throw invalid(`retry.deadConnection must be true or false, got ${describe(deadConnection)}`);
  }
  if (!Array.isArray(methods) || methods.some((method) => typeof method !== 'string' || !TOKEN.test(method))) {
    throw invalid(`retry.methods must be an array of HTTP method names, got ${describe(methods)}`);
  }
  return { deadConnection, methods: methods.map((method: string) => method.toUpperCase()) };
}

/** acquireTimeoutMs: a timeout (validateTimeout) the daemon may be asked to wait, at most the protocol's bound. */
export function validateAcquireTimeout(timeoutMs: unknown): number {
  const checked = validateTimeout(timeoutMs, 'acquireTimeoutMs');
  if (checked > MAX_TIMEOUT_MS) {
    throw invalid(`acquireTimeoutMs must be at most ${MAX_TIMEOUT_MS} ms (the longest the daemon waits)`);
  }
  return checked;
}

/** A body size limit: a whole number of bytes >= 0, or Infinity (none, returned as undefined). */
export function validateMaxBodyBytes(value: unknown): number | undefined {
  if (value === Number.POSITIVE_INFINITY) return undefined;
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw invalid('maxBodyBytes must be a whole number of bytes >= 0, or Infinity');
  }
  return value;
}

export interface ClassifiedBody {
  bytes?: Uint8Array;
  stream?: BodyStream;
}

const NO_BODY: ClassifiedBody = Object.freeze({});

/** A body as bytes to send whole, or a stream to send in chunks; a promise only for a Blob (read first). */
export function classifyBody(body: BodyInput | null | undefined): ClassifiedBody | Promise<ClassifiedBody> {
  if (body === undefined || body === null) return NO_BODY;
  if (typeof body === 'string') return { bytes: Buffer.from(body) };
  if (body instanceof Uint8Array) return { bytes: body };
  if (body instanceof ArrayBuffer) return { bytes: new Uint8Array(body) };
  if (ArrayBuffer.isView(body)) return { bytes: new Uint8Array(body.buffer, body.byteOffset, body.byteLength) };
  if (body instanceof Blob) return body.arrayBuffer().then((bytes) => ({ bytes: new Uint8Array(bytes) }));
  if (isStreamBody(body)) return { stream: body };
  throw invalid('body must be a string, bytes, a Blob, a ReadableStream or an AsyncIterable of bytes');
}

/** Whether a body is sent as it is read (a ReadableStream or any AsyncIterable): it can be read only once. */
export function isStreamBody(body: BodyInput | null | undefined): body is BodyStream {
  return (
    body instanceof ReadableStream ||
    (typeof body === 'object' &&
      body !== null &&
      typeof (body as AsyncIterable<Uint8Array>)[Symbol.asyncIterator] === 'function')
  );
}

/** content-length given by the caller for a streamed body (curl then sends it as is instead of chunked). */
/**
 * The request's framing, checked against its body; returns the content-length the caller gave, if any (a streamed
 * body's declared length). A content-length must say what is sent: a whole body's length, 0 without a body, and
 * a streamed body must then have that length; one at most. Transfer-Encoding is curl's to choose (chunked for a
 * streamed body of unknown length). Wrong framing would send the body under a length the origin reads otherwise:
 * on a kept-alive connection the rest of it is read as another request, whose answer the next request on that
 * connection gets.
 */
export function checkFraming(headers: Array<[string, string]>, body: ClassifiedBody): number | undefined {
  let declared: number | undefined;
  for (const [name, value] of headers) {
    // (Most headers are neither: their length says so without lower-casing them.)
    if (name.length !== 14 && name.length !== 17) continue;
    const lower = name.toLowerCase();
    if (lower === 'transfer-encoding') {
      throw invalid('transfer-encoding cannot be set: curl frames the body (chunked when its length is unknown)');
    }
    if (lower !== 'content-length') continue;
    if (declared !== undefined) throw invalid('more than one content-length header');
    if (!/^\d{1,15}$/.test(value.trim())) throw invalid(`invalid content-length ${JSON.stringify(value)}`);
    declared = Number(value.trim());
  }
  if (declared === undefined || body.stream) return declared;
  const length = body.bytes?.byteLength ?? 0;
  if (declared !== length) {
    throw invalid(`content-length ${declared} does not match the body, ${length} bytes`, {
      contentLength: String(declared),
    });
  }
  return declared;
}

/** An origin to prewarm: a URL (string or URL object: its origin, one socket), or the origin spelled out. */
export type PrewarmTarget = string | URL | { host: string; port: number; count?: number; https?: boolean };

/** What the runtime's prewarm takes: canonical hosts, counts, and whether TLS sessions would be relayed. */
export interface PrewarmOrigin {
  host: string;
  port: number;
  count: number;
  https: boolean;
}

/**
 * Checks prewarm's argument (one target or an array of them) and merges targets of the same origin (their counts
 * add up, to at most what one prewarm may ask for). Throws SOCKPOOL_ERR_INVALID_ARGUMENT naming the bad entry.
 */
export function validatePrewarm(input: unknown): PrewarmOrigin[] {
  const entries: unknown[] = Array.isArray(input) ? input : [input];
  const merged = new Map<string, PrewarmOrigin>();
  entries.forEach((entry, index) => {
    const what = Array.isArray(input) ? `prewarm: origins[${index}]: ` : 'prewarm: ';
    const origin = prewarmOrigin(entry, what);
    const key = `${originKey(origin)} ${origin.https}`;
    const known = merged.get(key);
    if (known) known.count = Math.min(MAX_PREWARM_COUNT, known.count + origin.count);
    else merged.set(key, origin);
  });
  return [...merged.values()];
}

function prewarmOrigin(entry: unknown, what: string): PrewarmOrigin {
  if (typeof entry === 'string' || entry instanceof URL) {
    const target = checkedTarget(entry, what);
    return { ...target.origin, count: 1, https: target.secure };
  }
  if (typeof entry !== 'object' || entry === null) {
    throw invalid(`${what}expected a URL string, a URL or { host, port, count?, https? }; got ${describe(entry)}`);
  }
  const { host, port, count = 1, https } = entry as Record<string, unknown>;
  if (typeof host !== 'string' || host === '') throw invalid(`${what}host must be a non-empty string`);
  if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw invalid(`${what}port must be an integer from 1 to 65535, got ${describe(port)}`);
  }
  if (typeof count !== 'number' || !Number.isInteger(count) || count < 1 || count > MAX_PREWARM_COUNT) {
    throw invalid(`${what}count must be an integer from 1 to ${MAX_PREWARM_COUNT}, got ${describe(count)}`);
  }
  if (https !== undefined && typeof https !== 'boolean') {
    throw invalid(`${what}https must be true or false, got ${describe(https)}`);
  }
  let canonical: { host: string; port: number };
  try {
    canonical = canonicalOrigin({ host, port });
  } catch (error) {
    throw invalid(`${what}${(error as Error).message}`);
  }
  return { host: canonical.host, port, count, https: https ?? port === 443 };
}

function describe(value: unknown): string {
  if (value === undefined) return 'undefined';
  if (typeof value === 'bigint' || typeof value === 'symbol' || typeof value === 'function') return String(value);
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return Object.prototype.toString.call(value);
  }
}
