import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import type { ClientHttp2Session } from 'node:http2';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import type { Gateway } from '../../gateway/src/gateway.js';
import { startTestGateway } from '../helpers/gateway.js';
import { echoServer, exchange, gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, serverTls, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';
import { pastFeedBound } from '../helpers/wait.js';
import { describeRun, REPO, runCli, runFile } from './run-cli.js';

/**
 * The spec's manual three-window demo through the operator scripts, run from another directory:
 * principal registers its TPM key, admin grants the scope, principal grants the agent; then the
 * gateway lets the agent through, and the delete revokes it.
 */

const SCRIPTS = join(REPO, 'registry-cli');
let tpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let databaseUrl: string;
let tls: ServerTls;
let echo: Awaited<ReturnType<typeof echoServer>>;
let gateway: Gateway;
let workDir: string;
const sessions: ClientHttp2Session[] = [];

/** The principal's shell reaches the TPM; the admin's shell has only the database. */
let principalShell: NodeJS.ProcessEnv;
let adminShell: NodeJS.ProcessEnv;

function script(name: string, args: readonly string[], env: NodeJS.ProcessEnv) {
  return runFile(join(SCRIPTS, name), args, { env, cwd: workDir });
}

async function connect(client: ClientCredentials, authority: string): Promise<number> {
  const session = await gatewaySession(gateway.address!.port, { caPem: tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  sessions.push(session);
  const { status, stream } = await request(session, authority);
  if (status === 200) assert.equal((await exchange(stream, Buffer.from(`hello ${authority}`))).toString(), `hello ${authority}`);
  else stream.close();
  return status;
}

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), 'agw-scripts-'));
  // Manufactured with an EK certificate: the principal's key is enrolled with attestation.
  tpm = await startSwtpm({ ekCaDir: join(workDir, 'ek-ca') });
  pgServer = await testServer();
  databaseUrl = await createDatabase(pgServer.url, { migrate: false });
  tls = await serverTls();
  echo = await echoServer();
  const base: NodeJS.ProcessEnv = { ...process.env, AGENT_GATEWAY_DATABASE_URL: databaseUrl };
  for (const name of ['DATABASE_URL', 'AGENT_GATEWAY_TPM_TOKEN', 'AGENT_GATEWAY_PRINCIPAL_KEY_ID', 'AGENT_GATEWAY_TPM_USER_PIN', 'AGENT_GATEWAY_TPM_SO_PIN']) delete base[name];
  adminShell = base;
  principalShell = { ...base, ...tpm.env, ...QUIET_TPM_LOG_ENV, AGENT_GATEWAY_TPM_USER_PIN: 'walkthrough-user-pin', AGENT_GATEWAY_TPM_SO_PIN: 'walkthrough-so-pin', AGENT_GATEWAY_EK_CA_FILE: join(workDir, 'ek-ca', 'ca.pem') };
  // Migrations first, as the README says, then the gateway with the demo's names resolved locally.
  const migrated = await runCli(['migrate'], { env: adminShell });
  assert.equal(migrated.status, 0, describeRun(migrated));
  const local = `127.0.0.1:${echo.port}`;
  gateway = await startTestGateway({ databaseUrl, tls, resolve: { 'docstore:443': local, 'messaging:443': local, 'api.anthropic.com:443': local } });
});

