import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import {
  X509Certificate, constants, createDecipheriv, createHash, createHmac, generateKeyPairSync, randomBytes, privateDecrypt, sign as cryptoSign,
  timingSafeEqual, type KeyObject,
} from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { evidenceRequestDocument, parseCaBundle, parseEccPublic, verifyAttestation, verifyStatic, type AttestationEvidence, type StaticEvidence } from '../../registry/attestation.js';
import { RSA_EK_CERT_NV_INDEX, certificateDer, makeCredential } from '../../tpm/attestation.js';
import { issueCertificate, makeTestCa, type IssueOptions } from '../helpers/ek-certificates.js';
import { createDatabase, testServer } from '../helpers/postgres.js';
import { RegistryFixture } from '../helpers/registry-fixture.js';
import { QUIET_TPM_LOG_ENV, startSwtpm, type SwtpmInstance } from '../helpers/swtpm.js';
import { AK_ATTRIBUTES, TOKEN_KEY_ATTRIBUTES, certifyInfo, eccPublic, ecdsaSignature, nameOf } from '../helpers/tpm-structures.js';
import { describeRun, runInProcess, type CliRun } from '../registry-cli/run-cli.js';

/**
 * A forger's attempts at attestation evidence (DESIGN §9e), built with a real software TPM and
 * tpm2-tools rather than edited bytes: each attempt carries every link a forger can make genuine
 * (often a credential the real TPM did activate), so the one refusal it meets is the check that
 * stops it. Also the TPM behaviour the verifier relies on (a public-only object can neither answer
 * a credential nor be certified), and a software "TPM" holding the key of a certificate that the
 * configured CA signed for something other than a TPM's EK.
 */

const execFileAsync = promisify(execFile);

let tpm: SwtpmInstance;
let pgServer: Awaited<ReturnType<typeof testServer>>;
let fixture: RegistryFixture;
let scratch: string;
let trusted: X509Certificate[];
let env: NodeJS.ProcessEnv;
let work: (name: string) => string;
let ekCertificate: Buffer;
let akPublic: Buffer;

const now = () => new Date();
const sha256 = (data: Buffer) => createHash('sha256').update(data).digest();

async function tool(file: string, args: readonly string[]): Promise<string> {
  return (await execFileAsync(file, [...args], { env, encoding: 'utf8' })).stdout;
}

/** The tool's failure (it must fail): its stderr. */
async function toolFails(file: string, args: readonly string[]): Promise<string> {
  try {
    await tool(file, args);
  } catch (error) {
    return String((error as { stderr?: string }).stderr);
  }
  assert.fail(`${file} ${args.join(' ')} succeeded`);
}

/** TPM2_ActivateCredential by the real TPM: `object` answers, under the EK (policy: endorsement secret). */
async function activate(object: string, credential: Buffer): Promise<Buffer> {
  const id = randomBytes(4).toString('hex');
  writeFileSync(work(`credential-${id}`), credential);
  await tool('tpm2_startauthsession', ['--policy-session', '-S', work(`session-${id}`)]);
  try {
    await tool('tpm2_policysecret', ['-S', work(`session-${id}`), '-c', 'e']);
    await tool('tpm2_activatecredential', ['-c', object, '-C', work('ek.ctx'), '-i', work(`credential-${id}`), '-o', work(`secret-${id}`), '-P', `session:${work(`session-${id}`)}`]);
  } finally {
    await tool('tpm2_flushcontext', [work(`session-${id}`)]).catch(() => undefined);
  }
  return readFileSync(work(`secret-${id}`));
}

/**
 * The verifier's whole procedure, as the registry CLI runs it: static checks, a fresh credential
 * for the EK in the certificate and the AK's computed name, the answer, the final check.
 */
async function attest(evidence: StaticEvidence, answer: (credential: Buffer, akName: Buffer) => Promise<Buffer>, cas: readonly X509Certificate[] = trusted) {
  const enrolledSpkiDer = parseEccPublic(evidence.keyPublic, 'key').spkiDer;
  const options = { caCertificates: cas, enrolledSpkiDer, now: now() };
  const { ekPublicKey, ak } = verifyStatic(evidence, options);
  const secret = randomBytes(32);
  const credential = await makeCredential(ekPublicKey.export({ type: 'spki', format: 'pem' }).toString(), ak.name, secret, env);
  const full: AttestationEvidence = { ...evidence, credential, activationProof: await answer(credential, ak.name) };
  return verifyAttestation(full, { ...options, expectedSecretSha256: sha256(secret) });
}

