// Easy.collectBody / takeBody (our node-libcurl patch): the body of a transfer gathered in the handle as curl writes
// it, with no WRITEFUNCTION call, and handed over once; what the engine (worker/curl-engine.ts) does for a buffered
// response. Covered: a body of one chunk and one of many, intact and in order; a body past the limit fails the
// transfer with CURLE_WRITE_ERROR and takeBody says so (null); the next transfer starts clean; takeBody and a
// negative limit give the body back to WRITEFUNCTION; a body that fits a caller's target is copied into it; bad
// arguments are a TypeError; no fd left. Real libcurl, a real loopback HTTP server.
import { randomBytes } from 'node:crypto';
import { CurlCode, Easy } from 'node-libcurl';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type CurlOrigin, startCurlOrigin } from './fixtures/curl-origin.js';

/** Bodies by path: a small one (one chunk) and a large one (curl writes it in many). */
const bodies = new Map<string, Buffer>([
  ['/small', Buffer.from('a small body')],
  ['/large', randomBytes(3 * 1024 * 1024 + 7)],
  ['/empty', Buffer.alloc(0)],
]);
let origin: CurlOrigin;

beforeAll(async () => {
  origin = await startCurlOrigin((request, response) => {
    const body = bodies.get(request.url ?? '');
    if (!body) return void response.writeHead(404).end();
    response.writeHead(200, { 'content-length': body.length });
    response.end(body);
  });
});

// (curl's connections go with the Multi: no fd left.)
afterAll(() => origin.close());

const transfer = (easy: Easy, path: string) => origin.transfer(easy, path);

/** A handle whose WRITEFUNCTION counts its calls. */
function countingEasy(): { easy: Easy; writes: () => number; written: () => Buffer } {
  const easy = new Easy();
  const chunks: Buffer[] = [];
  easy.setOpt('WRITEFUNCTION', (data: Buffer) => {
    chunks.push(Buffer.from(data));
    return data.length;
  });
  return { easy, writes: () => chunks.length, written: () => Buffer.concat(chunks) };
}

describe('Easy.collectBody and takeBody', () => {
  it('collect a body of one chunk and one of many, intact, with no WRITEFUNCTION call; taking it ends the collecting', async () => {
    const { easy, writes } = countingEasy();
    try {
      for (const path of ['/small', '/large', '/empty', '/small']) {
        easy.collectBody(Number.MAX_SAFE_INTEGER);
        expect(await transfer(easy, path)).toBe(CurlCode.CURLE_OK);
        const body = easy.takeBody();
        expect(body).toBeInstanceOf(Buffer);
        expect(Buffer.compare(body!, bodies.get(path)!)).toBe(0);
        // Taken: nothing left for the next call.
        expect(easy.takeBody()!.length).toBe(0);
      }
      expect(writes()).toBe(0);
      // Taking it ended the collecting: the next transfer's body goes to WRITEFUNCTION.
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_OK);
      expect(writes()).toBe(1);
    } finally {
      easy.close();
    }
  });

  it('a body past the limit fails its transfer with CURLE_WRITE_ERROR and takeBody says so; the next one is whole', async () => {
    const { easy, writes } = countingEasy();
    try {
      const small = bodies.get('/small')!;
      easy.collectBody(small.length - 1);
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_WRITE_ERROR);
      expect(easy.takeBody()).toBeNull();
      // (The next transfer starts clean: nothing of the refused body, no overflow left.)
      easy.collectBody(1024 * 1024);
      expect(await transfer(easy, '/large')).toBe(CurlCode.CURLE_WRITE_ERROR);
      expect(easy.takeBody()).toBeNull();
      // Exactly the limit is not past it.
      easy.collectBody(small.length);
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_OK);
      expect(easy.takeBody()!.toString()).toBe(small.toString());
      expect(writes()).toBe(0);
    } finally {
      easy.close();
    }
  });

  it('a negative limit gives the body back to WRITEFUNCTION; reset() stops collecting too', async () => {
    const { easy, writes, written } = countingEasy();
    try {
      easy.collectBody(Number.MAX_SAFE_INTEGER);
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_OK);
      easy.collectBody(-1);
      expect(await transfer(easy, '/large')).toBe(CurlCode.CURLE_OK);
      expect(writes()).toBeGreaterThan(1);
      expect(Buffer.compare(written(), bodies.get('/large')!)).toBe(0);
      expect(easy.takeBody()!.length).toBe(0);

      easy.collectBody(Number.MAX_SAFE_INTEGER);
      easy.reset();
      const collected: Buffer[] = [];
      easy.setOpt('WRITEFUNCTION', (data: Buffer) => {
        collected.push(Buffer.from(data));
        return data.length;
      });
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_OK);
      expect(Buffer.concat(collected).toString()).toBe('a small body');
    } finally {
      easy.close();
    }
  });

  it('copies a body that fits a target into it and says how long it is; one that does not comes as a Buffer', async () => {
    const { easy, writes } = countingEasy();
    const small = bodies.get('/small')!;
    // Filled beforehand: only the body's own bytes are written, from the start.
    const target = new Uint8Array(small.length + 5).fill(0xee);
    try {
      easy.collectBody(Number.MAX_SAFE_INTEGER);
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_OK);
      expect(easy.takeBody(target)).toBe(small.length);
      expect(Buffer.from(target.subarray(0, small.length)).toString()).toBe(small.toString());
      expect([...target.subarray(small.length)]).toEqual([0xee, 0xee, 0xee, 0xee, 0xee]);
      // Taken: nothing left.
      expect(easy.takeBody(target)).toBe(0);

      easy.collectBody(Number.MAX_SAFE_INTEGER);
      expect(await transfer(easy, '/large')).toBe(CurlCode.CURLE_OK);
      const large = easy.takeBody(target);
      expect(large).toBeInstanceOf(Buffer);
      expect(Buffer.compare(large as Buffer, bodies.get('/large')!)).toBe(0);

      // Past the limit: null, target or not.
      easy.collectBody(small.length - 1);
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_WRITE_ERROR);
      expect(easy.takeBody(target)).toBeNull();
      expect(writes()).toBe(0);

      // Not a Uint8Array: a TypeError, and the body is still there to take.
      easy.collectBody(Number.MAX_SAFE_INTEGER);
      expect(await transfer(easy, '/small')).toBe(CurlCode.CURLE_OK);
      const takeAny = easy.takeBody as (target?: unknown) => unknown;
      for (const bad of [new Uint16Array(64), small.length, 'x', new ArrayBuffer(64)]) {
        expect(() => takeAny.call(easy, bad)).toThrow(TypeError);
      }
      expect((easy.takeBody() as Buffer).toString()).toBe(small.toString());
    } finally {
      easy.close();
    }
  });

  it('refuses a limit that is not a number, and a closed handle', () => {
    const easy = new Easy();
    expect(() => (easy.collectBody as (limit?: unknown) => void)('10')).toThrow(TypeError);
    expect(() => (easy.collectBody as (limit?: unknown) => void)()).toThrow(TypeError);
    easy.close();
    expect(() => easy.collectBody(10)).toThrow(/closed/);
  });
});
