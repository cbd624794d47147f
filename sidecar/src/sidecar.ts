import type { SecureContext } from 'node:tls';
import { pino, type Logger } from 'pino';
import { GatewaySession } from './gateway-session.js';
import { ANSWER_DEADLINE_MS, LocalProxy } from './local-proxy.js';
import type { SidecarTracing } from './tracing.js';

export interface SidecarOptions {
  readonly gatewayUrl: string;
  /** Built by tls-identity.ts around the TPM key (or any key, in embedding tests). */
  readonly secureContext: SecureContext;
  /** Fingerprint of the key in `secureContext`, for the log lines of a key rotation. */
  readonly keyFingerprint?: string;
  readonly servername?: string;
  /** Default 127.0.0.1 and ::1: Node clients may try ::1 first for `localhost`. */
  readonly listenHosts?: readonly string[];
  readonly listenPort?: number;
  /** Tried first when listenPort is 0 (the port a previous run took); a free one when taken. */
  readonly preferredPort?: number;
  /** Also listen on this Unix socket (mode 0600), for agents isolated by `run`. */
  readonly listenSocket?: string;
  readonly connectWaitMs?: number;
  /** How long an agent's CONNECT may wait for the gateway's answer (default ANSWER_DEADLINE_MS). */
  readonly answerDeadlineMs?: number;
  readonly pingIntervalMs?: number;
  readonly backoffInitialMs?: number;
  readonly backoffMaxMs?: number;
  /** HTTP/2 receive windows towards the gateway; default registry/flow-control.ts. */
  readonly streamWindowBytes?: number;
  readonly sessionWindowBytes?: number;
  readonly logger?: Logger;
  /** Spans per local CONNECT (sidecar/src/tracing.ts); default off. */
  readonly tracing?: SidecarTracing;
}

export interface Sidecar {
  readonly port: number;
  readonly gateway: GatewaySession;
  close(): Promise<void>;
}

/** Starts the gateway session and the local proxy; resolves once the proxy listens. */
export async function startSidecar(options: SidecarOptions): Promise<Sidecar> {
  const log = options.logger ?? pino({ name: 'agent_gateway_sidecar' });
  const gateway = new GatewaySession({
    url: options.gatewayUrl,
    secureContext: options.secureContext,
    ...(options.keyFingerprint ? { keyFingerprint: options.keyFingerprint } : {}),
    ...(options.servername ? { servername: options.servername } : {}),
    connectWaitMs: options.connectWaitMs ?? 5000,
    pingIntervalMs: options.pingIntervalMs ?? 15_000,
    backoffInitialMs: options.backoffInitialMs ?? 100,
    backoffMaxMs: options.backoffMaxMs ?? 5000,
    ...(options.streamWindowBytes !== undefined ? { streamWindowBytes: options.streamWindowBytes } : {}),
    ...(options.sessionWindowBytes !== undefined ? { sessionWindowBytes: options.sessionWindowBytes } : {}),
    log,
  }).run();
  const proxy = new LocalProxy({ hosts: options.listenHosts ?? ['127.0.0.1', '::1'], port: options.listenPort ?? 0,
    ...(options.preferredPort !== undefined ? { preferredPort: options.preferredPort } : {}),
    ...(options.listenSocket !== undefined ? { socketPath: options.listenSocket } : {}),
    // Counted from the agent's request, which may first wait up to connectWaitMs for a session.
    answerDeadlineMs: options.answerDeadlineMs ?? (options.connectWaitMs ?? 5000) + ANSWER_DEADLINE_MS,
    gateway, log, ...(options.tracing ? { tracing: options.tracing } : {}) });
  let port: number;
  try {
    port = await proxy.listen();
  } catch (error) {
    await gateway.close();
    throw error;
  }
  log.info({ event: 'sidecar_listening', port, hosts: proxy.addresses.map((a) => a.address) }, 'sidecar proxy listening');
  return {
    port,
    gateway,
    async close() {
      await proxy.close();
      await gateway.close();
      await options.tracing?.shutdown();
    },
  };
}
