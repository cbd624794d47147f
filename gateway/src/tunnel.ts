import { constants as h2, type ServerHttp2Stream } from 'node:http2';
import { connect, type LookupFunction, type Socket } from 'node:net';
import { MAX_CLIENT_HELLO_BYTES, sniVerdict, type SniMode, type SniVerdict } from './client-hello.js';
import type { ResolvedAddress } from './egress.js';
import { classifyDialError, type DialErrorType } from '../../core/errors.js';
import { BytePipe, pipeFramesToSocket } from '../../core/frame-pipe.js';
import { ByteHold } from './byte-hold.js';
import type { EarlyBytes } from './early-data.js';

export type DialResult =
  | { readonly ok: true; readonly socket: Socket }
  | { readonly ok: false; readonly type: DialErrorType; readonly message: string }
  | { readonly ok: false; readonly type: 'aborted'; readonly message: string };

/**
 * Opens the TCP connection to a destination within `timeoutMs`, or gives up as soon as `signal`
 * fires (the client's stream is gone: nobody is left to tunnel for). Half-open is allowed so a
 * FIN from the destination does not close our sending side (and the other way round).
 */
export function dial(host: string, port: number, timeoutMs: number, signal: AbortSignal, vetted?: readonly ResolvedAddress[]): Promise<DialResult> {
  if (signal.aborted) return Promise.resolve({ ok: false, type: 'aborted', message: 'client gone before the dial' });
  return new Promise((resolve) => {
    // With vetted addresses, the name is never resolved again: the lookup hands back exactly
    // those, and Node's happy eyeballs (autoSelectFamily) tries them in turn.
    const lookup: LookupFunction | undefined = vetted
      ? (_hostname, options, callback) => {
          if (options.all) callback(null, vetted.map((a) => ({ address: a.address, family: a.family })));
          else callback(null, vetted[0]!.address, vetted[0]!.family);
        }
      : undefined;
    const socket = connect({ host, port, allowHalfOpen: true, noDelay: true, ...(lookup ? { lookup, autoSelectFamily: true } : {}) });
    let settled = false;
    const finish = (result: DialResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      socket.removeListener('error', onError);
      if (!result.ok) socket.destroy();
      resolve(result);
    };
    const timer = setTimeout(() => finish({ ok: false, type: classifyDialError(undefined, true), message: `no connection within ${timeoutMs} ms` }), timeoutMs);
    const onError = (error: NodeJS.ErrnoException) => finish({ ok: false, type: classifyDialError(error, false), message: error.message });
    const onAbort = () => finish({ ok: false, type: 'aborted', message: 'client gone during the dial' });
    signal.addEventListener('abort', onAbort, { once: true });
    socket.once('error', onError);
    socket.once('connect', () => finish({ ok: true, socket }));
  });
}

/** The SNI check of a tunnel's first client bytes (DESIGN §9c). */
export interface SniGuard {
  readonly mode: SniMode;
  /** The CONNECT host as normalised (IPv6 without brackets). */
  readonly host: string;
  readonly hostIsIp: boolean;
  readonly timeoutMs: number;
  /** Called once when the check closes the tunnel. */
  readonly onRefuse: (why: string) => void;
}

/** Why the gateway itself ended a tunnel (DESIGN §9b `detail`). */
export type TunnelCloseDetail = 'revoked' | 'expired' | 'max_lifetime' | 'sni_mismatch' | 'idle_timeout' | 'shutting_down';

export interface TunnelStats {
  readonly bytesUp: number;
  readonly bytesDown: number;
  readonly durationMs: number;
  /** Set when the gateway closed the tunnel on purpose. */
  readonly closedBy?: TunnelCloseDetail;
  /** What went wrong, when something did (client reset, destination error). */
  readonly error?: string;
}

/**
 * How long a side that has done its part may keep the other waiting before the gateway ends it:
 * the client to send its END_STREAM after ours, a stalled side after the gateway closed the
 * tunnel on policy. Bounds what a vanished or stalling peer can hold (DESIGN §9a).
 */
