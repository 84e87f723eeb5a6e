// Egress policy: sockpoold creates every TCP socket its clients use, so it is the one place that decides where
// connections may go. The connector asks twice per connection: `checkTarget` before resolving (port, host
// patterns, and the address when the host is an IP literal in any spelling), then `checkAddress` for every
// resolved address and again for the peer address the socket actually connected to (no DNS-rebinding gap).
//
// Addresses are parsed into bytes and matched by prefix by hand instead of with node:net's BlockList: BlockList
// matches an IPv4 rule against `::ffff:a.b.c.d` but not against the other forms that embed an IPv4 address
// (`::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`), and it cannot say which rule matched.
//
// Decision order for one address (after `::ffff:a.b.c.d` is turned into `a.b.c.d`: it is the same destination):
//   1. `deny` CIDRs: a match refuses ('denied-cidr'). IPv4 CIDRs also match the IPv4 address embedded in an
//      IPv6 address (compatible, SIIT, NAT64, 6to4), so a denied IPv4 range cannot be reached through IPv6.
//   2. the address class (`classifyAddress`): public (null) passes.
//   3. `allow` CIDRs punch holes in the refused classes, matching the address itself only (an allowed
//      127.0.0.1/32 does not open 64:ff9b::7f00:1). Two exceptions: 'metadata' addresses open only for an allow
//      entry naming that exact address (/32 or /128), so allowing 169.254.0.0/16 does not expose cloud
//      credentials; 'unspecified' never opens (connecting to 0.0.0.0 or :: reaches the local host on Linux).
//   4. the host's own interface addresses and the ranges routed to it (daemon/host-addresses.ts; loopback
//      excepted, the class rules govern it), and the IPv4 address embedded in an IPv6 one, are refused
//      ('host-address') even when step 3 let them through, unless `allowHostAddresses` is set: a client must not
//      reach services bound on the host itself.
//
// NAT64: the well-known prefix 64:ff9b::/96 is always read as carrying an IPv4 address; `nat64Prefixes` adds the
// network-specific prefixes of the site (RFC 6052 lengths /32 to /96), whose embedded IPv4 address is classified,
// denied and allowed exactly like that IPv4 address.

import {
  type Cidr,
  cidrContains,
  type Host,
  type HostPattern,
  hostMatches,
  type IpAddress,
  matchesPrefix,
  type Nat64Prefix,
  parseCidr,
  parseHost,
  parseIpLiteral,
  unmapIPv4,
} from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';

/** Why an address is refused by default. null (from `classifyAddress`) means public. */
export type AddressClass =
  | 'loopback'
  | 'private'
  | 'link-local'
  | 'cgnat'
  | 'multicast'
  | 'unspecified'
  | 'broadcast'
  | 'metadata'
  | 'reserved'
  | 'invalid';

/** The `reason` field of a POLICY error: an address class or one of the list/port/host reasons. */
export type PolicyReason =
  | Exclude<AddressClass, 'invalid'>
  | 'denied-cidr'
  | 'port'
  | 'host-denied'
  | 'host-not-allowed'
  | 'invalid-host'
  | 'invalid-address'
  | 'host-address';

/** The policy's rules: the configuration's `egress` section, parsed (daemon/config.ts holds the defaults). */
export interface EgressRules {
  /** CIDRs that punch holes in the refused address classes. */
  readonly allow: readonly Cidr[];
  /** CIDRs always refused, whatever `allow` says. */
  readonly deny: readonly Cidr[];
  /** Destination ports allowed; an empty list allows every port. */
  readonly allowPorts: readonly number[];
  /** Non-empty: the host must match one of these. */
  readonly allowHosts: readonly HostPattern[];
  /** Hosts always refused. */
  readonly denyHosts: readonly HostPattern[];
  /** The site's network-specific NAT64 prefixes. */
  readonly nat64Prefixes: readonly Nat64Prefix[];
  /** Let connections reach this host's own interface addresses (loopback excepted: the class rules apply). */
  readonly allowHostAddresses: boolean;
  /**
   * This host's own addresses, and as CIDRs the ranges routed to it (daemon/host-addresses.ts); the same array
   * while unchanged. Default none.
   */
  readonly hostAddresses?: () => readonly string[];
}

