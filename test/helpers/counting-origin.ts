// An HTTP/1.1 origin on a bare TCP server that counts its open connections, for the fleet's tests and benchmark
// (test/fleet.system.test.ts, bench/fleet.ts): a connection whose FIN the kernel delivered counts as closed whether
// or not this process has read it yet.
import { createServer, type Socket } from 'node:net';
import * as native from '../../shared/native.js';

export interface CountingOrigin {
  port: number;
  /** Connections open right now, and the most open at once since the last reset. */
  open: number;
  maxOpen: number;
  /** Connections accepted since the last reset. */
  accepted: number;
  requests: number;
  /** When each request arrived (performance.now()), since the last reset. */
  arrivals: number[];
  reset(): void;
  close(): Promise<void>;
}

/**
 * An HTTP/1.1 origin on a bare TCP server that counts its open connections. It answers after `delayMs` with
 * `Connection: close` (one request, one connection, one fleet slot) unless `keepAlive`, and always keeps reading, so
 * a client's FIN is seen in the order the kernel delivered it: before the connect that the freed slot let another
 * daemon make. The count is then the connections the daemons hold, without this process's event-loop lag in it.
 */
export async function countingOrigin(delayMs: number, keepAlive = false): Promise<CountingOrigin> {
  const sockets = new Set<Socket>();
  const finishers = new Map<Socket, () => void>();
  const origin: CountingOrigin = {
    port: 0,
    open: 0,
    maxOpen: 0,
    accepted: 0,
    requests: 0,
    arrivals: [],
    reset() {
      this.maxOpen = this.open;
      this.accepted = 0;
      this.requests = 0;
      this.arrivals = [];
    },
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
  const server = createServer((socket) => {
    // The kernel's word first: a connection whose FIN arrived is gone, even if this loop has not read it yet.
    for (const other of sockets) {
      const fd = (other as unknown as { _handle?: { fd?: number } })._handle?.fd;
      if (fd !== undefined && fd >= 0) {
        const state = native.probe(fd).state;
        if (state === 'eof' || state === 'error') finishers.get(other)?.();
      }
    }
    sockets.add(socket);
    origin.accepted++;
    origin.open++;
    origin.maxOpen = Math.max(origin.maxOpen, origin.open);
    let gone = false;
    const done = () => {
      if (gone) return;
      gone = true;
      origin.open--;
      sockets.delete(socket);
      finishers.delete(socket);
    };
    finishers.set(socket, done);
    let pending = '';
    socket.on('data', (chunk: Buffer) => {
      pending += chunk.toString('latin1');
      for (let end = pending.indexOf('\r\n\r\n'); end !== -1; end = pending.indexOf('\r\n\r\n')) {
        pending = pending.slice(end + 4);
        origin.requests++;
        origin.arrivals.push(performance.now());
        setTimeout(() => {
          if (socket.writable) {
            socket.write(
              `HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: ${keepAlive ? 'keep-alive' : 'close'}\r\n\r\nok`,
            );
          }
        }, delayMs);
      }
    });
    socket.on('end', () => {
      done();
      socket.end();
    });
    socket.on('error', done);
    socket.on('close', done);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  origin.port = (server.address() as { port: number }).port;
  return origin;
}
