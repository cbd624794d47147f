/**
 * The sidecar with its key in a TPM: real swtpm behind tpm2-abrmd, real tpm2-pkcs11 through
 * pkcs11js and through the libp11 OpenSSL engine, real PostgreSQL, the real gateway, curl, and
 * the `agent-gateway-sidecar` bin as a child process. No mocks.
 *
 * This process loads the TLS identity itself (the engine then holds tpm2-pkcs11 here), and the
 * child processes load it again from the same token, concurrently, as separate sidecars would.
 */
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect as tlsConnect } from 'node:tls';
import { promisify } from 'node:util';
import pkcs11js from 'pkcs11js';
import { pino } from 'pino';
import type { Gateway } from '../../gateway/src/gateway.js';
import { readPeerIdentity } from '../../registry/identity.js';
import { X509Certificate } from '../../registry/x509.js';
import { startSidecar, type Sidecar } from '../../sidecar/src/sidecar.js';
import { createTpmSecureContext, ensureTpmKey, loadTlsIdentity, TlsIdentityError, type TlsIdentity } from '../../sidecar/src/tls-identity.js';
import { openToken } from '../../tpm/token.js';
import { connectViaProxy, getOver, httpsService } from '../helpers/chain.js';
import { captureLogger } from '../helpers/logs.js';
import { startTestGateway } from '../helpers/gateway.js';
import { clientCredentials, serverTls, TEST_OID, type ServerTls } from '../helpers/pki.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { at, DAY, RegistryFixture } from '../helpers/registry-fixture.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';

const run = promisify(execFile);
const BIN = resolve(import.meta.dirname, '../../bin/agent-gateway-sidecar.js');
const TOKEN = 'agw-sidecar-test';
const KEY = 'agent-tls';
const USER_PIN = 'user-pin-31337';
const SO_PIN = 'so-pin-27182';

let tpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let scratch: string;
let gatewayTls: ServerTls;
let serviceTls: ServerTls;
let docstore: Awaited<ReturnType<typeof httpsService>>;
let messaging: Awaited<ReturnType<typeof httpsService>>;
let gateway: Gateway;
let gatewayUrl: string;
let identity: TlsIdentity;
let sidecar: Sidecar;
let proxyUrl: string;
/** Every line the gateway logged, parsed. */
const gatewayLog: Record<string, unknown>[] = [];

const sha256Hex = (data: Uint8Array) => createHash('sha256').update(data).digest('hex');

function decisions(filter: Record<string, unknown>): Record<string, unknown>[] {
  return gatewayLog.filter((line) => line.event === 'connect_decision' && Object.entries(filter).every(([k, v]) => line[k] === v));
}

/** The SPKI of the key as the TPM reports it, read with pkcs11js (independent of the sidecar code). */
function tpmSpki(): Buffer {
  const token = openToken({ tokenLabel: TOKEN, userPin: USER_PIN });
  try {
    return token.publicKeySpkiDer(token.findKey(KEY));
  } finally {
    token.close();
  }
}

interface SidecarChild {
  readonly child: ChildProcess;
  /** Resolves with the JSON line printed on stdout, rejects if the process exits first. */
  readonly listening: Promise<Record<string, unknown>>;
  readonly exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  output(): { stdout: string; stderr: string };
}

/** Children get the TPM's bus and store, but the TCTI only as a flag: the default would be a bare swtpm. */
function childEnv(extra: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...QUIET_TPM_LOG_ENV, ...extra };
  delete env.TPM2_PKCS11_TCTI;
  for (const [name, value] of Object.entries(extra)) if (value === undefined) delete env[name];
  return env;
}

