/**
 * Our gateway side by side with nghttpx in front of squid: the same client load, the same run, the
 * same machine, ratios ours/baseline. `npm run bench` (bench/run.sh) installs what is missing and
 * runs this; see bench/README.md for what each line means and how the two are set up.
 *
 *   node --import tsx bench/compare.ts [--phases idle,connect,sessions,throughput,revocation]
 *     [--connects 5000] [--concurrency 32] [--connect-rounds 3] [--sessions 400]
 *     [--session-concurrency 8] [--session-rounds 3] [--mib 256] [--parallel 8]
 *     [--parallel-mib 64] [--rounds 5] [--idle 2000] [--no-revocation]
 *     [--revocation-tunnels 2000] [--workers 1] [--log-level info]
 *     [--profile] [--max-seconds 300] [--keep] [--stream-window B] [--session-window B]
 *     [--gateway-node-options="--trace-gc …"] [--floor | --other-build DIR [--other-node-options="…"]]
 *
 * Processes, all on 127.0.0.1: this one (the load generator, our own node:http2 client), the
 * destination servers (bench/compare-sink.ts), our gateway (`node bin/agent-gateway.js`, from
 * dist/), PostgreSQL (throwaway cluster: registry and audit), nghttpx and squid. Every one of them
 * is stopped when this ends, also on error, SIGINT or SIGTERM.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect as h2connect, type ClientHttp2Session, type ClientHttp2Stream } from 'node:http2';
import { connect as netConnect, type Socket } from 'node:net';
import { availableParallelism, cpus, loadavg, release, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { connect as tlsConnect, createSecureContext, type SecureContext } from 'node:tls';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { TLS13_SUITES } from '../gateway/src/server-credentials.js';
import { MAX_SESSION_MEMORY_MB, SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../registry/flow-control.js';
import { serverTls, TEST_OID } from '../test/helpers/pki.js';
import { createDatabase, freePort, testServer } from '../test/helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../test/helpers/registry-fixture.js';
import { clientCa, type BenchClient } from './compare-pki.js';
import { FLOOR, foreignCpuMs, hardFileLimit, ROOT, sample, startBaseline, startFloor, startOurs, stopProcess, trackChild, type Proxy, type Sample } from './compare-proxies.js';

const { values } = parseArgs({
  allowNegative: true,
  options: {
    connects: { type: 'string', default: '5000' },
    concurrency: { type: 'string', default: '32' },
    sessions: { type: 'string', default: '400' },
    'session-concurrency': { type: 'string', default: '8' },
    mib: { type: 'string', default: '256' },
    parallel: { type: 'string', default: '8' },
    'parallel-mib': { type: 'string', default: '64' },
    rounds: { type: 'string', default: '5' },
    'connect-rounds': { type: 'string', default: '3' },
    'session-rounds': { type: 'string', default: '3' },
    idle: { type: 'string', default: '2000' },
    revocation: { type: 'boolean', default: true },
    'revocation-tunnels': { type: 'string', default: '2000' },
    'revocation-others': { type: 'string', default: '100' },
    'revocation-timeout-ms': { type: 'string', default: '10000' },
    workers: { type: 'string', default: '1' },
    'log-level': { type: 'string', default: 'info' },
    phases: { type: 'string', default: 'idle,connect,sessions,throughput,revocation' },
    profile: { type: 'boolean', default: false },
    'max-seconds': { type: 'string', default: '300' },
    keep: { type: 'boolean', default: false },
    'gateway-node-options': { type: 'string', default: '' },
    'other-node-options': { type: 'string' },
    'stream-window': { type: 'string', default: String(STREAM_WINDOW_BYTES) },
    'session-window': { type: 'string', default: String(SESSION_WINDOW_BYTES) },
    floor: { type: 'boolean', default: false },
    'other-build': { type: 'string' },
  },
});

const num = (name: keyof typeof values) => {
  const n = Number(values[name]);
  if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a number`);
  return n;
};
const CONNECTS = num('connects');
const CONCURRENCY = num('concurrency');
const SESSIONS = num('sessions');
const SESSION_CONCURRENCY = num('session-concurrency');
const MIB = 1024 * 1024;
const SINGLE_BYTES = num('mib') * MIB;
const PARALLEL = num('parallel');
const PARALLEL_BYTES = num('parallel-mib') * MIB;
const ROUNDS = num('rounds');
const CONNECT_ROUNDS = num('connect-rounds');
const SESSION_ROUNDS = num('session-rounds');
/** HTTP/2 receive windows of every end (client, our gateway, nghttpx): the defaults unless a sweep asks for others. */
const STREAM_WINDOW = num('stream-window');
const SESSION_WINDOW = num('session-window');
const PHASES = new Set(values.phases!.split(',').map((phase) => phase.trim()));
for (const phase of PHASES) if (!['idle', 'connect', 'sessions', 'throughput', 'revocation'].includes(phase)) throw new Error(`--phases: unknown phase ${phase}`);
const PROFILE = values.profile === true;
/** Also measure bench/floor-proxy.ts, node:http2 with nothing of ours, as a third column. */
/**
 * An A/B of two builds of ours in one run (this machine's drift between runs is larger than most
 * single changes): the gateway of another checkout (its `dist/`, e.g. a `git worktree` of the
 * previous commit, built) runs in the third column instead of the floor.
 */
const OTHER_BUILD = values['other-build'];
if (OTHER_BUILD !== undefined && values.floor === true) throw new Error('--other-build and --floor share the third column: choose one');
/** The other build's Node.js options: --gateway-node-options unless given, so `--other-build .` with two sets of options is an A/B of the options alone. */
const OTHER_NODE_OPTIONS = values['other-node-options'] ?? values['gateway-node-options']!;
if (values['other-node-options'] !== undefined && OTHER_BUILD === undefined) throw new Error('--other-node-options needs --other-build (e.g. --other-build . for an A/B of options alone)');
const FLOOR_ON = values.floor === true || OTHER_BUILD !== undefined;
const THIRD = OTHER_BUILD === undefined ? 'node floor' : 'other build';
/** No phase starts after this many seconds; the run is abandoned (every process stopped) 120 s later. */
const MAX_SECONDS = num('max-seconds');
/**
 * Both proxies enforce their own TLS 1.3 suite order. nghttpx is given our gateway's
 * (gateway/src/server-credentials.ts: AES-128-GCM first, as nghttpx's own default), so both
 * tunnels run the same cipher by construction; the JSON records what each negotiated.
 */
const TLS13_CIPHERS = TLS13_SUITES.join(':');
const IDLE = num('idle');
const REVOCATION = values.revocation === true;
const REVOKE_TUNNELS = num('revocation-tunnels');
const REVOKE_OTHERS = num('revocation-others');
const REVOKE_TIMEOUT_MS = num('revocation-timeout-ms');
const WORKERS = num('workers');
const LOG_LEVEL = values['log-level']!;
/** Streams per session both proxies allow: enough for the idle and revocation tunnels on one session. */
const MAX_STREAMS = Math.max(1000, IDLE + 100, REVOKE_TUNNELS + REVOKE_OTHERS + 100);
/** nghttpx opens one squid connection per tunnel: room for every idle tunnel at once. */
const BACKEND_CONNECTIONS = Math.max(1024, IDLE + 100);
const CHUNK = Buffer.alloc(256 * 1024, 0x62);

