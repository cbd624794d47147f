/**
 * Live revocation with many distinct keys (DESIGN §9b): one agent holds one tunnel to each of N
 * distinct destinations (N permission rows, N delegations, one principal key), then the
 * principal key is revoked. Prints the time from the revoking COMMIT to the last tunnel closed,
 * the re-check pass as the gateway logged it, queries sent and CPU over the window (in process,
 * gateway, client and echo server share it: an upper bound on the gateway's; see PROCESS).
 *
 *   node --import tsx bench/revocation-keys.ts [N...]      (default 200 1000 3000)
 *   MAX_CONNECTIONS=5 to set [policy] max_connections.
 *   MODE=key (default): revoke the principal key, so every key's tunnel closes.
 *   MODE=one: revoke the delegation of the last destination only: one tunnel closes, the other
 *   N-1 keys are re-checked and still allowed (each a signature verification).
 *   PROCESS=1: the compiled gateway in its own process (`npm run build` first; GATEWAY_BIN=path
 *   to another build's bin/agent-gateway.js for an A/B): cpu_ms is then the gateway's alone,
 *   from /proc/PID/stat (10 ms ticks). The echo server and the client stay in this process.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { parseConfig } from '../gateway/src/config.js';
import { createGateway } from '../gateway/src/gateway.js';
import { startEchoRegistry } from '../test/helpers/echo-registry.js';
import { startGatewayProcess } from '../test/helpers/gateway-process.js';
import { captureLogger } from '../test/helpers/logs.js';
import { gatewaySession, request } from '../test/helpers/net.js';
import { clientCredentials, TEST_OID } from '../test/helpers/pki.js';
import { at, DAY } from '../test/helpers/registry-fixture.js';
import { until } from '../test/helpers/wait.js';

const sizes = process.argv.slice(2).map(Number);
if (sizes.length === 0) sizes.push(200, 1000, 3000);
const maxConnections = Number(process.env.MAX_CONNECTIONS ?? 5);
const mode = process.env.MODE ?? 'key';

/** The gateway under test, in this process or its own. */
interface Target {
  readonly port: number;
  readonly lines: Record<string, unknown>[];
  openTunnels(): Promise<number>;
  /** CPU used so far, ms: the gateway process's, or this whole process's. */
  cpuMs(): number;
  /** Registry queries sent and keys re-checked (in process only). */
  counters(): { queries: number; rechecks: number } | undefined;
  close(): Promise<void>;
}

function config(n: number, destinations: string[]) {
  return {
    server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath, shutdown_grace_ms: 200 },
    policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl, connect_timeout_ms: 2000, max_connections: maxConnections },
    // debug: the re-check pass's own line (recheck_pass).
    observability: { log_level: 'debug' },
    admin: { listen_addr: '127.0.0.1:0', process_metrics: false },
    audit: { enabled: false },
    limits: { max_streams_per_session: Math.max(1000, n + 10) },
    resolve: Object.fromEntries(destinations.map((d) => [d, world.echoAuthority])),
  };
}

