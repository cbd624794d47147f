import { test } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { authorize, candidateRowSchema, evaluateRow, PrincipalKeyCache } from '../../registry/authorize.js';
import type { AuthorizationRequest, CandidateRow, DenialReason } from '../../registry/authorize.js';
import { derSignatureToRaw } from '../../registry/ecdsa.js';
import { permissionFields, signPermission, softwareSigner } from '../../registry/signing.js';
import type { PermissionDraft } from '../../registry/signing.js';

// The spec's checks 3–5 over candidate rows whose time comparisons the database already made.

interface KeyPair {
  readonly privateKey: KeyObject;
  readonly spki: Buffer;
}

function p256(): KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return { privateKey, spki: publicKey.export({ type: 'spki', format: 'der' }) };
}

const ALICE = p256(); // principal org-alice
const MALLORY = p256(); // a principal key that is not org-alice's
const AGENT = p256(); // the agent's (TPM) key
const OTHER_AGENT = p256();
const P384_SPKI = generateKeyPairSync('ec', { namedCurve: 'P-384' }).publicKey.export({ type: 'spki', format: 'der' });
const RSA_SPKI = generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ type: 'spki', format: 'der' });
const ED25519_SPKI = generateKeyPairSync('ed25519').publicKey.export({ type: 'spki', format: 'der' });

const DRAFT: PermissionDraft = {
  permissionId: 'perm-1',
  subjectIdentity: 'agent-alpha',
  subjectPublicKeySpkiDer: AGENT.spki,
  destination: 'API.example.com',
  notBefore: '2026-05-01T00:00:00.123456Z',
  notAfter: '2026-06-01T00:00:00Z',
};

type Row = Record<string, unknown>;

/** A candidate row as the lookup query returns it, signed by `signer` (org-alice by default). */
async function signedRow(draft: Partial<PermissionDraft> = {}, signer: KeyPair = ALICE): Promise<CandidateRow> {
  const fields = permissionFields({ ...DRAFT, ...draft }, 'org-alice');
  const { signature } = await signPermission(fields, softwareSigner('org-alice', signer.privateKey, signer.spki));
  return {
    permission_id: fields.permissionId,
    signing_key_id: fields.signingKeyId,
    subject_identity: fields.subjectIdentity,
    subject_public_key_spki_der: Buffer.from(fields.subjectPublicKeySpkiDer),
    destination: fields.destination,
    not_before: fields.notBefore,
    not_after: fields.notAfter,
    signature,
    permission_started: true,
    permission_unexpired: true,
    permission_revoked: false,
    key_algorithm: 'ecdsa-p256-sha256',
    key_spki_der: ALICE.spki,
    key_started: true,
    key_unexpired: true,
    key_revoked: false,
    delegation_exists: true,
    delegation_started: true,
    delegation_unexpired: true,
    delegation_revoked: false,
    valid_for_ms: 3_600_000,
  };
}

const BASE = await signedRow();
const BY_MALLORY = await signedRow({}, MALLORY);

const requestFor = (row: Row): AuthorizationRequest => ({
  identity: row.subject_identity as string,
  spkiDer: row.subject_public_key_spki_der as Buffer,
  destination: row.destination as string,
});

const REQUEST: AuthorizationRequest = { identity: 'agent-alpha', spkiDer: AGENT.spki, destination: 'api.example.com:443' };

test('authorize: the fixture row is what the lookup query returns', () => {
  assert.equal(candidateRowSchema.safeParse(BASE).success, true);
  assert.equal(BASE.destination, 'api.example.com:443');
  assert.equal(BASE.not_before, '2026-05-01T00:00:00.123456Z');
  assert.equal(BASE.not_after, '2026-06-01T00:00:00.000000Z');
  assert.deepEqual(requestFor(BASE), REQUEST);
});

test('authorize: a valid, active, delegated, correctly signed row allows', () => {
  const result = authorize([BASE], REQUEST, new PrincipalKeyCache());
  assert.deepEqual(result, { allowed: true, permissionId: 'perm-1', signingKeyId: 'org-alice', notAfter: '2026-06-01T00:00:00.000000Z', validForMs: 3_600_000 });
  assert.deepEqual(evaluateRow(BASE, REQUEST, new PrincipalKeyCache()), { permissionId: 'perm-1', allowed: true, reason: undefined });
});

