// What the daemon keeps of a lent socket so that a client's word is not needed: its own copy of the fd (the fd
// stays open in the daemon while the client holds the copy the kernel made when the lease was sent) and the
// socket's identity and byte counters at the moment it was lent (a UsageMark).
//
// - End of a lease (`closed`, the client's disconnect, maxLeaseMs): shutdown(SHUT_RDWR) on the daemon's copy ends
//   the connection for every process holding one, so a copy a client kept is dead; then the copy is closed.
// - `release`: the socket may go back to the pool only if the fd that came back is a copy of the same socket and
//   TCP_INFO shows no byte sent or received since it was lent and nothing queued either way, and it is still
//   connected to the peer it was lent connected to (a client can reset the connection through its copy, which
//   zeroes the counters, and connect it anywhere again: only getpeername tells, unless the connect guard has the
//   kernel refuse that connect for this socket: UsageMark.reconnectRefused).
//   The caller then pools it for the releasing uid alone (the client may still hold a copy); otherwise it is ended
//   as above.
// - Idle in the pool: the mark travels with the socket, so the next handoff needs one TCP_INFO read to know the
//   socket is still established and received nothing (checkIdle), and that read is the next lease's mark.
//
// Why one TCP_INFO read is enough once a mark is `quiet` (nothing queued either way when it was taken):
// unread input means bytes_received moved (it counts every byte the kernel accepted); output not yet sent shows
// as notsent_bytes, output sent as bytes_sent, and an ack of earlier output as bytes_acked. A FIN or a reset
// changes the TCP state. So equal counters, notsent 0 and ESTABLISHED mean the queues are still empty. A mark
// that is not quiet (or a kernel without these counters) makes the check read the queues (SIOCOUTQ/SIOCINQ) too.
//
// A socket released and acquired again within RECENT_CHECK_MS is not read twice: the release check's TCP_INFO read
// stands for the idle check's, once. Any check is a snapshot, already tens to hundreds of µs old when the client
// first writes on the socket (the lease's way to it, its event loop, curl): an origin's FIN or bytes in that time
// reach the lease all the same. A read up to RECENT_CHECK_MS older widens that window by at most as much, and saves
// one of the two syscalls a release and the next lease make, the one before the lease is sent (on a core shared
// with the client, all of the daemon's work until it sleeps again is the client's wait). A socket released unused
// goes only to the releasing uid (origin-pool.ts), whose clients are one party to the daemon (docs/security.md):
// what a copy kept across the release does meanwhile reaches that uid's next lease and no other's. The sweep's check
// of kept sockets and the next release check read the counters again.
//
// fd ownership: nothing here opens or keeps an fd; `endConnection` closes the fd it is given.

import * as native from '../shared/native.js';

/** The socket when it was lent (or went idle); undefined when its counters could not be read (never pooled again). */
export interface UsageMark {
  /** The socket's inode: a released fd is the same socket exactly when its inode is this one. */
  inode: number;
  bytesSent: number | undefined;
  bytesAcked: number | undefined;
  bytesReceived: number | undefined;
  /** Nothing was queued either way when the counters were read (see the header). */
  quiet: boolean;
  /**
   * When (performance.now()) this mark last passed the release check, for the idle check that may reuse that read
   * once (see the header); -Infinity when no such read is there to reuse.
   */
  checkedAt: number;
  /**
   * The peer (getpeername, as the words native.tcpInfo writes with `withPeer`) when the mark was read in full: a
   * released socket must still be connected to it. connect() with AF_UNSPEC through a client's copy resets the
   * connection and every TCP_INFO counter with it, so a socket connected again elsewhere looks unused (see
   * checkReturned).
   */
  peer: readonly number[] | undefined;
  /**
   * The kernel refuses every connect() of this socket after the daemon's own: the daemon that connected it has its
   * connect guard enforced (connect-guard.ts; ConnectedSocket.reconnectRefused), so no copy of it can be connected
   * elsewhere and the release check does not read the peer (the getpeername was one syscall of every release). The
   * socket's own, from its connect on: not a process-wide setting, which a program embedding several daemons (one
   * guarded, one not) made the last constructed daemon's for every socket of every daemon, nor for a socket taken
   * back from the fd store (made in a cgroup the guard may not cover: false).
   */
  reconnectRefused: boolean;
}

/** How old a passed release check's read may be to stand for the next idle check of the socket (see the header). */
export const RECENT_CHECK_MS = 1;

/** Why an idle socket cannot be handed out (the pool's drop reasons). */
export type IdleFault = 'eof' | 'data' | 'error';

/** What each read below writes, taken before the next (the addon's own array: native.tcpInfoScratch). */
const info = native.tcpInfoScratch;
const { tcpState, bytesSent, bytesAcked, bytesReceived, notsentBytes, peer: peerAt } = native.TcpInfoField;
const { inode: inodeAt, outq, inq } = native.TcpInfoField;
const TCP_ESTABLISHED = 1;
const TCP_CLOSE_WAIT = 8;

