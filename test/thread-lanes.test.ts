// The caller's ends of the worker threads' lanes (client/thread-lanes.ts), over a real MessageChannel whose other
// end plays the thread: what goes in one message, and when it goes. And the lanes' flat message form
// (worker/lane-protocol.ts): every field of a request, an abort and an outcome read back as it was written, after a
// real structured clone.
import { MessageChannel, type MessagePort, receiveMessageOnPort } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { ThreadLanes } from '../client/thread-lanes.js';
import { epochNow, type TransferRequest } from '../worker/curl-engine.js';
import {
  type LaneCalls,
  type LaneReplies,
  pushAbortCall,
  pushReply,
  pushRequestCall,
  readCalls,
  readReplies,
  removeCall,
} from '../worker/lane-protocol.js';

function request(path: string): TransferRequest {
  return {
    url: `http://lane.test${path}`,
    method: 'GET',
    headers: [],
    deadline: epochNow() + 60_000,
    timeoutMs: 60_000,
  };
}

/** The ids of the calls of the next message on the thread's end, if one was posted already (read synchronously). */
function nextMessage(port: MessagePort): number[] | undefined {
  const calls = receiveMessageOnPort(port)?.message as LaneCalls | undefined;
  if (!calls) return undefined;
  const ids: number[] = [];
  readCalls(
    calls,
    (id) => ids.push(id),
    (id) => ids.push(id),
  );
  return ids;
}

const nextTurn = () => new Promise((resolve) => setImmediate(resolve));

describe('ThreadLanes', () => {
  it("gathers one turn's requests into one message, and sends a full lane's at once", async () => {
    const lanes = new ThreadLanes(3);
    const { port1, port2: thread } = new MessageChannel();
    lanes.attach(port1);
    // Two of three places: the message waits for the end of the turn (more requests may come in it).
    const outcomes = [lanes.run(request('/1'), undefined), lanes.run(request('/2'), undefined)];
    expect(nextMessage(thread)).toBeUndefined();
    await nextTurn();
    // (Ids are the lanes' own: an IdTable's, from 0.)
    expect(nextMessage(thread)).toEqual([0, 1]);
    // The third fills the lane: nothing more can join it this turn, so it goes before the caller's turn ends (a
    // crawler queueing its whole frontier in one turn has its first requests on their way meanwhile).
    outcomes.push(lanes.run(request('/3'), undefined));
    expect(nextMessage(thread)).toEqual([2]);
    // Beyond the lane's places requests wait here, in order, until an outcome frees one.
    outcomes.push(lanes.run(request('/4'), undefined));
    await nextTurn();
    expect(nextMessage(thread)).toBeUndefined();
    const reply = (...ids: number[]): LaneReplies => {
      const replies: LaneReplies = [];
      for (const id of ids) {
        pushReply(replies, id, { ok: false, error: { code: 'SOCKPOOL_ERR_TIMEOUT', message: `test ${id}` } });
      }
      return replies;
    };
    thread.postMessage(reply(0));
    await outcomes[0]!.catch(() => {});
    await nextTurn();
    // The fourth takes the slot the first freed: a new id all the same (the slot's second use).
    const [fourth] = nextMessage(thread)!;
    expect(fourth).not.toBe(0);
    expect([1, 2]).not.toContain(fourth);
    thread.postMessage(reply(0, 1, 2, fourth!));
    await Promise.allSettled(outcomes);
    await lanes.idle();
    lanes.close();
    thread.close();
  });
});

/** A value as the other thread gets it: a structured clone. */
function cloned<T>(value: T): T {
  const { port1, port2 } = new MessageChannel();
  port1.postMessage(value);
  const message = receiveMessageOnPort(port2)?.message as T;
  port1.close();
  return message;
}

describe('the lanes’ flat messages', () => {
  it('carry requests and aborts, in order, every field as written; an unsent call can be taken out', () => {
    const withBody: TransferRequest = {
      url: 'http://lane.test/upload?x=1',
      method: 'POST',
      headers: [
        ['content-type', 'text/plain'],
        ['x-odd', 'a, b; c=\u00e9'],
      ],
      body: new Uint8Array([1, 2, 3]),
      deadline: 1_700_000_000_123.5,
      timeoutMs: 2_500,
    };
    const calls: LaneCalls = [];
    pushRequestCall(calls, 7, withBody, true);
    pushAbortCall(calls, 3, { code: 'SOCKPOOL_ERR_ABORTED', message: 'gone' });
    const plain = request('/plain');
    pushRequestCall(calls, 8, plain, false);
    pushRequestCall(calls, 9, request('/unsent'), false);
    expect(removeCall(calls, 9)).toBe(true);
    expect(removeCall(calls, 9)).toBe(false);
    const read: unknown[] = [];
    readCalls(
      cloned(calls),
      (id, got, abortable) => read.push({ id, request: got, abortable }),
      (id, error) => read.push({ id, error }),
    );
    expect(read).toEqual([
      { id: 7, request: { ...withBody, body: new Uint8Array([1, 2, 3]) }, abortable: true },
      { id: 3, error: { code: 'SOCKPOOL_ERR_ABORTED', message: 'gone' } },
      { id: 8, request: { ...plain, body: undefined }, abortable: false },
    ]);
  });

  it('carry outcomes, in order: a response with its head, timings, relayed TLS and body, and a failure', () => {
    const result = {
      status: 201,
      headers: [
        ['date', 'Fri, 04 Dec 2026 06:00:00 GMT'],
        ['set-cookie', 'a=1'],
        ['set-cookie', 'b=2'],
      ] as Array<[string, string]>,
      url: 'https://lane.test/x',
      httpVersion: '2',
      warm: true,
      connection: 'leased' as const,
      tls: { version: 'TLSv1.3', alpn: 'h2', by: 'daemon' as const },
      timings: { acquireMs: 0.25, connectMs: 0, tlsMs: 0, ttfbMs: 1.5, totalMs: 2.75 },
      body: new Uint8Array([104, 105]),
    };
    const replies: LaneReplies = [];
    const moved = pushReply(replies, 4, { ok: true, result });
    expect(moved).toBe(result.body.buffer);
    const failure = { code: 'SOCKPOOL_ERR_TIMEOUT', message: 'late', causeCode: 'ETIMEDOUT' };
    expect(pushReply(replies, 5, { ok: false, error: failure })).toBeUndefined();
    const empty = { ...result, headers: [], tls: undefined, connection: 'reused' as const, body: new Uint8Array(0) };
    expect(pushReply(replies, 6, { ok: true, result: empty })).toBeUndefined();
    const read: unknown[] = [];
    readReplies(cloned(replies), (id, outcome) => read.push({ id, outcome }));
    expect(read).toEqual([
      { id: 4, outcome: { ok: true, result } },
      { id: 5, outcome: { ok: false, error: failure } },
      { id: 6, outcome: { ok: true, result: empty } },
    ]);
  });
});
