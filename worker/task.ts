// Runs inside a piscina worker thread: the thread's TransferRuntime (one CurlEngine, one libcurl Multi, one link to
// the daemon), created when the thread starts and kept for its life. piscina runs many tasks at once here
// (concurrentTasksPerWorker), and the pool is created with atomics disabled so the event loop of an idle worker
// keeps turning (curl's connection cache and the daemon link need it). Buffered response bodies are moved (not
// copied) to the caller's thread. Buffered requests without a port of their own come over the thread's lane instead
// (lane.ts). If the thread dies, the addon closes the fds it held (see transfer-runtime.ts).

import { workerData } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { openLane } from './lane.js';
import { type RuntimeConfig, type RuntimeResult, type RuntimeTask, TransferRuntime } from './transfer-runtime.js';

export type WorkerConfig = RuntimeConfig;

export type Task = RuntimeTask;

export type TaskResult = RuntimeResult;

const config = workerData as WorkerConfig;
const runtime = new TransferRuntime(config, `sockpool-worker-${process.pid}`);
// Buffered requests come over the lane (lane-protocol.ts); the tasks below are the rest.
openLane(runtime);

export default async function runTask(task: Task): Promise<TaskResult> {
  switch (task.kind) {
    case 'request': {
      const outcome = await runtime.handle(task);
      // The body's memory moves to the caller's thread instead of being copied.
      if (outcome.ok && 'result' in outcome && outcome.result.body.byteLength > 0) {
        const movable = {
          [Piscina.transferableSymbol]: outcome.result.body.buffer,
          [Piscina.valueSymbol]: outcome,
        };
        return Piscina.move(movable as unknown as Parameters<typeof Piscina.move>[0]) as unknown as TaskResult;
      }
      return outcome;
    }
    case 'prewarm':
    case 'stats':
      return runtime.handle(task);
  }
}
