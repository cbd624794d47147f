import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { appendFileSync, copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { SCHEMA_VERSION } from '../../registry/queries.js';
import { MigrationError } from '../../registry-cli/src/errors.js';
import { baselineFor, planMigrations, type MigrationFile } from '../../registry-cli/src/migration-plan.js';
import { applyMigrations, createDatabase, MIGRATIONS_DIR, testServer } from '../helpers/postgres.js';
import { describeRun, runCli, runInProcess } from './run-cli.js';

const FIRST = '0001_signed_authorization_registry.sql';
/** The repository's migrations, whatever number they have reached; test-only files are numbered 01xx after them. */
const ALL = readdirSync(MIGRATIONS_DIR).filter((f) => /^\d{4}_.*\.sql$/.test(f)).sort();
let pgServer: Awaited<ReturnType<typeof testServer>>;
const scratch = mkdtempSync(join(tmpdir(), 'agw-migrate-'));

before(async () => {
  pgServer = await testServer();
  // The group roles are cluster-wide and 0001 creates them if missing: the first migration of a
  // fresh cluster runs alone, so the concurrent cases below do not race to create them.
  await createDatabase(pgServer.url);
});
after(() => {
  pgServer?.close();
  rmSync(scratch, { recursive: true, force: true });
});

/** A private copy of migrations/ that a test may edit and extend. */
function migrationsCopy(): string {
  const dir = mkdtempSync(join(scratch, 'migrations-'));
  for (const file of ALL) copyFileSync(join(MIGRATIONS_DIR, file), join(dir, file));
  return dir;
}

function psqlFirstOnly(url: string): void {
  execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', url, '-f', join(MIGRATIONS_DIR, FIRST)], { stdio: ['ignore', 'ignore', 'pipe'] });
}

function envFor(url: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, AGENT_GATEWAY_DATABASE_URL: url };
  delete env.DATABASE_URL;
  return env;
}

async function query<T extends pg.QueryResultRow>(url: string, sql: string): Promise<T[]> {
  const db = new pg.Client({ connectionString: url });
  await db.connect();
  try {
    return (await db.query<T>(sql)).rows;
  } finally {
    await db.end();
  }
}

const history = (url: string) => query<{ filename: string; sha256: string; baseline: boolean }>(url, 'SELECT filename, sha256, baseline FROM schema_migrations ORDER BY filename');
const tables = async (url: string) => (await query<{ t: string }>(url, `SELECT table_name AS t FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1`)).map((r) => r.t);

