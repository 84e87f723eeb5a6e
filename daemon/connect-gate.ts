// A global cap on connects in flight (quotas.maxConnectsInFlight): however many origins and clients ask at once,
// the daemon has at most that many sockets connecting (each one a DNS lookup and a SYN). Connects beyond it wait
// their turn in arrival order, except that one an acquire waits for at that moment (`urgent()`) goes before the
// others (prewarms and refills: a client's prewarm of many origins must not hold up another client's acquire); the
// acquire's own deadline still bounds the wait.

import type { Origin } from '../shared/origin.js';
import type { OriginPolicy } from './config.js';
import type { ConnectedSocket, Connector } from './connector.js';
import type { LearnedFamily } from './learned-families.js';

/** The queue is swept no sooner than at this length. */
const MIN_SWEEP_AT = 64;

/** A connect that waited its turn at the gate and was no longer wanted when it came: never started. */
export class ConnectAbandoned extends Error {
  constructor() {
    super('connect abandoned: no longer wanted when its turn came');
  }
}

interface Queued {
  admit: (admitted: boolean) => void;
  urgent: (() => boolean) | undefined;
  wanted: (() => boolean) | undefined;
}

export class ConnectGate implements Connector {
  #inner: Connector;
  #limit: () => number;
  #inFlight = 0;
  #queue: Queued[] = [];
  /** Past this many queued, the ones no longer wanted are dropped before another is queued (see connect). */
  #sweepAt = MIN_SWEEP_AT;

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
  ): Promise<ConnectedSocket> {
    // A queued connect is counted in flight by #admit before it resumes; one no longer wanted is not started. The
    // acquires that asked for them may be long gone (a client's acquires that give up at once would otherwise queue
    // lookups and connects without bound, charged to nobody when they run). While some are queued, a new one queues
    // behind them: after a reload raised the limit, those queued under the old one start now, in arrival order, not
    // only when a connect in flight finishes (while newcomers went past them).
    if (this.#queue.length > 0 || this.#inFlight >= this.#limit()) {
      if (this.#queue.length >= this.#sweepAt) this.#sweep();
      const admitted = new Promise<boolean>((admit) => this.#queue.push({ admit, urgent, wanted }));
      this.#admit();
      if (!(await admitted)) throw new ConnectAbandoned();
    } else this.#inFlight++;
    try {
      return await this.#inner.connect(origin, policy, urgent, wanted);
    } finally {
      this.#inFlight--;
      this.#admit();
    }
  }

  /**
   * Starts queued connects while there is room (a lowered limit after a reload drains first): the oldest one an
   * acquire waits for now, else the oldest.
   */
  #admit(): void {
    while (this.#queue.length > 0 && this.#inFlight < this.#limit()) {
      const urgent = this.#queue.findIndex((queued) => queued.urgent?.() === true);
      const [next] = this.#queue.splice(urgent === -1 ? 0 : urgent, 1) as [Queued];
      if (next.wanted?.() === false) {
        next.admit(false);
        continue;
      }
      this.#inFlight++;
      next.admit(true);
    }
  }

  /** Drops the queued connects no longer wanted; the queue may then grow to twice what is left. */
  #sweep(): void {
    const kept: Queued[] = [];
    for (const entry of this.#queue) {
      if (entry.wanted?.() === false) entry.admit(false);
      else kept.push(entry);
    }
    this.#queue = kept;
    this.#sweepAt = Math.max(MIN_SWEEP_AT, 2 * kept.length);
  }
}
