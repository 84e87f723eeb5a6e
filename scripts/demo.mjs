#!/usr/bin/env node
// `npm run demo`: starts sockpoold on its embedded defaults (socket and SQLite state under ./.sockpool), plus the
// flags that let it reach one local origin (the default egress policy refuses loopback), starts that origin (a
// plain HTTP server on 127.0.0.1), and sends requests through a SockpoolClient: the first over a socket the
// daemon connected on demand, the next over a socket it had warmed. Then it prints the daemon's statistics and
// stops everything. Nothing leaves the machine.

import { spawn } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { SockpoolClient } from '../dist/client/index.js';

const root = join(import.meta.dirname, '..');
const stateDir = join(root, '.sockpool');
const socketPath = join(stateDir, 'demo.sock');
mkdirSync(stateDir, { recursive: true });

let connections = 0;
const origin = createServer((request, response) => {
  response.setHeader('content-type', 'text/plain');
  // A little server time, so that concurrent requests need connections of their own.
  setTimeout(() => response.end(`hello from the origin: ${request.method} ${request.url}\n`), 30);
});
origin.on('connection', () => connections++);
await new Promise((resolve) => origin.listen(0, '127.0.0.1', resolve));
const port = origin.address().port;
console.log(`origin: http://127.0.0.1:${port}/`);

const daemon = spawn(
  process.execPath,
  [
    join(root, 'dist', 'daemon', 'main.js'),
    '--socket',
    socketPath,
    '--state-dir',
    stateDir,
    '--allow',
    '127.0.0.1/32',
    '--allow-port',
    String(port),
    '--log-level',
    'warn',
  ],
  { stdio: ['ignore', 'inherit', 'inherit'] },
);
const daemonExit = new Promise((resolve) => daemon.on('exit', (code, signal) => resolve({ code, signal })));
console.log(`sockpoold: pid ${daemon.pid}, socket ${socketPath}, state ${stateDir}/sockpool.sqlite`);
for (let i = 0; i < 100 && !existsSync(socketPath); i++) await sleep(50);
if (!existsSync(socketPath)) throw new Error('sockpoold did not create its socket');

const client = new SockpoolClient({ socketPath, threads: 1 });
try {
  const url = `http://127.0.0.1:${port}/demo`;
  const first = await client.request(url);
  console.log(`request 1: ${first.status} ${JSON.stringify(first.body.toString().trim())}`);
  console.log(
    `           connection=${first.connection} warm=${first.warm} total ${first.timings.totalMs.toFixed(2)} ms`,
  );
  // The first request was alone in flight, so it ran in this thread (inlineWhenIdle). Three at once go to the
  // worker thread, whose curl has no connection yet: each takes one from the pool, warmed here beforehand.
  await client.prewarm([{ host: '127.0.0.1', port, count: 3 }]);
  await sleep(200);
  const concurrent = await Promise.all([1, 2, 3].map((n) => client.request(`${url}?n=${n}`)));
  for (const [index, response] of concurrent.entries()) {
    const n = index + 2;
    console.log(`request ${n}: ${response.status} connection=${response.connection} warm=${response.warm}`);
  }
  // Alone again: in this thread, over the keep-alive connection the first request left in its curl.
  const last = await client.request(`${url}?n=5`);
  console.log(`request 5: ${last.status} connection=${last.connection} warm=${last.warm}`);
  const stats = await client.stats();
  console.log(
    `daemon stats: idle ${stats.idle}, leased ${stats.leased}, hits ${stats.hits}, misses ${stats.misses}, ` +
      `origins ${stats.origins.length}`,
  );
  console.log(`the origin saw ${connections} TCP connection(s), every one opened by sockpoold`);
} finally {
  await client.close();
  daemon.kill('SIGTERM');
  const exit = await daemonExit;
  console.log(`sockpoold stopped (${exit.signal ?? `exit ${exit.code}`})`);
  origin.close();
}
