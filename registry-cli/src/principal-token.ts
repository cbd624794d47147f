import type { TpmToken } from '../../tpm/token.js';
import type { CommandContext } from './context.js';
import { readPins, tokenLabel, type PinSources } from './environment.js';
import { UsageError } from './errors.js';

/** PKCS#11 labels (and so principal key ids that name TPM keys) are at most 32 bytes. */
export const MAX_KEY_LABEL_BYTES = 32;

export interface TokenOptions extends PinSources {
  /** `--token LABEL`; default AGENT_GATEWAY_TPM_TOKEN, else agent-gateway-principal. */
  readonly token?: string;
}

export function checkKeyLabel(keyId: string): void {
  if (Buffer.byteLength(keyId, 'utf8') > MAX_KEY_LABEL_BYTES) {
    throw new UsageError(`KEY_ID names the key inside the TPM token, whose labels are at most ${MAX_KEY_LABEL_BYTES} bytes; ${JSON.stringify(keyId)} is longer`);
  }
}

/**
 * Opens the principal's tpm2-pkcs11 token and logs in. The TPM is found through TPM2_PKCS11_TCTI
 * and the token metadata through TPM2_PKCS11_STORE, both read by tpm2-pkcs11 itself. PINs come from
 * the environment or PIN files and are never put into a message.
 */
export async function openPrincipalToken(context: CommandContext, options: TokenOptions, { create }: { create: boolean }): Promise<TpmToken> {
  const pins = readPins(context.env, options);
  const label = tokenLabel(context.env, options.token);
  // The TSS and tpm2-pkcs11 print warnings on fd 2 by default; an operator's explicit setting wins.
  process.env.TSS2_LOG ??= 'all+NONE';
  process.env.TPM2_PKCS11_LOG_LEVEL ??= '0';
  // Loaded on demand: the native PKCS#11 binding is not needed by commands that never touch the TPM.
  const { openToken } = await import('../../tpm/token.js');
  return openToken({
    tokenLabel: label,
    userPin: pins.userPin,
    // Without an SO PIN a missing token cannot be created; openToken then says exactly that.
    ...(create ? { createIfMissing: true, ...(pins.soPin !== undefined ? { soPin: pins.soPin } : {}) } : {}),
  });
}
