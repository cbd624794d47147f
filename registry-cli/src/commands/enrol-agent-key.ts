import type { X509Certificate } from 'node:crypto';
import { AttestationError, EVIDENCE_REQUEST_FORMAT, base64Field, evidenceDocument, parseEvidenceRequest, verifyAttestation } from '../../../registry/attestation.js';
import { attestationSummary, describeAttestation, lockChallenge, markChallengeUsed, upsertKeyAttestation } from '../../../registry/attestation-store.js';
import { spkiFingerprint } from '../../../registry/ecdsa.js';
import { PROOF_FORMAT, attestTokenKey, challengeIdOf, ekCaCertificates, readJsonFile, requireAttestationPolicy, sidecarKeyLabels, type AttestationOptions } from '../attestation.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID, readPins, type PinSources } from '../environment.js';
import { RefusedError } from '../errors.js';
import { checkKeyLabel } from '../principal-token.js';
import { checkOid, readSubjectKey, type SubjectKey, type SubjectKeyOptions } from '../subject-key.js';

export interface EnrolAgentKeyOptions extends PinSources, SubjectKeyOptions, Pick<AttestationOptions, 'ekCa'> {
  readonly tokenLabel?: string;
  readonly keyLabel?: string;
  readonly oid?: string;
  /** `--proof FILE` from `attest activate`: finish a split enrolment instead of reaching the TPM. */
  readonly proof?: string;
}

/**
 * Proves that the agent's TLS key lives in its TPM and records the evidence under the key's SPKI,
 * so grant-permission accepts it. Runs where the agent's TPM is reachable (its TCTI and
 * tpm2-pkcs11 store in the environment). With --cert (or --spki / --public-key) the key in the
 * token must be exactly that key. With --proof it only finishes an enrolment split across machines
 * (see commands/attest.ts) and needs no TPM.
 */
export async function enrolAgentKey(context: CommandContext, options: EnrolAgentKeyOptions): Promise<CommandResult> {
  const { tokenLabel, keyLabel } = sidecarKeyLabels(context.env, options);
  checkKeyLabel(keyLabel);
  const expected = options.cert || options.publicKey || options.spki ? readSubjectKey(options, checkOid(options.oid ?? DEFAULT_IDENTITY_OID)) : undefined;
  const cas = ekCaCertificates(context.env, options);
  requireAttestationPolicy(cas, {}, `enrolling agent key "${keyLabel}"`);
  if (options.proof !== undefined) return enrolWithProof(context, options.proof, cas!, expected);
  const pins = readPins(context.env, options);
  process.env.TSS2_LOG ??= 'all+NONE';
  process.env.TPM2_PKCS11_LOG_LEVEL ??= '0';
  const { openToken } = await import('../../../tpm/token.js');
  const token = openToken({ tokenLabel, userPin: pins.userPin });
  let spkiDer: Buffer;
  try {
    spkiDer = token.findKey(keyLabel).publicKeySpkiDer;
  } finally {
    token.close();
  }
  if (expected && !expected.spkiDer.equals(spkiDer)) {
    throw new RefusedError('ERR_REFUSED_ATTESTATION_KEY_MISMATCH', `key "${keyLabel}" in token "${tokenLabel}" is ${spkiFingerprint(spkiDer)}, not the key given (${expected.fingerprint}): enrol the key the sidecar presents`);
  }
  return withRegistry(registryTarget(context), async (db) => {
    const attestation = await attestTokenKey(context.env, { tokenLabel, keyLabel, userPin: pins.userPin, spkiDer }, cas!);
    const row = await upsertKeyAttestation(db, spkiDer, attestation.evidence, attestation.verified);
    const fingerprint = spkiFingerprint(spkiDer);
    return {
      data: {
        token: tokenLabel,
        key_label: keyLabel,
        fingerprint,
        public_key_spki_der: spkiDer,
        attestation: attestationSummary(row),
        verification: attestation.verified,
        attestation_ms: attestation.elapsedMs,
      },
      human: [
        `agent key "${keyLabel}" in token "${tokenLabel}": ${fingerprint}`,
        `attestation: ${describeAttestation(row)} (${attestation.elapsedMs} ms); key attributes ${attestation.verified.keyAttributes.join('|')}`,
      ],
    };
  });
}

/**
 * The registry side's last step of a split enrolment: the proof must open the challenge made for
 * this evidence, unused and unexpired; the evidence is verified again against the CAs given now.
 * The challenge is consumed in the same transaction that stores the attestation.
 */
async function enrolWithProof(context: CommandContext, proofPath: string, cas: readonly X509Certificate[], expected: SubjectKey | undefined): Promise<CommandResult> {
  const proof = readJsonFile('--proof', proofPath, PROOF_FORMAT);
  const challengeId = challengeIdOf(proof, 'the proof');
  const activationProof = base64Field(proof, 'activation_proof', 'the proof');
  return withRegistry(registryTarget(context), (db) => transaction(db, async () => {
    const challenge = await lockChallenge(db, challengeId);
    if (!challenge) throw new AttestationError('ERR_REFUSED_ATTESTATION_ACTIVATION', `no challenge ${challengeId} in the registry: make one with attest challenge`);
    if (challenge.usedAt) throw new AttestationError('ERR_REFUSED_ATTESTATION_ACTIVATION', `challenge ${challengeId} was answered already at ${challenge.usedAt}: a proof is good for one enrolment (replayed?)`);
    if (challenge.expired) throw new AttestationError('ERR_REFUSED_ATTESTATION_ACTIVATION', `challenge ${challengeId} has expired: make a new one with attest challenge`);
    const spkiDer = challenge.publicKeySpkiDer;
    if (expected && !expected.spkiDer.equals(spkiDer)) {
      throw new RefusedError('ERR_REFUSED_ATTESTATION_KEY_MISMATCH', `challenge ${challengeId} is for key ${spkiFingerprint(spkiDer)}, not the key given (${expected.fingerprint})`);
    }
    const evidence = parseEvidenceRequest(JSON.stringify({ ...challenge.evidence, format: EVIDENCE_REQUEST_FORMAT }));
    const credential = base64Field(challenge.evidence, 'credential', 'the stored challenge');
    const full = { ...evidence, credential, activationProof };
    const verified = verifyAttestation(full, { caCertificates: cas, enrolledSpkiDer: spkiDer, expectedSecretSha256: challenge.secretSha256, now: new Date() });
    await markChallengeUsed(db, challengeId);
    const row = await upsertKeyAttestation(db, spkiDer, evidenceDocument(full), verified);
    const fingerprint = spkiFingerprint(spkiDer);
    return {
      data: { challenge_id: challengeId, fingerprint, public_key_spki_der: spkiDer, attestation: attestationSummary(row), verification: verified },
      human: [`agent key ${fingerprint}: ${describeAttestation(row)} (challenge ${challengeId})`],
    };
  }));
}
