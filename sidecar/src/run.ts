import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { accessSync, constants as fs, readdirSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import { connect, Socket } from 'node:net';
import { constants as os } from 'node:os';
import { Command, CommanderError } from 'commander';
import { AgentGatewayError, EXIT } from '../../core/errors.js';
import { SIDECAR_OPTIONS, type OptionSpec } from './config.js';
import { startForwarder } from './forwarder.js';

/**
 * `agent-gateway-sidecar run [--socket PATH] [--hide DIR]... [--no-isolation] -- CMD [ARGS...]`: CMD with the
 * sidecar as its only way out.
 *
 * It attaches to a running sidecar's Unix socket (--listen-socket there, --socket here) rather
 * than starting one: a sidecar holds the agent's TPM key and gateway session for many commands,
 * and several commands may share it.
 *
 * Isolated (the default), CMD runs in new user, network, PID and mount namespaces (`unshare -U -r
 * -n -p -f --mount-proc`, as root too: see unshareFlags), /proc showing only its own PID namespace.
 * Inside, only loopback is up; this program,
 * re-invoked as the namespace's first process, serves a forwarder on 127.0.0.1 that leads to the
 * sidecar's socket (a socket file crosses network namespaces), points HTTPS_PROXY/HTTP_PROXY
 * and their lowercase forms at it, clears NO_PROXY, sets NODE_USE_ENV_PROXY=1, and runs CMD. There
 * is no route, no other address and no DNS server: nothing but the proxy is reachable. When CMD
 * ends the first process exits, and the kernel ends the namespaces and anything CMD left behind.
 *
 * The file system is shared but for the directories hidden from CMD (--hide, and always the
 * socket's directory), each under an empty read-only tmpfs CMD cannot unmount (HIDE_SCRIPT).
 *
 * Exit status: CMD's own, or 128+N when a signal N ended it; 125 when run itself could not start
 * CMD (no namespaces, no sidecar socket, a --hide path missing), 126 when CMD cannot be executed, 127 when it is not found.
 */

const NAME = 'agent-gateway-sidecar run';
/** The hidden argument that makes this program the first process inside the namespaces. */
export const NAMESPACE_INIT = '__namespace-init';
/** Signals passed on to CMD. SIGINT and SIGQUIT also reach CMD straight from a terminal. */
const FORWARDED: readonly NodeJS.Signals[] = ['SIGTERM', 'SIGHUP', 'SIGINT', 'SIGQUIT', 'SIGUSR2'];
const TERMINAL_SIGNALS = new Set<NodeJS.Signals>(['SIGINT', 'SIGQUIT']);
const EXIT_CANNOT_EXECUTE = 126;
const EXIT_NOT_FOUND = 127;

interface Writer {
  write(text: string): unknown;
}

export interface RunIo {
  readonly env: NodeJS.ProcessEnv;
  readonly stderr: Writer;
  readonly stdout: Writer;
  /** How to start this program again (node, its flags, the entry script). */
  readonly self: readonly string[];
}

/** 128+N for a death by signal N, as shells report it. */
export function exitStatus(code: number | null, signal: NodeJS.Signals | null): number {
  if (signal !== null) return 128 + (os.signals[signal] ?? 0);
  return code ?? EXIT.runtime;
}

/** Variables holding the TPM PINs themselves: the agent must never learn the PIN of its own key. */
const SECRET_VARIABLES = (Object.values(SIDECAR_OPTIONS) as OptionSpec[]).filter((spec) => spec.secretFile).flatMap((spec) => spec.env);

/** `env` without the PIN variables. */
function withoutSecrets(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = { ...env };
  for (const name of SECRET_VARIABLES) delete out[name];
  return out;
}

/** The environment CMD gets: the proxy for every scheme, no exceptions, Node's fetch told to use it; no PINs. */
export function agentEnvironment(env: NodeJS.ProcessEnv, proxyUrl: string): NodeJS.ProcessEnv {
  const out = withoutSecrets(env);
  for (const name of ['NO_PROXY', 'no_proxy', 'ALL_PROXY', 'all_proxy']) delete out[name];
  for (const name of ['HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy']) out[name] = proxyUrl;
  out.NODE_USE_ENV_PROXY = '1';
  return out;
}

/** Passes signals on through `send` while CMD runs; terminal signals only when no terminal sends them to CMD itself. */
function forwardSignals(send: (signal: NodeJS.Signals) => void): () => void {
  const handlers = FORWARDED.filter((signal) => !(TERMINAL_SIGNALS.has(signal) && process.stdin.isTTY)).map((signal) => {
    const handler = () => send(signal);
    process.on(signal, handler);
    return () => process.off(signal, handler);
  });
  // A terminal's SIGINT reaches every process of the job, this one included: not a reason to die.
  for (const signal of TERMINAL_SIGNALS) if (process.stdin.isTTY) process.on(signal, () => {});
  return () => handlers.forEach((off) => off());
}

function signal(pid: number | undefined, name: NodeJS.Signals): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, name);
  } catch {
    // gone already
  }
}

