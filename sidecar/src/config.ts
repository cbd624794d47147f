import { readFileSync, statSync } from 'node:fs';
import { resolve as resolvePath } from 'node:path';
import ipaddr from 'ipaddr.js';
import { z } from 'zod';
import { ConfigError } from '../../registry/errors.js';
import { MAX_WINDOW_BYTES, SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../../registry/flow-control.js';
import { encodeIdentityExtensionValue, isDottedOid } from '../../registry/identity.js';
import { parseLogFilter } from './logger.js';
import { DEFAULT_PKCS11_ENGINE, DEFAULT_TPM2_PKCS11_MODULE } from './tls-identity.js';

/**
 * The sidecar's settings, from command-line flags and environment variables (a flag wins over
 * its variable). One zod schema is the only source of the type and of the checks; failures
 * become one ConfigError that names the flag and the variable of each bad field.
 *
 * PINs come from the environment or from files, never from flag values, which would show in
 * `ps` and in shell history.
 */

export const DEFAULT_GATEWAY_URL = 'https://127.0.0.1:8443';
export const DEFAULT_EXTENSION_OID = '1.3.6.1.4.1.57264.1.1';
export const DEFAULT_TOKEN_LABEL = 'agent-gateway-sidecar';
export const DEFAULT_KEY_LABEL = 'agent-tls';
/** The spec's simulator address; with tpm2-abrmd in front use `tabrmd:bus_type=session`. */
export const DEFAULT_TCTI = 'swtpm:host=127.0.0.1,port=2321';
export const DEFAULT_LISTEN_HOSTS = ['127.0.0.1', '::1'] as const;
export const DEFAULT_CERT_OUT = 'machine-client.pem';
export const DEFAULT_CONNECT_WAIT_MS = 5000;

/** What commander hands over: strings as typed, before any validation. */
export interface SidecarCliOptions {
  readonly gateway?: string;
  readonly gatewayCa?: string;
  readonly servername?: string;
  readonly listenPort?: string;
  readonly listenHost?: readonly string[];
  readonly identity?: string;
  readonly extOid?: string;
  readonly tokenLabel?: string;
  readonly keyLabel?: string;
  readonly userPinFile?: string;
  readonly soPinFile?: string;
  readonly tcti?: string;
  readonly pkcs11Module?: string;
  readonly pkcs11Engine?: string;
  readonly certOut?: string;
  readonly connectWaitMs?: string;
  readonly streamWindowBytes?: string;
  readonly sessionWindowBytes?: string;
  readonly portFile?: string;
  readonly healthPort?: string;
}

interface FieldSource {
  readonly flag?: string;
  readonly env?: readonly string[];
}

/** Where each field can come from; error messages and the README are written from this table. */
export const FIELD_SOURCES = {
  gatewayUrl: { flag: '--gateway', env: ['AGENT_GATEWAY_URL'] },
  gatewayCaPem: { flag: '--gateway-ca', env: ['AGENT_GATEWAY_CA'] },
  servername: { flag: '--servername', env: ['AGENT_GATEWAY_SERVERNAME'] },
  listenPort: { flag: '--listen-port', env: ['AGENT_GATEWAY_SIDECAR_PORT'] },
  listenHosts: { flag: '--listen-host', env: ['AGENT_GATEWAY_SIDECAR_HOSTS'] },
  identity: { flag: '--identity', env: ['AGENT_GATEWAY_IDENTITY'] },
  extensionOid: { flag: '--ext-oid', env: ['AGENT_GATEWAY_CLIENT_EXT_OID'] },
  tokenLabel: { flag: '--token-label', env: ['AGENT_GATEWAY_SIDECAR_TPM_TOKEN'] },
  keyLabel: { flag: '--key-label', env: ['AGENT_GATEWAY_SIDECAR_TPM_KEY'] },
  userPin: { flag: '--user-pin-file', env: ['AGENT_GATEWAY_TPM_USER_PIN'] },
  soPin: { flag: '--so-pin-file', env: ['AGENT_GATEWAY_TPM_SO_PIN'] },
  tcti: { flag: '--tcti', env: ['TPM2_PKCS11_TCTI'] },
  storeDir: { env: ['TPM2_PKCS11_STORE'] },
  pkcs11Module: { flag: '--pkcs11-module', env: ['PKCS11_MODULE_PATH'] },
  pkcs11Engine: { flag: '--pkcs11-engine', env: ['AGENT_GATEWAY_PKCS11_ENGINE'] },
  certOut: { flag: '--cert-out', env: ['AGENT_GATEWAY_SIDECAR_CERT_OUT'] },
  connectWaitMs: { flag: '--connect-wait-ms', env: ['AGENT_GATEWAY_SIDECAR_CONNECT_WAIT_MS'] },
  streamWindowBytes: { flag: '--stream-window-bytes', env: ['AGENT_GATEWAY_SIDECAR_STREAM_WINDOW_BYTES'] },
  sessionWindowBytes: { flag: '--session-window-bytes', env: ['AGENT_GATEWAY_SIDECAR_SESSION_WINDOW_BYTES'] },
  portFile: { flag: '--port-file', env: ['AGENT_GATEWAY_SIDECAR_PORT_FILE'] },
  healthPort: { flag: '--health-port', env: ['AGENT_GATEWAY_SIDECAR_HEALTH_PORT'] },
  logLevel: { env: ['AGENT_GATEWAY_SIDECAR_LOG', 'RUST_LOG'] },
  logQuiet: { env: ['AGENT_GATEWAY_LOG_STDOUT'] },
} as const satisfies Record<string, FieldSource>;

type Field = keyof typeof FIELD_SOURCES;

function describeField(field: Field): string {
  const source: FieldSource = FIELD_SOURCES[field];
  return [source.flag, ...(source.env ?? [])].filter(Boolean).join(' / ');
}

const wholeNumber = (min: number, max: number) =>
  z
    .string()
    .trim()
    .regex(/^(0|[1-9][0-9]*)$/, 'must be a whole number')
    .transform(Number)
    .pipe(z.number().min(min, `must be ${min}-${max}`).max(max, `must be ${min}-${max}`));

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

const configSchema = z.strictObject({
  gatewayUrl,
  gatewayCaPem: z.string().optional(),
  servername: z
    .string()
    .regex(/^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/, 'must be a DNS name')
    .optional(),
  listenPort: wholeNumber(0, 65535),
  listenHosts: z.array(loopbackHost).min(1, 'needs at least one address'),
  identity: z.string().superRefine((value, ctx) => {
    try {
      encodeIdentityExtensionValue(value);
    } catch (error) {
      ctx.addIssue({ code: 'custom', message: (error as Error).message });
    }
  }),
  extensionOid: z.string().refine(isDottedOid, 'must be a dotted OID such as 1.3.6.1.4.1.57264.1.1'),
  tokenLabel: pkcs11Label,
  keyLabel: pkcs11Label,
  // Never echo a PIN, not even in a validation message.
  userPin: z.string({ error: 'is required: set AGENT_GATEWAY_TPM_USER_PIN or pass --user-pin-file FILE' }).min(1, 'must not be empty'),
  soPin: z.string().min(1, 'must not be empty').optional(),
  tcti: z.string().min(1, 'must not be empty').regex(/^[^\r\n\0]*$/, 'must be one line'),
  storeDir: path.optional(),
  pkcs11Module: path,
  pkcs11Engine: path,
  certOut: path.transform((value) => resolvePath(value)),
  connectWaitMs: wholeNumber(1, 600_000),
  /** HTTP/2 receive windows toward the gateway (downloads); bounded like the gateway's. */
  streamWindowBytes: wholeNumber(65_535, MAX_WINDOW_BYTES),
  sessionWindowBytes: wholeNumber(65_535, MAX_WINDOW_BYTES),
  portFile: path.transform((value) => resolvePath(value)).optional(),
  healthPort: wholeNumber(0, 65535).optional(),
  logLevel: z.string().transform((value, ctx) => {
    try {
      return parseLogFilter(value);
    } catch (error) {
      ctx.addIssue({ code: 'custom', message: (error as Error).message });
      return z.NEVER;
    }
  }),
  logQuiet: z.boolean(),
});

export type SidecarConfig = z.output<typeof configSchema>;

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

function readCaFile(file: string): string {
  let pem: string;
  try {
    pem = readFileSync(file, 'utf8');
  } catch (error) {
    throw new ConfigError(`invalid configuration\n  ${describeField('gatewayCaPem')}: cannot read ${file} (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`);
  }
  if (!pem.includes('-----BEGIN CERTIFICATE-----')) throw new ConfigError(`invalid configuration\n  ${describeField('gatewayCaPem')}: ${file} holds no PEM certificate`);
  return pem;
}

/**
 * Builds and validates the configuration. Throws ConfigError (exit status 2 in main.ts) whose
 * message lists each bad field with its flag and environment variable.
 */
export function loadSidecarConfig(cli: SidecarCliOptions, env: NodeJS.ProcessEnv = process.env): LoadedConfig {
  const warnings: string[] = [];
  const pick = (flagValue: string | undefined, field: Field): string | undefined => {
    if (flagValue !== undefined) return flagValue;
    const source: FieldSource = FIELD_SOURCES[field];
    for (const name of source.env ?? []) {
      const value = env[name];
      if (value !== undefined && value !== '') return value;
    }
    return undefined;
  };
  const caFile = pick(cli.gatewayCa, 'gatewayCaPem');
  const hostsFromEnv = pick(undefined, 'listenHosts');
  const userPin = cli.userPinFile !== undefined ? readSecretFile('--user-pin-file', cli.userPinFile, warnings) : env.AGENT_GATEWAY_TPM_USER_PIN || undefined;
  const soPin = cli.soPinFile !== undefined ? readSecretFile('--so-pin-file', cli.soPinFile, warnings) : env.AGENT_GATEWAY_TPM_SO_PIN || undefined;
  const quietValue = env.AGENT_GATEWAY_LOG_STDOUT;
  const raw = {
    gatewayUrl: pick(cli.gateway, 'gatewayUrl') ?? DEFAULT_GATEWAY_URL,
    gatewayCaPem: caFile === undefined ? undefined : readCaFile(caFile),
    servername: pick(cli.servername, 'servername'),
    listenPort: pick(cli.listenPort, 'listenPort') ?? '0',
    listenHosts: cli.listenHost && cli.listenHost.length > 0 ? [...cli.listenHost] : hostsFromEnv ? hostsFromEnv.split(',').map((h) => h.trim()).filter(Boolean) : [...DEFAULT_LISTEN_HOSTS],
    identity: pick(cli.identity, 'identity'),
    extensionOid: pick(cli.extOid, 'extensionOid') ?? DEFAULT_EXTENSION_OID,
    tokenLabel: pick(cli.tokenLabel, 'tokenLabel') ?? DEFAULT_TOKEN_LABEL,
    keyLabel: pick(cli.keyLabel, 'keyLabel') ?? DEFAULT_KEY_LABEL,
    userPin,
    soPin,
    tcti: pick(cli.tcti, 'tcti') ?? DEFAULT_TCTI,
    storeDir: pick(undefined, 'storeDir'),
    pkcs11Module: pick(cli.pkcs11Module, 'pkcs11Module') ?? DEFAULT_TPM2_PKCS11_MODULE,
    pkcs11Engine: pick(cli.pkcs11Engine, 'pkcs11Engine') ?? DEFAULT_PKCS11_ENGINE,
    certOut: pick(cli.certOut, 'certOut') ?? DEFAULT_CERT_OUT,
    connectWaitMs: pick(cli.connectWaitMs, 'connectWaitMs') ?? String(DEFAULT_CONNECT_WAIT_MS),
    streamWindowBytes: pick(cli.streamWindowBytes, 'streamWindowBytes') ?? String(STREAM_WINDOW_BYTES),
    sessionWindowBytes: pick(cli.sessionWindowBytes, 'sessionWindowBytes') ?? String(SESSION_WINDOW_BYTES),
    portFile: pick(cli.portFile, 'portFile'),
    healthPort: pick(cli.healthPort, 'healthPort'),
    logLevel: pick(undefined, 'logLevel') ?? 'info',
    logQuiet: quietValue !== undefined && /^(false|0|no|off)$/i.test(quietValue.trim()),
  };
  const result = configSchema.safeParse(raw);
  if (!result.success) {
    const lines = result.error.issues.map((issue) => {
      const field = issue.path[0] as Field | undefined;
      const label = field && field in FIELD_SOURCES ? describeField(field) : issue.path.join('.') || 'configuration';
      const source: FieldSource | undefined = field ? FIELD_SOURCES[field] : undefined;
      const missing = field !== undefined && raw[field] === undefined && issue.code === 'invalid_type';
      const message = missing && source && field !== 'userPin' ? `is required: pass ${source.flag} or set ${source.env?.[0]}` : issue.message;
      return `  ${label}: ${message}`;
    });
    throw new ConfigError(`invalid configuration\n${[...new Set(lines)].join('\n')}`);
  }
  return { config: result.data, warnings };
}
