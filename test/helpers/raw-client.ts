// A bare protocol client for tests: sends exactly the bytes and fds a test wants and reads replies, with no
// retries or validation in the way (the worker's DaemonLink is the real client).
import { expect } from 'vitest';
import * as native from '../../shared/native.js';
import { type DaemonMessage, decodeDaemonMessage, MAX_MESSAGE_BYTES } from '../../shared/protocol.js';
import { receiveMessage } from '../fixtures/native-helpers.js';

export class RawClient {
  readonly fd: number;
  constructor(socketPath: string) {
    this.fd = native.seqpacketConnect(socketPath);
  }

  sendJson(value: unknown, fds: number[] = []): void {
    this.sendBytes(Buffer.from(JSON.stringify(value)), fds);
  }

  sendBytes(data: Uint8Array, fds: number[] = []): void {
    const sent = native.sendMessage(this.fd, data, fds);
    if (sent === null) throw new Error('socket full');
  }

  /** The next message; `eof` true when the daemon hung up. fds received belong to the caller. */
  async receive(): Promise<{ message: DaemonMessage | null; fds: number[]; eof: boolean }> {
    let received: native.ReceivedMessage;
    try {
      received = await receiveMessage(this.fd, MAX_MESSAGE_BYTES * 4, 4);
    } catch (error) {
      if ((error as { code?: string }).code !== 'ECONNRESET') throw error;
      // The daemon closed with our messages unread. The kernel reports that reset once, before whatever the daemon
      // sent first (as the real client's SeqpacketChannel, read on: a refusal's reply may be queued behind it).
      const behind = native.recvMessage(this.fd, MAX_MESSAGE_BYTES * 4, 4);
      if (behind === null || behind.eof) return { message: null, fds: [], eof: true };
      received = behind;
    }
    if (received.eof) return { message: null, fds: [], eof: true };
    // JSON, or a binary frame when the test negotiated binary framing.
    return { message: decodeDaemonMessage(received.data), fds: received.fds, eof: false };
  }

  /** Sends a request and waits for its reply (by id). */
  async request(value: { id: number } & Record<string, unknown>, fds: number[] = []) {
    this.sendJson(value, fds);
    for (;;) {
      const reply = await this.receive();
      if (reply.eof || reply.message?.id === value.id) return reply;
      for (const fd of reply.fds) native.close(fd);
    }
  }

  close(): void {
    native.close(this.fd);
  }
}

/** Opens a RawClient and registers its close (quiet if already closed) in a test's cleanup list. */
export function openRawClient(socketPath: string, cleanups: Array<() => unknown>): RawClient {
  const raw = new RawClient(socketPath);
  cleanups.push(() => {
    try {
      raw.close();
    } catch {}
  });
  return raw;
}

/** An honest client's hello, answered: a daemon whose thread is held (in a close, say) would answer nobody. */
export async function honestHello(socketPath: string): Promise<void> {
  const honest = new RawClient(socketPath);
  try {
    const reply = await honest.request({ type: 'hello', id: 7, version: 1 });
    expect(reply.message).toMatchObject({ type: 'hello', id: 7 });
  } finally {
    honest.close();
  }
}
