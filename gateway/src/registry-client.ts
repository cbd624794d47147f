import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import type { Logger } from 'pino';
import { authorize, PrincipalKeyCache, type AuthorizationRequest, type AuthorizationResult } from '../../registry/authorize.js';
import { RegistryUnavailableError, SchemaVersionError } from '../../registry/errors.js';
import { CANDIDATE_ROWS_BATCH_QUERY, CANDIDATE_ROWS_QUERY, CANDIDATE_ROWS_WITH_COUNTER_QUERY, CHANGE_COUNTER_QUERY, SCHEMA_VERSION, SCHEMA_VERSION_QUERY } from '../../registry/queries.js';
import type { GatewayConfig } from './config.js';
import { redactUrl } from '../../core/redact-url.js';

/**
 * What became of a lookup meant for the standby (metric label): `served` by it; sent to the
 * primary because the standby was `behind` the change feed, `unavailable` (error, or backing off
 * after one), or `skipped` (the feed's newest counter is not known, so no standby read can be
 * shown fresh).
 */
export type StandbyOutcome = 'served' | 'behind' | 'unavailable' | 'skipped';

export interface RegistryClientOptions {
  /** The change feed's newest counter (ChangeFeed.knownCounter); standby reads must reach it. */
  readonly knownCounter?: () => bigint | undefined;
  readonly standbyOutcome?: (outcome: StandbyOutcome) => void;
}

const STANDBY_BACKOFF_INITIAL_MS = 1000;
const STANDBY_BACKOFF_MAX_MS = 30_000;

/** /readyz's view of the registry. */
export type RegistryReadiness = { readonly ready: true } | { readonly ready: false; readonly reason: 'unavailable' | 'schema_mismatch'; readonly message: string };

/** What to do about a registry at another schema version: migrate an older one; a newer one needs a newer gateway. */
function schemaVersionHint(version: unknown): string {
  if (typeof version !== 'number') return '';
  if (version < SCHEMA_VERSION) return ' (run `agent-gateway-registry migrate`, or apply the newer files in migrations/ in order)';
  return ' (this gateway is older than the registry\'s schema: upgrade the gateway to a release built for that version, or restore the database this gateway was built for)';
}

/**
 * The gateway's read-only view of the registry: a bounded pool, every wait bounded by a
 * `[policy]` timeout, and every failure to ask turned into RegistryUnavailableError (503).
 */
export class RegistryClient {
  readonly #pool: pg.Pool;
  /** `[policy] read_database_url_env`: lookups go here first (DESIGN §9g). */
  readonly #standby: pg.Pool | undefined;
  readonly #knownCounter: () => bigint | undefined;
  readonly #standbyOutcome: (outcome: StandbyOutcome) => void;
  #standbyFailures = 0;
  #standbyRetryAt = 0;
  readonly #keys = new PrincipalKeyCache();
  readonly #log: Logger;
  readonly #policy: GatewayConfig['policy'];

  constructor(policy: GatewayConfig['policy'], log: Logger, options: RegistryClientOptions = {}) {
    this.#policy = policy;
    this.#log = log;
    this.#knownCounter = options.knownCounter ?? (() => undefined);
    this.#standbyOutcome = options.standbyOutcome ?? (() => {});
    this.#pool = this.#newPool(policy.databaseUrl, 'agent-gateway');
    this.#standby = policy.readDatabaseUrl === undefined ? undefined : this.#newPool(policy.readDatabaseUrl, 'agent-gateway-standby');
  }

  #newPool(connectionString: string, applicationName: string): pg.Pool {
    const policy = this.#policy;
    const pool = new pg.Pool({
      connectionString,
      max: policy.max_connections,
      // pg uses one timeout for waiting on the pool and for opening a connection inside that wait.
      connectionTimeoutMillis: Math.min(policy.pool_acquire_timeout_ms, policy.connect_timeout_ms),
      query_timeout: policy.query_timeout_ms,
      statement_timeout: policy.query_timeout_ms,
      idleTimeoutMillis: 30_000,
      keepAlive: true,
      application_name: applicationName,
    });
    // An idle client whose server went away emits here; without a listener it would crash the process.
    pool.on('error', (error) => this.#log.warn({ err: error.message, pool: applicationName }, 'registry connection lost'));
    return pool;
  }

