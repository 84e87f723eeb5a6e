// One connect: resolve the origin, race its addresses with Happy Eyeballs (RFC 8305, daemon/happy-eyeballs.ts),
// each address checked by the egress policy in force right before its attempt (a reload mid-race included), and
// the winner's peer address checked once more after it (no rebinding gap). This is the only place in sockpool where
// a TCP socket is created.
//
// Per host and port it remembers which family won (daemon/learned-families.ts), so later connects start with what
// works, in the share of that table of the uid the connect is for (as the resolver's failure marks); per origin it keeps a budget of attempts racing at once, shared by all connects to that origin.
//
// fd ownership: an attempt's fd belongs to connectTcp until it resolves, then to this attempt until the race takes
// it. The winner's fd passes to the caller (the origin pool); every other attempt is cancelled (connectTcp closes
// its fd), and a loser that completed anyway goes to `discard`, which closes it.
//
// A proxied origin names a proxy of the configuration: its name is checked against the policy (host patterns,
// port: the proxy resolves it, so its addresses are the proxy's business), the sockets race to the proxy (whose
// addresses the policy checks like any other), and the winner's CONNECT tunnel is opened here
// (daemon/proxy-tunnel.ts); the fd stays ours until the tunnel stands, closed here if it does not.

import { canonicalHost } from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { type Endpoint, type Origin, originKey } from '../shared/origin.js';
import type { OriginPolicy } from './config.js';
import type { EgressPolicy } from './egress-policy.js';
import { DAEMON_UID } from './fair-queue.js';
import {
  AttemptBudget,
  type Candidate,
  type Family,
  HappyEyeballsRace,
  type RaceClock,
  type RaceResult,
  realClock,
} from './happy-eyeballs.js';
import { LearnedFamilies, type LearnedFamily } from './learned-families.js';
import type { Metrics } from './metrics.js';
import { openTunnel, type ProxyEndpoint } from './proxy-tunnel.js';
import type { ResolvedAddress, Resolver } from './resolver.js';
import { connectTcp } from './tcp-connect.js';
import type { TlsSessionInfo } from './tls-relay.js';

export interface ConnectedSocket {
  fd: number;
  address: string;
  family: 4 | 6;
  /** performance.now() when the connect completed. */
  connectedAt: number;
  /**
   * performance.now() when the connect began, when that matters (a warm TLS session: before its TCP connect, so
   * that a reload during its handshake counts as one before it); undefined: connectedAt.
   */
  startedAt?: number | undefined;
  connectMs: number;
  /** Set for a warm TLS session: the fd is one end of a loopback connection a relay thread joins to the TLS connection (tls-sessions.ts). */
  tls?: TlsSessionInfo | undefined;
  /** A warm TLS session's credentials: what it was verified against and presented (TlsSessions.credentialsOf). */
  tlsCredentials?: string | undefined;
  /** A warm TLS session's relay thread (its threadId): its sessions end if the thread hangs (tls-relay.ts). */
  relayThread?: number | undefined;
  /** A warm TLS session's id in its relay thread: the handoff server names it as it lends it (TlsRelays.lent). */
  relaySession?: number | undefined;
  /** The peer's port: the origin's, or the proxy's for a tunnel (undefined: the origin's). */
  port?: number | undefined;
  /**
   * Set by the connector only: the peer in the words native.tcpInfo writes with `withPeer`, from the getpeername
   * its policy check judged. Its presence also says that the socket was made here and no copy of it has left this
   * process (a lease is rebuilt without it; the fd store's and a relay's sockets never get it): nobody else could
   * have connected it elsewhere since that read, so the pool's mark takes its peer from here instead of a second
   * getpeername (lease-guard's markOf), and nobody else could have set SO_LINGER on it, so the pool's close of it
   * needs no linger disarm (origin-pool's closePooled).
   */
  connectedPeer?: readonly number[] | undefined;
  /**
   * Set by the connector of a daemon whose connect guard is enforced (TcpConnectorOptions.reconnectRefused), for a
   * socket the guard's program saw connect (native.guardCovers): the kernel refuses any connect() of it after the
   * daemon's own, so a lease's release check trusts it and
   * reads no peer (lease-guard's UsageMark.reconnectRefused). The socket's, not the process's: another daemon of the
   * same process may have no guard.
   */
  reconnectRefused?: boolean | undefined;
}

