// The sockpoold wire protocol: one JSON object per SOCK_SEQPACKET message, UTF-8, at most MAX_MESSAGE_BYTES.
// A message may carry file descriptors (SCM_RIGHTS): `lease` (daemon → client) carries exactly one connected
// socket, `release` (client → daemon) carries back the one it never used, unless it says `withoutFd` (binary
// framing 2: the client closes its copy itself). Every other message carries none.
// See docs/protocol.md for each message with its fields and defaults.
//
// Every request has an `id` (a non-negative integer chosen by the client) that its reply repeats; `release` and
// `closed` may leave it out and then get no reply (curl's close callback has nobody to wait for an answer).
//
// Binary framing (negotiated in `hello`: the client asks with `binary: N`, the daemon answers the highest version
// both speak): the hot messages (acquire, release, closed; lease and ok) may then travel as compact binary frames
// beside JSON for the rest. Version 2 adds the release without an fd (`withoutFd`); version 3 the bundle, several
// fd-less client frames in one packet (encodeBundle/decodeClientBundle), so that a release and the next acquire cost
// the daemon one read. A JSON message starts with `{`; a binary frame with its type byte (FrameType), never `{`.
// Layouts and checks are below (encodeFrame, decodeClientFrame, decodeDaemonFrame) and in docs/protocol.md.

import { Buffer } from 'node:buffer';
import { z } from 'zod';
import { ErrorCodes, SockpoolError } from './errors.js';
import { PROXY_NAME } from './origin.js';

