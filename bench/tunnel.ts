/**
 * Tunnel benchmark: single-tunnel throughput (download and upload) through the gateway against
 * direct TCP to the same server, and tunnel setup rate (CONNECT + registry lookup + dial), all in
 * one run so the ratios hold on a noisy machine. Everything runs on loopback.
 *
 *   node --import tsx bench/tunnel.ts [--mib 256] [--tunnels 2000]
 */
import { once } from 'node:events';
import { createServer, connect, type AddressInfo, type Socket } from 'node:net';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { parseConfig } from '../gateway/src/config.js';
import { createGateway } from '../gateway/src/gateway.js';
import { gatewaySession, request } from '../test/helpers/net.js';
import { clientCredentials, serverTls, TEST_OID } from '../test/helpers/pki.js';
import { createDatabase, testServer } from '../test/helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../test/helpers/registry-fixture.js';
import { CHUNK, sendBytes } from './send-bytes.js';

const { values } = parseArgs({ options: { mib: { type: 'string', default: '256' }, tunnels: { type: 'string', default: '2000' }, rounds: { type: 'string', default: '3' } } });
const BYTES = Number(values.mib) * 1024 * 1024;
const TUNNELS = Number(values.tunnels);
const ROUNDS = Number(values.rounds);

/** First byte 'D': the server sends BYTES and ends. 'U': it reads until the client ends, then answers "ok". */
async function trafficServer() {
  const server = createServer({ allowHalfOpen: true }, (socket) => {
    socket.on('error', () => {});
    socket.once('data', (first: Buffer) => {
      if (first[0] === 0x44) {
        sendBytes(socket, BYTES, () => socket.end());
      } else {
        socket.resume();
        socket.on('end', () => socket.end('ok'));
      }
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return server;
}

type Duplex = Socket | import('node:http2').ClientHttp2Stream;

async function download(stream: Duplex): Promise<number> {
  const started = performance.now();
  let received = 0;
  stream.on('data', (chunk: Buffer) => (received += chunk.length));
  stream.write('D');
  await once(stream, 'end');
  if (received !== BYTES) throw new Error(`download got ${received} bytes`);
  return performance.now() - started;
}

async function upload(stream: Duplex): Promise<number> {
  const started = performance.now();
  stream.write('U');
  let left = BYTES;
  while (left > 0) {
    const n = Math.min(left, CHUNK.length);
    left -= n;
    if (!stream.write(n === CHUNK.length ? CHUNK : CHUNK.subarray(0, n))) await once(stream, 'drain');
  }
  stream.end();
  stream.resume();
  await once(stream, 'end');
  return performance.now() - started;
}

const mbps = (ms: number) => BYTES / 1e6 / (ms / 1000);
const best = (xs: number[]) => Math.min(...xs);

const pgServer = await testServer();
try {
  const databaseUrl = await createDatabase(pgServer.url);
  const tls = await serverTls();
  const target = await trafficServer();
  const targetPort = (target.address() as AddressInfo).port;
  const destination = `127.0.0.1:${targetPort}`;
  const fixture = await RegistryFixture.connect(databaseUrl);
  const alice = await fixture.principal('org-bench', { notBefore: at(-DAY) });
  await fixture.delegate(alice.keyId, destination, { notBefore: at(-DAY) });
  const client = await clientCredentials({ identity: 'agent-bench' });
  await fixture.permit(alice, { identity: 'agent-bench', spkiDer: client.spkiDer }, destination);
  await fixture.close();

  const gateway = createGateway(
    parseConfig({
      server: { listen_addr: '127.0.0.1:0', tls_cert_path: tls.certPath, tls_key_path: tls.keyPath },
      policy: { client_ext_oid: TEST_OID, database_url: databaseUrl },
      observability: { log_level: 'warn' },
      // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
      egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
      admin: { listen_addr: '127.0.0.1:0' },
    }),
    { logger: pino({ level: 'warn' }) },
  );
  const { port } = await gateway.listen();
  const session = await gatewaySession(port, { caPem: tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });

  const results: Record<string, number[]> = { directDown: [], directUp: [], tunnelDown: [], tunnelUp: [] };
  for (let round = 0; round < ROUNDS; round++) {
    for (const [name, run] of [['Down', download], ['Up', upload]] as const) {
      const socket = connect({ host: '127.0.0.1', port: targetPort, allowHalfOpen: true });
      await once(socket, 'connect');
      results[`direct${name}`]!.push(await run(socket));
      socket.destroy();
      const { stream, status } = await request(session, destination);
      if (status !== 200) throw new Error(`CONNECT answered ${status}`);
      results[`tunnel${name}`]!.push(await run(stream));
    }
  }

  // Setup rate: CONNECT → registry lookup + signature check → dial → 200 → close, 50 in flight.
  const setupStarted = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: 50 }, async () => {
      while (next++ < TUNNELS) {
        const { stream, status } = await request(session, destination);
        if (status !== 200) throw new Error(`CONNECT answered ${status}`);
        stream.end('U');
        stream.resume();
        await once(stream, 'close');
      }
    }),
  );
  const setupMs = performance.now() - setupStarted;

  const report = {
    bytes_per_transfer: BYTES,
    rounds: ROUNDS,
    direct_tcp_download_MBps: Math.round(mbps(best(results.directDown!))),
    tunnel_download_MBps: Math.round(mbps(best(results.tunnelDown!))),
    download_ratio: +(best(results.directDown!) / best(results.tunnelDown!)).toFixed(3),
    direct_tcp_upload_MBps: Math.round(mbps(best(results.directUp!))),
    tunnel_upload_MBps: Math.round(mbps(best(results.tunnelUp!))),
    upload_ratio: +(best(results.directUp!) / best(results.tunnelUp!)).toFixed(3),
    tunnel_setups: TUNNELS,
    tunnel_setups_per_s: Math.round(TUNNELS / (setupMs / 1000)),
  };
  console.log(JSON.stringify(report, null, 2));
  session.destroy();
  await gateway.close(100);
  target.close();
} finally {
  pgServer.close();
}
