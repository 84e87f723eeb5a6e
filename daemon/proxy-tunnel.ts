// The daemon's side of an HTTP forward proxy: on a TCP socket connected to the proxy, ask for a tunnel to the origin
// (`CONNECT host:port`) and check the proxy's answer, before the socket is pooled or lent. A client is lent the
// socket only once it is a byte stream to the origin: it never speaks to the proxy itself, so it cannot choose
// where the proxy relays it.
//
// fd ownership: `fd` stays the caller's throughout (the connector closes it when this rejects). A Poller watches it
// while the answer is awaited and is closed on every path before this settles.

import { Buffer } from 'node:buffer';
import { readSync, writeSync } from 'node:fs';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';

/** A proxy of the daemon's configuration (`[[proxies]]`). */
export interface ProxyEndpoint {
  name: string;
  host: string;
  port: number;
}

/**
 * The proxies a reload changed: named in `before` and, in `after`, gone or at another URL. Tunnels pooled through
 * them lead through a proxy the configuration no longer names, so they are closed (pool-manager.ts).
 */
export function changedProxies(
  before: ReadonlyArray<{ name: string; url: string }>,
  after: ReadonlyArray<{ name: string; url: string }>,
): string[] {
  const urls = new Map(after.map((proxy) => [proxy.name, proxy.url] as const));
  return before.filter((proxy) => urls.get(proxy.name) !== proxy.url).map((proxy) => proxy.name);
}

/** The longest CONNECT answer accepted (status line and headers). */
const MAX_ANSWER_BYTES = 8 * 1024;

function proxyError(proxy: ProxyEndpoint, target: string, why: string, status: number | null): SockpoolError {
  return new SockpoolError(ErrorCodes.PROXY, `proxy ${proxy.name} (${proxy.host}:${proxy.port}) ${why} for ${target}`, {
    proxy: proxy.name,
    target,
    status,
  });
}

/** `host:port` as a CONNECT request target (IPv6 literals in brackets). */
export function connectTarget(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * Sends `CONNECT host:port` on `fd` (a connected, non-blocking TCP socket to the proxy) and resolves once the proxy
 * answers 200 with nothing after its header block. Any other status rejects with SOCKPOOL_ERR_PROXY carrying it;
 * a proxy that closes, sends garbage, or is silent for `timeoutMs`, too (status null), and one whose 200 came with
 * more than its answer, or with its hang-up (status 200).
 */
export function openTunnel(
  fd: number,
  host: string,
  port: number,
  proxy: ProxyEndpoint,
  timeoutMs: number,
): Promise<void> {
  const target = connectTarget(host, port);
  const request = Buffer.from(`CONNECT ${target} HTTP/1.1\r\nHost: ${target}\r\n\r\n`, 'latin1');
  try {
    // A fresh socket's send buffer is empty: the few bytes of the request go out in one write.
    if (writeSync(fd, request) !== request.length) throw new Error('short write');
  } catch (error) {
    return Promise.reject(proxyError(proxy, target, `could not be sent CONNECT: ${(error as Error).message}`, null));
  }
  return new Promise<void>((resolve, reject) => {
    const answer = Buffer.alloc(MAX_ANSWER_BYTES + 1);
    let length = 0;
    let settled = false;
    // libuv stops a Poller at EPOLLERR (status < 0): a reset that came with the start of the answer would leave those
    // bytes read and no event ever again, and the connect waiting out its timeout. What the socket holds is read now,
    // to the error the next read returns.
    const poller = new native.Poller(fd, (status) => {
      let empty = onReadable();
      if (status >= 0) return;
      // Each read takes bytes or ends it (EOF, the error, an answer judged, the limit); nothing left and no error
      // read: the socket's own error says why.
      while (!settled) {
        if (empty) {
          const why = native.socketError(fd) ?? 'the socket reported an error';
          finish(proxyError(proxy, target, `failed while answering CONNECT: ${why}`, null));
        } else empty = onReadable();
      }
    });
    const timer = setTimeout(
      () => finish(proxyError(proxy, target, `did not answer CONNECT within ${timeoutMs} ms`, null)),
      timeoutMs,
    );
    const finish = (error?: SockpoolError) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      poller.close();
      if (error) reject(error);
      else resolve();
    };
    /** Reads what the socket holds and judges the answer so far; true when there was nothing to read (EAGAIN). */
    const onReadable = (): boolean => {
      let read: number;
      try {
        read = readSync(fd, answer, length, answer.length - length, null);
      } catch (error) {
        if ((error as { code?: string }).code === 'EAGAIN') return true;
        finish(proxyError(proxy, target, `failed while answering CONNECT: ${(error as Error).message}`, null));
        return false;
      }
      if (read === 0) {
        finish(proxyError(proxy, target, 'closed the connection instead of answering CONNECT', null));
        return false;
      }
      length += read;
      const end = answer.subarray(0, length).indexOf('\r\n\r\n');
      // The buffer has one byte more than the longest answer, so that a read that ends the longest answer also
      // takes the first byte queued after it (refused below). An answer that needs that byte is oversized: were it
      // taken, bytes queued after it would stay unread and unseen, and the client would read them as the origin's.
      if (end === -1 ? length > MAX_ANSWER_BYTES : end + 4 > MAX_ANSWER_BYTES) {
        finish(proxyError(proxy, target, 'sent an oversized CONNECT answer', null));
        return false;
      }
      if (end === -1) return false;
      const statusLine = answer.subarray(0, answer.indexOf('\r\n')).toString('latin1');
      const match = /^HTTP\/1\.[01] (\d{3})(?: |$)/.exec(statusLine);
      const status = match ? Number(match[1]) : null;
      if (status === null)
        finish(proxyError(proxy, target, `answered CONNECT with ${JSON.stringify(statusLine.slice(0, 80))}`, null));
      else if (status !== 200) finish(proxyError(proxy, target, `refused CONNECT with status ${status}`, status));
      // Bytes past the answer would be read by the client as the origin's: the tunnel is out of step.
      else if (length > end + 4) finish(proxyError(proxy, target, 'sent bytes after its CONNECT answer', status));
      else finish(afterAnswer(status));
      return false;
    };
    /**
     * The 200 is in, alone: one more read (into the spare byte) for what came with it. Nothing (EAGAIN) is a
     * tunnel. A proxy that hung up right after its 200 (one that answers before its own connect to the origin,
     * which then failed) would otherwise be a dead socket lent as a working tunnel: the client's request fails as an
     * empty reply from the origin, and the pool counts a connect that worked and opens the next one at once.
     */
    const afterAnswer = (status: number): SockpoolError | undefined => {
      let read: number;
      try {
        read = readSync(fd, answer, length, 1, null);
      } catch (error) {
        if ((error as { code?: string }).code === 'EAGAIN') return undefined;
        return proxyError(proxy, target, `failed right after answering CONNECT: ${(error as Error).message}`, status);
      }
      return read === 0
        ? proxyError(proxy, target, 'closed the connection right after answering CONNECT', status)
        : proxyError(proxy, target, 'sent bytes after its CONNECT answer', status);
    };
    poller.start(native.READABLE | native.DISCONNECT);
  });
}
