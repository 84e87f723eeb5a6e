// Resolver: host name → ordered list of addresses for the connector, with a TTL cache.
//
// - IP literals (any spelling `normaliseIpLiteral` accepts) return themselves, normalised.
// - Overrides (curl's --resolve syntax, `HOST:PORT:ADDR[,ADDR...]`) win over DNS for that host and port.
// - With `servers`, A and AAAA are asked in parallel through a c-ares `dns.promises.Resolver` (no search domains,
//   no /etc/hosts), and the answer's TTL sets the cache lifetime, clamped to [minTtlMs, maxTtlMs]. While they are
//   in flight, `answersInFlight` gives each family's answer as soon as it is in (Happy Eyeballs starts on it).
// - Without `servers`, the system resolver answers: `dns.lookup` (getaddrinfo), so /etc/hosts, nsswitch,
//   search domains and a local stub such as systemd-resolved behave as for every other program on the machine.
//   getaddrinfo gives no TTL, so such answers are cached for minTtlMs. It also runs in the libuv threadpool and
//   cannot be cancelled: after timeoutMs we answer with a DNS error, but the thread stays busy until the system
//   resolver gives up. Configure `servers` for TTLs and real timeouts.
//
// Order of the addresses returned: the families interleave, preferred family first (IPv6 by default, as in
// RFC 8305; set `preferFamily: 4` on a machine without an IPv6 route, or let `reportFailure` push the IPv6
// addresses back after the first ENETUNREACH). Within each family the start rotates on every call (round robin
// over the origin's addresses). Addresses reported failed within `failurePenaltyMs` go last, least recently
// failed first; `reportSuccess` clears the mark.
//
// Errors: SockpoolError(DNS) with fields { host, reason, dnsCode }. NXDOMAIN and "no address" answers are cached
// for negativeTtlMs; timeouts and server failures are not cached (the next call asks again). Concurrent calls for
// one host share one query. Time is monotonic (performance.now()).
//
// The resolver applies no policy: the connector calls EgressPolicy.checkAddress on every address it returns
// (and on the connected peer), since a public name may resolve to a refused address.

import { promises as dns } from 'node:dns';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { canonicalHost } from '../shared/origin.js';
import { isHostName, normaliseIpLiteral } from './egress-policy.js';

export interface ResolvedAddress {
  address: string;
  family: 4 | 6;
}

export interface ResolverOptions {
  /** DNS servers as 'ip', 'ip:port' or '[ipv6]:port'. Empty (default): the system resolver (getaddrinfo). */
  servers?: string[];
  /** curl-style overrides 'HOST:PORT:ADDR[,ADDR...]', IPv6 ADDR in brackets. Default []. */
  overrides?: string[];
  /** Shortest cache lifetime of an answer, and the lifetime of system-resolver answers. Default 1000. */
  minTtlMs?: number;
  /** Longest cache lifetime of an answer. Default 300000. */
  maxTtlMs?: number;
  /** Cache lifetime of NXDOMAIN / no-address answers. Default 5000. */
  negativeTtlMs?: number;
  /** Deadline of one resolution (both families). Default 3000. */
  timeoutMs?: number;
  /** 0: both families (default); 4 or 6: only that family. Applies to names, not to literals or overrides. */
  family?: 0 | 4 | 6;
  /** Family tried first when both are present. Default 6 (RFC 8305). */
  preferFamily?: 4 | 6;
  /** How long an address reported failed stays at the end of the list. Default 30000. */
  failurePenaltyMs?: number;
  /** Most host names cached (positive and negative); the oldest entry goes first. Default 10000. */
  maxCacheEntries?: number;
}

export const RESOLVER_DEFAULTS = {
  minTtlMs: 1000,
  maxTtlMs: 300_000,
  negativeTtlMs: 5000,
  timeoutMs: 3000,
  family: 0,
  preferFamily: 6,
  failurePenaltyMs: 30_000,
  maxCacheEntries: 10_000,
} as const;

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

