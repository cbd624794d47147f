import pg from 'pg';
import type { Logger } from 'pino';
import { AUDIT_INSERT_QUERY, type AuditRow } from '../../registry/audit-query.js';

/**
 * The audit trail writer: the gateway queues one row per CONNECT decision and one per tunnel
 * close; rows are written in batches (one multi-row INSERT) when a batch fills or on a timer,
 * over a small pool of its own, so the registry pool never waits for audit writes.
 *
 * An audit problem never blocks or fails a CONNECT: record() only pushes onto a bounded array.
 * When the queue is full new rows are dropped; when an INSERT fails its rows go back to the
 * front of the queue (as far as room allows) and the writer backs off. Every dropped row is
 * counted (metrics) and drops are logged at most once per LOG_EVERY_MS.
 *
 * The table is append-only by design: the gateway's role needs INSERT only (agent_gateway_auditor),
 * so a compromised gateway cannot rewrite history. That is why a tunnel's close is a second row
 * (reason "tunnel_closed", with bytes and duration) rather than an UPDATE of the decision row;
 * both rows carry the same connect_id.
 */
export type AuditEvent = { readonly [K in Exclude<keyof AuditRow, 'status' | 'reason'>]?: AuditRow[K] | undefined } & {
  readonly status: number;
  readonly reason: string;
};

export type DropReason = 'queue_full' | 'write_failed' | 'shutdown';

export interface AuditDatabase {
  query(config: { name?: string; text: string; values: unknown[] }): Promise<unknown>;
  end(): Promise<void>;
  readonly totalCount: number;
  readonly idleCount: number;
  readonly waitingCount: number;
}

export interface AuditWriterOptions {
  readonly databaseUrl: string;
  readonly batchSize: number;
  readonly flushIntervalMs: number;
  readonly queueSize: number;
  readonly writeTimeoutMs: number;
  readonly log: Logger;
}

const LOG_EVERY_MS = 10_000;
const MAX_BACKOFF_MS = 30_000;
/** Column lengths a client controls are capped: an audit row is evidence, not a storage service. */
const MAX_TEXT = 1024;

/**
 * PostgreSQL text cannot hold NUL, nor can its JSON carry a lone UTF-16 surrogate (the batch
 * travels as JSON: one such value would fail every row with it); long values are cut.
 */
function clean(value: string | null | undefined): string | null {
  if (value === undefined || value === null) return null;
  const cut = (value.length > MAX_TEXT ? value.slice(0, MAX_TEXT) : value).toWellFormed();
  return cut.includes('\0') ? cut.replaceAll('\0', '\uFFFD') : cut;
}

export class AuditWriter {
  readonly #db: AuditDatabase;
  readonly #options: AuditWriterOptions;
  readonly #log: Logger;
  #queue: AuditRow[] = [];
  #writing: Promise<void> | undefined;
  #timer: NodeJS.Timeout;
  #soon: NodeJS.Immediate | undefined;
  #failures = 0;
  #retryAt = 0;
  #closed = false;
  #written = 0;
  readonly #dropped: Record<DropReason, number> = { queue_full: 0, write_failed: 0, shutdown: 0 };
  /** Drops not yet logged, and when we last logged. */
  #unloggedDrops: Record<DropReason, number> = { queue_full: 0, write_failed: 0, shutdown: 0 };
  #lastDropLog = -Infinity;
  #lastError: string | undefined;

