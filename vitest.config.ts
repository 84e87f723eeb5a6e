import { defineConfig } from 'vitest/config';

// Tests start real processes, servers and sockets; they run in forks so a crashing native call cannot take the
// runner down, and each file gets its own process (fd counts per process stay meaningful).
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    testTimeout: 60_000,
    hookTimeout: 60_000,
    fileParallelism: true,
    maxWorkers: 2,
  },
});
