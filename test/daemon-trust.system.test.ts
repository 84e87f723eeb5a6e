// sockpoold trusts no client, across uids (root: the hostile clients run as other uids): a socket a client gave
// back goes only to its own uid, quotas of one uid leave another's alone, and the wait queue of an origin is fair
// across uids. Same-uid hostile tests are in daemon-trust.test.ts.
import { type ChildProcess, execFile } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, readFileSync } from 'node:fs';
import { type AddressInfo, createServer, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { defaultConfig } from '../daemon/config.js';
import { idleSocketsFitting, leaseFdBudget } from '../daemon/quotas.js';
import * as native from '../shared/native.js';
import { fdCount } from './fixtures/native-helpers.js';
import { spawnChild } from './helpers/children.js';
import { countingOrigin } from './helpers/counting-origin.js';
import { eventually, repoRoot, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { honestRequest, hostileClient, pathOrigin, runHostile, startSharedDaemon } from './helpers/trust.js';

/** The uids the hostile clients run as (nobody, and one with no passwd entry). */
const HOSTILE_UID = 65534;
const OTHER_UID = 65533;

beforeAll(() => {
  if (process.getuid?.() !== 0) {
    throw new Error('daemon-trust.system.test.ts runs clients as other uids and needs root (npm run test:system)');
  }
});

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

const daemon = (port: number, config: object = {}) => startSharedDaemon(port, config, cleanups);

function client(socketPath: string): RawClient {
  return openRawClient(socketPath, cleanups);
}

let nextId = 1;
async function stats(raw: RawClient): Promise<{ leased: number; waiting: number }> {
  const reply = await raw.request({ type: 'stats', id: nextId++ });
  return (reply.message as unknown as { stats: { leased: number; waiting: number } }).stats;
}

/** lease-holder.mjs as `uid`: acquires `count` leases and holds them; resolves once it holds them all. */
async function holder(socketPath: string, port: number, count: number, uid: number, waitForAll = true) {
  const child = spawnChild(
    process.execPath,
    [join(repoRoot, 'test', 'fixtures', 'lease-holder.mjs'), socketPath, '127.0.0.1', String(port), String(count)],
    { stdio: ['ignore', 'pipe', 'inherit'], uid, gid: uid },
  );
  cleanups.push(() => child.kill('SIGKILL'));
  if (waitForAll) {
    const [line] = (await once(child.stdout!, 'data')) as [Buffer];
    expect(line.toString().trim()).toBe(`held ${count}`);
  }
  return child;
}

describe('released sockets across uids', () => {
  it('lends a socket released by one uid to that uid alone: its kept copies never reach another client', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { minIdle: 2, maxIdle: 8 } } });
    const raw = client(sockpoold.socketPath);
    let stop = false;
    let done = 0;
    /** The sockets the honest client was lent (inodes). */
    const lent = new Set<number>();
    const honest = (async () => {
      while (!stop) {
        const path = `/honest-${done}`;
        const answer = await honestRequest(raw, origin.port, path, (fd) => lent.add(native.socketInode(fd)));
        expect(answer.body).toBe(path);
        done++;
      }
    })();
    // The hostile uid releases 50 leases unused while keeping a copy of each, then writes the start of a request
    // on every copy: those still in the pool are alive there, but kept for its uid alone; those the pool dropped
    // (beyond its maxIdle) were shut down, so a write on their copies fails (EPIPE).
    const seen = await runHostile(['dup-release', sockpoold.socketPath, origin.port, 50], HOSTILE_UID);
    expect(seen.ok).toBe(50);
    expect((seen['write:ok'] ?? 0) + (seen['write:EPIPE'] ?? 0)).toBe(50);
    expect(seen['write:ok']).toBeGreaterThan(0);
    // The honest client goes on well after the poisoning; none of its answers is someone else's.
    const after = done + 100;
    await eventually(() => done >= after, 'a hundred more honest requests', 60_000);
    stop = true;
    await honest;
    // And none of the sockets the hostile uid released (and kept a copy of) was ever lent to the honest client.
    expect(seen.inodes).toHaveLength(50);
    expect(seen.inodes!.filter((inode) => lent.has(inode))).toEqual([]);
  });

  it('does not hand a socket released unused to the acquire of another uid waiting for it: that uid gets a connection of its own', async () => {
    // The one slot is this uid's; another uid's acquire waits for it. The release (unused, a copy kept here) frees
    // the slot, and the socket goes back for this uid alone: the waiter of the other uid gets a new connection, the
    // kept copy's is shut down for the slot it takes.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { maxPerOrigin: 1, maxIdle: 1, minIdle: 0 } } });
    const watcher = client(sockpoold.socketPath);
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    expect(lease.message).toMatchObject({ type: 'lease' });
    const [copy] = lease.fds as [number];
    cleanups.push(() => native.close(copy));
    const other = runHostile(['acquire-port', sockpoold.socketPath, origin.port], OTHER_UID);
    await eventually(async () => (await stats(watcher)).waiting === 1, "the other uid's acquire waits");
    const leaseId = (lease.message as { leaseId: number }).leaseId;
    const released = await raw.request({ type: 'release', id: nextId++, leaseId, withoutFd: true });
    expect(released.message).toMatchObject({ type: 'ok' });
    const seen = await other;
    expect({ port: seen.port === native.localAddress(copy).port, warm: seen.warm }).toEqual({ port: false, warm: 0 });
    await eventually(() => native.probe(copy).state !== 'alive', "the kept copy's connection shut down");
  });

  for (const how of ['cancel', 'disconnect'] as const) {
    it(`keeps a released socket for its uid when the acquire it went to ends without a lease (${how})`, async () => {
      const origin = await pathOrigin(cleanups);
      const sockpoold = await daemon(origin.port, { pool: { defaults: { maxPerOrigin: 1, maxIdle: 1 } } });
      const watcher = client(sockpoold.socketPath);
      const raw = client(sockpoold.socketPath);
      const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
      expect(lease.message).toMatchObject({ type: 'lease' });
      const [copy] = lease.fds as [number];
      // A second acquire of this uid waits for the one slot.
      const waiting = nextId++;
      raw.sendJson({ type: 'acquire', id: waiting, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
      await eventually(async () => (await stats(watcher)).waiting === 1, 'the second acquire waits');
      // Released unused (this process keeps its copy) and, read in the same turn, the acquire the socket goes to
      // straight from the release is cancelled, or its client gone: nobody gets a lease, the socket goes back.
      sockpoold.child.kill('SIGSTOP');
      try {
        raw.sendJson({ type: 'release', leaseId: (lease.message as { leaseId: number }).leaseId, withoutFd: true });
        if (how === 'cancel') raw.sendJson({ type: 'cancel', acquireId: waiting });
        else raw.close();
      } finally {
        sockpoold.child.kill('SIGCONT');
      }
      await eventually(async () => (await stats(watcher)).waiting === 0, 'the acquire is gone');
      // Another uid's acquire must not get the socket this process still holds a copy of.
      const kept = native.localAddress(copy).port;
      const seen = await runHostile(['acquire-port', sockpoold.socketPath, origin.port], OTHER_UID);
      expect(seen.port).not.toBe(kept);
      // The copy's connection was shut down when its slot went to the other uid.
      expect(native.probe(copy).state).not.toBe('alive');
      native.close(copy);
    });
  }
});

