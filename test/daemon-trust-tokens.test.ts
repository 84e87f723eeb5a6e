// An acquire's `tokenTaken` against a real daemon and raw protocol clients: believed only up to the tokens of the
// origin's `requestsPerSecond` the daemon granted the client's uid (protocol `tokens`) within their lifetime, each
// belief using one up (daemon/fleet/token-claims.ts); past them the acquire is charged a token like any other. Whether
// an acquire was charged is read from its reply (`tokenWaitMs`, present only then; or SOCKPOOL_ERR_RATE_LIMITED when
// no token comes in its wait) and from the daemon's `rates` counters, never from timing: the rates are a token in
// 100 s, so no token comes due while a test runs.
import { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import { CLAIM_LIFETIME_MS } from '../daemon/fleet/token-claims.js';
import { ErrorCodes } from '../shared/errors.js';
import * as native from '../shared/native.js';
import type { DaemonMessage } from '../shared/protocol.js';
import { type DaemonProcess, eventually, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { openRawClient, type RawClient } from './helpers/raw-client.js';
import { pathOrigin } from './helpers/trust.js';

const cleanups: Array<() => unknown> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A token every 100 s: within a test, the burst is all there is. */
const SLOW = 0.01;

async function daemon(port: number, burst: number, defaults: object = {}): Promise<DaemonProcess> {
  const args = ['--allow', '127.0.0.1/32', '--allow-port', String(port)];
  const config = { pool: { defaults: { requestsPerSecond: SLOW, burst, ...defaults } } };
  const started = await startDaemon({ args: [...args, '--config', writeConfigFile(config, cleanups)] });
  cleanups.push(() => started.stop());
  return started;
}

let nextId = 1;

async function rates(raw: RawClient): Promise<{ granted: number; claimsBelieved: number; claimsCharged: number }> {
  const reply = await raw.request({ type: 'stats', id: nextId++ });
  return (reply.message as unknown as { stats: { rates: never } }).stats.rates;
}

/** Sends one acquire per id at once (no reply waited for in between) and reads every reply, by id, with the fd it
 *  lent (kept open until the test's end: the lease is held). */
async function acquireAll(raw: RawClient, port: number, count: number, tokenTaken: boolean) {
  const ids = Array.from({ length: count }, () => nextId++);
  for (const id of ids) {
    raw.sendJson({ type: 'acquire', id, host: '127.0.0.1', port, timeoutMs: 2_000, ...(tokenTaken && { tokenTaken }) });
  }
  const replies = new Map<number, { message: DaemonMessage; fd: number | undefined }>();
  while (replies.size < count) {
    const reply = await raw.receive();
    if (reply.eof) throw new Error('the daemon hung up');
    const id = reply.message?.id;
    if (typeof id === 'number' && ids.includes(id)) {
      const [fd, ...extra] = reply.fds;
      if (fd !== undefined) cleanups.push(() => native.close(fd));
      for (const each of extra) native.close(each);
      replies.set(id, { message: reply.message!, fd });
    } else for (const fd of reply.fds) native.close(fd);
  }
  return ids.map((id) => replies.get(id)!);
}

/** One acquire and its reply (acquireAll). */
async function acquireOne(raw: RawClient, port: number, tokenTaken: boolean) {
  return (await acquireAll(raw, port, 1, tokenTaken))[0]!;
}

/** A request over a lent socket, its answer read (the origin answers with the path). */
async function get(fd: number, path: string): Promise<void> {
  const socket = new Socket({ fd: native.dup(fd), readable: true, writable: true });
  socket.on('error', () => {});
  socket.setEncoding('latin1');
  let text = '';
  socket.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
  await new Promise<void>((resolve, reject) => {
    socket.on('data', (chunk) => {
      text += chunk;
      if (text.endsWith(path)) resolve();
    });
    socket.on('close', () => reject(new Error(`closed with ${JSON.stringify(text)}`)));
  });
  socket.destroy();
}

/** A lease the daemon did not charge (its request's token believed taken): no `tokenWaitMs`. */
const believed = (reply: DaemonMessage) => reply.type === 'lease' && reply.tokenWaitMs === undefined;
/** Charged: a lease that waited for its token (`tokenWaitMs`), or refused for want of one. */
const charged = (reply: DaemonMessage) =>
  (reply.type === 'lease' && reply.tokenWaitMs !== undefined) ||
  (reply.type === 'error' && reply.code === ErrorCodes.RATE_LIMITED);

describe('an acquire saying tokenTaken', () => {
  it('is charged when its uid was granted no token: a hostile client gets its connections no faster than the rate', async () => {
    const origin = await pathOrigin(cleanups);
    // Burst 1: one token now, the next in 100 s.
    const sockpoold = await daemon(origin.port, 1);
    const hostile = openRawClient(sockpoold.socketPath, cleanups);
    const results = await acquireAll(hostile, origin.port, 6, true);
    const replies = results.map(({ message }) => message);
    // The burst's token went to one of them (charged, so the reply says how long it waited); the others find no
    // token within their 2 s and are refused. (Before: six leases, none charged.)
    expect(replies.filter((reply) => reply.type === 'lease')).toHaveLength(1);
    expect(replies.every(charged)).toBe(true);
    // And again, one at a time: refused each time, the rate's next token being 100 s away.
    for (let i = 0; i < 3; i++) {
      const again = await acquireOne(hostile, origin.port, true);
      expect(again.message).toMatchObject({ type: 'error', code: ErrorCodes.RATE_LIMITED });
    }
    expect((await rates(hostile)).claimsCharged).toBe(9);
    // What the origin served: a request on every socket the hostile client was lent, one in all.
    for (const [index, { fd }] of results.entries()) if (fd !== undefined) await get(fd, `/hostile/${index}`);
    expect([...origin.seen.values()].reduce((sum, count) => sum + count, 0)).toBe(1);
  });

  it('is believed up to the tokens granted its uid, on another of its sessions too, and charged past them', async () => {
    const origin = await pathOrigin(cleanups);
    // Burst 3: a `tokens` request for 3 is granted a share (half what is at hand, rounded up: 2); one is left.
    const sockpoold = await daemon(origin.port, 3);
    const worker = openRawClient(sockpoold.socketPath, cleanups);
    const tokens = await worker.request({
      type: 'tokens',
      id: nextId++,
      host: '127.0.0.1',
      port: origin.port,
      count: 3,
    });
    expect(tokens.message).toMatchObject({ type: 'tokens' });
    const granted = (tokens.message as { granted: number }).granted;
    expect(granted).toBeGreaterThanOrEqual(1);
    expect(granted).toBeLessThan(3);
    // Another connection of the same uid (a client's worker threads each have their own) claims them, and one more.
    const sibling = openRawClient(sockpoold.socketPath, cleanups);
    const replies = (await acquireAll(sibling, origin.port, granted + 1, true)).map(({ message }) => message);
    expect(replies.filter(believed)).toHaveLength(granted);
    // (Before: believed too, none charged.)
    expect(replies.filter(charged)).toHaveLength(1);
    const counters = await rates(worker);
    expect(counters.claimsBelieved).toBe(granted);
    expect(counters.claimsCharged).toBe(1);
  });

  it('is charged once the tokens granted its uid are past their lifetime', async () => {
    const origin = await pathOrigin(cleanups);
    // Burst 2: a `tokens` request for 1 takes one, one is left for the charge below.
    const sockpoold = await daemon(origin.port, 2);
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const tokens = await raw.request({ type: 'tokens', id: nextId++, host: '127.0.0.1', port: origin.port, count: 1 });
    expect(tokens.message).toMatchObject({ type: 'tokens', granted: 1 });
    // Kept past the lifetime of the tokens granted (a hostile client saving them up for a burst later).
    await sleep(CLAIM_LIFETIME_MS + 100);
    const { message: reply } = await acquireOne(raw, origin.port, true);
    // Charged the burst's other token (before: believed, not charged).
    expect(reply).toMatchObject({ type: 'lease' });
    expect(charged(reply)).toBe(true);
    expect((await rates(raw)).claimsCharged).toBe(1);
  });

  it('that gets no lease (cancelled) leaves its claim to the next acquire: the worker gives its token back', async () => {
    const origin = await pathOrigin(cleanups);
    // Burst 2 and one connection at a time: the first acquire is charged one token and holds the origin's slot.
    const sockpoold = await daemon(origin.port, 2, { maxPerOrigin: 1 });
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const held = await acquireOne(raw, origin.port, false);
    expect(held.message).toMatchObject({ type: 'lease' });
    const tokens = await raw.request({ type: 'tokens', id: nextId++, host: '127.0.0.1', port: origin.port, count: 1 });
    expect(tokens.message).toMatchObject({ type: 'tokens', granted: 1 });
    // Its claim waits for the slot...
    const waiting = nextId++;
    raw.sendJson({ type: 'acquire', id: waiting, host: '127.0.0.1', port: origin.port, tokenTaken: true });
    expect((await rates(raw)).claimsBelieved).toBe(1);
    // ...and is cancelled (no reply comes of a cancelled acquire), the slot freed, and the worker's next acquire
    // sent right behind, read in the same turn.
    const next = nextId++;
    raw.sendJson({ type: 'cancel', acquireId: waiting });
    raw.sendJson({ type: 'closed', leaseId: (held.message as { leaseId: number }).leaseId });
    raw.sendJson({
      type: 'acquire',
      id: next,
      host: '127.0.0.1',
      port: origin.port,
      tokenTaken: true,
      timeoutMs: 2_000,
    });
    const reply = await raw.receive();
    const again = { message: reply.message!, fd: reply.fds[0] };
    if (again.fd !== undefined) cleanups.push(() => native.close(again.fd!));
    expect(again.message).toMatchObject({ id: next });
    // The token is claimed again, and believed: the burst is spent, so a charge would be refused. (Without the
    // claim given back: SOCKPOOL_ERR_RATE_LIMITED.)
    expect(again.message).toMatchObject({ type: 'lease' });
    expect(believed(again.message)).toBe(true);
    expect(await rates(raw)).toMatchObject({ claimsBelieved: 2, claimsCharged: 0 });
    await get(again.fd!, '/again');
    expect(origin.seen.get('/again')).toBe(1);
  });
  it('that got a lease the origin answered nothing on gives its claim back once; one answered on does not', async () => {
    const origin = await pathOrigin(cleanups);
    // Burst 3: one token granted, two left for the charges below.
    const sockpoold = await daemon(origin.port, 3);
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    const tokens = (count: number) =>
      raw.request({ type: 'tokens', id: nextId++, host: '127.0.0.1', port: origin.port, count });
    const close = (lease: DaemonMessage) =>
      raw.request({ type: 'closed', id: nextId++, leaseId: (lease as { leaseId: number }).leaseId });
    expect((await tokens(1)).message).toMatchObject({ type: 'tokens', granted: 1 });
    // Closed before the origin sent a byte (a worker's request cancelled in its TLS handshake): the claim comes back.
    const first = await acquireOne(raw, origin.port, true);
    expect(believed(first.message)).toBe(true);
    await close(first.message);
    // Once: the same again does not bring it back a second time.
    const second = await acquireOne(raw, origin.port, true);
    expect(believed(second.message)).toBe(true);
    await close(second.message);
    const third = await acquireOne(raw, origin.port, true);
    expect(third.message).toMatchObject({ type: 'lease' });
    expect(charged(third.message)).toBe(true);
    // A lease the origin answered on: its claim is spent.
    expect((await tokens(1)).message).toMatchObject({ type: 'tokens', granted: 1 });
    const answered = await acquireOne(raw, origin.port, true);
    expect(believed(answered.message)).toBe(true);
    await get(answered.fd!, '/answered');
    await close(answered.message);
    const after = await acquireOne(raw, origin.port, true);
    expect(after.message).toMatchObject({ type: 'error', code: ErrorCodes.RATE_LIMITED });
    expect(await rates(raw)).toMatchObject({ claimsBelieved: 3, claimsCharged: 2 });
  });

  it('that got a lease released unused gives its claim back once, as `closed` does: the worker spends it again', async () => {
    // What the project's worker does with a lease its request no longer wants (timed out meanwhile, or curl did not
    // take the socket): it releases the lease and gives its token back to its batch, and its next acquire says so.
    const origin = await pathOrigin(cleanups);
    const sockpoold = await daemon(origin.port, 2);
    const raw = openRawClient(sockpoold.socketPath, cleanups);
    expect(
      (await raw.request({ type: 'tokens', id: nextId++, host: '127.0.0.1', port: origin.port, count: 1 })).message,
    ).toMatchObject({ type: 'tokens', granted: 1 });
    const release = (lease: DaemonMessage) =>
      raw.request({ type: 'release', id: nextId++, leaseId: (lease as { leaseId: number }).leaseId, withoutFd: true });
    const first = await acquireOne(raw, origin.port, true);
    expect(believed(first.message)).toBe(true);
    expect((await release(first.message)).message).toMatchObject({ type: 'ok' });
    const second = await acquireOne(raw, origin.port, true);
    expect(believed(second.message)).toBe(true);
    // Once: released unused again, the claim does not come back a second time.
    expect((await release(second.message)).message).toMatchObject({ type: 'ok' });
    const third = await acquireOne(raw, origin.port, true);
    expect(charged(third.message)).toBe(true);
    expect(await rates(raw)).toMatchObject({ claimsBelieved: 2, claimsCharged: 1 });
  });

  for (const how of ['cancel', 'disconnect'] as const) {
    it(`believed, served an idle socket never lent and given up in the same turn (${how}): the socket goes back never lent`, async () => {
      // A believed claim takes no token wait: the acquire is served from the idle pool in the turn it is read, and a
      // cancel or hang-up read right behind it, in the same turn, leaves nobody to lend the socket to.
      const origin = await pathOrigin(cleanups);
      const sockpoold = await daemon(origin.port, 2);
      const watcher = openRawClient(sockpoold.socketPath, cleanups);
      const raw = openRawClient(sockpoold.socketPath, cleanups);
      const row = async () => {
        const reply = await watcher.request({ type: 'stats', id: nextId++ });
        const stats = (reply.message as unknown as { stats: { origins: Array<Record<string, unknown>> } }).stats;
        return stats.origins.find((each) => String(each.origin).endsWith(`:${origin.port}`))!;
      };
      const tokens = await raw.request({
        type: 'tokens',
        id: nextId++,
        host: '127.0.0.1',
        port: origin.port,
        count: 1,
      });
      expect(tokens.message).toMatchObject({ type: 'tokens', granted: 1 });
      const prewarm = await raw.request({
        type: 'prewarm',
        id: nextId++,
        host: '127.0.0.1',
        port: origin.port,
        count: 1,
      });
      expect(prewarm.message).toMatchObject({ type: 'ok' });
      await eventually(async () => (await row())?.idle === 1, 'the prewarmed socket idle');
      const daemonFdsBefore = sockpoold.fdCount();
      const before = await row();
      sockpoold.child.kill('SIGSTOP');
      try {
        raw.sendJson({ type: 'acquire', id: nextId++, host: '127.0.0.1', port: origin.port, tokenTaken: true });
        if (how === 'cancel') raw.sendJson({ type: 'cancel', acquireId: nextId - 1 });
        else raw.close();
      } finally {
        sockpoold.child.kill('SIGCONT');
      }
      const gone = how === 'disconnect' ? 1 : 0;
      await eventually(async () => {
        const now = await row();
        return now.idle === 1 && now.leased === 0 && sockpoold.fdCount() === daemonFdsBefore - gone;
      }, 'the socket back idle, no fd of the daemon left behind');
      // Lent to nobody: not counted lent (before: warmedLent 1 with the socket idle, never having reached a client).
      expect(await row()).toMatchObject({ warmed: 1, warmedLent: 0, neverLent: 0 });
      // Nor a hit, nor the origin's demand (before: hits 1, the demand rate up by an acquire's).
      const after = await row();
      expect({ hits: after.hits, misses: after.misses }).toEqual({ hits: before.hits, misses: before.misses });
      expect(after.demandRatePerS as number).toBeLessThanOrEqual(before.demandRatePerS as number);
      // Counted lent once, when it does go out (the claim given back with the cancel is believed again).
      const lease = await acquireOne(watcher, origin.port, true);
      expect(lease.message).toMatchObject({ type: 'lease', warm: true });
      expect(believed(lease.message)).toBe(true);
      expect(await row()).toMatchObject({ warmed: 1, warmedLent: 1, neverLent: 0, idle: 0, leased: 1 });
    });
  }
});
