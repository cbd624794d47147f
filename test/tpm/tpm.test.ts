import assert from 'node:assert/strict';
import { execFile, execFileSync } from 'node:child_process';
import { createPublicKey, generateKeyPairSync, verify as cryptoVerify } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import pkcs11js from 'pkcs11js';
import { canonicalPermissionBytes } from '../../registry/permission.js';
import { permissionFields, signPermission } from '../../registry/signing.js';
import { verifyP256Signature, p256PublicKeyFromSpki } from '../../registry/ecdsa.js';
import { TpmError } from '../../tpm/errors.js';
import { openToken, type OpenTokenOptions, type TpmToken } from '../../tpm/token.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';

const TOKEN = 'agw-test';
const USER_PIN = 'user-pin-4711';
const SO_PIN = 'so-pin-0815';
const TOKEN_MODULE_URL = pathToFileURL(resolve(import.meta.dirname, '../../tpm/token.ts')).href;

let tpm: SwtpmInstance;
let scratch: string;
const open: TpmToken[] = [];

function openTracked(options: Partial<OpenTokenOptions> = {}): TpmToken {
  const token = openToken({ tokenLabel: TOKEN, userPin: USER_PIN, ...options });
  open.push(token);
  return token;
}

function closeAll(): void {
  while (open.length > 0) open.pop()?.close();
}

interface ChildResult {
  readonly name?: string;
  readonly code?: string;
  readonly returnValue?: string;
  readonly operation?: string;
  readonly message?: string;
  readonly inspected?: string;
}

/**
 * Tries each PIN in a child process: failed logins make tpm2-pkcs11 print ERROR lines on fd 2
 * (no log level silences them), and a pipe lets the test check that output for leaked PINs.
 */
async function openInChild(pins: readonly string[]): Promise<{ results: ChildResult[]; stdout: string; stderr: string }> {
  const script = `
    const { openToken } = await import(${JSON.stringify(TOKEN_MODULE_URL)});
    const { inspect } = await import('node:util');
    for (const userPin of ${JSON.stringify(pins)}) {
      try { openToken({ tokenLabel: ${JSON.stringify(TOKEN)}, userPin }).close(); console.log(JSON.stringify({ code: 'OK' })); }
      catch (e) { console.log(JSON.stringify({ name: e.name, code: e.code, returnValue: e.returnValue, operation: e.operation, message: e.message, inspected: inspect(e, { depth: 5 }) })); }
    }
  `;
  // Warnings on, so the PIN check below also covers what the TSS and tpm2-pkcs11 log.
  const env = { ...process.env, TPM2_PKCS11_LOG_LEVEL: '1', TSS2_LOG: 'all+WARNING' };
  return new Promise((done, fail) => {
    execFile(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { env, encoding: 'utf8', timeout: 30_000 }, (error, stdout, stderr) => {
      if (error) return fail(new Error(`child failed: ${stderr || error.message}`));
      done({ results: stdout.trim().split('\n').map((line) => JSON.parse(line) as ChildResult), stdout, stderr });
    });
  });
}

function expectTpmError(fn: () => unknown, code: string): TpmError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof TpmError, `expected TpmError, got ${String(error)}`);
    assert.equal(error.code, code, error.message);
    return error;
  }
  assert.fail(`expected ${code}`);
}

before(async () => {
  tpm = await startSwtpm();
  // tpm2-pkcs11 reads these when it is initialised, i.e. at the first openToken in this process.
  Object.assign(process.env, tpm.env, QUIET_TPM_LOG_ENV);
  scratch = mkdtempSync(join(tmpdir(), 'agw-tpm-test-'));
});

