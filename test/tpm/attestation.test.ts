import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, generateKeyPairSync, randomBytes, sign as cryptoSign, type X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { parseCaBundle, verifyAttestation, verifyStatic, type AttestationEvidence, type VerifiedAttestation } from '../../registry/attestation.js';
import { TpmAttestor, makeCredential } from '../../tpm/attestation.js';
import { openToken } from '../../tpm/token.js';
import { QUIET_TPM_LOG_ENV, createPtoolKey, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';
import { AK_ATTRIBUTES, TOKEN_KEY_ATTRIBUTES, certifyInfo as certifyInfoOf, eccPublic, ecdsaSignature, nameOf } from '../helpers/tpm-structures.js';

/**
 * Attestation at enrolment against real software TPMs manufactured with EK certificates: the TPM
 * side through tpm2-tools, the verifier in node:crypto, and refusals built from the real artefacts
 * altered byte by byte, from a second TPM whose CA is not trusted, and from forged evidence.
 */

const execFileAsync = promisify(execFile);
const TOKEN = 'agent-gateway-sidecar';
const KEY = 'agent-tls';
const USER_PIN = 'attest-user-pin-4711';
const SO_PIN = 'attest-so-pin-0815';
const KEY_REF = { tokenLabel: TOKEN, keyLabel: KEY, userPin: USER_PIN };

let tpmA: SwtpmInstance;
let tpmB: SwtpmInstance;
let scratch: string;
let trusted: X509Certificate[];
let otherCa: X509Certificate[];
let spkiA: Buffer;
let spkiB: Buffer;

interface Enrolment {
  readonly evidence: AttestationEvidence;
  readonly secret: Buffer;
  readonly elapsedMs: number;
}

function envOf(tpm: SwtpmInstance): NodeJS.ProcessEnv {
  return { ...process.env, ...tpm.env, ...QUIET_TPM_LOG_ENV };
}

/** One full enrolment as the registry CLI runs it, keeping the parts the refusal tables alter. */
async function enrol(tpm: SwtpmInstance, spki: Buffer, cas: readonly X509Certificate[]): Promise<Enrolment> {
  const started = performance.now();
  const attestor = new TpmAttestor({ key: KEY_REF, env: envOf(tpm) });
  try {
    const collected = await attestor.collect();
    const { ekPublicKey, ak } = verifyStatic(collected, { caCertificates: cas, enrolledSpkiDer: spki, now: new Date() });
    const secret = randomBytes(32);
    const credential = await makeCredential(ekPublicKey.export({ type: 'spki', format: 'pem' }).toString(), ak.name, secret);
    const activationProof = await attestor.activate(credential);
    return { evidence: { ...collected, credential, activationProof }, secret, elapsedMs: performance.now() - started };
  } finally {
    attestor.close();
  }
}

function verify(evidence: AttestationEvidence, secret: Buffer, overrides: { cas?: readonly X509Certificate[]; spki?: Buffer } = {}): VerifiedAttestation {
  return verifyAttestation(evidence, { caCertificates: overrides.cas ?? trusted, enrolledSpkiDer: overrides.spki ?? spkiA, expectedSecretSha256: createHash('sha256').update(secret).digest(), now: new Date() });
}

function flip(buffer: Buffer, offset: number, mask = 0x01): Buffer {
  const copy = Buffer.from(buffer);
  const index = offset < 0 ? copy.length + offset : offset;
  copy[index] = copy[index]! ^ mask;
  return copy;
}

// Byte offsets inside a TPM2B_PUBLIC: size(2) type(2) nameAlg(2) objectAttributes(4, big-endian).
const ATTRIBUTE_BYTE = { restricted: 7, decrypt: 7, fixedTPM: 9, fixedParent: 9 } as const;

before(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'agw-attest-test-'));
  [tpmA, tpmB] = await Promise.all([startSwtpm({ ekCaDir: join(scratch, 'ca') }), startSwtpm({ ekCaDir: join(scratch, 'other-ca') })]);
  trusted = parseCaBundle(readFileSync(join(scratch, 'ca', 'ca.pem'), 'utf8'));
  otherCa = parseCaBundle(readFileSync(join(scratch, 'other-ca', 'ca.pem'), 'utf8'));
  // TPM A: the key the sidecar makes, through PKCS#11 (tpm2-pkcs11 reads its TCTI once per process).
  Object.assign(process.env, tpmA.env, QUIET_TPM_LOG_ENV);
  const token = openToken({ tokenLabel: TOKEN, userPin: USER_PIN, soPin: SO_PIN, createIfMissing: true });
  try {
    spkiA = token.generateP256Key(KEY).publicKeySpkiDer;
  } finally {
    token.close();
  }
  // TPM B: a key made with tpm2_ptool, the other way tpm2-pkcs11 keys come to exist.
  await createPtoolKey(tpmB, { token: TOKEN, key: KEY, userPin: USER_PIN, soPin: SO_PIN });
  const attestorB = new TpmAttestor({ key: KEY_REF, env: envOf(tpmB) });
  try {
    const { parseEccPublic } = await import('../../registry/attestation.js');
    spkiB = parseEccPublic((await attestorB.collect()).keyPublic, 'key B').spkiDer;
  } finally {
    attestorB.close();
  }
});

