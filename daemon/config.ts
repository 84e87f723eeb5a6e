// The sockpoold configuration: one zod schema (strict objects: an unknown key is an error, not a silent no-op),
// every default in DEFAULTS below, and the TypeScript types inferred from the schema. docs/config.md documents
// each key with the same sections; test/config.test.ts checks that every key has its section and that the
// defaults stated there are the ones here.
//
// Sources, weakest first: DEFAULTS, the config file (TOML or JSON, camelCase keys), command-line flags
// (`applyFlags`). `policyFor` resolves the per-origin policy from `pool.defaults` and the `pool.origins` overrides.
//
// Entries made of addresses and host names (CIDRs, host patterns, DNS servers, `--resolve` entries, `pool.origins`
// matches) are parsed here, once, by shared/address.ts into typed values: the egress policy and the resolver take
// `config.egress` and `config.dns` as they are. `configInput` turns a parsed configuration back into input.

import { Buffer } from 'node:buffer';
import { readFileSync } from 'node:fs';
import { dirname, extname, resolve } from 'node:path';
import process from 'node:process';
import { parse as parseToml, TomlError } from 'smol-toml';
import { type core, z } from 'zod';
import {
  canonicalHost,
  hostMatches,
  type OriginMatch,
  parseCidr,
  parseDnsServer,
  parseHostPattern,
  parseNat64Prefix,
  parseOriginMatch,
  parseResolveEntry,
  parseStrictIp,
} from '../shared/address.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { PROXY_NAME } from '../shared/origin.js';
import { MAX_TIMER_MS } from '../shared/timers.js';
import { MAX_ATTEMPT_DELAY_MS, MIN_ATTEMPT_DELAY_MS } from './happy-eyeballs.js';

// ---------------------------------------------------------------------------------------------------------------
// Defaults: the one place they live.

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** True when sockpoold runs as root: then its socket and state go to the system directories. */
function runningAsRoot(): boolean {
  return process.getuid?.() === 0;
}

/**
 * The default of tls.relayHangMs: how long a relay thread's heartbeat (tls-relay-thread.ts: bumped every second
 * while its event loop turns, and read as often) may stand still before the watchdog (tls-relay.ts) takes the
 * thread for hung: a thread whose loop stalls for up to this less 2 s (a beat, a check) is never taken. Safe
 * against a thread that is only busy: its longest stretch without a beat is one callback, each of them short. The
 * heaviest, a handshake's key exchange and certificate checks, costs a millisecond or two of CPU for an honest
 * origin (a hostile one can make it hundreds: its chain is checked in one callback, and the thread beats after each
 * handshake's checks too, as a turn may run all HANDSHAKES_PER_THREAD of them together), plus a TLS
 * context built from a CA file (tens of ms for a full bundle, once per file) and one read's worth of bytes per
 * session relayed. The limit counts the thread's available time, not wall time (relay-clock.ts: wall time less what
 * it waited for a CPU, the wait still under way too): at the relay's nice 10 against busy nice-0 threads a hostile
 * origin's one handshake (~330 ms of CPU) took seconds of wall time, and the starved thread was taken for hung; its
 * wait no longer counts. A stop of the whole process (SIGSTOP, a debugger on the main thread) is not taken for a
 * hang: a check that comes late (the main thread did not run either) starts every thread's count over. A thread's start (a new isolate, its modules
 * loaded, the addon opened) takes a fraction of a second of its CPU: one that has not beaten this long after it was
 * started, in its available time too (a start kept waiting for a CPU is not a hang), is taken for hung while starting.
 */
export const RELAY_HANG_LIMIT_MS = 5_000;
/** The longest tls.relayHangMs: a relay thread silent for 10 minutes has long stalled every session it held. */
export const MAX_RELAY_HANG_MS = 600_000;
/** The shortest tls.relayHangMs but 0 (off): a beat and a check (a second each) and a second of slack. */
export const MIN_RELAY_HANG_MS = 3_000;

export const DEFAULTS = {
  socket: (): string =>
    runningAsRoot() ? '/run/sockpool/sockpoold.sock' : resolve(process.cwd(), '.sockpool', 'sockpoold.sock'),
  stateDir: (): string => (runningAsRoot() ? '/var/lib/sockpool' : resolve(process.cwd(), '.sockpool')),
  logLevel: 'info' as LogLevel,
  metricsPort: 0,
  metricsHost: '127.0.0.1',
  metricsPerOrigin: false,
  restrictBind: true,
  connectGuard: true,
  realtimePriority: 0,
  access: {
    socketMode: '0660',
    allowUids: [] as number[],
    allowGids: [] as number[],
    adminUids: [] as number[],
    maxLeasesPerClient: 1024,
    maxPendingPerClient: 256,
    maxBadMessages: 10,
    acceptClientFds: false,
  },
  quotas: {
    maxSessionsPerUid: 64,
    maxLeasesPerUid: 4096,
    maxPendingPerUid: 1024,
    maxLookupsPerUid: 256,
    maxPrewarmPerUid: 512,
    maxStatsPerUid: 10,
    // Idle sockets kept for one uid (released unused, kept for it alone: its client may hold a copy), in all pools.
    // An honest client releases unused only now and then (a cancelled request, a connection its cache did not
    // need): a crawler's queue announcing 64 origins, with a few such sockets at each, keeps a few hundred. A
    // tenth of pool.maxIdleTotal: one uid cannot fill the global idle budget and push the shared sockets out.
    maxKeptPerUid: 1_000,
    maxConnectsInFlight: 512,
    maxLeaseMs: 0,
  },
  egress: {
    allow: [] as string[],
    deny: [] as string[],
    allowPorts: [80, 443],
    allowHosts: [] as string[],
    denyHosts: [] as string[],
    allowHostAddresses: false,
    nat64Prefixes: [] as string[],
  },
  dns: {
    servers: [] as string[],
    minTtlMs: 1_000,
    maxTtlMs: 300_000,
    negativeTtlMs: 5_000,
    timeoutMs: 3_000,
    resolve: [] as string[],
  },
  tls: {
    warm: [] as string[],
    relayThreads: 1,
    handshakeTimeoutMs: 10_000,
    relayHangMs: RELAY_HANG_LIMIT_MS,
  },
  pool: {
    maxIdleTotal: 10_000,
    predictive: true,
    predictiveWindowMs: 10_000,
    warmOnStartOrigins: 50,
    warmOnStartSockets: 200,
    statsFlushMs: 2_000,
    historyMaxOrigins: 100_000,
    defaults: {
      minIdle: 0,
      maxIdle: 16,
      maxPerOrigin: 256,
      idleTtlMs: 60_000,
      connectTimeoutMs: 5_000,
      connectAttemptDelayMs: 250,
      maxRacingAttempts: 8,
      acquireTimeoutMs: 10_000,
      noDelay: true,
      keepAlive: { enabled: true, idleSec: 30, intervalSec: 10, count: 3 },
      warmTls: false,
      warmTlsOnMiss: 'session' as WarmTlsOnMiss,
    },
  },
  fleet: {
    name: 'default',
    onUnavailable: 'local' as FleetUnavailableMode,
    shareWarming: false,
    heartbeatMs: 1_000,
    slotTtlMs: 5_000,
    demandPublishMs: 5_000,
  },
};

