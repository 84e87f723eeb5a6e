// The typed face of sockpool's native addon (native/sockpool_native.cc): Linux socket syscalls and libuv readiness,
// no policy. Every function here calls straight into C++; nothing is cached or queued in JavaScript.
//
// Errors: a failed syscall throws a NativeError shaped like Node's own (`code: 'ECONNREFUSED'`, `errno: -111`,
// `syscall: 'connect'`); failures of our own carry a SOCKPOOL_ERR_* code (see NativeErrorCodes). Bad arguments
// throw TypeError/RangeError with Node's ERR_* codes.
//
// fd ownership, in one place:
// - Every fd a function returns (seqpacketListen, seqpacketConnect, seqpacketPair, accept, datagramBind,
//   tcpSocket, recvMessage's fds) belongs to the caller, who must close() it or hand it on and say so.
// - sendMessage/sendDatagram never close the fds they send: the kernel duplicates them into the message, and the
//   caller closes its own copies after a successful send (or keeps them if the send failed).
// - Fds received with recvMessage are also *tracked* for the current thread: if the thread ends (worker
//   terminated, crashed, or the process exits) before they are closed or untracked, the addon closes them. When
//   ownership of a received fd leaves this thread's JavaScript (handed to curl, to net.Socket, sent on to another
//   process), call untrack(fd) so that teardown does not close a number that now means something else.
// - A Poller or PollSet never owns its fds: close the Poller (remove the fd) first, then the fd (close() refuses an fd
//   one watches).
// - localRoutes opens its own netlink socket and closes it before it returns or throws: no fd escapes.
// All fds the addon creates are O_CLOEXEC and non-blocking (but localRoutes' own, which never leaves the call).
//
// Threads: the addon is context-aware and works in worker threads; its state (tracked fds, Pollers) is per thread.

import { Buffer } from 'node:buffer';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCodes } from './errors.js';

/** A failed syscall (`code` is the errno name) or one of NativeErrorCodes. */
export interface NativeError extends Error {
  code: string;
  /** Negative errno, as Node reports it (absent for SOCKPOOL_ERR_* codes). */
  errno?: number;
  syscall?: string;
  /** connect/bind: the address tried; unix sockets: the path. */
  address?: string;
  port?: number;
  /** SOCKPOOL_ERR_FD_TRUNCATED / SOCKPOOL_ERR_MSG_TRUNCATED: how many received fds the addon closed. */
  fdsClosed?: number;
}

/** The addon's own error codes (everything else is an errno name); registered in shared/errors.ts. */
export const NativeErrorCodes = {
  /** recvMessage: the message carried more fds than maxFds; every fd that arrived was closed. */
  FD_TRUNCATED: ErrorCodes.FD_TRUNCATED,
  /** recvMessage: the message was longer than maxBytes; it is lost and every fd that came with it was closed. */
  MSG_TRUNCATED: ErrorCodes.MSG_TRUNCATED,
  /** close: a Poller or PollSet of this thread still watches the fd; close the Poller or remove the fd first. */
  FD_POLLED: ErrorCodes.FD_POLLED,
  /** Poller.start after Poller.close. */
  POLLER_CLOSED: ErrorCodes.POLLER_CLOSED,
} as const;

export function isNativeError(error: unknown): error is NativeError {
  return error instanceof Error && typeof (error as { code?: unknown }).code === 'string';
}

export interface SocketAddress {
  family: 4 | 6;
  /** Numeric address; IPv6 without brackets (with `%zone` for scoped addresses). */
  address: string;
  port: number;
}

export interface ReceivedMessage {
  data: Buffer;
  /** Owned by the caller and tracked for this thread (see the header). */
  fds: number[];
  /**
   * The peer shut down: 0 bytes and no fds. A zero-length message looks the same, so protocols on these sockets
   * never send empty messages.
   */
  eof: boolean;
}

export type ProbeState = 'alive' | 'eof' | 'data' | 'error';

export interface ProbeResult {
  /**
   * alive: nothing to read and (TCP) ESTABLISHED. eof: the peer closed. data: unread bytes nobody asked for.
   * error: recv failed (`error` is the errno name), or a TCP socket that is not ESTABLISHED with nothing to read
   * (`error` 'ENOTCONN').
   */
  state: ProbeState;
  error?: string;
  /** TCP_INFO's tcpi_state (1 = ESTABLISHED, 8 = CLOSE_WAIT); only for TCP sockets. */
  tcpState?: number;
}

/** What a TCP socket carried since it was connected (TCP_INFO) and what its queues hold (SIOCOUTQ/SIOCINQ). */
export interface TcpCounters {
  tcpState: number;
  /** Bytes of data sent, retransmissions included (Linux 4.19+; absent on older kernels). */
  bytesSent?: number;
  /** Bytes acknowledged by the peer (Linux 4.1+). */
  bytesAcked?: number;
  /** Bytes of data received (Linux 4.1+). */
  bytesReceived?: number;
  /** Bytes written but not yet sent (Linux 4.6+). */
  notsentBytes?: number;
  /** Bytes in the send queue not yet acknowledged (SIOCOUTQ); absent when queues were not asked for. */
  outq?: number;
  /** Bytes received and not yet read (SIOCINQ); absent when queues were not asked for. */
  inq?: number;
}

