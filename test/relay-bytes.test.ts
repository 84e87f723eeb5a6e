// The relay's early bytes and the bytes a Flow holds for its destination (daemon/relay-bytes.ts): whatever the chunks,
// what comes out is what went in, in order.
import { expect, it } from 'vitest';
import { Bytes, Joined } from '../daemon/relay-bytes.js';
import { seededRandom } from './helpers/seeded-random.js';

it('gives back what was pushed, in order, in one buffer, however many chunks and whenever taken', () => {
  const random = seededRandom(26);
  const bytes = new Bytes();
  expect(bytes.take()).toBeUndefined();
  let pushed: Buffer[] = [];
  let next = 0;
  const check = () => {
    const expected = Buffer.concat(pushed);
    const taken = bytes.take() ?? Buffer.alloc(0);
    expect(taken.equals(expected)).toBe(true);
    expect(bytes.length).toBe(0);
    pushed = [];
  };
  for (let round = 0; round < 5_000; round++) {
    // Mostly one-byte chunks (an origin's one-byte records), now and then a large one, and an empty one.
    const size = random() < 0.8 ? 1 : random() < 0.1 ? 0 : Math.floor(random() * 20_000);
    const chunk = Buffer.alloc(size);
    for (let index = 0; index < size; index++) chunk[index] = next++ & 0xff;
    bytes.push(chunk);
    pushed.push(chunk);
    expect(bytes.length).toBe(pushed.reduce((total, each) => total + each.length, 0));
    if (random() < 0.01) check();
  }
  check();
  // A single chunk comes back as it is (no copy); clear() drops what is held.
  bytes.push(Buffer.from('one'));
  bytes.clear();
  expect(bytes.length).toBe(0);
  const two = Buffer.from('two');
  bytes.push(two);
  expect(bytes.take()).toBe(two);
});

it('joins short chunks into few buffers and keeps long ones as they came, in order, however taken', () => {
  const random = seededRandom(27);
  const joined = new Joined();
  expect(joined.take()).toEqual([]);
  let pushed: Buffer[] = [];
  let next = 0;
  const check = () => {
    const entries = joined.take();
    expect(Buffer.concat(entries).equals(Buffer.concat(pushed))).toBe(true);
    // Long chunks are the entries themselves (not copied); short ones are joined: an entry ends at a long chunk, at a
    // full buffer (at least 3 KB of them; the first one maybe filled partly before), or at the take.
    for (const chunk of pushed) if (chunk.length >= 1024) expect(entries).toContain(chunk);
    const long = pushed.filter((chunk) => chunk.length >= 1024).length;
    const shortBytes = pushed.reduce((total, chunk) => total + (chunk.length < 1024 ? chunk.length : 0), 0);
    expect(entries.length).toBeLessThanOrEqual(2 * long + 2 + shortBytes / 3072);
    expect(joined.length).toBe(0);
    pushed = [];
  };
  for (let round = 0; round < 20_000; round++) {
    const size = random() < 0.9 ? 1 : random() < 0.1 ? 0 : Math.floor(random() * 20_000);
    const chunk = Buffer.alloc(size);
    for (let index = 0; index < size; index++) chunk[index] = next++ & 0xff;
    joined.push(chunk);
    pushed.push(chunk);
    if (random() < 0.002) check();
  }
  check();
  // What was taken is not written over by what comes after it (it may still be on its way).
  joined.push(Buffer.from('a'));
  const [first] = joined.take();
  joined.push(Buffer.from('b'));
  expect(first!.toString()).toBe('a');
  expect(Buffer.concat(joined.take()).toString()).toBe('b');
});
