// The resolver against a real DNS server on 127.0.0.1 (test/helpers/dns-server.ts): no mocks of node:dns, and no
// traffic anywhere else. Timing-dependent checks poll with deadlines instead of asserting exact durations.

import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseConfig, type SockpoolConfigInput } from '../daemon/config.js';
import { MAX_ADDRESSES_PER_FAMILY, Resolver, SystemLookupPlaces, threadpoolSize } from '../daemon/resolver.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { eventually } from './helpers/daemon.js';
import { type DnsTestServer, startDnsServer } from './helpers/dns-server.js';

let dnsServer: DnsTestServer;

/** `count` distinct IPv4 addresses in 10.0.0.0/8, in order. */
function manyV4(count: number): string[] {
  return Array.from({ length: count }, (_, i) => `10.0.${i >> 8}.${i & 255}`);
}

/** `count` distinct IPv6 addresses in 2001:db8::/32, in order. */
function manyV6(count: number): string[] {
  return Array.from({ length: count }, (_, i) => `2001:db8::${(i + 1).toString(16)}`);
}

beforeAll(async () => {
  dnsServer = await startDnsServer({
    'one.test': { a: ['198.51.100.1'], ttl: 300 },
    'dual.test': { a: ['198.51.100.1', '198.51.100.2'], aaaa: ['2001:db8::1', '2001:db8::2'], ttl: 300 },
    'four.test': { a: ['198.51.100.1', '198.51.100.2', '198.51.100.3', '198.51.100.4'], ttl: 300 },
    'v6only.test': { aaaa: ['2001:db8::a'], ttl: 300 },
    'short.test': { a: ['198.51.100.10'], ttl: 1 },
    'zero.test': { a: ['198.51.100.11'], ttl: 0 },
    'long.test': { a: ['198.51.100.12'], ttl: 86_400 },
    'slow.test': { a: ['198.51.100.13'], ttl: 300, delayMs: 300 },
    'silent.test': { a: ['198.51.100.14'], drop: true },
    'empty.test': { ttl: 300 },
    'mixed.case.test': { a: ['198.51.100.15'], ttl: 300 },
    'failures.test': { a: ['198.51.100.1', '198.51.100.2', '198.51.100.3'], ttl: 300 },
    'v6fail.test': { a: ['198.51.100.1'], aaaa: ['2001:db8::1'], ttl: 300 },
    'late-aaaa.test': { a: ['198.51.100.1'], aaaa: ['2001:db8::1'], aaaaDelayMs: 500, ttl: 300 },
    // A hostile server's answers for the names RFC 6761 §6.3 reserves for loopback.
    localhost: { a: ['198.51.100.7'], aaaa: ['2001:db8::7'], ttl: 300 },
    'app.localhost': { a: ['198.51.100.8'], ttl: 300 },
    // Far more addresses than fit in 512 bytes: truncated over UDP, asked again over TCP.
    'many.test': { a: manyV4(600), aaaa: manyV6(300), ttl: 300 },
    'servfail.test': { a: ['198.51.100.9'], rcode: 2 },
  });
});

afterAll(async () => {
  await dnsServer?.close();
});

type DnsInput = NonNullable<SockpoolConfigInput['dns']>;

/** A resolver from a `dns` section as a config file has it (parsed as the daemon parses it, defaults filled). */
function resolverOf(dns: DnsInput, failurePenaltyMs?: number): Resolver {
  return new Resolver({ ...parseConfig({ dns }, 'test').dns, failurePenaltyMs });
}

/** A resolver asking the test DNS server. */
function resolver(options: DnsInput & { failurePenaltyMs?: number } = {}): Resolver {
  const { failurePenaltyMs, ...dns } = options;
  return resolverOf({ servers: [dnsServer.server], ...dns }, failurePenaltyMs);
}

async function dnsError(promise: Promise<unknown>): Promise<SockpoolError> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(SockpoolError);
    expect((error as SockpoolError).code).toBe(ErrorCodes.DNS);
    return error as SockpoolError;
  }
  throw new Error('expected a DNS error');
}

const addresses = (list: Array<{ address: string }>) => list.map((item) => item.address);

