import { Command } from 'commander';
import { EXIT, exitCodeFor } from '../../core/errors.js';
import { tuneHeapForBytePath } from '../../core/heap-tuning.js';
import { AgentGatewayError } from '../../registry/errors.js';
import { loadConfig } from './config.js';
import { createGateway } from './gateway.js';
import { createLogger } from './logger.js';

tuneHeapForBytePath();

const program = new Command()
  .name('agent-gateway')
  .description('mTLS HTTP/2 CONNECT gateway authorised by the signed PostgreSQL registry')
  .requiredOption('-c, --config <path>', 'TOML configuration file (see config.example.toml)')
  .showHelpAfterError()
  // A usage error is a configuration error: exit 2 as a bad config file does (systemd does not restart it), not commander's 1.
  .exitOverride((error) => process.exit(error.exitCode === 0 ? EXIT.ok : EXIT.usage))
  .parse();

const { config: configPath } = program.opts<{ config: string }>();

function fail(error: unknown): never {
  const message = error instanceof AgentGatewayError ? error.message : `${(error as Error)?.stack ?? String(error)}`;
  process.stderr.write(`agent-gateway: ${message}\n`);
  // The catalogue's exit code, as the CLI exits: 2 for the config, 4 for the schema, 1 otherwise.
  process.exit(exitCodeFor(error));
}

try {
  const config = loadConfig(configPath);
  const log = createLogger({ filter: config.observability.log_level });
  const gateway = createGateway(config, { logger: log });
  let listening = false;
  let stopping = false;
  // SIGHUP (systemctl reload): re-read the config file, then the certificate and [limits]. A bad
  // file or pair is logged and changes nothing; open tunnels are untouched. The handler is
  // installed before listen() so a reload during start-up does not kill the process (SIGHUP's
  // default action); such a reload is skipped, since start-up has just read everything.
  let reloading = Promise.resolve();
  process.on('SIGHUP', () => {
    if (stopping || !listening) return;
    reloading = reloading.then(async () => {
      // reload() counts and logs a file that does not parse like any other refused reload.
      await gateway.reload(() => loadConfig(configPath)).catch(() => {});
    });
  });
  await gateway.listen();
  listening = true;
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
