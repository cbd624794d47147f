/**
 * gateway/src/tunnel.ts over a real HTTP/2 stream and a real loopback TCP socket: a settled tunnel
 * leaves no link from its stream or socket back to itself.
 *
 * Why it matters: Node keeps a closed socket's and stream's native handle objects until the next
 * full GC, and a scavenge treats them as roots. Linked to the tunnel, they kept every CONNECT
 * (tunnel, handler, facts, everything those reach) alive across scavenges and promoted it to the
 * old generation: about half of what each CONNECT promoted (bench/README.md, "Garbage collection").
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect as h2connect, createServer as createH2Server, type ServerHttp2Stream } from 'node:http2';
import { connect, createServer, type Socket } from 'node:net';
import { test } from 'node:test';
import { Tunnel, tunnelOf, type TunnelStats } from '../../gateway/src/tunnel.js';

test('tunnel: once settled, neither its stream nor its socket links back to it (regression: every CONNECT was promoted)', async (t) => {
  const destination = createServer((far: Socket) => far.pipe(far)); // echo, ends when the client ends
  destination.listen(0, '127.0.0.1');
  await once(destination, 'listening');
  const server = createH2Server();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.after(() => {
    destination.close();
    server.close();
  });

  const opened = new Promise<{ tunnel: Tunnel; stream: ServerHttp2Stream; socket: Socket; ended: Promise<TunnelStats> }>((resolve) => {
    server.once('stream', async (stream: ServerHttp2Stream) => {
      const socket = connect((destination.address() as { port: number }).port, '127.0.0.1');
      await once(socket, 'connect');
      stream.respond({ ':status': 200 });
      let ended!: (stats: TunnelStats) => void;
      const done = new Promise<TunnelStats>((r) => (ended = r));
      const tunnel = new Tunnel(stream, socket, 0, { tunnelEnded: ended });
      resolve({ tunnel, stream, socket, ended: done });
    });
  });
  const session = h2connect(`http://127.0.0.1:${(server.address() as { port: number }).port}`);
  t.after(() => session.destroy());
  const client = session.request({ ':method': 'CONNECT', ':authority': 'echo:443' });
  await once(client, 'response');
  const { tunnel, stream, socket, ended } = await opened;
  assert.equal(tunnelOf(stream), tunnel, 'an open tunnel is found from its stream');
  assert.equal(tunnelOf(socket), tunnel, 'and from its socket');

  const echoed = once(client, 'data');
  client.write('ping');
  assert.equal(String((await echoed)[0]), 'ping');
  client.end();
  client.resume();
  const stats = await ended;
  assert.equal(stats.bytesUp, 4);
  assert.equal(tunnelOf(stream), undefined, 'the settled tunnel is not reachable from its stream');
  assert.equal(tunnelOf(socket), undefined, 'nor from its socket');
});
