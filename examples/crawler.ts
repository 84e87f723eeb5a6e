// A small crawler: it tells the daemon which origins it is about to fetch (prewarm), so that their connections
// are open before the first request, then fetches every URL with requestStream(), a few at a time.
//
//   SOCKPOOL_SOCKET=/run/sockpool/sockpoold.sock node_modules/.bin/node examples/crawler.ts URL...
//
// Prints one line per URL (status, bytes, whether its connection was warm) and a summary.

import process from 'node:process';
import { SockpoolClient } from 'sockpool';

const urls = process.argv.slice(2).map((text) => new URL(text));
const concurrency = 8;
const client = new SockpoolClient({ threads: 2, caFile: process.env.SOCKPOOL_CA_FILE });

// One prewarm per origin, asking for as many connections as that origin's URLs could use at once.
const perOrigin = new Map<string, { host: string; port: number; count: number }>();
for (const url of urls) {
  const port = Number(url.port || (url.protocol === 'https:' ? 443 : 80));
  const host = url.hostname.replace(/^\[|\]$/g, '');
  const entry = perOrigin.get(`${host}:${port}`) ?? { host, port, count: 0 };
  entry.count = Math.min(entry.count + 1, concurrency);
  perOrigin.set(`${host}:${port}`, entry);
}
await client.prewarm([...perOrigin.values()]);

let warm = 0;
let failed = 0;
const queue = [...urls];
async function crawl(): Promise<void> {
  for (let url = queue.shift(); url; url = queue.shift()) {
    try {
      const started = performance.now();
      const response = await client.requestStream(url, { timeoutMs: 15_000 });
      let bytes = 0;
      for await (const chunk of response.body) bytes += chunk.length;
      if (response.warm) warm++;
      console.log(
        `${response.status} ${url.href} ${bytes} bytes warm=${response.warm} ${(performance.now() - started).toFixed(1)} ms`,
      );
    } catch (error) {
      failed++;
      console.log(`ERR ${url.href} ${(error as { code?: string }).code ?? (error as Error).message}`);
    }
  }
}
await Promise.all(Array.from({ length: concurrency }, crawl));
console.log(`done: ${urls.length} urls, ${warm} over warm connections, ${failed} failed`);
await client.close();
