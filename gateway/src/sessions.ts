import { createHash } from 'node:crypto';
import type { ServerHttp2Session, ServerHttp2Stream } from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { SpanKind, type Span } from '@opentelemetry/api';
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { readPeerIdentity } from '../../registry/identity.js';
import type { GatewayConfig } from './config.js';
import type { EarlyDataAccount } from './early-data.js';
import type { LookupAsker } from './lookups.js';
import type { ClientAddress } from './proxy-front.js';
import type { GatewayTracing } from './tracing.js';
import { TUNNEL_LINGER_MS } from './tunnel.js';

/** A session's usable identity: what every CONNECT on it is authorised as. */
export interface SessionIdentity {
  readonly identity: string;
  readonly spkiDer: Buffer;
  readonly fingerprint: string;
  /** Limiter key: identity and key together, since the identity string alone proves nothing. */
  readonly limitKey: string;
}

/** What a CONNECT needs to know about its session. */
export interface PeerSession extends EarlyDataAccount, LookupAsker {
  readonly identity: SessionIdentity | undefined;
  /** Why the certificate yields no identity (log only). */
  readonly identityError: string | undefined;
  readonly fingerprint: string | undefined;
  readonly span: Span | undefined;
  /** The agent's address: the TCP peer, or what a trusted balancer's PROXY header said. */
  readonly client: ClientAddress;
  /**
   * A CONNECT on this session was answered; `allowed` when it got a tunnel. Sessions that were
   * never allowed anything live on short deadlines (see SessionGuard). `vouch`: the allowing
   * decision is current (no registry change since it was read), so the peer is vouched for; one a
   * revocation may have overtaken must not put a revoked key back in front.
   */
  answered(allowed: boolean, vouch?: boolean): void;
}

type ParsedPeer = Pick<PeerSession, 'identity' | 'identityError' | 'fingerprint'>;

/** Certificates seen recently: a reconnecting sidecar costs a hash, not a parse. */
const PEER_CACHE_ENTRIES = 10_000;

interface SessionState extends PeerSession {
  readonly session: ServerHttp2Session;
  readonly guard: SessionGuard;
  openStreams: number;
  idleTimer: NodeJS.Timeout | undefined;
  anonymousTimer: NodeJS.Timeout | undefined;
  /** A CONNECT of this peer was allowed (on this session, or recently): spared the strangers' deadline. */
  proven: boolean;
  /** The silence backstop in force for this session (0: none). */
  silentMs: number;
}

/**
 * How long an allowed CONNECT vouches for its peer's identity and key (their lookups go first,
 * lookups.ts; early-data.ts), unless a registry change comes first: after one, every peer is
 * vouched for again by its next allowed CONNECT, so a revoked key loses its place at once.
 */
const VOUCHED_FOR_MS = 10 * 60_000;

/** The session state a stream counts against, for the 'close' listener every stream shares. */
const SESSION_STATE = Symbol('agent-gateway.session-state');
type StreamOfSession = ServerHttp2Stream & { [SESSION_STATE]?: SessionState | undefined };

/**
 * How long a live session can go without a frame either way: each tunnel ends after
 * `idle_timeout_ms` without a byte, then the session gets GOAWAY after `session_idle_timeout_ms`
 * without a stream, so twice the longer of the two is never reached by a session that works.
 * 0 (no backstop) when either is off: a silent session may then be legitimately idle for ever.
 */
export function silenceBackstopMs(limits: Pick<GatewayConfig['limits'], 'idle_timeout_ms' | 'session_idle_timeout_ms'>): number {
  const { idle_timeout_ms: idle, session_idle_timeout_ms: sessionIdle } = limits;
  return idle > 0 && sessionIdle > 0 ? 2 * Math.max(idle, sessionIdle) : 0;
}

/** The share of max_session_age_ms by which one session's GOAWAY may come early (see sessionAgeMs). */
export const SESSION_AGE_SPREAD = 0.1;

