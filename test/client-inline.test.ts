// A lone request in the caller's thread (SockpoolClient's `inlineWhenIdle`, on by default with worker threads): a
// buffered request made while the client has nothing else in flight runs in the caller's own thread, with no hop to
// a worker thread and back; requests made together go to the threads together. Where a request ran is seen by
// blocking the only worker thread's event loop (through the inspector): a request that went there cannot finish
// until it is unblocked, one that ran here does. fds are counted before the client and after its close.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Worker } from 'node:worker_threads';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  INLINE_IN_COMPANY,
  LOOP_CLOCK,
  ORIGIN_ON_THREADS_MS,
  ROUTES_KEPT,
  type TestClientOptions,
} from '../client/client.js';
import { SockpoolClient } from '../client/index.js';
import {
  LAG_LIMIT_MS,
  type LoopClock,
  PROBE_INTERVAL_MS,
  realLoopClock,
  SLOW_HOLD_MS,
} from '../client/loop-responsiveness.js';
import {
  echoHandler,
  eventually,
  fdCount,
  httpOrigin,
  leasedTo,
  type Origin,
  startTestDaemon,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { blockWorker, liveWorkers } from './helpers/worker-threads.js';

/** Requests to /hang get no answer until the test ends (or the connection goes). */
const hanging: ServerResponse[] = [];
let origin: Origin;
/** maxPerOrigin 1 at the daemon. */
let capped: Origin;
/** A third origin, for the routes' tests (an origin to follow while `origin` takes the caller's thread's share). */
let other: Origin;
let daemon: DaemonProcess;
let fifoDir: string;
let fifos = 0;
const unblocks: Array<() => void> = [];
const clients: SockpoolClient[] = [];

beforeAll(async () => {
  const echo = echoHandler();
  const handler = (request: IncomingMessage, response: ServerResponse) => {
    if (request.url?.startsWith('/hang')) hanging.push(response);
    else echo(request, response);
  };
  origin = await httpOrigin(handler);
  capped = await httpOrigin(handler);
  other = await httpOrigin(handler);
  daemon = await startTestDaemon([origin.port, capped.port, other.port], {
    config: { pool: { origins: [{ match: `127.0.0.1:${capped.port}`, maxPerOrigin: 1 }] } },
  });
  fifoDir = mkdtempSync(join(tmpdir(), 'sockpool-inline-test-'));
});

afterEach(async () => {
  for (const unblock of unblocks.splice(0)) unblock();
  for (const response of hanging.splice(0)) response.destroy();
  await Promise.all(clients.splice(0).map((client) => client.close()));
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
  await capped?.close();
  await other?.close();
  if (fifoDir) rmSync(fifoDir, { recursive: true, force: true });
});

const url = (path: string, server: Origin = origin) => `http://127.0.0.1:${server.port}${path}`;
/** fds of this process less the origins' server-side sockets (they run in this process). */
/** Open sockets of an origin of this process: a destroyed one has closed its fd already, though it stays in
 *  `sockets` until its 'close' event (counted, it made a `before` one too low: a failure with nothing new open). */
const clientFds = () => fdCount() - origin.openSockets() - capped.openSockets() - other.openSockets();

/** A client with one worker thread, started (its lane up), and that thread. */
async function clientWithThread(options: TestClientOptions = {}): Promise<{ client: SockpoolClient; thread: Worker }> {
  const before = new Set(liveWorkers());
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, ...options });
  clients.push(client);
  await client.stats(); // the thread is up
  const [thread] = liveWorkers().filter((worker) => !before.has(worker));
  return { client, thread: thread! };
}

/**
 * The caller's loop as a client given this clock (LOOP_CLOCK) sees it: keeping up, whatever the machine's load, until
 * the test makes a turn slow. Tests of where requests in company go, in the caller's thread while its loop keeps up,
 * depend on that: with the real clock, a probe made late by other processes on a busy machine sent them to the
 * threads (these tests failed so with one or two other busy processes on 2 cores). The probes' timers are real; only
 * the time they read is this one's, which moves only when the test says.
 */
class SteadyLoop implements LoopClock {
  #now = 0;
  /** The probe's timer, while one is pending (the client has requests in flight). */
  #pending: unknown;
  readonly now = () => this.#now;

