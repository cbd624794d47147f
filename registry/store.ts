import type pg from 'pg';
import { normaliseAuthority } from './destination.js';
import { SIGNATURE_ALGORITHM, p256PublicKeyFromSpki } from './ecdsa.js';
import type { SignedPermission } from './signing.js';
import { sqlCanonicalTimestamp, type CanonicalTimestamp } from './timestamp.js';

/** Registry writes, shared by the registry CLI and the tests. Callers pass an admin connection. */
export type Queryable = Pick<pg.ClientBase, 'query'>;

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

// ---- Registry administration (the registry CLI): lookups with lifecycle state, idempotent
// writes and revocation. Every state is computed in the database's clock, like the gateway's.

/** A registry row's lifecycle state: active means not_before <= now() < not_after (or no not_after) and not revoked. */
export type RowState = 'active' | 'not-yet-valid' | 'expired' | 'revoked';

const rowState = (alias: string) =>
  `CASE WHEN ${alias}.revoked_at IS NOT NULL THEN 'revoked'
        WHEN now() < ${alias}.not_before THEN 'not-yet-valid'
        WHEN ${alias}.not_after IS NOT NULL AND ${alias}.not_after <= now() THEN 'expired'
        ELSE 'active' END`;

const timestamps = (alias: string, columns: readonly string[]) => columns.map((c) => `${sqlCanonicalTimestamp(`${alias}.${c}`)} AS ${c}`).join(', ');

/** The database's clock as canonical text: defaults and checks use it, never the client's clock. */
export async function registryNow(db: Queryable): Promise<CanonicalTimestamp> {
  const { rows } = await db.query<{ now: CanonicalTimestamp }>(`SELECT ${sqlCanonicalTimestamp('now()')} AS now`);
  return rows[0]!.now;
}

export interface PrincipalKeyRow {
  readonly keyId: string;
  readonly algorithm: string;
  readonly publicKeySpkiDer: Buffer;
  readonly notBefore: CanonicalTimestamp;
  readonly notAfter: CanonicalTimestamp | null;
  readonly revokedAt: CanonicalTimestamp | null;
  readonly createdAt: CanonicalTimestamp;
  readonly state: RowState;
}

const PRINCIPAL_COLUMNS = `k.key_id, k.algorithm, k.public_key_spki_der, ${timestamps('k', ['not_before', 'not_after', 'revoked_at', 'created_at'])}, ${rowState('k')} AS state`;

function principalRow(row: Record<string, unknown>): PrincipalKeyRow {
  return {
    keyId: row.key_id as string,
    algorithm: row.algorithm as string,
    publicKeySpkiDer: row.public_key_spki_der as Buffer,
    notBefore: row.not_before as CanonicalTimestamp,
    notAfter: row.not_after as CanonicalTimestamp | null,
    revokedAt: row.revoked_at as CanonicalTimestamp | null,
    createdAt: row.created_at as CanonicalTimestamp,
    state: row.state as RowState,
  };
}

/** One principal key; `lock: 'share'` keeps it from being revoked until the transaction ends. */
export async function findPrincipalKey(db: Queryable, keyId: string, options: { lock?: 'share' } = {}): Promise<PrincipalKeyRow | undefined> {
  const { rows } = await db.query(`SELECT ${PRINCIPAL_COLUMNS} FROM principal_signing_keys k WHERE k.key_id = $1${options.lock === 'share' ? ' FOR SHARE' : ''}`, [keyId]);
  return rows[0] ? principalRow(rows[0]) : undefined;
}

export async function listPrincipalKeys(db: Queryable, filter: { keyId?: string } = {}): Promise<PrincipalKeyRow[]> {
  const { rows } = await db.query(`SELECT ${PRINCIPAL_COLUMNS} FROM principal_signing_keys k WHERE ($1::text IS NULL OR k.key_id = $1) ORDER BY k.key_id`, [filter.keyId ?? null]);
  return rows.map(principalRow);
}

/** Inserts a principal key unless its key_id exists; true when this call inserted it (race-free). */
export async function insertPrincipalKeyIfAbsent(db: Queryable, input: PrincipalKeyInput): Promise<boolean> {
  p256PublicKeyFromSpki(input.publicKeySpkiDer);
  const result = await db.query(
    `INSERT INTO principal_signing_keys (key_id, algorithm, public_key_spki_der, not_before, not_after)
     VALUES ($1, $2, $3, coalesce($4::timestamptz, now()), $5::timestamptz)
     ON CONFLICT (key_id) DO NOTHING`,
    [input.keyId, SIGNATURE_ALGORITHM, Buffer.from(input.publicKeySpkiDer), input.notBefore ?? null, input.notAfter ?? null],
  );
  return result.rowCount === 1;
}

