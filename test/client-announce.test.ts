// Warming without announcing: requests waiting in the client's queue (beyond its concurrency) announce their
// origins to a real sockpoold, which warms sockets for them before they run, within a bounded lookahead and the
// uid's prewarm quota; and prewarm taking URL strings and URL objects. Real daemon child process, real HTTP origins
// (host names pinned to 127.0.0.1 by the daemon's dns.resolve, so each name is an origin of its own).
import type http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  daemonStats,
  echoHandler,
  eventually,
  httpOrigin,
  type Origin,
  fdCount as processFdCount,
  startTestDaemon,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

const DOMAIN = 'announce.test';
const MANY = 1000;

/** An origin that holds `/hold` requests until release(): the client's only slot stays taken meanwhile. */
async function holdingOrigin(): Promise<Origin & { held(): number; release(): void }> {
  const held: http.ServerResponse[] = [];
  const echo = echoHandler();
  const origin = await httpOrigin((request, response) => {
    if (request.url === '/hold') {
      request.resume();
      held.push(response);
    } else echo(request, response);
  });
  return {
    ...origin,
    held: () => held.length,
    release: () => {
      for (const response of held.splice(0)) response.end('released');
    },
  };
}

let holder: Awaited<ReturnType<typeof holdingOrigin>>;
let target: Origin;
let daemon: DaemonProcess;

/** Names the daemon resolves to the target origin (127.0.0.1): `name(i)` for the 1,000-origin queue, others. */
const name = (label: string | number) => `${typeof label === 'number' ? `o${label}` : label}.${DOMAIN}`;
const resolveEntries = (port: number, labels: Array<string | number>) =>
  labels.map((label) => `${name(label)}:${port}:127.0.0.1`);

/** The daemon's figures for the named origins of this file. */
async function namedOrigins(socketPath: string) {
  const stats = await daemonStats(socketPath);
  return stats.origins.filter((entry) => entry.origin.endsWith(`.${DOMAIN}:${target.port}`));
}

async function originFigures(socketPath: string, label: string) {
  const entry = (await namedOrigins(socketPath)).find((o) => o.origin === `${name(label)}:${target.port}`);
  return { idle: entry?.idle ?? 0, hits: entry?.hits ?? 0, misses: entry?.misses ?? 0 };
}

/**
 * Open fds of this process, less the origins' own sockets: the far end of a socket the daemon keeps idle is open
 * here, in the origin, for as long as the daemon keeps it.
 */
const fdCount = () => processFdCount() - holder.openSockets() - target.openSockets();

const LABELS = ['warm-0', 'warm-1', 'url-1', 'url-2', 'url-3', 'url-4', ...Array.from({ length: MANY }, (_, i) => i)];

beforeAll(async () => {
  holder = await holdingOrigin();
  target = await httpOrigin(echoHandler());
  daemon = await startTestDaemon([holder.port, target.port], {
    config: { dns: { resolve: resolveEntries(target.port, LABELS) } },
  });
});

afterAll(async () => {
  await daemon?.stop();
  await holder?.close();
  await target?.close();
});

