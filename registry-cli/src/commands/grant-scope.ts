import { findPrincipalKey, insertDelegation, listDelegations, registryNow, reopenDelegation, type DelegationRow } from '../../../registry/store.js';
import { checkValidityWindow, normaliseDestinations, timestampOption } from '../arguments.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { RefusedError } from '../errors.js';

export interface GrantScopeOptions {
  readonly notBefore?: string;
  readonly notAfter?: string;
}

export type DelegationAction = 'created' | 'reactivated' | 'updated' | 'unchanged';

/**
 * What granting a destination again does. Re-granting never fails: without an explicit window an
 * active delegation is left as it is, and a revoked, expired or not-yet-valid one is reopened from
 * now with no expiry; with `--not-before`/`--not-after` the delegation takes exactly that window.
 */
export function delegationAction(existing: DelegationRow | undefined, windowGiven: boolean): DelegationAction {
  if (!existing) return 'created';
  if (windowGiven) return existing.state === 'active' ? 'updated' : 'reactivated';
  return existing.state === 'active' ? 'unchanged' : 'reactivated';
}

function describe(row: DelegationRow): string {
  return `${row.state}, from ${row.notBefore}${row.notAfter ? ` until ${row.notAfter}` : ', no expiry'}`;
}

/** Admin: lets a principal key delegate these destinations (stored normalised, `docstore` → `docstore:443`). */
export async function grantScope(context: CommandContext, keyId: string, destinationArgs: readonly string[], options: GrantScopeOptions): Promise<CommandResult> {
  const destinations = normaliseDestinations(destinationArgs, { required: true });
  const notBefore = timestampOption('--not-before', options.notBefore);
  const notAfter = timestampOption('--not-after', options.notAfter);
  const windowGiven = notBefore !== undefined || notAfter !== undefined;
  return withRegistry(registryTarget(context), (db) =>
    transaction(db, async () => {
      const now = await registryNow(db);
      checkValidityWindow({ notBefore: notBefore ?? now, notAfter }, now, 'delegation');
      const principal = await findPrincipalKey(db, keyId, { lock: 'share' });
      if (!principal) throw new RefusedError('ERR_REFUSED_PRINCIPAL_UNKNOWN', `no principal key ${JSON.stringify(keyId)} in the registry: run register-principal first`);
      if (principal.state !== 'active') context.output.warn(`principal ${keyId} is ${principal.state}: its delegations authorise nothing until it is active`);
      const existing = new Map((await listDelegations(db, { signingKeyId: keyId, destinations, lock: 'update' })).map((row) => [row.destination, row]));
      const actions = new Map<string, DelegationAction>();
      for (const destination of destinations) {
        const action = delegationAction(existing.get(destination), windowGiven);
        actions.set(destination, action);
        const input = { signingKeyId: keyId, destination, ...(notBefore ? { notBefore } : {}), ...(notAfter ? { notAfter } : {}) };
        if (action === 'created') await insertDelegation(db, input);
        else if (action !== 'unchanged') await reopenDelegation(db, input);
      }
      const rows = await listDelegations(db, { signingKeyId: keyId, destinations });
      const scopes = rows.map((row) => ({ destination: row.destination, action: actions.get(row.destination), state: row.state, not_before: row.notBefore, not_after: row.notAfter }));
      return {
        data: { key_id: keyId, principal_state: principal.state, scopes },
        human: rows.map((row) => `${keyId} may delegate ${row.destination}: ${actions.get(row.destination)} (${describe(row)})`),
      };
    }),
  );
}
