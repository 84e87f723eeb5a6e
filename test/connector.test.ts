// The connector with real sockets on loopback (no root): a host pinned to ::1 and 127.0.0.1 with a real listener,
// raced by Happy Eyeballs. What needs a silent path (dropped packets) is in test/happy-eyeballs.system.test.ts; the
// timing rules are in test/happy-eyeballs.test.ts with a fake clock.

import { once } from 'node:events';
import { readdirSync, writeSync } from 'node:fs';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { defaultConfig, type OriginPolicy, parseConfig } from '../daemon/config.js';
import { TcpConnector } from '../daemon/connector.js';
import { EgressPolicy } from '../daemon/egress-policy.js';
import { LearnedFamilies } from '../daemon/learned-families.js';
import { createMetrics, type Metrics } from '../daemon/metrics.js';
import type { ProxyEndpoint } from '../daemon/proxy-tunnel.js';
import { MAX_ADDRESSES_PER_FAMILY, Resolver } from '../daemon/resolver.js';
import type { SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { eventually } from './helpers/daemon.js';
import { type DnsTestServer, startDnsServer } from './helpers/dns-server.js';

const servers: net.Server[] = [];

/**
 * This process's open fds once the test servers have closed every connection they accepted (their side closes
 * asynchronously, after the client's): what is left beyond that is the connector's.
 */
async function openFds(): Promise<number> {
  for (const deadline = performance.now() + 5000; performance.now() < deadline; ) {
    const counts = await Promise.all(
      servers.map(
        (server) => new Promise<number>((resolve) => server.getConnections((_error, count) => resolve(count ?? 0))),
      ),
    );
    if (counts.every((count) => count === 0)) return readdirSync('/proc/self/fd').length;
    await new Promise((resolve) => setImmediate(resolve));
  }
  throw new Error('test servers kept connections open');
}

/** Listens on one address only; returns its port and what arrived. */
async function listen(
  host: string,
  port = 0,
): Promise<{ server: net.Server; port: number; arrivals: string[]; fromPorts: number[] }> {
  const arrivals: string[] = [];
  const fromPorts: number[] = [];
  const server = net.createServer((socket) => {
    arrivals.push(socket.localAddress ?? '?');
    fromPorts.push(socket.remotePort ?? 0);
    socket.on('error', () => {});
    socket.end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port, ipv6Only: true }, () => resolve());
  });
  servers.push(server);
  return { server, port: (server.address() as net.AddressInfo).port, arrivals, fromPorts };
}

const addresses = (list: Array<{ address: string }>) => list.map((item) => item.address);

/** The value of one labelled counter sample. */
async function attempts(metrics: Metrics, family: 4 | 6, outcome: string): Promise<number> {
  const metric = await metrics.connectAttempts.get();
  return metric.values.find((value) => value.labels.family === family && value.labels.outcome === outcome)?.value ?? 0;
}

