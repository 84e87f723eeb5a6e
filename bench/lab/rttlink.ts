// The latency lab of the peers benchmark: `../shared/tools/rttlink` gives namespace `far` a real round-trip time
// (a userspace delay line between two TUN devices). Every address in 198.18.0.0/16 is local inside `far`, so
// each origin can be a host of its own; the client side is 198.19.0.1 in the root namespace.
//
// Nothing here sends a packet. Before the benchmark sends any, `verifyRoute` checks that the kernel routes the
// lab's addresses into the delay line (and nowhere else). `down` keeps rttlink's guard route (198.18.0.0/15
// unreachable), so lab traffic can never fall through to the default route.
import { spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { repoRoot } from '../lib/daemon.js';

export const LAB_NAMESPACE = 'far';
/** Where origin hosts live (inside the namespace) and the client address (root namespace). */
export const LAB_HOSTS_PREFIX = '198.18.0.';
export const LAB_CLIENT_ADDRESS = '198.19.0.1';
export const LAB_ALLOW_CIDR = '198.18.0.0/16';
/** The device rttlink creates on the root side for namespace `far`. */
const LAB_DEVICE = `rtl${LAB_NAMESPACE.slice(0, 8)}0`;

export const rttlinkPath = join(repoRoot, '..', 'shared', 'tools', 'rttlink');

/** Why the lab cannot run here, or undefined when it can. */
export function labUnavailable(): string | undefined {
  if (!existsSync(rttlinkPath)) return `${rttlinkPath} not found (../shared is not beside this checkout)`;
  if (process.getuid?.() !== 0) return 'rttlink needs root';
  try {
    accessSync('/dev/net/tun', constants.R_OK | constants.W_OK);
  } catch {
    return '/dev/net/tun is not usable';
  }
  if (spawnSync('ip', ['-V']).status !== 0) return 'the ip command (iproute2) is missing';
  return undefined;
}

function rttlink(args: string[]): { status: number; out: string } {
  const result = spawnSync(rttlinkPath, args, { encoding: 'utf8' });
  return { status: result.status ?? -1, out: `${result.stdout ?? ''}${result.stderr ?? ''}`.trim() };
}

export function labIsUp(): boolean {
  return existsSync(`/run/netns/${LAB_NAMESPACE}`);
}

/**
 * Starts the delay line (rttlink forks into the background once the namespace and routes exist). Refuses when the
 * namespace exists already: it may be someone else's lab, and only one lab fits the routes at a time.
 */
export async function labUp(rttMs: number): Promise<void> {
  if (labIsUp()) {
    throw new Error(`namespace ${LAB_NAMESPACE} exists already (another lab is running?); not touching it`);
  }
  const result = rttlink(['up', '--rtt-ms', String(rttMs), '--daemon']);
  if (result.status !== 0) throw new Error(`rttlink up failed: ${result.out}`);
  const deadline = performance.now() + 5_000;
  while (!existsSync(`/run/rttlink-${LAB_NAMESPACE}.pid`)) {
    if (performance.now() > deadline) throw new Error('rttlink up: the delay line did not start');
    await sleep(20);
  }
  verifyRoute();
}

/** Stops the delay line and removes the namespace; rttlink leaves its guard route in place. */
export function labDown(): void {
  const result = rttlink(['down']);
  if (result.status !== 0 && labIsUp()) throw new Error(`rttlink down failed: ${result.out}`);
}

/** Throws unless the lab's host range is routed into the delay line, from the lab's client address. */
export function verifyRoute(): void {
  for (const address of [`${LAB_HOSTS_PREFIX}1`, `${LAB_HOSTS_PREFIX}254`]) {
    const result = spawnSync('ip', ['-o', 'route', 'get', address], { encoding: 'utf8' });
    const line = result.stdout ?? '';
    if (result.status !== 0 || !line.includes(`dev ${LAB_DEVICE}`) || !line.includes(`src ${LAB_CLIENT_ADDRESS}`)) {
      throw new Error(`the route to ${address} does not go through ${LAB_DEVICE}: ${line.trim() || result.stderr}`);
    }
  }
}

/** Argv prefix that runs a command inside the lab namespace. */
export function inLab(): string[] {
  return ['ip', 'netns', 'exec', LAB_NAMESPACE];
}
