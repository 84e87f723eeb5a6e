// Request deadlines of one runtime, on one timer. A setTimeout per request costs a timer object, a list insert and
// a removal, about as much as the rest of a keep-alive request's bookkeeping; here each request costs a heap entry,
// and the timer is re-armed only when a deadline comes due or an earlier one arrives (with one timeout for all
// requests, deadlines arrive in order and it almost never is).
//
// The timer keeps the event loop alive exactly while some deadline is pending (as each request's own timer did).

/** A pending deadline; `expire` runs once when it comes due, unless it was removed first. */
export interface Deadline {
  at: number;
  expire(): void;
  /** Position in the heap; -1 once removed or expired. */
  index: number;
}

export class Deadlines {
  #heap: Deadline[] = [];
  #timer: NodeJS.Timeout | undefined;
  /** When the timer fires (ms, `now()`'s clock); Infinity when not armed. */
  #armedAt = Number.POSITIVE_INFINITY;
  readonly #now: () => number;

  /** `now`: the clock deadlines are given in (ms). */
  constructor(now: () => number) {
    this.#now = now;
  }

  get size(): number {
    return this.#heap.length;
  }

  add(at: number, expire: () => void): Deadline {
    const entry: Deadline = { at, expire, index: -1 };
    this.insert(entry);
    return entry;
  }

  /** add() of an entry the caller made (an object that is something else too: one allocation less per request). */
  insert(entry: Deadline): void {
    entry.index = this.#heap.length;
    this.#heap.push(entry);
    this.#up(entry.index);
    if (this.#heap.length === 1) this.#timer?.ref();
    if (entry.at < this.#armedAt) this.#arm(entry.at);
  }

  /** Drops a deadline that no longer matters (its request ended). The timer stays armed: firing early is cheap. */
  remove(entry: Deadline): void {
    const index = entry.index;
    if (index < 0) return;
    entry.index = -1;
    const last = this.#heap.pop()!;
    if (last !== entry) {
      this.#heap[index] = last;
      last.index = index;
      this.#down(index);
      this.#up(last.index);
    }
    if (this.#heap.length === 0) this.#timer?.unref();
  }

  /** Stops the timer; pending deadlines never expire. */
  close(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#armedAt = Number.POSITIVE_INFINITY;
    for (const entry of this.#heap) entry.index = -1;
    this.#heap = [];
  }

  #arm(at: number): void {
    this.#armedAt = at;
    const delay = Math.max(0, at - this.#now());
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#fire(), delay);
    if (this.#heap.length === 0) this.#timer.unref();
  }

  #fire(): void {
    this.#timer = undefined;
    this.#armedAt = Number.POSITIVE_INFINITY;
    const now = this.#now();
    const due: Deadline[] = [];
    while (this.#heap.length > 0 && this.#heap[0]!.at <= now) {
      const entry = this.#heap[0]!;
      this.remove(entry);
      due.push(entry);
    }
    if (this.#heap.length > 0) this.#arm(this.#heap[0]!.at);
    for (const entry of due) entry.expire();
  }

  #up(index: number): void {
    const heap = this.#heap;
    const entry = heap[index]!;
    while (index > 0) {
      const parentIndex = (index - 1) >> 1;
      const parent = heap[parentIndex]!;
      if (parent.at <= entry.at) break;
      heap[index] = parent;
      parent.index = index;
      index = parentIndex;
    }
    heap[index] = entry;
    entry.index = index;
  }

  #down(index: number): void {
    const heap = this.#heap;
    const entry = heap[index]!;
    for (;;) {
      const left = 2 * index + 1;
      if (left >= heap.length) break;
      const right = left + 1;
      const child = right < heap.length && heap[right]!.at < heap[left]!.at ? right : left;
      if (heap[child]!.at >= entry.at) break;
      heap[index] = heap[child]!;
      heap[index]!.index = index;
      index = child;
    }
    heap[index] = entry;
    entry.index = index;
  }
}