export const PROTOCOL_VERSION = 1;
/** The binary framing this side speaks (hello's `binary`); 2: version 1 plus the release without an fd; 3: bundles. */
export const BINARY_FRAMING = 3;
/** The first binary framing version whose `release` may leave its fd out (`withoutFd`). */
export const RELEASE_WITHOUT_FD = 2;
/** The first binary framing version that takes a bundle: several fd-less client frames in one packet. */
export const BUNDLES = 3;
/** Most frames one bundle may hold. */
export const MAX_BUNDLED_FRAMES = 16;
/** Largest message either side sends or accepts; larger ones are a protocol error. */
export const MAX_MESSAGE_BYTES = 16 * 1024;
/** Most fds one message may carry. */
export const MAX_FDS_PER_MESSAGE = 1;
/** Sockets one prewarm may ask for. */
export const MAX_PREWARM_COUNT = 1000;
/** The longest wait an acquire or a `tokens` request may ask the daemon for (`timeoutMs`), in ms. */
export const MAX_TIMEOUT_MS = 600_000;

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
    /** The client speaks binary framing of this version and would like the daemon to use it too. */
    binary: z.number().int().min(1).optional(),
    /** The client takes `reclaim` notices (unasked messages, see ReclaimNotice); without it none is sent. */
    reclaim: z.literal(true).optional(),
  }),
  z.strictObject({
    type: z.literal('acquire'),
    id: requestId,
    host,
    port,
    /** How long the client is willing to wait for a slot and a connection, in ms. */
    timeoutMs: z.number().int().min(1).max(MAX_TIMEOUT_MS).optional(),
    /** A proxy of the daemon's configuration, by name: the lent socket is a CONNECT tunnel through it. */
    proxy: proxyName.optional(),
    /** https: the lease may be a warm TLS session relayed by the daemon, if it verifies as the client would. */
    tls: tlsRequest.optional(),
    /** The request this socket is for took its token of a rate-limited origin already (`tokens`): none is charged. */
    tokenTaken: z.literal(true).optional(),
  }),
  z.strictObject({
    type: z.literal('prewarm'),
    id: requestId,
    host,
    port,
    count: z.number().int().min(1).max(MAX_PREWARM_COUNT),
    proxy: proxyName.optional(),
    tls: tlsRequest.optional(),
    /**
     * The client's queue guessing from its waiting requests, not the caller announcing: where an origin's policy
     * says `warmTlsOnMiss = "tcp"`, the daemon warms TCP sockets for it rather than TLS sessions.
     */
    lookahead: z.literal(true).optional(),
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
  z.strictObject({
    type: z.literal('tokens'),
    id: requestId,
    host,
    port,
    /** Request tokens wanted of a rate-limited origin (the daemon grants 1 to count, or refuses). */
    count: z.number().int().min(1).max(1000),
    /** How long the client is willing to wait for the first token, in ms. */
    timeoutMs: z.number().int().min(1).max(MAX_TIMEOUT_MS).optional(),
  }),
  z.strictObject({
    type: z.literal('release'),
    id: requestId.optional(),
    leaseId,
    /**
     * No fd comes back: the client closes its copy itself (binary framing 2). The daemon checks its own copy of
     * the socket either way; the fd that came back only ever proved the client had had it, which the lease does.
     */
    withoutFd: z.literal(true).optional(),
  }),
  z.strictObject({ type: z.literal('closed'), id: requestId.optional(), leaseId }),
  /**
   * The client no longer waits for the acquire with this id: the daemon drops it (no reply; see HelloReply.cancel).
   * It may name a waiting `tokens` request too: dropped, and answered (SOCKPOOL_ERR_ABORTED, or the tokens granted).
   */
  z.strictObject({ type: z.literal('cancel'), acquireId: requestId }),
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
  /** Present when the daemon agreed to binary framing (the version both speak). */
  binary?: number;
  /** The daemon takes `cancel` for a pending acquire or `tokens` request (a client sends it only when this is true). */
  cancel?: true;
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
  /**
   * Present when the origin is rate-limited (`requestsPerSecond`): from then on this connection's client takes a
   * token (`tokens`) before each request to it, and says so in its acquires (`tokenTaken`).
   */
  rate?: { requestsPerSecond: number; burst: number };
  /** Present when the daemon charged this acquire its token (see `tokenTaken`): how long it waited for it (ms). */
  tokenWaitMs?: number;
  /** Present when this acquire waited while the origin was at its cap (maxPerOrigin, a fleet slot): how long (ms). */
  capWaitMs?: number;
}

/** Reply to `tokens`: how many the client may spend (at least 1). */
export interface TokensReply {
  type: 'tokens';
  id: number;
  granted: number;
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
  /** A `warm`'s answer: what the daemon warms (an https origin gets TCP where the daemon keeps no TLS sessions). */
  warming?: 'tls' | 'tcp';
  /** A `prewarm`'s or `warm`'s answer: how many of `count` the daemon connects (what the idle pool can keep). */
  granted?: number;
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

/**
 * Unasked (`id` null), only to a client whose hello said `reclaim: true`: acquires wait for a connection to an origin
 * at its cap (`maxPerOrigin`, or a fleet slot) while this client holds these leases of it. The client ends those
 * whose connections sit idle in its cache (nothing runs over them): it shuts its copy down and sends `closed`. A
 * client that did not ask gets none; the waiters then wait until it closes its connections itself.
 */
export interface ReclaimNotice {
  type: 'reclaim';
  id: null;
  leaseIds: number[];
}

export type DaemonMessage = HelloReply | LeaseReply | OkReply | StatsReply | TokensReply | ErrorReply | ReclaimNotice;

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
  if (isBinaryFrame(data)) {
    // acquire always has one; release and closed when their flags say so.
    // (A bundle's requests are answered one by one; a bundle that cannot be read has no one id.)
    if (data[0] === FrameType.bundle) return null;
    if (data.length < 6 || (data[0] !== FrameType.acquire && (data[1]! & HAS_ID) === 0)) return null;
    const id = Buffer.from(data.buffer, data.byteOffset, data.length).readUInt32LE(2);
    return id <= MAX_REQUEST_ID ? id : null;
  }
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
      if (!isInt(port, 1, 65535) || (timeoutMs !== undefined && !isInt(timeoutMs, 1, MAX_TIMEOUT_MS))) return undefined;
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

/**
 * Validates a client message (JSON, or a binary frame when `binary` framing was negotiated); throws
 * SOCKPOOL_ERR_PROTOCOL naming the first bad field.
 */
export function decodeClientMessage(data: Uint8Array, binary = false): ClientMessage {
  if (isBinaryFrame(data)) {
    if (!binary) {
      throw new SockpoolError(
        ErrorCodes.PROTOCOL,
        'binary frame on a connection that did not negotiate binary framing',
      );
    }
    if (data[0] === FrameType.bundle)
      throw frameError('bundle', 'a bundle holds several messages (decodeClientBundle)');
    return decodeClientFrame(Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.length));
  }
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
  if (isBinaryFrame(data)) {
    return decodeDaemonFrame(Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.length));
  }
  const value = parseJson(data) as Partial<DaemonMessage> | null;
  if (
    value === null ||
    typeof value !== 'object' ||
    typeof value.type !== 'string' ||
    !['hello', 'lease', 'ok', 'stats', 'tokens', 'error', 'reclaim'].includes(value.type)
  ) {
    throw new SockpoolError(ErrorCodes.PROTOCOL, 'daemon sent a message of unknown shape');
  }
  return value as DaemonMessage;
}