/** Runs CMD with the proxy environment; `started` once its signals are forwarded. Resolves with its exit status (126/127 when it cannot start). */
async function runCommand(command: readonly string[], proxyPort: number, io: Pick<RunIo, 'env' | 'stderr'>, started?: (child: ChildProcess) => void): Promise<number> {
  const child = spawn(command[0]!, command.slice(1), { stdio: 'inherit', env: agentEnvironment(io.env, `http://127.0.0.1:${proxyPort}`) });
  const stop = forwardSignals((name) => signal(child.pid, name));
  started?.(child);
  try {
    const [code, signal] = (await Promise.race([once(child, 'exit'), once(child, 'error').then(([error]) => Promise.reject(error))])) as [number | null, NodeJS.Signals | null];
    return exitStatus(code, signal);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    io.stderr.write(`${NAME}: ${command[0]}: ${code === 'ENOENT' ? 'command not found' : (error as Error).message}\n`);
    return code === 'ENOENT' ? EXIT_NOT_FOUND : EXIT_CANNOT_EXECUTE;
  } finally {
    stop();
  }
}

function parse(argv: readonly string[], io: RunIo): { socket?: string; isolation: boolean; hide: string[]; command: string[] } | number {
  const command = new Command()
    .name(NAME)
    .description('Run CMD with the sidecar as its only way out: in its own network namespace whose one exit is the sidecar Unix socket.')
    .option('--socket <path>', 'the running sidecar\'s Unix socket (its --listen-socket) [env AGENT_GATEWAY_SIDECAR_SOCKET]')
    .option('--hide <dir>', 'hide this directory from CMD behind an empty read-only tmpfs, repeatable (the socket\'s directory is always hidden)', (value: string, previous: string[]) => [...previous, value], [] as string[])
    .option('--no-isolation', 'run CMD without a namespace (it could bypass the proxy): only when namespaces are unavailable and that is accepted')
    .argument('<command...>', 'the command and its arguments, after --')
    .passThroughOptions()
    .addHelpText('after', '\nExit status: CMD\'s own; 128+N when signal N ended it; 125 when run could not start CMD; 126 CMD not executable; 127 CMD not found.')
    .configureOutput({ writeOut: (text) => void io.stdout.write(text), writeErr: (text) => void io.stderr.write(text) })
    .exitOverride();
  try {
    command.parse([...argv], { from: 'user' });
  } catch (error) {
    return error instanceof CommanderError && error.exitCode === 0 ? EXIT.ok : EXIT.wrapper;
  }
  const options = command.opts<{ socket?: string; isolation: boolean; hide: string[] }>();
  const socket = options.socket ?? (io.env.AGENT_GATEWAY_SIDECAR_SOCKET || undefined);
  return { ...(socket !== undefined ? { socket } : {}), isolation: options.isolation, hide: options.hide, command: command.args };
}