  readonly setTimeout = (callback: () => void, ms: number): unknown => {
    const handle = realLoopClock.setTimeout(() => {
      this.#pending = undefined;
      callback();
    }, ms);
    this.#pending = handle;
    return handle;
  };

  readonly clearTimeout = (handle: unknown): void => {
    if (handle === this.#pending) this.#pending = undefined;
    realLoopClock.clearTimeout(handle);
  };

  /** The probe pending now (requests in flight) finds that a turn held the loop past the lag limit. */
  slowTurn(): void {
    if (this.#pending === undefined) throw new Error('a slow turn is seen only by a probe: make a request first');
    this.#now += 4 * LAG_LIMIT_MS;
  }

  /** The hold a slow turn began is over. Only once no probe is pending (nothing in flight): a pending one would take
   *  the time that passes at once for a slow turn. */
  async keepsUp(): Promise<void> {
    await eventually(() => this.#pending === undefined, 'the client’s probes of its loop to stop (nothing in flight)');
    this.#now += SLOW_HOLD_MS;
  }
}

/** A client with one worker thread whose caller's loop keeps up until the test says (SteadyLoop). */
async function steadyClientWithThread(
  options: TestClientOptions = {},
): Promise<{ client: SockpoolClient; thread: Worker; loop: SteadyLoop }> {
  const loop = new SteadyLoop();
  return { ...(await clientWithThread({ ...options, [LOOP_CLOCK]: loop })), loop };
}

/** The thread's event loop stops until the test unblocks it (or the test ends). */
async function block(thread: Worker): Promise<() => void> {
  const fifo = join(fifoDir, `fifo-${fifos++}`);
  execFileSync('mkfifo', [fifo]);
  const { unblock } = await blockWorker(thread, fifo);
  unblocks.push(unblock);
  return unblock;
}

const codeOf = (promise: Promise<unknown>) =>
  promise.then(
    () => 'ok',
    (error: { code?: string }) => error.code,
  );

describe('a lone request runs in the caller’s thread', () => {
  it('finishes while the only worker thread is blocked; requests made together go to that thread', async () => {
    const { client, thread } = await clientWithThread({ inlineWhileResponsive: false });
    const unblock = await block(thread);
    const lone = await client.request(url('/lone'), { timeoutMs: 10_000 });
    expect(lone.status).toBe(200);
    expect(lone.body.toString()).toContain('/lone');
    // Two made in one turn: neither is alone, both go to the blocked thread and meet their deadlines there.
    const together = [client.request(url('/a'), { timeoutMs: 300 }), client.request(url('/b'), { timeoutMs: 300 })];
    expect(await Promise.all(together.map(codeOf))).toEqual(['SOCKPOOL_ERR_TIMEOUT', 'SOCKPOOL_ERR_TIMEOUT']);
    // Unblocked, the thread runs requests again.
    unblock();
    const after = [client.request(url('/c')), client.request(url('/d'))];
    expect((await Promise.all(after)).map((response) => response.status)).toEqual([200, 200]);
  });

  it('so does a lone streamed one (fetch, requestStream, a streamed upload); streams made together go to the thread', async () => {
    const { client, thread } = await clientWithThread({ timeoutMs: 10_000, inlineWhileResponsive: false });
    const unblock = await block(thread);
    const fetched = await client.fetch(url('/fetched'));
    expect(await fetched.text()).toBe('GET /fetched 0');
    const streamed = await client.requestStream(url('/streamed'));
    expect(await new Response(streamed.body).text()).toBe('GET /streamed 0');
    const upload = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new Uint8Array([1, 2, 3]));
        controller.close();
      },
    });
    const uploaded = await client.request(url('/uploaded'), { method: 'PUT', body: upload });
    expect(uploaded.body.toString()).toBe('PUT /uploaded 3');
    const together = [
      client.requestStream(url('/s1'), { timeoutMs: 300 }),
      client.requestStream(url('/s2'), { timeoutMs: 300 }),
    ];
    expect(await Promise.all(together.map(codeOf))).toEqual(['SOCKPOOL_ERR_TIMEOUT', 'SOCKPOOL_ERR_TIMEOUT']);
    unblock();
  });

