import { spkiFingerprint } from '../../../registry/ecdsa.js';
import { DEFAULT_PERMISSION_LIFETIME_MS, permissionFields, signPermission } from '../../../registry/signing.js';
import { findPrincipalKey, insertPermission, listDelegations, registryNow, type DelegationRow, type PrincipalKeyRow, type Queryable } from '../../../registry/store.js';
import { formatTimestampMicros, parseTimestampMicros, type CanonicalTimestamp } from '../../../registry/timestamp.js';
import { checkTextField, checkValidityWindow, normaliseDestinations, timestampOption } from '../arguments.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID, principalKeyId } from '../environment.js';
import { requireAttestedAgentKey } from '../attestation.js';
import { RefusedError } from '../errors.js';
import { checkKeyLabel, openPrincipalToken, type TokenOptions } from '../principal-token.js';
import { checkIdentity, checkOid, readSubjectKey, type SubjectKey, type SubjectKeyOptions } from '../subject-key.js';

export interface GrantPermissionOptions extends TokenOptions, SubjectKeyOptions {
  readonly allowUnattested?: boolean;
  readonly principal?: string;
  readonly identity: string;
  readonly oid?: string;
  readonly grant?: readonly string[];
  readonly notBefore?: string;
  readonly notAfter?: string;
}

const later = (a: string, b: string) => parseTimestampMicros(a) > parseTimestampMicros(b);

/** With `--cert`, the certificate must carry the identity being granted, read as the gateway reads it. */
export function checkCertificateIdentity(subject: SubjectKey, identity: string, oid: string): string | undefined {
  const certificate = subject.certificate;
  if (!certificate || certificate.status === 'absent') {
    return certificate ? `the certificate has no identity extension at ${oid}; the gateway denies a client presenting it (grant made for the key alone)` : undefined;
  }
  if (certificate.status === 'invalid') {
    throw new RefusedError('ERR_REFUSED_CERTIFICATE_IDENTITY_INVALID', `the certificate's identity extension at ${oid} is unusable (${certificate.reason}); the gateway would deny every CONNECT with it`);
  }
  if (certificate.identity !== identity) {
    throw new RefusedError('ERR_REFUSED_IDENTITY_MISMATCH', `the certificate carries identity ${JSON.stringify(certificate.identity)} at ${oid}, not ${JSON.stringify(identity)}`);
  }
  return undefined;
}

/**
 * Everything the gateway would check about the signer, checked before signing: the principal key
 * exists, is active, is the key in this TPM, and holds an active delegation for every destination.
 * Pure, over rows read inside the signing transaction.
 */
export function checkSigningAuthority(keyId: string, principal: PrincipalKeyRow | undefined, tpmSpkiDer: Buffer, destinations: readonly string[], delegations: readonly DelegationRow[]): PrincipalKeyRow {
  if (!principal) throw new RefusedError('ERR_REFUSED_PRINCIPAL_UNKNOWN', `no principal key ${JSON.stringify(keyId)} in the registry: run register-principal first`);
  if (principal.state !== 'active') {
    throw new RefusedError('ERR_REFUSED_PRINCIPAL_INACTIVE', `principal key ${keyId} is ${principal.state}${principal.revokedAt ? ` (revoked at ${principal.revokedAt})` : ''}; the gateway would deny everything it signs`);
  }
  if (!principal.publicKeySpkiDer.equals(tpmSpkiDer)) {
    throw new RefusedError('ERR_REFUSED_PRINCIPAL_KEY_MISMATCH', `principal key ${keyId} is registered as ${spkiFingerprint(principal.publicKeySpkiDer)}, but the TPM key labelled ${keyId} is ${spkiFingerprint(tpmSpkiDer)}; signatures by it would not verify`);
  }
  const scope = new Map(delegations.map((row) => [row.destination, row]));
  const outside = destinations.filter((destination) => scope.get(destination)?.state !== 'active');
  if (outside.length > 0) {
    const why = outside.map((destination) => `${destination} (${scope.get(destination)?.state ?? 'not delegated'})`).join(', ');
    throw new RefusedError('ERR_REFUSED_OUT_OF_SCOPE', `principal ${keyId} may not delegate ${why}; an admin grants it with grant-scope. Nothing was written.`);
  }
  return principal;
}

/**
 * checkSigningAuthority on the registry's rows alone, before the TPM is asked (grant-permission,
 * rotate-key): an unknown or inactive principal or a destination out of its scope is a typo or a
 * missing step, not a TPM problem. The registered key stands in for the TPM's, which is compared
 * later, inside the signing transaction, where everything is checked again under its locks.
 */
