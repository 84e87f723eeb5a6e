#!/usr/bin/env node
// `sockpool`: a small command line over the daemon and the client: status, stats, warm, get.

import { readFileSync } from 'node:fs';
import process from 'node:process';
import { Command, InvalidArgumentError } from 'commander';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { parseOriginKey } from '../shared/origin.js';
import { MAX_PREWARM_COUNT } from '../shared/protocol.js';
import { DaemonLink } from '../worker/daemon-link.js';
import { tlsTrustOf } from '../worker/tls-trust.js';
import { urlTarget } from '../worker/url-target.js';
import { defaultSocketPath, SockpoolClient } from './client.js';

/**
 * A whole number written in decimal digits, from 1 to `max`. Number() alone takes "0x10", "1e3" and " 5", and
 * 1e300 is an integer to it: past what the option means, the client or the daemon refused it later, naming its own
 * API (maxBodyBytes; a SOCKPOOL_ERR_PROTOCOL for a count over the protocol's bound).
 */
function wholeNumber(max: number): (value: string) => number {
  return (value) => {
    const parsed = /^\d+$/.test(value) ? Number(value) : Number.NaN;
    if (!(parsed >= 1 && parsed <= max)) throw new InvalidArgumentError(`must be a whole number from 1 to ${max}`);
    return parsed;
  };
}

// stdout fails when its reader stops early (`sockpool get URL | head -c1`: EPIPE) or the disk is full (ENOSPC).
// Without a listener the stream's 'error' is an uncaught exception (a stack trace), and console.log drops it (exit
// 0, output lost): say so in one line and exit 1 instead.
process.stdout.on('error', (error: NodeJS.ErrnoException) => {
  console.error(`sockpool: cannot write to stdout: ${error.code ?? error.message}`);
  process.exit(1);
});

const program = new Command('sockpool')
  .description('Talk to sockpoold: status, statistics, warming, and one request through the pool')
  .option('--socket <path>', 'sockpoold socket', defaultSocketPath())
  .showHelpAfterError();

function invalidArgument(message: string): SockpoolError {
  return new SockpoolError(ErrorCodes.INVALID_ARGUMENT, message);
}

function socketPath(): string {
  return program.opts<{ socket: string }>().socket;
}

async function withLink<T>(action: (link: DaemonLink) => Promise<T>): Promise<T> {
  const link = new DaemonLink({ socketPath: socketPath(), clientName: 'sockpool-cli' });
  try {
    return await action(link);
  } finally {
    link.close();
  }
}

program
  .command('status')
  .description('one line: is the daemon up, and what it holds')
  .action(async () => {
    const stats = (await withLink((link) => link.stats())) as {
      view?: 'all' | 'uid';
      uid?: number;
      idle: number;
      leased: number;
      origins: unknown[];
      originCount?: number;
      hitRate: number;
      clients?: number;
      own?: { sessions: number; leases: number; pending: number };
      fleet?: { name: string; state: string; members: number; heldSlots: number; fallbackSlots: number };
    };
    // A client that is not an admin sees its own uid's origins only (docs/security.md): the line says so.
    const whose =
      stats.view === 'uid'
        ? `uid ${stats.uid}'s origins ${stats.originCount ?? stats.origins.length}: idle ${stats.idle}, ` +
          `leased ${stats.leased}, hit rate ${(stats.hitRate * 100).toFixed(1)}%, your connections ${stats.own?.sessions}`
        : `idle ${stats.idle}, leased ${stats.leased}, origins ${stats.originCount ?? stats.origins.length}, ` +
          `hit rate ${(stats.hitRate * 100).toFixed(1)}%, clients ${stats.clients}`;
    // A fleet member (docs/fleet.md): its Redis state, the members it sees, the fleet slots it holds.
    const fleet = stats.fleet
      ? `; fleet ${stats.fleet.name}: ${stats.fleet.state}, ${stats.fleet.members} members, ` +
        `${stats.fleet.heldSlots} slots held` +
        (stats.fleet.fallbackSlots > 0 ? `, ${stats.fleet.fallbackSlots} local decisions` : '')
      : '';
    console.log(`sockpoold up at ${socketPath()}: ${whose}${fleet}`);
  });

program
  .command('stats')
  .description("pool statistics per origin (an admin uid sees every origin; any other uid its own uid's)")
  .option('--json', 'print JSON')
  .action(async (options: { json?: boolean }) => {
    const stats = await withLink((link) => link.stats());
    if (options.json) {
      console.log(JSON.stringify(stats, null, 2));
      return;
    }
    const { origins, ...totals } = stats as { origins: Array<Record<string, unknown>> };
    console.log(
      Object.entries(totals)
        .map(([key, value]) => `${key}=${JSON.stringify(value)}`)
        .join(' '),
    );
    for (const origin of origins) {
      console.log(
        `${String(origin.origin).padEnd(40)} idle ${origin.idle} leased ${origin.leased} ` +
          `hits ${origin.hits} misses ${origin.misses} rate ${origin.demandRatePerS}/s${sharedCapText(origin.sharedCap)}`,
      );
    }
  });

/**
 * A row's `sharedCap` (an origin reached more ways than one: directly, as warm TLS, through proxies), for the table:
 * the row's own idle and leased are one way's, while the acquires of every way wait at this one cap.
 */