/**
 * The socket's mark read in full (inode, peer, TCP_INFO and both queue lengths, in one native call: fstat,
 * getpeername, TCP_INFO, and a queue's ioctl only where TCP_INFO cannot tell it is empty): for sockets the daemon
 * did not see go quiet itself (fresh connects, sockets adopted from the fd store). Undefined when it is not an
 * established TCP socket or its counters cannot be read. `connectedPeer`: the connector's read of the peer
 * (ConnectedSocket.connectedPeer), taken as the mark's instead of a getpeername: no other process has held the
 * socket since that read, so it cannot have been connected anywhere else. `reconnectRefused`: the socket's
 * (ConnectedSocket.reconnectRefused), kept by every mark read of it after this one.
 */
export function markOf(fd: number, connectedPeer?: readonly number[], reconnectRefused = false): UsageMark | undefined {
  try {
    native.tcpInfo(fd, info, connectedPeer === undefined, true);
  } catch {
    return undefined;
  }
  if (info[tcpState] !== TCP_ESTABLISHED) return undefined;
  const sent = counted(info[bytesSent]!);
  const acked = counted(info[bytesAcked]!);
  const received = counted(info[bytesReceived]!);
  return {
    inode: info[inodeAt]!,
    bytesSent: sent,
    bytesAcked: acked,
    bytesReceived: received,
    // notsentBytes === 0 also says the kernel reports it (NaN, when it does not, is not 0).
    quiet: info[outq] === 0 && info[inq] === 0 && info[notsentBytes] === 0 && hasCounters(sent, acked, received),
    checkedAt: Number.NEGATIVE_INFINITY,
    peer: connectedPeer ?? Array.from(info.subarray(peerAt, peerAt + native.PEER_WORDS)),
    reconnectRefused,
  };
}

/**
 * The one probe of a warm handoff: is the idle socket with quiet mark `mark` exactly as it went idle (one
 * TCP_INFO read, or none within RECENT_CHECK_MS of a passed release check: see the header)? Returns the mark for
 * the lease that follows, or why the socket must be dropped. Without a quiet mark it falls back to the full probe
 * (recv MSG_PEEK and TCP_INFO) and a full mark. `now`: performance.now(), passed in by a caller that has it.
 */
export function checkIdle(fd: number, mark: UsageMark | undefined, now = performance.now()): UsageMark | IdleFault {
  if (mark !== undefined && now - mark.checkedAt <= RECENT_CHECK_MS) {
    mark.checkedAt = Number.NEGATIVE_INFINITY; // once: the next handoff of this socket reads it again
    return mark;
  }
  if (mark?.quiet) {
    try {
      native.tcpInfo(fd, info);
    } catch {
      return 'error';
    }
    const state = info[tcpState];
    if (state === TCP_CLOSE_WAIT) return 'eof';
    if (state !== TCP_ESTABLISHED) return 'error';
    // Anything received (even a FIN's data before it), or anything written by a holder of a copy: not idle.
    if (info[bytesReceived] !== mark.bytesReceived) return 'data';
    if (info[bytesSent] !== mark.bytesSent || info[bytesAcked] !== mark.bytesAcked || info[notsentBytes] !== 0) {
      return 'error';
    }
    return mark;
  }
  const probe = native.probe(fd);
  if (probe.state !== 'alive' || probe.tcpState !== TCP_ESTABLISHED) {
    return probe.state === 'alive' ? 'error' : probe.state;
  }
  return markOf(fd, undefined, mark?.reconnectRefused) ?? 'error';
}

/**
 * Why the socket cannot be lent to anyone again, or its mark (quiet: it goes back to the pool with it) when it is
 * exactly as it was lent.
 */
export function checkReturned(fd: number, mark: UsageMark | undefined, now = performance.now()): UsageMark | string {
  if (!mark) return 'its byte counters are unreadable';
  const readPeer = mark.peer !== undefined && !mark.reconnectRefused;
  if (mark.quiet) {
    // One TCP_INFO read decides (see the header), and the peer read in the same call unless the kernel refuses
    // a reconnect anyway. (No flag argument without the peer: the addon reads an absent one for least.)
    try {
      if (readPeer) native.tcpInfo(fd, info, true);
      else native.tcpInfo(fd, info);
    } catch (error) {
      return `its byte counters or its peer are unreadable (${(error as Error).message})`;
    }
    if (info[tcpState] !== TCP_ESTABLISHED) return `it is not established (TCP state ${info[tcpState]})`;
    if (info[notsentBytes]! > 0) return `${info[notsentBytes]} bytes are waiting to be sent`;
    const misuse =
      changedSince(mark, info[bytesSent], info[bytesAcked], info[bytesReceived]) ??
      (readPeer ? changedPeer(mark) : undefined);
    if (misuse !== undefined) return misuse;
    mark.checkedAt = now;
    return mark;
  }
  // Not quiet: the queues are read too (withMark: each ioctl only where TCP_INFO cannot show its queue empty), and
  // the peer in the same call.
  try {
    native.tcpInfo(fd, info, readPeer, true);
  } catch (error) {
    return `its byte counters or its peer are unreadable (${(error as Error).message})`;
  }
  if (info[tcpState] !== TCP_ESTABLISHED) return `it is not established (TCP state ${info[tcpState]})`;
  const waiting = (counted(info[outq]!) ?? 0) + (counted(info[notsentBytes]!) ?? 0);
  if (waiting > 0) return `${waiting} bytes are waiting to be sent or acknowledged`;
  const unread = counted(info[inq]!) ?? 0;
  if (unread > 0) return `${unread} bytes arrived that nobody read`;
  const sent = counted(info[bytesSent]!);
  const acked = counted(info[bytesAcked]!);
  const received = counted(info[bytesReceived]!);
  const misuse = changedSince(mark, sent, acked, received) ?? (readPeer ? changedPeer(mark) : undefined);
  if (misuse !== undefined) return misuse;
  // The queues were just read empty: from here on one TCP_INFO read per check is enough.
  return {
    ...mark,
    quiet: hasCounters(sent, acked, received, counted(info[notsentBytes]!)),
    checkedAt: Number.NEGATIVE_INFINITY,
  };
}

