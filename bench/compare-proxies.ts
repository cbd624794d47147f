/**
 * The proxies bench/compare.ts measures, each started as its own process tree on 127.0.0.1 (what
 * it reads about them from /proc, RSS and CPU time of the whole tree, is bench/proc.ts).
 *
 * - ours: `node bin/agent-gateway.js --config FILE` (the compiled dist/), real authorization
 *   against PostgreSQL, audit on;
 * - nghttpx (-s, HTTP/2 proxy mode, mTLS with --verify-client) in front of squid (HTTP/1.1
 *   CONNECT), the baseline a team would otherwise deploy.
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, chownSync, openSync, readFileSync, writeFileSync, closeSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { processTree } from './proc.js';
import { stripTypeScriptTypes } from 'node:module';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export const ROOT = join(import.meta.dirname, '..');

export { foreignCpuMs, hardFileLimit, processTree, sample, type Sample } from './proc.js';

/** Resolves when something accepts TCP on 127.0.0.1:port, or rejects after `timeoutMs`. */
export async function waitForPort(port: number, timeoutMs: number, alive: () => boolean): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket: Socket = connect({ host: '127.0.0.1', port });
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (ok) return;
    if (!alive()) throw new Error(`the process meant to listen on ${port} exited`);
    if (Date.now() > deadline) throw new Error(`nothing listens on 127.0.0.1:${port} after ${timeoutMs} ms`);
    await sleep(50);
  }
}

export interface Proxy {
  readonly name: string;
  readonly port: number;
  /** Roots of the process trees whose RSS and CPU count as this proxy. */
  readonly pids: () => number[];
  readonly stop: () => Promise<void>;
  /** Ours: V8 heap figures from the admin /metrics endpoint (MiB), to tell heap from other memory. */
  readonly heap?: () => Promise<Record<string, number>>;
}

const exited = (proc: ChildProcess) => proc.exitCode !== null || proc.signalCode !== null;

/** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone. */
export async function stopProcess(proc: ChildProcess, graceMs = 3000): Promise<void> {
  if (exited(proc)) return;
  const gone = once(proc, 'exit');
  proc.kill('SIGTERM');
  const timer = setTimeout(() => {
    if (!exited(proc)) proc.kill('SIGKILL');
  }, graceMs);
  await gone;
  clearTimeout(timer);
}

function logFile(path: string): number {
  return openSync(path, 'a');
}

/** Every process this run started: killed with their descendants (nghttpx forks a worker) if the bench exits early. */
const started = new Set<ChildProcess>();

export function trackChild(proc: ChildProcess): ChildProcess {
  started.add(proc);
  proc.once('exit', () => started.delete(proc));
  return proc;
}

function killTrees(): void {
  for (const proc of started) {
    if (exited(proc) || proc.pid === undefined) continue;
    for (const pid of processTree(proc.pid).reverse()) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }
}
process.on('exit', killTrees);
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => process.exit(signal === 'SIGINT' ? 130 : 143));

function spawnLogged(command: string, args: string[], log: string): ChildProcess {
  const fd = logFile(log);
  const proc = spawn(command, args, { stdio: ['ignore', fd, fd] });
  closeSync(fd);
  proc.on('error', () => {});
  return trackChild(proc);
}

function tail(path: string): string {
  try {
    return readFileSync(path, 'utf8').split('\n').slice(-15).join('\n');
  } catch {
    return '';
  }
}

export interface OursOptions {
  readonly dir: string;
  readonly port: number;
  readonly adminPort: number;
  readonly certPath: string;
  readonly keyPath: string;
  readonly oid: string;
  readonly databaseUrl: string;
  readonly logLevel: string;
  readonly maxStreams: number;
  /** `[server] stream_window_bytes` and `session_window_bytes`. */
  readonly streamWindow: number;
  readonly sessionWindow: number;
  /** Node.js options before the script, e.g. --cpu-prof. */
  readonly nodeArgs?: readonly string[];
  /** Another checkout whose compiled build runs instead of this one's (bench --other-build), under `name`. */
  readonly root?: string;
  readonly name?: string;
}