// ---------------------------------------------------------------------------------------------------------------
// Binary framing. All integers little-endian; strings are ASCII with a one-byte length (hosts, addresses and
// trust values are ASCII by the schema). Each frame has an exact length: anything else is a protocol error.

/** The first byte of a binary frame. */
export const FrameType = { acquire: 0x01, release: 0x02, closed: 0x03, bundle: 0x04, lease: 0x81, ok: 0x82 } as const;
const FRAME_TYPES = new Set<number>(Object.values(FrameType));
const JSON_START = 0x7b; // '{'
const MAX_REQUEST_ID = 2 ** 31 - 1;
/** acquire flags */
const HAS_TIMEOUT = 1;
const HAS_TLS = 2;
/** release/closed flags */
const HAS_ID = 1;
/** release only: no fd comes with it (binary framing 2) */
const WITHOUT_FD = 2;
/** lease flags */
const WARM = 1;
const FAMILY_6 = 2;

/** True when `data` is a binary frame (not JSON). */
export function isBinaryFrame(data: Uint8Array): boolean {
  return data.length > 0 && data[0] !== JSON_START && FRAME_TYPES.has(data[0]!);
}

function frameError(type: string, why: string): SockpoolError {
  return new SockpoolError(ErrorCodes.PROTOCOL, `invalid binary ${type} frame: ${why}`);
}

/** The length of a text field of a binary frame: printable ASCII, at most `max` characters. */
function asciiLength(value: string, what: string, max = 255): number {
  let printable = value.length <= max;
  for (let i = 0; printable && i < value.length; i++) {
    const c = value.charCodeAt(i);
    printable = c >= 0x20 && c <= 0x7e;
  }
  if (!printable) throw new SockpoolError(ErrorCodes.PROTOCOL, `${what} cannot go in a binary frame`);
  return value.length;
}

/**
 * Writes `value`, checked by asciiLength(), at `offset`. (A character loop here and there: a regular expression and
 * Buffer's latin1 write were two calls per field on every lease the daemon sends.)
 */
function writeAscii(frame: Buffer, offset: number, value: string): void {
  for (let i = 0; i < value.length; i++) frame[offset + i] = value.charCodeAt(i);
}

/**
 * The end of a lease frame, its host and its address each with its length byte, for the last host and address a lease
 * went out with: the daemon lends the sockets of the same few origins again and again, and their text is checked and
 * written once, not per lease.
 */
const lastLeaseTail = { host: '', address: '', bytes: Buffer.alloc(0) };

function leaseTail(host: string, address: string): Buffer {
  if (host === lastLeaseTail.host && address === lastLeaseTail.address && lastLeaseTail.bytes.length > 0) {
    return lastLeaseTail.bytes;
  }
  const hostLength = asciiLength(host, 'host');
  const addressLength = asciiLength(address, 'address');
  const bytes = Buffer.alloc(2 + hostLength + addressLength);
  bytes[0] = hostLength;
  writeAscii(bytes, 1, host);
  bytes[1 + hostLength] = addressLength;
  writeAscii(bytes, 2 + hostLength, address);
  lastLeaseTail.host = host;
  lastLeaseTail.address = address;
  lastLeaseTail.bytes = bytes;
  return bytes;
}

