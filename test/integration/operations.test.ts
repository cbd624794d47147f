/**
 * Issue 6 "Operations", gateway side: the admin listener (/healthz, /readyz, /metrics), limits
 * (rate, concurrency, idle timeout), OpenTelemetry spans continuing the CONNECT's traceparent,
 * and certificate/limits reload (API and SIGHUP). Real PostgreSQL, real TLS, real gateways.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { copyFileSync, existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { ClientHttp2Session, ClientHttp2Stream } from 'node:http2';
import { connect as netConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { connect as tlsConnect, type ConnectionOptions, type TLSSocket } from 'node:tls';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { pino } from 'pino';
import { parseConfig } from '../../gateway/src/config.js';
import { SCHEMA_VERSION } from '../../registry/queries.js';
import { createGateway, type Gateway, type GatewayOptions } from '../../gateway/src/gateway.js';
import { closedPort, exchange, gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, serverTls, TEST_OID, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { captureLogger } from '../helpers/logs.js';
import { until } from '../helpers/wait.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { testServer } from '../helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../helpers/registry-fixture.js';

let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;
let tls: ServerTls;
let echoAuthority: string;
let fixture: RegistryFixture;
let alice: Awaited<ReturnType<RegistryFixture['principal']>>;
let world: EchoRegistry;
const gateways: Gateway[] = [];
const sessions: ClientHttp2Session[] = [];

function rawConfig(overrides: { limits?: Record<string, unknown>; admin?: Record<string, unknown>; audit?: Record<string, unknown>; server?: Record<string, unknown> } = {}) {
  return {
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: tls.certPath, tls_key_path: tls.keyPath, shutdown_grace_ms: 500, ...overrides.server },
    policy: { client_ext_oid: TEST_OID, database_url: databaseUrl, connect_timeout_ms: 2000, pool_acquire_timeout_ms: 1000, query_timeout_ms: 1000 },
    observability: { log_level: 'info' },
    // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
    egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
    admin: { listen_addr: '127.0.0.1:0', ...overrides.admin },
    audit: { enabled: false, ...overrides.audit },
    ...(overrides.limits ? { limits: overrides.limits } : {}),
  };
}

async function startGateway(overrides: Parameters<typeof rawConfig>[0] = {}, options: GatewayOptions = {}): Promise<Gateway> {
  const gateway = createGateway(parseConfig(rawConfig(overrides)), { logger: pino({ level: 'silent' }), ...options });
  gateways.push(gateway);
  await gateway.listen();
  return gateway;
}

async function sessionTo(gateway: Gateway, client: Partial<ClientCredentials>, caPem = tls.caPem): Promise<ClientHttp2Session> {
  const session = await gatewaySession(gateway.address!.port, { caPem, ...(client.certPem ? { certPem: client.certPem, privateKeyPem: client.privateKeyPem! } : {}) });
  sessions.push(session);
  return session;
}

async function grantedClient(identity: string, destination = echoAuthority) {
  const client = await clientCredentials({ identity });
  const permissionId = await fixture.permit(alice, { identity, spkiDer: client.spkiDer }, destination);
  return { client, permissionId };
}

/** CONNECT, and on 200 one echo round trip, then a clean close; resolves with the status. */
async function tunnelOnce(session: ClientHttp2Session, payload = Buffer.from('ping'), authority = echoAuthority, headers: Record<string, string> = {}) {
  const response = await request(session, authority, 'CONNECT', headers);
  if (response.status === 200) assert.ok((await exchange(response.stream, payload)).equals(payload));
  else response.stream.close();
  return response;
}

/** Sends `payload` on an open tunnel and waits for the echo, leaving the tunnel open. */
async function echoOn(stream: ClientHttp2Stream, payload: Buffer): Promise<void> {
  const chunks: Buffer[] = [];
  let received = 0;
  const done = new Promise<void>((resolveDone, reject) => {
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      received += chunk.length;
      if (received >= payload.length) {
        stream.removeListener('data', onData);
        resolveDone();
      }
    };
    stream.on('data', onData);
    stream.once('close', () => reject(new Error('tunnel closed before the echo')));
  });
  stream.write(payload);
  await done;
  assert.ok(Buffer.concat(chunks).equals(payload));
}

async function admin(gateway: Gateway, path: string) {
  const response = await fetch(`http://127.0.0.1:${gateway.adminAddress!.port}${path}`);
  return { status: response.status, contentType: response.headers.get('content-type'), text: await response.text() };
}

/** The value of one sample line, e.g. metric('x_total{a="b"}'); undefined when absent. */
function sample(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith(`${series} `)) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

