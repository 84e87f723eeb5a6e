// An origin is where a pool's connections go: a host name (or literal address) and a TCP port.
// Keys are canonical strings so that one origin has exactly one pool: lower-case host, IPv6 in brackets.

import { isIPv6 } from 'node:net';

export interface Origin {
  host: string;
  port: number;
}

/** Canonical host: lower case, no brackets around IPv6 literals, no trailing dot. */
export function canonicalHost(host: string): string {
  let result = host.trim().toLowerCase();
  if (result.startsWith('[') && result.endsWith(']')) result = result.slice(1, -1);
  if (result.endsWith('.') && result.length > 1) result = result.slice(0, -1);
  return result;
}

export function originKey(origin: Origin): string {
  const host = canonicalHost(origin.host);
  return isIPv6(host) ? `[${host}]:${origin.port}` : `${host}:${origin.port}`;
}

/** Parses `host:port` or `[v6]:port`. Throws TypeError on anything else. */
export function parseOriginKey(key: string): Origin {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(key.trim());
  if (!match) throw new TypeError(`not an origin (host:port): ${JSON.stringify(key)}`);
  const port = Number(match[3]);
  if (port < 1 || port > 65535) throw new TypeError(`port out of range in ${JSON.stringify(key)}`);
  return { host: canonicalHost(match[1] ?? match[2] ?? ''), port };
}

/** The origin a URL's connection goes to, with the scheme's default port. */
export function originOfUrl(url: URL): Origin {
  const defaultPort = url.protocol === 'https:' ? 443 : 80;
  return { host: canonicalHost(url.hostname), port: url.port ? Number(url.port) : defaultPort };
}
