// Warm-on-start for warm TLS pools: after a restart sockpoold warms the `host:port tls` origins of its history as TLS
// sessions (handshakes included), so the first relayed request after the restart is warm; an origin whose warm TLS
// was switched off meanwhile is not warmed. Real daemons (stopped and started on one state directory), real
// node:https origin.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  daemonStats,
  eventually,
  httpsOrigin,
  type Origin,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import { type DaemonProcess, startDaemon } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let origin: Origin;
const daemons: DaemonProcess[] = [];

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  origin = await httpsOrigin(pki, (request, response) => {
    request.resume();
    request.on('end', () => response.end(`${request.method} ${request.url}`));
  });
});

afterAll(async () => {
  for (const daemon of daemons) await daemon.stop();
  await origin?.close();
  pki?.cleanup();
});

/** The daemon's `sockpoold ready` log line (`warming`: how many origins of its history it warms). */
function readyLine(daemon: DaemonProcess): { warming: number } {
  const line = daemon
    .output()
    .split('\n')
    .find((l) => l.includes('sockpoold ready'));
  return JSON.parse(line ?? '{}') as { warming: number };
}

describe('warm-on-start of warm TLS pools', () => {
  it('warms the TLS sessions of its history after a restart; the first relayed request is warm', async () => {
    const tlsArgs = warmTlsArgs(pki.caFile, [origin.port]);
    const first = await startTestDaemon([origin.port], { extraArgs: tlsArgs });
    daemons.push(first);
    const client = new SockpoolClient({ socketPath: first.socketPath, threads: 0, caFile: pki.caFile });
    for (let i = 0; i < 3; i++) {
      const response = await client.request(`https://localhost:${origin.port}/before${i}`);
      expect(response.tls?.by).toBe('daemon');
    }
    await client.close();
    expect(await first.stop()).toBe(0);

    const baseArgs = [
      '--config',
      join(first.stateDir, 'sockpoold.json'),
      '--allow',
      '127.0.0.1/32',
      '--allow-port',
      String(origin.port),
    ];
    const second = await startDaemon({ stateDir: first.stateDir, args: [...baseArgs, ...tlsArgs] });
    daemons.push(second);
    const tlsIdle = async (daemon: DaemonProcess) =>
      (await daemonStats(daemon.socketPath)).origins.find((o) => o.origin === `localhost:${origin.port} tls`)?.idle ??
      0;
    expect(readyLine(second).warming).toBe(1);
    await eventually(async () => (await tlsIdle(second)) >= 1, 'a TLS session warmed from history', 30_000);
    const again = new SockpoolClient({ socketPath: second.socketPath, threads: 0, caFile: pki.caFile });
    try {
      const response = await again.request(`https://localhost:${origin.port}/after`);
      expect(response.tls?.by).toBe('daemon');
      expect(response.warm).toBe(true);
    } finally {
      await again.close();
    }
    expect(await second.stop()).toBe(0);

    // Warm TLS switched off: the history's TLS pool is not warmed (as TLS or otherwise).
    const third = await startDaemon({ stateDir: first.stateDir, args: baseArgs });
    daemons.push(third);
    expect(readyLine(third).warming).toBe(0);
    expect(await tlsIdle(third)).toBe(0);
  });
});
