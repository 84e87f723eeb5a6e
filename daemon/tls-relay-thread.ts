// A relay thread of sockpoold (see tls-relay.ts): completes TLS handshakes over connected TCP sockets the main
// thread hands in, then relays plaintext between each TLS connection and one end of a loopback TCP connection
// (loopback-pair.ts) whose other end the main thread keeps as the session's "socket" (idle in the pool, then
// leased to a client).
//
// fd ownership: an `open` message passes the TCP fd to this thread; from the net.Socket built on it, Node owns and
// closes it (destroy). The pair is made here once the handshake succeeded: this thread's end belongs to its
// net.Socket, the other end passes to the main thread with the `ready` message. On a failed handshake no pair
// exists and the TCP socket is destroyed here. If the thread ends, Node closes every handle it holds. A pair that
// waits for its own connection (loopback-pair.ts: a port sprayer got in first) has a listener and a client socket
// that are raw fds, not handles: the wait owns them and closes them when it ends or the session fails meanwhile, and
// the addon tracks them for this thread, so its teardown closes them if the thread ends first.
//
// One session, one direction at a time:
// - idle (the client has not written yet): what the server sends (an h2 server's SETTINGS, TLS 1.3
//   NewSessionTickets are consumed by TLS itself) is kept, up to MAX_EARLY_BYTES; the server's EOF or close_notify
//   ends our end of the pair, so the main thread's poller sees EOF on the idle socket and drops it.
// - leased (the client wrote): the kept bytes go first, then both directions flow with backpressure (a full
//   destination stops the source's reads, what came meanwhile held as bytes: relay-flow.ts). A clean EOF is carried
//   each way as a half-close (the client's socket ends with FIN once what the origin sent has gone out); an origin
//   that ends without a clean EOF (a reset, an error, a close without close_notify or FIN) resets the client's
//   socket, so a truncated response never looks complete. A client gone (its end reset, as the daemon resets it when
//   the lease ends; or an idle session's end closed) ends the origin's TLS cleanly too, close_notify and FIN, and
//   the origin's answer is waited for a short while only (clientGone in relay()).
// - after the client's half-close the origin may take its time to answer: the relay gives up only after LINGER_MS
//   in which the origin sent nothing (and then resets the client's socket: the response did not end cleanly).
// - every other end resets the client's socket too, those no JavaScript of this thread sees included: the thread
//   terminate()d by the daemon's stop (or as hung), the thread or the process dying. Node closes their handles
//   (the kernel, the fds of a killed process) as any close, and a plain close of our end sends FIN, so a client
//   reading a response until close read a cut one as complete. So our end's reset is armed as the pair is made
//   (SO_LINGER {1, 0}: any close of it sends RST) and disarmed only once its clean end went out (the client's
//   socket's 'finish': the origin's bytes and the FIN are in the kernel), or for an idle session, whose end is a FIN
//   for the pool (see teardown). One setsockopt a session, two for one that ends cleanly.

import type { Buffer } from 'node:buffer';
import { constants, createHash } from 'node:crypto';
import { isIP, Socket } from 'node:net';
import { setPriority } from 'node:os';
import process from 'node:process';
import {
  createSecureContext,
  DEFAULT_CIPHERS,
  type SecureContext,
  type TLSSocket,
  connect as tlsConnect,
} from 'node:tls';
import { parentPort, workerData } from 'node:worker_threads';
import * as native from '../shared/native.js';
import { DAEMON_UID } from './fair-queue.js';
import { waitForLoopbackPair } from './loopback-pair.js';
import { Bytes } from './relay-bytes.js';
import { ownTid } from './relay-clock.js';
import { Flow, type Reads } from './relay-flow.js';
import { relayCa } from './relay-trust.js';
import { disarmReset, resetSocket } from './socket-reset.js';
import type { RelayCounters, RelayRequest, RelayResponse, TlsFailureReason } from './tls-relay.js';

/**
 * What the server may send before the client's first bytes (an h2 server's SETTINGS and WINDOW_UPDATE: some tens of
 * bytes). Held for every session not spoken on yet, a uid's leases (maxLeasesPerUid) and its prewarmed idle ones
 * alike: at 64 KiB, one uid's sessions to an origin sending that much could hold hundreds of MB of this thread's
 * memory (test/daemon-trust-relay-memory).
 */
const MAX_EARLY_BYTES = 16 * 1024;
/**
 * After the client closed its side: how long the server may stay silent before the relay gives up on it (an idle
 * timeout, restarted by every byte the server sends; time the client's full socket holds the server back does
 * not count).
 */
const LINGER_MS = 60_000;
/**
 * After the client went (its end of the pair reset: the lease ended, or the client reset its copy): how long the
 * origin has to answer the relay's close_notify and FIN with its own end before its connection is reset. A polite
 * server answers within a round trip. What it sends meanwhile is read and dropped (the client is gone; OpenSSL itself
 * drops application data that comes after the close_notify it sent), so an origin still sending a response to nobody
 * costs the thread its decryption for this long at most, as a lent session's would.
 */
