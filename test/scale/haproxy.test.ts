/**
 * Two gateway replicas behind a real HAProxy running deploy/haproxy/haproxy.cfg as shipped (mode
 * tcp, send-proxy-v2, health checks on /readyz), over a PostgreSQL primary with a streaming
 * standby for lookups (DESIGN §7, §9g). Two sidecars of one agent stand in for two agent
 * processes. HAProxy connects to the replicas from 127.0.0.2, the only address the replicas
 * trust for PROXY headers; the sidecars connect from 127.0.0.1, so the replicas must log the
 * header's address, not the balancer's.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { request as httpRequest } from 'node:http';
import { connect as netConnect, type Socket } from 'node:net';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createSecureContext } from 'node:tls';
import { pino } from 'pino';
import { encodeProxyV2 } from '../../gateway/src/proxy-protocol.js';
import { startSidecar, type Sidecar } from '../../sidecar/src/sidecar.js';
import { testGatewayConfig } from '../helpers/gateway.js';
import { startGatewayProcess, type GatewayProcess } from '../helpers/gateway-process.js';
import { startHaproxy, type Haproxy } from '../helpers/haproxy.js';
import type { ClientCredentials } from '../helpers/pki.js';
import { freePort } from '../helpers/postgres.js';
import { until } from '../helpers/wait.js';
import { metricValue, startScaleWorld, STANDBY_ENV, type ScaleWorld } from './world.js';

const BALANCER_SOURCE = '127.0.0.2';

interface Replica {
  readonly name: 'replica1' | 'replica2';
  readonly port: number;
  readonly adminPort: number;
  process: GatewayProcess;
}

let world: ScaleWorld;
let agent: ClientCredentials & { permissionId: string };
let haproxy: Haproxy;
let frontendPort: number;
const replicas: Replica[] = [];
const sidecars: Sidecar[] = [];

function replicaConfig(replica: { port: number; adminPort: number }, maxSessionAgeMs: number) {
  const base = testGatewayConfig({ databaseUrl: world.databaseUrl, tls: world.tls, port: replica.port, policy: { read_database_url_env: STANDBY_ENV } });
  return {
    ...base,
    server: { ...base.server, proxy_protocol_from: [`${BALANCER_SOURCE}/32`], shutdown_grace_ms: 3000, drain_delay_ms: 1500, max_session_age_ms: maxSessionAgeMs },
    admin: { listen_addr: `127.0.0.1:${replica.adminPort}`, process_metrics: false },
    limits: { handshake_timeout_ms: 2000 },
  };
}

/** `maxSessionAgeMs` 0 until the rolling restart: the first cases rely on where sessions stay. */
async function startReplica(replica: { port: number; adminPort: number }, maxSessionAgeMs = 0): Promise<GatewayProcess> {
  return startGatewayProcess(replicaConfig(replica, maxSessionAgeMs), { [STANDBY_ENV]: world.standbyUrl });
}

before(async () => {
  world = await startScaleWorld();
  agent = await world.grant('agent-scaled');
  frontendPort = await freePort();
  for (const name of ['replica1', 'replica2'] as const) {
    const ports = { port: await freePort(), adminPort: await freePort() };
    replicas.push({ name, ...ports, process: await startReplica(ports) });
  }
  haproxy = startHaproxy({ listenPort: frontendPort, source: BALANCER_SOURCE, replicas: [replicas[0]!, replicas[1]!] });
  await haproxy.waitUp('replica1');
  await haproxy.waitUp('replica2');
  // Two processes of one agent: leastconn puts their sessions on different replicas.
  for (let i = 0; i < 2; i++) {
    sidecars.push(
      await startSidecar({
        gatewayUrl: `https://localhost:${frontendPort}`,
        secureContext: createSecureContext({ cert: agent.certPem, key: agent.privateKeyPem, ca: world.tls.caPem }),
        logger: pino({ level: 'silent' }),
        listenHosts: ['127.0.0.1'],
        backoffInitialMs: 50,
        backoffMaxMs: 200,
      }),
    );
    await until(() => sidecars[i]!.gateway.connected, 10_000, `sidecar ${i} has a session`);
  }
});

after(async () => {
  for (const sidecar of sidecars) await sidecar.close();
  await haproxy?.stop();
  for (const replica of replicas) await replica.process.stop();
  await world?.close();
});

