import { randomBytes } from 'node:crypto';
import {
  constants as h2,
  createSecureServer,
  type Http2SecureServer,
  type IncomingHttpHeaders,
  type ServerHttp2Session,
  type ServerHttp2Stream,
} from 'node:http2';
import type { AddressInfo } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { SpanKind, SpanStatusCode, type Context, type Span, type TracerProvider } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { TUNNEL_CLOSED_REASON } from '../../registry/audit-query.js';
import { normaliseDestination, type Destination } from '../../registry/destination.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { ConfigError, RegistryUnavailableError } from '../../registry/errors.js';
import { MAX_SESSION_MEMORY_MB, SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../../registry/flow-control.js';
import { readPeerIdentity, type PeerIdentity } from '../../registry/identity.js';
import { SCHEMA_VERSION } from '../../registry/queries.js';
import { startAdminServer, type AdminServer, type Readiness } from './admin.js';
import { AuditWriter, type AuditEvent } from './audit.js';
import { parseListenAddress, type GatewayConfig } from './config.js';
import { denialResponse, dialFailureResponse, type ReasonCode, type Response } from './decision.js';
import { Limiter } from './limits.js';
import { createLogger } from './logger.js';
import { GatewayMetrics } from './metrics.js';
import { RegistryClient } from './registry-client.js';
import { loadServerCredentials, TLS_CONTEXT_OPTIONS, type ServerCredentials } from './server-credentials.js';
import { startTracing, traceIdFromTraceparent, type GatewayTracing } from './tracing.js';
import { dial, pipeTunnel } from './tunnel.js';

/** How long close() waits, after the sessions are gone, for CONNECT handlers to write their last rows. */
const HANDLER_DRAIN_MS = 1000;

export interface GatewayOptions {
  /** Defaults to a pino logger built from `observability.log_level`. */
  readonly logger?: Logger;
  /**
   * Spans go to this provider instead of an OTLP exporter (tests: BasicTracerProvider with an
   * InMemorySpanExporter). close() does not shut it down.
   */
  readonly tracerProvider?: TracerProvider;
  /** The limiter's clock in milliseconds (tests). Default performance.now. */
  readonly now?: () => number;
}

/** What reload() changed. */
export interface ReloadResult {
  readonly certificate: { readonly changed: boolean; readonly fingerprint: string; readonly subject: string; readonly not_after: string };
  /** `[limits]` keys whose value changed and now apply. */
  readonly limits: readonly string[];
  /** Keys that differ in the new config but only take effect after a restart. */
  readonly restart_required: readonly string[];
}

export interface Gateway {
  /** Binds the admin listener, waits for the registry, then binds `server.listen_addr` (port 0 picks one). */
  listen(): Promise<AddressInfo>;
  /** Stops accepting, lets open tunnels finish for up to `graceMs`, then closes the rest; flushes the audit queue. */
  close(graceMs?: number): Promise<void>;
  /**
   * Re-reads the server certificate and key (from `next`'s paths, else the paths in use) and
   * applies `next`'s `[limits]` (else keeps the current ones), without touching open sessions or tunnels: new handshakes get
   * the new certificate, new CONNECTs the new limits. All or nothing: on any problem it throws
   * (ConfigError naming the file and reason) and the gateway keeps what it had.
   */
  reload(next?: GatewayConfig): Promise<ReloadResult>;
  readonly address: AddressInfo | undefined;
  /** The admin listener's address once listening (undefined when `[admin] enabled = false`). */
  readonly adminAddress: AddressInfo | undefined;
  readonly openTunnels: number;
  readonly registry: RegistryClient;
  readonly server: Http2SecureServer;
  /** Undefined when the admin listener is disabled: then no metric is kept at all. */
  readonly metrics: GatewayMetrics | undefined;
  /** Undefined when `[audit] enabled = false`. */
  readonly audit: AuditWriter | undefined;
  /** The `[limits]` in force (changes on reload). */
  readonly limits: GatewayConfig['limits'];
  /** SHA-256 fingerprint of the server certificate in use. */
  readonly certificateFingerprint: string;
}

interface SessionInfo {
  readonly peer: PeerIdentity;
  readonly fingerprint: string | undefined;
  /** Limiter key: identity and key together, since the identity string alone proves nothing. */
  readonly limitKey: string | undefined;
  readonly span: Span | undefined;
}

interface DecisionLog {
  connect_id: string;
  trace_id?: string;
  identity?: string;
  spki_fingerprint?: string;
  destination?: string;
  authority?: string;
  status: number;
  reason: string;
  detail?: string;
  permission_id?: string;
  decision_ms: number;
}

export function createGateway(config: GatewayConfig, options: GatewayOptions = {}): Gateway {
  const log = options.logger ?? createLogger({ filter: config.observability.log_level });
  const registry = new RegistryClient(config.policy, log);
  const sessionInfo = new WeakMap<ServerHttp2Session, SessionInfo>();
  const sessions = new Set<ServerHttp2Session>();
  const handlers = new Set<Promise<void>>();
  let limits = config.limits;
  let serverPaths = { cert: config.server.tls_cert_path, key: config.server.tls_key_path };
  const limiter = new Limiter(limits, options.now ? { now: options.now } : {});
  // A fresh prefix per gateway instance keeps connect ids unique across restarts and replicas.
  const connectIdPrefix = randomBytes(6).toString('hex');
  let connectSeq = 0;
  let openTunnels = 0;
  let closing = false;
  let address: AddressInfo | undefined;
  let admin: AdminServer | undefined;
  let tracing: GatewayTracing | undefined;

  let credentials: ServerCredentials = loadServerCredentials(serverPaths.cert, serverPaths.key);
  if (credentials.notAfter.getTime() <= Date.now()) log.warn({ event: 'certificate_expired', not_after: credentials.notAfter.toISOString() }, 'the server certificate has expired');

  const audit = config.audit.enabled
    ? new AuditWriter({
        databaseUrl: config.audit.databaseUrl,
        batchSize: config.audit.batch_size,
        flushIntervalMs: config.audit.flush_interval_ms,
        queueSize: config.audit.queue_size,
        writeTimeoutMs: config.audit.write_timeout_ms,
        log,
      })
    : undefined;

  const metrics = config.admin.enabled
    ? new GatewayMetrics(
        { perIdentity: config.admin.per_identity_metrics, perDestination: config.admin.per_destination_metrics, processMetrics: config.admin.process_metrics },
        {
          openSessions: () => sessions.size,
          pools: () => [{ pool: 'registry', ...registry.poolStats }, ...(audit ? [{ pool: 'audit', ...audit.poolStats }] : [])],
          audit: () => audit?.stats,
        },
      )
    : undefined;

  const server = createSecureServer({
    ...TLS_CONTEXT_OPTIONS,
    cert: credentials.cert,
    key: credentials.key,
    // No CA is trusted: the handshake proves possession of the leaf key; the registry decides the rest.
    requestCert: true,
    rejectUnauthorized: false,
    allowHTTP1: false,
    handshakeTimeout: limits.handshake_timeout_ms,
    maxSessionMemory: MAX_SESSION_MEMORY_MB,
    settings: {
      initialWindowSize: STREAM_WINDOW_BYTES,
      maxConcurrentStreams: limits.max_streams_per_session,
      enablePush: false,
    },
  });

  server.on('unknownProtocol', (socket: TLSSocket) => socket.destroy());
  server.on('tlsClientError', (error: NodeJS.ErrnoException) => {
    metrics?.handshakeFailure(error.code === 'ERR_TLS_HANDSHAKE_TIMEOUT' ? 'timeout' : 'error');
    log.debug({ err: error.message }, 'TLS handshake failed');
  });

  server.on('session', (session: ServerHttp2Session) => {
    sessions.add(session);
    session.on('error', (error) => log.debug({ err: error.message }, 'session error'));
    session.setLocalWindowSize(SESSION_WINDOW_BYTES);
    // Read once per session: the handshake fixed the certificate for the session's lifetime.
    const socket = session.socket as TLSSocket;
    const peer = readPeerIdentity(socket.getPeerCertificate(true)?.raw, config.policy.client_ext_oid);
    const fingerprint = peer.spkiDer ? spkiFingerprint(peer.spkiDer) : undefined;
    let span: Span | undefined;
    if (tracing?.enabled) {
      span = tracing.tracer.startSpan('agent_gateway.session', {
        kind: SpanKind.SERVER,
        attributes: {
          'network.peer.address': socket.remoteAddress ?? '',
          'network.peer.port': socket.remotePort ?? 0,
          'tls.protocol.version': socket.getProtocol() ?? '',
          'agent_gateway.identity_ok': peer.ok,
          ...(peer.ok ? { 'agent_gateway.identity': peer.identity } : { 'agent_gateway.identity_error': peer.reason }),
          ...(fingerprint ? { 'agent_gateway.spki_fingerprint': fingerprint } : {}),
        },
      });
    }
    sessionInfo.set(session, { peer, fingerprint, limitKey: peer.ok ? `${peer.identity}\n${fingerprint}` : undefined, span });
    session.once('close', () => {
      sessions.delete(session);
      span?.end();
    });
    if (!peer.ok) log.info({ reason: peer.reason, spki_fingerprint: fingerprint }, 'client identity unusable: every CONNECT on this session will be denied');
    if (closing) session.close();
  });

  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    const handler = handleStream(stream, headers)
      .catch((error: unknown) => {
        log.error({ err: (error as Error).message }, 'unexpected error handling CONNECT');
        if (!stream.destroyed) stream.close(h2.NGHTTP2_INTERNAL_ERROR);
      })
      .finally(() => handlers.delete(handler));
    handlers.add(handler);
  });

  function answer(stream: ServerHttp2Stream, response: Response): void {
    if (stream.destroyed || stream.closed) return;
    stream.respond({ ':status': response.status, ...response.headers }, { endStream: true });
  }

  async function handleStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): Promise<void> {
    const started = performance.now();
    const session = sessionInfo.get(stream.session as ServerHttp2Session);
    const peer = session?.peer;
    const entry: DecisionLog = {
      connect_id: `${connectIdPrefix}-${(++connectSeq).toString(36)}`,
      status: 0,
      reason: '',
      decision_ms: 0,
      ...(peer?.ok ? { identity: peer.identity } : {}),
      ...(session?.fingerprint ? { spki_fingerprint: session.fingerprint } : {}),
    };
    const rawAuthority = headers[':authority'];

    // Tracing: the CONNECT span continues the sidecar's trace and links to the session's span.
    let span: Span | undefined;
    let spanContext: Context | undefined;
    if (tracing?.enabled) {
      const parent = tracing.extract(headers);
      span = tracing.tracer.startSpan(
        'CONNECT',
        {
          kind: SpanKind.SERVER,
          attributes: { 'http.request.method': String(headers[':method']), 'agent_gateway.connect_id': entry.connect_id },
          ...(session?.span ? { links: [{ context: session.span.spanContext() }] } : {}),
        },
        parent,
      );
      spanContext = tracing.withSpan(parent, span);
      entry.trace_id = span.spanContext().traceId;
    } else {
      const traceId = traceIdFromTraceparent(headers.traceparent);
      if (traceId) entry.trace_id = traceId;
    }

    let authorised = false;
    /** Logs, counts, audits and ends the span for the decision in `entry`. */
    const decided = (status: number, reason: string, detail?: string) => {
      entry.status = status;
      entry.reason = reason;
      if (detail) entry.detail = detail;
      entry.decision_ms = performance.now() - started;
      logDecision(entry);
      metrics?.decision(status, reason, entry.identity, entry.destination, authorised);
      audit?.record({
        identity: entry.identity,
        spki_fingerprint: entry.spki_fingerprint,
        destination: entry.destination,
        authority: typeof rawAuthority === 'string' ? rawAuthority : undefined,
        status,
        reason,
        detail: entry.detail,
        permission_id: entry.permission_id,
        trace_id: entry.trace_id,
        connect_id: entry.connect_id,
      } satisfies AuditEvent);
      if (span) {
        span.setAttributes({
          'http.response.status_code': status,
          'agent_gateway.reason': reason,
          ...(entry.identity ? { 'agent_gateway.identity': entry.identity } : {}),
          ...(entry.destination ? { 'agent_gateway.destination': entry.destination } : {}),
          ...(entry.permission_id ? { 'agent_gateway.permission_id': entry.permission_id } : {}),
          ...(entry.detail ? { 'agent_gateway.detail': entry.detail } : {}),
        });
        if (status >= 500) span.setStatus({ code: SpanStatusCode.ERROR, message: reason });
        span.end();
      }
    };
    const deny = (reason: Exclude<ReasonCode, 'dial_failed'>, detail?: string) => {
      const response = denialResponse(reason);
      answer(stream, response);
      decided(response.status, reason, detail);
    };

    // Checks run in DESIGN §3's order; the first failure answers.
    const method = headers[':method'];
    if (method !== 'CONNECT') return deny('method_not_allowed', `method ${String(method)}`);
    let destination: Destination;
    try {
      destination = normaliseDestination(typeof rawAuthority === 'string' ? rawAuthority : '');
    } catch (error) {
      entry.authority = String(rawAuthority ?? '').slice(0, 300);
      return deny('authority_invalid', (error as Error).message);
    }
    entry.destination = destination.authority;
    if (!peer?.ok || !session?.limitKey) return deny('identity_invalid', peer && !peer.ok ? peer.reason : 'no session identity');
    if (closing) return deny('shutting_down');

    const admitted = limiter.admit(session.limitKey);
    if (!admitted.ok) return deny(admitted.reason, admitted.reason === 'rate_limited' ? `over ${limiter.settings.connect_rate_per_second}/s (burst ${limiter.settings.connect_burst})` : `${limiter.settings.max_tunnels_per_identity} open`);
    try {
      await authoriseAndTunnel(stream, entry, destination, peer, span, spanContext, decided, deny, () => (authorised = true));
    } finally {
      if (admitted.slot) limiter.release(session.limitKey);
    }
  }

  async function authoriseAndTunnel(
    stream: ServerHttp2Stream,
    entry: DecisionLog,
    destination: Destination,
    peer: Extract<PeerIdentity, { ok: true }>,
    span: Span | undefined,
    spanContext: Context | undefined,
    decided: (status: number, reason: string, detail?: string) => void,
    deny: (reason: Exclude<ReasonCode, 'dial_failed'>, detail?: string) => void,
    markAuthorised: () => void,
  ): Promise<void> {
    const authStarted = performance.now();
    let result;
    try {
      result = await registry.authorize(
        { identity: peer.identity, spkiDer: peer.spkiDer, destination: destination.authority },
        tracing?.enabled && spanContext ? { tracing, parent: spanContext } : undefined,
      );
    } catch (error) {
      if (error instanceof RegistryUnavailableError) {
        metrics?.authorization((performance.now() - authStarted) / 1000, 'unavailable');
        return deny('registry_unavailable', error.message);
      }
      throw error;
    }
    metrics?.authorization((performance.now() - authStarted) / 1000, result.allowed ? 'allowed' : 'denied');
    if (!result.allowed) {
      // The row that explains the denial, for operators (log, audit); the client sees not_authorized only.
      const explaining = result.verdicts.find((v) => v.reason === result.reason)?.permissionId;
      if (explaining) entry.permission_id = explaining;
      return deny('not_authorized', result.reason);
    }
    entry.permission_id = result.permissionId;
    markAuthorised();
    if (stream.destroyed || stream.closed) {
      span?.end();
      return;
    }

    const target = config.resolve.get(destination.authority) ?? destination;
    const dialSpan =
      tracing?.enabled && spanContext
        ? tracing.tracer.startSpan('agent_gateway.dial', { kind: SpanKind.CLIENT, attributes: { 'server.address': target.host, 'server.port': target.port } }, spanContext)
        : undefined;
    const dialled = await dial(target.host, target.port, limits.dial_timeout_ms);
    if (dialSpan) {
      if (!dialled.ok) dialSpan.setStatus({ code: SpanStatusCode.ERROR, message: `${dialled.type}: ${dialled.message}` });
      dialSpan.end();
    }
    if (!dialled.ok) {
      answer(stream, dialFailureResponse(dialled.type));
      decided(502, 'dial_failed', `${dialled.type}: ${dialled.message}`);
      return;
    }
    if (stream.destroyed || stream.closed) {
      dialled.socket.destroy();
      span?.end();
      return;
    }
    stream.respond({ ':status': 200 });
    decided(200, 'allowed');

    openTunnels++;
    const tunnelMetrics = metrics?.tunnelOpened(dialled.socket, peer.identity, destination.authority);
    const tunnelSpan = tracing?.enabled && spanContext ? tracing.tracer.startSpan('agent_gateway.tunnel', { kind: SpanKind.INTERNAL }, spanContext) : undefined;
    const stats = await pipeTunnel(stream, dialled.socket, limits.idle_timeout_ms);
    openTunnels--;
    if (tunnelMetrics) metrics!.tunnelClosed(tunnelMetrics, stats.idleTimeout);
    const durationMs = Math.round(stats.durationMs * 1000) / 1000;
    if (tunnelSpan) {
      tunnelSpan.setAttributes({ 'agent_gateway.bytes_up': stats.bytesUp, 'agent_gateway.bytes_down': stats.bytesDown, ...(stats.error ? { 'agent_gateway.close_reason': stats.error } : {}) });
      tunnelSpan.end();
    }
    log.info(
      {
        event: 'tunnel_closed',
        connect_id: entry.connect_id,
        ...(entry.trace_id ? { trace_id: entry.trace_id } : {}),
        identity: entry.identity,
        spki_fingerprint: entry.spki_fingerprint,
        destination: entry.destination,
        permission_id: entry.permission_id,
        bytes_up: stats.bytesUp,
        bytes_down: stats.bytesDown,
        duration_ms: Math.round(stats.durationMs),
        ...(stats.error ? { error: stats.error } : {}),
      },
      'tunnel closed',
    );
    audit?.record({
      identity: entry.identity,
      spki_fingerprint: entry.spki_fingerprint,
      destination: entry.destination,
      status: 200,
      reason: TUNNEL_CLOSED_REASON,
      detail: stats.error,
      permission_id: entry.permission_id,
      bytes_up: stats.bytesUp,
      bytes_down: stats.bytesDown,
      duration_ms: durationMs,
      trace_id: entry.trace_id,
      connect_id: entry.connect_id,
    });
  }

  function logDecision(entry: DecisionLog): void {
    // Fixed field order, whatever order the handler filled them in: people read these lines.
    const line = {
      event: 'connect_decision',
      connect_id: entry.connect_id,
      ...(entry.trace_id ? { trace_id: entry.trace_id } : {}),
      ...(entry.identity !== undefined ? { identity: entry.identity } : {}),
      ...(entry.spki_fingerprint ? { spki_fingerprint: entry.spki_fingerprint } : {}),
      ...(entry.destination ? { destination: entry.destination } : {}),
      ...(entry.authority !== undefined ? { authority: entry.authority } : {}),
      status: entry.status,
      reason: entry.reason,
      ...(entry.detail ? { detail: entry.detail } : {}),
      ...(entry.permission_id ? { permission_id: entry.permission_id } : {}),
      decision_ms: Math.round(entry.decision_ms * 1000) / 1000,
    };
    if (entry.status === 200) log.info(line, 'CONNECT allowed');
    else if (entry.status >= 500 && entry.status !== 502) log.warn(line, 'CONNECT failed');
    else log.info(line, 'CONNECT denied');
  }

  async function readiness(): Promise<Readiness> {
    if (closing) return { ready: false, body: { status: 'shutting_down' } };
    if (!address) return { ready: false, body: { status: 'starting' } };
    const state = await registry.readiness();
    if (state.ready) return { ready: true, body: { status: 'ready', registry: 'ok', schema_version: SCHEMA_VERSION } };
    return { ready: false, body: { status: 'not_ready', registry: state.reason, error: state.message } };
  }

  /** `[limits]` keys that reload() can apply, and how. */
  function applyLimits(next: GatewayConfig['limits']): string[] {
    const changed = (Object.keys(next) as (keyof typeof next)[]).filter((key) => next[key] !== limits[key]);
    limiter.update(next);
    if (next.max_streams_per_session !== limits.max_streams_per_session) {
      // New sessions get the new SETTINGS; open sessions keep theirs (changing them mid-flight
      // could refuse streams the client already counted on).
      server.updateSettings({ maxConcurrentStreams: next.max_streams_per_session });
    }
    // Node fixed the handshake timeout when the server was created: keep reporting the one in force.
    limits = Object.freeze({ ...next, handshake_timeout_ms: config.limits.handshake_timeout_ms });
    return changed.filter((key) => key !== 'handshake_timeout_ms');
  }

  function restartRequired(next: GatewayConfig): string[] {
    const keys: string[] = [];
    const differs = (a: unknown, b: unknown) => JSON.stringify(a) !== JSON.stringify(b);
    for (const section of ['policy', 'observability', 'admin', 'audit'] as const) {
      for (const key of new Set([...Object.keys(config[section]), ...Object.keys(next[section])])) {
        if (differs((config[section] as Record<string, unknown>)[key], (next[section] as Record<string, unknown>)[key])) keys.push(`${section}.${key}`);
      }
    }
    for (const key of ['listen_addr', 'shutdown_grace_ms'] as const) if (config.server[key] !== next.server[key]) keys.push(`server.${key}`);
    if (differs([...config.resolve], [...next.resolve])) keys.push('resolve');
    // Node fixes the handshake timeout when the server is created.
    if (next.limits.handshake_timeout_ms !== config.limits.handshake_timeout_ms) keys.push('limits.handshake_timeout_ms');
    return keys;
  }

  let stopped: Promise<void> | undefined;
  async function stop(graceMs: number): Promise<void> {
    closing = true;
    const wasListening = server.listening;
    const serverClosed = new Promise<void>((resolve) => server.close(() => resolve()));
    // GOAWAY: open streams finish, new ones are refused by the client.
    for (const session of sessions) session.close();
    const deadline = setTimeout(() => {
      for (const session of sessions) session.destroy();
    }, graceMs);
    deadline.unref();
    if (wasListening) await serverClosed;
    clearTimeout(deadline);
    // Let handlers record their tunnel_closed rows before the audit queue is flushed.
    if (handlers.size > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.allSettled([...handlers]), new Promise((resolve) => (timer = setTimeout(resolve, HANDLER_DRAIN_MS)))]);
      clearTimeout(timer);
    }
    await audit?.close();
    await registry.close();
    await admin?.close();
    admin = undefined;
    await tracing?.shutdown();
    log.info({ event: 'stopped' }, 'agent-gateway stopped');
  }

  const gateway: Gateway = {
    async listen() {
      tracing = await startTracing(config, { log, ...(options.tracerProvider ? { tracerProvider: options.tracerProvider } : {}) });
      // The admin listener comes first so probes get answers (503 "starting") while the registry is awaited.
      if (config.admin.enabled) {
        admin = await startAdminServer(config.admin.listen_addr, { readiness, ...(metrics ? { metrics: () => metrics.render() } : {}) }, log);
      }
      try {
        await registry.waitUntilReady();
        const { host, port } = parseListenAddress(config.server.listen_addr);
        await new Promise<void>((resolve, reject) => {
          server.once('error', reject);
          server.listen(port, host, () => {
            server.removeListener('error', reject);
            resolve();
          });
        });
      } catch (error) {
        await admin?.close();
        admin = undefined;
        throw error;
      }
      address = server.address() as AddressInfo;
      log.info({ event: 'listening', address: `${address.address}:${address.port}`, certificate_fingerprint: credentials.fingerprint }, 'agent-gateway listening');
      return address;
    },
    close(graceMs = config.server.shutdown_grace_ms) {
      // Idempotent: a second call (signal during shutdown, test teardown) waits for the first.
      stopped ??= stop(graceMs);
      return stopped;
    },
    async reload(next) {
      try {
        // Everything is checked before anything changes.
        const paths = next ? { cert: next.server.tls_cert_path, key: next.server.tls_key_path } : serverPaths;
        const nextLimits = next?.limits ?? limits;
        const fresh = loadServerCredentials(paths.cert, paths.key);
        if (fresh.notAfter.getTime() <= Date.now()) {
          throw new ConfigError(`server.tls_cert_path: ${paths.cert} expired on ${fresh.notAfter.toISOString()}`);
        }
        new Limiter(nextLimits); // throws on settings the limiter cannot take
        const restart = next ? restartRequired(next) : [];
        // Open sessions keep the context they shook hands with; the next handshake uses this one.
        server.setSecureContext({ ...TLS_CONTEXT_OPTIONS, cert: fresh.cert, key: fresh.key });
        const certificateChanged = fresh.fingerprint !== credentials.fingerprint;
        credentials = fresh;
        serverPaths = paths;
        const changedLimits = applyLimits(nextLimits);
        const result: ReloadResult = {
          certificate: { changed: certificateChanged, fingerprint: fresh.fingerprint, subject: fresh.subject, not_after: fresh.notAfter.toISOString() },
          limits: changedLimits,
          restart_required: restart,
        };
        metrics?.reload('success');
        log.info({ event: 'reloaded', ...result, open_tunnels: openTunnels }, 'reloaded certificate and limits');
        return result;
      } catch (error) {
        metrics?.reload('failure');
        log.error({ event: 'reload_failed', err: (error as Error).message, certificate_fingerprint: credentials.fingerprint }, 'reload refused; keeping the current certificate and limits');
        throw error;
      }
    },
    get address() {
      return address;
    },
    get adminAddress() {
      return admin?.address;
    },
    get openTunnels() {
      return openTunnels;
    },
    get limits() {
      return limits;
    },
    get certificateFingerprint() {
      return credentials.fingerprint;
    },
    registry,
    server,
    metrics,
    audit,
  };
  return gateway;
}
