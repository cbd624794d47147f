import { generateKeyPairSync, webcrypto, type KeyObject } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as x509 from '../../registry/x509.js';
import { createCarrierCertificate } from '../../registry/carrier-certificate.js';

export const TEST_OID = '1.3.6.1.4.1.57264.1.1';

export interface SoftwareKey {
  readonly privateKey: KeyObject;
  readonly privateKeyPem: string;
  readonly spkiDer: Buffer;
  readonly publicKeyPem: string;
}

export function newP256Key(): SoftwareKey {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return {
    privateKey,
    privateKeyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    spkiDer: publicKey.export({ type: 'spki', format: 'der' }),
    publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
  };
}

export interface ClientCredentials extends SoftwareKey {
  readonly certPem: string;
}

/** A client key with a carrier certificate holding `identity` (or raw extension bytes). */
export async function clientCredentials(options: { identity?: string; rawIdentityValue?: Uint8Array; extraExtensions?: x509.Extension[]; key?: SoftwareKey } = {}): Promise<ClientCredentials> {
  const key = options.key ?? newP256Key();
  const certPem = await createCarrierCertificate({
    subjectSpkiDer: key.spkiDer,
    extensionOid: TEST_OID,
    ...(options.identity !== undefined ? { identity: options.identity } : {}),
    ...(options.rawIdentityValue ? { rawIdentityValue: options.rawIdentityValue } : {}),
    ...(options.extraExtensions ? { extraExtensions: options.extraExtensions } : {}),
  });
  return { ...key, certPem };
}

export interface ServerTls {
  readonly dir: string;
  readonly caPem: string;
  readonly certPath: string;
  readonly keyPath: string;
  readonly caPath: string;
}

const EC = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };

/** A CA and a server certificate for localhost / 127.0.0.1 / ::1, written to a temp dir. */
export async function serverTls(names: string[] = ['localhost']): Promise<ServerTls> {
    const caKeys = await webcrypto.subtle.generateKey(EC, true, ['sign', 'verify']);
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    name: 'CN=agent-gateway test CA',
    notBefore: new Date(Date.now() - 3600_000),
    notAfter: new Date(Date.now() + 24 * 3600_000),
    keys: caKeys as unknown as CryptoKeyPairLike,
    signingAlgorithm: EC,
    extensions: [new x509.BasicConstraintsExtension(true, 0, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign, true)],
  });
  const serverKeys = await webcrypto.subtle.generateKey(EC, true, ['sign', 'verify']);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: '02',
    subject: `CN=${names[0]}`,
    issuer: ca.subject,
    notBefore: new Date(Date.now() - 3600_000),
    notAfter: new Date(Date.now() + 24 * 3600_000),
    publicKey: serverKeys.publicKey as unknown as x509.PublicKeyType,
    signingKey: caKeys.privateKey as unknown as x509.X509CertificateCreateWithKeyParams['signingKey'],
    signingAlgorithm: EC,
    extensions: [
      new x509.SubjectAlternativeNameExtension([
        ...names.map((value) => ({ type: 'dns' as const, value })),
        { type: 'ip', value: '127.0.0.1' },
        { type: 'ip', value: '::1' },
      ]),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
    ],
  });
  const pkcs8 = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', serverKeys.privateKey));
  const dir = mkdtempSync(join(tmpdir(), 'agw-tls-'));
  const caPem = ca.toString('pem');
  const caPath = join(dir, 'ca.pem');
  const certPath = join(dir, 'server.pem');
  const keyPath = join(dir, 'server-key.pem');
  writeFileSync(caPath, caPem);
  writeFileSync(certPath, `${cert.toString('pem')}\n${caPem}`);
  writeFileSync(keyPath, `-----BEGIN PRIVATE KEY-----\n${pkcs8.toString('base64').replace(/(.{64})/g, '$1\n')}\n-----END PRIVATE KEY-----\n`, { mode: 0o600 });
  return { dir, caPem, certPath, keyPath, caPath };
}

type CryptoKeyPairLike = Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[0]['keys'];
