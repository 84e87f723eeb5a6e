// The sd_notify(3) protocol, exactly: one datagram of newline-separated `KEY=VALUE` assignments to the AF_UNIX socket
// named by $NOTIFY_SOCKET (a file system path, or `@name` for the abstract namespace), with the fds of an FDSTORE=1
// message attached as SCM_RIGHTS. Nothing here keeps the event loop alive, and every method is a no-op when
// $NOTIFY_SOCKET is unset (the daemon was not started by systemd).
//
// Transport: plain messages go through the npm package unix-dgram (one socket per message, as the reference
// sd_notify() does: unix-dgram's socket holds a ref'd libuv poll handle until closed, so a long-lived one would keep
// the process alive). unix-dgram cannot carry fds, cannot address the abstract namespace (it copies the path with
// strncpy, which stops at the leading NUL) and binds to the main thread's loop; for those cases the datagram goes
// through our addon (`sendDatagram`), which can do all three.
//
// The watchdog is driven by the event loop on purpose: a timer sends WATCHDOG=1 every WATCHDOG_USEC/2, so a loop that
// stalls stops the pings and systemd kills and restarts the daemon.

import { Buffer } from 'node:buffer';
import { createRequire } from 'node:module';
import process from 'node:process';
import { getSystemErrorName } from 'node:util';
import { isMainThread } from 'node:worker_threads';
import { canonicalHost } from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { sendDatagram } from '../shared/native.js';
import type { Origin } from '../shared/origin.js';

/** Longest FDNAME systemd accepts (FDNAME_MAX in systemd's fdname_is_valid()). */
export const FDNAME_MAX_LENGTH = 255;

/** The kernel's SCM_MAX_FD: the most fds one SCM_RIGHTS message can carry. */
export const FDS_PER_MESSAGE_MAX = 253;

/** sockaddr_un.sun_path holds 108 bytes; a path needs its terminating NUL, an abstract name its leading one. */
const SUN_PATH_MAX_BYTES = 107;

export interface NotifierOptions {
  /** Environment to read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from. Default: process.env. */
  env?: NodeJS.ProcessEnv;
  /** Receives failures of the watchdog timer's pings (they cannot throw to anyone). Default: process.emitWarning. */
  onWatchdogError?: (error: Error) => void;
}

export interface StoreFdsOptions {
  /**
   * false sends FDPOLL=0: systemd then does not watch the fds for POLLHUP/POLLERR and keeps them even after the peer
   * hung up. Default true: systemd drops a stored socket that errors or hangs up, which is what idle TCP sockets want.
   */
  poll?: boolean;
}

/** Shape of the parts of the CommonJS package unix-dgram we use. */
interface UnixDgramSocket {
  send(buf: Buffer, offset: number, length: number, path: string, callback: (error?: Error) => void): void;
  close(): void;
  on(event: 'error', listener: (error: Error) => void): this;
}
interface UnixDgramModule {
  createSocket(type: 'unix_dgram'): UnixDgramSocket;
}

const require = createRequire(import.meta.url);
let unixDgram: UnixDgramModule | undefined;

function loadUnixDgram(): UnixDgramModule {
  unixDgram ??= require('unix-dgram') as UnixDgramModule;
  return unixDgram;
}

/** Node's shape for a failed syscall: code 'ENOENT', errno -2, syscall 'sendmsg'. */
function syscallError(errno: number, syscall: string, path: string): Error {
  const code = getSystemErrorName(errno);
  const error = new Error(`${syscall} ${code} ${path}`) as Error & { code: string; errno: number; syscall: string };
  error.code = code;
  error.errno = errno;
  error.syscall = syscall;
  return error;
}

/** unix-dgram reports errno as a negative number in `code`; sendto returns synchronously, callback included. */
function sendWithUnixDgram(path: string, message: Buffer): void {
  const socket = loadUnixDgram().createSocket('unix_dgram');
  let failure: Error | undefined;
  socket.on('error', (error) => {
    failure ??= error;
  });
  try {
    socket.send(message, 0, message.length, path, (error) => {
      if (error) failure ??= error;
    });
  } finally {
    socket.close();
  }
  if (failure) {
    // unix-dgram reports a full queue (EAGAIN/ENOBUFS) as code 1, message 'congestion': say EAGAIN, as the addon does.
    if ((failure as Error & { code?: unknown }).code === 1) throw syscallError(-11, 'sendmsg', path);
    const errno = (failure as Error & { errno?: unknown }).errno;
    throw typeof errno === 'number' && errno < 0 ? syscallError(errno, 'sendmsg', path) : failure;
  }
}

