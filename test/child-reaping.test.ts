// Children a test starts cannot outlive it (test/helpers/children.ts). Runs vitest itself on the fixture files in
// test/fixtures/child-reaping/, whose tests start real daemons and leave them: in a test that times out, in passing
// tests (to the next test, or for good), in a beforeAll, and in a fork that SIGKILLs itself; and busy loops that
// starve a CPU (test/helpers/starve-cpu.ts) in a test that times out. Then reads the inner
// run's JSON report, and /proc for every daemon the fixtures wrote down.
import { once } from 'node:events';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { spawnChild } from './helpers/children.js';
import { eventually, repoRoot } from './helpers/daemon.js';

interface JsonReport {
  testResults: Array<{
    name: string;
    message: string;
    assertionResults: Array<{ title: string; status: string; failureMessages: string[] }>;
  }>;
}

function alive(pid: number): boolean {
  try {
    // Field 3 of stat is the state; a zombie has exited and only waits for its parent to reap it.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

describe('child processes of tests', () => {
  it('are ended with the failed test, the file or the fork that started them; one left running fails the file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'child-reaping-'));
    try {
      const reportFile = join(dir, 'report.json');
      const vitest = spawnChild(
        process.execPath,
        [
          join(repoRoot, 'node_modules', 'vitest', 'vitest.mjs'),
          'run',
          // Loads the config in place: the default bundles it into node_modules/.vite-temp (not writable for every user).
          '--configLoader',
          'runner',
          '--config',
          join(repoRoot, 'test', 'fixtures', 'child-reaping', 'vitest.config.ts'),
          '--reporter=json',
          `--outputFile=${reportFile}`,
        ],
        { cwd: repoRoot, env: { ...process.env, CHILD_REAPING_DIR: dir }, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let output = '';
      const collect = (chunk: Buffer) => {
        output += chunk;
      };
      vitest.stdout!.on('data', collect);
      vitest.stderr!.on('data', collect);
      const [code] = await once(vitest, 'close');
      expect(code, output).toBe(1);
      expect(existsSync(reportFile), output).toBe(true);
      const report = JSON.parse(readFileSync(reportFile, 'utf8')) as JsonReport;
      const file = (name: string) => report.testResults.find((result) => result.name.endsWith(name))!;
      const outcomes = (name: string) =>
        Object.fromEntries(
          file(name).assertionResults.map((test) => [test.title, [test.status, test.failureMessages.join('\n')]]),
        );

      const inTest = outcomes('in-test.fixture.ts');
      expect(inTest['times out with its daemon running']![0]).toBe('failed');
      // The next test of the same fork already finds that daemon gone.
      expect(inTest['finds the timed-out test daemon gone']).toEqual(['passed', '']);
      // A passing test may leave its daemon to the file's later tests and afterAll.
      expect(inTest['passes and leaves its daemon to the next test']).toEqual(['passed', '']);
      expect(inTest['stops the daemon the test before left it']).toEqual(['passed', '']);
      expect(inTest['passes but leaves its daemon running']).toEqual(['passed', '']);
      expect(inTest['stops its daemon without waiting for the exit']).toEqual(['passed', '']);
      // The one never stopped fails the file, by name; kill() without waiting for the exit is a stop, not a leak.
      expect(file('in-test.fixture.ts').message).toMatch(
        /^child process still running after the file's afterAll hooks, ended now: sockpoold on \S+passed\.sock \(pid \d+\)\. /,
      );

      const fileScope = file('file-scope.fixture.ts');
      expect(fileScope.assertionResults.map((test) => test.status)).toEqual(['passed', 'passed']);
      expect(fileScope.message).toMatch(
        /still running after the file's afterAll hooks, ended now: sockpoold on \S+file\.sock/,
      );

      expect(outcomes('fork-dies.fixture.ts')['kills its own fork']![0]).not.toBe('passed');
      expect(outcomes('starve-cpu.fixture.ts')['times out starving a CPU']![0]).toBe('failed');

      const pids = readdirSync(dir)
        .filter((name) => name.endsWith('.pid'))
        .map((name) => [name, Number(readFileSync(join(dir, name), 'utf8'))] as const);
      expect(pids.map(([name]) => name).sort()).toEqual(
        [
          'busy-loop-0.pid',
          'busy-loop-1.pid',
          'file.pid',
          'fork.pid',
          'handed-on.pid',
          'passed.pid',
          'stopped.pid',
          'timed-out.pid',
        ].sort(),
      );
      // The fork's daemon is killed by the kernel (its parent-death signal) and reaped by whoever adopted it.
      await eventually(
        () => pids.every(([, pid]) => !alive(pid)),
        () => `daemons still running: ${pids.filter(([, pid]) => alive(pid)).join(' ')}`,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
