import { attestationSummary, findKeyAttestations, type KeyAttestationRow } from '../../../registry/attestation-store.js';
import { spkiFingerprint } from '../../../registry/ecdsa.js';
import { listDelegations, listPermissions, listPrincipalKeys, type RowState } from '../../../registry/store.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { withRegistry } from '../database.js';
import { UsageError } from '../errors.js';
import { table } from '../table.js';

export const LIST_KINDS = ['principals', 'scopes', 'permissions'] as const;
export type ListKind = (typeof LIST_KINDS)[number];
export const ROW_STATES: readonly RowState[] = ['active', 'not-yet-valid', 'expired', 'revoked'];

export interface ListOptions {
  readonly identity?: string;
  readonly principal?: string;
  readonly state?: string;
}

/** The ATTESTED column: when and by which EK a key was proven TPM-resident, or `no`. */
function attestedCell(row: KeyAttestationRow | undefined): string {
  return row?.verified ? `yes ${row.verifiedAt} ek:${row.ekFingerprint.slice(0, 16)}` : 'no';
}

/** Registry rows with their state computed in the database's clock; all kinds when none is named. */
export async function list(context: CommandContext, kind: string | undefined, options: ListOptions): Promise<CommandResult> {
  if (kind !== undefined && !(LIST_KINDS as readonly string[]).includes(kind)) throw new UsageError(`list what? ${JSON.stringify(kind)} is not one of ${LIST_KINDS.join(', ')}`);
  if (options.state !== undefined && !(ROW_STATES as readonly string[]).includes(options.state)) throw new UsageError(`--state must be one of ${ROW_STATES.join(', ')}`);
  const kinds = kind ? [kind as ListKind] : [...LIST_KINDS];
  const keep = <T extends { state: RowState }>(rows: T[]) => (options.state ? rows.filter((row) => row.state === options.state) : rows);
  const keyId = options.principal;
  return withRegistry(registryTarget(context), async (db) => {
    const data: Record<string, unknown> = {};
    const human: string[] = [];
    const section = (title: string, lines: string[], count: number) => {
      if (kinds.length > 1) human.push(`${human.length > 0 ? '\n' : ''}${title} (${count})`);
      human.push(...(count > 0 ? lines : kinds.length > 1 ? [] : [`no ${title}`]));
    };
    if (kinds.includes('principals')) {
      const rows = keep(await listPrincipalKeys(db, keyId ? { keyId } : {}));
      const attested = await findKeyAttestations(db, rows.map((r) => r.publicKeySpkiDer));
      const of = (spki: Buffer) => attested.get(spki.toString('hex'));
      data.principals = rows.map((r) => ({ key_id: r.keyId, algorithm: r.algorithm, state: r.state, not_before: r.notBefore, not_after: r.notAfter, revoked_at: r.revokedAt, created_at: r.createdAt, fingerprint: spkiFingerprint(r.publicKeySpkiDer), public_key_spki_der: r.publicKeySpkiDer, attestation: attestationSummary(of(r.publicKeySpkiDer)) }));
      section('principals', table(['KEY_ID', 'STATE', 'NOT_BEFORE', 'NOT_AFTER', 'REVOKED_AT', 'PUBLIC_KEY', 'ATTESTED'], rows.map((r) => [r.keyId, r.state, r.notBefore, r.notAfter, r.revokedAt, spkiFingerprint(r.publicKeySpkiDer), attestedCell(of(r.publicKeySpkiDer))])), rows.length);
    }
    if (kinds.includes('scopes')) {
      const rows = keep(await listDelegations(db, keyId ? { signingKeyId: keyId } : {}));
      data.scopes = rows.map((r) => ({ key_id: r.signingKeyId, destination: r.destination, state: r.state, not_before: r.notBefore, not_after: r.notAfter, revoked_at: r.revokedAt }));
      section('scopes', table(['KEY_ID', 'DESTINATION', 'STATE', 'NOT_BEFORE', 'NOT_AFTER', 'REVOKED_AT'], rows.map((r) => [r.signingKeyId, r.destination, r.state, r.notBefore, r.notAfter, r.revokedAt])), rows.length);
    }
    if (kinds.includes('permissions')) {
      const rows = keep(await listPermissions(db, { ...(options.identity ? { identity: options.identity } : {}), ...(keyId ? { signingKeyId: keyId } : {}) }));
      const attested = await findKeyAttestations(db, rows.map((r) => r.subjectPublicKeySpkiDer));
      const of = (spki: Buffer) => attested.get(spki.toString('hex'));
      data.permissions = rows.map((r) => ({
        permission_id: r.permissionId,
        key_id: r.signingKeyId,
        identity: r.subjectIdentity,
        destination: r.destination,
        state: r.state,
        not_before: r.notBefore,
        not_after: r.notAfter,
        revoked_at: r.revokedAt,
        created_at: r.createdAt,
        subject_fingerprint: spkiFingerprint(r.subjectPublicKeySpkiDer),
        subject_public_key_spki_der: r.subjectPublicKeySpkiDer,
        subject_attestation: attestationSummary(of(r.subjectPublicKeySpkiDer)),
      }));
      section(
        'permissions',
        table(['PERMISSION_ID', 'IDENTITY', 'DESTINATION', 'KEY_ID', 'STATE', 'NOT_BEFORE', 'NOT_AFTER', 'SUBJECT_KEY', 'ATTESTED'], rows.map((r) => [r.permissionId, r.subjectIdentity, r.destination, r.signingKeyId, r.state, r.notBefore, r.notAfter, spkiFingerprint(r.subjectPublicKeySpkiDer).slice(0, 23), attestedCell(of(r.subjectPublicKeySpkiDer))])),
        rows.length,
      );
    }
    return { data, human };
  });
}
