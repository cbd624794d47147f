import { authorize, candidateRowSchema, evaluateRow, PrincipalKeyCache, type AuthorizationRequest, type CandidateRow, type DenialReason, type RowVerdict } from '../../registry/authorize.js';
import { normaliseAuthority } from '../../registry/destination.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { encodeIdentityExtensionValue } from '../../registry/identity.js';
import type { CertificateIdentity } from './subject-key.js';

/**
 * `explain`, pure: which checks a CONNECT passes, row by row, and the final verdict. The registry
 * part is registry/authorize.ts itself (evaluateRow per row, authorize for the verdict), fed the rows
 * of the gateway's own CANDIDATE_ROWS_QUERY, so the CLI and the gateway cannot disagree.
 */

/** The spec's checks, in its order. */
export const CHECKS = ['identity_extension', 'destination', 'permission_row', 'principal_key', 'delegation', 'signature'] as const;
export type CheckName = (typeof CHECKS)[number];
const REGISTRY_CHECKS = ['permission_row', 'principal_key', 'delegation', 'signature'] as const satisfies readonly CheckName[];

export type CheckStatus = 'pass' | 'fail' | 'skip';

export interface CheckResult {
  readonly check: CheckName;
  readonly status: CheckStatus;
  readonly detail: string;
}

export interface RowExplanation {
  readonly permission_id: string | null;
  readonly signing_key_id: string | null;
  readonly subject_key_matches: boolean;
  readonly allowed: boolean;
  readonly reason: DenialReason | null;
  readonly checks: readonly CheckResult[];
}

export interface Verdict {
  readonly decision: 'allow' | 'deny';
  /** What the gateway answers (200: the registry allows; dialling the destination may still give 502). */
  readonly status: 200 | 400 | 403;
  /** The proxy-status `details` a client would see. */
  readonly details: 'allowed' | 'authority_invalid' | 'identity_invalid' | 'not_authorized';
  /** The precise reason, as the gateway logs it: a DenialReason for registry denials. */
  readonly reason: string | null;
  readonly failed_check: CheckName | null;
  readonly permission_id: string | null;
}

export interface Explanation {
  readonly identity: string;
  readonly destination_input: string;
  readonly destination: string | null;
  readonly subject_fingerprint: string;
  readonly checks: readonly CheckResult[];
  readonly rows: readonly RowExplanation[];
  readonly verdict: Verdict;
}

export const CHECK_OF_REASON: Readonly<Record<DenialReason, CheckName>> = {
  no_permission: 'permission_row',
  key_mismatch: 'permission_row',
  row_invalid: 'permission_row',
  permission_revoked: 'permission_row',
  permission_not_yet_valid: 'permission_row',
  permission_expired: 'permission_row',
  principal_key_revoked: 'principal_key',
  principal_key_not_yet_valid: 'principal_key',
  principal_key_expired: 'principal_key',
  principal_key_invalid: 'principal_key',
  delegation_missing: 'delegation',
  delegation_revoked: 'delegation',
  delegation_not_yet_valid: 'delegation',
  delegation_expired: 'delegation',
  signature_invalid: 'signature',
};

function failDetail(reason: DenialReason, row: CandidateRow | undefined, request: AuthorizationRequest): string {
  const id = row?.permission_id ?? 'a row';
  const key = row?.signing_key_id ?? 'the principal key';
  switch (reason) {
    case 'no_permission':
      return `no permission row for ${request.identity} -> ${request.destination}`;
    case 'key_mismatch':
      return `${id} names subject key ${row ? spkiFingerprint(row.subject_public_key_spki_der) : '?'}, not the presented ${spkiFingerprint(request.spkiDer)}`;
    case 'row_invalid':
      return `${id} is malformed and cannot be verified`;
    case 'permission_revoked':
      return `${id} is revoked`;
    case 'permission_not_yet_valid':
      return `${id} is not valid before ${row?.not_before}`;
    case 'permission_expired':
      return `${id} expired at ${row?.not_after}`;
    case 'principal_key_revoked':
      return `principal key ${key} is revoked`;
    case 'principal_key_not_yet_valid':
      return `principal key ${key} is not valid yet`;
    case 'principal_key_expired':
      return `principal key ${key} has expired`;
    case 'principal_key_invalid':
      return `principal key ${key} is not a usable ecdsa-p256-sha256 public key`;
    case 'delegation_missing':
      return `${key} holds no delegation for ${request.destination}`;
    case 'delegation_revoked':
      return `the delegation of ${request.destination} to ${key} is revoked`;
    case 'delegation_not_yet_valid':
      return `the delegation of ${request.destination} to ${key} is not valid yet`;
    case 'delegation_expired':
      return `the delegation of ${request.destination} to ${key} has expired`;
    case 'signature_invalid':
      return `the signature of ${id} does not verify under ${key}'s registered key (a signed field changed after signing, or another key signed it)`;
  }
}

