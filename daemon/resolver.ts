// Resolver: host name → ordered list of addresses for the connector, with a TTL cache.
//
// - IP literals (any spelling a URL host may have) return themselves, canonical.
// - `resolve` entries (curl's --resolve, `HOST:PORT:ADDR[,ADDR...]`) win over DNS for that host and port.
// - `localhost` and the names under it are 127.0.0.1 and ::1, never asked of anyone (RFC 6761 §6.3): the egress
//   policy judges them as those literals.
// - Of each family an answer gives, the first MAX_ADDRESSES_PER_FAMILY distinct addresses are kept (what the cache
//   holds and a connect tries is bounded whatever a server sends).
// - With `servers`, A and AAAA are asked in parallel through a c-ares `dns.promises.Resolver` (no search domains,
//   no /etc/hosts), and the answer's TTL sets the cache lifetime, clamped to [minTtlMs, maxTtlMs]. While they are
//   in flight, `answersInFlight` gives each family's answer as soon as it is in (Happy Eyeballs starts on it).
// - Without `servers`, the system resolver answers: `dns.lookup` (getaddrinfo), so /etc/hosts, nsswitch,
//   search domains and a local stub such as systemd-resolved behave as for every other program on the machine.
//   getaddrinfo gives no TTL, so such answers are cached for minTtlMs. It also runs in the libuv threadpool and
//   cannot be cancelled: after timeoutMs we answer with a DNS error, but the thread stays busy until the system
//   resolver gives up; meanwhile the name's later resolutions wait for that same lookup (one per name at a time).
//   So that names whose servers never answer cannot take the whole pool (the daemon's fs work and every other uid's
//   lookups would queue behind them for glibc's whole retry time), system lookups in flight are held to what libuv
//   runs of them at once: getaddrinfo is its "slow I/O" work, of which at most (threads + 1) / 2 run (16 of 32; more
//   wait in libuv's own queue, first come first served, behind the hung ones), the other threads staying for fs
//   work. A uid holding h of those places starts another only while more than h are free (one
//   uid alone: half; k uids together: each, and what stays free, about a (k+1)th): a uid holding fewer always finds
//   a place. Those that must wait queue fairly across uids (FairWaitQueue: the uid holding fewest first), and one
//   still waiting at its resolution's deadline is dropped, never started. The threads are the process's, not a
//   resolver's: every Resolver counts its lookups in one SystemLookupPlaces (the process's, unless a test models a
//   pool), so a resolver a reload made counts the old one's hung lookups too. Configure `servers` for TTLs and real
//   timeouts.
//
// Order of the addresses returned: both families, interleaved, IPv6 first (RFC 8305; on a machine without an
// IPv6 route `reportFailure` pushes the IPv6 addresses back after the first ENETUNREACH). Within each family the
// start rotates on every call (round robin over the origin's addresses). Addresses reported failed within
// `failurePenaltyMs` for that host and port go last, least recently failed first; `reportSuccess` clears the mark.
// The marks of at most MAX_CACHE_ENTRIES host:ports are kept, shared fairly across the uids whose connects failed
// (uid-share-map.ts): one uid failing at thousands of host:ports does not push out the others' marks.
//
// The cache holds at most MAX_CACHE_ENTRIES names (answers and negative answers alike), shared the same way across
// the uids whose connects looked them up (`resolve`'s uid): one uid looking up thousands of names (a crawler, or junk
// on purpose) pushes out its own oldest, not the names of a uid that holds fewer, which would each cost that uid a
// lookup again (with the system resolver, a libuv thread for as long as it takes).
//
// Errors: SockpoolError(DNS) with fields { host, reason, dnsCode }. NXDOMAIN and "no address" answers are cached
// for negativeTtlMs; server failures (SERVFAIL, REFUSED) for SERVER_FAILURE_TTL_MS, at most negativeTtlMs (RFC 9520);
// timeouts are not cached (the next call asks again). Concurrent calls for
// one host share one query. Time is monotonic (performance.now()).
//
// The resolver applies no policy: the connector calls EgressPolicy.checkAddress on every address it returns
// (and on the connected peer), since a public name may resolve to a refused address.