describe('TcpConnector on loopback', () => {
  let v4: Awaited<ReturnType<typeof listen>>;
  let both: { v4: Awaited<ReturnType<typeof listen>>; v6: Awaited<ReturnType<typeof listen>> };
  const policy: OriginPolicy = { ...defaultConfig().pool.defaults };

  beforeAll(async () => {
    // A port open on 127.0.0.1 only: ::1 refuses it (RST).
    v4 = await listen('127.0.0.1');
    // A port open on both: the port the kernel picked for ::1 may be taken on 127.0.0.1 (another process's socket
    // on a busy machine), so a pair is tried until one binds.
    for (let tries = 0; both === undefined; tries++) {
      const first = await listen('::1');
      try {
        both = { v6: first, v4: await listen('127.0.0.1', first.port) };
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EADDRINUSE' || tries >= 20) throw error;
        first.server.close();
      }
    }
    // The first native connect sets up what stays open for the process (the addon's poller): not counted below.
    const warmUp = connector();
    native.close((await warmUp.connector.connect({ host: 'dual.test', port: both.v6.port }, policy)).fd);
  });
  afterAll(() => {
    for (const server of [v4?.server, both?.v4.server, both?.v6.server]) server?.close();
  });

  function connector(allow = ['127.0.0.1/32', '::1/128'], learned?: LearnedFamilies) {
    const metrics = createMetrics(() => ({ origins: [] }), { processMetrics: false });
    const config = parseConfig(
      {
        dns: {
          resolve: [
            `v6refused.test:${v4.port}:127.0.0.1,[::1]`,
            `dual.test:${both.v6.port}:[::1],127.0.0.1`,
            // One host, two ports: the first open on IPv4 only, the second on both families.
            `ports.test:${v4.port}:127.0.0.1,[::1]`,
            `ports.test:${both.v6.port}:[::1],127.0.0.1`,
          ],
        },
        egress: { allow, allowPorts: [v4.port, both.v6.port] },
      },
      'test',
    );
    const resolver = new Resolver(config.dns);
    const egress = new EgressPolicy(config.egress);
    return {
      metrics,
      connector: new TcpConnector(
        () => resolver,
        () => egress,
        { metrics, learned },
      ),
    };
  }

  it('both families working: IPv6 is used, and learned', async () => {
    const { connector: c, metrics } = connector();
    const before = await openFds();
    const socket = await c.connect({ host: 'dual.test', port: both.v6.port }, policy);
    expect(socket).toMatchObject({ address: '::1', family: 6 });
    native.close(socket.fd);
    expect(await attempts(metrics, 6, 'won')).toBe(1);
    expect(await attempts(metrics, 4, 'won')).toBe(0); // never tried: IPv6 connected within the attempt delay
    expect(c.learnedFamily({ host: 'dual.test', port: both.v6.port })).toMatchObject({ family: 6, failed: [] });
    expect(await openFds()).toBe(before);
  });

  it('IPv6 refused: IPv4 is tried at once and wins; the next connect starts with IPv4', async () => {
    const { connector: c, metrics } = connector();
    const before = await openFds();
    const first = await c.connect({ host: 'v6refused.test', port: v4.port }, policy);
    expect(first).toMatchObject({ address: '127.0.0.1', family: 4 });
    // A refused attempt does not wait for the attempt delay.
    expect(first.connectMs).toBeLessThan(policy.connectAttemptDelayMs);
    native.close(first.fd);
    expect(await attempts(metrics, 6, 'failed')).toBe(1);
    expect(c.learnedFamily({ host: 'v6refused.test', port: v4.port })).toMatchObject({ family: 4, failed: [6] });

    const second = await c.connect({ host: 'v6refused.test', port: v4.port }, policy);
    native.close(second.fd);
    expect(await attempts(metrics, 4, 'won')).toBe(2);
    expect(await attempts(metrics, 6, 'failed')).toBe(1); // IPv6 was not tried again
    expect(await openFds()).toBe(before);
  });

  it("what a uid's race taught is its share of the table: another uid's connects to more host:ports do not push it out", async () => {
    const { connector: c } = connector(undefined, new LearnedFamilies({ maxEntries: 2 }));
    const connect = async (host: string, port: number, uid: number) =>
      native.close((await c.connect({ host, port }, policy, undefined, undefined, uid)).fd);
    await connect('v6refused.test', v4.port, 1);
    // uid 2 teaches two host:ports: the table holds two, and the one that goes is uid 2's own oldest.
    await connect('dual.test', both.v6.port, 2);
    await connect('ports.test', both.v6.port, 2);
    expect(c.learnedFamily({ host: 'v6refused.test', port: v4.port })).toMatchObject({ family: 4, failed: [6] });
    expect(c.learnedFamily({ host: 'dual.test', port: both.v6.port })).toBeUndefined();
    expect(c.learnedFamily({ host: 'ports.test', port: both.v6.port })).toMatchObject({ family: 6 });
  });

  it("a name a uid's connect looked up is its share of the DNS cache: lookups of thousands of other names do not push it out", async () => {
    const asked: string[] = [];
    const config = parseConfig(
      {
        dns: { minTtlMs: 600_000, maxTtlMs: 600_000, negativeTtlMs: 600_000 },
        egress: { allow: ['127.0.0.1/32'], allowPorts: [v4.port] },
      },
      'test',
    );
    const resolver = new Resolver(config.dns, async (name) => {
      asked.push(name);
      if (name !== 'cached.test') throw Object.assign(new Error('no such name'), { code: 'ENOTFOUND' });
      return [{ address: '127.0.0.1', family: 4 }];
    });
    const egress = new EgressPolicy(config.egress);
    const c = new TcpConnector(
      () => resolver,
      () => egress,
    );
    native.close((await c.connect({ host: 'cached.test', port: v4.port }, policy, undefined, undefined, 1)).fd);
    // The daemon's own lookups (warming, say) of more names than the cache holds: its own oldest give way.
    for (let index = 0; index < 10_500; index++) await resolver.resolve(`junk-${index}.test`, 443).catch(() => {});
    native.close((await c.connect({ host: 'cached.test', port: v4.port }, policy, undefined, undefined, 1)).fd);
    expect(asked.filter((name) => name === 'cached.test')).toHaveLength(1);
  });

  it("what one port of a host taught does not steer another port's connects away from IPv6", async () => {
    const { connector: c } = connector();
    // A client's connect to a port its host serves over IPv4 only: IPv6 is refused there.
    const v4only = await c.connect({ host: 'ports.test', port: v4.port }, policy);
    expect(v4only.family).toBe(4);
    native.close(v4only.fd);
    expect(c.learnedFamily({ host: 'ports.test', port: v4.port })).toMatchObject({ family: 4, failed: [6] });
    // Another client's connect to the port served over both families still starts with IPv6 (RFC 8305).
    expect(c.learnedFamily({ host: 'ports.test', port: both.v6.port })).toBeUndefined();
    const dual = await c.connect({ host: 'ports.test', port: both.v6.port }, policy);
    native.close(dual.fd);
    expect(dual).toMatchObject({ address: '::1', family: 6 });
  });

  it('an address the egress policy refuses is skipped, never connected to', async () => {
    const { connector: c, metrics } = connector(['127.0.0.1/32']);
    // Earlier tests' connects may still wait in the server's accept queue: one of our own, once accepted, comes
    // after all of them (accepts are in order), so the count taken then is final.
    const sentinel = net.connect({ host: '::1', port: both.v6.port });
    sentinel.on('error', () => {});
    await once(sentinel, 'connect');
    await eventually(() => both.v6.fromPorts.includes(sentinel.localPort!), 'the sentinel connection accepted');
    sentinel.destroy();
    const arrivalsBefore = both.v6.arrivals.length;
    const socket = await c.connect({ host: 'dual.test', port: both.v6.port }, policy);
    expect(socket.family).toBe(4);
    native.close(socket.fd);
    expect(await attempts(metrics, 6, 'refused')).toBe(1);
    expect(both.v6.arrivals.length).toBe(arrivalsBefore);
  });

  it("the winner carries the peer its policy check read, as tcpInfo's words (the pool's mark reads it no second time)", async () => {
    const { connector: c } = connector();
    const info = new Float64Array(native.TCP_INFO_FIELDS);
    for (const [host, family] of [
      ['dual.test', 6],
      ['v6refused.test', 4],
    ] as const) {
      const port = family === 6 ? both.v6.port : v4.port;
      const socket = await c.connect({ host, port }, policy);
      native.tcpInfo(socket.fd, info, true);
      native.close(socket.fd); // (before any expect: a socket left open would fail the tests after this one)
      expect(socket.family).toBe(family);
      const peerAt = native.TcpInfoField.peer;
      expect(socket.connectedPeer).toEqual(Array.from(info.subarray(peerAt, peerAt + native.PEER_WORDS)));
      expect(native.peerText(socket.connectedPeer!)).toBe(`${family === 6 ? '0:0:0:0:0:0:0:1' : '127.0.0.1'} ${port}`);
    }
  });

  it('judges the peer the kernel reports once connected: a refusal there closes the connection it made', async () => {
    // Each address passes before its attempt and is refused when the connected socket's peer is judged (as after a
    // reload between the two): the second look must be there, and see what getpeername says.
    class RefusedOnSecondLook extends EgressPolicy {
      readonly judged: string[] = [];
      readonly #refusing = new EgressPolicy(parseConfig({ egress: { allowPorts: [v4.port] } }, 'test').egress);
      override checkAddress(address: string, port: number, host?: string): void {
        this.judged.push(`${address} ${port}`);
        if (this.judged.length > 1) this.#refusing.checkAddress(address, port, host);
        else super.checkAddress(address, port, host);
      }
    }
    const config = parseConfig(
      {
        dns: { resolve: [`peer.test:${v4.port}:127.0.0.1`] },
        egress: { allow: ['127.0.0.1/32'], allowPorts: [v4.port] },
      },
      'test',
    );
    const resolver = new Resolver(config.dns);
    const egress = new RefusedOnSecondLook(config.egress);
    const metrics = createMetrics(() => ({ origins: [] }), { processMetrics: false });
    const c = new TcpConnector(
      () => resolver,
      () => egress,
      { metrics },
    );
    const fds = await openFds();
    const arrivals = v4.arrivals.length;
    await expect(c.connect({ host: 'peer.test', port: v4.port }, policy)).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_POLICY',
      reason: 'loopback',
    });
    expect(egress.judged).toEqual([`127.0.0.1 ${v4.port}`, `127.0.0.1 ${v4.port}`]);
    expect(await attempts(metrics, 4, 'refused')).toBe(1);
    await eventually(() => v4.arrivals.length === arrivals + 1, 'the connection arrived');
    expect(await openFds()).toBe(fds);
  });

  it('every candidate refused: SOCKPOOL_ERR_POLICY, nothing left open', async () => {
    const { connector: c } = connector([]);
    const before = await openFds();
    await expect(c.connect({ host: 'dual.test', port: both.v6.port }, policy)).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_POLICY',
      reason: 'loopback',
    });
    expect(await openFds()).toBe(before);
  });

  it('asks for A and AAAA together and starts on A when AAAA is late (past the resolution delay)', async () => {
    const dns: DnsTestServer = await startDnsServer({
      // Both addresses work: had the connector waited for both answers, IPv6 would have been tried first and won.
      'late-aaaa.test': { a: ['127.0.0.1'], aaaa: ['::1'], aaaaDelayMs: 2000, ttl: 60 },
      'none.test': { ttl: 60 },
    });
    try {
      const config = parseConfig(
        { dns: { servers: [dns.server] }, egress: { allow: ['127.0.0.1/32', '::1/128'], allowPorts: [both.v6.port] } },
        'test',
      );
      const resolver = new Resolver(config.dns);
      const egress = new EgressPolicy(config.egress);
      const c = new TcpConnector(
        () => resolver,
        () => egress,
      );
      const socket = await c.connect({ host: 'late-aaaa.test', port: both.v6.port }, policy);
      native.close(socket.fd);
      expect(socket).toMatchObject({ address: '127.0.0.1', family: 4 });
      expect(dns.count('late-aaaa.test', 'A')).toBeGreaterThanOrEqual(1);
      expect(dns.count('late-aaaa.test', 'AAAA')).toBeGreaterThanOrEqual(1);
      // IPv4 won only because IPv6 was never tried: nothing is learned from that.
      expect(c.learnedFamily({ host: 'late-aaaa.test', port: both.v6.port })).toBeUndefined();
      // A name with no address at all is still a DNS error.
      await expect(c.connect({ host: 'none.test', port: both.v6.port }, policy)).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_DNS',
      });
    } finally {
      await dns.close();
    }
  });

  it('a dns.resolve entry wins while a DNS query for another port of the host is in flight', async () => {
    // The entry pins pin.test:PORT to 127.0.0.1; DNS says 127.0.0.2 (listening on the same port). A connect to
    // another port of pin.test (no entry) has a query in flight: its answers are not this origin's.
    const pinned = await listen('127.0.0.1');
    const dnsTarget = await listen('127.0.0.2', pinned.port);
    const dns = await startDnsServer({ 'pin.test': { a: ['127.0.0.2'], delayMs: 500, ttl: 60 } });
    try {
      const config = parseConfig(
        {
          dns: { servers: [dns.server], resolve: [`pin.test:${pinned.port}:127.0.0.1`] },
          egress: { allow: ['127.0.0.0/8'], allowPorts: [] },
        },
        'test',
      );
      const resolver = new Resolver(config.dns);
      const egress = new EgressPolicy(config.egress);
      const c = new TcpConnector(
        () => resolver,
        () => egress,
      );
      const other = resolver.resolve('pin.test', 80);
      const inFlight = resolver.answersInFlight('pin.test', 80);
      expect(inFlight).toBeDefined();
      inFlight?.[6].catch(() => {}); // no AAAA record: that family's answer is an error
      expect(resolver.answersInFlight('pin.test', pinned.port)).toBeUndefined();
      const socket = await c.connect({ host: 'pin.test', port: pinned.port }, policy);
      native.close(socket.fd);
      expect(addresses(await other)).toEqual(['127.0.0.2']);
      expect(socket.address).toBe('127.0.0.1');
      expect({ pinned: pinned.arrivals.length, dns: dnsTarget.arrivals.length }).toEqual({ pinned: 1, dns: 0 });
    } finally {
      await dns.close();
      for (const { server } of [pinned, dnsTarget]) {
        server.close();
        servers.splice(servers.indexOf(server), 1);
      }
    }
  });

  it('every attempt failed: SOCKPOOL_ERR_CONNECT with the last cause, nothing left open', async () => {
    const closed = await listen('127.0.0.1');
    await new Promise((resolve) => closed.server.close(resolve));
    servers.splice(servers.indexOf(closed.server), 1);
    const config = parseConfig(
      {
        dns: { resolve: [`gone.test:${closed.port}:127.0.0.1,[::1]`] },
        egress: { allow: ['127.0.0.1/32', '::1/128'], allowPorts: [closed.port] },
      },
      'test',
    );
    const resolver = new Resolver(config.dns);
    const egress = new EgressPolicy(config.egress);
    const gone = new TcpConnector(
      () => resolver,
      () => egress,
    );
    const before = await openFds();
    await expect(gone.connect({ host: 'gone.test', port: closed.port }, policy)).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_CONNECT',
      cause: { code: 'ECONNREFUSED' },
    });
    expect(await openFds()).toBe(before);
  });
});

