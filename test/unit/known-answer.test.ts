import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash, createPrivateKey, createPublicKey } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { authorize, PrincipalKeyCache } from '../../registry/authorize.js';
import { derSignatureToRaw, p256PublicKeyFromSpki, rawSignatureToDer, verifyP256Signature } from '../../registry/ecdsa.js';
import { canonicalPermissionBytes, canonicalPermissionText } from '../../registry/permission.js';
import { permissionFields, signPermission, softwareSigner } from '../../registry/signing.js';

// Known-answer vectors for the canonical signed text and its signature (DESIGN §3), checked
// against OpenSSL: `signature` is the DER ECDSA-Sig-Value that `openssl dgst -sha256 -verify` accepts.
// The keys below are test vectors generated once with
//   openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 | openssl pkcs8 -topk8 -nocrypt
// They protect nothing and must never be registered anywhere.

/** org-alice's principal signing key (test vector, not a secret). */
const PRINCIPAL_PRIVATE_KEY_PEM = `-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgjMPGShb6st1G5HtN
/5YDnUqYEC1TB+VaOaCVrwva0/ehRANCAATZEUjQC817bUHLnfLjenj7YqDdj905
JuuRL1RKTtUjHeEu2gQ9T48ilMFVuW5PuofW1CXHbcZ27GBBUi/ssjvb
-----END PRIVATE KEY-----
`;

const PRINCIPAL_PUBLIC_KEY_PEM = `-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2RFI0AvNe21By53y43p4+2Kg3Y/d
OSbrkS9USk7VIx3hLtoEPU+PIpTBVbluT7qH1tQlx23GduxgQVIv7LI72w==
-----END PUBLIC KEY-----
`;

const PRINCIPAL_SPKI_HEX =
  '3059301306072a8648ce3d020106082a8648ce3d03010703420004d91148d00bcd7b6d41cb9df2e37a78fb62a0dd8fdd3926eb912f544a4ed5231de12eda043d4f8f2294c155b96e4fba87d6d425c76dc676ec6041522fecb23bdb';

/** agent-alpha's key (a second fixed P-256 key; only its public half is needed). */
const SUBJECT_SPKI_HEX =
  '3059301306072a8648ce3d020106082a8648ce3d03010703420004c86212ef62433d0eca633fe917c5073eba6ff4791117b2a92e3a3fb3aa11fa16692cb2873b2f0fd256268573830355f5b4041fbb61913412b681795d200ca533';

const EXPECTED_TEXT =
  'agent-gateway-permission-v1\n' +
  'permission_id=perm-1\n' +
  'signing_key_id=org-alice\n' +
  'subject_identity=agent-alpha\n' +
  'subject_public_key_spki_der=3059301306072a8648ce3d020106082a8648ce3d03010703420004c86212ef62433d0eca633fe917c5073eba6ff4791117b2a92e3a3fb3aa11fa16692cb2873b2f0fd256268573830355f5b4041fbb61913412b681795d200ca533\n' +
  'destination=api.example.com:443\n' +
  'not_before=2026-05-01T00:00:00.000000Z\n' +
  'not_after=2026-06-01T00:00:00.000000Z';

/** SHA-256 of EXPECTED_TEXT (`sha256sum msg.txt`). */
const EXPECTED_TEXT_SHA256 = 'd691d06d167aede12459e05dd0dc27523602b6d47bacc50ddaf4033c1d18d278';

/**
 * Two signatures over EXPECTED_TEXT made with `openssl dgst -sha256 -sign principal.pem msg.txt`.
 * The first has the high bit set in both r and s (two 33-byte INTEGERs, 72 bytes in all);
 * the second has a 32-byte r and a 33-byte s (71 bytes).
 */
const FIXED_SIGNATURES: readonly { readonly name: string; readonly der: string; readonly raw: string }[] = [
  {
    name: 'r and s with the high bit set',
    der: '3046022100bd02bd2a283ba149f5fed58757321ba8a87719a50f7d6d992c2c6787816e00ce0221008a82270f934c25389fe25ba57646ebf234c4c993f84e66a1a8ce1d17f4389842',
    raw: 'bd02bd2a283ba149f5fed58757321ba8a87719a50f7d6d992c2c6787816e00ce8a82270f934c25389fe25ba57646ebf234c4c993f84e66a1a8ce1d17f4389842',
  },
  {
    name: 'r without and s with the high bit set',
    der: '304502207ff9fb9818494daace36291d9ce88934f7cd3e540f02e9ea319116a371f9e661022100e82a502c500ca2d36515aa1bed4cca98e383d2c0d0c24669cf618eb529f078a0',
    raw: '7ff9fb9818494daace36291d9ce88934f7cd3e540f02e9ea319116a371f9e661e82a502c500ca2d36515aa1bed4cca98e383d2c0d0c24669cf618eb529f078a0',
  },
];

const principalPrivateKey = createPrivateKey(PRINCIPAL_PRIVATE_KEY_PEM);
const principalSpki = Buffer.from(PRINCIPAL_SPKI_HEX, 'hex');
const subjectSpki = Buffer.from(SUBJECT_SPKI_HEX, 'hex');

const FIELDS = permissionFields(
  {
    permissionId: 'perm-1',
    subjectIdentity: 'agent-alpha',
    subjectPublicKeySpkiDer: subjectSpki,
    destination: 'api.example.com:443',
    notBefore: '2026-05-01T00:00:00.000000Z',
    notAfter: '2026-06-01T00:00:00.000000Z',
  },
  'org-alice',
);

