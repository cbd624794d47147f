import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync, randomBytes, sign as cryptoSign, verify as cryptoVerify } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import {
  derSignatureToRaw,
  p256PublicKeyFromSpki,
  p256SpkiFromPoint,
  P256_SPKI_PREFIX,
  rawSignatureToDer,
  SIGNATURE_ALGORITHM,
  spkiFingerprint,
  verifyP256Signature,
} from '../../registry/ecdsa.js';
import { InvalidKeyMaterialError } from '../../registry/errors.js';

// DESIGN §3: `signature` is the ASN.1 DER ECDSA-Sig-Value over SHA-256 of the text, the form
// `openssl dgst -sha256 -verify` accepts. PKCS#11 returns raw r||s: convert.

const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ''), 'hex');
const repeat = (byte: string, count: number): string => byte.repeat(count);
const derInt = (body: string): string => `02${(body.length / 2).toString(16).padStart(2, '0')}${body}`;
const derSeq = (body: string): string => `30${(body.length / 2).toString(16).padStart(2, '0')}${body}`;

const isKeyMaterialError = (error: unknown): boolean => {
  assert.ok(error instanceof InvalidKeyMaterialError, `expected InvalidKeyMaterialError, got ${String(error)}`);
  assert.equal(error.code, 'ERR_KEY_MATERIAL_INVALID');
  return true;
};

interface ConversionCase {
  readonly name: string;
  readonly r: string; // 32 bytes hex
  readonly s: string; // 32 bytes hex
  readonly der: string;
}

const R_PLAIN = repeat('11', 32);
const S_PLAIN = repeat('22', 32);
const R_HIGH = `80${repeat('11', 31)}`;
const S_HIGH = `ff${repeat('22', 31)}`;
const R_LEADING_ZERO = `00${repeat('7f', 31)}`;
const S_TWO_LEADING_ZEROS = `0000${repeat('33', 30)}`;
const S_LEADING_ZERO_THEN_HIGH = `0080${repeat('44', 30)}`;
const ONE = `${repeat('00', 31)}01`;
const ZERO = repeat('00', 32);

const conversions: readonly ConversionCase[] = [
  { name: 'r and s without high bit: 32-byte INTEGERs', r: R_PLAIN, s: S_PLAIN, der: derSeq(derInt(R_PLAIN) + derInt(S_PLAIN)) },
  { name: 'r with high bit set gets a 0x00 pad', r: R_HIGH, s: S_PLAIN, der: derSeq(derInt(`00${R_HIGH}`) + derInt(S_PLAIN)) },
  { name: 's with high bit set gets a 0x00 pad', r: R_PLAIN, s: S_HIGH, der: derSeq(derInt(R_PLAIN) + derInt(`00${S_HIGH}`)) },
  { name: 'r and s both with high bit set (70-byte signature)', r: R_HIGH, s: S_HIGH, der: derSeq(derInt(`00${R_HIGH}`) + derInt(`00${S_HIGH}`)) },
  { name: 'r with a leading zero byte is shortened to 31 bytes', r: R_LEADING_ZERO, s: S_PLAIN, der: derSeq(derInt(repeat('7f', 31)) + derInt(S_PLAIN)) },
  { name: 's with two leading zero bytes is shortened to 30 bytes', r: R_PLAIN, s: S_TWO_LEADING_ZEROS, der: derSeq(derInt(R_PLAIN) + derInt(repeat('33', 30))) },
  { name: 's with a leading zero then a high bit keeps one 0x00 pad', r: R_HIGH, s: S_LEADING_ZERO_THEN_HIGH, der: derSeq(derInt(`00${R_HIGH}`) + derInt(S_LEADING_ZERO_THEN_HIGH)) },
  { name: 'r = 1 and s = 1 are one-byte INTEGERs', r: ONE, s: ONE, der: '3006020101020101' },
  { name: 'r = 0 encodes as a single zero byte', r: ZERO, s: ONE, der: '3006020100020101' },
];