const ORIGIN_CLOSE_MS = 2_000;

const port = parentPort;
if (!port) throw new Error('tls-relay-thread runs as a worker thread');
const {
  closingOrigins = 1,
  counters: sharedCounters,
  heartbeat: sharedHeartbeat,
  nice,
  testSeams = false,
} = workerData as {
  /**
   * Origin connections this thread may keep closing at once (see clientGone in relay()), each uid its fair share of
   * them; past it, a client's end resets its origin's connection at once, as before. TlsRelays gives each thread its
   * part of RELAY_CLOSING_ORIGINS (tls-relay.ts).
   */
  closingOrigins?: number;
  counters: SharedArrayBuffer;
  /** Two Int32 slots: the first this thread's event loop bumps every HEARTBEAT_MS, the main thread's watchdog reads
   *  it (tls-relay.ts; config.ts, RELAY_HANG_LIMIT_MS); the second this thread's tid, by which the main thread reads
   *  how long it waited for a CPU (relay-clock.ts). */
  heartbeat: SharedArrayBuffer;
  nice: number;
  /**
   * Tests only (test/tls-relay-pair-wait.test.ts; TlsRelays never sets it): an `open` with `spray` has strangers
   * land on its loopback pair's listeners before ours (sprayStrangers), and a pair that goes on to wait says so with a
   * `pair-waiting` message.
   */
  testSeams?: boolean;
};
const counters = new Float64Array(sharedCounters);
try {
  // pid 0: this thread alone (Linux keeps a nice value per thread); see RELAY_THREAD_NICE in tls-relay.ts.
  setPriority(0, nice);
} catch {
  // Not allowed here (a seccomp filter without setpriority): the relay runs at the main thread's priority.
}
// Slots (see RelayCounters in tls-relay.ts). Only this thread writes them; aligned 8-byte stores are not torn on
// the platforms sockpoold runs on, and the main thread only reads them for stats.
const COUNTER: Record<keyof RelayCounters, number> = {
  bytesToOrigin: 0,
  bytesFromOrigin: 1,
  handshakes: 2,
  handshakeFailures: 3,
  sessions: 4,
  cpuMicros: 5,
};

const heartbeat = new Int32Array(sharedHeartbeat);
// Before the first beat: the watchdog counts the silence after it in this thread's available time (relay-clock.ts).
// (The main thread knows the tid from the spawn when it could tell which thread was new; this one is believed first.)
Atomics.store(heartbeat, 1, ownTid());
// The first beat at once: until it comes, the watchdog judges the thread's start (tls.relayHangMs from its spawn).
Atomics.add(heartbeat, 0, 1);
/**
 * The CPU time for stats, and the heartbeat the watchdog reads (tls-relay.ts): a timer, so the heartbeat moves only
 * while this thread's event loop turns (a loop stuck in one callback, or in a call that never returns, stops it).
 * Once a second, in the one timer: a wake-up of its own cost an idle relay thread as much CPU again as everything
 * else it does while idle, for nothing the watchdog's limit of seconds needs. Unref'd: it does not keep the thread
 * alive.
 */
const HEARTBEAT_MS = 1_000;
setInterval(() => {
  const now = threadCpuMicros();
  counters[COUNTER.cpuMicros] = now;
  account(undefined, now);
  Atomics.add(heartbeat, 0, 1);
}, HEARTBEAT_MS).unref();

/** A beat from within a turn of the loop that is working through handshakes (see open()). */
function beat(): void {
  Atomics.add(heartbeat, 0, 1);
}

/**
 * The handshake work one turn of this thread's loop does before the flights of the other handshakes under way wait
 * for the next turn (thread CPU, µs; see handshakeProgress). An honest flight costs a millisecond or two, so a burst's
 * flights that come in together mostly still go in one turn, and those that wait lose no more than that turn.
 */
const TURN_HANDSHAKE_BUDGET_MICROS = 10_000;

/**
 * A handshake under way: its request's id, its TCP socket's fd (the thread's net.Socket owns it), the bytes its TLS
 * socket had read from it at its last share of a split (see account), and its CPU (µs) not yet reported to the main
 * thread.
 */
interface Handshake {
  id: number;
  fd: number;
  read: number;
  unreported: number;
}

/** The handshakes under way on this thread, by TLS socket; one leaves as its handshake ends (handshakeOver). */
const handshaking = new Map<TLSSocket, Handshake>();

/**
 * A handshake's CPU past this much not yet reported is reported at once (a `cpu` message), not only with its result:
 * the main thread then knows a costly chain's cost as soon as it was checked, while the handshake may go on (a server
 * may hold its last flight until the handshake's timeout). An honest handshake (1–5 ms) reports with its result only.
 */