export const FLEET_UNAVAILABLE_MODES = ['local', 'refuse'] as const;
export type FleetUnavailableMode = (typeof FLEET_UNAVAILABLE_MODES)[number];
/**
 * What an https acquire of a warm TLS origin gets when no session is idle for it: 'session', a session under way
 * or one made for it (the daemon's handshake, relayed); 'tcp', a TCP lease at once, over which the client does TLS
 * itself (no relay for the connection's life; never for an origin with a client certificate).
 */
export const WARM_TLS_ON_MISS = ['session', 'tcp'] as const;
export type WarmTlsOnMiss = (typeof WARM_TLS_ON_MISS)[number];

// ---------------------------------------------------------------------------------------------------------------
// Schema.

const port = z.int().min(1).max(65535);
// The longest duration a key may have is the longest timer (shared/timers.ts): quotas.maxLeaseMs = 3e9 ended every
// lease at once.
const maxDuration = { error: `must be at most ${MAX_TIMER_MS} ms (about 24.8 days, the longest timer Node has)` };
/** A duration in ms from `min` (1 unless said) up to MAX_TIMER_MS. */
const durationMs = (min = 1) => z.int().min(min).max(MAX_TIMER_MS, maxDuration);
const positiveMs = durationMs();
/**
 * The longest connectTimeoutMs. Linux gives up a SYN unanswered after tcp_syn_retries (6 by default: about 127 s;
 * 7, about 255 s): a longer deadline is none, and an attempt that long holds a place at maxConnectsInFlight.
 */
export const MAX_CONNECT_TIMEOUT_MS = 300_000;
/**
 * The longest dns.timeoutMs. A resolution holds the acquire (and a place in its uid's maxLookupsPerUid) that long;
 * glibc's resolver allows at most 30 s per try (RES_MAXRETRANS). A name no server answers within a minute is dead.
 */
export const MAX_DNS_TIMEOUT_MS = 60_000;
/** The longest dns.minTtlMs and maxTtlMs: 7 days, the cap RFC 8767 §4 suggests (BIND's max-cache-ttl default). */
export const MAX_DNS_TTL_MS = 604_800_000;
/**
 * The longest dns.negativeTtlMs: 3 hours. RFC 2308 §5: one to three hours work well, more than a day has proved
 * problematic (a name created meanwhile stays unknown that long); BIND's max-ncache-ttl default.
 */
export const MAX_NEGATIVE_TTL_MS = 10_800_000;
/**
 * The longest tls.handshakeTimeoutMs. A handshake holds one of a relay thread's 20 handshake places (the others
 * queue behind it) and the acquire waiting for it; a server that has not finished one in a minute never will.
 */
export const MAX_TLS_HANDSHAKE_TIMEOUT_MS = 60_000;
/**
 * The largest pool.historyMaxOrigins: the history's origins are held in the daemon's memory too (those not yet
 * written, and every learned idle lifetime, loaded at start), and warm-on-start ranks the whole table.
 */
export const MAX_HISTORY_ORIGINS = 1_000_000;
/** A duration in ms from `min` up to `max`, whose refusal says why (`why`). */
const boundedMs = (min: number, max: number, why: string) =>
  z
    .int()
    .min(min)
    .max(max, { error: `must be at most ${max} ms (${why})` });
/**
 * A string entry parsed by one of shared/address.ts's parsers into its typed value; a refusal becomes an issue
 * saying what is expected, the entry, and why.
 */
function parsedEntry<T>(parse: (text: string) => T, expected: string) {
  return z.string().transform((text, ctx): T => {
    try {
      return parse(text);
    } catch (error) {
      const why = error instanceof SockpoolError ? String(error.fields.reason) : String(error);
      ctx.addIssue({ code: 'custom', message: `${expected}, got ${JSON.stringify(text)} (${why})` });
      return z.NEVER;
    }
  });
}

