import { spkiFingerprint } from '../../../registry/ecdsa.js';
import { permissionFields, signPermission } from '../../../registry/signing.js';
import { findPrincipalKey, insertPermission, listDelegations, listPermissions, registryNow, type PermissionRow } from '../../../registry/store.js';
import { checkTextField, checkValidityWindow, timestampOption } from '../arguments.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID, principalKeyId } from '../environment.js';
import { requireAttestedAgentKey } from '../attestation.js';
import { RefusedError } from '../errors.js';
import { checkKeyLabel, openPrincipalToken, type TokenOptions } from '../principal-token.js';
import { checkIdentity, checkOid, readSubjectKey } from '../subject-key.js';
import { checkCertificateIdentity, checkSigningAuthority, checkSigningAuthorityBeforeTpm } from './grant-permission.js';

export interface RotateKeyOptions extends TokenOptions {
  readonly principal?: string;
  readonly identity: string;
  readonly fromCert: string;
  readonly toCert: string;
  readonly oid?: string;
  readonly notBefore?: string;
  readonly notAfter?: string;
  readonly allowUnattested?: boolean;
}

/** Rows of the old key still to be used (active or not yet valid): the ones the new key must inherit. */
const inherited = (row: PermissionRow) => row.state === 'active' || row.state === 'not-yet-valid';

/**
 * Key rotation, registry half: for every permission the principal signed for IDENTITY and the old
 * key that is active or not yet valid, signs one for the new key with the same destination and
 * window (or the window given). One transaction: when the principal may no longer delegate one of
 * the destinations, or any window would be refused, nothing is written. The old rows stay until
 * the operator revokes them, once the sidecar's old session has drained (`delete-permission`).
 */
export async function rotateKey(context: CommandContext, options: RotateKeyOptions): Promise<CommandResult> {
  const keyId = checkTextField('principal key id', principalKeyId(context.env, options.principal));
  checkKeyLabel(keyId);
  const identity = checkIdentity(options.identity);
  const oid = checkOid(options.oid ?? DEFAULT_IDENTITY_OID);
  const from = readSubjectKey({ cert: options.fromCert }, oid)!;
  const to = readSubjectKey({ cert: options.toCert }, oid)!;
  const warning = checkCertificateIdentity(to, identity, oid);
  if (from.spkiDer.equals(to.spkiDer)) {
    throw new RefusedError('ERR_REFUSED_SAME_KEY', `--from-cert and --to-cert present the same key (${from.fingerprint}); a rotation needs a new key`);
  }
  const requestedNotBefore = timestampOption('--not-before', options.notBefore);
  const requestedNotAfter = timestampOption('--not-after', options.notAfter);
  if (warning) context.output.warn(warning);

  return withRegistry(registryTarget(context), async (db) => {
    // The new key is granted like any agent key: only once its TPM attestation is recorded (DESIGN §9e).
    await requireAttestedAgentKey(db, context, to, options, { key: 'the new agent key', enrol: `agent-gateway-registry enrol-agent-key --cert ${options.toCert} --key-label LABEL`, doing: 'rotating' });
    /** The principal's rows for the old key that the new key inherits; refused when there are none. */
    const toRotate = async () => {
      const old = (await listPermissions(db, { identity, spkiDer: from.spkiDer })).filter(inherited);
      const mine = old.filter((row) => row.signingKeyId === keyId);
      const others = [...new Set(old.filter((row) => row.signingKeyId !== keyId).map((row) => row.signingKeyId))];
      if (mine.length === 0) {
        throw new RefusedError(
          'ERR_REFUSED_NOTHING_TO_ROTATE',
          `principal ${keyId} signed no active or not-yet-valid permission for ${identity} with key ${from.fingerprint}${others.length > 0 ? ` (rows by ${others.join(', ')} exist: rotate with --principal)` : ''}; nothing was written`,
        );
      }
      return { mine, others, destinations: [...new Set(mine.map((row) => row.destination))] };
    };
    // What the registry alone refuses (nothing to rotate, an unknown or inactive principal, a
    // destination out of its scope) is said before the TPM is asked, as grant-permission does; the
    // transaction checks it again, with the TPM's key, under its locks.
    await checkSigningAuthorityBeforeTpm(db, keyId, (await toRotate()).destinations);
    const tpm = await openPrincipalToken(context, options, { create: false });
    try {
      const key = tpm.findKey(keyId);
      const signer = tpm.permissionSigner(key, keyId);
      const result = await transaction(db, async () => {
        const now = await registryNow(db);
        const { mine, others, destinations } = await toRotate();
        const registered = await findPrincipalKey(db, keyId, { lock: 'share' });
        const delegations = await listDelegations(db, { signingKeyId: keyId, destinations, lock: 'share' });
        checkSigningAuthority(keyId, registered, key.publicKeySpkiDer, destinations, delegations);
        // A rerun after success finds the new rows already there: sign only what is missing.
        const present = new Set((await listPermissions(db, { identity, spkiDer: to.spkiDer, signingKeyId: keyId })).filter(inherited).map((row) => row.destination));
        const rows = [];
        for (const row of mine) {
          if (present.has(row.destination)) continue;
          present.add(row.destination);
          const notBefore = requestedNotBefore ?? row.notBefore;
          const notAfter = requestedNotAfter ?? row.notAfter;
          checkValidityWindow({ notBefore, notAfter }, now, `permission for ${row.destination}`);
          const fields = permissionFields({ subjectIdentity: identity, subjectPublicKeySpkiDer: to.spkiDer, destination: row.destination, notBefore, notAfter }, keyId);
          await insertPermission(db, await signPermission(fields, signer));
          rows.push({ permission_id: fields.permissionId, replaces: row.permissionId, destination: fields.destination, not_before: fields.notBefore, not_after: fields.notAfter });
        }
        return { rows, others };
      });
      for (const other of result.others) context.output.warn(`rows signed by ${other} for the old key were not rotated: rotate them with --principal ${other}`);
      return {
        data: { principal: keyId, identity, from_fingerprint: from.fingerprint, to_fingerprint: spkiFingerprint(to.spkiDer), permissions: result.rows },
        human: [
          `${identity}: ${result.rows.length} permission${result.rows.length === 1 ? '' : 's'} signed for ${to.fingerprint} (was ${from.fingerprint}); revoke the old ones once the sidecar has drained its old session`,
          ...result.rows.map((p) => `${p.permission_id}\t${identity} -> ${p.destination}\tvalid ${p.not_before} .. ${p.not_after}\treplaces ${p.replaces}`),
        ],
      };
    } finally {
      tpm.close();
    }
  });
}
