#!/usr/bin/env node
// The tests need a few system tools besides Node. `npm test` (the unit tier): openssl (test CAs), curl (the CLI
// peer), systemd (systemd-analyze, systemd-socket-activate), patch, util-linux (setpriv: the tests' children die with
// their test process, test/helpers/children.ts). `npm run test:system` (argument `system`) also:
// iproute2 (network namespaces), util-linux (unshare), systemd-container and debootstrap (the systemd
// lab), redis-server and redis-tools (the fleet's shared state), nginx (a real origin behind warm TLS sessions), strace
// (a disk whose syncs stall, for the state store's close). On a
// fresh Debian machine, as root, this installs the missing ones with apt-get; otherwise it names the
// packages and fails.

import './require-npm.mjs'; // first: an npm too old stops here, before anything is built or installed
import { execFileSync } from 'node:child_process';

const unitTier = [
  // node-gyp's builds of the native parts, and the tests' fixtures written in Python.
  ['python3', 'python3'],
  ['openssl', 'openssl'],
  ['curl', 'curl'],
  ['systemd-analyze', 'systemd'],
  ['systemd-socket-activate', 'systemd'],
  ['patch', 'patch'],
  ['setpriv', 'util-linux'],
];
const systemTier = [
  ['ip', 'iproute2'],
  ['systemd-nspawn', 'systemd-container'],
  ['debootstrap', 'debootstrap'],
  ['unshare', 'util-linux'],
  ['redis-server', 'redis-server'],
  ['redis-cli', 'redis-tools'],
  ['nginx', 'nginx'],
  ['strace', 'strace'],
];
const tier = process.argv[2] ?? 'unit';
const needs = tier === 'system' ? [...unitTier, ...systemTier] : unitTier;

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
console.error(
  `ensure-test-tools: missing system packages: ${missing.join(' ')} (install them, then run the tests again)`,
);
process.exit(1);
