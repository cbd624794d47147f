import { pino, type DestinationStream, type Logger } from 'pino';
import { levelForTargets, type LogLevel } from '../../gateway/src/logger.js';

export { LOG_LEVELS, type LogLevel } from '../../gateway/src/logger.js';

/**
 * The sidecar's log filter, read from AGENT_GATEWAY_SIDECAR_LOG or else RUST_LOG (the original
 * sidecar used tracing's filter syntax): `info`, `debug`, `agent_gateway_sidecar=debug`, or a
 * comma list such as `warn,agent_gateway_sidecar=debug`. A directive for the sidecar's target
 * beats one for `agent_gateway` (its parent in spirit), which beats the bare default; directives
 * for other targets are accepted and filter nothing here.
 */
const SIDECAR_TARGET = /^agent[_-]gateway[_-]sidecar(?:::[A-Za-z0-9_:]+)?$/;
const GATEWAY_TARGET = /^agent[_-]gateway(?:::[A-Za-z0-9_:]+)?$/;

/** The effective level for the sidecar's own lines. Throws with a readable message. */
export function parseLogFilter(filter: string): LogLevel {
  return levelForTargets(filter, [SIDECAR_TARGET, GATEWAY_TARGET]);
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
