// The relay threads' handshake queue (daemon/tls-relay.ts) with a real relay thread (from dist/: npm run build)
// and real loopback TCP pairs standing in for connections to an origin: the far end of each pair records when the
// thread's ClientHello arrives and never answers, so a handshake stays under way until the test ends it. A thread
// runs at most HANDSHAKES_PER_THREAD at once; the others wait, the ones an acquire waits for at that moment first,
// fairly across uids, and one no longer wanted when its turn comes is not started (its TCP fd closed).
import { Socket } from 'node:net';
import { join } from 'node:path';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { defaultConfig, policyFor } from '../daemon/config.js';
import type { ConnectedSocket, Connector } from '../daemon/connector.js';
import type { TlsRelays } from '../daemon/tls-relay.js';
import { TlsSessions } from '../daemon/tls-sessions.js';
import * as native from '../shared/native.js';
import { pollUntil, socketCount, socketsBackTo } from './fixtures/native-helpers.js';
import { builtTlsRelays, repoRoot } from './helpers/daemon.js';

type GateModule = typeof import('../daemon/connect-gate.js');

describe('TlsRelays handshake queue', () => {
  it('runs a few handshakes per thread at once; a queued one an acquire comes to wait for goes first', async () => {
    const { TlsRelays, HANDSHAKES_PER_THREAD, PLACES_KEPT_FOR_OTHER_UIDS } = await builtTlsRelays();
    // Connections 0..N-1 take every place one uid may hold (all but the few kept for other uids: see "keeps places
    // for other uids"); N and then `waited` (N + 1) queue behind them.
    const N = HANDSHAKES_PER_THREAD - PLACES_KEPT_FOR_OTHER_UIDS;
    const waited = N + 1;
    const before = socketCount();
    const relays = new TlsRelays(1, pino({ level: 'silent' }));
    const params = { host: 'origin.test', port: 443, contextKey: 'system/-/-', timeoutMs: 30_000 };
    // Which connections' ClientHellos arrived, in order. The far ends are this test's (closed at the end).
    const hellos: number[] = [];
    const farEnds: Socket[] = [];
    const outcomes: Array<Promise<string>> = [];
    // Whether an acquire waits for each connection's origin: asked when a thread has room.
    const waitedFor = new Set<number>();
    const open = (index: number) => {
      const [near, far] = native.loopbackPair();
      const socket = new Socket({ fd: far, readable: true, writable: true });
      socket.on('error', () => {});
      socket.once('data', () => hellos.push(index));
      farEnds[index] = socket;
      // Ownership of `near` passes to the relays here.
      outcomes[index] = relays
        .open(near, params, () => waitedFor.has(index))
        .then(
          () => 'ready',
          (error: { code?: string }) => error.code ?? 'error',
        );
    };
    for (let index = 0; index < N + 2; index++) open(index);
    expect(relays.counters().handshakesQueued).toBe(2);
    await pollUntil(
      () => hellos.length === N,
      () => `the first ${N} ClientHellos (${hellos.length} came)`,
    );
    expect(hellos.sort((a, b) => a - b)).toEqual([...Array(N).keys()]);
    // A client comes to wait for `waited`'s origin; then one handshake ends (the origin hangs up): `waited` is sent
    // next, before N, which came first.
    waitedFor.add(waited);
    farEnds[0]!.destroy();
    expect(await outcomes[0]).toBe('SOCKPOOL_ERR_TLS');
    await pollUntil(
      () => hellos.length === N + 1,
      () => `the next ClientHello (came: ${hellos.join(',')})`,
    );
    expect(hellos[N]).toBe(waited);
    expect(relays.counters().handshakesQueued).toBe(1);
    for (const socket of farEnds) socket.destroy();
    expect(await Promise.all(outcomes)).toEqual(Array(N + 2).fill('SOCKPOOL_ERR_TLS'));
    await relays.close();
    await socketsBackTo(before);
  });

  it('closes the TCP fds still queued when it closes, and fails their handshakes', async () => {
    const { TlsRelays, HANDSHAKES_PER_THREAD, PLACES_KEPT_FOR_OTHER_UIDS } = await builtTlsRelays();
    const before = socketCount();
    const relays = new TlsRelays(1, pino({ level: 'silent' }));
    const params = { host: 'origin.test', port: 443, contextKey: 'system/-/-', timeoutMs: 30_000 };
    const farEnds: Socket[] = [];
    const outcomes: Array<Promise<string>> = [];
    // (One uid alone: the thread's places but those kept for other uids, the rest queued.)
    const N = HANDSHAKES_PER_THREAD - PLACES_KEPT_FOR_OTHER_UIDS;
    for (let index = 0; index < N + 2; index++) {
      const [near, far] = native.loopbackPair();
      farEnds.push(new Socket({ fd: far, readable: true, writable: true }).on('error', () => {}));
      outcomes.push(
        relays.open(near, params).then(
          () => 'ready',
          (error: { code?: string }) => error.code ?? 'error',
        ),
      );
    }
    expect(relays.counters().handshakesQueued).toBe(2);
    await relays.close();
    const codes = await Promise.all(outcomes);
    // Two never left the queue; the others were in the thread when it ended (their fds closed, read or not).
    expect(codes.filter((code) => code === 'SOCKPOOL_ERR_SHUTTING_DOWN')).toHaveLength(2);
    expect(codes.filter((code) => code === 'SOCKPOOL_ERR_TLS')).toHaveLength(N);
    for (const socket of farEnds) socket.destroy();
    await socketsBackTo(before);
  });
  it("keeps places for other uids: one uid's handshakes that never end leave another uid's a place at once", async () => {
    const { TlsRelays, HANDSHAKES_PER_THREAD, PLACES_KEPT_FOR_OTHER_UIDS } = await builtTlsRelays();
    // A handshake holds its place until it ends: up to tls.handshakeTimeoutMs (10 s) with a server that never
    // answers. uid 1000 asks for every place and 50 more such handshakes; then uid 2000 asks for one (`other`).
    // Before, uid 1000's first handshakes held every place of the thread and `other` waited for one of them to time
    // out (as long as its own acquire's timeout, 10 s both by default), and again after each of uid 1000's refills.
    // A uid holding PLACES_KEPT_FOR_OTHER_UIDS or more starts one more only while more than that many are free:
    // alone, it holds all but those; `other` starts at once.
    const N = HANDSHAKES_PER_THREAD;
    const alone = N - PLACES_KEPT_FOR_OTHER_UIDS;
    const backlog = 50;
    const other = N + backlog;
    const before = socketCount();
    const relays = new TlsRelays(1, pino({ level: 'silent' }));
    const params = { host: 'origin.test', port: 443, contextKey: 'system/-/-', timeoutMs: 30_000 };
    const hellos: number[] = [];
    const farEnds: Socket[] = [];
    const outcomes: Array<Promise<string>> = [];
    const open = (index: number, uid: number) => {
      const [near, far] = native.loopbackPair();
      const socket = new Socket({ fd: far, readable: true, writable: true });
      socket.on('error', () => {});
      socket.once('data', () => hellos.push(index));
      farEnds[index] = socket;
      outcomes[index] = relays.open(near, params, undefined, undefined, uid).then(
        () => 'ready',
        (error: { code?: string }) => error.code ?? 'error',
      );
    };
    for (let index = 0; index < N + backlog; index++) open(index, 1000);
    await pollUntil(
      () => hellos.length === alone,
      () => `uid 1000's first ${alone} ClientHellos (${hellos.length} came)`,
    );
    expect(relays.counters().handshakesQueued).toBe(N + backlog - alone);
    open(other, 2000);
    // None of uid 1000's ended: the place was free.
    await pollUntil(
      () => hellos.includes(other),
      () => `uid 2000's ClientHello (came: ${hellos.join(',')})`,
    );
    expect(hellos).toHaveLength(alone + 1);
    // One of uid 1000's ends, and uid 2000's: one more of uid 1000's starts (it is back to its most), not more.
    farEnds[0]!.destroy();
    farEnds[other]!.destroy();
    expect(await outcomes[0]).toBe('SOCKPOOL_ERR_TLS');
    expect(await outcomes[other]).toBe('SOCKPOOL_ERR_TLS');
    await pollUntil(
      () => hellos.length === alone + 2,
      () => `uid 1000's next ClientHello (came: ${hellos.join(',')})`,
    );
    expect(relays.counters().handshakesQueued).toBe(N + backlog - alone - 1);
    for (const socket of farEnds) socket.destroy();
    expect(await Promise.all(outcomes)).toEqual(Array(N + backlog + 1).fill('SOCKPOOL_ERR_TLS'));
    await relays.close();
    await socketsBackTo(before);
  });

  it('does not start a queued handshake no longer wanted: closes its TCP fd and abandons it', async () => {
    const { TlsRelays, HANDSHAKES_PER_THREAD, PLACES_KEPT_FOR_OTHER_UIDS } = await builtTlsRelays();
    const { ConnectAbandoned } = (await import(join(repoRoot, 'dist', 'daemon', 'connect-gate.js'))) as GateModule;
    // 0..N-1 take every place one uid may hold; N (`unwanted`) and N + 1 queue behind them.
    const N = HANDSHAKES_PER_THREAD - PLACES_KEPT_FOR_OTHER_UIDS;
    const unwanted = N;
    const before = socketCount();
    const relays = new TlsRelays(1, pino({ level: 'silent' }));
    const params = { host: 'origin.test', port: 443, contextKey: 'system/-/-', timeoutMs: 30_000 };
    const hellos: number[] = [];
    const farEnds: Socket[] = [];
    const farClosed: Array<Promise<void>> = [];
    const outcomes: Array<Promise<string>> = [];
    let stillWanted = true;
    const open = (index: number, wanted?: () => boolean) => {
      const [near, far] = native.loopbackPair();
      const socket = new Socket({ fd: far, readable: true, writable: true });
      socket.on('error', () => {});
      socket.once('data', () => hellos.push(index));
      farClosed[index] = new Promise((resolve) => socket.once('end', () => resolve()));
      socket.resume();
      farEnds[index] = socket;
      outcomes[index] = relays.open(near, params, undefined, wanted, 1000).then(
        () => 'ready',
        (error: { code?: string }) => (error instanceof ConnectAbandoned ? 'abandoned' : (error.code ?? 'error')),
      );
    };
    for (let index = 0; index < N; index++) open(index);
    open(unwanted, () => stillWanted);
    open(N + 1, () => true);
    await pollUntil(
      () => hellos.length === N,
      () => `the first ${N} ClientHellos (${hellos.length} came)`,
    );
    // The acquire it was for went away; then a handshake ends: N + 1 is started, `unwanted` never is.
    stillWanted = false;
    farEnds[0]!.destroy();
    expect(await outcomes[unwanted]).toBe('abandoned');
    // Its TCP connection was closed here (the origin sees it end without a ClientHello).
    await farClosed[unwanted];
    await pollUntil(
      () => hellos.length === N + 1,
      () => `the next ClientHello (came: ${hellos.join(',')})`,
    );
    expect(hellos[N]).toBe(N + 1);
    expect(hellos).not.toContain(unwanted);
    expect(relays.counters().handshakesQueued).toBe(0);
    for (const socket of farEnds) socket.destroy();
    await Promise.all(outcomes);
    await relays.close();
    await socketsBackTo(before);
  });
  it('drops the queued handshakes no longer wanted when the queue grows long, closing their TCP fds', async () => {
    const { TlsRelays, HANDSHAKES_PER_THREAD, PLACES_KEPT_FOR_OTHER_UIDS } = await builtTlsRelays();
    const { ConnectAbandoned } = (await import(join(repoRoot, 'dist', 'daemon', 'connect-gate.js'))) as GateModule;
    // The uid holds every place it may with handshakes with origins that never answer; 64 more queue behind them,
    // then their acquires give up. Nothing frees room for a while: their TCP fds must not wait for it.
    const N = HANDSHAKES_PER_THREAD - PLACES_KEPT_FOR_OTHER_UIDS;
    const stale = 64;
    const before = socketCount();
    const relays = new TlsRelays(1, pino({ level: 'silent' }));
    const params = { host: 'origin.test', port: 443, contextKey: 'system/-/-', timeoutMs: 30_000 };
    const farEnds: Socket[] = [];
    const outcomes: Array<Promise<string>> = [];
    let stillWanted = true;
    const open = (wanted?: () => boolean) => {
      const [near, far] = native.loopbackPair();
      farEnds.push(new Socket({ fd: far, readable: true, writable: true }).on('error', () => {}));
      outcomes.push(
        relays.open(near, params, undefined, wanted, 1000).then(
          () => 'ready',
          (error: { code?: string }) => (error instanceof ConnectAbandoned ? 'abandoned' : (error.code ?? 'error')),
        ),
      );
    };
    for (let index = 0; index < N; index++) open();
    for (let index = 0; index < stale; index++) open(() => stillWanted);
    expect(relays.counters().handshakesQueued).toBe(stale);
    stillWanted = false;
    const socketsBefore = socketCount();
    // The next handshake queued finds the queue long: the ones no longer wanted are dropped first.
    open(() => true);
    expect(relays.counters().handshakesQueued).toBe(1);
    expect(await Promise.all(outcomes.slice(N, N + stale))).toEqual(Array(stale).fill('abandoned'));
    // Their 64 fds closed (the new handshake's pair added two).
    expect(socketCount()).toBe(socketsBefore - stale + 2);
    for (const socket of farEnds) socket.destroy();
    await Promise.all(outcomes);
    await relays.close();
    await socketsBackTo(before);
  });
});