/** A route of type RTN_LOCAL: what goes to an address in it is delivered to this host (localRoutes). */
export interface LocalRoute {
  family: 4 | 6;
  /** The route's destination, its network address (inet_ntop's spelling). */
  address: string;
  /** 32 (IPv4) or 128 (IPv6) for one address; less for a range (AnyIP, the prefix of an IPv4 address on lo). */
  prefixLength: number;
  /** The routing table that holds it (255: local, 254: main). */
  table: number;
}

/** localRoutes' answer. */
export interface LocalRoutes {
  /** IPv4's first, then IPv6's, in the kernel's order. */
  routes: LocalRoute[];
  /**
   * How many route messages the kernel sent, whatever their type: as many as `routes` where it filtered the dump
   * itself (Linux 4.20+), every route of the tables asked where it did not.
   */
  received: number;
}

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

/**
 * status: 0, or a negative errno from libuv; events: the READABLE/WRITABLE/DISCONNECT bits that are ready.
 * libuv reports EPOLLERR as status EBADF (-9) and stops the Poller: read socketError(fd) for the real error.
 */
export type PollCallback = (status: number, events: number) => void;

/**
 * The closes discard() leaves to the addon's closing threads (an fd that is not a socket: its close may wait for
 * whoever serves the file, a client's FUSE mount for good). `queued`: fds not yet closed; `stuckThreads`: closing
 * threads held in one close for longer than a short bound. A stuck close hands the queue to a fresh thread; at
 * `maxStuckThreads` the queued fds wait until one of those closes returns, and at `maxStuckThreadsOfUids` so do all
 * the fds a uid sent; a uid's fds wait too while its share of the threads is in closes of its fds, and other uids'
 * are closed past them.
 */
export interface DeferredCloses {
  queued: number;
  stuckThreads: number;
  maxStuckThreads: number;
  /**
   * The closing threads that may be held in closes of uids' fds (discard's `uid`), all uids together: the rest are
   * kept for discards that name no uid (the daemon's own), so no set of uids holds every thread.
   */
  maxStuckThreadsOfUids: number;
  /**
   * The closing threads that may be held in closes of one uid's fds, the owner included. A uid in one close already
   * takes another only while fewer than this many are in closes in all: past that, each goes to a uid holding none.
   */
  maxStuckThreadsPerUid: number;
}

/**
 * libuv readiness for one fd, on the current thread's event loop (a uv_poll_t). Never blocks, never busy-polls.
 * The callback runs like any libuv callback (microtasks drained after it); if it throws, that is an uncaught
 * exception of this thread. A started Poller keeps the loop alive (see unref) and its object from being collected.
 * The Poller does not own the fd: call close() before closing the fd. Closed automatically when the thread ends.
 */
export interface Poller {
  /** Starts or changes the watched events (READABLE | WRITABLE | DISCONNECT). */
  start(events: number): void;
  /** Stops watching; start() may be called again. */
  stop(): void;
  /** Releases the libuv handle (uv_close). Idempotent. The fd stays open. */
  close(): void;
  /** The Poller keeps the event loop alive while started (the default). */
  ref(): void;
  /** The event loop may exit even while this Poller is started. */
  unref(): void;
}

export interface PollerConstructor {
  /** Throws EEXIST (syscall 'uv_poll_init') when another Poller or libuv handle of this thread watches fd. */
  new (fd: number, callback: PollCallback): Poller;
}

/**
 * Readiness for many fds through one epoll set of the addon's own, itself one libuv handle on the current thread's
 * loop (see native/sockpool_native.cc, "PollSet"): one epoll_ctl to add an fd, one to remove it, where a Poller
 * costs about four syscalls and an N-API object each way. Level-triggered. Each wakeup calls `callback(count)` once,
 * with `count` [token, events] pairs in the Int32Array given to the constructor (at most half its length per call;
 * the rest come at the next turn). An error or hang-up reports the events asked for. The set keeps the loop alive
 * while it has members. It never owns the fds (close() refuses a member). Closed automatically when the thread
 * ends. Most code wants ./poll-set.ts, which hands out one watch per fd over this thread's set.
 */
export interface PollSet {
  /** Watches `fd` for `events` (READABLE | WRITABLE | DISCONNECT), reported with `token`. EEXIST when this set or a
   *  Poller of this thread already watches it. */
  add(fd: number, events: number, token: number): void;
  /** Changes a member's events and token. ENOENT when `fd` is not a member. */
  modify(fd: number, events: number, token: number): void;
  /** Stops watching `fd`; false when it was not a member. */
  remove(fd: number): boolean;
  /** Closes the set (its epoll fd): no member is watched any more; their fds stay open. Idempotent. */
  close(): void;
}

export interface PollSetConstructor {
  new (buffer: Int32Array, callback: (count: number) => void): PollSet;
}

