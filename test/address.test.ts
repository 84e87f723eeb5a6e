// shared/address.ts: every accepted spelling with its canonical form, every refused one with its error code and
// reason. Pure functions, no I/O.

import { describe, expect, it, vi } from 'vitest';
import {
  canonicalHost,
  cidrContains,
  hostMatches,
  parseCidr,
  parseDnsServer,
  parseHost,
  parseHostPattern,
  parseIpLiteral,
  parseNat64Prefix,
  parseOriginMatch,
  parseResolveEntry,
  parseStrictIp,
} from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { canonicalOrigin, type Origin, originKey, parseOriginKey } from '../shared/origin.js';

/** The error `action` throws: a SockpoolError with the INVALID_ARGUMENT code. */
function refusal(action: () => unknown): SockpoolError {
  try {
    action();
  } catch (error) {
    expect(error).toBeInstanceOf(SockpoolError);
    expect((error as SockpoolError).code).toBe(ErrorCodes.INVALID_ARGUMENT);
    return error as SockpoolError;
  }
  throw new Error('expected SOCKPOOL_ERR_INVALID_ARGUMENT, nothing was thrown');
}

describe('canonicalHost', () => {
  it.each([
    // IPv4, every WHATWG URL spelling of one address
    ['127.0.0.1', '127.0.0.1'],
    ['127.1', '127.0.0.1'],
    ['127.0.1', '127.0.0.1'],
    ['2130706433', '127.0.0.1'],
    ['0x7f000001', '127.0.0.1'],
    ['0X7F000001', '127.0.0.1'],
    ['0x7f.1', '127.0.0.1'],
    ['0177.0.0.1', '127.0.0.1'],
    ['0177.0.0.01', '127.0.0.1'],
    ['127.0.0.1.', '127.0.0.1'],
    ['00000000000000000000000000000000000177.1', '127.0.0.1'],
    ['10.0x10.0300', '10.16.0.192'],
    ['0', '0.0.0.0'],
    ['0x', '0.0.0.0'],
    ['4294967295', '255.255.255.255'],
    ['１２７.０.０.１', '127.0.0.1'], // full-width digits: IDNA maps them first, as the URL parser does
    // IPv6: compressed, lower case, with or without brackets
    ['::1', '::1'],
    ['[::1]', '::1'],
    ['[0:0::1]', '::1'],
    ['0:0:0:0:0:0:0:1', '::1'],
    ['2001:DB8:0:0:0:0:0:1', '2001:db8::1'],
    ['2001:db8:0:0:1:0:0:1', '2001:db8::1:0:0:1'],
    ['2001:db8:0:1:1:1:1:1', '2001:db8:0:1:1:1:1:1'],
    ['0:0:0:0:0:0:0:0', '::'],
    // IPv4-mapped: the IPv4 host itself (a dual-stack socket connects there); other embedding forms stay IPv6
    ['[::ffff:127.0.0.1]', '127.0.0.1'],
    ['::ffff:7f00:1', '127.0.0.1'],
    ['[::FFFF:7F00:1]', '127.0.0.1'],
    ['0:0:0:0:0:ffff:5db8:d822', '93.184.216.34'],
    ['::127.0.0.1', '::7f00:1'],
    ['::ffff:0:127.0.0.1', '::ffff:0:7f00:1'],
    ['64:ff9b::127.0.0.1', '64:ff9b::7f00:1'],
    // names: lower case, no trailing dot, IDNA to punycode
    ['example.com', 'example.com'],
    ['Example.COM.', 'example.com'],
    ['  example.com ', 'example.com'],
    ['_srv.a-b.example', '_srv.a-b.example'],
    ['localhost', 'localhost'],
    ['Bücher.example', 'xn--bcher-kva.example'],
    ['xn--bcher-kva.example', 'xn--bcher-kva.example'],
    ['ß.example', 'xn--zca.example'],
    ['Ｅｘａｍｐｌｅ.com', 'example.com'],
    ['foo.0xg', 'foo.0xg'],
    [`${'a'.repeat(63)}.com`, `${'a'.repeat(63)}.com`],
  ])('%j → %j', (input, canonical) => {
    expect(canonicalHost(input)).toBe(canonical);
    expect(canonicalHost(canonical)).toBe(canonical); // canonical text is a fixed point
  });

  it.each([
    ['', 'empty'],
    ['   ', 'empty'],
    ['fe80::1%eth0', 'zone-id'],
    ['[fe80::1%eth0]', 'zone-id'],
    ['[fe80::1%25eth0]', 'zone-id'],
    ['1::2::3', 'ipv6'],
    ['[127.0.0.1]', 'ipv6'],
    ['[::1', 'ipv6'],
    ['::1]', 'ipv6'],
    ['1:2:3:4:5:6:7:8:9', 'ipv6'],
    ['256.0.0.1', 'ipv4'],
    ['1.2.3.999', 'ipv4'],
    ['1.2.3.4.5', 'ipv4'],
    ['08.0.0.1', 'ipv4'],
    ['4294967296', 'ipv4'],
    ['1.16777216', 'ipv4'],
    ['0x1g.0.0.1', 'ipv4'],
    ['foo.0x10', 'ipv4'],
    ['foo.1', 'ipv4'],
    ['127.0.0.1..', 'host-name'],
    ['a..b', 'host-name'],
    ['.', 'host-name'],
    ['example.com..', 'host-name'],
    ['a b', 'host-name'],
    ['a!b.example', 'host-name'],
    ['a*b.example', 'host-name'],
    ['a/b', 'host-name'], // (domainToASCII alone would answer "a")
    ['example.com/path', 'host-name'],
    ['a?b', 'host-name'],
    ['a#b', 'host-name'],
    ['user@a.test', 'host-name'],
    ['a\\b', 'host-name'],
    ['a%2fb', 'host-name'],
    ['bücher/x.test', 'host-name'],
    [`${'a'.repeat(64)}.com`, 'host-name'],
    [`${'a.'.repeat(127)}ab`, 'host-name'],
    ['a\u0000b', 'host-name'],
  ])('%j is refused (%s)', (input, reason) => {
    const error = refusal(() => canonicalHost(input));
    expect(error.fields).toEqual({ input, reason });
    expect(error.message).toContain(JSON.stringify(input));
  });

  it('tells IP literals from names', () => {
    expect(parseHost('0x7f.1')).toMatchObject({ kind: 'ip', ip: { family: 4, text: '127.0.0.1' } });
    expect(parseHost('[2001:db8::1]')).toMatchObject({ kind: 'ip', ip: { family: 6, text: '2001:db8::1' } });
    expect(parseHost('EXAMPLE.org')).toEqual({ kind: 'name', name: 'example.org' });
  });
});

