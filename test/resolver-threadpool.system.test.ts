// Hung system lookups against a real glibc, in a network namespace of the test's own: `ip netns exec` puts
// /etc/netns/NAME/resolv.conf over /etc/resolv.conf, which names 127.0.0.1, where a UDP socket takes every query
// and answers none (glibc then waits out its timeout and attempts). The daemon (no dns.servers: getaddrinfo on
// libuv's threadpool, 32 threads) is asked for 40 such names by one uid, within its maxLookupsPerUid; a client of
// another uid (nobody, through setpriv's credentials as a child process) must still have its `localhost` (the hosts
// file) looked up and connected. Before the resolver bounded its system lookups (three quarters of the pool, a uid
// holding h only while more than h places are free) the 40 held all 32 threads, and the other uid's lookup queued
// behind them until its deadline: SOCKPOOL_ERR_DNS, reason timeout.
import { execFile } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, expect, it } from 'vitest';
import { startDaemon, writeConfigFile } from './helpers/daemon.js';
import { createNetns, netnsSupported } from './helpers/netns.js';
import { openRawClient } from './helpers/raw-client.js';
import { requirePrerequisite } from './helpers/require.js';

const run = promisify(execFile);
const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

const NOBODY = 65534;

/** As uid `uid`: hello, then one acquire of host:port; prints the acquire's reply (its fd closed). */
async function acquireAs(
  uid: number,
  socketPath: string,
  host: string,
  port: number,
): Promise<Record<string, unknown>> {
  const nativePath = join(import.meta.dirname, '..', 'native', 'build', 'Release', 'sockpool_native.node');
  const script = `
    const native = require(${JSON.stringify(nativePath)});
    const fd = native.seqpacketConnect(process.argv[1]);
    const send = (message) => native.sendMessage(fd, Buffer.from(JSON.stringify(message)), []);
    send({ type: 'hello', id: 1, version: 1 });
    send({ type: 'acquire', id: 2, host: process.argv[2], port: Number(process.argv[3]) });
    const poll = () => {
      const received = native.recvMessage(fd, 65536, 1);
      if (received === null) return setTimeout(poll, 10);
      for (const each of received[1]) native.close(each);
      if (received[2]) return console.log(JSON.stringify({ eof: true }));
      const message = JSON.parse(received[0].toString());
      if (message.id === 2) return console.log(JSON.stringify(message));
      setTimeout(poll, 10);
    };
    poll();`;
  const { stdout } = await run(process.execPath, ['-e', script, socketPath, host, String(port)], {
    uid,
    gid: uid,
    timeout: 30_000,
  });
  return JSON.parse(stdout.trim()) as Record<string, unknown>;
}

it("one uid's 40 hung system lookups leave another uid's lookup a thread of the daemon's pool", async () => {
  requirePrerequisite(netnsSupported(), 'network namespaces (root, iproute2)');
  const ns = createNetns();
  cleanups.push(() => ns.destroy());
  const etc = join('/etc/netns', ns.name);
  mkdirSync(etc, { recursive: true });
  cleanups.push(() => rmSync(etc, { recursive: true, force: true }));
  // Each lookup hangs 2 × 5 s at least: longer than the test needs the threads held.
  writeFileSync(join(etc, 'resolv.conf'), 'nameserver 127.0.0.1\noptions timeout:5 attempts:2\n');
  // The silent server: takes the queries, never answers (so glibc gets no ICMP refusal either).
  ns.spawn([process.execPath, '-e', "require('node:dgram').createSocket('udp4').bind(53, '127.0.0.1')"]);
  const agent = await ns.startAgent();
  const { port } = await agent.listen(0);
  // A socket other uids can reach (the state dir is the daemon's own, 0700).
  const dir = mkdtempSync(join(tmpdir(), 'sockpool-lookups-'));
  chmodSync(dir, 0o755);
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const config = writeConfigFile(
    { access: { socketMode: '0666', allowUids: [0, NOBODY] }, dns: { timeoutMs: 1_000 } },
    cleanups,
  );
  const daemon = await startDaemon({
    wrap: ns.exec,
    socketPath: join(dir, 'sockpoold.sock'),
    args: ['--config', config, '--allow', '127.0.0.0/8', '--allow', '::1/128', '--allow-port', String(port)],
  });
  cleanups.push(() => daemon.stop('SIGKILL'));
  const raw = openRawClient(daemon.socketPath, cleanups);
  await raw.request({ type: 'hello', id: 1, version: 1 });
  for (let id = 100; id < 140; id++) raw.sendJson({ type: 'acquire', id, host: `hung-${id}.test`, port });
  // Each fails at its deadline (a DNS timeout): the lookups themselves go on in glibc.
  for (let answered = 0; answered < 40; answered++) {
    expect((await raw.receive()).message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_DNS' });
  }
  // Another uid's lookup (the hosts file) finds a thread (before: SOCKPOOL_ERR_DNS, reason timeout).
  const reply = await acquireAs(NOBODY, daemon.socketPath, 'localhost', port);
  expect(reply, JSON.stringify(reply)).toMatchObject({ type: 'lease', id: 2 });
}, 60_000);
