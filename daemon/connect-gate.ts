// A global cap on connects in flight (quotas.maxConnectsInFlight): however many origins and clients ask at once,
// the daemon has at most that many sockets connecting (each one a DNS lookup and a SYN). Connects beyond it wait
// their turn: those an acquire waits for at that moment first (`urgent()`: prewarms and refills must not hold up a
// client's acquire), each kind fairly across uids (fair-queue.ts): the next goes to the uid with the fewest
// connects in flight, among those tied to the uid whose turn was longest ago (uids take turns: the uid whose connect
// just finished, counted at none in flight again, does not win the tie with its older queued ones), in arrival
// order within a uid; so one uid's backlog (its acquires of slow or silent origins, up to maxPendingPerUid) does not
// make another uid's connect wait behind all of it, at any limit. The acquire's own deadline still bounds the wait.

import type { Origin } from '../shared/origin.js';
import type { OriginPolicy } from './config.js';
import type { ConnectedSocket, Connector } from './connector.js';
import { AdmissionQueue, type Admittable, DAEMON_UID } from './fair-queue.js';
import type { LearnedFamily } from './learned-families.js';

/**
 * A connect that waited its turn at the gate, or a warm TLS handshake that waited for room in a relay thread
 * (tls-relay.ts), and was no longer wanted when its turn came: never started.
 */
export class ConnectAbandoned extends Error {
  constructor() {
    super('connect abandoned: no longer wanted when its turn came');
  }
}

interface Queued extends Admittable {
  admit: (admitted: boolean) => void;
}

export class ConnectGate implements Connector {
  #inner: Connector;
  #limit: () => number;
  #inFlight = 0;
  /** In the order of fair-queue.ts's AdmissionQueue; one no longer wanted is refused (ConnectAbandoned). */
  #queue = new AdmissionQueue<Queued>((queued) => queued.admit(false));

  constructor(inner: Connector, limit: () => number) {
    this.#inner = inner;
    this.#limit = limit;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  get queued(): number {
    return this.#queue.length;
  }

  /** Uid entries its queue read or compared to choose whose turn it is (AdmissionQueue.visited); only tests read it. */
  get visited(): number {
    return this.#queue.visited;
  }

  checkTarget(origin: Origin): void {
    this.#inner.checkTarget(origin);
  }

  checkHeld(origin: Origin, address: string): void {
    this.#inner.checkHeld(origin, address);
  }

  learnedFamily(origin: Origin): LearnedFamily | undefined {
    return this.#inner.learnedFamily?.(origin);
  }

  lookupInFlight(host: string): Promise<unknown> | undefined {
    return this.#inner.lookupInFlight?.(host);
  }

  async connect(
    origin: Origin,
    policy: OriginPolicy,
    urgent?: () => boolean,
    wanted?: () => boolean,
    uid = DAEMON_UID,
  ): Promise<ConnectedSocket> {
    // A queued connect is counted in flight by #admit before it resumes; one no longer wanted is not started. The
    // acquires that asked for them may be long gone (a client's acquires that give up at once would otherwise queue
    // lookups and connects without bound, charged to nobody when they run). While some are queued, a new one queues
    // behind them: after a reload raised the limit, those queued under the old one start now, in their order, not
    // only when a connect in flight finishes (while newcomers went past them).
    if (this.#queue.length > 0 || this.#inFlight >= this.#limit()) {
      const admitted = new Promise<boolean>((admit) => this.#queue.push({ admit, urgent, wanted, uid }));
      this.#admit();
      if (!(await admitted)) throw new ConnectAbandoned();
    } else {
      this.#inFlight++;
      this.#queue.started(uid);
    }
    try {
      return await this.#inner.connect(origin, policy, urgent, wanted, uid);
    } finally {
      this.#inFlight--;
      this.#queue.done(uid);
      this.#admit();
    }
  }

  /** Starts queued connects while there is room (a lowered limit after a reload drains first). */
  #admit(): void {
    while (this.#inFlight < this.#limit()) {
      const next = this.#queue.take();
      if (!next) return;
      this.#inFlight++;
      next.admit(true);
    }
  }
}
