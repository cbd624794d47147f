import { listPermissions, revokePermissions } from '../../../registry/store.js';
import { normaliseDestinations } from '../arguments.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID } from '../environment.js';
import { RefusedError, UsageError } from '../errors.js';
import { readSubjectKey, type SubjectKeyOptions } from '../subject-key.js';

export interface DeletePermissionOptions extends SubjectKeyOptions {
  readonly identity: string;
  readonly principal?: string;
}

/**
 * Revokes (never deletes: the rows stay as a record) an identity's permissions that are active or
 * not yet valid, narrowed to one subject key, one principal and some destinations when given.
 */
export async function deletePermission(context: CommandContext, destinationArgs: readonly string[], options: DeletePermissionOptions): Promise<CommandResult> {
  if (!options.identity) throw new UsageError('--identity must not be empty');
  const subject = readSubjectKey(options, DEFAULT_IDENTITY_OID, { optional: true });
  const destinations = normaliseDestinations(destinationArgs);
  const filter = {
    identity: options.identity,
    ...(subject ? { spkiDer: subject.spkiDer } : {}),
    ...(options.principal ? { signingKeyId: options.principal } : {}),
    ...(destinations.length > 0 ? { destinations } : {}),
  };
  const scope = [subject ? `key ${subject.fingerprint}` : 'any key', destinations.length > 0 ? destinations.join(', ') : 'every destination'].join(', ');
  // Like `revoke`: rows already revoked or expired are a no-op, but a filter that names no row at
  // all is a typo and must not look like success.
  const revoked = await withRegistry(registryTarget(context), (db) =>
    transaction(db, async () => {
      if ((await listPermissions(db, filter)).length === 0) {
        throw new RefusedError('ERR_REFUSED_PERMISSION_UNKNOWN', `no permission of ${options.identity}${options.principal ? ` signed by ${options.principal}` : ''} (${scope}) in the registry; nothing was revoked`);
      }
      return revokePermissions(db, filter);
    }),
  );
  return {
    data: { identity: options.identity, subject_fingerprint: subject?.fingerprint ?? null, destinations, revoked: revoked.length, permissions: revoked.map((r) => ({ permission_id: r.permissionId, destination: r.destination })) },
    human: [`revoked ${revoked.length} permission${revoked.length === 1 ? '' : 's'} of ${options.identity} (${scope})`, ...revoked.map((r) => `${r.permissionId}\t${r.destination}`)],
  };
}