/**
 * The ConnectedSocket fields of `socket`, which may carry more (the pool's, a handoff's): a new object, built field
 * by field. The pool makes one per warm handoff and one per socket going idle; an object spread or rest there (V8's
 * generic property copying) cost more than the rest of the pool's work.
 */
export function connectedPart(socket: ConnectedSocket): ConnectedSocket {
  return {
    fd: socket.fd,
    address: socket.address,
    family: socket.family,
    connectedAt: socket.connectedAt,
    startedAt: socket.startedAt,
    connectMs: socket.connectMs,
    tls: socket.tls,
    tlsCredentials: socket.tlsCredentials,
    relayThread: socket.relayThread,
    relaySession: socket.relaySession,
    port: socket.port,
    connectedPeer: socket.connectedPeer,
    reconnectRefused: socket.reconnectRefused,
  };
}

export interface Connector {
  /**
   * `urgent()`: whether an acquire waits for the origin's sockets now (a prewarm's connect becomes urgent when a
   * client comes to wait): where work queues, urgent connects may go first.
   * `wanted()`: whether the connect is still needed; one that waits its turn (ConnectGate, a warm TLS handshake
   * in TlsRelays) and is no longer wanted when its turn comes is abandoned (ConnectAbandoned) instead of looking
   * up, connecting or handshaking for nobody.
   * `uid`: the client uid the connect is for (an acquire's, a prewarm's; undefined: the daemon's own refill), so
   * that connects waiting their turn take it fairly across uids (ConnectGate, TlsRelays).
   */
  connect(
    origin: Origin,
    policy: OriginPolicy,
    urgent?: () => boolean,
    wanted?: () => boolean,
    uid?: number,
  ): Promise<ConnectedSocket>;
  /** Throws SOCKPOOL_ERR_POLICY when the egress policy refuses the origin before any lookup. */
  checkTarget(origin: Origin): void;
  /**
   * Throws SOCKPOOL_ERR_POLICY when the current policy would not connect `origin` to `address` now: for sockets the
   * daemon already holds (idle after a reload, taken back from the fd store), checked as if new.
   */
  checkHeld(origin: Origin, address: string): void;
  /**
   * Whether a socket this connector made no longer fits the configuration in force (a warm TLS session verified
   * against, or presenting, files a reload changed since): it is neither pooled nor handed out.
   */
  stale?(origin: Origin, socket: ConnectedSocket): boolean;
  /** What Happy Eyeballs learned about the host this origin connects to (for stats). */
  learnedFamily?(origin: Origin): LearnedFamily | undefined;
  /** The DNS query for `host` in flight now, if any (the per-uid lookup quota holds its charge until it ends). */
  lookupInFlight?(host: string): Promise<unknown> | undefined;
}

export interface TcpConnectorOptions {
  metrics?: Metrics | undefined;
  clock?: RaceClock;
  learned?: LearnedFamilies;
  /** The configured proxies by name (a getter: a reload takes effect on the next connect). */
  proxies?: () => ReadonlyMap<string, ProxyEndpoint>;
  /**
   * This daemon's connect guard is enforced: the sockets it connects say so where the guard covers them
   * (ConnectedSocket.reconnectRefused).
   */
  reconnectRefused?: boolean;
  /**
   * With `reconnectRefused`: a socket connected here that the guard does not cover (the daemon was moved out of the
   * cgroup the guard attached to), so that the daemon can say so: its stats would read `enforced` all the same.
   */
  onUncovered?: () => void;
}

