/**
 * Sidecar benchmark: one tunnel agent → sidecar → gateway → TLS server, against direct TLS to the
 * same server, all in one run so the ratios hold on a noisy machine. Everything is on loopback.
 *
 * - throughput of a single tunnel, download and upload, best of N rounds, with the windows of
 *   registry/flow-control.ts and with Node's default 64 KiB windows on both HTTP/2 ends
 *   (a second gateway and sidecar pair; the file itself is not changed);
 * - time to first byte of a new CONNECT (CONNECT → 200, and → first byte over the agent's TLS);
 * - the cost of a new TLS session to the gateway with the TPM-held key against a software key.
 *
 * The sidecar's key lives in a swtpm behind tpm2-abrmd (tpm2-pkcs11 + libp11 engine), as in
 * production; `--key software` uses an in-memory key instead. The TLS server, each gateway and
 * each sidecar run in their own process (this file, started with `--role`), as deployed; this
 * process is the agent. On a 2-core machine they still share the CPUs, which is what bounds
 * the tunnel: every byte is encrypted and decrypted once and framed through four event loops.
 *
 *   node --import tsx bench/sidecar.ts [--mib 256] [--rounds 3] [--ttfb 50] [--handshakes 30] [--key tpm|software]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { connect as netConnect, type AddressInfo, type Socket } from 'node:net';
import { connect as tlsConnect, createSecureContext, createServer as createTlsServer, type SecureContext, type TLSSocket } from 'node:tls';
import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import type { ServerHttp2Session } from 'node:http2';
import { tuneHeapForBytePath } from '../core/heap-tuning.js';
import { SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../registry/flow-control.js';
import { startSidecar } from '../sidecar/src/sidecar.js';
import { loadTlsIdentity, type TlsIdentity } from '../sidecar/src/tls-identity.js';
import { startTestGateway } from '../test/helpers/gateway.js';
import { clientCredentials, serverTls, TEST_OID, type ServerTls } from '../test/helpers/pki.js';
import { createDatabase, testServer } from '../test/helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../test/helpers/registry-fixture.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../test/helpers/swtpm.js';
import { cpuMs } from './proc.js';
import { CHUNK, sendBytes } from './send-bytes.js';

const { values } = parseArgs({
  options: {
    mib: { type: 'string', default: '256' },
    rounds: { type: 'string', default: '3' },
    ttfb: { type: 'string', default: '50' },
    handshakes: { type: 'string', default: '30' },
    key: { type: 'string', default: 'tpm' },
    role: { type: 'string', default: 'main' },
    windows: { type: 'string', default: 'current' },
  },
});
const BYTES = Number(values.mib) * 1024 * 1024;
const ROUNDS = Number(values.rounds);
const TTFB_SAMPLES = Number(values.ttfb);
const HANDSHAKES = Number(values.handshakes);
const USE_TPM = values.key !== 'software';
const NODE_DEFAULT_WINDOW = 65_535;
const HOST = 'bench.test';

/**
 * The TLS server: 'D' + u64 n → it sends n bytes; 'U' + u64 n → it reads n bytes, then answers
 * "ok". Lengths instead of half-close, which TLS does not offer portably.
 */
