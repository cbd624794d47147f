import { SpanStatusCode, type Span } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { TUNNEL_CLOSED_REASON } from '../../registry/audit-query.js';
import type { AuditWriter } from './audit.js';
import { CONNECT_REASONS, denialResponse, dialFailureResponse, type DialErrorType, type ReasonCode, type Response } from '../../core/errors.js';
import type { GatewayMetrics } from './metrics.js';
import type { ClientAddress } from './proxy-front.js';
import type { TunnelStats } from './tunnel.js';
import type { OpenTunnel } from './tunnels.js';

/**
 * How a CONNECT ended. Every CONNECT ends in exactly one Outcome, and the decision log line, the
 * audit row, the metric and the span are all derived from it here, nowhere else. Statuses and
 * proxy-status types come from the catalogue (core/errors.ts).
 */
export type Outcome =
  | { readonly reason: 'dial_failed'; readonly dialError: DialErrorType; readonly detail: string }
  /** client_cancelled: the stream was gone before its answer; nothing is sent, `detail` names the stage. */
  | { readonly reason: Exclude<ReasonCode, 'dial_failed'>; readonly detail?: string };

/** The HTTP answer for an outcome, or undefined when none is sent. */
export function responseFor(outcome: Outcome): Response | undefined {
  if (outcome.reason === 'client_cancelled') return undefined;
  if (outcome.reason === 'dial_failed') return dialFailureResponse(outcome.dialError);
  return denialResponse(outcome.reason);
}

export function statusOf(outcome: Outcome): number {
  return CONNECT_REASONS[outcome.reason].status;
}

/** What one CONNECT learnt on its way: the fields every record of it carries. */
export interface ConnectFacts {
  readonly connectId: string;
  readonly startedAt: number;
  /** The agent's address (behind a trusted balancer, the one its PROXY header gave). */
  readonly client: ClientAddress;
  traceId?: string;
  identity?: string;
  spkiFingerprint?: string;
  destination?: string;
  /** The raw :authority as sent (capped); the log shows it only when it did not normalise. */
  authority?: string;
  permissionId?: string;
  /** The registry vouched for (identity, destination): only then may they become metric labels. */
  authorised: boolean;
  /** The decision came from the cache (DESIGN §9b), not a registry lookup. */
  cached?: boolean;
  span?: Span;
}

export interface RecorderSinks {
  readonly log: Logger;
  readonly metrics: GatewayMetrics | undefined;
  readonly audit: AuditWriter | undefined;
}

/** Writes the records of CONNECT decisions and tunnel closes. */
export class OutcomeRecorder {
  readonly #sinks: RecorderSinks;

  constructor(sinks: RecorderSinks) {
    // The logger's redaction walks every object of every line looking for secret-named keys; it
    // cost 6% of the gateway's CPU at 3,700 CONNECTs/s (bench --profile). These lines are built
    // below from a closed set of fields, none of them a secret's name, so redaction could never
    // change them: they are written without it.
    this.#sinks = { ...sinks, log: sinks.log.child({}, { redact: { paths: [] } }) };
  }

