import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { SCHEMA_VERSION } from '../../registry/queries.js';
import { createDatabase, MIGRATIONS_DIR, testServer } from '../helpers/postgres.js';

const FILE = join(MIGRATIONS_DIR, '0001_signed_authorization_registry.sql');
const FEED_FILE = join(MIGRATIONS_DIR, '0002_registry_change_feed.sql');
const ATTESTATION_FILE = join(MIGRATIONS_DIR, '0003_key_attestations.sql');
const CLIENT_ADDRESS_FILE = join(MIGRATIONS_DIR, '0004_audit_client_address.sql');
let pgServer: Awaited<ReturnType<typeof testServer>>;
before(async () => {
  pgServer = await testServer();
});
after(() => pgServer?.close());

function psql(url: string, file = FILE) {
  return spawnSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', url, '-f', file], { encoding: 'utf8' });
}

async function snapshot(url: string) {
  const db = new pg.Client({ connectionString: url });
  await db.connect();
  try {
    const tables = await db.query(`SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1`);
    const versions = await db.query('SELECT version FROM schema_version');
    return { tables: tables.rows.map((r) => r.table_name), versions: versions.rows.map((r) => r.version) };
  } finally {
    await db.end();
  }
}

test('0001, 0002, 0003 then 0004 apply to an empty database with psql -v ON_ERROR_STOP=1, at the version this build needs', async () => {
  const url = await createDatabase(pgServer.url, { migrate: false });
  const first = psql(url);
  assert.equal(first.status, 0, first.stderr);
  assert.deepEqual(await snapshot(url), {
    tables: ['audit_log', 'permission_registry', 'principal_key_permissions', 'principal_signing_keys', 'schema_version'],
    versions: [1],
  });
  const second = psql(url, FEED_FILE);
  assert.equal(second.status, 0, second.stderr);
  assert.deepEqual(await snapshot(url), {
    tables: ['audit_log', 'permission_registry', 'principal_key_permissions', 'principal_signing_keys', 'registry_changes', 'schema_version'],
    versions: [2],
  });
  const third = psql(url, ATTESTATION_FILE);
  assert.equal(third.status, 0, third.stderr);
  assert.deepEqual(await snapshot(url), {
    tables: ['attestation_challenges', 'audit_log', 'key_attestations', 'permission_registry', 'principal_key_permissions', 'principal_signing_keys', 'registry_changes', 'schema_version'],
    versions: [3],
  });
  const again = psql(url, ATTESTATION_FILE);
  assert.notEqual(again.status, 0, 'a second application fails and changes nothing');
  assert.deepEqual((await snapshot(url)).versions, [3]);
  const fourth = psql(url, CLIENT_ADDRESS_FILE);
  assert.equal(fourth.status, 0, fourth.stderr);
  assert.deepEqual((await snapshot(url)).versions, [SCHEMA_VERSION]);
  assert.equal(SCHEMA_VERSION, 4);
  assert.notEqual(psql(url, CLIENT_ADDRESS_FILE).status, 0, 'a second application of 0004 fails too');
  const db = new pg.Client({ connectionString: url });
  await db.connect();
  try {
    const columns = await db.query(`SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'audit_log' AND column_name LIKE 'client_%' ORDER BY 1`);
    assert.deepEqual(columns.rows, [{ column_name: 'client_address', data_type: 'text' }, { column_name: 'client_port', data_type: 'integer' }]);
  } finally {
    await db.end();
  }
});

