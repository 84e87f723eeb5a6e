import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { type AddressInfo, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parse as parseToml } from 'smol-toml';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  applyFlags,
  configInput,
  configSchema,
  DEFAULTS,
  defaultConfig,
  loadConfigFile,
  parseConfig,
  policyFor,
  type SockpoolConfig,
} from '../daemon/config.js';
import { ErrorCodes, SockpoolError } from '../shared/errors.js';
import { daemonMain } from './helpers/daemon.js';

const repo = resolve(import.meta.dirname, '..');

/** Runs `fn`, expects a SockpoolError with the CONFIG code, returns it. */
function configError(fn: () => unknown): SockpoolError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(SockpoolError);
    expect((error as SockpoolError).code).toBe(ErrorCodes.CONFIG);
    return error as SockpoolError;
  }
  throw new Error('expected a SOCKPOOL_ERR_CONFIG error, nothing was thrown');
}

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'sockpool-config-'));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
  vi.restoreAllMocks();
});

describe('defaults', () => {
  it('fills every key', () => {
    const config = defaultConfig();
    expect(config.logLevel).toBe('info');
    expect(config.metricsPort).toBe(0);
    expect(config.metricsHost).toBe('127.0.0.1');
    expect(config.access).toEqual({
      socketMode: '0660',
      allowUids: [],
      allowGids: [],
      adminUids: [],
      maxLeasesPerClient: 1024,
      maxPendingPerClient: 256,
      maxBadMessages: 10,
      acceptClientFds: false,
    });
    expect(config.egress.allowPorts).toEqual([80, 443]);
    expect(config.dns).toEqual({
      servers: [],
      minTtlMs: 1000,
      maxTtlMs: 300000,
      negativeTtlMs: 5000,
      timeoutMs: 3000,
      resolve: [],
    });
    expect(config.pool.defaults).toEqual({
      minIdle: 0,
      maxIdle: 16,
      maxPerOrigin: 256,
      idleTtlMs: 60000,
      connectTimeoutMs: 5000,
      connectAttemptDelayMs: 250,
      maxRacingAttempts: 8,
      acquireTimeoutMs: 10000,
      noDelay: true,
      keepAlive: { enabled: true, idleSec: 30, intervalSec: 10, count: 3 },
      warmTls: false,
      warmTlsOnMiss: 'session',
    });
    expect(config.tls).toEqual({ warm: [], relayThreads: 1, handshakeTimeoutMs: 10000, relayHangMs: 5000 });
    expect(config.pool.origins).toEqual([]);
  });

  it('puts socket and state under the working directory when not root, under /run and /var/lib as root', () => {
    vi.spyOn(process, 'getuid').mockReturnValue(1000);
    const user = defaultConfig();
    expect(user.socket).toBe(join(process.cwd(), '.sockpool', 'sockpoold.sock'));
    expect(user.stateDir).toBe(join(process.cwd(), '.sockpool'));
    vi.spyOn(process, 'getuid').mockReturnValue(0);
    const root = defaultConfig();
    expect(root.socket).toBe('/run/sockpool/sockpoold.sock');
    expect(root.stateDir).toBe('/var/lib/sockpool');
  });

  it('never shares list objects between configurations', () => {
    const first = defaultConfig();
    first.egress.allowPorts.push(8080);
    first.pool.defaults.keepAlive.idleSec = 1;
    expect(defaultConfig().egress.allowPorts).toEqual([80, 443]);
    expect(defaultConfig().pool.defaults.keepAlive.idleSec).toBe(30);
    expect(DEFAULTS.egress.allowPorts).toEqual([80, 443]);
  });
});

