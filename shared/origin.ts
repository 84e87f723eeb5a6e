// An origin is where a pool's connections go: a host name (or literal address) and a TCP port, and the name of the
// forward proxy in between when requests go through one (a proxy of the daemon's configuration: the daemon opens
// the CONNECT tunnel, the pool holds tunnels to the origin, still per origin so a crawler's per-origin limits
// hold). Keys are canonical strings so that one origin has exactly one pool: lower-case host, IPv6 in brackets,
// ` via NAME` when proxied.

import { isIPv6 } from 'node:net';

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
  return origin.proxy ? `${endpointKey(origin)} via ${origin.proxy}` : endpointKey(origin);
}

/** Parses `host:port` or `[v6]:port`. Throws TypeError on anything else. */
export function parseOriginKey(key: string): Origin {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(key.trim());
  if (!match) throw new TypeError(`not an origin (host:port): ${JSON.stringify(key)}`);
  const port = Number(match[3]);
  if (port < 1 || port > 65535) throw new TypeError(`port out of range in ${JSON.stringify(key)}`);
  return { host: canonicalHost(match[1] ?? match[2] ?? ''), port };
}
