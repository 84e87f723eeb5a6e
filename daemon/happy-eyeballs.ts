// Happy Eyeballs (RFC 8305) as a pure, clock-injected state machine: which address to try when, and which
// connection wins. It opens nothing itself: the caller (daemon/connector.ts) gives it a function that starts one
// attempt and a clock; tests give it fake attempts and a fake clock (test/happy-eyeballs.test.ts).
//
// - The answers of the two families arrive separately (`answer`). The preferred family (learned for the host, else
//   IPv6) starts as soon as its answer is in; when the other family answers first, it waits at most the resolution
//   delay for the preferred one (RFC 8305 §3).
// - Addresses are tried interleaved by family, preferred first (§4); an answer that arrives late joins the queue.
// - The next attempt starts after the connection attempt delay, or at once when an attempt fails (§5). Attempts
//   already started keep running.
// - The first attempt to complete wins; every other attempt is cancelled. A success that reaches us after the race
//   was decided (it completed while being cancelled) is handed to `discard`, so its fd is closed.
// - Each candidate passes `check` (the egress policy) right before its attempt; a refused one is skipped at once.
// - The budget: a race always may have one attempt in flight; every further attempt in flight at the same time
//   takes a slot of the origin's `AttemptBudget`, or waits for one.
//
// Outcome: `onDone` is called exactly once, with the winner or with every failure and refusal.

export type Family = 4 | 6;

export interface Candidate {
  address: string;
  family: Family;
}

/** The time source and timers; the connector passes the real ones, tests a fake. */
export interface RaceClock {
  now(): number;
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const realClock: RaceClock = {
  now: () => performance.now(),
  setTimeout: (callback, ms) => setTimeout(callback, ms),
  clearTimeout: (handle) => clearTimeout(handle as NodeJS.Timeout),
};

/** RFC 8305 §8 recommended values. */
export const RESOLUTION_DELAY_MS = 50;
export const MIN_ATTEMPT_DELAY_MS = 100;
/** (The configuration refuses a longer connectAttemptDelayMs: a silent family would hold up the other that long.) */
export const MAX_ATTEMPT_DELAY_MS = 2_000;

/** How one family fared in a race (what the learned-family memory is told). */
export type FamilyOutcome = 'won' | 'failed' | 'outrun' | 'untried';

export type RaceResult<T> =
  | {
      ok: true;
      value: T;
      candidate: Candidate;
      families: Record<Family, FamilyOutcome>;
      /** How many addresses each family's answer had. */
      answered: Record<Family, number>;
    }
  | {
      ok: false;
      answered: Record<Family, number>;
      /** Attempts that ran and failed, in the order they failed. */
      failures: Array<{ candidate: Candidate; error: Error }>;
      /** Candidates the check refused before any attempt. */
      refusals: Array<{ candidate: Candidate; error: Error }>;
      /** Families whose answer was an error (resolution failed). */
      answerErrors: Array<{ family: Family; error: Error }>;
      families: Record<Family, FamilyOutcome>;
    };

export interface RaceOptions<T> {
  clock: RaceClock;
  /** The family tried first (and waited for, for at most the resolution delay). */
  preferFamily: Family;
  /** Connection attempt delay; values below MIN_ATTEMPT_DELAY_MS are raised to it. */
  attemptDelayMs: number;
  resolutionDelayMs?: number;
  budget: AttemptBudget;
  /** Throws when the candidate may not be tried (egress policy): it is skipped, no attempt is made. */
  check(candidate: Candidate): void;
  /**
   * Starts one attempt. `settle` is called exactly once, with the error or the connected value; it may be called
   * after `cancel()` (a success then goes to `discard`). Returns the canceller.
   */
  attempt(candidate: Candidate, settle: (error: Error | undefined, value?: T) => void): () => void;
  /** Releases a value that lost the race (closes its fd). */
  discard(value: T): void;
  onDone(result: RaceResult<T>): void;
}

interface RunningAttempt {
  candidate: Candidate;
  cancel: () => void;
  /** Holds a slot of the budget (every attempt but the race's only one in flight). */
  slotted: boolean;
  startedAt: number;
}

const other = (family: Family): Family => (family === 6 ? 4 : 6);

export class HappyEyeballsRace<T> {
  readonly #options: RaceOptions<T>;
  readonly #attemptDelayMs: number;
  readonly #resolutionDelayMs: number;
  readonly #queues: Record<Family, Candidate[]> = { 4: [], 6: [] };
  /** True once the family answered (with addresses, none, or an error). */
  readonly #answered: Record<Family, boolean> = { 4: false, 6: false };
  readonly #addressCount: Record<Family, number> = { 4: 0, 6: 0 };
  readonly #tried: Record<Family, { started: number; failed: number }> = {
    4: { started: 0, failed: 0 },
    6: { started: 0, failed: 0 },
  };
  readonly #running = new Set<RunningAttempt>();
  readonly #failures: Array<{ candidate: Candidate; error: Error }> = [];
  readonly #refusals: Array<{ candidate: Candidate; error: Error }> = [];
  readonly #answerErrors: Array<{ family: Family; error: Error }> = [];
  #nextFamily: Family;
  #started = false;
  #done = false;
  #lastStartAt = Number.NEGATIVE_INFINITY;
  #resolutionTimer: unknown;
  #attemptTimer: unknown;
  /** Waiting for a budget slot: the canceller of that wait. */
  #budgetWait: (() => void) | undefined;