export const TUNNEL_LINGER_MS = 500;

/**
 * Ends our half of a stream that will carry nothing more. RST_STREAM(NO_ERROR) only once
 * everything we wrote has been sent (RFC 9113 §8.1: a server may reset once its response is
 * complete); with bytes still queued it is CANCEL, so the client cannot take a cut download for
 * a complete one. Node defers a NO_ERROR reset until pending writes finish and marks the stream
 * closed meanwhile, so with a full client window it would never be sent at all.
 */
export function finishStream(stream: ServerHttp2Stream): void {
  if (stream.closed || stream.destroyed) return;
  stream.close(stream.writableFinished ? h2.NGHTTP2_NO_ERROR : h2.NGHTTP2_CANCEL);
}

/**
 * Bytes the session has sent its client (-1 once it is gone). Node completes a stream write
 * only once all of it is sent, so a slow reader's progress shows on the session first. It is
 * session-wide: a stalled stream on a busy session waits for the session, bounded by its
 * stream limit, while its destination socket is already closed.
 */
function sessionBytesSent(stream: ServerHttp2Stream): number {
  const session = stream.session;
  if (!session || session.destroyed) return -1;
  return session.socket?.bytesWritten ?? -1;
}

/** How a tunnel is being wound down, once one side is done. */
type Ending =
  /** The destination is gone; the client is still reading what it sent (patience: the idle timeout). */
  | { readonly kind: 'down'; readonly stallLimitMs: number; lastProgressAt: number; lastQueued: number; lastSessionSent: number; finishedAt: number | undefined }
  /** The client is gone; the destination is still taking what the client sent. */
  | { readonly kind: 'up'; lastProgressAt: number; lastWritten: number };

/** Told once when both sides of a tunnel are closed. */
export interface TunnelOwner {
  tunnelEnded(stats: TunnelStats): void;
}

/** The tunnel a socket or stream belongs to, for the listeners every tunnel shares. */
const TUNNEL = Symbol('agent-gateway.tunnel');
type Carrier = { [TUNNEL]?: Tunnel };
/** The tunnel a socket or stream carries; none once the tunnel has settled. */
export const tunnelOf = (emitter: object): Tunnel | undefined => (emitter as Carrier)[TUNNEL];

/**
 * One accepted CONNECT piped to its destination socket, both ways, with back-pressure. Each
 * direction ends on its own (END_STREAM ⇄ FIN), so half-closed protocols work.
 *
 * How each end is bounded (the tracker's sweep drives the waits, every 250 ms):
 * - the client resets the stream, or its session dies: the socket is destroyed at once;
 * - the client ended cleanly while the destination still takes its last bytes: they flow while
 *   they move; no progress for TUNNEL_LINGER_MS destroys the socket;
 * - the destination fails: the stream is reset with CONNECT_ERROR (RFC 9113 §8.5);
 * - the destination closes: END_STREAM after the bytes still queued for the client, which may
 *   read them as slowly as it likes while they move (no progress for `idle_timeout_ms` resets it);
 *   once END_STREAM is sent, a client that does not end its half within TUNNEL_LINGER_MS is reset
 *   with NO_ERROR;
 * - the gateway closes the tunnel (close(): revocation, expiry, lifetime, idle, shutdown): the
 *   destination socket is destroyed and the stream gets END_STREAM; a client that has not taken
 *   it within TUNNEL_LINGER_MS is reset (CANCEL if bytes were dropped).
 * Ending with END_STREAM first keeps bulk closes clear of the peer's rapid-reset defence.
 *
 * Memory: a tunnel may sit idle for hours, ten thousand at a time. Its listeners are shared by
 * every tunnel (static methods that find theirs through a symbol on the socket or stream) and
 * its end is a call to its owner, not a promise someone awaits: per-tunnel closures, `once`
 * wrappers and suspended async frames were about half of an idle tunnel's heap.
 */