import { promises as dns } from 'node:dns';
import process from 'node:process';
import { type DnsServer, parseHost, parseIpLiteral, type ResolveEntry } from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { DAEMON_UID, FairWaitQueue, type UidWaiter } from './fair-queue.js';
import { UidShareMap } from './uid-share-map.js';

export interface ResolvedAddress {
  address: string;
  family: 4 | 6;
}

/** The configuration's `dns` section (daemon/config.ts validates it and holds the defaults). */
export interface ResolverOptions {
  /** DNS servers. Empty: the system resolver (getaddrinfo). */
  readonly servers: readonly DnsServer[];
  /** curl-style `--resolve` entries. */
  readonly resolve: readonly ResolveEntry[];
  /** Shortest cache lifetime of an answer, and the lifetime of system-resolver answers. */
  readonly minTtlMs: number;
  /** Longest cache lifetime of an answer (at least minTtlMs). */
  readonly maxTtlMs: number;
  /** Cache lifetime of NXDOMAIN / no-address answers. */
  readonly negativeTtlMs: number;
  /** Deadline of one resolution (both families), at least 1. */
  readonly timeoutMs: number;
  /** How long an address reported failed stays at the end of the list. Default 30000. */
  readonly failurePenaltyMs?: number;
}

const DEFAULT_FAILURE_PENALTY_MS = 30_000;
/** How long a server's failure for a name is remembered (RFC 9520 §3.2: at least 1 s); at most dns.negativeTtlMs. */
const SERVER_FAILURE_TTL_MS = 1_000;
/**
 * Most addresses of one family kept from an answer (the first ones it gave, duplicates dropped): DNS over TCP
 * carries up to 64 KiB, about 4,000 A records, and a hostile server's name would otherwise cost that much in each of
 * the cache's 10,000 entries, and a connect one attempt per address.
 */
export const MAX_ADDRESSES_PER_FAMILY = 32;
/** Most host names cached (positive and negative), and host:ports with failure marks (uid-share-map.ts for which go). */
const MAX_CACHE_ENTRIES = 10_000;

/** The addresses of one host (or override), split by family, with the round-robin turn counter. */
interface AddressSet {
  v4: string[];
  v6: string[];
  turn: number;
}

interface PositiveEntry extends AddressSet {
  kind: 'positive';
  expiresAt: number;
}

interface NegativeEntry {
  kind: 'negative';
  expiresAt: number;
  message: string;
  reason: string;
  dnsCode: string | undefined;
}

type CacheEntry = PositiveEntry | NegativeEntry;

/** Result of asking DNS once: addresses with the TTL (ms) to keep them, or a failure. */
type Answer =
  | { kind: 'addresses'; v4: string[]; v6: string[]; ttlMs: number }
  | { kind: 'negative' | 'transient'; reason: string; dnsCode: string | undefined; cause: unknown };

const NEGATIVE_CODES = new Set(['ENOTFOUND', 'ENODATA']);

/** The system resolver's lookup of every address of a name (dns.lookup; tests pass their own). */
export type SystemLookup = (name: string) => Promise<Array<{ address: string; family: number }>>;

const systemLookup: SystemLookup = (name) => dns.lookup(name, { all: true, order: 'verbatim' });

/** The size of this process's libuv threadpool, read as libuv reads UV_THREADPOOL_SIZE (4 unless set; 1 to 1024). */
export function threadpoolSize(env: NodeJS.ProcessEnv = process.env): number {
  const size = Number.parseInt(env.UV_THREADPOOL_SIZE ?? '', 10);
  if (!Number.isFinite(size)) return 4;
  return Math.min(1024, Math.max(1, size));
}

/** A system lookup waiting for its turn (#askSystem). */
interface QueuedLookup extends UidWaiter {
  start(): void;
}

/**
 * The places of system lookups in the libuv threadpool getaddrinfo runs on: as many as libuv runs at once (its
 * slow_work_thread_threshold(), half the pool rounded up; the rest of the pool is kept for fs, zlib, crypto, and one
 * more would wait in libuv's queue), and a uid holding h of them starts another only while more than h are free.
 * One per process (`ofProcess()`): a lookup holds its thread until getaddrinfo returns, also after the resolver that
 * started it was replaced by a reload.
 */
