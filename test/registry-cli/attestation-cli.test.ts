import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { findPrincipalKey } from '../../registry/store.js';
import { openToken } from '../../tpm/token.js';
import { newP256Key } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { RegistryFixture } from '../helpers/registry-fixture.js';
import { QUIET_TPM_LOG_ENV, createPtoolKey, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';
import { describeRun, runCli, runInProcess, type CliRun } from './run-cli.js';

/**
 * Enrolment with TPM attestation through the registry CLI: a principal and an agent key proven
 * TPM-resident against the configured EK CA, the policy that refuses unattested keys, and
 * refusals that write nothing. Real swtpm (manufactured with EK certificates), real PostgreSQL.
 */

const USER_PIN = 'attest-cli-user-pin-4711';
const SO_PIN = 'attest-cli-so-pin-0815';
const SIDECAR_TOKEN = 'agent-gateway-sidecar';

let tpm: SwtpmInstance;
let foreignTpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let fixture: RegistryFixture;
let scratch: string;
let caPath: string;
let env: NodeJS.ProcessEnv;
let agentSpki: Buffer;

const inProcess = (args: readonly string[], extra: NodeJS.ProcessEnv = {}) => runInProcess(args, { env: { ...env, ...extra } });

function expectExit(run: CliRun, status: number, code?: string): void {
  assert.equal(run.status, status, describeRun(run));
  if (code) assert.equal(run.json.error?.code, code, describeRun(run));
}

async function count(table: string): Promise<number> {
  return Number((await fixture.db.query(`SELECT count(*) AS n FROM ${table}`)).rows[0].n);
}

before(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'agw-attest-cli-'));
  [tpm, foreignTpm] = await Promise.all([startSwtpm({ ekCaDir: join(scratch, 'ca') }), startSwtpm({ ekCaDir: join(scratch, 'foreign-ca') })]);
  caPath = join(scratch, 'ca', 'ca.pem');
  Object.assign(process.env, tpm.env, QUIET_TPM_LOG_ENV);
  // The agent's key, made the way the sidecar makes it (PKCS#11 in its own token).
  const token = openToken({ tokenLabel: SIDECAR_TOKEN, userPin: USER_PIN, soPin: SO_PIN, createIfMissing: true });
  try {
    agentSpki = token.generateP256Key('agent-tls').publicKeySpkiDer;
  } finally {
    token.close();
  }
  await createPtoolKey(foreignTpm, { token: SIDECAR_TOKEN, key: 'agent-tls', userPin: USER_PIN, soPin: SO_PIN });
  pgServer = await testServer();
  const databaseUrl = await createDatabase(pgServer.url);
  fixture = await RegistryFixture.connect(databaseUrl);
  env = { ...process.env, ...tpm.env, ...QUIET_TPM_LOG_ENV, AGENT_GATEWAY_DATABASE_URL: databaseUrl, AGENT_GATEWAY_TPM_USER_PIN: USER_PIN, AGENT_GATEWAY_TPM_SO_PIN: SO_PIN };
  for (const name of ['AGENT_GATEWAY_TPM_TOKEN', 'AGENT_GATEWAY_PRINCIPAL_KEY_ID', 'AGENT_GATEWAY_EK_CA_FILE', 'AGENT_GATEWAY_SIDECAR_TPM_TOKEN', 'AGENT_GATEWAY_SIDECAR_TPM_KEY']) delete env[name];
});

