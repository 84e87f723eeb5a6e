// Tests never skip themselves: a missing prerequisite (root, iproute2, an IPv6 loopback) fails the test with a
// message that says what the machine lacks. `npm test` installs the system tools it can (scripts/ensure-test-tools).
export function requirePrerequisite(present: boolean, what: string): void {
  if (!present) throw new Error(`test prerequisite missing: ${what}`);
}
