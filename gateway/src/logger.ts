import { pino, type DestinationStream, type Logger } from 'pino';

/**
 * `observability.log_level` is a tracing-style filter as in the original gateway: `info`,
 * `debug`, `agent_gateway=debug`, or a comma list such as `warn,agent_gateway=debug`.
 * Every line this process writes belongs to the `agent_gateway` target, so a directive for
 * that target (or one of its modules) wins over the bare default; directives for other targets
 * are accepted and have nothing to filter here.
 */
export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'off'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
const OUR_TARGETS = /^agent[_-]gateway(?:::[A-Za-z0-9_:]+)?$/;

function asLevel(text: string, directive: string): LogLevel {
  const level = text.trim().toLowerCase();
  if (level === 'warning') return 'warn';
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new Error(`unknown level "${text}" in "${directive}" (expected one of ${LOG_LEVELS.join(', ')}, optionally target=level)`);
  }
  return level as LogLevel;
}

/**
 * The level for a process whose lines belong to `targets` (most specific first) under a
 * tracing-style filter: the most specific target with a directive wins, then the bare default.
 * Shared by the gateway and the sidecar (which also honours its parent target agent_gateway).
 */
export function levelForTargets(filter: string, targets: readonly RegExp[]): LogLevel {
  const directives = filter.split(',').map((d) => d.trim()).filter(Boolean);
  if (directives.length === 0) throw new Error('must not be empty (e.g. "info" or "agent_gateway=debug")');
  let fallback: LogLevel = 'error';
  const matched: (LogLevel | undefined)[] = targets.map(() => undefined);
  const targetIndex = (name: string) => targets.findIndex((target) => target.test(name));
  for (const directive of directives) {
    const eq = directive.indexOf('=');
    if (eq < 0) {
      // tracing reads a bare target name as "that target at trace"; only ours can matter here, and
      // any other bare word is far more likely a mistyped level, so it is an error.
      const index = targetIndex(directive);
      if (index >= 0) matched[index] = 'trace';
      else fallback = asLevel(directive, directive);
      continue;
    }
    const target = directive.slice(0, eq).trim();
    const level = asLevel(directive.slice(eq + 1), directive);
    if (!/^[A-Za-z_][A-Za-z0-9_:-]*$/.test(target)) throw new Error(`cannot read target "${target}" in "${directive}"`);
    const index = targetIndex(target);
    if (index >= 0) matched[index] = level;
  }
  return matched.find((level) => level !== undefined) ?? fallback;
}

/** The gateway's level: every line it writes belongs to the `agent_gateway` target. */
export function parseLogFilter(filter: string): LogLevel {
  return levelForTargets(filter, [OUR_TARGETS]);
}

export interface LoggerOptions {
  readonly filter: string;
  /** Where lines go; default stdout, or nowhere when AGENT_GATEWAY_LOG_STDOUT=false. */
  readonly destination?: DestinationStream;
  readonly name?: string;
}

export function createLogger(options: LoggerOptions): Logger {
  const level = parseLogFilter(options.filter);
  const quiet = process.env.AGENT_GATEWAY_LOG_STDOUT === 'false' && options.destination === undefined;
  return pino(
    {
      name: options.name ?? 'agent_gateway',
      level: level === 'off' || quiet ? 'silent' : level,
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: { paths: ['databaseUrl', '*.databaseUrl', 'database_url', '*.database_url', 'pin', '*.pin', 'userPin', 'soPin'], censor: '[redacted]' },
    },
    options.destination,
  );
}

/** Removes the password from a database URL before it reaches a message. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = 'redacted';
    return parsed.toString();
  } catch {
    return '[unparseable url]';
  }
}
