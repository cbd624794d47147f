import { X509Certificate, generateKeyPairSync, webcrypto, type KeyObject } from 'node:crypto';
import * as x509 from '../../registry/x509.js';

/**
 * Certificates for the EK link of attestation tests (DESIGN §9e), made in software: a CA, and RSA
 * certificates it issues whose private key the test holds, shaped like a TCG EK certificate unless
 * told otherwise.
 */

const EC = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
export const RSA_SIGNATURE = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
/** tcg-kp-EKCertificate. */
export const EK_CERTIFICATE_EKU = '2.23.133.8.1';
export const DAY_MS = 86_400_000;

type SelfSignedKeys = Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[0]['keys'];
type SigningKey = x509.X509CertificateCreateWithKeyParams['signingKey'];

export interface TestCa {
  readonly certificate: X509Certificate;
  readonly subject: string;
  readonly privateKey: webcrypto.CryptoKey;
}

export interface CaOptions {
  readonly notBefore?: Date;
  readonly notAfter?: Date;
  /** false: a self-signed certificate without CA:TRUE. */
  readonly isCa?: boolean;
}

function window(options: { notBefore?: Date; notAfter?: Date }): { notBefore: Date; notAfter: Date } {
  return { notBefore: options.notBefore ?? new Date(Date.now() - DAY_MS), notAfter: options.notAfter ?? new Date(Date.now() + 365 * DAY_MS) };
}

const caExtensions = () => [new x509.BasicConstraintsExtension(true, undefined, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign, true)];

export async function makeTestCa(name: string, options: CaOptions = {}): Promise<TestCa> {
  const keys = (await webcrypto.subtle.generateKey(EC, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    name: `CN=${name}`,
    ...window(options),
    keys: keys as unknown as SelfSignedKeys,
    signingAlgorithm: EC,
    extensions: options.isCa === false ? [] : caExtensions(),
  });
  return { certificate: new X509Certificate(Buffer.from(certificate.rawData)), subject: certificate.subject, privateKey: keys.privateKey };
}

/** An intermediate CA under `parent`, able to issue EK certificates itself. */
export async function makeIntermediateCa(parent: TestCa, name: string): Promise<TestCa> {
  const keys = (await webcrypto.subtle.generateKey(EC, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: '0b',
    subject: `CN=${name}`,
    issuer: parent.subject,
    ...window({}),
    publicKey: keys.publicKey as unknown as x509.PublicKeyType,
    signingKey: parent.privateKey as unknown as SigningKey,
    signingAlgorithm: EC,
    extensions: caExtensions(),
  });
  return { certificate: new X509Certificate(Buffer.from(certificate.rawData)), subject: certificate.subject, privateKey: keys.privateKey };
}

export interface IssueOptions {
  readonly notBefore?: Date;
  readonly notAfter?: Date;
  /** A CA certificate (CA:TRUE, keyCertSign) instead of an end entity (CA:FALSE, keyEncipherment). */
  readonly isCa?: boolean;
  /** Extended key usages; default the TCG EK certificate purpose; null: no such extension. */
  readonly eku?: readonly string[] | null;
  /** A P-256 key instead of RSA 2048. */
  readonly ecKey?: boolean;
}

export interface IssuedCertificate {
  readonly der: Buffer;
  /** The certified key's private half, in software. */
  readonly privateKey: KeyObject;
}

export async function issueCertificate(ca: TestCa, options: IssueOptions = {}): Promise<IssuedCertificate> {
  const pair = options.ecKey ? generateKeyPairSync('ec', { namedCurve: 'P-256' }) : generateKeyPairSync('rsa', { modulusLength: 2048 });
  const publicKey = await webcrypto.subtle.importKey('spki', pair.publicKey.export({ type: 'spki', format: 'der' }), options.ecKey ? EC : RSA_SIGNATURE, true, ['verify']);
  const extensions: x509.Extension[] = options.isCa
    ? caExtensions()
    : [new x509.BasicConstraintsExtension(false, undefined, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyEncipherment, true)];
  if (options.eku !== null) extensions.push(new x509.ExtendedKeyUsageExtension([...(options.eku ?? [EK_CERTIFICATE_EKU])]));
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: '0a',
    subject: 'CN=unknown',
    issuer: ca.subject,
    ...window(options),
    publicKey: publicKey as unknown as x509.PublicKeyType,
    signingKey: ca.privateKey as unknown as SigningKey,
    signingAlgorithm: EC,
    extensions,
  });
  return { der: Buffer.from(certificate.rawData), privateKey: pair.privateKey };
}

/** A self-signed RSA certificate for the EK purpose: its own issuer. */
export async function selfSignedEkCertificate(): Promise<Buffer> {
  const pair = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '0c',
    name: 'CN=self-signed EK',
    ...window({}),
    keys: {
      publicKey: await webcrypto.subtle.importKey('spki', pair.publicKey.export({ type: 'spki', format: 'der' }), RSA_SIGNATURE, true, ['verify']),
      privateKey: await webcrypto.subtle.importKey('pkcs8', pair.privateKey.export({ type: 'pkcs8', format: 'der' }), RSA_SIGNATURE, true, ['sign']),
    } as unknown as SelfSignedKeys,
    signingAlgorithm: RSA_SIGNATURE,
    extensions: [new x509.ExtendedKeyUsageExtension([EK_CERTIFICATE_EKU])],
  });
  return Buffer.from(certificate.rawData);
}