interface NativeBinding {
  seqpacketListen(path: string, backlog: number, refuseFds?: boolean): number;
  seqpacketConnect(path: string): number;
  seqpacketPair(): [number, number];
  loopbackPairListen(filtered?: boolean): [number, number, boolean];
  loopbackPairAwait(listener: number, client: number, waitMs: number): [number, number];
  loopbackPairTry(listener: number, client: number): [number, number] | null;
  loopbackPairAccept(listener: number, client: number): [number, number] | null;
  accept(fd: number): number | null;
  sendMessage(fd: number, data: Uint8Array, fds?: readonly number[] | number): number | null;
  recvMessage(fd: number, maxBytes: number, maxFds: number): [Buffer, number[], boolean] | null;
  recvMessages(fd: number, maxBytes: number, maxFds: number, maxCount: number, arena: Buffer, meta: Int32Array): number;
  sendDatagram(path: string, data: Uint8Array, fds?: readonly number[]): void;
  datagramBind(path: string): number;
  tcpSocket(family: 4 | 6): number;
  bindAddress(fd: number, address: string, port: number): void;
  connectStart(fd: number, address: string, port: number, family?: 4 | 6): boolean;
  socketError(fd: number): string | null;
  localAddress(fd: number): SocketAddress;
  peerAddress(fd: number, words?: Float64Array): SocketAddress;
  setNoDelay(fd: number, on: boolean): void;
  setLingerReset(fd: number): void;
  disconnect(fd: number): boolean;
  disarmLinger(fd: number): void;
  setKeepAlive(fd: number, on: boolean, idleSec?: number, intervalSec?: number, count?: number): void;
  setUserTimeout(fd: number, ms: number): void;
  setMark(fd: number, mark: number): void;
  bindToDevice(fd: number, name: string): void;
  setTcpUlp(fd: number, name: string): void;
  restrictTcpBind(ports: number[]): BindRestriction;
  startConnectGuard(cgroup: string): string | null;
  guardSocket(fd: number): void;
  guardCovers(fd: number): boolean;
  dropCapabilities(capabilities: number[]): void;
  setRealtimePriority(priority: number): void;
  localRoutes(table?: number): LocalRoutes;
  probe(fd: number): ProbeResult;
  peerCredentials(fd: number): PeerCredentials;
  peerGroups(fd: number): number[];
  refuseFdPassing(fd: number): boolean;
  tcpCounters(fd: number, queues?: boolean): TcpCounters;
  sameSocket(a: number, b: number): boolean;
  tcpInfo(fd: number, out: Float64Array, withPeer?: boolean, withMark?: boolean): void;
  setTcpInfoScratch(out: Float64Array): void;
  tcpInfoScratch(fd: number, flags: number): void;
  socketInode(fd: number): number;
  unreadOutput(fd: number): number;
  shutdown(fd: number): boolean;
  dup(fd: number): number;
  close(fd: number): void;
  closeNeverShared(fd: number): void;
  discard(fd: number, uid?: number): void;
  deferredCloses(): DeferredCloses;
  startCloseWatchdog(): void;
  untrack(fd: number): void;
  track(fd: number): void;
  trackedFds(): number[];
  exitNow(code: number): never;
  Poller: PollerConstructor;
  PollSet: PollSetConstructor;
  READABLE: number;
  WRITABLE: number;
  DISCONNECT: number;
}

/** The directory of the package named "sockpool" at or above `start` (source tree and dist/ alike). */
function findPackageRoot(start: string): string {
  for (let dir = start; ; dir = dirname(dir)) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest)) {
      try {
        if ((JSON.parse(readFileSync(manifest, 'utf8')) as { name?: unknown }).name === 'sockpool') return dir;
      } catch {
        // not ours (or unreadable): keep walking up
      }
    }
    if (dirname(dir) === dir) {
      throw new Error(`sockpool: no package.json named "sockpool" above ${start}; cannot locate the native addon`);
    }
  }
}

/** Absolute path of the compiled addon (`node scripts/build-native.mjs addon` builds it). */
export const nativeAddonPath = join(
  findPackageRoot(dirname(fileURLToPath(import.meta.url))),
  'native',
  'build',
  'Release',
  'sockpool_native.node',
);

const binding = createRequire(import.meta.url)(nativeAddonPath) as NativeBinding;

/** Poller event bit: readable (or a pending accept, or the peer closed). */
export const READABLE: number = binding.READABLE;
/** Poller event bit: writable (a non-blocking connect finished, successfully or not). */
export const WRITABLE: number = binding.WRITABLE;
/** Poller event bit: the peer hung up (EPOLLRDHUP). */
export const DISCONNECT: number = binding.DISCONNECT;

export const Poller: PollerConstructor = binding.Poller;
export const PollSet: PollSetConstructor = binding.PollSet;

// ---- AF_UNIX

/**
 * A listening AF_UNIX SOCK_SEQPACKET socket bound to `path` ('@name' = abstract namespace). An existing file at
 * `path` is not removed (EADDRINUSE): the caller decides whether to unlink it. Returns an fd the caller owns.
 * `refuseFds`: SO_PASSRIGHTS = 0 before the socket listens (see refuseFdPassing; ignored by kernels without it).
 */
export function seqpacketListen(path: string, backlog: number, refuseFds = false): number {
  return binding.seqpacketListen(path, backlog, refuseFds);
}

/**
 * Connects a SOCK_SEQPACKET socket to `path` ('@name' = abstract). A unix connect completes at once or throws
 * (ENOENT, ECONNREFUSED, EAGAIN when the listener's backlog is full). Returns an fd the caller owns.
 */
export function seqpacketConnect(path: string): number {
  return binding.seqpacketConnect(path);
}

/** A connected SOCK_SEQPACKET pair (socketpair). Both fds belong to the caller. */
export function seqpacketPair(): [number, number] {
  return binding.seqpacketPair();
}

