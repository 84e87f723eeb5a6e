// Each uid's recent use of the relay threads' handshake CPU, and the bound on it (issue 10: a bound per uid on every
// resource a client can consume). The relay threads attribute their handshake work to each handshake
// (tls-relay-thread.ts, charge) and report it; TlsRelays charges it here to the handshake's uid, and its admission
// queue asks here whether a uid may start one more handshake (tls-relay.ts, #mayStart).
//
// Why a bound: an origin chooses what checking its certificate chain costs the relay thread (OpenSSL checks up to
// 100 KB of it and Node offers no bound: ~330 ms a handshake for 60 certificates of costly keys), and a uid can ask
// for such handshakes for ever (each acquire is a new one). The places bound how many run at once, not what they
// cost, and the turn gate (tls-relay-thread.ts, handshakeProgress) spreads flights that come together over turns but
// cannot split one: a uid asking all the time kept the thread checking its chains back to back, and every other
// session of the thread (any uid's) waited a check or two at each round trip for as long as it went on.
//
// The measure: a uid's handshake CPU decayed with a half-life of CPU_HALF_LIFE_MS (so what it spent in the last few
// seconds), against a share of the relay threads' time. Time here is the relay threads' available time, not wall time
// (TlsRelays passes every `now` from relay-clock.ts): on a loaded host a nice-10 relay thread waits for a CPU, and
// costs decayed over that wait let a costly uid start many handshakes at once; on a quiet machine the two are one.
// The bound: a uid spending CPU_SHARE of every relay thread's time, for good, settles at `limit` (the rate times the decay's mean lifetime, half-life / ln 2). A uid's handshakes cost
// about the same each (one origin, one chain), so each uid's peak cost of one handshake (decayed too) says what the
// next ones will cost: a uid may start one more while its cost plus a peak for each of its handshakes under way stays
// under the limit. An honest crawler's handshakes cost 1–2 ms of relay CPU each (up to 5 on a loaded machine, as the
// thread measures them): hundreds may be under way before the
// rule holds one back (its 16 overlapping round trips stay), a burst of ~360 of them fits the limit, and it may go on
// at ~125 a second per relay thread (a quarter of the thread at 2 ms each) before it is paced. A
// uid whose handshakes cost ~330 ms each starts at most two at once, none once its cost is over the limit, and so
// gets about CPU_SHARE of a thread for as long as it asks; the others' handshakes (held to nothing here) go on.
// What it cannot bound: the first burst (what a uid's handshakes cost is known only once the thread checked one;
// those already started finish), and one check (~330 ms) once started.
//
// Why a quarter: it bounds the waits of the other sessions of the thread to about a quarter of their round trips
// (each then waits one check), and it lies well above an honest uid's use (a crawl's prewarm burst of ~200
// handshakes used ~0.4 s of relay CPU, docs/benchmarks.md); a uid held back waits in the relay's queue (fairly with
// its own), never fails for it but through its acquire's own timeout. Why a half-life of 2 s: long enough that a
// burst is remembered past the turns it took (the check of 16 chains takes the thread ~5 s), short enough that a
// uid whose one burst was costly is served again within seconds.
//
// The daemon's own handshakes (refills and prewarms: DAEMON_UID) are one party for that share, as a uid is: clients
// ask for them (a uid's prewarms, the refills of pools its acquires made), so the daemon's refills of costly origins,
// however many, must not take much more than a share between them. But within it they are charged per origin too:
// charged to one party only, the refills of one costly origin held every origin's refills back once the daemon was
// over its share. So a daemon handshake of an origin may start while the daemon is under its share, as before, or,
// past it, while both
// - its origin's own cost (with its peak for each of its handshakes under way, and what its latest one cost for this
//   one) is under an equal part of the share among the origins the daemon recently handshook with, and
// - the daemon's cost, with what its handshakes under way are expected to cost (each what its origin's latest one
//   cost) and this one, stays under DAEMON_OVERDRAW shares:
// an origin whose handshakes cost ~330 ms is held back (paced at the daemon's share), one whose handshakes cost a
// millisecond or two goes on. An origin one of whose checks costs more than its equal part never starts past the
// share: its cost decays in half-lives, so a part smaller than one check would let it check again ever sooner as the
// parts shrink (20 such origins, admitted under their parts, took more than a thread together in test/relay-cpu's
// simulation); the overdraw's bound holds the others together. Each origin's record is forgotten once decayed to
// nothing, as a uid's is, and counts for the equal part until then: the records are as many as the origins
// handshaken with in the last minute or so, a bound the relay threads' rate sets; while the daemon is over its share
// they are swept at least once a half-life, so that origins long done do not shrink the others' parts. Not bounded:
// the daemon's first burst to a costly origin (as a uid's), which may take it past the overdraw, and then every
// origin's refills wait until its cost decays under it (seconds).