test('authorize: the request SPKI may be a Uint8Array', () => {
  const result = authorize([BASE], { ...REQUEST, spkiDer: new Uint8Array(AGENT.spki) }, new PrincipalKeyCache());
  assert.equal(result.allowed, true);
});

interface DenialCase {
  readonly name: string;
  /** The row the lookup returned (built from BASE unless stated). */
  readonly row: () => Row | Promise<Row> | unknown;
  /** Defaults to the row's own identity, SPKI and destination. */
  readonly request?: AuthorizationRequest;
  readonly reason: DenialReason;
}

const changed = (change: Row): (() => Row) => () => ({ ...BASE, ...change });
function flipLastByte(buffer: Buffer): Buffer {
  const copy = Buffer.from(buffer);
  copy[copy.length - 1]! ^= 0x01;
  return copy;
}

const denials: readonly DenialCase[] = [
  // permission row state
  { name: 'permission revoked', row: changed({ permission_revoked: true }), reason: 'permission_revoked' },
  { name: 'permission not yet valid', row: changed({ permission_started: false }), reason: 'permission_not_yet_valid' },
  { name: 'permission expired', row: changed({ permission_unexpired: false }), reason: 'permission_expired' },
  { name: 'permission revoked and expired reports revoked', row: changed({ permission_revoked: true, permission_unexpired: false }), reason: 'permission_revoked' },
  // principal signing key state
  { name: 'principal key revoked', row: changed({ key_revoked: true }), reason: 'principal_key_revoked' },
  { name: 'principal key not yet valid', row: changed({ key_started: false }), reason: 'principal_key_not_yet_valid' },
  { name: 'principal key expired', row: changed({ key_unexpired: false }), reason: 'principal_key_expired' },
  { name: 'principal key is P-384', row: changed({ key_spki_der: P384_SPKI }), reason: 'principal_key_invalid' },
  { name: 'principal key is RSA', row: changed({ key_spki_der: RSA_SPKI }), reason: 'principal_key_invalid' },
  { name: 'principal key is Ed25519', row: changed({ key_spki_der: ED25519_SPKI }), reason: 'principal_key_invalid' },
  { name: 'principal key is garbage', row: changed({ key_spki_der: Buffer.from('not a key') }), reason: 'principal_key_invalid' },
  { name: 'principal key is empty', row: changed({ key_spki_der: Buffer.alloc(0) }), reason: 'principal_key_invalid' },
  { name: 'principal key point is off the curve', row: changed({ key_spki_der: flipLastByte(ALICE.spki) }), reason: 'principal_key_invalid' },
  { name: 'principal key algorithm is not ecdsa-p256-sha256', row: changed({ key_algorithm: 'ecdsa-p384-sha384' }), reason: 'principal_key_invalid' },
  { name: 'principal key algorithm differs in case', row: changed({ key_algorithm: 'ECDSA-P256-SHA256' }), reason: 'principal_key_invalid' },
  // delegation (principal_key_permissions) state
  { name: 'delegation missing (LEFT JOIN gives nulls)', row: changed({ delegation_exists: false, delegation_started: null, delegation_unexpired: null, delegation_revoked: null }), reason: 'delegation_missing' },
  { name: 'delegation revoked', row: changed({ delegation_revoked: true }), reason: 'delegation_revoked' },
  { name: 'delegation not yet valid', row: changed({ delegation_started: false }), reason: 'delegation_not_yet_valid' },
  { name: 'delegation expired', row: changed({ delegation_unexpired: false }), reason: 'delegation_expired' },
  { name: 'delegation flags null although it exists', row: changed({ delegation_started: null, delegation_unexpired: null, delegation_revoked: null }), reason: 'delegation_not_yet_valid' },
  // signature over the canonical text
  { name: 'permission_id changed after signing', row: changed({ permission_id: 'perm-2' }), reason: 'signature_invalid' },
  { name: 'signing_key_id changed after signing', row: changed({ signing_key_id: 'org-bob' }), reason: 'signature_invalid' },
  { name: 'subject_identity changed after signing', row: changed({ subject_identity: 'agent-beta' }), reason: 'signature_invalid' },
  { name: 'subject key changed after signing', row: changed({ subject_public_key_spki_der: OTHER_AGENT.spki }), reason: 'signature_invalid' },
  { name: 'destination changed after signing', row: changed({ destination: 'evil.example.com:443' }), reason: 'signature_invalid' },
  { name: 'destination port changed after signing', row: changed({ destination: 'api.example.com:8443' }), reason: 'signature_invalid' },
  { name: 'not_before moved one microsecond after signing', row: changed({ not_before: '2026-05-01T00:00:00.123457Z' }), reason: 'signature_invalid' },
  { name: 'not_before truncated to milliseconds (read through Date)', row: changed({ not_before: '2026-05-01T00:00:00.123000Z' }), reason: 'signature_invalid' },
  { name: 'not_after extended after signing', row: changed({ not_after: '2027-06-01T00:00:00.000000Z' }), reason: 'signature_invalid' },
  { name: 'signature by another principal key', row: () => BY_MALLORY, reason: 'signature_invalid' },
  { name: 'signature from another row', row: async () => ({ ...BASE, signature: (await signedRow({ permissionId: 'perm-2' })).signature }), reason: 'signature_invalid' },
  { name: 'truncated signature', row: changed({ signature: BASE.signature.subarray(0, BASE.signature.length - 1) }), reason: 'signature_invalid' },
  { name: 'signature with a trailing byte', row: changed({ signature: Buffer.concat([BASE.signature, Buffer.from([0])]) }), reason: 'signature_invalid' },
  { name: 'signature with a flipped bit', row: changed({ signature: flipLastByte(BASE.signature) }), reason: 'signature_invalid' },
  { name: 'raw r||s signature instead of DER', row: changed({ signature: derSignatureToRaw(BASE.signature) }), reason: 'signature_invalid' },
  { name: 'empty signature', row: changed({ signature: Buffer.alloc(0) }), reason: 'signature_invalid' },
  // malformed rows
  { name: 'row is null', row: () => null, request: REQUEST, reason: 'row_invalid' },
  { name: 'row is a string', row: () => 'perm-1', request: REQUEST, reason: 'row_invalid' },
  { name: 'row is empty', row: () => ({}), request: REQUEST, reason: 'row_invalid' },
  { name: 'row lacks its signature', row: () => { const { signature: _signature, ...rest } = BASE; return rest; }, reason: 'row_invalid' },
  { name: 'row lacks a delegation flag', row: () => { const { delegation_revoked: _revoked, ...rest } = BASE; return rest; }, reason: 'row_invalid' },
  { name: 'signature as hex text', row: changed({ signature: BASE.signature.toString('hex') }), reason: 'row_invalid' },
  { name: 'subject SPKI as a plain Uint8Array', row: changed({ subject_public_key_spki_der: new Uint8Array(AGENT.spki) }), request: REQUEST, reason: 'row_invalid' },
  { name: 'flag as the string "f"', row: changed({ permission_revoked: 'f' }), reason: 'row_invalid' },
  { name: 'not_before as a Date', row: changed({ not_before: new Date('2026-05-01T00:00:00Z') }), reason: 'row_invalid' },
  { name: 'not_after in PostgreSQL default output', row: changed({ not_after: '2026-06-01 00:00:00+00' }), reason: 'row_invalid' },
  { name: 'not_after with milliseconds', row: changed({ not_after: '2026-06-01T00:00:00.000Z' }), reason: 'row_invalid' },
  { name: 'empty permission_id', row: changed({ permission_id: '' }), reason: 'row_invalid' },
  { name: 'newline in permission_id', row: changed({ permission_id: 'perm-1\ndestination=evil.example:443' }), reason: 'row_invalid' },
  { name: 'NUL in signing_key_id', row: changed({ signing_key_id: 'org-alice\u0000' }), reason: 'row_invalid' },
  { name: 'U+0085 in subject_identity (request carries it too)', row: changed({ subject_identity: 'agent-alpha\u0085' }), reason: 'row_invalid' },
  { name: 'DEL in subject_identity (request carries it too)', row: changed({ subject_identity: 'agent\u007falpha' }), reason: 'row_invalid' },
  { name: 'destination stored unnormalised (request carries it too)', row: changed({ destination: 'API.example.com:443' }), reason: 'row_invalid' },
  // rows for something else
  { name: 'row for another subject key', row: () => BASE, request: { ...REQUEST, spkiDer: OTHER_AGENT.spki }, reason: 'key_mismatch' },
  { name: 'row for a subject key that differs in one byte', row: () => BASE, request: { ...REQUEST, spkiDer: flipLastByte(AGENT.spki) }, reason: 'key_mismatch' },
  { name: 'row for another identity', row: () => BASE, request: { ...REQUEST, identity: 'agent-beta' }, reason: 'no_permission' },
  { name: 'identity differs only in case', row: () => BASE, request: { ...REQUEST, identity: 'Agent-Alpha' }, reason: 'no_permission' },
  { name: 'row for another destination', row: () => BASE, request: { ...REQUEST, destination: 'api.example.com:8443' }, reason: 'no_permission' },
];

