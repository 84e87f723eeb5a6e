// Summarizes V8 CPU profiles (.cpuprofile, from node --cpu-prof, e.g. peers.ts --profile): per file, the share of
// samples that were idle, and the functions with the most self time among the busy samples.
//
//   node dist/bench/profile-summary.js FILE_OR_DIR... [--top N]

import { readdirSync, readFileSync, statSync } from 'node:fs';
import { basename, join } from 'node:path';
import { option } from './lib/args.js';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
}

interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

const top = option('--top', 25);
const inputs = process.argv.slice(2).filter((arg, i, all) => !arg.startsWith('--') && all[i - 1] !== '--top');

function files(path: string): string[] {
  if (!statSync(path).isDirectory()) return [path];
  return readdirSync(path, { recursive: true })
    .map(String)
    .filter((name) => name.endsWith('.cpuprofile'))
    .map((name) => join(path, name));
}

function label(frame: ProfileNode['callFrame']): string {
  const name = frame.functionName || '(anonymous)';
  if (!frame.url) return name;
  const file = frame.url.replace(/^file:\/\//, '').replace(/.*\/node_modules\//, '');
  const short = file.includes('/dist/') ? file.slice(file.indexOf('/dist/') + 6) : basename(file);
  return `${name} ${short}:${frame.lineNumber + 1}`;
}

for (const file of inputs.flatMap(files)) {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map<string, number>();
  let total = 0;
  let idle = 0;
  for (let i = 0; i < profile.samples.length; i++) {
    const node = byId.get(profile.samples[i]!)!;
    const delta = profile.timeDeltas[i] ?? 0;
    total += delta;
    if (node.callFrame.functionName === '(idle)') {
      idle += delta;
      continue;
    }
    const key = label(node.callFrame);
    self.set(key, (self.get(key) ?? 0) + delta);
  }
  const busy = total - idle;
  process.stdout.write(
    `\n${file}\n  ${(total / 1000).toFixed(0)} ms profiled, ${(busy / 1000).toFixed(0)} ms busy ` +
      `(${((100 * busy) / total).toFixed(0)}%)\n`,
  );
  const rows = [...self].sort((a, b) => b[1] - a[1]).slice(0, top);
  for (const [key, us] of rows) {
    process.stdout.write(
      `  ${((100 * us) / busy).toFixed(1).padStart(5)}%  ${(us / 1000).toFixed(1).padStart(8)} ms  ${key}\n`,
    );
  }
}