  /** Rows for (identity, destination): from the standby when it is fresh enough, else the primary; or RegistryUnavailableError. */
  async candidateRows(request: AuthorizationRequest): Promise<unknown[]> {
    const fromStandby = this.#standby ? await this.#standbyRows(this.#standby, request) : undefined;
    if (fromStandby) return fromStandby;
    try {
      const result = await this.#pool.query({
        name: 'agent_gateway_candidate_rows',
        text: CANDIDATE_ROWS_QUERY,
        values: [request.identity, request.destination, Buffer.from(request.spkiDer)],
      });
      return result.rows;
    } catch (error) {
      throw new RegistryUnavailableError(`registry lookup failed: ${(error as Error).message}`, { cause: error });
    }
  }

  /**
   * The standby's rows, only when its snapshot has replayed at least the newest change the feed
   * (which follows the primary) has seen: otherwise a revocation the feed already knows of could
   * be read as still allowed, and cached. Undefined sends the lookup to the primary.
   */
  async #standbyRows(standby: pg.Pool, request: AuthorizationRequest): Promise<unknown[] | undefined> {
    const known = this.#knownCounter();
    if (known === undefined) {
      this.#standbyOutcome('skipped');
      return undefined;
    }
    if (performance.now() < this.#standbyRetryAt) {
      this.#standbyOutcome('unavailable');
      return undefined;
    }
    let rows: Record<string, unknown>[];
    // The whole attempt (pool wait, connecting, query) gets query_timeout_ms, not the pool's
    // timeouts one after the other: a standby that stopped answering held each lookup, and so each
    // re-check of open tunnels after a revocation, for pool_acquire_timeout_ms (1 s by default)
    // before the primary was asked, past the 1 s in which a change must reach open tunnels.
    const budgetMs = this.#policy.query_timeout_ms;
    let timer: NodeJS.Timeout | undefined;
    try {
      const query = standby.query({
        name: 'agent_gateway_candidate_rows_with_counter',
        text: CANDIDATE_ROWS_WITH_COUNTER_QUERY,
        values: [request.identity, request.destination, Buffer.from(request.spkiDer)],
      });
      // Past the budget the query is abandoned to pg's own timeouts, which end it and free its client.
      query.catch(() => {});
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within query_timeout_ms=${budgetMs}`)), budgetMs);
      });
      rows = (await Promise.race([query, late])).rows as Record<string, unknown>[];
      if (rows.length === 0) throw new Error('registry_changes has no row');
    } catch (error) {
      const backoff = Math.min(STANDBY_BACKOFF_MAX_MS, STANDBY_BACKOFF_INITIAL_MS * 2 ** this.#standbyFailures++);
      this.#standbyRetryAt = performance.now() + backoff;
      this.#log.warn({ event: 'standby_unavailable', err: (error as Error).message, retry_in_ms: backoff }, 'registry standby unavailable: lookups go to the primary');
      this.#standbyOutcome('unavailable');
      return undefined;
    } finally {
      clearTimeout(timer);
    }
    if (this.#standbyFailures > 0) this.#log.info({ event: 'standby_available' }, 'registry standby answering again');
    this.#standbyFailures = 0;
    if (BigInt(rows[0]!.change_counter as string) < known) {
      this.#standbyOutcome('behind');
      return undefined;
    }
    this.#standbyOutcome('served');
    return rows.filter((row) => row.permission_id !== null);
  }

  /** The spec's checks 3–5: one indexed query, then signature verification in process. */
  async authorize(request: AuthorizationRequest): Promise<AuthorizationResult> {
    return authorize(await this.candidateRows(request), request, this.#keys);
  }

  /**
   * The decisions for many requests from one query (re-checks of open tunnels after a change),
   * in the order asked. Always the primary: the change that set off the re-check was seen there,
   * and a standby read would have to prove it has replayed it first.
   */
  async authorizeMany(requests: readonly AuthorizationRequest[]): Promise<AuthorizationResult[]> {
    let rows: Record<string, unknown>[];
    try {
      const result = await this.#pool.query({
        name: 'agent_gateway_candidate_rows_batch',
        text: CANDIDATE_ROWS_BATCH_QUERY,
        values: [requests.map((r) => r.identity), requests.map((r) => r.destination), requests.map((r) => Buffer.from(r.spkiDer))],
      });
      rows = result.rows as Record<string, unknown>[];
    } catch (error) {
      throw new RegistryUnavailableError(`registry lookup failed: ${(error as Error).message}`, { cause: error });
    }
    const byRequest: unknown[][] = requests.map(() => []);
    for (const row of rows) {
      const index = row.request_index;
      if (typeof index !== 'number' || !Number.isInteger(index) || index < 1 || index > requests.length) {
        throw new RegistryUnavailableError(`registry batch lookup returned request_index ${String(index)} for ${requests.length} requests`);
      }
      byRequest[index - 1]!.push(row);
    }
    return requests.map((request, i) => authorize(byRequest[i]!, request, this.#keys));
  }

  /** The registry change counter (migration 0002), as text: it is a bigint. */
  async changeCounter(): Promise<string> {
    const rows = (await this.#pool.query({ name: 'agent_gateway_change_counter', text: CHANGE_COUNTER_QUERY })).rows as { counter: string }[];
    if (rows.length !== 1) throw new RegistryUnavailableError(`registry_changes holds ${rows.length} rows, not 1`);
    return rows[0]!.counter;
  }

  /** Throws SchemaVersionError unless schema_version holds exactly one row equal to SCHEMA_VERSION. */
  async checkSchemaVersion(): Promise<void> {
    let rows: { version: unknown }[];
    try {
      rows = (await this.#pool.query(SCHEMA_VERSION_QUERY)).rows;
    } catch (error) {
      if ((error as { code?: string }).code === '42P01') {
        throw new SchemaVersionError('the registry database is not migrated (no schema_version table): apply the files in migrations/ in order first');
      }
      throw new RegistryUnavailableError(`cannot read schema_version: ${(error as Error).message}`, { cause: error });
    }
    if (rows.length !== 1) throw new SchemaVersionError(`schema_version must hold exactly one row, found ${rows.length}`);
    const version = rows[0]!.version;
    if (version !== SCHEMA_VERSION) {
      throw new SchemaVersionError(`registry schema version is ${String(version)}, this gateway needs ${SCHEMA_VERSION}${schemaVersionHint(version)}`);
    }
  }

  /**
   * Start-up: retries until the database answers or `connect_timeout_ms` has passed, then checks
   * the schema. A schema mismatch is not retried: it will not fix itself.
   */
  async waitUntilReady(): Promise<void> {
    const deadline = Date.now() + this.#policy.connect_timeout_ms;
    let lastError: unknown;
    for (let attempt = 0; ; attempt++) {
      try {
        await this.checkSchemaVersion();
        return;
      } catch (error) {
        if (error instanceof SchemaVersionError) throw error;
        lastError = error;
      }
      if (Date.now() >= deadline) break;
      await sleep(Math.min(100 * 2 ** attempt, 1000, Math.max(0, deadline - Date.now())));
    }
    throw new RegistryUnavailableError(
      `cannot reach the registry database ${redactUrl(this.#policy.databaseUrl)} within connect_timeout_ms=${this.#policy.connect_timeout_ms}: ${(lastError as Error)?.message}`,
      { cause: lastError },
    );
  }

  /** True when the database answers and the schema matches (for readiness). */
  async isReady(): Promise<boolean> {
    return (await this.readiness()).ready;
  }

  /** Like isReady, with the reason for /readyz. Bounded by the pool and query timeouts. */
  async readiness(): Promise<RegistryReadiness> {
    try {
      await this.checkSchemaVersion();
      return { ready: true };
    } catch (error) {
      const message = (error as Error).message.slice(0, 300);
      return { ready: false, reason: error instanceof SchemaVersionError ? 'schema_mismatch' : 'unavailable', message };
    }
  }

  get poolStats(): { total: number; idle: number; waiting: number } {
    return { total: this.#pool.totalCount, idle: this.#pool.idleCount, waiting: this.#pool.waitingCount };
  }

  /** Undefined without a standby. */
  get standbyPoolStats(): { total: number; idle: number; waiting: number } | undefined {
    const pool = this.#standby;
    return pool && { total: pool.totalCount, idle: pool.idleCount, waiting: pool.waitingCount };
  }

  async close(): Promise<void> {
    await this.#standby?.end();
    await this.#pool.end();
  }
}
