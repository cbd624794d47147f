/**
 * [egress] on the real gateway (DESIGN §9c): authorised destinations whose address is not global
 * unicast get 403 destination_forbidden after authorization, and nothing is dialled. Every
 * address here is refused before the dial, so no packet leaves loopback; names come from an
 * injected resolver or /etc/hosts.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { ClientHttp2Session } from 'node:http2';
import { createServer, type AddressInfo, type Server } from 'node:net';
import { after, before, test } from 'node:test';
import { parseConfig } from '../../gateway/src/config.js';
import { coalesced, systemResolver, type HostResolver, type ResolvedAddress } from '../../gateway/src/egress.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { LOOKUPS_PER_IDENTITY } from '../../gateway/src/resolver-slots.js';
import { startEchoRegistry, type EchoRegistry } from '../helpers/echo-registry.js';
import { captureLogger } from '../helpers/logs.js';
import { exchange, gatewaySession, request } from '../helpers/net.js';
import { clientCredentials, TEST_OID, type ClientCredentials } from '../helpers/pki.js';
import { until } from '../helpers/wait.js';

const FORBIDDEN = 'agent-gateway; error=destination_ip_prohibited; details="destination_forbidden"';
let world: EchoRegistry;
let client: ClientCredentials;
let listener: Server;
let listenerPort: number;
let accepted = 0;
const gateways: Gateway[] = [];
const sessions: ClientHttp2Session[] = [];
const lines: Record<string, unknown>[] = [];

const NAMES: Record<string, ResolvedAddress[]> = {
  'mixed.test': [{ address: '93.184.216.34', family: 4 }, { address: '10.0.0.5', family: 4 }],
  'metadata.test': [{ address: '169.254.169.254', family: 4 }],
  'loop.test': [{ address: '127.0.0.1', family: 4 }],
  // Regression: an AAAA record of an IPv4-compatible address, in the hex form resolvers return.
  'compat.test': [{ address: '::7f00:1', family: 6 }],
};

/** NAMES, and localhost from /etc/hosts as in production. */
const namesResolver: HostResolver = async (host) => {
  if (host === 'localhost') return systemResolver(host);
  const found = NAMES[host];
  if (!found) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${host}`), { code: 'ENOTFOUND' });
  return found;
};

async function startGateway(egress: Record<string, unknown>, resolve: Record<string, string> = {}, options: { resolver?: HostResolver; limits?: Record<string, unknown> } = {}): Promise<Gateway> {
  const gateway = createGateway(
    parseConfig({
      server: { listen_addr: '127.0.0.1:0', tls_cert_path: world.tls.certPath, tls_key_path: world.tls.keyPath, shutdown_grace_ms: 100 },
      policy: { client_ext_oid: TEST_OID, database_url: world.databaseUrl },
      observability: { log_level: 'info' },
      audit: { enabled: true, flush_interval_ms: 50 },
      egress,
      resolve,
      ...(options.limits ? { limits: options.limits } : {}),
    }),
    { logger: captureLogger(lines), resolver: options.resolver ?? namesResolver },
  );
  gateways.push(gateway);
  await gateway.listen();
  return gateway;
}

async function grant(destination: string): Promise<void> {
  await world.fixture.delegate(world.alice.keyId, destination).catch(() => undefined);
  await world.fixture.permit(world.alice, { identity: 'agent-egress', spkiDer: client.spkiDer }, destination);
}

async function connect(gateway: Gateway, authority: string, who = client): Promise<{ status: number; proxyStatus: string | undefined }> {
  const session = await gatewaySession(gateway.address!.port, { caPem: world.tls.caPem, certPem: who.certPem, privateKeyPem: who.privateKeyPem });
  sessions.push(session);
  const { status, headers, stream } = await request(session, authority);
  if (status === 200) stream.close();
  return { status, proxyStatus: headers['proxy-status'] as string | undefined };
}

before(async () => {
  world = await startEchoRegistry();
  client = await clientCredentials({ identity: 'agent-egress' });
  listener = createServer((socket) => {
    accepted++;
    socket.destroy();
  });
  listener.listen(0, '127.0.0.1');
  await once(listener, 'listening');
  listenerPort = (listener.address() as AddressInfo).port;
});

after(async () => {
  for (const session of sessions) session.destroy();
  for (const gateway of gateways) await gateway.close(100);
  listener?.close();
  await world?.close();
});

test('authorised destinations at non-global addresses get 403 destination_forbidden, and nothing is dialled', async () => {
  const gateway = await startGateway({});
  const cases = [
    `127.0.0.1:${listenerPort}`,
    `[::1]:${listenerPort}`,
    'localhost:443',
    '10.0.0.1:80',
    '169.254.169.254:80',
    '100.64.0.1:443',
    '[fd00:ec2::254]:80',
    '[64:ff9b::a00:1]:443',
    '[2001::1]:443',
    '0.0.0.0:443',
    '224.0.0.1:443',
    'metadata.test:80',
    'mixed.test:443',
    `compat.test:${listenerPort}`,
  ];
  for (const destination of cases) await grant(destination);
  for (const destination of cases) {
    const answer = await connect(gateway, destination);
    assert.deepEqual(answer, { status: 403, proxyStatus: FORBIDDEN }, destination);
  }
  assert.equal(accepted, 0, 'no connection reached the loopback listener');
  const refused = lines.filter((l) => l.event === 'connect_decision' && l.reason === 'destination_forbidden');
  assert.equal(refused.length, cases.length);
  assert.match(String(refused.find((l) => l.destination === 'mixed.test:443')?.detail), /mixed\.test → 10\.0\.0\.5: private address/);
  await until(async () => {
    await gateway.audit!.flush();
    const rows = await world.fixture.db.query(`SELECT count(*)::int AS n FROM audit_log WHERE reason = 'destination_forbidden' AND detail LIKE '%169.254.169.254%'`);
    return rows.rows[0].n >= 1;
  }, 3000, 'audited with the address');
});

test('an unauthorised client learns only not_authorized, whatever the address', async () => {
  const gateway = await startGateway({});
  const stranger = await clientCredentials({ identity: 'agent-nobody' });
  assert.deepEqual(await connect(gateway, '169.254.169.254:80', stranger), { status: 403, proxyStatus: 'agent-gateway; error=http_request_denied; details="not_authorized"' });
});

test('allow_cidrs admits an exception, deny_cidrs inside it still refuses, and a [resolve] target is exempt', async () => {
  await grant(world.echoAuthority);
  const allowed = await startGateway({ allow_cidrs: ['127.0.0.0/8'], deny_cidrs: [`127.0.0.2/32`] });
  assert.equal((await connect(allowed, world.echoAuthority)).status, 200);
  await grant(`127.0.0.2:${listenerPort}`);
  assert.deepEqual(await connect(allowed, `127.0.0.2:${listenerPort}`), { status: 403, proxyStatus: FORBIDDEN });
  await grant('loop.test:443');
  assert.equal((await connect(allowed, 'loop.test:443')).status, 502, 'vetted and dialled (nothing listens on 443)');

  // No exception: the same echo server through a [resolve] override is the operator's choice.
  await grant('echo.internal:7');
  const resolved = await startGateway({}, { 'echo.internal:7': world.echoAuthority });
  const session = await gatewaySession(resolved.address!.port, { caPem: world.tls.caPem, certPem: client.certPem, privateKeyPem: client.privateKeyPem });
  sessions.push(session);
  const { status, stream } = await request(session, 'echo.internal:7');
  assert.equal(status, 200);
  assert.deepEqual(await exchange(stream, Buffer.from('exempt')), Buffer.from('exempt'));
  assert.deepEqual(await connect(resolved, world.echoAuthority), { status: 403, proxyStatus: FORBIDDEN }, 'the same address named directly is refused');
  assert.equal(accepted, 0);
});

test('a name that does not resolve is 502 destination_not_found', async () => {
  const gateway = await startGateway({});
  await grant('nx.test:443');
  assert.deepEqual(await connect(gateway, 'nx.test:443'), { status: 502, proxyStatus: 'agent-gateway; error=destination_not_found; details="dial_failed"' });
});

// Regression (egress review): getaddrinfo cannot be cancelled and holds one of libuv's threads
// until the system resolver gives up; an agent authorised for a few names whose DNS never answers
// took every thread, and every other agent's hostname CONNECT timed out behind them.
test('one identity\'s lookups that never answer: at most LOOKUPS_PER_IDENTITY run, the rest never start, and another identity\'s lookup is not held up', async () => {
  const other = await clientCredentials({ identity: 'agent-egress-other' });
  const asked: string[] = [];
  const stuck: (() => void)[] = [];
  const gateway = await startGateway({}, {}, {
    limits: { dial_timeout_ms: 1500 },
    resolver: (host) => {
      asked.push(host);
      if (!host.startsWith('dead')) return Promise.resolve([{ address: '10.0.0.9', family: 4 }]);
      return new Promise((resolve) => stuck.push(() => resolve([{ address: '10.0.0.8', family: 4 }])));
    },
  });
  const dead = Array.from({ length: 2 * LOOKUPS_PER_IDENTITY }, (_, i) => `dead${i}.test:443`);
  for (const destination of dead) await grant(destination);
  await world.fixture.delegate(world.alice.keyId, 'good.test:443').catch(() => undefined);
  await world.fixture.permit(world.alice, { identity: 'agent-egress-other', spkiDer: other.spkiDer }, 'good.test:443');

  const deadAsked = () => asked.filter((host) => host.startsWith('dead')).length;
  const attempts = dead.map((destination) => connect(gateway, destination));
  await until(() => deadAsked() === LOOKUPS_PER_IDENTITY, 5000, 'the first lookups started');
  // Its lookup ran (10.0.0.9 is then refused): held behind the dead ones, it would be a 502 timeout.
  const answer = await connect(gateway, 'good.test:443', other);
  assert.deepEqual(answer, { status: 403, proxyStatus: FORBIDDEN }, 'the other identity\'s lookup was not held up');
  for (const attempt of await Promise.all(attempts)) assert.equal(attempt.status, 502, 'each dead name times out at dial_timeout_ms');
  assert.equal(deadAsked(), LOOKUPS_PER_IDENTITY, 'the waiting lookups never started');
  // The dead lookups finally settle: the waiters' CONNECTs are long gone, so none starts now.
  for (const release of stuck) release();
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(deadAsked(), LOOKUPS_PER_IDENTITY, 'nothing started for CONNECTs that gave up');
});

// Regression (review3): the slots counted CONNECTs, not names. Lookups of one name share one
// thread (coalesced, as systemResolver is), yet LOOKUPS_PER_IDENTITY CONNECTs to a single name
// whose DNS never answers took all of that identity's slots, so every other name it was
// authorised for timed out (502) until the dead lookup gave up; one flaky name cut the agent off.
test('CONNECTs to one name whose DNS never answers hold one of the identity\'s slots, not all of them', async () => {
  const asked: string[] = [];
  const stuck: (() => void)[] = [];
  const gateway = await startGateway({}, {}, {
    limits: { dial_timeout_ms: 1500 },
    resolver: coalesced((host) => {
      asked.push(host);
      if (host !== 'onedead.test') return Promise.resolve([{ address: '10.0.0.9', family: 4 }]);
      return new Promise((resolve) => stuck.push(() => resolve([{ address: '10.0.0.8', family: 4 }])));
    }),
  });
  await grant('onedead.test:443');
  await grant('alive.test:443');
  const attempts = Array.from({ length: 2 * LOOKUPS_PER_IDENTITY }, () => connect(gateway, 'onedead.test:443'));
  await until(() => asked.includes('onedead.test'), 5000, 'the dead lookup started');
  await new Promise((resolve) => setTimeout(resolve, 200));
  // 10.0.0.9 is refused after its lookup: held behind the dead name it would be a 502 timeout.
  assert.deepEqual(await connect(gateway, 'alive.test:443'), { status: 403, proxyStatus: FORBIDDEN }, 'the identity\'s other name was looked up');
  for (const attempt of await Promise.all(attempts)) assert.equal(attempt.status, 502);
  assert.equal(asked.filter((host) => host === 'onedead.test').length, 1, 'one lookup of the dead name');
  for (const release of stuck) release();
});