for (const c of conversions) {
  test(`ecdsa: raw → DER → raw, ${c.name}`, () => {
    const raw = hex(c.r + c.s);
    const der = rawSignatureToDer(raw);
    assert.equal(der.toString('hex'), c.der);
    assert.deepEqual(derSignatureToRaw(der), raw);
    assert.deepEqual(derSignatureToRaw(hex(c.der)), raw);
  });
}

const { privateKey: P256_PRIVATE, publicKey: P256_PUBLIC } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const { publicKey: OTHER_P256_PUBLIC } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const P256_SPKI = P256_PUBLIC.export({ type: 'spki', format: 'der' });
const MESSAGE = Buffer.from('agent-gateway-permission-v1\npermission_id=perm-1', 'utf8');

test('ecdsa: OpenSSL DER signatures convert to raw and back byte for byte, including r or s with a high bit or a leading zero byte', () => {
  let highBit = 0;
  let short = 0;
  // A leading zero byte in r or s happens about once in 128 signatures: sign until both shapes were seen.
  for (let i = 0; i < 5000 && (i < 100 || highBit === 0 || short === 0); i++) {
    const message = randomBytes(32);
    const der = cryptoSign('sha256', message, { key: P256_PRIVATE, dsaEncoding: 'der' });
    const raw = derSignatureToRaw(der);
    assert.equal(raw.length, 64);
    assert.ok(cryptoVerify('sha256', message, { key: P256_PUBLIC, dsaEncoding: 'ieee-p1363' }, raw));
    assert.deepEqual(rawSignatureToDer(raw), der);
    if ((raw[0]! & 0x80) !== 0 || (raw[32]! & 0x80) !== 0) highBit++;
    if (raw[0] === 0 || raw[32] === 0) short++;
  }
  assert.ok(highBit > 0, 'expected some r or s with the high bit set');
  assert.ok(short > 0, 'expected some signatures with a leading zero byte in r or s');
});

test('ecdsa: raw PKCS#11-style signatures convert to DER that OpenSSL verifies (100 signatures)', () => {
  for (let i = 0; i < 100; i++) {
    const message = randomBytes(32);
    const raw = cryptoSign('sha256', message, { key: P256_PRIVATE, dsaEncoding: 'ieee-p1363' });
    const der = rawSignatureToDer(raw);
    assert.ok(cryptoVerify('sha256', message, { key: P256_PUBLIC, dsaEncoding: 'der' }, der));
    assert.ok(verifyP256Signature(P256_PUBLIC, message, der));
  }
});

for (const length of [0, 32, 63, 65, 72, 128]) {
  test(`ecdsa: rawSignatureToDer refuses a ${length}-byte raw signature`, () => {
    assert.throws(() => rawSignatureToDer(new Uint8Array(length)), isKeyMaterialError);
  });
}

const GOOD_R = derInt(R_PLAIN);
const GOOD_S = derInt(S_PLAIN);
const GOOD = derSeq(GOOD_R + GOOD_S);

