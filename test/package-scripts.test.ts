// The install contract between .npmrc and package.json (README, "Needs"): `npm install` runs no install script
// (`ignore-scripts`), so every npm from 9 on installs the same way, and the scripts the README names build what
// is missing themselves. With `ignore-scripts` npm also skips the pre- and post- scripts of `npm run` and
// `npm test`: a `pretest` would silently never run, so none may exist. An npm older than 9 (it rewrites the
// lockfile) is stopped by the first script the README's commands run, with a message naming what is needed.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const projectRoot = fileURLToPath(new URL('..', import.meta.url));
const scripts: Record<string, string> = JSON.parse(readFileSync(join(projectRoot, 'package.json'), 'utf8')).scripts;

/** The settings in .npmrc (comments and blank lines dropped). */
function npmrcSettings(): Map<string, string> {
  const settings = new Map<string, string>();
  for (const line of readFileSync(join(projectRoot, '.npmrc'), 'utf8').split('\n')) {
    const text = line.trim();
    if (text === '' || text.startsWith('#') || text.startsWith(';')) continue;
    const equals = text.indexOf('=');
    settings.set(text.slice(0, equals).trim(), text.slice(equals + 1).trim());
  }
  return settings;
}

describe('install scripts', () => {
  it('.npmrc turns install scripts off, so no npm runs node-libcurl’s own build', () => {
    expect(npmrcSettings().get('ignore-scripts')).toBe('true');
  });

  it('package.json has no lifecycle, pre- or post- script (npm would skip them under ignore-scripts)', () => {
    const lifecycle = ['preinstall', 'install', 'postinstall', 'prepare', 'prepublish', 'prepack', 'postpack'];
    const skipped = Object.keys(scripts).filter((name) => {
      if (lifecycle.includes(name)) return true;
      const hooked = /^(pre|post)(.+)$/.exec(name)?.[2];
      return hooked !== undefined && hooked in scripts;
    });
    expect(skipped).toEqual([]);
  });

  it('every script that runs built code (dist/, the workers under vitest) builds what is missing first', () => {
    expect(scripts['build:all']).toBe('node scripts/build-native.mjs && tsc -p tsconfig.json');
    const runsBuiltCode = Object.keys(scripts).filter((name) =>
      /\bvitest\b|\bdist\/|scripts\/demo\.mjs/.test(scripts[name] ?? ''),
    );
    expect(runsBuiltCode).toEqual(expect.arrayContaining(['demo', 'test', 'bench', 'bench:peers']));
    for (const name of runsBuiltCode) expect(scripts[name], name).toMatch(/^(node [^&]+ && )?npm run build:all && /);
  });
});

describe('npm too old', () => {
  /** Runs a project script as npm `version` would (npm says who it is in npm_config_user_agent). */
  function runUnder(version: string | undefined, script: string) {
    const { npm_config_user_agent: _agent, ...env } = process.env;
    if (version !== undefined) env.npm_config_user_agent = `npm/${version} node/v20.20.2 linux x64 workspaces/false`;
    return spawnSync(process.execPath, [join(projectRoot, script)], { env, encoding: 'utf8', timeout: 30_000 });
  }

  it('package.json asks for npm 9 or later (npm warns during the install)', () => {
    const engines = JSON.parse(readFileSync(join(projectRoot, 'package.json'), 'utf8')).engines;
    expect(engines.npm).toBe('>=9');
  });

  it.each(['scripts/ensure-test-tools.mjs', 'scripts/build-native.mjs'])(
    '%s stops at once under npm 8, naming the npm needed',
    (script) => {
      const run = runUnder('8.19.4', script);
      expect(run.status).toBe(1);
      expect(run.stderr).toContain('sockpool needs npm 9 or later; this is npm 8.19.4');
      expect(run.stdout).toBe(''); // nothing checked, installed or built
    },
  );

  it('lets npm 9, 10 and 11 through, and a script started without npm', () => {
    for (const version of ['9.2.0', '10.9.2', '11.6.2', undefined]) {
      expect(runUnder(version, 'scripts/require-npm.mjs'), String(version)).toMatchObject({ status: 0, stderr: '' });
    }
  });
});