// ---------------------------------------------------------------------------------------------------------------
// Prefixes and address classes

function prefix(text: string): { bytes: Uint8Array; prefixLength: number } {
  const { bytes, prefixLength } = parseCidr(text);
  return { bytes, prefixLength };
}

type ClassTable = Array<{ text: string; bytes: Uint8Array; prefixLength: number; addressClass: AddressClass }>;

function table(entries: Array<[string, AddressClass]>): ClassTable {
  return entries.map(([text, addressClass]) => ({ text, ...prefix(text), addressClass }));
}

// First match wins, so the specific entries (metadata, broadcast) come before the ranges that contain them.
// Sources: IANA IPv4/IPv6 Special-Purpose Address Registries (RFC 6890 and successors).
const IPV4_CLASSES = table([
  ['169.254.169.254/32', 'metadata'], // AWS, GCP, Azure, OCI, DigitalOcean... instance metadata
  ['169.254.170.2/32', 'metadata'], // AWS ECS task metadata and credentials
  ['169.254.170.23/32', 'metadata'], // AWS EKS pod identity agent
  ['100.100.100.200/32', 'metadata'], // Alibaba Cloud
  ['168.63.129.16/32', 'metadata'], // Azure WireServer (VM agent, extension settings and their secrets): public space
  ['169.254.42.42/32', 'metadata'], // Scaleway instance metadata
  ['169.254.0.23/32', 'metadata'], // Tencent Cloud (metadata.tencentyun.com)
  ['192.0.0.192/32', 'metadata'], // Oracle Cloud Classic
  ['255.255.255.255/32', 'broadcast'],
  ['0.0.0.0/8', 'unspecified'], // "this network"; connect() to 0.0.0.0 reaches the local host
  ['10.0.0.0/8', 'private'],
  ['100.64.0.0/10', 'cgnat'],
  ['127.0.0.0/8', 'loopback'],
  ['169.254.0.0/16', 'link-local'],
  ['172.16.0.0/12', 'private'],
  ['192.0.0.0/24', 'reserved'], // IETF protocol assignments
  ['192.0.2.0/24', 'reserved'], // TEST-NET-1
  ['192.88.99.0/24', 'reserved'], // deprecated 6to4 relay anycast
  ['192.168.0.0/16', 'private'],
  ['198.18.0.0/15', 'reserved'], // benchmarking (the project's lab uses 198.18.0.0/16: allow it explicitly)
  ['198.51.100.0/24', 'reserved'], // TEST-NET-2
  ['203.0.113.0/24', 'reserved'], // TEST-NET-3
  ['224.0.0.0/4', 'multicast'],
  ['240.0.0.0/4', 'reserved'],
]);

// Checked before the embedded-IPv4 forms: :: and ::1 sit inside ::/96 (IPv4-compatible).
const IPV6_EXACT = table([
  ['::/128', 'unspecified'],
  ['::1/128', 'loopback'],
  ['fd00:ec2::254/128', 'metadata'], // AWS instance metadata over IPv6
  ['fd00:ec2::23/128', 'metadata'], // AWS EKS pod identity agent over IPv6
  ['fd20:ce::254/128', 'metadata'], // Google Compute Engine metadata server over IPv6
  ['fd00:42::42/128', 'metadata'], // Scaleway instance metadata over IPv6
]);

const IPV6_CLASSES = table([
  ['64:ff9b:1::/48', 'reserved'], // local-use NAT64 (RFC 8215): the IPv4 position depends on the local prefix
  ['100::/64', 'reserved'], // discard-only
  ['2001::/23', 'reserved'], // IETF protocol assignments: Teredo, benchmarking 2001:2::/48, ORCHID...
  ['2001:db8::/32', 'reserved'], // documentation
  ['3fff::/20', 'reserved'], // documentation (RFC 9637)
  ['5f00::/16', 'reserved'], // SRv6 SIDs
  ['fc00::/7', 'private'], // unique local
  ['fe80::/10', 'link-local'],
  ['fec0::/10', 'private'], // deprecated site-local
  ['ff00::/8', 'multicast'],
]);