const ipAddress = parsedEntry(parseStrictIp, 'expected an IPv4 or IPv6 address').transform((ip) => ip.text);
const userOrGroup = z.union([
  z.int().min(0).max(0xffffffff),
  z
    .string()
    .regex(/^(?:\d+|[A-Za-z_][A-Za-z0-9_.-]*\$?)$/, 'expected a user or group name or a numeric id')
    .transform((text) => (/^\d+$/.test(text) ? Number(text) : text)),
]);
const cidr = parsedEntry(parseCidr, 'expected a CIDR such as "10.0.0.0/8" or "2001:db8::/32"');
const hostPattern = parsedEntry(parseHostPattern, 'expected a host name, an IP address, "*.suffix" or "*"');
const nat64Prefix = parsedEntry(
  parseNat64Prefix,
  'expected an IPv6 prefix of length 32, 40, 48, 56, 64 or 96, such as "2001:db8:64::/96"',
);
/** `http://host:port` of a forward proxy: no credentials, path, query or other scheme. */
export function parseProxyUrl(text: string): { host: string; port: number } | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return undefined;
  }
  const bare = url.username === '' && url.password === '' && url.search === '' && url.hash === '';
  if (url.protocol !== 'http:' || !bare || (url.pathname !== '/' && url.pathname !== '')) return undefined;
  const host = canonicalHost(url.hostname);
  const port = url.port === '' ? 80 : Number(url.port);
  // (The URL parser takes port 0, which nothing can connect to; every other port of the configuration refuses it.)
  return port === 0 ? undefined : { host, port };
}
const proxySchema = z.strictObject({
  name: z.string().regex(PROXY_NAME, 'expected a name of letters, digits, ".", "_" and "-" (at most 63)'),
  url: z.string().refine((text) => parseProxyUrl(text) !== undefined, {
    error: 'expected http://host:port (a port of 1 to 65535; no credentials, path or other scheme)',
  }),
});
const dnsServer = parsedEntry(
  parseDnsServer,
  'expected an IP address, optionally with a port: "1.1.1.1", "1.1.1.1:53" or "[2606:4700::1111]:53"',
);
const resolveEntry = parsedEntry(
  parseResolveEntry,
  'expected HOST:PORT:ADDR[,ADDR]... such as "example.com:443:192.0.2.10" (IPv6 in brackets: "[2001:db8::10]")',
);
// Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', no whitespace.
const deviceName = z.string().regex(/^[^/\s:]{1,15}$/, 'expected a network interface name of 1 to 15 characters');

const keepAliveDefaults = DEFAULTS.pool.defaults.keepAlive;
const keepAliveFields = {
  enabled: z.boolean(),
  // Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s and TCP_KEEPCNT at 127.
  idleSec: z.int().min(1).max(32767),
  intervalSec: z.int().min(1).max(32767),
  count: z.int().min(1).max(127),
};
const keepAliveSchema = z
  .strictObject({
    enabled: keepAliveFields.enabled.default(keepAliveDefaults.enabled),
    idleSec: keepAliveFields.idleSec.default(keepAliveDefaults.idleSec),
    intervalSec: keepAliveFields.intervalSec.default(keepAliveDefaults.intervalSec),
    count: keepAliveFields.count.default(keepAliveDefaults.count),
  })
  .prefault({});

const policyFields = {
  minIdle: z.int().min(0),
  maxIdle: z.int().min(0),
  maxPerOrigin: z.int().min(1),
  idleTtlMs: positiveMs,
  connectTimeoutMs: z
    .int()
    .min(1)
    .max(MAX_CONNECT_TIMEOUT_MS, { error: `must be at most ${MAX_CONNECT_TIMEOUT_MS} ms (5 minutes)` }),
  // RFC 8305 §8: from 100 ms to 2 s. Past 2 s a preferred family that drops packets holds up every connect to a host
  // (until a race teaches the other family) for that long.
  connectAttemptDelayMs: z
    .int()
    .min(MIN_ATTEMPT_DELAY_MS)
    .max(MAX_ATTEMPT_DELAY_MS, { error: `must be at most ${MAX_ATTEMPT_DELAY_MS} ms (RFC 8305 §8)` }),
  maxRacingAttempts: z.int().min(0),
  acquireTimeoutMs: positiveMs,
  sourceAddress: ipAddress,
  mark: z.int().min(0).max(0xffffffff),
  device: deviceName,
  noDelay: z.boolean(),
  userTimeoutMs: durationMs(0),
  warmTls: z.boolean(),
  warmTlsOnMiss: z.enum(WARM_TLS_ON_MISS),
  caFile: z.string().min(1),
  clientCert: z.string().min(1),
  clientKey: z.string().min(1),
  // Fleet-wide (daemon/fleet/): connections to the origin from every daemon of the fleet together.
  maxPerOriginFleet: z.int().min(1),
  // Politeness: requests per second to the origin (a fleet's together, or this daemon's alone), GCRA with `burst`.
  requestsPerSecond: z.number().positive().max(1_000_000),
  burst: z.int().min(1).max(1_000_000),
};

const policyDefaults = DEFAULTS.pool.defaults;
const originPolicySchema = z
  .strictObject({
    minIdle: policyFields.minIdle.default(policyDefaults.minIdle),
    // Default: DEFAULTS' maxIdle, or maxPerOrigin when that is lower (setting only maxPerOrigin is never an error).
    maxIdle: policyFields.maxIdle.optional(),
    maxPerOrigin: policyFields.maxPerOrigin.default(policyDefaults.maxPerOrigin),
    idleTtlMs: policyFields.idleTtlMs.default(policyDefaults.idleTtlMs),
    connectTimeoutMs: policyFields.connectTimeoutMs.default(policyDefaults.connectTimeoutMs),
    connectAttemptDelayMs: policyFields.connectAttemptDelayMs.default(policyDefaults.connectAttemptDelayMs),
    maxRacingAttempts: policyFields.maxRacingAttempts.default(policyDefaults.maxRacingAttempts),
    acquireTimeoutMs: policyFields.acquireTimeoutMs.default(policyDefaults.acquireTimeoutMs),
    sourceAddress: policyFields.sourceAddress.optional(),
    mark: policyFields.mark.optional(),
    device: policyFields.device.optional(),
    noDelay: policyFields.noDelay.default(policyDefaults.noDelay),
    keepAlive: keepAliveSchema,
    userTimeoutMs: policyFields.userTimeoutMs.optional(),
    warmTls: policyFields.warmTls.default(policyDefaults.warmTls),
    warmTlsOnMiss: policyFields.warmTlsOnMiss.default(policyDefaults.warmTlsOnMiss),
    caFile: policyFields.caFile.optional(),
    clientCert: policyFields.clientCert.optional(),
    clientKey: policyFields.clientKey.optional(),
    maxPerOriginFleet: policyFields.maxPerOriginFleet.optional(),
    requestsPerSecond: policyFields.requestsPerSecond.optional(),
    burst: policyFields.burst.optional(),
  })
  .transform(({ maxIdle, ...policy }) => ({
    ...policy,
    maxIdle: maxIdle ?? Math.min(policyDefaults.maxIdle, policy.maxPerOrigin),
  }))
  .prefault({});

