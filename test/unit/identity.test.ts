import { test } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync, X509Certificate as NodeX509Certificate } from 'node:crypto';
import * as x509 from '../../registry/x509.js';
import {
  decodeIdentityExtensionValue,
  encodeIdentityExtensionValue,
  exactSpkiDer,
  isDottedOid,
  MAX_IDENTITY_BYTES,
  readPeerIdentity,
} from '../../registry/identity.js';
import { createCarrierCertificate } from '../../registry/carrier-certificate.js';
import { InvalidIdentityError } from '../../registry/errors.js';

// DESIGN §3 "Identity extension": exactly one DER UTF8String (tag 0x0C) of valid UTF-8,
// 1–255 bytes, nothing after it; anything else is a 403, never a crash.

const OID = '1.3.6.1.4.1.57264.1.1';
const OTHER_OID = '1.3.6.1.4.1.57264.1.2';

const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ''), 'hex');
/** DER UTF8String with the minimal length encoding, for any body up to 255 bytes. */
function utf8String(body: Buffer): Buffer {
  const length = body.length < 0x80 ? [body.length] : [0x81, body.length];
  return Buffer.concat([Buffer.from([0x0c, ...length]), body]);
}

const validValues: readonly { readonly name: string; readonly value: Buffer; readonly identity: string }[] = [
  { name: 'ASCII identity', value: hex('0c0b 6167656e742d616c706861'), identity: 'agent-alpha' },
  { name: 'one-byte identity', value: hex('0c01 61'), identity: 'a' },
  { name: 'identity with a space and punctuation', value: utf8String(Buffer.from('org-alice/agent alpha=1', 'utf8')), identity: 'org-alice/agent alpha=1' },
  { name: 'two-byte UTF-8 (é)', value: hex('0c02 c3a9'), identity: 'é' },
  { name: 'three-byte UTF-8 (例)', value: hex('0c03 e4be8b'), identity: '例' },
  { name: 'four-byte UTF-8 (🦀)', value: hex('0c04 f09fa680'), identity: '🦀' },
  { name: 'mixed multi-byte identity', value: utf8String(Buffer.from('agent-ünï-例-🦀', 'utf8')), identity: 'agent-ünï-例-🦀' },
  { name: 'no-break space (not a control character)', value: hex('0c03 61c2a0'), identity: 'a\u00a0' },
  { name: '127 bytes: longest short-form length', value: utf8String(Buffer.alloc(127, 'a')), identity: 'a'.repeat(127) },
  { name: '128 bytes: shortest 0x81 long-form length', value: Buffer.concat([hex('0c8180'), Buffer.alloc(128, 'b')]), identity: 'b'.repeat(128) },
  { name: 'exactly 255 bytes with the 0x81 long-form length', value: Buffer.concat([hex('0c81ff'), Buffer.alloc(255, 'c')]), identity: 'c'.repeat(255) },
  { name: '255 bytes of three-byte characters', value: utf8String(Buffer.from('例'.repeat(85), 'utf8')), identity: '例'.repeat(85) },
];

for (const c of validValues) {
  test(`identity value: ${c.name} decodes`, () => {
    assert.equal(decodeIdentityExtensionValue(c.value), c.identity);
    assert.equal(decodeIdentityExtensionValue(new Uint8Array(c.value)), c.identity);
    assert.deepEqual(encodeIdentityExtensionValue(c.identity), c.value);
  });
}