/** An HTTP CONNECT through a sidecar to the echo destination; the tunnel socket once it answers 200. */
async function openThrough(sidecar: Sidecar): Promise<Socket> {
  const req = httpRequest({ host: '127.0.0.1', port: sidecar.port, method: 'CONNECT', path: world.echoAuthority, agent: false });
  req.end();
  const [response, socket] = (await Promise.race([
    once(req, 'connect'),
    once(req, 'error').then(([error]) => Promise.reject(error as Error)),
  ])) as [{ statusCode: number; headers: Record<string, unknown> }, Socket];
  if (response.statusCode !== 200) {
    socket.destroy();
    throw new Error(`CONNECT answered ${response.statusCode} ${String(response.headers['proxy-status'] ?? '')}`);
  }
  socket.on('error', () => {});
  return socket;
}

/** One whole CONNECT: open, echo a payload, close. */
async function connectOnce(sidecar: Sidecar, payload = 'through haproxy'): Promise<void> {
  const socket = await openThrough(sidecar);
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  const ended = once(socket, 'end');
  socket.end(payload);
  await ended;
  socket.destroy();
  assert.equal(Buffer.concat(chunks).toString(), payload);
}

function decisions(replica: Replica): Record<string, unknown>[] {
  return replica.process.lines.filter((line) => line.event === 'connect_decision' && line.status === 200);
}

async function openTunnels(replica: Replica): Promise<number> {
  return ((await (await fetch(`http://127.0.0.1:${replica.adminPort}/tunnels`)).json()) as unknown[]).length;
}

test('CONNECTs through HAProxy land on both replicas, which log and audit the agent\'s address from the PROXY header', async () => {
  for (const sidecar of sidecars) await connectOnce(sidecar);
  for (const replica of replicas) {
    await until(() => decisions(replica).length > 0, 5000, `${replica.name} logged a CONNECT (HAProxy status: ${JSON.stringify(await haproxy.status())})`);
    const seen = decisions(replica);
    // The sidecars connect to HAProxy from 127.0.0.1; HAProxy reaches the replicas from 127.0.0.2.
    assert.equal(seen[0]!.client_address, '127.0.0.1');
    assert.notEqual(seen[0]!.client_port, 0);
  }
  const audited = async () => (await world.fixture.db.query<{ client_address: string | null; n: number }>("SELECT client_address, count(*)::int AS n FROM audit_log WHERE identity = 'agent-scaled' AND reason = 'allowed' GROUP BY 1")).rows;
  await until(async () => (await audited()).reduce((sum, row) => sum + row.n, 0) >= 2, 10_000, 'both replicas wrote their audit rows');
  assert.deepEqual((await audited()).map((row) => row.client_address), ['127.0.0.1'], 'the agent\'s address, never the balancer\'s 127.0.0.2');
});

test('a PROXY header sent straight to a replica from an address it does not trust is refused', async () => {
  const replica = replicas[0]!;
  const metrics = async () => metricValue(await (await fetch(`http://127.0.0.1:${replica.adminPort}/metrics`)).text(), 'agent_gateway_proxy_protocol_refusals_total', 'reason="untrusted_source"');
  const before = await metrics();
  const socket = netConnect({ host: '127.0.0.1', port: replica.port, localAddress: '127.0.0.1' });
  socket.on('error', () => {});
  await once(socket, 'connect');
  socket.write(encodeProxyV2({ command: 'proxy', family: 'inet', source: { address: '203.0.113.9', port: 1234 }, destination: { address: '127.0.0.1', port: replica.port } }));
  let received = 0;
  socket.on('data', (chunk: Buffer) => (received += chunk.length));
  await once(socket, 'close');
  assert.equal(received, 0);
  assert.equal(await metrics(), before + 1);
});