const originOverrideSchema = z.strictObject({
  match: parsedEntry(
    parseOriginMatch,
    'expected "host:port", "*.suffix:port", "*:port" or "[v6]:port" (port may be "*")',
  ),
  minIdle: policyFields.minIdle.optional(),
  maxIdle: policyFields.maxIdle.optional(),
  maxPerOrigin: policyFields.maxPerOrigin.optional(),
  idleTtlMs: policyFields.idleTtlMs.optional(),
  connectTimeoutMs: policyFields.connectTimeoutMs.optional(),
  connectAttemptDelayMs: policyFields.connectAttemptDelayMs.optional(),
  maxRacingAttempts: policyFields.maxRacingAttempts.optional(),
  acquireTimeoutMs: policyFields.acquireTimeoutMs.optional(),
  sourceAddress: policyFields.sourceAddress.optional(),
  mark: policyFields.mark.optional(),
  device: policyFields.device.optional(),
  noDelay: policyFields.noDelay.optional(),
  keepAlive: z
    .strictObject({
      enabled: keepAliveFields.enabled.optional(),
      idleSec: keepAliveFields.idleSec.optional(),
      intervalSec: keepAliveFields.intervalSec.optional(),
      count: keepAliveFields.count.optional(),
    })
    .optional(),
  userTimeoutMs: policyFields.userTimeoutMs.optional(),
  warmTls: policyFields.warmTls.optional(),
  warmTlsOnMiss: policyFields.warmTlsOnMiss.optional(),
  caFile: policyFields.caFile.optional(),
  clientCert: policyFields.clientCert.optional(),
  clientKey: policyFields.clientKey.optional(),
  maxPerOriginFleet: policyFields.maxPerOriginFleet.optional(),
  requestsPerSecond: policyFields.requestsPerSecond.optional(),
  burst: policyFields.burst.optional(),
});

/** A `tls.warm` entry: `*` (every https origin) or an origin match pattern as in `pool.origins[].match`. */
const warmTlsEntry = parsedEntry(
  (text): OriginMatch =>
    text.trim() === '*' ? { host: { kind: 'any', text: '*' }, port: undefined, text: '*' } : parseOriginMatch(text),
  'expected "*" or "host:port", "*.suffix:port", "*:port", "[v6]:port" (port may be "*")',
);

const accessDefaults = DEFAULTS.access;
const quotaDefaults = DEFAULTS.quotas;
const egressDefaults = DEFAULTS.egress;
const dnsDefaults = DEFAULTS.dns;
const poolDefaults = DEFAULTS.pool;
const tlsDefaults = DEFAULTS.tls;
const fleetDefaults = DEFAULTS.fleet;

/**
 * `redis://[user:password@]host[:port][/db]` (or `rediss://` for TLS): where the fleet's shared state lives. No
 * query or fragment: every option of the connection is sockpool's own.
 */
export function parseRedisUrl(text: string): { host: string; port: number; db: number; tls: boolean } | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return undefined;
  }
  if ((url.protocol !== 'redis:' && url.protocol !== 'rediss:') || url.hostname === '') return undefined;
  if (url.search !== '' || url.hash !== '') return undefined;
  const path = url.pathname.replace(/^\//, '');
  if (path !== '' && !/^\d{1,2}$/.test(path)) return undefined;
  const port = url.port === '' ? 6379 : Number(url.port);
  if (port === 0) return undefined;
  return {
    host: url.hostname.replace(/^\[(.*)\]$/, '$1'),
    port,
    db: path === '' ? 0 : Number(path),
    tls: url.protocol === 'rediss:',
  };
}

