// Where curl's sockets come from in a worker thread. curl keeps its own connection cache (keep-alive, HTTP/2), so
// we ask the daemon for an fd only when a transfer is likely to need a new connection, hand it to curl exactly
// once through OPENSOCKETFUNCTION, and give it back if curl reused a cached connection instead.
//
// fd ownership, step by step:
// 1. DaemonLink.acquire resolves: the fd belongs to the transfer's slot (tracked by the addon for this thread, so
//    it is closed if the thread dies).
// 2. OPENSOCKETFUNCTION returns it: ownership passes to curl (untracked; recorded in #curlOwned with its lease).
//    If the thread dies now, curl's handles are cleaned up with it and the patched CLOSESOCKETFUNCTION closes the
//    fd natively; the daemon frees the lease when the thread's link closes.
// 3. CLOSESOCKETFUNCTION: curl is done with it; we tell the daemon `closed {leaseId}` and node-libcurl closes it
//    right after the callback (CLOSE_NATIVELY: the one close on every path, the callback cut short included).
// 4. A slot curl never took is released to the daemon (release takes the fd) when the transfer ends.
//
// How many connections an origin needs: HTTP/1.1 one per transfer in flight; HTTP/2 one per as many streams as a
// connection carries (curl's cap of 100, or fewer by the server's SETTINGS). While a socket is on its way for an
// https origin that multiplexes, or may (its first response, by ALPN, has not said yet), other transfers get no
// socket of their own: they join it (a group) and multiplex over its connection, or, if it turns out to be HTTP/1.1,
// find their slot empty ("starved") and are run again with a socket.
// - When curl holds no other connection to the origin, the joiners go on once curl has taken the socket, and wait
//   on the connection in curl (PIPEWAIT).
// - When it holds one (full: that is why a socket was brought), they go on once the new connection is up and the
//   server's SETTINGS (how many streams) are in: at its first response head, or at the latest a while after its
//   handshake (SETTINGS_WAIT_HANDSHAKES). curl 7.88 waits for a connection still being made only while it knows no
//   HTTP/2 connection to the origin (one still connecting is marked to close until then, and skipped): joiners that
//   went on at once were starved, and each ran again with a socket of its own. Streams sent before the SETTINGS
//   came were refused beyond them (4 of 64 requests failed at a server allowing 20). And the response itself may
//   wait for the joiners' own requests (a server that answers a batch together), so it is not waited for alone.
// A joiner starved while others of its group got on (or at an origin known to speak HTTP/2) found the connection
// full: it joins again (the engine's `rejoin`), in groups no larger than a connection carried then (`streams`), one
// socket each. Found measuring (seventeenth session): 250 requests at once on one thread (concurrencyPerThread 250)
// to an HTTP/2 origin opened 51 connections (one up already) or 135 (none), 40 at a server allowing 10 streams 21
// (the default client): each beyond the first connection's streams acquired a socket of its own.
// `streams` is a guess, and a low one never corrected itself (twentieth session): a group no larger than it always
// boards, so nothing is learned from it, and every later burst was cut into groups that small, one new connection
// each (40 at a server allowing 10 took 14 connections after 3 was learned). It is learned low when the group's
// connection carried other transfers as its joiners got on. One way is closed: a group's first opens a connection
// of its own with its socket (the engine sets FRESH_CONNECT), where curl had put it on a connection with room for a
// moment, often another group's before that one's joiners got on, and that group's joiners then found it full (of 4
// groups of 12 three firsts went so, their sockets unused and 26 joiners run again: 9 connections where 4 do).
// Others remain: another group's joiners or transfers started meanwhile taking room on it (what a connection carries
// in total is not learned instead: curl 7.88 tells neither its streams per connection nor the server's limit, and
// counting every transfer's connection would take a callback on each). So the guess is probed upward: a group it
// closed (a transfer that would have joined brought the next socket instead) whose joiners all got on doubles it, up
// to curl's 100. A guess too high costs no connection: the joiners beyond the connection's room are starved, learn
// it again and join again in groups of that size (one more round for them). So that they are starved, not refused,
// a group formed on a doubled guess (`probe`) waits for the server's SETTINGS even on the origin's only connection:
// curl sends PIPEWAIT streams at ALPN, and the server refuses those beyond its limit (a POST then fails).
// A probe that starved found the connection's room: that value is kept as a ceiling (`streamsCeiling`) that no
// doubling passes for STREAMS_CEILING_MS. Without it a guess already right doubled on every group it closed, and the
// next group (a probe) ran half its joiners twice, one round more for them in every other group of a burst (found
// in review). Not for ever: a probe can starve low too (others took room on its connection), and a server may raise
// its limit; so a right guess costs one probe's extra round a period, and a low ceiling lasts one period.
//
// At an origin's cap (the daemon said so with a `reclaim` naming this thread's leases of it, within the last
// CONTENDED_MS), a connection that frees goes to a transfer of this thread waiting for a socket to the same HTTP/1.1
// origin: when a transfer ends while another one's acquire is still under way (waiting for room that this very
// connection may hold) and the origin then has more connections and sockets on their way than transfers, the oldest
// such acquire is given up (a lease that comes later goes back to the daemon) and that transfer runs on curl's idle
// connection. If curl finds none after all, the transfer is starved and runs again with a socket (`force`: that
// acquire is never given up). Away from a cap nothing is given up: the daemon would keep the abandoned acquire
// queued, and lend it a connection that only comes back.

