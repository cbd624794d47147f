import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Command } from 'commander';
import { DEFAULT_PKCS11_ENGINE } from '../../core/platform.js';
import { runSidecar } from '../../sidecar/src/cli.js';
import { addSidecarOptions, cliValues, loadSidecarConfig, SIDECAR_OPTIONS } from '../../sidecar/src/config.js';

/** runSidecar in this process, with its output captured. */
async function inProcess(argv: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const code = await runSidecar(argv, { env, stdout: { write: (text: string) => (stdout += text) }, stderr: { write: (text: string) => (stderr += text) } });
  return { code, stdout, stderr };
}

test('every setting of the one description has a flag in --help or a line under Other environment, with its variables and default', async () => {
  const { code, stdout } = await inProcess(['--help']);
  assert.equal(code, 0);
  for (const spec of Object.values(SIDECAR_OPTIONS)) {
    if ('flag' in spec) assert.match(stdout, new RegExp(`${spec.flag} ${spec.arg}`), spec.flag);
    for (const name of spec.env) assert.ok(stdout.includes(name), name);
  }
  // Commander wraps long lines; read the help as one line.
  assert.ok(stdout.replace(/\s+/g, ' ').includes(`(default ${DEFAULT_PKCS11_ENGINE})`), 'defaults shown come from the schema');
  assert.match(stdout, /run --socket PATH/);
});

test('defaults come from the schema; a flag beats its variable, which beats the default', () => {
  const parse = (argv: string[], env: NodeJS.ProcessEnv) => {
    const command = addSidecarOptions(new Command().exitOverride());
    command.parse(argv, { from: 'user' });
    return loadSidecarConfig(cliValues(command), { AGENT_GATEWAY_TPM_USER_PIN: '1234', ...env }).config;
  };
  const defaults = parse(['--identity', 'a'], {});
  assert.equal(defaults.gatewayUrl, 'https://127.0.0.1:8443');
  assert.equal(defaults.listenPort, 0);
  assert.deepEqual(defaults.listenHosts, ['127.0.0.1', '::1']);
  assert.equal(defaults.connectWaitMs, 5000);
  assert.equal(defaults.logLevel, 'info');
  assert.equal(defaults.logQuiet, false);
  assert.equal(defaults.listenSocket, undefined);
  const fromEnv = parse([], { AGENT_GATEWAY_IDENTITY: 'b', AGENT_GATEWAY_SIDECAR_PORT: '4321', AGENT_GATEWAY_SIDECAR_HOSTS: '127.0.0.1, ::1', AGENT_GATEWAY_SIDECAR_SOCKET: 'rel/proxy.sock', RUST_LOG: 'agent_gateway_sidecar=debug', AGENT_GATEWAY_LOG_STDOUT: 'false' });
  assert.equal(fromEnv.identity, 'b');
  assert.equal(fromEnv.listenPort, 4321);
  assert.deepEqual(fromEnv.listenHosts, ['127.0.0.1', '::1']);
  assert.equal(fromEnv.listenSocket, `${process.cwd()}/rel/proxy.sock`);
  assert.equal(fromEnv.logLevel, 'debug');
  assert.equal(fromEnv.logQuiet, true);
  const flagWins = parse(['--identity', 'c', '--listen-port', '9', '--listen-host', '::1'], { AGENT_GATEWAY_IDENTITY: 'b', AGENT_GATEWAY_SIDECAR_PORT: '4321', AGENT_GATEWAY_SIDECAR_HOSTS: '127.0.0.1' });
  assert.equal(flagWins.identity, 'c');
  assert.equal(flagWins.listenPort, 9);
  assert.deepEqual(flagWins.listenHosts, ['::1']);
});

test('in-process: bad settings resolve 2 with each field named by flag and variable, before any TPM work', async () => {
  const bad = await inProcess(['--identity', 'x', '--connect-wait-ms', '0', '--listen-socket', `/tmp/${'s'.repeat(120)}`], { AGENT_GATEWAY_TPM_USER_PIN: '1234' });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--connect-wait-ms \/ AGENT_GATEWAY_SIDECAR_CONNECT_WAIT_MS: must be 1-600000/);
  assert.match(bad.stderr, /--listen-socket \/ AGENT_GATEWAY_SIDECAR_SOCKET: must be at most 107 bytes/);
  assert.equal(bad.stdout, '');
  const pin = await inProcess(['--identity', 'x', '--so-pin=abcd']);
  assert.equal(pin.code, 2);
  assert.ok(!pin.stderr.includes('abcd'));
  const unknown = await inProcess(['--no-such-flag']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown option '--no-such-flag'/);
});