describe('Resolver through a DNS server', () => {
  it('resolves A records', async () => {
    const result = await resolver().resolve('one.test', 443);
    expect(result).toEqual([{ address: '198.51.100.1', family: 4 }]);
    expect(dnsServer.count('one.test', 'A')).toBeGreaterThanOrEqual(1);
    expect(dnsServer.count('one.test', 'AAAA')).toBeGreaterThanOrEqual(1);
  });

  it('keeps every address of both families and interleaves them, IPv6 first', async () => {
    const result = await resolver().resolve('dual.test', 443);
    expect(result.map((item) => item.family)).toEqual([6, 4, 6, 4]);
    expect(new Set(addresses(result))).toEqual(new Set(['198.51.100.1', '198.51.100.2', '2001:db8::1', '2001:db8::2']));
    expect(await resolver().resolve('v6only.test', 80)).toEqual([{ address: '2001:db8::a', family: 6 }]);
  });

  it('normalises the host name (case, trailing dot)', async () => {
    const result = await resolver().resolve('MIXED.Case.test.', 80);
    expect(addresses(result)).toEqual(['198.51.100.15']);
  });

  it('caches within the TTL: the query count does not grow', async () => {
    const r = resolver();
    await r.resolve('long.test', 443);
    const before = dnsServer.count('long.test');
    for (let index = 0; index < 20; index++) await r.resolve('long.test', 443);
    await r.resolve('LONG.test', 80); // the cache is per host, not per port
    expect(dnsServer.count('long.test')).toBe(before);
  });

  it('asks again after the TTL expires (clamped to minTtlMs)', async () => {
    const r = resolver({ minTtlMs: 100 });
    await r.resolve('short.test', 443);
    const afterFirst = dnsServer.count('short.test', 'A');
    // Within 1 s the answer comes from the cache (checked right away: far less than the TTL has passed).
    await r.resolve('short.test', 443);
    expect(dnsServer.count('short.test', 'A')).toBe(afterFirst);
    dnsServer.records['short.test'] = { a: ['198.51.100.20'], ttl: 1 };
    await eventually(async () => {
      const result = await r.resolve('short.test', 443);
      return result[0]?.address === '198.51.100.20';
    }, 'the new answer after the TTL');
    expect(dnsServer.count('short.test', 'A')).toBeGreaterThan(afterFirst);
  });

  it('clamps a zero TTL up to minTtlMs and a long TTL down to maxTtlMs', async () => {
    const r = resolver({ minTtlMs: 60_000 });
    await r.resolve('zero.test', 443);
    const before = dnsServer.count('zero.test');
    await r.resolve('zero.test', 443);
    expect(dnsServer.count('zero.test')).toBe(before); // ttl 0 still cached for minTtlMs

    const capped = resolver({ minTtlMs: 50, maxTtlMs: 200 });
    await capped.resolve('long.test', 443);
    const afterFirst = dnsServer.count('long.test', 'A');
    await eventually(async () => {
      await capped.resolve('long.test', 443);
      return dnsServer.count('long.test', 'A') > afterFirst; // a one-day TTL expired after maxTtlMs
    }, 'asked again after maxTtlMs');
  });

  it('rotates the starting address on each call', async () => {
    const r = resolver();
    const starts = [];
    for (let index = 0; index < 4; index++) starts.push((await r.resolve('four.test', 443))[0]?.address);
    expect(new Set(starts).size).toBe(4);
    const result = await r.resolve('four.test', 443);
    expect(new Set(addresses(result)).size).toBe(4); // every address, every time
  });

  it('puts addresses that failed last until reportSuccess', async () => {
    const r = resolver();
    r.reportFailure('failures.test', 443, '198.51.100.2');
    r.reportFailure('FAILURES.test', 443, '198.51.100.1');
    for (let index = 0; index < 3; index++) {
      // The least recently failed of the bad ones comes first among them.
      expect(addresses(await r.resolve('failures.test', 443)).slice(1)).toEqual(['198.51.100.2', '198.51.100.1']);
    }
    r.reportSuccess('failures.test', 443, '198.51.100.2');
    for (let index = 0; index < 3; index++) {
      const result = addresses(await r.resolve('failures.test', 443));
      expect(result[2]).toBe('198.51.100.1');
      expect(result).toHaveLength(3);
    }
    r.reportSuccess('failures.test', 443, '198.51.100.1');
    const starts = new Set<string | undefined>();
    for (let index = 0; index < 3; index++) starts.add(addresses(await r.resolve('failures.test', 443))[0]);
    expect(starts.size).toBe(3);
  });

  it("keeps a uid's failure marks while another uid's connects fail at thousands of host:ports", async () => {
    const r = resolver();
    r.reportFailure('failures.test', 443, '198.51.100.2', 1);
    // Past the table's 10,000 host:ports: uid 2's marks push out uid 2's own oldest, not uid 1's.
    for (let port = 1; port <= 12_000; port++) r.reportFailure('junk.test', port, '198.51.100.9', 2);
    for (let index = 0; index < 3; index++) {
      expect(addresses(await r.resolve('failures.test', 443)).at(-1)).toBe('198.51.100.2');
    }
  });

  it("another uid's failure at a host:port a uid's marks are for does not take them over: it cannot push them out", async () => {
    const r = resolver();
    r.reportFailure('failures.test', 443, '198.51.100.2', 1);
    // uid 2 fails there too (it knows the host:port), then at thousands of others: the marks stay uid 1's, so what
    // gives way is uid 2's own.
    r.reportFailure('failures.test', 443, '198.51.100.3', 2);
    for (let port = 1; port <= 12_000; port++) r.reportFailure('junk.test', port, '198.51.100.9', 2);
    for (let index = 0; index < 3; index++) {
      expect(addresses(await r.resolve('failures.test', 443)).slice(1)).toEqual(['198.51.100.2', '198.51.100.3']);
    }
  });

  it('forgets a failure after failurePenaltyMs', async () => {
    const r = resolver({ failurePenaltyMs: 100 });
    r.reportFailure('v6fail.test', 443, '2001:db8::1');
    expect((await r.resolve('v6fail.test', 443)).map((item) => item.family)).toEqual([4, 6]);
    // A failure on one port says nothing of another port of the host.
    expect((await r.resolve('v6fail.test', 8443)).map((item) => item.family)).toEqual([6, 4]);
    await eventually(async () => (await r.resolve('v6fail.test', 443))[0]?.family === 6, 'the failure forgotten');
  });

  it('gives each family as soon as its own answer is in while the query is in flight', async () => {
    const r = resolver();
    const all = r.resolve('late-aaaa.test', 443);
    const early = r.answersInFlight('LATE-AAAA.test', 443);
    expect(early).toBeDefined();
    const order: string[] = [];
    await Promise.all([
      early![4].then((list) => order.push(`4 ${addresses(list)}`)),
      early![6].then((list) => order.push(`6 ${addresses(list)}`)),
      all.then((list) => order.push(`all ${addresses(list)}`)),
    ]);
    expect(order).toEqual(['4 198.51.100.1', '6 2001:db8::1', 'all 2001:db8::1,198.51.100.1']);
    // Answered and cached: nothing in flight, and so for literals and overrides.
    expect(r.answersInFlight('late-aaaa.test', 443)).toBeUndefined();
    await r.resolve('192.0.2.1', 443);
    expect(r.answersInFlight('192.0.2.1', 443)).toBeUndefined();
  });

  it('shares one query between concurrent resolves of a host', async () => {
    const r = resolver();
    const before = dnsServer.count('slow.test', 'A');
    const results = await Promise.all(Array.from({ length: 10 }, () => r.resolve('slow.test', 443)));
    expect(results.every((result) => result[0]?.address === '198.51.100.13')).toBe(true);
    expect(dnsServer.count('slow.test', 'A') - before).toBe(1);
  });

  it('NXDOMAIN is a typed DNS error, cached for negativeTtlMs', async () => {
    const r = resolver({ negativeTtlMs: 60_000 });
    const error = await dnsError(r.resolve('missing.test', 443));
    expect(error.fields).toMatchObject({ host: 'missing.test', reason: 'nxdomain', dnsCode: 'ENOTFOUND' });
    const before = dnsServer.count('missing.test');
    const again = await dnsError(r.resolve('missing.test', 443));
    expect(again.fields.reason).toBe('nxdomain');
    expect(dnsServer.count('missing.test')).toBe(before);
  });

  it('the negative cache expires', async () => {
    const r = resolver({ negativeTtlMs: 100 });
    await dnsError(r.resolve('appears-later.test', 443));
    dnsServer.records['appears-later.test'] = { a: ['198.51.100.30'], ttl: 300 };
    await eventually(async () => {
      try {
        return (await r.resolve('appears-later.test', 443))[0]?.address === '198.51.100.30';
      } catch {
        return false;
      }
    }, 'the negative answer expired');
  });

  it('a name without addresses is a DNS error (no-addresses), cached too', async () => {
    const r = resolver();
    const error = await dnsError(r.resolve('empty.test', 443));
    expect(error.fields).toMatchObject({ host: 'empty.test', reason: 'no-addresses' });
    const before = dnsServer.count('empty.test');
    await dnsError(r.resolve('empty.test', 443));
    expect(dnsServer.count('empty.test')).toBe(before);
  });

  it('a server that never answers is a DNS timeout, not cached', async () => {
    const r = resolver({ timeoutMs: 200 });
    const error = await dnsError(r.resolve('silent.test', 443));
    expect(error.fields).toMatchObject({ host: 'silent.test', reason: 'timeout' });
    const before = dnsServer.count('silent.test');
    await dnsError(r.resolve('silent.test', 443));
    expect(dnsServer.count('silent.test')).toBeGreaterThan(before);
  });

  it('answers `localhost` and the names under it with loopback itself, never asking DNS (RFC 6761 §6.3)', async () => {
    const r = resolver();
    for (const host of ['localhost', 'LocalHost.', 'app.localhost', 'a.b.localhost']) {
      expect(addresses(await r.resolve(host, 443)), host).toEqual(['::1', '127.0.0.1']);
    }
    expect(r.answersInFlight('localhost', 443)).toBeUndefined();
    expect(dnsServer.count('localhost')).toBe(0);
    expect(dnsServer.count('app.localhost')).toBe(0);
    // A dns.resolve entry still wins (the operator's), and a name merely ending in "localhost" is a name.
    const pinned = resolver({ resolve: ['localhost:443:127.0.0.9'] });
    expect(addresses(await pinned.resolve('localhost', 443))).toEqual(['127.0.0.9']);
  });

  it('keeps at most MAX_ADDRESSES_PER_FAMILY of a huge answer (truncated over UDP, whole over TCP): bounded memory', async () => {
    const r = resolver();
    const list = await r.resolve('many.test', 443);
    // The answer did take TCP (what the server sent over UDP had no addresses).
    expect(dnsServer.queries.some((query) => query.name === 'many.test' && query.transport === 'tcp')).toBe(true);
    const v4 = list.filter((item) => item.family === 4).map((item) => item.address);
    const v6 = list.filter((item) => item.family === 6).map((item) => item.address);
    expect([v4.length, v6.length]).toEqual([MAX_ADDRESSES_PER_FAMILY, MAX_ADDRESSES_PER_FAMILY]);
    // The first ones the server gave, in some rotation.
    expect(new Set(v4)).toEqual(new Set(manyV4(MAX_ADDRESSES_PER_FAMILY)));
    expect(new Set(v6)).toEqual(new Set(manyV6(MAX_ADDRESSES_PER_FAMILY)));
    // Also what a connect is given while the query is in flight.
    const fresh = resolver();
    const resolving = fresh.resolve('many.test', 443);
    const early = fresh.answersInFlight('many.test', 443)!;
    expect((await early[4]).length).toBe(MAX_ADDRESSES_PER_FAMILY);
    expect((await early[6]).length).toBe(MAX_ADDRESSES_PER_FAMILY);
    await resolving;
  });

  it('a SERVFAIL is remembered for a second (RFC 9520): a storm of acquires is not a storm of queries', async () => {
    const r = resolver();
    for (let i = 0; i < 50; i++) {
      const error = await dnsError(r.resolve('servfail.test', 443, 1000));
      expect(error.fields).toMatchObject({ reason: 'server-failure', dnsCode: 'ESERVFAIL' });
    }
    // One resolution's queries (c-ares may ask a second time on SERVFAIL), not fifty.
    expect(dnsServer.count('servfail.test')).toBeLessThanOrEqual(4);
    const asked = dnsServer.count('servfail.test');
    // And asked again once that second has passed.
    await eventually(async () => {
      await dnsError(r.resolve('servfail.test', 443, 1000));
      return dnsServer.count('servfail.test') > asked;
    }, 'servfail.test asked again');
    // An operator who caches no negative answer caches no failure either.
    const uncached = resolver({ negativeTtlMs: 0 });
    const before = dnsServer.count('servfail.test');
    await dnsError(uncached.resolve('servfail.test', 443));
    await dnsError(uncached.resolve('servfail.test', 443));
    expect(dnsServer.count('servfail.test')).toBeGreaterThan(before + 2);
  });

  it('a slow family does not hold the answer beyond timeoutMs', async () => {
    const r = resolver({ timeoutMs: 100 });
    const error = await dnsError(r.resolve('slow.test', 443)); // 300 ms answers
    expect(error.fields.reason).toBe('timeout');
  });
});