// ---------------------------------------------------------------------------------------------
// Small statistics

const percentile = (xs: readonly number[], p: number) => {
  if (xs.length === 0) return NaN;
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
};
const round = (x: number, digits = 2) => (Number.isFinite(x) ? Math.round(x * 10 ** digits) / 10 ** digits : x);
const mbps = (bytes: number, ms: number) => bytes / 1e6 / (ms / 1000);

/** Runs `fn(i)` for i < count, `concurrency` at a time, starting no new one after `deadline`. */
async function pool(count: number, concurrency: number, deadline: number, fn: (i: number) => Promise<void>): Promise<number> {
  let next = 0;
  let done = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, count) }, async () => {
      while (next < count && performance.now() < deadline) {
        const i = next++;
        await fn(i);
        done++;
      }
    }),
  );
  return done;
}

// ---------------------------------------------------------------------------------------------
// The client: node:http2, as the sidecar uses it (DESIGN §8), with the project's windows

interface ClientTls {
  readonly context: SecureContext;
}

function clientTls(client: BenchClient, caPem: string): ClientTls {
  return { context: createSecureContext({ cert: client.certPem, key: client.privateKeyPem, ca: caPem }) };
}

interface Session {
  readonly session: ClientHttp2Session;
  /** TCP connect + TLS handshake, ms. */
  readonly handshakeMs: number;
  /** Negotiated TLS version and cipher. */
  readonly tls: string;
  goaways: number;
}

async function openSession(port: number, tls: ClientTls): Promise<Session> {
  const started = performance.now();
  let handshakeMs = NaN;
  let negotiated = '';
  const session = h2connect(`https://localhost:${port}`, {
    createConnection: () => {
      const socket = tlsConnect({ host: '127.0.0.1', port, servername: 'localhost', secureContext: tls.context, ALPNProtocols: ['h2'] });
      socket.once('secureConnect', () => {
        handshakeMs = performance.now() - started;
        negotiated = `${socket.getProtocol()} ${socket.getCipher().name}`;
      });
      return socket;
    },
    settings: { initialWindowSize: STREAM_WINDOW },
    maxSessionMemory: 256,
  });
  const result: Session = { session, handshakeMs: NaN, tls: '', goaways: 0 };
  session.on('error', () => {});
  session.on('goaway', () => result.goaways++);
  await new Promise<void>((resolve, reject) => {
    session.once('connect', () => resolve());
    session.once('close', () => reject(new Error('session closed before it connected')));
    session.once('error', reject);
  });
  session.setLocalWindowSize(SESSION_WINDOW);
  return Object.assign(result, { handshakeMs, tls: negotiated });
}

interface Tunnel {
  readonly stream: ClientHttp2Stream;
  readonly status: number;
  /** CONNECT sent → response headers, ms. */
  readonly ms: number;
}

function connectTunnel(session: ClientHttp2Session, authority: string): Promise<Tunnel> {
  const started = performance.now();
  const stream = session.request({ ':method': 'CONNECT', ':authority': authority }, { endStream: false });
  return new Promise((resolve, reject) => {
    stream.once('response', (headers) => resolve({ stream, status: Number(headers[':status']), ms: performance.now() - started }));
    stream.once('error', reject);
    stream.once('close', () => reject(new Error(`stream closed before a response (rst ${stream.rstCode})`)));
  });
}

/**
 * Ends our half with END_STREAM (never RST) and waits until the proxy has ended its half too.
 * `quit` sends 'q' with it, which makes the echo server end the tunnel from its side (the only
 * end that reaches the destination through nghttpx: see bench/compare-sink.ts).
 */
async function endTunnel(stream: ClientHttp2Stream, options: { quit?: boolean; timeoutMs?: number } = {}): Promise<void> {
  if (stream.closed || stream.destroyed) return;
  const closed = once(stream, 'close').then(() => true, () => true);
  stream.on('error', () => {});
  if (options.quit && !stream.writableEnded) stream.end('q');
  else stream.end();
  stream.resume();
  const timeoutMs = options.timeoutMs ?? 10_000;
  const ok = await Promise.race([closed, sleep(timeoutMs).then(() => false)]);
  if (!ok) stream.close(0x8); // CANCEL: the proxy never ended its half; the caller counts it via rstCode
}

async function closeSession(s: Session): Promise<void> {
  if (s.session.destroyed) return;
  const closed = once(s.session, 'close');
  s.session.close();
  await Promise.race([closed, sleep(5000).then(() => s.session.destroy())]);
}

/** One byte through the tunnel and back (the destination is the echo server). */
async function ping(stream: ClientHttp2Stream, timeoutMs = 5000): Promise<boolean> {
  const back = new Promise<boolean>((resolve) => {
    const onData = () => {
      stream.off('data', onData);
      resolve(true);
    };
    stream.on('data', onData);
    stream.once('close', () => resolve(false));
  });
  stream.write('x');
  return Promise.race([back, sleep(timeoutMs).then(() => false)]);
}

// ---------------------------------------------------------------------------------------------
// Transfers against the traffic server ('D'/'U' + u64 length)

type Duplex = Socket | ClientHttp2Stream;

function header(mode: 'D' | 'U', size: number): Buffer {
  const buffer = Buffer.alloc(9);
  buffer[0] = mode.charCodeAt(0);
  buffer.writeBigUInt64BE(BigInt(size), 1);
  return buffer;
}

/** Resolves with the number of 'data' chunks the client read (HTTP/2: about one per DATA frame). */
function download(stream: Duplex, size: number): Promise<number> {
  return new Promise((resolve, reject) => {
    let received = 0;
    let chunks = 0;
    const onData = (chunk: Buffer) => {
      received += chunk.length;
      chunks++;
      if (received >= size) {
        stream.off('data', onData);
        resolve(chunks);
      }
    };
    stream.on('data', onData);
    stream.once('close', () => reject(new Error(`closed after ${received} of ${size} bytes`)));
    stream.write(header('D', size));
  });
}

/** Resolves with the number of reads the destination server needed for the bytes (its answer: "ok" + u32). */
async function upload(stream: Duplex, size: number): Promise<number> {
  const answer = new Promise<number>((resolve, reject) => {
    let got = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      got = Buffer.concat([got, chunk]);
      if (got.length < 6) return;
      stream.off('data', onData);
      resolve(got.readUInt32BE(2));
    };
    stream.on('data', onData);
    stream.once('close', () => reject(new Error('closed before "ok"')));
  });
  stream.write(header('U', size));
  let left = size;
  while (left > 0) {
    const n = Math.min(left, CHUNK.length);
    left -= n;
    if (!stream.write(n === CHUNK.length ? CHUNK : CHUNK.subarray(0, n))) await once(stream, 'drain');
  }
  return answer;
}

