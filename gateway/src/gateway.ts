import { readFileSync } from 'node:fs';
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
import type { Logger } from 'pino';
import { normaliseDestination, type Destination } from '../../registry/destination.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { RegistryUnavailableError } from '../../registry/errors.js';
import { readPeerIdentity, type PeerIdentity } from '../../registry/identity.js';
import { parseListenAddress, type GatewayConfig } from './config.js';
import { denialResponse, dialFailureResponse, type ReasonCode, type Response } from './decision.js';
import { createLogger } from './logger.js';
import { RegistryClient } from './registry-client.js';
import { dial, pipeTunnel } from './tunnel.js';
import { SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../../registry/flow-control.js';

const MAX_SESSION_MEMORY_MB = 256;

export interface GatewayOptions {
  /** Defaults to a pino logger built from `observability.log_level`. */
  readonly logger?: Logger;
}

export interface Gateway {
  /** Binds `server.listen_addr` (port 0 picks one) after the registry is reachable and migrated. */
  listen(): Promise<AddressInfo>;
  /** Stops accepting, lets open tunnels finish for up to `graceMs`, then closes the rest. */
  close(graceMs?: number): Promise<void>;
  readonly address: AddressInfo | undefined;
  readonly openTunnels: number;
  readonly registry: RegistryClient;
  readonly server: Http2SecureServer;
}

interface DecisionLog {
  identity?: string;
  spki_fingerprint?: string;
  destination?: string;
  authority?: string;
  method?: string;
  status: number;
  reason: string;
  detail?: string;
  permission_id?: string;
  decision_ms: number;
}

export function createGateway(config: GatewayConfig, options: GatewayOptions = {}): Gateway {
  const log = options.logger ?? createLogger({ filter: config.observability.log_level });
  const registry = new RegistryClient(config.policy, log);
  const identities = new WeakMap<ServerHttp2Session, PeerIdentity & { fingerprint?: string }>();
  const sessions = new Set<ServerHttp2Session>();
  let openTunnels = 0;
  let closing = false;
  let address: AddressInfo | undefined;

  const server = createSecureServer({
    cert: readFileSync(config.server.tls_cert_path),
    key: readFileSync(config.server.tls_key_path),
    // No CA is trusted: the handshake proves possession of the leaf key; the registry decides the rest.
    requestCert: true,
    rejectUnauthorized: false,
    minVersion: 'TLSv1.2',
    allowHTTP1: false,
    handshakeTimeout: config.limits.handshake_timeout_ms,
    maxSessionMemory: MAX_SESSION_MEMORY_MB,
    settings: {
      initialWindowSize: STREAM_WINDOW_BYTES,
      maxConcurrentStreams: config.limits.max_streams_per_session,
      enablePush: false,
    },
  });

  server.on('unknownProtocol', (socket: TLSSocket) => socket.destroy());
  server.on('tlsClientError', (error: Error) => log.debug({ err: error.message }, 'TLS handshake failed'));

  server.on('session', (session: ServerHttp2Session) => {
    sessions.add(session);
    session.once('close', () => sessions.delete(session));
    session.on('error', (error) => log.debug({ err: error.message }, 'session error'));
    session.setLocalWindowSize(SESSION_WINDOW_BYTES);
    // Read once per session: the handshake fixed the certificate for the session's lifetime.
    const socket = session.socket as TLSSocket;
    const peer = readPeerIdentity(socket.getPeerCertificate(true)?.raw, config.policy.client_ext_oid);
    identities.set(session, { ...peer, ...(peer.spkiDer ? { fingerprint: spkiFingerprint(peer.spkiDer) } : {}) });
    if (!peer.ok) log.info({ reason: peer.reason, spki_fingerprint: peer.spkiDer ? spkiFingerprint(peer.spkiDer) : undefined }, 'client identity unusable: every CONNECT on this session will be denied');
    if (closing) session.close();
  });

  server.on('stream', (stream: ServerHttp2Stream, headers: IncomingHttpHeaders) => {
    handleStream(stream, headers).catch((error: unknown) => {
      log.error({ err: (error as Error).message }, 'unexpected error handling CONNECT');
      if (!stream.destroyed) stream.close(h2.NGHTTP2_INTERNAL_ERROR);
    });
  });

  function answer(stream: ServerHttp2Stream, response: Response): void {
    if (stream.destroyed || stream.closed) return;
    stream.respond({ ':status': response.status, ...response.headers }, { endStream: true });
  }

  async function handleStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): Promise<void> {
    const started = performance.now();
    const peer = identities.get(stream.session as ServerHttp2Session);
    const entry: Partial<DecisionLog> = {
      ...(peer?.ok ? { identity: peer.identity } : {}),
      ...(peer?.fingerprint ? { spki_fingerprint: peer.fingerprint } : {}),
    };
    const deny = (reason: Exclude<ReasonCode, 'dial_failed'>, detail?: string) => {
      const response = denialResponse(reason);
      answer(stream, response);
      logDecision({ ...entry, status: response.status, reason, ...(detail ? { detail } : {}), decision_ms: performance.now() - started });
    };

    // Checks run in DESIGN §3's order; the first failure answers.
    const method = headers[':method'];
    if (method !== 'CONNECT') return deny('method_not_allowed', `method ${String(method)}`);
    const authority = headers[':authority'];
    let destination: Destination;
    try {
      destination = normaliseDestination(typeof authority === 'string' ? authority : '');
    } catch (error) {
      entry.authority = String(authority ?? '').slice(0, 300);
      return deny('authority_invalid', (error as Error).message);
    }
    entry.destination = destination.authority;
    if (!peer?.ok) return deny('identity_invalid', peer?.reason ?? 'no session identity');
    if (closing) return deny('shutting_down');

    let result;
    try {
      result = await registry.authorize({ identity: peer.identity, spkiDer: peer.spkiDer, destination: destination.authority });
    } catch (error) {
      if (error instanceof RegistryUnavailableError) return deny('registry_unavailable', error.message);
      throw error;
    }
    if (!result.allowed) return deny('not_authorized', result.reason);
    entry.permission_id = result.permissionId;
    if (stream.destroyed || stream.closed) return;

    const target = config.resolve.get(destination.authority) ?? destination;
    const dialled = await dial(target.host, target.port, config.limits.dial_timeout_ms);
    if (!dialled.ok) {
      const response = dialFailureResponse(dialled.type);
      answer(stream, response);
      logDecision({ ...entry, status: 502, reason: 'dial_failed', detail: `${dialled.type}: ${dialled.message}`, decision_ms: performance.now() - started });
      return;
    }
    if (stream.destroyed || stream.closed) {
      dialled.socket.destroy();
      return;
    }
    stream.respond({ ':status': 200 });
    logDecision({ ...entry, status: 200, reason: 'allowed', decision_ms: performance.now() - started });
    openTunnels++;
    const stats = await pipeTunnel(stream, dialled.socket);
    openTunnels--;
    log.info(
      {
        event: 'tunnel_closed',
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
  }

  function logDecision(entry: DecisionLog): void {
    const line = { event: 'connect_decision', ...entry, decision_ms: Math.round(entry.decision_ms * 1000) / 1000 };
    if (entry.status === 200) log.info(line, 'CONNECT allowed');
    else if (entry.status >= 500 && entry.status !== 502) log.warn(line, 'CONNECT failed');
    else log.info(line, 'CONNECT denied');
  }

  const gateway: Gateway = {
    async listen() {
      await registry.waitUntilReady();
      const { host, port } = parseListenAddress(config.server.listen_addr);
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => {
          server.removeListener('error', reject);
          resolve();
        });
      });
      address = server.address() as AddressInfo;
      log.info({ event: 'listening', address: `${address.address}:${address.port}` }, 'agent-gateway listening');
      return address;
    },
    async close(graceMs = config.server.shutdown_grace_ms) {
      closing = true;
      const wasListening = server.listening;
      const stopped = new Promise<void>((resolve) => server.close(() => resolve()));
      // GOAWAY: open streams finish, new ones are refused by the client.
      for (const session of sessions) session.close();
      const deadline = setTimeout(() => {
        for (const session of sessions) session.destroy();
      }, graceMs);
      deadline.unref();
      if (wasListening) await stopped;
      clearTimeout(deadline);
      await registry.close();
      log.info({ event: 'stopped' }, 'agent-gateway stopped');
    },
    get address() {
      return address;
    },
    get openTunnels() {
      return openTunnels;
    },
    registry,
    server,
  };
  return gateway;
}