/** Runs `openssl dgst -sha256 -verify pub.pem -signature sig.der msg.txt` on temp files. */
function opensslVerify(message: Uint8Array, signature: Uint8Array): { status: number | null; output: string } {
  const dir = mkdtempSync(join(tmpdir(), 'agent-gateway-kat-'));
  try {
    const pub = join(dir, 'pub.pem');
    const sig = join(dir, 'sig.der');
    const msg = join(dir, 'msg.txt');
    writeFileSync(pub, PRINCIPAL_PUBLIC_KEY_PEM);
    writeFileSync(sig, signature);
    writeFileSync(msg, message);
    const result = spawnSync('openssl', ['dgst', '-sha256', '-verify', pub, '-signature', sig, msg], { encoding: 'utf8' });
    if (result.error) throw result.error;
    return { status: result.status, output: `${result.stdout}${result.stderr}`.trim() };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test('known answer: the fixed key pair is consistent', () => {
  const fromPrivate = createPublicKey(principalPrivateKey).export({ type: 'spki', format: 'der' });
  assert.equal(fromPrivate.toString('hex'), PRINCIPAL_SPKI_HEX);
  assert.equal(createPublicKey(PRINCIPAL_PUBLIC_KEY_PEM).export({ type: 'spki', format: 'der' }).toString('hex'), PRINCIPAL_SPKI_HEX);
  assert.equal(p256PublicKeyFromSpki(subjectSpki).asymmetricKeyDetails?.namedCurve, 'prime256v1');
});

test('known answer: canonical text of the spec row is exactly the expected eight lines', () => {
  const text = canonicalPermissionText(FIELDS);
  assert.equal(text, EXPECTED_TEXT);
  const bytes = canonicalPermissionBytes(FIELDS);
  assert.equal(bytes.length, 422); // `wc -c msg.txt`
  assert.equal(createHash('sha256').update(bytes).digest('hex'), EXPECTED_TEXT_SHA256);
});

for (const vector of FIXED_SIGNATURES) {
  test(`known answer: fixed OpenSSL signature (${vector.name}) verifies with verifyP256Signature`, () => {
    const message = canonicalPermissionBytes(FIELDS);
    const signature = Buffer.from(vector.der, 'hex');
    const key = p256PublicKeyFromSpki(principalSpki);
    assert.equal(verifyP256Signature(key, message, signature), true);
    // One changed byte in the text (a different permission_id) no longer verifies.
    assert.equal(verifyP256Signature(key, Buffer.from(EXPECTED_TEXT.replace('perm-1', 'perm-2')), signature), false);
    // The subject's key is not the principal's.
    assert.equal(verifyP256Signature(p256PublicKeyFromSpki(subjectSpki), message, signature), false);
  });

  test(`known answer: fixed OpenSSL signature (${vector.name}) converts to raw r||s and back`, () => {
    const raw = derSignatureToRaw(Buffer.from(vector.der, 'hex'));
    assert.equal(raw.toString('hex'), vector.raw);
    assert.equal(rawSignatureToDer(raw).toString('hex'), vector.der);
  });

  test(`known answer: openssl dgst -verify accepts the fixed signature (${vector.name})`, () => {
    const result = opensslVerify(Buffer.from(EXPECTED_TEXT, 'utf8'), Buffer.from(vector.der, 'hex'));
    assert.equal(result.output, 'Verified OK');
    assert.equal(result.status, 0);
  });

  test(`known answer: the registry model authorises the fixed row with the fixed signature (${vector.name})`, () => {
    const row = {
      permission_id: 'perm-1',
      signing_key_id: 'org-alice',
      subject_identity: 'agent-alpha',
      subject_public_key_spki_der: subjectSpki,
      destination: 'api.example.com:443',
      not_before: '2026-05-01T00:00:00.000000Z',
      not_after: '2026-06-01T00:00:00.000000Z',
      signature: Buffer.from(vector.der, 'hex'),
      permission_started: true,
      permission_unexpired: true,
      permission_revoked: false,
      key_algorithm: 'ecdsa-p256-sha256',
      key_spki_der: principalSpki,
      key_started: true,
      key_unexpired: true,
      key_revoked: false,
      delegation_exists: true,
      delegation_started: true,
      delegation_unexpired: true,
      delegation_revoked: false,
      valid_for_ms: 3_600_000,
    };
    const result = authorize([row], { identity: 'agent-alpha', spkiDer: subjectSpki, destination: 'api.example.com:443' }, new PrincipalKeyCache());
    assert.deepEqual(result, { allowed: true, permissionId: 'perm-1', signingKeyId: 'org-alice', notAfter: '2026-06-01T00:00:00.000000Z', validForMs: 3_600_000 });
  });
}

test('known answer: openssl dgst -verify accepts a fresh signature from signPermission', async () => {
  const signer = softwareSigner('org-alice', principalPrivateKey, principalSpki);
  const signed = await signPermission(FIELDS, signer);
  assert.ok(verifyP256Signature(p256PublicKeyFromSpki(principalSpki), Buffer.from(EXPECTED_TEXT, 'utf8'), signed.signature));
  const result = opensslVerify(Buffer.from(EXPECTED_TEXT, 'utf8'), signed.signature);
  assert.equal(result.output, 'Verified OK');
  assert.equal(result.status, 0);
});

test('known answer: openssl dgst -verify refuses the fixed signature over a text with a trailing newline', () => {
  const result = opensslVerify(Buffer.from(`${EXPECTED_TEXT}\n`, 'utf8'), Buffer.from(FIXED_SIGNATURES[0]!.der, 'hex'));
  assert.notEqual(result.status, 0);
  assert.match(result.output, /Verification failure/);
});