/**
 * When one session gets its rebalancing GOAWAY: a uniform point in the last SESSION_AGE_SPREAD of
 * max_session_age_ms, never past it (0: never). Every session with the same deadline would go at
 * once after a restart or a failover, when the agents all reconnected together, and come back
 * together: a reconnection storm each max_session_age_ms, the opposite of spreading them.
 */
export function sessionAgeMs(maxAgeMs: number, random: () => number = Math.random): number {
  if (maxAgeMs <= 0) return 0;
  return Math.max(1, Math.ceil(maxAgeMs * (1 - SESSION_AGE_SPREAD * random())));
}

/**
 * Every HTTP/2 session from accept to close (DESIGN §9a): error handling from birth, a preface
 * deadline, GOAWAY after `session_idle_timeout_ms` without an open stream, a short life for
 * sessions without a usable identity, and release on TCP end (no CLOSE_WAIT). It reads the
 * client certificate once per session, bounded and cached by its hash.
 */
export class SessionGuard {
  readonly #config: GatewayConfig;
  readonly #limits: () => GatewayConfig['limits'];
  readonly #log: Logger;
  readonly #tracing: () => GatewayTracing | undefined;
  readonly #sessions = new Map<ServerHttp2Session, SessionState>();
  readonly #peers = new LRUCache<string, ParsedPeer>({ max: PEER_CACHE_ENTRIES });
  /** Limiter keys (identity and key) that had a CONNECT allowed recently: a reconnecting agent is vouched for at once. */
  readonly #vouched = new LRUCache<string, true>({ max: PEER_CACHE_ENTRIES, ttl: VOUCHED_FOR_MS });

  constructor(config: GatewayConfig, limits: () => GatewayConfig['limits'], log: Logger, tracing: () => GatewayTracing | undefined) {
    this.#config = config;
    this.#limits = limits;
    this.#log = log;
    this.#tracing = tracing;
  }

  get size(): number {
    return this.#sessions.size;
  }

  /** A registry change: no peer is vouched for until its next allowed CONNECT. */
  forgetVouched(): void {
    this.#vouched.clear();
  }