for (const c of denials) {
  test(`authorize: ${c.name} → ${c.reason}`, async () => {
    const row = await c.row();
    const request = c.request ?? requestFor(row as Row);
    const verdict = evaluateRow(row, request, new PrincipalKeyCache());
    assert.equal(verdict.allowed, false);
    assert.equal(verdict.reason, c.reason);
    const result = authorize([row], request, new PrincipalKeyCache());
    assert.equal(result.allowed, false);
    assert.ok(!result.allowed);
    assert.equal(result.reason, c.reason);
    assert.equal(result.verdicts.length, 1);
    assert.deepEqual(result.verdicts[0], verdict);
  });
}

test('authorize: no rows → no_permission', () => {
  const result = authorize([], REQUEST, new PrincipalKeyCache());
  assert.deepEqual(result, { allowed: false, reason: 'no_permission', verdicts: [] });
});

test('authorize: every DenialReason is produced by some case above', () => {
  const all: readonly DenialReason[] = [
    'no_permission', 'key_mismatch', 'row_invalid',
    'permission_not_yet_valid', 'permission_expired', 'permission_revoked',
    'principal_key_not_yet_valid', 'principal_key_expired', 'principal_key_revoked', 'principal_key_invalid',
    'delegation_missing', 'delegation_not_yet_valid', 'delegation_expired', 'delegation_revoked',
    'signature_invalid',
  ];
  const covered = new Set(denials.map((c) => c.reason));
  assert.deepEqual(all.filter((reason) => !covered.has(reason)), []);
});

