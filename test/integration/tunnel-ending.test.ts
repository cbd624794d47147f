/**
 * How tunnels end when one side is done and the other is slow (review regressions). The gateway
 * runs as its own process here: the first case once made it spin in nghttp2 until it ran out of
 * memory, which in-process would take the test runner with it.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js';
import { connectHeaders, connectRaw, dataFrame, ErrorCode, FrameType, windowUpdateFrame, type RawH2 } from '../helpers/h2-raw.js';
import { clientCredentials, TEST_OID, type ClientCredentials } from '../helpers/pki.js';

let world: EchoRegistry;
let client: ClientCredentials;
let gateway: GatewayProcess;

before(async () => {
  world = await startEchoRegistry();
  client = await clientCredentials({ identity: 'agent-slow' });
  await world.fixture.permit(world.alice, { identity: 'agent-slow', spkiDer: client.spkiDer }, world.echoAuthority);
  gateway = await startGatewayProcess({
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath },
    policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl },
    observability: { log_level: 'info' },
    // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
    egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
    admin: { listen_addr: '127.0.0.1:0', process_metrics: false },
    limits: { idle_timeout_ms: 1000 },
  });
});

after(async () => {
  await gateway?.stop();
  await world?.close();
});

async function healthy(): Promise<void> {
  const response = await fetch(`http://127.0.0.1:${gateway.adminPort}/healthz`, { signal: AbortSignal.timeout(2000) });
  assert.equal(response.status, 200);
}

/** A CONNECT to the echo server that fills the client's own 65,535-byte window with echoed bytes, then half-closes. */
async function fullWindowTunnel(): Promise<RawH2> {
  const conn = await connectRaw({ port: gateway.port, servername: 'localhost', cert: client.certPem, key: client.privateKeyPem });
  await conn.send(connectHeaders(1, world.echoAuthority));
  assert.equal((await conn.waitForResponse(1, 3000)).status, 200);
  await conn.send(dataFrame(1, Buffer.alloc(16_384)), dataFrame(1, Buffer.alloc(16_384)), dataFrame(1, Buffer.alloc(16_384)), dataFrame(1, Buffer.alloc(16_383)));
  await conn.send(dataFrame(1, Buffer.alloc(2000), { endStream: true }));
  return conn;
}

test('END_STREAM stuck behind a full client window, then the client opens its window: no spin, the stream is reset (regression: the process looped in nghttp2)', async () => {
  const conn = await fullWindowTunnel();
  // Past the stall limit (idle_timeout_ms = 1000): the gateway gives up on the stalled client.
  const rst = await conn.nextFrame({ type: FrameType.RST_STREAM, streamId: 1 }, 4000);
  assert.equal(rst.payload.readUInt32BE(0), ErrorCode.CANCEL, 'CANCEL: bytes were dropped, so not a clean end');
  await conn.send(windowUpdateFrame(0, 1 << 20), windowUpdateFrame(1, 1 << 20));
  await sleep(500);
  await healthy();
  assert.ok(gateway.alive());
  conn.destroy();
});

test('a slow reader after the destination closed gets every byte, then END_STREAM (regression: healthy tunnels were cut after 500 ms)', async () => {
  const conn = await fullWindowTunnel();
  // Read slowly: the last 2,000 bytes 250 at a time over 2 s, well past TUNNEL_LINGER_MS.
  for (let i = 0; i < 8; i++) {
    await sleep(250);
    assert.ok(!conn.frames.some((f) => f.streamId === 1 && (f.type === FrameType.RST_STREAM || (f.type === FrameType.DATA && f.flags & 0x1))), `not ended while bytes are still moving: ${conn.describeFrames()}`);
    // The last update leaves room: a zero window would hold back even an empty END_STREAM frame.
    const increment = i === 7 ? 1250 : 250;
    await conn.send(windowUpdateFrame(0, increment), windowUpdateFrame(1, increment));
  }
  assert.ok(await conn.waitForEndStream(1, 3000), `END_STREAM after all bytes: ${conn.describeFrames().slice(-600)}`);
  const received = conn.streamData(1).length;
  assert.equal(received, 67_535, 'every echoed byte arrived');
  assert.ok(!conn.frames.some((f) => f.type === FrameType.RST_STREAM && f.streamId === 1 && f.payload.readUInt32BE(0) !== ErrorCode.NO_ERROR), 'no error reset');
  await healthy();
  conn.destroy();
});
