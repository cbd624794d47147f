/**
 * Key rotation end to end, as an operator runs it: real swtpm behind tpm2-abrmd holding both the
 * agent's keys and the principal's, real PostgreSQL, the real gateway, the `agent-gateway-sidecar`
 * bin as a child process (SIGHUP for real) and the registry CLI. A 64 MiB download opened on the
 * old key's session is held open across the whole switch and must arrive byte-exact; CONNECTs
 * made during the switch must all succeed.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Gateway } from '../../gateway/src/gateway.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { readCarrierCertificate } from '../../sidecar/src/tls-identity.js';
import { openToken } from '../../tpm/token.js';
import { connectViaProxy, getOver } from '../helpers/chain.js';
import { startTestGateway } from '../helpers/gateway.js';
import { captureLogger } from '../helpers/logs.js';
import { serverTls, TEST_OID, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';
import { until } from '../helpers/wait.js';
import { describeRun, REPO, runCli, runFile, type CliRun } from '../registry-cli/run-cli.js';

const SIDECAR = resolve(REPO, 'bin/agent-gateway-sidecar.js');
const AGENT_TOKEN = 'agw-rotation-agent';
const PRINCIPAL_TOKEN = 'agw-rotation-principal';
const USER_PIN = 'rotation-user-pin-1618';
const SO_PIN = 'rotation-so-pin-2718';
const IDENTITY = 'agent-alpha';
const DOWNLOAD_BYTES = 64 * 1024 * 1024;
const WAIT_MS = 60_000;

let tpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;
let scratch: string;
let gatewayTls: ServerTls;
let serviceTls: ServerTls;
let service: { port: number; close: () => Promise<void> };
let download: Buffer;
let gateway: Gateway;
let sidecar: ChildProcess;
let sidecarLog = '';
let proxyUrl: string;
let configPath: string;
let certPath: string;
let cliEnv: NodeJS.ProcessEnv;
const gatewayLog: Record<string, unknown>[] = [];

/** docstore.test: /health, and /big, the 64 MiB download (distinct 1 MiB blocks, so a lost or repeated block shows). */
async function startService(tls: ServerTls): Promise<{ port: number; close: () => Promise<void> }> {
  const block = randomBytes(1024 * 1024);
  const blocks = Array.from({ length: DOWNLOAD_BYTES / block.length }, (_, i) => {
    const copy = Buffer.from(block);
    copy.writeUInt32BE(i, 0);
    return copy;
  });
  download = Buffer.concat(blocks);
  const server = createHttpsServer({ cert: readFileSync(tls.certPath), key: readFileSync(tls.keyPath) }, async (req, res) => {
    if (req.url !== '/big') return void res.writeHead(200, { 'content-type': 'application/json' }).end('{"status":"ok"}');
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(DOWNLOAD_BYTES) });
    for (const chunk of blocks) if (!res.write(chunk)) await once(res, 'drain');
    res.end();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as AddressInfo).port,
    close: () => {
      server.closeAllConnections();
      return new Promise<void>((done) => server.close(() => done()));
    },
  };
}

function cli(args: readonly string[]): Promise<CliRun> {
  return runCli(['--json', ...args], { env: cliEnv, timeoutMs: WAIT_MS });
}

/** `agent-gateway-sidecar key destroy ...` beside the running sidecar, as the operator runs it. */
function keyCommand(args: readonly string[]): Promise<CliRun> {
  return runFile(process.execPath, [SIDECAR, 'key', ...args, '--token-label', AGENT_TOKEN, '--tcti', tpm.env.TPM2_PKCS11_TCTI], { env: cliEnv, timeoutMs: WAIT_MS });
}

function writeConfig(keyLabel: string, extra = ''): void {
  writeFileSync(configPath, `key_label = ${JSON.stringify(keyLabel)}\ncert_out = "machine-client.pem"\ndrain_timeout_ms = 120000\n${extra}`);
}

