import { ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, type Span, type TextMapPropagator, type TracerProvider } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { createOtlpTracerProvider, otlpEndpointFromEnv } from '../../core/otlp.js';

/**
 * Sidecar spans: one per local CONNECT (or proxied plain-HTTP request), continuing the agent's
 * own `traceparent` when it sent one, and injected into the CONNECT to the gateway, which
 * continues it, so one trace spans agent, sidecar and gateway.
 *
 * Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set or a test injects a TracerProvider; then the
 * local proxy still sends a fresh W3C traceparent (core/traceparent.ts childTraceparent) so gateway logs
 * and audit rows carry a trace id, but no SDK is loaded and no span is made.
 */
export const SIDECAR_TRACER_NAME = 'agent-gateway-sidecar';

export interface ConnectSpan {
  /** Headers to add to the CONNECT sent to the gateway (W3C trace context). */
  readonly headers: Record<string, string>;
  end(status: number | undefined, error?: string): void;
}

export interface SidecarTracing {
  readonly enabled: boolean;
  /** Starts the span of one local CONNECT to `authority`; `incoming` are the agent's headers. */
  startConnect(authority: string, incoming: Record<string, string | string[] | undefined>): ConnectSpan;
  shutdown(): Promise<void>;
}

export const TRACING_DISABLED: SidecarTracing = Object.freeze({
  enabled: false,
  startConnect: () => ({ headers: {}, end: () => {} }),
  shutdown: async () => {},
});

const getter = {
  get: (carrier: Record<string, string | string[] | undefined>, key: string) => carrier[key],
  keys: (carrier: Record<string, string | string[] | undefined>) => Object.keys(carrier),
};
const setter = { set: (carrier: Record<string, string>, key: string, value: string) => void (carrier[key] = value) };

export async function startSidecarTracing(options: { tracerProvider?: TracerProvider; log: Logger; env?: NodeJS.ProcessEnv }): Promise<SidecarTracing> {
  const env = options.env ?? process.env;
  const endpoint = otlpEndpointFromEnv(env);
  if (!options.tracerProvider && !endpoint) return TRACING_DISABLED;
  const { W3CTraceContextPropagator } = await import('@opentelemetry/core');
  const propagator: TextMapPropagator = new W3CTraceContextPropagator();
  let provider = options.tracerProvider;
  let shutdown = async () => {};
  if (!provider) {
    const otlp = await createOtlpTracerProvider(endpoint!, env.OTEL_SERVICE_NAME || 'agent-gateway-sidecar', options.log);
    provider = otlp.provider;
    shutdown = otlp.shutdown;
  }
  const tracer = provider.getTracer(SIDECAR_TRACER_NAME);
  return {
    enabled: true,
    startConnect(authority, incoming) {
      const parent = propagator.extract(ROOT_CONTEXT, incoming, getter);
      const span: Span = tracer.startSpan('sidecar.connect', { kind: SpanKind.CLIENT, attributes: { 'agent_gateway.destination': authority } }, parent);
      const headers: Record<string, string> = {};
      propagator.inject(trace.setSpan(parent, span), headers, setter);
      return {
        headers,
        end(status, error) {
          if (status !== undefined) span.setAttribute('http.response.status_code', status);
          if (error !== undefined || (status !== undefined && status !== 200)) span.setStatus({ code: SpanStatusCode.ERROR, ...(error ? { message: error } : {}) });
          span.end();
        },
      };
    },
    shutdown,
  };
}
