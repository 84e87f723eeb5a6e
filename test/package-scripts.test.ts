// The install contract between .npmrc and package.json (README, "Needs"): `npm install` runs no install script
// (`ignore-scripts`), so every npm from 9 on installs the same way, and the scripts the README names build what
// is missing themselves. With `ignore-scripts` npm also skips the pre- and post- scripts of `npm run` and
// `npm test`: a `pretest` would silently never run, so none may exist.
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
