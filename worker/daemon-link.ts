// A worker thread's own connection to sockpoold: request/response over one SOCK_SEQPACKET socket, with request
// ids, a deadline on every request, and reconnection with backoff when the daemon restarts.
//
// fd ownership: the link's own socket is owned by its SeqpacketChannel and tracked by the addon (closed if the
// thread dies, and then the daemon frees every lease of this thread). A `lease` reply's fd is tracked too and
// belongs to the caller of acquire() once it resolves. release() takes ownership of the fd it is given.
//
// Leases belong to one connection to the daemon (`Lease.link`): after a reconnect the daemon knows nothing of the
// old ones, and its new lease ids start again at 1, so `closed` and `release` for a lease of an earlier connection
// are not sent (a released fd is closed instead).
//
// The daemon is asked to wait at most MAX_TIMEOUT_MS (the protocol's bound on an acquire's or a `tokens` request's
// `timeoutMs`): a longer wait is sent as that. The client allows no acquireTimeoutMs over it; a token that comes
// later than that, but before the request's deadline, is asked for again by rate-tokens.ts.
//
// With binary framing 3, the fire-and-forget messages (an fd-less `release`, `closed`) wait for the end of the
// caller's turn: they go out with the next acquire sent in that turn, or together, in one packet (a bundle), so that
// a transfer ending and the next one starting cost the daemon one wake-up and one read, not two. Every other message
// sends what is held first: the daemon reads everything in the order it was sent.
//
// While reconnecting after a failure, requests fail at once with SOCKPOOL_ERR_DAEMON_UNAVAILABLE until the backoff
// delay has passed; the first request after it tries again.

import { Buffer } from 'node:buffer';
import process from 'node:process';
import { ErrorCodes, fromPlainError, SockpoolError } from '../shared/errors.js';
import { IntMap } from '../shared/id-table.js';
import * as native from '../shared/native.js';
import {
  BINARY_FRAMING,
  BUNDLES,
  type ClientMessage,
  type DaemonMessage,
  decodeClientMessage,
  decodeDaemonMessage,
  encodeBundle,
  encodeFor,
  FrameType,
  type LeaseReply,
  MAX_BUNDLED_FRAMES,
  MAX_FDS_PER_MESSAGE,
  MAX_MESSAGE_BYTES,
  MAX_TIMEOUT_MS,
  PROTOCOL_VERSION,
  RELEASE_WITHOUT_FD,
} from '../shared/protocol.js';
import { SeqpacketChannel } from '../shared/seqpacket-channel.js';
import type { CancelSignal } from './cancellation.js';
import { RateTokens } from './rate-tokens.js';

export interface Lease extends LeaseReply {
  fd: number;
  /** The connection to the daemon this lease belongs to (see the header). */
  link: number;
}

interface Pending {
  resolve(reply: { message: DaemonMessage; fds: number[] }): void;
  reject(error: Error): void;
  timer: NodeJS.Timeout;
}

type Request = ClientMessage extends infer M ? (M extends { id?: number } ? Omit<M, 'id'> : never) : never;

export interface DaemonLinkOptions {
  socketPath: string;
  /** Deadline for replies other than acquire (which carries its own). */
  requestTimeoutMs?: number;
  clientName?: string;
}

/** Requests wait in this link (#sendWhenRoom) while this many messages wait in the channel's queue: far below the
 *  queue's bound (maxQueuedMessages), however many fire-and-forget messages follow the requests sent. */
const MAX_QUEUED_REQUESTS = 64;
/** ...and once this many went out in one turn of the event loop: as many replies as the channel reads in a wakeup
 *  (its DRAIN_LIMIT), so what the daemon answers is read as fast as it is asked for. */
const MAX_REQUESTS_PER_TURN = 64;

const RECONNECT_MIN_MS = 50;
const RECONNECT_MAX_MS = 2000;