after(async () => {
  closeAll();
  await tpm?.stop();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('tpm token', { concurrency: false }, () => {
  test('creates the token on first open and reuses it on the second', () => {
    const first = openTracked({ soPin: SO_PIN, createIfMissing: true });
    assert.equal(first.created, true);
    first.close();
    first.close(); // idempotent
    const second = openTracked({ soPin: SO_PIN, createIfMissing: true });
    assert.equal(second.created, false);
    second.close();
    const third = openTracked(); // no SO PIN needed once it exists
    assert.equal(third.created, false);
    closeAll();
  });

  test('refuses a second handle on an open token, and a closed handle', () => {
    const token = openTracked();
    expectTpmError(() => openTracked(), 'ERR_TPM_INVALID_ARGUMENT');
    token.close();
    expectTpmError(() => token.findKey('anything'), 'ERR_TPM_CLOSED');
    closeAll();
  });

  test('generates a P-256 key inside the TPM and finds it again after reopening', () => {
    const token = openTracked();
    const key = token.generateP256Key('principal-a');
    const spki = token.publicKeySpkiDer(key);
    const publicKey = createPublicKey({ key: spki, format: 'der', type: 'spki' });
    assert.equal(publicKey.asymmetricKeyType, 'ec');
    assert.equal(publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1');
    assert.equal(key.id.length, 16);
    expectTpmError(() => token.generateP256Key('principal-a'), 'ERR_TPM_KEY_EXISTS');
    token.close();

    const again = openTracked();
    const found = again.findKey('principal-a');
    assert.deepEqual(again.publicKeySpkiDer(found), spki);
    assert.deepEqual(found.id, key.id);
    assert.deepEqual(again.findOrCreateP256Key('principal-a').publicKeySpkiDer, spki);
    const fresh = again.findOrCreateP256Key('principal-b');
    assert.notDeepEqual(fresh.publicKeySpkiDer, spki);
    closeAll();
  });

  test('the private key is sensitive and never extractable', () => {
    const token = openTracked();
    const key = token.findKey('principal-a');
    const attributes = token.privateKeyAttributes(key, [pkcs11js.CKA_NEVER_EXTRACTABLE, pkcs11js.CKA_EXTRACTABLE, pkcs11js.CKA_SENSITIVE, pkcs11js.CKA_ALWAYS_SENSITIVE]);
    assert.deepEqual(attributes.get(pkcs11js.CKA_NEVER_EXTRACTABLE), Buffer.from([1]));
    assert.deepEqual(attributes.get(pkcs11js.CKA_EXTRACTABLE), Buffer.from([0]));
    assert.deepEqual(attributes.get(pkcs11js.CKA_SENSITIVE), Buffer.from([1]));
    assert.deepEqual(attributes.get(pkcs11js.CKA_ALWAYS_SENSITIVE), Buffer.from([1]));
    const error = expectTpmError(() => token.privateKeyAttributes(key, [pkcs11js.CKA_VALUE]), 'ERR_TPM');
    assert.ok(['CKR_ATTRIBUTE_TYPE_INVALID', 'CKR_ATTRIBUTE_SENSITIVE'].includes(error.returnValue ?? ''), error.message);
    closeAll();
  });

  test('signatures verify with node:crypto and with openssl dgst', async (t) => {
    const token = openTracked();
    const key = token.findKey('principal-a');
    const message = Buffer.from('agent-gateway-permission-v1\npermission_id=perm-1', 'utf8');
    const signature = token.sign(key, message);
    assert.equal(signature[0], 0x30, 'DER SEQUENCE');
    const publicKey = p256PublicKeyFromSpki(key.publicKeySpkiDer);
    assert.equal(cryptoVerify('sha256', message, { key: publicKey, dsaEncoding: 'der' }, signature), true);
    assert.equal(verifyP256Signature(publicKey, message, signature), true);
    assert.equal(cryptoVerify('sha256', Buffer.concat([message, Buffer.from('x')]), { key: publicKey, dsaEncoding: 'der' }, signature), false);

    writeFileSync(join(scratch, 'pub.pem'), publicKey.export({ format: 'pem', type: 'spki' }));
    writeFileSync(join(scratch, 'sig.der'), signature);
    writeFileSync(join(scratch, 'msg'), message);
    const out = execFileSync('openssl', ['dgst', '-sha256', '-verify', join(scratch, 'pub.pem'), '-signature', join(scratch, 'sig.der'), join(scratch, 'msg')], { encoding: 'utf8' });
    assert.match(out, /Verified OK/);

    const rounds = 50;
    const started = process.hrtime.bigint();
    for (let i = 0; i < rounds; i++) token.sign(key, message);
    const msPerSignature = Number(process.hrtime.bigint() - started) / 1e6 / rounds;
    t.diagnostic(`${msPerSignature.toFixed(2)} ms per TPM signature (${rounds} rounds)`);
    closeAll();
  });

  test('the PermissionSigner adapter signs a permission the registry accepts', async () => {
    const token = openTracked();
    const key = token.findKey('principal-a');
    const signer = token.permissionSigner(key, 'org-alice');
    const subject = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ format: 'der', type: 'spki' });
    const fields = permissionFields({ subjectIdentity: 'agent-1', subjectPublicKeySpkiDer: subject, destination: 'DocStore' }, signer.keyId);
    const signed = await signPermission(fields, signer); // verifies against the signer's SPKI itself
    assert.equal(verifyP256Signature(p256PublicKeyFromSpki(key.publicKeySpkiDer), canonicalPermissionBytes(fields), signed.signature), true);
    closeAll();
  });

  test('a wrong PIN is a typed error whose message and stderr never contain the PIN', async () => {
    const wrongPin = 'wrong-pin-98765';
    const { results, stdout, stderr } = await openInChild([wrongPin]);
    const [result] = results;
    assert.equal(result?.name, 'TpmError');
    assert.equal(result?.code, 'ERR_TPM_PIN_INCORRECT');
    assert.equal(result?.returnValue, 'CKR_PIN_INCORRECT');
    assert.equal(result?.operation, 'C_Login');
    assert.match(result?.message ?? '', /PIN incorrect/);
    for (const text of [result?.message, result?.inspected, stdout, stderr]) {
      assert.ok(!(text ?? '').includes(wrongPin), 'the wrong PIN leaked');
      assert.ok(!(text ?? '').includes(USER_PIN), 'the real PIN leaked');
    }
  });

  test('TPM dictionary-attack lockout is ERR_TPM_PIN_LOCKED, even for the right PIN', async () => {
    const lockout = (args: string[]): void => {
      execFileSync('tpm2_dictionarylockout', args, { env: process.env, stdio: ['ignore', 'ignore', 'pipe'] });
    };
    lockout(['--clear-lockout', '--setup-parameters', '--max-tries=2', '--recovery-time=600', '--lockout-recovery-time=1']);
    try {
      const { results } = await openInChild(['bad-1', 'bad-2', 'bad-3', USER_PIN]);
      assert.deepEqual(results.map((r) => r.code), ['ERR_TPM_PIN_INCORRECT', 'ERR_TPM_PIN_INCORRECT', 'ERR_TPM_PIN_LOCKED', 'ERR_TPM_PIN_LOCKED']);
      assert.equal(results[3]?.returnValue, 'CKR_PIN_LOCKED');
    } finally {
      lockout(['--clear-lockout', '--setup-parameters', '--max-tries=1000', '--recovery-time=1', '--lockout-recovery-time=1']);
    }
    openTracked().close();
  });

  test('an unknown token label and an unknown key label are typed errors', () => {
    expectTpmError(() => openTracked({ tokenLabel: 'no-such-token' }), 'ERR_TPM_TOKEN_NOT_FOUND');
    // createIfMissing without an SO PIN cannot create anything
    expectTpmError(() => openTracked({ tokenLabel: 'no-such-token', createIfMissing: true }), 'ERR_TPM_TOKEN_NOT_FOUND');
    const token = openTracked();
    const error = expectTpmError(() => token.findKey('no-such-key'), 'ERR_TPM_KEY_NOT_FOUND');
    assert.match(error.message, /no-such-key/);
    assert.equal(token.findKeyOrUndefined('no-such-key'), undefined);
    expectTpmError(() => token.findKey(''), 'ERR_TPM_INVALID_ARGUMENT');
    expectTpmError(() => token.signDigest(token.findKey('principal-a'), Buffer.alloc(31)), 'ERR_TPM_INVALID_ARGUMENT');
    closeAll();
  });

  test('keys survive a restart of swtpm and tpm2-abrmd on the same state', async () => {
    const first = openTracked();
    const spki = first.findKey('principal-a').publicKeySpkiDer;
    closeAll();
    await tpm.restart();
    const token = openTracked();
    const key = token.findKey('principal-a');
    assert.deepEqual(key.publicKeySpkiDer, spki);
    const message = Buffer.from('after restart');
    assert.equal(verifyP256Signature(p256PublicKeyFromSpki(spki), message, token.sign(key, message)), true);
    closeAll();
  });
});
