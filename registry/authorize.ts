import { createHash, type KeyObject } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import { z } from 'zod';
import { p256PublicKeyFromSpki, SIGNATURE_ALGORITHM, verifyP256Signature } from './ecdsa.js';
import { canonicalPermissionBytes } from './permission.js';
import { isCanonicalTimestamp, type CanonicalTimestamp } from './timestamp.js';

/**
 * One permission row for (identity, destination) as the lookup query returns it, with every
 * time comparison already made in the database's clock. Validated before use: a malformed row
 * is a denial, never a crash.
 */
const bytea = z.instanceof(Buffer);
const canonicalTime = z.string().refine(isCanonicalTimestamp, 'not a canonical timestamp');
export const candidateRowSchema = z.object({
  permission_id: z.string().min(1),
  signing_key_id: z.string().min(1),
  subject_identity: z.string().min(1),
  subject_public_key_spki_der: bytea,
  destination: z.string().min(1),
  not_before: canonicalTime,
  not_after: canonicalTime,
  signature: bytea,
  permission_started: z.boolean(),
  permission_unexpired: z.boolean(),
  permission_revoked: z.boolean(),
  key_algorithm: z.string(),
  key_spki_der: bytea,
  key_started: z.boolean(),
  key_unexpired: z.boolean(),
  key_revoked: z.boolean(),
  delegation_exists: z.boolean(),
  delegation_started: z.boolean().nullable(),
  delegation_unexpired: z.boolean().nullable(),
  delegation_revoked: z.boolean().nullable(),
  /** Milliseconds until the earliest not_after of row, key and delegation (database clock). */
  valid_for_ms: z.number().optional(),
});
export type CandidateRow = z.infer<typeof candidateRowSchema>;

/** Why a row does not authorise, in the order the checks run. Logged, never sent to clients. */
export type DenialReason =
  | 'no_permission'
  | 'key_mismatch'
  | 'row_invalid'
  | 'permission_not_yet_valid'
  | 'permission_expired'
  | 'permission_revoked'
  | 'principal_key_not_yet_valid'
  | 'principal_key_expired'
  | 'principal_key_revoked'
  | 'principal_key_invalid'
  | 'delegation_missing'
  | 'delegation_not_yet_valid'
  | 'delegation_expired'
  | 'delegation_revoked'
  | 'signature_invalid';

/** Later checks outrank earlier ones: the row that got furthest explains the denial best. */
const REASON_RANK: readonly DenialReason[] = [
  'no_permission',
  'key_mismatch',
  'row_invalid',
  'permission_revoked',
  'permission_not_yet_valid',
  'permission_expired',
  'principal_key_revoked',
  'principal_key_not_yet_valid',
  'principal_key_expired',
  'principal_key_invalid',
  'delegation_missing',
  'delegation_revoked',
  'delegation_not_yet_valid',
  'delegation_expired',
  'signature_invalid',
];

export interface RowVerdict {
  readonly permissionId: string | undefined;
  readonly allowed: boolean;
  readonly reason: DenialReason | undefined;
}

export type AuthorizationResult =
  | {
      readonly allowed: true;
      readonly permissionId: string;
      readonly signingKeyId: string;
      readonly notAfter: CanonicalTimestamp;
      /** How long the decision holds: until the earliest not_after of row, key and delegation. */
      readonly validForMs: number;
    }
  | { readonly allowed: false; readonly reason: DenialReason; readonly verdicts: readonly RowVerdict[] };

export interface AuthorizationRequest {
  readonly identity: string;
  readonly spkiDer: Uint8Array;
  /** Normalised `host:port`. */
  readonly destination: string;
}

/**
 * Parsed principal keys by SPKI, so a hot permission does not re-parse its key on every CONNECT,
 * and the signatures that verified, so a row asked again is not verified again: a re-check of
 * open tunnels after a registry change reads back thousands of unchanged rows, and a P-256
 * verification (65 µs here) was over half of that pass's CPU.
 */
export class PrincipalKeyCache {
  readonly #keys = new LRUCache<string, KeyObject | false>({ max: 1024 });
  /**
   * Digests of (principal SPKI, signed text, signature) that verified. Verification is a pure
   * function of those three, and the row's signed text holds every signed field, so a changed
   * field, signature or key is a miss. Revocation and validity are not signed: evaluateRow checks
   * them on every lookup, before this. Failures are not kept (a bad row is rare, and a cache of
   * them would only be room for an attacker).
   */
  readonly #verified = new LRUCache<string, true>({ max: 65_536 });

