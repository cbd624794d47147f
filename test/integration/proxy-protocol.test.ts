/**
 * PROXY protocol v2 on the gateway listener (DESIGN §9g, `[server] proxy_protocol_from`), over real
 * TCP and TLS. The gateway trusts 127.0.0.1 as its balancer; 127.0.0.2 (also loopback on Linux)
 * plays an untrusted peer. Hostile cases check that sessions, held connections and descriptors
 * return to their baseline and that a legitimate client is still served.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readdirSync } from 'node:fs';
import { connect as h2connect, type ClientHttp2Session } from 'node:http2';
import { connect as netConnect, type Socket } from 'node:net';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { connect as tlsConnect } from 'node:tls';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';
import { parseConfig, type GatewayConfig } from '../../gateway/src/config.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { encodeProxyV2, type ProxyHeader } from '../../gateway/src/proxy-protocol.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { captureLogger } from '../helpers/logs.js';
import { exchange, request } from '../helpers/net.js';
import { clientCredentials, TEST_OID, type ClientCredentials } from '../helpers/pki.js';
import { until } from '../helpers/wait.js';

let world: EchoRegistry;
let agent: ClientCredentials;
let gateway: Gateway;
const lines: Record<string, unknown>[] = [];
const spans = new InMemorySpanExporter();

const AGENT: ProxyHeader = { command: 'proxy', family: 'inet', source: { address: '198.51.100.23', port: 40404 }, destination: { address: '127.0.0.1', port: 8443 } };

const LOOPBACK_EGRESS = { allow_cidrs: ['127.0.0.0/8'] };
const QUIET_ADMIN = { listen_addr: '127.0.0.1:0', process_metrics: false };

/** A gateway trusting 127.0.0.1's PROXY headers: `limits`, further sections and [server] keys on top. */
function proxiedConfig(limits: Record<string, unknown>, sections: Record<string, unknown> = {}, server: Record<string, unknown> = {}): GatewayConfig {
  return parseConfig({
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath, shutdown_grace_ms: 500, proxy_protocol_from: ['127.0.0.1/32'], ...server },
    policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl, connect_timeout_ms: 2000 },
    observability: { log_level: 'info' },
    limits,
    ...sections,
  });
}

before(async () => {
  world = await startEchoRegistry();
  agent = await clientCredentials({ identity: 'agent-proxied' });
  await world.fixture.permit(world.alice, { identity: 'agent-proxied', spkiDer: agent.spkiDer }, world.echoAuthority);
  const config = proxiedConfig({ handshake_timeout_ms: 1000 }, { observability: { log_level: 'debug' }, egress: LOOPBACK_EGRESS, admin: QUIET_ADMIN });
  gateway = createGateway(config, { logger: captureLogger(lines), tracerProvider: new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spans)] }) });
  await gateway.listen();
});

after(async () => {
  await gateway?.close(200);
  await world?.close();
});

/** A TCP connection from `localAddress` to the gateway, `prefix` written first. */
async function rawConnection(localAddress: string, prefix?: Buffer): Promise<Socket> {
  const socket = netConnect({ host: '127.0.0.1', port: gateway.address!.port, localAddress });
  socket.on('error', () => {});
  await once(socket, 'connect');
  if (prefix) socket.write(prefix);
  return socket;
}

/** An HTTP/2 session to the gateway from `localAddress`, the PROXY header (if any) sent before TLS. */
async function sessionVia(localAddress: string, header?: Buffer): Promise<ClientHttp2Session> {
  const raw = await rawConnection(localAddress, header);
  const session = h2connect(`https://localhost:${gateway.address!.port}`, {
    createConnection: () => tlsConnect({ socket: raw, servername: 'localhost', ca: world.tls.caPem, cert: agent.certPem, key: agent.privateKeyPem, ALPNProtocols: ['h2'] }),
  });
  session.on('error', () => {});
  await once(session, 'connect');
  return session;
}

/** The connection is closed by the gateway without a TLS answer. */
async function refused(socket: Socket): Promise<void> {
  let received = 0;
  socket.on('data', (chunk: Buffer) => (received += chunk.length));
  if (!socket.destroyed) await once(socket, 'close');
  assert.equal(received, 0, 'nothing is sent back');
}