describe('per-uid quotas across uids', () => {
  it("refuses one uid's connection flood without touching another uid", async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { quotas: { maxSessionsPerUid: 4 } });
    const flood = spawnChild(process.execPath, [hostileClient, 'sessions', sockpoold.socketPath, '10'], {
      stdio: ['ignore', 'pipe', 'inherit'],
      uid: HOSTILE_UID,
      gid: HOSTILE_UID,
    });
    cleanups.push(() => flood.kill('SIGKILL'));
    const [line] = (await once(flood.stdout!, 'data')) as [Buffer];
    expect(JSON.parse(line.toString())).toEqual({ hello: 4, SOCKPOOL_ERR_QUOTA: 6 });
    // Another uid still connects and is served while the flood holds its four connections.
    const raw = client(sockpoold.socketPath);
    expect((await honestRequest(raw, origin.port, '/beside-the-flood')).body).toBe('/beside-the-flood');
  });
});

describe("the daemon's fd table across uids", () => {
  it("leaves another uid leases when one takes its lease fd share: one uid's leases cannot exhaust the daemon's fds", async () => {
    const origin = await pathOrigin(cleanups);
    // The per-uid lease quotas far above what the daemon's fd table holds: only the fair share of the lease fd
    // budget stands between one uid and the daemon's last fd.
    const fdLimit = 1_500;
    const config = {
      access: { maxLeasesPerClient: 5_000 },
      quotas: { maxLeasesPerUid: 5_000, maxConnectsInFlight: 16 },
      pool: { maxIdleTotal: 16, defaults: { maxPerOrigin: 5_000 } },
    };
    const sockpoold = await startSharedDaemon(origin.port, config, cleanups, fdLimited(fdLimit));
    const budget = leaseFdBudget(fdLimit, config as unknown as Parameters<typeof leaseFdBudget>[1]);
    const ownFdsBefore = fdCount();
    const raw = client(sockpoold.socketPath);
    expect((await raw.request({ type: 'hello', id: nextId++, version: 1 })).message).toMatchObject({ type: 'hello' });
    const daemonFdsBefore = sockpoold.fdCount();
    // The hostile uid takes TCP leases, one at a time, holding each, until it is refused.
    const { hostile, seen } = await hostileReport<{ leases: number; refusal?: string; message?: string }>([
      'hold-leases',
      sockpoold.socketPath,
      origin.port,
      5_000,
    ]);
    // Refused at its share (about half the budget, a lone holder: each acquire charged as relayed until its lease
    // is made; n leases and its connection, n + 1 + 3 held, against budget - n - 1 - 3 and the honest connection
    // free), with the budget named; before, it took leases until the daemon's connects failed with EMFILE.
    expect(seen.refusal).toBe('SOCKPOOL_ERR_QUOTA');
    expect(seen.message).toContain(`fd budget of ${budget}`);
    expect(seen.leases).toBe(Math.ceil((budget - 9) / 2));
    // An admin's stats show the budget and every uid's lease fds (the hostile uid's TCP leases: one each).
    const shown = (await raw.request({ type: 'stats', id: nextId++ })).message as unknown as {
      stats: { leaseFds: number; leaseFdBudget: number };
    };
    expect(shown.stats).toMatchObject({ leaseFds: seen.leases, leaseFdBudget: budget });
    // The honest uid still gets leases: up to its own share of what is left.
    const fds: number[] = [];
    for (let i = 0; i < 100; i++) {
      const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
      expect(lease.message).toMatchObject({ type: 'lease' });
      fds.push(...lease.fds);
      raw.sendJson({ type: 'closed', leaseId: (lease.message as { leaseId: number }).leaseId });
    }
    for (const fd of fds) native.close(fd);
    expect(fds).toHaveLength(100);
    // The hostile uid gone, its leases' fds are closed by the daemon, and the origin (in this process) sees every
    // connection end: this process is back to its fds before but the raw client's connection.
    hostile.kill('SIGKILL');
    await fdsBack(sockpoold, { daemon: daemonFdsBefore, own: ownFdsBefore + 1 }, config.pool.maxIdleTotal);
  });

  it("leaves another uid connections and leases when one opens connections to its fd share: one uid's connections cannot exhaust the daemon's fds", async () => {
    const origin = await pathOrigin(cleanups);
    // maxSessionsPerUid far above the daemon's fd table: only the fair share of the fd budget stands between one
    // uid's connections and the daemon's last fd.
    const fdLimit = 1_500;
    const config = {
      quotas: { maxSessionsPerUid: 5_000, maxConnectsInFlight: 16 },
      pool: { maxIdleTotal: 16 },
    };
    const sockpoold = await startSharedDaemon(origin.port, config, cleanups, fdLimited(fdLimit));
    const budget = leaseFdBudget(fdLimit, config as unknown as Parameters<typeof leaseFdBudget>[1]);
    const ownFdsBefore = fdCount();
    const daemonFdsBefore = sockpoold.fdCount();
    const { hostile, seen } = await hostileReport<{
      sessions: number;
      refusal?: string;
      quota?: string;
      message?: string;
    }>(['hold-sessions', sockpoold.socketPath, 5_000]);
    // Refused at its share, the quota named to the client (a lone uid: n + 1 held, budget - n - 1 free after the
    // next); before, the daemon accepted until EMFILE, and then answered nobody's `hello`.
    expect(seen).toMatchObject({ refusal: 'SOCKPOOL_ERR_QUOTA', quota: 'sessionFds' });
    expect(seen.message).toContain(`fd budget of ${budget}`);
    expect(seen.sessions).toBe(Math.ceil((budget - 2) / 2));
    // The honest uid still connects, and gets leases.
    const raw = client(sockpoold.socketPath);
    expect((await raw.request({ type: 'hello', id: nextId++, version: 1 })).message).toMatchObject({ type: 'hello' });
    const shown = (await raw.request({ type: 'stats', id: nextId++ })).message as unknown as {
      stats: { sessionFds: number; leaseFdBudget: number };
    };
    expect(shown.stats).toMatchObject({ sessionFds: seen.sessions + 1, leaseFdBudget: budget });
    for (let i = 0; i < 10; i++) {
      expect((await honestRequest(raw, origin.port, `/beside-the-flood-${i}`)).body).toBe(`/beside-the-flood-${i}`);
    }
    // The hostile uid gone, the daemon closes its connections: back to its fds before but the honest connection.
    hostile.kill('SIGKILL');
    await fdsBack(sockpoold, { daemon: daemonFdsBefore + 1, own: ownFdsBefore + 1 }, config.pool.maxIdleTotal);
  });

  it("leaves another uid leases when one piles up fds in flight in replies it never reads: the daemon's sends never pass RLIMIT_NOFILE", async () => {
    const origin = await pathOrigin(cleanups);
    // The kernel counts the fds in flight in SCM_RIGHTS messages per sending user against the sender's
    // RLIMIT_NOFILE, and fails a send past it with ETOOMANYREFS unless the sender has CAP_SYS_RESOURCE or
    // CAP_SYS_ADMIN: the daemon runs without capabilities here, as under the shipped unit. The per-uid quotas far
    // above the limit: only the fair share stands between one uid's unread replies and every client's sends.
    const fdLimit = 1_500;
    const config = {
      access: { maxLeasesPerClient: 5_000 },
      quotas: { maxLeasesPerUid: 5_000, maxConnectsInFlight: 16, maxStatsPerUid: 1_000_000 },
      pool: { maxIdleTotal: 16, defaults: { maxPerOrigin: 5_000 } },
    };
    const sockpoold = await startSharedDaemon(origin.port, config, cleanups, [
      ...fdLimited(fdLimit),
      'setpriv',
      '--inh-caps=-all',
      '--bounding-set=-all',
    ]);
    expect(readFileSync(`/proc/${sockpoold.child.pid}/status`, 'utf8')).toMatch(/^CapEff:\s+0+$/m);
    const budget = leaseFdBudget(fdLimit, config as unknown as Parameters<typeof leaseFdBudget>[1]);
    const ownFdsBefore = fdCount();
    const raw = client(sockpoold.socketPath);
    expect((await raw.request({ type: 'hello', id: nextId++, version: 1 })).message).toMatchObject({ type: 'hello' });
    const daemonFdsBefore = sockpoold.fdCount();
    // The hostile uid acquires and ends each lease by its guessed id, reading no reply (100 on each connection: the
    // kernel's socket buffer holds them all), until an acquire gets no lease.
    const { hostile, seen } = await hostileReport<{
      ended: number;
      refusal?: string;
      quota?: string;
      message?: string;
    }>(['unread-leases', sockpoold.socketPath, origin.port, 5_000, 100]);
    // Refused at its share (its fds in flight, its connections and the acquire's three against the rest); before, it
    // ended leases until the daemon's sends failed (ETOOMANYREFS) past the limit, its own and everyone's.
    expect(seen).toMatchObject({ refusal: 'SOCKPOOL_ERR_QUOTA', quota: 'leaseFds' });
    expect(seen.message).toContain(`in flight in unread replies), and`);
    expect(seen.ended).toBeGreaterThan(budget / 2 - 20);
    expect(seen.ended).toBeLessThan(budget / 2);
    // Every one still unread (charged), under the budget with everything else.
    const shown = (await raw.request({ type: 'stats', id: nextId++ })).message as unknown as {
      stats: { unreadLeases: number; leaseFds: number; sessionFds: number };
    };
    expect(shown.stats.unreadLeases).toBe(seen.ended);
    expect(shown.stats.unreadLeases + shown.stats.leaseFds + shown.stats.sessionFds).toBeLessThan(budget);
    // The honest uid's leases still go out (each send puts one more fd in flight).
    for (let i = 0; i < 100; i++) {
      const lease = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
      expect(lease.message).toMatchObject({ type: 'lease' });
      for (const fd of lease.fds) native.close(fd);
      raw.sendJson({ type: 'closed', leaseId: (lease.message as { leaseId: number }).leaseId });
    }
    // (Node names ETOOMANYREFS "Unknown system error -109".)
    expect(sockpoold.output()).not.toMatch(/ETOOMANYREFS|error -109|EMFILE/);
    // The hostile uid gone, its fds in flight are freed with its sockets, and its charges with them.
    hostile.kill('SIGKILL');
    await eventually(
      async () =>
        ((await raw.request({ type: 'stats', id: nextId++ })).message as unknown as { stats: { unreadLeases: number } })
          .stats.unreadLeases === 0,
      'the charges released once the hostile uid is gone',
    );
    await fdsBack(sockpoold, { daemon: daemonFdsBefore, own: ownFdsBefore + 1 }, config.pool.maxIdleTotal);
  });

  it("follows a prlimit on the running daemon: the fd budget and a uid's share grow and shrink with RLIMIT_NOFILE", async () => {
    const origin = await pathOrigin(cleanups);
    const config = {
      quotas: { maxSessionsPerUid: 5_000, maxConnectsInFlight: 16, maxStatsPerUid: 1_000_000 },
      pool: { maxIdleTotal: 16 },
    };
    const budgetAt = (fdLimit: number) =>
      leaseFdBudget(fdLimit, config as unknown as Parameters<typeof leaseFdBudget>[1]);
    const sockpoold = await startSharedDaemon(origin.port, config, cleanups, fdLimited(1_500));
    const pid = String(sockpoold.child.pid);
    const ownFdsBefore = fdCount();
    const raw = client(sockpoold.socketPath);
    expect((await raw.request({ type: 'hello', id: nextId++, version: 1 })).message).toMatchObject({ type: 'hello' });
    const daemonFdsBefore = sockpoold.fdCount();
    const fdStats = async () =>
      (
        (await raw.request({ type: 'stats', id: nextId++ })).message as unknown as {
          stats: { fdLimit: number; leaseFdBudget: number; sessionFds: number };
        }
      ).stats;
    expect(await fdStats()).toMatchObject({ fdLimit: 1_500, leaseFdBudget: budgetAt(1_500) });
    /** The hostile uid opens connections until refused; returns how many it held, then leaves (all closed). */
    const sessionsTaken = async (budget: number) => {
      const { hostile, seen } = await hostileReport<{ sessions: number; quota?: string; message?: string }>([
        'hold-sessions',
        sockpoold.socketPath,
        5_000,
      ]);
      expect(seen).toMatchObject({ quota: 'sessionFds' });
      expect(seen.message).toContain(`fd budget of ${budget}`);
      hostile.kill('SIGKILL');
      await eventually(async () => (await fdStats()).sessionFds === 1, "the hostile uid's connections closed");
      return seen.sessions;
    };
    // Lowered: the budget follows without a restart, and the uid's share with it (n held and the next against
    // budget - n - 1 - 1 free, root's connection among them).
    await promisify(execFile)('prlimit', ['--pid', pid, '--nofile=1200:1500']);
    await eventually(
      async () => (await fdStats()).leaseFdBudget === budgetAt(1_200),
      'the budget of the lowered limit',
      20_000,
    );
    expect(await fdStats()).toMatchObject({ fdLimit: 1_200 });
    expect(await sessionsTaken(budgetAt(1_200))).toBe(Math.ceil((budgetAt(1_200) - 3) / 2));
    // Raised again (the soft limit, up to the hard one: raising that needs CAP_SYS_RESOURCE, which a container's root
    // may lack): the share grows back.
    await promisify(execFile)('prlimit', ['--pid', pid, '--nofile=1500:1500']);
    await eventually(
      async () => (await fdStats()).leaseFdBudget === budgetAt(1_500),
      'the budget of the raised limit',
      20_000,
    );
    expect(await sessionsTaken(budgetAt(1_500))).toBe(Math.ceil((budgetAt(1_500) - 3) / 2));
    expect((await honestRequest(raw, origin.port, '/after-the-prlimit')).body).toBe('/after-the-prlimit');
    expect(sockpoold.output()).toContain('RLIMIT_NOFILE changed: the fd budget and the idle pool follow it');
    await fdsBack(sockpoold, { daemon: daemonFdsBefore, own: ownFdsBefore + 1 }, config.pool.maxIdleTotal);
  });

  it('keeps no more idle sockets than its fd table has room for beside the budget, and says so at start', async () => {
    const origin = await pathOrigin(cleanups);
    // pool.maxIdleTotal at its default (10,000 idle sockets: 30,000 fds), a table of 1,500: the half kept out of the
    // fd budget has room for (750 - 16 - 512) / 3 = 74 beside the connects in flight and the reserve.
    const fdLimit = 1_500;
    const config = {
      quotas: { maxConnectsInFlight: 16 },
      pool: { predictive: false, defaults: { maxIdle: 200, maxPerOrigin: 200 } },
    };
    const fitting = idleSocketsFitting(fdLimit, {
      pool: { ...defaultConfig().pool, maxIdleTotal: defaultConfig().pool.maxIdleTotal },
      quotas: { ...defaultConfig().quotas, ...config.quotas },
    });
    expect(fitting).toBe(74);
    const sockpoold = await startSharedDaemon(origin.port, config, cleanups, fdLimited(fdLimit));
    expect(sockpoold.output()).toContain(
      `pool.maxIdleTotal needs more fds than RLIMIT_NOFILE leaves: at most ${fitting} idle sockets are kept`,
    );
    const raw = client(sockpoold.socketPath);
    const prewarm = await raw.request({
      type: 'prewarm',
      id: nextId++,
      host: '127.0.0.1',
      port: origin.port,
      count: 200,
    });
    expect(prewarm.message).not.toMatchObject({ type: 'error' });
    type Shown = {
      idle: number;
      connecting: number;
      maxIdleTotalInForce: number;
      warming: { opened: { prewarm: number } };
    };
    const shown = async () =>
      ((await raw.request({ type: 'stats', id: nextId++ })).message as unknown as { stats: Shown }).stats;
    // The prewarm is cut to the room (the next test counts it at the origin), and that many are kept.
    await eventually(async () => {
      const now = await shown();
      return now.warming.opened.prewarm === fitting && now.connecting === 0;
    }, "the prewarm's connects done");
    expect(await shown()).toMatchObject({ idle: fitting, maxIdleTotalInForce: fitting });
    expect(sockpoold.output()).not.toMatch(/EMFILE/);
  });

  it('connects no more for a prewarm than the idle pool can keep, and says how many it granted', async () => {
    const origin = await countingOrigin(0, true);
    cleanups.push(() => origin.close());
    // As above: a table of 1,500 keeps 74 idle sockets; the origin's maxIdle (200) would take the whole prewarm.
    const fdLimit = 1_500;
    const config = {
      quotas: { maxConnectsInFlight: 16 },
      pool: { predictive: false, defaults: { maxIdle: 200, maxPerOrigin: 200 } },
    };
    const fitting = idleSocketsFitting(fdLimit, {
      pool: defaultConfig().pool,
      quotas: { ...defaultConfig().quotas, ...config.quotas },
    });
    const sockpoold = await startSharedDaemon(origin.port, config, cleanups, fdLimited(fdLimit));
    const raw = client(sockpoold.socketPath);
    const prewarm = () =>
      raw.request({ type: 'prewarm', id: nextId++, host: '127.0.0.1', port: origin.port, count: 200 });
    const stats = async () =>
      ((await raw.request({ type: 'stats', id: nextId++ })).message as unknown as { stats: Record<string, unknown> })
        .stats as { idle: number; connecting: number; warming: { opened: { prewarm: number } } };
    expect((await prewarm()).message).toMatchObject({ type: 'ok', granted: fitting });
    await eventually(async () => {
      const now = await stats();
      return now.idle === fitting && now.connecting === 0;
    }, 'the idle pool full');
    // The daemon's connects are done; the origin's accepts may lag them in its event loop.
    await eventually(() => origin.accepted >= fitting, 'the origin accepted the prewarm');
    expect((await stats()).warming.opened.prewarm).toBe(fitting);
    expect(origin.accepted).toBe(fitting);
    // Full: another prewarm is granted nothing, connects nothing, and is not refused (nothing was charged).
    expect((await prewarm()).message).toMatchObject({ type: 'ok', granted: 0 });
    expect((await stats()).connecting).toBe(0);
    expect(origin.accepted).toBe(fitting);
  });
});