describe('parseIpLiteral (addresses as the kernel and resolvers give them, or a host)', () => {
  it.each([
    ['127.0.0.1', '127.0.0.1', 4],
    ['2130706433', '127.0.0.1', 4],
    ['[::1]', '::1', 6],
    ['::FFFF:7F00:1', '::ffff:127.0.0.1', 6],
    ['127.0.0.1 ', '127.0.0.1', 4], // surrounding whitespace is trimmed (inet_aton accepts trailing whitespace too)
  ])('%j → %j (IPv%d)', (input, text, family) => {
    expect(parseIpLiteral(input)).toMatchObject({ text, family });
  });

  it.each(['example.com', '', '[127.0.0.1]', 'fe80::1%eth0', '256.0.0.1', '1::2::3'])('%j is none', (input) => {
    expect(parseIpLiteral(input)).toBeNull();
  });
});

describe('parseStrictIp (configuration spelling)', () => {
  it.each([
    ['192.0.2.1', '192.0.2.1'],
    ['2001:DB8::1', '2001:db8::1'],
    ['::ffff:192.0.2.1', '::ffff:192.0.2.1'],
  ])('%j → %j', (input, text) => {
    expect(parseStrictIp(input).text).toBe(text);
  });

  it.each([
    ['127.1', 'not-strict'],
    ['0x7f000001', 'not-strict'],
    ['010.0.0.1', 'not-strict'],
    ['[::1]', 'not-strict'],
    ['eth0', 'not-strict'],
    ['', 'not-strict'],
    ['fe80::1%eth0', 'zone-id'],
  ])('%j is refused (%s)', (input, reason) => {
    expect(refusal(() => parseStrictIp(input)).fields.reason).toBe(reason);
  });
});

