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
 * The largest piece handed to sonic-boom at once: its own largest write (maxWrite). A write under
 * way when the process exits is lost from where it stopped, so no write may be larger.
 */
const PIECE_BYTES = 16 * 1024;

/**
 * How long a line may wait for its piece to fill before the piece is written anyway (`coalesce`).
 * The operator's view of a line is that much late at most; the audit trail is the record.
 */
export const LOG_HOLD_MS = 10;

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
   * Lines are encoded into a piece of PIECE_BYTES as they come and the piece is written when it is
   * full or LOG_HOLD_MS after its first line. Written a turn of the event loop at a time, the
   * gateway's two lines per CONNECT cost a write, and a hand-off to libuv's thread pool and back,
   * every turn or two; held as strings across turns, they outlived young-generation collections
   * (bench/README.md). Encoded at once, a line's string dies young and a write carries ~16 CONNECTs.
   * Off for a process that also prints on another stream (the sidecar's port line on stdout): a
   * line logged before that print must not reach its reader after it.
   */
  readonly coalesce?: boolean;
}

/**
 * `fd` written asynchronously, as pino writes stdout by default: lines that arrive while a write
 * is under way leave together in the next one. Unlike pino's default, at most `maxBytes` wait
 * (then lines are dropped and counted), and the flush at exit gives up after EXIT_FLUSH_MS.
 */
export function logDestination(fd: number, options: LogDestinationOptions = {}): DestinationStream {
  const maxBytes = options.maxBytes ?? LOG_BUFFER_BYTES;
  const coalesce = options.coalesce !== false;
  const stream = pino.destination({
    dest: fd,
    sync: false,
    maxLength: maxBytes,
    // Pieces are Buffers (coalesce); otherwise pino's lines go to sonic-boom as they are.
    ...(coalesce ? { contentMode: 'buffer' as const } : {}),
    // Retry a full pipe for as long as the process runs (the buffer is bounded); at exit, until the deadline.
    retryEAGAIN: () => exitDeadline === undefined || Date.now() < exitDeadline,
  });
  // A dropped write may be a whole piece of lines.
  stream.on('drop', (data: string | Buffer) => (droppedLines += Math.max(1, linesIn(data))));
  const write = stream.write.bind(stream) as unknown as (data: Buffer) => boolean;
  const destroyed = () => (stream as unknown as { destroyed: boolean }).destroyed;
  const piece = Buffer.allocUnsafeSlow(coalesce ? PIECE_BYTES : 0);
  let used = 0;
  /** Pieces filled in this turn: written when it ends (or by flushSync if the process exits first). */
  let full: Buffer[] = [];
  let timer: NodeJS.Timeout | undefined;
  let turnEnd: NodeJS.Immediate | undefined;
  const close = () => {
    if (used === 0) return;
    // A copy of what is used, the piece itself reused: sonic-boom counts bytes toward maxBytes,
    // so a stalled reader fed a line every LOG_HOLD_MS must not make it keep 16 KiB for each.
    full.push(Buffer.from(piece.subarray(0, used)));
    used = 0;
  };
  // Not within the turn that filled them: a write started then would be under way if the same
  // turn called process.exit(), and sonic-boom's flushSync skips a write under way (what the pipe
  // had no room for would be lost).
  const release = () => {
    if (timer !== undefined) clearTimeout(timer);
    if (turnEnd !== undefined) clearImmediate(turnEnd);
    timer = turnEnd = undefined;
    close();
    const pieces = full;
    full = [];
    for (const data of pieces) {
      if (destroyed()) droppedLines += linesIn(data);
      else write(data);
    }
  };
  if (coalesce) {
    stream.write = (line: string) => {
      // A UTF-16 unit is at most 3 bytes of UTF-8: the exact length only when it may not fit.
      if (used + line.length * 3 > PIECE_BYTES) {
        const size = Buffer.byteLength(line);
        if (used + size > PIECE_BYTES) {
          close();
          turnEnd ??= setImmediate(release);
        }
        if (size > PIECE_BYTES) {
          // A line larger than a piece (rare: a long error) is a piece of its own.
          full.push(Buffer.from(line));
          return true;
        }
      }
      used += piece.write(line, used);
      timer ??= setTimeout(release, LOG_HOLD_MS).unref();
      return true;
    };
  }
  const flush = stream.flush.bind(stream);
  stream.flush = (cb?: (error?: Error) => void) => {
    release();
    flush(cb);
  };
  const flushSync = stream.flushSync.bind(stream);
  const buffered = stream as unknown as { minLength: number };
  // Past the deadline flushSync throws; what it could not write is lost, and the exit goes on.
  stream.flushSync = () => {
    try {
      // The pieces are only buffered here: handed over as usual, the first would start an
      // asynchronous write, which sonic-boom's flushSync skips (and nothing is left to finish it).
      const minLength = buffered.minLength;
      buffered.minLength = Number.MAX_SAFE_INTEGER;
      try {
        release();
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
