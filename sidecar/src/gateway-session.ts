import { EventEmitter, once } from 'node:events';
import {
  connect as h2connect,
  constants as h2constants,
  type ClientHttp2Session,
  type ClientHttp2Stream,
  type IncomingHttpHeaders,
  type OutgoingHttpHeaders,
} from 'node:http2';
import type { SecureContext } from 'node:tls';
import type { Logger } from 'pino';
import { AgentGatewayError } from '../../registry/errors.js';
import { SESSION_WINDOW_BYTES, sidecarSessionMemoryMb, STREAM_WINDOW_BYTES } from '../../registry/flow-control.js';


export class GatewayUnavailableError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_GATEWAY_UNAVAILABLE', message, options);
  }
}

/**
 * The gateway never processed the stream: a GOAWAY crossed it (REFUSED_STREAM, or the session was
 * already going away when we asked). Sending it again on a new session is safe (RFC 9113 §8.7).
 */
class StreamRefusedError extends Error {}

/** Times one CONNECT is re-sent after a refusal (each on a newer session). */
const REFUSED_RETRIES = 2;

export interface GatewaySessionOptions {
  /** `https://host:port` of the gateway. */
  readonly url: string;
  /** One context for every (re)connect: it holds the TPM-backed key handle (until `rotate`). */
  readonly secureContext: SecureContext;
  /** `sha256:<hex>` of the key in `secureContext`, for log lines that say which key a session uses. */
  readonly keyFingerprint?: string;
  readonly servername?: string;
  /** How long a CONNECT waits for a session while (re)connecting before it gets 503. */
  readonly connectWaitMs: number;
  readonly pingIntervalMs: number;
  readonly backoffInitialMs: number;
  readonly backoffMaxMs: number;
  /**
   * HTTP/2 receive windows (downloads are bounded by them). Default: registry/flow-control.ts,
   * shared with the gateway; overridable to measure alternatives (bench/sidecar.ts).
   */
  readonly streamWindowBytes?: number;
  readonly sessionWindowBytes?: number;
  readonly log: Logger;
}

export interface TunnelResponse {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly stream: ClientHttp2Stream;
}

/**
 * The sidecar's one HTTP/2 session to the gateway, shared by every agent connection. It
 * reconnects with capped exponential back-off; a GOAWAY lets the old session drain while new
 * streams go to a fresh one; PINGs find dead peers that never closed the socket.
 */
export class GatewaySession extends EventEmitter {
  readonly #options: GatewaySessionOptions;
  #current: ClientHttp2Session | undefined;
  #connecting = false;
  #closed = false;
  #attempt = 0;
  #retryTimer: NodeJS.Timeout | undefined;
  #pingTimer: NodeJS.Timeout | undefined;
  #secureContext: SecureContext;
  #keyFingerprint: string | undefined;
  /** A rotation waits for a session with the new key; the old session serves until it is up. */
  #rotating = false;
  #drainTimeoutMs = 0;
  /** Sessions of rotated-out keys, running their tunnels to their end. */
  readonly #draining = new Set<ClientHttp2Session>();
  /** Which key each session presented, and how many CONNECT streams it has open. */
  readonly #sessionKeys = new WeakMap<ClientHttp2Session, string | undefined>();
  readonly #openStreams = new WeakMap<ClientHttp2Session, number>();
  /** TLS sessions established so far (each one is a TPM-signed handshake). */
  handshakes = 0;

  constructor(options: GatewaySessionOptions) {
    super();
    this.#options = options;
    this.#secureContext = options.secureContext;
    this.#keyFingerprint = options.keyFingerprint;
  }

  /** The key new sessions use. */
  get keyFingerprint(): string | undefined {
    return this.#keyFingerprint;
  }

