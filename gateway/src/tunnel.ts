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
}

/**
 * Pipes an accepted CONNECT stream and a destination socket both ways with back-pressure.
 * Each direction ends on its own (END_STREAM ⇄ FIN), so half-closed protocols work. A TCP error
 * resets the stream with CONNECT_ERROR (RFC 9113 §8.5); a stream reset destroys the socket.
 * Resolves once both sides are closed.
 */
export function pipeTunnel(stream: ServerHttp2Stream, socket: Socket): Promise<TunnelStats> {
  const started = performance.now();
  return new Promise((resolve) => {
    let error: string | undefined;
    let streamClosed = false;
    let socketClosed = false;
    const done = () => {
      if (!streamClosed || !socketClosed) return;
      resolve({ bytesUp: socket.bytesWritten, bytesDown: socket.bytesRead, durationMs: performance.now() - started, ...(error ? { error } : {}) });
    };

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
      } else if (!socket.writableEnded) {
        // The client closed cleanly without its data reaching us: nothing more will come.
        socket.end();
      }
      done();
    });
  });
}
