// Global setup of the system tier (`npm run test:system`, files `*.system.test.ts`): these tests need root and
// kernel features a normal user or a container may not have. Rather than fail one by one (or, worse, skip), the
// tier checks everything first and stops with one message naming all that is missing.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';

/** [command, the Debian package that brings it] */
const COMMANDS: Array<[string, string]> = [
  ['ip', 'iproute2'],
  ['unshare', 'util-linux'],
  ['setpriv', 'util-linux'],
  ['systemd-nspawn', 'systemd-container'],
  ['debootstrap', 'debootstrap'],
  ['redis-server', 'redis-server'],
  ['redis-cli', 'redis-tools'],
  ['nginx', 'nginx'],
  // test/store-close-slow-disk: holds the fixture's syncs (ptrace: root, or a container that allows it).
  ['strace', 'strace'],
];

function has(command: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function works(argv: string[]): boolean {
  try {
    execFileSync(argv[0]!, argv.slice(1), { stdio: 'ignore', timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

/** What the machine lacks for the system tier; empty when it can run. */
export function missingForSystemTier(): string[] {
  const missing: string[] = [];
  const uid = process.getuid?.();
  if (uid !== 0) missing.push(`root (running as uid ${uid}): run \`npm run test:system\` as root`);
  for (const [command, pkg] of COMMANDS) if (!has(command)) missing.push(`${command} (Debian package ${pkg})`);
  if (uid === 0 && has('unshare') && !works(['unshare', '-n', 'true'])) {
    missing.push('network namespaces (`unshare -n true` fails: a container without CAP_SYS_ADMIN?)');
  }
  if (uid === 0 && has('ip') && !works(['ip', 'netns', 'list'])) missing.push('`ip netns` (iproute2 with netns)');
  // test/daemon-fuse-fd: a FUSE mount served by the test's own client (mount(2) as root; no fusermount needed).
  if (!existsSync('/dev/fuse')) missing.push("/dev/fuse (the kernel's FUSE module: `modprobe fuse`)");
  return missing;
}

export default function setup(): void {
  const missing = missingForSystemTier();
  if (missing.length > 0) {
    throw new Error(`the system test tier cannot run on this machine; it lacks:\n  - ${missing.join('\n  - ')}`);
  }
}
