// Streams both ways without holding a body in memory: downloads a URL into a file through fetch() (the response
// body is a ReadableStream), then uploads that file to another URL with PUT (the request body is a file stream).
//
//   SOCKPOOL_SOCKET=/run/sockpool/sockpoold.sock node_modules/.bin/node examples/stream.ts DOWNLOAD_URL FILE [UPLOAD_URL]
import { createReadStream, createWriteStream, statSync } from 'node:fs';
import process from 'node:process';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { SockpoolClient } from 'sockpool';

const [source, file, target] = process.argv.slice(2);
if (!source || !file) throw new Error('usage: node examples/stream.ts DOWNLOAD_URL FILE [UPLOAD_URL]');
const client = new SockpoolClient({ threads: 1, caFile: process.env.SOCKPOOL_CA_FILE });
try {
  const response = await client.fetch(source);
  if (!response.ok || !response.body) throw new Error(`GET ${source}: HTTP ${response.status}`);
  await pipeline(Readable.fromWeb(response.body), createWriteStream(file));
  console.log(`downloaded ${statSync(file).size} bytes to ${file}`);
  if (target) {
    const size = statSync(file).size;
    // A Node stream is an AsyncIterable of bytes: it goes out as the server takes it.
    const upload = await client.request(target, {
      method: 'PUT',
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) },
      body: createReadStream(file),
    });
    console.log(`uploaded to ${target}: HTTP ${upload.status} ${upload.body.toString()}`);
  }
} finally {
  await client.close();
}
