import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createPublicKey } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { ClientHttp2Session } from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import pkcs11js from 'pkcs11js';
import type { Gateway } from '../../gateway/src/gateway.js';
import { canonicalPermissionBytes } from '../../registry/permission.js';
import { parseTimestampMicros, type CanonicalTimestamp } from '../../registry/timestamp.js';
import { findPrincipalKey, listPermissions } from '../../registry/store.js';
import { TpmError } from '../../tpm/errors.js';
import { openToken } from '../../tpm/token.js';
import { startTestGateway } from '../helpers/gateway.js';
import { echoServer, exchange, gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, newP256Key, serverTls, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { RegistryFixture } from '../helpers/registry-fixture.js';
import { pastFeedBound } from '../helpers/wait.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';
import { describeRun, runCli, runInProcess, type CliRun } from './run-cli.js';

/**
 * The registry CLI end to end, as child processes, against a real swtpm behind tpm2-abrmd with
 * tpm2-pkcs11, a real PostgreSQL and the real gateway: what operators do, and what the gateway then says.
 */

const TOKEN = 'agent-gateway-principal';
const USER_PIN = 'principal-user-pin-4711';
const SO_PIN = 'principal-so-pin-0815';

let tpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;
let fixture: RegistryFixture;
let tls: ServerTls;
let echo: Awaited<ReturnType<typeof echoServer>>;
let echoAuthority: string;
let gateway: Gateway;
let scratch: string;
let env: NodeJS.ProcessEnv;
const sessions: ClientHttp2Session[] = [];

function cli(args: readonly string[], extraEnv: NodeJS.ProcessEnv = {}): Promise<CliRun> {
  return runCli(args, { env: { ...env, ...extraEnv } });
}

/** The same CLI in this process (TPM included), where a separate process adds nothing. */
function inProcess(args: readonly string[]): Promise<CliRun> {
  return runInProcess(args, { env });
}

function expectExit(run: CliRun, status: number, code?: string): void {
  assert.equal(run.status, status, describeRun(run));
  if (code) assert.equal(run.json.error?.code, code, describeRun(run));
}

/**
 * An agent key and carrier certificate, with the certificate written where --cert can read it.
 * These are software keys (no TPM attests them), so every grant here passes --allow-unattested;
 * attested agent keys are covered by attestation-cli.test.ts.
 */
async function agent(identity: string): Promise<ClientCredentials & { certPath: string }> {
  const credentials = await clientCredentials({ identity });
  const certPath = join(scratch, `${identity}.pem`);
  writeFileSync(certPath, credentials.certPem);
  return { ...credentials, certPath };
}

async function connectStatus(client: ClientCredentials, authority = echoAuthority): Promise<number> {
  const session = await gatewaySession(gateway.address!.port, { caPem: tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  sessions.push(session);
  const { status, stream } = await request(session, authority);
  if (status === 200) {
    const echoed = await exchange(stream, Buffer.from('through the tunnel'));
    assert.equal(echoed.toString(), 'through the tunnel');
  } else {
    stream.close();
  }
  return status;
}

async function permissionCount(): Promise<number> {
  return Number((await fixture.db.query('SELECT count(*) AS n FROM permission_registry')).rows[0].n);
}

before(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'agw-cli-tpm-'));
  // Manufactured with an EK certificate, so principals are registered with real attestation.
  tpm = await startSwtpm({ ekCaDir: join(scratch, 'ek-ca') });
  // For the in-process checks: tpm2-pkcs11 reads these when this process first initialises it.
  Object.assign(process.env, tpm.env, QUIET_TPM_LOG_ENV);
  pgServer = await testServer();
  databaseUrl = await createDatabase(pgServer.url);
  fixture = await RegistryFixture.connect(databaseUrl);
  tls = await serverTls();
  echo = await echoServer();
  echoAuthority = `127.0.0.1:${echo.port}`;
  gateway = await startTestGateway({ databaseUrl, tls });
  env = {
    ...process.env,
    ...tpm.env,
    ...QUIET_TPM_LOG_ENV,
    AGENT_GATEWAY_DATABASE_URL: databaseUrl,
    AGENT_GATEWAY_TPM_USER_PIN: USER_PIN,
    AGENT_GATEWAY_TPM_SO_PIN: SO_PIN,
    AGENT_GATEWAY_EK_CA_FILE: join(scratch, 'ek-ca', 'ca.pem'),
  };
  delete env.AGENT_GATEWAY_TPM_TOKEN;
  delete env.AGENT_GATEWAY_PRINCIPAL_KEY_ID;
});