describe('Resolver without DNS', () => {
  it('returns IP literals themselves, normalised, without asking', async () => {
    const r = resolver();
    const before = dnsServer.queries.length;
    expect(await r.resolve('198.51.100.7', 443)).toEqual([{ address: '198.51.100.7', family: 4 }]);
    expect(await r.resolve('[2001:DB8::0:1]', 443)).toEqual([{ address: '2001:db8::1', family: 6 }]);
    expect(await r.resolve('::ffff:7f00:1', 443)).toEqual([{ address: '127.0.0.1', family: 4 }]);
    expect(await r.resolve('2130706433', 443)).toEqual([{ address: '127.0.0.1', family: 4 }]);
    expect(await r.resolve('0x7f.1', 443)).toEqual([{ address: '127.0.0.1', family: 4 }]);
    expect(dnsServer.queries.length).toBe(before);
  });

  it('overrides win over DNS for that host and port', async () => {
    const r = resolver({
      resolve: ['one.test:443:198.18.0.1,[2001:db8::99]', '+Dual.test:80:198.18.0.2', 'dual.test:80:198.18.0.3'],
    });
    const before = dnsServer.queries.length;
    const result = await r.resolve('ONE.test', 443);
    expect(result).toEqual([
      { address: '2001:db8::99', family: 6 },
      { address: '198.18.0.1', family: 4 },
    ]);
    const merged = await r.resolve('dual.test', 80);
    expect(new Set(addresses(merged))).toEqual(new Set(['198.18.0.2', '198.18.0.3']));
    expect((await r.resolve('dual.test', 80))[0]?.address).not.toBe(merged[0]?.address); // rotates too
    expect(dnsServer.queries.length).toBe(before);
    // Another port of the same host goes to DNS.
    expect(addresses(await r.resolve('one.test', 8443))).toEqual(['198.51.100.1']);
  });

  it('works without any DNS server for overridden names', async () => {
    const r = resolverOf({ servers: ['127.0.0.1:9'], resolve: ['lab.test:443:198.18.0.10'], timeoutMs: 100 });
    expect(await r.resolve('lab.test', 443)).toEqual([{ address: '198.18.0.10', family: 4 }]);
  });

  it('without servers, uses the system resolver (localhost comes from /etc/hosts, no DNS traffic)', async () => {
    const result = await resolverOf({}).resolve('localhost', 443);
    expect(addresses(result)).toContain('127.0.0.1');
  });

  it('a system lookup still running past the deadline is joined, not asked again, and holds the lookup charge', async () => {
    // getaddrinfo cannot be cancelled: a hung system resolver keeps a libuv thread (or a place in its queue) per
    // lookup. One that is abandoned at the deadline must not be followed by another for the same name on every
    // connect, and a uid's lookup charge (lookupInFlight) must last until it really ends.
    const calls: string[] = [];
    let answer: (found: Array<{ address: string; family: number }>) => void = () => {};
    const r = new Resolver({ ...parseConfig({ dns: { timeoutMs: 20 } }, 'test').dns }, (name) => {
      calls.push(name);
      return new Promise((resolve) => {
        answer = resolve;
      });
    });
    expect((await dnsError(r.resolve('hung.test', 443))).fields).toMatchObject({ reason: 'timeout' });
    expect(r.lookupInFlight('hung.test')).toBeDefined();
    expect((await dnsError(r.resolve('hung.test', 443))).fields).toMatchObject({ reason: 'timeout' });
    expect(calls).toEqual(['hung.test']);
    // It ends at last: its answer is the next one's.
    const next = r.resolve('hung.test', 443);
    answer([{ address: '198.51.100.7', family: 4 }]);
    expect(addresses(await next)).toEqual(['198.51.100.7']);
    expect(calls).toEqual(['hung.test']);
    expect(r.lookupInFlight('hung.test')).toBeUndefined();
  });

  it("hung system lookups of one uid, or of a few together, leave another uid's lookup a thread of the pool", async () => {
    // getaddrinfo holds one of libuv's threads (sockpoold runs 32) until glibc answers or gives up, which takes
    // long for names whose servers never answer. Modelled here: a pool of 32 threads, of which libuv lets at most
    // (32 + 1) / 2 = 16 run getaddrinfo at once (its "slow I/O" work; uv__work_submit with UV__WORK_SLOW_IO), the
    // rest waiting in libuv's own queue, first come first served; `hung-*` names never answer until released.
    const threads = 32;
    const slowThreads = Math.floor((threads + 1) / 2);
    let running = 0;
    let mostRunning = 0;
    /** Lookups the resolver started that had to wait in libuv's queue (behind hung ones: no fairness there). */
    let waitedInPool = 0;
    const queued: Array<() => void> = [];
    const hung: Array<() => void> = [];
    const calls: string[] = [];
    const lookup = (name: string) =>
      new Promise<Array<{ address: string; family: number }>>((resolve) => {
        calls.push(name);
        const run = () => {
          running++;
          mostRunning = Math.max(mostRunning, running);
          const end = () => {
            running--;
            queued.shift()?.();
          };
          if (name.startsWith('hung-')) {
            hung.push(() => {
              end();
              resolve([{ address: '198.51.100.9', family: 4 }]);
            });
          } else {
            end();
            resolve([{ address: '198.51.100.8', family: 4 }]);
          }
        };
        if (running < slowThreads) run();
        else {
          waitedInPool++;
          queued.push(run);
        }
      });
    const options = { ...parseConfig({ dns: { timeoutMs: 100 } }, 'test').dns };
    const r = new Resolver(options, lookup, new SystemLookupPlaces(threads));
    // One uid asks for 40 names that hang (well within maxLookupsPerUid): each resolution fails at its deadline.
    const first = await Promise.allSettled(Array.from({ length: 40 }, (_, i) => r.resolve(`hung-${i}.test`, 443, 1)));
    expect(first.every((result) => result.status === 'rejected')).toBe(true);
    // Another uid's lookup still finds a thread, and so does the daemon's own.
    expect(addresses(await r.resolve('other.test', 443, 2))).toEqual(['198.51.100.8']);
    expect(addresses(await r.resolve('refill.test', 443, -1))).toEqual(['198.51.100.8']);
    // A few uids together neither.
    await Promise.allSettled(
      [3, 4, 5].flatMap((uid) => Array.from({ length: 20 }, (_, i) => r.resolve(`hung-${uid}-${i}.test`, 443, uid))),
    );
    expect(addresses(await r.resolve('another.test', 443, 6))).toEqual(['198.51.100.8']);
    // The system lookups in flight stay within what libuv runs at once, so none the resolver started waits in
    // libuv's queue (the daemon's own fs work has the other threads); those that waited for a turn past their
    // deadline were dropped, never started.
    expect(waitedInPool).toBe(0);
    expect(mostRunning).toBeLessThanOrEqual(slowThreads);
    const asked = calls.length;
    expect(asked).toBeLessThan(40 + 60 + 3);
    for (const release of hung.splice(0)) release();
    await new Promise((resolve) => setTimeout(resolve, 50));
    for (const release of hung.splice(0)) release();
    expect(calls.length).toBe(asked);
    // A dropped name is looked up again when asked again.
    const again = r.resolve('hung-39.test', 443, 1);
    await eventually(() => hung.length === 1, 'the second lookup of hung-39.test');
    hung[0]!();
    expect(addresses(await again)).toEqual(['198.51.100.9']);
  });

  it("a resolver made by a reload counts the hung system lookups of the one before: the pool's threads are the process's", async () => {
    // A reload that changes the `dns` section makes a new Resolver, while the old one's hung lookups still hold
    // their libuv threads. Modelled: this process's pool (threadpoolSize()) with libuv's rule (at most half of it,
    // rounded up, runs getaddrinfo; the rest waits in libuv's queue); `hung-*` names never answer until released.
    // Both resolvers are made as the daemon makes them (no pool of their own given).
    const slowThreads = Math.floor((threadpoolSize() + 1) / 2);
    let running = 0;
    let waitedInPool = 0;
    const queued: Array<() => void> = [];
    const hung: Array<() => void> = [];
    const lookup = (name: string) =>
      new Promise<Array<{ address: string; family: number }>>((resolve) => {
        const run = () => {
          running++;
          const end = () => {
            running--;
            queued.shift()?.();
          };
          if (name.startsWith('hung-')) {
            hung.push(() => {
              end();
              resolve([{ address: '198.51.100.9', family: 4 }]);
            });
          } else {
            end();
            resolve([{ address: '198.51.100.8', family: 4 }]);
          }
        };
        if (running < slowThreads) run();
        else {
          waitedInPool++;
          queued.push(run);
        }
      });
    const before = new Resolver({ ...parseConfig({ dns: { timeoutMs: 100 } }, 'test').dns }, lookup);
    const after = new Resolver({ ...parseConfig({ dns: { timeoutMs: 150 } }, 'test').dns }, lookup);
    try {
      // One uid's hung names, before the reload and again after it (the old resolver's still hang).
      const many = slowThreads + 8;
      await Promise.allSettled(Array.from({ length: many }, (_, i) => before.resolve(`hung-a${i}.test`, 443, 1)));
      await Promise.allSettled(Array.from({ length: many }, (_, i) => after.resolve(`hung-b${i}.test`, 443, 1)));
      // Another uid's lookup on the new resolver still runs at once.
      expect(addresses(await after.resolve('other.test', 443, 2))).toEqual(['198.51.100.8']);
      expect(waitedInPool).toBe(0);
    } finally {
      // Every hung lookup ends (the places they hold are this process's, shared with the other tests).
      await eventually(() => {
        for (const release of hung.splice(0)) release();
        return running === 0 && queued.length === 0;
      }, 'every modelled lookup ended');
    }
  });

  it("a resolver made by a reload joins the system lookup of a name the one before still runs, and its uid's charge lasts", async () => {
    // The lookup of a hung name goes on in its thread after a reload. The new resolver must not start another for
    // the same name (one more thread each reload), and lookupInFlight, which keeps a uid's maxLookupsPerUid charge
    // while its name's lookup runs, must see it (the daemon asks its current resolver when an acquire settles).
    const calls: string[] = [];
    let answer: (found: Array<{ address: string; family: number }>) => void = () => {};
    const lookup = (name: string) =>
      new Promise<Array<{ address: string; family: number }>>((resolve) => {
        calls.push(name);
        answer = resolve;
      });
    const before = new Resolver({ ...parseConfig({ dns: { timeoutMs: 20 } }, 'test').dns }, lookup);
    expect((await dnsError(before.resolve('hung-reload.test', 443, 1))).fields).toMatchObject({ reason: 'timeout' });
    const after = new Resolver({ ...parseConfig({ dns: { timeoutMs: 30 } }, 'test').dns }, lookup);
    try {
      expect(after.lookupInFlight('hung-reload.test')).toBeDefined();
      expect((await dnsError(after.resolve('hung-reload.test', 443, 1))).fields).toMatchObject({ reason: 'timeout' });
      expect(calls).toEqual(['hung-reload.test']);
    } finally {
      answer([{ address: '198.51.100.7', family: 4 }]);
    }
    await eventually(() => after.lookupInFlight('hung-reload.test') === undefined, 'the lookup ended');
  });

  it("keeps a uid's cached names while another uid looks up thousands of names: the uid holding most gives way", async () => {
    // The cache holds 10,000 names. One uid's lookups past that (a crawler, or junk on purpose) must push out its
    // own oldest names, not those of a uid that holds fewer: each name flushed would cost that uid a lookup again
    // (with the system resolver, a libuv thread for as long as it takes).
    const asked = new Map<string, number>();
    const dns = { minTtlMs: 600_000, maxTtlMs: 600_000, negativeTtlMs: 600_000 };
    const r = new Resolver({ ...parseConfig({ dns }, 'test').dns }, async (name) => {
      asked.set(name, (asked.get(name) ?? 0) + 1);
      // Half the junk does not exist: negative answers are cached too, and count alike.
      if (/^junk-\d*[13579]\./.test(name)) throw Object.assign(new Error('no such name'), { code: 'ENOTFOUND' });
      return [{ address: '198.51.100.7', family: 4 }];
    });
    for (const name of ['kept-1.test', 'kept-2.test']) await r.resolve(name, 443, 1);
    for (let index = 0; index < 12_000; index++) await r.resolve(`junk-${index}.test`, 443, 2).catch(() => {});
    for (const name of ['kept-1.test', 'kept-2.test']) {
      expect(addresses(await r.resolve(name, 443, 1))).toEqual(['198.51.100.7']);
      expect(asked.get(name), name).toBe(1);
    }
    // Still at most 10,000 names: uid 2's oldest went, its latest are there.
    await r.resolve('junk-11999.test', 443, 2).catch(() => {});
    expect(asked.get('junk-11999.test')).toBe(1);
    await r.resolve('junk-0.test', 443, 2);
    expect(asked.get('junk-0.test')).toBe(2);
  });

  it('refuses names that are not host names without asking', async () => {
    const r = resolver();
    const before = dnsServer.queries.length;
    expect((await dnsError(r.resolve('1.2.3.999', 443))).fields.reason).toBe('invalid-host');
    expect((await dnsError(r.resolve('a b', 443))).fields.reason).toBe('invalid-host');
    expect(dnsServer.queries.length).toBe(before);
  });

  it.each([
    'one.test',
    'one.test:443',
    'one.test:443:',
    'one.test:0:198.18.0.1',
    'one.test:70000:198.18.0.1',
    'one.test:443:2001:db8::1',
    'one.test:443:[198.18.0.1]',
    'one.test:443:198.18.0.256',
    'one.test:443:0x7f.1',
    'one.test:443:198.18.0.1,',
    '[::1]:443:198.18.0.1',
    'bad host:443:198.18.0.1',
  ])('resolve entry %j is a config error naming it', (entry) => {
    try {
      resolverOf({ resolve: [entry] });
    } catch (error) {
      expect(error).toBeInstanceOf(SockpoolError);
      expect((error as SockpoolError).code).toBe(ErrorCodes.CONFIG);
      expect((error as SockpoolError).message).toContain(JSON.stringify(entry));
      return;
    }
    throw new Error('expected a config error');
  });

  it('bad servers and options are config errors', () => {
    for (const options of [
      { servers: ['dns.example'] },
      { servers: ['127.0.0.1:99999'] },
      { servers: ['127.1'] },
      { minTtlMs: -1 },
      { minTtlMs: 10, maxTtlMs: 5 },
      { timeoutMs: 0 },
    ]) {
      expect(() => resolverOf(options)).toThrow(expect.objectContaining({ code: ErrorCodes.CONFIG }));
    }
    expect(() => resolverOf({ servers: ['127.0.0.1', '127.0.0.1:5353', '[::1]:53', '::1'] })).not.toThrow();
  });
});