async function directSocket(port: number): Promise<Socket> {
  const socket = netConnect({ host: '127.0.0.1', port, allowHalfOpen: true, noDelay: true });
  socket.on('error', () => {});
  await once(socket, 'connect');
  return socket;
}

async function endSocket(socket: Socket): Promise<void> {
  const closed = once(socket, 'close');
  socket.end();
  socket.resume();
  await Promise.race([closed, sleep(5000).then(() => socket.destroy())]);
}

// ---------------------------------------------------------------------------------------------
// Measurements

interface Context {
  readonly echo: string;
  readonly traffic: string;
  readonly trafficPort: number;
  readonly tls: ClientTls;
  readonly pgPids: () => number[];
  readonly sinkPids: () => number[];
}

async function measureIdle(proxy: Proxy, ctx: Context) {
  const s = await openSession(proxy.port, ctx.tls);
  try {
    for (let i = 0; i < 50; i++) await endTunnel((await connectTunnel(s.session, ctx.echo)).stream, { quit: true });
    await sleep(1000);
    const before = sample(proxy.pids());
    const tunnels: ClientHttp2Stream[] = [];
    let failures = 0;
    const started = performance.now();
    await pool(IDLE, 64, started + 60_000, async () => {
      try {
        const t = await connectTunnel(s.session, ctx.echo);
        tunnels.push(t.stream);
        t.stream.on('error', () => {});
        if (t.status !== 200 || !(await ping(t.stream))) failures++;
      } catch {
        failures++;
      }
    });
    const openMs = performance.now() - started;
    await sleep(2000);
    const after = sample(proxy.pids());
    const stillOpen = tunnels.filter((stream) => !stream.closed && !stream.destroyed).length;
    await Promise.all(tunnels.map((stream) => endTunnel(stream, { quit: true })));
    const resets = tunnels.filter((stream) => (stream.rstCode ?? 0) !== 0).length;
    return {
      tunnels: tunnels.length,
      failures,
      still_open_after_settle: stillOpen,
      open_seconds: round(openMs / 1000),
      rss_before_KiB: before.rssKiB,
      rss_after_KiB: after.rssKiB,
      rss_per_tunnel_KiB: round((after.rssKiB - before.rssKiB) / Math.max(1, stillOpen), 1),
      processes: after.pids.length,
      resets_at_close: resets,
      goaways: s.goaways,
    };
  } finally {
    await closeSession(s);
  }
}

interface ConnectRound {
  readonly connects: number;
  readonly ms: number;
  readonly latencies: number[];
  readonly failures: number;
  readonly statuses: Record<string, number>;
  readonly resets: number;
  readonly goaways: number;
  readonly cpuMs: number;
  readonly pgCpuMs: number;
}

/** `count` CONNECTs over one session, CONCURRENCY in flight; each gets 200, sends 'q' + END_STREAM, and waits for the close. */
async function connectRound(proxy: Proxy, ctx: Context, count: number): Promise<ConnectRound> {
  const s = await openSession(proxy.port, ctx.tls);
  try {
    const latencies: number[] = [];
    let failures = 0;
    let resets = 0;
    const statuses: Record<string, number> = {};
    const cpuBefore = sample(proxy.pids()).cpuMs;
    const pgBefore = sample(ctx.pgPids()).cpuMs;
    const started = performance.now();
    const connects = await pool(count, CONCURRENCY, started + 60_000, async () => {
      try {
        const t = await connectTunnel(s.session, ctx.echo);
        statuses[t.status] = (statuses[t.status] ?? 0) + 1;
        if (t.status === 200) latencies.push(t.ms);
        else failures++;
        await endTunnel(t.stream, { quit: true });
        if ((t.stream.rstCode ?? 0) !== 0) resets++;
      } catch {
        failures++;
      }
    });
    const ms = performance.now() - started;
    return {
      connects,
      ms,
      latencies,
      failures,
      statuses,
      resets,
      goaways: s.goaways,
      cpuMs: sample(proxy.pids()).cpuMs - cpuBefore,
      pgCpuMs: sample(ctx.pgPids()).cpuMs - pgBefore,
    };
  } finally {
    await closeSession(s);
  }
}

function summariseConnects(rounds: ConnectRound[]) {
  const total = (f: (r: ConnectRound) => number) => rounds.reduce((sum, r) => sum + f(r), 0);
  const rates = rounds.map((r) => r.latencies.length / (r.ms / 1000));
  const latencies = rounds.flatMap((r) => r.latencies);
  const connects = total((r) => r.connects);
  const statuses: Record<string, number> = {};
  for (const r of rounds) for (const [k, v] of Object.entries(r.statuses)) statuses[k] = (statuses[k] ?? 0) + v;
  return {
    rounds: rounds.length,
    connects_per_round: rounds.map((r) => r.connects),
    per_second_per_round: rates.map((x) => Math.round(x)),
    per_second: Math.round(percentile(rates, 50)),
    p50_ms: round(percentile(latencies, 50), 3),
    p99_ms: round(percentile(latencies, 99), 3),
    failures: total((r) => r.failures),
    statuses,
    resets_at_close: total((r) => r.resets),
    goaways: total((r) => r.goaways),
    proxy_cpu_ms_per_connect: round(total((r) => r.cpuMs) / Math.max(1, connects), 4),
    postgres_cpu_ms_per_connect: round(total((r) => r.pgCpuMs) / Math.max(1, connects), 4),
  };
}

interface SessionRound {
  readonly sessions: number;
  readonly ms: number;
  readonly handshakes: number[];
  readonly totals: number[];
  readonly failures: number;
  readonly cpuMs: number;
}

/** `count` new mTLS sessions, SESSION_CONCURRENCY at once: TLS handshake, HTTP/2 preface, one CONNECT, close. */
async function sessionRound(proxy: Proxy, ctx: Context, count: number): Promise<SessionRound> {
  const handshakes: number[] = [];
  const totals: number[] = [];
  let failures = 0;
  const cpuBefore = sample(proxy.pids()).cpuMs;
  const started = performance.now();
  const sessions = await pool(count, SESSION_CONCURRENCY, started + 30_000, async () => {
    const t0 = performance.now();
    let s: Session | undefined;
    try {
      s = await openSession(proxy.port, ctx.tls);
      const t = await connectTunnel(s.session, ctx.echo);
      await endTunnel(t.stream, { quit: true });
      if (t.status !== 200) failures++;
      else {
        handshakes.push(s.handshakeMs);
        totals.push(performance.now() - t0);
      }
    } catch {
      failures++;
    } finally {
      if (s) await closeSession(s);
    }
  });
  return { sessions, ms: performance.now() - started, handshakes, totals, failures, cpuMs: sample(proxy.pids()).cpuMs - cpuBefore };
}

