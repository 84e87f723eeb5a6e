// Binary framing (shared/protocol.ts): the hot messages as compact frames once hello negotiated them. Pure round
// trips and every way a frame is refused, then a real daemon: negotiation, a binary acquire → lease with its fd,
// release → ok, typed errors for bad frames, and JSON for clients that did not ask.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { ErrorCodes } from '../shared/errors.js';
import * as native from '../shared/native.js';
import {
  type ClientMessage,
  decodeClientBundle,
  decodeClientMessage,
  decodeDaemonMessage,
  encodeBundle,
  encodeFor,
  encodeFrame,
  FrameType,
  isBinaryFrame,
  MAX_BUNDLED_FRAMES,
  salvageRequestId,
} from '../shared/protocol.js';
import { startServer, type TestServer } from './fixtures/native-helpers.js';
import { type DaemonProcess, startDaemon, writeConfigFile } from './helpers/daemon.js';
import { RawClient } from './helpers/raw-client.js';

const TRUST = 'a'.repeat(64);

/** A lease reply with every field its binary frame carries. */
const LEASE = {
  type: 'lease' as const,
  id: 5,
  leaseId: 12,
  host: 'example.com',
  port: 443,
  address: '2001:db8::1',
  family: 6 as const,
  warm: true,
  connectMs: 1.25,
};

