/**
 * Every way a CONNECT can end, and the one mapping from outcome to HTTP status and RFC 9209
 * `proxy-status` header. Nothing else in the gateway picks a status.
 */
export const PROXY_STATUS_NAME = 'agent-gateway';

/** Reason codes a client may see; the precise registry reason goes to the log only. */
export type ReasonCode =
  | 'method_not_allowed'
  | 'authority_invalid'
  | 'identity_invalid'
  | 'not_authorized'
  | 'rate_limited'
  | 'too_many_tunnels'
  | 'registry_unavailable'
  | 'dial_failed'
  | 'shutting_down';

export type DialErrorType = 'connection_refused' | 'connection_timeout' | 'destination_not_found' | 'destination_unavailable';

interface Denial {
  readonly status: number;
  readonly error: string;
}

const DENIALS: Record<Exclude<ReasonCode, 'dial_failed'>, Denial> = {
  method_not_allowed: { status: 405, error: 'http_request_error' },
  authority_invalid: { status: 400, error: 'http_request_error' },
  identity_invalid: { status: 403, error: 'http_request_denied' },
  not_authorized: { status: 403, error: 'http_request_denied' },
  rate_limited: { status: 429, error: 'http_request_denied' },
  too_many_tunnels: { status: 429, error: 'http_request_denied' },
  registry_unavailable: { status: 503, error: 'proxy_internal_error' },
  shutting_down: { status: 503, error: 'proxy_internal_error' },
};

export interface Response {
  readonly status: number;
  readonly headers: Record<string, string>;
}

function proxyStatus(error: string, details: ReasonCode): string {
  return `${PROXY_STATUS_NAME}; error=${error}; details="${details}"`;
}

export function denialResponse(reason: Exclude<ReasonCode, 'dial_failed'>): Response {
  const denial = DENIALS[reason];
  const headers: Record<string, string> = { 'proxy-status': proxyStatus(denial.error, reason) };
  if (reason === 'method_not_allowed') headers.allow = 'CONNECT';
  return { status: denial.status, headers };
}

export function dialFailureResponse(type: DialErrorType): Response {
  return { status: 502, headers: { 'proxy-status': proxyStatus(type, 'dial_failed') } };
}

/** Classifies a socket error from dialling a destination into RFC 9209's error types. */
export function classifyDialError(error: NodeJS.ErrnoException | undefined, timedOut: boolean): DialErrorType {
  if (timedOut || error?.code === 'ETIMEDOUT') return 'connection_timeout';
  switch (error?.code) {
    case 'ECONNREFUSED':
      return 'connection_refused';
    case 'ENOTFOUND':
    case 'EAI_NONAME':
    case 'EAI_AGAIN':
    case 'EAI_NODATA':
      return 'destination_not_found';
    default:
      return 'destination_unavailable';
  }
}