after(async () => {
  await Promise.all([tpmA?.stop(), tpmB?.stop()]);
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('TPM attestation at enrolment (swtpm with EK certificates)', { concurrency: false }, () => {
  let first: Enrolment;

  test('a key generated through PKCS#11 is attested: EK chain, AK, certify, activation; the key still signs', async () => {
    first = await enrol(tpmA, spkiA, trusted);
    const verified = verify(first.evidence, first.secret);
    assert.equal(verified.ekFingerprint, createHash('sha256').update(first.evidence.ekCertificate).digest('hex'));
    for (const attribute of ['fixedTPM', 'fixedParent', 'sensitiveDataOrigin', 'sign']) assert.ok(verified.keyAttributes.includes(attribute), attribute);
    assert.match(verified.ekIssuer, /agent-gateway local EK CA/);
    console.log(`# one enrolment (tpm2-tools + verification): ${Math.round(first.elapsedMs)} ms`);
    const token = openToken({ tokenLabel: TOKEN, userPin: USER_PIN });
    try {
      const key = token.findKey(KEY);
      assert.ok(token.sign(key, Buffer.from('still usable after tpm2_ptool export')).length > 0);
    } finally {
      token.close();
    }
  });

  test('a key made by tpm2_ptool addkey in another TPM is attested against that TPM\'s CA', async () => {
    const enrolment = await enrol(tpmB, spkiB, otherCa);
    assert.ok(verify(enrolment.evidence, enrolment.secret, { cas: otherCa, spki: spkiB }).keyAttributes.includes('fixedTPM'));
  });

  test('refusals from real artefacts altered byte by byte', () => {
    const e = first.evidence;
    const cases: [string, Partial<AttestationEvidence>, string][] = [
      ['EK certificate signature altered', { ekCertificate: flip(e.ekCertificate, -1) }, 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED'],
      ['EK certificate truncated', { ekCertificate: e.ekCertificate.subarray(0, 100) }, 'ERR_REFUSED_ATTESTATION_MALFORMED'],
      ['AK not restricted', { akPublic: flip(e.akPublic, ATTRIBUTE_BYTE.restricted, 0x01) }, 'ERR_REFUSED_ATTESTATION_AK_ATTRIBUTES'],
      ['AK not fixedTPM', { akPublic: flip(e.akPublic, ATTRIBUTE_BYTE.fixedTPM, 0x02) }, 'ERR_REFUSED_ATTESTATION_AK_ATTRIBUTES'],
      ['AK not fixedParent', { akPublic: flip(e.akPublic, ATTRIBUTE_BYTE.fixedParent, 0x10) }, 'ERR_REFUSED_ATTESTATION_AK_ATTRIBUTES'],
      ['AK also decrypts', { akPublic: flip(e.akPublic, ATTRIBUTE_BYTE.decrypt, 0x02) }, 'ERR_REFUSED_ATTESTATION_AK_ATTRIBUTES'],
      ['AK public area with a trailing byte', { akPublic: Buffer.concat([e.akPublic, Buffer.from([0])]) }, 'ERR_REFUSED_ATTESTATION_MALFORMED'],
      ['AK public area truncated', { akPublic: e.akPublic.subarray(0, e.akPublic.length - 1) }, 'ERR_REFUSED_ATTESTATION_MALFORMED'],
      ['certify signature r altered', { certifySignature: flip(e.certifySignature, 10) }, 'ERR_REFUSED_ATTESTATION_SIGNATURE'],
      ['certify info: certified name altered', { certifyInfo: flip(e.certifyInfo, -40) }, 'ERR_REFUSED_ATTESTATION_SIGNATURE'],
      ['certify info: magic altered', { certifyInfo: flip(e.certifyInfo, 0) }, 'ERR_REFUSED_ATTESTATION_SIGNATURE'],
      ['certify over a different key (TPM B\'s key presented)', {}, 'ERR_REFUSED_ATTESTATION_KEY_MISMATCH'],
      ['key public area: fixedTPM cleared', { keyPublic: flip(e.keyPublic, ATTRIBUTE_BYTE.fixedTPM, 0x02) }, 'ERR_REFUSED_ATTESTATION_KEY_MISMATCH'],
      ['activation proof altered', { activationProof: flip(e.activationProof, 0) }, 'ERR_REFUSED_ATTESTATION_ACTIVATION'],
      ['activation proof empty', { activationProof: Buffer.alloc(0) }, 'ERR_REFUSED_ATTESTATION_ACTIVATION'],
    ];
    for (const [name, change, code] of cases) {
      // The TPM certified key A; enrolling key B with that evidence is the "different key" case.
      const spki = name.startsWith('certify over a different key') ? spkiB : spkiA;
      assert.throws(() => verify({ ...e, ...change }, first.secret, { spki }), { code }, name);
    }
    // The untouched evidence still passes: every refusal above is caused by its one change.
    verify(e, first.secret);
  });

  test('an EK certificate from a second swtpm whose CA is not trusted is refused', async () => {
    const enrolment = await enrol(tpmB, spkiB, otherCa);
    assert.throws(() => verify(enrolment.evidence, enrolment.secret, { spki: spkiB }), { code: 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED' });
    // Nor does TPM A's evidence pass with TPM B's EK certificate in it: the CA is still B's.
    assert.throws(() => verify({ ...first.evidence, ekCertificate: enrolment.evidence.ekCertificate }, first.secret, { cas: [...trusted] }), { code: 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED' });
  });

  test('a software key presented as attested: the enrolled SPKI is not the certified key', () => {
    const software = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ type: 'spki', format: 'der' });
    assert.throws(() => verify(first.evidence, first.secret, { spki: software }), { code: 'ERR_REFUSED_ATTESTATION_KEY_MISMATCH' });
  });

  test('a replayed credential fails: a new enrolment makes a new secret, and the old proof is not it', async () => {
    const second = await enrol(tpmA, spkiA, trusted);
    verify(second.evidence, second.secret);
    assert.throws(() => verify({ ...second.evidence, activationProof: first.evidence.activationProof }, second.secret), { code: 'ERR_REFUSED_ATTESTATION_ACTIVATION' });
    assert.throws(() => verify({ ...first.evidence }, second.secret), { code: 'ERR_REFUSED_ATTESTATION_ACTIVATION' });
  });

  test('forged evidence for a software key: consistent on paper, but the TPM will not activate its credential', async () => {
    const ak = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const key = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    // Every attribute a real AK and a real TPM key would have.
    const akPublic = eccPublic(ak.publicKey.export({ format: 'jwk' }), AK_ATTRIBUTES, { ecdsa: true });
    const keyPublic = eccPublic(key.publicKey.export({ format: 'jwk' }), TOKEN_KEY_ATTRIBUTES);
    const certifyInfo = certifyInfoOf(nameOf(akPublic), nameOf(keyPublic));
    const certifySignature = ecdsaSignature(cryptoSign('sha256', certifyInfo, { key: ak.privateKey, dsaEncoding: 'ieee-p1363' }));
    const spki = key.publicKey.export({ type: 'spki', format: 'der' });
    const forged = { ekCertificate: first.evidence.ekCertificate, akPublic, keyPublic, certifyInfo, certifySignature };
    const { ekPublicKey, ak: parsedAk } = verifyStatic(forged, { caCertificates: trusted, enrolledSpkiDer: spki, now: new Date() });
    const secret = randomBytes(32);
    const credential = await makeCredential(ekPublicKey.export({ type: 'spki', format: 'pem' }).toString(), parsedAk.name, secret);
    // The forger owns TPM A and its real AK, but the credential names the software AK.
    const attestor = new TpmAttestor({ key: KEY_REF, env: envOf(tpmA) });
    try {
      await attestor.collect();
      await assert.rejects(attestor.activate(credential), { code: 'ERR_TPM_ATTESTATION' });
    } finally {
      attestor.close();
    }
    assert.throws(() => verify({ ...forged, credential, activationProof: randomBytes(32) }, secret, { spki }), { code: 'ERR_REFUSED_ATTESTATION_ACTIVATION' });
  });

  test('an AK from TPM A cannot answer a credential made for TPM B\'s EK', async () => {
    const b = await enrol(tpmB, spkiB, otherCa);
    const ekB = new (await import('node:crypto')).X509Certificate(b.evidence.ekCertificate).publicKey;
    const attestor = new TpmAttestor({ key: KEY_REF, env: envOf(tpmA) });
    try {
      const collected = await attestor.collect();
      const { ak } = verifyStatic(collected, { caCertificates: trusted, enrolledSpkiDer: spkiA, now: new Date() });
      const credential = await makeCredential(ekB.export({ type: 'spki', format: 'pem' }).toString(), ak.name, randomBytes(32));
      await assert.rejects(attestor.activate(credential), { code: 'ERR_TPM_ATTESTATION' });
    } finally {
      attestor.close();
    }
  });

  test('a TPM key that may leave its TPM (no fixedTPM / fixedParent), certified by a real AK, is refused', async () => {
    const env = envOf(tpmA);
    const dir = mkdtempSync(join(scratch, 'dup-'));
    const p = (name: string) => join(dir, name);
    const run = (file: string, args: string[]) => execFileAsync(file, args, { env });
    await run('tpm2_createek', ['-c', p('ek.ctx'), '-G', 'rsa', '-u', p('ek.pub')]);
    await run('tpm2_createak', ['-C', p('ek.ctx'), '-c', p('ak.ctx'), '-G', 'ecc', '-g', 'sha256', '-s', 'ecdsa', '-u', p('ak.pub'), '-n', p('ak.name')]);
    await run('tpm2_createprimary', ['-C', 'o', '-g', 'sha256', '-G', 'ecc256', '-c', p('primary.ctx')]);
    await run('tpm2_create', ['-C', p('primary.ctx'), '-G', 'ecc256:ecdsa-sha256', '-a', 'sign|userwithauth|sensitivedataorigin', '-u', p('key.pub'), '-r', p('key.priv')]);
    await run('tpm2_load', ['-C', p('primary.ctx'), '-u', p('key.pub'), '-r', p('key.priv'), '-c', p('key.ctx')]);
    await run('tpm2_certify', ['-c', p('key.ctx'), '-C', p('ak.ctx'), '-g', 'sha256', '-o', p('attest'), '-s', p('signature')]);
    const { parseEccPublic } = await import('../../registry/attestation.js');
    const keyPublic = readFileSync(p('key.pub'));
    const evidence = {
      ekCertificate: first.evidence.ekCertificate,
      akPublic: readFileSync(p('ak.pub')),
      keyPublic,
      certifyInfo: readFileSync(p('attest')),
      certifySignature: readFileSync(p('signature')),
    };
    assert.throws(() => verifyStatic(evidence, { caCertificates: trusted, enrolledSpkiDer: parseEccPublic(keyPublic, 'key').spkiDer, now: new Date() }), { code: 'ERR_REFUSED_ATTESTATION_KEY_ATTRIBUTES' });
  });
});