/** A TCP connector whose sockets are loopback ends whose far end is already closed (the relays here are fakes). */
function loopbackConnector(): Connector {
  return {
    async connect(): Promise<ConnectedSocket> {
      const [near, far] = native.loopbackPair();
      native.close(far);
      return { fd: near, address: '127.0.0.1', family: 4, connectedAt: 0, startedAt: 0, connectMs: 1 };
    },
    checkTarget() {},
    checkHeld() {},
  };
}

describe('TlsSessions', () => {
  it("passes the connect's urgent, wanted and uid on to the relays' handshake queue", async () => {
    const config = defaultConfig();
    const origin = { host: 'origin.test', port: 443 };
    const policy = policyFor(config, origin.host, origin.port);
    const tcp = loopbackConnector();
    const seen: unknown[][] = [];
    const relays = {
      open(fd: number, _params: unknown, ...rest: unknown[]) {
        seen.push(rest);
        native.close(fd);
        return Promise.reject(new Error('not relayed here'));
      },
    } as unknown as TlsRelays;
    const sessions = new TlsSessions(config, tcp, relays);
    const urgent = () => true;
    const wanted = () => false;
    await expect(sessions.connect(origin, policy, urgent, wanted, 1234)).rejects.toThrow('not relayed here');
    expect(seen).toEqual([[urgent, wanted, 1234]]);
  });
});

