import { createPublicKey, createHash, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { InvalidKeyMaterialError } from './errors.js';

export const SIGNATURE_ALGORITHM = 'ecdsa-p256-sha256';
const P256_COORDINATE_BYTES = 32;
/** The fixed DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point. */
export const P256_SPKI_PREFIX = Buffer.from('3059301306072a8648ce3d020106082a8648ce3d030107034200', 'hex');

/** Parses SPKI DER into a P-256 public key, refusing any other algorithm or curve. */
export function p256PublicKeyFromSpki(spkiDer: Uint8Array): KeyObject {
  let key: KeyObject;
  try {
    key = createPublicKey({ key: Buffer.from(spkiDer), format: 'der', type: 'spki' });
  } catch (error) {
    throw new InvalidKeyMaterialError('public key is not a valid SubjectPublicKeyInfo', { cause: error });
  }
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new InvalidKeyMaterialError('public key is not ECDSA P-256');
  }
  // One encoding per key: registry rows are compared byte for byte, so trailing bytes or a
  // compressed point would make the same key look like two.
  if (!key.export({ type: 'spki', format: 'der' }).equals(Buffer.from(spkiDer))) {
    throw new InvalidKeyMaterialError('public key is not canonical DER SubjectPublicKeyInfo with an uncompressed point');
  }
  return key;
}

/** SPKI DER from an uncompressed P-256 point (`04‖X‖Y`), as PKCS#11 CKA_EC_POINT holds it. */
export function p256SpkiFromPoint(point: Uint8Array): Buffer {
  if (point.length !== 1 + 2 * P256_COORDINATE_BYTES || point[0] !== 0x04) {
    throw new InvalidKeyMaterialError('expected an uncompressed P-256 point of 65 bytes');
  }
  const spki = Buffer.concat([P256_SPKI_PREFIX, point]);
  p256PublicKeyFromSpki(spki); // the point must lie on the curve
  return spki;
}

function derLength(length: number): Buffer {
  return length < 0x80 ? Buffer.from([length]) : Buffer.from([0x81, length]);
}

function derInteger(unsigned: Uint8Array): Buffer {
  let start = 0;
  while (start < unsigned.length - 1 && unsigned[start] === 0) start++;
  let body = Buffer.from(unsigned.subarray(start));
  if ((body[0] ?? 0) & 0x80) body = Buffer.concat([Buffer.from([0]), body]);
  return Buffer.concat([Buffer.from([0x02]), derLength(body.length), body]);
}

/** Converts a raw `r‖s` ECDSA signature (PKCS#11, WebCrypto) to ASN.1 DER ECDSA-Sig-Value. */
export function rawSignatureToDer(raw: Uint8Array): Buffer {
  if (raw.length !== 2 * P256_COORDINATE_BYTES) throw new InvalidKeyMaterialError('raw P-256 signature must be 64 bytes');
  const body = Buffer.concat([derInteger(raw.subarray(0, 32)), derInteger(raw.subarray(32))]);
  return Buffer.concat([Buffer.from([0x30]), derLength(body.length), body]);
}

/** Converts an ASN.1 DER ECDSA-Sig-Value to raw `r‖s`; refuses non-minimal or trailing encodings. */
export function derSignatureToRaw(der: Uint8Array): Buffer {
  const bad = (): never => {
    throw new InvalidKeyMaterialError('signature is not a DER ECDSA-Sig-Value');
  };
  const buf = Buffer.from(der);
  let offset = 0;
  const readLength = (): number => {
    const first = buf[offset++] ?? bad();
    if (first < 0x80) return first;
    if (first !== 0x81) bad();
    const value = buf[offset++] ?? bad();
    if (value < 0x80) bad();
    return value;
  };
  if (buf[offset++] !== 0x30) bad();
  const seqLength = readLength();
  if (offset + seqLength !== buf.length) bad();
  const parts: Buffer[] = [];
  for (let i = 0; i < 2; i++) {
    if (buf[offset++] !== 0x02) bad();
    const length = readLength();
    const value = buf.subarray(offset, offset + length);
    offset += length;
    if (value.length !== length || length === 0 || length > 33) bad();
    if ((value[0] ?? 0) & 0x80) bad(); // negative
    if (length > 1 && value[0] === 0 && !((value[1] ?? 0) & 0x80)) bad(); // non-minimal
    const unsigned = value[0] === 0 && length > 1 ? value.subarray(1) : value;
    if (unsigned.length > 32) bad();
    parts.push(Buffer.concat([Buffer.alloc(32 - unsigned.length), unsigned]));
  }
  if (offset !== buf.length) bad();
  return Buffer.concat(parts);
}

/**
 * Verifies a DER ECDSA P-256 signature over SHA-256 of `message`. Returns false for any signature
 * that does not verify, including malformed DER; never throws for bad signatures.
 */
export function verifyP256Signature(publicKey: KeyObject, message: Uint8Array, derSignature: Uint8Array): boolean {
  try {
    derSignatureToRaw(derSignature); // strict DER: one encoding per signature
    return cryptoVerify('sha256', message, { key: publicKey, dsaEncoding: 'der' }, derSignature);
  } catch {
    return false;
  }
}

export function sha256(data: Uint8Array | string): Buffer {
  return createHash('sha256').update(data).digest();
}

/** `sha256:` + hex of the SPKI DER: how logs and the CLI name a key without printing it. */
export function spkiFingerprint(spkiDer: Uint8Array): string {
  return `sha256:${sha256(spkiDer).toString('hex')}`;
}