function spawnSidecar(args: string[], env: NodeJS.ProcessEnv): SidecarChild {
  const child = spawn(process.execPath, [BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((done) => child.once('exit', (code, signal) => done({ code, signal })));
  const listening = new Promise<Record<string, unknown>>((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`no JSON line within 30 s\n${stderr}`)), 30_000);
    child.stdout!.on('data', () => {
      const newline = stdout.indexOf('\n');
      if (newline < 0) return;
      clearTimeout(timer);
      try {
        done(JSON.parse(stdout.slice(0, newline)) as Record<string, unknown>);
      } catch (error) {
        fail(error);
      }
    });
    void exit.then(({ code, signal }) => {
      clearTimeout(timer);
      fail(new Error(`sidecar exited (${code ?? signal}) before listening\n${stderr}`));
    });
  });
  listening.catch(() => {}); // callers that expect a failure await `exit` instead
  return { child, listening, exit, output: () => ({ stdout, stderr }) };
}

function gatewayArgs(certOut: string): string[] {
  return ['--gateway', gatewayUrl, '--gateway-ca', gatewayTls.caPath, '--ext-oid', TEST_OID, '--token-label', TOKEN, '--key-label', KEY, '--tcti', tpm.env.TPM2_PKCS11_TCTI, '--cert-out', certOut, '--connect-wait-ms', '5000'];
}

before(async () => {
  tpm = await startSwtpm();
  // DBUS_SESSION_BUS_ADDRESS and TPM2_PKCS11_STORE for this process's tpm2-pkcs11 (the TCTI is passed explicitly).
  Object.assign(process.env, tpm.env, QUIET_TPM_LOG_ENV);
  scratch = mkdtempSync(join(tmpdir(), 'agw-sidecar-tpm-'));
  pgServer = await testServer();
  const databaseUrl = await createDatabase(pgServer.url);
  gatewayTls = await serverTls();
  serviceTls = await serverTls(['docstore.test', 'messaging.test']);
  docstore = await httpsService(serviceTls, 'docstore');
  messaging = await httpsService(serviceTls, 'messaging');
  gateway = await startTestGateway({
    databaseUrl,
    tls: gatewayTls,
    resolve: { 'docstore.test': `127.0.0.1:${docstore.port}`, 'messaging.test': `127.0.0.1:${messaging.port}` },
    logger: captureLogger(gatewayLog, 'info'),
  });
  gatewayUrl = `https://localhost:${gateway.address!.port}`;

  identity = await loadTlsIdentity({
    identity: 'agent-alpha',
    extensionOid: TEST_OID,
    certOut: join(scratch, 'machine-client.pem'),
    tokenLabel: TOKEN,
    keyLabel: KEY,
    userPin: USER_PIN,
    soPin: SO_PIN,
    tcti: tpm.env.TPM2_PKCS11_TCTI,
    storeDir: tpm.env.TPM2_PKCS11_STORE,
    ca: gatewayTls.caPem,
  });
  const fixture = await RegistryFixture.connect(databaseUrl);
  const alice = await fixture.principal('org-alice', { notBefore: at(-DAY) });
  await fixture.delegate(alice.keyId, 'docstore.test', { notBefore: at(-DAY) });
  await fixture.delegate(alice.keyId, 'messaging.test', { notBefore: at(-DAY) });
  await fixture.permit(alice, { identity: 'agent-alpha', spkiDer: identity.spkiDer }, 'docstore.test');
  await fixture.close();
  sidecar = await startSidecar({ gatewayUrl, secureContext: identity.secureContext, logger: pino({ level: 'silent' }), backoffMaxMs: 500 });
  proxyUrl = `http://127.0.0.1:${sidecar.port}`;
});

