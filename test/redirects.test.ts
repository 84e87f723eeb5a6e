// The redirect rules on their own (client/redirects.ts): what the next hop is for each status and method, which
// headers go, how a Location resolves, and what cannot be followed. Pure logic, no network (the same rules end to
// end, through a daemon: test/client-redirects.test.ts).
import { describe, expect, it } from 'vitest';
import { followRedirects, type Hop, MAX_REDIRECTS, nextHop, redirectMode } from '../client/redirects.js';

const base: Hop = {
  url: 'http://a.test/dir/page?x=1',
  method: 'GET',
  headers: {
    authorization: 'Bearer t',
    cookie: 'c=1',
    'proxy-authorization': 'Basic p',
    'content-type': 'text/plain',
    'x-keep': 'yes',
  },
  body: undefined,
};
const stream = () => new ReadableStream<Uint8Array>();

describe('nextHop', () => {
  it.each([
    [301, 'POST', 'GET', false],
    [302, 'POST', 'GET', false],
    [303, 'POST', 'GET', false],
    [303, 'PUT', 'GET', false],
    [303, 'DELETE', 'GET', false],
    [303, 'HEAD', 'HEAD', true],
    [303, 'GET', 'GET', true],
    [301, 'PUT', 'PUT', true],
    [302, 'DELETE', 'DELETE', true],
    [307, 'POST', 'POST', true],
    [308, 'PATCH', 'PATCH', true],
  ])('%i of a %s: the next hop is a %s (body kept: %s)', (status, method, nextMethod, bodyKept) => {
    const next = nextHop({ ...base, method, body: 'payload' }, status, '/next', 0);
    expect(next.method).toBe(nextMethod);
    expect(next.body).toBe(bodyKept ? 'payload' : undefined);
    // The headers that described the body go with it.
    expect((next.headers as Headers).get('content-type')).toBe(bodyKept ? 'text/plain' : null);
  });

  it('resolves a Location against the URL it came from', () => {
    const resolve = (location: string) => nextHop(base, 302, location, 0).url;
    expect(resolve('/root')).toBe('http://a.test/root');
    expect(resolve('other')).toBe('http://a.test/dir/other');
    expect(resolve('../up')).toBe('http://a.test/up');
    expect(resolve('?y=2')).toBe('http://a.test/dir/page?y=2');
    expect(resolve('//b.test/x')).toBe('http://b.test/x');
    expect(resolve('https://a.test/secure#frag')).toBe('https://a.test/secure#frag');
  });

  it('keeps credentials on the same origin and drops them for another (a scheme or a port is another origin)', () => {
    const kept = nextHop(base, 302, '/same', 0).headers as Headers;
    expect(kept.get('authorization')).toBe('Bearer t');
    expect(kept.get('cookie')).toBe('c=1');
    for (const location of ['http://b.test/', 'https://a.test/', 'http://a.test:8080/']) {
      const headers = nextHop(base, 302, location, 0).headers as Headers;
      expect(headers.get('authorization'), location).toBeNull();
      expect(headers.get('cookie'), location).toBeNull();
      expect(headers.get('proxy-authorization'), location).toBeNull();
      expect(headers.get('x-keep'), location).toBe('yes');
    }
  });

  it('refuses what cannot be followed with SOCKPOOL_ERR_REDIRECT', () => {
    const refused = (hop: Hop, status: number, location: string, followed = 0) => {
      try {
        nextHop(hop, status, location, followed);
      } catch (error) {
        return (error as { code: string; message: string }).code;
      }
      return 'followed';
    };
    expect(refused(base, 302, '/x', MAX_REDIRECTS - 1)).toBe('followed');
    expect(refused(base, 302, '/x', MAX_REDIRECTS)).toBe('SOCKPOOL_ERR_REDIRECT');
    expect(refused(base, 302, 'http://[::1')).toBe('SOCKPOOL_ERR_REDIRECT');
    expect(refused(base, 302, 'ftp://a.test/file')).toBe('SOCKPOOL_ERR_REDIRECT');
    expect(refused(base, 302, 'javascript:alert(1)')).toBe('SOCKPOOL_ERR_REDIRECT');
    expect(refused(base, 302, 'http://user:pw@a.test/')).toBe('SOCKPOOL_ERR_REDIRECT');
    // A streamed body was read once: any redirect but a 303 fails, even one that would make it a GET.
    const streamed = { ...base, method: 'POST', body: stream() };
    expect(refused(streamed, 307, '/x')).toBe('SOCKPOOL_ERR_REDIRECT');
    expect(refused(streamed, 302, '/x')).toBe('SOCKPOOL_ERR_REDIRECT');
    expect(refused(streamed, 303, '/x')).toBe('followed');
  });
});

