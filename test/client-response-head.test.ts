// What a response's head is made of, now that it comes from one native call (responseHead in our node-libcurl patch,
// which keeps the head's lines as curl hands them over) instead of a JS callback per header line: the final
// response's headers only (not a 103 Early Hints block, not trailers), repeated names kept in order, names
// lower-cased, bytes as latin1, all of 300; the status, version and URL; and, for streamed responses, the head as soon
// as it is complete (before any body byte). Both in worker threads and with `threads: 0`. Real daemon, real HTTP
// server.
import type http from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SockpoolClient } from '../client/index.js';
import { eventually, httpOrigin, type Origin, startTestDaemon } from './fixtures/client-helpers.js';
import type { DaemonProcess } from './helpers/daemon.js';

let origin: Origin;
/** An origin writing its head by hand: an empty value, a folded line (obs-fold), then more headers. */
let rawOrigin: net.Server;
let rawPort = 0;
let daemon: DaemonProcess;
/** Responses the server holds after their head (path /hold): the test ends them. */
const held: http.ServerResponse[] = [];

beforeAll(async () => {
  origin = await httpOrigin((request, response) => {
    if (request.url === '/hold') {
      response.writeHead(202, { 'x-held': 'yes' });
      response.flushHeaders();
      held.push(response);
      return;
    }
    if (request.url === '/many') {
      // Many headers, a name repeated among them.
      for (let i = 0; i < 300; i++) response.setHeader(`X-Many-${i}`, String(i));
      response.setHeader('X-Again', ['first', 'second', 'third']);
      response.end('many');
      return;
    }
    response.writeEarlyHints({ link: '</style.css>; rel=preload' });
    response.setHeader('Set-Cookie', ['a=1', 'b=2']);
    response.setHeader('X-Latin1', Buffer.from([0x63, 0x61, 0x66, 0xe9]).toString('latin1'));
    response.setHeader('Trailer', 'X-Checksum');
    response.writeHead(200, { 'Content-Type': 'text/plain', 'X-Mixed-Case': 'Value With  Spaces' });
    response.write('body');
    response.addTrailers({ 'X-Checksum': 'abc' });
    response.end();
  });
  rawOrigin = net.createServer((socket) => {
    socket.on('error', () => {});
    socket.once('data', () =>
      socket.end(
        'HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Empty:\r\nX-Fold: first\r\n  second\r\nX-After: 1\r\n' +
          'X-Last:\r\nConnection: close\r\n\r\nok',
      ),
    );
  });
  await new Promise<void>((resolve) => rawOrigin.listen(0, '127.0.0.1', resolve));
  rawPort = (rawOrigin.address() as net.AddressInfo).port;
  daemon = await startTestDaemon([origin.port, rawPort]);
});

afterAll(async () => {
  for (const response of held) response.destroy();
  await daemon?.stop();
  await origin?.close();
  await new Promise((resolve) => rawOrigin?.close(resolve));
});

describe.each([
  { threads: 2, label: 'worker threads' },
  { threads: 0, label: 'threads: 0' },
])('the response head ($label)', ({ threads }) => {
  it('has the final headers only, repeats in order, lower-case names, latin1 values; status, version, URL', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads });
    try {
      // The URL as given is normalized once (dot segments), and the response reports that form.
      const response = await client.request(`http://127.0.0.1:${origin.port}/a/../head`);
      expect(response.status).toBe(200);
      expect(response.httpVersion).toBe('1.1');
      expect(response.url).toBe(`http://127.0.0.1:${origin.port}/head`);
      expect(response.body.toString()).toBe('body');
      const names = response.headers.map(([name]) => name);
      // Not the 103 block's link header, not the trailer.
      expect(names).not.toContain('link');
      expect(names).not.toContain('x-checksum');
      expect(response.headers.filter(([name]) => name === 'set-cookie')).toEqual([
        ['set-cookie', 'a=1'],
        ['set-cookie', 'b=2'],
      ]);
      expect(response.headers).toContainEqual(['x-latin1', 'café']);
      expect(response.headers).toContainEqual(['x-mixed-case', 'Value With  Spaces']);
      expect(response.headers).toContainEqual(['content-type', 'text/plain']);
      expect(names.every((name) => name === name.toLowerCase())).toBe(true);
      // Twice over the same connection: the second head is its own, not the first one's again.
      const again = await client.request(`http://127.0.0.1:${origin.port}/head`);
      expect(again.connection).toBe('reused');
      expect(again.headers.filter(([name]) => name === 'set-cookie')).toHaveLength(2);
    } finally {
      await client.close();
    }
  });

  it('keeps each name with its value past an empty value and a folded line: no value holds a line break', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads });
    try {
      const response = await client.request(`http://127.0.0.1:${rawPort}/`);
      expect(response.status).toBe(200);
      expect(response.body.toString()).toBe('ok');
      const get = (name: string) => response.headers.filter(([key]) => key === name).map(([, value]) => value);
      expect(get('x-empty')).toEqual(['']);
      expect(get('x-after')).toEqual(['1']);
      expect(get('x-last')).toEqual(['']);
      expect(get('connection')).toEqual(['close']);
      // However curl unfolds it, the folded value is one value of its own name.
      expect(get('x-fold')).toHaveLength(1);
      expect(get('x-fold')[0]).toMatch(/^first\s*second$/);
      for (const [name, value] of response.headers) expect(`${name}: ${value}`).not.toMatch(/[\r\n]/);
    } finally {
      await client.close();
    }
  });

  it('has every one of 300 headers, in order, with a repeated name’s values in order', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads });
    try {
      const response = await client.request(`http://127.0.0.1:${origin.port}/many`);
      expect(response.body.toString()).toBe('many');
      const many = response.headers.filter(([name]) => name.startsWith('x-many-'));
      expect(many).toEqual(Array.from({ length: 300 }, (_, i) => [`x-many-${i}`, String(i)]));
      expect(response.headers.filter(([name]) => name === 'x-again').map(([, value]) => value)).toEqual([
        'first',
        'second',
        'third',
      ]);
    } finally {
      await client.close();
    }
  });

  it('requestStream resolves with the head while the server still holds the body', async () => {
    const client = new SockpoolClient({ socketPath: daemon.socketPath, threads });
    try {
      const heldBefore = held.length;
      const streamed = await client.requestStream(`http://127.0.0.1:${origin.port}/hold`);
      // The server has sent no body byte yet: the head came at the end of the header block.
      expect(held.length).toBe(heldBefore + 1);
      expect(streamed.status).toBe(202);
      expect(streamed.headers).toContainEqual(['x-held', 'yes']);
      const reading = new Response(streamed.body).text();
      const response = held.at(-1)!;
      response.end('late body');
      expect(await reading).toBe('late body');
      await eventually(() => response.writableFinished, 'the server finished the response');
    } finally {
      await client.close();
    }
  });
});
