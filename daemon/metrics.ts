// Prometheus metrics (prom-client) on a registry of our own, never prom-client's global one, so that two daemons
// in one process (tests) or a host application keep theirs apart.
//
// The hot path pays for a counter increment or a histogram observation and nothing else. The per-origin gauges
// (idle, leased, connecting, waiting) are not kept up to date at all: they are computed at scrape time from the
// pool manager's `snapshot()`, a walk of every pool. The endpoint has no access control (any local uid reaches
// loopback) and cannot tell who asks, and rendering the text takes the daemon's one event loop 2-3 ms (the walk,
// every collector, prom-client's process metrics: process_open_fds lists /proc/self/fd, about 10 ms with 10,000
// fds). So one rendering serves every scrape for SNAPSHOT_MAX_AGE_MS, those that come while it runs included, and
// the endpoint sends at most METRICS_MAX_ANSWERS answers in that time (each costs the loop its parsing and the
// sending of the text, about 50 µs), the rest waiting their turn, one request at a time per connection: a loop of
// scrapes over every connection costs one rendering and 16 answers a second. A scraper asking every
// SNAPSHOT_MAX_AGE_MS or less often gets a fresh rendering at once each time. Each connection accepted costs the
// loop too (its socket, parser and timers, about 50 µs with its close), so the endpoint also accepts at most
// METRICS_MAX_ACCEPTS connections in that time and leaves the rest in the kernel's queue (AcceptGate).

import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { type AddressInfo, Server as NetServer, type Socket } from 'node:net';
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import * as native from '../shared/native.js';
import { CONNECT_PURPOSES } from './origin-pool.js';

/**
 * A Prometheus counter (`name` ends in `_total`) of a running total the daemon keeps itself (`read`, at scrape time:
 * nothing on the hot path): each scrape adds what came since the last. A counter, not a gauge, so that rate() and
 * increase() take a restart's reset for what it is. A total that ever fell would throw in inc(): it is followed
 * down without a count (cannot happen for the totals given; a scrape must never fail for it).
 */
export function runningTotal(registry: Registry, name: string, help: string, read: () => number): Counter {
  let seen = 0;
  return new Counter({
    name,
    help,
    registers: [registry],
    collect() {
      const now = read();
      if (now > seen) this.inc(now - seen);
      seen = now;
    },
  });
}

/** What a rendering reads from the pool manager (at most once per SNAPSHOT_MAX_AGE_MS); keep it cheap. */
export interface MetricsSnapshot {
  origins: Iterable<{
    origin: string;
    idle: number;
    leased: number;
    connecting?: number;
    waiting?: number;
    /** What Happy Eyeballs learned for the origin's host (the family that won), when anything. */
    learnedFamily?: { family: 4 | 6 } | null;
    /** How busy the origin is: which origins the per-origin gauges name (METRICS_MAX_ORIGINS). */
    demandRatePerS?: number;
    /** An origin reached more ways than one: its connections in all of them against its one cap (origin-cap.ts). */
    sharedCap?: { connections: number; maxPerOrigin: number; waiting: number };
  }>;
}

export interface MetricsOptions {
  /** Also export prom-client's process metrics (RSS, CPU, fds, event loop lag, GC). Default true. */
  processMetrics?: boolean;
  /**
   * Export the per-origin gauges (an `origin` label each: every uid's origins, to whoever reaches the endpoint).
   * Default false (config `metricsPerOrigin`); the totals are exported either way.
   */
  perOrigin?: boolean;
  /** The clock the rendering's age is read on (tests). */
  now?: () => number;
}

/** Origins named in the per-origin gauges, the busiest; the rest are summed under `origin="other"`. */
export const METRICS_MAX_ORIGINS = 100;

/** Connections the metrics endpoint holds at once; more are closed as they come. */
export const METRICS_MAX_CONNECTIONS = 16;

/** Connections the endpoint accepts per SNAPSHOT_MAX_AGE_MS; past them it stops accepting until the period ends. */
export const METRICS_MAX_ACCEPTS = METRICS_MAX_CONNECTIONS;

/**
 * The listening socket's backlog: the kernel queues at most one more than this while accepts are paused, fewer than
 * a period's accepts, so the first period after a flood empties the queue and a scraper's connect finds room.
 */
const METRICS_BACKLOG = METRICS_MAX_ACCEPTS / 2;

