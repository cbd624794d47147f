import { AgentGatewayError } from '../core/errors.js';

/**
 * Typed errors of the signed-registry model, shared by the gateway, the registry CLI and the
 * sidecar. Each carries a stable code from the one catalogue (core/errors.ts), which gives its
 * exit code, HTTP status, CONNECT reason and hint.
 */
export { AgentGatewayError };
export type { ErrorCode } from '../core/errors.js';

/** A CONNECT authority or a destination argument that does not normalise. */
export class InvalidDestinationError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_DESTINATION_INVALID', message, options);
  }
}

/** The identity extension of a client certificate is missing or malformed. */
export class InvalidIdentityError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_IDENTITY_INVALID', message, options);
  }
}

/** A value that would make the canonical signed text ambiguous, or a malformed field. */
export class InvalidPermissionFieldError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_PERMISSION_FIELD_INVALID', message, options);
  }
}

/** A public key, signature or timestamp that cannot be used. */
export class InvalidKeyMaterialError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_KEY_MATERIAL_INVALID', message, options);
  }
}

/** The registry database could not be asked (down, pool or query timeout, schema mismatch). */
export class RegistryUnavailableError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_REGISTRY_UNAVAILABLE', message, options);
  }
}

/** The database schema is not the version this build expects. */
export class SchemaVersionError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SCHEMA_VERSION', message, options);
  }
}

/** Configuration that fails validation; the message names the field. */
export class ConfigError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_CONFIG', message, options);
  }
}
