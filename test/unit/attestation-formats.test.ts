import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { describe, test } from 'node:test';
import { EVIDENCE_REQUEST_FORMAT, parseCertifyInfo, parseEccPublic, parseEvidenceRequest } from '../../registry/attestation.js';
import { certificateDer, parseTss2PrivateKey } from '../../tpm/attestation.js';

/**
 * The parsers that read what another machine or a subprocess wrote, without a TPM: every
 * malformed input is a catalogued refusal, never a crash or a silent truncation. Real artefacts
 * are exercised in test/tpm/attestation.test.ts.
 */

const u16 = (value: number) => Buffer.from([value >> 8, value & 0xff]);
const sized = (data: Buffer) => Buffer.concat([u16(data.length), data]);

function eccPublic(attributes = 0x00060072): Buffer {
  const jwk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ format: 'jwk' });
  const attr = Buffer.alloc(4);
  attr.writeUInt32BE(attributes);
  return sized(Buffer.concat([u16(0x23), u16(0x0b), attr, sized(Buffer.alloc(0)), u16(0x10), u16(0x10), u16(0x03), u16(0x10), sized(Buffer.from(jwk.x!, 'base64url')), sized(Buffer.from(jwk.y!, 'base64url'))]));
}

describe('attestation formats', () => {
  test('a TPM2B_PUBLIC parses to its SPKI and name; every other shape is ERR_REFUSED_ATTESTATION_MALFORMED', () => {
    const good = eccPublic();
    const parsed = parseEccPublic(good, 'key');
    assert.equal(parsed.name.length, 34);
    assert.equal(parsed.spkiDer.length, 91);
    const rsa = Buffer.from(good);
    rsa[3] = 0x01;
    const sha1 = Buffer.from(good);
    sha1[5] = 0x04;
    const offCurve = Buffer.from(good);
    offCurve[offCurve.length - 1] = offCurve[offCurve.length - 1]! ^ 0x01;
    for (const [name, input] of [
      ['empty', Buffer.alloc(0)],
      ['size says more than there is', Buffer.concat([u16(0xffff), good.subarray(2)])],
      ['trailing byte', Buffer.concat([good, Buffer.from([0])])],
      ['RSA', rsa],
      ['SHA-1 name algorithm', sha1],
      ['point off the curve', offCurve],
    ] as const) {
      assert.throws(() => parseEccPublic(input, 'key'), { code: 'ERR_REFUSED_ATTESTATION_MALFORMED' }, name);
    }
  });

  test('only the parameters of a signing key are read: a symmetric algorithm, another scheme or a KDF is refused, never misread', () => {
    const jwk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ format: 'jwk' });
    const point = [sized(Buffer.from(jwk.x!, 'base64url')), sized(Buffer.from(jwk.y!, 'base64url'))];
    const area = (...parameters: Buffer[]) => sized(Buffer.concat([u16(0x23), u16(0x0b), Buffer.from('00060072', 'hex'), sized(Buffer.alloc(0)), ...parameters, ...point]));
    // Accepted: no scheme, or ECDSA with its hash (what tpm2-pkcs11 and tpm2_createak make).
    parseEccPublic(area(u16(0x10), u16(0x10), u16(0x03), u16(0x10)), 'key');
    parseEccPublic(area(u16(0x10), u16(0x18), u16(0x0b), u16(0x03), u16(0x10)), 'key');
    for (const [name, input] of [
      // A TPM reads ECDAA's count (here 3) after its hash; a parser that does not reads the count as the curve.
      ['ECDAA scheme', area(u16(0x10), u16(0x1a), u16(0x0b), u16(0x03), u16(0x03), u16(0x10))],
      ['Schnorr scheme', area(u16(0x10), u16(0x1c), u16(0x0b), u16(0x03), u16(0x10))],
      ['ECDH scheme', area(u16(0x10), u16(0x19), u16(0x0b), u16(0x03), u16(0x10))],
      ['AES-128-CFB symmetric (a storage key)', area(u16(0x06), u16(0x80), u16(0x43), u16(0x10), u16(0x03), u16(0x10))],
      ['KDF1 SP800-108', area(u16(0x10), u16(0x10), u16(0x03), u16(0x22), u16(0x0b))],
    ] as const) {
      assert.throws(() => parseEccPublic(input, 'key'), { code: 'ERR_REFUSED_ATTESTATION_MALFORMED' }, name);
    }
  });

  test('TPMS_ATTEST: only a TPM-generated CERTIFY with nothing after it', () => {
    const name = sized(Buffer.alloc(34, 1));
    const certify = Buffer.concat([Buffer.from('ff5443478017', 'hex'), name, sized(Buffer.alloc(0)), Buffer.alloc(25), name, name]);
    assert.deepEqual(parseCertifyInfo(certify).certifiedName, Buffer.alloc(34, 1));
    const quote = Buffer.from(certify);
    quote[5] = 0x18;
    for (const input of [quote, certify.subarray(0, certify.length - 1), Buffer.concat([certify, Buffer.from([0])]), Buffer.from('00544347', 'hex')]) {
      assert.throws(() => parseCertifyInfo(input), { code: 'ERR_REFUSED_ATTESTATION_MALFORMED' });
    }
  });

  test('evidence JSON: the format, canonical base64 and bounded fields are required', () => {
    const field = Buffer.from('abc').toString('base64');
    const good = { format: EVIDENCE_REQUEST_FORMAT, ek_certificate: field, ak_public: field, key_public: field, certify_info: field, certify_signature: field };
    assert.deepEqual(parseEvidenceRequest(JSON.stringify(good)).akPublic, Buffer.from('abc'));
    for (const input of [
      'not json',
      '[]',
      JSON.stringify({ ...good, format: 'other' }),
      JSON.stringify({ ...good, ak_public: undefined }),
      JSON.stringify({ ...good, ak_public: 'YWJj\n' }),
      JSON.stringify({ ...good, ak_public: 'YWJjZA' }),
      JSON.stringify({ ...good, ak_public: 42 }),
      JSON.stringify({ ...good, ak_public: Buffer.alloc(9000).toString('base64') }),
    ]) {
      assert.throws(() => parseEvidenceRequest(input), { code: 'ERR_REFUSED_ATTESTATION_MALFORMED' }, input.slice(0, 60));
    }
  });

  test('an EK certificate padded in its NV index is cut to its DER; non-DER is left for the verifier to refuse', () => {
    const der = Buffer.from([0x30, 0x03, 0x02, 0x01, 0x05]);
    assert.deepEqual(certificateDer(Buffer.concat([der, Buffer.alloc(20, 0xff)])), der);
    assert.deepEqual(certificateDer(Buffer.from([0xff, 0xff])), Buffer.from([0xff, 0xff]));
    assert.deepEqual(certificateDer(Buffer.from([0x30, 0x84, 0xff, 0xff, 0xff, 0xff])), Buffer.from([0x30, 0x84, 0xff, 0xff, 0xff, 0xff]));
  });

  test('a TSS2 PRIVATE KEY gives its parent and blobs; anything else is ERR_TPM_ATTESTATION', () => {
    const pem = (der: Buffer) => `-----BEGIN TSS2 PRIVATE KEY-----\n${der.toString('base64')}\n-----END TSS2 PRIVATE KEY-----\n`;
    const body = Buffer.concat([Buffer.from('0606678105' + '0a0103', 'hex'), Buffer.from('a003010100', 'hex'), Buffer.from('020500810000' + '01', 'hex'), Buffer.from('040201020403030405', 'hex')]);
    const der = Buffer.concat([Buffer.from([0x30, body.length]), body]);
    assert.deepEqual(parseTss2PrivateKey(pem(der)), { parent: 0x81000001, publicBlob: Buffer.from([1, 2]), privateBlob: Buffer.from([3, 4, 5]) });
    for (const input of ['', pem(Buffer.from([0x30, 0x7f, 0x02])), pem(Buffer.from([0x30, 0x02, 0x04, 0x00]))]) {
      assert.throws(() => parseTss2PrivateKey(input), { code: 'ERR_TPM_ATTESTATION' });
    }
  });
});
