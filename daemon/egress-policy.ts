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
//   4. the host's own interface addresses (daemon/host-addresses.ts; loopback excepted, the class rules govern it),
//      and the IPv4 address embedded in an IPv6 one, are refused ('host-address') even when step 3 let them
//      through, unless `allowHostAddresses` is set: a client must not reach services bound on the host itself.
//
// NAT64: the well-known prefix 64:ff9b::/96 is always read as carrying an IPv4 address; `nat64Prefixes` adds the
// network-specific prefixes of the site (RFC 6052 lengths /32 to /96), whose embedded IPv4 address is classified,
// denied and allowed exactly like that IPv4 address.

import { isIPv6 } from 'node:net';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { canonicalHost } from '../shared/origin.js';

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

export interface EgressPolicyOptions {
  /** CIDRs (or bare addresses) that punch holes in the refused address classes. Default []. */
  allow?: string[];
  /** CIDRs (or bare addresses) always refused, whatever `allow` says. Default []. */
  deny?: string[];
  /** Destination ports allowed. Default [80, 443]; an empty list allows every port. */
  allowPorts?: number[];
  /** Host patterns ("example.org", "*.example.com", "*", or an IP literal). Non-empty: the host must match one. */
  allowHosts?: string[];
  /** Host patterns always refused. Default []. */
  denyHosts?: string[];
  /** Network-specific NAT64 prefixes (`2001:db8:64::/96`; RFC 6052 lengths 32, 40, 48, 56, 64, 96). Default []. */
  nat64Prefixes?: string[];
  /** Let connections reach this host's own interface addresses (loopback excepted: the class rules apply). */
  allowHostAddresses?: boolean;
  /** This host's interface addresses (daemon/host-addresses.ts); the same array while unchanged. Default none. */
  hostAddresses?: () => readonly string[];
}

export const DEFAULT_ALLOW_PORTS: readonly number[] = [80, 443];

interface ParsedIp {
  family: 4 | 6;
  bytes: Uint8Array;
}

interface Cidr {
  family: 4 | 6;
  bytes: Uint8Array;
  prefixLength: number;
  text: string;
}

interface HostPattern {
  /** Exact name (or normalised IP literal), or the parent domain when `subdomains` is set. */
  name: string;
  subdomains: boolean;
  any: boolean;
}

// ---------------------------------------------------------------------------------------------------------------
// Parsing and formatting

const HEX_PART = /^0x[0-9a-f]*$/;
const OCTAL_PART = /^0[0-7]*$/;
const DECIMAL_PART = /^[1-9][0-9]*$/;

/** Parses one part of an inet_aton-style IPv4 address (decimal, 0-prefixed octal, 0x-prefixed hex). */
function parseIPv4Part(part: string): number | null {
  if (part.length === 0 || part.length > 40) return null;
  if (HEX_PART.test(part)) return part.length === 2 ? 0 : Number.parseInt(part.slice(2), 16);
  if (OCTAL_PART.test(part)) return Number.parseInt(part, 8);
  if (DECIMAL_PART.test(part)) return Number.parseInt(part, 10);
  return null;
}

/** True when the last dot-separated label is a number: such a host is an IPv4 literal or invalid (WHATWG URL). */
function endsInNumber(host: string): boolean {
  const last = host.slice(host.lastIndexOf('.') + 1);
  return /^[0-9]+$/.test(last) || HEX_PART.test(last);
}

/**
 * IPv4 in every spelling inet_aton (and so getaddrinfo) accepts: 1 to 4 parts, each decimal, octal (leading 0)
 * or hex (0x); the last part fills the remaining bytes (`127.1`, `2130706433`, `0x7f.1`).
 */
function parseIPv4Loose(text: string): Uint8Array | null {
  const parts = text.split('.');
  if (parts.length > 4) return null;
  const values: number[] = [];
  for (const part of parts) {
    const value = parseIPv4Part(part);
    if (value === null) return null;
    values.push(value);
  }
  const last = values.pop()!;
  for (const value of values) if (value > 255) return null;
  const lastBytes = 4 - values.length;
  if (last >= 2 ** (8 * lastBytes)) return null;
  const bytes = new Uint8Array(4);
  values.forEach((value, index) => {
    bytes[index] = value;
  });
  let rest = last;
  for (let index = 3; index >= values.length; index--) {
    bytes[index] = rest % 256;
    rest = Math.floor(rest / 256);
  }
  return bytes;
}

/** Strict dotted quad (used for the IPv4 tail of an IPv6 literal, already validated by isIPv6). */
function parseDottedQuad(text: string): number[] {
  return text.split('.').map((part) => Number.parseInt(part, 10));
}

