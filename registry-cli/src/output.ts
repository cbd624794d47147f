import { errorCode, exitCodeFor, hintFor, type ExitCode } from './errors.js';

export interface Writer {
  write(text: string): unknown;
}

export interface CliIo {
  readonly env: NodeJS.ProcessEnv;
  readonly stdout: Writer;
  readonly stderr: Writer;
}

/** Secrets shorter than this are not searched for: replacing every "1" in a message helps nobody. */
const MIN_REDACTED_LENGTH = 4;

/**
 * Everything the CLI prints goes through here. With `--json`, stdout carries exactly one JSON
 * document per run (the result, or `{ok:false,error}`); without it, human text. Warnings and errors
 * go to stderr in both modes. Known secrets (PINs, the database password) are scrubbed from every
 * line as a last line of defence: the layers below are written never to put them into messages.
 */
export class Output {
  json: boolean;
  readonly #io: CliIo;
  readonly #secrets = new Set<string>();

  constructor(io: CliIo, json: boolean) {
    this.#io = io;
    this.json = json;
  }

  /** Registers a value that must never be printed. */
  secret(value: string | undefined): void {
    if (value && value.length >= MIN_REDACTED_LENGTH) this.#secrets.add(value);
  }

  redact(text: string): string {
    let result = text;
    for (const secret of this.#secrets) result = result.split(secret).join('[redacted]');
    return result;
  }

  /** The command's result: `data` as JSON, or `human` lines as text. */
  result(command: string, data: Record<string, unknown>, human: string | readonly string[]): void {
    if (this.json) {
      this.#io.stdout.write(`${this.redact(JSON.stringify({ ok: true, command, ...data }, jsonReplacer))}\n`);
      return;
    }
    const lines = typeof human === 'string' ? [human] : human;
    if (lines.length > 0) this.#io.stdout.write(`${this.redact(lines.join('\n'))}\n`);
  }

  warn(message: string): void {
    this.#io.stderr.write(`agent-gateway-registry: warning: ${this.redact(message)}\n`);
  }

  /** Reports a failure and returns its exit code. `printed`: commander already wrote the human message. */
  failure(error: unknown, options: { printed?: boolean; exitCode?: ExitCode } = {}): ExitCode {
    const exitCode = options.exitCode ?? exitCodeFor(error);
    const code = errorCode(error);
    const message = this.redact(error instanceof Error ? error.message : String(error));
    const hint = hintFor(error);
    if (this.json) {
      this.#io.stdout.write(`${JSON.stringify({ ok: false, error: { code, message, exit_code: exitCode, ...(hint ? { hint } : {}) } })}\n`);
    }
    if (!options.printed) {
      // An error that is not ours is a bug: its stack helps whoever reports it.
      const detail = code === 'ERR_INTERNAL' && error instanceof Error && error.stack ? this.redact(error.stack) : message;
      this.#io.stderr.write(`agent-gateway-registry: error: ${detail}\n${hint ? `hint: ${hint}\n` : ''}`);
    }
    return exitCode;
  }
}

/** Buffers become lowercase hex and bigints decimal text, so JSON output never loses bytes or digits. */
function jsonReplacer(_key: string, value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString();
  if (value && typeof value === 'object' && (value as { type?: unknown }).type === 'Buffer' && Array.isArray((value as { data?: unknown }).data)) {
    return Buffer.from((value as { data: number[] }).data).toString('hex');
  }
  return value;
}