function peerFingerprint(session: ClientHttp2Session): string {
  return (session.socket as TLSSocket).getPeerCertificate().fingerprint256;
}

before(async () => {
  world = await startEchoRegistry();
  ({ pgServer, databaseUrl, tls, echoAuthority, fixture, alice } = world);
});

after(async () => {
  for (const session of sessions) session.destroy();
  for (const gateway of gateways) await gateway.close(200);
  await world?.close();
});

describe('admin endpoints', () => {
  test('/metrics after scripted traffic: 2 allowed, 1 not_authorized, 1 authority_invalid, bytes, handshake failure', async () => {
    const lines: Record<string, unknown>[] = [];
    // Granted before the gateway starts: a grant's NOTIFY arriving after the first CONNECT would
    // (rightly) drop the cached decision, and the second CONNECT would look the row up again.
    const { client } = await grantedClient('agent-metrics');
    const gateway = await startGateway({}, { logger: captureLogger(lines) });
    const session = await sessionTo(gateway, client);
    const traceId = randomBytes(16).toString('hex');
    assert.equal((await tunnelOnce(session, Buffer.alloc(1000, 1), echoAuthority, { traceparent: `00-${traceId}-${randomBytes(8).toString('hex')}-01` })).status, 200);
    assert.equal((await tunnelOnce(session, Buffer.alloc(500, 2))).status, 200);
    const stranger = await sessionTo(gateway, await clientCredentials({ identity: 'agent-stranger' }));
    assert.equal((await tunnelOnce(stranger)).status, 403);
    assert.equal((await tunnelOnce(session, Buffer.from('x'), 'bad_host:443')).status, 400);
    // Not TLS at all: the handshake fails.
    const raw = netConnect(gateway.address!.port, '127.0.0.1');
    raw.on('error', () => {});
    raw.end('GET / HTTP/1.1\r\nhost: x\r\n\r\n');
    await once(raw, 'close');
    await until(() => gateway.openTunnels === 0, 5000, 'tunnels to close');

    const scraped = await admin(gateway, '/metrics');
    assert.equal(scraped.status, 200);
    assert.match(scraped.contentType ?? '', /^text\/plain; version=0\.0\.4/);
    const text = scraped.text;
    assert.equal(sample(text, 'agent_gateway_connect_decisions_total{status="200",reason="allowed"}'), 2);
    assert.equal(sample(text, 'agent_gateway_connect_decisions_total{status="403",reason="not_authorized"}'), 1);
    assert.equal(sample(text, 'agent_gateway_connect_decisions_total{status="400",reason="authority_invalid"}'), 1);
    assert.equal(sample(text, 'agent_gateway_tunnel_bytes_total{direction="up"}'), 1500);
    assert.equal(sample(text, 'agent_gateway_tunnel_bytes_total{direction="down"}'), 1500);
    assert.equal(sample(text, 'agent_gateway_open_tunnels'), 0);
    assert.equal(sample(text, 'agent_gateway_open_sessions'), 2);
    // The second allowed CONNECT was served from the cache: one registry lookup, one hit.
    assert.equal(sample(text, 'agent_gateway_authorization_duration_seconds_count{outcome="allowed"}'), 1);
    assert.equal(sample(text, 'agent_gateway_authorization_cache_total{result="hit"}'), 1);
    assert.equal(sample(text, 'agent_gateway_authorization_cache_total{result="miss"}'), 2);
    assert.equal(sample(text, 'agent_gateway_authorization_duration_seconds_count{outcome="denied"}'), 1);
    assert.equal(sample(text, 'agent_gateway_tls_handshake_failures_total{reason="error"}'), 1);
    assert.ok((sample(text, 'agent_gateway_db_pool_connections{pool="registry"}') ?? 0) >= 1);
    assert.equal(sample(text, 'agent_gateway_db_pool_waiting_requests{pool="registry"}'), 0);
    assert.equal(sample(text, 'agent_gateway_reloads_total{result="success"}'), 0);
    assert.equal(sample(text, 'agent_gateway_log_lines_dropped_total'), 0, 'exists at 0 from the start');
    assert.ok(sample(text, 'process_cpu_user_seconds_total') !== undefined, 'default process metrics are on');
    assert.doesNotMatch(text, /identity="|destination="/, 'no identity or destination labels unless configured');
    // Every metric of ours is named agent_gateway_*.
    for (const line of text.split('\n').filter((l) => l.startsWith('# TYPE '))) {
      const name = line.split(' ')[2]!;
      assert.ok(/^(agent_gateway_|process_|nodejs_)/.test(name), name);
    }
    // The traceparent's trace id is logged even though this gateway exports no spans.
    const decision = lines.find((l) => l.event === 'connect_decision' && l.status === 200);
    assert.equal(decision?.trace_id, traceId);
    assert.match(String(decision?.connect_id), /^[0-9a-f]{12}-[0-9a-z]+$/);
  });

  test('per_identity_metrics / per_destination_metrics label only what the registry authorised', async () => {
    const gateway = await startGateway({ admin: { per_identity_metrics: true, per_destination_metrics: true, process_metrics: false } });
    const { client } = await grantedClient('agent-labelled');
    const session = await sessionTo(gateway, client);
    assert.equal((await tunnelOnce(session, Buffer.alloc(10))).status, 200);
    const forger = await sessionTo(gateway, await clientCredentials({ identity: 'agent-made-up-by-a-client' }));
    assert.equal((await tunnelOnce(forger)).status, 403);
    await until(() => gateway.openTunnels === 0);
    const { text } = await admin(gateway, '/metrics');
    assert.equal(sample(text, `agent_gateway_connect_decisions_total{status="200",reason="allowed",identity="agent-labelled",destination="${echoAuthority}"}`), 1);
    assert.equal(sample(text, 'agent_gateway_connect_decisions_total{status="403",reason="not_authorized",identity="",destination=""}'), 1);
    assert.equal(sample(text, `agent_gateway_tunnel_bytes_total{direction="up",identity="agent-labelled",destination="${echoAuthority}"}`), 10);
    assert.doesNotMatch(text, /agent-made-up-by-a-client/);
    assert.equal(sample(text, 'process_cpu_user_seconds_total'), undefined);
  });

  test('/healthz 200; /readyz 200, 503 while PostgreSQL is stopped, 200 again after it returns', { skip: process.env.TEST_DATABASE_URL ? 'needs the throwaway cluster' : false }, async () => {
    const gateway = await startGateway();
    assert.deepEqual(await admin(gateway, '/healthz'), { status: 200, contentType: 'application/json', text: '{"status":"ok"}\n' });
    const ready = await admin(gateway, '/readyz');
    assert.equal(ready.status, 200);
    assert.deepEqual(JSON.parse(ready.text), { status: 'ready', registry: 'ok', schema_version: SCHEMA_VERSION });
    pgServer.cluster!.stopServer();
    try {
      const down = await admin(gateway, '/readyz');
      assert.equal(down.status, 503);
      const body = JSON.parse(down.text);
      assert.equal(body.status, 'not_ready');
      assert.equal(body.registry, 'unavailable');
      assert.doesNotMatch(down.text, /password/);
      assert.equal((await admin(gateway, '/healthz')).status, 200, 'alive even when not ready');
    } finally {
      pgServer.cluster!.startServer();
    }
    await until(async () => (await admin(gateway, '/readyz')).status === 200, 10_000, '/readyz to recover');
    assert.equal((await admin(gateway, '/nope')).status, 404);
    const post = await fetch(`http://127.0.0.1:${gateway.adminAddress!.port}/healthz`, { method: 'POST' });
    assert.equal(post.status, 405);
  });

  test('a stalled TLS handshake is dropped after handshake_timeout_ms and counted as a timeout', async () => {
    const gateway = await startGateway({ limits: { handshake_timeout_ms: 200 } });
    const raw = netConnect(gateway.address!.port, '127.0.0.1');
    raw.on('error', () => {});
    const started = Date.now();
    await once(raw, 'close');
    assert.ok(Date.now() - started >= 150, 'dropped by the timeout, not at once');
    const { text } = await admin(gateway, '/metrics');
    assert.equal(sample(text, 'agent_gateway_tls_handshake_failures_total{reason="timeout"}'), 1);
    assert.equal(sample(text, 'agent_gateway_tls_handshake_failures_total{reason="error"}'), 0);
  });

  // Regression: Node enforces headersTimeout only on its connection check, every 30 s by default,
  // so a client that stopped mid-headers held an admin socket for up to 35 s, not 5.
  test('a client that stops sending mid-headers to the admin port is cut off within about 6 s (headersTimeout 5 s)', async () => {
    const gateway = await startGateway();
    const raw = netConnect(gateway.adminAddress!.port, '127.0.0.1');
    raw.on('error', () => {});
    raw.write('GET /healthz HTTP/1.1\r\nHost: x\r\nx-slow: 1\r\n');
    raw.resume(); // read the 408, so that 'close' can follow it
    const started = Date.now();
    try {
      await Promise.race([once(raw, 'close'), sleep(9000)]);
      assert.ok(raw.destroyed, `still open after ${Date.now() - started} ms`);
      assert.ok(Date.now() - started < 7000, `closed after ${Date.now() - started} ms`);
    } finally {
      raw.destroy();
    }
  });

  test('[admin] enabled = false: no admin listener and no metrics kept', async () => {
    const gateway = await startGateway({ admin: { enabled: false } });
    assert.equal(gateway.adminAddress, undefined);
    assert.equal(gateway.metrics, undefined);
  });
});

