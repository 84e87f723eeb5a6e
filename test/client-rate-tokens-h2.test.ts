// A rate-limited HTTP/2 origin the worker has not seen yet, asked a burst of requests at once. Only the first
// request acquires a socket (the daemon charges its token on that acquire); the others wait for its connection and
// multiplex over it (worker/socket-supply.ts: a group). They went out without a token of their own (the worker did
// not know the origin's rate when they started): a burst of five to an origin allowing one request a minute reached
// it five times. Each joiner now takes its token once the first lease has told the worker the rate.
// Real daemon child process, real node:http2 origin over TLS on 127.0.0.1.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { ErrorCodes } from '../shared/errors.js';
import { h2Origin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';
import { createTestPki, type TestPki } from './helpers/tls.js';

let pki: TestPki;
/** One origin per client mode, each seen by no client before its test. */
const origins: Origin[] = [];
/** Requests each origin answered. */
const answered: number[] = [];
let daemon: DaemonProcess;

beforeAll(async () => {
  pki = createTestPki();
  for (let i = 0; i < 2; i++) {
    answered.push(0);
    origins.push(
      await h2Origin(pki, (_request, response) => {
        answered[i]!++;
        response.end('ok');
      }),
    );
  }
  // One request a minute, burst 1: the burst's first request takes the only token there is.
  daemon = await startTestDaemon(
    origins.map((origin) => origin.port),
    {
      config: {
        pool: {
          origins: origins.map((origin) => ({
            match: `127.0.0.1:${origin.port}`,
            requestsPerSecond: 1 / 60,
            burst: 1,
          })),
        },
      },
    },
  );
});

afterAll(async () => {
  await daemon?.stop();
  for (const origin of origins) await origin.close();
});

describe('a burst to a rate-limited HTTP/2 origin not seen before', () => {
  for (const [index, threads] of [0, 1].entries()) {
    it(`sends the origin no more requests than its rate allows (threads: ${threads})`, async () => {
      const client = new SockpoolClient({ socketPath: daemon.socketPath, threads, caFile: pki.caFile });
      try {
        const url = `https://127.0.0.1:${origins[index]!.port}/`;
        // Ten seconds (room for a thread's start on a loaded machine) are far less than the minute the next token is
        // away: the others are refused for the rate at once.
        const outcomes = await Promise.allSettled(
          Array.from({ length: 5 }, () => client.request(url, { timeoutMs: 10_000 })),
        );
        const codes = outcomes.map((outcome) =>
          outcome.status === 'fulfilled' ? outcome.value.status : (outcome.reason as { code?: string }).code,
        );
        expect({ answered: answered[index], codes: codes.sort() }).toEqual({
          answered: 1,
          codes: [200, ...Array(4).fill(ErrorCodes.RATE_LIMITED)].sort(),
        });
      } finally {
        await client.close();
      }
    });
  }
});
