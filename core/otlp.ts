import type { TracerProvider } from '@opentelemetry/api';
import type { Logger } from 'pino';
import { redactUrl } from './redact-url.js';

/** How long shutdown waits for the last spans to reach the collector. */
const SHUTDOWN_TIMEOUT_MS = 3000;

/** Where spans go when the program has no setting of its own: the standard OTel variables. */
export function otlpEndpointFromEnv(env: NodeJS.ProcessEnv = process.env): string | undefined {
  return env.OTEL_EXPORTER_OTLP_ENDPOINT || env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT || undefined;
}

/**
 * A tracer provider exporting over OTLP gRPC in batches, shared by the gateway and the sidecar.
 * The SDK and exporter are imported here, only when an endpoint is set, so an unset endpoint
 * costs neither their load time nor their memory. Nothing is registered globally, so several
 * providers can live in one process.
 */
export async function createOtlpTracerProvider(endpoint: string, serviceName: string, log: Logger): Promise<{ provider: TracerProvider; shutdown: () => Promise<void> }> {
  const [{ BasicTracerProvider, BatchSpanProcessor }, { OTLPTraceExporter }, { resourceFromAttributes }] = await Promise.all([
    import('@opentelemetry/sdk-trace-base'),
    import('@opentelemetry/exporter-trace-otlp-grpc'),
    import('@opentelemetry/resources'),
  ]);
  const sdk = new BasicTracerProvider({
    resource: resourceFromAttributes({ 'service.name': serviceName }),
    // Batches leave on a timer; a slow or absent collector costs dropped spans, never CONNECT latency.
    spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({ url: endpoint }))],
  });
  log.info({ event: 'tracing', otlp_endpoint: redactUrl(endpoint) }, 'exporting traces over OTLP gRPC');
  return {
    provider: sdk,
    // Bounded: an unreachable collector must not hold up the process's exit.
    shutdown: async () => {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<void>((resolve) => (timer = setTimeout(resolve, SHUTDOWN_TIMEOUT_MS)));
      await Promise.race([sdk.shutdown().catch((error: unknown) => log.warn({ err: (error as Error).message }, 'tracing shutdown failed')), timeout]);
      clearTimeout(timer);
    },
  };
}
