// The daemon's front: accepts clients on the Unix SOCK_SEQPACKET socket, checks their credentials, validates
// every message, and turns `acquire` into a lease whose fd travels to the client with SCM_RIGHTS.
//
// fd ownership on this path: the pool manager resolves an acquire with an fd that then belongs to this server.
// The lease keeps it (lease-guard.ts) until the lease ends (shut down and closed) or the socket is given back to
// the pool; the `lease` message lends it (channel.send with `borrowed`: the kernel gives the client its own copy,
// ours stays open). A `release` message brings the client's copy back: it is closed here once checked. A session
// the daemon hung up on with lease replies maybe unread in the client's socket keeps its end (watchFd: the channel's
// own fd, shut down) until they are read or the client closes: #keepWatching keeps it, #stopWatching closes it.

import type { Buffer } from 'node:buffer';
import { ErrorCodes, SockpoolError, toPlainError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { canonicalOrigin, type Origin } from '../shared/origin.js';
import {
  BINARY_FRAMING,
  BUNDLES,
  type ClientMessage,
  type DaemonMessage,
  decodeClientBundle,
  decodeClientMessage,
  type ErrorReply,
  encodeFor,
  encodeMessage,
  expectedFds,
  FrameType,
  type LeaseReply,
  MAX_FDS_PER_MESSAGE,
  MAX_MESSAGE_BYTES,
  PROTOCOL_VERSION,
  salvageRequestId,
} from '../shared/protocol.js';
import { type QueuedMessage, SeqpacketChannel, type TurnBudget } from '../shared/seqpacket-channel.js';
import { isAdminUid, statsView } from './client-view.js';
import { policyFor, type SockpoolConfig } from './config.js';
import type { RateLimiter } from './fleet/rate-limiter.js';
import type { Claim } from './fleet/token-claims.js';
import {
  checkReturned,
  endConnection,
  endRelayedConnection,
  markOf,
  receivedNothingSince,
  resetConnection,
} from './lease-guard.js';
import { type Lease, LeaseTable, returnedSocket } from './leases.js';
import { type Logger, LogLimiter, REFUSAL_LOG_WINDOW_MS, REFUSALS_LOGGED } from './log.js';
import type { Metrics } from './metrics.js';
import type { PoolManager } from './pool-manager.js';
import { FdLimit, leaseFdBudget, overLeaseLimit, RELAYED_LEASE_FDS, TCP_LEASE_FDS, UidQuotas } from './quotas.js';

export const SERVER_VERSION = '0.1.0';

interface ClientSession {
  id: number;
  channel: SeqpacketChannel;
  pid: number;
  uid: number;
  /** The peer's primary gid at connect (a reload's access check reads it again: revokeAccess). */
  gid: number;
  /** Acquires and token waits in flight (maxPendingPerClient), so a disconnect can give their sockets back when
   *  they resolve. */
  pending: number;
  /** Of `pending`, the waits for rate tokens: no lease comes of one, so maxLeasesPerClient leaves them out. */
  tokenWaitsPending: number;
  badMessages: number;
  closed: boolean;
  /** Binary framing was negotiated in hello (shared/protocol.ts): hot replies go as frames, frames are accepted. */
  binary: boolean;
  /** And of a version that takes bundles (several requests in one packet). */
  bundles: boolean;
  /** The hello said the client takes `reclaim` notices (unasked messages). */
  reclaim: boolean;
  /** Acquires waiting for a socket, by request id: `cancel` aborts one (created on the first). */
  cancels: Map<number, AbortController> | undefined;
  /** Waits for rate tokens (`tokens`), by request id: `cancel` and the disconnect end them (created on the first). */
  tokenWaits: Map<number, AbortController> | undefined;
  /** Leases of this session that ended after their replies went out, maybe unread: charged to its uid and counted by
   *  maxLeasesPerClient (#chargeIfUnread). */
  unreadLeases: number;
  /**
   * After the daemon hung up with lease replies maybe unread in the client's socket (#keepWatching): the daemon's
   * end (the channel's own fd, handed over as the channel closed), shut down, kept only to read what is still unread there (SIOCOUTQ) while the session's charges
   * last; closed when they are settled to none. The session's one fd then.
   */
  watchFd?: number | undefined;
}

export interface HandoffServerOptions {
  listenFd: number;
  pools: PoolManager;
  config: () => SockpoolConfig;
  log: Logger;
  metrics?: Metrics;
  /** The listener (systemd's) refuses clients' fds only since the daemon started: set SO_PASSRIGHTS = 0 on each
   *  accepted connection too, for those made before (see #admit). */
  refuseFdsOnAccept?: boolean;
  /** Extra fields for the `stats` reply (e.g. process figures). */
  extraStats?: () => Record<string, unknown>;
  /** Per-origin request rates (fleet/rate-limiter.ts); without it `requestsPerSecond` is not enforced. */
  rates?: RateLimiter;
  /** The soft RLIMIT_NOFILE the fd budget is reckoned from (its owner refreshes it); without it, read once here. */
  fdLimit?: FdLimit;
  /**
   * A warm TLS session (its relay thread and its id there) is lent to `uid`: the daemon tells its relay thread
   * (TlsRelays.lent), whose uid's share of the closing places its origin's close takes once the lease ends.
   */
  onRelayedLease?: (relayThread: number, relaySession: number, uid: number) => void;
}

/**
 * Replies waiting in the daemon for a client that does not read (past what the kernel's socket buffer holds): beyond
 * this the client is disconnected. Per session, so per uid at most maxSessionsPerUid times this (64 MiB by default);
 * a client that reads, however slowly, never comes near it.
 */
const MAX_QUEUED_REPLY_BYTES = 1024 * 1024;

/**
 * How often the sessions charged for leases that ended with their replies unread are settled (besides before an
 * acquire their uid would be refused and a `stats`): a client that has read gets its charges back within this.
 */
const UNREAD_RECHECK_MS = 500;
/**
 * Less than any message takes of a Unix socket's send accounting (SIOCOUTQ counts each unread message's buffer with
 * the kernel's own overhead: 768 bytes for a short message on Linux 6.18), so SIOCOUTQ / this bounds the messages, and
 * the fds with them, still unread.
 */
const MIN_MESSAGE_MEMORY = 512;

/** Lease ids per `reclaim` message (each about 8 bytes of JSON: well under the message size limit). */
const RECLAIM_IDS_PER_MESSAGE = 1000;

export class HandoffServer {
  #listenFd: number;
  #listenPoller: native.Poller;
  #pools: PoolManager;
  #config: () => SockpoolConfig;
  #log: Logger;
  #metrics: Metrics | undefined;
  #rates: RateLimiter | undefined;
  #extraStats: (() => Record<string, unknown>) | undefined;
  #onRelayedLease: HandoffServerOptions['onRelayedLease'];
  #leases = new LeaseTable();
  /** `reclaim` notices sent (stats: `reclaimNotices`). */
  #reclaimNotices = 0;
  #clients = new Map<number, ClientSession>();
  #nextClientId = 1;
  #stopping = false;
  #quotas: UidQuotas;
  /** Refusals are logged per uid up to a bound: a client sends acquires the policy refuses as fast as it likes. */
  #refusalLog = new LogLimiter(REFUSALS_LOGGED, REFUSAL_LOG_WINDOW_MS);
  /** The same for connections refused (access control, maxSessionsPerUid): a uid connects as fast as it likes. */
  #refusedClientLog = new LogLimiter(REFUSALS_LOGGED, REFUSAL_LOG_WINDOW_MS);
  /** And those whose one reply did not go out (#sendRefusal), apart: the refusals' own lines must not hide them. */
  #unsentRefusalLog = new LogLimiter(REFUSALS_LOGGED, REFUSAL_LOG_WINDOW_MS);
  /** Out of fds: the listener is not polled until this timer fires (then the wait doubles while it lasts). */
  #acceptRetry: NodeJS.Timeout | undefined;
  #acceptBackoffMs = 0;
  #refuseFdsOnAccept: boolean;
  /** Sessions with leases charged as unread (#chargeIfUnread), settled every UNREAD_RECHECK_MS while any is. */
  #unreadCharged = new Set<ClientSession>();
  #unreadRecheck: NodeJS.Timeout | undefined;
  /** A session's charges for leases ended unread once settled (overLeaseLimit's `settle`: made once, not per acquire). */
  #settleSession = (session: ClientSession): number => {
    this.#settleUnread(session);
    return session.unreadLeases;
  };

  constructor(options: HandoffServerOptions) {
    this.#listenFd = options.listenFd;
    this.#pools = options.pools;
    this.#config = options.config;
    this.#log = options.log;
    this.#metrics = options.metrics;
    this.#extraStats = options.extraStats;
    this.#onRelayedLease = options.onRelayedLease;
    this.#rates = options.rates;
    this.#refuseFdsOnAccept = options.refuseFdsOnAccept ?? false;
    const fdLimit = options.fdLimit ?? new FdLimit();
    this.#quotas = new UidQuotas(
      () => this.#config().quotas,
      undefined,
      (uid) => this.#settleUid(uid),
      () => leaseFdBudget(fdLimit.value, this.#config()),
      () => this.#settleAll(),
    );
    this.#listenPoller = new native.Poller(this.#listenFd, (status) => this.#onAcceptable(status));
  }

  start(): void {
    this.#listenPoller.start(native.READABLE);
  }

  get clientCount(): number {
    return this.#clients.size;
  }

  /** Stops accepting new clients (the listening fd stays open: its owner closes or stores it). */
  stopAccepting(): void {
    if (this.#stopping) return;
    this.#stopping = true;
    clearTimeout(this.#acceptRetry);
    this.#listenPoller.close();
  }

  /**
   * Disconnects every client. Call after the pools have failed pending acquires, so their replies go out first.
   * The daemon's copies of lent sockets are closed without a shutdown: transfers in flight finish on the
   * clients' own copies (a restart must not break them).
   */
  disconnectAll(): void {
    for (const session of [...this.#clients.values()]) this.#disconnect(session, 'daemon stopping', false);
    // Sessions hung up on earlier whose replies were unread: nothing is charged once the daemon stops.
    for (const session of [...this.#unreadCharged]) if (session.closed) this.#stopWatching(session);
  }

  /**
   * A relay thread hung (tls-relay.ts): the sessions it relayed and lent now end for their clients. The daemon's copy
   * of each is disconnected, not closed (the lease owns it until the client reports it closed): every copy of the
   * socket sees the connection reset (reads ECONNRESET, writes EPIPE), so a client neither waits for bytes that will
   * never come nor reads a cut response as ended (a shutdown's FIN read as a clean end). Returns how many.
   */
  endRelayedBy(relayThread: number): number {
    const leases = this.#leases.relayedBy(relayThread);
    for (const lease of leases) resetConnection(lease.fd);
    return leases.length;
  }

  /** What a uid uses now (tests and stats). */
  usageOf(uid: number) {
    return this.#quotas.usageOf(uid);
  }

  #onAcceptable(status: number): void {
    if (status < 0 || this.#stopping) return;
    for (let accepted = 0; accepted < ACCEPTS_PER_WAKEUP; accepted++) {
      let fd: number | null;
      try {
        fd = native.accept(this.#listenFd);
      } catch (error) {
        const code = (error as { code?: string }).code;
        if (code === 'EMFILE' || code === 'ENFILE' || code === 'ENOBUFS' || code === 'ENOMEM') {
          this.#pauseAccepting(code);
        } else {
          // A connection that died in the backlog (ECONNABORTED) and the like: the next one may be fine.
          this.#log.warn({ err: (error as Error).message }, 'accept failed');
        }
        return;
      }
      if (fd === null) return;
      this.#acceptBackoffMs = 0;
      this.#admit(fd);
    }
  }

  /**
   * Out of fds (or kernel memory): the pending connection stays in the backlog and the listener stays readable,
   * so polling it now would spin. Stop polling, retry after a wait that doubles (10 ms up to 1 s) while it lasts.
   */
  #pauseAccepting(code: string): void {
    this.#acceptBackoffMs = Math.min(ACCEPT_BACKOFF_MAX_MS, Math.max(ACCEPT_BACKOFF_MIN_MS, this.#acceptBackoffMs * 2));
    this.#listenPoller.stop();
    this.#metrics?.refusals.inc({ reason: `accept-${code.toLowerCase()}` });
    this.#log.warn({ code, retryInMs: this.#acceptBackoffMs }, 'accept failed: accepting paused');
    this.#acceptRetry = setTimeout(() => {
      this.#acceptRetry = undefined;
      if (this.#stopping) return;
      this.#listenPoller.start(native.READABLE);
    }, this.#acceptBackoffMs);
  }

  /** The peer's supplementary groups; none when the kernel cannot say (the client is then judged on its primary gid). */
  /**
   * Whether access.allowUids and allowGids let this peer in: its uid, and its primary gid or a supplementary one, as
   * the socket file's group permission counts them (a person added to the group with `usermod -aG` passes both).
   * The groups (of the connection `fd`) are read only when the primary gid does not decide.
   */
  #admits(uid: number, gid: number, fd: number): boolean {
    const access = this.#config().access;
    if (access.allowUids.length > 0 && !access.allowUids.includes(uid)) return false;
    return (
      access.allowGids.length === 0 ||
      access.allowGids.includes(gid) ||
      this.#supplementaryGroups(fd).some((each) => access.allowGids.includes(each))
    );
  }

  /**
   * After a reload: the sessions whose peer access.allowUids or allowGids no longer let in are told so (one
   * SOCKPOOL_ERR_ACCESS_DENIED, as at accept) and ended as at a hang-up (their leases' connections shut down, their
   * waits ended). Otherwise a uid taken out kept every session it had open, served for as long as it stayed
   * connected. Returns how many were ended.
   */
  revokeAccess(): number {
    let revoked = 0;
    for (const session of [...this.#clients.values()]) {
      if (session.closed || this.#admits(session.uid, session.gid, session.channel.fd)) continue;
      this.#send(session, {
        type: 'error',
        id: null,
        code: ErrorCodes.ACCESS_DENIED,
        message: `uid ${session.uid} gid ${session.gid} is no longer allowed to use sockpoold (configuration reloaded)`,
      });
      this.#metrics?.refusals.inc({ reason: 'access' });
      this.#disconnect(session, 'access revoked by a reload');
      revoked++;
    }
    return revoked;
  }

  #supplementaryGroups(fd: number): number[] {
    try {
      return native.peerGroups(fd);
    } catch (error) {
      this.#log.warn({ err: (error as Error).message }, 'peer groups unavailable; primary gid only');
      return [];
    }
  }

  /**
   * The one reply a connection refused at accept gets before its door closes. It is sent without waiting (a new
   * connection's queue is empty, so it always fits); one that did not go out is logged, per uid within the refusal
   * log's bound: the client then reads the end without being told why.
   */
  #sendRefusal(fd: number, uid: number, reply: ErrorReply): void {
    let failure: string | undefined;
    try {
      if (native.sendMessage(fd, encodeMessage(reply), []) === null) failure = 'EAGAIN';
    } catch (error) {
      failure = (error as { code?: string }).code ?? (error as Error).message;
    }
    if (failure !== undefined) {
      this.#unsentRefusalLog.warn(this.#log, uid, { uid, code: reply.code, err: failure }, 'refusal not sent');
    }
  }

  /** A new client fd: owned here until the session's channel takes it. */
  #admit(fd: number): void {
    if (this.#refuseFdsOnAccept) {
      // Inherited from the listener, except by a connection made before the listener refused (socket activation:
      // connected while the daemon started); what such a one queued before this is discarded as ever.
      try {
        native.refuseFdPassing(fd);
      } catch {}
    }
    let credentials: { pid: number; uid: number; gid: number };
    try {
      credentials = native.peerCredentials(fd);
    } catch (error) {
      native.discard(fd);
      this.#log.warn({ err: (error as Error).message }, 'peer credentials unavailable; client dropped');
      return;
    }
    if (!this.#admits(credentials.uid, credentials.gid, fd)) {
      // One error message, then the door closes: the client learns why.
      this.#sendRefusal(fd, credentials.uid, {
        type: 'error',
        id: null,
        code: ErrorCodes.ACCESS_DENIED,
        message: `uid ${credentials.uid} gid ${credentials.gid} is not allowed to use sockpoold`,
      });
      // Discarded, not closed: a refused client may already have queued messages with fds (native.discard).
      native.discard(fd, credentials.uid);
      this.#metrics?.refusals.inc({ reason: 'access' });
      this.#refusedClientLog.warn(this.#log, credentials.uid, credentials, 'client refused by access control');
      return;
    }
    // The uid's share of the event loop, shared by all its sessions (quotas.ts).
    let turns: TurnBudget;
    try {
      turns = this.#quotas.openSession(credentials.uid);
    } catch (error) {
      // The quota's name and limit go with it, as in any refusal's reply (#replyError): maxSessionsPerUid, or
      // sessionFds (the uid's share of the daemon's fd budget).
      const plain = toPlainError(error);
      this.#sendRefusal(fd, credentials.uid, {
        type: 'error',
        id: null,
        code: plain.code,
        message: plain.message,
        fields: fieldsOf(plain),
      });
      native.discard(fd, credentials.uid);
      this.#metrics?.refusals.inc({ reason: 'quota' });
      this.#refusedClientLog.warn(
        this.#log,
        credentials.uid,
        { ...credentials, err: plain.message },
        'client refused by quota',
      );
      return;
    }
    const id = this.#nextClientId++;
    const session: ClientSession = {
      id,
      pid: credentials.pid,
      uid: credentials.uid,
      gid: credentials.gid,
      pending: 0,
      tokenWaitsPending: 0,
      badMessages: 0,
      closed: false,
      binary: false,
      bundles: false,
      reclaim: false,
      cancels: undefined,
      tokenWaits: undefined,
      unreadLeases: 0,
      channel: undefined as unknown as SeqpacketChannel,
    };
    try {
      session.channel = new SeqpacketChannel(
        fd,
        {
          onMessage: (data, fds) => this.#onMessage(session, data, fds),
          onBadMessage: (error) =>
            this.#onBadMessage(
              session,
              null,
              new SockpoolError(
                ErrorCodes.PROTOCOL,
                `message dropped (over ${MAX_MESSAGE_BYTES} bytes or fds): ${error.message}`,
                {},
                { cause: error },
              ),
            ),
          // Before the socket closes (#keepWatching reads it); onClose then finds the session closed.
          onClosing: (error) => this.#disconnect(session, error ? error.message : 'client hung up'),
          onClose: (error) => this.#disconnect(session, error ? error.message : 'client hung up'),
        },
        {
          maxMessageBytes: MAX_MESSAGE_BYTES,
          maxFdsPerMessage: MAX_FDS_PER_MESSAGE,
          maxQueuedBytes: MAX_QUEUED_REPLY_BYTES,
          turns,
          peerUid: credentials.uid,
        },
      );
    } catch (error) {
      // The channel never took the fd (its poller could not be set up: out of memory, say): the session is given
      // back and the fd discarded here (the client may have queued fds already), and accepting goes on.
      this.#quotas.closeSession(credentials.uid);
      native.discard(fd, credentials.uid);
      const plain = toPlainError(error);
      this.#log.error({ ...credentials, code: plain.code, err: plain.message }, 'client dropped: no channel');
      return;
    }
    this.#clients.set(id, session);
    this.#log.debug({ client: id, pid: credentials.pid, uid: credentials.uid }, 'client connected');
  }

  /**
   * Acquires wait at the cap of these pools (PoolManager.onReclaim): every client holding leases of them is asked to
   * end those idle in its connection cache (`reclaim`; the client shuts them down and sends `closed`, which frees
   * their room as any `closed` does). The daemon cannot tell an idle kept-alive connection from a slow request, so
   * it only asks; a client that does not answer changes nothing. Each client hears only of its own leases.
   */
  reclaim(poolKeys: string[]): void {
    for (const [clientId, leaseIds] of this.#leases.ofOrigins(new Set(poolKeys))) {
      const session = this.#clients.get(clientId);
      // (A client that did not say it takes the notice gets none: an unasked message could confuse it.)
      if (!session?.reclaim) continue;
      // Nor one that has not read what was sent before: a notice every RECLAIM_INTERVAL_MS would pile up in its queue
      // (and, past MAX_QUEUED_REPLY_BYTES, disconnect a client that is only slow); the next one after it reads will do.
      if (session.channel.queuedBytes > 0) continue;
      for (let start = 0; start < leaseIds.length; start += RECLAIM_IDS_PER_MESSAGE) {
        this.#send(session, {
          type: 'reclaim',
          id: null,
          leaseIds: leaseIds.slice(start, start + RECLAIM_IDS_PER_MESSAGE),
        });
        this.#reclaimNotices++;
        this.#metrics?.reclaimNotices.inc();
      }
    }
  }

  /**
   * `borrowed`: the fds stay the caller's (see SeqpacketChannel.send); otherwise the channel takes them. Returns the
   * message when it waits in the channel's queue (SeqpacketChannel.withdraw).
   */
  #send(
    session: ClientSession,
    message: DaemonMessage,
    fds: number[] = [],
    borrowed = false,
  ): QueuedMessage | undefined {
    let bytes: Buffer;
    try {
      bytes = encodeFor(session.binary, message);
    } catch (error) {
      // Too large to send (a bug here, not the client's fault): the request gets an error, the daemon lives on.
      if (!borrowed) for (const fd of fds) native.close(fd);
      this.#log.error({ type: message.type, err: (error as Error).message }, 'reply could not be encoded');
      const id = 'id' in message ? message.id : null;
      bytes = encodeMessage({ type: 'error', id, code: ErrorCodes.PROTOCOL, message: 'reply too large to send' });
      fds = [];
    }
    return session.channel.send(bytes, fds, borrowed ? BORROWED : undefined);
  }

  #onMessage(session: ClientSession, data: Buffer, fds: number[]): void {
    if (data[0] === FrameType.bundle && data.length > 0) {
      this.#onBundle(session, data, fds);
      return;
    }
    let message: ClientMessage;
    try {
      message = decodeClientMessage(data, session.binary);
      const wanted = expectedFds(message);
      if (fds.length !== wanted) {
        throw new SockpoolError(
          ErrorCodes.PROTOCOL,
          `${message.type} must carry ${wanted} fd${wanted === 1 ? '' : 's'}, got ${fds.length}`,
        );
      }
    } catch (error) {
      // Whatever the client sent (a Unix socket with fds queued in it too): native.discard.
      for (const fd of fds) native.discard(fd, session.uid);
      this.#onBadMessage(session, salvageRequestId(data), error as Error);
      return;
    }
    try {
      this.#handle(session, message, fds);
    } catch (error) {
      // A failure of the daemon's own (EMFILE while reading its memory for stats, say) fails this request only.
      this.#log.error({ client: session.id, type: message.type, err: (error as Error).message }, 'request failed');
      this.#replyError(session, 'id' in message && message.id !== undefined ? message.id : null, error);
    }
  }

  /**
   * Several requests in one packet (binary framing 3): each handled as if it had come alone, in order, unless the
   * bundle as a whole is bad (then none is: one bad message). Each request past the first takes its place in the
   * uid's turn budget, as a message of its own would.
   */
  #onBundle(session: ClientSession, data: Buffer, fds: number[]): void {
    let messages: ClientMessage[];
    try {
      if (!session.bundles) {
        throw new SockpoolError(ErrorCodes.PROTOCOL, 'bundle on a connection that did not negotiate binary framing 3');
      }
      if (fds.length !== 0) throw new SockpoolError(ErrorCodes.PROTOCOL, `bundle must carry no fds, got ${fds.length}`);
      messages = decodeClientBundle(data);
    } catch (error) {
      for (const fd of fds) native.discard(fd, session.uid);
      this.#onBadMessage(session, null, error as Error);
      return;
    }
    session.channel.spendTurns(messages.length - 1);
    for (const message of messages) {
      // (A request of the bundle may end the session: too many bad ones, say. The rest go nowhere.)
      if (session.closed) return;
      try {
        this.#handle(session, message, NO_FDS);
      } catch (error) {
        this.#log.error({ client: session.id, type: message.type, err: (error as Error).message }, 'request failed');
        this.#replyError(session, 'id' in message && message.id !== undefined ? message.id : null, error);
      }
    }
  }

  #handle(session: ClientSession, message: ClientMessage, fds: number[]): void {
    switch (message.type) {
      case 'hello':
        if (message.version !== PROTOCOL_VERSION) {
          this.#onBadMessage(
            session,
            message.id,
            new SockpoolError(ErrorCodes.PROTOCOL, `protocol version ${message.version} not supported (speaks 1)`),
          );
          return;
        }
        this.#send(session, {
          type: 'hello',
          id: message.id,
          version: PROTOCOL_VERSION,
          server: 'sockpoold',
          serverVersion: SERVER_VERSION,
          maxMessageBytes: MAX_MESSAGE_BYTES,
          // The client asked for binary framing: the highest version both speak (this reply itself is JSON;
          // frames may follow).
          ...(message.binary !== undefined ? { binary: Math.min(message.binary, BINARY_FRAMING) } : {}),
          cancel: true,
        });
        session.binary = message.binary !== undefined;
        session.bundles = message.binary !== undefined && Math.min(message.binary, BINARY_FRAMING) >= BUNDLES;
        session.reclaim = message.reclaim === true;
        return;
      case 'acquire':
        this.#acquire(session, message);
        return;
      case 'tokens':
        this.#tokens(session, message);
        return;
      case 'prewarm':
        try {
          // The client's own demand: capped by its uid's prewarm allowance, and counted as demand (pool-manager.ts).
          // A prewarm the daemon refuses (a host that is none, a proxy it lacks, an origin its policy refuses) warms
          // nothing, so it is refused before it is charged: a client's queue announcing the denied hosts of its
          // frontier must not use up the allowance its good announcements need.
          // It is cut first to what the idle pool can keep, and only what is granted of that is charged: a prewarm
          // past it would connect sockets closed at once. None fits: granted 0, nothing charged or counted.
          const origin = canonicalOrigin(message);
          this.#pools.checkWarmUp(origin);
          const granted = this.#pools.prewarm(
            origin,
            message.count,
            message.tls?.trust,
            session.uid,
            message.lookahead === true,
            (room) => this.#quotas.takePrewarm(session.uid, room),
          );
          this.#send(session, { type: 'ok', id: message.id, granted });
        } catch (error) {
          this.#replyError(session, message.id, error);
        }
        return;
      case 'release':
        this.#release(session, message, fds[0]);
        return;
      case 'cancel':
        // (An acquire already answered, or unknown: nothing to do, and no reply either way.) A `tokens` request
        // of that id is answered: SOCKPOOL_ERR_ABORTED, or the tokens it was granted before.
        session.cancels?.get(message.acquireId)?.abort();
        session.tokenWaits?.get(message.acquireId)?.abort();
        return;
      case 'closed': {
        // The client says it closed the socket; the daemon's shutdown makes it true for any copy it kept.
        const lease = this.#leases.end(message.leaseId, session.id);
        if (lease) this.#endLease(lease, true);
        if (message.id !== undefined) {
          if (lease) this.#send(session, { type: 'ok', id: message.id });
          else this.#replyError(session, message.id, unknownLease(message.leaseId));
        }
        return;
      }
      case 'warm':
        this.#warm(session, message);
        return;
      case 'stats':
        try {
          // An admin's stats are not counted (the operator's own tools); any other uid's are, per uid.
          if (!this.#isAdmin(session)) this.#quotas.takeStats(session.uid);
        } catch (error) {
          this.#replyError(session, message.id, error);
          return;
        }
        this.#send(session, { type: 'stats', id: message.id, stats: this.#statsFor(session) });
        return;
    }
  }

  /** An operator's warming of any origin (`sockpool warm`): admins only, not charged to a prewarm allowance. */
  #warm(session: ClientSession, message: Extract<ClientMessage, { type: 'warm' }>): void {
    try {
      if (!this.#isAdmin(session)) {
        throw new SockpoolError(
          ErrorCodes.ACCESS_DENIED,
          `warm is for admin uids (access.adminUids; root and the daemon's own uid are admins) and uid ` +
            `${session.uid} is not one; a client announces its own demand with prewarm`,
          { uid: session.uid },
        );
      }
      const { warming, granted } = this.#pools.warm(
        canonicalOrigin(message),
        message.count,
        message.tls?.trust,
        session.uid,
      );
      this.#send(session, { type: 'ok', id: message.id, warming, granted });
    } catch (error) {
      this.#replyError(session, message.id, error);
    }
  }

  /** The `stats` reply this client may see (client-view.ts). */
  #statsFor(session: ClientSession): Record<string, unknown> {
    const admin = this.#isAdmin(session);
    const usersOf = (key: string) => this.#pools.usersOf(key);
    // A uid that is not an admin: the rows of its own origins only are built (statsView filters the same way).
    const snapshot = admin
      ? this.#pools.snapshot()
      : this.#pools.snapshot((key) => usersOf(key)?.has(session.uid) === true);
    return statsView(
      snapshot,
      { uid: session.uid, admin },
      usersOf,
      () => ({
        clients: this.#clients.size,
        leases: this.#leases.size,
        unreadLeases: this.#unreadLeasesTotal(),
        ...this.#quotas.leaseFdsInUse(),
        keptIdle: this.#pools.keptCount(),
        reclaimNotices: this.#reclaimNotices,
        ...this.#extraStats?.(),
      }),
      () => {
        this.#settleUid(session.uid);
        const usage = this.#quotas.usageOf(session.uid);
        return {
          sessions: usage.sessions,
          leases: usage.leases,
          leaseFds: usage.leaseFds,
          sessionFds: usage.sessionFds,
          unreadLeases: usage.unreadLeases,
          pending: usage.pending,
          // Idle sockets kept for this uid (released unused), against quotas.maxKeptPerUid.
          keptIdle: this.#pools.keptCount(session.uid),
        };
      },
    );
  }

  /** Settles the charges of every session of `uid` (#settleUnread): before its acquire is refused, for its stats. */
  #settleUid(uid: number): void {
    for (const charged of this.#unreadCharged) if (charged.uid === uid) this.#settleUnread(charged);
  }

  /** Settles the charges of every session (#settleUnread): periodically, and before a uid is refused its fd share. */
  #settleAll(): void {
    for (const charged of this.#unreadCharged) this.#settleUnread(charged);
  }

  /** Leases ended with their replies unread, still charged (every session's, settled first). */
  #unreadLeasesTotal(): number {
    let total = 0;
    for (const session of this.#unreadCharged) {
      this.#settleUnread(session);
      total += session.unreadLeases;
    }
    return total;
  }

  #isAdmin(session: ClientSession): boolean {
    return isAdminUid(session.uid, this.#config().access.adminUids);
  }

  /** How long a request that names no timeoutMs waits: its origin's acquireTimeoutMs, as the pool waits for it. */
  #acquireTimeoutOf(origin: Origin): number {
    return policyFor(this.#config(), origin.host, origin.port).acquireTimeoutMs;
  }

  /**
   * The message's origin in its one canonical key, whatever spelling the client sent; undefined after replying with
   * the error when it is none (a zone id is refused here).
   */
  #originOf(
    session: ClientSession,
    message: Extract<ClientMessage, { type: 'tokens' | 'acquire' }>,
  ): Origin | undefined {
    try {
      return canonicalOrigin(message);
    } catch (error) {
      this.#replyError(session, message.id, error);
      return undefined;
    }
  }

  /** Tokens of a rate-limited origin for a client's requests (none is needed for an origin without a rate). */
  #tokens(session: ClientSession, message: Extract<ClientMessage, { type: 'tokens' }>): void {
    const origin = this.#originOf(session, message);
    if (!origin) return;
    const rate = this.#rates?.paramsFor(origin);
    if (!rate) {
      // No rate (any more, after a reload): as many as asked, free.
      this.#send(session, { type: 'tokens', id: message.id, granted: message.count });
      return;
    }
    if (session.tokenWaits?.has(message.id)) {
      // `cancel` reaches the waits by id: a second one under the same id could not be cancelled.
      this.#replyError(
        session,
        message.id,
        new SockpoolError(ErrorCodes.PROTOCOL, `tokens request ${message.id} is already pending`, { id: message.id }),
      );
      return;
    }
    // A wait for tokens is a pending request like an acquire: bounded per client and per uid (maxPendingPerUid).
    const { maxPendingPerClient } = this.#config().access;
    if (session.pending >= maxPendingPerClient) {
      this.#replyError(
        session,
        message.id,
        new SockpoolError(ErrorCodes.LIMIT, `more than ${maxPendingPerClient} acquires and token requests pending`),
      );
      return;
    }
    try {
      this.#quotas.startWait(session.uid);
    } catch (error) {
      this.#replyError(session, message.id, error);
      return;
    }
    session.pending++;
    session.tokenWaitsPending++;
    const timeoutMs = message.timeoutMs ?? this.#acquireTimeoutOf(origin);
    // Ended by the disconnect: a wait left behind would take a token nobody can use, racing the clients still here,
    // and a client hanging up and coming back could leave any number of them. Ended by `cancel` too: a client whose
    // request no longer needs the token (cancelled, or handed one another request gave back) leaves the queue.
    const wait = new AbortController();
    session.tokenWaits ??= new Map();
    const waits = session.tokenWaits;
    waits.set(message.id, wait);
    this.#rates!.take(origin, rate, message.count, timeoutMs, wait.signal, session.uid).then(
      (granted) => {
        session.pending--;
        session.tokenWaitsPending--;
        this.#quotas.waitSettled(session.uid);
        if (waits.get(message.id) === wait) waits.delete(message.id);
        if (session.closed) return;
        this.#send(session, { type: 'tokens', id: message.id, granted });
        // What the uid's acquires saying `tokenTaken` may claim (a session closed first never had them).
        this.#rates!.grantedTo(origin, session.uid, granted);
      },
      (error: Error) => {
        session.pending--;
        session.tokenWaitsPending--;
        this.#quotas.waitSettled(session.uid);
        if (waits.get(message.id) === wait) waits.delete(message.id);
        if (!session.closed) this.#replyError(session, message.id, error);
      },
    );
  }

  #acquire(session: ClientSession, message: Extract<ClientMessage, { type: 'acquire' }>): void {
    if (session.cancels?.has(message.id)) {
      // Its `cancel`, and the disconnect's, reach the acquires pending by id: a second one under the same id could
      // not be cancelled, and would wait out its deadline for a client that is gone.
      this.#replyError(
        session,
        message.id,
        new SockpoolError(ErrorCodes.PROTOCOL, `acquire ${message.id} is already pending`, { id: message.id }),
      );
      return;
    }
    const origin = this.#originOf(session, message);
    if (!origin) return;
    const access = this.#config().access;
    if (session.pending >= access.maxPendingPerClient) {
      this.#replyError(
        session,
        message.id,
        new SockpoolError(
          ErrorCodes.LIMIT,
          `more than ${access.maxPendingPerClient} acquires and token requests pending`,
        ),
      );
      return;
    }
    // Its leases ended unread count here as for its uid (#chargeIfUnread): each is an fd of the daemon's in flight to
    // this connection, and a connection that ended its leases by guessed ids stayed under this limit otherwise.
    // (Its waits for tokens are not: no lease comes of one, as quotas.maxLeasesPerUid leaves them out too.)
    const acquiresPending = session.pending - session.tokenWaitsPending;
    const held = this.#leases.countOf(session.id) + acquiresPending;
    if (overLeaseLimit(access.maxLeasesPerClient, held, session.unreadLeases, this.#settleSession, session)) {
      this.#replyError(
        session,
        message.id,
        new SockpoolError(
          ErrorCodes.LIMIT,
          `client holds ${this.#leases.countOf(session.id)} leases, ${session.unreadLeases} ended with their replies ` +
            `unread, with ${acquiresPending} acquires pending (maxLeasesPerClient = ${access.maxLeasesPerClient})`,
        ),
      );
      return;
    }
    try {
      this.#quotas.startAcquire(session.uid, message.host);
    } catch (error) {
      this.#replyError(session, message.id, error);
      return;
    }
    // The one clock read of a warm handoff's bookkeeping (the pool's idle check, the lease's start, the count); the
    // handoff's latency metric reads its end.
    const started = performance.now();
    // A rate-limited origin: the lease tells the client its rate, and an acquire whose request took no token yet
    // (the client did not know the rate) is charged one here: its request goes out on this socket. One that says its
    // request took one is believed only up to the tokens this daemon granted its uid (RateLimiter.claim): past them
    // it is charged as well, so no client opens connections faster than the rate by saying so.
    const rate = this.#rates?.paramsFor(origin);
    if (!rate) {
      // A warm socket idle now: the lease goes out in this turn, without a promise.
      let warm: Awaited<ReturnType<PoolManager['acquire']>> | undefined;
      try {
        warm = this.#pools.takeWarm(origin, message.tls?.trust, session.uid, started);
      } catch (error) {
        this.#quotas.acquireSettled(session.uid, message.host, false);
        this.#replyError(session, message.id, error);
        return;
      }
      if (warm) {
        this.#lend(session, message, origin, warm, started, started);
        // Counted once the lease is out: the client's wait does not include the bookkeeping.
        this.#pools.countWarmHandoff(warm.originKey, session.uid, warm.announced === true, false, started);
        return;
      }
    }
    session.pending++;
    const cancel = new AbortController();
    session.cancels ??= new Map();
    const cancels = session.cancels;
    cancels.set(message.id, cancel);
    /** When the charged token would expire in the fleet member's batch: one no request spends goes back there
     *  (RateLimiter.giveBack). (Declared before the take: it may be granted at once.) */
    let chargeExpiresAt: number | undefined;
    /** The granted token this acquire claimed (`tokenTaken`): claimable again when no lease comes of the acquire
     *  (the worker gives its token back to its batch, and its next acquire says so again). */
    let claimed = rate && message.tokenTaken === true ? this.#rates!.claim(origin, session.uid) : undefined;
    const giveBackToken = () => {
      if (chargeExpiresAt !== undefined) this.#rates!.giveBack(origin, 1, chargeExpiresAt);
      if (claimed !== undefined) this.#rates!.unclaim(origin, session.uid, claimed);
      chargeExpiresAt = undefined;
      claimed = undefined;
    };
    // A cancelled acquire gets no lease (see below): its claim is back at once, for an acquire read in the same turn
    // (a worker whose request was cancelled gives its token to the next request at once).
    if (claimed !== undefined) cancel.signal.addEventListener('abort', giveBackToken, { once: true });
    const charge =
      rate && claimed === undefined
        ? this.#rates!.take(
            origin,
            rate,
            1,
            message.timeoutMs ?? this.#acquireTimeoutOf(origin),
            cancel.signal,
            session.uid,
            (expiresAt) => {
              chargeExpiresAt = expiresAt;
            },
          )
        : undefined;
    let tokenWaitMs: number | undefined;
    const acquiring = charge
      ? charge.then(() => {
          tokenWaitMs = performance.now() - started;
          const left = message.timeoutMs === undefined ? undefined : message.timeoutMs - (performance.now() - started);
          return this.#pools.acquire(
            origin,
            left === undefined ? undefined : Math.max(1, left),
            message.tls?.trust,
            session.uid,
            cancel.signal,
          );
        })
      : this.#pools.acquire(origin, message.timeoutMs, message.tls?.trust, session.uid, cancel.signal);
    acquiring.then(
      (handoff) => {
        session.pending--;
        if (cancels.get(message.id) === cancel) cancels.delete(message.id);
        if (session.closed || cancel.signal.aborted) {
          // Nobody to hand it to: the socket goes back to the pool unused, never lent by this handoff, and so does
          // the token it was charged or claimed. (PoolManager.acquire itself gives back, uncounted, what it served
          // to an acquire aborted by then, the turn that read a cancel or hang-up included, and rejects: this is
          // the guard for a handoff settled across that check.)
          // Shared again only if no client ever had it: one this uid released unused earlier (served to this
          // acquire straight from that release, read in the same turn as this cancel or hang-up) may still be
          // held in a copy that client kept, so it stays this uid's.
          this.#quotas.acquireSettled(session.uid, message.host, false, this.#pools.lookupInFlight);
          this.#pools.giveBackUnsent(handoff.originKey, handoff, session.uid);
          giveBackToken();
          return;
        }
        this.#lend(session, message, origin, handoff, started, performance.now(), rate, tokenWaitMs, claimed);
      },
      (error: Error) => {
        session.pending--;
        if (cancels.get(message.id) === cancel) cancels.delete(message.id);
        this.#quotas.acquireSettled(session.uid, message.host, false, this.#pools.lookupInFlight);
        // No request goes out: the token it was charged (if it got that far) or claimed is not spent.
        giveBackToken();
        if (session.closed || cancel.signal.aborted) return;
        if ((error as { code?: string }).code === ErrorCodes.POLICY) {
          const { host, port } = message;
          const fields = { client: session.id, uid: session.uid, host, port, err: error.message };
          this.#refusalLog.warn(this.#log, session.uid, fields, 'refused');
        }
        this.#replyError(session, message.id, error);
      },
    );
  }

  /**
   * The socket becomes a lease of this client and goes out with the `lease` reply. `started`: when its acquire was
   * read; `lentAt`: now (performance.now(), read in this turn: the acquire's own reading for a warm socket lent in
   * the acquire's turn), the lease's start.
   */
  #lend(
    session: ClientSession,
    message: Extract<ClientMessage, { type: 'acquire' }>,
    origin: Origin,
    handoff: Awaited<ReturnType<PoolManager['acquire']>>,
    started: number,
    lentAt: number,
    rate?: ReturnType<RateLimiter['paramsFor']>,
    tokenWaitMs?: number,
    tokenClaim?: Claim,
  ): void {
    // Identity and counters: from the pool's probe for a warm socket, read here for a fresh one.
    const mark = handoff.mark ?? markOf(handoff.fd, handoff.connectedPeer, handoff.reconnectRefused);
    const lease = this.#leases.create(
      {
        clientId: session.id,
        originKey: handoff.originKey,
        origin,
        address: handoff.address,
        peerPort: handoff.peerPort,
        family: handoff.family,
        connectedAt: handoff.connectedAt,
        tls: handoff.tls,
        relayThread: handoff.relayThread,
        uid: session.uid,
        fd: handoff.fd,
        mark,
        tokenClaim,
      },
      lentAt,
    );
    // Counted before the send: a send that fails (the client hung up) disconnects the session inside it, and its
    // leases end there, this one with its count.
    this.#quotas.acquireSettled(session.uid, message.host, true, undefined, leaseFdsOf(lease));
    // The lease's own fd is lent: the kernel gives the client a copy, the daemon's stays open in the lease.
    // Everything that can wait (the lease deadline, metrics) comes after the send.
    const reply: LeaseReply = {
      type: 'lease',
      id: message.id,
      leaseId: lease.leaseId,
      host: message.host,
      port: message.port,
      address: handoff.address,
      family: handoff.family,
      warm: handoff.warm,
      connectMs: handoff.warm ? 0 : Number(handoff.connectMs.toFixed(3)),
    };
    // (The optional fields set only where present: a warm handoff, the common case, builds no object more.)
    if (handoff.tls) reply.tls = handoff.tls;
    if (rate) reply.rate = rate;
    if (tokenWaitMs !== undefined) reply.tokenWaitMs = Number(tokenWaitMs.toFixed(3));
    if (handoff.capWaitMs !== undefined) reply.capWaitMs = Number(handoff.capWaitMs.toFixed(3));
    // Its relay thread learns whose lease it is before the client has it (tls-relay.ts, lent).
    if (handoff.relayThread !== undefined && handoff.relaySession !== undefined) {
      this.#onRelayedLease?.(handoff.relayThread, handoff.relaySession, session.uid);
    }
    lease.queuedReply = this.#send(session, reply, [handoff.fd], true);
    // The send failed and the session is gone: the lease ended with it.
    if (session.closed) return;
    const maxLeaseMs = this.#config().quotas.maxLeaseMs;
    if (maxLeaseMs > 0) {
      lease.deadline = setTimeout(() => {
        if (this.#leases.end(lease.leaseId, session.id)) {
          this.#log.debug({ client: session.id, lease: lease.leaseId, maxLeaseMs }, 'lease ended at maxLeaseMs');
          this.#endLease(lease, true);
        }
      }, maxLeaseMs);
    }
    this.#metrics?.handoffSeconds.observe((performance.now() - started) / 1000);
  }

  #release(session: ClientSession, message: Extract<ClientMessage, { type: 'release' }>, fd: number | undefined): void {
    const lease = this.#leases.end(message.leaseId, session.id);
    if (!lease) {
      if (fd !== undefined) native.discard(fd, session.uid);
      if (message.id !== undefined) this.#replyError(session, message.id, unknownLease(message.leaseId));
      return;
    }
    // An fd that came back must be a copy of the lease's own socket: anything else (another socket, a pipe) is
    // closed, and the lease ends with its connection shut down. Without one, only the daemon's own copy is checked
    // (below), as it is with one.
    let sameSocket = fd === undefined;
    if (fd !== undefined) {
      try {
        // One socket whatever its kind (a TCP connection, or the client's end of a relayed TLS session's pair):
        // the daemon's copy is open, so no other socket can have its inode.
        sameSocket = lease.mark ? native.socketInode(fd) === lease.mark.inode : native.sameSocket(fd, lease.fd);
      } catch {}
      // The lease's own socket needs only a close (linger disarmed): a TCP connection, or the client's end of a
      // relay pair, whose queue only the relay fills (no fd ever). Anything else the client may have prepared.
      if (sameSocket) native.close(fd);
      else native.discard(fd, session.uid);
    }
    if (sameSocket && lease.tls) {
      // A relayed TLS session's pair carries no byte counters the daemon could compare (the relay thread reads
      // what the client writes): whether it was used cannot be known, so it is closed, never lent again.
      this.#endLease(lease, true);
      if (message.id !== undefined) this.#send(session, { type: 'ok', id: message.id });
      return;
    }
    // The check's clock reading is the socket's idle start too (the pool reads it from the mark's checkedAt).
    const verdict = sameSocket ? checkReturned(lease.fd, lease.mark) : 'foreign';
    if (typeof verdict === 'string') {
      const misuse = verdict;
      this.#endLease(lease, true);
      this.#metrics?.refusals.inc({ reason: sameSocket ? 'release-used' : 'release-foreign' });
      if (message.id !== undefined) {
        this.#replyError(
          session,
          message.id,
          new SockpoolError(
            ErrorCodes.PROTOCOL,
            sameSocket
              ? `released socket of lease ${lease.leaseId} was used (${misuse}); it is closed, not pooled`
              : `released fd is not the socket of lease ${lease.leaseId}; the lease's connection is closed`,
            { leaseId: lease.leaseId, reason: sameSocket ? 'used' : 'foreign' },
          ),
        );
      }
      return;
    }
    this.#quotas.leaseEnded(lease.uid, leaseFdsOf(lease));
    this.#chargeIfUnread(lease, this.#withdrawReply(lease));
    // Nothing was sent or received on it (the check above): no request was served, and the worker spends its token
    // again, as after a `closed` lease the origin answered nothing on (#endLease).
    const claim = lease.tokenClaim;
    if (claim && !claim.restored) this.#rates?.unanswered(lease.origin, lease.uid, claim);
    // Unused, but the client may still hold a copy: the pool keeps it for this uid alone.
    this.#pools.giveBack(lease.originKey, returnedSocket(lease), lease.uid, true, verdict);
    if (message.id !== undefined) this.#send(session, { type: 'ok', id: message.id });
  }

  /**
   * A lease is over (already removed from the table): with `shutDown`, the connection ends for every copy (the
   * client's included); the daemon's copy is closed either way and the slot is free.
   */
  #endLease(lease: Lease, shutDown: boolean): void {
    this.#chargeIfUnread(lease, this.#withdrawReply(lease));
    // The origin answered nothing on it: no request was served, and the worker spends the token again (read before
    // the shutdown; a relayed TLS lease's fd is the client's pair, not the origin's connection).
    const claim = lease.tokenClaim;
    if (claim && !claim.restored && !lease.tls && receivedNothingSince(lease.fd, lease.mark)) {
      this.#rates?.unanswered(lease.origin, lease.uid, claim);
    }
    if (!shutDown) native.close(lease.fd);
    else if (lease.tls) endRelayedConnection(lease.fd);
    else endConnection(lease.fd);
    this.#quotas.leaseEnded(lease.uid, leaseFdsOf(lease));
    this.#pools.leaseEnded(lease.originKey, lease.uid);
  }

  /**
   * A lease ended (or went back to the pool) while its `lease` reply still waited for the client to read: the reply
   * and the copy of the fd it holds go (the client never learns of the lease; only one that ends leases it has not
   * read, by guessing their ids, or that reads nothing for maxLeaseMs, gets there). Without this a client that never
   * read and ended each lease by id made the daemon hold an fd per lease, whatever its quotas: thousands per session.
   * True when the reply was taken back before the kernel had it.
   */
  #withdrawReply(lease: Lease): boolean {
    const queued = lease.queuedReply;
    if (queued === undefined) return false;
    lease.queuedReply = undefined;
    return this.#clients.get(lease.clientId)?.channel.withdraw(queued) === true;
  }

  /**
   * A lease ended while its session is open, its reply not withdrawn: the reply went to the kernel, and may still be
   * unread there with a copy of the lease's fd. The kernel counts fds in flight against the daemon user's
   * RLIMIT_NOFILE (a sendmsg past it fails with ETOOMANYREFS, for every client), and nothing can take them back, so
   * a client that never read and ended its leases by guessing their ids (they are a sequence) freed its lease quota
   * while its fds piled up. So the lease still counts against its uid's maxLeasesPerUid, and its session's
   * maxLeasesPerClient, and as an fd in flight in its uid's share of the fd budget (which keeps every uid's fds in
   * flight together under RLIMIT_NOFILE), until the session's output is read (#settleUnread) or it closes (the
   * kernel frees its fds in flight then). Charged without a look (no
   * syscall on a lease's end): settled every UNREAD_RECHECK_MS, and before an acquire is refused for it or a `stats`.
   */
  #chargeIfUnread(lease: Lease, withdrawn: boolean): void {
    if (withdrawn) return;
    const session = this.#clients.get(lease.clientId);
    if (session === undefined || session.closed) return;
    session.unreadLeases++;
    this.#quotas.chargeUnread(session.uid, 1);
    this.#watchUnread(session);
  }

  /** `session` has charges (#chargeIfUnread, #keepWatching): settled every UNREAD_RECHECK_MS until it has none. */
  #watchUnread(session: ClientSession): void {
    this.#unreadCharged.add(session);
    // Runs while any session is charged; it stops itself at a tick that finds none (no timer churn per lease).
    this.#unreadRecheck ??= setInterval(() => {
      this.#settleAll();
      if (this.#unreadCharged.size > 0) return;
      clearInterval(this.#unreadRecheck);
      this.#unreadRecheck = undefined;
    }, UNREAD_RECHECK_MS).unref();
  }

  /**
   * The session's charges for leases ended unread, against what its socket holds unread now (one ioctl): none when
   * it holds nothing (or it closed: the kernel freed its fds in flight), and never more than the messages that can
   * be unread (each takes at least MIN_MESSAGE_MEMORY of the socket's accounting). Replies are read in order, so a
   * message read since a lease ended is never unread again: a client that reads, and pipelines, keeps only charges
   * for what may still wait, not one for every lease it ended.
   */
  #settleUnread(session: ClientSession, fd = session.closed ? session.watchFd : session.channel.fd): void {
    // (A session the daemon hung up on is read through the copy of its end kept for this, #keepWatching; without one
    // nothing of it can be unread any more.)
    let unread = 0;
    if (fd !== undefined) {
      try {
        unread = native.unreadOutput(fd);
      } catch {}
    }
    const charges = Math.min(session.unreadLeases, Math.floor(unread / MIN_MESSAGE_MEMORY));
    this.#quotas.releaseUnread(session.uid, session.unreadLeases - charges);
    session.unreadLeases = charges;
    if (charges === 0) this.#stopWatching(session);
  }

  /** No more charges for `session` (or the daemon stops): not settled again, and the copy of its end closed. */
  #stopWatching(session: ClientSession): void {
    this.#quotas.releaseUnread(session.uid, session.unreadLeases);
    session.unreadLeases = 0;
    this.#unreadCharged.delete(session);
    if (session.watchFd !== undefined) {
      native.discard(session.watchFd, session.uid);
      session.watchFd = undefined;
      this.#quotas.watchClosed(session.uid);
    }
  }

  /**
   * The daemon hangs up on `session` (before its channel closes): `sent` of the leases ending with it had their
   * replies go to the kernel. Those replies, and those of leases ended unread before (session.unreadLeases), may be
   * unread still: the client's socket keeps them, with their fds in flight (charged to the daemon user's
   * RLIMIT_NOFILE), for as long as the client keeps its end open, readable after the hang-up. Freeing their charges
   * at the hang-up let a uid that made the daemon hang up on it (a half-close, bad messages, a megabyte unread) and
   * connected again hold any number of fds in flight, its quota free each round. So they stay charged, settled as
   * before (never more than what is unread: SIOCOUTQ), through the daemon's end, kept for that alone and shut down
   * (the client reads what is queued, then the end): the channel's own fd, handed over by #disconnect, not a dup of
   * it (a dup needs a free fd, and out of fds the charges could not be followed: dropped, the fds in flight uncounted
   * for a uid that filled the table first). One fd of the daemon's while any charge is left: at most
   * maxLeasesPerUid a uid, as each holds a charge, and in its uid's share of the fd budget (quotas.ts). A client
   * that closed its end has nothing unread: none kept.
   */
  #keepWatching(session: ClientSession, sent: number): void {
    if (session.unreadLeases + sent === 0) return;
    session.unreadLeases += sent;
    this.#quotas.chargeUnread(session.uid, sent);
    // Settled at once, through the end the channel still has open: an honest client has read everything (or closed
    // its end), and then nothing stays charged and no copy is made.
    this.#settleUnread(session, session.channel.fd);
    if (session.unreadLeases === 0) return;
    session.watchFd = session.channel.fd;
    // A daemon fd in its uid's share of the fd budget, while it lasts (#stopWatching gives it back).
    this.#quotas.watchOpened(session.uid);
    try {
      native.shutdown(session.watchFd);
    } catch {
      // (The client's end is gone: nothing is unread; the next settle finds so and closes it.)
    }
    this.#watchUnread(session);
  }

  #onBadMessage(session: ClientSession, id: number | null, error: Error): void {
    session.badMessages++;
    this.#metrics?.protocolErrors.inc();
    const limit = this.#config().access.maxBadMessages;
    this.#log.debug({ client: session.id, err: error.message }, 'bad message');
    this.#replyError(session, id, error);
    if (session.badMessages > limit) this.#disconnect(session, `more than ${limit} bad messages`);
  }

  #replyError(session: ClientSession, id: number | null, error: unknown): void {
    const plain = toPlainError(error);
    // The refusals of the daemon's own bounds, for the operator's alerts (the policy's are counted where they happen).
    const reason = REFUSAL_REASONS[plain.code];
    if (reason !== undefined) this.#metrics?.refusals.inc({ reason });
    this.#send(session, {
      type: 'error',
      id,
      code: plain.code,
      message: replyText(plain.message),
      fields: fieldsOf(plain),
    });
  }

  /** `shutDown`: the client's leases end with their connections (a client that hung up cannot use them). */
  #disconnect(session: ClientSession, why: string, shutDown = true): void {
    if (session.closed) return;
    session.closed = true;
    const leases = this.#leases.endAllOf(session.id);
    // Replies still waiting in the channel go with it (their fds never left); those the kernel took may stay unread
    // in the client's socket after the hang-up, their fds in flight: they stay charged while they may (#keepWatching).
    // Not at the daemon's stop (shutDown false): nothing is charged any more then.
    let sent = 0;
    for (const lease of leases) if (!this.#withdrawReply(lease)) sent++;
    if (shutDown) this.#keepWatching(session, sent);
    else this.#stopWatching(session);
    // The end kept to watch the unread replies is the channel's own socket (#keepWatching).
    if (session.watchFd === session.channel.fd) session.channel.closeKeepingSocket();
    else session.channel.close();
    this.#clients.delete(session.id);
    this.#quotas.closeSession(session.uid);
    // Its acquires still waiting leave their origins' queues now (as a `cancel` each), not at their deadlines.
    for (const cancel of session.cancels?.values() ?? []) cancel.abort();
    for (const wait of session.tokenWaits?.values() ?? []) wait.abort();
    for (const lease of leases) this.#endLease(lease, shutDown);
    this.#log.debug({ client: session.id, why }, 'client disconnected');
  }
}