function configError(option: string, entry: unknown, why: string): SockpoolError {
  return new SockpoolError(ErrorCodes.CONFIG, `resolver: ${option} entry ${JSON.stringify(entry)}: ${why}`, {
    option,
    entry: String(entry),
  });
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

/** Parses one curl-style override; the key is 'host:port'. */
function parseOverride(entry: unknown): { key: string; set: AddressSet } {
  if (typeof entry !== 'string') throw configError('overrides', entry, 'not a string');
  const text = entry.trim().replace(/^\+/, ''); // curl's '+' (keep-for-a-while marker) means nothing here
  const match = /^([^:[\]]+):([0-9]{1,5}):(.+)$/.exec(text);
  if (!match) throw configError('overrides', entry, 'expected HOST:PORT:ADDR[,ADDR...]');
  const host = canonicalHost(match[1]!);
  const port = Number(match[2]);
  if (!isHostName(host)) throw configError('overrides', entry, `bad host name ${JSON.stringify(match[1])}`);
  if (port < 1 || port > 65535) throw configError('overrides', entry, 'port must be 1 to 65535');
  const set: AddressSet = { v4: [], v6: [], turn: 0 };
  for (const raw of match[3]!.split(',')) {
    const item = raw.trim();
    const bracketed = item.startsWith('[') && item.endsWith(']');
    const strictV4 = /^[0-9]{1,3}(?:\.[0-9]{1,3}){3}$/.test(item);
    const literal = bracketed || strictV4 ? normaliseIpLiteral(item) : null;
    if (!literal || (bracketed && literal.family !== 6) || item.includes('%')) {
      throw configError('overrides', entry, `bad address ${JSON.stringify(item)} (IPv4, or IPv6 in brackets)`);
    }
    const list = literal.family === 4 ? set.v4 : set.v6;
    if (!list.includes(literal.address)) list.push(literal.address);
  }
  return { key: `${host}:${port}`, set };
}

function validateServer(entry: unknown): string {
  if (typeof entry !== 'string' || entry.trim() === '') throw configError('servers', entry, 'not a server address');
  const text = entry.trim();
  const ipv6Port = /^\[([^\]]+)\](?::([0-9]{1,5}))?$/.exec(text);
  const ipv4Port = /^([0-9.]+)(?::([0-9]{1,5}))?$/.exec(text);
  const address = ipv6Port?.[1] ?? ipv4Port?.[1] ?? text;
  const port = ipv6Port?.[2] ?? ipv4Port?.[2];
  const literal = normaliseIpLiteral(address);
  const strictV4 = /^[0-9]{1,3}(?:\.[0-9]{1,3}){3}$/.test(address);
  if (!literal || (literal.family === 4 && !strictV4) || (port !== undefined && (+port < 1 || +port > 65535))) {
    throw configError('servers', entry, "expected 'ip', 'ip:port' or '[ipv6]:port'");
  }
  return text;
}

function positiveNumber(option: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) {
    throw configError(option, value, 'must be a finite number >= 0');
  }
  return value;
}

export class Resolver {
  readonly #dns: dns.Resolver | undefined;
  readonly #overrides = new Map<string, AddressSet>();
  readonly #cache = new Map<string, CacheEntry>();
  readonly #inFlight = new Map<string, Promise<CacheEntry>>();
  /** Queries to DNS servers in flight: each family's own answer (answersInFlight). */
  readonly #pendingFamilies = new Map<string, Record<4 | 6, Promise<string[]>>>();
  /** host → address → time (monotonic ms) of the last reported failure. */
  readonly #failures = new Map<string, Map<string, number>>();
  readonly #minTtlMs: number;
  readonly #maxTtlMs: number;
  readonly #negativeTtlMs: number;
  readonly #timeoutMs: number;
  readonly #family: 0 | 4 | 6;
  readonly #preferFamily: 4 | 6;
  readonly #failurePenaltyMs: number;
  readonly #maxCacheEntries: number;

