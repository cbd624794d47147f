import { X509Certificate } from 'node:crypto';
import * as asn1js from 'asn1js';
import { InvalidIdentityError } from './errors.js';
import { hasControlCharacter } from './permission.js';

export const MAX_IDENTITY_BYTES = 255;
const UTF8_STRING_TAG = 0x0c;
const DOTTED_OID = /^[0-2](?:\.(?:0|[1-9][0-9]*))+$/;

/** What the gateway learns from a client's leaf certificate, once per TLS session. */
export type PeerIdentity =
  | { readonly ok: true; readonly identity: string; readonly spkiDer: Buffer }
  | { readonly ok: false; readonly reason: string; readonly spkiDer?: Buffer };

export function isDottedOid(oid: string): boolean {
  if (!DOTTED_OID.test(oid)) return false;
  const [first, second] = oid.split('.').map(Number);
  return first === 2 || (second !== undefined && second < 40);
}

/**
 * Decodes an identity extension value: exactly one DER UTF8String of 1–255 bytes of valid
 * UTF-8 without control characters, and nothing after it.
 */
export function decodeIdentityExtensionValue(value: Uint8Array): string {
  const bytes = Buffer.from(value);
  if (bytes.length < 2) throw new InvalidIdentityError('identity extension is empty');
  if (bytes[0] !== UTF8_STRING_TAG) throw new InvalidIdentityError('identity extension is not a UTF8String');
  let length = bytes[1] ?? 0;
  let header = 2;
  if (length === 0x81) {
    length = bytes[2] ?? 0;
    header = 3;
    if (length < 0x80) throw new InvalidIdentityError('identity extension length is not minimal DER');
  } else if (length > 0x81) {
    throw new InvalidIdentityError(`identity is longer than ${MAX_IDENTITY_BYTES} bytes`);
  } else if (length === 0x80) {
    throw new InvalidIdentityError('identity extension uses an indefinite length');
  }
  if (length === 0) throw new InvalidIdentityError('identity is empty');
  if (bytes.length < header + length) throw new InvalidIdentityError('identity extension is truncated');
  if (bytes.length > header + length) throw new InvalidIdentityError('identity extension has trailing bytes');
  let identity: string;
  try {
    identity = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes.subarray(header));
  } catch {
    throw new InvalidIdentityError('identity is not valid UTF-8');
  }
  if (hasControlCharacter(identity)) throw new InvalidIdentityError('identity contains a control character');
  return identity;
}

/** DER encoding of an identity as the extension value (for carrier certificates and tests). */
export function encodeIdentityExtensionValue(identity: string): Buffer {
  const body = Buffer.from(identity, 'utf8');
  if (body.length === 0 || body.length > MAX_IDENTITY_BYTES) {
    throw new InvalidIdentityError(`identity must be 1-${MAX_IDENTITY_BYTES} bytes of UTF-8`);
  }
  if (hasControlCharacter(identity)) throw new InvalidIdentityError('identity contains a control character');
  const length = body.length < 0x80 ? Buffer.from([body.length]) : Buffer.from([0x81, body.length]);
  return Buffer.concat([Buffer.from([UTF8_STRING_TAG]), length, body]);
}

/** The TBSCertificate's fields of a DER certificate, as asn1js decodes them. */
function tbsFields(certificateDer: Uint8Array): asn1js.AsnType[] {
  const parsed = asn1js.fromBER(Buffer.from(certificateDer));
  const certificate = parsed.result;
  if (parsed.offset === -1 || parsed.offset !== certificateDer.length || !(certificate instanceof asn1js.Sequence)) {
    throw new InvalidIdentityError('certificate is not DER');
  }
  const tbs = certificate.valueBlock.value[0];
  if (!(tbs instanceof asn1js.Sequence)) throw new InvalidIdentityError('certificate has no TBSCertificate');
  return tbs.valueBlock.value;
}

/** The exact SubjectPublicKeyInfo bytes of a certificate, as they appear in its DER. */
export function exactSpkiDer(certificateDer: Uint8Array): Buffer {
  return spkiOf(tbsFields(certificateDer));
}

function spkiOf(fields: asn1js.AsnType[]): Buffer {
  // version [0] is optional; then serial, signature, issuer, validity, subject, subjectPublicKeyInfo.
  const first = fields[0];
  const hasVersion = first !== undefined && first.idBlock.tagClass === 3 && first.idBlock.tagNumber === 0;
  const spki = fields[(hasVersion ? 1 : 0) + 5];
  if (!(spki instanceof asn1js.Sequence)) throw new InvalidIdentityError('certificate has no SubjectPublicKeyInfo');
  return Buffer.from(spki.valueBeforeDecodeView);
}

/** One certificate extension: RFC 5280's Extension ::= SEQUENCE { extnID, critical DEFAULT FALSE, extnValue }. */
interface CertificateExtension {
  readonly oid: string;
  readonly critical: boolean;
  readonly value: Uint8Array;
}

