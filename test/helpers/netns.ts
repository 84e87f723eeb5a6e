// A network namespace of the test's own: loopback up and nothing else (no veth, no route off this machine), so
// a daemon started inside it cannot send a packet anywhere but the namespace's own addresses, whatever its policy
// does. Addresses of any class (10.x, 169.254.169.254, fd00::1...) can be put on the namespace's loopback so that
// a connect to them would succeed: a refusal then proves the policy, not an unreachable address.
//
// Inside the namespace runs an *agent*: this very file started as a child (`ip netns exec NS node ... netns.ts
// --netns-agent`), driven by JSON lines on stdin/stdout. It listens on TCP ports (echo, and it records every
// connection with the local address it arrived at), runs the test DNS server (test/helpers/dns-server.ts) on the
// namespace's loopback, probes reachability with its own connects (marked as probes, not counted as arrivals),
// and fetches URLs (the daemon's metrics) from inside.
//
// Clean-up: destroy() kills the processes this helper started (by pid) and deletes the namespace; call it from
// afterAll. An exit hook does the same if the test process ends without it. Namespaces left by a test process that
// no longer exists (same name prefix, dead pid) are deleted when the next one is created.
//
// The agent part runs under Node's type stripping (no build step): keep this file to erasable TypeScript syntax.

import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';

const PREFIX = 'sockpool-t-';
const repoRoot = join(import.meta.dirname, '..', '..');
const registerTs = join(repoRoot, 'test', 'fixtures', 'register-ts.mjs');
const AGENT_FLAG = '--netns-agent';

/** One connection a listener of the agent accepted. Addresses are plain (IPv4-mapped IPv6 turned into IPv4). */
export interface AgentConnection {
  localAddress: string;
  localPort: number;
  remoteAddress: string;
  remotePort: number;
  /** Opened by the agent's own probe() (reachability check), not by anyone under test. */
  probe: boolean;
  /** Milliseconds since the agent started (monotonic), when accepted. */
  at: number;
}

export interface ProbeResult {
  ok: boolean;
  /** errno name when the connect failed (ECONNREFUSED, ENETUNREACH, ...). */
  code?: string;
}

/** The agent running inside a namespace. Every call is one request/reply over the child's stdin/stdout. */
export interface NetnsAgent {
  readonly pid: number;
  /** Echo server on host (default '::', dual stack: every local address of the namespace) and port. */
  listen(port: number, host?: string): Promise<{ port: number }>;
  /** Connections accepted so far, probes included (filter on `probe`). */
  connections(port?: number): Promise<AgentConnection[]>;
  /** Connects from inside the namespace and closes at once: is this address reachable there? */
  probe(host: string, port: number): Promise<ProbeResult>;
  /** Starts the test DNS server on the namespace's 127.0.0.1; returns 'IP:PORT' for `dns.servers`. */
  startDns(records: Record<string, { a?: string[]; aaaa?: string[]; ttl?: number }>): Promise<string>;
  /** HTTP GET from inside the namespace. */
  httpGet(url: string): Promise<{ status: number; body: string }>;
  /** What the agent wrote on stderr (for failure messages). */
  stderr(): string;
  close(): Promise<void>;
}

export interface Netns {
  readonly name: string;
  /** argv prefix that runs a command inside the namespace: startDaemon({ wrap: ns.exec }). */
  readonly exec: string[];
  /** `ip -n NAME ...args`; returns stdout, throws on failure. */
  ip(...args: string[]): string;
  /** Puts an address on the namespace's loopback (/32 or /128), so that connects to it succeed there. */
  addAddress(address: string): void;
  /** Starts a process inside the namespace; it is killed by destroy(). */
  spawn(argv: string[]): ChildProcess;
  /** Starts an agent inside the namespace; it is closed by destroy(). */
  startAgent(): Promise<NetnsAgent>;
  destroy(): Promise<void>;
}

/** True when this process may create network namespaces (root with iproute2). */
export function netnsSupported(): boolean {
  if (process.getuid?.() !== 0) return false;
  try {
    execFileSync('ip', ['netns', 'list'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as { code?: string }).code === 'EPERM';
  }
}

/** Deletes namespaces of this helper whose test process is gone (a crashed run that never reached afterAll). */
function deleteStaleNamespaces(): void {
  let listing = '';
  try {
    listing = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });
  } catch {
    return;
  }
  for (const line of listing.split('\n')) {
    const name = line.split(' ')[0] ?? '';
    const match = new RegExp(`^${PREFIX}(\\d+)-\\d+$`).exec(name);
    if (!match || pidAlive(Number(match[1]))) continue;
    try {
      execFileSync('ip', ['netns', 'del', name], { stdio: 'ignore' });
    } catch {}
  }
}

