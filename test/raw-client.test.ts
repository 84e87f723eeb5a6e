// The tests' bare protocol client (test/helpers/raw-client.ts) reads what a peer sent before it hung up, as the real
// client's channel does: a test that counts refusals must not take a reset for a missing reply.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { encodeMessage } from '../shared/protocol.js';
import { fdCount, waitForEvents } from './fixtures/native-helpers.js';
import { RawClient } from './helpers/raw-client.js';

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

it('reads the reply queued behind the reset of a peer that hung up with its message unread', async () => {
  const before = fdCount();
  const directory = mkdtempSync(join(tmpdir(), 'raw-client-'));
  cleanups.push(() => rmSync(directory, { recursive: true, force: true }));
  const listener = native.seqpacketListen(join(directory, 'peer.sock'), 4);
  const raw = new RawClient(join(directory, 'peer.sock'));
  await waitForEvents(listener, native.READABLE);
  const peer = native.accept(listener)!;
  // The client speaks first; the peer answers and hangs up without reading it: the kernel sets ECONNRESET on the
  // client's socket, and reports it before the queued answer.
  raw.sendJson({ type: 'hello', id: 1, version: 1 });
  native.sendMessage(
    peer,
    encodeMessage({ type: 'error', id: null, code: 'SOCKPOOL_ERR_ACCESS_DENIED', message: 'no' }),
    [],
  );
  native.close(peer);
  native.close(listener);
  expect((await raw.receive()).message).toMatchObject({ type: 'error', code: 'SOCKPOOL_ERR_ACCESS_DENIED' });
  expect(await raw.receive()).toMatchObject({ message: null, eof: true });
  raw.close();
  expect(fdCount()).toBe(before);
});
