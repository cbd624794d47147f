import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { loadSidecarSettings } from '../../sidecar/src/rotation.js';

/** The sidecar's --config file (SIGHUP re-reads it): its keys, its place in the precedence, its errors. */

const dir = mkdtempSync(join(tmpdir(), 'agw-sidecar-settings-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const env = { AGENT_GATEWAY_TPM_USER_PIN: 'pin-1234' };

function file(text: string): string {
  const path = join(dir, `sidecar-${Math.random().toString(36).slice(2)}.toml`);
  writeFileSync(path, text);
  return path;
}

describe('sidecar --config file', () => {
  test('takes the flags\' names in snake_case; relative paths are relative to the file', () => {
    const path = file('key_label = "agent-tls-2"\nnext_key_label = "agent-tls-3"\ncert_out = "certs/machine-client.pem"\ndrain_timeout_ms = 120000\nlisten_host = ["127.0.0.1"]\n');
    const { config } = loadSidecarSettings({ configFile: path, identity: 'agent-alpha' }, env);
    assert.equal(config.keyLabel, 'agent-tls-2');
    assert.equal(config.nextKeyLabel, 'agent-tls-3');
    assert.equal(config.certOut, join(dir, 'certs/machine-client.pem'));
    assert.equal(config.drainTimeoutMs, 120_000);
    assert.deepEqual(config.listenHosts, ['127.0.0.1']);
  });

  test('a flag wins over its variable, which wins over the file; the file is found through its variable too', () => {
    const path = file('key_label = "from-file"\ntoken_label = "file-token"\n');
    const fromFile = loadSidecarSettings({ identity: 'a' }, { ...env, AGENT_GATEWAY_SIDECAR_CONFIG: path });
    assert.equal(fromFile.config.keyLabel, 'from-file');
    const fromEnv = loadSidecarSettings({ configFile: path, identity: 'a' }, { ...env, AGENT_GATEWAY_SIDECAR_TPM_KEY: 'from-env' });
    assert.equal(fromEnv.config.keyLabel, 'from-env');
    assert.equal(fromEnv.config.tokenLabel, 'file-token');
    const fromFlag = loadSidecarSettings({ configFile: path, identity: 'a', keyLabel: 'from-flag' }, { ...env, AGENT_GATEWAY_SIDECAR_TPM_KEY: 'from-env' });
    assert.equal(fromFlag.config.keyLabel, 'from-flag');
    assert.equal(loadSidecarSettings({ identity: 'a' }, env).config.drainTimeoutMs, 300_000, 'the default drain timeout');
  });

  test('unknown keys, wrong types, out-of-range values and unreadable files are errors naming the key', () => {
    const cases: [string, RegExp][] = [
      ['key_lable = "x"\n', /key_lable: unknown setting/],
      ['key_label = true\n', /key_label: must be a string/],
      ['drain_timeout_ms = 500\n', /--drain-timeout-ms.*must be 1000-86400000/],
      ['key_label = ""\n', /--key-label.*must not be empty/],
      ['key_label = "unterminated\n', /--config .*sidecar-/],
    ];
    for (const [text, message] of cases) {
      assert.throws(() => loadSidecarSettings({ configFile: file(text), identity: 'a' }, env), (error: Error & { code?: string }) => error.code === 'ERR_CONFIG' && message.test(error.message), text);
    }
    assert.throws(() => loadSidecarSettings({ configFile: join(dir, 'missing.toml'), identity: 'a' }, env), /ENOENT/);
  });
});
