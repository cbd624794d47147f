import { webcrypto } from 'node:crypto';
import * as x509 from './x509.js';
import { encodeIdentityExtensionValue } from './identity.js';


export interface CarrierCertificateOptions {
  /** SubjectPublicKeyInfo DER of the key that will sign TLS handshakes (a TPM key in production). */
  readonly subjectSpkiDer: Uint8Array;
  readonly extensionOid: string;
  /** The identity to carry; encoded as a DER UTF8String. */
  readonly identity?: string;
  /** Exact extension value bytes instead of `identity` (for tests of malformed extensions). */
  readonly rawIdentityValue?: Uint8Array;
  readonly extraExtensions?: readonly x509.Extension[];
  readonly commonName?: string;
  readonly notBefore?: Date;
  readonly notAfter?: Date;
}

/**
 * Builds a carrier certificate: it carries the subject key and the identity extension to the
 * gateway, which checks neither issuer nor dates. It is signed by a throwaway software key because
 * the subject key may live in a TPM that cannot sign X.509 structures through our stack.
 * Returns PEM.
 */
export async function createCarrierCertificate(options: CarrierCertificateOptions): Promise<string> {
  const algorithm = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
  const issuerKeys = await webcrypto.subtle.generateKey(algorithm, false, ['sign', 'verify']);
  const extensions: x509.Extension[] = [...(options.extraExtensions ?? [])];
  const value = options.rawIdentityValue ?? (options.identity === undefined ? undefined : encodeIdentityExtensionValue(options.identity));
  if (value !== undefined) extensions.push(new x509.Extension(options.extensionOid, false, value));
  const subjectKey = await webcrypto.subtle.importKey('spki', Buffer.from(options.subjectSpkiDer), { name: 'ECDSA', namedCurve: 'P-256' }, true, ['verify']);
  const name = `CN=${options.commonName ?? options.identity ?? 'agent-gateway carrier'}`.replace(/[,+="<>#;\\]/g, '_');
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: Buffer.from(webcrypto.getRandomValues(new Uint8Array(16))).toString('hex').replace(/^[89a-f]/, '1'),
    subject: name,
    issuer: 'CN=agent-gateway carrier issuer',
    notBefore: options.notBefore ?? new Date(Date.now() - 60_000),
    notAfter: options.notAfter ?? new Date(Date.now() + 365 * 24 * 3600_000),
    publicKey: subjectKey as unknown as x509.PublicKeyType,
    signingKey: issuerKeys.privateKey as unknown as x509.X509CertificateCreateWithKeyParams["signingKey"],
    signingAlgorithm: algorithm,
    extensions,
  });
  return certificate.toString('pem');
}
