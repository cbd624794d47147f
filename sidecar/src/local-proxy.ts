import { once } from 'node:events';
import { createServer, request as httpRequest, STATUS_CODES, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { constants as h2, type ClientHttp2Stream } from 'node:http2';
import { chmodSync, lstatSync, rmSync } from 'node:fs';
import { connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import { sidecarReasonForError } from '../../core/errors.js';
import { pipeFramesToSocket } from '../../core/frame-pipe.js';
import { childTraceparent } from '../../core/traceparent.js';
import { normaliseDestination } from '../../registry/destination.js';
import type { GatewaySession, TunnelResponse } from './gateway-session.js';
import { rawResponse, refusal, sidecarRefusal, type Refusal } from './refusal.js';
import { TRACING_DISABLED, type SidecarTracing } from './tracing.js';

export interface LocalProxyOptions {
  readonly hosts: readonly string[];
  readonly port: number;
  /** Tried first when `port` is 0; a free port is picked when it is taken. */
  readonly preferredPort?: number;
  /** Also listen on this Unix socket (mode 0600), for isolated agents (`run`). */
  readonly socketPath?: string;
  readonly gateway: GatewaySession;
  readonly log: Logger;
  readonly tracing?: SidecarTracing;
  /** How long a CONNECT may wait for the gateway's answer (default ANSWER_DEADLINE_MS). */
  readonly answerDeadlineMs?: number;
}

/**
 * How long an agent's CONNECT (or plain request) may wait for the gateway's answer once a session
 * is there (the sidecar adds its connect wait) before the agent gets 504 `gateway_timeout`: past
 * the gateway's own deadlines (registry, dial), so only a session whose streams are all taken
 * (another agent holding max_streams_per_session tunnels) or a stalled gateway meets it. Without
 * it such a CONNECT waited for ever, and an agent that left meanwhile kept its connection
 * (black-box review).
 */
export const ANSWER_DEADLINE_MS = 30_000;

/** Removes a Unix socket no process listens on any more; refuses a live one or another kind of file. */
async function removeStaleSocket(path: string): Promise<void> {
  let stat;
  try {
    stat = lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!stat.isSocket()) throw Object.assign(new Error(`${path} exists and is not a socket`), { code: 'EEXIST' });
  const alive = await new Promise<boolean>((resolve) => {
    const probe = netConnect(path);
    probe.once('connect', () => (probe.destroy(), resolve(true)));
    probe.once('error', () => resolve(false));
  });
  if (alive) throw Object.assign(new Error(`another process listens on ${path}`), { code: 'EADDRINUSE' });
  rmSync(path, { force: true });
}

/**
 * How long a tunnel whose agent vanished may take to end cleanly: our END_STREAM makes the
 * gateway close the destination's half, and the destination (an HTTPS server reads EOF as the
 * end) closes, so the gateway ends the stream too. Only a stream still open after this is reset.
 */
export const ABANDON_LINGER_MS = 2000;

/** What an abandoned stream may still read (and drop) while it lingers. */
export const ABANDON_DRAIN_BYTES = 256 * 1024;

/** Streams already abandoned: an agent's 'error' and then its 'close' abandon once. */
const abandoned = new WeakSet<ClientHttp2Stream>();

/**
 * Resets this sidecar may send the gateway: a burst, refilled at a rate, both well inside
 * nghttp2's rapid-reset defence (in the gateway's Node, as in nghttpx and Apache: a burst of
 * 1,000, then 33 a second), past which the gateway drops the whole session and every tunnel on
 * it. Past the budget, an abandoned stream waits for the gateway to end it, or for a token.
 */
export class ResetBudget {
  readonly #burst: number;
  readonly #perSecond: number;
  #tokens: number;
  #at = performance.now();

  constructor(burst = 100, perSecond = 10) {
    this.#burst = burst;
    this.#perSecond = perSecond;
    this.#tokens = burst;
  }

  take(): boolean {
    const now = performance.now();
    this.#tokens = Math.min(this.#burst, this.#tokens + ((now - this.#at) / 1000) * this.#perSecond);
    this.#at = now;
    if (this.#tokens < 1) return false;
    this.#tokens -= 1;
    return true;
  }
}

/**
 * The agent is gone while its tunnel still carries something. Not a reset at once: agents that
 * close with a TCP reset (an aborted download, a socket closed with unread bytes) would count
 * toward the gateway's rapid-reset defence and, after ~1,000 of them, cost this sidecar its
 * session and every other agent's tunnel. Our half ends with END_STREAM and what still arrives is
 * dropped; a stream the gateway has not ended after ABANDON_LINGER_MS is reset within `budget`.
 */
function abandon(stream: ClientHttp2Stream, budget: ResetBudget): void {
  if (stream.closed || stream.destroyed || abandoned.has(stream)) return;
  abandoned.add(stream);
  // What still comes is read and dropped up to ABANDON_DRAIN_BYTES, then the stream is paused:
  // flow control stops the gateway, which stops reading the destination (review regression: a
  // destination that kept sending after the FIN was read at full speed for the whole linger).
  let drained = 0;
  stream.on('data', (chunk: Buffer) => {
    drained += chunk.length;
    if (drained >= ABANDON_DRAIN_BYTES) stream.pause();
  });
  stream.resume();
  if (!stream.writableEnded) stream.end();
  let timer: NodeJS.Timeout;
  const cancel = () => {
    if (stream.destroyed) return;
    // Ended by the gateway while paused with unread data: its 'end', and so its 'close', would never
    // come, and it would hold that data and its place in the session for the session's life
    // (review regression). Nothing is sent for a closed stream.
    if (stream.closed) return void stream.destroy();
    if (budget.take()) stream.close(h2.NGHTTP2_CANCEL);
    else timer = setTimeout(cancel, 1000);
  };
  timer = setTimeout(cancel, ABANDON_LINGER_MS);
  stream.once('close', () => clearTimeout(timer));
}

/** Relays bytes both ways; each side's end half-closes the other (END_STREAM ⇄ FIN). */
function relay(agent: Socket, stream: ClientHttp2Stream, budget: ResetBudget): void {
  agent.pipe(stream);
  // Gateway → agent: the DATA frames of one session read leave in one writev.
  pipeFramesToSocket(stream, agent);
  // The gateway or destination failed: the agent sees its connection reset, as with a direct dial.
  stream.on('close', () => {
    if (stream.rstCode !== 0) agent.destroy();
    else if (!agent.writableEnded) agent.end();
  });
  stream.on('error', () => agent.destroy());
  agent.on('error', () => abandon(stream, budget));
  agent.on('close', () => {
    // The agent is gone while the tunnel still carries something to it or from it (it was
    // destroyed, or sent its FIN and then vanished mid-download).
    if (!stream.closed && (!stream.writableEnded || !stream.readableEnded)) abandon(stream, budget);
  });
}

/**
 * The tunnel of a plain request as the socket node:http's client writes to. The client destroys
 * its socket when an answer is not HTTP (a TLS port, an echo) or is cut short; on the stream
 * itself that was a RST_STREAM each, and ~1,000 of them cost the sidecar its session and every
 * other agent's tunnel (stranger pass). Destroyed here, the stream ends as an abandoned one.
 */
function tunnelSocket(stream: ClientHttp2Stream, budget: ResetBudget): Duplex {
  const onData = (chunk: Buffer) => {
    if (!socket.push(chunk)) stream.pause();
  };
  const socket = new Duplex({
    write: (chunk: Buffer, _encoding, callback) => void stream.write(chunk, callback),
    final: (callback) => void stream.end(callback),
    read: () => void stream.resume(),
    destroy: (error, callback) => {
      stream.removeListener('data', onData);
      if (stream.closed) stream.destroy(); // nothing is sent for a closed stream
      else if (!stream.writableEnded || !stream.readableEnded) abandon(stream, budget);
      callback(error);
    },
  });
  stream.on('data', onData);
  stream.on('end', () => socket.push(null));
  stream.on('error', (error) => socket.destroy(error));
  // Reset by the gateway (the destination failed): the client sees its connection reset.
  stream.on('close', () => {
    if (stream.rstCode !== 0) socket.destroy(new Error(`stream reset (code ${stream.rstCode})`));
  });
  return socket;
}

function writeHead(agent: Socket, status: number, headers: Record<string, string | undefined>): void {
  const lines = [`HTTP/1.1 ${status} ${STATUS_CODES[status] ?? 'Unknown'}`];
  for (const [name, value] of Object.entries(headers)) if (value !== undefined) lines.push(`${name}: ${value}`);
  agent.write(`${lines.join('\r\n')}\r\n\r\n`);
}

/**
 * How long a refused agent keeps its connection: an agent that never reads its answer (or a
 * request cut off by the header timeout) would otherwise hold a descriptor for as long as it
 * likes (black-box review: 100 such connections held for the whole run).
 */
export const REFUSAL_LINGER_MS = 2000;

/** Ends a refused CONNECT with its status, proxy-status and the one-line body. */
function refuse(agent: Socket, answer: Refusal): void {
  if (agent.writable) agent.end(rawResponse(answer));
  const timer = setTimeout(() => agent.destroy(), REFUSAL_LINGER_MS);
  timer.unref();
  agent.once('close', () => clearTimeout(timer));
}

/** Answers a plain request with a refusal; the connection closes after it. */
function refuseRequest(res: ServerResponse, answer: Refusal): void {
  if (res.headersSent || res.destroyed) {
    res.destroy();
    return;
  }
  res.writeHead(answer.status, { ...answer.headers, connection: 'close' }).end(answer.body);
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

/** Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded to the destination. */
const HOP_BY_HOP = ['connection', 'proxy-connection', 'keep-alive', 'proxy-authorization', 'proxy-authenticate', 'te', 'trailer', 'upgrade'];

/**
 * A plain request's fields for the destination: without the hop-by-hop ones, nor any field the
 * agent's Connection header names (black-box review: `Connection: x-secret-hop` let
 * `X-Secret-Hop` through).
 */
export function endToEndHeaders(incoming: IncomingHttpHeaders): IncomingHttpHeaders {
  const headers = { ...incoming };
  const named = String(incoming.connection ?? '')
    .split(',')
    .map((name) => name.trim().toLowerCase())
    .filter(Boolean);
  for (const name of [...HOP_BY_HOP, ...named]) delete headers[name];
  return headers;
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
  readonly #resets = new ResetBudget();
  readonly addresses: AddressInfo[] = [];

  constructor(options: LocalProxyOptions) {
    this.#options = options;
  }

  #server(): Server {
    const server = createServer();
    server.on('connect', (req: IncomingMessage, socket: Socket, head: Buffer) => void this.#onConnect(req, socket, head));
    server.on('request', (req: IncomingMessage, res: ServerResponse) => void this.#onRequest(req, res));
    server.on('connection', (socket: Socket) => {
      this.#agents.add(socket);
      socket.once('close', () => this.#agents.delete(socket));
    });
    server.on('clientError', (_error, socket: Socket) => {
      // Not HTTP/1.1 at all (or headers too large): still a readable 400, never a bare close.
      if (socket.writable) refuse(socket, sidecarRefusal('malformed', 'request', 'request_invalid'));
      else socket.destroy();
    });
    return server;
  }

  /**
   * Listens on every host at one port, and on the Unix socket when one is given. With a
   * preferred port (the one a previous run of this sidecar took), that port is tried first and a
   * free one picked only when it is taken, so agents holding the old HTTPS_PROXY keep working.
   */
  async listen(): Promise<number> {
    const { preferredPort, port } = this.#options;
    let listened: number;
    if (port === 0 && preferredPort !== undefined && preferredPort !== 0) {
      try {
        listened = await this.#listenHosts(preferredPort);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EADDRINUSE' && (error as NodeJS.ErrnoException).code !== 'EACCES') throw error;
        this.#options.log.info({ event: 'preferred_port_taken', port: preferredPort }, 'the previous port is taken; picking a free one');
        await this.#closeServers();
        listened = await this.#listenHosts(0);
      }
    } else {
      listened = await this.#listenHosts(port);
    }
    if (this.#options.socketPath !== undefined) {
      try {
        await this.#listenSocket(this.#options.socketPath);
      } catch (error) {
        await this.#closeServers();
        throw error;
      }
    }
    return listened;
  }

  async #listenHosts(firstPort: number): Promise<number> {
    let port = firstPort;
    for (const host of this.#options.hosts) {
      const server = this.#server();
      try {
        server.listen({ host, port, ipv6Only: host.includes(':') });
        await once(server, 'listening');
      } catch (error) {
        // A host without ::1 (IPv6 disabled) must not stop the sidecar when 127.0.0.1 works.
        if (host.includes(':') && this.#servers.length > 0) {
          this.#options.log.warn({ host, err: (error as Error).message }, 'local listener not available');
          continue;
        }
        await this.#closeServers();
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
   * The Unix-socket listener `agent-gateway-sidecar run` reaches from inside an agent's network
   * namespace: mode 0600 from the moment it exists (umask around the bind), so only this user
   * may borrow the TPM identity through it. A socket left by a dead sidecar is replaced; a live
   * one, or any other file, is not.
   */
  async #listenSocket(path: string): Promise<void> {
    await removeStaleSocket(path);
    const server = this.#server();
    const umask = process.umask(0o177);
    try {
      server.listen({ path });
    } finally {
      process.umask(umask);
    }
    await once(server, 'listening');
    chmodSync(path, 0o600);
    this.#servers.push(server);
  }

  async #closeServers(): Promise<void> {
    const servers = this.#servers.splice(0);
    this.addresses.length = 0;
    await Promise.all(servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))));
  }

  /**
   * One CONNECT stream to the gateway for an agent request, inside a span when tracing is on
   * (it ends with the stream); otherwise with a fresh traceparent so the gateway still logs one.
   * Undefined when the gateway has not answered within the answer deadline: the caller answers
   * 504; a CONNECT still queued for a stream is dropped unsent, and a late answer is ended here.
   */
  async #openTunnel(authority: string, req: IncomingMessage): Promise<TunnelResponse | undefined> {
    const tracing = this.#options.tracing ?? TRACING_DISABLED;
    const span = tracing.startConnect(authority, req.headers);
    const headers = tracing.enabled ? span.headers : { traceparent: childTraceparent(req.headers.traceparent) };
    const late = new AbortController();
    const answer = this.#options.gateway.openTunnel(authority, headers, late.signal).then(
      (tunnel) => {
        if (tunnel.status !== 200) span.end(tunnel.status);
        else tunnel.stream.once('close', () => span.end(200, tunnel.stream.rstCode ? `stream reset (code ${tunnel.stream.rstCode})` : undefined));
        return tunnel;
      },
      (error: unknown) => {
        span.end(undefined, (error as Error).message);
        throw error;
      },
    );
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), this.#options.answerDeadlineMs ?? ANSWER_DEADLINE_MS)));
    const tunnel = await Promise.race([answer, deadline]).finally(() => clearTimeout(timer));
    if (tunnel !== undefined) return tunnel;
    this.#options.log.warn({ event: 'local_connect_timeout', authority }, 'the gateway did not answer the CONNECT in time');
    late.abort();
    // An answer that still comes is nobody's: a tunnel ends as an abandoned one.
    answer.then(
      (unwanted) => (unwanted.status === 200 ? abandon(unwanted.stream, this.#resets) : finishRefused(unwanted.stream)),
      () => {},
    );
    return undefined;
  }

  async #onConnect(req: IncomingMessage, agent: Socket, head: Buffer): Promise<void> {
    const { log } = this.#options;
    const authority = req.url ?? '';
    agent.on('error', () => {});
    if (!validAuthority(authority)) {
      refuse(agent, sidecarRefusal('CONNECT', authority, 'authority_invalid'));
      return;
    }
    let tunnel;
    try {
      tunnel = await this.#openTunnel(authority, req);
      if (tunnel === undefined) {
        refuse(agent, sidecarRefusal('CONNECT', authority, 'gateway_timeout'));
        return;
      }
    } catch (error) {
      log.warn({ event: 'local_connect_failed', authority, err: (error as Error).message }, 'CONNECT could not reach the gateway');
      refuse(agent, sidecarRefusal('CONNECT', authority, sidecarReasonForError(error)));
      return;
    }
    const { status, headers, stream } = tunnel;
    log.debug({ event: 'local_connect', authority, status }, 'CONNECT answered');
    if (status !== 200) {
      // The gateway's answer is the agent's answer: 403 stays 403 with its reason.
      finishRefused(stream);
      refuse(agent, refusal('CONNECT', authority, status, headers['proxy-status'] as string | undefined));
      return;
    }
    if (agent.destroyed) {
      abandon(stream, this.#resets);
      return;
    }
    writeHead(agent, 200, {});
    if (head.length > 0) stream.write(head);
    relay(agent, stream, this.#resets);
  }

  /** Absolute-URI plain HTTP (`GET http://host/path`) goes through a CONNECT to host:80. */
  async #onRequest(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const { log } = this.#options;
    const method = req.method ?? 'GET';
    // A proxy request names an absolute http:// URL; `GET /` means a client took the proxy for a server.
    let target: URL | undefined;
    try {
      target = /^http:\/\//i.test(req.url ?? '') ? new URL(req.url!) : undefined;
    } catch {
      target = undefined;
    }
    if (target === undefined) {
      refuseRequest(res, sidecarRefusal(method, req.url ?? '', 'request_invalid'));
      return;
    }
    const authority = `${target.hostname}:${target.port || '80'}`;
    if (!validAuthority(authority)) {
      refuseRequest(res, sidecarRefusal(method, authority, 'authority_invalid'));
      return;
    }
    let tunnel;
    try {
      tunnel = await this.#openTunnel(authority, req);
      if (tunnel === undefined) {
        refuseRequest(res, sidecarRefusal(method, authority, 'gateway_timeout'));
        return;
      }
    } catch (error) {
      refuseRequest(res, sidecarRefusal(method, authority, sidecarReasonForError(error)));
      log.warn({ event: 'local_request_failed', authority, err: (error as Error).message }, 'request could not reach the gateway');
      return;
    }
    if (tunnel.status !== 200) {
      finishRefused(tunnel.stream);
      refuseRequest(res, refusal(method, authority, tunnel.status, tunnel.headers['proxy-status'] as string | undefined));
      return;
    }
    // The agent left before its answer was all written (or before the tunnel was up): the tunnel
    // ends as an abandoned one. Otherwise a destination that never answers kept the stream, and its
    // place in the session, for as long as it liked (stranger pass).
    if (res.destroyed) {
      abandon(tunnel.stream, this.#resets);
      return;
    }
    const socket = tunnelSocket(tunnel.stream, this.#resets);
    res.once('close', () => {
      if (!res.writableFinished) socket.destroy();
    });
    const headers = endToEndHeaders(req.headers);
    const upstream = httpRequest({
      createConnection: () => socket as Socket,
      method: req.method,
      path: `${target.pathname}${target.search}`,
      headers: { ...headers, host: target.host, connection: 'close' },
    });
    upstream.on('response', (response) => {
      res.writeHead(response.statusCode ?? 502, response.headers);
      response.pipe(res);
    });
    upstream.on('error', (error) => {
      refuseRequest(res, sidecarRefusal(method, authority, 'upstream_failed'));
      log.debug({ err: error.message }, 'proxied request failed');
    });
    req.pipe(upstream);
  }

  async close(): Promise<void> {
    // server.close() waits for every open connection, so stop accepting first, then end them.
    const closed = this.#closeServers();
    for (const socket of this.#agents) socket.destroy();
    await closed; // Node unlinks the socket file as its server closes
  }
}
