// urlTarget: a request URL parsed once and kept by its exact text (worker/url-target.ts). What the client validates
// with and the engine picks its pool by: canonical host, the scheme's default port, the origin key, IPv6 in
// brackets, credentials flagged; repeated URLs come from the cache, very long ones are parsed each time.
import { describe, expect, it } from 'vitest';
import { GENERATION, urlTarget } from '../worker/url-target.js';

describe('urlTarget', () => {
  it('normalizes like WHATWG URL and derives the origin and its key', () => {
    const target = urlTarget('HTTP://Example.COM./a/../b?q=1');
    expect(target).toMatchObject({
      href: 'http://example.com./b?q=1',
      protocol: 'http:',
      hostname: 'example.com.',
      origin: { host: 'example.com', port: 80 },
      key: 'example.com:80',
      secure: false,
      credentials: false,
    });
    expect(urlTarget('https://[::1]:8443/').origin).toEqual({ host: '::1', port: 8443 });
    expect(urlTarget('https://[::1]:8443/').key).toBe('[::1]:8443');
    // An IPv4-mapped literal is the IPv4 origin (the daemon keys it so too).
    expect(urlTarget('http://[::ffff:127.0.0.1]/')).toMatchObject({ origin: { host: '127.0.0.1', port: 80 } });
    expect(urlTarget('http://[::ffff:7f00:1]:8080/').key).toBe('127.0.0.1:8080');
    expect(urlTarget('https://h.test/').origin.port).toBe(443);
    expect(urlTarget('http://user:pw@h.test/').credentials).toBe(true);
  });

  it('returns the kept target for a repeated URL, and a fresh one for a URL too long to keep', () => {
    const url = 'http://cache.test/path';
    expect(urlTarget(url)).toBe(urlTarget(url));
    const long = `http://cache.test/${'x'.repeat(5000)}`;
    const first = urlTarget(long);
    expect(urlTarget(long)).not.toBe(first);
    expect(urlTarget(long)).toEqual(first);
  });

  it('keeps the last GENERATION distinct URLs at least and twice as many at most', () => {
    const first = urlTarget('http://bound.test/0');
    expect(urlTarget('http://bound.test/0')).toBe(first);
    // Two generations of other URLs later the first one is gone (parsed afresh: equal, not the same object)...
    for (let i = 1; i <= 2 * GENERATION; i++) urlTarget(`http://bound.test/${i}`);
    const again = urlTarget('http://bound.test/0');
    expect(again).not.toBe(first);
    expect(again).toEqual(first);
    // ...while each of the last GENERATION is still kept, whichever generation holds it.
    const recent = Array.from({ length: GENERATION }, (_, i) => urlTarget(`http://bound.test/${2 * GENERATION - i}`));
    for (let i = 0; i < GENERATION; i++) expect(urlTarget(`http://bound.test/${2 * GENERATION - i}`)).toBe(recent[i]);
  });

  it('targets are frozen: nobody can change what the next request with that URL gets', () => {
    const target = urlTarget('http://frozen.test/');
    expect(Object.isFrozen(target)).toBe(true);
    expect(Object.isFrozen(target.origin)).toBe(true);
  });

  it('throws a TypeError for text that is not a URL (and keeps nothing for it)', () => {
    expect(() => urlTarget('not a url')).toThrow(TypeError);
    expect(() => urlTarget('not a url')).toThrow(TypeError);
  });
});
