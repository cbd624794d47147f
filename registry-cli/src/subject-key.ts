import { p256PublicKeyFromSpki, spkiFingerprint } from '../../registry/ecdsa.js';
import { exactSpkiDer, isDottedOid, MAX_IDENTITY_BYTES, readPeerIdentity } from '../../registry/identity.js';
import { X509Certificate } from '../../registry/x509.js';
import { checkTextField, readOptionFile } from './arguments.js';
import { DEFAULT_IDENTITY_OID } from './environment.js';
import { UsageError } from './errors.js';

/** The subject (agent) key a permission names, from a certificate, a public key file or hex. */

export interface SubjectKeyOptions {
  readonly cert?: string;
  readonly publicKey?: string;
  readonly spki?: string;
}

/** What the certificate's identity extension says, read exactly as the gateway reads it. */
export type CertificateIdentity =
  | { readonly status: 'valid'; readonly identity: string }
  | { readonly status: 'absent' }
  | { readonly status: 'invalid'; readonly reason: string };

export interface SubjectKey {
  readonly spkiDer: Buffer;
  readonly fingerprint: string;
  readonly source: 'certificate' | 'public-key' | 'spki';
  /** Only for `--cert`. */
  readonly certificate?: CertificateIdentity;
}

/** An identity no certificate could carry, or one that would make the signed text ambiguous, is refused. */
export function checkIdentity(identity: string): string {
  return checkTextField('identity', identity, MAX_IDENTITY_BYTES);
}

export function checkOid(oid: string): string {
  if (!isDottedOid(oid)) throw new UsageError(`--oid must be a dotted OID such as ${DEFAULT_IDENTITY_OID}, not ${JSON.stringify(oid)}`);
  return oid;
}

/** The DER inside the first PEM block with this label, or the input itself when it is not PEM. */
function pemOrDer(option: string, path: string, label: string): Buffer {
  const bytes = readOptionFile(option, path);
  const text = bytes.toString('latin1');
  if (!text.includes('-----BEGIN')) return bytes;
  const match = new RegExp(`-----BEGIN ${label}-----([A-Za-z0-9+/=\\s]+)-----END ${label}-----`).exec(text);
  if (!match) throw new UsageError(`${option} ${path} holds no "${label}" PEM block`);
  return Buffer.from(match[1]!.replace(/\s+/g, ''), 'base64');
}

function certificateIdentity(der: Buffer, oid: string): CertificateIdentity {
  let present: number;
  try {
    present = new X509Certificate(der).extensions.filter((extension) => extension.type === oid).length;
  } catch {
    present = -1; // readPeerIdentity below says why it does not parse
  }
  if (present === 0) return { status: 'absent' };
  const peer = readPeerIdentity(der, oid);
  return peer.ok ? { status: 'valid', identity: peer.identity } : { status: 'invalid', reason: peer.reason };
}

function p256(option: string, spkiDer: Buffer): Buffer {
  try {
    p256PublicKeyFromSpki(spkiDer);
  } catch (error) {
    throw new UsageError(`${option}: ${(error as Error).message} (agent keys are ECDSA P-256)`, { cause: error });
  }
  return spkiDer;
}

/**
 * Reads the subject key from exactly one of `--cert`, `--public-key`, `--spki` (or none, when
 * `optional`). With `--cert` the SPKI is the exact bytes in the certificate, as the gateway takes them.
 */
export function readSubjectKey(options: SubjectKeyOptions, oid: string, { optional = false } = {}): SubjectKey | undefined {
  const given = (['cert', 'publicKey', 'spki'] as const).filter((name) => options[name] !== undefined);
  if (given.length > 1) throw new UsageError('give only one of --cert, --public-key and --spki');
  if (given.length === 0) {
    if (optional) return undefined;
    throw new UsageError('the subject key is required: --cert PEM_FILE, --public-key PEM_FILE or --spki HEX');
  }
  if (options.cert !== undefined) {
    const der = pemOrDer('--cert', options.cert, 'CERTIFICATE');
    let spkiDer: Buffer;
    try {
      spkiDer = exactSpkiDer(der);
    } catch (error) {
      throw new UsageError(`--cert ${options.cert}: ${(error as Error).message}`, { cause: error });
    }
    return { spkiDer: p256('--cert', spkiDer), fingerprint: spkiFingerprint(spkiDer), source: 'certificate', certificate: certificateIdentity(der, oid) };
  }
  if (options.publicKey !== undefined) {
    const spkiDer = p256('--public-key', pemOrDer('--public-key', options.publicKey, 'PUBLIC KEY'));
    return { spkiDer, fingerprint: spkiFingerprint(spkiDer), source: 'public-key' };
  }
  const hex = options.spki!.replace(/[\s:]/g, '');
  if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new UsageError('--spki must be the hex of the SubjectPublicKeyInfo DER');
  const spkiDer = p256('--spki', Buffer.from(hex, 'hex'));
  return { spkiDer, fingerprint: spkiFingerprint(spkiDer), source: 'spki' };
}