  it('with inlineWhenIdle: false every request goes to the thread (a lone one times out while it is blocked)', async () => {
    const { client, thread } = await clientWithThread({ inlineWhenIdle: false });
    await block(thread);
    expect(await codeOf(client.request(url('/lone'), { timeoutMs: 300 }))).toBe('SOCKPOOL_ERR_TIMEOUT');
  });

  it('a signal fired in the same turn as the call cancels it; one fired later cancels it in flight', async () => {
    const { client } = await clientWithThread();
    const now = new AbortController();
    const cancelledAtOnce = client.request(url('/never'), { signal: now.signal });
    now.abort(new Error('changed my mind'));
    await expect(cancelledAtOnce).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_ABORTED' });
    const leasedBefore = await leasedTo(daemon.socketPath, origin.port);
    const later = new AbortController();
    const hangsBefore = hanging.length;
    const inFlight = client.request(url('/hang/inline'), { signal: later.signal });
    await eventually(() => hanging.length > hangsBefore, 'the request at the origin');
    later.abort();
    await expect(inFlight).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_ABORTED' });
    // curl closed the half-used connection: its lease ended at the daemon.
    await eventually(
      async () => (await leasedTo(daemon.socketPath, origin.port)) <= leasedBefore,
      'the cancelled request’s lease back',
    );
  });

  it('lone requests one after another delete nothing from a Map or Set of the client’s on the way (no add and delete per request)', async () => {
    const { client } = await clientWithThread();
    for (let i = 0; i < 10; i++) expect((await client.request(url(`/warm-${i}`))).status).toBe(200);
    // Each delete of a key present, by the line of the project's code that made it (vitest's own are not ours).
    const deletes = new Map<string, number>();
    const noteDelete = () => {
      const site = new Error().stack?.split('\n')[3]?.trim() ?? '?';
      if (/[/\\](client|worker|shared)[/\\]/.test(site)) deletes.set(site, (deletes.get(site) ?? 0) + 1);
    };
    const { delete: mapDelete } = Map.prototype;
    const { delete: setDelete } = Set.prototype;
    Map.prototype.delete = function (this: Map<unknown, unknown>, key: unknown) {
      if (this.has(key)) noteDelete();
      return mapDelete.call(this, key);
    };
    Set.prototype.delete = function (this: Set<unknown>, key: unknown) {
      if (this.has(key)) noteDelete();
      return setDelete.call(this, key);
    };
    const requests = 100;
    try {
      for (let i = 0; i < requests; i++) expect((await client.request(url(`/seq-${i}`))).status).toBe(200);
    } finally {
      Map.prototype.delete = mapDelete;
      Set.prototype.delete = setDelete;
    }
    // (A Map that adds and deletes per request keeps garbage alive past young-generation GCs: shared/id-table.ts.)
    expect([...deletes].filter(([, count]) => count >= requests / 2)).toEqual([]);
  });
});

describe('requests made together run in the caller’s thread while its loop keeps up (inlineWhileResponsive)', () => {
  it('a burst, streams and fetches made together finish while the only worker thread is blocked', async () => {
    const { client, thread } = await steadyClientWithThread({ timeoutMs: 10_000 });
    await block(thread);
    const burst = await Promise.all(Array.from({ length: 4 }, (_, i) => client.request(url(`/burst-${i}`))));
    expect(burst.map((response) => response.body.toString())).toEqual(
      Array.from({ length: 4 }, (_, i) => `GET /burst-${i} 0`),
    );
    const [streamed, fetched] = await Promise.all([client.requestStream(url('/s')), client.fetch(url('/f'))]);
    expect([await new Response(streamed.body).text(), await fetched.text()]).toEqual(['GET /s 0', 'GET /f 0']);
  });

  it('after a turn of the caller’s loop held it past the lag limit, requests made together go to the threads', async () => {
    const { client, thread } = await clientWithThread();
    const unblock = await block(thread);
    // A request in flight (here: it is alone; a POST, which is not retried when its connection goes at the end) has
    // the client probe its loop; then the caller's own work holds the
    // loop well past the limit, and the probe that was due meanwhile comes late.
    const hangsBefore = hanging.length;
    const inFlight = codeOf(client.request(url('/hang/probed'), { method: 'POST', timeoutMs: 10_000 }));
    await eventually(() => hanging.length > hangsBefore, 'the lone request at the origin');
    const heldUntil = performance.now() + 5 * LAG_LIMIT_MS;
    while (performance.now() < heldUntil) {
      // the caller's synchronous work
    }
    await sleep(2 * PROBE_INTERVAL_MS);
    const together = [client.request(url('/a'), { timeoutMs: 300 }), client.request(url('/b'), { timeoutMs: 300 })];
    expect(await Promise.all(together.map(codeOf))).toEqual(['SOCKPOOL_ERR_TIMEOUT', 'SOCKPOOL_ERR_TIMEOUT']);
    unblock();
    for (const response of hanging.splice(0)) response.destroy();
    expect(await inFlight).not.toBe('ok');
  });
});