/**
 * The hostile client (test/fixtures/hostile-client.mjs) as the hostile uid, in `mode` with `args`, killed at the
 * file's end: it and the first line it reports (JSON: how far it got, and the refusal that stopped it).
 */
/**
 * The daemon's fds and this process's back to where they were (`before`: with what the test still holds open, its
 * raw connection), but for up to `idle` idle sockets (the daemon's, and their far ends in this process's origin).
 */
async function fdsBack(
  sockpoold: { fdCount(): number },
  before: { daemon: number; own: number },
  idle: number,
): Promise<void> {
  await eventually(() => sockpoold.fdCount() <= before.daemon + idle, "the daemon's fds back to where they were");
  await eventually(() => fdCount() <= before.own + idle, "this process's fds back");
}

async function hostileReport<T>(args: Array<string | number>): Promise<{ hostile: ChildProcess; seen: T }> {
  const hostile = spawnChild(process.execPath, [hostileClient, ...args.map(String)], {
    stdio: ['ignore', 'pipe', 'inherit'],
    uid: HOSTILE_UID,
    gid: HOSTILE_UID,
  });
  cleanups.push(() => hostile.kill('SIGKILL'));
  const [line] = (await once(hostile.stdout!, 'data')) as [Buffer];
  return { hostile, seen: JSON.parse(line.toString()) as T };
}

