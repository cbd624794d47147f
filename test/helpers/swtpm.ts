import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { accessSync, constants, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort } from './postgres.js';

/**
 * A private software TPM for one test file: swtpm on two free loopback ports with its own state
 * dir, a private D-Bus session bus, and tpm2-abrmd in front of swtpm (swtpm has three transient
 * object slots and tpm2-pkcs11/tpm2-tools leak them, so a resource manager is required).
 * Nothing is shared between instances, so test files can run in parallel.
 *
 * tpm2-pkcs11 reads TPM2_PKCS11_TCTI/STORE when it is initialised: apply `env` to process.env
 * before the first openToken() in the test process, or pass it to a child process.
 */
export interface SwtpmEnv {
  readonly DBUS_SESSION_BUS_ADDRESS: string;
  readonly TPM2TOOLS_TCTI: string;
  readonly TPM2_PKCS11_TCTI: string;
  readonly TPM2_PKCS11_STORE: string;
}

/** Silences the TSS and tpm2-pkcs11 warnings (errors from tpm2-pkcs11 itself still reach fd 2). */
export const QUIET_TPM_LOG_ENV = { TSS2_LOG: 'all+NONE', TPM2_PKCS11_LOG_LEVEL: '0' } as const;

export interface SwtpmInstance {
  /** Temp dir holding the swtpm state, the tpm2-pkcs11 store, the bus socket and logs. */
  readonly dir: string;
  readonly env: SwtpmEnv;
  /** Current swtpm data port; the control port is the next one (both change on restart; only tpm2-abrmd uses them). */
  readonly tpmPort: number;
  /**
   * Stops tpm2-abrmd and swtpm and starts them again on the same state dir, as after a reboot.
   * Close every PKCS#11 token first: their TPM connections die with abrmd.
   */
  restart(): Promise<void>;
  /** Stops everything and removes the temp dir. Idempotent; never throws. */
  stop(): Promise<void>;
}

export interface StartSwtpmOptions {
  /** Upper bound for each readiness wait (swtpm, D-Bus, tpm2-abrmd). Default 15 s. */
  readonly readyTimeoutMs?: number;
  /**
   * Manufacture the TPM first (tpm/swtpm-manufacture.sh): EK certificates signed by the CA in this
   * directory (created there as ca.pem when missing; several TPMs may share it).
   */
  readonly ekCaDir?: string;
}

const MANUFACTURE_SCRIPT = fileURLToPath(new URL('../../tpm/swtpm-manufacture.sh', import.meta.url));

const SBIN_DIRS = ['/usr/sbin', '/sbin', '/usr/local/sbin'];

function findBinary(name: string): string {
  const dirs = [...(process.env.PATH ?? '').split(delimiter).filter(Boolean), ...SBIN_DIRS];
  for (const dir of dirs) {
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // keep looking
    }
  }
  throw new Error(`swtpm helper: ${name} not found on PATH or in ${SBIN_DIRS.join(', ')}: run scripts/setup.sh`);
}

function commandOutput(error: unknown, stdout: string, stderr: string): string {
  const text = `${stderr}${stdout}`.trim();
  if (text) return text;
  return error instanceof Error ? error.message : String(error);
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<{ ok: boolean; output: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { env, timeout: timeoutMs, encoding: 'utf8' }, (error, stdout, stderr) => {
      resolve({ ok: !error, output: commandOutput(error, stdout, stderr) });
    });
  });
}

function exited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (exited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.off('exit', onExit);
      resolve(false);
    }, timeoutMs);
    const onExit = (): void => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

async function terminate(child: ChildProcess | undefined, graceMs = 3000): Promise<void> {
  if (!child || child.pid === undefined || exited(child)) return;
  child.kill('SIGTERM');
  if (await waitForExit(child, graceMs)) return;
  child.kill('SIGKILL');
  await waitForExit(child, graceMs);
}

