import { createHash, randomBytes, type X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { AGENT_KEY } from '../../core/agent-key.js';
import type pg from 'pg';
import { AttestationError, evidenceDocument, parseCaBundle, verifyAttestation, verifyStatic, type EvidenceDocument, type VerifiedAttestation } from '../../registry/attestation.js';
import { findKeyAttestations } from '../../registry/attestation-store.js';
import type { CommandContext } from './context.js';
import { readOptionFile } from './arguments.js';
import { EK_CA_VARIABLE } from './environment.js';
import { RefusedError, UsageError } from './errors.js';


export interface AttestationOptions {
  /** `--ek-ca FILE`: PEM bundle of the CAs trusted to issue EK certificates. */
  readonly ekCa?: string;
  /** `--allow-unattested`: enrol or grant a key nothing proves is TPM-resident. */
  readonly allowUnattested?: boolean;
}

/** The trusted EK CAs from --ek-ca or AGENT_GATEWAY_EK_CA_FILE; undefined when neither is set. */
export function ekCaCertificates(env: NodeJS.ProcessEnv, options: AttestationOptions): X509Certificate[] | undefined {
  const file = options.ekCa ?? (env[EK_CA_VARIABLE] || undefined);
  if (file === undefined) return undefined;
  let pem: string;
  try {
    pem = readFileSync(file, 'utf8');
  } catch (error) {
    throw new UsageError(`cannot read the EK CA bundle ${file}: ${(error as Error).message}`);
  }
  let certificates: X509Certificate[];
  try {
    certificates = parseCaBundle(pem);
  } catch (error) {
    throw new UsageError(`the EK CA bundle ${file} holds a certificate that does not parse: ${(error as Error).message}`);
  }
  if (certificates.length === 0) throw new UsageError(`the EK CA bundle ${file} holds no PEM certificate`);
  return certificates;
}

/** Refuses up front when attestation is required and no CA is configured to check it against. */
export function requireAttestationPolicy(cas: X509Certificate[] | undefined, options: AttestationOptions, what: string): void {
  if (cas === undefined && !options.allowUnattested) {
    throw new RefusedError('ERR_REFUSED_UNATTESTED', `${what} needs TPM attestation: pass --ek-ca FILE (or set ${EK_CA_VARIABLE}) to prove the key lives in a TPM, or --allow-unattested to enrol it without proof`);
  }
}

/**
 * What grant-permission and rotate-key both enforce (DESIGN §9e): a permission is signed for an
 * agent key only once its TPM attestation is recorded. An unattested key is refused, unless
 * --allow-unattested, which signs anyway and says so. `wording` names the key, the enrolment
 * command to run and what is being done, as each command tells it. Returns whether the key is attested.
 */
export async function requireAttestedAgentKey(
  db: Pick<pg.ClientBase, 'query'>,
  context: CommandContext,
  key: { readonly spkiDer: Buffer; readonly fingerprint: string },
  options: AttestationOptions,
  wording: { readonly key: string; readonly enrol: string; readonly doing: string },
): Promise<boolean> {
  const attestation = (await findKeyAttestations(db, [key.spkiDer])).get(key.spkiDer.toString('hex'));
  if (attestation?.verified) return true;
  if (!options.allowUnattested) {
    throw new RefusedError('ERR_REFUSED_UNATTESTED', `${wording.key} ${key.fingerprint} has no verified TPM attestation: enrol it first with \`${wording.enrol}\` on the machine that owns its TPM, or pass --allow-unattested. Nothing was written.`);
  }
  context.output.warn(`${wording.key} ${key.fingerprint} is not TPM-attested; ${wording.doing} anyway (--allow-unattested)`);
  return false;
}

export interface TokenKeyAttestation {
  readonly evidence: EvidenceDocument;
  readonly verified: VerifiedAttestation;
  readonly elapsedMs: number;
}

/**
 * Attests a key of a tpm2-pkcs11 token this process can reach: the TPM side (tpm/attestation.ts,
 * tpm2-tools) and the verifier (registry/attestation.ts, node:crypto) in one run. The challenge
 * secret is made here, used for this enrolment only and never stored, so a proof from an earlier
 * enrolment cannot pass.
 */
export async function attestTokenKey(env: NodeJS.ProcessEnv, key: { tokenLabel: string; keyLabel: string; userPin: string; spkiDer: Buffer }, caCertificates: readonly X509Certificate[]): Promise<TokenKeyAttestation> {
  const started = performance.now();
  const { TpmAttestor, makeCredential } = await import('../../tpm/attestation.js');
  const attestor = new TpmAttestor({ key, env });
  try {
    const collected = await attestor.collect();
    const options = { caCertificates, enrolledSpkiDer: key.spkiDer, now: new Date() };
    // The credential is bound to the EK key in the certificate and to the AK name computed here
    // from its public area, never to names the TPM side reports.
    const { ekPublicKey, ak } = verifyStatic(collected, options);
    const secret = randomBytes(32);
    const credential = await makeCredential(ekPublicKey.export({ type: 'spki', format: 'pem' }).toString(), ak.name, secret, env);
    let activationProof: Buffer;
    try {
      activationProof = await attestor.activate(credential);
    } catch (error) {
      throw new AttestationError('ERR_REFUSED_ATTESTATION_ACTIVATION', `the TPM could not activate the credential made for its EK certificate and AK (${(error as Error).message}): the AK is not in the TPM that holds this EK`, { cause: error });
    }
    const evidence = { ...collected, credential, activationProof };
    const verified = verifyAttestation(evidence, { ...options, expectedSecretSha256: createHash('sha256').update(secret).digest() });
    return { evidence: evidenceDocument(evidence), verified, elapsedMs: Math.round(performance.now() - started) };
  } finally {
    attestor.close();
  }
}

/** The key the sidecar presents: its labels from the options, else its variables, else its defaults. */
export function sidecarKeyLabels(env: NodeJS.ProcessEnv, options: { tokenLabel?: string; keyLabel?: string }): { tokenLabel: string; keyLabel: string } {
  return {
    tokenLabel: options.tokenLabel ?? (env[AGENT_KEY.tokenVariable] || AGENT_KEY.tokenLabel),
    keyLabel: options.keyLabel ?? (env[AGENT_KEY.keyVariable] || AGENT_KEY.keyLabel),
  };
}

export const CHALLENGE_FORMAT = 'agent-gateway-tpm-challenge-v1';
export const PROOF_FORMAT = 'agent-gateway-tpm-proof-v1';
export const CHALLENGE_VALID_SECONDS = 600;

/**
 * Evidence, challenge and proof files hold a few base64 fields of at most 8 KiB each: anything
 * larger is refused before it is read through (a hostile file may be huge, or a device).
 */
const MAX_DOCUMENT_BYTES = 64 * 1024;

/** The text of an evidence, challenge or proof file named by `option`. */
export function readAttestationDocument(option: string, path: string): string {
  const bytes = readOptionFile(option, path, MAX_DOCUMENT_BYTES + 1);
  if (bytes.length > MAX_DOCUMENT_BYTES) throw new AttestationError('ERR_REFUSED_ATTESTATION_MALFORMED', `${option} ${path} is larger than ${MAX_DOCUMENT_BYTES} bytes: not an attestation document`);
  return bytes.toString('utf8');
}

export function readJsonFile(option: string, path: string, format: string): Record<string, unknown> {
  const text = readAttestationDocument(option, path);
  let document: unknown;
  try {
    document = JSON.parse(text);
  } catch {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_MALFORMED', `${option} ${path} is not JSON`);
  }
  if (typeof document !== 'object' || document === null || Array.isArray(document) || (document as Record<string, unknown>).format !== format) {
    throw new AttestationError('ERR_REFUSED_ATTESTATION_MALFORMED', `${option} ${path} is not a ${format} document`);
  }
  return document as Record<string, unknown>;
}

export function challengeIdOf(document: Record<string, unknown>, what: string): string {
  const id = document.challenge_id;
  if (typeof id !== 'string' || !/^chal-[0-9a-f-]{36}$/.test(id)) throw new AttestationError('ERR_REFUSED_ATTESTATION_MALFORMED', `${what}: challenge_id is missing or malformed`);
  return id;
}

