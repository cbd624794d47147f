import assert from 'node:assert/strict';
import { test } from 'node:test';
import { endToEndHeaders } from '../../sidecar/src/local-proxy.js';

// Regression (black-box review): `Connection: x-secret-hop` let `X-Secret-Hop` reach the destination.
test('plain requests through the sidecar: hop-by-hop fields and those Connection names are not forwarded', () => {
  const cases: Array<[incoming: Record<string, string>, forwarded: Record<string, string>]> = [
    [{ host: 'a', 'x-keep': '1' }, { host: 'a', 'x-keep': '1' }],
    [{ connection: 'x-secret-hop', 'x-secret-hop': 'leak', accept: '*/*' }, { accept: '*/*' }],
    [{ connection: 'close, X-One ,x-two', 'x-one': '1', 'x-two': '2', 'x-three': '3' }, { 'x-three': '3' }],
    [{ 'proxy-connection': 'keep-alive', 'proxy-authorization': 'Basic eA==', 'keep-alive': 'timeout=5', te: 'trailers', trailer: 'x', upgrade: 'websocket' }, {}],
  ];
  for (const [incoming, forwarded] of cases) assert.deepEqual(endToEndHeaders(incoming), forwarded, JSON.stringify(incoming));
});
