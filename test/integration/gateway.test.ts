import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { ClientHttp2Session } from 'node:http2';
import * as x509 from '../../registry/x509.js';
import { pino } from 'pino';
import { parseConfig } from '../../gateway/src/config.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { encodeIdentityExtensionValue } from '../../registry/identity.js';
import { SCHEMA_VERSION } from '../../registry/queries.js';
import { permissionFields, signPermission } from '../../registry/signing.js';
import { insertPermission } from '../../registry/store.js';
import { closedPort, exchange, gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, newP256Key, TEST_OID, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { until } from '../helpers/wait.js';
import { captureLogger } from '../helpers/logs.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { createDatabase, MIGRATIONS_DIR, testServer } from '../helpers/postgres.js';
import { at, DAY, HOUR, RegistryFixture } from '../helpers/registry-fixture.js';

const NOT_AUTHORIZED = 'agent-gateway; error=http_request_denied; details="not_authorized"';
const IDENTITY_INVALID = 'agent-gateway; error=http_request_denied; details="identity_invalid"';

let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;
let tls: ServerTls;
let echoAuthority: string;
let gateway: Gateway;
let fixture: RegistryFixture;
let alice: Awaited<ReturnType<RegistryFixture['principal']>>;
let world: EchoRegistry;
const logLines: Record<string, unknown>[] = [];
const sessions: ClientHttp2Session[] = [];

function gatewayConfig(overrides: Record<string, unknown> = {}) {
  return parseConfig({
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: tls.certPath, tls_key_path: tls.keyPath, shutdown_grace_ms: 2000 },
    policy: { client_ext_oid: TEST_OID, database_url: databaseUrl, connect_timeout_ms: 2000, pool_acquire_timeout_ms: 5000, query_timeout_ms: 5000 },
    observability: { log_level: 'info' },
    // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
    egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
    admin: { listen_addr: '127.0.0.1:0' },
    ...overrides,
  });
}

async function sessionFor(client: Partial<ClientCredentials>): Promise<ClientHttp2Session> {
  const session = await gatewaySession(gateway.address!.port, { caPem: tls.caPem, ...(client.certPem ? { certPem: client.certPem, privateKeyPem: client.privateKeyPem! } : {}) });
  sessions.push(session);
  return session;
}

/** A client with its own identity, granted `destination` by org-alice unless told otherwise. */
async function grantedClient(identity: string, destination = echoAuthority, options: Parameters<RegistryFixture['permit']>[3] = {}) {
  const client = await clientCredentials({ identity });
  const permissionId = await fixture.permit(alice, { identity, spkiDer: client.spkiDer }, destination, options);
  return { client, permissionId };
}

async function connectStatus(client: Partial<ClientCredentials>, authority = echoAuthority) {
  const session = await sessionFor(client);
  const response = await request(session, authority);
  response.stream.close();
  return response;
}

before(async () => {
  world = await startEchoRegistry();
  ({ pgServer, databaseUrl, tls, echoAuthority, fixture, alice } = world);
  gateway = createGateway(gatewayConfig(), { logger: captureLogger(logLines) });
  await gateway.listen();
});

after(async () => {
  for (const session of sessions) session.destroy();
  await gateway?.close(500);
  await world?.close();
});