describe('requests waiting in the client queue announce their origins', () => {
  it.each([
    { threads: 0, label: 'warm-0' },
    { threads: 1, label: 'warm-1' },
  ])(
    'threads: $threads — the daemon warms a waiting request’s origin before it runs; it runs warm',
    async ({ threads, label }) => {
      const before = fdCount();
      const accepted = target.connections();
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads, concurrencyPerThread: 1 });
      // The client's only slot: held by the origin until release().
      const holding = client.request(`http://127.0.0.1:${holder.port}/hold`);
      await eventually(() => holder.held() === 1, 'the holding request reached its origin');
      let settled = false;
      const waiting = client.request(`http://${name(label)}:${target.port}/queued`).finally(() => {
        settled = true;
      });
      // While it waits (its slot is still taken), the daemon connects to its origin and keeps the socket idle.
      await eventually(
        async () => (await originFigures(daemon.socketPath, label)).idle === 1,
        'the daemon warmed the origin of the waiting request',
      );
      expect(target.connections() - accepted).toBe(1);
      expect(settled).toBe(false);
      holder.release();
      expect((await holding).body.toString()).toBe('released');
      const response = await waiting;
      expect(response.body.toString()).toBe('GET /queued 0');
      // It ran over the socket warmed for it: a daemon hit, no connect of its own.
      expect(response).toMatchObject({ warm: true, connection: 'leased' });
      expect(await originFigures(daemon.socketPath, label)).toMatchObject({ hits: 1, misses: 0 });
      expect(target.connections() - accepted).toBe(1);
      await client.close();
      await eventually(() => fdCount() === before, `fd count back to ${before}`);
    },
  );

  it('a queue of 1,000 requests to 1,000 origins announces only the first N (announce.origins)', async () => {
    const before = fdCount();
    const accepted = target.connections();
    const lookahead = 8;
    const client = new SockpoolClient({
      socketPath: daemon.socketPath,
      threads: 0,
      concurrencyPerThread: 1,
      announce: { origins: lookahead },
    });
    const holding = client.request(`http://127.0.0.1:${holder.port}/hold`);
    await eventually(() => holder.held() === 1, 'the holding request reached its origin');
    const controller = new AbortController();
    const queued = Array.from({ length: MANY }, (_, i) =>
      client.request(`http://${name(i)}:${target.port}/many`, { signal: controller.signal }),
    );
    await eventually(() => target.connections() - accepted === lookahead, `${lookahead} origins warmed`);
    // threads: 0, one link: stats goes after every prewarm this client sent, so its answer has seen them all.
    const stats = (await client.stats()) as { origins: Array<{ origin: string }> };
    const many = stats.origins.map((entry) => entry.origin).filter((origin) => /^o\d+\./.test(origin));
    expect(many.sort()).toEqual(Array.from({ length: lookahead }, (_, i) => `${name(i)}:${target.port}`).sort());
    // None of them ran.
    expect(target.connections() - accepted).toBe(lookahead);
    controller.abort();
    const outcomes = await Promise.allSettled(queued);
    expect(outcomes.every((o) => o.status === 'rejected' && o.reason.code === 'SOCKPOOL_ERR_ABORTED')).toBe(true);
    holder.release();
    await holding;
    await client.close();
    await eventually(() => fdCount() === before, `fd count back to ${before}`);
  });

  it('announcing is bounded by the uid’s prewarm quota, and a refused announcement fails no request', async () => {
    const quotaDaemon = await startTestDaemon([holder.port, target.port], {
      config: { dns: { resolve: resolveEntries(target.port, LABELS) }, quotas: { maxPrewarmPerUid: 2 } },
    });
    try {
      const before = fdCount();
      const accepted = target.connections();
      const client = new SockpoolClient({ socketPath: quotaDaemon.socketPath, threads: 0, concurrencyPerThread: 1 });
      const holding = client.request(`http://127.0.0.1:${holder.port}/hold`);
      await eventually(() => holder.held() === 1, 'the holding request reached its origin');
      const queued = [0, 1, 2, 3, 4].map((i) => client.request(`http://${name(i)}:${target.port}/quota`));
      await eventually(() => target.connections() - accepted === 2, 'two origins warmed');
      // The other three announcements were refused (SOCKPOOL_ERR_QUOTA): the daemon made no pool for them.
      const stats = (await client.stats()) as { origins: Array<{ origin: string; idle: number }> };
      expect(stats.origins.filter((entry) => entry.origin.endsWith(`${DOMAIN}:${target.port}`))).toHaveLength(2);
      holder.release();
      await holding;
      const responses = await Promise.all(queued);
      expect(responses.map((response) => response.body.toString())).toEqual(Array(5).fill('GET /quota 0'));
      expect(responses.map((response) => response.warm)).toEqual([true, true, false, false, false]);
      await client.close();
      await eventually(() => fdCount() === before, `fd count back to ${before}`);
    } finally {
      await quotaDaemon.stop();
    }
  });
});

