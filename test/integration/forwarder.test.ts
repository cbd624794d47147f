/**
 * run's forwarder: a loopback port that leads to the sidecar's Unix socket byte for byte, half
 * closes included, and a readable 503 when the sidecar is gone. Real sockets, curl.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { startForwarder, type Forwarder } from '../../sidecar/src/forwarder.js';
import { runFile } from '../registry-cli/run-cli.js';

let dir: string;
let socketPath: string;
let upstream: Server;
let forwarder: Forwarder;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'agw-forwarder-'));
  socketPath = join(dir, 'proxy.sock');
  // Stands in for the sidecar: echoes what it gets, and ends its side when the client ends its own.
  upstream = createServer({ allowHalfOpen: true }, (socket) => {
    socket.on('data', (chunk: Buffer) => socket.write(chunk));
    socket.on('end', () => socket.end('<eof seen>'));
  });
  upstream.listen(socketPath);
  await once(upstream, 'listening');
  forwarder = await startForwarder(socketPath);
});

after(async () => {
  await forwarder?.close();
  upstream?.close();
  rmSync(dir, { recursive: true, force: true });
});

test('bytes pass both ways and a half-close reaches the other side', async () => {
  const client = connect({ port: forwarder.port, host: '127.0.0.1', allowHalfOpen: true });
  let received = '';
  client.setEncoding('utf8');
  client.on('data', (chunk: string) => (received += chunk));
  await once(client, 'connect');
  client.write('hello through the forwarder');
  client.end();
  await once(client, 'end');
  assert.equal(received, 'hello through the forwarder<eof seen>');
  client.destroy();
});

test('the sidecar gone: curl gets the sidecar\'s 503 with its proxy-status and a line, not a reset', async () => {
  upstream.close();
  await once(upstream, 'close');
  const curl = await runFile('curl', ['-sS', '-D', '-', '--max-time', '10', '-x', `http://127.0.0.1:${forwarder.port}`, 'http://docstore.test/doc'], { timeoutMs: 30_000 });
  assert.equal(curl.status, 0, curl.stderr);
  assert.match(curl.stdout, /^HTTP\/1\.1 503 Service Unavailable\r\n/);
  assert.match(curl.stdout, /\r\nproxy-status: agent-gateway-sidecar; error=proxy_internal_error; details="sidecar_unavailable"\r\n/);
  assert.ok(curl.stdout.endsWith('\r\n\r\nagent-gateway-sidecar: GET http://docstore.test/doc refused (sidecar_unavailable): the sidecar is not running; retry shortly, or ask an operator to restart it.\n'), curl.stdout);
  const tunnel = await runFile('curl', ['-sS', '-v', '--max-time', '10', '-x', `http://127.0.0.1:${forwarder.port}`, 'https://docstore.test/doc'], { timeoutMs: 30_000 });
  assert.equal(tunnel.status, 56, tunnel.stderr);
  assert.match(tunnel.stderr, /< proxy-status: agent-gateway-sidecar; error=proxy_internal_error; details="sidecar_unavailable"/);
});
