// A tiny real DNS server for tests: UDP and TCP on 127.0.0.1, one port chosen by the kernel. It answers A and AAAA
// queries from a table, NXDOMAIN for unknown names, NOERROR with no answer (NODATA) for a known name without records
// of the asked type, and counts every query it sees. A UDP answer longer than 512 bytes (RFC 1035 §4.2.1; the
// server reads no EDNS) goes out truncated, TC set and no answers, as a real server's does: the client asks again
// over TCP (RFC 7766), which answers in full. The wire format (RFC 1035 §4) is parsed and written by hand: header,
// one question, answers whose name is the compression pointer 0xc00c (the question's name at offset 12).

import { createSocket, type Socket } from 'node:dgram';
import { createServer, type Server, type Socket as TcpSocket } from 'node:net';

export interface DnsRecordSet {
  a?: string[];
  aaaa?: string[];
  /** Seconds. Default 60. */
  ttl?: number;
  /** Answer after this many milliseconds (to keep queries in flight). */
  delayMs?: number;
  /** Answer AAAA queries after this many milliseconds instead (A answers first). */
  aaaaDelayMs?: number;
  /** Never answer (to make clients time out). */
  drop?: boolean;
  /** Answer with this RCODE and no records (2: SERVFAIL, 5: REFUSED). */
  rcode?: number;
}

export type DnsTable = Record<string, DnsRecordSet>;

export interface DnsQueryLogEntry {
  name: string;
  type: 'A' | 'AAAA' | number;
  /** Over which transport the query came. */
  transport: 'udp' | 'tcp';
}

/** The longest UDP answer without EDNS (RFC 1035 §4.2.1): longer ones go out truncated. */
const UDP_LIMIT = 512;

const TYPE_A = 1;
const TYPE_AAAA = 28;
const CLASS_IN = 1;
const RCODE_NXDOMAIN = 3;
const RCODE_FORMERR = 1;

function ipv4Bytes(address: string): Buffer {
  const parts = address.split('.').map(Number);
  if (parts.length !== 4 || parts.some((part) => !Number.isInteger(part) || part < 0 || part > 255)) {
    throw new TypeError(`dns-server: bad IPv4 ${address}`);
  }
  return Buffer.from(parts);
}

/** Expands an IPv6 address of hex groups with at most one '::' (no dotted tail: enough for test tables). */
function ipv6Bytes(address: string): Buffer {
  const [head = '', tail] = address.split('::');
  const headGroups = head === '' ? [] : head.split(':');
  const tailGroups = tail === undefined || tail === '' ? [] : tail.split(':');
  const zeros = tail === undefined ? 0 : 8 - headGroups.length - tailGroups.length;
  const groups = [...headGroups, ...new Array<string>(zeros).fill('0'), ...tailGroups];
  if (groups.length !== 8 || groups.some((group) => !/^[0-9a-f]{1,4}$/i.test(group))) {
    throw new TypeError(`dns-server: bad IPv6 ${address}`);
  }
  const bytes = Buffer.alloc(16);
  groups.forEach((group, index) => {
    bytes.writeUInt16BE(Number.parseInt(group, 16), index * 2);
  });
  return bytes;
}

/** Reads the question name starting at offset 12; returns the name and the offset after it. */
function readName(message: Buffer, start: number): { name: string; end: number } | null {
  const labels: string[] = [];
  let offset = start;
  for (;;) {
    if (offset >= message.length) return null;
    const length = message[offset]!;
    if (length === 0) return { name: labels.join('.'), end: offset + 1 };
    if (length > 63 || offset + 1 + length > message.length) return null; // no pointers in a question
    labels.push(message.toString('latin1', offset + 1, offset + 1 + length));
    offset += 1 + length;
  }
}

export class DnsTestServer {
  /** Mutable: tests may change records between queries. Keys are lower-case names without trailing dot. */
  readonly records: DnsTable;
  readonly queries: DnsQueryLogEntry[] = [];
  #socket: Socket | undefined;
  #tcp: Server | undefined;
  readonly #connections = new Set<TcpSocket>();
  #port = 0;
  #timers = new Set<NodeJS.Timeout>();

  constructor(records: DnsTable = {}) {
    this.records = records;
  }

  get port(): number {
    return this.#port;
  }

  /** '127.0.0.1:PORT', ready for Resolver's `servers`. */
  get server(): string {
    return `127.0.0.1:${this.#port}`;
  }

  /** Queries seen for `name` (any type, or one type). */
  count(name: string, type?: 'A' | 'AAAA'): number {
    const wanted = name.toLowerCase();
    return this.queries.filter((query) => query.name === wanted && (type === undefined || query.type === type)).length;
  }

  async start(): Promise<this> {
    // The kernel picks the UDP port; TCP takes the same one (tried again when another socket holds it for TCP).
    for (let tries = 0; ; tries++) {
      const socket = createSocket('udp4');
      socket.on('message', (message, remote) =>
        this.#onMessage(message, 'udp', (reply) => {
          if (this.#socket === socket) socket.send(reply, remote.port, remote.address);
        }),
      );
      await new Promise<void>((resolve, reject) => {
        socket.once('error', reject);
        socket.bind(0, '127.0.0.1', () => {
          socket.off('error', reject);
          resolve();
        });
      });
      const port = socket.address().port;
      const tcp = createServer((connection) => this.#onConnection(connection));
      const bound = await new Promise<boolean>((resolve, reject) => {
        tcp.once('error', (error: NodeJS.ErrnoException) =>
          error.code === 'EADDRINUSE' && tries < 20 ? resolve(false) : reject(error),
        );
        tcp.listen(port, '127.0.0.1', () => resolve(true));
      });
      if (!bound) {
        await new Promise<void>((resolve) => socket.close(() => resolve()));
        continue;
      }
      this.#socket = socket;
      this.#tcp = tcp;
      this.#port = port;
      return this;
    }
  }