test('authorize: the verdict names the permission_id of a malformed row when it has one', () => {
  assert.equal(evaluateRow({ ...BASE, signature: 'x' }, REQUEST, new PrincipalKeyCache()).permissionId, 'perm-1');
  assert.equal(evaluateRow({ permission_id: 7 }, REQUEST, new PrincipalKeyCache()).permissionId, undefined);
  assert.equal(evaluateRow(undefined, REQUEST, new PrincipalKeyCache()).permissionId, undefined);
});

// Several rows: the denial reported is the one from the row that got furthest.

const ROW = {
  keyMismatch: async () => ({ ...(await signedRow({ permissionId: 'perm-other-key', subjectPublicKeySpkiDer: OTHER_AGENT.spki })) }),
  invalid: async () => ({ ...BASE, permission_id: 'perm-malformed', signature: 'x' }),
  revoked: async () => ({ ...(await signedRow({ permissionId: 'perm-revoked' })), permission_revoked: true }),
  notYetValid: async () => ({ ...(await signedRow({ permissionId: 'perm-future' })), permission_started: false }),
  expired: async () => ({ ...(await signedRow({ permissionId: 'perm-expired' })), permission_unexpired: false }),
  keyRevoked: async () => ({ ...(await signedRow({ permissionId: 'perm-key-revoked' })), key_revoked: true }),
  keyNotYetValid: async () => ({ ...(await signedRow({ permissionId: 'perm-key-future' })), key_started: false }),
  keyExpired: async () => ({ ...(await signedRow({ permissionId: 'perm-key-expired' })), key_unexpired: false }),
  keyInvalid: async () => ({ ...(await signedRow({ permissionId: 'perm-key-p384' })), key_spki_der: P384_SPKI }),
  noDelegation: async () => ({ ...(await signedRow({ permissionId: 'perm-undelegated' })), delegation_exists: false, delegation_started: null, delegation_unexpired: null, delegation_revoked: null }),
  delegationRevoked: async () => ({ ...(await signedRow({ permissionId: 'perm-delegation-revoked' })), delegation_revoked: true }),
  delegationNotYetValid: async () => ({ ...(await signedRow({ permissionId: 'perm-delegation-future' })), delegation_started: false }),
  delegationExpired: async () => ({ ...(await signedRow({ permissionId: 'perm-delegation-expired' })), delegation_unexpired: false }),
  badSignature: async () => ({ ...(await signedRow({ permissionId: 'perm-forged' }, MALLORY)) }),
  valid: async () => ({ ...(await signedRow({ permissionId: 'perm-good' })) }),
} as const;
type RowName = keyof typeof ROW;