describe('parseConfig', () => {
  it('names the bad key path and the source', () => {
    const error = configError(() => parseConfig({ pool: { defaults: { maxIdle: 'many' } } }, '/etc/sockpoold.toml'));
    expect(error.message).toContain('/etc/sockpoold.toml');
    expect(error.message).toContain('pool.defaults.maxIdle: expected number, received string');
    expect(error.fields).toMatchObject({ source: '/etc/sockpoold.toml', key: 'pool.defaults.maxIdle' });
  });

  it('metricsHost must be an IP address (what the endpoint binds to), canonical when it is one', () => {
    const error = configError(() => parseConfig({ metricsHost: 'metrics.internal' }, 'f'));
    expect(error.fields).toMatchObject({ key: 'metricsHost' });
    expect(error.message).toContain('expected an IPv4 or IPv6 address');
    expect(parseConfig({ metricsHost: '0:0::1' }, 'f').metricsHost).toBe('::1');
  });

  it('refuses unknown keys at every level and hints at camelCase', () => {
    const error = configError(() =>
      parseConfig(
        { colour: 'blue', access: { max_bad_messages: 3 }, pool: { origins: [{ match: '*:80', x: 1 }] } },
        'f',
      ),
    );
    expect(error.message).toContain('colour: unknown key');
    expect(error.message).toContain(
      'access.max_bad_messages: unknown key (keys are camelCase: did you mean "maxBadMessages"?)',
    );
    expect(error.message).toContain('pool.origins[0].x: unknown key');
  });

  it('reports every problem at once, with array indexes', () => {
    const error = configError(() =>
      parseConfig(
        { egress: { allow: ['10.0.0.0/8', '10.0.0.0/33'], allowPorts: [443, 70000] }, logLevel: 'loud' },
        'f',
      ),
    );
    expect(error.message).toContain('egress.allow[1]: expected a CIDR');
    expect(error.message).toContain('egress.allowPorts[1]:');
    expect(error.message).toContain('logLevel: expected one of');
  });

  it('checks minIdle <= maxIdle <= maxPerOrigin, naming the key', () => {
    expect(configError(() => parseConfig({ pool: { defaults: { minIdle: 20 } } }, 'f')).message).toContain(
      'pool.defaults.minIdle: minIdle (20) must be at most maxIdle (16)',
    );
    expect(
      configError(() => parseConfig({ pool: { defaults: { maxIdle: 8, maxPerOrigin: 4 } } }, 'f')).message,
    ).toContain('pool.defaults.maxIdle: maxIdle (8) must be at most maxPerOrigin (4)');
    // In an entry, the key the entry set is named, and the value it clashes with is marked inherited.
    const error = configError(() => parseConfig({ pool: { origins: [{ match: 'a.example:443', minIdle: 20 }] } }, 'f'));
    expect(error.message).toContain('pool.origins[0].minIdle: minIdle (20) must be at most maxIdle (16, inherited)');
    expect(
      configError(() => parseConfig({ pool: { origins: [{ match: 'a.example:443', maxIdle: 300 }] } }, 'f')).message,
    ).toContain('pool.origins[0].maxIdle: maxIdle (300) must be at most maxPerOrigin (256, inherited)');
  });

  it('lets a lower maxPerOrigin alone pull the unset maxIdle and minIdle down with it', () => {
    const config = parseConfig(
      {
        pool: {
          defaults: { maxPerOrigin: 4 },
          origins: [{ match: 'polite.example:443', maxPerOrigin: 2 }],
        },
      },
      'f',
    );
    expect(config.pool.defaults).toMatchObject({ maxIdle: 4, maxPerOrigin: 4 });
    const withMinIdle = parseConfig(
      { pool: { defaults: { minIdle: 3 }, origins: [{ match: 'polite.example:443', maxPerOrigin: 2 }] } },
      'f',
    );
    expect(policyFor(withMinIdle, 'polite.example', 443)).toMatchObject({ minIdle: 2, maxIdle: 2, maxPerOrigin: 2 });
    expect(policyFor(withMinIdle, 'other.example', 443)).toMatchObject({ minIdle: 3, maxIdle: 16, maxPerOrigin: 256 });
  });

  it('reports a refused key alone, without errors about keys checked against it', () => {
    // A refused key left its table without its transforms (no default maxIdle), and the checks across keys still ran.
    const cases: Array<[unknown, string]> = [
      [{ pool: { defaults: { connectTimeoutMs: 0 } } }, 'pool.defaults.connectTimeoutMs: Too small'],
      [
        { pool: { defaults: { connectTimeoutMs: 0 }, origins: [{ match: '*:443', minIdle: 2 }] } },
        'pool.defaults.connectTimeoutMs: Too small',
      ],
      [{ pool: { defaults: { maxIdle: -1 } } }, 'pool.defaults.maxIdle: Too small'],
      [{ pool: { origins: [{ match: '*:443', maxIdle: -1 }] } }, 'pool.origins[0].maxIdle: Too small'],
      [{ fleet: { heartbeatMs: 70_000 } }, 'fleet.heartbeatMs: Too big'],
      [{ dns: { maxTtlMs: -1 } }, 'dns.maxTtlMs: Too small'],
    ];
    for (const [raw, expected] of cases) {
      const lines = configError(() => parseConfig(raw, 'f'))
        .message.split('\n')
        .slice(1);
      expect(
        lines.map((line) => line.trim().split(':')[0]),
        JSON.stringify(raw),
      ).toEqual([expected.split(':')[0]]);
      expect(lines[0]).toContain(expected);
    }
    // A key refused in one place does not hide the checks elsewhere.
    const both = configError(() =>
      parseConfig({ fleet: { heartbeatMs: 70_000 }, pool: { defaults: { minIdle: 20 } } }, 'f'),
    ).message;
    expect(both).toContain('fleet.heartbeatMs: Too big');
    expect(both).toContain('pool.defaults.minIdle: minIdle (20) must be at most maxIdle (16)');
  });

  it('checks dns.minTtlMs <= dns.maxTtlMs', () => {
    expect(configError(() => parseConfig({ dns: { minTtlMs: 10, maxTtlMs: 5 } }, 'f')).message).toContain(
      'dns.minTtlMs: must be at most dns.maxTtlMs',
    );
  });

  it('normalises values', () => {
    const config = parseConfig(
      {
        access: { socketMode: '600', socketOwner: '1000', socketGroup: 'crawlers' },
        egress: { allow: ['192.0.2.7', '2001:DB8::/32'], allowHosts: ['*.Example.COM'] },
      },
      'f',
    );
    expect(config.access.socketMode).toBe('0600');
    expect(config.access.socketOwner).toBe(1000);
    expect(config.access.socketGroup).toBe('crawlers');
    expect(config.egress.allow.map((cidr) => cidr.text)).toEqual(['192.0.2.7/32', '2001:db8::/32']);
    expect(config.egress.allowHosts.map((pattern) => pattern.text)).toEqual(['*.example.com']);
  });

  it('refuses malformed values with a message saying what is expected', () => {
    const cases: Array<[unknown, string]> = [
      [{ access: { socketMode: 660 } }, 'access.socketMode: expected string'],
      [{ access: { socketMode: '0980' } }, 'access.socketMode: expected an octal mode'],
      [{ egress: { allow: ['010.0.0.1/8'] } }, 'egress.allow[0]: expected a CIDR'],
      [{ egress: { deny: ['fe80::1%eth0/64'] } }, 'egress.deny[0]: expected a CIDR'],
      [{ egress: { allowHosts: ['exa mple.com'] } }, 'egress.allowHosts[0]: expected a host name'],
      [{ dns: { servers: ['dns.example'] } }, 'dns.servers[0]: expected an IP address'],
      [{ dns: { resolve: ['example.com:443'] } }, 'dns.resolve[0]: expected HOST:PORT:ADDR'],
      [{ dns: { resolve: ['example.com:443:2001:db8::1'] } }, 'dns.resolve[0]: expected HOST:PORT:ADDR'],
      [{ pool: { defaults: { sourceAddress: 'eth0' } } }, 'pool.defaults.sourceAddress: expected an IPv4 or IPv6'],
      [{ pool: { defaults: { device: 'a-very-long-interface-name' } } }, 'pool.defaults.device: expected a network'],
      [{ pool: { defaults: { mark: -1 } } }, 'pool.defaults.mark:'],
      [{ pool: { defaults: { keepAlive: { count: 1000 } } } }, 'pool.defaults.keepAlive.count:'],
      [{ pool: { defaults: { idleTtlMs: 1.5 } } }, 'pool.defaults.idleTtlMs: expected int'],
      // TOML's inf, or 1e400: zod said "expected number, received number".
      [{ pool: { defaults: { idleTtlMs: Infinity } } }, 'pool.defaults.idleTtlMs: expected a finite number'],
      [{ pool: { defaults: { requestsPerSecond: -Infinity } } }, 'pool.defaults.requestsPerSecond: expected a finite'],
      // RFC 8305 §8: a connection attempt delay below 100 ms is refused, in the defaults and per origin.
      [{ pool: { defaults: { connectAttemptDelayMs: 99 } } }, 'pool.defaults.connectAttemptDelayMs: Too small'],
      [
        { pool: { origins: [{ match: '*:443', connectAttemptDelayMs: 10 }] } },
        'pool.origins[0].connectAttemptDelayMs: Too small',
      ],
      [{ pool: { defaults: { maxRacingAttempts: -1 } } }, 'pool.defaults.maxRacingAttempts: Too small'],
      [{ pool: { origins: [{ match: 'example.com' }] } }, 'pool.origins[0].match: expected "host:port"'],
      [{ pool: { origins: [{}] } }, 'pool.origins[0].match:'],
      [{ metricsPort: 65536 }, 'metricsPort:'],
      // Port 0 in a URL: the URL parser takes it, nothing can connect to it (every other port refuses it).
      [{ proxies: [{ name: 'p', url: 'http://127.0.0.1:0' }] }, 'proxies[0].url: expected http://host:port (a port of'],
      [{ fleet: { redis: 'redis://127.0.0.1:0' } }, 'fleet.redis: expected redis://host:port/db'],
      // SCHED_RR's priorities are 1–99 (0: off).
      [{ realtimePriority: 100 }, 'realtimePriority: Too big'],
      [{ realtimePriority: 1.5 }, 'realtimePriority: expected int'],
    ];
    for (const [raw, expected] of cases) {
      expect(configError(() => parseConfig(raw, 'f')).message).toContain(expected);
    }
  });

  it('refuses durations longer than a timer can wait (2^31 - 1 ms), naming the key', () => {
    // Node turns a longer setTimeout into 1 ms with a mere warning: quotas.maxLeaseMs = 3e9 ended every lease at once.
    const durations: Array<[string, (ms: number) => unknown]> = [
      ['quotas.maxLeaseMs', (ms) => ({ quotas: { maxLeaseMs: ms } })],
      ['pool.predictiveWindowMs', (ms) => ({ pool: { predictiveWindowMs: ms } })],
      ['pool.statsFlushMs', (ms) => ({ pool: { statsFlushMs: ms } })],
    ];
    // (connectTimeoutMs, connectAttemptDelayMs, the dns durations and tls.handshakeTimeoutMs have bounds of their own,
    // below.)
    for (const key of ['idleTtlMs', 'acquireTimeoutMs', 'userTimeoutMs']) {
      durations.push([`pool.defaults.${key}`, (ms) => ({ pool: { defaults: { [key]: ms } } })]);
      durations.push([`pool.origins[0].${key}`, (ms) => ({ pool: { origins: [{ match: '*:443', [key]: ms }] } })]);
    }
    for (const [key, raw] of durations) {
      const error = configError(() => parseConfig(raw(2 ** 31), 'f'));
      expect(error.fields, key).toMatchObject({ key });
      expect(error.message, key).toContain(`${key}: must be at most 2147483647 ms`);
      expect(() => parseConfig(raw(2 ** 31 - 1), 'f'), key).not.toThrow();
    }
  });

  it('bounds the Happy Eyeballs attempt delay (RFC 8305: at most 2 s) and the connect timeout, naming the key', () => {
    // connectAttemptDelayMs = 600000 made a host whose preferred family is silent wait ten minutes for the other one;
    // a connect timeout of days is no deadline (the kernel gives up a SYN long before).
    const bounds: Array<[string, number, (ms: number) => unknown]> = [];
    for (const [key, most] of [
      ['connectAttemptDelayMs', 2_000],
      ['connectTimeoutMs', 300_000],
    ] as const) {
      bounds.push([`pool.defaults.${key}`, most, (ms) => ({ pool: { defaults: { [key]: ms } } })]);
      bounds.push([`pool.origins[0].${key}`, most, (ms) => ({ pool: { origins: [{ match: '*:443', [key]: ms }] } })]);
    }
    for (const [key, most, raw] of bounds) {
      const error = configError(() => parseConfig(raw(most + 1), 'f'));
      expect(error.fields, key).toMatchObject({ key });
      expect(error.message, key).toContain(`${key}: must be at most ${most} ms`);
      expect(() => parseConfig(raw(most), 'f'), key).not.toThrow();
    }
    expect(configError(() => parseConfig(bounds[0]![2](600_000), 'f')).message).toContain(
      'pool.defaults.connectAttemptDelayMs: must be at most 2000 ms',
    );
    // A reload reads the file the same way: the bad key is named with the file.
    const file = join(dir, 'sockpoold.toml');
    writeFileSync(file, '[pool.defaults]\nconnectAttemptDelayMs = 600000\n');
    const error = configError(() => loadConfigFile(file));
    expect(error.message).toContain(file);
    expect(error.fields).toMatchObject({ key: 'pool.defaults.connectAttemptDelayMs' });
  });

  it('bounds the DNS deadline and cache lifetimes, the TLS handshake timeout and the history size, naming the key', () => {
    // Each took anything up to the longest timer (about 24.8 days) or any safe integer: a DNS deadline or a handshake
    // of days is no deadline (each holds a uid's lookup charge, or a relay thread's handshake place, that long), an
    // answer cached for weeks outlives any TTL a resolver keeps (RFC 8767: 7 days; RFC 2308: negative answers hours),
    // and the history's origins are held in the daemon's memory too.
    const bounds: Array<[string, number, string, (value: number) => unknown]> = [
      ['dns.timeoutMs', 60_000, ' ms', (ms) => ({ dns: { timeoutMs: ms } })],
      ['dns.minTtlMs', 604_800_000, ' ms', (ms) => ({ dns: { minTtlMs: ms, maxTtlMs: 604_800_000 } })],
      ['dns.maxTtlMs', 604_800_000, ' ms', (ms) => ({ dns: { maxTtlMs: ms } })],
      ['dns.negativeTtlMs', 10_800_000, ' ms', (ms) => ({ dns: { negativeTtlMs: ms } })],
      ['tls.handshakeTimeoutMs', 60_000, ' ms', (ms) => ({ tls: { handshakeTimeoutMs: ms } })],
      ['pool.historyMaxOrigins', 1_000_000, '', (count) => ({ pool: { historyMaxOrigins: count } })],
    ];
    for (const [key, most, unit, raw] of bounds) {
      const error = configError(() => parseConfig(raw(most + 1), 'f'));
      expect(error.fields, key).toMatchObject({ key });
      expect(error.message, key).toContain(`${key}: must be at most ${most}${unit}`);
      expect(() => parseConfig(raw(most), 'f'), key).not.toThrow();
    }
    // A reload reads the file the same way: the bad key is named with the file.
    const file = join(dir, 'sockpoold.toml');
    writeFileSync(file, '[tls]\nhandshakeTimeoutMs = 600000\n');
    const error = configError(() => loadConfigFile(file));
    expect(error.message).toContain(file);
    expect(error.fields).toMatchObject({ key: 'tls.handshakeTimeoutMs' });
  });

  it('parses --resolve entries into host, port and addresses', () => {
    const [entry] = parseConfig({ dns: { resolve: ['+Example.com:443:192.0.2.1,[2001:DB8::1]'] } }, 'f').dns.resolve;
    expect(entry).toMatchObject({ host: 'example.com', port: 443, text: 'example.com:443:192.0.2.1,[2001:db8::1]' });
    expect(entry?.addresses.map((address) => address.text)).toEqual(['192.0.2.1', '2001:db8::1']);
  });

  it('resolves relative paths against the base directory', () => {
    const config = parseConfig({ socket: 'run/s.sock', stateDir: '/abs/state' }, 'f', { baseDir: '/etc/sockpool' });
    expect(config.socket).toBe('/etc/sockpool/run/s.sock');
    expect(config.stateDir).toBe('/abs/state');
  });

  it('accepts its own output as input again (flags are applied on top of a parsed file)', () => {
    const config = loadConfigFile(join(repo, 'docs', 'sockpoold.example.toml'));
    expect(parseConfig(configInput(config), 'again')).toEqual(config);
  });
});

