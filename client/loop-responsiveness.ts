// Whether the caller's event loop answers promptly: SockpoolClient's choice between its own thread and its worker
// threads for requests made while others run (`inlineWhileResponsive`).
//
// In the caller's thread a request costs no hop to a worker thread and back, and on a loopback or datacenter round
// trip those two hops cost about as much as curl's whole request. What the threads give instead is a curl that keeps
// reading while the caller's own work (parsing, rendering, a synchronous library) holds its loop, and a second core
// for curl's work. So requests run here while the loop keeps up, and go to the threads for a while after one turn of
// it held the loop longer than a lag limit: that is the caller's work showing, or curl's own work here grown past
// what one thread should carry.
//
// The loop is probed only while the client has requests in flight: one timer at a time, unref'd, whose lateness is
// the lag. An idle client keeps no timer and wakes nothing.

/** The time source and timers; the client passes the real ones, tests a fake. */
export interface LoopClock {
  now(): number;
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const realLoopClock: LoopClock = {
  now: () => performance.now(),
  setTimeout: (callback, ms) => setTimeout(callback, ms).unref(),
  clearTimeout: (handle) => clearTimeout(handle as NodeJS.Timeout),
};

/** How often the loop is probed while requests are in flight. */
export const PROBE_INTERVAL_MS = 10;
/**
 * A probe this late means a turn held the loop that long: a request's socket events waited as long. Above what the
 * caller's share of curl's own work shows (many transfers' events, TLS handshakes among them: at a lower limit a
 * crawl's own handshakes sent its origins back and forth between the runtimes, each move a connection more), below
 * the synchronous work of a caller that parses what it fetched.
 */
export const LAG_LIMIT_MS = 25;
/** How long requests go to the threads after a late probe: one slow turn tells that more are likely. */
export const SLOW_HOLD_MS = 1_000;

export class LoopResponsiveness {
  readonly #clock: LoopClock;
  readonly #inFlight: () => boolean;
  #timer: unknown;
  /** When the pending probe should fire. */
  #dueAt = 0;
  /** Requests go to the threads until then. */
  #slowUntil = Number.NEGATIVE_INFINITY;
  #closed = false;

  /** `inFlight`: whether the client has requests in flight (probing stops at the first probe that finds none). */
  constructor(inFlight: () => boolean, clock: LoopClock = realLoopClock) {
    this.#inFlight = inFlight;
    this.#clock = clock;
  }

  /** Whether the loop kept up lately (no probe late past LAG_LIMIT_MS within SLOW_HOLD_MS). */
  get responsive(): boolean {
    return this.#clock.now() >= this.#slowUntil;
  }

  /** A request is starting: probe from now on while requests are in flight (nothing if already probing). */
  watch(): void {
    if (this.#timer !== undefined || this.#closed) return;
    this.#schedule();
  }

  close(): void {
    this.#closed = true;
    if (this.#timer === undefined) return;
    this.#clock.clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  #schedule(): void {
    this.#dueAt = this.#clock.now() + PROBE_INTERVAL_MS;
    this.#timer = this.#clock.setTimeout(this.#probe, PROBE_INTERVAL_MS);
  }

  #probe = (): void => {
    this.#timer = undefined;
    const now = this.#clock.now();
    if (now - this.#dueAt > LAG_LIMIT_MS) this.#slowUntil = now + SLOW_HOLD_MS;
    if (this.#inFlight() && !this.#closed) this.#schedule();
  };
}
