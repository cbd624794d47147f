import { randomBytes } from 'node:crypto';
import { createSecureServer, type Http2SecureServer, type IncomingHttpHeaders, type ServerHttp2Session, type ServerHttp2Stream } from 'node:http2';
import type { AddressInfo, Server } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { TracerProvider } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { AgentGatewayError, ConfigError } from '../../registry/errors.js';
import { MAX_SESSION_MEMORY_MB } from '../../registry/flow-control.js';
import { SCHEMA_VERSION } from '../../registry/queries.js';
import { startAdminServer, type AdminServer, type Readiness } from './admin.js';
import { AuditWriter } from './audit.js';
import { Authoriser } from './authoriser.js';
import { ChangeFeed } from './change-feed.js';
import { parseListenAddress, type GatewayConfig } from './config.js';
import { ConnectRequest, type ConnectDeps } from './connect.js';
import { EarlyDataBudget } from './early-data.js';
import { systemResolver, type HostResolver } from './egress.js';
import { ResolverSlots } from './resolver-slots.js';
import { Limiter } from './limits.js';
import { createLogger } from './logger.js';
import { LookupQueue } from './lookups.js';
import { GatewayMetrics } from './metrics.js';
import { OutcomeRecorder } from './outcome.js';
import { RegistryClient } from './registry-client.js';
import { ProxyFront } from './proxy-front.js';
import { PolicyEnforcer } from './revocation.js';
import { loadServerCredentials, TLS_CONTEXT_OPTIONS, type ServerCredentials } from './server-credentials.js';
import { SessionGuard } from './sessions.js';
import { startTracing, type GatewayTracing } from './tracing.js';
import { TUNNEL_LINGER_MS } from './tunnel.js';
import { TunnelTracker } from './tunnels.js';

/** How often open tunnels are checked for streams HTTP/2 closed under them (Tunnel.sweep). */
const TUNNEL_SWEEP_MS = 250;

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
  /** Resolves destination hostnames for [egress] vetting (tests). Default: the system resolver. */
  readonly resolver?: HostResolver;
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
   * (ConfigError naming the file and reason) and the gateway keeps what it had. `next` may be a
   * loader (SIGHUP re-reading the file), so that a file that does not parse is a failed reload too.
   */
  reload(next?: GatewayConfig | (() => GatewayConfig)): Promise<ReloadResult>;
  readonly address: AddressInfo | undefined;
  /** The admin listener's address once listening (undefined when `[admin] enabled = false`). */
  readonly adminAddress: AddressInfo | undefined;
  readonly openTunnels: number;
  /** Every open tunnel (metrics, /tunnels, shutdown, revocation). */
  readonly tunnels: TunnelTracker;
  /** The bounded, coalescing queue in front of the registry. */
  readonly lookups: LookupQueue;
  /** The registry change feed (LISTEN + counter poll). */
  readonly feed: ChangeFeed;
  /** Live revocation of open tunnels. */
  readonly enforcer: PolicyEnforcer;
  /** Decisions, with the cache of allowed ones. */
  readonly authoriser: Authoriser;
  /** Open HTTP/2 sessions. */
  readonly openSessions: number;
  /** Client bytes held for CONNECTs not yet answered (early-data.ts). */
  readonly earlyDataBytes: number;
  readonly registry: RegistryClient;
  readonly server: Http2SecureServer;
  /** The PROXY protocol listener in front of `server` (undefined without `[server] proxy_protocol_from`). */
  readonly proxyFront: ProxyFront | undefined;
  /** Undefined when the admin listener is disabled: then no metric is kept at all. */
  readonly metrics: GatewayMetrics | undefined;
  /** Undefined when `[audit] enabled = false`. */
  readonly audit: AuditWriter | undefined;
  /** The `[limits]` in force (changes on reload). */
  readonly limits: GatewayConfig['limits'];
  /** SHA-256 fingerprint of the server certificate in use. */
  readonly certificateFingerprint: string;
}

