// The client's worker threads when its options name none (client/client.ts defaultThreads): one per CPU the caller's
// own thread leaves, at least 1 and at most 2.
import { availableParallelism } from 'node:os';
import { afterEach, expect, it } from 'vitest';
import { defaultConcurrencyPerThread, defaultThreads, SockpoolClient } from '../client/index.js';
import { liveWorkers } from './helpers/worker-threads.js';

const clients: SockpoolClient[] = [];
afterEach(async () => {
  for (const client of clients.splice(0)) await client.close();
});

it('runs one worker thread per CPU the caller leaves, at least 1 and at most 2', () => {
  expect([1, 2, 3, 4, 64].map((cpus) => defaultThreads(cpus))).toEqual([1, 1, 2, 2, 2]);
  expect(defaultThreads()).toBe(defaultThreads(availableParallelism()));
});

it('spreads 128 transfers over the default threads: the total does not depend on the CPU count', () => {
  for (const cpus of [1, 2, 3, 4, 64]) {
    const threads = defaultThreads(cpus);
    expect(threads * defaultConcurrencyPerThread(threads)).toBe(128);
  }
  expect(defaultThreads(2.5)).toBe(1);
});

it('starts that many worker threads when the options name none, and as many as they name otherwise', async () => {
  const before = liveWorkers().length;
  const client = new SockpoolClient({ socketPath: '/nonexistent/sockpoold.sock' });
  clients.push(client);
  expect(client.threads).toBe(defaultThreads());
  await expect.poll(() => liveWorkers().length - before).toBe(defaultThreads());
  const three = new SockpoolClient({ socketPath: '/nonexistent/sockpoold.sock', threads: 3 });
  clients.push(three);
  expect(three.threads).toBe(3);
  await expect.poll(() => liveWorkers().length - before).toBe(defaultThreads() + 3);
  const inline = new SockpoolClient({ socketPath: '/nonexistent/sockpoold.sock', threads: 0 });
  clients.push(inline);
  expect(inline.threads).toBe(0);
});
