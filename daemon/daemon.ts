// sockpoold's life cycle: start (state, policy, listener, fd-store sockets back, warm from history, READY=1),
// reload on SIGHUP without dropping warm sockets, and a graceful stop (stop accepting, fail pending acquires
// clearly, store idle sockets in systemd's fd store or close them, flush statistics, STOPPING=1).
//
// The fd store is used at stop only, not while running: an idle socket goes to systemd on SIGTERM (restart, stop) and
// comes back at the next start; a crash or a watchdog kill loses the idle sockets and the new process warms again
// from history. Keeping every idle socket in the store as it goes idle would cover crashes too, but costs PID 1 CPU
// on every handoff and refill, growing with the number of stored fds (systemd 252 compares each new fd with every
// stored one): docs/operations.md has the measurements.

import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, readFileSync, statSync, unlinkSync } from 'node:fs';
import { dirname, resolve as resolvePath } from 'node:path';
import process from 'node:process';
import type { Counter } from 'prom-client';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { type Origin, originKey, parseOriginKey } from '../shared/origin.js';
import {
  type BindRestrictionReport,
  EMBEDDED_UNRESTRICTED,
  registerBindRestrictionMetrics,
} from './bind-restriction.js';
import { DEFAULTS, parseProxyUrl, type SockpoolConfig } from './config.js';
import { ConnectGate } from './connect-gate.js';
import { type ConnectGuardReport, EMBEDDED_UNGUARDED, registerConnectGuardMetrics } from './connect-guard.js';
import { type ConnectedSocket, TcpConnector } from './connector.js';
import { EgressPolicy } from './egress-policy.js';
import type { Fleet } from './fleet/fleet.js';
import { registerFleetMetrics } from './fleet/metrics.js';
import { RateLimiter } from './fleet/rate-limiter.js';
import { LocalSlots, slotKeeper } from './fleet/slots.js';
import { HandoffServer } from './handoff-server.js';
import { hostAddressesProvider, hostAddressReader, IPV6_ROUTE_PATH } from './host-addresses.js';
import { detectKernelTls } from './kernel-tls.js';
import {
  type ClassifiedListenFds,
  classifyListenFds,
  LISTENER_FD_NAME,
  listenFds,
  unixSocketInfo,
} from './listen-fds.js';
import type { Logger } from './log.js';
import { createMetrics, type Metrics, startMetricsServer } from './metrics.js';
import { PoolManager } from './pool-manager.js';
import type { ProxyEndpoint } from './proxy-tunnel.js';
import { FD_LIMIT_RECHECK_MS, FdLimit, idleSocketsFitting, leaseFdBudget } from './quotas.js';
import { EMBEDDED_SCHEDULING, type RealtimeReport, registerRealtimeMetrics } from './realtime.js';
import { Resolver } from './resolver.js';
import {
  connectedAtFromTag,
  connectedAtTag,
  encodeFdName,
  FDS_PER_MESSAGE_MAX,
  fdStoreMax,
  isCongestion,
  isValidFdName,
  Notifier,
  retryWhileCongested,
} from './sd-notify.js';
import { StateStore } from './store.js';
import { registerRelayMetrics, TlsRelays } from './tls-relay.js';
import { TlsSessions } from './tls-sessions.js';

const STATUS_INTERVAL_MS = 2000;
const LISTEN_BACKLOG = 1024;
/**
 * How long the stop path may spend handing idle sockets to systemd (waiting while its notify queue is full). The
 * unit's TimeoutStopSec= is 15 s. PID 1's own work comes after: systemd 252 checks each stored fd against every other,
 * seconds of its CPU for thousands of sockets (docs/operations.md has the measurements).
 */
const FD_STORE_TIMEOUT_MS = 10_000;
/** How long a notification that matters (READY=1, FDSTOREREMOVE=1) is retried while PID 1's queue is full. */
const NOTIFY_TIMEOUT_MS = 5_000;

export interface DaemonOptions {
  config: SockpoolConfig;
  log: Logger;
  /** Re-reads the configuration (file plus flags) for SIGHUP; throws SOCKPOOL_ERR_CONFIG on a bad file. */
  reloadConfig?: () => SockpoolConfig;
  /** What the process entry point did about TCP binds (bind-restriction.ts), for stats and the ready line. */
  bindRestriction?: BindRestrictionReport;
  /** What the sockpoold command's connect guard did (connect-guard.ts); embedded: none. */
  connectGuard?: ConnectGuardReport;
  /** Whether the sockpoold command put the main thread under SCHED_RR (realtime.ts); embedded: not. */
  realtime?: RealtimeReport;
}

/** What a stop left behind. */
export interface StopOutcome {
  /**
   * Relay threads that had not ended when the stop gave up waiting for them (named as in the log), and the state
   * store's thread when its last writing still waited for the disk (StateStore.threadLeft).
   */
  threadsLeft: string[];
}

export class Sockpoold {
  #config: SockpoolConfig;
  #log: Logger;
  #reloadConfig: (() => SockpoolConfig) | undefined;
  #bindRestriction: BindRestrictionReport;
  #connectGuard: ConnectGuardReport;
  /** Sockets this daemon connected, its guard enforced, that the guard does not cover (#noteUncoveredConnect). */
  #uncoveredConnects = 0;
  /** `sockpool_connect_guard_uncovered_connects_total`: the same count, for an alert. */
  #uncoveredConnectsCounter: Counter | undefined;
  #realtime: RealtimeReport;
  /** Whether the kernel refuses the fds clients send (#refuseClientFds); stats and the ready line say it. */
  #clientFds: ClientFdsState = 'accepted';
  /** Whether the closing threads were last seen all stuck with fds waiting (#watchDeferredCloses): said once a time. */
  #deferredClosesStuck = false;
  #notifier = new Notifier();
  #store: StateStore;
  #metrics: Metrics;
  #metricsServer: { port: number; close(): Promise<void> } | undefined;
  #egress: EgressPolicy;
  #hostAddresses: () => readonly string[];
  #resolver: Resolver;
  #proxies: ReadonlyMap<string, ProxyEndpoint>;
  #pools: PoolManager;
  #relays: TlsRelays;
  /** With `fleet.redis`: the fleet's shared limits and demand (fleet/). Without it no Redis code runs. */
  #fleet: Fleet | undefined;
  /** requestsPerSecond/burst: the fleet's (with a fleet) or this daemon's. */
  #rates: RateLimiter;
  #demandTimer: NodeJS.Timeout | undefined;
  #server: HandoffServer | undefined;
  /** The listening fd; we unlink the path at stop only when we bound it ourselves (not socket-activated). */
  #listenFd = -1;
  #boundPath: string | undefined;
  /** Where clients connect: the configured path, or the path of the socket systemd passed. */
  #socketPath: string;
  #adoptedFromFdStore = 0;
  #statusTimer: NodeJS.Timeout | undefined;
  /** The soft RLIMIT_NOFILE the fd budget and the idle pool's size follow, read again by #fdLimitTimer and reload. */
  #fdLimit = new FdLimit();
  #fdLimitTimer: NodeJS.Timeout | undefined;
  #stopped: Promise<StopOutcome> | undefined;

