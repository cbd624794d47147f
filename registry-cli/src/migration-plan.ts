import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { MigrationError } from './errors.js';

/**
 * Migration files and the pure rules that decide what `migrate` may do. A migration is
 * `NNNN_name.sql`; files apply in filename order; each one's SHA-256 is recorded when applied.
 */

const MIGRATION_FILE = /^(\d{4})_[^/\\]+\.sql$/;

export interface MigrationFile {
  readonly filename: string;
  readonly number: number;
  /** Lowercase hex SHA-256 of the file's bytes. */
  readonly sha256: string;
  readonly sql: string;
}

export interface AppliedMigration {
  readonly filename: string;
  readonly sha256: string;
}

export interface MigrationPlan {
  /** Recorded and unchanged. */
  readonly applied: readonly MigrationFile[];
  /** To apply, in order. */
  readonly pending: readonly MigrationFile[];
}

/** Reads `NNNN_*.sql` from `dir` in filename order; other files are not migrations and are ignored. */
export function readMigrationFiles(dir: string): MigrationFile[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (error) {
    throw new MigrationError('ERR_MIGRATION_FILES', `cannot read the migrations directory ${dir}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
  const files = names
    .filter((name) => MIGRATION_FILE.test(name))
    .sort()
    .map((filename) => {
      const bytes = readFileSync(join(dir, filename));
      return { filename, number: Number(MIGRATION_FILE.exec(filename)![1]), sha256: createHash('sha256').update(bytes).digest('hex'), sql: bytes.toString('utf8') };
    });
  if (files.length === 0) throw new MigrationError('ERR_MIGRATION_FILES', `no NNNN_*.sql migrations in ${dir}`);
  const seen = new Map<number, string>();
  for (const file of files) {
    const other = seen.get(file.number);
    if (other) throw new MigrationError('ERR_MIGRATION_FILES', `${other} and ${file.filename} share the number ${String(file.number).padStart(4, '0')}: their order would be ambiguous`);
    seen.set(file.number, file.filename);
  }
  return files;
}

/**
 * Decides what to apply, or refuses: a recorded file that changed or disappeared, or a new file
 * that sorts before one already applied (it was written against a schema that no longer exists).
 */
export function planMigrations(files: readonly MigrationFile[], applied: readonly AppliedMigration[]): MigrationPlan {
  const byName = new Map(files.map((file) => [file.filename, file]));
  const changed: string[] = [];
  const missing: string[] = [];
  for (const record of applied) {
    const file = byName.get(record.filename);
    if (!file) missing.push(record.filename);
    else if (file.sha256 !== record.sha256) changed.push(`${record.filename} (recorded sha256 ${record.sha256}, file has ${file.sha256})`);
  }
  if (changed.length > 0) {
    throw new MigrationError('ERR_MIGRATION_CHECKSUM', `applied migration${changed.length > 1 ? 's were' : ' was'} edited afterwards: ${changed.join('; ')}. Restore the file and put the change in a new migration.`);
  }
  if (missing.length > 0) {
    throw new MigrationError('ERR_MIGRATION_MISSING', `applied migration${missing.length > 1 ? 's are' : ' is'} missing from the migrations directory: ${missing.join(', ')} (is this CLI older than the database?)`);
  }
  const recorded = new Set(applied.map((record) => record.filename));
  const last = [...recorded].sort().at(-1);
  const pending = files.filter((file) => !recorded.has(file.filename));
  const early = last === undefined ? [] : pending.filter((file) => file.filename < last);
  if (early.length > 0) {
    throw new MigrationError('ERR_MIGRATION_ORDER', `out of order: ${early.map((f) => f.filename).join(', ')} sort${early.length > 1 ? '' : 's'} before ${last}, which is already applied. Renumber it after ${last}.`);
  }
  return { applied: files.filter((file) => recorded.has(file.filename)), pending };
}

/**
 * A database migrated with plain `psql -f` has schema_version but no migration history. Each
 * migration leaves schema_version at its own number, so the files up to that version are the ones
 * psql applied: they are recorded as a baseline instead of being run again.
 */
export function baselineFor(files: readonly MigrationFile[], schemaVersion: number): MigrationFile[] {
  if (!Number.isInteger(schemaVersion) || schemaVersion < 1) {
    throw new MigrationError('ERR_MIGRATION_BASELINE', `schema_version holds ${schemaVersion}; cannot tell which migrations were applied`);
  }
  const baseline = files.filter((file) => file.number <= schemaVersion);
  const numbers = new Set(baseline.map((file) => file.number));
  for (let n = 1; n <= schemaVersion; n++) {
    if (!numbers.has(n)) {
      throw new MigrationError('ERR_MIGRATION_BASELINE', `schema_version is ${schemaVersion} but no migration numbered ${String(n).padStart(4, '0')} exists to record as applied`);
    }
  }
  return baseline;
}
