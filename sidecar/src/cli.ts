import { once } from 'node:events';
import { readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Command, CommanderError } from 'commander';
import type { DestinationStream } from 'pino';
import { EXIT, type ExitCode } from '../../core/errors.js';
import { AgentGatewayError } from '../../registry/errors.js';
import { probeToken } from '../../tpm/token.js';
import { addSidecarOptions, cliValues, loadSidecarConfig, type LoadedConfig } from './config.js';
import { startHealthServer } from './health.js';
import { createSidecarLogger } from './logger.js';
import { startSidecar, type Sidecar } from './sidecar.js';
import { loadTlsIdentity, type TlsIdentity } from './tls-identity.js';
import { startSidecarTracing } from './tracing.js';

export const NAME = 'agent-gateway-sidecar';
/** How long a stop may take before the sidecar gives up on a wedged close. */
const STOP_TIMEOUT_MS = 10_000;

interface Writer {
  write(text: string): unknown;
}

export interface SidecarIo {
  readonly env: NodeJS.ProcessEnv;
  /** Carries exactly one JSON line, once the proxy listens. */
  readonly stdout: Writer;
  /** Usage and fatal errors. */
  readonly stderr: Writer;
  /** Log lines; default fd 2, synchronously, so the last lines before an exit are not lost. */
  readonly log?: DestinationStream;
  /** Aborted on SIGINT/SIGTERM (main.ts), or by an in-process test: the sidecar stops and resolves 0. */
  readonly stop?: AbortSignal;
}

function describe(error: unknown): string {
  // Our errors carry messages written for operators; anything else is a bug worth its stack.
  return error instanceof AgentGatewayError ? error.message : ((error as Error)?.stack ?? String(error));
}

function exitFor(error: unknown): ExitCode {
  return error instanceof AgentGatewayError && error.code === 'ERR_CONFIG' ? EXIT.usage : EXIT.runtime;
}

function writePortFile(file: string, port: number): void {
  // Atomic, so a script polling for the file never reads it half-written.
  const temporary = `${file}.tmp-${process.pid}`;
  writeFileSync(temporary, `${port}\n`);
  renameSync(temporary, file);
}

/** Where a sidecar keeps the port it took, beside its carrier certificate (its state). */
export function keptPortFile(certOut: string): string {
  return join(dirname(certOut), 'sidecar-listen-port');
}

function readKeptPort(file: string): number | undefined {
  try {
    const text = readFileSync(file, 'utf8').trim();
    const port = /^[1-9][0-9]{0,4}$/.test(text) ? Number(text) : 0;
    return port > 0 && port < 65536 ? port : undefined;
  } catch {
    return undefined;
  }
}

function removePortFile(file: string, port: number): void {
  try {
    // Another sidecar may have taken the file over since; only remove our own.
    if (readFileSync(file, 'utf8').trim() === String(port)) rmSync(file, { force: true });
  } catch {
    // gone already
  }
}

function program(io: SidecarIo): Command {
  const command = new Command()
    .name(NAME)
    .description(
      'Local HTTP/1.1 proxy for AI agents: each CONNECT becomes a stream on one HTTP/2 mTLS session to agent-gateway, ' +
        'whose TLS handshake is signed by a P-256 key generated inside the TPM (tpm2-pkcs11). Writes the carrier ' +
        'certificate (machine-client.pem) for that key and identity on every start, then prints one JSON line with the port.',
    );
  addSidecarOptions(command)
    .addHelpText(
      'after',
      '\nExit status: 0 after SIGINT/SIGTERM, 1 on a runtime failure (TPM, PIN, listener), 2 on bad flags or settings.' +
        `\n\nRun an agent isolated, its only way out this sidecar's --listen-socket:\n  ${NAME} run --socket PATH [--no-isolation] -- CMD [ARGS...]   (see ${NAME} run --help)`,
    )
    .showHelpAfterError(`(run ${NAME} --help for every flag)`)
    .configureOutput({ writeOut: (text) => void io.stdout.write(text), writeErr: (text) => void io.stderr.write(text) })
    .exitOverride();
  return command;
}