describe('TlsSessions, a reload during the handshake', () => {
  it("starts over with the connect's wanted and uid: the new handshake is abandoned like the first would be", async () => {
    const config = defaultConfig();
    const origin = { host: 'origin.test', port: 443 };
    const policy = policyFor(config, origin.host, origin.port);
    const tcp = loopbackConnector();
    const seen: unknown[][] = [];
    let sessions: TlsSessions;
    const relays = {
      open(fd: number, _params: unknown, ...rest: unknown[]) {
        seen.push(rest);
        native.close(fd);
        if (seen.length > 1) return Promise.reject(new Error('not relayed here'));
        // The first handshake completes under a configuration a reload replaces meanwhile (another CA file).
        const reloaded = { ...config, tls: { ...config.tls, caFile: '/reloaded/ca.pem' } };
        sessions.configure(reloaded, new Map([['/reloaded/ca.pem', { text: 'pem', sha256: 'a'.repeat(64) }]]));
        const [mine, theirs] = native.loopbackPair();
        native.close(theirs);
        const info = { version: 'TLSv1.3', alpn: 'http/1.1', cipher: 'x', certSha256: 'b'.repeat(64) };
        return Promise.resolve({ fd: mine, handshakeMs: 1, info });
      },
    } as unknown as TlsRelays;
    sessions = new TlsSessions(config, tcp, relays);
    const before = socketCount();
    const urgent = () => true;
    const wanted = () => false;
    await expect(sessions.connect(origin, policy, urgent, wanted, 1234)).rejects.toThrow('not relayed here');
    expect(seen).toEqual([
      [urgent, wanted, 1234],
      [urgent, wanted, 1234],
    ]);
    expect(socketCount()).toBe(before);
  });
});
