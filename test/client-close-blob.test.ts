// close() waits for every request made before it, also one whose Blob body was still being read when close() came:
// such a request enters the client's queue only once its Blob is read, so close() used to find the queue empty,
// close the worker threads and resolve, and the request then ran on a runtime made in the caller's thread after
// close() (inlineWhenIdle) that nothing closed: its daemon session, its lease and its fds stayed open. Buffered
// request() and requestStream(), against a real daemon and origin.
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

/** Large enough that reading it takes longer than close() needs to find the queue empty. */
const bigBlob = () => new Blob([new Uint8Array(32 * 1024 * 1024)]);

let origin: Origin;
let daemon: DaemonProcess;

beforeAll(async () => {
  origin = await httpOrigin(echoHandler());
  daemon = await startTestDaemon([origin.port]);
});

afterAll(async () => {
  await daemon?.stop();
  await origin?.close();
});

describe('close() and a request whose Blob body is still being read', () => {
  for (const api of ['request', 'requestStream'] as const) {
    it(`${api}(): settled before close() resolves, and nothing of it left open`, async () => {
      const fdsBefore = fdCount() - origin.openSockets();
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads: 1 });
      const events: string[] = [];
      const url = `http://127.0.0.1:${origin.port}/blob`;
      let body: Promise<number> | undefined;
      // (A streamed request's transfer may end before its caller has read the last chunks it was sent: its head is
      // what comes before close() resolves, its body is read whole after.)
      const made =
        api === 'request'
          ? client.request(url, { method: 'POST', body: bigBlob() }).then((response) => response.body.length)
          : client.requestStream(url, { method: 'POST', body: bigBlob() }).then((response) => {
              body = new Response(response.body).arrayBuffer().then((bytes) => bytes.byteLength);
              return response.status;
            });
      const settled = made.then(
        (got) => events.push(`request ok ${got > 0}`),
        (error: { code?: string }) => events.push(`request failed ${error.code}`),
      );
      await client.close();
      events.push('close resolved');
      await settled;
      expect(events).toEqual(['request ok true', 'close resolved']);
      if (body) expect(await body).toBeGreaterThan(0);
      // Nothing of the client is left: no lease at the daemon, no fd here.
      await eventually(async () => (await leasedTo(daemon.socketPath, origin.port)) === 0, 'lease ended');
      await eventually(
        () => fdCount() - origin.openSockets() <= fdsBefore,
        () => `fds back to ${fdsBefore} (now ${fdCount() - origin.openSockets()})`,
      );
    });
  }
});