import { IntMap } from '../shared/id-table.js';
import * as native from '../shared/native.js';
import type { Endpoint } from '../shared/origin.js';
import { Cancellation, type CancelSignal } from './cancellation.js';
import type { DaemonLink, Lease } from './daemon-link.js';

/**
 * CLOSESOCKETFUNCTION's answer that leaves the close to the patched node-libcurl, right after the callback returns
 * (patches/node-libcurl+5.1.2.patch, Easy::CbCloseSocket): the same close it makes when a callback does not return.
 */
export const CLOSE_NATIVELY = 2;

/** A socket prepared for one transfer, taken by curl at most once. */
export interface SocketSlot {
  originKey: string;
  lease: Lease | undefined;
  /** Set when curl asked for a socket and the slot was empty (the transfer must be retried with one). */
  starved: boolean;
  /** Set once curl took the leased fd. */
  taken: boolean;
  /** A socket for an https origin that multiplexes or may (protocol not known yet): others join it, to share its
   *  connection (see the header). */
  first?: Group | undefined;
  /** The group whose first socket the transfer waited for, to share its connection. */
  joined?: Group | undefined;
}

interface Settleable {
  promise: Promise<void>;
  settle(): void;
}

/** A first socket and the transfers that wait for it to share its connection. */
interface Group extends Settleable {
  joiners: number;
  /** Joiners that got a connection (curl's PREREQFUNCTION: `prerequest`). */
  onboard: number;
  /** When curl took the socket (performance.now()), while it waits for the connection's response. */
  openedAt: number | undefined;
  /** The daemon's connect time of the socket (a round trip; 0 when it was idle). */
  connectMs: number;
  /** The origin's `streams` turned a transfer away from it (it brought the next group's socket). */
  closed: boolean;
  /** Formed on a raised guess of `streams` (`streamsRaised`): its joiners wait for the SETTINGS (see the header). */
  probe: boolean;
}

/**
 * How long after the handshake of a group's connection its joiners go on at the latest, as a multiple of the
 * handshake's time or the daemon's connect time, whichever is longer (at least SETTINGS_WAIT_MIN_MS): the server's
 * SETTINGS come about one round trip after the handshake (which took one or two; a relayed session's was the
 * daemon's), and the response may take long (a slow or held request), which the joiners, whose own requests the
 * server may be waiting for, must not wait for.
 */
const SETTINGS_WAIT_HANDSHAKES = 2;
const SETTINGS_WAIT_MIN_MS = 5;

