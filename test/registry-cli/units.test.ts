import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { InvalidDestinationError, InvalidPermissionFieldError, SchemaVersionError } from '../../registry/errors.js';
import type { DelegationRow, PrincipalKeyRow } from '../../registry/store.js';
import type { CanonicalTimestamp } from '../../registry/timestamp.js';
import { TpmError } from '../../tpm/errors.js';
import { checkTextField, checkValidityWindow, durationOption, normaliseDestinations, timestampOption } from '../../registry-cli/src/arguments.js';
import { runCli } from '../../registry-cli/src/cli.js';
import { delegationAction } from '../../registry-cli/src/commands/grant-scope.js';
import { checkCertificateIdentity, checkSigningAuthority } from '../../registry-cli/src/commands/grant-permission.js';
import { redactUrl } from '../../core/redact-url.js';
import { databaseTarget, readPins, redactUrlPasswords } from '../../registry-cli/src/environment.js';
import { DatabaseError, EXIT, exitCodeFor, MigrationError, RefusedError, UsageError } from '../../registry-cli/src/errors.js';
import { errorText, Output } from '../../registry-cli/src/output.js';
import { checkIdentity, readSubjectKey } from '../../registry-cli/src/subject-key.js';
import { clientCredentials, newP256Key, TEST_OID } from '../helpers/pki.js';

const scratch = mkdtempSync(join(tmpdir(), 'agw-cli-units-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

const ts = (text: string) => text as CanonicalTimestamp;
const NOW = ts('2026-05-01T00:00:00.000000Z');

function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    if (error instanceof RefusedError || error instanceof UsageError) return error.code;
    throw error;
  }
  return 'no error';
}

describe('exit codes: one mapping for every error', () => {
  const cases: [unknown, number][] = [
    [new UsageError('x'), EXIT.usage],
    [new InvalidDestinationError('x'), EXIT.usage],
    [new TpmError('ERR_TPM_INVALID_ARGUMENT', 'x'), EXIT.usage],
    [new RefusedError('ERR_REFUSED_OUT_OF_SCOPE', 'x'), EXIT.refused],
    [new InvalidPermissionFieldError('x'), EXIT.refused],
    [new SchemaVersionError('x'), EXIT.schema],
    [new MigrationError('ERR_MIGRATION_CHECKSUM', 'x'), EXIT.schema],
    [new MigrationError('ERR_MIGRATION_FAILED', 'x'), EXIT.runtime],
    [new TpmError('ERR_TPM_PIN_INCORRECT', 'x'), EXIT.runtime],
    [new DatabaseError('x'), EXIT.runtime],
    [new Error('a bug'), EXIT.runtime],
  ];
  for (const [error, code] of cases) {
    test(`${(error as Error).constructor.name} ${(error as { code?: string }).code ?? ''} → ${code}`, () => assert.equal(exitCodeFor(error), code));
  }
});

