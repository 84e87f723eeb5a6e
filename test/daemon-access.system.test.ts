// Access control and per-origin socket settings that need root: a client process of another uid (setpriv), and
// socket marks (SO_MARK needs CAP_NET_ADMIN). System tier; the rest is in daemon-access.test.ts.
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { daemonScope } from './fixtures/daemon-scope.js';
import { eventually, repoRoot } from './helpers/daemon.js';

const run = promisify(execFile);
const { echoServer, daemonWith, client } = daemonScope();

/**
 * Connects to the daemon as another user (setpriv with `credentials`), sends a hello and returns the messages it
 * read: the hello's answer, or the refusal and then `{eof: true}` for the hang-up.
 */
async function helloAs(credentials: string[], socketPath: string): Promise<Array<Record<string, unknown>>> {
  const script = `
    const native = require(${JSON.stringify(join(repoRoot, 'native/build/Release/sockpool_native.node'))});
    const fd = native.seqpacketConnect(process.argv[1]);
    // The daemon may already have answered and hung up: a failed send is fine, its reply is still queued.
    try { native.sendMessage(fd, Buffer.from(JSON.stringify({ type: 'hello', id: 1, version: 1 })), []); } catch {}
    const poll = () => {
      let message = null;
      // A daemon that hung up with our hello unread makes the kernel report ECONNRESET once; its reply follows.
      // The raw binding answers [data, fds, eof] (shared/native.ts names the fields).
      try {
        const received = native.recvMessage(fd, 65536, 1);
        message = received && { data: received[0], fds: received[1], eof: received[2] };
      } catch (error) {
        if (error.code === 'ECONNRESET') return setTimeout(poll, 0);
        console.log(JSON.stringify({ error: error.code })); return;
      }
      if (message === null) return setTimeout(poll, 10);
      console.log(message.eof ? JSON.stringify({ eof: true }) : message.data.toString());
      // Admitted (a reply that is not an error): done. Refused: read on until the hang-up.
      if (!message.eof && JSON.parse(message.data.toString()).type !== 'error') process.exit(0);
      if (!message.eof) setTimeout(poll, 10);
    };
    poll();`;
  const { stdout } = await run('setpriv', [...credentials, process.execPath, '-e', script, socketPath], {
    timeout: 20_000,
  });
  return stdout
    .trim()
    .split('\n')
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

describe('access control (root)', () => {
  it('refuses a peer whose uid is not allowed, with SOCKPOOL_ERR_ACCESS_DENIED, and serves an allowed one', async () => {
    const echo = await echoServer();
    const sockpoold = await daemonWith({ access: { socketMode: '0666', allowUids: [0] } }, [
      '--allow',
      '127.0.0.1/32',
      '--allow-port',
      String(echo.port),
    ]);
    // A client process running as nobody (uid 65534): the daemon answers with one error and hangs up.
    const lines = await helloAs(['--reuid=65534', '--regid=65534', '--clear-groups'], sockpoold.socketPath);
    expect(lines[0]).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_ACCESS_DENIED' });
    expect(lines.at(-1)).toMatchObject({ eof: true });
    // Root (uid 0) is allowed.
    const raw = client(sockpoold.socketPath);
    expect((await raw.request({ type: 'hello', id: 1, version: 1 })).message).toMatchObject({ type: 'hello' });
    // The refusal is logged after its reply went out, and the log comes through the daemon's stdout apart from the
    // replies: waited for, not read at once (a full system run read the output before the line came).
    await eventually(() => sockpoold.output().includes('client refused by access control'), 'the refusal logged');
  });

  it('admits a peer by a supplementary group in allowGids (SO_PEERGROUPS), as the socket file does', async () => {
    const sockpoold = await daemonWith({ access: { socketMode: '0666', allowGids: [4242] } }, []);
    // Primary gid 65534, supplementary 4242: admitted (the hello is answered, the daemon does not hang up).
    const member = await helloAs(['--reuid=65534', '--regid=65534', '--groups=4242'], sockpoold.socketPath);
    expect(member[0]).toMatchObject({ type: 'hello' });
    // The same user without the group: refused.
    const outsider = await helloAs(['--reuid=65534', '--regid=65534', '--groups=4243'], sockpoold.socketPath);
    expect(outsider[0]).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_ACCESS_DENIED' });
    expect(outsider.at(-1)).toMatchObject({ eof: true });
  });
});

describe('per-origin socket settings (root)', () => {
  it('marks the connections of an origin whose override names a mark (SO_MARK)', async () => {
    const echo = await echoServer();
    const sockpoold = await daemonWith({ pool: { origins: [{ match: `127.0.0.1:${echo.port}`, mark: 42 }] } }, [
      '--allow',
      '127.0.0.1/32',
      '--allow-port',
      String(echo.port),
    ]);
    const raw = client(sockpoold.socketPath);
    const lease = await raw.request({ type: 'acquire', id: 1, host: '127.0.0.1', port: echo.port });
    expect(lease.message?.type).toBe('lease');
    const { port } = native.localAddress(lease.fds[0]!);
    const { stdout } = await run('ss', ['-tnHe', 'src', `127.0.0.1:${port}`]);
    expect(/fwmark:(0x[0-9a-f]+)/.exec(stdout)?.[1]).toBe('0x2a');
    for (const fd of lease.fds) native.close(fd);
  });
});
