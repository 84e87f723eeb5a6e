// The caller's ends of the worker threads' lanes (client/thread-lanes.ts), over a real MessageChannel whose other
// end plays the thread: what goes in one message, and when it goes.
import { MessageChannel, type MessagePort, receiveMessageOnPort } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { ThreadLanes } from '../client/thread-lanes.js';
import { epochNow, type TransferRequest } from '../worker/curl-engine.js';
import type { LaneCall, LaneReply } from '../worker/lane-protocol.js';

function request(path: string): TransferRequest {
  return {
    url: `http://lane.test${path}`,
    method: 'GET',
    headers: [],
    deadline: epochNow() + 60_000,
    timeoutMs: 60_000,
  };
}

/** The calls of the next message on the thread's end, if one was posted already (read synchronously). */
function nextMessage(port: MessagePort): LaneCall[] | undefined {
  return receiveMessageOnPort(port)?.message as LaneCall[] | undefined;
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
    expect(nextMessage(thread)?.map((call) => call.id)).toEqual([0, 1]);
    // The third fills the lane: nothing more can join it this turn, so it goes before the caller's turn ends (a
    // crawler queueing its whole frontier in one turn has its first requests on their way meanwhile).
    outcomes.push(lanes.run(request('/3'), undefined));
    expect(nextMessage(thread)?.map((call) => call.id)).toEqual([2]);
    // Beyond the lane's places requests wait here, in order, until an outcome frees one.
    outcomes.push(lanes.run(request('/4'), undefined));
    await nextTurn();
    expect(nextMessage(thread)).toBeUndefined();
    const reply = (id: number): LaneReply => ({
      id,
      outcome: { ok: false, error: { code: 'SOCKPOOL_ERR_TIMEOUT', message: `test ${id}` } },
    });
    thread.postMessage([reply(0)]);
    await outcomes[0]!.catch(() => {});
    await nextTurn();
    // The fourth takes the slot the first freed: a new id all the same (the slot's second use).
    const [fourth] = nextMessage(thread)!.map((call) => call.id);
    expect(fourth).not.toBe(0);
    expect([1, 2]).not.toContain(fourth);
    thread.postMessage([reply(0), reply(1), reply(2), reply(fourth!)]);
    await Promise.allSettled(outcomes);
    await lanes.idle();
    lanes.close();
    thread.close();
  });
});
