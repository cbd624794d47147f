// REVIEW SCRATCH — delete when done.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { parseConfig } from '../gateway/src/config.js';
import { createGateway, type Gateway } from '../gateway/src/gateway.js';
import { startEchoRegistry, type EchoRegistry } from './helpers/echo-registry.js';
import { connectHeaders, connectRaw, dataFrame, ErrorCode, FrameType, Flag, rstStreamFrame, windowUpdateFrame, type RawH2 } from './helpers/h2-raw.js';
import { captureLogger } from './helpers/logs.js';
import { exchange, gatewaySession, request } from './helpers/net.js';
import { clientCredentials, TEST_OID, type ClientCredentials } from './helpers/pki.js';

let world: EchoRegistry;
let legit: ClientCredentials;
let stranger: ClientCredentials;
const servers: Server[] = [];
const lines: Record<string, unknown>[] = [];
const gateways: Gateway[] = [];
let firehose: string; // writes 4 MiB, never ends
let finite: string; // writes 128 KiB then FIN, keeps reading

async function dest(onConn: (s: Socket) => void): Promise<string> {
  const server = createServer({ allowHalfOpen: true }, (s) => {
    s.on('error', () => {});
    onConn(s);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  servers.push(server);
  const authority = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  await world.fixture.delegate(world.alice.keyId, authority);
  await world.fixture.permit(world.alice, { identity: 'agent-legit', spkiDer: legit.spkiDer }, authority);
  return authority;
}

async function startGateway(o: { limits?: Record<string, unknown>; policy?: Record<string, unknown> } = {}): Promise<Gateway> {
  const config = parseConfig({
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath, shutdown_grace_ms: 500 },
    policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl, connect_timeout_ms: 2000, ...o.policy },
    observability: { log_level: 'debug' },
    admin: { listen_addr: '127.0.0.1:0', process_metrics: false },
    audit: { enabled: false },
    limits: { handshake_timeout_ms: 1000, max_streams_per_session: 100, idle_timeout_ms: 0, ...o.limits },
  });
  const g = createGateway(config, { logger: captureLogger(lines) });
  gateways.push(g);
  await g.listen();
  return g;
}

async function raw(g: Gateway, who: ClientCredentials | undefined): Promise<RawH2> {
  const conn = await connectRaw({ port: g.address!.port, servername: 'localhost', ...(who ? { cert: who.certPem, key: who.privateKeyPem } : {}) });
  await conn.nextFrame(FrameType.SETTINGS, 2000);
  return conn;
}

function endOrRst(conn: RawH2, id: number): string {
  const fs = conn.frames.filter((f) => f.streamId === id);
  const rst = fs.find((f) => f.type === FrameType.RST_STREAM);
  const end = fs.find((f) => (f.type === FrameType.DATA || f.type === FrameType.HEADERS) && f.flags & Flag.END_STREAM && !(f.type === FrameType.HEADERS && fs.indexOf(f) === 0 && false));
  return `rst=${rst ? rst.payload.readUInt32BE(0) : 'none'} endStream=${end ? 'yes' : 'no'} dataBytes=${conn.streamData(id).length}`;
}

before(async () => {
  world = await startEchoRegistry();
  legit = await clientCredentials({ identity: 'agent-legit' });
  stranger = await clientCredentials({ identity: 'agent-stranger' });
  firehose = await dest((s) => {
    s.write(Buffer.alloc(4 * 1024 * 1024, 0x61));
    s.resume();
  });
  finite = await dest((s) => {
    s.end(Buffer.alloc(128 * 1024, 0x62));
    s.resume();
  });
});

after(async () => {
  for (const g of gateways) await g.close(100);
  for (const s of servers) s.close();
  await world?.close();
});

test('A: gateway-closed tunnel (idle_timeout) while the client window is full: client never told, nghttp2 stream leaks', async () => {
  const g = await startGateway({ limits: { idle_timeout_ms: 300, max_streams_per_session: 2 } });
  const conn = await raw(g, legit);
  for (const id of [1, 3]) {
    await conn.send(connectHeaders(id, firehose));
    assert.equal((await conn.waitForResponse(id, 2000)).status, 200);
  }
  await sleep(2500);
  console.log(`# A: JS view: openTunnels=${g.openTunnels}; tunnel_closed lines=${lines.filter((l) => l.event === 'tunnel_closed').length}`);
  console.log(`# A: stream 1: ${endOrRst(conn, 1)}; stream 3: ${endOrRst(conn, 3)}`);
  await conn.send(connectHeaders(5, world.echoAuthority));
  const third = await conn.waitForResponse(5, 2000).catch((e: Error) => ({ error: e.message.slice(0, 200) }));
  console.log(`# A: third CONNECT on the session (max_streams 2): ${JSON.stringify(third)}`);
  // now open the window on stream 1 and see what the gateway does
  await conn.send(windowUpdateFrame(0, 1 << 20), windowUpdateFrame(1, 1 << 20));
  await sleep(500);
  console.log(`# A: after WINDOW_UPDATE on 1: ${endOrRst(conn, 1)}; conn closed=${conn.isClosed}; goaways=${JSON.stringify(conn.goaways)}`);
  conn.destroy();
});

