import pg from 'pg';
import { AgentGatewayError, SchemaVersionError } from '../../registry/errors.js';
import { SCHEMA_VERSION, SCHEMA_VERSION_QUERY } from '../../registry/queries.js';
import { redactUrl } from '../../core/redact-url.js';
import type { DatabaseTarget } from './environment.js';
import { DatabaseError } from './errors.js';

const CONNECT_TIMEOUT_MS = 10_000;
/** Registry writes are a handful of indexed statements; anything slower is a stuck lock or server. */
const STATEMENT_TIMEOUT_MS = 30_000;
const UNDEFINED_TABLE = '42P01';

export interface ConnectOptions {
  /** Migrations may legitimately run long: no statement timeout for them. */
  readonly statementTimeoutMs?: number | null;
}

/** One admin connection for one CLI run. pg's defaults never time out, so every wait is bounded here. */
export async function connect(target: DatabaseTarget, options: ConnectOptions = {}): Promise<pg.Client> {
  const timeout = options.statementTimeoutMs === undefined ? STATEMENT_TIMEOUT_MS : options.statementTimeoutMs;
  const failed = (error: unknown) => new DatabaseError(`cannot connect to the registry database ${redactUrl(target.url)} (from ${target.variable}): ${(error as Error).message}`, { cause: error });
  let client: pg.Client;
  try {
    // pg reads the files a URL names (sslcert, sslkey, sslrootcert) here, synchronously.
    client = new pg.Client({
      connectionString: target.url,
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      application_name: 'agent-gateway-registry',
      ...(timeout === null ? {} : { statement_timeout: timeout, query_timeout: timeout + 5_000 }),
    });
  } catch (error) {
    throw failed(error);
  }
  // A server that goes away between queries emits here; the next query reports it.
  client.on('error', () => {});
  try {
    await client.connect();
  } catch (error) {
    await client.end().catch(() => {});
    throw failed(error);
  }
  return client;
}

/** Turns a pg failure into a DatabaseError that says what we were doing; our own errors and bugs pass through. */
export function databaseFailure(error: unknown, doing: string): unknown {
  if (error instanceof AgentGatewayError) return error;
  const fromServer = error instanceof pg.DatabaseError;
  const fromConnection = error instanceof Error && /^(?:Connection terminated|Query read timeout|Client has encountered a connection error|read ECONNRESET|write EPIPE)/.test(error.message);
  if (fromServer || fromConnection) return new DatabaseError(`${doing}: ${(error as Error).message}`, { cause: error });
  return error;
}

/** Same rule as the gateway's start-up check: exactly one schema_version row equal to SCHEMA_VERSION. */
export async function checkSchemaVersion(db: pg.ClientBase): Promise<void> {
  let rows: { version: unknown }[];
  try {
    rows = (await db.query(SCHEMA_VERSION_QUERY)).rows;
  } catch (error) {
    if ((error as { code?: string }).code === UNDEFINED_TABLE) {
      throw new SchemaVersionError('the registry database is not migrated (no schema_version table)');
    }
    throw databaseFailure(error, 'reading schema_version');
  }
  if (rows.length !== 1) throw new SchemaVersionError(`schema_version must hold exactly one row, found ${rows.length}`);
  if (rows[0]!.version !== SCHEMA_VERSION) {
    throw new SchemaVersionError(`registry schema version is ${String(rows[0]!.version)}, this CLI needs ${SCHEMA_VERSION}`);
  }
}

/** Runs `work` in one transaction: all of it is written, or none. */
export async function transaction<T>(db: pg.ClientBase, work: () => Promise<T>): Promise<T> {
  await db.query('BEGIN');
  try {
    const result = await work();
    await db.query('COMMIT');
    return result;
  } catch (error) {
    await db.query('ROLLBACK').catch(() => {});
    throw error;
  }
}

/** Connects, checks the schema, runs `work`, and always disconnects. */
export async function withRegistry<T>(target: DatabaseTarget, work: (db: pg.Client) => Promise<T>): Promise<T> {
  const db = await connect(target);
  try {
    await checkSchemaVersion(db);
    return await work(db);
  } catch (error) {
    throw databaseFailure(error, 'registry query failed');
  } finally {
    await db.end().catch(() => {});
  }
}
