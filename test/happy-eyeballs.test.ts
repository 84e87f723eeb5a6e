// The Happy Eyeballs race (daemon/happy-eyeballs.ts) and the learned-family memory (daemon/learned-families.ts)
// as pure logic: a fake clock that runs timers only when the test advances it, and fake attempts the test settles
// by hand. Every step is synchronous, so each test states exactly when each attempt started.

import { describe, expect, it } from 'vitest';
import {
  AttemptBudget,
  type Candidate,
  type Family,
  HappyEyeballsRace,
  type RaceClock,
  type RaceResult,
} from '../daemon/happy-eyeballs.js';
import { LearnedFamilies } from '../daemon/learned-families.js';

class FakeClock implements RaceClock {
  #now = 0;
  #nextId = 1;
  readonly #timers = new Map<number, { at: number; callback: () => void }>();

  now(): number {
    return this.#now;
  }
  setTimeout(callback: () => void, ms: number): unknown {
    const id = this.#nextId++;
    this.#timers.set(id, { at: this.#now + ms, callback });
    return id;
  }
  clearTimeout(handle: unknown): void {
    this.#timers.delete(handle as number);
  }
  get pending(): number {
    return this.#timers.size;
  }
  /** Runs every timer due within `ms`, in order, each at its own time. */
  advance(ms: number): void {
    const end = this.#now + ms;
    for (;;) {
      let next: [number, { at: number; callback: () => void }] | undefined;
      for (const entry of this.#timers) if (entry[1].at <= end && (!next || entry[1].at < next[1].at)) next = entry;
      if (!next) break;
      this.#timers.delete(next[0]);
      this.#now = next[1].at;
      next[1].callback();
    }
    this.#now = end;
  }
}

interface FakeAttempt {
  address: string;
  family: Family;
  startedAt: number;
  cancelled: boolean;
  settle(error: Error | undefined, value?: string): void;
}

const v6 = (address: string): Candidate => ({ address, family: 6 });
const v4 = (address: string): Candidate => ({ address, family: 4 });
const refusedError = () => Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });

/** A race whose attempts are recorded; the value of a successful attempt is its address. */
function setup(
  options: {
    preferFamily?: Family;
    attemptDelayMs?: number;
    budget?: AttemptBudget;
    refuse?: (candidate: Candidate) => boolean;
    clock?: FakeClock;
  } = {},
) {
  const clock = options.clock ?? new FakeClock();
  const attempts: FakeAttempt[] = [];
  const discarded: string[] = [];
  const results: Array<RaceResult<string>> = [];
  const race = new HappyEyeballsRace<string>({
    clock,
    preferFamily: options.preferFamily ?? 6,
    attemptDelayMs: options.attemptDelayMs ?? 250,
    budget: options.budget ?? new AttemptBudget(8),
    check(candidate) {
      if (options.refuse?.(candidate)) throw Object.assign(new Error('refused: private'), { code: 'POLICY' });
    },
    attempt(candidate, settle) {
      const attempt: FakeAttempt = {
        ...candidate,
        startedAt: clock.now(),
        cancelled: false,
        settle: (error, value) => settle(error, value),
      };
      attempts.push(attempt);
      return () => {
        attempt.cancelled = true;
      };
    },
    discard: (value) => discarded.push(value),
    onDone: (result) => results.push(result),
  });
  const attempt = (address: string) => {
    const found = attempts.find((entry) => entry.address === address);
    if (!found) throw new Error(`no attempt to ${address}`);
    return found;
  };
  const started = () => attempts.map((entry) => `${entry.address}@${entry.startedAt}`);
  return { clock, race, attempts, discarded, results, attempt, started };
}