/** The half-life of a uid's recorded relay CPU (and of its peak handshake cost), ms. */
export const CPU_HALF_LIFE_MS = 2_000;

/** The share of each relay thread's time one uid's handshakes may take over the last few seconds. */
export const CPU_SHARE = 0.25;

/**
 * How many shares the daemon's handshakes may take past its own share, through origins each under its equal part of
 * it (see the header): two, so that the refills of one costly origin (its cost swings around the share, up to a check
 * over it) never hold another origin's back, while many costly origins together stay at about a half of each thread.
 */
export const DAEMON_OVERDRAW = 2;

/** A party whose cost and peak decayed under this (µs) is forgotten: a bound on the map. */
const FORGOTTEN_MICROS = 1;

/** A daemon handshake's origin (its `host:port`), and how many of the daemon's handshakes of it are under way. */
export interface DaemonOrigin {
  key: string;
  started: number;
}

interface UidCpu {
  /** Its handshakes' relay CPU, µs, decayed to `at`. */
  cost: number;
  /** The most one of its handshakes cost, µs, decayed to `at` as `cost` is. */
  peak: number;
  /** When `cost` and `peak` were last decayed (the caller's clock, ms: TlsRelays', the threads' available time). */
  at: number;
  /** What its latest handshake cost so far, µs, not decayed: what its next one is expected to cost. */
  last: number;
}

export class RelayCpuShares {
  /** Each uid's record (a number), and each origin's of the daemon's own handshakes (a string: its key). */
  #byUid = new Map<number | string, UidCpu>();
  /** How many of the records are origins' (the equal part of the daemon's share is the share over these). */
  #origins = 0;
  /** What the daemon's handshakes under way are expected to cost (each its origin's peak when it started), µs. */
  #daemonInFlight = 0;
  /** When the records were last swept (the caller's clock, ms). */
  #sweptAt = 0;
  /** The bound on a uid's decayed cost, µs (see the header). */
  #limit: number;
  /** The map's size that makes the next charge sweep it. */
  #sweepAt = 64;

  constructor(threadCount: number) {
    this.#limit = (CPU_SHARE * threadCount * CPU_HALF_LIFE_MS * 1_000) / Math.LN2;
  }

  /** The bound on a uid's decayed cost, µs. */
  get limitMicros(): number {
    return this.#limit;
  }