const GLOBAL_UNICAST = prefix('2000::/3');
/**
 * Names that mean loopback wherever a proxy runs: `localhost` (and, by suffix, the names under it: RFC 6761 §6.3), and
 * the other loopback names distributions' /etc/hosts carry (Debian's ip6-*, Red Hat's *.localdomain and localhost6).
 */
const LOOPBACK_NAMES = new Set([
  'localhost',
  'ip6-localhost',
  'ip6-loopback',
  'localhost.localdomain',
  'localhost4',
  'localhost4.localdomain4',
  'localhost6',
  'localhost6.localdomain6',
]);
/** What a loopback name may resolve to (EgressPolicy.checkTarget, for a proxy's target). */
const LOOPBACK_LITERALS = [parseIpLiteral('127.0.0.1')!, parseIpLiteral('::1')!];

/**
 * Every cloud metadata endpoint of the tables above, as CIDRs (`169.254.169.254/32`, `fd00:ec2::254/128`): the one
 * list the unit's kernel backstop (`IPAddressDeny=` in systemd/sockpoold.service) must cover too, which
 * test/systemd-units.test.ts checks, so an endpoint added here and not there fails a test.
 */
export const METADATA_ENDPOINTS: readonly string[] = [...IPV4_CLASSES, ...IPV6_EXACT]
  .filter((entry) => entry.addressClass === 'metadata')
  .map((entry) => entry.text);

type EmbeddingKind = 'compatible' | 'siit' | 'nat64' | '6to4';

// IPv6 forms that carry an IPv4 address (other than mapped, which is turned into plain IPv4 first). Connecting to
// one may reach that IPv4 address (through a NAT64 gateway, a 6to4 relay, or a dual-stack quirk).
const EMBEDDINGS: Array<{ kind: EmbeddingKind; bytes: Uint8Array; prefixLength: number; offset: number }> = [
  { kind: 'compatible', ...prefix('::/96'), offset: 12 }, // deprecated IPv4-compatible ::a.b.c.d
  { kind: 'siit', ...prefix('::ffff:0:0:0/96'), offset: 12 }, // SIIT IPv4-translated ::ffff:0:a.b.c.d
  { kind: 'nat64', ...prefix('64:ff9b::/96'), offset: 12 }, // well-known NAT64 prefix
  { kind: '6to4', ...prefix('2002::/16'), offset: 2 }, // 6to4 2002:AABB:CCDD::
];

function embeddedIPv4(bytes: Uint8Array): { kind: EmbeddingKind; v4: Uint8Array } | null {
  for (const embedding of EMBEDDINGS) {
    if (matchesPrefix(bytes, embedding.bytes, embedding.prefixLength)) {
      return { kind: embedding.kind, v4: bytes.slice(embedding.offset, embedding.offset + 4) };
    }
  }
  return null;
}

function lookUp(classes: ClassTable, bytes: Uint8Array): AddressClass | null {
  for (const entry of classes) {
    if (matchesPrefix(bytes, entry.bytes, entry.prefixLength)) return entry.addressClass;
  }
  return null;
}

function classifyIp(input: IpAddress, nat64: readonly Nat64Prefix[] = []): AddressClass | null {
  const ip = unmapIPv4(input);
  if (ip.family === 4) return lookUp(IPV4_CLASSES, ip.bytes);
  const exact = lookUp(IPV6_EXACT, ip.bytes);
  if (exact) return exact;
  const translated = nat64Embedded(ip.bytes, nat64);
  if (translated) return lookUp(IPV4_CLASSES, translated);
  const embedded = embeddedIPv4(ip.bytes);
  if (embedded) {
    const inner = lookUp(IPV4_CLASSES, embedded.v4);
    if (inner) return inner;
    // Compatible and SIIT forms are deprecated and never a public destination; NAT64 and 6to4 of a public IPv4
    // address are public (that is how IPv6-only hosts reach IPv4 origins).
    if (embedded.kind === 'compatible' || embedded.kind === 'siit') return 'reserved';
    if (embedded.kind === 'nat64') return null;
  }
  const listed = lookUp(IPV6_CLASSES, ip.bytes);
  if (listed) return listed;
  // Everything outside 2000::/3 is unassigned or special: not a public destination today.
  return matchesPrefix(ip.bytes, GLOBAL_UNICAST.bytes, GLOBAL_UNICAST.prefixLength) ? null : 'reserved';
}