/** Answers (of any kind) the endpoint sends per SNAPSHOT_MAX_AGE_MS; requests past them wait for the next period. */
export const METRICS_MAX_ANSWERS = METRICS_MAX_CONNECTIONS;

/** A metrics connection that has not sent a whole request within this is closed (Node's default is 60 s). */
const HEADERS_TIMEOUT_MS = 10_000;
const CHECK_INTERVAL_MS = 2_000;

/** How long one rendering of the text (one walk of the pools, one read of the process metrics) serves scrapes. */
export const SNAPSHOT_MAX_AGE_MS = 1_000;

/** Handoff latency: 10 µs to 100 ms. */
export const HANDOFF_BUCKETS_SECONDS = [
  0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];
/** Connect latency: 1 ms to 10 s (connectTimeoutMs defaults to 5 s). */
export const CONNECT_BUCKETS_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
/** Reasons for dropping an idle socket, exported at 0 from the start so that rate() works on the first drop. */
export const DEAD_SOCKET_REASONS = ['eof', 'error', 'data', 'ttl', 'recycled'] as const;

/**
 * A histogram without labels whose observe() only counts (every warm handoff observes one): prom-client's own
 * validates labels, hashes them and keys each bucket by its bound as a string property. Scrapes read the counts
 * here, in the shape prom-client's Histogram gives (the registry renders it as it renders that). Only observe(value),
 * reset() and the scrape: no labels, timers or exemplars (the daemon uses none).
 */
export class CountingHistogram extends Histogram {
  readonly #name: string;
  readonly #help: string;
  readonly #bounds: readonly number[];
  /** Observations per bucket, not cumulative; the last slot is past every bound (+Inf). */
  readonly #counts: Float64Array;
  #sum = 0;
  #count = 0;
  /** False after reset() until the next observation: prom-client's renders no values then. */
  #present = true;

  constructor(config: { name: string; help: string; buckets: number[]; registers: Registry[] }) {
    super(config);
    this.#name = config.name;
    this.#help = config.help;
    this.#bounds = [...config.buckets];
    this.#counts = new Float64Array(this.#bounds.length + 1);
    // prom-client's constructor puts its own observe on the instance (with or without exemplars): this one is used.
    this.observe = CountingHistogram.prototype.observe;
  }

  override observe(value: unknown): void {
    if (typeof value !== 'number' || !Number.isFinite(value)) {
      throw new TypeError(`Value is not a valid number: ${String(value)}`);
    }
    const bounds = this.#bounds;
    let index = 0;
    while (index < bounds.length && value > bounds[index]!) index++;
    this.#counts[index]!++;
    this.#sum += value;
    this.#count++;
    this.#present = true;
  }

