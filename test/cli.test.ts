// The `sockpool` command line against a real daemon and a local origin: status, stats, warm, get -v, -L,
// --compressed and --max-filesize.
import { execFile } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, openSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { httpsOrigin, startTestDaemon, warmTlsArgs } from './fixtures/client-helpers.js';
import { spawnChild } from './helpers/children.js';
import { type DaemonProcess, eventually, repoRoot, startDaemon } from './helpers/daemon.js';
import { createTestPki } from './helpers/tls.js';

const run = promisify(execFile);
const cli = join(repoRoot, 'dist', 'client', 'cli.js');

let origin: Server;
let port: number;
const connections: Socket[] = [];
let sockpoold: DaemonProcess;

beforeAll(async () => {
  origin = createServer((request, response) => {
    if (request.url === '/moved') {
      response.writeHead(301, { location: '/x' });
      response.end();
    } else if (request.url === '/packed' && /gzip/.test(request.headers['accept-encoding'] ?? '')) {
      response.writeHead(200, { 'content-encoding': 'gzip' });
      response.end(gzipSync('cli body, unpacked'));
    } else if (request.url === '/large') {
      response.end(Buffer.alloc(4 << 20, 'x'));
    } else response.end('cli body');
  });
  origin.on('connection', (socket: Socket) => connections.push(socket));
  origin.listen(0, '127.0.0.1');
  await once(origin, 'listening');
  port = (origin.address() as AddressInfo).port;
  sockpoold = await startDaemon({ args: ['--allow', '127.0.0.1/32', '--allow-port', String(port)] });
});

afterAll(async () => {
  await sockpoold?.stop();
  for (const socket of connections) socket.destroy();
  origin?.close();
});

function sockpool(...args: string[]) {
  return run(process.execPath, [cli, '--socket', sockpoold.socketPath, ...args], { timeout: 30_000 });
}

