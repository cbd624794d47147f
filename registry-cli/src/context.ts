import { databaseTarget, type DatabaseTarget } from './environment.js';
import type { ExitCode } from './errors.js';
import type { Output } from './output.js';

/** What every subcommand gets: the environment, global options, and the output. */
export interface CommandContext {
  readonly env: NodeJS.ProcessEnv;
  readonly output: Output;
  /** `--database-url-env NAME`. */
  readonly databaseUrlEnv: string | undefined;
}

/** A subcommand's result: `data` for `--json`, `human` lines otherwise, and an exit code when not 0. */
export interface CommandResult {
  readonly data: Record<string, unknown>;
  readonly human: readonly string[];
  readonly exitCode?: ExitCode;
}

/** The registry URL for this run (printed only through redactUrl (core/redact-url.ts)). */
export function registryTarget(context: CommandContext): DatabaseTarget {
  return databaseTarget(context.env, context.databaseUrlEnv);
}
