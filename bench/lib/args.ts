// The benchmarks' few command-line flags, read the same way by every bench script.
const argv = process.argv.slice(2);

/** True when `--name` was given. */
export function flag(name: string): boolean {
  return argv.includes(name);
}

/** `--name N`: a positive number, or `fallback` when absent. */
export function option(name: string, fallback: number): number {
  const index = argv.indexOf(name);
  if (index === -1) return fallback;
  const value = Number(argv[index + 1]);
  if (!Number.isFinite(value) || value <= 0) throw new Error(`${name} needs a positive number`);
  return value;
}

/** `--name TEXT`, or undefined when absent. */
export function optionText(name: string): string | undefined {
  const index = argv.indexOf(name);
  return index === -1 ? undefined : argv[index + 1];
}
