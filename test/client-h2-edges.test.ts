// HTTP/2 origins that misbehave while many streams share one handed connection: the connection closed under streams
// in flight. What must hold: a request the retry policy does not allow to run again (POST) reaches the origin at most
// once, whatever curl would retry by itself; requests that may run again do, over one new connection for the lot
// (not one each); every fd is closed once the client is.
// Real daemon child process, real node:http2 origin over TLS on 127.0.0.1 (and one HTTP/1.1 origin for the same retry
// rule over keep-alive).
import { once } from 'node:events';
import type http from 'node:http';
import http2 from 'node:http2';
import type { AddressInfo, Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  eventually,
  fdCount,
  httpOrigin,
  type Origin,
  originStats,
  startTestDaemon,
  warmTlsArgs,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

type StreamHandler = (stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders) => void;

interface H2Origin {
  port: number;
  server: http2.Http2SecureServer;
  /** TCP connections accepted so far (the daemon's connects), and those still open. */
  accepted(): number;
  /** HTTP/2 sessions so far: the connections curl spoke over (TLS and the preface done). */
  sessions(): number;
  sockets: Set<Socket>;
  /** Its sockets not destroyed: the fds it holds in this process (a destroyed one stays in `sockets` until 'close'). */
  openSockets(): number;
  /** How many times each "METHOD /path" arrived. */
  seen: Map<string, number>;
  /** What the origin does with each stream (set by each test). */
  handle: StreamHandler;
  close(): Promise<void>;
}

let pki: TestPki;
let h2: H2Origin;
let h1: Origin;
const h1Seen = new Map<string, number>();
let h1Handle: (request: http.IncomingMessage, response: http.ServerResponse) => void;
let daemon: DaemonProcess;

async function h2Origin(settings: http2.Settings = {}): Promise<H2Origin> {
  const server = http2.createSecureServer({ cert: pki.cert, key: pki.key, allowHTTP1: false, settings });
  let accepted = 0;
  let sessions = 0;
  const origin: H2Origin = {
    port: 0,
    server,
    accepted: () => accepted,
    sessions: () => sessions,
    sockets: new Set(),
    openSockets: () => [...origin.sockets].filter((socket) => !socket.destroyed).length,
    seen: new Map(),
    handle: answer,
    close: async () => {
      for (const socket of origin.sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  server.on('connection', (socket: Socket) => {
    accepted++;
    origin.sockets.add(socket);
    socket.on('close', () => origin.sockets.delete(socket));
  });
  server.on('session', (session) => {
    sessions++;
    session.on('error', () => {});
  });
  server.on('stream', (stream, headers) => {
    stream.on('error', () => {});
    const key = `${headers[':method']} ${headers[':path']}`;
    origin.seen.set(key, (origin.seen.get(key) ?? 0) + 1);
    origin.handle(stream, headers);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  origin.port = (server.address() as AddressInfo).port;
  return origin;
}

/** Answers `METHOD /path` once the request body (if any) is in. */
function answer(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders): void {
  stream.resume();
  stream.on('end', () => {
    if (stream.destroyed) return;
    stream.respond({ ':status': 200 });
    stream.end(`${headers[':method']} ${headers[':path']}`);
  });
}

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  h2 = await h2Origin();
  h1 = await httpOrigin((request, response) => {
    const key = `${request.method} ${request.url}`;
    h1Seen.set(key, (h1Seen.get(key) ?? 0) + 1);
    h1Handle(request, response);
  });
  daemon = await startTestDaemon([h2.port, h1.port], { extraArgs: ['--resolve', `localhost:${h2.port}:127.0.0.1`] });
});

afterAll(async () => {
  await daemon?.stop();
  await h2?.close();
  await h1?.close();
  pki?.cleanup();
});

function newClient(): SockpoolClient {
  return new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile, inlineWhenIdle: false });
}

/** A response's body, or the error's code and deadConnection flag. */
function outcome(pending: Promise<{ body: Buffer }>): Promise<string> {
  return pending.then(
    (response) => response.body.toString(),
    (error: { code?: string; deadConnection?: boolean }) => `${error.code} dead=${error.deadConnection}`,
  );
}

describe('an HTTP/2 connection that closes with streams in flight', () => {
  it('sends no POST twice (it fails, deadConnection); GETs run again', async () => {
    const base = `https://localhost:${h2.port}`;
    // Counted before the client exists: its thread opens its event loop's fds (epoll, eventfd, signal pipe,
    // io_uring) on its own schedule after the constructor returns, and a count taken meanwhile held some of them,
    // which the check after close() then let through as leaked fds.
    const fdsBefore = fdCount() - h2.openSockets();
    const client = newClient();
    try {
      h2.handle = answer;
      expect((await client.request(`${base}/first`)).httpVersion).toBe('2');
      // The origin reads every request of the batch, answers none, and then drops the connection (no GOAWAY): from
      // the client's side each stream of its reused connection died after its request went out.
      const posts = 5;
      const gets = 20;
      let arrived = 0;
      h2.handle = (stream, headers) => {
        if (h2.seen.get(`${headers[':method']} ${headers[':path']}`)! > 1) return answer(stream, headers);
        stream.resume();
        stream.on('end', () => {
          if (++arrived === posts + gets) for (const socket of h2.sockets) socket.destroy();
        });
      };
      const pending = [
        ...Array.from({ length: posts }, (_, i) =>
          outcome(client.request(`${base}/p${i}`, { method: 'POST', body: 'x' })),
        ),
        ...Array.from({ length: gets }, (_, i) => outcome(client.request(`${base}/g${i}`))),
      ];
      const results = await Promise.all(pending);
      expect(results.slice(0, posts)).toEqual(Array(posts).fill('SOCKPOOL_ERR_TRANSFER dead=true'));
      expect(results.slice(posts)).toEqual(Array.from({ length: gets }, (_, i) => `GET /g${i}`));
      for (let i = 0; i < posts; i++) expect(h2.seen.get(`POST /p${i}`)).toBe(1);
      for (let i = 0; i < gets; i++) expect(h2.seen.get(`GET /g${i}`)).toBe(2);
    } finally {
      await client.close();
    }
    await eventually(() => fdCount() - h2.openSockets() <= fdsBefore, `fds back to ${fdsBefore}`);
  }, 30_000);
});

describe('streams that lose their HTTP/2 connection together', () => {
  it('20 GETs whose connection the origin drops run again over one new connection, not one each', async () => {
    const base = `https://localhost:${h2.port}`;
    const fdsBefore = fdCount() - h2.openSockets(); // before the client's thread (see the first test)
    const client = newClient();
    try {
      h2.handle = answer;
      expect((await client.request(`${base}/drop-first`)).httpVersion).toBe('2');
      const acceptedBefore = h2.accepted();
      let arrived = 0;
      h2.handle = (stream, headers) => {
        if (h2.seen.get(`${headers[':method']} ${headers[':path']}`)! > 1) answer(stream, headers);
        else if (++arrived === 20) for (const socket of h2.sockets) socket.destroy();
      };
      const gets = Array.from({ length: 20 }, (_, i) => outcome(client.request(`${base}/drop${i}`)));
      expect(await Promise.all(gets)).toEqual(Array.from({ length: 20 }, (_, i) => `GET /drop${i}`));
      // One more TCP connection (the code before made 15–20: each retry acquired a socket of its own).
      expect(h2.accepted() - acceptedBefore).toBe(1);
    } finally {
      await client.close();
    }
    await eventually(() => fdCount() - h2.openSockets() <= fdsBefore, `fds back to ${fdsBefore}`);
  }, 30_000);
  it('20 GETs that joined a new connection together, dropped together, run again over one new connection', async () => {
    // The origin is known to speak HTTP/2 and its connection is gone: the 20 wait for one new connection (one brings
    // it, the others join it). Having joined once must not keep them from sharing the next one when that connection
    // is dropped too (before, each of the 19 that had joined acquired a connection of its own).
    const base = `https://localhost:${h2.port}`;
    const fdsBefore = fdCount() - h2.openSockets(); // before the client's thread (see the first test)
    const client = newClient();
    try {
      h2.handle = answer;
      expect((await client.request(`${base}/rejoin-first`)).httpVersion).toBe('2');
      for (const socket of h2.sockets) socket.destroy();
      await eventually(() => h2.sockets.size === 0, 'the first connection closed');
      let arrived = 0;
      let acceptedAtDrop = 0;
      h2.handle = (stream, headers) => {
        if (h2.seen.get(`${headers[':method']} ${headers[':path']}`)! > 1) answer(stream, headers);
        else if (++arrived === 20) {
          acceptedAtDrop = h2.accepted();
          for (const socket of h2.sockets) socket.destroy();
        }
      };
      const gets = Array.from({ length: 20 }, (_, i) => outcome(client.request(`${base}/rejoin${i}`)));
      expect(await Promise.all(gets)).toEqual(Array.from({ length: 20 }, (_, i) => `GET /rejoin${i}`));
      expect(h2.accepted() - acceptedAtDrop).toBeLessThanOrEqual(2);
    } finally {
      h2.handle = answer;
      await client.close();
    }
    await eventually(() => fdCount() - h2.openSockets() <= fdsBefore, `fds back to ${fdsBefore}`);
  }, 30_000);
});

describe('a burst to one HTTP/2 origin beyond what one connection carries', () => {
  // curl 7.88 puts at most 100 streams on a connection (its own cap), or fewer when the server's SETTINGS say so; the
  // transfers beyond find no connection with room and need another. They share new connections (as many as each
  // carries), not one each (worker/socket-supply.ts, the header). Found measuring (seventeenth session): 300 requests
  // at once on one thread made 185 TCP connections (the daemon's connects, most of their leases handed back unused)
  // and up to 90 TLS sessions. Failed first with 51 sessions (a connection up already), 135 (none) and 21 (SETTINGS
  // allowing 10 streams).
  /** Answers each stream after `delayMs`: the streams of the burst are all open at once. */
  const later =
    (delayMs: number): StreamHandler =>
    (stream, headers) => {
      stream.resume();
      stream.on('end', () =>
        setTimeout(() => {
          if (stream.destroyed) return;
          stream.respond({ ':status': 200 });
          stream.end(`${headers[':method']} ${headers[':path']}`);
        }, delayMs),
      );
    };

  for (const warm of [true, false]) {
    it(`250 requests at once (concurrencyPerThread 250, ${warm ? 'a connection up already' : 'no connection yet'}) share 3 or 4 connections`, async () => {
      const base = `https://localhost:${h2.port}`;
      const client = new SockpoolClient({
        socketPath: daemon.socketPath,
        threads: 1,
        concurrencyPerThread: 250,
        caFile: pki.caFile,
        inlineWhenIdle: false,
      });
      try {
        h2.handle = answer;
        if (warm) expect((await client.request(`${base}/burst-first`)).httpVersion).toBe('2');
        const accepted = h2.accepted();
        const sessions = h2.sessions();
        h2.handle = later(500);
        const responses = await Promise.all(Array.from({ length: 250 }, (_, i) => client.request(`${base}/b${i}`)));
        expect(responses.map((response) => response.body.toString())).toEqual(
          Array.from({ length: 250 }, (_, i) => `GET /b${i}`),
        );
        // 100 streams a connection: 3 would do (the first one's included when warm); one more when a group formed
        // before the first connection's room was known.
        expect(h2.sessions() - sessions).toBeLessThanOrEqual(warm ? 3 : 4);
        expect(h2.accepted() - accepted).toBeLessThanOrEqual(warm ? 3 : 4);
      } finally {
        h2.handle = answer;
        await client.close();
      }
    }, 30_000);
  }

  it('40 requests at once to an origin whose SETTINGS allow 10 streams share a few connections (the default client)', async () => {
    const narrow = await h2Origin({ maxConcurrentStreams: 10 });
    const narrowDaemon = await startTestDaemon([narrow.port], {
      extraArgs: ['--resolve', `localhost:${narrow.port}:127.0.0.1`],
    });
    const base = `https://localhost:${narrow.port}`;
    const client = new SockpoolClient({ socketPath: narrowDaemon.socketPath, threads: 0, caFile: pki.caFile });
    try {
      expect((await client.request(`${base}/narrow-first`)).httpVersion).toBe('2');
      const accepted = narrow.accepted();
      narrow.handle = later(500);
      const responses = await Promise.all(Array.from({ length: 40 }, (_, i) => client.request(`${base}/n${i}`)));
      expect(responses.map((response) => response.body.toString())).toEqual(
        Array.from({ length: 40 }, (_, i) => `GET /n${i}`),
      );
      // 10 streams a connection: 3 more would do (before, about one more per stream beyond the first 10).
      expect(narrow.sessions() - 1).toBeLessThanOrEqual(5);
      expect(narrow.accepted() - accepted).toBeLessThanOrEqual(5);
    } finally {
      await client.close();
      await narrowDaemon.stop();
      await narrow.close();
    }
  }, 30_000);
});

describe('the streams a worker learned one HTTP/2 connection carries', () => {
  it('learned low by a burst (its connection had room for fewer), grow back: the next burst of 40 at a server allowing 10 needs about 4 connections, not 14', async () => {
    // A group's joiners that find its connection full teach the worker how many streams a connection carries; too few
    // when that connection carried other transfers as the group got on (worker/socket-supply.ts, the header). Here
    // the new connection of the first burst's group allows 3: to the worker that is the same as a connection
    // allowing 10 that carried 7 others then, which a test cannot time. Failed first with 14 connections for the
    // second burst, every run (groups of 3, one connection each); with the guess doubled but a group's first free to
    // go on to another group's connection, 6 to 9 in 4 runs of 6.
    const narrow = await h2Origin({ maxConcurrentStreams: 10 });
    const narrowDaemon = await startTestDaemon([narrow.port], {
      extraArgs: ['--resolve', `localhost:${narrow.port}:127.0.0.1`],
    });
    const base = `https://localhost:${narrow.port}`;
    const client = new SockpoolClient({
      socketPath: narrowDaemon.socketPath,
      threads: 1,
      caFile: pki.caFile,
      inlineWhenIdle: false,
    });
    /** Answers to the streams held so far, in the order they came. */
    const held: Array<() => void> = [];
    const longReplies: Array<() => void> = [];
    const releaseHeld = () => {
      for (const reply of held.splice(0)) reply();
    };
    try {
      expect((await client.request(`${base}/learn-first`)).httpVersion).toBe('2');
      const [busy] = narrow.sockets;
      narrow.handle = (stream, headers) => {
        stream.resume();
        stream.on('end', () =>
          held.push(() => {
            if (stream.destroyed) return;
            stream.respond({ ':status': 200 });
            stream.end(`${headers[':method']} ${headers[':path']}`);
          }),
        );
      };
      // The first connection busy with 10 long-running streams for the whole test: no room on it.
      const long = Array.from({ length: 10 }, (_, i) => client.request(`${base}/long${i}`));
      // (Awaited below; a failed expectation before that leaves them to fail when the client closes.)
      for (const pending of long) pending.catch(() => {});
      await eventually(() => held.length === 10, 'the long-running streams at the origin');
      longReplies.push(...held.splice(0));

      // The first burst: its group's new connection allows 3 (the next ones 10 again).
      narrow.server.updateSettings({ maxConcurrentStreams: 3 });
      narrow.server.once('session', () => narrow.server.updateSettings({ maxConcurrentStreams: 10 }));
      const first = Array.from({ length: 20 }, (_, i) => client.request(`${base}/first${i}`));
      await eventually(() => held.length === 20, 'the first burst at the origin');
      releaseHeld();
      expect((await Promise.all(first)).map((response) => response.body.toString())).toEqual(
        Array.from({ length: 20 }, (_, i) => `GET /first${i}`),
      );
      // Its connections gone, the busy one full: the second burst finds no room.
      for (const socket of narrow.sockets) if (socket !== busy) socket.destroy();
      await eventually(() => narrow.openSockets() === 1, "the first burst's connections closed");

      const accepted = narrow.accepted();
      const second = Array.from({ length: 40 }, (_, i) => client.request(`${base}/second${i}`));
      for (const pending of second) pending.catch(() => {});
      await eventually(() => held.length === 40, 'the second burst at the origin');
      // 10 streams a connection: 4 would do; one more if a group learned low again.
      expect(narrow.accepted() - accepted).toBeLessThanOrEqual(5);
      releaseHeld();
      expect((await Promise.all(second)).map((response) => response.body.toString())).toEqual(
        Array.from({ length: 40 }, (_, i) => `GET /second${i}`),
      );
      for (const reply of longReplies.splice(0)) reply();
      await Promise.all(long);
    } finally {
      releaseHeld();
      for (const reply of longReplies) reply();
      await client.close();
      await narrowDaemon.stop();
      await narrow.close();
    }
  }, 30_000);
});

describe('HTTP/1.1 keep-alive', () => {
  it('a POST on a reused connection that the origin drops after reading it is not sent again', async () => {
    const base = `http://127.0.0.1:${h1.port}`;
    const client = newClient();
    try {
      h1Handle = (request, response) => {
        request.resume();
        request.on('end', () => response.end('ok'));
      };
      expect((await client.request(`${base}/first`)).body.toString()).toBe('ok');
      // The next request reuses the kept-alive connection; the origin reads it whole, then drops the connection.
      h1Handle = (request) => {
        request.resume();
        request.on('end', () => request.socket.destroy());
      };
      await expect(client.request(`${base}/once`, { method: 'POST', body: 'x' })).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_TRANSFER',
        deadConnection: true,
      });
      expect(h1Seen.get('POST /once')).toBe(1);
    } finally {
      await client.close();
    }
  });

  it('a GET whose kept-alive connection died, sent again, answered and then cut short, fails as a cut-short transfer (not run a third time)', async () => {
    const base = `http://127.0.0.1:${h1.port}`;
    const client = newClient();
    try {
      h1Handle = (request, response) => {
        request.resume();
        request.on('end', () => response.end('ok'));
      };
      expect((await client.request(`${base}/warm`)).body.toString()).toBe('ok');
      // The kept-alive connection is dropped under the next GET (curl sends it again on a new connection by
      // itself); the new connection gets a response head and part of the body, then is dropped too.
      h1Handle = (request, response) => {
        const arrivals = h1Seen.get('GET /cut') ?? 0;
        if (arrivals === 1) {
          request.socket.destroy();
        } else if (arrivals === 2) {
          response.writeHead(200, { 'content-length': '100' });
          response.write('0123456789', () => request.socket.destroy());
        } else {
          response.end('whole');
        }
      };
      const error = await client.request(`${base}/cut`).then(
        () => undefined,
        (failure: { code?: string; deadConnection?: boolean; message?: string }) => failure,
      );
      // A response came after curl's resend: what failed is that response, as for any transfer cut short; the
      // dead-connection rule (before any response) does not run it a third time.
      expect(error).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', deadConnection: false });
      expect(error?.message).not.toMatch(/before any response/);
      expect(h1Seen.get('GET /cut')).toBe(2);
    } finally {
      await client.close();
    }
  });
});

