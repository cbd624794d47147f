// Moved to core/errors.ts (the one error catalogue); re-exported so existing imports keep compiling.
export { PROXY_STATUS_NAME } from '../../core/errors.js';
export type { ReasonCode } from '../../core/errors.js';
export type { DialErrorType } from '../../core/errors.js';
export type { Response } from '../../core/errors.js';
export { denialResponse } from '../../core/errors.js';
export { dialFailureResponse } from '../../core/errors.js';
export { classifyDialError } from '../../core/errors.js';
