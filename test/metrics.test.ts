import { once } from 'node:events';
import { Agent, request } from 'node:http';
import { connect } from 'node:net';
import { networkInterfaces } from 'node:os';
import { Gauge, register as globalRegistry, Histogram, Registry } from 'prom-client';
import { afterEach, describe, expect, it } from 'vitest';
import {
  CountingHistogram,
  createMetrics,
  HANDOFF_BUCKETS_SECONDS,
  METRICS_MAX_ACCEPTS,
  METRICS_MAX_ANSWERS,
  METRICS_MAX_CONNECTIONS,
  METRICS_MAX_ORIGINS,
  type MetricsServer,
  type MetricsSnapshot,
  SNAPSHOT_MAX_AGE_MS,
  startMetricsServer,
} from '../daemon/metrics.js';
import * as native from '../shared/native.js';
import { eventually } from './helpers/daemon.js';

const servers: MetricsServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((server) => server.close()));
});

async function scrape(port: number, path = '/metrics', method = 'GET'): Promise<Response> {
  return fetch(`http://127.0.0.1:${port}${path}`, { method });
}

describe('metrics', () => {
  it('serves the pool gauges, counters and histograms on GET /metrics', async () => {
    let snapshot: MetricsSnapshot = {
      origins: [
        { origin: 'example.com:443', idle: 3, leased: 2, connecting: 1, waiting: 0 },
        { origin: '[2001:db8::1]:80', idle: 0, leased: 5 },
      ],
    };
    let snapshots = 0;
    let now = 0;
    const metrics = createMetrics(
      () => {
        snapshots++;
        return snapshot;
      },
      { perOrigin: true, now: () => now },
    );
    metrics.hits.inc();
    metrics.hits.inc();
    metrics.misses.inc();
    metrics.refusals.inc({ reason: 'loopback' });
    metrics.refusals.inc({ reason: 'access' });
    metrics.deadDropped.inc({ reason: 'eof' });
    metrics.deadDropped.inc({ reason: 'recycled' });
    metrics.connectFailures.inc({ reason: 'ECONNREFUSED' });
    metrics.protocolErrors.inc();
    metrics.socketsOpened.inc({ purpose: 'lookahead' });
    metrics.socketsNeverLent.inc({ purpose: 'lookahead', reason: 'ttl' });
    metrics.handoffSeconds.observe(0.00003); // 30 µs
    metrics.handoffSeconds.observe(0.002); // 2 ms
    metrics.connectSeconds.observe(0.015);

    const server = await startMetricsServer(metrics, 0, '127.0.0.1');
    servers.push(server);
    expect(server.port).toBeGreaterThan(0);
    const response = await scrape(server.port);
    expect(response.status).toBe(200);
    expect(response.headers.get('content-type')).toContain('text/plain');
    const text = await response.text();
    const lines = text.split('\n');
    const expected = [
      'sockpool_idle_sockets{origin="example.com:443"} 3',
      'sockpool_idle_sockets{origin="[2001:db8::1]:80"} 0',
      'sockpool_leased_sockets{origin="example.com:443"} 2',
      'sockpool_leased_sockets{origin="[2001:db8::1]:80"} 5',
      'sockpool_connecting_sockets{origin="example.com:443"} 1',
      'sockpool_waiting_acquires{origin="example.com:443"} 0',
      'sockpool_pool_idle_sockets 3',
      'sockpool_pool_leased_sockets 7',
      'sockpool_pool_connecting_sockets 1',
      'sockpool_pool_waiting_acquires 0',
      'sockpool_deferred_closes_queued 0', // (native.deferredCloses: test/daemon-fuse-fd.system)
      'sockpool_deferred_close_threads_stuck 0',
      'sockpool_acquire_hits_total 2',
      'sockpool_acquire_misses_total 1',
      'sockpool_refusals_total{reason="loopback"} 1',
      'sockpool_refusals_total{reason="access"} 1',
      'sockpool_dead_sockets_dropped_total{reason="eof"} 1',
      'sockpool_dead_sockets_dropped_total{reason="recycled"} 1',
      'sockpool_dead_sockets_dropped_total{reason="ttl"} 0', // exported from the start
      'sockpool_connect_failures_total{reason="ECONNREFUSED"} 1',
      'sockpool_protocol_errors_total 1',
      'sockpool_sockets_opened_total{purpose="lookahead"} 1',
      'sockpool_sockets_opened_total{purpose="refill"} 0', // exported from the start
      'sockpool_sockets_never_lent_total{purpose="lookahead",reason="ttl"} 1',
      'sockpool_handoff_duration_seconds_bucket{le="0.00001"} 0',
      'sockpool_handoff_duration_seconds_bucket{le="0.00005"} 1',
      'sockpool_handoff_duration_seconds_bucket{le="0.0025"} 2',
      'sockpool_handoff_duration_seconds_bucket{le="0.1"} 2',
      'sockpool_handoff_duration_seconds_bucket{le="+Inf"} 2',
      'sockpool_handoff_duration_seconds_count 2',
      'sockpool_connect_duration_seconds_bucket{le="0.01"} 0',
      'sockpool_connect_duration_seconds_bucket{le="0.025"} 1',
      'sockpool_connect_duration_seconds_count 1',
    ];
    for (const line of expected) expect(lines, line).toContain(line);
    // No series for a value the snapshot does not give.
    expect(text).not.toContain('sockpool_connecting_sockets{origin="[2001:db8::1]:80"}');
    expect(text).toContain('# TYPE sockpool_handoff_duration_seconds histogram');
    expect(text).toContain('# HELP sockpool_idle_sockets ');
    expect(text).toMatch(/^process_resident_memory_bytes \d+/m);
    // One snapshot per scrape, shared by the per-origin gauges and their totals.
    expect(snapshots).toBe(1);

    // Gauges follow the pool at the next scrape once the last walk of the pools is SNAPSHOT_MAX_AGE_MS old: an origin
    // gone from the snapshot disappears.
    snapshot = { origins: [{ origin: 'example.com:443', idle: 7, leased: 0 }] };
    now += SNAPSHOT_MAX_AGE_MS;
    const next = await (await scrape(server.port)).text();
    expect(next.split('\n')).toContain('sockpool_idle_sockets{origin="example.com:443"} 7');
    expect(next).not.toContain('[2001:db8::1]:80');
  });

  it("renders its handoff histogram exactly as prom-client's Histogram renders the same observations", async () => {
    const config = (registry: Registry) => ({
      name: 'sockpool_handoff_duration_seconds',
      help: 'From an acquire received to its fd sent.',
      buckets: HANDOFF_BUCKETS_SECONDS,
      registers: [registry],
    });
    const theirs = new Registry();
    const ours = new Registry();
    const reference = new Histogram(config(theirs));
    const counting = new CountingHistogram(config(ours));
    const render = async () => [
      await theirs.metrics(),
      await ours.metrics(),
      await theirs.getMetricsAsJSON(),
      await ours.getMetricsAsJSON(),
    ];
    let [text, ourText, json, ourJson] = await render();
    expect(ourText).toBe(text);
    // On a bound, between bounds, past the last, zero and below every bound.
    for (const value of [0.00003, 0.002, 0.00001, 0.1, 0.5, 0, 1e-7, 0.000025, 0.0000251, 3.7]) {
      reference.observe(value);
      counting.observe(value);
    }
    [text, ourText, json, ourJson] = await render();
    expect(ourText).toBe(text);
    expect(JSON.stringify(ourJson)).toBe(JSON.stringify(json));
    reference.reset();
    counting.reset();
    expect(await ours.metrics()).toBe(await theirs.metrics());
    expect(() => counting.observe(Number.NaN)).toThrow(TypeError);
  });

  it('walks the pools at most once per SNAPSHOT_MAX_AGE_MS, however many scrapes come: any local uid can scrape', async () => {
    let now = 0;
    let snapshots = 0;
    let idle = 1;
    const metrics = createMetrics(
      () => {
        snapshots++;
        return { origins: [{ origin: 'a.example:443', idle, leased: 0 }] };
      },
      { processMetrics: false, now: () => now },
    );
    const server = await startMetricsServer(metrics, 0, '127.0.0.1', { now: () => now });
    servers.push(server);
    // A flood, sequential and concurrent (within METRICS_MAX_ANSWERS a period): one walk of the pools.
    for (let i = 0; i < 8; i++) await (await scrape(server.port)).text();
    // (Concurrent within METRICS_MAX_CONNECTIONS: the endpoint closes connections past it.)
    await Promise.all(Array.from({ length: 6 }, async () => (await scrape(server.port)).text()));
    expect(snapshots).toBe(1);
    // Every value, the counters' too, is at most SNAPSHOT_MAX_AGE_MS old (one rendering serves them all).
    metrics.hits.inc(3);
    idle = 5;
    const text = await (await scrape(server.port)).text();
    expect(text.split('\n')).toEqual(
      expect.arrayContaining(['sockpool_acquire_hits_total 0', 'sockpool_pool_idle_sockets 1']),
    );
    now += SNAPSHOT_MAX_AGE_MS;
    expect((await (await scrape(server.port)).text()).split('\n')).toEqual(
      expect.arrayContaining(['sockpool_acquire_hits_total 3', 'sockpool_pool_idle_sockets 5']),
    );
    expect(snapshots).toBe(2);
  });

  it('renders its text at most once per SNAPSHOT_MAX_AGE_MS however many scrapes come: a scrape loop cannot hold the loop', async () => {
    // Rendering the registry costs the daemon's one event loop 2-3 ms, and any local uid reaches the endpoint: a
    // scraping loop over its 16 connections held the loop (every handoff waited behind it). The renders are counted
    // by a collector of the registry's own, called once per rendering as every collector is.
    let now = 0;
    let renders = 0;
    const metrics = createMetrics(() => ({ origins: [] }), { now: () => now });
    new Gauge({
      name: 'test_renders',
      help: 'Renders of the registry.',
      registers: [metrics.registry],
      collect() {
        renders++;
      },
    });
    const server = await startMetricsServer(metrics, 0, '127.0.0.1', { now: () => now });
    servers.push(server);
    // A loop, sequential and concurrent (as many as the endpoint answers in a period, METRICS_MAX_ANSWERS): one
    // rendering serves them all.
    for (let i = 0; i < 8; i++) expect((await scrape(server.port)).status).toBe(200);
    await Promise.all(Array.from({ length: METRICS_MAX_ANSWERS - 8 }, async () => (await scrape(server.port)).text()));
    expect(renders).toBe(1);
    // A scraper asking every SNAPSHOT_MAX_AGE_MS or less often sees every value as it is at its scrape.
    for (let round = 1; round <= 3; round++) {
      metrics.hits.inc();
      now += SNAPSHOT_MAX_AGE_MS;
      const text = await (await scrape(server.port)).text();
      expect(text.split('\n')).toContain(`sockpool_acquire_hits_total ${round}`);
      expect(text).toMatch(/^process_resident_memory_bytes \d+/m);
    }
    expect(renders).toBe(4);
  });

  it('sends at most METRICS_MAX_ANSWERS answers per SNAPSHOT_MAX_AGE_MS: scrapers looping on every connection wait their turn', async () => {
    // Even from the rendering kept, each answer costs the daemon's loop its parsing and the sending of the text
    // (about 50 µs): a loop of scrapes over the endpoint's 16 connections took 40% of the loop, measured. The
    // answers are counted here while the clock stands still, then as it moves one SNAPSHOT_MAX_AGE_MS at a time.
    let now = 0;
    const clock = () => now;
    const metrics = createMetrics(() => ({ origins: [] }), { processMetrics: false, now: clock });
    const server = await startMetricsServer(metrics, 0, '127.0.0.1', { now: clock });
    servers.push(server);
    const agent = new Agent({ keepAlive: true, maxSockets: METRICS_MAX_CONNECTIONS });
    let answers = 0;
    let stop = false;
    const loop = async () => {
      while (!stop) {
        const ok = await new Promise<boolean>((resolve) => {
          const asking = request({ port: server.port, path: '/metrics', agent }, (response) => {
            response.resume();
            response.on('end', () => resolve(response.statusCode === 200));
          });
          asking.on('error', () => resolve(false));
          asking.end();
        });
        if (ok) answers++;
      }
    };
    const loops = Array.from({ length: METRICS_MAX_CONNECTIONS }, loop);
    try {
      for (let window = 1; window <= 3; window++) {
        await eventually(
          () => answers >= window * METRICS_MAX_ANSWERS,
          () => `${answers} answers in window ${window}`,
        );
        // No more while the window lasts, however fast the loops ask.
        expect(answers).toBe(window * METRICS_MAX_ANSWERS);
        now += SNAPSHOT_MAX_AGE_MS;
      }
    } finally {
      stop = true;
      now += 10 * SNAPSHOT_MAX_AGE_MS;
      agent.destroy();
      await Promise.allSettled(loops);
    }
  });

  it('closes a connection that sends a request before its last one was answered: a pipelined burst is not queued', async () => {
    const metrics = createMetrics(() => ({ origins: [] }), { processMetrics: false });
    const server = await startMetricsServer(metrics, 0);
    servers.push(server);
    const pipelined = connect(server.port, '127.0.0.1');
    await once(pipelined, 'connect');
    let answered = '';
    pipelined.setEncoding('latin1');
    pipelined.on('data', (chunk: string) => {
      answered += chunk;
    });
    pipelined.write('GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n'.repeat(200));
    await once(pipelined, 'close');
    expect(answered.split('HTTP/1.1 200 OK').length - 1).toBeLessThanOrEqual(1);
    // One request at a time on a connection is served as ever.
    for (let i = 0; i < 3; i++) expect((await scrape(server.port)).status).toBe(200);
  });

  it('keeps the connections it holds while it accepts no more (METRICS_MAX_ACCEPTS a period): a scraper keeps its keep-alive connection', async () => {
    // Past METRICS_MAX_ACCEPTS accepts in a period the endpoint closes its listening handle until the period ends
    // (test/daemon-access counts the accepts of a flood against a daemon); the connections it has are not closed.
    let now = 0;
    const clock = () => now;
    const metrics = createMetrics(() => ({ origins: [] }), { processMetrics: false, now: clock });
    const server = await startMetricsServer(metrics, 0, '127.0.0.1', { now: clock });
    servers.push(server);
    const scraper = connect(server.port, '127.0.0.1');
    let answered = '';
    scraper.setEncoding('latin1');
    scraper.on('data', (chunk: string) => {
      answered += chunk;
    });
    let closed = false;
    scraper.on('close', () => {
      closed = true;
    });
    const answers = () => answered.split('HTTP/1.1 200 OK').length - 1;
    scraper.write('HEAD /metrics HTTP/1.1\r\nhost: x\r\n\r\n');
    await eventually(() => answers() === 1, 'the first answer');
    // The rest of the period's accepts, by connections that close at once, and one more.
    for (let i = 1; i <= METRICS_MAX_ACCEPTS; i++) {
      const socket = connect(server.port, '127.0.0.1');
      socket.on('error', () => {});
      await once(socket, 'connect');
      socket.destroy();
    }
    scraper.write('HEAD /metrics HTTP/1.1\r\nhost: x\r\n\r\n');
    await eventually(() => answers() === 2 || closed, 'the second answer');
    expect(closed).toBe(false);
    // The next period accepts again.
    now += SNAPSHOT_MAX_AGE_MS;
    expect((await scrape(server.port)).status).toBe(200);
    scraper.destroy();
  });

  it('reads the process metrics at most once per SNAPSHOT_MAX_AGE_MS: with many fds each read costs milliseconds', async () => {
    let now = 0;
    const metrics = createMetrics(() => ({ origins: [] }), { now: () => now });
    const openFds = async () => Number(/^process_open_fds (\d+)$/m.exec(await metrics.text())?.[1]);
    const first = await openFds();
    const pairs = Array.from({ length: 20 }, () => native.seqpacketPair());
    try {
      // 40 fds more, and the scrape that follows at once still says what the last read found.
      expect(await openFds()).toBe(first);
      now += SNAPSHOT_MAX_AGE_MS;
      expect(await openFds()).toBeGreaterThanOrEqual(first + 40);
    } finally {
      for (const pair of pairs) for (const fd of pair) native.close(fd);
    }
  });

  it('names at most METRICS_MAX_ORIGINS origins, the busiest, and sums the rest under origin="other"', async () => {
    // A client acquiring thousands of junk origins must not make thousands of series in the operator's Prometheus.
    const junk = Array.from({ length: 1000 }, (_, i) => ({
      origin: `junk-${i}.example:443`,
      idle: 1,
      leased: 0,
      connecting: 1,
      waiting: 0,
      demandRatePerS: 0.01,
    }));
    const busy = { origin: 'busy.example:443', idle: 4, leased: 3, connecting: 0, waiting: 2, demandRatePerS: 50 };
    const metrics = createMetrics(() => ({ origins: [...junk, busy] }), { processMetrics: false, perOrigin: true });
    const lines = (await metrics.text()).split('\n');
    for (const gauge of ['sockpool_idle_sockets', 'sockpool_leased_sockets', 'sockpool_connecting_sockets']) {
      const series = lines.filter((line) => line.startsWith(`${gauge}{`));
      expect(series.length, gauge).toBe(METRICS_MAX_ORIGINS + 1);
    }
    expect(lines).toEqual(
      expect.arrayContaining([
        'sockpool_idle_sockets{origin="busy.example:443"} 4',
        'sockpool_waiting_acquires{origin="busy.example:443"} 2',
        `sockpool_idle_sockets{origin="other"} ${1000 - (METRICS_MAX_ORIGINS - 1)}`,
        `sockpool_connecting_sockets{origin="other"} ${1000 - (METRICS_MAX_ORIGINS - 1)}`,
        // The totals count every origin.
        'sockpool_pool_idle_sockets 1004',
        'sockpool_pool_connecting_sockets 1000',
      ]),
    );
    // A family learned is one origin's, not a sum: no "other" there.
    expect(lines.filter((line) => line.startsWith('sockpool_learned_family{origin="other"'))).toEqual([]);
  });

  it("exports an origin's shared cap in each of its rows (metricsPerOrigin): its connections over all ways, its maxPerOrigin and the acquires waiting at it, for the named origins only", async () => {
    const sharedCap = { connections: 4, maxPerOrigin: 4, waiting: 3 };
    const junk = Array.from({ length: METRICS_MAX_ORIGINS }, (_, i) => ({
      origin: `junk-${i}.example:443`,
      idle: 0,
      leased: 1,
      demandRatePerS: 0.01,
      // Past the busiest: not named, and not summed under "other" (each row repeats its origin's figure).
      ...(i === METRICS_MAX_ORIGINS - 1 ? { sharedCap: { connections: 1, maxPerOrigin: 8, waiting: 0 } } : {}),
    }));
    const metrics = createMetrics(
      () => ({
        origins: [
          ...junk,
          { origin: 'busy.example:443', idle: 0, leased: 3, waiting: 2, demandRatePerS: 50, sharedCap },
          { origin: 'busy.example:443 via corp', idle: 0, leased: 1, waiting: 1, demandRatePerS: 20, sharedCap },
          { origin: 'lone.example:443', idle: 1, leased: 0, demandRatePerS: 10 },
        ],
      }),
      { processMetrics: false, perOrigin: true },
    );
    const lines = (await metrics.text()).split('\n');
    const series = (gauge: string) => lines.filter((line) => line.startsWith(`${gauge}{`));
    expect(series('sockpool_shared_cap_connections')).toEqual([
      'sockpool_shared_cap_connections{origin="busy.example:443"} 4',
      'sockpool_shared_cap_connections{origin="busy.example:443 via corp"} 4',
    ]);
    expect(series('sockpool_shared_cap_max_connections')).toEqual([
      'sockpool_shared_cap_max_connections{origin="busy.example:443"} 4',
      'sockpool_shared_cap_max_connections{origin="busy.example:443 via corp"} 4',
    ]);
    expect(series('sockpool_shared_cap_waiting_acquires')).toEqual([
      'sockpool_shared_cap_waiting_acquires{origin="busy.example:443"} 3',
      'sockpool_shared_cap_waiting_acquires{origin="busy.example:443 via corp"} 3',
    ]);
    // Without metricsPerOrigin: none (they name origins), and no total (a sum over caps means nothing).
    const totalsOnly = createMetrics(
      () => ({ origins: [{ origin: 'busy.example:443', idle: 0, leased: 3, sharedCap }] }),
      { processMetrics: false },
    );
    expect(await totalsOnly.text()).not.toContain('sockpool_shared_cap');
  });

  it('names no origin unless asked to (metricsPerOrigin): the totals only', async () => {
    const metrics = createMetrics(
      () => ({ origins: [{ origin: 'secret.example:443', idle: 2, leased: 1, connecting: 0, waiting: 0 }] }),
      { processMetrics: false },
    );
    const server = await startMetricsServer(metrics, 0, '127.0.0.1');
    servers.push(server);
    const text = await (await scrape(server.port)).text();
    expect(text).not.toContain('secret.example');
    expect(text).not.toContain('origin=');
    expect(text.split('\n')).toEqual(
      expect.arrayContaining(['sockpool_pool_idle_sockets 2', 'sockpool_pool_leased_sockets 1']),
    );
  });

  it("keeps its metrics off prom-client's global registry, so two daemons in one process do not clash", async () => {
    const first = createMetrics(() => ({ origins: [] }), { processMetrics: false });
    const second = createMetrics(() => ({ origins: [] }), { processMetrics: false });
    first.hits.inc(5);
    expect(await globalRegistry.metrics()).not.toContain('sockpool_');
    expect(await second.text()).toContain('sockpool_acquire_hits_total 0');
    expect(await first.text()).toContain('sockpool_acquire_hits_total 5');
    expect(await first.text()).not.toContain('process_resident_memory_bytes');
  });

  it('answers 404 elsewhere, 405 for other methods, HEAD without a body', async () => {
    const server = await startMetricsServer(
      createMetrics(() => ({ origins: [] }), { processMetrics: false }),
      0,
    );
    servers.push(server);
    expect((await scrape(server.port, '/')).status).toBe(404);
    expect((await scrape(server.port, '/metrics/x')).status).toBe(404);
    expect((await scrape(server.port, '/metrics?name[]=x')).status).toBe(200);
    const post = await scrape(server.port, '/metrics', 'POST');
    expect(post.status).toBe(405);
    expect(post.headers.get('allow')).toBe('GET, HEAD');
    const head = await scrape(server.port, '/metrics', 'HEAD');
    expect(head.status).toBe(200);
    expect(await head.text()).toBe('');
  });

  it('listens on 127.0.0.1 by default', async () => {
    const server = await startMetricsServer(
      createMetrics(() => ({ origins: [] }), { processMetrics: false }),
      0,
    );
    servers.push(server);
    expect((await scrape(server.port)).status).toBe(200);
    // Not reachable on the machine's other addresses (when it has one: containers may have only loopback).
    const external = Object.values(networkInterfaces())
      .flat()
      .find((entry) => entry?.family === 'IPv4' && !entry.internal);
    if (external) await expect(fetch(`http://${external.address}:${server.port}/metrics`)).rejects.toThrow();
  });

  it('rejects when the port is in use', async () => {
    const metrics = createMetrics(() => ({ origins: [] }), { processMetrics: false });
    const server = await startMetricsServer(metrics, 0);
    servers.push(server);
    await expect(startMetricsServer(metrics, server.port, '127.0.0.1')).rejects.toMatchObject({ code: 'EADDRINUSE' });
  });

  it('close() ends keep-alive connections too', async () => {
    const server = await startMetricsServer(
      createMetrics(() => ({ origins: [] }), { processMetrics: false }),
      0,
    );
    const response = await scrape(server.port);
    await response.text();
    await server.close(); // resolves although fetch keeps its connection alive
    await expect(scrape(server.port)).rejects.toThrow();
  });
});