  constructor(options: RaceOptions<T>) {
    this.#options = options;
    this.#attemptDelayMs = Math.max(MIN_ATTEMPT_DELAY_MS, options.attemptDelayMs);
    this.#resolutionDelayMs = options.resolutionDelayMs ?? RESOLUTION_DELAY_MS;
    this.#nextFamily = options.preferFamily;
  }

  get done(): boolean {
    return this.#done;
  }

  /** Attempts in flight (for tests and stats). */
  get inFlight(): number {
    return this.#running.size;
  }

  /** The answer of one family: its addresses in the resolver's order (possibly none), or the resolution error. */
  answer(family: Family, result: readonly Candidate[] | Error): void {
    if (this.#done || this.#answered[family]) return;
    this.#answered[family] = true;
    if (result instanceof Error) this.#answerErrors.push({ family, error: result });
    else {
      for (const candidate of result) if (candidate.family === family) this.#queues[family].push(candidate);
      this.#addressCount[family] = this.#queues[family].length;
    }
    if (this.#started) {
      // A late answer joins the queue: its first address is tried when the attempt delay since the last attempt has
      // passed (at once when nothing runs).
      if (this.#running.size === 0) this.#startNext();
      else if (!this.#budgetWait) {
        const remaining = this.#lastStartAt + this.#attemptDelayMs - this.#options.clock.now();
        if (remaining <= 0) this.#startNext();
        else this.#armAttemptTimer(remaining);
      }
      this.#finishIfExhausted();
      return;
    }
    const preferred = this.#options.preferFamily;
    if (this.#answered[preferred] || this.#queues[preferred].length > 0) {
      this.#begin();
    } else if (this.#queues[other(preferred)].length > 0 && this.#resolutionTimer === undefined) {
      // The other family answered first: give the preferred one the resolution delay.
      this.#resolutionTimer = this.#options.clock.setTimeout(() => {
        this.#resolutionTimer = undefined;
        this.#begin();
      }, this.#resolutionDelayMs);
    } else if (this.#answered[4] && this.#answered[6]) {
      this.#begin();
    }
  }

  /** Stops the race: every attempt is cancelled; onDone is not called. */
  abort(): void {
    if (this.#done) return;
    this.#done = true;
    this.#clearTimers();
    for (const running of [...this.#running]) this.#cancel(running);
  }

  #begin(): void {
    if (this.#started || this.#done) return;
    this.#started = true;
    if (this.#resolutionTimer !== undefined) {
      this.#options.clock.clearTimeout(this.#resolutionTimer);
      this.#resolutionTimer = undefined;
    }
    this.#startNext();
  }

  /** Takes the next candidate, interleaving families; undefined when both queues are empty. */
  #takeCandidate(): Candidate | undefined {
    const first = this.#queues[this.#nextFamily];
    const second = this.#queues[other(this.#nextFamily)];
    const candidate = first.shift() ?? second.shift();
    if (candidate) this.#nextFamily = other(candidate.family);
    return candidate;
  }

  #hasCandidates(): boolean {
    return this.#queues[4].length + this.#queues[6].length > 0;
  }

  /**
   * Starts the next attempt now (the attempt delay passed, or an attempt failed). The race's only attempt in flight
   * needs no budget slot; any further one takes a slot or waits for one.
   */
  #startNext(): void {
    if (this.#done) return;
    if (this.#attemptTimer !== undefined) {
      this.#options.clock.clearTimeout(this.#attemptTimer);
      this.#attemptTimer = undefined;
    }
    if (this.#budgetWait) {
      if (this.#running.size > 0) return; // the slot, when granted, starts it
      // Nothing runs any more (the attempt failed): the next one needs no slot.
      this.#budgetWait();
      this.#budgetWait = undefined;
    }
    if (!this.#hasCandidates()) {
      this.#finishIfExhausted();
      return;
    }
    if (this.#running.size === 0) {
      this.#launch(false);
      return;
    }
    if (this.#options.budget.tryTake()) {
      this.#launch(true);
      return;
    }
    this.#budgetWait = this.#options.budget.wait(() => {
      this.#budgetWait = undefined;
      this.#launch(true);
    });
  }

  /**
   * Starts one attempt on the next candidate the check allows. With `slotted`, a budget slot was taken for it and
   * is given back when no candidate is left.
   */
  #launch(slotted: boolean): void {
    for (let candidate = this.#takeCandidate(); candidate && !this.#done; candidate = this.#takeCandidate()) {
      try {
        this.#options.check(candidate);
      } catch (error) {
        this.#refusals.push({ candidate, error: error as Error });
        continue;
      }
      const running: RunningAttempt = { candidate, cancel: () => {}, slotted, startedAt: this.#options.clock.now() };
      this.#running.add(running);
      this.#tried[candidate.family].started++;
      this.#lastStartAt = running.startedAt;
      // An attempt may settle before attempt() returns (an immediate refusal): that result is applied after.
      let starting = true;
      let early: { error: Error | undefined; value: T | undefined } | undefined;
      const settle = (error: Error | undefined, value?: T): void => {
        if (starting) early ??= { error, value };
        else this.#settle(running, error, value);
      };
      try {
        running.cancel = this.#options.attempt(candidate, settle);
      } catch (error) {
        early ??= { error: error as Error, value: undefined };
      }
      starting = false;
      if (early) {
        this.#settle(running, early.error, early.value);
        return;
      }
      this.#armAttemptTimer(this.#attemptDelayMs);
      return;
    }
    if (slotted) this.#options.budget.release();
    this.#finishIfExhausted();
  }

  /** The next attempt after `ms`, when there is a candidate for it. */
  #armAttemptTimer(ms: number): void {
    if (this.#done || this.#attemptTimer !== undefined || !this.#hasCandidates()) return;
    this.#attemptTimer = this.#options.clock.setTimeout(() => {
      this.#attemptTimer = undefined;
      this.#startNext();
    }, ms);
  }

  #settle(running: RunningAttempt, error: Error | undefined, value: T | undefined): void {
    if (!this.#running.has(running)) {
      // Cancelled before it settled: a connection that completed anyway is not wanted.
      if (error === undefined && value !== undefined) this.#options.discard(value);
      return;
    }
    this.#running.delete(running);
    if (error === undefined && !this.#done) {
      // The race is decided before the slot goes back: a wait of this race for it would start another attempt.
      this.#win(running, value as T);
      if (running.slotted) this.#options.budget.release();
      return;
    }
    const waiting = this.#budgetWait;
    if (running.slotted) this.#options.budget.release();
    if (this.#done) {
      if (error === undefined && value !== undefined) this.#options.discard(value);
      return;
    }
    this.#failures.push({ candidate: running.candidate, error: error as Error });
    this.#tried[running.candidate.family].failed++;
    // A failure starts the next attempt at once (no waiting for the delay). When the slot it gave back went to this
    // race's own wait, that grant was the next attempt: another now would be a second one for one failure, inside
    // the attempt delay, holding one more of the origin's slots (RFC 8305 §5: one attempt at a time per delay).
    if (waiting === undefined || this.#budgetWait !== undefined) this.#startNext();
    this.#finishIfExhausted();
  }

  #win(winner: RunningAttempt, value: T): void {
    this.#done = true;
    this.#clearTimers();
    const families = this.#outcomes(winner);
    for (const running of [...this.#running]) this.#cancel(running);
    this.#options.onDone({
      ok: true,
      value,
      candidate: winner.candidate,
      families,
      answered: { ...this.#addressCount },
    });
  }

  #outcomes(winner: RunningAttempt | undefined): Record<Family, FamilyOutcome> {
    const outcome = (family: Family): FamilyOutcome => {
      if (winner?.candidate.family === family) return 'won';
      const tried = this.#tried[family];
      if (tried.started === 0) return 'untried';
      // Still in flight when the other family won, and started earlier: it was slower (or silent).
      const outrun = [...this.#running].some(
        (running) => running.candidate.family === family && winner && running.startedAt <= winner.startedAt,
      );
      if (outrun) return 'outrun';
      return tried.failed > 0 ? 'failed' : 'untried';
    };
    return { 4: outcome(4), 6: outcome(6) };
  }

  /** Done when nothing runs, nothing is queued or awaited, and no answer is still to come. */
  #finishIfExhausted(): void {
    if (this.#done || !this.#started) return;
    if (this.#running.size > 0 || this.#hasCandidates() || this.#budgetWait) return;
    if (!(this.#answered[4] && this.#answered[6])) return;
    this.#done = true;
    this.#clearTimers();
    this.#options.onDone({
      ok: false,
      failures: this.#failures,
      refusals: this.#refusals,
      answerErrors: this.#answerErrors,
      families: this.#outcomes(undefined),
      answered: { ...this.#addressCount },
    });
  }

  #cancel(running: RunningAttempt): void {
    this.#running.delete(running);
    if (running.slotted) this.#options.budget.release();
    running.cancel();
  }

  #clearTimers(): void {
    const { clock } = this.#options;
    if (this.#resolutionTimer !== undefined) clock.clearTimeout(this.#resolutionTimer);
    if (this.#attemptTimer !== undefined) clock.clearTimeout(this.#attemptTimer);
    this.#resolutionTimer = undefined;
    this.#attemptTimer = undefined;
    this.#budgetWait?.();
    this.#budgetWait = undefined;
  }
}

/**
 * Slots for the attempts that race beside another attempt of the same connect, per origin: a host with many
 * addresses (or many connects to it at once) cannot make the daemon open a socket per address at once. Waiters
 * are served first come, first served.
 */
export class AttemptBudget {
  #limit: number;
  #inUse = 0;
  readonly #waiters: Array<() => void> = [];

  constructor(limit: number) {
    this.#limit = limit;
  }

  get inUse(): number {
    return this.#inUse;
  }
  get waiting(): number {
    return this.#waiters.length;
  }
  get idle(): boolean {
    return this.#inUse === 0 && this.#waiters.length === 0;
  }

  /** A new limit (configuration reload); slots in use stay until released. */
  setLimit(limit: number): void {
    this.#limit = limit;
    this.#grant();
  }

  tryTake(): boolean {
    if (this.#inUse >= this.#limit || this.#waiters.length > 0) return false;
    this.#inUse++;
    return true;
  }

  /** Calls `granted` (with the slot taken) when one is free; returns the canceller of the wait. */
  wait(granted: () => void): () => void {
    const waiter = () => granted();
    this.#waiters.push(waiter);
    return () => {
      const index = this.#waiters.indexOf(waiter);
      if (index !== -1) this.#waiters.splice(index, 1);
    };
  }

  release(): void {
    this.#inUse = Math.max(0, this.#inUse - 1);
    this.#grant();
  }

  #grant(): void {
    while (this.#inUse < this.#limit && this.#waiters.length > 0) {
      const waiter = this.#waiters.shift()!;
      this.#inUse++;
      waiter();
    }
  }
}
