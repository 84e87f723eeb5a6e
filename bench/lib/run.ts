// How every bench script ends: clean up (daemons, children, the lab) whether it passed or failed, then exit 0 or 1.
export function runBench(main: () => Promise<void>, cleanup: () => Promise<void>, log: (text: string) => void): void {
  main().then(
    async () => {
      await cleanup();
      process.exit(0);
    },
    async (error: unknown) => {
      log(`benchmark failed: ${(error as Error).stack ?? String(error)}`);
      await cleanup();
      process.exit(1);
    },
  );
}