const multi: readonly { readonly rows: readonly RowName[]; readonly reason: DenialReason }[] = [
  { rows: ['keyMismatch', 'invalid'], reason: 'row_invalid' },
  { rows: ['invalid', 'keyMismatch'], reason: 'row_invalid' },
  { rows: ['keyMismatch', 'revoked'], reason: 'permission_revoked' },
  { rows: ['revoked', 'invalid'], reason: 'permission_revoked' },
  { rows: ['expired', 'revoked'], reason: 'permission_expired' },
  { rows: ['notYetValid', 'expired'], reason: 'permission_expired' },
  { rows: ['expired', 'keyRevoked'], reason: 'principal_key_revoked' },
  { rows: ['keyExpired', 'keyNotYetValid'], reason: 'principal_key_expired' },
  { rows: ['keyInvalid', 'keyExpired'], reason: 'principal_key_invalid' },
  { rows: ['noDelegation', 'keyInvalid'], reason: 'delegation_missing' },
  { rows: ['delegationRevoked', 'noDelegation'], reason: 'delegation_revoked' },
  { rows: ['delegationRevoked', 'delegationNotYetValid'], reason: 'delegation_not_yet_valid' },
  { rows: ['delegationExpired', 'delegationNotYetValid'], reason: 'delegation_expired' },
  { rows: ['delegationExpired', 'badSignature', 'revoked'], reason: 'signature_invalid' },
  { rows: ['badSignature', 'keyMismatch', 'invalid', 'expired'], reason: 'signature_invalid' },
];

for (const c of multi) {
  test(`authorize: rows [${c.rows.join(', ')}] → ${c.reason} (the row that got furthest)`, async () => {
    const rows = await Promise.all(c.rows.map((name) => ROW[name]()));
    const result = authorize(rows, REQUEST, new PrincipalKeyCache());
    assert.ok(!result.allowed);
    assert.equal(result.reason, c.reason);
    assert.equal(result.verdicts.length, rows.length);
    // Reversing the order does not change the reason.
    const reversed = authorize([...rows].reverse(), REQUEST, new PrincipalKeyCache());
    assert.ok(!reversed.allowed);
    assert.equal(reversed.reason, c.reason);
  });
}

test('authorize: every failing row at once reports signature_invalid, in any order', async () => {
  const names = (Object.keys(ROW) as RowName[]).filter((name) => name !== 'valid');
  const rows = await Promise.all(names.map((name) => ROW[name]()));
  for (const order of [rows, [...rows].reverse(), [...rows.slice(7), ...rows.slice(0, 7)]]) {
    const result = authorize(order, REQUEST, new PrincipalKeyCache());
    assert.ok(!result.allowed);
    assert.equal(result.reason, 'signature_invalid');
    assert.equal(result.verdicts.length, names.length);
  }
});

for (const position of ['first', 'middle', 'last'] as const) {
  test(`authorize: one valid row among invalid ones allows (valid row ${position})`, async () => {
    const names = (Object.keys(ROW) as RowName[]).filter((name) => name !== 'valid');
    const invalid = await Promise.all(names.map((name) => ROW[name]()));
    const valid = await ROW.valid();
    const index = position === 'first' ? 0 : position === 'last' ? invalid.length : Math.floor(invalid.length / 2);
    const rows = [...invalid.slice(0, index), valid, ...invalid.slice(index)];
    const result = authorize(rows, REQUEST, new PrincipalKeyCache());
    assert.deepEqual(result, { allowed: true, permissionId: 'perm-good', signingKeyId: 'org-alice', notAfter: '2026-06-01T00:00:00.000000Z', validForMs: 3_600_000 });
  });
}

