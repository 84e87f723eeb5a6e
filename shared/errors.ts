// Every failure sockpool reports has a stable `code`; callers branch on the code, never on the message.
// Kernel failures keep Node's shape (`code: 'ECONNREFUSED'`, `syscall: 'connect'`) and pass through untouched;
// our own failures use the SOCKPOOL_ERR_* codes below (in the manner of undici's UND_ERR_*).
//
// Errors cross thread and process boundaries as plain objects ({ code, message, ...fields }): structured clone and
// JSON both drop the class. `toPlainError` flattens, `fromPlainError` rebuilds the class from the code.

export const ErrorCodes = {
  /** A message on the daemon socket was malformed, oversize, of an unknown type or version. */
  PROTOCOL: 'SOCKPOOL_ERR_PROTOCOL',
  /** The egress policy refused the destination (address class, CIDR list, port or host pattern). */
  POLICY: 'SOCKPOOL_ERR_POLICY',
  /** An acquire waited for a free slot (maxPerOrigin) longer than its deadline. */
  ACQUIRE_TIMEOUT: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT',
  /** A per-client limit (leases held, acquires pending) was reached. */
  LIMIT: 'SOCKPOOL_ERR_LIMIT',
  /** The daemon could not reach the origin (every resolved address failed). */
  CONNECT: 'SOCKPOOL_ERR_CONNECT',
  /** The daemon's TLS handshake with the origin failed; `reason`: expired, host-name-mismatch, unknown-ca, ... */
  TLS: 'SOCKPOOL_ERR_TLS',
  /** The host name did not resolve. */
  DNS: 'SOCKPOOL_ERR_DNS',
  /** The daemon is not running or the link to it broke. */
  DAEMON_UNAVAILABLE: 'SOCKPOOL_ERR_DAEMON_UNAVAILABLE',
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
  /** The client was closed. */
  CLOSED: 'SOCKPOOL_ERR_CLOSED',
  /** The worker thread running the request died (crashed or was terminated); it has been replaced. */
  WORKER_EXITED: 'SOCKPOOL_ERR_WORKER_EXITED',
  /** A received control message was truncated: every fd it brought was closed. */
  FD_TRUNCATED: 'SOCKPOOL_ERR_FD_TRUNCATED',
  /** A received message was larger than the buffer: it was dropped, with its fds. */
  MSG_TRUNCATED: 'SOCKPOOL_ERR_MSG_TRUNCATED',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** Extra fields an error may carry across a boundary. Only JSON-safe values. */
export type ErrorFields = Record<string, string | number | boolean | null | undefined>;

export class SockpoolError extends Error {
  readonly code: string;
  readonly fields: ErrorFields;

  constructor(code: string, message: string, fields: ErrorFields = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SockpoolError';
    this.code = code;
    this.fields = fields;
    Object.assign(this, fields);
  }
}

/** Plain, JSON- and clone-safe form of any error. */
export interface PlainError {
  code: string;
  message: string;
  fields?: ErrorFields;
}

export function toPlainError(error: unknown): PlainError {
  if (error instanceof SockpoolError) {
    return { code: error.code, message: error.message, fields: error.fields };
  }
  if (error instanceof Error) {
    const withCode = error as Error & { code?: unknown; syscall?: unknown; errno?: unknown };
    const fields: ErrorFields = {};
    if (typeof withCode.syscall === 'string') fields.syscall = withCode.syscall;
    if (typeof withCode.errno === 'number') fields.errno = withCode.errno;
    return {
      code: typeof withCode.code === 'string' ? withCode.code : 'SOCKPOOL_ERR_INTERNAL',
      message: error.message,
      fields,
    };
  }
  return { code: 'SOCKPOOL_ERR_INTERNAL', message: String(error) };
}

export function fromPlainError(plain: PlainError): SockpoolError {
  return new SockpoolError(plain.code, plain.message, plain.fields ?? {});
}

export function isErrorWithCode(error: unknown): error is Error & { code: string } {
  return error instanceof Error && typeof (error as { code?: unknown }).code === 'string';
}
