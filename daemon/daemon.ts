// sockpoold's life cycle: start (state, policy, listener, fd-store sockets back, warm from history, READY=1),
// reload on SIGHUP without dropping warm sockets, and a graceful stop (stop accepting, fail pending acquires
// clearly, store idle sockets in systemd's fd store or close them, flush statistics, STOPPING=1).

import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import type { SockpoolConfig } from '../shared/config.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { TcpConnector } from './connector.js';
import { EgressPolicy } from './egress-policy.js';
import { HandoffServer } from './handoff-server.js';
import { classifyListenFds, listenFds } from './listen-fds.js';
import type { Logger } from './log.js';
import { createMetrics, type Metrics, startMetricsServer } from './metrics.js';
import { PoolManager } from './pool-manager.js';
import { Resolver } from './resolver.js';
import { encodeFdName, Notifier } from './sd-notify.js';
import { StateStore } from './store.js';

const STATUS_INTERVAL_MS = 2000;
const LISTEN_BACKLOG = 1024;

export interface DaemonOptions {
  config: SockpoolConfig;
  log: Logger;
  /** Re-reads the configuration (file plus flags) for SIGHUP; throws SOCKPOOL_ERR_CONFIG on a bad file. */
  reloadConfig?: () => SockpoolConfig;
}

export class Sockpoold {
  #config: SockpoolConfig;
  #log: Logger;
  #reloadConfig: (() => SockpoolConfig) | undefined;
  #notifier = new Notifier();
  #store: StateStore;
  #metrics: Metrics;
  #metricsServer: { port: number; close(): Promise<void> } | undefined;
  #egress: EgressPolicy;
  #resolver: Resolver;
  #pools: PoolManager;
  #server: HandoffServer | undefined;
  /** The listening fd; we unlink the path at stop only when we bound it ourselves (not socket-activated). */
  #listenFd = -1;
  #boundPath: string | undefined;
  #statusTimer: NodeJS.Timeout | undefined;
  #stopped: Promise<void> | undefined;

