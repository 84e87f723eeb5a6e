// The heap a process keeps, read from outside through its inspector (started with `--inspect=127.0.0.1:0`): a full
// garbage collection first (HeapProfiler.collectGarbage), then process.memoryUsage() in the process. What survives a
// full collection is what the process holds; RSS alone cannot tell a leak from a heap V8 has not collected yet (the
// soak's daemon went from 50 to 250 MB of RSS and back between collections). For benchmarks only: a full collection
// stops the process for a few ms. Only the main thread's heap: a worker thread's isolate is collected and counted on
// its own (the inspector's NodeWorker domain would reach it), so a process's worker threads show in its RSS only.
export interface HeapReading {
  heapUsed: number;
  external: number;
  rss: number;
}

export interface InspectedHeap {
  /** A full collection, then the process's memory as it reports it. */
  afterFullGc(): Promise<HeapReading>;
  close(): void;
}

/** The inspector's WebSocket URL from what Node printed on stderr ("Debugger listening on ws://…"). */
export function inspectorUrl(stderr: string): string | undefined {
  return /Debugger listening on (ws:\/\/\S+)/.exec(stderr)?.[1];
}

export async function inspectHeap(url: string): Promise<InspectedHeap> {
  const socket = new WebSocket(url);
  await new Promise<void>((resolve, reject) => {
    socket.addEventListener('open', () => resolve(), { once: true });
    socket.addEventListener('error', () => reject(new Error(`inspector at ${url}: could not connect`)), { once: true });
  });
  let nextId = 1;
  const pending = new Map<number, { resolve: (result: unknown) => void; reject: (error: Error) => void }>();
  socket.addEventListener('message', (event) => {
    const message = JSON.parse(String(event.data)) as { id?: number; result?: unknown; error?: { message: string } };
    const waiter = message.id === undefined ? undefined : pending.get(message.id);
    if (!waiter) return;
    pending.delete(message.id!);
    if (message.error) waiter.reject(new Error(`inspector: ${message.error.message}`));
    else waiter.resolve(message.result);
  });
  socket.addEventListener('close', () => {
    for (const waiter of pending.values()) waiter.reject(new Error('inspector connection closed'));
    pending.clear();
  });
  const call = (method: string, params: Record<string, unknown> = {}) =>
    new Promise<unknown>((resolve, reject) => {
      const id = nextId++;
      pending.set(id, { resolve, reject });
      socket.send(JSON.stringify({ id, method, params }));
    });
  return {
    async afterFullGc() {
      await call('HeapProfiler.collectGarbage');
      const result = (await call('Runtime.evaluate', {
        expression: 'JSON.stringify(process.memoryUsage())',
        returnByValue: true,
      })) as { result: { value: string } };
      const usage = JSON.parse(result.result.value) as { heapUsed: number; external: number; rss: number };
      return { heapUsed: usage.heapUsed, external: usage.external, rss: usage.rss };
    },
    close: () => socket.close(),
  };
}
