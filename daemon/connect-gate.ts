// A global cap on connects in flight (quotas.maxConnectsInFlight): however many origins and clients ask at once,
// the daemon has at most that many sockets connecting (each one a DNS lookup and a SYN). Connects beyond it wait
// their turn in arrival order; the acquire's own deadline still bounds the wait.

import type { Origin } from '../shared/origin.js';
import type { OriginPolicy } from './config.js';
import type { ConnectedSocket, Connector } from './connector.js';
import type { LearnedFamily } from './learned-families.js';

export class ConnectGate implements Connector {
  #inner: Connector;
  #limit: () => number;
  #inFlight = 0;
  #queue: Array<() => void> = [];

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

  async connect(origin: Origin, policy: OriginPolicy, urgent?: () => boolean): Promise<ConnectedSocket> {
    // A queued connect is counted in flight by #admit before it resumes.
    if (this.#inFlight >= this.#limit()) await new Promise<void>((resolve) => this.#queue.push(resolve));
    else this.#inFlight++;
    try {
      return await this.#inner.connect(origin, policy, urgent);
    } finally {
      this.#inFlight--;
      this.#admit();
    }
  }

  /** Starts queued connects while there is room (a lowered limit after a reload drains first). */
  #admit(): void {
    while (this.#queue.length > 0 && this.#inFlight < this.#limit()) {
      this.#inFlight++;
      this.#queue.shift()!();
    }
  }
}