  constructor(options: AuditWriterOptions, db?: AuditDatabase) {
    this.#options = options;
    this.#log = options.log;
    if (db) this.#db = db;
    else {
      const pool = new pg.Pool({
        connectionString: options.databaseUrl,
        // One writer at a time; a second connection only lets close() flush while a write hangs.
        max: 2,
        connectionTimeoutMillis: options.writeTimeoutMs,
        query_timeout: options.writeTimeoutMs,
        statement_timeout: options.writeTimeoutMs,
        idleTimeoutMillis: 30_000,
        keepAlive: true,
        application_name: 'agent-gateway-audit',
      });
      pool.on('error', (error) => this.#log.debug({ err: error.message }, 'audit connection lost'));
      this.#db = pool;
    }
    this.#timer = setInterval(() => this.#tick(), options.flushIntervalMs);
    this.#timer.unref();
  }

  /** Queues one row. Never throws, never waits. */
  record(event: AuditEvent): void {
    if (this.#closed || this.#queue.length >= this.#options.queueSize) {
      this.#drop(this.#closed ? 'shutdown' : 'queue_full', 1);
      return;
    }
    this.#queue.push({
      at: event.at ?? Date.now(),
      identity: clean(event.identity),
      spki_fingerprint: event.spki_fingerprint ?? null,
      destination: event.destination ?? null,
      authority: clean(event.authority),
      status: event.status,
      reason: event.reason,
      detail: clean(event.detail),
      permission_id: clean(event.permission_id),
      bytes_up: event.bytes_up ?? null,
      bytes_down: event.bytes_down ?? null,
      duration_ms: event.duration_ms ?? null,
      trace_id: event.trace_id ?? null,
      connect_id: event.connect_id ?? null,
      client_address: event.client_address ?? null,
      client_port: event.client_port ?? null,
    });
    // A full batch is written right after the current event (not inside the CONNECT handler that
    // filled it), unless a write is running or the writer is backing off.
    if (this.#queue.length >= this.#options.batchSize && !this.#writing && !this.#soon) {
      this.#soon = setImmediate(() => {
        this.#soon = undefined;
        this.#tick();
      });
    }
  }

  get stats(): { queued: number; written: number; dropped: Readonly<Record<DropReason, number>> } {
    return { queued: this.#queue.length, written: this.#written, dropped: this.#dropped };
  }

  get poolStats(): { total: number; idle: number; waiting: number } {
    return { total: this.#db.totalCount, idle: this.#db.idleCount, waiting: this.#db.waitingCount };
  }

  /** Writes everything queued now (tests, close). Resolves when the queue is empty or a write failed. */
  async flush(): Promise<void> {
    for (;;) {
      if (this.#writing) await this.#writing;
      if (this.#queue.length === 0) return;
      const failuresBefore = this.#failures;
      this.#startWrite();
      await this.#writing;
      if (this.#failures > failuresBefore) return;
    }
  }

  /** Flushes within `timeoutMs`, counts what is left as dropped (shutdown), closes the pool. */
  async close(timeoutMs = this.#options.writeTimeoutMs): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#timer);
    if (this.#soon) clearImmediate(this.#soon);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([this.flush(), new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
    clearTimeout(timer);
    const left = this.#queue.length;
    this.#queue = [];
    if (left > 0) this.#drop('shutdown', left);
    this.#logDrops(true);
    await this.#db.end().catch(() => {});
  }

  #tick(): void {
    if (this.#writing || this.#queue.length === 0 || Date.now() < this.#retryAt) return;
    this.#startWrite();
  }

  #startWrite(): void {
    const batch = this.#queue.length <= this.#options.batchSize ? this.#queue : this.#queue.slice(0, this.#options.batchSize);
    this.#queue = batch === this.#queue ? [] : this.#queue.slice(batch.length);
    this.#writing = this.#write(batch).finally(() => {
      this.#writing = undefined;
      // A full batch waiting: write it now rather than at the next tick.
      if (!this.#closed && this.#queue.length >= this.#options.batchSize && Date.now() >= this.#retryAt) this.#startWrite();
    });
  }

  async #write(batch: AuditRow[]): Promise<void> {
    try {
      await this.#db.query({ name: 'agent_gateway_audit_insert', text: AUDIT_INSERT_QUERY, values: [JSON.stringify(batch)] });
      this.#written += batch.length;
      if (this.#failures > 0) this.#log.info({ event: 'audit_recovered', after_failures: this.#failures }, 'audit writes resumed');
      this.#failures = 0;
      this.#retryAt = 0;
    } catch (error) {
      this.#failures++;
      this.#lastError = (error as Error).message;
      this.#retryAt = Date.now() + Math.min(MAX_BACKOFF_MS, this.#options.flushIntervalMs * 2 ** Math.min(this.#failures, 15));
      // Put the rows back in front of newer ones, as far as the queue has room; the rest are lost.
      const room = Math.max(0, this.#options.queueSize - this.#queue.length);
      const kept = this.#closed ? [] : batch.slice(batch.length - Math.min(room, batch.length));
      if (kept.length < batch.length) this.#drop('write_failed', batch.length - kept.length);
      if (kept.length > 0) this.#queue = kept.concat(this.#queue);
      this.#logDrops(false);
      if (this.#failures === 1) this.#log.warn({ event: 'audit_write_failed', err: this.#lastError, queued: this.#queue.length }, 'audit INSERT failed; retrying with backoff');
    }
  }

  #drop(reason: DropReason, count: number): void {
    this.#dropped[reason] += count;
    this.#unloggedDrops[reason] += count;
    this.#logDrops(false);
  }

  /** At most one warning per LOG_EVERY_MS, with the counts since the last one. */
  #logDrops(force: boolean): void {
    const pending = this.#unloggedDrops;
    if (pending.queue_full + pending.write_failed + pending.shutdown === 0) return;
    const now = Date.now();
    if (!force && now - this.#lastDropLog < LOG_EVERY_MS) return;
    this.#lastDropLog = now;
    this.#log.warn({ event: 'audit_rows_dropped', ...pending, last_error: this.#lastError, queued: this.#queue.length }, 'audit rows dropped');
    this.#unloggedDrops = { queue_full: 0, write_failed: 0, shutdown: 0 };
  }
}