const invalidValues: readonly { readonly name: string; readonly value: Buffer }[] = [
  { name: 'empty value', value: Buffer.alloc(0) },
  { name: 'only the tag', value: hex('0c') },
  { name: 'zero-length UTF8String', value: hex('0c00') },
  { name: 'PrintableString (0x13)', value: hex('1303 616263') },
  { name: 'IA5String (0x16)', value: hex('1603 616263') },
  { name: 'BMPString (0x1e)', value: hex('1e04 00610062') },
  { name: 'OCTET STRING (0x04)', value: hex('0403 616263') },
  { name: 'constructed UTF8String (0x2c)', value: hex('2c05 0c03616263') },
  { name: 'SEQUENCE holding a UTF8String', value: hex('3005 0c03616263') },
  { name: 'raw text without DER', value: Buffer.from('agent-alpha', 'utf8') },
  { name: 'trailing byte after the string', value: hex('0c03 616263 00') },
  { name: 'a second UTF8String after the first', value: hex('0c03 616263 0c03 646566') },
  { name: 'truncated: length says 5, 3 bytes follow', value: hex('0c05 616263') },
  { name: 'truncated long form: 0x81 and nothing after', value: hex('0c81') },
  { name: 'truncated long form: 200 bytes announced, 199 present', value: Buffer.concat([hex('0c81c8'), Buffer.alloc(199, 'a')]) },
  { name: 'non-minimal length 0x81 0x05', value: hex('0c8105 6162636465') },
  { name: 'non-minimal length 0x81 0x7f', value: Buffer.concat([hex('0c817f'), Buffer.alloc(127, 'a')]) },
  { name: 'non-minimal length 0x82 0x00 0x05', value: hex('0c820005 6162636465') },
  { name: 'indefinite length', value: hex('0c80 616263 0000') },
  { name: '256 bytes (0x82 0x01 0x00)', value: Buffer.concat([hex('0c820100'), Buffer.alloc(256, 'a')]) },
  { name: '1000 bytes', value: Buffer.concat([hex('0c8203e8'), Buffer.alloc(1000, 'a')]) },
  { name: 'overlong encoding of "/" (c0 af)', value: hex('0c03 61c0af') },
  { name: 'overlong encoding of NUL (c0 80)', value: hex('0c02 c080') },
  { name: 'overlong three-byte encoding (e0 80 af)', value: hex('0c03 e080af') },
  { name: 'lone continuation byte', value: hex('0c02 6180') },
  { name: 'truncated two-byte sequence', value: hex('0c02 61c3') },
  { name: 'truncated four-byte sequence', value: hex('0c04 61f09fa6') },
  { name: 'UTF-8 encoded surrogate (ed a0 80)', value: hex('0c03 eda080') },
  { name: 'code point above U+10FFFF (f4 90 80 80)', value: hex('0c04 f4908080') },
  { name: 'byte 0xff', value: hex('0c02 61ff') },
  { name: 'Latin-1 é (e9) instead of UTF-8', value: hex('0c01 e9') },
  { name: 'newline', value: hex('0c0c 6167656e740a616c706861') },
  { name: 'newline forging a field', value: utf8String(Buffer.from('agent-alpha\ndestination=evil.example:443', 'utf8')) },
  { name: 'carriage return', value: hex('0c03 610d62') },
  { name: 'tab', value: hex('0c03 610962') },
  { name: 'NUL', value: hex('0c03 610062') },
  { name: 'only NUL', value: hex('0c01 00') },
  { name: 'escape (U+001B)', value: hex('0c03 611b62') },
  { name: 'unit separator (U+001F)', value: hex('0c03 611f62') },
  { name: 'DEL (U+007F)', value: hex('0c03 617f62') },
  { name: 'C1 U+0080', value: hex('0c03 61c280') },
  { name: 'C1 next line U+0085', value: hex('0c03 61c285') },
  { name: 'C1 U+009F', value: hex('0c03 61c29f') },
];

for (const c of invalidValues) {
  test(`identity value: ${c.name} is refused with InvalidIdentityError`, () => {
    assert.throws(() => decodeIdentityExtensionValue(c.value), (error: unknown) => {
      assert.ok(error instanceof InvalidIdentityError, `expected InvalidIdentityError, got ${String(error)}`);
      assert.equal(error.code, 'ERR_IDENTITY_INVALID');
      return true;
    });
  });
}

const unencodable: readonly { readonly name: string; readonly identity: string }[] = [
  { name: 'empty identity', identity: '' },
  { name: '256 bytes', identity: 'a'.repeat(256) },
  { name: '86 three-byte characters (258 bytes)', identity: '例'.repeat(86) },
  { name: 'newline', identity: 'agent\nalpha' },
  { name: 'U+0085', identity: 'agent\u0085alpha' },
];

