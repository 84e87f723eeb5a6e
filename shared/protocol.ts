// The sockpoold wire protocol: one JSON object per SOCK_SEQPACKET message, UTF-8, at most MAX_MESSAGE_BYTES.
// A message may carry file descriptors (SCM_RIGHTS): `lease` (daemon → client) carries exactly one connected
// socket, `release` (client → daemon) carries back the one it never used. Every other message carries none.
// See docs/protocol.md for each message with its fields and defaults.
//
// Every request has an `id` (a non-negative integer chosen by the client) that its reply repeats; `release` and
// `closed` may leave it out and then get no reply (curl's close callback has nobody to wait for an answer).

import { z } from 'zod';
import { ErrorCodes, SockpoolError } from './errors.js';
import { PROXY_NAME } from './origin.js';

export const PROTOCOL_VERSION = 1;
/** Largest message either side sends or accepts; larger ones are a protocol error. */
export const MAX_MESSAGE_BYTES = 16 * 1024;
/** Most fds one message may carry. */
export const MAX_FDS_PER_MESSAGE = 1;
/** Sockets one prewarm may ask for. */
export const MAX_PREWARM_COUNT = 1000;

const requestId = z
  .number()
  .int()
  .min(0)
  .max(2 ** 31 - 1);
// RFC 1123 host names and IP literals (IPv6 without brackets); checked again by the egress policy.
const host = z
  .string()
  .min(1)
  .max(253)
  .regex(/^[A-Za-z0-9._:%-]+$/, 'host may contain only letters, digits and . _ : % -');
const port = z.number().int().min(1).max(65535);
const leaseId = z.number().int().min(1);
/** TLS trust: `system` (the system store) or the SHA-256 of a CA file's bytes, lower-case hex. */
const TLS_TRUST_PATTERN = /^(?:system|[0-9a-f]{64})$/;
/** The client speaks https to this origin and would verify the certificate against `trust`. */
const tlsRequest = z.strictObject({ trust: z.string().regex(TLS_TRUST_PATTERN, 'expected "system" or a SHA-256 hex') });
/** A proxy is named, never given: only the daemon's configuration says where proxies are. */
const proxyName = z.string().regex(PROXY_NAME, 'proxy must be the name of a proxy in the daemon configuration');

export const ClientMessage = z.discriminatedUnion('type', [
  z.strictObject({
    type: z.literal('hello'),
    id: requestId,
    version: z.number().int().min(1),
    client: z.string().max(200).optional(),
  }),
  z.strictObject({
    type: z.literal('acquire'),
    id: requestId,
    host,
    port,
    /** How long the client is willing to wait for a slot and a connection, in ms. */
    timeoutMs: z.number().int().min(1).max(600_000).optional(),
    /** A proxy of the daemon's configuration, by name: the lent socket is a CONNECT tunnel through it. */
    proxy: proxyName.optional(),
    /** https: the lease may be a warm TLS session relayed by the daemon, if it verifies as the client would. */
    tls: tlsRequest.optional(),
  }),
  z.strictObject({
    type: z.literal('prewarm'),
    id: requestId,
    host,
    port,
    count: z.number().int().min(1).max(MAX_PREWARM_COUNT),
    proxy: proxyName.optional(),
    tls: tlsRequest.optional(),
  }),
  /** An operator's warming of any origin (`sockpool warm`): admin uids only, not counted as demand. */
  z.strictObject({
    type: z.literal('warm'),
    id: requestId,
    host,
    port,
    count: z.number().int().min(1).max(1000),
    proxy: proxyName.optional(),
    tls: tlsRequest.optional(),
  }),
  z.strictObject({ type: z.literal('release'), id: requestId.optional(), leaseId }),
  z.strictObject({ type: z.literal('closed'), id: requestId.optional(), leaseId }),
  z.strictObject({ type: z.literal('stats'), id: requestId }),
]);
export type ClientMessage = z.infer<typeof ClientMessage>;

export interface HelloReply {
  type: 'hello';
  id: number;
  version: number;
  server: 'sockpoold';
  serverVersion: string;
  maxMessageBytes: number;
}

/** Reply to `acquire`; the message carries the connected socket as its one fd. */
export interface LeaseReply {
  type: 'lease';
  id: number;
  leaseId: number;
  host: string;
  port: number;
  /** The peer address the socket is connected to (curl is pinned to it). */
  address: string;
  family: 4 | 6;
  /** True when the socket was already idle in the pool; false when it was connected for this acquire. */
  warm: boolean;
  /** Time the daemon spent connecting this socket (0 when warm and measured earlier). */
  connectMs: number;
  /**
   * Present when the fd is not the origin's TCP socket but one end of a loopback TCP connection over which the daemon relays
   * plaintext to and from a TLS session it completed (and verified) itself: speak plain HTTP over it.
   */
  tls?: LeaseTls;
}

/** What the daemon's handshake negotiated for a relayed lease. */
export interface LeaseTls {
  /** 'TLSv1.3' or 'TLSv1.2'. */
  version: string;
  /** 'h2' (speak HTTP/2 with prior knowledge) or 'http/1.1'. */
  alpn: string;
  cipher: string;
  /** SHA-256 of the verified leaf certificate (DER), lower-case hex. */
  certSha256: string;
}