describe('binary frames', () => {
  it('carry acquire, release and closed exactly as their JSON form says', () => {
    const messages: ClientMessage[] = [
      { type: 'acquire', id: 1, host: 'example.com', port: 443 },
      { type: 'acquire', id: 2 ** 31 - 1, host: '::1', port: 65535, timeoutMs: 600_000, tls: { trust: TRUST } },
      { type: 'acquire', id: 0, host: '127.0.0.1', port: 1, tls: { trust: 'system' } },
      { type: 'release', id: 3, leaseId: 1 },
      { type: 'release', leaseId: Number.MAX_SAFE_INTEGER },
      { type: 'release', leaseId: 5, withoutFd: true },
      { type: 'release', id: 6, leaseId: 5, withoutFd: true },
      { type: 'closed', leaseId: 7 },
      { type: 'closed', id: 9, leaseId: 8 },
    ];
    for (const message of messages) {
      const frame = encodeFrame(message)!;
      expect(isBinaryFrame(frame)).toBe(true);
      expect(decodeClientMessage(frame, true)).toEqual(message);
      // The same message as JSON decodes to the same thing.
      expect(decodeClientMessage(encodeFor(false, message), true)).toEqual(message);
    }
    expect(salvageRequestId(encodeFrame(messages[1]!)!)).toBe(2 ** 31 - 1);
    expect(salvageRequestId(encodeFrame(messages[4]!)!)).toBeNull();
  });

  it('carry each lease’s own host and address, whatever lease went out before (the frame’s end is kept for the last)', () => {
    const other = { ...LEASE, host: 'api.example.org', address: '2001:db8::7', family: 6 as const, leaseId: 9 };
    for (const lease of [LEASE, other, LEASE, { ...other, address: '2001:db8::8' }, other]) {
      expect(decodeDaemonMessage(encodeFrame(lease)!)).toEqual(lease);
    }
    // A host that cannot go in a frame is refused after a good one as before one.
    expect(() => encodeFrame({ ...LEASE, host: 'é.example' })).toThrow(/host cannot go in a binary frame/);
    expect(decodeDaemonMessage(encodeFrame(LEASE)!)).toEqual(LEASE);
  });

  it('carry lease and ok; what has no binary form goes as JSON', () => {
    const lease = LEASE;
    expect(decodeDaemonMessage(encodeFrame(lease)!)).toEqual(lease);
    expect(decodeDaemonMessage(encodeFrame({ type: 'ok', id: 77 })!)).toEqual({ type: 'ok', id: 77 });
    const tls = { version: 'TLSv1.3', alpn: 'h2', cipher: 'TLS_AES_128_GCM_SHA256', certSha256: TRUST };
    expect(encodeFrame({ ...lease, tls })).toBeUndefined();
    expect(encodeFrame({ type: 'acquire', id: 1, host: 'example.com', port: 443, proxy: 'corp' })).toBeUndefined();
    expect(encodeFrame({ type: 'stats', id: 1 })).toBeUndefined();
    expect(encodeFor(true, { type: 'stats', id: 1 })[0]).toBe('{'.charCodeAt(0));
  });

  it('are refused with SOCKPOOL_ERR_PROTOCOL for every malformed field, and on a connection that did not ask', () => {
    const acquire = encodeFrame({ type: 'acquire', id: 4, host: 'example.com', port: 443, timeoutMs: 100 })!;
    const release = encodeFrame({ type: 'release', id: 4, leaseId: 3 })!;
    const edit = (frame: Buffer, change: (copy: Buffer) => void) => {
      const copy = Buffer.from(frame);
      change(copy);
      return copy;
    };
    const setByte = (frame: Buffer, index: number, value: number) =>
      edit(frame, (copy) => {
        copy[index] = value;
      });
    const bad: Array<[Buffer, RegExp]> = [
      [acquire.subarray(0, 10), /too short/],
      [Buffer.concat([acquire, Buffer.from([0])]), /length/],
      [setByte(acquire, 1, 0x80), /unknown flags/],
      [edit(acquire, (f) => f.writeUInt32LE(2 ** 31, 2)), /id 2147483648/],
      [edit(acquire, (f) => f.writeUInt16LE(0, 6)), /port/],
      [edit(acquire, (f) => f.writeUInt32LE(600_001, 8)), /timeoutMs/],
      [setByte(acquire, 1, 0), /timeoutMs/], // absent, yet not 0
      [setByte(acquire, 13, '/'.charCodeAt(0)), /host/],
      [setByte(acquire, 12, 200), /length/],
      [
        encodeFrame({ type: 'acquire', id: 1, host: 'x', port: 1, tls: { trust: 'system' } })!.subarray(0, 15),
        /length/,
      ],
      [
        setByte(encodeFrame({ type: 'acquire', id: 1, host: 'x', port: 1, tls: { trust: 'system' } })!, 15, 0x41),
        /trust/,
      ],
      [release.subarray(0, 13), /length 13/],
      [edit(release, (f) => f.writeDoubleLE(Number.NaN, 6)), /leaseId/],
      [edit(release, (f) => f.writeDoubleLE(0, 6)), /leaseId/],
      [edit(release, (f) => f.writeDoubleLE(1.5, 6)), /leaseId/],
      [edit(release, (f) => f.writeDoubleLE(2 ** 60, 6)), /leaseId/],
      [setByte(release, 1, 0), /id must be 0/],
      [setByte(release, 1, 4), /unknown flags/],
      [setByte(encodeFrame({ type: 'closed', id: 4, leaseId: 3 })!, 1, 3), /unknown flags/], // withoutFd: release only
      [Buffer.from([FrameType.lease, 0, 0, 0, 0]), /not a request/],
    ];
    for (const [frame, why] of bad) {
      let caught: unknown;
      try {
        decodeClientMessage(frame, true);
      } catch (error) {
        caught = error;
      }
      expect(caught, `${frame.toString('hex')} should be refused (${why})`).toMatchObject({
        code: ErrorCodes.PROTOCOL,
        message: expect.stringMatching(why),
      });
    }
    expect(() => decodeClientMessage(acquire, false)).toThrow(/did not negotiate binary framing/);
  });

  it('take a host byte exactly where the JSON schema’s host pattern does, and write only printable ASCII', () => {
    const hostPattern = /^[A-Za-z0-9._:%-]+$/;
    const acquire = encodeFrame({ type: 'acquire', id: 4, host: 'ab', port: 443 })!;
    for (let byte = 0; byte < 256; byte++) {
      // In the middle of a host, and as a whole one-byte host.
      for (const frame of [Buffer.from(acquire), encodeFrame({ type: 'acquire', id: 4, host: 'a', port: 443 })!]) {
        frame[13] = byte;
        const host = frame.toString('latin1', 13, 13 + frame[12]!);
        let decoded: ClientMessage | undefined;
        try {
          decoded = decodeClientMessage(frame, true);
        } catch (error) {
          expect(error, `byte ${byte}`).toMatchObject({ code: ErrorCodes.PROTOCOL, message: /host may contain/ });
        }
        expect(decoded !== undefined, `byte ${byte} in ${JSON.stringify(host)}`).toBe(hostPattern.test(host));
        if (decoded) expect(decoded).toMatchObject({ host });
      }
    }
    // The length bounds: 1 to 253 bytes.
    const longest = 'a'.repeat(253);
    expect(decodeClientMessage(encodeFrame({ type: 'acquire', id: 1, host: longest, port: 1 })!, true)).toMatchObject({
      host: longest,
    });
    for (const host of ['', 'a'.repeat(254)]) {
      expect(() => decodeClientMessage(encodeFrame({ type: 'acquire', id: 1, host, port: 1 })!, true)).toThrow(
        /host may contain/,
      );
    }
    // Encoding: a field with any character outside printable ASCII, or over 255 characters, has no binary form.
    const lease = LEASE;
    for (const code of [0x00, 0x1f, 0x7f, 0xe9, 0x100, 0x2603]) {
      const text = `a${String.fromCharCode(code)}b`;
      expect(() => encodeFrame({ ...lease, address: text })).toThrow(/address cannot go in a binary frame/);
      expect(() => encodeFrame({ type: 'acquire', id: 1, host: text, port: 1 })).toThrow(/host cannot go/);
    }
    for (const code of [0x20, 0x41, 0x7e]) {
      const text = `a${String.fromCharCode(code)}b`;
      expect(decodeDaemonMessage(encodeFrame({ ...lease, address: text })!)).toEqual({ ...lease, address: text });
    }
    expect(() => encodeFrame({ ...lease, host: 'h'.repeat(256) })).toThrow(/host cannot go/);
    expect(decodeDaemonMessage(encodeFrame({ ...lease, host: 'h'.repeat(255) })!)).toMatchObject({
      host: 'h'.repeat(255),
    });
  });

  it('decode each acquire’s own host when one receive buffer is used again: the host seen last is never taken for the next', () => {
    // The daemon's channel reads into one buffer again and again; a host the decoder keeps from one frame must not be a
    // view of those bytes, and a host of the same length with one byte changed (a valid one, or an invalid one) is
    // decoded and checked as new.
    const buffer = encodeFrame({ type: 'acquire', id: 1, host: 'a.example', port: 443 })!;
    expect(decodeClientMessage(buffer, true)).toMatchObject({ host: 'a.example' });
    buffer.write('b', 13, 'latin1');
    expect(decodeClientMessage(buffer, true)).toMatchObject({ host: 'b.example' });
    buffer.write('#', 13 + 8, 'latin1');
    expect(() => decodeClientMessage(buffer, true)).toThrow(/host may contain/);
    buffer.write('e', 13 + 8, 'latin1');
    expect(decodeClientMessage(buffer, true)).toMatchObject({ host: 'b.example' });
    // The same in a bundle, and a host of another length between.
    const bundleOf = (host: string) =>
      encodeBundle([
        encodeFrame({ type: 'acquire', id: 2, host, port: 80 })!,
        encodeFrame({ type: 'acquire', id: 3, host: 'b.example', port: 80 })!,
      ]);
    const hosts = ['c.example', 'cc.example', 'c.examplf'].map((host) =>
      decodeClientBundle(bundleOf(host)).map((message) => (message as { host: string }).host),
    );
    expect(hosts).toEqual([
      ['c.example', 'b.example'],
      ['cc.example', 'b.example'],
      ['c.examplf', 'b.example'],
    ]);
  });
});

