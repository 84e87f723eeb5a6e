// A request's URL, parsed once. WHATWG URL parsing costs microseconds, about as much as a whole keep-alive request
// spends in curl's own code, and keep-alive loads repeat the same URLs: parsed targets are kept, by the exact input
// string, for the next request (the client validates with it, the engine picks its origin with it).
//
// The cache is two generations of Maps, never a Map whose oldest entry is deleted for each new one. Most callers'
// URLs are unique (a crawler's, an API's with ids in them), and a Map that keeps deleting and adding rehashes again
// and again; V8 links each table it leaves behind to the next one (for iterators), so once one of them was promoted
// to the old generation, every table after it, and every target they held, survived the young-generation GCs that
// followed. With that cache (1,024 URLs, the oldest deleted first) a caller with unique URLs kept megabytes alive
// past every scavenge: V8 grew its young generation to 64 MB and paused the caller's thread for 10-40 ms per scavenge,
// where plain node-libcurl pauses for under 1 ms. Now a full generation is set aside whole and a new Map begins, so
// nothing is deleted and a Map rehashes only while it grows.

import { canonicalHost } from '../shared/address.js';
import { type Origin, originKey } from '../shared/origin.js';

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
let current = new Map<string, UrlTarget>();
/** The generation before `current`, set aside whole when `current` filled up (see the header). */
let previous = new Map<string, UrlTarget>();

/**
 * The parsed target of `input`; throws TypeError (as `new URL` does) for a string that is not a URL, and
 * SOCKPOOL_ERR_INVALID_ARGUMENT for a URL whose host is no host name (`a!b.example`) or has an IPv6 zone id.
 */
export function urlTarget(input: string): UrlTarget {
  const cached = current.get(input);
  if (cached) return cached;
  const kept = previous.get(input);
  if (kept) {
    remember(input, kept);
    return kept;
  }
  const url = new URL(input);
  const secure = url.protocol === 'https:';
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
  if (input.length <= MAX_CACHED_LENGTH) remember(input, target);
  return target;
}

function remember(input: string, target: UrlTarget): void {
  if (current.size >= GENERATION) {
    previous = current;
    current = new Map();
  }
  current.set(input, target);
}

function plainHrefOf(url: URL, port: number): string {
  const userinfo = url.username !== '' || url.password !== '' ? `${url.username}:${url.password}@` : '';
  return `http://${userinfo}${url.hostname}:${port}${url.pathname}${url.search}`;
}