let counter = 0;
const live = new Set<{ destroySync(): void }>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const entry of live) entry.destroySync();
  });
}

/** Creates a namespace with only loopback, up. Destroy it in afterAll (it is also destroyed at process exit). */
export function createNetns(): Netns {
  deleteStaleNamespaces();
  installExitHook();
  const name = `${PREFIX}${process.pid}-${counter++}`;
  execFileSync('ip', ['netns', 'add', name], { stdio: 'pipe' });
  const children = new Set<ChildProcess>();
  const agents = new Set<NetnsAgent>();
  let destroyed = false;
  const ip = (...args: string[]): string =>
    execFileSync('ip', ['-n', name, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const entry = {
    destroySync(): void {
      if (destroyed) return;
      destroyed = true;
      live.delete(entry);
      for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      try {
        execFileSync('ip', ['netns', 'del', name], { stdio: 'ignore' });
      } catch {}
    },
  };
  live.add(entry);
  try {
    ip('link', 'set', 'lo', 'up');
  } catch (error) {
    entry.destroySync();
    throw error;
  }
  const exec = ['ip', 'netns', 'exec', name];

  const netns: Netns = {
    name,
    exec,
    ip,
    addAddress(address) {
      if (address.includes(':')) ip('-6', 'addr', 'add', `${address}/128`, 'dev', 'lo', 'nodad');
      else ip('addr', 'add', `${address}/32`, 'dev', 'lo');
    },
    spawn(argv) {
      // Killed with the test process even if that dies by SIGKILL (no exit hook then): setpriv and `ip netns exec`
      // exec in place, so the parent-death signal holds for the program. Not test/helpers/children.ts: the agent
      // runs this file outside vitest.
      const child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', ...exec, ...argv], {
        stdio: ['pipe', 'pipe', 'pipe'],
      });
      children.add(child);
      child.once('exit', () => children.delete(child));
      return child;
    },
    async startAgent() {
      const child = netns.spawn([
        process.execPath,
        '--import',
        pathToFileURL(registerTs).href,
        '--disable-warning=ExperimentalWarning',
        fileURLToPath(import.meta.url),
        AGENT_FLAG,
      ]);
      const agent = agentClient(child);
      agents.add(agent);
      // The first request doubles as the readiness check.
      await agent.connections();
      return agent;
    },
    async destroy() {
      if (destroyed) return;
      for (const agent of agents) await agent.close().catch(() => {});
      for (const child of children) {
        if (child.exitCode !== null || child.signalCode !== null) continue;
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
        await once(child, 'exit');
        clearTimeout(timer);
      }
      entry.destroySync();
    },
  };
  return netns;
}

// ---------------------------------------------------------------------------------------------------------------
// Parent side of the agent protocol: {id, op, ...args} lines in, {id, ok, result | error} lines out.

function agentClient(child: ChildProcess): NetnsAgent {
  let nextId = 1;
  let stderr = '';
  const pending = new Map<number, { resolve(value: unknown): void; reject(error: Error): void }>();
  child.stderr!.on('data', (chunk) => {
    stderr += chunk;
  });
  createInterface({ input: child.stdout! }).on('line', (line) => {
    let reply: { id: number; ok: boolean; result?: unknown; error?: string };
    try {
      reply = JSON.parse(line);
    } catch {
      stderr += `(stdout) ${line}\n`;
      return;
    }
    const waiter = pending.get(reply.id);
    if (!waiter) return;
    pending.delete(reply.id);
    if (reply.ok) waiter.resolve(reply.result);
    else waiter.reject(new Error(`netns agent: ${reply.error}`));
  });
  child.once('exit', (code, signal) => {
    for (const waiter of pending.values()) {
      waiter.reject(new Error(`netns agent exited (${code ?? signal}):\n${stderr}`));
    }
    pending.clear();
  });
  const call = <T>(op: string, args: Record<string, unknown> = {}): Promise<T> => {
    if (child.exitCode !== null || child.signalCode !== null) {
      return Promise.reject(new Error(`netns agent is not running:\n${stderr}`));
    }
    const id = nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        pending.delete(id);
        reject(new Error(`netns agent: no reply to ${op} within 15 s:\n${stderr}`));
      }, 15_000);
      pending.set(id, {
        resolve: (value) => {
          clearTimeout(timer);
          resolve(value as T);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
      child.stdin!.write(`${JSON.stringify({ id, op, ...args })}\n`);
    });
  };
  return {
    pid: child.pid ?? -1,
    listen: (port, host = '::') => call('listen', { port, host }),
    connections: (port) => call('connections', { port }),
    probe: (host, port) => call('probe', { host, port }),
    startDns: (records) => call('dns', { records }),
    httpGet: (url) => call('httpGet', { url }),
    stderr: () => stderr,
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.stdin!.end();
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(timer);
    },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// The agent itself (runs inside the namespace, started by startAgent()).