async function reachable(socketPath: string): Promise<string | undefined> {
  return new Promise((resolve) => {
    const probe = connect(socketPath);
    probe.once('connect', () => (probe.destroy(), resolve(undefined)));
    probe.once('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message));
  });
}

/** `name` as a shell would find it in PATH (then in `extraDirs`); a name with a slash is taken as it is when it exists. */
function findExecutable(name: string, env: NodeJS.ProcessEnv, extraDirs: readonly string[] = []): string | undefined {
  if (name.includes('/')) {
    try {
      accessSync(name, fs.F_OK);
      return name;
    } catch {
      return undefined;
    }
  }
  for (const dir of [...(env.PATH ?? '').split(':').filter(Boolean), ...extraDirs]) {
    try {
      accessSync(`${dir}/${name}`, fs.X_OK);
      return `${dir}/${name}`;
    } catch {
      // next
    }
  }
  return undefined;
}

/** `ip` lives in /usr/sbin on Debian, which an unprivileged user's PATH may lack. */
function findIp(env: NodeJS.ProcessEnv): string | undefined {
  return findExecutable('ip', env, ['/usr/sbin', '/sbin', '/usr/bin', '/bin']);
}

/**
 * CMD's own user and mount namespaces, nested in run's (unshare without --fork execs CMD in them).
 * Mounts inherited into them are locked, so CMD cannot unmount the /proc of its PID namespace to
 * uncover the host's; and CMD has no capability over the first process inside or the waiting
 * unshare, which belong to the outer user namespace (it could read their environment and write
 * their memory).
 */
const CMD_UNSHARE_FLAGS = ['--user', '--map-root-user', '--mount'];

/**
 * unshare's flags. A user namespace even for root: real root inside a bare network namespace
 * keeps CAP_SYS_ADMIN over the host's, and `nsenter --net=/proc/PID/ns/net` walks straight out
 * (tried). Root inside a user namespace has no capability over the host's namespaces.
 */
function unshareFlags(): string[] {
  // --mount-proc: a mount namespace whose /proc shows only the new PID namespace. With the host's
  // /proc, CMD (root in the user namespace) could write the memory of the waiting unshare process,
  // which is outside the PID namespace and may signal any process of this user (tried, and tested).
  return ['--user', '--map-root-user', '--net', '--pid', '--fork', '--mount-proc'];
}

/** The pid of `parent`'s child, from the host's /proc: unshare --fork has one, the first process inside. */
function childOf(parent: number): number | undefined {
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      // After the command name (which may hold spaces and parentheses): state, then ppid.
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === parent) return Number(entry);
    } catch {
      // gone meanwhile
    }
  }
  return undefined;
}

/** Proves namespaces work here (unshare, then loopback up inside) before CMD is started. */
function checkIsolation(ip: string | undefined): void {
  if (ip === undefined) throw new AgentGatewayError('ERR_ISOLATION_UNAVAILABLE', 'cannot isolate CMD: iproute2\'s `ip` is not installed (needed to bring loopback up inside the namespace)');
  const probe = spawnSync('unshare', [...unshareFlags(), '--', ip, 'link', 'set', 'lo', 'up'], { encoding: 'utf8', timeout: 10_000 });
  // And the nested namespaces CMD gets (CMD_UNSHARE_FLAGS), where some kernels allow one level only.
  const nested = probe.error || probe.status !== 0 ? probe : spawnSync('unshare', [...unshareFlags(), '--', 'unshare', ...CMD_UNSHARE_FLAGS, '--', ip, '-V'], { encoding: 'utf8', timeout: 10_000 });
  if (nested.error || nested.status !== 0) {
    const why = nested.error ? ((nested.error as NodeJS.ErrnoException).code === 'ENOENT' ? 'util-linux `unshare` is not installed' : nested.error.message) : (nested.stderr.trim().split('\n')[0] ?? `exit ${nested.status}`);
    throw new AgentGatewayError('ERR_ISOLATION_UNAVAILABLE', `cannot isolate CMD in new user and network namespaces (${why}); refusing to run it unisolated without --no-isolation`);
  }
}

