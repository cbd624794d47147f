import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CONNECT_REASONS, denialResponse, SIDECAR_RESPONSES, type ReasonCode, type SidecarReason } from '../../core/errors.js';
import { readProxyStatus, refusal, sidecarRefusal } from '../../sidecar/src/refusal.js';

test('every catalogued refusal is one line naming method, destination and reason, with its proxy-status and length', () => {
  for (const reason of Object.keys(CONNECT_REASONS) as ReasonCode[]) {
    if (reason === 'allowed' || reason === 'dial_failed' || reason === 'client_cancelled') continue;
    const response = denialResponse(reason);
    const answer = refusal('CONNECT', 'docstore:443', response.status, response.headers['proxy-status']);
    assert.equal(answer.body, `agent-gateway: CONNECT docstore:443 refused (${reason}): ${CONNECT_REASONS[reason].agent}.\n`);
    assert.equal(answer.headers['proxy-status'], response.headers['proxy-status']);
    assert.equal(answer.headers['content-length'], String(Buffer.byteLength(answer.body)));
  }
  for (const reason of Object.keys(SIDECAR_RESPONSES) as SidecarReason[]) {
    const answer = sidecarRefusal('GET', 'docstore:80', reason);
    assert.equal(answer.status, SIDECAR_RESPONSES[reason].status);
    assert.equal(answer.body, `agent-gateway-sidecar: GET docstore:80 refused (${reason}): ${SIDECAR_RESPONSES[reason].agent}.\n`);
  }
});

test('the dial failure: its RFC 9209 type varies, its reason and hint do not', () => {
  const answer = refusal('CONNECT', 'docstore:443', 502, 'agent-gateway; error=connection_refused; details="dial_failed"');
  assert.equal(answer.body, `agent-gateway: CONNECT docstore:443 refused (dial_failed): ${CONNECT_REASONS.dial_failed.agent}.\n`);
});

test('an unknown or missing reason still gives a line; the target cannot break it', () => {
  assert.equal(refusal('CONNECT', 'x:1', 418, undefined).body, 'agent-gateway: CONNECT x:1 refused (status 418): the answer carried no reason code this sidecar knows.\n');
  assert.equal(refusal('CONNECT', 'x:1', 403, 'agent-gateway; error=http_request_denied; details="from_the_future"').body, 'agent-gateway: CONNECT x:1 refused (from_the_future): the answer carried no reason code this sidecar knows.\n');
  const hostile = sidecarRefusal('GET', `/a\r\nset-cookie: x\u0000${'y'.repeat(500)}`, 'request_invalid').body;
  assert.equal(hostile.split('\n').length, 2, 'one line');
  assert.match(hostile, /^agent-gateway-sidecar: GET \/a\?\?set-cookie:\?x\?y+\.\.\. refused \(request_invalid\)/);
  assert.ok(hostile.length < 400);
});

test('proxy-status is read only in the form this product writes', () => {
  assert.deepEqual(readProxyStatus('agent-gateway; error=http_request_denied; details="not_authorized"'), { name: 'agent-gateway', details: 'not_authorized' });
  assert.deepEqual(readProxyStatus('agent-gateway'), { name: 'agent-gateway' });
  assert.equal(readProxyStatus('"quoted"; error=x'), undefined);
  assert.equal(readProxyStatus(undefined), undefined);
});
