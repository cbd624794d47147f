import { readFileSync, statSync } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import { Command, Option } from 'commander';
import ipaddr from 'ipaddr.js';
import { z } from 'zod';
import { AGENT_KEY } from '../../core/agent-key.js';
import { DEFAULT_PKCS11_ENGINE, DEFAULT_TPM2_PKCS11_MODULE } from '../../core/platform.js';
import { ConfigError } from '../../registry/errors.js';
import { MAX_WINDOW_BYTES, SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../../registry/flow-control.js';
import { encodeIdentityExtensionValue, isDottedOid } from '../../registry/identity.js';
import { parseLogFilter } from './logger.js';

/**
 * The sidecar's settings, from command-line flags and environment variables (a flag wins over
 * its variable). SIDECAR_OPTIONS is the one description of every setting: the commander options,
 * the --help text, the environment variables read and the names in error messages are all
 * generated from it. The zod schema below is the only source of the type, of the checks and of
 * the defaults; failures become one ConfigError that names the flag and the variable of each bad
 * field.
 *
 * PINs come from the environment or from files, never from flag values, which would show in
 * `ps` and in shell history.
 */

export interface OptionSpec {
  /** The long flag; absent for settings taken from the environment only. */
  readonly flag?: string;
  /** The flag's value placeholder, e.g. `<url>`. */
  readonly arg?: string;
  /** Variables read when the flag is absent, first set one wins. */
  readonly env: readonly string[];
  readonly help: string;
  /** The flag may be given several times (the variable is then a comma list). */
  readonly repeatable?: boolean;
  /** The flag names a file holding the value; the variable holds the value itself (PINs). */
  readonly secretFile?: boolean;
}

export const SIDECAR_OPTIONS = {
  configFile: { flag: '--config', arg: '<file>', env: ['AGENT_GATEWAY_SIDECAR_CONFIG'], help: 'TOML file of settings: the flags\' names without -- in snake_case (key_label = "..."); flags and variables win over it; SIGHUP re-reads it (sidecar/src/rotation.ts)' },
  gatewayUrl: { flag: '--gateway', arg: '<url>', env: ['AGENT_GATEWAY_URL'], help: 'gateway URL' },
  gatewayCaPem: { flag: '--gateway-ca', arg: '<file>', env: ['AGENT_GATEWAY_CA'], help: 'PEM CA certificates that verify the gateway (default: system roots)' },
  servername: { flag: '--servername', arg: '<name>', env: ['AGENT_GATEWAY_SERVERNAME'], help: 'TLS server name to verify, when the URL host differs' },
  listenPort: { flag: '--listen-port', arg: '<port>', env: ['AGENT_GATEWAY_SIDECAR_PORT'], help: 'local proxy port; 0 picks a free one' },
  listenHosts: { flag: '--listen-host', arg: '<ip>', env: ['AGENT_GATEWAY_SIDECAR_HOSTS'], help: 'loopback address to listen on, repeatable (variable: comma list)', repeatable: true },
  listenSocket: { flag: '--listen-socket', arg: '<path>', env: ['AGENT_GATEWAY_SIDECAR_SOCKET'], help: 'also listen on this Unix socket (mode 0600, owned by this user): the way out of `run`, for isolated agents (default: off)' },
  identity: { flag: '--identity', arg: '<id>', env: ['AGENT_GATEWAY_IDENTITY'], help: 'identity carried in the certificate extension; required' },
  extensionOid: { flag: '--ext-oid', arg: '<oid>', env: ['AGENT_GATEWAY_CLIENT_EXT_OID'], help: 'identity extension OID' },
  tokenLabel: { flag: '--token-label', arg: '<label>', env: [AGENT_KEY.tokenVariable], help: 'tpm2-pkcs11 token label' },
  keyLabel: { flag: '--key-label', arg: '<label>', env: [AGENT_KEY.keyVariable], help: 'label of the TLS key in the token' },
  userPin: { flag: '--user-pin-file', arg: '<file>', env: ['AGENT_GATEWAY_TPM_USER_PIN'], help: 'file holding the token user PIN (the variable holds the PIN itself)', secretFile: true },
  soPin: { flag: '--so-pin-file', arg: '<file>', env: ['AGENT_GATEWAY_TPM_SO_PIN'], help: 'file holding the token SO PIN, needed only to create the token (the variable holds the PIN itself)', secretFile: true },
  tcti: { flag: '--tcti', arg: '<tcti>', env: ['TPM2_PKCS11_TCTI'], help: 'how tpm2-pkcs11 reaches the TPM' },
  storeDir: { env: ['TPM2_PKCS11_STORE'], help: 'tpm2-pkcs11 store directory (token metadata)' },
  pkcs11Module: { flag: '--pkcs11-module', arg: '<file>', env: ['PKCS11_MODULE_PATH'], help: 'tpm2-pkcs11 module' },
  pkcs11Engine: { flag: '--pkcs11-engine', arg: '<file>', env: ['AGENT_GATEWAY_PKCS11_ENGINE'], help: 'libp11 OpenSSL engine, full path' },
  certOut: { flag: '--cert-out', arg: '<file>', env: ['AGENT_GATEWAY_SIDECAR_CERT_OUT'], help: 'where to write the carrier certificate; the port this sidecar took is kept beside it (sidecar-listen-port) and taken again on restart when free' },
  streamWindowBytes: { flag: '--stream-window-bytes', arg: '<n>', env: ['AGENT_GATEWAY_SIDECAR_STREAM_WINDOW_BYTES'], help: 'HTTP/2 stream receive window toward the gateway (downloads)' },
  sessionWindowBytes: { flag: '--session-window-bytes', arg: '<n>', env: ['AGENT_GATEWAY_SIDECAR_SESSION_WINDOW_BYTES'], help: 'HTTP/2 session receive window toward the gateway' },
  connectWaitMs: { flag: '--connect-wait-ms', arg: '<ms>', env: ['AGENT_GATEWAY_SIDECAR_CONNECT_WAIT_MS'], help: 'how long a CONNECT waits for the gateway session before 503' },
  nextKeyLabel: { flag: '--next-key-label', arg: '<label>', env: ['AGENT_GATEWAY_SIDECAR_NEXT_TPM_KEY'], help: 'key rotation, step 1: generate this key in the token (if missing) and write its carrier certificate to --next-cert-out, while the sidecar keeps using --key-label' },
  nextCertOut: { flag: '--next-cert-out', arg: '<file>', env: ['AGENT_GATEWAY_SIDECAR_NEXT_CERT_OUT'], help: 'where to write the next key\'s carrier certificate (default: --cert-out with .next.pem)' },
  drainTimeoutMs: { flag: '--drain-timeout-ms', arg: '<ms>', env: ['AGENT_GATEWAY_SIDECAR_DRAIN_TIMEOUT_MS'], help: 'after a key rotation, how long the old key\'s session keeps its open tunnels before they are cut' },
  portFile: { flag: '--port-file', arg: '<file>', env: ['AGENT_GATEWAY_SIDECAR_PORT_FILE'], help: 'write the listening port to this file once the proxy listens (for scripts)' },
  healthPort: { flag: '--health-port', arg: '<port>', env: ['AGENT_GATEWAY_SIDECAR_HEALTH_PORT'], help: 'serve /healthz and /readyz (gateway session up and TPM answering) on this loopback port; 0 picks one (default: off)' },
  logLevel: { env: ['AGENT_GATEWAY_SIDECAR_LOG', 'RUST_LOG'], help: 'log filter, e.g. info, debug, agent_gateway_sidecar=debug' },
  logQuiet: { env: ['AGENT_GATEWAY_LOG_STDOUT'], help: 'false: write no log lines (logs go to stderr; stdout has only the JSON line)' },
} as const satisfies Record<string, OptionSpec>;

export type Field = keyof typeof SIDECAR_OPTIONS;

/** What commander hands over, keyed by field: strings as typed, before any validation. */
export type SidecarCliValues = Partial<Record<Field, string | readonly string[]>>;

function describeField(field: Field): string {
  const spec: OptionSpec = SIDECAR_OPTIONS[field];
  return [spec.flag, ...spec.env].filter(Boolean).join(' / ');
}

const wholeNumber = (min: number, max: number) =>
  z
    .string()
    .trim()
    .regex(/^(0|[1-9][0-9]*)$/, 'must be a whole number')
    .transform(Number)
    .pipe(z.number().min(min, `must be ${min}-${max}`).max(max, `must be ${min}-${max}`));

const DEFAULT_GATEWAY_URL = 'https://127.0.0.1:8443';

const gatewayUrl = z.string().transform((value, ctx) => {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    ctx.addIssue({ code: 'custom', message: `is not a URL (expected https://host:port, e.g. ${DEFAULT_GATEWAY_URL})` });
    return z.NEVER;
  }
  if (url.protocol !== 'https:') ctx.addIssue({ code: 'custom', message: `must be an https:// URL (the gateway only speaks HTTP/2 over mTLS), not ${url.protocol}//` });
  if (url.username || url.password) ctx.addIssue({ code: 'custom', message: 'must not contain credentials' });
  if ((url.pathname !== '/' && url.pathname !== '') || url.search || url.hash) ctx.addIssue({ code: 'custom', message: 'must be https://host:port with no path, query or fragment' });
  return url.origin;
});

