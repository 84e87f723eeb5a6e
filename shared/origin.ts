// An origin is where a pool's connections go: a host name (or literal address) and a TCP port, and the name of the
// forward proxy in between when requests go through one (a proxy of the daemon's configuration: the daemon opens
// the CONNECT tunnel, the pool holds tunnels to the origin, still per origin so a crawler's per-origin limits
// hold). One origin has exactly one key, however it is spelled: hosts are canonical (shared/address.ts: lower
// case, punycode, no trailing dot, IP literals in one form), IPv6 in brackets, ` via NAME` when proxied. The
// client keys its sockets with these and the daemon keys its pools, stats and history with them again, from
// whatever a client sent.

import { canonicalHost } from './address.js';
import { ErrorCodes, SockpoolError } from './errors.js';

export interface Endpoint {
  host: string;
  port: number;
}

export interface Origin extends Endpoint {
  /** The name of a proxy in the daemon's configuration (`[[proxies]]`) the connection is tunnelled through. */
  proxy?: string | undefined;
}

/** What a proxy's name may look like (the daemon's configuration and the protocol both check it). */
export const PROXY_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

function canonicalEndpoint(endpoint: Endpoint): Endpoint {
  const { port } = endpoint;
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `port must be 1 to 65535, got ${port}`, { port });
  }
  return { host: canonicalHost(endpoint.host), port };
}

/** The origin with its canonical host. Throws SOCKPOOL_ERR_INVALID_ARGUMENT for a host or port that is none. */
export function canonicalOrigin(origin: Origin): Origin {
  const { host, port } = canonicalEndpoint(origin);
  return origin.proxy ? { host, port, proxy: origin.proxy } : { host, port };
}

function endpointKey(endpoint: Endpoint): string {
  const host = canonicalHost(endpoint.host);
  return host.includes(':') ? `[${host}]:${endpoint.port}` : `${host}:${endpoint.port}`;
}

/**
 * The origin originKey() keyed last, and its key: the daemon keys every acquire, mostly of the origin before, and the
 * same string goes on, its hash computed once for the Maps it keys. (Before the first, a NaN port: equal to none, so
 * no origin, a bad one included, matches it.)
 */
const lastKeyed: Origin & { key: string } = { host: '', port: Number.NaN, proxy: undefined, key: '' };

/** The key of an origin in any spelling. Throws SOCKPOOL_ERR_INVALID_ARGUMENT for a host that is none. */
export function originKey(origin: Origin): string {
  const { host, port, proxy } = origin;
  if (host === lastKeyed.host && port === lastKeyed.port && proxy === lastKeyed.proxy) return lastKeyed.key;
  const key = proxy ? `${endpointKey(origin)} via ${proxy}` : endpointKey(origin);
  lastKeyed.host = host;
  lastKeyed.port = port;
  lastKeyed.proxy = proxy;
  lastKeyed.key = key;
  return key;
}

/** A warm TLS pool's key (daemon/tls-sessions.ts): its origin's, with ` tls` after it. */
export function tlsPoolKey(key: string): string {
  return `${key} tls`;
}

/** Whether `key` is a warm TLS pool's. TLS is never relayed through a proxy (TlsSessions.relays), so a key naming one is a
 *  proxied origin's, also when its proxy is named `tls` (`host:443 via tls` ends as a TLS pool's key does). */
export function isTlsPoolKey(key: string): boolean {
  return key.endsWith(' tls') && !key.includes(' via ');
}

/**
 * The origin a pool's key names: an originKey() (`host:port` or `[v6]:port`, either with ` via NAME`, a proxied
 * origin's), or a warm TLS pool's (tlsPoolKey). Throws SOCKPOOL_ERR_INVALID_ARGUMENT.
 */
export function originOfKey(poolKey: string): Origin {
  const key = isTlsPoolKey(poolKey) ? poolKey.slice(0, -' tls'.length) : poolKey;
  const via = key.indexOf(' via ');
  if (via < 0) return parseOriginKey(key);
  return { ...parseOriginKey(key.slice(0, via)), proxy: key.slice(via + ' via '.length) };
}

/** Parses `host:port` or `[v6]:port` into a canonical origin. Throws SOCKPOOL_ERR_INVALID_ARGUMENT. */
export function parseOriginKey(key: string): Origin {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(key.trim());
  if (!match) {
    throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `not an origin (host:port): ${JSON.stringify(key)}`, {
      input: key,
    });
  }
  const host = match[1] !== undefined ? `[${match[1]}]` : (match[2] ?? '');
  return canonicalEndpoint({ host, port: Number(match[3]) });
}