describe('tracing', () => {
  test("the gateway's spans continue the CONNECT's traceparent (one trace id across sidecar and gateway)", async () => {
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
    const lines: Record<string, unknown>[] = [];
    const gateway = await startGateway({}, { tracerProvider: provider, logger: captureLogger(lines) });
    const { client, permissionId } = await grantedClient('agent-traced');
    const session = await sessionTo(gateway, client);
    const traceId = randomBytes(16).toString('hex');
    const parentSpanId = randomBytes(8).toString('hex');
    assert.equal((await tunnelOnce(session, Buffer.alloc(64, 7), echoAuthority, { traceparent: `00-${traceId}-${parentSpanId}-01` })).status, 200);
    await until(() => exporter.getFinishedSpans().some((s) => s.name === 'agent_gateway.tunnel'), 5000, 'the tunnel span');

    const spans = exporter.getFinishedSpans();
    const connect = spans.find((s) => s.name === 'CONNECT')!;
    assert.ok(connect, 'a CONNECT span');
    assert.equal(connect.spanContext().traceId, traceId);
    assert.equal(connect.parentSpanContext?.spanId, parentSpanId, 'the sidecar span is the parent');
    assert.equal(connect.attributes['http.response.status_code'], 200);
    assert.equal(connect.attributes['agent_gateway.permission_id'], permissionId);
    for (const name of ['agent_gateway.registry_lookup', 'agent_gateway.dial', 'agent_gateway.tunnel']) {
      const span = spans.find((s) => s.name === name);
      assert.ok(span, name);
      assert.equal(span.spanContext().traceId, traceId, `${name} shares the trace`);
      assert.equal(span.parentSpanContext?.spanId, connect.spanContext().spanId, `${name} is a child of CONNECT`);
    }
    assert.equal(spans.find((s) => s.name === 'agent_gateway.tunnel')!.attributes['agent_gateway.bytes_up'], 64);
    // The long-lived session span has its own trace; the CONNECT links to it.
    session.close();
    await until(() => exporter.getFinishedSpans().some((s) => s.name === 'agent_gateway.session'), 5000, 'the session span');
    const sessionSpan = exporter.getFinishedSpans().find((s) => s.name === 'agent_gateway.session')!;
    assert.equal(sessionSpan.attributes['agent_gateway.identity'], 'agent-traced');
    assert.equal(connect.links[0]?.context.spanId, sessionSpan.spanContext().spanId);
    assert.equal(lines.find((l) => l.event === 'connect_decision')?.trace_id, traceId);
    assert.equal(lines.find((l) => l.event === 'tunnel_closed')?.trace_id, traceId);

    // Without a traceparent the CONNECT starts a trace of its own.
    exporter.reset();
    const second = await sessionTo(gateway, client);
    assert.equal((await tunnelOnce(second)).status, 200);
    await until(() => exporter.getFinishedSpans().some((s) => s.name === 'agent_gateway.tunnel'));
    const root = exporter.getFinishedSpans().find((s) => s.name === 'CONNECT')!;
    assert.notEqual(root.spanContext().traceId, traceId);
    assert.equal(root.parentSpanContext, undefined);
    await provider.shutdown();
  });
});

