import { constants as h2, type ServerHttp2Stream } from 'node:http2';
import { connect, type Socket } from 'node:net';
import { classifyDialError, type DialErrorType } from './decision.js';

export type DialResult = { ok: true; socket: Socket } | { ok: false; type: DialErrorType; message: string };

/**
 * Opens the TCP connection to a destination within `timeoutMs`. Half-open is allowed so a FIN
 * from the destination does not close our sending side (and the other way round).
 */
export function dial(host: string, port: number, timeoutMs: number): Promise<DialResult> {
  return new Promise((resolve) => {
    const socket = connect({ host, port, allowHalfOpen: true, noDelay: true });
    let settled = false;
    const finish = (result: DialResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.removeListener('error', onError);
      resolve(result);
    };
    const timer = setTimeout(() => {
      socket.destroy();
      finish({ ok: false, type: classifyDialError(undefined, true), message: `no connection within ${timeoutMs} ms` });
    }, timeoutMs);
    const onError = (error: NodeJS.ErrnoException) => finish({ ok: false, type: classifyDialError(error, false), message: error.message });
    socket.once('error', onError);
    socket.once('connect', () => finish({ ok: true, socket }));
  });
}

export interface TunnelStats {
  readonly bytesUp: number;
  readonly bytesDown: number;
  readonly durationMs: number;
  readonly error?: string;
  /** Closed by the gateway after `idleTimeoutMs` without a byte either way. */
  readonly idleTimeout: boolean;
}

export const IDLE_TIMEOUT_ERROR = 'idle_timeout';

/**
 * Pipes an accepted CONNECT stream and a destination socket both ways with back-pressure.
 * Each direction ends on its own (END_STREAM ⇄ FIN), so half-closed protocols work. A TCP error
 * resets the stream with CONNECT_ERROR (RFC 9113 §8.5); a stream reset destroys the socket.
 * Resolves once both sides are closed.
 *
 * `idleTimeoutMs` (0 = off) closes a tunnel that carried no byte either way for that long. It is
 * the destination socket's own inactivity timer: every byte up is written to it and every byte
 * down is read from it, and Node re-arms that timer on both without a timer per chunk.
 */
export function pipeTunnel(stream: ServerHttp2Stream, socket: Socket, idleTimeoutMs = 0): Promise<TunnelStats> {
  const started = performance.now();
  return new Promise((resolve) => {
    let error: string | undefined;
    let streamClosed = false;
    let socketClosed = false;
    let idleTimeout = false;
    const done = () => {
      if (!streamClosed || !socketClosed) return;
      resolve({ bytesUp: socket.bytesWritten, bytesDown: socket.bytesRead, durationMs: performance.now() - started, idleTimeout, ...(error ? { error } : {}) });
    };

    if (idleTimeoutMs > 0) {
      socket.setTimeout(idleTimeoutMs, () => {
        idleTimeout = true;
        error ??= IDLE_TIMEOUT_ERROR;
        socket.destroy();
        // END_STREAM to the client, then RST_STREAM(NO_ERROR) for the half it may still hold open
        // (RFC 9113 §8.1: a server may do so once its response is complete).
        if (!stream.closed) {
          stream.end();
          stream.close(h2.NGHTTP2_NO_ERROR);
        }
      });
    }

    stream.pipe(socket);
    socket.pipe(stream);

    socket.on('error', (err) => {
      error ??= `destination: ${err.message}`;
      if (!stream.closed) stream.close(h2.NGHTTP2_CONNECT_ERROR);
    });
    socket.on('close', () => {
      socketClosed = true;
      done();
    });
    stream.on('error', (err) => {
      error ??= `client: ${err.message}`;
    });
    stream.on('close', () => {
      streamClosed = true;
      if (stream.rstCode !== h2.NGHTTP2_NO_ERROR) {
        error ??= `client reset the stream (code ${stream.rstCode})`;
        socket.destroy();
      } else if (!socket.writableEnded && !socket.destroyed) {
        // The client closed cleanly without its data reaching us: nothing more will come.
        socket.end();
      }
      done();
    });
  });
}
