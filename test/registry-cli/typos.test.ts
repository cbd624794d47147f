import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { clientCredentials } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { RegistryFixture } from '../helpers/registry-fixture.js';
import { CLI, describeRun, runCli, runFile } from './run-cli.js';

/**
 * What a newcomer's typos get from the registry CLI: a clear refusal that changes nothing, never a
 * success that did nothing or an error from the wrong layer. Real PostgreSQL; no TPM is needed,
 * which is the point: these must be refused before the TPM is asked.
 */

let server: Awaited<ReturnType<typeof testServer>>;
let fixture: RegistryFixture;
let env: NodeJS.ProcessEnv;
let scratch: string;

before(async () => {
  server = await testServer();
  const databaseUrl = await createDatabase(server.url);
  fixture = await RegistryFixture.connect(databaseUrl);
  scratch = mkdtempSync(join(tmpdir(), 'agw-typos-'));
  // No TPM here: a command that reached the TPM would fail with a TPM error, not the refusal.
  env = { ...process.env, AGENT_GATEWAY_DATABASE_URL: databaseUrl, AGENT_GATEWAY_TPM_USER_PIN: 'unused-pin', TPM2_PKCS11_TCTI: 'swtpm:host=127.0.0.1,port=1' };
});

after(async () => {
  await fixture?.close();
  server?.close();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

async function permissionRows(): Promise<string> {
  const { rows } = await fixture.db.query<{ rows: string }>("SELECT count(*) || '/' || count(revoked_at) AS rows FROM permission_registry");
  return rows[0]!.rows;
}

test('delete-permission for an identity with no rows is refused (exit 3), like revoke; one with only revoked rows is a no-op', async () => {
  const alice = await fixture.principal('org-alice');
  await fixture.delegate('org-alice', 'docstore:443');
  const agent = await clientCredentials({ identity: 'agent-alpha' });
  await fixture.permit(alice, { identity: 'agent-alpha', spkiDer: agent.spkiDer }, 'docstore:443');

  const typo = await runCli(['--json', 'delete-permission', '--identity', 'agent-nobody'], { env });
  assert.equal(typo.status, 3, describeRun(typo));
  assert.equal(typo.json.error.code, 'ERR_REFUSED_PERMISSION_UNKNOWN');
  assert.match(typo.stderr, /agent-gateway-registry: error: no permission of agent-nobody .*nothing was revoked/);
  assert.equal(await permissionRows(), '1/0');

  const first = await runCli(['delete-permission', '--identity', 'agent-alpha'], { env });
  assert.equal(first.status, 0, describeRun(first));
  assert.match(first.stdout, /revoked 1 permission of agent-alpha/);
  const again = await runCli(['delete-permission', '--identity', 'agent-alpha'], { env });
  assert.equal(again.status, 0, describeRun(again));
  assert.match(again.stdout, /revoked 0 permissions of agent-alpha/);
  assert.equal(await permissionRows(), '1/1');
});

test('grant-permission by an unregistered principal is refused as such (exit 3) before the TPM is asked', async () => {
  const agent = await clientCredentials({ identity: 'agent-alpha' });
  const certPath = join(scratch, 'agent-alpha.pem');
  writeFileSync(certPath, agent.certPem);
  const before = await permissionRows();
  const run = await runCli(['--json', 'grant-permission', '--principal', 'org-bob', '--identity', 'agent-alpha', '--cert', certPath, 'docstore'], { env });
  assert.equal(run.status, 3, describeRun(run));
  assert.equal(run.json.error.code, 'ERR_REFUSED_PRINCIPAL_UNKNOWN');
  assert.match(run.stderr, /no principal key "org-bob" in the registry/);
  assert.doesNotMatch(run.stderr, /TPM|PKCS/);
  assert.equal(await permissionRows(), before);
});

test('usage errors from the option parser carry the same "agent-gateway-registry: error:" prefix as every other error', async () => {
  for (const args of [['list', '--state', 'bogus'], ['list', '--bogus'], ['delete-permission']]) {
    const run = await runCli(args, { env });
    assert.equal(run.status, 2, describeRun(run));
    assert.match(run.stderr, /^agent-gateway-registry: error: /, describeRun(run));
  }
});

test('a command that only groups subcommands, given none, names them (not commander\'s "(outputHelp)")', async () => {
  for (const [args, message] of [
    [['revoke'], /^`revoke` needs one of its commands: principal, scope, permission /],
    [['attest'], /^`attest` needs one of its commands: collect, challenge, activate /],
    [[], /^no command given: use one of migrate, .*, audit /],
  ] as const) {
    const run = await runCli(['--json', ...args], { env });
    assert.equal(run.status, 2, describeRun(run));
    assert.equal(run.json.error.code, 'ERR_USAGE');
    assert.match(run.json.error.message, message, describeRun(run));
    assert.match(run.stderr, /^Usage: agent-gateway-registry/, 'the help comes first');
    assert.match(run.stderr, /\nagent-gateway-registry: error: (?:`\w+` needs one of|no command given)/, describeRun(run));
  }
});

test('error messages escape DEL and C1 controls as \\uXXXX, on stderr and in --json, as they escape C0 ones', async () => {
  for (const [args, escaped] of [
    [['grant-permission', '--principal', 'org-alice', '--identity', 'agent\u007falpha', '--spki', '00', 'docstore'], 'agent\\u007falpha'],
    [['grant-permission', '--principal', 'org-alice', '--identity', 'agent\u0085\u009b31malpha', '--spki', '00', 'docstore'], 'agent\\u0085\\u009b31malpha'],
    [['revoke', 'bogus\u0080\u001b'], "bogus\\u0080\\u001b'"],
  ] as const) {
    const run = await runCli(['--json', ...args], { env });
    assert.ok(run.status === 2 || run.status === 3, describeRun(run));
    for (const text of [run.stderr, run.json.error.message as string, run.stdout]) {
      assert.doesNotMatch(text, /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/, describeRun(run));
    }
    assert.ok(run.json.error.message.includes(escaped), describeRun(run));
    assert.ok(run.stderr.includes(escaped), describeRun(run));
  }
});

test('an identity argument that is not valid UTF-8 (Node reads U+FFFD) is refused (exit 3), nothing signed or written', async () => {
  const before = await permissionRows();
  // The shell passes the byte 0xff as it is, as an operator's terminal would.
  const invalid = await runFile('/bin/bash', ['-c', `exec "$0" "$1" --json grant-permission --principal org-alice --identity $'agent\\xffbeta' --spki 00 docstore`, process.execPath, CLI], { env });
  const replacement = await runCli(['--json', 'register-principal', 'org-\ufffd'], { env });
  for (const run of [invalid, replacement]) {
    assert.equal(run.status, 3, describeRun(run));
    assert.equal(run.json.error.code, 'ERR_REFUSED_FIELD_INVALID', describeRun(run));
    assert.match(run.json.error.message, /contains U\+FFFD: the argument was not valid UTF-8/);
    assert.doesNotMatch(run.stderr, /TPM|PKCS/);
  }
  assert.equal(await permissionRows(), before);
});

test('an empty option value (--principal "" from an unset variable) is a usage error, not a filter dropped: delete-permission revoked every principal\'s rows', async () => {
  const alice = await fixture.principal('org-empty-a');
  const bob = await fixture.principal('org-empty-b');
  const agent = await clientCredentials({ identity: 'agent-empty' });
  for (const principal of [alice, bob]) {
    await fixture.delegate(principal.keyId, 'docstore:443');
    await fixture.permit(principal, { identity: 'agent-empty', spkiDer: agent.spkiDer }, 'docstore:443');
  }
  const before = await permissionRows();
  for (const args of [
    ['delete-permission', '--identity', 'agent-empty', '--principal', ''],
    ['delete-permission', '--identity', 'agent-empty', '--principal='],
    ['list', '--principal', ''],
    ['list', 'permissions', '--identity', ''],
    ['audit', '--identity', ''],
  ]) {
    const run = await runCli(['--json', ...args], { env });
    assert.equal(run.status, 2, describeRun(run));
    assert.equal(run.json.error.code, 'ERR_USAGE', describeRun(run));
    assert.match(run.json.error.message, /^--(?:principal|identity) must not be empty/, describeRun(run));
  }
  assert.equal(await permissionRows(), before);
});

test('grant-permission refuses a window, a destination or a principal the gateway would deny (exit 3) before the TPM is asked, so a TPM that is down does not hide the typo', async () => {
  const carol = await fixture.principal('org-typo-carol');
  await fixture.delegate(carol.keyId, 'docstore:443');
  await fixture.principal('org-typo-revoked');
  await fixture.delegate('org-typo-revoked', 'docstore:443');
  await fixture.db.query(`UPDATE principal_signing_keys SET revoked_at = now() WHERE key_id = 'org-typo-revoked'`);
  const agent = await clientCredentials({ identity: 'agent-typo' });
  const grant = ['--json', 'grant-permission', '--allow-unattested', '--identity', 'agent-typo', '--spki', agent.spkiDer.toString('hex')];
  const before = await permissionRows();
  for (const [args, code] of [
    [['--principal', 'org-typo-carol', '--not-before', '2030-01-01T00:00:00Z', '--not-after', '2029-01-01T00:00:00Z', 'docstore'], 'ERR_REFUSED_VALIDITY'],
    [['--principal', 'org-typo-carol', '--not-after', '2020-01-01T00:00:00Z', 'docstore'], 'ERR_REFUSED_VALIDITY'],
    [['--principal', 'org-typo-carol', 'docstore', 'messaging'], 'ERR_REFUSED_OUT_OF_SCOPE'],
    [['--principal', 'org-typo-revoked', 'docstore'], 'ERR_REFUSED_PRINCIPAL_INACTIVE'],
  ] as const) {
    const run = await runCli([...grant, ...args], { env });
    assert.equal(run.status, 3, describeRun(run));
    assert.equal(run.json.error.code, code, describeRun(run));
    assert.doesNotMatch(run.stderr, /TPM|PKCS/, describeRun(run));
  }
  assert.equal(await permissionRows(), before);
});

test('rotate-key refuses a rotation with nothing to rotate, or out of the principal\'s scope, (exit 3) before the TPM is asked', async () => {
  const dave = await fixture.principal('org-typo-dave');
  await fixture.delegate(dave.keyId, 'docstore:443');
  const old = await clientCredentials({ identity: 'agent-rot' });
  const next = await clientCredentials({ identity: 'agent-rot' });
  await fixture.permit(dave, { identity: 'agent-rot', spkiDer: old.spkiDer }, 'docstore:443');
  const fromCert = join(scratch, 'rot-old.pem');
  const toCert = join(scratch, 'rot-new.pem');
  writeFileSync(fromCert, old.certPem);
  writeFileSync(toCert, next.certPem);
  const rotate = (identity: string) => runCli(['--json', 'rotate-key', '--allow-unattested', '--principal', 'org-typo-dave', '--identity', identity, '--from-cert', fromCert, '--to-cert', toCert], { env });
  const before = await permissionRows();
  const typo = await rotate('agent-rto');
  assert.equal(typo.status, 3, describeRun(typo));
  assert.equal(typo.json.error.code, 'ERR_REFUSED_IDENTITY_MISMATCH', describeRun(typo));
  await fixture.db.query(`UPDATE principal_key_permissions SET revoked_at = now() WHERE signing_key_id = 'org-typo-dave'`);
  const outOfScope = await rotate('agent-rot');
  assert.equal(outOfScope.status, 3, describeRun(outOfScope));
  assert.equal(outOfScope.json.error.code, 'ERR_REFUSED_OUT_OF_SCOPE', describeRun(outOfScope));
  assert.doesNotMatch(outOfScope.stderr, /error: .*(?:TPM|PKCS)/, describeRun(outOfScope));
  await fixture.db.query(`UPDATE permission_registry SET revoked_at = now() WHERE signing_key_id = 'org-typo-dave'`);
  const nothing = await rotate('agent-rot');
  assert.equal(nothing.status, 3, describeRun(nothing));
  assert.equal(nothing.json.error.code, 'ERR_REFUSED_NOTHING_TO_ROTATE', describeRun(nothing));
  assert.doesNotMatch(nothing.stderr, /error: .*(?:TPM|PKCS)/, describeRun(nothing));
  assert.equal(await permissionRows(), before.replace(/\/\d+$/, (m) => `/${Number(m.slice(1)) + 1}`));
});