interface OriginState {
  /** Transfers in flight. */
  inFlight: number;
  /** Connections curl holds (fds it took and has not closed). */
  connections: number;
  /** Slots holding (or acquiring) an fd curl has not taken yet. */
  supplying: number;
  /** Learned from responses: true for HTTP/2, false for HTTP/1.x, undefined before the first response. */
  multiplexed: boolean | undefined;
  /** While a socket for an https origin that multiplexes (or may) is on its way to curl: settles when joiners may
   *  go on (see the header) or that attempt ended without. The newest group: an older one full (`streams`) goes on
   *  waiting for its own. */
  firstSocket: Group | undefined;
  /** How many transfers one connection carries: learned when joiners found it full, doubled when a group it closed
   *  fully boarded (see the header); undefined before. */
  streams: number | undefined;
  /** `streams` was doubled since it was last learned: a guess above anything seen. */
  streamsRaised: boolean;
  /** What a probe that starved learned: no doubling goes past it until `streamsCeilingUntil` (see the header). */
  streamsCeiling: number | undefined;
  streamsCeilingUntil: number;
  /** Acquires under way that a connection freeing here makes unnecessary (see the header), oldest first. */
  givenUpBy: GiveUp[];
  /** Of those, given up for a connection that freed, their transfers not yet run on it. */
  handingOver: number;
  /** A lease of the origin said it is rate-limited (`rate`): its requests take tokens. */
  rated: boolean;
  /** Until when (performance.now()) the origin counts as at its cap: a `reclaim` named a lease of it. */
  contendedUntil: number;
}

/**
 * How long after a `reclaim` naming an origin's lease the origin counts as at its cap (the daemon sends one every
 * 100 ms while acquires wait there).
 */
const CONTENDED_MS = 1_000;

/** An acquire that may be given up, and whether its request took its token here (rate-tokens.ts). */
interface GiveUp {
  cancellation: Cancellation;
  tokenTaken: boolean;
}

/** The reason an acquire is cancelled with when a connection of its origin freed in this thread. */
const CONNECTION_FREED = Symbol('a connection of the origin freed');

/** How long a probe's starved value caps the doubling of `streams` (see the header). */
const STREAMS_CEILING_MS = 30_000;

/** curl 7.88's own cap of streams on one HTTP/2 connection: no guess of `streams` goes beyond it. */
const CURL_MAX_STREAMS = 100;

export interface PrepareOptions {
  /** The daemon's proxy the socket must be tunnelled through, by name (part of the origin's key). */
  proxy?: string | undefined;
  /** https: the protocol is negotiated (ALPN); http: always HTTP/1.1. */
  secure: boolean;
  timeoutMs: number;
  /** https: what the client verifies against (tls-trust.ts); the daemon may then hand over a warm TLS session. */
  tlsTrust?: string | undefined;
  /** Acquire whatever the prediction says (the previous attempt was starved or its connection died). */
  force: boolean;
  /** Forced, but an origin known to speak HTTP/2 whose new connection is on its way has it shared instead: the
   *  transfers that lost their connection together (it closed, or a GOAWAY refused their streams) all run again
   *  at once, and each acquiring a socket of its own opened as many TCP connections as there were streams. A
   *  transfer that joined and was starved all the same (the connection turned out HTTP/1.1) does not join again
   *  (the engine's `joined`); one that found it full does (`rejoin`). */
  join?: boolean | undefined;
  /** The transfer's last join found the connection shared (`shared`): the origin multiplexes, though its first
   *  response may not have said so yet. */
  rejoin?: boolean | undefined;
  signal?: CancelSignal | undefined;
  /** The transfer took a token of its rate-limited origin already (rate-tokens.ts): the daemon charges none. */
  tokenTaken?: boolean | undefined;
}

function group(probe: boolean): Group {
  let settle!: () => void;
  const promise = new Promise<void>((resolve) => {
    settle = resolve;
  });
  return { promise, settle, joiners: 0, onboard: 0, openedAt: undefined, connectMs: 0, closed: false, probe };
}

/** `promise`, or signal.reason once `signal` aborts. */
function abortable(promise: Promise<void>, signal: CancelSignal | undefined): Promise<void> {
  if (!signal) return promise;
  signal.throwIfAborted();
  return new Promise<void>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    });
  });
}

/** What the supply needs of the daemon link (a fake one in test/socket-supply.test.ts). */
export type SupplyLink = Pick<DaemonLink, 'acquire' | 'release' | 'closed'> & Partial<Pick<DaemonLink, 'onReclaim'>>;

/** Idle origins whose protocol is remembered (a crawler meets many origins once). */
const MAX_LEARNED = 10_000;

export class SocketSupply {
  #link: SupplyLink;
  /** Sockets curl owns now, by fd: their leases, to report `closed` (unless reclaimed: reported already). An IntMap,
   *  not a Map: ../shared/id-table.ts says why. */
  #curlOwned = new IntMap<{ lease: Lease; originKey: string; reclaimed?: true }>();
  #origins = new Map<string, OriginState>();

