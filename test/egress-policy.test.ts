// Pure logic: the policy is asked about addresses and names, nothing is ever connected to.

import { readFileSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { describe, expect, it } from 'vitest';
import { parseConfig, type SockpoolConfigInput } from '../daemon/config.js';
import { classifyAddress, EgressPolicy } from '../daemon/egress-policy.js';
import {
  FIB_TRIE_PATH,
  hostAddressesProvider,
  hostAddressReader,
  IF_INET6_PATH,
  IPV6_ROUTE_PATH,
  parseIPv6Addresses,
  parseLocalIPv4Addresses,
  parseLocalIPv4Ranges,
  parseLocalIPv6Routes,
  readHostAddresses,
} from '../daemon/host-addresses.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import type { LocalRoute } from '../shared/native.js';

function refusal(action: () => void): SockpoolError {
  try {
    action();
  } catch (error) {
    expect(error).toBeInstanceOf(SockpoolError);
    expect((error as SockpoolError).code).toBe(ErrorCodes.POLICY);
    return error as SockpoolError;
  }
  throw new Error('expected a policy refusal');
}

function configError(action: () => void): SockpoolError {
  try {
    action();
  } catch (error) {
    expect(error).toBeInstanceOf(SockpoolError);
    expect((error as SockpoolError).code).toBe(ErrorCodes.CONFIG);
    return error as SockpoolError;
  }
  throw new Error('expected a config error');
}

/** A policy from an `egress` section as a config file has it (parsed as the daemon parses it, defaults filled). */
function egressPolicy(
  egress: SockpoolConfigInput['egress'] = {},
  hostAddresses?: () => readonly string[],
): EgressPolicy {
  return new EgressPolicy({ ...parseConfig({ egress }, 'test').egress, hostAddresses });
}

describe('classifyAddress', () => {
  it.each([
    // IPv4 classes
    ['127.0.0.1', 'loopback'],
    ['127.255.255.254', 'loopback'],
    ['10.0.0.1', 'private'],
    ['172.16.0.1', 'private'],
    ['172.31.255.255', 'private'],
    ['192.168.1.1', 'private'],
    ['169.254.1.1', 'link-local'],
    ['100.64.0.1', 'cgnat'],
    ['100.127.255.255', 'cgnat'],
    ['224.0.0.1', 'multicast'],
    ['239.255.255.250', 'multicast'],
    ['0.0.0.0', 'unspecified'],
    ['0.1.2.3', 'unspecified'],
    ['255.255.255.255', 'broadcast'],
    ['169.254.169.254', 'metadata'],
    ['169.254.170.2', 'metadata'],
    ['100.100.100.200', 'metadata'],
    ['168.63.129.16', 'metadata'],
    ['198.18.0.1', 'reserved'],
    ['198.19.255.255', 'reserved'],
    ['192.0.2.1', 'reserved'],
    ['198.51.100.1', 'reserved'],
    ['203.0.113.1', 'reserved'],
    ['240.0.0.1', 'reserved'],
    ['192.0.0.8', 'reserved'],
    // IPv6 classes
    ['::1', 'loopback'],
    ['::', 'unspecified'],
    ['fe80::1', 'link-local'],
    ['febf::1', 'link-local'],
    ['fd00::1', 'private'],
    ['fc00::1', 'private'],
    ['fec0::1', 'private'],
    ['ff02::1', 'multicast'],
    ['fd00:ec2::254', 'metadata'],
    ['2001:db8::1', 'reserved'],
    ['2001::1', 'reserved'], // Teredo
    ['100::1', 'reserved'],
    ['4000::1', 'reserved'], // outside 2000::/3
    ['64:ff9b:1::a00:1', 'reserved'],
    // IPv4 classes reached through IPv6 forms
    ['::ffff:127.0.0.1', 'loopback'],
    ['[::ffff:127.0.0.1]', 'loopback'],
    ['::ffff:7f00:1', 'loopback'],
    ['::127.0.0.1', 'loopback'],
    ['::ffff:0:127.0.0.1', 'loopback'], // SIIT
    ['64:ff9b::7f00:1', 'loopback'], // NAT64
    ['64:ff9b::127.0.0.1', 'loopback'],
    ['2002:7f00:1::', 'loopback'], // 6to4
    ['2002:a9fe:a9fe::1', 'metadata'],
    ['::ffff:169.254.169.254', 'metadata'],
    ['64:ff9b::a9fe:a9fe', 'metadata'],
    ['::ffff:10.0.0.1', 'private'],
    ['64:ff9b::a00:1', 'private'],
    ['2002:c0a8:101::', 'private'],
    ['::ffff:100.64.0.1', 'cgnat'],
    ['::ffff:224.0.0.1', 'multicast'],
    ['::ffff:0.0.0.0', 'unspecified'],
    ['::ffff:198.18.0.1', 'reserved'],
    ['64:ff9b::c612:1', 'reserved'],
    ['::1.2.3.4', 'reserved'], // deprecated compatible form of a public address
    ['::ffff:0:1.2.3.4', 'reserved'],
    // Non-canonical IPv4 spellings
    ['2130706433', 'loopback'],
    ['0177.0.0.1', 'loopback'],
    ['0x7f000001', 'loopback'],
    ['127.1', 'loopback'],
    ['0xa9.0xfe.0xa9.0xfe', 'metadata'],
    ['not-an-address', 'invalid'],
  ])('%s is %s', (address, addressClass) => {
    expect(classifyAddress(address)).toBe(addressClass);
  });

  it.each([
    '93.184.216.34',
    '8.8.8.8',
    '1.1.1.1',
    '172.32.0.1',
    '100.128.0.1',
    '198.20.0.1',
    '::ffff:93.184.216.34',
    '2606:2800:220:1:248:1893:25c8:1946',
    '64:ff9b::5db8:d822', // NAT64 of 93.184.216.34
    '2002:5db8:d822::1', // 6to4 of 93.184.216.34
  ])('%s is public', (address) => {
    expect(classifyAddress(address)).toBeNull();
  });
});

describe('EgressPolicy.checkAddress', () => {
  const policy = egressPolicy();

  it.each([
    ['127.0.0.1', 'loopback'],
    ['::ffff:127.0.0.1', 'loopback'],
    ['[::ffff:127.0.0.1]', 'loopback'],
    ['::ffff:7f00:1', 'loopback'],
    ['::127.0.0.1', 'loopback'],
    ['64:ff9b::7f00:1', 'loopback'],
    ['2002:7f00:1::', 'loopback'],
    ['2130706433', 'loopback'],
    ['0177.0.0.1', 'loopback'],
    ['0x7f000001', 'loopback'],
    ['127.1', 'loopback'],
    ['169.254.169.254', 'metadata'],
    ['fd00:ec2::254', 'metadata'],
    ['100.100.100.200', 'metadata'],
    ['10.0.0.1', 'private'],
    ['100.64.0.1', 'cgnat'],
    ['fe80::1', 'link-local'],
    ['fd00::1', 'private'],
    ['224.0.0.1', 'multicast'],
    ['0.0.0.0', 'unspecified'],
    ['::', 'unspecified'],
    ['255.255.255.255', 'broadcast'],
    ['198.18.0.1', 'reserved'],
    ['240.0.0.1', 'reserved'],
    ['bogus', 'invalid-address'],
  ])('refuses %s (%s)', (address, reason) => {
    const error = refusal(() => policy.checkAddress(address, 443, 'origin.test'));
    expect(error.fields).toMatchObject({ host: 'origin.test', port: 443, reason });
    expect((error as unknown as { reason: string }).reason).toBe(reason);
  });

  it('passes public addresses (policy check only)', () => {
    expect(() => policy.checkAddress('93.184.216.34', 443, 'example.com')).not.toThrow();
    expect(() => policy.checkAddress('2606:2800:220:1:248:1893:25c8:1946', 80)).not.toThrow();
    expect(() => policy.checkAddress('::ffff:93.184.216.34', 80)).not.toThrow();
  });

  it('refuses ports outside allowPorts, and ports out of range', () => {
    expect(refusal(() => policy.checkAddress('93.184.216.34', 22)).fields.reason).toBe('port');
    expect(refusal(() => policy.checkAddress('93.184.216.34', 0)).fields.reason).toBe('port');
    expect(refusal(() => policy.checkAddress('93.184.216.34', 65536)).fields.reason).toBe('port');
    expect(refusal(() => policy.checkAddress('93.184.216.34', 443.5)).fields.reason).toBe('port');
    const custom = egressPolicy({ allowPorts: [8443] });
    expect(() => custom.checkAddress('93.184.216.34', 8443)).not.toThrow();
    expect(refusal(() => custom.checkAddress('93.184.216.34', 443)).fields.reason).toBe('port');
    const anyPort = egressPolicy({ allowPorts: [] });
    expect(() => anyPort.checkAddress('93.184.216.34', 22)).not.toThrow();
    expect(refusal(() => anyPort.checkAddress('93.184.216.34', 0)).fields.reason).toBe('port');
  });

  it('allow CIDRs punch holes in the refused classes, for that address only', () => {
    const lab = egressPolicy({ allow: ['127.0.0.1/32', '198.18.0.0/16', 'fd00:1::/64'] });
    expect(() => lab.checkAddress('127.0.0.1', 443)).not.toThrow();
    expect(() => lab.checkAddress('::ffff:127.0.0.1', 443)).not.toThrow(); // the same destination
    expect(() => lab.checkAddress('2130706433', 443)).not.toThrow();
    expect(refusal(() => lab.checkAddress('127.0.0.2', 443)).fields.reason).toBe('loopback');
    expect(refusal(() => lab.checkAddress('64:ff9b::7f00:1', 443)).fields.reason).toBe('loopback');
    expect(refusal(() => lab.checkAddress('2002:7f00:1::', 443)).fields.reason).toBe('loopback');
    expect(() => lab.checkAddress('198.18.0.7', 80)).not.toThrow();
    expect(() => lab.checkAddress('198.18.255.255', 80)).not.toThrow();
    expect(refusal(() => lab.checkAddress('198.19.0.1', 80)).fields.reason).toBe('reserved');
    expect(() => lab.checkAddress('fd00:1::5', 80)).not.toThrow();
    expect(refusal(() => lab.checkAddress('fd00:2::5', 80)).fields.reason).toBe('private');
  });

  it('metadata opens only for an exact allow entry; unspecified never opens', () => {
    const broad = egressPolicy({ allow: ['169.254.0.0/16', '0.0.0.0/0', '::/0'] });
    expect(() => broad.checkAddress('169.254.1.1', 80)).not.toThrow();
    expect(refusal(() => broad.checkAddress('169.254.169.254', 80)).fields.reason).toBe('metadata');
    expect(refusal(() => broad.checkAddress('0.0.0.0', 80)).fields.reason).toBe('unspecified');
    expect(refusal(() => broad.checkAddress('::', 80)).fields.reason).toBe('unspecified');
    const exact = egressPolicy({ allow: ['169.254.169.254'] });
    expect(() => exact.checkAddress('169.254.169.254', 80)).not.toThrow();
  });

  it('metadata is every published endpoint: a wide allow that holds one does not open it', () => {
    // GCP over IPv6 sits in fc00::/7, a common internal allow; these were opened by the ranges holding them.
    const wide = egressPolicy({ allow: ['169.254.0.0/16', 'fc00::/7', '192.0.0.0/24'] });
    const endpoints = ['fd20:ce::254', '169.254.42.42', 'fd00:42::42', '169.254.0.23', '192.0.0.192'];
    const reasons = endpoints.map((address) => refusal(() => wide.checkAddress(address, 80)).fields.reason);
    expect(reasons).toEqual(endpoints.map(() => 'metadata'));
    expect(() => wide.checkAddress('fd20:ce::253', 80)).not.toThrow(); // (the range itself stays open)
  });

  it('deny CIDRs win over allow and over public, through every IPv6 form', () => {
    const policyWithDeny = egressPolicy({
      allow: ['127.0.0.0/8', '198.18.0.0/16'],
      deny: ['127.0.0.1/32', '93.184.216.0/24', '198.18.5.0/24', '2606:2800::/32'],
    });
    expect(refusal(() => policyWithDeny.checkAddress('127.0.0.1', 80)).fields.reason).toBe('denied-cidr');
    expect(() => policyWithDeny.checkAddress('127.0.0.2', 80)).not.toThrow();
    expect(refusal(() => policyWithDeny.checkAddress('198.18.5.1', 80)).fields.reason).toBe('denied-cidr');
    expect(() => policyWithDeny.checkAddress('198.18.6.1', 80)).not.toThrow();
    for (const address of ['93.184.216.34', '::ffff:93.184.216.34', '64:ff9b::5db8:d822', '2002:5db8:d822::']) {
      expect(refusal(() => policyWithDeny.checkAddress(address, 443)).fields.reason).toBe('denied-cidr');
    }
    expect(refusal(() => policyWithDeny.checkAddress('2606:2800:220::1', 443)).fields.reason).toBe('denied-cidr');
    expect(() => policyWithDeny.checkAddress('93.184.217.1', 443)).not.toThrow();
  });

  it('an IPv4-mapped CIDR in the config is the IPv4 range', () => {
    const mapped = egressPolicy({ deny: ['::ffff:8.8.8.0/120'] });
    expect(refusal(() => mapped.checkAddress('8.8.8.8', 443)).fields.reason).toBe('denied-cidr');
    expect(() => mapped.checkAddress('8.8.4.4', 443)).not.toThrow();
  });

  it('puts the normalised address, host and port in the error', () => {
    const error = refusal(() => policy.checkAddress('::ffff:7f00:1', 443, 'evil.test'));
    expect(error.fields).toEqual({ host: 'evil.test', address: '::ffff:127.0.0.1', port: 443, reason: 'loopback' });
    expect(error.message).toContain('evil.test');
    expect(error.message).toContain('loopback');
  });
});

describe('EgressPolicy: NAT64 prefixes of the site', () => {
  it('classifies the IPv4 address a configured prefix embeds like that address (RFC 6052, /32 to /96)', () => {
    const unconfigured = egressPolicy({ allowPorts: [] });
    // Without the prefix, a network-specific NAT64 address of 127.0.0.1 looks like any public IPv6 address.
    expect(() => unconfigured.checkAddress('2a00:1450:64::7f00:1', 443)).not.toThrow();
    const policy = egressPolicy({
      allowPorts: [],
      nat64Prefixes: ['2a00:1450:64::/96', '2a00:1450:64:1::/64', '2a01:4f8::/32'],
      deny: ['93.184.216.0/24'],
    });
    expect(refusal(() => policy.checkAddress('2a00:1450:64::7f00:1', 443)).fields.reason).toBe('loopback');
    expect(refusal(() => policy.checkAddress('2a00:1450:64::a9fe:a9fe', 443)).fields.reason).toBe('metadata');
    // /64: bits 64 to 71 (the "u" octet) are skipped, 10.1.2.3 sits in bytes 9 to 12.
    expect(refusal(() => policy.checkAddress('2a00:1450:64:1:a:102:300:0', 443)).fields.reason).toBe('private');
    // /32: bytes 4 to 7.
    expect(refusal(() => policy.checkAddress('2a01:4f8:a01:203::', 443)).fields.reason).toBe('private');
    // IPv4 deny CIDRs reach through the prefix; a public IPv4 address behind it is public.
    expect(refusal(() => policy.checkAddress('2a00:1450:64::5db8:d822', 443)).fields.reason).toBe('denied-cidr');
    expect(() => policy.checkAddress('2a00:1450:64::5db9:d822', 443)).not.toThrow();
    // The well-known prefix needs no entry.
    expect(refusal(() => policy.checkAddress('64:ff9b::7f00:1', 443)).fields.reason).toBe('loopback');
  });

  it('refuses a prefix that is not IPv6 or not of an RFC 6052 length, naming the key', () => {
    for (const entry of ['10.0.0.0/8', '2001:db8::/33', '2001:db8::', '2001:db8::/128', 'fe80::%eth0/96', 7]) {
      const error = configError(() => egressPolicy({ nat64Prefixes: [entry as string] }));
      expect(error.fields, String(entry)).toMatchObject({ key: 'egress.nat64Prefixes[0]' });
    }
  });
});

describe("EgressPolicy: the host's own addresses", () => {
  let addresses: string[] = ['192.0.2.2', 'fd00::2', '203.0.113.9', '8.8.8.8'];
  const hostAddresses = () => addresses;
  const wide = { allow: ['192.0.2.0/24', 'fd00::/64', '127.0.0.1/32'], allowPorts: [] };

  it('refuses them even where allow opens their class, and in their IPv6 spellings', () => {
    const policy = egressPolicy(wide, hostAddresses);
    for (const address of ['192.0.2.2', '::ffff:192.0.2.2', 'fd00::2', '8.8.8.8', '64:ff9b::808:808']) {
      const error = refusal(() => policy.checkAddress(address, 443, 'self.test'));
      expect(error.fields, address).toMatchObject({ reason: 'host-address', host: 'self.test' });
    }
    expect(refusal(() => policy.checkTarget('203.0.113.9', 443)).fields.reason).toBe('reserved');
    // Neighbours on the same networks pass; loopback stays governed by its class and allow.
    expect(() => policy.checkAddress('192.0.2.3', 443)).not.toThrow();
    expect(() => policy.checkAddress('fd00::3', 443)).not.toThrow();
    expect(() => policy.checkAddress('127.0.0.1', 443)).not.toThrow();
  });

  it('refuses every address inside a range routed to the host, in its IPv6 spellings too; loopback stays with its class', () => {
    const allow = { allow: ['10.0.0.0/8', '2001:db8::/32', '127.0.0.1/32'], allowPorts: [] };
    const policy = egressPolicy(allow, () => ['10.77.0.0/24', '2001:db8:77::/64']);
    for (const address of ['10.77.0.0', '10.77.0.9', '::ffff:10.77.0.255', '2001:db8:77::9', '2001:db8:77::ffff:1']) {
      const error = refusal(() => policy.checkAddress(address, 443, 'self.test'));
      expect(error.fields, address).toMatchObject({ reason: 'host-address', host: 'self.test' });
    }
    // Outside the ranges passes (allow opens the class).
    expect(() => policy.checkAddress('10.77.1.9', 443)).not.toThrow();
    expect(() => policy.checkAddress('2001:db8:78::9', 443)).not.toThrow();
    // A range of public space, reached through NAT64 too; 127.0.0.1 lies in it, yet it is loopback's to decide.
    const wide = egressPolicy(allow, () => ['0.0.0.0/1']);
    for (const address of ['45.1.2.3', '64:ff9b::2d01:203']) {
      expect(refusal(() => wide.checkAddress(address, 443)).fields.reason, address).toBe('host-address');
    }
    expect(() => wide.checkAddress('127.0.0.1', 443)).not.toThrow();
    expect(refusal(() => wide.checkAddress('127.0.0.2', 443)).fields.reason).toBe('loopback');
    expect(() => wide.checkAddress('130.1.2.3', 443)).not.toThrow();
  });

  it('allowHostAddresses lets them through; a changed list is read again', () => {
    expect(() =>
      egressPolicy({ ...wide, allowHostAddresses: true }, hostAddresses).checkAddress('192.0.2.2', 443),
    ).not.toThrow();
    const policy = egressPolicy(wide, hostAddresses);
    expect(refusal(() => policy.checkAddress('192.0.2.2', 443)).fields.reason).toBe('host-address');
    addresses = ['192.0.2.3'];
    expect(() => policy.checkAddress('192.0.2.2', 443)).not.toThrow();
    expect(refusal(() => policy.checkAddress('192.0.2.3', 443)).fields.reason).toBe('host-address');
  });

  it("reads this machine's interfaces and the kernel's local addresses, without loopback", () => {
    const read = readHostAddresses();
    expect(read).not.toContain('127.0.0.1');
    expect(read).not.toContain('::1');
    const fibTrie = readFileSync(FIB_TRIE_PATH, 'latin1');
    const expected = [
      ...Object.values(networkInterfaces())
        .flatMap((entries) => entries ?? [])
        .map((entry) => entry.address.toLowerCase()),
      ...parseLocalIPv4Addresses(fibTrie),
      ...parseLocalIPv4Ranges(fibTrie),
      ...parseIPv6Addresses(readFileSync(IF_INET6_PATH, 'latin1')),
      ...parseLocalIPv6Routes(readFileSync(IPV6_ROUTE_PATH, 'latin1')),
    ].filter((address) => address !== '::1' && !address.startsWith('127.'));
    expect(read).toEqual([...new Set(expected)].sort());
  });

  it('a daemon that cannot list its interfaces fails at start; a failed refresh keeps the last list', () => {
    // What a sandbox without AF_NETLINK does to getifaddrs (uv_interface_addresses: EAFNOSUPPORT).
    const eafnosupport = () => {
      throw new Error('uv_interface_addresses returned Unknown system error 97');
    };
    let thrown: unknown;
    try {
      hostAddressesProvider(eafnosupport);
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(SockpoolError);
    expect((thrown as SockpoolError).code).toBe('SOCKPOOL_ERR_CONFIG');
    expect((thrown as SockpoolError).message).toMatch(/AF_NETLINK/);

    let fail = false;
    const failures: Error[] = [];
    const provider = hostAddressesProvider(
      () => {
        if (fail) eafnosupport();
        return ['192.0.2.9'];
      },
      0,
      (error) => failures.push(error),
    );
    fail = true;
    expect(provider()).toEqual(['192.0.2.9']);
    expect(failures).toHaveLength(1);
  });
});

// What the kernel holds local though os.networkInterfaces() leaves it out (libuv lists interfaces that are up and
// running only). Both samples were read in a network namespace where v0 is up without carrier (its veth peer down),
// w0 administratively down, and lo carries an AnyIP range (`ip route add local 198.51.100.0/30 dev lo`) besides a
// LOCAL route in table 100; os.networkInterfaces() listed lo only.
const FIB_TRIE_SAMPLE = `Id 100:
  |-- 192.0.2.10
     /32 host LOCAL
Main:
  +-- 0.0.0.0/0 3 0 4
     +-- 10.99.0.0/24 2 0 2
        +-- 10.99.0.0/31 1 0 0
           |-- 10.99.0.0
              /24 link UNICAST
           |-- 10.99.0.1
              /32 host LOCAL
        |-- 10.99.0.255
           /32 link BROADCAST
     +-- 45.33.32.0/23 2 0 1
        +-- 45.33.32.0/31 1 0 0
           |-- 45.33.32.0
              /24 link UNICAST
           |-- 45.33.32.1
              /32 host LOCAL
        |-- 45.33.32.255
           /32 link BROADCAST
        |-- 45.33.33.1
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 198.51.100.0
        /30 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 4
     +-- 10.99.0.0/24 2 0 2
        +-- 10.99.0.0/31 1 0 0
           |-- 10.99.0.0
              /24 link UNICAST
           |-- 10.99.0.1
              /32 host LOCAL
        |-- 10.99.0.255
           /32 link BROADCAST
     +-- 45.33.32.0/23 2 0 1
        +-- 45.33.32.0/31 1 0 0
           |-- 45.33.32.0
              /24 link UNICAST
           |-- 45.33.32.1
              /32 host LOCAL
        |-- 45.33.32.255
           /32 link BROADCAST
        |-- 45.33.33.1
           /32 host LOCAL
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 198.51.100.0
        /30 host LOCAL
`;
// 2001:db8:7::1 on v0 (no carrier, nodad), 2001:db8:6::1 on the down w0 (tentative: flags c0), an interface index
// past 0xff (printed with three digits), and a line that is not an address.
const IF_INET6_SAMPLE = `20010db8000700000000000000000001 03 40 00 82       v0
00000000000000000000000000000001 01 80 10 80       lo
20010db8000600000000000000000001 05 40 00 c0       w0
fe800000000000000024ff1afe3b0c01 1a3 40 20 80 vethab12
2600 3c01 garbage
`;

// Ranges routed to this host, both read in a network namespace where: `ip route add local 10.77.0.0/24 dev lo`
// (AnyIP), `ip route add local 198.51.100.0/24 dev lo table 100`, `ip addr add 45.33.41.1/24 dev lo` (the kernel
// routes the whole /24 local), v0 (a veth without carrier) holds 10.99.0.1/24 (its /24 is a link route, not local)
// and 2600:3c01::1/64 (nodad); and for IPv6 `ip -6 route add local 2001:db8:77::/64 dev lo`, the same for
// 2001:db8:78::/64 in table 100, and `ip -6 route add local 2001:db8:79::5/128 dev lo` (routed local, on no
// interface: if_inet6 does not list it).
const FIB_TRIE_RANGES_SAMPLE = `Id 100:
  |-- 198.51.100.0
     /24 host LOCAL
Main:
  +-- 0.0.0.0/1 3 0 5
     +-- 10.64.0.0/10 2 0 2
        |-- 10.77.0.0
           /24 host LOCAL
        +-- 10.99.0.0/24 2 0 2
           +-- 10.99.0.0/31 1 0 0
              |-- 10.99.0.0
                 /24 link UNICAST
              |-- 10.99.0.1
                 /32 host LOCAL
           |-- 10.99.0.255
              /32 link BROADCAST
     +-- 45.33.41.0/24 2 0 2
        +-- 45.33.41.0/31 1 0 0
           |-- 45.33.41.0
              /24 host LOCAL
           |-- 45.33.41.1
              /32 host LOCAL
        |-- 45.33.41.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/1 3 0 5
     +-- 10.64.0.0/10 2 0 2
        |-- 10.77.0.0
           /24 host LOCAL
        +-- 10.99.0.0/24 2 0 2
           +-- 10.99.0.0/31 1 0 0
              |-- 10.99.0.0
                 /24 link UNICAST
              |-- 10.99.0.1
                 /32 host LOCAL
           |-- 10.99.0.255
              /32 link BROADCAST
     +-- 45.33.41.0/24 2 0 2
        +-- 45.33.41.0/31 1 0 0
           |-- 45.33.41.0
              /24 host LOCAL
           |-- 45.33.41.1
              /32 host LOCAL
        |-- 45.33.41.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
`;
const IPV6_ROUTE_SAMPLE = `20010db8007800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
26003c01000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001       v0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
20010db8007700000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000002 00000000 80000001       lo
20010db8007900000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
26003c01000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       v0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
`;

describe("host addresses from the kernel's tables", () => {
  it("parseLocalIPv4Addresses: every /32 LOCAL leaf of every table, a down interface's included; not a subnet, broadcast or wider LOCAL route", () => {
    expect(parseLocalIPv4Addresses(FIB_TRIE_SAMPLE).sort()).toEqual([
      '10.99.0.1',
      '127.0.0.1', // left for readHostAddresses to drop, with the other loopback addresses
      '192.0.2.10',
      '45.33.32.1',
      '45.33.33.1',
    ]);
    expect(parseLocalIPv4Addresses('')).toEqual([]);
  });

  it('parseLocalIPv4Ranges: every LOCAL route wider than one address, of every table: AnyIP and the prefix of an address on lo, not a link route', () => {
    expect(parseLocalIPv4Ranges(FIB_TRIE_RANGES_SAMPLE).sort()).toEqual([
      '10.77.0.0/24',
      '127.0.0.0/8', // left for readHostAddresses to drop
      '198.51.100.0/24',
      '45.33.41.0/24',
    ]);
    expect(parseLocalIPv4Addresses(FIB_TRIE_RANGES_SAMPLE).sort()).toEqual(['10.99.0.1', '127.0.0.1', '45.33.41.1']);
    expect(parseLocalIPv4Ranges(FIB_TRIE_SAMPLE).sort()).toEqual(['127.0.0.0/8', '198.51.100.0/30']);
    expect(parseLocalIPv4Ranges('')).toEqual([]);
  });

  it('parseLocalIPv6Routes: every RTF_LOCAL route of every table, a /128 as its address, not a link route', () => {
    expect(parseLocalIPv6Routes(IPV6_ROUTE_SAMPLE).sort()).toEqual([
      '2001:db8:77::/64',
      '2001:db8:78::/64',
      '2001:db8:79::5',
      '2600:3c01::1',
      '::1', // left for readHostAddresses to drop
    ]);
    expect(parseLocalIPv6Routes('')).toEqual([]);
  });

  it('parseIPv6Addresses: every address of if_inet6, whatever its interface or DAD state, in the usual spelling', () => {
    expect(parseIPv6Addresses(IF_INET6_SAMPLE)).toEqual([
      '2001:db8:7::1',
      '::1',
      '2001:db8:6::1',
      'fe80::24:ff1a:fe3b:c01',
    ]);
  });

  it("readHostAddresses adds them to the interfaces' own; an unreadable /proc file leaves the interfaces' only and is told once", () => {
    const interfaces = () =>
      ({
        lo: [
          {
            address: '127.0.0.1',
            netmask: '255.0.0.0',
            family: 'IPv4',
            mac: '00:00:00:00:00:00',
            internal: true,
            cidr: '127.0.0.1/8',
          },
        ],
        eth0: [
          {
            address: '203.0.113.7',
            netmask: '255.255.255.0',
            family: 'IPv4',
            mac: '02:00:00:00:00:01',
            internal: false,
            cidr: '203.0.113.7/24',
          },
        ],
      }) as ReturnType<typeof networkInterfaces>;
    const files: Record<string, string> = {
      [FIB_TRIE_PATH]: FIB_TRIE_SAMPLE,
      [IF_INET6_PATH]: IF_INET6_SAMPLE,
      [IPV6_ROUTE_PATH]: IPV6_ROUTE_SAMPLE,
    };
    const readProcFile = (path: string) => {
      const text = files[path];
      if (text === undefined)
        throw Object.assign(new Error(`ENOENT: no such file or directory, open '${path}'`), { code: 'ENOENT' });
      return text;
    };
    expect(readHostAddresses({ networkInterfaces: interfaces, readProcFile })).toEqual([
      '10.99.0.1',
      '192.0.2.10',
      '198.51.100.0/30', // the AnyIP range; 127.0.0.0/8 and ::1 are left out
      '2001:db8:6::1',
      '2001:db8:77::/64',
      '2001:db8:78::/64',
      '2001:db8:79::5',
      '2001:db8:7::1',
      '203.0.113.7',
      '2600:3c01::1',
      '45.33.32.1',
      '45.33.33.1',
      'fe80::24:ff1a:fe3b:c01',
    ]);

    delete files[FIB_TRIE_PATH];
    delete files[IF_INET6_PATH];
    delete files[IPV6_ROUTE_PATH];
    const told: string[] = [];
    const read = hostAddressReader(
      { onNetlinkUnavailable: () => told.push('netlink'), onProcUnreadable: (path) => told.push(path) },
      { networkInterfaces: interfaces, readProcFile },
    );
    expect(read()).toEqual(['203.0.113.7']);
    expect(read()).toEqual(['203.0.113.7']);
    expect(told).toEqual([IF_INET6_PATH, FIB_TRIE_PATH, IPV6_ROUTE_PATH]);
  });

  it('readHostAddresses takes the LOCAL routes from netlink and reads only if_inet6 then; where netlink fails, the route files, told once', () => {
    const interfaces = () => ({}) as ReturnType<typeof networkInterfaces>;
    const routes: LocalRoute[] = [
      { family: 4, address: '127.0.0.0', prefixLength: 8, table: 255 },
      { family: 4, address: '127.0.0.1', prefixLength: 32, table: 255 },
      { family: 4, address: '45.33.32.1', prefixLength: 32, table: 255 },
      { family: 4, address: '198.51.100.0', prefixLength: 24, table: 255 },
      { family: 4, address: '192.0.2.10', prefixLength: 32, table: 100 },
      { family: 6, address: '::1', prefixLength: 128, table: 255 },
      { family: 6, address: '2001:db8:77::', prefixLength: 64, table: 255 },
      { family: 6, address: '2001:db8:79::5', prefixLength: 128, table: 100 },
    ];
    const files: Record<string, string> = {
      [FIB_TRIE_PATH]: FIB_TRIE_SAMPLE,
      [IF_INET6_PATH]: IF_INET6_SAMPLE,
      [IPV6_ROUTE_PATH]: IPV6_ROUTE_SAMPLE,
    };
    const read: string[] = [];
    const readProcFile = (path: string) => {
      read.push(path);
      return files[path]!;
    };
    let netlink: Error | undefined;
    const localRoutes = () => {
      if (netlink) throw netlink;
      return routes;
    };
    const sources = { networkInterfaces: interfaces, localRoutes, readProcFile };
    expect(readHostAddresses(sources)).toEqual([
      '192.0.2.10',
      '198.51.100.0/24',
      '2001:db8:6::1',
      '2001:db8:77::/64',
      '2001:db8:79::5',
      '2001:db8:7::1',
      '45.33.32.1',
      'fe80::24:ff1a:fe3b:c01',
    ]);
    expect(read).toEqual([IF_INET6_PATH]);

    // A sandbox whose seccomp filter refuses AF_NETLINK sockets to everything but getifaddrs, say.
    netlink = Object.assign(new Error('socket EAFNOSUPPORT AF_NETLINK'), { code: 'EAFNOSUPPORT' });
    const told: string[] = [];
    const reader = hostAddressReader(
      { onNetlinkUnavailable: (error) => told.push(error.message), onProcUnreadable: (path) => told.push(path) },
      sources,
    );
    read.length = 0;
    const fromFiles = reader();
    expect(read).toEqual([IF_INET6_PATH, FIB_TRIE_PATH, IPV6_ROUTE_PATH]);
    expect(fromFiles).toEqual(readHostAddresses({ networkInterfaces: interfaces, readProcFile }));
    expect(fromFiles).toContain('45.33.33.1'); // fib_trie's, which the routes above lack
    reader();
    expect(told).toEqual(['socket EAFNOSUPPORT AF_NETLINK']);
  });
});

describe('EgressPolicy.checkTarget', () => {
  const policy = egressPolicy();

  it.each([
    ['127.0.0.1', 'loopback'],
    ['::ffff:127.0.0.1', 'loopback'],
    ['[::ffff:127.0.0.1]', 'loopback'],
    ['[::1]', 'loopback'],
    ['2130706433', 'loopback'],
    ['0177.0.0.1', 'loopback'],
    ['0x7f000001', 'loopback'],
    ['0x7f.1', 'loopback'],
    ['127.1', 'loopback'],
    ['127.0.0.1.', 'loopback'],
    ['169.254.169.254', 'metadata'],
    ['[fd00:ec2::254]', 'metadata'],
    ['10.0.0.1', 'private'],
    ['[64:ff9b::7f00:1]', 'loopback'],
    ['[2002:7f00:1::]', 'loopback'],
  ])('refuses the literal %s (%s) before resolving', (host, reason) => {
    const error = refusal(() => policy.checkTarget(host, 443));
    expect(error.fields.reason).toBe(reason);
    expect(error.fields.host).toBe(host);
  });

  it.each([
    '1.2.3.999',
    '256.1.1.1',
    '08.1.1.1',
    'a b.example',
    'a..b',
    '',
    'foo.0x',
    '[fe80::1%25eth0]',
    'fe80::1%eth0',
  ])('refuses %j as an invalid host', (host) => {
    expect(refusal(() => policy.checkTarget(host, 443)).fields.reason).toBe('invalid-host');
  });

  it('passes names and public literals, and checks the port first', () => {
    expect(() => policy.checkTarget('example.com', 443)).not.toThrow();
    expect(() => policy.checkTarget('Example.COM.', 80)).not.toThrow();
    expect(() => policy.checkTarget('93.184.216.34', 443)).not.toThrow();
    expect(() => policy.checkTarget('[2606:2800:220:1:248:1893:25c8:1946]', 443)).not.toThrow();
    expect(refusal(() => policy.checkTarget('example.com', 8080)).fields.reason).toBe('port');
    expect(refusal(() => policy.checkTarget('127.0.0.1', 22)).fields.reason).toBe('port');
  });

  it('applies host patterns: deny first, then a non-empty allow list', () => {
    const patterns = egressPolicy({
      allowHosts: ['*.example.com', 'example.org', '93.184.216.34'],
      denyHosts: ['secret.example.com', '*.internal.example.com'],
    });
    expect(() => patterns.checkTarget('www.example.com', 443)).not.toThrow();
    expect(() => patterns.checkTarget('a.b.example.com', 443)).not.toThrow();
    expect(() => patterns.checkTarget('EXAMPLE.org.', 443)).not.toThrow();
    expect(() => patterns.checkTarget('93.184.216.34', 443)).not.toThrow();
    expect(() => patterns.checkTarget('1572395042', 443)).not.toThrow(); // 93.184.216.34 spelled as a number
    expect(refusal(() => patterns.checkTarget('example.com', 443)).fields.reason).toBe('host-not-allowed');
    expect(refusal(() => patterns.checkTarget('www.example.org', 443)).fields.reason).toBe('host-not-allowed');
    expect(refusal(() => patterns.checkTarget('badexample.com', 443)).fields.reason).toBe('host-not-allowed');
    expect(refusal(() => patterns.checkTarget('8.8.8.8', 443)).fields.reason).toBe('host-not-allowed');
    expect(refusal(() => patterns.checkTarget('secret.example.com', 443)).fields.reason).toBe('host-denied');
    expect(refusal(() => patterns.checkTarget('db.internal.example.com', 443)).fields.reason).toBe('host-denied');

    const denyOnly = egressPolicy({ denyHosts: ['*.evil.test', '10.0.0.1'] });
    expect(() => denyOnly.checkTarget('good.test', 443)).not.toThrow();
    expect(refusal(() => denyOnly.checkTarget('x.evil.test', 443)).fields.reason).toBe('host-denied');
    expect(() => denyOnly.checkTarget('evil.test', 80)).not.toThrow(); // '*.' does not match the apex
    expect(refusal(() => denyOnly.checkTarget('10.0.0.1', 80)).fields.reason).toBe('host-denied');
  });

  it('matches host patterns against an IPv4-mapped literal as the IPv4 address it is', () => {
    // A dual-stack socket connects `::ffff:a.b.c.d` to a.b.c.d: a pattern naming a.b.c.d names it in every spelling.
    const denied = egressPolicy({ denyHosts: ['93.184.216.34'] });
    for (const host of [
      '93.184.216.34',
      '1572395042',
      '::ffff:93.184.216.34',
      '[::ffff:93.184.216.34]',
      '::ffff:5db8:d822',
    ]) {
      expect(refusal(() => denied.checkTarget(host, 443)).fields, host).toMatchObject({
        reason: 'host-denied',
        address: '93.184.216.34',
      });
    }
    const allowed = egressPolicy({ allowHosts: ['93.184.216.34'] });
    for (const host of ['1572395042', '::ffff:93.184.216.34', '[::ffff:5db8:d822]']) {
      expect(() => allowed.checkTarget(host, 443), host).not.toThrow();
    }
    // A mapped spelling in the pattern itself is the IPv4 address too.
    const mappedPattern = egressPolicy({ denyHosts: ['::ffff:93.184.216.34'] });
    expect(refusal(() => mappedPattern.checkTarget('93.184.216.34', 443)).fields.reason).toBe('host-denied');
    // The forms that only embed an IPv4 address (compatible, NAT64) are other hosts: the address rules judge them.
    expect(() => allowed.checkTarget('64:ff9b::5db8:d822', 443)).toThrow(/host-not-allowed/);
    expect(() => denied.checkTarget('64:ff9b::5db8:d822', 443)).not.toThrow();
  });

  it('a host pattern never opens a refused address', () => {
    const patterns = egressPolicy({ allowHosts: ['127.0.0.1', '*'] });
    expect(refusal(() => patterns.checkTarget('127.0.0.1', 443)).fields.reason).toBe('loopback');
  });
});

describe('EgressPolicy configuration (validated by the configuration schema)', () => {
  it.each([
    ['allow', '10.0.0.0/33'],
    ['allow', '10.0.0/8'],
    ['allow', '0177.0.0.1/32'],
    ['deny', 'fe80::/129'],
    ['deny', 'fe80::1%eth0/64'],
    ['deny', 'not-a-cidr'],
    ['deny', '10.0.0.0/'],
    ['deny', '10.0.0.0/-1'],
    ['deny', '1.2.3.4/8/8'],
  ])('%s entry %j is a config error naming it', (option, entry) => {
    const error = configError(() => egressPolicy({ [option]: [entry] }));
    expect(error.message).toContain(JSON.stringify(entry));
    expect(error.fields).toMatchObject({ key: `egress.${option}[0]` });
  });

  it('refuses bad ports and host patterns', () => {
    expect(configError(() => egressPolicy({ allowPorts: [0] })).fields.key).toBe('egress.allowPorts[0]');
    expect(configError(() => egressPolicy({ allowPorts: [70000] })).fields.key).toBe('egress.allowPorts[0]');
    expect(configError(() => egressPolicy({ allowHosts: ['*.'] })).fields.key).toBe('egress.allowHosts[0]');
    expect(configError(() => egressPolicy({ denyHosts: ['a.*.com'] })).message).toContain('"a.*.com"');
  });

  it('accepts bare addresses and masks host bits', () => {
    const policy = egressPolicy({ allow: ['10.1.2.3/8', 'fd00::1'] });
    expect(() => policy.checkAddress('10.200.0.1', 443)).not.toThrow();
    expect(() => policy.checkAddress('fd00::1', 443)).not.toThrow();
    expect(refusal(() => policy.checkAddress('fd00::2', 443)).fields.reason).toBe('private');
  });
});