/** A wrap that starts the daemon with its soft and hard RLIMIT_NOFILE at `fdLimit` (startSharedDaemon). */
function fdLimited(fdLimit: number): string[] {
  return ['sh', '-c', `ulimit -n ${fdLimit}; exec "$0" "$@"`];
}

describe('the connect gate across uids', () => {
  it("starts another uid's connect ahead of one uid's backlog at maxConnectsInFlight", async () => {
    const { startDnsServer } = await import('./helpers/dns-server.js');
    // Twenty names whose lookups take 1 s each: with two connects in flight at most, the other uid's twenty take
    // 10 s to get through the gate.
    const slow = Array.from({ length: 20 }, (_, i) => `slow${i}.test`);
    const dns = await startDnsServer(
      Object.fromEntries(slow.map((name) => [name, { a: ['127.0.0.1'], delayMs: 1_000 }])),
    );
    cleanups.push(() => dns.close());
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, {
      quotas: { maxConnectsInFlight: 2 },
      dns: { servers: [dns.server] },
      pool: { predictive: false },
    });
    const raw = client(sockpoold.socketPath);
    const flooding = runHostile(['acquire-hosts', sockpoold.socketPath, origin.port, 60_000, ...slow], HOSTILE_UID);
    // (Awaited below; a failure before that must not be an unhandled rejection: the daemon's stop ends it.)
    flooding.catch(() => {});
    await eventually(
      async () => ((await stats(raw)) as unknown as { connecting: number }).connecting === 20,
      'the other uid has twenty connects at the gate',
    );
    // This uid has none in flight: its connect goes next, not after the other uid's eighteen waiting.
    const mine = await raw.request({
      type: 'acquire',
      id: nextId++,
      host: '127.0.0.1',
      port: origin.port,
      timeoutMs: 5_000,
    });
    expect(mine.message).toMatchObject({ type: 'lease' });
    for (const fd of mine.fds) native.close(fd);
    // (Every one of the other uid's acquires is answered, in its turn.)
    expect(await flooding).not.toHaveProperty('unexpected');
  }, 60_000);
});

