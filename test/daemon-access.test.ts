// Access control, per-client limits, the global idle cap, DNS fall-back between addresses and the metrics
// endpoint: a real sockpoold child process each time, loopback servers only. What needs root (a client of another
// uid, socket marks) is in daemon-access.system.test.ts.
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { METRICS_MAX_ACCEPTS, METRICS_MAX_CONNECTIONS, SNAPSHOT_MAX_AGE_MS } from '../daemon/metrics.js';
import * as native from '../shared/native.js';
import { daemonScope } from './fixtures/daemon-scope.js';
import { eventually } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';

const run = promisify(execFile);
const { cleanups, echoServer, daemonWith, client } = daemonScope();

/** Resolves once a scrape of the metrics endpoint on `port` is answered 200 (a refused connect tries again). */
function scrapeAnswered(port: number): Promise<void> {
  return eventually(async () => {
    try {
      return (await fetch(`http://127.0.0.1:${port}/metrics`)).status === 200;
    } catch {
      return false;
    }
  }, 'a scrape answered');
}

/** A port nobody listens on right now (bound then released). */
describe('access control', () => {
  it('refuses a peer whose uid is not in allowUids: one SOCKPOOL_ERR_ACCESS_DENIED, then it hangs up', async () => {
    const uid = process.getuid!();
    const sockpoold = await daemonWith({ access: { allowUids: [uid + 1] } }, []);
    const raw = client(sockpoold.socketPath);
    // Nothing sent: the daemon speaks first, with the refusal.
    const refusal = await raw.receive();
    expect(refusal.message).toMatchObject({
      type: 'error',
      id: null,
      code: 'SOCKPOOL_ERR_ACCESS_DENIED',
      message: expect.stringContaining(`uid ${uid} `),
    });
    expect(refusal.fds).toEqual([]);
    expect((await raw.receive()).eof).toBe(true);
    // The log line follows the refusal.
    await eventually(() => sockpoold.output().includes('client refused by access control'), 'refusal logged');
  });

  it('applies the configured socket file mode', async () => {
    const sockpoold = await daemonWith({ access: { socketMode: '0600' } }, []);
    const { stdout } = await run('stat', ['-c', '%a', sockpoold.socketPath]);
    expect(stdout.trim()).toBe('600');
  });
});

describe('per-client limits', () => {
  it('refuses acquires beyond maxPendingPerClient and leases beyond maxLeasesPerClient with SOCKPOOL_ERR_LIMIT', async () => {
    const echo = await echoServer();
    const sockpoold = await daemonWith(
      {
        access: { maxPendingPerClient: 2, maxLeasesPerClient: 3 },
        pool: { defaults: { maxPerOrigin: 1, maxIdle: 1 } },
      },
      ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)],
    );
    const raw = client(sockpoold.socketPath);
    const held = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    expect(held.message?.type).toBe('lease');
    // maxPerOrigin 1 is taken: the next two wait (pending 2), the third is over the pending limit.
    raw.sendJson({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port, timeoutMs: 5000 });
    raw.sendJson({ type: 'acquire', id: 3, host: '127.0.0.1', port: echo.port, timeoutMs: 5000 });
    const over = await raw.request({ type: 'acquire', id: 4, host: '127.0.0.1', port: echo.port });
    expect(over.message).toMatchObject({ type: 'error', id: 4, code: 'SOCKPOOL_ERR_LIMIT' });
    for (const fd of held.fds) native.close(fd);
    // Disconnecting frees everything this client had.
    raw.close();
    cleanups.pop();
    const other = client(sockpoold.socketPath);
    await eventually(async () => {
      const reply = await other.request({ type: 'stats', id: 9 });
      const stats = (reply.message as unknown as { stats: { leased: number; waiting: number } }).stats;
      return stats.leased === 0 && stats.waiting === 0;
    }, 'leases and waiters of the gone client freed');
  });
});