/** A loopback pair whose own connection was not on the listener at once (see startLoopbackPair). */
export interface PendingLoopbackPair {
  listener: number;
  /** Our connecting socket; its connection is on its way (or its SYN, dropped by a full queue, is retransmitted). */
  client: number;
  /**
   * How long ours may take: a filtered listener's wait is for our own handshake alone (a softirq run late); an
   * unfiltered one's covers our SYN's first retransmit (after 1 s) should strangers have filled its queue.
   */
  waitMs: number;
}

/**
 * A loopback pair (two TCP sockets over 127.0.0.1 connected to each other, non-blocking, TCP_NODELAY), in the addon's
 * two attempts (see above its LoopbackPairListen), neither of which waits: [accepted end, connecting end], both the
 * caller's, or a PendingLoopbackPair whose listener and client are the caller's, tracked by this thread (its teardown
 * closes them) until closed, awaited (loopbackPair) or handed on (daemon/loopback-pair.ts, waitForLoopbackPair). The
 * second attempt's listener lets in our client alone, where the kernel allows the socket filter. Throws as the addon
 * does (EMFILE, say), leaving nothing open.
 *
 * `strangers`, a test seam (test/loopback-pair.test.ts, test/tls-relay-pair-wait.test.ts): called with each attempt's
 * listener port before our connect, to land connections there as a user spraying 127.0.0.1 ports would; the second
 * listener is then unfiltered, as where the kernel refuses the filter, but with the first's short queue (8) rather
 * than the kernel's longest, so that a few strangers fill it and our SYN waits for its retransmit.
 */
export function startLoopbackPair(strangers?: (port: number) => void): [number, number] | PendingLoopbackPair {
  const [listener, client] = binding.loopbackPairListen(false);
  if (strangers) strangers(localAddress(listener).port);
  const pair = binding.loopbackPairTry(listener, client);
  if (pair !== null) return pair;
  // Ours was not in the queue (strangers filled it first): made again. Neither fd was ever anyone else's.
  closeNeverShared(listener);
  closeNeverShared(client);
  const [second, secondClient, filtered] = binding.loopbackPairListen(strangers === undefined);
  if (strangers) strangers(localAddress(second).port);
  const again = binding.loopbackPairTry(second, secondClient);
  if (again !== null) return again;
  return { listener: second, client: secondClient, waitMs: filtered ? 1_000 : 3_000 };
}

/**
 * A loopback pair as startLoopbackPair makes it, waiting with this thread blocked (up to 3 s, where a port sprayer
 * got in first) for our own connection if it must: for kernel-tls.ts's probe at start-up and tests. The warm TLS
 * relay waits on its event loop instead (daemon/loopback-pair.ts). Both ends belong to the caller.
 */
export function loopbackPair(strangers?: (port: number) => void): [number, number] {
  const made = startLoopbackPair(strangers);
  if (Array.isArray(made)) return made;
  return binding.loopbackPairAwait(made.listener, made.client, made.waitMs); // takes both fds, whatever happens
}

/**
 * A loopback pair's first half, for tests of one attempt: [listener, client, filtered], the listener on
 * 127.0.0.1:<ephemeral>, the client not yet connected. `filtered`: the listener lets in connections from the client's
 * address and port alone, where the kernel allows the socket filter (the third element says whether it did: some
 * kernels refuse it without CAP_NET_ADMIN). Both fds belong to the caller until it passes them to loopbackPairTry.
 */
export function loopbackPairListen(filtered = false): [number, number, boolean] {
  return binding.loopbackPairListen(filtered);
}

/**
 * One attempt at a loopback pair that never waits: connects the client loopbackPairListen made to its listener and
 * looks once for our connection, closing strangers' on the way (up to 64 a call). Returns [accepted end, connecting
 * end], the listener closed, or null when ours is not there yet. Owns both fds whatever happens (closed if it
 * throws), except when it returns null: then both are the caller's again and tracked by this thread (its teardown
 * closes them) until the caller closes, awaits (loopbackPairAwait) or untracks them.
 */
export function loopbackPairTry(listener: number, client: number): [number, number] | null {
  return binding.loopbackPairTry(listener, client);
}

/**
 * After a loopbackPairTry that returned null, one more look, never waiting (call it again when the listener is
 * readable): closes up to 64 strangers' connections; returns [accepted end, connecting end] once ours is there (the
 * client is then the pair's, untracked), or null. The listener stays the caller's, to close after the Poller that
 * watches it; so does the client unless it is returned (and both if this throws).
 */
export function loopbackPairAccept(listener: number, client: number): [number, number] | null {
  return binding.loopbackPairAccept(listener, client);
}

/**
 * After a loopbackPairTry that returned null, waits with this thread blocked, up to `waitMs`, for our connection,
 * closing strangers' as they come: [accepted end, connecting end], or ETIMEDOUT. Takes both fds whatever happens.
 */
export function loopbackPairAwait(listener: number, client: number, waitMs: number): [number, number] {
  return binding.loopbackPairAwait(listener, client, waitMs);
}

/** What restrictTcpBind did: the kernel's Landlock ABI (0: none) and whether the restriction is now in force. */
export interface BindRestriction {
  abi: number;
  applied: boolean;
  /** A system call filter (seccomp) refused the Landlock calls. */
  blocked: boolean;
}

/**
 * Landlock: from now on this thread, and the threads and processes it starts afterwards, may bind TCP sockets only to
 * `ports` (0: an ephemeral port the kernel picks). Threads that exist already are not restricted (Landlock applies to
 * the calling thread). `applied` false: the kernel's Landlock has no network rules (before Linux 6.7) or is off.
 */
