// Runs inside a piscina worker thread: the thread's TransferRuntime (one CurlEngine, one libcurl Multi, one link to
// the daemon), created when the thread starts and kept for its life. piscina runs many tasks at once here
// (concurrentTasksPerWorker), and the pool is created with atomics disabled so the event loop of an idle worker
// keeps turning (curl's connection cache and the daemon link need it). Requests come over the thread's lane
// (lane.ts), streamed ones with a port of their own there; piscina carries only prewarm and stats. If the thread
// dies, the addon closes the fds it held (see transfer-runtime.ts).

import process from 'node:process';
import { workerData } from 'node:worker_threads';
import { openLane } from './lane.js';
import { type RuntimeConfig, type RuntimeResult, type RuntimeTask, TransferRuntime } from './transfer-runtime.js';

export type WorkerConfig = RuntimeConfig;

/** What piscina carries (requests go over the lane). */
export type Task = Exclude<RuntimeTask, { kind: 'request' }>;

export type TaskResult = RuntimeResult;

const config = workerData as WorkerConfig;
const runtime = new TransferRuntime(config, `sockpool-worker-${process.pid}`);
// Requests come over the lane (lane-protocol.ts); the tasks below are the rest.
openLane(runtime);

export default function runTask(task: Task): Promise<TaskResult> {
  return runtime.handle(task);
}
