import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import { startProbeServer, type ProbeServer } from '../../core/probe-server.js';
import { AgentGatewayError } from '../../registry/errors.js';
import { parseListenAddress } from './config.js';

/**
 * The admin listener: plain HTTP, loopback by default, GET/HEAD only.
 *   /healthz  200 while the process serves requests (liveness: restart me if this fails)
 *   /readyz   200 when the registry answers and its schema matches, else 503 (readiness: send
 *             me traffic); also 503 while shutting down so load balancers drain first
 *   /metrics  Prometheus text format
 *   /tunnels  JSON array of open tunnels (connect_id, identity, spki_fingerprint, destination,
 *             permission_id, opened_at, bytes_up, bytes_down)
 * It has no authentication: keep it on loopback or a management network.
 */
export interface Readiness {
  readonly ready: boolean;
  /** Short JSON body; no secrets. */
  readonly body: Record<string, unknown>;
}

export interface AdminHandlers {
  readiness(): Promise<Readiness>;
  /** Open tunnels, for `GET /tunnels` (DESIGN §9b). */
  tunnels?(): object[];
  metrics?(): Promise<{ contentType: string; body: string }>;
}

export interface AdminServer {
  readonly address: AddressInfo;
  close(): Promise<void>;
}

export async function startAdminServer(listenAddr: string, handlers: AdminHandlers, log: Logger): Promise<AdminServer> {
  // Probes run every few seconds from several places; one registry check at a time is enough.
  let pending: Promise<Readiness> | undefined;
  const readiness = () => {
    pending ??= handlers.readiness().finally(() => {
      pending = undefined;
    });
    return pending;
  };
  const notFound = { status: 404, json: { error: 'not_found' } } as const;
  const { host, port } = parseListenAddress(listenAddr);
  let server: ProbeServer;
  try {
    server = await startProbeServer({
      host,
      port,
      routes: {
        '/healthz': () => ({ status: 200, json: { status: 'ok' } }),
        '/readyz': async () => {
          const result = await readiness();
          return { status: result.ready ? 200 : 503, json: result.body };
        },
        '/tunnels': () => (handlers.tunnels ? { status: 200, json: handlers.tunnels() } : notFound),
        '/metrics': async () => {
          if (!handlers.metrics) return notFound;
          const { contentType, body } = await handlers.metrics();
          return { status: 200, contentType, text: body };
        },
      },
      onError: (error, path) => log.error({ err: (error as Error).message, path }, 'admin request failed'),
    });
  } catch (error) {
    throw new AgentGatewayError('ERR_ADMIN_LISTEN', `admin.listen_addr ${listenAddr}: cannot listen (${(error as Error).message})`, { cause: error });
  }
  const { address } = server;
  log.info({ event: 'admin_listening', address: `${address.address}:${address.port}` }, 'admin endpoints listening');
  return server;
}