export class SystemLookupPlaces {
  static #process: SystemLookupPlaces | undefined;

  /** This process's places (its pool's size read once, as libuv reads it once). */
  static ofProcess(): SystemLookupPlaces {
    SystemLookupPlaces.#process ??= new SystemLookupPlaces(threadpoolSize());
    return SystemLookupPlaces.#process;
  }

  /** Most system lookups in flight. */
  readonly #slots: number;
  /** System lookups started and not ended (also those past their deadline). */
  #running = 0;
  /** System lookups waiting for a place; its `held` counts are each uid's lookups running. */
  readonly #queue = new FairWaitQueue<QueuedLookup>();
  /**
   * System lookups running or waiting for a place, by name, whichever resolver started them: a name has one at a
   * time in the process, which later resolutions join, and a uid's lookup charge (lookupInFlight) lasts until it
   * ends, whichever resolver the daemon has by then.
   */
  readonly #byName = new Map<string, ReturnType<SystemLookup>>();

  /** `threads`: the size of the pool (tests model one). */
  constructor(threads: number) {
    this.#slots = Math.max(1, Math.floor((threads + 1) / 2));
  }

  /** Starts `waiter` now if its uid may have another place, else queues it (it starts when one frees). */
  take(waiter: QueuedLookup): 'started' | 'queued' {
    if (this.#mayStart(waiter.uid)) {
      this.#start(waiter);
      return 'started';
    }
    this.#queue.push(waiter);
    return 'queued';
  }

  /** The system lookup of `name` running (or waiting for a place) now, if any. */
  lookupOf(name: string): ReturnType<SystemLookup> | undefined {
    return this.#byName.get(name);
  }

  /** `lookup` is `name`'s until it settles or is forgotten. */
  track(name: string, lookup: ReturnType<SystemLookup>): void {
    this.#byName.set(name, lookup);
    const ended = () => this.forget(name, lookup);
    lookup.then(ended, ended);
  }

  /** `name`'s lookup is no longer `lookup` (dropped before it started). */
  forget(name: string, lookup: ReturnType<SystemLookup>): void {
    if (this.#byName.get(name) === lookup) this.#byName.delete(name);
  }

  /** Takes a waiter out of the queue; false if it is not there (it started). */
  withdraw(waiter: QueuedLookup): boolean {
    return this.#queue.remove(waiter);
  }

  /** One of `uid`'s lookups ended: those waiting start while the rule lets them, the uid holding fewest first. */
  ended(uid: number): void {
    this.#running--;
    this.#queue.held(uid, -1);
    for (let next = this.#queue.peek(); next && this.#mayStart(next.uid); next = this.#queue.peek()) {
      this.#queue.remove(next);
      this.#start(next);
    }
  }

  /** Whether `uid` may start a system lookup now: while more places are free than it holds. */
  #mayStart(uid: number): boolean {
    return this.#running + (this.#queue.heldOf(uid) ?? 0) < this.#slots;
  }

  #start(waiter: QueuedLookup): void {
    this.#running++;
    this.#queue.held(waiter.uid, +1);
    this.#queue.served(waiter.uid);
    waiter.start();
  }
}

function errorCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function rotate<T>(list: readonly T[], turn: number): T[] {
  if (list.length < 2) return [...list];
  const start = turn % list.length;
  return [...list.slice(start), ...list.slice(0, start)];
}