describe('per-client limits on token requests', () => {
  it('counts token requests waiting on a rate-limited origin as pending: one beyond maxPendingPerClient is refused', async () => {
    const echo = await echoServer();
    const sockpoold = await daemonWith(
      { access: { maxPendingPerClient: 2 }, pool: { defaults: { requestsPerSecond: 0.01, burst: 1 } } },
      ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)],
    );
    const raw = client(sockpoold.socketPath);
    const first = await raw.request({ type: 'tokens', id: 1, host: '127.0.0.1', port: echo.port, count: 1 });
    expect(first.message).toMatchObject({ type: 'tokens', id: 1, granted: 1 });
    // The burst is spent: the next two wait for a token (pending 2), the third is over the pending limit.
    raw.sendJson({ type: 'tokens', id: 2, host: '127.0.0.1', port: echo.port, count: 1, timeoutMs: 600_000 });
    raw.sendJson({ type: 'tokens', id: 3, host: '127.0.0.1', port: echo.port, count: 1, timeoutMs: 600_000 });
    const over = await raw.request({ type: 'tokens', id: 4, host: '127.0.0.1', port: echo.port, count: 1 });
    expect(over.message).toMatchObject({ type: 'error', id: 4, code: 'SOCKPOOL_ERR_LIMIT' });
  });

  it('does not count token requests waiting as leases: maxLeasesPerClient is leases and acquires pending', async () => {
    const limited = await echoServer();
    const plain = await echoServer();
    const sockpoold = await daemonWith(
      {
        access: { maxLeasesPerClient: 2, maxPendingPerClient: 4 },
        pool: { origins: [{ match: `127.0.0.1:${limited.port}`, requestsPerSecond: 0.01, burst: 1 }] },
      },
      ['--allow', '127.0.0.1/32', '--allow-port', String(limited.port), '--allow-port', String(plain.port)],
    );
    const raw = client(sockpoold.socketPath);
    const first = await raw.request({ type: 'tokens', id: 1, host: '127.0.0.1', port: limited.port, count: 1 });
    expect(first.message).toMatchObject({ type: 'tokens', id: 1, granted: 1 });
    // Two waits for the next tokens (100 s and 200 s away): no lease comes of either.
    raw.sendJson({ type: 'tokens', id: 2, host: '127.0.0.1', port: limited.port, count: 1, timeoutMs: 600_000 });
    raw.sendJson({ type: 'tokens', id: 3, host: '127.0.0.1', port: limited.port, count: 1, timeoutMs: 600_000 });
    const leases = [
      await raw.request({ type: 'acquire', id: 4, host: '127.0.0.1', port: plain.port }),
      await raw.request({ type: 'acquire', id: 5, host: '127.0.0.1', port: plain.port }),
    ];
    for (const lease of leases) for (const fd of lease.fds) native.close(fd);
    expect(leases.map((lease) => lease.message?.type)).toEqual(['lease', 'lease']);
    // The third is over the limit, and its error counts what the limit counts: two leases, no acquire pending.
    const over = await raw.request({ type: 'acquire', id: 6, host: '127.0.0.1', port: plain.port });
    expect(over.message).toMatchObject({ type: 'error', id: 6, code: 'SOCKPOOL_ERR_LIMIT' });
    expect((over.message as { message: string }).message).toMatch(/holds 2 leases, .* with 0 acquires pending/);
  });
});

