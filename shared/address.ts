// Addresses, host names and the configuration entries made of them, parsed in one place: the client keys its pools
// with `canonicalHost`, the daemon keys its pools with it again (it trusts no client's spelling), and the daemon's
// configuration (CIDRs, host patterns, `--resolve` entries, DNS servers, `pool.origins` matches) is parsed into the
// typed values below once, by daemon/config.ts, which the egress policy and the resolver take as they are.
//
// Two grammars of IP literal:
// - a host (what a URL or a client names): the WHATWG URL parser's rules, so that every spelling a URL accepts is
//   one key. IPv4 in 1 to 4 parts, each decimal, octal (leading 0) or hex (0x), the last part filling the
//   remaining bytes (`127.1`, `2130706433`, `0x7f000001` are all 127.0.0.1); IPv6 with or without brackets.
// - a configuration entry or an address from the kernel: strict text (decimal dotted quad without leading zeros,
//   RFC 4291 IPv6), so a reader of the file sees what it means.
// Canonical text: dotted quad; RFC 5952 IPv6 (lower case, `::` for the longest zero run, `::ffff:a.b.c.d` for
// IPv4-mapped addresses as the kernel gives them). A host that is an IPv4-mapped literal is the IPv4 host it maps
// (`[::ffff:127.0.0.1]` and `::ffff:7f00:1` are 127.0.0.1: keyed, matched against host patterns and connected to
// as that address); other IPv6 forms that embed an IPv4 address (`::a.b.c.d`, NAT64) stay IPv6 hosts. IPv6 zone
// ids (`fe80::1%eth0`) are refused everywhere: a zone names an interface of one machine, and the egress policy has
// no rule for it.
//
// Host names: lower case, IDNA to punycode (node:url's `domainToASCII`, the URL parser's own), one trailing dot
// removed; then each label 1 to 63 of [a-z0-9_-], 253 characters at most. A name whose last label is a number is
// an IPv4 literal or nothing (`1.2.3.999` is refused, as the URL parser refuses it).
//
// Every refusal is a SockpoolError(SOCKPOOL_ERR_INVALID_ARGUMENT) with fields { input, reason }; the configuration
// turns it into SOCKPOOL_ERR_CONFIG naming the key.

import { isIPv6 } from 'node:net';
import { domainToASCII } from 'node:url';
import { ErrorCodes, SockpoolError } from './errors.js';

/** An IP address: its bytes (4 or 16) and its canonical text. */
export interface IpAddress {
  readonly family: 4 | 6;
  readonly bytes: Uint8Array;
  readonly text: string;
}

/** A host: an IP literal or a DNS name, both canonical. */
export type Host = { readonly kind: 'ip'; readonly ip: IpAddress } | { readonly kind: 'name'; readonly name: string };

/** An address range. IPv4-mapped IPv6 ranges (`::ffff:a.b.c.d/N`, N >= 96) are stored as the IPv4 range. */
export interface Cidr {
  readonly family: 4 | 6;
  /** The network's bytes, host bits cleared. */
  readonly bytes: Uint8Array;
  readonly prefixLength: number;
  /** Canonical `ADDR/LENGTH` as written (host bits kept, so a reader recognises the entry). */
  readonly text: string;
}

/** An `egress.allowHosts`/`denyHosts` entry: `*`, `*.suffix` (subdomains of suffix, not suffix), or one host. */
export type HostPattern =
  | { readonly kind: 'any'; readonly text: string }
  | { readonly kind: 'subdomains'; readonly suffix: string; readonly text: string }
  | { readonly kind: 'exact'; readonly host: string; readonly text: string };

/** A `--resolve` entry as curl takes it: `HOST:PORT:ADDR[,ADDR]...`, IPv6 in brackets, an optional leading '+'. */
export interface ResolveEntry {
  /** A canonical host name (never an IP literal: literals are never looked up). */
  readonly host: string;
  readonly port: number;
  readonly addresses: readonly IpAddress[];
  readonly text: string;
}

/** A DNS server: `IP`, `IP:PORT`, `[IPV6]` or `[IPV6]:PORT`. */
export interface DnsServer {
  readonly address: IpAddress;
  /** undefined: the DNS port. */
  readonly port: number | undefined;
  /** Canonical text, as node:dns's setServers takes it. */
  readonly text: string;
}

/** A `pool.origins` match: `HOST:PORT`, `*.SUFFIX:PORT`, `*:PORT`, `[V6]:PORT`; PORT may be `*`. */
export interface OriginMatch {
  readonly host: HostPattern;
  /** undefined: any port. */
  readonly port: number | undefined;
  readonly text: string;
}