describe('allowed CONNECT', () => {
  test('200, then 1 MiB byte-exact both ways with half-close', async () => {
    const { client, permissionId } = await grantedClient('agent-alpha');
    const session = await sessionFor(client);
    const { status, stream } = await request(session, echoAuthority);
    assert.equal(status, 200);
    const payload = randomBytes(1024 * 1024);
    const echoed = await exchange(stream, payload);
    assert.equal(echoed.length, payload.length);
    assert.ok(echoed.equals(payload), 'echoed bytes differ');
    const decision = logLines.find((l) => l.event === 'connect_decision' && l.identity === 'agent-alpha');
    assert.equal(decision?.status, 200);
    assert.equal(decision?.permission_id, permissionId);
    assert.match(String(decision?.spki_fingerprint), /^sha256:[0-9a-f]{64}$/);
    assert.equal(typeof decision?.decision_ms, 'number');
  });

  test('the authority is normalised before the lookup (upper case, default port)', async () => {
    const { client } = await grantedClient('agent-upper', 'echo.example:443');
    await fixture.delegate('org-alice', 'echo.example', { notBefore: at(-DAY) });
    // No [resolve] entry: the registry allows it, and the dial then fails. 502 proves authorization passed.
    const response = await connectStatus(client, 'ECHO.Example');
    assert.equal(response.status, 502);
  });

  test('200 parallel tunnels on one session each carry their own bytes', async () => {
    const { client } = await grantedClient('agent-parallel');
    const session = await sessionFor(client);
    const results = await Promise.all(
      Array.from({ length: 200 }, async (_, i) => {
        const { status, stream } = await request(session, echoAuthority);
        assert.equal(status, 200);
        const payload = Buffer.from(`tunnel ${i} ${randomBytes(16).toString('hex')}`);
        return (await exchange(stream, payload)).equals(payload);
      }),
    );
    assert.equal(results.filter(Boolean).length, 200);
  });

  test('the tunnel close is logged with bytes each way', async () => {
    const closed = logLines.find((l) => l.event === 'tunnel_closed' && l.identity === 'agent-alpha');
    assert.equal(closed?.bytes_up, 1024 * 1024);
    assert.equal(closed?.bytes_down, 1024 * 1024);
  });
});

describe('registry denials are all 403 not_authorized', () => {
  const cases: { name: string; setup: () => Promise<Partial<ClientCredentials>>; reason: string }[] = [
    {
      name: 'no permission row for this identity',
      setup: async () => clientCredentials({ identity: 'agent-nobody' }),
      reason: 'no_permission',
    },
    {
      name: 'wrong identity: the row names another agent',
      setup: async () => {
        const { client } = await grantedClient('agent-right');
        return clientCredentials({ identity: 'agent-wrong', key: client });
      },
      reason: 'no_permission',
    },
    {
      name: 'wrong key: the row names the identity with another key',
      setup: async () => {
        await grantedClient('agent-keyed');
        return clientCredentials({ identity: 'agent-keyed' });
      },
      reason: 'key_mismatch',
    },
    {
      name: 'expired permission',
      setup: async () => (await grantedClient('agent-expired', echoAuthority, { notBefore: at(-2 * DAY), notAfter: at(-DAY) })).client,
      reason: 'permission_expired',
    },
    {
      name: 'permission not yet valid',
      setup: async () => (await grantedClient('agent-future', echoAuthority, { notBefore: at(HOUR), notAfter: at(DAY) })).client,
      reason: 'permission_not_yet_valid',
    },
    {
      name: 'revoked permission',
      setup: async () => {
        const { client, permissionId } = await grantedClient('agent-revoked');
        await fixture.db.query('UPDATE permission_registry SET revoked_at = now() WHERE permission_id = $1', [permissionId]);
        return client;
      },
      reason: 'permission_revoked',
    },
    {
      name: 'revoked principal key',
      setup: async () => {
        const bob = await fixture.principal('org-bob-revoked', { notBefore: at(-DAY) });
        await fixture.delegate(bob.keyId, echoAuthority, { notBefore: at(-DAY) });
        const client = await clientCredentials({ identity: 'agent-bob-revoked' });
        await fixture.permit(bob, { identity: 'agent-bob-revoked', spkiDer: client.spkiDer }, echoAuthority);
        await fixture.db.query('UPDATE principal_signing_keys SET revoked_at = now() WHERE key_id = $1', [bob.keyId]);
        return client;
      },
      reason: 'principal_key_revoked',
    },
    {
      name: 'expired principal key',
      setup: async () => {
        const carol = await fixture.principal('org-carol-expired', { notBefore: at(-2 * DAY), notAfter: at(-HOUR) });
        await fixture.delegate(carol.keyId, echoAuthority, { notBefore: at(-DAY) });
        const client = await clientCredentials({ identity: 'agent-carol' });
        await fixture.permit(carol, { identity: 'agent-carol', spkiDer: client.spkiDer }, echoAuthority);
        return client;
      },
      reason: 'principal_key_expired',
    },
    {
      name: 'missing delegation for the destination',
      setup: async () => {
        const dave = await fixture.principal('org-dave-nodelegation', { notBefore: at(-DAY) });
        const client = await clientCredentials({ identity: 'agent-dave' });
        await fixture.permit(dave, { identity: 'agent-dave', spkiDer: client.spkiDer }, echoAuthority);
        return client;
      },
      reason: 'delegation_missing',
    },
    {
      name: 'revoked delegation',
      setup: async () => {
        const erin = await fixture.principal('org-erin-revokeddelegation', { notBefore: at(-DAY) });
        await fixture.delegate(erin.keyId, echoAuthority, { notBefore: at(-DAY) });
        const client = await clientCredentials({ identity: 'agent-erin' });
        await fixture.permit(erin, { identity: 'agent-erin', spkiDer: client.spkiDer }, echoAuthority);
        await fixture.db.query('UPDATE principal_key_permissions SET revoked_at = now() WHERE signing_key_id = $1', [erin.keyId]);
        return client;
      },
      reason: 'delegation_revoked',
    },
    {
      name: 'a signed field changed after signing',
      setup: async () => {
        const { client, permissionId } = await grantedClient('agent-tampered');
        await fixture.db.query("UPDATE permission_registry SET not_after = not_after + interval '1 day' WHERE permission_id = $1", [permissionId]);
        return client;
      },
      reason: 'signature_invalid',
    },
    {
      name: 'a signature by another key than the named principal',
      setup: async () => {
        const mallory = newP256Key();
        const client = await clientCredentials({ identity: 'agent-forged' });
        const fields = permissionFields({ subjectIdentity: 'agent-forged', subjectPublicKeySpkiDer: client.spkiDer, destination: echoAuthority }, 'org-alice');
        const forged = await signPermission(fields, { keyId: 'org-alice', publicKeySpkiDer: mallory.spkiDer, sign: async (m) => (await import('node:crypto')).sign('sha256', m, { key: mallory.privateKey, dsaEncoding: 'der' }) });
        await insertPermission(fixture.db, forged);
        return client;
      },
      reason: 'signature_invalid',
    },
  ];

  for (const { name, setup, reason } of cases) {
    test(`${name} → 403 (log: ${reason})`, async () => {
      const client = await setup();
      const response = await connectStatus(client);
      assert.equal(response.status, 403);
      assert.equal(response.headers['proxy-status'], NOT_AUTHORIZED);
      const spki = client.spkiDer ? (await import('../../registry/ecdsa.js')).spkiFingerprint(client.spkiDer) : undefined;
      const decision = logLines.findLast((l) => l.event === 'connect_decision' && l.spki_fingerprint === spki);
      assert.equal(decision?.detail, reason);
    });
  }
});

