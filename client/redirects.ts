// Following redirects (request() and requestStream() with `redirect: 'follow'`, fetch() by default) as the Fetch
// standard's "HTTP-redirect fetch" says and Node's own fetch (undici) does it: the next hop's URL, method, body and
// headers, or why there is none. The hops themselves are requests like any other: each goes through the daemon,
// whose egress policy judges every address a redirect leads to, as it judges the first.

import { Buffer } from 'node:buffer';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { urlTarget } from '../worker/url-target.js';
import { type BodyInput, type HeadersInput, isStreamBody } from './validate.js';

/** The statuses that redirect (with a Location header). */
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);

/** As the Fetch standard (and browsers, and undici): a 21st redirect is an error. */
export const MAX_REDIRECTS = 20;

export type RedirectMode = 'follow' | 'manual' | 'error';

/** Headers that describe a request body: dropped with the body when a redirect turns the request into a GET. */
const BODY_HEADERS = ['content-encoding', 'content-language', 'content-location', 'content-type', 'content-length'];

/** Credentials meant for one origin: dropped when a redirect leads to another (undici drops the same four). */
const ORIGIN_BOUND_HEADERS = ['authorization', 'proxy-authorization', 'cookie', 'host'];

/** One hop of a request that follows redirects. */
export interface Hop {
  url: string;
  method: string;
  headers: HeadersInput | undefined;
  body: BodyInput | null | undefined;
}

/** A `redirect` option (fetch's `init.redirect`, or a Request's), checked: a typed error for anything but the
 *  three modes; `fallback` when it is not given. */
export function redirectMode(value: unknown, fallback: RedirectMode): RedirectMode {
  if (value === undefined) return fallback;
  if (value === 'follow' || value === 'manual' || value === 'error') return value;
  throw new SockpoolError(
    ErrorCodes.INVALID_ARGUMENT,
    `redirect must be 'follow', 'manual' or 'error'; got ${JSON.stringify(value)}`,
  );
}

/** A response's Location header (a redirect status without one is returned as it is, not followed). */
function locationOf(headers: Array<[string, string]>): string | undefined {
  for (const [name, value] of headers) if (name.toLowerCase() === 'location') return utf8Location(value);
  return undefined;
}

/**
 * A Location as the URL its bytes spell. Header values come byte by byte (latin1 characters, as curl got them);
 * many servers send a non-ASCII Location as raw UTF-8 ("/café" as 63 61 66 c3 a9), which read as latin1 became
 * another path (/caf%C3%83%C2%A9). Read as UTF-8, as Node's fetch (undici) and browsers do; bytes that are not
 * UTF-8 become U+FFFD there too.
 */
function utf8Location(value: string): string {
  return /[\x80-\xff]/.test(value) ? Buffer.from(value, 'latin1').toString('utf8') : value;
}

/**
 * Sends `first`, and then (mode 'follow') each hop its redirects lead to, until a response that is not a redirect
 * (or one without a Location), and returns that one with the hop it answered and how many redirects came before.
 * Mode 'error': a redirect fails with SOCKPOOL_ERR_REDIRECT. `drop` disposes of a redirect's response (its body):
 * `failed` when following it failed.
 */
export async function followRedirects<R extends { status: number; headers: Array<[string, string]> }>(
  first: Hop,
  mode: 'follow' | 'error',
  send: (hop: Hop) => Promise<R>,
  drop: (response: R, failed: boolean) => Promise<void>,
): Promise<{ response: R; hop: Hop; followed: number }> {
  let hop = first;
  for (let followed = 0; ; followed++) {
    const response = await send(hop);
    if (!REDIRECT_STATUSES.has(response.status)) return { response, hop, followed };
    const location = locationOf(response.headers);
    if (mode === 'follow' && location === undefined) return { response, hop, followed };
    let next: Hop;
    try {
      if (mode === 'error') {
        throw new SockpoolError(
          ErrorCodes.REDIRECT,
          `${hop.url}: redirected (${response.status}) while redirect is 'error'`,
          {
            url: hop.url,
            status: response.status,
          },
        );
      }
      next = nextHop(hop, response.status, location!, followed);
    } catch (error) {
      await drop(response, true);
      throw error;
    }
    await drop(response, false);
    hop = next;
  }
}

/**
 * The hop after `hop`, which was answered with `status` and `location`, having followed `followed` redirects
 * before it (mode 'follow'). Throws SOCKPOOL_ERR_REDIRECT when it cannot be followed: too many redirects, a
 * Location that is not an http(s) URL, or a streamed request body that the redirect would have to send again.
 */
