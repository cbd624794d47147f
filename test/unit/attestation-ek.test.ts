import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { before, describe, test } from 'node:test';
import { verifyEkCertificate } from '../../registry/attestation.js';
import { DAY_MS, issueCertificate, makeIntermediateCa, makeTestCa, selfSignedEkCertificate, type IssueOptions, type TestCa } from '../helpers/ek-certificates.js';

/**
 * The EK certificate link of attestation (DESIGN §9e) without a TPM: certificates made here, each
 * differing from an accepted one in the single way its name says. The verifier encrypts the
 * credential to the public key in this certificate, so whoever holds the private key of any RSA
 * certificate that passes here can answer it in software (test/tpm/attestation-forgery.test.ts
 * does): only TPM endorsement certificates may pass.
 */

const now = new Date();
const at = (offsetMs: number) => new Date(now.getTime() + offsetMs);
let ca: TestCa;

const issued = async (issuer: TestCa, options: IssueOptions = {}) => (await issueCertificate(issuer, options)).der;

before(async () => {
  ca = await makeTestCa('EK test CA');
});

describe('EK certificate checks', () => {
  test('an end-entity RSA certificate for the TCG EK purpose (or with no EKU), issued by a configured CA, is accepted', async () => {
    const accepted = verifyEkCertificate(await issued(ca), [ca.certificate], now);
    assert.equal(accepted.ca, ca.certificate);
    assert.equal(accepted.ekPublicKey.asymmetricKeyType, 'rsa');
    // Some vendors' EK certificates carry no extended key usage at all.
    verifyEkCertificate(await issued(ca, { eku: null }), [ca.certificate], now);
  });

  test('validity: an expired or not yet valid EK certificate, or one whose CA is, is refused', async () => {
    const expiredCa = await makeTestCa('expired EK CA', { notBefore: at(-10 * DAY_MS), notAfter: at(-DAY_MS) });
    const futureCa = await makeTestCa('future EK CA', { notBefore: at(DAY_MS), notAfter: at(10 * DAY_MS) });
    const cases: [string, Buffer, TestCa][] = [
      ['expired EK', await issued(ca, { notBefore: at(-10 * DAY_MS), notAfter: at(-1000) }), ca],
      ['EK not valid yet', await issued(ca, { notBefore: at(60_000), notAfter: at(10 * DAY_MS) }), ca],
      ['CA expired', await issued(expiredCa), expiredCa],
      ['CA not valid yet', await issued(futureCa), futureCa],
    ];
    for (const [name, der, issuer] of cases) {
      assert.throws(() => verifyEkCertificate(der, [issuer.certificate], now), { code: 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED', message: /is not valid now/ }, name);
    }
  });

  test('issuer: another CA with the same name, an issuer that is no CA, a self-signed EK, an unconfigured intermediate are refused', async () => {
    const twin = await makeTestCa('EK test CA');
    const notCa = await makeTestCa('plain certificate', { isCa: false });
    const selfSigned = await selfSignedEkCertificate();
    const intermediate = await makeIntermediateCa(ca, 'EK intermediate');
    const viaIntermediate = await issued(intermediate);
    const cases: [string, Buffer, X509Certificate[]][] = [
      ['same issuer name, another key', await issued(twin), [ca.certificate]],
      ['issuer without CA:TRUE, though configured', await issued(notCa), [notCa.certificate]],
      ['self-signed EK', selfSigned, [ca.certificate]],
      ['self-signed EK put in the bundle', selfSigned, [ca.certificate, new X509Certificate(selfSigned)]],
      ['issued by an intermediate that is not in the bundle', viaIntermediate, [ca.certificate]],
    ];
    for (const [name, der, bundle] of cases) {
      assert.throws(() => verifyEkCertificate(der, bundle, now), { code: 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED' }, name);
    }
    // With the intermediate in the bundle it is a configured issuer (README: intermediates go into the bundle).
    verifyEkCertificate(viaIntermediate, [ca.certificate, intermediate.certificate], now);
  });

  test('only TPM endorsement certificates: a CA certificate or a certificate for another purpose with an RSA key is refused', async () => {
    // The configured CA signed each of these; their private keys are in software.
    const cases: [string, IssueOptions][] = [
      ['an intermediate CA certificate with an RSA key', { isCa: true, eku: null }],
      ['a CA certificate that even claims the EK purpose', { isCa: true }],
      ['a TLS server certificate', { eku: ['1.3.6.1.5.5.7.3.1'] }],
      ['a TLS client certificate', { eku: ['1.3.6.1.5.5.7.3.2'] }],
      ['the TCG platform certificate purpose only', { eku: ['2.23.133.8.2'] }],
    ];
    for (const [name, options] of cases) {
      const der = await issued(ca, options);
      assert.throws(() => verifyEkCertificate(der, [ca.certificate], now), { code: 'ERR_REFUSED_ATTESTATION_EK_UNTRUSTED', message: /is not an EK certificate/ }, name);
    }
  });

  test('form: an EC key, trailing bytes, or no certificate at all is ERR_REFUSED_ATTESTATION_MALFORMED', async () => {
    const good = await issued(ca);
    for (const [name, der] of [
      ['EC key (only the RSA 2048 EK is used)', await issued(ca, { ecKey: true })],
      ['trailing byte', Buffer.concat([good, Buffer.from([0])])],
      ['truncated', good.subarray(0, good.length - 1)],
      ['empty', Buffer.alloc(0)],
    ] as const) {
      assert.throws(() => verifyEkCertificate(der, [ca.certificate], now), { code: 'ERR_REFUSED_ATTESTATION_MALFORMED' }, name);
    }
  });
});
