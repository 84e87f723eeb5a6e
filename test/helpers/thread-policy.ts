// The scheduling policy of each thread of a process, from /proc (sched(7): 0 SCHED_OTHER, 2 SCHED_RR).
import { readdirSync, readFileSync } from 'node:fs';

export interface ThreadPolicy {
  tid: number;
  name: string;
  policy: number;
  rtPriority: number;
}

export function threadPolicies(pid: number): ThreadPolicy[] {
  const threads: ThreadPolicy[] = [];
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    let stat: string;
    let name: string;
    try {
      stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      name = readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
    } catch {
      continue; // The thread ended meanwhile.
    }
    // After the command name in parentheses (which may hold spaces), fields from the third on: rt_priority is the
    // 40th field of stat(5), policy the 41st.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    threads.push({ tid: Number(tid), name, rtPriority: Number(fields[37]), policy: Number(fields[38]) });
  }
  return threads;
}

export const SCHED_OTHER = 0;
export const SCHED_RR = 2;
