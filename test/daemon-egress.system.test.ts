// The egress policy end to end: sockpoold runs inside a network namespace of the test's own that has loopback and
// nothing else, so even a broken policy cannot send a packet off this machine. Every refused address class is put
// on the namespace's loopback (or is one of its own addresses already) with an echo server listening on every
// address, and reachability is checked from inside first: a refusal then means the policy said no, not that the
// address was unreachable. Each refusal must come back as SOCKPOOL_ERR_POLICY naming the reason, be logged, show in
// the metrics, and no connection may arrive. A positive control (`--allow 10.1.2.3/32`) shows the same acquires
// do connect once allowed, exactly once each.
import { once } from 'node:events';
import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { canonicalHost } from '../shared/address.js';
import * as native from '../shared/native.js';
import type { ErrorReply, LeaseReply } from '../shared/protocol.js';
import { type DaemonProcess, eventually, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { createNetns, type Netns, type NetnsAgent, netnsSupported } from './helpers/netns.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { requirePrerequisite } from './helpers/require.js';

const PORT = 443; // allowed by default
const OTHER_PORT = 8080; // not in the default allowPorts
const METRICS_PORT = 9464; // inside the namespace: nothing else listens there

/** Put on the namespace's loopback: a connect to any of them succeeds in there unless the policy refuses it. */
const LOCAL_ADDRESSES = [
  '10.1.2.3',
  '192.168.1.1',
  '172.16.0.1',
  '169.254.1.1',
  '100.64.0.1',
  '169.254.169.254',
  'fd00::1',
  '64:ff9b::a01:203', // NAT64 form of 10.1.2.3
];

const DNS_RECORDS = {
  'private.test': { a: ['10.1.2.3'] },
  'loop.test': { a: ['127.0.0.1'], aaaa: ['::1'] },
  'ula.test': { aaaa: ['fd00::1'] },
};
const PINNED = 'pinned.test:443:10.1.2.3';

/** A refusal's message for `reason`: one address's (`refused: private`), or a name's every address (`... (private)`). */
function saysRefused(reason: string): RegExp {
  return new RegExp(`refused: (${reason}$|all \\d+ addresses refused: .*\\(${reason}\\))`);
}

interface RefusalCase {
  host: string;
  port: number;
  reason: string;
  /** The address the refusal names (normalised), when it is worth checking. */
  address?: string;
  /** Connecting to it from inside the namespace works (checked first); false for multicast, broadcast, scoped. */
  reachable: boolean;
}

const CASES: RefusalCase[] = [
  { host: '127.0.0.1', port: PORT, reason: 'loopback', address: '127.0.0.1', reachable: true },
  { host: '::ffff:127.0.0.1', port: PORT, reason: 'loopback', address: '127.0.0.1', reachable: true },
  { host: '2130706433', port: PORT, reason: 'loopback', address: '127.0.0.1', reachable: true },
  { host: '0177.0.0.1', port: PORT, reason: 'loopback', address: '127.0.0.1', reachable: true },
  { host: '0x7f.1', port: PORT, reason: 'loopback', address: '127.0.0.1', reachable: true },
  { host: '::1', port: PORT, reason: 'loopback', address: '::1', reachable: true },
  { host: '10.1.2.3', port: PORT, reason: 'private', address: '10.1.2.3', reachable: true },
  { host: '192.168.1.1', port: PORT, reason: 'private', reachable: true },
  { host: '172.16.0.1', port: PORT, reason: 'private', reachable: true },
  { host: 'fd00::1', port: PORT, reason: 'private', address: 'fd00::1', reachable: true },
  { host: '64:ff9b::a01:203', port: PORT, reason: 'private', reachable: true },
  { host: '169.254.1.1', port: PORT, reason: 'link-local', reachable: true },
  { host: 'fe80::1', port: PORT, reason: 'link-local', reachable: false },
  { host: '100.64.0.1', port: PORT, reason: 'cgnat', reachable: true },
  { host: '224.0.0.1', port: PORT, reason: 'multicast', reachable: false },
  { host: 'ff02::1', port: PORT, reason: 'multicast', reachable: false },
  { host: '255.255.255.255', port: PORT, reason: 'broadcast', reachable: false },
  { host: '0.0.0.0', port: PORT, reason: 'unspecified', reachable: true },
  { host: '::', port: PORT, reason: 'unspecified', reachable: true },
  { host: '169.254.169.254', port: PORT, reason: 'metadata', address: '169.254.169.254', reachable: true },
  { host: '10.1.2.3', port: OTHER_PORT, reason: 'port', reachable: true },
  // Names: the test DNS server (inside the namespace) and a --resolve pin.
  { host: 'private.test', port: PORT, reason: 'private', address: '10.1.2.3', reachable: false },
  { host: 'loop.test', port: PORT, reason: 'loopback', reachable: false },
  { host: 'ula.test', port: PORT, reason: 'private', address: 'fd00::1', reachable: false },
  { host: 'pinned.test', port: PORT, reason: 'private', address: '10.1.2.3', reachable: false },
];

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function writeConfig(config: object): string {
  return writeConfigFile(config, cleanups);
}

function client(socketPath: string): RawClient {
  return openRawClient(socketPath, cleanups);
}

/** The daemon's JSON log lines. */
function logLines(daemon: DaemonProcess): Array<Record<string, unknown>> {
  const lines: Array<Record<string, unknown>> = [];
  for (const line of daemon.output().split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      lines.push(JSON.parse(line));
    } catch {}
  }
  return lines;
}

