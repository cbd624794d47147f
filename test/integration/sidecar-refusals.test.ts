/**
 * Readable refusals: every non-2xx status the sidecar hands an agent carries a `proxy-status`
 * and a one-line text/plain body naming the destination, the reason code and what to do, for
 * CONNECT and for plain-HTTP proxying, as curl, Python (requests and http.client) and Node's
 * fetch see them. Real gateway, PostgreSQL, HTTP services and client programs.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { after, before, test } from 'node:test';
import { createSecureContext } from 'node:tls';
import { pino } from 'pino';
import type { Gateway } from '../../gateway/src/gateway.js';
import { startSidecar, type Sidecar } from '../../sidecar/src/sidecar.js';
import { startTestGateway } from '../helpers/gateway.js';
import { runFile } from '../registry-cli/run-cli.js';
import { clientCredentials, serverTls, type ClientCredentials, type ServerTls } from '../helpers/pki.js';
import { createDatabase, freePort, testServer } from '../helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../helpers/registry-fixture.js';

const NOT_AUTHORIZED = 'this agent holds no active permission for it; ask a principal to grant it.';
const DENIED_PROXY_STATUS = 'agent-gateway; error=http_request_denied; details="not_authorized"';

let pgServer: Awaited<ReturnType<typeof testServer>>;
let gatewayTls: ServerTls;
let gateway: Gateway;
let plain: Server;
let client: ClientCredentials;
let sidecar: Sidecar;
let proxyUrl: string;

/** What an HTTP/1.1 client reads back for one raw request to the sidecar: status line, headers, body. */
async function raw(port: number, text: string): Promise<{ status: number; headers: Record<string, string>; body: string }> {
  const socket = connect(port, '127.0.0.1');
  // No half-close: an agent waits for the answer with its side open.
  socket.write(text);
  let data = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => (data += chunk));
  await once(socket, 'close');
  const [head, ...rest] = data.split('\r\n\r\n');
  const [statusLine, ...lines] = head!.split('\r\n');
  const headers = Object.fromEntries(lines.map((line) => [line.slice(0, line.indexOf(':')).toLowerCase(), line.slice(line.indexOf(':') + 1).trim()]));
  return { status: Number(statusLine!.split(' ')[1]), headers, body: rest.join('\r\n\r\n') };
}

before(async () => {
  pgServer = await testServer();
  const databaseUrl = await createDatabase(pgServer.url);
  gatewayTls = await serverTls();
  plain = createServer((req, res) => res.writeHead(200, { 'content-type': 'text/plain' }).end(`plain ${req.url}\n`));
  plain.listen(0, '127.0.0.1');
  await once(plain, 'listening');
  const plainPort = (plain.address() as AddressInfo).port;
  gateway = await startTestGateway({
    databaseUrl,
    tls: gatewayTls,
    resolve: { 'plain.test:80': `127.0.0.1:${plainPort}`, 'denied.test:80': `127.0.0.1:${plainPort}`, 'denied.test:443': `127.0.0.1:${plainPort}` },
  });
  const fixture = await RegistryFixture.connect(databaseUrl);
  const alice = await fixture.principal('org-alice', { notBefore: at(-DAY) });
  await fixture.delegate(alice.keyId, 'plain.test:80', { notBefore: at(-DAY) });
  client = await clientCredentials({ identity: 'agent-alpha' });
  await fixture.permit(alice, { identity: 'agent-alpha', spkiDer: client.spkiDer }, 'plain.test:80');
  await fixture.close();
  sidecar = await startSidecar({
    gatewayUrl: `https://localhost:${gateway.address!.port}`,
    secureContext: createSecureContext({ cert: client.certPem, key: client.privateKeyPem, ca: gatewayTls.caPem }),
    logger: pino({ level: 'silent' }),
  });
  proxyUrl = `http://127.0.0.1:${sidecar.port}`;
});

after(async () => {
  await sidecar?.close();
  await gateway?.close(200);
  plain?.close();
  pgServer?.close();
});

