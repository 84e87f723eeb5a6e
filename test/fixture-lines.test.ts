// The Python fixtures' output (test/fixtures/fixture_lines.py): their tests read it line by line and wait for counts
// of lines (test/daemon-trust-relay-memory waits for a `sent` per session), so a line must come out whole whichever
// thread says it. print() from several threads did not: a line and its newline are two writes, and two sessions'
// `sent` came out as `sentsent` and an empty line now and then, the test then waiting for ever.

import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect, it } from 'vitest';

const fixtures = join(import.meta.dirname, 'fixtures');

it('keeps every line whole when many threads say lines at once', async () => {
  const threads = 16;
  const lines = 2_000;
  const script = [
    'import sys, threading',
    `sys.path.insert(0, ${JSON.stringify(fixtures)})`,
    'from fixture_lines import say',
    `def run():\n    for _ in range(${lines}):\n        say('sent')`,
    `workers = [threading.Thread(target=run) for _ in range(${threads})]`,
    'for worker in workers: worker.start()',
    'for worker in workers: worker.join()',
  ].join('\n');
  const { stdout } = await promisify(execFile)('python3', ['-B', '-c', script], { maxBuffer: 16 * 1024 * 1024 });
  const said = stdout.split('\n');
  expect(said.pop()).toBe('');
  expect(said.filter((line) => line !== 'sent')).toEqual([]);
  expect(said.length).toBe(threads * lines);
});
