import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { closeSync, fchmodSync, openSync, writeFileSync } from 'node:fs';
import { base64Field, evidenceRequestDocument, parseEccPublic, parseEvidenceRequest, verifyStatic } from '../../../registry/attestation.js';
import { insertChallenge } from '../../../registry/attestation-store.js';
import { spkiFingerprint } from '../../../registry/ecdsa.js';
import { CHALLENGE_FORMAT, CHALLENGE_VALID_SECONDS, PROOF_FORMAT, challengeIdOf, ekCaCertificates, readAttestationDocument, readJsonFile, requireAttestationPolicy, sidecarKeyLabels } from '../attestation.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID, readPins, type PinSources } from '../environment.js';
import { RefusedError, UsageError } from '../errors.js';
import { checkKeyLabel } from '../principal-token.js';
import { checkOid, readSubjectKey, type SubjectKeyOptions } from '../subject-key.js';

/**
 * Enrolment split across machines, for a TPM the registry side cannot reach:
 *   where the TPM is:     attest collect   → evidence.json (public data)
 *   registry side:        attest challenge → challenge.json (a credential only that TPM can open)
 *   where the TPM is:     attest activate  → proof.json (the secret; keep it private)
 *   registry side:        enrol-agent-key --proof proof.json
 * The secret exists only inside the credential and the proof; the registry keeps its SHA-256, and
 * each challenge is answered once, within CHALLENGE_VALID_SECONDS.
 */

function writeOutput(path: string, document: Record<string, unknown>, secret: boolean): void {
  try {
    // The mode given to open applies only to a new file: an existing one is chmod'ed before the
    // secret goes in, so a proof never lands in a file others can read.
    const fd = openSync(path, 'w', secret ? 0o600 : 0o644);
    try {
      if (secret) fchmodSync(fd, 0o600);
      writeFileSync(fd, `${JSON.stringify(document, null, 2)}\n`);
    } finally {
      closeSync(fd);
    }
  } catch (error) {
    throw new UsageError(`cannot write ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
}

async function attestor(context: CommandContext, stateDir: string, key?: { tokenLabel: string; keyLabel: string; userPin: string }) {
  process.env.TSS2_LOG ??= 'all+NONE';
  const { TpmAttestor } = await import('../../../tpm/attestation.js');
  return new TpmAttestor({ env: context.env, stateDir, ...(key ? { key } : {}) });
}

export interface CollectOptions extends PinSources {
  readonly out: string;
  readonly stateDir: string;
  readonly tokenLabel?: string;
  readonly keyLabel?: string;
}

/** Where the TPM is: the EK certificate, a new AK, and the AK's certification of the sidecar's key. */
export async function attestCollect(context: CommandContext, options: CollectOptions): Promise<CommandResult> {
  const { tokenLabel, keyLabel } = sidecarKeyLabels(context.env, options);
  checkKeyLabel(keyLabel);
  const pins = readPins(context.env, options);
  const tpm = await attestor(context, options.stateDir, { tokenLabel, keyLabel, userPin: pins.userPin });
  const evidence = await tpm.collect();
  writeOutput(options.out, evidenceRequestDocument(evidence), false);
  return {
    data: { out: options.out, state_dir: options.stateDir, token: tokenLabel, key_label: keyLabel },
    human: [`evidence for key "${keyLabel}" in token "${tokenLabel}" written to ${options.out}; give it to the registry side (attest challenge), keep ${options.stateDir} for attest activate`],
  };
}

export interface ChallengeOptions extends SubjectKeyOptions {
  readonly evidence: string;
  readonly out: string;
  readonly ekCa?: string;
  readonly oid?: string;
}

/** Registry side: verifies the evidence and makes a single-use credential for the EK and AK in it. */
export async function attestChallenge(context: CommandContext, options: ChallengeOptions): Promise<CommandResult> {
  const cas = ekCaCertificates(context.env, options);
  requireAttestationPolicy(cas, {}, 'a challenge');
  const evidence = parseEvidenceRequest(readAttestationDocument('--evidence', options.evidence));
  const spkiDer = parseEccPublic(evidence.keyPublic, 'enrolled key public area').spkiDer;
  const expected = options.cert || options.publicKey || options.spki ? readSubjectKey(options, checkOid(options.oid ?? DEFAULT_IDENTITY_OID)) : undefined;
  if (expected && !expected.spkiDer.equals(spkiDer)) {
    throw new RefusedError('ERR_REFUSED_ATTESTATION_KEY_MISMATCH', `the evidence is for key ${spkiFingerprint(spkiDer)}, not the key given (${expected.fingerprint})`);
  }
  const { ekPublicKey, ak, verified } = verifyStatic(evidence, { caCertificates: cas!, enrolledSpkiDer: spkiDer, now: new Date() });
  const secret = randomBytes(32);
  const { makeCredential } = await import('../../../tpm/attestation.js');
  const credential = await makeCredential(ekPublicKey.export({ type: 'spki', format: 'pem' }).toString(), ak.name, secret, context.env);
  const challengeId = `chal-${randomUUID()}`;
  // The row and the file go together: a challenge whose file could not be written is not stored.
  return withRegistry(registryTarget(context), (db) => transaction(db, async () => {
    await insertChallenge(db, {
      challengeId,
      spkiDer,
      evidence: { ...evidenceRequestDocument(evidence), credential: credential.toString('base64') },
      secretSha256: createHash('sha256').update(secret).digest(),
      validForSeconds: CHALLENGE_VALID_SECONDS,
    });
    writeOutput(options.out, { format: CHALLENGE_FORMAT, challenge_id: challengeId, credential: credential.toString('base64') }, false);
    return {
      data: { challenge_id: challengeId, out: options.out, fingerprint: spkiFingerprint(spkiDer), ek_fingerprint: verified.ekFingerprint, valid_seconds: CHALLENGE_VALID_SECONDS },
      human: [`challenge ${challengeId} for key ${spkiFingerprint(spkiDer)} (EK ${verified.ekFingerprint.slice(0, 16)}…) written to ${options.out}; answer it within ${CHALLENGE_VALID_SECONDS} s with attest activate where the TPM is`],
    };
  }));
}

export interface ActivateOptions {
  readonly challenge: string;
  readonly stateDir: string;
  readonly out: string;
}

/** Where the TPM is: opens the credential with the AK from `attest collect`; the proof is the secret. */
export async function attestActivate(context: CommandContext, options: ActivateOptions): Promise<CommandResult> {
  const challenge = readJsonFile('--challenge', options.challenge, CHALLENGE_FORMAT);
  const challengeId = challengeIdOf(challenge, 'the challenge');
  const credential = base64Field(challenge, 'credential', 'the challenge');
  const tpm = await attestor(context, options.stateDir);
  const secret = await tpm.activate(credential);
  writeOutput(options.out, { format: PROOF_FORMAT, challenge_id: challengeId, activation_proof: secret.toString('base64') }, true);
  return {
    data: { challenge_id: challengeId, out: options.out },
    human: [`proof for ${challengeId} written to ${options.out} (private): the registry side runs enrol-agent-key --proof ${options.out}`],
  };
}

