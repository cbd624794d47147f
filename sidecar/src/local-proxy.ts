import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { createServer, request as httpRequest, STATUS_CODES, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { constants as h2, type ClientHttp2Stream } from 'node:http2';
import type { AddressInfo, Socket } from 'node:net';
import type { Logger } from 'pino';
import { sidecarReasonForError, sidecarResponse } from '../../core/errors.js';
import { normaliseDestination } from '../../registry/destination.js';
import type { GatewaySession, TunnelResponse } from './gateway-session.js';
import { TRACING_DISABLED, type SidecarTracing } from './tracing.js';

const TRACEPARENT = /^00-([0-9a-f]{32})-[0-9a-f]{16}-([0-9a-f]{2})$/;

/**
 * W3C trace context for the CONNECT sent to the gateway: continue the agent's trace when its
 * request carried one, else start a new one. A fresh parent id marks the sidecar's own span.
 */
export function traceparentFor(incoming: string | string[] | undefined): string {
  const m = typeof incoming === 'string' ? TRACEPARENT.exec(incoming) : null;
  const traceId = m && !/^0+$/.test(m[1]!) ? m[1]! : randomBytes(16).toString('hex');
  return `00-${traceId}-${randomBytes(8).toString('hex')}-${m ? m[2] : '01'}`;
}

export interface LocalProxyOptions {
  readonly hosts: readonly string[];
  readonly port: number;
  readonly gateway: GatewaySession;
  readonly log: Logger;
  readonly tracing?: SidecarTracing;
}

/** Relays bytes both ways; each side's end half-closes the other (END_STREAM ⇄ FIN). */
function relay(agent: Socket, stream: ClientHttp2Stream): void {
  agent.pipe(stream);
  stream.pipe(agent);
  // The gateway or destination failed: the agent sees its connection reset, as with a direct dial.
  stream.on('close', () => {
    if (stream.rstCode !== 0) agent.destroy();
    else if (!agent.writableEnded) agent.end();
  });
  stream.on('error', () => agent.destroy());
  // The agent vanished: cancel the stream. Only here do we reset; normal ends use END_STREAM so
  // nghttp2's rapid-reset defence never counts us.
  agent.on('error', () => {
    if (!stream.closed) stream.close(h2.NGHTTP2_CANCEL);
  });
  agent.on('close', () => {
    // Closed without a FIN (destroyed): the agent is gone mid-tunnel, a real error.
    if (!stream.closed && !stream.writableEnded) stream.close(h2.NGHTTP2_CANCEL);
  });
}

function writeHead(agent: Socket, status: number, headers: Record<string, string | undefined>): void {
  const lines = [`HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Unknown'}`];
  for (const [name, value] of Object.entries(headers)) if (value !== undefined) lines.push(`${name}: ${value}`);
  agent.write(`${lines.join('\r\n')}\r\n\r\n`);
}

/** The reason code inside an RFC 9209 proxy-status value (`details="..."`). */
export function detailsOf(proxyStatus: string | undefined): string | undefined {
  return proxyStatus ? /details="([^"\\]{1,64})"/.exec(proxyStatus)?.[1] : undefined;
}

/** One line an agent (or the person reading its output) can act on. */
export function refusalBody(authority: string, status: number, proxyStatus: string | undefined): string {
  const reason = detailsOf(proxyStatus) ?? 'unknown';
  // The authority is the agent's own input: printable ASCII only, capped, so the line stays one line.
  const shown = authority.replace(/[^\x21-\x7e]/g, '?').slice(0, 300);
  return `agent-gateway: CONNECT ${shown} refused: ${status} ${reason}\n`;
}

/** Ends a refused local request with its status, proxy-status and the one-line body. */
function refuse(agent: Socket, authority: string, status: number, proxyStatus: string | undefined): void {
  if (!agent.writable) return;
  const body = refusalBody(authority, status, proxyStatus);
  writeHead(agent, status, { 'proxy-status': proxyStatus, 'content-type': 'text/plain; charset=utf-8', 'content-length': String(Buffer.byteLength(body)), connection: 'close' });
  agent.end(body);
}

/**
 * A gateway answer that is not 200 ends our half of the stream with END_STREAM: a reset here
 * would count toward the gateway's rapid-reset defence and, after ~1,000 denials, cost this
 * sidecar its session and every tunnel on it.
 */
function finishRefused(stream: ClientHttp2Stream): void {
  stream.resume();
  if (!stream.writableEnded) stream.end();
}

/** The gateway would answer 400 (same shared rules): say so without a round trip. */
function validAuthority(authority: string): boolean {
  try {
    normaliseDestination(authority);
    return true;
  } catch {
    return false;
  }
}

/** Local HTTP/1.1 proxy for agents: each CONNECT becomes a stream on the one gateway session. */
export class LocalProxy {
  readonly #options: LocalProxyOptions;
  readonly #servers: Server[] = [];
  readonly #agents = new Set<Socket>();
  readonly addresses: AddressInfo[] = [];

  constructor(options: LocalProxyOptions) {
    this.#options = options;
  }