export class Resolver {
  readonly #dns: dns.Resolver | undefined;
  readonly #overrides = new Map<string, AddressSet>();
  /** What `localhost` and the names under it resolve to, without asking anyone (isLoopbackName). */
  readonly #loopback: AddressSet = { v4: ['127.0.0.1'], v6: ['::1'], turn: 0 };
  /** Name → answer, each the uid's whose resolve() brought it in. */
  readonly #cache = new UidShareMap<CacheEntry>(MAX_CACHE_ENTRIES);
  readonly #inFlight = new Map<string, Promise<CacheEntry>>();
  /** Queries to DNS servers in flight: each family's own answer (answersInFlight). */
  readonly #pendingFamilies = new Map<string, Record<4 | 6, Promise<string[]>>>();
  /** host and port → address → time (monotonic ms) of the last reported failure; the uid that reported it last. */
  readonly #failures = new UidShareMap<Map<string, number>>(MAX_CACHE_ENTRIES);
  readonly #minTtlMs: number;
  readonly #maxTtlMs: number;
  readonly #negativeTtlMs: number;
  readonly #timeoutMs: number;
  readonly #failurePenaltyMs: number;
  readonly #systemLookup: SystemLookup;
  /**
   * Where system lookups take their thread: the process's, shared with every other resolver. It also keeps the
   * lookups still running by name, also past our deadline: getaddrinfo cannot be cancelled and holds a libuv thread
   * (or a place in its queue) until the system resolver gives up. A name has one at a time, which later resolutions
   * join, a resolver's a reload made too: while the system resolver hangs, each connect must not start another.
   */
  readonly #systemPlaces: SystemLookupPlaces;

