// An HTTP/1.1 origin on 127.0.0.1 that answers every request 200 with its own path as the body (so a benchmark can
// check that each answer is its own), as a process of its own: nginx (a real web server, one process), or Node's
// http server (fixtures/echo-origin.ts) where nginx is not installed or not wanted.
//
// Which one matters where other clients load the origin too (bench/adversarial.ts): Node's server spends a few
// hundred µs of its one event loop on every connection it accepts, so an honest request that arrives behind a
// burst of other clients' new connections waits for all of them; nginx accepts one in a few µs, as the remote
// servers a crawler or an API caller talks to do.
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { connect } from 'node:net';
import { join } from 'node:path';
import { freePorts } from './free-ports.js';
import { type BenchChild, spawnChild } from './proc.js';

export type EchoOriginKind = 'nginx' | 'node';

export interface EchoOrigin {
  kind: EchoOriginKind;
  /** The process that serves (its CPU time is the origin's). */
  pid: number;
  port: number;
  /** Connections it accepted so far. */
  accepted(): Promise<number>;
  stop(): Promise<void>;
}

export interface EchoOriginOptions {
  /** Prepended to the command (a CPU group, taskset). */
  wrap?: string[];
  /** A session of its own (see SpawnOptions.ownSession). */
  ownSession?: boolean;
  /** A directory for nginx's configuration, pid file and temp paths. */
  dir: string;
  /** The folder that holds dist/ (fixtures/echo-origin.js for the node kind). */
  repoRoot: string;
}

export function nginxInstalled(): boolean {
  try {
    execFileSync('nginx', ['-v'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

export async function startEchoOrigin(kind: EchoOriginKind, options: EchoOriginOptions): Promise<EchoOrigin> {
  return kind === 'nginx' ? startNginx(options) : startNode(options);
}

async function startNode(options: EchoOriginOptions): Promise<EchoOrigin> {
  const child = spawnChild([process.execPath, join(options.repoRoot, 'dist', 'bench', 'fixtures', 'echo-origin.js')], {
    wrap: options.wrap,
    ownSession: options.ownSession,
  });
  const { port } = await child.nextMessage<{ ready: boolean; port: number }>((message) => message.ready);
  return {
    kind: 'node',
    pid: child.pid,
    port,
    async accepted() {
      child.send('stats');
      const { stats } = await child.nextMessage<{ stats: { connections: number } }>((message) => 'stats' in message);
      return stats.connections;
    },
    stop: () => child.stop(),
  };
}

/** The path nginx reports its counters on (stub_status); the benchmark's own requests never use it. */
const STATUS_PATH = '/sockpool-bench-origin-status';

async function startNginx(options: EchoOriginOptions): Promise<EchoOrigin> {
  const dir = join(options.dir, 'nginx');
  mkdirSync(dir, { recursive: true });
  const [port] = await freePorts(1);
  // One process (no master), so that its pid is the one that serves. Connections stay open as long as the clients
  // keep them (curl's keep-alive would otherwise be cut every 1,000 requests or 75 s), and as many at once as the
  // daemon opens (prewarm floods).
  writeFileSync(
    join(dir, 'nginx.conf'),
    `daemon off;
master_process off;
worker_processes 1;
pid ${join(dir, 'nginx.pid')};
error_log stderr warn;
events { worker_connections 60000; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  keepalive_timeout 600s;
  keepalive_requests 100000000;
  server {
    listen 127.0.0.1:${port!} backlog=4096;
    default_type text/plain;
    location = ${STATUS_PATH} { stub_status; }
    location / { return 200 $request_uri; }
  }
}
`,
  );
  const child: BenchChild = spawnChild(['nginx', '-p', dir, '-c', join(dir, 'nginx.conf')], {
    wrap: options.wrap,
    ownSession: options.ownSession,
  });
  const deadline = performance.now() + 10_000;
  while (!(await answers(port!))) {
    if (child.child.exitCode !== null || child.child.signalCode !== null || performance.now() > deadline) {
      await child.stop('SIGKILL');
      throw new Error(`nginx did not start on 127.0.0.1:${port}:\n${child.stderr()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  let statusAsked = 0;
  return {
    kind: 'nginx',
    pid: child.pid,
    port: port!,
    async accepted() {
      // "Active connections: N \nserver accepts handled requests\n A H R \n...": A, less the status requests' own.
      statusAsked++;
      const body = await new Promise<string>((resolve, reject) => {
        http
          .get({ host: '127.0.0.1', port, path: STATUS_PATH, agent: false }, (response) => {
            let text = '';
            response.setEncoding('utf8');
            response.on('data', (chunk: string) => {
              text += chunk;
            });
            response.on('end', () => resolve(text));
          })
          .on('error', reject);
      });
      const counts = /\n\s*(\d+)\s+(\d+)\s+(\d+)/.exec(body);
      if (!counts) throw new Error(`nginx status: ${JSON.stringify(body)}`);
      return Number(counts[1]) - statusAsked;
    },
    stop: () => child.stop('SIGTERM'),
  };
}

/** Whether something accepts a TCP connection on 127.0.0.1:port now. */
function answers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}