function summariseSessions(rounds: SessionRound[]) {
  const rates = rounds.map((r) => r.totals.length / (r.ms / 1000));
  const handshakes = rounds.flatMap((r) => r.handshakes);
  const totals = rounds.flatMap((r) => r.totals);
  const sessions = rounds.reduce((sum, r) => sum + r.sessions, 0);
  return {
    rounds: rounds.length,
    sessions_per_round: rounds.map((r) => r.sessions),
    per_second_per_round: rates.map((x) => Math.round(x)),
    per_second: Math.round(percentile(rates, 50)),
    handshake_p50_ms: round(percentile(handshakes, 50), 3),
    handshake_p99_ms: round(percentile(handshakes, 99), 3),
    session_to_200_p50_ms: round(percentile(totals, 50), 3),
    failures: rounds.reduce((sum, r) => sum + r.failures, 0),
    proxy_cpu_ms_per_session: round(rounds.reduce((sum, r) => sum + r.cpuMs, 0) / Math.max(1, sessions), 3),
  };
}

/** `rounds` rounds of `fn` per proxy, the order alternating each round; results per proxy name. */
async function alternate<T>(proxies: Proxy[], rounds: number, fn: (proxy: Proxy) => Promise<T>): Promise<Record<string, T[]>> {
  const out: Record<string, T[]> = {};
  for (let r = 0; r < rounds; r++) {
    for (const proxy of r % 2 === 0 ? proxies : [...proxies].reverse()) (out[proxy.name] ??= []).push(await fn(proxy));
  }
  return out;
}

type Direction = 'down' | 'up';

/** `n` transfers of `bytes` each at once; returns wall ms and the proxy's CPU ms. */
interface TransferRun {
  readonly ms: number;
  /** CPU ms of the proxy's processes, of this (client) process and of the destination server's. */
  readonly cpuMs: number;
  readonly clientCpuMs: number;
  readonly sinkCpuMs: number;
  /** Down: 'data' chunks the client read; up: reads the destination server made. Summed over the tunnels. */
  readonly chunks: number;
}

/** `n` transfers of `bytes` each at once (tunnels opened beforehand, not timed). */
async function transfer(target: Proxy | 'direct', ctx: Context, direction: Direction, n: number, bytes: number): Promise<TransferRun> {
  const run = direction === 'down' ? download : upload;
  const measure = async (pids: number[], go: () => Promise<number[]>): Promise<TransferRun> => {
    const proxyBefore = sample(pids).cpuMs;
    const sinkBefore = sample(ctx.sinkPids()).cpuMs;
    const clientBefore = process.cpuUsage();
    const started = performance.now();
    const chunks = (await go()).reduce((a, b) => a + b, 0);
    const ms = performance.now() - started;
    const client = process.cpuUsage(clientBefore);
    return { ms, cpuMs: sample(pids).cpuMs - proxyBefore, clientCpuMs: (client.user + client.system) / 1000, sinkCpuMs: sample(ctx.sinkPids()).cpuMs - sinkBefore, chunks };
  };
  if (target === 'direct') {
    const sockets = await Promise.all(Array.from({ length: n }, () => directSocket(ctx.trafficPort)));
    const result = await measure([], () => Promise.all(sockets.map((socket) => run(socket, bytes))));
    await Promise.all(sockets.map(endSocket));
    return result;
  }
  const s = await openSession(target.port, ctx.tls);
  try {
    const tunnels = await Promise.all(Array.from({ length: n }, () => connectTunnel(s.session, ctx.traffic)));
    for (const t of tunnels) if (t.status !== 200) throw new Error(`${target.name}: CONNECT ${ctx.traffic} answered ${t.status}`);
    const result = await measure(target.pids(), () => Promise.all(tunnels.map((t) => run(t.stream, bytes))));
    await Promise.all(tunnels.map((t) => endTunnel(t.stream)));
    return result;
  } finally {
    await closeSession(s);
  }
}

async function measureThroughput(proxies: Proxy[], ctx: Context) {
  const targets: (Proxy | 'direct')[] = ['direct', ...proxies];
  const cases = [
    { name: 'single_down', direction: 'down' as const, n: 1, bytes: SINGLE_BYTES },
    { name: 'single_up', direction: 'up' as const, n: 1, bytes: SINGLE_BYTES },
    { name: `parallel${PARALLEL}_down`, direction: 'down' as const, n: PARALLEL, bytes: PARALLEL_BYTES },
    { name: `parallel${PARALLEL}_up`, direction: 'up' as const, n: PARALLEL, bytes: PARALLEL_BYTES },
  ];
  const all: Record<string, Record<string, TransferRun[]>> = {};
  const deadline = performance.now() + 150_000;
  for (let r = 0; r < ROUNDS && performance.now() < deadline; r++) {
    for (const c of cases) {
      // Alternate the order each round, so neither always runs on a warmer (or hotter) machine.
      const order = r % 2 === 0 ? targets : [...targets].reverse();
      for (const target of order) {
        const name = target === 'direct' ? 'direct' : target.name;
        ((all[c.name] ??= {})[name] ??= []).push(await transfer(target, ctx, c.direction, c.n, c.bytes));
      }
    }
  }
  const out: Record<string, Record<string, { MBps: number; median_MBps: number; MBps_per_round: number[]; proxy_cpu_s_per_GB?: number; client_cpu_s_per_GB: number; sink_cpu_s_per_GB: number; reads_per_MiB: number }>> = {};
  for (const c of cases) {
    const total = c.n * c.bytes;
    for (const [name, runs] of Object.entries(all[c.name] ?? {})) {
      const best = runs.reduce((a, b) => (b.ms < a.ms ? b : a));
      const perGB = (f: (run: TransferRun) => number) => round(runs.reduce((sum, run) => sum + f(run), 0) / 1000 / ((total * runs.length) / 1e9), 3);
      (out[c.name] ??= {})[name] = {
        MBps: Math.round(mbps(total, best.ms)),
        median_MBps: Math.round(mbps(total, percentile(runs.map((run) => run.ms), 50))),
        MBps_per_round: runs.map((run) => Math.round(mbps(total, run.ms))),
        // CPU per GB moved, over all rounds (ticks are 10 ms: one round is too coarse).
        ...(name === 'direct' ? {} : { proxy_cpu_s_per_GB: perGB((run) => run.cpuMs) }),
        client_cpu_s_per_GB: perGB((run) => run.clientCpuMs),
        sink_cpu_s_per_GB: perGB((run) => run.sinkCpuMs),
        // Down: chunks the client read; up: reads the destination made. Fewer, larger is cheaper.
        reads_per_MiB: round(runs.reduce((sum, run) => sum + run.chunks, 0) / ((total * runs.length) / MIB), 1),
      };
    }
  }
  return { bytes_single: SINGLE_BYTES, bytes_per_parallel_tunnel: PARALLEL_BYTES, parallel: PARALLEL, rounds: ROUNDS, best_of_rounds: out };
}

/**
 * Ours only: N tunnels of one identity and M of another, then the registry revokes the first in
 * one committed UPDATE; time until the client has seen every one of that identity's tunnels end.
 */