  /** `places`: the libuv threadpool getaddrinfo runs on (the process's; tests model one). */
  constructor(
    options: ResolverOptions,
    lookup: SystemLookup = systemLookup,
    places: SystemLookupPlaces = SystemLookupPlaces.ofProcess(),
  ) {
    this.#systemLookup = lookup;
    this.#systemPlaces = places;
    this.#minTtlMs = options.minTtlMs;
    this.#maxTtlMs = options.maxTtlMs;
    this.#negativeTtlMs = options.negativeTtlMs;
    this.#timeoutMs = options.timeoutMs;
    this.#failurePenaltyMs = options.failurePenaltyMs ?? DEFAULT_FAILURE_PENALTY_MS;

    for (const entry of options.resolve) {
      const key = `${entry.host}:${entry.port}`;
      let set = this.#overrides.get(key);
      if (!set) {
        set = { v4: [], v6: [], turn: 0 };
        this.#overrides.set(key, set);
      }
      for (const address of entry.addresses) {
        const list = address.family === 4 ? set.v4 : set.v6;
        if (!list.includes(address.text)) list.push(address.text);
      }
    }

    if (options.servers.length > 0) {
      // c-ares: per-try timeout with one retry; our own deadline (timeoutMs) bounds the whole resolution.
      const perTryMs = Math.max(1, Math.floor(this.#timeoutMs / 2));
      this.#dns = new dns.Resolver({ timeout: perTryMs, tries: 2, maxTimeout: this.#timeoutMs });
      this.#dns.setServers(options.servers.map((server) => server.text));
    }
  }

  /**
   * The addresses to try for host:port, best first, for a connect of `uid` (whose share of the cache a name it
   * brings in counts against). Throws SockpoolError(DNS) when the name does not resolve, has no address, or
   * resolution timed out.
   */
  async resolve(host: string, port: number, uid = DAEMON_UID): Promise<ResolvedAddress[]> {
    const name = this.#nameOf(host);
    if (typeof name !== 'string') return [name];
    const override = this.#overrides.get(`${name}:${port}`);
    if (override) return this.#order(name, port, override);
    if (isLoopbackName(name)) return this.#order(name, port, this.#loopback);
    let entry = this.#cache.get(name);
    if (!entry || entry.expiresAt <= performance.now()) entry = await this.#refresh(name, uid);
    if (entry.kind === 'negative') {
      throw new SockpoolError(ErrorCodes.DNS, entry.message, {
        host: name,
        reason: entry.reason,
        dnsCode: entry.dnsCode,
      });
    }
    return this.#order(name, port, entry);
  }

  /**
   * While a query to the DNS servers for `host` is in flight (call it right after resolve(host, port)): each
   * family's addresses as soon as its own answer is in, so that a connect can start before the other family has
   * answered (RFC 8305 §3). A family whose query failed rejects. In the order DNS gave them (resolve() adds the
   * rotation and puts failed addresses last). Undefined when resolve(host, port) does not take DNS's answer:
   * literals, a `dns.resolve` entry for host:port (even while a query for another port of the host, or a refresh,
   * is in flight), cached answers and the system resolver, for which resolve() has both families at once.
   */
  answersInFlight(host: string, port: number): Record<4 | 6, Promise<ResolvedAddress[]>> | undefined {
    const name = canonicalName(host);
    if (this.#overrides.has(`${name}:${port}`)) return undefined;
    const pending = this.#pendingFamilies.get(name);
    if (!pending) return undefined;
    const addresses = (family: 4 | 6) =>
      pending[family].then((list) =>
        list.map((address): ResolvedAddress => ({ address: canonicalAddress(address), family })),
      );
    return { 4: addresses(4), 6: addresses(6) };
  }

  /**
   * The query for `host` in flight now (settles when it ends), or undefined when none is: a system lookup counts
   * until it really ends, also after its resolution gave up at the deadline, and also when another resolver (the
   * one before a reload) started it.
   */
  lookupInFlight(host: string): Promise<unknown> | undefined {
    const name = canonicalName(host);
    return this.#inFlight.get(name) ?? this.#systemPlaces.lookupOf(name);
  }

  /** The canonical name of `host`, or the address itself when it is an IP literal. Throws DNS 'invalid-host'. */
  #nameOf(host: string): string | ResolvedAddress {
    try {
      const parsed = parseHost(host);
      return parsed.kind === 'ip' ? { address: parsed.ip.text, family: parsed.ip.family } : parsed.name;
    } catch (error) {
      throw new SockpoolError(
        ErrorCodes.DNS,
        `not a host name: ${JSON.stringify(host)}`,
        { host, reason: 'invalid-host' },
        { cause: error },
      );
    }
  }

  /**
   * A connect to `address` for `host`:`port` failed: put it last for failurePenaltyMs, for that port only (a client's
   * connects to a port the host serves over one family only must not reorder every other port's addresses). The
   * marks of host:port are the uid's whose failed connect made them (another uid's failure there adds to them).
   */
  reportFailure(host: string, port: number, address: string, uid = DAEMON_UID): void {
    const key = marksKey(host, port);
    const normalised = canonicalAddress(address);
    const marks = this.#failures.get(key) ?? new Map<string, number>();
    marks.delete(normalised); // re-insert: the map keeps marks in failure order
    marks.set(normalised, performance.now());
    this.#failures.set(key, marks, uid);
  }

  /** A connect to `address` for `host`:`port` succeeded: forget its failure mark. */
  reportSuccess(host: string, port: number, address: string): void {
    const key = marksKey(host, port);
    const marks = this.#failures.get(key);
    if (!marks) return;
    marks.delete(canonicalAddress(address));
    if (marks.size === 0) this.#failures.delete(key);
  }

  /** One query per host at a time: concurrent callers share it (its answer is cached for the uid that asked first). */
  #refresh(name: string, uid: number): Promise<CacheEntry> {
    let pending = this.#inFlight.get(name);
    if (!pending) {
      pending = this.#ask(name, uid)
        .then((answer) => this.#store(name, answer, uid))
        .finally(() => this.#inFlight.delete(name));
      this.#inFlight.set(name, pending);
    }
    return pending;
  }

  #store(name: string, answer: Answer, uid: number): CacheEntry {
    const now = performance.now();
    if (answer.kind === 'addresses') {
      const ttlMs = Math.min(this.#maxTtlMs, Math.max(this.#minTtlMs, answer.ttlMs));
      const previous = this.#cache.get(name);
      const entry: PositiveEntry = {
        kind: 'positive',
        v4: answer.v4,
        v6: answer.v6,
        expiresAt: now + ttlMs,
        turn: previous?.kind === 'positive' ? previous.turn : 0,
      };
      this.#cache.set(name, entry, uid);
      return entry;
    }
    const message =
      answer.reason === 'timeout'
        ? `DNS resolution of ${name} timed out`
        : `DNS resolution of ${name} failed: ${answer.reason}${answer.dnsCode ? ` (${answer.dnsCode})` : ''}`;
    // A server's failure (SERVFAIL, REFUSED: an answer that came at once) is remembered briefly, as RFC 9520 asks
    // of resolvers: else every acquire for the name asks again, and a client looping on it makes as many queries. A
    // timeout is not: it took timeoutMs, and the next resolution of the name waits for the one in flight.
    const failed = answer.kind === 'transient' && answer.reason !== 'timeout';
    if (answer.kind === 'negative' || (failed && this.#negativeTtlMs > 0)) {
      const entry: NegativeEntry = {
        kind: 'negative',
        expiresAt: now + (failed ? Math.min(SERVER_FAILURE_TTL_MS, this.#negativeTtlMs) : this.#negativeTtlMs),
        message,
        reason: answer.reason,
        dnsCode: answer.dnsCode,
      };
      this.#cache.set(name, entry, uid);
      return entry;
    }
    throw new SockpoolError(
      ErrorCodes.DNS,
      message,
      { host: name, reason: answer.reason, dnsCode: answer.dnsCode },
      { cause: answer.cause },
    );
  }

  /** Runs `query` with the resolution deadline; a late answer is dropped. */
  #withDeadline<T>(query: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        reject(Object.assign(new Error('DNS query timed out'), { code: 'ETIMEOUT' }));
      }, this.#timeoutMs);
    });
    return Promise.race([query, deadline]).finally(() => clearTimeout(timer));
  }

  async #ask(name: string, uid: number): Promise<Answer> {
    return this.#dns ? this.#askServers(this.#dns, name) : this.#askSystem(name, uid);
  }

  async #askServers(resolver: dns.Resolver, name: string): Promise<Answer> {
    const v4Query = this.#withDeadline(resolver.resolve4(name, { ttl: true }));
    const v6Query = this.#withDeadline(resolver.resolve6(name, { ttl: true }));
    const pending = {
      4: v4Query.then((records) => kept(records.map((record) => record.address))),
      6: v6Query.then((records) => kept(records.map((record) => record.address))),
    };
    // Nobody may ask for them: their failures reach callers through resolve().
    pending[4].catch(() => {});
    pending[6].catch(() => {});
    this.#pendingFamilies.set(name, pending);
    let v4: PromiseSettledResult<Awaited<typeof v4Query>>;
    let v6: PromiseSettledResult<Awaited<typeof v6Query>>;
    try {
      [v4, v6] = await Promise.allSettled([v4Query, v6Query]);
    } finally {
      this.#pendingFamilies.delete(name);
    }
    const records = [...(v4.status === 'fulfilled' ? v4.value : []), ...(v6.status === 'fulfilled' ? v6.value : [])];
    const failures = [v4, v6].filter((result) => result.status === 'rejected').map((result) => result.reason);
    if (records.length > 0) {
      let ttlMs = Math.min(...records.map((record) => record.ttl * 1000));
      // One family failed for a passing reason: keep what we have, but ask again soon.
      if (failures.some((error) => !NEGATIVE_CODES.has(errorCode(error) ?? ''))) ttlMs = this.#minTtlMs;
      return this.#addresses(
        v4.status === 'fulfilled' ? v4.value.map((record) => record.address) : [],
        v6.status === 'fulfilled' ? v6.value.map((record) => record.address) : [],
        ttlMs,
      );
    }
    return this.#failure(failures);
  }

  /** `uid`: whose lookup a new one is (its place among the system lookups in flight). */
  async #askSystem(name: string, uid: number): Promise<Answer> {
    let running = this.#systemPlaces.lookupOf(name);
    let queued: (QueuedLookup & { drop(error: unknown): void }) | undefined;
    if (!running) {
      let start = () => {};
      let drop: (error: unknown) => void = () => {};
      const turn = new Promise<void>((resolve, reject) => {
        start = resolve;
        drop = reject;
      });
      const lookup = turn.then(() => {
        let answer: ReturnType<SystemLookup>;
        try {
          answer = this.#systemLookup(name);
        } catch (error) {
          answer = Promise.reject(error); // (its place must still be given back)
        }
        const done = () => this.#systemPlaces.ended(uid);
        answer.then(done, done);
        return answer;
      });
      running = lookup;
      this.#systemPlaces.track(name, lookup);
      const waiter = { uid, start, drop };
      if (this.#systemPlaces.take(waiter) === 'queued') queued = waiter;
    }
    try {
      const found = await this.#withDeadline(running);
      const v4 = found.filter((item) => item.family === 4).map((item) => item.address);
      const v6 = found.filter((item) => item.family === 6).map((item) => item.address);
      if (v4.length + v6.length === 0) return this.#failure([]);
      return this.#addresses(v4, v6, this.#minTtlMs);
    } catch (error) {
      // Still waiting for a place at the deadline: nobody waits for it any more, so it never takes a thread (and
      // its uid's lookup charge, lookupInFlight, ends now).
      if (queued && this.#systemPlaces.withdraw(queued)) {
        this.#systemPlaces.forget(name, running);
        queued.drop(error);
      }
      return this.#failure([error]);
    }
  }

  #addresses(v4: string[], v6: string[], ttlMs: number): Answer {
    return { kind: 'addresses', v4: kept(v4), v6: kept(v6), ttlMs };
  }

  /** No address: negative (cached) when every failure says the name has none, transient otherwise. */
  #failure(errors: unknown[]): Answer {
    const codes = errors.map(errorCode);
    const cause = errors[0];
    if (codes.every((code) => code !== undefined && NEGATIVE_CODES.has(code))) {
      const nxdomain = codes.includes('ENOTFOUND');
      return {
        kind: 'negative',
        reason: nxdomain ? 'nxdomain' : 'no-addresses',
        dnsCode: nxdomain ? 'ENOTFOUND' : codes[0],
        cause,
      };
    }
    const timedOut = codes.includes('ETIMEOUT') || codes.includes('EAI_AGAIN');
    const dnsCode = codes.find((code) => code !== undefined && !NEGATIVE_CODES.has(code));
    return { kind: 'transient', reason: timedOut ? 'timeout' : 'server-failure', dnsCode, cause };
  }

  /** Interleaves the families (IPv6 first), rotates each family, and moves failed addresses last. */
  #order(name: string, port: number, set: AddressSet): ResolvedAddress[] {
    const turn = set.turn++;
    const v4 = rotate(set.v4, turn).map((address): ResolvedAddress => ({ address, family: 4 }));
    const v6 = rotate(set.v6, turn).map((address): ResolvedAddress => ({ address, family: 6 }));
    const interleaved: ResolvedAddress[] = [];
    for (let index = 0; index < Math.max(v6.length, v4.length); index++) {
      if (v6[index]) interleaved.push(v6[index]!);
      if (v4[index]) interleaved.push(v4[index]!);
    }
    const key = marksKey(name, port);
    const marks = this.#failures.get(key);
    if (!marks) return interleaved;
    const now = performance.now();
    for (const [address, failedAt] of marks) {
      if (now - failedAt >= this.#failurePenaltyMs) marks.delete(address);
    }
    if (marks.size === 0) {
      this.#failures.delete(key);
      return interleaved;
    }
    const good = interleaved.filter((item) => !marks.has(item.address));
    const bad = interleaved
      .filter((item) => marks.has(item.address))
      .sort((a, b) => marks.get(a.address)! - marks.get(b.address)!);
    return [...good, ...bad];
  }
}