  constructor(link: SupplyLink) {
    this.#link = link;
    link.onReclaim = (leaseIds, generation) => this.reclaim(leaseIds, generation);
  }

  /**
   * The daemon's `reclaim`: acquires of another client (or thread) wait at the origin's cap. Of the leases named,
   * those of origins with no transfer in flight in this thread sit idle in curl's cache: each is shut down (curl
   * finds it dead when it looks again, and closes it) and reported `closed` now, so that its room goes to the
   * waiters. While a transfer to the origin is in flight its connections are left alone (which one it uses is
   * curl's to know); the daemon asks again while its acquires still wait. Transfers that are themselves waiting for
   * a socket use none of them: with only those in flight, and none that may give its acquire up for an idle
   * connection instead (#giveUpOne, below), the idle ones go too. Left alone, a transfer of this thread that cannot
   * (`force`: curl found no connection for it) waited at the cap for the room this thread's own idle connection
   * held, until its acquire timed out (a burst to a capped origin split between the caller's thread and a worker
   * thread, or between two threads).
   *
   * `link`: the link connection the notice came on (`Lease.link`). Lease ids are the daemon process's own, from 1
   * again after it restarted: curl may still hold a lease of the daemon before with an id the notice names, which
   * this daemon knows nothing of (and which may be another origin's connection). Only leases of `link` count.
   */
  reclaim(leaseIds: number[], link: number): void {
    const wanted = new Set(leaseIds);
    const contendedUntil = performance.now() + CONTENDED_MS;
    const contended = new Set<OriginState>();
    for (const [fd, owned] of this.#curlOwned.entries()) {
      if (owned.reclaimed || owned.lease.link !== link || !wanted.has(owned.lease.leaseId)) continue;
      const origin = this.#origins.get(owned.originKey);
      if (origin) {
        origin.contendedUntil = contendedUntil;
        contended.add(origin);
      }
      if (origin !== undefined && origin.inFlight > 0 && !this.#onlyWaitingForSockets(origin)) continue;
      try {
        native.shutdown(fd);
      } catch {
        // (Not a socket any more: curl's, to close; the lease ends all the same.)
      }
      owned.reclaimed = true;
      this.#link.closed(owned.lease);
    }
    // Transfers of this thread may wait for room its own idle connection holds (it went idle before the notice came):
    // one of them takes it now, and each transfer that ends hands it on (finish).
    for (const origin of contended) this.#giveUpOne(origin);
  }

  /** Starts a transfer's accounting; acquires a socket when one will probably be needed (see the header).
   *  `key`: originKey of the target and options.proxy. */
  prepare(target: Endpoint, key: string, options: PrepareOptions): SocketSlot | Promise<SocketSlot> {
    const origin = this.#origin(key);
    origin.inFlight++;
    const slot: SocketSlot = { originKey: key, lease: undefined, starved: false, taken: false };
    // https origins that multiplex, or may: one socket at a time is brought for them (one a group, see the header).
    const mayMultiplex = options.secure && origin.multiplexed !== false;
    const join = !options.force || (options.join === true && (origin.multiplexed === true || options.rejoin === true));
    const first = mayMultiplex && join ? origin.firstSocket : undefined;
    if (first && (origin.streams === undefined || first.joiners + 1 < origin.streams)) {
      // Another transfer is bringing a connection: start only once joiners may share it (see the header), so as to
      // multiplex over it if it turns out to be HTTP/2 (else this transfer is starved and retried with a socket of
      // its own).
      first.joiners++;
      slot.joined = first;
      return this.#afterFirstSocket(first, key, origin, slot, options);
    }
    // (A group as large as a connection carries: this transfer brings the next one's socket.)
    if (options.force || first || this.#needsSocket(origin, options.secure)) {
      origin.supplying++;
      if (mayMultiplex && (!origin.firstSocket || first)) {
        if (first) first.closed = true;
        origin.firstSocket = group(origin.streamsRaised);
        slot.first = origin.firstSocket;
      }
      return this.#acquireInto(slot, target, key, origin, options);
    }
    // The common case under keep-alive: curl has a connection for it; no promise, no daemon round trip.
    return slot;
  }

  async #afterFirstSocket(
    first: Group,
    key: string,
    origin: OriginState,
    slot: SocketSlot,
    options: PrepareOptions,
  ): Promise<SocketSlot> {
    try {
      await abortable(first.promise, options.signal);
    } catch (error) {
      origin.inFlight--;
      this.#forget(key, origin);
      throw error;
    }
    return slot;
  }