  /** `uid`'s (or a daemon origin's) record decayed to `now`; undefined when it has none. */
  #at(uid: number | string, now: number): UidCpu | undefined {
    const entry = this.#byUid.get(uid);
    if (!entry || entry.at === now) return entry;
    const factor = 2 ** (-(now - entry.at) / CPU_HALF_LIFE_MS);
    entry.cost *= factor;
    entry.peak *= factor;
    entry.at = now;
    return entry;
  }

  /**
   * `micros` more of a handshake of `uid`, which has cost `handshakeMicros` so far (these included): its uid's cost
   * grows, and its peak if this handshake cost more; a handshake of the daemon's own, its `origin`'s too (see the
   * header).
   */
  charge(uid: number, micros: number, handshakeMicros: number, now = performance.now(), origin?: string): void {
    if (micros <= 0 && handshakeMicros <= 0) return;
    this.#charge(uid, micros, handshakeMicros, now);
    if (origin !== undefined) this.#charge(origin, micros, handshakeMicros, now);
  }

  #charge(party: number | string, micros: number, handshakeMicros: number, now: number): void {
    let entry = this.#at(party, now);
    if (!entry) {
      if (this.#byUid.size >= this.#sweepAt) this.#sweep(now);
      entry = { cost: 0, peak: 0, at: now, last: 0 };
      this.#byUid.set(party, entry);
      if (typeof party === 'string') this.#origins++;
    }
    entry.cost += Math.max(0, micros);
    entry.peak = Math.max(entry.peak, handshakeMicros);
    entry.last = handshakeMicros;
  }

  /**
   * Whether `uid`, with `started` handshakes under way, may start one more; a handshake of the daemon's own, of
   * `origin` (see the header).
   */
  mayStart(uid: number, started: number, now = performance.now(), origin?: DaemonOrigin): boolean {
    return this.waitMs(uid, started, now, origin) === 0;
  }

  /**
   * How long until `uid`, with `started` under way and none of them ending, may start one more (ms; 0: now); a
   * handshake of the daemon's own, of `origin`: until the daemon or that origin may.
   */
  waitMs(uid: number, started: number, now = performance.now(), origin?: DaemonOrigin): number {
    const wait = waitUnder(this.#load(uid, started, now), this.#limit);
    if (wait === 0 || origin === undefined) return wait;
    // Past the daemon's share: this origin's equal part of it, and the overdraw's bound (what is under way does not
    // decay: past it, only an end, which dispatches again, lets one more start).
    const expected = this.#expected(origin.key, now);
    const room = DAEMON_OVERDRAW * this.#limit - this.#daemonInFlight - expected;
    const part = this.#originPart(now) - expected;
    if (room <= 0 || part <= 0) return wait;
    const partWait = waitUnder(this.#load(origin.key, origin.started, now), part);
    return Math.min(wait, Math.max(partWait, waitUnder(this.#load(uid, 0, now), room)));
  }

  /**
   * A daemon handshake of `origin` starts: what it is expected to cost (what its origin's latest one cost), counted
   * as under way until given back to `daemonEnded`.
   */
  daemonStarted(origin: string, now = performance.now()): number {
    const expected = this.#expected(origin, now);
    this.#daemonInFlight += expected;
    return expected;
  }

  /**
   * What a handshake of the daemon's with `origin` is expected to cost: what its latest one cost (µs; 0 when it has
   * none). Not its decayed peak: after a long wait that would say a costly origin's next check costs little, and
   * many such origins could start together past the overdraw.
   */
  #expected(origin: string, now: number): number {
    return this.#at(origin, now)?.last ?? 0;
  }

  /** A daemon handshake is over: `expected`, what daemonStarted said it would cost. */
  daemonEnded(expected: number): void {
    this.#daemonInFlight = Math.max(0, this.#daemonInFlight - expected);
  }

  /** A party's cost with `started` more under way, each expected to cost its peak (µs). */
  #load(party: number | string, started: number, now: number): number {
    const entry = this.#at(party, now);
    return entry ? entry.cost + started * entry.peak : 0;
  }

  /** The equal part of the daemon's share of each origin it recently handshook with (see the header). */
  #originPart(now: number): number {
    if (now - this.#sweptAt >= CPU_HALF_LIFE_MS) this.#sweep(now);
    return this.#limit / Math.max(1, this.#origins);
  }

  /** The uids and daemon origins recorded (tests: the sweep). */
  get recordCount(): number {
    return this.#byUid.size;
  }

  /** `uid`'s cost now, µs (tests). */
  costOf(uid: number, now = performance.now()): number {
    return this.#at(uid, now)?.cost ?? 0;
  }

  #sweep(now: number): void {
    this.#sweptAt = now;
    for (const party of [...this.#byUid.keys()]) {
      const entry = this.#at(party, now)!;
      if (entry.cost < FORGOTTEN_MICROS && entry.peak < FORGOTTEN_MICROS) {
        this.#byUid.delete(party);
        if (typeof party === 'string') this.#origins--;
      }
    }
    this.#sweepAt = Math.max(64, 2 * this.#byUid.size);
  }
}

/** How long until `load` decays under `limit` (ms; 0: it is under). Cost and peak decay by one factor. */
function waitUnder(load: number, limit: number): number {
  return load < limit ? 0 : CPU_HALF_LIFE_MS * Math.log2(load / limit);
}
