// A watch per fd over one epoll set per thread (native PollSet), for fds that come and go by the thousand: the
// daemon's connects in progress and its idle pooled sockets. A Poller per fd costs about four syscalls and an N-API
// object, reference and async context to set up and as much to close; here a watch costs one epoll_ctl to start and
// one to stop, and a wakeup of the thread serves every ready fd in one call. Long-lived single fds (a channel's
// socket) keep their Poller.
//
// Level-triggered, as a Poller: a handler that leaves its fd readable is called again at the next turn. A handler may
// close any watch, its own included; a watch closed during a wakeup gets none of that wakeup's later events, even if
// a new watch on a reused fd number took its slot (a token carries the slot and its generation). A watch never owns
// its fd: close the watch before the fd (native close() refuses an fd still watched).
import * as native from './native.js';

/** `events`: the READABLE / WRITABLE / DISCONNECT bits that are ready (all those asked for on an error or hang-up). */
export type WatchHandler = (events: number) => void;

export interface FdWatch {
  /** Starts watching for `events`, or changes them. */
  start(events: number): void;
  /** Stops watching; start() may be called again. */
  stop(): void;
  /** Stops watching for good. Idempotent. The fd stays open. */
  close(): void;
}

const SLOT_BITS = 20;
const MAX_SLOTS = 1 << SLOT_BITS;
/** Generations per slot in a token (a token must fit an int32): only events of one wakeup can be stale. */
const GENERATIONS = 1 << 11;
/** Ready fds read per wakeup; more wait for the next turn (level-triggered). */
const BATCH = 256;

class ThreadPollSet {
  readonly #ready = new Int32Array(BATCH * 2);
  readonly #set: native.PollSet;
  #handlers: Array<WatchHandler | undefined> = [];
  #generations: number[] = [];
  #free: number[] = [];

  constructor() {
    this.#set = new native.PollSet(this.#ready, (count) => this.#dispatch(count));
  }

  watch(fd: number, handler: WatchHandler): FdWatch {
    let slot = this.#free.pop();
    if (slot === undefined) {
      slot = this.#handlers.length;
      if (slot >= MAX_SLOTS) throw new RangeError(`a thread watches at most ${MAX_SLOTS} fds through its PollSet`);
      this.#generations.push(0);
    }
    this.#handlers[slot] = handler;
    return new Watch(this, fd, slot, (this.#generations[slot]! << SLOT_BITS) | slot);
  }

  add(fd: number, events: number, token: number): void {
    this.#set.add(fd, events, token);
  }

  modify(fd: number, events: number, token: number): void {
    this.#set.modify(fd, events, token);
  }

  remove(fd: number): void {
    this.#set.remove(fd);
  }

  /** A new token for `slot`: events read under the old one (earlier in this wakeup) are no longer delivered. */
  restamp(slot: number): number {
    const generation = (this.#generations[slot]! + 1) % GENERATIONS;
    this.#generations[slot] = generation;
    return (generation << SLOT_BITS) | slot;
  }

  release(slot: number): void {
    this.#handlers[slot] = undefined;
    this.restamp(slot);
    this.#free.push(slot);
  }

  #dispatch(count: number): void {
    const ready = this.#ready;
    for (let i = 0; i < count; i++) {
      const token = ready[2 * i]!;
      const slot = token & (MAX_SLOTS - 1);
      if (this.#generations[slot] !== token >>> SLOT_BITS) continue; // closed earlier in this wakeup
      this.#handlers[slot]?.(ready[2 * i + 1]!);
    }
  }
}

class Watch implements FdWatch {
  readonly #set: ThreadPollSet;
  readonly #fd: number;
  readonly #slot: number;
  #token: number;
  #added = false;
  #closed = false;

  constructor(set: ThreadPollSet, fd: number, slot: number, token: number) {
    this.#set = set;
    this.#fd = fd;
    this.#slot = slot;
    this.#token = token;
  }

  start(events: number): void {
    if (this.#closed) throw new Error('FdWatch.start after close');
    if (this.#added) {
      this.#set.modify(this.#fd, events, this.#token);
      return;
    }
    this.#set.add(this.#fd, events, this.#token);
    this.#added = true;
  }

  /** Also drops the events of the current wakeup not yet delivered: a stopped watch gets nothing more. */
  stop(): void {
    if (!this.#added) return;
    this.#added = false;
    this.#set.remove(this.#fd);
    this.#token = this.#set.restamp(this.#slot);
  }

  close(): void {
    if (this.#closed) return;
    this.stop();
    this.#closed = true;
    this.#set.release(this.#slot);
  }
}

// Made when this module loads (per thread: each thread loads its own copy), so that its epoll fd is open from the
// start, not from the first watch in the middle of whatever counts fds. Without members it keeps no loop alive.
const threadSet = new ThreadPollSet();

/** A watch on `fd` over this thread's set; call start() to begin. */
export function watchFd(fd: number, handler: WatchHandler): FdWatch {
  return threadSet.watch(fd, handler);
}