const REPORT_MICROS = 10_000;

/**
 * CPU spent between two points (see account) past which it is split among the handshakes by what each read, rather
 * than given to the point's own handshake or to nobody: more than an honest flight costs.
 */
const SPLIT_MICROS = 5_000;

/** The thread's CPU time up to which its work was accounted (account). */
let cpuMark = threadCpuMicros();

/**
 * The handshakes' CPU, measured for the main thread, which bounds each uid's share of it (relay-cpu.ts). The thread's
 * CPU between two points it sees is given to whoever did the work: a point is a handshake's event (handshakeProgress,
 * `own`: inside the turn that processes its server's flight, right after a costly part such as the chain check or
 * the key exchange; and at the end of open(), its ClientHello), or one of no handshake's (`own` undefined: relayed
 * bytes while handshakes are under way, a turn's end, the heartbeat's timer, an `open` message's start). libuv gives no
 * hook at the start of a socket's read, and a server may split its flight so that its chain is checked in a read with
 * no event (TLS 1.3: the ServerHello alone, then the certificates; or its Finished held back; TLS 1.2: its
 * ServerHelloDone, whose key exchange logs its one secret, held back): that check then ends at another point, maybe of
 * another handshake (another uid's). So CPU under SPLIT_MICROS goes to the point's own handshake (none: it was the
 * loop's or the relay's work); more is split among the handshakes by the bytes each read meanwhile (TCP_INFO's bytes
 * received less those still queued: a getsockopt and two ioctls a handshake, only then), as a chain's check grows with
 * the chain (a few ms per KB at most: OpenSSL allows costly keys only up to 3,072 bits, ~1.6 KB a certificate),
 * and given to `own` only when none read anything (a pause of the process, say). An honest handshake whose flight
 * came since its last share so gets a few percent of a costly check that ended beside it.
 */
function account(own: Handshake | undefined, now: number): void {
  const spent = Math.max(0, now - cpuMark);
  cpuMark = now;
  if (spent >= SPLIT_MICROS && split(spent)) return;
  if (own) charge(own, spent);
}

/** Splits `spent` among the handshakes by the bytes each read since its last share; false when none read any. */
function split(spent: number): boolean {
  const shares: Array<[Handshake, number]> = [];
  let total = 0;
  for (const handshake of handshaking.values()) {
    let read: number;
    try {
      const counts = native.tcpCounters(handshake.fd, true);
      read = (counts.bytesReceived ?? Number.NaN) - (counts.inq ?? 0);
    } catch {
      continue;
    }
    // (NaN, a kernel without the counter: not counted.)
    if (!(read > handshake.read)) continue;
    shares.push([handshake, read - handshake.read]);
    total += read - handshake.read;
    handshake.read = read;
  }
  for (const [handshake, bytes] of shares) charge(handshake, (spent * bytes) / total);
  return total > 0;
}

/** `micros` more of `handshake`'s CPU: reported at once past REPORT_MICROS. */
function charge(handshake: Handshake, micros: number): void {
  handshake.unreported += micros;
  if (handshake.unreported < REPORT_MICROS) return;
  post({ t: 'cpu', id: handshake.id, micros: Math.round(handshake.unreported) });
  handshake.unreported = 0;
}

/** Relayed bytes were handled: while handshakes are under way, a point of no handshake's (account). */
function relayed(): void {
  if (handshaking.size !== 0) account(undefined, threadCpuMicros());
}

/** Those whose reads this turn's gate stopped (handshakeProgress), started again as the turn ends (turnOver). */
const heldBack = new Set<TLSSocket>();

/**
 * A socket's stream handle (not in the public types; a TLS socket's is Node's TLSWrap, made by connect(), whose
 * readStop() stops the reads of the TCP socket under it): readStop() stops its reads, readStart() starts them again.
 * None once the socket is destroyed.
 */
function readingHandle(socket: Socket): { readStop(): number; readStart(): number } | undefined {
  if (socket.destroyed) return undefined;
  return (socket as unknown as { _handle: { readStop(): number; readStart(): number } | null })._handle ?? undefined;
}

/** TCP_INFO's tcpi_state of a connection its peer reset. */
const TCP_CLOSE = 7;
const tcpInfoOut = new Float64Array(native.TCP_INFO_FIELDS);