export const configSchema = z
  .strictObject({
    socket: z.string().min(1).default(DEFAULTS.socket),
    stateDir: z.string().min(1).default(DEFAULTS.stateDir),
    logLevel: z.enum(LOG_LEVELS).default(DEFAULTS.logLevel),
    metricsPort: z.int().min(0).max(65535).default(DEFAULTS.metricsPort),
    metricsHost: ipAddress.default(DEFAULTS.metricsHost),
    // The per-origin gauges name every uid's origins to whoever reaches the endpoint: only when asked for.
    metricsPerOrigin: z.boolean().default(DEFAULTS.metricsPerOrigin),
    // Landlock: TCP binds only to port 0 and metricsPort (bind-restriction.ts); applied by sockpoold's entry point.
    restrictBind: z.boolean().default(DEFAULTS.restrictBind),
    // cgroup BPF: no connect() of a socket the daemon connected, after its own (connect-guard.ts); set up by
    // sockpoold's entry point where it has CAP_BPF and CAP_NET_ADMIN.
    connectGuard: z.boolean().default(DEFAULTS.connectGuard),
    // SCHED_RR for the main thread at this priority, 0 for none (realtime.ts); applied by sockpoold's entry point.
    realtimePriority: z.int().min(0).max(99).default(DEFAULTS.realtimePriority),
    access: z
      .strictObject({
        socketMode: z
          .string()
          .regex(/^0?[0-7]{3}$|^[0-7]{4}$/, 'expected an octal mode as a string, such as "0660"')
          .transform((text) => text.padStart(4, '0'))
          .default(accessDefaults.socketMode),
        socketOwner: userOrGroup.optional(),
        socketGroup: userOrGroup.optional(),
        allowUids: z.array(z.int().min(0).max(0xffffffff)).default(() => [...accessDefaults.allowUids]),
        allowGids: z.array(z.int().min(0).max(0xffffffff)).default(() => [...accessDefaults.allowGids]),
        // Besides root and the daemon's own uid: who sees every origin in stats and may warm any origin.
        adminUids: z.array(z.int().min(0).max(0xffffffff)).default(() => [...accessDefaults.adminUids]),
        maxLeasesPerClient: z.int().min(1).default(accessDefaults.maxLeasesPerClient),
        maxPendingPerClient: z.int().min(1).default(accessDefaults.maxPendingPerClient),
        maxBadMessages: z.int().min(0).default(accessDefaults.maxBadMessages),
        // Off: the kernel refuses any fd a client sends (SO_PASSRIGHTS); on: the daemon takes them and discards
        // what it did not ask for, as it must on kernels before 6.16 (daemon/daemon.ts #refuseClientFds).
        acceptClientFds: z.boolean().default(accessDefaults.acceptClientFds),
      })
      .prefault({}),
    quotas: z
      .strictObject({
        maxSessionsPerUid: z.int().min(1).default(quotaDefaults.maxSessionsPerUid),
        maxLeasesPerUid: z.int().min(1).default(quotaDefaults.maxLeasesPerUid),
        maxPendingPerUid: z.int().min(1).default(quotaDefaults.maxPendingPerUid),
        maxLookupsPerUid: z.int().min(1).default(quotaDefaults.maxLookupsPerUid),
        maxPrewarmPerUid: z.int().min(0).default(quotaDefaults.maxPrewarmPerUid),
        maxStatsPerUid: z.int().min(1).default(quotaDefaults.maxStatsPerUid),
        // At least 1: the socket a release just kept is never the one its bound closes (kept-sockets.ts).
        maxKeptPerUid: z.int().min(1).default(quotaDefaults.maxKeptPerUid),
        maxConnectsInFlight: z.int().min(1).default(quotaDefaults.maxConnectsInFlight),
        // 0: leases last until the client ends them.
        maxLeaseMs: durationMs(0).default(quotaDefaults.maxLeaseMs),
      })
      .prefault({}),
    egress: z
      .strictObject({
        allow: z.array(cidr).prefault(() => [...egressDefaults.allow]),
        deny: z.array(cidr).prefault(() => [...egressDefaults.deny]),
        // An empty list allows every port (as the egress policy reads it).
        allowPorts: z.array(port).default(() => [...egressDefaults.allowPorts]),
        allowHosts: z.array(hostPattern).prefault(() => [...egressDefaults.allowHosts]),
        denyHosts: z.array(hostPattern).prefault(() => [...egressDefaults.denyHosts]),
        allowHostAddresses: z.boolean().default(egressDefaults.allowHostAddresses),
        nat64Prefixes: z.array(nat64Prefix).prefault(() => [...egressDefaults.nat64Prefixes]),
      })
      .prefault({}),
    dns: z
      .strictObject({
        servers: z.array(dnsServer).prefault(() => [...dnsDefaults.servers]),
        minTtlMs: boundedMs(0, MAX_DNS_TTL_MS, '7 days, RFC 8767').default(dnsDefaults.minTtlMs),
        maxTtlMs: boundedMs(0, MAX_DNS_TTL_MS, '7 days, RFC 8767').default(dnsDefaults.maxTtlMs),
        negativeTtlMs: boundedMs(0, MAX_NEGATIVE_TTL_MS, '3 hours, RFC 2308').default(dnsDefaults.negativeTtlMs),
        timeoutMs: boundedMs(1, MAX_DNS_TIMEOUT_MS, '1 minute').default(dnsDefaults.timeoutMs),
        resolve: z.array(resolveEntry).prefault(() => [...dnsDefaults.resolve]),
      })
      .prefault({}),
    tls: z
      .strictObject({
        caFile: z.string().min(1).optional(),
        warm: z.array(warmTlsEntry).prefault(() => [...tlsDefaults.warm]),
        relayThreads: z.int().min(1).max(64).default(tlsDefaults.relayThreads),
        handshakeTimeoutMs: boundedMs(1, MAX_TLS_HANDSHAKE_TIMEOUT_MS, '1 minute').default(
          tlsDefaults.handshakeTimeoutMs,
        ),
        relayHangMs: boundedMs(0, MAX_RELAY_HANG_MS, '10 minutes')
          .refine((ms) => ms === 0 || ms >= MIN_RELAY_HANG_MS, {
            error: `must be 0 (no watchdog) or at least ${MIN_RELAY_HANG_MS} ms (a relay thread beats once a second)`,
          })
          .default(tlsDefaults.relayHangMs),
      })
      .prefault({}),
    proxies: z.array(proxySchema).default(() => []),
    pool: z
      .strictObject({
        maxIdleTotal: z.int().min(0).default(poolDefaults.maxIdleTotal),
        predictive: z.boolean().default(poolDefaults.predictive),
        predictiveWindowMs: positiveMs.default(poolDefaults.predictiveWindowMs),
        warmOnStartOrigins: z.int().min(0).default(poolDefaults.warmOnStartOrigins),
        warmOnStartSockets: z.int().min(0).default(poolDefaults.warmOnStartSockets),
        statsFlushMs: positiveMs.default(poolDefaults.statsFlushMs),
        historyMaxOrigins: z
          .int()
          .min(1)
          .max(MAX_HISTORY_ORIGINS, { error: `must be at most ${MAX_HISTORY_ORIGINS}` })
          .default(poolDefaults.historyMaxOrigins),
        defaults: originPolicySchema,
        origins: z.array(originOverrideSchema).default(() => []),
      })
      .prefault({}),
    fleet: z
      .strictObject({
        redis: z
          .string()
          .refine((text) => parseRedisUrl(text) !== undefined, {
            error: 'expected redis://host:port/db (or rediss:// for TLS; a port of 1 to 65535; no query string)',
          })
          .optional(),
        name: z
          .string()
          .regex(
            /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/,
            'expected a name of letters, digits, ".", "_" and "-" (at most 63)',
          )
          .default(fleetDefaults.name),
        onUnavailable: z.enum(FLEET_UNAVAILABLE_MODES).default(fleetDefaults.onUnavailable),
        shareWarming: z.boolean().default(fleetDefaults.shareWarming),
        heartbeatMs: z.int().min(100).max(60_000).default(fleetDefaults.heartbeatMs),
        slotTtlMs: z.int().min(300).max(600_000).default(fleetDefaults.slotTtlMs),
        demandPublishMs: z.int().min(100).max(600_000).default(fleetDefaults.demandPublishMs),
      })
      .prefault({}),
  })
  .superRefine((config, ctx) => {
    // The checks across keys read parsed values: under a table with a refused key (reported already; zod still
    // runs this, without the table's transforms, so the default maxIdle is missing) they would add errors about keys
    // the file never set ("minIdle (0) must be at most maxIdle (undefined)"). They wait for a file that passes.
    const refused = (...path: PropertyKey[]) =>
      ctx.issues.some((issue) => path.every((part, index) => issue.path?.[index] === part));
    const defaultsRefused = refused('pool', 'defaults');
    if (!defaultsRefused) {
      checkPolicyOrder(config.pool.defaults, ['pool', 'defaults'], ctx);
      checkClientCertificate(config.pool.defaults, ['pool', 'defaults'], ctx);
      checkRate(config.pool.defaults, ['pool', 'defaults'], ctx);
    }
    config.pool.origins.forEach((override, index) => {
      if (defaultsRefused || refused('pool', 'origins', index)) return;
      checkClientCertificate(override, ['pool', 'origins', index], ctx);
      // Each entry must be coherent merged over the defaults. (Several entries that match one origin are merged in
      // order by policyFor, which clamps the result rather than fail at acquire time.)
      const merged = mergePolicy(config.pool.defaults, override);
      checkPolicyOrder(merged, ['pool', 'origins', index], ctx, override);
      checkRate(merged, ['pool', 'origins', index], ctx, override);
    });
    const names = new Set<string>();
    config.proxies.forEach((proxy, index) => {
      if (names.has(proxy.name)) {
        ctx.addIssue({ code: 'custom', path: ['proxies', index, 'name'], message: `${proxy.name} is named twice` });
      }
      names.add(proxy.name);
    });
    // A renewal must land well before the slots it renews expire (one lost heartbeat is not an expiry).
    if (!refused('fleet') && config.fleet.slotTtlMs < 3 * config.fleet.heartbeatMs) {
      ctx.addIssue({
        code: 'custom',
        path: ['fleet', 'slotTtlMs'],
        message: `must be at least 3 × fleet.heartbeatMs (${3 * config.fleet.heartbeatMs}), got ${config.fleet.slotTtlMs}`,
      });
    }
    if (!refused('dns') && config.dns.minTtlMs > config.dns.maxTtlMs) {
      ctx.addIssue({
        code: 'custom',
        path: ['dns', 'minTtlMs'],
        message: `must be at most dns.maxTtlMs (${config.dns.maxTtlMs}), got ${config.dns.minTtlMs}`,
      });
    }
  });