export function restrictTcpBind(ports: number[]): BindRestriction {
  return binding.restrictTcpBind(ports);
}

/**
 * The connect guard (daemon/connect-guard.ts): cgroup BPF programs on the cgroup v2 directory `cgroup` that refuse
 * every connect() of a socket registered with it; from now on connectStart and loopbackPair register the sockets
 * they connect. Once per process; throws the failed syscall's error (EPERM without CAP_BPF and CAP_NET_ADMIN).
 * Returns the self-check's errno code ('EPERM': the guard works), or null when its reconnect went through.
 */
export function startConnectGuard(cgroup: string): string | null {
  return binding.startConnectGuard(cgroup);
}

/** Registers a socket with the connect guard (one the daemon did not connect itself); without a guard, nothing. */
export function guardSocket(fd: number): void {
  binding.guardSocket(fd);
}

/**
 * Whether the kernel refuses every connect() of this socket from now on: registered with the connect guard, and, for
 * one connectStart connected, seen by the guard's program at that connect (a socket created outside the cgroup the
 * guard is attached to, after the daemon was moved, is not). One bpf() call; no guard: false.
 */
export function guardCovers(fd: number): boolean {
  return binding.guardCovers(fd);
}

/** Drops these capabilities (linux/capability.h numbers) from the calling thread for good. */
export function dropCapabilities(capabilities: number[]): void {
  binding.dropCapabilities(capabilities);
}

/**
 * The calling thread alone under SCHED_RR at `priority` (1–99); the threads it starts afterwards start under the
 * normal policy (SCHED_RESET_ON_FORK). Throws EPERM without CAP_SYS_NICE or RLIMIT_RTPRIO, or when the thread's CPU
 * cgroup has no real-time budget (daemon/realtime.ts).
 */
export function setRealtimePriority(priority: number): void {
  binding.setRealtimePriority(priority);
}

/**
 * Ends the process at once with `code` (_exit(2)): no worker thread is joined, no exit handler or atexit hook runs,
 * nothing buffered is flushed. process.exit() joins every worker thread and waits for ever for one that never ends
 * its teardown; this does not. Only for a process entry point, after everything the process owns is closed and
 * flushed (daemon/command.ts); never from a library or an in-process daemon.
 */
export function exitNow(code: number): never {
  binding.exitNow(code);
  throw new Error('unreachable: _exit returned');
}

/** accept4 on a listening socket: a new fd the caller owns, or null when no connection is pending. */
export function accept(fd: number): number | null {
  return binding.accept(fd);
}

/**
 * sendmsg (MSG_NOSIGNAL | MSG_DONTWAIT) of one message, with `fds` attached (SCM_RIGHTS, at most 253).
 * Returns the bytes sent, or null when the socket would block (nothing was sent). The caller keeps ownership of
 * `fds`: after a successful send the peer has its own copies and the caller closes its own. One fd may be given as a
 * number (the addon reads it with less work than an array).
 */
export function sendMessage(fd: number, data: Uint8Array, fds?: readonly number[] | number): number | null {
  return binding.sendMessage(fd, data, fds);
}

/**
 * recvmsg (MSG_CMSG_CLOEXEC | MSG_DONTWAIT) of one message of at most `maxBytes` bytes and `maxFds` fds.
 * Returns null when nothing is waiting. The received fds belong to the caller and are tracked for this thread
 * (see untrack). A message with more than `maxFds` fds throws SOCKPOOL_ERR_FD_TRUNCATED, one longer than
 * `maxBytes` SOCKPOOL_ERR_MSG_TRUNCATED; either way every fd that arrived with it has been closed, the message is
 * gone, and the socket remains usable.
 */
export function recvMessage(fd: number, maxBytes: number, maxFds: number): ReceivedMessage | null {
  const received = binding.recvMessage(fd, maxBytes, maxFds);
  return received === null ? null : { data: received[0], fds: received[1], eof: received[2] };
}

// recvMessages' buffers, one pair per thread (this module is loaded once per thread), grown as needed: the addon
// reads into them and says what arrived (status codes as in native/sockpool_native.cc).
let recvArena = Buffer.allocUnsafeSlow(0);
let recvMeta = new Int32Array(0);
const RECV_OK = 0;
const RECV_EOF = 1;
const RECV_FD_TRUNCATED = 2;

/**
 * A message recvMessages dropped (its fds did not all arrive, or it was too long): its fds are closed already. One
 * whose fds did not all arrive is otherwise whole: its bytes come as `data`, for a receiver that must learn what it
 * lost (a lease whose socket never came).
 */
function truncationError(
  fdTruncated: boolean,
  maxBytes: number,
  maxFds: number,
  fdsClosed: number,
  data: Buffer | undefined,
): NativeError & { data?: Buffer } {
  const code = fdTruncated ? NativeErrorCodes.FD_TRUNCATED : NativeErrorCodes.MSG_TRUNCATED;
  const message = fdTruncated
    ? `recvmmsg ${code}: the message's fds did not all arrive (more than ${maxFds}, or no room in this process's fd ` +
      `table); the ${fdsClosed} that arrived were closed`
    : `recvmmsg ${code}: the message was longer than ${maxBytes} bytes; ${fdsClosed} fds that came with it were closed`;
  return Object.assign(new Error(message), { code, syscall: 'recvmmsg', fdsClosed, ...(data && { data }) });
}