export async function checkSigningAuthorityBeforeTpm(db: Queryable, keyId: string, destinations: readonly string[]): Promise<void> {
  const known = await findPrincipalKey(db, keyId);
  checkSigningAuthority(keyId, known, known?.publicKeySpkiDer ?? Buffer.alloc(0), destinations, known ? await listDelegations(db, { signingKeyId: keyId, destinations }) : []);
}

function defaultNotAfter(notBefore: CanonicalTimestamp): CanonicalTimestamp {
  return formatTimestampMicros(parseTimestampMicros(notBefore) + BigInt(DEFAULT_PERMISSION_LIFETIME_MS) * 1000n);
}

/**
 * Signs one permission row per destination inside the TPM with the principal's key, and stores them
 * all or none. Refuses, before writing anything, whatever the gateway would deny.
 */
export async function grantPermission(context: CommandContext, destinationArgs: readonly string[], options: GrantPermissionOptions): Promise<CommandResult> {
  const keyId = checkTextField('principal key id', principalKeyId(context.env, options.principal));
  checkKeyLabel(keyId);
  const identity = checkIdentity(options.identity);
  const oid = checkOid(options.oid ?? DEFAULT_IDENTITY_OID);
  const subject = readSubjectKey(options, oid)!;
  const certificateWarning = checkCertificateIdentity(subject, identity, oid);
  const destinations = normaliseDestinations([...destinationArgs, ...(options.grant ?? [])], { required: true });
  const requestedNotBefore = timestampOption('--not-before', options.notBefore);
  const requestedNotAfter = timestampOption('--not-after', options.notAfter);
  if (certificateWarning) context.output.warn(certificateWarning);

  return withRegistry(registryTarget(context), async (db) => {
    // What the registry alone refuses (a bad window, an unknown or inactive principal, a destination
    // out of scope) is a typo or a missing step, not a TPM problem: say so before the TPM is asked.
    // The signing transaction checks it all again, with the TPM's key, under its locks.
    const early = await registryNow(db);
    const earlyNotBefore = requestedNotBefore ?? early;
    checkValidityWindow({ notBefore: earlyNotBefore, notAfter: requestedNotAfter ?? defaultNotAfter(earlyNotBefore) }, early, 'permission');
    await checkSigningAuthorityBeforeTpm(db, keyId, destinations);
    const attested = await requireAttestedAgentKey(db, context, subject, options, { key: 'agent key', enrol: 'agent-gateway-registry enrol-agent-key', doing: 'granting' });
    // The TPM comes first: a wrong PIN or a missing key fails before any transaction starts.
    const tpm = await openPrincipalToken(context, options, { create: false });
    try {
      const key = tpm.findKey(keyId);
      const signer = tpm.permissionSigner(key, keyId);
      const granted = await transaction(db, async () => {
        // Defaults and checks use the database's clock, the one the gateway decides with.
        const now = await registryNow(db);
        const notBefore = requestedNotBefore ?? now;
        const notAfter = requestedNotAfter ?? defaultNotAfter(notBefore);
        checkValidityWindow({ notBefore, notAfter }, now, 'permission');
        // FOR SHARE: a concurrent revoke of the key or a delegation waits until these rows are in.
        const registered = await findPrincipalKey(db, keyId, { lock: 'share' });
        const delegations = await listDelegations(db, { signingKeyId: keyId, destinations, lock: 'share' });
        const principal = checkSigningAuthority(keyId, registered, key.publicKeySpkiDer, destinations, delegations);
        if (principal.notAfter && later(notAfter, principal.notAfter)) context.output.warn(`principal key ${keyId} expires at ${principal.notAfter}, before these permissions (${notAfter})`);
        for (const row of delegations) {
          if (row.notAfter && later(notAfter, row.notAfter)) context.output.warn(`the delegation of ${row.destination} expires at ${row.notAfter}, before this permission (${notAfter})`);
        }
        const rows = [];
        for (const destination of destinations) {
          const fields = permissionFields({ subjectIdentity: identity, subjectPublicKeySpkiDer: subject.spkiDer, destination, notBefore, notAfter }, keyId);
          // signPermission verifies the TPM's signature under the key just matched to the registered one.
          await insertPermission(db, await signPermission(fields, signer));
          rows.push({ permission_id: fields.permissionId, destination: fields.destination, not_before: fields.notBefore, not_after: fields.notAfter });
        }
        return rows;
      });
      return {
        data: { principal: keyId, identity, subject_fingerprint: subject.fingerprint, subject_attested: attested, permissions: granted },
        human: granted.map((p) => `${p.permission_id}\t${identity} -> ${p.destination}\tvalid ${p.not_before} .. ${p.not_after}`),
      };
    } finally {
      tpm.close();
    }
  });
}