const loopbackHost = z.string().superRefine((value, ctx) => {
  if (!ipaddr.isValid(value)) {
    ctx.addIssue({ code: 'custom', message: `"${value}" is not an IP address (use 127.0.0.1 and/or ::1)` });
    return;
  }
  // The proxy lends the TPM identity to whoever connects: only this machine may.
  if (ipaddr.process(value).range() !== 'loopback') ctx.addIssue({ code: 'custom', message: `"${value}" is not a loopback address: the proxy would lend the TPM identity to the network` });
});

const pkcs11Label = z
  .string()
  .min(1, 'must not be empty')
  .refine((value) => Buffer.byteLength(value, 'utf8') <= 32, 'must be at most 32 bytes (a PKCS#11 label)')
  .refine((value) => !/[\u0000-\u001f\u007f]/.test(value) && value === value.trim(), 'must not contain control characters or leading/trailing spaces');

const path = z.string().min(1, 'must not be empty');

/** A PEM file's text, read here so a missing or wrong file is a config error naming the field. */
const pemFile = path.transform((file, ctx) => {
  let pem: string;
  try {
    pem = readFileSync(file, 'utf8');
  } catch (error) {
    ctx.addIssue({ code: 'custom', message: `cannot read ${file} (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})` });
    return z.NEVER;
  }
  if (!pem.includes('-----BEGIN CERTIFICATE-----')) ctx.addIssue({ code: 'custom', message: `${file} holds no PEM certificate` });
  return pem;
});