describe('arguments', () => {
  test('durations: units w d h m s, largest first, combined; bare numbers, zero and over 100 years refused', () => {
    const HOUR = 3_600_000;
    assert.equal(durationOption('--x', '30d'), 30 * 24 * HOUR);
    assert.equal(durationOption('--x', '1d12h'), 36 * HOUR);
    assert.equal(durationOption('--x', '2w'), 14 * 24 * HOUR);
    assert.equal(durationOption('--x', '90m'), 1.5 * HOUR);
    assert.equal(durationOption('--x', '1h30m15s'), 1.5 * HOUR + 15_000);
    assert.equal(durationOption('--x', undefined), undefined);
    for (const bad of ['30', '', 'd', '12h1d', '1.5h', '-1d', '0d', '1y', '1d 2h', '36501d']) {
      assert.throws(() => durationOption('--expiring-within', bad), (error: Error) => error instanceof UsageError && error.message.startsWith('--expiring-within'), bad);
    }
  });

  test('destinations are normalised and de-duplicated; a malformed one is a usage error', () => {
    assert.deepEqual(normaliseDestinations(['DocStore', 'docstore:443', '[0:0::1]:8443']), ['docstore:443', '[::1]:8443']);
    assert.throws(() => normaliseDestinations(['bad_host']), InvalidDestinationError);
    assert.equal(exitCodeFor(new InvalidDestinationError('x')), EXIT.usage);
    assert.equal(refusal(() => normaliseDestinations([], { required: true })), 'ERR_USAGE');
  });

  test('timestamps: any RFC 3339 offset becomes canonical UTC; garbage is a usage error', () => {
    assert.equal(timestampOption('--not-after', '2026-05-01T02:00:00+02:00'), '2026-05-01T00:00:00.000000Z');
    assert.equal(timestampOption('--not-after', undefined), undefined);
    assert.equal(refusal(() => timestampOption('--not-after', 'tomorrow')), 'ERR_USAGE');
  });

  test('validity windows the gateway could never treat as active are refused', () => {
    assert.equal(refusal(() => checkValidityWindow({ notBefore: NOW, notAfter: NOW }, NOW, 'x')), 'ERR_REFUSED_VALIDITY');
    assert.equal(refusal(() => checkValidityWindow({ notBefore: ts('2026-01-01T00:00:00.000000Z'), notAfter: ts('2026-04-01T00:00:00.000000Z') }, NOW, 'x')), 'ERR_REFUSED_VALIDITY');
    assert.equal(refusal(() => checkValidityWindow({ notBefore: NOW, notAfter: undefined }, NOW, 'x')), 'no error');
    assert.equal(refusal(() => checkValidityWindow({ notBefore: ts('2027-01-01T00:00:00.000000Z'), notAfter: ts('2027-02-01T00:00:00.000000Z') }, NOW, 'x')), 'no error');
  });

  test('text fields: control characters (C0, DEL, C1) and over-long identities are refused', () => {
    for (const bad of ['a\nb', 'a\u0000', 'a\u007f', 'a\u0085', 'a\ufffdb', 'a\ud800']) assert.equal(refusal(() => checkTextField('identity', bad)), 'ERR_REFUSED_FIELD_INVALID');
    assert.equal(refusal(() => checkIdentity('é'.repeat(128))), 'ERR_REFUSED_FIELD_INVALID'); // 256 bytes
    assert.equal(checkIdentity('agent-ü'), 'agent-ü');
    assert.equal(refusal(() => checkTextField('identity', '')), 'ERR_USAGE');
  });
});

describe('environment and output', () => {
  test('database URL: --database-url-env, then AGENT_GATEWAY_DATABASE_URL, then DATABASE_URL', () => {
    const env = { AGENT_GATEWAY_DATABASE_URL: 'postgres://a@h/a', DATABASE_URL: 'postgres://b@h/b', OTHER: 'postgresql://c@h/c' };
    assert.equal(databaseTarget(env).url, 'postgres://a@h/a');
    assert.equal(databaseTarget({ DATABASE_URL: env.DATABASE_URL }).variable, 'DATABASE_URL');
    assert.equal(databaseTarget(env, 'OTHER').url, 'postgresql://c@h/c');
    assert.equal(refusal(() => databaseTarget({ DATABASE_URL: 'mysql://x@h/x' })), 'ERR_USAGE');
    assert.equal(refusal(() => databaseTarget(env, 'NOT_SET')), 'ERR_USAGE');
    assert.equal(redactUrl('postgres://admin:s3cret@db:5432/registry?sslmode=require'), 'postgres://admin:redacted@db:5432/registry?sslmode=require');
  });

  test('PINs: files win over the environment, one trailing newline is dropped, none is an error', () => {
    const file = join(scratch, 'pin');
    writeFileSync(file, '1234-from-file\n');
    assert.deepEqual(readPins({ AGENT_GATEWAY_TPM_USER_PIN: 'env-pin', AGENT_GATEWAY_TPM_SO_PIN: 'so' }, { userPinFile: file }), { userPin: '1234-from-file', soPin: 'so' });
    assert.deepEqual(readPins({ AGENT_GATEWAY_TPM_USER_PIN: 'env-pin' }, {}), { userPin: 'env-pin', soPin: undefined });
    assert.equal(refusal(() => readPins({}, {})), 'ERR_USAGE');
    assert.equal(refusal(() => readPins({}, { userPinFile: join(scratch, 'missing') })), 'ERR_USAGE');
  });

  test('results are printed as they are; URL passwords are redacted from warnings and errors only', () => {
    let stdout = '';
    let stderr = '';
    const output = new Output({ env: {}, stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) } }, false);
    output.result('x', {}, ['postgres://admin:s3cret@db/registry password=1234']);
    assert.equal(stdout, 'postgres://admin:s3cret@db/registry password=1234\n');
    output.warn('postgres://admin:s3cret@db/registry in a warning');
    output.failure(new Error('connecting to postgresql://admin:p@ss:w0rd@db:5432/registry?sslmode=require failed; host=db password=s3cret sslpassword=k3y'));
    assert.ok(!stderr.includes('s3cret') && !stderr.includes('w0rd') && !stderr.includes('k3y'), stderr);
    assert.match(stderr, /postgres:\/\/admin:redacted@db\/registry in a warning/);
    assert.match(stderr, /postgresql:\/\/admin:redacted@db:5432\/registry\?sslmode=require failed; host=db password=redacted sslpassword=redacted/);
    assert.equal(redactUrlPasswords('postgres://admin@db/x, postgres://db:5432/x, https://example.com/a:b@c'), 'postgres://admin@db/x, postgres://db:5432/x, https://example.com/a:b@c');
  });

  test('warning and error text: C0 (but newline and tab), DEL and C1 controls are written as \\uXXXX', () => {
    assert.equal(errorText('a\u007fb\u0080c\u0085d\u009fe\u001bf\rg'), 'a\\u007fb\\u0080c\\u0085d\\u009fe\\u001bf\\u000dg');
    assert.equal(errorText('line one\n\tline two \u00a0\u2028é'), 'line one\n\tline two \u00a0\u2028é');
  });
});