/**
 * The IPv4 address an IPv6 address carries under one of `prefixes`, or null. RFC 6052 section 2.2: the 32 bits
 * follow the prefix, skipping bits 64 to 71 (the "u" octet).
 */
function nat64Embedded(bytes: Uint8Array, prefixes: readonly Nat64Prefix[]): Uint8Array | null {
  for (const prefix of prefixes) {
    if (!matchesPrefix(bytes, prefix.bytes, prefix.prefixLength)) continue;
    const v4 = new Uint8Array(4);
    let index = prefix.prefixLength / 8;
    for (let taken = 0; taken < 4; index++) {
      if (index === 8) continue;
      v4[taken++] = bytes[index]!;
    }
    return v4;
  }
  return null;
}

/** A map key for an address (family and bytes). */
function ipKey(ip: { family: 4 | 6; bytes: Uint8Array }): string {
  return `${ip.family}:${ip.bytes.join('.')}`;
}

/**
 * The class of an address refused by default, or null for a public address. Accepts every spelling that
 * `parseIpLiteral` accepts; returns 'invalid' for text that is not an IP address.
 */
export function classifyAddress(address: string): AddressClass | null {
  const ip = parseIpLiteral(address);
  return ip ? classifyIp(ip) : 'invalid';
}

/** A range of the host-address list, or undefined for text that is not a CIDR (skipped, like a bad address). */
function parseHostRange(text: string): Cidr | undefined {
  try {
    return parseCidr(text);
  } catch {
    return undefined;
  }
}

function matchesHost(patterns: readonly HostPattern[], host: string): boolean {
  return patterns.some((pattern) => hostMatches(pattern, host));
}

function matchesCidr(cidrs: readonly Cidr[], ip: { family: 4 | 6; bytes: Uint8Array }): Cidr | undefined {
  return cidrs.find((cidr) => cidrContains(cidr, ip));
}

// ---------------------------------------------------------------------------------------------------------------
// The policy

export class EgressPolicy {
  readonly #rules: EgressRules;
  readonly #allowPorts: ReadonlySet<number>;
  /** What rules.hostAddresses last returned: its addresses as byte strings, its ranges (see #isHostAddress). */
  #hostAddressList: readonly string[] | undefined;
  #hostAddressKeys = new Set<string>();
  #hostRanges: Cidr[] = [];

  constructor(rules: EgressRules) {
    this.#rules = rules;
    this.#allowPorts = new Set(rules.allowPorts);
  }

