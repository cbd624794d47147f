import { X509Certificate, createHash, createPublicKey, timingSafeEqual, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { AgentGatewayError, type ErrorCode } from '../core/errors.js';
import { p256SpkiFromPoint } from './ecdsa.js';

/**
 * Verification of TPM attestation evidence for an enrolled key (DESIGN §9e), in plain node:crypto
 * with no I/O: every byte of the evidence came from the enrolling machine and is treated as hostile.
 *
 * What a verified result proves, link by link:
 * - the EK certificate was issued by a configured CA, so its public key is a real TPM's EK;
 * - the credential made for that EK public key and the AK's name was activated (the proof equals
 *   the secret made for this enrolment), so the AK sits in the TPM holding that EK;
 * - the AK is restricted, signing, fixedTPM and fixedParent, so it signs only TPM-made structures
 *   and cannot leave that TPM;
 * - its signature over TPMS_ATTEST of type CERTIFY names the enrolled key's public area, whose
 *   point is exactly the enrolled SPKI and whose attributes say fixedTPM, fixedParent and
 *   sensitiveDataOrigin: the key was generated inside that TPM and cannot leave it.
 */

export const EVIDENCE_FORMAT = 'agent-gateway-tpm-attestation-v1';

/** The refusal codes a verification can end with (each catalogued in core/errors.ts). */
export type AttestationRefusal = Extract<ErrorCode, `ERR_REFUSED_ATTESTATION_${string}`>;

export class AttestationError extends AgentGatewayError {
  declare readonly code: AttestationRefusal;
  constructor(code: AttestationRefusal, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** The evidence before activation: what the TPM side sends first. */
export type StaticEvidence = Omit<AttestationEvidence, 'credential' | 'activationProof'>;

/** The binary parts of the evidence, as the TPM produced them. */
export interface AttestationEvidence {
  /** DER of the EK certificate read from NV index 0x01c00002 (RSA 2048 EK). */
  readonly ekCertificate: Buffer;
  /** TPM2B_PUBLIC of the attestation key. */
  readonly akPublic: Buffer;
  /** TPM2B_PUBLIC of the enrolled key. */
  readonly keyPublic: Buffer;
  /** TPMS_ATTEST of TPM2_Certify(enrolled key) signed by the AK. */
  readonly certifyInfo: Buffer;
  /** TPMT_SIGNATURE over certifyInfo by the AK. */
  readonly certifySignature: Buffer;
  /** The credential the verifier made (tpm2_makecredential output), kept for the record. */
  readonly credential: Buffer;
  /** What TPM2_ActivateCredential returned for that credential. */
  readonly activationProof: Buffer;
}

export interface VerifyOptions {
  /** Trusted EK issuers (the configured CA bundle). */
  readonly caCertificates: readonly X509Certificate[];
  /** The SPKI DER being enrolled: the certified key must be exactly this key. */
  readonly enrolledSpkiDer: Buffer;
  /** SHA-256 of the secret made for this enrolment (never reused): the activation proof must hash to it. */
  readonly expectedSecretSha256: Buffer;
  readonly now: Date;
}

export interface VerifiedAttestation {
  /** SHA-256 of the EK certificate DER, lowercase hex. */
  readonly ekFingerprint: string;
  readonly ekIssuer: string;
  readonly ekSerial: string;
  /** SHA-256 of the issuing CA certificate DER, lowercase hex. */
  readonly caFingerprint: string;
  /** TPM name of the AK (nameAlg ‖ digest), lowercase hex. */
  readonly akName: string;
  /** TPM name of the enrolled key, lowercase hex. */
  readonly keyName: string;
  readonly keyAttributes: readonly string[];
}

// TPM 2.0 constants (TCG TPM 2.0 Part 2).
const TPM_ALG_ECC = 0x0023;
const TPM_ALG_SHA256 = 0x000b;
const TPM_ALG_NULL = 0x0010;
const TPM_ALG_ECDSA = 0x0018;
const TPM_ECC_NIST_P256 = 0x0003;
const TPM_GENERATED_VALUE = 0xff544347;
const TPM_ST_ATTEST_CERTIFY = 0x8017;
/** Extended key usage of a TCG EK certificate. */
const TCG_KP_EK_CERTIFICATE = '2.23.133.8.1';

export const TPMA = {
  fixedTPM: 0x00000002,
  stClear: 0x00000004,
  fixedParent: 0x00000010,
  sensitiveDataOrigin: 0x00000020,
  userWithAuth: 0x00000040,
  adminWithPolicy: 0x00000080,
  noDA: 0x00000400,
  encryptedDuplication: 0x00000800,
  restricted: 0x00010000,
  decrypt: 0x00020000,
  sign: 0x00040000,
} as const;

export function attributeNames(attributes: number): string[] {
  return Object.entries(TPMA).filter(([, bit]) => (attributes & bit) !== 0).map(([name]) => name);
}

/** A bounds-checked reader over TPM marshalled big-endian structures. */
class Reader {
  #offset = 0;
  readonly buffer: Buffer;
  readonly what: string;
  constructor(buffer: Buffer, what: string) {
    this.buffer = buffer;
    this.what = what;
  }
  #need(bytes: number): void {
    if (this.#offset + bytes > this.buffer.length) throw malformed(`${this.what} is truncated`);
  }
  u16(): number {
    this.#need(2);
    const value = this.buffer.readUInt16BE(this.#offset);
    this.#offset += 2;
    return value;
  }
  u32(): number {
    this.#need(4);
    const value = this.buffer.readUInt32BE(this.#offset);
    this.#offset += 4;
    return value;
  }
  bytes(length: number): Buffer {
    this.#need(length);
    const value = this.buffer.subarray(this.#offset, this.#offset + length);
    this.#offset += length;
    return value;
  }
  /** A TPM2B: 16-bit size, then that many bytes. */
  sized(): Buffer {
    return this.bytes(this.u16());
  }
  end(): void {
    if (this.#offset !== this.buffer.length) throw malformed(`${this.what} has ${this.buffer.length - this.#offset} trailing bytes`);
  }
}

function malformed(message: string): AttestationError {
  return new AttestationError('ERR_REFUSED_ATTESTATION_MALFORMED', message);
}

export interface EccPublicArea {
  /** The TPMT_PUBLIC bytes the name is computed over. */
  readonly area: Buffer;
  readonly nameAlg: number;
  readonly attributes: number;
  readonly authPolicy: Buffer;
  readonly scheme: number;
  readonly schemeHash: number;
  readonly x: Buffer;
  readonly y: Buffer;
  /** nameAlg ‖ SHA-256(TPMT_PUBLIC). */
  readonly name: Buffer;
  readonly spkiDer: Buffer;
}

/** Parses a TPM2B_PUBLIC holding an ECC NIST P-256 key with SHA-256 as its name algorithm. */
export function parseEccPublic(tpm2bPublic: Buffer, what: string): EccPublicArea {
  const outer = new Reader(tpm2bPublic, what);
  const area = outer.sized();
  outer.end();
  const reader = new Reader(area, what);
  const type = reader.u16();
  if (type !== TPM_ALG_ECC) throw malformed(`${what} is not an ECC key (type 0x${type.toString(16)}); only ECC NIST P-256 is accepted`);
  const nameAlg = reader.u16();
  if (nameAlg !== TPM_ALG_SHA256) throw malformed(`${what} name algorithm is 0x${nameAlg.toString(16)}, not SHA-256`);
  const attributes = reader.u32();
  const authPolicy = reader.sized();
  // Only a signing key's parameters are read: no symmetric algorithm, no scheme or ECDSA, no KDF.
  // Other schemes marshal differently (ECDAA adds a count), and a parser that skipped them
  // generically would read some other field as the curve or the point.
  const symmetric = reader.u16();
  if (symmetric !== TPM_ALG_NULL) throw malformed(`${what} has a symmetric algorithm (0x${symmetric.toString(16)}): not a signing key`);
  const scheme = reader.u16();
  if (scheme !== TPM_ALG_NULL && scheme !== TPM_ALG_ECDSA) throw malformed(`${what} has scheme 0x${scheme.toString(16)}; only none or ECDSA is accepted`);
  const schemeHash = scheme === TPM_ALG_NULL ? TPM_ALG_NULL : reader.u16();
  const curve = reader.u16();
  if (curve !== TPM_ECC_NIST_P256) throw malformed(`${what} is not on NIST P-256 (curve 0x${curve.toString(16)})`);
  const kdf = reader.u16();
  if (kdf !== TPM_ALG_NULL) throw malformed(`${what} has a KDF (0x${kdf.toString(16)}): not a signing key`);
  const x = reader.sized();
  const y = reader.sized();
  reader.end();
  if (x.length !== 32 || y.length !== 32) throw malformed(`${what} point coordinates are not 32 bytes each`);
  let spkiDer: Buffer;
  try {
    spkiDer = p256SpkiFromPoint(Buffer.concat([Buffer.from([0x04]), x, y]));
  } catch {
    throw malformed(`${what} point is not on P-256`);
  }
  const name = Buffer.concat([Buffer.from([0x00, 0x0b]), createHash('sha256').update(area).digest()]);
  return { area, nameAlg, attributes, authPolicy, scheme, schemeHash, x, y, name, spkiDer };
}

export interface CertifyInfo {
  readonly qualifiedSigner: Buffer;
  readonly extraData: Buffer;
  readonly certifiedName: Buffer;
  readonly certifiedQualifiedName: Buffer;
}

/** Parses TPMS_ATTEST, refusing anything but a TPM-generated CERTIFY structure. */
export function parseCertifyInfo(attest: Buffer): CertifyInfo {
  const reader = new Reader(attest, 'certify info (TPMS_ATTEST)');
  const magic = reader.u32();
  if (magic !== TPM_GENERATED_VALUE) throw malformed(`certify info does not start with TPM_GENERATED_VALUE (0x${magic.toString(16)})`);
  const type = reader.u16();
  if (type !== TPM_ST_ATTEST_CERTIFY) throw malformed(`certify info is of type 0x${type.toString(16)}, not TPM_ST_ATTEST_CERTIFY`);
  const qualifiedSigner = reader.sized();
  const extraData = reader.sized();
  reader.bytes(17); // clockInfo: clock, resetCount, restartCount, safe
  reader.bytes(8); // firmwareVersion
  const certifiedName = reader.sized();
  const certifiedQualifiedName = reader.sized();
  reader.end();
  return { qualifiedSigner, extraData, certifiedName, certifiedQualifiedName };
}

/** Parses an ECDSA TPMT_SIGNATURE into IEEE P1363 r‖s (32 bytes each). */
export function parseEcdsaSignature(signature: Buffer): { hash: number; p1363: Buffer } {
  const reader = new Reader(signature, 'certify signature (TPMT_SIGNATURE)');
  const algorithm = reader.u16();
  if (algorithm !== TPM_ALG_ECDSA) throw malformed(`certify signature algorithm is 0x${algorithm.toString(16)}, not ECDSA`);
  const hash = reader.u16();
  const r = reader.sized();
  const s = reader.sized();
  reader.end();
  if (r.length > 32 || s.length > 32) throw malformed('certify signature r or s is longer than 32 bytes');
  const pad = (value: Buffer) => Buffer.concat([Buffer.alloc(32 - value.length), value]);
  return { hash, p1363: Buffer.concat([pad(r), pad(s)]) };
}

function sha256Hex(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

function parseCertificate(der: Buffer): X509Certificate {
  try {
    return new X509Certificate(der);
  } catch {
    throw malformed('the EK certificate is not a DER X.509 certificate');
  }
}

function within(certificate: X509Certificate, now: Date): boolean {
  return new Date(certificate.validFrom).getTime() <= now.getTime() && now.getTime() <= new Date(certificate.validTo).getTime();
}

/** The EK certificate must be issued (and signed) by one of the configured CA certificates, valid now, and an EK certificate. */
export function verifyEkCertificate(ekDer: Buffer, caCertificates: readonly X509Certificate[], now: Date): { ek: X509Certificate; ca: X509Certificate; ekPublicKey: KeyObject } {
  const ek = parseCertificate(ekDer);
  if (!ek.raw.equals(ekDer)) throw malformed('the EK certificate has trailing bytes');
  const ca = caCertificates.find((candidate) => candidate.ca && ek.checkIssued(candidate) && ek.verify(candidate.publicKey));
  if (!ca) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_EK_UNTRUSTED', `the EK certificate (issuer "${ek.issuer.replace(/\n/g, ', ')}", SHA-256 ${sha256Hex(ekDer)}) is not signed by any configured EK CA`);
  }
  if (!within(ek, now) || !within(ca, now)) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_EK_UNTRUSTED', `the EK certificate (valid ${ek.validFrom} .. ${ek.validTo}) or its CA (valid ${ca.validFrom} .. ${ca.validTo}) is not valid now`);
  }
  // The credential is encrypted to this certificate's key: whoever holds the private key of any
  // other RSA certificate the CA signed (an intermediate, a TLS certificate) could open it in
  // software. A TCG EK certificate is an end entity, and an extended key usage, when present, names
  // the EK certificate purpose (TCG EK Credential Profile); `keyUsage` is Node's name for that list.
  const purposes = ek.keyUsage;
  if (ek.ca || (purposes !== undefined && !purposes.includes(TCG_KP_EK_CERTIFICATE))) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_EK_UNTRUSTED', `the certificate presented as the EK's (subject "${ek.subject.replace(/\n/g, ', ')}", SHA-256 ${sha256Hex(ekDer)}) is not an EK certificate: ${ek.ca ? 'it is a CA certificate' : `its extended key usage is ${purposes!.join(', ') || 'empty'}, without ${TCG_KP_EK_CERTIFICATE} (tcg-kp-EKCertificate)`}`);
  }
  const ekPublicKey = ek.publicKey;
  if (ekPublicKey.asymmetricKeyType !== 'rsa') throw malformed('the EK certificate does not hold an RSA key (the RSA 2048 EK at NV index 0x01c00002 is expected)');
  return { ek, ca, ekPublicKey };
}

const AK_REQUIRED = ['restricted', 'sign', 'fixedTPM', 'fixedParent'] as const;
const KEY_REQUIRED = ['sign', 'fixedTPM', 'fixedParent', 'sensitiveDataOrigin'] as const;

function missing(attributes: number, required: readonly (keyof typeof TPMA)[]): string[] {
  return required.filter((name) => (attributes & TPMA[name]) === 0);
}

/**
 * The checks that need no activation: EK chain, AK attributes, the certify signature and what it
 * certifies. Returns the AK's name and the EK's public key, which the verifier then makes the
 * credential for.
 */
export function verifyStatic(evidence: StaticEvidence, options: Omit<VerifyOptions, 'expectedSecretSha256'>): { verified: VerifiedAttestation; ekPublicKey: KeyObject; ak: EccPublicArea } {
  const { ek, ca, ekPublicKey } = verifyEkCertificate(evidence.ekCertificate, options.caCertificates, options.now);
  const ak = parseEccPublic(evidence.akPublic, 'AK public area');
  const akMissing = missing(ak.attributes, AK_REQUIRED);
  if (akMissing.length > 0 || (ak.attributes & TPMA.decrypt) !== 0) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_AK_ATTRIBUTES', `the attestation key is not a restricted signing key bound to its TPM: attributes ${attributeNames(ak.attributes).join('|') || 'none'}${akMissing.length > 0 ? `, missing ${akMissing.join(', ')}` : ', decrypt set'}`);
  }
  if (ak.scheme !== TPM_ALG_ECDSA || ak.schemeHash !== TPM_ALG_SHA256) throw malformed('the AK is not an ECDSA-SHA256 signing key');
  const signature = parseEcdsaSignature(evidence.certifySignature);
  if (signature.hash !== TPM_ALG_SHA256) throw malformed('the certify signature does not use SHA-256');
  const akKey = createPublicKey({ key: ak.spkiDer, format: 'der', type: 'spki' });
  if (!cryptoVerify('sha256', evidence.certifyInfo, { key: akKey, dsaEncoding: 'ieee-p1363' }, signature.p1363)) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_SIGNATURE', 'the certify signature does not verify under the attestation key');
  }
  const info = parseCertifyInfo(evidence.certifyInfo);
  const key = parseEccPublic(evidence.keyPublic, 'enrolled key public area');
  if (!info.certifiedName.equals(key.name)) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_KEY_MISMATCH', `the attestation certifies TPM object ${info.certifiedName.toString('hex')}, not the presented key ${key.name.toString('hex')}`);
  }
  if (!key.spkiDer.equals(options.enrolledSpkiDer)) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_KEY_MISMATCH', `the certified TPM key is ${sha256Hex(key.spkiDer)} (SPKI SHA-256), not the key being enrolled ${sha256Hex(options.enrolledSpkiDer)}`);
  }
  const keyMissing = missing(key.attributes, KEY_REQUIRED);
  if (keyMissing.length > 0) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_KEY_ATTRIBUTES', `the enrolled key can leave its TPM or was not generated inside it: attributes ${attributeNames(key.attributes).join('|') || 'none'}, missing ${keyMissing.join(', ')}`);
  }
  return {
    ekPublicKey,
    ak,
    verified: {
      ekFingerprint: sha256Hex(ek.raw),
      ekIssuer: ek.issuer.replace(/\n/g, ', '),
      ekSerial: ek.serialNumber.toLowerCase(),
      caFingerprint: sha256Hex(ca.raw),
      akName: ak.name.toString('hex'),
      keyName: key.name.toString('hex'),
      keyAttributes: attributeNames(key.attributes),
    },
  };
}

/** Every check, activation included. Throws AttestationError naming the first link that fails. */
export function verifyAttestation(evidence: AttestationEvidence, options: VerifyOptions): VerifiedAttestation {
  const { verified } = verifyStatic(evidence, options);
  const proofHash = createHash('sha256').update(evidence.activationProof).digest();
  if (evidence.activationProof.length === 0 || options.expectedSecretSha256.length !== proofHash.length || !timingSafeEqual(proofHash, options.expectedSecretSha256)) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_ACTIVATION', 'the activation proof is not the secret made for this enrolment: the AK is not in the TPM holding this EK, or the proof was replayed');
  }
  return verified;
}

/** Evidence as stored and exchanged: JSON with base64 fields (the secret itself is never stored). */
export interface EvidenceDocument {
  readonly format: typeof EVIDENCE_FORMAT;
  readonly ek_certificate: string;
  readonly ak_public: string;
  readonly key_public: string;
  readonly certify_info: string;
  readonly certify_signature: string;
  readonly credential: string;
  readonly activation_proof_sha256: string;
}

export function evidenceDocument(evidence: AttestationEvidence): EvidenceDocument {
  return {
    format: EVIDENCE_FORMAT,
    ek_certificate: evidence.ekCertificate.toString('base64'),
    ak_public: evidence.akPublic.toString('base64'),
    key_public: evidence.keyPublic.toString('base64'),
    certify_info: evidence.certifyInfo.toString('base64'),
    certify_signature: evidence.certifySignature.toString('base64'),
    credential: evidence.credential.toString('base64'),
    activation_proof_sha256: sha256Hex(evidence.activationProof),
  };
}

/** The first message of a split enrolment: the TPM side's evidence, before any challenge. */
export const EVIDENCE_REQUEST_FORMAT = 'agent-gateway-tpm-evidence-v1';

export function evidenceRequestDocument(evidence: StaticEvidence): Record<string, string> {
  return {
    format: EVIDENCE_REQUEST_FORMAT,
    ek_certificate: evidence.ekCertificate.toString('base64'),
    ak_public: evidence.akPublic.toString('base64'),
    key_public: evidence.keyPublic.toString('base64'),
    certify_info: evidence.certifyInfo.toString('base64'),
    certify_signature: evidence.certifySignature.toString('base64'),
  };
}

const MAX_FIELD_BYTES = 8192;

/** Decodes one base64 field of a hostile JSON document: present, canonical base64, bounded. */
export function base64Field(document: Record<string, unknown>, name: string, what: string): Buffer {
  const value = document[name];
  if (typeof value !== 'string' || value.length === 0 || value.length > (MAX_FIELD_BYTES * 4) / 3 + 4 || !/^[A-Za-z0-9+/]+={0,2}$/.test(value)) {
    throw malformed(`${what}: field ${name} is missing or not base64 of at most ${MAX_FIELD_BYTES} bytes`);
  }
  const bytes = Buffer.from(value, 'base64');
  if (bytes.toString('base64') !== value) throw malformed(`${what}: field ${name} is not canonical base64`);
  return bytes;
}

/** Parses the evidence a TPM side sent (EVIDENCE_REQUEST_FORMAT), refusing anything else. */
export function parseEvidenceRequest(text: string): StaticEvidence {
  let document: unknown;
  try {
    document = JSON.parse(text);
  } catch {
    throw malformed('the evidence is not JSON');
  }
  if (typeof document !== 'object' || document === null || Array.isArray(document) || (document as Record<string, unknown>).format !== EVIDENCE_REQUEST_FORMAT) {
    throw malformed(`the evidence is not a ${EVIDENCE_REQUEST_FORMAT} document`);
  }
  const fields = document as Record<string, unknown>;
  return {
    ekCertificate: base64Field(fields, 'ek_certificate', 'evidence'),
    akPublic: base64Field(fields, 'ak_public', 'evidence'),
    keyPublic: base64Field(fields, 'key_public', 'evidence'),
    certifyInfo: base64Field(fields, 'certify_info', 'evidence'),
    certifySignature: base64Field(fields, 'certify_signature', 'evidence'),
  };
}

/** Reads a PEM bundle of CA certificates; throws on anything that is not one. */
export function parseCaBundle(pem: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  return blocks.map((block) => new X509Certificate(block));
}
