/**
 * The sidecar's proxy and session logic over a software client key, against the real gateway,
 * PostgreSQL, curl and HTTPS services. The TPM-held key is exercised in test/tpm/sidecar-tpm.test.ts.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { after, before, test } from 'node:test';
import { createSecureContext } from 'node:tls';
import { promisify } from 'node:util';
import { pino } from 'pino';
import type { Gateway } from '../../gateway/src/gateway.js';
import { startSidecar, type Sidecar } from '../../sidecar/src/sidecar.js';
import { connectViaProxy, getOver, httpsService } from '../helpers/chain.js';
import { startTestGateway } from '../helpers/gateway.js';
import { echoServer, exchange } from '../helpers/net.js';
import { clientCredentials, serverTls, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { createDatabase, freePort, testServer } from '../helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../helpers/registry-fixture.js';

const run = promisify(execFile);
let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;
let gatewayTls: ServerTls;
let serviceTls: ServerTls;
let docstore: Awaited<ReturnType<typeof httpsService>>;
let messaging: Awaited<ReturnType<typeof httpsService>>;
let echo: Awaited<ReturnType<typeof echoServer>>;
let gateway: Gateway;
let gatewayPort: number;
let sidecar: Sidecar;
let client: ClientCredentials;
let proxyUrl: string;
let handshakes = 0;

async function bootGateway() {
  gateway = await startTestGateway({
    databaseUrl,
    tls: gatewayTls,
    port: gatewayPort,
    resolve: { 'docstore.test': `127.0.0.1:${docstore.port}`, 'messaging.test': `127.0.0.1:${messaging.port}`, 'echo.test:7': `127.0.0.1:${echo.port}` },
  });
  gateway.server.on('secureConnection', () => handshakes++);
}

before(async () => {
  pgServer = await testServer();
  databaseUrl = await createDatabase(pgServer.url);
  gatewayTls = await serverTls();
  serviceTls = await serverTls(['docstore.test', 'messaging.test']);
  docstore = await httpsService(serviceTls, 'docstore');
  messaging = await httpsService(serviceTls, 'messaging');
  echo = await echoServer();
  const fixture = await RegistryFixture.connect(databaseUrl);
  const alice = await fixture.principal('org-alice', { notBefore: at(-DAY) });
  for (const destination of ['docstore.test', 'echo.test:7']) await fixture.delegate(alice.keyId, destination, { notBefore: at(-DAY) });
  client = await clientCredentials({ identity: 'agent-alpha' });
  for (const destination of ['docstore.test', 'echo.test:7']) await fixture.permit(alice, { identity: 'agent-alpha', spkiDer: client.spkiDer }, destination);
  await fixture.close();
  gatewayPort = await freePort();
  await bootGateway();
  sidecar = await startSidecar({
    gatewayUrl: `https://localhost:${gatewayPort}`,
    secureContext: createSecureContext({ cert: client.certPem, key: client.privateKeyPem, ca: gatewayTls.caPem }),
    logger: pino({ level: 'silent' }),
    backoffMaxMs: 500,
  });
  proxyUrl = `http://127.0.0.1:${sidecar.port}`;
});

after(async () => {
  await sidecar?.close();
  await gateway?.close(200);
  await docstore?.close();
  await messaging?.close();
  await echo?.close();
  pgServer?.close();
});

test('curl with HTTPS_PROXY reaches a granted HTTPS service, doing its own TLS end to end', async () => {
  const { stdout } = await run('curl', ['-sS', '--max-time', '10', '--cacert', serviceTls.caPath, 'https://docstore.test/health'], { env: { ...process.env, HTTPS_PROXY: proxyUrl } });
  assert.deepEqual(JSON.parse(stdout), { service: 'docstore', status: 'ok' });
});

test('curl to a destination without a grant gets 403 at CONNECT', async () => {
  const result = await run('curl', ['-sS', '--max-time', '10', '--cacert', serviceTls.caPath, 'https://messaging.test/messages'], { env: { ...process.env, HTTPS_PROXY: proxyUrl } }).catch((error: { code: number; stderr: string }) => error);
  assert.equal((result as { code: number }).code, 56);
  assert.match((result as { stderr: string }).stderr, /CONNECT tunnel failed, response 403/);
});

test('a Node HTTPS client through the proxy on 127.0.0.1 and on ::1', async () => {
  for (const url of [proxyUrl, `http://[::1]:${sidecar.port}`]) {
    const { status, socket } = await connectViaProxy(url, 'docstore.test:443', serviceTls.caPem);
    assert.equal(status, 200);
    const response = await getOver(socket!, 'docstore.test', '/documents');
    assert.equal(response.status, 200);
    assert.deepEqual(JSON.parse(response.body), { service: 'docstore', path: '/documents' });
  }
});

test("the gateway's 403 reaches the agent with its proxy-status reason", async () => {
  const { status, proxyStatus } = await connectViaProxy(proxyUrl, 'messaging.test:443', serviceTls.caPem);
  assert.equal(status, 403);
  assert.equal(proxyStatus, 'agent-gateway; error=http_request_denied; details="not_authorized"');
});

test('100 parallel CONNECTs share one TLS session to the gateway', async () => {
  const before = handshakes;
  const sessionsBefore = sidecar.gateway.handshakes;
  const results = await Promise.all(
    Array.from({ length: 100 }, async () => {
      const { status, socket } = await connectViaProxy(proxyUrl, 'docstore.test:443', serviceTls.caPem);
      const response = await getOver(socket!, 'docstore.test', '/health');
      return status === 200 && response.status === 200;
    }),
  );
  assert.equal(results.filter(Boolean).length, 100);
  assert.equal(handshakes - before, 0, 'no new handshake with the gateway');
  assert.equal(sidecar.gateway.handshakes, sessionsBefore);
});

test('64 MiB byte-exact through sidecar and gateway, full duplex, with half-close (regression: 16/32 MiB windows deadlocked both sessions)', async () => {
  const { connect } = await import('node:net');
  const socket = connect(sidecar.port, '127.0.0.1');
  socket.write('CONNECT echo.test:7 HTTP/1.1\r\nhost: echo.test:7\r\n\r\n');
  const head = await new Promise<string>((resolve) => socket.once('data', (chunk: Buffer) => resolve(chunk.toString())));
  assert.match(head, /^HTTP\/1\.1 200 /);
  const payload = randomBytes(64 * 1024 * 1024);
  const echoed = await exchange(socket, payload);
  assert.equal(echoed.length, payload.length);
  assert.ok(echoed.equals(payload));
});

test('the gateway restarted mid-run: the next request succeeds within 2 s', async () => {
  await gateway.close(100);
  await bootGateway();
  const started = Date.now();
  let ok = false;
  while (!ok && Date.now() - started < 2000) {
    const { status } = await connectViaProxy(proxyUrl, 'docstore.test:443', serviceTls.caPem).catch(() => ({ status: 0 }));
    ok = status === 200;
  }
  assert.ok(ok, `no successful CONNECT within 2 s (took ${Date.now() - started} ms)`);
});

test('gateway down longer than connect-wait: the agent gets 503', async () => {
  const short = await startSidecar({
    gatewayUrl: `https://localhost:${await freePort()}`,
    secureContext: createSecureContext({ cert: client.certPem, key: client.privateKeyPem, ca: gatewayTls.caPem }),
    logger: pino({ level: 'silent' }),
    connectWaitMs: 300,
  });
  try {
    const { status } = await connectViaProxy(`http://127.0.0.1:${short.port}`, 'docstore.test:443', serviceTls.caPem);
    assert.equal(status, 503);
  } finally {
    await short.close();
  }
});
