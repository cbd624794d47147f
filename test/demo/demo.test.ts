/**
 * The demo end to end, as a new user runs it: setup → agents → refusals → delete → teardown.
 * Everything real (PostgreSQL, swtpm + tpm2-abrmd, tpm2-pkcs11, gateway, sidecars, curl), under
 * a private state dir with its own ports so it never touches a developer's running demo.
 */
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

const ROOT = resolve(import.meta.dirname, '../..');
const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'agw-demo-'));
const ports = { gateway: 18443, admin: 19090, pg: 15433, docstore: 19443, messaging: 19444, principalTpm: 12331, agentTpm: 12321 };
const env: NodeJS.ProcessEnv = {
  ...process.env,
  AGENT_STATE: join(dir, 'state'),
  AGENT_GATEWAY_DEMO_CERTS: join(dir, 'certs'),
  AGENT_GATEWAY_DEMO_CONFIG: join(dir, 'config.toml'),
  AGENT_GATEWAY_DEMO_GATEWAY_PORT: String(ports.gateway),
  AGENT_GATEWAY_DEMO_ADMIN_PORT: String(ports.admin),
  AGENT_GATEWAY_DEMO_PG_PORT: String(ports.pg),
  AGENT_GATEWAY_DEMO_DOCSTORE_PORT: String(ports.docstore),
  AGENT_GATEWAY_DEMO_MESSAGING_PORT: String(ports.messaging),
  AGENT_GATEWAY_DEMO_PRINCIPAL_SWTPM_PORT: String(ports.principalTpm),
  AGENT_GATEWAY_DEMO_SWTPM_PORT: String(ports.agentTpm),
};
delete env.AGENT_GATEWAY_DATABASE_URL;

const demo = (...args: string[]) => run(join(ROOT, 'demo/demo.sh'), args, { env, timeout: 600_000 });
const agent = (...args: string[]) => run(join(ROOT, 'demo/demo-agent.sh'), args, { env, timeout: 120_000 });

function listening(port: number): Promise<boolean> {
  return new Promise((resolvePort) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => (socket.destroy(), resolvePort(true)));
    socket.once('error', () => resolvePort(false));
  });
}

let tornDown = false;
before(async () => {
  for (const port of Object.values(ports)) assert.equal(await listening(port), false, `port ${port} must be free for the demo test`);
});
after(async () => {
  if (!tornDown) spawnSync(join(ROOT, 'demo/demo.sh'), ['teardown'], { env, stdio: 'ignore', timeout: 120_000 });
  rmSync(dir, { recursive: true, force: true });
});

