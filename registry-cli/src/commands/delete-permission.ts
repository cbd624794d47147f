import { revokePermissions } from '../../../registry/store.js';
import { normaliseDestinations } from '../arguments.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID } from '../environment.js';
import { UsageError } from '../errors.js';
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
  const revoked = await withRegistry(registryTarget(context), (db) =>
    revokePermissions(db, {
      identity: options.identity,
      ...(subject ? { spkiDer: subject.spkiDer } : {}),
      ...(options.principal ? { signingKeyId: options.principal } : {}),
      ...(destinations.length > 0 ? { destinations } : {}),
    }),
  );
  const scope = [subject ? `key ${subject.fingerprint}` : 'any key', destinations.length > 0 ? destinations.join(', ') : 'every destination'].join(', ');
  return {
    data: { identity: options.identity, subject_fingerprint: subject?.fingerprint ?? null, destinations, revoked: revoked.length, permissions: revoked.map((r) => ({ permission_id: r.permissionId, destination: r.destination })) },
    human: [`revoked ${revoked.length} permission${revoked.length === 1 ? '' : 's'} of ${options.identity} (${scope})`, ...revoked.map((r) => `${r.permissionId}\t${r.destination}`)],
  };
}
