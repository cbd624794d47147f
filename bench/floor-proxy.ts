/**
 * The Node floor for `bench/compare.ts --floor`: the least an HTTP/2 CONNECT proxy on node:http2
 * can do, to tell what the runtime costs from what our gateway adds. It asks for a client
 * certificate but checks nothing (no identity, no registry, no egress rule, no audit, no log
 * lines, no metrics, no limits): it is not a proxy anyone should run, only a measuring stick.
 * TLS, windows and stream limit are our gateway's, so the two differ only in the gateway's work.
 *
 * No imports from the project and only erasable TypeScript: bench/compare-proxies.ts strips its
 * types and runs it as plain JavaScript, so that its memory is the runtime's
 * (`node floor-proxy.mjs '{"port":…,"certPath":…,…}'`).
 */
import { readFileSync } from 'node:fs';
import { constants, createSecureServer, type ServerHttp2Stream } from 'node:http2';
import { connect } from 'node:net';
import { constants as cryptoConstants } from 'node:crypto';

interface FloorOptions {
  port: number;
  certPath: string;
  keyPath: string;
  maxStreams: number;
  streamWindow: number;
  sessionWindow: number;
  /** The gateway's maxSessionMemory (registry/flow-control.ts). */
  maxSessionMemoryMb: number;
  /** TLS 1.3 suites in order (the gateway's TLS13_SUITES). */
  tls13Ciphers: string;
}

const options = JSON.parse(process.argv[2] ?? '') as FloorOptions;

const server = createSecureServer({
  cert: readFileSync(options.certPath),
  key: readFileSync(options.keyPath),
  minVersion: 'TLSv1.3',
  ciphers: options.tls13Ciphers,
  honorCipherOrder: true,
  secureOptions: cryptoConstants.SSL_OP_NO_TICKET,
  requestCert: true,
  rejectUnauthorized: false,
  maxSessionMemory: options.maxSessionMemoryMb,
  settings: { maxConcurrentStreams: options.maxStreams, initialWindowSize: options.streamWindow, enablePush: false },
});

server.on('session', (session) => {
  session.on('error', () => {});
  session.once('connect', () => session.setLocalWindowSize(options.sessionWindow));
});

server.on('stream', (stream: ServerHttp2Stream, headers) => {
  stream.on('error', () => {});
  const authority = headers[':authority'];
  if (headers[':method'] !== 'CONNECT' || typeof authority !== 'string') {
    stream.close(constants.NGHTTP2_REFUSED_STREAM);
    return;
  }
  const colon = authority.lastIndexOf(':');
  const socket = connect({ host: authority.slice(0, colon).replace(/^\[|\]$/g, ''), port: Number(authority.slice(colon + 1)) });
  socket.on('error', () => stream.close(constants.NGHTTP2_CONNECT_ERROR));
  socket.once('connect', () => {
    if (stream.destroyed) {
      socket.destroy();
      return;
    }
    stream.respond({ ':status': 200 });
    stream.pipe(socket);
    socket.pipe(stream);
  });
  stream.once('close', () => socket.destroy());
  socket.once('close', () => stream.close());
});

server.listen(options.port, '127.0.0.1', () => process.stdout.write('ready\n'));
process.once('SIGTERM', () => process.exit(0));