/** The key of the failure marks of host:port (a space cannot be in a host name or an address). */
function marksKey(host: string, port: number): string {
  return `${canonicalName(host)} ${port}`;
}

/** A host's canonical name (or its text, when it is none: it then has no marks). */
function canonicalName(host: string): string {
  try {
    const parsed = parseHost(host);
    return parsed.kind === 'ip' ? parsed.ip.text : parsed.name;
  } catch {
    return host;
  }
}

/** The addresses of one family an answer's are kept as: canonical, each once, the first MAX_ADDRESSES_PER_FAMILY. */
function kept(list: readonly string[]): string[] {
  const unique = new Set<string>();
  for (const address of list) {
    unique.add(canonicalAddress(address));
    if (unique.size === MAX_ADDRESSES_PER_FAMILY) break;
  }
  return [...unique];
}

/**
 * `localhost` and the names under it (RFC 6761 §6.3): loopback, answered here. Never asked of DNS, where a server
 * (hostile, or just an upstream that answers anything) could put them anywhere, nor of the system resolver, whose
 * hosts file knows `localhost` but whose DNS would be asked for `app.localhost`.
 */
function isLoopbackName(name: string): boolean {
  return name === 'localhost' || name.endsWith('.localhost');
}

function canonicalAddress(address: string): string {
  return parseIpLiteral(address)?.text ?? address;
}