/**
 * A message as a binary frame, or undefined when it has no binary form (acquire through a proxy or with `tokenTaken`,
 * a relayed TLS lease or one with `rate`, every other type): send it as JSON then.
 */
export function encodeFrame(message: ClientMessage | DaemonMessage): Buffer | undefined {
  switch (message.type) {
    case 'acquire': {
      if ('proxy' in message && message.proxy !== undefined) return undefined;
      // A rate-limited origin's acquire says its token was taken: JSON (rare beside the hot path's plain acquires).
      if ('tokenTaken' in message && message.tokenTaken !== undefined) return undefined;
      const host = asciiLength(message.host, 'host');
      const trust = message.tls ? asciiLength(message.tls.trust, 'tls.trust') : 0;
      const frame = Buffer.allocUnsafe(13 + host + (message.tls ? 1 + trust : 0));
      frame[0] = FrameType.acquire;
      frame[1] = (message.timeoutMs !== undefined ? HAS_TIMEOUT : 0) | (message.tls ? HAS_TLS : 0);
      frame.writeUInt32LE(message.id, 2);
      frame.writeUInt16LE(message.port, 6);
      frame.writeUInt32LE(message.timeoutMs ?? 0, 8);
      frame[12] = host;
      writeAscii(frame, 13, message.host);
      if (message.tls) {
        frame[13 + host] = trust;
        writeAscii(frame, 14 + host, message.tls.trust);
      }
      return frame;
    }
    case 'release':
    case 'closed': {
      const frame = Buffer.allocUnsafe(14);
      frame[0] = message.type === 'release' ? FrameType.release : FrameType.closed;
      frame[1] =
        (message.id !== undefined ? HAS_ID : 0) | ('withoutFd' in message && message.withoutFd ? WITHOUT_FD : 0);
      frame.writeUInt32LE(message.id ?? 0, 2);
      frame.writeDoubleLE(message.leaseId, 6);
      return frame;
    }
    case 'lease': {
      // A relayed TLS lease, or one of a rate-limited origin (its `rate`): JSON.
      // (So is one that waited at a cap or for a token: it says how long.)
      if (message.tls || message.rate || message.tokenWaitMs !== undefined || message.capWaitMs !== undefined) {
        return undefined;
      }
      const tail = leaseTail(message.host, message.address);
      const frame = Buffer.allocUnsafe(24 + tail.length);
      frame[0] = FrameType.lease;
      frame[1] = (message.warm ? WARM : 0) | (message.family === 6 ? FAMILY_6 : 0);
      frame.writeUInt32LE(message.id, 2);
      frame.writeDoubleLE(message.leaseId, 6);
      frame.writeUInt16LE(message.port, 14);
      frame.writeDoubleLE(message.connectMs, 16);
      frame.set(tail, 24);
      return frame;
    }
    case 'ok': {
      // A warm's or prewarm's answer: JSON (the frame has no room for `warming` or `granted`).
      if (message.warming !== undefined || message.granted !== undefined) return undefined;
      const frame = Buffer.allocUnsafe(5);
      frame[0] = FrameType.ok;
      frame.writeUInt32LE(message.id, 1);
      return frame;
    }
    default:
      return undefined;
  }
}

/** encodeFrame when binary framing was negotiated and the message has a binary form; JSON otherwise. */
export function encodeFor(binary: boolean, message: ClientMessage | DaemonMessage): Buffer {
  return (binary ? encodeFrame(message) : undefined) ?? encodeMessage(message);
}

function readId(frame: Buffer, offset: number, type: string): number {
  const id = frame.readUInt32LE(offset);
  if (id > MAX_REQUEST_ID) throw frameError(type, `id ${id} is over ${MAX_REQUEST_ID}`);
  return id;
}

function readLeaseId(frame: Buffer, offset: number, type: string): number {
  const leaseId = frame.readDoubleLE(offset);
  if (!Number.isSafeInteger(leaseId) || leaseId < 1) throw frameError(type, 'leaseId must be a positive integer');
  return leaseId;
}