  /**
   * Moves to a new key without dropping a tunnel: a second session is opened with the new
   * context while the current one keeps serving new CONNECTs; once it is up it takes every new
   * CONNECT and the old session is closed gracefully (its open streams run to their end), cut
   * after `drainTimeoutMs`. A failed handshake is retried with back-off, the old session serving
   * meanwhile. The old session's end is logged (`gateway_session_drained`).
   */
  rotate(secureContext: SecureContext, options: { keyFingerprint?: string; drainTimeoutMs: number }): void {
    if (this.#closed) return;
    this.#secureContext = secureContext;
    this.#keyFingerprint = options.keyFingerprint;
    this.#rotating = true;
    this.#drainTimeoutMs = options.drainTimeoutMs;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#attempt = 0;
    this.#connect();
  }

  #drain(session: ClientHttp2Session, fingerprint: string | undefined, drainTimeoutMs: number): void {
    const { log } = this.#options;
    this.#draining.add(session);
    log.info({ event: 'gateway_session_draining', spki_fingerprint: fingerprint, drain_timeout_ms: drainTimeoutMs }, 'old key\'s session draining: its tunnels run to their end, new CONNECTs use the new key');
    let reason: 'drained' | 'drain_timeout' = 'drained';
    let streamsCut = 0;
    const timer = setTimeout(() => {
      reason = 'drain_timeout';
      streamsCut = this.#openStreams.get(session) ?? 0;
      session.destroy();
    }, drainTimeoutMs);
    timer.unref();
    session.once('close', () => {
      clearTimeout(timer);
      this.#draining.delete(session);
      (reason === 'drained' ? log.info : log.warn).call(log, { event: 'gateway_session_drained', spki_fingerprint: fingerprint, reason, streams_cut: streamsCut }, reason === 'drained' ? 'old key\'s session drained' : 'old key\'s session cut by the drain timeout');
    });
    // Graceful: GOAWAY, no new streams; closes by itself once the last stream has ended.
    session.close();
  }

  get connected(): boolean {
    const s = this.#current;
    return !!s && !s.closed && !s.destroyed && s.socket?.readyState === 'open';
  }

  start(): void {
    this.#connect();
  }