  /** `fleetClass`: the fleet module's class, loaded by start() when the configuration names a Redis. */
  private constructor(options: DaemonOptions, fleetClass: typeof Fleet | undefined) {
    this.#config = options.config;
    this.#log = options.log;
    this.#reloadConfig = options.reloadConfig;
    this.#bindRestriction = options.bindRestriction ?? EMBEDDED_UNRESTRICTED;
    this.#connectGuard = options.connectGuard ?? EMBEDDED_UNGUARDED;
    this.#realtime = options.realtime ?? EMBEDDED_SCHEDULING;
    this.#socketPath = this.#config.socket;
    // One provider of the host's interface addresses for every policy this daemon builds (reloads included); read
    // first, before anything that holds an fd, because it is what fails in a sandbox without AF_NETLINK.
    // A source it cannot read is said once: netlink (the kernel's local routes then come from /proc/net's route
    // files, which list every route: a host with a large routing table reads megabytes at every refresh), or a
    // /proc/net file: for that family only the interfaces that are up and running are refused, or (ipv6_route, read
    // when netlink failed) no IPv6 range routed to the host (daemon/host-addresses.ts), which an operator who hid
    // /proc/net should know.
    const readHostAddresses = hostAddressReader({
      onNetlinkUnavailable: (error) =>
        this.#log.warn(
          { err: error.message },
          "cannot ask the kernel for its local routes through netlink; reading them from /proc/net's route files",
        ),
      onProcUnreadable: (path, error) =>
        this.#log.warn(
          { path, err: error.message },
          path === IPV6_ROUTE_PATH
            ? "cannot read the kernel's IPv6 routes; not refusing the IPv6 ranges routed to this host"
            : "cannot read the kernel's local addresses; refusing only those of interfaces up and running",
        ),
    });
    this.#hostAddresses = hostAddressesProvider(readHostAddresses, undefined, (error) =>
      this.#log.warn({ err: error.message }, 'host interface addresses not refreshed; keeping the last list'),
    );
    // prom-client's process metrics sample the event loop's delay on a 10 ms timer: only worth their wakeups when
    // something can read them (metricsPort is read at start only).
    this.#metrics = createMetrics(() => this.#pools.snapshot(), {
      perOrigin: this.#config.metricsPerOrigin,
      processMetrics: this.#config.metricsPort > 0,
    });
    // Every connect (plain, through a proxy, or under a warm TLS session) passes the global cap on connects in flight.
    const connector = new ConnectGate(
      new TcpConnector(
        () => this.#resolver,
        () => this.#egress,
        {
          metrics: this.#metrics,
          proxies: () => this.#proxies,
          // This daemon's guard, for this daemon's sockets: another daemon embedded in the same process may have none.
          reconnectRefused: this.#connectGuard.state === 'enforced',
          onUncovered: () => this.#noteUncoveredConnect(),
        },
      ),
      () => this.#config.quotas.maxConnectsInFlight,
    );
    // Relay threads start with the first warm TLS session; the TLS files are read now (a bad one stops the start).
    this.#relays = new TlsRelays(this.#config.tls.relayThreads, this.#log.child({ part: 'tls' }), {
      hangLimitMs: () => this.#config.tls.relayHangMs,
      // A hung relay thread's sessions end (tls-relay.ts): the idle ones leave the pools, the lent ones are shut down.
      onHung: (relayThread) => {
        const idle = this.#pools.dropRelayedBy(relayThread);
        const leased = this.#server?.endRelayedBy(relayThread) ?? 0;
        this.#log
          .child({ part: 'tls' })
          .warn({ relayThread, idle, leased }, 'sessions of the hung TLS relay thread ended');
      },
    });
    registerRelayMetrics(this.#metrics.registry, this.#relays);
    const tls = new TlsSessions(this.#config, connector, this.#relays);
    makeDirectory(this.#config.stateDir, 0o750, 'stateDir');
    this.#store = StateStore.open(this.#config.stateDir, {
      // One daemon per state directory: a second on it (with another socket) is refused here, before it binds or
      // warms anything (exit 2, as for a second daemon on the same socket: #bindSocket).
      lockStateDir: true,
      maxOrigins: this.#config.pool.historyMaxOrigins,
      // The history only warms: a corrupt file costs it, not the start (a restart loop under systemd).
      onCorrupt: ({ path, movedTo, err }) =>
        this.#log.warn({ path, movedTo, err }, 'state database corrupt: moved aside; starting with an empty history'),
      // The history only warms: a file that cannot be opened (a full disk, a read-only file, an unopenable -wal)
      // costs it, not the service (exit 2, a configuration refused, is not restarted by the unit).
      onUnavailable: ({ path, sqliteCode, err }) =>
        this.#log.error({ path, sqliteCode, err }, 'state database unavailable: running with a history in memory only'),
      // The history stops being written (its records wait, bounded): the operator learns it, and from what.
      onFlushFailing: ({ path, sqliteCode, err, pending }) =>
        this.#log.warn(
          { path, sqliteCode, err, pending },
          'history not written: flushes of the state database fail (retried at each tick)',
        ),
      // The history's thread died (its commits back on the event loop until another runs): the operator learns it,
      // and whether another was started or waits (one that keeps dying is started at most once per interval).
      onThreadEnded: ({ path, thread, err, restartInMs }) =>
        this.#log.warn(
          { path, thread, err, restartInMs },
          restartInMs === 0
            ? 'state database thread ended: started again'
            : 'state database thread ended: the event loop commits the history until it is started again',
        ),
      onFlushRecovered: ({ path, failures }) =>
        this.#log.info({ path, failures }, 'history written again: a flush of the state database succeeded'),
      // A start that found the history over its cap (a stop writes past it; a lower pool.historyMaxOrigins) ranks what
      // the cap keeps and is ready without waiting for the eviction, which follows in slices: said when it is done.
      onOverCapEvicted: ({ path, overCap }) =>
        this.#log.info(
          { path, overCap, historyMaxOrigins: this.#config.pool.historyMaxOrigins },
          'history evicted down to pool.historyMaxOrigins',
        ),
      // The start goes on with the file as it is; the operator learns why its schema stays old (a backup tool or a
      // sqlite3 shell holding the lock) and that the next start without it migrates.
      onMigrationDeferred: ({ path, version, migration, newest, err }) =>
        this.#log.warn(
          { path, version, migration, newest, err },
          `state database locked by another process: schema migration ${migration} (to version ${newest}) waits for a start without the lock`,
        ),
    });
    this.#store.startAutoFlush(this.#config.pool.statsFlushMs);
    this.#egress = createEgressPolicy(this.#config, this.#hostAddresses);
    this.#resolver = new Resolver(this.#config.dns);
    this.#proxies = proxiesByName(this.#config);
    if (fleetClass && this.#config.fleet.redis !== undefined) {
      this.#fleet = new fleetClass(this.#config.fleet, this.#log.child({ part: 'fleet' }));
    }
    this.#rates = new RateLimiter(this.#config, this.#fleet);
    registerFleetMetrics(this.#metrics.registry, () => this.#fleet, this.#rates);
    registerBindRestrictionMetrics(this.#metrics.registry, this.#bindRestriction);
    this.#uncoveredConnectsCounter = registerConnectGuardMetrics(this.#metrics.registry, this.#connectGuard);
    registerRealtimeMetrics(this.#metrics.registry, this.#realtime);
    this.#pools = new PoolManager({
      config: this.#config,
      connector,
      log: this.#log.child({ part: 'pool' }),
      metrics: this.#metrics,
      store: this.#store,
      tls,
      // A daemon without a fleet is a fleet of one: maxPerOriginFleet bounds its own connections.
      slots: slotKeeper(this.#fleet ?? new LocalSlots()),
      maxIdleTotal: () => idleSocketsFitting(this.#fdLimit.value, this.#config),
    });
    this.#warnIfIdleDoesNotFit();
  }

  static async start(options: DaemonOptions): Promise<Sockpoold> {
    // No close of a socket a client prepared may hold this thread (or a relay thread) for its linger time, not even
    // one the addon could not disarm first (native startCloseWatchdog; it takes SIGURG, as only a daemon may).
    native.startCloseWatchdog();
    // The Redis client (ioredis, with its tracing) is loaded only by a fleet member: a tenth of a plain daemon's
    // start, which a socket-activated daemon's first client waits for.
    const fleetClass = options.config.fleet.redis === undefined ? undefined : (await import('./fleet/fleet.js')).Fleet;
    const daemon = new Sockpoold(options, fleetClass);
    try {
      await daemon.#start();
    } catch (error) {
      await daemon.stop({ storeIdle: false });
      throw error;
    }
    return daemon;
  }

  get socketPath(): string {
    return this.#socketPath;
  }

  get metricsPort(): number | undefined {
    return this.#metricsServer?.port;
  }

  async #start(): Promise<void> {
    // The history's checkpointer thread opens its own connection: ready before the daemon is.
    await this.#store.checkpointerReady();
    // The metrics endpoint is the one part of the start that fails on what another process does (its port taken):
    // bound first, so a start that fails there has accepted no client and asked systemd to forget no stored socket
    // (the next start gets them back).
    if (this.#config.metricsPort > 0) {
      const { metricsPort, metricsHost } = this.#config;
      try {
        this.#metricsServer = await startMetricsServer(this.#metrics, metricsPort, metricsHost);
      } catch (error) {
        throw metricsListenError(error as NodeJS.ErrnoException, metricsHost, metricsPort);
      }
    }
    const passed = classifyListenFds(listenFds());
    if (passed.listener) {
      // systemd owns the socket file (sockpoold.socket: its mode, owner, group, removal): never chmod or unlink it.
      this.#listenFd = passed.listener.fd;
      this.#socketPath = unixSocketInfo(this.#listenFd)?.path || this.#config.socket;
      this.#log.info(
        { fd: this.#listenFd, socket: this.#socketPath },
        'socket-activated: using the listening fd systemd passed',
      );
    } else {
      this.#listenFd = this.#bindSocket();
    }
    this.#clientFds = this.#refuseClientFds(this.#listenFd);
    this.#adoptedFromFdStore = this.#adoptStored(passed);
    const storedNames = storedNamesToForget(passed);
    for (const other of passed.other) native.close(other.fd);

    this.#server = new HandoffServer({
      listenFd: this.#listenFd,
      // Only a listener systemd passed can hold connections made before it refused fds (our own refuses before it
      // listens): each accepted connection is then set as well.
      refuseFdsOnAccept: this.#clientFds === 'refused' && passed.listener !== undefined,
      pools: this.#pools,
      config: () => this.#config,
      log: this.#log.child({ part: 'handoff' }),
      metrics: this.#metrics,
      rates: this.#rates,
      fdLimit: this.#fdLimit,
      onRelayedLease: (relayThread, relaySession, uid) => this.#relays.lent(relayThread, relaySession, uid),
      extraStats: () => ({
        rssBytes: process.memoryUsage.rss(),
        bindRestriction: this.#bindRestriction,
        connectGuard:
          this.#connectGuard.state === 'enforced'
            ? { ...this.#connectGuard, uncoveredConnects: this.#uncoveredConnects }
            : this.#connectGuard,
        realtime: this.#realtime,
        clientFds: this.#clientFds,
        deferredCloses: deferredClosesStats(),
        adoptedFromFdStore: this.#adoptedFromFdStore,
        fdLimit: this.#fdLimit.value,
        maxIdleTotalInForce: idleSocketsFitting(this.#fdLimit.value, this.#config),
        tls: this.#relays.counters(),
        ...(this.#fleet ? { fleet: this.#fleet.snapshot() } : {}),
        rates: this.#rates.counters,
      }),
    });
    const server = this.#server;
    this.#pools.onReclaim = (poolKeys) => server.reclaim(poolKeys);
    const pools = this.#pools;
    if (this.#fleet) this.#fleet.onContended = (key) => pools.reclaimFleetKey(key);
    this.#server.start();
    this.#pools.start();
    this.#fdLimitTimer = setInterval(() => {
      this.#followFdLimit();
      this.#watchDeferredCloses();
    }, FD_LIMIT_RECHECK_MS).unref();
    // Empty the store: systemd's copies of the adopted sockets would keep a connection open after a client closed
    // it, and the dead ones are of no use. One FDSTOREREMOVE=1 per name (it removes every fd with that name).
    await this.#forgetStored(storedNames);
    await this.#fleet?.start();
    let warming = 0;
    try {
      warming = await this.#pools.warmFromHistory(this.#config.pool.warmOnStartOrigins);
    } catch (error) {
      // The history only warms: one that cannot be read (locked in another process's transaction) costs the warming.
      this.#log.warn({ err: (error as Error).message }, 'history unreadable: not warming from it');
    }
    if (this.#fleet) await this.#startSharedWarming(this.#fleet);
    const kernelTls = detectKernelTls();
    this.#log.info(
      {
        socket: this.#socketPath,
        stateDir: this.#config.stateDir,
        warming,
        metricsPort: this.metricsPort,
        kernelTls,
        bindRestriction: this.#bindRestriction.state,
        connectGuard: this.#connectGuard.state,
        realtime: this.#realtime.state,
        clientFds: this.#clientFds,
      },
      'sockpoold ready',
    );
    await this.#notifyReliably('READY=1', () => this.#notifier.ready(this.#statusLine()));
    this.#notifier.startWatchdog();
    // The status line is for systemd alone: with no notify socket the timer would only wake an idle daemon.
    if (this.#notifier.enabled) {
      this.#statusTimer = setInterval(() => {
        try {
          this.#notifier.status(this.#statusLine());
        } catch {
          // A status line lost to a full queue is replaced by the next one.
        }
      }, STATUS_INTERVAL_MS);
      this.#statusTimer.unref();
    }
  }

  /**
   * Shared warming: this daemon's per-origin demand goes to Redis every demandPublishMs; at start it warms the
   * fleet's busiest origins its own policy allows, and with fleet.shareWarming keeps their share of the fleet's
   * demand as a floor of its own prediction.
   */
  async #startSharedWarming(fleet: Fleet): Promise<void> {
    const limit = this.#config.pool.warmOnStartOrigins;
    const share = async (prewarm: boolean) => {
      const demand = await fleet.fleetDemand(limit);
      const members = Math.max(1, fleet.members);
      return this.#pools.shareDemand(
        demand.map((entry) => ({ ...entry, ratePerS: entry.ratePerS / members })),
        prewarm,
      );
    };
    const warmed = await share(true);
    if (warmed > 0) this.#log.info({ origins: warmed }, "fleet: warming the fleet's busiest origins");
    this.#demandTimer = setInterval(() => {
      const origins: Array<{ key: string; host: string; port: number; ratePerS: number }> = [];
      for (const entry of this.#pools.snapshot().origins) {
        if (entry.demandRatePerS <= 0.01) continue;
        try {
          // Plain host:port pools only (warm TLS and proxied pools are the same origins for the fleet).
          const origin = parseOriginKey(entry.origin);
          origins.push({ key: entry.origin, host: origin.host, port: origin.port, ratePerS: entry.demandRatePerS });
        } catch {}
      }
      void fleet.publishDemand(origins);
      if (fleet.config.shareWarming) void share(false);
    }, fleet.config.demandPublishMs);
    this.#demandTimer.unref();
  }

  /**
   * Sockets kept in systemd's fd store across a restart: each must be a live, established TCP connection to an
   * address the current egress policy allows; the others are closed. Returns how many the pools took.
   */
  #adoptStored(passed: ClassifiedListenFds): number {
    let adopted = 0;
    for (const stored of passed.origins) {
      try {
        const peer = native.peerAddress(stored.fd);
        // Checked as if new: the origin's name and port, then the address it is connected to.
        this.#egress.checkTarget(stored.origin.host, stored.origin.port);
        this.#egress.checkAddress(peer.address, peer.port, stored.origin.host);
        // Lent again later like any socket the daemon connected: no connect() of it, ever (connect-guard.ts), where
        // the guard's programs cover it: made in another cgroup (the service's before a restart) they do not, and
        // its release check reads the peer as if no guard were enforced (no ConnectedSocket.reconnectRefused).
        native.guardSocket(stored.fd);
        const now = performance.now();
        // The tag says when it connected: the idle TTL keeps counting from then, not from this restart.
        const connectedEpochMs = connectedAtFromTag(stored.origin.tag);
        const ageMs = connectedEpochMs === null ? 0 : Math.max(0, Date.now() - connectedEpochMs);
        const socket = {
          fd: stored.fd,
          address: peer.address,
          family: peer.family,
          connectedAt: now - ageMs,
          connectMs: 0,
        };
        // adopt() probes the socket (EOF, RST, unexpected bytes, TCP state) and closes it if it is not usable, or if
        // the idle pool has no room for it (maxIdle, the global idle cap).
        if (this.#pools.adopt({ host: stored.origin.host, port: stored.origin.port }, socket)) adopted++;
        else {
          this.#log.info(
            { name: stored.name },
            'stored socket dropped: closed by its peer, not established, or no room in the idle pool',
          );
        }
      } catch (error) {
        native.close(stored.fd);
        this.#log.info({ name: stored.name, err: (error as Error).message }, 'stored socket dropped');
      }
    }
    if (passed.origins.length > 0) {
      this.#log.info({ stored: passed.origins.length, adopted }, 'idle sockets taken back from the fd store');
    }
    return adopted;
  }

  async #forgetStored(names: readonly string[]): Promise<void> {
    if (!this.#notifier.enabled) return;
    for (const name of names) {
      await this.#notifyReliably(`FDSTOREREMOVE=1 ${name}`, () => this.#notifier.removeStoredFds(name));
    }
  }

  /**
   * Sends one notification, retrying while PID 1's queue is full (said once in the log: a stop or reload that
   * seems stuck is waiting for PID 1); a failure is logged, never thrown.
   */
  async #notifyReliably(what: string, send: () => void, timeoutMs = NOTIFY_TIMEOUT_MS): Promise<boolean> {
    let waiting = false;
    const sendOrSayWaiting = (): void => {
      try {
        send();
      } catch (error) {
        if (!waiting && isCongestion(error)) {
          waiting = true;
          this.#log.warn({ notification: what }, 'sd_notify queue full: waiting for room');
        }
        throw error;
      }
    };
    try {
      await retryWhileCongested(sendOrSayWaiting, timeoutMs);
      return true;
    } catch (error) {
      this.#log.error({ err: (error as Error).message, notification: what }, 'sd_notify failed');
      return false;
    }
  }

  /** Binds the handoff socket ourselves (not socket-activated), replacing a stale socket file. */
  #bindSocket(): number {
    const path = this.#config.socket;
    makeDirectory(dirname(path), 0o755, 'socket');
    if (existsSync(path)) {
      if (!lstatSync(path).isSocket()) {
        throw new SockpoolError(ErrorCodes.CONFIG, `${path} exists and is not a socket; refusing to replace it`);
      }
      // A live daemon answers a connect; a stale file from a crash refuses it.
      let live = false;
      try {
        native.close(native.seqpacketConnect(path));
        live = true;
      } catch {}
      if (live) throw new SockpoolError(ErrorCodes.CONFIG, `another sockpoold is listening on ${path}`);
      unlinkSync(path);
    }
    const fd = native.seqpacketListen(path, LISTEN_BACKLOG, !this.#config.access.acceptClientFds);
    this.#boundPath = path;
    const access = this.#config.access;
    chmodSync(path, Number.parseInt(access.socketMode, 8));
    if (access.socketOwner !== undefined || access.socketGroup !== undefined) {
      chownSync(path, resolveId(access.socketOwner, 'user') ?? -1, resolveId(access.socketGroup, 'group') ?? -1);
    }
    return fd;
  }

  /**
   * No protocol message needs a client's fd (the project's clients release without theirs, binary framing 2), and
   * every fd that enters the daemon's table is one its thread may have to close: a socket with a linger, a file on
   * the client's own FUSE mount (whose close waits for that client, for good). So the kernel refuses them at the
   * sender (SO_PASSRIGHTS = 0 on the listener; each connection inherits it; on a listener systemd passed, the
   * handoff server sets it on each accepted connection too, for those systemd queued before this ran). 'unsupported' (before Linux 6.16) and 'accepted'
   * (`access.acceptClientFds`, for clients that still release with their fd): fds arrive and are discarded.
   */
  #refuseClientFds(listenFd: number): ClientFdsState {
    if (this.#config.access.acceptClientFds) return 'accepted';
    if (native.refuseFdPassing(listenFd)) return 'refused';
    this.#log.warn(
      'this kernel cannot refuse the fds clients send (SO_PASSRIGHTS, Linux 6.16): the daemon takes them and discards them',
    );
    return 'unsupported';
  }

  /**
   * A socket this daemon connected with its guard enforced that the guard does not cover: the daemon was moved out of
   * the cgroup the guard attached to at start. Its release check reads its peer (connector.ts), but the guard's state
   * still says `enforced`: stats count such connects, and the first is warned of.
   */
  #noteUncoveredConnect(): void {
    this.#uncoveredConnectsCounter?.inc();
    if (this.#uncoveredConnects++ === 0) {
      this.#log.warn(
        { connectGuard: this.#connectGuard.state },
        'a socket connected now is not covered by the connect guard (the daemon moved out of the cgroup it attached to?): lent copies of such sockets can connect elsewhere until their lease ends',
      );
    }
  }

  /**
   * Where client fds come in, a file's close may be held for good by the client serving it (a FUSE mount): each such
   * close holds a closing thread of the addon's, and once all those a uid's close may take are held
   * (native.deferredCloses: the rest are the daemon's own) the fds queued behind them stay open, filling the daemon's
   * fd table. Warned once each time it comes to that; stats show it.
   */
  #watchDeferredCloses(): void {
    const closes = native.deferredCloses();
    const stuck = closes.stuckThreads >= closes.maxStuckThreadsOfUids && closes.queued > 0;
    if (stuck && !this.#deferredClosesStuck) {
      this.#log.warn(
        { stuckThreads: closes.stuckThreads, queued: closes.queued },
        "every closing thread a client's fds may take is held in a close of a client's file (a FUSE mount that never answers?): the fds queued behind them stay open",
      );
    }
    this.#deferredClosesStuck = stuck;
  }

  #statusLine(): string {
    const snapshot = this.#pools.snapshot();
    const hitRate = `${(snapshot.hitRate * 100).toFixed(1)}%`;
    return (
      `idle ${snapshot.idle}, leased ${snapshot.leased}, origins ${snapshot.originCount}, ` +
      `hit rate ${hitRate}, clients ${this.#server?.clientCount ?? 0}`
    );
  }

  /**
   * Reads RLIMIT_NOFILE again (a `prlimit --pid` on the running daemon): the fd budget and the idle pool's size are
   * reckoned from it when next asked (each acquire, connection and sweep), so a lower limit refuses uids sooner and
   * closes idle sockets past the new size at the next sweep; what uids already hold past their new share stays until
   * they end it. Said in the log with the new numbers. Returns whether it changed.
   */
  #followFdLimit(): boolean {
    const was = this.#fdLimit.value;
    if (!this.#fdLimit.refresh()) return false;
    const fdLimit = this.#fdLimit.value;
    this.#log.info(
      {
        was,
        fdLimit,
        leaseFdBudget: leaseFdBudget(fdLimit, this.#config),
        maxIdleTotalInForce: idleSocketsFitting(fdLimit, this.#config),
      },
      'RLIMIT_NOFILE changed: the fd budget and the idle pool follow it',
    );
    this.#warnIfIdleDoesNotFit();
    return true;
  }

  /**
   * Says so when pool.maxIdleTotal is more than the fd table has room for (idleSocketsFitting), with the numbers: a
   * warning when the operator chose that many or none fit; the default trimmed to a table that still holds some is
   * the daemon sizing itself (a hand-started daemon under a shell's limit), told at info level.
   */
  #warnIfIdleDoesNotFit(): void {
    const fdLimit = this.#fdLimit.value;
    const fitting = idleSocketsFitting(fdLimit, this.#config);
    if (fitting >= this.#config.pool.maxIdleTotal) return;
    const chosen = this.#config.pool.maxIdleTotal !== DEFAULTS.pool.maxIdleTotal;
    (chosen || fitting === 0 ? this.#log.warn : this.#log.info).call(
      this.#log,
      {
        fdLimit,
        maxIdleTotal: this.#config.pool.maxIdleTotal,
        maxIdleTotalInForce: fitting,
        maxConnectsInFlight: this.#config.quotas.maxConnectsInFlight,
      },
      `pool.maxIdleTotal needs more fds than RLIMIT_NOFILE leaves: at most ${fitting} idle sockets are kept`,
    );
  }

  /**
   * SIGHUP: new policy, limits, DNS overrides, TLS files and history settings; warm sockets and leases stay. Whatever
   * can fail (the file, the policy, the TLS files) is done before anything is swapped in: a refused reload keeps the
   * previous configuration whole. Ignored once the daemon is stopping. Keys read only at start (START_ONLY_KEYS)
   * keep their value, with a warning when the file changed them.
   */
  reload(): void {
    if (!this.#reloadConfig) return;
    if (this.#stopped) {
      this.#log.info('reload ignored: sockpoold is stopping');
      return;
    }
    // Retried while PID 1's queue is full, as READY=1 is, and READY=1 only after it: under Type=notify-reload
    // systemd waits for RELOADING=1 (sent once, a full queue dropped it and the reload job hung until its timeout),
    // and a READY=1 overtaking it would end no reload it knew of. (Sent at once when there is room: before the work.)
    const reloading = this.#notifyReliably('RELOADING=1', () => this.#notifier.reloading());
    try {
      const loaded = this.#reloadConfig();
      const config = withStartOnlyKeys(loaded, this.#config);
      // Everything that can fail, before anything changes.
      const egress = createEgressPolicy(config, this.#hostAddresses);
      // A `dns` section left as it was keeps the resolver: its cache, the lookups under way (which the per-uid lookup
      // charges wait for) and the failure marks; a new one would send every host to DNS again after each SIGHUP.
      const resolver = dnsKey(config) === dnsKey(this.#config) ? this.#resolver : new Resolver(config.dns);
      const proxies = proxiesByName(config);
      const prepared = this.#pools.prepare(config);
      const startOnly = changedStartOnlyKeys(this.#config, loaded);
      // From here nothing throws: the new configuration goes in whole.
      this.#egress = egress;
      this.#resolver = resolver;
      this.#proxies = proxies;
      this.#config = config;
      const refused = this.#pools.reconfigure(prepared);
      // A uid or gid access.allowUids/allowGids no longer let in loses the sessions it has open.
      const revokedSessions = this.#server?.revokeAccess() ?? 0;
      this.#rates.configure(config);
      this.#store.configure({ maxOrigins: config.pool.historyMaxOrigins, flushMs: config.pool.statsFlushMs });
      // (A new pool.maxIdleTotal or maxConnectsInFlight is checked against the table as a changed limit is.)
      if (!this.#followFdLimit()) this.#warnIfIdleDoesNotFit();
      if (startOnly.length > 0) {
        this.#log.warn({ keys: startOnly }, 'changed settings that take effect at the next start, not on reload');
      }
      this.#log.info({ idleClosedByPolicy: refused, revokedSessions }, 'configuration reloaded');
    } catch (error) {
      this.#log.error({ err: (error as Error).message }, 'reload failed; keeping the previous configuration');
    }
    void reloading.then(() =>
      this.#notifyReliably('READY=1 after reload', () => this.#notifier.ready(this.#statusLine())),
    );
  }

  /**
   * Graceful stop. `storeIdle` hands idle sockets to systemd's fd store when NOTIFY_SOCKET is set. Resolves with the
   * relay threads that did not end (see daemon/tls-relay.ts): the stop finished without them, and whoever runs the
   * process must end it without joining threads (daemon/command.ts).
   */
  stop(options: { storeIdle: boolean } = { storeIdle: true }): Promise<StopOutcome> {
    this.#stopped ??= this.#stop(options.storeIdle);
    return this.#stopped;
  }

  async #stop(storeIdle: boolean): Promise<StopOutcome> {
    let stored = 0;
    let idle = 0;
    let threadsLeft: string[];
    try {
      await this.#notifyReliably('STOPPING=1', () => this.#notifier.stopping('stopping: storing idle sockets'), 1000);
      this.#notifier.stopWatchdog();
      if (this.#statusTimer) clearInterval(this.#statusTimer);
      clearInterval(this.#fdLimitTimer);
      this.#server?.stopAccepting();
      const canStore = storeIdle && this.#notifier.enabled;
      const demandByOrigin = new Map(
        this.#pools.snapshot().origins.map((origin) => [origin.origin, origin.demandRatePerS] as const),
      );
      // Pending acquires fail with SOCKPOOL_ERR_SHUTTING_DOWN here; their replies go out while the store is filled.
      const detached = this.#pools.close(canStore);
      // So do requests waiting for an origin's rate tokens (acquires before they reach a pool, and `tokens`).
      this.#rates.close(new SockpoolError(ErrorCodes.SHUTTING_DOWN, 'sockpoold is stopping'));
      idle = detached.length;
      stored = await this.#storeIdle(detached, demandByOrigin);
      // Let the SHUTTING_DOWN replies of pending acquires go out before the clients are disconnected.
      await new Promise((resolve) => setImmediate(resolve));
      this.#server?.disconnectAll();
      if (this.#listenFd >= 0) native.close(this.#listenFd);
      if (this.#boundPath) {
        try {
          unlinkSync(this.#boundPath);
        } catch {}
      }
      clearInterval(this.#demandTimer);
      await this.#fleet?.close();
      await this.#metricsServer?.close();
    } finally {
      // Whatever failed above (the stop then rejects: daemon/command.ts logs it and ends the process), the relay
      // threads are asked to end and the history is written: what the daemon learned is not lost with a failed step.
      // Warm TLS sessions end with their threads (process memory: nothing of them survives a restart).
      // Bounded: a thread that does not end is named in the log and left for the process's exit.
      threadsLeft = await this.#relays.close();
      try {
        // Bounded (CLOSE_BUDGET_MS), so that the stop ends before systemd's SIGKILL, whatever the disk does: what is
        // left is dropped.
        const dropped = this.#store.close();
        if (dropped > 0) this.#log.warn({ dropped }, 'history: origins not written at stop (out of time)');
      } catch (error) {
        // Closed all the same; what was recorded since the last flush is lost (the file locked, a full disk).
        this.#log.warn({ err: (error as Error).message }, 'history not written at stop');
      }
      // Its thread still waiting for the disk (a sync past the budget): left as a relay thread is, for the process's
      // exit not to join it (the WAL recovers what it was writing at the next start).
      const storeThread = this.#store.threadLeft;
      if (storeThread) threadsLeft = [...threadsLeft, storeThread];
    }
    this.#log.info(threadsLeft.length > 0 ? { stored, idle, threadsLeft } : { stored, idle }, 'sockpoold stopped');
    this.#notifier.close();
    return { threadsLeft };
  }

  /**
   * Hands idle sockets to systemd's fd store (FDSTORE=1), named by origin and the second they connected, as many fds
   * per message as the kernel allows. The most valuable go first (origins by demand, then the newest sockets): past
   * FileDescriptorStoreMax= systemd closes the rest. The kernel duplicates the fds into the message; ours are closed
   * here, stored or not. Returns how many were sent.
   */
  async #storeIdle(
    detached: ReadonlyArray<{ origin: Origin; socket: ConnectedSocket }>,
    demandByOrigin: ReadonlyMap<string, number>,
  ): Promise<number> {
    const groups = new Map<string, { name: string; demand: number; connectedAt: number; fds: number[] }>();
    const nowEpochMs = Date.now();
    const now = performance.now();
    for (const { origin, socket } of detached) {
      if (origin.proxy) {
        // An FDNAME names only host and port: a proxied socket would come back as a direct one. Closed.
        native.close(socket.fd);
        continue;
      }
      const connectedEpochMs = nowEpochMs - (now - socket.connectedAt);
      let name: string;
      try {
        name = encodeFdName(origin, connectedAtTag(connectedEpochMs));
      } catch (error) {
        // A host name too long for an FDNAME: that socket is closed.
        this.#log.warn({ err: (error as Error).message }, 'idle socket not storable');
        native.close(socket.fd);
        continue;
      }
      const group = groups.get(name);
      if (group) group.fds.push(socket.fd);
      else {
        const demand = demandByOrigin.get(originKey(origin)) ?? 0;
        groups.set(name, { name, demand, connectedAt: connectedEpochMs, fds: [socket.fd] });
      }
    }
    const ordered = [...groups.values()].sort((a, b) => b.demand - a.demand || b.connectedAt - a.connectedAt);
    // systemd >= 254 says how many it will take; 252 does not, and closes the surplus itself.
    let room = fdStoreMax() ?? Number.POSITIVE_INFINITY;
    const deadline = performance.now() + FD_STORE_TIMEOUT_MS;
    let stored = 0;
    let failed = false; // past the deadline, or the notify socket is gone: the rest are closed
    for (const { name, fds } of ordered) {
      for (let start = 0; start < fds.length && room > 0 && !failed; start += FDS_PER_MESSAGE_MAX) {
        const batch = fds.slice(start, start + Math.min(FDS_PER_MESSAGE_MAX, room));
        room -= batch.length;
        // EAGAIN means the message was not queued at all: retrying it cannot store a socket twice.
        const sent = await this.#notifyReliably(
          `FDSTORE=1 ${name}`,
          () => this.#notifier.storeFds(name, batch),
          Math.max(0, deadline - performance.now()),
        );
        if (sent) stored += batch.length;
        else failed = true;
      }
      for (const fd of fds) native.close(fd);
    }
    return stored;
  }
}

/**
 * The names to remove from the fd store after a start: every stored origin name (adopted or dropped), and any other
 * name systemd passed that is not the handoff socket's (left by an older version; "unknown" means no names at all).
 */
function storedNamesToForget(passed: ClassifiedListenFds): string[] {
  const names = new Set<string>();
  for (const stored of passed.origins) names.add(stored.name);
  for (const other of passed.other) {
    if (other.name !== LISTENER_FD_NAME && other.name !== 'unknown' && isValidFdName(other.name)) names.add(other.name);
  }
  return [...names];
}

/** A user or group given by number or by name (looked up in /etc/passwd or /etc/group). */
function resolveId(value: string | number | undefined, kind: 'user' | 'group'): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value === 'number') return value;
  if (/^\d+$/.test(value)) return Number(value);
  const table = kind === 'user' ? '/etc/passwd' : '/etc/group';
  for (const line of readFileSync(table, 'utf8').split('\n')) {
    const [name, , id] = line.split(':');
    if (name === value && id !== undefined && /^\d+$/.test(id)) return Number(id);
  }
  throw new SockpoolError(
    ErrorCodes.CONFIG,
    `access.socket${kind === 'user' ? 'Owner' : 'Group'}: no ${kind} named ${JSON.stringify(value)} in ${table}`,
  );
}

/**
 * Keys read only when the daemon starts (a reload keeps the running value): the handoff socket and its file's mode
 * and owner, the state directory, the log level (the loggers are made at start), the metrics endpoint, the bind
 * restriction (applied once by the entry point), the number of relay threads, how many origins and sockets to warm
 * at start, and the fleet. docs/config.md lists them too.
 */
/** See Sockpoold #refuseClientFds. */
export type ClientFdsState = 'refused' | 'unsupported' | 'accepted';

const START_ONLY_KEYS: ReadonlyArray<readonly string[]> = [
  ['socket'],
  ['stateDir'],
  ['logLevel'],
  ['metricsPort'],
  ['metricsHost'],
  ['metricsPerOrigin'],
  ['restrictBind'],
  ['connectGuard'],
  ['realtimePriority'],
  ['access', 'socketMode'],
  ['access', 'socketOwner'],
  ['access', 'socketGroup'],
  ['access', 'acceptClientFds'],
  ['tls', 'relayThreads'],
  ['pool', 'warmOnStartOrigins'],
  ['pool', 'warmOnStartSockets'],
  ['fleet'],
];

/** A reloaded configuration with the running values of the start-only keys (what is in force): the objects on
 *  each key's path are copied, not shared with either configuration. */
function withStartOnlyKeys(loaded: SockpoolConfig, running: SockpoolConfig): SockpoolConfig {
  const config = { ...loaded } as Record<string, unknown>;
  for (const path of START_ONLY_KEYS) {
    let into = config;
    let from = running as unknown as Record<string, unknown>;
    for (const key of path.slice(0, -1)) {
      into[key] = { ...(into[key] as Record<string, unknown>) };
      into = into[key] as Record<string, unknown>;
      from = from[key] as Record<string, unknown>;
    }
    const leaf = path.at(-1)!;
    into[leaf] = from[leaf];
  }
  return config as unknown as SockpoolConfig;
}

/** The `dns` section as text: equal for sections that make the same resolver. */
function dnsKey(config: SockpoolConfig): string {
  const { dns } = config;
  const text = (entry: { text: string }) => entry.text;
  return JSON.stringify({ ...dns, servers: dns.servers.map(text), resolve: dns.resolve.map(text) });
}

/** The start-only keys whose value differs between the running configuration and a reloaded one. */
function changedStartOnlyKeys(running: SockpoolConfig, loaded: SockpoolConfig): string[] {
  const at = (config: SockpoolConfig, path: readonly string[]) =>
    JSON.stringify(path.reduce<unknown>((value, key) => (value as Record<string, unknown> | undefined)?.[key], config));
  return START_ONLY_KEYS.filter((path) => at(running, path) !== at(loaded, path)).map((path) =>
    path.length === 1 && path[0] === 'fleet' ? 'fleet.*' : path.join('.'),
  );
}

/**
 * mkdir -p of a directory the configuration names. Its failure (a file in the way, no permission) is a
 * SOCKPOOL_ERR_CONFIG naming the key, as the state database's is: node's own error named neither the key nor a code
 * of ours ("sockpoold: EEXIST: EEXIST: file already exists, mkdir '…'").
 */
function makeDirectory(path: string, mode: number, key: string): void {
  try {
    mkdirParents(path, mode);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? 'EIO';
    throw new SockpoolError(
      ErrorCodes.CONFIG,
      `${key}: cannot create the directory ${path} (${code})`,
      { key, path },
      { cause: error },
    );
  }
}

/**
 * mkdir -p, one level at a time. Node's own recursive mkdirSync loops for ever, synchronously (no signal handler
 * runs), when mkdir answers ENOENT although the parent exists, as a pseudo-filesystem does (`/proc/nope`).
 */
function mkdirParents(path: string, mode: number): void {
  const absolute = resolvePath(path);
  const parent = dirname(absolute);
  try {
    mkdirSync(absolute, { mode });
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' && statSync(absolute).isDirectory()) return;
    if (code !== 'ENOENT' || parent === absolute || existsSync(parent)) throw error;
    mkdirParents(parent, mode);
    mkdirSync(absolute, { mode });
  }
}

/** The configured proxies by name (a client names one; only the configuration says where it is). */
function proxiesByName(config: SockpoolConfig): ReadonlyMap<string, ProxyEndpoint> {
  // (Each url was validated with the configuration: parseProxyUrl cannot fail here.)
  return new Map(config.proxies.map(({ name, url }) => [name, { name, ...parseProxyUrl(url)! }] as const));
}

function createEgressPolicy(config: SockpoolConfig, hostAddresses: () => readonly string[]): EgressPolicy {
  return new EgressPolicy({ ...config.egress, hostAddresses });
}

/**
 * Why the metrics endpoint could not listen, naming the keys: an address this host does not have (EADDRNOTAVAIL) or
 * may not bind (EACCES) is the operator's to fix, SOCKPOOL_ERR_CONFIG (exit 2: the unit does not restart on it); a
 * port taken (EADDRINUSE) may be freed by whoever holds it, so it keeps its own code (exit 1: restarted).
 */
function metricsListenError(error: NodeJS.ErrnoException, host: string, port: number): Error {
  const where = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  if (error.code === 'EADDRNOTAVAIL' || error.code === 'EACCES') {
    return new SockpoolError(
      ErrorCodes.CONFIG,
      `metricsHost/metricsPort: cannot listen on ${where} (${error.code}: ${
        error.code === 'EACCES' ? 'not allowed to bind it' : 'not an address of this host'
      })`,
      { key: 'metricsHost', host, port },
      { cause: error },
    );
  }
  if (error.code === 'EADDRINUSE') {
    return Object.assign(
      new Error(`metricsPort: ${where} is in use by another process (EADDRINUSE)`, { cause: error }),
      { code: 'EADDRINUSE' },
    );
  }
  return error;
}

/** stats' `deferredCloses`: the fds the addon's closing threads have yet to close, and those threads held in one. */
function deferredClosesStats(): { queued: number; stuckThreads: number } {
  const { queued, stuckThreads } = native.deferredCloses();
  return { queued, stuckThreads };
}