export function createGateway(config: GatewayConfig, options: GatewayOptions = {}): Gateway {
  const log = options.logger ?? createLogger({ filter: config.observability.log_level });
  // The feed and metrics are built below; these run only once lookups start.
  const registry: RegistryClient = new RegistryClient(config.policy, log, { knownCounter: (): bigint | undefined => feed.knownCounter, standbyOutcome: (outcome) => metrics?.standbyLookup(outcome) });
  const lookups = new LookupQueue(
    (request) => registry.authorize(request),
    {
      concurrency: config.policy.max_connections,
      maxQueued: config.policy.lookup_queue_size,
      maxWaitMs: config.policy.pool_acquire_timeout_ms,
    },
    (requests) => registry.authorizeMany(requests),
  );
  const tunnels = new TunnelTracker();
  const earlyData = new EarlyDataBudget();
  const resolverSlots = new ResolverSlots();
  const feed = new ChangeFeed({
    databaseUrl: config.policy.databaseUrl,
    pollIntervalMs: config.cache.poll_interval_ms,
    connectTimeoutMs: config.policy.connect_timeout_ms,
    readCounter: () => registry.changeCounter(),
    log,
  });
  /**
   * CONNECTs not over yet (answered and, if allowed, their tunnel closed and recorded). A count,
   * not a Set of them: a Set churned at the CONNECT rate gets its members promoted to the old
   * generation (bag.ts says why).
   */
  let handlers = 0;
  /** Set while close() waits for `handlers` to reach 0. */
  let handlersEmptied: (() => void) | undefined;
  let limits = config.limits;
  let serverPaths = { cert: config.server.tls_cert_path, key: config.server.tls_key_path };
  const limiter = new Limiter(limits, options.now ? { now: options.now } : {});
  // A fresh prefix per gateway instance keeps connect ids unique across restarts and replicas.
  const connectIdPrefix = randomBytes(6).toString('hex');
  let connectSeq = 0;
  let closing = false;
  /** /readyz says 503 (the balancer's cue); CONNECTs are still served until `closing`. */
  let draining = false;
  let address: AddressInfo | undefined;
  let admin: AdminServer | undefined;
  let tracing: GatewayTracing | undefined;
  const sessions = new SessionGuard(config, () => limits, log, () => tracing);
  // A revoked key must not keep the place an allowed CONNECT gave it (lookups.ts, early-data.ts).
  feed.on('change', () => sessions.forgetVouched());

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
          tunnels: () => tunnels,
          lookups: () => ({ queued: lookups.queued, running: lookups.running }),
          earlyDataBytes: () => earlyData.held,
          feed: () => feed,
          pools: () => {
            const standby = registry.standbyPoolStats;
            return [{ pool: 'registry', ...registry.poolStats }, ...(standby ? [{ pool: 'standby', ...standby }] : []), ...(audit ? [{ pool: 'audit', ...audit.poolStats }] : [])];
          },
          audit: () => audit?.stats,
        },
      )
    : undefined;

  const authoriser = new Authoriser(lookups, feed, { enabled: config.cache.enabled, maxEntries: config.cache.max_entries }, metrics);
  const enforcer = new PolicyEnforcer({ tunnels, authoriser, feed, log, metrics, retryMs: config.cache.poll_interval_ms });
  const sweeper = setInterval(() => {
    const expired = tunnels.sweep(limits.max_tunnel_lifetime_ms);
    for (let i = 0; i < expired; i++) metrics?.policyClose('max_lifetime');
  }, TUNNEL_SWEEP_MS);
  sweeper.unref();

  const deps: ConnectDeps = {
    config,
    limits: () => limits,
    isClosing: () => closing,
    nextConnectId: () => `${connectIdPrefix}-${(++connectSeq).toString(36)}`,
    limiter,
    authoriser,
    enforcer,
    tunnels,
    earlyData,
    recorder: new OutcomeRecorder({ log, metrics, audit }),
    metrics,
    get tracing() {
      return tracing;
    },
    log,
    resolver: options.resolver ?? systemResolver,
    resolverSlots,
    finished() {
      handlers--;
      if (handlers === 0) handlersEmptied?.();
    },
  };

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
      initialWindowSize: config.server.stream_window_bytes,
      maxConcurrentStreams: limits.max_streams_per_session,
      enablePush: false,
    },
  });
  // With trusted balancers the PROXY header is read before TLS by a plain TCP listener in front.
  const front =
    config.server.proxyProtocolFrom.length > 0
      ? new ProxyFront({
          trusted: config.server.proxyProtocolFrom,
          timeoutMs: () => limits.handshake_timeout_ms,
          handOff: (socket) => server.emit('connection', socket),
          refused: (reason) => metrics?.proxyProtocolRefused(reason),
          handshakeFailed,
          log,
        })
      : undefined;
  /** The socket that accepts: the PROXY front, or the TLS server itself. */
  const listener: Server = front?.server ?? server;
  // Refused at accept past the cap; hostile connections are reaped by the deadlines in sessions.ts.
  listener.maxConnections = limits.max_connections > 0 ? limits.max_connections : Infinity;

  server.on('unknownProtocol', (socket: TLSSocket) => socket.destroy());
  function handshakeFailed(reason: 'timeout' | 'error', code: string | undefined, message: string): void {
    metrics?.handshakeFailure(reason);
    // Every counted failure has its line, so an operator can tell a probe from a broken client.
    log.info({ event: 'tls_handshake_failed', reason, code, err: message }, 'TLS handshake failed');
  }
  server.on('tlsClientError', (error: NodeJS.ErrnoException) => handshakeFailed(error.code === 'ERR_TLS_HANDSHAKE_TIMEOUT' ? 'timeout' : 'error', error.code, error.message));

  // The TLS socket under the session Node is about to create: its 'secureConnection' listener
  // (registered when the server was made) creates the session and emits 'session' at once, and
  // session.socket refuses destroy(), which a wedged session needs (sessions.ts, silence backstop).
  let accepted: TLSSocket | undefined;
  server.prependListener('secureConnection', (socket: TLSSocket) => (accepted = socket));
  server.on('session', (session: ServerHttp2Session) => {
    const socket = session.socket;
    // The same connection, or none: a TLS connection that never became a session (no h2) leaves
    // its socket here, and no other connection may be closed for this session's silence.
    const connection = accepted && accepted.remotePort === socket.remotePort && accepted.remoteAddress === socket.remoteAddress && accepted.localPort === socket.localPort ? accepted : undefined;
    accepted = undefined;
    const client = front?.clientOf(socket) ?? { address: socket.remoteAddress ?? '', port: socket.remotePort ?? 0 };
    sessions.adopt(session, config.server.session_window_bytes, config.server.max_session_age_ms, client, connection);
    if (closing) session.close();
  });

  // One listener for every stream, not a closure per stream (a stream may live for hours).
  const onStreamError = (error: Error) => log.debug({ err: error.message, code: (error as NodeJS.ErrnoException).code }, 'stream error');
  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    // From birth: a stream reset, a session error or a dropped socket emits 'error' here at any
    // moment; unhandled, it would end the process.
    stream.on('error', onStreamError);
    const session = stream.session as ServerHttp2Session | undefined;
    const peer = session && sessions.get(session);
    if (!session || !peer || stream.destroyed) {
      stream.destroy();
      return;
    }
    sessions.streamOpened(session, stream);
    const request = new ConnectRequest(deps, peer, stream, headers);
    handlers++;
    request.run().catch((error: unknown) => log.error({ event: 'connect_error', err: (error as Error)?.stack ?? String(error) }, 'CONNECT handler failed'));
  });

  async function readiness(): Promise<Readiness> {
    if (draining) return { ready: false, body: { status: 'shutting_down' } };
    if (!address) return { ready: false, body: { status: 'starting' } };
    const state = await registry.readiness();
    if (state.ready) return { ready: true, body: { status: 'ready', registry: 'ok', schema_version: SCHEMA_VERSION } };
    return { ready: false, body: { status: 'not_ready', registry: state.reason, error: state.message } };
  }

  /** `[limits]` keys that reload() can apply, and how. */
  function applyLimits(next: GatewayConfig['limits']): string[] {
    const changed = (Object.keys(next) as (keyof typeof next)[]).filter((key) => next[key] !== limits[key]);
    limiter.update(next);
    listener.maxConnections = next.max_connections > 0 ? next.max_connections : Infinity;
    if (next.max_streams_per_session !== limits.max_streams_per_session) {
      // New sessions get the new SETTINGS; open sessions keep theirs (changing them mid-flight
      // could refuse streams the client already counted on).
      server.updateSettings({ maxConcurrentStreams: next.max_streams_per_session });
    }
    // Node fixed the handshake timeout when the server was created: keep reporting the one in force.
    limits = Object.freeze({ ...next, handshake_timeout_ms: config.limits.handshake_timeout_ms });
    // Longer idle deadlines must not let open sessions be taken for wedged ones.
    if (changed.includes('idle_timeout_ms') || changed.includes('session_idle_timeout_ms')) sessions.rearmSilence();
    return changed.filter((key) => key !== 'handshake_timeout_ms');
  }

  function restartRequired(next: GatewayConfig): string[] {
    const keys: string[] = [];
    const differs = (a: unknown, b: unknown) => JSON.stringify(a) !== JSON.stringify(b);
    for (const section of ['policy', 'observability', 'admin', 'audit', 'cache', 'egress'] as const) {
      for (const key of new Set([...Object.keys(config[section]), ...Object.keys(next[section])])) {
        if (differs((config[section] as Record<string, unknown>)[key], (next[section] as Record<string, unknown>)[key])) keys.push(`${section}.${key}`);
      }
    }
    // Every [server] key but the certificate pair (reloaded) and proxyProtocolFrom (proxy_protocol_from
    // parsed): a list of names let max_session_age_ms and the windows change silently, unapplied.
    for (const key of Object.keys(config.server) as (keyof GatewayConfig['server'])[]) {
      if (key === 'tls_cert_path' || key === 'tls_key_path' || key === 'proxyProtocolFrom') continue;
      if (differs(config.server[key], next.server[key])) keys.push(`server.${key}`);
    }
    if (differs([...config.resolve], [...next.resolve])) keys.push('resolve');
    // Node fixes the handshake timeout when the server is created.
    if (next.limits.handshake_timeout_ms !== config.limits.handshake_timeout_ms) keys.push('limits.handshake_timeout_ms');
    return keys;
  }

  let stopped: Promise<void> | undefined;
  async function stop(graceMs: number): Promise<void> {
    draining = true;
    if (config.server.drain_delay_ms > 0 && listener.listening) {
      log.info({ event: 'draining', drain_delay_ms: config.server.drain_delay_ms }, 'not ready: waiting for the balancer to stop sending new connections');
      await new Promise((resolve) => setTimeout(resolve, config.server.drain_delay_ms));
    }
    closing = true;
    const wasListening = listener.listening;
    const serverClosed = new Promise<void>((resolve) => listener.close(() => resolve()));
    if (front) server.close();
    // GOAWAY: open streams finish, new ones are refused by the client.
    sessions.closeAll();
    const deadline = setTimeout(() => {
      // Tunnels end with END_STREAM (no burst of resets), then whatever is left is torn down.
      tunnels.closeAll('shutting_down');
      setTimeout(() => sessions.destroyAll(), TUNNEL_LINGER_MS).unref();
    }, graceMs);
    deadline.unref();
    if (wasListening) await serverClosed;
    clearTimeout(deadline);
    // Let handlers record their tunnel_closed rows before the audit queue is flushed.
    if (handlers > 0) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        handlersEmptied = resolve;
        timer = setTimeout(resolve, HANDLER_DRAIN_MS);
      });
      clearTimeout(timer);
      handlersEmptied = undefined;
    }
    clearInterval(sweeper);
    enforcer.close();
    await feed.close();
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
        admin = await startAdminServer(config.admin.listen_addr, { readiness, tunnels: () => tunnels.snapshot(), ...(metrics ? { metrics: () => metrics.render() } : {}) }, log);
      }
      try {
        await registry.waitUntilReady();
        // The first counter read must succeed (schema 2 has it); LISTEN follows in the background.
        await feed.start();
        const { host, port } = parseListenAddress(config.server.listen_addr);
        await new Promise<void>((resolve, reject) => {
          // Named like the admin listener's failure: a raw EADDRINUSE stack names no field.
          const failed = (error: Error) => reject(new AgentGatewayError('ERR_SERVER_LISTEN', `server.listen_addr ${config.server.listen_addr}: cannot listen (${error.message})`, { cause: error }));
          listener.once('error', failed);
          listener.listen(port, host, () => {
            listener.removeListener('error', failed);
            resolve();
          });
        });
      } catch (error) {
        await admin?.close();
        admin = undefined;
        throw error;
      }
      address = listener.address() as AddressInfo;
      log.info({ event: 'listening', address: `${address.address}:${address.port}`, certificate_fingerprint: credentials.fingerprint }, 'agent-gateway listening');
      return address;
    },
    close(graceMs = config.server.shutdown_grace_ms) {
      // Idempotent: a second call (signal during shutdown, test teardown) waits for the first.
      stopped ??= stop(graceMs);
      return stopped;
    },
    async reload(nextOrLoader) {
      try {
        const next = typeof nextOrLoader === 'function' ? nextOrLoader() : nextOrLoader;
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
        log.info({ event: 'reloaded', ...result, open_tunnels: tunnels.size }, 'reloaded certificate and limits');
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
      return tunnels.size;
    },
    tunnels,
    lookups,
    feed,
    enforcer,
    authoriser,
    get openSessions() {
      return sessions.size;
    },
    get earlyDataBytes() {
      return earlyData.held;
    },
    get limits() {
      return limits;
    },
    get certificateFingerprint() {
      return credentials.fingerprint;
    },
    registry,
    server,
    proxyFront: front,
    metrics,
    audit,
  };
  return gateway;
}