describe('parseCidr', () => {
  it.each([
    ['10.0.0.0/8', '10.0.0.0/8', 4, 8],
    ['192.0.2.7', '192.0.2.7/32', 4, 32],
    ['10.1.2.3/8', '10.1.2.3/8', 4, 8],
    ['2001:DB8::/32', '2001:db8::/32', 6, 32],
    ['fd00::1', 'fd00::1/128', 6, 128],
    ['0.0.0.0/0', '0.0.0.0/0', 4, 0],
    ['::/0', '::/0', 6, 0],
    ['::ffff:8.8.8.0/120', '::ffff:8.8.8.0/120', 4, 24], // an IPv4-mapped range is the IPv4 range
  ])('%j → %j', (input, text, family, prefixLength) => {
    expect(parseCidr(input)).toMatchObject({ text, family, prefixLength });
  });

  it('clears host bits for matching, and matches by prefix', () => {
    const cidr = parseCidr('10.1.2.3/8');
    expect([...cidr.bytes]).toEqual([10, 0, 0, 0]);
    expect(cidrContains(cidr, parseStrictIp('10.200.0.1'))).toBe(true);
    expect(cidrContains(cidr, parseStrictIp('11.0.0.1'))).toBe(false);
    expect(cidrContains(parseCidr('fd00::/8'), parseStrictIp('fd12::1'))).toBe(true);
    expect(cidrContains(parseCidr('0.0.0.0/0'), parseStrictIp('::1'))).toBe(false); // families never mix
  });

  it.each([
    ['10.0.0.0/33', 'prefix-length'],
    ['fe80::/129', 'prefix-length'],
    ['10.0.0.0/', 'prefix-length'],
    ['10.0.0.0/-1', 'prefix-length'],
    ['10.0.0.0/8/8', 'prefix-length'],
    ['10.0.0/8', 'not-strict'],
    ['0177.0.0.1/32', 'not-strict'],
    ['010.0.0.1/8', 'not-strict'],
    ['not-a-cidr', 'not-strict'],
    ['fe80::1%eth0/64', 'zone-id'],
  ])('%j is refused (%s)', (input, reason) => {
    expect(refusal(() => parseCidr(input)).fields.reason).toBe(reason);
  });
});

describe('parseNat64Prefix', () => {
  it.each([
    ['64:ff9b::/96', '64:ff9b::/96', 96],
    ['2001:DB8:64::/48', '2001:db8:64::/48', 48],
    ['2a01:4f8::/32', '2a01:4f8::/32', 32],
  ])('%j → %j', (input, text, prefixLength) => {
    expect(parseNat64Prefix(input)).toMatchObject({ text, family: 6, prefixLength });
  });

  it.each([
    ['10.0.0.0/8', 'prefix-length'],
    ['2001:db8::/33', 'prefix-length'],
    ['2001:db8::/128', 'prefix-length'],
    ['2001:db8::', 'prefix-length'],
    ['::ffff:0:0/96', 'prefix-length'], // the IPv4-mapped range is IPv4, not a NAT64 prefix
    ['fe80::%eth0/96', 'zone-id'],
    ['64:ff9b::/x', 'prefix-length'],
  ])('%j is refused (%s)', (input, reason) => {
    expect(refusal(() => parseNat64Prefix(input)).fields.reason).toBe(reason);
  });
});

describe('parseHostPattern', () => {
  it.each([
    ['*', 'any', '*'],
    ['*.Example.COM', 'subdomains', '*.example.com'],
    ['Example.org.', 'exact', 'example.org'],
    ['1572395042', 'exact', '93.184.216.34'],
    ['[2001:DB8::1]', 'exact', '[2001:db8::1]'],
    ['2001:db8::1', 'exact', '[2001:db8::1]'],
    ['[::ffff:93.184.216.34]', 'exact', '93.184.216.34'],
  ])('%j → %s %j', (input, kind, text) => {
    expect(parseHostPattern(input)).toMatchObject({ kind, text });
  });

  it('matches canonical hosts; "*.suffix" is not the suffix itself', () => {
    const sub = parseHostPattern('*.example.com');
    expect(hostMatches(sub, 'a.example.com')).toBe(true);
    expect(hostMatches(sub, 'a.b.example.com')).toBe(true);
    expect(hostMatches(sub, 'example.com')).toBe(false);
    expect(hostMatches(sub, 'badexample.com')).toBe(false);
    expect(hostMatches(parseHostPattern('127.1'), '127.0.0.1')).toBe(true);
    expect(hostMatches(parseHostPattern('::ffff:127.0.0.1'), '127.0.0.1')).toBe(true);
    expect(hostMatches(parseHostPattern('*'), '::1')).toBe(true);
  });

  it.each([
    ['*.', 'host-name'],
    ['*.127.0.0.1', 'host-name'],
    ['a.*.com', 'pattern'],
    ['**', 'pattern'],
    ['exa mple.com', 'host-name'],
    ['fe80::1%eth0', 'zone-id'],
  ])('%j is refused (%s)', (input, reason) => {
    expect(refusal(() => parseHostPattern(input)).fields.reason).toBe(reason);
  });
});

