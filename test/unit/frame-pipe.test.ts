/**
 * core/frame-pipe.ts over a real loopback TCP connection: what `pipe()` guarantees (order,
 * completeness, end, back-pressure, detaching when the socket closes), plus the batching it
 * exists for.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { PassThrough, Readable } from 'node:stream';
import { setImmediate as nextCheck } from 'node:timers/promises';
import { test } from 'node:test';
import { BytePipe, pipeFramesToSocket } from '../../core/frame-pipe.js';

async function pair(): Promise<{ server: Server; client: Socket; far: Socket }> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const client = connect((server.address() as { port: number }).port, '127.0.0.1');
  await once(client, 'connect');
  const [far] = (await accepted) as [Socket];
  return { server, client, far };
}

const FRAME = 16 * 1024;

test('frame-pipe: every byte arrives in order, and the end of the stream ends the socket', async () => {
  const { server, client, far } = await pair();
  const from = new PassThrough();
  pipeFramesToSocket(from, client);
  const received: Buffer[] = [];
  far.on('data', (chunk: Buffer) => received.push(chunk));
  const ended = once(far, 'end');
  const sent: Buffer[] = [];
  for (let i = 0; i < 200; i++) {
    const frame = Buffer.alloc(FRAME, i % 251);
    frame.writeUInt32BE(i, 0);
    sent.push(frame);
    from.write(frame);
    if (i % 17 === 0) await nextCheck();
  }
  from.end();
  await ended;
  assert.deepEqual(Buffer.concat(received), Buffer.concat(sent));
  far.destroy();
  client.destroy();
  server.close();
});

test('frame-pipe: the frames of one turn of the event loop leave in one write', async () => {
  const { server, client, far } = await pair();
  const from = new PassThrough();
  pipeFramesToSocket(from, client);
  // Three frames: below the socket's 64 KiB high-water mark, so none is held back by it.
  for (let i = 0; i < 3; i++) from.write(Buffer.alloc(FRAME, i));
  // The frames reach the socket on the stream's own schedule (PassThrough emits on next tick).
  await new Promise((resolve) => process.nextTick(resolve));
  assert.equal(client.writableCorked, 1, 'corked until the check phase');
  assert.equal(client.writableLength, 3 * FRAME, 'the three frames wait together');
  await nextCheck();
  await nextCheck();
  assert.equal(client.writableCorked, 0);
  far.destroy();
  client.destroy();
  server.close();
});

test('frame-pipe: a socket whose reader stops holds the stream back, and reading again lets everything through', async () => {
  const { server, client, far } = await pair();
  far.pause();
  const TOTAL = 4096; // 64 MiB: far more than the kernel's loopback buffers hold
  let pulled = 0;
  const from = new Readable({
    highWaterMark: FRAME,
    read() {
      this.push(pulled < TOTAL ? Buffer.alloc(FRAME, pulled++ % 251) : null);
    },
  });
  pipeFramesToSocket(from, client);
  // Until the far side's reader stops it, the stream is read; then it must stop being read.
  let previous = -1;
  while (pulled !== previous) {
    previous = pulled;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.ok(pulled < TOTAL / 2, `the stream stopped being read (${pulled} of ${TOTAL} frames pulled)`);
  assert.equal(from.isPaused(), true, 'paused by the full socket');
  let received = 0;
  far.on('data', (chunk: Buffer) => (received += chunk.length));
  far.resume();
  await once(far, 'end');
  assert.equal(received, TOTAL * FRAME, 'everything arrives once the reader reads');
  far.destroy();
  client.destroy();
  server.close();
});

test('frame-pipe: when the socket closes, the stream is detached and writing to it is harmless', async () => {
  const { server, client, far } = await pair();
  const from = new PassThrough();
  pipeFramesToSocket(from, client);
  const dataListeners = from.listenerCount('data');
  client.destroy();
  await once(client, 'close');
  assert.equal(from.listenerCount('data'), dataListeners - 1, 'the data listener is gone');
  assert.equal(client.listenerCount('drain'), 0);
  from.resume();
  from.write(Buffer.alloc(FRAME));
  from.end();
  await once(from, 'end');
  far.destroy();
  server.close();
});

test('frame-pipe: a socket destroyed before or while frames arrive never holds the stream paused', async () => {
  // Destroyed before attaching: nothing is attached, the stream keeps flowing for its other readers.
  {
    const { server, client, far } = await pair();
    client.destroy();
    const from = new PassThrough();
    pipeFramesToSocket(from, client);
    assert.equal(from.listenerCount('data'), 0, 'nothing attached to a socket already gone');
    far.destroy();
    server.close();
  }
  // Destroyed, its close not yet emitted: frames are dropped, and the stream is not paused.
  {
    const { server, client, far } = await pair();
    const from = new PassThrough();
    pipeFramesToSocket(from, client);
    client.destroy();
    for (let i = 0; i < 8; i++) from.write(Buffer.alloc(FRAME, i));
    await new Promise((resolve) => process.nextTick(resolve));
    assert.equal(from.isPaused(), false, 'not paused by a socket that can take nothing');
    from.end();
    await once(from, 'end');
    far.destroy();
    server.close();
  }
});

test('byte-pipe unbatched (the download direction): socket bytes reach the stream in order, its end ends the stream, and a full stream holds the socket back', async () => {
  const { server, client, far } = await pair();
  // A writable that takes a chunk only when told: back-pressure on demand.
  const to = new PassThrough({ highWaterMark: 64 * 1024 });
  new BytePipe(client, to, false);
  const sent = Buffer.alloc(4 * 1024 * 1024);
  for (let i = 0; i < sent.length; i += 4) sent.writeUInt32BE(i, i);
  far.end(sent);
  // Nobody reads `to`: the pipe must pause the socket rather than buffer 4 MiB.
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.equal(client.isPaused(), true, 'paused by the full stream');
  assert.ok(to.writableLength <= 256 * 1024, `buffered ${to.writableLength} bytes, not everything`);
  const received: Buffer[] = [];
  to.on('data', (chunk: Buffer) => received.push(chunk));
  await once(to, 'end');
  assert.ok(Buffer.concat(received).equals(sent));
  client.destroy();
  server.close();
});

// Regression (idle tunnel memory): pipe() and closure-based pipes allocated about ten functions
// per pipe for as long as a tunnel stayed open; 2,000 idle tunnels cost 21.5 KiB each, 10.7 once
// every tunnel shared its listeners (bench/compare.ts --phases idle).
test('byte-pipe: every pipe shares the same listener functions, and detach() removes them and frees the emitters for another pipe', async () => {
  const a = await pair();
  const b = await pair();
  const fromA = new PassThrough();
  const fromB = new PassThrough();
  const pipeA = pipeFramesToSocket(fromA, a.client);
  pipeFramesToSocket(fromB, b.client);
  for (const event of ['data', 'end'] as const) assert.equal(fromA.listeners(event)[0], fromB.listeners(event)[0], `one '${event}' listener for every pipe`);
  for (const event of ['drain', 'close'] as const) assert.equal(a.client.listeners(event).at(-1), b.client.listeners(event).at(-1), `one '${event}' listener for every pipe`);

  pipeA.detach();
  assert.equal(fromA.listenerCount('data'), 0);
  assert.equal(a.client.listenerCount('drain'), 0);
  // Another pipe into the same socket works after the first let go.
  const again = new PassThrough();
  pipeFramesToSocket(again, a.client);
  const got = once(a.far, 'data');
  again.write(Buffer.from('after detach'));
  assert.equal(String((await got)[0]), 'after detach');
  for (const p of [a, b]) {
    p.client.destroy();
    p.far.destroy();
    p.server.close();
  }
});
