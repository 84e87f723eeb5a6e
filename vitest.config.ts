import { defineConfig } from 'vitest/config';

// Two tiers (README, "The two commands"):
// - unit:   `npm test` — any user, any Linux machine: in-process tests and tests against real local processes
//           (daemon, workers, loopback servers).
// - system: `npm run test:system`, as root — what needs root or kernel features: network namespaces, `unshare -n`,
//           socket marks, clients of other uids, the systemd lab. Files named `*.system.test.ts`. The tier's
//           global setup (test/system-prerequisites.ts) fails the run at once, naming what the machine lacks.
// Tests start real processes, servers and sockets; they run in forks so a crashing native call cannot take the
// runner down, and each file gets its own process (fd counts per process stay meaningful).
const shared = {
  pool: 'forks',
  testTimeout: 60_000,
  hookTimeout: 60_000,
  fileParallelism: true,
  maxWorkers: 2,
  // Ends the child processes a test or file left running (test/helpers/children.ts).
  setupFiles: ['test/helpers/reap-children.ts'],
} as const;

export default defineConfig({
  test: {
    projects: [
      {
        test: {
          ...shared,
          name: 'unit',
          include: ['test/**/*.test.ts'],
          exclude: ['test/**/*.system.test.ts'],
        },
      },
      {
        test: {
          ...shared,
          name: 'system',
          include: ['test/**/*.system.test.ts'],
          globalSetup: ['test/system-prerequisites.ts'],
        },
      },
    ],
  },
});
