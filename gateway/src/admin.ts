import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
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

function send(res: ServerResponse, status: number, contentType: string, body: string, head: boolean): void {
  res.writeHead(status, { 'content-type': contentType, 'cache-control': 'no-store', 'content-length': Buffer.byteLength(body) });
  res.end(head ? undefined : body);
}

const json = (res: ServerResponse, status: number, value: unknown, head: boolean) => send(res, status, 'application/json', `${JSON.stringify(value)}\n`, head);

export async function startAdminServer(listenAddr: string, handlers: AdminHandlers, log: Logger): Promise<AdminServer> {
  // Probes run every few seconds from several places; one registry check at a time is enough.
  let pending: Promise<Readiness> | undefined;
  const readiness = () => {
    pending ??= handlers.readiness().finally(() => {
      pending = undefined;
    });
    return pending;
  };

  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const head = req.method === 'HEAD';
    if (req.method !== 'GET' && !head) {
      res.setHeader('allow', 'GET, HEAD');
      return json(res, 405, { error: 'method_not_allowed' }, false);
    }
    const path = (req.url ?? '/').split('?')[0];
    switch (path) {
      case '/healthz':
        return json(res, 200, { status: 'ok' }, head);
      case '/readyz': {
        const result = await readiness();
        return json(res, result.ready ? 200 : 503, result.body, head);
      }
      case '/tunnels':
        if (!handlers.tunnels) return json(res, 404, { error: 'not_found' }, head);
        return json(res, 200, handlers.tunnels(), head);
      case '/metrics': {
        if (!handlers.metrics) return json(res, 404, { error: 'not_found' }, head);
        const { contentType, body } = await handlers.metrics();
        return send(res, 200, contentType, body, head);
      }
      default:
        return json(res, 404, { error: 'not_found' }, head);
    }
  };

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => {
      log.error({ err: (error as Error).message, path: req.url }, 'admin request failed');
      if (!res.headersSent) json(res, 500, { error: 'internal_error' }, false);
      else res.destroy();
    });
  });
  // Slow or idle clients must not hold sockets: probes are one short request each.
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;
  server.keepAliveTimeout = 5_000;

  const { host, port } = parseListenAddress(listenAddr);
  server.listen(port, host);
  try {
    await once(server, 'listening'); // rejects on 'error' (address in use, ...)
  } catch (error) {
    throw new AgentGatewayError('ERR_ADMIN_LISTEN', `admin.listen_addr ${listenAddr}: cannot listen (${(error as Error).message})`, { cause: error });
  }
  const address = server.address() as AddressInfo;
  log.info({ event: 'admin_listening', address: `${address.address}:${address.port}` }, 'admin endpoints listening');
  return {
    address,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