describe('sockpool CLI', () => {
  it('status says the daemon is up', async () => {
    const { stdout } = await sockpool('status');
    expect(stdout).toMatch(/^sockpoold up at .*: idle \d+, leased \d+, origins \d+, hit rate [\d.]+%, clients \d+/);
  });

  it('warm opens idle connections that stats --json then shows', async () => {
    const { stdout } = await sockpool('warm', `127.0.0.1:${port}`, '2');
    expect(stdout).toContain('warming 2');
    await eventually(async () => {
      const stats = JSON.parse((await sockpool('stats', '--json')).stdout) as { idle: number };
      return stats.idle === 2;
    }, 'two idle sockets');
    await eventually(() => connections.length === 2, 'the origin accepted both');
  });

  it('warm of an https URL says TCP connections where the daemon keeps no TLS sessions for it', async () => {
    // This daemon has no warm TLS: it warms TCP for the URL, and the operator is told so (it said "TLS session(s)").
    const { stdout } = await sockpool('warm', `https://127.0.0.1:${port}`, '1');
    // (1, or fewer "more" where the test before left idle sockets of the origin: warm tops the idle pool up.)
    expect(stdout).toMatch(/^warming (1|0 more) TCP connection\(s\) to https:\/\/127\.0\.0\.1:\d+ \(/);
  });

  it('warm of an https URL says TLS sessions where the daemon keeps them for what --cacert trusts', async () => {
    const pki = createTestPki(['localhost']);
    const tlsOrigin = await httpsOrigin(pki, (_request, response) => response.end('tls'));
    const tlsDaemon = await startTestDaemon([tlsOrigin.port], { extraArgs: warmTlsArgs(pki.caFile, [tlsOrigin.port]) });
    try {
      const warm = (...extra: string[]) =>
        run(process.execPath, [cli, '--socket', tlsDaemon.socketPath, 'warm', ...extra], { timeout: 30_000 });
      const url = `https://localhost:${tlsOrigin.port}`;
      expect((await warm(url, '1', '--cacert', pki.caFile)).stdout).toBe(`warming 1 TLS session(s) to ${url}\n`);
      // Trusting the system store, not the daemon's CA: the daemon's sessions would not verify as asked.
      expect((await warm(url, '1')).stdout).toMatch(/^warming 1 TCP connection\(s\) to /);
    } finally {
      await tlsDaemon.stop();
      await tlsOrigin.close();
      pki.cleanup();
    }
  });

  it('get -v prints the body, and on stderr whether the connection was warm', async () => {
    const { stdout, stderr } = await sockpool('get', '-v', `http://127.0.0.1:${port}/x`);
    expect(stdout).toBe('cli body');
    expect(stderr).toMatch(/HTTP\/1\.1 200 {2}warm=true connection=leased/);
    expect(stderr).toMatch(/timings ms: acquire [\d.]+ connect [\d.]+ tls [\d.]+ ttfb [\d.]+ total [\d.]+/);
  });

  it('get -L follows a redirect and --compressed decodes the body; without them neither happens', async () => {
    const followed = await sockpool('get', '-v', '-L', `http://127.0.0.1:${port}/moved`);
    expect(followed.stdout).toBe('cli body');
    expect(followed.stderr).toContain(`200 (redirected: http://127.0.0.1:${port}/x)`);
    const unfollowed = await sockpool('get', '-v', `http://127.0.0.1:${port}/moved`);
    expect(unfollowed.stdout).toBe('');
    expect(unfollowed.stderr).toMatch(/HTTP\/1\.1 301 /);
    expect((await sockpool('get', '--compressed', `http://127.0.0.1:${port}/packed`)).stdout).toBe(
      'cli body, unpacked',
    );
    expect((await sockpool('get', `http://127.0.0.1:${port}/packed`)).stdout).toBe('cli body');
  });

  it('get --max-filesize fails with a typed error, printing nothing, when the body is larger', async () => {
    expect((await sockpool('get', '--max-filesize', '8', `http://127.0.0.1:${port}/x`)).stdout).toBe('cli body');
    const failed = await sockpool('get', '--max-filesize', '7', `http://127.0.0.1:${port}/x`).catch(
      (error: { code: number; stdout: string; stderr: string }) => error,
    );
    expect(failed).toMatchObject({ code: 1, stdout: '' });
    expect((failed as { stderr: string }).stderr).toContain('SOCKPOOL_ERR_BODY_TOO_LARGE');
  });

  it('fails with a typed error and exit code 1 when the daemon is not there', async () => {
    const failed = await run(process.execPath, [cli, '--socket', '/nonexistent/sockpoold.sock', 'status']).catch(
      (error: { code: number; stderr: string }) => error,
    );
    expect(failed).toMatchObject({ code: 1 });
    expect((failed as { stderr: string }).stderr).toContain('SOCKPOOL_ERR_DAEMON_UNAVAILABLE');
  });

  it('rejects a malformed origin with a clear message', async () => {
    const failed = await sockpool('warm', 'no-port-here').catch((error: { code: number; stderr: string }) => error);
    expect(failed).toMatchObject({ code: 1 });
    expect((failed as { stderr: string }).stderr).toContain('not an origin');
  });

  it('refuses numbers past what the option means, naming the option', async () => {
    // Number() read "0x10" as 16 and "1e3" as 1000; 1e300 and 2^53 + 1 are "integers" to it, which the client then
    // refused naming maxBodyBytes, and a count over the protocol's 1000 came back as SOCKPOOL_ERR_PROTOCOL.
    const url = `http://127.0.0.1:${port}/x`;
    for (const [args, option] of [
      [['get', '--max-filesize', '1e300', url], "option '--max-filesize <bytes>' argument '1e300' is invalid"],
      [['get', '--max-filesize', '9007199254740993', url], "argument '9007199254740993' is invalid"],
      [['get', '--max-filesize', '0x10', url], "argument '0x10' is invalid"],
      [['warm', `127.0.0.1:${port}`, '1001'], "value '1001' is invalid for argument 'count'"],
      [['warm', `127.0.0.1:${port}`, '1e3'], "value '1e3' is invalid for argument 'count'"],
    ] as Array<[string[], string]>) {
      const failed = await sockpool(...args).catch((error: { code: number; stdout: string; stderr: string }) => error);
      expect(failed, args.join(' ')).toMatchObject({ code: 1, stdout: '' });
      const { stderr } = failed as { stderr: string };
      expect(stderr, args.join(' ')).toContain(option);
      expect(stderr, args.join(' ')).toContain('must be a whole number from 1 to');
    }
  });

  it('warm refuses a --cacert it cannot read, or without an https URL, instead of warming plain TCP', async () => {
    // Before, both printed "warming 1 connection(s)" and exited 0: the unreadable file made the trust "none".
    for (const [args, message] of [
      [['warm', `https://127.0.0.1:${port}`, '--cacert', '/nonexistent/ca.pem'], 'cannot read it (ENOENT)'],
      [['warm', `127.0.0.1:${port}`, '--cacert', cli], 'applies to an https:// URL'],
    ] as Array<[string[], string]>) {
      const failed = await sockpool(...args).catch((error: { code: number; stdout: string; stderr: string }) => error);
      expect(failed, args.join(' ')).toMatchObject({ code: 1, stdout: '' });
      expect((failed as { stderr: string }).stderr).toContain(`SOCKPOOL_ERR_INVALID_ARGUMENT: --cacert`);
      expect((failed as { stderr: string }).stderr).toContain(message);
    }
  });

  it('exits 1 with one line, no stack trace, when stdout closes early or cannot be written', async () => {
    // As `sockpool get URL | head -c1`: the reader takes its first bytes and goes away (EPIPE).
    const child = spawnChild(
      process.execPath,
      [cli, '--socket', sockpoold.socketPath, 'get', `http://127.0.0.1:${port}/large`],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk;
    });
    child.stdout!.once('data', () => child.stdout!.destroy());
    const [code] = (await once(child, 'close')) as [number | null];
    expect({ code, stderr }).toEqual({ code: 1, stderr: 'sockpool: cannot write to stdout: EPIPE\n' });

    // A full disk (ENOSPC): console.log dropped the error (status exited 0 with its line lost).
    for (const args of [['status'], ['get', `http://127.0.0.1:${port}/x`]]) {
      const full = openSync('/dev/full', 'w');
      try {
        const writer = spawnChild(process.execPath, [cli, '--socket', sockpoold.socketPath, ...args], {
          stdio: ['ignore', full, 'pipe'],
        });
        let written = '';
        writer.stderr!.on('data', (chunk: Buffer) => {
          written += chunk;
        });
        const [exit] = (await once(writer, 'close')) as [number | null];
        expect({ args, exit, written }).toEqual({
          args,
          exit: 1,
          written: 'sockpool: cannot write to stdout: ENOSPC\n',
        });
      } finally {
        closeSync(full);
      }
    }
  });

  // Last: it fills the origin's idle pool, so a warm after it is granted nothing.
  it('warm says how many the daemon connects when its idle pool has room for fewer than asked', async () => {
    // Before, it printed "warming 1000 connection(s)" whatever the daemon granted (the origin's maxIdle, 16 here).
    const { stdout } = await sockpool('warm', `127.0.0.1:${port}`, '1000');
    const granted =
      /^warming (\d+) more connection\(s\) to 127\.0\.0\.1:\d+ \(of the 1000 asked for, the rest are idle already or past what the idle pool keeps\)\n$/.exec(
        stdout,
      );
    expect(granted, stdout).not.toBeNull();
    expect(Number(granted![1])).toBeLessThan(1000);
  });
});
