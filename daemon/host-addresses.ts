// The addresses of this host's own interfaces, for the egress policy: a client must not reach services bound on the
// host's public (or private) address through the daemon, the way it cannot reach 127.0.0.1. Loopback addresses are
// left out here: the policy's loopback class governs them, and tests and operators open 127.0.0.1 explicitly.
//
// Interfaces come and go (DHCP, VPNs, containers): the list is read again when it is older than REFRESH_MS, on the
// connect path, never on the handoff path. The same array is returned while nothing changed, so the policy can keep
// what it derived from it.

import { networkInterfaces } from 'node:os';
import { SockpoolError } from '../shared/errors.js';

const REFRESH_MS = 5_000;

/** Every non-loopback address of every interface, as os.networkInterfaces() spells it (no zone ids). */
export function readHostAddresses(): string[] {
  const addresses = new Set<string>();
  for (const entries of Object.values(networkInterfaces())) {
    for (const entry of entries ?? []) {
      const address = entry.address.toLowerCase();
      // Loopback by address, not by the interface's `internal` flag: an address put on `lo` (10.1.2.3, say) is
      // still one of this host's own and must be refused like any other.
      if (address === '::1' || address.startsWith('127.')) continue;
      addresses.add(address);
    }
  }
  return [...addresses].sort();
}

/**
 * A cached view of readHostAddresses(): the same array instance until the set of addresses changes.
 *
 * The first read happens here, so a daemon that cannot list its interfaces (a sandbox without AF_NETLINK, which
 * getifaddrs needs) fails at start with SOCKPOOL_ERR_CONFIG instead of running with a host-address class it cannot
 * enforce. A later refresh that fails keeps the last list (interfaces rarely vanish between two reads) and tells
 * onRefreshError, so one failed read never crashes the connect path.
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