export class DaemonLink {
  /** The daemon asks for these leases back if idle (`reclaim`, see the protocol): the socket supply decides.
   *  `link`: the connection the notice came on (its lease ids are that daemon's: `Lease.link`). */
  onReclaim: ((leaseIds: number[], link: number) => void) | undefined;
  /** Request tokens of the rate-limited origins this link's leases named (rate-tokens.ts). */
  readonly rateTokens: RateTokens = new RateTokens(this);
  #options: Required<DaemonLinkOptions>;
  #channel: SeqpacketChannel | undefined;
  #connecting: Promise<SeqpacketChannel> | undefined;
  /** By request id (an IntMap, not a Map: ../shared/id-table.ts says why). */
  #pending = new IntMap<Pending>();
  #nextId = 1;
  #closed = false;
  #failures = 0;
  #retryAt = 0;
  /** Counts connections to the daemon; the current one's number tags its leases. */
  #generation = 0;
  /** The current connection's daemon agreed to binary framing in hello (shared/protocol.ts). */
  #binary = false;
  /** ...and to framing 2: a release leaves its fd out (this side closes it). */
  #releaseWithoutFd = false;
  /** ...and to framing 3: fire-and-forget frames are held for the turn and bundled (see the header). */
  #bundles = false;
  /** The frames held (at most MAX_BUNDLED_FRAMES - 1 between calls), all for #heldOn; #flushHeld sends them. */
  #held: Buffer[] = [];
  #heldOn: SeqpacketChannel | undefined;
  /** One immediate at the end of a turn in which frames were held or requests sent (#endOfTurnSoon): the held
   *  frames go out, and the turn's count of requests starts again (#sendWhenRoom). */
  #turnEndDue = false;
  readonly #turnEnd = (): void => {
    this.#turnEndDue = false;
    this.#flushHeld();
    this.#sentThisTurn = 0;
    // (Those still without room, the queue full, wait for it to empty from here.)
    if (this.#wakeFor !== undefined) this.#sendWaiting(this.#wakeFor);
  };
  /** The daemon said in hello that it takes `cancel` for a pending acquire (and, since, a `tokens` request). */
  #cancelSupported = false;
  /** Requests waiting to go out, in order, while the channel's queue is full or the turn's are sent (#sendWhenRoom);
   *  one given up leaves at once (a caller that aborts every request it makes must not fill it with dead ones). */
  #waitingForRoom: Set<() => void> | undefined;
  /** The channel the waiting requests are for, while a wake-up is due (#wakeWhenRoom). */
  #wakeFor: SeqpacketChannel | undefined;
  /** Requests sent in this turn of the event loop (reset by #turnEnd, due while it is not 0). */
  #sentThisTurn = 0;

  constructor(options: DaemonLinkOptions) {
    this.#options = { requestTimeoutMs: 5000, clientName: `worker-${process.pid}`, ...options };
  }

  /** Requests held back until the daemon reads what this link sent (#sendWhenRoom). */
  get waitingForRoom(): number {
    return this.#waitingForRoom?.size ?? 0;
  }

  /** True while a connection to the daemon is open. */
  get connected(): boolean {
    return this.#channel !== undefined && !this.#channel.closed;
  }