describe('TcpConnector: what the caller sees when no address connects', () => {
  const policy: OriginPolicy = { ...defaultConfig().pool.defaults };

  it('the addresses the egress policy skipped are named beside the failure of those tried', async () => {
    const closed = await listen('127.0.0.1');
    servers.splice(servers.indexOf(closed.server), 1);
    await new Promise((resolve) => closed.server.close(resolve));
    const config = parseConfig(
      {
        dns: { resolve: [`mixed.test:${closed.port}:[::1],127.0.0.1`] },
        egress: { allow: ['127.0.0.1/32'], allowPorts: [closed.port] },
      },
      'test',
    );
    const resolver = new Resolver(config.dns);
    const egress = new EgressPolicy(config.egress);
    const connector = new TcpConnector(
      () => resolver,
      () => egress,
    );
    const error = await connector.connect({ host: 'mixed.test', port: closed.port }, policy).then(
      () => expect.unreachable(),
      (caught: SockpoolError) => caught,
    );
    expect(error).toMatchObject({ code: 'SOCKPOOL_ERR_CONNECT', cause: { code: 'ECONNREFUSED' } });
    // Not only "connection refused by 127.0.0.1": ::1 was never tried, and the caller is told why.
    expect(error.message).toContain(`connect ECONNREFUSED 127.0.0.1:${closed.port}`);
    expect(error.message).toContain('1 refused by the egress policy: ::1 (loopback)');
    expect(error.fields).toMatchObject({ tried: 1, refused: 1 });
  });
});