describe('identity extension problems → 403 identity_invalid', () => {
  const utf8 = (s: string) => encodeIdentityExtensionValue(s);
  const cases: { name: string; make: () => Promise<Partial<ClientCredentials>> }[] = [
    { name: 'no client certificate', make: async () => ({}) },
    { name: 'extension missing', make: () => clientCredentials({}) },
    { name: 'PrintableString instead of UTF8String', make: () => clientCredentials({ rawIdentityValue: Buffer.from([0x13, 0x05, ...Buffer.from('agent')]) }) },
    { name: 'trailing bytes after the UTF8String', make: () => clientCredentials({ rawIdentityValue: Buffer.concat([utf8('agent-alpha'), Buffer.from([0x00])]) }) },
    { name: 'newline inside the identity', make: () => clientCredentials({ rawIdentityValue: Buffer.from([0x0c, 0x0d, ...Buffer.from('agent\nalpha!!')]) }) },
    { name: 'empty UTF8String', make: () => clientCredentials({ rawIdentityValue: Buffer.from([0x0c, 0x00]) }) },
    { name: 'invalid UTF-8', make: () => clientCredentials({ rawIdentityValue: Buffer.from([0x0c, 0x02, 0xc3, 0x28]) }) },
    { name: 'over 255 bytes', make: () => clientCredentials({ rawIdentityValue: Buffer.concat([Buffer.from([0x0c, 0x82, 0x01, 0x00]), Buffer.alloc(256, 0x61)]) }) },
    { name: 'C1 control character (U+0085)', make: () => clientCredentials({ rawIdentityValue: Buffer.from([0x0c, 0x07, ...Buffer.from('agent\u0085', 'utf8')]) }) },
    { name: 'DEL inside the identity', make: () => clientCredentials({ rawIdentityValue: Buffer.from([0x0c, 0x06, ...Buffer.from('agent\u007f')]) }) },
    // DESIGN §3: the extension is non-critical; a critical one is refused, not trusted.
    { name: 'extension marked critical', make: () => clientCredentials({ extraExtensions: [new x509.Extension(TEST_OID, true, utf8('agent-alpha'))] }) },
    {
      name: 'extension present twice',
      make: () => clientCredentials({ identity: 'agent-alpha', extraExtensions: [new x509.Extension(TEST_OID, false, utf8('agent-alpha'))] }),
    },
  ];
  for (const { name, make } of cases) {
    test(name, async () => {
      const client = await make();
      const response = await connectStatus(client);
      assert.equal(response.status, 403);
      assert.equal(response.headers['proxy-status'], IDENTITY_INVALID);
    });
  }

  test('a valid identity with the granted key still works beside them (no session mix-up)', async () => {
    const { client } = await grantedClient('agent-after-bad');
    assert.equal((await connectStatus(client)).status, 200);
  });
});

