// `sockpoold`'s command (loaded by main.ts, the entry point): parse the command line, load the configuration
// (embedded defaults, then the file, then flags), start the daemon, wire the signals. Everything else lives in
// daemon.ts and the modules it composes.

import process from 'node:process';
import { Command, InvalidArgumentError, Option } from 'commander';
import { ErrorCodes } from '../shared/errors.js';
import * as native from '../shared/native.js';
import { restrictBinds } from './bind-restriction.js';
import { applyFlags, type DaemonFlags, defaultConfig, loadConfigFile, type SockpoolConfig } from './config.js';
import { dropGuardCapabilities, policiesSetMarks, startConnectGuard } from './connect-guard.js';
import { Sockpoold } from './daemon.js';
import { createLogger, flushLogs } from './log.js';
import { applyRealtimePriority } from './realtime.js';

/**
 * The exit status of a start refused for its configuration (SOCKPOOL_ERR_CONFIG); any other failure exits 1 (an
 * unclean stop too: one that failed, or left a relay thread running).
 */
const EXIT_CONFIG = 2;

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function port(value: string): number {
  // Digits only: Number() alone reads "0x50" as 80 and "1e3" as 1000.
  const parsed = /^\d+$/.test(value) ? Number(value) : Number.NaN;
  if (!(parsed >= 0 && parsed <= 65535)) {
    throw new InvalidArgumentError('must be a port number (0-65535)');
  }
  return parsed;
}

function collectPort(value: string, previous: number[]): number[] {
  return [...previous, port(value)];
}

interface CliOptions {
  config?: string;
  socket?: string;
  stateDir?: string;
  allow: string[];
  deny: string[];
  allowPort: number[];
  resolve: string[];
  metricsPort?: number;
  logLevel?: string;
  warmTls: string[];
  caFile?: string;
  fleetRedis?: string;
}

const program = new Command('sockpoold')
  .description('Keeps warm TCP connections and hands them to sockpool clients over a Unix socket')
  .option('--config <file>', 'configuration file (.toml or .json); without it, embedded defaults')
  .option('--socket <path>', 'handoff socket path')
  .option('--state-dir <dir>', 'directory for the SQLite state')
  .option('--allow <cidr>', 'allow this CIDR (repeatable; punches through the default refusals)', collect, [])
  .option('--deny <cidr>', 'deny this CIDR (repeatable; beats --allow)', collect, [])
  .option('--allow-port <n>', 'allowed destination port (repeatable; replaces the default 80, 443)', collectPort, [])
  .option('--resolve <host:port:addr>', 'pin a host to an address, like curl --resolve (repeatable)', collect, [])
  .option(
    '--warm-tls <host:port>',
    'keep warm TLS sessions for this origin (repeatable; * = every https origin)',
    collect,
    [],
  )
  .option('--ca-file <file>', 'CA certificates (PEM) the warm TLS handshakes trust instead of the system store')
  .option(
    '--fleet-redis <url>',
    'share per-origin limits and warming with a fleet through Redis (redis://host:port/db)',
  )
  .option('--metrics-port <n>', 'serve Prometheus metrics on 127.0.0.1:<n> (0 = off)', port)
  .addOption(
    new Option('--log-level <level>', 'log level').choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace']),
  )
  .showHelpAfterError()
  // A command line refused (an unknown flag, a value a flag does not take) is a configuration refused: exit 2.
  .exitOverride((error) => process.exit(error.exitCode === 0 ? 0 : EXIT_CONFIG));

program.parse();
const options = program.opts<CliOptions>();

function flags(): DaemonFlags {
  return {
    socket: options.socket,
    stateDir: options.stateDir,
    allow: options.allow,
    deny: options.deny,
    allowPort: options.allowPort.length > 0 ? options.allowPort : undefined,
    resolve: options.resolve,
    metricsPort: options.metricsPort,
    logLevel: options.logLevel as SockpoolConfig['logLevel'] | undefined,
    warmTls: options.warmTls,
    caFile: options.caFile,
    fleetRedis: options.fleetRedis,
  };
}

function loadConfig(): SockpoolConfig {
  const base = options.config ? loadConfigFile(options.config) : defaultConfig();
  return applyFlags(base, flags());
}

/** What arrived before the command was loaded (main.ts catches it while the modules load). */
export interface EarlySignals {
  reloadRequested: boolean;
}

