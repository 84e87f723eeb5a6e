// The daemon's front: accepts clients on the Unix SOCK_SEQPACKET socket, checks their credentials, validates
// every message, and turns `acquire` into a lease whose fd travels to the client with SCM_RIGHTS.
//
// fd ownership on this path: the pool manager resolves an acquire with an fd that then belongs to this server;
// channel.send() takes it and closes our copy once the kernel has passed it on (or when the client is gone).
// A `release` message brings an fd back: it belongs to the server until the pool takes it (giveBack) or it is
// closed because it is not the lease's socket.

import { fstatSync } from 'node:fs';
import { ErrorCodes, SockpoolError, toPlainError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { canonicalOrigin, type Origin } from '../shared/origin.js';
import {
  type ClientMessage,
  type DaemonMessage,
  decodeClientMessage,
  encodeMessage,
  expectedFds,
  MAX_FDS_PER_MESSAGE,
  MAX_MESSAGE_BYTES,
  PROTOCOL_VERSION,
  salvageRequestId,
} from '../shared/protocol.js';
import { SeqpacketChannel } from '../shared/seqpacket-channel.js';
import type { SockpoolConfig } from './config.js';
import { LeaseTable } from './leases.js';
import type { Logger } from './log.js';
import type { Metrics } from './metrics.js';
import type { PoolManager } from './pool-manager.js';

export const SERVER_VERSION = '0.1.0';

interface ClientSession {
  id: number;
  channel: SeqpacketChannel;
  pid: number;
  uid: number;
  /** Acquires in flight, so a disconnect can give their sockets back when they resolve. */
  pending: number;
  badMessages: number;
  closed: boolean;
}

export interface HandoffServerOptions {
  listenFd: number;
  pools: PoolManager;
  config: () => SockpoolConfig;
  log: Logger;
  metrics?: Metrics;
  /** Extra fields for the `stats` reply (e.g. process figures). */
  extraStats?: () => Record<string, unknown>;
}

export class HandoffServer {
  #listenFd: number;
  #listenPoller: native.Poller;
  #pools: PoolManager;
  #config: () => SockpoolConfig;
  #log: Logger;
  #metrics: Metrics | undefined;
  #extraStats: (() => Record<string, unknown>) | undefined;
  #leases = new LeaseTable();
  #clients = new Map<number, ClientSession>();
  #nextClientId = 1;
  #stopping = false;

  constructor(options: HandoffServerOptions) {
    this.#listenFd = options.listenFd;
    this.#pools = options.pools;
    this.#config = options.config;
    this.#log = options.log;
    this.#metrics = options.metrics;
    this.#extraStats = options.extraStats;
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
    this.#listenPoller.close();
  }

  /** Disconnects every client. Call after the pools have failed pending acquires, so their replies go out first. */
  disconnectAll(): void {
    for (const session of [...this.#clients.values()]) this.#disconnect(session, 'daemon stopping');
  }

  #onAcceptable(status: number): void {
    if (status < 0 || this.#stopping) return;
    for (;;) {
      let fd: number | null;
      try {
        fd = native.accept(this.#listenFd);
      } catch (error) {
        // EMFILE and friends: log and try again on the next readiness; the listener itself is fine.
        this.#log.error({ err: (error as Error).message }, 'accept failed');
        return;
      }
      if (fd === null) return;
      this.#admit(fd);
    }
  }

  /** A new client fd: owned here until the session's channel takes it. */
  #admit(fd: number): void {
    let credentials: { pid: number; uid: number; gid: number };
    try {
      credentials = native.peerCredentials(fd);
    } catch (error) {
      native.close(fd);
      this.#log.warn({ err: (error as Error).message }, 'peer credentials unavailable; client dropped');
      return;
    }
    const access = this.#config().access;
    const uidAllowed = access.allowUids.length === 0 || access.allowUids.includes(credentials.uid);
    const gidAllowed = access.allowGids.length === 0 || access.allowGids.includes(credentials.gid);
    if (!uidAllowed || !gidAllowed) {
      // One error message, then the door closes: the client learns why.
      const refusal = encodeMessage({
        type: 'error',
        id: null,
        code: ErrorCodes.ACCESS_DENIED,
        message: `uid ${credentials.uid} gid ${credentials.gid} is not allowed to use sockpoold`,
      });
      try {
        native.sendMessage(fd, refusal, []);
      } catch {}
      native.close(fd);
      this.#metrics?.refusals.inc({ reason: 'access' });
      this.#log.warn(credentials, 'client refused by access control');
      return;
    }
    const id = this.#nextClientId++;
    const session: ClientSession = {
      id,
      pid: credentials.pid,
      uid: credentials.uid,
      pending: 0,
      badMessages: 0,
      closed: false,
      channel: undefined as unknown as SeqpacketChannel,
    };
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
        onClose: (error) => this.#disconnect(session, error ? error.message : 'client hung up'),
      },
      { maxMessageBytes: MAX_MESSAGE_BYTES, maxFdsPerMessage: MAX_FDS_PER_MESSAGE },
    );
    this.#clients.set(id, session);
    this.#log.debug({ client: id, pid: credentials.pid, uid: credentials.uid }, 'client connected');
  }

  #send(session: ClientSession, message: DaemonMessage, fds: number[] = []): void {
    let bytes: Buffer;
    try {
      bytes = encodeMessage(message);
    } catch (error) {
      // Too large to send (a bug here, not the client's fault): the request gets an error, the daemon lives on.
      for (const fd of fds) native.close(fd);
      this.#log.error({ type: message.type, err: (error as Error).message }, 'reply could not be encoded');
      const id = 'id' in message ? message.id : null;
      bytes = encodeMessage({ type: 'error', id, code: ErrorCodes.PROTOCOL, message: 'reply too large to send' });
      fds = [];
    }
    session.channel.send(bytes, fds);
  }

  #onMessage(session: ClientSession, data: Buffer, fds: number[]): void {
    let message: ClientMessage;
    try {
      message = decodeClientMessage(data);
      const wanted = expectedFds(message.type);
      if (fds.length !== wanted) {
        throw new SockpoolError(
          ErrorCodes.PROTOCOL,
          `${message.type} must carry ${wanted} fd${wanted === 1 ? '' : 's'}, got ${fds.length}`,
        );
      }
    } catch (error) {
      for (const fd of fds) native.close(fd);
      this.#onBadMessage(session, salvageRequestId(data), error as Error);
      return;
    }
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
        });
        return;
      case 'acquire':
        this.#acquire(session, message);
        return;
      case 'prewarm':
        try {
          this.#pools.prewarm(canonicalOrigin(message), message.count, message.tls?.trust);
          this.#send(session, { type: 'ok', id: message.id });
        } catch (error) {
          this.#replyError(session, message.id, error);
        }
        return;
      case 'release':
        this.#release(session, message, fds[0]!);
        return;
      case 'closed': {
        const lease = this.#leases.end(message.leaseId, session.id);
        if (lease) this.#pools.leaseEnded(lease.originKey);
        if (message.id !== undefined) {
          if (lease) this.#send(session, { type: 'ok', id: message.id });
          else this.#replyError(session, message.id, unknownLease(message.leaseId));
        }
        return;
      }
      case 'stats':
        this.#send(session, {
          type: 'stats',
          id: message.id,
          stats: {
            ...statsForReply(this.#pools.snapshot()),
            clients: this.#clients.size,
            leases: this.#leases.size,
            ...this.#extraStats?.(),
          },
        });
        return;
    }
  }

  #acquire(session: ClientSession, message: Extract<ClientMessage, { type: 'acquire' }>): void {
    let origin: Origin;
    try {
      // Any spelling a client sends is keyed as its one canonical origin (and a zone id is refused here).
      origin = canonicalOrigin(message);
    } catch (error) {
      this.#replyError(session, message.id, error);
      return;
    }
    const access = this.#config().access;
    if (session.pending >= access.maxPendingPerClient) {
      this.#replyError(
        session,
        message.id,
        new SockpoolError(ErrorCodes.LIMIT, `more than ${access.maxPendingPerClient} acquires pending`),
      );
      return;
    }
    if (this.#leases.countOf(session.id) + session.pending >= access.maxLeasesPerClient) {
      this.#replyError(
        session,
        message.id,
        new SockpoolError(ErrorCodes.LIMIT, `client holds ${access.maxLeasesPerClient} leases (maxLeasesPerClient)`),
      );
      return;
    }
    const started = performance.now();
    session.pending++;
    this.#pools.acquire(origin, message.timeoutMs, message.tls?.trust).then(
      (handoff) => {
        session.pending--;
        if (session.closed) {
          // Nobody to hand it to: the socket goes back to the pool, unused.
          this.#pools.giveBack(handoff.originKey, handoff);
          return;
        }
        const lease = this.#leases.create({
          clientId: session.id,
          originKey: handoff.originKey,
          origin,
          address: handoff.address,
          peerPort: handoff.peerPort,
          family: handoff.family,
          tls: handoff.tls && { info: handoff.tls, inode: inodeOf(handoff.fd) },
        });
        // Ownership of handoff.fd passes to the channel, which closes our copy once sent.
        this.#send(
          session,
          {
            type: 'lease',
            id: message.id,
            leaseId: lease.leaseId,
            host: message.host,
            port: message.port,
            address: handoff.address,
            family: handoff.family,
            warm: handoff.warm,
            connectMs: handoff.warm ? 0 : Number(handoff.connectMs.toFixed(3)),
            ...(handoff.tls ? { tls: handoff.tls } : {}),
          },
          [handoff.fd],
        );
        this.#metrics?.handoffSeconds.observe((performance.now() - started) / 1000);
      },
      (error: Error) => {
        session.pending--;
        if (session.closed) return;
        if ((error as { code?: string }).code === ErrorCodes.POLICY) {
          this.#log.warn({ client: session.id, host: message.host, port: message.port, err: error.message }, 'refused');
        }
        this.#replyError(session, message.id, error);
      },
    );
  }

  #release(session: ClientSession, message: Extract<ClientMessage, { type: 'release' }>, fd: number): void {
    const lease = this.#leases.end(message.leaseId, session.id);
    if (!lease) {
      native.close(fd);
      if (message.id !== undefined) this.#replyError(session, message.id, unknownLease(message.leaseId));
      return;
    }
    // The fd must be the lease's own socket: anything else (another socket, a pipe) is closed, never pooled.
    let sameSocket = false;
    try {
      if (lease.tls) {
        // A relayed session's end of the pair: the very socket handed out (same inode), not merely another one.
        sameSocket = inodeOf(fd) === lease.tls.inode;
      } else {
        const peer = native.peerAddress(fd);
        sameSocket = peer.address === lease.address && peer.port === lease.peerPort;
      }
    } catch {}
    if (!sameSocket) {
      native.close(fd);
      this.#pools.leaseEnded(lease.originKey);
      if (message.id !== undefined) {
        this.#replyError(
          session,
          message.id,
          new SockpoolError(ErrorCodes.PROTOCOL, `released fd is not the socket of lease ${lease.leaseId}`),
        );
      }
      return;
    }
    this.#pools.giveBack(lease.originKey, {
      fd,
      address: lease.address,
      port: lease.peerPort,
      family: lease.family,
      connectedAt: lease.startedAt,
      connectMs: 0,
      tls: lease.tls?.info,
    });
    if (message.id !== undefined) this.#send(session, { type: 'ok', id: message.id });
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
    const fields: Record<string, string | number | boolean | null> = {};
    for (const [key, value] of Object.entries(plain.fields ?? {})) if (value !== undefined) fields[key] = value;
    this.#send(session, { type: 'error', id, code: plain.code, message: plain.message, fields });
  }

  #disconnect(session: ClientSession, why: string): void {
    if (session.closed) return;
    session.closed = true;
    session.channel.close();
    this.#clients.delete(session.id);
    for (const lease of this.#leases.endAllOf(session.id)) this.#pools.leaseEnded(lease.originKey);
    this.#log.debug({ client: session.id, why }, 'client disconnected');
  }
}

/** Origins listed in a `stats` reply, busiest first: the whole list of a crawler would not fit in a message. */
export const STATS_MAX_ORIGINS = 50;

function statsForReply<T extends { origins: Array<{ demandRatePerS: number; leased: number; idle: number }> }>(
  snapshot: T,
): T & { originsOmitted: number } {
  const origins = [...snapshot.origins]
    .sort((a, b) => b.demandRatePerS - a.demandRatePerS || b.leased + b.idle - (a.leased + a.idle))
    .slice(0, STATS_MAX_ORIGINS);
  return { ...snapshot, origins, originsOmitted: snapshot.origins.length - origins.length };
}

/** The inode of an fd's file (a socket's, for the pair ends of relayed sessions); -1 if fstat fails. */
function inodeOf(fd: number): number {
  try {
    return fstatSync(fd).ino;
  } catch {
    return -1;
  }
}

function unknownLease(leaseId: number): SockpoolError {
  return new SockpoolError(ErrorCodes.PROTOCOL, `unknown lease ${leaseId}`, { leaseId });
}
