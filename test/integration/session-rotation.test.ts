/**
 * The sidecar's gateway session across key rotations, with software keys (the TPM path is
 * test/tpm/rotation.test.ts): the real gateway and PostgreSQL, the real GatewaySession. What the
 * TPM test cannot reach cheaply: a drain timeout cutting held tunnels, and two rotations in a row.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { ClientHttp2Stream } from 'node:http2';
import { after, before, describe, test } from 'node:test';
import { createSecureContext, type SecureContext } from 'node:tls';
import type { Gateway } from '../../gateway/src/gateway.js';
import { spkiFingerprint } from '../../registry/ecdsa.js';
import { GatewaySession } from '../../sidecar/src/gateway-session.js';
import { startTestGateway } from '../helpers/gateway.js';
import { captureLogger } from '../helpers/logs.js';
import { echoServer } from '../helpers/net.js';
import { clientCredentials, serverTls, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../helpers/registry-fixture.js';
import { until } from '../helpers/wait.js';

const IDENTITY = 'agent-rotating';
let pgServer: Awaited<ReturnType<typeof testServer>>;
let tls: ServerTls;
let echo: Awaited<ReturnType<typeof echoServer>>;
let echoAuthority: string;
let gateway: Gateway;
const keys: { credentials: ClientCredentials; context: SecureContext; fingerprint: string }[] = [];
const gatewayLog: Record<string, unknown>[] = [];

function allowedFingerprints(): string[] {
  return gatewayLog.filter((line) => line.event === 'connect_decision' && line.status === 200).map((line) => String(line.spki_fingerprint));
}

/** One round trip through an open tunnel (the echo server writes back what it reads). */
async function roundTrip(stream: ClientHttp2Stream, text: string): Promise<string> {
  stream.write(text);
  const [chunk] = (await once(stream, 'data')) as [Buffer];
  return chunk.toString();
}

function newSession(sidecarLog: Record<string, unknown>[]): GatewaySession {
  return new GatewaySession({
    url: `https://localhost:${gateway.address!.port}`,
    secureContext: keys[0]!.context,
    keyFingerprint: keys[0]!.fingerprint,
    connectWaitMs: 10_000,
    pingIntervalMs: 60_000,
    backoffInitialMs: 50,
    backoffMaxMs: 500,
    log: captureLogger(sidecarLog, 'info'),
  }).run();
}

const events = (log: Record<string, unknown>[], event: string) => log.filter((line) => line.event === event);

before(async () => {
  pgServer = await testServer();
  const databaseUrl = await createDatabase(pgServer.url);
  tls = await serverTls();
  echo = await echoServer();
  echoAuthority = `127.0.0.1:${echo.port}`;
  gateway = await startTestGateway({ databaseUrl, tls, logger: captureLogger(gatewayLog, 'info') });
  const fixture = await RegistryFixture.connect(databaseUrl);
  const principal = await fixture.principal('org-rotation', { notBefore: at(-DAY) });
  await fixture.delegate(principal.keyId, echoAuthority, { notBefore: at(-DAY) });
  for (let i = 0; i < 3; i++) {
    const credentials = await clientCredentials({ identity: IDENTITY });
    keys.push({ credentials, context: createSecureContext({ cert: credentials.certPem, key: credentials.privateKeyPem, ca: tls.caPem }), fingerprint: spkiFingerprint(credentials.spkiDer) });
    await fixture.permit(principal, { identity: IDENTITY, spkiDer: credentials.spkiDer }, echoAuthority);
  }
  await fixture.close();
});

after(async () => {
  await gateway?.close(200);
  await echo?.close();
  pgServer?.close();
});

describe('GatewaySession.rotate', { concurrency: false }, () => {
  test('new CONNECTs move to the new key; the old session keeps its tunnels until the drain timeout cuts them', async () => {
    const sidecarLog: Record<string, unknown>[] = [];
    const session = newSession(sidecarLog);
    try {
      const held = await session.openTunnel(echoAuthority);
      assert.equal(held.status, 200);
      assert.equal(allowedFingerprints().at(-1), keys[0]!.fingerprint);
      session.rotate(keys[1]!.context, { keyFingerprint: keys[1]!.fingerprint, drainTimeoutMs: 1500 });
      // Asked while the new handshake may still run: served either way, never refused.
      const during = await session.openTunnel(echoAuthority);
      assert.equal(during.status, 200);
      await until(() => events(sidecarLog, 'gateway_session_draining').length === 1, 10_000, 'the new session to take over');
      const fresh = await session.openTunnel(echoAuthority);
      assert.equal(fresh.status, 200);
      assert.equal(allowedFingerprints().at(-1), keys[1]!.fingerprint, 'new CONNECTs use the new key');
      assert.equal(await roundTrip(held.stream, 'still flowing'), 'still flowing', 'the old session\'s tunnel runs on');

      await until(() => events(sidecarLog, 'gateway_session_drained').length === 1, 10_000, 'the drain timeout');
      const drained = events(sidecarLog, 'gateway_session_drained')[0]!;
      assert.equal(drained.reason, 'drain_timeout');
      assert.equal(drained.spki_fingerprint, keys[0]!.fingerprint);
      assert.ok(Number(drained.streams_cut) >= 1, `streams cut: ${drained.streams_cut}`);
      await until(() => held.stream.destroyed, 5000, 'the held tunnel to be cut');
      assert.equal(await roundTrip(fresh.stream, 'new key'), 'new key', 'the new session is untouched');
      fresh.stream.end();
      during.stream.destroy();
    } finally {
      await session.close();
    }
  });

  test('two rotations in a row end on the last key; the session in between and the first one drain by themselves', async () => {
    const sidecarLog: Record<string, unknown>[] = [];
    const session = newSession(sidecarLog);
    try {
      const first = await session.openTunnel(echoAuthority);
      assert.equal(first.status, 200);
      session.rotate(keys[1]!.context, { keyFingerprint: keys[1]!.fingerprint, drainTimeoutMs: 60_000 });
      session.rotate(keys[2]!.context, { keyFingerprint: keys[2]!.fingerprint, drainTimeoutMs: 60_000 });
      await until(() => events(sidecarLog, 'gateway_session_up').at(-1)?.spki_fingerprint === keys[2]!.fingerprint, 10_000, 'a session with the last key');
      const tunnel = await session.openTunnel(echoAuthority);
      assert.equal(tunnel.status, 200);
      assert.equal(allowedFingerprints().at(-1), keys[2]!.fingerprint);
      assert.equal(await roundTrip(first.stream, 'first'), 'first', 'the first tunnel still flows');
      first.stream.end();
      tunnel.stream.end();
      // Every session replaced (the first key's, and the second key's if it came up) drains once idle.
      await until(() => {
        const draining = events(sidecarLog, 'gateway_session_draining').length;
        return draining >= 1 && events(sidecarLog, 'gateway_session_drained').length === draining;
      }, 10_000, 'the replaced sessions to drain');
      assert.deepEqual(new Set(events(sidecarLog, 'gateway_session_drained').map((line) => line.reason)), new Set(['drained']));
      assert.ok(events(sidecarLog, 'gateway_session_drained').some((line) => line.spki_fingerprint === keys[0]!.fingerprint));
      assert.equal(session.connected, true);
    } finally {
      await session.close();
    }
  });
});
