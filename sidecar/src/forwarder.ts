import { once } from 'node:events';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import { rawResponse, sidecarRefusal } from './refusal.js';

export interface Forwarder {
  readonly port: number;
  close(): Promise<void>;
}

/** How long a client whose sidecar is gone may take to send its request line before it is cut off. */
const REQUEST_WAIT_MS = 5000;

/**
 * Answers a client the sidecar cannot serve (its socket is gone: stopped or restarting) with the
 * sidecar's own 503 and a line, once the request line has arrived, instead of a bare reset.
 */
function sidecarUnavailable(agent: Socket, firstChunk: Promise<Buffer>): void {
  const timer = setTimeout(() => agent.destroy(), REQUEST_WAIT_MS);
  agent.resume(); // unpipe paused it; what follows the request line is read and dropped
  void firstChunk.then((chunk) => {
    clearTimeout(timer);
    const [method, target] = chunk.toString('latin1').split('\r\n', 1)[0]!.split(' ');
    if (agent.writable) agent.end(rawResponse(sidecarRefusal(method || 'request', target || '-', 'sidecar_unavailable')));
  });
}

/**
 * A loopback TCP port that leads to the sidecar's Unix socket, byte for byte: the proxy address an
 * isolated agent sees. Half-closes pass through (the sidecar maps FIN to END_STREAM), and either
 * side failing ends both.
 */
export async function startForwarder(socketPath: string, host = '127.0.0.1', port = 0): Promise<Forwarder> {
  const open = new Set<Socket>();
  const server = createServer({ allowHalfOpen: true }, (agent) => {
    const firstChunk = once(agent, 'data').then(([chunk]) => chunk as Buffer, () => Buffer.alloc(0));
    const sidecar = connect({ path: socketPath, allowHalfOpen: true });
    let connected = false;
    for (const socket of [agent, sidecar]) {
      open.add(socket);
      socket.once('close', () => open.delete(socket));
    }
    agent.on('error', () => sidecar.destroy());
    agent.once('close', () => sidecar.destroy());
    sidecar.once('connect', () => {
      connected = true;
      sidecar.once('close', () => agent.destroy());
    });
    sidecar.on('error', () => {
      if (connected) agent.destroy();
      else {
        agent.unpipe(sidecar);
        sidecarUnavailable(agent, firstChunk);
      }
    });
    agent.pipe(sidecar);
    sidecar.pipe(agent);
  });
  server.listen({ host, port });
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: async () => {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const socket of open) socket.destroy();
      await closed;
    },
  };
}
