// The relay's early bytes (daemon/relay-bytes.ts): whatever the chunks, what comes out is what went in, in order.
import { expect, it } from 'vitest';
import { Bytes } from '../daemon/relay-bytes.js';
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
