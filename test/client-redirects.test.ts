// Redirects followed as the Fetch standard says (client/redirects.ts): by fetch() by default, by request() and
// requestStream() with `redirect: 'follow'` (by default they return the 3xx), against real origins and a real
// daemon: every hop is a request of its own through the daemon (so its egress policy judges where a redirect
// leads), a 303 (and a 301/302 of a POST) becomes a GET without its body, a 307/308 sends the same method and body
// again (never a streamed body: it was read once), credentials do not follow a redirect to another origin, and
// loops, odd Locations and `redirect: 'error'` fail with SOCKPOOL_ERR_REDIRECT. Nothing is left open after.
import type { IncomingMessage, ServerResponse } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  eventually,
  fdCount,
  httpOrigin,
  httpsOrigin,
  type Origin,
  startTestDaemon,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let origin: Origin;
/** Another origin the daemon allows: a redirect there is cross-origin. */
let other: Origin;
/** An origin the daemon does not allow (its port is not in the policy). */
let refused: Origin;
/** The same handler over HTTPS (a certificate of a test CA, valid for 127.0.0.1). */
let secure: Origin;
let pki: TestPki;
let daemon: DaemonProcess;
let client: SockpoolClient;
/** Every request the origins saw, as `METHOD path`. */
const seen: string[] = [];

