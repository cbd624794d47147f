import { createHash } from 'node:crypto';

/**
 * TPM 2.0 structures marshalled by hand (TCG TPM 2.0 Part 2), for forging attestation evidence in
 * tests: whatever attributes and contents a forger likes, byte-exact as a TPM would write them.
 */

export function u16(value: number): Buffer {
  const buffer = Buffer.alloc(2);
  buffer.writeUInt16BE(value);
  return buffer;
}

/** A TPM2B: 16-bit size, then the bytes. */
export const sized = (data: Buffer) => Buffer.concat([u16(data.length), data]);

/** Object attributes of what tpm2_createak makes: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign. */
export const AK_ATTRIBUTES = 0x00050072;
/** Object attributes of a tpm2-pkcs11 key: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|sign|decrypt. */
export const TOKEN_KEY_ATTRIBUTES = 0x00060072;

/** A TPM2B_PUBLIC for a P-256 point (JWK x, y), SHA-256 name algorithm, ECDSA-SHA256 or no scheme. */
export function eccPublic(jwk: { x?: string; y?: string }, attributes: number, options: { ecdsa?: boolean; authPolicy?: Buffer } = {}): Buffer {
  const attr = Buffer.alloc(4);
  attr.writeUInt32BE(attributes);
  const area = Buffer.concat([
    u16(0x0023), u16(0x000b), attr, sized(options.authPolicy ?? Buffer.alloc(0)), u16(0x0010),
    ...(options.ecdsa ? [u16(0x0018), u16(0x000b)] : [u16(0x0010)]),
    u16(0x0003), u16(0x0010), sized(Buffer.from(jwk.x!, 'base64url')), sized(Buffer.from(jwk.y!, 'base64url')),
  ]);
  return sized(area);
}

/** The TPM name of a TPM2B_PUBLIC with a SHA-256 name algorithm. */
export function nameOf(tpm2bPublic: Buffer): Buffer {
  return Buffer.concat([u16(0x000b), createHash('sha256').update(tpm2bPublic.subarray(2)).digest()]);
}

/** TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY naming `certified` (clock and firmware zeroed). */
export function certifyInfo(signerName: Buffer, certifiedName: Buffer, extraData = Buffer.alloc(0)): Buffer {
  return Buffer.concat([Buffer.from('ff5443478017', 'hex'), sized(signerName), sized(extraData), Buffer.alloc(17), Buffer.alloc(8), sized(certifiedName), sized(certifiedName)]);
}

/** TPMT_SIGNATURE (ECDSA, SHA-256) from an IEEE P1363 r‖s. */
export function ecdsaSignature(p1363: Buffer): Buffer {
  return Buffer.concat([u16(0x0018), u16(0x000b), sized(p1363.subarray(0, 32)), sized(p1363.subarray(32))]);
}
