import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { freePort } from '../helpers/postgres.js';
import { newP256Key } from '../helpers/pki.js';
import { registryDatabase, type RegistryFixture } from '../helpers/registry-fixture.js';
import { describeRun, runCli, runInProcess } from './run-cli.js';

/**
 * The database password never reaches the output, and output is never rewritten to hide it: a
 * password that happens to occur in an identity, a key id, a timestamp or an SPKI's hex leaves
 * results byte for byte as they are without it.
 */

let registry: Awaited<ReturnType<typeof registryDatabase>>;
let databaseUrl: string;
let fixture: RegistryFixture;

before(async () => {
  registry = await registryDatabase();
  ({ databaseUrl, fixture } = registry);
  const alpha = await fixture.principal('org-alpha');
  await fixture.delegate('org-alpha', 'docstore:443');
  await fixture.permit(alpha, { identity: 'agent-alpha', spkiDer: newP256Key().spkiDer }, 'docstore:443', {
    notBefore: '2026-01-01T00:00:00.123456Z',
    notAfter: '2999-01-01T00:00:00Z',
  });
});

after(() => registry?.close());

function withPassword(url: string, password: string): string {
  const parsed = new URL(url);
  parsed.password = password;
  return parsed.toString();
}

// The throwaway cluster trusts every local connection, so any password connects; a server from
// TEST_DATABASE_URL that carries its own password cannot take made-up ones.
const ownPassword = () => Boolean(new URL(databaseUrl).password);

test('a database password that occurs in the data leaves --json and table output unchanged', async (t) => {
  if (ownPassword()) return t.skip('TEST_DATABASE_URL carries its own password');
  const run = (args: string[], url: string) => runInProcess(args, { env: { ...process.env, AGENT_GATEWAY_DATABASE_URL: url } });
  const commands = [['--json', 'list'], ['list'], ['--json', 'list', 'permissions', '--identity', 'agent-alpha'], ['list', 'principals']];
  const baseline = await Promise.all(commands.map((args) => run(args, databaseUrl)));
  for (const base of baseline) assert.equal(base.status, 0, describeRun(base));
  assert.ok(baseline[0]!.stdout.includes('"identity":"agent-alpha"'), baseline[0]!.stdout);
  assert.ok(baseline[0]!.stdout.includes('3059'), 'SPKI hex in --json output');
  assert.ok(baseline[0]!.stdout.includes('00:00:00.123456Z'), baseline[0]!.stdout);
  // 'alpha': identity and key id; '3059': every P-256 SPKI; '3456': a timestamp; 'docstore': a destination.
  for (const password of ['alpha', '3059', '3456', 'docstore', 'active']) {
    for (const [i, args] of commands.entries()) {
      const result = await run(args, withPassword(databaseUrl, password));
      assert.equal(result.status, 0, describeRun(result));
      assert.equal(result.stdout, baseline[i]!.stdout, `password ${password}, ${args.join(' ')}`);
      assert.equal(result.stderr, baseline[i]!.stderr);
    }
  }
});

test('a connection failure names the database without its password, on stderr and in --json', async () => {
  const url = `postgres://admin:hunter2-s3cret@127.0.0.1:${await freePort()}/registry?sslmode=disable`;
  for (const args of [['list'], ['--json', 'list']]) {
    const run = await runCli(args, { env: { ...process.env, AGENT_GATEWAY_DATABASE_URL: url } });
    assert.equal(run.status, 1, describeRun(run));
    assert.ok(!`${run.stdout}${run.stderr}`.includes('hunter2'), `the password leaked: ${describeRun(run)}`);
    assert.match(run.stderr, /postgres:\/\/admin:redacted@127\.0\.0\.1:\d+\/registry/);
    if (args[0] === '--json') {
      assert.equal(run.json.error.code, 'ERR_DATABASE', describeRun(run));
      assert.match(run.json.error.message, /admin:redacted@/);
    }
  }
});

test('a database URL naming a TLS file that cannot be read (sslcert, sslkey, sslrootcert) is ERR_DATABASE naming the database, not a crash with a stack trace', async () => {
  for (const parameter of ['sslcert', 'sslkey', 'sslrootcert']) {
    const url = `postgres://admin:hunter2-s3cret@127.0.0.1:${await freePort()}/registry?${parameter}=/nonexistent/agw-${parameter}.pem`;
    const run = await runCli(['--json', 'list'], { env: { ...process.env, AGENT_GATEWAY_DATABASE_URL: url } });
    assert.equal(run.status, 1, describeRun(run));
    assert.equal(run.json.error.code, 'ERR_DATABASE', describeRun(run));
    assert.match(run.json.error.message, /cannot connect to the registry database postgres:\/\/admin:redacted@.* ENOENT.*agw-ssl/, describeRun(run));
    assert.doesNotMatch(run.stderr, /\n\s+at /, 'no stack trace');
    assert.ok(!`${run.stdout}${run.stderr}`.includes('hunter2'), `the password leaked: ${describeRun(run)}`);
  }
});