describe('TcpConnector: a hostile DNS server', () => {
  const policy: OriginPolicy = { ...defaultConfig().pool.defaults };

  it('tries a bounded number of addresses of a huge answer, and none the egress policy refuses', async () => {
    const closed = await listen('127.0.0.1');
    servers.splice(servers.indexOf(closed.server), 1);
    await new Promise((resolve) => closed.server.close(resolve));
    // 500 loopback addresses (allowed below, all refusing the port at once) after the metadata address and a
    // private one: over UDP the answer is truncated, over TCP whole.
    const loopbacks = Array.from({ length: 500 }, (_, i) => `127.1.${i >> 8}.${i & 255}`);
    const dns = await startDnsServer({
      'spray.test': { a: ['169.254.169.254', '10.1.2.3', ...loopbacks], ttl: 60 },
      'refused.test': {
        a: ['169.254.169.254', '10.1.2.3', '0.0.0.0'],
        aaaa: ['::ffff:a9fe:a9fe', 'fd00:ec2::254', '64:ff9b::a9fe:a9fe'],
      },
    });
    try {
      const config = parseConfig(
        { dns: { servers: [dns.server] }, egress: { allow: ['127.0.0.0/8'], allowPorts: [closed.port] } },
        'test',
      );
      const resolver = new Resolver(config.dns);
      const egress = new EgressPolicy(config.egress);
      const metrics = createMetrics(() => ({ origins: [] }), { processMetrics: false });
      const connector = new TcpConnector(
        () => resolver,
        () => egress,
        { metrics },
      );
      const fds = await openFds();
      const error = await connector.connect({ host: 'spray.test', port: closed.port }, policy).then(
        () => expect.unreachable(),
        (caught: SockpoolError) => caught,
      );
      expect(error).toMatchObject({ code: 'SOCKPOOL_ERR_CONNECT', cause: { code: 'ECONNREFUSED' } });
      expect(error.message).toContain('refused by the egress policy: 169.254.169.254 (metadata), 10.1.2.3 (private)');
      // One SYN per address kept, not one per address the server sent.
      expect(error.fields).toMatchObject({ tried: MAX_ADDRESSES_PER_FAMILY - 2, refused: 2 });
      expect(await attempts(metrics, 4, 'failed')).toBe(MAX_ADDRESSES_PER_FAMILY - 2);
      expect(await openFds()).toBe(fds);
      // Every address refused: the policy's refusal, saying why for each.
      await expect(connector.connect({ host: 'refused.test', port: closed.port }, policy)).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_POLICY',
        message: expect.stringMatching(/refused: all 6 addresses refused: .*\((metadata|private|unspecified)\)$/),
      });
      expect(await attempts(metrics, 4, 'failed')).toBe(MAX_ADDRESSES_PER_FAMILY - 2);
    } finally {
      await dns.close();
    }
  });
});