  async close(): Promise<void> {
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    const socket = this.#socket;
    this.#socket = undefined;
    if (socket) await new Promise<void>((resolve) => socket.close(() => resolve()));
    const tcp = this.#tcp;
    this.#tcp = undefined;
    for (const connection of this.#connections) connection.destroy();
    if (tcp) await new Promise<void>((resolve) => tcp.close(() => resolve()));
  }

  /** TCP: each message with its two-byte length (RFC 1035 §4.2.2), several on one connection. */
  #onConnection(connection: TcpSocket): void {
    this.#connections.add(connection);
    connection.on('close', () => this.#connections.delete(connection));
    connection.on('error', () => {});
    let buffered = Buffer.alloc(0);
    connection.on('data', (data) => {
      buffered = Buffer.concat([buffered, data]);
      while (buffered.length >= 2 && buffered.length >= 2 + buffered.readUInt16BE(0)) {
        const message = buffered.subarray(2, 2 + buffered.readUInt16BE(0));
        buffered = buffered.subarray(2 + message.length);
        this.#onMessage(message, 'tcp', (reply) => {
          const length = Buffer.alloc(2);
          length.writeUInt16BE(reply.length);
          if (!connection.destroyed) connection.write(Buffer.concat([length, reply]));
        });
      }
    });
  }

  #onMessage(message: Buffer, transport: 'udp' | 'tcp', send: (reply: Buffer) => void): void {
    if (message.length < 12) return;
    const id = message.readUInt16BE(0);
    const flags = message.readUInt16BE(2);
    const questionCount = message.readUInt16BE(4);
    if (flags & 0x8000) return; // a response, not a query
    const question = questionCount === 1 ? readName(message, 12) : null;
    if (!question || question.end + 4 > message.length) {
      send(this.#header(id, flags, RCODE_FORMERR, 0, 0));
      return;
    }
    const questionEnd = question.end + 4;
    const type = message.readUInt16BE(question.end);
    const questionClass = message.readUInt16BE(question.end + 2);
    const name = question.name.toLowerCase();
    this.queries.push({ name, type: type === TYPE_A ? 'A' : type === TYPE_AAAA ? 'AAAA' : type, transport });

    const set = this.records[name];
    if (set?.drop) return;
    const answers: Buffer[] = [];
    if (set && questionClass === CLASS_IN) {
      const ttl = set.ttl ?? 60;
      const addresses = type === TYPE_A ? (set.a ?? []) : type === TYPE_AAAA ? (set.aaaa ?? []) : [];
      for (const item of addresses) {
        const data = type === TYPE_A ? ipv4Bytes(item) : ipv6Bytes(item);
        const record = Buffer.alloc(12);
        record.writeUInt16BE(0xc00c, 0); // name: pointer to the question's name at offset 12
        record.writeUInt16BE(type, 2);
        record.writeUInt16BE(CLASS_IN, 4);
        record.writeUInt32BE(ttl, 6);
        record.writeUInt16BE(data.length, 10);
        answers.push(record, data);
      }
    }
    if (set?.rcode !== undefined) answers.length = 0;
    const header = this.#header(id, flags, set ? (set.rcode ?? 0) : RCODE_NXDOMAIN, 1, answers.length / 2);
    // The question is echoed byte for byte (case included, as resolvers using 0x20 randomisation expect).
    let reply = Buffer.concat([header, message.subarray(12, questionEnd), ...answers]);
    if (transport === 'udp' && reply.length > UDP_LIMIT) {
      // Truncated: the question alone, TC set; the client asks again over TCP.
      const truncated = this.#header(id, flags, 0, 1, 0);
      truncated.writeUInt16BE(truncated.readUInt16BE(2) | 0x0200, 2);
      reply = Buffer.concat([truncated, message.subarray(12, questionEnd)]);
    }
    const delayMs = (type === TYPE_AAAA ? set?.aaaaDelayMs : undefined) ?? set?.delayMs ?? 0;
    if (delayMs <= 0) {
      send(reply);
      return;
    }
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      send(reply);
    }, delayMs);
    this.#timers.add(timer);
  }

  /** Response header: QR, the query's opcode and RD, AA and RA set; additional records are not echoed. */
  #header(id: number, queryFlags: number, rcode: number, questions: number, answers: number): Buffer {
    const header = Buffer.alloc(12);
    header.writeUInt16BE(id, 0);
    const opcodeAndRd = queryFlags & 0x7900;
    header.writeUInt16BE(0x8000 | opcodeAndRd | 0x0400 | 0x0080 | rcode, 2);
    header.writeUInt16BE(questions, 4);
    header.writeUInt16BE(answers, 6);
    header.writeUInt16BE(0, 8);
    header.writeUInt16BE(0, 10);
    return header;
  }
}

export async function startDnsServer(records: DnsTable = {}): Promise<DnsTestServer> {
  return new DnsTestServer(records).start();
}
