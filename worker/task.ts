// Runs inside a piscina worker thread: the thread's TransferRuntime (one CurlEngine, one libcurl Multi, one link to
// the daemon), created when the thread starts and kept for its life. piscina runs many tasks at once here
// (concurrentTasksPerWorker), and the pool is created with atomics disabled so the event loop of an idle worker
// keeps turning (curl's connection cache and the daemon link need it). Buffered response bodies are moved (not
// copied) to the caller's thread. If the thread dies, the addon closes the fds it held (see transfer-runtime.ts).

import { workerData } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { toPlainError } from '../shared/errors.js';
import { type RuntimeConfig, type RuntimeResult, type RuntimeTask, TransferRuntime } from './transfer-runtime.js';

export interface WorkerConfig extends RuntimeConfig {
  /** Accept the test-* tasks (SOCKPOOL_TEST_HOOKS=1 in the caller's environment). */
  testHooks?: boolean;
}

export type Task =
  | RuntimeTask
  /** Test hooks: die of an uncaught exception, never finish (so that piscina terminates the thread), or run a
   *  full garbage collection (when the process exposes gc: memory tests measure what is held, not garbage). */
  | { kind: 'test-crash' }
  | { kind: 'test-hang' }
  | { kind: 'test-gc' };

export type TaskResult = RuntimeResult;

const config = workerData as WorkerConfig;
const runtime = new TransferRuntime(config, `sockpool-worker-${process.pid}`);

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
    case 'test-crash':
    case 'test-hang':
    case 'test-gc':
      if (!config.testHooks) return { ok: false, error: toPlainError(new Error(`unknown task ${task.kind}`)) };
      if (task.kind === 'test-gc') {
        (globalThis as { gc?: () => void }).gc?.();
        return { ok: true };
      }
      if (task.kind === 'test-crash') {
        setImmediate(() => {
          throw new Error('sockpool test hook: worker crash');
        });
      }
      return new Promise<never>(() => {});
  }
}
