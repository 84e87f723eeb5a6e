// An origin is where a pool's connections go: a host name (or literal address) and a TCP port, and the forward
// proxy in between when requests go through one (then the sockets connect to the proxy; the pool is still per
// origin, so a crawler's per-origin limits hold). Keys are canonical strings so that one origin has exactly one
// pool: lower-case host, IPv6 in brackets, ` via proxy:port` when proxied.

import { isIPv6 } from 'node:net';

export interface Endpoint {
  host: string;
  port: number;
}

export interface Origin extends Endpoint {
  /** The forward proxy the connection goes to (HTTP CONNECT or plain proxying is curl's business). */
  proxy?: Endpoint | undefined;
}

/** Canonical host: lower case, no brackets around IPv6 literals, no trailing dot. */
export function canonicalHost(host: string): string {
  let result = host.trim().toLowerCase();
  if (result.startsWith('[') && result.endsWith(']')) result = result.slice(1, -1);
  if (result.endsWith('.') && result.length > 1) result = result.slice(0, -1);
  return result;
}

function endpointKey(endpoint: Endpoint): string {
  const host = canonicalHost(endpoint.host);
  // (Only a host with a colon can be an IPv6 literal: most keys skip isIPv6's costly pattern.)
  return host.includes(':') && isIPv6(host) ? `[${host}]:${endpoint.port}` : `${host}:${endpoint.port}`;
}

export function originKey(origin: Origin): string {
  return origin.proxy ? `${endpointKey(origin)} via ${endpointKey(origin.proxy)}` : endpointKey(origin);
}

/** Where the socket of an origin actually connects: its proxy when it has one. */
export function connectTarget(origin: Origin): Endpoint {
  return origin.proxy ?? origin;
}

/** Parses `host:port` or `[v6]:port`. Throws TypeError on anything else. */
export function parseOriginKey(key: string): Origin {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(key.trim());
  if (!match) throw new TypeError(`not an origin (host:port): ${JSON.stringify(key)}`);
  const port = Number(match[3]);
  if (port < 1 || port > 65535) throw new TypeError(`port out of range in ${JSON.stringify(key)}`);
  return { host: canonicalHost(match[1] ?? match[2] ?? ''), port };
}
