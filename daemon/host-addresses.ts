// The addresses of this host's own interfaces, for the egress policy: a client must not reach services bound on the
// host's public (or private) address through the daemon, the way it cannot reach 127.0.0.1. Loopback addresses are
// left out here: the policy's loopback class governs them, and tests and operators open 127.0.0.1 explicitly.
//
// Interfaces come and go (DHCP, VPNs, containers): the list is read again when it is older than REFRESH_MS, on the
// connect path, never on the handoff path. The same array is returned while nothing changed, so the policy can keep
// what it derived from it.
//
// Where they come from: os.networkInterfaces() (getifaddrs) and the kernel's own tables, together.
// os.networkInterfaces() alone is not enough: libuv leaves out every interface that is not both IFF_UP and
// IFF_RUNNING, yet the kernel still treats such an interface's addresses as local, and a connect() to them reaches
// this host's listeners: an interface up without carrier (a veth whose peer is down, docker0 with no container, a
// tun whose VPN is down) and, for IPv4, even one administratively down (kube-proxy's IPVS mode keeps every
// ClusterIP on a down kube-ipvs0). So addresses are also taken from the kernel's routes of type LOCAL, which is what
// it consults to call a destination local (each IPv4 address holds a `/32` one, whatever its interface's state), and
// IPv6 addresses from /proc/net/if_inet6 (every configured address, whatever its interface's state or DAD's: one
// tentative now is local as soon as its interface gets carrier, maybe before the next refresh; it has no route yet).
//
// Ranges too: a local route wider than one address makes every address in it this host's own (a listener on the
// wildcard accepts connections to any of them). That is AnyIP (`ip route add local 198.51.100.0/24 dev lo`, IPv6's
// `ip -6 route add local 2001:db8:77::/64 dev lo`), and also what the kernel does by itself for an IPv4 address put
// on lo with a prefix (`ip addr add 10.1.2.3/24 dev lo` routes all of 10.1.2.0/24 local). Those come as CIDR text
// (`198.51.100.0/24`) in the same list (if_inet6 lists no address for them). The ranges inside loopback
// (127.0.0.0/8, which every host routes local) are left out like the loopback addresses.
//
// The LOCAL routes are asked of the kernel through rtnetlink (shared/native.ts, localRoutes): a dump of the routes of
// type LOCAL of every table, which the kernel filters itself, so a host with a large routing table (a Kubernetes node's thousands of routes, a BGP router's full
// table) sends none of its other routes here. The kernel still walks every table to find them: with 20,000 routes
// of each family in the main table, the dump took 10 to 16 ms, 80 to 115 ms with 200,000 (medians of runs on a
// 2-core machine, Linux 6.18; the local table alone, localRoutes(255), 1.3 and 26 ms: the cost of counting the other
// tables), where
// reading /proc/net/fib_trie and /proc/net/ipv6_route took 2 s at 20,000 (mostly the kernel writing ipv6_route's
// text; fib_trie alone, 7 s at 200,000), at every refresh, on the event loop. Where netlink cannot be used (a
// seccomp filter, a reply the addon cannot read) those files are still the fallback: they list every route of
// every table, LOCAL ones marked (fib_trie's `/32 host LOCAL` and wider LOCAL entries, ipv6_route's RTF_LOCAL
// flag), and the parsers below read them.
//
// Which tables: a range counts only from the local, main and default tables, the ones the default rules route every
// packet by; a single address from any table (refusing more, never less). A LOCAL route in another table applies to
// the traffic a rule selects for it, and that is where transparent proxies put theirs: TPROXY's `local default dev
// lo table 100` (Cilium's table 2004, Istio's 133) would have made every address this host's own, every connect
// refused. The route files name no table: a default range (`/0`) is left out for the same reason, from either source.

import { readFileSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { ipAddress, parseCidr, parseIpLiteral } from '../shared/address.js';
import { SockpoolError } from '../shared/errors.js';
import { type LocalRoute, localRoutes } from '../shared/native.js';

const REFRESH_MS = 5_000;

/** The routing tables the default rules route every packet by: local (255), main (254), default (253). */
const ROUTED_BY_DEFAULT = new Set([253, 254, 255]);

/** The kernel's views read besides getifaddrs and netlink; per network namespace, the daemon's own. */
export const FIB_TRIE_PATH = '/proc/net/fib_trie';
export const IF_INET6_PATH = '/proc/net/if_inet6';
export const IPV6_ROUTE_PATH = '/proc/net/ipv6_route';

/** Where readHostAddresses() reads; tests substitute their own. */
export interface HostAddressSources {
  readonly networkInterfaces: () => ReturnType<typeof networkInterfaces>;
  /**
   * The kernel's routes of type LOCAL of every table, each with its table (shared/native.ts localRoutes). Throws when netlink cannot be
   * used: the routes then come from /proc/net/fib_trie and /proc/net/ipv6_route for that read. Absent: from those
   * files always.
   */
  readonly localRoutes?: () => readonly LocalRoute[];
  /** The text of a /proc file; throws when it cannot be read. */
  readonly readProcFile: (path: string) => string;
  /** localRoutes threw: this read took the routes from the /proc files. Not an error: nothing is thrown. */
  readonly onNetlinkUnavailable?: (error: Error) => void;
  /**
   * A /proc file could not be read (another kernel, a sandbox hiding /proc/net, IPv6 disabled): the addresses come
   * from os.networkInterfaces() alone for that family, as before. Not an error: nothing is thrown.
   */
  readonly onProcUnreadable?: (path: string, error: Error) => void;
}

/** This host's: getifaddrs, the addon's netlink dump, the files of /proc/net. */
export const SYSTEM_HOST_ADDRESS_SOURCES: HostAddressSources = {
  networkInterfaces,
  localRoutes: () => localRoutes().routes,
  // Plain reads: if_inet6 is one line per configured address, a few hundred bytes on a usual host (about 0.15 ms,
  // measured once). fib_trie and ipv6_route, read only where netlink fails, list every route.
  readProcFile: (path) => readFileSync(path, 'latin1'),
};

/**
 * Every non-loopback address this host holds as its own: getifaddrs' list, the addresses the kernel routes as local
 * and every configured IPv6 address, and the ranges routed local as CIDRs (see the header), in one spelling each
 * (shared/address.ts's, which is os.networkInterfaces()' for ordinary addresses; no zone ids; a range's network
 * address, host bits cleared), sorted.
 */
export function readHostAddresses(sources: HostAddressSources = SYSTEM_HOST_ADDRESS_SOURCES): string[] {
  const found: string[] = [];
  for (const entries of Object.values(sources.networkInterfaces())) {
    for (const entry of entries ?? []) found.push(entry.address);
  }
  let routed = false;
  if (sources.localRoutes) {
    try {
      for (const route of sources.localRoutes()) {
        // A range only from the tables every packet may be routed by (see the header); one address from any table.
        if (!ROUTED_BY_DEFAULT.has(route.table) && route.prefixLength < (route.family === 4 ? 32 : 128)) continue;
        found.push(`${route.address}/${route.prefixLength}`);
      }
      routed = true;
    } catch (error) {
      sources.onNetlinkUnavailable?.(error as Error);
    }
  }
  const files: [string, (text: string) => string[]][] = [[IF_INET6_PATH, parseIPv6Addresses]];
  if (!routed) {
    files.push(
      // (One walk of the trie for both: a /32 reads as its address in the list below.)
      [FIB_TRIE_PATH, (text) => fibTrieLocalRoutes(text).map(([leaf, length]) => `${leaf}/${length}`)],
      [IPV6_ROUTE_PATH, parseLocalIPv6Routes],
    );
  }
  for (const [path, parse] of files) {
    let text: string;
    try {
      text = sources.readProcFile(path);
    } catch (error) {
      sources.onProcUnreadable?.(path, error as Error);
      continue;
    }
    found.push(...parse(text));
  }
  const addresses = new Set<string>();
  for (const text of found) {
    if (text.includes('/')) {
      const range = localRange(text);
      if (range) addresses.add(range);
      continue;
    }
    const ip = parseIpLiteral(text);
    if (!ip) continue;
    const address = ip.text;
    // Loopback by address, not by the interface's `internal` flag: an address put on `lo` (10.1.2.3, say) is
    // still one of this host's own and must be refused like any other.
    if (address === '::1' || address.startsWith('127.')) continue;
    addresses.add(address);
  }
  return [...addresses].sort();
}

/**
 * A range in one spelling (its network address, host bits cleared, then `/LEN`; a single address as the address),
 * or null: not a CIDR, or loopback (127.0.0.0/8 and what lies in it, ::1), which the policy's class rules govern.
 */
function localRange(text: string): string | null {
  let cidr: ReturnType<typeof parseCidr>;
  try {
    cidr = parseCidr(text);
  } catch {
    return null;
  }
  const network = ipAddress(cidr.family, cidr.bytes).text;
  const single = cidr.prefixLength === (cidr.family === 4 ? 32 : 128);
  const loopback = cidr.family === 4 ? cidr.bytes[0] === 127 && cidr.prefixLength >= 8 : single && network === '::1';
  // (A default range, `/0`, is never taken: the route files do not say its table, and it is TPROXY's; see the header.)
  if (loopback || cidr.prefixLength === 0) return null;
  return single ? network : `${network}/${cidr.prefixLength}`;
}

/** What hostAddressReader tells, each at most once. */
export interface HostAddressWarnings {
  /** The first read that could not use netlink (its routes came from the /proc files). */
  readonly onNetlinkUnavailable: (error: Error) => void;
  /** The first read that could not read this /proc file. */
  readonly onProcUnreadable: (path: string, error: Error) => void;
}

/**
 * readHostAddresses() for the daemon: tells of netlink's failure once, and of each unreadable file once (the first
 * refresh that meets it), not every REFRESH_MS.
 */
export function hostAddressReader(
  warnings: HostAddressWarnings,
  system: HostAddressSources = SYSTEM_HOST_ADDRESS_SOURCES,
): () => string[] {
  const told = new Set<string>();
  const once = (key: string, tell: () => void) => {
    if (told.has(key)) return;
    told.add(key);
    tell();
  };
  const sources: HostAddressSources = {
    ...system,
    onNetlinkUnavailable: (error) => once('netlink', () => warnings.onNetlinkUnavailable(error)),
    onProcUnreadable: (path, error) => once(path, () => warnings.onProcUnreadable(path, error)),
  };
  return () => readHostAddresses(sources);
}

/**
 * The IPv4 addresses /proc/net/fib_trie routes as local, one per host route (`/32`) of type LOCAL, in every table
 * listed (Main and Local share one trie until policy routing splits them; a LOCAL route put in another table is
 * local too where a rule selects it, so it counts: refusing more, never less). The scope is not looked at: LOCAL
 * routes are scope host, and nothing is gained by relying on it.
 *
 * The format (net/ipv4/fib_trie.c, fib_trie_seq_show): a leaf is `|-- a.b.c.d`, followed by one line per route
 * for it, `/LEN SCOPE TYPE` (then ` tos=N` when set); `+-- a.b.c.d/LEN …` lines are inner nodes.
 */
export function parseLocalIPv4Addresses(fibTrie: string): string[] {
  const addresses = new Set<string>();
  for (const [leaf, length] of fibTrieLocalRoutes(fibTrie)) if (length === 32) addresses.add(leaf);
  return [...addresses];
}

/**
 * The IPv4 ranges /proc/net/fib_trie routes as local: every route of type LOCAL wider than one address
 * (`/24 host LOCAL` under the leaf `|-- 10.77.0.0`), in every table listed, as `a.b.c.d/LEN` (the leaf is the
 * network address). AnyIP, and the prefix of an address put on lo. 127.0.0.0/8 is among them, left for
 * readHostAddresses to drop. See parseLocalIPv4Addresses for the format.
 */
export function parseLocalIPv4Ranges(fibTrie: string): string[] {
  const ranges = new Set<string>();
  for (const [leaf, length] of fibTrieLocalRoutes(fibTrie)) if (length < 32) ranges.add(`${leaf}/${length}`);
  return [...ranges];
}

/** Every route of type LOCAL fib_trie lists, as [leaf, prefix length] (the format: parseLocalIPv4Addresses). */
function fibTrieLocalRoutes(fibTrie: string): Array<[string, number]> {
  const routes: Array<[string, number]> = [];
  let leaf: string | undefined;
  for (const line of fibTrie.split('\n')) {
    const leafMatch = /\|-- (\d{1,3}(?:\.\d{1,3}){3})\s*$/.exec(line);
    if (leafMatch) {
      leaf = leafMatch[1];
      continue;
    }
    const route = /^\s+\/(\d+) \S+ (\S+)/.exec(line);
    if (route) {
      if (leaf !== undefined && route[2] === 'LOCAL') routes.push([leaf, Number(route[1])]);
      continue;
    }
    // A table's name or an inner node: the next routes belong to the next leaf.
    leaf = undefined;
  }
  return routes;
}

/** RTF_LOCAL (include/uapi/linux/ipv6_route.h): a route to this host. */
const RTF_LOCAL = 0x8000_0000;

/**
 * The IPv6 routes /proc/net/ipv6_route marks local (RTF_LOCAL), in every table: a `/128` as its address (the
 * host's own addresses are among them, and an address routed local without being configured), a wider one as
 * `addr/LEN` (AnyIP: `ip -6 route add local 2001:db8:77::/64 dev lo`). One line per route (net/ipv6/route.c,
 * ipv6_route_native_seq_show): in hex, the destination (32 digits, no colons) and its prefix length, the source and
 * its length, the next hop, then metric, reference count, use count and flags (8 digits each), then the device.
 * Anycast routes (RTF_ANYCAST, no RTF_LOCAL) are left out: TCP drops a SYN to one (a connect() to the subnet-router
 * anycast address of a forwarding host timed out).
 */
export function parseLocalIPv6Routes(ipv6Route: string): string[] {
  const routes: string[] = [];
  for (const line of ipv6Route.split('\n')) {
    const fields = line.trim().split(/\s+/);
    const [destination, length, , , , , , , flags] = fields;
    if (fields.length < 10 || !/^[0-9a-f]{32}$/i.test(destination!) || !/^[0-9a-f]{2}$/i.test(length!)) continue;
    if (!/^[0-9a-f]{8}$/i.test(flags!) || (Number.parseInt(flags!, 16) & RTF_LOCAL) === 0) continue;
    const prefixLength = Number.parseInt(length!, 16);
    if (prefixLength > 128) continue;
    const address = ipAddress(
      6,
      Uint8Array.from(destination!.match(/../g)!, (byte) => Number.parseInt(byte, 16)),
    ).text;
    routes.push(prefixLength === 128 ? address : `${address}/${prefixLength}`);
  }
  return routes;
}

/**
 * Every address /proc/net/if_inet6 lists, in shared/address.ts's spelling. One line per address (net/ipv6/addrconf.c,
 * if6_seq_show): 32 hex digits (the address, no colons), then in hex the interface index, prefix length, scope and
 * flags, then the interface's name. Flags are ignored: a tentative address, or one on a down interface, is one the
 * kernel may hold as local by the next refresh (see the header).
 */
export function parseIPv6Addresses(ifInet6: string): string[] {
  const addresses: string[] = [];
  for (const line of ifInet6.split('\n')) {
    const hex = line.trim().split(/\s+/)[0] ?? '';
    if (!/^[0-9a-f]{32}$/i.test(hex)) continue;
    addresses.push(
      ipAddress(
        6,
        Uint8Array.from(hex.match(/../g)!, (byte) => Number.parseInt(byte, 16)),
      ).text,
    );
  }
  return addresses;
}

/**
 * A cached view of readHostAddresses(): the same array instance until the set of addresses changes.
 *
 * The first read happens here, so a daemon that cannot list its interfaces (a sandbox without AF_NETLINK, which
 * getifaddrs needs) fails at start with SOCKPOOL_ERR_CONFIG instead of running with a host-address class it cannot
 * enforce. A later refresh that fails keeps the last list (interfaces rarely vanish between two reads) and tells
 * onRefreshError, so one failed read never crashes the connect path. (An unreadable /proc file is no failure: see
 * HostAddressSources.onProcUnreadable.)
 */
export function hostAddressesProvider(
  read: () => string[] = readHostAddresses,
  refreshMs = REFRESH_MS,
  onRefreshError: (error: Error) => void = () => {},
): () => readonly string[] {
  let current: string[];
  try {
    current = read();
  } catch (error) {
    throw new SockpoolError(
      'SOCKPOOL_ERR_CONFIG',
      `cannot list this host's interface addresses for the egress policy (${(error as Error).message}); ` +
        'a systemd unit must allow AF_NETLINK in RestrictAddressFamilies=',
      {},
      { cause: error },
    );
  }
  let readAt = performance.now();
  return () => {
    const now = performance.now();
    if (now - readAt < refreshMs) return current;
    readAt = now;
    let fresh: string[];
    try {
      fresh = read();
    } catch (error) {
      onRefreshError(error as Error);
      return current;
    }
    if (fresh.length !== current.length || fresh.some((address, index) => address !== current[index])) {
      current = fresh;
    }
    return current;
  };
}