describe('limits', () => {
  test('rate 2/s burst 2: the third immediate CONNECT gets 429 rate_limited, and 200 again after the refill', async () => {
    // 2/s rather than faster so a loaded test machine cannot refill a token between two requests.
    const gateway = await startGateway({ limits: { connect_rate_per_second: 2, connect_burst: 2 } });
    const { client } = await grantedClient('agent-rated');
    const session = await sessionTo(gateway, client);
    assert.equal((await tunnelOnce(session)).status, 200);
    assert.equal((await tunnelOnce(session)).status, 200);
    const limited = await tunnelOnce(session);
    assert.equal(limited.status, 429);
    assert.equal(limited.headers['proxy-status'], 'agent-gateway; error=http_request_denied; details="rate_limited"');
    await sleep(600); // one token per 500 ms
    assert.equal((await tunnelOnce(session)).status, 200);
    assert.equal((await tunnelOnce(session)).status, 429);
    // Limits come before the registry: an identity with no permission at all is rate limited too.
    const nobody = await sessionTo(gateway, await clientCredentials({ identity: 'agent-nobody-rated' }));
    const statuses = [];
    for (let i = 0; i < 3; i++) statuses.push((await tunnelOnce(nobody)).status);
    assert.deepEqual(statuses, [403, 403, 429]);
    // ...but after the identity check: no identity, no bucket.
    const anonymous = await sessionTo(gateway, await clientCredentials({}));
    for (let i = 0; i < 3; i++) assert.equal((await tunnelOnce(anonymous)).status, 403);
    // The bucket is keyed by identity and key: a stranger presenting the same identity string
    // spends a bucket of its own, not the agent's (and is then refused by the registry).
    const impostor = await sessionTo(gateway, await clientCredentials({ identity: 'agent-rated' }));
    assert.equal((await tunnelOnce(impostor)).status, 403);
    const { text } = await admin(gateway, '/metrics');
    assert.equal(sample(text, 'agent_gateway_connect_decisions_total{status="429",reason="rate_limited"}'), 3);
  });

  test('max_tunnels_per_identity 2: a third concurrent tunnel gets 429 too_many_tunnels; a closed one frees a slot', async () => {
    const gateway = await startGateway({ limits: { max_tunnels_per_identity: 2 } });
    const { client } = await grantedClient('agent-concurrent');
    const session = await sessionTo(gateway, client);
    const first = await request(session, echoAuthority);
    const second = await request(session, echoAuthority);
    assert.deepEqual([first.status, second.status], [200, 200]);
    const third = await tunnelOnce(session);
    assert.equal(third.status, 429);
    assert.equal(third.headers['proxy-status'], 'agent-gateway; error=http_request_denied; details="too_many_tunnels"');
    await echoOn(first.stream, Buffer.from('still open'));
    first.stream.end();
    await once(first.stream, 'close');
    await until(() => gateway.openTunnels === 1);
    assert.equal((await tunnelOnce(session)).status, 200);
    second.stream.end();
    await once(second.stream, 'close');

    // CONNECTs being decided hold a slot too: a burst cannot overshoot the cap.
    const { client: bursty } = await grantedClient('agent-bursty');
    const burstSession = await sessionTo(gateway, bursty);
    const burst = await Promise.all(Array.from({ length: 6 }, () => request(burstSession, echoAuthority)));
    assert.deepEqual(burst.map((r) => r.status).sort(), [200, 200, 429, 429, 429, 429]);
    for (const response of burst) response.stream.close();
  });

  test('idle_timeout_ms closes a silent tunnel and keeps a busy one', async () => {
    const lines: Record<string, unknown>[] = [];
    const gateway = await startGateway({ limits: { idle_timeout_ms: 300 } }, { logger: captureLogger(lines) });
    const { client } = await grantedClient('agent-idle');
    const session = await sessionTo(gateway, client);
    const silent = await request(session, echoAuthority);
    const busy = await request(session, echoAuthority);
    assert.deepEqual([silent.status, busy.status], [200, 200]);
    await echoOn(silent.stream, Buffer.from('hello'));
    const started = Date.now();
    let silentClosedAt = 0;
    silent.stream.once('close', () => (silentClosedAt = Date.now()));
    silent.stream.resume();
    let silentEndedAt = 0;
    silent.stream.once('end', () => (silentEndedAt = Date.now()));
    // END_STREAM at the timeout; this client never ends its half, so the stream is reset
    // TUNNEL_LINGER_MS later (within the tracker's 250 ms sweep).
    for (let i = 0; i < 14; i++) {
      await echoOn(busy.stream, Buffer.from(`tick ${i}`));
      await sleep(100);
    }
    assert.ok(silentEndedAt > 0 && silentClosedAt > 0, 'the silent tunnel was ended, then closed');
    assert.ok(silentEndedAt - started >= 250, `ended after ${silentEndedAt - started} ms, not before the timeout`);
    assert.ok(!busy.stream.closed, 'the busy tunnel is still open after 1.4 s');
    await echoOn(busy.stream, Buffer.from('still here'));
    busy.stream.end();
    await until(() => gateway.openTunnels === 0);
    assert.equal(lines.find((l) => l.event === 'tunnel_closed' && l.detail === 'idle_timeout')?.identity, 'agent-idle');
    assert.equal(lines.filter((l) => l.event === 'tunnel_closed' && l.detail === 'idle_timeout').length, 1);
    const { text } = await admin(gateway, '/metrics');
    assert.equal(sample(text, 'agent_gateway_tunnel_idle_timeouts_total'), 1);
  });
});

