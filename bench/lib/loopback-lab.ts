// A loopback origin (fixtures/peer-origin.ts: http and https on free ports, a body of `bodyBytes`) and a daemon
// allowed to reach it, both child processes started before anything is measured (a spawn from the measured process
// would make it pay for a fork). For the benchmarks that run clients in their own process against one origin
// (client-apis.ts, sequential.ts). close() stops both and removes their files.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestPki, type TestPki } from '../../test/helpers/tls.js';
import { type BenchDaemon, startBenchDaemon } from './daemon.js';
import { freePorts } from './free-ports.js';
import { spawnChild } from './proc.js';

export interface LoopbackLab {
  pki: TestPki;
  httpPort: number;
  httpsPort: number;
  daemon: BenchDaemon;
  /** The origin's URL of `scheme` (path /x). */
  url(scheme: 'http' | 'https'): string;
  close(): Promise<void>;
}

export async function startLoopbackLab(name: string, bodyBytes: number): Promise<LoopbackLab> {
  const tmp = mkdtempSync(join(tmpdir(), `sockpool-${name}-`));
  const pki = createTestPki(['localhost']);
  const [httpPort, httpsPort] = (await freePorts(2)) as [number, number];
  const origin = spawnChild(
    [
      process.execPath,
      join(import.meta.dirname, '..', 'fixtures', 'peer-origin.js'),
      JSON.stringify({
        hosts: ['127.0.0.1'],
        httpPort,
        httpsPort,
        certFile: join(pki.dir, 'server.pem'),
        keyFile: join(pki.dir, 'server.key'),
        bodyBytes,
      }),
    ],
    { nofile: 65_536 },
  );
  await origin.nextMessage((message) => message.ready === true);
  const daemon = await startBenchDaemon({
    dir: join(tmp, 'daemon'),
    config: { pool: { predictive: true, warmOnStartOrigins: 0 } },
    args: ['--allow', '127.0.0.0/8', '--allow-port', String(httpPort), '--allow-port', String(httpsPort)],
  });
  return {
    pki,
    httpPort,
    httpsPort,
    daemon,
    url: (scheme) => `${scheme}://127.0.0.1:${scheme === 'http' ? httpPort : httpsPort}/x`,
    async close() {
      await daemon.stop();
      await origin.stop();
      rmSync(tmp, { recursive: true, force: true });
      rmSync(pki.dir, { recursive: true, force: true });
    },
  };
}
