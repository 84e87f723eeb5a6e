// The relay threads of sockpoold: worker threads, each with its own event loop, that hold the warm TLS sessions and
// move their plaintext (tls-relay-thread.ts). The loop that serves acquires never touches a TLS byte, so TCP
// handoffs keep their latency while a relay is busy.
//
// open() passes a connected TCP fd to a thread (ownership passes with it) and resolves, once the handshake is done,
// with the main thread's end of a loopback TCP connection (loopback-pair.ts) whose other end the thread relays:
// a socket that behaves to the pool and to curl like one connected to the origin, in plaintext. Closing that fd (or the client closing its copy) ends the session.
//
// A handshake costs its thread a millisecond or two of CPU (key exchange, certificate checks, Node's TLS socket),
// during which the sessions that thread relays wait. A burst of prewarms (a crawler announcing its next hundred
// hosts) started all at once would hold back the bytes of every relayed session on the thread, and the handshakes
// that acquires are waiting for, for the length of the burst. So a thread runs at most HANDSHAKES_PER_THREAD at
// once; the others wait here (their TCP fds owned by this class until sent), in the connect gate's order
// (connect-gate.ts): those an acquire waits for at that moment first (a prewarm's handshake becomes urgent when a
// client comes to wait for its origin), each kind fairly across uids (fair-queue.ts: the uid with the fewest
// handshakes under way, in arrival order within a uid), so one uid's burst does not hold another uid's handshakes
// behind all of it; and a uid holding PLACES_KEPT_FOR_OTHER_UIDS or more starts one more only while more than that
// many places are free (#mayStart), so the places held by one uid's handshakes with servers that never answer leave
// another uid's a place at once; and a uid whose handshakes took much of the relay threads' CPU lately (costly
// certificate chains) starts one more only while its share allows (relay-cpu.ts), so that it cannot keep a thread
// checking its chains back to back (the daemon's own refills are one such party, charged per origin within it, so
// that one costly origin's refills do not hold back every other origin's). (Within a thread, the server flights of
// its handshakes that come in together are spread over turns of its loop once a turn's handshake work passes a
// budget, so that costly ones do not hold its relayed sessions for all of them at once: tls-relay-thread.ts,
// handshakeProgress.) One no
// longer wanted when its turn comes (its acquire gave up) is not started: its TCP
// connection is closed and it fails with ConnectAbandoned (a handshake costs CPU and a session nobody asked for);
// past 64 queued, those no longer wanted are swept before another is queued.
//
// Who ends a thread: close() (the daemon's stop) calls each thread's terminate() and waits for it at most
// RELAY_TERMINATE_LIMIT_MS. A thread that has not ended by then is logged by name and left running: close()
// resolves with the threads left, the daemon's stop finishes without them (history written, sockets closed, systemd
// told), and the process entry point (daemon/command.ts) then ends the process with native.exitNow (_exit), which
// does not join threads as process.exit() would. An in-process daemon (tests) is never exited: its caller gets the
// threads left from stop(). (A thread's teardown once spun for ever over a socket handle Node had dropped unclosed
// after a failed resetAndDestroy(); that path is gone, see socket-reset.ts, but the stop no longer depends on every
// teardown finishing. test/warm-tls-stop-bound makes such a thread without a hook here: through the daemon's
// inspector, a relay thread blocks in read(2) on a FIFO, where terminate() cannot reach it.)
//
// A thread that hangs while running (a busy loop from a bug, a call that never returns) would stall every session
// it relays and every handshake sent to it, silently. A watchdog notices: each thread's event loop bumps a shared
// heartbeat on a timer (tls-relay-thread.ts), and a timer here reads the heartbeats (one Atomics.load per thread,
// once a second, and a read of each thread's schedstat; nothing on the handoff path). A thread whose heartbeat has
// not moved for tls.relayHangMs of its available time (relay-clock.ts ThreadSilence: wall time less what it waited
// for a CPU, the wait under way too, so that a nice-10 thread kept waiting on a loaded host is not taken for hung;
// config.ts, RELAY_HANG_LIMIT_MS, says why that is safe) is hung (#hung): logged by name, counted
// (sockpool_tls_relay_threads_hung_total), given no more work (its slot gets a new thread), its sessions ended at
// once by the daemon (onHung: the idle ones leave the pool, closed; a leased one's daemon copy is shut down, so its
// client sees the connection end), and terminate()d, which ends a JavaScript loop: its 'exit' then fails its
// pending handshakes as for a thread that died. A thread that does not end within RELAY_TERMINATE_LIMIT_MS (blocked
// in a system call) is left as the stop leaves one: its pending handshakes fail then, their fds left to it (it may
// have taken them), and the stop names it. That limit counts the thread's available time too: a thread kept
// waiting for a CPU while it ends (its teardown frees its isolate and memory) was reported left running.
// test/warm-tls-relay-hang makes both kinds through the daemon's inspector.
//
// A thread that hangs while starting (its modules' load, a call before its first beat, a start that never ends) is
// judged the same way, within tls.relayHangMs of its spawn, in its available time as well (its tid is known from the
// spawn: #spawn), so that a start kept waiting for a CPU (a boot storm) is not taken for a hang: it never beats, and
// the handshakes sent to it (queued in its message port, never read) would otherwise wait for ever, each holding its
// TCP fd and a place, and its acquire failing at its own timeout. A cause that outlives the thread (a broken install,
// a module or the addon whose load blocks) would make every replacement hang the same way: a thread a few seconds,
// for ever, and a thread blocked in a system call is never ended, so each one stays (a thread and its isolate). So
// after RELAY_START_HANGS_IN_A_ROW threads hung while starting with none starting between them, no relay thread is
// started again until the daemon restarts: logged once as an error, shown in the stats (`threadStartsStopped`) and
// the metrics (sockpool_tls_relay_thread_starts_stopped); the live threads serve on, and once none is left a warm TLS
// handshake fails at once with SOCKPOOL_ERR_TLS. (Not a retry after a pause: threads that never end would still pile
// up, one per pause, and a restart after the cause is fixed is what the operator does anyway.)

