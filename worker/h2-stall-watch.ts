// A workaround for a libcurl 7.88 stall in HTTP/2 over a plaintext socket (how curl speaks to a warm TLS session the
// daemon relays). After a stream paused (CURL_WRITEFUNC_PAUSE) and resumed, curl now and then leaves the
// WINDOW_UPDATE that would reopen the flow-control window unsent: the server, its window spent, waits for it, curl
// waits for data, and the transfer hangs until its deadline. Reproduced with node-libcurl alone against a node:http2
// h2c server (a 64 MiB download read by a slower consumer stalls at exactly 64 MiB, two windows' worth, in about 1
// run of 8), never with curl's own TLS; later curl versions rewrote this code (http2_data_pause runs the transfer
// again on unpause). curl_easy_pause itself sends whatever nghttp2 has queued (it sets the stream's window, then
// sends), so a watched transfer that received nothing for a whole interval while not paused gets its receive pause
// toggled: that sends the update. For a transfer that is merely waiting on a slow server the toggle changes nothing.
// A stream that never paused stalls too: after another stream of its connection was cancelled mid-body, the next
// one waited until its deadline in about one run of three; so the engine watches relayed HTTP/2 transfers from their
// start (curl-engine.ts #watchStall).

/** What the watch needs of one transfer; the engine counts `received`. */
export interface StallWatched {
  received: number;
  /** Still running on its handle. */
  running(): boolean;
  /** Paused by us (the sink is full): no data is expected. */
  paused(): boolean;
  /** Toggles the receive pause (see above). */
  kick(): void;
}

export class H2StallWatch {
  /** What each transfer had received at the last tick; NaN for one watched since (never equal: not kicked yet). */
  #watched = new Map<StallWatched, number>();
  #timer: NodeJS.Timeout | undefined;
  #intervalMs: number;
  /** Kicks so far (tests and stats). */
  kicks = 0;

  constructor(intervalMs = 250) {
    this.#intervalMs = intervalMs;
  }

  /** Watches a transfer until it stops running (idempotent). */
  watch(transfer: StallWatched): void {
    if (this.#watched.has(transfer)) return;
    if (this.#timer) {
      // The next tick may be a moment away: a transfer that has just begun received nothing only for that reason
      // (curl may not even have given it its connection yet, and curl_easy_pause answers CURLE_BAD_FUNCTION_ARGUMENT
      // for a handle without one, which fails the transfer). Kicked only after a whole interval between two ticks.
      this.#watched.set(transfer, Number.NaN);
      return;
    }
    // (The first tick is a whole interval away.)
    this.#watched.set(transfer, transfer.received);
    this.#timer = setInterval(() => this.#tick(), this.#intervalMs);
    this.#timer.unref();
  }

  close(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
    this.#watched.clear();
  }

  #tick(): void {
    for (const [transfer, seen] of this.#watched) {
      if (!transfer.running()) {
        this.#watched.delete(transfer);
        continue;
      }
      if (!transfer.paused() && transfer.received === seen) {
        this.kicks++;
        transfer.kick();
      }
      this.#watched.set(transfer, transfer.received);
    }
    if (this.#watched.size === 0) this.close();
  }
}