async function metric(name: string, reason: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${gateway.adminAddress!.port}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name}{reason="${reason}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

async function tunnelWorks(session: ClientHttp2Session): Promise<void> {
  const { status, stream } = await request(session, world.echoAuthority);
  assert.equal(status, 200);
  assert.deepEqual(await exchange(stream, Buffer.from('via balancer')), Buffer.from('via balancer'));
}

test('a trusted balancer header makes the agent the client: decision log, tunnel log, spans and audit rows', async () => {
  const session = await sessionVia('127.0.0.1', encodeProxyV2(AGENT));
  try {
    await tunnelWorks(session);
  } finally {
    session.close();
  }
  await until(() => lines.some((l) => l.event === 'tunnel_closed' && l.identity === 'agent-proxied'), 5000, 'tunnel_closed logged');
  const decision = lines.find((l) => l.event === 'connect_decision' && l.identity === 'agent-proxied');
  assert.equal(decision?.client_address, '198.51.100.23');
  assert.equal(decision?.client_port, 40404);
  const closed = lines.find((l) => l.event === 'tunnel_closed' && l.identity === 'agent-proxied');
  assert.equal(closed?.client_address, '198.51.100.23');
  await until(() => spans.getFinishedSpans().some((span) => span.name === 'agent_gateway.session'), 5000, 'the session span ended');
  const sessionSpan = spans.getFinishedSpans().find((span) => span.name === 'agent_gateway.session')!;
  assert.equal(sessionSpan.attributes['client.address'], '198.51.100.23');
  assert.equal(sessionSpan.attributes['client.port'], 40404);
  assert.equal(sessionSpan.attributes['network.peer.address'], '127.0.0.1', 'the balancer stays visible as the TCP peer');
  const connect = spans.getFinishedSpans().find((span) => span.attributes['agent_gateway.reason'] === 'allowed')!;
  assert.equal(connect.attributes['client.address'], '198.51.100.23');
  const audited = async () => (await world.fixture.db.query("SELECT reason, client_address, client_port FROM audit_log WHERE identity = 'agent-proxied' ORDER BY id")).rows;
  await until(async () => (await audited()).length === 2, 10_000, 'decision and tunnel_closed audit rows');
  assert.deepEqual(await audited(), [
    { reason: 'allowed', client_address: '198.51.100.23', client_port: 40404 },
    { reason: 'tunnel_closed', client_address: '198.51.100.23', client_port: 40404 },
  ]);
});

test('a LOCAL header from the balancer is accepted and the connection is the balancer\'s own', async () => {
  // Also one naming AF_INET without sending addresses: a LOCAL's family is ignored (it was refused as bad_length).
  const inetNoAddresses = encodeProxyV2({ command: 'local' });
  inetNoAddresses[13] = 0x11;
  for (const header of [encodeProxyV2({ command: 'local' }), inetNoAddresses]) {
    const before = lines.length;
    const session = await sessionVia('127.0.0.1', header);
    try {
      await tunnelWorks(session);
    } finally {
      session.close();
    }
    const decision = lines.slice(before).find((l) => l.event === 'connect_decision');
    assert.equal(decision?.client_address, '127.0.0.1');
  }
});

test('an untrusted peer is served without a header and refused with one (v2 or v1)', async () => {
  const direct = await sessionVia('127.0.0.2');
  const before = lines.length;
  try {
    await tunnelWorks(direct);
  } finally {
    direct.close();
  }
  assert.equal(lines.slice(before).find((l) => l.event === 'connect_decision')?.client_address, '127.0.0.2');
  const untrusted = await metric('agent_gateway_proxy_protocol_refusals_total', 'untrusted_source');
  await refused(await rawConnection('127.0.0.2', encodeProxyV2(AGENT)));
  await refused(await rawConnection('127.0.0.2', Buffer.from('PROXY TCP4 198.51.100.23 127.0.0.1 40404 8443\r\n')));
  assert.equal(await metric('agent_gateway_proxy_protocol_refusals_total', 'untrusted_source'), untrusted + 2);
});

// Regression: with a balancer configured, a direct peer's stalled handshake was counted as a PROXY
// protocol refusal ('timeout') at debug level, although it owed no header; without one configured
// the same stall is a TLS handshake timeout with its info line.
test('an untrusted peer that sends nothing is a stalled TLS handshake, not a PROXY protocol refusal', async () => {
  const proxyTimeouts = await metric('agent_gateway_proxy_protocol_refusals_total', 'timeout');
  const tlsTimeouts = await metric('agent_gateway_tls_handshake_failures_total', 'timeout');
  const before = lines.length;
  const startedAt = performance.now();
  await refused(await rawConnection('127.0.0.2'));
  assert.ok(performance.now() - startedAt >= 900, 'held until the handshake deadline (1 s), not closed at once');
  assert.equal(await metric('agent_gateway_tls_handshake_failures_total', 'timeout'), tlsTimeouts + 1);
  assert.equal(await metric('agent_gateway_proxy_protocol_refusals_total', 'timeout'), proxyTimeouts);
  assert.ok(lines.slice(before).some((l) => l.event === 'tls_handshake_failed' && l.reason === 'timeout'), 'logged as a handshake timeout');
  // The balancer itself still owes a header: its silence stays a PROXY protocol refusal.
  await refused(await rawConnection('127.0.0.1'));
  assert.equal(await metric('agent_gateway_proxy_protocol_refusals_total', 'timeout'), proxyTimeouts + 1);
  assert.equal(await metric('agent_gateway_tls_handshake_failures_total', 'timeout'), tlsTimeouts + 1);
});

// Regression: with a balancer configured, a direct peer that connected and closed (or reset) before
// sending anything was counted as a PROXY protocol refusal ('truncated', debug) although it owed no
// header; without a balancer the same peer is a failed TLS handshake ('error', info line).
test('an untrusted peer that closes or resets before sending anything is a failed TLS handshake, not a PROXY protocol refusal', async () => {
  const truncated = await metric('agent_gateway_proxy_protocol_refusals_total', 'truncated');
  const tlsErrors = await metric('agent_gateway_tls_handshake_failures_total', 'error');
  const before = lines.length;
  const ended = await rawConnection('127.0.0.2');
  ended.end();
  await refused(ended);
  const reset = await rawConnection('127.0.0.2');
  reset.resetAndDestroy();
  await until(async () => (await metric('agent_gateway_tls_handshake_failures_total', 'error')) === tlsErrors + 2, 3000, 'two more TLS handshake failures (error)');
  assert.equal(await metric('agent_gateway_proxy_protocol_refusals_total', 'truncated'), truncated);
  assert.equal(lines.slice(before).filter((l) => l.event === 'tls_handshake_failed' && l.reason === 'error').length, 2, 'each logged as a failed handshake');
  // The balancer itself still owes a header: its closing without one stays a PROXY protocol refusal.
  const balancer = await rawConnection('127.0.0.1');
  balancer.end();
  await refused(balancer);
  await until(async () => (await metric('agent_gateway_proxy_protocol_refusals_total', 'truncated')) === truncated + 1, 3000, 'the balancer\'s silence refused as truncated');
  assert.equal(await metric('agent_gateway_tls_handshake_failures_total', 'error'), tlsErrors + 2);
});

test('the trusted balancer must send a v2 header: none, v1 or a broken one is refused by reason', async () => {
  const cases: [Buffer, string][] = [
    [Buffer.from([0x16, 0x03, 0x01, 0x00, 0x10]), 'missing'],
    [Buffer.from('PROXY TCP4 198.51.100.23 127.0.0.1 40404 8443\r\n'), 'v1'],
    [(() => { const b = encodeProxyV2(AGENT); b[13] = 0x12; return b; })(), 'bad_family'],
  ];
  for (const [bytes, reason] of cases) {
    const count = await metric('agent_gateway_proxy_protocol_refusals_total', reason);
    await refused(await rawConnection('127.0.0.1', bytes));
    assert.equal(await metric('agent_gateway_proxy_protocol_refusals_total', reason), count + 1, reason);
  }
});

function descriptors(): number {
  return readdirSync('/proc/self/fd').length - gateway.registry.poolStats.total;
}

test('hostile balancer-side peers: stall mid-header, huge length, TLV garbage, drop mid-header; nothing outlives them', async () => {
  await until(() => gateway.openSessions === 0 && gateway.proxyFront!.tracked === 0, 3000, 'quiet before the case');
  const baseFds = descriptors();
  const header = encodeProxyV2(AGENT);
  const huge = Buffer.from(header);
  huge.writeUInt16BE(0xffff, 14);
  const garbage = encodeProxyV2(AGENT, [{ type: 0x20, value: Buffer.alloc(3) }]);
  garbage.writeUInt16BE(0x0fff, garbage.length - 5); // the TLV claims far more than the header holds
  const timeouts = await metric('agent_gateway_proxy_protocol_refusals_total', 'truncated');
  const stalls = await Promise.all(Array.from({ length: 20 }, () => rawConnection('127.0.0.1', header.subarray(0, 10))));
  const hugeOnes = await Promise.all(Array.from({ length: 20 }, () => rawConnection('127.0.0.1', Buffer.concat([huge, Buffer.alloc(4096)]))));
  const garbageOnes = await Promise.all(Array.from({ length: 20 }, () => rawConnection('127.0.0.1', garbage)));
  const dropped = await Promise.all(Array.from({ length: 20 }, () => rawConnection('127.0.0.1', header.subarray(0, 20))));
  for (const socket of dropped) socket.destroy();
  // A header byte by byte, then a real client: slow is fine within the deadline.
  const slow = await rawConnection('127.0.0.1');
  for (const byte of header) slow.write(Buffer.from([byte]));
  const session = h2connect(`https://localhost:${gateway.address!.port}`, {
    createConnection: () => tlsConnect({ socket: slow, servername: 'localhost', ca: world.tls.caPem, cert: agent.certPem, key: agent.privateKeyPem, ALPNProtocols: ['h2'] }),
  });
  session.on('error', () => {});
  await once(session, 'connect');
  await tunnelWorks(session);
  session.destroy();
  await Promise.all([...hugeOnes, ...garbageOnes].map(refused));
  // The stalled ones are closed at the handshake deadline (1 s here).
  await Promise.all(stalls.map(refused));
  assert.ok((await metric('agent_gateway_proxy_protocol_refusals_total', 'truncated')) >= timeouts + 20);
  for (const socket of [...stalls, ...hugeOnes, ...garbageOnes]) socket.destroy();
  await until(() => gateway.openSessions === 0 && gateway.proxyFront!.tracked === 0 && descriptors() <= baseFds, 3000, `back to baseline (sessions ${gateway.openSessions}, tracked ${gateway.proxyFront!.tracked}, fds ${descriptors()} > ${baseFds})`);
  const after = await sessionVia('127.0.0.1', encodeProxyV2(AGENT));
  try {
    await tunnelWorks(after);
  } finally {
    after.destroy();
  }
});

test('a balancer-side peer that resets mid-header is let go at once, not held until the handshake deadline (it was held, and counted as a stall, until then)', async () => {
  // Far beyond the wait below: only letting go on the reset itself can pass.
  const config = proxiedConfig({ handshake_timeout_ms: 120_000 }, { admin: QUIET_ADMIN });
  const patient = createGateway(config, { logger: captureLogger([]) });
  await patient.listen();
  try {
    const refusals = async (reason: string) => {
      const text = await (await fetch(`http://127.0.0.1:${patient.adminAddress!.port}/metrics`)).text();
      const line = text.split('\n').find((l) => l.startsWith(`agent_gateway_proxy_protocol_refusals_total{reason="${reason}"}`));
      return line ? Number(line.split(' ').pop()) : 0;
    };
    const socket = netConnect({ host: '127.0.0.1', port: patient.address!.port, localAddress: '127.0.0.1' });
    socket.on('error', () => {});
    await once(socket, 'connect');
    socket.write(encodeProxyV2(AGENT).subarray(0, 20));
    socket.resetAndDestroy();
    await until(async () => (await refusals('truncated')) === 1, 20_000, 'the reset peer to be refused as truncated');
    assert.equal(await refusals('timeout'), 0, 'not counted as a stall');
  } finally {
    await patient.close(200);
  }
});

// Regression: the client behind a connection was found by the balancer's address and port alone;
// one balancer port may hold connections to two of the gateway's addresses at once (a listener on
// 0.0.0.0), and then both sessions took the header read last.
test('two connections from one balancer port to two gateway addresses each keep their own header\'s client', async () => {
  const config = proxiedConfig({ handshake_timeout_ms: 3000 }, { egress: LOOPBACK_EGRESS }, { listen_addr: '0.0.0.0:0' });
  const decisions: Record<string, unknown>[] = [];
  const wide = createGateway(config, { logger: captureLogger(decisions) });
  await wide.listen();
  const port = wide.address!.port;
  const clients = ['198.51.100.23', '203.0.113.9'];
  const sessions: ClientHttp2Session[] = [];
  try {
    // Both headers are read before either TLS handshake; the second connection reuses the first's local port.
    const first = netConnect({ host: '127.0.0.1', port, localAddress: '127.0.0.1' });
    first.on('error', () => {});
    await once(first, 'connect');
    const second = netConnect({ host: '127.0.0.2', port, localAddress: '127.0.0.1', localPort: first.localPort! });
    second.on('error', () => {});
    await once(second, 'connect');
    const sockets = [first, second];
    sockets.forEach((socket, i) => socket.write(encodeProxyV2({ ...AGENT, source: { address: clients[i]!, port: 40000 + i } })));
    // Loopback delivers both at once; the count itself would not show whose header was lost.
    await sleep(300);
    for (const socket of sockets) {
      const session = h2connect(`https://localhost:${port}`, {
        createConnection: () => tlsConnect({ socket, servername: 'localhost', ca: world.tls.caPem, cert: agent.certPem, key: agent.privateKeyPem, ALPNProtocols: ['h2'] }),
      });
      session.on('error', () => {});
      await once(session, 'connect');
      sessions.push(session);
    }
    for (const [i, session] of sessions.entries()) {
      const before = decisions.length;
      await tunnelWorks(session);
      await until(() => decisions.slice(before).some((l) => l.event === 'connect_decision'), 3000, 'the decision logged');
      assert.equal(decisions.slice(before).find((l) => l.event === 'connect_decision')?.client_address, clients[i], `session ${i}`);
    }
  } finally {
    for (const session of sessions) session.destroy();
    await wide.close(200);
  }
});

test('max_connections counts connections whose header is still pending: past it they are refused at accept, and served again once the stalled ones are reaped', async () => {
  const config = proxiedConfig({ handshake_timeout_ms: 1500, max_connections: 5 }, { egress: LOOPBACK_EGRESS });
  const capped = createGateway(config, { logger: captureLogger([]) });
  await capped.listen();
  const port = capped.address!.port;
  const open = async (bytes: Buffer) => {
    const socket = netConnect({ host: '127.0.0.1', port, localAddress: '127.0.0.1' });
    socket.on('error', () => {});
    await once(socket, 'connect');
    socket.write(bytes);
    return socket;
  };
  try {
    // One byte of a header each: the whole cap, held until the handshake deadline.
    const stalls = await Promise.all(Array.from({ length: 5 }, () => open(encodeProxyV2(AGENT).subarray(0, 1))));
    await sleep(100);
    const extra = await open(encodeProxyV2(AGENT));
    const startedAt = performance.now();
    await refused(extra);
    assert.ok(performance.now() - startedAt < 500, 'the sixth is closed at accept, not at a deadline');
    await Promise.all(stalls.map(refused));
    const session = h2connect(`https://localhost:${port}`, {
      createConnection: () => tlsConnect({ socket: netConnect({ host: '127.0.0.1', port, localAddress: '127.0.0.1' }).on('connect', function (this: Socket) { this.write(encodeProxyV2(AGENT)); }), servername: 'localhost', ca: world.tls.caPem, cert: agent.certPem, key: agent.privateKeyPem, ALPNProtocols: ['h2'] }),
    });
    session.on('error', () => {});
    await once(session, 'connect');
    await tunnelWorks(session);
    session.destroy();
  } finally {
    await capped.close(200);
  }
});