import { Worker } from 'node:worker_threads';
import { Gauge, type Registry } from 'prom-client';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { RELAY_HANG_LIMIT_MS } from './config.js';
import { ConnectAbandoned } from './connect-gate.js';
import { AdmissionQueue, type Admittable, DAEMON_UID } from './fair-queue.js';
import type { Logger } from './log.js';
import { runningTotal } from './metrics.js';
import {
  ownThreadIds,
  RelayAvailableClock,
  schedstatAvailable,
  startedTid,
  ThreadSilence,
  type ThreadWaitReading,
  threadWaitReading,
} from './relay-clock.js';
import { RelayCpuShares } from './relay-cpu.js';

/** What a handshake negotiated; sent to the client with a relayed lease. */
export interface TlsSessionInfo {
  /** 'TLSv1.3' or 'TLSv1.2'. */
  version: string;
  /** 'h2' or 'http/1.1' (http/1.1 when the server chose no protocol). */
  alpn: string;
  cipher: string;
  /** SHA-256 of the verified leaf certificate (DER), lower-case hex. */
  certSha256: string;
}

export type TlsFailureReason =
  | 'expired'
  | 'not-yet-valid'
  | 'host-name-mismatch'
  | 'unknown-ca'
  | 'revoked'
  | 'timeout'
  | 'handshake'
  | 'connection';

/** What a handshake needs besides the socket. PEM text, read by the daemon (a client never sees the key). */
export interface TlsHandshakeParams {
  host: string;
  port: number;
  /** Trusted CAs (replacing the system store); undefined: the system store. */
  ca?: string | undefined;
  /** Client certificate and key (mTLS). */
  cert?: string | undefined;
  key?: string | undefined;
  /**
   * Names what `ca`, `cert` and `key` hold (their SHA-256s): a relay thread builds one TLS context per name and
   * reuses it (a context made per handshake parsed the CA file each time: with a full CA bundle, most of the
   * handshake's CPU).
   */
  contextKey: string;
  timeoutMs: number;
}

/**
 * `open`: a handshake over `fd` (`spray`: a test seam, honoured only by a thread started with `testSeams`, see
 * tls-relay-thread.ts; never set here). `lease`: the session of open `id` is lent to `uid` (lent()).
 */
export type RelayRequest =
  | ({ t: 'open'; id: number; fd: number; spray?: boolean } & TlsHandshakeParams)
  | { t: 'lease'; id: number; uid: number };

/**
 * A thread's answers. `cpuMicros` (a result's) and `micros` (a `cpu` report, sent while the handshake goes on once
 * it cost enough): the thread's CPU charged to the handshake since its last report (tls-relay-thread.ts, charge).
 */
export type RelayResponse =
  | { t: 'ready'; id: number; fd: number; handshakeMs: number; cpuMicros: number; info: TlsSessionInfo }
  | { t: 'failed'; id: number; code: string; message: string; reason: TlsFailureReason; cpuMicros: number }
  | { t: 'cpu'; id: number; micros: number };

/** Totals over all relay threads. */
export interface RelayCounters {
  bytesToOrigin: number;
  bytesFromOrigin: number;
  handshakes: number;
  handshakeFailures: number;
  /** TLS sessions alive (idle or leased). */
  sessions: number;
  /** CPU time the relay threads used, µs. */
  cpuMicros: number;
}

const COUNTER_SLOTS = 6;

export interface RelayedSession {
  /** The main thread's end of the pair; belongs to the caller. */
  fd: number;
  /** The threadId of the relay thread that relays it: what TlsRelays' onHung names when that thread hangs. */
  relayThread: number;
  /** Its id in that thread: what lent() names. */
  relaySession: number;
  handshakeMs: number;
  info: TlsSessionInfo;
}

/**
 * A relay thread's nice value, above the daemon's main thread (0): when the two want the same core, the main
 * thread's handoffs (small, on every client's path) go before the relay's bulk bytes. It weighs only against the
 * daemon's own threads (they share one CPU group or session); against other processes the daemon's weight applies.
 */
export const RELAY_THREAD_NICE = 10;

/** Handshakes one relay thread runs at once (see the header): its places. */
export const HANDSHAKES_PER_THREAD = 20;

/**
 * Places a uid leaves free for the others once it holds that many (#mayStart). A uid alone thus runs
 * HANDSHAKES_PER_THREAD less these at once per thread: 16, what every uid could before the reserve (a lone
 * crawler's announced burst of handshakes to distant origins overlaps that many round trips; with half the places,
 * the first rule tried, its prewarm in the lab crawl took 1.1 s instead of 0.76).
 */
export const PLACES_KEPT_FOR_OTHER_UIDS = 4;

/**
 * How long close() waits for a relay thread's terminate() before it gives up on that thread (see the header): a
 * thread's teardown closes its sockets and frees its isolate, well under a second when it works; the bound leaves
 * room for a loaded machine and stays well inside systemd's TimeoutStopSec= (15 s in the shipped unit), so close()
 * counts it in wall time. A hung thread's end (#hung) counts the thread's available time instead (relay-clock.ts),
 * so that a thread kept waiting for a CPU while it ends is not reported left running; within
 * RELAY_TERMINATE_WALL_LIMIT_MS of wall time all the same.
 */
