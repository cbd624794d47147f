import { once } from 'node:events';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';

export interface Forwarder {
  readonly port: number;
  close(): Promise<void>;
}

/**
 * A loopback TCP port that leads to the sidecar's Unix socket, byte for byte: the proxy address an
 * isolated agent sees. Half-closes pass through (the sidecar maps FIN to END_STREAM), and either
 * side failing ends both.
 */
export async function startForwarder(socketPath: string, host = '127.0.0.1', port = 0): Promise<Forwarder> {
  const open = new Set<Socket>();
  const server = createServer({ allowHalfOpen: true }, (agent) => {
    const sidecar = connect({ path: socketPath, allowHalfOpen: true });
    for (const socket of [agent, sidecar]) {
      open.add(socket);
      socket.once('close', () => open.delete(socket));
    }
    agent.pipe(sidecar);
    sidecar.pipe(agent);
    agent.on('error', () => sidecar.destroy());
    sidecar.on('error', () => agent.destroy());
    agent.once('close', () => sidecar.destroy());
    sidecar.once('close', () => agent.destroy());
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
