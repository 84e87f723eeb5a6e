// The file piscina loads in each worker thread. It loads task.js with import(), never with require().
//
// piscina tries require() on its filename first. On Node 24, require() of an ES module ends by building a CommonJS
// facade for it, and a thread terminated at that moment (a client closed while its threads were still loading)
// fails an internal assertion that aborts the whole process instead of ending the thread. import() has no such
// step. piscina awaits whatever it finds under the export name ('default'): here, task.js's default export.
//
// A thread that cannot load task.js (a broken install, an addon that does not load) never opens its lane, so it
// says why first, with its thread id: once no thread of the client can start, the caller fails the requests waiting
// for a lane with that cause (client/thread-lanes.ts). This
// file is CommonJS and imports no ES module of ours: the key is lane-protocol.ts's STARTUP_FAILED, spelled out.
import { parentPort, threadId } from 'node:worker_threads';

export = import('./task.js').then(
  (task) => task.default,
  (error: unknown) => {
    const { message, code } = (error ?? {}) as { message?: unknown; code?: unknown };
    parentPort?.postMessage({
      sockpoolStartupFailed: {
        message: typeof message === 'string' ? message : String(error),
        code: typeof code === 'string' ? code : undefined,
      },
      threadId,
    });
    throw error;
  },
);
