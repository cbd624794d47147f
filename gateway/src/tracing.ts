import type { IncomingHttpHeaders } from 'node:http2';
import { ROOT_CONTEXT, trace, type Context, type Span, type TextMapPropagator, type Tracer, type TracerProvider } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { createOtlpTracerProvider, otlpEndpointFromEnv } from '../../core/otlp.js';
import type { GatewayConfig } from './config.js';

/**
 * OpenTelemetry tracing for the gateway: manual spans for each session, each CONNECT (continuing
 * the W3C `traceparent` the sidecar sends, so one trace spans sidecar and gateway), the registry
 * query, the dial and the tunnel's life.
 *
 * Off unless `observability.otlp_endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT is set, or a test
 * injects a TracerProvider. Off means no SDK loaded and no span objects: the gateway checks
 * `enabled` and skips every span call. Contexts are passed explicitly (no global context manager
 * or propagator is registered), so several gateways in one process each keep their own provider.
 */

export const TRACER_NAME = 'agent-gateway';
export interface TracingOptions {
  /** Use this provider (tests: BasicTracerProvider + InMemorySpanExporter). The gateway does not shut it down. */
  readonly tracerProvider?: TracerProvider;
  readonly log: Logger;
}

export interface GatewayTracing {
  readonly enabled: boolean;
  readonly tracer: Tracer;
  /** The parent context a CONNECT's headers carry (ROOT_CONTEXT when none). */
  extract(headers: IncomingHttpHeaders): Context;
  /** A context whose active span is `span`, to start children under it. */
  withSpan(parent: Context, span: Span): Context;
  /** Flushes and stops an SDK this module started; no-op otherwise. */
  shutdown(): Promise<void>;
}

const DISABLED: GatewayTracing = Object.freeze({
  enabled: false,
  tracer: trace.getTracer(TRACER_NAME),
  extract: () => ROOT_CONTEXT,
  withSpan: (parent: Context) => parent,
  shutdown: async () => {},
});

const headerGetter = {
  get(carrier: IncomingHttpHeaders, key: string) {
    return carrier[key];
  },
  keys(carrier: IncomingHttpHeaders) {
    return Object.keys(carrier);
  },
};

/** Where spans go: the config's endpoint, else the standard OTel variable, else nowhere. */
export function otlpEndpoint(config: GatewayConfig, env: NodeJS.ProcessEnv = process.env): string | undefined {
  return config.observability.otlp_endpoint ?? otlpEndpointFromEnv(env);
}

/**
 * Starts tracing for one gateway. The SDK and the gRPC exporter are imported only here, only
 * when needed: an unset endpoint costs neither their load time nor their memory.
 */
export async function startTracing(config: GatewayConfig, options: TracingOptions): Promise<GatewayTracing> {
  const endpoint = otlpEndpoint(config);
  if (!options.tracerProvider && !endpoint) return DISABLED;
  const { W3CTraceContextPropagator } = await import('@opentelemetry/core');
  const propagator: TextMapPropagator = new W3CTraceContextPropagator();
  let provider = options.tracerProvider;
  let shutdown = async () => {};
  if (!provider) {
    const otlp = await createOtlpTracerProvider(endpoint!, process.env.OTEL_SERVICE_NAME || 'agent-gateway', options.log);
    provider = otlp.provider;
    shutdown = otlp.shutdown;
  }
  return {
    enabled: true,
    tracer: provider.getTracer(TRACER_NAME),
    extract: (headers) => propagator.extract(ROOT_CONTEXT, headers, headerGetter),
    withSpan: (parent, span) => trace.setSpan(parent, span),
    shutdown,
  };
}
