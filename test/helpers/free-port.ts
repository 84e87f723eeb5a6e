// A TCP port free on 127.0.0.1 (or `host`) right now (bound with port 0, read, released), for a server a test starts in another
// process (a daemon's metrics port, redis-server, nginx). Another program could take it in between; tests live with
// that, as with any port they do not hold.
import { once } from 'node:events';
import { type AddressInfo, createServer } from 'node:net';

export async function freePort(host = '127.0.0.1'): Promise<number> {
  const server = createServer();
  server.listen(0, host);
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}