  async listen(): Promise<number> {
    let port = this.#options.port;
    for (const host of this.#options.hosts) {
      const server = createServer();
      server.on('connect', (req: IncomingMessage, socket: Socket, head: Buffer) => void this.#onConnect(req, socket, head));
      server.on('request', (req: IncomingMessage, res: ServerResponse) => void this.#onRequest(req, res));
      server.on('connection', (socket: Socket) => {
        this.#agents.add(socket);
        socket.once('close', () => this.#agents.delete(socket));
      });
      server.on('clientError', (_error, socket: Socket) => {
        if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n');
      });
      try {
        server.listen({ host, port, ipv6Only: host.includes(':') });
        await once(server, 'listening');
      } catch (error) {
        // A host without ::1 (IPv6 disabled) must not stop the sidecar when 127.0.0.1 works.
        if (host.includes(':') && this.#servers.length > 0) {
          this.#options.log.warn({ host, err: (error as Error).message }, 'local listener not available');
          continue;
        }
        throw error;
      }
      const address = server.address() as AddressInfo;
      port = address.port; // both listeners share the port picked by the first
      this.addresses.push(address);
      this.#servers.push(server);
    }
    return port;
  }

  /**
   * One CONNECT stream to the gateway for an agent request, inside a span when tracing is on
   * (it ends with the stream); otherwise with a fresh traceparent so the gateway still logs one.
   */
  async #openTunnel(authority: string, req: IncomingMessage): Promise<TunnelResponse> {
    const tracing = this.#options.tracing ?? TRACING_DISABLED;
    const span = tracing.startConnect(authority, req.headers);
    const headers = tracing.enabled ? span.headers : { traceparent: traceparentFor(req.headers.traceparent) };
    let tunnel: TunnelResponse;
    try {
      tunnel = await this.#options.gateway.openTunnel(authority, headers);
    } catch (error) {
      span.end(undefined, (error as Error).message);
      throw error;
    }
    if (tunnel.status !== 200) span.end(tunnel.status);
    else tunnel.stream.once('close', () => span.end(200, tunnel.stream.rstCode ? `stream reset (code ${tunnel.stream.rstCode})` : undefined));
    return tunnel;
  }

  async #onConnect(req: IncomingMessage, agent: Socket, head: Buffer): Promise<void> {
    const { log } = this.#options;
    const authority = req.url ?? '';
    agent.on('error', () => {});
    if (!validAuthority(authority)) {
      const response = sidecarResponse('authority_invalid');
      refuse(agent, authority, response.status, response.headers['proxy-status']);
      return;
    }
    let tunnel;
    try {
      tunnel = await this.#openTunnel(authority, req);
    } catch (error) {
      log.warn({ event: 'local_connect_failed', authority, err: (error as Error).message }, 'CONNECT could not reach the gateway');
      const response = sidecarResponse(sidecarReasonForError(error));
      refuse(agent, authority, response.status, response.headers['proxy-status']);
      return;
    }
    const { status, headers, stream } = tunnel;
    log.debug({ event: 'local_connect', authority, status }, 'CONNECT answered');
    if (status !== 200) {
      // The gateway's answer is the agent's answer: 403 stays 403 with its reason.
      finishRefused(stream);
      refuse(agent, authority, status, headers['proxy-status'] as string | undefined);
      return;
    }
    if (agent.destroyed) {
      stream.close(h2.NGHTTP2_CANCEL);
      return;
    }
    writeHead(agent, 200, {});
    if (head.length > 0) stream.write(head);
    relay(agent, stream);
  }

  /** Absolute-URI plain HTTP (`GET http://host/path`) goes through a CONNECT to host:80. */
  async #onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const { log } = this.#options;
    if (!/^[a-z][a-z0-9+.-]*:/i.test(req.url ?? '')) {
      // Someone opened the port in a browser or with plain curl: say what this port is.
      res.writeHead(400, { 'content-type': 'text/plain; charset=utf-8' }).end('agent-gateway sidecar: this port is an HTTP proxy, not a web server; use it as HTTPS_PROXY (CONNECT) or HTTP_PROXY (absolute http:// URLs)\n');
      return;
    }
    let target: URL;
    try {
      target = new URL(req.url ?? '');
      if (target.protocol !== 'http:') throw new Error('only http:// URLs can be proxied without CONNECT');
    } catch (error) {
      res.writeHead(400, { 'content-type': 'text/plain' }).end(`agent-gateway sidecar: ${(error as Error).message}\n`);
      return;
    }
    const authority = `${target.hostname}:${target.port || '80'}`;
    const refuseRequest = (status: number, proxyStatus: string | undefined) => {
      const body = refusalBody(authority, status, proxyStatus);
      res.writeHead(status, { ...(proxyStatus ? { 'proxy-status': proxyStatus } : {}), 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(body) }).end(body);
    };
    let tunnel;
    try {
      tunnel = await this.#openTunnel(authority, req);
    } catch (error) {
      const response = sidecarResponse(sidecarReasonForError(error));
      refuseRequest(response.status, response.headers['proxy-status']);
      log.warn({ event: 'local_request_failed', authority, err: (error as Error).message }, 'request could not reach the gateway');
      return;
    }
    if (tunnel.status !== 200) {
      finishRefused(tunnel.stream);
      refuseRequest(tunnel.status, tunnel.headers['proxy-status'] as string | undefined);
      return;
    }
    const headers = { ...req.headers };
    for (const hop of ['proxy-connection', 'proxy-authorization', 'connection', 'keep-alive']) delete headers[hop];
    const upstream = httpRequest({
      createConnection: () => tunnel.stream as unknown as Socket,
      method: req.method,
      path: `${target.pathname}${target.search}`,
      headers: { ...headers, host: target.host, connection: 'close' },
    });
    upstream.on('response', (response) => {
      res.writeHead(response.statusCode ?? 502, response.headers);
      response.pipe(res);
    });
    upstream.on('error', (error) => {
      if (!res.headersSent) res.writeHead(502).end();
      else res.destroy();
      log.debug({ err: error.message }, 'proxied request failed');
    });
    req.pipe(upstream);
  }

  async close(): Promise<void> {
    // server.close() waits for every open connection, so stop accepting first, then end them.
    const closed = Promise.all(this.#servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
    for (const socket of this.#agents) socket.destroy();
    await closed;
  }
}