function logTail(path: string, bytes = 2000): string {
  try {
    const text = readFileSync(path, 'utf8');
    return text.length > bytes ? `…${text.slice(-bytes)}` : text;
  } catch {
    return '';
  }
}

/** Children get the caller's environment minus anything that would point them at another TPM or bus. */
function baseEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const key of ['DBUS_SESSION_BUS_ADDRESS', 'TPM2TOOLS_TCTI', 'TPM2_PKCS11_TCTI', 'TPM2_PKCS11_STORE', 'TCTI']) delete env[key];
  return env;
}

function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** The swtpm TCTI (used by tpm2-abrmd) always dials the control channel at data port + 1. */
async function freePortPair(): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = await freePort();
    if (port > 0 && port < 65535 && (await portIsFree(port + 1))) return port;
  }
  throw new Error('swtpm helper: no two consecutive free TCP ports on 127.0.0.1');
}

type Binaries = Record<'swtpm' | 'swtpm_ioctl' | 'dbus' | 'abrmd' | 'lockout' | 'getrandom', string>;

function resolveBinaries(): Binaries {
  return {
    swtpm: findBinary('swtpm'),
    swtpm_ioctl: findBinary('swtpm_ioctl'),
    dbus: findBinary('dbus-daemon'),
    abrmd: findBinary('tpm2-abrmd'),
    lockout: findBinary('tpm2_dictionarylockout'),
    getrandom: findBinary('tpm2_getrandom'),
  };
}