test('a refused CONNECT: the gateway status, its proxy-status and one line naming destination, reason and what to do', async () => {
  const answer = await raw(sidecar.port, 'CONNECT denied.test:443 HTTP/1.1\r\nhost: denied.test:443\r\n\r\n');
  assert.equal(answer.status, 403);
  assert.equal(answer.headers['proxy-status'], DENIED_PROXY_STATUS);
  assert.equal(answer.headers['content-type'], 'text/plain; charset=utf-8');
  assert.equal(answer.body, `agent-gateway: CONNECT denied.test:443 refused (not_authorized): ${NOT_AUTHORIZED}\n`);
});

test('curl: plain HTTP refused shows the line; HTTPS refused shows the proxy-status and fails', async () => {
  const env = { ...process.env, http_proxy: proxyUrl, HTTPS_PROXY: proxyUrl, NO_PROXY: '', no_proxy: '' };
  const allowed = await runFile('curl', ['-sS', '--max-time', '10', 'http://plain.test/ok'], { env, timeoutMs: 60_000 });
  assert.equal(allowed.stdout, 'plain /ok\n', allowed.stderr);
  const refusedPlain = await runFile('curl', ['-sS', '--max-time', '10', '-D', '-', 'http://denied.test/doc'], { env, timeoutMs: 60_000 });
  assert.match(refusedPlain.stdout, /^HTTP\/1\.1 403 Forbidden\r\n/);
  assert.match(refusedPlain.stdout, /\r\nproxy-status: agent-gateway; error=http_request_denied; details="not_authorized"\r\n/i);
  assert.ok(refusedPlain.stdout.endsWith(`\r\n\r\nagent-gateway: GET denied.test:80 refused (not_authorized): ${NOT_AUTHORIZED}\n`), refusedPlain.stdout);
  const failing = await runFile('curl', ['-sS', '--fail', '--max-time', '10', 'http://denied.test/doc'], { env, timeoutMs: 60_000 });
  assert.equal(failing.status, 22, 'curl --fail exits 22 on the 403');
  const refusedTls = await runFile('curl', ['-sS', '-v', '--max-time', '10', 'https://denied.test/doc'], { env, timeoutMs: 60_000 });
  assert.equal(refusedTls.status, 56, refusedTls.stderr);
  assert.match(refusedTls.stderr, /< proxy-status: agent-gateway; error=http_request_denied; details="not_authorized"/i);
  assert.match(refusedTls.stderr, /CONNECT tunnel failed, response 403/);
});

test('Python: requests and http.client read the status, proxy-status and the line', async () => {
  const script = `
import json, sys, http.client
out = {}
try:
    import requests
    r = requests.get('http://denied.test/doc', proxies={'http': sys.argv[1]}, timeout=10)
    out['requests'] = [r.status_code, r.headers.get('proxy-status'), r.text]
    try:
        requests.get('https://denied.test/doc', proxies={'https': sys.argv[1]}, timeout=10)
    except requests.exceptions.ProxyError as e:
        out['requests_tls'] = str(e)
except ImportError:
    pass
c = http.client.HTTPConnection('127.0.0.1', int(sys.argv[2]), timeout=10)
c.request('CONNECT', 'denied.test:443', headers={'Host': 'denied.test:443'})
r = c.getresponse()
out['connect'] = [r.status, r.getheader('proxy-status'), r.read().decode()]
c = http.client.HTTPConnection('127.0.0.1', int(sys.argv[2]), timeout=10)
c.request('GET', 'http://denied.test/doc')
r = c.getresponse()
out['plain'] = [r.status, r.getheader('proxy-status'), r.read().decode()]
print(json.dumps(out))
`;
  const ran = await runFile('python3', ['-c', script, proxyUrl, String(sidecar.port)]);
  assert.equal(ran.status, 0, ran.stderr);
  const out = JSON.parse(ran.stdout) as Record<string, [number, string, string] | string>;
  assert.deepEqual(out.connect, [403, DENIED_PROXY_STATUS, `agent-gateway: CONNECT denied.test:443 refused (not_authorized): ${NOT_AUTHORIZED}\n`]);
  assert.deepEqual(out.plain, [403, DENIED_PROXY_STATUS, `agent-gateway: GET denied.test:80 refused (not_authorized): ${NOT_AUTHORIZED}\n`]);
  if (out.requests !== undefined) {
    assert.deepEqual(out.requests, [403, DENIED_PROXY_STATUS, `agent-gateway: GET denied.test:80 refused (not_authorized): ${NOT_AUTHORIZED}\n`]);
    assert.match(out.requests_tls as string, /403/);
  }
});

