// The addon in worker threads: loaded in several environments at once, each with its own tracked fds and Pollers;
// a worker that is terminated (or dies of an exception) while holding received fds leaves nothing open, because
// the addon closes its Pollers and tracked fds when the worker's environment is torn down.
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { beforeAll, describe, expect, it } from 'vitest';
import * as native from '../shared/native.js';
import { fdCount, receiveMessage, warmUpChildProcesses } from './fixtures/native-helpers.js';
import { runChildToEnd } from './helpers/children.js';

const workerFixture = new URL('./fixtures/native-worker.mjs', import.meta.url);
const throwFixture = fileURLToPath(new URL('./fixtures/native-poller-throw.mjs', import.meta.url));

interface WorkerReport {
  ready?: boolean;
  received?: number[];
  tracked: number[];
}

async function nextReport(worker: Worker): Promise<WorkerReport> {
  const [report] = (await once(worker, 'message')) as [WorkerReport];
  return report;
}

/** A worker running the fixture, holding `workerEnd` of a link whose other end is `mainEnd`. */
async function startWorker(mode: 'hold' | 'throw' = 'hold') {
  const [mainEnd, workerEnd] = native.seqpacketPair();
  // Ownership of workerEnd passes to the worker thread, which tracks it.
  const worker = new Worker(workerFixture, { workerData: { linkFd: workerEnd, mode } });
  const errors: Error[] = [];
  worker.on('error', (error) => errors.push(error));
  // Not events.once: that would reject on the worker's 'error' event, which one test expects.
  const exited = new Promise<[number]>((resolve) => worker.once('exit', (code: number) => resolve([code])));
  const ready = await nextReport(worker);
  expect(ready).toEqual({ ready: true, tracked: [workerEnd] });
  return { worker, mainEnd, workerEnd, exited, errors };
}

/** Sends the worker one end of `count` fresh pairs; returns the ends we keep. Our copies of the sent ends close. */
function sendPairs(link: number, text: string, count: number): number[] {
  const ours: number[] = [];
  const theirs: number[] = [];
  for (let i = 0; i < count; i++) {
    const [kept, sent] = native.seqpacketPair();
    ours.push(kept);
    theirs.push(sent);
  }
  expect(native.sendMessage(link, Buffer.from(text), theirs)).toBe(text.length);
  for (const fd of theirs) native.close(fd); // the worker holds the only copies now
  return ours;
}

beforeAll(async () => {
  await warmUpChildProcesses();
  // The first worker of a process may set up things that stay (none expected, but keep counts honest).
  const warmUp = new Worker('', { eval: true });
  await once(warmUp, 'exit');
});

describe('native addon in worker threads', () => {
  it('works in 4 workers at once, each with its own tracked fds', async () => {
    const before = fdCount();
    const workers = await Promise.all(
      [0, 1, 2, 3].map(async (index) => {
        const started = await startWorker();
        const reported = nextReport(started.worker);
        const [ours] = sendPairs(started.mainEnd, `worker ${index}`, 1);
        const report = await reported;
        expect(report.received).toHaveLength(1);
        expect(report.tracked).toEqual([started.workerEnd, report.received![0]!].sort((a, b) => a - b));
        const pong = await receiveMessage(ours!, 64, 0);
        expect(pong.data.toString()).toBe(`pong worker ${index}`);
        return { ...started, ours: ours! };
      }),
    );
    // Per-environment state: the main thread tracks none of the workers' fds.
    expect(native.trackedFds()).toEqual([]);

    // Closing a link lets its worker end on its own; its teardown closes the fd it still held.
    for (const worker of workers) native.close(worker.mainEnd);
    for (const worker of workers) {
      expect(await worker.exited).toEqual([0]);
      expect(worker.errors).toEqual([]);
      // Synchronous on purpose: by 'exit' the worker's teardown has run, so the EOF is already there.
      expect(native.recvMessage(worker.ours, 64, 0)).toMatchObject({ eof: true });
      native.close(worker.ours);
    }
    expect(fdCount()).toBe(before);
  });

  it('a terminated worker leaves none of its fds open', async () => {
    const before = fdCount();
    const { worker, mainEnd, exited, errors } = await startWorker();
    const reported = nextReport(worker);
    const ours = sendPairs(mainEnd, 'three', 3);
    const report = await reported;
    expect(report.received).toHaveLength(3);
    for (const fd of ours) expect((await receiveMessage(fd, 64, 0)).data.toString()).toBe('pong three');

    // The worker holds 3 received fds, its link, and a started Poller on the link.
    await worker.terminate();
    await exited;
    expect(errors).toEqual([]);
    // Teardown closed the link end and the three received fds: every peer sees EOF.
    // (Synchronous: by 'exit' the worker's teardown has run.)
    expect(native.recvMessage(mainEnd, 64, 0)).toMatchObject({ eof: true });
    for (const fd of ours) expect(native.recvMessage(fd, 64, 0)).toMatchObject({ eof: true });
    for (const fd of [mainEnd, ...ours]) native.close(fd);
    expect(fdCount()).toBe(before);

    // The main thread's copy of the addon is unaffected.
    const [left, right] = native.seqpacketPair();
    native.sendMessage(left, Buffer.from('still here'));
    expect(native.recvMessage(right, 64, 0)?.data.toString()).toBe('still here');
    native.close(left);
    native.close(right);
  });

  it('a throwing Poller callback is the worker’s uncaught exception, and teardown still cleans up', async () => {
    const before = fdCount();
    const { mainEnd, exited, errors } = await startWorker('throw');
    const ours = sendPairs(mainEnd, 'trigger', 1);
    expect(await exited).toEqual([1]);
    expect(errors.map((error) => error.message)).toEqual(['poller callback failed on purpose']);
    // Teardown closed the worker's link with our message still unread in it (the kernel reports that to this
    // end as ECONNRESET, then EOF), and closing it released the fd inside the message: its peer sees EOF.
    expect(() => native.recvMessage(mainEnd, 64, 0)).toThrow(expect.objectContaining({ code: 'ECONNRESET' }));
    expect(native.recvMessage(mainEnd, 64, 0)).toMatchObject({ eof: true });
    expect(native.recvMessage(ours[0]!, 64, 0)).toMatchObject({ eof: true });
    for (const fd of [mainEnd, ...ours]) native.close(fd);
    expect(fdCount()).toBe(before);
  });

  it('a throwing Poller callback in a main thread reaches process "uncaughtException"', async () => {
    const { code, signal, stdout } = await runChildToEnd(process.execPath, [throwFixture]);
    expect({ code, signal }).toEqual({ code: 0, signal: null });
    expect(stdout).toBe('uncaughtException: poller callback failed on purpose\n');
  });
});
