// Leases: every fd the daemon hands out is a lease owned by one client connection until the client reports it
// `closed` (curl closed the socket) or `release`s it (never used; the fd comes back). A client that disconnects
// ends all its leases. The daemon holds no fd for a lease: it closed its copy right after the send; the lease
// only counts against the origin's `maxPerOrigin` and the client's own limit.

import type { Origin } from '../shared/origin.js';
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
  /** A relayed warm TLS session: what was negotiated, and the inode of the pair's end handed out (a released fd
   *  must be that one). */
  tls?: { info: TlsSessionInfo; inode: number } | undefined;
}

export class LeaseTable {
  #next = 1;
  #leases = new Map<number, Lease>();
  #byClient = new Map<number, Set<number>>();

  create(fields: Omit<Lease, 'leaseId' | 'startedAt'>): Lease {
    const lease: Lease = { ...fields, leaseId: this.#next++, startedAt: performance.now() };
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
}
