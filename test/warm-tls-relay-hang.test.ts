// A warm-TLS sockpoold whose relay thread hangs while running (daemon/tls-relay.ts, the watchdog): the thread's
// heartbeat stops, and within tls.relayHangMs (3 s here, the shortest allowed) the daemon logs it by name,
// counts it (sockpool_tls_relay_threads_hung_total), ends its sessions (the idle ones leave the pool, closed; a
// leased one's client reads EOF), terminate()s it (its pending handshake fails instead of waiting for its acquire's
// timeout) and serves the next warm TLS acquire through a new thread; the daemon's fds come back to where they
// were. The hang is made from outside, as a debugger would (no hook in the daemon): through the daemon's inspector
// the relay thread runs `for (;;) {}`. Without the watchdog nothing notices: the spinning thread keeps its sessions
// in the pool and the hung log line never comes. A burst of handshakes (more than a thread runs at once) before it
// is not taken for a hang, even at this short limit. A relay thread that hangs while starting (held by the inspector
// before it runs) is judged too, and replaced at most 3 times in a row. Real daemon child process, real node:https
// origin, a throwaway CA.

import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { RELAY_START_HANGS_IN_A_ROW, RELAY_TERMINATE_LIMIT_MS } from '../daemon/tls-relay.js';
import * as native from '../shared/native.js';
import type { LeaseReply } from '../shared/protocol.js';
import { eventually, httpsOrigin, type Origin, startTestDaemon, warmTlsArgs } from './fixtures/client-helpers.js';
import { exchangeOverFd } from './fixtures/native-helpers.js';
import { logRecords, metricValue } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';
import { DaemonInspector } from './helpers/inspector.js';
import { openRawClient } from './helpers/raw-client.js';
import { runDelayMs, starveOneCpu, threadIds } from './helpers/starve-cpu.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let origin: Origin;
/** An origin without sessions: an acquire for it waits for a handshake. */
let other: Origin;
let trust: string;
let dir: string;
const cleanups: Array<() => unknown> = [];

/** Sessions made before and after: more than a relay thread's 20 handshake places, so some queue. */
const SESSIONS = 30;
const HUNG =
  'TLS relay thread hung (its event loop stopped turning): ending it and its sessions; another thread takes its place';

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  trust = createHash('sha256').update(readFileSync(pki.caFile)).digest('hex');
  origin = await httpsOrigin(pki, (_request, response) => response.end('ok'));
  other = await httpsOrigin(pki, (_request, response) => response.end('other'));
  dir = mkdtempSync(join(tmpdir(), 'sockpool-relay-hang-'));
});

afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
  await origin?.close();
  await other?.close();
  pki?.cleanup();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/**
 * A warm-TLS daemon (watchdog limit 3 s) under its inspector (`relay`: its relay thread's session), with SESSIONS
 * idle sessions made by its relay thread (a burst of handshakes, some queued behind the thread's 20 places: busy,
 * not hung) and one more session lent (the test holds the client's copy, `leased`, resumed; `leasedEnded` resolves
 * with how it ended: ECONNRESET, or 'end (FIN)'). `fdsBefore`: the daemon's fds with all SESSIONS + 1 idle.
 */