describe('TcpConnector: every address of a name refused', () => {
  const policy: OriginPolicy = { ...defaultConfig().pool.defaults };

  it('names every reason the egress policy gave, bounded for the 32 and 32 addresses a name keeps, the list in its fields', async () => {
    const a = [
      '169.254.169.254',
      ...Array.from({ length: 10 }, (_, i) => `10.0.0.${i + 1}`),
      ...Array.from({ length: 10 }, (_, i) => `127.0.0.${i + 2}`),
      '100.64.0.1',
      '0.0.0.0',
      '224.0.0.1',
      '240.0.0.1',
      '255.255.255.255',
      '169.254.1.1',
      ...Array.from({ length: 5 }, (_, i) => `192.168.1.${i + 1}`),
    ];
    const aaaa = [
      'fd00:ec2::254',
      '64:ff9b::a9fe:a9fe',
      '::1',
      'ff02::1',
      ...Array.from({ length: 10 }, (_, i) => `fe80::${i + 1}`),
      // Addresses as long as IPv6 text gets: the message's bound is not the addresses' shortness.
      ...Array.from({ length: 18 }, (_, i) => `fd12:3456:789a:bcde:f012:3456:789a:bc${(i + 16).toString(16)}`),
    ];
    expect([a.length, aaaa.length]).toEqual([MAX_ADDRESSES_PER_FAMILY, MAX_ADDRESSES_PER_FAMILY]);
    const dns = await startDnsServer({ 'refused.test': { a, aaaa, ttl: 60 } });
    try {
      const config = parseConfig({ dns: { servers: [dns.server] } }, 'test');
      const egress = new EgressPolicy(config.egress);
      // What the policy says of each address on its own.
      const reasonOf = (address: string) => {
        try {
          egress.checkAddress(address, 443, 'refused.test');
        } catch (error) {
          return (error as SockpoolError).fields.reason as string;
        }
        throw new Error(`${address} is not refused`);
      };
      const reasons = [...new Set([...a, ...aaaa].map(reasonOf))].sort();
      expect(reasons.length).toBeGreaterThan(5);
      const resolver = new Resolver(config.dns);
      const connector = new TcpConnector(
        () => resolver,
        () => egress,
      );
      // (The resolver's socket to the DNS server is opened by its first query, and kept.)
      await resolver.resolve('other.test', 443).catch(() => {});
      const before = await openFds();
      const error = await connector.connect({ host: 'refused.test', port: 443 }, policy).then(
        () => expect.unreachable(),
        (caught: SockpoolError) => caught,
      );
      // (The DNS server's side of the TCP query, the truncated answer's, closes after the resolver's.)
      await eventually(async () => (await openFds()) === before, 'no fd left open by the connect');
      expect(error.code).toBe('SOCKPOOL_ERR_POLICY');
      expect(error.message).toMatch(/^egress to refused\.test port 443 refused: all 64 addresses refused: /);
      // Every reason, each with an address it was given for (before: the first refusal's alone).
      for (const reason of reasons)
        expect(error.message).toMatch(new RegExp(`[0-9a-f:.]+( and \\d+ more)? \\(${reason}\\)`));
      // Within what a reply carries whole (the handoff server cuts longer messages).
      expect(error.message.length).toBeLessThanOrEqual(1024);
      // The fields: the first refusal's reason as before (one of the policy's), all of them, and a bounded list.
      expect(reasons).toContain(error.fields.reason);
      expect(String(error.fields.reasons).split(',').sort()).toEqual(reasons);
      expect(error.fields.refused).toBe(64);
      const listed = String(error.fields.addresses).split(', ');
      expect(listed.length).toBe(16);
      for (const entry of listed) {
        const [, address, reason] = /^(\S+) \((\S+)\)$/.exec(entry) ?? [];
        expect(reasonOf(address!)).toBe(reason);
      }
    } finally {
      await dns.close();
    }
  });

  it('one address, refused: the policy refusal of that address, as it was', async () => {
    const config = parseConfig({ dns: { resolve: ['one.test:443:10.0.0.1'] } }, 'test');
    const resolver = new Resolver(config.dns);
    const egress = new EgressPolicy(config.egress);
    const connector = new TcpConnector(
      () => resolver,
      () => egress,
    );
    await expect(connector.connect({ host: 'one.test', port: 443 }, policy)).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_POLICY',
      message: 'egress to one.test (10.0.0.1) port 443 refused: private',
      fields: { host: 'one.test', address: '10.0.0.1', port: 443, reason: 'private' },
    });
  });
});

