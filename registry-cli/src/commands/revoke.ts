import { listDelegations, listPermissions, revokeDelegations, revokePermissions, revokePrincipalKey } from '../../../registry/store.js';
import { normaliseDestinations } from '../arguments.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { RefusedError } from '../errors.js';

/**
 * Revocation sets revoked_at = now(); nothing is deleted. Revoking what is already revoked is a
 * no-op success; naming something that does not exist is refused (a typo must not look like success).
 */

export async function revokePrincipal(context: CommandContext, keyId: string): Promise<CommandResult> {
  const result = await withRegistry(registryTarget(context), (db) => transaction(db, () => revokePrincipalKey(db, keyId)));
  if (!result) throw new RefusedError('ERR_REFUSED_PRINCIPAL_UNKNOWN', `no principal key ${JSON.stringify(keyId)} in the registry`);
  const { row, revokedNow } = result;
  return {
    data: { key_id: keyId, revoked_now: revokedNow, revoked_at: row.revokedAt },
    human: [revokedNow ? `revoked principal ${keyId} at ${row.revokedAt}: every permission it signed is denied from now on` : `principal ${keyId} was already revoked at ${row.revokedAt}; nothing changed`],
  };
}

export async function revokeScope(context: CommandContext, keyId: string, destinationArgs: readonly string[]): Promise<CommandResult> {
  const destinations = normaliseDestinations(destinationArgs, { required: true });
  const revoked = await withRegistry(registryTarget(context), (db) =>
    transaction(db, async () => {
      const existing = new Set((await listDelegations(db, { signingKeyId: keyId, destinations, lock: 'update' })).map((row) => row.destination));
      const unknown = destinations.filter((destination) => !existing.has(destination));
      if (unknown.length > 0) throw new RefusedError('ERR_REFUSED_SCOPE_UNKNOWN', `principal ${keyId} has no delegation for ${unknown.join(', ')}; nothing was revoked`);
      return revokeDelegations(db, keyId, destinations);
    }),
  );
  const already = destinations.filter((destination) => !revoked.includes(destination));
  return {
    data: { key_id: keyId, revoked, already_revoked: already },
    human: [
      ...revoked.map((destination) => `revoked the delegation of ${destination} to ${keyId}: permissions it signed for it are denied from now on`),
      ...already.map((destination) => `the delegation of ${destination} to ${keyId} was already revoked`),
    ],
  };
}

export async function revokePermissionIds(context: CommandContext, permissionIds: readonly string[]): Promise<CommandResult> {
  const ids = [...new Set(permissionIds)];
  const revoked = await withRegistry(registryTarget(context), (db) =>
    transaction(db, async () => {
      const known = new Set((await listPermissions(db, { permissionIds: ids })).map((row) => row.permissionId));
      const unknown = ids.filter((id) => !known.has(id));
      if (unknown.length > 0) throw new RefusedError('ERR_REFUSED_PERMISSION_UNKNOWN', `no permission ${unknown.join(', ')} in the registry; nothing was revoked`);
      return revokePermissions(db, { permissionIds: ids });
    }),
  );
  return {
    data: { revoked: revoked.length, permissions: revoked.map((r) => ({ permission_id: r.permissionId, destination: r.destination })) },
    human: [`revoked ${revoked.length} permission${revoked.length === 1 ? '' : 's'} (already revoked or expired ones are left as they are)`, ...revoked.map((r) => `${r.permissionId}\t${r.destination}`)],
  };
}