/**
 * True for the errors of a full receive queue at $NOTIFY_SOCKET: PID 1 has not caught up yet, try again. The queue
 * holds net.unix.max_dgram_qlen datagrams: 512 with systemd's sysctl defaults, but 10 (the kernel default) where
 * those are not applied, e.g. in a container. A burst of FDSTORE messages fills it in microseconds.
 */
export function isCongestion(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return code === 'EAGAIN' || code === 'EWOULDBLOCK' || code === 'ENOBUFS';
}

/**
 * Runs `send` (one notification) until it does not fail with congestion, waiting 1 ms, doubling up to 50 ms, between
 * tries, for at most `timeoutMs` (it tries at least once). Other errors, and congestion past the timeout, are thrown.
 * The event loop keeps running meanwhile.
 */
export async function retryWhileCongested(send: () => void, timeoutMs: number): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  for (let waitMs = 1; ; waitMs = Math.min(waitMs * 2, 50)) {
    try {
      send();
      return;
    } catch (error) {
      if (!isCongestion(error) || performance.now() >= deadline) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(waitMs, Math.max(1, deadline - performance.now()))));
  }
}

/**
 * Parses $NOTIFY_SOCKET the way sd_notify() does: an absolute path, or `@name` for the abstract namespace.
 * Returns null when unset or empty. Throws for anything else (sd_notify answers -EAFNOSUPPORT).
 */
export function parseNotifySocket(value: string | undefined): string | null {
  if (value === undefined || value === '') return null;
  if (!value.startsWith('/') && !value.startsWith('@')) {
    throw new SockpoolError(
      ErrorCodes.CONFIG,
      `NOTIFY_SOCKET must be an absolute path or @abstract name (vsock: needs systemd >= 254 and is not supported): ${JSON.stringify(value)}`,
    );
  }
  if (Buffer.byteLength(value) > SUN_PATH_MAX_BYTES) {
    throw new SockpoolError(ErrorCodes.CONFIG, `NOTIFY_SOCKET is longer than ${SUN_PATH_MAX_BYTES} bytes`);
  }
  return value;
}

/**
 * The watchdog period systemd expects, per sd_watchdog_enabled(3): WATCHDOG_USEC, honoured only when WATCHDOG_PID is
 * unset or names this process. Returns microseconds, or null when no watchdog is requested.
 */
export function watchdogUsec(env: NodeJS.ProcessEnv = process.env, pid: number = process.pid): number | null {
  const usecText = env.WATCHDOG_USEC;
  if (usecText === undefined || !/^\d+$/.test(usecText)) return null;
  const usec = Number(usecText);
  if (!Number.isSafeInteger(usec) || usec <= 0) return null;
  const pidText = env.WATCHDOG_PID;
  if (pidText !== undefined && pidText !== '' && Number(pidText) !== pid) return null;
  return usec;
}

/**
 * FileDescriptorStoreMax= of this service, from $FDSTORE (set by systemd >= 254 when the store is enabled), or null
 * when unknown (older systemd: sending more than the store takes only makes systemd close the surplus).
 */
export function fdStoreMax(env: NodeJS.ProcessEnv = process.env): number | null {
  const text = env.FDSTORE;
  if (text === undefined || !/^\d+$/.test(text)) return null;
  const max = Number(text);
  return Number.isSafeInteger(max) ? max : null;
}

/** systemd's fdname_is_valid(): 1..255 printable ASCII characters, no ':' (it separates names in LISTEN_FDNAMES). */
export function isValidFdName(name: string): boolean {
  return name.length > 0 && name.length <= FDNAME_MAX_LENGTH && /^[\x20-\x39\x3b-\x7e]+$/.test(name);
}

/** Values may not break the newline-separated message format. */
function oneLine(value: string): string {
  return value.replace(/[\r\n\0]+/g, ' ');
}

export class Notifier {
  readonly #socketPath: string | null;
  readonly #env: NodeJS.ProcessEnv;
  readonly #onWatchdogError: (error: Error) => void;
  #watchdogTimer: NodeJS.Timeout | undefined;

  constructor(options: NotifierOptions = {}) {
    this.#env = options.env ?? process.env;
    this.#socketPath = parseNotifySocket(this.#env.NOTIFY_SOCKET);
    this.#onWatchdogError =
      options.onWatchdogError ??
      ((error) => process.emitWarning(`sd_notify WATCHDOG=1 failed: ${error.message}`, 'SockpoolNotifyWarning'));
  }

  /** True when $NOTIFY_SOCKET is set: messages are really sent. */
  get enabled(): boolean {
    return this.#socketPath !== null;
  }

  /** The socket messages go to (a path, or `@name`), or null. */
  get socketPath(): string | null {
    return this.#socketPath;
  }