  async #acquireInto(
    slot: SocketSlot,
    target: Endpoint,
    key: string,
    origin: OriginState,
    options: PrepareOptions,
  ): Promise<SocketSlot> {
    // HTTP/1.1 (one transfer per connection) and not forced: a connection freeing here may serve it instead.
    const mayGiveUp = !options.force && (!options.secure || origin.multiplexed === false);
    let signal = options.signal;
    let giveUp: GiveUp | undefined;
    let onAbort: (() => void) | undefined;
    if (mayGiveUp) {
      const cancellation = new Cancellation();
      giveUp = { cancellation, tokenTaken: options.tokenTaken === true };
      onAbort = () => cancellation.cancel(options.signal!.reason);
      // (Already aborted: the acquire below fails at once, in the try that undoes this transfer's accounting.)
      if (options.signal?.aborted) onAbort();
      else options.signal?.addEventListener('abort', onAbort, { once: true });
      origin.givenUpBy.push(giveUp);
      signal = cancellation;
    }
    try {
      const tls = options.tlsTrust === undefined ? undefined : { trust: options.tlsTrust };
      slot.lease = await this.#link.acquire(
        target.host,
        target.port,
        options.timeoutMs,
        signal,
        options.proxy,
        tls,
        options.tokenTaken,
      );
    } catch (error) {
      origin.supplying--;
      if (giveUp?.cancellation.reason === CONNECTION_FREED) return slot;
      origin.inFlight--;
      this.#settleFirst(origin, slot);
      this.#forget(key, origin);
      throw error;
    } finally {
      if (giveUp) {
        // (Given up for a freed connection: its transfer runs on it now, or has its lease after all.)
        if (giveUp.cancellation.reason === CONNECTION_FREED) origin.handingOver--;
        options.signal?.removeEventListener('abort', onAbort!);
        const index = origin.givenUpBy.indexOf(giveUp);
        if (index >= 0) origin.givenUpBy.splice(index, 1);
      }
    }
    return slot;
  }

  /** Whether the origin counts as at its cap now (a `reclaim` named a lease of it lately; see the header). */
  contended(key: string): boolean {
    const origin = this.#origins.get(key);
    return origin !== undefined && origin.contendedUntil > performance.now();
  }

  /** What the first response over an origin's connection said: HTTP/2 multiplexes, HTTP/1.x does not. */
  learnProtocol(key: string, multiplexed: boolean): void {
    const origin = this.#origins.get(key);
    if (origin) origin.multiplexed = multiplexed;
  }

  /**
   * Connections to the origin curl holds idle now (as a transfer to it ends): over HTTP/1.1 those beyond the transfers
   * in flight; over HTTP/2 every connection, which takes more streams. The caller's thread sends this thread the
   * requests to origins it has idle connections to (../client/thread-lanes.ts); a connection curl closes at the
   * transfer's end is gone by then (CLOSESOCKETFUNCTION comes first).
   */
  idleConnections(key: string): number {
    const origin = this.#origins.get(key);
    if (origin === undefined) return 0;
    if (origin.multiplexed) return origin.connections;
    return Math.max(0, origin.connections - origin.inFlight);
  }

  /** What an origin's first response said (learnProtocol): true for HTTP/2, false for HTTP/1.x, undefined before. */
  multiplexes(key: string): boolean | undefined {
    return this.#origins.get(key)?.multiplexed;
  }

  /** Whether an origin's protocol was learned (an https origin's first response says). */
  knowsProtocol(key: string): boolean {
    return this.#origins.get(key)?.multiplexed !== undefined;
  }

  /** OPENSOCKETFUNCTION: the slot's fd, once; ownership passes to curl. -1 (CURL_SOCKET_BAD) if none. */
  open(slot: SocketSlot): number {
    const lease = slot.lease;
    if (!lease || slot.taken) {
      slot.starved = true;
      // Others of its group got on: the connection was full after as many transfers (see the header).
      const joined = slot.joined;
      const origin = this.#origins.get(slot.originKey);
      if (joined && joined.onboard > 0 && origin) {
        origin.streams = joined.onboard + 1;
        origin.streamsRaised = false;
        if (joined.probe) {
          origin.streamsCeiling = origin.streams;
          origin.streamsCeilingUntil = performance.now() + STREAMS_CEILING_MS;
        }
      }
      return -1;
    }
    slot.taken = true;
    this.#curlOwned.set(lease.fd, { lease, originKey: slot.originKey });
    const origin = this.#origin(slot.originKey);
    origin.connections++;
    origin.supplying--;
    if (lease.rate) origin.rated = true;
    // The only connection curl holds to the origin: joiners go on now and wait on it in curl (PIPEWAIT), unless the
    // group is as large as a raised guess (`probe`). Else once its first response came, or a while after its
    // handshake (`responded`, `prerequest`; see the header).
    if (slot.first && origin.connections === 1 && !slot.first.probe) this.responded(slot);
    else if (slot.first) {
      slot.first.openedAt = performance.now();
      slot.first.connectMs = lease.connectMs;
    }
    // Untracked last, with no call after it: a thread terminated before this point still has the fd tracked (its
    // teardown closes it), and V8 acts on a terminate only at a function's entry or a loop's back edge, so none comes
    // between here and curl holding the fd. (What node-libcurl does after the callback returns is its own: see NOTES.)
    native.untrack(lease.fd);
    return lease.fd;
  }

  /**
   * A response head came over the connection of a transfer that brings a first socket (or curl took the socket as
   * the origin's only connection): the connection is up, and the server's SETTINGS are in. Its group goes on,
   * outside curl's call stack: joiners add handles to the Multi, which must not happen from inside one of its
   * callbacks.
   */
  responded(slot: SocketSlot): void {
    if (!slot.first) return;
    const origin = this.#origin(slot.originKey);
    setImmediate(() => this.#settleFirst(origin, slot));
  }

  /**
   * curl's PREREQFUNCTION for a slot of a group: its transfer got a connection and is about to send its request. A
   * joiner counts as on board; a first socket's group goes on once the server's SETTINGS are surely in, unless its
   * response comes first (`responded`). A transfer that found a connection of curl's with room (its socket not taken)
   * lets its group go on now.
   */
  prerequest(slot: SocketSlot): void {
    const origin = this.#origin(slot.originKey);
    const joined = slot.joined;
    if (joined) {
      joined.onboard++;
      // A group `streams` closed, all on board: a connection may carry more (see the header).
      if (joined.closed && joined.onboard === joined.joiners && origin.streams !== undefined) {
        const ceiling =
          origin.streamsCeiling !== undefined && performance.now() < origin.streamsCeilingUntil
            ? origin.streamsCeiling
            : CURL_MAX_STREAMS;
        const raised = Math.min(CURL_MAX_STREAMS, ceiling, origin.streams * 2);
        if (raised > origin.streams) {
          origin.streams = raised;
          origin.streamsRaised = true;
        }
      }
    }
    const group = slot.first;
    if (!group) return;
    let waitMs = 0;
    if (group.openedAt !== undefined) {
      const roundTripMs = Math.max(performance.now() - group.openedAt, group.connectMs);
      waitMs = Math.max(SETTINGS_WAIT_MIN_MS, SETTINGS_WAIT_HANDSHAKES * roundTripMs);
    }
    setTimeout(() => this.#settleFirst(origin, slot), waitMs);
  }

  /** Whether the connection a joiner waited for multiplexes (others of its group got on, or the origin is known to
   *  speak HTTP/2): starved, it found the connection full. */
  shared(slot: SocketSlot): boolean {
    if (!slot.joined) return false;
    return slot.joined.onboard > 0 || this.#origins.get(slot.originKey)?.multiplexed === true;
  }

  /**
   * CLOSESOCKETFUNCTION: curl is done with fd: its lease ends here, and node-libcurl closes it right after the
   * callback (CLOSE_NATIVELY), as it does whenever the callback did not return. Closed here, a thread terminated
   * between that close and the callback's return (the bookkeeping below, the link's sendmsg, the microtasks on the way
   * out) would have the number closed natively a second time, by then maybe another thread's fd.
   */
  close(fd: number): number {
    const owned = this.#curlOwned.get(fd);
    this.#curlOwned.delete(fd);
    if (owned) {
      const origin = this.#origins.get(owned.originKey);
      if (origin) {
        origin.connections--;
        this.#forget(owned.originKey, origin);
      }
      if (!owned.reclaimed) this.#link.closed(owned.lease);
    }
    return CLOSE_NATIVELY;
  }

  /** The transfer ended: an fd curl did not take goes back to the daemon (ownership passes to the link). */
  finish(slot: SocketSlot): void {
    const origin = this.#origins.get(slot.originKey);
    if (origin) {
      origin.inFlight--;
      // Its connection (if curl kept it) is idle now: at a cap it may serve a transfer waiting for a socket.
      this.#giveUpOne(origin);
      this.#settleFirst(origin, slot);
    }
    if (slot.lease && !slot.taken) {
      if (origin) origin.supplying--;
      this.#link.release(slot.lease);
      slot.lease = undefined;
    }
    if (origin) this.#forget(slot.originKey, origin);
  }

  /**
   * At the origin's cap, if it has more connections and sockets on their way than transfers in flight, one of those
   * sockets is not needed: the oldest transfer still waiting for one takes an idle connection instead (no more than
   * one: the others are counted on to run over it already). Not one whose token of a rate-limited origin the daemon
   * charges on that acquire (it went before the rate was known).
   */
  #giveUpOne(origin: OriginState): void {
    if (
      origin.givenUpBy.length === 0 ||
      origin.connections === 0 ||
      origin.connections + origin.supplying <= origin.inFlight ||
      origin.contendedUntil <= performance.now()
    ) {
      return;
    }
    const index = origin.givenUpBy.findIndex((waiting) => waiting.tokenTaken || !origin.rated);
    if (index < 0) return;
    const { cancellation } = origin.givenUpBy.splice(index, 1)[0]!;
    // (One its own signal aborted already keeps that reason: no transfer comes for the connection then.)
    if (cancellation.aborted) return;
    origin.handingOver++;
    cancellation.cancel(CONNECTION_FREED);
  }

  /** Whether every transfer to the origin in flight here waits for a socket of its own, none of them one that
   *  #giveUpOne may hand an idle connection: curl's connections to it serve none of them (see reclaim). */
  #onlyWaitingForSockets(origin: OriginState): boolean {
    return (
      origin.inFlight <= origin.supplying &&
      origin.handingOver === 0 &&
      !origin.givenUpBy.some((waiting) => waiting.tokenTaken || !origin.rated)
    );
  }

  #needsSocket(origin: OriginState, secure: boolean): boolean {
    const supplied = origin.connections + origin.supplying;
    if (secure && origin.multiplexed === undefined) return supplied === 0;
    if (origin.multiplexed) return origin.connections === 0 && origin.supplying === 0;
    // At the cap, with older transfers still waiting for a socket, a newcomer waits its turn too: the connection
    // that frees next is theirs (#giveUpOne), and a newcomer whose handle took it first (it was idle in curl's cache
    // a moment) starved them until their acquires timed out (threads: 0, maxPerOrigin 1: 3 of 8 requests failed).
    if (origin.givenUpBy.length + origin.handingOver > 0 && origin.contendedUntil > performance.now()) return true;
    return origin.inFlight > supplied;
  }

  #origin(key: string): OriginState {
    let origin = this.#origins.get(key);
    if (!origin) {
      origin = {
        inFlight: 0,
        connections: 0,
        supplying: 0,
        multiplexed: undefined,
        firstSocket: undefined,
        streams: undefined,
        streamsRaised: false,
        streamsCeiling: undefined,
        streamsCeilingUntil: 0,
        givenUpBy: [],
        handingOver: 0,
        rated: false,
        contendedUntil: 0,
      };
      this.#origins.set(key, origin);
    }
    return origin;
  }

  /** The slot that brings an origin's first socket is done with it (taken, failed or ended): waiters go on. */
  #settleFirst(origin: OriginState, slot: SocketSlot): void {
    if (!slot.first) return;
    slot.first.openedAt = undefined;
    slot.first.settle();
    if (origin.firstSocket === slot.first) origin.firstSocket = undefined;
    slot.first = undefined;
  }

  /** Drops an idle origin's entry, keeping what was learned about its protocol for up to MAX_LEARNED origins. */
  #forget(key: string, origin: OriginState): void {
    if (origin.inFlight > 0 || origin.connections > 0 || origin.supplying > 0) return;
    if (origin.multiplexed === undefined || this.#origins.size > MAX_LEARNED) this.#origins.delete(key);
  }
}