describe('request errors', () => {
  let session: ClientHttp2Session;
  before(async () => {
    session = await sessionFor((await grantedClient('agent-requests')).client);
  });

  for (const authority of ['bad_host:443', 'example.com:0', 'example.com:65536', 'example.com:0443', '01.2.3.4:443', '[::ffff:127.0.0.1]:443', 'example.com.:443', '127.1:443']) {
    test(`authority ${JSON.stringify(authority)} → 400`, async () => {
      const { status, headers } = await request(session, authority);
      assert.equal(status, 400);
      assert.equal(headers['proxy-status'], 'agent-gateway; error=http_request_error; details="authority_invalid"');
    });
  }

  // HTTP/2 itself forbids userinfo in :authority. The nghttp2 of Node 22 and 24 resets such a stream
  // with PROTOCOL_ERROR before the gateway sees it (Node 20's let it through to our 400); DESIGN §3
  // allows either. The session must survive the reset.
  test('authority "user@example.com:443" → 400, or a PROTOCOL_ERROR reset by the HTTP/2 layer', async () => {
    const outcome = await request(session, 'user@example.com:443').catch((error: unknown) => error);
    if (outcome instanceof Error) {
      assert.equal((outcome as NodeJS.ErrnoException).code, 'ERR_HTTP2_STREAM_ERROR');
      assert.match(outcome.message, /NGHTTP2_PROTOCOL_ERROR/);
    } else {
      const { status, headers } = outcome as Awaited<ReturnType<typeof request>>;
      assert.equal(status, 400);
      assert.equal(headers['proxy-status'], 'agent-gateway; error=http_request_error; details="authority_invalid"');
    }
    assert.equal(session.destroyed, false);
    assert.equal((await request(session, 'bad_host:443')).status, 400);
  });

  for (const method of ['GET', 'POST', 'PUT', 'HEAD', 'OPTIONS', 'DELETE']) {
    test(`${method} → 405 with allow: CONNECT`, async () => {
      const { status, headers } = await request(session, echoAuthority, method);
      assert.equal(status, 405);
      assert.equal(headers.allow, 'CONNECT');
      assert.equal(headers['proxy-status'], 'agent-gateway; error=http_request_error; details="method_not_allowed"');
    });
  }

  test('a method other than CONNECT is refused before the authority and the identity are looked at (405 beats 400 and 403)', async () => {
    // A certificate without the identity extension, and no certificate at all.
    for (const client of [await clientCredentials({}), {}]) {
      const { status, headers } = await request(await sessionFor(client), 'bad_host:443', 'GET');
      assert.equal(status, 405);
      assert.equal(headers['proxy-status'], 'agent-gateway; error=http_request_error; details="method_not_allowed"');
    }
  });

  test('a malformed authority is refused before the identity is looked at (400 beats 403)', async () => {
    const { status } = await connectStatus(await clientCredentials({}), 'bad_host:443');
    assert.equal(status, 400);
  });

  test('closed destination port → 502 connection_refused', async () => {
    const port = await closedPort();
    const { client } = await grantedClient('agent-closed', `127.0.0.1:${port}`);
    await fixture.delegate('org-alice', `127.0.0.1:${port}`, { notBefore: at(-DAY) });
    const response = await connectStatus(client, `127.0.0.1:${port}`);
    assert.equal(response.status, 502);
    assert.equal(response.headers['proxy-status'], 'agent-gateway; error=connection_refused; details="dial_failed"');
  });
});