describe('requests made together, more than the caller’s thread takes on in company', () => {
  it('streams and fetches made in one turn run at most INLINE_IN_COMPANY here: of origins new here in all, of an origin here its own', async () => {
    const { client, thread } = await steadyClientWithThread();
    const unblock = await block(thread);
    // 16 streams to one origin fill the caller's thread's share and the origin's own; 4 more to it, and 4 to an
    // origin new here, go to the blocked thread and meet their deadlines there, and the fetches (made last) finish
    // once it is unblocked.
    // (Each outcome taken at once: a stream that times out while the test awaits the others is not left unhandled.)
    const streamTo = (path: string, server: Origin) =>
      codeOf(client.requestStream(url(path, server), { timeoutMs: 1_000 }).then((response) => response.body.cancel()));
    const here = Array.from({ length: 20 }, (_, i) => streamTo(`/s-${i}`, origin));
    const elsewhere = Array.from({ length: 4 }, (_, i) => streamTo(`/t-${i}`, capped));
    const fetches = Array.from({ length: 4 }, (_, i) =>
      client.fetch(url(`/f-${i}`, capped)).then((response) => response.text()),
    );
    expect(await Promise.all(here)).toEqual([...Array(16).fill('ok'), ...Array(4).fill('SOCKPOOL_ERR_TIMEOUT')]);
    expect(await Promise.all(elsewhere)).toEqual(Array(4).fill('SOCKPOOL_ERR_TIMEOUT'));
    unblock();
    expect(await Promise.all(fetches)).toEqual(Array.from({ length: 4 }, (_, i) => `GET /f-${i} 0`));
  });

  it('an origin already here runs here in company though the caller’s thread runs its share of other origins', async () => {
    const { client, thread } = await steadyClientWithThread();
    expect((await client.request(url('/first', capped))).status).toBe(200);
    const unblock = await block(thread);
    const hangsBefore = hanging.length;
    // (POSTs: not retried when their connections go at the end.)
    const held = Array.from({ length: 16 }, (_, i) =>
      codeOf(client.request(url(`/hang/share-${i}`), { method: 'POST', timeoutMs: 10_000 })),
    );
    await eventually(() => hanging.length >= hangsBefore + 16, 'the caller’s thread’s share at the other origin');
    // Its connection is here: a pair to it runs here, and finishes while the thread is blocked.
    const pair = [client.request(url('/p-0', capped)), client.request(url('/p-1', capped))];
    expect((await Promise.all(pair)).map((response) => response.body.toString())).toEqual(['GET /p-0 0', 'GET /p-1 0']);
    unblock();
    for (const response of hanging.splice(0)) response.destroy();
    await Promise.all(held);
  });

  it('a signal fired in the same turn cancels requests that go to the thread, the caller’s thread’s share taken', async () => {
    const { client } = await clientWithThread();
    const hangsBefore = hanging.length;
    // (POSTs: not retried when their connections go at the end.)
    const held = Array.from({ length: 16 }, (_, i) =>
      codeOf(client.request(url(`/hang/held-${i}`), { method: 'POST', timeoutMs: 10_000 })),
    );
    await eventually(() => hanging.length >= hangsBefore + 16, 'the caller’s thread’s share at the origin');
    const controller = new AbortController();
    // (To an origin new here: the caller's thread's share is taken, so they go to the thread.)
    const burst = Array.from({ length: 4 }, (_, i) =>
      client.request(url(`/aborted-${i}`, capped), { signal: controller.signal }),
    );
    controller.abort();
    expect(await Promise.all(burst.map(codeOf))).toEqual(Array(4).fill('SOCKPOOL_ERR_ABORTED'));
    for (const response of hanging.splice(0)) response.destroy();
    await Promise.all(held);
  });

  it('at a capped origin (maxPerOrigin 1) bursts split between two runtimes finish (two worker threads)', async () => {
    // (An origin's requests in company stay in the caller's thread once they run there: two threads split them.)
    const { client } = await clientWithThread({ threads: 2, inlineWhileResponsive: false });
    expect((await client.request(url('/first', capped))).status).toBe(200);
    // Each runtime's requests wait for the room the other's connection holds. A burst whose first request in one
    // found the connection it had given back (curl then wants a socket of its own for it) waited for the room that
    // connection's successor, idle in the same runtime, held: a few rounds meet that.
    for (let round = 0; round < 4; round++) {
      const burst = await Promise.all(
        Array.from({ length: 24 }, (_, i) =>
          codeOf(client.request(url(`/split-${round}-${i}`, capped), { timeoutMs: 20_000 })),
        ),
      );
      expect(burst).toEqual(Array(24).fill('ok'));
      expect(capped.sockets.size).toBeLessThanOrEqual(1);
    }
  });
});