async function trafficServer(certPath: string, keyPath: string) {
  const server = createTlsServer({ cert: readFileSync(certPath), key: readFileSync(keyPath) }, (socket) => {
    socket.on('error', () => {});
    let header = Buffer.alloc(0);
    const onHeader = (chunk: Buffer) => {
      header = Buffer.concat([header, chunk]);
      if (header.length < 9) return;
      socket.off('data', onHeader);
      const mode = header[0];
      const size = Number(header.readBigUInt64BE(1));
      const rest = header.subarray(9);
      if (mode === 0x44) {
        sendBytes(socket, size);
      } else {
        let got = rest.length;
        const done = () => socket.write('ok');
        if (got >= size) return void done();
        socket.on('data', (data: Buffer) => {
          got += data.length;
          if (got >= size) done();
        });
      }
    };
    socket.on('data', onHeader);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return server;
}

function header(mode: 'D' | 'U', size: number): Buffer {
  const buffer = Buffer.alloc(9);
  buffer[0] = mode.charCodeAt(0);
  buffer.writeBigUInt64BE(BigInt(size), 1);
  return buffer;
}

async function download(socket: TLSSocket, size = BYTES): Promise<number> {
  const started = performance.now();
  let received = 0;
  socket.write(header('D', size));
  await new Promise<void>((resolve) => {
    const onData = (chunk: Buffer) => {
      received += chunk.length;
      if (received >= size) {
        socket.off('data', onData);
        resolve();
      }
    };
    socket.on('data', onData);
  });
  return performance.now() - started;
}

async function upload(socket: TLSSocket): Promise<number> {
  const started = performance.now();
  const answer = once(socket, 'data');
  socket.write(header('U', BYTES));
  let left = BYTES;
  while (left > 0) {
    const n = Math.min(left, CHUNK.length);
    left -= n;
    if (!socket.write(n === CHUNK.length ? CHUNK : CHUNK.subarray(0, n))) await once(socket, 'drain');
  }
  await answer;
  return performance.now() - started;
}

/** What an agent does with HTTPS_PROXY: CONNECT through the sidecar, then its own TLS. */
async function viaSidecar(port: number, serverPort: number, ca: string): Promise<{ socket: TLSSocket; connectMs: number }> {
  const started = performance.now();
  const raw: Socket = netConnect({ host: '127.0.0.1', port });
  await once(raw, 'connect');
  raw.write(`CONNECT ${HOST}:${serverPort} HTTP/1.1\r\nhost: ${HOST}:${serverPort}\r\n\r\n`);
  let head = '';
  while (!head.includes('\r\n\r\n')) head += ((await once(raw, 'data')) as [Buffer])[0].toString('latin1');
  if (!head.startsWith('HTTP/1.1 200')) throw new Error(`CONNECT answered ${head.split('\r\n')[0]}`);
  const connectMs = performance.now() - started;
  const socket = tlsConnect({ socket: raw, servername: HOST, ca });
  await once(socket, 'secureConnect');
  return { socket, connectMs };
}

async function direct(serverPort: number, ca: string): Promise<TLSSocket> {
  const socket = tlsConnect({ host: '127.0.0.1', port: serverPort, servername: HOST, ca });
  await once(socket, 'secureConnect');
  return socket;
}

const mbps = (ms: number) => BYTES / 1e6 / (ms / 1000);
const best = (xs: number[]) => Math.min(...xs);
const percentile = (xs: number[], p: number) => {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
};
const round3 = (x: number) => Math.round(x * 1000) / 1000;

/** What the main process hands its children (paths, URLs, PEMs): no secrets beyond the bench's own. */
interface ChildConfig {
  readonly databaseUrl: string;
  readonly gatewayTls: ServerTls;
  readonly serviceTls: ServerTls;
  readonly destination: string;
  readonly serverPort: number;
  readonly gatewayPort: number;
  readonly software: { certPem: string; privateKeyPem: string };
  readonly scratch: string;
}

const TPM_IDENTITY = { identity: 'agent-bench', extensionOid: TEST_OID, tokenLabel: 'bench', keyLabel: 'agent-tls', userPin: 'bench-user-pin', soPin: 'bench-so-pin' } as const;

/** Starts this file in another process with a role; resolves with the port it prints. */
async function child(role: string, args: string[], config: Partial<ChildConfig>): Promise<{ process: ChildProcess; port: number }> {
  const proc = spawn(process.execPath, ['--import', 'tsx', import.meta.filename, '--role', role, ...args], {
    env: { ...process.env, BENCH_CHILD_CONFIG: JSON.stringify(config) },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  const port = await new Promise<number>((resolve, reject) => {
    proc.stdout!.on('data', (chunk: Buffer) => {
      out += chunk;
      const newline = out.indexOf('\n');
      if (newline >= 0) resolve((JSON.parse(out.slice(0, newline)) as { port: number }).port);
    });
    proc.once('exit', (code) => reject(new Error(`${role} exited with ${code}`)));
  });
  return { process: proc, port };
}

async function stopChild(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = once(proc, 'exit');
  proc.kill('SIGTERM');
  await exited;
}

function announce(port: number, onStop: () => Promise<void>): void {
  process.on('SIGTERM', () => void onStop().finally(() => process.exit(0)));
  process.stdout.write(`${JSON.stringify({ port })}\n`);
}

async function runChild(role: string): Promise<void> {
  const config = JSON.parse(process.env.BENCH_CHILD_CONFIG ?? '{}') as ChildConfig;
  // As the gateway's and the sidecar's entry points do.
  if (role === 'gateway' || role === 'sidecar') tuneHeapForBytePath();
  const quiet = pino({ level: 'warn' }, pino.destination(2));
  const node64k = values.windows === '64k';
  if (role === 'server') {
    const server = await trafficServer(config.serviceTls.certPath, config.serviceTls.keyPath);
    announce((server.address() as AddressInfo).port, async () => void server.close());
  } else if (role === 'gateway') {
    const gateway = await startTestGateway({ databaseUrl: config.databaseUrl, tls: config.gatewayTls, resolve: { [config.destination]: `127.0.0.1:${config.serverPort}` }, logger: quiet });
    if (node64k) {
      gateway.server.updateSettings({ initialWindowSize: NODE_DEFAULT_WINDOW });
      // Runs after the gateway's own 'session' listener, so this window wins.
      gateway.server.on('session', (session: ServerHttp2Session) => session.setLocalWindowSize(NODE_DEFAULT_WINDOW));
    }
    announce(gateway.address!.port, () => gateway.close(100));
  } else if (role === 'sidecar') {
    let identity: TlsIdentity | undefined;
    let secureContext: SecureContext;
    if (USE_TPM) {
      identity = await loadTlsIdentity({ ...TPM_IDENTITY, certOut: join(config.scratch, `machine-client-${process.pid}.pem`), ca: config.gatewayTls.caPem });
      secureContext = identity.secureContext;
    } else {
      secureContext = createSecureContext({ cert: config.software.certPem, key: config.software.privateKeyPem, ca: config.gatewayTls.caPem });
    }
    const sidecar = await startSidecar({
      gatewayUrl: `https://localhost:${config.gatewayPort}`,
      secureContext,
      logger: quiet,
      ...(node64k ? { streamWindowBytes: NODE_DEFAULT_WINDOW, sessionWindowBytes: NODE_DEFAULT_WINDOW } : {}),
    });
    announce(sidecar.port, async () => {
      await sidecar.close();
      identity?.close();
    });
  } else {
    throw new Error(`unknown --role ${role}`);
  }
}

async function main(): Promise<void> {
  let tpm: SwtpmInstance | undefined;
  let identity: TlsIdentity | undefined;
  const children: ChildProcess[] = [];
  const scratch = mkdtempSync(join(tmpdir(), 'agw-bench-sidecar-'));
  const pgServer = await testServer();
  try {
    const databaseUrl = await createDatabase(pgServer.url);
    const gatewayTls = await serverTls();
    const serviceTls = await serverTls([HOST]);
    const software = await clientCredentials({ identity: 'agent-bench' });
    const base = { databaseUrl, gatewayTls, serviceTls, software: { certPem: software.certPem, privateKeyPem: software.privateKeyPem }, scratch };

    const server = await child('server', [], base);
    children.push(server.process);
    const serverPort = server.port;
    const destination = `${HOST}:${serverPort}`;

    // The sidecar's key: in the TPM (as in production) or in memory. This process loads the TPM
    // identity too, for the handshake measurement; the sidecar children load the same key.
    let secureContext: SecureContext;
    let spkiDer: Buffer;
    if (USE_TPM) {
      tpm = await startSwtpm();
      Object.assign(process.env, tpm.env, QUIET_TPM_LOG_ENV);
      identity = await loadTlsIdentity({ ...TPM_IDENTITY, certOut: join(scratch, 'machine-client.pem'), ca: gatewayTls.caPem });
      secureContext = identity.secureContext;
      spkiDer = identity.spkiDer;
    } else {
      secureContext = createSecureContext({ cert: software.certPem, key: software.privateKeyPem, ca: gatewayTls.caPem });
      spkiDer = software.spkiDer;
    }
    const softwareContext = createSecureContext({ cert: software.certPem, key: software.privateKeyPem, ca: gatewayTls.caPem });

    const fixture = await RegistryFixture.connect(databaseUrl);
    const principal = await fixture.principal('org-bench', { notBefore: at(-DAY) });
    await fixture.delegate(principal.keyId, destination, { notBefore: at(-DAY) });
    await fixture.permit(principal, { identity: 'agent-bench', spkiDer }, destination);
    if (USE_TPM) await fixture.permit(principal, { identity: 'agent-bench', spkiDer: software.spkiDer }, destination);
    await fixture.close();

    const withPorts = { ...base, destination, serverPort };
    const keyArgs = ['--key', USE_TPM ? 'tpm' : 'software'];
    // Pair 1: the project's windows (registry/flow-control.ts) on both ends; pair 2: Node's 64 KiB defaults.
    const gateway = await child('gateway', ['--windows', 'current'], withPorts);
    const gateway64k = await child('gateway', ['--windows', '64k'], withPorts);
    children.push(gateway.process, gateway64k.process);
    const sidecarCurrent = await child('sidecar', ['--windows', 'current', ...keyArgs], { ...withPorts, gatewayPort: gateway.port });
    const sidecar64k = await child('sidecar', ['--windows', '64k', ...keyArgs], { ...withPorts, gatewayPort: gateway64k.port });
    children.push(sidecarCurrent.process, sidecar64k.process);
    const sidecars: Record<string, number> = { current: sidecarCurrent.port, node64k: sidecar64k.port };

    // Warm both sessions (one TPM-signed handshake each) and the paths.
    for (const port of Object.values(sidecars)) {
      const { socket } = await viaSidecar(port, serverPort, serviceTls.caPem);
      await download(socket, 1024 * 1024);
      socket.destroy();
    }

    const results: Record<string, number[]> = {};
    const record = (name: string, ms: number) => (results[name] ??= []).push(ms);
    // CPU of each process of the chain while the project's windows carry the bytes: where the time goes.
    const chain = { agent: process.pid, sidecar: sidecarCurrent.process.pid!, gateway: gateway.process.pid!, server: server.process.pid! };
    const chainCpuMs: Record<string, Record<string, number>> = { down: {}, up: {} };
    const directCpuMs: Record<string, Record<string, number>> = { down: {}, up: {} };
    const measured = async (into: Record<string, number>, pids: Record<string, number>, run: () => Promise<number>) => {
      const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuMs(pid)]));
      const ms = await run();
      for (const [k, pid] of Object.entries(pids)) into[k] = (into[k] ?? 0) + cpuMs(pid) - before[k]!;
      return ms;
    };
    for (let round = 0; round < ROUNDS; round++) {
      for (const [direction, transfer] of [['down', download], ['up', upload]] as const) {
        const plain = await direct(serverPort, serviceTls.caPem);
        record(`direct_${direction}`, await measured(directCpuMs[direction]!, { agent: chain.agent, server: chain.server }, () => transfer(plain)));
        plain.destroy();
        for (const [name, port] of Object.entries(sidecars)) {
          const { socket } = await viaSidecar(port, serverPort, serviceTls.caPem);
          record(`${name}_${direction}`, name === 'current' ? await measured(chainCpuMs[direction]!, chain, () => transfer(socket)) : await transfer(socket));
          socket.destroy();
        }
      }
    }
    const perGB = (cpu: Record<string, number>) => {
      const gb = (BYTES * ROUNDS) / 1e9;
      const out: Record<string, number> = {};
      for (const [k, ms] of Object.entries(cpu)) out[k] = round3(ms / 1000 / gb);
      out.total = round3(Object.values(cpu).reduce((a, b) => a + b, 0) / 1000 / gb);
      return out;
    };

    // Time to first byte of a new CONNECT, sequential (the session to the gateway already exists).
    const connectMs: number[] = [];
    const firstByteMs: number[] = [];
    const directFirstByteMs: number[] = [];
    for (let i = 0; i < TTFB_SAMPLES; i++) {
      const started = performance.now();
      const { socket, connectMs: c } = await viaSidecar(sidecars.current!, serverPort, serviceTls.caPem);
      await download(socket, 1);
      firstByteMs.push(performance.now() - started);
      connectMs.push(c);
      socket.destroy();
      const directStarted = performance.now();
      const plain = await direct(serverPort, serviceTls.caPem);
      await download(plain, 1);
      directFirstByteMs.push(performance.now() - directStarted);
      plain.destroy();
    }

    // A new mTLS session to the gateway: TPM signature (through the engine) vs software key.
    const handshake = async (context: SecureContext) => {
      const samples: number[] = [];
      for (let i = 0; i < HANDSHAKES; i++) {
        const started = performance.now();
        const socket = tlsConnect({ host: '127.0.0.1', port: gateway.port, servername: 'localhost', secureContext: context, ALPNProtocols: ['h2'] });
        await once(socket, 'secureConnect');
        samples.push(performance.now() - started);
        socket.destroy();
      }
      return samples;
    };
    const tpmHandshakes = USE_TPM ? await handshake(secureContext) : [];
    const softwareHandshakes = await handshake(softwareContext);

    const get = (name: string) => best(results[name]!);
    const report = {
      key: USE_TPM ? 'tpm (swtpm + tpm2-abrmd, tpm2-pkcs11, libp11 engine)' : 'software',
      layout: 'agent (this process), sidecar, gateway and TLS server in separate processes, loopback',
      cpus: availableParallelism(),
      bytes_per_transfer: BYTES,
      rounds: ROUNDS,
      windows: {
        current: { stream: STREAM_WINDOW_BYTES, session: SESSION_WINDOW_BYTES },
        node_default: { stream: NODE_DEFAULT_WINDOW, session: NODE_DEFAULT_WINDOW },
      },
      download_MBps: {
        direct_tls: Math.round(mbps(get('direct_down'))),
        sidecar_gateway_current_windows: Math.round(mbps(get('current_down'))),
        sidecar_gateway_64k_windows: Math.round(mbps(get('node64k_down'))),
      },
      download_ratio_vs_direct: {
        current_windows: round3(get('direct_down') / get('current_down')),
        node_64k_windows: round3(get('direct_down') / get('node64k_down')),
      },
      upload_MBps: {
        direct_tls: Math.round(mbps(get('direct_up'))),
        sidecar_gateway_current_windows: Math.round(mbps(get('current_up'))),
        sidecar_gateway_64k_windows: Math.round(mbps(get('node64k_up'))),
      },
      upload_ratio_vs_direct: {
        current_windows: round3(get('direct_up') / get('current_up')),
        node_64k_windows: round3(get('direct_up') / get('node64k_up')),
      },
      cpu_s_per_GB: {
        note: 'CPU seconds per GB moved, per process, summed over the rounds (/proc, 10 ms ticks); the chain uses the project windows',
        direct_tls: { down: perGB(directCpuMs.down!), up: perGB(directCpuMs.up!) },
        chain: { down: perGB(chainCpuMs.down!), up: perGB(chainCpuMs.up!) },
      },
      new_connect_ms: {
        samples: TTFB_SAMPLES,
        connect_to_200_p50: round3(percentile(connectMs, 50)),
        connect_to_200_p90: round3(percentile(connectMs, 90)),
        first_byte_over_agent_tls_p50: round3(percentile(firstByteMs, 50)),
        first_byte_over_agent_tls_p90: round3(percentile(firstByteMs, 90)),
        direct_tls_first_byte_p50: round3(percentile(directFirstByteMs, 50)),
      },
      gateway_mtls_handshake_ms: {
        samples: HANDSHAKES,
        ...(USE_TPM ? { tpm_key_p50: round3(percentile(tpmHandshakes, 50)), tpm_key_p90: round3(percentile(tpmHandshakes, 90)) } : {}),
        software_key_p50: round3(percentile(softwareHandshakes, 50)),
        software_key_p90: round3(percentile(softwareHandshakes, 90)),
      },
    };
    console.log(JSON.stringify(report, null, 2));
  } finally {
    // Sidecars first (they finalise their PKCS#11), then the gateways and the server.
    for (const proc of children.reverse()) await stopChild(proc);
    identity?.close();
    await tpm?.stop();
    pgServer.close();
    rmSync(scratch, { recursive: true, force: true });
  }
}

if (values.role === 'main') await main();
else await runChild(values.role!);
