import { redactUrlPasswords } from './environment.js';
import { errorCode, exitCodeFor, hintFor, type ExitCode } from './errors.js';

export interface Writer {
  write(text: string): unknown;
}

export interface CliIo {
  readonly env: NodeJS.ProcessEnv;
  readonly stdout: Writer;
  readonly stderr: Writer;
}

/**
 * Everything the CLI prints goes through here. With `--json`, stdout carries exactly one JSON
 * document per run (the result, or `{ok:false,error}`); without it, human text. Warnings and errors
 * go to stderr in both modes.
 *
 * Secrets are kept out at their source: PINs are never put into messages, and a database URL is
 * printed only through redactUrl (core/redact-url.ts). Results are printed exactly as the command made them
 * (a value that happens to contain a PIN's digits is still that value). Only the text of warnings
 * and errors, which may quote a third-party library, is filtered (errorText): passwords of URLs and
 * `password=` settings written in it are replaced, and control characters are escaped.
 */
export class Output {
  json: boolean;
  readonly #io: CliIo;

  constructor(io: CliIo, json: boolean) {
    this.#io = io;
    this.json = json;
  }

  /** The command's result: `data` as JSON, or `human` lines as text. */
  result(command: string, data: Record<string, unknown>, human: string | readonly string[]): void {
    if (this.json) {
      this.#io.stdout.write(`${JSON.stringify({ ok: true, command, ...data }, jsonReplacer)}\n`);
      return;
    }
    const lines = typeof human === 'string' ? [human] : human;
    if (lines.length > 0) this.#io.stdout.write(`${lines.join('\n')}\n`);
  }

  warn(message: string): void {
    this.#io.stderr.write(`agent-gateway-registry: warning: ${errorText(message)}\n`);
  }

  /** Reports a failure and returns its exit code. `printed`: commander already wrote the human message. */
  failure(error: unknown, options: { printed?: boolean; exitCode?: ExitCode } = {}): ExitCode {
    const exitCode = options.exitCode ?? exitCodeFor(error);
    const code = errorCode(error);
    const message = errorText(error instanceof Error ? error.message : String(error));
    const hint = hintFor(error);
    if (this.json) {
      this.#io.stdout.write(`${JSON.stringify({ ok: false, error: { code, message, exit_code: exitCode, ...(hint ? { hint } : {}) } })}\n`);
    }
    if (!options.printed) {
      // An error that is not ours is a bug: its stack helps whoever reports it.
      const detail = code === 'ERR_INTERNAL' && error instanceof Error && error.stack ? errorText(error.stack) : message;
      this.#io.stderr.write(`agent-gateway-registry: error: ${detail}\n${hint ? `hint: ${hint}\n` : ''}`);
    }
    return exitCode;
  }
}

/** Control characters a message must not carry raw: C0 but newline and tab, DEL, and C1. */
const RAW_CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g;

/**
 * The text of a warning or an error as printed (stderr, and the `error.message` of --json): the
 * passwords of URLs and `password=` settings a library quoted are replaced by `redacted`, and
 * control characters are written as `\uXXXX`. Our messages quote values with JSON.stringify,
 * which escapes C0 (`\n`, `\u001b`) but leaves DEL and C1 (U+0080-U+009F, U+009B being a
 * terminal's CSI) raw, and a library's message may hold anything; newlines and tabs that format
 * the message itself are kept.
 */
export function errorText(text: string): string {
  return redactUrlPasswords(text).replace(RAW_CONTROL, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}

/** Buffers become lowercase hex and bigints decimal text, so JSON output never loses bytes or digits. */
function jsonReplacer(_key: string, value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString();
  if (value && typeof value === 'object' && (value as { type?: unknown }).type === 'Buffer' && Array.isArray((value as { data?: unknown }).data)) {
    return Buffer.from((value as { data: number[] }).data).toString('hex');
  }
  return value;
}
