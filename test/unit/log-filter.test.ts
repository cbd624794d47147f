import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseLogFilter as gatewayLevel } from '../../gateway/src/logger.js';
import { parseLogFilter as sidecarLevel } from '../../sidecar/src/logger.js';

// One parser, two processes: the sidecar's own target beats its parent agent_gateway, which
// beats the bare default; the gateway ignores the sidecar's target.
const cases: [string, string, string][] = [
  ['info', 'info', 'info'],
  ['agent_gateway=debug', 'debug', 'debug'],
  ['agent_gateway_sidecar=trace', 'error', 'trace'],
  ['warn,agent_gateway=info,agent_gateway_sidecar=debug', 'info', 'debug'],
  ['warn,hyper=debug', 'warn', 'warn'],
];
for (const [filter, gateway, sidecar] of cases) {
  test(`filter ${JSON.stringify(filter)}: gateway ${gateway}, sidecar ${sidecar}`, () => {
    assert.equal(gatewayLevel(filter), gateway);
    assert.equal(sidecarLevel(filter), sidecar);
  });
}

test('a bare target name means that target at trace; another bare word is a mistyped level', () => {
  assert.equal(sidecarLevel('agent_gateway_sidecar'), 'trace');
  assert.throws(() => gatewayLevel('agent_gateway_sidecar'), /unknown level/);
});

test('a mistyped level is an error for both', () => {
  assert.throws(() => gatewayLevel('loud'), /unknown level "loud"/);
  assert.throws(() => sidecarLevel('agent_gateway_sidecar=loud'), /unknown level "loud"/);
});
