import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * The small plain-HTTP server behind the gateway's admin port and the sidecar's health port:
 * GET and HEAD only, one handler per path, JSON unless a handler says otherwise, no caching, and
 * short timeouts, since probes are one short request each and a slow client must not hold a
 * socket. No authentication: it belongs on loopback or a management network.
 */
export type ProbeAnswer =
  | { readonly status: number; readonly json: unknown }
  | { readonly status: number; readonly contentType: string; readonly text: string };

export type ProbeRoute = () => ProbeAnswer | Promise<ProbeAnswer>;

export interface ProbeServerOptions {
  readonly host: string;
  readonly port: number;
  readonly routes: Readonly<Record<string, ProbeRoute>>;
  /** Told about a handler that threw (the client gets 500). */
  readonly onError?: (error: unknown, path: string) => void;
}

export interface ProbeServer {
  readonly address: AddressInfo;
  close(): Promise<void>;
}

function send(res: ServerResponse, answer: ProbeAnswer, head: boolean): void {
  const [contentType, body] = 'json' in answer ? ['application/json', `${JSON.stringify(answer.json)}\n`] : [answer.contentType, answer.text];
  res.writeHead(answer.status, { 'content-type': contentType, 'cache-control': 'no-store', 'content-length': Buffer.byteLength(body) });
  res.end(head ? undefined : body);
}

/** Listens; rejects with the listen error (address in use, ...) for the caller to name. */
export async function startProbeServer(options: ProbeServerOptions): Promise<ProbeServer> {
  const handle = async (req: IncomingMessage, res: ServerResponse, path: string) => {
    const head = req.method === 'HEAD';
    if (req.method !== 'GET' && !head) {
      res.setHeader('allow', 'GET, HEAD');
      return send(res, { status: 405, json: { error: 'method_not_allowed' } }, false);
    }
    const route = Object.hasOwn(options.routes, path) ? options.routes[path] : undefined;
    send(res, route ? await route() : { status: 404, json: { error: 'not_found' } }, head);
  };
  // Node enforces headersTimeout and requestTimeout only when it checks its connections, every
  // 30 s by default: a client trickling header lines held a socket for up to 35 s.
  const server: Server = createServer({ connectionsCheckingInterval: 1_000 }, (req, res) => {
    const path = (req.url ?? '/').split('?')[0]!;
    handle(req, res, path).catch((error: unknown) => {
      options.onError?.(error, path);
      if (!res.headersSent) send(res, { status: 500, json: { error: 'internal_error' } }, false);
      else res.destroy();
    });
  });
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;
  server.keepAliveTimeout = 5_000;
  server.listen(options.port, options.host);
  await once(server, 'listening');
  return {
    address: server.address() as AddressInfo,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
