// What a real nginx sees of requests relayed over warm TLS sessions, against what it sees of a direct request.
// nginx (Debian package nginx) runs as a child process on a free loopback port with a throwaway CA in a temporary
// directory: one server speaking HTTP/2 and HTTP/1.1 (ALPN picks h2), one HTTP/1.1 only. curl speaks plaintext
// HTTP/2 with prior knowledge (or HTTP/1.1) to the daemon's relay; libcurl 7.88 would send `:scheme: http` there, so
// the worker gives the https scheme (docs/warm-tls.md). The test also pins what nginx does with `:scheme: http` on
// a TLS connection (it accepts it; its $scheme comes from the connection), so a future nginx that refuses it shows
// up here. System tier: needs the nginx binary (test/system-prerequisites.ts).
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http2 from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { eventually, fdCount, startTestDaemon, warmTlsArgs } from './fixtures/client-helpers.js';
import { spawnChild } from './helpers/children.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let dir: string;
let nginx: ChildProcess;
let nginxLog = '';
let h2Port: number;
let h1Port: number;
let daemon: DaemonProcess;
let client: SockpoolClient;

/** What nginx answers: the scheme and protocol it saw, and the Host (HTTP/1.1) or :authority (HTTP/2). */
const ANSWER = 'scheme=$scheme proto=$server_protocol host=$http_host method=$request_method uri=$request_uri';

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  dir = mkdtempSync(join(tmpdir(), 'sockpool-nginx-'));
  h2Port = await freePort();
  h1Port = await freePort();
  const server = (listen: string) => `
    server {
      listen ${listen};
      ssl_protocols TLSv1.2 TLSv1.3;
      ssl_certificate ${join(pki.dir, 'server.pem')};
      ssl_certificate_key ${join(pki.dir, 'server.key')};
      location / { return 200 "${ANSWER}\\n"; }
    }`;
  writeFileSync(
    join(dir, 'nginx.conf'),
    `daemon off;
    pid ${join(dir, 'nginx.pid')};
    error_log stderr info;
    events { worker_connections 512; }
    http {
      access_log ${join(dir, 'access.log')};
      client_body_temp_path ${dir}/body;
      proxy_temp_path ${dir}/proxy;
      fastcgi_temp_path ${dir}/fastcgi;
      uwsgi_temp_path ${dir}/uwsgi;
      scgi_temp_path ${dir}/scgi;
      ${server(`127.0.0.1:${h2Port} ssl http2`)}
      ${server(`127.0.0.1:${h1Port} ssl`)}
    }`,
  );
  nginx = spawnChild('nginx', ['-p', dir, '-c', join(dir, 'nginx.conf')], { stdio: ['ignore', 'ignore', 'pipe'] });
  nginx.stderr!.on('data', (chunk: Buffer) => {
    nginxLog += chunk.toString();
  });
  const exited = once(nginx, 'exit').then(([code]) => {
    throw new Error(`nginx exited (${code}) at start:\n${nginxLog}`);
  });
  const started = eventually(async () => {
    const res = await fetchDirect(h2Port).catch(() => undefined);
    return res !== undefined;
  }, 'nginx answering');
  await Promise.race([started, exited]);
  exited.catch(() => {});
  daemon = await startTestDaemon([h2Port, h1Port], {
    extraArgs: warmTlsArgs(pki.caFile, [h2Port, h1Port]),
  });
  client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile });
}, 60_000);

afterAll(async () => {
  await client?.close();
  await daemon?.stop();
  if (nginx && nginx.exitCode === null) {
    nginx.kill('SIGTERM');
    await once(nginx, 'exit');
  }
  if (dir) rmSync(dir, { recursive: true, force: true });
  pki?.cleanup();
});

/** A direct HTTP/2 request over TLS from node:http2 with the given :scheme. */
async function fetchDirect(port: number, scheme = 'https'): Promise<{ status: number; body: string }> {
  const session = http2.connect(`https://localhost:${port}`, { ca: pki.ca });
  try {
    session.on('error', () => {});
    const stream = session.request({
      ':method': 'GET',
      ':path': '/direct',
      ':scheme': scheme,
      ':authority': `localhost:${port}`,
    });
    const [headers] = (await once(stream, 'response')) as [http2.IncomingHttpHeaders];
    let body = '';
    for await (const chunk of stream) body += chunk;
    return { status: Number(headers[':status']), body: body.trim() };
  } finally {
    session.close();
  }
}

describe('nginx behind warm TLS sessions', () => {
  it('HTTP/2 relayed: nginx sees an https request to the https authority, as a direct one', async () => {
    const response = await client.request(`https://localhost:${h2Port}/relayed?q=1`);
    expect(response.status).toBe(200);
    expect(response.tls).toEqual({ version: 'TLSv1.3', alpn: 'h2', by: 'daemon' });
    expect(response.httpVersion).toBe('2');
    expect(response.body.toString().trim()).toBe(
      `scheme=https proto=HTTP/2.0 host=localhost:${h2Port} method=GET uri=/relayed?q=1`,
    );
    // Many at once over the relayed connection: nginx multiplexes them as it would a direct client's.
    const bodies = await Promise.all(
      Array.from({ length: 20 }, (_, i) => client.request(`https://localhost:${h2Port}/m${i}`)),
    );
    expect(bodies.map((r) => r.status)).toEqual(Array.from({ length: 20 }, () => 200));
    expect(readFileSync(join(dir, 'access.log'), 'utf8')).toContain('"GET /relayed?q=1 HTTP/2.0" 200');
  });

  it('HTTP/1.1 relayed (ALPN http/1.1): the same request line and Host as a direct one', async () => {
    const response = await client.request(`https://localhost:${h1Port}/one`, { method: 'POST', body: 'abc' });
    expect(response.status).toBe(200);
    expect(response.tls).toEqual({ version: 'TLSv1.3', alpn: 'http/1.1', by: 'daemon' });
    expect(response.body.toString().trim()).toBe(
      `scheme=https proto=HTTP/1.1 host=localhost:${h1Port} method=POST uri=/one`,
    );
  });

  it('nginx 1.22 accepts :scheme http on a TLS connection, and its $scheme stays https', async () => {
    // What libcurl 7.88 would send over the relay without the worker's :scheme: nginx does not mind.
    for (const scheme of ['http', 'https']) {
      expect(await fetchDirect(h2Port, scheme)).toEqual({
        status: 200,
        body: `scheme=https proto=HTTP/2.0 host=localhost:${h2Port} method=GET uri=/direct`,
      });
    }
  });

  it('gives every client fd back', async () => {
    const before = fdCount();
    const other = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0, caFile: pki.caFile });
    expect((await other.request(`https://localhost:${h2Port}/fds`)).tls?.by).toBe('daemon');
    await other.close();
    await eventually(() => fdCount() <= before, `client fds back to ${before} (now ${fdCount()})`);
  });
});
