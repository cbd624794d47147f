import { execFile } from 'node:child_process';
import { resolve } from 'node:path';

/** Runs the real registry CLI (or an operator script) as a child process, the way operators do. */

export const REPO = resolve(import.meta.dirname, '../..');
export const CLI = resolve(REPO, 'bin/agent-gateway-registry.js');

export interface CliRun {
  readonly status: number | null;
  readonly stdout: string;
  readonly stderr: string;
  /** stdout parsed as JSON (runs with --json). */
  readonly json: Record<string, any>;
}

export interface RunOptions {
  readonly env?: NodeJS.ProcessEnv;
  readonly cwd?: string;
  readonly timeoutMs?: number;
}

export function runFile(file: string, args: readonly string[], options: RunOptions = {}): Promise<CliRun> {
  return new Promise((done) => {
    execFile(file, [...args], { env: options.env ?? process.env, cwd: options.cwd ?? REPO, encoding: 'utf8', timeout: options.timeoutMs ?? 30_000 }, (error, stdout, stderr) => {
      const status = error ? (typeof error.code === 'number' ? error.code : null) : 0;
      let json: Record<string, any> = {};
      try {
        json = JSON.parse(stdout);
      } catch {
        // not a --json run
      }
      done({ status, stdout, stderr, json });
    });
  });
}

export function runCli(args: readonly string[], options: RunOptions = {}): Promise<CliRun> {
  return runFile(process.execPath, [CLI, ...args], options);
}

/** Asserting helper: the message shows everything the CLI printed when the exit code is unexpected. */
export function describeRun(run: CliRun): string {
  return `exit ${run.status}\nstdout: ${run.stdout}\nstderr: ${run.stderr}`;
}

/**
 * The same CLI called in this process through runCli(): no process start-up, same code path from
 * argument parsing to exit code. TPM commands read TPM2_PKCS11_* from process.env here.
 */
export async function runInProcess(args: readonly string[], options: { env: NodeJS.ProcessEnv }): Promise<CliRun> {
  const { runCli: run } = await import('../../registry-cli/src/cli.js');
  let stdout = '';
  let stderr = '';
  const status = await run(args, { env: options.env, stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) } });
  let json: Record<string, any> = {};
  try {
    json = JSON.parse(stdout);
  } catch {
    // not a --json run
  }
  return { status, stdout, stderr, json };
}
