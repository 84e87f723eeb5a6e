// Runs inside a piscina worker thread: one CurlEngine (one libcurl Multi) and one link to the daemon per thread,
// created when the thread starts and kept for its life. piscina runs many tasks at once here
// (concurrentTasksPerWorker), and the pool is created with atomics disabled so the event loop of an idle worker
// keeps turning (curl's connection cache and the daemon link need it).
//
// Cancellation never terminates the thread: each request gets an AbortController here, aborted by its deadline
// (a timer) or by an `abort` message on the request's own MessagePort, and the engine cancels just that transfer.
//
// fds held by this thread: the daemon link's socket and leased fds not yet handed to curl are tracked by the addon
// (closed if the thread dies); fds curl owns are closed through CLOSESOCKETFUNCTION, natively if the thread dies.
// See socket-supply.ts for each step.

import { type MessagePort, workerData } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { ErrorCodes, fromPlainError, SockpoolError, toPlainError } from '../shared/errors.js';
import { CurlEngine, epochNow, type TransferOutcome, type TransferRequest, timeoutError } from './curl-engine.js';
import { DaemonLink } from './daemon-link.js';
import { PortSink } from './response-sink.js';
import { SocketSupply } from './socket-supply.js';
import type { CallerMessage } from './stream-protocol.js';
import { PortSource } from './upload-source.js';

export interface WorkerConfig {
  socketPath: string;
  /** Connections curl may keep in this thread's cache. */
  maxConnects: number;
  /** Accept the test-* tasks (SOCKPOOL_TEST_HOOKS=1 in the caller's environment). */
  testHooks?: boolean;
}

export type Task =
  /** `port`: the request's own MessagePort (abort, streamed bodies); see stream-protocol.ts. */
  | { kind: 'request'; request: TransferRequest; port?: MessagePort | undefined }
  | { kind: 'prewarm'; origins: Array<{ host: string; port: number; count: number }> }
  | { kind: 'stats' }
  /** Test hooks: die of an uncaught exception, never finish (so that piscina terminates the thread), or run a
   *  full garbage collection (when the process exposes gc: memory tests measure what is held, not garbage). */
  | { kind: 'test-crash' }
  | { kind: 'test-hang' }
  | { kind: 'test-gc' };

export type TaskResult =
  | TransferOutcome
  | { ok: true; stats: Record<string, unknown> }
  | { ok: true }
  | { ok: false; error: ReturnType<typeof toPlainError> };

const config = workerData as WorkerConfig;
const link = new DaemonLink({ socketPath: config.socketPath, clientName: `sockpool-worker-${process.pid}` });
const supply = new SocketSupply(link);
const engine = new CurlEngine(supply, { maxConnects: config.maxConnects });

async function runRequest(request: TransferRequest, port: MessagePort | undefined): Promise<TransferOutcome> {
  const controller = new AbortController();
  const deadline = setTimeout(
    () => controller.abort(timeoutError(request)),
    Math.max(0, request.deadline - epochNow()),
  );
  let sink: PortSink | undefined;
  let source: PortSource | undefined;
  if (port) {
    if (request.streamResponse) sink = new PortSink(port);
    if (request.streamedBody) source = new PortSource(port, request.streamedBody.length);
    port.on('message', (message: CallerMessage) => {
      switch (message.t) {
        case 'abort':
        case 'body-error':
          controller.abort(fromPlainError(message.error));
          return;
        case 'credit':
          sink?.credit(message.consumed);
          return;
        case 'data':
          source?.push(message.data);
          return;
        case 'end':
          source?.end();
          return;
      }
    });
    // The caller's end closed before the transfer ended: nobody wants the rest.
    port.on('close', () => controller.abort(new SockpoolError(ErrorCodes.ABORTED, 'the caller closed the request')));
  }
  try {
    const outcome = await engine.run(request, {
      sink,
      source,
      signal: controller.signal,
    });
    if (sink) {
      if (outcome.ok) sink.end();
      else sink.fail(outcome.error);
    }
    return outcome;
  } finally {
    clearTimeout(deadline);
    port?.close();
  }
}

export default async function runTask(task: Task): Promise<TaskResult> {
  switch (task.kind) {
    case 'request': {
      const outcome = await runRequest(task.request, task.port);
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
