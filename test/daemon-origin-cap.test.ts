// An origin reached two ways (directly and through a configured proxy), against sockpoold as a real child process:
// its pools share one maxPerOrigin (daemon/origin-cap.ts), and what `stats` says of that shared cap (`sharedCap` in
// each of its rows) is read through the daemon's socket, as a client reads it: a bare protocol client, the
// `sockpool stats` table, and the Prometheus endpoint. Another uid's view of it is in client-view.system.test.ts.
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { startServer, type TestServer } from './fixtures/native-helpers.js';
import { type DaemonProcess, eventually, repoRoot, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';

const run = promisify(execFile);
const cli = join(repoRoot, 'dist', 'client', 'cli.js');

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function server(onConnection?: Parameters<typeof startServer>[1]): Promise<TestServer> {
  const started = await startServer('127.0.0.1', onConnection);
  cleanups.push(() => started.close());
  return started;
}

/** A proxy that answers every CONNECT with 200, then echoes (the tunnel's far end). */
function connectProxy(): Promise<TestServer> {
  return server((socket) => {
    let head = '';
    const onData = (chunk: Buffer) => {
      head += chunk.toString('latin1');
      if (!head.includes('\r\n\r\n')) return;
      socket.off('data', onData);
      socket.write('HTTP/1.1 200 Connection established\r\n\r\n');
      socket.pipe(socket);
    };
    socket.on('data', onData);
  });
}

interface SharedCap {
  connections: number;
  maxPerOrigin: number;
  waiting: number;
}

interface Row {
  origin: string;
  idle: number;
  leased: number;
  waiting: number;
  sharedCap?: SharedCap;
}

async function rows(raw: RawClient, id: number): Promise<Row[]> {
  const reply = await raw.request({ type: 'stats', id });
  return (reply.message as unknown as { stats: { origins: Row[] } }).stats.origins;
}

/**
 * A daemon whose origin `127.0.0.1:<origin port>` is reached directly and through the proxy `corp`, maxPerOrigin 2
 * shared by both pools; `lone` is a second origin reached one way only. No predictive warming: no connect but the
 * acquires' own. With `metricsPort`, the Prometheus endpoint there, per-origin gauges on.
 */
async function twoWays(metricsPort = 0) {
  const origin = await server();
  const lone = await server();
  const proxy = await connectProxy();
  const config = writeConfigFile(
    {
      proxies: [{ name: 'corp', url: `http://127.0.0.1:${proxy.port}` }],
      pool: { predictive: false, defaults: { maxPerOrigin: 2 } },
      ...(metricsPort > 0 ? { metricsPort, metricsPerOrigin: true } : {}),
    },
    cleanups,
  );
  const ports = [origin.port, lone.port, proxy.port].flatMap((port) => ['--allow-port', String(port)]);
  const sockpoold = await startDaemon({ args: ['--allow', '127.0.0.1/32', ...ports, '--config', config] });
  cleanups.push(() => sockpoold.stop());
  return { origin, lone, proxy, sockpoold, key: `127.0.0.1:${origin.port}`, loneKey: `127.0.0.1:${lone.port}` };
}

/**
 * One lease directly and one through corp (the cap full), one more direct acquire waiting at it, one lease of `lone`:
 * what a client holding them all sees.
 */
async function capFull(sockpoold: DaemonProcess, originPort: number, lonePort: number) {
  const raw = openRawClient(sockpoold.socketPath, cleanups);
  const fds: number[] = [];
  cleanups.push(() => {
    for (const fd of fds.splice(0)) native.close(fd);
  });
  const direct = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: originPort });
  expect(direct.message).toMatchObject({ type: 'lease' });
  fds.push(...direct.fds);
  const corp = await raw.request({ type: 'acquire', id: 2, host: '127.0.0.1', port: originPort, proxy: 'corp' });
  expect(corp.message).toMatchObject({ type: 'lease' });
  fds.push(...corp.fds);
  const lone = await raw.request({ type: 'acquire', id: 3, host: '127.0.0.1', port: lonePort });
  fds.push(...lone.fds);
  // Waits for room at the shared cap: its reply comes once a lease ends.
  raw.sendJson({ type: 'acquire', id: 4, host: '127.0.0.1', port: originPort });
  return { raw, fds, leaseOf: (reply: typeof direct) => (reply.message as { leaseId: number }).leaseId, direct };
}