describe('the fair queue across uids', () => {
  it('gives a freed slot to the waiting uid that holds fewer, ahead of an earlier waiter of a uid that holds more', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { maxPerOrigin: 3, maxIdle: 0 } } });
    const raw = client(sockpoold.socketPath);
    // One uid holds two of the three slots, this process (root) the third.
    await holder(sockpoold.socketPath, origin.port, 2, HOSTILE_UID);
    const mine = await raw.request({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port });
    expect(mine.message).toMatchObject({ type: 'lease' });
    // A second process of the busy uid queues first; then this process queues too.
    await holder(sockpoold.socketPath, origin.port, 1, HOSTILE_UID, false);
    await eventually(async () => (await stats(raw)).waiting === 1, 'the busy uid waits');
    const queued = client(sockpoold.socketPath);
    queued.sendJson({ type: 'acquire', id: 7, host: '127.0.0.1', port: origin.port, timeoutMs: 30_000 });
    await eventually(async () => (await stats(raw)).waiting === 2, 'both uids wait');
    // The slot this process frees goes to this process's uid (it then holds 1 against the other uid's 2).
    raw.sendJson({ type: 'closed', leaseId: (mine.message as { leaseId: number }).leaseId });
    for (const fd of mine.fds) native.close(fd);
    const granted = await queued.receive();
    expect(granted.message).toMatchObject({ type: 'lease', id: 7 });
    for (const fd of granted.fds) native.close(fd);
    expect((await stats(raw)).waiting).toBe(1);
  });

  it('gives a slot released unused to a waiting uid holding fewer, not to a waiter of the releasing uid', async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { pool: { defaults: { maxPerOrigin: 1, maxIdle: 1 } } });
    const raw = client(sockpoold.socketPath);
    // The other uid holds the one slot; once this process waits for it, it queues an acquire of its own before
    // each release of its lease unused, for 4 s: the socket kept for its uid must not go round to it while this
    // process, holding none, waits.
    const cycling = runHostile(['release-cycle', sockpoold.socketPath, origin.port, 4000], HOSTILE_UID);
    // (Awaited below; a failure before that must not be an unhandled rejection: the daemon's stop ends it.)
    cycling.catch(() => {});
    await eventually(async () => (await stats(raw)).leased === 1, 'the other uid holds the slot');
    const mine = await raw.request({
      type: 'acquire',
      id: nextId++,
      host: '127.0.0.1',
      port: origin.port,
      timeoutMs: 3000,
    });
    expect(mine.message).toMatchObject({ type: 'lease' });
    // Given back, so the other uid's waiter is served in turn and it finishes.
    raw.sendJson({ type: 'closed', leaseId: (mine.message as { leaseId: number }).leaseId });
    for (const fd of mine.fds) native.close(fd);
    expect(await cycling).not.toHaveProperty('unexpected');
  });

  it("refuses one uid's stats flood with SOCKPOOL_ERR_QUOTA past its rate while another uid's acquires are served", async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port);
    const raw = client(sockpoold.socketPath);
    let honestDone = 0;
    let stop = false;
    // Acquires of another uid all through the flood: each one answered with its own body.
    const honest = (async () => {
      while (!stop) {
        const path = `/during-stats-flood-${honestDone}`;
        expect((await honestRequest(raw, origin.port, path)).body).toBe(path);
        honestDone++;
      }
    })();
    const rounds = 2000;
    const seen = await runHostile(['stats-flood', sockpoold.socketPath, rounds], HOSTILE_UID);
    stop = true;
    await honest;
    // Answered, not hung up on: the stats the rate allows (a burst of maxStatsPerUid, then maxStatsPerUid a second
    // over the flood's length), the rest refused with the quota's typed error.
    const limit = 10; // quotas.maxStatsPerUid's default
    expect(seen.eof).toBeUndefined();
    expect((seen.stats ?? 0) + (seen.SOCKPOOL_ERR_QUOTA ?? 0)).toBe(rounds);
    expect(seen.stats ?? 0).toBeLessThanOrEqual(limit + Math.ceil((limit * seen.elapsedMs!) / 1000));
    expect(honestDone).toBeGreaterThan(0);
    // The uid's next stats after its rate refilled is answered again.
    await eventually(
      async () => (await runHostile(['stats-flood', sockpoold.socketPath, 1], HOSTILE_UID)).stats === 1,
      'a stats answered once the rate refilled',
    );
  });

  it("caps one uid's prewarm flood with SOCKPOOL_ERR_QUOTA while another uid is served", async () => {
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, { quotas: { maxPrewarmPerUid: 8 } });
    const seen = await runHostile(['prewarm', sockpoold.socketPath, origin.port, 50], OTHER_UID);
    expect(seen.SOCKPOOL_ERR_QUOTA).toBeGreaterThan(40);
    const raw = client(sockpoold.socketPath);
    for (let i = 0; i < 20; i++) {
      expect((await honestRequest(raw, origin.port, `/after-flood-${i}`)).body).toBe(`/after-flood-${i}`);
    }
  });
});

