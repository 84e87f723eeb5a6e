// Child processes for the benchmarks: started with a raised fd limit, talking JSON lines on stdout, stopped when
// the benchmark ends (or dies: their stdin closes and the fixtures exit on that).
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { readSoftFdLimit } from '../../daemon/quotas.js';

export interface BenchChild {
  child: ChildProcess;
  pid: number;
  /** Resolves with the next stdout JSON line for which `accept` is true. */
  nextMessage<T = Record<string, unknown>>(accept?: (message: T) => boolean, timeoutMs?: number): Promise<T>;
  /** Writes one line to the child's stdin. */
  send(line: string): void;
  /** Everything the child wrote to stderr so far. */
  stderr(): string;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
});

export interface SpawnOptions {
  /** RLIMIT_NOFILE for the child (set with `ulimit -n` in a shell that then execs the command). */
  nofile?: number;
  /** Prepended to the command (after the ulimit shell), e.g. ['strace', '-c', '-f', '-o', file]. */
  wrap?: string[];
  /** A session of its own (setsid): with autogroup scheduling, a CPU share of its own, as a system service has. */
  ownSession?: boolean;
}

/**
 * The shell line that sets RLIMIT_NOFILE to `wanted`. Without CAP_SYS_RESOURCE the hard limit caps it: then it takes
 * the hard limit (nofileLimit() on the child, or grantedNofile() ahead, says which).
 */
function raiseNofile(wanted: number): string {
  return `ulimit -n ${wanted} 2>/dev/null || ulimit -n "$(ulimit -Hn)"`;
}

/** The RLIMIT_NOFILE a child spawned with `nofile: wanted` gets. */
export function grantedNofile(wanted: number): number {
  const shown = execFileSync('/bin/sh', ['-c', `${raiseNofile(wanted)}; ulimit -n`], { encoding: 'utf8' }).trim();
  return shown === 'unlimited' ? Number.POSITIVE_INFINITY : Number(shown);
}