describe('loadConfigFile', () => {
  const toml = `
socket = "sock/sockpoold.sock"
logLevel = "debug"
[egress]
allow = ["10.0.0.0/8"]
[pool.defaults]
maxIdle = 4
[pool.defaults.keepAlive]
idleSec = 20
[[pool.origins]]
match = "*.example.com:443"
maxPerOrigin = 8
`;
  const json = {
    socket: 'sock/sockpoold.sock',
    logLevel: 'debug',
    egress: { allow: ['10.0.0.0/8'] },
    pool: {
      defaults: { maxIdle: 4, keepAlive: { idleSec: 20 } },
      origins: [{ match: '*.example.com:443', maxPerOrigin: 8 }],
    },
  };

  it('reads TOML and JSON into the same configuration, paths relative to the file', () => {
    writeFileSync(join(dir, 'a.toml'), toml);
    writeFileSync(join(dir, 'a.json'), JSON.stringify(json, null, 2));
    const fromToml = loadConfigFile(join(dir, 'a.toml'));
    const fromJson = loadConfigFile(join(dir, 'a.json'));
    expect(fromToml).toEqual(fromJson);
    expect(fromToml.socket).toBe(join(dir, 'sock', 'sockpoold.sock'));
    expect(fromToml.pool.defaults.maxIdle).toBe(4);
    expect(fromToml.pool.defaults.keepAlive).toEqual({ enabled: true, idleSec: 20, intervalSec: 10, count: 3 });
    expect(fromToml.pool.origins).toEqual([
      { match: expect.objectContaining({ text: '*.example.com:443' }), maxPerOrigin: 8 },
    ]);
  });

  it('accepts an empty TOML file (every default)', () => {
    writeFileSync(join(dir, 'empty.toml'), '# nothing\n');
    const config = loadConfigFile(join(dir, 'empty.toml'));
    expect(config.pool).toEqual(defaultConfig().pool);
  });

  it('refuses a JSON file holding null, as one holding a list: not taken for every default', () => {
    for (const [name, text] of [
      ['null.json', 'null\n'],
      ['list.json', '[]\n'],
    ]) {
      writeFileSync(join(dir, name!), text!);
      const error = configError(() => loadConfigFile(join(dir, name!)));
      expect(error.message, name).toContain(`invalid configuration in ${join(dir, name!)}`);
      expect(error.message, name).toMatch(/expected object/);
    }
  });

  it('names the file, line and column of a TOML syntax error', () => {
    writeFileSync(join(dir, 'bad.toml'), 'logLevel = "info"\n[pool]\nmaxIdleTotal = = 3\n');
    const error = configError(() => loadConfigFile(join(dir, 'bad.toml')));
    expect(error.message).toMatch(new RegExp(`^${join(dir, 'bad.toml')}:3:\\d+: invalid TOML: `));
    expect(error.fields).toMatchObject({ source: join(dir, 'bad.toml'), line: 3 });
  });

  it('names the file and line of a JSON syntax error', () => {
    writeFileSync(join(dir, 'bad.json'), '{\n  "logLevel": "info",\n}\n');
    const error = configError(() => loadConfigFile(join(dir, 'bad.json')));
    expect(error.message).toMatch(new RegExp(`^${join(dir, 'bad.json')}:3:\\d+: invalid JSON: `));
  });

  it('names the file and the key of a schema error', () => {
    writeFileSync(join(dir, 'bad-key.toml'), '[pool.defaults]\nmaxIdle = "x"\n');
    const error = configError(() => loadConfigFile(join(dir, 'bad-key.toml')));
    expect(error.message).toContain(`invalid configuration in ${join(dir, 'bad-key.toml')}`);
    expect(error.message).toContain('pool.defaults.maxIdle: expected number, received string');
  });

  it('refuses other extensions and missing files', () => {
    writeFileSync(join(dir, 'a.yaml'), 'logLevel: info\n');
    expect(configError(() => loadConfigFile(join(dir, 'a.yaml'))).message).toContain(
      'unknown config file type ".yaml"',
    );
    expect(configError(() => loadConfigFile(join(dir, 'missing.toml'))).message).toContain('ENOENT');
  });

  it('loads docs/sockpoold.example.toml', () => {
    const config = loadConfigFile(join(repo, 'docs', 'sockpoold.example.toml'));
    expect(config.metricsPort).toBe(9464);
    expect(config.egress.allowPorts).toEqual([80, 443, 8443]);
    expect(config.pool.origins.map((entry) => entry.match.text)).toEqual([
      '*.example.com:443',
      'api.example.com:443',
      '*:80',
    ]);
    expect(policyFor(config, 'api.example.com', 443)).toMatchObject({ minIdle: 2, maxIdle: 4, maxPerOrigin: 8 });
  });
});

