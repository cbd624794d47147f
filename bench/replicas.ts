/**
 * CONNECT rate through HAProxy (deploy/haproxy/haproxy.cfg as shipped) with one gateway replica
 * against two, in one run, alternating phases so both see the same machine (DESIGN §9g). Each
 * phase opens `--sessions` mTLS sessions through HAProxy (leastconn spreads them over the replicas
 * in service) and keeps `--concurrency` CONNECTs in flight on each for `--seconds`: CONNECT, 200,
 * one byte echoed, END_STREAM both ways. The one-replica phase takes replica2 out with HAProxy's
 * `disable server`. Real authorization (cache on, audit on) against a throwaway PostgreSQL.
 * CPU per process group shows what bounds the rate.
 *
 *   npm run --silent build && node --import tsx bench/replicas.ts [--seconds 5] [--sessions 8] [--concurrency 16] [--rounds 2]
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import type { ClientHttp2Session } from 'node:http2';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { testGatewayConfig } from '../test/helpers/gateway.js';
import { startGatewayProcess, type GatewayProcess } from '../test/helpers/gateway-process.js';
import { startHaproxy, type Haproxy } from '../test/helpers/haproxy.js';
import { echoDestination } from '../test/helpers/echo-registry.js';
import { gatewaySession, request } from '../test/helpers/net.js';
import { clientCredentials } from '../test/helpers/pki.js';
import { createDatabase, freePort, TestCluster } from '../test/helpers/postgres.js';
import { until } from '../test/helpers/wait.js';
import { foreignCpuMs, ROOT, sample } from './compare-proxies.js';

const { values } = parseArgs({
  options: { seconds: { type: 'string', default: '5' }, sessions: { type: 'string', default: '8' }, concurrency: { type: 'string', default: '16' }, rounds: { type: 'string', default: '2' } },
});
const SECONDS = Number(values.seconds);
const SESSIONS = Number(values.sessions);
const CONCURRENCY = Number(values.concurrency);
const ROUNDS = Number(values.rounds);
const BALANCER_SOURCE = '127.0.0.2';

interface Phase {
  readonly replicas: 1 | 2;
  readonly connects: number;
  readonly failures: number;
  readonly perSecond: number;
  readonly perReplica: number[];
  readonly cpuMs: { gateways: number; haproxy: number; postgres: number; client: number; foreign: number };
  readonly wallMs: number;
}

const cluster = await TestCluster.start();
const databaseUrl = await createDatabase(cluster.adminUrl);
const { tls, echo, echoAuthority, fixture, alice } = await echoDestination(databaseUrl);
const agent = await clientCredentials({ identity: 'agent-bench' });
await fixture.permit(alice, { identity: 'agent-bench', spkiDer: agent.spkiDer }, echoAuthority);

const replicas: { name: string; port: number; adminPort: number; process: GatewayProcess }[] = [];
for (const name of ['replica1', 'replica2']) {
  const port = await freePort();
  const adminPort = await freePort();
  const base = testGatewayConfig({ databaseUrl, tls, port });
  const process = await startGatewayProcess({
    ...base,
    server: { ...base.server, proxy_protocol_from: [`${BALANCER_SOURCE}/32`] },
    admin: { listen_addr: `127.0.0.1:${adminPort}`, process_metrics: false },
    limits: { max_streams_per_session: 1000 },
  });
  replicas.push({ name, port, adminPort, process });
}
const frontendPort = await freePort();
const haproxy: Haproxy = startHaproxy({ listenPort: frontendPort, source: BALANCER_SOURCE, replicas: [replicas[0]!, replicas[1]!] });

function postgresPid(): number {
  return Number(readFileSync(join(cluster.dir, 'data', 'postmaster.pid'), 'utf8').split('\n')[0]);
}

async function decided(replica: (typeof replicas)[number]): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${replica.adminPort}/metrics`)).text();
  return text
    .split('\n')
    .filter((line) => line.startsWith('agent_gateway_connect_decisions_total{') && line.includes('status="200"'))
    .reduce((sum, line) => sum + Number(line.split(' ').pop()), 0);
}

async function oneConnect(session: ClientHttp2Session): Promise<boolean> {
  try {
    const { status, stream } = await request(session, echoAuthority);
    if (status !== 200) {
      stream.close();
      return false;
    }
    stream.resume();
    stream.end('q');
    await new Promise((resolve) => stream.once('close', resolve));
    return true;
  } catch {
    return false;
  }
}

async function phase(count: 1 | 2): Promise<Phase> {
  if (count === 1) {
    await haproxy.command('disable server agent_gateway_replicas/replica2');
    await until(async () => (await haproxy.status()).replica2 === 'MAINT', 10_000, 'replica2 in maintenance');
  } else {
    await haproxy.command('enable server agent_gateway_replicas/replica2');
    await haproxy.waitUp('replica2');
  }
  await haproxy.waitUp('replica1');
  const sessions: ClientHttp2Session[] = [];
  for (let i = 0; i < SESSIONS; i++) sessions.push(await gatewaySession(frontendPort, { caPem: tls.caPem, certPem: agent.certPem, privateKeyPem: agent.privateKeyPem }));
  // Warm the cache and the pools outside the measurement.
  await Promise.all(sessions.map(oneConnect));
  const before = await Promise.all(replicas.map(decided));
  const pids = { gateways: replicas.map((r) => r.process.child.pid!), haproxy: [haproxy.child.pid!], postgres: [postgresPid()] };
  const cpu0 = { gateways: sample(pids.gateways).cpuMs, haproxy: sample(pids.haproxy).cpuMs, postgres: sample(pids.postgres).cpuMs, client: process.cpuUsage() };
  const foreign0 = foreignCpuMs([...pids.gateways, ...pids.haproxy, ...pids.postgres, process.pid]);
  let connects = 0;
  let failures = 0;
  const started = performance.now();
  const deadline = started + SECONDS * 1000;
  await Promise.all(
    sessions.flatMap((session) =>
      Array.from({ length: CONCURRENCY }, async () => {
        while (performance.now() < deadline) {
          if (await oneConnect(session)) connects++;
          else failures++;
        }
      }),
    ),
  );
  const wallMs = performance.now() - started;
  const client = process.cpuUsage(cpu0.client);
  const cpuMs = {
    gateways: Math.round(sample(pids.gateways).cpuMs - cpu0.gateways),
    haproxy: Math.round(sample(pids.haproxy).cpuMs - cpu0.haproxy),
    postgres: Math.round(sample(pids.postgres).cpuMs - cpu0.postgres),
    client: Math.round((client.user + client.system) / 1000),
    foreign: Math.round(foreignCpuMs([...pids.gateways, ...pids.haproxy, ...pids.postgres, process.pid]) - foreign0),
  };
  const after = await Promise.all(replicas.map(decided));
  for (const session of sessions) session.destroy();
  return { replicas: count, connects, failures, perSecond: Math.round(connects / (wallMs / 1000)), perReplica: after.map((n, i) => n - before[i]!), cpuMs, wallMs: Math.round(wallMs) };
}

const phases: Phase[] = [];
try {
  await haproxy.waitUp('replica1');
  await haproxy.waitUp('replica2');
  for (let round = 0; round < ROUNDS; round++) {
    for (const count of [1, 2] as const) {
      const result = await phase(count);
      phases.push(result);
      console.log(JSON.stringify(result));
    }
  }
} finally {
  await haproxy.stop();
  for (const replica of replicas) await replica.process.stop();
  await fixture.close();
  await echo.close();
  cluster.destroy();
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const rate = (count: number) => median(phases.filter((p) => p.replicas === count).map((p) => p.perSecond));
const summary = {
  at: new Date().toISOString(),
  node: process.version,
  seconds_per_phase: SECONDS,
  sessions: SESSIONS,
  concurrency_per_session: CONCURRENCY,
  one_replica_per_second: rate(1),
  two_replicas_per_second: rate(2),
  ratio: Math.round((rate(2) / rate(1)) * 100) / 100,
  phases,
};
console.log(JSON.stringify({ one_replica_per_second: summary.one_replica_per_second, two_replicas_per_second: summary.two_replicas_per_second, ratio: summary.ratio }));
mkdirSync(join(ROOT, 'bench', 'results'), { recursive: true });
const out = join(ROOT, 'bench', 'results', `replicas-${summary.at.replace(/[:.]/g, '-')}.json`);
writeFileSync(out, `${JSON.stringify(summary, null, 2)}\n`);
console.log(`written ${out}`);
