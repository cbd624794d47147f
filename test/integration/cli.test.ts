import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { createServer } from 'node:net';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, serverTls, TEST_OID, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { RegistryFixture } from '../helpers/registry-fixture.js';

const BIN = resolve(import.meta.dirname, '../../bin/agent-gateway.js');
const dir = mkdtempSync(join(tmpdir(), 'agw-cli-'));
let pgServer: Awaited<ReturnType<typeof testServer>>;
let tls: ServerTls;

function configFile(databaseUrl: string, extra = ''): string {
  const path = join(dir, `config-${Math.random().toString(36).slice(2)}.toml`);
  writeFileSync(
    path,
    `[server]\nlisten_addr = "127.0.0.1:0"\ntls_cert_path = "${tls.certPath}"\ntls_key_path = "${tls.keyPath}"\n\n` +
      `[policy]\nclient_ext_oid = "${TEST_OID}"\ndatabase_url_env = "AGW_TEST_DB"\nconnect_timeout_ms = 1500\n\n[observability]\nlog_level = "info"\n\n[admin]\nlisten_addr = "127.0.0.1:0"\n${extra}`,
  );
  process.env.AGW_TEST_DB = databaseUrl;
  return path;
}

before(async () => {
  pgServer = await testServer();
  tls = await serverTls();
});
after(() => pgServer?.close());

test('--config with a missing file exits 2 with a clear message', () => {
  const result = spawnSync(process.execPath, [BIN, '--config', join(dir, 'nope.toml')], { encoding: 'utf8' });
  assert.equal(result.status, 2);
  assert.match(result.stderr, /nope\.toml: cannot read config file \(no such file\)/);
});

test('an invalid config exits 2 naming the field', () => {
  const path = configFile('postgres://x@127.0.0.1:1/x', '\n[limits]\nmax_streams = 3\n');
  const result = spawnSync(process.execPath, [BIN, '--config', path], { encoding: 'utf8', env: process.env });
  assert.equal(result.status, 2);
  assert.match(result.stderr, /limits\.max_streams: unknown key/);
});

test('a database at another schema version: exits 4 (the catalogue\'s schema code, as the CLI) without listening', async () => {
  const url = await createDatabase(pgServer.url);
  const fixture = await RegistryFixture.connect(url);
  await fixture.db.query('INSERT INTO schema_version VALUES (1)');
  await fixture.close();
  const result = spawnSync(process.execPath, [BIN, '--config', configFile(url)], { encoding: 'utf8', env: process.env });
  assert.equal(result.status, 4);
  assert.match(result.stderr, /schema_version must hold exactly one row, found 2/);
});

test('a database that cannot be reached within connect_timeout_ms: exits 1 with the reason', () => {
  const result = spawnSync(process.execPath, [BIN, '--config', configFile('postgres://nobody@127.0.0.1:1/none')], { encoding: 'utf8', env: process.env });
  assert.equal(result.status, 1);
  assert.match(result.stderr, /agent-gateway: .+/);
});

// Regression: the gateway's own redaction replaced only the userinfo password, so a password
// given as a libpq query parameter was printed in this message.
test('a database that cannot be reached: no password of its URL (userinfo, ?password=, ?sslpassword=) is printed', () => {
  const url = 'postgres://nobody:s3cret-userinfo@127.0.0.1:1/none?password=s3cret-query&sslpassword=s3cret-ssl';
  const result = spawnSync(process.execPath, [BIN, '--config', configFile(url)], { encoding: 'utf8', env: process.env });
  assert.equal(result.status, 1);
  assert.match(result.stderr, /cannot reach the registry database postgres:\/\/nobody:redacted@127\.0\.0\.1:1\/none\?password=redacted&sslpassword=redacted/);
  assert.doesNotMatch(result.stderr + result.stdout, /s3cret/);
});

test('serves CONNECT against a migrated database, then SIGTERM exits 0', async () => {
  const url = await createDatabase(pgServer.url);
  const child = spawn(process.execPath, [BIN, '--config', configFile(url)], { env: process.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  const port = await new Promise<number>((resolvePort, reject) => {
    child.stdout.on('data', (chunk: Buffer) => {
      output += chunk.toString();
      const m = /"event":"listening","address":"127\.0\.0\.1:(\d+)"/.exec(output);
      if (m) resolvePort(Number(m[1]));
    });
    child.once('exit', (code) => reject(new Error(`gateway exited ${code}: ${output}`)));
  });
  const client = await clientCredentials({ identity: 'agent-cli' });
  const session = await gatewaySession(port, { caPem: tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  const response = await request(session, 'example.com:443');
  assert.equal(response.status, 403);
  session.destroy();
  child.kill('SIGTERM');
  const [code] = await once(child, 'exit');
  assert.equal(code, 0);
  assert.match(output, /"event":"connect_decision".*"status":403/);
  assert.match(output, /"event":"stopped"/);
});

test('a command-line usage error (no --config, an unknown option) exits 2 like a bad config, so systemd does not restart it in a loop', () => {
  for (const args of [[], ['--config'], ['--config', join(dir, 'nope.toml'), '--bogus'], ['--config', join(dir, 'nope.toml'), 'extra']]) {
    const result = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8' });
    assert.equal(result.status, 2, `${args.join(' ')}: ${result.stderr}`);
    assert.match(result.stderr, /error: /);
  }
  assert.equal(spawnSync(process.execPath, [BIN, '--help'], { encoding: 'utf8' }).status, 0);
});

test('server.listen_addr already in use: exits 1 naming the field, without a stack trace', async () => {
  const url = await createDatabase(pgServer.url);
  const holder = createServer();
  await new Promise<void>((resolveListen) => holder.listen(0, '127.0.0.1', resolveListen));
  const { port } = holder.address() as { port: number };
  try {
    const path = configFile(url);
    writeFileSync(path, readFileSync(path, 'utf8').replace('listen_addr = "127.0.0.1:0"', `listen_addr = "127.0.0.1:${port}"`));
    const result = spawnSync(process.execPath, [BIN, '--config', path], { encoding: 'utf8', env: process.env });
    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stderr, new RegExp(`agent-gateway: server\\.listen_addr 127\\.0\\.0\\.1:${port}: cannot listen \\(.*EADDRINUSE`), result.stderr);
    assert.doesNotMatch(result.stderr, /\n\s+at /, 'no stack trace');
  } finally {
    holder.close();
  }
});