async function hangingDaemon() {
  const metricsPort = await freePort();
  const daemon = await startTestDaemon([origin.port, other.port], {
    extraArgs: [...warmTlsArgs(pki.caFile, [origin.port, other.port]), '--metrics-port', String(metricsPort)],
    nodeArgs: ['--inspect=127.0.0.1:0'],
    config: { tls: { relayHangMs: 3_000 }, pool: { defaults: { maxIdle: SESSIONS + 1 } } },
  });
  cleanups.push(() => daemon.stop());
  const inspector = await DaemonInspector.connect(daemon.output());
  cleanups.push(() => inspector.close());
  await inspector.call('NodeWorker.enable', { waitForDebuggerOnStart: false });
  const raw = openRawClient(daemon.socketPath, cleanups);
  let id = 1;
  const nextId = () => id++;
  const idleSessions = async () => {
    const reply = await raw.request({ type: 'stats', id: nextId() });
    const stats = (reply.message as unknown as { stats: { origins: Array<{ origin: string; idle: number }> } }).stats;
    return stats.origins.find((entry) => entry.origin === `localhost:${origin.port} tls`)?.idle ?? 0;
  };
  const warm = async () => {
    const prewarm = await raw.request({
      type: 'prewarm',
      id: nextId(),
      host: 'localhost',
      port: origin.port,
      count: SESSIONS + 1,
      tls: { trust },
    });
    expect(prewarm.message?.type).toBe('ok');
    await eventually(async () => (await idleSessions()) === SESSIONS + 1, `${SESSIONS + 1} warm TLS sessions`);
  };
  await warm();
  expect(logRecords(daemon, HUNG)).toEqual([]);
  const fdsBefore = daemon.fdCount();
  const lent = await raw.request({
    type: 'acquire',
    id: nextId(),
    host: 'localhost',
    port: origin.port,
    tls: { trust },
  });
  expect((lent.message as LeaseReply).type).toBe('lease');
  const leased = new net.Socket({ fd: lent.fds[0]!, readable: true, writable: true });
  // How the client's copy ends: a reset (the daemon disconnects the pair: a cut session never reads as a clean end).
  const leasedEnded = new Promise<string>((resolve) => {
    leased.once('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message));
    leased.once('end', () => resolve('end (FIN)'));
  });
  leased.resume();
  const relay = await inspector.workerSession(/sockpoold tls relay/);
  return {
    daemon,
    metricsPort,
    inspector,
    relay,
    raw,
    nextId,
    idleSessions,
    warm,
    fdsBefore,
    lent: lent.message as LeaseReply,
    leased,
    leasedEnded,
  };
}

/**
 * After `hang()` made the relay thread hang: it is logged by name with the handshake it held, counted, its idle
 * sessions are out of the pool, its lent one ended for the client, and that handshake failed with `why`; then the
 * next warm TLS acquire is served through another thread. `waiting`: the second client's acquire for `other`.
 */
async function expectHungAndReplaced(
  setup: Awaited<ReturnType<typeof hangingDaemon>>,
  hang: () => Promise<void>,
  why: string,
): Promise<void> {
  const { daemon, metricsPort, raw, nextId, idleSessions, lent, leased, leasedEnded } = setup;
  await hang();
  // A handshake sent to the hung thread (an origin without sessions; a second client, as the first one's requests
  // are answered in order). Its wait longer than the finding may take: under a full test run a spinning relay thread
  // at nice 10 gets little of a CPU, and its silence counts only what it could run (a CI run's acquire reached its
  // default 10 s first).
  const waiting = openRawClient(daemon.socketPath, cleanups);
  const pending = waiting.request({
    type: 'acquire',
    id: 1,
    host: 'localhost',
    port: other.port,
    tls: { trust },
    timeoutMs: 120_000,
  });

  await eventually(() => logRecords(daemon, HUNG).length === 1, 'the hung relay thread logged', 60_000);
  expect(logRecords(daemon, HUNG)[0]).toMatchObject({
    thread: expect.stringMatching(/^TLS relay thread 0 \(threadId \d+\)$/),
    handshakes: 1,
  });
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_threads_hung_total')).toBe(1);
  // Its idle sessions left the pool, and the lent one ended for its client.
  expect(await idleSessions()).toBe(0);
  expect(await leasedEnded).toBe('ECONNRESET');
  leased.destroy();
  raw.sendJson({ type: 'closed', leaseId: lent.leaseId });
  // The handshake it held failed, not at the acquire's timeout.
  const failed = await pending;
  expect(failed.message).toMatchObject({
    type: 'error',
    code: 'SOCKPOOL_ERR_TLS',
    message: expect.stringContaining(why),
  });
  waiting.close();

  // The next warm TLS acquire gets a session made and relayed by the thread that took its place.
  const next = await raw.request({
    type: 'acquire',
    id: nextId(),
    host: 'localhost',
    port: origin.port,
    tls: { trust },
  });
  expect((next.message as LeaseReply).type).toBe('lease');
  const response = await exchangeOverFd(next.fds[0]!, 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
  expect(response).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*ok$/);
  raw.sendJson({ type: 'closed', leaseId: (next.message as LeaseReply).leaseId });
}

const LEFT = 'hung TLS relay thread did not end after terminate(); left running, given no more work';

it('a relay thread that spins is found hung, logged, counted, ended and replaced; its sessions end; the fds come back', async () => {
  const setup = await hangingDaemon();
  const { daemon, inspector, relay, metricsPort, warm, fdsBefore } = setup;
  const handshakesBefore = (await metricValue(metricsPort, 'sockpool_tls_handshakes_total'))!;
  expect(handshakesBefore).toBeGreaterThanOrEqual(SESSIONS);
  await expectHungAndReplaced(
    setup,
    () => inspector.evaluateInWorker(relay, 'setImmediate(() => { for (;;) {} }); undefined'),
    'hung, ended by the watchdog',
  );
  expect(logRecords(daemon, LEFT)).toEqual([]);
  // The same shape as before (a live thread, the same idle sessions, nothing lent): the same fds.
  await warm();
  await eventually(() => daemon.fdCount() === fdsBefore, `the daemon's fds back to ${fdsBefore}`);
  expect(logRecords(daemon, HUNG)).toHaveLength(1);
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_threads_hung_total')).toBe(1);
  // The running totals keep what the replaced thread counted (a gauge that dropped would read as a reset): its
  // handshakes, and the new thread's for the sessions warmed again.
  expect(await metricValue(metricsPort, 'sockpool_tls_handshakes_total')).toBeGreaterThanOrEqual(
    handshakesBefore + SESSIONS,
  );
}, 180_000);

// Blocked in read(2) on a FIFO nobody writes, terminate() cannot end the thread: it is left as the stop leaves one,
// but given no work, and the daemon's ends of its sessions are closed (idle) or shut down (lent) all the same: with
// the thread's own ends held open by it, nothing but the daemon can end them (without that, its idle sessions stayed
// in the pool, each to be lent and read in vain). The daemon's stop then names it and exits 1 (warm-tls-stop-bound).
it('a relay thread blocked in a system call is found hung, given no more work, its sessions ended and replaced', async () => {
  const setup = await hangingDaemon();
  const { daemon, inspector, relay, metricsPort, warm } = setup;
  const fifo = join(dir, 'relay-block');
  execFileSync('mkfifo', [fifo]);
  await expectHungAndReplaced(
    setup,
    () =>
      // Opened read-write: the open returns at once, and no EOF ever comes (the thread is a writer too).
      inspector.evaluateInWorker(
        relay,
        `setImmediate(() => {
          const fs = process.getBuiltinModule('node:fs');
          fs.readSync(fs.openSync(${JSON.stringify(fifo)}, fs.constants.O_RDWR), Buffer.alloc(1));
        }); undefined`,
      ),
    'hung, did not end after terminate()',
  );
  expect(logRecords(daemon, LEFT)).toEqual([expect.objectContaining({ thread: logRecords(daemon, HUNG)[0]!.thread })]);
  // Warm sessions again, through the new thread only.
  await warm();
  expect(logRecords(daemon, HUNG)).toHaveLength(1);
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_threads_hung_total')).toBe(1);
  expect(await daemon.stop()).toBe(1);
  expect(logRecords(daemon, 'TLS relay thread did not end after terminate(); the stop goes on without it')).toEqual([
    expect.objectContaining({ thread: logRecords(daemon, HUNG)[0]!.thread }),
  ]);
}, 60_000);

// A hung relay thread that, terminate()d, is kept waiting for a CPU while it ends (a loaded host): before, the wait for
// its end (RELAY_TERMINATE_LIMIT_MS) was wall time, so it was reported left running and its handshakes failed as if it
// never ended ("did not end after terminate()"), their fds left to it. Now that wait counts its available time too.
// Made from outside again: the daemon pinned to one CPU beside busy loops at nice 0 (the relay thread runs at nice 10),
// the thread blocked in read(2) on a FIFO (it sleeps: terminate() cannot reach it) until the watchdog took it for hung,
// then let go (a byte into the FIFO): it ends, kept waiting, its teardown freeing the memory it was given.
it('a hung relay thread kept waiting for a CPU after terminate() is given its available time to end, not left running', async () => {
  const { daemon, inspector, raw } = await inspectedDaemon(false);
  const pid = daemon.child.pid!;
  const before = threadIds(pid);
  // The relay thread, started by a first warm TLS acquire.
  const lent = await raw.request({ type: 'acquire', id: 1, host: 'localhost', port: origin.port, tls: { trust } });
  expect((lent.message as LeaseReply).type).toBe('lease');
  native.close(lent.fds[0]!);
  raw.sendJson({ type: 'closed', leaseId: (lent.message as LeaseReply).leaseId });
  const relay = await inspector.workerSession(/sockpoold tls relay/);
  const tid = [...threadIds(pid)].find(
    (each) => !before.has(each) && readFileSync(`/proc/${pid}/task/${each}/comm`, 'utf8').startsWith('sockpoold tls'),
  )!;
  expect(tid).toBeDefined();
  const fifo = join(dir, 'relay-block-ending');
  execFileSync('mkfifo', [fifo]);
  // Memory for its end to free (its teardown then takes tens of ms of CPU, as a thread with many sessions' buffers),
  // and the block.
  await inspector.evaluateInWorker(
    relay,
    `globalThis.held = Array.from({ length: 400 }, () => Buffer.allocUnsafeSlow(1 << 20).fill(1));
    setImmediate(() => {
      const fs = process.getBuiltinModule('node:fs');
      fs.readSync(fs.openSync(${JSON.stringify(fifo)}, fs.constants.O_RDWR), Buffer.alloc(1));
    }); undefined`,
  );
  // A handshake sent to it (its end, slow, would otherwise outlast the acquire's default wait).
  const pending = raw.request({
    type: 'acquire',
    id: 2,
    host: 'localhost',
    port: other.port,
    tls: { trust },
    timeoutMs: 120_000,
  });
  const undo = starveOneCpu(16, pid);
  try {
    await eventually(() => logRecords(daemon, HUNG).length === 1, 'the blocked relay thread found hung');
    const waitedBefore = runDelayMs(tid, pid);
    let waited = waitedBefore;
    writeFileSync(fifo, 'x');
    await eventually(
      () => {
        if (!existsSync(`/proc/${pid}/task/${tid}`)) return true;
        waited = Math.max(waited, runDelayMs(tid, pid));
        return logRecords(daemon, LEFT).length > 0;
      },
      'the hung thread ended, or was said left running',
      120_000,
    );
    await undo();
    expect(logRecords(daemon, LEFT)).toEqual([]);
    // The premise: it waited for a CPU longer than the limit while it ended.
    expect(waited - waitedBefore).toBeGreaterThan(RELAY_TERMINATE_LIMIT_MS);
    // Its handshake failed at its end, as any ended thread's.
    expect((await pending).message).toMatchObject({
      type: 'error',
      code: 'SOCKPOOL_ERR_TLS',
      message: expect.stringContaining('hung, ended by the watchdog'),
    });
  } finally {
    await undo();
  }
}, 180_000);

// A relay thread that never beats (hung while starting: its modules' load, a call before its loop runs) is judged
// like one that stopped beating, within tls.relayHangMs of its spawn. The hang is made from outside again: with the
// daemon's inspector set to hold every new worker thread before its first line of JavaScript
// (NodeWorker.enable, waitForDebuggerOnStart), the relay thread the first warm TLS acquire starts never runs.
// Without the start judged, that acquire's handshake waited in the thread until the acquire's own timeout
// (SOCKPOOL_ERR_ACQUIRE_TIMEOUT), and so did the next one's, sent to the same thread.
it('a relay thread hung while starting is found hung, counted, its handshake fails, and a replacement serves', async () => {
  const { daemon, inspector, metricsPort, raw } = await daemonHoldingNewThreads();
  // (After a reply: the daemon has accepted the client's connection.)
  await raw.request({ type: 'stats', id: 100 });
  const fdsBefore = daemon.fdCount();
  const pending = raw.request({ type: 'acquire', id: 1, host: 'localhost', port: other.port, tls: { trust } });
  // The relay thread that acquire started, held before it runs (never let go).
  const held = await relaySessions(inspector, 1);

  await eventually(() => logRecords(daemon, HUNG).length === 1, 'the relay thread hung while starting logged');
  expect(logRecords(daemon, HUNG)[0]).toMatchObject({
    thread: expect.stringMatching(/^TLS relay thread 0 \(threadId \d+\)$/),
    handshakes: 1,
    started: false,
  });
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_threads_hung_total')).toBe(1);
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_threads_hung_starting_total')).toBe(1);
  const failed = await pending;
  expect(failed.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_TLS' });
  // The handshake's TCP fd, never read by the thread, is closed, and the thread is gone.
  await eventually(() => daemon.fdCount() === fdsBefore, `the daemon's fds back to ${fdsBefore}`);

  // The next warm TLS acquire starts the replacement, held at its start too: let run, it serves that acquire.
  const nextReply = raw.request({ type: 'acquire', id: 2, host: 'localhost', port: origin.port, tls: { trust } });
  const replacement = (await relaySessions(inspector, 2)).find((sessionId) => !held.includes(sessionId))!;
  await inspector.callInWorker(replacement, 'Runtime.runIfWaitingForDebugger', {});
  const next = await nextReply;
  expect((next.message as LeaseReply).type).toBe('lease');
  const response = await exchangeOverFd(next.fds[0]!, 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
  expect(response).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*ok$/);
  raw.sendJson({ type: 'closed', leaseId: (next.message as LeaseReply).leaseId });
  expect(logRecords(daemon, HUNG)).toHaveLength(1);
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_threads_hung_total')).toBe(1);
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_thread_starts_stopped')).toBe(0);
}, 60_000);

// A relay thread that hangs at every start (a cause that outlives the thread) is not replaced for ever: after
// RELAY_START_HANGS_IN_A_ROW (3) in a row, no more are started, which the log, the stats and the metrics say, and a
// warm TLS acquire fails at once with SOCKPOOL_ERR_TLS instead of waiting for a thread that never comes.
it('relay threads that hang at every start are replaced at most 3 times; then warm TLS fails at once, and says so', async () => {
  const { daemon, inspector, metricsPort, raw } = await daemonHoldingNewThreads();
  for (let id = 1; id <= RELAY_START_HANGS_IN_A_ROW; id++) {
    const reply = await raw.request({ type: 'acquire', id, host: 'localhost', port: origin.port, tls: { trust } });
    expect(reply.message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_TLS' });
  }
  // (The log comes through the daemon's stdout, the replies through its socket: either may be read first.)
  await eventually(
    () => logRecords(daemon, HUNG).length === RELAY_START_HANGS_IN_A_ROW && logRecords(daemon, STOPPED).length > 0,
    'the hung threads and the stop logged',
  );
  expect(logRecords(daemon, HUNG)).toHaveLength(RELAY_START_HANGS_IN_A_ROW);
  expect(logRecords(daemon, STOPPED)).toEqual([expect.objectContaining({ inARow: RELAY_START_HANGS_IN_A_ROW })]);
  const threads = (await relaySessions(inspector, RELAY_START_HANGS_IN_A_ROW)).length;
  const late = await raw.request({ type: 'acquire', id: 10, host: 'localhost', port: origin.port, tls: { trust } });
  expect(late.message).toMatchObject({
    type: 'error',
    code: 'SOCKPOOL_ERR_TLS',
    message: expect.stringContaining('hung while starting'),
  });
  const stats = await raw.request({ type: 'stats', id: 11 });
  expect((stats.message as unknown as { stats: { tls: object } }).stats.tls).toMatchObject({
    threadsHungStarting: RELAY_START_HANGS_IN_A_ROW,
    threadStartsStopped: true,
  });
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_thread_starts_stopped')).toBe(1);
  expect(await metricValue(metricsPort, 'sockpool_tls_relay_threads_hung_starting_total')).toBe(
    RELAY_START_HANGS_IN_A_ROW,
  );
  // No thread was started for the last acquire.
  expect(await relaySessions(inspector, threads)).toHaveLength(threads);
}, 90_000);

const STOPPED =
  'TLS relay threads hang while starting: no more are started until sockpoold restarts; warm TLS handshakes fail once no relay thread is left';

/**
 * A warm-TLS daemon (watchdog limit 3 s) under its inspector, which sees its worker threads (`holdNewThreads`: and
 * holds each one started from now before it runs), with a raw client.
 */
async function inspectedDaemon(holdNewThreads: boolean, extraArgs: string[] = []) {
  const daemon = await startTestDaemon([origin.port, other.port], {
    extraArgs: [...warmTlsArgs(pki.caFile, [origin.port, other.port]), ...extraArgs],
    nodeArgs: ['--inspect=127.0.0.1:0'],
    config: { tls: { relayHangMs: 3_000 } },
  });
  cleanups.push(() => daemon.stop());
  const inspector = await DaemonInspector.connect(daemon.output());
  cleanups.push(() => inspector.close());
  await inspector.call('NodeWorker.enable', { waitForDebuggerOnStart: holdNewThreads });
  const raw = openRawClient(daemon.socketPath, cleanups);
  return { daemon, inspector, raw };
}

/** A warm-TLS daemon (watchdog limit 3 s) whose inspector holds every worker thread started from now before it runs. */
async function daemonHoldingNewThreads() {
  const metricsPort = await freePort();
  return { ...(await inspectedDaemon(true, ['--metrics-port', String(metricsPort)])), metricsPort };
}

/** The inspector sessions of the relay threads started so far, once there are at least `count`. */
async function relaySessions(inspector: DaemonInspector, count: number): Promise<string[]> {
  let sessions: string[] = [];
  await eventually(() => {
    sessions = inspector
      .events('NodeWorker.attachedToWorker')
      .filter((params) => /sockpoold tls relay/.test((params.workerInfo as { title: string }).title))
      .map((params) => params.sessionId as string);
    return sessions.length >= count;
  }, `${count} relay threads attached`);
  return sessions;
}
