import { readOptionFile } from './arguments.js';
import { UsageError } from './errors.js';

/**
 * Where the CLI's secrets and defaults come from. Secrets are read from the environment or from
 * files, never from argument values (which end up in shell history and `ps`).
 */

export const DATABASE_URL_VARIABLES = ['AGENT_GATEWAY_DATABASE_URL', 'DATABASE_URL'] as const;
export const DEFAULT_TOKEN_LABEL = 'agent-gateway-principal';
/** The spec's identity extension OID (the gateway's `policy.client_ext_oid` in the demo). */
export const DEFAULT_IDENTITY_OID = '1.3.6.1.4.1.57264.1.1';
export const TOKEN_LABEL_VARIABLE = 'AGENT_GATEWAY_TPM_TOKEN';
export const USER_PIN_VARIABLE = 'AGENT_GATEWAY_TPM_USER_PIN';
export const SO_PIN_VARIABLE = 'AGENT_GATEWAY_TPM_SO_PIN';
export const PRINCIPAL_KEY_ID_VARIABLE = 'AGENT_GATEWAY_PRINCIPAL_KEY_ID';
/** The configured EK CA bundle, when --ek-ca is not given. */
export const EK_CA_VARIABLE = 'AGENT_GATEWAY_EK_CA_FILE';

const VARIABLE_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

export interface DatabaseTarget {
  readonly url: string;
  /** Which variable it came from, for messages. */
  readonly variable: string;
}

/** The registry URL from `--database-url-env NAME`, else AGENT_GATEWAY_DATABASE_URL, else DATABASE_URL. */
export function databaseTarget(env: NodeJS.ProcessEnv, variableOption?: string): DatabaseTarget {
  if (variableOption !== undefined) {
    if (!VARIABLE_NAME.test(variableOption)) throw new UsageError(`--database-url-env must name an environment variable, not ${JSON.stringify(variableOption)}`);
    const url = env[variableOption];
    if (!url) throw new UsageError(`environment variable ${variableOption} (from --database-url-env) is not set`);
    return checkUrl({ url, variable: variableOption });
  }
  for (const variable of DATABASE_URL_VARIABLES) {
    const url = env[variable];
    if (url) return checkUrl({ url, variable });
  }
  throw new UsageError(`no registry database: set ${DATABASE_URL_VARIABLES.join(' or ')} (or name another variable with --database-url-env)`);
}

function checkUrl(target: DatabaseTarget): DatabaseTarget {
  let parsed: URL;
  try {
    parsed = new URL(target.url);
  } catch {
    throw new UsageError(`${target.variable} is not a URL (expected postgres://user:password@host:port/database)`);
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') {
    throw new UsageError(`${target.variable} must be a postgres:// or postgresql:// URL, not ${parsed.protocol}//`);
  }
  return target;
}

/**
 * `scheme://user:password@` and `password=...` / `sslpassword=...` (URL query or libpq keyword
 * form) with the password replaced by `redacted`, wherever they occur in a text: for error
 * messages that quote a connection string. The password runs to the authority's last `@`, as URL
 * parsers read it.
 */
export function redactUrlPasswords(text: string): string {
  return text
    .replace(/(\b[A-Za-z][A-Za-z0-9+.-]*:\/\/[^\s/?#@:]*:)[^\s/?#]*@/g, '$1redacted@')
    .replace(/(\b(?:ssl)?password=)(?!redacted\b)[^\s&#]+/gi, '$1redacted');
}

function readSecretFile(option: string, path: string): string {
  // Files written by `echo` or editors end with a newline that is not part of the PIN.
  const pin = readOptionFile(option, path).toString('utf8').replace(/\r?\n$/, '');
  if (pin.length === 0) throw new UsageError(`${option} ${path} is empty`);
  return pin;
}

export interface PinSources {
  readonly userPinFile?: string;
  readonly soPinFile?: string;
}

export interface Pins {
  readonly userPin: string;
  /** Only needed to create the token. */
  readonly soPin: string | undefined;
}

/** PINs from `--user-pin-file`/`--so-pin-file` (preferred when given) or the environment. */
export function readPins(env: NodeJS.ProcessEnv, sources: PinSources): Pins {
  const userPin = sources.userPinFile !== undefined ? readSecretFile('--user-pin-file', sources.userPinFile) : env[USER_PIN_VARIABLE];
  if (!userPin) throw new UsageError(`no TPM user PIN: set ${USER_PIN_VARIABLE} or pass --user-pin-file FILE`);
  const soPin = sources.soPinFile !== undefined ? readSecretFile('--so-pin-file', sources.soPinFile) : env[SO_PIN_VARIABLE] || undefined;
  return { userPin, soPin };
}

export function tokenLabel(env: NodeJS.ProcessEnv, option?: string): string {
  return option ?? (env[TOKEN_LABEL_VARIABLE] || DEFAULT_TOKEN_LABEL);
}

export function principalKeyId(env: NodeJS.ProcessEnv, option?: string): string {
  const keyId = option ?? env[PRINCIPAL_KEY_ID_VARIABLE];
  if (!keyId) throw new UsageError(`no principal key: pass --principal KEY_ID or set ${PRINCIPAL_KEY_ID_VARIABLE}`);
  return keyId;
}
