/**
 * The audit trail: one audit_log row per CONNECT decision and one per tunnel close, written in
 * batches by the gateway; an audit database that fails never blocks a CONNECT; the insert-only
 * role; the query builder the registry CLI uses, run against real rows.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { ClientHttp2Session } from 'node:http2';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { pino } from 'pino';
import { parseConfig } from '../../gateway/src/config.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { buildAuditQuery } from '../../registry/audit-query.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { closedPort, exchange, gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, TEST_OID, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
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

function rawConfig(audit: Record<string, unknown> = {}, policy: Record<string, unknown> = {}) {
  return {
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: tls.certPath, tls_key_path: tls.keyPath, shutdown_grace_ms: 500 },
    policy: { client_ext_oid: TEST_OID, database_url: databaseUrl, connect_timeout_ms: 2000, ...policy },
    observability: { log_level: 'info' },
    // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
    egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
    admin: { listen_addr: '127.0.0.1:0', process_metrics: false },
    audit: { flush_interval_ms: 50, ...audit },
  };
}

async function startGateway(config: ReturnType<typeof rawConfig>): Promise<Gateway> {
  const gateway = createGateway(parseConfig(config), { logger: pino({ level: 'silent' }) });
  gateways.push(gateway);
  await gateway.listen();
  return gateway;
}

async function sessionTo(gateway: Gateway, client: Partial<ClientCredentials>): Promise<ClientHttp2Session> {
  const session = await gatewaySession(gateway.address!.port, { caPem: tls.caPem, ...(client.certPem ? { certPem: client.certPem, privateKeyPem: client.privateKeyPem! } : {}) });
  sessions.push(session);
  return session;
}

async function status(session: ClientHttp2Session, authority: string, method = 'CONNECT', headers: Record<string, string> = {}): Promise<number> {
  const response = await request(session, authority, method, headers);
  response.stream.close();
  return response.status;
}

async function auditRows(filter: Parameters<typeof buildAuditQuery>[0]) {
  const query = buildAuditQuery(filter);
  return (await fixture.db.query(query.text, query.values)).rows as Record<string, unknown>[];
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

describe('audit rows', () => {
  test('a scripted run leaves one row per decision and one per tunnel close, with the decision details', async () => {
    const startedAt = new Date(Date.now() - 1000);
    const gateway = await startGateway(rawConfig());
    const agent = await clientCredentials({ identity: 'agent-audited' });
    const permissionId = await fixture.permit(alice, { identity: 'agent-audited', spkiDer: agent.spkiDer }, echoAuthority);
    const fingerprint = spkiFingerprint(agent.spkiDer);
    const session = await sessionTo(gateway, agent);
    const traceId = randomBytes(16).toString('hex');

    // 200 with bytes both ways, then closed.
    const tunnel = await request(session, echoAuthority, 'CONNECT', { traceparent: `00-${traceId}-${randomBytes(8).toString('hex')}-01` });
    assert.equal(tunnel.status, 200);
    const payload = randomBytes(3000);
    assert.ok((await exchange(tunnel.stream, payload)).equals(payload));
    // 403: this agent has no permission for the closed port's destination.
    const port = await closedPort();
    assert.equal(await status(session, `127.0.0.1:${port}`), 403);
    // 502: granted, but nobody listens.
    await fixture.delegate('org-alice', `127.0.0.1:${port}`, { notBefore: at(-DAY) });
    const dialPermission = await fixture.permit(alice, { identity: 'agent-audited', spkiDer: agent.spkiDer }, `127.0.0.1:${port}`);
    assert.equal(await status(session, `127.0.0.1:${port}`), 502);
    // 400, 405, and 403 identity_invalid from a client without the extension.
    assert.equal(await status(session, 'bad_host:443'), 400);
    assert.equal(await status(session, echoAuthority, 'GET'), 405);
    assert.equal(await status(await sessionTo(gateway, await clientCredentials({})), echoAuthority), 403);
    await until(() => gateway.openTunnels === 0);
    await until(async () => {
      await gateway.audit!.flush();
      return gateway.audit!.stats.written >= 7;
    }, 5000, 'audit rows to be written');

    const rows = (await auditRows({ since: startedAt, limit: 100 })).reverse();
    const summary = rows.map((r) => [r.status, r.reason, r.identity, r.destination]);
    assert.deepEqual(summary, [
      [200, 'allowed', 'agent-audited', echoAuthority],
      [200, 'tunnel_closed', 'agent-audited', echoAuthority],
      [403, 'not_authorized', 'agent-audited', `127.0.0.1:${port}`],
      [502, 'dial_failed', 'agent-audited', `127.0.0.1:${port}`],
      [400, 'authority_invalid', 'agent-audited', null],
      [405, 'method_not_allowed', 'agent-audited', null],
      [403, 'identity_invalid', null, echoAuthority],
    ]);
    const [allowed, closed, denied, dialFailed, badAuthority, badMethod] = rows;
    assert.equal(allowed!.permission_id, permissionId);
    assert.equal(allowed!.spki_fingerprint, fingerprint);
    assert.equal(allowed!.trace_id, traceId);
    assert.equal(allowed!.authority, echoAuthority);
    assert.equal(allowed!.bytes_up, null);
    assert.equal(closed!.permission_id, permissionId);
    assert.equal(closed!.connect_id, allowed!.connect_id, 'the close row joins its decision row');
    assert.equal(closed!.trace_id, traceId);
    assert.equal(Number(closed!.bytes_up), 3000);
    assert.equal(Number(closed!.bytes_down), 3000);
    assert.ok(Number(closed!.duration_ms) > 0);
    assert.equal(denied!.detail, 'no_permission');
    assert.equal(denied!.permission_id, null);
    assert.equal(dialFailed!.permission_id, dialPermission);
    assert.match(String(dialFailed!.detail), /^connection_refused/);
    assert.equal(badAuthority!.authority, 'bad_host:443');
    assert.match(String(badAuthority!.detail), /.+/);
    assert.equal(badMethod!.detail, 'method GET');
    assert.match(String(allowed!.at), /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$/);

    // The query builder's filters, against these rows.
    assert.equal((await auditRows({ identity: 'agent-audited', status: 403 })).length, 1);
    assert.equal((await auditRows({ destination: echoAuthority, since: startedAt })).length, 3);
    assert.equal((await auditRows({ reason: 'tunnel_closed', identity: 'agent-audited' }))[0]!.connect_id, allowed!.connect_id);
    assert.equal((await auditRows({ traceId: traceId.toUpperCase() })).length, 2);
    assert.equal((await auditRows({ permissionId })).length, 2);
    assert.equal((await auditRows({ since: new Date(Date.now() + 60_000) })).length, 0);
    assert.equal((await auditRows({ until: startedAt })).length, 0);
    const newest = await auditRows({ since: startedAt, limit: 2 });
    assert.deepEqual(newest.map((r) => r.reason), ['identity_invalid', 'method_not_allowed'], 'newest first');

    const scraped = await (await fetch(`http://127.0.0.1:${gateway.adminAddress!.port}/metrics`)).text();
    assert.match(scraped, /^agent_gateway_audit_rows_written_total 7$/m);
    assert.match(scraped, /^agent_gateway_audit_rows_dropped_total\{reason="queue_full"\} 0$/m);
    assert.match(scraped, /^agent_gateway_audit_queue_rows 0$/m);
    assert.match(scraped, /^agent_gateway_db_pool_connections\{pool="audit"\} \d+$/m);
  });

  test('close() flushes what is queued', async () => {
    const gateway = await startGateway(rawConfig({ flush_interval_ms: 60_000, batch_size: 1000 }));
    const session = await sessionTo(gateway, await clientCredentials({ identity: 'agent-flushed-on-close' }));
    for (let i = 0; i < 5; i++) assert.equal(await status(session, echoAuthority), 403);
    assert.equal(gateway.audit!.stats.written, 0, 'nothing written before the timer or a full batch');
    session.destroy();
    await gateway.close(100);
    assert.equal((await auditRows({ identity: 'agent-flushed-on-close' })).length, 5);
  });

  // The batch travels as one JSON parameter (registry/audit-query.ts): a value JSON or text cannot
  // carry must be made safe before it joins a batch, or it would fail every row written with it.
  test('values a client controls (a lone surrogate, NUL, quotes, backslashes, newlines, 2 KB) are written, and the rest of the batch with them', async () => {
    const gateway = await startGateway(rawConfig({ flush_interval_ms: 60_000, batch_size: 1000 }));
    const audit = gateway.audit!;
    const hostile = `lone \ud800 surrogate, NUL \0, "quotes", back\\slash, new\nline, ${'x'.repeat(2000)}`;
    const tag = `agent-hostile-${randomBytes(4).toString('hex')}`;
    audit.record({ identity: tag, authority: hostile, status: 400, reason: 'authority_invalid', detail: hostile, connect_id: 'hostile-1' });
    audit.record({ identity: tag, authority: 'plain.example:443', status: 403, reason: 'not_authorized', connect_id: 'hostile-2' });
    await audit.flush();
    const rows = await auditRows({ identity: tag });
    assert.deepEqual(rows.map((row) => row.connect_id).sort(), ['hostile-1', 'hostile-2'], 'both rows written');
    const written = rows.find((row) => row.connect_id === 'hostile-1')!;
    assert.equal(written.detail, hostile.slice(0, 1024).toWellFormed().replace('\0', '\uFFFD'), 'made safe, cut at 1,024 characters, otherwise as sent');
    assert.equal(written.authority, written.detail);
  });

  test('[audit] enabled = false writes nothing', async () => {
    const gateway = await startGateway(rawConfig({ enabled: false }));
    assert.equal(gateway.audit, undefined);
    const session = await sessionTo(gateway, await clientCredentials({ identity: 'agent-unaudited' }));
    assert.equal(await status(session, echoAuthority), 403);
    await sleep(150);
    assert.equal((await auditRows({ identity: 'agent-unaudited' })).length, 0);
  });
});

describe('audit failures never block a CONNECT', () => {
  test('an unreachable audit database: CONNECTs still get 200 promptly; rows are counted as dropped', async () => {
    const deadPort = await closedPort();
    const gateway = await startGateway(rawConfig({ database_url: `postgres://postgres@127.0.0.1:${deadPort}/none`, batch_size: 1, queue_size: 3, write_timeout_ms: 300 }));
    const { client } = await (async () => {
      const c = await clientCredentials({ identity: 'agent-audit-down' });
      await fixture.permit(alice, { identity: 'agent-audit-down', spkiDer: c.spkiDer }, echoAuthority);
      return { client: c };
    })();
    const session = await sessionTo(gateway, client);
    const started = performance.now();
    for (let i = 0; i < 10; i++) {
      const response = await request(session, echoAuthority);
      assert.equal(response.status, 200);
      assert.ok((await exchange(response.stream, Buffer.from(`n${i}`))).equals(Buffer.from(`n${i}`)));
    }
    const elapsed = performance.now() - started;
    assert.ok(elapsed < 3000, `10 tunnels took ${Math.round(elapsed)} ms with the audit database down`);
    await until(() => gateway.openTunnels === 0);
    await until(() => gateway.audit!.stats.dropped.queue_full > 0, 5000, 'queue_full drops');
    const stats = gateway.audit!.stats;
    assert.equal(stats.written, 0);
    assert.ok(stats.queued <= 3, 'the queue stays bounded');
    const scraped = await (await fetch(`http://127.0.0.1:${gateway.adminAddress!.port}/metrics`)).text();
    const dropped = Number(/^agent_gateway_audit_rows_dropped_total\{reason="queue_full"\} (\d+)$/m.exec(scraped)?.[1]);
    assert.ok(dropped > 0 && dropped <= 20, `dropped ${dropped}`);
    // close() gives up on the rest within write_timeout_ms and counts them.
    const closing = performance.now();
    session.destroy();
    await gateway.close(100);
    assert.ok(performance.now() - closing < 3000);
    assert.ok(gateway.audit!.stats.dropped.shutdown + gateway.audit!.stats.dropped.write_failed > 0);
  });

  test('the audit database going away mid-run: CONNECTs keep working, writes resume when it returns', { skip: process.env.TEST_DATABASE_URL ? 'needs the throwaway cluster' : false }, async () => {
    // The registry and the audit log share this cluster: stop it only between CONNECTs, and
    // check that rows queued while it was down are written once it is back.
    const gateway = await startGateway(rawConfig({ write_timeout_ms: 500 }));
    const session = await sessionTo(gateway, await clientCredentials({ identity: 'agent-audit-outage' }));
    assert.equal(await status(session, echoAuthority), 403);
    await gateway.audit!.flush();
    pgServer.cluster!.stopServer();
    try {
      // The registry is down too: 503, answered and audited (queued) without waiting on the audit pool.
      assert.equal(await status(session, echoAuthority), 503);
      await gateway.audit!.flush();
      assert.ok(gateway.audit!.stats.queued >= 1, 'the row waits in the queue');
    } finally {
      pgServer.cluster!.startServer();
    }
    await until(async () => {
      await gateway.audit!.flush();
      return (await auditRows({ identity: 'agent-audit-outage' })).length === 2;
    }, 15_000, 'queued rows to be written after the outage');
    assert.deepEqual((await auditRows({ identity: 'agent-audit-outage' })).map((r) => r.status), [503, 403]);
  });
});

describe('roles', () => {
  test('a login role in agent_gateway_reader + agent_gateway_auditor runs the gateway and can only INSERT audit rows', async () => {
    const role = `agw_runtime_${process.pid}_${randomBytes(3).toString('hex')}`;
    await fixture.db.query(`CREATE ROLE ${role} LOGIN PASSWORD 'runtime-secret' IN ROLE agent_gateway_reader, agent_gateway_auditor`);
    const url = new URL(databaseUrl);
    url.username = role;
    url.password = 'runtime-secret';
    try {
      const gateway = await startGateway(rawConfig({}, { database_url: url.toString() }));
      const session = await sessionTo(gateway, await clientCredentials({ identity: 'agent-least-privilege' }));
      assert.equal(await status(session, echoAuthority), 403);
      await until(async () => {
        await gateway.audit!.flush();
        return gateway.audit!.stats.written === 1;
      }, 5000, 'the row written by the least-privilege role');
      const runtime = new pg.Client({ connectionString: url.toString() });
      await runtime.connect();
      try {
        await assert.rejects(runtime.query('SELECT * FROM audit_log'), /permission denied/);
        await assert.rejects(runtime.query("UPDATE audit_log SET reason = 'allowed'"), /permission denied/);
        await assert.rejects(runtime.query('DELETE FROM audit_log'), /permission denied/);
        await assert.rejects(runtime.query("INSERT INTO permission_registry (permission_id) VALUES ('x')"), /permission denied/);
        await runtime.query("INSERT INTO audit_log (status, reason) VALUES (403, 'manual')");
      } finally {
        await runtime.end();
      }
      assert.equal((await auditRows({ identity: 'agent-least-privilege' }))[0]?.reason, 'not_authorized');
      session.destroy();
      await gateway.close(100);
    } finally {
      await fixture.db.query(`DROP OWNED BY ${role}`).catch(() => {});
      await fixture.db.query(`DROP ROLE ${role}`).catch(() => {});
    }
  });
});