describe('pool bounds and DNS', () => {
  it('never holds more idle sockets than maxIdleTotal across origins', async () => {
    const first = await echoServer();
    const second = await echoServer();
    const sockpoold = await daemonWith({ pool: { maxIdleTotal: 3, defaults: { maxIdle: 8 } } }, [
      '--allow',
      '127.0.0.1/32',
      '--allow-port',
      String(first.port),
      '--allow-port',
      String(second.port),
    ]);
    const raw = client(sockpoold.socketPath);
    // Prewarms are cut to the room the cap leaves (what is idle, connecting or queued counts), or past it to the
    // origin's part of the cap by demand (the second, asking for more: 0.5/s of 0.8, one of 3): four connects in all,
    // and the idle sockets never past the cap.
    const prewarm = async (id: number, port: number) =>
      ((await raw.request({ type: 'prewarm', id, host: '127.0.0.1', port, count: 5 })).message as { granted?: number })
        .granted;
    expect([await prewarm(1, first.port), await prewarm(2, second.port)]).toEqual([3, 1]);
    await first.waitForConnections(3);
    await second.waitForConnections(1);
    // Sampled while the connects come in, and after the last.
    let id = 100;
    await eventually(async () => {
      const reply = await raw.request({ type: 'stats', id: id++ });
      const stats = (reply.message as unknown as { stats: { idle: number; connecting: number } }).stats;
      expect(stats.idle).toBeLessThanOrEqual(3);
      return stats.connecting === 0;
    }, 'every prewarm connect in');
    const reply = await raw.request({ type: 'stats', id: id++ });
    expect((reply.message as unknown as { stats: { idle: number } }).stats.idle).toBe(3);
  });

  it('falls back to the next address when one refuses the connection', async () => {
    const echo = await echoServer('127.0.0.1');
    // 127.0.0.2 has nothing listening on that port: ECONNREFUSED, then 127.0.0.1 answers.
    const sockpoold = await daemonWith({}, [
      '--allow',
      '127.0.0.0/8',
      '--allow-port',
      String(echo.port),
      '--resolve',
      `multi.test:${echo.port}:127.0.0.2,127.0.0.1`,
      '--resolve',
      `refused.test:${echo.port}:127.0.0.2`,
    ]);
    const raw = client(sockpoold.socketPath);
    // With no address left to fall back to, the error names the kernel's reason.
    const refused = await raw.request({ type: 'acquire', id: 100, host: 'refused.test', port: echo.port });
    expect(refused.message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_CONNECT',
      fields: { causeCode: 'ECONNREFUSED' },
    });
    for (let i = 0; i < 3; i++) {
      const lease = await raw.request({ type: 'acquire', id: i, host: 'multi.test', port: echo.port });
      expect(lease.message).toMatchObject({ type: 'lease', address: '127.0.0.1' });
      for (const fd of lease.fds) native.close(fd);
    }
  });
});

describe('per-origin socket settings', () => {
  it('binds the source address and applies the socket options an origin override names', async () => {
    const echo = await echoServer();
    const sockpoold = await daemonWith(
      {
        pool: {
          origins: [
            {
              match: `127.0.0.1:${echo.port}`,
              sourceAddress: '127.0.0.2',
              keepAlive: { enabled: true, idleSec: 7, intervalSec: 3, count: 2 },
              userTimeoutMs: 5000,
            },
          ],
        },
      },
      ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port)],
    );
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    expect(lease.message?.type).toBe('lease');
    // The origin sees the connection coming from the configured source address.
    await echo.waitForConnections(1);
    expect(echo.connections[0]?.remoteAddress).toBe('127.0.0.2');
    expect(native.localAddress(lease.fds[0]!).address).toBe('127.0.0.2');
    for (const fd of lease.fds) native.close(fd);
  });
});

describe('stats', () => {
  it('answers stats with hundreds of origins: the busiest 50 listed, the rest counted', async () => {
    const echo = await echoServer();
    const resolve = Array.from({ length: 120 }, (_, i) => ['--resolve', `h${i}.test:${echo.port}:127.0.0.1`]).flat();
    const sockpoold = await daemonWith({ pool: { predictive: false } }, [
      '--allow',
      '127.0.0.1/32',
      '--allow-port',
      String(echo.port),
      ...resolve,
    ]);
    const raw = client(sockpoold.socketPath);
    for (let i = 0; i < 120; i++) {
      const lease = await raw.request({ type: 'acquire', id: i, host: `h${i}.test`, port: echo.port });
      expect(lease.message?.type).toBe('lease');
      for (const fd of lease.fds) native.close(fd);
    }
    const reply = await raw.request({ type: 'stats', id: 1000 });
    const stats = (
      reply.message as unknown as { stats: { originCount: number; origins: unknown[]; originsOmitted: number } }
    ).stats;
    expect(stats).toMatchObject({ originCount: 120, originsOmitted: 70 });
    expect(stats.origins).toHaveLength(50);
  });
});