export const RELAY_TERMINATE_LIMIT_MS = 3_000;

/**
 * The most wall time a hung thread's end is waited for, however little of it the thread could run: its handshakes
 * wait with it (their fds, their places), and a host that starves a thread at nice 10 for this long has that thread
 * doing nothing useful anyway. Past it the thread is left running as one blocked in a system call.
 */
export const RELAY_TERMINATE_WALL_LIMIT_MS = 10 * RELAY_TERMINATE_LIMIT_MS;

/**
 * Origin connections the relay threads together may keep closing at once after their clients went (each thread its
 * part; tls-relay-thread.ts, clientGone): an origin socket each, for up to a couple of seconds, out of the per-uid
 * bounds once their leases ended, so they come out of the fds kept beside the budget (quotas.ts, FD_RESERVE). Past a
 * thread's part, or its lease's uid's fair share of it (a uid holding h takes one more while more than h are free), a
 * client's end resets its origin's connection at once.
 */
export const RELAY_CLOSING_ORIGINS = 128;

/** How often the watchdog reads the heartbeats: as often as they move (tls-relay-thread.ts, HEARTBEAT_MS). */
const WATCHDOG_CHECK_MS = 1_000;

/**
 * Relay threads in a row (none starting between them) that may hang while starting before no more are started (see
 * the header): more than one, so that a start that hung once by chance (a machine stalled for longer than the limit)
 * does not end warm TLS; few, as each may stay for good.
 */
export const RELAY_START_HANGS_IN_A_ROW = 3;

interface HandshakeWaiter {
  resolve(session: RelayedSession): void;
  reject(error: Error): void;
  where: string;
}

/** A handshake not sent to a thread yet: its TCP fd is this class's until then. */
interface QueuedHandshake extends HandshakeWaiter, Admittable {
  fd: number;
  params: TlsHandshakeParams;
  /** The socket's inode once sent: tells, after the thread ended, whether `fd` is still that socket. */
  inode?: number;
  /** The relay CPU its thread reported for it so far, µs. */
  cpuMicros?: number;
  /** Held back at least once for its uid's relay CPU (#mayStart): counted once. */
  heldForCpu?: boolean;
  /** A handshake of the daemon's own (DAEMON_UID): its origin, charged within the daemon's share (relay-cpu.ts). */
  daemonOrigin?: string;
  /** Such a handshake's expected cost, counted by the shares while it is under way (RelayCpuShares.daemonStarted). */
  expectedMicros?: number;
}

interface RelayThread {
  worker: Worker;
  /** The worker's threadId, kept (it reads -1 once the thread is gone): tags the sessions it relays. */
  id: number;
  /** For the log: its slot and threadId. */
  name: string;
  counters: Float64Array;
  /** Handshakes sent to the thread and not answered yet. */
  pending: Map<number, QueuedHandshake>;
  exited: boolean;
  /**
   * Its heartbeat (bumped by the thread's loop; the thread's tid in the second slot), the value the watchdog saw last,
   * and its silence since it last saw it move (its spawn, until it beats), in its available time (relay-clock.ts).
   */
  heartbeat: Int32Array;
  beat: number;
  silence: ThreadSilence;
  /** Taken for hung by the watchdog: given no more work, its slot has (or gets) another thread. */
  hung: boolean;
  /** Its heartbeat has moved: its start is done (until then the watchdog judges it from its spawn). */
  started: boolean;
  /**
   * Its tid as found at its spawn (the one thread new Worker() added; 0: not known), until the thread stores its own
   * in its heartbeat's buffer: its start, before any module of ours runs, is judged in its available time too.
   */
  spawnTid: number;
}

export interface TlsRelaysOptions {
  /** The watchdog's limit (tls.relayHangMs, read at each check so that a reload applies); 0: no watchdog. */
  hangLimitMs?: () => number;
  /**
   * Called when the watchdog found a thread hung, with its threadId: whoever holds its sessions' fds ends them
   * (the daemon: the pool drops the idle ones, the handoff server shuts down the leased ones).
   */
  onHung?: (relayThread: number) => void;
}