describe('migrate (real CLI, real PostgreSQL)', { concurrency: 4 }, () => {
  test('applies every migration to an empty database, recording SHA-256s; a second run is a no-op', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    const first = await runCli(['--json', 'migrate'], { env: envFor(url) });
    assert.equal(first.status, 0, describeRun(first));
    assert.deepEqual(first.json.applied, ALL);
    assert.equal(first.json.schema_version, SCHEMA_VERSION);
    const recorded = await history(url);
    assert.deepEqual(recorded.map((r) => r.filename), ALL);
    const sha = createHash('sha256').update(readFileSync(join(MIGRATIONS_DIR, FIRST))).digest('hex');
    assert.equal(recorded[0]!.sha256, sha);
    assert.ok(recorded.every((r) => !r.baseline));

    const second = await runCli(['migrate'], { env: envFor(url) });
    assert.equal(second.status, 0, describeRun(second));
    assert.match(second.stdout, /up to date/);
    assert.deepEqual(await history(url), recorded);
  });

  test('a database migrated with plain psql -f is baselined, not migrated again', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    await applyMigrations(url); // psql -f, every file, as the README used to say
    const run = await runCli(['--json', 'migrate'], { env: envFor(url) });
    assert.equal(run.status, 0, describeRun(run));
    assert.deepEqual(run.json.baselined, ALL);
    assert.deepEqual(run.json.applied, []);
    assert.deepEqual((await history(url)).map((r) => [r.filename, r.baseline]), ALL.map((f) => [f, true]));
    assert.deepEqual(await query(url, 'SELECT version FROM schema_version'), [{ version: SCHEMA_VERSION }]);
    const again = await runCli(['--json', 'migrate'], { env: envFor(url) });
    assert.equal(again.status, 0, describeRun(again));
    assert.deepEqual([again.json.baselined, again.json.applied, again.json.already_applied], [[], [], ALL]);
  });

  test('psql -f of 0001 alone: 0001 is baselined and only the later migrations run', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    psqlFirstOnly(url);
    const run = await runInProcess(['--json', 'migrate'], { env: envFor(url) });
    assert.equal(run.status, 0, describeRun(run));
    assert.deepEqual(run.json.baselined, [FIRST]);
    assert.deepEqual(run.json.applied, ALL.slice(1));
    assert.equal(run.json.schema_version, SCHEMA_VERSION);
  });

  test('a version-2 registry (0001 and 0002 by psql -f) is baselined and gets only the later migrations, to this build\'s version', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    for (const file of ALL.slice(0, 2)) execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', url, '-f', join(MIGRATIONS_DIR, file)], { stdio: ['ignore', 'ignore', 'pipe'] });
    const run = await runInProcess(['--json', 'migrate'], { env: envFor(url) });
    assert.equal(run.status, 0, describeRun(run));
    assert.deepEqual([run.json.baselined, run.json.applied], [ALL.slice(0, 2), ['0003_key_attestations.sql', '0004_audit_client_address.sql']]);
    assert.equal(run.json.schema_version, SCHEMA_VERSION);
    assert.ok((await tables(url)).includes('key_attestations'));
  });

  test('an edited migration is refused (exit 4) and nothing else is applied', async () => {
    const dir = migrationsCopy();
    const url = await createDatabase(pgServer.url, { migrate: false });
    assert.equal((await runInProcess(['migrate', '--dir', dir], { env: envFor(url) })).status, 0);
    appendFileSync(join(dir, FIRST), '\n-- an innocent-looking edit\n');
    writeFileSync(join(dir, '0101_more.sql'), 'CREATE TABLE must_not_exist (id int);');
    const run = await runInProcess(['--json', 'migrate', '--dir', dir], { env: envFor(url) });
    assert.equal(run.status, 4, describeRun(run));
    assert.equal(run.json.error.code, 'ERR_MIGRATION_CHECKSUM');
    assert.match(run.stderr, /0001_signed_authorization_registry\.sql \(recorded sha256 [0-9a-f]{64}, file has [0-9a-f]{64}\)/);
    assert.ok(!(await tables(url)).includes('must_not_exist'));
    assert.equal((await history(url)).length, ALL.length);
  });

  test('a new migration that sorts before an applied one is refused as out of order', async () => {
    const dir = migrationsCopy();
    writeFileSync(join(dir, '0103_later.sql'), 'CREATE TABLE later_table (id int);');
    const url = await createDatabase(pgServer.url, { migrate: false });
    const first = await runInProcess(['--json', 'migrate', '--dir', dir], { env: envFor(url) });
    assert.deepEqual(first.json.applied, [...ALL, '0103_later.sql'], describeRun(first));
    writeFileSync(join(dir, '0102_forgotten.sql'), 'CREATE TABLE forgotten (id int);');
    const run = await runInProcess(['migrate', '--dir', dir], { env: envFor(url) });
    assert.equal(run.status, 4, describeRun(run));
    assert.match(run.stderr, /out of order: 0102_forgotten\.sql sorts before 0103_later\.sql/);
    assert.ok(!(await tables(url)).includes('forgotten'));
  });

  test('a failing migration is rolled back, not recorded, and exits 1; fixed, it applies', async () => {
    const dir = migrationsCopy();
    const url = await createDatabase(pgServer.url, { migrate: false });
    assert.equal((await runInProcess(['migrate', '--dir', dir], { env: envFor(url) })).status, 0);
    writeFileSync(join(dir, '0101_broken.sql'), 'BEGIN;\nCREATE TABLE half_done (id int);\nSELECT no_such_function();\nCOMMIT;\n');
    const run = await runInProcess(['--json', 'migrate', '--dir', dir], { env: envFor(url) });
    assert.equal(run.status, 1, describeRun(run));
    assert.equal(run.json.error.code, 'ERR_MIGRATION_FAILED');
    assert.match(run.json.error.message, /0101_broken\.sql failed and was rolled back: function no_such_function\(\) does not exist/);
    assert.ok(!(await tables(url)).includes('half_done'));
    assert.deepEqual((await history(url)).map((r) => r.filename), ALL);
    writeFileSync(join(dir, '0101_broken.sql'), 'BEGIN;\nCREATE TABLE half_done (id int);\nCOMMIT;\n');
    const fixed = await runInProcess(['--json', 'migrate', '--dir', dir], { env: envFor(url) });
    assert.deepEqual(fixed.json.applied, ['0101_broken.sql'], describeRun(fixed));
  });

  test('two concurrent runs: the advisory lock makes exactly one apply the migrations, both succeed', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    const runs = await Promise.all([runCli(['--json', 'migrate'], { env: envFor(url) }), runCli(['--json', 'migrate'], { env: envFor(url) })]);
    for (const run of runs) assert.equal(run.status, 0, describeRun(run));
    assert.deepEqual(runs.map((r) => r.json.applied.length).sort(), [0, ALL.length]);
    assert.equal((await history(url)).length, ALL.length);
  });

  test('--dry-run writes nothing, not even the history table', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    const run = await runInProcess(['--json', 'migrate', '--dry-run'], { env: envFor(url) });
    assert.equal(run.status, 0, describeRun(run));
    assert.deepEqual(run.json.applied, ALL);
    assert.deepEqual(await tables(url), []);
  });

  test('the database password never reaches the output; no URL is a usage error', async () => {
    const url = new URL(await createDatabase(pgServer.url, { migrate: false }));
    url.password = 'hunter2-secret'; // trust authentication ignores it
    const run = await runCli(['migrate'], { env: envFor(url.toString()) });
    assert.equal(run.status, 0, describeRun(run));
    assert.match(run.stdout, /postgres:redacted@127\.0\.0\.1/);
    assert.ok(!`${run.stdout}${run.stderr}`.includes('hunter2-secret'));

    const refused = new URL(url);
    refused.port = '1'; // nothing listens there
    const down = await runCli(['--json', 'migrate'], { env: envFor(refused.toString()) });
    assert.equal(down.status, 1, describeRun(down));
    assert.equal(down.json.error.code, 'ERR_DATABASE');
    assert.ok(!`${down.stdout}${down.stderr}`.includes('hunter2-secret'));

    const env = envFor('');
    delete env.AGENT_GATEWAY_DATABASE_URL;
    const missing = await runInProcess(['migrate'], { env });
    assert.equal(missing.status, 2, describeRun(missing));
    assert.match(missing.stderr, /set AGENT_GATEWAY_DATABASE_URL or DATABASE_URL/);
    const named = await runInProcess(['--database-url-env', 'MY_REGISTRY_URL', 'migrate', '--dry-run'], { env: { ...env, MY_REGISTRY_URL: url.toString() } });
    assert.equal(named.status, 0, describeRun(named));
  });

  test('other commands refuse an unmigrated database with exit 4 and say to migrate', async () => {
    const url = await createDatabase(pgServer.url, { migrate: false });
    const run = await runInProcess(['list'], { env: envFor(url) });
    assert.equal(run.status, 4, describeRun(run));
    assert.match(run.stderr, /not migrated/);
    assert.match(run.stderr, /hint: run `agent-gateway-registry migrate`/);
  });
});

