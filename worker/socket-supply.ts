// Where curl's sockets come from in a worker thread. curl keeps its own connection cache (keep-alive, HTTP/2), so
// we ask the daemon for an fd only when a transfer is likely to need a new connection, hand it to curl exactly
// once through OPENSOCKETFUNCTION, and give it back if curl reused a cached connection instead.
//
// fd ownership, step by step:
// 1. DaemonLink.acquire resolves: the fd belongs to the transfer's Supply slot (tracked by the addon for this
//    thread, so it is closed if the thread dies).
// 2. OPENSOCKETFUNCTION returns it: ownership passes to curl (untracked; recorded in #curlOwned with its lease).
// 3. CLOSESOCKETFUNCTION: curl is done with it; we close it and tell the daemon `closed {leaseId}`.
// 4. A slot curl never took is released to the daemon (release takes the fd) when the transfer ends.

import * as native from '../shared/native.js';
import { originKey } from '../shared/origin.js';
import type { DaemonLink, Lease } from './daemon-link.js';

/** A socket prepared for one transfer, taken by curl at most once. */
export interface SocketSlot {
  originKey: string;
  lease: Lease | undefined;
  /** Set when curl asked for a socket and the slot was empty (the transfer must be retried with one). */
  starved: boolean;
  /** Set once curl took the leased fd. */
  taken: boolean;
}

export class SocketSupply {
  #link: DaemonLink;
  /** Sockets curl owns now, by fd: their leases, to report `closed`. */
  #curlOwned = new Map<number, { leaseId: number; originKey: string }>();
  /** Live curl connections per origin, and transfers in flight per origin: a transfer needs a new connection
   *  (HTTP/1.1) when more transfers run than connections exist. */
  #connections = new Map<string, number>();
  #inFlight = new Map<string, number>();

  constructor(link: DaemonLink) {
    this.#link = link;
  }

  /**
   * Starts a transfer's accounting; acquires a socket when one will probably be needed: always with `force`;
   * for a multiplexed (HTTP/2) origin only when curl holds no connection to it; else when more transfers run
   * than connections exist.
   */
  async prepare(
    host: string,
    port: number,
    options: { timeoutMs: number; force: boolean; multiplexed: boolean },
  ): Promise<SocketSlot> {
    const { timeoutMs, force, multiplexed } = options;
    const key = originKey({ host, port });
    const inFlight = (this.#inFlight.get(key) ?? 0) + 1;
    this.#inFlight.set(key, inFlight);
    const slot: SocketSlot = { originKey: key, lease: undefined, starved: false, taken: false };
    const connections = this.#connections.get(key) ?? 0;
    const needed = force || (multiplexed ? connections === 0 : inFlight > connections);
    if (needed) {
      try {
        slot.lease = await this.#link.acquire(host, port, timeoutMs);
      } catch (error) {
        this.#decrement(this.#inFlight, key);
        throw error;
      }
    }
    return slot;
  }

  /** OPENSOCKETFUNCTION: the slot's fd, once; ownership passes to curl. -1 (CURL_SOCKET_BAD) if none. */
  open(slot: SocketSlot): number {
    const lease = slot.lease;
    if (!lease || slot.taken) {
      slot.starved = true;
      return -1;
    }
    slot.taken = true;
    native.untrack(lease.fd);
    this.#curlOwned.set(lease.fd, { leaseId: lease.leaseId, originKey: slot.originKey });
    this.#connections.set(slot.originKey, (this.#connections.get(slot.originKey) ?? 0) + 1);
    return lease.fd;
  }

  /** CLOSESOCKETFUNCTION: curl is done with fd; close it and end its lease. Returns 0 (curl's success). */
  close(fd: number): number {
    const owned = this.#curlOwned.get(fd);
    this.#curlOwned.delete(fd);
    native.close(fd);
    if (owned) {
      this.#decrement(this.#connections, owned.originKey);
      this.#link.closed(owned.leaseId);
    }
    return 0;
  }

  /** The transfer ended: an fd curl did not take goes back to the daemon (ownership passes to the link). */
  finish(slot: SocketSlot): void {
    this.#decrement(this.#inFlight, slot.originKey);
    if (slot.lease && !slot.taken) {
      this.#link.release(slot.lease.leaseId, slot.lease.fd);
      slot.lease = undefined;
    }
  }

  get curlOwnedCount(): number {
    return this.#curlOwned.size;
  }

  #decrement(map: Map<string, number>, key: string): void {
    const value = (map.get(key) ?? 0) - 1;
    if (value <= 0) map.delete(key);
    else map.set(key, value);
  }
}
