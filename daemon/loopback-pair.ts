// The warm TLS relay thread's loopback pairs (tls-relay-thread.ts), made without ever blocking the thread. Why a pair
// is made through a short-lived 127.0.0.1 listener, and why in two attempts, is told above the addon's
// LoopbackPairListen. native.loopbackPair makes one the same way but may wait up to 3 s inside the addon for our own
// connection, with its thread blocked: a local user spraying 127.0.0.1 ports can bring that wait about where the kernel
// refuses the listener's socket filter (sockpoold drops CAP_NET_ADMIN). On the relay thread that would stall every
// session the thread relays, other clients' included. So here both attempts never wait (startLoopbackPair, on the
// common path synchronous, at the cost of loopbackPair), and the rare pair whose connection was not there at once is
// waited for on the thread's event loop (waitForLoopbackPair) while its other sessions keep flowing.
//
// fd ownership: startLoopbackPair returns a pair (both ends the caller's) or a PendingLoopbackPair (its listener and
// client the caller's, tracked by this thread: the addon's teardown closes them if the thread ends first).
// waitForLoopbackPair owns those two from its call: it closes the listener (after the Poller watching it) whatever
// happens, and the client too unless it hands the pair, both ends, to `done`.

import * as native from '../shared/native.js';

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
 * A loopback pair, in at most two attempts that never wait (the second with a listener that lets in our client alone,
 * where the kernel allows the filter): [accepted end, connecting end], or a PendingLoopbackPair for
 * waitForLoopbackPair. Throws as the addon does (EMFILE, say), leaving nothing open.
 *
 * `strangers`, a test seam (test/tls-relay-pair-wait.test.ts): called with each attempt's listener port before our
 * connect, to land connections there as a port sprayer would; the second listener is then unfiltered, as where the
 * kernel refuses the filter, but with the first's short queue (8) rather than the kernel's longest, so that a few
 * strangers fill it and our SYN waits for its retransmit.
 */
export function startLoopbackPair(strangers?: (port: number) => void): [number, number] | PendingLoopbackPair {
  const [listener, client] = native.loopbackPairListen();
  if (strangers) strangers(native.localAddress(listener).port);
  const pair = native.loopbackPairTry(listener, client);
  if (pair !== null) return pair;
  // Ours was not in the queue (strangers filled it first): made again. Neither fd was ever anyone else's.
  native.closeNeverShared(listener);
  native.closeNeverShared(client);
  const [second, secondClient, filtered] = native.loopbackPairListen(strangers === undefined);
  if (strangers) strangers(native.localAddress(second).port);
  const again = native.loopbackPairTry(second, secondClient);
  if (again !== null) return again;
  return { listener: second, client: secondClient, waitMs: filtered ? 1_000 : 3_000 };
}

/** An ETIMEDOUT error, as loopbackPair throws when its own connection never arrives. */
function neverArrived(waitMs: number): Error {
  return Object.assign(new Error(`loopback pair: our own connection never arrived within ${waitMs} ms`), {
    code: 'ETIMEDOUT',
  });
}

/**
 * Waits on this thread's event loop for a pending pair's own connection: at each readiness of the listener, strangers'
 * connections are closed (at most 64 a turn, so the thread's other callbacks run in between) until ours is there.
 * `done` gets the pair, or an error: ETIMEDOUT after `pending.waitMs`, or what the addon threw. It is never called
 * synchronously, nor after the returned function (abandon: the session no longer wants the pair) was called.
 * See the header for who closes what.
 */
export function waitForLoopbackPair(
  pending: PendingLoopbackPair,
  done: (error: Error | null, pair?: [number, number]) => void,
): () => void {
  const { listener, client, waitMs } = pending;
  let poller: native.Poller | undefined;
  let timer: NodeJS.Timeout | undefined;
  let settled = false;
  // The Poller closes before the listener it watches (close() refuses a watched fd); the client, unless it is the
  // pair's. Neither was ever anyone else's.
  const settle = (pair?: [number, number]) => {
    settled = true;
    clearTimeout(timer);
    poller?.close();
    native.closeNeverShared(listener);
    if (!pair) native.closeNeverShared(client);
  };
  try {
    poller = new native.Poller(listener, (status) => {
      if (settled) return;
      let pair: [number, number] | null;
      try {
        if (status < 0) {
          throw Object.assign(new Error(`loopback pair: its listener failed (${native.socketError(listener)})`), {
            code: native.socketError(listener) ?? 'EIO',
          });
        }
        pair = native.loopbackPairAccept(listener, client);
      } catch (error) {
        settle();
        done(error as Error);
        return;
      }
      // Strangers only so far: the Poller is level-triggered, so it calls again while more are queued.
      if (pair === null) return;
      settle(pair);
      done(null, pair);
    });
    poller.start(native.READABLE);
  } catch (error) {
    settle();
    throw error;
  }
  timer = setTimeout(() => {
    settle();
    done(neverArrived(waitMs));
  }, waitMs);
  return () => {
    if (!settled) settle();
  };
}
