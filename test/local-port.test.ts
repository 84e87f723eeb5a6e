// The in-thread port pair (client/local-port.ts) keeps the MessagePort guarantees a request's channel relies on:
// messages in order and never inside the sender's call, both ways; after close(), what was sent is still delivered,
// then 'close' on both ends, and nothing more gets through either way.
import { describe, expect, it } from 'vitest';
import { LocalPort } from '../client/local-port.js';

const nextTurn = () => new Promise((resolve) => setImmediate(resolve));

describe('LocalPort', () => {
  it('delivers in order, in a later turn, both ways', async () => {
    const [caller, worker] = LocalPort.pair();
    const atWorker: unknown[] = [];
    const atCaller: unknown[] = [];
    worker.on('message', (message) => {
      atWorker.push(message);
      // An answer posted from inside a listener arrives in a later turn as well.
      worker.postMessage({ echo: message });
    });
    caller.on('message', (message) => atCaller.push(message));
    const chunk = new Uint8Array([1, 2, 3]);
    caller.postMessage({ t: 'data', data: chunk }, [chunk.buffer as ArrayBuffer]);
    caller.postMessage({ t: 'end' });
    expect(atWorker).toEqual([]);
    await nextTurn();
    expect(atWorker).toEqual([{ t: 'data', data: chunk }, { t: 'end' }]);
    // (Not cloned: the receiver has the sender's chunk, which the sender moved and never touches again.)
    expect((atWorker[0] as { data: Uint8Array }).data).toBe(chunk);
    expect(atCaller).toEqual([]);
    await nextTurn();
    expect(atCaller).toEqual([{ echo: { t: 'data', data: chunk } }, { echo: { t: 'end' } }]);
  });

  it('close(): what was sent arrives first, then close on both ends; nothing is sent after', async () => {
    const [caller, worker] = LocalPort.pair();
    const events: string[] = [];
    worker.on('message', (message: { t: string }) => events.push(`worker ${message.t}`));
    caller.on('message', (message: { t: string }) => events.push(`caller ${message.t}`));
    worker.on('close', () => events.push('worker close'));
    caller.on('close', () => events.push('caller close'));
    worker.postMessage({ t: 'head' });
    worker.postMessage({ t: 'end' });
    worker.close();
    worker.postMessage({ t: 'late' });
    caller.postMessage({ t: 'late' });
    worker.close(); // a second close changes nothing
    await nextTurn();
    await nextTurn();
    expect([...events].sort()).toEqual(['caller close', 'caller end', 'caller head', 'worker close']);
    expect(events.indexOf('caller head')).toBeLessThan(events.indexOf('caller close'));
    expect(events.indexOf('caller end')).toBeLessThan(events.indexOf('caller close'));
  });
});
