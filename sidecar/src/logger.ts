import { pino, type DestinationStream, type Logger } from 'pino';
import { logDestination } from '../../core/log-destination.js';
import { isoTimeOncePerMs } from '../../core/log-time.js';
import { GATEWAY_TARGET, levelForTargets, SIDECAR_TARGET, type LogLevel } from '../../core/log-filter.js';

export { LOG_LEVELS, type LogLevel } from '../../core/log-filter.js';

/**
 * The sidecar's log level, from AGENT_GATEWAY_SIDECAR_LOG or else RUST_LOG (core/log-filter.ts):
 * a directive for `agent_gateway_sidecar` beats one for `agent_gateway`, which beats the bare
 * default. Throws with a readable message.
 */
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
      timestamp: isoTimeOncePerMs,
      // Nothing here logs a PIN; this is the net under that rule.
      redact: { paths: ['pin', '*.pin', 'userPin', 'soPin', '*.userPin', '*.soPin', 'pins', '*.pins'], censor: '[redacted]' },
    },
    // Stderr, bounded: a stalled reader costs lines, never the sidecar's event loop; the last
    // lines before an exit (a fatal error, shutdown) are still flushed, within a deadline. Line by
    // line: its port line goes to stdout, and what was logged before it must be there first.
    options.destination ?? logDestination(2, { coalesce: false }),
  );
}