describe('parseResolveEntry', () => {
  it.each([
    ['example.com:443:192.0.2.1', 'example.com', 443, ['192.0.2.1'], 'example.com:443:192.0.2.1'],
    ['+Example.COM.:80:192.0.2.1', 'example.com', 80, ['192.0.2.1'], 'example.com:80:192.0.2.1'],
    [
      'a.test:443:192.0.2.1, [2001:DB8::1],192.0.2.1',
      'a.test',
      443,
      ['192.0.2.1', '2001:db8::1'],
      'a.test:443:192.0.2.1,[2001:db8::1]',
    ],
    ['bücher.test:443:192.0.2.1', 'xn--bcher-kva.test', 443, ['192.0.2.1'], 'xn--bcher-kva.test:443:192.0.2.1'],
  ])('%j', (input, host, port, addresses, text) => {
    const entry = parseResolveEntry(input);
    expect(entry).toMatchObject({ host, port, text });
    expect(entry.addresses.map((address) => address.text)).toEqual(addresses);
  });

  it.each([
    ['one.test', 'syntax'],
    ['one.test:443', 'syntax'],
    ['one.test:443:', 'syntax'],
    ['[::1]:443:198.18.0.1', 'syntax'],
    ['bad host:443:198.18.0.1', 'syntax'],
    ['one.test:443:2001:db8::1', 'syntax'],
    ['one.test:443:[198.18.0.1]', 'syntax'],
    ['one.test:0:198.18.0.1', 'port'],
    ['one.test:70000:198.18.0.1', 'port'],
    ['one.test:x:198.18.0.1', 'port'],
    ['one.test:443:198.18.0.256', 'not-strict'],
    ['one.test:443:0x7f.1', 'not-strict'],
    ['one.test:443:198.18.0.1,', 'not-strict'],
    ['one.test:443:[fe80::1%eth0]', 'zone-id'],
    ['1.2.3.4:443:198.18.0.1', 'host-name'],
    ['a..b:443:198.18.0.1', 'host-name'],
  ])('%j is refused (%s)', (input, reason) => {
    expect(refusal(() => parseResolveEntry(input)).fields.reason).toBe(reason);
  });
});

describe('parseDnsServer', () => {
  it.each([
    ['1.1.1.1', '1.1.1.1', undefined],
    ['127.0.0.1:5353', '127.0.0.1:5353', 5353],
    ['::1', '::1', undefined],
    ['[::1]', '::1', undefined],
    ['[2606:4700::1111]:53', '[2606:4700::1111]:53', 53],
    ['[2606:4700:0::1111]:53', '[2606:4700::1111]:53', 53],
  ])('%j → %j', (input, text, port) => {
    expect(parseDnsServer(input)).toMatchObject({ text, port });
  });

  it.each([
    ['dns.example', 'not-strict'],
    ['127.1', 'not-strict'],
    ['', 'not-strict'],
    ['127.0.0.1:99999', 'port'],
    ['127.0.0.1:0', 'port'],
    ['127.0.0.1:', 'port'],
    ['[::1]:x', 'port'],
    ['[127.0.0.1]:53', 'syntax'],
    ['fe80::1%eth0', 'zone-id'],
  ])('%j is refused (%s)', (input, reason) => {
    expect(refusal(() => parseDnsServer(input)).fields.reason).toBe(reason);
  });
});

