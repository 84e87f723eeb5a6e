#!/usr/bin/env node
// `sockpoold`'s entry point. Its first act is to catch SIGHUP: loading the daemon's modules takes a few hundred
// milliseconds, and Node's default action for SIGHUP ends the process, so a reload sent while the daemon starts (an
// operator, a log rotation's hook) would kill it. A SIGHUP caught here is handed to the command, which reloads once
// the start has finished. SIGTERM keeps its default meanwhile: nothing is open yet that a stop would have to close.
// The command is imported dynamically: a static import would load every module before this line ran.
import process from 'node:process';

// The system resolver's lookups (getaddrinfo, without dns.servers) each hold one of libuv's threads until glibc
// answers or gives up, seconds for a name whose servers do not answer: with libuv's default of 4, four such names
// held up every other lookup of the daemon (test/daemon-threadpool). A larger pool, unless the operator chose a size
// (libuv runs getaddrinfo on at most half of it, and the resolver holds its lookups to that, fairly across uids:
// daemon/resolver.ts);
// libuv reads it at the pool's first use, which is later than this line. (The unit's TasksMax= leaves room for it:
// libuv aborts the process when it cannot start a thread of its pool.)
process.env.UV_THREADPOOL_SIZE ??= '32';

let reloadRequested = false;
const onEarlySighup = (): void => {
  reloadRequested = true;
};
process.on('SIGHUP', onEarlySighup);

const { runSockpoold } = await import('./command.js');
// runSockpoold installs its own SIGHUP handler before its first await: this one goes only after that, so SIGHUP is
// never left to its default action in between. (A JS signal handler runs on the event loop, never in that window.)
const running = runSockpoold({ reloadRequested });
process.off('SIGHUP', onEarlySighup);
await running;
