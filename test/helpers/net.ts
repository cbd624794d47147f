import { connect as h2connect, type ClientHttp2Session, type ClientHttp2Stream, type IncomingHttpHeaders } from 'node:http2';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { once } from 'node:events';
import { SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../../registry/flow-control.js';

export interface TlsClientMaterial {
  readonly certPem?: string;
  readonly privateKeyPem?: string;
  readonly caPem: string;
}

/** An HTTP/2 session to the gateway presenting the given client certificate (or none). */
export async function gatewaySession(port: number, tls: TlsClientMaterial, host = '127.0.0.1'): Promise<ClientHttp2Session> {
  const session = h2connect(`https://localhost:${port}`, {
    host,
    servername: 'localhost',
    ca: tls.caPem,
    ...(tls.certPem ? { cert: tls.certPem } : {}),
    ...(tls.privateKeyPem ? { key: tls.privateKeyPem } : {}),
    settings: { initialWindowSize: STREAM_WINDOW_BYTES },
  });
  session.on('error', () => {});
  await once(session, 'connect');
  session.setLocalWindowSize(SESSION_WINDOW_BYTES);
  return session;
}

export interface TunnelResponse {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly stream: ClientHttp2Stream;
}

/** Sends a request (CONNECT by default) and resolves with the response headers. */
export function request(session: ClientHttp2Session, authority: string, method = 'CONNECT', extraHeaders: Record<string, string> = {}): Promise<TunnelResponse> {
  const headers: Record<string, string> = { ':method': method, ':authority': authority, ...extraHeaders };
  if (method !== 'CONNECT') Object.assign(headers, { ':path': '/', ':scheme': 'https' });
  const stream = session.request(headers, { endStream: method !== 'CONNECT' });
  return new Promise((resolve, reject) => {
    stream.once('response', (response) => resolve({ status: Number(response[':status']), headers: response, stream }));
    stream.once('error', reject);
    stream.once('close', () => reject(new Error(`stream closed before a response (rst ${stream.rstCode})`)));
  });
}

/** Writes `payload`, half-closes, and collects everything the other side sends until it ends. */
export async function exchange(stream: ClientHttp2Stream | Socket, payload: Buffer): Promise<Buffer> {
  const chunks: Buffer[] = [];
  stream.on('data', (chunk: Buffer) => chunks.push(chunk));
  const ended = once(stream, 'end');
  stream.end(payload);
  await ended;
  return Buffer.concat(chunks);
}

/** A TCP echo server: writes back what it reads and half-closes when the peer does. */
export async function echoServer(): Promise<{ server: Server; port: number; readonly connections: number; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    socket.pipe(socket);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    server,
    port: (server.address() as AddressInfo).port,
    /** Connections the echo server still holds (the destination's descriptors, not a gateway's). */
    get connections() {
      return sockets.size;
    },
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A port nobody listens on (bound, then released). */
export async function closedPort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