/*
 * The revoke functions below lock the rows they would change (FOR UPDATE; call them inside a
 * transaction) and issue the UPDATE only when one of them is not revoked yet. The change-feed
 * triggers (migrations/0002) fire once per statement, even one that changes no row, and every
 * firing makes each gateway flush its cache and re-check its tunnels: an unknown name or an
 * already-revoked row must not send one.
 */

/** Sets revoked_at = now() unless already revoked; undefined when the key does not exist. */
export async function revokePrincipalKey(db: Queryable, keyId: string): Promise<{ row: PrincipalKeyRow; revokedNow: boolean } | undefined> {
  const { rows } = await db.query<{ revoked: boolean }>(`SELECT revoked_at IS NOT NULL AS revoked FROM principal_signing_keys WHERE key_id = $1 FOR UPDATE`, [keyId]);
  if (rows.length === 0) return undefined;
  const revokedNow = !rows[0]!.revoked && (await db.query(`UPDATE principal_signing_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL`, [keyId])).rowCount === 1;
  const row = await findPrincipalKey(db, keyId);
  return row ? { row, revokedNow } : undefined;
}

export interface DelegationRow {
  readonly signingKeyId: string;
  readonly destination: string;
  readonly notBefore: CanonicalTimestamp;
  readonly notAfter: CanonicalTimestamp | null;
  readonly revokedAt: CanonicalTimestamp | null;
  readonly state: RowState;
}

function delegationRow(row: Record<string, unknown>): DelegationRow {
  return {
    signingKeyId: row.signing_key_id as string,
    destination: row.destination as string,
    notBefore: row.not_before as CanonicalTimestamp,
    notAfter: row.not_after as CanonicalTimestamp | null,
    revokedAt: row.revoked_at as CanonicalTimestamp | null,
    state: row.state as RowState,
  };
}

/**
 * Delegations, optionally of one key and for some (normalised) destinations. `lock: 'share'` keeps
 * them from being revoked, `'update'` reserves them for a change, until the transaction ends.
 */
export async function listDelegations(
  db: Queryable,
  filter: { signingKeyId?: string; destinations?: readonly string[]; lock?: 'share' | 'update' } = {},
): Promise<DelegationRow[]> {
  const lock = filter.lock === 'share' ? ' FOR SHARE' : filter.lock === 'update' ? ' FOR UPDATE' : '';
  const { rows } = await db.query(
    `SELECT d.signing_key_id, d.destination, ${timestamps('d', ['not_before', 'not_after', 'revoked_at'])}, ${rowState('d')} AS state
       FROM principal_key_permissions d
      WHERE ($1::text IS NULL OR d.signing_key_id = $1)
        AND ($2::text[] IS NULL OR d.destination = ANY($2::text[]))
      ORDER BY d.signing_key_id, d.destination${lock}`,
    [filter.signingKeyId ?? null, filter.destinations ? [...filter.destinations] : null],
  );
  return rows.map(delegationRow);
}

/** Re-opens an existing delegation: the given window (default now, no expiry), and not revoked. */
export async function reopenDelegation(db: Queryable, input: DelegationInput): Promise<void> {
  await db.query(
    `UPDATE principal_key_permissions
        SET not_before = coalesce($3::timestamptz, now()), not_after = $4::timestamptz, revoked_at = NULL
      WHERE signing_key_id = $1 AND destination = $2`,
    [input.signingKeyId, normaliseAuthority(input.destination), input.notBefore ?? null, input.notAfter ?? null],
  );
}

/** Revokes the key's delegations for these normalised destinations; returns the ones revoked now. */
export async function revokeDelegations(db: Queryable, signingKeyId: string, destinations: readonly string[]): Promise<string[]> {
  const open = await db.query(
    `SELECT 1 FROM principal_key_permissions WHERE signing_key_id = $1 AND destination = ANY($2::text[]) AND revoked_at IS NULL FOR UPDATE`,
    [signingKeyId, [...destinations]],
  );
  if (open.rows.length === 0) return [];
  const { rows } = await db.query<{ destination: string }>(
    `UPDATE principal_key_permissions SET revoked_at = now()
      WHERE signing_key_id = $1 AND destination = ANY($2::text[]) AND revoked_at IS NULL
      RETURNING destination`,
    [signingKeyId, [...destinations]],
  );
  return rows.map((r) => r.destination).sort();
}