/** Why an input was refused: the `reason` field of the error. */
export type AddressProblem =
  | 'empty'
  | 'zone-id'
  | 'ipv4'
  | 'ipv6'
  | 'host-name'
  | 'not-strict'
  | 'prefix-length'
  | 'port'
  | 'pattern'
  | 'syntax';

function refuse(input: string, reason: AddressProblem, why: string): SockpoolError {
  return new SockpoolError(ErrorCodes.INVALID_ARGUMENT, `${JSON.stringify(input)}: ${why}`, { input, reason });
}

// ---------------------------------------------------------------------------------------------------------------
// IP literals

const HEX_PART = /^0x[0-9a-f]*$/;
const OCTAL_PART = /^0[0-7]*$/;
const DECIMAL_PART = /^[1-9][0-9]*$/;

/** One part of a WHATWG IPv4 address; null when it is not a number. Values past 2^32 are only "too big". */
function ipv4Part(part: string): number | null {
  let digits: string;
  let radix: number;
  if (HEX_PART.test(part)) [digits, radix] = [part.slice(2), 16];
  else if (OCTAL_PART.test(part)) [digits, radix] = [part, 8];
  else if (DECIMAL_PART.test(part)) [digits, radix] = [part, 10];
  else return null;
  digits = digits.replace(/^0+/, '');
  if (digits === '') return 0;
  // (12 digits in any of the radixes exceed 2^32: the part is too big whatever follows, and parseInt stays exact.)
  return digits.length > 12 ? 2 ** 40 : Number.parseInt(digits, radix);
}

/**
 * WHATWG "ends in a number": such a host is an IPv4 address or invalid, never a name. `text` is lower case, its
 * one trailing dot already removed.
 */
function endsInNumber(text: string): boolean {
  const last = text.slice(text.lastIndexOf('.') + 1);
  return /^[0-9]+$/.test(last) || HEX_PART.test(last);
}