function plainAddress(address: string | undefined): string {
  const text = address ?? '';
  return text.startsWith('::ffff:') && text.includes('.') ? text.slice(7) : text;
}

async function runAgent(): Promise<void> {
  const net = await import('node:net');
  const http = await import('node:http');
  const started = performance.now();
  const servers: import('node:net').Server[] = [];
  const accepted: Array<Omit<AgentConnection, 'probe'>> = [];
  const sockets = new Set<import('node:net').Socket>();
  /** Local endpoints ('addr|port') of the agent's own probe connects. */
  const probeEndpoints = new Set<string>();
  let dnsServer: { close(): Promise<void> } | undefined;

  const ops: Record<string, (args: Record<string, unknown>) => Promise<unknown>> = {
    async listen(args) {
      const server = net.createServer((socket) => {
        sockets.add(socket);
        socket.on('close', () => sockets.delete(socket));
        socket.on('error', () => {});
        accepted.push({
          localAddress: plainAddress(socket.localAddress),
          localPort: socket.localPort ?? 0,
          remoteAddress: plainAddress(socket.remoteAddress),
          remotePort: socket.remotePort ?? 0,
          at: Math.round(performance.now() - started),
        });
        socket.pipe(socket);
      });
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen({ port: args.port as number, host: args.host as string, ipv6Only: false }, () => resolve());
      });
      servers.push(server);
      return { port: (server.address() as import('node:net').AddressInfo).port };
    },
    async connections(args) {
      return accepted
        .filter((entry) => args.port === undefined || entry.localPort === args.port)
        .map((entry) => ({ ...entry, probe: probeEndpoints.has(`${entry.remoteAddress}|${entry.remotePort}`) }));
    },
    async probe(args) {
      return new Promise((resolve) => {
        const socket = net.connect({ host: args.host as string, port: args.port as number });
        socket.once('connect', () => {
          probeEndpoints.add(`${plainAddress(socket.localAddress)}|${socket.localPort}`);
          socket.destroy();
          resolve({ ok: true });
        });
        socket.once('error', (error: Error & { code?: string }) => resolve({ ok: false, code: error.code }));
      });
    },
    async dns(args) {
      const module = (await import(pathToFileURL(join(import.meta.dirname, 'dns-server.ts')).href)) as {
        startDnsServer(records: unknown): Promise<{ server: string; close(): Promise<void> }>;
      };
      const server = await module.startDnsServer(args.records);
      dnsServer = server;
      return server.server;
    },
    async httpGet(args) {
      return new Promise((resolve, reject) => {
        http
          .get(args.url as string, (response) => {
            let body = '';
            response.setEncoding('utf8');
            response.on('data', (chunk: string) => {
              body += chunk;
            });
            response.on('end', () => resolve({ status: response.statusCode ?? 0, body }));
          })
          .on('error', reject);
      });
    },
  };

  const input = createInterface({ input: process.stdin });
  input.on('line', (line) => {
    let request: { id: number; op: string } & Record<string, unknown>;
    try {
      request = JSON.parse(line);
    } catch {
      return;
    }
    const op = ops[request.op];
    const reply = (body: Record<string, unknown>) =>
      process.stdout.write(`${JSON.stringify({ id: request.id, ...body })}\n`);
    if (!op) {
      reply({ ok: false, error: `unknown op ${request.op}` });
      return;
    }
    op(request).then(
      (result) => reply({ ok: true, result }),
      (error: Error) => reply({ ok: false, error: error.message }),
    );
  });
  // stdin closed: the parent is done (or gone).
  input.on('close', () => {
    for (const socket of sockets) socket.destroy();
    for (const server of servers) server.close();
    void dnsServer?.close();
    setTimeout(() => process.exit(0), 50).unref();
  });
}

if (process.argv.includes(AGENT_FLAG) && process.argv[1] === fileURLToPath(import.meta.url)) {
  void runAgent();
}
