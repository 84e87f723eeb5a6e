// How a transfer is cancelled inside a runtime: the part of AbortSignal that the engine, the socket supply and the
// daemon link use, and a light implementation of it. Every request needs one (its deadline can fire at any
// moment), and an AbortController with its EventTarget costs about a kilobyte and a few microseconds, as much as
// the rest of a keep-alive request's bookkeeping. A caller's real AbortSignal fits the same interface.

export interface CancelSignal {
  readonly aborted: boolean;
  /** Why it was cancelled (the error the transfer fails with). */
  readonly reason: unknown;
  throwIfAborted(): void;
  addEventListener(type: 'abort', listener: AbortListener, options?: { once?: boolean }): void;
  removeEventListener(type: 'abort', listener: AbortListener): void;
}

/** A function, or an object whose handleEvent() runs (as EventTarget takes them). */
export type AbortListener = (() => void) | { handleEvent(): void };

/** A CancelSignal and its controller in one small object. Listeners run once, in order, when it is cancelled. */
export class Cancellation implements CancelSignal {
  aborted = false;
  reason: unknown = undefined;
  /** The only listener, or (two or more) all of them: most cancellations have one, and need no array. */
  #listeners: AbortListener | AbortListener[] | undefined;

  /** Cancels with `reason`; later calls do nothing. A listener that throws does not stop the others: the first
   *  error is rethrown once all ran (as an EventTarget reports it, to the process). */
  cancel(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    const listeners = this.#listeners;
    this.#listeners = undefined;
    if (!listeners) return;
    let failure: { error: unknown } | undefined;
    for (const listener of Array.isArray(listeners) ? listeners : [listeners]) {
      try {
        if (typeof listener === 'function') listener();
        else listener.handleEvent();
      } catch (error) {
        failure ??= { error };
      }
    }
    if (failure) throw failure.error;
  }

  throwIfAborted(): void {
    if (this.aborted) throw this.reason;
  }

  addEventListener(_type: 'abort', listener: AbortListener): void {
    if (this.aborted) return;
    const listeners = this.#listeners;
    if (listeners === undefined) this.#listeners = listener;
    else if (Array.isArray(listeners)) listeners.push(listener);
    else this.#listeners = [listeners, listener];
  }

  removeEventListener(_type: 'abort', listener: AbortListener): void {
    const listeners = this.#listeners;
    if (listeners === listener) {
      this.#listeners = undefined;
      return;
    }
    if (!Array.isArray(listeners)) return;
    const index = listeners.indexOf(listener);
    if (index >= 0) listeners.splice(index, 1);
  }
}