async function measureRevocation(ours: Proxy, ctx: Context, databaseUrl: string, revoked: ClientTls, kept: ClientTls, revokedIdentity: string) {
  const a = await openSession(ours.port, revoked);
  const b = await openSession(ours.port, kept);
  const db = new pg.Client({ connectionString: databaseUrl });
  await db.connect();
  try {
    const open = async (s: Session, n: number) => {
      const tunnels: ClientHttp2Stream[] = [];
      let failures = 0;
      await pool(n, 64, performance.now() + 60_000, async () => {
        try {
          const t = await connectTunnel(s.session, ctx.echo);
          t.stream.on('error', () => {});
          tunnels.push(t.stream);
          if (t.status !== 200 || !(await ping(t.stream))) failures++;
        } catch {
          failures++;
        }
      });
      return { tunnels, failures };
    };
    const openStarted = performance.now();
    const revokedSet = await open(a, REVOKE_TUNNELS);
    const keptSet = await open(b, REVOKE_OTHERS);
    const openSeconds = round((performance.now() - openStarted) / 1000);
    if (revokedSet.failures + keptSet.failures > 0) throw new Error(`revocation: ${revokedSet.failures + keptSet.failures} tunnels failed to open`);

    const ends: number[] = [];
    let endedByEndStream = 0;
    let endedByReset = 0;
    let commitSent = 0;
    const allEnded = new Promise<void>((resolve) => {
      let left = revokedSet.tunnels.length;
      for (const stream of revokedSet.tunnels) {
        let seen = false;
        const mark = (how: 'end' | 'close') => {
          if (seen) return;
          seen = true;
          ends.push(performance.now() - commitSent);
          if (how === 'end') endedByEndStream++;
          else if ((stream.rstCode ?? 0) !== 0) endedByReset++;
          else endedByEndStream++;
          if (--left === 0) resolve();
        };
        stream.once('end', () => {
          mark('end');
          stream.end(); // as the sidecar does: our half ends too, so the gateway never needs to reset
        });
        stream.once('close', () => mark('close'));
        stream.resume();
      }
    });
    await db.query('BEGIN');
    const updated = await db.query('UPDATE permission_registry SET revoked_at = now() WHERE subject_identity = $1', [revokedIdentity]);
    commitSent = performance.now();
    await db.query('COMMIT');
    const commitAckMs = performance.now() - commitSent;
    const closedInTime = await Promise.race([allEnded.then(() => true), sleep(REVOKE_TIMEOUT_MS).then(() => false)]);
    const lastMs = closedInTime ? Math.max(...ends) : NaN;

    // The other identity's tunnels: still open, still carrying bytes. The revoked identity's
    // session: the same one (no GOAWAY, no new handshake), alive (PING), and a new CONNECT is refused.
    const keptOpen = keptSet.tunnels.filter((stream) => !stream.closed && !stream.destroyed);
    const keptUsable = (await Promise.all(keptOpen.map((stream) => ping(stream)))).filter(Boolean).length;
    const sessionAlive = !a.session.destroyed && !a.session.closed && a.goaways === 0;
    const pingMs = sessionAlive
      ? await new Promise<number>((resolve) => a.session.ping((error, duration) => resolve(error ? NaN : duration)))
      : NaN;
    let newConnectStatus: number | string = 'n/a';
    if (sessionAlive) {
      try {
        const t = await connectTunnel(a.session, ctx.echo);
        newConnectStatus = t.status;
        await endTunnel(t.stream, { quit: true });
      } catch (error) {
        newConnectStatus = `error: ${(error as Error).message}`;
      }
    }
    const problems: string[] = [];
    if (keptOpen.length !== keptSet.tunnels.length || keptUsable !== keptSet.tunnels.length) {
      problems.push(`other identity: ${keptOpen.length} of ${keptSet.tunnels.length} still open, ${keptUsable} usable`);
    }
    if (!sessionAlive || Number.isNaN(pingMs)) problems.push(`revoked identity's session is gone (goaways ${a.goaways}, destroyed ${a.session.destroyed})`);
    if (b.goaways > 0 || b.session.destroyed) problems.push(`other identity's session is gone`);
    if (sessionAlive && newConnectStatus !== 403) problems.push(`a new CONNECT after revocation answered ${newConnectStatus}, not 403`);
    if (endedByReset > 0) problems.push(`${endedByReset} revoked tunnels ended with RST_STREAM instead of END_STREAM`);
    const closedText = closedInTime
      ? `closed ${ends.length} tunnels, last ${round(lastMs, 0)} ms after COMMIT`
      : `not closed within ${REVOKE_TIMEOUT_MS / 1000} s (${ends.length} of ${revokedSet.tunnels.length} ended)`;
    const result = {
      identity_tunnels: revokedSet.tunnels.length,
      other_identity_tunnels: keptSet.tunnels.length,
      rows_revoked: updated.rowCount,
      open_seconds: openSeconds,
      commit_ack_ms: round(commitAckMs, 3),
      closed_within_timeout: closedInTime,
      timeout_ms: REVOKE_TIMEOUT_MS,
      closed: ends.length,
      last_closed_ms_after_commit: round(lastMs, 1),
      p50_closed_ms_after_commit: round(percentile(ends, 50), 1),
      ended_with_end_stream: endedByEndStream,
      ended_with_reset: endedByReset,
      other_identity_still_open: keptOpen.length,
      other_identity_usable: keptUsable,
      revoked_session_same_and_alive: sessionAlive && !Number.isNaN(pingMs),
      revoked_session_goaways: a.goaways,
      other_session_goaways: b.goaways,
      new_connect_after_revocation_status: newConnectStatus,
      checks_failed: problems,
      verdict: problems.length === 0
        ? `${closedText}; other identity ${keptUsable}/${keptSet.tunnels.length} open and usable; same session alive, new CONNECT ${newConnectStatus}`
        : `${closedText}; CHECK FAILED: ${problems.join('; ')}`,
    };
    await Promise.all([...revokedSet.tunnels, ...keptSet.tunnels].map((stream) => endTunnel(stream, { quit: true, timeoutMs: 3000 })));
    return result;
  } finally {
    await db.end().catch(() => {});
    await closeSession(a);
    await closeSession(b);
  }
}

// ---------------------------------------------------------------------------------------------
// Set-up, run, report

const children: ChildProcess[] = [];

async function startSink(): Promise<{ proc: ChildProcess; echoPort: number; trafficPort: number }> {
  const proc = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'compare-sink.ts')], { stdio: ['ignore', 'pipe', 'inherit'], cwd: ROOT });
  children.push(trackChild(proc));
  let out = '';
  const ports = await new Promise<{ echoPort: number; trafficPort: number }>((resolve, reject) => {
    proc.stdout!.on('data', (chunk: Buffer) => {
      out += chunk;
      const newline = out.indexOf('\n');
      if (newline >= 0) resolve(JSON.parse(out.slice(0, newline)) as { echoPort: number; trafficPort: number });
    });
    proc.once('exit', (code) => reject(new Error(`sink exited with ${code}`)));
  });
  return { proc, ...ports };
}

