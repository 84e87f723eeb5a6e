// A fleet of real daemons sharing one real redis-server (docs/fleet.md): connection caps across daemons under load
// from all of them, the slots of a SIGKILLed daemon coming back after the heartbeat expiry, Redis killed and
// restarted mid-load, rate limits across daemons, no Redis call on the warm handoff path, and bad fleet
// configuration refused with the key named. The origin is a real HTTP server that counts its open connections;
// it closes each connection after its answer (`Connection: close`), so every request is one connection, one slot.
import { execFile } from 'node:child_process';
import { createServer, type Socket } from 'node:net';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import * as native from '../shared/native.js';
import { daemonStats, fdCount, startTestDaemon } from './fixtures/client-helpers.js';
import { type DaemonProcess, daemonMain, eventually, writeConfigFile } from './helpers/daemon.js';
import { openRawClient } from './helpers/raw-client.js';
import { type RedisServer, startRedis } from './helpers/redis.js';

const run = promisify(execFile);

interface CountingOrigin {
  port: number;
  /** Connections open right now, and the most open at once since the last reset. */
  open: number;
  maxOpen: number;
  requests: number;
  reset(): void;
  close(): Promise<void>;
}

/**
 * An HTTP/1.1 origin on a bare TCP server that counts its open connections. It answers after `delayMs` with
 * `Connection: close` (one request, one connection, one fleet slot) unless `keepAlive`, and always keeps reading, so
 * a client's FIN is seen in the order the kernel delivered it: before the connect that the freed slot let another
 * daemon make. The count is then the connections the daemons hold, without this process's event-loop lag in it.
 */