/** The extensions of a TBSCertificate (its [3] EXPLICIT field), each checked for RFC 5280's shape. */
function extensionsOf(fields: asn1js.AsnType[]): CertificateExtension[] {
  const wrapper = fields.find((field) => field.idBlock.tagClass === 3 && field.idBlock.tagNumber === 3);
  if (!wrapper) return [];
  const list = (wrapper as asn1js.Constructed).valueBlock?.value;
  if (!Array.isArray(list) || list.length !== 1 || !(list[0] instanceof asn1js.Sequence)) throw new InvalidIdentityError('certificate extensions are malformed');
  return list[0].valueBlock.value.map((extension) => {
    if (!(extension instanceof asn1js.Sequence)) throw new InvalidIdentityError('a certificate extension is not a SEQUENCE');
    const parts = extension.valueBlock.value;
    const [id, second, third] = parts;
    const withCritical = parts.length === 3;
    const flag = withCritical ? second : undefined;
    const value = withCritical ? third : second;
    if (!(id instanceof asn1js.ObjectIdentifier) || (parts.length !== 2 && parts.length !== 3) || (flag !== undefined && !(flag instanceof asn1js.Boolean)) || !(value instanceof asn1js.OctetString) || value.idBlock.isConstructed) {
      throw new InvalidIdentityError('a certificate extension is malformed');
    }
    return { oid: id.valueBlock.toString(), critical: flag instanceof asn1js.Boolean && flag.getValue(), value: value.valueBlock.valueHexView };
  });
}

/** A carrier certificate is a few hundred bytes; anything near these bounds is not one. */
export const MAX_CERTIFICATE_BYTES = 16 * 1024;
export const MAX_CERTIFICATE_EXTENSIONS = 64;

/** One DER tag-length header: where the value starts and how long it is, or undefined. */
function derHeader(der: Uint8Array, at: number): { tag: number; start: number; end: number } | undefined {
  if (at + 2 > der.length) return undefined;
  const tag = der[at]!;
  if ((tag & 0x1f) === 0x1f) return undefined; // high tag numbers never occur in a certificate
  let length = der[at + 1]!;
  let start = at + 2;
  if (length & 0x80) {
    const octets = length & 0x7f;
    if (octets === 0 || octets > 3 || start + octets > der.length) return undefined;
    length = 0;
    for (let i = 0; i < octets; i++) length = length * 256 + der[start + i]!;
    start += octets;
  }
  const end = start + length;
  return end <= der.length ? { tag, start, end } : undefined;
}

/**
 * How many extensions a certificate declares, from its DER headers alone (no allocation, no
 * parse): the cost of a hostile certificate is bounded before any parser sees it (DESIGN §9a).
 * Undefined when the headers do not have a certificate's shape.
 */
export function countCertificateExtensions(der: Uint8Array): number | undefined {
  const certificate = derHeader(der, 0);
  if (!certificate || certificate.tag !== 0x30 || certificate.end !== der.length) return undefined;
  const tbs = derHeader(der, certificate.start);
  if (!tbs || tbs.tag !== 0x30) return undefined;
  for (let at = tbs.start; at < tbs.end; ) {
    const field = derHeader(der, at);
    if (!field || field.end > tbs.end) return undefined;
    if (field.tag === 0xa3) {
      const list = derHeader(der, field.start);
      if (!list || list.tag !== 0x30 || list.end !== field.end) return undefined;
      let count = 0;
      for (let inner = list.start; inner < list.end; count++) {
        const extension = derHeader(der, inner);
        if (!extension || extension.end > list.end) return undefined;
        inner = extension.end;
      }
      return count;
    }
    at = field.end;
  }
  return 0;
}

/**
 * Reads the identity and exact SPKI from a leaf certificate. Never throws: a certificate the
 * gateway cannot use yields `{ ok: false, reason }`, and every CONNECT on that session gets 403.
 * Size and extension count are checked before anything parses it.
 */
export function readPeerIdentity(certificateDer: Uint8Array | undefined, extensionOid: string): PeerIdentity {
  if (!certificateDer || certificateDer.length === 0) return { ok: false, reason: 'no client certificate' };
  if (certificateDer.length > MAX_CERTIFICATE_BYTES) return { ok: false, reason: `client certificate is ${certificateDer.length} bytes (at most ${MAX_CERTIFICATE_BYTES})` };
  const declared = countCertificateExtensions(certificateDer);
  if (declared === undefined) return { ok: false, reason: 'client certificate is not DER' };
  if (declared > MAX_CERTIFICATE_EXTENSIONS) return { ok: false, reason: `client certificate has ${declared} extensions (at most ${MAX_CERTIFICATE_EXTENSIONS})` };
  let spkiDer: Buffer;
  let extensions: CertificateExtension[];
  try {
    const fields = tbsFields(certificateDer);
    spkiDer = spkiOf(fields);
    extensions = extensionsOf(fields);
    // OpenSSL must accept the whole certificate too: what asn1js walked above is only its frame.
    new X509Certificate(Buffer.from(certificateDer));
  } catch (error) {
    return { ok: false, reason: `client certificate does not parse: ${(error as Error).message}` };
  }
  const matches = extensions.filter((extension) => extension.oid === extensionOid);
  if (matches.length === 0) return { ok: false, reason: `no identity extension ${extensionOid}`, spkiDer };
  if (matches.length > 1) return { ok: false, reason: `identity extension ${extensionOid} appears ${matches.length} times`, spkiDer };
  // DESIGN §3: the identity is a non-critical extension.
  if (matches[0]!.critical) return { ok: false, reason: `identity extension ${extensionOid} is marked critical`, spkiDer };
  try {
    const identity = decodeIdentityExtensionValue(new Uint8Array(matches[0]!.value));
    return { ok: true, identity, spkiDer };
  } catch (error) {
    return { ok: false, reason: (error as Error).message, spkiDer };
  }
}
