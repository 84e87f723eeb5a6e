// CurlEngine in-process (worker/curl-engine.ts): real libcurl and a real loopback HTTP server, with the socket
// supply over a fake daemon link whose leases are real loopback connections made by the daemon's connectTcp (the
// test decides which ones are dead on arrival). Covered: leased and reused connections, the retry rules (a dead
// handed connection is retried once for idempotent methods only, unless retries are off; a starved transfer is run
// again with a socket), https transfers started together (one socket, multiplexed over HTTP/2; run again with
// sockets of their own over HTTP/1.1), the direct fallback when no daemon answers, acquire timeouts against the
// request's own deadline, a deadline already passed, cancellation and close, and how many handles the engine keeps
// (free, and resting after cancelled HTTP/2 streams), and a rate-limited origin's token given back, once, by an attempt
// that sent nothing of its request (never spent by one that did), and that a finished transfer's caller's next request
// goes into curl at once, alone or with others running. Every test ends with as many fds as it began with.
import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import { MessageChannel } from 'node:worker_threads';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { connectTcp } from '../daemon/tcp-connect.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { Cancellation } from '../worker/cancellation.js';
import { type ClientPolicy, CurlEngine, epochNow, type TransferRequest } from '../worker/curl-engine.js';
import { RateTokens } from '../worker/rate-tokens.js';
import type { ResponseSink } from '../worker/response-sink.js';
import { SocketSupply } from '../worker/socket-supply.js';
import { h2Origin, httpsOrigin } from './fixtures/client-helpers.js';
import { FakeLink } from './fixtures/fake-link.js';
import { fdCount } from './fixtures/native-helpers.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let server: http.Server;
let port: number;
/** Server-side connections by the client's port, and every one in accept order. */
let byClientPort: Map<number, net.Socket>;
let connections: net.Socket[];
let accepted: Array<() => void>;
/** Requests that reached the server, by path. */
let seen: string[];
let requestArrived: Array<() => void>;
/** Answers to /held requests, sent when the test says. */
let held: Array<() => void>;
/** Leases to hand out dead: the server closes them before curl gets them. */
let deadOnArrival: number;
let link: FakeLink;
/** Where the link's leases connect: the HTTP server, unless a test points it at an https origin. */
let linkPort: number;
let engines: CurlEngine[];
let fdsBefore: number;

