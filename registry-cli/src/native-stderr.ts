import { spawn } from 'node:child_process';
import { constants } from 'node:os';
import { createInterface } from 'node:readline';

/**
 * tpm2-pkcs11 writes its error-level lines ("ERROR: Esys_Unseal: ... HMAC check failed") straight
 * to file descriptor 2 at every log level, TPM2_PKCS11_LOG_LEVEL=0 included, and Node cannot
 * redirect a descriptor for a native call. So a command that opens the TPM runs as a child whose
 * stderr passes through here, where those lines are dropped: the CLI's own message already says
 * what failed (CKR_PIN_INCORRECT and a hint). TPM2_PKCS11_LOG_LEVEL=1 or 2 asks for tpm2-pkcs11's
 * own lines, and then they pass.
 */

const TPM_COMMANDS = new Set(['register-principal', 'grant-permission']);
const CHILD_MARK = 'AGENT_GATEWAY_REGISTRY_STDERR_FILTERED';
/** tpm2-pkcs11's format (src/lib/log.c); the CLI's own lines start with its name. */
const NATIVE_LINE = /^(?:ERROR|WARNING): /;

export function filtersNativeStderr(argv: readonly string[], env: NodeJS.ProcessEnv): boolean {
  if (env[CHILD_MARK] !== undefined) return false;
  if ((env.TPM2_PKCS11_LOG_LEVEL ?? '0') !== '0') return false;
  return argv.some((arg) => TPM_COMMANDS.has(arg));
}

/** Runs this same CLI as a child with tpm2-pkcs11's lines dropped from its stderr; resolves to its exit code. */
export function runWithNativeStderrFiltered(argv: readonly string[]): Promise<number> {
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1]!, ...argv], {
    stdio: ['inherit', 'inherit', 'pipe'],
    env: { ...process.env, [CHILD_MARK]: '1' },
  });
  const forward = (signal: NodeJS.Signals) => () => child.kill(signal);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, forward(signal));
  const lines = createInterface({ input: child.stderr!, crlfDelay: Infinity });
  lines.on('line', (line) => {
    if (!NATIVE_LINE.test(line)) process.stderr.write(`${line}\n`);
  });
  return new Promise((resolve) => {
    let code: number | null = null;
    let signal: NodeJS.Signals | null = null;
    let pending = 2;
    const done = () => --pending === 0 && resolve(code ?? 128 + (signal ? constants.signals[signal] : 0));
    child.once('exit', (c, s) => ((code = c), (signal = s), done()));
    lines.once('close', done);
    child.once('error', (error) => {
      process.stderr.write(`agent-gateway-registry: error: could not start the TPM command: ${error.message}\n`);
      resolve(1);
    });
  });
}

