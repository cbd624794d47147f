/**
 * `[egress] sni` on the real gateway (DESIGN §9c): the ClientHello's server_name against the
 * CONNECT host, before any client byte reaches the destination. Destinations are loopback
 * listeners named through [resolve]; clients are Node's TLS client over the tunnel.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { ClientHttp2Session, ClientHttp2Stream } from 'node:http2';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { connect as tlsConnect } from 'node:tls';
import { parseConfig } from '../../gateway/src/config.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { realClientHello } from '../helpers/client-hello.js';
import { captureLogger } from '../helpers/logs.js';
import { gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, TEST_OID, type ClientCredentials } from '../helpers/pki.js';
import { until } from '../helpers/wait.js';

let world: EchoRegistry;
let client: ClientCredentials;
/** A destination that records what it receives; `greeting` is sent first (server-speaks-first). */
let sink: { server: Server; port: number; received: Buffer[]; sockets: Set<Socket> };
const gateways: Gateway[] = [];
const sessions: ClientHttp2Session[] = [];
const lines: Record<string, unknown>[] = [];

async function startGateway(sni: 'match' | 'require' | 'off'): Promise<Gateway> {
  const gateway = createGateway(
    parseConfig({
      server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath, shutdown_grace_ms: 100 },
      policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl },
      observability: { log_level: 'info' },
      egress: { sni, sni_timeout_ms: 300 },
      resolve: { 'docs.test:443': `127.0.0.1:${sink.port}`, 'mail.test:25': `127.0.0.1:${sink.port}` },
    }),
    { logger: captureLogger(lines) },
  );
  gateways.push(gateway);
  await gateway.listen();
  return gateway;
}

