// Baseline (a) of the handoff benchmarks (bench/handoff.ts, bench/relay.ts --handoff-under-load): a 1-byte
// request, a reply carrying one fd (SCM_RIGHTS), on a SOCK_SEQPACKET connection; the received fd is closed on receipt. Both sides are driven by the addon's Poller, as sockpoold and its clients are. The server is
// fixtures/scm-server.js. This end owns its connection's fd and closes it in close().
import * as native from '../../shared/native.js';

export class ScmBaseline {
  readonly fd: number;
  #poller: native.Poller;
  #onReply: (() => void) | undefined;
  static readonly request = Buffer.from([0x71]);

  constructor(path: string) {
    this.fd = native.seqpacketConnect(path);
    this.#poller = new native.Poller(this.fd, () => {
      for (;;) {
        const batch = native.recvMessages(this.fd, 64, 1, 16);
        if (batch === null) return;
        for (const message of batch) {
          if (message instanceof Error) throw message;
          if (message.eof) throw new Error('scm-server hung up');
          for (const fd of message.fds) native.close(fd);
          this.#onReply?.();
        }
      }
    });
    this.#poller.start(native.READABLE | native.DISCONNECT);
  }

  /** `count` request/response pairs with `inFlight` outstanding; each latency goes to `onSample` (µs). */
  run(count: number, inFlight: number, onSample: (us: number) => void): Promise<{ count: number; elapsedMs: number }> {
    return new Promise((resolve) => {
      const sentAt: number[] = []; // FIFO: replies come back in request order on one connection
      let head = 0;
      let issued = 0;
      let done = 0;
      const started = performance.now();
      const issue = () => {
        issued++;
        sentAt.push(performance.now());
        if (native.sendMessage(this.fd, ScmBaseline.request, []) === null) throw new Error('scm-server not reading');
      };
      this.#onReply = () => {
        const now = performance.now();
        onSample((now - sentAt[head++]!) * 1000);
        done++;
        if (issued < count) issue();
        else if (done === count) {
          this.#onReply = undefined;
          resolve({ count, elapsedMs: now - started });
        }
      };
      for (let i = 0; i < inFlight && i < count; i++) issue();
    });
  }

  close(): void {
    this.#poller.close();
    native.close(this.fd);
  }
}
