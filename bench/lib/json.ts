// JSON for result files, laid out the way `biome format` lays it out (so `biome check .` passes on them): two
// spaces, and arrays of numbers, strings or booleans on one line when that line fits in the width.

export function formatJson(value: unknown, width = 120): string {
  const text = JSON.stringify(value, null, 2);
  const collapsed = text.replace(
    /^( *)("(?:[^"\\\n]|\\.)*": )?\[\n((?:[^[\]{}\n]*\n)*?) *\]/gm,
    (match, indent: string, key: string | undefined, body: string) => {
      const items = body
        .trimEnd()
        .split(',\n')
        .map((item) => item.trim());
      const line = `${indent}${key ?? ''}[${items.join(', ')}]`;
      return line.length <= width ? line : match;
    },
  );
  return `${collapsed}\n`;
}

/** A timestamp for result file names: 2026-11-25T18-22-04Z. */
export function stamp(date: Date): string {
  return date
    .toISOString()
    .replace(/[:.]/g, '-')
    .replace(/-\d{3}Z$/, 'Z');
}