test('F: legit half-closed client reading slowly: destination FIN, download tail cut?', async () => {
  const g = await startGateway();
  const conn = await raw(g, legit);
  await conn.send(connectHeaders(1, finite));
  assert.equal((await conn.waitForResponse(1, 2000)).status, 200);
  await conn.send(dataFrame(1, '', { endStream: true })); // half-close, like `shutdown(SHUT_WR)`
  const started = performance.now();
  // read at ~16 KiB/s
  for (let i = 0; i < 40 && !(await conn.waitForEndStream(1, 1)); i++) {
    await sleep(250);
    await conn.send(windowUpdateFrame(0, 4096), windowUpdateFrame(1, 4096));
  }
  const ended = await conn.waitForEndStream(1, 1);
  console.log(`# F: after ${(performance.now() - started).toFixed(0)} ms: ${endOrRst(conn, 1)} (expected 131072 bytes + END_STREAM); gateway openTunnels=${g.openTunnels}`);
  console.log(`# F: tunnel_closed: ${JSON.stringify(lines.filter((l) => l.event === 'tunnel_closed').at(-1))}`);
  assert.ok(ended, 'the client got its whole download');
  conn.destroy();
});

test('B: cancelled-but-queued lookups fill the queue: a live CONNECT gets 503', async () => {
  const g = await startGateway({ policy: { lookup_queue_size: 2, max_connections: 1, query_timeout_ms: 3000, pool_acquire_timeout_ms: 3000 } });
  const client = new pg.Client({ connectionString: world.databaseUrl });
  await client.connect();
  await client.query('BEGIN');
  await client.query('LOCK TABLE permission_registry IN ACCESS EXCLUSIVE MODE');
  const session = await gatewaySession(g.address!.port, { caPem: world.tls.caPem, certPem: legit.certPem, privateKeyPem: legit.privateKeyPem });
  try {
    const first = request(session, 'a.test:1').catch(() => undefined);
    while (g.lookups.running !== 1) await sleep(10);
    const conn = await raw(g, stranger);
    await conn.send(connectHeaders(1, 'b.test:1'), connectHeaders(3, 'c.test:1'));
    await sleep(50);
    await conn.send(rstStreamFrame(1, ErrorCode.CANCEL), rstStreamFrame(3, ErrorCode.CANCEL));
    await sleep(100);
    console.log(`# B: queued=${g.lookups.queued} (both cancelled) running=${g.lookups.running}`);
    const r = await request(session, 'd.test:1');
    console.log(`# B: a live CONNECT with nobody else waiting: ${r.status} ${r.headers['proxy-status']}`);
    await client.query('ROLLBACK');
    await first;
    conn.destroy();
    assert.notEqual(r.status, 503);
  } finally {
    await client.end().catch(() => {});
    session.destroy();
  }
});

test('C: strangers (self-made cert with an identity) hold max_connections past handshake_timeout', async () => {
  const g = await startGateway({ limits: { max_connections: 3 } });
  const conns = await Promise.all([0, 1, 2].map(() => raw(g, stranger)));
  await sleep(2500);
  console.log(`# C: after 2.5 s (handshake_timeout 1 s): open sessions=${g.openSessions}, closed=${conns.map((c) => c.isClosed)}`);
  const served = await gatewaySession(g.address!.port, { caPem: world.tls.caPem, certPem: legit.certPem, privateKeyPem: legit.privateKeyPem })
    .then(async (s) => {
      const { status, stream } = await request(s, world.echoAuthority);
      await exchange(stream, Buffer.from('x'));
      s.destroy();
      return status;
    })
    .catch((e: Error) => `refused: ${e.message}`);
  console.log(`# C: legit client: ${served}`);
  for (const c of conns) c.destroy();
});

test('D: HEADERS+RST in one write leaves no decision record', async () => {
  const g = await startGateway();
  const before = lines.filter((l) => l.event === 'connect_decision').length;
  const conn = await raw(g, stranger);
  await conn.send(connectHeaders(1, world.echoAuthority), rstStreamFrame(1, ErrorCode.CANCEL));
  await conn.send(connectHeaders(3, world.echoAuthority));
  await conn.waitForResponse(3, 2000);
  await sleep(300);
  const n = lines.filter((l) => l.event === 'connect_decision').length - before;
  console.log(`# D: 2 CONNECTs, ${n} decision records`);
  conn.destroy();
});

test('E: RST_STREAM(NO_ERROR) during the lookup: one client_cancelled, nothing held', async () => {
  const g = await startGateway({ policy: { query_timeout_ms: 3000, pool_acquire_timeout_ms: 3000 } });
  const client = new pg.Client({ connectionString: world.databaseUrl });
  await client.connect();
  await client.query('BEGIN');
  await client.query('LOCK TABLE permission_registry IN ACCESS EXCLUSIVE MODE');
  const before = lines.filter((l) => l.event === 'connect_decision').length;
  const conn = await raw(g, legit);
  await conn.send(connectHeaders(1, world.echoAuthority));
  await sleep(100);
  await conn.send(rstStreamFrame(1, ErrorCode.NO_ERROR));
  await sleep(200);
  const mine = lines.filter((l) => l.event === 'connect_decision').slice(before);
  console.log(`# E: decisions while lookup still held: ${JSON.stringify(mine.map((l) => l.reason))}`);
  await client.query('ROLLBACK');
  await client.end();
  await sleep(500);
  console.log(`# E: after release: ${JSON.stringify(lines.filter((l) => l.event === 'connect_decision').slice(before).map((l) => l.reason))}, running=${g.lookups.running}, queued=${g.lookups.queued}`);
  conn.destroy();
});