describe('metrics', () => {
  it('serves Prometheus text on the metrics port with hits, misses and the pool totals, naming no origin by default', async () => {
    const echo = await echoServer();
    const metricsPort = await freePort();
    const withMetrics = await daemonWith({}, [
      '--allow',
      '127.0.0.1/32',
      '--allow-port',
      String(echo.port),
      '--metrics-port',
      String(metricsPort),
    ]);
    const raw = client(withMetrics.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    for (const fd of lease.fds) native.close(fd);
    await raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: 1 }); // refused: port
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(text).toMatch(/sockpool_acquire_misses_total 1/);
    expect(text).toMatch(/sockpool_refusals_total\{reason="port"\} 1/);
    // No origin named by default (metricsPerOrigin): every local uid can reach the endpoint. The totals count it.
    expect(text).not.toContain(`127.0.0.1:${echo.port}`);
    expect(text).toMatch(/^sockpool_pool_leased_sockets 1$/m);
    // The process metrics come with the endpoint (without one the daemon does not collect them: test/daemon-idle).
    expect(text).toMatch(/^process_resident_memory_bytes \d+/m);
  });

  it('exports every running total as a counter named _total, none as a gauge: rate() takes a restart for what it is', async () => {
    const metricsPort = await freePort();
    await daemonWith({}, ['--metrics-port', String(metricsPort)]);
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const types = new Map([...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((match) => [match[1]!, match[2]!]));
    // Totals of the warm TLS relay, the rate limiter and the fleet were gauges without `_total` (registered whether
    // or not those are on).
    for (const name of [
      'sockpool_tls_relay_bytes_to_origin',
      'sockpool_tls_relay_bytes_from_origin',
      'sockpool_tls_handshakes',
      'sockpool_tls_handshake_failures',
      'sockpool_tls_relay_cpu_seconds',
      'sockpool_rate_tokens_granted',
      'sockpool_rate_limited',
      'sockpool_rate_waits',
      'sockpool_fleet_outages',
      'sockpool_fleet_fallback_slots',
      'sockpool_fleet_fallback_tokens',
      'sockpool_fleet_refused',
      'sockpool_fleet_slot_waits',
    ]) {
      expect(types.get(`${name}_total`), name).toBe('counter');
      expect(types.has(name), name).toBe(false);
    }
    // And no gauge of ours is named as a counter would be (prom-client's own nodejs_active_*_total are gauges).
    const gaugesNamedTotal = [...types].filter(
      ([name, type]) => name.startsWith('sockpool_') && name.endsWith('_total') && type !== 'counter',
    );
    expect(gaugesNamedTotal).toEqual([]);
  });

  it('counts the refusals of its own limits in sockpool_refusals_total: limit, quota, acquire_timeout', async () => {
    const echo = await echoServer();
    const metricsPort = await freePort();
    const sockpoold = await daemonWith(
      {
        access: { maxLeasesPerClient: 1 },
        quotas: { maxPrewarmPerUid: 0 },
        pool: { defaults: { maxPerOrigin: 1, maxIdle: 1 } },
      },
      ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port), '--metrics-port', String(metricsPort)],
    );
    const holder = client(sockpoold.socketPath);
    const other = client(sockpoold.socketPath);
    const acquire = (raw: typeof holder, id: number, timeoutMs?: number) =>
      raw.request({ type: 'acquire', id, host: '127.0.0.1', port: echo.port, ...(timeoutMs ? { timeoutMs } : {}) });
    const lease = await acquire(holder, 1);
    expect(lease.message?.type).toBe('lease');
    expect((await acquire(holder, 2)).message).toMatchObject({ code: 'SOCKPOOL_ERR_LIMIT' });
    expect((await acquire(other, 3, 50)).message).toMatchObject({ code: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT' });
    const prewarm = await other.request({ type: 'prewarm', id: 4, host: '127.0.0.1', port: echo.port, count: 1 });
    expect(prewarm.message).toMatchObject({ code: 'SOCKPOOL_ERR_QUOTA' });
    for (const fd of lease.fds) native.close(fd);
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    for (const reason of ['limit', 'acquire_timeout', 'quota']) {
      expect(text.split('\n'), reason).toContain(`sockpool_refusals_total{reason="${reason}"} 1`);
    }
  });

  it("never shows or logs fleet.redis's user and password: not in the log, stats or the metrics", async () => {
    const metricsPort = await freePort();
    const secret = 's3cret-pw-4711';
    // Nothing listens on port 1: the daemon logs Redis unavailable (with the server it tried) and carries on.
    const sockpoold = await daemonWith({ fleet: { redis: `redis://alice:${secret}@127.0.0.1:1/0` } }, [
      '--metrics-port',
      String(metricsPort),
    ]);
    await eventually(() => sockpoold.output().includes('Redis unavailable'), 'Redis unavailable logged');
    const raw = client(sockpoold.socketPath);
    const reply = await raw.request({ type: 'stats', id: 1 });
    const stats = JSON.stringify(reply.message);
    expect(stats).toContain('redis://127.0.0.1:1/0'); // the admin view names the server, without credentials
    const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    for (const [what, text] of [
      ['log', sockpoold.output()],
      ['stats', stats],
      ['metrics', metrics],
    ] as const) {
      expect(text, what).not.toContain(secret);
      expect(text, what).not.toContain('alice');
    }
  });

  it('holds at most METRICS_MAX_CONNECTIONS connections to the metrics port: any local uid can open them, each an fd of the daemon', async () => {
    const metricsPort = await freePort();
    const withMetrics = await daemonWith({}, ['--metrics-port', String(metricsPort)]);
    const before = withMetrics.fdCount();
    // Connections that never send a request, as a hostile local user would hold them.
    const sockets: Socket[] = [];
    cleanups.push(() => {
      for (const socket of sockets) socket.destroy();
    });
    await Promise.all(
      Array.from({ length: 200 }, async () => {
        const socket = connect(metricsPort, '127.0.0.1');
        socket.on('error', () => {});
        sockets.push(socket);
        await once(socket, 'connect');
      }),
    );
    await eventually(
      () => withMetrics.fdCount() <= before + METRICS_MAX_CONNECTIONS,
      () => `daemon fds ${withMetrics.fdCount()}, ${before} before 200 idle metrics connections`,
    );
    // The operator's scrape still gets through once those are gone.
    for (const socket of sockets) socket.destroy();
    await scrapeAnswered(metricsPort);
  });

  it('accepts at most METRICS_MAX_ACCEPTS connections per SNAPSHOT_MAX_AGE_MS on the metrics port: a connect flood cannot hold the loop', async () => {
    // Every connection Node accepts costs the daemon's loop (its socket, and below METRICS_MAX_CONNECTIONS an HTTP
    // parser and timers), the loop every handoff waits on: a local user's loops of connects (closing at once, or
    // sending nothing) took a fifth of it and more, at the user's pace. These loops send nothing: past the
    // METRICS_MAX_CONNECTIONS the daemon holds, a connection it accepts it closes at once, before we do, so the
    // connections it closes count those it accepted (a loop that closes at once costs it the same accept).
    const metricsPort = await freePort();
    await daemonWith({}, ['--metrics-port', String(metricsPort)]);
    let flooding = true;
    let closedByDaemon = 0;
    const open = new Set<Socket>();
    cleanups.push(() => {
      flooding = false;
      for (const socket of open) socket.destroy();
    });
    const loop = () => {
      if (!flooding) return;
      const socket = connect(metricsPort, '127.0.0.1');
      open.add(socket);
      socket.on('end', () => {
        if (flooding) closedByDaemon++;
      });
      socket.on('error', () => {});
      socket.on('close', () => {
        open.delete(socket);
        setImmediate(loop);
      });
    };
    const start = performance.now();
    for (let i = 0; i < 3 * METRICS_MAX_CONNECTIONS; i++) loop();
    await sleep(3 * SNAPSHOT_MAX_AGE_MS);
    flooding = false;
    const elapsed = performance.now() - start;
    // Each period of the daemon's begins at an accept at least SNAPSHOT_MAX_AGE_MS after the last one began, and
    // every connection counted was accepted within `elapsed`: a bound on the count, whatever the machine's pace.
    const periods = Math.floor(elapsed / SNAPSHOT_MAX_AGE_MS) + 1;
    expect(closedByDaemon).toBeLessThanOrEqual(METRICS_MAX_ACCEPTS * periods);
    // The operator's scrape gets through once the flood is over.
    for (const socket of open) socket.destroy();
    await scrapeAnswered(metricsPort);
  });
});