export class TcpConnector implements Connector {
  readonly #resolver: () => Resolver;
  readonly #egress: () => EgressPolicy;
  readonly #metrics: Metrics | undefined;
  readonly #clock: RaceClock;
  readonly #learned: LearnedFamilies;
  readonly #proxies: () => ReadonlyMap<string, ProxyEndpoint>;
  readonly #reconnectRefused: boolean;
  readonly #onUncovered: (() => void) | undefined;
  /** Origin key → its attempt budget and the connects using it; dropped with the last connect. */
  readonly #budgets = new Map<string, { budget: AttemptBudget; connects: number }>();

  /** Getters, so that a SIGHUP reload takes effect on the next connect. */
  constructor(resolver: () => Resolver, egress: () => EgressPolicy, options: TcpConnectorOptions = {}) {
    this.#resolver = resolver;
    this.#egress = egress;
    this.#metrics = options.metrics;
    this.#clock = options.clock ?? realClock;
    this.#learned = options.learned ?? new LearnedFamilies();
    this.#proxies = options.proxies ?? (() => new Map());
    this.#reconnectRefused = options.reconnectRefused ?? false;
    this.#onUncovered = options.onUncovered;
  }

  /** Whether the guard covers `fd`, where this daemon's guard is enforced (one bpf() call); false elsewhere. */
  #covered(fd: number): boolean {
    if (!this.#reconnectRefused) return false;
    if (native.guardCovers(fd)) return true;
    this.#onUncovered?.();
    return false;
  }

  /** The origin (host patterns, port) and, when proxied, the configured proxy too: both must be allowed. */
  checkTarget(origin: Origin): void {
    const egress = this.#egress();
    egress.checkTarget(origin.host, origin.port, origin.proxy !== undefined);
    const proxy = this.#proxyOf(origin);
    if (proxy) egress.checkTarget(proxy.host, proxy.port);
  }

  checkHeld(origin: Origin, address: string): void {
    this.checkTarget(origin);
    const target = this.#targetOf(origin);
    this.#egress().checkAddress(address, target.port, target.host);
  }

  lookupInFlight(host: string): Promise<unknown> | undefined {
    return this.#resolver().lookupInFlight(host);
  }

  learnedFamily(origin: Origin): LearnedFamily | undefined {
    try {
      return this.#learned.describe(learnedKey(this.#targetOf(origin)));
    } catch {
      return undefined; // a proxy no longer configured
    }
  }

