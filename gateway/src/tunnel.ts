import { constants as h2, type ServerHttp2Stream } from 'node:http2';
import { connect, type Socket } from 'node:net';
import { classifyDialError, type DialErrorType } from '../../core/errors.js';

export type DialResult =
  | { readonly ok: true; readonly socket: Socket }
  | { readonly ok: false; readonly type: DialErrorType; readonly message: string }
  | { readonly ok: false; readonly type: 'aborted'; readonly message: string };

/**
 * Opens the TCP connection to a destination within `timeoutMs`, or gives up as soon as `signal`
 * fires (the client's stream is gone: nobody is left to tunnel for). Half-open is allowed so a
 * FIN from the destination does not close our sending side (and the other way round).
 */
export function dial(host: string, port: number, timeoutMs: number, signal: AbortSignal): Promise<DialResult> {
  if (signal.aborted) return Promise.resolve({ ok: false, type: 'aborted', message: 'client gone before the dial' });
  return new Promise((resolve) => {
    const socket = connect({ host, port, allowHalfOpen: true, noDelay: true });
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
 * How long a side that ended cleanly may take to finish before it is torn down: the client to
 * send its END_STREAM after ours, the destination socket to flush and close after the stream is
 * gone. Bounds what a vanished or stalling peer can hold (DESIGN §9a: nothing outlives the
 * peer by more than 1 s).
 */
export const TUNNEL_LINGER_MS = 500;

/**
 * One accepted CONNECT piped to its destination socket, both ways, with back-pressure. Each
 * direction ends on its own (END_STREAM ⇄ FIN), so half-closed protocols work.
 *
 * Every way it can end ends both sides within TUNNEL_LINGER_MS:
 * - the client resets the stream (any code but NO_ERROR), or its session dies: the socket is
 *   destroyed at once;
 * - the stream closes cleanly while the socket still holds unsent bytes (a destination that
 *   stopped reading): the socket gets TUNNEL_LINGER_MS to flush, then is destroyed;
 * - the destination fails: the stream is reset with CONNECT_ERROR (RFC 9113 §8.5);
 * - the destination closes, or the gateway closes the tunnel (close()): the stream gets
 *   END_STREAM, and a client that does not end its half within TUNNEL_LINGER_MS gets
 *   RST_STREAM(NO_ERROR), which RFC 9113 §8.1 allows once our response is complete.
 * Ending with END_STREAM first keeps bulk closes (revocation, shutdown) clear of the peer's
 * rapid-reset defence.
 */
export class Tunnel {
  readonly stream: ServerHttp2Stream;
  readonly socket: Socket;
  readonly done: Promise<TunnelStats>;
  readonly #started = performance.now();
  #closedBy: TunnelCloseDetail | undefined;
  #error: string | undefined;
  #streamClosed = false;
  #socketClosed = false;
  #linger: NodeJS.Timeout | undefined;
  #closedSince: number | undefined;
  #resolve!: (stats: TunnelStats) => void;

  constructor(stream: ServerHttp2Stream, socket: Socket, idleTimeoutMs: number) {
    this.stream = stream;
    this.socket = socket;
    this.done = new Promise((resolve) => (this.#resolve = resolve));

    // The destination socket's own inactivity timer: every byte up is written to it and every
    // byte down is read from it, and Node re-arms it on both without a timer per chunk.
    if (idleTimeoutMs > 0) socket.setTimeout(idleTimeoutMs, () => this.close('idle_timeout'));

    socket.on('error', (error) => {
      this.#error ??= `destination: ${error.message}`;
      if (!stream.closed && !stream.destroyed) stream.close(h2.NGHTTP2_CONNECT_ERROR);
    });
    socket.once('close', () => {
      this.#socketClosed = true;
      // Nowhere left to send upload bytes: drop what is buffered so the stream can finish.
      stream.unpipe(socket);
      stream.resume();
      this.#endStream();
      this.#settle();
    });
    stream.on('error', (error) => {
      this.#error ??= `client: ${error.message}`;
    });
    // Reset by the client (or its session) while our half was open. Node emits 'close' only once
    // the readable side is drained, and a stalled destination never drains it: act now.
    stream.once('aborted', () => this.#streamGone(`client reset the stream (code ${stream.rstCode})`));
    stream.once('close', () => {
      this.#streamClosed = true;
      if (stream.rstCode !== h2.NGHTTP2_NO_ERROR) {
        this.#error ??= `client reset the stream (code ${stream.rstCode})`;
        socket.destroy();
      } else if (!socket.destroyed) {
        // Clean close: let piped bytes reach the destination, but not forever.
        this.#lingerThen(() => socket.destroy());
      }
      this.#settle();
    });

    stream.pipe(socket);
    socket.pipe(stream);
  }

  get bytesUp(): number {
    return this.socket.bytesWritten;
  }

  get bytesDown(): number {
    return this.socket.bytesRead;
  }

  /**
   * Called periodically (TunnelTracker.sweep): a stream that HTTP/2 has closed but Node has not
   * (its readable side waits for a destination that stopped reading) is torn down once it has
   * been closed for TUNNEL_LINGER_MS. Returns true while the tunnel is open.
   */
  sweep(now: number): boolean {
    if (this.#streamClosed && this.#socketClosed) return false;
    const stream = this.stream;
    if (!this.#streamClosed && (stream.closed || stream.destroyed)) {
      this.#closedSince ??= now;
      if (now - this.#closedSince >= TUNNEL_LINGER_MS) this.#streamGone(stream.rstCode ? `client reset the stream (code ${stream.rstCode})` : 'stream closed with data the destination would not take');
    }
    return true;
  }

  /** Ends the tunnel on the gateway's initiative; the first detail given is the one recorded. */
  close(detail: TunnelCloseDetail): void {
    if (this.#streamClosed && this.#socketClosed) return;
    this.#closedBy ??= detail;
    this.socket.destroy();
  }

  /** The client side is gone: nothing more can be delivered either way. */
  #streamGone(error: string): void {
    this.#error ??= error;
    this.socket.destroy();
    if (!this.stream.destroyed) this.stream.destroy();
  }

  /** The destination side is gone: END_STREAM now, RST_STREAM(NO_ERROR) if the client lingers. */
  #endStream(): void {
    const stream = this.stream;
    if (stream.closed || stream.destroyed) return;
    // Bytes from the destination still buffered for the client go first; then END_STREAM.
    if (!stream.writableEnded) stream.end();
    this.#lingerThen(() => {
      if (!stream.closed && !stream.destroyed) stream.close(h2.NGHTTP2_NO_ERROR);
    });
  }

  #lingerThen(action: () => void): void {
    clearTimeout(this.#linger);
    this.#linger = setTimeout(action, TUNNEL_LINGER_MS);
  }

  #settle(): void {
    if (!this.#streamClosed || !this.#socketClosed) return;
    clearTimeout(this.#linger);
    this.#resolve({
      bytesUp: this.socket.bytesWritten,
      bytesDown: this.socket.bytesRead,
      durationMs: performance.now() - this.#started,
      ...(this.#closedBy ? { closedBy: this.#closedBy } : {}),
      ...(this.#error ? { error: this.#error } : {}),
    });
  }
}
