import { AgentGatewayError, codeOf, type ErrorCode } from '../../core/errors.js';

/**
 * The CLI's own error types. Exit codes and hints come from the product's one catalogue
 * (core/errors.ts): every failure reaches the user through `exitCodeFor`, `hintFor` and
 * `errorCode`; nothing else picks a code.
 */
export { EXIT, exitCodeFor, hintFor, type ExitCode } from '../../core/errors.js';

/** A malformed command line or option value. */
export class UsageError extends AgentGatewayError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_USAGE', message, options);
  }
}

/** The codes of a refusal (exit 3): every `ERR_REFUSED_*` code of the catalogue. */
export type RefusalCode = Extract<ErrorCode, `ERR_REFUSED_${string}`>;

/** The CLI will not write this: the gateway would deny the result, or the registry contradicts it. */
export class RefusedError extends AgentGatewayError {
  declare readonly code: RefusalCode;
  constructor(code: RefusalCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Every `ERR_MIGRATION_*` code of the catalogue. */
export type MigrationErrorCode = Extract<ErrorCode, `ERR_MIGRATION_${string}`>;

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

/** The stable code of any error (`ERR_INTERNAL` for ones that are not ours). */
export function errorCode(error: unknown): ErrorCode {
  return codeOf(error);
}