describe('TLS sessions', () => {
  /**
   * One TLS connection with the client's certificate. Resolves after the handshake, and
   * `settleMs` more (TLS 1.3 tickets arrive after it), or with the error that refused it.
   */
  async function handshake(port: number, client: ClientCredentials, options: Pick<ConnectionOptions, 'maxVersion' | 'ciphers' | 'session'> = {}, settleMs = 0) {
    const socket = tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', ca: tls.caPem, cert: client.certPem, key: client.privateKeyPem, ALPNProtocols: ['h2'], ...options });
    let ticket: Buffer | undefined;
    socket.on('session', (data: Buffer) => (ticket = data));
    const refused = await new Promise<string | undefined>((resolve) => {
      socket.once('secureConnect', () => resolve(undefined));
      socket.once('error', (error) => resolve(`refused: ${error.message}`));
    });
    socket.on('error', () => {});
    if (refused) {
      socket.destroy();
      return { refused, reused: false, cipher: undefined, ticket, saved: undefined };
    }
    const saved = socket.getSession();
    await sleep(settleMs);
    const result = { refused, reused: socket.isSessionReused(), cipher: socket.getCipher().name, ticket, saved };
    socket.destroy();
    return result;
  }

  test('TLS 1.2 is forward-secret AEAD only: a client offering only CBC or static-RSA suites is refused, an AEAD one is served', async () => {
    const gateway = await startGateway();
    const port = gateway.address!.port;
    const { client } = await grantedClient('agent-tls12');
    // The negotiated suite, or "refused: <why>".
    const attempt = async (ciphers: string) => {
      const result = await handshake(port, client, { maxVersion: 'TLSv1.2', ciphers });
      return result.refused ?? result.cipher ?? '';
    };
    for (const cbc of ['ECDHE-ECDSA-AES128-SHA256', 'ECDHE-ECDSA-AES256-SHA', 'AES128-GCM-SHA256', 'AES256-SHA']) {
      assert.match(await attempt(cbc), /^refused: .*(handshake failure|no (shared )?cipher)/, `${cbc} is not served`);
    }
    // The server's order wins among what the client offers.
    assert.equal(await attempt('ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256'), 'ECDHE-ECDSA-AES128-GCM-SHA256');
    assert.equal(await attempt('ECDHE-ECDSA-CHACHA20-POLY1305'), 'ECDHE-ECDSA-CHACHA20-POLY1305');
  });

  // Regression: the gateway resumed TLS 1.3 sessions from its tickets, so whoever held a ticket
  // and its resumption secret (a sidecar's memory, not its TPM) opened sessions as that agent
  // without the agent's key, and every resumed session could get a new ticket.
  test('every session proves the client key afresh: a ticket or a session ID offered again is not resumed, also after a reload', async () => {
    const gateway = await startGateway();
    const port = gateway.address!.port;
    const { client } = await grantedClient('agent-resume');
    for (const when of ['at start', 'after a reload']) {
      const first = await handshake(port, client, {}, 300);
      assert.equal(first.reused, false);
      // OpenSSL still sends a (stateful) ticket under SSL_OP_NO_TICKET; the gateway keeps no
      // session cache, so it names nothing that could be resumed.
      assert.ok(first.ticket, `${when}: the client got a ticket to offer`);
      assert.equal((await handshake(port, client, { session: first.ticket }, 300)).reused, false, `${when}: a TLS 1.3 ticket is not resumed`);
      const twelve = await handshake(port, client, { maxVersion: 'TLSv1.2' });
      assert.ok(twelve.saved, 'the TLS 1.2 client kept a session to offer');
      assert.equal((await handshake(port, client, { maxVersion: 'TLSv1.2', session: twelve.saved })).reused, false, `${when}: a TLS 1.2 session is not resumed`);
      if (when === 'at start') await gateway.reload(parseConfig(rawConfig()));
    }
  });
});

