// The warm TLS relay thread's wait for a loopback pair (tls-relay-thread.ts), never blocking the thread. Why a pair
// is made through a short-lived 127.0.0.1 listener, and why in two attempts, is told above the addon's
// LoopbackPairListen; the attempts are shared/native.ts's startLoopbackPair, which never waits. Where a local user
// spraying 127.0.0.1 ports got in first and the kernel refused the second listener's socket filter (sockpoold drops
// CAP_NET_ADMIN), our own connection may come only with its SYN's retransmit: native.loopbackPair would wait for it
// with its thread blocked, and on the relay thread that would stall every session the thread relays, other clients'
// included. So the relay waits on its event loop (waitForLoopbackPair) while its other sessions keep flowing.
//
// fd ownership: waitForLoopbackPair owns the pending pair's listener and client from its call (tracked by this
// thread: the addon's teardown closes them if the thread ends first): it closes the listener (after the Poller
// watching it) whatever happens, and the client too unless it hands the pair, both ends, to `done`.

import * as native from '../shared/native.js';

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
  pending: native.PendingLoopbackPair,
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
          const code = native.socketError(listener) ?? 'EIO';
          throw Object.assign(new Error(`loopback pair: its listener failed (${code})`), { code });
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