export async function runSockpoold(early: EarlySignals): Promise<void> {
  let config: SockpoolConfig;
  try {
    config = loadConfig();
  } catch (error) {
    const withCode = error as Error & { code?: string };
    console.error(`sockpoold: ${withCode.code ?? 'error'}: ${withCode.message}`);
    process.exit(EXIT_CONFIG);
  }
  const log = createLogger(config.logLevel);
  // Signal handlers first: a SIGTERM while the daemon starts (its socket may already accept) stops it cleanly once
  // the start has finished, instead of killing it half-way; a SIGHUP then (Node's default would kill the process)
  // reloads once the start has finished, unless a stop came too. After a stop began, reload() ignores a SIGHUP.
  let daemon: Sockpoold | undefined;
  let stopSignal: string | undefined;
  let reloadPending = early.reloadRequested;
  if (reloadPending)
    log.info({ signal: 'SIGHUP' }, 'reload requested while starting: it runs once the start has finished');
  const shutDown = (running: Sockpoold) =>
    running.stop().then(
      ({ threadsLeft }) => {
        if (threadsLeft.length === 0) return flushLogs(log).then(() => process.exit(0));
        // A relay thread that never ended (daemon/tls-relay.ts, header), or the state store's waiting for a sync of a
        // slow disk (daemon/store.ts, close): process.exit() would join it and wait for ever, or for the disk.
        // Everything the daemon owns is closed and its history handed over by now; the logs go out, then _exit.
        log.error({ threadsLeft }, 'unclean stop: threads left running; exiting without joining them');
        return flushLogs(log).then(() => native.exitNow(1));
      },
      (error: Error) => {
        // The stop failed part-way: a relay thread may still run, and process.exit() would join it for ever.
        log.error({ err: error.message }, 'unclean stop');
        return flushLogs(log).then(() => native.exitNow(1));
      },
    );
  const stop = (signal: string) => {
    if (stopSignal) return;
    stopSignal = signal;
    log.info({ signal }, 'stopping');
    if (daemon) void shutDown(daemon);
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGHUP', () => {
    if (daemon) {
      daemon.reload();
    } else if (!reloadPending) {
      reloadPending = true;
      log.info({ signal: 'SIGHUP' }, 'reload requested while starting: it runs once the start has finished');
    }
  });
  // Before the daemon connects anything: no connect() of a socket it connected, but its own. Then the capabilities
  // that set-up needed go, before any thread of the daemon's starts (they inherit the smaller set).
  const connectGuard = startConnectGuard(config.connectGuard);
  if (connectGuard.state === 'failed') log.error(connectGuard, 'connect guard (cgroup BPF) failed');
  else log.info(connectGuard, 'connect guard (cgroup BPF)');
  try {
    dropGuardCapabilities(policiesSetMarks(config));
  } catch (error) {
    // A system call filter without capset (a unit file older than the guard): the daemon runs with what it has.
    log.warn({ err: (error as Error).message }, 'could not drop the connect guard set-up capabilities');
  }
  // Before the daemon starts any thread (they inherit it): TCP binds only to port 0 and metricsPort.
  const bindRestriction = restrictBinds(config.restrictBind, config.metricsPort);
  if (bindRestriction.state === 'failed') log.error(bindRestriction, 'TCP bind restriction (Landlock) failed');
  else log.info(bindRestriction, 'TCP bind restriction (Landlock)');
  const realtime = applyRealtimePriority(config.realtimePriority);
  if (realtime.state === 'refused') log.warn(realtime, 'real-time scheduling refused: the daemon runs without it');
  else log.info(realtime, 'real-time scheduling');
  try {
    daemon = await Sockpoold.start({
      config,
      log,
      reloadConfig: loadConfig,
      bindRestriction,
      connectGuard,
      realtime,
    });
  } catch (error) {
    const withCode = error as Error & { code?: string };
    log.fatal({ code: withCode.code, err: withCode.message }, 'sockpoold failed to start');
    console.error(`sockpoold: ${withCode.code ?? 'error'}: ${withCode.message}`);
    await flushLogs(log);
    // A configuration the start found wrong (an unreadable file it names, a directory it cannot create) is the
    // operator's to fix, like one the parser refused: the same exit status (the unit does not restart on it).
    process.exit(withCode.code === ErrorCodes.CONFIG ? EXIT_CONFIG : 1);
  }
  if (stopSignal) void shutDown(daemon);
  else if (reloadPending) daemon.reload();
}
