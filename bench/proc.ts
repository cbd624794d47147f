/**
 * What the benches read about processes from /proc: CPU time, RSS and process trees. No side
 * effects on import (bench/compare-proxies.ts installs exit and signal hooks; bench/sidecar.ts's
 * child processes must not get them), so every bench can share it.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

const CLK_TCK = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
  } catch {
    return 100;
  }
})();

interface ProcStat {
  readonly ppid: number;
  readonly cpuTicks: number;
  /** Plus the CPU of its children that exited and were reaped. */
  readonly cpuTicksWithReaped: number;
}

function readStat(pid: number): ProcStat | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
    const cpuTicks = Number(fields[11]) + Number(fields[12]);
    return { ppid: Number(fields[1]), cpuTicks, cpuTicksWithReaped: cpuTicks + Number(fields[13]) + Number(fields[14]) };
  } catch {
    return undefined;
  }
}

/** User + system CPU time of `pid` alone (not its children), ms at clock-tick resolution. */
export function cpuMs(pid: number): number {
  return ((readStat(pid)?.cpuTicks ?? 0) * 1000) / CLK_TCK;
}

/** `pid` and every process below it. */
export function processTree(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = readStat(Number(entry));
    if (!stat) continue;
    const list = children.get(stat.ppid) ?? [];
    list.push(Number(entry));
    children.set(stat.ppid, list);
  }
  const out: number[] = [];
  const stack = [pid];
  while (stack.length > 0) {
    const next = stack.pop()!;
    out.push(next);
    stack.push(...(children.get(next) ?? []));
  }
  return out;
}

/** VmRSS and VmHWM (peak RSS) of /proc/PID/status, KiB. */
function memoryKiB(pid: number): { rss: number; hwm: number } {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)\\s+kB`, 'm').exec(status)?.[1] ?? 0);
    return { rss: field('VmRSS'), hwm: field('VmHWM') };
  } catch {
    return { rss: 0, hwm: 0 };
  }
}

export interface Sample {
  /** Resident set summed over the processes, KiB. */
  readonly rssKiB: number;
  /** Each process's peak resident set (VmHWM), summed: an upper bound of the trees' peak. */
  readonly peakKiB: number;
  /** User + system CPU time of the processes, ms (clock-tick resolution). */
  readonly cpuMs: number;
  readonly pids: number[];
}

/** Summed over the trees of `roots` (each root and its descendants). */
export function sample(roots: readonly number[]): Sample {
  const pids = roots.flatMap((root) => processTree(root));
  let rss = 0;
  let peak = 0;
  let cpu = 0;
  for (const pid of pids) {
    const memory = memoryKiB(pid);
    rss += memory.rss;
    peak += memory.hwm;
    cpu += cpuMs(pid);
  }
  return { rssKiB: rss, peakKiB: peak, cpuMs: cpu, pids };
}

/** The hard RLIMIT_NOFILE of this process, which the proxies inherit. */
export function hardFileLimit(): number {
  const match = /^Max open files\s+\S+\s+(\S+)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
  return match && match[1] !== 'unlimited' ? Number(match[1]) : 1_048_576;
}

/**
 * CPU time (ms) the machine spent in processes outside the trees of `roots`: user + nice + system of
 * /proc/stat (with irq and softirq, which the kernel also charges to the running task's stime)
 * minus the trees' own (reaped children included). Sampled twice, the difference tells whether
 * something else ran during a measurement.
 */
export function foreignCpuMs(roots: readonly number[]): number {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  // user nice system idle iowait irq softirq: a task's stime includes the interrupts it was charged with.
  const busy = fields[0]! + fields[1]! + fields[2]! + fields[5]! + fields[6]!;
  let ours = 0;
  for (const pid of roots.flatMap((root) => processTree(root))) ours += readStat(pid)?.cpuTicksWithReaped ?? 0;
  return ((busy - ours) * 1000) / CLK_TCK;
}
