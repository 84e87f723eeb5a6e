// What a process's fds are, for the message of a failed fd count: a count that is one off says nothing about which
// fd stayed; the census names each (a TCP socket by its ports and state, a Unix socket by its path or peer, a pipe,
// an eventfd), so the diff of two censuses points at the owner that forgot to close one.

import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

const TCP_STATES = ['', 'ESTABLISHED', 'SYN_SENT', 'SYN_RECV', 'FIN_WAIT1', 'FIN_WAIT2', 'TIME_WAIT', 'CLOSE'];
TCP_STATES.push('CLOSE_WAIT', 'LAST_ACK', 'LISTEN', 'CLOSING');

/** inode → what the socket is, from the kernel's tables as `pid` sees them (its network namespace). */
function socketNames(pid: number | 'self'): Map<string, string> {
  const names = new Map<string, string>();
  const port = (address: string) => Number.parseInt(address.split(':')[1] ?? '0', 16);
  for (const table of ['tcp', 'tcp6']) {
    let text = '';
    try {
      text = readFileSync(`/proc/${pid}/net/${table}`, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields.length < 10) continue;
      const state = TCP_STATES[Number.parseInt(fields[3]!, 16)] ?? fields[3];
      names.set(fields[9]!, `${table} :${port(fields[1]!)}→:${port(fields[2]!)} ${state}`);
    }
  }
  try {
    for (const line of readFileSync(`/proc/${pid}/net/unix`, 'utf8').split('\n').slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields.length < 7) continue;
      const type = { '0001': 'stream', '0002': 'dgram', '0005': 'seqpacket' }[fields[4]!] ?? fields[4];
      names.set(fields[6]!, `unix ${type}${fields[7] ? ` ${fields[7]}` : ''}`);
    }
  } catch {}
  return names;
}

/** Each open fd of `pid` and what it is. */
export function fdCensus(pid: number | 'self' = 'self'): Map<number, string> {
  const census = new Map<number, string>();
  const sockets = socketNames(pid);
  for (const entry of readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${entry}`);
    } catch {
      continue; // closed while being read (the directory's own fd among them)
    }
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    census.set(Number(entry), inode ? `${target} ${sockets.get(inode) ?? '(not in tcp/unix tables)'}` : target);
  }
  return census;
}

const CLOSING = /^tcp6? \S+ (FIN_WAIT1|FIN_WAIT2|TIME_WAIT|CLOSE|CLOSE_WAIT|LAST_ACK|CLOSING)$/;

/**
 * The fds of a census that are dead connections: sockets out of the kernel's TCP and Unix tables (a TCP connection
 * closed both ways leaves them while an fd still holds it) or TCP sockets closing. What a `reclaim` leaves in curl's
 * cache: the socket shut down, its lease ended, the fd curl's until it looks at its cache again.
 */
export function deadSockets(census: Map<number, string>): string[] {
  const dead: string[] = [];
  for (const what of census.values()) {
    const name = what.replace(/^socket:\[\d+\] /, '');
    if (what.startsWith('socket:') && (name === '(not in tcp/unix tables)' || CLOSING.test(name))) dead.push(what);
  }
  return dead;
}

/** The fds opened and closed between two censuses, one per line ("+ 42 socket:[…] tcp :5000→:40000 ESTABLISHED"). */
export function censusChange(before: Map<number, string>, after: Map<number, string>): string {
  const lines: string[] = [];
  for (const [fd, what] of after) if (before.get(fd) !== what) lines.push(`+ ${fd} ${what}`);
  for (const [fd, what] of before) if (after.get(fd) !== what) lines.push(`- ${fd} ${what}`);
  return lines.length > 0 ? lines.join('\n') : '(the same fds)';
}