after(async () => {
  await sidecar?.close();
  identity?.close(); // finalises tpm2-pkcs11 in this process: last, after every TPM use
  await gateway?.close(200);
  await docstore?.close();
  await messaging?.close();
  pgServer?.close();
  await tpm?.stop();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('TPM-backed identity', { concurrency: false }, () => {
  test('the key was generated inside the TPM and reads back sensitive and never extractable', () => {
    assert.equal(identity.key.tokenCreated, true, 'the SO PIN created the token');
    assert.equal(identity.key.keyCreated, true);
    // The engine holds the module in this process; pkcs11js joins it without finalising it.
    const token = openToken({ tokenLabel: TOKEN, userPin: USER_PIN });
    try {
      const key = token.findKey(KEY);
      assert.deepEqual(token.publicKeySpkiDer(key), identity.spkiDer);
      const attributes = token.privateKeyAttributes(key, [pkcs11js.CKA_NEVER_EXTRACTABLE, pkcs11js.CKA_EXTRACTABLE, pkcs11js.CKA_SENSITIVE, pkcs11js.CKA_ALWAYS_SENSITIVE]);
      assert.deepEqual(attributes.get(pkcs11js.CKA_NEVER_EXTRACTABLE), Buffer.from([1]));
      assert.deepEqual(attributes.get(pkcs11js.CKA_EXTRACTABLE), Buffer.from([0]));
      assert.deepEqual(attributes.get(pkcs11js.CKA_SENSITIVE), Buffer.from([1]));
      assert.deepEqual(attributes.get(pkcs11js.CKA_ALWAYS_SENSITIVE), Buffer.from([1]));
      assert.throws(() => token.privateKeyAttributes(key, [pkcs11js.CKA_VALUE]), (error: { returnValue?: string }) => ['CKR_ATTRIBUTE_TYPE_INVALID', 'CKR_ATTRIBUTE_SENSITIVE'].includes(error.returnValue ?? ''));
    } finally {
      token.close();
    }
  });

  test('the engine still signs handshakes after pkcs11js used the module in this process', async () => {
    const socket = tlsConnect({ host: '127.0.0.1', port: gateway.address!.port, servername: 'localhost', secureContext: identity.secureContext, ALPNProtocols: ['h2'] });
    try {
      await once(socket, 'secureConnect');
      assert.equal(socket.authorized, true, 'the gateway certificate verified against --gateway-ca');
      assert.equal(socket.alpnProtocol, 'h2');
    } finally {
      socket.destroy();
    }
  });

  test('machine-client.pem holds the TPM key\'s SPKI and the identity extension', () => {
    const path = join(scratch, 'machine-client.pem');
    assert.equal(statSync(path).mode & 0o777, 0o644);
    const certificate = new X509Certificate(readFileSync(path, 'utf8'));
    const peer = readPeerIdentity(new Uint8Array(certificate.rawData), TEST_OID);
    assert.ok(peer.ok, peer.ok ? '' : peer.reason);
    assert.equal(peer.identity, 'agent-alpha');
    assert.deepEqual(peer.spkiDer, tpmSpki());
    assert.equal(identity.certificateChange, 'created');
  });

  test('curl with HTTPS_PROXY reaches a granted HTTPS service; the gateway saw the TPM key and allowed it', async () => {
    const { stdout } = await run('curl', ['-sS', '--max-time', '10', '--cacert', serviceTls.caPath, 'https://docstore.test/health'], { env: { ...process.env, HTTPS_PROXY: proxyUrl } });
    assert.deepEqual(JSON.parse(stdout), { service: 'docstore', status: 'ok' });
    const fingerprint = `sha256:${sha256Hex(tpmSpki())}`;
    assert.equal(identity.spkiFingerprint, fingerprint);
    const allowed = decisions({ status: 200, destination: 'docstore.test:443', identity: 'agent-alpha' });
    assert.ok(allowed.length >= 1, 'an allowed connect_decision');
    assert.equal(allowed.at(-1)!.spki_fingerprint, fingerprint);
  });

  test('a destination without a grant gets 403 at CONNECT (curl and a Node client)', async () => {
    const result = await run('curl', ['-sS', '--max-time', '10', '--cacert', serviceTls.caPath, 'https://messaging.test/messages'], { env: { ...process.env, HTTPS_PROXY: proxyUrl } }).catch((error: { code: number; stderr: string }) => error);
    assert.equal((result as { code: number }).code, 56);
    assert.match((result as { stderr: string }).stderr, /CONNECT tunnel failed, response 403/);
    const { status, proxyStatus } = await connectViaProxy(proxyUrl, 'messaging.test:443', serviceTls.caPem);
    assert.equal(status, 403);
    assert.equal(proxyStatus, 'agent-gateway; error=http_request_denied; details="not_authorized"');
    const denied = decisions({ status: 403, destination: 'messaging.test:443' });
    assert.ok(denied.length >= 2);
    assert.equal(denied.at(-1)!.spki_fingerprint, identity.spkiFingerprint);
  });

  test('typed errors: mismatched key and certificate, unknown key, missing token', async () => {
    const other = await clientCredentials({ identity: 'agent-alpha' });
    assert.throws(
      () => createTpmSecureContext({ certPem: other.certPem, tokenLabel: TOKEN, keyLabel: KEY, userPin: USER_PIN }),
      (error: unknown) => error instanceof TlsIdentityError && error.code === 'ERR_TLS_IDENTITY_KEY_MISMATCH' && /does not hold this key/.test(error.message),
    );
    assert.throws(
      () => createTpmSecureContext({ certPem: identity.certPem, tokenLabel: TOKEN, keyLabel: 'no-such-key', userPin: USER_PIN }),
      (error: unknown) => error instanceof TlsIdentityError && error.code === 'ERR_TLS_IDENTITY_KEY_NOT_FOUND' && !error.message.includes(USER_PIN),
    );
    assert.throws(
      () => ensureTpmKey({ tokenLabel: 'no-such-token', keyLabel: KEY, userPin: USER_PIN }),
      (error: unknown) => error instanceof TlsIdentityError && error.code === 'ERR_TLS_IDENTITY_TOKEN_NOT_FOUND' && /AGENT_GATEWAY_TPM_SO_PIN/.test(error.message),
    );
  });
});

describe('agent-gateway-sidecar bin', { concurrency: false }, () => {
  const certOut = () => join(scratch, 'bin', 'machine-client.pem');

  test('starts, prints one JSON line, serves a CONNECT, and exits 0 on SIGTERM', async () => {
    const pinFile = join(scratch, 'user-pin');
    writeFileSync(pinFile, `${USER_PIN}\n`, { mode: 0o600 }); // the newline is not part of the PIN
    const portFile = join(scratch, 'sidecar.port');
    const sidecarChild = spawnSidecar([...gatewayArgs(certOut()), '--identity', 'agent-alpha', '--user-pin-file', pinFile, '--port-file', portFile], childEnv({ AGENT_GATEWAY_TPM_USER_PIN: undefined }));
    try {
      const line = await sidecarChild.listening;
      assert.equal(line.event, 'sidecar_listening');
      assert.equal(typeof line.port, 'number');
      assert.equal(line.spki_fingerprint, identity.spkiFingerprint, 'the same TPM key');
      assert.equal(readFileSync(portFile, 'utf8').trim(), String(line.port));
      const { status, socket } = await connectViaProxy(`http://127.0.0.1:${line.port}`, 'docstore.test:443', serviceTls.caPem);
      assert.equal(status, 200);
      const response = await getOver(socket!, 'docstore.test', '/documents');
      assert.deepEqual(JSON.parse(response.body), { service: 'docstore', path: '/documents' });
    } finally {
      sidecarChild.child.kill('SIGTERM');
    }
    const { code, signal } = await sidecarChild.exit;
    const { stdout, stderr } = sidecarChild.output();
    assert.equal(code, 0, `exit ${code ?? signal}\n${stderr}`);
    assert.equal(stdout.trim().split('\n').length, 1, 'stdout holds exactly the JSON line');
    assert.match(stderr, /"event":"stopped"/);
    assert.equal(existsSync(portFile), false, 'the port file is removed on shutdown');
    assert.ok(!stderr.includes(USER_PIN) && !stdout.includes(USER_PIN));
  });

  test('machine-client.pem is rewritten when the identity changes; the gateway then sees the new identity', async () => {
    const before = readCarrierIdentity(certOut());
    assert.equal(before.identity, 'agent-alpha');
    const sidecarChild = spawnSidecar([...gatewayArgs(certOut()), '--identity', 'agent-beta'], childEnv({ AGENT_GATEWAY_TPM_USER_PIN: USER_PIN }));
    try {
      const line = await sidecarChild.listening;
      const afterChange = readCarrierIdentity(certOut());
      assert.equal(afterChange.identity, 'agent-beta');
      assert.deepEqual(afterChange.spkiDer, before.spkiDer, 'same TPM key');
      assert.match(sidecarChild.output().stderr, /"change":"identity_changed"/);
      // agent-beta has no permission: the gateway now denies what agent-alpha could reach.
      const { status } = await connectViaProxy(`http://127.0.0.1:${line.port}`, 'docstore.test:443', serviceTls.caPem);
      assert.equal(status, 403);
      assert.ok(decisions({ status: 403, identity: 'agent-beta', destination: 'docstore.test:443' }).length >= 1);
    } finally {
      sidecarChild.child.kill('SIGTERM');
    }
    assert.equal((await sidecarChild.exit).code, 0);
  });

  test('a wrong PIN is a clear error with a non-zero exit, and no PIN appears in the output', async () => {
    const wrongPin = 'wrong-pin-86420';
    const sidecarChild = spawnSidecar([...gatewayArgs(join(scratch, 'wrong', 'machine-client.pem')), '--identity', 'agent-alpha'], childEnv({ AGENT_GATEWAY_TPM_USER_PIN: wrongPin, TPM2_PKCS11_LOG_LEVEL: '1', TSS2_LOG: 'all+WARNING' }));
    const { code } = await sidecarChild.exit;
    const { stdout, stderr } = sidecarChild.output();
    assert.equal(code, 1, stderr);
    assert.equal(stdout, '', 'no port line');
    assert.match(stderr, /agent-gateway-sidecar: TPM token "agw-sidecar-test": logging in as user: PIN incorrect/);
    assert.match(stderr, /AGENT_GATEWAY_TPM_USER_PIN/);
    for (const pin of [wrongPin, USER_PIN, SO_PIN]) assert.ok(!stdout.includes(pin) && !stderr.includes(pin), 'a PIN leaked');
  });

  test('bad settings exit 2 with one message naming the flag and variable; --help exits 0', async () => {
    // Four children at once: each one is mostly Node and tsx start-up.
    const missing = spawnSidecar(['--tcti', tpm.env.TPM2_PKCS11_TCTI], childEnv({ AGENT_GATEWAY_IDENTITY: undefined, AGENT_GATEWAY_TPM_USER_PIN: USER_PIN }));
    const bad = spawnSidecar(['--identity', 'x', '--listen-port', '70000', '--listen-host', '0.0.0.0', '--gateway', 'http://gw'], childEnv({ AGENT_GATEWAY_TPM_USER_PIN: USER_PIN }));
    const pinFlag = spawnSidecar(['--identity', 'x', '--user-pin', 'abc'], childEnv());
    const help = spawnSidecar(['--help'], childEnv());
    const [missingExit, badExit, pinFlagExit, helpExit] = await Promise.all([missing.exit, bad.exit, pinFlag.exit, help.exit]);

    assert.equal(missingExit.code, 2);
    assert.match(missing.output().stderr, /--identity \/ AGENT_GATEWAY_IDENTITY: is required/);

    assert.equal(badExit.code, 2);
    const { stderr } = bad.output();
    assert.match(stderr, /--listen-port \/ AGENT_GATEWAY_SIDECAR_PORT: must be 0-65535/);
    assert.match(stderr, /--listen-host \/ AGENT_GATEWAY_SIDECAR_HOSTS: "0.0.0.0" is not a loopback address/);
    assert.match(stderr, /--gateway \/ AGENT_GATEWAY_URL: must be an https:\/\/ URL/);
    assert.ok(!stderr.includes(USER_PIN));

    assert.equal(pinFlagExit.code, 2);
    assert.match(pinFlag.output().stderr, /PINs are never taken as flag values/);

    assert.equal(helpExit.code, 0);
    assert.match(help.output().stdout, /--user-pin-file <file>/);
  });
});

function readCarrierIdentity(path: string): { identity?: string; spkiDer?: Buffer } {
  const certificate = new X509Certificate(readFileSync(path, 'utf8'));
  const peer = readPeerIdentity(new Uint8Array(certificate.rawData), TEST_OID);
  return { ...(peer.ok ? { identity: peer.identity } : {}), ...(peer.spkiDer ? { spkiDer: peer.spkiDer } : {}) };
}
