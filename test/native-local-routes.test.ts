// native.localRoutes(): the kernel's routes of type LOCAL through an rtnetlink dump, checked against what iproute2
// says of this machine's own network namespace (`ip -j route show ...`; no route is added or removed here: the
// system tier's test/host-addresses.system.test.ts does that in a namespace of its own).
import { execFileSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';

interface IpRoute {
  type?: string;
  dst: string;
  table?: string;
}

/** `ip -j -4|-6 route show ARGS`'s LOCAL routes as `family address/len`, sorted. */
function ipLocalRoutes(family: 4 | 6, ...args: string[]): string[] {
  const routes = JSON.parse(execFileSync('ip', ['-j', `-${family}`, 'route', 'show', ...args], { encoding: 'utf8' }));
  return (routes as IpRoute[])
    .filter((route) => route.type === 'local')
    .map((route) => {
      const dst = route.dst === 'default' ? (family === 4 ? '0.0.0.0/0' : '::/0') : route.dst;
      return `${family} ${dst.includes('/') ? dst : `${dst}/${family === 4 ? 32 : 128}`}`;
    })
    .sort();
}

const text = (routes: native.LocalRoute[]) =>
  routes.map((route) => `${route.family} ${route.address}/${route.prefixLength}`).sort();

const openFds = () => readdirSync('/proc/self/fd').length;

describe('native.localRoutes', () => {
  it('the local table: every route of type local `ip -j route show table local` lists, both families, and only those: the kernel filtered the dump', () => {
    const { routes, received } = native.localRoutes(255);
    expect(text(routes)).toEqual([...ipLocalRoutes(4, 'table', 'local'), ...ipLocalRoutes(6, 'table', 'local')].sort());
    // 127.0.0.1 and ::1 at least (lo is up on any machine that runs these tests).
    expect(text(routes)).toEqual(expect.arrayContaining(['4 127.0.0.1/32', '4 127.0.0.0/8', '6 ::1/128']));
    expect(routes.every((route) => route.table === 255)).toBe(true);
    // The local table's other routes (broadcast, IPv6 anycast and multicast) were not sent: the kernel filtered.
    expect(received).toBe(routes.length);
  });

  it('every table (the default): the routes of type local of `ip -j route show table all`', () => {
    const { routes, received } = native.localRoutes();
    expect(text(routes)).toEqual([...ipLocalRoutes(4, 'table', 'all'), ...ipLocalRoutes(6, 'table', 'all')].sort());
    expect(received).toBe(routes.length);
    // The main table alone: its local routes only (none on most machines), not the other routes it holds.
    expect(native.localRoutes(254).routes).toEqual(routes.filter((route) => route.table === 254));
  });

  it('closes its netlink socket, answering or throwing; a table the kernel does not have is its ENOENT', () => {
    const before = openFds();
    for (let i = 0; i < 20; i++) native.localRoutes();
    expect(openFds()).toBe(before);
    // IPv4 answers a dump of a table it does not have with ENOENT (inet_dump_fib); 4,000,000,000 is nobody's.
    let thrown: unknown;
    try {
      native.localRoutes(4_000_000_000);
    } catch (error) {
      thrown = error;
    }
    expect(native.isNativeError(thrown) && { code: thrown.code, syscall: thrown.syscall }).toEqual({
      code: 'ENOENT',
      syscall: 'recvmsg',
    });
    expect(openFds()).toBe(before);
    expect(() => native.localRoutes(-1)).toThrow(expect.objectContaining({ code: 'ERR_OUT_OF_RANGE' }));
  });
});