/** Our gateway from dist/, as `agent-gateway --config FILE`; ready when /readyz answers 200. */
export async function startOurs(options: OursOptions): Promise<Proxy> {
  const tag = options.name === undefined ? 'gateway' : 'gateway-other';
  const configPath = join(options.dir, `${tag}.toml`);
  const q = JSON.stringify;
  writeFileSync(
    configPath,
    [
      '[server]',
      `listen_addr = ${q(`127.0.0.1:${options.port}`)}`,
      `tls_cert_path = ${q(options.certPath)}`,
      `tls_key_path = ${q(options.keyPath)}`,
      'shutdown_grace_ms = 500',
      `stream_window_bytes = ${options.streamWindow}`,
      `session_window_bytes = ${options.sessionWindow}`,
      '[policy]',
      `client_ext_oid = ${q(options.oid)}`,
      `database_url = ${q(options.databaseUrl)}`,
      '[observability]',
      `log_level = ${q(options.logLevel)}`,
      '[limits]',
      `max_streams_per_session = ${options.maxStreams}`,
      '[admin]',
      `listen_addr = ${q(`127.0.0.1:${options.adminPort}`)}`,
      '[audit]',
      'enabled = true',
      // The bench's destinations are loopback listeners: [egress] refuses loopback unless allowed.
      '[egress]',
      'allow_cidrs = ["127.0.0.0/8", "::1/128"]',
      '',
    ].join('\n'),
  );
  const log = join(options.dir, `${tag}.log`);
  const proc = spawnLogged(process.execPath, [...(options.nodeArgs ?? []), join(options.root ?? ROOT, 'bin/agent-gateway.js'), '--config', configPath], log);
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (exited(proc)) throw new Error(`agent-gateway exited with ${proc.exitCode ?? proc.signalCode}:\n${tail(log)}`);
    const status = await fetch(`http://127.0.0.1:${options.adminPort}/readyz`).then(
      (response) => response.status,
      () => 0,
    );
    if (status === 200) break;
    if (Date.now() > deadline) {
      await stopProcess(proc);
      throw new Error(`agent-gateway not ready after 20 s (readyz ${status}):\n${tail(log)}`);
    }
    await sleep(100);
  }
  await waitForPort(options.port, 5000, () => !exited(proc));
  const heap = async () => {
    const text = await fetch(`http://127.0.0.1:${options.adminPort}/metrics`).then((response) => response.text());
    const out: Record<string, number> = {};
    for (const name of ['process_resident_memory_bytes', 'nodejs_heap_size_total_bytes', 'nodejs_heap_size_used_bytes', 'nodejs_external_memory_bytes']) {
      const match = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)`, 'm').exec(text);
      if (match) out[name.replace(/_bytes$/, '_MiB')] = Math.round((Number(match[1]) / 1024 / 1024) * 10) / 10;
    }
    return out;
  };
  return { name: options.name ?? 'ours', port: options.port, pids: () => [proc.pid!], stop: () => stopProcess(proc), heap };
}

export interface FloorOptions {
  readonly dir: string;
  readonly port: number;
  readonly certPath: string;
  readonly keyPath: string;
  readonly maxStreams: number;
  readonly streamWindow: number;
  readonly sessionWindow: number;
  readonly maxSessionMemoryMb: number;
  readonly tls13Ciphers: string;
  /** Node flags for the floor's process (`--profile` profiles it as it does the gateway). */
  readonly nodeArgs?: readonly string[];
}

/**
 * bench/floor-proxy.ts as plain JavaScript (its types stripped here, so the child loads neither
 * tsx nor Node's own type stripper, which alone adds about 20 MiB): what node:http2 costs before
 * our gateway adds anything.
 */
export async function startFloor(options: FloorOptions): Promise<Proxy> {
  const { dir, nodeArgs, ...config } = options;
  const log = join(dir, 'floor.log');
  const script = join(dir, 'floor-proxy.mjs');
  writeFileSync(script, stripTypeScriptTypes(readFileSync(join(ROOT, 'bench', 'floor-proxy.ts'), 'utf8')));
  const proc = spawnLogged(process.execPath, [...(nodeArgs ?? []), script, JSON.stringify(config)], log);
  try {
    await waitForPort(options.port, 15_000, () => !exited(proc));
  } catch (error) {
    await stopProcess(proc);
    throw new Error(`the floor proxy did not start: ${(error as Error).message}\n${tail(log)}`);
  }
  return { name: FLOOR, port: options.port, pids: () => [proc.pid!], stop: () => stopProcess(proc) };
}

/** The floor proxy's name in results and tables. */
export const FLOOR = 'node floor';

export interface BaselineOptions {
  readonly dir: string;
  readonly port: number;
  readonly squidPort: number;
  readonly certPath: string;
  readonly keyPath: string;
  readonly clientCaPath: string;
  readonly workers: number;
  readonly maxStreams: number;
  readonly backendConnections: number;
  readonly streamWindow: number;
  readonly sessionWindow: number;
  /** squid's max_filedescriptors: at most the hard RLIMIT_NOFILE (squid cannot raise it). nghttpx keeps the inherited limit. */
  readonly maxFiles: number;
  /** nghttpx --tls13-ciphers (its server preference wins); undefined keeps nghttpx's default order. */
  readonly tls13Ciphers?: string;
}

/**
 * squid (HTTP/1.1 forward proxy; `squid -N`: one process, no daemon) and nghttpx in front of it
 * (`-s`: HTTP/2 proxy mode, every request including CONNECT goes to squid over HTTP/1.1, one
 * backend connection per tunnel).
 */
export async function startBaseline(options: BaselineOptions): Promise<Proxy> {
  const squidDir = join(options.dir, 'squid');
  execFileSync('mkdir', ['-p', squidDir]);
  const asRoot = process.getuid?.() === 0;
  if (asRoot) {
    // squid started as root runs as cache_effective_user (Debian: proxy); its files must be writable.
    const uid = Number(execFileSync('id', ['-u', 'proxy']).toString());
    const gid = Number(execFileSync('id', ['-g', 'proxy']).toString());
    chownSync(squidDir, uid, gid);
    chmodSync(options.dir, 0o711); // mkdtemp's 0700 would keep the proxy user out of squid/
  }
  const squidConf = join(squidDir, 'squid.conf');
  writeFileSync(
    squidConf,
    [
      `http_port 127.0.0.1:${options.squidPort}`,
      // Bound to loopback only: anything that can reach the port may CONNECT anywhere.
      'http_access allow all',
      'cache deny all',
      'cache_mem 0 MB',
      `pid_filename ${join(squidDir, 'squid.pid')}`,
      `access_log stdio:${join(squidDir, 'access.log')}`,
      `cache_log ${join(squidDir, 'cache.log')}`,
      'cache_store_log none',
      `coredump_dir ${squidDir}`,
      'netdb_filename none',
      'pinger_enable off',
      `max_filedescriptors ${options.maxFiles}`,
      'shutdown_lifetime 1 seconds',
      'visible_hostname localhost',
      'via off',
      'forwarded_for delete',
      // Tunnels idle as long as our gateway's idle_timeout_ms default (10 min).
      'read_timeout 10 minutes',
      '',
    ].join('\n'),
  );
  if (asRoot) execFileSync('chown', ['-R', 'proxy:proxy', squidDir]);
  const squidLog = join(options.dir, 'squid.out');
  const squid = spawnLogged('squid', ['-N', '-f', squidConf], squidLog);
  try {
    await waitForPort(options.squidPort, 15_000, () => !exited(squid));
  } catch (error) {
    await stopProcess(squid);
    throw new Error(`squid did not start: ${(error as Error).message}\n${tail(squidLog)}\n${tail(join(squidDir, 'cache.log'))}`);
  }

  const nghttpxLog = join(options.dir, 'nghttpx.err');
  const nghttpx = spawnLogged(
    'nghttpx',
    [
      '--conf=/dev/null',
      '-s',
      `--frontend=127.0.0.1,${options.port}`,
      `--backend=127.0.0.1,${options.squidPort}`,
      '--verify-client',
      `--verify-client-cacert=${options.clientCaPath}`,
      `--workers=${options.workers}`,
      `--backend-connections-per-host=${options.backendConnections}`,
      `--frontend-http2-max-concurrent-streams=${options.maxStreams}`,
      // The same windows as our gateway (registry/flow-control.ts): compare implementations, not defaults.
      `--frontend-http2-window-size=${options.streamWindow}`,
      `--frontend-http2-connection-window-size=${options.sessionWindow}`,
      '--backend-read-timeout=10m',
      '--no-ocsp',
      ...(options.tls13Ciphers ? [`--tls13-ciphers=${options.tls13Ciphers}`] : []),
      `--accesslog-file=${join(options.dir, 'nghttpx-access.log')}`,
      `--errorlog-file=${nghttpxLog}`,
      '--log-level=WARN',
      `--pid-file=${join(options.dir, 'nghttpx.pid')}`,
      options.keyPath,
      options.certPath,
    ],
    join(options.dir, 'nghttpx.out'),
  );
  try {
    await waitForPort(options.port, 15_000, () => !exited(nghttpx));
  } catch (error) {
    await stopProcess(nghttpx);
    await stopProcess(squid);
    throw new Error(`nghttpx did not start: ${(error as Error).message}\n${tail(nghttpxLog)}\n${tail(join(options.dir, 'nghttpx.out'))}`);
  }
  return {
    name: 'nghttpx+squid',
    port: options.port,
    pids: () => [nghttpx.pid!, squid.pid!],
    stop: async () => {
      await stopProcess(nghttpx);
      await stopProcess(squid);
    },
  };
}
