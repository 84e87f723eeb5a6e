// Happy Eyeballs end to end (root: network namespaces). sockpoold runs inside a namespace of the test's own that
// has loopback and one more device: `void0`, a TUN device nobody reads, so every packet routed to it vanishes
// without an answer (this kernel has no netem and no nftables; a blackhole route would answer at once with an
// error, which is not what a broken path does). Hosts are pinned with --resolve to one IPv6 and one IPv4 address:
//
//   2001:db8:1::10, 203.0.113.10   on lo, with the agent's echo server: they work
//   2001:db8:2::10                 on lo, nothing listening on it: refused (RST)
//   2001:db8:dead::/64             routed to void0: IPv6 SYNs dropped silently
//   198.51.100.0/24                routed to void0: IPv4 SYNs dropped silently
//   fd00::1                        on lo with the echo server, but private: the egress policy refuses it
//
// What is checked is what the daemon reports (the lease's address, the attempt counters and learned family in its
// metrics and stats) and what the agent saw arrive; no wall-clock durations. A silent path is told apart from a
// refusal by the outcome of its attempt: cancelled (it never answered) vs failed.
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { SNAPSHOT_MAX_AGE_MS } from '../daemon/metrics.js';
import * as native from '../shared/native.js';
import type { LeaseReply, StatsReply } from '../shared/protocol.js';
import { type DaemonProcess, eventually, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { createNetns, type Netns, type NetnsAgent, netnsSupported } from './helpers/netns.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { requirePrerequisite } from './helpers/require.js';

const PORT = 443;
const METRICS_PORT = 9464;

const HOSTS = {
  v6dropped: 'v6dropped.test:443:[2001:db8:dead::10],203.0.113.10',
  warm: 'warm.test:443:[2001:db8:dead::11],203.0.113.10',
  v6refused: 'v6refused.test:443:[2001:db8:2::10],203.0.113.10',
  v4dropped: 'v4dropped.test:443:[2001:db8:1::10],198.51.100.10',
  both: 'both.test:443:[2001:db8:1::10],203.0.113.10',
  policy: 'policy.test:443:[fd00::1],203.0.113.10',
};

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

describe('Happy Eyeballs with the daemon in a namespace where one family is broken', () => {
  requirePrerequisite(netnsSupported(), 'root and iproute2 (ip netns)');
  let ns: Netns;
  let agent: NetnsAgent;
  let sockpoold: DaemonProcess;
  let raw: RawClient;
  let nextId = 1;

  beforeAll(async () => {
    ns = createNetns();
    for (const address of ['2001:db8:1::10', '2001:db8:2::10', '203.0.113.10', 'fd00::1']) ns.addAddress(address);
    ns.ip('tuntap', 'add', 'dev', 'void0', 'mode', 'tun');
    ns.ip('link', 'set', 'void0', 'up');
    ns.ip('-6', 'route', 'add', '2001:db8:dead::/64', 'dev', 'void0');
    ns.ip('route', 'add', '198.51.100.0/24', 'dev', 'void0');
    agent = await ns.startAgent();
    for (const address of ['2001:db8:1::10', '203.0.113.10', 'fd00::1']) await agent.listen(PORT, address);
    // The working and the refusing addresses answer as they should from inside.
    expect(await agent.probe('2001:db8:2::10', PORT)).toEqual({ ok: false, code: 'ECONNREFUSED' });
    expect(await agent.probe('fd00::1', PORT)).toEqual({ ok: true });

    const config = writeConfigFile(
      {
        // The working addresses are on the namespace's own loopback: the daemon's host, as far as it can tell.
        egress: { allow: ['2001:db8::/32', '203.0.113.0/24', '198.51.100.0/24'], allowHostAddresses: true },
        // One acquire, one connection: no predictive warming behind it, so fd counts and arrivals are exact.
        pool: { predictive: false },
        // The learned family is a per-origin gauge.
        metricsPerOrigin: true,
      },
      cleanups,
    );
    sockpoold = await startDaemon({
      wrap: ns.exec,
      args: [
        '--config',
        config,
        '--metrics-port',
        String(METRICS_PORT),
        ...Object.values(HOSTS).flatMap((entry) => ['--resolve', entry]),
      ],
    });
    raw = openRawClient(sockpoold.socketPath, []);
  });
  afterAll(async () => {
    raw?.close();
    await sockpoold?.stop();
    await ns?.destroy();
  });

  /** Prometheus counters of the daemon, read from inside the namespace. */
  async function metrics(): Promise<string> {
    const reply = await agent.httpGet(`http://127.0.0.1:${METRICS_PORT}/metrics`);
    expect(reply.status).toBe(200);
    return reply.body;
  }

  /** The attempt counters as they are now: the endpoint serves one rendering for SNAPSHOT_MAX_AGE_MS (metrics.ts),
   *  so a scrape after that long is a rendering begun after everything before it. */
  async function attempts(): Promise<Record<string, number>> {
    await sleep(SNAPSHOT_MAX_AGE_MS + 50);
    const counts: Record<string, number> = {};
    for (const match of (await metrics()).matchAll(
      /^sockpool_connect_attempts_total\{family="(\d)",outcome="(\w+)"\} (\d+)$/gm,
    )) {
      counts[`${match[1]} ${match[2]}`] = Number(match[3]);
    }
    return counts;
  }

  /** How the attempt counters moved while `action` ran. */
  async function attemptsDuring(action: () => Promise<void>): Promise<Record<string, number>> {
    const before = await attempts();
    await action();
    const after = await attempts();
    const delta: Record<string, number> = {};
    for (const [key, value] of Object.entries(after))
      if (value !== (before[key] ?? 0)) delta[key] = value - (before[key] ?? 0);
    return delta;
  }

  /** One cold acquire; its lease is closed at once. Returns the lease. */
  async function acquire(host: string): Promise<LeaseReply> {
    const reply = await raw.request({ type: 'acquire', id: nextId++, host, port: PORT });
    expect(reply.message, host).toMatchObject({ type: 'lease', warm: false });
    for (const fd of reply.fds) native.close(fd);
    const lease = reply.message as LeaseReply;
    const closed = await raw.request({ type: 'closed', id: nextId++, leaseId: lease.leaseId });
    expect(closed.message).toMatchObject({ type: 'ok' });
    return lease;
  }

  /** The `stats` reply's entry for host:PORT. */
  async function originStats(host: string): Promise<{ idle: number; learnedFamily: unknown } | undefined> {
    const reply = await raw.request({ type: 'stats', id: nextId++ });
    expect(reply.message?.type).toBe('stats');
    const origins = (reply.message as StatsReply).stats.origins as Array<{
      origin: string;
      idle: number;
      learnedFamily: unknown;
    }>;
    return origins.find((origin) => origin.origin === `${host}:${PORT}`);
  }

  async function learned(host: string): Promise<unknown> {
    return (await originStats(host))?.learnedFamily;
  }

  async function arrivals(address: string): Promise<number> {
    return (await agent.connections(PORT)).filter((entry) => !entry.probe && entry.localAddress === address).length;
  }

  it('IPv6 dropped silently: IPv4 wins after the attempt delay, the IPv6 attempt is cancelled and its fd closed', async () => {
    await metrics(); // the scraper's keep-alive connection to the daemon is open from here on
    const baseline = sockpoold.fdCount();
    let lease: LeaseReply | undefined;
    const delta = await attemptsDuring(async () => {
      lease = await acquire('v6dropped.test');
    });
    expect(lease).toMatchObject({ address: '203.0.113.10', family: 4 });
    // It never answered (cancelled, not failed: the connect timeout was not waited for).
    expect(delta).toEqual({ '6 cancelled': 1, '4 won': 1 });
    await eventually(() => sockpoold.fdCount() === baseline, 'the daemon back to its fds before the acquire');
    expect(await learned('v6dropped.test')).toMatchObject({ family: 4, failed: [6] });
    // (The pool gauges come from a walk of the pools up to SNAPSHOT_MAX_AGE_MS old: metrics.ts.)
    await eventually(
      async () => /^sockpool_learned_family\{origin="v6dropped\.test:443"\} 4$/m.test(await metrics()),
      'sockpool_learned_family 4 exported',
    );

    // The next connect starts with what worked: no IPv6 attempt at all.
    const again = await attemptsDuring(async () => {
      lease = await acquire('v6dropped.test');
    });
    expect(lease).toMatchObject({ address: '203.0.113.10', family: 4 });
    expect(again).toEqual({ '4 won': 1 });
  });

  it('IPv6 refused: IPv4 is tried at once after the RST and wins; IPv6 is remembered as failed', async () => {
    let lease: LeaseReply | undefined;
    const delta = await attemptsDuring(async () => {
      lease = await acquire('v6refused.test');
    });
    expect(lease).toMatchObject({ address: '203.0.113.10', family: 4 });
    expect(delta).toEqual({ '6 failed': 1, '4 won': 1 });
    expect(await learned('v6refused.test')).toMatchObject({ family: 4, failed: [6] });
  });

  it('IPv4 dropped: IPv6 connects first and no IPv4 attempt is made', async () => {
    const before = await arrivals('2001:db8:1::10');
    let lease: LeaseReply | undefined;
    const delta = await attemptsDuring(async () => {
      lease = await acquire('v4dropped.test');
    });
    expect(lease).toMatchObject({ address: '2001:db8:1::10', family: 6 });
    expect(delta).toEqual({ '6 won': 1 });
    expect(await arrivals('2001:db8:1::10')).toBe(before + 1);
    expect(await learned('v4dropped.test')).toMatchObject({ family: 6, failed: [] });
  });

  it('both working: IPv6 is used', async () => {
    let lease: LeaseReply | undefined;
    const delta = await attemptsDuring(async () => {
      lease = await acquire('both.test');
    });
    expect(lease).toMatchObject({ address: '2001:db8:1::10', family: 6 });
    expect(delta).toEqual({ '6 won': 1 });
    expect(await learned('both.test')).toMatchObject({ family: 6 });
    await eventually(
      async () => /^sockpool_learned_family\{origin="both\.test:443"\} 6$/m.test(await metrics()),
      'sockpool_learned_family 6 exported',
    );
  });

  it('an address the egress policy refuses is skipped among the candidates and never connected to', async () => {
    const before = await arrivals('fd00::1');
    let lease: LeaseReply | undefined;
    const delta = await attemptsDuring(async () => {
      lease = await acquire('policy.test');
    });
    expect(lease).toMatchObject({ address: '203.0.113.10', family: 4 });
    expect(delta).toEqual({ '6 refused': 1, '4 won': 1 });
    expect(await arrivals('fd00::1')).toBe(before);
  });

  it('prewarm of a host with a broken family: every socket over IPv4, every IPv6 attempt cancelled, no fd left', async () => {
    const baseline = sockpoold.fdCount();
    const count = 4;
    const delta = await attemptsDuring(async () => {
      const reply = await raw.request({ type: 'prewarm', id: nextId++, host: 'warm.test', port: PORT, count });
      expect(reply.message).toMatchObject({ type: 'ok' });
      await eventually(async () => (await originStats('warm.test'))?.idle === count, 'prewarmed sockets idle');
    });
    // Each connect raced: its IPv6 attempt went nowhere and was cancelled when IPv4 connected; none waited for the
    // connect timeout (that would be "failed").
    expect(delta).toEqual({ '6 cancelled': count, '4 won': count });
    // The idle sockets are the only new fds.
    await eventually(() => sockpoold.fdCount() === baseline + count, 'only the idle sockets added');
    expect(await learned('warm.test')).toMatchObject({ family: 4, failed: [6] });
  });
});
