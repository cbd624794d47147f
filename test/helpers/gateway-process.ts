import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { stringify } from 'smol-toml';

const BIN = resolve(import.meta.dirname, '../../bin/agent-gateway.js');

export interface GatewayProcess {
  readonly port: number;
  readonly adminPort: number;
  readonly child: ChildProcess;
  /** Every JSON log line so far. */
  readonly lines: Record<string, unknown>[];
  /** True while the process runs. */
  alive(): boolean;
  /** SIGKILL (a crash); resolves with the exit code once gone. */
  stop(): Promise<number | null>;
  /** SIGTERM (a graceful shutdown); resolves with the exit code once gone. */
  terminate(): Promise<number | null>;
}

/**
 * The gateway as operators run it: the compiled bin in its own process, from a TOML file. For
 * cases where a failure would take the test process down with it (a spinning event loop), and
 * for measuring the gateway's CPU alone. `bin`: another build's bin (bench A/B).
 */
export async function startGatewayProcess(config: Record<string, unknown>, env: Record<string, string> = {}, bin = BIN): Promise<GatewayProcess> {
  const dir = mkdtempSync(join(tmpdir(), 'agw-proc-'));
  const path = join(dir, 'config.toml');
  writeFileSync(path, stringify(config));
  const child = spawn(process.execPath, [bin, '--config', path], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env, AGENT_GATEWAY_LOG_STDOUT: 'true' } });
  const lines: Record<string, unknown>[] = [];
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  let exited = false;
  const exit = new Promise<number | null>((resolveExit) => child.once('exit', (code) => ((exited = true), resolveExit(code))));
  const ports = await new Promise<{ port: number; adminPort: number }>((resolvePorts, reject) => {
    let adminPort = 0;
    const timer = setTimeout(() => reject(new Error(`gateway process did not listen within 15 s: ${stderr}`)), 15_000);
    createInterface({ input: child.stdout! }).on('line', (text) => {
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text) as Record<string, unknown>;
      } catch {
        return;
      }
      lines.push(line);
      const port = Number(String(line.address ?? '').split(':').pop());
      if (line.event === 'admin_listening') adminPort = port;
      if (line.event === 'listening') {
        clearTimeout(timer);
        resolvePorts({ port, adminPort });
      }
    });
    void exit.then((code) => reject(new Error(`gateway process exited (${code}) before listening: ${stderr}`)));
  });
  return {
    ...ports,
    child,
    lines,
    alive: () => !exited,
    async stop() {
      if (!exited) child.kill('SIGKILL');
      const code = await exit;
      rmSync(dir, { recursive: true, force: true });
      return code;
    },
    async terminate() {
      if (!exited) child.kill('SIGTERM');
      const code = await exit;
      rmSync(dir, { recursive: true, force: true });
      return code;
    },
  };
}
