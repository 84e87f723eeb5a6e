// Resetting a net.Socket (RST instead of FIN) without Node's socket.resetAndDestroy().
//
// resetAndDestroy() goes through TCPWrap::Reset → uv_tcp_close_reset, which refuses with EINVAL while a shutdown is
// pending on the handle (an end() whose FIN has not gone out yet; a TLS socket's end() shuts its underlying TCP socket
// down too) — and TCPWrap marks itself closing all the same. The handle is then never closed: its fd stays open for
// the life of the thread, the socket emits an 'error' (EINVAL, syscall "reset") and no 'close', and Node's teardown
// of a worker thread waits for that handle for ever (Environment::CleanupHandles spins in uv_run), so terminate()
// never resolves. That is how a warm-TLS sockpoold's stop hung in its relay thread: a client that half-closed (the
// relay ends the origin's TLS, a shutdown of its TCP socket) and then failed (the relay resets the origin) in the
// same turn. test/socket-reset.test.ts reproduces it.
//
// Instead: SO_LINGER {1, 0} on the fd, then a plain destroy(), whose close sends the reset whatever is pending (what
// uv_tcp_close_reset does after its check). A socket with no fd left (destroyed, or still connecting) is destroyed.
// The same option set in advance, and undone only once the socket ended cleanly (disarmReset), makes every other
// close of it a reset, even one no JavaScript runs for (a worker thread terminated, the process killed): the relay's
// end of a session's loopback pair (tls-relay-thread.ts).
import type { Socket } from 'node:net';
import * as native from '../shared/native.js';

/** Ends `socket` with a reset: the peer reads ECONNRESET, not a clean end. Closes its fd whatever it was doing. */
export function resetSocket(socket: Socket): void {
  if (socket.destroyed) return;
  const fd = fdOf(socket);
  if (fd !== undefined) {
    try {
      native.setLingerReset(fd);
    } catch {
      // The socket is already gone in the kernel's eyes (e.g. ENOTCONN after a reset): a plain close is all there is.
    }
  }
  socket.destroy();
}

/**
 * Undoes a reset armed in advance (SO_LINGER {1, 0} set on the fd when the socket was made, as the relay does for its
 * client's end: tls-relay-thread.ts), once the socket ended cleanly: its close then leaves what is queued and its FIN
 * to the kernel, as any close. Nothing for a socket with no fd left.
 */
export function disarmReset(socket: Socket): void {
  const fd = fdOf(socket);
  if (fd !== undefined) native.disarmLinger(fd);
}

/** The socket's fd; undefined once it has none (destroyed, or still connecting). */
function fdOf(socket: Socket): number | undefined {
  if (socket.destroyed) return undefined;
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  return fd !== undefined && fd >= 0 ? fd : undefined;
}
