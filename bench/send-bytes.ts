import type { Writable } from 'node:stream';

/** What the benchmarks' traffic servers send: 256 KiB of 'a', reused for every write. */
export const CHUNK = Buffer.alloc(256 * 1024, 0x61);

/** Writes `total` bytes of CHUNK to `out` with back-pressure, then calls `done` (if given). */
export function sendBytes(out: Writable, total: number, done?: () => void): void {
  let left = total;
  const pump = () => {
    while (left > 0) {
      const n = Math.min(left, CHUNK.length);
      left -= n;
      if (!out.write(n === CHUNK.length ? CHUNK : CHUNK.subarray(0, n))) return void out.once('drain', pump);
    }
    done?.();
  };
  pump();
}
