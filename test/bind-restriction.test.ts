// sockpoold's own backstop for "the daemon binds no IP port" (daemon/bind-restriction.ts): Landlock allows its TCP
// binds to port 0 and metricsPort only. Real processes: the daemon as a child process (the entry point applies the
// restriction), and a child node process that applies the same native call and then tries binds of its own. On a
// kernel without Landlock's network rules the daemon must say `unsupported` (and the bind checks are replaced by
// that assertion, never skipped silently).

import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { type DaemonProcess, repoRoot, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { freePort } from './helpers/free-port.js';

const nativeModule = join(repoRoot, 'dist', 'shared', 'native.js');

/** Runs `body` (an ES module's text, `native` in scope) in a fresh node process; returns what it printed (JSON). */
function inChild(body: string): unknown {
  const source = `import * as native from ${JSON.stringify(nativeModule)};\n${body}`;
  const out = execFileSync(process.execPath, ['--input-type=module', '-e', source], { encoding: 'utf8' });
  return JSON.parse(out);
}

/** Whether this kernel offers Landlock network rules (ABI 4+), asked in a throwaway process. */
const kernelAbi = inChild(`const r = native.restrictTcpBind([0]); console.log(JSON.stringify(r));`) as {
  abi: number;
  applied: boolean;
};

function noNewPrivs(pid: number): string {
  return /^NoNewPrivs:\s*(\d)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? '?';
}

describe('TCP bind restriction (Landlock)', () => {
  const cleanups: Array<() => unknown> = [];
  let daemon: DaemonProcess | undefined;
  afterEach(async () => {
    await daemon?.stop();
    daemon = undefined;
    for (const cleanup of cleanups.splice(0)) await cleanup();
  });

  it('the native call lets a process bind only the ports it named, port 0 included, in threads it starts later', () => {
    const result = inChild(`
      import net from 'node:net';
      import { Worker } from 'node:worker_threads';
      const tryListen = (port) => new Promise((resolve) => {
        const server = net.createServer();
        server.once('error', (error) => resolve(error.code));
        server.listen(port, '127.0.0.1', () => { const got = server.address().port; server.close(); resolve(got > 0 ? 'ok' : 'none'); });
      });
      const probe = net.createServer();
      await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve));
      const named = probe.address().port;
      await new Promise((resolve) => probe.close(resolve));
      const other = named === 65000 ? 65001 : 65000;
      const restriction = native.restrictTcpBind([0, named]);
      const inThread = await new Promise((resolve) => {
        const worker = new Worker(\`
          const net = process.getBuiltinModule('node:net');
          const server = net.createServer();
          server.once('error', (error) => process.getBuiltinModule('node:worker_threads').parentPort.postMessage(error.code));
          server.listen(${'$'}{other}, '127.0.0.1', () => { server.close(); process.getBuiltinModule('node:worker_threads').parentPort.postMessage('ok'); });
        \`, { eval: true });
        worker.once('message', resolve);
      });
      let badArgument;
      try { native.restrictTcpBind([70000]); } catch (error) { badArgument = error.name; }
      console.log(JSON.stringify({
        restriction,
        named: await tryListen(named),
        other: await tryListen(other),
        ephemeral: await tryListen(0),
        inThread,
        badArgument,
      }));
    `) as Record<string, unknown>;
    expect(result.badArgument).toBe('TypeError');
    if (kernelAbi.applied) {
      expect(result.restriction).toMatchObject({ applied: true, blocked: false });
      expect(result.named).toBe('ok');
      expect(result.ephemeral).toBe('ok');
      expect(result.other).toBe('EACCES');
      expect(result.inThread).toBe('EACCES');
    } else {
      expect(result.restriction).toMatchObject({ applied: false });
      expect(result.other).toBe('ok');
    }
  });

  it('sockpoold restricts itself at start: enforced (self-checked), metrics served, no_new_privs set', async () => {
    // A port free a moment ago may be taken by another test before the daemon binds it: a few tries.
    let metricsPort = 0;
    for (let attempt = 1; !daemon; attempt++) {
      metricsPort = await freePort();
      try {
        daemon = await startDaemon({ args: ['--metrics-port', String(metricsPort)] });
      } catch (error) {
        if (attempt === 3) throw error;
      }
    }
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
    cleanups.push(() => client.close());
    const stats = (await client.stats()) as { bindRestriction: Record<string, unknown> };
    if (kernelAbi.applied) {
      expect(stats.bindRestriction).toMatchObject({ state: 'enforced', allowedPorts: [0, metricsPort] });
      expect(stats.bindRestriction.detail).toMatch(/was refused/);
      expect(noNewPrivs(daemon.child.pid!)).toBe('1');
    } else {
      expect(stats.bindRestriction).toMatchObject({ state: 'unsupported' });
    }
    // The port it allowed itself is the one it serves metrics on.
    const metrics = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
    expect(metrics.status).toBe(200);
    const text = await metrics.text();
    const state = kernelAbi.applied ? 'enforced' : 'unsupported';
    expect(text).toContain(`sockpool_bind_restriction{state="${state}"} 1`);
    expect(text).toContain('sockpool_bind_restriction{state="off"} 0');
    expect(daemon.output()).toContain('TCP bind restriction (Landlock)');
  });

  it('restrictBind = false leaves the daemon unrestricted, and says so', async () => {
    const config = writeConfigFile({ restrictBind: false }, cleanups);
    daemon = await startDaemon({ args: ['--config', config] });
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
    cleanups.push(() => client.close());
    const stats = (await client.stats()) as { bindRestriction: Record<string, unknown> };
    expect(stats.bindRestriction).toMatchObject({ state: 'off', allowedPorts: [] });
    expect(noNewPrivs(daemon.child.pid!)).toBe('0');
  });

  it('refuses a restrictBind that is not a boolean, naming the key', () => {
    const cleanupsHere: Array<() => unknown> = [];
    const config = writeConfigFile({ restrictBind: 'yes' }, cleanupsHere);
    let failure: { status: number; stderr: string } | undefined;
    try {
      execFileSync(process.execPath, [join(repoRoot, 'dist', 'daemon', 'main.js'), '--config', config], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
      });
    } catch (error) {
      failure = error as { status: number; stderr: string };
    }
    for (const cleanup of cleanupsHere) cleanup();
    expect(failure?.status).toBe(2);
    expect(failure?.stderr).toMatch(/SOCKPOOL_ERR_CONFIG[\s\S]*restrictBind: expected boolean/);
  });
});