describe('sockpoold with a directory it cannot create', () => {
  it('stops at start with SOCKPOOL_ERR_CONFIG naming stateDir or socket', () => {
    const file = join(dir, 'a-file');
    writeFileSync(file, '');
    for (const [args, expected] of [
      [['--socket', join(dir, 'sockpoold.sock'), '--state-dir', file], `stateDir: cannot create the directory ${file}`],
      [['--socket', join(file, 'sockpoold.sock'), '--state-dir', dir], `socket: cannot create the directory ${file}`],
      // Longer than sun_path holds: bind() failed with ENAMETOOLONG and exit 1 (systemd restarts that for ever).
      [
        ['--socket', join(dir, `${'s'.repeat(120)}.sock`), '--state-dir', dir],
        'invalid configuration in command-line flags:\n  --socket: ',
      ],
      // Under a pseudo-filesystem mkdir answers ENOENT with the parent there: Node's recursive mkdirSync looped for
      // ever on it, synchronously (SIGTERM could not stop the daemon).
      [['--socket', join(dir, 'sockpoold.sock'), '--state-dir', '/proc/sockpool-nope'], 'stateDir: cannot create'],
    ] as Array<[string[], string]>) {
      let failure: { status: number | null; stderr: string } | undefined;
      try {
        execFileSync(process.execPath, [daemonMain, ...args], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'pipe'],
          timeout: 30_000,
          killSignal: 'SIGKILL',
        });
      } catch (error) {
        failure = error as { status: number | null; stderr: string };
      }
      // Exit status 2, as for a configuration the parser refused.
      expect(failure?.status, expected).toBe(2);
      // Before: "sockpoold: EEXIST: EEXIST: file already exists, mkdir '…'", neither key nor SOCKPOOL_ERR_CONFIG.
      expect(failure?.stderr).toContain(`sockpoold: SOCKPOOL_ERR_CONFIG: ${expected}`);
    }
  });
});

