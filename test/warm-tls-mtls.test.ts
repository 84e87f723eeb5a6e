// mTLS with warm TLS: the client certificate and its key are named in the daemon's configuration only, and the
// daemon presents them in its handshakes; a SockpoolClient calls the origin that demands a client certificate
// without ever holding the key. A client that does its own TLS (insecure: a TCP lease) has no certificate to
// present, and the origin refuses it; so `warmTlsOnMiss = "tcp"` never applies to such an origin. Real daemon, a real
// node:https origin with requestCert.
import { execFileSync } from 'node:child_process';
import https from 'node:https';
import { join } from 'node:path';
import type { TLSSocket } from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
let server: https.Server;
let port: number;
let daemon: DaemonProcess;

/** A client certificate for `name`, signed by the test CA (in pki.dir: client.pem, client.key). */
function clientCertificate(dir: string, name: string): { cert: string; key: string } {
  const run = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  run(
    ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'].concat([
      '-keyout',
      'client.key',
      '-out',
      'client.csr',
      '-subj',
      `/CN=${name}`,
    ]),
  );
  run(
    ['x509', '-req', '-in', 'client.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial'].concat([
      '-out',
      'client.pem',
      '-days',
      '1',
    ]),
  );
  return { cert: join(dir, 'client.pem'), key: join(dir, 'client.key') };
}

beforeAll(async () => {
  pki = createTestPki(['localhost']);
  const client = clientCertificate(pki.dir, 'sockpool-daemon');
  server = https.createServer(
    { cert: pki.cert, key: pki.key, ca: pki.ca, requestCert: true, rejectUnauthorized: true },
    (request, response) => {
      const peer = (request.socket as TLSSocket).getPeerCertificate();
      response.end(`hello ${peer.subject?.CN}`);
    },
  );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as { port: number }).port;
  daemon = await startTestDaemon([port], {
    extraArgs: ['--ca-file', pki.caFile, '--resolve', `localhost:${port}:127.0.0.1`],
    config: {
      pool: {
        // warmTlsOnMiss "tcp" is ignored for an origin with a client certificate: the first request, a miss, is
        // still a session the daemon made (a TCP lease would leave the client without a certificate to present).
        origins: [
          {
            match: `localhost:${port}`,
            warmTls: true,
            warmTlsOnMiss: 'tcp',
            clientCert: client.cert,
            clientKey: client.key,
          },
        ],
      },
    },
  });
});

afterAll(async () => {
  await daemon?.stop();
  server?.closeAllConnections();
  await new Promise<void>((resolve) => server?.close(() => resolve()));
  pki?.cleanup();
});

describe('mTLS by the daemon', () => {
  it('presents the configured client certificate; the client never holds the key', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, caFile: pki.caFile });
    try {
      const response = await client.request(`https://localhost:${port}/`);
      expect(response.status).toBe(200);
      expect(response.body.toString()).toBe('hello sockpool-daemon');
      expect(response.tls?.by).toBe('daemon');
    } finally {
      await client.close();
    }
  });

  it('gives a client that does its own TLS no certificate: the origin refuses it', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1, insecure: true });
    try {
      await expect(client.request(`https://localhost:${port}/`)).rejects.toMatchObject({
        code: 'SOCKPOOL_ERR_TRANSFER',
      });
    } finally {
      await client.close();
    }
  });
});