describe('an origin’s requests in company that move to the threads after a slow turn', () => {
  it('leave at most INLINE_IN_COMPANY of its connections idle here, however many it had in flight', async () => {
    const { client } = await clientWithThread({ timeoutMs: 20_000 });
    const leasedBefore = await leasedTo(daemon.socketPath, origin.port);
    // A burst of 48 to one origin while the caller's loop keeps up; then a request in flight (the client probes its
    // loop meanwhile) and one slow turn of the caller's loop; then the same burst again, which goes to the thread.
    const burst = (tag: string) =>
      Promise.all(Array.from({ length: 48 }, (_, i) => codeOf(client.request(url(`/${tag}-${i}`)))));
    expect(await burst('before')).toEqual(Array(48).fill('ok'));
    const hangsBefore = hanging.length;
    const held = codeOf(client.request(url('/hang/held'), { timeoutMs: 2_000 }));
    await eventually(() => hanging.length > hangsBefore, 'the held request at the origin');
    const heldUntil = performance.now() + 5 * LAG_LIMIT_MS;
    while (performance.now() < heldUntil) {
      // the caller's synchronous work
    }
    await sleep(2 * PROBE_INTERVAL_MS);
    expect(await burst('after')).toEqual(Array(48).fill('ok'));
    // The second burst's connections are on the thread (48 at most); at most INLINE_IN_COMPANY (16) of the first
    // burst's sit idle here, and the held request has one.
    expect(await leasedTo(daemon.socketPath, origin.port)).toBeLessThanOrEqual(leasedBefore + 48 + 16 + 1);
    expect(await held).toBe('SOCKPOOL_ERR_TIMEOUT');
  });
});

describe('a lone request follows its origin’s connections', () => {
  it('to the threads after a burst ran there, and here again after a few lone requests in a row', async () => {
    const { client } = await clientWithThread({ inlineWhileResponsive: false });
    // Two together: on the thread, two connections in its cache.
    const burst = await Promise.all([client.request(url('/x1')), client.request(url('/x2'))]);
    expect(burst.map((response) => response.status)).toEqual([200, 200]);
    const connections: string[] = [];
    for (let i = 0; i < 6; i++) connections.push((await client.request(url(`/seq-${i}`))).connection);
    // Three on the thread's connections, then one here on a new lease, kept from then on.
    expect(connections).toEqual(['reused', 'reused', 'reused', 'leased', 'reused', 'reused']);
  });

  it('at a capped origin (maxPerOrigin 1) a burst gets the room a lone request’s idle connection holds here', async () => {
    const { client } = await clientWithThread({ inlineWhileResponsive: false });
    expect((await client.request(url('/first', capped))).status).toBe(200);
    // Its connection is idle in this thread's cache, holding the origin's one slot: the thread's requests wait
    // until the daemon's reclaim notice makes it give the connection back.
    const burst = await Promise.all(
      Array.from({ length: 4 }, (_, i) => client.request(url(`/burst-${i}`, capped), { timeoutMs: 20_000 })),
    );
    expect(burst.map((response) => response.status)).toEqual([200, 200, 200, 200]);
    expect(capped.sockets.size).toBeLessThanOrEqual(1);
  });
});

