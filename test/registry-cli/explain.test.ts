import assert from 'node:assert/strict';
import { sign as cryptoSign } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { ClientHttp2Session } from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Gateway } from '../../gateway/src/gateway.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { permissionFields, signPermission } from '../../registry/signing.js';
import { insertPermission } from '../../registry/store.js';
import { explainConnect } from '../../registry-cli/src/commands/explain.js';
import type { CheckName, Explanation } from '../../registry-cli/src/explanation.js';
import { startTestGateway } from '../helpers/gateway.js';
import { gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, newP256Key, TEST_OID, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { captureLogger } from '../helpers/logs.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { at, DAY, HOUR, RegistryFixture } from '../helpers/registry-fixture.js';
import { describeRun, runCli } from './run-cli.js';

/**
 * `explain` against the negative cases of test/integration/gateway.test.ts: for each, explain must
 * name the failing check, and its verdict must be the very reason the real gateway logs for the
 * same CONNECT.
 */

let databaseUrl: string;
let fixture: RegistryFixture;
let tls: ServerTls;
let echoAuthority: string;
let gateway: Gateway;
let alice: Awaited<ReturnType<RegistryFixture['principal']>>;
let world: EchoRegistry;
let scratch: string;
const logLines: Record<string, unknown>[] = [];
const sessions: ClientHttp2Session[] = [];

async function grantedClient(identity: string, options: Parameters<RegistryFixture['permit']>[3] = {}) {
  const client = await clientCredentials({ identity });
  const permissionId = await fixture.permit(alice, { identity, spkiDer: client.spkiDer }, echoAuthority, options);
  return { client, permissionId };
}

/** The gateway's answer and the precise reason it logged for this client's CONNECT. */
async function gatewayDecision(client: ClientCredentials, authority = echoAuthority): Promise<{ status: number; detail: unknown }> {
  const session = await gatewaySession(gateway.address!.port, { caPem: tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  sessions.push(session);
  const { status, stream } = await request(session, authority);
  stream.close();
  const fingerprint = spkiFingerprint(client.spkiDer);
  const decision = logLines.findLast((l) => l.event === 'connect_decision' && l.spki_fingerprint === fingerprint);
  return { status, detail: decision?.detail };
}

function explainFor(client: ClientCredentials, identity: string, destination = echoAuthority): Promise<Explanation> {
  return explainConnect(fixture.db, { identity, destinationInput: destination, spkiDer: client.spkiDer, oid: TEST_OID });
}

/** Checks before the failing one pass, the failing one fails, the rest are not reached. */
function assertFailsAt(explanation: Explanation, check: CheckName): void {
  const statuses = explanation.checks.map((c) => c.status);
  const index = explanation.checks.findIndex((c) => c.check === check);
  const expected = explanation.checks.map((_, i) => (i < index ? 'pass' : i === index ? 'fail' : 'skip'));
  // Without --cert the identity-extension check is skipped, not passed.
  expected[0] = index === 0 ? 'fail' : 'skip';
  assert.deepEqual(statuses, expected, JSON.stringify(explanation.checks, null, 2));
}

before(async () => {
  world = await startEchoRegistry();
  ({ databaseUrl, tls, echoAuthority, fixture, alice } = world);
  gateway = await startTestGateway({ databaseUrl, tls, logger: captureLogger(logLines, 'info') });
  scratch = mkdtempSync(join(tmpdir(), 'agw-explain-'));
});

after(async () => {
  for (const session of sessions) session.destroy();
  await gateway?.close(200);
  await world?.close();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

interface Case {
  readonly name: string;
  /** The client that connects, and the identity its certificate carries. */
  readonly setup: () => Promise<{ client: ClientCredentials; identity: string }>;
  readonly reason: string;
  readonly check: CheckName;
}

const signedBy = (keyId: string) => async (identity: string, options: { principalNotBefore?: string; principalNotAfter?: string; delegate?: boolean } = {}) => {
  const principal = await fixture.principal(keyId, { notBefore: options.principalNotBefore ?? at(-DAY), ...(options.principalNotAfter ? { notAfter: options.principalNotAfter } : {}) });
  if (options.delegate !== false) await fixture.delegate(keyId, echoAuthority, { notBefore: at(-DAY) });
  const client = await clientCredentials({ identity });
  await fixture.permit(principal, { identity, spkiDer: client.spkiDer }, echoAuthority);
  return { client, identity };
};

const cases: Case[] = [
  { name: 'no permission row', setup: async () => ({ client: await clientCredentials({ identity: 'agent-nobody' }), identity: 'agent-nobody' }), reason: 'no_permission', check: 'permission_row' },
  {
    name: 'wrong identity: the row names another agent',
    setup: async () => {
      const { client } = await grantedClient('agent-right');
      return { client: await clientCredentials({ identity: 'agent-wrong', key: client }), identity: 'agent-wrong' };
    },
    reason: 'no_permission',
    check: 'permission_row',
  },
  {
    name: 'wrong key: the row names the identity with another key',
    setup: async () => {
      await grantedClient('agent-keyed');
      return { client: await clientCredentials({ identity: 'agent-keyed' }), identity: 'agent-keyed' };
    },
    reason: 'key_mismatch',
    check: 'permission_row',
  },
  { name: 'expired permission', setup: async () => ({ client: (await grantedClient('agent-expired', { notBefore: at(-2 * DAY), notAfter: at(-DAY) })).client, identity: 'agent-expired' }), reason: 'permission_expired', check: 'permission_row' },
  { name: 'permission not yet valid', setup: async () => ({ client: (await grantedClient('agent-future', { notBefore: at(HOUR), notAfter: at(DAY) })).client, identity: 'agent-future' }), reason: 'permission_not_yet_valid', check: 'permission_row' },
  {
    name: 'revoked permission row',
    setup: async () => {
      const { client, permissionId } = await grantedClient('agent-revoked');
      await fixture.db.query('UPDATE permission_registry SET revoked_at = now() WHERE permission_id = $1', [permissionId]);
      return { client, identity: 'agent-revoked' };
    },
    reason: 'permission_revoked',
    check: 'permission_row',
  },
  {
    name: 'revoked principal key',
    setup: async () => {
      const result = await signedBy('org-bob-revoked')('agent-bob');
      await fixture.db.query(`UPDATE principal_signing_keys SET revoked_at = now() WHERE key_id = 'org-bob-revoked'`);
      return result;
    },
    reason: 'principal_key_revoked',
    check: 'principal_key',
  },
  { name: 'expired principal key', setup: () => signedBy('org-carol-expired')('agent-carol', { principalNotBefore: at(-2 * DAY), principalNotAfter: at(-HOUR) }), reason: 'principal_key_expired', check: 'principal_key' },
  { name: 'principal key not yet valid', setup: () => signedBy('org-frank-future')('agent-frank', { principalNotBefore: at(HOUR) }), reason: 'principal_key_not_yet_valid', check: 'principal_key' },
  { name: 'missing delegation', setup: () => signedBy('org-dave-nodelegation')('agent-dave', { delegate: false }), reason: 'delegation_missing', check: 'delegation' },
  {
    name: 'revoked delegation',
    setup: async () => {
      const result = await signedBy('org-erin-revokeddelegation')('agent-erin');
      await fixture.db.query(`UPDATE principal_key_permissions SET revoked_at = now() WHERE signing_key_id = 'org-erin-revokeddelegation'`);
      return result;
    },
    reason: 'delegation_revoked',
    check: 'delegation',
  },
  {
    name: 'expired delegation',
    setup: async () => {
      const result = await signedBy('org-gina-expireddelegation')('agent-gina', { delegate: false });
      await fixture.delegate('org-gina-expireddelegation', echoAuthority, { notBefore: at(-2 * DAY), notAfter: at(-HOUR) });
      return result;
    },
    reason: 'delegation_expired',
    check: 'delegation',
  },
  {
    name: 'a signed field changed after signing',
    setup: async () => {
      const { client, permissionId } = await grantedClient('agent-tampered');
      await fixture.db.query("UPDATE permission_registry SET not_after = not_after + interval '1 day' WHERE permission_id = $1", [permissionId]);
      return { client, identity: 'agent-tampered' };
    },
    reason: 'signature_invalid',
    check: 'signature',
  },
  {
    name: 'a signature by another key than the named principal',
    setup: async () => {
      const mallory = newP256Key();
      const client = await clientCredentials({ identity: 'agent-forged' });
      const fields = permissionFields({ subjectIdentity: 'agent-forged', subjectPublicKeySpkiDer: client.spkiDer, destination: echoAuthority }, 'org-alice');
      const forged = await signPermission(fields, { keyId: 'org-alice', publicKeySpkiDer: mallory.spkiDer, sign: async (m) => cryptoSign('sha256', m, { key: mallory.privateKey, dsaEncoding: 'der' }) });
      await insertPermission(fixture.db, forged);
      return { client, identity: 'agent-forged' };
    },
    reason: 'signature_invalid',
    check: 'signature',
  },
];

describe('explain names the failing check, and agrees with the gateway', () => {
  for (const { name, setup, reason, check } of cases) {
    test(`${name} → ${check} fails (${reason})`, async () => {
      const { client, identity } = await setup();
      const explanation = await explainFor(client, identity);
      assert.equal(explanation.verdict.decision, 'deny');
      assert.equal(explanation.verdict.reason, reason);
      assert.equal(explanation.verdict.failed_check, check);
      assert.equal(explanation.verdict.status, 403);
      assert.equal(explanation.verdict.details, 'not_authorized');
      assertFailsAt(explanation, check);
      const fromGateway = await gatewayDecision(client);
      assert.deepEqual(fromGateway, { status: 403, detail: explanation.verdict.reason });
    });
  }

  test('a granted agent: every check passes and both say allow', async () => {
    const { client, permissionId } = await grantedClient('agent-ok');
    const explanation = await explainFor(client, 'agent-ok', echoAuthority.toUpperCase());
    assert.deepEqual(explanation.verdict, { decision: 'allow', status: 200, details: 'allowed', reason: null, failed_check: null, permission_id: permissionId });
    assert.deepEqual(explanation.checks.map((c) => c.status), ['skip', 'pass', 'pass', 'pass', 'pass', 'pass']);
    assert.equal((await gatewayDecision(client)).status, 200);
  });

  test('rows for other keys and expired rows beside a valid one: the valid one decides, as in the gateway', async () => {
    const { client, permissionId } = await grantedClient('agent-many');
    await fixture.permit(alice, { identity: 'agent-many', spkiDer: newP256Key().spkiDer }, echoAuthority);
    await fixture.permit(alice, { identity: 'agent-many', spkiDer: client.spkiDer }, echoAuthority, { notBefore: at(-2 * DAY), notAfter: at(-DAY) });
    const explanation = await explainFor(client, 'agent-many');
    assert.equal(explanation.rows.length, 3);
    assert.equal(explanation.verdict.permission_id, permissionId);
    assert.deepEqual(explanation.rows.map((r) => r.reason).sort(), [null, 'key_mismatch', 'permission_expired'].sort());
  });
});

describe('explain on the command line', { concurrency: true }, () => {
  const envFor = () => ({ ...process.env, AGENT_GATEWAY_DATABASE_URL: databaseUrl });

  test('human output names the failing check; exit 3 for a denial', async () => {
    const { client } = await signedBy('org-hank-revokeddelegation')('agent-hank');
    await fixture.db.query(`UPDATE principal_key_permissions SET revoked_at = now() WHERE signing_key_id = 'org-hank-revokeddelegation'`);
    const run = await runCli(['explain', 'agent-hank', echoAuthority, '--spki', client.spkiDer.toString('hex')], { env: envFor() });
    assert.equal(run.status, 3, describeRun(run));
    assert.match(run.stdout, /5\. FAIL delegation +the delegation of 127\.0\.0\.1:\d+ to org-hank-revokeddelegation is revoked/);
    assert.match(run.stdout, /6\. skip signature/);
    assert.match(run.stdout, /verdict: DENY \(403, proxy-status details="not_authorized"; logged reason: delegation_revoked\)/);
  });

  test('--cert without the identity extension: identity_invalid, as the gateway answers', async () => {
    const client = await clientCredentials({});
    const certPath = join(scratch, 'no-extension.pem');
    writeFileSync(certPath, client.certPem);
    const run = await runCli(['--json', 'explain', 'agent-x', echoAuthority, '--cert', certPath], { env: envFor() });
    assert.equal(run.status, 3, describeRun(run));
    assert.deepEqual([run.json.verdict.details, run.json.verdict.failed_check, run.json.checks[0].status], ['identity_invalid', 'identity_extension', 'fail']);
    assert.equal((await gatewayDecision(client)).status, 403);
  });

  test('a malformed destination is a 400, whatever else is wrong; a certificate for another identity is a usage error', async () => {
    const { client } = await grantedClient('agent-dest');
    const certPath = join(scratch, 'agent-dest.pem');
    writeFileSync(certPath, client.certPem);
    const [bad, other] = await Promise.all([
      runCli(['--json', 'explain', 'agent-dest', 'bad_host:443', '--cert', certPath], { env: envFor() }),
      runCli(['explain', 'agent-other', echoAuthority, '--cert', certPath], { env: envFor() }),
    ]);
    assert.equal(bad.status, 3, describeRun(bad));
    assert.deepEqual([bad.json.verdict.status, bad.json.verdict.details, bad.json.verdict.failed_check], [400, 'authority_invalid', 'destination']);
    assert.equal(other.status, 2, describeRun(other));
    assert.match(other.stderr, /the certificate carries identity "agent-dest", not "agent-other"/);
  });

  test('an identity argument no certificate could carry (empty, a newline, over 255 bytes) fails identity_extension as the gateway would, and no control character reaches the output', async () => {
    const spki = newP256Key().spkiDer.toString('hex');
    for (const identity of ['', 'agent-a\nb -> forged:443', 'agent-\u001b[2J', 'a'.repeat(256)]) {
      const [human, json] = await Promise.all([
        runCli(['explain', identity, echoAuthority, '--spki', spki], { env: envFor() }),
        runCli(['--json', 'explain', identity, echoAuthority, '--spki', spki], { env: envFor() }),
      ]);
      assert.equal(human.status, 3, describeRun(human));
      assert.deepEqual([json.json.verdict.details, json.json.verdict.failed_check, json.json.checks[0].status], ['identity_invalid', 'identity_extension', 'fail'], describeRun(json));
      assert.doesNotMatch(human.stdout, /[\u0000-\u0009\u000b-\u001f\u007f-\u009f]|\nb -> forged/, describeRun(human));
    }
  });
});
