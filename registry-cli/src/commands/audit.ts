import { buildAuditQuery, type AuditFilter } from '../../../registry/audit-query.js';
import { normaliseAuthority } from '../../../registry/destination.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { withRegistry } from '../database.js';
import { UsageError } from '../errors.js';
import { table } from '../table.js';

export interface AuditOptions {
  readonly identity?: string;
  readonly destination?: string;
  readonly status?: string;
  readonly reason?: string;
  readonly since?: string;
  readonly until?: string;
  readonly limit?: string;
}

/** Builds the filter from CLI text; pure, so its refusals are usage errors before any I/O. */
export function auditFilter(options: AuditOptions): AuditFilter {
  const integer = (text: string, name: string) => {
    if (!/^\d+$/.test(text)) throw new UsageError(`--${name} must be a whole number, got ${JSON.stringify(text)}`);
    return Number(text);
  };
  let destination: string | undefined;
  if (options.destination !== undefined) {
    try {
      destination = normaliseAuthority(options.destination);
    } catch (error) {
      throw new UsageError(`--destination: ${(error as Error).message}`);
    }
  }
  return {
    ...(options.identity !== undefined ? { identity: options.identity } : {}),
    ...(destination !== undefined ? { destination } : {}),
    ...(options.status !== undefined ? { status: integer(options.status, 'status') } : {}),
    ...(options.reason !== undefined ? { reason: options.reason } : {}),
    ...(options.since !== undefined ? { since: options.since } : {}),
    ...(options.until !== undefined ? { until: options.until } : {}),
    ...(options.limit !== undefined ? { limit: integer(options.limit, 'limit') } : {}),
  };
}

/** The gateway's audit trail, newest first, filtered by identity, destination, status and time. */
export async function audit(context: CommandContext, options: AuditOptions): Promise<CommandResult> {
  let query;
  try {
    query = buildAuditQuery(auditFilter(options));
  } catch (error) {
    if (error instanceof RangeError) throw new UsageError(`--${error.message}`);
    throw error;
  }
  return withRegistry(registryTarget(context), async (db) => {
    const rows = (await db.query(query.text, query.values)).rows as Record<string, unknown>[];
    const human = rows.length === 0
      ? ['no audit rows match']
      : table(
          ['AT', 'STATUS', 'REASON', 'IDENTITY', 'DESTINATION', 'DETAIL', 'PERMISSION_ID', 'BYTES_UP', 'BYTES_DOWN'],
          rows.map((r) => [r.at, r.status, r.reason, r.identity, r.destination, r.detail, r.permission_id, r.bytes_up, r.bytes_down].map((v) => (v === null || v === undefined ? null : String(v)))),
        );
    return { data: { rows }, human };
  });
}
