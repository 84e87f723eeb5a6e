// The host-address refusal against the kernel's own idea of local, not only libuv's: os.networkInterfaces() leaves
// out every interface that is not up and running, yet connect() to an address on one without carrier, or (IPv4) on
// one administratively down, reaches this host's listeners (daemon/host-addresses.ts). The interfaces are made in a
// network namespace of the test's own (`unshare -n`, root: the system tier), in a child process
// (test/fixtures/host-addresses-netns.ts), so nothing is added to, or leaves, this machine's network.
import { spawnSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const repo = resolve(__dirname, '..');

/** The fixture's scenario in a network namespace of its own: what it prints. */
function inNamespace(scenario: 'interfaces' | 'anyip'): {
  listed: string[];
  addresses: Record<string, { policy: string; policyWithoutRule: string; reachesThisHost: boolean }>;
} {
  const run = spawnSync(
    'unshare',
    [
      '-n',
      process.execPath,
      '--import',
      join(repo, 'test/fixtures/register-ts.mjs'),
      join(repo, 'test/fixtures/host-addresses-netns.ts'),
      scenario,
    ],
    { encoding: 'utf8' },
  );
  expect(run.status, run.stderr).toBe(0);
  return JSON.parse(run.stdout.trim().split('\n').at(-1)!);
}

describe("the host's own addresses the kernel holds local on interfaces that are not up and running", () => {
  it('refuses them by default, allow covering them or not, in both families: connect() to them reaches this host', () => {
    const { listed, addresses } = inNamespace('interfaces');
    // libuv lists none of them: what the kernel says is the only source here.
    expect(listed.sort()).toEqual(['127.0.0.1', '::1']);
    // policyWithoutRule (allowHostAddresses) shows no other rule refuses them: only the host-address rule does.
    const local = { policy: 'host-address', policyWithoutRule: 'allowed', reachesThisHost: true };
    expect(addresses).toEqual({
      '45.33.32.1': local, // up, no carrier
      '10.99.0.1': local, // the same, inside allow's 10.0.0.0/8
      '2600:3c01::1': local, // the same, IPv6
      '45.33.33.1': local, // administratively down: IPv4 keeps its local route
      // Down, IPv6: not local while down (tentative), refused for when it comes up (see the fixture).
      '2600:3c01:1::1': { ...local, reachesThisHost: false },
    });
  });
});

describe('ranges the kernel routes to this host (local routes wider than one address)', () => {
  it('refuses every address inside them by default, allow covering them or not, in both families: connect() to one reaches this host', () => {
    const { addresses } = inNamespace('anyip');
    const local = { policy: 'host-address', policyWithoutRule: 'allowed', reachesThisHost: true };
    expect(addresses).toEqual({
      '45.33.40.7': local, // ip route add local 45.33.40.0/24 dev lo
      '10.77.0.9': local, // the same inside allow's 10.0.0.0/8
      '2600:3c01:77::9': local, // ip -6 route add local 2600:3c01:77::/64 dev lo
      '45.33.41.9': local, // a neighbour of 45.33.41.1/24, put on lo
    });
  });
});

describe("a large routing table (20,000 routes of each family in the main table, a Kubernetes node's order)", () => {
  it("takes the LOCAL routes from the kernel's filtered netlink dump, which sends none of the others: the list the route files give, fib_trie and ipv6_route unread", () => {
    const run = spawnSync(
      'unshare',
      [
        '-n',
        process.execPath,
        '--import',
        join(repo, 'test/fixtures/register-ts.mjs'),
        join(repo, 'test/fixtures/host-addresses-many-routes.ts'),
        '20000',
      ],
      { encoding: 'utf8' },
    );
    expect(run.status, run.stderr).toBe(0);
    const found = JSON.parse(run.stdout.trim().split('\n').at(-1)!);
    // The table is there: 20,000 routes and the namespace's own, which fib_trie and ipv6_route list line by line.
    expect(found.mainRoutes[4]).toBeGreaterThan(20_000);
    expect(found.mainRoutes[6]).toBeGreaterThan(20_000);
    expect(found.fileBytes['/proc/net/fib_trie']).toBeGreaterThan(1_000_000);
    expect(found.fileBytes['/proc/net/ipv6_route']).toBeGreaterThan(1_000_000);
    // What the daemon reads: if_inet6 only (one line per configured address); before, all three files.
    expect(found.read).toEqual(['/proc/net/if_inet6']);
    // The kernel sent its LOCAL routes only (the namespace's addresses, loopback's, the ranges): a few messages.
    expect(found.dump.received).toBe(found.dump.routes);
    expect(found.dump.received).toBeLessThan(50);
    // The list the route files give, link-local addresses (random) included, but the ranges of table 100: only the
    // traffic a rule sends there would find them local (the files name no table, and take them).
    const otherTable = ['2600:3c01:78::/64', '45.33.43.0/24'];
    expect(found.addresses).toEqual(found.viaFiles.filter((address: string) => !otherTable.includes(address)));
    expect(found.addresses.filter((address: string) => !address.startsWith('fe80:'))).toEqual([
      '10.200.0.1',
      '2001:db8:200::1',
      '2600:3c01:1::1', // on w0, down: tentative, from if_inet6
      '2600:3c01:77::/64', // ip -6 route add local … dev lo
      '2600:3c01::1', // on v0, up without carrier
      '45.33.32.1', // on v0
      '45.33.33.1', // on w0, down: IPv4 keeps its local route
      '45.33.40.0/24', // ip route add local … dev lo (the local table)
      '45.33.42.0/24', // the same in the main table
      '45.33.44.9', // one address routed local in table 100
    ]);
    // TPROXY's `local default` in table 100 made every address this host's own, from either source.
    expect(found.viaFiles.filter((address: string) => address.endsWith('/0'))).toEqual([]);
  });
});