export class Tunnel {
  readonly stream: ServerHttp2Stream;
  readonly socket: Socket;
  readonly #owner: TunnelOwner;
  readonly #idleTimeoutMs: number;
  readonly #started = performance.now();
  #closedBy: TunnelCloseDetail | undefined;
  #error: string | undefined;
  #streamClosed = false;
  #socketClosed = false;
  #ending: Ending | undefined;
  #closedSince: number | undefined;
  /** Client → destination, once the first bytes are through the SNI check. */
  #up: BytePipe | undefined;

  /**
   * `early`: what the client sent before the answer (early-data.ts), delivered first; the stream
   * comes paused when given, and is resumed here.
   */
  constructor(stream: ServerHttp2Stream, socket: Socket, idleTimeoutMs: number, owner: TunnelOwner, guard?: SniGuard, early?: EarlyBytes) {
    this.stream = stream;
    this.socket = socket;
    this.#owner = owner;
    this.#idleTimeoutMs = idleTimeoutMs;
    (stream as Carrier)[TUNNEL] = this;
    (socket as Carrier)[TUNNEL] = this;

    // The destination socket's own inactivity timer: every byte up is written to it and every
    // byte down is read from it, and Node re-arms it on both without a timer per chunk.
    if (idleTimeoutMs > 0) {
      socket.setTimeout(idleTimeoutMs);
      socket.on('timeout', Tunnel.#onIdle);
    }
    socket.on('error', Tunnel.#onSocketError);
    socket.on('close', Tunnel.#onSocketClose);
    stream.on('error', Tunnel.#onStreamError);
    // Reset by the client (or its session) while our half was open. Node emits 'close' only once
    // the readable side is drained, and a stalled destination never drains it: act now.
    stream.on('aborted', Tunnel.#onStreamAborted);
    stream.on('close', Tunnel.#onStreamClose);

    // Bytes from the destination flow from the start (server-speaks-first protocols work);
    // the client's first bytes may be held for the SNI check.
    new BytePipe(socket, stream, false);
    if (guard && guard.mode !== 'off') this.#guardFirstBytes(guard, early);
    else this.#sendEarlyThenPipe(early);
  }

  static #onIdle(this: Socket): void {
    tunnelOf(this)?.close('idle_timeout');
  }

  static #onSocketError(this: Socket, error: Error): void {
    const tunnel = tunnelOf(this);
    if (!tunnel) return;
    tunnel.#error ??= `destination: ${error.message}`;
    const stream = tunnel.stream;
    if (!stream.closed && !stream.destroyed) stream.close(h2.NGHTTP2_CONNECT_ERROR);
  }

  static #onSocketClose(this: Socket): void {
    const tunnel = tunnelOf(this);
    if (tunnel) tunnel.#socketGone();
  }

  static #onStreamError(this: ServerHttp2Stream, error: Error): void {
    const tunnel = tunnelOf(this);
    if (tunnel) tunnel.#error ??= `client: ${error.message}`;
  }

  static #onStreamAborted(this: ServerHttp2Stream): void {
    const tunnel = tunnelOf(this);
    if (tunnel) tunnel.#streamGone(`client reset the stream (code ${this.rstCode})`);
  }

  static #onStreamClose(this: ServerHttp2Stream): void {
    const tunnel = tunnelOf(this);
    if (tunnel) tunnel.#streamEnded();
  }

