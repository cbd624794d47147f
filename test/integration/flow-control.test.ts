/**
 * DESIGN §9f: `[server] stream_window_bytes` / `session_window_bytes`. A 64 MiB full-duplex
 * transfer must never stall at any allowed setting: the smallest, the default, and the largest
 * this runtime allows (registry/flow-control.ts MAX_WINDOW_BYTES: Node 22's http2 stalls with
 * 16/32 MiB windows, Node 24's does not). AGW_WINDOWS="stream/session,..." measures others.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { connect as h2connect } from 'node:http2';
import { after, before, test } from 'node:test';
import { connect as netConnect } from 'node:net';
import { createSecureContext } from 'node:tls';
import { pino } from 'pino';
import { startSidecar } from '../../sidecar/src/sidecar.js';
import { parseConfig } from '../../gateway/src/config.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { MAX_WINDOW_BYTES } from '../../registry/flow-control.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { clientCredentials, TEST_OID, type ClientCredentials } from '../helpers/pki.js';

let world: EchoRegistry;
let client: ClientCredentials;
const gateways: Gateway[] = [];

before(async () => {
  world = await startEchoRegistry();
  client = await clientCredentials({ identity: 'agent-windows' });
  await world.fixture.permit(world.alice, { identity: 'agent-windows', spkiDer: client.spkiDer }, world.echoAuthority);
});

after(async () => {
  for (const gateway of gateways) await gateway.close(100);
  await world?.close();
});

const MIB = 1024 * 1024;
const SETTINGS = (process.env.AGW_WINDOWS ?? `65535/65535,${MIB}/${2 * MIB},${Math.floor(MAX_WINDOW_BYTES / 2)}/${MAX_WINDOW_BYTES}`).split(',').map((pair) => {
  const [stream, session] = pair.split('/').map(Number);
  return { stream: stream!, session: session! };
});

async function startGatewayWith(windows: { stream: number; session: number }): Promise<Gateway> {
  const gateway = createGateway(
    parseConfig({
      server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath, stream_window_bytes: windows.stream, session_window_bytes: windows.session },
      policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl },
      observability: { log_level: 'info' },
      // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
      egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
    }),
    { logger: pino({ level: 'silent' }) },
  );
  gateways.push(gateway);
  await gateway.listen();
  return gateway;
}

for (const windows of SETTINGS) {
  test(`64 MiB full duplex agent → sidecar → gateway → echo with windows ${windows.stream}/${windows.session} on both sessions`, { timeout: 60_000 }, async () => {
    const gateway = await startGatewayWith(windows);
    const sidecar = await startSidecar({
      gatewayUrl: `https://localhost:${gateway.address!.port}`,
      secureContext: createSecureContext({ cert: client.certPem, key: client.privateKeyPem, ca: world.tls.caPem }),
      logger: pino({ level: 'silent' }),
      streamWindowBytes: windows.stream,
      sessionWindowBytes: windows.session,
    });
    try {
      const socket = netConnect(sidecar.port, '127.0.0.1');
      socket.write(`CONNECT ${world.echoAuthority} HTTP/1.1\r\nhost: ${world.echoAuthority}\r\n\r\n`);
      const [head] = (await once(socket, 'data')) as [Buffer];
      assert.match(head.toString(), /^HTTP\/1\.1 200 /);
      const payload = randomBytes(64 * MIB);
      const { createHash } = await import('node:crypto');
      const hash = createHash('sha256');
      let received = 0;
      socket.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        received += chunk.length;
      });
      const ended = once(socket, 'end');
      socket.end(payload);
      await ended;
      assert.equal(received, payload.length);
      assert.equal(hash.digest('hex'), createHash('sha256').update(payload).digest('hex'));
    } finally {
      await sidecar.close();
    }
  });
}

for (const windows of SETTINGS) {
  test(`64 MiB full duplex through a tunnel with windows ${windows.stream}/${windows.session} on both ends`, { timeout: 60_000 }, async () => {
    const gateway = await startGatewayWith(windows);
    const session = h2connect(`https://localhost:${gateway.address!.port}`, {
      ca: world.tls.caPem,
      cert: client.certPem,
      key: client.privateKeyPem,
      settings: { initialWindowSize: windows.stream },
      maxSessionMemory: 64,
    });
    session.on('error', () => {});
    await once(session, 'connect');
    session.setLocalWindowSize(windows.session);
    try {
      const stream = session.request({ ':method': 'CONNECT', ':authority': world.echoAuthority });
      const [headers] = (await once(stream, 'response')) as [Record<string, unknown>];
      assert.equal(headers[':status'], 200);
      const payload = randomBytes(64 * MIB);
      const hash = (await import('node:crypto')).createHash('sha256');
      let received = 0;
      stream.on('data', (chunk: Buffer) => {
        hash.update(chunk);
        received += chunk.length;
      });
      const ended = once(stream, 'end');
      stream.end(payload);
      await ended;
      assert.equal(received, payload.length);
      assert.equal(hash.digest('hex'), (await import('node:crypto')).createHash('sha256').update(payload).digest('hex'));
    } finally {
      session.destroy();
    }
  });
}
