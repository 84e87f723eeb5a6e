// Hung system lookups against a real glibc, in a network namespace of the test's own: `ip netns exec` puts
// /etc/netns/NAME/resolv.conf over /etc/resolv.conf, which names 127.0.0.1, where a UDP socket takes every query
// and answers none (glibc then waits out its timeout and attempts). The daemon (no dns.servers: getaddrinfo on
// libuv's threadpool, 32 threads) is asked for 40 such names by one uid, within its maxLookupsPerUid; a client of
// another uid (nobody, through setpriv's credentials as a child process) must still have its `second.test` (the
// hosts file; not `localhost`, which the resolver answers itself) looked up and connected. Before the resolver bounded its system lookups (a uid holding h only while more
// than h places are free) the 40 held all 32 threads, and the other uid's lookup queued behind them until its
// deadline: SOCKPOOL_ERR_DNS, reason timeout. libuv runs getaddrinfo on at most half its threads (16 of 32), so the
// places are 16, not the 24 (three quarters) they were: with a second uid's hung names too, a third uid's lookup
// the daemon started waited in libuv's own queue.
import { execFile } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, expect, it } from 'vitest';
import { eventually, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { createNetns, netnsSupported } from './helpers/netns.js';
import { openRawClient } from './helpers/raw-client.js';
import { requirePrerequisite } from './helpers/require.js';

const run = promisify(execFile);
const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

const NOBODY = 65534;
/** A third uid (no user needs to exist for it). */
const OTHER = 65533;

/** As uid `uid`: hello, then one acquire of each host (ids from 2) at `port`; the replies in order (fds closed). */
async function acquireAs(
  uid: number,
  socketPath: string,
  hosts: string[],
  port: number,
): Promise<Array<Record<string, unknown>>> {
  const nativePath = join(import.meta.dirname, '..', 'native', 'build', 'Release', 'sockpool_native.node');
  const script = `
    const native = require(${JSON.stringify(nativePath)});
    const fd = native.seqpacketConnect(process.argv[1]);
    const send = (message) => native.sendMessage(fd, Buffer.from(JSON.stringify(message)), []);
    const hosts = JSON.parse(process.argv[2]);
    const replies = [];
    send({ type: 'hello', id: 1, version: 1 });
    hosts.forEach((host, index) => send({ type: 'acquire', id: 2 + index, host, port: Number(process.argv[3]) }));
    const poll = () => {
      const received = native.recvMessage(fd, 65536, 1);
      if (received === null) return setTimeout(poll, 10);
      for (const each of received[1]) native.close(each);
      if (received[2]) return console.log(JSON.stringify([...replies, { eof: true }]));
      const message = JSON.parse(received[0].toString());
      if (message.id >= 2) replies[message.id - 2] = message;
      if (replies.filter(Boolean).length === hosts.length) return console.log(JSON.stringify(replies));
      setTimeout(poll, 10);
    };
    poll();`;
  const { stdout } = await run(process.execPath, ['-e', script, socketPath, JSON.stringify(hosts), String(port)], {
    uid,
    gid: uid,
    timeout: 30_000,
  });
  return JSON.parse(stdout.trim()) as Array<Record<string, unknown>>;
}

/**
 * A daemon in a namespace of its own whose resolv.conf names a server that never answers (each lookup hangs
 * `hangS` seconds at least), with names the hosts file answers, its socket reachable by uids nobody and OTHER.
 */
async function daemonWithHungLookups(hangS: number) {
  requirePrerequisite(netnsSupported(), 'network namespaces (root, iproute2)');
  const ns = createNetns();
  cleanups.push(() => ns.destroy());
  const etc = join('/etc/netns', ns.name);
  mkdirSync(etc, { recursive: true });
  cleanups.push(() => rmSync(etc, { recursive: true, force: true }));
  const attempts = Math.ceil(hangS / 5);
  writeFileSync(join(etc, 'resolv.conf'), `nameserver 127.0.0.1\noptions timeout:5 attempts:${attempts}\n`);
  // Names the hosts file answers (one per uid below: a name looked up once is cached).
  writeFileSync(join(etc, 'hosts'), '127.0.0.1 localhost\n127.0.0.1 second.test\n127.0.0.1 third.test\n');
  // The silent server: takes the queries, never answers (so glibc gets no ICMP refusal either).
  ns.spawn([process.execPath, '-e', "require('node:dgram').createSocket('udp4').bind(53, '127.0.0.1')"]);
  const agent = await ns.startAgent();
  const { port } = await agent.listen(0);
  // A socket other uids can reach (the state dir is the daemon's own, 0700).
  const dir = mkdtempSync(join(tmpdir(), 'sockpool-lookups-'));
  chmodSync(dir, 0o755);
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const configOf = (timeoutMs: number) => ({
    access: { socketMode: '0666', allowUids: [0, NOBODY, OTHER] },
    dns: { timeoutMs },
  });
  const config = writeConfigFile(configOf(1_000), cleanups);
  const daemon = await startDaemon({
    wrap: ns.exec,
    socketPath: join(dir, 'sockpoold.sock'),
    args: ['--config', config, '--allow', '127.0.0.0/8', '--allow', '::1/128', '--allow-port', String(port)],
  });
  cleanups.push(() => daemon.stop('SIGKILL'));
  const raw = openRawClient(daemon.socketPath, cleanups);
  await raw.request({ type: 'hello', id: 1, version: 1 });
  let reloads = 0;
  return {
    daemon,
    port,
    /** As uid 0, `count` acquires of names that hang (ids from `firstId`): each fails at its deadline, the lookups go on. */
    async hang(firstId: number, count: number) {
      for (let id = firstId; id < firstId + count; id++) {
        raw.sendJson({ type: 'acquire', id, host: `hung-${id}.test`, port });
      }
      for (let answered = 0; answered < count; answered++) {
        expect((await raw.receive()).message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_DNS' });
      }
    },
    /** A `dns` section with another timeoutMs, and SIGHUP: the daemon makes a new resolver. */
    async reload(timeoutMs: number) {
      writeFileSync(config, JSON.stringify(configOf(timeoutMs)));
      daemon.child.kill('SIGHUP');
      reloads++;
      await eventually(
        () => daemon.output().split('configuration reloaded').length - 1 === reloads,
        `reload ${reloads} done`,
      );
    },
  };
}

it("one uid's 40 hung system lookups leave another uid's lookup a thread of the daemon's pool", async () => {
  // Each lookup hangs 2 × 5 s at least: longer than the test needs the threads held.
  const { daemon, port, hang } = await daemonWithHungLookups(10);
  await hang(100, 40);
  // Another uid's lookup (the hosts file) finds a thread (before: SOCKPOOL_ERR_DNS, reason timeout).
  const [reply] = await acquireAs(NOBODY, daemon.socketPath, ['second.test'], port);
  expect(reply, JSON.stringify(reply)).toMatchObject({ type: 'lease', id: 2 });
  // A second uid's hung names too: a third uid's lookup still runs at once. libuv runs getaddrinfo on at most 16
  // of its 32 threads, and the rest wait in its queue behind the hung ones: when the daemon let 24 start (one uid
  // 12, the next 6, its own refills the rest), the third uid's lookup waited there until its deadline.
  const hung = await acquireAs(
    NOBODY,
    daemon.socketPath,
    Array.from({ length: 10 }, (_, i) => `hung-nobody-${i}.test`),
    port,
  );
  expect(hung.every((each) => each.code === 'SOCKPOOL_ERR_DNS')).toBe(true);
  const [third] = await acquireAs(OTHER, daemon.socketPath, ['third.test'], port);
  expect(third, JSON.stringify(third)).toMatchObject({ type: 'lease', id: 2 });
}, 60_000);

it('reloads that make new resolvers (the dns section changed) count the hung lookups of the resolvers before', async () => {
  // Each lookup hangs 3 × 5 s at least. Each resolver alone lets one uid hold 8 of the 16 places: three of them
  // counting from zero let it hold more than libuv runs, and another uid's lookup waited in libuv's queue.
  const { daemon, port, hang, reload } = await daemonWithHungLookups(15);
  await hang(100, 40);
  await reload(1_001);
  await hang(200, 40);
  await reload(1_002);
  await hang(300, 40);
  const [reply] = await acquireAs(NOBODY, daemon.socketPath, ['second.test'], port);
  expect(reply, JSON.stringify(reply)).toMatchObject({ type: 'lease', id: 2 });
}, 60_000);