  decision(facts: ConnectFacts, outcome: Outcome): void {
    const { log, metrics, audit } = this.#sinks;
    const status = statusOf(outcome);
    const detail = 'detail' in outcome ? outcome.detail : undefined;
    const decisionMs = performance.now() - facts.startedAt;
    // Fixed field order, whatever order the stages filled them in: people read these lines.
    const line = {
      event: 'connect_decision',
      connect_id: facts.connectId,
      ...(facts.traceId ? { trace_id: facts.traceId } : {}),
      client_address: facts.client.address,
      client_port: facts.client.port,
      ...(facts.identity !== undefined ? { identity: facts.identity } : {}),
      ...(facts.spkiFingerprint ? { spki_fingerprint: facts.spkiFingerprint } : {}),
      ...(facts.destination ? { destination: facts.destination } : {}),
      ...(facts.authority !== undefined && !facts.destination ? { authority: facts.authority } : {}),
      status,
      reason: outcome.reason,
      ...(detail ? { detail } : {}),
      ...(facts.permissionId ? { permission_id: facts.permissionId } : {}),
      ...(facts.cached ? { cached: true } : {}),
      decision_ms: Math.round(decisionMs * 1000) / 1000,
    };
    if (status === 200) log.info(line, 'CONNECT allowed');
    else if (outcome.reason === 'internal_error') log.error(line, 'CONNECT failed: internal error');
    else if (status >= 500 && status !== 502) log.warn(line, 'CONNECT failed');
    else if (outcome.reason === 'client_cancelled') log.info(line, 'CONNECT cancelled by the client');
    else log.info(line, 'CONNECT denied');

    metrics?.decision(status, outcome.reason, facts.identity, facts.destination, facts.authorised);
    audit?.record({
      identity: facts.identity,
      spki_fingerprint: facts.spkiFingerprint,
      destination: facts.destination,
      authority: facts.authority,
      status,
      reason: outcome.reason,
      detail,
      permission_id: facts.permissionId,
      trace_id: facts.traceId,
      connect_id: facts.connectId,
      client_address: facts.client.address,
      client_port: facts.client.port,
    });
    const span = facts.span;
    if (span) {
      span.setAttributes({
        'http.response.status_code': status,
        'agent_gateway.reason': outcome.reason,
        'client.address': facts.client.address,
        'client.port': facts.client.port,
        ...(facts.identity ? { 'agent_gateway.identity': facts.identity } : {}),
        ...(facts.destination ? { 'agent_gateway.destination': facts.destination } : {}),
        ...(facts.permissionId ? { 'agent_gateway.permission_id': facts.permissionId } : {}),
        ...(detail ? { 'agent_gateway.detail': detail } : {}),
      });
      if (status >= 500) span.setStatus({ code: SpanStatusCode.ERROR, message: outcome.reason });
      span.end();
    }
  }

  tunnelClosed(facts: ConnectFacts, open: OpenTunnel, stats: TunnelStats, tunnelSpan: Span | undefined): void {
    const { log, metrics, audit } = this.#sinks;
    metrics?.tunnelClosed(open, stats.closedBy === 'idle_timeout');
    if (tunnelSpan) {
      tunnelSpan.setAttributes({
        'agent_gateway.bytes_up': stats.bytesUp,
        'agent_gateway.bytes_down': stats.bytesDown,
        ...(stats.closedBy ? { 'agent_gateway.close_reason': stats.closedBy } : stats.error ? { 'agent_gateway.close_reason': stats.error } : {}),
      });
      tunnelSpan.end();
    }
    log.info(
      {
        event: 'tunnel_closed',
        connect_id: facts.connectId,
        ...(facts.traceId ? { trace_id: facts.traceId } : {}),
        client_address: facts.client.address,
        client_port: facts.client.port,
        identity: facts.identity,
        spki_fingerprint: facts.spkiFingerprint,
        destination: facts.destination,
        permission_id: facts.permissionId,
        bytes_up: stats.bytesUp,
        bytes_down: stats.bytesDown,
        duration_ms: Math.round(stats.durationMs),
        ...(stats.closedBy ? { detail: stats.closedBy } : {}),
        ...(stats.error ? { error: stats.error } : {}),
      },
      'tunnel closed',
    );
    audit?.record({
      identity: facts.identity,
      spki_fingerprint: facts.spkiFingerprint,
      destination: facts.destination,
      status: 200,
      reason: TUNNEL_CLOSED_REASON,
      detail: stats.closedBy ?? stats.error,
      permission_id: facts.permissionId,
      bytes_up: stats.bytesUp,
      bytes_down: stats.bytesDown,
      duration_ms: Math.round(stats.durationMs * 1000) / 1000,
      trace_id: facts.traceId,
      connect_id: facts.connectId,
      client_address: facts.client.address,
      client_port: facts.client.port,
    });
  }
}