/** The WHATWG URL IPv4 parser (lower-case input, its one trailing dot already removed). */
function parseIPv4Loose(text: string): Uint8Array | null {
  const parts = text.split('.');
  if (parts.length > 4) return null;
  const values: number[] = [];
  for (const part of parts) {
    const value = ipv4Part(part);
    if (value === null) return null;
    values.push(value);
  }
  const last = values.pop()!;
  if (values.some((value) => value > 255)) return null;
  if (last >= 256 ** (4 - values.length)) return null;
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

const OCTET = '(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])';
const STRICT_IPV4 = new RegExp(`^(?:${OCTET}\\.){3}${OCTET}$`);

/** IPv6 text without brackets or zone (isIPv6 validates; it would also accept a zone, which callers refuse first). */
function parseIPv6(text: string): Uint8Array | null {
  if (text.includes('%') || !isIPv6(text)) return null;
  const toGroups = (side: string): number[] => {
    if (side === '') return [];
    const groups: number[] = [];
    for (const piece of side.split(':')) {
      if (piece.includes('.')) {
        const [a = 0, b = 0, c = 0, d = 0] = piece.split('.').map((part) => Number.parseInt(part, 10));
        groups.push((a << 8) | b, (c << 8) | d);
      } else {
        groups.push(Number.parseInt(piece, 16));
      }
    }
    return groups;
  };
  const gap = text.indexOf('::');
  const head = toGroups(gap === -1 ? text : text.slice(0, gap));
  const tail = gap === -1 ? [] : toGroups(text.slice(gap + 2));
  const groups = [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail];
  if (groups.length !== 8) return null;
  const bytes = new Uint8Array(16);
  groups.forEach((group, index) => {
    bytes[index * 2] = group >> 8;
    bytes[index * 2 + 1] = group & 0xff;
  });
  return bytes;
}

function formatIPv4(bytes: Uint8Array, offset = 0): string {
  return `${bytes[offset]}.${bytes[offset + 1]}.${bytes[offset + 2]}.${bytes[offset + 3]}`;
}

/** RFC 5952: lower case, no leading zeros, the longest run of two or more zero groups as `::`. */
function formatIPv6(bytes: Uint8Array): string {
  if (isMappedIPv4(bytes)) return `::ffff:${formatIPv4(bytes, 12)}`;
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

export function ipAddress(family: 4 | 6, bytes: Uint8Array): IpAddress {
  return { family, bytes, text: family === 4 ? formatIPv4(bytes) : formatIPv6(bytes) };
}

/** True for `::ffff:a.b.c.d`: the IPv4 address a.b.c.d as a dual-stack socket names it. */
export function isMappedIPv4(bytes: Uint8Array): boolean {
  if (bytes.length !== 16 || bytes[10] !== 0xff || bytes[11] !== 0xff) return false;
  for (let index = 0; index < 10; index++) if (bytes[index] !== 0) return false;
  return true;
}

/** `::ffff:a.b.c.d` as the IPv4 address it is; any other address unchanged. */
export function unmapIPv4(ip: IpAddress): IpAddress {
  return ip.family === 6 && isMappedIPv4(ip.bytes) ? ipAddress(4, ip.bytes.slice(12)) : ip;
}

/**
 * An IP literal in any spelling a URL host may have (WHATWG IPv4 forms, IPv6 with or without brackets); null for
 * anything else, a zone id included. For addresses the kernel or a resolver gives, and for hosts (via parseHost).
 */
export function parseIpLiteral(input: string): IpAddress | null {
  const text = input.trim().toLowerCase();
  if (text.startsWith('[')) {
    const bytes = text.endsWith(']') ? parseIPv6(text.slice(1, -1)) : null;
    return bytes ? ipAddress(6, bytes) : null;
  }
  if (text.includes(':')) {
    const bytes = parseIPv6(text);
    return bytes ? ipAddress(6, bytes) : null;
  }
  const withoutDot = text.endsWith('.') ? text.slice(0, -1) : text;
  if (!endsInNumber(withoutDot)) return null;
  const bytes = parseIPv4Loose(withoutDot);
  return bytes ? ipAddress(4, bytes) : null;
}

/** An IP address in configuration spelling: decimal dotted quad without leading zeros, or RFC 4291 IPv6. */
export function parseStrictIp(input: string): IpAddress {
  const text = input.trim();
  if (text.includes('%')) throw refuse(input, 'zone-id', 'IPv6 zone ids are not supported');
  if (STRICT_IPV4.test(text)) return ipAddress(4, parseIPv4Loose(text)!);
  const bytes = text.includes(':') ? parseIPv6(text.toLowerCase()) : null;
  if (!bytes) throw refuse(input, 'not-strict', 'expected an IPv4 address (dotted quad) or an IPv6 address');
  return ipAddress(6, bytes);
}

// ---------------------------------------------------------------------------------------------------------------
// Hosts

const LABEL = /^[a-z0-9_-]{1,63}$/;
/** Plain ASCII without punycode: lower-casing is all that IDNA would do to it. */
const ASCII_HOST = /^[A-Za-z0-9._-]+$/;
/**
 * What ends a host in a URL, and what a host may not contain: domainToASCII would stop at the first of these and
 * return only what came before (`a/b` → `a`).
 */
// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it looks for.
const NOT_IN_HOST = /[\u0000-\u0020#%/:<>?@[\\\]^|\u007f]/;

function isHostName(name: string): boolean {
  return name.length <= 253 && name.split('.').every((label) => LABEL.test(label));
}

/** Parses a host (a URL's host, a client's `host` field, a configuration entry's host). Throws INVALID_ARGUMENT. */
export function parseHost(input: string): Host {
  const text = input.trim();
  if (text === '') throw refuse(input, 'empty', 'empty host');
  if (text.startsWith('[') || text.includes(':')) {
    const bracketed = text.startsWith('[') && text.endsWith(']');
    const inner = bracketed ? text.slice(1, -1) : text;
    if (inner.includes('%')) throw refuse(input, 'zone-id', 'IPv6 zone ids are not supported');
    const bytes = text.startsWith('[') && !bracketed ? null : parseIPv6(inner.toLowerCase());
    if (!bytes) throw refuse(input, 'ipv6', 'not an IPv6 address');
    // `::ffff:a.b.c.d` is the IPv4 host a.b.c.d (a dual-stack socket connects there): one host, one spelling.
    return { kind: 'ip', ip: unmapIPv4(ipAddress(6, bytes)) };
  }
  if (NOT_IN_HOST.test(text)) throw refuse(input, 'host-name', 'not a host name (a character no host may have)');
  let ascii = ASCII_HOST.test(text) && !/xn--/i.test(text) ? text.toLowerCase() : domainToASCII(text);
  if (ascii === '') throw refuse(input, 'host-name', 'not a valid host name (IDNA)');
  if (ascii.endsWith('.')) ascii = ascii.slice(0, -1);
  if (endsInNumber(ascii)) {
    const bytes = parseIPv4Loose(ascii);
    if (!bytes) throw refuse(input, 'ipv4', 'ends in a number but is not an IPv4 address');
    return { kind: 'ip', ip: ipAddress(4, bytes) };
  }
  if (!isHostName(ascii)) {
    throw refuse(input, 'host-name', 'not a host name (labels of 1 to 63 letters, digits, "-" or "_")');
  }
  return { kind: 'name', name: ascii };
}

/** Hosts already made canonical (every acquire asks again for the same few): input → canonical. */
const canonicalHosts = new Map<string, string>();
/** Distinct hosts kept; beyond this the oldest entry goes (a client inventing hosts only costs the parsing). */
const MAX_CANONICAL_HOSTS = 4096;

/** The one spelling of a host: what pools, stats and the state store are keyed by. Throws INVALID_ARGUMENT. */
export function canonicalHost(input: string): string {
  const known = canonicalHosts.get(input);
  if (known !== undefined) return known;
  const host = parseHost(input);
  const canonical = host.kind === 'ip' ? host.ip.text : host.name;
  if (input.length <= 253) {
    if (canonicalHosts.size >= MAX_CANONICAL_HOSTS) canonicalHosts.delete(canonicalHosts.keys().next().value!);
    canonicalHosts.set(input, canonical);
  }
  return canonical;
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration entries

function portNumber(input: string, text: string): number {
  const port = /^[0-9]{1,5}$/.test(text) ? Number(text) : 0;
  if (port < 1 || port > 65535) throw refuse(input, 'port', `port must be 1 to 65535, got ${JSON.stringify(text)}`);
  return port;
}

/** `ADDR/LENGTH`, or a bare address meaning that one host. Strict address spelling. */
export function parseCidr(input: string): Cidr {
  const text = input.trim();
  const slash = text.indexOf('/');
  const ip = parseStrictIp(slash === -1 ? text : text.slice(0, slash));
  const maxLength = ip.family === 4 ? 32 : 128;
  let prefixLength = maxLength;
  if (slash !== -1) {
    const lengthText = text.slice(slash + 1);
    if (!/^[0-9]{1,3}$/.test(lengthText) || Number(lengthText) > maxLength) {
      throw refuse(input, 'prefix-length', `prefix length must be 0 to ${maxLength}`);
    }
    prefixLength = Number(lengthText);
  }
  const written = `${ip.text}/${prefixLength}`;
  let family = ip.family;
  let bytes = ip.bytes;
  // ::ffff:a.b.c.d/N (N >= 96) is the IPv4 range a.b.c.d/(N-96): the policy unmaps addresses before matching.
  if (family === 6 && prefixLength >= 96 && isMappedIPv4(bytes)) {
    family = 4;
    bytes = bytes.slice(12);
    prefixLength -= 96;
  }
  const masked = bytes.map((byte, index) => {
    const bits = Math.max(0, Math.min(8, prefixLength - index * 8));
    return byte & ((0xff << (8 - bits)) & 0xff);
  });
  return { family, bytes: masked, prefixLength, text: written };
}

/** True when `ip` is inside `cidr` (same family only: unmap first where that matters). */
export function cidrContains(cidr: Cidr, ip: { family: 4 | 6; bytes: Uint8Array }): boolean {
  return cidr.family === ip.family && matchesPrefix(ip.bytes, cidr.bytes, cidr.prefixLength);
}

/** Compares the first `prefixLength` bits of `bytes` (from byte `offset`) with `prefix`. */
export function matchesPrefix(bytes: Uint8Array, prefix: Uint8Array, prefixLength: number, offset = 0): boolean {
  const whole = prefixLength >> 3;
  for (let index = 0; index < whole; index++) if (bytes[offset + index] !== prefix[index]) return false;
  const bits = prefixLength & 7;
  if (bits === 0) return true;
  const mask = (0xff << (8 - bits)) & 0xff;
  return ((bytes[offset + whole]! ^ prefix[whole]!) & mask) === 0;
}

/** A site's NAT64 prefix (RFC 6052): an IPv6 range of one of the lengths the RFC defines. */
export interface Nat64Prefix extends Cidr {
  readonly family: 6;
  readonly prefixLength: 32 | 40 | 48 | 56 | 64 | 96;
}

const NAT64_LENGTHS: ReadonlySet<number> = new Set([32, 40, 48, 56, 64, 96]);

export function parseNat64Prefix(input: string): Nat64Prefix {
  const cidr = parseCidr(input);
  if (cidr.family !== 6 || !input.includes('/') || !NAT64_LENGTHS.has(cidr.prefixLength)) {
    throw refuse(input, 'prefix-length', 'expected an IPv6 prefix of length 32, 40, 48, 56, 64 or 96 (RFC 6052)');
  }
  return cidr as Nat64Prefix;
}

/** `*`, `*.suffix` or a host (any spelling parseHost takes). */
export function parseHostPattern(input: string): HostPattern {
  const text = input.trim();
  if (text === '*') return { kind: 'any', text };
  if (text.startsWith('*.')) {
    const suffix = parseName(input, text.slice(2));
    return { kind: 'subdomains', suffix, text: `*.${suffix}` };
  }
  if (text.includes('*')) throw refuse(input, 'pattern', 'a "*" may only be the whole pattern or lead "*.suffix"');
  const host = canonicalHost(text);
  return { kind: 'exact', host, text: host.includes(':') ? `[${host}]` : host };
}

function parseName(input: string, text: string): string {
  let host: Host;
  try {
    host = parseHost(text);
  } catch (error) {
    throw refuse(input, 'host-name', (error as SockpoolError).message);
  }
  if (host.kind !== 'name') throw refuse(input, 'host-name', `${host.ip.text} is an IP literal, not a host name`);
  return host.name;
}

/** True when canonical `host` matches `pattern`. */
export function hostMatches(pattern: HostPattern, host: string): boolean {
  if (pattern.kind === 'any') return true;
  if (pattern.kind === 'exact') return pattern.host === host;
  return host.length > pattern.suffix.length + 1 && host.endsWith(`.${pattern.suffix}`);
}

export function parseResolveEntry(input: string): ResolveEntry {
  // curl's leading '+' (keep the entry for a while) means nothing here and is accepted.
  const match = /^\+?([^:[\]\s]+):([^:]*):(.+)$/.exec(input.trim());
  if (!match) throw refuse(input, 'syntax', 'expected HOST:PORT:ADDR[,ADDR]...');
  const host = parseName(input, match[1]!);
  const port = portNumber(input, match[2]!);
  const addresses: IpAddress[] = [];
  for (const part of match[3]!.split(',')) {
    const item = part.trim();
    const bracketed = /^\[(.*)\]$/.exec(item);
    const ip = parseStrictIp(bracketed ? bracketed[1]! : item);
    if (ip.family !== (bracketed ? 6 : 4)) {
      throw refuse(input, 'syntax', `address ${JSON.stringify(item)}: IPv4 as is, IPv6 in brackets`);
    }
    if (!addresses.some((known) => known.text === ip.text)) addresses.push(ip);
  }
  const list = addresses.map((ip) => (ip.family === 6 ? `[${ip.text}]` : ip.text)).join(',');
  return { host, port, addresses, text: `${host}:${port}:${list}` };
}

export function parseDnsServer(input: string): DnsServer {
  const text = input.trim();
  const bracketed = /^\[([^\]]*)\](?::(.*))?$/.exec(text);
  let [addressText, portText]: [string, string | undefined] = [text, undefined];
  if (bracketed) [addressText, portText] = [bracketed[1]!, bracketed[2]];
  // (A bare IPv6 address has colons of its own and no port: the whole text is the address.)
  else if (text.indexOf(':') !== -1 && text.indexOf(':') === text.lastIndexOf(':')) {
    [addressText, portText] = [text.slice(0, text.indexOf(':')), text.slice(text.indexOf(':') + 1)];
  }
  const address = parseStrictIp(addressText);
  if (bracketed && address.family !== 6) throw refuse(input, 'syntax', 'only IPv6 addresses go in brackets');
  const port = portText === undefined ? undefined : portNumber(input, portText);
  const host = address.family === 6 ? `[${address.text}]` : address.text;
  const canonical = port === undefined ? (address.family === 6 ? address.text : host) : `${host}:${port}`;
  return { address, port, text: canonical };
}

export function parseOriginMatch(input: string): OriginMatch {
  const match = /^(\[[^\]]*\]|[^:[\]\s]+):([^:]*)$/.exec(input.trim());
  if (!match) throw refuse(input, 'syntax', 'expected "host:port", "*.suffix:port", "*:port" or "[v6]:port"');
  const portText = match[2]!;
  const port = portText === '*' ? undefined : portNumber(input, portText);
  const host = parseHostPattern(match[1]!);
  return { host, port, text: `${host.text}:${portText}` };
}