const BORROWED = { borrowed: true };
/** A bundled request's fds: none (a bundle carries none). */
const NO_FDS: number[] = [];

/** sockpool_refusals_total's `reason` for an error reply (a session refused by a quota at accept is `quota` too). */
const REFUSAL_REASONS: Readonly<Record<string, string>> = {
  [ErrorCodes.LIMIT]: 'limit',
  [ErrorCodes.QUOTA]: 'quota',
  [ErrorCodes.ACQUIRE_TIMEOUT]: 'acquire_timeout',
  [ErrorCodes.RATE_LIMITED]: 'rate_limited',
};
/**
 * Connections accepted per wakeup of the listener; the rest wait in the backlog for the next turn of the loop (the
 * listener is level-triggered, so libuv reports it again). Without a bound a connect flood (a uid over its session
 * quota connects as fast as it likes: each connection costs an accept, SO_PEERCRED and a refusal) held up every
 * request already queued for as long as the backlog (LISTEN_BACKLOG) took. The same bound as a channel's reads per
 * wakeup.
 */
export const ACCEPTS_PER_WAKEUP = 64;
const ACCEPT_BACKOFF_MIN_MS = 10;
const ACCEPT_BACKOFF_MAX_MS = 1_000;

/**
 * An error's message as a reply carries it, at most MAX_ERROR_TEXT characters: a message may quote what the client
 * sent (the schema's error names every unknown key of a message), and a 16 KiB message of short unknown keys made an
 * error longer than a message may be. Its reply could not be sent ("reply too large to send"), and each logged an
 * error of the daemon's: any client could fill the log at its own pace.
 */
