export { TpmError, toTpmError, pkcs11ReturnValue, type TpmErrorCode, type TpmErrorDetails } from './errors.js';
export { DEFAULT_TPM2_PKCS11_MODULE } from '../core/platform.js';
export { P256_EC_PARAMS, TpmKey, TpmToken, openToken, type OpenTokenOptions } from './token.js';
