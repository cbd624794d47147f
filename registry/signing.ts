import { randomUUID, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { normaliseAuthority } from './destination.js';
import { p256PublicKeyFromSpki, verifyP256Signature } from './ecdsa.js';
import { InvalidPermissionFieldError } from './errors.js';
import { canonicalPermissionBytes, type PermissionFields } from './permission.js';
import { formatTimestampMicros, parseTimestampMicros, type CanonicalTimestamp } from './timestamp.js';

/** Something that signs with a principal's P-256 key and returns a DER ECDSA signature. */
export interface PermissionSigner {
  readonly keyId: string;
  readonly publicKeySpkiDer: Buffer;
  sign(message: Buffer): Promise<Buffer>;
}

/** A signer over a software key (tests and tooling; principals use tpm/ instead). */
export function softwareSigner(keyId: string, privateKey: KeyObject, publicKeySpkiDer: Buffer): PermissionSigner {
  return {
    keyId,
    publicKeySpkiDer,
    sign: async (message) => cryptoSign('sha256', message, { key: privateKey, dsaEncoding: 'der' }),
  };
}

export interface PermissionDraft {
  readonly permissionId?: string;
  readonly subjectIdentity: string;
  readonly subjectPublicKeySpkiDer: Uint8Array;
  /** Any accepted authority; normalised here. */
  readonly destination: string;
  /** RFC 3339; defaults to now. */
  readonly notBefore?: string;
  /** RFC 3339; defaults to notBefore + 30 days. */
  readonly notAfter?: string;
}

export interface SignedPermission {
  readonly fields: PermissionFields;
  readonly signature: Buffer;
}

export const DEFAULT_PERMISSION_LIFETIME_MS = 30 * 24 * 3600 * 1000;

export function newPermissionId(): string {
  return `perm-${randomUUID()}`;
}

/** Fills defaults and normalises a draft into the exact fields that will be signed and stored. */
export function permissionFields(draft: PermissionDraft, signingKeyId: string, now: Date = new Date()): PermissionFields {
  const notBeforeMicros = draft.notBefore === undefined ? BigInt(now.getTime()) * 1000n : parseTimestampMicros(draft.notBefore);
  const notAfterMicros = draft.notAfter === undefined ? notBeforeMicros + BigInt(DEFAULT_PERMISSION_LIFETIME_MS) * 1000n : parseTimestampMicros(draft.notAfter);
  if (notAfterMicros <= notBeforeMicros) throw new InvalidPermissionFieldError('not_after must be after not_before');
  p256PublicKeyFromSpki(draft.subjectPublicKeySpkiDer);
  return {
    permissionId: draft.permissionId ?? newPermissionId(),
    signingKeyId,
    subjectIdentity: draft.subjectIdentity,
    subjectPublicKeySpkiDer: Buffer.from(draft.subjectPublicKeySpkiDer),
    destination: normaliseAuthority(draft.destination),
    notBefore: formatTimestampMicros(notBeforeMicros) as CanonicalTimestamp,
    notAfter: formatTimestampMicros(notAfterMicros) as CanonicalTimestamp,
  };
}

/**
 * Signs permission fields and checks the signature against the signer's public key before
 * returning it, so a broken signer (or a TPM returning garbage) never writes an unusable row.
 */
export async function signPermission(fields: PermissionFields, signer: PermissionSigner): Promise<SignedPermission> {
  if (fields.signingKeyId !== signer.keyId) throw new InvalidPermissionFieldError('signing_key_id does not match the signer');
  const message = canonicalPermissionBytes(fields);
  const signature = await signer.sign(message);
  if (!verifyP256Signature(p256PublicKeyFromSpki(signer.publicKeySpkiDer), message, signature)) {
    throw new InvalidPermissionFieldError('signer produced a signature that does not verify under its public key');
  }
  return { fields, signature };
}