after(async () => {
  for (const session of sessions) session.destroy();
  await gateway?.close(200);
  await echo?.close();
  pgServer?.close();
  await tpm?.stop();
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

test('the three-window walkthrough: the CONNECT is allowed, and delete revokes it', async () => {
  // Principal shell: enrol the principal TPM public key.
  const registered = await script('register-principal-key.sh', ['org-alice'], principalShell);
  assert.equal(registered.status, 0, describeRun(registered));
  assert.match(registered.stdout, /registered public key sha256:[0-9a-f]{64}/);
  assert.match(registered.stdout, /attestation: TPM-attested \(EK [0-9a-f]{16}…/);

  // Admin shell (no TPM): grant destination delegation authority to that principal.
  const scoped = await script('grant-principal-scope.sh', ['org-alice', 'docstore', 'messaging', 'api.anthropic.com'], adminShell);
  assert.equal(scoped.status, 0, describeRun(scoped));
  assert.match(scoped.stdout, /org-alice may delegate docstore:443: created/);

  // Principal shell: the agent's carrier certificate (the sidecar writes machine-client.pem) gets
  // its signed permissions; the path is relative to the shell's working directory. This agent's
  // key is a software key, so nothing attests it: the grant says so explicitly.
  const agent = await clientCredentials({ identity: 'agent-alpha' });
  writeFileSync(join(workDir, 'machine-client.pem'), agent.certPem);
  const granted = await script('agent-permissions.sh', ['grant', '--identity', 'agent-alpha', '--cert', 'machine-client.pem', '--grant', 'docstore', '--grant', 'messaging', '--allow-unattested'], { ...principalShell, AGENT_GATEWAY_PRINCIPAL_KEY_ID: 'org-alice' });
  assert.equal(granted.status, 0, describeRun(granted));
  const lines = granted.stdout.trim().split('\n');
  assert.deepEqual(lines.map((line) => line.split('\t').slice(0, 2)), [
    [lines[0]!.split('\t')[0], 'agent-alpha -> docstore:443'],
    [lines[1]!.split('\t')[0], 'agent-alpha -> messaging:443'],
  ]);
  assert.ok(lines.every((line) => /^perm-[0-9a-f-]{36}\t/.test(line)));

  assert.equal(await connect(agent, 'docstore'), 200);
  assert.equal(await connect(agent, 'messaging:443'), 200);
  assert.equal(await connect(agent, 'api.anthropic.com'), 403, 'delegated to the principal, but not granted to this agent');

  // Principal shell: delete the agent when finished.
  const deleted = await script('agent-permissions.sh', ['delete', '--identity', 'agent-alpha', '--cert', 'machine-client.pem'], adminShell);
  assert.equal(deleted.status, 0, describeRun(deleted));
  assert.match(deleted.stdout, /^revoked 2 permissions of agent-alpha/);
  await pastFeedBound();
  assert.equal(await connect(agent, 'docstore'), 403);
});

test('every script answers --help, and works through a symlink from anywhere', async () => {
  const runs = await Promise.all([
    script('register-principal-key.sh', ['--help'], adminShell),
    script('grant-principal-scope.sh', ['--help'], adminShell),
    script('agent-permissions.sh', ['--help'], adminShell),
    script('agent-permissions.sh', ['grant', '--help'], adminShell),
    script('agent-permissions.sh', ['delete', '--help'], adminShell),
  ]);
  for (const run of runs) assert.equal(run.status, 0, describeRun(run));
  assert.match(runs[0]!.stdout, /Usage: agent-gateway-registry register-principal \[options\] <key-id>/);
  assert.match(runs[1]!.stdout, /Usage: agent-gateway-registry grant-scope \[options\] <key-id> <destinations\.\.\.>/);
  assert.match(runs[2]!.stdout, /agent-permissions\.sh grant --identity ID/);
  assert.match(runs[3]!.stdout, /--grant <destination>/);
  assert.match(runs[4]!.stdout, /Usage: agent-gateway-registry delete-permission/);

  const wrong = await script('agent-permissions.sh', ['revoke'], adminShell);
  assert.equal(wrong.status, 2, describeRun(wrong));
  assert.match(wrong.stderr, /expected 'grant' or 'delete', not 'revoke'/);

  const link = join(workDir, 'scope.sh');
  symlinkSync(join(SCRIPTS, 'grant-principal-scope.sh'), link);
  const linked = await runFile(link, ['org-alice', 'docstore'], { env: adminShell, cwd: tmpdir() });
  assert.equal(linked.status, 0, describeRun(linked));
  assert.match(linked.stdout, /docstore:443: unchanged/);
});
