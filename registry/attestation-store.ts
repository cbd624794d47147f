import type pg from 'pg';
import type { EvidenceDocument, VerifiedAttestation } from './attestation.js';
import { sqlCanonicalTimestamp, type CanonicalTimestamp } from './timestamp.js';

/** key_attestations rows (migration 0003): verified TPM evidence per enrolled SPKI. */
type Queryable = Pick<pg.ClientBase, 'query'>;

export interface KeyAttestationRow {
  readonly publicKeySpkiDer: Buffer;
  readonly verified: boolean;
  readonly ekFingerprint: string;
  readonly verifiedAt: CanonicalTimestamp;
  readonly verification: Record<string, unknown>;
}

/** Stores (or replaces, for a key enrolled again) the evidence of a verified enrolment. */
export async function upsertKeyAttestation(db: Queryable, spkiDer: Buffer, evidence: EvidenceDocument, verified: VerifiedAttestation): Promise<KeyAttestationRow> {
  const { rows } = await db.query(
    `INSERT INTO key_attestations (public_key_spki_der, evidence, verified, verification, ek_certificate_sha256)
     VALUES ($1, $2, true, $3, $4)
     ON CONFLICT (public_key_spki_der) DO UPDATE SET evidence = EXCLUDED.evidence, verified = true,
       verification = EXCLUDED.verification, ek_certificate_sha256 = EXCLUDED.ek_certificate_sha256, verified_at = now()
     RETURNING public_key_spki_der, verified, ek_certificate_sha256, verification, ${sqlCanonicalTimestamp('verified_at')} AS verified_at`,
    [spkiDer, JSON.stringify(evidence), JSON.stringify(verified), verified.ekFingerprint],
  );
  return attestationRow(rows[0]!);
}

function attestationRow(row: Record<string, unknown>): KeyAttestationRow {
  return {
    publicKeySpkiDer: row.public_key_spki_der as Buffer,
    verified: row.verified as boolean,
    ekFingerprint: row.ek_certificate_sha256 as string,
    verifiedAt: row.verified_at as CanonicalTimestamp,
    verification: row.verification as Record<string, unknown>,
  };
}

/** The attestation rows of these keys, by SPKI hex. */
export async function findKeyAttestations(db: Queryable, spkis: readonly Buffer[]): Promise<Map<string, KeyAttestationRow>> {
  if (spkis.length === 0) return new Map();
  const { rows } = await db.query(
    `SELECT public_key_spki_der, verified, ek_certificate_sha256, verification, ${sqlCanonicalTimestamp('verified_at')} AS verified_at
       FROM key_attestations WHERE public_key_spki_der = ANY($1::bytea[])`,
    [spkis.map((spki) => Buffer.from(spki))],
  );
  return new Map(rows.map((row) => [(row.public_key_spki_der as Buffer).toString('hex'), attestationRow(row)]));
}

/** A human and JSON view of a key's attestation state. */
export function attestationSummary(row: KeyAttestationRow | undefined): { verified: boolean; ek_fingerprint: string | null; verified_at: string | null } {
  return row && row.verified ? { verified: true, ek_fingerprint: row.ekFingerprint, verified_at: row.verifiedAt } : { verified: false, ek_fingerprint: null, verified_at: null };
}

export function describeAttestation(row: KeyAttestationRow | undefined): string {
  return row && row.verified ? `TPM-attested (EK ${row.ekFingerprint.slice(0, 16)}…, verified ${row.verifiedAt})` : 'not attested';
}

export interface ChallengeRow {
  readonly challengeId: string;
  readonly publicKeySpkiDer: Buffer;
  readonly evidence: Record<string, unknown>;
  readonly secretSha256: Buffer;
  readonly usedAt: CanonicalTimestamp | null;
  readonly expired: boolean;
}

/**
 * Records a challenge made for an enrolment; it may be answered once, before `validForSeconds` pass.
 * Challenges expired for over a day go first: the table would otherwise only grow, and what an
 * enrolment proved is kept in key_attestations, not here.
 */
export async function insertChallenge(db: Queryable, input: { challengeId: string; spkiDer: Buffer; evidence: Record<string, unknown>; secretSha256: Buffer; validForSeconds: number }): Promise<void> {
  await db.query(`DELETE FROM attestation_challenges WHERE expires_at < now() - interval '1 day'`);
  await db.query(
    `INSERT INTO attestation_challenges (challenge_id, public_key_spki_der, evidence, secret_sha256, expires_at)
     VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))`,
    [input.challengeId, input.spkiDer, JSON.stringify(input.evidence), input.secretSha256, input.validForSeconds],
  );
}

/** One challenge, locked until the transaction ends so two answers cannot both use it. */
export async function lockChallenge(db: Queryable, challengeId: string): Promise<ChallengeRow | undefined> {
  const { rows } = await db.query(
    `SELECT challenge_id, public_key_spki_der, evidence, secret_sha256, ${sqlCanonicalTimestamp('used_at')} AS used_at, expires_at <= now() AS expired
       FROM attestation_challenges WHERE challenge_id = $1 FOR UPDATE`,
    [challengeId],
  );
  const row = rows[0];
  if (!row) return undefined;
  return {
    challengeId: row.challenge_id as string,
    publicKeySpkiDer: row.public_key_spki_der as Buffer,
    evidence: row.evidence as Record<string, unknown>,
    secretSha256: row.secret_sha256 as Buffer,
    usedAt: row.used_at as CanonicalTimestamp | null,
    expired: row.expired as boolean,
  };
}

export async function markChallengeUsed(db: Queryable, challengeId: string): Promise<void> {
  await db.query('UPDATE attestation_challenges SET used_at = now() WHERE challenge_id = $1', [challengeId]);
}