for (const c of unencodable) {
  test(`identity value: encodeIdentityExtensionValue refuses ${c.name}`, () => {
    assert.throws(() => encodeIdentityExtensionValue(c.identity), InvalidIdentityError);
  });
}

test('identity value: MAX_IDENTITY_BYTES is 255', () => {
  assert.equal(MAX_IDENTITY_BYTES, 255);
});

const oids: readonly { readonly oid: string; readonly expected: boolean }[] = [
  { oid: OID, expected: true },
  { oid: '2.5.29.17', expected: true },
  { oid: '1.2', expected: true },
  { oid: '2.999.1', expected: true },
  { oid: '1', expected: false },
  { oid: '', expected: false },
  { oid: '3.1', expected: false },
  { oid: '1.40', expected: false },
  { oid: '1.3.06.1', expected: false },
  { oid: '1.3.6.', expected: false },
  { oid: '.1.3.6', expected: false },
  { oid: '1..3', expected: false },
  { oid: '1.3.6.1 ', expected: false },
  { oid: 'id-ce', expected: false },
];

for (const c of oids) {
  test(`identity: isDottedOid(${JSON.stringify(c.oid)}) is ${c.expected}`, () => {
    assert.equal(isDottedOid(c.oid), c.expected);
  });
}

// readPeerIdentity over real certificates.

const subject = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const SUBJECT_SPKI = subject.publicKey.export({ type: 'spki', format: 'der' });

async function carrier(options: Omit<Parameters<typeof createCarrierCertificate>[0], 'subjectSpkiDer' | 'extensionOid'>): Promise<Buffer> {
  const pem = await createCarrierCertificate({ subjectSpkiDer: SUBJECT_SPKI, extensionOid: OID, ...options });
  return new NodeX509Certificate(pem).raw;
}

test('identity: readPeerIdentity reads the identity and the exact SPKI DER of the key', async () => {
  const der = await carrier({ identity: 'agent-alpha' });
  const peer = readPeerIdentity(der, OID);
  assert.equal(peer.ok, true);
  assert.ok(peer.ok);
  assert.equal(peer.identity, 'agent-alpha');
  assert.deepEqual(peer.spkiDer, SUBJECT_SPKI);
  assert.deepEqual(exactSpkiDer(der), SUBJECT_SPKI);
  // Also what an independent parser says the certificate's key is.
  assert.deepEqual(new NodeX509Certificate(der).publicKey.export({ type: 'spki', format: 'der' }), SUBJECT_SPKI);
});

test('identity: readPeerIdentity accepts a Uint8Array and ignores other extensions', async () => {
  const der = await carrier({
    identity: 'agent-β',
    extraExtensions: [new x509.Extension(OTHER_OID, false, encodeIdentityExtensionValue('someone-else'))],
  });
  const peer = readPeerIdentity(new Uint8Array(der), OID);
  assert.ok(peer.ok);
  assert.equal(peer.identity, 'agent-β');
  assert.deepEqual(peer.spkiDer, SUBJECT_SPKI);
});

test('identity: readPeerIdentity reads a 255-byte identity from a certificate', async () => {
  const identity = 'x'.repeat(255);
  const peer = readPeerIdentity(await carrier({ identity }), OID);
  assert.ok(peer.ok);
  assert.equal(peer.identity, identity);
});

test('identity: the carrier certificate issuer and validity dates are not checked', async () => {
  const der = await carrier({
    identity: 'agent-alpha',
    notBefore: new Date('2001-01-01T00:00:00Z'),
    notAfter: new Date('2002-01-01T00:00:00Z'),
  });
  const peer = readPeerIdentity(der, OID);
  assert.ok(peer.ok);
  assert.equal(peer.identity, 'agent-alpha');
});

