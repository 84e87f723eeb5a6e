// The caller's ends of the worker threads' lanes (client/thread-lanes.ts), over a real MessageChannel whose other
// end plays the thread: what goes in one message, and when it goes. And the lanes' flat message form
// (worker/lane-protocol.ts): every field of a request, an abort and an outcome read back as it was written, after a
// real structured clone.
import { MessageChannel, type MessagePort, receiveMessageOnPort } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { ThreadLanes } from '../client/thread-lanes.js';
import { epochNow, type TransferRequest } from '../worker/curl-engine.js';
import {
  CALL_ABORTABLE,
  CALL_PORT,
  CALL_SLOTS,
  type LaneCalls,
  type LaneReplies,
  pushAbortCall,
  pushPortEvent,
  pushReply,
  pushRequestCall,
  REPLY_SLOTS,
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
  const push = (id: number) => ids.push(id);
  readCalls(calls, { run: push, abort: push, portMessage: push, portClose: push });
  return ids;
}

/** Everything the next message on the thread's end holds, as read (undefined if none was posted yet). */
function nextCalls(port: MessagePort): unknown[] | undefined {
  const calls = receiveMessageOnPort(port)?.message as LaneCalls | undefined;
  if (!calls) return undefined;
  const read: unknown[] = [];
  readCalls(calls, {
    run: (id, got, flags) => read.push({ id, run: got.url, flags }),
    abort: (id, error) => read.push({ id, abort: error.code }),
    portMessage: (id, message) => read.push({ id, message }),
    portClose: (id) => read.push({ id, close: true }),
  });
  return read;
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
        pushReply(replies, id, { ok: false, error: { code: 'SOCKPOOL_ERR_TIMEOUT', message: `test ${id}` } }, 0);
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

  it("carries a streamed request's port messages both ways in the lane's batches, and ends the port with its outcome", async () => {
    const lanes = new ThreadLanes(4);
    const { port1, port2: thread } = new MessageChannel();
    lanes.attach(port1);
    const streamed = { ...request('/stream'), streamResponse: true };
    const { port, outcome } = lanes.stream(streamed);
    const got: unknown[] = [];
    port.on('message', (message: { t: string }) => {
      got.push(message);
      // As a caller's channel does at the response's end, before the outcome that follows in the same message.
      if (message.t === 'end') port.close();
    });
    // Posted in the same turn as the request: in the same batch, after it, the chunk's memory moved.
    const chunk = new Uint8Array([1, 2, 3]);
    port.postMessage({ t: 'credit', consumed: 0 });
    port.postMessage({ t: 'data', data: chunk }, [chunk.buffer as ArrayBuffer]);
    expect(chunk.byteLength).toBe(3);
    await nextTurn();
    expect(chunk.byteLength).toBe(0);
    expect(nextCalls(thread)).toEqual([
      { id: 0, run: 'http://lane.test/stream', flags: CALL_PORT },
      { id: 0, message: { t: 'credit', consumed: 0 } },
      { id: 0, message: { t: 'data', data: new Uint8Array([1, 2, 3]) } },
    ]);
    // The thread answers with the head, a chunk and the end, then the outcome, in one message: delivered in order.
    const replies: LaneReplies = [];
    pushPortEvent(replies, REPLY_SLOTS, 0, { t: 'head', status: 200 });
    pushPortEvent(replies, REPLY_SLOTS, 0, { t: 'end' });
    pushReply(replies, 0, { ok: false, error: { code: 'SOCKPOOL_ERR_TIMEOUT', message: 'test' } }, 0);
    thread.postMessage(replies);
    await expect(outcome).resolves.toEqual({ ok: false, error: { code: 'SOCKPOOL_ERR_TIMEOUT', message: 'test' } });
    expect(got).toEqual([{ t: 'head', status: 200 }, { t: 'end' }]);
    // The thread was done with the port (its outcome came right after the end): the close is not sent, and
    // posting now sends nothing either.
    port.postMessage({ t: 'credit', consumed: 1 });
    await nextTurn();
    expect(nextCalls(thread)).toBeUndefined();
    await lanes.idle();
    lanes.close();
    thread.close();
  });

  it('holds what a waiting streamed request posts until it has a lane, and drops it if its port closes first', async () => {
    const lanes = new ThreadLanes(1);
    const { port1, port2: thread } = new MessageChannel();
    lanes.attach(port1);
    const first = lanes.run(request('/busy'), undefined);
    // No room: both wait here.
    const waiting = lanes.stream({ ...request('/waits'), streamResponse: true });
    const dropped = lanes.stream({ ...request('/dropped'), streamResponse: true });
    waiting.port.postMessage({ t: 'credit', consumed: 5 });
    dropped.port.postMessage({ t: 'credit', consumed: 6 });
    expect(nextMessage(thread)).toEqual([0]);
    // The caller gives up the second before it ever reached a thread.
    dropped.port.close();
    await expect(dropped.outcome).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_ABORTED' });
    const done: LaneReplies = [];
    pushReply(done, 0, { ok: false, error: { code: 'SOCKPOOL_ERR_TIMEOUT', message: 'test' } }, 0);
    thread.postMessage(done);
    await first.catch(() => {});
    await nextTurn();
    // The freed place goes to the waiting one, with what it posted meanwhile; the dropped one never goes.
    expect(nextCalls(thread)).toEqual([
      { id: 1, run: 'http://lane.test/waits', flags: CALL_PORT },
      { id: 1, message: { t: 'credit', consumed: 5 } },
    ]);
    // Its caller closes it while it runs: the thread hears the close (and answers as usual).
    waiting.port.close();
    await nextTurn();
    expect(nextCalls(thread)).toEqual([{ id: 1, close: true }]);
    const answer: LaneReplies = [];
    pushReply(answer, 1, { ok: false, error: { code: 'SOCKPOOL_ERR_ABORTED', message: 'closed' } }, 0);
    thread.postMessage(answer);
    await expect(waiting.outcome).resolves.toMatchObject({ ok: false });
    await lanes.idle();
    lanes.close();
    thread.close();
  });

  it('fails a streamed request whose thread is gone, and ends its port', async () => {
    const lanes = new ThreadLanes(2);
    const { port1, port2: thread } = new MessageChannel();
    lanes.attach(port1);
    const { port, outcome } = lanes.stream({ ...request('/lost'), streamResponse: true });
    let closed = false;
    port.on('close', () => {
      closed = true;
    });
    await nextTurn();
    thread.close();
    await expect(outcome).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_WORKER_EXITED' });
    expect(closed).toBe(true);
    await lanes.idle();
    lanes.close();
  });

  it('sends a request to the lane whose thread holds an idle connection to its origin, within one of the least busy; claimIdle reserves one for the queue', async () => {
    const lanes = new ThreadLanes(4);
    const a = new MessageChannel();
    const b = new MessageChannel();
    lanes.attach(a.port1);
    lanes.attach(b.port1);
    const threads = { a: a.port2, b: b.port2 };
    const outcomes: Array<Promise<unknown>> = [];
    /** Requests to the origins `keys` in one turn: the thread each went to, and its id there. */
    const place = async (...keys: string[]) => {
      for (const key of keys) outcomes.push(lanes.run(request(`/${key}`), undefined, key).catch(() => {}));
      await nextTurn();
      const placed: Array<{ thread: 'a' | 'b'; id: number }> = [];
      for (const thread of ['a', 'b'] as const) {
        for (const id of nextMessage(threads[thread]) ?? []) placed.push({ thread, id });
      }
      return placed;
    };
    /** The thread answers the request, holding `idle` connections to its origin idle as it ends. */
    const answer = async ({ thread, id }: { thread: 'a' | 'b'; id: number }, idle: number) => {
      const replies: LaneReplies = [];
      pushReply(replies, id, { ok: false, error: { code: 'SOCKPOOL_ERR_TIMEOUT', message: 'test' } }, idle);
      threads[thread].postMessage(replies);
      await nextTurn();
    };
    // Nothing known: the least busy lane (the first of equals).
    const [x1, y1] = await place('x', 'y');
    expect([x1!.thread, y1!.thread]).toEqual(['a', 'b']);
    await answer(y1!, 1);
    await answer(x1!, 1);
    // Both idle: y to b, whose thread holds y's connection (a, as busy, comes first otherwise).
    const [y2] = await place('y');
    expect(y2!.thread).toBe('b');
    // b's connection to y is taken: the next y goes to the least busy, a.
    const [y3] = await place('y');
    expect(y3!.thread).toBe('a');
    // a holds x idle, as busy as b: x to a.
    const [x2] = await place('x');
    expect(x2!.thread).toBe('a');
    // It ends there with 2 of a's connections to x idle. With one more in flight than b, a takes x all the same
    // (HOME_SLACK); with two more, x goes to the least busy, b.
    await answer(x2!, 2);
    const [w1] = await place('w');
    expect(w1!.thread).toBe('a');
    const [x3] = await place('x');
    expect(x3!.thread).toBe('a');
    const [x4] = await place('x');
    expect(x4!.thread).toBe('b');
    // claimIdle: b's thread ends y2 holding y idle, and b has room: the connection is claimed there; a second claim
    // finds none. The y request that comes next goes to b though a is less busy.
    await answer(y2!, 1);
    for (const placed of [y3!, w1!, x3!]) await answer(placed, 0);
    expect(lanes.claimIdle('y')).toBe(true);
    expect(lanes.claimIdle('y')).toBe(false);
    const [y4] = await place('y');
    expect(y4!.thread).toBe('b');
    for (const placed of [x4!, y4!]) await answer(placed, 0);
    await Promise.all(outcomes);
    await lanes.idle();
    lanes.close();
    a.port2.close();
    b.port2.close();
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
      maxBodyBytes: 4096,
      deadline: 1_700_000_000_123.5,
      timeoutMs: 2_500,
    };
    const calls: LaneCalls = [];
    pushRequestCall(calls, 7, withBody, CALL_ABORTABLE);
    pushAbortCall(calls, 3, { code: 'SOCKPOOL_ERR_ABORTED', message: 'gone' });
    const plain = request('/plain');
    pushRequestCall(calls, 8, plain, 0);
    // Streamed either way: the declared length of a streamed body (or none), the response streamed.
    const upload: TransferRequest = { ...request('/upload'), method: 'PUT', streamedBody: { length: 10 } };
    const download: TransferRequest = {
      ...request('/download'),
      streamedBody: { length: undefined },
      streamResponse: true,
      decompress: true,
      // (0 is a limit: only an empty body passes.)
      maxBodyBytes: 0,
    };
    pushRequestCall(calls, 10, upload, CALL_PORT);
    // A port event of request 10 (with the same id as the request): not a call that removeCall takes out.
    pushPortEvent(calls, CALL_SLOTS, 10, { t: 'end' });
    pushRequestCall(calls, 11, download, CALL_PORT);
    pushPortEvent(calls, CALL_SLOTS, 11, undefined);
    pushRequestCall(calls, 9, request('/unsent'), 0);
    expect(removeCall(calls, 9)).toBe(true);
    expect(removeCall(calls, 9)).toBe(false);
    const read: unknown[] = [];
    readCalls(cloned(calls), {
      run: (id, got, flags) => read.push({ id, request: got, flags }),
      abort: (id, error) => read.push({ id, error }),
      portMessage: (id, message) => read.push({ id, message }),
      portClose: (id) => read.push({ id, close: true }),
    });
    const buffered = { streamedBody: undefined, streamResponse: false, decompress: false };
    expect(read).toEqual([
      { id: 7, request: { ...withBody, ...buffered, body: new Uint8Array([1, 2, 3]) }, flags: CALL_ABORTABLE },
      { id: 3, error: { code: 'SOCKPOOL_ERR_ABORTED', message: 'gone' } },
      { id: 8, request: { ...plain, ...buffered, body: undefined }, flags: 0 },
      { id: 10, request: { ...upload, body: undefined, streamResponse: false, decompress: false }, flags: CALL_PORT },
      { id: 10, message: { t: 'end' } },
      { id: 11, request: { ...download, body: undefined }, flags: CALL_PORT },
      { id: 11, close: true },
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
      timings: {
        acquireMs: 0.25,
        connectMs: 0,
        tlsMs: 0,
        ttfbMs: 1.5,
        totalMs: 2.75,
        tokenWaitMs: 0.125,
        capWaitMs: 0.375,
      },
      body: new Uint8Array([104, 105]),
    };
    const replies: LaneReplies = [];
    const moved = pushReply(replies, 4, { ok: true, result }, 3);
    expect(moved).toBe(result.body.buffer);
    const failure = { code: 'SOCKPOOL_ERR_TIMEOUT', message: 'late', causeCode: 'ETIMEDOUT' };
    expect(pushReply(replies, 5, { ok: false, error: failure }, 1)).toBeUndefined();
    const empty = { ...result, headers: [], tls: undefined, connection: 'reused' as const, body: new Uint8Array(0) };
    expect(pushReply(replies, 6, { ok: true, result: empty }, 0)).toBeUndefined();
    const read: unknown[] = [];
    pushPortEvent(replies, REPLY_SLOTS, 7, { t: 'head', head: { status: 200 } });
    readReplies(cloned(replies), {
      outcome: (id, outcome, idle) => read.push({ id, outcome, idle }),
      portMessage: (id, message) => read.push({ id, message }),
      portClose: (id) => read.push({ id, close: true }),
    });
    // (`idle`: the connections to the origin the thread holds idle as the request ends.)
    expect(read).toEqual([
      { id: 4, outcome: { ok: true, result }, idle: 3 },
      { id: 5, outcome: { ok: false, error: failure }, idle: 1 },
      { id: 6, outcome: { ok: true, result: empty }, idle: 0 },
      { id: 7, message: { t: 'head', head: { status: 200 } } },
    ]);
  });
});
