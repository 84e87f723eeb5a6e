// `threads: 0`: the client runs its TransferRuntime (curl engine, daemon link) in the caller's own thread, with no
// thread hop per request. Same guarantees: warm handed sockets, keep-alive reuse, aborts, and no fd left behind.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import {
  echoHandler,
  eventually,
  fdCount,
  httpOrigin,
  leasedTo,
  type Origin,
  startTestDaemon,
} from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let origin: Origin;
let slow: Origin;
/** Requests `slow` has received. */
let slowRequests = 0;
let medium: Origin;
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = await httpOrigin(echoHandler());
  const answer = echoHandler(5_000);
  slow = await httpOrigin((request, response) => {
    slowRequests++;
    answer(request, response);
  });
  medium = await httpOrigin(echoHandler(300));
  daemon = await startTestDaemon([origin.port, slow.port, medium.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
  await slow?.close();
  await medium?.close();
});

describe('threads: 0 (in the caller thread)', () => {
  it('serves requests over handed sockets, reuses keep-alive connections, and leaves no fd behind', async () => {
    const before = fdCount();
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
    const first = await client.request(`http://127.0.0.1:${origin.port}/one`);
    expect(first).toMatchObject({ status: 200, connection: 'leased' });
    expect(first.body.toString()).toBe('GET /one 0');
    for (let i = 0; i < 50; i++) {
      const again = await client.request(`http://127.0.0.1:${origin.port}/n${i}`, { method: 'POST', body: 'abc' });
      expect(again.body.toString()).toBe(`POST /n${i} 3`);
      expect(again.connection).toBe('reused');
    }
    expect(origin.connections()).toBe(1);
    // Aborts cancel the transfer here too.
    const controller = new AbortController();
    const pending = client.request(`http://127.0.0.1:${slow.port}/slow`, { signal: controller.signal });
    const reason = new Error('the user gave up');
    // Aborted once the request is at the origin, in its transfer. (On a timer, a loaded machine now and then aborted
    // it in its acquire: the daemon kept the connection it had opened for it idle, and its server side, in this
    // process, stayed one fd over the count below.)
    await eventually(() => slowRequests === 1, 'the request at the slow origin');
    controller.abort(reason);
    // The signal's reason is the error's cause, as with worker threads.
    await expect(pending).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_ABORTED',
      message: 'request aborted: the user gave up',
      cause: reason,
    });
    await client.close();
    await eventually(async () => (await leasedTo(daemon.socketPath, origin.port)) === 0, 'leases ended');
    await eventually(() => fdCount() === before, `fd count back to ${before}`);
  });

  it('close() waits for the requests in flight, then refuses new ones with SOCKPOOL_ERR_CLOSED', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 0 });
    const pending = [1, 2, 3].map((i) => client.request(`http://127.0.0.1:${medium.port}/drain-${i}`));
    await eventually(() => medium.sockets.size >= 3, 'the requests reached the server');
    let closed = false;
    const closing = client.close().then(() => {
      closed = true;
    });
    const responses = await Promise.all(pending);
    expect(responses.map((response) => response.body.toString())).toEqual([
      'GET /drain-1 0',
      'GET /drain-2 0',
      'GET /drain-3 0',
    ]);
    await closing;
    expect(closed).toBe(true);
    await expect(client.request(`http://127.0.0.1:${origin.port}/after-close`)).rejects.toMatchObject({
      code: 'SOCKPOOL_ERR_CLOSED',
    });
  });

  it('rejects a negative thread count with a typed error', () => {
    expect(() => new SockpoolClient({ socketPath: daemon.socketPath, threads: -1 })).toThrow(
      expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }),
    );
  });
});