describe('HappyEyeballsRace', () => {
  it('both families working: the preferred family (IPv6) connects and IPv4 is never tried', () => {
    const t = setup();
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    expect(t.started()).toEqual(['2001:db8::1@0']);
    t.clock.advance(10);
    t.attempt('2001:db8::1').settle(undefined, '2001:db8::1');
    expect(t.results).toEqual([
      {
        ok: true,
        value: '2001:db8::1',
        candidate: v6('2001:db8::1'),
        families: { 6: 'won', 4: 'untried' },
        answered: { 6: 1, 4: 1 },
      },
    ]);
    t.clock.advance(1000);
    expect(t.started()).toEqual(['2001:db8::1@0']);
    expect(t.clock.pending).toBe(0);
  });

  it('IPv6 silent: IPv4 starts after the attempt delay, wins, and the IPv6 attempt is cancelled', () => {
    const t = setup();
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(249);
    expect(t.started()).toEqual(['2001:db8::1@0']);
    t.clock.advance(1);
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@250']);
    t.clock.advance(20);
    t.attempt('192.0.2.1').settle(undefined, '192.0.2.1');
    expect(t.results[0]).toMatchObject({ ok: true, value: '192.0.2.1', families: { 6: 'outrun', 4: 'won' } });
    expect(t.attempt('2001:db8::1').cancelled).toBe(true);
    expect(t.race.inFlight).toBe(0);
    // The cancelled attempt's rejection arrives later and changes nothing.
    t.attempt('2001:db8::1').settle(new Error('aborted'));
    expect(t.results).toHaveLength(1);
  });

  it('IPv6 refused: IPv4 starts at once, not after the delay', () => {
    const t = setup();
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(3);
    t.attempt('2001:db8::1').settle(refusedError());
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@3']);
    t.attempt('192.0.2.1').settle(undefined, '192.0.2.1');
    expect(t.results[0]).toMatchObject({ ok: true, families: { 6: 'failed', 4: 'won' } });
  });

  it('IPv4 silent with IPv4 learned first: IPv6 starts after the delay and wins', () => {
    const t = setup({ preferFamily: 4 });
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    expect(t.started()).toEqual(['192.0.2.1@0']);
    t.clock.advance(250);
    expect(t.started()).toEqual(['192.0.2.1@0', '2001:db8::1@250']);
    t.attempt('2001:db8::1').settle(undefined, '2001:db8::1');
    expect(t.results[0]).toMatchObject({ ok: true, value: '2001:db8::1', families: { 4: 'outrun', 6: 'won' } });
    expect(t.attempt('192.0.2.1').cancelled).toBe(true);
  });

  it('interleaves the families, preferred first, one attempt per delay while all are silent', () => {
    const t = setup();
    t.race.answer(4, [v4('192.0.2.1'), v4('192.0.2.2'), v4('192.0.2.3')]);
    t.race.answer(6, [v6('2001:db8::1'), v6('2001:db8::2')]);
    t.clock.advance(5000);
    expect(t.started()).toEqual([
      '2001:db8::1@0',
      '192.0.2.1@250',
      '2001:db8::2@500',
      '192.0.2.2@750',
      '192.0.2.3@1000',
    ]);
    expect(t.results).toEqual([]); // attempts still in flight: their own timeouts end them
  });

  it('never uses an attempt delay below 100 ms', () => {
    const t = setup({ attemptDelayMs: 10 });
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(99);
    expect(t.attempts).toHaveLength(1);
    t.clock.advance(1);
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@100']);
  });

  it('A first: waits the resolution delay for AAAA, and starts with IPv6 when it comes within it', () => {
    const t = setup();
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(20);
    expect(t.attempts).toHaveLength(0);
    t.race.answer(6, [v6('2001:db8::1')]);
    expect(t.started()).toEqual(['2001:db8::1@20']);
    t.clock.advance(250);
    expect(t.started()).toEqual(['2001:db8::1@20', '192.0.2.1@270']);
  });

  it('A first, AAAA later than the resolution delay: IPv4 starts at 50 ms and IPv6 joins the queue', () => {
    const t = setup();
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(50);
    expect(t.started()).toEqual(['192.0.2.1@50']);
    t.clock.advance(30);
    t.race.answer(6, [v6('2001:db8::1')]);
    // The next attempt keeps the delay counted from the last one.
    t.clock.advance(219);
    expect(t.attempts).toHaveLength(1);
    t.clock.advance(1);
    expect(t.started()).toEqual(['192.0.2.1@50', '2001:db8::1@300']);
  });

  it('an empty AAAA answer starts IPv4 at once', () => {
    const t = setup();
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(5);
    t.race.answer(6, []);
    expect(t.started()).toEqual(['192.0.2.1@5']);
  });

  it('a late answer after every attempt of the first family failed is tried at once', () => {
    const t = setup();
    t.race.answer(6, [v6('2001:db8::1')]);
    t.attempt('2001:db8::1').settle(refusedError());
    expect(t.results).toEqual([]); // A is still to come
    t.clock.advance(30);
    t.race.answer(4, [v4('192.0.2.1')]);
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@30']);
  });

  it('skips addresses the check refuses without waiting, and reports them', () => {
    const t = setup({ refuse: (candidate) => candidate.address === '2001:db8::bad' });
    t.race.answer(4, [v4('192.0.2.1')]);
    t.race.answer(6, [v6('2001:db8::bad'), v6('2001:db8::1')]);
    // The refused one costs no delay: IPv4 is next in the interleaving, then the second IPv6 address.
    expect(t.started()).toEqual(['192.0.2.1@0']);
    t.clock.advance(250);
    expect(t.started()).toEqual(['192.0.2.1@0', '2001:db8::1@250']);
    t.attempt('192.0.2.1').settle(refusedError());
    t.attempt('2001:db8::1').settle(refusedError());
    expect(t.results).toHaveLength(1);
    const result = t.results[0]!;
    expect(result.ok).toBe(false);
    if (result.ok) return;
    expect(result.refusals.map((entry) => entry.candidate.address)).toEqual(['2001:db8::bad']);
    expect(result.failures.map((entry) => entry.candidate.address)).toEqual(['192.0.2.1', '2001:db8::1']);
  });

  it('fails once every address failed, with every failure', () => {
    const t = setup();
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.attempt('2001:db8::1').settle(refusedError());
    t.attempt('192.0.2.1').settle(refusedError());
    expect(t.results).toHaveLength(1);
    expect(t.results[0]).toMatchObject({ ok: false, families: { 6: 'failed', 4: 'failed' } });
    expect(t.clock.pending).toBe(0);
  });

  it('fails when both answers are errors, with them', () => {
    const t = setup();
    t.race.answer(4, new Error('SERVFAIL'));
    t.race.answer(6, new Error('timeout'));
    expect(t.results[0]).toMatchObject({ ok: false, failures: [], refusals: [] });
    if (t.results[0]?.ok === false) expect(t.results[0].answerErrors.map((entry) => entry.family)).toEqual([4, 6]);
  });

  it('hands a loser that connected anyway to discard, and keeps only the winner', () => {
    const t = setup();
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(250);
    t.attempt('192.0.2.1').settle(undefined, '192.0.2.1');
    t.attempt('2001:db8::1').settle(undefined, '2001:db8::1'); // completed while being cancelled
    expect(t.discarded).toEqual(['2001:db8::1']);
    expect(t.results).toHaveLength(1);
  });

  it('a synchronous failure of attempt() moves on to the next address', () => {
    const clock = new FakeClock();
    const results: Array<RaceResult<string>> = [];
    const tried: string[] = [];
    const race = new HappyEyeballsRace<string>({
      clock,
      preferFamily: 6,
      attemptDelayMs: 250,
      budget: new AttemptBudget(8),
      check() {},
      attempt(candidate, settle) {
        tried.push(candidate.address);
        if (candidate.family === 6) throw new Error('EAFNOSUPPORT');
        settle(undefined, candidate.address);
        return () => {};
      },
      discard() {},
      onDone: (result) => results.push(result),
    });
    race.answer(6, [v6('2001:db8::1')]);
    race.answer(4, [v4('192.0.2.1')]);
    expect(tried).toEqual(['2001:db8::1', '192.0.2.1']);
    expect(results).toMatchObject([{ ok: true, value: '192.0.2.1' }]);
  });

  it('abort() cancels every attempt and reports nothing', () => {
    const t = setup();
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(250);
    t.race.abort();
    expect(t.attempts.every((attempt) => attempt.cancelled)).toBe(true);
    t.attempt('192.0.2.1').settle(undefined, '192.0.2.1');
    expect(t.discarded).toEqual(['192.0.2.1']);
    expect(t.results).toEqual([]);
    expect(t.clock.pending).toBe(0);
  });
});