/**
 * The host an acquire frame decoded last: its bytes (a copy: a frame may be a view into a receive buffer used again)
 * and its string. A client asks for the same few origins again and again, so the next acquire's host is mostly this
 * one, and the same string goes on: no new string, nor its hash computed again at each Map it keys on the way
 * (canonical hosts, pools, stats, history).
 */
const lastHost = { bytes: Buffer.alloc(255), length: -1, value: '' };

/** The host of an acquire frame at [start, end), checked against HOST_PATTERN (once for a host seen last). */
function hostOfFrame(frame: Buffer, start: number, end: number): string {
  const length = end - start;
  if (length === lastHost.length) {
    const known = lastHost.bytes;
    let i = 0;
    while (i < length && frame[start + i] === known[i]) i++;
    if (i === length) return lastHost.value;
  }
  const host = frame.toString('latin1', start, end);
  if (!HOST_PATTERN.test(host)) throw frameError('acquire', 'host may contain only letters, digits and . _ : % -');
  frame.copy(lastHost.bytes, 0, start, end);
  lastHost.length = length;
  lastHost.value = host;
  return host;
}

/**
 * The client frame at [start, end) of `data`, checked as strictly as the JSON schema checks the same message. (In
 * place: a bundle's frames are read where they lie, with no view made for each.)
 */
function decodeClientFrame(data: Buffer, start = 0, end = data.length): ClientMessage {
  const length = end - start;
  switch (data[start]) {
    case FrameType.acquire: {
      if (length < 13) throw frameError('acquire', `${length} bytes is too short`);
      const flags = data[start + 1]!;
      if ((flags & ~(HAS_TIMEOUT | HAS_TLS)) !== 0) throw frameError('acquire', `unknown flags ${flags}`);
      const hostLength = data[start + 12]!;
      const trustAt = 13 + hostLength;
      const trustLength = flags & HAS_TLS && trustAt < length ? data[start + trustAt] : undefined;
      const expected = trustAt + (trustLength === undefined ? 0 : 1 + trustLength);
      if (length !== expected || (flags & HAS_TLS && length <= trustAt)) {
        throw frameError('acquire', `length ${length} does not match its fields`);
      }
      const id = readId(data, start + 2, 'acquire');
      const port = data.readUInt16LE(start + 6);
      if (port < 1) throw frameError('acquire', 'port must be 1-65535');
      const timeoutMs = data.readUInt32LE(start + 8);
      if (flags & HAS_TIMEOUT ? timeoutMs < 1 || timeoutMs > MAX_TIMEOUT_MS : timeoutMs !== 0) {
        throw frameError('acquire', 'timeoutMs must be 1-600000 when present, 0 when absent');
      }
      const host = hostOfFrame(data, start + 13, start + trustAt);
      const message: Extract<ClientMessage, { type: 'acquire' }> = { type: 'acquire', id, host, port };
      if (flags & HAS_TIMEOUT) message.timeoutMs = timeoutMs;
      if (trustLength !== undefined) {
        const trust = data.toString('latin1', start + trustAt + 1, start + expected);
        if (!TLS_TRUST_PATTERN.test(trust)) throw frameError('acquire', 'tls.trust must be "system" or a SHA-256 hex');
        message.tls = { trust };
      }
      return message;
    }
    case FrameType.release:
    case FrameType.closed: {
      const type = data[start] === FrameType.release ? 'release' : 'closed';
      if (length !== 14) throw frameError(type, `length ${length}, expected 14`);
      const flags = data[start + 1]!;
      const known = type === 'release' ? HAS_ID | WITHOUT_FD : HAS_ID;
      if ((flags & ~known) !== 0) throw frameError(type, `unknown flags ${flags}`);
      const id = readId(data, start + 2, type);
      if (!(flags & HAS_ID) && id !== 0) throw frameError(type, 'id must be 0 when absent');
      const leaseId = readLeaseId(data, start + 6, type);
      const message: Extract<ClientMessage, { type: 'release' | 'closed' }> =
        flags & HAS_ID ? { type, id, leaseId } : { type, leaseId };
      if (flags & WITHOUT_FD) (message as Extract<ClientMessage, { type: 'release' }>).withoutFd = true;
      return message;
    }
    default:
      throw new SockpoolError(ErrorCodes.PROTOCOL, `binary frame type 0x${data[start]!.toString(16)} is not a request`);
  }
}

