/**
 * One trace across agent, sidecar and gateway over a real call: the sidecar's span continues the
 * agent's traceparent and is the parent of the gateway's CONNECT span. Both sides export to
 * in-memory exporters; the sidecar runs with a software key (its TPM path is covered in test/tpm).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { once } from 'node:events';
import { after, before, test } from 'node:test';
import { createSecureContext } from 'node:tls';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { pino } from 'pino';
import { parseConfig } from '../../gateway/src/config.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { startSidecar, type Sidecar } from '../../sidecar/src/sidecar.js';
import { startSidecarTracing } from '../../sidecar/src/tracing.js';
import { testGatewayConfig } from '../helpers/gateway.js';
import { until } from '../helpers/wait.js';
import { echoServer } from '../helpers/net.js';
import { clientCredentials, serverTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../helpers/registry-fixture.js';

const gatewaySpans = new InMemorySpanExporter();
const sidecarSpans = new InMemorySpanExporter();
let pgServer: Awaited<ReturnType<typeof testServer>>;
let echo: Awaited<ReturnType<typeof echoServer>>;
let gateway: Gateway;
let sidecar: Sidecar;

before(async () => {
  pgServer = await testServer();
  const databaseUrl = await createDatabase(pgServer.url);
  const tls = await serverTls();
  echo = await echoServer();
  const fixture = await RegistryFixture.connect(databaseUrl);
  const alice = await fixture.principal('org-alice', { notBefore: at(-DAY) });
  await fixture.delegate(alice.keyId, 'echo.test:7', { notBefore: at(-DAY) });
  const client = await clientCredentials({ identity: 'agent-traced' });
  await fixture.permit(alice, { identity: 'agent-traced', spkiDer: client.spkiDer }, 'echo.test:7');
  await fixture.close();
  gateway = createGateway(parseConfig(testGatewayConfig({ databaseUrl, tls, resolve: { 'echo.test:7': `127.0.0.1:${echo.port}` } })), {
    logger: pino({ level: 'silent' }),
    tracerProvider: new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(gatewaySpans)] }),
  });
  await gateway.listen();
  const log = pino({ level: 'silent' });
  sidecar = await startSidecar({
    gatewayUrl: `https://localhost:${gateway.address!.port}`,
    secureContext: createSecureContext({ cert: client.certPem, key: client.privateKeyPem, ca: tls.caPem }),
    logger: log,
    tracing: await startSidecarTracing({ log, tracerProvider: new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(sidecarSpans)] }) }),
  });
});

after(async () => {
  await sidecar?.close();
  await gateway?.close(100);
  await echo?.close();
  pgServer?.close();
});

test("one trace id spans the agent's traceparent, the sidecar span and the gateway spans", async () => {
  const traceId = randomBytes(16).toString('hex');
  const agentSpanId = randomBytes(8).toString('hex');
  const req = httpRequest({ host: '127.0.0.1', port: sidecar.port, method: 'CONNECT', path: 'echo.test:7', headers: { traceparent: `00-${traceId}-${agentSpanId}-01` } });
  req.end();
  const [res, socket] = (await once(req, 'connect')) as [import('node:http').IncomingMessage, import('node:net').Socket];
  assert.equal(res.statusCode, 200);
  socket.end('ping');
  socket.resume();
  await once(socket, 'close');

  await until(() => sidecarSpans.getFinishedSpans().length > 0, 5000, 'the sidecar span ended');
  await until(() => gatewaySpans.getFinishedSpans().some((s) => s.name === 'agent_gateway.tunnel'), 5000, 'the gateway tunnel span ended');
  const sidecarSpan = sidecarSpans.getFinishedSpans().find((s) => s.name === 'sidecar.connect')!;
  assert.equal(sidecarSpan.spanContext().traceId, traceId);
  assert.equal(sidecarSpan.parentSpanContext?.spanId, agentSpanId, "the sidecar continues the agent's trace");
  assert.equal(sidecarSpan.attributes['agent_gateway.destination'], 'echo.test:7');
  assert.equal(sidecarSpan.attributes['http.response.status_code'], 200);
  const connect = gatewaySpans.getFinishedSpans().find((s) => s.name === 'CONNECT')!;
  assert.equal(connect.spanContext().traceId, traceId, 'the gateway continues the same trace');
  assert.equal(connect.parentSpanContext?.spanId, sidecarSpan.spanContext().spanId, 'the sidecar span is the parent of the gateway CONNECT span');
});

test('a denied CONNECT ends the sidecar span with the status, still in one trace', async () => {
  sidecarSpans.reset();
  gatewaySpans.reset();
  const req = httpRequest({ host: '127.0.0.1', port: sidecar.port, method: 'CONNECT', path: 'elsewhere.test:443' });
  req.end();
  const [res, socket] = (await once(req, 'connect')) as [import('node:http').IncomingMessage, import('node:net').Socket];
  assert.equal(res.statusCode, 403);
  socket.destroy();
  await until(() => sidecarSpans.getFinishedSpans().length > 0 && gatewaySpans.getFinishedSpans().some((s) => s.name === 'CONNECT'), 5000, 'both spans ended');
  const sidecarSpan = sidecarSpans.getFinishedSpans()[0]!;
  assert.equal(sidecarSpan.attributes['http.response.status_code'], 403);
  const connect = gatewaySpans.getFinishedSpans().find((s) => s.name === 'CONNECT')!;
  assert.equal(connect.spanContext().traceId, sidecarSpan.spanContext().traceId);
});
