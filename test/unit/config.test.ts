import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { loadConfig, parseConfig } from '../../gateway/src/config.js';
import { parseLogFilter } from '../../gateway/src/logger.js';

const dir = mkdtempSync(join(tmpdir(), 'agw-config-'));
const valid = `
[server]
tls_cert_path = "certs/server.pem"
tls_key_path = "certs/server-key.pem"

[policy]
client_ext_oid = "1.3.6.1.4.1.57264.1.1"
database_url = "postgres://gw:secret@127.0.0.1:5432/registry"

[observability]
log_level = "info"
`;

function writeConfig(text: string): string {
  const path = join(dir, `config-${Math.random().toString(36).slice(2)}.toml`);
  writeFileSync(path, text);
  return path;
}

test('the example config validates (with its database_url_env set)', () => {
  const config = loadConfig(join(import.meta.dirname, '../../config.example.toml'), { AGENT_GATEWAY_DATABASE_URL: 'postgres://x@127.0.0.1/db' });
  assert.equal(config.policy.databaseUrl, 'postgres://x@127.0.0.1/db');
  assert.equal(config.server.listen_addr, '127.0.0.1:8443');
});

test("the spec's defaults apply", () => {
  const config = loadConfig(writeConfig(valid));
  assert.equal(config.server.listen_addr, '127.0.0.1:8443');
  assert.equal(config.policy.max_connections, 5);
  assert.equal(config.policy.connect_timeout_ms, 5000);
  assert.equal(config.policy.pool_acquire_timeout_ms, 1000);
  assert.equal(config.policy.query_timeout_ms, 500);
  assert.equal(config.limits.dial_timeout_ms, 10000);
  assert.ok(Object.isFrozen(config) && Object.isFrozen(config.policy), 'config is frozen');
});

test('database_url_env is read from the environment', () => {
  const text = valid.replace('database_url = "postgres://gw:secret@127.0.0.1:5432/registry"', 'database_url_env = "MY_DB"');
  assert.equal(loadConfig(writeConfig(text), { MY_DB: 'postgresql://a@b/c' }).policy.databaseUrl, 'postgresql://a@b/c');
  assert.throws(() => loadConfig(writeConfig(text), {}), { code: 'ERR_CONFIG', message: /policy\.database_url_env: environment variable MY_DB is not set/ });
});

test('[resolve] keys are normalised', () => {
  const config = loadConfig(writeConfig(`${valid}\n[resolve]\n"DocStore" = "127.0.0.1:9443"\n`));
  assert.deepEqual(config.resolve.get('docstore:443'), { host: '127.0.0.1', port: 9443 });
});

test('[admin], [audit] and the new [limits] keys: defaults', () => {
  const config = loadConfig(writeConfig(valid));
  // No [admin] section: no second listener (regression: two spec-only configs on one machine
  // both bound 127.0.0.1:9090 and the second gateway failed to start).
  assert.equal(config.admin.enabled, false);
  const withAdmin = loadConfig(writeConfig(`${valid}\n[admin]\n`));
  assert.deepEqual(withAdmin.admin, { enabled: true, listen_addr: '127.0.0.1:9090', per_identity_metrics: false, per_destination_metrics: false, process_metrics: true });
  assert.equal(config.limits.connect_rate_per_second, 0);
  assert.equal(config.limits.connect_burst, 1);
  assert.equal(config.limits.max_tunnels_per_identity, 0);
  assert.equal(config.limits.idle_timeout_ms, 600_000);
  assert.equal(config.limits.handshake_timeout_ms, 10_000);
  assert.equal(config.limits.max_streams_per_session, 1000);
  const { databaseUrl, ...audit } = config.audit;
  assert.deepEqual(audit, { enabled: true, batch_size: 500, flush_interval_ms: 1000, queue_size: 10_000, write_timeout_ms: 5000 });
  assert.equal(databaseUrl, config.policy.databaseUrl, 'audit rows go to the policy database by default');
  assert.ok(Object.isFrozen(config.admin) && Object.isFrozen(config.audit));
});

