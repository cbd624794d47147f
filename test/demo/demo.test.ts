/**
 * The demo end to end, as a new user runs it: setup → agents → refusals → Claude Code → operator
 * revocations → delete → teardown. Everything real (PostgreSQL, swtpm + tpm2-abrmd, tpm2-pkcs11,
 * gateway, sidecars, curl, wget, git, openssl, the real Claude Code binary against the scripted
 * Messages API), under a private state dir with its own ports so it never touches a developer's
 * running demo. Claude Code is installed once into ~/.cache/agent-gateway (outside the clone, so
 * CI's clean clones reuse it).
 */
import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

const ROOT = resolve(import.meta.dirname, '../..');
const run = promisify(execFile);
const dir = mkdtempSync(join(tmpdir(), 'agw-demo-'));

function listening(port: number): Promise<boolean> {
  return new Promise((resolvePort) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => (socket.destroy(), resolvePort(true)));
    socket.once('error', () => resolvePort(false));
  });
}

/**
 * Ten consecutive free ports below the ephemeral range, at a random base: other worktrees run this
 * test (and their own demos) on the same machine. The swtpm ports need their control port (+1).
 */
async function demoPorts() {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20_000 + 10 * Math.floor(Math.random() * 1200);
    const block = Array.from({ length: 10 }, (_, i) => base + i);
    if ((await Promise.all(block.map(listening))).some(Boolean)) continue;
    return { gateway: base, admin: base + 1, pg: base + 2, docstore: base + 3, messaging: base + 4, anthropic: base + 5, principalTpm: base + 6, agentTpm: base + 8 };
  }
  throw new Error('no block of 10 free ports found for the demo test');
}
const ports = await demoPorts();
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
  AGENT_GATEWAY_DEMO_ANTHROPIC_PORT: String(ports.anthropic),
  AGENT_GATEWAY_DEMO_PRINCIPAL_SWTPM_PORT: String(ports.principalTpm),
  AGENT_GATEWAY_DEMO_SWTPM_PORT: String(ports.agentTpm),
};
delete env.AGENT_GATEWAY_DATABASE_URL;
delete env.AGENT_GATEWAY_DEMO_REAL_CLAUDE;
const adminUrl = `postgres://agent_gateway_admin:agent-gateway-demo@127.0.0.1:${ports.pg}/agent_gateway`;

const demo = (...args: string[]) => run(join(ROOT, 'demo/demo.sh'), args, { env, timeout: 600_000 });
const agent = (...args: string[]) => run(join(ROOT, 'demo/demo-agent.sh'), args, { env, timeout: 120_000 });
type Failed = { code: number; stdout: string; stderr: string };
const failure = (promise: Promise<unknown>) => promise.then(() => assert.fail('expected a non-zero exit'), (error: Failed) => error);
/** A fresh shell with nothing but what `eval "$(SCRIPT env ...)"` gives it. */
const freshShell = (exports: string, script: string) =>
  run('env', ['-i', `HOME=${process.env.HOME}`, 'PATH=/usr/bin:/bin', 'bash', '-c', `${exports}\n${script}`], { cwd: ROOT, timeout: 60_000 });
const registry = (...args: string[]) => run(process.execPath, [join(ROOT, 'bin/agent-gateway-registry.js'), ...args], { env: { ...env, AGENT_GATEWAY_DATABASE_URL: adminUrl } });
const gatewayLog = () => readFileSync(join(dir, 'state/logs/gateway.log'), 'utf8');

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
  const text = await metrics.text();
  assert.match(text, /agent_gateway_connect_decisions_total\{status="200",reason="allowed"\} \d+/);
  // setup waits for the gateway's own "listening" line instead of probing its TLS port
  assert.match(text, /agent_gateway_tls_handshake_failures_total\{reason="error"\} 0$/m);
});

