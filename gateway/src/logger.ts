import { pino, type DestinationStream, type Logger } from 'pino';
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
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: { paths: ['databaseUrl', '*.databaseUrl', 'database_url', '*.database_url', 'pin', '*.pin', 'userPin', 'soPin'], censor: '[redacted]' },
    },
    options.destination ?? stdoutDestination(),
  );
}

/**
 * How many bytes of lines may wait for stdout. Past it, lines are dropped and counted
 * (`agent_gateway_log_lines_dropped_total`): a stalled log reader must neither grow the
 * gateway's memory without bound nor stop its event loop. The audit trail in PostgreSQL is
 * the record; these lines are the operator's view.
 */
export const LOG_BUFFER_BYTES = 16 * 1024 * 1024;

let droppedLines = 0;

/** Lines every stdoutDestination() of this process dropped because its reader fell behind. */
export function droppedLogLines(): number {
  return droppedLines;
}

/**
 * Stdout (or `fd`), written asynchronously: lines that arrive while a write is under way leave
 * together in the next one, instead of one write(2) per line (5% of the gateway's CPU at 3,700
 * CONNECTs/s). A line still leaves at once when nothing is being written, and pino flushes what
 * is left synchronously when the process exits.
 */
export function stdoutDestination(fd: number = process.stdout.fd ?? 1, maxBytes: number = LOG_BUFFER_BYTES): DestinationStream {
  const stream = pino.destination({ dest: fd, sync: false, maxLength: maxBytes });
  stream.on('drop', () => droppedLines++);
  return stream;
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