function sharedCapText(sharedCap: unknown): string {
  if (typeof sharedCap !== 'object' || sharedCap === null) return '';
  const { connections, maxPerOrigin, waiting } = sharedCap as Record<string, unknown>;
  return `; shared cap: ${connections}/${maxPerOrigin} connections over all ways, ${waiting} waiting`;
}

program
  .command('warm')
  .description(
    'ask the daemon to open N idle connections to ORIGIN (host:port, or an http(s):// URL); for https, warm TLS ' +
      "sessions where the daemon keeps them (admin uids only: root, the daemon's uid, access.adminUids)",
  )
  .argument('<origin>', 'host:port or URL')
  .argument('[count]', 'how many', wholeNumber(MAX_PREWARM_COUNT), 1)
  .option('--cacert <file>', 'https: the CA file the requests to come will verify against (default: the system store)')
  .action(async (originText: string, count: number, options: { cacert?: string }) => {
    // --cacert means nothing without https, and tlsTrustOf answers "no trust" (TCP warming) for a CA file it cannot
    // read: the operator was told "warming" for something else than asked.
    if (options.cacert !== undefined) {
      if (!/^https:\/\//i.test(originText)) {
        throw invalidArgument(`--cacert applies to an https:// URL, not to ${JSON.stringify(originText)}`);
      }
      try {
        readFileSync(options.cacert);
      } catch (error) {
        throw invalidArgument(`--cacert ${options.cacert}: cannot read it (${(error as NodeJS.ErrnoException).code})`);
      }
    }
    let origin: { host: string; port: number };
    let tls: { trust: string } | undefined;
    if (/^https?:\/\//i.test(originText)) {
      const target = urlTarget(originText);
      origin = target.origin;
      const trust = target.secure ? tlsTrustOf({ caFile: options.cacert }) : undefined;
      tls = trust === undefined ? undefined : { trust };
    } else {
      origin = parseOriginKey(originText);
    }
    const { warming, granted } = await withLink((link) => link.warm(origin.host, origin.port, count, undefined, tls));
    // The daemon brings the origin's idle sockets up to `count`, within what its idle pool can keep (the origin's
    // maxIdle, the global idle cap): the operator is told how many it connects, not the count asked for.
    const fewer = granted !== undefined && granted < count;
    const how = fewer ? `${granted} more` : `${count}`;
    const room = fewer
      ? ` (of the ${count} asked for, the rest are idle already or past what the idle pool keeps)`
      : '';
    if (warming === 'tls') console.log(`warming ${how} TLS session(s) to ${originText}${room}`);
    else if (tls) {
      // The daemon keeps no TLS sessions for this origin (warm TLS off for it, or trusting another CA than --cacert).
      console.log(
        `warming ${how} TCP connection(s) to ${originText}${room} (the daemon keeps no TLS sessions for it that ` +
          'verify as asked: requests will handshake themselves)',
      );
    } else console.log(`warming ${how} connection(s) to ${originText}${room}`);
  });

program
  .command('get')
  .description('run one GET through the pool and print the body')
  .argument('<url>')
  .option('-v, --verbose', 'print status, timings and whether the connection was warm (on stderr)')
  .option('--cacert <file>', 'CA bundle for HTTPS')
  .option('-k, --insecure', 'skip TLS verification')
  .option('-L, --location', 'follow redirects (each hop through the daemon, as fetch() does)')
  .option('--compressed', 'ask for a compressed body and print it decoded')
  .option(
    '--max-filesize <bytes>',
    'fail (printing nothing) when the body, decoded, is larger',
    wholeNumber(Number.MAX_SAFE_INTEGER),
  )
  .action(
    async (
      url: string,
      options: {
        verbose?: boolean;
        cacert?: string;
        insecure?: boolean;
        location?: boolean;
        compressed?: boolean;
        maxFilesize?: number;
      },
    ) => {
      // One request: it runs in this thread (a worker thread would only add its start-up).
      const client = new SockpoolClient({
        socketPath: socketPath(),
        threads: 0,
        caFile: options.cacert,
        insecure: options.insecure,
      });
      try {
        const response = await client.request(url, {
          redirect: options.location ? 'follow' : 'manual',
          decompress: options.compressed === true,
          maxBodyBytes: options.maxFilesize,
        });
        if (options.verbose) {
          const t = response.timings;
          const redirected = response.redirected ? ` (redirected: ${response.url})` : '';
          console.error(
            `< HTTP/${response.httpVersion} ${response.status}${redirected}  warm=${response.warm} connection=${response.connection}\n` +
              `* timings ms: acquire ${t.acquireMs.toFixed(2)} connect ${t.connectMs.toFixed(2)} ` +
              `tls ${t.tlsMs.toFixed(2)} ttfb ${t.ttfbMs.toFixed(2)} total ${t.totalMs.toFixed(2)}`,
          );
        }
        process.stdout.write(response.body);
      } finally {
        await client.close();
      }
    },
  );

program.parseAsync().catch((error: Error & { code?: string }) => {
  console.error(`sockpool: ${error.code ?? 'error'}: ${error.message}`);
  process.exitCode = 1;
});