/** Parses an IPv6 literal (no brackets; a zone id after `%` is dropped). */
function parseIPv6(text: string): Uint8Array | null {
  const withoutZone = text.includes('%') ? text.slice(0, text.indexOf('%')) : text;
  if (!isIPv6(withoutZone)) return null;
  const toGroups = (side: string): number[] => {
    if (side === '') return [];
    const groups: number[] = [];
    for (const piece of side.split(':')) {
      if (piece.includes('.')) {
        const [a = 0, b = 0, c = 0, d = 0] = parseDottedQuad(piece);
        groups.push((a << 8) | b, (c << 8) | d);
      } else {
        groups.push(Number.parseInt(piece, 16));
      }
    }
    return groups;
  };
  const gap = withoutZone.indexOf('::');
  const head = toGroups(gap === -1 ? withoutZone : withoutZone.slice(0, gap));
  const tail = gap === -1 ? [] : toGroups(withoutZone.slice(gap + 2));
  const groups = [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail];
  if (groups.length !== 8) return null;
  const bytes = new Uint8Array(16);
  groups.forEach((group, index) => {
    bytes[index * 2] = group >> 8;
    bytes[index * 2 + 1] = group & 0xff;
  });
  return bytes;
}

/** Parses an IP literal in any accepted spelling: bracketed or bare IPv6, any inet_aton IPv4 form. */
function parseIp(input: string): ParsedIp | null {
  let text = input.trim().toLowerCase();
  if (text.startsWith('[') && text.endsWith(']')) {
    const bytes = parseIPv6(text.slice(1, -1));
    return bytes ? { family: 6, bytes } : null;
  }
  if (text.includes(':')) {
    const bytes = parseIPv6(text);
    return bytes ? { family: 6, bytes } : null;
  }
  if (text.endsWith('.') && text.length > 1) text = text.slice(0, -1);
  const bytes = parseIPv4Loose(text);
  return bytes ? { family: 4, bytes } : null;
}

function formatIPv4(bytes: Uint8Array, offset = 0): string {
  return `${bytes[offset]}.${bytes[offset + 1]}.${bytes[offset + 2]}.${bytes[offset + 3]}`;
}

/** RFC 5952 text: lower case, no leading zeros, the longest run of two or more zero groups as `::`. */
function formatIPv6(bytes: Uint8Array): string {
  if (isMapped(bytes)) return `::ffff:${formatIPv4(bytes, 12)}`;
  const groups: number[] = [];
  for (let index = 0; index < 16; index += 2) groups.push((bytes[index]! << 8) | bytes[index + 1]!);
  let bestStart = -1;
  let bestLength = 1;
  for (let start = 0; start < 8; ) {
    if (groups[start] !== 0) {
      start++;
      continue;
    }
    let end = start;
    while (end < 8 && groups[end] === 0) end++;
    if (end - start > bestLength) {
      bestStart = start;
      bestLength = end - start;
    }
    start = end;
  }
  const hex = (list: number[]) => list.map((group) => group.toString(16)).join(':');
  if (bestStart === -1) return hex(groups);
  return `${hex(groups.slice(0, bestStart))}::${hex(groups.slice(bestStart + bestLength))}`;
}

/** A map key for an address (family and bytes). */
function ipKey(ip: ParsedIp): string {
  return `${ip.family}:${ip.bytes.join('.')}`;
}

function formatIp(ip: ParsedIp): string {
  return ip.family === 4 ? formatIPv4(ip.bytes) : formatIPv6(ip.bytes);
}

/**
 * Normalises an IP literal in any spelling (bracketed IPv6, zone id, decimal/octal/hex/short IPv4) to its
 * canonical text and family; null when `host` is not an IP literal. `::ffff:a.b.c.d` stays IPv6 (family 6).
 */
export function normaliseIpLiteral(host: string): { address: string; family: 4 | 6 } | null {
  const ip = parseIp(host);
  return ip ? { address: formatIp(ip), family: ip.family } : null;
}

const LABEL = /^[a-z0-9_-]{1,63}$/;

/**
 * True for a syntactically valid DNS name (canonical form: lower case, no trailing dot) that is not an IP
 * literal and does not end in a number (`1.2.3.999` is an invalid address, not a name, as in the WHATWG URL parser).
 */
export function isHostName(name: string): boolean {
  if (name.length === 0 || name.length > 253 || endsInNumber(name)) return false;
  return name.split('.').every((label) => LABEL.test(label));
}

// ---------------------------------------------------------------------------------------------------------------
// Prefixes and address classes