test('authorize: the first of two valid rows is the one reported', async () => {
  const second = await signedRow({ permissionId: 'perm-second', notAfter: '2026-07-01T00:00:00Z' });
  const result = authorize([BASE, second], REQUEST, new PrincipalKeyCache());
  assert.ok(result.allowed);
  assert.equal(result.permissionId, 'perm-1');
});

test('PrincipalKeyCache: parses each key once and remembers keys that do not parse', () => {
  const cache = new PrincipalKeyCache();
  const first = cache.get(ALICE.spki);
  assert.ok(first);
  assert.equal(first.asymmetricKeyDetails?.namedCurve, 'prime256v1');
  assert.equal(cache.get(Buffer.from(ALICE.spki)), first);
  assert.equal(cache.get(P384_SPKI), undefined);
  assert.equal(cache.get(P384_SPKI), undefined);
  assert.equal(cache.get(RSA_SPKI), undefined);
  assert.notEqual(cache.get(MALLORY.spki), first);
});

test('authorize: a cache shared across calls gives the same answers', () => {
  const cache = new PrincipalKeyCache();
  for (let i = 0; i < 3; i++) {
    assert.equal(authorize([BASE], REQUEST, cache).allowed, true);
    const denied = authorize([{ ...BASE, key_spki_der: P384_SPKI }], REQUEST, cache);
    assert.ok(!denied.allowed);
    assert.equal(denied.reason, 'principal_key_invalid');
  }
});

test('a verified signature is remembered, and nothing about the row but its signed content and key is taken from that memory', () => {
  const cache = new PrincipalKeyCache();
  assert.equal(authorize([BASE], REQUEST, cache).allowed, true);
  assert.equal(cache.verifiedEntries, 1);
  assert.equal(authorize([BASE], REQUEST, cache).allowed, true);
  assert.equal(cache.verifiedEntries, 1, 'the same row asked again is not verified again');
  // Unsigned state is read from every lookup, before the signature.
  const unsigned: [Partial<CandidateRow>, DenialReason][] = [
    [{ permission_revoked: true }, 'permission_revoked'],
    [{ permission_unexpired: false }, 'permission_expired'],
    [{ key_revoked: true }, 'principal_key_revoked'],
    [{ key_unexpired: false }, 'principal_key_expired'],
    [{ delegation_revoked: true }, 'delegation_revoked'],
    [{ delegation_exists: false, delegation_started: null, delegation_unexpired: null, delegation_revoked: null }, 'delegation_missing'],
    [{ delegation_unexpired: false }, 'delegation_expired'],
  ];
  for (const [change, reason] of unsigned) {
    const result = authorize([{ ...BASE, ...change }], REQUEST, cache);
    assert.ok(!result.allowed, reason);
    assert.equal(result.reason, reason);
  }
  // A changed signed field, signature or principal key is a different entry, and fails verification.
  const flipped = Buffer.from(BASE.signature);
  flipped[flipped.length - 1]! ^= 1;
  const tampered: Row[] = [
    { not_after: '2027-06-01T00:00:00.000000Z' },
    { not_before: '2026-05-01T00:00:00.123457Z' },
    { permission_id: 'perm-2' },
    { signing_key_id: 'org-mallory' },
    { signature: flipped },
    { signature: BY_MALLORY.signature },
    { key_spki_der: MALLORY.spki },
  ];
  for (const change of tampered) {
    const result = authorize([{ ...BASE, ...change }], REQUEST, cache);
    assert.ok(!result.allowed, JSON.stringify(Object.keys(change)));
    assert.equal(result.reason, 'signature_invalid');
  }
  assert.equal(cache.verifiedEntries, 1, 'failures are not remembered');
  // Mallory's own row verifies under Mallory's key: a second entry, not a confusion with Alice's.
  assert.equal(authorize([{ ...BY_MALLORY, key_spki_der: MALLORY.spki }], REQUEST, cache).allowed, true);
  assert.equal(cache.verifiedEntries, 2);
});
