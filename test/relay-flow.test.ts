// A relay's direction (daemon/relay-flow.ts) to a destination that takes nothing: what waits is held as bytes, few
// Buffers, the source's reads stop past the bound and start again once the destination takes it, and everything
// arrives in order. A real loopback TCP connection whose reader stops reading.
import { once } from 'node:events';
import { createServer, type Socket, connect as tcpConnect } from 'node:net';
import { afterEach, expect, it } from 'vitest';
import { Flow } from '../daemon/relay-flow.js';

const cleanups: Array<() => unknown> = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

/** A connected pair: `to` (written) and `sink` (its peer, reading nothing until resumed). */
async function connectedPair(): Promise<{ to: Socket; sink: Socket }> {
  const server = createServer({ pauseOnConnect: true });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  const to = tcpConnect(port, '127.0.0.1');
  const [sink] = (await once(server, 'connection')) as [Socket];
  await once(to, 'connect');
  server.close();
  cleanups.push(() => {
    to.destroy();
    sink.destroy();
  });
  return { to, sink };
}

const turn = () => new Promise((resolve) => setImmediate(resolve));

it('holds one-byte chunks for a full destination as bytes, stops the source past its bound, and loses nothing', async () => {
  const { to, sink } = await connectedPair();
  const reads = { stops: 0, starts: 0 };
  const flow = new Flow(to, { stop: () => reads.stops++, start: () => reads.starts++ });
  let next = 0;
  const letters = (count: number) => {
    const chunk = Buffer.alloc(count);
    for (let index = 0; index < count; index++) chunk[index] = 97 + (next++ % 26);
    return chunk;
  };
  // The writes the destination is given (each a Buffer it holds until the kernel takes it).
  let writes = 0;
  const write = to.write.bind(to) as (chunk: Buffer, callback?: () => void) => boolean;
  to.write = ((chunk: Buffer, callback?: () => void) => {
    writes++;
    return write(chunk, callback);
  }) as typeof to.write;
  // The kernel's buffers first, in large chunks: until a write stays on its way.
  while (to.writableLength === 0) {
    for (let index = 0; index < 16; index++) flow.push(letters(65_536));
    await turn();
    await turn();
  }
  // Then one-byte chunks, a read's worth a turn, as a TLS socket hands them over, until the source is stopped, and
  // what the source still hands over after its stop (the rest of a TLS read).
  const stopped = () => reads.stops === reads.starts + 1;
  const writesBefore = writes;
  let oneByte = 0;
  for (let extra = 0; extra < 2; extra += stopped() ? 1 : 0) {
    for (let index = 0; index < 2_800; index++, oneByte++) flow.push(letters(1));
    await turn();
  }
  expect(oneByte).toBeGreaterThan(64 * 1024);
  expect(flow.busy).toBe(true);
  expect(stopped()).toBe(true);

  // The peer reads: everything arrives, in order, and the source's reads start again.
  const total = next;
  let received = 0;
  let wrong = -1;
  sink.on('data', (chunk: Buffer) => {
    for (let index = 0; index < chunk.length; index++, received++) {
      if (wrong < 0 && chunk[index] !== 97 + (received % 26)) wrong = received;
    }
  });
  sink.resume();
  while (received < total) await turn();
  expect(wrong).toBe(-1);
  expect(received).toBe(total);
  // The one-byte chunks reached the destination joined, thousands a write, not a write (a Buffer) each.
  expect(writes - writesBefore).toBeLessThan(oneByte / 1_000);
  expect(reads.starts).toBe(reads.stops);
  expect(flow.busy).toBe(false);
  // And its end follows the bytes.
  flow.push(Buffer.from('z'));
  flow.end();
  await once(sink, 'end');
  expect(received).toBe(total + 1);
});
