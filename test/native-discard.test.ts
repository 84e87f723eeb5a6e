// native.discard() of a Unix socket a peer prepared (DrainUnixQueue): what is queued in it is taken out and discarded
// before the close, with whatever receive options the peer set on it (they are the socket's own, and the drain reads
// with them). A hostile peer (Python, which can set them: test/fixtures/prepared-unix-socket.py) prepares the socket.
import { once } from 'node:events';
import { readdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { fdCount, pollUntil, receiveMessage, warmUpChildProcesses } from './fixtures/native-helpers.js';
import { spawnChild } from './helpers/children.js';

const script = join(import.meta.dirname, 'fixtures', 'prepared-unix-socket.py');
const cleanups: Array<() => unknown> = [];

beforeAll(async () => {
  await warmUpChildProcesses();
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** This process's fds that are pidfds. */
function pidfds(): string[] {
  return readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[pidfd]';
    } catch {
      return false;
    }
  });
}

/**
 * The socket the peer prepared (`args`: its mode and options), received over a seqpacket pair, and the peer's process;
 * null where the kernel lacks an option the mode needs (the peer said `unsupported`, and sent nothing).
 */
async function preparedSocket(args: string[]) {
  const [mine, theirs] = native.seqpacketPair();
  const peer = spawnChild('python3', [script, ...args], { stdio: ['ignore', 'pipe', 'inherit', theirs] });
  cleanups.push(() => peer.kill());
  native.close(theirs);
  const [said] = (await once(peer.stdout!, 'data')) as [Buffer];
  if (said.toString() === 'unsupported\n') {
    native.close(mine);
    await once(peer, 'close');
    return null;
  }
  const message = await receiveMessage(mine, 64, 1);
  native.close(mine);
  expect(message.data.toString()).toBe('prepared');
  expect(message.fds).toHaveLength(1);
  return { fd: message.fds[0]!, peer };
}

describe('discard of a Unix socket a peer prepared', () => {
  it('SO_PASSPIDFD on it: the pidfd each queued message brings (SCM_PIDFD) is closed, none is left open', async (context) => {
    const before = fdCount();
    const prepared = await preparedSocket(['pidfd']);
    if (prepared === null) return context.skip('no SO_PASSPIDFD before Linux 6.5');
    await once(prepared.peer, 'close');
    native.discard(prepared.fd);
    expect(pidfds()).toEqual([]);
    expect(fdCount()).toBe(before);
  });

  it('SO_PASSCRED and SO_TIMESTAMP on it: a message of 253 fds still fits, none is dropped by the kernel', async () => {
    // The last of the 253 is a TCP socket whose close would wait 10 s for its linger: dropped by the kernel (no room
    // left in the control buffer after the credentials and the timestamp), it made discard() wait that long.
    const before = fdCount();
    const { fd, peer } = (await preparedSocket(['crowded', '10']))!;
    const started = performance.now();
    native.discard(fd);
    expect(performance.now() - started).toBeLessThan(5_000);
    peer.kill();
    await once(peer, 'close');
    // (The 252 others were /dev/null: not sockets, closed by the addon's closing thread, DeferredCloser.)
    await pollUntil(
      () => fdCount() === before,
      () => `the fds back to ${before} (${fdCount()} open)`,
    );
  }, 30_000);
});
