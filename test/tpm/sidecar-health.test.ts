/**
 * The sidecar's health port: ready only while its gateway session is up and its TPM answers
 * through PKCS#11. Real swtpm + tpm2-abrmd, tpm2-pkcs11, PostgreSQL and gateway; the sidecar runs
 * as its own process, as operators run it.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, test } from 'node:test';
import type { Gateway } from '../../gateway/src/gateway.js';
import { startTestGateway } from '../helpers/gateway.js';
import { serverTls, TEST_OID, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';

const BIN = resolve(import.meta.dirname, '../../bin/agent-gateway-sidecar.js');
let tpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let tls: ServerTls;
let gateway: Gateway;
let databaseUrl: string;
let gatewayPort: number;
let child: ChildProcess;
let healthUrl: string;
const scratch = mkdtempSync(join(tmpdir(), 'agw-sidecar-health-'));

async function readyz(): Promise<{ status: number; body: Record<string, unknown> }> {
  const response = await fetch(`${healthUrl}/readyz`);
  return { status: response.status, body: (await response.json()) as Record<string, unknown> };
}

/** Polls /readyz until it answers `status` (the checks are cached for a second). */
async function until(status: number, withinMs: number): Promise<Record<string, unknown>> {
  const deadline = Date.now() + withinMs;
  let last = await readyz();
  while (last.status !== status && Date.now() < deadline) {
    await sleep(200);
    last = await readyz();
  }
  assert.equal(last.status, status, `readyz stayed ${last.status}: ${JSON.stringify(last.body)}`);
  return last.body;
}

before(async () => {
  tpm = await startSwtpm();
  pgServer = await testServer();
  databaseUrl = await createDatabase(pgServer.url);
  tls = await serverTls();
  gateway = await startTestGateway({ databaseUrl, tls });
  gatewayPort = gateway.address!.port;
  const env: NodeJS.ProcessEnv = { ...process.env, ...tpm.env, ...QUIET_TPM_LOG_ENV, AGENT_GATEWAY_TPM_USER_PIN: 'health-user-pin', AGENT_GATEWAY_TPM_SO_PIN: 'health-so-pin' };
  child = spawn(process.execPath, [BIN, '--gateway', `https://localhost:${gatewayPort}`, '--gateway-ca', tls.caPath, '--ext-oid', TEST_OID, '--identity', 'agent-health', '--tcti', tpm.env.TPM2_PKCS11_TCTI, '--cert-out', join(scratch, 'machine-client.pem'), '--health-port', '0', '--connect-wait-ms', '1000'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk));
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk));
  const line = await new Promise<Record<string, unknown>>((done, fail) => {
    child.stdout!.on('data', () => stdout.includes('\n') && done(JSON.parse(stdout.slice(0, stdout.indexOf('\n')))));
    child.once('exit', (code) => fail(new Error(`sidecar exited ${code}: ${stderr}`)));
  });
  assert.equal(typeof line.health_port, 'number');
  healthUrl = `http://127.0.0.1:${line.health_port}`;
});

after(async () => {
  if (child && child.exitCode === null) {
    child.kill('SIGKILL');
    await once(child, 'exit');
  }
  await gateway?.close(100);
  pgServer?.close();
  await tpm?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

test('/healthz answers while the process runs', async () => {
  const response = await fetch(`${healthUrl}/healthz`);
  assert.equal(response.status, 200);
});

test('/readyz is 200 with the gateway session up and the TPM answering', async () => {
  const body = await until(200, 10_000);
  assert.equal(body.gateway_session, true);
  assert.equal(body.tpm, true);
});

test('/readyz turns 503 when the gateway goes away, and 200 when it is back', async () => {
  await gateway.close(100);
  const down = await until(503, 10_000);
  assert.equal(down.gateway_session, false);
  assert.equal(down.tpm, true);
  gateway = await startTestGateway({ databaseUrl, tls, port: gatewayPort });
  await until(200, 10_000);
});

test('/readyz turns 503 when the TPM stops answering', async () => {
  await tpm.stop();
  const body = await until(503, 15_000);
  assert.equal(body.tpm, false);
});
