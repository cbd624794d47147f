import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { newP256Key } from '../helpers/pki.js';
import { registryDatabase, type RegistryFixture } from '../helpers/registry-fixture.js';
import { describeRun, runInProcess, type CliRun } from './run-cli.js';

/**
 * Every statement on a registry table advances registry_changes.counter and sends NOTIFY
 * agent_gateway_registry (migrations/0002, statement-level triggers), which makes every gateway
 * flush its cache and re-check its tunnels. A refused revocation, or one that finds everything
 * already revoked, changes nothing and must not advance the feed; a real one must.
 */

let registry: Awaited<ReturnType<typeof registryDatabase>>;
let databaseUrl: string;
let fixture: RegistryFixture;
let permissionIds: string[];

before(async () => {
  registry = await registryDatabase();
  ({ databaseUrl, fixture } = registry);
  const alpha = await fixture.principal('org-alpha');
  await fixture.delegate('org-alpha', 'docstore:443');
  await fixture.delegate('org-alpha', 'messaging:443');
  const spkiDer = newP256Key().spkiDer;
  permissionIds = [
    await fixture.permit(alpha, { identity: 'agent-alpha', spkiDer }, 'docstore:443'),
    await fixture.permit(alpha, { identity: 'agent-alpha', spkiDer }, 'messaging:443'),
  ];
});

after(() => registry?.close());

async function counter(): Promise<number> {
  return Number((await fixture.db.query('SELECT counter FROM registry_changes')).rows[0].counter);
}

/** Runs the command; returns the run and how far it moved the change feed. */
async function feedDelta(args: readonly string[]): Promise<{ run: CliRun; delta: number }> {
  const before = await counter();
  const run = await runInProcess(['--json', ...args], { env: { ...process.env, AGENT_GATEWAY_DATABASE_URL: databaseUrl } });
  return { run, delta: (await counter()) - before };
}

async function expectFeed(args: readonly string[], status: number, delta: number): Promise<CliRun> {
  const result = await feedDelta(args);
  assert.equal(result.run.status, status, describeRun(result.run));
  assert.equal(result.delta, delta, `${args.join(' ')}: the change feed moved by ${result.delta}\n${describeRun(result.run)}`);
  return result.run;
}

test('revoke principal: an unknown key is refused without a change; a real revoke is one change, a repeat none', async () => {
  const refused = await expectFeed(['revoke', 'principal', 'org-nobody'], 3, 0);
  assert.equal(refused.json.error.code, 'ERR_REFUSED_PRINCIPAL_UNKNOWN');
  // A principal of its own, so the other tests keep an active signer.
  await fixture.principal('org-beta');
  assert.equal((await expectFeed(['revoke', 'principal', 'org-beta'], 0, 1)).json.revoked_now, true);
  assert.equal((await expectFeed(['revoke', 'principal', 'org-beta'], 0, 0)).json.revoked_now, false);
});

test('revoke scope: an already-revoked delegation changes nothing; an unknown one is refused without a change', async () => {
  assert.deepEqual((await expectFeed(['revoke', 'scope', 'org-alpha', 'messaging'], 0, 1)).json.revoked, ['messaging:443']);
  const again = await expectFeed(['revoke', 'scope', 'org-alpha', 'messaging'], 0, 0);
  assert.deepEqual([again.json.revoked, again.json.already_revoked], [[], ['messaging:443']]);
  await expectFeed(['revoke', 'scope', 'org-alpha', 'nothere.example'], 3, 0);
});

test('revoke permission: an already-revoked permission changes nothing; an unknown id is refused without a change', async () => {
  assert.equal((await expectFeed(['revoke', 'permission', permissionIds[1]!], 0, 1)).json.revoked, 1);
  assert.equal((await expectFeed(['revoke', 'permission', permissionIds[1]!], 0, 0)).json.revoked, 0);
  await expectFeed(['revoke', 'permission', 'perm-nonexistent'], 3, 0);
});

test('delete-permission: revoking nothing changes nothing; revoking rows is one change', async () => {
  assert.equal((await expectFeed(['delete-permission', '--identity', 'agent-alpha', 'messaging'], 0, 0)).json.revoked, 0);
  await expectFeed(['delete-permission', '--identity', 'agent-nobody'], 3, 0);
  assert.equal((await expectFeed(['delete-permission', '--identity', 'agent-alpha'], 0, 1)).json.revoked, 1);
  assert.equal((await expectFeed(['delete-permission', '--identity', 'agent-alpha'], 0, 0)).json.revoked, 0);
});
