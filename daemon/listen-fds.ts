// sd_listen_fds(3) with names, in TypeScript: the fds systemd passed to this process (socket activation, and the fd
// store handing idle sockets back after a restart), then sorted into the handoff listener and stored origin sockets.
//
// Semantics follow sd_listen_fds_with_names(unset_environment=1): the fds are 3 .. 3+LISTEN_FDS-1 and are ours only
// when LISTEN_PID is this process; LISTEN_FDNAMES holds one colon-separated name per fd (all "unknown" when unset);
// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from the environment either way, so children never believe
// the fds are theirs. Unlike the C function this cannot set FD_CLOEXEC (no fcntl in Node): the fds stay inheritable,
// so the daemon must not spawn children (it does not), or must close these fds in them.
//
// Ownership: every fd returned belongs to the caller from here on; `classifyListenFds` only sorts them, and the
// caller must close every fd it does not keep (`other`, and origin sockets that fail their probe).

import { fstatSync, readFileSync } from 'node:fs';
import process from 'node:process';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { decodeFdName, type StoredOrigin } from './sd-notify.js';

/** SD_LISTEN_FDS_START: systemd passes fds from 3 up. */
export const LISTEN_FDS_START = 3;

/** The name the .socket unit gives the handoff socket (FileDescriptorName=sockpoold). */
export const LISTENER_FD_NAME = 'sockpoold';

export interface ListenFd {
  fd: number;
  name: string;
}

export interface ListenFdsOptions {
  /** Default: process.env (and it is the one whose LISTEN_* variables are removed). */
  env?: NodeJS.ProcessEnv;
  /** Default: process.pid. */
  pid?: number;
  /** Remove LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES from `env` afterwards. Default true. */
  unsetEnvironment?: boolean;
}

/**
 * The fds systemd passed, with their names. Empty when not socket-activated or when LISTEN_PID names another
 * process. Throws SOCKPOOL_ERR_CONFIG when the variables are malformed (sd_listen_fds answers -EINVAL).
 */
export function listenFds(options: ListenFdsOptions = {}): ListenFd[] {
  const env = options.env ?? process.env;
  const pid = options.pid ?? process.pid;
  try {
    const pidText = env.LISTEN_PID;
    if (pidText === undefined) return [];
    if (!/^\d+$/.test(pidText)) throw new SockpoolError(ErrorCodes.CONFIG, `LISTEN_PID is not a pid: ${pidText}`);
    if (Number(pidText) !== pid) return [];
    const countText = env.LISTEN_FDS ?? '';
    if (!/^\d+$/.test(countText)) throw new SockpoolError(ErrorCodes.CONFIG, `LISTEN_FDS is not a count: ${countText}`);
    const count = Number(countText);
    if (count === 0) return [];
    const namesText = env.LISTEN_FDNAMES;
    // strv_split with EXTRACT_DONT_COALESCE_SEPARATORS: "a::b" is three names, the middle one empty.
    const names = namesText === undefined || namesText === '' ? [] : namesText.split(':');
    if (names.length > 0 && names.length !== count) {
      throw new SockpoolError(
        ErrorCodes.CONFIG,
        `LISTEN_FDNAMES has ${names.length} names for LISTEN_FDS=${count} fds: ${JSON.stringify(namesText)}`,
      );
    }
    const result: ListenFd[] = [];
    for (let index = 0; index < count; index++) {
      result.push({ fd: LISTEN_FDS_START + index, name: names[index] ?? 'unknown' });
    }
    return result;
  } finally {
    if (options.unsetEnvironment !== false) {
      delete env.LISTEN_PID;
      delete env.LISTEN_FDS;
      delete env.LISTEN_FDNAMES;
    }
  }
}

export interface UnixSocketInfo {
  /** SOCK_STREAM=1, SOCK_DGRAM=2, SOCK_SEQPACKET=5. */
  type: number;
  listening: boolean;
  path: string;
}

const SOCK_SEQPACKET = 5;
const SO_ACCEPTCON_FLAG = 0x10000;

/**
 * What the kernel says about an AF_UNIX socket fd, from /proc/net/unix matched by inode. null when the fd is not an
 * AF_UNIX socket of this network namespace, or /proc/net is hidden (ProcSubset=pid) — then names are all we have.
 */
export function unixSocketInfo(fd: number): UnixSocketInfo | null {
  let inode: number;
  try {
    const stat = fstatSync(fd);
    if (!stat.isSocket()) return null;
    inode = stat.ino;
  } catch {
    return null;
  }
  let table: string;
  try {
    table = readFileSync('/proc/net/unix', 'latin1');
  } catch {
    return null;
  }
  // Num RefCount Protocol Flags Type St Inode [Path]
  for (const line of table.split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length < 7 || Number(fields[6]) !== inode) continue;
    const flags = Number.parseInt(fields[3] ?? '0', 16);
    return {
      type: Number.parseInt(fields[4] ?? '0', 16),
      listening: (flags & SO_ACCEPTCON_FLAG) !== 0,
      path: fields.slice(7).join(' '),
    };
  }
  return null;
}

function isListeningSeqpacket(fd: number): boolean | null {
  const info = unixSocketInfo(fd);
  if (info === null) return null;
  return info.type === SOCK_SEQPACKET && info.listening;
}

export interface StoredOriginFd extends ListenFd {
  origin: StoredOrigin;
}

export interface ClassifiedListenFds {
  /** The handoff socket (listening SOCK_SEQPACKET), or null: then the daemon binds its own. */
  listener: ListenFd | null;
  /** Idle origin sockets back from the fd store. Probe each before use; systemd may hold half-closed ones. */
  origins: StoredOriginFd[];
  /** Anything else (unknown names, a second listener). The caller owns these and should close them. */
  other: ListenFd[];
}

/**
 * Sorts passed fds: the fd named `listenerName` (FileDescriptorName= in the .socket unit) is the listener; failing
 * that, the first fd the kernel reports as a listening SOCK_SEQPACKET socket. Names made by encodeFdName() are
 * stored origin sockets. Throws SOCKPOOL_ERR_CONFIG when the fd named as the listener is visibly something else.
 */
export function classifyListenFds(
  fds: readonly ListenFd[],
  options: { listenerName?: string } = {},
): ClassifiedListenFds {
  const listenerName = options.listenerName ?? LISTENER_FD_NAME;
  const result: ClassifiedListenFds = { listener: null, origins: [], other: [] };
  const unnamed: ListenFd[] = [];
  for (const entry of fds) {
    if (entry.name === listenerName && result.listener === null) {
      if (isListeningSeqpacket(entry.fd) === false) {
        throw new SockpoolError(
          ErrorCodes.CONFIG,
          `fd ${entry.fd} named ${listenerName} is not a listening SOCK_SEQPACKET socket: use ListenSequentialPacket= in the .socket unit`,
        );
      }
      result.listener = entry;
      continue;
    }
    const origin = decodeFdName(entry.name);
    if (origin !== null) {
      result.origins.push({ ...entry, origin });
    } else {
      unnamed.push(entry);
    }
  }
  for (const entry of unnamed) {
    if (result.listener === null && isListeningSeqpacket(entry.fd) === true) {
      result.listener = entry;
    } else {
      result.other.push(entry);
    }
  }
  return result;
}