async function tunnel(gateway: Gateway, authority: string): Promise<ClientHttp2Stream> {
  const session = await gatewaySession(gateway.address!.port, { caPem: world.tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  sessions.push(session);
  const { status, stream } = await request(session, authority);
  assert.equal(status, 200);
  stream.on('error', () => {});
  return stream;
}

/** A CONNECT whose first bytes are written before its answer (an optimistic client); `end` sends END_STREAM with them. */
async function optimisticTunnel(gateway: Gateway, authority: string, first: Buffer, end = false): Promise<{ status: number; stream: ClientHttp2Stream }> {
  const session = await gatewaySession(gateway.address!.port, { caPem: world.tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  sessions.push(session);
  const stream = session.request({ ':method': 'CONNECT', ':authority': authority });
  stream.on('error', () => {});
  if (end) stream.end(first);
  else stream.write(first);
  const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
  return { status: Number(headers[':status']), stream };
}

/** Starts a TLS handshake over the tunnel with `servername`; resolves when the tunnel ends. */
function helloOver(stream: ClientHttp2Stream, servername: string): Promise<void> {
  const tls = tlsConnect({ socket: stream as unknown as Socket, servername, rejectUnauthorized: false });
  tls.on('error', () => {});
  return new Promise((resolve) => stream.once('close', () => resolve()));
}

const receivedBytes = () => sink.received.reduce((n, b) => n + b.length, 0);

before(async () => {
  world = await startEchoRegistry();
  client = await clientCredentials({ identity: 'agent-sni' });
  for (const destination of ['docs.test:443', 'mail.test:25']) {
    await world.fixture.delegate(world.alice.keyId, destination);
    await world.fixture.permit(world.alice, { identity: 'agent-sni', spkiDer: client.spkiDer }, destination);
  }
  const received: Buffer[] = [];
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.once('close', () => sockets.delete(socket));
    socket.write('220 greeting\r\n');
    socket.on('data', (chunk: Buffer) => received.push(chunk));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  sink = { server, port: (server.address() as AddressInfo).port, received, sockets };
});

after(async () => {
  for (const session of sessions) session.destroy();
  for (const gateway of gateways) await gateway.close(100);
  for (const socket of sink?.sockets ?? []) socket.destroy();
  sink?.server.close();
  await world?.close();
});

test('match: a ClientHello for another name closes the tunnel before any byte reaches the destination', async () => {
  const gateway = await startGateway('match');
  sink.received.length = 0;
  const stream = await tunnel(gateway, 'docs.test:443');
  await helloOver(stream, 'other.test');
  assert.equal(receivedBytes(), 0, 'the destination received nothing');
  await until(() => lines.some((l) => l.event === 'tunnel_closed' && l.detail === 'sni_mismatch' && String(l.error).includes('server_name other.test is not docs.test')), 2000, 'tunnel_closed detail sni_mismatch');
});

test('match: the right name passes, the whole ClientHello reaches the destination, and the server may speak first', async () => {
  const gateway = await startGateway('match');
  sink.received.length = 0;
  const stream = await tunnel(gateway, 'docs.test:443');
  const [greeting] = (await once(stream, 'data')) as [Buffer];
  assert.equal(greeting.toString(), '220 greeting\r\n', 'bytes from the destination flow before the client sends any');
  const tls = tlsConnect({ socket: stream as unknown as Socket, servername: 'docs.test', rejectUnauthorized: false });
  tls.on('error', () => {});
  await until(() => receivedBytes() > 100, 2000, 'the ClientHello reached the destination');
  assert.equal(sink.received[0]![0], 0x16, 'it starts with the handshake record');
  tls.destroy();
});

test('match: no server_name for a hostname destination is refused', async () => {
  const gateway = await startGateway('match');
  sink.received.length = 0;
  const stream = await tunnel(gateway, 'docs.test:443');
  const tls = tlsConnect({ socket: stream as unknown as Socket, rejectUnauthorized: false }); // no servername (Node sends none for none)
  tls.on('error', () => {});
  await once(stream, 'close');
  assert.equal(receivedBytes(), 0);
});

test('match: a ClientHello split over segments is read whole', async () => {
  const gateway = await startGateway('match');
  sink.received.length = 0;
  // A real ClientHello, replayed through the tunnel in pieces.
  const hello = await realClientHello('docs.test');
  const stream = await tunnel(gateway, 'docs.test:443');
  // Node 24's ClientHello is ~1.6 KB (a post-quantum key share): eight pieces, well within sni_timeout_ms.
  for (let at = 0; at < hello.length; at += 200) {
    stream.write(hello.subarray(at, at + 200));
    await sleep(5);
  }
  await until(() => receivedBytes() === hello.length, 2000, 'the whole ClientHello, once');
  assert.deepEqual(Buffer.concat(sink.received), hello);
  stream.close();
});

// Regression: each of these reached the destination under `match` as "not TLS", and a real server
// (OpenSSL, Go) then read the ClientHello for other.test behind it.
test('match: a ClientHello for another name behind an odd first record or record version is still refused', async () => {
  const gateway = await startGateway('match');
  const mismatches = () => lines.filter((l) => l.event === 'tunnel_closed' && l.detail === 'sni_mismatch').length;
  const before = mismatches();
  const other = await realClientHello('other.test');
  const versioned = Buffer.from(other);
  versioned[2] = 0x05; // record version 3.5
  const smuggled: Record<string, Buffer> = {
    'record version 3.5': versioned,
    'an empty change_cipher_spec first': Buffer.concat([Buffer.from('1403030000', 'hex'), other]),
    'a warning alert first': Buffer.concat([Buffer.from('1503030002015a', 'hex'), other]),
  };
  for (const [what, bytes] of Object.entries(smuggled)) {
    sink.received.length = 0;
    const stream = await tunnel(gateway, 'docs.test:443');
    stream.resume();
    stream.write(bytes);
    const closed = once(stream, 'close').then(() => true);
    assert.equal(await Promise.race([closed, sleep(2000).then(() => false)]), true, `${what}: the tunnel was closed`);
    assert.equal(receivedBytes(), 0, `${what}: the destination received nothing`);
  }
  await until(() => mismatches() === before + 3, 2000, 'three more tunnel_closed sni_mismatch');
});

test('match passes a protocol that is not TLS; require refuses it', async () => {
  const matching = await startGateway('match');
  sink.received.length = 0;
  const plain = await tunnel(matching, 'mail.test:25');
  plain.write('EHLO agent\r\n');
  await until(() => Buffer.concat(sink.received).toString() === 'EHLO agent\r\n', 2000, 'plain bytes pass under match');
  plain.close();

  const requiring = await startGateway('require');
  sink.received.length = 0;
  const refused = await tunnel(requiring, 'mail.test:25');
  refused.resume(); // read the greeting, so the stream can close
  refused.write('EHLO agent\r\n');
  await once(refused, 'close');
  assert.equal(receivedBytes(), 0);
});

test('a ClientHello that never completes is refused at sni_timeout_ms', async () => {
  const gateway = await startGateway('match');
  sink.received.length = 0;
  const stream = await tunnel(gateway, 'docs.test:443');
  stream.resume();
  const started = performance.now();
  stream.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]));
  await once(stream, 'close');
  assert.ok(performance.now() - started >= 250, 'not before the timeout');
  assert.equal(receivedBytes(), 0);
});

test('match: a ClientHello sent before the answer is checked first; for another name, nothing reaches the destination', async () => {
  const gateway = await startGateway('match');
  sink.received.length = 0;
  const { status, stream } = await optimisticTunnel(gateway, 'docs.test:443', await realClientHello('other.test'));
  assert.equal(status, 200);
  stream.resume();
  await once(stream, 'close');
  assert.equal(receivedBytes(), 0, 'the destination received nothing');
  await until(() => lines.some((l) => l.event === 'tunnel_closed' && l.detail === 'sni_mismatch' && String(l.error).includes('server_name other.test is not docs.test')), 2000, 'tunnel_closed detail sni_mismatch');
});

for (const sni of ['match', 'off'] as const) {
  test(`${sni}: bytes sent before the answer reach the destination first, in order; sent with END_STREAM, they arrive with the FIN`, async () => {
    const gateway = await startGateway(sni);
    sink.received.length = 0;
    const hello = await realClientHello('docs.test');
    const { status, stream } = await optimisticTunnel(gateway, 'docs.test:443', hello);
    assert.equal(status, 200);
    stream.resume();
    stream.write('after the answer');
    await until(() => receivedBytes() === hello.length + 16, 2000, 'the early bytes, then the rest');
    assert.deepEqual(Buffer.concat(sink.received), Buffer.concat([hello, Buffer.from('after the answer')]));
    stream.close();

    sink.received.length = 0;
    const ended = await optimisticTunnel(gateway, 'mail.test:25', Buffer.from('QUIT\r\n'), true);
    assert.equal(ended.status, 200);
    ended.stream.resume();
    // The sink ends its side on our FIN; the tunnel then closes on its own, well before any timeout.
    await once(ended.stream, 'close');
    assert.equal(Buffer.concat(sink.received).toString(), 'QUIT\r\n');
    assert.equal(gateway.earlyDataBytes, 0);
  });
}
