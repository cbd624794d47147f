import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { auditFilter } from '../../registry-cli/src/commands/audit.js';
import { startTestGateway } from '../helpers/gateway.js';
import { gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, serverTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { runCli } from './run-cli.js';

let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;

before(async () => {
  pgServer = await testServer();
  databaseUrl = await createDatabase(pgServer.url);
  const tls = await serverTls();
  const gateway = await startTestGateway({ databaseUrl, tls });
  const client = await clientCredentials({ identity: 'agent-audited' });
  const session = await gatewaySession(gateway.address!.port, { caPem: tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  for (const authority of ['docstore:443', 'messaging:443', 'bad_host:1']) (await request(session, authority)).stream.close();
  session.destroy();
  await gateway.close(100); // flushes the audit queue
});
after(() => pgServer?.close());

const env = () => ({ ...process.env, AGENT_GATEWAY_DATABASE_URL: databaseUrl });

test('audit lists every decision, newest first', async () => {
  const run = await runCli(['audit', '--json'], { env: env() });
  assert.equal(run.status, 0, run.stderr);
  const rows = run.json.rows as { identity: string; status: number; reason: string; destination: string | null }[];
  assert.deepEqual(rows.map((r) => [r.status, r.reason, r.destination]), [
    [400, 'authority_invalid', null],
    [403, 'not_authorized', 'messaging:443'],
    [403, 'not_authorized', 'docstore:443'],
  ]);
  assert.ok(rows.every((r) => r.identity === 'agent-audited'));
});

test('audit filters by identity, destination (normalised), status and time', async () => {
  const byDestination = await runCli(['audit', '--json', '--destination', 'DocStore', '--status', '403'], { env: env() });
  assert.deepEqual(byDestination.json.rows.map((r: { destination: string }) => r.destination), ['docstore:443']);
  const nobody = await runCli(['audit', '--json', '--identity', 'agent-nobody'], { env: env() });
  assert.deepEqual(nobody.json.rows, []);
  const future = await runCli(['audit', '--json', '--since', '2999-01-01T00:00:00Z'], { env: env() });
  assert.deepEqual(future.json.rows, []);
  const human = await runCli(['audit', '--reason', 'authority_invalid'], { env: env() });
  assert.match(human.stdout, /^AT\s+STATUS\s+REASON/m);
  assert.match(human.stdout, /400\s+authority_invalid/);
});

const refusals: [string, Record<string, string>][] = [
  ['a status that is not a number', { status: '40x' }],
  ['a destination that does not normalise', { destination: 'bad_host' }],
  ['a limit that is not a whole number', { limit: '-1' }],
];
for (const [name, options] of refusals) {
  test(`audit refuses ${name} before touching the database`, () => {
    assert.throws(() => auditFilter(options), { name: 'UsageError' });
  });
}

test('a time without a zone is a usage error (exit 2)', async () => {
  const run = await runCli(['audit', '--since', '2026-01-01T00:00:00'], { env: env() });
  assert.equal(run.status, 2);
  assert.match(run.stderr, /since: expected an RFC 3339 timestamp with a zone/);
});
