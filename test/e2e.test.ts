// The whole chain once, with real processes: sockpoold as a child process, a client process running a piscina
// pool of libcurl workers, and local HTTP and HTTPS origins that record every connection they accept. The
// connection the origin sees is the one the daemon opened: the client runs in a network namespace of its own
// with no interfaces at all (unshare -n), so it cannot have connected by itself.
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type DaemonProcess, repoRoot, startDaemon } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

const run = promisify(execFile);
const clientScript = join(repoRoot, 'test', 'fixtures', 'client-request.mjs');

interface Origin {
  server: Server;
  port: number;
  connections: Socket[];
}

async function origin(server: Server): Promise<Origin> {
  const connections: Socket[] = [];
  server.on('connection', (socket: Socket) => connections.push(socket));
  server.on('secureConnection', () => {});
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { server, port: (server.address() as AddressInfo).port, connections };
}

const handler = (request: import('node:http').IncomingMessage, response: import('node:http').ServerResponse) => {
  let body = '';
  request.on('data', (chunk) => {
    body += chunk;
  });
  request.on('end', () => {
    response.setHeader('x-origin', 'test');
    response.end(`${request.method} ${request.url} ${body}`);
  });
};

let pki: TestPki;
let http: Origin;
let https: Origin;
let sockpoold: DaemonProcess;

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  http = await origin(createHttpServer(handler));
  https = await origin(createHttpsServer({ cert: pki.cert, key: pki.key }, handler));
  // No predictive warming: each test counts the connections its origin sees, and a warmed spare would be one more.
  const configFile = join(mkdtempSync(join(tmpdir(), 'sockpool-e2e-')), 'sockpoold.json');
  writeFileSync(configFile, JSON.stringify({ pool: { predictive: false } }));
  sockpoold = await startDaemon({
    args: [
      '--config',
      configFile,
      '--allow',
      '127.0.0.1/32',
      '--allow-port',
      String(http.port),
      '--allow-port',
      String(https.port),
      '--resolve',
      `localhost:${https.port}:127.0.0.1`,
    ],
  });
});

afterAll(async () => {
  await sockpoold?.stop();
  http?.server.close();
  https?.server.close();
  for (const socket of [...(http?.connections ?? []), ...(https?.connections ?? [])]) socket.destroy();
  pki?.cleanup();
});

async function client(options: Record<string, unknown>, sandboxed: boolean): Promise<Array<Record<string, unknown>>> {
  const argv = [process.execPath, clientScript, JSON.stringify({ socketPath: sockpoold.socketPath, ...options })];
  const command = sandboxed ? ['unshare', '-n', ...argv] : argv;
  const { stdout } = await run(command[0]!, command.slice(1), { timeout: 60_000 });
  return stdout
    .trim()
    .split('\n')
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

describe('end to end', () => {
  it('a client process gets an HTTP response over the connection the daemon opened', async () => {
    const before = http.connections.length;
    const [result] = await client({ requests: [{ url: `http://127.0.0.1:${http.port}/hello` }] }, false);
    expect(result).toMatchObject({ ok: true, status: 200, body: 'GET /hello ', connection: 'leased' });
    expect(http.connections.length - before).toBe(1);
  });

  it('a client with no network at all (unshare -n) completes HTTP and HTTPS requests through the daemon', async () => {
    const httpBefore = http.connections.length;
    const httpsBefore = https.connections.length;
    const results = await client(
      {
        caFile: pki.caFile,
        requests: [
          { url: `http://127.0.0.1:${http.port}/sandboxed`, options: { method: 'POST', body: 'payload' } },
          { url: `https://localhost:${https.port}/secure` },
        ],
      },
      true,
    );
    expect(results[0]).toMatchObject({ ok: true, status: 200, body: 'POST /sandboxed payload' });
    expect(results[1]).toMatchObject({ ok: true, status: 200, body: 'GET /secure ' });
    expect(http.connections.length - httpBefore).toBe(1);
    expect(https.connections.length - httpsBefore).toBe(1);
  });

  it('the sandboxed client cannot reach what the daemon refuses', async () => {
    const [result] = await client({ requests: [{ url: 'http://127.0.0.1:9/forbidden' }] }, true);
    expect(result).toMatchObject({ ok: false, code: 'SOCKPOOL_ERR_POLICY' });
  });

  it('rejects invalid input with typed errors before anything reaches curl', async () => {
    const results = await client(
      {
        requests: [
          { url: 'ftp://127.0.0.1/x' },
          { url: `http://127.0.0.1:${http.port}/`, options: { method: 'GE T' } },
          { url: `http://127.0.0.1:${http.port}/`, options: { headers: { 'x-bad': 'a\r\nInjected: 1' } } },
          { url: 'not a url' },
        ],
      },
      false,
    );
    for (const result of results) expect(result).toMatchObject({ ok: false, code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' });
  });
});
