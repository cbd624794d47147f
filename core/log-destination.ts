import { pino, type DestinationStream } from 'pino';

/**
 * Where the gateway's and the sidecar's log lines go: a file descriptor (stdout, stderr) written
 * asynchronously, with two bounds pino's own destinations lack. Whoever reads the lines (journald,
 * a pipe, a terminal) may stall; that must cost log lines, never the process's memory, its event
 * loop or its exit.
 */

/**
 * How many bytes of lines may wait for their reader. Past it, lines are dropped and counted (the
 * gateway's `agent_gateway_log_lines_dropped_total`): a stalled log reader must neither grow the
 * process's memory without bound nor stop its event loop. The audit trail in PostgreSQL is the
 * record; these lines are the operator's view.
 */
export const LOG_BUFFER_BYTES = 16 * 1024 * 1024;

/**
 * Once the process exits, how long its last lines may wait for a stalled reader. pino flushes
 * them synchronously at exit, retrying a full pipe every 100 ms; without a deadline, a gateway
 * or sidecar whose journald stopped reading could neither finish a shutdown nor die from a crash,
 * and would keep its port from the restart that should follow.
 */
export const EXIT_FLUSH_MS = 2000;

/**
 * Lines wait until this many bytes are buffered, or LOG_FLUSH_MS has passed, and leave in one
 * write. Written as they came, the gateway's two lines per CONNECT were two writes each, handed
 * to libuv's thread pool, which runs on the cores the tunnels need.
 */
export const LOG_BATCH_BYTES = 8 * 1024;

/** The longest a line waits for its batch: operators tailing the log see it within this. */
export const LOG_FLUSH_MS = 100;

let droppedLines = 0;
let exitDeadline: number | undefined;
// Prepended, so the deadline is set before pino's own exit hook flushes.
process.prependListener('exit', () => {
  exitDeadline ??= Date.now() + EXIT_FLUSH_MS;
});

/** Lines every logDestination() of this process dropped because its reader fell behind. */
export function droppedLogLines(): number {
  return droppedLines;
}

/**
 * `fd` written asynchronously, as pino writes stdout by default, but in batches: lines leave
 * together once LOG_BATCH_BYTES wait or after LOG_FLUSH_MS. Unlike pino's default, at most
 * `maxBytes` wait (then lines are dropped and counted), and the flush at exit gives up after
 * EXIT_FLUSH_MS.
 */
export function logDestination(fd: number, maxBytes: number = LOG_BUFFER_BYTES): DestinationStream {
  const stream = pino.destination({
    dest: fd,
    sync: false,
    minLength: LOG_BATCH_BYTES,
    periodicFlush: LOG_FLUSH_MS,
    maxLength: maxBytes,
    // Retry a full pipe for as long as the process runs (the buffer is bounded); at exit, until the deadline.
    retryEAGAIN: () => exitDeadline === undefined || Date.now() < exitDeadline,
  });
  stream.on('drop', () => droppedLines++);
  const flushSync = stream.flushSync.bind(stream);
  // Past the deadline flushSync throws; what it could not write is lost, and the exit goes on.
  stream.flushSync = () => {
    try {
      flushSync();
    } catch {
      droppedLines++;
    }
  };
  return stream;
}