  override reset(): void {
    // (prom-client's constructor calls it, before these fields exist.)
    if (!(#counts in this)) return;
    this.#counts.fill(0);
    this.#sum = 0;
    this.#count = 0;
    this.#present = false;
  }

  override async get(): ReturnType<Histogram['get']> {
    return this.#values(true);
  }

  /** What the registry renders (it asks for this before get()). */
  async getForPromString(): ReturnType<Histogram['get']> {
    return this.#values(false);
  }

  #values(splayed: boolean): Awaited<ReturnType<Histogram['get']>> {
    const values: Array<Record<string, unknown>> = [];
    // prom-client's values carry their labels twice before get() folds `sharedLabels` in, and an exemplar slot.
    const add = (labels: Record<string, string | number>, value: number, suffix: string, exemplar?: null) =>
      values.push(
        splayed
          ? { value, metricName: this.#name + suffix, exemplar, labels }
          : { labels, sharedLabels: {}, value, metricName: this.#name + suffix, exemplar },
      );
    if (this.#present) {
      let cumulative = 0;
      for (let index = 0; index < this.#bounds.length; index++) {
        cumulative += this.#counts[index]!;
        add({ le: this.#bounds[index]! }, cumulative, '_bucket', null);
      }
      add({ le: '+Inf' }, this.#count, '_bucket', null);
      add({}, this.#sum, '_sum');
      add({}, this.#count, '_count');
    }
    const metric = { name: this.#name, help: this.#help, type: 'histogram', values, aggregator: 'sum' };
    return metric as unknown as Awaited<ReturnType<Histogram['get']>>;
  }
}

export class Metrics {
  readonly registry: Registry;
  /** Acquires served from a warm idle socket. */
  readonly hits: Counter;
  /** Acquires that waited for a new connection. */
  readonly misses: Counter;
  /**
   * Acquires, requests or clients refused; `reason`: an egress policy reason, `access`, `limit`, `quota`,
   * `acquire_timeout`, `rate_limited`, `release-used`, `release-foreign`, `accept-emfile`, ...
   */
  readonly refusals: Counter<'reason'>;
  /** Idle sockets dropped; `reason`: eof, error, data (unexpected bytes), ttl, recycled (learned lifetime), ... */
  readonly deadDropped: Counter<'reason'>;
  /**
   * Happy Eyeballs connect attempts by `family` (4, 6) and `outcome`: won, failed, cancelled (lost the race),
   * refused (egress policy, before the attempt or on its peer address).
   */
  readonly connectAttempts: Counter<'family' | 'outcome'>;
  /** Connects that failed; `reason`: the error code (ECONNREFUSED, SOCKPOOL_ERR_CONNECT, ...). */
  readonly connectFailures: Counter<'reason'>;
  /** Sockets opened at origins, by `purpose` (ConnectPurpose: acquire, refill, prewarm, lookahead, warm, start). */
  readonly socketsOpened: Counter<'purpose'>;
  /**
   * Sockets closed without ever having been lent, by the `purpose` they were opened for and the `reason` they were
   * closed (a DropReason: ttl, recycled, excess, evicted, shutdown, ...): connections warming cost an origin for nothing.
   */
  readonly socketsNeverLent: Counter<'purpose' | 'reason'>;
  /** Malformed messages received from clients. */
  readonly protocolErrors: Counter;
  /** `reclaim` notices sent: acquires waited at an origin's cap while a client held idle-able leases of it. */
  readonly reclaimNotices: Counter;
  /** From the acquire message received to the fd sent, in seconds. */
  readonly handoffSeconds: Histogram;
  /** Time to establish one TCP connection, in seconds. */
  readonly connectSeconds: Histogram;

  /** The per-origin entries of the rendering in progress (see #render()). */
  #scrape: ReturnType<typeof collectOrigins> | undefined;
  readonly #takeSnapshot: () => ReturnType<typeof collectOrigins>;
  /** prom-client's process metrics (processMetrics), in a registry of their own (their text follows ours). */
  readonly #processRegistry: Registry | undefined;
  /** The last rendering (also while it runs) and when it began (#now): text() serves it SNAPSHOT_MAX_AGE_MS. */
  #lastText: { at: number; text: Promise<string> } | undefined;
  readonly #now: () => number;

  constructor(snapshot: () => MetricsSnapshot, options: MetricsOptions = {}) {
    const registry = new Registry();
    this.registry = registry;
    const registers = [registry];

    // One snapshot per rendering, shared by the per-origin gauges and their totals: #render() takes it before the
    // registry collects them (a collection outside text() takes its own).
    this.#now = options.now ?? (() => performance.now());
    this.#takeSnapshot = () => collectOrigins(snapshot());
    const origins = () => this.#scrape ?? this.#takeSnapshot();
    const perOrigin = (name: string, help: string, pick: (entry: OriginEntry) => number | undefined) =>
      options.perOrigin !== true
        ? undefined
        : new Gauge({
            name,
            help,
            labelNames: ['origin'],
            registers,
            collect(this: Gauge<'origin'>) {
              this.reset();
              for (const entry of origins()) {
                const value = pick(entry);
                if (value !== undefined) this.set({ origin: entry.origin }, value);
              }
            },
          });
    // The same, summed over every origin: no origin named (exported whether or not the per-origin gauges are).
    const total = (name: string, help: string, pick: (entry: OriginEntry) => number | undefined) =>
      new Gauge({
        name,
        help,
        registers,
        collect(this: Gauge) {
          let sum = 0;
          for (const entry of origins()) sum += pick(entry) ?? 0;
          this.set(sum);
        },
      });
    total('sockpool_pool_idle_sockets', 'Warm idle sockets, all origins.', (entry) => entry.idle);
    total('sockpool_pool_leased_sockets', 'Sockets handed out, all origins.', (entry) => entry.leased);
    total('sockpool_pool_connecting_sockets', 'Connects in progress, all origins.', (entry) => entry.connecting);
    total('sockpool_pool_waiting_acquires', 'Acquires waiting at a cap, all origins.', (entry) => entry.waiting);
    perOrigin('sockpool_idle_sockets', 'Warm idle sockets per origin.', (entry) => entry.idle);
    perOrigin(
      'sockpool_leased_sockets',
      'Sockets handed out and not yet closed or released, per origin.',
      (entry) => entry.leased,
    );
    perOrigin('sockpool_connecting_sockets', 'Connects in progress per origin.', (entry) => entry.connecting);
    perOrigin(
      'sockpool_waiting_acquires',
      'Acquires waiting in the fair queue (maxPerOrigin) per origin.',
      (entry) => entry.waiting,
    );

    // An origin reached more ways than one (directly, as warm TLS, through proxies) has one maxPerOrigin for all its
    // pools: each of their rows carries the origin's figures (the same in each), beside the row's own counts.
    perOrigin(
      'sockpool_shared_cap_connections',
      "The origin's connections in all the ways it is reached (leased, idle, connecting), counted against its one maxPerOrigin; in each way's row.",
      (entry) => entry.sharedCap?.connections,
    );
    perOrigin(
      'sockpool_shared_cap_max_connections',
      "The maxPerOrigin shared by all the ways an origin is reached; in each way's row.",
      (entry) => entry.sharedCap?.maxPerOrigin,
    );
    perOrigin(
      'sockpool_shared_cap_waiting_acquires',
      "Acquires waiting for room at the origin's shared maxPerOrigin, in all the ways it is reached; in each way's row.",
      (entry) => entry.sharedCap?.waiting,
    );

    perOrigin(
      'sockpool_learned_family',
      'Address family (4 or 6) that won the last connect race to the origin, while remembered.',
      (entry) => entry.learnedFamily,
    );

    // The addon's deferred closes (native.deferredCloses): only where client fds are let in do they happen at all.
    new Gauge({
      name: 'sockpool_deferred_closes_queued',
      help: 'Fds a client sent (not sockets) waiting for a closing thread: they stay open while the threads they may take are held.',
      registers,
      collect(this: Gauge) {
        this.set(native.deferredCloses().queued);
      },
    });
    new Gauge({
      name: 'sockpool_deferred_close_threads_stuck',
      help: "Closing threads held in one close of a client's file (a FUSE mount that does not answer its flush).",
      registers,
      collect(this: Gauge) {
        this.set(native.deferredCloses().stuckThreads);
      },
    });

    this.hits = new Counter({
      name: 'sockpool_acquire_hits_total',
      help: 'Acquires served from a warm idle socket.',
      registers,
    });
    this.misses = new Counter({
      name: 'sockpool_acquire_misses_total',
      help: 'Acquires that waited for a new connection.',
      registers,
    });
    this.refusals = new Counter({
      name: 'sockpool_refusals_total',
      help: 'Acquires or clients refused, by reason.',
      labelNames: ['reason'],
      registers,
    });
    this.deadDropped = new Counter({
      name: 'sockpool_dead_sockets_dropped_total',
      help: 'Idle sockets dropped, by reason (eof, error, data, ttl, recycled, ...).',
      labelNames: ['reason'],
      registers,
    });
    for (const reason of DEAD_SOCKET_REASONS) this.deadDropped.inc({ reason }, 0);
    this.connectAttempts = new Counter({
      name: 'sockpool_connect_attempts_total',
      help: 'Connect attempts (Happy Eyeballs) by address family and outcome.',
      labelNames: ['family', 'outcome'],
      registers,
    });
    this.connectFailures = new Counter({
      name: 'sockpool_connect_failures_total',
      help: 'Connects that failed, by error code.',
      labelNames: ['reason'],
      registers,
    });
    this.socketsOpened = new Counter({
      name: 'sockpool_sockets_opened_total',
      help: 'Sockets opened at origins, by purpose (acquire, refill, prewarm, lookahead, warm, start).',
      labelNames: ['purpose'],
      registers,
    });
    this.socketsNeverLent = new Counter({
      name: 'sockpool_sockets_never_lent_total',
      help: 'Sockets closed without ever having been lent, by the purpose they were opened for and why they closed.',
      labelNames: ['purpose', 'reason'],
      registers,
    });
    for (const purpose of CONNECT_PURPOSES) this.socketsOpened.inc({ purpose }, 0);
    this.protocolErrors = new Counter({
      name: 'sockpool_protocol_errors_total',
      help: 'Malformed messages received from clients.',
      registers,
    });
    this.reclaimNotices = new Counter({
      name: 'sockpool_reclaim_notices_total',
      help: "Notices asking a client for its idle leases of an origin whose acquires wait at the origin's cap.",
      registers,
    });
    this.handoffSeconds = new CountingHistogram({
      name: 'sockpool_handoff_duration_seconds',
      help: 'From an acquire received to its fd sent.',
      buckets: HANDOFF_BUCKETS_SECONDS,
      registers,
    });
    this.connectSeconds = new CountingHistogram({
      name: 'sockpool_connect_duration_seconds',
      help: 'Time to establish one TCP connection.',
      buckets: CONNECT_BUCKETS_SECONDS,
      registers,
    });
    if (options.processMetrics ?? true) {
      this.#processRegistry = new Registry();
      collectDefaultMetrics({ register: this.#processRegistry });
    }
  }

  /** The Prometheus text exposition of every metric, rendered at most once per SNAPSHOT_MAX_AGE_MS. */
  text(): Promise<string> {
    const at = this.#now();
    const last = this.#lastText;
    if (last !== undefined && at - last.at < SNAPSHOT_MAX_AGE_MS) return last.text;
    const text = this.#render();
    this.#lastText = { at, text };
    // A rendering that failed is not kept.
    text.catch(() => {
      if (this.#lastText?.text === text) this.#lastText = undefined;
    });
    return text;
  }

  /** Every metric's text, from one snapshot of the pools. */
  async #render(): Promise<string> {
    const scrape = this.#takeSnapshot();
    this.#scrape = scrape;
    try {
      const [own, process] = await Promise.all([
        this.registry.metrics(),
        this.#processRegistry ? this.#processRegistry.metrics() : '',
      ]);
      return process === '' ? own : `${own}${own.endsWith('\n') ? '' : '\n'}${process}`;
    } finally {
      if (this.#scrape === scrape) this.#scrape = undefined;
    }
  }
}

interface OriginEntry {
  origin: string;
  idle: number;
  leased: number;
  connecting: number | undefined;
  waiting: number | undefined;
  learnedFamily: number | undefined;
  sharedCap: { connections: number; maxPerOrigin: number; waiting: number } | undefined;
}

/**
 * The busiest METRICS_MAX_ORIGINS origins (by demand, then sockets), and past them one entry `other` summing the rest:
 * every origin a client names is a label value, and a client naming thousands of origins would make as many series
 * in the operator's Prometheus (and as many lines per scrape). The totals summed over these entries are unchanged.
 */
function collectOrigins(snapshot: MetricsSnapshot): OriginEntry[] {
  const rows = [...snapshot.origins];
  if (rows.length > METRICS_MAX_ORIGINS) {
    rows.sort((a, b) => (b.demandRatePerS ?? 0) - (a.demandRatePerS ?? 0) || b.leased + b.idle - (a.leased + a.idle));
  }
  const entries: OriginEntry[] = [];
  for (const { origin, idle, leased, connecting, waiting, learnedFamily, sharedCap } of rows.slice(
    0,
    METRICS_MAX_ORIGINS,
  )) {
    entries.push({ origin, idle, leased, connecting, waiting, learnedFamily: learnedFamily?.family, sharedCap });
  }
  if (rows.length > METRICS_MAX_ORIGINS) {
    // (No origin key is "other": a key always has a port.) A learned family is one host's, and a shared cap one
    // origin's, repeated in each of its rows: neither is summed.
    let idle = 0;
    let leased = 0;
    let connecting = 0;
    let waiting = 0;
    for (const row of rows.slice(METRICS_MAX_ORIGINS)) {
      idle += row.idle;
      leased += row.leased;
      connecting += row.connecting ?? 0;
      waiting += row.waiting ?? 0;
    }
    entries.push({
      origin: 'other',
      idle,
      leased,
      connecting,
      waiting,
      learnedFamily: undefined,
      sharedCap: undefined,
    });
  }
  return entries;
}

/** The metrics of one daemon; `snapshot` gives the per-origin gauges at scrape time. */
/**
 * `name{state}`: 1 for `current`, 0 for each other of `states`, so that an alert can ask for one state (the process's
 * own restrictions, whose state is decided once at start: bind-restriction.ts, connect-guard.ts).
 */
export function registerStateGauge<State extends string>(
  registry: Registry,
  name: string,
  help: string,
  states: readonly State[],
  current: State,
): void {
  const gauge = new Gauge({ name, help, labelNames: ['state'], registers: [registry] });
  for (const state of states) gauge.set({ state }, state === current ? 1 : 0);
}

export function createMetrics(snapshot: () => MetricsSnapshot, options?: MetricsOptions): Metrics {
  return new Metrics(snapshot, options);
}

export interface MetricsServer {
  /** The port it listens on (the one chosen by the kernel when asked for 0). */
  port: number;
  close(): Promise<void>;
}

export interface MetricsServerOptions {
  /** The clock the answers' periods are read on (tests); performance.now() by default. */
  now?: () => number;
}

/**
 * Turns for answers: at most METRICS_MAX_ANSWERS per SNAPSHOT_MAX_AGE_MS, in arrival order; the rest wait for the
 * next period (a timer, or the next request once the period is over).
 */
class AnswerTurns {
  readonly #now: () => number;
  #periodStart = Number.NEGATIVE_INFINITY;
  #answered = 0;
  readonly #waiting: Array<() => void> = [];
  #timer: NodeJS.Timeout | undefined;

  constructor(now: () => number) {
    this.#now = now;
  }

  /** Calls `answer` at its turn; the returned function takes it out of the line (its connection closed). */
  take(answer: () => void): () => void {
    this.#waiting.push(answer);
    this.#serve();
    return () => {
      const index = this.#waiting.indexOf(answer);
      if (index >= 0) this.#waiting.splice(index, 1);
    };
  }

  close(): void {
    clearTimeout(this.#timer);
    this.#waiting.length = 0;
  }

  #serve(): void {
    const now = this.#now();
    if (now - this.#periodStart >= SNAPSHOT_MAX_AGE_MS) {
      this.#periodStart = now;
      this.#answered = 0;
    }
    while (this.#waiting.length > 0 && this.#answered < METRICS_MAX_ANSWERS) {
      this.#answered++;
      this.#waiting.shift()!();
    }
    if (this.#waiting.length > 0 && this.#timer === undefined) {
      const delay = Math.max(1, this.#periodStart + SNAPSHOT_MAX_AGE_MS - now);
      this.#timer = setTimeout(() => {
        this.#timer = undefined;
        this.#serve();
      }, delay);
      this.#timer.unref();
    }
  }
}

/**
 * Accepts: at most METRICS_MAX_ACCEPTS per SNAPSHOT_MAX_AGE_MS (Node's 'connection' and 'drop', the connections past
 * METRICS_MAX_CONNECTIONS it closes as they come). Past them the server's handle is closed until the period ends,
 * while the socket stays open and listening on a second fd of ours: the kernel keeps the next connections in its
 * queue (METRICS_BACKLOG) and, that full, makes the rest wait (their SYNs are dropped, their kernels send them
 * again), none of it on the daemon's loop. Node cannot stop accepting otherwise (libuv accepts whatever is queued
 * and Node takes every connection it accepts), and closing the socket would free the port for any local uid to bind.
 */
class AcceptGate {
  readonly #server: NetServer;
  readonly #now: () => number;
  /** The listening socket, ours: the server's handle has a copy of its own while it accepts. */
  readonly #listening: number;
  #periodStart = Number.NEGATIVE_INFINITY;
  #accepted = 0;
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  /** For a server listening already. */
  constructor(server: NetServer, now: () => number) {
    this.#server = server;
    this.#now = now;
    // Node exposes a listening handle's fd only on the handle (Unix).
    this.#listening = native.dup((server as unknown as { _handle: { fd: number } })._handle.fd);
    server.on('connection', () => this.#accept());
    server.on('drop', () => this.#accept());
    // A resume that failed (listen's errors come as events) is tried again a period later. While the server
    // listens, an error is an accept that failed, and libuv goes on with the next connection.
    server.on('error', () => {
      if (!server.listening) this.#resumeIn(SNAPSHOT_MAX_AGE_MS);
    });
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
    native.close(this.#listening);
  }

  #accept(): void {
    const now = this.#now();
    if (now - this.#periodStart >= SNAPSHOT_MAX_AGE_MS) {
      this.#periodStart = now;
      this.#accepted = 0;
    }
    if (++this.#accepted < METRICS_MAX_ACCEPTS || !this.#server.listening) return;
    // net.Server's close, not http's: that one would also close the idle keep-alive connections (a scraper's) and
    // stop the check of the headers timeout. libuv stops accepting at once (it checks the fd before each accept).
    NetServer.prototype.close.call(this.#server);
    this.#resumeIn(this.#periodStart + SNAPSHOT_MAX_AGE_MS - now);
  }

  #resumeIn(delay: number): void {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(
      () => {
        this.#timer = undefined;
        this.#resume();
      },
      Math.max(1, delay),
    );
    this.#timer.unref();
  }

  #resume(): void {
    if (this.#closed || this.#server.listening) return;
    let fd: number;
    try {
      fd = native.dup(this.#listening);
    } catch {
      this.#resumeIn(SNAPSHOT_MAX_AGE_MS); // no fd left for now (EMFILE)
      return;
    }
    this.#server.listen({ fd }, METRICS_BACKLOG); // the handle owns `fd` from here
  }
}

/** Serves `GET /metrics` (and HEAD) on host:port with node:http; anything else is 404 (405 for other methods). */
export function startMetricsServer(
  metrics: Metrics | Registry,
  port: number,
  host = '127.0.0.1',
  options: MetricsServerOptions = {},
): Promise<MetricsServer> {
  const registry = metrics instanceof Registry ? metrics : metrics.registry;
  const text = () => (metrics instanceof Registry ? metrics.metrics() : metrics.text());
  const now = options.now ?? (() => performance.now());
  const turns = new AnswerTurns(now);
  /** Connections with a request not yet answered. */
  const asking = new WeakSet<Socket>();
  const answer = (request: IncomingMessage, response: ServerResponse) => {
    const path = (request.url ?? '').split('?')[0];
    if (path !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found: try /metrics\n');
      return;
    }
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      response.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain; charset=utf-8' }).end();
      return;
    }
    text().then(
      (text) => {
        response.writeHead(200, { 'content-type': registry.contentType });
        response.end(request.method === 'HEAD' ? undefined : text);
      },
      (error: unknown) => {
        response.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' });
        response.end(`metrics failed: ${(error as Error).message}\n`);
      },
    );
  };
  // Every local uid reaches loopback, and each connection is an fd of the daemon's (the fds its pools and leases
  // need): at most METRICS_MAX_CONNECTIONS at once (Node closes the rest as they are accepted, METRICS_MAX_ACCEPTS a
  // period at most: AcceptGate), and one that sends no whole request within HEADERS_TIMEOUT_MS is closed (checked
  // every CHECK_INTERVAL_MS). Each connection has one request at a time: one that sends the next before its answer
  // (pipelining, which no scraper does; Node would parse a whole read's worth of them and queue their answers) is
  // closed.
  const server = createServer(
    { connectionsCheckingInterval: CHECK_INTERVAL_MS },
    (request: IncomingMessage, response: ServerResponse) => {
      const { socket } = request;
      if (asking.has(socket)) {
        socket.destroy();
        return;
      }
      asking.add(socket);
      response.once('finish', () => asking.delete(socket));
      const leave = turns.take(() => answer(request, response));
      response.once('close', leave);
    },
  );
  // Scrapers keep connections alive; they must not hold the daemon's shutdown.
  server.keepAliveTimeout = 5_000;
  server.maxConnections = METRICS_MAX_CONNECTIONS;
  server.headersTimeout = HEADERS_TIMEOUT_MS;
  server.requestTimeout = HEADERS_TIMEOUT_MS;
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ port, host, backlog: METRICS_BACKLOG }, () => {
      server.off('error', reject);
      server.unref();
      let gate: AcceptGate;
      try {
        gate = new AcceptGate(server, now);
      } catch (error) {
        server.close(() => reject(error)); // no fd left for the gate's copy of the socket
        return;
      }
      resolve({
        port: (server.address() as AddressInfo).port,
        close: () =>
          new Promise<void>((done) => {
            gate.close();
            turns.close();
            server.close(() => done()); // (with an error when the gate had the handle closed: no matter)
            server.closeAllConnections();
          }),
      });
    });
  });
}
