// The system resolver (getaddrinfo, the default without dns.servers) runs on libuv's threadpool, each lookup holding
// a thread until glibc answers or gives up: seconds for a name whose servers do not answer. With libuv's default 4
// threads, four such names held up every other lookup of the daemon (a crawler meets dead domains). sockpoold runs
// a larger pool unless the operator chose a size (UV_THREADPOOL_SIZE). Counted here as the daemon's libuv worker
// threads after an acquire of `localhost` (which the resolver answers itself: no traffic leaves the machine).

import { once } from 'node:events';
import { readdirSync, readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { createServer, type Server } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { type DaemonProcess, startDaemon } from './helpers/daemon.js';
import { RawClient } from './helpers/raw-client.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

function libuvWorkers(pid: number): number {
  let count = 0;
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    try {
      if (readFileSync(`/proc/${pid}/task/${task}/comm`, 'utf8').trim() === 'libuv-worker') count++;
    } catch {} // (a thread that ended meanwhile)
  }
  return count;
}

async function workersAfterLookup(env: NodeJS.ProcessEnv): Promise<number> {
  const server: Server = createServer((socket) => socket.destroy());
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  cleanups.push(() => new Promise((resolve) => server.close(resolve)));
  const port = (server.address() as AddressInfo).port;
  const sockpoold: DaemonProcess = await startDaemon({
    args: ['--allow', '127.0.0.1/32', '--allow-port', String(port)],
    env,
  });
  cleanups.push(() => sockpoold.stop());
  const raw = new RawClient(sockpoold.socketPath);
  cleanups.push(() => raw.close());
  const reply = await raw.request({ type: 'acquire', id: 1, host: 'localhost', port });
  expect(reply.message).toMatchObject({ type: 'lease' });
  for (const fd of reply.fds) native.close(fd);
  return libuvWorkers(sockpoold.child.pid!);
}

describe("sockpoold's threadpool", () => {
  it('has 32 threads for the system resolver, unless the operator chose a size', async () => {
    expect(await workersAfterLookup({ UV_THREADPOOL_SIZE: undefined })).toBe(32);
    expect(await workersAfterLookup({ UV_THREADPOOL_SIZE: '6' })).toBe(6);
  }, 60_000);
});