  static #onStreamFinish(this: ServerHttp2Stream): void {
    const tunnel = tunnelOf(this);
    const ending = tunnel ? tunnel.#ending : undefined;
    if (ending?.kind === 'down') ending.finishedAt = performance.now();
  }

  #socketGone(): void {
    if (this.#socketClosed) return;
    this.#socketClosed = true;
    const stream = this.stream;
    // Nowhere left to send upload bytes: drop what is buffered so the stream can finish.
    this.#up?.detach();
    stream.resume();
    if (!stream.closed && !stream.destroyed) {
      if (!stream.writableEnded) stream.end();
      const now = performance.now();
      // After a gateway close, the client gets TUNNEL_LINGER_MS; after the destination's own
      // close, it may read at its pace while bytes move.
      const idleTimeoutMs = this.#idleTimeoutMs;
      const stallLimitMs = this.#closedBy ? TUNNEL_LINGER_MS : idleTimeoutMs > 0 ? idleTimeoutMs : Infinity;
      this.#ending = { kind: 'down', stallLimitMs, lastProgressAt: now, lastQueued: stream.writableLength, lastSessionSent: sessionBytesSent(stream), finishedAt: stream.writableFinished ? now : undefined };
      stream.once('finish', Tunnel.#onStreamFinish);
    }
    this.#settle();
  }

  #streamEnded(): void {
    if (this.#streamClosed) return;
    this.#streamClosed = true;
    const socket = this.socket;
    if (this.stream.rstCode !== h2.NGHTTP2_NO_ERROR) {
      this.#error ??= `client reset the stream (code ${this.stream.rstCode})`;
      socket.destroy();
    } else if (!socket.destroyed) {
      // Clean close: the client's last bytes go on to the destination while they move; nothing
      // can be delivered the other way any more (pipe() paused its source here too).
      socket.pause();
      this.#ending = { kind: 'up', lastProgressAt: performance.now(), lastWritten: socket.bytesWritten };
    }
    this.#settle();
  }

  /** Client → destination (core/frame-pipe.ts: the DATA frames of one session read leave in one writev). */
  #pipeUp(): void {
    this.#up = pipeFramesToSocket(this.stream, this.socket);
  }

  /** Without an SNI check: the early bytes go first, then the stream (or FIN, if it already ended). */
  #sendEarlyThenPipe(early: EarlyBytes | undefined): void {
    if (early && early.bytes.length > 0) this.socket.write(early.bytes);
    if (early?.ended) {
      this.socket.end();
      return;
    }
    this.#pipeUp();
    this.stream.resume();
  }

  /**
   * Holds the client's first bytes until they show a ClientHello whose server_name fits the
   * CONNECT host (or are not TLS, under `match`), at most MAX_CLIENT_HELLO_BYTES (16 KiB + 5) and
   * `timeoutMs` from the first byte. A refusal closes the tunnel before any client byte reaches
   * the destination. The bytes sent before the answer (`early`) are the first ones checked.
   */
  #guardFirstBytes(guard: SniGuard, early: EarlyBytes | undefined): void {
    const stream = this.stream;
    // Copied, not kept as Node's chunks (byte-hold.ts); a chunk that would take it past the
    // bound is judged with it in one concatenation, which the bound makes decisive.
    const hold = new ByteHold(MAX_CLIENT_HELLO_BYTES);
    let past: Buffer | undefined;
    const add = (chunk: Buffer) => {
      if (past) past = Buffer.concat([past, chunk]);
      else if (!hold.append(chunk)) past = Buffer.concat([hold.bytes(), chunk]);
    };
    const held = () => past ?? hold.bytes();
    let timer: NodeJS.Timeout | undefined;
    let decided = false;
    const finish = (verdict: SniVerdict, ended: boolean) => {
      if (decided || verdict.kind === 'wait') return;
      decided = true;
      stream.removeListener('data', onData);
      stream.removeListener('end', onEnd);
      clearTimeout(timer);
      if (verdict.kind === 'refuse') {
        this.#error ??= `sni: ${verdict.why}`;
        if (this.close('sni_mismatch')) guard.onRefuse(verdict.why);
        return;
      }
      // The destination went away while the first bytes were held: nothing to deliver them to.
      if (this.#socketClosed) return;
      const first = held();
      if (ended) {
        this.socket.end(first);
        return;
      }
      stream.pause();
      if (first.length > 0) this.socket.write(first);
      this.#pipeUp();
      stream.resume();
    };
    const armTimer = () => {
      timer ??= setTimeout(() => finish({ kind: 'refuse', why: `no complete ClientHello within ${guard.timeoutMs} ms` }, false), guard.timeoutMs);
    };
    const onData = (chunk: Buffer) => {
      add(chunk);
      armTimer();
      finish(sniVerdict(held(), guard.mode, guard.host, guard.hostIsIp, false), false);
    };
    const onEnd = () => finish(sniVerdict(held(), guard.mode, guard.host, guard.hostIsIp, true), true);
    if (early && early.bytes.length > 0) add(early.bytes);
    // The client ended before the answer: its stream will emit nothing more.
    if (early?.ended) {
      onEnd();
      return;
    }
    stream.on('data', onData);
    stream.once('end', onEnd);
    if (held().length > 0) {
      armTimer();
      finish(sniVerdict(held(), guard.mode, guard.host, guard.hostIsIp, false), false);
    }
    if (!decided) stream.resume();
  }

  get bytesUp(): number {
    return this.socket.bytesWritten;
  }

  get bytesDown(): number {
    return this.socket.bytesRead;
  }

  /**
   * Called every 250 ms by TunnelTracker.sweep: winds down a tunnel one of whose sides is done,
   * and notices a stream HTTP/2 closed under Node (its readable side waiting on a destination
   * that stopped reading). Returns true while the tunnel is open.
   */
  sweep(now: number): boolean {
    if (this.#streamClosed && this.#socketClosed) return false;
    const stream = this.stream;
    const ending = this.#ending;
    if (ending?.kind === 'down') {
      if (ending.finishedAt !== undefined) {
        // END_STREAM went out; the client keeps its half open.
        if (now - ending.finishedAt >= TUNNEL_LINGER_MS) finishStream(stream);
      } else if (stream.writableLength !== ending.lastQueued || sessionBytesSent(stream) !== ending.lastSessionSent) {
        // A write completed, or the session sent something (a slow reader shows there first).
        ending.lastQueued = stream.writableLength;
        ending.lastSessionSent = sessionBytesSent(stream);
        ending.lastProgressAt = now;
      } else if (now - ending.lastProgressAt >= ending.stallLimitMs) {
        this.#error ??= 'client stopped reading';
        finishStream(stream);
      }
    } else if (ending?.kind === 'up') {
      if (this.socket.bytesWritten !== ending.lastWritten) {
        ending.lastWritten = this.socket.bytesWritten;
        ending.lastProgressAt = now;
      } else if (now - ending.lastProgressAt >= TUNNEL_LINGER_MS) {
        this.#error ??= 'destination stopped reading';
        this.socket.destroy();
      }
    } else if (!this.#streamClosed && (stream.closed || stream.destroyed)) {
      this.#closedSince ??= now;
      if (now - this.#closedSince >= TUNNEL_LINGER_MS) this.#streamGone(stream.rstCode ? `client reset the stream (code ${stream.rstCode})` : 'stream closed with data the destination would not take');
    }
    return true;
  }

  /**
   * Ends the tunnel on the gateway's initiative; returns false when it was already ending. The
   * first detail given is the one recorded.
   */
  close(detail: TunnelCloseDetail): boolean {
    if (this.#closedBy || this.#socketClosed || this.socket.destroyed) return false;
    this.#closedBy = detail;
    this.socket.destroy();
    return true;
  }

  /** The client side is gone: nothing more can be delivered either way. */
  #streamGone(error: string): void {
    this.#error ??= error;
    this.socket.destroy();
    if (!this.stream.destroyed) this.stream.destroy();
  }

  #settle(): void {
    if (!this.#streamClosed || !this.#socketClosed) return;
    this.#ending = undefined;
    this.#owner.tunnelEnded({
      bytesUp: this.socket.bytesWritten,
      bytesDown: this.socket.bytesRead,
      durationMs: performance.now() - this.#started,
      ...(this.#closedBy ? { closedBy: this.#closedBy } : {}),
      ...(this.#error ? { error: this.#error } : {}),
    });
    // Node keeps a closed socket's and stream's native handle objects until the next full GC,
    // and a scavenge treats them as roots; through these links they would keep this tunnel, its
    // CONNECT and everything those reach alive and promoted to the old generation: measured, half
    // of what each CONNECT promoted (bench/README.md, "Garbage collection").
    (this.stream as Carrier)[TUNNEL] = undefined;
    (this.socket as Carrier)[TUNNEL] = undefined;
  }
}