const badDer: readonly { readonly name: string; readonly der: string }[] = [
  { name: 'empty', der: '' },
  { name: 'only the SEQUENCE tag', der: '30' },
  { name: 'empty SEQUENCE', der: '3000' },
  { name: 'SET instead of SEQUENCE', der: `31${GOOD.slice(2)}` },
  { name: 'constructed context tag instead of SEQUENCE', der: `a0${GOOD.slice(2)}` },
  { name: 'BIT STRING instead of INTEGER for r', der: derSeq(`03${GOOD_R.slice(2)}${GOOD_S}`) },
  { name: 'OCTET STRING instead of INTEGER for s', der: derSeq(`${GOOD_R}04${GOOD_S.slice(2)}`) },
  { name: 'trailing byte after the SEQUENCE', der: `${GOOD}00` },
  { name: 'a second SEQUENCE after the first', der: GOOD + GOOD },
  { name: 'leading byte before the SEQUENCE', der: `00${GOOD}` },
  { name: 'SEQUENCE length longer than the content', der: `3045${GOOD.slice(4)}` },
  { name: 'SEQUENCE length shorter than the content', der: `3043${GOOD.slice(4)}` },
  { name: 'non-minimal long-form SEQUENCE length 0x81 0x44', der: `308144${GOOD.slice(4)}` },
  { name: 'two-byte long-form SEQUENCE length 0x82', der: `30820044${GOOD.slice(4)}` },
  { name: 'indefinite SEQUENCE length', der: `3080${GOOD.slice(4)}0000` },
  { name: 'non-minimal long-form INTEGER length', der: derSeq(`028120${R_PLAIN}${GOOD_S}`) },
  { name: 'r with an unnecessary 0x00 pad', der: derSeq(derInt(`00${R_PLAIN}`) + GOOD_S) },
  { name: 's with two leading 0x00 bytes before a high bit', der: derSeq(GOOD_R + derInt(`0000${S_HIGH}`)) },
  { name: 'r negative (high bit without pad)', der: derSeq(derInt(R_HIGH) + GOOD_S) },
  { name: 's negative (0xff…)', der: derSeq(GOOD_R + derInt(S_HIGH)) },
  { name: 'zero-length r', der: derSeq(`0200${GOOD_S}`) },
  { name: 'zero-length s', der: derSeq(`${GOOD_R}0200`) },
  { name: 'r of 33 bytes without a pad (larger than the curve)', der: derSeq(derInt(`01${R_PLAIN}`) + GOOD_S) },
  { name: 'r of 34 bytes', der: derSeq(derInt(`0080${repeat('11', 32)}`) + GOOD_S) },
  { name: 'only r', der: derSeq(GOOD_R) },
  { name: 'three INTEGERs', der: derSeq(GOOD_R + GOOD_S + derInt('01')) },
  { name: 'junk after s inside the SEQUENCE', der: derSeq(`${GOOD_R}${GOOD_S}0500`) },
  { name: 'r length running past the end', der: `3010022011${repeat('11', 13)}` },
  { name: 'truncated in the middle of s', der: GOOD.slice(0, GOOD.length - 10) },
  { name: 'raw r||s instead of DER', der: R_PLAIN + S_PLAIN },
];

for (const c of badDer) {
  test(`ecdsa: derSignatureToRaw refuses ${c.name}`, () => {
    assert.throws(() => derSignatureToRaw(hex(c.der)), isKeyMaterialError);
  });
}

test('ecdsa: verifyP256Signature accepts a real signature and rejects a changed message', () => {
  const der = cryptoSign('sha256', MESSAGE, { key: P256_PRIVATE, dsaEncoding: 'der' });
  assert.equal(verifyP256Signature(P256_PUBLIC, MESSAGE, der), true);
  assert.equal(verifyP256Signature(P256_PUBLIC, Buffer.concat([MESSAGE, Buffer.from('\n')]), der), false);
  assert.equal(verifyP256Signature(P256_PUBLIC, MESSAGE.subarray(1), der), false);
  assert.equal(verifyP256Signature(OTHER_P256_PUBLIC, MESSAGE, der), false);
});

function reencodeNonMinimal(der: Buffer): Buffer {
  // Same signature value, long-form SEQUENCE length: OpenSSL itself rejects this; so must we.
  return Buffer.concat([Buffer.from([0x30, 0x81, der[1]!]), der.subarray(2)]);
}