  #connect(): void {
    if (this.#closed || this.#connecting || (this.connected && !this.#rotating)) return;
    this.#connecting = true;
    const { url, servername, log } = this.#options;
    const secureContext = this.#secureContext;
    const fingerprint = this.#keyFingerprint;
    const streamWindow = this.#options.streamWindowBytes ?? STREAM_WINDOW_BYTES;
    const session = h2connect(url, {
      secureContext,
      ...(servername ? { servername } : {}),
      settings: { initialWindowSize: streamWindow, enablePush: false },
      maxSessionMemory: sidecarSessionMemoryMb(streamWindow),
    });
    this.#sessionKeys.set(session, fingerprint);
    let established = false;
    // Why a connect failed (TLS verification, refused, …): the warning below is what operators see.
    let lastError: string | undefined;
    const lost = (why: string) => {
      if (this.#draining.has(session)) return; // #drain reports it
      if (this.#current === session) this.#current = undefined;
      if (!established) this.#connecting = false;
      if (!this.#closed) {
        log.warn({ event: 'gateway_session_lost', reason: why, ...(lastError ? { err: lastError } : {}) }, 'gateway session lost');
        this.#scheduleReconnect();
      }
      this.emit('disconnected');
    };
    session.once('connect', () => {
      established = true;
      this.#connecting = false;
      this.#attempt = 0;
      this.handshakes++;
      session.setLocalWindowSize(this.#options.sessionWindowBytes ?? SESSION_WINDOW_BYTES);
      const previous = this.#current;
      if (secureContext === this.#secureContext) this.#rotating = false;
      this.#current = session;
      log.info({ event: 'gateway_session_up', url, spki_fingerprint: fingerprint }, 'gateway session established');
      // Only a rotation opens a session beside a live one; the one it replaces drains.
      if (previous && previous !== session && !previous.closed && !previous.destroyed) this.#drain(previous, this.#sessionKeys.get(previous), this.#drainTimeoutMs);
      // A session still opened with an older key finished first: the rotation needs another one.
      if (this.#rotating) this.#connect();
      this.emit('connected');
    });
    session.once('goaway', () => {
      // Streams already open finish on the old session; new ones need a new session now.
      if (this.#current === session) this.#current = undefined;
      this.#connect();
    });
    session.on('error', (error: Error) => {
      lastError = error.message;
      log.debug({ err: error.message }, 'gateway session error');
    });
    session.once('close', () => lost(established ? 'closed' : 'connect failed'));
  }

  #scheduleReconnect(): void {
    if (this.#retryTimer || this.#closed) return;
    const { backoffInitialMs, backoffMaxMs } = this.#options;
    const delay = Math.min(backoffMaxMs, backoffInitialMs * 2 ** this.#attempt++);
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      this.#connect();
    }, delay);
    this.#retryTimer.unref();
  }

  #startPings(): void {
    this.#pingTimer = setInterval(() => {
      const session = this.#current;
      if (!session || !this.connected) return;
      const timeout = setTimeout(() => session.destroy(new Error('PING timeout')), this.#options.pingIntervalMs);
      session.ping((error) => {
        clearTimeout(timeout);
        if (error && !session.destroyed) session.destroy(error);
      });
    }, this.#options.pingIntervalMs);
    this.#pingTimer.unref();
  }

  /** The live session, waiting up to `connectWaitMs` for one while (re)connecting. */
  async session(): Promise<ClientHttp2Session> {
    if (this.connected) return this.#current!;
    if (this.#closed) throw new GatewayUnavailableError('sidecar is shutting down');
    this.#connect();
    const signal = AbortSignal.timeout(this.#options.connectWaitMs);
    try {
      while (!this.connected) await once(this, 'connected', { signal });
    } catch {
      throw new GatewayUnavailableError(`no session to the gateway within ${this.#options.connectWaitMs} ms`);
    }
    return this.#current!;
  }

  /**
   * Opens a CONNECT stream and resolves with the gateway's response headers. A stream the gateway
   * refused unprocessed (a replica draining or rebalancing sent GOAWAY as we asked) goes again
   * on a new session, so the agent never sees that race.
   */
  async openTunnel(authority: string, extraHeaders: OutgoingHttpHeaders = {}, signal?: AbortSignal): Promise<TunnelResponse> {
    for (let attempt = 0; ; attempt++) {
      const session = await this.session();
      if (signal?.aborted) throw new GatewayUnavailableError('the agent was answered before a session was ready');
      try {
        return await this.#request(session, authority, extraHeaders, signal);
      } catch (error) {
        if (!(error instanceof StreamRefusedError)) throw error;
        // That session takes no new streams: its open tunnels finish, the next attempt waits for its successor.
        if (this.#current === session) {
          this.#current = undefined;
          session.close();
        }
        if (attempt >= REFUSED_RETRIES) throw new GatewayUnavailableError(`gateway refused the stream ${attempt + 1} times: ${error.message}`);
        this.#options.log.debug({ event: 'connect_retried', err: error.message }, 'CONNECT refused unprocessed: sending it on a new session');
      }
    }
  }

  /**
   * `signal`: the agent was answered without us (the answer deadline). A stream still queued for a
   * free slot (the session at the gateway's stream limit) is then dropped before it is ever sent,
   * which costs no frame; one already sent waits for its answer, and the caller ends it.
   */
  #request(session: ClientHttp2Session, authority: string, extraHeaders: OutgoingHttpHeaders, signal?: AbortSignal): Promise<TunnelResponse> {
    let stream: ClientHttp2Stream;
    try {
      stream = session.request({ ':method': 'CONNECT', ':authority': authority, ...extraHeaders });
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ERR_HTTP2_GOAWAY_SESSION' || code === 'ERR_HTTP2_INVALID_SESSION') return Promise.reject(new StreamRefusedError((error as Error).message));
      throw error;
    }
    const refused = () => stream.rstCode === h2constants.NGHTTP2_REFUSED_STREAM;
    // Counted per session: a drain timeout reports how many tunnels it cut.
    this.#openStreams.set(session, (this.#openStreams.get(session) ?? 0) + 1);
    stream.once('close', () => this.#openStreams.set(session, (this.#openStreams.get(session) ?? 1) - 1));
    return new Promise((resolve, reject) => {
      const onClose = () => reject(refused() ? new StreamRefusedError('REFUSED_STREAM') : new GatewayUnavailableError(`gateway closed the stream before answering (code ${stream.rstCode})`));
      const onAbort = () => {
        if (stream.pending) stream.close(h2constants.NGHTTP2_CANCEL);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      stream.once('close', () => signal?.removeEventListener('abort', onAbort));
      stream.once('response', (headers) => {
        signal?.removeEventListener('abort', onAbort);
        stream.removeListener('close', onClose);
        resolve({ status: Number(headers[':status']), headers, stream });
      });
      stream.once('error', (error) => reject(refused() ? new StreamRefusedError(error.message) : new GatewayUnavailableError(`CONNECT stream failed: ${error.message}`, { cause: error })));
      stream.once('close', onClose);
    });
  }

  run(): this {
    this.start();
    this.#startPings();
    return this;
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    clearInterval(this.#pingTimer);
    const session = this.#current;
    this.#current = undefined;
    for (const old of this.#draining) old.destroy();
    if (session && !session.closed) {
      const closed = once(session, 'close');
      session.close();
      const timer = setTimeout(() => session.destroy(), 2000);
      await closed;
      clearTimeout(timer);
    }
  }
}