test("Node's fetch through NODE_USE_ENV_PROXY: it tunnels http:// and https:// alike, and its error names the 403", async () => {
  // undici's proxy agent sends CONNECT for plain http:// too, and keeps the refusal's body to itself.
  const script = `
const out = {};
const allowed = await fetch('http://plain.test/ok');
out.allowed = [allowed.status, await allowed.text()];
for (const url of ['http://denied.test/doc', 'https://denied.test/doc']) {
  try { await fetch(url); out[url] = 'no error'; } catch (error) { out[url] = String(error.cause?.cause?.message ?? error.cause?.message ?? error.message); }
}
console.log(JSON.stringify(out));
`;
  const ran = await runFile(process.execPath, ['--no-warnings', '--input-type=module', '-e', script], { env: { ...process.env, NODE_USE_ENV_PROXY: '1', HTTP_PROXY: proxyUrl, HTTPS_PROXY: proxyUrl, NO_PROXY: '', no_proxy: '', NODE_OPTIONS: '' }, timeoutMs: 60_000 });
  assert.equal(ran.status, 0, ran.stderr);
  const out = JSON.parse(ran.stdout) as Record<string, unknown>;
  assert.deepEqual(out.allowed, [200, 'plain /ok\n']);
  assert.match(String(out['http://denied.test/doc']), /Proxy response \(403\)/);
  assert.match(String(out['https://denied.test/doc']), /Proxy response \(403\)/);
});

test('the sidecar answers itself with its own proxy-status and a line: non-proxy request, bad authority, malformed request, no gateway', async () => {
  const direct = await raw(sidecar.port, 'GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n');
  assert.equal(direct.status, 400);
  assert.equal(direct.headers['proxy-status'], 'agent-gateway-sidecar; error=http_request_error; details="request_invalid"');
  assert.match(direct.body, /^agent-gateway-sidecar: GET \/health refused \(request_invalid\): send CONNECT host:port, or a request with an absolute http:\/\/ URL[^\n]*\.\n$/);

  const badAuthority = await raw(sidecar.port, 'CONNECT user@docstore:443 HTTP/1.1\r\nhost: x\r\n\r\n');
  assert.equal(badAuthority.status, 400);
  assert.match(badAuthority.body, /^agent-gateway-sidecar: CONNECT user@docstore:443 refused \(authority_invalid\): [^\n]+\.\n$/);

  const malformed = await raw(sidecar.port, 'NOT HTTP AT ALL\r\n\r\n');
  assert.equal(malformed.status, 400);
  assert.match(malformed.body, /^agent-gateway-sidecar: malformed request refused \(request_invalid\): [^\n]+\.\n$/);

  const lonely = await startSidecar({
    gatewayUrl: `https://localhost:${await freePort()}`,
    secureContext: createSecureContext({ cert: client.certPem, key: client.privateKeyPem, ca: gatewayTls.caPem }),
    logger: pino({ level: 'silent' }),
    connectWaitMs: 300,
  });
  try {
    for (const request of ['CONNECT docstore.test:443 HTTP/1.1\r\nhost: docstore.test:443\r\n\r\n', 'GET http://docstore.test/x HTTP/1.1\r\nhost: docstore.test\r\n\r\n']) {
      const answer = await raw(lonely.port, request);
      assert.equal(answer.status, 503);
      assert.equal(answer.headers['proxy-status'], 'agent-gateway-sidecar; error=proxy_internal_error; details="gateway_unavailable"');
      assert.match(answer.body, /^agent-gateway-sidecar: (CONNECT docstore\.test:443|GET docstore\.test:80) refused \(gateway_unavailable\): the sidecar has no session to the gateway; [^\n]+\.\n$/);
    }
  } finally {
    await lonely.close();
  }
});
