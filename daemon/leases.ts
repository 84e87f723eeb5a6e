// Leases: every fd the daemon hands out is a lease owned by one client connection until the client reports it
// `closed` (curl closed the socket) or `release`s it (never used; the fd comes back). A client that disconnects
// ends all its leases. The daemon keeps its own copy of every lent socket (`fd`, see lease-guard.ts): the table
// records it; whoever ends the lease (the handoff server) closes it or gives it back to the pool.

import type { Origin } from '../shared/origin.js';
import type { QueuedMessage } from '../shared/seqpacket-channel.js';
import type { ConnectedSocket } from './connector.js';
import type { Claim } from './fleet/token-claims.js';
import type { UsageMark } from './lease-guard.js';
import type { TlsSessionInfo } from './tls-relay.js';

export interface Lease {
  leaseId: number;
  clientId: number;
  originKey: string;
  origin: Origin;
  /** The peer the socket is connected to (the origin, or its proxy): a released fd must match it. */
  address: string;
  peerPort: number;
  family: 4 | 6;
  startedAt: number;
  /** When the socket was connected (ConnectedSocket.connectedAt): a socket released unused goes back to the pool as
   *  old as it is (idleTtlMs, recycling), not as young as its lease. */
  connectedAt: number;
  /** A relayed warm TLS session: what was negotiated (`fd` is then the client's end of the session's pair). */
  tls?: TlsSessionInfo | undefined;
  /** Its relay thread (threadId), for a relayed session: the lease's socket is shut down if that thread hangs. */
  relayThread?: number | undefined;
  /** The client's uid (quotas, and whose socket a released one becomes). */
  uid: number;
  /** The daemon's copy of the lent socket: owned by the lease until it ends. */
  fd: number;
  /** The socket's byte counters when it was lent. */
  mark: UsageMark | undefined;
  /** The granted token its acquire claimed (`tokenTaken`): given back if the origin answers nothing on it. */
  tokenClaim?: Claim | undefined;
  /** Ends the lease at quotas.maxLeaseMs; cleared when it ends otherwise. */
  deadline: NodeJS.Timeout | undefined;
  /**
   * The `lease` reply while it waits in the client's channel (the client's buffer was full), with a copy of `fd`:
   * withdrawn when the lease ends first (see SeqpacketChannel.withdraw); undefined once sent, or when it went at once.
   */
  queuedReply?: QueuedMessage | undefined;
}

export class LeaseTable {
  #next = 1;
  #leases = new Map<number, Lease>();
  #byClient = new Map<number, Set<number>>();

  /** `now`: performance.now(), from a caller that read it in this turn (the lease's start); read here otherwise. */
  create(fields: Omit<Lease, 'leaseId' | 'startedAt' | 'deadline' | 'queuedReply'>, now = performance.now()): Lease {
    // Field by field, one shape for every lease: a spread went through V8's generic property copying per handoff.
    const lease: Lease = {
      leaseId: this.#next++,
      clientId: fields.clientId,
      originKey: fields.originKey,
      origin: fields.origin,
      address: fields.address,
      peerPort: fields.peerPort,
      family: fields.family,
      startedAt: now,
      connectedAt: fields.connectedAt,
      tls: fields.tls,
      relayThread: fields.relayThread,
      uid: fields.uid,
      fd: fields.fd,
      mark: fields.mark,
      tokenClaim: fields.tokenClaim,
      deadline: undefined,
      queuedReply: undefined,
    };
    this.#leases.set(lease.leaseId, lease);
    let set = this.#byClient.get(lease.clientId);
    if (!set) {
      set = new Set();
      this.#byClient.set(lease.clientId, set);
    }
    set.add(lease.leaseId);
    return lease;
  }

  /** Ends a lease if `clientId` owns it; returns it, or undefined for an unknown or foreign lease id. */
  end(leaseId: number, clientId: number): Lease | undefined {
    const lease = this.#leases.get(leaseId);
    if (!lease || lease.clientId !== clientId) return undefined;
    this.#leases.delete(leaseId);
    this.#byClient.get(clientId)?.delete(leaseId);
    clearTimeout(lease.deadline);
    return lease;
  }

  /** Ends every lease of a client (it disconnected) and returns them. */
  endAllOf(clientId: number): Lease[] {
    const ids = this.#byClient.get(clientId);
    this.#byClient.delete(clientId);
    if (!ids) return [];
    const ended: Lease[] = [];
    for (const id of ids) {
      const lease = this.#leases.get(id);
      if (lease) {
        this.#leases.delete(id);
        clearTimeout(lease.deadline);
        ended.push(lease);
      }
    }
    return ended;
  }

  countOf(clientId: number): number {
    return this.#byClient.get(clientId)?.size ?? 0;
  }

  get size(): number {
    return this.#leases.size;
  }

  /** The leases of sessions relayed by that relay thread (its threadId): one scan, when the thread hung. */
  relayedBy(relayThread: number): Lease[] {
    return [...this.#leases.values()].filter((lease) => lease.relayThread === relayThread);
  }

  /**
   * The leases of these pools (by key), by the client holding them: one scan for all of them, for the reclaim (the
   * pool manager asks for every waiting pool together, once per RECLAIM_INTERVAL_MS; an index per pool would cost
   * every handoff).
   */
  ofOrigins(originKeys: ReadonlySet<string>): Map<number, number[]> {
    const byClient = new Map<number, number[]>();
    for (const lease of this.#leases.values()) {
      if (!originKeys.has(lease.originKey)) continue;
      const ids = byClient.get(lease.clientId);
      if (ids) ids.push(lease.leaseId);
      else byClient.set(lease.clientId, [lease.leaseId]);
    }
    return byClient;
  }
}

/**
 * A lease's socket as it goes back to the pool unused (a release): as old as it is (`connectedAt`: idleTtlMs and
 * recycling count from its connect), and judged by a reload's policy as of its lease's start (`startedAt`): the
 * pool checks a socket against the policy again only when that is before the last reload (PoolManager.giveBack). A
 * socket leased after the reload was judged at it (idle then), or when it came back from a lease across it; without
 * this, every release of a socket connected before any reload paid an egress check on the handoff path.
 */
export function returnedSocket(lease: Lease): ConnectedSocket {
  return {
    fd: lease.fd,
    address: lease.address,
    port: lease.peerPort,
    family: lease.family,
    connectedAt: lease.connectedAt,
    startedAt: lease.startedAt,
    connectMs: 0,
    // The socket's own (a giveBack without the release check's mark reads a new one): see UsageMark.
    reconnectRefused: lease.mark?.reconnectRefused,
  };
}