/** Most messages one recvMessages call returns. */
export const MAX_BATCH = 64;

/**
 * recvmmsg: every message waiting now, up to `maxCount`, in one syscall (each as recvMessage would return it).
 * Returns null when nothing is waiting. A message that did not fit is an Error in its place (code
 * SOCKPOOL_ERR_FD_TRUNCATED or SOCKPOOL_ERR_MSG_TRUNCATED; its fds are closed already, the others are fine). The
 * list ends at the first EOF. Received fds belong to the caller as with recvMessage.
 */
export function recvMessages(
  fd: number,
  maxBytes: number,
  maxFds: number,
  maxCount: number,
): Array<ReceivedMessage | NativeError> | null {
  const stride = 3 + maxFds;
  if (recvArena.length < maxBytes * maxCount) recvArena = Buffer.allocUnsafeSlow(maxBytes * maxCount);
  if (recvMeta.length < stride * maxCount) recvMeta = new Int32Array(stride * maxCount);
  const count = binding.recvMessages(fd, maxBytes, maxFds, maxCount, recvArena, recvMeta);
  if (count < 0) return null;
  const messages: Array<ReceivedMessage | NativeError> = [];
  for (let i = 0; i < count; i++) {
    const at = i * stride;
    const length = recvMeta[at]!;
    const status = recvMeta[at + 1]!;
    const fdCount = recvMeta[at + 2]!;
    if (status === RECV_OK) {
      // A copy (from Buffer's shared pool for small ones): the arena is overwritten by the next call.
      const data = Buffer.allocUnsafe(length);
      recvArena.copy(data, 0, i * maxBytes, i * maxBytes + length);
      const fds: number[] = [];
      for (let f = 0; f < fdCount; f++) fds.push(recvMeta[at + 3 + f]!);
      messages.push({ data, fds, eof: false });
    } else if (status === RECV_EOF) {
      messages.push({ data: Buffer.alloc(0), fds: [], eof: true });
    } else {
      const fdTruncated = status === RECV_FD_TRUNCATED;
      const data = fdTruncated ? Buffer.from(recvArena.subarray(i * maxBytes, i * maxBytes + length)) : undefined;
      messages.push(truncationError(fdTruncated, maxBytes, maxFds, fdCount, data));
    }
  }
  return messages;
}

/**
 * Sends one AF_UNIX datagram to `path` ('@name' = abstract) from a fresh socket that is closed before returning,
 * with optional fds (SCM_RIGHTS): sd_notify with FDSTORE. Never blocks: a full receiver throws EAGAIN. The
 * caller keeps ownership of `fds`.
 */
export function sendDatagram(path: string, data: Uint8Array, fds?: readonly number[]): void {
  binding.sendDatagram(path, data, fds);
}

/**
 * An AF_UNIX SOCK_DGRAM socket bound to `path` ('@name' = abstract), SO_PASSCRED off; read it with recvMessage
 * (tests use it as a NOTIFY_SOCKET). Returns an fd the caller owns; a path-bound socket leaves its file behind.
 */
export function datagramBind(path: string): number {
  return binding.datagramBind(path);
}

// ---- TCP

/** A non-blocking TCP socket of the given family. Returns an fd the caller owns. */
export function tcpSocket(family: 4 | 6): number {
  return binding.tcpSocket(family);
}

/** bind(2) to a numeric address (of the socket's family) and port (0 = any). */
export function bindAddress(fd: number, address: string, port: number): void {
  binding.bindAddress(fd, address, port);
}

/**
 * Starts a non-blocking connect to a numeric address. true: connected at once; false: in progress (wait for
 * WRITABLE, then read socketError). Any other failure throws (errors carry `address` and `port`). `family`: the
 * socket's, when the caller knows it (one getsockopt less); a wrong one fails at the connect (EINVAL).
 */
export function connectStart(fd: number, address: string, port: number, family?: 4 | 6): boolean {
  return binding.connectStart(fd, address, port, family);
}

/** SO_ERROR as an errno name ('ECONNREFUSED'), or null if there is none. Reading it clears it. */
export function socketError(fd: number): string | null {
  return binding.socketError(fd);
}

/** getsockname of an IPv4/IPv6 socket. */
export function localAddress(fd: number): SocketAddress {
  return binding.localAddress(fd);
}

/**
 * getpeername of an IPv4/IPv6 socket (ENOTCONN when not connected). With `words` (a Float64Array of at least
 * PEER_WORDS), the same read is written there too, as tcpInfo() writes the peer with `withPeer` (for peerText and a
 * lease mark's comparison).
 */
export function peerAddress(fd: number, words?: Float64Array): SocketAddress {
  return binding.peerAddress(fd, words);
}

// ---- Socket options (each throws the setsockopt error; the option name is in the message)

/** TCP_NODELAY. */
export function setNoDelay(fd: number, on: boolean): void {
  binding.setNoDelay(fd, on);
}

/** SO_LINGER {1, 0}: the socket's next close sends a reset (RST), dropping what is unsent (daemon/socket-reset.ts). */
export function setLingerReset(fd: number): void {
  binding.setLingerReset(fd);
}

/** SO_LINGER {0, 0}, the kernel's default: undoes setLingerReset, the next close sends FIN after what is queued. */
export function disarmLinger(fd: number): void {
  binding.disarmLinger(fd);
}

