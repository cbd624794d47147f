import { pino, type DestinationStream, type Logger } from 'pino';

/**
 * The sidecar's log filter, read from AGENT_GATEWAY_SIDECAR_LOG or else RUST_LOG (the original
 * sidecar used tracing's filter syntax): `info`, `debug`, `agent_gateway_sidecar=debug`, or a
 * comma list such as `warn,agent_gateway_sidecar=debug`. A directive for the sidecar's target
 * beats one for `agent_gateway` (its parent in spirit), which beats the bare default; directives
 * for other targets are accepted and filter nothing here.
 */
export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'off'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];
const SIDECAR_TARGET = /^agent[_-]gateway[_-]sidecar(?:::[A-Za-z0-9_:]+)?$/;
const GATEWAY_TARGET = /^agent[_-]gateway(?:::[A-Za-z0-9_:]+)?$/;

function asLevel(text: string, directive: string): LogLevel {
  const level = text.trim().toLowerCase();
  if (level === 'warning') return 'warn';
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new Error(`unknown level "${text}" in "${directive}" (expected one of ${LOG_LEVELS.join(', ')}, optionally target=level)`);
  }
  return level as LogLevel;
}

/** The effective level for the sidecar's own lines. Throws with a readable message. */
export function parseLogFilter(filter: string): LogLevel {
  const directives = filter.split(',').map((d) => d.trim()).filter(Boolean);
  if (directives.length === 0) throw new Error('must not be empty (e.g. "info" or "agent_gateway_sidecar=debug")');
  let fallback: LogLevel = 'error';
  let gateway: LogLevel | undefined;
  let sidecar: LogLevel | undefined;
  for (const directive of directives) {
    const eq = directive.indexOf('=');
    if (eq < 0) {
      // tracing reads a bare target as "that target at trace"; any other bare word is a level.
      if (SIDECAR_TARGET.test(directive)) sidecar = 'trace';
      else if (GATEWAY_TARGET.test(directive)) gateway = 'trace';
      else fallback = asLevel(directive, directive);
      continue;
    }
    const target = directive.slice(0, eq).trim();
    const level = asLevel(directive.slice(eq + 1), directive);
    if (!/^[A-Za-z_][A-Za-z0-9_:-]*$/.test(target)) throw new Error(`cannot read target "${target}" in "${directive}"`);
    if (SIDECAR_TARGET.test(target)) sidecar = level;
    else if (GATEWAY_TARGET.test(target)) gateway = level;
  }
  return sidecar ?? gateway ?? fallback;
}

export interface SidecarLoggerOptions {
  readonly level: LogLevel;
  /** Default: stderr, so stdout carries only the one JSON line with the port. */
  readonly destination?: DestinationStream;
  /** AGENT_GATEWAY_LOG_STDOUT=false: write no log lines at all (OTLP-only setups). */
  readonly quiet?: boolean;
}

export function createSidecarLogger(options: SidecarLoggerOptions): Logger {
  return pino(
    {
      name: 'agent_gateway_sidecar',
      level: options.level === 'off' || options.quiet ? 'silent' : options.level,
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      // Nothing here logs a PIN; this is the net under that rule.
      redact: { paths: ['pin', '*.pin', 'userPin', 'soPin', '*.userPin', '*.soPin', 'pins', '*.pins'], censor: '[redacted]' },
    },
    // Synchronous, so the last lines before exit (a fatal error, shutdown) are not lost.
    options.destination ?? pino.destination({ fd: 2, sync: true }),
  );
}