  /** verifyP256Signature, remembering successes. */
  verify(key: KeyObject, spkiDer: Buffer, message: Buffer, signature: Buffer): boolean {
    const hash = createHash('sha256');
    // Lengths first: no two different triples hash the same concatenation.
    const lengths = Buffer.alloc(12);
    lengths.writeUInt32BE(spkiDer.length, 0);
    lengths.writeUInt32BE(message.length, 4);
    lengths.writeUInt32BE(signature.length, 8);
    const id = hash.update(lengths).update(spkiDer).update(message).update(signature).digest('base64');
    if (this.#verified.get(id)) return true;
    if (!verifyP256Signature(key, message, signature)) return false;
    this.#verified.set(id, true);
    return true;
  }

  /** Signatures remembered as verified (tests). */
  get verifiedEntries(): number {
    return this.#verified.size;
  }

  get(spkiDer: Buffer): KeyObject | undefined {
    const id = spkiDer.toString('base64');
    let key = this.#keys.get(id);
    if (key === undefined) {
      try {
        key = p256PublicKeyFromSpki(spkiDer);
      } catch {
        key = false;
      }
      this.#keys.set(id, key);
    }
    return key || undefined;
  }
}

/** Checks one candidate row through the spec's checks 3–5; the first failure is its reason. */
export function evaluateRow(raw: unknown, request: AuthorizationRequest, keys: PrincipalKeyCache): RowVerdict {
  const parsed = candidateRowSchema.safeParse(raw);
  const rawId = (raw as { permission_id?: unknown } | null)?.permission_id;
  const permissionId = typeof rawId === 'string' ? rawId : undefined;
  const deny = (reason: DenialReason): RowVerdict => ({ permissionId, allowed: false, reason });
  if (!parsed.success) return deny('row_invalid');
  const row = parsed.data;
  if (row.subject_identity !== request.identity || row.destination !== request.destination) return deny('no_permission');
  if (!row.subject_public_key_spki_der.equals(Buffer.from(request.spkiDer))) return deny('key_mismatch');
  if (row.permission_revoked) return deny('permission_revoked');
  if (!row.permission_started) return deny('permission_not_yet_valid');
  if (!row.permission_unexpired) return deny('permission_expired');
  if (row.key_revoked) return deny('principal_key_revoked');
  if (!row.key_started) return deny('principal_key_not_yet_valid');
  if (!row.key_unexpired) return deny('principal_key_expired');
  const key = row.key_algorithm === SIGNATURE_ALGORITHM ? keys.get(row.key_spki_der) : undefined;
  if (!key) return deny('principal_key_invalid');
  if (!row.delegation_exists) return deny('delegation_missing');
  if (row.delegation_revoked) return deny('delegation_revoked');
  if (!row.delegation_started) return deny('delegation_not_yet_valid');
  if (!row.delegation_unexpired) return deny('delegation_expired');
  let message: Buffer;
  try {
    message = canonicalPermissionBytes({
      permissionId: row.permission_id,
      signingKeyId: row.signing_key_id,
      subjectIdentity: row.subject_identity,
      subjectPublicKeySpkiDer: row.subject_public_key_spki_der,
      destination: row.destination,
      notBefore: row.not_before as CanonicalTimestamp,
      notAfter: row.not_after as CanonicalTimestamp,
    });
  } catch {
    return deny('row_invalid');
  }
  if (!keys.verify(key, row.key_spki_der, message, row.signature)) return deny('signature_invalid');
  return { permissionId: row.permission_id, allowed: true, reason: undefined };
}

/**
 * Decides a CONNECT from the candidate rows the lookup returned. Pure: the database has already
 * compared every timestamp with its own clock.
 */
export function authorize(rows: readonly unknown[], request: AuthorizationRequest, keys: PrincipalKeyCache): AuthorizationResult {
  const verdicts: RowVerdict[] = [];
  for (const raw of rows) {
    const verdict = evaluateRow(raw, request, keys);
    if (verdict.allowed) {
      const row = raw as CandidateRow;
      const validForMs = typeof row.valid_for_ms === 'number' && Number.isFinite(row.valid_for_ms) ? Math.max(0, row.valid_for_ms) : 0;
      return { allowed: true, permissionId: row.permission_id, signingKeyId: row.signing_key_id, notAfter: row.not_after as CanonicalTimestamp, validForMs };
    }
    verdicts.push(verdict);
  }
  let reason: DenialReason = 'no_permission';
  for (const verdict of verdicts) {
    if (verdict.reason && REASON_RANK.indexOf(verdict.reason) > REASON_RANK.indexOf(reason)) reason = verdict.reason;
  }
  return { allowed: false, reason, verdicts };
}