test('[limits] connect_burst defaults to one second of the rate (at least 1)', () => {
  assert.equal(loadConfig(writeConfig(`${valid}\n[limits]\nconnect_rate_per_second = 5\n`)).limits.connect_burst, 5);
  assert.equal(loadConfig(writeConfig(`${valid}\n[limits]\nconnect_rate_per_second = 2.5\n`)).limits.connect_burst, 3);
  assert.equal(loadConfig(writeConfig(`${valid}\n[limits]\nconnect_rate_per_second = 0.2\n`)).limits.connect_burst, 1);
  const explicit = loadConfig(writeConfig(`${valid}\n[limits]\nconnect_rate_per_second = 5\nconnect_burst = 2\nmax_tunnels_per_identity = 10\nidle_timeout_ms = 0\n`));
  assert.deepEqual([explicit.limits.connect_burst, explicit.limits.max_tunnels_per_identity, explicit.limits.idle_timeout_ms], [2, 10, 0]);
  // A burst without a rate is kept and ignored: turning the rate off is a one-line change.
  assert.equal(loadConfig(writeConfig(`${valid}\n[limits]\nconnect_burst = 5\n`)).limits.connect_burst, 5);
});

test('[audit] database_url_env is read from the environment; absent, the policy URL is used', () => {
  const text = `${valid}\n[audit]\ndatabase_url_env = "AUDIT_DB"\nbatch_size = 10\n`;
  const config = loadConfig(writeConfig(text), { AUDIT_DB: 'postgres://auditor@127.0.0.1/registry' });
  assert.equal(config.audit.databaseUrl, 'postgres://auditor@127.0.0.1/registry');
  assert.equal(config.policy.databaseUrl, 'postgres://gw:secret@127.0.0.1:5432/registry');
  assert.throws(() => loadConfig(writeConfig(text), {}), { code: 'ERR_CONFIG', message: /audit\.database_url_env: environment variable AUDIT_DB is not set/ });
  assert.throws(() => loadConfig(writeConfig(text), { AUDIT_DB: 'http://x' }), { code: 'ERR_CONFIG', message: /audit\.database_url_env: AUDIT_DB must be a postgres/ });
  // A disabled audit trail needs no URL.
  assert.doesNotThrow(() => loadConfig(writeConfig(`${valid}\n[audit]\nenabled = false\ndatabase_url_env = "AUDIT_DB"\n`), {}));
});

test('[server] proxy_protocol_from, drain_delay_ms and [policy] read_database_url_env (DESIGN §9g)', () => {
  const plain = loadConfig(writeConfig(valid));
  assert.deepEqual([plain.server.proxy_protocol_from, plain.server.proxyProtocolFrom, plain.server.drain_delay_ms, plain.policy.readDatabaseUrl], [[], [], 0, undefined]);
  const text = valid
    .replace('tls_key_path = "certs/server-key.pem"', 'tls_key_path = "certs/server-key.pem"\nproxy_protocol_from = ["10.0.0.5/32", "fd00::/8"]\ndrain_delay_ms = 1500')
    .replace('[policy]', '[policy]\nread_database_url_env = "STANDBY_DB"');
  const config = loadConfig(writeConfig(text), { STANDBY_DB: 'postgres://gw@standby.internal/registry' });
  assert.equal(config.server.proxyProtocolFrom.length, 2);
  assert.equal(config.server.drain_delay_ms, 1500);
  assert.equal(config.policy.readDatabaseUrl, 'postgres://gw@standby.internal/registry');
  assert.throws(() => loadConfig(writeConfig(text), {}), { code: 'ERR_CONFIG', message: /policy\.read_database_url_env: environment variable STANDBY_DB is not set/ });
  assert.throws(() => loadConfig(writeConfig(text), { STANDBY_DB: 'mysql://x@y/z' }), { code: 'ERR_CONFIG', message: /policy\.read_database_url_env: STANDBY_DB must be a postgres/ });
  assert.throws(() => loadConfig(writeConfig(valid.replace('[policy]', '[policy]\nread_database_url_env = "not a name"')), {}), { code: 'ERR_CONFIG', message: /policy\.read_database_url_env: must be an environment variable name/ });
  assert.throws(
    () => loadConfig(writeConfig(valid.replace('tls_key_path = "certs/server-key.pem"', 'tls_key_path = "certs/server-key.pem"\nproxy_protocol_from = ["balancer.internal"]')), {}),
    { code: 'ERR_CONFIG', message: /server\.proxy_protocol_from\.0: must be a CIDR/ },
  );
  // Forms ipaddr.js reads as another address than they show (010.0.0.5 is octal: 8.0.0.5), or with
  // a zone: refused, in every CIDR list (a zero-padded balancer address trusted another host).
  for (const cidr of ['010.0.0.5/32', '10.0.0.05/32', '127.1/32', '0x7f.0.0.1/32', '10.0.0.5', 'fe80::1%eth0/128', '10.0.0.5/ 32', '10.0.0.5/+8']) {
    for (const [section, key] of [['server', 'proxy_protocol_from'], ['egress', 'allow_cidrs'], ['egress', 'deny_cidrs']] as const) {
      const text = section === 'server' ? valid.replace('tls_key_path = "certs/server-key.pem"', `tls_key_path = "certs/server-key.pem"\n${key} = ["${cidr}"]`) : `${valid}\n[egress]\n${key} = ["${cidr}"]\n`;
      assert.throws(() => loadConfig(writeConfig(text), {}), { code: 'ERR_CONFIG', message: new RegExp(`${section}\\.${key}\\.0: must be a CIDR`) }, `${key} ${cidr}`);
    }
  }
  assert.deepEqual(loadConfig(writeConfig(valid.replace('tls_key_path = "certs/server-key.pem"', 'tls_key_path = "certs/server-key.pem"\nproxy_protocol_from = ["10.0.0.5/32", "::ffff:10.0.0.0/104", "::/0"]')), {}).server.proxyProtocolFrom.map(String), ['10.0.0.5,32', '10.0.0.0,8', '::,0']);
});

