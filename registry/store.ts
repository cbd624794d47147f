import type pg from 'pg';
import { normaliseAuthority } from './destination.js';
import { SIGNATURE_ALGORITHM, p256PublicKeyFromSpki } from './ecdsa.js';
import type { SignedPermission } from './signing.js';

/** Registry writes, shared by the registry CLI and the tests. Callers pass an admin connection. */
type Queryable = Pick<pg.ClientBase, 'query'>;

export interface PrincipalKeyInput {
  readonly keyId: string;
  readonly publicKeySpkiDer: Uint8Array;
  /** RFC 3339; default now. */
  readonly notBefore?: string;
  /** RFC 3339; default: no expiry. */
  readonly notAfter?: string;
}

export async function insertPrincipalKey(db: Queryable, input: PrincipalKeyInput): Promise<void> {
  p256PublicKeyFromSpki(input.publicKeySpkiDer);
  await db.query(
    `INSERT INTO principal_signing_keys (key_id, algorithm, public_key_spki_der, not_before, not_after)
     VALUES ($1, $2, $3, coalesce($4::timestamptz, now()), $5::timestamptz)`,
    [input.keyId, SIGNATURE_ALGORITHM, Buffer.from(input.publicKeySpkiDer), input.notBefore ?? null, input.notAfter ?? null],
  );
}

export interface DelegationInput {
  readonly signingKeyId: string;
  /** Any accepted authority; stored normalised. */
  readonly destination: string;
  readonly notBefore?: string;
  readonly notAfter?: string;
}

export async function insertDelegation(db: Queryable, input: DelegationInput): Promise<string> {
  const destination = normaliseAuthority(input.destination);
  await db.query(
    `INSERT INTO principal_key_permissions (signing_key_id, destination, not_before, not_after)
     VALUES ($1, $2, coalesce($3::timestamptz, now()), $4::timestamptz)`,
    [input.signingKeyId, destination, input.notBefore ?? null, input.notAfter ?? null],
  );
  return destination;
}

export async function insertPermission(db: Queryable, permission: SignedPermission): Promise<void> {
  const f = permission.fields;
  await db.query(
    `INSERT INTO permission_registry
       (permission_id, signing_key_id, subject_identity, subject_public_key_spki_der, destination, not_before, not_after, signature)
     VALUES ($1, $2, $3, $4, $5, $6::timestamptz, $7::timestamptz, $8)`,
    [f.permissionId, f.signingKeyId, f.subjectIdentity, Buffer.from(f.subjectPublicKeySpkiDer), f.destination, f.notBefore, f.notAfter, permission.signature],
  );
}