describe("sockpoold's metrics endpoint when it cannot listen", () => {
  /** A start that fails: its exit status and what it said on stderr. */
  function failedStart(args: string[]): { status: number | null; stderr: string } {
    try {
      execFileSync(process.execPath, [daemonMain, '--socket', join(dir, 'd.sock'), '--state-dir', dir, ...args], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
        timeout: 30_000,
        killSignal: 'SIGKILL',
      });
    } catch (error) {
      return error as { status: number | null; stderr: string };
    }
    throw new Error('the daemon started');
  }

  it('names metricsHost for an address this host does not have: SOCKPOOL_ERR_CONFIG, exit 2 (not restarted)', () => {
    // (TEST-NET-3: no host has it.) Before: "sockpoold: EADDRNOTAVAIL: listen EADDRNOTAVAIL …", exit 1.
    writeFileSync(join(dir, 'm.toml'), 'metricsHost = "203.0.113.7"\nmetricsPort = 19470\n');
    const failure = failedStart(['--config', join(dir, 'm.toml')]);
    expect(failure.status).toBe(2);
    expect(failure.stderr).toContain(
      'sockpoold: SOCKPOOL_ERR_CONFIG: metricsHost/metricsPort: cannot listen on 203.0.113.7:19470 (EADDRNOTAVAIL',
    );
  });

  it('names metricsPort for a port another process holds: exit 1 (it may be freed; restarted)', async () => {
    const holder = createServer();
    await new Promise<void>((done) => holder.listen(0, '127.0.0.1', done));
    try {
      const port = (holder.address() as AddressInfo).port;
      const failure = failedStart(['--metrics-port', String(port)]);
      expect(failure.status).toBe(1);
      expect(failure.stderr).toContain(`sockpoold: EADDRINUSE: metricsPort: 127.0.0.1:${port} is in use by another`);
    } finally {
      holder.close();
    }
  });
});

