// The shipped units under a real systemd (PID 1 of a systemd-nspawn container, scripts/systemd-lab.sh): socket
// activation, Type=notify, reload, the fd store across restarts, a watchdog restart, a clean stop, all with the
// unit's full sandbox. The service is test/fixtures/systemd-lab-service.mjs (our Notifier and listen-fds from dist/)
// until the daemon's own cycle test replaces it. Needs root; the first run builds the cached Debian root file
// system (about 35 s, needs deb.debian.org), later runs boot in about a second.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const projectRoot = fileURLToPath(new URL('..', import.meta.url));
const lab = join(projectRoot, 'scripts/systemd-lab.sh');
const smoke = join(projectRoot, 'test/fixtures/systemd-lab-smoke.sh');
const results = mkdtempSync(join(tmpdir(), 'sockpool-lab-test-'));
afterAll(() => rmSync(results, { recursive: true, force: true }));

describe('units under a real systemd', () => {
  it('activate, notify, reload, keep fds across restarts, restart on watchdog, stop', () => {
    if (process.getuid?.() !== 0) throw new Error('the systemd lab needs root (debootstrap, systemd-nspawn)');
    for (const file of ['dist/daemon/sd-notify.js', 'dist/daemon/listen-fds.js', 'dist/shared/native.js']) {
      if (!existsSync(join(projectRoot, file))) throw new Error(`${file} missing: run npm run build first`);
    }
    const run = spawnSync('bash', [lab, 'run', smoke, results], {
      encoding: 'utf8',
      env: { ...process.env, SOCKPOOL_LAB_TIMEOUT: '240' },
      timeout: 300_000,
    });
    const summaryPath = join(results, 'summary.txt');
    const summary = existsSync(summaryPath) ? readFileSync(summaryPath, 'utf8') : '';
    const context = `exit ${run.status}\n${summary}\n${run.stderr.slice(-4000)}`;
    expect(
      summary.split('\n').filter((line) => line.startsWith('FAIL')),
      context,
    ).toEqual([]);
    expect(summary).toMatch(/^ok watchdog-restart$/m);
    expect(summary).toMatch(/^ok restored-after-restart$/m);
    expect(run.status, context).toBe(0);
  }, 300_000);
});
