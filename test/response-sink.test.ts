// BufferSink (worker/response-sink.ts): the whole body of a buffered response, from the chunks the engine gives it.
// Where the body moves to another thread (the default: worker threads transfer it), it owns exactly its memory,
// whatever its chunks were (a slice of Node's Buffer pool would be refused by the transfer); in the caller's thread a
// body of one chunk is that chunk. Pure logic: no curl, no sockets.
import { describe, expect, it } from 'vitest';
import { BufferSink } from '../worker/response-sink.js';

/** A chunk from Node's shared Buffer pool (a slice of a larger ArrayBuffer). */
const pooled = (text: string) => Buffer.from(text);
const ownsItsMemory = (body: Buffer) => body.byteOffset === 0 && body.buffer.byteLength === body.length;

describe('BufferSink', () => {
  it('where the body moves: a pooled chunk is copied into memory of its own; an exact one is the body as it is', () => {
    const chunk = pooled('one pooled chunk');
    expect(ownsItsMemory(chunk)).toBe(false);
    const sink = new BufferSink();
    sink.write(chunk);
    const body = sink.body();
    expect(body).not.toBe(chunk);
    expect(ownsItsMemory(body)).toBe(true);
    expect(body.toString()).toBe('one pooled chunk');

    const exact = Buffer.from(new ArrayBuffer(5));
    exact.write('exact');
    const exactSink = new BufferSink(true);
    exactSink.write(exact);
    expect(exactSink.body()).toBe(exact);
  });

  it('in the caller’s thread: one chunk is the body, pooled or not', () => {
    const chunk = pooled('stays where it is');
    const sink = new BufferSink(false);
    sink.write(chunk);
    expect(sink.body()).toBe(chunk);
  });

  it('joins many chunks in order into memory of their own, and an empty body is empty, either way', () => {
    for (const exact of [true, false]) {
      const sink = new BufferSink(exact);
      for (const part of ['a', 'bc', '', 'def']) sink.write(pooled(part));
      const body = sink.body();
      expect(body.toString()).toBe('abcdef');
      expect(ownsItsMemory(body)).toBe(true);
      expect(new BufferSink(exact).body().length).toBe(0);
      // reset() drops what was collected (before a retry).
      sink.reset();
      sink.write(pooled('again'));
      expect(sink.body().toString()).toBe('again');
    }
  });
});