test('a revocation on the primary closes the agent\'s tunnels on both replicas within 1 s', async () => {
  const tunnels = await Promise.all(sidecars.map(openThrough));
  for (const replica of replicas) await until(async () => (await openTunnels(replica)) === 1, 5000, `${replica.name} holds one tunnel`);
  const closed = tunnels.map((socket) => (socket.destroyed ? Promise.resolve() : once(socket, 'close').then(() => undefined)));
  const committed = performance.now();
  await world.revoke(agent.permissionId);
  try {
    const timeout = sleep(10_000).then(() => 'timeout');
    assert.notEqual(await Promise.race([Promise.all(closed), timeout]), 'timeout', 'both tunnels closed');
    const took = performance.now() - committed;
    assert.ok(took <= 1000, `closed within 1 s of the commit, took ${took.toFixed(0)} ms`);
    // The agent sees the close first; each replica forgets the tunnel as its stream finishes.
    for (const replica of replicas) await until(async () => (await openTunnels(replica)) === 0, 5000, `${replica.name} holds no tunnel`);
  } finally {
    // The agent is granted again for the cases that follow.
    agent = await world.grant('agent-scaled', agent);
  }
});

/** Which replica serves each sidecar's session now (by the replica that decides its next CONNECT). */
async function replicaOf(sidecar: Sidecar): Promise<Replica> {
  const before = replicas.map((replica) => decisions(replica).length);
  await connectOnce(sidecar);
  // The replica's log line reaches this process through a pipe, possibly after the echo.
  let replica: Replica | undefined;
  await until(() => (replica = replicas.find((r, i) => decisions(r).length > before[i]!)) !== undefined, 5000, 'a replica logged the CONNECT');
  return replica!;
}

test('killing one replica: its sidecar reconnects through HAProxy to the other within 2 s and new CONNECTs succeed', async (t) => {
  const victim = await replicaOf(sidecars[0]!);
  const survivor = replicas.find((replica) => replica !== victim)!;
  await victim.process.stop(); // SIGKILL: no GOAWAY, no drain
  const killed = performance.now();
  let served = false;
  while (!served && performance.now() - killed < 10_000) {
    try {
      await connectOnce(sidecars[0]!, 'after the crash');
      served = true;
    } catch {
      await sleep(20);
    }
  }
  const took = performance.now() - killed;
  assert.ok(served, 'a CONNECT succeeded after the crash');
  t.diagnostic(`first CONNECT served ${took.toFixed(0)} ms after the kill`);
  assert.ok(took <= 2000, `reconnected within 2 s, took ${took.toFixed(0)} ms`);
  for (const sidecar of sidecars) assert.equal(await replicaOf(sidecar), survivor);
  // Back for the rolling restart.
  victim.process = await startReplica(victim);
  await haproxy.waitUp(victim.name);
});

test('a rolling restart of both replicas under a steady stream of CONNECTs fails none of them (they come back with max_session_age_ms)', async () => {
  let stop = false;
  let succeeded = 0;
  const failures: string[] = [];
  const stream = async (sidecar: Sidecar) => {
    while (!stop) {
      try {
        await connectOnce(sidecar, `steady ${succeeded}`);
        succeeded++;
      } catch (error) {
        failures.push((error as Error).message);
      }
      await sleep(10);
    }
  };
  const streams = sidecars.map(stream);
  try {
    for (const replica of replicas) {
      const before = succeeded;
      // SIGTERM: /readyz 503 for drain_delay_ms, HAProxy takes the replica out, then GOAWAY.
      assert.equal(await replica.process.terminate(), 0, `${replica.name} exited cleanly`);
      // Back with sessions aged out every 2 s: more GOAWAYs under the same steady stream.
      replica.process = await startReplica(replica, 2000);
      await haproxy.waitUp(replica.name);
      assert.ok(succeeded > before, `CONNECTs went on while ${replica.name} restarted`);
    }
  } finally {
    stop = true;
    await Promise.all(streams);
  }
  assert.deepEqual(failures, [], `${failures.length} of ${succeeded + failures.length} CONNECTs failed`);
  // Both replicas serve again.
  for (const replica of replicas) assert.equal((await haproxy.status())[replica.name], 'UP');
});

test('max_session_age_ms: sessions that all landed on one replica spread over both again, without a failed CONNECT', async () => {
  // The rolling restart ended by moving every session off the replica restarted last.
  const seenBy = new Map<string, Set<Sidecar>>();
  const failures: string[] = [];
  await until(async () => {
    for (const sidecar of sidecars) {
      try {
        const replica = await replicaOf(sidecar);
        seenBy.set(replica.name, (seenBy.get(replica.name) ?? new Set()).add(sidecar));
      } catch (error) {
        failures.push((error as Error).message);
      }
    }
    return seenBy.size === 2;
  }, 20_000, 'CONNECTs served by both replicas again');
  assert.deepEqual(failures, []);
});
