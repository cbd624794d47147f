import { once } from 'node:events';
import { request as httpRequest } from 'node:http';
import { createServer as createHttpsServer, type Server as HttpsServer } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { readFileSync } from 'node:fs';
import type { ServerTls } from './pki.js';

/** An HTTPS service standing in for docstore/messaging: `/health` and an echo of the path. */
export async function httpsService(tls: ServerTls, name: string): Promise<{ server: HttpsServer; port: number; close: () => Promise<void> }> {
  const server = createHttpsServer({ cert: readFileSync(tls.certPath), key: readFileSync(tls.keyPath) }, (req, res) => {
    if (req.url === '/health') return void res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ service: name, status: 'ok' }));
    if (req.url === '/upload' && req.method === 'POST') {
      let bytes = 0;
      req.on('data', (chunk: Buffer) => (bytes += chunk.length));
      req.on('end', () => res.writeHead(200).end(String(bytes)));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ service: name, path: req.url }));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    server,
    port: (server.address() as AddressInfo).port,
    close: () => {
      server.closeAllConnections();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/**
 * What an agent's Node HTTPS client does with HTTPS_PROXY: CONNECT through the proxy, then its
 * own TLS to the destination. Resolves with the CONNECT status and, on 200, the TLS socket.
 */
export async function connectViaProxy(proxyUrl: string, authority: string, caPem: string): Promise<{ status: number; statusLine: string; proxyStatus?: string; socket?: TLSSocket }> {
  const proxy = new URL(proxyUrl);
  const req = httpRequest({ host: proxy.hostname.replace(/^\[|\]$/g, ''), port: Number(proxy.port), method: 'CONNECT', path: authority, headers: { host: authority } });
  req.end();
  const [res, socket] = (await once(req, 'connect')) as [import('node:http').IncomingMessage, Socket];
  const status = res.statusCode ?? 0;
  const result = { status, statusLine: `${status} ${res.statusMessage}`, ...(res.headers['proxy-status'] ? { proxyStatus: String(res.headers['proxy-status']) } : {}) };
  if (status !== 200) {
    socket.destroy();
    return result;
  }
  const servername = authority.replace(/:\d+$/, '');
  const secure = tlsConnect({ socket, servername, ca: caPem });
  await once(secure, 'secureConnect');
  return { ...result, socket: secure };
}

/** Sends one HTTP/1.1 GET over an established TLS socket and returns status and body. */
export async function getOver(socket: TLSSocket, host: string, path: string): Promise<{ status: number; body: string }> {
  const req = httpRequest({ createConnection: () => socket, host, path, headers: { host, connection: 'close' } });
  req.end();
  const [res] = (await once(req, 'response')) as [import('node:http').IncomingMessage];
  let body = '';
  for await (const chunk of res) body += chunk;
  return { status: res.statusCode ?? 0, body };
}