export function nextHop(hop: Hop, status: number, location: string, followed: number): Hop {
  if (followed >= MAX_REDIRECTS) {
    throw new SockpoolError(ErrorCodes.REDIRECT, `${hop.url}: more than ${MAX_REDIRECTS} redirects`, {
      url: hop.url,
      redirects: followed + 1,
    });
  }
  let next: URL;
  try {
    next = new URL(location, hop.url);
  } catch {
    throw new SockpoolError(ErrorCodes.REDIRECT, `${hop.url}: redirect to an invalid URL ${JSON.stringify(location)}`, {
      url: hop.url,
      location,
    });
  }
  if (next.protocol !== 'http:' && next.protocol !== 'https:') {
    throw new SockpoolError(ErrorCodes.REDIRECT, `${hop.url}: redirect to a ${next.protocol} URL, not http or https`, {
      url: hop.url,
      location,
    });
  }
  if (next.username !== '' || next.password !== '') {
    // (The client takes no credentials in URLs at all; the Fetch standard refuses them across origins.)
    throw new SockpoolError(ErrorCodes.REDIRECT, `${hop.url}: redirect to a URL with credentials in it`, {
      url: hop.url,
    });
  }
  try {
    // What the client refuses of a URL it is given (a host that is none, port 0) it refuses of a Location: the next
    // hop reached the daemon otherwise, and an origin could send its client's thread there over and over.
    urlTarget(next.href);
  } catch (error) {
    throw new SockpoolError(
      ErrorCodes.REDIRECT,
      `${hop.url}: redirect to an invalid URL ${JSON.stringify(location)}: ${(error as Error).message}`,
      { url: hop.url, location },
    );
  }
  // As the Fetch standard: a streamed body (read once already) fails any redirect but a 303, even a 301 or 302
  // that would turn the POST into a GET.
  if (status !== 303 && isStreamBody(hop.body)) {
    throw new SockpoolError(
      ErrorCodes.REDIRECT,
      `${hop.url}: a ${status} redirect of a request with a streamed body, which cannot be replayed`,
      { url: hop.url, location: next.href },
    );
  }
  // (The Headers constructor takes any iterable of pairs, a Map too, as the Fetch standard's HeadersInit does;
  // undici's type names mutable arrays of pairs only.)
  const headers = new Headers(hop.headers as ConstructorParameters<typeof Headers>[0]);
  let { method, body } = hop;
  // 301 and 302 turn a POST into a GET (as every browser does), 303 anything but GET and HEAD; the body goes.
  if (
    ((status === 301 || status === 302) && method === 'POST') ||
    (status === 303 && method !== 'GET' && method !== 'HEAD')
  ) {
    method = 'GET';
    body = undefined;
    for (const name of BODY_HEADERS) headers.delete(name);
  } else if (status === 303 && isStreamBody(body)) {
    // A GET or HEAD keeps its method at a 303, and the standard keeps its body by extracting it again from its
    // source, which a stream does not have: read once already, it went out again as an empty chunked body, with the
    // content headers of the first. It goes, with them, as for any other method at a 303.
    body = undefined;
    for (const name of BODY_HEADERS) headers.delete(name);
  }
  if (new URL(hop.url).origin !== next.origin) for (const name of ORIGIN_BOUND_HEADERS) headers.delete(name);
  // (Fragments stay with the URL a response reports; curl sends no fragment.)
  return { url: next.href, method, headers, body };
}

/**
 * How long a redirect's body may take to end once its head is in. A redirect's body almost always comes with its
 * head; one that does not end (a content-length that promises more than is sent, on a connection left open, as
 * broken servers do; or an origin that trickles it) held the chain until its deadline and failed it, where Node's
 * fetch follows at once.
 */
const DISCARD_WAIT_MS = 200;

/** A redirect response's body, read to its end so its connection stays in curl's cache, unless it is long or slow
 *  (then cancelled: curl closes that connection). */
export async function discardBody(body: ReadableStream<Uint8Array>): Promise<void> {
  const reader = body.getReader();
  let bytes = 0;
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), DISCARD_WAIT_MS);
  });
  try {
    for (;;) {
      const read = await Promise.race([reader.read(), late]);
      if (read?.done) return;
      if (read !== undefined) bytes += read.value.byteLength;
      // Not worth waiting for: a long one, or one still coming when the wait is over.
      if (read === undefined || bytes > 64 * 1024) {
        await reader.cancel();
        return;
      }
    }
  } catch {
    // Whatever became of it, the redirect is followed (the hop's own error, if any, was the transfer's).
  } finally {
    clearTimeout(timer);
    reader.releaseLock();
  }
}