describe('migration planning (pure)', () => {
  const file = (filename: string, sha256 = 'a'.repeat(64)): MigrationFile => ({ filename, number: Number(filename.slice(0, 4)), sha256, sql: '' });
  const code = (fn: () => unknown) => {
    try {
      fn();
    } catch (error) {
      assert.ok(error instanceof MigrationError);
      return error.code;
    }
    return 'no error';
  };

  test('pending files in order after the applied ones', () => {
    const plan = planMigrations([file('0001_a.sql'), file('0002_b.sql'), file('0003_c.sql')], [{ filename: '0001_a.sql', sha256: 'a'.repeat(64) }]);
    assert.deepEqual(plan.pending.map((f) => f.filename), ['0002_b.sql', '0003_c.sql']);
    assert.deepEqual(plan.applied.map((f) => f.filename), ['0001_a.sql']);
  });

  test('refusals: changed, missing, out of order', () => {
    assert.equal(code(() => planMigrations([file('0001_a.sql', 'b'.repeat(64))], [{ filename: '0001_a.sql', sha256: 'a'.repeat(64) }])), 'ERR_MIGRATION_CHECKSUM');
    assert.equal(code(() => planMigrations([file('0002_b.sql')], [{ filename: '0001_a.sql', sha256: 'a'.repeat(64) }])), 'ERR_MIGRATION_MISSING');
    assert.equal(code(() => planMigrations([file('0001_a.sql'), file('0002_b.sql')], [{ filename: '0002_b.sql', sha256: 'a'.repeat(64) }])), 'ERR_MIGRATION_ORDER');
  });

  test('baseline: the files up to schema_version, and only if all of them exist', () => {
    assert.deepEqual(baselineFor([file('0001_a.sql'), file('0002_b.sql')], 1).map((f) => f.filename), ['0001_a.sql']);
    assert.equal(code(() => baselineFor([file('0001_a.sql')], 2)), 'ERR_MIGRATION_BASELINE');
    assert.equal(code(() => baselineFor([file('0001_a.sql')], 0)), 'ERR_MIGRATION_BASELINE');
  });
});
