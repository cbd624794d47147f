import { pino, type Logger } from 'pino';
import { parseConfig } from '../../gateway/src/config.js';
import { createGateway, type Gateway } from '../../gateway/src/gateway.js';
import { TEST_OID, type ServerTls } from './pki.js';

export interface TestGatewayOptions {
  readonly databaseUrl: string;
  readonly tls: ServerTls;
  readonly port?: number;
  readonly resolve?: Record<string, string>;
  readonly logger?: Logger;
  readonly policy?: Record<string, unknown>;
}

/** The raw config object a test gateway runs with (validated by parseConfig like a TOML file). */
export function testGatewayConfig(options: TestGatewayOptions) {
  return {
    server: { listen_addr: `127.0.0.1:${options.port ?? 0}`, tls_cert_path: options.tls.certPath, tls_key_path: options.tls.keyPath, shutdown_grace_ms: 1000 },
    policy: { client_ext_oid: TEST_OID, database_url: options.databaseUrl, connect_timeout_ms: 2000, ...options.policy },
    observability: { log_level: 'info' },
    // The destinations here are loopback listeners: [egress] refuses loopback unless allowed.
    egress: { allow_cidrs: ['127.0.0.0/8', '::1/128'] },
    // Port 0: several gateways run in one test process; the default 127.0.0.1:9090 would collide.
    admin: { listen_addr: '127.0.0.1:0' },
    resolve: options.resolve ?? {},
  };
}

export async function startTestGateway(options: TestGatewayOptions): Promise<Gateway> {
  const gateway = createGateway(parseConfig(testGatewayConfig(options)), { logger: options.logger ?? pino({ level: 'silent' }) });
  await gateway.listen();
  return gateway;
}