describe('TcpConnector: a reload during a connect', () => {
  const policy: OriginPolicy = { ...defaultConfig().pool.defaults };
  const origin = { host: 'origin.test', port: 443, proxy: 'corp' };

  /** A CONNECT proxy on 127.0.0.1 that answers 200 when `answer()` is called (at once if `prompt`). */
  async function proxy(prompt: boolean) {
    const pending: net.Socket[] = [];
    const sockets: net.Socket[] = [];
    let open = prompt;
    const server = net.createServer((socket) => {
      sockets.push(socket);
      socket.on('error', () => {});
      socket.once('data', () => {
        if (open) socket.write('HTTP/1.1 200 Connection established\r\n\r\n');
        else pending.push(socket);
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    servers.push(server);
    const port = (server.address() as net.AddressInfo).port;
    return {
      port,
      sockets,
      /** Resolves once a CONNECT is waiting for its answer. */
      async waiting() {
        while (pending.length === 0) await new Promise((resolve) => setImmediate(resolve));
      },
      answer() {
        open = true;
        for (const socket of pending.splice(0)) socket.write('HTTP/1.1 200 Connection established\r\n\r\n');
      },
      /** Resolves once the listener is closed (its fd with it). */
      close() {
        for (const socket of sockets) socket.destroy();
        servers.splice(servers.indexOf(server), 1);
        return new Promise((resolve) => server.close(resolve));
      },
    };
  }

  function setup(ports: number[]) {
    const config = parseConfig({ egress: { allow: ['127.0.0.1/32'], allowPorts: [443, ...ports] } }, 'test');
    const resolver = new Resolver(config.dns);
    const state = {
      egress: new EgressPolicy(config.egress),
      proxies: new Map<string, ProxyEndpoint>(),
    };
    const connector = new TcpConnector(
      () => resolver,
      () => state.egress,
      { proxies: () => state.proxies },
    );
    return { state, connector };
  }

  it('a tunnel begun through a proxy the reload moved is opened again through the new one', async () => {
    const fds = await openFds();
    const [before, after] = [await proxy(false), await proxy(true)];
    const { state, connector } = setup([before.port, after.port]);
    state.proxies = new Map([['corp', { name: 'corp', host: '127.0.0.1', port: before.port }]]);
    const connecting = connector.connect(origin, policy);
    await before.waiting();
    // The reload: "corp" is now another proxy (a new map, as the daemon builds one per configuration).
    state.proxies = new Map([['corp', { name: 'corp', host: '127.0.0.1', port: after.port }]]);
    before.answer();
    const socket = await connecting;
    expect(native.peerAddress(socket.fd).port).toBe(after.port);
    native.close(socket.fd);
    await before.close();
    await after.close();
    expect(await openFds()).toBe(fds);
  });

  it('an address a reload refused while the connect resolved is never connected to', async () => {
    const target = await listen('127.0.0.1');
    const allowing = parseConfig(
      {
        dns: { resolve: [`reload.test:${target.port}:127.0.0.1`] },
        egress: { allow: ['127.0.0.1/32'], allowPorts: [target.port] },
      },
      'test',
    );
    const resolver = new Resolver(allowing.dns);
    const state = { egress: new EgressPolicy(allowing.egress) };
    const connector = new TcpConnector(
      () => resolver,
      () => state.egress,
    );
    const fds = await openFds();
    const connecting = connector.connect({ host: 'reload.test', port: target.port }, policy);
    // The reload, while the connect resolves: loopback is no longer allowed.
    state.egress = new EgressPolicy(parseConfig({ egress: { allowPorts: [target.port] } }, 'test').egress);
    await expect(connecting).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_POLICY', reason: 'loopback' });
    // A connection of our own after it: the listener accepts in order (and ends what it accepts), so once ours has
    // ended, one the connector made would have arrived too.
    const probe = net.connect(target.port, '127.0.0.1');
    probe.on('error', () => {});
    probe.resume();
    await new Promise((resolve) => probe.once('close', resolve));
    expect(target.arrivals).toHaveLength(1);
    servers.splice(servers.indexOf(target.server), 1);
    await new Promise((resolve) => target.server.close(resolve));
    expect(await openFds()).toBe(fds - 1); // the listener closed
  });

  it('a socket the new egress policy refuses is closed: SOCKPOOL_ERR_POLICY', async () => {
    const fds = await openFds();
    const corp = await proxy(false);
    const { state, connector } = setup([corp.port]);
    state.proxies = new Map([['corp', { name: 'corp', host: '127.0.0.1', port: corp.port }]]);
    const connecting = connector.connect(origin, policy);
    await corp.waiting();
    // The reload: the proxy's port is no longer allowed.
    state.egress = new EgressPolicy(
      parseConfig({ egress: { allow: ['127.0.0.1/32'], allowPorts: [443] } }, 'test').egress,
    );
    corp.answer();
    await expect(connecting).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_POLICY' });
    await corp.close();
    expect(await openFds()).toBe(fds);
  });
});

describe('TcpConnector: what a proxy answers to CONNECT', () => {
  const policy: OriginPolicy = { ...defaultConfig().pool.defaults };
  const origin = { host: 'origin.test', port: 443, proxy: 'corp' };

  /**
   * A proxy on 127.0.0.1 that answers the first CONNECT with `answer` (one write) and keeps the connection open, or
   * with `thenClose` shuts it down (`'reset'`: resets it) right after that write, in the same synchronous run: the
   * connector (this process's only thread) cannot read between the two, so the answer and the FIN (or the RST) are
   * both queued when it does.
   */
  async function answeringProxy(answer: string, thenClose: boolean | 'reset' = false) {
    const server = net.createServer((socket) => {
      socket.on('error', () => {});
      socket.once('data', () => {
        if (!thenClose) {
          socket.write(answer, 'latin1');
          return;
        }
        const fd = (socket as unknown as { _handle: { fd: number } })._handle.fd;
        writeSync(fd, Buffer.from(answer, 'latin1'));
        if (thenClose === 'reset') socket.resetAndDestroy();
        else native.shutdown(fd);
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    servers.push(server);
    const port = (server.address() as net.AddressInfo).port;
    const config = parseConfig({ egress: { allow: ['127.0.0.1/32'], allowPorts: [443, port] } }, 'test');
    const resolver = new Resolver(config.dns);
    const egress = new EgressPolicy(config.egress);
    const proxies = new Map<string, ProxyEndpoint>([['corp', { name: 'corp', host: '127.0.0.1', port }]]);
    const connector = new TcpConnector(
      () => resolver,
      () => egress,
      { proxies: () => proxies },
    );
    return {
      connector,
      close: () => {
        servers.splice(servers.indexOf(server), 1);
        return new Promise((resolve) => server.close(resolve));
      },
    };
  }

  /** A 200 answer whose head (status line, one padding header, blank line) is exactly `bytes` long. */
  function okHead(bytes: number): string {
    const start = 'HTTP/1.1 200 Connection established\r\nX-Pad: ';
    return `${start}${'p'.repeat(bytes - start.length - 4)}\r\n\r\n`;
  }

  it('refuses a head past 8 KiB even when it ends right at the edge of what was read, with the bytes after it', async () => {
    const fds = await openFds();
    // 8,192 bytes is the longest answer taken; one more, followed by bytes of a stream out of step: refused, not
    // lent with the proxy's bytes in front of the origin's.
    const oversized = await answeringProxy(`${okHead(8193)}HTTP/1.1 400 Bad Request\r\n\r\n`);
    await expect(oversized.connector.connect(origin, policy)).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_PROXY',
      fields: { proxy: 'corp', target: 'origin.test:443' },
    });
    await oversized.close();
    // At the limit, with bytes after it: refused too; alone: a tunnel.
    const trailing = await answeringProxy(`${okHead(8192)}junk`);
    await expect(trailing.connector.connect(origin, policy)).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_PROXY' });
    await trailing.close();
    const longest = await answeringProxy(okHead(8192));
    const tunnel = await longest.connector.connect(origin, policy);
    expect(native.probe(tunnel.fd).state).toBe('alive');
    native.close(tunnel.fd);
    await longest.close();
    expect(await openFds()).toBe(fds);
  });

  it('refuses a tunnel its proxy closed right after answering 200: SOCKPOOL_ERR_PROXY, not a dead socket', async () => {
    const fds = await openFds();
    // A proxy that says 200 and hangs up (one that answers before its own connect to the origin, which then
    // failed): lent, the tunnel would fail the client's request as an empty reply from the origin, and the pool
    // would count a connect that worked and open the next one at once.
    const closing = await answeringProxy('HTTP/1.1 200 Connection established\r\n\r\n', true);
    await expect(closing.connector.connect(origin, policy)).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_PROXY',
      fields: { proxy: 'corp', target: 'origin.test:443', status: 200 },
    });
    await closing.close();
    expect(await openFds()).toBe(fds);
  });

  it('fails at once, not at its timeout, when the proxy resets the connection in the middle of its answer', async () => {
    const fds = await openFds();
    // The start of an answer and the reset arrive together: epoll says EPOLLERR with the bytes, and libuv stops the
    // Poller there. The bytes are read; nothing more will ever come, and no event either.
    const resetting = await answeringProxy('HTTP/1.1 200 Connection established\r\nVia: 1.1 corp\r\n', 'reset');
    const started = performance.now();
    const error = await resetting.connector.connect(origin, { ...policy, connectTimeoutMs: 5000 }).catch((e) => e);
    const elapsed = performance.now() - started;
    expect(error).toMatchObject({ code: 'SOCKPOOL_ERR_PROXY', fields: { proxy: 'corp', status: null } });
    expect(error.message).not.toContain('did not answer');
    expect(elapsed).toBeLessThan(2000);
    await resetting.close();
    expect(await openFds()).toBe(fds);
  });
});

describe('TcpConnector: the origin a proxy is asked for', () => {
  const policy: OriginPolicy = { ...defaultConfig().pool.defaults };

  it('refuses `localhost` names through a proxy as the loopback addresses they name, as it refuses 127.0.0.1', async () => {
    // The proxy on 127.0.0.2, allowed alone: the policy refuses the rest of loopback. Through the proxy, the name
    // `localhost` (any name under it, RFC 6761; /etc/hosts' other loopback aliases) is the proxy host's loopback, which
    // the daemon's host may be: its metrics port, whatever else is bound there. The policy judged only the literal:
    // 127.0.0.1 was refused, while `localhost` reached the proxy, which connects to its own 127.0.0.1.
    const requests: string[] = [];
    const server = net.createServer((socket) => {
      socket.on('error', () => {});
      socket.once('data', (data) => {
        requests.push(data.toString('latin1').split('\r\n')[0]!);
        socket.write('HTTP/1.1 200 Connection established\r\n\r\n');
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.2', resolve));
    servers.push(server);
    const port = (server.address() as net.AddressInfo).port;
    const config = parseConfig({ egress: { allow: ['127.0.0.2/32'], allowPorts: [443, 8080, port] } }, 'test');
    const resolver = new Resolver(config.dns);
    const egress = new EgressPolicy(config.egress);
    const proxies = new Map<string, ProxyEndpoint>([['corp', { name: 'corp', host: '127.0.0.2', port }]]);
    const connector = new TcpConnector(
      () => resolver,
      () => egress,
      { proxies: () => proxies },
    );
    const fds = await openFds();
    for (const host of ['127.0.0.1', 'localhost', 'admin.localhost', 'ip6-localhost', 'localhost.localdomain']) {
      const origin = { host, port: 8080, proxy: 'corp' };
      expect(() => connector.checkTarget(origin), host).toThrow(expect.objectContaining({ reason: 'loopback' }));
      await expect(connector.connect(origin, policy), host).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_POLICY',
        fields: { host, port: 8080, reason: 'loopback' },
      });
    }
    expect(requests).toEqual([]);
    // Any other name is the proxy's to resolve (docs/security.md): it is asked for.
    const tunnel = await connector.connect({ host: 'origin.test', port: 443, proxy: 'corp' }, policy);
    native.close(tunnel.fd);
    expect(requests).toEqual(['CONNECT origin.test:443 HTTP/1.1']);
    servers.splice(servers.indexOf(server), 1);
    await new Promise((resolve) => server.close(resolve));
    expect(await openFds()).toBe(fds - 1); // the listener closed
  });
});