/** SO_KEEPALIVE, plus TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT for the values given. */
export function setKeepAlive(fd: number, on: boolean, idleSec?: number, intervalSec?: number, count?: number): void {
  binding.setKeepAlive(fd, on, idleSec, intervalSec, count);
}

/** TCP_USER_TIMEOUT in milliseconds (0 = the system default). */
export function setUserTimeout(fd: number, ms: number): void {
  binding.setUserTimeout(fd, ms);
}

/** SO_MARK (0 to 2^32-1). Needs CAP_NET_ADMIN: without it this throws EPERM. */
export function setMark(fd: number, mark: number): void {
  binding.setMark(fd, mark);
}

/** TCP_ULP: attaches an upper-layer protocol ("tls") to a connected TCP socket. ENOENT: the kernel has none by that name. */
export function setTcpUlp(fd: number, name: string): void {
  binding.setTcpUlp(fd, name);
}

/** SO_BINDTODEVICE; '' removes the binding. Unknown or over-long names throw ENODEV. */
export function bindToDevice(fd: number, name: string): void {
  binding.bindToDevice(fd, name);
}

// ---- Routing

/**
 * The kernel's routes of type RTN_LOCAL (both families) of routing table `table`, or of every table (0, the
 * default): one rtnetlink dump (RTM_GETROUTE) per family that the kernel filters by type and table itself
 * (NETLINK_GET_STRICT_CHK), so a routing table of a million routes costs a walk in the kernel, not a million
 * messages. The netlink socket is the call's own: opened and closed within it, on every path. Throws the failed
 * syscall's error (socket EAFNOSUPPORT where AF_NETLINK is not allowed; ENOENT for an IPv4 table that does not
 * exist), EBADMSG for a reply it cannot read, E2BIG past 262,144 local routes of one family, EAGAIN when the
 * routes kept changing during three dumps.
 */
export function localRoutes(table = 0): LocalRoutes {
  return binding.localRoutes(table);
}

// ---- Liveness and identity

/**
 * Liveness of an idle socket, without consuming anything (recv MSG_PEEK, plus TCP_INFO for TCP, and SIOCINQ for an
 * established one the peek finds empty: bytes before a peek offset a copy's holder set, SO_PEEK_OFF, are `data`).
 */
export function probe(fd: number): ProbeResult {
  return binding.probe(fd);
}

/** SO_PEERCRED of a connected AF_UNIX socket: the peer process at connect time. */
export function peerCredentials(fd: number): PeerCredentials {
  return binding.peerCredentials(fd);
}

/** SO_PEERGROUPS of a connected AF_UNIX socket: the peer process's supplementary groups at connect time. */
export function peerGroups(fd: number): number[] {
  return binding.peerGroups(fd);
}

/**
 * Makes the kernel refuse fds sent to this Unix socket (SO_PASSRIGHTS = 0: the sender's sendmsg fails with EPERM);
 * on a listener, the connections it accepts inherit it. False where the kernel lacks the option (before Linux 6.16).
 */
export function refuseFdPassing(fd: number): boolean {
  return binding.refuseFdPassing(fd);
}

/**
 * Bytes of the messages this AF_UNIX socket sent that its peer has not read yet (SIOCOUTQ; the kernel's accounting,
 * so more than the payloads). 0: the peer has read everything, and no fd sent on it is still in flight.
 */
export function unreadOutput(fd: number): number {
  return binding.unreadOutput(fd);
}

/**
 * TCP_INFO's byte counters and, unless `queues` is false, the socket's queue lengths (SIOCOUTQ, SIOCINQ: two more
 * syscalls). ENOPROTOOPT for a socket that is not TCP.
 */
export function tcpCounters(fd: number, queues = true): TcpCounters {
  return binding.tcpCounters(fd, queues);
}

/** Where tcpInfo() writes each field (a counter the kernel does not report is NaN). */
export const TcpInfoField = {
  tcpState: 0,
  bytesSent: 1,
  bytesAcked: 2,
  bytesReceived: 3,
  notsentBytes: 4,
  /** With `withPeer`: the peer as four words (peerText): family × 65536 + port, then the address. */
  peer: 5,
  /** With `withMark`: the socket's inode (as socketInode). */
  inode: 9,
  /** With `withMark`: bytes not yet sent or not yet acknowledged (SIOCOUTQ). */
  outq: 10,
  /** With `withMark`: bytes received that nobody read (SIOCINQ). */
  inq: 11,
} as const;
/** Length of the array tcpInfo() fills (with `withMark`; with `withPeer` alone the first nine, without either five). */
export const TCP_INFO_FIELDS = 12;
/** Words of the peer tcpInfo() writes from TcpInfoField.peer on. */
export const PEER_WORDS = 4;

/**
 * One getsockopt(TCP_INFO), written into `out` (a Float64Array of TCP_INFO_FIELDS, indexed by TcpInfoField)
 * instead of a new object: the handoff path's single probe. With `withPeer`, one getpeername too, in the same call
 * (the release check's). With `withMark`, one fstat (the inode) and the queue lengths, each read with an ioctl only
 * when TCP_INFO cannot tell it is 0 (a fresh connect's need none; the reasoning is at the addon's TcpInfo): a
 * socket's whole lease mark in one call. Throws the syscall's error (ENOTSOCK: not a socket; ENOPROTOOPT: not TCP;
 * ENOTCONN: no peer).
 */