function replyText(message: string): string {
  if (message.length <= MAX_ERROR_TEXT) return message;
  return `${message.slice(0, MAX_ERROR_TEXT)}... (${message.length - MAX_ERROR_TEXT} more characters)`;
}
/** Characters of an error's message in a reply: at most 6 bytes each in JSON (an escaped lone surrogate), so far
 *  below MAX_MESSAGE_BYTES with the rest of the reply. */
const MAX_ERROR_TEXT = 1024;

/** An error's fields for its reply (those set: the protocol's fields hold no undefined). */
function fieldsOf(plain: ReturnType<typeof toPlainError>): Record<string, string | number | boolean | null> {
  const fields: Record<string, string | number | boolean | null> = {};
  for (const [key, value] of Object.entries(plain.fields ?? {})) if (value !== undefined) fields[key] = value;
  return fields;
}

function unknownLease(leaseId: number): SockpoolError {
  return new SockpoolError(ErrorCodes.PROTOCOL, `unknown lease ${leaseId}`, { leaseId });
}

/** Daemon fds a lease keeps, as its uid's lease fd share counts them (quotas.ts). */
function leaseFdsOf(lease: Lease): number {
  return lease.relayThread === undefined ? TCP_LEASE_FDS : RELAYED_LEASE_FDS;
}