async function startTarget(n: number, destinations: string[]): Promise<Target> {
  if (process.env.PROCESS) {
    const gateway = await startGatewayProcess(config(n, destinations), {}, process.env.GATEWAY_BIN ?? undefined);
    const admin = `http://127.0.0.1:${gateway.adminPort}`;
    await until(async () => /agent_gateway_change_feed_up\{path="listen"\} 1/.test(await (await fetch(`${admin}/metrics`)).text()), 5000, 'LISTEN up');
    const ticks = () => {
      const fields = readFileSync(`/proc/${gateway.child.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
      return Number(fields[11]) + Number(fields[12]);
    };
    return {
      port: gateway.port,
      lines: gateway.lines,
      openTunnels: async () => ((await (await fetch(`${admin}/tunnels`)).json()) as unknown[]).length,
      cpuMs: () => ticks() * 10,
      counters: () => undefined,
      close: async () => void (await gateway.terminate()),
    };
  }
  const lines: Record<string, unknown>[] = [];
  const gateway = createGateway(parseConfig(config(n, destinations)), { logger: captureLogger(lines) });
  await gateway.listen();
  await until(() => gateway.feed.listening, 5000, 'LISTEN up');
  return {
    port: gateway.address!.port,
    lines,
    openTunnels: async () => gateway.openTunnels,
    cpuMs: () => {
      const used = process.cpuUsage();
      return (used.user + used.system) / 1000;
    },
    counters: () => ({ queries: gateway.lookups.started, rechecks: gateway.enforcer.rechecks }),
    close: () => gateway.close(100),
  };
}

const world = await startEchoRegistry();
let run = 0;
try {
  for (const n of sizes) {
    run++;
    const keyId = `org-many-${run}`;
    const principal = await world.fixture.principal(keyId, { notBefore: at(-DAY) });
    const identity = `agent-many-${run}`;
    const client = await clientCredentials({ identity });
    const destinations = Array.from({ length: n }, (_, i) => `d${i}.r${run}.scale.test:443`);
    await world.fixture.delegateMany(keyId, destinations, { notBefore: at(-DAY) });
    await world.fixture.permitMany(principal, { identity, spkiDer: client.spkiDer }, destinations, { notBefore: at(-DAY) });

    const target = await startTarget(n, destinations);
    const lines = target.lines;
    const session = await gatewaySession(target.port, { caPem: world.tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
    const ended: Promise<number>[] = [];
    const opening = performance.now();
    // The first CONNECT alone: until one is allowed the peer is a stranger, with 64 lookups waiting at most.
    for (const [from, to] of [[0, 1], ...Array.from({ length: Math.ceil((n - 1) / 100) }, (_, k) => [1 + k * 100, 101 + k * 100])] as [number, number][]) {
      await Promise.all(
        destinations.slice(from, to).map(async (destination, k) => {
          const { status, stream } = await request(session, destination);
          assert.equal(status, 200, destination);
          stream.on('error', () => {});
          ended[from + k] = new Promise<number>((resolve) => {
            stream.once('end', () => resolve(performance.now()));
            stream.once('close', () => resolve(performance.now()));
          });
          stream.once('end', () => stream.end());
          stream.resume();
        }),
      );
    }
    await until(async () => (await target.openTunnels()) === n, 20_000, `${n} tunnels open`);
    const openMs = performance.now() - opening;
    const countersBefore = target.counters();
    // PROFILE=DIR: a CPU profile of this window only (commit to last close), one file per N.
    const profiler = process.env.PROFILE ? new Session() : undefined;
    if (profiler) {
      profiler.connect();
      await profiler.post('Profiler.enable');
      await profiler.post('Profiler.start');
    }
    const cpu = target.cpuMs();
    if (mode === 'one') await world.fixture.db.query('UPDATE principal_key_permissions SET revoked_at = now() WHERE signing_key_id = $1 AND destination = $2', [keyId, destinations[n - 1]]);
    else await world.fixture.db.query('UPDATE principal_signing_keys SET revoked_at = now() WHERE key_id = $1', [keyId]);
    const committed = performance.now();
    const last = Math.max(...(await Promise.all(mode === 'one' ? ended.slice(-1) : ended))) - committed;
    await until(() => lines.some((l) => l.event === 'recheck_pass'), 10_000, 'the pass logged');
    if (mode === 'one') {
      await until(async () => (await target.openTunnels()) === n - 1, 5000, 'the revoked delegation\'s tunnel gone');
      await new Promise((resolve) => setTimeout(resolve, 200));
      assert.equal(await target.openTunnels(), n - 1, 'only the revoked delegation\'s tunnel closed');
    }
    const cpuMs = target.cpuMs() - cpu;
    const counters = target.counters();
    if (profiler) {
      const { profile } = await profiler.post('Profiler.stop');
      writeFileSync(`${process.env.PROFILE}/revocation-${n}.cpuprofile`, JSON.stringify(profile));
      profiler.disconnect();
    }
    const passes = lines.filter((l) => l.event === 'recheck_pass').map((l) => `${l.keys} keys/${l.batches ?? l.keys} queries/${l.ms} ms${l.failed ? `/${l.failed} failed` : ''}`);
    console.log(
      JSON.stringify({
        n,
        mode,
        max_connections: maxConnections,
        open_ms: Math.round(openMs),
        commit_to_last_close_ms: Math.round(last),
        per_key_us: Math.round((last * 1000) / n),
        ...(counters && countersBefore ? { queries: counters.queries - countersBefore.queries, rechecks: counters.rechecks - countersBefore.rechecks } : {}),
        passes,
        [process.env.PROCESS ? 'gateway_cpu_ms' : 'process_cpu_ms']: Math.round(cpuMs),
      }),
    );
    session.destroy();
    await target.close();
  }
} finally {
  await world.close();
}