/** Spawns `command` (argv) with stdin and stdout piped; stdout lines that parse as JSON are messages. */
export function spawnChild(command: string[], options: SpawnOptions = {}): BenchChild {
  const argv = [...(options.wrap ?? []), ...command];
  const shell = `${raiseNofile(options.nofile ?? 65536)}; exec "$0" "$@"`;
  const child = spawn('/bin/sh', ['-c', shell, ...argv], {
    stdio: ['pipe', 'pipe', 'pipe'],
    detached: options.ownSession ?? false,
  });
  children.add(child);
  child.on('exit', () => children.delete(child));
  child.stdin!.on('error', () => {}); // a child that exited early: its exit is reported elsewhere
  let errText = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    errText += chunk;
    if (errText.length > 1_000_000) errText = errText.slice(-500_000);
  });
  const queue: unknown[] = [];
  const waiters: Array<{ accept: (message: unknown) => boolean; resolve: (message: unknown) => void }> = [];
  const deliver = (message: unknown) => {
    const index = waiters.findIndex((waiter) => waiter.accept(message));
    if (index === -1) {
      queue.push(message);
      return;
    }
    const [waiter] = waiters.splice(index, 1);
    waiter!.resolve(message);
  };
  createInterface({ input: child.stdout! }).on('line', (line) => {
    if (!line.startsWith('{')) return;
    try {
      deliver(JSON.parse(line));
    } catch {}
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return {
    child,
    pid: child.pid!,
    nextMessage<T>(accept: (message: T) => boolean = () => true, timeoutMs = 30_000): Promise<T> {
      const queued = queue.findIndex((message) => accept(message as T));
      if (queued !== -1) return Promise.resolve(queue.splice(queued, 1)[0] as T);
      return new Promise<T>((resolve, reject) => {
        const timer = setTimeout(() => {
          reject(new Error(`${command.join(' ')}: no expected message within ${timeoutMs} ms\n${errText}`));
        }, timeoutMs);
        const waiter = {
          accept: (message: unknown) => accept(message as T),
          resolve: (message: unknown) => {
            clearTimeout(timer);
            resolve(message as T);
          },
        };
        waiters.push(waiter);
        void exited.then(() => {
          clearTimeout(timer);
          reject(new Error(`${command.join(' ')} exited (${child.exitCode ?? child.signalCode}):\n${errText}`));
        });
      });
    },
    send(line: string) {
      child.stdin!.write(`${line}\n`);
    },
    stderr: () => errText,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** A field of /proc/<pid>/status in bytes (VmRSS, VmHWM, ...); the kernel reports kB. */
export function procStatusBytes(pid: number, field: string): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const match = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status);
  if (!match) throw new Error(`/proc/${pid}/status has no ${field}`);
  return Number(match[1]) * 1024;
}

/** The soft RLIMIT_NOFILE of a running process (from /proc/<pid>/limits). */
export function nofileLimit(pid: number): number {
  return readSoftFdLimit(`/proc/${pid}/limits`) ?? Number.POSITIVE_INFINITY;
}

export function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** CPU time (user + system) of a process so far, in ms, from /proc/<pid>/stat. */
export function cpuTimeMs(pid: number | 'self'): number {
  const { userMs, systemMs } = cpuTimesMs(pid);
  return userMs + systemMs;
}

/**
 * User and system (kernel) CPU time of a process so far, in ms (10 ms resolution), from /proc/<pid>/stat; and that of
 * its children that ended and were waited for (`childrenMs`: a process that starts others reads its own with 'self').
 */
export function cpuTimesMs(pid: number | 'self'): { userMs: number; systemMs: number; childrenMs: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // Fields after the command: state is index 0, so utime (14th overall) is index 11, stime 12, cutime 13 and
  // cstime 14. USER_HZ is 100 on Linux.
  return {
    userMs: Number(fields[11]) * 10,
    systemMs: Number(fields[12]) * 10,
    childrenMs: (Number(fields[13]) + Number(fields[14])) * 10,
  };
}

/**
 * CPU time of every thread of a process so far, in ms with ns precision (the first field of each thread's
 * /proc/<pid>/task/<tid>/schedstat). Threads that ended are not counted: take it around a span its threads live
 * through.
 */
export function threadsCpuMs(pid: number): number {
  let ns = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // (The thread ended between the listing and the read.)
    }
  }
  return ns / 1e6;
}

export interface SyscallCount {
  syscall: string;
  calls: number;
  errors: number;
}

/**
 * Attaches `strace -c` to the threads of a running process and returns a function that detaches it (SIGINT) and
 * yields the per-syscall counts. Tracing slows the process many times over: use it for counts, not for time.
 */
export async function attachStrace(pid: number, outFile: string): Promise<() => Promise<SyscallCount[]>> {
  const tids = readdirSync(`/proc/${pid}/task`);
  const tracer = spawn('strace', ['-c', '-o', outFile, ...tids.flatMap((tid) => ['-p', tid])], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  children.add(tracer);
  let err = '';
  tracer.stderr!.setEncoding('utf8');
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`strace did not attach:\n${err}`)), 10_000);
    tracer.stderr!.on('data', (chunk: string) => {
      err += chunk;
      if ((err.match(/attached/g) ?? []).length >= tids.length) {
        clearTimeout(timer);
        resolve();
      }
    });
    tracer.once('exit', () => {
      clearTimeout(timer);
      reject(new Error(`strace exited:\n${err}`));
    });
  });
  return async () => {
    const exited = new Promise<void>((resolve) => tracer.once('exit', () => resolve()));
    tracer.kill('SIGINT');
    await exited;
    children.delete(tracer);
    const counts: SyscallCount[] = [];
    for (const line of readFileSync(outFile, 'utf8').split('\n')) {
      // % time     seconds  usecs/call     calls    errors syscall
      const match = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*([a-z_0-9]+)\s*$/.exec(line);
      if (match && match[3] !== 'total') {
        counts.push({ syscall: match[3]!, calls: Number(match[1]), errors: Number(match[2] ?? 0) });
      }
    }
    return counts.sort((a, b) => b.calls - a.calls);
  };
}