  /** The configured proxy an origin names; SOCKPOOL_ERR_INVALID_ARGUMENT for a name the configuration lacks. */
  #proxyOf(origin: Origin): ProxyEndpoint | undefined {
    if (origin.proxy === undefined) return undefined;
    const proxy = this.#proxies().get(origin.proxy);
    if (!proxy) {
      throw new SockpoolError(
        ErrorCodes.INVALID_ARGUMENT,
        `no proxy named ${JSON.stringify(origin.proxy)} in the daemon's configuration (proxies)`,
        { proxy: origin.proxy },
      );
    }
    return proxy;
  }

  /** Where the socket of an origin connects: its proxy when it has one. */
  #targetOf(origin: Origin): Endpoint {
    return this.#proxyOf(origin) ?? origin;
  }

  async connect(
    origin: Origin,
    policy: OriginPolicy,
    _urgent?: () => boolean,
    _wanted?: () => boolean,
    uid = DAEMON_UID,
  ): Promise<ConnectedSocket> {
    const egress = this.#egress();
    const resolver = this.#resolver();
    this.checkTarget(origin);
    // A proxied origin's socket goes to the proxy: that is the address the policy checks (the proxy resolves the
    // origin itself).
    const proxy = this.#proxyOf(origin);
    const target: Endpoint = proxy ?? origin;
    const resolving = resolver.resolve(target.host, target.port, uid);
    // A query to the DNS servers in flight: each family joins the race as soon as its own answer is in. Otherwise
    // (literal, override, cached, system resolver) both families are there at once.
    const early = resolver.answersInFlight(target.host, target.port);
    let addresses: ResolvedAddress[] | undefined;
    if (early) {
      resolving.catch(() => {}); // its DNS error is taken below, when no family had an address
    } else {
      addresses = await resolving;
    }
    // The resolver's order already puts addresses that failed lately last; a learned family goes before it.
    // Before any answer: IPv6 first (RFC 8305 §3).
    const defaultFamily: Family = addresses?.[0]?.family ?? 6;
    const preferFamily: Family = this.#learned.preferred(learnedKey(target)) ?? defaultFamily;

    // Each address is judged by the egress policy in force when it is about to be connected to (and its peer when
    // it connected): a reload during the lookup or the race must not let the policy of before reach an address the
    // new one refuses. (The winner is judged once more after the race, #judgedAfterReload.)
    const judge = (address: string, port: number): void => {
      const now = this.#egress();
      if (now !== egress) {
        now.checkTarget(origin.host, origin.port, proxy !== undefined);
        if (proxy) now.checkTarget(proxy.host, proxy.port);
      }
      now.checkAddress(address, port, target.host);
    };

    const key = originKey(origin);
    const budget = this.#takeBudget(key, policy.maxRacingAttempts);
    const count = (family: Family, outcome: string) => this.#metrics?.connectAttempts.inc({ family, outcome });
    let result: RaceResult<ConnectedSocket>;
    try {
      result = await new Promise<RaceResult<ConnectedSocket>>((resolve) => {
        const race = new HappyEyeballsRace<ConnectedSocket>({
          clock: this.#clock,
          preferFamily,
          attemptDelayMs: policy.connectAttemptDelayMs,
          budget,
          check: (candidate) => {
            try {
              judge(candidate.address, target.port);
            } catch (error) {
              count(candidate.family, 'refused');
              throw error;
            }
          },
          attempt: (candidate, settle) =>
            this.#attempt(candidate, { port: target.port, host: target.host, policy, judge, resolver, uid }, settle),
          discard: (socket) => {
            count(socket.family, 'cancelled');
            native.close(socket.fd);
          },
          onDone: resolve,
        });
        const families = [preferFamily, preferFamily === 6 ? 4 : 6] as const;
        if (addresses) {
          for (const family of families) {
            race.answer(
              family,
              addresses.filter((candidate) => candidate.family === family),
            );
          }
        } else if (early) {
          for (const family of families) {
            early[family].then(
              (list) => race.answer(family, list),
              (error: Error) => race.answer(family, error),
            );
          }
        }
      });
    } finally {
      this.#returnBudget(key);
    }

    if (result.answered[4] > 0 && result.answered[6] > 0) {
      this.#learned.record(learnedKey(target), result.families, defaultFamily, uid);
    }
    if (result.ok) {
      count(result.candidate.family, 'won');
      resolver.reportSuccess(target.host, target.port, result.candidate.address);
      if (!proxy) return this.#judgedAfterReload(origin, policy, result.value, egress, proxy, uid);
      // Through a proxy, the socket is of use only once the tunnel to the origin stands. Ours until it is.
      const socket = result.value;
      try {
        await openTunnel(socket.fd, origin.host, origin.port, proxy, policy.connectTimeoutMs);
      } catch (error) {
        native.close(socket.fd);
        throw error;
      }
      const connectedAt = performance.now();
      const tunnel = { ...socket, connectedAt, connectMs: socket.connectMs + (connectedAt - socket.connectedAt) };
      return this.#judgedAfterReload(origin, policy, tunnel, egress, proxy, uid);
    }
    // No family had an address: the resolution failed, and resolve() says how (SOCKPOOL_ERR_DNS).
    if (result.failures.length === 0 && result.refusals.length === 0) await resolving;
    const connectFailures = result.failures.filter(({ error }) => !isRefusal(error));
    const refusals = [...result.refusals, ...result.failures.filter(({ error }) => isRefusal(error))];
    if (refusals.length > 0 && connectFailures.length === 0) throw everyAddressRefused(target, refusals);
    const reason = connectFailures.at(-1)?.error as (Error & { code?: string }) | undefined;
    // The last failure is the cause; the addresses the policy skipped are named too: "refused by 203.0.113.5" alone
    // hides that the name's other address was never tried, and why.
    const tried = connectFailures.length;
    const skipped = refusals.map(({ candidate, error }) => {
      const why = (error as { reason?: unknown }).reason;
      return typeof why === 'string' ? `${candidate.address} (${why})` : candidate.address;
    });
    const summary =
      skipped.length > 0
        ? ` (${tried} tried; ${skipped.length} refused by the egress policy: ${skipped.slice(0, 4).join(', ')}${skipped.length > 4 ? ', ...' : ''})`
        : tried > 1
          ? ` (${tried} addresses tried)`
          : '';
    throw new SockpoolError(
      ErrorCodes.CONNECT,
      `cannot connect to ${target.host}:${target.port}${proxy ? ` (proxy ${proxy.name} for ${origin.host}:${origin.port})` : ''}: ` +
        `${reason?.message ?? 'no usable address'}${summary}`,
      { host: origin.host, port: origin.port, tried, refused: skipped.length },
      { cause: reason },
    );
  }

  /**
   * A connect that a reload (SIGHUP) overtook: it began under the egress policy and proxies of before. Its socket
   * is judged by the configuration now in force, as the idle sockets were at the reload (pool-manager.ts): a
   * tunnel through a proxy that moved or went is closed and the connect starts over; a socket the policy now
   * refuses is closed with SOCKPOOL_ERR_POLICY. (The socket is ours until returned.)
   */
  #judgedAfterReload(
    origin: Origin,
    policy: OriginPolicy,
    socket: ConnectedSocket,
    egress: EgressPolicy,
    proxy: ProxyEndpoint | undefined,
    uid: number,
  ): ConnectedSocket | Promise<ConnectedSocket> {
    const proxies = this.#proxies();
    const current = origin.proxy === undefined ? undefined : proxies.get(origin.proxy);
    const proxyMoved = proxy !== undefined && (current?.host !== proxy.host || current.port !== proxy.port);
    if (this.#egress() === egress && !proxyMoved) return socket;
    if (proxyMoved) {
      native.close(socket.fd);
      return this.connect(origin, policy, undefined, undefined, uid);
    }
    try {
      this.checkHeld(origin, socket.address);
    } catch (error) {
      native.close(socket.fd);
      throw error;
    }
    return socket;
  }

  /** One attempt: connect, then check the peer the kernel connected to. Returns the canceller. */
  #attempt(
    candidate: Candidate,
    context: {
      port: number;
      host: string;
      policy: OriginPolicy;
      judge: (address: string, port: number) => void;
      resolver: Resolver;
      /** Whose connect this is: what it teaches (failure marks) is that uid's share of the tables. */
      uid: number;
    },
    settle: (error: Error | undefined, socket?: ConnectedSocket) => void,
  ): () => void {
    const { port, host, policy, judge, resolver, uid } = context;
    const controller = new AbortController();
    const started = performance.now();
    connectTcp(candidate.address, port, {
      timeoutMs: policy.connectTimeoutMs,
      sourceAddress: policy.sourceAddress,
      mark: policy.mark,
      device: policy.device,
      noDelay: policy.noDelay,
      keepAlive: policy.keepAlive,
      userTimeoutMs: policy.userTimeoutMs,
      signal: controller.signal,
    }).then(
      (fd) => {
        // The fd is this attempt's until settle() hands it to the race (which keeps or discards it).
        let socket: ConnectedSocket;
        try {
          // What the kernel says the socket is connected to is what the policy judges (never the address we asked
          // for: see the header); the same read, as words, is the peer of the socket's first mark (connectedPeer).
          const peer = native.peerAddress(fd, peerWords);
          judge(peer.address, peer.port);
          const connectedAt = performance.now();
          socket = {
            fd,
            address: peer.address,
            family: peer.family,
            port: peer.port,
            connectedAt,
            connectMs: connectedAt - started,
            connectedPeer: [peerWords[0]!, peerWords[1]!, peerWords[2]!, peerWords[3]!],
            // Only where the guard's program saw this connect: a daemon moved to another cgroup since its guard
            // started makes sockets the guard does not cover (one bpf() call per connect, none per handoff).
            reconnectRefused: this.#covered(fd),
          };
        } catch (error) {
          native.close(fd);
          this.#metrics?.connectAttempts.inc({ family: candidate.family, outcome: 'refused' });
          settle(error as Error);
          return;
        }
        settle(undefined, socket);
      },
      (error: Error) => {
        if (controller.signal.aborted) {
          this.#metrics?.connectAttempts.inc({ family: candidate.family, outcome: 'cancelled' });
        } else {
          this.#metrics?.connectAttempts.inc({ family: candidate.family, outcome: 'failed' });
          resolver.reportFailure(host, port, candidate.address, uid);
        }
        settle(error);
      },
    );
    return () => controller.abort();
  }

  #takeBudget(key: string, limit: number): AttemptBudget {
    let entry = this.#budgets.get(key);
    if (!entry) {
      entry = { budget: new AttemptBudget(limit), connects: 0 };
      this.#budgets.set(key, entry);
    } else {
      entry.budget.setLimit(limit);
    }
    entry.connects++;
    return entry.budget;
  }

  #returnBudget(key: string): void {
    const entry = this.#budgets.get(key);
    if (entry && --entry.connects === 0) this.#budgets.delete(key);
  }
}