/** Requests to `count` origins no test serves (ports the daemon does not allow: each fails at once), in bursts of
 *  `burst` made together: the client makes a route for each. Returns their outcomes' codes, once each. */
async function touchOrigins(client: SockpoolClient, count: number, burst: number): Promise<string[]> {
  const ours = new Set([origin.port, capped.port, other.port]);
  const ports: number[] = [];
  for (let port = 20_000; ports.length < count; port++) if (!ours.has(port)) ports.push(port);
  const codes = new Set<string>();
  for (let i = 0; i < count; i += burst) {
    const outcomes = ports.slice(i, i + burst).map((port) => codeOf(client.request(`http://127.0.0.1:${port}/`)));
    for (const code of await Promise.all(outcomes)) codes.add(code ?? 'none');
  }
  return [...codes];
}

/** `count` POSTs (not retried when their connections go at the end) that hang at `server` until the test ends them,
 *  once all of them are there. */
async function hangAt(client: SockpoolClient, server: Origin, count: number, tag: string): Promise<Promise<unknown>[]> {
  const hangsBefore = hanging.length;
  const held = Array.from({ length: count }, (_, i) =>
    codeOf(client.request(url(`/hang/${tag}-${i}`, server), { method: 'POST' })),
  );
  await eventually(() => hanging.length >= hangsBefore + count, `${count} requests hanging at the origin`);
  return held;
}