/** KDFa with SHA-256 (TPM 2.0 Part 1, 11.4.10.2). */
function kdfa(key: Buffer, label: string, contextU: Buffer, bits: number): Buffer {
  const blocks: Buffer[] = [];
  const size = Buffer.alloc(4);
  size.writeUInt32BE(bits);
  for (let counter = 1; blocks.length * 32 < bits / 8; counter++) {
    const count = Buffer.alloc(4);
    count.writeUInt32BE(counter);
    blocks.push(createHmac('sha256', key).update(count).update(label).update(Buffer.from([0])).update(contextU).update(size).digest());
  }
  return Buffer.concat(blocks).subarray(0, bits / 8);
}

/**
 * TPM2_ActivateCredential in software, for a forger who holds the private key the credential was
 * encrypted to (tpm2_makecredential output: 0xBADCC0DE, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET).
 */
function activateInSoftware(credential: Buffer, privateKey: KeyObject, objectName: Buffer): Buffer {
  assert.equal(credential.readUInt32BE(0), 0xbadcc0de);
  const idObject = credential.subarray(10, 10 + credential.readUInt16BE(8));
  const encryptedSeed = credential.subarray(12 + idObject.length, 12 + idObject.length + credential.readUInt16BE(10 + idObject.length));
  const seed = privateDecrypt({ key: privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256', oaepLabel: Buffer.from('IDENTITY\0') }, encryptedSeed);
  const integrity = idObject.subarray(2, 2 + idObject.readUInt16BE(0));
  const encryptedIdentity = idObject.subarray(2 + integrity.length);
  const hmac = createHmac('sha256', kdfa(seed, 'INTEGRITY', Buffer.alloc(0), 256)).update(encryptedIdentity).update(objectName).digest();
  assert.ok(timingSafeEqual(hmac, integrity), 'the credential was made for this object name');
  const decipher = createDecipheriv('aes-128-cfb', kdfa(seed, 'STORAGE', objectName, 128), Buffer.alloc(16));
  const identity = Buffer.concat([decipher.update(encryptedIdentity), decipher.final()]);
  return identity.subarray(2, 2 + identity.readUInt16BE(0));
}

/** Evidence made entirely in software: an AK and a key claiming every TPM attribute, the certify signed by that AK. */
function softwareEvidence(ek: Buffer): StaticEvidence {
  const ak = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const key = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const softAk = eccPublic(ak.publicKey.export({ format: 'jwk' }), AK_ATTRIBUTES, { ecdsa: true });
  const keyPublic = eccPublic(key.publicKey.export({ format: 'jwk' }), TOKEN_KEY_ATTRIBUTES);
  const info = certifyInfo(nameOf(softAk), nameOf(keyPublic));
  return { ekCertificate: ek, akPublic: softAk, keyPublic, certifyInfo: info, certifySignature: ecdsaSignature(cryptoSign('sha256', info, { key: ak.privateKey, dsaEncoding: 'ieee-p1363' })) };
}

function evidenceFile(evidence: StaticEvidence, name: string): string {
  writeFileSync(work(name), JSON.stringify(evidenceRequestDocument(evidence)));
  return work(name);
}

const cli = (args: readonly string[]) => runInProcess(args, { env: { ...env, TPM2_PKCS11_TCTI: '', TPM2TOOLS_TCTI: '' } });

function expectExit(run: CliRun, status: number, code?: string): void {
  assert.equal(run.status, status, describeRun(run));
  if (code) assert.equal(run.json.error?.code, code, describeRun(run));
}

async function rows(table: string): Promise<number> {
  return Number((await fixture.db.query(`SELECT count(*) AS n FROM ${table}`)).rows[0].n);
}

/** A TPM2_Certify by `signer` of the key loaded as `keyContext` (no policy, empty auth). */
async function certify(keyContext: string, signer: string, prefix: string): Promise<{ certifyInfo: Buffer; certifySignature: Buffer }> {
  await tool('tpm2_certify', ['-c', keyContext, '-C', signer, '-g', 'sha256', '-o', work(`${prefix}.attest`), '-s', work(`${prefix}.sig`)]);
  return { certifyInfo: readFileSync(work(`${prefix}.attest`)), certifySignature: readFileSync(work(`${prefix}.sig`)) };
}

before(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'agw-attest-forgery-'));
  work = (name) => join(scratch, 'work', name);
  [tpm, pgServer] = await Promise.all([startSwtpm({ ekCaDir: join(scratch, 'ca') }), testServer()]);
  trusted = parseCaBundle(readFileSync(join(scratch, 'ca', 'ca.pem'), 'utf8'));
  const databaseUrl = await createDatabase(pgServer.url);
  fixture = await RegistryFixture.connect(databaseUrl);
  env = { ...process.env, ...tpm.env, ...QUIET_TPM_LOG_ENV, AGENT_GATEWAY_DATABASE_URL: databaseUrl };
  delete env.AGENT_GATEWAY_EK_CA_FILE;
  mkdirSync(join(scratch, 'work'));
  // The genuine parts: the EK certificate, the EK, an AK under it, a storage primary for keys.
  await tool('tpm2_nvread', [RSA_EK_CERT_NV_INDEX, '-o', work('ek.der')]);
  ekCertificate = certificateDer(readFileSync(work('ek.der')));
  await tool('tpm2_createek', ['-c', work('ek.ctx'), '-G', 'rsa', '-u', work('ek.pub')]);
  await tool('tpm2_createak', ['-C', work('ek.ctx'), '-c', work('ak.ctx'), '-G', 'ecc', '-g', 'sha256', '-s', 'ecdsa', '-u', work('ak.pub'), '-n', work('ak.name')]);
  akPublic = readFileSync(work('ak.pub'));
  await tool('tpm2_createprimary', ['-C', 'o', '-g', 'sha256', '-G', 'ecc256', '-c', work('primary.ctx')]);
});