test('0002: every registry write advances the change counter once per statement and notifies, at commit', async () => {
  const url = await createDatabase(pgServer.url);
  const writer = new pg.Client({ connectionString: url });
  const listener = new pg.Client({ connectionString: url });
  await writer.connect();
  await listener.connect();
  const notes: string[] = [];
  listener.on('notification', (n) => notes.push(`${n.channel} ${n.payload}`));
  await listener.query('LISTEN agent_gateway_registry');
  const counter = async () => Number((await writer.query('SELECT counter FROM registry_changes')).rows[0].counter);
  try {
    assert.equal(await counter(), 0);
    await writer.query('BEGIN');
    await writer.query(`INSERT INTO principal_signing_keys (key_id, algorithm, public_key_spki_der, not_before) VALUES ('k1', 'ecdsa-p256-sha256', '\\x01', now()), ('k2', 'ecdsa-p256-sha256', '\\x01', now())`);
    await writer.query(`INSERT INTO principal_key_permissions (signing_key_id, destination, not_before) VALUES ('k1', 'a:443', now())`);
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.deepEqual(notes, [], 'nothing is announced before commit');
    await writer.query('COMMIT');
    await writer.query(`UPDATE principal_key_permissions SET revoked_at = now()`);
    await writer.query(`UPDATE permission_registry SET revoked_at = now() WHERE false`);
    await new Promise((resolve) => setTimeout(resolve, 200));
    assert.equal(await counter(), 4, 'one per statement, however many rows (even none)');
    assert.deepEqual(notes, [
      'agent_gateway_registry {"counter" : 1, "table" : "principal_signing_keys"}',
      'agent_gateway_registry {"counter" : 2, "table" : "principal_key_permissions"}',
      'agent_gateway_registry {"counter" : 3, "table" : "principal_key_permissions"}',
      'agent_gateway_registry {"counter" : 4, "table" : "permission_registry"}',
    ]);
  } finally {
    await writer.end();
    await listener.end();
  }
});

test('the audit log is indexed for its filters and insert-only for the auditor role', async () => {
  const url = await createDatabase(pgServer.url);
  const db = new pg.Client({ connectionString: url });
  await db.connect();
  try {
    const indexes = (await db.query(`SELECT indexdef FROM pg_indexes WHERE tablename = 'audit_log' ORDER BY indexname`)).rows.map((r) => r.indexdef);
    for (const columns of ['(at)', '(identity, at)', '(destination, at)', '(status, at)']) {
      assert.ok(indexes.some((d: string) => d.endsWith(columns)), `an index on ${columns}`);
    }
    const grants = await db.query(
      `SELECT privilege_type FROM information_schema.role_table_grants WHERE grantee = 'agent_gateway_auditor' AND table_name = 'audit_log' ORDER BY 1`,
    );
    assert.deepEqual(grants.rows.map((r) => r.privilege_type), ['INSERT']);
    const role = await db.query(`SELECT rolcanlogin FROM pg_roles WHERE rolname = 'agent_gateway_auditor'`);
    assert.equal(role.rows[0]?.rolcanlogin, false);
    const sequence = await db.query(`SELECT has_sequence_privilege('agent_gateway_auditor', 'audit_log_id_seq', 'USAGE') AS usage`);
    assert.equal(sequence.rows[0]?.usage, true);
  } finally {
    await db.end();
  }
});

test('applying 0001 twice fails loudly and changes nothing', async () => {
  const url = await createDatabase(pgServer.url, { migrate: false });
  assert.equal(psql(url).status, 0);
  const before = await snapshot(url);
  const second = psql(url);
  assert.notEqual(second.status, 0);
  assert.match(second.stderr, /already exists/);
  assert.deepEqual(await snapshot(url), before);
});

test('the schema refuses rows that break its checks', async () => {
  const url = await createDatabase(pgServer.url);
  const db = new pg.Client({ connectionString: url });
  await db.connect();
  try {
    await assert.rejects(db.query(`INSERT INTO principal_signing_keys (key_id, algorithm, public_key_spki_der, not_before) VALUES ('k', 'rsa', '\\x01', now())`), /check constraint/);
    await assert.rejects(
      db.query(`INSERT INTO principal_key_permissions (signing_key_id, destination, not_before) VALUES ('missing', 'a:443', now())`),
      /foreign key/,
    );
    const plan = await db.query(`EXPLAIN SELECT * FROM permission_registry WHERE subject_identity = 'a' AND destination = 'b:443'`);
    assert.ok(plan.rows.length > 0);
    const index = await db.query(`SELECT indexdef FROM pg_indexes WHERE indexname = 'permission_registry_lookup'`);
    assert.match(index.rows[0].indexdef, /\(subject_identity, destination\)/);
  } finally {
    await db.end();
  }
});