describe('sockpoold flags', () => {
  it('takes port numbers in decimal digits only', () => {
    // Number() read "0x50" as 80 and "1e3" as 1000: the daemon started on a port nobody wrote.
    for (const args of [
      ['--metrics-port', '0x50'],
      ['--metrics-port', '1e3'],
      ['--allow-port', '8e1'],
    ]) {
      let failure: { status: number; stderr: string } | undefined;
      try {
        execFileSync(process.execPath, [daemonMain, '--socket', join(dir, 's.sock'), '--state-dir', dir, ...args], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'pipe'],
          timeout: 30_000,
        });
      } catch (error) {
        failure = error as { status: number; stderr: string };
      }
      expect(failure?.status, args.join(' ')).toBe(2);
      expect(failure?.stderr).toContain(`argument '${args[1]}' is invalid. must be a port number (0-65535)`);
    }
  });
});

describe('applyFlags', () => {
  const base = () =>
    parseConfig(
      {
        egress: { allow: ['10.0.0.0/8'], deny: ['203.0.113.0/24'], allowPorts: [80, 443, 8443] },
        dns: { resolve: ['a.example:443:192.0.2.1'] },
        metricsPort: 9000,
      },
      'file',
    );

  it('appends allow, deny and resolve; replaces allowPort and scalars', () => {
    const config = applyFlags(base(), {
      allow: ['192.168.1.0/24'],
      deny: ['198.51.100.7'],
      allowPort: [8080],
      resolve: ['b.example:80:192.0.2.2'],
      metricsPort: 0,
      logLevel: 'warn',
      socket: 'x.sock',
      stateDir: '/tmp/state',
    });
    const texts = (list: Array<{ text: string }>) => list.map((entry) => entry.text);
    expect(texts(config.egress.allow)).toEqual(['10.0.0.0/8', '192.168.1.0/24']);
    expect(texts(config.egress.deny)).toEqual(['203.0.113.0/24', '198.51.100.7/32']);
    expect(config.egress.allowPorts).toEqual([8080]);
    expect(texts(config.dns.resolve)).toEqual(['a.example:443:192.0.2.1', 'b.example:80:192.0.2.2']);
    expect(config.metricsPort).toBe(0);
    expect(config.logLevel).toBe('warn');
    expect(config.socket).toBe(join(process.cwd(), 'x.sock'));
    expect(config.stateDir).toBe('/tmp/state');
  });

  it('leaves everything alone without flags, and does not modify its input', () => {
    const input = base();
    const copy = structuredClone(input);
    expect(applyFlags(input, {})).toEqual(copy);
    applyFlags(input, { allow: ['192.168.0.0/16'], allowPort: [1] });
    expect(input).toEqual(copy);
  });

  it('names the flag in errors', () => {
    const error = configError(() => applyFlags(base(), { allow: ['1.2.3.4/40'], logLevel: 'loud', allowPort: [0] }));
    expect(error.message).toContain('invalid configuration in command-line flags');
    expect(error.message).toContain('--allow: expected a CIDR');
    expect(error.message).toContain('--log-level: expected one of');
    expect(error.message).toContain('--allow-port:');
  });

  it('appends --warm-tls entries, sets --ca-file, and names them in errors', () => {
    const config = applyFlags(base(), { warmTls: ['api.example.com:443', '*'], caFile: 'ca.pem' });
    expect(config.tls.warm.map((match) => match.text)).toEqual(['api.example.com:443', '*']);
    expect(config.tls.caFile).toBe(resolve(process.cwd(), 'ca.pem'));
    const error = configError(() => applyFlags(base(), { warmTls: ['no port'] }));
    expect(error.message).toContain('--warm-tls: expected "*" or "host:port"');
  });

  it('wants clientCert and clientKey together', () => {
    const error = configError(() =>
      parseConfig({ pool: { origins: [{ match: 'a.example:443', clientCert: 'c.pem' }] } }, 'test'),
    );
    expect(error.message).toContain('pool.origins[0].clientKey: clientCert and clientKey go together');
  });

  it('takes warmTlsOnMiss "session" or "tcp" per origin, and names a bad value', () => {
    const config = parseConfig(
      { pool: { defaults: { warmTlsOnMiss: 'tcp' }, origins: [{ match: 'a.example:443', warmTlsOnMiss: 'session' }] } },
      'test',
    );
    expect(policyFor(config, 'a.example', 443).warmTlsOnMiss).toBe('session');
    expect(policyFor(config, 'b.example', 443).warmTlsOnMiss).toBe('tcp');
    const error = configError(() => parseConfig({ pool: { defaults: { warmTlsOnMiss: 'relay' } } }, 'test'));
    expect(error.message).toContain('pool.defaults.warmTlsOnMiss');
  });
});

