import { createPublicKey } from 'node:crypto';
import { SIGNATURE_ALGORITHM, spkiFingerprint } from '../../../registry/ecdsa.js';
import { describeAttestation, findKeyAttestations, upsertKeyAttestation, attestationSummary } from '../../../registry/attestation-store.js';
import { findPrincipalKey, insertPrincipalKeyIfAbsent, registryNow, type PrincipalKeyRow } from '../../../registry/store.js';
import { attestTokenKey, ekCaCertificates, requireAttestationPolicy, type AttestationOptions, type TokenKeyAttestation } from '../attestation.js';
import { checkTextField, checkValidityWindow, timestampOption } from '../arguments.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { transaction, withRegistry } from '../database.js';
import { readPins, tokenLabel } from '../environment.js';
import { RefusedError } from '../errors.js';
import { checkKeyLabel, openPrincipalToken, type TokenOptions } from '../principal-token.js';

export interface RegisterPrincipalOptions extends TokenOptions, AttestationOptions {
  readonly notBefore?: string;
  readonly notAfter?: string;
}

function describeWindow(row: PrincipalKeyRow): string {
  return `${row.state}, valid from ${row.notBefore}${row.notAfter ? ` until ${row.notAfter}` : ', no expiry'}${row.revokedAt ? `, revoked at ${row.revokedAt}` : ''}`;
}

/**
 * Creates (or finds) the principal's non-exportable P-256 key inside the TPM token, labelled with
 * the key id, and records only its public key. Idempotent for the same key; refuses a key id that
 * the registry already binds to another public key, without creating anything in the TPM.
 */
export async function registerPrincipal(context: CommandContext, keyId: string, options: RegisterPrincipalOptions): Promise<CommandResult> {
  checkTextField('KEY_ID', keyId);
  checkKeyLabel(keyId);
  const notBefore = timestampOption('--not-before', options.notBefore);
  const notAfter = timestampOption('--not-after', options.notAfter);
  const token = tokenLabel(context.env, options.token);
  const cas = ekCaCertificates(context.env, options);
  requireAttestationPolicy(cas, options, `principal key ${keyId}`);
  return withRegistry(registryTarget(context), async (db) => {
    const now = await registryNow(db);
    checkValidityWindow({ notBefore: notBefore ?? now, notAfter }, now, 'principal key');
    const existing = await findPrincipalKey(db, keyId);
    const tpm = await openPrincipalToken(context, options, { create: true });
    try {
      const found = tpm.findKeyOrUndefined(keyId);
      if (existing && !found) {
        throw new RefusedError('ERR_REFUSED_PRINCIPAL_KEY_MISMATCH', `principal ${keyId} is already registered with public key ${spkiFingerprint(existing.publicKeySpkiDer)}, but TPM token "${token}" holds no key labelled ${keyId}: register this TPM's key under another KEY_ID`);
      }
      const key = found ?? tpm.generateP256Key(keyId);
      if (existing && !existing.publicKeySpkiDer.equals(key.publicKeySpkiDer)) {
        throw new RefusedError('ERR_REFUSED_PRINCIPAL_KEY_MISMATCH', `principal ${keyId} is already registered with public key ${spkiFingerprint(existing.publicKeySpkiDer)}, not with this TPM's key ${spkiFingerprint(key.publicKeySpkiDer)}: register it under another KEY_ID`);
      }
      // Attestation runs before anything is written: refused evidence leaves the registry as it was.
      let attestation: TokenKeyAttestation | undefined;
      if (cas) attestation = await attestTokenKey(context.env, { tokenLabel: token, keyLabel: keyId, userPin: readPins(context.env, options).userPin, spkiDer: key.publicKeySpkiDer }, cas);
      const { inserted, row } = await transaction(db, async () => {
        const inserted = existing ? false : await insertPrincipalKeyIfAbsent(db, { keyId, publicKeySpkiDer: key.publicKeySpkiDer, ...(notBefore ? { notBefore } : {}), ...(notAfter ? { notAfter } : {}) });
        const row = inserted ? await findPrincipalKey(db, keyId) : (existing ?? (await findPrincipalKey(db, keyId)));
        if (!row) throw new Error(`principal ${keyId} vanished while registering it`);
        if (!row.publicKeySpkiDer.equals(key.publicKeySpkiDer)) {
          throw new RefusedError('ERR_REFUSED_PRINCIPAL_KEY_MISMATCH', `principal ${keyId} is already registered with public key ${spkiFingerprint(row.publicKeySpkiDer)}, not with this TPM's key ${spkiFingerprint(key.publicKeySpkiDer)}: register it under another KEY_ID`);
        }
        if (!inserted && (row.state === 'revoked' || row.state === 'expired')) {
          throw new RefusedError('ERR_REFUSED_PRINCIPAL_INACTIVE', `principal ${keyId} is registered with this TPM key but ${describeWindow(row)}; a revoked or expired key stays so: register a new KEY_ID`);
        }
        if (attestation) await upsertKeyAttestation(db, key.publicKeySpkiDer, attestation.evidence, attestation.verified);
        return { inserted, row };
      });
      const attested = (await findKeyAttestations(db, [key.publicKeySpkiDer])).get(key.publicKeySpkiDer.toString('hex'));
      if (!attested) context.output.warn(`principal ${keyId} is registered without TPM attestation (--allow-unattested)`);
      if (row.state === 'not-yet-valid') context.output.warn(`principal ${keyId} is not valid before ${row.notBefore}`);
      const fingerprint = spkiFingerprint(key.publicKeySpkiDer);
      const publicKeyPem = createPublicKey({ key: key.publicKeySpkiDer, format: 'der', type: 'spki' }).export({ format: 'pem', type: 'spki' }).toString();
      return {
        data: {
          key_id: keyId,
          token,
          algorithm: SIGNATURE_ALGORITHM,
          tpm_key_created: !found,
          registered: inserted,
          state: row.state,
          not_before: row.notBefore,
          not_after: row.notAfter,
          revoked_at: row.revokedAt,
          fingerprint,
          public_key_spki_der: key.publicKeySpkiDer,
          public_key_pem: publicKeyPem,
          attestation: attestationSummary(attested),
          ...(attestation ? { attestation_ms: attestation.elapsedMs } : {}),
        },
        human: [
          `principal ${keyId}: ${found ? 'found the' : 'created a'} non-exportable P-256 key in TPM token "${token}"`,
          inserted
            ? `registered public key ${fingerprint} in principal_signing_keys (${describeWindow(row)})`
            : `already registered with the same public key ${fingerprint} (${describeWindow(row)}); ${attestation ? 'its attestation was verified again and stored' : 'nothing changed'}`,
          `attestation: ${describeAttestation(attested)}${attestation ? ` (${attestation.elapsedMs} ms)` : ''}`,
        ],
      };
    } finally {
      tpm.close();
    }
  });
}