/** The whole daemon configuration, every default filled in. */
export type SockpoolConfig = z.output<typeof configSchema>;
/** What a config file may contain (every key optional). */
export type SockpoolConfigInput = z.input<typeof configSchema>;
/** The connection policy of one origin. */
export type OriginPolicy = z.output<typeof originPolicySchema>;
/** One `pool.origins` entry: a match pattern and the policy keys it overrides. */
export type OriginOverride = z.output<typeof originOverrideSchema>;

function checkPolicyOrder(
  policy: OriginPolicy,
  path: Array<string | number>,
  ctx: z.RefinementCtx,
  override?: OriginOverride,
): void {
  type Key = 'minIdle' | 'maxIdle' | 'maxPerOrigin';
  // mergePolicy lowers inherited values to fit the ones an entry sets, so what is left to report is a value the
  // table itself set too high. Name that key, and say where the other value came from.
  const setHere = (key: Key) => override === undefined || override[key] !== undefined;
  const describe = (key: Key) => `${key} (${policy[key]}${setHere(key) ? '' : ', inherited'})`;
  for (const [low, high] of [
    ['minIdle', 'maxIdle'],
    ['maxIdle', 'maxPerOrigin'],
  ] as Array<[Key, Key]>) {
    if (policy[low] <= policy[high]) continue;
    ctx.addIssue({
      code: 'custom',
      path: [...path, low],
      message: `${describe(low)} must be at most ${describe(high)}`,
    });
  }
}

/** `burst` is a property of a rate: alone it means nothing. */
function checkRate(
  policy: OriginPolicy,
  path: Array<string | number>,
  ctx: z.RefinementCtx,
  override?: OriginOverride,
): void {
  if (policy.burst === undefined || policy.requestsPerSecond !== undefined) return;
  if (override !== undefined && override.burst === undefined) return;
  ctx.addIssue({ code: 'custom', path: [...path, 'burst'], message: 'burst needs requestsPerSecond' });
}

/** mTLS needs both halves, set together in one place. */
function checkClientCertificate(
  policy: { clientCert?: string | undefined; clientKey?: string | undefined },
  path: Array<string | number>,
  ctx: z.RefinementCtx,
): void {
  if ((policy.clientCert === undefined) === (policy.clientKey === undefined)) return;
  const missing = policy.clientCert === undefined ? 'clientCert' : 'clientKey';
  ctx.addIssue({ code: 'custom', path: [...path, missing], message: 'clientCert and clientKey go together' });
}

function mergePolicy(base: OriginPolicy, override: OriginOverride): OriginPolicy {
  const merged: OriginPolicy = { ...base, keepAlive: { ...base.keepAlive } };
  for (const [key, value] of Object.entries(override)) {
    if (key === 'match' || value === undefined) continue;
    if (key === 'keepAlive') {
      for (const [keepAliveKey, keepAliveValue] of Object.entries(value as object)) {
        if (keepAliveValue !== undefined) (merged.keepAlive as Record<string, unknown>)[keepAliveKey] = keepAliveValue;
      }
    } else {
      (merged as Record<string, unknown>)[key] = value;
    }
  }
  // Values the entry leaves out follow the ones it sets: an entry that only lowers maxPerOrigin (a politeness
  // limit) lowers the inherited maxIdle with it, and minIdle follows maxIdle.
  if (override.maxIdle === undefined) merged.maxIdle = Math.min(merged.maxIdle, merged.maxPerOrigin);
  if (override.minIdle === undefined) merged.minIdle = Math.min(merged.minIdle, merged.maxIdle);
  return merged;
}