function passDetail(check: CheckName, row: CandidateRow): string {
  switch (check) {
    case 'permission_row':
      return `${row.permission_id} names this identity, destination and subject key, active ${row.not_before} .. ${row.not_after}`;
    case 'principal_key':
      return `principal key ${row.signing_key_id} is active`;
    case 'delegation':
      return `${row.signing_key_id} may delegate ${row.destination}`;
    default:
      return `the signature verifies under ${row.signing_key_id}'s key ${spkiFingerprint(row.key_spki_der)}`;
  }
}

const skipped = (check: CheckName, why = 'not reached: the gateway stops at the first failure'): CheckResult => ({ check, status: 'skip', detail: why });

/** The four registry checks for one row: passes up to its first failure, then not reached. */
export function rowChecks(raw: unknown, verdict: RowVerdict, request: AuthorizationRequest): CheckResult[] {
  const parsed = candidateRowSchema.safeParse(raw);
  const row = parsed.success ? parsed.data : undefined;
  const failed = verdict.reason ? CHECK_OF_REASON[verdict.reason] : undefined;
  const failedAt = failed ? REGISTRY_CHECKS.indexOf(failed as (typeof REGISTRY_CHECKS)[number]) : REGISTRY_CHECKS.length;
  return REGISTRY_CHECKS.map((check, i) => {
    if (i < failedAt) return { check, status: 'pass', detail: row ? passDetail(check, row) : 'passed' };
    if (i === failedAt) return { check, status: 'fail', detail: failDetail(verdict.reason!, row, request) };
    return skipped(check);
  });
}

export interface ExplainInput {
  readonly identity: string;
  readonly destinationInput: string;
  readonly spkiDer: Buffer;
  /** Present with `--cert`: the identity extension as the gateway reads it. */
  readonly certificate?: CertificateIdentity;
  readonly oid: string;
}

/** Why the gateway could never read this identity from a certificate, or undefined when it could. */
function unusableIdentity(identity: string): string | undefined {
  try {
    encodeIdentityExtensionValue(identity);
    return undefined;
  } catch (error) {
    return (error as Error).message;
  }
}

/** The checks before the registry: the identity extension and the destination. */
export function preliminaryChecks(input: ExplainInput): { identity: CheckResult; destination: CheckResult; normalised: string | undefined } {
  let identity: CheckResult;
  const certificate = input.certificate;
  const unusable = certificate ? undefined : unusableIdentity(input.identity);
  // An argument no certificate could carry gets the gateway's identity_invalid, never a registry lookup (whose text would print it raw).
  if (unusable !== undefined) identity = { check: 'identity_extension', status: 'fail', detail: `identity ${JSON.stringify(input.identity)} taken from the argument: ${unusable}` };
  else if (!certificate) identity = skipped('identity_extension', `no certificate given: identity ${JSON.stringify(input.identity)} taken from the argument`);
  else if (certificate.status === 'valid') identity = { check: 'identity_extension', status: 'pass', detail: `the certificate carries identity ${JSON.stringify(certificate.identity)} at ${input.oid}` };
  else identity = { check: 'identity_extension', status: 'fail', detail: certificate.status === 'absent' ? `no identity extension ${input.oid}` : certificate.reason };
  let normalised: string | undefined;
  let destination: CheckResult;
  try {
    normalised = normaliseAuthority(input.destinationInput);
    destination = { check: 'destination', status: 'pass', detail: `${JSON.stringify(input.destinationInput)} normalises to ${normalised}` };
  } catch (error) {
    destination = { check: 'destination', status: 'fail', detail: (error as Error).message };
  }
  return { identity, destination, normalised };
}

