#!/usr/bin/env node
// `npm test` needs a few system tools besides Node: openssl (test CAs), iproute2 (network namespaces), curl (the
// CLI peer), systemd (systemd-analyze, systemd-socket-activate), systemd-container and debootstrap (the real
// systemd test). On a fresh Debian machine, as root, this installs the missing ones with apt-get; otherwise it
// names the packages and fails.

import { execFileSync } from 'node:child_process';

const needs = [
  ['openssl', 'openssl'],
  ['ip', 'iproute2'],
  ['curl', 'curl'],
  ['systemd-analyze', 'systemd'],
  ['systemd-socket-activate', 'systemd'],
  ['systemd-nspawn', 'systemd-container'],
  ['debootstrap', 'debootstrap'],
  ['unshare', 'util-linux'],
  ['patch', 'patch'],
];

function has(command) {
  try {
    execFileSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

const missing = [...new Set(needs.filter(([command]) => !has(command)).map(([, pkg]) => pkg))];
if (missing.length === 0) process.exit(0);
if (process.getuid?.() === 0 && has('apt-get')) {
  console.log(`ensure-test-tools: installing ${missing.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const install = () =>
    execFileSync('apt-get', ['install', '-y', '--no-install-recommends', ...missing], { stdio: 'inherit', env });
  try {
    install();
  } catch {
    execFileSync('apt-get', ['update'], { stdio: 'inherit', env });
    install();
  }
  process.exit(0);
}
console.error(`ensure-test-tools: missing system packages: ${missing.join(' ')} (install them, then npm test)`);
process.exit(1);