describe('prewarm takes URLs', () => {
  it('URL strings and URL objects warm their origins; entries of one origin add up', async () => {
    const before = fdCount();
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
    // Each resolves with the merged origins and what the daemon granted them (its idle pool has room for all).
    expect(await client.prewarm(`http://${name('url-1')}:${target.port}/some/page?q=1`)).toEqual([
      { host: name('url-1'), port: target.port, count: 1, granted: 1 },
    ]);
    expect(
      await client.prewarm([
        new URL(`http://${name('url-2')}:${target.port}/a`),
        `http://${name('url-2')}:${target.port}/b`,
        { host: name('url-3'), port: target.port, count: 3 },
      ]),
    ).toEqual([
      { host: name('url-2'), port: target.port, count: 2, granted: 2 },
      { host: name('url-3'), port: target.port, count: 3, granted: 3 },
    ]);
    await eventually(async () => {
      const figures = await Promise.all(['url-1', 'url-2', 'url-3'].map((l) => originFigures(daemon.socketPath, l)));
      return figures.map((f) => f.idle).join() === '1,2,3';
    }, 'the daemon keeps 1, 2 and 3 idle sockets');
    const response = await client.request(`http://${name('url-2')}:${target.port}/after`);
    expect(response).toMatchObject({ warm: true, connection: 'leased' });
    await client.close();
    await eventually(() => fdCount() === before, `fd count back to ${before}`);
  });

  it('says what the daemon granted through the worker threads too, and 0 where its idle pool is full', async () => {
    const before = fdCount();
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
    const url = `http://${name('url-4')}:${target.port}/`;
    expect(await client.prewarm({ host: name('url-4'), port: target.port, count: 2 })).toEqual([
      { host: name('url-4'), port: target.port, count: 2, granted: 2 },
    ]);
    await eventually(async () => (await originFigures(daemon.socketPath, 'url-4')).idle === 2, 'two idle sockets');
    // The origin's idle room (maxIdle) is what is asked for at most: two idle already, two more asked, none to start.
    expect(await client.prewarm([url, url])).toEqual([
      { host: name('url-4'), port: target.port, count: 2, granted: 0 },
    ]);
    await client.close();
    await eventually(() => fdCount() === before, `fd count back to ${before}`);
  });

  it('bad input is refused with SOCKPOOL_ERR_INVALID_ARGUMENT naming the entry, before anything is sent', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
    const cases: Array<[unknown, RegExp]> = [
      ['ftp://example.com/', /^prewarm: unsupported URL scheme ftp: \(http and https only\)$/],
      ['not a url', /^prewarm: invalid URL: "not a url"$/],
      ['http://user:secret@example.com/', /^prewarm: credentials in the URL are not supported$/],
      [['http://example.com/', 42], /^prewarm: origins\[1\]: expected a URL string, a URL or \{ host, port/],
      [null, /^prewarm: expected a URL string, a URL or \{ host, port, count\?, https\? \}; got null$/],
      [[{ host: 'example.com', port: 0 }], /^prewarm: origins\[0\]: port must be an integer from 1 to 65535, got 0$/],
      [[{ host: 'example.com', port: 80, count: 0 }], /origins\[0\]: count must be an integer from 1 to 1000, got 0/],
      [[{ host: 'example.com', port: 80, count: 1001 }], /count must be an integer from 1 to 1000, got 1001/],
      [[{ host: 'example.com', port: 80, https: 'yes' }], /origins\[0\]: https must be true or false, got "yes"/],
      [[{ host: '', port: 80 }], /origins\[0\]: host must be a non-empty string/],
      [[{ host: 'a!b.example', port: 80 }], /^prewarm: origins\[0\]: .*a!b\.example/],
    ];
    for (const [input, message] of cases) {
      const error = await client.prewarm(input as string).then(
        () => undefined,
        (rejected: Error & { code?: string }) => rejected,
      );
      expect(error, JSON.stringify(input)).toMatchObject({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
      expect(error!.message, JSON.stringify(input)).toMatch(message);
    }
    // Nothing reached the daemon: it knows no example.com.
    const stats = await daemonStats(daemon.socketPath);
    expect(stats.origins.some((entry) => entry.origin.includes('example.com'))).toBe(false);
    await client.close();
  });

  it('the announce option is checked', () => {
    for (const announce of [{ origins: 0 }, { socketsPerOrigin: 1001 }, { origins: 1.5 }, 'yes']) {
      expect(
        () => new SockpoolClient({ socketPath: daemon.socketPath, announce: announce as { origins: number } }),
      ).toThrow(expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }));
    }
  });
});