/** Why the socket cannot be lent again, or undefined when it is exactly as it was lent (checkReturned's verdict). */
export function usedSinceLent(fd: number, mark: UsageMark | undefined): string | undefined {
  const verdict = checkReturned(fd, mark);
  return typeof verdict === 'string' ? verdict : undefined;
}

/** Whether nothing came from the peer on the socket since `mark` was read (when it was lent); false when unknown. */
export function receivedNothingSince(fd: number, mark: UsageMark | undefined): boolean {
  if (mark?.bytesReceived === undefined) return false;
  try {
    native.tcpInfo(fd, info);
  } catch {
    return false;
  }
  return counted(info[bytesReceived]!) === mark.bytesReceived;
}

/** Ends the connection for every holder of a copy, then closes the daemon's copy. */
export function endConnection(fd: number): void {
  try {
    native.shutdown(fd);
  } catch {
    // Not a socket any more (cannot happen for our own copy) or already torn down: closing is all that is left.
  }
  native.close(fd);
}

/**
 * Ends a relayed warm TLS session's lease: the client's end of its loopback pair is disconnected (connect AF_UNSPEC,
 * for every copy), then the daemon's copy closed. The relay reads a reset: the client is gone, and it ends the
 * origin's TLS cleanly (close_notify, FIN), waiting a short bound at most for the origin's end (tls-relay-thread.ts,
 * clientGone); a FIN (endConnection) read as the client's half-close, and the relay lingered up to its LINGER_MS for
 * an answer nobody would read, the origin's connection and the relay's fds held past the lease, outside every per-uid
 * and per-origin bound. A copy the client kept reads ECONNRESET, not a clean end.
 */
export function endRelayedConnection(fd: number): void {
  resetConnection(fd);
  native.close(fd);
}

/** Disconnects a socket for every copy of it (native.disconnect: a reset, reads fail with ECONNRESET); the fd stays
 *  open. One no longer connected (its peer ended it first) needs nothing. */
export function resetConnection(fd: number): void {
  try {
    native.disconnect(fd);
  } catch {}
}

function changedSince(
  mark: UsageMark,
  sent: number | undefined,
  acked: number | undefined,
  received: number | undefined,
): string | undefined {
  if (!sameCount(sent, mark.bytesSent)) return `${(sent ?? 0) - (mark.bytesSent ?? 0)} bytes were sent on it`;
  if (!sameCount(acked, mark.bytesAcked)) return 'bytes were sent on it';
  if (!sameCount(received, mark.bytesReceived)) {
    return `${(received ?? 0) - (mark.bytesReceived ?? 0)} bytes were received on it`;
  }
  return undefined;
}

/**
 * Why the socket is not the connection the mark was read on: connected again to another peer through a client's copy
 * (the counters alone cannot tell: see UsageMark.peer). Reads the peer words the caller's tcpInfo(…, true) left in
 * `info`: one getpeername per release, inside that call.
 */
function changedPeer(mark: UsageMark): string | undefined {
  const lent = mark.peer;
  if (lent === undefined) return undefined;
  for (let i = 0; i < native.PEER_WORDS; i++) {
    if (info[peerAt + i] !== lent[i]) {
      const now = native.peerText(info.subarray(peerAt, peerAt + native.PEER_WORDS));
      return `it was connected again, to ${now} (lent connected to ${native.peerText(lent)})`;
    }
  }
  return undefined;
}

/** Equal counts; a counter this kernel does not report (undefined, or NaN from tcpInfo) matches itself. */
function sameCount(now: number | undefined, then: number | undefined): boolean {
  const a = now === undefined || Number.isNaN(now) ? undefined : now;
  return a === then;
}

/** A counter as a mark keeps it: undefined when this kernel does not report it (NaN from tcpInfo). */
function counted(value: number): number | undefined {
  return Number.isNaN(value) ? undefined : value;
}

function hasCounters(...values: Array<number | undefined>): boolean {
  return values.every((value) => value !== undefined && !Number.isNaN(value));
}
