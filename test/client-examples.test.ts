// Runs each program in examples/ as a user would (`node examples/x.ts ...`, importing the package as 'sockpool',
// which resolves to the compiled dist/), against a daemon child process and local HTTP servers.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { echoHandler, httpOrigin, type Origin, originStats, startTestDaemon } from './fixtures/client-helpers.js';
import { type DaemonProcess, repoRoot } from './helpers/daemon.js';

const run = promisify(execFile);
const FILE_BYTES = 3 * 1024 * 1024 + 17;

let site: Origin;
let other: Origin;
let files: Origin;
let uploaded: { bytes: number; sum: number } | undefined;
let daemon: DaemonProcess;
let scratch: string;

function example(name: string, args: string[]) {
  return run(process.execPath, [join(repoRoot, 'examples', name), ...args], {
    cwd: repoRoot,
    env: { ...process.env, SOCKPOOL_SOCKET: daemon.socketPath },
    timeout: 30_000,
  });
}

beforeAll(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'sockpool-examples-'));
  site = await httpOrigin(echoHandler(10));
  other = await httpOrigin(echoHandler(10));
  files = await httpOrigin((request, response) => {
    if (request.method === 'GET') {
      response.setHeader('content-length', FILE_BYTES);
      const chunk = Buffer.alloc(64 * 1024);
      for (let i = 0; i < chunk.length; i++) chunk[i] = i % 256;
      let left = FILE_BYTES;
      const write = () => {
        while (left > 0) {
          const piece = chunk.subarray(0, Math.min(chunk.length, left));
          left -= piece.length;
          if (!response.write(piece)) {
            response.once('drain', write);
            return;
          }
        }
        response.end();
      };
      write();
      return;
    }
    let bytes = 0;
    let sum = 0;
    request.on('data', (data: Buffer) => {
      bytes += data.length;
      for (const byte of data) sum = (sum + byte) % 1_000_003;
    });
    request.on('end', () => {
      uploaded = { bytes, sum };
      response.end(`stored ${bytes}`);
    });
  });
  daemon = await startTestDaemon([site.port, other.port, files.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await site?.close();
  await other?.close();
  await files?.close();
  rmSync(scratch, { recursive: true, force: true });
});

describe('examples/', () => {
  it('get.ts prints the status, the connection and the body', async () => {
    const { stdout } = await example('get.ts', [`http://127.0.0.1:${site.port}/hello`]);
    expect(stdout).toMatch(/^HTTP\/1\.1 200 {2}connection=leased warm=false/m);
    expect(stdout).toMatch(/^timings ms: acquire [\d.]+ connect/m);
    expect(stdout).toMatch(/^12 bytes: GET \/hello 0$/m);
  });

  it('get.ts reports a typed error code and exits 1 when the daemon refuses', async () => {
    const failed = await example('get.ts', ['http://127.0.0.1:9/refused']).catch((error) => error);
    expect(failed.code).toBe(1);
    expect(failed.stderr).toMatch(/failed: SOCKPOOL_ERR_POLICY/);
  });

  it('crawler.ts prewarms each origin, then fetches every URL over warm connections', async () => {
    const urls = [
      ...Array.from({ length: 6 }, (_, i) => `http://127.0.0.1:${site.port}/page-${i}`),
      ...Array.from({ length: 3 }, (_, i) => `http://127.0.0.1:${other.port}/doc-${i}`),
    ];
    const { stdout } = await example('crawler.ts', urls);
    for (const url of urls) expect(stdout).toContain(`200 ${url} `);
    expect(stdout).toMatch(/^done: 9 urls, \d+ over warm connections, 0 failed$/m);
    const warm = Number(/(\d+) over warm/.exec(stdout)?.[1]);
    expect(warm).toBeGreaterThan(0);
    // The daemon opened the prewarmed connections itself and handed them out warm.
    expect((await originStats(daemon.socketPath, site.port)).handoffs).toBeGreaterThan(0);
  });

  it('stream.ts downloads into a file and uploads it back, streaming both ways', async () => {
    const file = join(scratch, 'download.bin');
    const { stdout } = await example('stream.ts', [
      `http://127.0.0.1:${files.port}/file`,
      file,
      `http://127.0.0.1:${files.port}/upload`,
    ]);
    expect(stdout).toContain(`downloaded ${FILE_BYTES} bytes to ${file}`);
    expect(stdout).toContain(`HTTP 200 stored ${FILE_BYTES}`);
    const content = readFileSync(file);
    let sum = 0;
    for (const byte of content) sum = (sum + byte) % 1_000_003;
    expect(uploaded).toEqual({ bytes: FILE_BYTES, sum });
  });
});
