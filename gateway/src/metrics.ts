import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import { droppedLogLines, LOG_BUFFER_BYTES } from '../../core/log-destination.js';
import type { ProxyRefusal } from './proxy-protocol.js';
import type { StandbyOutcome } from './registry-client.js';
import type { OpenTunnel } from './tunnels.js';

/**
 * The gateway's Prometheus metrics, in a Registry of its own (never prom-client's global one),
 * so several gateways in one process (tests, embedding) keep separate counts.
 *
 * Cheap on the hot path: a decision is one counter increment; tunnel bytes, open sessions, pool
 * use and audit counts are read only when /metrics is scraped (collect callbacks).
 *
 * Cardinality: no label takes a client-chosen value. With `per_identity_metrics` /
 * `per_destination_metrics` on, the identity / destination labels are filled only for CONNECTs
 * the registry authorised (200 and 502), whose values the registry bounds; every other decision
 * (including identities nobody granted anything) is counted under "". A client can put any
 * string in its carrier certificate, so labelling denials would let it grow the series without
 * bound.
 */
export const METRIC_PREFIX = 'agent_gateway_';

export interface MetricsOptions {
  readonly perIdentity: boolean;
  readonly perDestination: boolean;
  readonly processMetrics: boolean;
}

/** Read at scrape time. */
export interface MetricsSources {
  openSessions(): number;
  /** Open tunnels (the tracker): the gauge and the bytes of open tunnels are read from here. */
  tunnels(): Iterable<OpenTunnel>;
  /** The change feed's state. */
  feed(): { readonly listening: boolean; readonly confirmed: boolean; readonly lagSeconds: number };
  /** Registry lookups waiting to start and running (the lookup queue). */
  lookups(): { readonly queued: number; readonly running: number };
  /** Client bytes held for CONNECTs not yet answered (early-data.ts). */
  earlyDataBytes(): number;
  pools(): readonly { readonly pool: string; readonly total: number; readonly idle: number; readonly waiting: number }[];
  audit(): { readonly queued: number; readonly written: number; readonly dropped: Readonly<Record<string, number>> } | undefined;
}

export class GatewayMetrics {
  readonly registry = new Registry();
  readonly #perIdentity: boolean;
  readonly #perDestination: boolean;
  readonly #decisions: Counter;
  readonly #authorization: Histogram;
  readonly #bytes: Counter;
  readonly #handshakeFailures: Counter;
  readonly #proxyRefusals: Counter;
  readonly #standbyLookups: Counter;
  readonly #idleTimeouts: Counter;
  readonly #reloads: Counter;
  readonly #cacheLookups: Counter;
  readonly #policyCloses: Counter;
  readonly #auditDropped: Counter;
  /** Audit totals already added to the counters (the writer keeps running totals). */
  #auditReported = { written: 0, dropped: {} as Record<string, number> };

