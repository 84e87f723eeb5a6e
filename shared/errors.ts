// Every failure sockpool reports has a stable `code`; callers branch on the code, never on the message.
// Kernel failures keep Node's shape (`code: 'ECONNREFUSED'`, `syscall: 'connect'`) and pass through untouched;
// our own failures use the SOCKPOOL_ERR_* codes below (in the manner of undici's UND_ERR_*).
//
// Every SOCKPOOL_ERR_* code that is ever emitted is in `ErrorCodes` (test/errors.test.ts scans the sources, the
// addon's C++ included), and our errors are built only through `SockpoolError` (the addon builds its own, in C++,
// in Node's shape with these codes). A cause is kept as the standard `Error.cause`.
//
// Errors cross thread and process boundaries as plain objects ({ code, message, ...fields }): structured clone and
// JSON both drop the class. `toPlainError` flattens (a cause's code goes along as the field `causeCode`),
// `fromPlainError` rebuilds the class from the code.

export const ErrorCodes = {
  /** A message on the daemon socket was malformed, oversize, of an unknown type or version. */
  PROTOCOL: 'SOCKPOOL_ERR_PROTOCOL',
  /** A failure that has no code of its own (a bug): the message says what happened. */
  INTERNAL: 'SOCKPOOL_ERR_INTERNAL',
  /** The egress policy refused the destination (address class, CIDR list, port or host pattern). */
  POLICY: 'SOCKPOOL_ERR_POLICY',
  /** An acquire waited for a free slot (maxPerOrigin) longer than its deadline. */
  ACQUIRE_TIMEOUT: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT',
  /** A per-client limit (leases held, acquires pending) was reached. */
  LIMIT: 'SOCKPOOL_ERR_LIMIT',
  /** A per-uid quota (sessions, leases, pending acquires, lookups, prewarm demand) was reached. */
  QUOTA: 'SOCKPOOL_ERR_QUOTA',
  /**
   * The origin's rate limit (requestsPerSecond, burst) would have made the request wait past its deadline;
   * `waitMs`: how long it would have had to wait for a token.
   */
  RATE_LIMITED: 'SOCKPOOL_ERR_RATE_LIMITED',
  /** The fleet's Redis is unavailable and `fleet.onUnavailable` is "refuse": nothing that needs the fleet goes ahead. */
  FLEET_UNAVAILABLE: 'SOCKPOOL_ERR_FLEET_UNAVAILABLE',
  /** The daemon could not reach the origin (every resolved address failed). */
  CONNECT: 'SOCKPOOL_ERR_CONNECT',
  /** The daemon's TLS handshake with the origin failed; `reason`: expired, host-name-mismatch, unknown-ca, ... */
  TLS: 'SOCKPOOL_ERR_TLS',
  /** A configured proxy refused or botched the daemon's CONNECT (`status` carries its answer, when it gave one). */
  PROXY: 'SOCKPOOL_ERR_PROXY',
  /** The host name did not resolve. */
  DNS: 'SOCKPOOL_ERR_DNS',
  /** The daemon is not running or the link to it broke. */
  DAEMON_UNAVAILABLE: 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE',
  /** The daemon accepted a request and did not answer it in time (the link's request timeout). */
  DAEMON_TIMEOUT: 'SOCKPOOL_ERR_DAEMON_TIMEOUT',
  /** The daemon is stopping and answers no new requests. */
  SHUTTING_DOWN: 'SOCKPOOL_ERR_SHUTTING_DOWN',
  /** The peer's credentials are not in the allowed uid/gid lists. */
  ACCESS_DENIED: 'SOCKPOOL_ERR_ACCESS_DENIED',
  /** A caller passed a bad argument (URL, method, header value, option). */
  INVALID_ARGUMENT: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
  /** The configuration file or flags are invalid. */
  CONFIG: 'SOCKPOOL_ERR_CONFIG',
  /** libcurl failed the transfer; `curlCode` carries CURLcode. */
  TRANSFER: 'SOCKPOOL_ERR_TRANSFER',
  /** The request took longer than its timeout. */
  TIMEOUT: 'SOCKPOOL_ERR_TIMEOUT',
  /** The caller aborted the request through its AbortSignal (or cancelled a streamed response body). */
  ABORTED: 'SOCKPOOL_ERR_ABORTED',
  /** A streamed request body failed (the caller's stream threw) or yielded something other than bytes. */
  REQUEST_BODY: 'SOCKPOOL_ERR_REQUEST_BODY',
  /** A redirect could not be followed (fetch(), or `redirect` on request()/requestStream()): `redirect: 'error'`,
   *  too many, a Location that is not an http(s) URL or has credentials, or a request with a streamed body. */
  REDIRECT: 'SOCKPOOL_ERR_REDIRECT',
  /** The response body (decoded) is larger than the request's `maxBodyBytes`: the transfer was stopped there. */
  BODY_TOO_LARGE: 'SOCKPOOL_ERR_BODY_TOO_LARGE',
  /** The client was closed. */
  CLOSED: 'SOCKPOOL_ERR_CLOSED',
  /** The worker thread running the request died (crashed or was terminated); it has been replaced. */
  WORKER_EXITED: 'SOCKPOOL_ERR_WORKER_EXITED',
  /** No worker thread of the client could start (the message says why: a broken install, an addon that does not
   *  load); requests fail with it while no thread is running. */
  WORKER_START: 'SOCKPOOL_ERR_WORKER_START',
  /** A received control message was truncated: every fd it brought was closed. */
  FD_TRUNCATED: 'SOCKPOOL_ERR_FD_TRUNCATED',
  /** A received message was larger than the buffer: it was dropped, with its fds. */
  MSG_TRUNCATED: 'SOCKPOOL_ERR_MSG_TRUNCATED',
  /** The addon's close(): a Poller or PollSet of this thread still watches the fd (close or remove it first). */
  FD_POLLED: 'SOCKPOOL_ERR_FD_POLLED',
  /** The addon's Poller.start after Poller.close. */
  POLLER_CLOSED: 'SOCKPOOL_ERR_POLLER_CLOSED',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

const REGISTERED: ReadonlySet<string> = new Set(Object.values(ErrorCodes));

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && REGISTERED.has(code);
}