class Swtpm implements SwtpmInstance {
  readonly dir: string;
  readonly env: SwtpmEnv;
  tpmPort = 0;
  #ctrlPort = 0;
  #timeoutMs: number;
  #bin: Binaries;
  #swtpm: ChildProcess | undefined;
  #dbus: ChildProcess | undefined;
  #abrmd: ChildProcess | undefined;
  #stopped = false;
  #exitHook = (): void => this.#killNow();
  #signalHook = (signal: NodeJS.Signals): void => {
    this.#killNow();
    process.kill(process.pid, signal);
  };

  constructor(dir: string, timeoutMs: number, bin: Binaries) {
    this.dir = dir;
    this.#timeoutMs = timeoutMs;
    this.#bin = bin;
    this.env = {
      DBUS_SESSION_BUS_ADDRESS: `unix:path=${join(dir, 'dbus.sock')}`,
      TPM2TOOLS_TCTI: 'tabrmd:bus_type=session',
      TPM2_PKCS11_TCTI: 'tabrmd:bus_type=session',
      TPM2_PKCS11_STORE: join(dir, 'p11store'),
    };
    mkdirSync(join(dir, 'state'), { mode: 0o700 });
    mkdirSync(this.env.TPM2_PKCS11_STORE, { mode: 0o700 });
    // Orphaned daemons would outlive a crashed or interrupted test run: kill them synchronously.
    process.on('exit', this.#exitHook);
    process.once('SIGINT', this.#signalHook);
    process.once('SIGTERM', this.#signalHook);
  }

  #logFd(name: string): number {
    return openSync(join(this.dir, `${name}.log`), 'a');
  }

  #spawnLogged(name: string, file: string, args: string[], env: NodeJS.ProcessEnv, stdout: 'log' | 'pipe' = 'log'): ChildProcess {
    const fd = this.#logFd(name);
    try {
      const child = spawn(file, args, { env, stdio: ['ignore', stdout === 'pipe' ? 'pipe' : fd, fd] });
      child.on('error', () => {}); // surfaced through exitCode and the log; never an uncaught event
      return child;
    } finally {
      closeSync(fd); // the child holds its own copy
    }
  }

  async #startSwtpm(): Promise<void> {
    let lastError = '';
    // A port from freePort() can be taken by a parallel test before swtpm binds it: retry on new ports.
    for (let attempt = 1; attempt <= 4; attempt++) {
      const tpmPort = await freePortPair();
      const ctrlPort = tpmPort + 1;
      const child = this.#spawnLogged('swtpm', this.#bin.swtpm, [
        'socket', '--tpm2',
        '--server', `type=tcp,port=${tpmPort},bindaddr=127.0.0.1`,
        '--ctrl', `type=tcp,port=${ctrlPort},bindaddr=127.0.0.1`,
        '--tpmstate', `dir=${join(this.dir, 'state')}`,
        // Without not-need-init every client must send TPM2_Startup itself (tpm2_startup fails with 0x101).
        '--flags', 'not-need-init,startup-clear',
        '--log', `file=${join(this.dir, 'swtpm-internal.log')},level=1`,
      ], baseEnv());
      this.#swtpm = child;
      this.tpmPort = tpmPort;
      this.#ctrlPort = ctrlPort;
      // The first real command doubles as the readiness probe. Three wrong PINs would otherwise lock
      // every key for 1000 s under swtpm's defaults.
      const lockoutEnv = { ...baseEnv(), TPM2TOOLS_TCTI: `swtpm:host=127.0.0.1,port=${tpmPort}`, ...QUIET_TPM_LOG_ENV };
      const deadline = Date.now() + this.#timeoutMs;
      while (Date.now() < deadline && !exited(child)) {
        const result = await run(this.#bin.lockout, ['--clear-lockout', '--setup-parameters', '--max-tries=1000', '--recovery-time=1', '--lockout-recovery-time=1'], lockoutEnv, 5000);
        if (result.ok) return;
        lastError = result.output;
        await sleep(50);
      }
      if (!exited(child)) {
        await terminate(child);
        throw new Error(`swtpm helper: swtpm on port ${tpmPort} not ready within ${this.#timeoutMs} ms: ${lastError}\n${logTail(join(this.dir, 'swtpm.log'))}`);
      }
      lastError = `swtpm exited (${child.exitCode ?? child.signalCode}): ${logTail(join(this.dir, 'swtpm.log'))}`;
    }
    throw new Error(`swtpm helper: swtpm could not start: ${lastError}`);
  }

  async #startDbus(): Promise<void> {
    const child = this.#spawnLogged('dbus', this.#bin.dbus, ['--session', '--nofork', '--nopidfile', `--address=${this.env.DBUS_SESSION_BUS_ADDRESS}`, '--print-address=1'], baseEnv(), 'pipe');
    this.#dbus = child;
    // dbus-daemon prints its address once it is listening.
    const ready = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), this.#timeoutMs);
      child.stdout?.once('data', () => {
        clearTimeout(timer);
        resolve(true);
      });
      child.once('exit', () => {
        clearTimeout(timer);
        resolve(false);
      });
    });
    child.stdout?.resume();
    if (!ready) {
      await terminate(child);
      throw new Error(`swtpm helper: dbus-daemon did not start within ${this.#timeoutMs} ms: ${logTail(join(this.dir, 'dbus.log'))}`);
    }
  }

  async #startAbrmd(): Promise<void> {
    const args = ['--session', '--flush-all', `--tcti=swtpm:host=127.0.0.1,port=${this.tpmPort}`];
    if (process.getuid?.() === 0) args.push('--allow-root'); // abrmd refuses to run as root otherwise
    const env = { ...baseEnv(), DBUS_SESSION_BUS_ADDRESS: this.env.DBUS_SESSION_BUS_ADDRESS };
    const child = this.#spawnLogged('abrmd', this.#bin.abrmd, args, env);
    this.#abrmd = child;
    const probeEnv = { ...baseEnv(), ...this.env, ...QUIET_TPM_LOG_ENV };
    const deadline = Date.now() + this.#timeoutMs;
    let lastError = '';
    while (Date.now() < deadline) {
      if (exited(child)) {
        throw new Error(`swtpm helper: tpm2-abrmd exited (${child.exitCode ?? child.signalCode}): ${logTail(join(this.dir, 'abrmd.log'))}`);
      }
      const result = await run(this.#bin.getrandom, ['8', '--hex'], probeEnv, 5000);
      if (result.ok) return;
      lastError = result.output;
      await sleep(50);
    }
    await terminate(child);
    throw new Error(`swtpm helper: tpm2-abrmd not answering within ${this.#timeoutMs} ms (tpm2_getrandom: ${lastError}): ${logTail(join(this.dir, 'abrmd.log'))}`);
  }

  async start(): Promise<void> {
    await this.#startSwtpm();
    await this.#startDbus();
    await this.#startAbrmd();
  }

  async #stopSwtpm(): Promise<void> {
    const child = this.#swtpm;
    if (!child || exited(child)) return;
    // A clean shutdown (CMD_SHUTDOWN) makes swtpm write its volatile state before exiting.
    await run(this.#bin.swtpm_ioctl, ['--tcp', `127.0.0.1:${this.#ctrlPort}`, '-s'], baseEnv(), 5000);
    if (!(await waitForExit(child, 5000))) await terminate(child);
  }

  async restart(): Promise<void> {
    if (this.#stopped) throw new Error('swtpm helper: already stopped');
    await terminate(this.#abrmd);
    await this.#stopSwtpm();
    await this.#startSwtpm();
    await this.#startAbrmd();
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    for (const step of [() => terminate(this.#abrmd), () => this.#stopSwtpm(), () => terminate(this.#dbus)]) {
      try {
        await step();
      } catch {
        // keep tearing down; the exit hook below kills whatever survived
      }
    }
    this.#killNow();
    rmSync(this.dir, { recursive: true, force: true });
    process.off('exit', this.#exitHook);
    process.off('SIGINT', this.#signalHook);
    process.off('SIGTERM', this.#signalHook);
  }

  #killNow(): void {
    for (const child of [this.#abrmd, this.#swtpm, this.#dbus]) {
      if (child && !exited(child)) child.kill('SIGKILL');
    }
    if (!this.#stopped) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Starts swtpm + D-Bus + tpm2-abrmd for one test file. Always pair with `stop()` (e.g. in `after`). */
export async function startSwtpm(options: StartSwtpmOptions = {}): Promise<SwtpmInstance> {
  const bin = resolveBinaries();
  const dir = mkdtempSync(join(tmpdir(), 'agw-tpm-'));
  let instance: Swtpm;
  try {
    instance = new Swtpm(dir, options.readyTimeoutMs ?? 15_000, bin);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  try {
    if (options.ekCaDir !== undefined) {
      const made = await run(MANUFACTURE_SCRIPT, [options.ekCaDir, join(dir, 'state')], baseEnv(), 60_000);
      if (!made.ok) throw new Error(`swtpm helper: manufacturing the TPM failed: ${made.output}`);
    }
    await instance.start();
  } catch (error) {
    await instance.stop();
    throw error;
  }
  return instance;
}

/**
 * Creates a tpm2-pkcs11 token with one P-256 key through tpm2_ptool (a persistent primary, as
 * `tpm2_ptool init` makes it), without loading tpm2-pkcs11 into this process: a process can
 * bind tpm2-pkcs11 to one TPM only. Returns nothing; the key is found by its labels.
 */
export async function createPtoolKey(tpm: SwtpmInstance, labels: { token: string; key: string; userPin: string; soPin: string }): Promise<void> {
  const env = { ...baseEnv(), ...tpm.env, ...QUIET_TPM_LOG_ENV };
  const store = tpm.env.TPM2_PKCS11_STORE;
  for (const args of [
    ['init', '--path', store],
    ['addtoken', '--pid=1', `--label=${labels.token}`, `--sopin=${labels.soPin}`, `--userpin=${labels.userPin}`, '--path', store],
    ['addkey', `--label=${labels.token}`, `--key-label=${labels.key}`, `--userpin=${labels.userPin}`, '--algorithm=ecc256', '--path', store],
  ]) {
    const result = await run('tpm2_ptool', args, env, 60_000);
    if (!result.ok) throw new Error(`swtpm helper: tpm2_ptool ${args[0]} failed: ${result.output}`);
  }
}
