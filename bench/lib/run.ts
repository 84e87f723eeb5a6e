// How every bench script ends: clean up (daemons, children, the lab) whether it passed or failed, then exit 0 or 1.
export function runBench(main: () => Promise<void>, cleanup: () => Promise<void>, log: (text: string) => void): void {
  // Stopped by a signal (Ctrl-C, a timeout's SIGTERM): the daemons, origins and hostile processes started in
  // sessions of their own would outlive the benchmark (nginx and a daemon do not exit when their stdin closes).
  let stopping = false;
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      stopping = true;
      log(`benchmark stopped by ${signal}: cleaning up`);
      // What the cleanup closes under the running benchmark fails its requests: not a failure to report now.
      process.on('unhandledRejection', () => {});
      void cleanup().finally(() => process.exit(1));
    });
  }
  main().then(
    async () => {
      if (stopping) return;
      await cleanup();
      process.exit(0);
    },
    async (error: unknown) => {
      if (stopping) return;
      log(`benchmark failed: ${(error as Error).stack ?? String(error)}`);
      await cleanup();
      process.exit(1);
    },
  );
}