describe('decisions before writing', () => {
  const delegation = (state: DelegationRow['state'], destination = 'docstore:443'): DelegationRow => ({ signingKeyId: 'k', destination, notBefore: NOW, notAfter: null, revokedAt: null, state });
  const principal = (state: PrincipalKeyRow['state'], spki: Buffer): PrincipalKeyRow => ({ keyId: 'k', algorithm: 'ecdsa-p256-sha256', publicKeySpkiDer: spki, notBefore: NOW, notAfter: null, revokedAt: null, createdAt: NOW, state });

  test('re-granting a scope: active and no window → unchanged; inactive → reactivated; a window → updated', () => {
    assert.equal(delegationAction(undefined, false), 'created');
    assert.equal(delegationAction(delegation('active'), false), 'unchanged');
    assert.equal(delegationAction(delegation('revoked'), false), 'reactivated');
    assert.equal(delegationAction(delegation('expired'), true), 'reactivated');
    assert.equal(delegationAction(delegation('active'), true), 'updated');
  });

  test('signing authority: unknown, inactive, mismatched key, out of scope', () => {
    const spki = newP256Key().spkiDer;
    const active = [delegation('active')];
    assert.equal(refusal(() => checkSigningAuthority('k', undefined, spki, ['docstore:443'], active)), 'ERR_REFUSED_PRINCIPAL_UNKNOWN');
    for (const state of ['revoked', 'expired', 'not-yet-valid'] as const) {
      assert.equal(refusal(() => checkSigningAuthority('k', principal(state, spki), spki, ['docstore:443'], active)), 'ERR_REFUSED_PRINCIPAL_INACTIVE');
    }
    assert.equal(refusal(() => checkSigningAuthority('k', principal('active', newP256Key().spkiDer), spki, ['docstore:443'], active)), 'ERR_REFUSED_PRINCIPAL_KEY_MISMATCH');
    assert.equal(refusal(() => checkSigningAuthority('k', principal('active', spki), spki, ['docstore:443', 'messaging:443'], active)), 'ERR_REFUSED_OUT_OF_SCOPE');
    assert.equal(refusal(() => checkSigningAuthority('k', principal('active', spki), spki, ['docstore:443'], [delegation('revoked')])), 'ERR_REFUSED_OUT_OF_SCOPE');
    assert.equal(checkSigningAuthority('k', principal('active', spki), spki, ['docstore:443'], active).keyId, 'k');
  });

  test('subject keys: --cert takes the exact SPKI and reads the identity as the gateway does', async () => {
    const agent = await clientCredentials({ identity: 'agent-alpha' });
    const certPath = join(scratch, 'agent.pem');
    const keyPath = join(scratch, 'agent.pub.pem');
    writeFileSync(certPath, agent.certPem);
    writeFileSync(keyPath, agent.publicKeyPem);
    const fromCert = readSubjectKey({ cert: certPath }, TEST_OID)!;
    assert.deepEqual(fromCert.spkiDer, agent.spkiDer);
    assert.deepEqual(fromCert.certificate, { status: 'valid', identity: 'agent-alpha' });
    assert.deepEqual(readSubjectKey({ publicKey: keyPath }, TEST_OID)!.spkiDer, agent.spkiDer);
    assert.deepEqual(readSubjectKey({ spki: agent.spkiDer.toString('hex').toUpperCase() }, TEST_OID)!.spkiDer, agent.spkiDer);
    assert.equal(readSubjectKey({}, TEST_OID, { optional: true }), undefined);
    assert.equal(refusal(() => readSubjectKey({ cert: certPath, spki: '00' }, TEST_OID)), 'ERR_USAGE');
    assert.equal(refusal(() => readSubjectKey({ spki: 'zz' }, TEST_OID)), 'ERR_USAGE');
    assert.equal(refusal(() => readSubjectKey({ publicKey: certPath }, TEST_OID)), 'ERR_USAGE');
    assert.equal(refusal(() => checkCertificateIdentity(fromCert, 'agent-beta', TEST_OID)), 'ERR_REFUSED_IDENTITY_MISMATCH');
    assert.equal(checkCertificateIdentity(fromCert, 'agent-alpha', TEST_OID), undefined);
    const bare = await clientCredentials({});
    writeFileSync(certPath, bare.certPem);
    assert.match(checkCertificateIdentity(readSubjectKey({ cert: certPath }, TEST_OID)!, 'agent-alpha', TEST_OID) ?? '', /no identity extension/);
    const malformed = await clientCredentials({ rawIdentityValue: Buffer.from([0x13, 0x01, 0x41]) });
    writeFileSync(certPath, malformed.certPem);
    assert.equal(refusal(() => checkCertificateIdentity(readSubjectKey({ cert: certPath }, TEST_OID)!, 'agent-alpha', TEST_OID)), 'ERR_REFUSED_CERTIFICATE_IDENTITY_INVALID');
  });
});

