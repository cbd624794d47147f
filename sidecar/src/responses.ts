/**
 * The sidecar's own answers to its agents (those that do not come from the gateway), each status
 * with its matching reason code. Interim table: moves into the product's error catalogue.
 */
export const SIDECAR_PROXY_STATUS_NAME = 'agent-gateway-sidecar';

const RESPONSES = {
  authority_invalid: { status: 400, error: 'http_request_error' },
  gateway_unavailable: { status: 503, error: 'proxy_internal_error' },
} as const;

export type SidecarReason = keyof typeof RESPONSES;

export function sidecarResponse(reason: SidecarReason): { readonly status: number; readonly headers: Record<string, string> } {
  const { status, error } = RESPONSES[reason];
  return { status, headers: { 'proxy-status': `${SIDECAR_PROXY_STATUS_NAME}; error=${error}; details="${reason}"` } };
}