  #isVouched(identity: SessionIdentity | undefined): boolean {
    return identity !== undefined && this.#vouched.has(identity.limitKey);
  }

  sessions(): IterableIterator<ServerHttp2Session> {
    return this.#sessions.keys();
  }

  /** The state of a live session (undefined once it has closed). */
  get(session: ServerHttp2Session): PeerSession | undefined {
    return this.#sessions.get(session);
  }

  /**
   * Takes charge of a new session; returns its state. `connection` is the TLS socket under it
   * (session.socket refuses destroy()), for the silence backstop.
   */
  adopt(session: ServerHttp2Session, sessionWindowBytes: number, maxAgeMs: number, client: ClientAddress, connection?: TLSSocket): PeerSession {
    const limits = this.#limits();
    // The silence backstop: a session silent for longer than any live one can be (silenceBackstopMs)
    // is wedged; its connection is closed. Node 22's http2 wedges a session whose peer vanished
    // while the session's writes were stalled: no 'close', and session.destroy() keeps the socket.
    const onSilent = () => {
      this.#log.info({ event: 'session_silent', silent_ms: this.#sessions.get(session)?.silentMs }, 'session silent past every idle deadline: closing its connection');
      session.destroy();
      connection?.destroy();
    };
    // One listener for the session's life; rearmSilence() only moves the deadline.
    session.on('timeout', onSilent);
    const silentMs = silenceBackstopMs(limits);
    if (silentMs > 0) session.setTimeout(silentMs);
    // Node destroys a session on error; without a listener the error would end the process.
    session.on('error', (error) => this.#log.debug({ err: error.message, code: (error as NodeJS.ErrnoException).code }, 'session error'));
    session.on('frameError', (type, code) => this.#log.debug({ frame_type: type, code }, 'frame error'));
    const socket = session.socket as TLSSocket;
    // The peer sent FIN: an HTTP/2 client that half-closes is done. Node's http2 reads the socket
    // in C++, so nothing else would close our side; the connection would sit in CLOSE_WAIT.
    socket.once('end', () => session.destroy());
    try {
      session.setLocalWindowSize(sessionWindowBytes);
    } catch {
      // The session died in the same tick it was born; its 'close' cleans up.
    }

    const peer = this.#readPeer(socket);
    let span: Span | undefined;
    const tracing = this.#tracing();
    if (tracing?.enabled) {
      span = tracing.tracer.startSpan('agent_gateway.session', {
        kind: SpanKind.SERVER,
        attributes: {
          'network.peer.address': socket.remoteAddress ?? '',
          'network.peer.port': socket.remotePort ?? 0,
          'client.address': client.address,
          'client.port': client.port,
          'tls.protocol.version': socket.getProtocol() ?? '',
          'agent_gateway.identity_ok': peer.identity !== undefined,
          ...(peer.identity ? { 'agent_gateway.identity': peer.identity.identity } : { 'agent_gateway.identity_error': peer.identityError ?? '' }),
          ...(peer.fingerprint ? { 'agent_gateway.spki_fingerprint': peer.fingerprint } : {}),
        },
      });
    }
    const guard = this;
    const state: SessionState = {
      ...peer,
      span,
      client,
      session,
      guard,
      openStreams: 0,
      earlyDataBytes: 0,
      strangerLookupsWaiting: 0,
      idleTimer: undefined,
      anonymousTimer: undefined,
      proven: this.#isVouched(peer.identity),
      silentMs,
      get vouched() {
        return guard.#isVouched(this.identity);
      },
      answered: (allowed, vouch = allowed) => {
        if (allowed && state.identity) {
          state.proven = true;
          if (vouch) this.#vouched.set(state.identity.limitKey, true);
          clearTimeout(state.anonymousTimer);
        } else if (!state.proven) this.#armAnonymous(session, state);
      },
    };
    this.#sessions.set(session, state);

    // A TLS connection that never speaks HTTP/2 is closed at the handshake deadline.
    const preface = setTimeout(() => {
      this.#log.debug({ event: 'preface_timeout' }, 'no HTTP/2 preface: closing');
      session.destroy();
    }, limits.handshake_timeout_ms);
    session.once('remoteSettings', () => clearTimeout(preface));

    // Rebalancing: an old session is asked to go; its tunnels run to their end (no destroy).
    const ageMs = sessionAgeMs(maxAgeMs);
    const aged = ageMs > 0 ? setTimeout(() => goAway(session, () => state.openStreams === 0), ageMs) : undefined;
    aged?.unref();

    session.once('close', () => {
      clearTimeout(aged);
      clearTimeout(preface);
      clearTimeout(state.idleTimer);
      clearTimeout(state.anonymousTimer);
      this.#sessions.delete(session);
      span?.end();
    });
    if (!peer.identity) this.#log.info({ reason: peer.identityError, spki_fingerprint: peer.fingerprint }, 'client identity unusable: every CONNECT on this session will be denied');
    this.#armAnonymous(session, state);
    this.#armIdle(session, state);
    return state;
  }

  /** A stream was opened on `session`: it is no longer idle until its last stream closes. */
  streamOpened(session: ServerHttp2Session, stream: ServerHttp2Stream): void {
    const state = this.#sessions.get(session);
    if (!state) return;
    state.openStreams++;
    clearTimeout(state.idleTimer);
    state.idleTimer = undefined;
    // One listener shared by every stream (a stream may live for hours): 'close' comes once.
    (stream as StreamOfSession)[SESSION_STATE] = state;
    stream.on('close', SessionGuard.#onStreamClose);
  }

  static #onStreamClose(this: StreamOfSession): void {
    const state = this[SESSION_STATE];
    if (!state) return;
    this[SESSION_STATE] = undefined;
    state.openStreams--;
    if (state.openStreams === 0) state.guard.#armIdle(state.session, state);
  }

  /**
   * The idle deadlines changed (reload): an open session's silence backstop grows with them, or
   * ends when one is turned off, and never shrinks (its tunnels keep the idle deadline they were
   * opened with, and may be silent that long).
   */
  rearmSilence(): void {
    const silentMs = silenceBackstopMs(this.#limits());
    for (const [session, state] of this.#sessions) {
      if (session.destroyed || state.silentMs === 0 || (silentMs !== 0 && silentMs <= state.silentMs)) continue;
      state.silentMs = silentMs;
      session.setTimeout(silentMs);
    }
  }

  /** GOAWAY to every session (shutdown); those still open after `graceMs` are destroyed. */
  closeAll(): void {
    for (const session of this.#sessions.keys()) session.close();
  }

  destroyAll(): void {
    for (const session of this.#sessions.keys()) session.destroy();
  }

  #armIdle(session: ServerHttp2Session, state: SessionState): void {
    const idleMs = this.#limits().session_idle_timeout_ms;
    // Streams of a dead session close after it: no timer may outlive its session.
    if (idleMs === 0 || state.openStreams > 0 || !this.#sessions.has(session)) return;
    clearTimeout(state.idleTimer);
    state.idleTimer = setTimeout(() => {
      this.#log.debug({ event: 'session_idle_timeout', identity: state.identity?.identity }, 'session idle: GOAWAY');
      goAway(session, () => state.openStreams === 0);
    }, idleMs);
    state.idleTimer.unref();
  }

  /**
   * A session without a usable identity lives `handshake_timeout_ms` past its last answer. One
   * with an identity nobody has vouched for yet (no CONNECT allowed: a stranger's self-made
   * certificate looks the same as an idle sidecar's) gets the same deadline, enforced once
   * sessions fill half of `max_connections`, so strangers cannot hold the connection cap.
   */
  #armAnonymous(session: ServerHttp2Session, state: SessionState): void {
    clearTimeout(state.anonymousTimer);
    if (!this.#sessions.has(session)) return;
    state.anonymousTimer = setTimeout(() => {
      if (state.proven) return;
      const cap = this.#limits().max_connections;
      if (!state.identity || (cap > 0 && this.#sessions.size * 2 >= cap)) goAway(session, () => true);
      else this.#armAnonymous(session, state);
    }, this.#limits().handshake_timeout_ms);
    state.anonymousTimer.unref();
  }

  #readPeer(socket: TLSSocket): ParsedPeer {
    const raw = socket.getPeerX509Certificate()?.raw;
    if (!raw) return { identity: undefined, identityError: 'no client certificate', fingerprint: undefined };
    const hash = createHash('sha256').update(raw).digest('base64');
    let parsed = this.#peers.get(hash);
    if (!parsed) {
      const peer = readPeerIdentity(raw, this.#config.policy.client_ext_oid);
      const fingerprint = peer.spkiDer ? spkiFingerprint(peer.spkiDer) : undefined;
      parsed = peer.ok
        ? { identity: { identity: peer.identity, spkiDer: peer.spkiDer, fingerprint: fingerprint!, limitKey: `${peer.identity}\n${fingerprint}` }, identityError: undefined, fingerprint }
        : { identity: undefined, identityError: peer.reason, fingerprint };
      this.#peers.set(hash, parsed);
    }
    return parsed;
  }
}

/**
 * GOAWAY; then, if the peer has not closed the connection promptly and `mayDestroy` still holds
 * (no stream slipped in before our GOAWAY reached it), the connection is torn down.
 */
export function goAway(session: ServerHttp2Session, mayDestroy: () => boolean): void {
  if (session.destroyed || session.closed) return;
  session.close();
  setTimeout(() => {
    if (!session.destroyed && mayDestroy()) session.destroy();
  }, TUNNEL_LINGER_MS).unref();
}