const configSchema = z.strictObject({
  configFile: path.transform((value) => resolvePath(value)).optional(),
  gatewayUrl: gatewayUrl.prefault(DEFAULT_GATEWAY_URL),
  gatewayCaPem: pemFile.optional(),
  servername: z
    .string()
    .regex(/^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/, 'must be a DNS name')
    .optional(),
  listenPort: wholeNumber(0, 65535).prefault('0'),
  /** Node clients may try ::1 first for `localhost`. */
  listenSocket: path
    .refine((value) => Buffer.byteLength(resolvePath(value)) <= 107, 'must be at most 107 bytes as an absolute path (sun_path)')
    .transform((value) => resolvePath(value))
    .optional(),
  listenHosts: z.array(loopbackHost).min(1, 'needs at least one address').prefault(['127.0.0.1', '::1']),
  identity: z.string().superRefine((value, ctx) => {
    try {
      encodeIdentityExtensionValue(value);
    } catch (error) {
      ctx.addIssue({ code: 'custom', message: (error as Error).message });
    }
  }),
  extensionOid: z.string().refine(isDottedOid, 'must be a dotted OID such as 1.3.6.1.4.1.57264.1.1').prefault('1.3.6.1.4.1.57264.1.1'),
  tokenLabel: pkcs11Label.prefault(AGENT_KEY.tokenLabel),
  keyLabel: pkcs11Label.prefault(AGENT_KEY.keyLabel),
  // Never echo a PIN, not even in a validation message.
  userPin: z.string({ error: 'is required: set AGENT_GATEWAY_TPM_USER_PIN or pass --user-pin-file FILE' }).min(1, 'must not be empty'),
  soPin: z.string().min(1, 'must not be empty').optional(),
  /** The spec's simulator address; with tpm2-abrmd in front use `tabrmd:bus_type=session`. */
  tcti: z.string().min(1, 'must not be empty').regex(/^[^\r\n\0]*$/, 'must be one line').prefault('swtpm:host=127.0.0.1,port=2321'),
  storeDir: path.optional(),
  pkcs11Module: path.prefault(DEFAULT_TPM2_PKCS11_MODULE),
  pkcs11Engine: path.prefault(DEFAULT_PKCS11_ENGINE),
  certOut: path.transform((value) => resolvePath(value)).prefault('machine-client.pem'),
  /** HTTP/2 receive windows toward the gateway (downloads); bounded like the gateway's. */
  streamWindowBytes: wholeNumber(65_535, MAX_WINDOW_BYTES).prefault(String(STREAM_WINDOW_BYTES)),
  sessionWindowBytes: wholeNumber(65_535, MAX_WINDOW_BYTES).prefault(String(SESSION_WINDOW_BYTES)),
  connectWaitMs: wholeNumber(1, 600_000).prefault('5000'),
  nextKeyLabel: pkcs11Label.optional(),
  nextCertOut: path.transform((value) => resolvePath(value)).optional(),
  /** 5 minutes: the gateway's default idle timeout, long enough for a large download to finish. */
  drainTimeoutMs: wholeNumber(1000, 86_400_000).prefault('300000'),
  portFile: path.transform((value) => resolvePath(value)).optional(),
  healthPort: wholeNumber(0, 65535).optional(),
  logLevel: z
    .string()
    .transform((value, ctx) => {
      try {
        return parseLogFilter(value);
      } catch (error) {
        ctx.addIssue({ code: 'custom', message: (error as Error).message });
        return z.NEVER;
      }
    })
    .prefault('info'),
  logQuiet: z
    .string()
    .transform((value) => /^(false|0|no|off)$/i.test(value.trim()))
    .prefault('true'),
});

