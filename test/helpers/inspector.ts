// The daemon's inspector, for tests that act on a daemon child process from outside, as a debugger would (no hook
// in the daemon): the daemon runs with --inspect=127.0.0.1:0 and this connects to the address it announced.

import { eventually } from '../fixtures/client-helpers.js';

/** The daemon's inspector (Chrome DevTools Protocol over its WebSocket), for its worker threads (NodeWorker). */
export class DaemonInspector {
  readonly #socket: WebSocket;
  #nextId = 1;
  readonly #replies = new Map<number, (reply: { result?: unknown; error?: { message: string } }) => void>();
  readonly #events: Array<{ method: string; params: Record<string, unknown> }> = [];

  private constructor(socket: WebSocket) {
    this.#socket = socket;
    socket.addEventListener('message', (event) => {
      const message = JSON.parse(String(event.data)) as {
        id?: number;
        method?: string;
        params?: Record<string, unknown>;
        result?: unknown;
        error?: { message: string };
      };
      if (message.id !== undefined) {
        this.#replies.get(message.id)?.(message);
        this.#replies.delete(message.id);
      } else if (message.method) this.#events.push({ method: message.method, params: message.params ?? {} });
    });
  }

  /** Connects to the inspector the daemon announced on its output ("Debugger listening on ws://..."). */
  static async connect(output: string): Promise<DaemonInspector> {
    const url = /Debugger listening on (ws:\/\/\S+)/.exec(output)?.[1];
    if (!url) throw new Error(`the daemon announced no inspector:\n${output}`);
    const socket = new WebSocket(url);
    await new Promise((resolve, reject) => {
      socket.addEventListener('open', resolve, { once: true });
      socket.addEventListener('error', () => reject(new Error(`could not reach the inspector at ${url}`)), {
        once: true,
      });
    });
    return new DaemonInspector(socket);
  }

  async call(method: string, params: object = {}): Promise<unknown> {
    const id = this.#nextId++;
    const reply = new Promise<{ result?: unknown; error?: { message: string } }>((resolve) =>
      this.#replies.set(id, resolve),
    );
    this.#socket.send(JSON.stringify({ id, method, params }));
    const { result, error } = await reply;
    if (error) throw new Error(`${method}: ${error.message}`);
    return result;
  }

  /** The parameters of the events of `method` received so far. */
  events(method: string): Array<Record<string, unknown>> {
    return this.#events.filter((event) => event.method === method).map((event) => event.params);
  }

  /** The inspector session of the worker thread whose title matches `title`, once attached. */
  async workerSession(title: RegExp): Promise<string> {
    let sessionId: string | undefined;
    await eventually(() => {
      const worker = this.events('NodeWorker.attachedToWorker').find((params) =>
        title.test((params.workerInfo as { title: string }).title),
      );
      sessionId = worker?.sessionId as string | undefined;
      return sessionId !== undefined;
    }, `the inspector attached to a worker thread ${title}`);
    return sessionId!;
  }

  /** Sends one inspector command to the worker thread of inspector session `sessionId`; resolves with its result. */
  async callInWorker(sessionId: string, method: string, params: object): Promise<unknown> {
    const id = this.#nextId++;
    await this.call('NodeWorker.sendMessageToWorker', {
      sessionId,
      message: JSON.stringify({ id, method, params }),
    });
    let reply: { result?: unknown; error?: { message: string } } | undefined;
    await eventually(() => {
      reply = this.events('NodeWorker.receivedMessageFromWorker')
        .map((params) => JSON.parse(String(params.message)) as { id?: number; result?: unknown })
        .find((message) => message.id === id);
      return reply !== undefined;
    }, `the worker thread's answer to ${method}`);
    if (reply!.error) throw new Error(`${method} in the worker thread: ${reply!.error.message}`);
    return reply!.result;
  }

  /** Runs `expression` in that worker thread. */
  async evaluateInWorker(sessionId: string, expression: string): Promise<void> {
    await this.callInWorker(sessionId, 'Runtime.evaluate', { expression });
  }

  /** The inspector's handle (objectId) on an array of every object in that worker thread whose prototype chain has
   *  `prototype` (an expression), e.g. every net.Socket. */
  async objectsInWorker(sessionId: string, prototype: string): Promise<string> {
    const found = (await this.callInWorker(sessionId, 'Runtime.evaluate', { expression: prototype })) as {
      result: { objectId: string };
    };
    const objects = (await this.callInWorker(sessionId, 'Runtime.queryObjects', {
      prototypeObjectId: found.result.objectId,
    })) as { objects: { objectId: string } };
    return objects.objects.objectId;
  }

  /** The inspector's handle (objectId) on an array of every object in the daemon's main thread whose prototype chain
   *  has `prototype` (an expression, e.g. a class of the daemon's from its own module). */
  async objectsInMain(prototype: string): Promise<string> {
    const found = (await this.call('Runtime.evaluate', { expression: prototype })) as {
      result: { objectId?: string };
      exceptionDetails?: { exception?: { description?: string } };
    };
    if (found.exceptionDetails || !found.result.objectId) {
      throw new Error(`${prototype}: ${found.exceptionDetails?.exception?.description ?? 'no object'}`);
    }
    const objects = (await this.call('Runtime.queryObjects', { prototypeObjectId: found.result.objectId })) as {
      objects: { objectId: string };
    };
    return objects.objects.objectId;
  }

  /** Calls `functionDeclaration` in the daemon's main thread with `this` the object `objectId`; its value back. */
  async callInMain(objectId: string, functionDeclaration: string): Promise<unknown> {
    const outcome = (await this.call('Runtime.callFunctionOn', {
      objectId,
      functionDeclaration,
      returnByValue: true,
    })) as {
      result: { value?: unknown };
    };
    return outcome.result.value;
  }

  close(): void {
    this.#socket.close();
  }
}