  private constructor(options: DaemonOptions) {
    this.#config = options.config;
    this.#log = options.log;
    this.#reloadConfig = options.reloadConfig;
    mkdirSync(this.#config.stateDir, { recursive: true, mode: 0o750 });
    this.#store = StateStore.open(this.#config.stateDir);
    this.#store.startAutoFlush(this.#config.pool.statsFlushMs);
    this.#metrics = createMetrics(() => this.#pools.snapshot());
    this.#egress = new EgressPolicy(this.#config.egress);
    this.#resolver = createResolver(this.#config);
    this.#pools = new PoolManager({
      config: this.#config,
      connector: new TcpConnector(
        () => this.#resolver,
        () => this.#egress,
      ),
      log: this.#log.child({ part: 'pool' }),
      metrics: this.#metrics,
      store: this.#store,
    });
  }

  static async start(options: DaemonOptions): Promise<Sockpoold> {
    const daemon = new Sockpoold(options);
    try {
      await daemon.#start();
    } catch (error) {
      await daemon.stop({ storeIdle: false });
      throw error;
    }
    return daemon;
  }

  get socketPath(): string {
    return this.#config.socket;
  }

  get metricsPort(): number | undefined {
    return this.#metricsServer?.port;
  }

  async #start(): Promise<void> {
    const passed = classifyListenFds(listenFds());
    for (const other of passed.other) native.close(other.fd);
    if (passed.listener) {
      this.#listenFd = passed.listener.fd;
      this.#log.info({ fd: this.#listenFd }, 'socket-activated: using the listening fd systemd passed');
    } else {
      this.#listenFd = this.#bindSocket();
    }
    // Sockets kept in systemd's fd store across a restart: probe, adopt the live ones, then empty the store so
    // systemd's copies do not keep connections open behind the clients' backs.
    let adopted = 0;
    const storedNames = new Set<string>();
    for (const stored of passed.origins) {
      storedNames.add(stored.name);
      try {
        const peer = native.peerAddress(stored.fd);
        this.#egress.checkAddress(peer.address, peer.port, stored.origin.host);
        const now = performance.now();
        const socket = { fd: stored.fd, address: peer.address, family: peer.family, connectedAt: now, connectMs: 0 };
        if (this.#pools.adopt(stored.origin, socket)) adopted++;
      } catch (error) {
        native.close(stored.fd);
        this.#log.info({ name: stored.name, err: (error as Error).message }, 'stored socket dropped');
      }
    }
    for (const name of storedNames) this.#notifier.removeStoredFds(name);
    if (passed.origins.length > 0) {
      this.#log.info({ stored: passed.origins.length, adopted }, 'idle sockets taken back from the fd store');
    }

    this.#server = new HandoffServer({
      listenFd: this.#listenFd,
      pools: this.#pools,
      config: () => this.#config,
      log: this.#log.child({ part: 'handoff' }),
      metrics: this.#metrics,
      extraStats: () => ({ rssBytes: process.memoryUsage.rss(), adoptedFromFdStore: adopted }),
    });
    this.#server.start();
    this.#pools.start();
    if (this.#config.metricsPort > 0) {
      this.#metricsServer = await startMetricsServer(this.#metrics, this.#config.metricsPort, this.#config.metricsHost);
    }
    const warming = this.#pools.warmFromHistory(this.#config.pool.warmOnStartOrigins);
    this.#log.info(
      { socket: this.#config.socket, stateDir: this.#config.stateDir, warming, metricsPort: this.metricsPort },
      'sockpoold ready',
    );
    this.#notifier.ready(this.#statusLine());
    this.#notifier.startWatchdog();
    this.#statusTimer = setInterval(() => this.#notifier.status(this.#statusLine()), STATUS_INTERVAL_MS);
    this.#statusTimer.unref();
  }

  /** Binds the handoff socket ourselves (not socket-activated), replacing a stale socket file. */
  #bindSocket(): number {
    const path = this.#config.socket;
    mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
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
    const fd = native.seqpacketListen(path, LISTEN_BACKLOG);
    this.#boundPath = path;
    const access = this.#config.access;
    chmodSync(path, Number.parseInt(access.socketMode, 8));
    if (access.socketOwner !== undefined || access.socketGroup !== undefined) {
      chownSync(path, resolveId(access.socketOwner, 'user') ?? -1, resolveId(access.socketGroup, 'group') ?? -1);
    }
    return fd;
  }

  #statusLine(): string {
    const snapshot = this.#pools.snapshot();
    const hitRate = `${(snapshot.hitRate * 100).toFixed(1)}%`;
    return (
      `idle ${snapshot.idle}, leased ${snapshot.leased}, origins ${snapshot.origins.length}, ` +
      `hit rate ${hitRate}, clients ${this.#server?.clientCount ?? 0}`
    );
  }

  stats(): Record<string, unknown> {
    return this.#pools.snapshot();
  }

  /** SIGHUP: new policy, limits and DNS overrides; warm sockets and leases stay. A bad file keeps the old config. */
  reload(): void {
    if (!this.#reloadConfig) return;
    this.#notifier.reloading();
    try {
      const config = this.#reloadConfig();
      // Build both first so a bad value leaves the old ones in place.
      const egress = new EgressPolicy(config.egress);
      const resolver = createResolver(config);
      this.#egress = egress;
      this.#resolver = resolver;
      this.#config = { ...config, socket: this.#config.socket, stateDir: this.#config.stateDir };
      this.#pools.reconfigure(this.#config);
      this.#log.info('configuration reloaded');
    } catch (error) {
      this.#log.error({ err: (error as Error).message }, 'reload failed; keeping the previous configuration');
    }
    this.#notifier.ready(this.#statusLine());
  }

  /** Graceful stop. `storeIdle` hands idle sockets to systemd's fd store when NOTIFY_SOCKET is set. */
  stop(options: { storeIdle: boolean } = { storeIdle: true }): Promise<void> {
    this.#stopped ??= this.#stop(options.storeIdle);
    return this.#stopped;
  }

  async #stop(storeIdle: boolean): Promise<void> {
    this.#notifier.stopping('stopping: storing idle sockets');
    this.#notifier.stopWatchdog();
    if (this.#statusTimer) clearInterval(this.#statusTimer);
    this.#server?.stopAccepting();
    const canStore = storeIdle && this.#notifier.enabled;
    const detached = this.#pools.close(canStore);
    let stored = 0;
    for (const { origin, socket } of detached) {
      try {
        // systemd keeps its own copy; ours is closed right after.
        this.#notifier.storeFds(encodeFdName(origin), [socket.fd]);
        stored++;
      } catch (error) {
        this.#log.warn({ err: (error as Error).message }, 'fd store refused a socket');
      }
      native.close(socket.fd);
    }
    // Let the SHUTTING_DOWN replies of pending acquires go out before the clients are disconnected.
    await new Promise((resolve) => setImmediate(resolve));
    this.#server?.disconnectAll();
    if (this.#listenFd >= 0) native.close(this.#listenFd);
    if (this.#boundPath) {
      try {
        unlinkSync(this.#boundPath);
      } catch {}
    }
    await this.#metricsServer?.close();
    this.#store.close();
    this.#log.info({ stored }, 'sockpoold stopped');
    this.#notifier.close();
  }
}

function resolveId(value: string | number | undefined, kind: 'user' | 'group'): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value === 'number') return value;
  if (/^\d+$/.test(value)) return Number(value);
  throw new SockpoolError(ErrorCodes.CONFIG, `access.socket${kind === 'user' ? 'Owner' : 'Group'}: use a numeric id`);
}

/** The configuration's `dns` section in the resolver's terms (`resolve` entries are curl-style overrides). */
function createResolver(config: SockpoolConfig): Resolver {
  const { resolve, ...dns } = config.dns;
  return new Resolver({ ...dns, overrides: resolve });
}