describe('redirectMode', () => {
  it('takes the three modes, falls back when none is given, and refuses anything else', () => {
    expect(redirectMode(undefined, 'manual')).toBe('manual');
    expect(redirectMode(undefined, 'follow')).toBe('follow');
    for (const mode of ['follow', 'manual', 'error'] as const) expect(redirectMode(mode, 'manual')).toBe(mode);
    for (const bad of ['FOLLOW', '', null, 1, {}]) {
      expect(() => redirectMode(bad, 'follow')).toThrow(
        expect.objectContaining({ code: 'SOCKPOOL_ERR_INVALID_ARGUMENT' }),
      );
    }
  });
});

describe('followRedirects', () => {
  /** A fake server: each URL's response, and the hops asked for, in order. */
  function serve(responses: Record<string, { status: number; location?: string }>) {
    const asked: string[] = [];
    const dropped: Array<[string, boolean]> = [];
    const send = async (hop: Hop) => {
      asked.push(`${hop.method} ${hop.url}`);
      const { status, location } = responses[hop.url] ?? { status: 200 };
      return {
        status,
        headers: location === undefined ? [] : ([['Location', location]] as Array<[string, string]>),
        url: hop.url,
      };
    };
    const drop = async (response: { url: string }, failed: boolean) => {
      dropped.push([response.url, failed]);
    };
    return { asked, dropped, send, drop };
  }

  it('follows to a response that is not a redirect, and says how many came before', async () => {
    const server = serve({
      'http://a.test/1': { status: 301, location: '/2' },
      'http://a.test/2': { status: 303, location: 'http://b.test/3' },
    });
    const { response, followed, hop } = await followRedirects(
      { ...base, url: 'http://a.test/1', method: 'POST', body: 'x' },
      'follow',
      server.send,
      server.drop,
    );
    expect(response.url).toBe('http://b.test/3');
    expect(followed).toBe(2);
    expect(hop.method).toBe('GET');
    expect(server.asked).toEqual(['POST http://a.test/1', 'GET http://a.test/2', 'GET http://b.test/3']);
    expect(server.dropped).toEqual([
      ['http://a.test/1', false],
      ['http://a.test/2', false],
    ]);
  });

  it('returns a redirect without a Location as it is, and fails any redirect in mode error', async () => {
    const server = serve({
      'http://a.test/bare': { status: 302 },
      'http://a.test/moved': { status: 301, location: '/' },
    });
    const bare = await followRedirects({ ...base, url: 'http://a.test/bare' }, 'follow', server.send, server.drop);
    expect(bare).toMatchObject({ followed: 0, response: { status: 302 } });
    await expect(
      followRedirects({ ...base, url: 'http://a.test/bare' }, 'error', server.send, server.drop),
    ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_REDIRECT', status: 302 });
    await expect(
      followRedirects({ ...base, url: 'http://a.test/moved' }, 'error', server.send, server.drop),
    ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_REDIRECT' });
    // A response that could not be followed is dropped as failed.
    expect(server.dropped).toEqual([
      ['http://a.test/bare', true],
      ['http://a.test/moved', true],
    ]);
  });

  it('stops a loop after MAX_REDIRECTS redirects, having asked MAX_REDIRECTS + 1 times', async () => {
    const server = serve({ 'http://a.test/loop': { status: 302, location: '/loop' } });
    await expect(
      followRedirects({ ...base, url: 'http://a.test/loop' }, 'follow', server.send, server.drop),
    ).rejects.toMatchObject({ code: 'SOCKPOOL_ERR_REDIRECT' });
    expect(server.asked).toHaveLength(MAX_REDIRECTS + 1);
  });
});