async function countingOrigin(delayMs: number, keepAlive = false): Promise<CountingOrigin> {
  const sockets = new Set<Socket>();
  const origin: CountingOrigin = {
    port: 0,
    open: 0,
    maxOpen: 0,
    requests: 0,
    reset() {
      this.maxOpen = this.open;
      this.requests = 0;
    },
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
  const server = createServer((socket) => {
    sockets.add(socket);
    origin.open++;
    origin.maxOpen = Math.max(origin.maxOpen, origin.open);
    let gone = false;
    const done = () => {
      if (gone) return;
      gone = true;
      origin.open--;
      sockets.delete(socket);
    };
    let pending = '';
    socket.on('data', (chunk: Buffer) => {
      pending += chunk.toString('latin1');
      for (let end = pending.indexOf('\r\n\r\n'); end !== -1; end = pending.indexOf('\r\n\r\n')) {
        pending = pending.slice(end + 4);
        origin.requests++;
        setTimeout(() => {
          if (socket.writable) {
            socket.write(
              `HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: ${keepAlive ? 'keep-alive' : 'close'}\r\n\r\nok`,
            );
          }
        }, delayMs);
      }
    });
    socket.on('end', () => {
      done();
      socket.end();
    });
    socket.on('error', done);
    socket.on('close', done);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  origin.port = (server.address() as { port: number }).port;
  return origin;
}

interface FleetStats {
  state: string;
  members: number;
  heldSlots: number;
  slotWaits: number;
  fallbackSlots: number;
  fallbackTokens: number;
  outages: number;
}

async function fleetStats(daemon: DaemonProcess): Promise<FleetStats> {
  const stats = (await daemonStats(daemon.socketPath)) as unknown as { fleet: FleetStats };
  return stats.fleet;
}

let redis: RedisServer;
const cleanups: Array<() => unknown> = [];

beforeAll(async () => {
  redis = await startRedis();
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

afterAll(async () => {
  await redis?.close();
});

/** `count` daemons of one fleet (own sockets and state dirs), allowed to reach `port`. */
async function startFleet(
  count: number,
  port: number,
  pool: Record<string, unknown>,
  fleet: Record<string, unknown> = {},
): Promise<DaemonProcess[]> {
  const daemons = await Promise.all(
    Array.from({ length: count }, () =>
      startTestDaemon([port], {
        config: { pool, fleet: { redis: redis.url, heartbeatMs: 200, slotTtlMs: 5_000, ...fleet } },
      }),
    ),
  );
  cleanups.push(() => Promise.all(daemons.map((daemon) => daemon.stop())));
  await eventually(
    async () => (await Promise.all(daemons.map(fleetStats))).every((stats) => stats.members === count),
    'every daemon sees the whole fleet',
  );
  return daemons;
}

function clientOf(daemon: DaemonProcess, concurrency: number): SockpoolClient {
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, concurrencyPerThread: concurrency });
  cleanups.push(() => client.close());
  return client;
}

describe('fleet-wide connection caps', () => {
  it('three daemons under load from all three: the origin never sees more than maxPerOriginFleet at once', async () => {
    const origin = await countingOrigin(15);
    cleanups.push(() => origin.close());
    const cap = 4;
    const daemons = await startFleet(3, origin.port, { defaults: { maxPerOriginFleet: cap } });
    const before = fdCount();
    const clients = daemons.map((daemon) => clientOf(daemon, 12));
    const perClient = 40;
    const results = await Promise.all(
      clients.flatMap((client, c) =>
        Array.from({ length: perClient }, (_, i) => client.request(`http://127.0.0.1:${origin.port}/c${c}/${i}`)),
      ),
    );
    expect(results.every((response) => response.status === 200)).toBe(true);
    expect(origin.requests).toBe(3 * perClient);
    // Held, and reached: the cap was the limit, not the load.
    const stats = await Promise.all(daemons.map(fleetStats));
    expect(origin.maxOpen, JSON.stringify(stats)).toBeLessThanOrEqual(cap);
    expect(origin.maxOpen).toBe(cap);
    expect(stats.reduce((sum, s) => sum + s.slotWaits, 0)).toBeGreaterThan(0);
    for (const client of clients) await client.close();
    // Every slot given back once the connections closed.
    await eventually(
      async () => (await Promise.all(daemons.map(fleetStats))).every((s) => s.heldSlots === 0),
      'slots released',
    );
    expect(fdCount()).toBe(before);
  });

  it('a daemon killed with SIGKILL: its slots come back after the heartbeat expiry', async () => {
    const origin = await countingOrigin(0, true);
    cleanups.push(() => origin.close());
    const [a, b] = await startFleet(
      2,
      origin.port,
      { defaults: { maxPerOriginFleet: 2, maxIdle: 2 } },
      { slotTtlMs: 1_000 },
    );
    // Daemon a takes both slots and holds them: two leases it handed out and nobody closes.
    const holder = openRawClient(a!.socketPath, cleanups);
    const held: number[] = [];
    for (const id of [1, 2]) {
      const reply = await holder.request({ type: 'acquire', id, host: '127.0.0.1', port: origin.port });
      expect(reply.message).toMatchObject({ type: 'lease' });
      held.push(...reply.fds);
    }
    cleanups.push(() => {
      for (const fd of held) native.close(fd);
    });
    // Daemon b cannot connect while a lives: the fleet is full.
    const waiter = openRawClient(b!.socketPath, cleanups);
    const refused = await waiter.request({
      type: 'acquire',
      id: 1,
      host: '127.0.0.1',
      port: origin.port,
      timeoutMs: 300,
    });
    expect(refused.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_ACQUIRE_TIMEOUT' });
    a!.child.kill('SIGKILL');
    // Within the expiry (slotTtlMs 1 s), b gets a slot: it waits on the fleet, never on a.
    const granted = await waiter.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: origin.port });
    expect(granted.message?.type).toBe('lease');
    for (const fd of granted.fds) native.close(fd);
    await a!.stop();
  });
});

describe('configuration', () => {
  it('bad fleet configuration is refused with the key named', async () => {
    const cases: Array<[object, string]> = [
      [{ fleet: { redis: 'http://127.0.0.1:6379' } }, 'fleet.redis'],
      [{ fleet: { redis: redis.url, onUnavailable: 'maybe' } }, 'fleet.onUnavailable'],
      [{ fleet: { name: 'no spaces' } }, 'fleet.name'],
      [{ pool: { defaults: { maxPerOriginFleet: 0 } } }, 'pool.defaults.maxPerOriginFleet'],
      [{ pool: { defaults: { burst: 5 } } }, 'pool.defaults.burst'],
      [{ pool: { origins: [{ match: 'a.example:443', requestsPerSecond: -1 }] } }, 'pool.origins[0].requestsPerSecond'],
    ];
    for (const [config, key] of cases) {
      const path = writeConfigFile(config, cleanups);
      const failure = await run(process.execPath, [daemonMain, '--config', path]).then(
        () => undefined,
        (error: { code: number; stderr: string }) => error,
      );
      expect(failure?.code).toBe(2);
      expect(failure?.stderr).toContain('SOCKPOOL_ERR_CONFIG');
      expect(failure?.stderr).toContain(key);
    }
    const flag = await run(process.execPath, [daemonMain, '--fleet-redis', 'redis://']).then(
      () => undefined,
      (error: { code: number; stderr: string }) => error,
    );
    expect(flag?.stderr).toContain('--fleet-redis');
  });
});