const garbageSignatures: readonly { readonly name: string; readonly signature: (good: Buffer) => Uint8Array }[] = [
  { name: 'empty', signature: () => new Uint8Array(0) },
  { name: 'one zero byte', signature: () => new Uint8Array(1) },
  { name: '70 random bytes', signature: () => randomBytes(70) },
  { name: 'the raw r||s form of a valid signature', signature: (good) => derSignatureToRaw(good) },
  { name: 'a valid signature with a trailing byte', signature: (good) => Buffer.concat([good, Buffer.from([0])]) },
  { name: 'a valid signature truncated by one byte', signature: (good) => good.subarray(0, good.length - 1) },
  { name: 'a valid signature truncated to 8 bytes', signature: (good) => good.subarray(0, 8) },
  { name: 'a valid signature with a non-minimal length', signature: (good) => reencodeNonMinimal(good) },
  { name: 'a valid signature with one bit flipped in s', signature: (good) => { const b = Buffer.from(good); b[b.length - 1]! ^= 1; return b; } },
  { name: 'r = 0, s = 0', signature: () => hex('3006020100020100') },
  { name: 'r = 1, s = 1', signature: () => hex('3006020101020101') },
  { name: 'r and s of all ones bits (above the group order)', signature: () => rawSignatureToDer(hex(repeat('ff', 64))) },
  { name: 'a signature over SHA-384 of the message', signature: () => cryptoSign('sha384', MESSAGE, { key: P256_PRIVATE, dsaEncoding: 'der' }) },
];

for (const c of garbageSignatures) {
  test(`ecdsa: verifyP256Signature returns false, never throws, for ${c.name}`, () => {
    const good = cryptoSign('sha256', MESSAGE, { key: P256_PRIVATE, dsaEncoding: 'der' });
    let result: boolean | undefined;
    assert.doesNotThrow(() => {
      result = verifyP256Signature(P256_PUBLIC, MESSAGE, c.signature(good));
    });
    assert.equal(result, false);
  });
}

const { publicKey: RSA_PUBLIC } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const { publicKey: ED25519_PUBLIC } = generateKeyPairSync('ed25519');
const { publicKey: ED448_PUBLIC } = generateKeyPairSync('ed448');
const { publicKey: X25519_PUBLIC } = generateKeyPairSync('x25519');
const { publicKey: P384_PUBLIC } = generateKeyPairSync('ec', { namedCurve: 'P-384' });
const { publicKey: P521_PUBLIC } = generateKeyPairSync('ec', { namedCurve: 'P-521' });
const { publicKey: SECP256K1_PUBLIC } = generateKeyPairSync('ec', { namedCurve: 'secp256k1' });

test('ecdsa: verifyP256Signature returns false, never throws, when handed a key that is not P-256', () => {
  const good = cryptoSign('sha256', MESSAGE, { key: P256_PRIVATE, dsaEncoding: 'der' });
  for (const key of [RSA_PUBLIC, ED25519_PUBLIC, P384_PUBLIC, SECP256K1_PUBLIC]) {
    assert.equal(verifyP256Signature(key, MESSAGE, good), false);
  }
});

test('ecdsa: p256PublicKeyFromSpki accepts a P-256 SubjectPublicKeyInfo', () => {
  const key = p256PublicKeyFromSpki(P256_SPKI);
  assert.equal(key.type, 'public');
  assert.equal(key.asymmetricKeyType, 'ec');
  assert.equal(key.asymmetricKeyDetails?.namedCurve, 'prime256v1');
  assert.ok(key.equals(P256_PUBLIC));
  assert.ok(P256_SPKI.subarray(0, P256_SPKI_PREFIX.length).equals(P256_SPKI_PREFIX));
  // Accepts a plain Uint8Array as well as a Buffer.
  assert.ok(p256PublicKeyFromSpki(new Uint8Array(P256_SPKI)).equals(P256_PUBLIC));
});

const spki = (key: KeyObject): Buffer => key.export({ type: 'spki', format: 'der' });