test('setup brings the whole system up and proves docstore answers through agent-alpha', { timeout: 600_000 }, async () => {
  const started = Date.now();
  const { stderr } = await demo('setup');
  console.log(`# demo setup took ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.match(stderr, /"service":"docstore","status":"ok"/);
  assert.ok(existsSync(join(dir, 'certs/server-ca.pem')) && existsSync(join(dir, 'certs/mock-ca.pem')));
  assert.ok(existsSync(join(dir, 'config.toml')));
});

test('a second setup reuses what runs', { timeout: 300_000 }, async () => {
  const pids = readFileSync(join(dir, 'state/pids/gateway.pid'), 'utf8');
  const started = Date.now();
  await demo('setup');
  console.log(`# second demo setup took ${((Date.now() - started) / 1000).toFixed(1)} s`);
  assert.equal(readFileSync(join(dir, 'state/pids/gateway.pid'), 'utf8'), pids, 'the gateway was not restarted');
});

test('status lists each component with its PID and port', async () => {
  const { stdout } = await demo('status');
  for (const name of ['postgres', 'gateway', 'mocks', 'principal-swtpm', 'agent-alpha-sidecar', 'agent-alpha-swtpm']) {
    assert.match(stdout, new RegExp(`^${name}\\s+running\\s+\\d+\\s+`, 'm'), `${name} running`);
  }
  assert.match(stdout, new RegExp(`gateway\\s+running\\s+\\d+\\s+127\\.0\\.0\\.1:${ports.gateway}`));
  // The principal and the agent were enrolled with TPM attestation against the demo's EK CA.
  assert.match(stdout, /^key org-alice\s+attested\s+ek [0-9a-f]{16}… at \d{4}-/m);
  assert.match(stdout, /^key agent-alpha\s+attested\s+ek [0-9a-f]{16}… at \d{4}-/m);
  const metrics = await fetch(`http://127.0.0.1:${ports.admin}/metrics`);
  assert.equal(metrics.status, 200);
  assert.match(await metrics.text(), /agent_gateway_connect_decisions_total\{status="200",reason="allowed"\} \d+/);
});

test('agent-alpha reaches docstore and messaging (200)', async () => {
  const docs = await agent('run', 'agent-alpha', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://docstore/documents');
  assert.match(docs.stdout, /"documents"/);
  const messages = await agent('run', 'agent-alpha', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://messaging/messages');
  assert.match(messages.stdout, /"messages"/);
});

test('run isolates: curl --noproxy cannot go around agent-alpha\'s sidecar, though it can with --no-isolation', async () => {
  // --connect-to names the mock's real address, so only the namespace stands between curl and docstore.
  const bypass = ['curl', '-sS', '--fail', '--noproxy', '*', '--max-time', '10', '--connect-to', `docstore:443:127.0.0.1:${ports.docstore}`, 'https://docstore/health'];
  const isolated = await agent('run', 'agent-alpha', '--', ...bypass).catch((error: { code: number; stderr: string }) => error);
  assert.equal((isolated as { code: number }).code, 7, (isolated as { stderr: string }).stderr);
  const proxied = await agent('run', 'agent-alpha', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://docstore/health');
  assert.match(proxied.stdout, /"service":"docstore"/);
  const unisolated = await agent('run', 'agent-alpha', '--no-isolation', '--', ...bypass);
  assert.match(unisolated.stdout, /"service":"docstore"/);
});

test('rotate agent-alpha: new key, rows re-signed, old session drained, old rows revoked, old key destroyed; it keeps reaching docstore', { timeout: 180_000 }, async () => {
  const before = readFileSync(join(dir, 'state/agents/agent-alpha/machine-client.pem'), 'utf8');
  const { stderr } = await agent('rotate', 'agent-alpha');
  for (let step = 1; step <= 6; step++) assert.match(stderr, new RegExp(`rotate agent-alpha: ${step}/6 `), `step ${step} printed`);
  assert.match(stderr, /4\/6 old session drained: drained/);
  assert.notEqual(readFileSync(join(dir, 'state/agents/agent-alpha/machine-client.pem'), 'utf8'), before, 'machine-client.pem presents the new key');
  const docs = await agent('run', 'agent-alpha', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://docstore/documents');
  assert.match(docs.stdout, /"documents"/);
  const { stdout } = await run('psql', ['-X', '-tA', '-d', `postgres://agent_gateway_admin:agent-gateway-demo@127.0.0.1:${ports.pg}/agent_gateway`, '-c', "SELECT count(DISTINCT subject_public_key_spki_der) FILTER (WHERE revoked_at IS NULL) || ' ' || count(*) FILTER (WHERE revoked_at IS NOT NULL) FROM permission_registry WHERE subject_identity = 'agent-alpha'"], { env });
  assert.equal(stdout.trim(), '1 2', 'one active key; the old key\'s two rows revoked');
});

test('agent-beta with only messaging: docstore refused with 403 at CONNECT, messaging 200', { timeout: 120_000 }, async () => {
  const { stdout: handle } = await agent('create', '--identity', 'agent-beta', '--grant', 'messaging');
  assert.equal(handle.trim(), 'agent-beta');
  const refused = await agent('run', 'agent-beta', '--', 'curl', '-sS', '--max-time', '15', 'https://docstore/documents').catch((error: { code: number; stderr: string }) => error);
  assert.equal((refused as { code: number }).code, 56);
  assert.match((refused as { stderr: string }).stderr, /CONNECT tunnel failed, response 403/);
  const ok = await agent('run', 'agent-beta', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://messaging/messages');
  assert.match(ok.stdout, /"messages"/);
});

test('prompt without Claude Code installed says so and exits non-zero', { skip: spawnSync('sh', ['-c', 'command -v claude']).status === 0 ? 'claude is installed here' : false }, async () => {
  const result = await agent('prompt', 'agent-alpha', '--prompt', 'hi').catch((error: { code: number; stderr: string }) => error);
  assert.notEqual((result as { code: number }).code, 0);
  assert.match((result as { stderr: string }).stderr, /Claude Code \('claude'\) is not installed/);
});

test('delete both agents: their sidecars stop and their rows are revoked', { timeout: 120_000 }, async () => {
  const alphaPort = Number(readFileSync(join(dir, 'state/agents/agent-alpha/port'), 'utf8'));
  await agent('delete', 'agent-alpha');
  await agent('delete', 'agent-beta');
  assert.equal(await listening(alphaPort), false);
  assert.ok(!existsSync(join(dir, 'state/agents/agent-alpha')));
  const { stdout } = await run('psql', ['-X', '-tA', '-d', `postgres://agent_gateway_admin:agent-gateway-demo@127.0.0.1:${ports.pg}/agent_gateway`, '-c', 'SELECT count(*) FROM permission_registry WHERE revoked_at IS NULL'], { env });
  assert.equal(stdout.trim(), '0');
});

test('teardown leaves nothing running or listening', { timeout: 120_000 }, async () => {
  await demo('teardown');
  tornDown = true;
  for (const [name, port] of Object.entries(ports)) assert.equal(await listening(port), false, `${name} port ${port} still listening`);
  assert.ok(!existsSync(join(dir, 'state')) && !existsSync(join(dir, 'config.toml')));
  const ps = spawnSync('ps', ['-eo', 'stat=,args='], { encoding: 'utf8' }).stdout;
  const leftovers = ps.split('\n').filter((line) => line.includes(dir) && !line.startsWith('Z'));
  assert.deepEqual(leftovers, []);
});