export interface PermissionRow {
  readonly permissionId: string;
  readonly signingKeyId: string;
  readonly subjectIdentity: string;
  readonly subjectPublicKeySpkiDer: Buffer;
  readonly destination: string;
  readonly notBefore: CanonicalTimestamp;
  readonly notAfter: CanonicalTimestamp;
  readonly revokedAt: CanonicalTimestamp | null;
  readonly createdAt: CanonicalTimestamp;
  readonly signature: Buffer;
  readonly state: RowState;
}

export interface PermissionFilter {
  readonly identity?: string;
  readonly signingKeyId?: string;
  readonly spkiDer?: Uint8Array;
  /** Normalised `host:port` values. */
  readonly destinations?: readonly string[];
  readonly permissionIds?: readonly string[];
}

const PERMISSION_FILTER = `($1::text IS NULL OR p.subject_identity = $1)
        AND ($2::text IS NULL OR p.signing_key_id = $2)
        AND ($3::bytea IS NULL OR p.subject_public_key_spki_der = $3)
        AND ($4::text[] IS NULL OR p.destination = ANY($4::text[]))
        AND ($5::text[] IS NULL OR p.permission_id = ANY($5::text[]))`;

function permissionFilterValues(filter: PermissionFilter): unknown[] {
  return [
    filter.identity ?? null,
    filter.signingKeyId ?? null,
    filter.spkiDer ? Buffer.from(filter.spkiDer) : null,
    filter.destinations ? [...filter.destinations] : null,
    filter.permissionIds ? [...filter.permissionIds] : null,
  ];
}

export async function listPermissions(db: Queryable, filter: PermissionFilter = {}): Promise<PermissionRow[]> {
  const { rows } = await db.query(
    `SELECT p.permission_id, p.signing_key_id, p.subject_identity, p.subject_public_key_spki_der, p.destination, p.signature,
            ${timestamps('p', ['not_before', 'not_after', 'revoked_at', 'created_at'])}, ${rowState('p')} AS state
       FROM permission_registry p
      WHERE ${PERMISSION_FILTER}
      ORDER BY p.subject_identity, p.destination, p.created_at, p.permission_id`,
    permissionFilterValues(filter),
  );
  return rows.map((row) => ({
    permissionId: row.permission_id,
    signingKeyId: row.signing_key_id,
    subjectIdentity: row.subject_identity,
    subjectPublicKeySpkiDer: row.subject_public_key_spki_der,
    destination: row.destination,
    notBefore: row.not_before,
    notAfter: row.not_after,
    revokedAt: row.revoked_at,
    createdAt: row.created_at,
    signature: row.signature,
    state: row.state,
  }));
}

/**
 * Revokes the matching permissions that are not revoked and not yet expired (active or scheduled).
 * Refuses an empty filter: "revoke everything" is never what an operator meant.
 */
export async function revokePermissions(db: Queryable, filter: PermissionFilter): Promise<{ permissionId: string; destination: string }[]> {
  if (filter.identity === undefined && filter.permissionIds === undefined) throw new Error('revokePermissions needs an identity or permission ids');
  const open = await db.query(
    `SELECT 1 FROM permission_registry p
      WHERE ${PERMISSION_FILTER}
        AND p.revoked_at IS NULL AND now() < p.not_after
        FOR UPDATE`,
    permissionFilterValues(filter),
  );
  if (open.rows.length === 0) return [];
  const { rows } = await db.query<{ permission_id: string; destination: string }>(
    `UPDATE permission_registry p SET revoked_at = now()
      WHERE ${PERMISSION_FILTER}
        AND p.revoked_at IS NULL AND now() < p.not_after
      RETURNING p.permission_id, p.destination`,
    permissionFilterValues(filter),
  );
  return rows.map((r) => ({ permissionId: r.permission_id, destination: r.destination })).sort((a, b) => a.destination.localeCompare(b.destination) || a.permissionId.localeCompare(b.permissionId));
}
