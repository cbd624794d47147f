/**
 * core/log-destination.ts (the gateway's stdout, the sidecar's stderr): lines are written asynchronously, and a reader that
 * stops reading costs dropped (counted) lines beyond the bound, never unbounded memory or a
 * blocked event loop. A real FIFO nobody reads stands in for a stalled journald or a full pipe.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import fs, { closeSync, constants, mkdtempSync, openSync, readSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { pino } from 'pino';
import { droppedLogLines, EXIT_FLUSH_MS, LOG_HOLD_MS, logDestination } from '../../core/log-destination.js';
import { until } from '../helpers/wait.js';

const MODULE = new URL('../../core/log-destination.ts', import.meta.url).pathname;

/** A FIFO with its read and write ends open in this process, both non-blocking: a pipe nobody reads until the test says so. */
function fifoPair(): { dir: string; path: string; reader: number; writer: number } {
  const dir = mkdtempSync(join(tmpdir(), 'agw-log-'));
  const path = join(dir, 'stdout');
  execFileSync('mkfifo', [path]);
  const reader = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  const writer = openSync(path, constants.O_WRONLY | constants.O_NONBLOCK);
  return { dir, path, reader, writer };
}

/** Reads a non-blocking fd until nothing comes for `quietMs`; returns the text. */
async function drain(fd: number, quietMs: number): Promise<string> {
  let text = '';
  const chunk = Buffer.alloc(1 << 20);
  for (let quiet = 0; quiet < quietMs / 10; ) {
    let n = 0;
    try {
      n = readSync(fd, chunk);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EAGAIN') throw error;
    }
    if (n > 0) {
      text += chunk.toString('utf8', 0, n);
      quiet = 0;
    } else {
      quiet++;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
  return text;
}

test('log destination: a reader that stops costs dropped lines past the bound, counted, and the event loop keeps running', async () => {
  // Nobody reads until the end.
  const { dir, reader, writer } = fifoPair();
  const bound = 256 * 1024;
  const destination = logDestination(writer, { maxBytes: bound });
  const log = pino({ level: 'info' }, destination);
  const before = droppedLogLines();
  const line = 'x'.repeat(1000);
  const started = performance.now();
  for (let i = 0; i < 2000; i++) {
    log.info({ i, line }, 'a line');
    if (i % 100 === 0) await new Promise((resolve) => setImmediate(resolve));
  }
  const elapsed = performance.now() - started;
  // The last lines reach the bound (and are counted) once they are held no longer.
  await new Promise((resolve) => setTimeout(resolve, LOG_HOLD_MS + 20));
  const dropped = droppedLogLines() - before;
  // ~2 MB offered; the pipe holds 64 KiB and the destination at most `bound` more.
  assert.ok(dropped > 1000, `most lines past the bound are dropped (${dropped} of 2000)`);
  assert.ok(elapsed < 5000, `writing never waited on the stalled reader (${Math.round(elapsed)} ms)`);
  // The reader comes back: what was kept arrives, whole lines in order. Until nothing more comes
  // for 500 ms (the destination retries a full pipe every 100 ms).
  const text = await drain(reader, 500);
  const lines = text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { i: number });
  assert.ok(lines.length > 0 && lines.length + dropped === 2000, `every line either arrived or was counted (${lines.length} + ${dropped})`);
  assert.deepEqual(lines.map((l) => l.i), [...lines.map((l) => l.i)].sort((a, b) => a - b), 'in order');
  (destination as unknown as { destroy(): void }).destroy();
  closeSync(reader);
  rmSync(dir, { recursive: true, force: true });
});

// Each line used to be its own write (two per CONNECT, on libuv's thread pool): 11% of the
// gateway's CPU per CONNECT; then one write per turn of the event loop, still a write and a
// thread-pool hand-off every CONNECT or two (bench/compare.ts --phases connect, same run).
test('log destination: lines leave in pieces of at most 16 KiB whatever the turns, and a lone line leaves within LOG_HOLD_MS', async () => {
  const { dir, path: fifo, reader, writer } = fifoPair();
  const writer2 = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
  // Count the writes to each fd, and their sizes (sonic-boom calls fs.write through the module object).
  const writesTo = new Map<number, number>();
  const sizes: number[] = [];
  const write = fs.write;
  fs.write = ((fd: number, data: Buffer | string, ...rest: unknown[]) => {
    writesTo.set(fd, (writesTo.get(fd) ?? 0) + 1);
    if (fd === writer) sizes.push(Buffer.byteLength(data));
    return (write as (...args: unknown[]) => void)(fd, data, ...rest);
  }) as typeof fs.write;
  const writes = () => writesTo.get(writer) ?? 0;
  const destination = logDestination(writer);
  const log = pino({ level: 'info' }, destination);
  try {
    // 20 turns of 10 lines each (about 250 bytes a line, ~50 KB in all, under the pipe's 64 KiB),
    // as session reads carrying several CONNECTs log several decisions in one turn; one line in
    // each turn is multi-byte UTF-8.
    for (let turn = 0; turn < 20; turn++) {
      for (let i = 0; i < 10; i++) log.info({ i: turn * 10 + i, line: (i === 0 ? 'é€😀' : '').padEnd(150, 'y') }, 'burst');
      await new Promise((resolve) => setImmediate(resolve));
      await new Promise((resolve) => setImmediate(resolve));
    }
    const burst = await drain(reader, 300);
    const lines = burst.split('\n').filter(Boolean).map((l) => JSON.parse(l) as { i: number });
    assert.deepEqual(lines.map((l) => l.i), Array.from({ length: 200 }, (_, i) => i), 'every line, whole and in order');
    assert.ok(writes() <= 5, `${writes()} writes for 200 lines (~50 KB) in 20 turns: a write per 16 KiB piece, not per turn`);
    assert.ok(Math.max(...sizes) <= 16 * 1024, `no write above 16 KiB (${Math.max(...sizes)})`);
    assert.ok(burst.includes('é€😀'), 'multi-byte characters arrive whole');

    // A lone line does not wait for company beyond LOG_HOLD_MS.
    const before = writes();
    log.info({ lone: true }, 'alone');
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(writes(), before, 'held past the end of its turn');
    await new Promise((resolve) => setTimeout(resolve, LOG_HOLD_MS + 20));
    assert.equal(writes(), before + 1, 'written once LOG_HOLD_MS passed');
    const lone = await drain(reader, 50);
    assert.match(lone, /"lone":true/);

    // A line larger than a piece leaves whole, after what was held before it.
    log.info({ order: 1 }, 'before the long one');
    log.info({ long: 'z'.repeat(40_000) }, 'long');
    const long = (await drain(reader, 100)).split('\n').filter(Boolean).map((l) => JSON.parse(l) as { order?: number; long?: string });
    assert.deepEqual(long.map((l) => l.order ?? l.long?.length), [1, 40_000], 'in order, whole');

    // coalesce: false (the sidecar, whose port line goes to another stream): at once.
    const direct = logDestination(writer2, { coalesce: false });
    pino({ level: 'info' }, direct).info({ direct: true }, 'at once');
    assert.equal(writesTo.get(writer2), 1, 'written within the turn');
    assert.match(await drain(reader, 50), /"direct":true/);
    (direct as unknown as { destroy(): void }).destroy();
  } finally {
    fs.write = write;
    (destination as unknown as { destroy(): void }).destroy();
    closeSync(reader);
    rmSync(dir, { recursive: true, force: true });
  }
});

// Regression: pino's exit hook retried a full stdout forever, so a process whose log reader had
// stopped could not exit, neither on process.exit() nor on a crash.
for (const [how, end] of [
  ['process.exit()', 'process.exit(0);'],
  ['an uncaught exception', "throw new Error('crash');"],
] as const) {
  test(`log destination: with its stdout unread, the process still exits on ${how}, within the flush deadline`, async () => {
    const script = `
      import { pino } from 'pino';
      import { logDestination } from ${JSON.stringify(MODULE)};
      const log = pino({ level: 'info' }, logDestination(1));
      for (let i = 0; i < 2000; i++) log.info({ i, line: 'x'.repeat(1000) }, 'a line');
      setTimeout(() => { ${end} }, 200);
    `;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: new URL('../..', import.meta.url).pathname, stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.pause(); // nobody reads: the pipe fills and stays full
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const started = performance.now();
    const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
    const [code, signal] = (await once(child, 'exit')) as [number | null, string | null];
    clearTimeout(timer);
    const took = performance.now() - started;
    assert.equal(signal, null, `it exited on its own (stderr: ${stderr.slice(-500)})`);
    assert.equal(code, how === 'process.exit()' ? 0 : 1);
    assert.ok(took < EXIT_FLUSH_MS + 5000, `exited ${Math.round(took)} ms after start, with ${EXIT_FLUSH_MS} ms to flush`);
    child.stdout.destroy();
  });
}

// Regression (found in review of bea4c7f): at exit, the last turn was handed to sonic-boom's
// write(), which started an asynchronous fs.write; sonic-boom's flushSync then skipped that write
// under way, so with the pipe nearly full the turn was neither written nor retried within
// EXIT_FLUSH_MS: lines lost, the last one cut and spliced into what followed.
test('log destination: the last turn before process.exit() reaches a reader that comes back within the flush deadline', async () => {
  const { dir, reader, writer } = fifoPair();
  const script = `
    import { pino } from 'pino';
    import { logDestination } from ${JSON.stringify(MODULE)};
    const log = pino({ level: 'info' }, logDestination(process.stdout.fd ?? 1));
    // About 50 KB, one line per turn: every write completes, the 64 KiB pipe is left nearly full.
    for (let i = 0; i < 50; i++) { log.info({ i, pad: 'p'.repeat(900) }, 'earlier'); await new Promise((r) => setTimeout(r, 2)); }
    setTimeout(() => {
      for (let i = 0; i < 20; i++) log.info({ i, pad: 'q'.repeat(900) }, 'last words'); // e.g. the shutdown turn
      process.stderr.write('exiting\\n');
      process.exit(0);
    }, 200);
  `;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: new URL('../..', import.meta.url).pathname, stdio: ['ignore', writer, 'pipe'] });
  closeSync(writer);
  const exited = once(child, 'exit') as Promise<[number | null]>;
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  try {
    await until(() => stderr.includes('exiting'), 10_000);
    await new Promise((resolve) => setTimeout(resolve, 1000)); // the reader comes back 1 s after the exit began
    const text = await drain(reader, 500);
    const lines = text.split('\n').filter(Boolean);
    const parsed = lines.map((l) => { try { return JSON.parse(l) as { msg: string; i: number }; } catch { return { msg: 'CORRUPT', i: -1 }; } });
    assert.deepEqual(parsed.filter((l) => l.msg === 'last words').map((l) => l.i), Array.from({ length: 20 }, (_, i) => i), 'every line of the last turn, in order');
    assert.deepEqual(parsed.filter((l) => l.msg === 'CORRUPT').length, 0, 'no line cut and spliced into the next');
    const [code] = await exited;
    assert.equal(code, 0);
  } finally {
    child.kill('SIGKILL');
    closeSync(reader);
    rmSync(dir, { recursive: true, force: true });
  }
});