/**
 * The directories CMD must not see, resolved (mount follows symlinks; an absolute path also can
 * never be mistaken for the `--` that ends them): the socket's directory, then each --hide. One
 * inside another is left out: the outer tmpfs hides it, and would leave nothing to mount it on.
 */
function hiddenDirectories(socket: string, hide: readonly string[]): string[] {
  const out = new Set<string>();
  for (const [given, what] of [[dirname(socket), 'the sidecar socket\'s directory'] as const, ...hide.map((dir) => [dir, '--hide'] as const)]) {
    let real: string;
    try {
      real = realpathSync(given);
    } catch (error) {
      throw new AgentGatewayError('ERR_RUN_HIDE_PATH', `cannot hide ${given} (${what}): ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}; refusing to run CMD with it visible`);
    }
    if (!statSync(real).isDirectory()) throw new AgentGatewayError('ERR_RUN_HIDE_PATH', `cannot hide ${given} (${what}): not a directory (hide the directory holding it)`);
    // Hiding / would leave CMD nothing to run (the sidecar socket belongs in a directory of its own).
    if (real === '/') throw new AgentGatewayError('ERR_RUN_HIDE_PATH', `cannot hide ${given} (${what}): it is the root directory`);
    out.add(real);
  }
  const all = [...out];
  return all.filter((dir) => !all.some((other) => other !== dir && dir.startsWith(`${other}/`)));
}

/**
 * Run by sh in a mount namespace of its own between the first process's and CMD's: an empty
 * read-only tmpfs over each directory (its argv up to `--`), then exec of the rest. Made there,
 * in a mount namespace of the outer user namespace, these mounts are locked in CMD's nested one:
 * CMD cannot unmount or move them (EINVAL). Made in CMD's own namespace, CMD could unmount them; made in the first
 * process's, the forwarder could no longer reach the socket. Paths come as arguments, never as
 * script text.
 */
const HIDE_SCRIPT = `while [ "$1" != -- ]; do mount -t tmpfs -o ro,nosuid,nodev,noexec,mode=0555,size=4k agent-gateway-hidden "$1" || { echo "${NAME}: cannot hide $1" >&2; exit ${EXIT.wrapper}; }; shift; done; shift; exec "$@"`;