/** Whether the peer reset `socket`'s connection (it reads ECONNRESET once its queued bytes are read). */
function wasReset(socket: Socket): boolean {
  const fd = (socket as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  if (fd === undefined || fd < 0) return false;
  try {
    native.tcpInfo(fd, tcpInfoOut);
  } catch {
    return false;
  }
  return tcpInfoOut[native.TcpInfoField.tcpState] === TCP_CLOSE;
}

/** A relayed socket's reads, for the Flow it is the source of. (A socket being destroyed is left as it is.) */
function readsOf(socket: Socket): Reads {
  return {
    stop: () => readingHandle(socket)?.readStop(),
    start: () => readingHandle(socket)?.readStart(),
  };
}

/** The thread's CPU time at this turn's first handshake event; undefined until there is one. */
let turnStartedAt: number | undefined;

/**
 * An event of a handshake under way (`own`: its TLS socket), from inside the turn that processes its server's flight: a
 * beat for the watchdog, and the turn's gate. An origin chooses what checking its flight costs this thread (a chain
 * of up to OpenSSL's 100 KB of certificates with keys costly to check: ~330 ms a handshake, and Node has no bound on
 * the chain), and a holding proxy can release the flights of all the handshakes under way together, so that libuv
 * hands them to this thread in one batch of its poll: checked one after another in one turn, seconds in which every
 * session this thread relays (every uid's) waits. So once the handshake work of this turn passed
 * TURN_HANDSHAKE_BUDGET_MICROS, the other handshakes' reads stop until the turn ends: libuv skips, in the batch it is
 * working through, the events of a socket that stopped reading, so their flights wait for the next turn, which also
 * serves the relayed sessions' bytes that came meanwhile. A turn thus holds the budget and about one costly flight
 * (two in TLS 1.2, whose first event of a flight comes after the chain check; TLS 1.3 logs a secret before it). The
 * handshakes still overlap their round trips (their places are unchanged): only the processing of flights that came
 * together is spread over turns (test/daemon-trust-relay-cpu).
 */
function handshakeProgress(own: TLSSocket): void {
  beat();
  const now = threadCpuMicros();
  account(handshaking.get(own), now);
  if (turnStartedAt === undefined) {
    turnStartedAt = now;
    // In this turn's check phase, after its poll: the held handshakes read again in the next poll.
    setImmediate(turnOver);
    return;
  }
  if (now - turnStartedAt < TURN_HANDSHAKE_BUDGET_MICROS) return;
  for (const tls of handshaking.keys()) {
    if (tls === own || heldBack.has(tls)) continue;
    // A socket being destroyed, or a failed readStop, is left as it is: its handshake is ending anyway.
    if (readingHandle(tls)?.readStop() === 0) heldBack.add(tls);
  }
}

/** The end of a turn with handshake events (its check phase): the next turn's gate starts with its first event. */
function turnOver(): void {
  turnStartedAt = undefined;
  account(undefined, threadCpuMicros());
  for (const tls of heldBack) readingHandle(tls)?.readStart();
  heldBack.clear();
}

/**
 * A handshake ended (secureConnect, or failed): its last handshakeProgress; then the gate lets it go (reading).
 * Returns its CPU not reported yet (µs), for its result's message; 0 when it had ended already.
 */
function handshakeOver(tls: TLSSocket): number {
  const handshake = handshaking.get(tls);
  if (!handshake) return 0;
  handshakeProgress(tls);
  handshaking.delete(tls);
  if (heldBack.delete(tls)) readingHandle(tls)?.readStart();
  return Math.round(handshake.unreported);
}

port.on('message', (request: RelayRequest) => {
  if (request.t === 'open') open(request);
  // (A session gone meanwhile is not there any more.)
  else if (request.t === 'lease') lent.get(request.id)?.(request.uid);
});

/**
 * The test seam's port sprayer (see testSeams, and native.startLoopbackPair's `strangers`): 9 connections fill a queue of 8
 * (the kernel holds one more than the backlog), so that our SYN finds it full and waits for its retransmit. Each is
 * closed at once: a queued connection stays in the listener's queue once its socket is gone.
 */
function sprayStrangers(listenerPort: number): void {
  for (let i = 0; i < 9; i++) {
    const fd = native.tcpSocket(4);
    native.connectStart(fd, '127.0.0.1', listenerPort, 4);
    native.closeNeverShared(fd);
  }
}

function post(message: RelayResponse): void {
  port!.postMessage(message);
}

/**
 * Node's suites less finite-field DHE (TLS 1.2's DHE-*), as browsers offer. In DHE the server picks the group, and
 * the client's work grows with it: a 10,000-bit modulus (OpenSSL's largest; its check takes any odd number) costs this
 * thread two exponentiations with an exponent as long, about 1.5 s of CPU per handshake in one callback. An origin
 * any client may reach could so hold this thread's loop for seconds a handshake (every uid's relayed sessions stall,
 * and the watchdog takes the thread for hung and ends them: test/daemon-trust-relay-cpu). ECDHE and TLS 1.3 groups
 * are named, fixed-size curves and groups: their cost is the client's choice.
 */
const RELAY_CIPHERS = `${DEFAULT_CIPHERS}:!kDHE`;

/** TLS contexts by the request's contextKey (what they trust and present); few: one per configured CA and client
 *  certificate, new ones after a reload that changed a file. */
const contexts = new Map<string, SecureContext>();
const MAX_CONTEXTS = 64;

function contextFor(request: Extract<RelayRequest, { t: 'open' }>): SecureContext {
  let context = contexts.get(request.contextKey);
  if (!context) {
    // Files that changed leave their contexts behind: past the bound, start over.
    if (contexts.size >= MAX_CONTEXTS) contexts.clear();
    context = createSecureContext({
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.3',
      ciphers: RELAY_CIPHERS,
      // No renegotiation (TLS 1.2; 1.3 has none): an origin asking an established session for a new handshake, as
      // often as it liked and a full one each time, would have this thread verify its certificate chain again for each
      // (hundreds of ms for a hostile chain), for all its sessions at once, past the handshake places' bound. OpenSSL
      // answers no_renegotiation; a server insisting ends the session (test/daemon-trust-relay-cpu). HTTP/2 forbids
      // it anyway; what is lost: a TLS 1.2 server asking for a client certificate mid-connection (IIS) fails.
      secureOptions: constants.SSL_OP_NO_RENEGOTIATION,
      // The configured CA file, or for trust "system" the system store the client's curl trusts (relay-trust.ts).
      ca: relayCa(request.ca),
      ...(request.cert !== undefined ? { cert: request.cert, key: request.key } : {}),
    });
    contexts.set(request.contextKey, context);
  }
  return context;
}

function open(request: Extract<RelayRequest, { t: 'open' }>): void {
  // (Work before this message was none of this handshake's.)
  account(undefined, threadCpuMicros());
  const tcp = new Socket({ fd: request.fd, readable: true, writable: true, allowHalfOpen: true });
  const started = performance.now();
  let settled = false;
  // Its CPU that handshakeOver left to report, for its result's message.
  let cpuMicros = 0;
  // While the pair waits for its own connection (see 'secureConnect'): ends that wait.
  let abandonPair: (() => void) | undefined;
  const fail = (error: Error & { code?: string }) => {
    if (settled) return;
    settled = true;
    clearTimeout(timer);
    tls.removeListener('keylog', progress);
    // (After secureConnect, its handshake's CPU was counted there: a failed pair reports it here.)
    cpuMicros += handshakeOver(tls);
    abandonPair?.();
    abandonPair = undefined;
    counters[COUNTER.handshakeFailures]!++;
    tls.destroy();
    tcp.destroy();
    const reason = reasonOf(error);
    post({ t: 'failed', id: request.id, code: error.code ?? 'ERR', message: error.message, reason, cpuMicros });
  };
  let secureContext: SecureContext;
  try {
    secureContext = contextFor(request);
  } catch (error) {
    tcp.destroy();
    counters[COUNTER.handshakeFailures]!++;
    const failure = error as Error & { code?: string };
    const message = failure.message;
    post({ t: 'failed', id: request.id, code: failure.code ?? 'ERR', message, reason: 'handshake', cpuMicros: 0 });
    return;
  }
  const tls: TLSSocket = tlsConnect({
    socket: tcp,
    host: request.host,
    // SNI carries host names only, never IP literals (RFC 6066); verification still checks the IP SANs.
    servername: isIP(request.host) ? '' : request.host,
    ALPNProtocols: ['h2', 'http/1.1'],
    rejectUnauthorized: true,
    secureContext,
  });
  const timer = setTimeout(() => {
    const error = new Error(`TLS handshake with ${request.host}:${request.port} took over ${request.timeoutMs} ms`);
    fail(Object.assign(error, { code: 'ETIMEDOUT' }));
  }, request.timeoutMs);
  const closedEarly = () =>
    fail(Object.assign(new Error('connection closed during the TLS handshake'), { code: 'EOF' }));
  tls.once('error', fail);
  tls.once('close', closedEarly);
  // handshakeProgress as each of the handshake's secrets is derived (OpenSSL's key log: after the server's key
  // exchange in TLS 1.2; after its ServerHello, and again after its Finished, so its certificate chain checked, in
  // 1.3), and as it ends (handshakeOver). Its beats, not only the timer's: a turn can still take a costly flight or
  // two, in which the timer cannot run though the thread is working; without them the watchdog took such turns for a
  // hang and ended every session of the thread (test/daemon-trust-relay-cpu). A thread stuck in one callback or call
  // still beats no more. (The event carries the session's secrets as a key-log line; `progress` drops it unread: they
  // never leave this thread, which holds the session's keys anyway.)
  const progress = () => handshakeProgress(tls);
  tls.on('keylog', progress);
  // Its ClientHello (the socket, its key share) is its own cost. (A new connection: it has read nothing yet.)
  const handshake: Handshake = { id: request.id, fd: request.fd, read: 0, unreported: 0 };
  handshaking.set(tls, handshake);
  account(handshake, threadCpuMicros());
  // The pair, once made: the session is relayed and its other end goes to the main thread. `kept`: what the origin
  // sent while the pair was waited for.
  const established = (pair: [number, number], kept = new Bytes(MAX_EARLY_BYTES)) => {
    settled = true;
    clearTimeout(timer);
    tls.removeListener('error', fail);
    tls.removeListener('close', closedEarly);
    const certificate = tls.getPeerCertificate();
    counters[COUNTER.handshakes]!++;
    counters[COUNTER.sessions]!++;
    // Our end's reset armed before anything can close it (see the header; relay() disarms it on a clean end).
    native.setLingerReset(pair[0]);
    relay(request.id, tls, tcp, new Socket({ fd: pair[0], readable: true, writable: true, allowHalfOpen: true }), kept);
    post({
      t: 'ready',
      id: request.id,
      fd: pair[1],
      handshakeMs: performance.now() - started,
      cpuMicros,
      info: {
        version: tls.getProtocol() ?? 'unknown',
        alpn: typeof tls.alpnProtocol === 'string' ? tls.alpnProtocol : 'http/1.1',
        cipher: tls.getCipher()?.name ?? 'unknown',
        certSha256: certificate.raw ? createHash('sha256').update(certificate.raw).digest('hex') : '',
      },
    });
  };
  tls.once('secureConnect', () => {
    tls.removeListener('keylog', progress);
    cpuMicros += handshakeOver(tls);
    if (settled) return;
    let pair: [number, number] | native.PendingLoopbackPair;
    try {
      pair = native.startLoopbackPair(request.spray && testSeams ? sprayStrangers : undefined);
    } catch (error) {
      // (EMFILE, say.) Failed in a later turn: Node 24 crashes (SIGSEGV) when a TLS socket over a net.Socket is
      // destroyed inside its own 'secureConnect' callback, and that would take the whole daemon down.
      setImmediate(() => fail(error as Error));
      return;
    }
    if (Array.isArray(pair)) {
      established(pair);
      return;
    }
    // Our connection was not on the pair's listener at once (a port sprayer, see loopback-pair.ts): waited for on
    // this thread's loop, so its other sessions keep flowing. Meanwhile the handshake's timer still bounds the
    // session, and so does the origin: the TLS socket reads ahead by itself, so a reset fails it through 'error', but
    // a clean end (close_notify, FIN) is an 'end' event, which a stream emits only once what came before it was
    // read. So it is read here, what the origin sends kept for relay() (as relay keeps what comes before the client
    // speaks, with the same bound), and its end fails the session now rather than once it was handed out. fail()
    // abandons the wait, which closes the listener and client (the thread's teardown closes them, tracked, if the
    // thread ends first). None of these callbacks runs inside this one.
    const kept = new Bytes(MAX_EARLY_BYTES);
    const keep = (chunk: Buffer) => {
      kept.push(chunk);
      if (kept.length <= MAX_EARLY_BYTES) return;
      const error = new Error(`the origin sent over ${MAX_EARLY_BYTES} bytes before any request`);
      fail(Object.assign(error, { code: 'EPROTO' }));
    };
    const hungUp = () =>
      fail(Object.assign(new Error('the origin closed the connection before the session was ready'), { code: 'EOF' }));
    try {
      abandonPair = waitForLoopbackPair(pair, (error, made) => {
        abandonPair = undefined;
        if (error) {
          fail(error);
          return;
        }
        tls.removeListener('data', keep);
        tls.removeListener('end', hungUp);
        established(made!, kept);
      });
    } catch (error) {
      setImmediate(() => fail(error as Error));
      return;
    }
    tls.on('data', keep);
    tls.once('end', hungUp);
    if (testSeams) port!.postMessage({ t: 'pair-waiting', id: request.id });
  });
}

/** Origin connections closing now, their clients gone (see clientGone in relay()): at most closingOrigins. */
let closingNow = 0;
/** Of those, each uid's (DAEMON_UID's: sessions never lent); a uid's entry goes with its last. */
const closingByUid = new Map<number, number>();
/** Each relayed session (by its `open`'s id) until its end: told the uid it is lent to (a `lease` message). */
const lent = new Map<number, (uid: number) => void>();

/**
 * `id`: its `open`'s. `early`: what the origin sent before the relay started (at most MAX_EARLY_BYTES), the first of
 * its early bytes.
 */
function relay(id: number, tls: TLSSocket, tcp: Socket, client: Socket, early: Bytes): void {
  let leased = false;
  // Whose lease it is (TlsRelays.lent: the daemon lent it): whose share of the closing places its origin's close
  // takes. The daemon's until then (an idle session the pool closed).
  let uid = DAEMON_UID;
  lent.set(id, (lessee) => {
    uid = lessee;
  });
  // `early`: what the origin sends before the client speaks, kept as bytes (relay-bytes.ts: kept as TLS's chunks, one
  // per record, an origin sending one-byte records made each byte cost hundreds).
  let clientEnded = false;
  let originEnded = false;
  let closed = false;
  // The client went and the origin's connection is closing (clientGone): what the origin sends is dropped.
  let closing = false;
  // The idle timeout after the client's half-close (LINGER_MS), or the bound of a closing connection (ORIGIN_CLOSE_MS).
  let linger: NodeJS.Timeout | undefined;

  /**
   * `resetOrigin`: an origin connection that did not close cleanly in time once its client went (clientGone), or
   * that could not be given the time. `resetClient`: an origin that did not end cleanly (reset, error, gone silent)
   * resets the client's socket, as a direct client would see it: a FIN would tell it that a truncated response was
   * complete. Only once the client has spoken: an idle session (no client yet) ends with FIN, the EOF from which the
   * pool learns idle lifetimes.
   */
  const teardown = (resetOrigin: boolean, resetClient = false) => {
    if (closed) return;
    closed = true;
    clearTimeout(linger);
    counters[COUNTER.sessions]!--;
    lent.delete(id);
    if (closing) {
      closingNow--;
      const held = closingByUid.get(uid)! - 1;
      if (held > 0) closingByUid.set(uid, held);
      else closingByUid.delete(uid);
    }
    // An idle session (no client yet) ends with FIN however its origin ended: its reset (armed since the pair was
    // made) is disarmed first.
    if (!leased) disarmReset(client);
    if (resetClient && leased && !client.destroyed) resetSocket(client);
    else if (client.writableEnded && !client.writableFinished && !client.destroyed) {
      // A clean end on its way to the client (end() was called): its last bytes and FIN go out first. A client that
      // reads none of it for LINGER_MS gets a reset, not a FIN after a cut.
      const flushed = setTimeout(() => resetSocket(client), LINGER_MS);
      flushed.unref();
      client.once('finish', () => client.destroy());
      client.once('close', () => clearTimeout(flushed));
    } else client.destroy();
    if (resetOrigin && !tcp.destroyed) resetSocket(tcp);
    tls.destroy();
    tcp.destroy();
  };
  /**
   * The client went: its end of the pair was reset (the daemon resets it as the lease ends: `closed`, a release, its
   * client's session gone, the lease's time up; or the client reset its copy), or it closed without being spoken on
   * (an idle session the pool dropped: nobody reads what the origin sends any more). Its origin's TLS ends as a direct
   * client's clean close ends it, close_notify and then FIN (after what the client sent that is still on its way),
   * and the origin's own end is waited for, what it sends meanwhile read and dropped (a close with bytes unread would
   * be a reset); but for ORIGIN_CLOSE_MS at most: an origin that stays open, or still sends, is reset then (a direct
   * client's close with a response unread is a reset too). The client's end closes at once: a closing connection
   * holds its origin's socket alone, and at most closingOrigins of them a thread are closing at once, whatever
   * clients do (their leases' fds have left the per-uid bounds: quotas.ts); past it, the origin's connection is reset
   * at once, as it was for every lease before (an origin logged a reset a lease). And each uid its fair share of
   * them, by the rule of the resolver's system lookups and the fd budget (resolver.ts, quotas.ts): a uid holding h
   * takes one more only while more than h are free. One uid ending leases to silent origins as fast as it likes took
   * every place, and every other uid's lease ends reset their origins again; now it takes half of them alone, k uids
   * about a (k+1)th each, and a place stays free for the next. (The uid is the lease's, told by the main thread as it
   * lent the session; the daemon's for a session never lent, or one whose lease ended before the news came.) Once
   * the origin ended its side there is nothing to wait for.
   */
  const clientGone = (reset = false) => {
    if (closed || closing) return;
    if (originEnded) {
      teardown(false);
      return;
    }
    const held = closingByUid.get(uid) ?? 0;
    if (closingNow + held >= closingOrigins) {
      teardown(true);
      return;
    }
    closing = true;
    closingNow++;
    closingByUid.set(uid, held + 1);
    // (Its lease is over: no other uid's.)
    lent.delete(id);
    clearTimeout(linger);
    linger = setTimeout(() => teardown(true), ORIGIN_CLOSE_MS);
    linger.unref();
    // (An idle session's end stays a FIN, as in teardown.)
    if (!leased) disarmReset(client);
    client.destroy();
    // A reset client's request was cut off: what the relay holds of it is dropped, as a direct client's reset drops
    // its unsent bytes (what is on its way in the TLS socket is in records already); a clean end sends it all.
    toOrigin.end(reset);
    // (Reads stopped for a full client start again: what comes is dropped.)
    readingHandle(tls)?.readStart();
  };
  // Both sides ended cleanly, and the client's FIN went out after the last bytes for it (client.end() flushes).
  const bothEnded = () => {
    if (clientEnded && originEnded && client.writableFinished) teardown(false);
  };
  const lingerOver = () => {
    // The client's socket is full: the client is slow, not the origin (which is paused meanwhile).
    if (toClient.busy) {
      linger?.refresh();
      return;
    }
    // The origin ended cleanly (the client's FIN is on its way) or went silent without ending: give up.
    teardown(false, !originEnded);
  };
  // Nobody uses a session whose idle lifetime ran out in the middle of a message: what the server sent before the
  // client spoke is kept for it (bounded), and more than that means the connection is not an idle HTTP one.
  // Each direction's bytes go through a Flow (relay-flow.ts): held as bytes while its destination is full, its
  // source's reads stopped past a bound, where the streams' own backpressure held the chunks as they came.
  const toClient = new Flow(client, readsOf(tls));
  const toOrigin = new Flow(tls, {
    stop: () => readingHandle(client)?.readStop(),
    // A client's end reset while its reads were stopped (the origin slow to take its bytes): the kernel reports the
    // reset only after the bytes it still queues, which would all go to the origin first. Looked for here (a
    // TCP_INFO a stall), so they do not.
    start: () => {
      if (wasReset(client)) clientGone(true);
      else readingHandle(client)?.readStart();
    },
  });
  const deliver = (chunk: Buffer) => {
    counters[COUNTER.bytesFromOrigin]! += chunk.length;
    toClient.push(chunk);
  };
  tls.on('data', (chunk: Buffer) => {
    if (closing) return;
    if (leased) {
      // After the client's half-close, an origin that still sends keeps the session (an idle timeout).
      linger?.refresh();
      deliver(chunk);
      relayed();
      return;
    }
    early.push(chunk);
    if (early.length > MAX_EARLY_BYTES) teardown(false);
  });
  client.on('data', (chunk: Buffer) => {
    if (!leased) {
      leased = true;
      const kept = early.take();
      if (kept !== undefined) deliver(kept);
    }
    counters[COUNTER.bytesToOrigin]! += chunk.length;
    toOrigin.push(chunk);
    relayed();
  });
  // Half-close each way: the client's EOF becomes close_notify and FIN to the origin, the origin's EOF (or
  // close_notify) an EOF on the client's socket. An idle session's EOF is how the pool learns the server closed it.
  client.on('end', () => {
    clientEnded = true;
    if (!leased) {
      // Never spoken on: not a half-close after a request, but the session's end (the pool closed it).
      early.clear();
      clientGone();
      return;
    }
    toOrigin.end();
    if (!originEnded) {
      linger = setTimeout(lingerOver, LINGER_MS);
      linger.unref();
    }
    bothEnded();
  });
  client.on('finish', () => {
    // The origin's clean end went out, its bytes and FIN in the kernel: a close from now on, whoever makes it, leaves
    // them to be delivered, as a direct connection's would.
    disarmReset(client);
    bothEnded();
  });
  tls.on('end', () => {
    originEnded = true;
    if (closing) {
      // The origin answered the close: the connection ends cleanly.
      teardown(false);
      return;
    }
    if (!leased) early.clear();
    toClient.end();
    bothEnded();
  });
  // (An error on the client's end is its reset: ECONNRESET.)
  client.on('error', () => clientGone(true));
  client.on('close', () => clientGone());
  // The origin's reset or a broken TLS stream: the client must not read a clean end.
  tls.on('error', () => teardown(false, true));
  tls.on('close', () => teardown(false, !originEnded));
}

/** Certificate failures by what the caller can act on; anything else is a handshake failure. */
function reasonOf(error: Error & { code?: string }): TlsFailureReason {
  switch (error.code) {
    case 'CERT_HAS_EXPIRED':
      return 'expired';
    case 'CERT_NOT_YET_VALID':
      return 'not-yet-valid';
    case 'ERR_TLS_CERT_ALTNAME_INVALID':
      return 'host-name-mismatch';
    case 'UNABLE_TO_VERIFY_LEAF_SIGNATURE':
    case 'UNABLE_TO_GET_ISSUER_CERT':
    case 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY':
    case 'SELF_SIGNED_CERT_IN_CHAIN':
    case 'DEPTH_ZERO_SELF_SIGNED_CERT':
      return 'unknown-ca';
    case 'CERT_REVOKED':
      return 'revoked';
    case 'ETIMEDOUT':
      return 'timeout';
    default:
      return error.code?.startsWith('ERR_SSL') ? 'handshake' : 'connection';
  }
}

function threadCpuMicros(): number {
  const usage = (process as unknown as { threadCpuUsage?: () => NodeJS.CpuUsage }).threadCpuUsage?.();
  return usage ? usage.user + usage.system : 0;
}