export interface OkReply {
  type: 'ok';
  id: number;
}

export interface StatsReply {
  type: 'stats';
  id: number;
  stats: Record<string, unknown>;
}

export interface ErrorReply {
  type: 'error';
  /** The request's id, or null when the message was too broken to have one. */
  id: number | null;
  code: string;
  message: string;
  fields?: Record<string, string | number | boolean | null>;
}

export type DaemonMessage = HelloReply | LeaseReply | OkReply | StatsReply | ErrorReply;

const decoder = new TextDecoder('utf-8', { fatal: true });

export function encodeMessage(message: ClientMessage | DaemonMessage): Buffer {
  const bytes = Buffer.from(JSON.stringify(message), 'utf8');
  if (bytes.length > MAX_MESSAGE_BYTES) {
    throw new SockpoolError(ErrorCodes.PROTOCOL, `message of ${bytes.length} bytes exceeds ${MAX_MESSAGE_BYTES}`);
  }
  return bytes;
}

function parseJson(data: Uint8Array): unknown {
  if (data.length > MAX_MESSAGE_BYTES) {
    throw new SockpoolError(ErrorCodes.PROTOCOL, `message of ${data.length} bytes exceeds ${MAX_MESSAGE_BYTES}`);
  }
  try {
    return JSON.parse(decoder.decode(data));
  } catch (error) {
    throw new SockpoolError(ErrorCodes.PROTOCOL, `message is not UTF-8 JSON: ${(error as Error).message}`);
  }
}

/** Id of a request that failed validation, when one can be read, so the error reply can name it. */
export function salvageRequestId(data: Uint8Array): number | null {
  try {
    const value = JSON.parse(Buffer.from(data).toString('utf8')) as { id?: unknown };
    const parsed = requestId.safeParse(value?.id);
    return parsed.success ? parsed.data : null;
  } catch {
    return null;
  }
}

const HOST_PATTERN = /^[A-Za-z0-9._:%-]{1,253}$/;
const isInt = (value: unknown, min: number, max: number): value is number =>
  typeof value === 'number' && Number.isInteger(value) && value >= min && value <= max;

function isTlsRequest(value: unknown): boolean {
  if (typeof value !== 'object' || value === null) return false;
  const { trust, ...rest } = value as Record<string, unknown>;
  return typeof trust === 'string' && TLS_TRUST_PATTERN.test(trust) && Object.keys(rest).length === 0;
}

/**
 * The handoff path's messages (acquire, release, closed) checked by hand: exactly what the schema accepts, at a
 * fraction of zod's cost. Anything that does not pass goes through zod, which names the bad field.
 */
function fastPath(value: unknown): ClientMessage | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const message = value as Record<string, unknown>;
  const keys = Object.keys(message);
  const id = message.id;
  const idOk = isInt(id, 0, 2 ** 31 - 1);
  switch (message.type) {
    case 'acquire': {
      const { host, port, timeoutMs, tls } = message;
      const size = 4 + (timeoutMs === undefined ? 0 : 1) + (tls === undefined ? 0 : 1);
      if (keys.length !== size || !idOk || typeof host !== 'string' || !HOST_PATTERN.test(host)) return undefined;
      if (!isInt(port, 1, 65535) || (timeoutMs !== undefined && !isInt(timeoutMs, 1, 600_000))) return undefined;
      if (tls !== undefined && !isTlsRequest(tls)) return undefined;
      return message as ClientMessage;
    }
    case 'release':
    case 'closed': {
      const size = id === undefined ? 2 : 3;
      if (keys.length !== size || (id !== undefined && !idOk)) return undefined;
      if (!isInt(message.leaseId, 1, Number.MAX_SAFE_INTEGER)) return undefined;
      return message as ClientMessage;
    }
    default:
      return undefined;
  }
}

/** Validates a client message; throws SOCKPOOL_ERR_PROTOCOL naming the first bad field. */
export function decodeClientMessage(data: Uint8Array): ClientMessage {
  const value = parseJson(data);
  const fast = fastPath(value);
  if (fast) return fast;
  const parsed = ClientMessage.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue && issue.path.length > 0 ? issue.path.join('.') : 'message';
    throw new SockpoolError(ErrorCodes.PROTOCOL, `invalid ${where}: ${issue?.message ?? 'invalid message'}`);
  }
  return parsed.data;
}

/** Daemon messages are trusted less strictly (the daemon is ours), but still checked for shape. */
export function decodeDaemonMessage(data: Uint8Array): DaemonMessage {
  const value = parseJson(data) as Partial<DaemonMessage> | null;
  if (
    value === null ||
    typeof value !== 'object' ||
    typeof value.type !== 'string' ||
    !['hello', 'lease', 'ok', 'stats', 'error'].includes(value.type)
  ) {
    throw new SockpoolError(ErrorCodes.PROTOCOL, 'daemon sent a message of unknown shape');
  }
  return value as DaemonMessage;
}

/** Which client messages must carry exactly one fd. */
export function expectedFds(type: ClientMessage['type']): number {
  return type === 'release' ? 1 : 0;
}