export type SidecarConfig = z.output<typeof configSchema>;

/** The default of a field as typed on the command line, from the schema (for --help). */
function defaultOf(field: Field): string | undefined {
  const def = (configSchema.shape[field] as unknown as { _zod: { def: { type: string; defaultValue?: unknown } } })._zod.def;
  if (def.type !== 'prefault' && def.type !== 'default') return undefined;
  return Array.isArray(def.defaultValue) ? def.defaultValue.join(', ') : String(def.defaultValue);
}

/** One line of --help for a field: what it is, its variables and its default. */
function helpOf(field: Field): string {
  const spec: OptionSpec = SIDECAR_OPTIONS[field];
  const fallback = defaultOf(field);
  return `${spec.help}${spec.env.length > 0 ? ` [env ${spec.env.join(', ')}]` : ''}${fallback !== undefined ? ` (default ${fallback})` : ''}`;
}

const collect = (value: string, previous: string[] | undefined) => [...(previous ?? []), value];

/**
 * Adds one commander option per flagged field, each stored under the field's own name, and
 * lists the environment-only settings after the help.
 */
export function addSidecarOptions(command: Command): Command {
  const envOnly: string[] = [];
  for (const [field, spec] of Object.entries(SIDECAR_OPTIONS) as [Field, OptionSpec][]) {
    if (spec.flag === undefined) {
      envOnly.push(`  ${spec.env.join(', ').padEnd(42)} ${helpOf(field)}`.replace(/ \[env [^\]]*\]/, ''));
      continue;
    }
    const option = new Option(`${spec.flag} ${spec.arg ?? '<value>'}`, helpOf(field));
    if (spec.repeatable) option.argParser(collect);
    command.addOption(option);
  }
  return command.addHelpText('after', `\nOther environment:\n${envOnly.join('\n')}`);
}