const errors: { name: string; text: string | null; message: RegExp }[] = [
  { name: 'negative rate', text: `${valid}\n[limits]\nconnect_rate_per_second = -1\n`, message: /limits\.connect_rate_per_second/ },
  { name: 'zero burst', text: `${valid}\n[limits]\nconnect_rate_per_second = 1\nconnect_burst = 0\n`, message: /limits\.connect_burst/ },
  { name: 'fractional tunnel cap', text: `${valid}\n[limits]\nmax_tunnels_per_identity = 1.5\n`, message: /limits\.max_tunnels_per_identity/ },
  { name: 'negative idle timeout', text: `${valid}\n[limits]\nidle_timeout_ms = -1\n`, message: /limits\.idle_timeout_ms/ },
  { name: 'unknown [limits] key', text: `${valid}\n[limits]\nrate = 5\n`, message: /limits\.rate: unknown key/ },
  { name: 'bad admin address', text: `${valid}\n[admin]\nlisten_addr = "9090"\n`, message: /admin\.listen_addr: must be host:port/ },
  { name: 'admin flag not a boolean', text: `${valid}\n[admin]\nper_identity_metrics = "yes"\n`, message: /admin\.per_identity_metrics/ },
  { name: 'admin on the server address', text: `${valid}\n[admin]\nlisten_addr = "127.0.0.1:8443"\n`, message: /admin\.listen_addr: same address as server\.listen_addr \(127\.0\.0\.1:8443\)/ },
  { name: 'unknown [admin] key', text: `${valid}\n[admin]\nport = 9090\n`, message: /admin\.port: unknown key/ },
  { name: 'audit URL and env both', text: `${valid}\n[audit]\ndatabase_url = "postgres://a@b/c"\ndatabase_url_env = "X"\n`, message: /audit\.database_url_env: set only one/ },
  { name: 'audit URL not postgres', text: `${valid}\n[audit]\ndatabase_url = "mysql://a@b/c"\n`, message: /audit\.database_url: must be a postgres/ },
  { name: 'audit batch over queue', text: `${valid}\n[audit]\nbatch_size = 100\nqueue_size = 10\n`, message: /audit\.batch_size: must not exceed queue_size \(10\)/ },
  { name: 'audit flush interval 0', text: `${valid}\n[audit]\nflush_interval_ms = 0\n`, message: /audit\.flush_interval_ms/ },
  { name: 'missing file', text: null, message: /cannot read config file \(no such file\)/ },
  { name: 'not TOML', text: '[server\n', message: /not valid TOML at line 1/ },
  { name: 'unknown key', text: valid.replace('[observability]', '[observability]\nlog_lvl = "x"'), message: /observability\.log_lvl: unknown key/ },
  { name: 'unknown section', text: `${valid}\n[extra]\na = 1\n`, message: /extra: unknown key/ },
  { name: 'bad OID', text: valid.replace('1.3.6.1.4.1.57264.1.1', '1.3.six'), message: /policy\.client_ext_oid: must be a dotted OID/ },
  { name: 'OID with a second arc over 39 under arc 1', text: valid.replace('1.3.6.1.4.1.57264.1.1', '1.40.1'), message: /policy\.client_ext_oid/ },
  { name: 'bad URL', text: valid.replace('postgres://gw:secret@127.0.0.1:5432/registry', 'mysql://x@y/z'), message: /policy\.database_url: must be a postgres:\/\/ or postgresql:\/\/ URL/ },
  { name: 'not a URL', text: valid.replace('postgres://gw:secret@127.0.0.1:5432/registry', 'not a url'), message: /policy\.database_url: is not a URL/ },
  { name: 'no database URL at all', text: valid.replace('database_url = "postgres://gw:secret@127.0.0.1:5432/registry"', ''), message: /policy\.database_url: set database_url or database_url_env/ },
  { name: 'missing tls_cert_path', text: valid.replace('tls_cert_path = "certs/server.pem"', ''), message: /server\.tls_cert_path: is required/ },
  { name: 'missing log_level', text: valid.replace('log_level = "info"', ''), message: /observability\.log_level: is required/ },
  { name: 'bad log level', text: valid.replace('log_level = "info"', 'log_level = "loud"'), message: /observability\.log_level: unknown level "loud"/ },
  { name: 'bad listen address', text: valid.replace('[server]', '[server]\nlisten_addr = "8443"'), message: /server\.listen_addr: must be host:port/ },
  { name: 'wrong type', text: valid.replace('[policy]', '[policy]\nmax_connections = "five"'), message: /policy\.max_connections/ },
  // Regression: ipaddr.js read 010.0.0.0/8 as 8.0.0.0/8 (octal) and 127.1/32 as 127.0.0.1/32.
  { name: 'deny range with a leading zero (read as octal)', text: `${valid}\n[egress]\ndeny_cidrs = ["010.0.0.0/8"]\n`, message: /egress\.deny_cidrs\.0: must be a CIDR/ },
  { name: 'allow range in shorthand', text: `${valid}\n[egress]\nallow_cidrs = ["127.1/32"]\n`, message: /egress\.allow_cidrs\.0: must be a CIDR/ },
  { name: 'allow range in hex', text: `${valid}\n[egress]\nallow_cidrs = ["0x7f.0.0.1/32"]\n`, message: /egress\.allow_cidrs\.0: must be a CIDR/ },
  { name: 'allow range as one number', text: `${valid}\n[egress]\nallow_cidrs = ["1/8"]\n`, message: /egress\.allow_cidrs\.0: must be a CIDR/ },
  { name: 'mapped range with a leading zero', text: `${valid}\n[egress]\ndeny_cidrs = ["::ffff:010.0.0.0/104"]\n`, message: /egress\.deny_cidrs\.0: must be a CIDR/ },
  { name: 'range with a zone', text: `${valid}\n[egress]\nallow_cidrs = ["fe80::1%eth0/64"]\n`, message: /egress\.allow_cidrs\.0: must be a CIDR/ },
  { name: 'prefix with a leading zero', text: `${valid}\n[egress]\ndeny_cidrs = ["10.0.0.0/08"]\n`, message: /egress\.deny_cidrs\.0: must be a CIDR/ },
  { name: 'bad resolve key', text: `${valid}\n[resolve]\n"bad_host" = "127.0.0.1:1"\n`, message: /resolve\.bad_host: key invalid destination/ },
];