  constructor(options: MetricsOptions, sources: MetricsSources) {
    this.#perIdentity = options.perIdentity;
    this.#perDestination = options.perDestination;
    const registers = [this.registry];
    const who = [...(options.perIdentity ? ['identity'] : []), ...(options.perDestination ? ['destination'] : [])];

    this.#decisions = new Counter({
      name: `${METRIC_PREFIX}connect_decisions_total`,
      help: 'CONNECT requests answered, by HTTP status and reason code (allowed, not_authorized, rate_limited, ...).',
      labelNames: ['status', 'reason', ...who],
      registers,
    });
    this.#authorization = new Histogram({
      name: `${METRIC_PREFIX}authorization_duration_seconds`,
      help: 'Registry authorization time per CONNECT: the database lookup plus signature verification.',
      labelNames: ['outcome'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    });
    const labelsOf = (open: OpenTunnel) => this.#who(open.identity, open.destination);
    new Gauge({
      name: `${METRIC_PREFIX}open_tunnels`,
      help: 'Tunnels currently open.',
      labelNames: who,
      registers,
      collect() {
        this.reset();
        if (who.length === 0) {
          let open = 0;
          for (const _ of sources.tunnels()) open++;
          this.set(open);
          return;
        }
        for (const open of sources.tunnels()) this.inc(labelsOf(open));
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}registry_lookups`,
      help: 'Registry lookups by state: queued (waiting for a pooled connection; what [policy] lookup_queue_size bounds) or running (holding one).',
      labelNames: ['state'],
      registers,
      collect() {
        const { queued, running } = sources.lookups();
        this.set({ state: 'queued' }, queued);
        this.set({ state: 'running' }, running);
      },
    });
    const bytes = (this.#bytes = new Counter({
      name: `${METRIC_PREFIX}tunnel_bytes_total`,
      help: 'Bytes carried by tunnels; direction="up" is client to destination, "down" the other way. Includes open tunnels.',
      labelNames: ['direction', ...who],
      registers,
      // Open tunnels' bytes are added when scraped, so long-lived tunnels show up before they close.
      collect() {
        for (const open of sources.tunnels()) GatewayMetrics.#addBytes(bytes, open, labelsOf(open));
      },
    }));
    this.#handshakeFailures = new Counter({
      name: `${METRIC_PREFIX}tls_handshake_failures_total`,
      help: 'TLS handshakes that failed or timed out (reason="timeout" or "error").',
      labelNames: ['reason'],
      registers,
    });
    this.#proxyRefusals = new Counter({
      name: `${METRIC_PREFIX}proxy_protocol_refusals_total`,
      help: 'Connections refused before TLS by the PROXY protocol check ([server] proxy_protocol_from), by reason.',
      labelNames: ['reason'],
      registers,
    });
    this.#standbyLookups = new Counter({
      name: `${METRIC_PREFIX}standby_lookups_total`,
      help: 'Registry lookups meant for the standby ([policy] read_database_url_env): served by it, or sent to the primary because it was behind the change feed, unavailable, or the feed\'s counter was unknown (skipped).',
      labelNames: ['outcome'],
      registers,
    });
    this.#idleTimeouts = new Counter({
      name: `${METRIC_PREFIX}tunnel_idle_timeouts_total`,
      help: 'Tunnels closed by limits.idle_timeout_ms.',
      registers,
    });
    this.#reloads = new Counter({
      name: `${METRIC_PREFIX}reloads_total`,
      help: 'Reloads of the server certificate and [limits] (SIGHUP), by result.',
      labelNames: ['result'],
      registers,
    });
    this.#cacheLookups = new Counter({
      name: `${METRIC_PREFIX}authorization_cache_total`,
      help: 'CONNECT decisions by cache result: hit (served from the cache), miss (asked the registry), bypass (cache not usable: change feed unconfirmed).',
      labelNames: ['result'],
      registers,
    });
    this.#policyCloses = new Counter({
      name: `${METRIC_PREFIX}tunnels_closed_by_policy_total`,
      help: 'Open tunnels the gateway closed on policy: revoked, expired, max_lifetime, sni_mismatch.',
      labelNames: ['detail'],
      registers,
    });
    new Gauge({
      name: `${METRIC_PREFIX}change_feed_up`,
      help: 'Registry change feed: path="listen" 1 while the LISTEN connection is up; path="confirmed" 1 while the cache may be used (LISTEN up or a recent poll).',
      labelNames: ['path'],
      registers,
      collect() {
        const feed = sources.feed();
        this.set({ path: 'listen' }, feed.listening ? 1 : 0);
        this.set({ path: 'confirmed' }, feed.confirmed ? 1 : 0);
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}log_lines_dropped_total`,
      help: `Log lines dropped because stdout fell more than ${LOG_BUFFER_BYTES / 1024 / 1024} MiB behind (its reader stalled).`,
      registers,
      collect() {
        this.reset();
        this.inc(droppedLogLines());
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}change_feed_lag_seconds`,
      help: 'How far behind the registry the gateway may be: 0 while LISTEN is up, else the time since the last successful poll of the change counter.',
      registers,
      collect() {
        this.set(sources.feed().lagSeconds);
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}open_sessions`,
      help: 'HTTP/2 client sessions currently open.',
      registers,
      collect() {
        this.set(sources.openSessions());
      },
    });
    const poolGauge = (name: string, help: string, pick: (stats: ReturnType<MetricsSources['pools']>[number]) => number) =>
      new Gauge({
        name: `${METRIC_PREFIX}${name}`,
        help,
        labelNames: ['pool'],
        registers,
        collect() {
          for (const stats of sources.pools()) this.set({ pool: stats.pool }, pick(stats));
        },
      });
    poolGauge('db_pool_connections', 'PostgreSQL connections open in the pool (pool="registry" or "audit").', (s) => s.total);
    poolGauge('db_pool_idle_connections', 'PostgreSQL connections idle in the pool.', (s) => s.idle);
    poolGauge('db_pool_waiting_requests', 'Queries waiting for a pooled connection.', (s) => s.waiting);

    const reported = () => this.#auditReported;
    const written: Counter = new Counter({
      name: `${METRIC_PREFIX}audit_rows_written_total`,
      help: 'Audit rows inserted into audit_log.',
      registers,
      collect() {
        const audit = sources.audit();
        if (!audit) return;
        written.inc(audit.written - reported().written);
        reported().written = audit.written;
      },
    });
    const dropped = (this.#auditDropped = new Counter({
      name: `${METRIC_PREFIX}audit_rows_dropped_total`,
      help: 'Audit rows given up: queue_full (database slower than traffic), write_failed (INSERT failed and no room to retry), shutdown (not written by close).',
      labelNames: ['reason'],
      registers,
      collect() {
        const audit = sources.audit();
        if (!audit) return;
        for (const [reason, total] of Object.entries(audit.dropped)) {
          const before = reported().dropped[reason] ?? 0;
          if (total > before) dropped.inc({ reason }, total - before);
          reported().dropped[reason] = total;
        }
      },
    }));
    new Gauge({
      name: `${METRIC_PREFIX}early_data_bytes`,
      help: 'Bytes clients sent on CONNECT streams before their answer, held until the tunnel opens (bounded per stream, session and process).',
      registers,
      collect() {
        this.set(sources.earlyDataBytes());
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}audit_queue_rows`,
      help: 'Audit rows waiting to be written.',
      registers,
      collect() {
        this.set(sources.audit()?.queued ?? 0);
      },
    });
    // Zero the series dashboards divide by, so they exist before the first event.
    for (const reason of ['queue_full', 'write_failed', 'shutdown']) this.#auditDropped.inc({ reason }, 0);
    for (const reason of ['timeout', 'error']) this.#handshakeFailures.inc({ reason }, 0);
    for (const result of ['success', 'failure']) this.#reloads.inc({ result }, 0);
    for (const result of ['hit', 'miss', 'bypass']) this.#cacheLookups.inc({ result }, 0);
    for (const detail of ['revoked', 'expired', 'max_lifetime', 'sni_mismatch']) this.#policyCloses.inc({ detail }, 0);
    if (who.length === 0) for (const direction of ['up', 'down']) this.#bytes.inc({ direction }, 0);

    if (options.processMetrics) collectDefaultMetrics({ register: this.registry });
  }

  static #addBytes(counter: Counter, open: OpenTunnel, labels: Record<string, string>): void {
    const up = open.tunnel.bytesUp;
    const down = open.tunnel.bytesDown;
    if (up > open.reportedUp) counter.inc({ direction: 'up', ...labels }, up - open.reportedUp);
    if (down > open.reportedDown) counter.inc({ direction: 'down', ...labels }, down - open.reportedDown);
    open.reportedUp = up;
    open.reportedDown = down;
  }

  #who(identity: string | undefined, destination: string | undefined): Record<string, string> {
    const labels: Record<string, string> = {};
    if (this.#perIdentity) labels.identity = identity ?? '';
    if (this.#perDestination) labels.destination = destination ?? '';
    return labels;
  }

  /**
   * One answered CONNECT. `authorised` says the registry vouched for (identity, destination), the
   * only case where they may become label values.
   */
  decision(status: number, reason: string, identity: string | undefined, destination: string | undefined, authorised: boolean): void {
    if (!this.#perIdentity && !this.#perDestination) {
      this.#decisions.inc({ status, reason });
      return;
    }
    this.#decisions.inc({ status, reason, ...(authorised ? this.#who(identity, destination) : this.#who('', '')) });
  }

  authorization(seconds: number, outcome: 'allowed' | 'denied' | 'unavailable'): void {
    this.#authorization.observe({ outcome }, seconds);
  }

  /** A CONNECT's decision came from the cache (hit), the registry (miss), or the cache was not usable (bypass). */
  cache(result: 'hit' | 'miss' | 'bypass'): void {
    this.#cacheLookups.inc({ result });
  }

  /** A tunnel closed because policy no longer allows it (revoked, expired, max_lifetime, sni_mismatch). */
  policyClose(detail: string): void {
    this.#policyCloses.inc({ detail });
  }

  /** A tunnel left the tracker: its last bytes are counted. */
  tunnelClosed(open: OpenTunnel, idleTimeout: boolean): void {
    GatewayMetrics.#addBytes(this.#bytes, open, this.#who(open.identity, open.destination));
    if (idleTimeout) this.#idleTimeouts.inc();
  }

  handshakeFailure(reason: 'timeout' | 'error'): void {
    this.#handshakeFailures.inc({ reason });
  }

  proxyProtocolRefused(reason: ProxyRefusal): void {
    this.#proxyRefusals.inc({ reason });
  }

  standbyLookup(outcome: StandbyOutcome): void {
    this.#standbyLookups.inc({ outcome });
  }

  reload(result: 'success' | 'failure'): void {
    this.#reloads.inc({ result });
  }

  /** The text format for /metrics. */
  async render(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