  /**
   * Sends one message of assignments (`READY=1`, `STATUS=...`). Throws on failure with Node's syscall error shape
   * (e.g. code 'ECONNREFUSED', syscall 'sendmsg'). Values must not contain newlines; `status()` strips them.
   */
  notify(state: string): void {
    const path = this.#socketPath;
    if (path === null) return;
    const message = Buffer.from(state, 'utf8');
    if (path.startsWith('@') || !isMainThread) {
      sendDatagram(path, message);
    } else {
      sendWithUnixDgram(path, message);
    }
  }

  /** Start-up is complete (or a reload finished): READY=1, with a status line. */
  ready(status?: string): void {
    this.notify(status === undefined ? 'READY=1' : `READY=1\nSTATUS=${oneLine(status)}`);
  }

  /** Free-form status shown by `systemctl status` (StatusText=). */
  status(text: string): void {
    this.notify(`STATUS=${oneLine(text)}`);
  }

  /**
   * A reload began (SIGHUP from ExecReload=): RELOADING=1 with MONOTONIC_USEC, the CLOCK_MONOTONIC time in µs
   * (process.hrtime is CLOCK_MONOTONIC on Linux). Call ready() when the reload is done.
   */
  reloading(status?: string): void {
    const monotonicUsec = process.hrtime.bigint() / 1000n;
    const statusLine = status === undefined ? '' : `\nSTATUS=${oneLine(status)}`;
    this.notify(`RELOADING=1\nMONOTONIC_USEC=${monotonicUsec}${statusLine}`);
  }

  /** Shutdown began: STOPPING=1. */
  stopping(status?: string): void {
    this.notify(status === undefined ? 'STOPPING=1' : `STOPPING=1\nSTATUS=${oneLine(status)}`);
  }

  /** Asks systemd for more time in the current start/stop/reload phase: EXTEND_TIMEOUT_USEC. */
  extendTimeout(milliseconds: number): void {
    this.notify(`EXTEND_TIMEOUT_USEC=${Math.max(0, Math.ceil(milliseconds * 1000))}`);
  }

  /** One watchdog keep-alive: WATCHDOG=1. */
  watchdog(): void {
    this.notify('WATCHDOG=1');
  }

  /**
   * Starts pinging WATCHDOG=1 every WATCHDOG_USEC/2 from an unref'd timer (it never keeps the process alive by
   * itself). Returns the interval in ms, or null when systemd asked for no watchdog or $NOTIFY_SOCKET is unset.
   */
  startWatchdog(): number | null {
    if (this.#socketPath === null) return null;
    const usec = watchdogUsec(this.#env);
    if (usec === null) return null;
    this.stopWatchdog();
    const intervalMs = Math.max(1, Math.floor(usec / 2000));
    const ping = (): void => {
      try {
        this.watchdog();
      } catch (error) {
        this.#onWatchdogError(error instanceof Error ? error : new Error(String(error)));
      }
    };
    ping();
    this.#watchdogTimer = setInterval(ping, intervalMs);
    this.#watchdogTimer.unref();
    return intervalMs;
  }

  stopWatchdog(): void {
    if (this.#watchdogTimer !== undefined) clearInterval(this.#watchdogTimer);
    this.#watchdogTimer = undefined;
  }

  /**
   * Hands fds to systemd's fd store under `name` (FDSTORE=1, FDNAME=name; more than 253 fds go in several messages).
   * The kernel duplicates the fds into the message: the caller still owns its copies and must close them. The unit
   * needs FileDescriptorStoreMax= large enough, or systemd silently closes the surplus.
   */
  storeFds(name: string, fds: readonly number[], options: StoreFdsOptions = {}): void {
    const path = this.#socketPath;
    if (path === null) return;
    if (!isValidFdName(name)) {
      throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `invalid FDNAME ${JSON.stringify(name)}`);
    }
    for (const fd of fds) {
      if (!Number.isInteger(fd) || fd < 0) {
        throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `not an fd: ${fd}`);
      }
    }
    const header = `FDSTORE=1\nFDNAME=${name}${options.poll === false ? '\nFDPOLL=0' : ''}`;
    const message = Buffer.from(header, 'utf8');
    for (let start = 0; start < fds.length; start += FDS_PER_MESSAGE_MAX) {
      sendDatagram(path, message, fds.slice(start, start + FDS_PER_MESSAGE_MAX));
    }
  }

  /** Drops every fd stored under `name` from systemd's fd store: FDSTOREREMOVE=1, FDNAME=name. */
  removeStoredFds(name: string): void {
    if (!isValidFdName(name)) {
      throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `invalid FDNAME ${JSON.stringify(name)}`);
    }
    this.notify(`FDSTOREREMOVE=1\nFDNAME=${name}`);
  }

  /** Stops the watchdog timer. Sends nothing. */
  close(): void {
    this.stopWatchdog();
  }
}

