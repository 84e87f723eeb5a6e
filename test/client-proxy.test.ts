// Requests through a forward proxy: the daemon connects to the proxy (its egress policy checks the proxy), curl
// speaks proxy HTTP (absolute-form requests) or CONNECT (https) over the handed socket, and the pool is keyed
// with the proxy. The proxy here is a small real one on loopback that sends every host it is asked for to
// 127.0.0.1 (so test names need no DNS).
import { once } from 'node:events';
import { createServer as createHttpServer, request as httpRequest, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { type AddressInfo, connect, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { type DaemonProcess, startDaemon } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let origin: Server;
let secureOrigin: Server;
let proxy: Server;
const proxyConnections: Socket[] = [];
const proxied: string[] = [];
let sockpoold: DaemonProcess;

function port(server: Server): number {
  return (server.address() as AddressInfo).port;
}

async function listen(server: Server): Promise<Server> {
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return server;
}

beforeAll(async () => {
  pki = createTestPki(['secure.test']);
  origin = await listen(createHttpServer((request, response) => response.end(`origin saw ${request.url}`)));
  secureOrigin = await listen(
    createHttpsServer({ cert: pki.cert, key: pki.key }, (request, response) => {
      response.setHeader('x-origin', 'tls');
      response.end(`tls ${request.url}`);
    }),
  );
  proxy = await listen(
    createHttpServer((request, response) => {
      // Absolute-form request: forward to 127.0.0.1 at the URL's port.
      const target = new URL(request.url ?? '');
      proxied.push(`GET ${target.host}`);
      const upstream = httpRequest(
        { host: '127.0.0.1', port: Number(target.port), path: target.pathname + target.search, method: request.method },
        (reply) => {
          response.writeHead(reply.statusCode ?? 502, reply.headers);
          reply.pipe(response);
        },
      );
      request.pipe(upstream);
    }),
  );
  proxy.on('connection', (socket: Socket) => proxyConnections.push(socket));
  proxy.on('connect', (request, client: Socket, head: Buffer) => {
    const [, targetPort] = (request.url ?? '').split(':');
    proxied.push(`CONNECT ${request.url}`);
    const upstream = connect(Number(targetPort), '127.0.0.1', () => {
      client.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    upstream.on('error', () => client.destroy());
    // A client that goes away (a connection closed by curl or the daemon) resets the tunnel: close both ends.
    client.on('error', () => upstream.destroy());
  });
  // The destination ports must be allowed as well as the proxy: the policy checks both.
  const ports = [port(proxy), port(origin), port(secureOrigin)].flatMap((p) => ['--allow-port', String(p)]);
  sockpoold = await startDaemon({ args: ['--allow', '127.0.0.1/32', ...ports] });
});

afterAll(async () => {
  await sockpoold?.stop();
  for (const socket of proxyConnections) socket.destroy();
  for (const server of [origin, secureOrigin, proxy]) server?.close();
  pki?.cleanup();
});

describe('forward proxy', () => {
  it('sends http and https requests through the proxy over sockets the daemon connected to it', async () => {
    const client = new SockpoolClient({
      socketPath: sockpoold.socketPath,
      threads: 1,
      proxy: `http://127.0.0.1:${port(proxy)}`,
      caFile: pki.caFile,
    });
    try {
      const plain = await client.request(`http://plain.test:${port(origin)}/a?b=1`);
      expect(plain).toMatchObject({ status: 200, connection: 'leased' });
      expect(plain.body.toString()).toBe('origin saw /a?b=1');
      const secure = await client.request(`https://secure.test:${port(secureOrigin)}/s`);
      expect(secure.status).toBe(200);
      expect(secure.body.toString()).toBe('tls /s');
      expect(proxied).toEqual([`GET plain.test:${port(origin)}`, `CONNECT secure.test:${port(secureOrigin)}`]);
      const stats = (await client.stats()) as { origins: Array<{ origin: string }> };
      expect(stats.origins.map((entry) => entry.origin).sort()).toEqual(
        [
          `plain.test:${port(origin)} via 127.0.0.1:${port(proxy)}`,
          `secure.test:${port(secureOrigin)} via 127.0.0.1:${port(proxy)}`,
        ].sort(),
      );
    } finally {
      await client.close();
    }
  });

  it("a streamed response through CONNECT has the origin's head, not the proxy's CONNECT reply", async () => {
    const client = new SockpoolClient({
      socketPath: sockpoold.socketPath,
      threads: 0,
      proxy: `http://127.0.0.1:${port(proxy)}`,
      caFile: pki.caFile,
    });
    try {
      const streamed = await client.requestStream(`https://secure.test:${port(secureOrigin)}/stream`);
      expect(streamed.status).toBe(200);
      expect(streamed.headers).toContainEqual(['x-origin', 'tls']);
      expect(await new Response(streamed.body).text()).toBe('tls /stream');
    } finally {
      await client.close();
    }
  });

  it('rejects a proxy option that is not http://host:port', () => {
    for (const bad of ['socks5://127.0.0.1:1080', 'http://user:pw@127.0.0.1:3128', 'not a url', 'http://p:1/path']) {
      expect(() => new SockpoolClient({ socketPath: sockpoold.socketPath, proxy: bad })).toThrow(
        expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }),
      );
    }
  });
});