describe('AttemptBudget shared by the races of one origin', () => {
  const many = (count: number, family: Family) =>
    Array.from({ length: count }, (_, index) =>
      family === 6 ? v6(`2001:db8::${index + 1}`) : v4(`192.0.2.${index + 1}`),
    );

  it('caps the attempts in flight beside the first: a host with many silent addresses', () => {
    const budget = new AttemptBudget(2);
    const t = setup({ budget });
    t.race.answer(6, many(10, 6));
    t.race.answer(4, many(10, 4));
    t.clock.advance(10_000);
    expect(t.race.inFlight).toBe(3); // the first, and two with a slot
    expect(budget.inUse).toBe(2);
    expect(budget.waiting).toBe(1);
    // One fails: its slot goes to the waiting race at once.
    t.attempt('192.0.2.1').settle(refusedError());
    expect(t.race.inFlight).toBe(3);
    expect(t.started().at(-1)).toBe('192.0.2.2@10000');
  });

  it('0 means no racing: the next address waits until the current one ends', () => {
    const budget = new AttemptBudget(0);
    const t = setup({ budget });
    t.race.answer(6, [v6('2001:db8::1')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(10_000);
    expect(t.started()).toEqual(['2001:db8::1@0']);
    t.attempt('2001:db8::1').settle(new Error('ETIMEDOUT'));
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@10000']);
    expect(budget.idle).toBe(true);
  });

  it('is shared: two races to one origin take slots from the same budget, first come first served', () => {
    const clock = new FakeClock();
    const budget = new AttemptBudget(1);
    const a = setup({ budget, clock });
    const b = setup({ budget, clock });
    a.race.answer(6, many(3, 6));
    a.race.answer(4, []);
    b.race.answer(6, many(3, 6));
    b.race.answer(4, []);
    clock.advance(250);
    expect(a.race.inFlight + b.race.inFlight).toBe(3); // two first attempts, one slot
    expect(budget.waiting).toBe(1);
    // The race holding the slot wins: its slot is released and the other race gets it.
    const holder = a.race.inFlight === 2 ? a : b;
    const waiter = holder === a ? b : a;
    holder.attempts[1]!.settle(undefined, holder.attempts[1]!.address);
    expect(waiter.race.inFlight).toBe(2);
    expect(budget.inUse).toBe(1);
    expect(budget.waiting).toBe(0);
  });

  it('a slotted attempt that wins starts no attempt of its own race waiting for that slot', () => {
    const budget = new AttemptBudget(1);
    const t = setup({ budget });
    t.race.answer(6, [v6('2001:db8::1'), v6('2001:db8::2')]);
    t.race.answer(4, [v4('192.0.2.1')]);
    t.clock.advance(500); // 2001:db8::1 (no slot) at 0, 192.0.2.1 (the one slot) at 250; at 500 2001:db8::2 waits
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@250']);
    expect(budget.waiting).toBe(1);
    // The win is decided before the slot goes back: no socket is made (nor cancelled) for 2001:db8::2.
    t.attempt('192.0.2.1').settle(undefined, '192.0.2.1');
    expect(t.results).toMatchObject([{ ok: true, value: '192.0.2.1' }]);
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@250']);
    expect(budget.idle).toBe(true);
  });

  it('a slotted attempt that fails while its race waits for a slot starts one attempt, not one more after it', () => {
    const budget = new AttemptBudget(2);
    expect(budget.tryTake()).toBe(true); // another connect of the origin holds one of the two slots
    const t = setup({ budget });
    t.race.answer(6, [v6('2001:db8::1'), v6('2001:db8::2'), v6('2001:db8::3')]);
    t.race.answer(4, [v4('192.0.2.1'), v4('192.0.2.2'), v4('192.0.2.3')]);
    t.clock.advance(500); // 192.0.2.1 took the last slot at 250; at 500 the next waits for one
    expect(budget.waiting).toBe(1);
    t.clock.advance(100);
    // Its slot goes to this race's wait: the failure's next attempt starts at once, and no second wait is queued.
    t.attempt('192.0.2.1').settle(refusedError());
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@250', '2001:db8::2@600']);
    expect(budget.waiting).toBe(0);
    t.clock.advance(10);
    budget.release(); // the other connect's slot: nothing failed since 600, so nothing starts before 850
    expect(t.started()).toEqual(['2001:db8::1@0', '192.0.2.1@250', '2001:db8::2@600']);
    t.clock.advance(240);
    expect(t.started().at(-1)).toBe('192.0.2.2@850');
  });

  it('gives every slot back when a race ends', () => {
    const budget = new AttemptBudget(4);
    const t = setup({ budget });
    t.race.answer(6, many(3, 6));
    t.race.answer(4, many(3, 4));
    t.clock.advance(1000);
    expect(budget.inUse).toBe(4);
    t.attempt('192.0.2.2').settle(undefined, '192.0.2.2');
    expect(budget.inUse).toBe(0);
    expect(budget.idle).toBe(true);
    expect(t.attempts.filter((attempt) => attempt.cancelled)).toHaveLength(4);
  });
});

describe('LearnedFamilies', () => {
  it('remembers the winner and what did worse, until it expires', () => {
    let now = 0;
    const learned = new LearnedFamilies({ ttlMs: 1000, now: () => now });
    expect(learned.preferred('dual.test')).toBeUndefined();
    learned.record('dual.test', { 6: 'outrun', 4: 'won' }, 6);
    expect(learned.preferred('dual.test')).toBe(4);
    now = 400;
    expect(learned.describe('dual.test')).toEqual({ family: 4, failed: [6], expiresInMs: 600 });
    now = 1000;
    expect(learned.preferred('dual.test')).toBeUndefined();
    expect(learned.size).toBe(0);
  });

  it('a race nobody won changes nothing; a later win replaces the entry', () => {
    let now = 0;
    const learned = new LearnedFamilies({ ttlMs: 1000, now: () => now });
    learned.record('dual.test', { 6: 'won', 4: 'untried' }, 6);
    learned.record('dual.test', { 6: 'failed', 4: 'failed' }, 6);
    expect(learned.describe('dual.test')).toEqual({ family: 6, failed: [], expiresInMs: 1000 });
    now = 10;
    learned.record('dual.test', { 6: 'failed', 4: 'won' }, 6);
    expect(learned.describe('dual.test')).toEqual({ family: 4, failed: [6], expiresInMs: 1000 });
  });

  it('learns nothing from a win of the other family while the default was never tried', () => {
    const learned = new LearnedFamilies({ now: () => 0 });
    // IPv4 won because AAAA answered after the resolution delay: IPv6 may work perfectly well.
    learned.record('late-aaaa.test', { 4: 'won', 6: 'untried' }, 6);
    expect(learned.preferred('late-aaaa.test')).toBeUndefined();
    // A learned IPv4 preference is not renewed by IPv4 winning without a race: it expires and IPv6 is tried again.
    learned.record('v6broken.test', { 4: 'won', 6: 'outrun' }, 6);
    const before = learned.describe('v6broken.test');
    learned.record('v6broken.test', { 4: 'won', 6: 'untried' }, 6);
    expect(learned.describe('v6broken.test')).toEqual(before);
  });

  it('keeps at most maxEntries hosts, forgetting the oldest', () => {
    const learned = new LearnedFamilies({ maxEntries: 2, now: () => 0 });
    learned.record('a.test', { 6: 'won', 4: 'untried' }, 6);
    learned.record('b.test', { 6: 'won', 4: 'untried' }, 6);
    learned.record('c.test', { 4: 'won', 6: 'failed' }, 6);
    expect(learned.size).toBe(2);
    expect(learned.preferred('a.test')).toBeUndefined();
    expect(learned.preferred('c.test')).toBe(4);
  });

  it("keeps what one uid's races taught while another uid's reach thousands of hosts: the uid holding most gives way", () => {
    const learned = new LearnedFamilies({ maxEntries: 100, now: () => 0 });
    const v4 = { 4: 'won', 6: 'failed' } as const;
    const v6 = { 6: 'won', 4: 'untried' } as const;
    for (let index = 0; index < 10; index++) learned.record(`kept-${index}.test 443`, v4, 6, 1);
    // uid 2's junk host:ports fill the table: they push out uid 2's own oldest, never uid 1's ten.
    for (let index = 0; index < 1_000; index++) learned.record(`junk-${index}.test 443`, v6, 6, 2);
    expect(learned.size).toBe(100);
    for (let index = 0; index < 10; index++)
      expect(learned.preferred(`kept-${index}.test 443`), `kept-${index}`).toBe(4);
    expect(learned.preferred('junk-910.test 443')).toBe(6);
    expect(learned.preferred('junk-909.test 443')).toBeUndefined();
    // uid 1 learns more: the entries given way are uid 2's (it holds the most), until both hold as many.
    for (let index = 10; index < 60; index++) learned.record(`kept-${index}.test 443`, v4, 6, 1);
    expect(learned.size).toBe(100);
    expect(learned.preferred('kept-0.test 443')).toBeUndefined(); // 50 each: then uid 1's own oldest went
    for (let index = 10; index < 60; index++)
      expect(learned.preferred(`kept-${index}.test 443`), `kept-${index}`).toBe(4);
    expect(learned.preferred('junk-950.test 443')).toBe(6);
    expect(learned.preferred('junk-949.test 443')).toBeUndefined();
    // An entry another uid's race teaches again stays the uid's that taught it first (renewed: its most recent).
    learned.record('junk-950.test 443', v4, 6, 1);
    for (let index = 0; index < 2; index++) learned.record(`more-${index}.test 443`, v6, 6, 2);
    expect(learned.preferred('junk-950.test 443')).toBe(4);
    expect(learned.preferred('junk-951.test 443')).toBeUndefined();
    expect(learned.preferred('junk-952.test 443')).toBeUndefined();
    expect(learned.preferred('junk-953.test 443')).toBe(6);
  });

  it("another uid's race to a host:port a uid taught does not take the entry over: it cannot push it out", () => {
    const learned = new LearnedFamilies({ maxEntries: 100, now: () => 0 });
    const v4 = { 4: 'won', 6: 'failed' } as const;
    const v6 = { 6: 'won', 4: 'untried' } as const;
    for (let index = 0; index < 10; index++) learned.record(`kept-${index}.test 443`, v4, 6, 1);
    // uid 2 knows uid 1's host:ports and races to them too, then reaches thousands of others: had its races made
    // uid 1's entries its own, they would be its oldest, the first to give way.
    for (let index = 0; index < 10; index++) learned.record(`kept-${index}.test 443`, v4, 6, 2);
    for (let index = 0; index < 1_000; index++) learned.record(`junk-${index}.test 443`, v6, 6, 2);
    expect(learned.size).toBe(100);
    for (let index = 0; index < 10; index++)
      expect(learned.preferred(`kept-${index}.test 443`), `kept-${index}`).toBe(4);
  });
});