const badCertificates: readonly {
  readonly name: string;
  readonly options: Omit<Parameters<typeof createCarrierCertificate>[0], 'subjectSpkiDer' | 'extensionOid'>;
}[] = [
  { name: 'missing extension', options: {} },
  { name: 'extension only at another OID', options: { extraExtensions: [new x509.Extension(OTHER_OID, false, encodeIdentityExtensionValue('agent-alpha'))] } },
  { name: 'extension present twice (same value)', options: { identity: 'agent-alpha', extraExtensions: [new x509.Extension(OID, false, encodeIdentityExtensionValue('agent-alpha'))] } },
  { name: 'extension present twice (different values)', options: { identity: 'agent-alpha', extraExtensions: [new x509.Extension(OID, false, encodeIdentityExtensionValue('agent-admin'))] } },
  { name: 'extension marked critical (DESIGN: a non-critical extension)', options: { extraExtensions: [new x509.Extension(OID, true, encodeIdentityExtensionValue('agent-alpha'))] } },
  { name: 'empty value', options: { rawIdentityValue: new Uint8Array(0) } },
  { name: 'zero-length UTF8String', options: { rawIdentityValue: hex('0c00') } },
  { name: 'PrintableString', options: { rawIdentityValue: hex('130b 6167656e742d616c706861') } },
  { name: 'IA5String', options: { rawIdentityValue: hex('160b 6167656e742d616c706861') } },
  { name: 'trailing bytes', options: { rawIdentityValue: hex('0c0b 6167656e742d616c706861 0000') } },
  { name: 'truncated', options: { rawIdentityValue: hex('0c0c 6167656e742d616c706861') } },
  { name: 'non-minimal length', options: { rawIdentityValue: hex('0c8105 6162636465') } },
  { name: '256 bytes', options: { rawIdentityValue: Buffer.concat([hex('0c820100'), Buffer.alloc(256, 'a')]) } },
  { name: 'invalid UTF-8', options: { rawIdentityValue: hex('0c03 61c0af') } },
  { name: 'newline', options: { rawIdentityValue: utf8String(Buffer.from('agent-alpha\nx', 'utf8')) } },
  { name: 'U+0085', options: { rawIdentityValue: hex('0c03 61c285') } },
];

for (const c of badCertificates) {
  test(`identity: readPeerIdentity denies a certificate with ${c.name}, reporting the SPKI`, async () => {
    const der = await carrier(c.options);
    let peer: ReturnType<typeof readPeerIdentity> | undefined;
    assert.doesNotThrow(() => {
      peer = readPeerIdentity(der, OID);
    });
    assert.ok(peer);
    assert.equal(peer.ok, false);
    assert.ok(!peer.ok && typeof peer.reason === 'string' && peer.reason.length > 0);
    assert.deepEqual(peer.spkiDer, SUBJECT_SPKI);
    assert.equal((peer as { identity?: unknown }).identity, undefined);
  });
}

test('identity: readPeerIdentity with the wrong OID configured denies', async () => {
  const peer = readPeerIdentity(await carrier({ identity: 'agent-alpha' }), OTHER_OID);
  assert.equal(peer.ok, false);
});

const notCertificates: readonly { readonly name: string; readonly der: () => Promise<Uint8Array | undefined> }[] = [
  { name: 'undefined certificate', der: async () => undefined },
  { name: 'empty certificate', der: async () => new Uint8Array(0) },
  { name: 'garbage bytes', der: async () => Buffer.from('this is not a certificate') },
  { name: 'a lone SEQUENCE header', der: async () => hex('3082') },
  { name: 'an empty SEQUENCE', der: async () => hex('3000') },
  { name: 'the SPKI instead of a certificate', der: async () => SUBJECT_SPKI },
  { name: 'PEM text instead of DER', der: async () => Buffer.from(new NodeX509Certificate(await carrier({ identity: 'agent-alpha' })).toString(), 'utf8') },
  { name: 'a certificate with a trailing byte', der: async () => Buffer.concat([await carrier({ identity: 'agent-alpha' }), Buffer.from([0])]) },
  { name: 'a truncated certificate', der: async () => { const der = await carrier({ identity: 'agent-alpha' }); return der.subarray(0, der.length - 20); } },
];

for (const c of notCertificates) {
  test(`identity: readPeerIdentity denies ${c.name} without throwing`, async () => {
    const der = await c.der();
    let peer: ReturnType<typeof readPeerIdentity> | undefined;
    assert.doesNotThrow(() => {
      peer = readPeerIdentity(der, OID);
    });
    assert.ok(peer);
    assert.equal(peer.ok, false);
  });
}