after(async () => {
  for (const session of sessions) session.destroy();
  await gateway?.close(200);
  await fixture?.close();
  await echo?.close();
  pgServer?.close();
  await tpm?.stop();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('registry CLI with a TPM-backed principal', { concurrency: false }, () => {
  let alpha: Awaited<ReturnType<typeof agent>>;

  test('register-principal creates a TPM key and stores only its public key; again is a no-op', async () => {
    const first = await cli(['--json', 'register-principal', 'org-alice']);
    expectExit(first, 0);
    assert.equal(first.json.tpm_key_created, true);
    assert.equal(first.json.registered, true);
    assert.equal(first.json.state, 'active');
    assert.equal(first.json.algorithm, 'ecdsa-p256-sha256');
    assert.equal(first.json.attestation.verified, true);
    const row = await findPrincipalKey(fixture.db, 'org-alice');
    assert.equal(row?.publicKeySpkiDer.toString('hex'), first.json.public_key_spki_der);

    const again = await inProcess(['register-principal', 'org-alice']);
    expectExit(again, 0);
    assert.match(again.stdout, /found the non-exportable P-256 key/);
    assert.match(again.stdout, /already registered with the same public key .*its attestation was verified again and stored/);
    assert.match(again.stdout, /attestation: TPM-attested/);
  });

  test('the principal key never leaves the TPM: not extractable, sensitive, CKA_VALUE unreadable', async () => {
    const token = openToken({ tokenLabel: TOKEN, userPin: USER_PIN });
    try {
      const key = token.findKey('org-alice');
      const attributes = token.privateKeyAttributes(key, [pkcs11js.CKA_EXTRACTABLE, pkcs11js.CKA_NEVER_EXTRACTABLE, pkcs11js.CKA_SENSITIVE]);
      assert.deepEqual(attributes.get(pkcs11js.CKA_EXTRACTABLE), Buffer.from([0]));
      assert.deepEqual(attributes.get(pkcs11js.CKA_NEVER_EXTRACTABLE), Buffer.from([1]));
      assert.deepEqual(attributes.get(pkcs11js.CKA_SENSITIVE), Buffer.from([1]));
      assert.throws(() => token.privateKeyAttributes(key, [pkcs11js.CKA_VALUE]), (error: unknown) => error instanceof TpmError && ['CKR_ATTRIBUTE_TYPE_INVALID', 'CKR_ATTRIBUTE_SENSITIVE'].includes(error.returnValue ?? ''));
      const row = await findPrincipalKey(fixture.db, 'org-alice');
      assert.deepEqual(row?.publicKeySpkiDer, key.publicKeySpkiDer);
    } finally {
      token.close();
    }
  });

  test('grant-scope stores normalised destinations; re-granting is a no-op, or reactivates a revoked delegation', async () => {
    const first = await inProcess(['--json', 'grant-scope', 'org-alice', echoAuthority, 'DocStore', 'messaging:443']);
    expectExit(first, 0);
    assert.deepEqual(first.json.scopes.map((s: { destination: string; action: string }) => [s.destination, s.action]).sort(), [[echoAuthority, 'created'], ['docstore:443', 'created'], ['messaging:443', 'created']].sort());
    const again = await inProcess(['--json', 'grant-scope', 'org-alice', 'docstore']);
    assert.deepEqual(again.json.scopes.map((s: { action: string }) => s.action), ['unchanged'], describeRun(again));
    expectExit(await inProcess(['revoke', 'scope', 'org-alice', 'messaging']), 0);
    const revoked = await inProcess(['--json', 'list', 'scopes', '--principal', 'org-alice', '--state', 'revoked']);
    assert.deepEqual(revoked.json.scopes.map((s: { destination: string }) => s.destination), ['messaging:443'], describeRun(revoked));
    const reopened = await inProcess(['--json', 'grant-scope', 'org-alice', 'messaging']);
    assert.deepEqual(reopened.json.scopes.map((s: { action: string; state: string }) => [s.action, s.state]), [['reactivated', 'active']], describeRun(reopened));
  });

  test('grant-permission signs inside the TPM, and the gateway answers 200 for that CONNECT', async () => {
    alpha = await agent('agent-alpha');
    const run = await cli(['--json', 'grant-permission', '--allow-unattested', '--principal', 'org-alice', '--identity', 'agent-alpha', '--cert', alpha.certPath, '--grant', echoAuthority, '--grant', 'docstore']);
    expectExit(run, 0);
    const granted = run.json.permissions as { permission_id: string; destination: string; not_before: string; not_after: string }[];
    assert.deepEqual(granted.map((p) => p.destination), [echoAuthority, 'docstore:443']);
    for (const p of granted) {
      assert.match(p.permission_id, /^perm-[0-9a-f-]{36}$/);
      assert.equal(parseTimestampMicros(p.not_after) - parseTimestampMicros(p.not_before), 30n * 24n * 3600n * 1_000_000n);
    }
    assert.equal(await connectStatus(alpha), 200);
  });

  test('a signature made in the TPM verifies with openssl dgst -sha256 -verify over the rebuilt canonical text', async () => {
    const [row] = await listPermissions(fixture.db, { identity: 'agent-alpha', destinations: [echoAuthority] });
    assert.ok(row);
    const message = canonicalPermissionBytes({
      permissionId: row.permissionId,
      signingKeyId: row.signingKeyId,
      subjectIdentity: row.subjectIdentity,
      subjectPublicKeySpkiDer: row.subjectPublicKeySpkiDer,
      destination: row.destination,
      notBefore: row.notBefore as CanonicalTimestamp,
      notAfter: row.notAfter as CanonicalTimestamp,
    });
    const principal = await findPrincipalKey(fixture.db, row.signingKeyId);
    writeFileSync(join(scratch, 'pub.pem'), createPublicKey({ key: principal!.publicKeySpkiDer, format: 'der', type: 'spki' }).export({ format: 'pem', type: 'spki' }));
    writeFileSync(join(scratch, 'sig.der'), row.signature);
    writeFileSync(join(scratch, 'msg'), message);
    const out = execFileSync('openssl', ['dgst', '-sha256', '-verify', join(scratch, 'pub.pem'), '-signature', join(scratch, 'sig.der'), join(scratch, 'msg')], { encoding: 'utf8' });
    assert.match(out, /Verified OK/);
  });

  test('explain agrees with the gateway: allow, exit 0', async () => {
    const run = await inProcess(['--json', 'explain', 'agent-alpha', echoAuthority, '--cert', alpha.certPath]);
    expectExit(run, 0);
    assert.equal(run.json.verdict.decision, 'allow');
    assert.deepEqual(run.json.checks.map((c: { status: string }) => c.status), ['pass', 'pass', 'pass', 'pass', 'pass', 'pass']);
  });

  test('a grant outside the delegated scope is refused (exit 3) and writes no row, not even the in-scope ones', async () => {
    const before = await permissionCount();
    const run = await inProcess(['--json', 'grant-permission', '--allow-unattested', '--principal', 'org-alice', '--identity', 'agent-alpha', '--cert', alpha.certPath, echoAuthority, 'api.example.com']);
    expectExit(run, 3, 'ERR_REFUSED_OUT_OF_SCOPE');
    assert.match(run.json.error.message, /may not delegate api\.example\.com:443 \(not delegated\)/);
    assert.equal(await permissionCount(), before);
  });

  test('refused before signing: control characters, an empty or past window, a certificate for another identity', async () => {
    const before = await permissionCount();
    const spki = alpha.spkiDer.toString('hex');
    const base = ['--json', 'grant-permission', '--allow-unattested', '--principal', 'org-alice', echoAuthority];
    // In process and one at a time: a process may hold the token open only once.
    const runs: CliRun[] = [];
    for (const args of [
      [...base, '--identity', 'agent\u0007alpha', '--spki', spki],
      [...base, '--identity', 'agent-alpha', '--spki', spki, '--not-before', '2031-01-01T00:00:00Z', '--not-after', '2030-01-01T00:00:00Z'],
      [...base, '--identity', 'agent-alpha', '--spki', spki, '--not-before', '2020-01-01T00:00:00Z', '--not-after', '2020-02-01T00:00:00Z'],
      [...base, '--identity', 'agent-beta', '--cert', alpha.certPath],
    ]) {
      runs.push(await inProcess(args));
    }
    expectExit(runs[0]!, 3, 'ERR_REFUSED_FIELD_INVALID');
    expectExit(runs[1]!, 3, 'ERR_REFUSED_VALIDITY');
    expectExit(runs[2]!, 3, 'ERR_REFUSED_VALIDITY');
    expectExit(runs[3]!, 3, 'ERR_REFUSED_IDENTITY_MISMATCH');
    assert.equal(await permissionCount(), before);
  });

  test('a wrong PIN is a clear error (exit 1) that never shows a PIN, and writes no row', async () => {
    const before = await permissionCount();
    const wrongPin = 'wrong-pin-98765';
    const run = await cli(['--json', 'grant-permission', '--allow-unattested', '--principal', 'org-alice', '--identity', 'agent-alpha', '--cert', alpha.certPath, echoAuthority], { AGENT_GATEWAY_TPM_USER_PIN: wrongPin });
    expectExit(run, 1, 'ERR_TPM_PIN_INCORRECT');
    assert.match(run.stderr, /PIN incorrect/);
    assert.doesNotMatch(run.stderr, /^(ERROR|WARNING): /m, 'no raw tpm2-pkcs11 lines before the clean message');
    assert.match(run.stderr, /hint: check AGENT_GATEWAY_TPM_USER_PIN or --user-pin-file/);
    for (const pin of [wrongPin, USER_PIN, SO_PIN]) assert.ok(!`${run.stdout}${run.stderr}`.includes(pin), `a PIN leaked: ${describeRun(run)}`);
    assert.equal(await permissionCount(), before);
  });

  test('a missing token without an SO PIN is a clear error, and nothing is registered', async () => {
    const { AGENT_GATEWAY_TPM_SO_PIN: _unused, ...withoutSoPin } = env;
    const run = await runInProcess(['--json', 'register-principal', 'org-nosopin', '--token', 'never-created'], { env: withoutSoPin });
    expectExit(run, 1, 'ERR_TPM_TOKEN_NOT_FOUND');
    assert.match(run.json.error.message, /no SO PIN was given to create it/);
    assert.equal(await findPrincipalKey(fixture.db, 'org-nosopin'), undefined);
  });

  test('a registered public key that differs from the TPM key is refused, for registering and for signing', async () => {
    expectExit(await cli(['register-principal', 'org-bob']), 0);
    await fixture.delegate('org-bob', echoAuthority);
    await fixture.db.query('UPDATE principal_signing_keys SET public_key_spki_der = $1 WHERE key_id = $2', [newP256Key().spkiDer, 'org-bob']);
    const before = await permissionCount();
    const grant = await inProcess(['--json', 'grant-permission', '--allow-unattested', '--principal', 'org-bob', '--identity', 'agent-alpha', '--cert', alpha.certPath, echoAuthority]);
    const register = await inProcess(['--json', 'register-principal', 'org-bob']);
    expectExit(grant, 3, 'ERR_REFUSED_PRINCIPAL_KEY_MISMATCH');
    expectExit(register, 3, 'ERR_REFUSED_PRINCIPAL_KEY_MISMATCH');
    assert.equal(await permissionCount(), before);
  });

  test('delete-permission revokes the agent\'s rows: the gateway answers 403 and explain says why', async () => {
    const run = await cli(['--json', 'delete-permission', '--identity', 'agent-alpha', '--cert', alpha.certPath, echoAuthority]);
    expectExit(run, 0);
    assert.equal(run.json.revoked, 1);
    await pastFeedBound();
    assert.equal(await connectStatus(alpha), 403);
    const explain = await inProcess(['--json', 'explain', 'agent-alpha', echoAuthority, '--cert', alpha.certPath]);
    expectExit(explain, 3);
    assert.deepEqual([explain.json.verdict.reason, explain.json.verdict.failed_check], ['permission_revoked', 'permission_row']);
    const listed = await inProcess(['--json', 'list', 'permissions', '--identity', 'agent-alpha']);
    assert.equal(listed.json.command, 'list');
    assert.deepEqual(listed.json.permissions.map((p: { destination: string; state: string }) => [p.destination, p.state]), [[echoAuthority, 'revoked'], ['docstore:443', 'active']]);
  });

  test('revoke principal: what it signed is denied, and it can neither sign nor be registered again', async () => {
    const beta = await agent('agent-beta');
    const pinFile = join(scratch, 'user-pin');
    writeFileSync(pinFile, `${USER_PIN}\n`, { mode: 0o600 });
    const grant = await cli(['grant-permission', '--allow-unattested', '--principal', 'org-alice', '--identity', 'agent-beta', '--cert', beta.certPath, '--user-pin-file', pinFile, echoAuthority], { AGENT_GATEWAY_TPM_USER_PIN: '' });
    expectExit(grant, 0);
    assert.match(grant.stdout, /^perm-\S+\tagent-beta -> 127\.0\.0\.1:\d+\t/);
    assert.equal(await connectStatus(beta), 200);

    expectExit(await cli(['revoke', 'principal', 'org-alice']), 0);
    await pastFeedBound();
    assert.equal(await connectStatus(beta), 403);
    assert.equal((await findPrincipalKey(fixture.db, 'org-alice'))?.state, 'revoked');
    const again = await inProcess(['--json', 'grant-permission', '--allow-unattested', '--principal', 'org-alice', '--identity', 'agent-beta', '--cert', beta.certPath, echoAuthority]);
    const register = await inProcess(['--json', 'register-principal', 'org-alice']);
    expectExit(again, 3, 'ERR_REFUSED_PRINCIPAL_INACTIVE');
    expectExit(register, 3, 'ERR_REFUSED_PRINCIPAL_INACTIVE');
    const asJson = await cli(['--database-url-env', 'AGENT_GATEWAY_DATABASE_URL', 'revoke', 'principal', 'org-alice', '--json']);
    assert.deepEqual([asJson.json.command, asJson.json.revoked_now], ['revoke principal', false], describeRun(asJson));
    assert.match((await inProcess(['revoke', 'principal', 'org-alice'])).stdout, /already revoked/);
    expectExit(await inProcess(['--json', 'revoke', 'principal', 'org-nobody']), 3, 'ERR_REFUSED_PRINCIPAL_UNKNOWN');
  });
});
