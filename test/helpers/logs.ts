import { Writable } from 'node:stream';
import { pino, type Logger } from 'pino';

/** A pino logger whose JSON lines land, parsed, in `lines`, so tests can assert on them. */
export function captureLogger(lines: Record<string, unknown>[], level = 'debug'): Logger {
  return pino(
    { level },
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        for (const line of chunk.toString('utf8').split('\n')) if (line.trim()) lines.push(JSON.parse(line) as Record<string, unknown>);
        callback();
      },
    }),
  );
}