  /**
   * Before resolving: the port, the host syntax and patterns, and the address itself when the host is an IP
   * literal in any spelling. Throws SockpoolError(POLICY) with fields { host, address, port, reason }.
   * `proxied`: the host is a proxy's to resolve (a CONNECT target), so no address of it is ever checked here; a
   * name that means loopback (LOOPBACK_NAMES: `localhost` and the names under it, RFC 6761 §6.3) is judged as the
   * loopback addresses it names, both, as the literal would be: it is the proxy host's own loopback (the daemon's
   * host's, for a proxy beside it).
   */
  checkTarget(host: string, port: number, proxied = false): void {
    this.#checkPort(port, host, undefined);
    let parsed: Host;
    try {
      parsed = parseHost(host);
    } catch {
      this.#refuse('invalid-host', host, undefined, port);
    }
    // An IPv4-mapped literal is already its IPv4 address here (parseHost): patterns match it as that address.
    const literal = parsed.kind === 'ip' ? parsed.ip : undefined;
    const patternName = literal ? literal.text : (parsed as { name: string }).name;
    if (matchesHost(this.#rules.denyHosts, patternName)) {
      this.#refuse('host-denied', host, literal?.text, port);
    }
    if (this.#rules.allowHosts.length > 0 && !matchesHost(this.#rules.allowHosts, patternName)) {
      this.#refuse('host-not-allowed', host, literal?.text, port);
    }
    if (literal) this.#checkIp(literal, port, host);
    else if (proxied && (LOOPBACK_NAMES.has(patternName) || patternName.endsWith('.localhost'))) {
      for (const loopback of LOOPBACK_LITERALS) this.#checkIp(loopback, port, host);
    }
  }

  /**
   * For every resolved address, and again for the peer address a socket actually connected to. Accepts any
   * spelling of the address. Throws SockpoolError(POLICY) with fields { host, address, port, reason }.
   */
  checkAddress(address: string, port: number, host?: string): void {
    this.#checkPort(port, host, address);
    const ip = parseIpLiteral(address);
    if (!ip) this.#refuse('invalid-address', host, address, port);
    this.#checkIp(ip, port, host);
  }

  #checkPort(port: number, host: string | undefined, address: string | undefined): void {
    const valid = Number.isInteger(port) && port >= 1 && port <= 65535;
    if (!valid || (this.#allowPorts.size > 0 && !this.#allowPorts.has(port))) {
      this.#refuse('port', host, address, port);
    }
  }

  #checkIp(input: IpAddress, port: number, host: string | undefined): void {
    const ip = unmapIPv4(input);
    const address = input.text;
    const nat64 = this.#rules.nat64Prefixes;
    const embeddedV4 = ip.family === 6 ? (nat64Embedded(ip.bytes, nat64) ?? embeddedIPv4(ip.bytes)?.v4) : null;
    const deny = this.#rules.deny;
    if (matchesCidr(deny, ip) || (embeddedV4 && matchesCidr(deny, { family: 4, bytes: embeddedV4 }))) {
      this.#refuse('denied-cidr', host, address, port);
    }
    const addressClass = classifyIp(ip, nat64);
    if (addressClass !== null && !this.#opensClass(addressClass, ip)) {
      this.#refuse(addressClass === 'invalid' ? 'invalid-address' : addressClass, host, address, port);
    }
    // Loopback stays with its class rule (and allow) even inside a range routed local that holds it.
    if (
      !this.#rules.allowHostAddresses &&
      addressClass !== 'loopback' &&
      (this.#isHostAddress(ip) || (embeddedV4 && this.#isHostAddress({ family: 4, bytes: embeddedV4 })))
    ) {
      this.#refuse('host-address', host, address, port);
    }
  }

  /** Whether an `allow` entry opens a refused class for this address (see the decision order above). */
  #opensClass(addressClass: AddressClass, ip: IpAddress): boolean {
    if (addressClass === 'unspecified' || addressClass === 'invalid') return false;
    const hole = matchesCidr(this.#rules.allow, ip);
    const exactHost = hole !== undefined && hole.prefixLength === (ip.family === 4 ? 32 : 128);
    return hole !== undefined && (addressClass !== 'metadata' || exactHost);
  }

  /**
   * One of this host's own addresses, or inside a range routed to it (the list re-derived only when the provider's
   * array changes). Ranges are few (a host's AnyIP routes and lo's prefixes): a scan, not a trie.
   */
  #isHostAddress(ip: { family: 4 | 6; bytes: Uint8Array }): boolean {
    if (!this.#rules.hostAddresses) return false;
    const list = this.#rules.hostAddresses();
    if (list !== this.#hostAddressList) {
      this.#hostAddressList = list;
      this.#hostAddressKeys = new Set();
      this.#hostRanges = [];
      for (const text of list) {
        if (text.includes('/')) {
          const range = parseHostRange(text);
          if (range) this.#hostRanges.push(range);
          continue;
        }
        const parsed = parseIpLiteral(text);
        if (parsed) this.#hostAddressKeys.add(ipKey(unmapIPv4(parsed)));
      }
    }
    return this.#hostAddressKeys.has(ipKey(ip)) || matchesCidr(this.#hostRanges, ip) !== undefined;
  }

  #refuse(reason: PolicyReason, host: string | undefined, address: string | undefined, port: number): never {
    const target = host ?? address ?? '?';
    const via = host !== undefined && address !== undefined && address !== host ? ` (${address})` : '';
    throw new SockpoolError(ErrorCodes.POLICY, `egress to ${target}${via} port ${port} refused: ${reason}`, {
      host,
      address,
      port,
      reason,
    });
  }
}