  /** Validates every option; a bad entry throws SockpoolError(CONFIG) naming it. */
  constructor(options: ResolverOptions = {}) {
    this.#minTtlMs = positiveNumber('minTtlMs', options.minTtlMs, RESOLVER_DEFAULTS.minTtlMs);
    this.#maxTtlMs = positiveNumber('maxTtlMs', options.maxTtlMs, RESOLVER_DEFAULTS.maxTtlMs);
    if (this.#maxTtlMs < this.#minTtlMs) throw configError('maxTtlMs', this.#maxTtlMs, 'must be >= minTtlMs');
    this.#negativeTtlMs = positiveNumber('negativeTtlMs', options.negativeTtlMs, RESOLVER_DEFAULTS.negativeTtlMs);
    this.#timeoutMs = positiveNumber('timeoutMs', options.timeoutMs, RESOLVER_DEFAULTS.timeoutMs);
    if (this.#timeoutMs < 1) throw configError('timeoutMs', this.#timeoutMs, 'must be >= 1');
    this.#failurePenaltyMs = positiveNumber(
      'failurePenaltyMs',
      options.failurePenaltyMs,
      RESOLVER_DEFAULTS.failurePenaltyMs,
    );
    this.#maxCacheEntries = positiveNumber(
      'maxCacheEntries',
      options.maxCacheEntries,
      RESOLVER_DEFAULTS.maxCacheEntries,
    );
    const family = options.family ?? RESOLVER_DEFAULTS.family;
    if (family !== 0 && family !== 4 && family !== 6) throw configError('family', family, 'must be 0, 4 or 6');
    this.#family = family;
    const preferFamily = options.preferFamily ?? RESOLVER_DEFAULTS.preferFamily;
    if (preferFamily !== 4 && preferFamily !== 6) throw configError('preferFamily', preferFamily, 'must be 4 or 6');
    this.#preferFamily = preferFamily;

    for (const entry of options.overrides ?? []) {
      const { key, set } = parseOverride(entry);
      const existing = this.#overrides.get(key);
      if (existing) {
        for (const address of set.v4) if (!existing.v4.includes(address)) existing.v4.push(address);
        for (const address of set.v6) if (!existing.v6.includes(address)) existing.v6.push(address);
      } else {
        this.#overrides.set(key, set);
      }
    }

    const servers = (options.servers ?? []).map(validateServer);
    if (servers.length > 0) {
      // c-ares: per-try timeout with one retry; our own deadline (timeoutMs) bounds the whole resolution.
      const perTryMs = Math.max(1, Math.floor(this.#timeoutMs / 2));
      this.#dns = new dns.Resolver({ timeout: perTryMs, tries: 2, maxTimeout: this.#timeoutMs });
      try {
        this.#dns.setServers(servers);
      } catch (error) {
        throw new SockpoolError(ErrorCodes.CONFIG, `resolver: servers ${JSON.stringify(servers)}: ${error}`, {
          option: 'servers',
          entry: servers.join(','),
        });
      }
    }
  }

  /**
   * The addresses to try for host:port, best first. Throws SockpoolError(DNS) when the name does not resolve,
   * has no address, or resolution timed out.
   */
  async resolve(host: string, port: number): Promise<ResolvedAddress[]> {
    const name = canonicalHost(host);
    const literal = normaliseIpLiteral(name);
    if (literal) return [literal];
    const override = this.#overrides.get(`${name}:${port}`);
    if (override) return this.#order(name, override);
    if (!isHostName(name)) {
      throw new SockpoolError(ErrorCodes.DNS, `not a host name: ${JSON.stringify(host)}`, {
        host,
        reason: 'invalid-host',
      });
    }
    let entry = this.#cache.get(name);
    if (!entry || entry.expiresAt <= performance.now()) entry = await this.#refresh(name);
    if (entry.kind === 'negative') {
      throw new SockpoolError(ErrorCodes.DNS, entry.message, {
        host: name,
        reason: entry.reason,
        dnsCode: entry.dnsCode,
      });
    }
    return this.#order(name, entry);
  }

  /** The family tried first when both are present (`preferFamily`). */
  get preferFamily(): 4 | 6 {
    return this.#preferFamily;
  }

  /**
   * While a query to the DNS servers for `host` is in flight (call it right after resolve()): each family's
   * addresses as soon as its own answer is in, so that a connect can start before the other family has answered
   * (RFC 8305 §3). A family whose query failed rejects. In the order DNS gave them (resolve() adds the rotation
   * and puts failed addresses last). Undefined when no such query is in flight: literals, overrides, cached
   * answers and the system resolver, for which resolve() has both families at once.
   */
  answersInFlight(host: string): Record<4 | 6, Promise<ResolvedAddress[]>> | undefined {
    const pending = this.#pendingFamilies.get(canonicalHost(host));
    if (!pending) return undefined;
    const addresses = (family: 4 | 6) =>
      pending[family].then((list) =>
        list.map((address): ResolvedAddress => ({ address: normaliseIpLiteral(address)?.address ?? address, family })),
      );
    return { 4: addresses(4), 6: addresses(6) };
  }

  /** A connect to `address` for `host` failed: put it last for failurePenaltyMs. */
  reportFailure(host: string, address: string): void {
    const name = canonicalHost(host);
    const normalised = normaliseIpLiteral(address)?.address ?? address;
    let marks = this.#failures.get(name);
    if (!marks) {
      marks = new Map();
      this.#failures.set(name, marks);
      this.#evictOldest(this.#failures);
    }
    marks.delete(normalised); // re-insert: the map keeps marks in failure order
    marks.set(normalised, performance.now());
  }

  /** A connect to `address` for `host` succeeded: forget its failure mark. */
  reportSuccess(host: string, address: string): void {
    const name = canonicalHost(host);
    const marks = this.#failures.get(name);
    if (!marks) return;
    marks.delete(normaliseIpLiteral(address)?.address ?? address);
    if (marks.size === 0) this.#failures.delete(name);
  }

  /** Forgets every cached answer and failure mark (overrides stay). */
  clear(): void {
    this.#cache.clear();
    this.#failures.clear();
  }

  /** One query per host at a time: concurrent callers share it. */
  #refresh(name: string): Promise<CacheEntry> {
    let pending = this.#inFlight.get(name);
    if (!pending) {
      pending = this.#ask(name)
        .then((answer) => this.#store(name, answer))
        .finally(() => this.#inFlight.delete(name));
      this.#inFlight.set(name, pending);
    }
    return pending;
  }

  #store(name: string, answer: Answer): CacheEntry {
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
      this.#cache.delete(name);
      this.#cache.set(name, entry);
      this.#evictOldest(this.#cache);
      return entry;
    }
    const message =
      answer.reason === 'timeout'
        ? `DNS resolution of ${name} timed out`
        : `DNS resolution of ${name} failed: ${answer.reason}${answer.dnsCode ? ` (${answer.dnsCode})` : ''}`;
    if (answer.kind === 'negative') {
      const entry: NegativeEntry = {
        kind: 'negative',
        expiresAt: now + this.#negativeTtlMs,
        message,
        reason: answer.reason,
        dnsCode: answer.dnsCode,
      };
      this.#cache.delete(name);
      this.#cache.set(name, entry);
      this.#evictOldest(this.#cache);
      return entry;
    }
    throw new SockpoolError(
      ErrorCodes.DNS,
      message,
      { host: name, reason: answer.reason, dnsCode: answer.dnsCode },
      { cause: answer.cause },
    );
  }

  #evictOldest(map: Map<string, unknown>): void {
    while (map.size > this.#maxCacheEntries) {
      const oldest = map.keys().next();
      if (oldest.done) return;
      map.delete(oldest.value);
    }
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

  async #ask(name: string): Promise<Answer> {
    return this.#dns ? this.#askServers(this.#dns, name) : this.#askSystem(name);
  }