describe('registry outage', () => {
  test('PostgreSQL stopped → 503 registry_unavailable; restarted → 200 without restarting the gateway', { skip: !pgServer?.cluster && process.env.TEST_DATABASE_URL ? 'needs the throwaway cluster' : false }, async () => {
    const { client } = await grantedClient('agent-outage');
    assert.equal((await connectStatus(client)).status, 200);
    pgServer.cluster!.stopServer();
    try {
      // The allowed decision is cached; once the change feed is lost it is no longer served.
      await until(() => !gateway.feed.confirmed, 5000, 'the change feed to be lost');
      const down = await connectStatus(client);
      assert.equal(down.status, 503);
      assert.equal(down.headers['proxy-status'], 'agent-gateway; error=proxy_internal_error; details="registry_unavailable"');
    } finally {
      pgServer.cluster!.startServer();
    }
    assert.equal((await connectStatus(client)).status, 200);
  });
});

describe('start-up checks', () => {
  test('a database at a newer schema version → listen() refuses and says the gateway is older (review regression: no hint, while an older one is told to migrate)', async () => {
    const url = await createDatabase(pgServer.url);
    const db = await RegistryFixture.connect(url);
    for (const newer of [SCHEMA_VERSION + 1, 999]) {
      await db.db.query('UPDATE schema_version SET version = $1', [newer]);
      const other = createGateway(parseConfig({ ...rawConfig(url) }), { logger: pino({ level: 'silent' }) });
      await assert.rejects(other.listen(), {
        code: 'ERR_SCHEMA_VERSION',
        message: new RegExp(`schema version is ${newer}, this gateway needs ${SCHEMA_VERSION} \\(this gateway is older than the registry's schema: upgrade the gateway .*, or restore the database this gateway was built for\\)$`),
      });
      await other.close(0);
    }
    await db.close();
  });

  test('a database at schema version 1 or 2 (before 0003, no key_attestations) → listen() refuses and says to migrate', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', url, '-f', join(MIGRATIONS_DIR, '0001_signed_authorization_registry.sql')]);
    const other = createGateway(parseConfig(rawConfig(url)), { logger: pino({ level: 'silent' }) });
    await assert.rejects(other.listen(), { code: 'ERR_SCHEMA_VERSION', message: new RegExp(`schema version is 1, this gateway needs ${SCHEMA_VERSION} \\(run \`agent-gateway-registry migrate\``) });
    await other.close(0);
    execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', url, '-f', join(MIGRATIONS_DIR, '0002_registry_change_feed.sql')]);
    const atTwo = createGateway(parseConfig(rawConfig(url)), { logger: pino({ level: 'silent' }) });
    await assert.rejects(atTwo.listen(), { code: 'ERR_SCHEMA_VERSION', message: new RegExp(`schema version is 2, this gateway needs ${SCHEMA_VERSION} \\(run \`agent-gateway-registry migrate\``) });
    await atTwo.close(0);
  });

  test('an unmigrated database → listen() refuses and says to migrate', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    const other = createGateway(parseConfig(rawConfig(url)), { logger: pino({ level: 'silent' }) });
    await assert.rejects(other.listen(), { code: 'ERR_SCHEMA_VERSION', message: /not migrated/ });
    await other.close(0);
  });

  test('an unreachable database → listen() gives up after connect_timeout_ms', async () => {
    const port = await closedPort();
    const config = rawConfig(`postgres://postgres@127.0.0.1:${port}/none`);
    config.policy.connect_timeout_ms = 300;
    const other = createGateway(parseConfig(config), { logger: pino({ level: 'silent' }) });
    const started = Date.now();
    await assert.rejects(other.listen(), { code: 'ERR_REGISTRY_UNAVAILABLE', message: /within connect_timeout_ms=300/ });
    assert.ok(Date.now() - started < 5000);
    await other.close(0);
  });
});

function rawConfig(url: string) {
  return {
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: tls.certPath, tls_key_path: tls.keyPath },
    policy: { client_ext_oid: TEST_OID, database_url: url, connect_timeout_ms: 2000 },
    observability: { log_level: 'info' },
    // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
    egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
    admin: { listen_addr: '127.0.0.1:0' },
  };
}