describe('an origin’s route', () => {
  it('an origin whose requests in company moved to the threads counts as new here once its mark ends: with the caller’s thread’s share taken, its requests go to the threads', async () => {
    const { client, thread, loop } = await steadyClientWithThread({ timeoutMs: 10_000 });
    // A lone request runs here; its connection stays idle here.
    expect((await client.request(url('/lone', other))).status).toBe(200);
    // A slow turn of the caller's loop while a request is in flight: a pair to the origin goes to the thread (blocked:
    // they meet their deadlines there), and the origin's requests in company stay there for ORIGIN_ON_THREADS_MS.
    const probed = await hangAt(client, origin, 1, 'probed');
    loop.slowTurn();
    await sleep(2 * PROBE_INTERVAL_MS);
    const unblock = await block(thread);
    const moved = [
      client.request(url('/m-0', other), { timeoutMs: 300 }),
      client.request(url('/m-1', other), { timeoutMs: 300 }),
    ];
    expect(await Promise.all(moved.map(codeOf))).toEqual(['SOCKPOOL_ERR_TIMEOUT', 'SOCKPOOL_ERR_TIMEOUT']);
    unblock();
    for (const response of hanging.splice(0)) response.destroy();
    await Promise.all(probed);
    // The mark over and the caller's loop keeping up, requests to `origin` take the caller's thread's share (they
    // run here: the thread is blocked).
    await sleep(ORIGIN_ON_THREADS_MS);
    await loop.keepsUp();
    await block(thread);
    const share = await hangAt(client, origin, INLINE_IN_COMPANY, 'share');
    // The origin's requests last ran on the thread: it is new here, and the share is taken.
    const after = [
      client.request(url('/a-0', other), { timeoutMs: 300 }),
      client.request(url('/a-1', other), { timeoutMs: 300 }),
    ];
    expect(await Promise.all(after.map(codeOf))).toEqual(['SOCKPOOL_ERR_TIMEOUT', 'SOCKPOOL_ERR_TIMEOUT']);
    for (const response of hanging.splice(0)) response.destroy();
    await Promise.all(share);
  });

  it('an origin marked on the threads keeps its mark through requests to more than twice ROUTES_KEPT other origins', async () => {
    const { client, thread } = await steadyClientWithThread({ timeoutMs: 10_000 });
    // The caller's thread's share taken (by `origin`), a pair to an origin new here goes to the thread (it runs),
    // and marks it there.
    const share = await hangAt(client, origin, INLINE_IN_COMPANY, 'share');
    const markedAt = performance.now();
    const marked = await Promise.all([client.request(url('/m-0', other)), client.request(url('/m-1', other))]);
    expect(marked.map((response) => response.status)).toEqual([200, 200]);
    for (const response of hanging.splice(0)) response.destroy();
    await Promise.all(share);
    // Requests to many origins, in bursts that run here (the share free again).
    expect(await touchOrigins(client, 2 * ROUTES_KEPT + INLINE_IN_COMPANY, 8)).toEqual(['SOCKPOOL_ERR_POLICY']);
    await block(thread);
    // (What follows is about a mark still running.)
    expect(performance.now() - markedAt, 'the mark still runs').toBeLessThan(ORIGIN_ON_THREADS_MS);
    // Its mark remembered, the origin's requests in company still go to the thread.
    const after = [
      client.request(url('/a-0', other), { timeoutMs: 300 }),
      client.request(url('/a-1', other), { timeoutMs: 300 }),
    ];
    expect(await Promise.all(after.map(codeOf))).toEqual(['SOCKPOOL_ERR_TIMEOUT', 'SOCKPOOL_ERR_TIMEOUT']);
  });

  it('an origin with requests in flight here stays here through requests to more than twice ROUTES_KEPT other origins', async () => {
    const { client, thread } = await steadyClientWithThread({ timeoutMs: 10_000 });
    const inFlight = await hangAt(client, other, 4, 'in-flight');
    // Requests to many origins, in bursts that run here beside those 4.
    expect(await touchOrigins(client, 2 * ROUTES_KEPT + INLINE_IN_COMPANY, 8)).toEqual(['SOCKPOOL_ERR_POLICY']);
    await block(thread);
    // Requests to `origin` take the rest of the caller's thread's share (they run here: the thread is blocked).
    const share = await hangAt(client, origin, INLINE_IN_COMPANY - 4, 'share');
    // The origin's requests run here: a pair to it runs here too, and finishes while the thread is blocked.
    const pair = [
      client.request(url('/p-0', other), { timeoutMs: 5_000 }),
      client.request(url('/p-1', other), { timeoutMs: 5_000 }),
    ];
    expect(await Promise.all(pair.map(codeOf))).toEqual(['ok', 'ok']);
    for (const response of hanging.splice(0)) response.destroy();
    await Promise.all([...inFlight, ...share]);
  });
});

/** What each open fd of this process is (socket:[inode], anon_inode:[eventpoll], a path). */
function fdTargets(): Map<string, string> {
  const targets = new Map<string, string>();
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      targets.set(fd, readlinkSync(`/proc/self/fd/${fd}`));
    } catch {
      // closed meanwhile
    }
  }
  return targets;
}

it('close() closes what the caller’s thread held: its daemon link and curl’s connections, a burst’s too', async () => {
  const before = clientFds();
  const targetsBefore = fdTargets();
  const leasedBefore = await leasedTo(daemon.socketPath, origin.port);
  const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
  for (let i = 0; i < 3; i++) expect((await client.request(url(`/fd-${i}`))).status).toBe(200);
  expect(await leasedTo(daemon.socketPath, origin.port)).toBe(leasedBefore + 1);
  // A burst larger than the caller's thread takes on in company: connections here and on the thread.
  const burst = await Promise.all(Array.from({ length: 24 }, (_, i) => client.request(url(`/fd-burst-${i}`))));
  expect(burst.every((response) => response.status === 200)).toBe(true);
  await client.close();
  // (On failure, the fds that are new since the start say what was left open.)
  const left = () =>
    [...fdTargets()]
      .filter(([fd, target]) => targetsBefore.get(fd) !== target)
      .map(([fd, target]) => `${fd} ${target}`);
  await eventually(
    () => clientFds() <= before,
    () => `fds back to ${before} (now ${clientFds()}; new: ${left().join(', ')})`,
  );
  await eventually(async () => (await leasedTo(daemon.socketPath, origin.port)) === leasedBefore, 'lease ended');
});
