// The client's worker threads, reached from the test the way a debugger would, so that production code needs no
// test hooks: Node's `worker_threads` diagnostics channel hands over every Worker this process starts (its
// threadId, terminate()), and the inspector's NodeWorker domain runs a garbage collection or an uncaught exception
// inside one. Import this module before the client is created: workers started earlier are not seen.
import dc from 'node:diagnostics_channel';
import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import type { Worker } from 'node:worker_threads';

const live = new Set<Worker>();
dc.subscribe('worker_threads', (message) => {
  const { worker } = message as { worker: Worker };
  live.add(worker);
  worker.once('exit', () => live.delete(worker));
});

/** The worker threads of this process that are running now. */
export function liveWorkers(): Worker[] {
  return [...live];
}

/** Their thread ids. */
export function threadIds(workers: Worker[] = liveWorkers()): number[] {
  return workers.map((worker) => worker.threadId).sort((a, b) => a - b);
}

let inspector: Promise<WorkerInspector> | undefined;

/** One inspector session of this thread, attached to every worker thread. */
class WorkerInspector {
  readonly #session = new Session();
  /** threadId → inspector session id (the inspector's events name workers by a number of its own) */
  readonly #sessions = new Map<number, string>();
  readonly #waiting = new Map<number, (reply: { result?: unknown; error?: { message: string } }) => void>();
  readonly #attachWaiters = new Map<number, (sessionId: string) => void>();
  #nextId = 1;

  /** A thread started a moment ago is attached asynchronously: waits for it (bounded). */
  #attached(threadId: number): Promise<string> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`worker thread ${threadId} never attached`)), 10_000);
      this.#attachWaiters.set(threadId, (sessionId) => {
        clearTimeout(timer);
        resolve(sessionId);
      });
    });
  }

  async attach(): Promise<void> {
    this.#session.connect();
    this.#session.on('NodeWorker.attachedToWorker', ({ params }) => {
      // workerId is the inspector's own count; the title starts with the thread id: "[worker 4] WorkerThread".
      const threadId = Number(/^\[worker (\d+)\]/.exec(params.workerInfo.title)?.[1]);
      this.#sessions.set(threadId, params.sessionId);
      this.#attachWaiters.get(threadId)?.(params.sessionId);
      this.#attachWaiters.delete(threadId);
    });
    this.#session.on('NodeWorker.detachedFromWorker', ({ params }) => {
      for (const [threadId, sessionId] of this.#sessions)
        if (sessionId === params.sessionId) this.#sessions.delete(threadId);
    });
    this.#session.on('NodeWorker.receivedMessageFromWorker', ({ params }) => {
      const reply = JSON.parse(params.message) as { id?: number; result?: unknown; error?: { message: string } };
      if (reply.id === undefined) return;
      this.#waiting.get(reply.id)?.(reply);
      this.#waiting.delete(reply.id);
    });
    await this.#session.post('NodeWorker.enable', { waitForDebuggerOnStart: false });
  }

  /** Sends one inspector command to the thread's V8 and waits for its reply. */
  async call(threadId: number, method: string, params: object = {}): Promise<unknown> {
    const sessionId = this.#sessions.get(threadId) ?? (await this.#attached(threadId));
    const id = this.#nextId++;
    const reply = new Promise<{ result?: unknown; error?: { message: string } }>((resolve) =>
      this.#waiting.set(id, resolve),
    );
    await this.#session.post('NodeWorker.sendMessageToWorker', {
      sessionId,
      message: JSON.stringify({ id, method, params }),
    });
    const { result, error } = await reply;
    if (error) throw new Error(`${method} in worker thread ${threadId}: ${error.message}`);
    return result;
  }
}

function workerInspector(): Promise<WorkerInspector> {
  inspector ??= (async () => {
    const created = new WorkerInspector();
    await created.attach();
    return created;
  })();
  return inspector;
}

/** A full garbage collection in each of the workers (all live ones by default). */
export async function collectGarbage(workers: Worker[] = liveWorkers()): Promise<void> {
  const session = await workerInspector();
  await Promise.all(workers.map((worker) => session.call(worker.threadId, 'HeapProfiler.collectGarbage')));
}

/** Makes the worker die of an uncaught exception, as a bug in it would. Resolves once it has exited. */
export async function crashWorker(worker: Worker): Promise<void> {
  const exited = new Promise((resolve) => worker.once('exit', resolve));
  const session = await workerInspector();
  await session.call(worker.threadId, 'Runtime.evaluate', {
    expression: "setImmediate(() => { throw new Error('worker crashed (test)'); }); undefined",
  });
  await exited;
}

/**
 * Blocks the worker's event loop until `unblock()` is called: the thread reads a FIFO synchronously (run there
 * through the inspector), and unblock() writes to it. Resolves once the thread is about to block. Unblock it
 * before the thread is terminated: a thread in a blocking read cannot stop.
 */
export async function blockWorker(worker: Worker, fifo: string): Promise<{ unblock: () => void }> {
  const session = await workerInspector();
  await session.call(worker.threadId, 'Runtime.evaluate', {
    expression: `setImmediate(() => process.getBuiltinModule('node:fs').readFileSync(${JSON.stringify(fifo)})); undefined`,
  });
  let blocked = true;
  return {
    unblock: () => {
      if (!blocked) return;
      blocked = false;
      // (Opening a FIFO to write waits for its reader: the thread, blocked in its read or about to be.)
      writeFileSync(fifo, 'go');
    },
  };
}
