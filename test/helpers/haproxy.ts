import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { until } from './wait.js';

/** The HAProxy configuration operators get; tests and the bench run exactly it. */
export const HAPROXY_CFG = resolve(import.meta.dirname, '../../deploy/haproxy/haproxy.cfg');

export interface HaproxyReplica {
  readonly name: string;
  readonly port: number;
  readonly adminPort: number;
}

export interface Haproxy {
  readonly child: ChildProcess;
  /** Everything HAProxy wrote (its log goes to stdout). */
  output(): string;
  /** `show stat` on the admin socket: each server's status (UP, DOWN, MAINT, "UP 1/2", ...). */
  status(): Promise<Record<string, string>>;
  /** One admin-socket command, e.g. `disable server agent_gateway_replicas/replica2`; its answer. */
  command(line: string): Promise<string>;
  waitUp(name: string): Promise<void>;
  stop(): Promise<void>;
}

/**
 * deploy/haproxy/haproxy.cfg in the foreground (-db) on `listenPort`, connecting to the two
 * replicas from `source` (the address they trust for PROXY headers).
 */
export function startHaproxy(options: { listenPort: number; source: string; replicas: readonly [HaproxyReplica, HaproxyReplica] }): Haproxy {
  const dir = mkdtempSync(join(tmpdir(), 'agw-haproxy-'));
  const socketPath = join(dir, 'stats.sock');
  const [first, second] = options.replicas;
  const child = spawn('haproxy', ['-f', HAPROXY_CFG, '-db'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: {
      ...process.env,
      AGW_LISTEN: `127.0.0.1:${options.listenPort}`,
      AGW_SOURCE: options.source,
      AGW_REPLICA1: `127.0.0.1:${first.port}`,
      AGW_REPLICA1_ADMIN: String(first.adminPort),
      AGW_REPLICA2: `127.0.0.1:${second.port}`,
      AGW_REPLICA2_ADMIN: String(second.adminPort),
      AGW_STATS_SOCKET: socketPath,
    },
  });
  let output = '';
  child.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.once('exit', (code) => (output += `\n[haproxy exited ${code}]`));
  // Not installed: say so (scripts/setup.sh installs Debian's haproxy) instead of an unhandled error.
  child.once('error', (error) => (output += `\n[haproxy did not start: ${error.message}; run scripts/setup.sh]`));

  async function command(line: string): Promise<string> {
    const socket = netConnect(socketPath);
    socket.on('error', () => {});
    let text = '';
    socket.on('data', (chunk: Buffer) => (text += chunk.toString()));
    await once(socket, 'connect');
    socket.end(`${line}\n`);
    await once(socket, 'close');
    return text;
  }

  async function status(): Promise<Record<string, string>> {
    const [header, ...rows] = (await command('show stat')).split('\n').filter((line) => line.length > 0);
    const columns = (header ?? '').replace(/^# /, '').split(',');
    const result: Record<string, string> = {};
    for (const row of rows) {
      const fields = row.split(',');
      result[fields[columns.indexOf('svname')]!] = fields[columns.indexOf('status')]!;
    }
    return result;
  }

  return {
    child,
    output: () => output,
    status,
    command,
    async waitUp(name) {
      await until(async () => {
        if (child.exitCode !== null || output.includes('[haproxy did not start')) throw new Error(`HAProxy is not running: ${output}`);
        return (await status().catch(() => ({}) as Record<string, string>))[name] === 'UP';
      }, 20_000, `HAProxy sees ${name} UP`);
    },
    async stop() {
      if (child.exitCode === null && child.pid !== undefined) {
        child.kill('SIGTERM');
        await once(child, 'exit');
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
