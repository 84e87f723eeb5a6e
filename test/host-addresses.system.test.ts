// The host-address refusal against the kernel's own idea of local, not only libuv's: os.networkInterfaces() leaves
// out every interface that is not up and running, yet connect() to an address on one without carrier, or (IPv4) on
// one administratively down, reaches this host's listeners (daemon/host-addresses.ts). The interfaces are made in a
// network namespace of the test's own (`unshare -n`, root: the system tier), in a child process
// (test/fixtures/host-addresses-netns.ts), so nothing is added to, or leaves, this machine's network.
import { spawnSync } from 'node:child_process';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const repo = resolve(__dirname, '..');

describe("the host's own addresses the kernel holds local on interfaces that are not up and running", () => {
  it('refuses them by default, allow covering them or not, in both families: connect() to them reaches this host', () => {
    const run = spawnSync(
      'unshare',
      [
        '-n',
        process.execPath,
        '--import',
        join(repo, 'test/fixtures/register-ts.mjs'),
        join(repo, 'test/fixtures/host-addresses-netns.ts'),
      ],
      { encoding: 'utf8' },
    );
    expect(run.status, run.stderr).toBe(0);
    const { listed, addresses } = JSON.parse(run.stdout.trim().split('\n').at(-1)!);
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
