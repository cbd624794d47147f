import { AgentGatewayError, type ErrorCode } from '../core/errors.js';

/**
 * Stable codes for TPM/PKCS#11 failures: `ERR_TPM` and every `ERR_TPM_*` code of the product's
 * catalogue (core/errors.ts, which holds their exit codes and hints). Callers (the registry CLI,
 * the sidecar) branch on these, never on messages or on raw CKR_* numbers, so the PKCS#11 module
 * can change underneath.
 */
export type TpmErrorCode = Extract<ErrorCode, 'ERR_TPM' | `ERR_TPM_${string}`>;

export interface TpmErrorDetails {
  /** The PKCS#11 return value name, e.g. `CKR_PIN_INCORRECT`, when the failure came from the module. */
  readonly returnValue?: string;
  /** The PKCS#11 function that failed, e.g. `C_Login`. */
  readonly operation?: string;
  readonly cause?: unknown;
}

/**
 * Any failure of the TPM layer. Messages name the token, key label and PKCS#11 call but never a
 * PIN: the layer does not put PINs into strings at all, so there is nothing to redact.
 */
export class TpmError extends AgentGatewayError {
  declare readonly code: TpmErrorCode;
  readonly returnValue: string | undefined;
  readonly operation: string | undefined;

  constructor(code: TpmErrorCode, message: string, details: TpmErrorDetails = {}) {
    super(code, message, details.cause === undefined ? undefined : { cause: details.cause });
    this.returnValue = details.returnValue;
    this.operation = details.operation;
  }
}

/** The shape pkcs11js gives its errors: `message` is the CKR_* name, `method` the C_* function. */
interface Pkcs11LikeError {
  readonly message: string;
  readonly method?: string;
}

function isPkcs11LikeError(error: unknown): error is Pkcs11LikeError {
  return error instanceof Error && /^CKR_[A-Z0-9_]+$/.test(error.message);
}

/** The CKR_* name of a pkcs11js error, or undefined for anything else. */
export function pkcs11ReturnValue(error: unknown): string | undefined {
  return isPkcs11LikeError(error) ? error.message : undefined;
}

const CODE_BY_RETURN_VALUE: Readonly<Record<string, TpmErrorCode>> = {
  CKR_PIN_INCORRECT: 'ERR_TPM_PIN_INCORRECT',
  CKR_PIN_LOCKED: 'ERR_TPM_PIN_LOCKED',
  CKR_PIN_EXPIRED: 'ERR_TPM_PIN_LOCKED',
  CKR_PIN_LEN_RANGE: 'ERR_TPM_PIN_INVALID',
  CKR_PIN_INVALID: 'ERR_TPM_PIN_INVALID',
  CKR_USER_PIN_NOT_INITIALIZED: 'ERR_TPM_PIN_INVALID',
  CKR_DEVICE_ERROR: 'ERR_TPM_UNAVAILABLE',
  CKR_DEVICE_REMOVED: 'ERR_TPM_UNAVAILABLE',
  CKR_DEVICE_MEMORY: 'ERR_TPM_UNAVAILABLE',
  CKR_TOKEN_NOT_PRESENT: 'ERR_TPM_UNAVAILABLE',
  CKR_TOKEN_NOT_RECOGNIZED: 'ERR_TPM_UNAVAILABLE',
  CKR_CRYPTOKI_NOT_INITIALIZED: 'ERR_TPM_CLOSED',
  CKR_SESSION_HANDLE_INVALID: 'ERR_TPM_CLOSED',
  CKR_SESSION_CLOSED: 'ERR_TPM_CLOSED',
  CKR_OBJECT_HANDLE_INVALID: 'ERR_TPM_KEY_NOT_FOUND',
  CKR_KEY_HANDLE_INVALID: 'ERR_TPM_KEY_NOT_FOUND',
};

const HINT_BY_RETURN_VALUE: Readonly<Record<string, string>> = {
  CKR_PIN_INCORRECT: 'PIN incorrect',
  CKR_PIN_LOCKED: 'PIN locked (too many wrong attempts; TPM dictionary-attack lockout)',
  CKR_PIN_EXPIRED: 'PIN expired',
  CKR_PIN_LEN_RANGE: 'PIN length out of range',
  CKR_PIN_INVALID: 'PIN contains invalid characters',
  CKR_USER_PIN_NOT_INITIALIZED: 'the user PIN of this token was never set (re-open with the SO PIN and createIfMissing)',
  CKR_ATTRIBUTE_SENSITIVE: 'attribute is sensitive',
  CKR_ATTRIBUTE_TYPE_INVALID: 'attribute not available on this object',
};

/**
 * Wraps whatever a pkcs11js call threw into a TpmError. `context` says what we were doing
 * ("TPM token \"x\": logging in"); callers must not put secrets into it.
 */
export function toTpmError(error: unknown, context: string, fallback: TpmErrorCode = 'ERR_TPM'): TpmError {
  if (error instanceof TpmError) return error;
  if (isPkcs11LikeError(error)) {
    const returnValue = error.message;
    const operation = error.method || undefined;
    const code = CODE_BY_RETURN_VALUE[returnValue] ?? fallback;
    const hint = HINT_BY_RETURN_VALUE[returnValue];
    const where = operation ? ` in ${operation}` : '';
    return new TpmError(code, `${context}: ${hint ? `${hint} ` : ''}(${returnValue}${where})`, { returnValue, operation, cause: error });
  }
  const detail = error instanceof Error ? error.message : String(error);
  return new TpmError(fallback, `${context}: ${detail}`, { cause: error });
}