describe('a request whose HTTP/2 header block is more than curl sends (nghttp2: 64 KiB)', () => {
  // curl 7.88's HTTP/2 library (nghttp2) does not send a header block it bounds at more than 64 KiB: it closes the
  // stream itself with REFUSED_STREAM ("send it again"), nothing written. On a new connection curl then resends it on
  // another (plain curl: five, then curlCode 56); on a connection it reuses nothing more comes to wake the transfer and
  // it waited until its deadline (plain curl too). The origin never sees it.
  /** How a request settled: its error's code, curlCode, deadConnection and message. */
  const failure = (pending: Promise<unknown>) =>
    pending.then(
      () => undefined,
      (error: { code?: string; curlCode?: number; deadConnection?: boolean; message?: string }) => error,
    );
  const longPath = `/hb-${'a'.repeat(70_000)}`;

  it('counts the block as nghttp2 does: one of exactly 64 KiB is sent, one a byte longer fails at once', async () => {
    // An origin that takes header lists of up to 1 MiB (Node's default is 64 KiB): what it refuses is not the point.
    const wide = await h2Origin({ maxHeaderListSize: 1024 * 1024 });
    const wideDaemon = await startTestDaemon([wide.port], {
      extraArgs: ['--resolve', `localhost:${wide.port}:127.0.0.1`],
    });
    const base = `https://localhost:${wide.port}`;
    const sockpool = new SockpoolClient({ socketPath: wideDaemon.socketPath, threads: 1, caFile: pki.caFile });
    try {
      expect((await sockpool.request(`${base}/wide-first`)).httpVersion).toBe('2');
      // nghttp2's bound: 17, and 12 for each of the 5 fields (:method, :path, :scheme, :authority, accept) with their
      // names and values.
      const authority = `localhost:${wide.port}`;
      const fixed = 17 + 12 * 5 + ':method'.length + 3 + ':path'.length + ':scheme'.length + 5;
      const pathLength = 65_536 - fixed - ':authority'.length - authority.length - 'accept'.length - '*/*'.length;
      const fits = `/${'f'.repeat(pathLength - 1)}`;
      const over = `/${'o'.repeat(pathLength)}`;
      expect((await sockpool.request(`${base}${fits}`, { timeoutMs: 10_000 })).body.toString()).toBe(`GET ${fits}`);
      const error = await failure(sockpool.request(`${base}${over}`, { timeoutMs: 10_000 }));
      expect(error).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 92 });
      expect(error?.message).toContain('up to 65537 bytes');
      expect(wide.seen.get(`GET ${over}`)).toBeUndefined();
    } finally {
      await sockpool.close();
      await wideDaemon.stop();
      await wide.close();
    }
  }, 30_000);

  it('fails at once over the daemon’s warm-TLS relay too (curl speaks HTTP/2 in plaintext), new connection and reused', async () => {
    const warmDaemon = await startTestDaemon([h2.port], { extraArgs: warmTlsArgs(pki.caFile, [h2.port]) });
    const base = `https://localhost:${h2.port}`;
    const fdsBefore = fdCount() - h2.openSockets(); // before the client's thread (see the first test)
    const sockpool = new SockpoolClient({ socketPath: warmDaemon.socketPath, threads: 1, caFile: pki.caFile });
    try {
      h2.handle = answer;
      // Its protocol not known yet: curl's resend is refused (openSocket).
      const first = await failure(sockpool.request(`${base}${longPath}`, { timeoutMs: 20_000 }));
      expect(first).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 92, deadConnection: false });
      expect((await sockpool.request(`${base}/hb-warm-first`)).httpVersion).toBe('2');
      // Known to speak HTTP/2: refused before it goes to curl.
      const reused = await failure(sockpool.request(`${base}${longPath}`, { timeoutMs: 20_000 }));
      expect(reused).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 92, deadConnection: false });
      expect(h2.seen.get(`GET ${longPath}`)).toBeUndefined();
      expect((await sockpool.request(`${base}/hb-warm-after`)).body.toString()).toBe('GET /hb-warm-after');
    } finally {
      await sockpool.close();
      await warmDaemon.stop();
    }
    await eventually(() => fdCount() - h2.openSockets() <= fdsBefore, `fds back to ${fdsBefore}`);
  }, 30_000);

  for (const threads of [1, 0]) {
    const modes = threads === 0 ? 'threads: 0' : 'a worker thread';
    const client = () =>
      new SockpoolClient({ socketPath: daemon.socketPath, threads, caFile: pki.caFile, inlineWhenIdle: false });

    it(`fails at once on a reused connection (${modes}), typed, nothing sent: not at its deadline`, async () => {
      const base = `https://localhost:${h2.port}`;
      const fdsBefore = fdCount() - h2.openSockets(); // before the client's thread (see the first test)
      const sockpool = client();
      try {
        h2.handle = answer;
        expect((await sockpool.request(`${base}/hb-first-${threads}`)).httpVersion).toBe('2');
        const accepted = h2.accepted();
        const error = await failure(sockpool.request(`${base}${longPath}`, { timeoutMs: 20_000 }));
        expect(error).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 92, deadConnection: false });
        expect(error?.message).toMatch(/HTTP\/2 header block/);
        expect(h2.seen.get(`GET ${longPath}`)).toBeUndefined();
        expect(h2.accepted() - accepted).toBe(0);
        // No lease but the connection's.
        expect((await originStats(daemon.socketPath, h2.port, 'localhost')).leased).toBe(1);
        // The connection is still good for the next request.
        expect((await sockpool.request(`${base}/hb-after-${threads}`)).body.toString()).toBe(
          `GET /hb-after-${threads}`,
        );
      } finally {
        await sockpool.close();
      }
      await eventually(() => fdCount() - h2.openSockets() <= fdsBefore, `fds back to ${fdsBefore}`);
    }, 30_000);

    it(`fails at once on a new connection (${modes}), typed, not as a connect failure, over one connection`, async () => {
      const base = `https://localhost:${h2.port}`;
      const fdsBefore = fdCount() - h2.openSockets(); // before the client's thread (see the first test)
      const sockpool = client();
      try {
        h2.handle = answer;
        const accepted = h2.accepted();
        const error = await failure(sockpool.request(`${base}${longPath}`, { timeoutMs: 20_000 }));
        // Before: curlCode 7 ("Couldn't connect to server"), after a second connection for curl's resend.
        expect(error).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 92, deadConnection: false });
        expect(error?.message).toMatch(/HTTP\/2 header block/);
        expect(h2.seen.get(`GET ${longPath}`)).toBeUndefined();
        expect(h2.accepted() - accepted).toBe(1);
        // curl closed the connection of the stream it refused: its lease ended.
        await eventually(
          async () => (await originStats(daemon.socketPath, h2.port, 'localhost')).leased === 0,
          'no lease left',
        );
        // A POST the same (before: deadConnection, as if its connection had died after it was sent).
        const post = await failure(
          sockpool.request(`${base}${longPath}`, { method: 'POST', body: 'x', timeoutMs: 20_000 }),
        );
        expect(post).toMatchObject({ code: 'SOCKPOOL_ERR_TRANSFER', curlCode: 92, deadConnection: false });
        expect(h2.seen.get(`POST ${longPath}`)).toBeUndefined();
      } finally {
        await sockpool.close();
      }
      await eventually(() => fdCount() - h2.openSockets() <= fdsBefore, `fds back to ${fdsBefore}`);
    }, 30_000);
  }
});