function matchesPrefix(bytes: Uint8Array, prefix: Uint8Array, prefixLength: number, offset = 0): boolean {
  const whole = prefixLength >> 3;
  for (let index = 0; index < whole; index++) if (bytes[offset + index] !== prefix[index]) return false;
  const bits = prefixLength & 7;
  if (bits === 0) return true;
  const mask = (0xff << (8 - bits)) & 0xff;
  return ((bytes[offset + whole]! ^ prefix[whole]!) & mask) === 0;
}

function prefix(text: string): { bytes: Uint8Array; prefixLength: number } {
  const [address = '', length = ''] = text.split('/');
  const ip = parseIp(address);
  if (!ip) throw new Error(`bad built-in prefix ${text}`);
  return { bytes: ip.bytes, prefixLength: Number(length) };
}

type ClassTable = Array<{ bytes: Uint8Array; prefixLength: number; addressClass: AddressClass }>;

function table(entries: Array<[string, AddressClass]>): ClassTable {
  return entries.map(([text, addressClass]) => ({ ...prefix(text), addressClass }));
}

// First match wins, so the specific entries (metadata, broadcast) come before the ranges that contain them.
// Sources: IANA IPv4/IPv6 Special-Purpose Address Registries (RFC 6890 and successors).
const IPV4_CLASSES = table([
  ['169.254.169.254/32', 'metadata'], // AWS, GCP, Azure, OCI, DigitalOcean... instance metadata
  ['169.254.170.2/32', 'metadata'], // AWS ECS task metadata and credentials
  ['169.254.170.23/32', 'metadata'], // AWS EKS pod identity agent
  ['100.100.100.200/32', 'metadata'], // Alibaba Cloud
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
const MAPPED = prefix('::ffff:0:0/96');

function isMapped(bytes: Uint8Array): boolean {
  return bytes.length === 16 && matchesPrefix(bytes, MAPPED.bytes, MAPPED.prefixLength);
}

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

/** `::ffff:a.b.c.d` is the IPv4 address a.b.c.d reached through a dual-stack socket: treat it as IPv4. */
function unmap(ip: ParsedIp): ParsedIp {
  return ip.family === 6 && isMapped(ip.bytes) ? { family: 4, bytes: ip.bytes.slice(12) } : ip;
}

function lookUp(classes: ClassTable, bytes: Uint8Array): AddressClass | null {
  for (const entry of classes) {
    if (matchesPrefix(bytes, entry.bytes, entry.prefixLength)) return entry.addressClass;
  }
  return null;
}

function classifyIp(input: ParsedIp, nat64: readonly Nat64Prefix[] = []): AddressClass | null {
  const ip = unmap(input);
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

/** A site's NAT64 prefix (RFC 6052): where in an IPv6 address the IPv4 address sits. */
export interface Nat64Prefix {
  bytes: Uint8Array;
  prefixLength: 32 | 40 | 48 | 56 | 64 | 96;
  text: string;
}

const NAT64_LENGTHS: ReadonlySet<number> = new Set([32, 40, 48, 56, 64, 96]);

/** Parses a NAT64 prefix `v6/length`; throws SockpoolError(CONFIG) naming `option` when it is not one. */
export function parseNat64Prefix(option: string, entry: unknown): Nat64Prefix {
  const text = typeof entry === 'string' ? entry.trim() : '';
  const slash = text.indexOf('/');
  const ip = slash === -1 || text.includes('%') ? null : parseIp(text.slice(0, slash));
  const length = Number(text.slice(slash + 1));
  if (!ip || ip.family !== 6 || !/^\d{2}$/.test(text.slice(slash + 1)) || !NAT64_LENGTHS.has(length)) {
    throw configError(option, entry, 'not an IPv6 prefix of length 32, 40, 48, 56, 64 or 96 (RFC 6052)');
  }
  return { bytes: ip.bytes, prefixLength: length as Nat64Prefix['prefixLength'], text };
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

/**
 * The class of an address refused by default, or null for a public address. Accepts every spelling that
 * `normaliseIpLiteral` accepts; returns 'invalid' for text that is not an IP address.
 */
export function classifyAddress(address: string): AddressClass | null {
  const ip = parseIp(address);
  return ip ? classifyIp(ip) : 'invalid';
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration parsing

function configError(option: string, entry: unknown, why: string): SockpoolError {
  return new SockpoolError(ErrorCodes.CONFIG, `egress policy: ${option} entry ${JSON.stringify(entry)}: ${why}`, {
    option,
    entry: String(entry),
  });
}

const OCTET = '(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])';
/** Dotted quad of decimal octets without leading zeros: the only IPv4 spelling accepted in configuration. */
const STRICT_IPV4 = new RegExp(`^(?:${OCTET}\\.){3}${OCTET}$`);

/** Parses `address/length` or a bare address (a single host). Strict spelling; host bits are masked off. */
function parseCidr(option: string, entry: unknown): Cidr {
  if (typeof entry !== 'string') throw configError(option, entry, 'not a string');
  const text = entry.trim();
  const slash = text.indexOf('/');
  const addressText = slash === -1 ? text : text.slice(0, slash);
  const lengthText = slash === -1 ? undefined : text.slice(slash + 1);
  let ip: ParsedIp | null = null;
  if (STRICT_IPV4.test(addressText)) ip = parseIp(addressText);
  else if (addressText.includes(':') && !addressText.includes('%')) ip = parseIp(addressText);
  if (!ip) throw configError(option, entry, 'not an IPv4 or IPv6 address (dotted quad or RFC 4291 text)');
  const maxLength = ip.family === 4 ? 32 : 128;
  let prefixLength = maxLength;
  if (lengthText !== undefined) {
    if (!/^[0-9]{1,3}$/.test(lengthText) || Number(lengthText) > maxLength) {
      throw configError(option, entry, `prefix length must be 0 to ${maxLength}`);
    }
    prefixLength = Number(lengthText);
  }
  let family = ip.family;
  let bytes = ip.bytes;
  // ::ffff:a.b.c.d/N (N >= 96) is the IPv4 range a.b.c.d/(N-96): addresses are unmapped before matching.
  if (family === 6 && prefixLength >= 96 && isMapped(bytes)) {
    family = 4;
    bytes = bytes.slice(12);
    prefixLength -= 96;
  }
  const masked = new Uint8Array(bytes.length);
  for (let index = 0; index < bytes.length; index++) {
    const bits = Math.max(0, Math.min(8, prefixLength - index * 8));
    masked[index] = bytes[index]! & ((0xff << (8 - bits)) & 0xff);
  }
  return { family, bytes: masked, prefixLength, text };
}

function parsePort(option: string, entry: unknown): number {
  if (typeof entry !== 'number' || !Number.isInteger(entry) || entry < 1 || entry > 65535) {
    throw configError(option, entry, 'not a port number (1 to 65535)');
  }
  return entry;
}

function parseHostPattern(option: string, entry: unknown): HostPattern {
  if (typeof entry !== 'string') throw configError(option, entry, 'not a string');
  if (entry.trim() === '*') return { name: '', subdomains: false, any: true };
  const text = canonicalHost(entry);
  const literal = normaliseIpLiteral(text);
  if (literal) return { name: literal.address, subdomains: false, any: false };
  const subdomains = text.startsWith('*.');
  const name = subdomains ? text.slice(2) : text;
  if (!isHostName(name)) {
    throw configError(option, entry, 'not a host name, "*.domain", "*" or an IP literal');
  }
  return { name, subdomains, any: false };
}

function matchesHost(patterns: HostPattern[], name: string): boolean {
  return patterns.some(
    (pattern) => pattern.any || (pattern.subdomains ? name.endsWith(`.${pattern.name}`) : name === pattern.name),
  );
}

function matchesCidr(cidrs: Cidr[], ip: ParsedIp): Cidr | undefined {
  return cidrs.find((cidr) => cidr.family === ip.family && matchesPrefix(ip.bytes, cidr.bytes, cidr.prefixLength));
}

function asList(option: string, value: unknown, fallback: readonly unknown[]): unknown[] {
  if (value === undefined) return [...fallback];
  if (!Array.isArray(value)) throw configError(option, value, 'not a list');
  return value;
}

// ---------------------------------------------------------------------------------------------------------------
// The policy

export class EgressPolicy {
  readonly #allow: Cidr[];
  readonly #deny: Cidr[];
  readonly #allowPorts: ReadonlySet<number>;
  readonly #allowHosts: HostPattern[];
  readonly #denyHosts: HostPattern[];
  readonly #nat64: Nat64Prefix[];
  readonly #allowHostAddresses: boolean;
  readonly #hostAddresses: (() => readonly string[]) | undefined;
  /** What #hostAddresses last returned, and its addresses as byte strings (see #isHostAddress). */
  #hostAddressList: readonly string[] | undefined;
  #hostAddressKeys = new Set<string>();

  /** Validates every entry; a bad one throws SockpoolError(CONFIG) naming the option and the entry. */
  constructor(options: EgressPolicyOptions = {}) {
    this.#allow = asList('allow', options.allow, []).map((entry) => parseCidr('allow', entry));
    this.#deny = asList('deny', options.deny, []).map((entry) => parseCidr('deny', entry));
    this.#allowPorts = new Set(
      asList('allowPorts', options.allowPorts, DEFAULT_ALLOW_PORTS).map((entry) => parsePort('allowPorts', entry)),
    );
    this.#allowHosts = asList('allowHosts', options.allowHosts, []).map((entry) =>
      parseHostPattern('allowHosts', entry),
    );
    this.#denyHosts = asList('denyHosts', options.denyHosts, []).map((entry) => parseHostPattern('denyHosts', entry));
    this.#nat64 = asList('nat64Prefixes', options.nat64Prefixes, []).map((entry) =>
      parseNat64Prefix('nat64Prefixes', entry),
    );
    this.#allowHostAddresses = options.allowHostAddresses ?? false;
    this.#hostAddresses = options.hostAddresses;
  }

  /**
   * Before resolving: the port, the host syntax and patterns, and the address itself when the host is an IP
   * literal in any spelling. Throws SockpoolError(POLICY) with fields { host, address, port, reason }.
   */
  checkTarget(host: string, port: number): void {
    this.#checkPort(port, host, undefined);
    const name = canonicalHost(host);
    const literal = parseIp(name);
    if (!literal && !isHostName(name)) this.#refuse('invalid-host', host, undefined, port);
    const patternName = literal ? formatIp(literal) : name;
    if (matchesHost(this.#denyHosts, patternName)) {
      this.#refuse('host-denied', host, literal ? patternName : undefined, port);
    }
    if (this.#allowHosts.length > 0 && !matchesHost(this.#allowHosts, patternName)) {
      this.#refuse('host-not-allowed', host, literal ? patternName : undefined, port);
    }
    if (literal) this.#checkIp(literal, port, host);
  }

  /**
   * For every resolved address, and again for the peer address a socket actually connected to. Accepts any
   * spelling of the address. Throws SockpoolError(POLICY) with fields { host, address, port, reason }.
   */
  checkAddress(address: string, port: number, host?: string): void {
    this.#checkPort(port, host, address);
    const ip = parseIp(address);
    if (!ip) this.#refuse('invalid-address', host, address, port);
    this.#checkIp(ip, port, host);
  }

  #checkPort(port: number, host: string | undefined, address: string | undefined): void {
    const valid = Number.isInteger(port) && port >= 1 && port <= 65535;
    if (!valid || (this.#allowPorts.size > 0 && !this.#allowPorts.has(port))) {
      this.#refuse('port', host, address, port);
    }
  }

  #checkIp(input: ParsedIp, port: number, host: string | undefined): void {
    const ip = unmap(input);
    const address = formatIp(input);
    const embeddedV4 = ip.family === 6 ? (nat64Embedded(ip.bytes, this.#nat64) ?? embeddedIPv4(ip.bytes)?.v4) : null;
    if (matchesCidr(this.#deny, ip) || (embeddedV4 && matchesCidr(this.#deny, { family: 4, bytes: embeddedV4 }))) {
      this.#refuse('denied-cidr', host, address, port);
    }
    const addressClass = classifyIp(ip, this.#nat64);
    if (addressClass !== null && !this.#opensClass(addressClass, ip)) {
      this.#refuse(addressClass === 'invalid' ? 'invalid-address' : addressClass, host, address, port);
    }
    if (
      !this.#allowHostAddresses &&
      (this.#isHostAddress(ip) || (embeddedV4 && this.#isHostAddress({ family: 4, bytes: embeddedV4 })))
    ) {
      this.#refuse('host-address', host, address, port);
    }
  }

  /** Whether an `allow` entry opens a refused class for this address (see the decision order above). */
  #opensClass(addressClass: AddressClass, ip: ParsedIp): boolean {
    if (addressClass === 'unspecified' || addressClass === 'invalid') return false;
    const hole = matchesCidr(this.#allow, ip);
    const exactHost = hole !== undefined && hole.prefixLength === (ip.family === 4 ? 32 : 128);
    return hole !== undefined && (addressClass !== 'metadata' || exactHost);
  }

  /** One of this host's interface addresses (the list re-derived only when the provider's array changes). */
  #isHostAddress(ip: ParsedIp): boolean {
    if (!this.#hostAddresses) return false;
    const list = this.#hostAddresses();
    if (list !== this.#hostAddressList) {
      this.#hostAddressList = list;
      this.#hostAddressKeys = new Set();
      for (const text of list) {
        const parsed = parseIp(text);
        if (parsed) this.#hostAddressKeys.add(ipKey(unmap(parsed)));
      }
    }
    return this.#hostAddressKeys.has(ipKey(ip));
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