test('--help exits 0 and names a README that exists; an unknown command exits 2', async () => {
  for (const script of ['demo/demo.sh', 'demo/demo-agent.sh']) {
    const { stdout } = await run(join(ROOT, script), ['--help'], { env });
    assert.match(stdout, /setup|create/);
    assert.doesNotMatch(stdout, /set -euo|shellcheck/, 'the usage text is the comment block only');
    assert.equal((await failure(run(join(ROOT, script), ['bogus'], { env }))).code, 2);
  }
  const { stdout } = await demo('--help');
  assert.match(stdout, /demo\/README\.md/);
  assert.ok(existsSync(join(ROOT, 'demo/README.md')));
});

test('demo.sh env: a fresh shell runs the registry CLI against the demo, explain included (the certificate path from list)', async () => {
  const { stdout: exports } = await demo('env');
  const { stdout: agents } = await agent('list');
  const cert = new RegExp(`^agent-alpha\\s+running\\s+127\\.0\\.0\\.1:\\d+\\s+(\\S+machine-client\\.pem)$`, 'm').exec(agents)?.[1];
  assert.ok(cert && existsSync(cert), agents);
  const { stdout } = await freshShell(exports, `node bin/agent-gateway-registry.js list scopes && node bin/agent-gateway-registry.js explain agent-alpha docstore --cert ${cert}`);
  assert.match(stdout, /org-alice\s+api\.anthropic\.com:443\s+active/);
  assert.match(stdout, /allow/i);
});

test('demo-agent.sh env: in a fresh shell curl, wget, git and openssl reach docstore and verify it against the demo CA', async () => {
  const { stdout: exports } = await agent('env', 'agent-alpha');
  const { stdout } = await freshShell(exports, [
    'curl -sS --fail --max-time 15 https://docstore/health',
    'wget -qO- --timeout=15 https://docstore/health',
    // a TLS-verified 404 from the mock: git got through the proxy and trusted the certificate
    'git ls-remote https://docstore/repo.git 2>&1 | grep -o "not found"',
    'echo | openssl s_client -connect docstore:443 -proxy "${HTTPS_PROXY#http://}" -verify_return_error -brief 2>&1 | grep -o "Verification: OK"',
  ].join(' && '));
  assert.deepEqual(stdout.trim().split('\n'), ['{"service":"docstore","status":"ok"}', '{"service":"docstore","status":"ok"}', 'not found', 'Verification: OK']);
});

test('run: an inherited CA variable of another client does not win over the demo CA', async () => {
  const inherited = { ...env, REQUESTS_CA_BUNDLE: '/nonexistent.pem', GIT_SSL_CAINFO: '/nonexistent.pem', SSL_CERT_FILE: '/nonexistent.pem', CURL_CA_BUNDLE: '/nonexistent.pem' };
  const { stdout } = await run(join(ROOT, 'demo/demo-agent.sh'), ['run', 'agent-alpha', '--', 'bash', '-c', 'git ls-remote https://docstore/repo.git 2>&1 | grep -o "not found"; curl -sS https://docstore/health'], { env: inherited, timeout: 60_000 });
  assert.match(stdout, /not found\n\{"service":"docstore","status":"ok"\}/);
});

test('a plain GET to a sidecar port says what the port is instead of "Invalid URL"', async () => {
  const port = readFileSync(join(dir, 'state/agents/agent-alpha/port'), 'utf8').trim();
  const response = await fetch(`http://127.0.0.1:${port}/`);
  assert.equal(response.status, 400);
  const body = await response.text();
  assert.doesNotMatch(body, /Invalid URL/);
  assert.match(body, /HTTPS_PROXY/, 'it says how the port is used');
});