describe('policyFor', () => {
  const config = (): SockpoolConfig =>
    parseConfig(
      {
        pool: {
          defaults: { maxIdle: 8, keepAlive: { idleSec: 40 } },
          origins: [
            { match: '*.example.com:443', maxPerOrigin: 6, maxIdle: 6, keepAlive: { count: 9 } },
            { match: 'api.example.com:*', minIdle: 3, keepAlive: { idleSec: 5 } },
            { match: '*:80', idleTtlMs: 1000 },
            { match: '[2001:db8::1]:443', device: 'eth1' },
            { match: 'tiny.example.com:443', maxPerOrigin: 2, maxIdle: 2 },
            { match: '*.example.com:*', maxIdle: 5 },
          ],
        },
      },
      'f',
    );

  it('returns the defaults for an origin nothing matches', () => {
    const policy = policyFor(config(), 'other.org', 443);
    expect(policy).toEqual({ ...config().pool.defaults });
    expect(policy.keepAlive).toEqual({ enabled: true, idleSec: 40, intervalSec: 10, count: 3 });
  });

  it('merges every matching entry in order, keepAlive key by key', () => {
    const policy = policyFor(config(), 'API.Example.com.', 443);
    expect(policy).toMatchObject({ minIdle: 3, maxIdle: 5, maxPerOrigin: 6, idleTtlMs: 60000 });
    expect(policy.keepAlive).toEqual({ enabled: true, idleSec: 5, intervalSec: 10, count: 9 });
    expect(policyFor(config(), 'api.example.com', 80)).toMatchObject({ minIdle: 3, maxIdle: 5, idleTtlMs: 1000 });
  });

  it('matches *.suffix on subdomains only, * on any host, and IPv6 literals', () => {
    expect(policyFor(config(), 'example.com', 443).maxPerOrigin).toBe(256);
    expect(policyFor(config(), 'a.b.example.com', 443).maxPerOrigin).toBe(6);
    expect(policyFor(config(), 'badexample.com', 443).maxPerOrigin).toBe(256);
    expect(policyFor(config(), '192.0.2.1', 80).idleTtlMs).toBe(1000);
    expect(policyFor(config(), '[2001:DB8::1]', 443).device).toBe('eth1');
    expect(policyFor(config(), '2001:db8::1', 443).device).toBe('eth1');
  });

  it('clamps when several entries together break minIdle <= maxIdle <= maxPerOrigin', () => {
    // tiny: maxPerOrigin 2, then the later `*.example.com:*` entry sets maxIdle 5.
    const policy = policyFor(config(), 'tiny.example.com', 443);
    expect(policy.maxPerOrigin).toBe(2);
    expect(policy.maxIdle).toBe(2);
    expect(policy.minIdle).toBeLessThanOrEqual(policy.maxIdle);
  });

  it('returns a fresh object every time', () => {
    const shared = config();
    const first = policyFor(shared, 'x.org', 443);
    first.keepAlive.idleSec = 1;
    first.maxIdle = 0;
    expect(policyFor(shared, 'x.org', 443).keepAlive.idleSec).toBe(40);
    expect(shared.pool.defaults.maxIdle).toBe(8);
  });
});

