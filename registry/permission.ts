import { normaliseAuthority } from './destination.js';
import { InvalidPermissionFieldError } from './errors.js';
import { isCanonicalTimestamp, type CanonicalTimestamp } from './timestamp.js';

export const PERMISSION_TEXT_HEADER = 'agent-gateway-permission-v1';

/** The fields a principal signs, in the order the canonical text lists them. */
export interface PermissionFields {
  readonly permissionId: string;
  readonly signingKeyId: string;
  readonly subjectIdentity: string;
  readonly subjectPublicKeySpkiDer: Uint8Array;
  /** Normalised `host:port`. */
  readonly destination: string;
  readonly notBefore: CanonicalTimestamp;
  readonly notAfter: CanonicalTimestamp;
}

// C0, DEL and C1: a newline in an identity could otherwise forge a following field.
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

// With the u flag a surrogate range matches only unpaired halves, which UTF-8 cannot encode.
const LONE_SURROGATE = /[\ud800-\udfff]/u;

export function hasControlCharacter(value: string): boolean {
  return CONTROL.test(value);
}

function textField(name: string, value: string): string {
  if (typeof value !== 'string' || value.length === 0) throw new InvalidPermissionFieldError(`${name} must be a non-empty string`);
  if (hasControlCharacter(value)) throw new InvalidPermissionFieldError(`${name} contains a control character`);
  if (LONE_SURROGATE.test(value)) throw new InvalidPermissionFieldError(`${name} is not valid Unicode`);
  return value;
}

/**
 * The exact UTF-8 bytes a principal signs for a permission row: eight lines joined by `\n`,
 * no trailing newline. Refuses (throws InvalidPermissionFieldError) any field that would make
 * the text ambiguous, so signing refuses it and verification denies it.
 */
export function canonicalPermissionText(fields: PermissionFields): string {
  const destination = textField('destination', fields.destination);
  if (normaliseAuthority(destination) !== destination) {
    throw new InvalidPermissionFieldError('destination is not in normalised host:port form');
  }
  if (!(fields.subjectPublicKeySpkiDer instanceof Uint8Array) || fields.subjectPublicKeySpkiDer.length === 0) {
    throw new InvalidPermissionFieldError('subject_public_key_spki_der is empty');
  }
  for (const [name, value] of [['not_before', fields.notBefore], ['not_after', fields.notAfter]] as const) {
    if (!isCanonicalTimestamp(value)) throw new InvalidPermissionFieldError(`${name} is not canonical UTC RFC 3339 with six fractional digits`);
  }
  return [
    PERMISSION_TEXT_HEADER,
    `permission_id=${textField('permission_id', fields.permissionId)}`,
    `signing_key_id=${textField('signing_key_id', fields.signingKeyId)}`,
    `subject_identity=${textField('subject_identity', fields.subjectIdentity)}`,
    `subject_public_key_spki_der=${Buffer.from(fields.subjectPublicKeySpkiDer).toString('hex')}`,
    `destination=${destination}`,
    `not_before=${fields.notBefore}`,
    `not_after=${fields.notAfter}`,
  ].join('\n');
}

export function canonicalPermissionBytes(fields: PermissionFields): Buffer {
  return Buffer.from(canonicalPermissionText(fields), 'utf8');
}