const notP256: readonly { readonly name: string; readonly der: () => Uint8Array }[] = [
  { name: 'an RSA key', der: () => spki(RSA_PUBLIC) },
  { name: 'an Ed25519 key', der: () => spki(ED25519_PUBLIC) },
  { name: 'an Ed448 key', der: () => spki(ED448_PUBLIC) },
  { name: 'an X25519 key', der: () => spki(X25519_PUBLIC) },
  { name: 'a P-384 key', der: () => spki(P384_PUBLIC) },
  { name: 'a P-521 key', der: () => spki(P521_PUBLIC) },
  { name: 'a secp256k1 key (same size, other curve)', der: () => spki(SECP256K1_PUBLIC) },
  { name: 'an empty buffer', der: () => new Uint8Array(0) },
  { name: 'random bytes', der: () => randomBytes(91) },
  { name: 'a truncated P-256 SPKI', der: () => P256_SPKI.subarray(0, P256_SPKI.length - 1) },
  { name: 'a P-256 private key in PKCS#8', der: () => P256_PRIVATE.export({ type: 'pkcs8', format: 'der' }) },
  { name: 'the bare uncompressed point', der: () => P256_SPKI.subarray(P256_SPKI_PREFIX.length) },
  { name: 'a P-256 SPKI whose point is not on the curve', der: () => { const b = Buffer.from(P256_SPKI); b[b.length - 1]! ^= 1; return b; } },
];

for (const c of notP256) {
  test(`ecdsa: p256PublicKeyFromSpki refuses ${c.name}`, () => {
    assert.throws(() => p256PublicKeyFromSpki(c.der()), isKeyMaterialError);
  });
}

function uncompressedPoint(key: KeyObject): Buffer {
  const jwk = key.export({ format: 'jwk' });
  return Buffer.concat([Buffer.from([0x04]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]);
}

test('ecdsa: p256SpkiFromPoint gives exactly the SPKI DER OpenSSL exports for the key', () => {
  const point = uncompressedPoint(P256_PUBLIC);
  assert.equal(point.length, 65);
  const der = p256SpkiFromPoint(point);
  assert.deepEqual(der, P256_SPKI);
  assert.deepEqual(der, Buffer.concat([P256_SPKI_PREFIX, point]));
  assert.ok(p256PublicKeyFromSpki(der).equals(P256_PUBLIC));
  assert.deepEqual(p256SpkiFromPoint(new Uint8Array(point)), P256_SPKI);
});

const badPoints: readonly { readonly name: string; readonly point: () => Uint8Array }[] = [
  { name: 'an empty point', point: () => new Uint8Array(0) },
  { name: 'X‖Y without the 0x04 prefix (64 bytes)', point: () => uncompressedPoint(P256_PUBLIC).subarray(1) },
  { name: 'a compressed point (33 bytes)', point: () => { const p = uncompressedPoint(P256_PUBLIC); return Buffer.concat([Buffer.from([0x02 | (p[64]! & 1)]), p.subarray(1, 33)]); } },
  { name: '65 bytes with a 0x02 prefix', point: () => Buffer.concat([Buffer.from([0x02]), uncompressedPoint(P256_PUBLIC).subarray(1)]) },
  { name: '66 bytes', point: () => Buffer.concat([uncompressedPoint(P256_PUBLIC), Buffer.from([0])]) },
  { name: 'a point not on the curve', point: () => { const p = uncompressedPoint(P256_PUBLIC); p[64]! ^= 1; return p; } },
  { name: 'the all-zero point', point: () => Buffer.concat([Buffer.from([0x04]), Buffer.alloc(64)]) },
  { name: 'a P-384 point', point: () => uncompressedPoint(P384_PUBLIC) },
];

for (const c of badPoints) {
  test(`ecdsa: p256SpkiFromPoint refuses ${c.name}`, () => {
    assert.throws(() => p256SpkiFromPoint(c.point()), isKeyMaterialError);
  });
}

test('ecdsa: spkiFingerprint is sha256: plus the hex digest of the SPKI DER', () => {
  assert.equal(spkiFingerprint(P256_SPKI), `sha256:${createHash('sha256').update(P256_SPKI).digest('hex')}`);
  assert.match(spkiFingerprint(P256_SPKI), /^sha256:[0-9a-f]{64}$/);
});

test('ecdsa: the algorithm name matches the schema check constraint', () => {
  assert.equal(SIGNATURE_ALGORITHM, 'ecdsa-p256-sha256');
});