/**
 * What a race teaches is kept per host and port: a port the host serves over one family only (a client may pick any
 * port the policy allows) must not steer the connects of every other port of the host to that family.
 */
function learnedKey(target: Endpoint): string {
  return `${canonicalHost(target.host)} ${target.port}`;
}

/** Where peerAddress writes an attempt's peer words (copied out at once: one array for every attempt). */
const peerWords = new Float64Array(native.PEER_WORDS);

function isRefusal(error: Error): boolean {
  return (error as { code?: string }).code === ErrorCodes.POLICY;
}

/** Refusals an every-address refusal lists in its `addresses` field. */
const LISTED_REFUSALS = 16;

/**
 * The error when the egress policy refused every address of a name: one SOCKPOOL_ERR_POLICY naming each distinct
 * reason with an address it was given for and how many more (the first refusal alone named one class, whatever the
 * others' were: a name of a metadata and many private addresses said "metadata"). Bounded: one entry per reason,
 * and the reasons are the policy's few. `reason` stays the first refusal's (what a client branching on it read
 * before); `reasons` names them all, `refused` counts the addresses, and `addresses` lists the first of each reason
 * and then the others, at most LISTED_REFUSALS. One address refused, or the host itself refused (a reload during the
 * race: a refusal that names no address), is that refusal as it was.
 */
