// One non-blocking TCP connect to a numeric address, with a deadline, built on the addon's primitives:
// tcpSocket → socket options → connectStart → a watch for WRITABLE → socketError. No DNS, no policy: the caller
// (daemon/connector.ts) decides where to connect and with which options.
//
// fd ownership: the fd belongs to connectTcp until its promise resolves; every failure path (bad option, refused,
// timeout) closes it here. On success ownership passes to the caller. While the connect is in flight the fd is
// tracked for the current thread, so a worker thread that dies mid-connect does not leak it.

import { isIP } from 'node:net';
import { constants } from 'node:os';
import {
  bindAddress,
  bindToDevice,
  close,
  connectStart,
  type NativeError,
  setKeepAlive,
  setMark,
  setNoDelay,
  setUserTimeout,
  socketError,
  tcpSocket,
  track,
  untrack,
  WRITABLE,
} from '../shared/native.js';
import { type FdWatch, watchFd } from '../shared/poll-set.js';

export interface KeepAliveOptions {
  /** Default true. */
  enabled?: boolean;
  idleSec?: number;
  intervalSec?: number;
  count?: number;
}

export interface ConnectTcpOptions {
  /** Deadline for the whole connect; past it the promise rejects with ETIMEDOUT. */
  timeoutMs: number;
  /** Default: the family of `address`; must match it when given. */
  family?: 4 | 6;
  /** Numeric source address to bind before connecting (port chosen by the kernel). */
  sourceAddress?: string;
  /** SO_MARK for routing/firewall rules (needs CAP_NET_ADMIN). */
  mark?: number;
  /** SO_BINDTODEVICE. */
  device?: string;
  /** TCP_NODELAY. */
  noDelay?: boolean;
  /** SO_KEEPALIVE (true, or its parameters). */
  keepAlive?: boolean | KeepAliveOptions;
  /** TCP_USER_TIMEOUT in milliseconds. */
  userTimeoutMs?: number;
  /** Cancels the connect: the promise rejects with an AbortError and the fd is closed here (a lost race). */
  signal?: AbortSignal;
}

function connectError(code: string, address: string, port: number): NativeError {
  const errnoValue = (constants.errno as Record<string, number | undefined>)[code];
  return Object.assign(new Error(`connect ${code} ${address}:${port}`), {
    ...(errnoValue === undefined ? {} : { errno: -errnoValue }),
    code,
    syscall: 'connect',
    address,
    port,
  });
}

function invalidOption(name: string, message: string): TypeError {
  return Object.assign(new TypeError(`connectTcp: option "${name}" ${message}`), { code: 'ERR_INVALID_ARG_VALUE' });
}

/** Options applied before connect(), so the SYN already carries the mark, device and source address. */
function applyOptions(fd: number, options: ConnectTcpOptions): void {
  if (options.mark !== undefined) setMark(fd, options.mark);
  if (options.device !== undefined) bindToDevice(fd, options.device);
  if (options.sourceAddress !== undefined) bindAddress(fd, options.sourceAddress, 0);
  if (options.noDelay !== undefined) setNoDelay(fd, options.noDelay);
  if (options.keepAlive !== undefined) {
    if (typeof options.keepAlive === 'boolean') {
      setKeepAlive(fd, options.keepAlive);
    } else {
      const { enabled = true, idleSec, intervalSec, count } = options.keepAlive;
      setKeepAlive(fd, enabled, idleSec, intervalSec, count);
    }
  }
  if (options.userTimeoutMs !== undefined) setUserTimeout(fd, options.userTimeoutMs);
}

/**
 * Connects to `address:port` (numeric IPv4 or IPv6). Resolves with a connected, non-blocking, O_CLOEXEC fd that
 * the caller owns. Rejects with a NativeError: the connect errno (ECONNREFUSED, EHOSTUNREACH, ...; syscall
 * 'connect', with `address` and `port`), ETIMEDOUT when `timeoutMs` passes first, the setsockopt/bind error of
 * an option, or the signal's AbortError. Nothing stays open after a rejection.
 */
export function connectTcp(address: string, port: number, options: ConnectTcpOptions): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const addressFamily = isIP(address);
    if (addressFamily === 0) {
      throw Object.assign(new TypeError(`connectTcp: not a numeric IP address: ${address}`), {
        code: 'ERR_INVALID_IP_ADDRESS',
      });
    }
    if (options.family !== undefined && options.family !== addressFamily) {
      throw invalidOption('family', `is ${options.family} but ${address} is an IPv${addressFamily} address`);
    }
    if (!Number.isFinite(options.timeoutMs) || options.timeoutMs <= 0) {
      throw invalidOption('timeoutMs', 'must be a positive number of milliseconds');
    }
    const { signal } = options;
    signal?.throwIfAborted();

    // Ownership: ours from here until resolve(); tracked so that thread teardown closes it if we never finish.
    const fd = tcpSocket(addressFamily as 4 | 6);
    track(fd);
    let watch: FdWatch | undefined;
    let timer: NodeJS.Timeout | undefined;
    let settled = false;
    const onAbort = (): void => finish(signal?.reason);
    const finish = (error?: unknown): void => {
      if (settled) return;
      settled = true;
      if (timer !== undefined) clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      watch?.close(); // before the fd is closed or handed over
      if (error !== undefined) {
        close(fd); // also untracks
        reject(error);
      } else {
        untrack(fd);
        resolve(fd); // ownership passes to the caller here
      }
    };

    try {
      applyOptions(fd, options);
      if (connectStart(fd, address, port, addressFamily as 4 | 6)) {
        finish();
        return;
      }
      // One watch in this thread's epoll set (../shared/poll-set.ts): one syscall to start, one to stop.
      watch = watchFd(fd, (events) => {
        // Writable means the handshake ended; SO_ERROR says how (a refused or unreachable connect comes as an
        // error event, reported as the WRITABLE asked for).
        const code = socketError(fd);
        if (code !== null) finish(connectError(code, address, port));
        else if ((events & WRITABLE) !== 0) finish();
      });
      watch.start(WRITABLE);
      timer = setTimeout(() => finish(connectError('ETIMEDOUT', address, port)), options.timeoutMs);
      signal?.addEventListener('abort', onAbort, { once: true });
    } catch (error) {
      finish(error);
    }
  });
}