interface Echo {
  method: string;
  path: string;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

function handler(request: IncomingMessage, response: ServerResponse): void {
  const path = request.url ?? '/';
  seen.push(`${request.method} ${path}`);
  const chunks: Buffer[] = [];
  request.on('data', (chunk: Buffer) => chunks.push(chunk));
  request.on('end', () => {
    const redirect = (status: number, location?: string) => {
      response.writeHead(status, location === undefined ? {} : { location });
      response.end(`redirecting ${status}`);
    };
    const chain = /^\/chain\/(\d+)$/.exec(path);
    if (chain) {
      const left = Number(chain[1]);
      if (left === 0) redirect(302, '/target');
      else redirect(302, `/chain/${left - 1}`);
      return;
    }
    switch (path) {
      case '/r301':
        return redirect(301, '/target');
      case '/r302':
        return redirect(302, '/target');
      case '/r303':
        return redirect(303, '/target');
      case '/r307':
        return redirect(307, '/target');
      case '/r308':
        return redirect(308, '/target?permanent');
      case '/loop':
        return redirect(302, '/loop');
      case '/to-other':
        return redirect(302, `http://127.0.0.1:${other.port}/target`);
      case '/downgrade':
        return redirect(302, `http://127.0.0.1:${origin.port}/target`);
      case '/to-refused':
        return redirect(302, `http://127.0.0.1:${refused.port}/target`);
      case '/to-ftp':
        return redirect(302, 'ftp://127.0.0.1/file');
      case '/to-port-0':
        return redirect(302, 'http://127.0.0.1:0/target');
      case '/no-location':
        return redirect(302);
      case '/to-utf8':
        // The Location's bytes are UTF-8, as many servers send them (Node writes a header string as latin1).
        return redirect(302, Buffer.from('/café?q=über').toString('latin1'));
      case '/stalled-body':
        // A redirect whose content-length promises more than it sends, on a connection left open (broken servers
        // do this): its body never ends.
        response.writeHead(302, { location: '/target', 'content-length': '100' });
        response.write('short');
        return;
      case '/to-credentials':
        return redirect(302, `http://user:secret@127.0.0.1:${other.port}/target`);
      case '/slow-1':
        setTimeout(() => redirect(302, '/slow-2'), 150);
        return;
      case '/slow-2':
        setTimeout(() => redirect(302, '/target'), 150);
        return;
      default: {
        const echo: Echo = {
          method: request.method ?? '',
          path,
          headers: request.headers,
          body: Buffer.concat(chunks).toString(),
        };
        response.writeHead(200, { 'content-type': 'application/json' });
        response.end(JSON.stringify(echo));
      }
    }
  });
}

beforeAll(async () => {
  origin = await httpOrigin(handler);
  other = await httpOrigin(handler);
  refused = await httpOrigin(handler);
  pki = createTestPki();
  secure = await httpsOrigin(pki, handler);
  daemon = await startTestDaemon([origin.port, other.port, secure.port]);
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
  // Its thread up (curl's Multi holds a socketpair there): the fd counts below are not thrown by it starting.
  await client.stats();
});

afterAll(async () => {
  await client?.close();
  await daemon?.stop();
  await origin?.close();
  await other?.close();
  await refused?.close();
  await secure?.close();
  pki?.cleanup();
});

const url = (path: string, server: Origin = origin) => `http://127.0.0.1:${server.port}${path}`;
const echoed = async (response: Response) => (await response.json()) as Echo;

describe('fetch() follows redirects', () => {
  it('follows 301, 302, 303, 307 and 308 to the end, with redirected and the final url set', async () => {
    for (const path of ['/r301', '/r302', '/r303', '/r307', '/r308', '/chain/5']) {
      const response = await client.fetch(url(path));
      expect(response.status).toBe(200);
      expect(response.redirected).toBe(true);
      expect(response.url).toBe(url(path === '/r308' ? '/target?permanent' : '/target'));
      expect((await echoed(response)).method).toBe('GET');
    }
    const direct = await client.fetch(url('/target'));
    expect(direct.redirected).toBe(false);
    await direct.arrayBuffer();
  });

  it('turns a POST into a GET without its body at 301, 302 and 303; keeps method and body at 307 and 308', async () => {
    const post = { method: 'POST', body: 'payload', headers: { 'content-type': 'text/plain' } };
    for (const path of ['/r301', '/r302', '/r303']) {
      const target = await echoed(await client.fetch(url(path), post));
      expect(target).toMatchObject({ method: 'GET', body: '' });
      expect(target.headers['content-type']).toBeUndefined();
    }
    for (const path of ['/r307', '/r308']) {
      const target = await echoed(await client.fetch(url(path), post));
      expect(target).toMatchObject({ method: 'POST', body: 'payload' });
      expect(target.headers['content-type']).toBe('text/plain');
    }
    // A PUT at 303 becomes a GET too; at 302 it stays a PUT (only POST changes there).
    expect(await echoed(await client.fetch(url('/r303'), { ...post, method: 'PUT' }))).toMatchObject({ method: 'GET' });
    expect(await echoed(await client.fetch(url('/r302'), { ...post, method: 'PUT' }))).toMatchObject({
      method: 'PUT',
      body: 'payload',
    });
  });

  it('keeps credentials on the same origin and drops them on the way to another', async () => {
    const headers = { authorization: 'Bearer secret', cookie: 'session=1', 'x-trace': 'kept' };
    const same = await echoed(await client.fetch(url('/r302'), { headers }));
    expect(same.headers).toMatchObject({ authorization: 'Bearer secret', cookie: 'session=1', 'x-trace': 'kept' });
    const crossed = await client.fetch(url('/to-other'), { headers });
    expect(crossed.url).toBe(url('/target', other));
    const there = await echoed(crossed);
    expect(there.headers.authorization).toBeUndefined();
    expect(there.headers.cookie).toBeUndefined();
    expect(there.headers['x-trace']).toBe('kept');
  });

  it('reads a Location sent as raw UTF-8 bytes as UTF-8, as Node’s fetch and browsers do', async () => {
    // (Read byte by byte, as latin1, it became /caf%C3%83%C2%A9: another path, a 404 at a real site.)
    const response = await client.fetch(url('/to-utf8'));
    expect(response.url).toBe(url('/caf%C3%A9?q=%C3%BCber'));
    expect(await echoed(response)).toMatchObject({ path: '/caf%C3%A9?q=%C3%BCber' });
    const followed = await client.request(url('/to-utf8'), { redirect: 'follow' });
    expect(followed.url).toBe(url('/caf%C3%A9?q=%C3%BCber'));
  });

  it('follows a redirect whose body never ends instead of waiting for it until the deadline', async () => {
    // Node's fetch follows such a redirect at once; waiting for its body used up the whole timeoutMs (30 s by
    // default) and failed the chain with SOCKPOOL_ERR_TIMEOUT.
    const fetched = await client.fetch(url('/stalled-body'), { signal: AbortSignal.timeout(10_000) });
    expect(fetched.status).toBe(200);
    expect((await echoed(fetched)).path).toBe('/target');
    const requested = await client.request(url('/stalled-body'), { redirect: 'follow', timeoutMs: 10_000 });
    expect(requested).toMatchObject({ status: 200, redirected: true, url: url('/target') });
  });

  it('follows a redirect from https to http (a downgrade, as fetch and curl do) without the credentials', async () => {
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile });
    try {
      const headers = { authorization: 'Bearer secret', cookie: 'session=1', 'x-trace': 'kept' };
      // On the https origin itself they are kept...
      const same = await echoed(await own.fetch(`https://127.0.0.1:${secure.port}/r302`, { headers }));
      expect(same.headers).toMatchObject({ authorization: 'Bearer secret', cookie: 'session=1' });
      // ... the http origin on the same host is another (its scheme alone makes it so: test/redirects): they do not
      // go there in the clear.
      const downgraded = await own.fetch(`https://127.0.0.1:${secure.port}/downgrade`, { headers });
      expect(downgraded).toMatchObject({ status: 200, redirected: true, url: url('/target') });
      const there = await echoed(downgraded);
      expect(there.headers.authorization).toBeUndefined();
      expect(there.headers.cookie).toBeUndefined();
      expect(there.headers['x-trace']).toBe('kept');
      await expect(
        own.request(`https://127.0.0.1:${secure.port}/downgrade`, { redirect: 'error' }),
      ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_REDIRECT', status: 302 });
    } finally {
      await own.close();
    }
  });

  it("returns the 3xx with redirect: 'manual', and a redirect status without a Location as it is", async () => {
    const manual = await client.fetch(url('/r301'), { redirect: 'manual' });
    expect(manual.status).toBe(301);
    expect(manual.redirected).toBe(false);
    expect(manual.headers.get('location')).toBe('/target');
    expect(await manual.text()).toBe('redirecting 301');
    const bare = await client.fetch(url('/no-location'));
    expect(bare.status).toBe(302);
    expect(await bare.text()).toBe('redirecting 302');
  });

  it('fails what it cannot follow with SOCKPOOL_ERR_REDIRECT, and a bad mode with SOCKPOOL_ERR_INVALID_ARGUMENT', async () => {
    await expect(client.fetch(url('/r302'), { redirect: 'error' })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
      status: 302,
    });
    // 20 redirects are followed; the 21st is an error (and no 22nd request is made).
    const loopsBefore = seen.filter((line) => line === 'GET /loop').length;
    // (fetch() fails as Node's does, a TypeError 'fetch failed', the typed error its cause and its code on it.)
    await expect(client.fetch(url('/loop'))).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
      cause: { message: expect.stringContaining('more than 20 redirects') },
    });
    expect(seen.filter((line) => line === 'GET /loop').length - loopsBefore).toBe(21);
    await expect(client.fetch(url('/to-ftp'))).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
      cause: { message: expect.stringContaining('ftp: URL') },
    });
    // A streamed body was read once: a redirect that must send it again fails; one that drops it is followed.
    const stream = () =>
      new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(new TextEncoder().encode('streamed'));
          controller.close();
        },
      });
    await expect(
      client.fetch(url('/r307'), { method: 'POST', body: stream(), duplex: 'half' } as RequestInit),
    ).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
      cause: { message: expect.stringContaining('cannot be replayed') },
    });
    const dropped = await client.fetch(url('/r303'), { method: 'POST', body: stream(), duplex: 'half' } as RequestInit);
    expect(await echoed(dropped)).toMatchObject({ method: 'GET', body: '' });
    await expect(client.fetch(url('/r301'), { redirect: 'sideways' as RequestInit['redirect'] })).rejects.toMatchObject(
      {
        code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
      },
    );
  });

  it('refuses port 0, in a URL or a Location, before the daemon: an origin redirecting there many times does not get the thread’s link to the daemon closed, nor its kept connections', async () => {
    // The daemon refuses an acquire for port 0 as a bad message, and closes a link past maxBadMessages (10), ending
    // its leases: every connection of that thread, kept alive or in use, shut down by an origin's Locations.
    await client.request(url('/target'));
    const connections = origin.connections();
    await expect(client.request('http://127.0.0.1:0/target')).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
    });
    for (let i = 0; i < 12; i++) {
      await expect(client.fetch(url('/to-port-0'))).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_REDIRECT',
        cause: { message: expect.stringContaining('redirect to an invalid URL') },
      });
    }
    // Every hop went over the connection kept from the first request: the daemon never ended its lease.
    await client.request(url('/target'));
    expect(origin.connections()).toBe(connections);
  });

  it("asks the daemon for every hop: a redirect to an address its policy refuses fails with the policy's error", async () => {
    const before = seen.length;
    await expect(client.fetch(url('/to-refused'))).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_POLICY' });
    // The refused origin never saw the request.
    expect(seen.slice(before)).toEqual(['GET /to-refused']);
  });

  it("request() and requestStream() return the 3xx by default, and follow with redirect: 'follow'", async () => {
    const plain = await client.request(url('/r302'));
    expect(plain.status).toBe(302);
    expect(plain.redirected).toBeUndefined();
    const followed = await client.request(url('/chain/3'), {
      method: 'POST',
      body: 'payload',
      headers: { authorization: 'Bearer secret' },
      redirect: 'follow',
    });
    expect(followed).toMatchObject({ status: 200, redirected: true, url: url('/target') });
    // A 302 turned the POST into a GET without its body; the same origin kept the credentials.
    const echo = JSON.parse(followed.body.toString()) as Echo;
    expect(echo).toMatchObject({ method: 'GET', body: '' });
    expect(echo.headers.authorization).toBe('Bearer secret');
    const kept = await client.request(url('/r308'), { method: 'PUT', body: 'again', redirect: 'follow' });
    expect(JSON.parse(kept.body.toString())).toMatchObject({ method: 'PUT', body: 'again', path: '/target?permanent' });
    await expect(client.request(url('/r301'), { redirect: 'error' })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
    });
    await expect(client.request(url('/loop'), { redirect: 'follow' })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
    });
    await expect(client.request(url('/r301'), { redirect: 'always' as 'follow' })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_INVALID_ARGUMENT',
    });
    const streamed = await client.requestStream(url('/to-other'), { redirect: 'follow' });
    expect(streamed).toMatchObject({ status: 200, redirected: true, url: url('/target', other) });
    expect(JSON.parse(await new Response(streamed.body).text())).toMatchObject({ method: 'GET', path: '/target' });
    const unfollowed = await client.requestStream(url('/r303'));
    expect(unfollowed.status).toBe(303);
    expect(await new Response(unfollowed.body).text()).toBe('redirecting 303');
  });

  it('reviewed edge cases: a lower-case method, credentials in a Location, a streamed body at 302, one deadline for the chain', async () => {
    // The method is compared as it is sent: a lower-case 'post' becomes a GET at 302 as 'POST' does.
    const lower = await client.request(url('/r302'), { method: 'post', body: 'payload', redirect: 'follow' });
    expect(JSON.parse(lower.body.toString())).toMatchObject({ method: 'GET', body: '' });
    await expect(client.fetch(url('/to-credentials'))).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
      cause: { message: expect.stringContaining('credentials') },
    });
    // As the Fetch standard: a streamed body fails a 302 even though the POST would become a GET.
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('streamed'));
        controller.close();
      },
    });
    await expect(
      client.fetch(url('/r302'), { method: 'POST', body: stream, duplex: 'half' } as RequestInit),
    ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_REDIRECT' });
    // timeoutMs covers the whole chain: two hops of 150 ms each do not fit in 250 ms, though each alone would.
    await expect(client.request(url('/slow-1'), { redirect: 'follow', timeoutMs: 250 })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_TIMEOUT',
    });
    expect((await client.request(url('/slow-1'), { redirect: 'follow', timeoutMs: 5_000 })).status).toBe(200);
  });

  it('close() waits for a request that is following redirects, and refuses new ones', async () => {
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
    const following = own.fetch(url('/slow-1'));
    const moving = own.request(url('/chain/4'), { redirect: 'follow' });
    // Closing while both are between hops: they finish, anything new is refused.
    await new Promise((resolve) => setTimeout(resolve, 50));
    const closing = own.close();
    await expect(own.request(url('/target'))).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_CLOSED' });
    expect((await following).status).toBe(200);
    expect(await (await following).text()).toContain('"path":"/target"');
    expect((await moving).redirected).toBe(true);
    await closing;
  });

  it('leaves no fd open once the client is closed', async () => {
    // (The origins run in this process: their side of the connections the daemon keeps warm are not the client's.)
    const clientFds = () =>
      fdCount() - origin.openSockets() - other.openSockets() - refused.openSockets() - secure.openSockets();
    const before = clientFds();
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
    for (const path of ['/chain/3', '/to-other', '/r307']) await (await own.fetch(url(path))).arrayBuffer();
    await expect(own.fetch(url('/loop'))).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_REDIRECT' });
    await own.request(url('/chain/2'), { redirect: 'follow' });
    await expect(own.requestStream(url('/loop'), { redirect: 'follow' })).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_REDIRECT',
    });
    await own.close();
    // (The origins' side of the connections closes when their 'close' events come.)
    await eventually(() => clientFds() <= before, `client fds back to ${before} (now ${clientFds()})`);
  });
});

describe('a redirect in the client queue', () => {
  it('its next hop goes before the requests that wait there: the chain already waited its turn', async () => {
    // Found in review: each hop entered the queue as a new request, behind every request queued since the chain
    // began, so a crawler's redirected URLs (http to https, to www) waited the whole queue again at each hop, within
    // the chain's one deadline, and timed out where the same URLs without a redirect did not.
    const own = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, concurrencyPerThread: 1 });
    try {
      const from = seen.length;
      const chained = own.request(url('/chain/1'), { redirect: 'follow' });
      const queued = [1, 2, 3, 4, 5].map((n) => own.request(url(`/target?queued-${n}`)));
      expect((await chained).status).toBe(200);
      await Promise.all(queued);
      const order = seen.slice(from);
      expect(order).toHaveLength(8);
      // (A hop waits for the next slot that frees: the one its last hop left went to the first waiter then.)
      expect(order.indexOf('GET /chain/0')).toBeLessThan(order.indexOf('GET /target?queued-3'));
      expect(order.indexOf('GET /target')).toBeLessThan(order.indexOf('GET /target?queued-5'));
    } finally {
      await own.close();
    }
  });
});