describe('bundles (binary framing 3)', () => {
  const acquire = encodeFrame({ type: 'acquire', id: 4, host: 'example.com', port: 443, timeoutMs: 100 })!;
  const release = encodeFrame({ type: 'release', leaseId: 3, withoutFd: true })!;
  const closed = encodeFrame({ type: 'closed', leaseId: 9 })!;

  it('carry several fd-less requests in one packet, decoded in order as each frame alone would be', () => {
    const bundle = encodeBundle([release, closed, acquire]);
    expect(isBinaryFrame(bundle)).toBe(true);
    expect(decodeClientBundle(bundle)).toEqual([
      { type: 'release', leaseId: 3, withoutFd: true },
      { type: 'closed', leaseId: 9 },
      { type: 'acquire', id: 4, host: 'example.com', port: 443, timeoutMs: 100 },
    ]);
    const full = Array.from({ length: MAX_BUNDLED_FRAMES }, () => closed);
    expect(decodeClientBundle(encodeBundle(full))).toHaveLength(MAX_BUNDLED_FRAMES);
    // A bundle has no one id to answer an error with, and is not a message decodeClientMessage takes.
    expect(salvageRequestId(bundle)).toBeNull();
    expect(() => decodeClientMessage(bundle, true)).toThrow(/decodeClientBundle/);
    expect(() => encodeBundle([])).toThrow(RangeError);
    expect(() => encodeBundle([...full, closed])).toThrow(RangeError);
  });

  it('are refused whole with SOCKPOOL_ERR_PROTOCOL for any fault, naming the frame', () => {
    const good = encodeBundle([release, acquire]);
    const withCount = (count: number) => {
      const copy = Buffer.from(good);
      copy[1] = count;
      return copy;
    };
    const badAcquire = Buffer.from(acquire);
    badAcquire.writeUInt16LE(0, 6);
    const bad: Array<[Buffer, RegExp]> = [
      [Buffer.from([FrameType.bundle]), /not a bundle/],
      [withCount(0), /holds 1-16 frames, not 0/],
      [withCount(MAX_BUNDLED_FRAMES + 1), /not 17/],
      [withCount(3), /frame 3 of 3 is missing/],
      [withCount(1), /bytes after its 1 frames/],
      [good.subarray(0, good.length - 1), /frame 2 of 2 overruns/],
      [Buffer.concat([good, Buffer.from([0])]), /1 bytes after/],
      [encodeBundle([release, badAcquire]), /invalid binary acquire frame: port/],
      [encodeBundle([encodeFrame({ type: 'release', leaseId: 3 })!]), /frame 1 of 1 is a release with its fd/],
      [encodeBundle([good]), /frame 1 of 1 \(type 0x4\) cannot be bundled/],
      [encodeBundle([encodeFrame({ type: 'ok', id: 1 })!]), /type 0x82\) cannot be bundled/],
      [encodeBundle([Buffer.from('{"type":"stats","id":1}')]), /type 0x7b\) cannot be bundled/],
    ];
    for (const [bundle, why] of bad) {
      let caught: unknown;
      try {
        decodeClientBundle(bundle);
      } catch (error) {
        caught = error;
      }
      expect(caught, `${bundle.toString('hex')} should be refused (${why})`).toMatchObject({
        code: ErrorCodes.PROTOCOL,
        message: expect.stringMatching(why),
      });
    }
  });
});