beforeEach(async () => {
  fdsBefore = fdCount();
  byClientPort = new Map();
  connections = [];
  accepted = [];
  seen = [];
  requestArrived = [];
  held = [];
  deadOnArrival = 0;
  engines = [];
  server = http.createServer((request, response) => {
    seen.push(`${request.method} ${request.url}`);
    for (const wake of requestArrived.splice(0)) wake();
    if (request.url === '/hang') return; // answered never: the transfer ends by cancel or close
    if (request.url === '/held') return void held.push(() => response.end('held'));
    if (request.url === '/part') {
      response.writeHead(200, { 'content-length': '1000' });
      return void response.write('part of the body'); // and never the rest
    }
    request.resume();
    request.on('end', () => response.end(`hello from ${request.url}`));
  });
  server.on('connection', (socket) => {
    byClientPort.set(socket.remotePort!, socket);
    connections.push(socket);
    for (const wake of accepted.splice(0)) wake();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  port = (server.address() as net.AddressInfo).port;
  linkPort = port;
  link = new FakeLink(async () => {
    const fd = await connectTcp('127.0.0.1', linkPort, { timeoutMs: 5_000 });
    if (deadOnArrival > 0) {
      deadOnArrival--;
      const peer = await serverSideOf(fd);
      peer.destroy();
      await once(peer, 'close');
    }
    return { fd, address: '127.0.0.1', family: 4 };
  });
});

afterEach(async () => {
  for (const engine of engines) engine.close();
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  expect(link.outstanding.size).toBe(0);
  expect(fdCount()).toBe(fdsBefore);
});

async function serverSideOf(fd: number): Promise<net.Socket> {
  const { port: clientPort } = native.localAddress(fd);
  while (!byClientPort.has(clientPort)) await new Promise<void>((resolve) => accepted.push(resolve));
  return byClientPort.get(clientPort)!;
}

function engine(policy: Partial<ClientPolicy> = {}, callerThread = false): CurlEngine {
  const created = new CurlEngine(new SocketSupply(link), { acquireTimeoutMs: 5_000, ...policy }, { callerThread });
  engines.push(created);
  return created;
}

function request(path: string, overrides: Partial<TransferRequest> = {}): TransferRequest {
  return {
    url: `http://127.0.0.1:${port}${path}`,
    method: 'GET',
    headers: [],
    deadline: epochNow() + 30_000,
    timeoutMs: 30_000,
    ...overrides,
  };
}

/** Resolves when the server has seen `count` requests. */
async function requestsSeen(count: number): Promise<void> {
  while (seen.length < count) await new Promise<void>((resolve) => requestArrived.push(resolve));
}

const text = (body: Uint8Array) => Buffer.from(body).toString();

/** A sink that takes the body and says when its first bytes came: in a later turn, as a request's port does, or
 *  (`inCallback`) at once, so that what awaits it runs at the end of curl's WRITEFUNCTION, still inside curl. */
function bodyBegins(inCallback = false): { sink: ResponseSink; begun: Promise<void> } {
  let begin!: () => void;
  const begun = new Promise<void>((resolve) => {
    begin = resolve;
  });
  const sink: ResponseSink = {
    committed: false,
    head() {},
    write() {
      if (inCallback) begin();
      else setImmediate(begin);
      return true;
    },
    onWritable() {},
    reset() {},
  };
  return { sink, begun };
}

describe('CurlEngine connections', () => {
  it('runs a transfer over a leased socket and the next over the connection curl kept', async () => {
    const curl = engine();
    const first = await curl.run(request('/one'));
    expect(first.ok && first.result).toMatchObject({ status: 200, connection: 'leased', httpVersion: '1.1' });
    expect(first.ok && text(first.result.body)).toBe('hello from /one');
    const second = await curl.run(request('/two'));
    expect(second.ok && second.result).toMatchObject({ status: 200, connection: 'reused', warm: true });
    expect(link.acquires).toHaveLength(1);
    expect(connections).toHaveLength(1);
    curl.close(); // curl closes its connection: the lease is reported closed
    expect(link.closedLeases).toEqual([1]);
  });

  it('gives bodies that own exactly their memory (to be moved to another thread), or in the caller’s thread bodies that later ones leave intact', async () => {
    const moving = engine();
    const inCaller = engine({}, true);
    const keptBodies: Uint8Array[] = [];
    for (let i = 0; i < 3; i++) {
      const moved = await moving.run(request(`/m${i}`));
      const body = moved.ok ? moved.result.body! : Buffer.alloc(0);
      expect(text(body)).toBe(`hello from /m${i}`);
      // What the lane transfers is exactly the body.
      expect([body.byteOffset, body.buffer.byteLength]).toEqual([0, body.length]);
      const { port1, port2 } = new MessageChannel();
      port1.postMessage(body, [body.buffer as ArrayBuffer]);
      port1.close();
      port2.close();

      const kept = await inCaller.run(request(`/c${i}`));
      keptBodies.push(kept.ok ? kept.result.body! : Buffer.alloc(0));
    }
    // (Each copied out of the engine's scratch, which every body passes through: none is a view of it.)
    expect(keptBodies.map(text)).toEqual(['hello from /c0', 'hello from /c1', 'hello from /c2']);
  });

  it('runs a starved transfer again with a socket of its own when the connection curl kept has died', async () => {
    const curl = engine();
    expect((await curl.run(request('/one'))).ok).toBe(true);
    const kept = connections[0]!;
    kept.destroy(); // the server drops the keep-alive connection
    await once(kept, 'close');
    const outcome = await curl.run(request('/two'));
    expect(outcome.ok && outcome.result.connection).toBe('leased');
    expect(link.acquires).toHaveLength(2);
    expect(seen).toEqual(['GET /one', 'GET /two']);
  });

  it('lets curl connect by itself when no daemon answers and directFallback is on', async () => {
    const unavailable = () => new SockpoolError(ErrorCodes.DAEMON_UNAVAILABLE, 'no daemon');
    link.failures.push(unavailable());
    const direct = await engine({ directFallback: true }).run(request('/direct'));
    expect(direct.ok && direct.result.connection).toBe('direct');
    expect(seen).toEqual(['GET /direct']);

    link.failures.push(unavailable());
    const refused = await engine().run(request('/refused'));
    expect(refused.ok === false && refused.error.code).toBe(ErrorCodes.DAEMON_UNAVAILABLE);
    expect(seen).toEqual(['GET /direct']);
  });
});

describe('CurlEngine retries', () => {
  it('retries an idempotent request once on a fresh socket when the handed connection was dead', async () => {
    deadOnArrival = 1;
    const outcome = await engine().run(request('/retried'));
    expect(outcome.ok && outcome.result).toMatchObject({ status: 200, connection: 'leased' });
    expect(link.acquires).toHaveLength(2);
    expect(seen).toEqual(['GET /retried']);
  });

  it('retries a dead connection only once', async () => {
    deadOnArrival = 2;
    const outcome = await engine().run(request('/twice'));
    expect(outcome.ok).toBe(false);
    expect(!outcome.ok && outcome.error).toMatchObject({
      code: ErrorCodes.TRANSFER,
      fields: { deadConnection: true },
    });
    expect(link.acquires).toHaveLength(2);
  });

  it('does not retry a POST, nor anything when retries are off', async () => {
    deadOnArrival = 1;
    const post = await engine().run(request('/post', { method: 'POST', body: Buffer.from('once') }));
    expect(!post.ok && post.error).toMatchObject({ code: ErrorCodes.TRANSFER, fields: { deadConnection: true } });
    expect(link.acquires).toHaveLength(1);

    deadOnArrival = 1;
    const get = await engine({ retryDeadConnection: false }).run(request('/get'));
    expect(!get.ok && get.error.code).toBe(ErrorCodes.TRANSFER);
    expect(link.acquires).toHaveLength(2);

    // POST may be allowed explicitly.
    deadOnArrival = 1;
    const allowed = await engine({ retryMethods: ['POST'] }).run(
      request('/post', { method: 'POST', body: Buffer.from('again') }),
    );
    expect(allowed.ok).toBe(true);
    expect(link.acquires).toHaveLength(4);
    expect(seen).toEqual(['POST /post']);
  });
});

describe('CurlEngine deadlines, cancellation and close', () => {
  it('turns an acquire timeout cut short by the request deadline into the request timeout', async () => {
    const curl = engine({ acquireTimeoutMs: 60_000 });
    link.failures.push(new SockpoolError(ErrorCodes.ACQUIRE_TIMEOUT, 'no connection in time'));
    const cut = await curl.run(request('/cut', { deadline: epochNow() + 1_000, timeoutMs: 1_000 }));
    expect(!cut.ok && cut.error.code).toBe(ErrorCodes.TIMEOUT);
    expect(link.acquires[0]!.timeoutMs).toBeLessThanOrEqual(1_000);

    link.failures.push(new SockpoolError(ErrorCodes.ACQUIRE_TIMEOUT, 'no connection in time'));
    const own = await engine({ acquireTimeoutMs: 500 }).run(request('/own'));
    expect(!own.ok && own.error.code).toBe(ErrorCodes.ACQUIRE_TIMEOUT);
    expect(link.acquires[1]!.timeoutMs).toBe(500);
  });

  it('fails a request whose deadline has passed without asking for a socket', async () => {
    const late = await engine().run(request('/late', { deadline: epochNow() - 1 }));
    expect(!late.ok && late.error.code).toBe(ErrorCodes.TIMEOUT);
    expect(link.acquires).toHaveLength(0);
  });

  it('cancels a transfer inside curl with its signal and closes the connection it left mid-response', async () => {
    const curl = engine();
    const cancellation = new Cancellation();
    const running = curl.run(request('/hang'), { signal: cancellation });
    await requestsSeen(1);
    const peer = connections[0]!;
    const reason = new SockpoolError(ErrorCodes.ABORTED, 'aborted by the caller');
    cancellation.cancel(reason);
    const outcome = await running;
    expect(!outcome.ok && outcome.error).toMatchObject({ code: ErrorCodes.ABORTED, message: reason.message });
    await once(peer, 'close');
    expect(link.closedLeases).toEqual([1]);
  });

  it('carries the next transfers on the handles of transfers cancelled over HTTP/1.1 (no rest: their connection is closed)', async () => {
    // Found in review (sixteenth session): every handle taken out mid-transfer rested 10 s, also over HTTP/1.1 where
    // curl closes the connection left mid-response and nothing of it can reach the handle again; each cancellation
    // (a timeout against a slow site, a body cancelled after its head) cost a new curl handle, alive till close.
    const curl = engine();
    for (let round = 0; round < 5; round++) {
      const cancellations = [1, 2, 3].map(() => new Cancellation());
      const running = cancellations.map((signal) => curl.run(request('/hang'), { signal }));
      await requestsSeen(3 * (round + 1));
      for (const signal of cancellations) signal.cancel(new SockpoolError(ErrorCodes.ABORTED, 'cancelled'));
      for (const outcome of await Promise.all(running))
        expect(!outcome.ok && outcome.error.code).toBe('SOCKPOOL_ERR_ABORTED');
    }
    expect(curl.handles).toBe(3);
  });

  it('keeps no more handles than the free list holds once a burst larger than it is over', async () => {
    // Found in review (sixteenth session): a handle released with the free list full (256) stayed alive, unused, until
    // the engine closed, and the next burst made as many new ones: each burst of more transfers at once than that
    // (concurrencyPerThread above 256, or HTTP/2 streams cancelled faster than the 10 s rest frees handles) added
    // its excess for good, about 46 KiB each.
    const curl = engine();
    const burst = 300;
    const handles: number[] = [];
    for (let round = 0; round < 3; round++) {
      const running = Array.from({ length: burst }, () => curl.run(request('/held')));
      await requestsSeen(burst * (round + 1));
      for (const answer of held.splice(0)) answer();
      for (const outcome of await Promise.all(running)) expect(outcome.ok && text(outcome.result.body)).toBe('held');
      handles.push(curl.handles);
    }
    expect(handles).toEqual([256, 256, 256]);
  });

  it('fails a transfer cancelled from a microtask that ran at the end of one of curl’s callbacks', async () => {
    // Found in review (sixteenth session): curl refuses curl_multi_remove_handle there (CURLM_RECURSIVE_API_CALL), and
    // #takeOut threw out of the cancel after it had taken the transfer's finish: the transfer never ended. (An
    // in-thread request's caller signal cancels synchronously; whatever awaits an outcome settled inside curl runs
    // there, as #perform already knows.)
    const curl = engine();
    const cancellation = new Cancellation();
    const { sink, begun } = bodyBegins(true);
    const running = curl.run(request('/part'), { signal: cancellation, sink });
    await begun;
    const reason = new SockpoolError(ErrorCodes.ABORTED, 'cancelled inside curl');
    cancellation.cancel(reason);
    const outcome = await running;
    expect(!outcome.ok && outcome.error).toMatchObject({ code: ErrorCodes.ABORTED, message: reason.message });
    expect(await curl.run(request('/after'))).toMatchObject({ ok: true });
  });

  it('a request that a finished transfer’s caller starts while others run is added to curl at once, not inside one of curl’s callbacks (a turn later)', async () => {
    // The engine finishes the only transfer running in node-libcurl's completion callback, and transfers finished
    // while others run in an immediate (curl-engine.ts). Finished in the callback, what they settle continued at the
    // next microtask checkpoint, which with other sockets ready in the same poll phase is the end of curl's
    // WRITEFUNCTION for another transfer: inside curl, which refuses the next request's handle there.
    const curl = engine();
    const callers = 8;
    const each = 40;
    await Promise.all(
      Array.from({ length: callers }, async (_, caller) => {
        for (let i = 0; i < each; i++) {
          const outcome = await curl.run(request(`/caller/${caller}/${i}`));
          expect(outcome.ok && text(outcome.result.body)).toBe(`hello from /caller/${caller}/${i}`);
        }
      }),
    );
    expect(seen).toHaveLength(callers * each);
    expect(curl.addsDeferred).toBe(0);
    // One alone: finished in the callback, its caller's next request still goes in at once.
    for (let i = 0; i < 20; i++) expect(await curl.run(request(`/alone/${i}`))).toMatchObject({ ok: true });
    expect(curl.addsDeferred).toBe(0);
  });

  it('fails the transfers still running with SOCKPOOL_ERR_CLOSED on close', async () => {
    const curl = engine();
    const running = curl.run(request('/hang'));
    await requestsSeen(1);
    curl.close();
    const outcome = await running;
    expect(!outcome.ok && outcome.error.code).toBe(ErrorCodes.CLOSED);
    expect(link.closedLeases).toEqual([1]);
    const after = await curl.run(request('/after'));
    expect(!after.ok && after.error.code).toBe(ErrorCodes.CLOSED);
  });
});

describe('CurlEngine options curl refuses', () => {
  it('fails the transfer (typed, settled, its lease given back) when curl refuses an option of the policy', async () => {
    // Found in review: a caFile of the wrong type made setOpt throw while a handle was made, after the socket came:
    // the throw escaped from a promise callback (an unhandled rejection: the caller's process or thread crashed) and
    // the transfer never settled, not even at its deadline. The client checks its options now; the engine must
    // still fail the one transfer for whatever option curl refuses.
    const curl = engine({ caFile: 123 as unknown as string });
    const outcome = await Promise.race([
      curl.run(request('/refused', { deadline: epochNow() + 2_000, timeoutMs: 2_000 })),
      new Promise((resolve) => setTimeout(() => resolve('not settled 1 s after its deadline'), 3_000)),
    ]);
    expect(outcome).toMatchObject({
      ok: false,
      error: { code: ErrorCodes.INTERNAL, message: expect.stringMatching(/^GET .*\/refused: curl refused .*string/) },
    });
    expect(seen).toEqual([]);
    // (afterEach: no lease outstanding, no fd left.)
  });
});

describe('CurlEngine rate tokens', () => {
  // Found in review (nineteenth session): a transfer that took a token of its rate-limited origin and then never
  // sent its request (the engine closed as its socket came, cancelled just then, or before curl wrote any of it)
  // kept the token: lost, and at a slow rate the next request waited for the next one, or was refused.

  /** An engine whose origin (`port`, the test server's unless given) has a rate, with one token in the worker's
   *  batch; the link refuses every `tokens` request (no token is due). `held()`: a request now takes one at once. */
  function rated(tokenPort = port, policy: Partial<ClientPolicy> = {}) {
    const asks: number[] = [];
    const tokens = new RateTokens(
      {
        tokens(_host, _port, count) {
          asks.push(count);
          return Promise.reject(new SockpoolError(ErrorCodes.RATE_LIMITED, 'no token due', { waitMs: 60_000 }));
        },
      },
      // (A clock that stands still: the token never expires in the batch.)
      () => 0,
    );
    tokens.learn('127.0.0.1', tokenPort, { requestsPerSecond: 1 / 60, burst: 1 });
    tokens.giveBack('127.0.0.1', tokenPort, 1_000);
    const curl = new CurlEngine(new SocketSupply(link), { acquireTimeoutMs: 5_000, ...policy }, { rateTokens: tokens });
    engines.push(curl);
    const held = (): boolean => {
      const taken = tokens.take('127.0.0.1', tokenPort, 1_000);
      if (taken instanceof Promise) taken.catch(() => {});
      return typeof taken === 'number';
    };
    return { curl, held, asks };
  }

  it('gives the token back, once, when the engine closed before the socket came', async () => {
    const { curl, held } = rated();
    link.manual = true;
    const running = curl.run(request('/closed'));
    expect(link.pending).toHaveLength(1);
    curl.close();
    await link.pending[0]!.grant();
    const outcome = await running;
    expect(!outcome.ok && outcome.error.code).toBe(ErrorCodes.CLOSED);
    expect(seen).toEqual([]);
    // Before: false (lost). Never twice: the second request finds the batch empty.
    expect(held()).toBe(true);
    expect(held()).toBe(false);
  });

  it('gives the token back, once, when the transfer was cancelled as its socket came', async () => {
    const { curl, held } = rated();
    link.manual = true;
    const cancellation = new Cancellation();
    const running = curl.run(request('/cancelled'), { signal: cancellation });
    await link.pending[0]!.grant();
    // (Between the lease and the transfer's start in curl.)
    const reason = new SockpoolError(ErrorCodes.ABORTED, 'cancelled as the socket came');
    cancellation.cancel(reason);
    const outcome = await running;
    expect(!outcome.ok && outcome.error.message).toBe(reason.message);
    expect(seen).toEqual([]);
    expect(held()).toBe(true);
    expect(held()).toBe(false);
  });

  it('gives the token back when the transfer was cancelled before curl wrote its request; one sent spends it', async () => {
    // An origin that takes the connection and never answers the TLS handshake: curl sends nothing.
    const silent: net.Socket[] = [];
    const stalling = net.createServer((socket) => silent.push(socket));
    stalling.listen(0, '127.0.0.1');
    await once(stalling, 'listening');
    const stallPort = (stalling.address() as net.AddressInfo).port;
    try {
      linkPort = stallPort;
      const { curl, held } = rated(stallPort, { insecure: true });
      const cancellation = new Cancellation();
      const url = `https://127.0.0.1:${stallPort}/handshake`;
      const running = curl.run(request('/', { url }), { signal: cancellation });
      while (silent.length === 0) await new Promise((resolve) => setTimeout(resolve, 5));
      cancellation.cancel(new SockpoolError(ErrorCodes.ABORTED, 'cancelled in the handshake'));
      const outcome = await running;
      expect(!outcome.ok && outcome.error.code).toBe(ErrorCodes.ABORTED);
      expect(held()).toBe(true);
      expect(held()).toBe(false);
    } finally {
      for (const socket of silent) socket.destroy();
      await new Promise<void>((resolve) => stalling.close(() => resolve()));
    }
    // A request that went out and was cancelled waiting for its response spent its token.
    linkPort = port;
    const { curl, held } = rated();
    const cancellation = new Cancellation();
    const running = curl.run(request('/hang'), { signal: cancellation });
    await requestsSeen(1);
    cancellation.cancel(new SockpoolError(ErrorCodes.ABORTED, 'cancelled after it went out'));
    expect(!(await running).ok).toBe(true);
    expect(held()).toBe(false);
  });
});

describe('CurlEngine over https', () => {
  let pki: TestPki;
  beforeAll(() => {
    pki = createTestPki(['localhost']);
  });
  afterAll(() => pki.cleanup());

  /** Holds every response until `count` requests are in: they can only all be answered if they ran together. */
  function answerTogether(count: number) {
    const held: Array<() => void> = [];
    return (request: { url?: string | undefined }, response: { end(body: string): void }) => {
      held.push(() => response.end(`together ${request.url}`));
      if (held.length === count) for (const answer of held.splice(0)) answer();
    };
  }

  async function runTogether(originPort: number): Promise<Array<{ httpVersion: string; connection: string }>> {
    linkPort = originPort;
    const curl = engine({ caFile: pki.caFile });
    const outcomes = await Promise.all(
      [1, 2, 3].map((i) => curl.run(request('', { url: `https://localhost:${originPort}/${i}` }))),
    );
    return outcomes.map((outcome) => {
      if (!outcome.ok) throw new Error(`transfer failed: ${outcome.error.message}`);
      return outcome.result;
    });
  }

  it('brings one socket for transfers that start together, and multiplexes them when the origin speaks HTTP/2', async () => {
    const origin = await h2Origin(pki, answerTogether(3));
    try {
      const results = await runTogether(origin.port);
      expect(results.map((result) => result.httpVersion)).toEqual(['2', '2', '2']);
      expect(link.acquires).toHaveLength(1);
      expect(origin.connections()).toBe(1);
    } finally {
      for (const engine of engines.splice(0)) engine.close();
      await origin.close();
    }
  });

  it('closes the handles the free list has no room for while their HTTP/2 connections carry on', async () => {
    // (The connections outlive many of the handles that carried streams on them: see the header of curl-engine.ts.)
    const origin = await h2Origin(pki, answerTogether(300));
    try {
      linkPort = origin.port;
      const curl = engine({ caFile: pki.caFile });
      const handles: number[] = [];
      for (let round = 0; round < 3; round++) {
        const outcomes = await Promise.all(
          Array.from({ length: 300 }, (_, i) =>
            curl.run(request('', { url: `https://localhost:${origin.port}/${round}-${i}` })),
          ),
        );
        for (const [i, outcome] of outcomes.entries()) {
          expect(outcome.ok && text(outcome.result.body)).toBe(`together /${round}-${i}`);
        }
        handles.push(curl.handles);
      }
      expect(handles).toEqual([256, 256, 256]);
    } finally {
      for (const engine of engines.splice(0)) engine.close();
      await origin.close();
    }
  });

  it('rests no more handles than the free list holds after HTTP/2 streams cancelled mid-body, and closes the others while their connections carry on', async () => {
    // Found in review (sixteenth session, left then; fixed in the seventeenth): a handle whose HTTP/2 stream was
    // cancelled rests 10 s, and nothing bounded how many rested at once: 1,000 cancellations a second kept about
    // 10,000 handles (some 460 MB) alive until they woke.
    const siblings: Array<() => void> = [];
    const origin = await h2Origin(pki, (request, response) => {
      const url = request.url ?? '';
      if (url.startsWith('/held')) return void siblings.push(() => response.end(`ok ${url}`));
      if (!url.startsWith('/part')) return void response.end(`ok ${url}`);
      // A body that goes on until the stream is reset: frames of it are still on their way when the handle that
      // carried it is closed.
      response.writeHead(200);
      const more = setInterval(() => response.write('x'.repeat(256)), 20);
      response.on('close', () => clearInterval(more));
    });
    try {
      linkPort = origin.port;
      const curl = engine({ caFile: pki.caFile });
      const base = `https://localhost:${origin.port}`;
      expect(await curl.run(request('', { url: `${base}/first` }))).toMatchObject({ ok: true });
      const counts: Array<{ resting: number; handles: number }> = [];
      for (let round = 0; round < 2; round++) {
        // Streams that run through the cancellations, on the same connections (as many as curl chose).
        const held = [1, 2, 3].map((i) => curl.run(request('', { url: `${base}/held-${round}-${i}` })));
        const cancellations = Array.from({ length: 300 }, () => new Cancellation());
        // Each cancelled once its body has begun: a stream of its connection, mid-body.
        const bodies: Array<Promise<void>> = [];
        const running = cancellations.map((signal, i) => {
          const { sink, begun } = bodyBegins();
          bodies.push(begun);
          return curl.run(request('', { url: `${base}/part-${round}-${i}` }), { signal, sink });
        });
        await Promise.all(bodies);
        for (const signal of cancellations) signal.cancel(new SockpoolError(ErrorCodes.ABORTED, 'cancelled'));
        for (const outcome of await Promise.all(running))
          expect(!outcome.ok && outcome.error.code).toBe('SOCKPOOL_ERR_ABORTED');
        // (The held streams' three handles besides the resting ones.)
        counts.push({ resting: curl.resting, handles: curl.handles });
        for (const answer of siblings.splice(0)) answer();
        expect((await Promise.all(held)).map((outcome) => outcome.ok && text(outcome.result.body))).toEqual(
          [1, 2, 3].map((i) => `ok /held-${round}-${i}`),
        );
        const after = await Promise.all(
          [1, 2, 3].map((i) => curl.run(request('', { url: `${base}/after-${round}-${i}` }))),
        );
        expect(after.map((outcome) => outcome.ok && [text(outcome.result.body), outcome.result.connection])).toEqual(
          [1, 2, 3].map((i) => [`ok /after-${round}-${i}`, 'reused']),
        );
      }
      expect(counts).toEqual([
        { resting: 256, handles: 259 },
        { resting: 256, handles: 259 },
      ]);
    } finally {
      for (const engine of engines.splice(0)) engine.close();
      await origin.close();
    }
  });

  it('carries the next transfers on the handles of transfers cancelled mid-body over https that turned out HTTP/1.1', async () => {
    // (As over http://: curl closes the HTTP/1.1 connection a transfer left mid-body, so its handle need not rest.)
    const origin = await httpsOrigin(pki, (_request, response) => {
      response.writeHead(200, { 'content-length': '1000' });
      response.write('part of the body'); // and never the rest
    });
    try {
      linkPort = origin.port;
      const curl = engine({ caFile: pki.caFile });
      const url = `https://localhost:${origin.port}/`;
      for (let round = 0; round < 5; round++) {
        const cancellations = [1, 2, 3].map(() => new Cancellation());
        // Each cancelled once its body has begun (curl has read the head: it knows the transfer's HTTP version).
        const bodies: Array<Promise<void>> = [];
        const running = cancellations.map((signal) => {
          const { sink, begun } = bodyBegins();
          bodies.push(begun);
          return curl.run(request('', { url }), { signal, sink });
        });
        await Promise.all(bodies);
        for (const signal of cancellations) signal.cancel(new SockpoolError(ErrorCodes.ABORTED, 'cancelled'));
        for (const outcome of await Promise.all(running))
          expect(!outcome.ok && outcome.error.code).toBe('SOCKPOOL_ERR_ABORTED');
      }
      expect(curl.handles).toBe(3);
    } finally {
      for (const engine of engines.splice(0)) engine.close();
      await origin.close();
    }
  });

  it('runs the transfers that waited again with sockets of their own when the origin speaks HTTP/1.1', async () => {
    const origin = await httpsOrigin(pki, answerTogether(3));
    try {
      const results = await runTogether(origin.port);
      expect(results.map((result) => result.httpVersion)).toEqual(['1.1', '1.1', '1.1']);
      expect(results.map((result) => result.connection)).toEqual(['leased', 'leased', 'leased']);
      expect(link.acquires).toHaveLength(3);
      expect(origin.connections()).toBe(3);
    } finally {
      for (const engine of engines.splice(0)) engine.close();
      await origin.close();
    }
  });
});
