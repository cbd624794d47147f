import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { SCHEMA_VERSION } from '../../../registry/queries.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { connect, databaseFailure } from '../database.js';
import { redactUrl } from '../../../core/redact-url.js';
import { MigrationError } from '../errors.js';
import { baselineFor, planMigrations, readMigrationFiles, type AppliedMigration, type MigrationFile } from '../migration-plan.js';

/** The repository's migrations/, seen from the sources (registry-cli/src/commands/) or from the
 * compiled output one level deeper (dist/registry-cli/src/commands/). */
export const DEFAULT_MIGRATIONS_DIR = [resolve(import.meta.dirname, '../../../migrations'), resolve(import.meta.dirname, '../../../../migrations')]
  .find((dir) => existsSync(dir)) ?? resolve(import.meta.dirname, '../../../migrations');

/** Session-level advisory lock key shared by every `migrate` run (the bytes of "agw-migr"; PostgreSQL 15 has no hex literals). */
const MIGRATION_LOCK_KEY = '7018709581273065330';
const LOCK_WAIT_MS = 60_000;

const HISTORY_TABLE = `CREATE TABLE IF NOT EXISTS schema_migrations (
    filename   text PRIMARY KEY,
    sha256     text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    applied_at timestamptz NOT NULL DEFAULT now(),
    baseline   boolean NOT NULL DEFAULT false
)`;

export interface MigrateOptions {
  readonly dir?: string;
  readonly dryRun?: boolean;
}

async function lock(db: pg.Client): Promise<void> {
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (;;) {
    const { rows } = await db.query<{ locked: boolean }>(`SELECT pg_try_advisory_lock(${MIGRATION_LOCK_KEY}::bigint) AS locked`);
    if (rows[0]?.locked) return;
    if (Date.now() >= deadline) throw new MigrationError('ERR_MIGRATION_LOCK_TIMEOUT', `another migrate has held the migration lock for ${LOCK_WAIT_MS / 1000} s; giving up`);
    await sleep(200);
  }
}

/** The schema_version of a database migrated without us (plain psql), or undefined when there is none. */
async function psqlSchemaVersion(db: pg.Client): Promise<number | undefined> {
  const { rows: exists } = await db.query<{ present: boolean }>(`SELECT to_regclass('schema_version') IS NOT NULL AS present`);
  if (!exists[0]?.present) return undefined;
  const { rows } = await db.query<{ version: number }>('SELECT version FROM schema_version');
  if (rows.length !== 1) throw new MigrationError('ERR_MIGRATION_BASELINE', `schema_version exists without migration history but holds ${rows.length} rows; cannot tell which migrations were applied`);
  return rows[0]!.version;
}

async function currentSchemaVersion(db: pg.Client): Promise<number | null> {
  const { rows } = await db.query<{ present: boolean }>(`SELECT to_regclass('schema_version') IS NOT NULL AS present`);
  if (!rows[0]?.present) return null;
  const versions = await db.query<{ version: number }>('SELECT version FROM schema_version');
  return versions.rows.length === 1 ? versions.rows[0]!.version : null;
}

/** The recorded migrations; creates the history table unless this is a dry run (which writes nothing). */
async function readHistory(db: pg.Client, dryRun: boolean): Promise<AppliedMigration[]> {
  if (dryRun) {
    const { rows } = await db.query<{ present: boolean }>(`SELECT to_regclass('schema_migrations') IS NOT NULL AS present`);
    if (!rows[0]?.present) return [];
  } else {
    await db.query(HISTORY_TABLE);
  }
  return (await db.query<AppliedMigration>('SELECT filename, sha256 FROM schema_migrations ORDER BY filename')).rows;
}

async function record(db: pg.Client, file: MigrationFile, baseline: boolean): Promise<void> {
  await db.query('INSERT INTO schema_migrations (filename, sha256, baseline) VALUES ($1, $2, $3)', [file.filename, file.sha256, baseline]);
}

/**
 * Each file carries its own BEGIN/COMMIT, so it runs as one simple-protocol query exactly as
 * `psql -f` would run it. A failure leaves its transaction aborted: roll it back before reporting.
 */
async function apply(db: pg.Client, file: MigrationFile): Promise<void> {
  try {
    await db.query(file.sql);
  } catch (error) {
    await db.query('ROLLBACK').catch(() => {});
    const where = (error as { position?: string }).position ? ` (at character ${(error as { position?: string }).position})` : '';
    throw new MigrationError('ERR_MIGRATION_FAILED', `${file.filename} failed and was rolled back: ${(error as Error).message}${where}`, { cause: error });
  }
  // The file has committed; recording it is a separate statement. Should this process die in
  // between, the next run re-applies the file, which fails on its first CREATE and changes nothing.
  await record(db, file, false);
}

export async function migrate(context: CommandContext, options: MigrateOptions): Promise<CommandResult> {
  const dir = resolve(options.dir ?? DEFAULT_MIGRATIONS_DIR);
  const files = readMigrationFiles(dir);
  const target = registryTarget(context);
  const db = await connect(target, { statementTimeoutMs: null });
  try {
    await lock(db);
    const history = await readHistory(db, Boolean(options.dryRun));
    let baseline: MigrationFile[] = [];
    if (history.length === 0) {
      const version = await psqlSchemaVersion(db);
      if (version !== undefined) baseline = baselineFor(files, version);
    }
    const plan = planMigrations(files, [...history, ...baseline]);
    if (!options.dryRun) {
      for (const file of baseline) await record(db, file, true);
      for (const file of plan.pending) await apply(db, file);
    }
    const schemaVersion = await currentSchemaVersion(db);
    if (!options.dryRun && schemaVersion !== SCHEMA_VERSION) {
      context.output.warn(`schema_version is ${schemaVersion ?? 'missing'} after migrating; this CLI and the gateway need ${SCHEMA_VERSION}`);
    }
    await db.query(`SELECT pg_advisory_unlock(${MIGRATION_LOCK_KEY}::bigint)`);
    const baselined = baseline.map((f) => f.filename);
    const applied = plan.pending.map((f) => f.filename);
    const already = plan.applied.map((f) => f.filename).filter((name) => !baselined.includes(name));
    const verb = options.dryRun ? 'would apply' : 'applied';
    const human = [
      `database ${redactUrl(target.url)}, migrations from ${dir}`,
      ...baselined.map((name) => `${options.dryRun ? 'would record' : 'recorded'} ${name} as already applied (database migrated with psql; baseline)`),
      ...applied.map((name) => `${verb} ${name}`),
      applied.length === 0 ? `up to date (${files.length} migration${files.length === 1 ? '' : 's'} applied; schema_version ${schemaVersion ?? 'missing'})` : `schema_version ${schemaVersion ?? 'missing'}`,
    ];
    return {
      data: { database: redactUrl(target.url), dir, dry_run: Boolean(options.dryRun), baselined, applied, already_applied: already, schema_version: schemaVersion },
      human,
    };
  } catch (error) {
    throw databaseFailure(error, 'migrate');
  } finally {
    // Ending the session releases the advisory lock even when an error skipped the unlock.
    await db.end().catch(() => {});
  }
}