after(async () => {
  await fixture?.close();
  pgServer?.close();
  await tpm?.stop();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

describe('forged attestation evidence (swtpm, tpm2-tools)', { concurrency: false }, () => {
  test('control: a key generated in the TPM, certified by the real AK, activated by the real TPM, is attested', async () => {
    await tool('tpm2_create', ['-C', work('primary.ctx'), '-G', 'ecc256:ecdsa-sha256', '-u', work('good.pub'), '-r', work('good.priv')]);
    await tool('tpm2_load', ['-C', work('primary.ctx'), '-u', work('good.pub'), '-r', work('good.priv'), '-c', work('good.ctx')]);
    const evidence = { ekCertificate, akPublic, keyPublic: readFileSync(work('good.pub')), ...(await certify(work('good.ctx'), work('ak.ctx'), 'good')) };
    const verified = await attest(evidence, (credential) => activate(work('ak.ctx'), credential));
    assert.deepEqual(['fixedTPM', 'fixedParent', 'sensitiveDataOrigin'].filter((name) => !verified.keyAttributes.includes(name)), []);
  });

  test('a key imported into the TPM (tpm2_import), even one claiming sensitiveDataOrigin, is refused though the real AK certified it', async () => {
    // The forger keeps this private key: it was made outside the TPM and could be anywhere.
    const outside = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    writeFileSync(work('outside.pem'), outside.privateKey.export({ type: 'sec1', format: 'pem' }));
    for (const [name, attributes] of [['default import attributes', []], ['claims sensitiveDataOrigin', ['-a', 'sensitivedataorigin|userwithauth|sign']]] as const) {
      const prefix = `import-${attributes.length}`;
      await tool('tpm2_import', ['-C', work('primary.ctx'), '-G', 'ecc', '-i', work('outside.pem'), '-u', work(`${prefix}.pub`), '-r', work(`${prefix}.priv`), ...attributes]);
      await tool('tpm2_load', ['-C', work('primary.ctx'), '-u', work(`${prefix}.pub`), '-r', work(`${prefix}.priv`), '-c', work(`${prefix}.ctx`)]);
      const keyPublic = readFileSync(work(`${prefix}.pub`));
      assert.ok(parseEccPublic(keyPublic, 'imported').spkiDer.equals(outside.publicKey.export({ type: 'spki', format: 'der' })), name);
      const evidence = { ekCertificate, akPublic, keyPublic, ...(await certify(work(`${prefix}.ctx`), work('ak.ctx'), prefix)) };
      await assert.rejects(attest(evidence, (credential) => activate(work('ak.ctx'), credential)), { code: 'ERR_REFUSED_ATTESTATION_KEY_ATTRIBUTES', message: /missing fixedTPM, fixedParent/ }, name);
    }
    // The TPM itself will not take an outside key as fixedTPM / fixedParent.
    assert.match(await toolFails('tpm2_import', ['-C', work('primary.ctx'), '-G', 'ecc', '-i', work('outside.pem'), '-u', work('imp-fixed.pub'), '-r', work('imp-fixed.priv'), '-a', 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign']), /inconsistent attributes/);
  });

  test('an unrestricted TPM key as the AK signs a forged certify, and the TPM activates its credential: refused for its attributes', async () => {
    // fixedTPM, fixedParent, sign, in the TPM that holds the EK: only `restricted` is missing, so
    // TPM2_Sign signs any digest, including one of a TPMS_ATTEST naming a software key.
    await tool('tpm2_create', ['-C', work('primary.ctx'), '-G', 'ecc256:ecdsa-sha256', '-a', 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign', '-u', work('signer.pub'), '-r', work('signer.priv')]);
    await tool('tpm2_load', ['-C', work('primary.ctx'), '-u', work('signer.pub'), '-r', work('signer.priv'), '-c', work('signer.ctx')]);
    const signerPublic = readFileSync(work('signer.pub'));
    const software = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const keyPublic = eccPublic(software.publicKey.export({ format: 'jwk' }), TOKEN_KEY_ATTRIBUTES);
    const info = certifyInfo(nameOf(signerPublic), nameOf(keyPublic));
    writeFileSync(work('forged.digest'), sha256(info));
    await tool('tpm2_sign', ['-c', work('signer.ctx'), '-g', 'sha256', '-d', '-o', work('forged.sig'), work('forged.digest')]);
    const evidence = { ekCertificate, akPublic: signerPublic, keyPublic, certifyInfo: info, certifySignature: readFileSync(work('forged.sig')) };
    // Every other link holds: the TPM does open a credential made for this signer's name.
    const secret = randomBytes(32);
    const ekPem = new X509Certificate(ekCertificate).publicKey.export({ type: 'spki', format: 'pem' }).toString();
    assert.deepEqual(await activate(work('signer.ctx'), await makeCredential(ekPem, nameOf(signerPublic), secret, env)), secret);
    await assert.rejects(attest(evidence, (credential) => activate(work('signer.ctx'), credential)), { code: 'ERR_REFUSED_ATTESTATION_AK_ATTRIBUTES', message: /missing restricted/ });
  });

  test('the real AK\'s quote or certification of creation data, presented as its certify, is refused', async () => {
    await tool('tpm2_quote', ['-c', work('ak.ctx'), '-l', 'sha256:0', '-g', 'sha256', '-m', work('quote.msg'), '-s', work('quote.sig')]);
    await tool('tpm2_create', ['-C', work('primary.ctx'), '-G', 'ecc256:ecdsa-sha256', '-u', work('created.pub'), '-r', work('created.priv'), '--creation-hash', work('created.hash'), '--creation-ticket', work('created.ticket')]);
    await tool('tpm2_load', ['-C', work('primary.ctx'), '-u', work('created.pub'), '-r', work('created.priv'), '-c', work('created.ctx')]);
    // TPM2_CertifyCreation needs no authorisation of the key it names.
    await tool('tpm2_certifycreation', ['-C', work('ak.ctx'), '-c', work('created.ctx'), '-d', work('created.hash'), '-t', work('created.ticket'), '-g', 'sha256', '-o', work('creation.sig'), '--attestation', work('creation.attest')]);
    const keyPublic = readFileSync(work('created.pub'));
    for (const [name, certifyInfo, certifySignature, type] of [
      ['TPM2_Quote', readFileSync(work('quote.msg')), readFileSync(work('quote.sig')), /0x8018/],
      ['TPM2_CertifyCreation', readFileSync(work('creation.attest')), readFileSync(work('creation.sig')), /0x801a/],
    ] as const) {
      await assert.rejects(attest({ ekCertificate, akPublic, keyPublic, certifyInfo, certifySignature }, (credential) => activate(work('ak.ctx'), credential)), { code: 'ERR_REFUSED_ATTESTATION_MALFORMED', message: type }, name);
    }
  });

  test('a certify signed by a second real AK of the same TPM, presented with the first AK, is refused', async () => {
    await tool('tpm2_createak', ['-C', work('ek.ctx'), '-c', work('ak2.ctx'), '-G', 'ecc', '-g', 'sha256', '-s', 'ecdsa', '-u', work('ak2.pub'), '-n', work('ak2.name')]);
    const evidence = { ekCertificate, akPublic, keyPublic: readFileSync(work('good.pub')), ...(await certify(work('good.ctx'), work('ak2.ctx'), 'ak2')) };
    await assert.rejects(attest(evidence, (credential) => activate(work('ak.ctx'), credential)), { code: 'ERR_REFUSED_ATTESTATION_SIGNATURE' });
    // With its own public area the second AK is as good as the first.
    await attest({ ...evidence, akPublic: readFileSync(work('ak2.pub')) }, (credential) => activate(work('ak2.ctx'), credential));
  });

  test('the TPM lends nothing to a public key loaded from outside (TPM2_LoadExternal): it answers no credential and is certified by no AK', async () => {
    // What the verifier relies on: an AK or a key made in software, loaded into the genuine TPM
    // with every attribute a TPM object would have and a policy that allows the one command, still
    // cannot be authorised, since the TPM has no sensitive area for it.
    const policyFor = (commandCode: number) => {
      const code = Buffer.alloc(8);
      code.writeUInt32BE(0x0000016c); // TPM_CC_PolicyCommandCode
      code.writeUInt32BE(commandCode, 4);
      return sha256(Buffer.concat([Buffer.alloc(32), code]));
    };
    const ADMIN_WITH_POLICY = 0x00000080;
    const softAk = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ format: 'jwk' });
    const softKey = generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey.export({ format: 'jwk' });
    writeFileSync(work('external-ak.pub'), eccPublic(softAk, AK_ATTRIBUTES | ADMIN_WITH_POLICY, { ecdsa: true, authPolicy: policyFor(0x00000147) }));
    writeFileSync(work('external-key.pub'), eccPublic(softKey, TOKEN_KEY_ATTRIBUTES | ADMIN_WITH_POLICY, { authPolicy: policyFor(0x00000148) }));
    const akName = Buffer.from(await tool('tpm2_loadexternal', ['-C', 'o', '-u', work('external-ak.pub'), '-c', work('external-ak.ctx')]).then((out) => /name: ([0-9a-f]+)/.exec(out)![1]!), 'hex');
    assert.deepEqual(akName, nameOf(readFileSync(work('external-ak.pub'))), 'the TPM computes the same name the verifier does');
    await tool('tpm2_loadexternal', ['-C', 'o', '-u', work('external-key.pub'), '-c', work('external-key.ctx')]);
    const ekPem = new X509Certificate(ekCertificate).publicKey.export({ type: 'spki', format: 'pem' }).toString();
    writeFileSync(work('external.credential'), await makeCredential(ekPem, akName, randomBytes(32), env));
    const sessions = ['ek-session', 'object-session'].map(work);
    for (const [what, command, args] of [
      ['answer a credential', 'TPM2_CC_ActivateCredential', ['tpm2_activatecredential', '-c', work('external-ak.ctx'), '-p', `session:${sessions[1]}`, '-C', work('ek.ctx'), '-i', work('external.credential'), '-o', work('external.secret'), '-P', `session:${sessions[0]}`]],
      ['be certified', 'TPM2_CC_Certify', ['tpm2_certify', '-c', work('external-key.ctx'), '-P', `session:${sessions[1]}`, '-C', work('ak.ctx'), '-g', 'sha256', '-o', work('external.attest'), '-s', work('external.sig')]],
    ] as const) {
      await tool('tpm2_startauthsession', ['--policy-session', '-S', sessions[0]!]);
      await tool('tpm2_startauthsession', ['--policy-session', '-S', sessions[1]!]);
      try {
        await tool('tpm2_policysecret', ['-S', sessions[0]!, '-c', 'e']);
        await tool('tpm2_policycommandcode', ['-S', sessions[1]!, command]);
        assert.match(await toolFails(args[0], args.slice(1)), /0x12F|authValue or authPolicy is not available/, what);
      } finally {
        for (const session of sessions) await tool('tpm2_flushcontext', [session]).catch(() => undefined);
      }
    }
  });

  test('a software "TPM" holding the key of a certificate the CA signed for another purpose is refused; the split flow stores no challenge', async () => {
    const ca = await makeTestCa('forgery test EK CA');
    writeFileSync(work('test-ca.pem'), ca.certificate.toString());
    const cases: [string, IssueOptions][] = [
      ['an intermediate CA certificate with an RSA key', { isCa: true, eku: null }],
      ['a TLS server certificate with an RSA key', { eku: ['1.3.6.1.5.5.7.3.1'] }],
    ];
    for (const [name, options] of cases) {
      const issued = await issueCertificate(ca, options);
      const evidence = softwareEvidence(issued.der);
      await assert.rejects(attest(evidence, async (credential, akName) => activateInSoftware(credential, issued.privateKey, akName), [ca.certificate]), { code: 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED', message: /is not an EK certificate/ }, name);
      const before = await rows('attestation_challenges');
      expectExit(await cli(['--json', 'attest', 'challenge', '--evidence', evidenceFile(evidence, 'forged.json'), '--out', work('forged-challenge.json'), '--ek-ca', work('test-ca.pem')]), 3, 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED');
      assert.equal(await rows('attestation_challenges'), before, name);
    }
  });

  test('control: the same software forger with a certificate shaped as an EK\'s passes every step, so a trusted EK CA must be a TPM vendor\'s', async () => {
    // This is what the refusals above stand on: the activation proves possession of the key the
    // CA certified, nothing more. Through the split flow, as a remote forger would go.
    const ca = await makeTestCa('careless EK CA');
    writeFileSync(work('careless-ca.pem'), ca.certificate.toString());
    const issued = await issueCertificate(ca);
    const evidence = softwareEvidence(issued.der);
    const akName = nameOf(evidence.akPublic);
    const enrol = async (suffix: string) => {
      expectExit(await cli(['--json', 'attest', 'challenge', '--evidence', evidenceFile(evidence, 'careless.json'), '--out', work(`careless-challenge-${suffix}.json`), '--ek-ca', work('careless-ca.pem')]), 0);
      const challenge = JSON.parse(readFileSync(work(`careless-challenge-${suffix}.json`), 'utf8'));
      const secret = activateInSoftware(Buffer.from(challenge.credential, 'base64'), issued.privateKey, akName);
      writeFileSync(work(`careless-proof-${suffix}.json`), JSON.stringify({ format: 'agent-gateway-tpm-proof-v1', challenge_id: challenge.challenge_id, activation_proof: secret.toString('base64') }));
      const run = await cli(['--json', 'enrol-agent-key', '--proof', work(`careless-proof-${suffix}.json`), '--ek-ca', work('careless-ca.pem')]);
      expectExit(run, 0);
      return run;
    };
    const first = await enrol('1');
    assert.equal(first.json.attestation.verified, true);
    // Enrolling the same key again replaces its row; there is still one.
    const second = await enrol('2');
    assert.equal(second.json.fingerprint, first.json.fingerprint);
    assert.equal(Number((await fixture.db.query('SELECT count(*) AS n FROM key_attestations WHERE public_key_spki_der = $1', [Buffer.from(first.json.public_key_spki_der, 'hex')])).rows[0].n), 1);
  });
});