describe('the history store across uids', () => {
  /**
   * TCP servers on one port at each of `addresses` (loopback), counting the connections each accepted: origins that
   * differ by address, as a wildcard domain's names would.
   */
  async function loopbackOrigins(addresses: string[]): Promise<{ port: number; accepted: Map<string, number> }> {
    const accepted = new Map<string, number>();
    const sockets: Socket[] = [];
    let port = 0;
    for (const address of addresses) {
      const server = createServer((socket) => {
        sockets.push(socket);
        socket.on('error', () => {});
        accepted.set(address, (accepted.get(address) ?? 0) + 1);
      });
      server.listen(port, address);
      await once(server, 'listening');
      port = (server.address() as AddressInfo).port;
      cleanups.push(() => {
        for (const socket of sockets) socket.destroy();
        server.close();
      });
    }
    return { port, accepted };
  }

  it("keeps another uid's origin in the history past one uid's acquires to many origins, and warms it after a restart", async () => {
    // One uid's acquires to historyMaxOrigins origins that connect pushed every other uid's history out (the least
    // recently seen went first, whoever's they were), and its busiest origins took every place warm-on-start had.
    const mine = '127.0.0.1';
    const theirs = Array.from({ length: 8 }, (_, n) => `127.0.0.${n + 2}`);
    const { port, accepted } = await loopbackOrigins([mine, ...theirs]);
    const configPath = writeConfigFile(
      {
        egress: { allow: ['127.0.0.0/24'], allowPorts: [port] },
        access: { socketMode: '0666' },
        pool: { predictive: false, historyMaxOrigins: 4, warmOnStartOrigins: 2 },
      },
      cleanups,
    );
    const first = await startDaemon({ args: ['--config', configPath] });
    cleanups.push(() => first.stop());
    chmodSync(dirname(first.socketPath), 0o755);
    // This uid's origin first (the least recently seen), then the other uid's eight, each acquired once.
    const raw = client(first.socketPath);
    const lease = await raw.request({ type: 'acquire', id: nextId++, host: mine, port });
    expect(lease.message).toMatchObject({ type: 'lease' });
    for (const fd of lease.fds) native.close(fd);
    expect(await runHostile(['acquire-hosts', first.socketPath, port, 10_000, ...theirs], HOSTILE_UID)).toEqual({
      lease: theirs.length,
    });
    raw.close();
    expect(await first.stop()).toBe(0);
    const db = new Database(join(first.stateDir, 'sockpool.sqlite'), { readonly: true });
    const kept = db.prepare('SELECT origin_key FROM origins ORDER BY last_seen, origin_key').pluck().all();
    expect(kept).toEqual([`${mine}:${port}`, ...theirs.slice(-3).map((address) => `${address}:${port}`)]);
    // Each row held by the uid whose acquire brought it in (SO_PEERCRED).
    expect(db.prepare('SELECT uid FROM origins ORDER BY last_seen, origin_key').pluck().all()).toEqual([
      process.getuid!(),
      HOSTILE_UID,
      HOSTILE_UID,
      HOSTILE_UID,
    ]);
    db.close();

    // The next start warms two origins: this uid's busiest and the other uid's, one each.
    const mineBefore = accepted.get(mine) ?? 0;
    const second = await startDaemon({ stateDir: first.stateDir, args: ['--config', configPath] });
    cleanups.push(() => second.stop());
    await eventually(() => (accepted.get(mine) ?? 0) > mineBefore, "this uid's origin warmed from history");
    expect(await second.stop()).toBe(0);
  });
});

