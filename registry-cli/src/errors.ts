import { AgentGatewayError } from '../../registry/errors.js';

/**
 * The CLI's own error types, and the one mapping from any error to an exit code.
 * Every failure reaches the user through `exitCodeFor` and `errorCode`; nothing else picks a code.
 */

export const EXIT = {
  ok: 0,
  /** A runtime failure: database, TPM, file system, or anything unexpected. */
  runtime: 1,
  /** The command line is wrong: unknown option, missing argument, malformed value. */
  usage: 2,
  /** Refused: the request would produce something the gateway denies, or contradicts the registry (nothing written). `explain` also exits 3 when the gateway would deny. */
  refused: 3,
  /** The database schema is not what this CLI expects: not migrated, another version, an edited or out-of-order migration. */
  schema: 4,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** A malformed command line or option value. */
export class UsageError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_USAGE', message, options);
  }
}

export type RefusalCode =
  | 'ERR_REFUSED_FIELD_INVALID'
  | 'ERR_REFUSED_VALIDITY'
  | 'ERR_REFUSED_OUT_OF_SCOPE'
  | 'ERR_REFUSED_PRINCIPAL_UNKNOWN'
  | 'ERR_REFUSED_PRINCIPAL_INACTIVE'
  | 'ERR_REFUSED_PRINCIPAL_KEY_MISMATCH'
  | 'ERR_REFUSED_IDENTITY_MISMATCH'
  | 'ERR_REFUSED_CERTIFICATE_IDENTITY_INVALID'
  | 'ERR_REFUSED_SCOPE_UNKNOWN'
  | 'ERR_REFUSED_PERMISSION_UNKNOWN';

/** The CLI will not write this: the gateway would deny the result, or the registry contradicts it. */
export class RefusedError extends AgentGatewayError {
  declare readonly code: RefusalCode;
  constructor(code: RefusalCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export type MigrationErrorCode =
  | 'ERR_MIGRATION_CHECKSUM'
  | 'ERR_MIGRATION_ORDER'
  | 'ERR_MIGRATION_MISSING'
  | 'ERR_MIGRATION_FILES'
  | 'ERR_MIGRATION_BASELINE'
  | 'ERR_MIGRATION_FAILED'
  | 'ERR_MIGRATION_LOCK_TIMEOUT';

/** The migration history and the migration files disagree, or applying one failed. */
export class MigrationError extends AgentGatewayError {
  declare readonly code: MigrationErrorCode;
  constructor(code: MigrationErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** The registry database could not be reached or a query failed; the message never holds a password. */
export class DatabaseError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_DATABASE', message, options);
  }
}

const EXIT_BY_CODE: Readonly<Record<string, ExitCode>> = {
  ERR_USAGE: EXIT.usage,
  ERR_CONFIG: EXIT.usage,
  ERR_DESTINATION_INVALID: EXIT.usage,
  ERR_KEY_MATERIAL_INVALID: EXIT.usage,
  ERR_IDENTITY_INVALID: EXIT.usage,
  ERR_TPM_INVALID_ARGUMENT: EXIT.usage,
  // Thrown by registry/permission.ts when a field would make the signed text ambiguous.
  ERR_PERMISSION_FIELD_INVALID: EXIT.refused,
  ERR_SCHEMA_VERSION: EXIT.schema,
  ERR_MIGRATION_CHECKSUM: EXIT.schema,
  ERR_MIGRATION_ORDER: EXIT.schema,
  ERR_MIGRATION_MISSING: EXIT.schema,
  ERR_MIGRATION_FILES: EXIT.schema,
  ERR_MIGRATION_BASELINE: EXIT.schema,
};

/** The stable code of any error (`ERR_INTERNAL` for ones that are not ours). */
export function errorCode(error: unknown): string {
  return error instanceof AgentGatewayError ? error.code : 'ERR_INTERNAL';
}

export function exitCodeFor(error: unknown): ExitCode {
  if (error instanceof RefusedError) return EXIT.refused;
  return EXIT_BY_CODE[errorCode(error)] ?? EXIT.runtime;
}

const HINTS: Readonly<Record<string, string>> = {
  ERR_TPM_PIN_INCORRECT: 'check AGENT_GATEWAY_TPM_USER_PIN or --user-pin-file; repeated wrong PINs trigger the TPM dictionary-attack lockout',
  ERR_TPM_PIN_LOCKED: 'the TPM is in dictionary-attack lockout: wait for its recovery time, or clear it with the lockout authorisation',
  ERR_TPM_UNAVAILABLE: 'is the TPM reachable? check TPM2_PKCS11_TCTI (and DBUS_SESSION_BUS_ADDRESS for tpm2-abrmd)',
  ERR_TPM_TOKEN_NOT_FOUND: 'register-principal creates the token when AGENT_GATEWAY_TPM_SO_PIN (or --so-pin-file) is set; otherwise check --token / AGENT_GATEWAY_TPM_TOKEN and TPM2_PKCS11_STORE',
  ERR_TPM_KEY_NOT_FOUND: 'this TPM token holds no key with that label: run register-principal on the machine that owns the principal key',
  ERR_SCHEMA_VERSION: 'run `agent-gateway-registry migrate`',
};

/** A one-line remedy for errors an operator can fix, or undefined. */
export function hintFor(error: unknown): string | undefined {
  return HINTS[errorCode(error)];
}
