/**
 * The destination side of bench/compare.ts, run in its own process so neither the load generator
 * nor a proxy shares its event loop. Prints one JSON line {"echoPort","trafficPort"} and serves
 * until SIGTERM. Both listen on 127.0.0.1 only.
 *
 * - echo: writes back what it reads; after echoing a chunk that holds 'q' it ends its side (so does
 *   it when the peer ends). CONNECT rate, idle tunnels, revocation.
 * - traffic: 'D' + u64 n → sends n bytes and ends; 'U' + u64 n → reads n bytes, answers "ok" and
 *   a u32 count of the reads it took (how finely the proxy chopped the stream), and ends.
 *
 * The destination ends every tunnel itself: nghttpx (1.52, -s with an HTTP/1.1 backend) does not
 * pass a client's END_STREAM on to squid as a FIN, so a tunnel through it ends only when the
 * destination ends it (or on a timeout, or a reset). With the destination closing, the client
 * still ends its half with END_STREAM and never resets, and both proxies see the same sequence.
 */
import { once } from 'node:events';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { sendBytes } from './send-bytes.js';


function track(server: Server): Set<Socket> {
  const sockets = new Set<Socket>();
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  return sockets;
}

const QUIT = 0x71; // 'q'

const echo = createServer({ allowHalfOpen: true, noDelay: true }, (socket) => {
  socket.on('error', () => socket.destroy());
  socket.on('data', (chunk: Buffer) => {
    if (chunk.includes(QUIT)) socket.end(chunk);
    else socket.write(chunk);
  });
  socket.on('end', () => socket.end());
});

const traffic = createServer({ allowHalfOpen: true, noDelay: true }, (socket) => {
  socket.on('error', () => socket.destroy());
  socket.on('end', () => socket.end());
  let header: Buffer = Buffer.alloc(0);
  const onHeader = (chunk: Buffer) => {
    header = header.length === 0 ? chunk : Buffer.concat([header, chunk]);
    if (header.length < 9) return;
    socket.off('data', onHeader);
    const mode = header[0];
    const size = Number(header.readBigUInt64BE(1));
    if (mode === 0x44) {
      socket.resume();
      sendBytes(socket, size, () => socket.end());
    } else {
      let got = header.length - 9;
      let reads = got > 0 ? 1 : 0;
      const ok = () => {
        const answer = Buffer.from('ok\0\0\0\0', 'latin1');
        answer.writeUInt32BE(reads, 2);
        socket.end(answer);
      };
      if (got >= size) return void ok();
      const onData = (data: Buffer) => {
        got += data.length;
        reads++;
        if (got >= size) {
          socket.off('data', onData);
          socket.resume();
          ok();
        }
      };
      socket.on('data', onData);
    }
  };
  socket.on('data', onHeader);
});

const echoSockets = track(echo);
const trafficSockets = track(traffic);
echo.listen({ host: '127.0.0.1', port: 0, backlog: 4096 });
traffic.listen({ host: '127.0.0.1', port: 0, backlog: 4096 });
await Promise.all([once(echo, 'listening'), once(traffic, 'listening')]);

process.on('SIGTERM', () => {
  for (const socket of [...echoSockets, ...trafficSockets]) socket.destroy();
  echo.close();
  traffic.close();
  process.exit(0);
});
process.stdout.write(`${JSON.stringify({ echoPort: (echo.address() as AddressInfo).port, trafficPort: (traffic.address() as AddressInfo).port })}\n`);