  async #askServers(resolver: dns.Resolver, name: string): Promise<Answer> {
    const wantV4 = this.#family !== 6;
    const wantV6 = this.#family !== 4;
    const v4Query = wantV4 ? this.#withDeadline(resolver.resolve4(name, { ttl: true })) : Promise.resolve([]);
    const v6Query = wantV6 ? this.#withDeadline(resolver.resolve6(name, { ttl: true })) : Promise.resolve([]);
    const pending = {
      4: v4Query.then((records) => records.map((record) => record.address)),
      6: v6Query.then((records) => records.map((record) => record.address)),
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

  async #askSystem(name: string): Promise<Answer> {
    try {
      const found = await this.#withDeadline(dns.lookup(name, { all: true, family: this.#family, order: 'verbatim' }));
      const v4 = found.filter((item) => item.family === 4).map((item) => item.address);
      const v6 = found.filter((item) => item.family === 6).map((item) => item.address);
      if (v4.length + v6.length === 0) return this.#failure([]);
      return this.#addresses(v4, v6, this.#minTtlMs);
    } catch (error) {
      return this.#failure([error]);
    }
  }

  #addresses(v4: string[], v6: string[], ttlMs: number): Answer {
    const unique = (list: string[]) => [
      ...new Set(list.map((address) => normaliseIpLiteral(address)?.address ?? address)),
    ];
    return { kind: 'addresses', v4: unique(v4), v6: unique(v6), ttlMs };
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

  /** Interleaves the families (preferred first), rotates each family, and moves failed addresses last. */
  #order(name: string, set: AddressSet): ResolvedAddress[] {
    const turn = set.turn++;
    const v4 = rotate(set.v4, turn).map((address): ResolvedAddress => ({ address, family: 4 }));
    const v6 = rotate(set.v6, turn).map((address): ResolvedAddress => ({ address, family: 6 }));
    const [first, second] = this.#preferFamily === 6 ? [v6, v4] : [v4, v6];
    const interleaved: ResolvedAddress[] = [];
    for (let index = 0; index < Math.max(first.length, second.length); index++) {
      if (first[index]) interleaved.push(first[index]!);
      if (second[index]) interleaved.push(second[index]!);
    }
    const marks = this.#failures.get(name);
    if (!marks) return interleaved;
    const now = performance.now();
    for (const [address, failedAt] of marks) {
      if (now - failedAt >= this.#failurePenaltyMs) marks.delete(address);
    }
    if (marks.size === 0) {
      this.#failures.delete(name);
      return interleaved;
    }
    const good = interleaved.filter((item) => !marks.has(item.address));
    const bad = interleaved
      .filter((item) => marks.has(item.address))
      .sort((a, b) => marks.get(a.address)! - marks.get(b.address)!);
    return [...good, ...bad];
  }
}
