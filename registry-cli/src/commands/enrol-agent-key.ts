import { spkiFingerprint } from '../../../registry/ecdsa.js';
import { describeAttestation, upsertKeyAttestation, attestationSummary } from '../../../registry/attestation-store.js';
import { attestTokenKey, ekCaCertificates, requireAttestationPolicy, type AttestationOptions } from '../attestation.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID, readPins, type PinSources } from '../environment.js';
import { RefusedError } from '../errors.js';
import { checkKeyLabel } from '../principal-token.js';
import { checkOid, readSubjectKey, type SubjectKeyOptions } from '../subject-key.js';

/** The sidecar's defaults and variables (sidecar/src/config.ts): the key it presents is the one to enrol. */
export const SIDECAR_TOKEN_VARIABLE = 'AGENT_GATEWAY_SIDECAR_TPM_TOKEN';
export const SIDECAR_KEY_VARIABLE = 'AGENT_GATEWAY_SIDECAR_TPM_KEY';
export const DEFAULT_SIDECAR_TOKEN = 'agent-gateway-sidecar';
export const DEFAULT_SIDECAR_KEY = 'agent-tls';

export interface EnrolAgentKeyOptions extends PinSources, SubjectKeyOptions, Pick<AttestationOptions, 'ekCa'> {
  readonly tokenLabel?: string;
  readonly keyLabel?: string;
  readonly oid?: string;
}

/**
 * Proves that the agent's TLS key lives in its TPM and records the evidence under the key's SPKI,
 * so grant-permission accepts it. Runs where the agent's TPM is reachable (its TCTI and
 * tpm2-pkcs11 store in the environment). With --cert (or --spki / --public-key) the key in the
 * token must be exactly that key.
 */
export async function enrolAgentKey(context: CommandContext, options: EnrolAgentKeyOptions): Promise<CommandResult> {
  const tokenLabel = options.tokenLabel ?? (context.env[SIDECAR_TOKEN_VARIABLE] || DEFAULT_SIDECAR_TOKEN);
  const keyLabel = options.keyLabel ?? (context.env[SIDECAR_KEY_VARIABLE] || DEFAULT_SIDECAR_KEY);
  checkKeyLabel(keyLabel);
  const expected = options.cert || options.publicKey || options.spki ? readSubjectKey(options, checkOid(options.oid ?? DEFAULT_IDENTITY_OID)) : undefined;
  const cas = ekCaCertificates(context.env, options);
  requireAttestationPolicy(cas, {}, `enrolling agent key "${keyLabel}"`);
  const pins = readPins(context.env, options);
  context.output.secret(pins.userPin);
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
