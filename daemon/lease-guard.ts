// What the daemon keeps of a lent socket so that a client's word is not needed: its own copy of the fd (a dup;
// the client gets the other) and the socket's byte counters at the moment it was lent.
//
// - End of a lease (`closed`, the client's disconnect, maxLeaseMs): shutdown(SHUT_RDWR) on the daemon's copy ends
//   the connection for every process holding one, so a copy a client kept is dead; then the copy is closed.
// - `release`: the socket may go back to the pool only if the fd that came back is a copy of the same socket and
//   TCP_INFO shows no byte sent or received since it was lent and nothing queued either way. The caller then
//   pools it for the releasing uid alone (the client may still hold a copy); otherwise it is ended as above.
//
// fd ownership: `lend` returns a new fd (the copy to send) owned by the caller; the lent fd stays with the caller
// as the daemon's copy until `endConnection` closes it or the pool takes it back.

import * as native from '../shared/native.js';

/** The socket's counters when it was lent; undefined when they could not be read (never pooled again). */
export interface UsageMark {
  bytesSent: number | undefined;
  bytesAcked: number | undefined;
  bytesReceived: number | undefined;
}

/** Makes the copy that goes to the client (one fcntl) and reads the counters (one getsockopt). */
export function lend(fd: number): { copy: number; mark: UsageMark | undefined } {
  const mark = readMark(fd);
  return { copy: native.dup(fd), mark };
}

/** Why the socket cannot be lent to anyone again, or undefined when it is exactly as it was lent. */
export function usedSinceLent(fd: number, mark: UsageMark | undefined): string | undefined {
  if (!mark) return 'its byte counters are unreadable';
  let now: native.TcpCounters;
  try {
    now = native.tcpCounters(fd);
  } catch (error) {
    return `its byte counters are unreadable (${(error as Error).message})`;
  }
  if (now.tcpState !== 1) return `it is not established (TCP state ${now.tcpState})`;
  const outq = (now.outq ?? 0) + (now.notsentBytes ?? 0);
  if (outq > 0) return `${outq} bytes are waiting to be sent or acknowledged`;
  if ((now.inq ?? 0) > 0) return `${now.inq} bytes arrived that nobody read`;
  if (now.bytesSent !== mark.bytesSent) return `${(now.bytesSent ?? 0) - (mark.bytesSent ?? 0)} bytes were sent on it`;
  if (now.bytesAcked !== mark.bytesAcked) return 'bytes were sent on it';
  if (now.bytesReceived !== mark.bytesReceived) {
    return `${(now.bytesReceived ?? 0) - (mark.bytesReceived ?? 0)} bytes were received on it`;
  }
  return undefined;
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

function readMark(fd: number): UsageMark | undefined {
  try {
    const counters = native.tcpCounters(fd, false);
    return { bytesSent: counters.bytesSent, bytesAcked: counters.bytesAcked, bytesReceived: counters.bytesReceived };
  } catch {
    return undefined;
  }
}