describe("the event loop's turns across uids", () => {
  it("reads one uid's requests pipelined on all its sessions at most 64 per loop turn: another uid's is answered after at most that many", async () => {
    // A rate-limited origin with room for everything: each `tokens` request is granted at once and counted in the
    // daemon's `rates.granted`, which the admin `stats` reply shows as it was when that stats request was handled.
    const port = 9;
    const sessions = 16;
    const perSession = 100;
    const origin = { match: `127.0.0.1:${port}`, requestsPerSecond: 1_000_000, burst: 1_000_000 };
    const sockpoold = await daemon(port, { pool: { origins: [origin] } });
    const raw = client(sockpoold.socketPath);
    const granted = async () => {
      const reply = await raw.request({ type: 'stats', id: nextId++ });
      return (reply.message as unknown as { stats: { clients: number; rates: { granted: number } } }).stats;
    };
    const flood = spawnChild(
      process.execPath,
      [hostileClient, 'pipeline', sockpoold.socketPath, String(sessions), String(perSession), String(port)],
      { stdio: ['pipe', 'pipe', 'inherit'], uid: HOSTILE_UID, gid: HOSTILE_UID },
    );
    cleanups.push(() => flood.kill('SIGKILL'));
    const lines = flood.stdout!.setEncoding('utf8');
    expect(((await once(lines, 'data')) as [string])[0].trim()).toBe('connected');
    await eventually(async () => (await granted()).clients === sessions + 1, 'every session accepted');
    // The daemon stopped, the other uid queues its requests on every session, then this uid its one: the daemon
    // finds them all waiting at once when it goes on. (Counted, not timed: whatever the machine's load.)
    const daemonPid = sockpoold.child.pid!;
    process.kill(daemonPid, 'SIGSTOP');
    cleanups.push(() => process.kill(daemonPid, 'SIGCONT'));
    await eventually(() => /^\d+ \(.*\) T/.test(readFileSync(`/proc/${daemonPid}/stat`, 'utf8')), 'daemon stopped');
    flood.stdin!.write('go\n');
    expect(((await once(lines, 'data')) as [string])[0].trim()).toBe('queued');
    const id = nextId++;
    raw.sendJson({ type: 'stats', id });
    const finished = once(lines, 'data');
    process.kill(daemonPid, 'SIGCONT');
    let reply = await raw.receive();
    while (reply.message?.id !== id) reply = await raw.receive();
    // Handled in the daemon's first turn: before it, at most the other uid's one budget of its 1,600 (it was 16 × 64:
    // each of its sessions had a turn of its own).
    const before = (reply.message as unknown as { stats: { rates: { granted: number } } }).stats.rates.granted;
    expect(before).toBeLessThanOrEqual(64);
    // And every one of the other uid's requests answered, in order on each session.
    const seen = JSON.parse(((await finished) as [string])[0]);
    expect(seen).toEqual({ outOfOrder: 0, 'granted:1': sessions * perSession });
  });
});
