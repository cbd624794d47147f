import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { resolve } from 'node:path';

export const SIDECAR_BIN = resolve(import.meta.dirname, '../../bin/agent-gateway-sidecar.js');

export interface SidecarProcess {
  readonly child: ChildProcess;
  /** The JSON line the sidecar prints once its proxy listens. */
  readonly line: Record<string, unknown>;
  output(): { stdout: string; stderr: string };
  kill(signal?: NodeJS.Signals): Promise<void>;
}

/** Starts the `agent-gateway-sidecar` bin, as operators run it, and waits for its JSON line (60 s on a loaded machine). */
export async function startSidecarProcess(args: readonly string[], env: NodeJS.ProcessEnv): Promise<SidecarProcess> {
  const child = spawn(process.execPath, [SIDECAR_BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk));
  const exited = once(child, 'exit');
  const line = await new Promise<Record<string, unknown>>((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`no JSON line within 60 s\n${stderr}`)), 60_000);
    child.stdout!.on('data', () => {
      if (!stdout.includes('\n')) return;
      clearTimeout(timer);
      done(JSON.parse(stdout.slice(0, stdout.indexOf('\n'))) as Record<string, unknown>);
    });
    void exited.then(([code, signal]) => {
      clearTimeout(timer);
      fail(new Error(`sidecar exited (${code ?? signal}) before listening\n${stderr}`));
    });
  });
  return {
    child,
    line,
    output: () => ({ stdout, stderr }),
    kill: async (signal = 'SIGTERM') => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      await exited;
    },
  };
}