/**
 * Builds the explanation. `rows` are the candidate rows the gateway's lookup returns for
 * (identity, normalised destination, SPKI); pass undefined when the gateway would not have asked.
 */
export function explain(input: ExplainInput, rows: readonly unknown[] | undefined): Explanation {
  const { identity, destination, normalised } = preliminaryChecks(input);
  const base = { identity: input.identity, destination_input: input.destinationInput, destination: normalised ?? null, subject_fingerprint: spkiFingerprint(input.spkiDer) };
  const deny = (status: 400 | 403, details: Verdict['details'], reason: string, failed: CheckName): Verdict => ({ decision: 'deny', status, details, reason, failed_check: failed, permission_id: null });
  // The gateway checks the authority before the identity: a bad authority is a 400 whatever the certificate says.
  if (destination.status === 'fail' || identity.status === 'fail' || normalised === undefined || rows === undefined) {
    const verdict = destination.status === 'fail' ? deny(400, 'authority_invalid', 'authority_invalid', 'destination') : deny(403, 'identity_invalid', identity.detail, 'identity_extension');
    return { ...base, checks: [identity, destination, ...REGISTRY_CHECKS.map((check) => skipped(check))], rows: [], verdict };
  }
  const request: AuthorizationRequest = { identity: input.identity, spkiDer: input.spkiDer, destination: normalised };
  const keys = new PrincipalKeyCache();
  const explained = rows.map((raw) => {
    const verdict = evaluateRow(raw, request, keys);
    const parsed = candidateRowSchema.safeParse(raw);
    return {
      raw,
      verdict,
      row: {
        permission_id: verdict.permissionId ?? null,
        signing_key_id: parsed.success ? parsed.data.signing_key_id : null,
        subject_key_matches: parsed.success && parsed.data.subject_public_key_spki_der.equals(input.spkiDer),
        allowed: verdict.allowed,
        reason: verdict.reason ?? null,
        checks: rowChecks(raw, verdict, request),
      } satisfies RowExplanation,
    };
  });
  const result = authorize(rows, request, keys);
  let verdict: Verdict;
  let deciding: (typeof explained)[number] | undefined;
  if (result.allowed) {
    deciding = explained.find((e) => e.verdict.allowed);
    verdict = { decision: 'allow', status: 200, details: 'allowed', reason: null, failed_check: null, permission_id: result.permissionId };
  } else {
    deciding = explained.find((e) => e.verdict.reason === result.reason);
    verdict = { ...deny(403, 'not_authorized', result.reason, CHECK_OF_REASON[result.reason]) };
  }
  const registryChecks = deciding ? deciding.row.checks : rowChecks(undefined, { permissionId: undefined, allowed: false, reason: 'no_permission' }, request);
  return { ...base, checks: [identity, destination, ...registryChecks], rows: explained.map((e) => e.row), verdict };
}

/** Human lines for an explanation. */
export function explanationLines(explanation: Explanation): string[] {
  const mark = (status: CheckStatus) => (status === 'pass' ? 'ok  ' : status === 'fail' ? 'FAIL' : 'skip');
  const lines = [
    `CONNECT ${explanation.destination ?? explanation.destination_input} as ${JSON.stringify(explanation.identity)} with key ${explanation.subject_fingerprint}`,
    ...explanation.checks.map((c, i) => `  ${i + 1}. ${mark(c.status)} ${c.check.padEnd(18)} ${c.detail}`),
  ];
  if (explanation.rows.length > 1) {
    lines.push(`candidate rows (${explanation.rows.length}):`);
    for (const row of explanation.rows) lines.push(`  ${row.permission_id ?? '(unreadable row)'} by ${row.signing_key_id ?? '?'}: ${row.allowed ? 'allows' : `denies (${row.reason})`}`);
  }
  const v = explanation.verdict;
  lines.push(v.decision === 'allow' ? `verdict: ALLOW (${v.status}) by ${v.permission_id}` : `verdict: DENY (${v.status}, proxy-status details="${v.details}"; logged reason: ${v.reason})`);
  return lines;
}
