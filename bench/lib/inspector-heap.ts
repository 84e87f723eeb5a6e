// The heap a process keeps, read from outside through its inspector (started with `--inspect=127.0.0.1:0`): a full
// garbage collection first (HeapProfiler.collectGarbage), then process.memoryUsage() as the process reports it, in
// its main thread and in each of its worker threads (reached through the inspector's NodeWorker domain: each thread's
// isolate collects and counts its own heap). What survives a full collection is what the process holds; RSS alone
// cannot tell a leak from a heap V8 has not collected yet (the soak's daemon went from 50 to 250 MB of RSS and back
// between collections). For benchmarks only: a full collection stops each thread for a few ms.
export interface HeapReading {
  /** V8's heap and external memory after a full collection, in bytes: the main thread's and the worker threads'. */
  heapUsed: number;
  external: number;
  /** The heap V8 keeps committed after that collection (heapTotal): what it holds for its own reuse, young
   *  generation included, sized by V8 within its limits; resident once used, so a part of RSS. */
  heapTotal: number;
  /** Worker threads read (besides the main thread). */
  workers: number;
}

export interface InspectedHeap {
  /** A full collection in every thread, then each thread's memory as it reports it. */
  afterFullGc(): Promise<HeapReading>;
  close(): void;
}

/** The inspector's WebSocket URL from what Node printed on stderr ("Debugger listening on ws://…"). */
export function inspectorUrl(stderr: string): string | undefined {
  return /Debugger listening on (ws:\/\/\S+)/.exec(stderr)?.[1];
}

interface Reply {
  id?: number;
  method?: string;
  params?: { sessionId?: string; message?: string };
  result?: unknown;
  error?: { message: string };
}

const MEMORY = { expression: 'JSON.stringify(process.memoryUsage())', returnByValue: true };

export async function inspectHeap(url: string): Promise<InspectedHeap> {
  const socket = new WebSocket(url);
  await new Promise<void>((resolve, reject) => {
    socket.addEventListener('open', () => resolve(), { once: true });
    socket.addEventListener('error', () => reject(new Error(`inspector at ${url}: could not connect`)), { once: true });
  });
  let nextId = 1;
  /** Calls waiting for their reply, by id (ids are unique across the main thread and the workers). */
  const pending = new Map<number, { resolve: (result: unknown) => void; reject: (error: Error) => void }>();
  const workers = new Set<string>();
  const settle = (reply: Reply) => {
    const waiter = reply.id === undefined ? undefined : pending.get(reply.id);
    if (!waiter) return;
    pending.delete(reply.id!);
    if (reply.error) waiter.reject(new Error(`inspector: ${reply.error.message}`));
    else waiter.resolve(reply.result);
  };
  socket.addEventListener('message', (event) => {
    const reply = JSON.parse(String(event.data)) as Reply;
    if (reply.method === 'NodeWorker.attachedToWorker') workers.add(reply.params!.sessionId!);
    else if (reply.method === 'NodeWorker.detachedFromWorker') workers.delete(reply.params!.sessionId!);
    else if (reply.method === 'NodeWorker.receivedMessageFromWorker') settle(JSON.parse(reply.params!.message!));
    else settle(reply);
  });
  socket.addEventListener('close', () => {
    for (const waiter of pending.values()) waiter.reject(new Error('inspector connection closed'));
    pending.clear();
  });
  /** A method called in the main thread, or (`sessionId`) in that worker thread. */
  const call = (method: string, params: Record<string, unknown> = {}, sessionId?: string) =>
    new Promise<unknown>((resolve, reject) => {
      const id = nextId++;
      pending.set(id, { resolve, reject });
      const message = JSON.stringify({ id, method, params });
      if (sessionId === undefined) socket.send(message);
      else
        socket.send(
          JSON.stringify({ id: nextId++, method: 'NodeWorker.sendMessageToWorker', params: { sessionId, message } }),
        );
    });
  await call('NodeWorker.enable', { waitForDebuggerOnStart: false });
  const memoryOf = async (sessionId?: string) => {
    await call('HeapProfiler.collectGarbage', {}, sessionId);
    const result = (await call('Runtime.evaluate', MEMORY, sessionId)) as { result: { value: string } };
    return JSON.parse(result.result.value) as { heapUsed: number; external: number; heapTotal: number };
  };
  return {
    async afterFullGc() {
      const sessions = [...workers];
      const readings = await Promise.all([memoryOf(), ...sessions.map((sessionId) => memoryOf(sessionId))]);
      return {
        heapUsed: readings.reduce((sum, reading) => sum + reading.heapUsed, 0),
        external: readings.reduce((sum, reading) => sum + reading.external, 0),
        heapTotal: readings.reduce((sum, reading) => sum + reading.heapTotal, 0),
        workers: sessions.length,
      };
    },
    close: () => socket.close(),
  };
}
