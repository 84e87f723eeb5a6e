// One connect: resolve the origin, keep only the addresses the egress policy allows, try them in the resolver's
// order until one connects, then check the address actually connected to once more (no rebinding gap) and apply
// the origin's socket options. This is the only place in sockpool where a TCP socket is created.
//
// fd ownership: connectTcp's fd belongs to this function until it resolves; on any failure it is closed here.
// On success it passes to the caller (the origin pool).

import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { connectTarget, type Origin } from '../shared/origin.js';
import type { OriginPolicy } from './config.js';
import type { EgressPolicy } from './egress-policy.js';
import type { Resolver } from './resolver.js';
import { connectTcp } from './tcp-connect.js';
import type { TlsSessionInfo } from './tls-relay.js';

export interface ConnectedSocket {
  fd: number;
  address: string;
  family: 4 | 6;
  /** performance.now() when the connect completed. */
  connectedAt: number;
  connectMs: number;
  /** Set for a warm TLS session: the fd is the daemon's end of a relay's socketpair (tls-sessions.ts). */
  tls?: TlsSessionInfo | undefined;
}

export interface Connector {
  connect(origin: Origin, policy: OriginPolicy): Promise<ConnectedSocket>;
  /** Throws SOCKPOOL_ERR_POLICY when the egress policy refuses the origin before any lookup. */
  checkTarget(origin: Origin): void;
  /**
   * Throws SOCKPOOL_ERR_POLICY when the current policy would not connect `origin` to `address` now: for sockets the
   * daemon already holds (idle after a reload, taken back from the fd store), checked as if new.
   */
  checkHeld(origin: Origin, address: string): void;
}

export class TcpConnector implements Connector {
  #resolver: () => Resolver;
  #egress: () => EgressPolicy;

  /** Getters, so that a SIGHUP reload takes effect on the next connect. */
  constructor(resolver: () => Resolver, egress: () => EgressPolicy) {
    this.#resolver = resolver;
    this.#egress = egress;
  }

  /** The origin (host patterns, port) and, when proxied, the proxy too: both must be allowed. */
  checkTarget(origin: Origin): void {
    const egress = this.#egress();
    egress.checkTarget(origin.host, origin.port);
    if (origin.proxy) egress.checkTarget(origin.proxy.host, origin.proxy.port);
  }

  checkHeld(origin: Origin, address: string): void {
    this.checkTarget(origin);
    const target = connectTarget(origin);
    this.#egress().checkAddress(address, target.port, target.host);
  }

  async connect(origin: Origin, policy: OriginPolicy): Promise<ConnectedSocket> {
    const egress = this.#egress();
    const resolver = this.#resolver();
    this.checkTarget(origin);
    // A proxied origin's socket goes to the proxy: that is the address the policy checks (the proxy resolves the
    // origin itself).
    const target = connectTarget(origin);
    const addresses = await resolver.resolve(target.host, target.port);
    let lastError: Error | undefined;
    let refusal: Error | undefined;
    for (const candidate of addresses) {
      try {
        egress.checkAddress(candidate.address, target.port, target.host);
      } catch (error) {
        refusal ??= error as Error;
        continue;
      }
      const started = performance.now();
      let fd: number;
      try {
        fd = await connectTcp(candidate.address, target.port, {
          timeoutMs: policy.connectTimeoutMs,
          sourceAddress: policy.sourceAddress,
          mark: policy.mark,
          device: policy.device,
          noDelay: policy.noDelay,
          keepAlive: policy.keepAlive,
          userTimeoutMs: policy.userTimeoutMs,
        });
      } catch (error) {
        resolver.reportFailure(target.host, candidate.address);
        lastError = error as Error;
        continue;
      }
      // From here the fd is ours: close it on every path that does not return it.
      try {
        const peer = native.peerAddress(fd);
        egress.checkAddress(peer.address, peer.port, target.host);
        resolver.reportSuccess(target.host, candidate.address);
        const connectedAt = performance.now();
        return { fd, address: peer.address, family: peer.family, connectedAt, connectMs: connectedAt - started };
      } catch (error) {
        native.close(fd);
        throw error;
      }
    }
    if (refusal && !lastError) throw refusal;
    const reason = lastError as (Error & { code?: string }) | undefined;
    throw new SockpoolError(
      ErrorCodes.CONNECT,
      `cannot connect to ${target.host}:${target.port}${origin.proxy ? ` (proxy for ${origin.host}:${origin.port})` : ''}: ` +
        `${reason?.message ?? 'no usable address'}`,
      { host: origin.host, port: origin.port },
      { cause: reason },
    );
  }
}
