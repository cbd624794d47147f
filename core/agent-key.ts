/**
 * Where the sidecar keeps the agent's TLS key unless told otherwise, and the variables that move
 * it. The sidecar presents this key, so the registry CLI enrols this one: both read it here.
 */
export const AGENT_KEY = {
  tokenLabel: 'agent-gateway-sidecar',
  keyLabel: 'agent-tls',
  tokenVariable: 'AGENT_GATEWAY_SIDECAR_TPM_TOKEN',
  keyVariable: 'AGENT_GATEWAY_SIDECAR_TPM_KEY',
} as const;