// docs/config.md: one section per key with the same parts, the default stated there equal to the code's, and every
// example a valid configuration on its own.
describe('docs/config.md', () => {
  const doc = readFileSync(join(repo, 'docs', 'config.md'), 'utf8');
  const sections = new Map<string, string>();
  for (const part of doc.split(/^### /m).slice(1)) {
    const heading = /^`([^`]+)`/.exec(part);
    if (heading?.[1]) sections.set(heading[1], part);
  }

  /** Every key path of the schema ("pool.defaults.keepAlive.idleSec", "pool.origins[].match"). */
  function keyPaths(schema: unknown, prefix: string, out: string[]): string[] {
    let current = schema as { def: Record<string, unknown> & { type: string } };
    for (;;) {
      const def = current.def;
      if (def.type === 'default' || def.type === 'prefault' || def.type === 'optional') {
        current = def.innerType as typeof current;
      } else if (def.type === 'pipe') {
        current = def.in as typeof current;
      } else {
        break;
      }
    }
    if (current.def.type === 'object') {
      for (const [key, child] of Object.entries(current.def.shape as Record<string, unknown>)) {
        const path = prefix ? `${prefix}.${key}` : key;
        out.push(path);
        keyPaths(child, path, out);
      }
    } else if (current.def.type === 'array') {
      const element = (current.def.element as typeof current).def;
      if (element.type === 'object') {
        // pool.origins entries: `match`, plus the origin-policy keys documented under pool.defaults; the entries
        // of other lists (proxies) have a section per key.
        for (const key of Object.keys(element.shape as Record<string, unknown>)) {
          if (prefix !== 'pool.origins') out.push(`${prefix}[].${key}`);
          else if (key === 'match') out.push(`${prefix}[].match`);
          else expect(sections.has(`pool.defaults.${key}`), `pool.defaults.${key} documented`).toBe(true);
        }
      }
    }
    return out;
  }

  const keys = keyPaths(configSchema, '', []);

  it('has a section for every key, and none for keys that do not exist', () => {
    // The top-level tables are chapters (## access, ...); every key in them has its own section.
    const tables = ['access', 'quotas', 'egress', 'dns', 'tls', 'fleet', 'pool'];
    for (const table of tables) expect(doc).toMatch(new RegExp(`^## ${table}$`, 'm'));
    const documented = keys.filter((key) => !tables.includes(key));
    expect(documented.length).toBeGreaterThan(40);
    expect([...sections.keys()].sort()).toEqual(documented.sort());
  });

  it('gives every section the same parts, in order', () => {
    for (const [key, text] of sections) {
      const positions = ['**Type:**', '**Default:**', '**Flag:**', '**Example:**'].map((label) => text.indexOf(label));
      expect(
        positions.every((position) => position > 0),
        `${key}: all parts present`,
      ).toBe(true);
      expect(
        [...positions].sort((a, b) => a - b),
        `${key}: parts in order`,
      ).toEqual(positions);
      const description = text.slice(text.indexOf('\n'), positions[0]).trim();
      expect(description.length, `${key}: description`).toBeGreaterThan(20);
    }
  });

  it('states the defaults the code uses', () => {
    const defaults = defaultConfig() as unknown as Record<string, unknown>;
    let checked = 0;
    for (const [key, text] of sections) {
      const stated = /\*\*Default:\*\* `([^`]+)`/.exec(text)?.[1];
      if (stated === undefined) continue; // "none", or a default that depends on the machine (socket, stateDir)
      let value: unknown = defaults;
      for (const part of key.split('.')) value = (value as Record<string, unknown>)[part];
      expect(JSON.parse(stated), `default of ${key}`).toEqual(value);
      checked++;
    }
    expect(checked).toBeGreaterThan(35);
  });

  it('has examples that are valid configurations', () => {
    for (const [key, text] of sections) {
      const example = /```toml\n([\s\S]*?)```/.exec(text)?.[1];
      expect(example, `${key}: example`).toBeDefined();
      const raw = parseToml(example ?? '');
      expect(() => parseConfig(raw, `docs/config.md ${key}`), `${key}: example valid`).not.toThrow();
      // The example sets the key it documents (or, for an origins entry, the key inside the entry).
      const leaf = key.split('.').pop()?.replace('[]', '') ?? key;
      expect(example, `${key}: example sets it`).toMatch(new RegExp(`(^|\\n|\\[|\\.)${leaf.replace(/\[\]$/, '')}\\b`));
    }
  });
});