describe('binary framing with sockpoold', () => {
  let echo: TestServer;
  let sockpoold: DaemonProcess;

  const configCleanups: Array<() => unknown> = [];

  beforeAll(async () => {
    echo = await startServer('127.0.0.1');
    // Releases with their fd are part of the protocol (framing 1; framing 2 without `withoutFd`), taken only by a
    // daemon that lets fds in (access.acceptClientFds); by default the kernel refuses them (test/daemon-trust).
    const config = writeConfigFile({ access: { acceptClientFds: true } }, configCleanups);
    sockpoold = await startDaemon({
      args: ['--allow', '127.0.0.1/32', '--allow-port', String(echo.port), '--config', config],
    });
  });
  afterAll(async () => {
    await sockpoold?.stop();
    await echo?.close();
    for (const cleanup of configCleanups) cleanup();
  });

  it('negotiated in hello: frames both ways for acquire, lease, release and ok; errors stay JSON and typed', async () => {
    const client = new RawClient(sockpoold.socketPath);
    const hello = await client.request({ type: 'hello', id: 1, version: 1, binary: 1 });
    // A client of framing 1 gets framing 1 (its releases carry their fd).
    expect(hello.message).toMatchObject({ type: 'hello', binary: 1 });

    client.sendBytes(encodeFrame({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port, timeoutMs: 5_000 })!);
    const leased = await client.receive();
    expect(leased.message).toMatchObject({ type: 'lease', id: 2, host: '127.0.0.1', port: echo.port, family: 4 });
    expect(leased.fds).toHaveLength(1);
    const leaseId = (leased.message as { leaseId: number }).leaseId;

    client.sendBytes(encodeFrame({ type: 'release', id: 3, leaseId })!, leased.fds);
    native.close(leased.fds[0]!);
    const ok = await client.receive();
    expect(ok.message).toEqual({ type: 'ok', id: 3 });

    // A bad frame: a JSON error naming the request (its id salvaged from the frame) and the field.
    const bad = encodeFrame({ type: 'acquire', id: 4, host: '127.0.0.1', port: echo.port })!;
    bad.writeUInt16LE(0, 6);
    client.sendBytes(bad);
    const refused = await client.receive();
    expect(refused.message).toMatchObject({ type: 'error', id: 4, code: ErrorCodes.PROTOCOL });
    expect((refused.message as { message: string }).message).toMatch(/invalid binary acquire frame: port/);
    client.close();
  });

  it('framing 2: a release without its fd pools the socket again, checked as strictly; one with an fd is refused', async () => {
    const client = new RawClient(sockpoold.socketPath);
    const hello = await client.request({ type: 'hello', id: 1, version: 1, binary: 2 });
    expect(hello.message).toMatchObject({ type: 'hello', binary: 2 });
    const acquire = async (id: number) => {
      client.sendBytes(encodeFrame({ type: 'acquire', id, host: '127.0.0.1', port: echo.port, timeoutMs: 5_000 })!);
      const leased = await client.receive();
      expect(leased.message).toMatchObject({ type: 'lease', id });
      expect(leased.fds).toHaveLength(1);
      return { leaseId: (leased.message as { leaseId: number }).leaseId, fd: leased.fds[0]! };
    };

    // Unused: released without the fd (the client closes its copy), lent again warm, the same socket.
    const first = await acquire(2);
    const inode = native.socketInode(first.fd);
    native.close(first.fd);
    client.sendBytes(encodeFrame({ type: 'release', id: 3, leaseId: first.leaseId, withoutFd: true })!);
    expect((await client.receive()).message).toEqual({ type: 'ok', id: 3 });
    const again = await acquire(4);
    expect(native.socketInode(again.fd)).toBe(inode);

    // Used through the client's copy, then released without it: the daemon's own copy shows the bytes.
    native.sendMessage(again.fd, Buffer.from('GET / HTTP/1.1\r\n'), []);
    client.sendBytes(encodeFrame({ type: 'release', id: 5, leaseId: again.leaseId, withoutFd: true })!);
    const used = await client.receive();
    expect(used.message).toMatchObject({ type: 'error', id: 5, code: ErrorCodes.PROTOCOL, fields: { reason: 'used' } });
    // ...and its connection is shut down (before the reply) for every copy: the client's is dead too.
    expect(native.probe(again.fd).state).not.toBe('alive');
    native.close(again.fd);

    // withoutFd with an fd attached: refused, and the fd is closed by the daemon (the lease stays).
    const third = await acquire(6);
    client.sendBytes(encodeFrame({ type: 'release', id: 7, leaseId: third.leaseId, withoutFd: true })!, [third.fd]);
    const refused = await client.receive();
    expect(refused.message).toMatchObject({ type: 'error', id: 7, code: ErrorCodes.PROTOCOL });
    expect((refused.message as { message: string }).message).toMatch(/release must carry 0 fds, got 1/);
    client.sendBytes(encodeFrame({ type: 'release', id: 8, leaseId: third.leaseId })!, [third.fd]);
    native.close(third.fd);
    expect((await client.receive()).message).toEqual({ type: 'ok', id: 8 });
    client.close();
  });

  it('framing 3: the requests of a bundle are served in order as if sent one by one; a bad bundle changes nothing', async () => {
    const client = new RawClient(sockpoold.socketPath);
    const hello = await client.request({ type: 'hello', id: 1, version: 1, binary: 3 });
    expect(hello.message).toMatchObject({ type: 'hello', binary: 3 });
    const acquireFrame = (id: number) =>
      encodeFrame({ type: 'acquire', id, host: '127.0.0.1', port: echo.port, timeoutMs: 5_000 })!;
    const leaseOf = async (id: number) => {
      const leased = await client.receive();
      expect(leased.message).toMatchObject({ type: 'lease', id });
      expect(leased.fds).toHaveLength(1);
      return { leaseId: (leased.message as { leaseId: number }).leaseId, fd: leased.fds[0]! };
    };

    // Two acquires in one packet: two leases, in order.
    client.sendBytes(encodeBundle([acquireFrame(2), acquireFrame(3)]));
    const first = await leaseOf(2);
    const second = await leaseOf(3);
    // The release of the first (unused) and the next acquire in one packet: the release is read first, so the
    // acquire is lent the same socket, warm.
    const inode = native.socketInode(first.fd);
    native.close(first.fd);
    client.sendBytes(
      encodeBundle([encodeFrame({ type: 'release', leaseId: first.leaseId, withoutFd: true })!, acquireFrame(4)]),
    );
    const third = await leaseOf(4);
    expect(native.socketInode(third.fd)).toBe(inode);

    // A bundle with one bad frame: refused whole (no id to name), the release before that frame not applied.
    const badAcquire = acquireFrame(5);
    badAcquire.writeUInt16LE(0, 6);
    client.sendBytes(
      encodeBundle([encodeFrame({ type: 'release', id: 6, leaseId: third.leaseId, withoutFd: true })!, badAcquire]),
    );
    const refused = await client.receive();
    expect(refused.message).toMatchObject({ type: 'error', id: null, code: ErrorCodes.PROTOCOL });
    expect((refused.message as { message: string }).message).toMatch(/invalid binary acquire frame: port/);
    // ...the lease is still this client's: released now, by itself.
    client.sendBytes(encodeFrame({ type: 'release', id: 7, leaseId: third.leaseId, withoutFd: true })!);
    native.close(third.fd);
    expect((await client.receive()).message).toEqual({ type: 'ok', id: 7 });

    // A bundle with an fd attached: refused, the fd closed by the daemon, nothing in it applied.
    const [mine, theirs] = native.seqpacketPair();
    client.sendBytes(encodeBundle([encodeFrame({ type: 'closed', id: 8, leaseId: second.leaseId })!]), [theirs]);
    native.close(theirs);
    const withFd = await client.receive();
    expect(withFd.message).toMatchObject({ type: 'error', id: null, code: ErrorCodes.PROTOCOL });
    expect((withFd.message as { message: string }).message).toMatch(/bundle must carry no fds, got 1/);
    // (The daemon closed its copy: the pair's other end sees the hang-up.)
    await vi.waitFor(() => expect(native.recvMessage(mine, 16, 0)?.eof).toBe(true));
    native.close(mine);
    client.sendBytes(encodeFrame({ type: 'closed', id: 9, leaseId: second.leaseId })!);
    native.close(second.fd);
    expect((await client.receive()).message).toEqual({ type: 'ok', id: 9 });
    client.close();
  });

  it('framing 2: a bundle is refused with a typed error', async () => {
    const client = new RawClient(sockpoold.socketPath);
    await client.request({ type: 'hello', id: 1, version: 1, binary: 2 });
    client.sendBytes(encodeBundle([encodeFrame({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port })!]));
    const refused = await client.receive();
    expect(refused.message).toMatchObject({ type: 'error', id: null, code: ErrorCodes.PROTOCOL });
    expect((refused.message as { message: string }).message).toMatch(/did not negotiate binary framing 3/);
    client.close();
  });

  it('not negotiated: frames are refused with a typed error, and replies are JSON', async () => {
    const client = new RawClient(sockpoold.socketPath);
    await client.request({ type: 'hello', id: 1, version: 1 });
    client.sendBytes(encodeFrame({ type: 'acquire', id: 2, host: '127.0.0.1', port: echo.port })!);
    const refused = await client.receive();
    expect(refused.message).toMatchObject({ type: 'error', id: 2, code: ErrorCodes.PROTOCOL });
    expect((refused.message as { message: string }).message).toMatch(/did not negotiate binary framing/);
    const leased = await client.request({ type: 'acquire', id: 3, host: '127.0.0.1', port: echo.port });
    expect(leased.message).toMatchObject({ type: 'lease', id: 3 });
    for (const fd of leased.fds) native.close(fd);
    client.close();
  });
});
