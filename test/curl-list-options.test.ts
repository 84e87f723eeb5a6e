// Linked-list options (HTTPHEADER, RESOLVE, ...) on a handle kept for many transfers, as the engine keeps its
// handles (worker/curl-engine.ts): node-libcurl kept every list it was ever given until the handle was closed, so a
// handle whose headers changed from one request to the next grew with every request (the soak's clients, by about
// 15 bytes a request). Our node-libcurl patch frees a list once curl holds the one set after it. Covered: a list set
// over and over costs no memory that stays; the transfer sends the list set last, after lists and nulls set
// before it; a handle duplicated from another keeps the lists it was made with while the other sets new ones. Real
// libcurl, a real loopback HTTP server that echoes the headers it got.
import { Easy } from 'node-libcurl';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type CurlOrigin, startCurlOrigin } from './fixtures/curl-origin.js';

let origin: CurlOrigin;

beforeAll(async () => {
  origin = await startCurlOrigin((request, response) => {
    response.end(String(request.headers['x-list'] ?? '(none)'));
  });
});

// (curl's connections go with the Multi: no fd left.)
afterAll(() => origin.close());

/** One transfer on `easy`: what the server saw of x-list. */
async function transfer(easy: Easy): Promise<string> {
  let body = '';
  easy.setOpt('WRITEFUNCTION', (data: Buffer) => {
    body += data.toString();
    return data.length;
  });
  const code = await origin.transfer(easy, '/');
  if (code !== 0) throw new Error(`curl code ${code}`);
  return body;
}

/** Resident memory of this process (bytes). */
const rss = () => process.memoryUsage.rss();

describe('linked-list options set again on one handle', () => {
  it('free the list they replace: 100,000 lists of 1 KiB leave no 100 MB behind', async () => {
    const easy = new Easy();
    const value = 'v'.repeat(1024);
    // (Once first: whatever the first use allocates for good is not counted.)
    easy.setOpt('HTTPHEADER', [`x-list: ${value}`]);
    const before = rss();
    for (let i = 0; i < 100_000; i++) {
      easy.setOpt('HTTPHEADER', [`x-list: ${i}`, `x-other: ${value}`]);
      if (i % 2 === 0) easy.setOpt('RESOLVE', [`example.test:80:127.0.0.${i % 250}`]);
    }
    // Kept, the lists would be over 100 MB; freed, what is left is the allocator's own slack.
    expect(rss() - before).toBeLessThan(32 * 1024 * 1024);
    expect(await transfer(easy)).toBe('99999');
    easy.close();
  });

  it('send the list set last, after lists and nulls set before it, transfer after transfer', async () => {
    const easy = new Easy();
    easy.setOpt('HTTPHEADER', ['x-list: first']);
    expect(await transfer(easy)).toBe('first');
    easy.setOpt('HTTPHEADER', null);
    expect(await transfer(easy)).toBe('(none)');
    easy.setOpt('HTTPHEADER', ['x-list: third']);
    easy.setOpt('HTTPHEADER', ['x-list: fourth']);
    expect(await transfer(easy)).toBe('fourth');
    easy.reset();
    expect(await transfer(easy)).toBe('(none)');
    easy.setOpt('HTTPHEADER', ['x-list: after reset']);
    expect(await transfer(easy)).toBe('after reset');
    easy.close();
  });

  it('leave a duplicated handle the lists it was made with (they share them)', async () => {
    const original = new Easy();
    original.setOpt('HTTPHEADER', ['x-list: shared']);
    const duplicate = original.dupHandle();
    original.setOpt('HTTPHEADER', ['x-list: original own']);
    original.setOpt('HTTPHEADER', ['x-list: original last']);
    expect(await transfer(duplicate)).toBe('shared');
    expect(await transfer(original)).toBe('original last');
    original.close();
    expect(await transfer(duplicate)).toBe('shared');
    duplicate.close();
  });
});