export function tcpInfo(fd: number, out: Float64Array, withPeer = false, withMark = false): void {
  if (out === tcpInfoScratch) binding.tcpInfoScratch(fd, (withPeer ? 1 : 0) | (withMark ? 2 : 0));
  else binding.tcpInfo(fd, out, withPeer, withMark);
}

/**
 * An array for tcpInfo() that this thread's addon holds already (setTcpInfoScratch), so that a read into it passes
 * only the fd and the flags: checking a typed array and two optional booleans cost the release check on every
 * handoff about as much as the syscall's own entry. For a reader that takes what it needs before the next read (the
 * daemon's lease checks, lease-guard.ts). Its own ArrayBuffer: never a small array's storage on the JS heap, which a
 * GC may move.
 */
export const tcpInfoScratch = new Float64Array(new ArrayBuffer(TCP_INFO_FIELDS * Float64Array.BYTES_PER_ELEMENT));
binding.setTcpInfoScratch(tcpInfoScratch);

/** The peer words tcpInfo() wrote as `address port`, for messages. */
export function peerText(words: ArrayLike<number>): string {
  const family = Math.floor(words[0]! / 65536);
  const port = words[0]! % 65536;
  const bytes = (word: number, count: number) =>
    Array.from({ length: count }, (_, i) => Math.floor(word / 256 ** (count - 1 - i)) % 256);
  if (family === 4) return `${bytes(words[1]!, 4).join('.')} ${port}`;
  const all = [...bytes(words[1]!, 6), ...bytes(words[2]!, 6), ...bytes(words[3]!, 4)];
  const groups = Array.from({ length: 8 }, (_, i) => ((all[2 * i]! << 8) | all[2 * i + 1]!).toString(16));
  return `${groups.join(':')} ${port}`;
}

/** The socket's inode (its identity while any copy of it is open), or -1 when `fd` is not a socket. */
export function socketInode(fd: number): number {
  return binding.socketInode(fd);
}

/** Whether two fds are copies of one socket (same device and inode; false for anything but sockets). */
export function sameSocket(a: number, b: number): boolean {
  return binding.sameSocket(a, b);
}

/**
 * shutdown(SHUT_RDWR): the connection ends for every process that holds a copy of the socket (their reads see
 * EOF, their writes fail with EPIPE). false when it was not connected any more. The fd stays open.
 */
export function shutdown(fd: number): boolean {
  return binding.shutdown(fd);
}

/**
 * Disconnects a TCP socket (connect AF_UNSPEC), for every copy of it: the peer gets a reset and this socket's reads
 * fail with ECONNRESET (a shutdown sends a FIN, and reads see a clean end). False where the kernel refused it.
 */
export function disconnect(fd: number): boolean {
  return binding.disconnect(fd);
}

// ---- Ownership

/** A second fd (O_CLOEXEC) for the same socket or file; it belongs to the caller. */
export function dup(fd: number): number {
  return binding.dup(fd);
}

/**
 * close(2), and untrack. Throws SOCKPOOL_ERR_FD_POLLED if a Poller or PollSet of this thread still watches the fd
 * (nothing is closed then), EBADF if it is not open.
 */
export function close(fd: number): void {
  binding.close(fd);
}

/**
 * close() without the linger disarm close() makes (one setsockopt less), for a socket every copy of which was this
 * process's own from its socket() on: connected here, never lent or sent. Only a process holding a copy can set
 * SO_LINGER, so such a socket's linger is this process's choice (the daemon never sets one) and the close cannot
 * wait for it. Anything a client had, or may have had, goes through close(). Throws as close() does.
 */
export function closeNeverShared(fd: number): void {
  binding.closeNeverShared(fd);
}

/**
 * close() for an fd a peer sent (or a Unix socket whose unread messages a peer sent): any fd still queued in a Unix
 * socket is taken out and discarded first, and every socket's linger is turned off before it closes. The kernel
 * would otherwise drop the queued fds itself, in this thread, and the last close of a TCP socket with SO_LINGER set
 * and unsent data waits up to its linger time. Throws as close() does. `uid`: the peer's, when known: the fds of one
 * uid take at most its share of the closing threads (DeferredCloses), so one uid's closes held for good do not hold up
 * another's; without it they share one of their own.
 */
export function discard(fd: number, uid?: number): void {
  binding.discard(fd, uid);
}

/** The closing threads' state (DeferredCloses). */
export function deferredCloses(): DeferredCloses {
  return binding.deferredCloses();
}

/**
 * For the rest of this process, a thread found in close(), discard() or a receive for two looks of a watchdog
 * thread (25 ms apart) gets SIGURG, whose handler does nothing: that ends a close waiting out a linger the addon
 * could not turn off (the kernel's own drop of fds, or a client's copy of a lent socket given SO_LINGER again
 * between the addon's disarm and its close). Takes SIGURG for the process: the daemon's, never a library user's.
 */
export function startCloseWatchdog(): void {
  binding.startCloseWatchdog();
}

/**
 * Ownership of a received fd leaves this thread's JavaScript (handed to curl or net.Socket, sent to another
 * process and closed by whoever does that): thread teardown must not close it.
 */
export function untrack(fd: number): void {
  binding.untrack(fd);
}

/** This thread takes ownership of `fd` (e.g. its daemon link): teardown closes it unless closed or untracked. */
export function track(fd: number): void {
  binding.track(fd);
}

/** The fds this thread currently tracks, sorted (for tests and diagnostics). */
export function trackedFds(): number[] {
  return binding.trackedFds();
}