describe('reload', () => {
  test('reload(): the next handshake gets the new certificate while an old tunnel keeps flowing; a bad new pair keeps the old one', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'agw-reload-'));
    const certPath = join(dir, 'server.pem');
    const keyPath = join(dir, 'server-key.pem');
    copyFileSync(tls.certPath, certPath);
    copyFileSync(tls.keyPath, keyPath);
    const next = await serverTls();
    // Both test CAs have the same name, so each client trusts exactly one of them: a handshake
    // that verifies against the new CA proves the new certificate was served.
    try {
      const gateway = await startGateway({ server: { tls_cert_path: certPath, tls_key_path: keyPath }, limits: { connect_rate_per_second: 100 } });
      const { client } = await grantedClient('agent-reload');
      const oldSession = await sessionTo(gateway, client, tls.caPem);
      const oldFingerprint = peerFingerprint(oldSession);
      assert.equal(oldFingerprint, gateway.certificateFingerprint);
      // Node's client offers AES-256-GCM first; the gateway's order wins (server-credentials.ts).
      assert.equal((oldSession.socket as TLSSocket).getCipher().name, 'TLS_AES_128_GCM_SHA256');
      const tunnel = await request(oldSession, echoAuthority);
      assert.equal(tunnel.status, 200);
      await echoOn(tunnel.stream, Buffer.from('before reload'));

      copyFileSync(next.certPath, certPath);
      copyFileSync(next.keyPath, keyPath);
      const result = await gateway.reload(parseConfig(rawConfig({ server: { tls_cert_path: certPath, tls_key_path: keyPath }, limits: { connect_rate_per_second: 50, max_tunnels_per_identity: 10 } })));
      assert.equal(result.certificate.changed, true);
      assert.notEqual(result.certificate.fingerprint, oldFingerprint);
      assert.deepEqual([...result.limits].sort(), ['connect_burst', 'connect_rate_per_second', 'max_tunnels_per_identity']);
      assert.deepEqual(result.restart_required, []);
      assert.equal(gateway.limits.connect_rate_per_second, 50);

      const newSession = await sessionTo(gateway, client, next.caPem);
      assert.equal(peerFingerprint(newSession), result.certificate.fingerprint, 'the next handshake sees the new certificate');
      assert.equal((newSession.socket as TLSSocket).getCipher().name, 'TLS_AES_128_GCM_SHA256', 'a reload keeps the cipher order');
      assert.equal((await tunnelOnce(newSession)).status, 200);
      await echoOn(tunnel.stream, Buffer.from('after reload'));
      assert.equal((await tunnelOnce(oldSession)).status, 200, 'the old session keeps working');

      // Bad new files: each is refused and the served certificate stays the same.
      const third = await serverTls();
      const badPairs: [string, () => void, RegExp][] = [
        ['garbage certificate', () => writeFileSync(certPath, 'not a certificate\n'), /tls_cert_path: .* is not a PEM certificate/],
        ['key of another certificate', () => (copyFileSync(third.certPath, certPath), copyFileSync(next.keyPath, keyPath)), /tls_key_path: .* is not the key of the certificate/],
        ['garbage key', () => (copyFileSync(next.certPath, certPath), writeFileSync(keyPath, '-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n')), /tls_key_path: .* is not a PEM private key/],
        ['missing key file', () => rmSync(keyPath), /tls_key_path: cannot read .* \(no such file\)/],
      ];
      for (const [name, breakIt, message] of badPairs) {
        breakIt();
        await assert.rejects(gateway.reload(), { code: 'ERR_CONFIG', message }, name);
        const probe = await sessionTo(gateway, client, next.caPem);
        assert.equal(peerFingerprint(probe), result.certificate.fingerprint, `${name}: the previous certificate is still served`);
        probe.close();
      }
      assert.equal(gateway.limits.connect_rate_per_second, 50, 'a refused reload changes no limit either');
      await echoOn(tunnel.stream, Buffer.from('after refused reloads'));
      tunnel.stream.end();
      const { text } = await admin(gateway, '/metrics');
      assert.equal(sample(text, 'agent_gateway_reloads_total{result="success"}'), 1);
      assert.equal(sample(text, 'agent_gateway_reloads_total{result="failure"}'), 4);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  // Regression: the key was read with readFileSync, so a reload naming a FIFO (or /dev/stdin)
  // blocked the event loop, every tunnel and probe with it, until something wrote to it.
  test('reload(): a certificate or key path that is a FIFO or a device is refused at once, without blocking the gateway', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'agw-reload-fifo-'));
    const fifo = join(dir, 'key.fifo');
    const writer = spawn('sh', ['-c', `mkfifo "$0" && sleep 3 && echo junk > "$0"`, fifo], { stdio: 'ignore' });
    try {
      await until(() => existsSync(fifo));
      const gateway = await startGateway();
      for (const [field, path] of [['tls_key_path', fifo], ['tls_cert_path', fifo], ['tls_key_path', '/dev/zero']] as const) {
        const started = performance.now();
        await assert.rejects(gateway.reload(parseConfig(rawConfig({ server: { [field]: path } }))), { code: 'ERR_CONFIG', message: new RegExp(`server\\.${field}: .* is not a regular file`) }, `${field} ${path}`);
        assert.ok(performance.now() - started < 1000, `${field} ${path}: refused at once`);
      }
    } finally {
      writer.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  // Regression: restart_required named four [server] keys; a reload changing max_session_age_ms or
  // a window reported success with nothing to restart, and the old value silently stayed in force.
  test('reload(): every [server] key it cannot apply is named under restart_required', async () => {
    const gateway = await startGateway({ server: { max_session_age_ms: 60_000 } });
    const changed = { max_session_age_ms: 120_000, stream_window_bytes: 65_535, session_window_bytes: 131_070, proxy_protocol_from: ['10.0.0.5/32'], drain_delay_ms: 100 };
    const result = await gateway.reload(parseConfig(rawConfig({ server: changed })));
    assert.deepEqual([...result.restart_required].sort(), Object.keys(changed).map((key) => `server.${key}`).sort());
    assert.deepEqual((await gateway.reload(parseConfig(rawConfig({ server: { max_session_age_ms: 60_000 } })))).restart_required, [], 'the config it started with needs no restart');
  });

  test('SIGHUP: the agent-gateway process reloads its certificate; an invalid config file changes nothing and counts as a failed reload', { skip: process.platform === 'win32' }, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'agw-sighup-'));
    const certPath = join(dir, 'server.pem');
    const keyPath = join(dir, 'server-key.pem');
    copyFileSync(tls.certPath, certPath);
    copyFileSync(tls.keyPath, keyPath);
    const configPath = join(dir, 'config.toml');
    const writeConfig = (limits: string) =>
      writeFileSync(
        configPath,
        `[server]\nlisten_addr = "127.0.0.1:0"\ntls_cert_path = "${certPath}"\ntls_key_path = "${keyPath}"\n\n` +
          `[policy]\nclient_ext_oid = "${TEST_OID}"\ndatabase_url = "${databaseUrl}"\n\n[observability]\nlog_level = "info"\n\n` +
          `[admin]\nlisten_addr = "127.0.0.1:0"\n\n[audit]\nenabled = false\n\n[egress]\nallow_cidrs = ["127.0.0.0/8"]\n\n[limits]\n${limits}\n`,
      );
    writeConfig('idle_timeout_ms = 0');
    const child = spawn(process.execPath, [resolve(import.meta.dirname, '../../bin/agent-gateway.js'), '--config', configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    try {
      await until(() => /"event":"listening"/.test(output), 15_000, 'the gateway to listen');
      const port = Number(/"event":"listening","address":"127\.0\.0\.1:(\d+)"/.exec(output)![1]);
      const adminPort = Number(/"event":"admin_listening","address":"127\.0\.0\.1:(\d+)"/.exec(output)![1]);
      const reloads = async (result: string) => sample(await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text(), `agent_gateway_reloads_total{result="${result}"}`);
      const next = await serverTls();
      const { client } = await grantedClient('agent-sighup');
      const mine: ClientHttp2Session[] = [];
      const connectTo = async (caPem: string) => {
        const session = await gatewaySession(port, { caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
        mine.push(session);
        return session;
      };
      const oldSession = await connectTo(tls.caPem);
      const oldFingerprint = peerFingerprint(oldSession);
      const tunnel = await request(oldSession, echoAuthority);
      assert.equal(tunnel.status, 200);
      await echoOn(tunnel.stream, Buffer.from('before SIGHUP'));

      copyFileSync(next.certPath, certPath);
      copyFileSync(next.keyPath, keyPath);
      child.kill('SIGHUP');
      await until(() => /"event":"reloaded"/.test(output), 10_000, 'the reloaded log line');
      const newSession = await connectTo(next.caPem);
      const newFingerprint = peerFingerprint(newSession);
      assert.notEqual(newFingerprint, oldFingerprint);
      await echoOn(tunnel.stream, Buffer.from('after SIGHUP'));

      writeConfig('connect_burst = 0');
      child.kill('SIGHUP');
      await until(() => /"event":"reload_failed"/.test(output), 10_000, 'the reload_failed log line');
      assert.match(output, /limits\.connect_burst/);
      assert.equal(await reloads('failure'), 1, 'a config file that does not parse is a failed reload');
      assert.equal(await reloads('success'), 1);
      assert.equal(peerFingerprint(await connectTo(next.caPem)), newFingerprint);
      await echoOn(tunnel.stream, Buffer.from('after a refused SIGHUP'));
      tunnel.stream.end();
      await once(tunnel.stream, 'close');
      for (const session of mine) session.destroy();

      child.kill('SIGTERM');
      const [code] = await once(child, 'exit');
      assert.equal(code, 0, output);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('an unreachable destination still answers 502 with limits on (slot released)', async () => {
  const gateway = await startGateway({ limits: { max_tunnels_per_identity: 1 } });
  const port = await closedPort();
  await fixture.delegate('org-alice', `127.0.0.1:${port}`, { notBefore: at(-DAY) });
  const { client } = await grantedClient('agent-dialfail', `127.0.0.1:${port}`);
  const session = await sessionTo(gateway, client);
  for (let i = 0; i < 3; i++) assert.equal((await tunnelOnce(session, undefined, `127.0.0.1:${port}`)).status, 502);
});