/** Extra fields an error may carry across a boundary. Only JSON-safe values; never the Error's own properties
 *  (a `cause` field would hide `Error.cause`: a cause's code goes as `causeCode`). */
export type ErrorFields = Record<string, string | number | boolean | null | undefined> & {
  [key in 'cause' | 'code' | 'message' | 'name' | 'stack' | 'fields']?: never;
};

const RESERVED_FIELDS: ReadonlySet<string> = new Set(['cause', 'code', 'message', 'name', 'stack', 'fields']);

export class SockpoolError extends Error {
  readonly code: ErrorCode;
  readonly fields: ErrorFields;

  constructor(code: ErrorCode, message: string, fields: ErrorFields = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SockpoolError';
    this.code = code;
    this.fields = fields;
    for (const [key, value] of Object.entries(fields)) {
      if (!RESERVED_FIELDS.has(key)) Object.defineProperty(this, key, { value, enumerable: true });
    }
  }
}

/** Plain, JSON- and clone-safe form of any error. `code`: a registered code or a kernel errno name. */
export interface PlainError {
  code: string;
  message: string;
  fields?: ErrorFields;
}

/** The code of an error's cause (an errno name such as ECONNREFUSED, or one of ours), if it has one. */
function causeCode(error: Error): string | undefined {
  const code = (error.cause as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' ? code : undefined;
}

export function toPlainError(error: unknown): PlainError {
  if (error instanceof SockpoolError) {
    const cause = causeCode(error);
    const fields =
      cause === undefined || 'causeCode' in error.fields ? error.fields : { ...error.fields, causeCode: cause };
    return { code: error.code, message: error.message, fields };
  }
  if (error instanceof Error) {
    const withCode = error as Error & { code?: unknown; syscall?: unknown; errno?: unknown };
    const fields: ErrorFields = {};
    if (typeof withCode.syscall === 'string') fields.syscall = withCode.syscall;
    if (typeof withCode.errno === 'number') fields.errno = withCode.errno;
    return {
      code: typeof withCode.code === 'string' ? withCode.code : ErrorCodes.INTERNAL,
      message: error.message,
      fields,
    };
  }
  return { code: ErrorCodes.INTERNAL, message: String(error) };
}

/**
 * Rebuilds an error from its plain form: a SockpoolError for a registered code (with a `causeCode` field, its
 * cause is an Error of that code again), otherwise an Error in Node's shape for a kernel failure
 * (`code: 'ECONNREFUSED'`, `syscall`, `errno`).
 */
export function fromPlainError(plain: PlainError): SockpoolError | (Error & { code: string }) {
  const fields = plain.fields ?? {};
  if (!isErrorCode(plain.code)) {
    return Object.assign(new Error(plain.message), fields, { code: plain.code });
  }
  const cause =
    typeof fields.causeCode === 'string'
      ? { cause: Object.assign(new Error(fields.causeCode), { code: fields.causeCode }) }
      : undefined;
  return new SockpoolError(plain.code, plain.message, fields, cause);
}
