// Shared by the trust tests (daemon-trust*.test.ts, daemon-connect-guard.system): an HTTP origin that answers with
// the request's own path, a daemon every uid may reach, one honest request over a leased socket with the raw
// protocol, and the hostile client fixture as a process.
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import * as native from '../../shared/native.js';
import { type DaemonProcess, repoRoot, startDaemon, writeConfigFile } from './daemon.js';
import type { RawClient } from './raw-client.js';

const run = promisify(execFile);
export const hostileClient = join(repoRoot, 'test', 'fixtures', 'hostile-client.mjs');

/**
 * A daemon that lets 127.0.0.1:`port` through and whose socket every uid may open (mode 0666 in a directory every uid
 * may enter): for clients run as other uids. Stopped by `cleanups`. `wrap` prefixes its command (startDaemon).
 */
export async function startSharedDaemon(
  port: number,
  config: { access?: object; quotas?: object; pool?: object },
  cleanups: Array<() => unknown>,
  wrap?: string[],
): Promise<DaemonProcess> {
  const args = ['--allow', '127.0.0.1/32', '--allow-port', String(port)];
  const file = writeConfigFile({ ...config, access: { ...config.access, socketMode: '0666' } }, cleanups);
  const started = await startDaemon({ args: [...args, '--config', file], ...(wrap ? { wrap } : {}) });
  chmodSync(dirname(started.socketPath), 0o755);
  cleanups.push(() => started.stop());
  return started;
}

/** An HTTP/1.1 origin whose answer is the request's own path, and that counts the requests it saw per path. */
export async function pathOrigin(cleanups: Array<() => unknown>): Promise<{ port: number; seen: Map<string, number> }> {
  const seen = new Map<string, number>();
  const server = http.createServer((request, response) => {
    seen.set(request.url!, (seen.get(request.url!) ?? 0) + 1);
    response.setHeader('content-type', 'text/plain');
    response.end(request.url);
  });
  server.keepAliveTimeout = 60_000;
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  cleanups.push(async () => {
    server.closeAllConnections();
    server.close();
  });
  return { port: (server.address() as AddressInfo).port, seen };
}

/** Runs a hostile client process (as `uid` when given) to its end and returns what it printed. */
export async function runHostile(
  args: Array<string | number>,
  uid?: number,
): Promise<Record<string, number> & { inodes?: number[] }> {
  const { stdout } = await run(process.execPath, [hostileClient, ...args.map(String)], {
    timeout: 60_000,
    ...(uid === undefined ? {} : { uid, gid: uid }),
  });
  return JSON.parse(stdout.trim().split('\n').at(-1)!) as Record<string, number> & { inodes?: number[] };
}

let nextId = 1_000_000;
/**
 * One honest request over a leased socket: GET `path`, read the whole answer, close the socket and say so.
 * Returns the body and whether the socket came warm from the pool. `onLease` sees the leased fd before it is used.
 */
export async function honestRequest(
  raw: RawClient,
  port: number,
  path: string,
  onLease?: (fd: number) => void,
): Promise<{ body: string; warm: boolean }> {
  const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port });
  if (lease.message?.type !== 'lease') throw new Error(`acquire failed: ${JSON.stringify(lease.message)}`);
  const { leaseId, warm } = lease.message as { leaseId: number; warm: boolean };
  const fd = lease.fds[0]!;
  onLease?.(fd);
  native.untrack(fd);
  const socket = new Socket({ fd, readable: true, writable: true });
  let text = '';
  socket.setEncoding('latin1');
  socket.on('data', (chunk) => {
    text += chunk;
  });
  socket.on('error', () => {});
  socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer honest\r\n\r\n`);
  const body = await new Promise<string>((resolve, reject) => {
    const check = () => {
      const end = text.indexOf('\r\n\r\n');
      if (end === -1) return;
      const length = Number(/content-length: (\d+)/i.exec(text.slice(0, end))?.[1] ?? Number.NaN);
      if (text.length >= end + 4 + length) resolve(text.slice(end + 4, end + 4 + length));
    };
    socket.on('data', check);
    socket.on('close', () => reject(new Error(`connection closed with ${JSON.stringify(text)}`)));
  });
  socket.destroy();
  raw.sendJson({ type: 'closed', leaseId });
  return { body, warm };
}