/** The values commander parsed, keyed by field (commander names them after the flag). */
export function cliValues(command: Command): SidecarCliValues {
  const parsed = command.opts<Record<string, string | string[] | undefined>>();
  const values: Record<string, string | readonly string[]> = {};
  for (const [field, spec] of Object.entries(SIDECAR_OPTIONS) as [Field, OptionSpec][]) {
    if (spec.flag === undefined) continue;
    const value = parsed[new Option(spec.flag).attributeName()];
    if (value !== undefined) values[field] = value;
  }
  return values;
}

export interface LoadedConfig {
  readonly config: SidecarConfig;
  /** Things worth a log line once the logger exists (e.g. a world-readable PIN file). */
  readonly warnings: readonly string[];
}

function readSecretFile(flag: string, file: string, warnings: string[]): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
    const mode = statSync(file).mode;
    if (mode & 0o077) warnings.push(`${flag} ${file} is readable by other users (mode ${(mode & 0o777).toString(8)}); chmod 600 it`);
  } catch (error) {
    throw new ConfigError(`invalid configuration\n  ${flag}: cannot read ${file} (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`);
  }
  // Files written by `echo` or editors end with a newline that is not part of the PIN.
  const pin = text.replace(/\r?\n$/, '');
  if (pin.length === 0) throw new ConfigError(`invalid configuration\n  ${flag}: ${file} is empty`);
  if (/[\r\n]/.test(pin)) throw new ConfigError(`invalid configuration\n  ${flag}: ${file} must hold the PIN on one line`);
  return pin;
}

/**
 * Builds and validates the configuration. Throws ConfigError (exit status 2) whose message lists
 * each bad field with its flag and environment variable.
 */
export function loadSidecarConfig(cli: SidecarCliValues, env: NodeJS.ProcessEnv = process.env): LoadedConfig {
  const warnings: string[] = [];
  const raw: Record<string, string | string[] | undefined> = {};
  for (const [field, spec] of Object.entries(SIDECAR_OPTIONS) as [Field, OptionSpec][]) {
    const flagValue = cli[field];
    if (flagValue !== undefined && !(Array.isArray(flagValue) && flagValue.length === 0)) {
      raw[field] = spec.secretFile ? readSecretFile(spec.flag!, String(flagValue), warnings) : typeof flagValue === 'string' ? flagValue : [...flagValue];
      continue;
    }
    const fromEnv = spec.env.map((name) => env[name]).find((value) => value !== undefined && value !== '');
    if (fromEnv === undefined) continue;
    raw[field] = spec.repeatable ? fromEnv.split(',').map((item) => item.trim()).filter(Boolean) : fromEnv;
  }
  const result = configSchema.safeParse(raw);
  if (!result.success) {
    const lines = result.error.issues.map((issue) => {
      const field = issue.path[0] as Field | undefined;
      const known = field !== undefined && field in SIDECAR_OPTIONS;
      const label = known ? describeField(field) : issue.path.join('.') || 'configuration';
      const spec: OptionSpec | undefined = known ? SIDECAR_OPTIONS[field] : undefined;
      const missing = known && raw[field] === undefined && issue.code === 'invalid_type';
      const message = missing && spec && !spec.secretFile ? `is required: pass ${spec.flag} or set ${spec.env[0]}` : issue.message;
      return `  ${label}: ${message}`;
    });
    throw new ConfigError(`invalid configuration\n${[...new Set(lines)].join('\n')}`);
  }
  return { config: result.data, warnings };
}