/**
 * The sidecar as a function: parses `argv` (without node and the script), loads the TPM-backed
 * identity, serves the local proxy until `io.stop` is aborted, and resolves with the exit code.
 * Nothing here exits the process or installs signal handlers (main.ts does), so a test can run
 * it in-process.
 */
export async function runSidecar(argv: readonly string[], io: SidecarIo): Promise<ExitCode> {
  const fail = (error: unknown): ExitCode => {
    io.stderr.write(`${NAME}: ${describe(error)}\n`);
    return exitFor(error);
  };
  // A PIN given as a flag value would sit in `ps` output and shell history: refuse it by name.
  if (argv.some((arg) => /^--(user|so)-pin(=|$)/.test(arg))) {
    io.stderr.write(`${NAME}: PINs are never taken as flag values (ps and shell history would show them): set AGENT_GATEWAY_TPM_USER_PIN / AGENT_GATEWAY_TPM_SO_PIN or pass --user-pin-file / --so-pin-file\n`);
    return EXIT.usage;
  }
  const command = program(io);
  try {
    command.parse([...argv], { from: 'user' });
  } catch (error) {
    // Commander has printed its message (or the help) already.
    return error instanceof CommanderError && error.exitCode === 0 ? EXIT.ok : EXIT.usage;
  }
  let loaded: LoadedConfig;
  try {
    loaded = loadSidecarConfig(cliValues(command), io.env);
  } catch (error) {
    return fail(error);
  }
  const { config, warnings } = loaded;
  const log = createSidecarLogger({ level: config.logLevel, quiet: config.logQuiet, ...(io.log ? { destination: io.log } : {}) });
  for (const warning of warnings) log.warn({ event: 'config_warning' }, warning);

  // A stop that arrives while a step runs lets that step finish, so whatever it opened is closed
  // below: a sidecar killed while loading the key without finalising PKCS#11 leaks TPM sessions.
  const stopping = () => io.stop?.aborted === true;
  const opened: (() => unknown)[] = [];
  const closeAll = async () => {
    for (const close of opened.reverse()) {
      try {
        await close();
      } catch (error) {
        log.warn({ err: (error as Error).message }, 'closing failed');
      }
    }
  };
  const stopped = async (): Promise<ExitCode> => {
    log.info({ event: 'shutdown', signal: String(io.stop?.reason ?? 'stop') }, 'shutting down');
    // A wedged close must not keep the process (and its TPM sessions) around forever.
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<ExitCode>((resolve) => {
      timer = setTimeout(() => {
        log.error({ event: 'shutdown_timeout' }, 'shutdown took too long; exiting');
        resolve(EXIT.runtime);
      }, STOP_TIMEOUT_MS);
      timer.unref();
    });
    const code = await Promise.race([closeAll().then(() => EXIT.ok), timeout]);
    clearTimeout(timer);
    if (code === EXIT.ok) log.info({ event: 'stopped' }, 'stopped');
    return code;
  };

  let identity: TlsIdentity;
  try {
    identity = await loadTlsIdentity({
      identity: config.identity,
      extensionOid: config.extensionOid,
      certOut: config.certOut,
      tokenLabel: config.tokenLabel,
      keyLabel: config.keyLabel,
      userPin: config.userPin,
      ...(config.soPin !== undefined ? { soPin: config.soPin } : {}),
      tcti: config.tcti,
      ...(config.storeDir !== undefined ? { storeDir: config.storeDir } : {}),
      modulePath: config.pkcs11Module,
      enginePath: config.pkcs11Engine,
      ...(config.gatewayCaPem !== undefined ? { ca: config.gatewayCaPem } : {}),
      log,
    });
  } catch (error) {
    return stopping() ? stopped() : fail(error);
  }
  opened.push(() => identity.close()); // finalises PKCS#11: tpm2-pkcs11 flushes its TPM sessions and objects
  if (stopping()) return stopped();

  const keptPort = keptPortFile(config.certOut);
  const previousPort = config.listenPort === 0 ? readKeptPort(keptPort) : undefined;
  let sidecar: Sidecar;
  try {
    sidecar = await startSidecar({
      gatewayUrl: config.gatewayUrl,
      secureContext: identity.secureContext,
      ...(config.servername !== undefined ? { servername: config.servername } : {}),
      listenHosts: config.listenHosts,
      listenPort: config.listenPort,
      ...(previousPort !== undefined ? { preferredPort: previousPort } : {}),
      ...(config.listenSocket !== undefined ? { listenSocket: config.listenSocket } : {}),
      connectWaitMs: config.connectWaitMs,
      streamWindowBytes: config.streamWindowBytes,
      sessionWindowBytes: config.sessionWindowBytes,
      logger: log,
      // OTLP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise no SDK is loaded.
      tracing: await startSidecarTracing({ log, env: io.env }),
    });
  } catch (error) {
    if (stopping()) return stopped();
    await closeAll();
    const code = (error as NodeJS.ErrnoException).code;
    const where = `${config.listenHosts.join(', ')} port ${config.listenPort}${config.listenSocket !== undefined ? ` and ${config.listenSocket}` : ''}`;
    return fail(new AgentGatewayError('ERR_LISTEN', `cannot listen on ${where}: ${[code, (error as Error).message].filter(Boolean).join(': ')}`, { cause: error }));
  }
  opened.push(() => sidecar.close()); // stops accepting, ends agent connections, closes the gateway session
  const portReused = previousPort !== undefined && sidecar.port === previousPort;
  if (config.listenPort === 0) {
    try {
      writePortFile(keptPort, sidecar.port);
    } catch (error) {
      // Only the next start's convenience is lost; this one serves.
      log.warn({ event: 'port_not_kept', file: keptPort, err: (error as Error).message }, 'cannot keep the port for the next start');
    }
  }
  log.info({ event: 'port_taken', port: sidecar.port, previous_port: previousPort ?? null, reused: portReused }, portReused ? `took port ${sidecar.port} again` : `took port ${sidecar.port}`);
  if (stopping()) return stopped();

  if (config.portFile !== undefined) {
    const portFile = config.portFile;
    try {
      writePortFile(portFile, sidecar.port);
    } catch (error) {
      await closeAll();
      return fail(new AgentGatewayError('ERR_PORT_FILE', `cannot write --port-file ${portFile}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`));
    }
    opened.push(() => removePortFile(portFile, sidecar.port));
  }

  let healthPort: number | undefined;
  if (config.healthPort !== undefined) {
    try {
      const health = await startHealthServer({
        host: config.listenHosts[0]!,
        port: config.healthPort,
        checks: [
          { name: 'gateway_session', check: () => sidecar.gateway.connected },
          // A real PKCS#11 round trip to the TPM, beside the engine's own session.
          { name: 'tpm', check: () => (probeToken({ modulePath: config.pkcs11Module, tokenLabel: config.tokenLabel }), true) },
        ],
      });
      opened.push(() => health.close());
      healthPort = health.port;
    } catch (error) {
      await closeAll();
      return fail(new AgentGatewayError('ERR_LISTEN', `cannot serve --health-port ${config.healthPort}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`));
    }
  }
  if (stopping()) return stopped();

  // The one line on stdout: scripts read the port (and what the gateway will see) from here.
  const host = config.listenHosts[0]!;
  io.stdout.write(
    `${JSON.stringify({
      event: 'sidecar_listening',
      port: sidecar.port,
      proxy_url: `http://${host.includes(':') ? `[${host}]` : host}:${sidecar.port}`,
      port_reused: portReused,
      hosts: config.listenHosts,
      ...(config.listenSocket !== undefined ? { socket: config.listenSocket } : {}),
      gateway: config.gatewayUrl,
      identity: identity.identity,
      spki_fingerprint: identity.spkiFingerprint,
      cert: identity.certPath,
      ...(healthPort !== undefined ? { health_port: healthPort } : {}),
    })}\n`,
  );
  if (io.stop) {
    if (!io.stop.aborted) await once(io.stop, 'abort');
  }
  else await new Promise<never>(() => {}); // served until the process is killed
  return stopped();
}
