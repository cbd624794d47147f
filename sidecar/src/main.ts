import { readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import { AgentGatewayError } from '../../registry/errors.js';
import {
  DEFAULT_CERT_OUT,
  DEFAULT_CONNECT_WAIT_MS,
  DEFAULT_EXTENSION_OID,
  DEFAULT_GATEWAY_URL,
  DEFAULT_KEY_LABEL,
  DEFAULT_TCTI,
  DEFAULT_TOKEN_LABEL,
  loadSidecarConfig,
  type SidecarCliOptions,
} from './config.js';
import { createSidecarLogger } from './logger.js';
import { probeToken } from '../../tpm/token.js';
import { startHealthServer } from './health.js';
import { startSidecar, type Sidecar } from './sidecar.js';
import { startSidecarTracing } from './tracing.js';
import { loadTlsIdentity, type TlsIdentity } from './tls-identity.js';

const NAME = 'agent-gateway-sidecar';
const EXIT_RUNTIME = 1;
const EXIT_USAGE = 2;

function fail(error: unknown, status = EXIT_RUNTIME): never {
  // Our errors carry messages written for operators; anything else is a bug worth its stack.
  const message = error instanceof AgentGatewayError ? error.message : ((error as Error)?.stack ?? String(error));
  process.stderr.write(`${NAME}: ${message}\n`);
  process.exit(error instanceof AgentGatewayError && error.code === 'ERR_CONFIG' ? EXIT_USAGE : status);
}

// A PIN given as a flag value would sit in `ps` output and shell history: refuse it by name.
for (const arg of process.argv.slice(2)) {
  if (/^--(user|so)-pin(=|$)/.test(arg)) {
    process.stderr.write(`${NAME}: PINs are never taken as flag values (ps and shell history would show them): set AGENT_GATEWAY_TPM_USER_PIN / AGENT_GATEWAY_TPM_SO_PIN or pass --user-pin-file / --so-pin-file\n`);
    process.exit(EXIT_USAGE);
  }
}

const collect = (value: string, previous: string[] | undefined) => [...(previous ?? []), value];

const program = new Command()
  .name(NAME)
  .description(
    'Local HTTP/1.1 proxy for AI agents: each CONNECT becomes a stream on one HTTP/2 mTLS session to agent-gateway, ' +
      'whose TLS handshake is signed by a P-256 key generated inside the TPM (tpm2-pkcs11). Writes the carrier ' +
      'certificate (machine-client.pem) for that key and identity on every start, then prints one JSON line with the port.',
  )
  .option('--gateway <url>', `gateway URL [env AGENT_GATEWAY_URL] (default ${DEFAULT_GATEWAY_URL})`)
  .option('--gateway-ca <file>', 'PEM CA certificates that verify the gateway [env AGENT_GATEWAY_CA] (default: system roots)')
  .option('--servername <name>', 'TLS server name to verify, when the URL host differs [env AGENT_GATEWAY_SERVERNAME]')
  .option('--listen-port <port>', 'local proxy port; 0 picks a free one [env AGENT_GATEWAY_SIDECAR_PORT] (default 0)')
  .option('--listen-host <ip>', 'loopback address to listen on, repeatable [env AGENT_GATEWAY_SIDECAR_HOSTS, comma list] (default 127.0.0.1 and ::1)', collect)
  .option('--identity <id>', 'identity carried in the certificate extension; required [env AGENT_GATEWAY_IDENTITY]')
  .option('--ext-oid <oid>', `identity extension OID [env AGENT_GATEWAY_CLIENT_EXT_OID] (default ${DEFAULT_EXTENSION_OID})`)
  .option('--token-label <label>', `tpm2-pkcs11 token label [env AGENT_GATEWAY_SIDECAR_TPM_TOKEN] (default ${DEFAULT_TOKEN_LABEL})`)
  .option('--key-label <label>', `label of the TLS key in the token [env AGENT_GATEWAY_SIDECAR_TPM_KEY] (default ${DEFAULT_KEY_LABEL})`)
  .option('--user-pin-file <file>', 'file holding the token user PIN [else env AGENT_GATEWAY_TPM_USER_PIN]')
  .option('--so-pin-file <file>', 'file holding the token SO PIN, needed only to create the token [else env AGENT_GATEWAY_TPM_SO_PIN]')
  .option('--tcti <tcti>', `how tpm2-pkcs11 reaches the TPM [env TPM2_PKCS11_TCTI] (default ${DEFAULT_TCTI})`)
  .option('--pkcs11-module <file>', 'tpm2-pkcs11 module [env PKCS11_MODULE_PATH] (default Debian libtpm2_pkcs11.so)')
  .option('--pkcs11-engine <file>', 'libp11 OpenSSL engine, full path [env AGENT_GATEWAY_PKCS11_ENGINE] (default Debian engines-3/pkcs11.so)')
  .option('--cert-out <file>', `where to write the carrier certificate [env AGENT_GATEWAY_SIDECAR_CERT_OUT] (default ./${DEFAULT_CERT_OUT})`)
  .option('--stream-window-bytes <n>', 'HTTP/2 stream receive window toward the gateway (downloads) [env AGENT_GATEWAY_SIDECAR_STREAM_WINDOW_BYTES] (default 1048576)')
  .option('--session-window-bytes <n>', 'HTTP/2 session receive window toward the gateway [env AGENT_GATEWAY_SIDECAR_SESSION_WINDOW_BYTES] (default 2097152)')
  .option('--connect-wait-ms <ms>', `how long a CONNECT waits for the gateway session before 503 [env AGENT_GATEWAY_SIDECAR_CONNECT_WAIT_MS] (default ${DEFAULT_CONNECT_WAIT_MS})`)
  .option('--port-file <file>', 'write the listening port to this file once the proxy listens (for scripts) [env AGENT_GATEWAY_SIDECAR_PORT_FILE]')
  .option('--health-port <port>', 'serve /healthz and /readyz (gateway session up and TPM answering) on this loopback port; 0 picks one [env AGENT_GATEWAY_SIDECAR_HEALTH_PORT] (default: off)')
  .addHelpText(
    'after',
    `
Other environment:
  TPM2_PKCS11_STORE                  tpm2-pkcs11 store directory (token metadata)
  AGENT_GATEWAY_SIDECAR_LOG, RUST_LOG  log filter, e.g. info, debug, agent_gateway_sidecar=debug (default info)
  AGENT_GATEWAY_LOG_STDOUT=false     write no log lines (logs go to stderr; stdout has only the JSON line)

Exit status: 0 after SIGINT/SIGTERM, 1 on a runtime failure (TPM, PIN, listener), 2 on bad flags or settings.`,
  )
  .showHelpAfterError(`(run ${NAME} --help for every flag)`)
  .exitOverride();

try {
  program.parse(process.argv);
} catch (error) {
  // Commander has printed its message (or the help) already.
  process.exit(error instanceof CommanderError && error.exitCode === 0 ? 0 : EXIT_USAGE);
}

let loaded;
try {
  loaded = loadSidecarConfig(program.opts<SidecarCliOptions>());
} catch (error) {
  fail(error, EXIT_USAGE);
}
const { config, warnings } = loaded;
const log = createSidecarLogger({ level: config.logLevel, quiet: config.logQuiet });
for (const warning of warnings) log.warn({ event: 'config_warning' }, warning);

// Signal handlers go in before anything touches the TPM: a supervisor (or a test) may send
// SIGTERM the moment the port line appears, or while the key is being loaded, and the default
// action would kill the process without finalising PKCS#11. Without a resource manager
// (a bare swtpm TCTI) the TPM sessions of a killed process leak until the TPM runs out of them.
let identityLoading: Promise<TlsIdentity> | undefined;
let sidecarStarting: Promise<Sidecar> | undefined;
let stopping = false;
/** Start-up steps park here once a signal arrived; stop() exits the process (the timer keeps
 * the event loop alive meanwhile, or Node would end on an unsettled top-level await). */
const parked = new Promise<never>(() => setInterval(() => {}, 60_000));

async function stop(signal: NodeJS.Signals): Promise<void> {
  if (stopping) return;
  stopping = true;
  log.info({ event: 'shutdown', signal }, 'shutting down');
  // A wedged close must not keep the process (and its TPM sessions) around forever.
  setTimeout(() => {
    log.error({ event: 'shutdown_timeout' }, 'shutdown took too long; exiting');
    process.exit(EXIT_RUNTIME);
  }, 10_000).unref();
  // A step still running finishes first, so whatever it opened is closed below.
  const running = await sidecarStarting?.catch(() => undefined);
  try {
    await running?.close(); // stops accepting, ends agent connections, closes the gateway session
  } catch (error) {
    log.warn({ err: (error as Error).message }, 'closing the sidecar failed');
  }
  const loaded = await identityLoading?.catch(() => undefined);
  loaded?.close(); // finalises PKCS#11: tpm2-pkcs11 flushes its TPM sessions and objects
  if (running && config.portFile !== undefined) removePortFile(config.portFile, running.port);
  log.info({ event: 'stopped' }, 'stopped');
  process.exit(0);
}
process.on('SIGINT', (signal) => void stop(signal));
process.on('SIGTERM', (signal) => void stop(signal));

function writePortFile(file: string, port: number): void {
  // Atomic, so a script polling for the file never reads it half-written.
  const temporary = `${file}.tmp-${process.pid}`;
  writeFileSync(temporary, `${port}\n`);
  renameSync(temporary, file);
}

function removePortFile(file: string, port: number): void {
  try {
    // Another sidecar may have taken the file over since; only remove our own.
    if (readFileSync(file, 'utf8').trim() === String(port)) rmSync(file, { force: true });
  } catch {
    // gone already
  }
}

let identity: TlsIdentity;
try {
  identityLoading = loadTlsIdentity({
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
  identity = await identityLoading;
} catch (error) {
  if (stopping) await parked;
  fail(error);
}
if (stopping) await parked;

let sidecar: Sidecar;
try {
  sidecarStarting = startSidecar({
    gatewayUrl: config.gatewayUrl,
    secureContext: identity.secureContext,
    ...(config.servername !== undefined ? { servername: config.servername } : {}),
    listenHosts: config.listenHosts,
    listenPort: config.listenPort,
    connectWaitMs: config.connectWaitMs,
    streamWindowBytes: config.streamWindowBytes,
    sessionWindowBytes: config.sessionWindowBytes,
    logger: log,
    // OTLP export only when OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise no SDK is loaded.
    tracing: await startSidecarTracing({ log }),
  });
  sidecar = await sidecarStarting;
} catch (error) {
  if (stopping) await parked;
  identity.close();
  const code = (error as NodeJS.ErrnoException).code;
  fail(new AgentGatewayError('ERR_LISTEN', `cannot listen on ${config.listenHosts.join(', ')} port ${config.listenPort}: ${code ?? (error as Error).message}`, { cause: error }));
}
if (stopping) await parked;

if (config.portFile !== undefined) {
  try {
    writePortFile(config.portFile, sidecar.port);
  } catch (error) {
    await sidecar.close();
    identity.close();
    fail(new AgentGatewayError('ERR_PORT_FILE', `cannot write --port-file ${config.portFile}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`));
  }
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
    healthPort = health.port;
  } catch (error) {
    await sidecar.close();
    identity.close();
    fail(new AgentGatewayError('ERR_LISTEN', `cannot serve --health-port ${config.healthPort}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`));
  }
}

// The one line on stdout: scripts read the port (and what the gateway will see) from here.
process.stdout.write(
  `${JSON.stringify({
    event: 'sidecar_listening',
    port: sidecar.port,
    proxy_url: `http://${config.listenHosts[0]!.includes(':') ? `[${config.listenHosts[0]}]` : config.listenHosts[0]}:${sidecar.port}`,
    hosts: config.listenHosts,
    gateway: config.gatewayUrl,
    identity: identity.identity,
    spki_fingerprint: identity.spkiFingerprint,
    cert: identity.certPath,
    ...(healthPort !== undefined ? { health_port: healthPort } : {}),
  })}\n`,
);