// ---- FDNAMEs for stored origin sockets ----
//
// `o-<host>-<port>` or `o-<host>-<port>~<tag>`. The host is canonical (shared/origin.ts) and escaped: every byte of its
// UTF-8 form outside [A-Za-z0-9._-] becomes %XX (upper-case hex), so IPv6 colons (which FDNAME forbids) become %3A
// and '~' and '%' never appear unescaped. The port is the text after the last '-', so hosts keep their dashes. The
// optional tag (e.g. a socket id) makes a name unique: FDSTOREREMOVE removes every fd with the name, so a daemon that
// removes one socket at a time needs one name per socket.

const ORIGIN_PREFIX = 'o-';
const TAG_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;

export interface StoredOrigin extends Origin {
  tag?: string;
}

function escapeHost(host: string): string {
  let result = '';
  for (const byte of Buffer.from(host, 'utf8')) {
    const char = String.fromCharCode(byte);
    result += /[A-Za-z0-9._-]/.test(char) ? char : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return result;
}

function unescapeHost(escaped: string): string | null {
  if (!/^(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+$/.test(escaped)) return null;
  const bytes: number[] = [];
  for (let i = 0; i < escaped.length; i++) {
    if (escaped[i] === '%') {
      bytes.push(Number.parseInt(escaped.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      bytes.push(escaped.charCodeAt(i));
    }
  }
  const host = Buffer.from(bytes).toString('utf8');
  return host.includes('\uFFFD') ? null : host;
}

/** The FDNAME under which an idle socket of `origin` is stored. Throws SOCKPOOL_ERR_INVALID_ARGUMENT past 255 chars. */
export function encodeFdName(origin: Origin, tag?: string): string {
  if (!Number.isInteger(origin.port) || origin.port < 1 || origin.port > 65535) {
    throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `port out of range: ${origin.port}`);
  }
  if (tag !== undefined && !TAG_PATTERN.test(tag)) {
    throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `fd name tag must match ${TAG_PATTERN}: ${tag}`);
  }
  const host = canonicalHost(origin.host);
  if (host === '') throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, 'empty host');
  const name = `${ORIGIN_PREFIX}${escapeHost(host)}-${origin.port}${tag === undefined ? '' : `~${tag}`}`;
  if (name.length > FDNAME_MAX_LENGTH) {
    throw new SockpoolError(
      ErrorCodes.INVALID_ARGUMENT,
      `fd name for ${host} is ${name.length} characters, systemd allows ${FDNAME_MAX_LENGTH}`,
    );
  }
  return name;
}

/** The origin an FDNAME made by encodeFdName() stands for, or null for any other name. */
export function decodeFdName(name: string): StoredOrigin | null {
  if (!name.startsWith(ORIGIN_PREFIX)) return null;
  const body = name.slice(ORIGIN_PREFIX.length);
  const tagAt = body.indexOf('~');
  const hostAndPort = tagAt === -1 ? body : body.slice(0, tagAt);
  const tag = tagAt === -1 ? undefined : body.slice(tagAt + 1);
  if (tag !== undefined && !TAG_PATTERN.test(tag)) return null;
  const dash = hostAndPort.lastIndexOf('-');
  if (dash <= 0) return null;
  const portText = hostAndPort.slice(dash + 1);
  if (!/^[1-9]\d{0,4}$/.test(portText)) return null;
  const port = Number(portText);
  if (port > 65535) return null;
  const host = unescapeHost(hostAndPort.slice(0, dash));
  if (host === null || host === '') return null;
  const origin: StoredOrigin = tag === undefined ? { host, port } : { host, port, tag };
  // Only canonical spellings are ours (encoding canonicalizes): decoding must be the exact inverse of encoding.
  try {
    if (encodeFdName(origin, tag) !== name) return null;
  } catch {
    return null;
  }
  return origin;
}

// ---- The tag sockpoold gives stored sockets ----
//
// `c` + the wall-clock second the socket connected, in base 36 (`o-example.com-443~ct3k9zq`): the next process
// takes the socket's age from it, so a restart does not reset the idle TTL. Sockets of one origin that connected in
// the same second share a name and travel in one message.

const CONNECTED_TAG = /^c([0-9a-z]{1,11})$/;

/** The tag for a socket that connected at `epochMs` (ms since the epoch). */
export function connectedAtTag(epochMs: number): string {
  return `c${Math.max(0, Math.floor(epochMs / 1000)).toString(36)}`;
}

/** When a socket with this tag connected (ms since the epoch, to the second), or null for another kind of tag. */
export function connectedAtFromTag(tag: string | undefined): number | null {
  const match = tag === undefined ? null : CONNECTED_TAG.exec(tag);
  return match ? Number.parseInt(match[1] ?? '', 36) * 1000 : null;
}