describe('parseOriginMatch', () => {
  it.each([
    ['api.Example.com:443', 'api.example.com:443', 443],
    ['*.example.com:*', '*.example.com:*', undefined],
    ['*:80', '*:80', 80],
    ['[2001:DB8::1]:443', '[2001:db8::1]:443', 443],
    ['127.1:8080', '127.0.0.1:8080', 8080],
  ])('%j → %j', (input, text, port) => {
    expect(parseOriginMatch(input)).toMatchObject({ text, port });
  });

  it.each([
    ['example.com', 'syntax'],
    ['example.com:', 'port'],
    ['example.com:0', 'port'],
    ['2001:db8::1:443', 'syntax'],
    ['a.*.com:443', 'pattern'],
    ['[fe80::1%eth0]:443', 'zone-id'],
  ])('%j is refused (%s)', (input, reason) => {
    expect(refusal(() => parseOriginMatch(input)).fields.reason).toBe(reason);
  });
});

describe('origin keys', () => {
  it('originKey refuses a host that is none before it has keyed any origin, as after', async () => {
    // A fresh module: the key kept for the origin keyed last starts out empty, and an origin matching that empty one
    // must still be refused, not given its key.
    vi.resetModules();
    const fresh = await import('../shared/origin.js');
    const outcome = (origin: Origin) => {
      try {
        return `key ${JSON.stringify(fresh.originKey(origin))}`;
      } catch (error) {
        return (error as { code?: string }).code;
      }
    };
    expect(outcome({ host: '', port: 0 })).toBe(ErrorCodes.INVALID_ARGUMENT);
    expect(outcome({ host: '', port: 80 })).toBe(ErrorCodes.INVALID_ARGUMENT);
    expect(outcome({ host: 'a.test', port: 80 })).toBe('key "a.test:80"');
    expect(outcome({ host: '', port: 0 })).toBe(ErrorCodes.INVALID_ARGUMENT);
  });

  it('every spelling of one origin has one key', () => {
    const spellings = [
      '127.0.0.1',
      '127.1',
      '2130706433',
      '0x7f000001',
      '0177.0.0.1',
      '127.0.0.1.',
      '::ffff:127.0.0.1',
      '[::ffff:7f00:1]',
    ];
    expect(new Set(spellings.map((host) => originKey({ host, port: 80 })))).toEqual(new Set(['127.0.0.1:80']));
    expect(originKey({ host: '[0:0::1]', port: 443 })).toBe('[::1]:443');
    expect(originKey({ host: 'Bücher.Example.', port: 443 })).toBe('xn--bcher-kva.example:443');
    expect(originKey({ host: 'A.test', port: 443, proxy: 'squid' })).toBe('a.test:443 via squid');
    // One after another, as the daemon keys acquires: the key of the origin before is never given for another port,
    // proxy or host (originKey keeps the last one it made).
    const sequence: Origin[] = [
      { host: 'a.test', port: 443 },
      { host: 'a.test', port: 443, proxy: 'squid' },
      { host: 'a.test', port: 443, proxy: 'other' },
      { host: 'a.test', port: 443 },
      { host: 'a.test', port: 444 },
      { host: 'A.test', port: 444 },
      { host: 'b.test', port: 444 },
      { host: 'b.test', port: 444 },
    ];
    expect(sequence.map((origin) => originKey(origin))).toEqual([
      'a.test:443',
      'a.test:443 via squid',
      'a.test:443 via other',
      'a.test:443',
      'a.test:444',
      'a.test:444',
      'b.test:444',
      'b.test:444',
    ]);
    expect(() => originKey({ host: 'fe80::1%eth0', port: 444 })).toThrow();
    expect(originKey({ host: 'b.test', port: 444 })).toBe('b.test:444');
  });

  it('canonicalOrigin and parseOriginKey refuse what is no origin', () => {
    expect(canonicalOrigin({ host: 'EXAMPLE.com', port: 80 })).toEqual({ host: 'example.com', port: 80 });
    expect(refusal(() => canonicalOrigin({ host: 'fe80::1%eth0', port: 80 })).fields.reason).toBe('zone-id');
    expect(refusal(() => canonicalOrigin({ host: 'a.test', port: 0 })).fields.port).toBe(0);
    expect(parseOriginKey('[::FFFF:7F00:1]:80')).toEqual({ host: '127.0.0.1', port: 80 });
    expect(parseOriginKey('127.1:80')).toEqual({ host: '127.0.0.1', port: 80 });
    expect(refusal(() => parseOriginKey('[127.0.0.1]:80')).fields.reason).toBe('ipv6');
    expect(refusal(() => parseOriginKey('example.com')).fields.input).toBe('example.com');
    expect(refusal(() => parseOriginKey('example.com:65536')).fields.port).toBe(65536);
  });
});