function logEvents(event: string): Record<string, unknown>[] {
  return sidecarLog
    .split('\n')
    .filter((line) => line.includes(`"event":"${event}"`))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

function allowedFingerprints(): string[] {
  return gatewayLog.filter((line) => line.event === 'connect_decision' && line.status === 200).map((line) => String(line.spki_fingerprint));
}

/** One CONNECT through the sidecar and one HTTPS request in the tunnel. */
async function healthThroughSidecar(): Promise<number> {
  const { status, socket } = await connectViaProxy(proxyUrl, 'docstore.test:443', serviceTls.caPem);
  if (!socket) return status;
  const response = await getOver(socket, 'docstore.test', '/health');
  socket.destroy();
  return response.status === 200 ? status : response.status;
}

function certFingerprint(path: string): string {
  return spkiFingerprint(readCarrierCertificate(path, TEST_OID)!.spkiDer);
}

before(async () => {
  tpm = await startSwtpm();
  Object.assign(process.env, tpm.env, QUIET_TPM_LOG_ENV);
  scratch = mkdtempSync(join(tmpdir(), 'agw-rotation-'));
  pgServer = await testServer();
  databaseUrl = await createDatabase(pgServer.url);
  gatewayTls = await serverTls();
  serviceTls = await serverTls(['docstore.test']);
  service = await startService(serviceTls);
  gateway = await startTestGateway({ databaseUrl, tls: gatewayTls, resolve: { 'docstore.test': `127.0.0.1:${service.port}`, 'messaging.test': `127.0.0.1:${service.port}` }, logger: captureLogger(gatewayLog, 'info') });
  cliEnv = {
    ...process.env,
    ...tpm.env,
    ...QUIET_TPM_LOG_ENV,
    AGENT_GATEWAY_DATABASE_URL: databaseUrl,
    AGENT_GATEWAY_TPM_USER_PIN: USER_PIN,
    AGENT_GATEWAY_TPM_SO_PIN: SO_PIN,
    AGENT_GATEWAY_TPM_TOKEN: PRINCIPAL_TOKEN,
    AGENT_GATEWAY_PRINCIPAL_KEY_ID: 'org-tpm',
    AGENT_GATEWAY_IDENTITY: IDENTITY,
    AGENT_GATEWAY_CLIENT_EXT_OID: TEST_OID,
  };
  for (const args of [['register-principal', '--allow-unattested', 'org-tpm'], ['grant-scope', 'org-tpm', 'docstore.test', 'messaging.test']]) {
    const run = await cli(args);
    assert.equal(run.status, 0, describeRun(run));
  }

  configPath = join(scratch, 'sidecar.toml');
  certPath = join(scratch, 'machine-client.pem');
  writeConfig('agent-tls-1');
  sidecar = spawn(
    process.execPath,
    [SIDECAR, '--config', configPath, '--gateway', `https://localhost:${gateway.address!.port}`, '--gateway-ca', gatewayTls.caPath, '--token-label', AGENT_TOKEN, '--tcti', tpm.env.TPM2_PKCS11_TCTI],
    { env: { ...cliEnv, AGENT_GATEWAY_SIDECAR_LOG: 'info' }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stdout = '';
  sidecar.stdout!.on('data', (chunk: Buffer) => (stdout += chunk));
  sidecar.stderr!.on('data', (chunk: Buffer) => (sidecarLog += chunk));
  await until(() => stdout.includes('\n') || sidecar.exitCode !== null, WAIT_MS, 'the sidecar to listen');
  assert.ok(stdout.includes('\n'), `sidecar did not start:\n${sidecarLog}`);
  proxyUrl = JSON.parse(stdout.split('\n')[0]!).proxy_url;
  // TPM attestation at enrolment has its own tests; here the keys are granted without it.
  const granted = await cli(['grant-permission', '--allow-unattested', '--identity', IDENTITY, '--cert', certPath, '--oid', TEST_OID, 'docstore.test', 'messaging.test']);
  assert.equal(granted.status, 0, describeRun(granted));
});

after(async () => {
  // A failed rotation test may leave the paused download's tunnel open: end it with the sidecar.
  if (sidecar && sidecar.exitCode === null) {
    sidecar.kill('SIGTERM');
    await once(sidecar, 'exit');
  }
  await gateway?.close(200);
  await service?.close();
  pgServer?.close();
  await tpm?.stop();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('key rotation', { concurrency: false }, () => {
  let oldFingerprint: string;

  test('the sidecar serves with the first key', async () => {
    oldFingerprint = certFingerprint(certPath);
    assert.equal(await healthThroughSidecar(), 200);
    assert.equal(allowedFingerprints().at(-1), oldFingerprint);
  });

  test('SIGHUP with an invalid setting is logged and keeps the running settings and key', async () => {
    writeConfig('agent-tls-1', 'connect_wait_ms = "soon"\n');
    sidecar.kill('SIGHUP');
    await until(() => logEvents('sidecar_reload_failed').length === 1, WAIT_MS, 'the refused reload');
    assert.match(String(logEvents('sidecar_reload_failed')[0]!.err), /connect-wait-ms/);
    // A key that is not in the TPM is refused too: a reload never generates one.
    writeConfig('no-such-key');
    sidecar.kill('SIGHUP');
    await until(() => logEvents('sidecar_reload_failed').length === 2, WAIT_MS, 'the second refused reload');
    assert.match(String(logEvents('sidecar_reload_failed')[1]!.err), /no key "no-such-key"/);
    assert.equal(sidecar.exitCode, null, 'still running');
    assert.equal(await healthThroughSidecar(), 200);
    assert.equal(allowedFingerprints().at(-1), oldFingerprint);
    assert.equal(certFingerprint(certPath), oldFingerprint, 'the certificate file still presents the running key');
    writeConfig('agent-tls-1');
  });

  test('list --expiring-within shows the permissions to renew, soonest first', async () => {
    const soon = new Date(Date.now() + 2 * 3600_000).toISOString();
    const beta = await cli(['grant-permission', '--allow-unattested', '--identity', 'agent-beta', '--spki', readCarrierCertificate(certPath, TEST_OID)!.spkiDer.toString('hex'), '--not-after', soon, 'docstore.test']);
    assert.equal(beta.status, 0, describeRun(beta));
    const table = await runCli(['list', 'permissions', '--expiring-within', '1d'], { env: cliEnv });
    assert.equal(table.status, 0, describeRun(table));
    const lines = table.stdout.trim().split('\n');
    assert.match(lines[0]!, /^PERMISSION_ID\s+IDENTITY\s+DESTINATION\s+KEY_ID\s+STATE\s+NOT_BEFORE\s+NOT_AFTER/);
    assert.equal(lines.length, 2, table.stdout);
    assert.match(lines[1]!, /agent-beta\s+docstore\.test:443\s+org-tpm\s+active/);
    const wide = await cli(['list', 'permissions', '--expiring-within', '4w3d']);
    assert.deepEqual(wide.json.permissions.map((p: { identity: string }) => p.identity), ['agent-beta', IDENTITY, IDENTITY], 'soonest first');
    const bad = await cli(['list', '--expiring-within', '30']);
    assert.equal(bad.status, 2, describeRun(bad));
    assert.equal(bad.json.error.code, 'ERR_USAGE');
    const revoked = await cli(['delete-permission', '--identity', 'agent-beta']);
    assert.equal(revoked.status, 0, describeRun(revoked));
    const after = await cli(['list', 'permissions', '--expiring-within', '1d']);
    assert.deepEqual(after.json.permissions, [], 'a revoked row needs no renewal');
  });

  test('next_key_label and SIGHUP: the sidecar generates its next key and keeps serving with the running one; rotate-key refuses, writing nothing, when a delegation no longer covers a destination', async () => {
    writeConfig('agent-tls-1', 'next_key_label = "agent-tls-2"\n');
    sidecar.kill('SIGHUP');
    await until(() => logEvents('next_key_ready').length === 1, WAIT_MS, 'the next key');
    const ready = logEvents('next_key_ready')[0]!;
    assert.equal(ready.key_created, true);
    assert.equal(ready.cert, join(scratch, 'machine-client.next.pem'));
    assert.equal(ready.spki_fingerprint, certFingerprint(join(scratch, 'machine-client.next.pem')));
    assert.notEqual(ready.spki_fingerprint, oldFingerprint);
    assert.equal(certFingerprint(certPath), oldFingerprint);
    assert.equal(await healthThroughSidecar(), 200);
    assert.equal(allowedFingerprints().at(-1), oldFingerprint, 'still the running key');

    const before = await cli(['list', 'permissions']);
    assert.equal((await cli(['revoke', 'scope', 'org-tpm', 'messaging.test'])).status, 0);
    const unattested = await cli(['rotate-key', '--identity', IDENTITY, '--from-cert', certPath, '--to-cert', join(scratch, 'machine-client.next.pem'), '--oid', TEST_OID]);
    assert.equal(unattested.json.error?.code, 'ERR_REFUSED_UNATTESTED', describeRun(unattested));
    const refused = await cli(['rotate-key', '--allow-unattested', '--identity', IDENTITY, '--from-cert', certPath, '--to-cert', join(scratch, 'machine-client.next.pem'), '--oid', TEST_OID]);
    assert.equal(refused.status, 3, describeRun(refused));
    assert.equal(refused.json.error.code, 'ERR_REFUSED_OUT_OF_SCOPE');
    assert.match(refused.json.error.message, /messaging\.test:443/);
    assert.deepEqual((await cli(['list', 'permissions'])).json.permissions, before.json.permissions, 'nothing was written');
    assert.equal((await cli(['grant-scope', 'org-tpm', 'messaging.test'])).status, 0);
    const same = await cli(['rotate-key', '--identity', IDENTITY, '--from-cert', certPath, '--to-cert', certPath, '--oid', TEST_OID]);
    assert.equal(same.json.error?.code, 'ERR_REFUSED_SAME_KEY', describeRun(same));
  });

  test('rotation under load: the download started before completes byte-exact, every CONNECT during the switch succeeds, the old key is gone', async () => {
    // The download starts on the old key's session and is held (paused) until the switch is over.
    const { status, socket } = await connectViaProxy(proxyUrl, 'docstore.test:443', serviceTls.caPem);
    assert.equal(status, 200);
    const req = httpRequest({ createConnection: () => socket!, host: 'docstore.test', path: '/big', headers: { host: 'docstore.test' } });
    req.end();
    const [res] = (await once(req, 'response')) as [IncomingMessage];
    const hash = createHash('sha256');
    let received = 0;
    res.on('data', (chunk: Buffer) => {
      hash.update(chunk);
      received += chunk.length;
      if (received >= 1024 * 1024 && !resumed) res.pause();
    });
    let resumed = false;
    const ended = once(res, 'end');
    await until(() => received >= 1024 * 1024, WAIT_MS, 'the first MiB of the download');

    const rotated = await cli(['rotate-key', '--allow-unattested', '--identity', IDENTITY, '--from-cert', certPath, '--to-cert', join(scratch, 'machine-client.next.pem'), '--oid', TEST_OID]);
    assert.equal(rotated.status, 0, describeRun(rotated));
    assert.deepEqual(rotated.json.permissions.map((p: { destination: string }) => p.destination).sort(), ['docstore.test:443', 'messaging.test:443']);
    const rerun = await cli(['rotate-key', '--allow-unattested', '--identity', IDENTITY, '--from-cert', certPath, '--to-cert', join(scratch, 'machine-client.next.pem'), '--oid', TEST_OID]);
    assert.deepEqual(rerun.json.permissions, [], 'a rerun signs nothing twice');
    const newFingerprint = certFingerprint(join(scratch, 'machine-client.next.pem'));
    copyFileSync(certPath, join(scratch, 'old.pem'));

    // CONNECTs all through the switch: before the SIGHUP, while the new handshake runs, after.
    const statuses: number[] = [];
    let connecting = true;
    const load = (async () => {
      while (connecting) statuses.push(await healthThroughSidecar().catch(() => -1));
    })();
    await until(() => statuses.length >= 3, WAIT_MS, 'CONNECTs before the switch');
    writeConfig('agent-tls-2');
    sidecar.kill('SIGHUP');
    try {
      await until(() => logEvents('gateway_session_draining').length === 1, WAIT_MS, 'the new session to take over').catch((error: Error) => {
        throw new Error(`${error.message}; the sidecar logged:\n${sidecarLog.slice(-4000)}`);
      });
      const switchedAt = statuses.length;
      await until(() => statuses.length >= switchedAt + 5, WAIT_MS, 'CONNECTs after the switch');
    } finally {
      connecting = false;
      await load;
    }
    assert.deepEqual(statuses.filter((s) => s !== 200), [], `every CONNECT succeeded (${statuses.length} made)`);
    assert.equal(allowedFingerprints().at(-1), newFingerprint, 'new CONNECTs use the new key');
    assert.equal(certFingerprint(certPath), newFingerprint, 'machine-client.pem now presents the new key');
    assert.equal(logEvents('sidecar_reloaded').at(-1)!.rotated, true);
    assert.deepEqual(logEvents('gateway_session_drained'), [], 'the old session waits for its download');

    resumed = true;
    res.resume();
    await ended;
    assert.equal(received, DOWNLOAD_BYTES);
    assert.equal(hash.digest('hex'), createHash('sha256').update(download).digest('hex'), 'byte-exact');
    socket!.destroy();
    await until(() => logEvents('gateway_session_drained').length === 1, WAIT_MS, 'the old session to drain');
    assert.equal(logEvents('gateway_session_drained')[0]!.reason, 'drained');
    assert.equal(logEvents('gateway_session_drained')[0]!.spki_fingerprint, oldFingerprint);

    // Then the old rows are revoked and the old key destroyed; the agent goes on with the new key.
    const revoked = await cli(['delete-permission', '--identity', IDENTITY, '--cert', join(scratch, 'old.pem')]);
    assert.equal(revoked.status, 0, describeRun(revoked));
    const rows = (await cli(['list', 'permissions', '--identity', IDENTITY])).json.permissions as { subject_fingerprint: string; state: string }[];
    assert.deepEqual(rows.filter((r) => r.subject_fingerprint === oldFingerprint).map((r) => r.state), ['revoked', 'revoked']);
    assert.deepEqual(rows.filter((r) => r.subject_fingerprint === newFingerprint).map((r) => r.state), ['active', 'active']);
    const inUse = await keyCommand(['destroy', '--key-label', 'agent-tls-2', '--config', configPath]);
    assert.equal(inUse.status, 3, describeRun(inUse));
    assert.match(inUse.stderr, /nothing was destroyed/);
    const destroyed = await keyCommand(['destroy', '--key-label', 'agent-tls-1', '--config', configPath]);
    assert.equal(destroyed.status, 0, describeRun(destroyed));
    const token = openToken({ tokenLabel: AGENT_TOKEN, userPin: USER_PIN });
    try {
      assert.equal(token.findKeyOrUndefined('agent-tls-1'), undefined, 'the old key is gone from the TPM');
      assert.ok(token.findKeyOrUndefined('agent-tls-2'));
    } finally {
      token.close();
    }
    assert.equal(await healthThroughSidecar(), 200);
    assert.equal(allowedFingerprints().at(-1), newFingerprint);
    // The audit trail says the same: the newest allowed CONNECT came with the new key.
    await until(async () => (await cli(['audit', '--identity', IDENTITY, '--status', '200', '--limit', '1'])).json.rows?.[0]?.spki_fingerprint === newFingerprint, WAIT_MS, 'an audit row with the new key');
  });

  test('key destroy refuses the running key when the certificate that names it cannot be read (a missing or garbled --cert-out destroyed it)', async () => {
    const garbled = join(scratch, 'garbled.pem');
    writeFileSync(garbled, 'not a certificate\n');
    // No --config: the operator forgot it, so cert_out is whatever the flag (or default) says.
    for (const certOut of [join(scratch, 'nowhere.pem'), garbled]) {
      const refused = await keyCommand(['destroy', '--key-label', 'agent-tls-2', '--cert-out', certOut]);
      assert.equal(refused.status, 3, describeRun(refused));
      assert.match(refused.stderr, /cannot tell which key the sidecar presents/);
      assert.match(refused.stderr, /nothing was destroyed/);
    }
    const token = openToken({ tokenLabel: AGENT_TOKEN, userPin: USER_PIN });
    try {
      assert.ok(token.findKeyOrUndefined('agent-tls-2'), 'the running key is still in the TPM');
    } finally {
      token.close();
    }
    assert.equal(await healthThroughSidecar(), 200);
  });
});