for (const { name, text, message } of errors) {
  test(`config error: ${name}`, () => {
    const path = text === null ? join(dir, 'absent.toml') : writeConfig(text);
    assert.throws(() => loadConfig(path, {}), (error: Error & { code?: string }) => {
      assert.equal(error.code, 'ERR_CONFIG');
      assert.match(error.message, message);
      assert.doesNotMatch(error.message, /secret/, 'the database password never appears in messages');
      return true;
    });
  });
}

test('parseConfig accepts an object (embedding) and reports every bad field at once', () => {
  assert.throws(() => parseConfig({ server: {}, policy: {}, observability: {} }), (error: Error) => {
    assert.match(error.message, /server\.tls_cert_path/);
    assert.match(error.message, /policy\.client_ext_oid/);
    assert.match(error.message, /observability\.log_level/);
    return true;
  });
});

const filters: [string, string][] = [
  ['info', 'info'],
  ['debug', 'debug'],
  ['agent_gateway=debug', 'debug'],
  ['warn,agent_gateway=trace', 'trace'],
  ['warn,hyper=debug', 'warn'],
  ['agent_gateway::proxy=error', 'error'],
  ['off', 'off'],
];
for (const [filter, level] of filters) {
  test(`log filter ${JSON.stringify(filter)} → ${level}`, () => assert.equal(parseLogFilter(filter), level));
}
