/**
 * The audit_log table (created by migrations/0001_signed_authorization_registry.sql): the row shape the gateway writes, its
 * one INSERT, and a pure query builder for reading it back with filters (the registry CLI's
 * `audit` subcommand, dashboards, tests). Nothing here touches a database.
 */

/** Columns the gateway writes (id is assigned by the database). */
export interface AuditRow {
  /** Decision or close time, epoch milliseconds. */
  readonly at: number;
  readonly identity: string | null;
  /** `sha256:<hex>` of the client's SubjectPublicKeyInfo DER. */
  readonly spki_fingerprint: string | null;
  /** Normalised host:port (null when the authority did not normalise). */
  readonly destination: string | null;
  /** The raw :authority as sent (capped), for 400s and forensics. */
  readonly authority: string | null;
  readonly status: number;
  /** The client-visible reason code (allowed, not_authorized, rate_limited, ...) or tunnel_closed. */
  readonly reason: string;
  /** The precise reason (e.g. permission_expired) or the tunnel's error; never sent to clients. */
  readonly detail: string | null;
  readonly permission_id: string | null;
  readonly bytes_up: number | null;
  readonly bytes_down: number | null;
  readonly duration_ms: number | null;
  /** W3C trace id (32 hex) of the CONNECT, when it carried or got one. */
  readonly trace_id: string | null;
  /** Joins a tunnel_closed row to its decision row. */
  readonly connect_id: string | null;
  /** The agent's address: the TCP peer, or what a trusted balancer's PROXY header said (schema 4). */
  readonly client_address: string | null;
  readonly client_port: number | null;
}

/** Reason written on the second row of a tunnel, when it closes. */
export const TUNNEL_CLOSED_REASON = 'tunnel_closed';

export const AUDIT_COLUMNS = [
  'at',
  'identity',
  'spki_fingerprint',
  'destination',
  'authority',
  'status',
  'reason',
  'detail',
  'permission_id',
  'bytes_up',
  'bytes_down',
  'duration_ms',
  'trace_id',
  'connect_id',
  'client_address',
  'client_port',
] as const;

/** SQL types of the JSON row's fields (the json_to_recordset record definition); `at` is epoch milliseconds. */
export const AUDIT_COLUMN_TYPES: Readonly<Record<(typeof AUDIT_COLUMNS)[number], string>> = Object.freeze({
  at: 'double precision',
  identity: 'text',
  spki_fingerprint: 'text',
  destination: 'text',
  authority: 'text',
  status: 'integer',
  reason: 'text',
  detail: 'text',
  permission_id: 'text',
  bytes_up: 'bigint',
  bytes_down: 'bigint',
  duration_ms: 'double precision',
  trace_id: 'text',
  connect_id: 'text',
  client_address: 'text',
  client_port: 'integer',
});

/**
 * One statement for a whole batch: one parameter, the JSON array of AuditRow objects as they are
 * (`at` in epoch milliseconds), expanded by json_to_recordset(). The text is the same for every
 * batch size, so it is prepared once per connection, and no batch can hit PostgreSQL's
 * 65,535-parameter limit. Needs INSERT only (no RETURNING).
 *
 * JSON rather than one array per column: one native JSON.stringify of the rows took 0.43 ms per
 * 500-row batch, where node-postgres escaping every array element in JavaScript, plus an RFC 3339
 * string per timestamp, took 0.9–1.3 ms, in one go that held up the CONNECTs behind it.
 */
export const AUDIT_INSERT_QUERY = `INSERT INTO audit_log (${AUDIT_COLUMNS.join(', ')})
SELECT ${AUDIT_COLUMNS.map((c) => (c === 'at' ? 'to_timestamp(at / 1000.0)' : c)).join(', ')}
FROM json_to_recordset($1::json) AS r(${AUDIT_COLUMNS.map((c) => `${c} ${AUDIT_COLUMN_TYPES[c]}`).join(', ')})`;

export interface AuditFilter {
  /** Exact client identity. */
  readonly identity?: string;
  /** Exact normalised destination (normalise CLI input with registry/destination.ts first). */
  readonly destination?: string;
  /** HTTP status, e.g. 403. */
  readonly status?: number;
  /** Reason code, e.g. not_authorized or tunnel_closed. */
  readonly reason?: string;
  readonly permissionId?: string;
  readonly traceId?: string;
  /** Rows at or after this instant (Date, or an RFC 3339 string with a zone). */
  readonly since?: Date | string;
  /** Rows strictly before this instant. */
  readonly until?: Date | string;
  /** Most rows returned, newest first; default 100, at most MAX_AUDIT_LIMIT. */
  readonly limit?: number;
}

export const DEFAULT_AUDIT_LIMIT = 100;
export const MAX_AUDIT_LIMIT = 100_000;

export interface BuiltQuery {
  readonly text: string;
  readonly values: unknown[];
}

const RFC3339 = /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:[Zz]|[+-]\d{2}:?\d{2})$/;

function instant(value: Date | string, field: string): string {
  if (value instanceof Date) {
    if (Number.isNaN(value.getTime())) throw new RangeError(`${field}: invalid date`);
    return value.toISOString();
  }
  // A time without a zone would be read in the database session's zone: refuse it.
  if (!RFC3339.test(value)) throw new RangeError(`${field}: expected an RFC 3339 timestamp with a zone, e.g. 2026-05-01T00:00:00Z`);
  return value;
}

/**
 * SELECT over audit_log for the given filters, newest first. Every value is a bind parameter;
 * the text depends only on which filters are set. Columns come back with `at` as UTC RFC 3339
 * text (microseconds, `Z`) so no client time zone or Date rounding is involved, and the bigint
 * columns as text (pg's default), which the caller converts if it wants numbers.
 * Throws RangeError for an invalid filter.
 */
export function buildAuditQuery(filter: AuditFilter = {}): BuiltQuery {
  const where: string[] = [];
  const values: unknown[] = [];
  const add = (sql: (placeholder: string) => string, value: unknown) => {
    values.push(value);
    where.push(sql(`$${values.length}`));
  };
  if (filter.identity !== undefined) add((p) => `identity = ${p}`, filter.identity);
  if (filter.destination !== undefined) add((p) => `destination = ${p}`, filter.destination);
  if (filter.status !== undefined) {
    if (!Number.isInteger(filter.status) || filter.status < 100 || filter.status > 599) throw new RangeError(`status: expected an HTTP status 100-599, got ${filter.status}`);
    add((p) => `status = ${p}`, filter.status);
  }
  if (filter.reason !== undefined) add((p) => `reason = ${p}`, filter.reason);
  if (filter.permissionId !== undefined) add((p) => `permission_id = ${p}`, filter.permissionId);
  if (filter.traceId !== undefined) add((p) => `trace_id = ${p}`, filter.traceId.toLowerCase());
  if (filter.since !== undefined) add((p) => `at >= ${p}::timestamptz`, instant(filter.since, 'since'));
  if (filter.until !== undefined) add((p) => `at < ${p}::timestamptz`, instant(filter.until, 'until'));
  const limit = filter.limit ?? DEFAULT_AUDIT_LIMIT;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_AUDIT_LIMIT) throw new RangeError(`limit: expected an integer 1-${MAX_AUDIT_LIMIT}, got ${limit}`);
  values.push(limit);
  const text = `SELECT id,
       to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS at,
       ${AUDIT_COLUMNS.filter((c) => c !== 'at').join(', ')}
  FROM audit_log${where.length ? `\n WHERE ${where.join('\n   AND ')}` : ''}
 ORDER BY audit_log.at DESC, id DESC
 LIMIT $${values.length}`;
  return { text, values };
}
