/**
 * Throwaway PKI for bench/compare.ts: one CA that issues the client certificates, so the same
 * certificate and key are presented to both proxies. nghttpx (--verify-client) needs a chain to
 * the CA it is given; our gateway checks no issuer and reads the identity extension, which every
 * client certificate here carries. The server side reuses test/helpers/pki.ts serverTls() (one
 * certificate and key for both proxies, so both handshakes sign with the same P-256 key type).
 */
import { webcrypto } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as x509 from '../registry/x509.js';
import { encodeIdentityExtensionValue } from '../registry/identity.js';
import { newP256Key, TEST_OID, type SoftwareKey } from '../test/helpers/pki.js';

const EC = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };

type Keys = Parameters<typeof x509.X509CertificateGenerator.createSelfSigned>[0]['keys'];
type SigningKey = x509.X509CertificateCreateWithKeyParams['signingKey'];

export interface BenchClient extends SoftwareKey {
  readonly identity: string;
  readonly certPem: string;
}

export interface BenchClientCa {
  readonly caPath: string;
  issue(identity: string): Promise<BenchClient>;
}

/** A client CA written to `dir/client-ca.pem`; `issue` makes a P-256 client certificate with the identity extension. */
export async function clientCa(dir: string): Promise<BenchClientCa> {
  const caKeys = await webcrypto.subtle.generateKey(EC, true, ['sign', 'verify']);
  const ca = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    name: 'CN=agent-gateway bench client CA',
    notBefore: new Date(Date.now() - 3600_000),
    notAfter: new Date(Date.now() + 24 * 3600_000),
    keys: caKeys as unknown as Keys,
    signingAlgorithm: EC,
    extensions: [new x509.BasicConstraintsExtension(true, 0, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign, true)],
  });
  const caPath = join(dir, 'client-ca.pem');
  writeFileSync(caPath, ca.toString('pem'));
  let serial = 1;
  return {
    caPath,
    async issue(identity: string): Promise<BenchClient> {
      const key = newP256Key();
      const publicKey = await webcrypto.subtle.importKey('spki', key.spkiDer, { name: 'ECDSA', namedCurve: 'P-256' }, true, ['verify']);
      const cert = await x509.X509CertificateGenerator.create({
        serialNumber: (++serial).toString(16).padStart(2, '0'),
        subject: `CN=${identity}`,
        issuer: ca.subject,
        notBefore: new Date(Date.now() - 3600_000),
        notAfter: new Date(Date.now() + 24 * 3600_000),
        publicKey: publicKey as unknown as x509.PublicKeyType,
        signingKey: caKeys.privateKey as unknown as SigningKey,
        signingAlgorithm: EC,
        extensions: [
          new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
          new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth]),
          new x509.Extension(TEST_OID, false, encodeIdentityExtensionValue(identity)),
        ],
      });
      return { ...key, identity, certPem: cert.toString('pem') };
    },
  };
}
