// One GET through sockpoold, printing what the response says about the connection it used.
//
//   SOCKPOOL_SOCKET=/run/sockpool/sockpoold.sock node_modules/.bin/node examples/get.ts https://example.com/
//
// SOCKPOOL_SOCKET: the daemon's socket (default: /run/sockpool/sockpoold.sock as root, else
// ./.sockpool/sockpoold.sock). SOCKPOOL_CA_FILE: a CA bundle for HTTPS (default: the system store).

import process from 'node:process';
import { SockpoolClient, SockpoolError } from 'sockpool';

const url = process.argv[2] ?? 'https://example.com/';
const client = new SockpoolClient({ threads: 1, caFile: process.env.SOCKPOOL_CA_FILE });
try {
  const response = await client.request(url, { timeoutMs: 10_000 });
  const { acquireMs, connectMs, tlsMs, ttfbMs, totalMs } = response.timings;
  console.log(
    `HTTP/${response.httpVersion} ${response.status}  connection=${response.connection} warm=${response.warm}`,
  );
  console.log(
    `timings ms: acquire ${acquireMs.toFixed(2)} connect ${connectMs.toFixed(2)} tls ${tlsMs.toFixed(2)} ` +
      `ttfb ${ttfbMs.toFixed(2)} total ${totalMs.toFixed(2)}`,
  );
  console.log(`${response.body.length} bytes: ${response.body.toString('utf8', 0, 200)}`);
} catch (error) {
  // Every failure has a stable code: SOCKPOOL_ERR_DAEMON_UNAVAILABLE, SOCKPOOL_ERR_POLICY, SOCKPOOL_ERR_TIMEOUT, ...
  if (error instanceof SockpoolError) console.error(`failed: ${error.code}: ${error.message}`);
  else throw error;
  process.exitCode = 1;
} finally {
  await client.close();
}