export class TlsRelays {
  /** Started on demand, up to #threadCount; a thread that died is replaced when a handshake waits for room. */
  #threads: Array<RelayThread | undefined> = [];
  #threadCount: number;
  #nextId = 1;
  /**
   * Handshakes waiting for room in a thread, in the connect gate's order (fair-queue.ts AdmissionQueue). One no
   * longer wanted is abandoned: while the threads are full (origins slow to answer) each holds a TCP fd, and a slot
   * of its origin, for nobody.
   */
  #queue = new AdmissionQueue<QueuedHandshake>((job) => this.#abandon(job));
  #log: Logger;
  #closed = false;
  #hangLimitMs: () => number;
  #onHung: ((relayThread: number) => void) | undefined;
  /** Threads taken for hung that have not ended (their slots have others): close() waits for them too. */
  #hungThreads = new Set<RelayThread>();
  /** The running totals of threads that slots no longer hold (ended or hung, then replaced): see #retire. */
  #retiredTotals: RelayCounters = {
    bytesToOrigin: 0,
    bytesFromOrigin: 0,
    handshakes: 0,
    handshakeFailures: 0,
    sessions: 0,
    cpuMicros: 0,
  };
  /** Threads taken for hung since the start (the metric), and of those, the ones that hung while starting. */
  #hungCount = 0;
  #hungStartingCount = 0;
  /** Threads hung while starting since one last started; at RELAY_START_HANGS_IN_A_ROW, #startsStopped. */
  #startHangsInARow = 0;
  /** No relay thread is started any more (see the header). */
  #startsStopped = false;
  /** The watchdog's timer (started with the first thread) and when it last ran. */
  #watchdog: NodeJS.Timeout | undefined;
  #checkedAt = 0;
  /**
   * Whether the kernel tells how long each thread waited for a CPU (relay-clock.ts): the watchdog and the CPU share
   * then count the threads' available time; without it, wall time (said once in the log, and in the stats).
   */
  #schedstat = schedstatAvailable();
  /** The relay threads' available time, the CPU share's clock (relay-clock.ts). */
  #shareClock = new RelayAvailableClock();
  /** The daemon's own handshakes under way, by origin (as many as it has origins with one under way). */
  #daemonUnderWay = new Map<string, number>();
  /** Each uid's recent relay CPU, and the bound on it (relay-cpu.ts; #mayStart). */
  #cpu: RelayCpuShares;
  /** Handshakes held back at least once for their uid's relay CPU since the start (the metric). */
  #heldForCpu = 0;
  /**
   * While a dispatch left handshakes queued for their uid's relay CPU alone: the soonest one of those uids may
   * start one more as its cost decays (no handshake's end may come to dispatch again meanwhile), and its timer.
   */
  #cpuWaitMs = Number.POSITIVE_INFINITY;
  #cpuTimer: NodeJS.Timeout | undefined;
  /** When #cpuTimer fires (performance.now(), ms). */
  #cpuTimerAt = 0;

  constructor(threadCount: number, log: Logger, options: TlsRelaysOptions = {}) {
    this.#log = log;
    this.#threadCount = threadCount;
    this.#hangLimitMs = options.hangLimitMs ?? (() => RELAY_HANG_LIMIT_MS);
    this.#onHung = options.onHung;
    this.#cpu = new RelayCpuShares(threadCount);
    if (!this.#schedstat) {
      this.#log.warn(
        'no per-thread schedstat (a kernel without CONFIG_SCHED_INFO): the relay watchdog and CPU share count wall time, so a relay thread kept waiting for a CPU may be taken for hung',
      );
    }
  }

  /**
   * The CPU share's time (ms): the relay threads' available time (relay-clock.ts), or wall time without schedstat.
   * Every call of #cpu takes its time from here.
   */
  #shareNow(): number {
    if (!this.#schedstat) return performance.now();
    return this.#shareClock.now(() => this.#threadWaits());
  }

  *#threadWaits(): Iterable<[RelayThread, ThreadWaitReading | undefined]> {
    for (const thread of this.#threads) if (usable(thread)) yield [thread, this.#waitReading(thread)];
  }

  /**
   * `thread`'s wait for a CPU and state now (relay-clock.ts), by the tid it stored, or else the one found at its
   * spawn; undefined without schedstat, without either tid, or once it is gone.
   */
  #waitReading(thread: RelayThread): ThreadWaitReading | undefined {
    return this.#schedstat ? threadWaitReading(this.#tidOf(thread)) : undefined;
  }

  /** The tid `thread` stored, or else the one found at its spawn (0: neither). */
  #tidOf(thread: RelayThread): number {
    return Atomics.load(thread.heartbeat, 1) || thread.spawnTid;
  }

  /** How many relay threads the watchdog has taken for hung since the start. */
  get hungThreads(): number {
    return this.#hungCount;
  }

  /**
   * Handshakes over `fd` (ownership passes here at once) in a relay thread. Asked when a thread has room (see the
   * header): `urgent()`, whether an acquire waits for it now (those go first); `wanted()`, whether it is still
   * needed (if not, it is not started: ConnectAbandoned); `uid`, whose it is (the connector's). Rejects with
   * SOCKPOOL_ERR_TLS.
   */
  open(
    fd: number,
    params: TlsHandshakeParams,
    urgent?: () => boolean,
    wanted?: () => boolean,
    uid = DAEMON_UID,
  ): Promise<RelayedSession> {
    const where = `${params.host}:${params.port}`;
    if (this.#closed) {
      native.close(fd);
      return Promise.reject(new SockpoolError(ErrorCodes.SHUTTING_DOWN, 'sockpoold is stopping'));
    }
    return new Promise<RelayedSession>((resolve, reject) => {
      const daemonOrigin = uid === DAEMON_UID ? where : undefined;
      this.#queue.push({ fd, params, where, resolve, reject, urgent, wanted, uid, daemonOrigin });
      this.#dispatch();
    });
  }

  /**
   * The session `relaySession` of thread `relayThread` is lent to `uid` (the handoff server, as it sends the lease):
   * its thread charges its origin's close, once the lease ends, to that uid's share of the closing places
   * (tls-relay-thread.ts, clientGone). Posted before the lease goes out, so it is on its way before the client can
   * end the lease (a lease ended before the thread read it is the daemon's share). A thread gone or taken for hung
   * meanwhile is not told (its sessions end anyway).
   */
  lent(relayThread: number, relaySession: number, uid: number): void {
    for (const thread of this.#threads) {
      if (usable(thread) && thread.id === relayThread) {
        const request: RelayRequest = { t: 'lease', id: relaySession, uid };
        thread.worker.postMessage(request);
        return;
      }
    }
  }

  /** Sends waiting handshakes to the least busy threads with room, starting threads up to the configured count. */
  #dispatch(): void {
    this.#cpuWaitMs = Number.POSITIVE_INFINITY;
    try {
      this.#send();
    } finally {
      // (At least a millisecond, and until the share's clock may have moved: a wait computed as a hair over 0 must not
      // spin.)
      const waitMs = Math.max(1, Math.ceil(this.#cpuWaitMs), this.#schedstat ? this.#shareClock.standsStillMs : 0);
      const at = performance.now() + waitMs;
      if (waitMs !== Number.POSITIVE_INFINITY && !this.#closed && (!this.#cpuTimer || at < this.#cpuTimerAt)) {
        clearTimeout(this.#cpuTimer);
        this.#cpuTimerAt = at;
        this.#cpuTimer = setTimeout(() => {
          this.#cpuTimer = undefined;
          this.#dispatch();
        }, waitMs);
        this.#cpuTimer.unref();
      }
    }
  }

  #send(): void {
    while (this.#queue.length > 0) {
      const thread = this.#roomiest();
      if (!thread) {
        if (this.#startsStopped && !this.#threads.some(usable)) this.#failQueued();
        return;
      }
      const job = this.#queue.take(this.#mayStart);
      if (!job) return;
      try {
        job.inode = native.socketInode(job.fd);
      } catch {
        job.inode = undefined;
      }
      const id = this.#nextId++;
      thread.pending.set(id, job);
      if (job.daemonOrigin !== undefined) {
        this.#daemonUnderWay.set(job.daemonOrigin, (this.#daemonUnderWay.get(job.daemonOrigin) ?? 0) + 1);
        job.expectedMicros = this.#cpu.daemonStarted(job.daemonOrigin, this.#shareNow());
      }
      const request: RelayRequest = { t: 'open', id, fd: job.fd, ...job.params };
      // From here the thread owns fd (its net.Socket closes it).
      thread.worker.postMessage(request);
    }
  }

  /**
   * Whether one more handshake of a uid with `started` under way may start: while more places (of every thread's
   * HANDSHAKES_PER_THREAD) are free than it holds, up to PLACES_KEPT_FOR_OTHER_UIDS; past that many, only while more
   * than those are free. A handshake holds its place until it ends, up to tls.handshakeTimeoutMs for a server that
   * never answers, and a place taken is never given back early: without a reserve, one uid's acquires to such an
   * origin held every place, and every other uid's warm TLS acquire (of any origin) waited for one of them to time
   * out, as long as its own acquire timeout (10 s both, by default), again after each refill.
   * And while its handshakes' recent relay CPU, with what those under way are expected to cost, stays under its
   * share (relay-cpu.ts): one held back for that is counted (once), and a timer dispatches again once the uid's
   * cost has decayed enough, if nothing else did before.
   */
  #mayStart = (uid: number, started: number, job: QueuedHandshake): boolean => {
    let underWay = 0;
    for (const thread of this.#threads) if (usable(thread)) underWay += thread.pending.size;
    if (this.#threadCount * HANDSHAKES_PER_THREAD - underWay <= Math.min(started, PLACES_KEPT_FOR_OTHER_UIDS)) {
      return false;
    }
    const now = this.#shareNow();
    const origin =
      job.daemonOrigin === undefined
        ? undefined
        : { key: job.daemonOrigin, started: this.#daemonUnderWay.get(job.daemonOrigin) ?? 0 };
    if (this.#cpu.mayStart(uid, started, now, origin)) return true;
    if (!job.heldForCpu) {
      job.heldForCpu = true;
      this.#heldForCpu++;
    }
    this.#cpuWaitMs = Math.min(this.#cpuWaitMs, this.#cpu.waitMs(uid, started, now, origin));
    return false;
  };

  /** A handshake sent to a thread is over (done, failed, or its thread gone): it no longer counts as under way. */
  #ended(job: QueuedHandshake): void {
    this.#queue.done(job.uid);
    if (job.daemonOrigin === undefined) return;
    this.#cpu.daemonEnded(job.expectedMicros ?? 0);
    const left = (this.#daemonUnderWay.get(job.daemonOrigin) ?? 0) - 1;
    if (left > 0) this.#daemonUnderWay.set(job.daemonOrigin, left);
    else this.#daemonUnderWay.delete(job.daemonOrigin);
  }

  /** A queued handshake nobody wants any more: never started; its TCP fd, still this class's, is closed. */
  #abandon(job: QueuedHandshake): void {
    native.close(job.fd);
    job.reject(new ConnectAbandoned());
  }

  /**
   * The thread with the fewest handshakes under way if it has room; a slot without a live thread gets one (while
   * threads are started at all).
   */
  #roomiest(): RelayThread | undefined {
    let best: RelayThread | undefined;
    for (let index = 0; index < this.#threadCount; index++) {
      let thread = this.#threads[index];
      if (!usable(thread)) {
        if (this.#startsStopped) continue;
        if (thread) this.#retire(thread);
        thread = this.#spawn(index);
        this.#threads[index] = thread;
      }
      if (thread.pending.size < HANDSHAKES_PER_THREAD && (!best || thread.pending.size < best.pending.size)) {
        best = thread;
      }
    }
    return best;
  }

  /**
   * The relay threads' totals, the handshakes waiting here for room in one, those that waited (at least once)
   * for their uid's share of the relay CPU, the threads that hung while starting, and whether threads are no longer
   * started for that (see the header).
   */
  counters(): RelayCounters & {
    handshakesQueued: number;
    handshakesHeldForCpu: number;
    threadsHungStarting: number;
    threadStartsStopped: boolean;
    relayClock: 'available' | 'wall';
  } {
    const totals = {
      ...this.#retiredTotals,
      handshakesQueued: this.#queue.length,
      handshakesHeldForCpu: this.#heldForCpu,
      threadsHungStarting: this.#hungStartingCount,
      threadStartsStopped: this.#startsStopped,
      relayClock: this.#schedstat ? ('available' as const) : ('wall' as const),
    };
    // A hung thread's sessions were ended, though it could not count them down.
    for (const thread of this.#threads) if (thread) addCounters(totals, thread.counters, !thread.hung);
    return totals;
  }

  /** No relay thread is left and none will be started (see the header): every queued handshake fails. */
  #failQueued(): void {
    for (const job of this.#queue.drain()) {
      native.close(job.fd);
      job.reject(
        new SockpoolError(ErrorCodes.TLS, 'no TLS relay thread: they hung while starting', { reason: 'connection' }),
      );
    }
  }

  /** A slot's ended or hung thread gives way to another: its running totals stay in the metrics (they only grow). */
  #retire(thread: RelayThread): void {
    addCounters(this.#retiredTotals, thread.counters, false);
  }

  /**
   * Ends every relay thread; their sessions close with them (Node closes a thread's handles). Waits for each thread
   * at most `limitMs`; resolves with the names of the threads that had not ended by then (logged as errors, left
   * running: see the header for who ends them).
   */
  async close(limitMs = RELAY_TERMINATE_LIMIT_MS): Promise<string[]> {
    this.#closed = true;
    clearInterval(this.#watchdog);
    clearTimeout(this.#cpuTimer);
    for (const job of this.#queue.drain()) {
      native.close(job.fd);
      job.reject(new SockpoolError(ErrorCodes.SHUTTING_DOWN, 'sockpoold is stopping'));
    }
    const left: string[] = [];
    // The slots' threads, and those the watchdog took for hung that have not ended (a slot may still hold one).
    const threads = new Set<RelayThread>(this.#hungThreads);
    for (const thread of this.#threads) if (thread) threads.add(thread);
    await Promise.all(
      [...threads].map(async (thread) => {
        if (await ended(thread.worker, limitMs)) return;
        const name = thread.name;
        left.push(name);
        this.#log.error(
          { thread: name, waitedMs: limitMs },
          'TLS relay thread did not end after terminate(); the stop goes on without it',
        );
      }),
    );
    return left;
  }

  /**
   * The watchdog's check (every WATCHDOG_CHECK_MS): a live thread whose heartbeat has not moved for the limit is
   * hung; one that has not beaten yet, within the limit of its spawn, hung while starting. The silence is counted in
   * the thread's available time (relay-clock.ts ThreadSilence): the time it waited for a CPU (a nice-10 thread on a
   * loaded host, in a costly check, or a start on a host in a boot storm), the wait still under way too, is not
   * silence; a thread whose tid is not known (its spawn could not tell, and it has not stored it yet) is judged in
   * wall time. Each thread is read at every check, heard or not: the rule for the wait under way compares one
   * reading with the last.
   */
  #watch = (): void => {
    const now = performance.now();
    // This timer itself came late: the main thread did not run either (a stopped or starved process), so silence
    // over that stretch says nothing about the threads; each one's count starts over.
    const late = now - this.#checkedAt > 2 * WATCHDOG_CHECK_MS;
    this.#checkedAt = now;
    const limitMs = this.#hangLimitMs();
    for (const thread of this.#threads) {
      if (!usable(thread)) continue;
      const beat = Atomics.load(thread.heartbeat, 0);
      thread.silence.read(now, this.#waitReading(thread));
      if (beat !== thread.beat || late) {
        thread.beat = beat;
        thread.silence.heard(now);
        if (beat !== 0 && !thread.started) {
          thread.started = true;
          this.#startHangsInARow = 0;
        }
        continue;
      }
      if (limitMs <= 0 || thread.silence.wallMs(now) < limitMs) continue;
      const silentMs = thread.silence.silentMs(now);
      if (silentMs >= limitMs) this.#hung(thread, silentMs, thread.silence.wallMs(now));
    }
  };

  /** A thread the watchdog found hung (see the header). */
  #hung(thread: RelayThread, silentMs: number, wallMs: number): void {
    thread.hung = true;
    this.#hungCount++;
    this.#hungThreads.add(thread);
    this.#log.error(
      {
        thread: thread.name,
        silentMs: Math.round(silentMs),
        wallMs: Math.round(wallMs),
        handshakes: thread.pending.size,
        started: thread.started,
      },
      'TLS relay thread hung (its event loop stopped turning): ending it and its sessions; another thread takes its place',
    );
    if (!thread.started) {
      this.#hungStartingCount++;
      if (++this.#startHangsInARow >= RELAY_START_HANGS_IN_A_ROW && !this.#startsStopped) {
        this.#startsStopped = true;
        this.#log.error(
          { inARow: this.#startHangsInARow },
          'TLS relay threads hang while starting: no more are started until sockpoold restarts; warm TLS handshakes fail once no relay thread is left',
        );
      }
    }
    // Its sessions first: nothing may stay in the pool, or be lent, pointing at a relay that no longer moves bytes.
    try {
      this.#onHung?.(thread.id);
    } catch (error) {
      // The thread is ended and replaced all the same (its sessions then end with it, if it ends).
      this.#log.error(
        { thread: thread.name, err: (error as Error).message },
        "ending the hung thread's sessions failed",
      );
    }
    // The wait for its end counts its available time too: a thread kept waiting for a CPU may take long to end.
    const endingSince = performance.now();
    const ending = ended(thread.worker, RELAY_TERMINATE_LIMIT_MS, {
      waitReading: () => this.#waitReading(thread),
      wallLimitMs: RELAY_TERMINATE_WALL_LIMIT_MS,
    });
    void ending.then((done) => {
      if (done || thread.exited) return;
      // Blocked where terminate() cannot reach (a system call): its 'exit' may never come, so its handshakes fail
      // now. Their fds stay with it: it may have taken them (a socket it built), and closing a number it still
      // holds could close someone else's socket later. The stop names it as left running.
      this.#log.error(
        { thread: thread.name, waitedMs: Math.round(performance.now() - endingSince), handshakes: thread.pending.size },
        'hung TLS relay thread did not end after terminate(); left running, given no more work',
      );
      this.#failPending(thread, 'hung, did not end after terminate()', false);
    });
    // Its slot gets a new thread for what waits here.
    if (!this.#closed) queueMicrotask(() => this.#dispatch());
  }

  /**
   * Fails the handshakes sent to a thread that ended or hung. `closeUnread`: the thread is gone, so an `open` it had
   * not read yet left its fd open here, still the same socket (same inode): that one is closed now.
   */
  #failPending(thread: RelayThread, why: string, closeUnread: boolean): void {
    for (const job of thread.pending.values()) {
      if (closeUnread) {
        try {
          if (job.inode !== undefined && native.socketInode(job.fd) === job.inode) native.close(job.fd);
        } catch {
          // Closed by the thread's teardown (and not reused): nothing to do.
        }
      }
      job.reject(new SockpoolError(ErrorCodes.TLS, `TLS relay thread ${why}`, { reason: 'connection' }));
      this.#ended(job);
    }
    thread.pending.clear();
  }

  #spawn(index: number): RelayThread {
    const shared = new SharedArrayBuffer(COUNTER_SLOTS * Float64Array.BYTES_PER_ELEMENT);
    const heartbeat = new SharedArrayBuffer(2 * Int32Array.BYTES_PER_ELEMENT);
    // The thread exists once new Worker() returns (Node creates it there, before its isolate): the one thread this
    // process gained meanwhile is it, and the main thread, which alone starts threads here, is busy in this call.
    const threadsBefore = this.#schedstat ? ownThreadIds() : undefined;
    const worker = new Worker(new URL('./tls-relay-thread.js', import.meta.url), {
      workerData: {
        closingOrigins: Math.max(1, Math.floor(RELAY_CLOSING_ORIGINS / this.#threadCount)),
        counters: shared,
        heartbeat,
        nice: RELAY_THREAD_NICE,
      },
      name: 'sockpoold tls relay',
    });
    const spawnTid = startedTid(threadsBefore);
    const thread: RelayThread = {
      worker,
      id: worker.threadId,
      name: `TLS relay thread ${index} (threadId ${worker.threadId})`,
      counters: new Float64Array(shared),
      pending: new Map(),
      exited: false,
      heartbeat: new Int32Array(heartbeat),
      beat: 0,
      // A new thread's run_delay starts at 0 (the kernel zeroes it at the clone): all of it is its start's wait.
      silence: new ThreadSilence(performance.now(), this.#schedstat ? 0 : undefined),
      hung: false,
      started: false,
      spawnTid,
    };
    // Its first reading (its state then tells whether it is kept waiting from its start).
    thread.silence.read(performance.now(), this.#waitReading(thread));
    if (!this.#watchdog) {
      this.#checkedAt = performance.now();
      this.#watchdog = setInterval(this.#watch, WATCHDOG_CHECK_MS);
      this.#watchdog.unref();
    }
    worker.unref();
    worker.on('message', (message: RelayResponse) => {
      const waiter = thread.pending.get(message.id);
      if (!waiter) {
        // Nobody waits (cannot happen while the thread lives): the pair's end is ours to close.
        if (message.t === 'ready') native.close(message.fd);
        return;
      }
      const micros = message.t === 'cpu' ? message.micros : message.cpuMicros;
      waiter.cpuMicros = (waiter.cpuMicros ?? 0) + micros;
      this.#cpu.charge(waiter.uid, micros, waiter.cpuMicros, this.#shareNow(), waiter.daemonOrigin);
      if (message.t === 'cpu') return;
      thread.pending.delete(message.id);
      this.#ended(waiter);
      // Room for the next handshake (after this one's waiter ran: a waiter may queue another).
      queueMicrotask(() => this.#dispatch());
      if (message.t === 'ready' && thread.hung) {
        // Sent before the thread was found hung: its relay is being ended, so the session is not handed out.
        native.close(message.fd);
        waiter.reject(new SockpoolError(ErrorCodes.TLS, 'TLS relay thread hung', { reason: 'connection' }));
      } else if (message.t === 'ready') {
        waiter.resolve({
          fd: message.fd,
          handshakeMs: message.handshakeMs,
          info: message.info,
          relayThread: thread.id,
          relaySession: message.id,
        });
      } else {
        waiter.reject(
          new SockpoolError(
            ErrorCodes.TLS,
            `TLS handshake with ${waiter.where} failed (${message.reason}): ${message.message}`,
            { reason: message.reason, tlsCode: message.code },
          ),
        );
      }
    });
    let failure: string | undefined;
    worker.on('error', (error) => {
      this.#log.error({ err: error.message }, 'TLS relay thread failed');
      failure = error.message;
    });
    // Once the thread is gone: Node closed the sockets it had built on the fds it was given; its handshakes fail.
    worker.on('exit', (code) => {
      thread.exited = true;
      this.#hungThreads.delete(thread);
      const why = thread.hung ? 'hung, ended by the watchdog' : `ended: ${failure ?? `exit code ${code}`}`;
      this.#failPending(thread, why, true);
      // The slot gets a new thread for what waits here.
      if (!this.#closed) queueMicrotask(() => this.#dispatch());
    });
    return thread;
  }
}

/** Whether a slot holds a thread that takes work: alive and not taken for hung. */
function usable(thread: RelayThread | undefined): thread is RelayThread {
  return thread !== undefined && !thread.exited && !thread.hung;
}

/** Adds a thread's counters (tls-relay-thread.ts COUNTER order) to `into`; its live sessions only when `sessions`. */
function addCounters(into: RelayCounters, c: Float64Array, sessions: boolean): void {
  into.bytesToOrigin += c[0]!;
  into.bytesFromOrigin += c[1]!;
  into.handshakes += c[2]!;
  into.handshakeFailures += c[3]!;
  if (sessions) into.sessions += c[4]!;
  into.cpuMicros += c[5]!;
}

/**
 * Whether `worker` ended within `limitMs` of terminate() (a thread blocked in a system call does not). With
 * `waitReading` (the thread's wait for a CPU and state, relay-clock.ts threadWaitReading), `limitMs` is of its
 * available time, counted as the watchdog counts a silence (ThreadSilence): a thread kept waiting for a CPU is given
 * the time it waited, the wait under way too (and one that sleeps, blocked, is not), up to `wallLimitMs` of wall
 * time in all.
 */
export async function ended(
  worker: Worker,
  limitMs: number,
  {
    waitReading,
    wallLimitMs = limitMs,
  }: { waitReading?: () => ThreadWaitReading | undefined; wallLimitMs?: number } = {},
): Promise<boolean> {
  const terminated = worker.terminate().then(
    () => true,
    () => true,
  );
  const since = performance.now();
  // Silent from terminate() on: the time it takes to end.
  const silence = new ThreadSilence(since, undefined);
  silence.read(since, waitReading?.());
  silence.heard(since);
  let waitMs = limitMs;
  for (;;) {
    let timer: NodeJS.Timeout | undefined;
    try {
      const done = await Promise.race([
        terminated,
        new Promise<boolean>((resolve) => {
          timer = setTimeout(() => resolve(false), waitMs);
        }),
      ]);
      if (done) return true;
    } finally {
      clearTimeout(timer);
    }
    // (A thread gone from /proc waits no more: its last reading stands until its 'exit' reaches this thread.)
    const reading = waitReading?.();
    const now = performance.now();
    silence.read(now, reading);
    waitMs = Math.min(limitMs - silence.silentMs(now), since + wallLimitMs - now);
    // (At least a millisecond more: a wait computed as a hair over 0 must not spin.)
    if (waitMs < 1) return false;
  }
}

/** The relay threads' counters as Prometheus gauges (read at scrape time; nothing on the relay path). */
export function registerRelayMetrics(registry: Registry, relays: TlsRelays): void {
  const gauge = (name: string, help: string, read: (counters: ReturnType<TlsRelays['counters']>) => number) =>
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read(relays.counters()));
      },
    });
  // Running counts kept by TlsRelays (a retired thread's totals kept): each scrape adds what came since the last.
  const counter = (name: string, help: string, read: () => number) => runningTotal(registry, name, help, read);
  counter(
    'sockpool_tls_relay_bytes_to_origin_total',
    'Plaintext bytes relayed from clients to origins',
    () => relays.counters().bytesToOrigin,
  );
  counter(
    'sockpool_tls_relay_bytes_from_origin_total',
    'Plaintext bytes relayed from origins to clients',
    () => relays.counters().bytesFromOrigin,
  );
  counter('sockpool_tls_handshakes_total', 'Warm TLS handshakes completed', () => relays.counters().handshakes);
  counter(
    'sockpool_tls_handshake_failures_total',
    'Warm TLS handshakes that failed',
    () => relays.counters().handshakeFailures,
  );
  gauge('sockpool_tls_sessions', 'Warm TLS sessions alive (idle or leased)', (c) => c.sessions);
  gauge(
    'sockpool_tls_handshakes_queued',
    'Warm TLS handshakes waiting for room in a relay thread',
    (c) => c.handshakesQueued,
  );
  counter(
    'sockpool_tls_relay_cpu_seconds_total',
    'CPU time of the relay threads',
    () => relays.counters().cpuMicros / 1e6,
  );
  counter(
    'sockpool_tls_handshakes_held_for_cpu_total',
    "Warm TLS handshakes that waited for their uid's share of the relay threads' CPU (a uid whose handshakes cost much)",
    () => relays.counters().handshakesHeldForCpu,
  );
  counter(
    'sockpool_tls_relay_threads_hung_total',
    'Relay threads the watchdog found hung (their event loop stopped turning, or never started turning) and replaced',
    () => relays.hungThreads,
  );
  counter(
    'sockpool_tls_relay_threads_hung_starting_total',
    'Relay threads the watchdog found hung while starting (before their event loop first turned)',
    () => relays.counters().threadsHungStarting,
  );
  gauge(
    'sockpool_tls_relay_thread_starts_stopped',
    'Whether relay threads are no longer started (1) after several in a row hung while starting: see the log',
    (c) => (c.threadStartsStopped ? 1 : 0),
  );
}