/** Writes through the fd and reads the echo back: proves it is a live connection to the agent's echo server. */
async function roundTrip(fd: number, text: string): Promise<string> {
  native.untrack(fd);
  const socket = new net.Socket({ fd, readable: true, writable: true });
  try {
    socket.write(text);
    const [chunk] = (await once(socket, 'data', { signal: AbortSignal.timeout(5000) })) as [Buffer];
    return chunk.toString();
  } finally {
    socket.destroy();
  }
}

describe('egress policy with the daemon inside a namespace with no route out', () => {
  requirePrerequisite(netnsSupported(), 'root and iproute2 (ip netns)');
  let ns: Netns;
  let agent: NetnsAgent;
  let dnsServer: string;

  beforeAll(async () => {
    ns = createNetns();
    for (const address of LOCAL_ADDRESSES) ns.addAddress(address);
    agent = await ns.startAgent();
    await agent.listen(PORT); // '::' dual stack: every address of the namespace
    await agent.listen(OTHER_PORT);
    dnsServer = await agent.startDns(DNS_RECORDS);
  });
  afterAll(async () => {
    await ns?.destroy();
  });

  async function arrivals(port?: number) {
    return (await agent.connections(port)).filter((connection) => !connection.probe);
  }

  /**
   * Returns once every connection opened to `port` before the call has been accepted: a probe through the same
   * listener (one accept queue, first in, first out) is waited for. A connect the policy let through shows then,
   * without waiting an arbitrary time for it. (That a refused origin gets no background refills later, in the
   * pool's sweeps, is test/origin-pool.test.ts's "makes no background connects to an origin the policy refused".)
   */
  async function acceptedSoFar(port: number): Promise<void> {
    const probes = async () => (await agent.connections(port)).filter((connection) => connection.probe).length;
    const before = await probes();
    expect(await agent.probe('10.1.2.3', port)).toEqual({ ok: true });
    await eventually(async () => (await probes()) > before, `the probe to port ${port} accepted`);
  }

  async function daemonInNamespace(args: string[], config: object): Promise<DaemonProcess> {
    const daemon = await startDaemon({ wrap: ns.exec, args: [...args, '--config', writeConfig(config)] });
    cleanups.push(() => daemon.stop());
    return daemon;
  }

  it('has nothing but loopback: no route off this machine, and every refused address is reachable inside', async () => {
    expect(ns.ip('-o', 'link', 'show').trim().split('\n')).toHaveLength(1);
    expect(() => ns.ip('route', 'get', '192.0.2.1')).toThrow();
    expect(() => ns.ip('-6', 'route', 'get', '2001:db8::1')).toThrow();
    expect(await agent.probe('192.0.2.1', PORT)).toMatchObject({ ok: false, code: 'ENETUNREACH' });
    // A connect that the policy let through would land on the echo server: the refusals below are the policy's.
    for (const entry of CASES.filter((candidate) => candidate.reachable)) {
      expect({ host: entry.host, ...(await agent.probe(entry.host, entry.port)) }).toEqual({
        host: entry.host,
        ok: true,
      });
    }
    expect(await arrivals()).toEqual([]);
  });

  it('refuses every non-public address class, spelling, port and name with SOCKPOOL_ERR_POLICY, and connects nowhere', async () => {
    const before = await arrivals();
    const sockpoold = await daemonInNamespace(['--resolve', PINNED, '--metrics-port', String(METRICS_PORT)], {
      dns: { servers: [dnsServer] },
    });
    const raw = client(sockpoold.socketPath);
    let id = 1;
    for (const entry of CASES) {
      const reply = await raw.request({ type: 'acquire', id: id++, host: entry.host, port: entry.port });
      for (const fd of reply.fds) native.close(fd);
      const label = `${entry.host}:${entry.port}`;
      expect(reply.message?.type, label).toBe('error');
      const error = reply.message as ErrorReply;
      expect({ label, code: error.code, reason: error.fields?.reason }).toEqual({
        label,
        code: 'SOCKPOOL_ERR_POLICY',
        reason: entry.reason,
      });
      expect(error.message, label).toMatch(saysRefused(entry.reason));
      // (The daemon works with the canonical origin: the refusal names the host so, whatever the spelling.)
      expect(error.fields, label).toMatchObject({ host: canonicalHost(entry.host), port: entry.port });
      if (entry.address !== undefined) expect(error.fields?.address, label).toBe(entry.address);
      if (entry.host === 'loop.test') {
        // Both of its addresses refused: the reply names them, in its fields too.
        expect(error.fields, label).toMatchObject({ reasons: 'loopback', refused: 2 });
        expect(String(error.fields?.addresses).split(', ').sort(), label).toEqual([
          '127.0.0.1 (loopback)',
          '::1 (loopback)',
        ]);
      }
    }
    // A bracketed IPv6 host is not valid in the protocol at all: refused before any policy or resolver.
    const bracketed = await raw.request({ type: 'acquire', id: id++, host: '[::ffff:127.0.0.1]', port: PORT });
    expect(bracketed.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_PROTOCOL' });

    await acceptedSoFar(PORT);
    await acceptedSoFar(OTHER_PORT);
    expect(await arrivals()).toEqual(before);

    // Every refusal is in the log with its host, port and reason. (Read once all are there: the daemon's log reaches
    // its pipe a little after the replies, later still on a busy machine.)
    const refusedLines = () => logLines(sockpoold).filter((line) => line.msg === 'refused');
    await eventually(
      () => CASES.every((entry) => refusedLines().some((line) => line.host === entry.host && line.port === entry.port)),
      'a log line for every refusal',
      10_000,
    ).catch(() => {}); // the assertions below name what is missing
    const refusals = refusedLines();
    for (const entry of CASES) {
      const logged = refusals.find((line) => line.host === entry.host && line.port === entry.port);
      expect(logged, `log line for ${entry.host}:${entry.port}`).toBeDefined();
      expect(String(logged?.err)).toMatch(saysRefused(entry.reason));
      expect(logged?.level).toBe(40); // warn
    }

    // And in the metrics, by reason (fetched from inside the namespace, where the daemon's 127.0.0.1 is).
    const metrics = await agent.httpGet(`http://127.0.0.1:${METRICS_PORT}/metrics`);
    expect(metrics.status).toBe(200);
    for (const reason of new Set(CASES.map((entry) => entry.reason))) {
      const match = new RegExp(`^sockpool_refusals_total\\{reason="${reason}"\\} (\\d+)$`, 'm').exec(metrics.body);
      expect(Number(match?.[1] ?? 0), `sockpool_refusals_total{reason="${reason}"}`).toBeGreaterThanOrEqual(1);
    }
    expect(metrics.body).toMatch(/^sockpool_acquire_hits_total 0$/m);
    expect(metrics.body).toMatch(/^sockpool_acquire_misses_total 0$/m);
    const stats = await raw.request({ type: 'stats', id: id++ });
    expect(stats.message).toMatchObject({ type: 'stats', stats: { idle: 0, leased: 0, hits: 0, misses: 0 } });
  });

  it("refuses the host's own interface addresses even when allow covers them, unless allowHostAddresses", async () => {
    // 10.1.2.3 is on the namespace's own loopback interface: in there it is the daemon host's own address.
    const sockpoold = await daemonInNamespace(['--resolve', PINNED, '--allow', '10.1.2.3/32'], {
      dns: { servers: [dnsServer] },
      pool: { predictive: false },
    });
    const raw = client(sockpoold.socketPath);
    const before = await arrivals(PORT);
    let id = 1;
    for (const host of ['10.1.2.3', 'private.test', 'pinned.test', '64:ff9b::a01:203']) {
      const reply = await raw.request({ type: 'acquire', id: id++, host, port: PORT });
      for (const fd of reply.fds) native.close(fd);
      // The NAT64 spelling is refused by its class first (allow holes match the address itself only).
      const reason = host.includes(':') ? 'private' : 'host-address';
      expect(reply.message, host).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_POLICY', fields: { reason } });
    }
    await acceptedSoFar(PORT);
    expect(await arrivals(PORT)).toEqual(before);
  });

  it('positive control: with --allow 10.1.2.3/32 the same acquires connect, each exactly once', async () => {
    const sockpoold = await daemonInNamespace(['--resolve', PINNED, '--allow', '10.1.2.3/32'], {
      dns: { servers: [dnsServer] },
      pool: { predictive: false }, // one acquire, one connection: no warming behind it
      egress: { allowHostAddresses: true }, // 10.1.2.3 is an address of the namespace itself (see above)
    });
    const raw = client(sockpoold.socketPath);
    const before = (await arrivals(PORT)).length;
    const hosts = ['10.1.2.3', 'private.test', 'pinned.test'];
    let id = 1;
    for (const [index, host] of hosts.entries()) {
      const reply = await raw.request({ type: 'acquire', id: id++, host, port: PORT });
      expect(reply.message, host).toMatchObject({ type: 'lease', address: '10.1.2.3', port: PORT, warm: false });
      expect(reply.fds).toHaveLength(1);
      expect(await roundTrip(reply.fds[0]!, `hello ${host}`)).toBe(`hello ${host}`);
      raw.sendJson({ type: 'closed', leaseId: (reply.message as LeaseReply).leaseId });
      const seen = (await arrivals(PORT)).slice(before);
      expect(seen.map((connection) => connection.localAddress)).toEqual(new Array(index + 1).fill('10.1.2.3'));
    }
    // The hole is exactly 10.1.2.3/32 on allowed ports: its neighbours, loopback and other ports stay refused.
    for (const [host, port, reason] of [
      ['10.1.2.3', OTHER_PORT, 'port'],
      ['127.0.0.1', PORT, 'loopback'],
      ['192.168.1.1', PORT, 'private'],
      ['loop.test', PORT, 'loopback'],
    ] as const) {
      const reply = await raw.request({ type: 'acquire', id: id++, host, port });
      expect(reply.message, `${host}:${port}`).toMatchObject({
        type: 'error',
        code: 'SOCKPOOL_ERR_POLICY',
        fields: { reason },
      });
    }
    await acceptedSoFar(PORT);
    await acceptedSoFar(OTHER_PORT);
    expect((await arrivals(PORT)).length - before).toBe(hosts.length);
    expect(await arrivals(OTHER_PORT)).toEqual([]);
  });
});
