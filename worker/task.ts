// Runs inside a piscina worker thread: one CurlEngine (one libcurl Multi) and one link to the daemon per thread,
// created on the first task and kept for the thread's life. piscina runs many tasks at once here
// (concurrentTasksPerWorker), and the pool is created with atomics disabled so the event loop of an idle worker
// keeps turning (curl's connection cache and the daemon link need it).

import { workerData } from 'node:worker_threads';
import { toPlainError } from '../shared/errors.js';
import { CurlEngine, type TransferOutcome, type TransferRequest } from './curl-engine.js';
import { DaemonLink } from './daemon-link.js';
import { SocketSupply } from './socket-supply.js';

export interface WorkerConfig {
  socketPath: string;
}

export type Task =
  | { kind: 'request'; request: TransferRequest }
  | { kind: 'prewarm'; origins: Array<{ host: string; port: number; count: number }> }
  | { kind: 'stats' };

export type TaskResult =
  | TransferOutcome
  | { ok: true; stats: Record<string, unknown> }
  | { ok: true }
  | { ok: false; error: ReturnType<typeof toPlainError> };

const config = workerData as WorkerConfig;
const link = new DaemonLink({ socketPath: config.socketPath, clientName: `sockpool-worker-${process.pid}` });
const supply = new SocketSupply(link);
const engine = new CurlEngine(supply);

export default async function runTask(task: Task): Promise<TaskResult> {
  switch (task.kind) {
    case 'request':
      return engine.run(task.request);
    case 'prewarm':
      try {
        await Promise.all(task.origins.map((origin) => link.prewarm(origin.host, origin.port, origin.count)));
        return { ok: true };
      } catch (error) {
        return { ok: false, error: toPlainError(error) };
      }
    case 'stats':
      try {
        return { ok: true, stats: await link.stats() };
      } catch (error) {
        return { ok: false, error: toPlainError(error) };
      }
  }
}