describe("an origin's shared cap, seen through the daemon's socket", () => {
  it('shows sharedCap in each row of an origin reached directly and through a proxy, counting what the client holds in both pools and the acquire waiting at the cap; not in a row of an origin reached one way', async () => {
    const { sockpoold, origin, lone, key, loneKey } = await twoWays();
    const { raw, fds, leaseOf, direct } = await capFull(sockpoold, origin.port, lone.port);
    let seen: Row[] = [];
    await eventually(
      async () => {
        seen = await rows(raw, 100);
        return seen.find((row) => row.origin === key)?.waiting === 1;
      },
      () => `the direct acquire waiting: ${JSON.stringify(seen)}`,
    );
    const full = { connections: 2, maxPerOrigin: 2, waiting: 1 };
    expect(seen.find((row) => row.origin === key)).toMatchObject({ leased: 1, waiting: 1, sharedCap: full });
    expect(seen.find((row) => row.origin === `${key} via corp`)).toMatchObject({ leased: 1, sharedCap: full });
    expect(seen.find((row) => row.origin === loneKey)).not.toHaveProperty('sharedCap');

    // The direct lease ends: its room goes to the waiting acquire, and the figures follow.
    native.close(fds.splice(fds.indexOf(direct.fds[0]!), 1)[0]!);
    raw.sendJson({ type: 'closed', id: 5, leaseId: leaseOf(direct) });
    let served = await raw.receive();
    while (served.message?.id === 5) served = await raw.receive(); // the closed's answer, if any
    expect(served.message).toMatchObject({ type: 'lease', id: 4 });
    fds.push(...served.fds);
    await eventually(
      async () => {
        seen = await rows(raw, 101);
        return seen.find((row) => row.origin === key)?.waiting === 0;
      },
      () => `the waiting acquire served: ${JSON.stringify(seen)}`,
    );
    const after = { connections: 2, maxPerOrigin: 2, waiting: 0 };
    expect(seen.find((row) => row.origin === key)).toMatchObject({ leased: 1, sharedCap: after });
    expect(seen.find((row) => row.origin === `${key} via corp`)).toMatchObject({ leased: 1, sharedCap: after });
  });

  it('prints in the sockpool stats table, in each row of such an origin, its connections in all its ways against maxPerOrigin and the acquires waiting at it', async () => {
    const { sockpoold, origin, lone, key, loneKey } = await twoWays();
    const { raw } = await capFull(sockpoold, origin.port, lone.port);
    await eventually(
      async () => (await rows(raw, 100)).find((row) => row.origin === key)?.waiting === 1,
      'the direct acquire waiting',
    );
    const { stdout } = await run(process.execPath, [cli, '--socket', sockpoold.socketPath, 'stats'], {
      timeout: 30_000,
    });
    const lines = stdout.split('\n');
    const lineOf = (name: string) => lines.find((line) => line.startsWith(`${name} `));
    expect(lineOf(key)).toMatch(/ idle 0 leased 1 .* shared cap: 2\/2 connections over all ways, 1 waiting$/);
    expect(lineOf(`${key} via corp`)).toMatch(
      / idle 0 leased 1 .* shared cap: 2\/2 connections over all ways, 1 waiting$/,
    );
    expect(lineOf(loneKey)).toMatch(/ idle 0 leased 1 /);
    expect(lineOf(loneKey)).not.toContain('shared cap');
  });

  it('exports the shared cap as per-origin gauges in each row of such an origin, none for an origin reached one way', async () => {
    const metricsPort = await freePort();
    const { sockpoold, origin, lone, key, loneKey } = await twoWays(metricsPort);
    const { raw } = await capFull(sockpoold, origin.port, lone.port);
    await eventually(
      async () => (await rows(raw, 100)).find((row) => row.origin === key)?.waiting === 1,
      'the direct acquire waiting',
    );
    const expected = [key, `${key} via corp`].flatMap((name) => [
      `sockpool_shared_cap_connections{origin="${name}"} 2`,
      `sockpool_shared_cap_max_connections{origin="${name}"} 2`,
      `sockpool_shared_cap_waiting_acquires{origin="${name}"} 1`,
    ]);
    let shared: string[] = [];
    // A rendering serves the scrapes of a second: the first may be from before the acquires.
    await eventually(
      async () => {
        const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
        shared = text.split('\n').filter((line) => line.startsWith('sockpool_shared_cap_'));
        return shared.length === expected.length;
      },
      () => `the shared cap's gauges: ${JSON.stringify(shared)}`,
    );
    expect(shared.sort()).toEqual(expected.sort());
    expect(shared.join('\n')).not.toContain(loneKey);
  });
});