// ---------------------------------------------------------------------------------------------------------------
// Loading.

/** The longest path a Unix socket can be bound to: sun_path's 108 bytes, its terminating NUL included. */
export const MAX_SOCKET_PATH_BYTES = 107;

export interface ParseOptions {
  /** Relative `socket` and `stateDir` paths are resolved against this directory (default: the working directory). */
  baseDir?: string;
  /** Renames key paths in error messages (applyFlags uses it to name the flag). */
  label?: (path: string) => string;
}

/** Validates a raw configuration object (parsed TOML or JSON). `source` names where it came from in errors. */
export function parseConfig(raw: unknown, source: string, options: ParseOptions = {}): SockpoolConfig {
  // (A file holding `null` is refused as not an object, like `[]`: not taken for "all defaults".)
  const result = configSchema.safeParse(raw);
  if (!result.success) {
    const lines = describeIssues(result.error.issues, options.label ?? ((path) => path));
    throw new SockpoolError(ErrorCodes.CONFIG, `invalid configuration in ${source}:\n  ${lines.join('\n  ')}`, {
      source,
      key: firstKeyPath(result.error.issues),
    });
  }
  const config = result.data;
  const baseDir = options.baseDir ?? process.cwd();
  config.socket = resolve(baseDir, config.socket);
  // bind() of a longer path fails with ENAMETOOLONG at start, an exit that systemd would restart again and again.
  if (Buffer.byteLength(config.socket) > MAX_SOCKET_PATH_BYTES) {
    const key = (options.label ?? ((path) => path))('socket');
    throw new SockpoolError(
      ErrorCodes.CONFIG,
      `invalid configuration in ${source}:\n  ${key}: ${config.socket} is ${Buffer.byteLength(config.socket)} bytes ` +
        `long; a Unix socket path may be at most ${MAX_SOCKET_PATH_BYTES} (sun_path)`,
      { source, key: 'socket' },
    );
  }
  config.stateDir = resolve(baseDir, config.stateDir);
  // TLS files are read when the daemon starts or reloads; relative paths are relative to the file that names them.
  if (config.tls.caFile !== undefined) config.tls.caFile = resolve(baseDir, config.tls.caFile);
  for (const policy of [config.pool.defaults, ...config.pool.origins]) {
    for (const key of ['caFile', 'clientCert', 'clientKey'] as const) {
      if (policy[key] !== undefined) policy[key] = resolve(baseDir, policy[key]);
    }
  }
  return config;
}

function formatPath(path: ReadonlyArray<PropertyKey>): string {
  let text = '';
  for (const part of path) {
    if (typeof part === 'number') text += `[${part}]`;
    else text += text === '' ? String(part) : `.${String(part)}`;
  }
  return text === '' ? '(top level)' : text;
}

function firstKeyPath(issues: core.$ZodIssue[]): string {
  const issue = issues[0];
  if (!issue) return '';
  if (issue.code === 'unrecognized_keys') return formatPath([...issue.path, issue.keys[0] ?? '']);
  return formatPath(issue.path);
}

function describeIssues(issues: core.$ZodIssue[], label: (path: string) => string): string[] {
  const lines: string[] = [];
  for (const issue of issues) {
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) {
        const camel = key.replace(/[-_]+([a-z0-9])/gi, (_, letter: string) => letter.toUpperCase());
        const hint = camel !== key ? ` (keys are camelCase: did you mean "${camel}"?)` : '';
        lines.push(`${label(formatPath([...issue.path, key]))}: unknown key${hint}`);
      }
      continue;
    }
    // zod words TOML's `inf` (and 1e400, which parses as Infinity) "expected number, received number".
    const infinite = issue.code === 'invalid_type' && (issue as { received?: unknown }).received === 'Infinity';
    const message = infinite
      ? 'expected a finite number, got an infinity (inf, or a literal too large such as 1e400)'
      : issue.message.replace(/^Invalid (?:input|option): /, '');
    lines.push(`${label(formatPath(issue.path))}: ${message}`);
  }
  return lines;
}

/** Reads and validates a config file: TOML (`.toml`) or JSON (`.json`). */
export function loadConfigFile(path: string): SockpoolConfig {
  const extension = extname(path).toLowerCase();
  if (extension !== '.toml' && extension !== '.json') {
    throw new SockpoolError(
      ErrorCodes.CONFIG,
      `${path}: unknown config file type "${extension}" (expected .toml or .json)`,
      { source: path },
    );
  }
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    const code = (error as { code?: string }).code ?? 'EIO';
    throw new SockpoolError(
      ErrorCodes.CONFIG,
      `${path}: cannot read config file (${code})`,
      { source: path },
      {
        cause: error,
      },
    );
  }
  let raw: unknown;
  if (extension === '.toml') {
    try {
      raw = parseToml(text);
    } catch (error) {
      if (error instanceof TomlError) {
        const reason = error.message.replace(/^Invalid TOML document: /, '').split('\n')[0];
        throw new SockpoolError(
          ErrorCodes.CONFIG,
          `${path}:${error.line}:${error.column}: invalid TOML: ${reason}`,
          { source: path, line: error.line, column: error.column },
          { cause: error },
        );
      }
      throw error;
    }
  } else {
    try {
      raw = JSON.parse(text);
    } catch (error) {
      const message = (error as Error).message;
      const position = jsonErrorPosition(text, message);
      const where = position ? `:${position.line}:${position.column}` : '';
      throw new SockpoolError(
        ErrorCodes.CONFIG,
        `${path}${where}: invalid JSON: ${message.replace(/ \(line \d+ column \d+\)$/, '')}`,
        { source: path, ...position },
        { cause: error },
      );
    }
  }
  return parseConfig(raw, path, { baseDir: dirname(resolve(path)) });
}

