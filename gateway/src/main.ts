import { Command } from 'commander';
import { AgentGatewayError } from '../../registry/errors.js';
import { loadConfig } from './config.js';
import { createGateway } from './gateway.js';
import { createLogger } from './logger.js';

const program = new Command()
  .name('agent-gateway')
  .description('mTLS HTTP/2 CONNECT gateway authorised by the signed PostgreSQL registry')
  .requiredOption('-c, --config <path>', 'TOML configuration file (see config.example.toml)')
  .showHelpAfterError()
  .parse();

const { config: configPath } = program.opts<{ config: string }>();

function fail(error: unknown): never {
  const message = error instanceof AgentGatewayError ? error.message : `${(error as Error)?.stack ?? String(error)}`;
  process.stderr.write(`agent-gateway: ${message}\n`);
  process.exit(error instanceof AgentGatewayError && error.code === 'ERR_CONFIG' ? 2 : 1);
}

try {
  const config = loadConfig(configPath);
  const log = createLogger({ filter: config.observability.log_level });
  const gateway = createGateway(config, { logger: log });
  await gateway.listen();
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ event: 'shutdown', signal, open_tunnels: gateway.openTunnels }, 'shutting down');
    gateway.close().then(
      () => process.exit(0),
      (error: unknown) => fail(error),
    );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
} catch (error) {
  fail(error);
}
