// A request's URL, parsed once. WHATWG URL parsing costs microseconds, about as much as a whole keep-alive request
// spends in curl's own code, and keep-alive loads repeat the same URLs: parsed targets are kept, by the exact input
// string, for the next request (the client validates with it, the engine picks its origin with it).
//
// The cache is a RecentMap (../shared/recent-map.ts): two whole generations, never a Map whose oldest entry is deleted
// for each new one. Most callers' URLs are unique (a crawler's, an API's with ids in them); with that Map (1,024 URLs,
// the oldest deleted first) a caller with unique URLs kept megabytes alive past every young-generation GC, V8 grew
// its young generation to 64 MB, and the caller's thread paused for 10-40 ms per scavenge, where plain node-libcurl
// pauses for under 1 ms.

import { canonicalHost } from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { type Origin, originKey } from '../shared/origin.js';
import { RecentMap } from '../shared/recent-map.js';

export interface UrlTarget {
  /** The URL as WHATWG URL serializes it: what curl is given. */
  readonly href: string;
  /** 'http:' or 'https:' or whatever else was given (validation rejects the rest). */
  readonly protocol: string;
  /** The host as the URL has it (an IPv6 literal in brackets). */
  readonly hostname: string;
  /** Canonical host and port (the scheme's default when none is given): the pool the connection comes from. */
  readonly origin: Readonly<Origin>;
  /** originKey(origin): the origin's key when no proxy is in between. */
  readonly key: string;
  readonly secure: boolean;
  /** The URL carries a user name or password. */
  readonly credentials: boolean;
  /**
   * https only: the same resource as an http URL with the port written out, for curl speaking plaintext over a
   * warm TLS session the daemon relays; and the authority (`Host`, `:authority`) the https URL gives.
   */
  readonly plainHref: string | undefined;
  readonly authority: string;
}

/** Distinct URLs per generation: the last GENERATION URLs are always kept, at most twice as many. */
export const GENERATION = 512;
/** Longer URLs are parsed every time rather than kept (the cache stays a few megabytes at most). */
const MAX_CACHED_LENGTH = 2048;
const cache = new RecentMap<string, UrlTarget>(GENERATION);

/**
 * The parsed target of `input`; throws TypeError (as `new URL` does) for a string that is not a URL, and
 * SOCKPOOL_ERR_INVALID_ARGUMENT for a URL whose host is no host name (`a!b.example`) or has an IPv6 zone id, or
 * whose port is 0 (WHATWG URL takes it; no connection can be made to it, and the daemon refuses an acquire for it as
 * a bad message: enough of them close the thread's link, ending its leases).
 */
export function urlTarget(input: string): UrlTarget {
  const cached = cache.get(input);
  if (cached) return cached;
  const url = new URL(input);
  const secure = url.protocol === 'https:';
  if (url.port === '0') {
    throw new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `${url.href}: port 0 cannot be connected to`, {
      url: url.href,
    });
  }
  const origin = Object.freeze({
    host: canonicalHost(url.hostname),
    port: url.port ? Number(url.port) : secure ? 443 : 80,
  });
  const target: UrlTarget = Object.freeze({
    href: url.href,
    protocol: url.protocol,
    hostname: url.hostname,
    origin,
    key: originKey(origin),
    secure,
    credentials: url.username !== '' || url.password !== '',
    plainHref: secure ? plainHrefOf(url, origin.port) : undefined,
    authority: url.host,
  });
  if (input.length <= MAX_CACHED_LENGTH) cache.set(input, target);
  return target;
}

function plainHrefOf(url: URL, port: number): string {
  const userinfo = url.username !== '' || url.password !== '' ? `${url.username}:${url.password}@` : '';
  return `http://${userinfo}${url.hostname}:${port}${url.pathname}${url.search}`;
}