function jsonErrorPosition(text: string, message: string): { line: number; column: number } | undefined {
  const lineColumn = /\(line (\d+) column (\d+)\)/.exec(message);
  if (lineColumn) return { line: Number(lineColumn[1]), column: Number(lineColumn[2]) };
  const position = /at position (\d+)/.exec(message);
  if (!position) return undefined;
  const before = text.slice(0, Number(position[1]));
  const line = before.split('\n').length;
  return { line, column: before.length - before.lastIndexOf('\n') };
}

/** The configuration with no file at all: every default. */
export function defaultConfig(): SockpoolConfig {
  return parseConfig({}, 'built-in defaults');
}

/** A parsed configuration as input again (typed entries back to their text): parseConfig(configInput(c)) equals c. */
export function configInput(config: SockpoolConfig) {
  const text = (entry: { text: string }) => entry.text;
  const raw = structuredClone({
    ...config,
    egress: {
      ...config.egress,
      allow: config.egress.allow.map(text),
      deny: config.egress.deny.map(text),
      allowHosts: config.egress.allowHosts.map(text),
      denyHosts: config.egress.denyHosts.map(text),
      nat64Prefixes: config.egress.nat64Prefixes.map(text),
    },
    dns: { ...config.dns, servers: config.dns.servers.map(text), resolve: config.dns.resolve.map(text) },
    tls: { ...config.tls, warm: config.tls.warm.map(text) },
    pool: {
      ...config.pool,
      origins: config.pool.origins.map((override) => ({ ...override, match: override.match.text })),
    },
  });
  return raw satisfies SockpoolConfigInput;
}

// ---------------------------------------------------------------------------------------------------------------
// Command-line flags.

export interface ConfigFlags {
  socket?: string;
  stateDir?: string;
  /** `--allow CIDR`: appended to egress.allow. */
  allow?: string[];
  /** `--deny CIDR`: appended to egress.deny. */
  deny?: string[];
  /** `--allow-port N`: replaces egress.allowPorts (so `--allow-port 8080` alone allows only 8080). */
  allowPort?: number[];
  /** `--resolve HOST:PORT:ADDR`: appended to dns.resolve (entries for the same HOST:PORT add up their addresses). */
  resolve?: string[];
  metricsPort?: number;
  logLevel?: string;
  /** `--warm-tls HOST:PORT` (or `*`): appended to tls.warm. */
  warmTls?: string[];
  /** `--ca-file PATH`: tls.caFile. */
  caFile?: string;
  /** `--fleet-redis URL`: fleet.redis. */
  fleetRedis?: string;
}

/** The flags as `sockpoold`'s command line collects them. */
export type DaemonFlags = ConfigFlags;

const FLAG_OF_KEY: Array<[RegExp, string]> = [
  [/^socket$/, '--socket'],
  [/^stateDir$/, '--state-dir'],
  [/^egress\.allow(\[\d+\])?$/, '--allow'],
  [/^egress\.deny(\[\d+\])?$/, '--deny'],
  [/^egress\.allowPorts(\[\d+\])?$/, '--allow-port'],
  [/^dns\.resolve(\[\d+\])?$/, '--resolve'],
  [/^metricsPort$/, '--metrics-port'],
  [/^logLevel$/, '--log-level'],
  [/^tls\.warm(\[\d+\])?$/, '--warm-tls'],
  [/^tls\.caFile$/, '--ca-file'],
  [/^fleet\.redis$/, '--fleet-redis'],
];

/**
 * Applies command-line flags over a configuration (from a file or defaults) and validates the result.
 * Scalars replace; `allow`, `deny` and `resolve` append to the file's lists; `allowPort` replaces the port list.
 * Relative paths in flags are resolved against the working directory.
 */
export function applyFlags(config: SockpoolConfig, flags: ConfigFlags): SockpoolConfig {
  const raw = configInput(config);
  if (flags.socket !== undefined) raw.socket = flags.socket;
  if (flags.stateDir !== undefined) raw.stateDir = flags.stateDir;
  if (flags.allow?.length) raw.egress.allow.push(...flags.allow);
  if (flags.deny?.length) raw.egress.deny.push(...flags.deny);
  if (flags.allowPort?.length) raw.egress.allowPorts = [...flags.allowPort];
  if (flags.resolve?.length) raw.dns.resolve.push(...flags.resolve);
  if (flags.metricsPort !== undefined) raw.metricsPort = flags.metricsPort;
  if (flags.logLevel !== undefined) raw.logLevel = flags.logLevel as LogLevel;
  if (flags.warmTls?.length) raw.tls.warm.push(...flags.warmTls);
  if (flags.caFile !== undefined) raw.tls.caFile = flags.caFile;
  if (flags.fleetRedis !== undefined) raw.fleet.redis = flags.fleetRedis;
  return parseConfig(raw, 'command-line flags', {
    label: (path) => FLAG_OF_KEY.find(([pattern]) => pattern.test(path))?.[1] ?? path,
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Per-origin policy.

/** Whether a parsed origin match pattern covers host (canonical) and port. */
export function originMatches(match: OriginMatch, host: string, port: number): boolean {
  return (match.port === undefined || match.port === port) && hostMatches(match.host, host);
}

/**
 * The policy of one origin: `pool.defaults` merged with every matching `pool.origins` entry, in file order (a later
 * entry wins; a value an entry leaves out is lowered to fit the ones it sets). If several entries together still
 * break minIdle <= maxIdle <= maxPerOrigin, the result is clamped: maxIdle to maxPerOrigin, minIdle to maxIdle.
 */
export function policyFor(config: SockpoolConfig, host: string, port: number): OriginPolicy {
  const canonical = canonicalHost(host);
  let policy: OriginPolicy = { ...config.pool.defaults, keepAlive: { ...config.pool.defaults.keepAlive } };
  for (const override of config.pool.origins) {
    if (originMatches(override.match, canonical, port)) policy = mergePolicy(policy, override);
  }
  policy.maxIdle = Math.min(policy.maxIdle, policy.maxPerOrigin);
  policy.minIdle = Math.min(policy.minIdle, policy.maxIdle);
  return policy;
}
