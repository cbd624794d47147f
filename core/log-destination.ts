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

/** The largest piece of a turn handed to sonic-boom at once: its own largest write (maxWrite). */
const TURN_PIECE_BYTES = 16 * 1024;

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

function linesIn(data: string | Buffer): number {
  let n = 0;
  for (let at = data.indexOf('\n'); at !== -1; at = data.indexOf('\n', at + 1)) n++;
  return n;
}

export interface LogDestinationOptions {
  /** Past this many bytes waiting for the reader, lines are dropped and counted. */
  readonly maxBytes?: number;
  /**
   * The lines of one turn of the event loop leave together in one write at its end (a line waits
   * no longer than that). Written one by one, the gateway's two lines per CONNECT were two writes
   * each, handed to libuv's thread pool, which runs on the cores the tunnels need: 11% of its CPU
   * per CONNECT. Off for a process that also prints on another stream (the sidecar's port line on
   * stdout): a line logged before that print must not reach its reader after it.
   */
  readonly coalesceTurn?: boolean;
}

/**
 * `fd` written asynchronously, as pino writes stdout by default: lines that arrive while a write
 * is under way leave together in the next one. Unlike pino's default, at most `maxBytes` wait
 * (then lines are dropped and counted), and the flush at exit gives up after EXIT_FLUSH_MS.
 */
export function logDestination(fd: number, options: LogDestinationOptions = {}): DestinationStream {
  const maxBytes = options.maxBytes ?? LOG_BUFFER_BYTES;
  const stream = pino.destination({
    dest: fd,
    sync: false,
    maxLength: maxBytes,
    // Retry a full pipe for as long as the process runs (the buffer is bounded); at exit, until the deadline.
    retryEAGAIN: () => exitDeadline === undefined || Date.now() < exitDeadline,
  });
  // A dropped write may be a whole turn's lines.
  stream.on('drop', (data: string | Buffer) => (droppedLines += Math.max(1, linesIn(data))));

  // The lines of the current turn (coalesceTurn), handed over when it ends, in pieces of at most
  // TURN_PIECE_BYTES: a write under way when the process exits is lost from where it stopped, so
  // no write may be larger than sonic-boom's own (16 KiB).
  const write = stream.write.bind(stream);
  let turn: string[] = [];
  let scheduled = false;
  const endOfTurn = () => {
    scheduled = false;
    if (turn.length === 0) return;
    const lines = turn;
    turn = [];
    if ((stream as unknown as { destroyed: boolean }).destroyed) {
      droppedLines += lines.length;
      return;
    }
    let piece = '';
    let bytes = 0;
    for (const line of lines) {
      const size = Buffer.byteLength(line);
      if (bytes > 0 && bytes + size > TURN_PIECE_BYTES) {
        write(piece);
        piece = '';
        bytes = 0;
      }
      piece += line;
      bytes += size;
    }
    write(piece);
  };
  if (options.coalesceTurn !== false) {
    stream.write = (line: string) => {
      turn.push(line);
      if (!scheduled) {
        scheduled = true;
        setImmediate(endOfTurn);
      }
      return true;
    };
  }
  const flush = stream.flush.bind(stream);
  stream.flush = (cb?: (error?: Error) => void) => {
    endOfTurn();
    flush(cb);
  };
  const flushSync = stream.flushSync.bind(stream);
  const buffered = stream as unknown as { minLength: number };
  // Past the deadline flushSync throws; what it could not write is lost, and the exit goes on.
  stream.flushSync = () => {
    try {
      // The turn is only buffered here: handed over as usual, its first piece would start an
      // asynchronous write, which sonic-boom's flushSync skips (and nothing is left to finish it).
      const minLength = buffered.minLength;
      buffered.minLength = Number.MAX_SAFE_INTEGER;
      try {
        endOfTurn();
      } finally {
        buffered.minLength = minLength;
      }
      flushSync();
    } catch {
      droppedLines++;
    }
  };
  return stream;
}