/**
 * Several client frames in one packet (binary framing 3): `frames` are encodeFrame's acquire, fd-less release and
 * closed frames, at most MAX_BUNDLED_FRAMES. Layout: type byte, count u8, then per frame its length u16 and itself.
 */
export function encodeBundle(frames: readonly Buffer[]): Buffer {
  if (frames.length < 1 || frames.length > MAX_BUNDLED_FRAMES) {
    throw new RangeError(`a bundle holds 1-${MAX_BUNDLED_FRAMES} frames, not ${frames.length}`);
  }
  let length = 2;
  for (const frame of frames) length += 2 + frame.length;
  const bundle = Buffer.allocUnsafe(length);
  bundle[0] = FrameType.bundle;
  bundle[1] = frames.length;
  let at = 2;
  for (const frame of frames) {
    bundle.writeUInt16LE(frame.length, at);
    frame.copy(bundle, at + 2);
    at += 2 + frame.length;
  }
  return bundle;
}

/**
 * The requests of a bundle, in order, each checked as its own frame would be; any fault (a count or length that does
 * not add up, a frame that is no acquire, fd-less release or closed) refuses the whole bundle, so that none of it
 * takes effect. A bundle carries no fd.
 */
export function decodeClientBundle(data: Uint8Array): ClientMessage[] {
  const bundle = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.length);
  if (bundle.length < 2 || bundle[0] !== FrameType.bundle) throw frameError('bundle', 'not a bundle');
  const count = bundle[1]!;
  if (count < 1 || count > MAX_BUNDLED_FRAMES)
    throw frameError('bundle', `holds 1-${MAX_BUNDLED_FRAMES} frames, not ${count}`);
  const messages: ClientMessage[] = [];
  let at = 2;
  for (let i = 0; i < count; i++) {
    if (at + 2 > bundle.length) throw frameError('bundle', `frame ${i + 1} of ${count} is missing`);
    const length = bundle.readUInt16LE(at);
    const end = at + 2 + length;
    if (length < 1 || end > bundle.length) throw frameError('bundle', `frame ${i + 1} of ${count} overruns the bundle`);
    const type = bundle[at + 2]!;
    if (type !== FrameType.acquire && type !== FrameType.release && type !== FrameType.closed) {
      throw frameError('bundle', `frame ${i + 1} of ${count} (type 0x${type.toString(16)}) cannot be bundled`);
    }
    const message = decodeClientFrame(bundle, at + 2, end);
    if (expectedFds(message) !== 0) throw frameError('bundle', `frame ${i + 1} of ${count} is a release with its fd`);
    messages.push(message);
    at = end;
  }
  if (at !== bundle.length) throw frameError('bundle', `${bundle.length - at} bytes after its ${count} frames`);
  return messages;
}

function decodeDaemonFrame(frame: Buffer): DaemonMessage {
  if (frame[0] === FrameType.ok && frame.length === 5) return { type: 'ok', id: frame.readUInt32LE(1) };
  if (frame[0] === FrameType.lease && frame.length >= 26) {
    const hostLength = frame[24]!;
    const addressAt = 25 + hostLength;
    if (frame.length > addressAt && frame.length === addressAt + 1 + frame[addressAt]!) {
      return {
        type: 'lease',
        id: frame.readUInt32LE(2),
        leaseId: frame.readDoubleLE(6),
        port: frame.readUInt16LE(14),
        connectMs: frame.readDoubleLE(16),
        host: frame.toString('latin1', 25, addressAt),
        address: frame.toString('latin1', addressAt + 1, frame.length),
        family: frame[1]! & FAMILY_6 ? 6 : 4,
        warm: (frame[1]! & WARM) !== 0,
      };
    }
  }
  throw new SockpoolError(ErrorCodes.PROTOCOL, 'daemon sent a binary frame of unknown shape');
}

/** How many fds a client message must carry: one for a release (unless `withoutFd`), none for the others. */
export function expectedFds(message: ClientMessage): number {
  return message.type === 'release' && message.withoutFd !== true ? 1 : 0;
}