describe('the command line, in process', () => {
  async function run(argv: string[], env: NodeJS.ProcessEnv = {}) {
    let stdout = '';
    let stderr = '';
    const code = await runCli(argv, { env, stdout: { write: (s: string) => (stdout += s) }, stderr: { write: (s: string) => (stderr += s) } });
    return { code, stdout, stderr };
  }

  test('--help everywhere exits 0; unknown commands and options exit 2, as JSON with --json', async () => {
    for (const argv of [['--help'], ['migrate', '--help'], ['revoke', 'scope', '--help'], ['list', '--help'], ['explain', '--help'], ['help', 'grant-scope']]) {
      assert.equal((await run(argv)).code, 0, argv.join(' '));
    }
    assert.equal((await run(['frobnicate'])).code, 2);
    const json = await run(['--json', 'grant-scope', 'k', 'docstore', '--bogus']);
    assert.equal(json.code, 2);
    assert.equal(JSON.parse(json.stdout).error.code, 'ERR_USAGE');
    assert.equal((await run(['list', 'everything'])).code, 2);
    assert.equal((await run(['grant-permission', '--identity', 'a', '--spki', '00', 'docstore'], { AGENT_GATEWAY_DATABASE_URL: 'postgres://x@127.0.0.1:1/x' })).code, 2, 'no principal');
    assert.equal((await run(['revoke'])).code, 2);
  });

  test('the PIN is never accepted as an option value', async () => {
    const result = await run(['register-principal', 'k', '--user-pin', '1234']);
    assert.equal(result.code, 2);
    assert.match(result.stderr, /unknown option '--user-pin'/);
    const inline = await run(['--json', 'register-principal', 'k', '--user-pin=secret-4711']);
    assert.equal(inline.code, 2);
    assert.ok(!`${inline.stdout}${inline.stderr}`.includes('secret-4711'), inline.stderr);
  });
});
