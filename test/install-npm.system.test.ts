// A fresh clone installed with an older npm (README, "Needs"). npm before 11.16 ignores package.json's
// `allowScripts`; the project's .npmrc turns install scripts off instead, and `npm run demo` / `npm test` build
// what is missing. This clones the committed HEAD of this checkout into a temporary directory, installs it with
// npm 10.9.2 (what Node 22 ships), fetched from the registry, and runs the README's two commands through that npm
// (`npm test` limited to one file). System tier: it needs the network to the npm registry and takes minutes (it
// compiles node-libcurl). Uncommitted changes are not part of the clone.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { stripVTControlCharacters } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const projectRoot = fileURLToPath(new URL('..', import.meta.url));
const olderNpm = '10.9.2';
const minutes = 60_000;

interface Finished {
  code: number | null;
  output: string;
}

/** Process groups still running; afterAll kills what a failed or timed-out test left behind. */
const running = new Set<number>();

/**
 * Runs a command to its end, stdout and stderr together. It gets its own process group, killed whole when it
 * outlives `timeoutMs` (`npm run demo` starts a daemon).
 */
function run(command: string, args: string[], options: { cwd: string; env: NodeJS.ProcessEnv; timeoutMs: number }) {
  return new Promise<Finished>((resolve, reject) => {
    const child = spawn(command, args, { ...options, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    if (child.pid !== undefined) running.add(child.pid);
    let output = '';
    child.stdout.on('data', (chunk) => {
      output += chunk;
    });
    child.stderr.on('data', (chunk) => {
      output += chunk;
    });
    const timer = setTimeout(() => {
      try {
        if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
      } catch {} // the group is gone already
    }, options.timeoutMs);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`${command} could not be started: ${error.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (child.pid !== undefined) running.delete(child.pid);
      resolve({ code: signal === null ? code : null, output });
    });
  });
}

function tail(text: string): string {
  return text.length > 8000 ? `...${text.slice(-8000)}` : text;
}

const workDir = mkdtempSync(join(tmpdir(), 'sockpool-install-npm-'));
afterAll(() => {
  for (const group of running) {
    try {
      process.kill(-group, 'SIGKILL');
    } catch {} // the group is gone already
  }
  rmSync(workDir, { recursive: true, force: true });
});
const cloneDir = join(workDir, 'sockpool');
const npmDir = join(workDir, 'npm');
const npmBin = join(npmDir, 'bin');

/**
 * What a user's shell has: the npm under test first on PATH (nested `npm run` finds it), none of the npm_*
 * variables of the npm that may be running this test.
 */
function userEnv(): NodeJS.ProcessEnv {
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !/^npm_/i.test(name)));
  env.PATH = [npmBin, dirname(process.execPath), process.env.PATH].join(':');
  return env;
}

function npm(args: string[], timeoutMs: number) {
  return run(join(npmBin, 'npm'), args, { cwd: cloneDir, env: userEnv(), timeoutMs });
}

beforeAll(async () => {
  // npm's own tarball bundles its dependencies: unpacked, it runs. `npm pack` uses this machine's npm
  // configuration (registry, proxy, cache).
  mkdirSync(npmBin, { recursive: true });
  const packed = await run('npm', ['pack', `npm@${olderNpm}`, '--pack-destination', npmDir], {
    cwd: npmDir,
    env: userEnv(),
    timeoutMs: 5 * minutes,
  }).catch((error: Error) => ({ code: null, output: error.message }));
  if (packed.code !== 0) {
    throw new Error(
      `cannot fetch npm@${olderNpm} from the npm registry: this test needs npm on PATH and the network to the ` +
        `registry (npm config get registry).\n${tail(packed.output)}`,
    );
  }
  const unpacked = await run('tar', ['-xzf', `npm-${olderNpm}.tgz`], {
    cwd: npmDir,
    env: process.env,
    timeoutMs: minutes,
  });
  if (unpacked.code !== 0) throw new Error(`tar could not unpack npm-${olderNpm}.tgz:\n${unpacked.output}`);
  // As a global install links it (package/bin/npm, a shell script, would run the machine's global npm instead).
  symlinkSync(join(npmDir, 'package', 'bin', 'npm-cli.js'), join(npmBin, 'npm'));
  const cloned = await run('git', ['clone', '--quiet', '--no-hardlinks', projectRoot, cloneDir], {
    cwd: workDir,
    env: process.env,
    timeoutMs: 5 * minutes,
  }).catch((error: Error) => ({ code: null, output: error.message }));
  if (cloned.code !== 0) throw new Error(`git clone of ${projectRoot} failed (is git installed?):\n${cloned.output}`);
}, 10 * minutes);

describe(`a fresh clone installed with npm ${olderNpm}`, () => {
  it(
    'npm install fetches everything and runs no install script',
    async () => {
      const version = await npm(['--version'], minutes);
      expect(version.output.trim()).toBe(olderNpm);
      const installed = await npm(['install', '--no-audit', '--no-fund'], 15 * minutes);
      expect(installed.code, tail(installed.output)).toBe(0);
      // The Node that runs every script, and vitest's transformer binary (esbuild needs no install script).
      expect(existsSync(join(cloneDir, 'node_modules', '.bin', 'node'))).toBe(true);
      expect(existsSync(join(cloneDir, 'node_modules', '@esbuild', 'linux-x64', 'bin', 'esbuild'))).toBe(true);
      // node-libcurl's own install script (node-pre-gyp, then its fallback build) did not run.
      expect(existsSync(join(cloneDir, 'node_modules', 'node-libcurl', 'lib', 'binding'))).toBe(false);
      expect(existsSync(join(cloneDir, 'dist'))).toBe(false);
    },
    16 * minutes,
  );

  it(
    'npm run demo builds what is missing and sends requests through the daemon',
    async () => {
      const demo = await npm(['run', 'demo'], 30 * minutes);
      expect(demo.code, tail(demo.output)).toBe(0);
      expect(demo.output).toContain('applied patches/node-libcurl+5.1.2.patch');
      expect(demo.output).toMatch(/request 1: 200 "hello from the origin/);
      expect(demo.output).toContain('sockpoold stopped (exit 0)');
      // Independently of the build script's own check: each native module loads under the clone's Node, and
      // node-libcurl is the patched one.
      const script = [
        "require('better-sqlite3')",
        "require('unix-dgram')",
        "require('./native/build/Release/sockpool_native.node')",
        "if (typeof require('node-libcurl').Easy.prototype.responseHead !== 'function') throw new Error('unpatched')",
      ].join(';');
      const loaded = await run(join(cloneDir, 'node_modules', '.bin', 'node'), ['-e', script], {
        cwd: cloneDir,
        env: userEnv(),
        timeoutMs: minutes,
      });
      expect(loaded.code, loaded.output).toBe(0);
      expect(existsSync(join(cloneDir, 'dist', 'client', 'index.js'))).toBe(true);
      expect(existsSync(join(cloneDir, 'dist', 'daemon', 'main.js'))).toBe(true);
    },
    32 * minutes,
  );

  it(
    'npm test runs (ensure tools, build, lint, vitest through esbuild) on one file',
    async () => {
      const tested = await npm(['test', '--', 'test/package-scripts.test.ts'], 15 * minutes);
      expect(tested.code, tail(tested.output)).toBe(0);
      expect(tested.output).toContain('all native modules up to date');
      expect(stripVTControlCharacters(tested.output)).toMatch(/Test Files\s+1 passed/);
    },
    16 * minutes,
  );
});