  /** A connected socket for host:port. Rejects with signal.reason when `signal` aborts first (a lease that arrives
   *  after that goes back to the daemon). */
  async acquire(
    host: string,
    port: number,
    timeoutMs: number,
    signal?: CancelSignal,
    proxy?: string,
    tls?: { trust: string },
    tokenTaken?: boolean,
  ): Promise<Lease> {
    const ms = daemonWait(timeoutMs);
    const { message, fds, generation } = await this.#request(
      {
        type: 'acquire',
        host,
        port,
        timeoutMs: ms,
        ...(proxy ? { proxy } : {}),
        ...(tls ? { tls } : {}),
        ...(tokenTaken ? { tokenTaken: true } : {}),
      },
      ms + 1000,
      signal,
    );
    if (message.type !== 'lease' || fds.length !== 1) {
      for (const fd of fds) native.close(fd);
      throw new SockpoolError(ErrorCodes.PROTOCOL, `daemon answered acquire with ${message.type}`);
    }
    this.rateTokens.learn(host, port, message.rate);
    return { ...message, fd: fds[0]!, link: generation };
  }

  /**
   * `tls`: warm TLS sessions where the daemon would relay them to a client with this trust (tls-trust.ts).
   * `lookahead`: the client's queue announcing, not the caller (see the protocol's prewarm).
   */
  async prewarm(
    host: string,
    port: number,
    count: number,
    proxy?: string,
    tls?: { trust: string },
    lookahead = false,
  ): Promise<number | undefined> {
    const { message } = await this.#request(
      {
        type: 'prewarm',
        host,
        port,
        count,
        ...(proxy ? { proxy } : {}),
        ...(tls ? { tls } : {}),
        ...(lookahead ? { lookahead: true } : {}),
      },
      this.#options.requestTimeoutMs,
    );
    // How many connects the daemon starts for it (what its idle pool can keep); daemons before `granted` send none.
    const granted = (message as { granted?: unknown }).granted;
    return typeof granted === 'number' ? granted : undefined;
  }

  /**
   * An operator's warming of any origin (admin uids only; others get SOCKPOOL_ERR_ACCESS_DENIED). Answers what the
   * daemon warms: 'tls' sessions, or 'tcp' connections (also for an https origin it keeps no sessions for), and how
   * many it connects (`granted`: what its idle pool has room for; undefined from a daemon before `granted`).
   */
  async warm(
    host: string,
    port: number,
    count: number,
    proxy?: string,
    tls?: { trust: string },
  ): Promise<{ warming: 'tls' | 'tcp'; granted: number | undefined }> {
    const { message } = await this.#request(
      { type: 'warm', host, port, count, ...(proxy ? { proxy } : {}), ...(tls ? { tls } : {}) },
      this.#options.requestTimeoutMs,
    );
    const granted = (message as { granted?: unknown }).granted;
    return {
      warming: message.type === 'ok' && message.warming === 'tls' ? 'tls' : 'tcp',
      granted: typeof granted === 'number' ? granted : undefined,
    };
  }

  /**
   * Request tokens of a rate-limited origin (rate-tokens.ts takes them through here). When `stop` is cancelled, a
   * daemon that takes `cancel` drops the wait from the origin's queue, and its answer is still awaited: the tokens it
   * granted before the cancel reached it (they are no less spent), or SOCKPOOL_ERR_ABORTED.
   */
  async tokens(host: string, port: number, count: number, timeoutMs: number, stop?: CancelSignal): Promise<number> {
    const ms = daemonWait(timeoutMs);
    const { message } = await this.#request(
      { type: 'tokens', host, port, count, timeoutMs: ms },
      ms + 1000,
      undefined,
      stop,
    );
    if (message.type !== 'tokens' || !Number.isInteger(message.granted) || message.granted < 1) {
      throw new SockpoolError(ErrorCodes.PROTOCOL, `daemon answered tokens with ${message.type}`);
    }
    return message.granted;
  }

  async stats(): Promise<Record<string, unknown>> {
    const { message } = await this.#request({ type: 'stats' }, this.#options.requestTimeoutMs);
    if (message.type !== 'stats') throw new SockpoolError(ErrorCodes.PROTOCOL, 'daemon answered stats wrongly');
    return message.stats;
  }

  /** Gives an unused leased fd back (ownership passes here; it is closed if its daemon connection is gone). */
  release(lease: Pick<Lease, 'leaseId' | 'fd' | 'link'>): void {
    const channel = this.#channel;
    if (!channel || channel.closed || lease.link !== this.#generation) {
      native.close(lease.fd);
      return;
    }
    if (this.#releaseWithoutFd) {
      // The daemon checks its own copy; ours is closed here (binary framing 2).
      this.#sendLater(channel, encodeFor(true, { type: 'release', leaseId: lease.leaseId, withoutFd: true }));
      native.close(lease.fd);
      return;
    }
    this.#flushHeld();
    channel.send(encodeFor(this.#binary, { type: 'release', leaseId: lease.leaseId }), [lease.fd]);
  }

  /** Tells the daemon curl closed a leased socket. Fire and forget: a lost link frees the lease anyway. */
  closed(lease: Pick<Lease, 'leaseId' | 'link'>): void {
    const channel = this.#channel;
    if (channel && !channel.closed && lease.link === this.#generation) {
      this.#sendLater(channel, encodeFor(this.#binary, { type: 'closed', leaseId: lease.leaseId }));
    }
  }

  /** A fire-and-forget message: held for the turn with framing 3 (see the header), sent now otherwise. */
  #sendLater(channel: SeqpacketChannel, frame: Buffer): void {
    if (!this.#bundles) {
      channel.send(frame);
      return;
    }
    if (this.#heldOn !== channel) this.#flushHeld();
    this.#held.push(frame);
    this.#heldOn = channel;
    if (this.#held.length === MAX_BUNDLED_FRAMES) this.#flushHeld();
    else this.#endOfTurnSoon();
  }

  #endOfTurnSoon(): void {
    if (this.#turnEndDue) return;
    // An immediate, not a microtask: curl's callbacks (where `closed` is sent from) may leave no callback scope for a
    // microtask to run in until some later event.
    this.#turnEndDue = true;
    setImmediate(this.#turnEnd);
  }

  /** Sends `bytes` after what is held; an acquire frame the daemon takes goes in the same bundle. */
  #sendInOrder(channel: SeqpacketChannel, bytes: Buffer): void {
    if (this.#held.length > 0) {
      if (this.#heldOn === channel && bytes[0] === FrameType.acquire && takenAlone(bytes)) {
        this.#held.push(bytes);
        this.#flushHeld();
        return;
      }
      this.#flushHeld();
    }
    channel.send(bytes);
  }

  /** Sends what is held, one frame alone or a bundle; on a channel closed since, it is dropped (the daemon ended
   *  that connection's leases when it closed). */
  #flushHeld(): void {
    const held = this.#held;
    const channel = this.#heldOn;
    if (held.length === 0) return;
    this.#held = [];
    this.#heldOn = undefined;
    if (channel && !channel.closed) channel.send(held.length === 1 ? held[0]! : encodeBundle(held));
  }

  close(): void {
    this.#flushHeld();
    this.#closed = true;
    this.#channel?.close();
    this.#channel = undefined;
    const closing = new SockpoolError(ErrorCodes.CLOSED, 'daemon link closed');
    this.#failAll(closing);
    // Waits for tokens that sleep here (a token past the protocol's bound) end too, not when their sleep would.
    this.rateTokens.close(closing);
  }

  /**
   * `signal`: the caller stops waiting when it is cancelled (an acquire is then cancelled in the daemon too).
   * `cancelOn`: when it is cancelled the daemon is asked to drop the request, and its answer is still awaited.
   */
  async #request(
    request: Request,
    timeoutMs: number,
    signal?: CancelSignal,
    cancelOn?: CancelSignal,
  ): Promise<{ message: DaemonMessage; fds: number[]; generation: number }> {
    signal?.throwIfAborted();
    const channel = await this.#connect();
    signal?.throwIfAborted();
    // The daemon may have hung up between the connect (or its hello) and now: a message sent on a closed channel
    // is dropped, and its reply would never come.
    if (channel.closed) throw new SockpoolError(ErrorCodes.DAEMON_UNAVAILABLE, 'connection to sockpoold lost');
    const generation = this.#generation;
    const id = this.#nextId++;
    if (this.#nextId > 2 ** 31 - 1) this.#nextId = 1;
    const cancellable = request.type === 'acquire' && this.#cancelSupported;
    return new Promise((resolve, reject) => {
      /** The request went out (it may wait for room first: #sendWhenRoom); a cancel before that sends nothing. */
      let sent = false;
      const onAbort = () => {
        // A reply that still comes finds no pending entry: its fd goes back to the daemon (see #onMessage). A daemon
        // that takes `cancel` drops the acquire now instead of keeping it queued until its deadline.
        clearTimeout(timer);
        this.#pending.delete(id);
        this.#waitingForRoom?.delete(send);
        if (sent && cancellable && !channel.closed)
          this.#sendInOrder(channel, encodeFor(false, { type: 'cancel', acquireId: id }));
        reject(signal!.reason);
      };
      // (A daemon that does not take `cancel` for it answers when it would have anyway.)
      const onCancel = () => {
        if (sent && this.#cancelSupported && !channel.closed && this.#pending.get(id) !== undefined) {
          this.#sendInOrder(channel, encodeFor(false, { type: 'cancel', acquireId: id }));
        }
      };
      const timer = setTimeout(() => {
        signal?.removeEventListener('abort', onAbort);
        cancelOn?.removeEventListener('abort', onCancel);
        this.#pending.delete(id);
        this.#waitingForRoom?.delete(send);
        reject(
          new SockpoolError(ErrorCodes.DAEMON_TIMEOUT, `sockpoold did not answer ${request.type} in ${timeoutMs} ms`),
        );
      }, timeoutMs);
      signal?.addEventListener('abort', onAbort, { once: true });
      cancelOn?.addEventListener('abort', onCancel, { once: true });
      this.#pending.set(id, {
        resolve: (reply) => {
          signal?.removeEventListener('abort', onAbort);
          cancelOn?.removeEventListener('abort', onCancel);
          if (reply.message.type === 'error') {
            for (const fd of reply.fds) native.close(fd);
            reject(fromPlainError(reply.message));
          } else resolve({ ...reply, generation });
        },
        reject: (error) => {
          signal?.removeEventListener('abort', onAbort);
          cancelOn?.removeEventListener('abort', onCancel);
          reject(error);
        },
        timer,
      });
      const frame = encodeFor(this.#binary, { ...request, id } as ClientMessage);
      const send = () => {
        // The channel closed while it waited for room (every request pending on it failed then): nothing goes out.
        // (One given up while it waited, aborted or timed out, left the line then.)
        if (channel.closed) return;
        sent = true;
        this.#sendInOrder(channel, frame);
        if (cancelOn?.aborted) onCancel();
      };
      this.#sendWhenRoom(channel, send);
    });
  }

  /**
   * Sends a request now, or later, after the requests that waited before it, when either side is not keeping up:
   * - the daemon does not read as fast as this link sends (messages wait in the channel's queue): until the queue is
   *   empty. The queue has a bound, past which the channel fails with every request on it.
   * - this thread sends more than MAX_REQUESTS_PER_TURN in one turn of its event loop: until the next turn. Each
   *   request may get one reply, and replies are read only when the loop turns; a caller that sends for long without
   *   letting it turn has the daemon queue the replies it does not read, up to the daemon's bound, and the daemon
   *   then hangs up (as it must on a client that does not read).
   * Both were reached by a caller that never waits for the daemon: requests started and aborted in a tight loop (an
   * acquire and a cancel each; an acquire the daemon served before the cancel came is answered with a lease all the
   * same) failed with SOCKPOOL_ERR_DAEMON_UNAVAILABLE. The wait counts against the request's own deadline. The
   * fire-and-forget messages (release, closed, cancel) never wait: each follows a request that went out, at most one
   * of each.
   */
  #sendWhenRoom(channel: SeqpacketChannel, send: () => void): void {
    // (A line all of whose requests were given up is no line: the wake-up still due finds it empty.)
    if (!this.#waitingForRoom?.size && this.#hasRoom(channel)) {
      this.#countSent();
      send();
      return;
    }
    this.#waitingForRoom ??= new Set();
    this.#waitingForRoom.add(send);
    this.#wakeWhenRoom(channel);
  }

  #hasRoom(channel: SeqpacketChannel): boolean {
    // (A closed channel: each waiting request finds so and sends nothing.)
    return (
      channel.closed || (channel.queuedMessages < MAX_QUEUED_REQUESTS && this.#sentThisTurn < MAX_REQUESTS_PER_TURN)
    );
  }

  #countSent(): void {
    this.#sentThisTurn++;
    this.#endOfTurnSoon();
  }

  /** Once: when the queue is empty (or the channel closed), or at the next turn, #sendWaiting. */
  #wakeWhenRoom(channel: SeqpacketChannel): void {
    if (this.#wakeFor !== undefined) return;
    this.#wakeFor = channel;
    // (Else the turn is spent: #turnEnd, already due, wakes them.)
    if (channel.queuedMessages >= MAX_QUEUED_REQUESTS) channel.whenFlushed(() => this.#sendWaiting(channel));
  }

  /** There is room again: the requests that waited go out in order, as many as fit. */
  #sendWaiting(channel: SeqpacketChannel): void {
    if (this.#wakeFor !== channel) return;
    this.#wakeFor = undefined;
    const waiting = this.#waitingForRoom;
    if (waiting === undefined) return;
    for (const send of waiting) {
      if (!this.#hasRoom(channel)) {
        this.#wakeWhenRoom(channel);
        return;
      }
      waiting.delete(send);
      this.#countSent();
      send();
    }
    this.#waitingForRoom = undefined;
  }

  #connect(): Promise<SeqpacketChannel> {
    if (this.#closed) return Promise.reject(new SockpoolError(ErrorCodes.CLOSED, 'daemon link closed'));
    if (this.#channel && !this.#channel.closed) return Promise.resolve(this.#channel);
    this.#connecting ??= this.#open().finally(() => {
      this.#connecting = undefined;
    });
    return this.#connecting;
  }

  async #open(): Promise<SeqpacketChannel> {
    if (performance.now() < this.#retryAt) {
      throw new SockpoolError(
        ErrorCodes.DAEMON_UNAVAILABLE,
        `sockpoold at ${this.#options.socketPath} is unreachable (retrying after a backoff)`,
        { socketPath: this.#options.socketPath, backoff: true },
      );
    }
    let fd: number;
    try {
      fd = native.seqpacketConnect(this.#options.socketPath);
    } catch (error) {
      this.#backOff();
      const cause = error as Error & { code?: string };
      throw new SockpoolError(
        ErrorCodes.DAEMON_UNAVAILABLE,
        `cannot reach sockpoold at ${this.#options.socketPath}: ${cause.code ?? cause.message}`,
        { socketPath: this.#options.socketPath },
        { cause },
      );
    }
    const generation = ++this.#generation;
    this.#binary = false;
    this.#releaseWithoutFd = false;
    this.#bundles = false;
    this.#cancelSupported = false;
    // The channel owns fd once made. Tracked: if this thread dies, the addon closes the link, and the daemon then
    // frees every lease this thread held.
    native.track(fd);
    let channel: SeqpacketChannel;
    try {
      channel = this.#channelOn(fd, generation);
    } catch (error) {
      // (Not constructed: the fd is still ours. Each reconnect would leave one more open otherwise.)
      native.close(fd);
      this.#backOff();
      throw error;
    }
    this.#channel = channel;
    try {
      // Binary framing asked for; a daemon from before it refuses the unknown field, and is asked again plainly.
      if (!(await this.#hello(channel, true))) await this.#hello(channel, false);
    } catch (error) {
      channel.close();
      if (this.#channel === channel) this.#channel = undefined;
      this.#backOff();
      throw error;
    }
    this.#failures = 0;
    return channel;
  }

  /** The channel on a connected fd (which it owns from then on); throws, the fd still the caller's, if it cannot be
   *  made (its poller). */
  #channelOn(fd: number, generation: number): SeqpacketChannel {
    const channel: SeqpacketChannel = new SeqpacketChannel(
      fd,
      {
        onMessage: (data, fds) => this.#onMessage(data, fds, generation),
        onBadMessage: (error) => this.#onBadMessage(channel, error, generation),
        onClose: (error) => {
          if (this.#channel === channel) this.#channel = undefined;
          this.#failAll(
            new SockpoolError(
              ErrorCodes.DAEMON_UNAVAILABLE,
              `connection to sockpoold lost${error ? `: ${error.message}` : ''}`,
            ),
          );
        },
      },
      { maxMessageBytes: MAX_MESSAGE_BYTES, maxFdsPerMessage: MAX_FDS_PER_MESSAGE },
    );
    return channel;
  }

  /**
   * Sends hello and waits for its answer; with `binary`, asks for binary framing. Resolves false when the daemon
   * refused a binary hello with SOCKPOOL_ERR_PROTOCOL (it predates binary framing); throws any other refusal.
   */
  #hello(channel: SeqpacketChannel, binary: boolean): Promise<boolean> {
    const id = this.#nextId++;
    const answer = new Promise<boolean>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new SockpoolError(ErrorCodes.DAEMON_UNAVAILABLE, 'sockpoold did not answer hello'));
      }, this.#options.requestTimeoutMs);
      this.#pending.set(id, {
        resolve: ({ message }) => {
          if (message.type === 'error') {
            if (binary && message.code === ErrorCodes.PROTOCOL) resolve(false);
            else reject(fromPlainError(message));
            return;
          }
          // The daemon answers the highest binary framing both speak (an older one: 1).
          const framing = message.type === 'hello' ? (message.binary ?? 0) : 0;
          this.#binary = framing >= 1;
          this.#releaseWithoutFd = framing >= RELEASE_WITHOUT_FD;
          this.#bundles = framing >= BUNDLES;
          this.#cancelSupported = message.type === 'hello' && message.cancel === true;
          resolve(true);
        },
        reject,
        timer,
      });
    });
    channel.send(
      encodeFor(false, {
        type: 'hello',
        id,
        version: PROTOCOL_VERSION,
        client: this.#options.clientName,
        // (With binary framing only: a daemon that refuses this hello is older, and the hello sent again without
        // binary framing asks for neither.)
        ...(binary ? { binary: BINARY_FRAMING, reclaim: true as const } : {}),
      }),
    );
    return answer;
  }

  /** A message on the connection numbered `generation`. */
  #onMessage(data: Buffer, fds: number[], generation: number): void {
    let message: DaemonMessage;
    try {
      message = decodeDaemonMessage(data);
    } catch {
      for (const fd of fds) native.close(fd);
      return;
    }
    this.#deliver(message, fds, generation);
  }

  /** A decoded message and the fds that came with it (the handler's from here) to whoever waits for it. */
  #deliver(message: DaemonMessage, fds: number[], generation: number): void {
    const id = message.id;
    if (message.type === 'reclaim') {
      for (const fd of fds) native.close(fd);
      this.onReclaim?.(message.leaseIds, generation);
      return;
    }
    if (id === null && message.type === 'error') {
      // An error about the link itself (access denied, a message it could not parse): every waiter learns it.
      for (const fd of fds) native.close(fd);
      this.#failAll(fromPlainError(message));
      return;
    }
    const pending = this.#takePending(id);
    if (!pending) {
      // A reply nobody waits for (its request timed out): an fd in it goes back to the daemon, unused.
      if (message.type === 'lease' && fds.length === 1) {
        this.release({ leaseId: message.leaseId, fd: fds[0]!, link: this.#generation });
      } else for (const fd of fds) native.close(fd);
      return;
    }
    pending.resolve({ message, fds });
  }

  /** The request waiting for reply `id`, out of the table and its timer cleared; undefined when none waits. */
  #takePending(id: number | null): Pending | undefined {
    const pending = id === null ? undefined : this.#pending.get(id);
    if (!pending) return undefined;
    this.#pending.delete(id!);
    clearTimeout(pending.timer);
    return pending;
  }

  /**
   * A message of the daemon's that did not arrive whole (the addon closed its fds). One whose fds did not all arrive
   * (this process's fd table full) is otherwise whole (`data`): a lease in it is ended at the daemon (`closed`:
   * it counted against the uid's quotas and the origin's cap until this link closed) and its acquire fails at once,
   * not at its deadline; any other such message is read without its fds. One cut short leaves unknown which reply
   * was lost: the link is closed (the daemon ends its leases) and every request on it fails now.
   */
  #onBadMessage(channel: SeqpacketChannel, error: Error, generation: number): void {
    const data = (error as { data?: unknown }).data;
    let message: DaemonMessage | undefined;
    try {
      if (data instanceof Buffer) message = decodeDaemonMessage(data);
    } catch {}
    if (message?.type === 'lease') {
      this.closed({ leaseId: message.leaseId, link: generation });
      this.#takePending(message.id)?.reject(
        new SockpoolError(
          ErrorCodes.INTERNAL,
          `the socket of lease ${message.leaseId} did not arrive (this process's fd table may be full): ${error.message}`,
          { leaseId: message.leaseId },
          { cause: error },
        ),
      );
      return;
    }
    if (message) {
      this.#deliver(message, [], generation);
      return;
    }
    channel.close();
    if (this.#channel === channel) this.#channel = undefined;
    this.#failAll(
      new SockpoolError(
        ErrorCodes.DAEMON_UNAVAILABLE,
        `a message from sockpoold was lost: ${error.message}`,
        {},
        {
          cause: error,
        },
      ),
    );
  }

  /** After a failed connect: no new attempt for 50 ms, doubling per failure up to 2 s. */
  #backOff(): void {
    this.#failures++;
    this.#retryAt = performance.now() + Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** (this.#failures - 1));
  }

  #failAll(error: Error): void {
    for (const [id, pending] of this.#pending.entries()) {
      clearTimeout(pending.timer);
      this.#pending.delete(id);
      pending.reject(error);
    }
  }
}

/**
 * Whether the daemon takes `frame` as a request (its own checks, decodeClientMessage). One it refuses (an acquire for
 * port 0: a URL may name it) is refused alone with its id, failing that request only; in a bundle it would make the
 * whole bundle one bad message with no id, which ends no held release or `closed` and fails every request pending
 * on the link.
 */
function takenAlone(frame: Buffer): boolean {
  try {
    decodeClientMessage(frame, true);
    return true;
  } catch {
    return false;
  }
}

/** A wait to ask the daemon for: whole ms, 1 to the protocol's MAX_TIMEOUT_MS. */
function daemonWait(timeoutMs: number): number {
  return Math.min(MAX_TIMEOUT_MS, Math.max(1, Math.ceil(timeoutMs)));
}
