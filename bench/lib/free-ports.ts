// Ports free on every local address right now, for a benchmark's origins: two runs at once (or a port some other
// program holds) no longer collide on fixed numbers. Each is bound on the wildcard address with port 0, all at once
// (so they differ), then released for the origin to take; between the two another program could take one, which a
// benchmark on a quiet machine can live with.
import { once } from 'node:events';
import { createServer, type Server } from 'node:net';

export async function freePorts(count: number): Promise<number[]> {
  const servers: Server[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const server = createServer();
      servers.push(server);
      server.listen(0, '0.0.0.0');
      await once(server, 'listening');
    }
    return servers.map((server) => (server.address() as { port: number }).port);
  } finally {
    await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))));
  }
}