function version(command: string, args: string[]): string {
  try {
    return execFileSync(command, args, { encoding: 'utf8' }).split('\n')[0]!.trim();
  } catch {
    return 'unknown';
  }
}

function postmasterPid(dir: string | undefined): number | undefined {
  if (!dir) return undefined;
  try {
    return Number(readFileSync(join(dir, 'data', 'postmaster.pid'), 'utf8').split('\n')[0]);
  } catch {
    return undefined;
  }
}

type Row = [metric: string, ours: number | string, baseline: number | string, better: 'higher' | 'lower' | '', direct?: number | string, floor?: number | string];

function printTable(rows: Row[]): string {
  const header = ['metric', 'ours', 'nghttpx+squid', 'ours/baseline', 'better', 'direct TCP', ...(FLOOR_ON ? [THIRD, `${OTHER_BUILD === undefined ? 'floor' : 'other'}/baseline`] : [])];
  const ratioOf = (x: number | string | undefined, baseline: number | string) =>
    typeof x === 'number' && typeof baseline === 'number' && baseline !== 0 && Number.isFinite(x) && Number.isFinite(baseline) ? (x / baseline).toFixed(2) : '';
  const body = rows.map(([metric, ours, baseline, better, direct, floor]) => {
    const ratio = ratioOf(ours, baseline);
    const ahead = ratio === '' || better === '' ? '' : (better === 'higher') === Number(ratio) >= 1 ? (Number(ratio) === 1 ? 'even' : 'ours') : 'baseline';
    const show = (v: number | string | undefined) => (v === undefined ? '' : typeof v === 'number' ? (Number.isFinite(v) ? String(v) : '—') : v);
    return [metric, show(ours), show(baseline), ratio, better === '' ? '' : `${better} (${ahead})`, show(direct), ...(FLOOR_ON ? [show(floor), ratioOf(floor, baseline)] : [])];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...body.map(line)].join('\n');
}

async function main(): Promise<void> {
  const runStarted = Date.now();
  setTimeout(() => {
    process.stderr.write(`bench: still running ${MAX_SECONDS + 120} s after the start: giving up (every process it started is stopped)\n`);
    process.exit(2);
  }, (MAX_SECONDS + 120) * 1000).unref();
  const loadAtStart = loadavg()[0]!;
  if (loadAtStart > 0.7) process.stderr.write(`warning: load average ${loadAtStart.toFixed(2)} before the run: something else is using the CPUs, ratios will be noisy\n`);
  const stamp = new Date(runStarted).toISOString().replace(/[:.]/g, '-');
  const resultsDir = join(ROOT, 'bench', 'results');
  mkdirSync(resultsDir, { recursive: true });
  const dir = mkdtempSync(join(tmpdir(), 'agw-bench-compare-'));
  const scratch = [dir];
  // Interrupted (SIGINT/SIGTERM, the watchdog): the processes go in compare-proxies.ts' exit hook, the files here.
  process.on('exit', () => {
    if (!values.keep) for (const path of scratch) rmSync(path, { recursive: true, force: true });
  });
  const log = (message: string) => process.stderr.write(`[${((Date.now() - runStarted) / 1000).toFixed(1)}s] ${message}\n`);
  const proxies: Proxy[] = [];
  let failed = true;
  const pgServer = await testServer();
  try {
    const databaseUrl = await createDatabase(pgServer.url);
    const pgPid = postmasterPid(pgServer.cluster?.dir);
    const sink = await startSink();
    const echo = `127.0.0.1:${sink.echoPort}`;
    const traffic = `127.0.0.1:${sink.trafficPort}`;

    // One server certificate for both proxies; client certificates from one CA, each with the
    // identity extension, so both proxies see the same handshake.
    const server = await serverTls();
    scratch.push(server.dir);
    const ca = await clientCa(dir);
    const benchClient = await ca.issue('agent-bench');
    const revokeA = await ca.issue('agent-bench-revoked');
    const revokeB = await ca.issue('agent-bench-kept');
    const fixture = await RegistryFixture.connect(databaseUrl);
    const principal = await fixture.principal('org-bench', { notBefore: at(-DAY) });
    for (const destination of [echo, traffic]) await fixture.delegate(principal.keyId, destination, { notBefore: at(-DAY) });
    for (const destination of [echo, traffic]) await fixture.permit(principal, benchClient, destination);
    await fixture.permit(principal, revokeA, echo);
    await fixture.permit(principal, revokeB, echo);
    await fixture.close();

    log('starting our gateway (dist/), squid and nghttpx');
    const profileDir = join(resultsDir, `profile-${stamp}`);
    const nodeOptions = (flags: string) => flags.split(' ').filter(Boolean);
    const startBuild = async (profileName: string, flags: string, other?: { root: string; name: string }) =>
      startOurs({
        dir,
        port: await freePort(),
        adminPort: await freePort(),
        certPath: server.certPath,
        keyPath: server.keyPath,
        oid: TEST_OID,
        databaseUrl,
        logLevel: LOG_LEVEL,
        maxStreams: MAX_STREAMS,
        streamWindow: STREAM_WINDOW,
        sessionWindow: SESSION_WINDOW,
        nodeArgs: [...(PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`, `--cpu-prof-name=${profileName}`] : []), ...nodeOptions(flags)],
        ...other,
      });
    const ours = await startBuild('gateway.cpuprofile', values['gateway-node-options']!);
    proxies.push(ours);
    const baseline = await startBaseline({
      dir,
      port: await freePort(),
      squidPort: await freePort(),
      certPath: server.certPath,
      keyPath: server.keyPath,
      clientCaPath: ca.caPath,
      workers: WORKERS,
      maxStreams: MAX_STREAMS,
      backendConnections: BACKEND_CONNECTIONS,
      streamWindow: STREAM_WINDOW,
      sessionWindow: SESSION_WINDOW,
      maxFiles: Math.min(65_536, hardFileLimit()),
      tls13Ciphers: TLS13_CIPHERS,
    });
    proxies.push(baseline);
    if (OTHER_BUILD !== undefined) proxies.push(await startBuild('other-build.cpuprofile', OTHER_NODE_OPTIONS, { root: OTHER_BUILD, name: FLOOR }));
    else if (FLOOR_ON) {
      proxies.push(
        await startFloor({
          dir,
          port: await freePort(),
          certPath: server.certPath,
          keyPath: server.keyPath,
          maxStreams: MAX_STREAMS,
          streamWindow: STREAM_WINDOW,
          sessionWindow: SESSION_WINDOW,
          maxSessionMemoryMb: MAX_SESSION_MEMORY_MB,
          tls13Ciphers: TLS13_CIPHERS,
          nodeArgs: PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`, '--cpu-prof-name=floor.cpuprofile'] : [],
        }),
      );
    }
    await sleep(1000);
    const startMemory = Object.fromEntries(proxies.map((p) => [p.name, sample(p.pids())]));

    const ctx: Context = { echo, traffic, trafficPort: sink.trafficPort, tls: clientTls(benchClient, server.caPem), pgPids: () => (pgPid ? [pgPid] : []), sinkPids: () => [sink.proc.pid!] };
    log('warm-up: 500 CONNECTs through each');
    const tlsSeen: Record<string, string> = {};
    for (const proxy of proxies) {
      const first = await openSession(proxy.port, ctx.tls);
      tlsSeen[proxy.name] = first.tls;
      await closeSession(first);
      const warm = await connectRound(proxy, ctx, 500);
      if (warm.failures > 0) throw new Error(`${proxy.name}: ${warm.failures} of 500 warm-up CONNECTs failed (${JSON.stringify(warm.statuses)})`);
    }

    const results: Record<string, Record<string, unknown>> = Object.fromEntries(proxies.map((p) => [p.name, {}]));
    const skipped: string[] = [];
    // CPU used by processes that are not part of this run (another job on the machine), per phase.
    const ourRoots = () => [process.pid, ...(pgPid ? [pgPid] : [])];
    const foreign: Record<string, { cpu_ms: number; percent_of_one_cpu: number }> = {};
    let phaseMark = { name: '', cpu: 0, at: 0 };
    const closePhase = () => {
      if (!phaseMark.name) return;
      const cpu = foreignCpuMs(ourRoots()) - phaseMark.cpu;
      const ms = performance.now() - phaseMark.at;
      foreign[phaseMark.name] = { cpu_ms: Math.round(cpu), percent_of_one_cpu: Math.round((cpu / ms) * 100) };
      phaseMark = { name: '', cpu: 0, at: 0 };
    };
    const run = (phase: string) => {
      closePhase();
      if (!PHASES.has(phase)) return false;
      if ((Date.now() - runStarted) / 1000 >= MAX_SECONDS) {
        skipped.push(phase);
        log(`skipping ${phase}: past --max-seconds ${MAX_SECONDS}`);
        return false;
      }
      phaseMark = { name: phase, cpu: foreignCpuMs(ourRoots()), at: performance.now() };
      return true;
    };
    if (run('idle')) {
      log(`idle tunnels: ${IDLE} on one session, RSS before and after`);
      for (const proxy of proxies) results[proxy.name]!.idle = await measureIdle(proxy, ctx);
    }
    if (run('connect')) {
      log(`CONNECT rate: ${CONNECT_ROUNDS} x ${CONNECTS} CONNECTs, one session, concurrency ${CONCURRENCY}`);
      const rounds = await alternate(proxies, CONNECT_ROUNDS, (proxy) => connectRound(proxy, ctx, CONNECTS));
      for (const proxy of proxies) results[proxy.name]!.connect = summariseConnects(rounds[proxy.name]!);
    }
    if (run('sessions')) {
      log(`new mTLS sessions: ${SESSION_ROUNDS} x ${SESSIONS} at concurrency ${SESSION_CONCURRENCY}`);
      const rounds = await alternate(proxies, SESSION_ROUNDS, (proxy) => sessionRound(proxy, ctx, SESSIONS));
      for (const proxy of proxies) results[proxy.name]!.sessions = summariseSessions(rounds[proxy.name]!);
    }
    let throughput: Awaited<ReturnType<typeof measureThroughput>> | undefined;
    if (run('throughput')) {
      log(`throughput: 1 tunnel x ${SINGLE_BYTES / MIB} MiB and ${PARALLEL} x ${PARALLEL_BYTES / MIB} MiB, down and up, best of ${ROUNDS}`);
      throughput = await measureThroughput(proxies, ctx);
    }
    closePhase();
    // Before the revocation phase, which loads ours only.
    const afterLoad = Object.fromEntries(proxies.map((p) => [p.name, sample(p.pids())]));
    const oursHeap = await ours.heap?.().catch((error: unknown) => ({ error: String(error) }));

    let revocation: Record<string, unknown> | undefined;
    if (REVOCATION && run('revocation')) {
      log(`revocation (ours): ${REVOKE_TUNNELS} tunnels of one identity, ${REVOKE_OTHERS} of another, UPDATE permission_registry SET revoked_at = now()`);
      try {
        revocation = await measureRevocation(ours, ctx, databaseUrl, clientTls(revokeA, server.caPem), clientTls(revokeB, server.caPem), revokeA.identity);
      } catch (error) {
        revocation = { verdict: `failed: ${(error as Error).message}`, checks_failed: [(error as Error).message] };
      }
    }

    closePhase();
    // ------------------------------------------------------------------ report
    const get = (name: string, phase: string, key: string) => ((results[name]?.[phase] as Record<string, number> | undefined)?.[key] ?? NaN) as number;
    const measured = (label: string, phase: string, key: string, better: 'higher' | 'lower'): Row => [label, get('ours', phase, key), get('nghttpx+squid', phase, key), better, undefined, get(FLOOR, phase, key)];
    const tp = throughput?.best_of_rounds ?? {};
    type Transfer = (typeof tp)[string][string];
    const ends = (x: Transfer | undefined) => (x ? round(x.client_cpu_s_per_GB + x.sink_cpu_s_per_GB, 3) : NaN);
    /** One throughput line: `value` of each target's result for case `key`; the proxy's own CPU has no direct TCP cell. */
    const tpLine = (label: string, key: string, value: (x: Transfer | undefined) => number, better: 'higher' | 'lower', direct = true): Row => {
      const at = tp[key] ?? {};
      return [label, value(at.ours), value(at['nghttpx+squid']), better, direct ? value(at.direct) : undefined, value(at[FLOOR])];
    };
    const tpRow = (label: string, key: string) => tpLine(label, key, (x) => x?.MBps ?? NaN, 'higher');
    const cpuRow = (label: string, key: string) => tpLine(label, key, (x) => x?.proxy_cpu_s_per_GB ?? NaN, 'lower', false);
    const endsRow = (label: string, key: string) => tpLine(label, key, ends, 'lower');
    const readsRow = (label: string, key: string) => tpLine(label, key, (x) => x?.reads_per_MiB ?? NaN, 'lower');
    const mib = (kib: number | undefined) => round((kib ?? NaN) / 1024, 1);
    const memoryRow = (label: string, at: Record<string, Sample>, field: 'rssKiB' | 'peakKiB'): Row => [label, mib(at.ours?.[field]), mib(at['nghttpx+squid']?.[field]), 'lower', undefined, mib(at[FLOOR]?.[field])];
    const rows: Row[] = [];
    if (results.ours!.connect) {
      rows.push(
        measured(`CONNECT rate, 1 session, c=${CONCURRENCY} (/s, median of ${CONNECT_ROUNDS})`, 'connect', 'per_second', 'higher'),
        measured('CONNECT→200 p50 (ms)', 'connect', 'p50_ms', 'lower'),
        measured('CONNECT→200 p99 (ms)', 'connect', 'p99_ms', 'lower'),
        measured('proxy CPU per CONNECT (ms)', 'connect', 'proxy_cpu_ms_per_connect', 'lower'),
        ['  ours: + PostgreSQL CPU per CONNECT (ms)', get('ours', 'connect', 'postgres_cpu_ms_per_connect'), 'n/a', ''],
      );
    }
    if (throughput) {
      rows.push(
        tpRow(`1 tunnel down (MB/s, best of ${ROUNDS})`, 'single_down'),
        tpRow('1 tunnel up (MB/s)', 'single_up'),
        tpRow(`${PARALLEL} tunnels down (MB/s, sum)`, `parallel${PARALLEL}_down`),
        tpRow(`${PARALLEL} tunnels up (MB/s, sum)`, `parallel${PARALLEL}_up`),
        cpuRow('proxy CPU, 1 tunnel down (s/GB)', 'single_down'),
        cpuRow('proxy CPU, 1 tunnel up (s/GB)', 'single_up'),
        endsRow('client + destination CPU, 1 tunnel down (s/GB)', 'single_down'),
        endsRow('client + destination CPU, 1 tunnel up (s/GB)', 'single_up'),
        readsRow('reads by the client per MiB, 1 tunnel down', 'single_down'),
        readsRow('reads by the destination per MiB, 1 tunnel up', 'single_up'),
      );
    }
    if (results.ours!.sessions) {
      rows.push(
        measured(`new mTLS sessions/s, c=${SESSION_CONCURRENCY} (median of ${SESSION_ROUNDS})`, 'sessions', 'per_second', 'higher'),
        measured('TLS handshake p50 (ms)', 'sessions', 'handshake_p50_ms', 'lower'),
        measured('new session → 200 → closed p50 (ms)', 'sessions', 'session_to_200_p50_ms', 'lower'),
        measured('proxy CPU per new session (ms)', 'sessions', 'proxy_cpu_ms_per_session', 'lower'),
      );
    }
    if (results.ours!.idle) rows.push(measured(`RSS per idle tunnel, N=${IDLE} (KiB)`, 'idle', 'rss_per_tunnel_KiB', 'lower'));
    rows.push(
      memoryRow('RSS at start (MiB)', startMemory, 'rssKiB'),
      memoryRow('RSS after the load above (MiB)', afterLoad, 'rssKiB'),
      memoryRow('peak RSS, sum of VmHWM (MiB)', afterLoad, 'peakKiB'),
    );
    if (revocation) {
      const closed = revocation.closed_within_timeout === true;
      rows.push([
        `revocation: last of ${REVOKE_TUNNELS} tunnels ended after COMMIT (ms)`,
        closed ? (revocation.last_closed_ms_after_commit as number) : `not closed within ${REVOKE_TIMEOUT_MS / 1000} s`,
        'n/a',
        '',
      ]);
    }
    const table = printTable(rows);
    const memory = (m: Record<string, Sample>) => Object.fromEntries(Object.entries(m).map(([k, v]) => [k, { rss_KiB: v.rssKiB, peak_KiB: v.peakKiB, processes: v.pids.length }]));
    const report = {
      started_at: new Date(runStarted).toISOString(),
      wall_seconds: Math.round((Date.now() - runStarted) / 1000),
      machine: { cpus: availableParallelism(), cpu_model: cpus()[0]?.model, memory_MiB: Math.round(totalmem() / MIB), kernel: release(), load_average_1m: { at_start: loadAtStart, at_end: loadavg()[0] } },
      versions: { node: process.version, nghttpx: version('nghttpx', ['--version']), squid: version('squid', ['-v']), postgres: version('psql', ['--version']) },
      setup: {
        ours: {
          command: 'node bin/agent-gateway.js --config FILE (dist/)',
          log_level: LOG_LEVEL,
          audit: true,
          authorization: 'PostgreSQL registry (throwaway cluster, fsync off), signed rows',
          max_streams_per_session: MAX_STREAMS,
          windows: { stream: STREAM_WINDOW, session: SESSION_WINDOW },
          profile: PROFILE ? profileDir : undefined,
        },
        baseline: {
          nghttpx: `-s, --workers=${WORKERS}, --backend-connections-per-host=${BACKEND_CONNECTIONS}, max concurrent streams ${MAX_STREAMS}, same windows, access log to a file`,
          nghttpx_tls13_ciphers: TLS13_CIPHERS,
          squid: '-N (one process), no cache, access log to a file',
        },
        ...(OTHER_BUILD !== undefined ? { node_floor: `other build: ${OTHER_BUILD}/bin/agent-gateway.js (its dist/), same config; its figures are under the node_floor key` } : FLOOR_ON ? { node_floor: 'bench/floor-proxy.ts: node:http2 CONNECT and pipe, no authorization, no logs, no audit; same TLS, windows and stream limit as ours' } : {}),
        tls_negotiated: tlsSeen,
        client: 'node:http2 in the bench process (one session per measurement unless stated); destination servers in their own process',
        options: values,
      },
      memory: { at_start: memory(startMemory), after_load: memory(afterLoad), ours_after_load_from_metrics: oursHeap },
      results,
      skipped_for_time: skipped,
      other_processes_cpu_by_phase: foreign,
      throughput: throughput ?? 'skipped',
      revocation: revocation ?? 'skipped',
      table,
    };
    const file = join(resultsDir, `compare-${stamp}.json`);
    writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
    process.stdout.write(`\n${table}\n\n`);
    if (revocation) {
      process.stdout.write(`revocation: ${String(revocation.verdict)}\n`);
      if (Array.isArray(revocation.checks_failed) && revocation.checks_failed.length > 0) process.exitCode = 1;
    }
    for (const proxy of proxies) {
      const r = results[proxy.name]!;
      const oddities = [
        ...['idle', 'connect', 'sessions'].flatMap((phase) => {
          const x = r[phase] as Record<string, number> | undefined;
          return x ? [x.failures ? `${phase}: ${x.failures} failures` : '', x.resets_at_close ? `${phase}: ${x.resets_at_close} streams reset` : '', x.goaways ? `${phase}: ${x.goaways} GOAWAY` : ''] : [];
        }),
      ].filter(Boolean);
      if (oddities.length > 0) process.stdout.write(`${proxy.name}: ${oddities.join(', ')}\n`);
    }
    const busy = Object.entries(foreign).filter(([, f]) => f.percent_of_one_cpu >= 10);
    if (busy.length > 0) {
      process.stdout.write(`warning: other processes used CPU during ${busy.map(([phase, f]) => `${phase} (${f.percent_of_one_cpu}% of one CPU)`).join(', ')}: those lines are noisy, run again on a quiet machine\n`);
    }
    if (skipped.length > 0) process.stdout.write(`skipped for time (--max-seconds ${MAX_SECONDS}): ${skipped.join(', ')}\n`);
    process.stdout.write(`full results: ${file} (${report.wall_seconds} s)\n`);
    failed = false;
  } finally {
    for (const proxy of proxies.reverse()) await proxy.stop().catch(() => {});
    for (const child of children) await stopProcess(child).catch(() => {});
    pgServer.close();
    if (failed || values.keep) {
      process.stderr.write(`logs and configs kept in ${dir}\n`);
      scratch.length = 0;
    } else {
      for (const path of scratch) rmSync(path, { recursive: true, force: true });
    }
  }
}

await main();