after(async () => {
  await fixture?.close();
  pgServer?.close();
  await Promise.all([tpm?.stop(), foreignTpm?.stop()]);
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('enrolment with TPM attestation (registry CLI)', { concurrency: false }, () => {
  test('register-principal without an EK CA or --allow-unattested is refused before the TPM or the registry is touched', async () => {
    const run = await inProcess(['--json', 'register-principal', 'org-alice']);
    expectExit(run, 3, 'ERR_REFUSED_UNATTESTED');
    assert.match(run.stderr, /hint: enrol the key with TPM evidence first/);
    assert.equal(await findPrincipalKey(fixture.db, 'org-alice'), undefined);
    assert.equal(await count('key_attestations'), 0);
  });

  test('register-principal --ek-ca: the principal key is attested and the evidence stored with it', async () => {
    // Baseline in the same run: the same command for another key, without attestation.
    let started = performance.now();
    const plain = await inProcess(['--json', 'register-principal', 'org-plain', '--allow-unattested']);
    const plainMs = performance.now() - started;
    expectExit(plain, 0);
    assert.equal(plain.json.attestation.verified, false);
    assert.match(plain.stderr, /registered without TPM attestation/);
    started = performance.now();
    const run = await inProcess(['--json', 'register-principal', 'org-alice', '--ek-ca', caPath]);
    const attestedMs = performance.now() - started;
    expectExit(run, 0);
    assert.equal(run.json.attestation.verified, true);
    assert.match(run.json.attestation.ek_fingerprint, /^[0-9a-f]{64}$/);
    console.log(`# register-principal: ${Math.round(attestedMs)} ms with attestation (of which ${run.json.attestation_ms} ms attesting), ${Math.round(plainMs)} ms without`);
    const { rows } = await fixture.db.query('SELECT verified, ek_certificate_sha256, evidence, verification FROM key_attestations WHERE public_key_spki_der = $1', [Buffer.from(run.json.public_key_spki_der, 'hex')]);
    assert.equal(rows.length, 1);
    assert.equal(rows[0].verified, true);
    assert.equal(rows[0].ek_certificate_sha256, run.json.attestation.ek_fingerprint);
    assert.equal(rows[0].evidence.format, 'agent-gateway-tpm-attestation-v1');
    assert.deepEqual(Object.keys(rows[0].evidence).sort(), ['activation_proof_sha256', 'ak_public', 'certify_info', 'certify_signature', 'credential', 'ek_certificate', 'format', 'key_public']);
    assert.ok(rows[0].verification.keyAttributes.includes('fixedTPM'));
    const listed = await inProcess(['--json', 'list', 'principals']);
    assert.deepEqual(listed.json.principals.map((p: { key_id: string; attestation: { verified: boolean } }) => [p.key_id, p.attestation.verified]), [['org-alice', true], ['org-plain', false]]);
    const human = await inProcess(['list', 'principals']);
    assert.match(human.stdout, /ATTESTED[\s\S]*org-alice.*yes \d{4}-\d\d-\d\dT.* ek:[0-9a-f]{16}/);
    assert.match(human.stdout, /org-plain .* no$/m);
    expectExit(await inProcess(['grant-scope', 'org-alice', 'docstore']), 0);
  });

  test('grant-permission refuses an agent key without attestation, writes nothing; --allow-unattested grants it', async () => {
    const software = newP256Key().spkiDer.toString('hex');
    const base = ['--json', 'grant-permission', '--principal', 'org-alice', '--identity', 'agent-soft', '--spki', software, 'docstore'];
    const refused = await inProcess(base);
    expectExit(refused, 3, 'ERR_REFUSED_UNATTESTED');
    assert.match(refused.json.error.message, /has no verified TPM attestation: enrol it first/);
    assert.equal(await count('permission_registry'), 0);
    const allowed = await inProcess([...base, '--allow-unattested']);
    expectExit(allowed, 0);
    assert.equal(allowed.json.subject_attested, false);
    assert.match(allowed.stderr, /not TPM-attested; granting anyway/);
  });

  test('enrol-agent-key proves the sidecar\'s key lives in its TPM; then grant, list and explain show it', async () => {
    const run = await inProcess(['--json', 'enrol-agent-key', '--spki', agentSpki.toString('hex'), '--ek-ca', caPath]);
    expectExit(run, 0);
    assert.equal(run.json.attestation.verified, true);
    assert.equal(run.json.public_key_spki_der, agentSpki.toString('hex'));
    console.log(`# agent enrolment with attestation: ${run.json.attestation_ms} ms`);
    const grant = await inProcess(['--json', 'grant-permission', '--principal', 'org-alice', '--identity', 'agent-alpha', '--spki', agentSpki.toString('hex'), 'docstore']);
    expectExit(grant, 0);
    assert.equal(grant.json.subject_attested, true);
    const listed = await inProcess(['--json', 'list', 'permissions', '--identity', 'agent-alpha']);
    assert.equal(listed.json.permissions[0].subject_attestation.verified, true);
    assert.equal(listed.json.permissions[0].subject_attestation.ek_fingerprint, run.json.attestation.ek_fingerprint);
    const explained = await inProcess(['--json', 'explain', 'agent-alpha', 'docstore', '--spki', agentSpki.toString('hex')]);
    expectExit(explained, 0);
    assert.equal(explained.json.subject_attestation.verified, true);
    const human = await inProcess(['explain', 'agent-alpha', 'docstore', '--spki', agentSpki.toString('hex')]);
    assert.match(human.stdout, /agent key attestation: TPM-attested \(EK [0-9a-f]{16}…, verified /);
  });

  test('enrol-agent-key refuses a key other than the one given, and writes nothing', async () => {
    const before = await count('key_attestations');
    const run = await inProcess(['--json', 'enrol-agent-key', '--spki', newP256Key().spkiDer.toString('hex'), '--ek-ca', caPath]);
    expectExit(run, 3, 'ERR_REFUSED_ATTESTATION_KEY_MISMATCH');
    assert.equal(await count('key_attestations'), before);
  });

  test('an EK certificate from another CA (a second swtpm) is refused and writes nothing', async () => {
    const before = await count('key_attestations');
    const run = await runCli(['--json', 'enrol-agent-key', '--ek-ca', caPath], { env: { ...env, ...foreignTpm.env } });
    expectExit(run, 3, 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED');
    assert.match(run.stderr, /not signed by any configured EK CA/);
    assert.match(run.stderr, /hint: the TPM's EK certificate must be issued by a CA in --ek-ca/);
    assert.ok(!`${run.stdout}${run.stderr}`.includes(USER_PIN), 'the PIN never shows');
    assert.equal(await count('key_attestations'), before);
    // Without any CA there is nothing to check against: refused up front.
    expectExit(await inProcess(['--json', 'enrol-agent-key']), 3, 'ERR_REFUSED_UNATTESTED');
  });

  describe('split across machines: attest collect → challenge → activate → enrol-agent-key --proof', { concurrency: false }, () => {
    const file = (name: string) => join(scratch, name);
    // The TPM side has no database; the registry side has no TPM.
    const tpmSide = (args: readonly string[], which = tpm) => inProcess(args, { ...which.env, AGENT_GATEWAY_DATABASE_URL: '' });
    const registrySide = (args: readonly string[]) => inProcess(args, { TPM2_PKCS11_TCTI: '', TPM2TOOLS_TCTI: '', TPM2_PKCS11_STORE: '' });
    const challengeRows = async () => Number((await fixture.db.query('SELECT count(*) AS n FROM attestation_challenges')).rows[0].n);

    test('attest collect refuses a state directory other users can read, and leaves nothing in it', async () => {
      mkdirSync(file('open-state'), { mode: 0o755 });
      const refused = await tpmSide(['--json', 'attest', 'collect', '--out', file('open-evidence.json'), '--state-dir', file('open-state')]);
      expectExit(refused, 2, 'ERR_USAGE');
      assert.match(refused.json.error.message, /open to other users \(mode 0755\)/);
      assert.throws(() => statSync(file('open-evidence.json')), /ENOENT/);
    });

    test('the four steps enrol the key; the proof is private; replaying it is refused and writes nothing', async () => {
      expectExit(await tpmSide(['--json', 'attest', 'collect', '--out', file('evidence.json'), '--state-dir', file('attest-state')]), 0);
      const challenge = await registrySide(['--json', 'attest', 'challenge', '--evidence', file('evidence.json'), '--out', file('challenge.json'), '--ek-ca', caPath, '--spki', agentSpki.toString('hex')]);
      expectExit(challenge, 0);
      assert.match(challenge.json.challenge_id, /^chal-/);
      expectExit(await tpmSide(['--json', 'attest', 'activate', '--challenge', file('challenge.json'), '--state-dir', file('attest-state'), '--out', file('proof.json')]), 0);
      assert.equal(statSync(file('proof.json')).mode & 0o777, 0o600);
      const enrolled = await registrySide(['--json', 'enrol-agent-key', '--proof', file('proof.json'), '--ek-ca', caPath]);
      expectExit(enrolled, 0);
      assert.equal(enrolled.json.attestation.verified, true);
      assert.equal(enrolled.json.public_key_spki_der, agentSpki.toString('hex'));
      const before = await fixture.db.query('SELECT verified_at::text FROM key_attestations WHERE public_key_spki_der = $1', [agentSpki]);
      const replay = await registrySide(['--json', 'enrol-agent-key', '--proof', file('proof.json'), '--ek-ca', caPath]);
      expectExit(replay, 3, 'ERR_REFUSED_ATTESTATION_ACTIVATION');
      assert.match(replay.json.error.message, /answered already/);
      assert.deepEqual((await fixture.db.query('SELECT verified_at::text FROM key_attestations WHERE public_key_spki_der = $1', [agentSpki])).rows, before.rows);
    });

    test('a proof that is not the secret, or for an expired or unknown challenge, is refused and consumes nothing', async () => {
      expectExit(await registrySide(['--json', 'attest', 'challenge', '--evidence', file('evidence.json'), '--out', file('challenge2.json'), '--ek-ca', caPath]), 0);
      const proof = JSON.parse(readFileSync(file('proof.json'), 'utf8'));
      const challengeId = JSON.parse(readFileSync(file('challenge2.json'), 'utf8')).challenge_id;
      // The old secret presented for the new challenge: the credential activation never happened.
      writeFileSync(file('wrong-proof.json'), JSON.stringify({ ...proof, challenge_id: challengeId }));
      expectExit(await registrySide(['--json', 'enrol-agent-key', '--proof', file('wrong-proof.json'), '--ek-ca', caPath]), 3, 'ERR_REFUSED_ATTESTATION_ACTIVATION');
      assert.equal((await fixture.db.query('SELECT used_at FROM attestation_challenges WHERE challenge_id = $1', [challengeId])).rows[0].used_at, null);
      writeFileSync(file('unknown-proof.json'), JSON.stringify({ ...proof, challenge_id: 'chal-00000000-0000-4000-8000-000000000000' }));
      expectExit(await registrySide(['--json', 'enrol-agent-key', '--proof', file('unknown-proof.json'), '--ek-ca', caPath]), 3, 'ERR_REFUSED_ATTESTATION_ACTIVATION');
      expectExit(await tpmSide(['--json', 'attest', 'activate', '--challenge', file('challenge2.json'), '--state-dir', file('attest-state'), '--out', file('proof2.json')]), 0);
      await fixture.db.query(`UPDATE attestation_challenges SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 hour' WHERE challenge_id = $1`, [challengeId]);
      const expired = await registrySide(['--json', 'enrol-agent-key', '--proof', file('proof2.json'), '--ek-ca', caPath]);
      expectExit(expired, 3, 'ERR_REFUSED_ATTESTATION_ACTIVATION');
      assert.match(expired.json.error.message, /has expired/);
    });

    test('a new challenge purges those expired for over a day, and only those', async () => {
      const stale = JSON.parse(readFileSync(file('challenge2.json'), 'utf8')).challenge_id;
      const recent = JSON.parse(readFileSync(file('challenge.json'), 'utf8')).challenge_id;
      await fixture.db.query(`UPDATE attestation_challenges SET created_at = now() - interval '3 days', expires_at = now() - interval '2 days' WHERE challenge_id = $1`, [stale]);
      await fixture.db.query(`UPDATE attestation_challenges SET created_at = now() - interval '3 hours', expires_at = now() - interval '2 hours' WHERE challenge_id = $1`, [recent]);
      const made = await registrySide(['--json', 'attest', 'challenge', '--evidence', file('evidence.json'), '--out', file('challenge3.json'), '--ek-ca', caPath]);
      expectExit(made, 0);
      const ids = (await fixture.db.query('SELECT challenge_id FROM attestation_challenges')).rows.map((row: { challenge_id: string }) => row.challenge_id);
      assert.ok(!ids.includes(stale), 'expired two days ago: purged');
      assert.ok(ids.includes(recent), 'expired two hours ago: kept');
      assert.ok(ids.includes(made.json.challenge_id), 'the new challenge');
    });

    test('one proof sent twice at once enrols once: the other is refused as answered already; an existing proof file is made private', async () => {
      expectExit(await registrySide(['--json', 'attest', 'challenge', '--evidence', file('evidence.json'), '--out', file('race-challenge.json'), '--ek-ca', caPath]), 0);
      // A proof file left readable by others is made private before the secret goes in.
      writeFileSync(file('race-proof.json'), '', { mode: 0o644 });
      expectExit(await tpmSide(['--json', 'attest', 'activate', '--challenge', file('race-challenge.json'), '--state-dir', file('attest-state'), '--out', file('race-proof.json')]), 0);
      assert.equal(statSync(file('race-proof.json')).mode & 0o777, 0o600);
      const runs = await Promise.all([0, 1].map(() => registrySide(['--json', 'enrol-agent-key', '--proof', file('race-proof.json'), '--ek-ca', caPath])));
      assert.deepEqual(runs.map((run) => run.status).sort(), [0, 3], runs.map(describeRun).join('\n'));
      const refused = runs.find((run) => run.status === 3)!;
      assert.equal(refused.json.error.code, 'ERR_REFUSED_ATTESTATION_ACTIVATION');
      assert.match(refused.json.error.message, /answered already/);
    });

    test('an oversized or endless evidence, challenge or proof file is refused unread (exit 3); nothing is stored', async () => {
      const before = await challengeRows();
      const attestations = await count('key_attestations');
      // Valid evidence, padded: every field the verifier reads is bounded, the file was not.
      const evidence = JSON.parse(readFileSync(file('evidence.json'), 'utf8'));
      writeFileSync(file('padded-evidence.json'), JSON.stringify({ ...evidence, padding: 'A'.repeat(1 << 20) }));
      const proof = JSON.parse(readFileSync(file('proof.json'), 'utf8'));
      writeFileSync(file('padded-proof.json'), JSON.stringify({ ...proof, padding: 'A'.repeat(1 << 20) }));
      const challenge = JSON.parse(readFileSync(file('challenge.json'), 'utf8'));
      writeFileSync(file('padded-challenge.json'), JSON.stringify({ ...challenge, padding: 'A'.repeat(1 << 20) }));
      const started = performance.now();
      for (const [name, run] of [
        ['padded evidence', () => registrySide(['--json', 'attest', 'challenge', '--evidence', file('padded-evidence.json'), '--out', file('c.json'), '--ek-ca', caPath])],
        ['padded proof', () => registrySide(['--json', 'enrol-agent-key', '--proof', file('padded-proof.json'), '--ek-ca', caPath])],
        ['padded challenge', () => tpmSide(['--json', 'attest', 'activate', '--challenge', file('padded-challenge.json'), '--state-dir', file('attest-state'), '--out', file('p.json')])],
        ['endless evidence', () => registrySide(['--json', 'attest', 'challenge', '--evidence', '/dev/zero', '--out', file('c.json'), '--ek-ca', caPath])],
        ['endless proof', () => registrySide(['--json', 'enrol-agent-key', '--proof', '/dev/zero', '--ek-ca', caPath])],
        ['endless challenge', () => tpmSide(['--json', 'attest', 'activate', '--challenge', '/dev/zero', '--state-dir', file('attest-state'), '--out', file('p.json')])],
      ] as const) {
        const refused = await run();
        expectExit(refused, 3, 'ERR_REFUSED_ATTESTATION_MALFORMED');
        assert.match(refused.json.error.message, /is larger than 65536 bytes/, name);
      }
      assert.ok(performance.now() - started < 10_000, 'refused without reading the files through');
      assert.throws(() => statSync(file('c.json')), /ENOENT/);
      assert.throws(() => statSync(file('p.json')), /ENOENT/);
      assert.equal(await challengeRows(), before);
      assert.equal(await count('key_attestations'), attestations);
    });

    test('unknown fields in the evidence are ignored and not kept; a challenge whose --out cannot be written is not stored', async () => {
      const evidence = JSON.parse(readFileSync(file('evidence.json'), 'utf8'));
      writeFileSync(file('extra-evidence.json'), JSON.stringify({ ...evidence, note: 'x'.repeat(100), credential: 'AAAA' }));
      const made = await registrySide(['--json', 'attest', 'challenge', '--evidence', file('extra-evidence.json'), '--out', file('extra-challenge.json'), '--ek-ca', caPath]);
      expectExit(made, 0);
      const stored = (await fixture.db.query('SELECT evidence FROM attestation_challenges WHERE challenge_id = $1', [made.json.challenge_id])).rows[0].evidence;
      assert.deepEqual(Object.keys(stored).sort(), ['ak_public', 'certify_info', 'certify_signature', 'credential', 'ek_certificate', 'format', 'key_public']);
      assert.notEqual(stored.credential, 'AAAA', 'the credential is the one made here');
      const before = await challengeRows();
      const unwritable = await registrySide(['--json', 'attest', 'challenge', '--evidence', file('evidence.json'), '--out', file('no-such-dir/challenge.json'), '--ek-ca', caPath]);
      expectExit(unwritable, 2, 'ERR_USAGE');
      assert.equal(await challengeRows(), before);
    });

    test('a challenge is refused for evidence from an untrusted EK, altered evidence, or another key; no challenge is stored', async () => {
      const before = await challengeRows();
      expectExit(await tpmSide(['--json', 'attest', 'collect', '--out', file('foreign-evidence.json'), '--state-dir', file('foreign-state')], foreignTpm), 0);
      expectExit(await registrySide(['--json', 'attest', 'challenge', '--evidence', file('foreign-evidence.json'), '--out', file('c.json'), '--ek-ca', caPath]), 3, 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED');
      const evidence = JSON.parse(readFileSync(file('evidence.json'), 'utf8'));
      const signature = Buffer.from(evidence.certify_signature, 'base64');
      signature[10] = signature[10]! ^ 0x01;
      writeFileSync(file('altered.json'), JSON.stringify({ ...evidence, certify_signature: signature.toString('base64') }));
      expectExit(await registrySide(['--json', 'attest', 'challenge', '--evidence', file('altered.json'), '--out', file('c.json'), '--ek-ca', caPath]), 3, 'ERR_REFUSED_ATTESTATION_SIGNATURE');
      writeFileSync(file('garbage.json'), JSON.stringify({ ...evidence, ak_public: 'not base64!' }));
      expectExit(await registrySide(['--json', 'attest', 'challenge', '--evidence', file('garbage.json'), '--out', file('c.json'), '--ek-ca', caPath]), 3, 'ERR_REFUSED_ATTESTATION_MALFORMED');
      expectExit(await registrySide(['--json', 'attest', 'challenge', '--evidence', file('evidence.json'), '--out', file('c.json'), '--ek-ca', caPath, '--spki', newP256Key().spkiDer.toString('hex')]), 3, 'ERR_REFUSED_ATTESTATION_KEY_MISMATCH');
      assert.equal(await challengeRows(), before);
    });
  });
});
