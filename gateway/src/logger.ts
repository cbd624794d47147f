import { pino, type DestinationStream, type Logger } from 'pino';
import { logDestination } from '../../core/log-destination.js';
import { isoTimeOncePerMs } from '../../core/log-time.js';
import { GATEWAY_TARGET, levelForTargets, type LogLevel } from '../../core/log-filter.js';

/**
 * `observability.log_level` is a tracing-style filter (core/log-filter.ts). Every line this
 * process writes belongs to the `agent_gateway` target.
 */
export { LOG_LEVELS, type LogLevel } from '../../core/log-filter.js';

/** The gateway's level: every line it writes belongs to the `agent_gateway` target. */
export function parseLogFilter(filter: string): LogLevel {
  return levelForTargets(filter, [GATEWAY_TARGET]);
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
      timestamp: isoTimeOncePerMs,
      redact: { paths: ['databaseUrl', '*.databaseUrl', 'database_url', '*.database_url', 'pin', '*.pin', 'userPin', 'soPin'], censor: '[redacted]' },
    },
    options.destination ?? logDestination(process.stdout.fd ?? 1),
  );
}
