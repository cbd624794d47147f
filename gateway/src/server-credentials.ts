import { constants as cryptoConstants, createPrivateKey, X509Certificate } from 'node:crypto';
import { closeSync, constants as fsConstants, fstatSync, openSync, readFileSync } from 'node:fs';
import { createSecureContext, type SecureContextOptions } from 'node:tls';
import { ConfigError } from '../../registry/errors.js';

/**
 * The server's TLS certificate chain and key, read and checked together so a reload can refuse a
 * bad pair before it replaces a good one.
 */

/**
 * The TLS 1.3 suites in the gateway's order, which it enforces (honorCipherOrder): a Node client,
 * the sidecar included, offers AES-256-GCM first. On this project's machines (AES-NI)
 * AES-128-GCM encrypts 6% faster than AES-256-GCM (`openssl speed`: 4.44 against 4.18 GB/s at
 * 16 KiB) and ChaCha20-Poly1305 15% slower; a whole Node TLS stream moved about 4% more with
 * AES-128-GCM. It is also what nghttpx picks.
 */
export const TLS13_SUITES = Object.freeze(['TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256']);

/**
 * TLS 1.2, for clients other than the sidecar (which speaks 1.3): forward-secret key exchange
 * and AEAD only, in the same order (Mozilla's "intermediate" profile without DHE). Node's default
 * list would also take CBC suites, which carry no benefit here and a history of padding oracles.
 */
export const TLS12_CIPHERS = Object.freeze([
  'ECDHE-ECDSA-AES128-GCM-SHA256',
  'ECDHE-RSA-AES128-GCM-SHA256',
  'ECDHE-ECDSA-AES256-GCM-SHA384',
  'ECDHE-RSA-AES256-GCM-SHA384',
  'ECDHE-ECDSA-CHACHA20-POLY1305',
  'ECDHE-RSA-CHACHA20-POLY1305',
]);

/**
 * Secure-context options besides cert and key. One constant for start-up and reload alike:
 * tls.Server#setSecureContext resets every option it is not given.
 *
 * No session resumption: every session must prove possession of the client's key, which lives
 * in a TPM. A resumed session proves only the resumption secret, which sits in the client's
 * memory, and each resumed session could be handed a fresh ticket. SSL_OP_NO_TICKET stops
 * stateless tickets; the tickets OpenSSL still sends under it are stateful, and Node keeps no
 * session cache (no 'resumeSession' listener), so they name nothing that can be resumed.
 */
export const TLS_CONTEXT_OPTIONS: SecureContextOptions = Object.freeze({
  minVersion: 'TLSv1.2',
  ciphers: [...TLS13_SUITES, ...TLS12_CIPHERS].join(':'),
  honorCipherOrder: true,
  secureOptions: cryptoConstants.SSL_OP_NO_TICKET,
});

export interface ServerCredentials {
  readonly cert: Buffer;
  readonly key: Buffer;
  /** SHA-256 of the leaf certificate's DER, colon-separated hex (what `openssl x509 -fingerprint -sha256` prints). */
  readonly fingerprint: string;
  readonly subject: string;
  readonly notAfter: Date;
}

/**
 * A regular file's bytes. Reads are synchronous (start-up and SIGHUP), so a FIFO or a device
 * would block the whole gateway, tunnels and probes included, or read without end: opened
 * without blocking and refused unless fstat says it is a regular file.
 */
function read(path: string, field: string): Buffer {
  let fd: number;
  try {
    fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ConfigError(`${field}: cannot read ${path} (${code === 'ENOENT' ? 'no such file' : code ?? (error as Error).message})`);
  }
  try {
    if (!fstatSync(fd).isFile()) throw new ConfigError(`${field}: ${path} is not a regular file`);
    return readFileSync(fd);
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    const code = (error as NodeJS.ErrnoException).code;
    throw new ConfigError(`${field}: cannot read ${path} (${code ?? (error as Error).message})`);
  } finally {
    closeSync(fd);
  }
}

/**
 * Reads and checks the pair: the first PEM certificate parses, the key parses and is the
 * certificate's key, and Node builds a secure context from them. Throws ConfigError naming the
 * field and the reason; never returns a pair that would fail handshakes.
 */
export function loadServerCredentials(certPath: string, keyPath: string): ServerCredentials {
  const cert = read(certPath, 'server.tls_cert_path');
  const key = read(keyPath, 'server.tls_key_path');
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(cert);
  } catch (error) {
    throw new ConfigError(`server.tls_cert_path: ${certPath} is not a PEM certificate (${(error as Error).message})`);
  }
  let privateKey;
  try {
    privateKey = createPrivateKey(key);
  } catch (error) {
    throw new ConfigError(`server.tls_key_path: ${keyPath} is not a PEM private key (${(error as Error).message})`);
  }
  if (!leaf.checkPrivateKey(privateKey)) {
    throw new ConfigError(`server.tls_key_path: ${keyPath} is not the key of the certificate in ${certPath}`);
  }
  try {
    createSecureContext({ ...TLS_CONTEXT_OPTIONS, cert, key });
  } catch (error) {
    throw new ConfigError(`server.tls_cert_path: Node cannot use ${certPath} with ${keyPath} (${(error as Error).message})`);
  }
  return { cert, key, fingerprint: leaf.fingerprint256, subject: leaf.subject.replaceAll('\n', ', '), notAfter: new Date(leaf.validTo) };
}