function everyAddressRefused(target: Endpoint, refusals: Array<{ candidate: Candidate; error: Error }>): Error {
  const host = refusals.find(({ error }) => (error as { address?: unknown }).address === undefined);
  if (refusals.length === 1 || host) return (host ?? refusals[0]!).error;
  const byReason = new Map<string, { first: string; more: number }>();
  const entries = refusals.map(({ candidate, error }) => {
    const why = (error as { reason?: unknown }).reason;
    const reason = typeof why === 'string' ? why : 'refused';
    const seen = byReason.get(reason);
    if (seen) seen.more++;
    else byReason.set(reason, { first: candidate.address, more: 0 });
    return { address: candidate.address, reason, first: !seen };
  });
  const named = [...byReason].map(
    ([reason, { first, more }]) => `${first}${more > 0 ? ` and ${more} more` : ''} (${reason})`,
  );
  const listed = [...entries.filter((entry) => entry.first), ...entries.filter((entry) => !entry.first)]
    .slice(0, LISTED_REFUSALS)
    .map(({ address, reason }) => `${address} (${reason})`);
  const first = refusals[0]!.error as { reason?: string };
  return new SockpoolError(
    ErrorCodes.POLICY,
    `egress to ${target.host} port ${target.port} refused: all ${refusals.length} addresses refused: ${named.join(', ')}`,
    {
      host: target.host,
      port: target.port,
      reason: first.reason,
      reasons: [...byReason.keys()].join(','),
      refused: refusals.length,
      addresses: listed.join(', '),
    },
  );
}