test('demo.sh logs follows the gateway log in readable form', async () => {
  const child = spawn(join(ROOT, 'demo/demo.sh'), ['logs', 'gateway'], { env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
  try {
    const deadline = Date.now() + 30_000;
    while (!/INFO.*agent-gateway listening/.test(output) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.match(output, /INFO.*agent-gateway listening/);
    assert.doesNotMatch(output, /^\{"level"/m, 'pretty, not JSON');
  } finally {
    process.kill(-child.pid!, 'SIGTERM');
  }
  const missing = await failure(demo('logs', 'agent-nobody'));
  assert.match(missing.stderr, /no component 'agent-nobody'/);
});

test('agent-alpha reaches docstore and messaging (200)', async () => {
  const docs = await agent('run', 'agent-alpha', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://docstore/documents');
  assert.match(docs.stdout, /"documents"/);
  const messages = await agent('run', 'agent-alpha', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://messaging/messages');
  assert.match(messages.stdout, /"messages"/);
});

test('a create that fails (a grant outside the scope) rolls back: nothing runs, no state, and a retry works', { timeout: 120_000 }, async () => {
  const failed = await failure(agent('create', '--identity', 'agent-half', '--grant', 'example.com'));
  assert.match(failed.stderr, /may not delegate example\.com:443/);
  assert.match(failed.stderr, /create failed; stopped what it started/);
  assert.ok(!existsSync(join(dir, 'state/agents/agent-half')));
  const ps = spawnSync('ps', ['-eo', 'stat=,args='], { encoding: 'utf8' }).stdout;
  assert.deepEqual(ps.split('\n').filter((line) => line.includes(join(dir, 'state/agents/agent-half')) && !line.startsWith('Z')), []);
  const { stdout: agents } = await agent('list');
  assert.doesNotMatch(agents, /agent-half/);
  const { stdout: retried } = await agent('create', '--identity', 'agent-half', '--grant', 'messaging');
  assert.equal(retried.trim(), 'agent-half');
  await agent('delete', 'agent-half');
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
  const { stdout } = await run('psql', ['-X', '-tA', '-d', `postgres://agent_gateway_admin:agent-gateway-demo@127.0.0.1:${ports.pg}/agent_gateway`, '-c', "SELECT count(DISTINCT subject_public_key_spki_der) FILTER (WHERE revoked_at IS NULL) || ' ' || count(*) FILTER (WHERE revoked_at IS NULL) || ' ' || count(*) FILTER (WHERE revoked_at IS NOT NULL) FROM permission_registry WHERE subject_identity = 'agent-alpha'"], { env });
  const [activeKeys = 0, active = 0, revoked = 0] = stdout.trim().split(' ').map(Number);
  assert.equal(activeKeys, 1, 'one active key');
  assert.ok(active >= 2, `the new key holds the old key's rows (${active})`);
  assert.equal(revoked, active, 'each of the old key\'s rows revoked');
});

test('agent-beta with only messaging: docstore refused with 403 at CONNECT, messaging 200', { timeout: 120_000 }, async () => {
  const { stdout: handle } = await agent('create', '--identity', 'agent-beta', '--grant', 'messaging', '--grant', 'api.anthropic.com');
  assert.equal(handle.trim(), 'agent-beta');
  const refused = await agent('run', 'agent-beta', '--', 'curl', '-sS', '--max-time', '15', 'https://docstore/documents').catch((error: { code: number; stderr: string }) => error);
  assert.equal((refused as { code: number }).code, 56);
  assert.match((refused as { stderr: string }).stderr, /CONNECT tunnel failed, response 403/);
  const ok = await agent('run', 'agent-beta', '--', 'curl', '-sS', '--fail', '--max-time', '15', 'https://messaging/messages');
  assert.match(ok.stdout, /"messages"/);
});

test('run hides the other agents and the TPM state: agent-alpha cannot reach agent-beta\'s sidecar socket or read a TPM\'s state, and still reaches docstore', async () => {
  const betaSocket = join(dir, 'state/agents/agent-beta/socket/proxy.sock');
  const tpmStates = [join(dir, 'state/agents/agent-alpha/tpm'), join(dir, 'state/agents/agent-beta/tpm'), join(dir, 'state/principal-tpm')];
  // Outside, both are there, so each check inside can fail.
  assert.ok(statSync(betaSocket).isSocket(), 'agent-beta\'s sidecar socket exists');
  assert.ok(tpmStates.every((path) => readdirSync(path).length > 0), 'the TPM state dirs hold files');
  const script = `curl -sS --max-time 5 --unix-socket "$1" http://x/ >/dev/null 2>&1 && echo "beta socket: reachable"; shift
for d in "$@"; do [ -z "$(ls -A "$d" 2>/dev/null)" ] || echo "readable: $d"; done
curl -sS --fail --max-time 15 https://docstore/health`;
  const { stdout } = await agent('run', 'agent-alpha', '--', 'sh', '-c', script, 'sh', betaSocket, ...tpmStates);
  assert.doesNotMatch(stdout, /reachable|readable/);
  assert.match(stdout, /"service":"docstore"/);
});

test('prompt: the real Claude Code, installed on first use, asks the scripted Messages API through the gateway and quotes the documents', { timeout: 600_000 }, async () => {
  const started = Date.now();
  // The user's own account settings, inherited, must not send the demo's run elsewhere.
  const userEnv = { ...env, ANTHROPIC_BASE_URL: 'https://elsewhere.invalid', ANTHROPIC_API_KEY: 'the-users-key' };
  const { stdout, stderr } = await run(join(ROOT, 'demo/demo-agent.sh'), ['prompt', 'agent-alpha', '--prompt', 'Access https://docstore/documents using curl'], { env: userEnv, timeout: 600_000 });
  const installed = /installed in (\d+) s \(([^)]+)\)/.exec(stderr);
  console.log(`# prompt took ${((Date.now() - started) / 1000).toFixed(1)} s${installed ? ` (first install: ${installed[1]} s, ${installed[2]})` : ' (Claude Code already installed)'}`);
  assert.match(stdout, /"id":"doc-1","title":"Quarterly plan"/);
  const decisions = gatewayLog().split('\n').filter((line) => line.includes('"event":"connect_decision"') && line.includes('"identity":"agent-alpha"'));
  for (const destination of ['api.anthropic.com:443', 'docstore:443']) {
    assert.ok(decisions.some((line) => line.includes(`"destination":"${destination}","status":200`)), `decision log: ${destination}`);
    const { stdout: audit } = await registry('--json', 'audit', '--identity', 'agent-alpha', '--destination', destination, '--reason', 'allowed');
    assert.ok((JSON.parse(audit) as { rows: unknown[] }).rows.length > 0, `audit rows: ${destination}`);
  }
  const mocks = readFileSync(join(dir, 'state/logs/mock-services.log'), 'utf8');
  const asked = (method: string, path: string) => mocks.split(`"service":"anthropic","method":"${method}","path":"${path}","status":200`).length - 1;
  // At least once each (Claude Code may ask again on a slow machine).
  assert.ok(asked('GET', '/api/claude_code/settings') >= 1);
  assert.ok(asked('GET', '/api/claude_code/policy_limits') >= 1);
  assert.ok(asked('POST', '/v1/messages?beta=true') >= 2, 'the prompt, then the tool result');
});

test('prompt from an agent without the docstore grant: Claude Code\'s tool gets the refusal, and the answer says so', { timeout: 300_000 }, async () => {
  const { stdout } = await agent('prompt', 'agent-beta', '--prompt', 'Access https://docstore/documents using curl');
  assert.match(stdout, /The command failed/);
  assert.match(stdout, /CONNECT tunnel failed, response 403/);
  assert.doesNotMatch(stdout, /Quarterly plan/);
});

test('AGENT_GATEWAY_DEMO_REAL_CLAUDE=1: setup stops resolving api.anthropic.com, and prompt runs the user\'s own claude with their credentials through the sidecar', { timeout: 300_000 }, async () => {
  // A stand-in for the user's installed, logged-in claude: it reports what it was given.
  const bin = join(dir, 'user-bin');
  mkdirSync(bin);
  writeFileSync(join(bin, 'claude'), '#!/bin/sh\necho "key=${ANTHROPIC_API_KEY:-unset} config=${CLAUDE_CONFIG_DIR:-unset} proxy=${HTTPS_PROXY:-unset} quiet=$CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC args=$*"\n', { mode: 0o755 });
  const realEnv = { ...env, AGENT_GATEWAY_DEMO_REAL_CLAUDE: '1', PATH: `${bin}:${env.PATH}`, ANTHROPIC_API_KEY: 'the-users-key', CLAUDE_CONFIG_DIR: undefined };
  const prompt = (promptEnv: NodeJS.ProcessEnv) => run(join(ROOT, 'demo/demo-agent.sh'), ['prompt', 'agent-alpha', '--prompt', 'hi'], { env: promptEnv });
  // The user's credentials never go to the mock: the gateway must be set up for the real API first.
  assert.match((await failure(prompt(realEnv))).stderr, /AGENT_GATEWAY_DEMO_REAL_CLAUDE=1 \.\/demo\/demo\.sh setup first/);
  const { stderr } = await run(join(ROOT, 'demo/demo.sh'), ['setup'], { env: realEnv, timeout: 300_000 });
  assert.match(stderr, /gateway: restarting with the new/);
  assert.doesNotMatch(readFileSync(join(dir, 'config.toml'), 'utf8'), /^"api\.anthropic\.com:443"/m);
  const { stdout } = await prompt(realEnv);
  assert.match(stdout, /^key=the-users-key config=unset proxy=http:\/\/127\.0\.0\.1:\d+ quiet=1 args=-p hi --allowedTools Bash\(curl:\*\)$/m);
  assert.match((await failure(prompt(env))).stderr, /sends api\.anthropic\.com to the real API/);
});

test('setup never re-grants what an operator revoked: a delegation, a permission', { timeout: 300_000 }, async () => {
  await registry('revoke', 'scope', 'org-alice', 'messaging');
  await registry('delete-permission', '--identity', 'agent-alpha', 'docstore');
  const { stderr } = await demo('setup');
  assert.match(stderr, /gateway: restarting with the new/, 'back to the scripted Messages API');
  assert.match(stderr, /the delegation of messaging:443 to org-alice is revoked; setup leaves it so/);
  assert.match(stderr, /check: skipped, agent-alpha holds no active docstore permission/);
  const { stdout } = await registry('--json', 'list');
  const listed = JSON.parse(stdout) as { scopes: { destination: string; state: string }[]; permissions: { identity: string; destination: string; state: string }[] };
  assert.equal(listed.scopes.find((row) => row.destination === 'messaging:443')?.state, 'revoked');
  // Every docstore row agent-alpha ever held (one per key, since rotation) stays revoked.
  const docstoreRows = listed.permissions.filter((row) => row.identity === 'agent-alpha' && row.destination === 'docstore:443').map((row) => row.state);
  assert.ok(docstoreRows.length >= 1 && docstoreRows.every((state) => state === 'revoked'), docstoreRows.join(','));
  const refused = await failure(agent('run', 'agent-alpha', '--', 'curl', '-sS', '--max-time', '15', 'https://docstore/documents'));
  assert.equal(refused.code, 56);
});

test('after revoke principal, setup fails with a hint naming AGENT_GATEWAY_DEMO_PRINCIPAL and teardown, and re-activates nothing', { timeout: 300_000 }, async () => {
  await registry('revoke', 'principal', 'org-alice');
  const failed = await failure(demo('setup'));
  assert.match(failed.stderr, /AGENT_GATEWAY_DEMO_PRINCIPAL=/);
  assert.match(failed.stderr, /demo\.sh teardown/);
  const { stdout } = await registry('--json', 'list', 'principals');
  assert.equal((JSON.parse(stdout) as { principals: { key_id: string; state: string }[] }).principals.find((row) => row.key_id === 'org-alice')?.state, 'revoked');
});

test('delete both agents: their sidecars stop and their rows are revoked', { timeout: 120_000 }, async () => {
  const alphaPort = Number(readFileSync(join(dir, 'state/agents/agent-alpha/port'), 'utf8'));
  await agent('delete', 'agent-alpha');
  await agent('delete', 'agent-beta');
  assert.equal(await listening(alphaPort), false);
  assert.ok(!existsSync(join(dir, 'state/agents/agent-alpha')));
  const { stdout } = await run('psql', ['-X', '-tA', '-d', adminUrl, '-c', 'SELECT count(*) FROM permission_registry WHERE revoked_at IS NULL'], { env });
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