/** The `run` subcommand, from outside the namespaces. Resolves with the exit status. */
export async function runIsolated(argv: readonly string[], io: RunIo): Promise<number> {
  const fail = (error: AgentGatewayError) => {
    io.stderr.write(`${NAME}: ${error.message}\n`);
    return EXIT.wrapper;
  };
  const parsed = parse(argv, io);
  if (typeof parsed === 'number') return parsed;
  if (parsed.socket === undefined) return fail(new AgentGatewayError('ERR_RUN_USAGE', 'give the sidecar\'s Unix socket: --socket PATH or AGENT_GATEWAY_SIDECAR_SOCKET (the sidecar\'s --listen-socket)'));
  const socket = parsed.socket;
  const unreachable = await reachable(socket);
  if (unreachable !== undefined) return fail(new AgentGatewayError('ERR_SIDECAR_SOCKET', `no sidecar answers on ${socket} (${unreachable}): start it with --listen-socket ${socket}`));

  if (!parsed.isolation) {
    if (parsed.hide.length > 0) return fail(new AgentGatewayError('ERR_RUN_USAGE', '--hide needs isolation (a mount namespace): it cannot be combined with --no-isolation'));
    const forwarder = await startForwarder(socket);
    try {
      return await runCommand(parsed.command, forwarder.port, io);
    } finally {
      await forwarder.close();
    }
  }

  const ip = findIp(io.env);
  let hidden: string[];
  try {
    hidden = hiddenDirectories(socket, parsed.hide);
    checkIsolation(ip);
  } catch (error) {
    return fail(error as AgentGatewayError);
  }
  // fd 3 is a lifeline: the first process inside says on it when CMD runs, and ends CMD if it closes (this process died).
  // The first process inside is CMD's to read (same user namespace): it gets no PINs either.
  const child = spawn('unshare', [...unshareFlags(), '--', ...io.self, NAMESPACE_INIT, socket, ip!, ...hidden, '--', ...parsed.command], { stdio: ['inherit', 'inherit', 'inherit', 'pipe'], env: withoutSecrets(io.env) });
  let initPid: number | undefined;
  // Signals that come before the first process inside has said who it is wait for it.
  const early: NodeJS.Signals[] = [];
  const lifeline = child.stdio[3] as Socket;
  let reported = '';
  lifeline.setEncoding('utf8');
  lifeline.on('data', (chunk: string) => {
    if (initPid !== undefined) return;
    reported += chunk;
    if (!reported.includes('\n') || child.pid === undefined) return;
    initPid = childOf(child.pid);
    if (initPid === undefined) return;
    for (const name of early.splice(0)) signal(initPid, name);
  });
  lifeline.on('error', () => {});
  // unshare's own process ignores SIGINT and SIGTERM while it waits: signals go to the first process inside.
  const stop = forwardSignals((name) => (initPid === undefined ? early.push(name) : signal(initPid, name)));
  try {
    const [code, signal] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
    return exitStatus(code, signal);
  } finally {
    stop();
    lifeline.destroy();
  }
}

/**
 * The first process inside the namespaces (PID 1 there): loopback up, the forwarder, CMD. Its
 * exit ends the PID namespace, and with it anything CMD left running.
 */
export async function namespaceInit(argv: readonly string[], io: Pick<RunIo, 'env' | 'stderr'>): Promise<number> {
  const [socket, ip, ...rest] = argv;
  const separator = rest.indexOf('--');
  const hidden = rest.slice(0, Math.max(separator, 0));
  const command = rest.slice(separator + 1);
  if (socket === undefined || ip === undefined || separator < 0 || command.length === 0 || !hidden.every((dir) => dir.startsWith('/'))) {
    io.stderr.write(`${NAME}: ${NAMESPACE_INIT} is internal to run\n`);
    return EXIT.wrapper;
  }
  const lifeline = new Socket({ fd: 3, readable: true, writable: true });
  lifeline.on('error', () => {});
  let forwarder;
  try {
    execFileSync(ip, ['link', 'set', 'lo', 'up'], { stdio: ['ignore', 'ignore', 'pipe'] });
    forwarder = await startForwarder(socket);
  } catch (error) {
    io.stderr.write(`${NAME}: cannot set up the namespace: ${(error as Error).message}\n`);
    return EXIT.wrapper;
  }
  let child: ChildProcess | undefined;
  lifeline.once('close', () => child?.kill('SIGKILL'));
  try {
    // unshare finds CMD in PATH itself (argv[0] stays as given); looked up here only to say so plainly when it is missing.
    if (findExecutable(command[0]!, io.env) === undefined) {
      io.stderr.write(`${NAME}: ${command[0]}: command not found\n`);
      return EXIT_NOT_FOUND;
    }
    const hiding = ['unshare', '--mount', '--propagation', 'private', '--', 'sh', '-c', HIDE_SCRIPT, 'sh', ...hidden, '--'];
    return await runCommand([...hiding, 'unshare', ...CMD_UNSHARE_FLAGS, '--', ...command], forwarder.port, io, (spawned) => {
      child = spawned;
      // Only now: as PID 1 here, this process ignores signals it has no handler for, even from outside.
      lifeline.write('ready\n');
    });
  } finally {
    await forwarder.close();
    lifeline.destroy();
  }
}
