/**
 * The product's one error catalogue: every error code of the gateway, the sidecar, the registry
 * CLI, the registry model and the TPM layer, with its process exit code, the HTTP status it takes
 * when it surfaces in an answer, and a hint an operator can act on. Beside it, the gateway's
 * CONNECT reasons (DESIGN §3, §9) and the sidecar's own local answers, each with its status and
 * RFC 9209 `proxy-status` error type.
 *
 * Errors reach exit codes, hints, CONNECT reasons and sidecar answers through these tables only:
 * read the code (`codeOf`), look it up. Nothing else picks a status or an exit code, and no
 * `instanceof` chain decides one. test/unit/errors.test.ts checks that every code the source
 * names is catalogued here and that every catalogued code is raised somewhere.
 *
 * This module imports nothing of ours: every program may use it.
 */

// ---------------------------------------------------------------------------------------------
// Exit codes

/** Process exit codes, shared by every command (the registry CLI documents them in its README). */
export const EXIT = {
  ok: 0,
  /** A runtime failure: database, TPM, file system, network, or anything unexpected. */
  runtime: 1,
  /** The command line or configuration is wrong: unknown option, missing argument, malformed value. */
  usage: 2,
  /** Refused: the request would produce something the gateway denies, or contradicts the registry (nothing written). `explain` also exits 3 when the gateway would deny. */
  refused: 3,
  /** The database schema is not what this build expects: not migrated, another version, an edited or out-of-order migration. */
  schema: 4,
  /** `agent-gateway-sidecar run` could not start CMD (no isolation, no sidecar socket): 125, as env, chroot and docker run use, so every code CMD itself exits with passes through unambiguously. */
  wrapper: 125,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

// ---------------------------------------------------------------------------------------------
// CONNECT reasons (the gateway's answers; names, statuses and error types are the DESIGN contract)

/** The `proxy-status` name of the gateway's answers. */
export const PROXY_STATUS_NAME = 'agent-gateway';

/** RFC 9209 error types a dial failure reports, classified by `classifyDialError`. */
export const DIAL_ERRORS = {
  connection_refused: { hint: 'nothing listens at the destination port: check the service, and any [resolve] override for it' },
  connection_timeout: { hint: 'no answer within [limits] dial_timeout_ms: check routing and firewalls toward the destination, or raise the timeout' },
  destination_not_found: { hint: 'the host name does not resolve from the gateway: check DNS there, or add a [resolve] override' },
  destination_unavailable: { hint: 'the connection failed for another reason (unreachable network, reset): the detail in the decision log names the socket error' },
} as const satisfies Record<string, { readonly hint: string }>;

export type DialErrorType = keyof typeof DIAL_ERRORS;

/** RFC 9209 error types this product writes into `proxy-status`. */
export type ProxyErrorType =
  | 'http_request_error'
  | 'http_request_denied'
  | 'destination_ip_prohibited'
  | 'proxy_internal_error'
  | 'http_response_incomplete'
  | 'http_response_timeout'
  | DialErrorType;

export interface ConnectReasonSpec {
  /** The HTTP status answered (or, for outcomes no client sees, the status recorded). */
  readonly status: number;
  /** The RFC 9209 `error=` type; null when no `proxy-status` is sent (200, a cancelled stream) or when it depends on the failure (`dial_failed`: a `DialErrorType`). */
  readonly error: ProxyErrorType | null;
  readonly hint: string;
  /** What the refused agent reads after the reason code: what to do, revealing nothing the code does not. */
  readonly agent: string;
}

/**
 * Every way a CONNECT ends: the status, the `proxy-status` error type, and what an operator
 * reading the decision log can do about it. The reason is the `details` of `proxy-status`, the
 * `reason` of the decision log line, the audit row and the metric.
 *
 * `client_cancelled` never reaches a client (its stream is gone before the answer); it is
 * recorded with status 499, nginx's "client closed request", so it sorts with the 4xx outcomes a
 * client caused and is never mistaken for an answer that was sent.
 */
export const CONNECT_REASONS = {
  allowed: { status: 200, error: null, hint: 'nothing to do: the registry authorised the tunnel and the destination accepted the connection', agent: 'the tunnel is open' },
  method_not_allowed: { status: 405, error: 'http_request_error', hint: 'only CONNECT is served: the client is not speaking to the gateway as a proxy (agents go through the sidecar)', agent: "the gateway serves only CONNECT; send the request through the sidecar's proxy" },
  authority_invalid: { status: 400, error: 'http_request_error', hint: 'the CONNECT target must be host:port as DESIGN §3 normalises it (no userinfo, path, percent-encoding or embedded IPv4 in IPv6)', agent: 'the destination is not a valid host:port; fix the address' },
  identity_invalid: { status: 403, error: 'http_request_denied', hint: 'the client certificate has no usable identity extension at policy.client_ext_oid: re-issue the carrier certificate (the sidecar writes one at start)', agent: "this agent's certificate carries no usable identity; ask an operator to restart its sidecar, which re-issues it" },
  not_authorized: { status: 403, error: 'http_request_denied', hint: 'no active signed permission for this identity, key and destination: the log line names the registry reason; `agent-gateway-registry explain` shows the rows', agent: 'this agent holds no active permission for it; ask a principal to grant it' },
  destination_forbidden: { status: 403, error: 'destination_ip_prohibited', hint: 'the destination is, or resolves to, an address [egress] refuses: add its range to allow_cidrs, or a [resolve] override, if it is meant to be reached', agent: 'the destination is, or resolves to, an address the gateway may not reach; ask an operator if it should be allowed' },
  rate_limited: { status: 429, error: 'http_request_denied', hint: 'this identity exceeds [limits] connect_rate_per_second / connect_burst: slow the client down or raise the limits', agent: 'this agent opens connections too fast; wait, then retry more slowly' },
  too_many_tunnels: { status: 429, error: 'http_request_denied', hint: 'this identity holds [limits] max_tunnels_per_identity open tunnels: close idle ones or raise the limit', agent: 'this agent holds too many open connections; close some, then retry' },
  registry_unavailable: { status: 503, error: 'proxy_internal_error', hint: 'the registry could not be asked (database down, pool or query timeout, lookup queue full): check PostgreSQL and the gateway /readyz', agent: 'the gateway cannot check permissions right now; retry later' },
  shutting_down: { status: 503, error: 'proxy_internal_error', hint: 'the gateway is stopping: the client retries on another replica or after the restart', agent: 'the gateway is restarting; retry shortly' },
  dial_failed: { status: 502, error: null, hint: 'the destination could not be reached: the proxy-status error type and the log detail say how (refused, timeout, not found, unavailable)', agent: 'the gateway could not reach the destination; check the host and port, or retry later' },
  client_cancelled: { status: 499, error: null, hint: 'the client reset the stream before the answer: nothing to do unless it is frequent (client timeouts shorter than lookups or dials)', agent: 'the request was cancelled before an answer' },
  internal_error: { status: 500, error: 'proxy_internal_error', hint: 'an unexpected failure in the gateway (a bug): report the decision log line and its detail', agent: 'the gateway failed unexpectedly; retry, and report it if it persists' },
} as const satisfies Record<string, ConnectReasonSpec>;

/** Every reason a CONNECT can end with; the precise registry reason goes to the log only. */
export type ReasonCode = keyof typeof CONNECT_REASONS;

export interface Response {
  readonly status: number;
  readonly headers: Record<string, string>;
}

function proxyStatus(name: string, error: string, details: string): string {
  return `${name}; error=${error}; details="${details}"`;
}

/** The answer for a reason, with its `proxy-status` (and `allow: CONNECT` for a 405). */
export function denialResponse(reason: Exclude<ReasonCode, 'dial_failed'>): Response {
  const spec: ConnectReasonSpec = CONNECT_REASONS[reason];
  const headers: Record<string, string> = {};
  if (spec.error !== null) headers['proxy-status'] = proxyStatus(PROXY_STATUS_NAME, spec.error, reason);
  if (reason === 'method_not_allowed') headers.allow = 'CONNECT';
  return { status: spec.status, headers };
}

/** The 502 for a destination that could not be reached, with the dial's RFC 9209 error type. */
export function dialFailureResponse(type: DialErrorType): Response {
  return { status: CONNECT_REASONS.dial_failed.status, headers: { 'proxy-status': proxyStatus(PROXY_STATUS_NAME, type, 'dial_failed') } };
}

/** Classifies a socket error from dialling a destination into RFC 9209's error types. */
export function classifyDialError(error: NodeJS.ErrnoException | undefined, timedOut: boolean): DialErrorType {
  if (timedOut || error?.code === 'ETIMEDOUT') return 'connection_timeout';
  switch (error?.code) {
    case 'ECONNREFUSED':
      return 'connection_refused';
    case 'ENOTFOUND':
    case 'EAI_NONAME':
    case 'EAI_AGAIN':
    case 'EAI_NODATA':
      return 'destination_not_found';
    default:
      return 'destination_unavailable';
  }
}

// ---------------------------------------------------------------------------------------------
// The sidecar's own answers (the gateway's answers pass through it unchanged)

/** The `proxy-status` name of answers the sidecar makes itself. */
export const SIDECAR_PROXY_STATUS_NAME = 'agent-gateway-sidecar';

export interface SidecarResponseSpec {
  readonly status: number;
  readonly error: ProxyErrorType;
  readonly hint: string;
  /** What the agent reads after the reason code (see ConnectReasonSpec.agent). */
  readonly agent: string;
}

/**
 * What the sidecar answers an agent on its own, keyed by the `details` code. Each status has its
 * own code: an authority the sidecar cannot send is not a gateway outage.
 */
export const SIDECAR_RESPONSES = {
  authority_invalid: { status: 400, error: 'http_request_error', hint: 'the agent asked for a CONNECT target that is not host:port (DESIGN §3 destination rules)', agent: 'the CONNECT target is not a valid host:port; fix the address' },
  request_invalid: { status: 400, error: 'http_request_error', hint: 'the local proxy takes CONNECT host:port, or a plain request with an absolute http:// URL; anything else is refused', agent: 'send CONNECT host:port, or a request with an absolute http:// URL, as HTTPS_PROXY/HTTP_PROXY clients do' },
  gateway_unavailable: { status: 503, error: 'proxy_internal_error', hint: 'no usable session to the gateway within --connect-wait-ms (gateway down or unreachable, TLS refused, sidecar stopping): check the sidecar log and the gateway', agent: 'the sidecar has no session to the gateway; retry later, or ask an operator to check the sidecar' },
  gateway_timeout: { status: 504, error: 'http_response_timeout', hint: 'the gateway did not answer a CONNECT or plain request within the answer deadline (--connect-wait-ms + 30 s): every stream the session may open is taken (max_streams_per_session), or the gateway is stalled; check the sidecar log and the gateway', agent: 'the gateway did not answer in time (this sidecar may have too many tunnels open); retry later' },
  sidecar_unavailable: { status: 503, error: 'proxy_internal_error', hint: "run's forwarder could not reach the sidecar's Unix socket (the sidecar stopped or is restarting): check that it runs with --listen-socket at the path run was given", agent: 'the sidecar is not running; retry shortly, or ask an operator to restart it' },
  upstream_failed: { status: 502, error: 'http_response_incomplete', hint: 'a plain http:// request was sent through the tunnel but no complete response came back from the destination', agent: 'no complete response came back from the destination; retry later' },
  internal_error: { status: 500, error: 'proxy_internal_error', hint: 'an unexpected failure in the sidecar (a bug): report the sidecar log line', agent: 'the sidecar failed unexpectedly; retry, and report it if it persists' },
} as const satisfies Record<string, SidecarResponseSpec>;

export type SidecarReason = keyof typeof SIDECAR_RESPONSES;

/** The sidecar's answer for one of its own reasons, with `proxy-status: agent-gateway-sidecar; ...`. */
export function sidecarResponse(reason: SidecarReason): Response {
  const spec: SidecarResponseSpec = SIDECAR_RESPONSES[reason];
  return { status: spec.status, headers: { 'proxy-status': proxyStatus(SIDECAR_PROXY_STATUS_NAME, spec.error, reason) } };
}

/**
 * What a refused agent is told to do for a `proxy-status` answer: the catalogue's `agent` line
 * for the reason code, looked up in the table of whoever answered (the sidecar's own answers
 * carry its name). Undefined for a name or code this build does not know.
 */
export function agentHint(proxyStatusName: string, reason: string): string | undefined {
  const table: Readonly<Record<string, { readonly agent: string }>> = proxyStatusName === SIDECAR_PROXY_STATUS_NAME ? SIDECAR_RESPONSES : proxyStatusName === PROXY_STATUS_NAME ? CONNECT_REASONS : {};
  return Object.hasOwn(table, reason) ? table[reason]!.agent : undefined;
}

// ---------------------------------------------------------------------------------------------
// Error codes

export interface ErrorSpec {
  /** The process exit code when this error ends a command. */
  readonly exit: ExitCode;
  /** The HTTP status when it surfaces in an answer (that of `reason` / `sidecar` where given). */
  readonly status?: number;
  /** The CONNECT reason the gateway answers with when this error ends a CONNECT. */
  readonly reason?: ReasonCode;
  /** The sidecar's own answer when this error ends a local request. */
  readonly sidecar?: SidecarReason;
  /** One line an operator can act on. */
  readonly hint: string;
}

const ENGINE_PIN_HINT = 'check AGENT_GATEWAY_TPM_USER_PIN or --user-pin-file; repeated wrong PINs trigger the TPM dictionary-attack lockout';
const LOCKOUT_HINT = 'the TPM is in dictionary-attack lockout: wait for its recovery time, or clear it with the lockout authorisation';
const REPORT_HINT = 'this is a bug: report it with the message and the stack trace';

/** Every error code of the product. Exit codes follow the registry CLI's documented semantics. */
export const ERROR_CODES = {
  // Anything that is not ours (a bug, or a library error nobody wrapped).
  ERR_INTERNAL: { exit: EXIT.runtime, status: 500, reason: 'internal_error', sidecar: 'internal_error', hint: REPORT_HINT },

  // Configuration and command lines.
  ERR_CONFIG: { exit: EXIT.usage, hint: 'fix the field named in the message (config.example.toml documents every field), then start again' },
  ERR_USAGE: { exit: EXIT.usage, hint: 'see `agent-gateway-registry COMMAND --help` for the arguments and options' },

  // The signed-registry model (registry/errors.ts), shared by the gateway and the CLI.
  ERR_DESTINATION_INVALID: { exit: EXIT.usage, status: 400, reason: 'authority_invalid', sidecar: 'authority_invalid', hint: 'a destination is host[:port] (port 443 by default): an LDH host name or an IP literal, no scheme, path, userinfo or percent-encoding' },
  ERR_IDENTITY_INVALID: { exit: EXIT.usage, status: 403, reason: 'identity_invalid', hint: 'an identity is 1-255 bytes of UTF-8 without control characters, carried as one DER UTF8String in the identity extension' },
  ERR_PERMISSION_FIELD_INVALID: { exit: EXIT.refused, hint: 'a permission field would make the signed text ambiguous or is malformed: fix the value named in the message' },
  ERR_KEY_MATERIAL_INVALID: { exit: EXIT.usage, hint: 'keys must be ECDSA P-256 SubjectPublicKeyInfo (PEM or DER) and signatures DER ECDSA-Sig-Value' },
  ERR_REGISTRY_UNAVAILABLE: { exit: EXIT.runtime, status: 503, reason: 'registry_unavailable', hint: 'check that PostgreSQL is up and reachable with the configured URL, and the pool and query timeouts' },
  ERR_SCHEMA_VERSION: { exit: EXIT.schema, status: 503, reason: 'registry_unavailable', hint: 'run `agent-gateway-registry migrate`' },

  // The registry CLI.
  ERR_DATABASE: { exit: EXIT.runtime, hint: 'check that the registry database is reachable with the URL in AGENT_GATEWAY_DATABASE_URL (or --database-url-env) and that the role may do this' },
  ERR_REFUSED_FIELD_INVALID: { exit: EXIT.refused, hint: 'the gateway would deny a row with this value, or it is not what was typed: drop the control character, invalid Unicode (U+FFFD: an argument that was not UTF-8) or excess length named in the message' },
  ERR_REFUSED_VALIDITY: { exit: EXIT.refused, hint: 'give a --not-after later than --not-before and in the future (database time)' },
  ERR_REFUSED_OUT_OF_SCOPE: { exit: EXIT.refused, hint: 'an admin delegates the destination to this principal first: `agent-gateway-registry grant-scope KEY_ID DESTINATION...`' },
  ERR_REFUSED_PRINCIPAL_UNKNOWN: { exit: EXIT.refused, hint: 'register the principal key first: `agent-gateway-registry register-principal KEY_ID`' },
  ERR_REFUSED_PRINCIPAL_INACTIVE: { exit: EXIT.refused, hint: 'a revoked or expired principal key stays so: register a new KEY_ID (or wait for its not_before)' },
  ERR_REFUSED_PRINCIPAL_KEY_MISMATCH: { exit: EXIT.refused, hint: 'the registry holds another public key under this KEY_ID: use the TPM that owns it, or register this key under another KEY_ID' },
  ERR_REFUSED_IDENTITY_MISMATCH: { exit: EXIT.refused, hint: 'grant the identity the certificate carries, or issue a certificate for this identity' },
  ERR_REFUSED_CERTIFICATE_IDENTITY_INVALID: { exit: EXIT.refused, hint: 're-issue the carrier certificate with a valid identity extension (the sidecar writes one at start)' },
  ERR_REFUSED_SCOPE_UNKNOWN: { exit: EXIT.refused, hint: '`agent-gateway-registry list` shows the delegations this principal holds' },
  ERR_REFUSED_NOTHING_TO_ROTATE: { exit: EXIT.refused, hint: '`agent-gateway-registry list permissions --identity ID` shows which key and principal hold its rows; check --from-cert and --principal' },
  ERR_REFUSED_SAME_KEY: { exit: EXIT.refused, hint: 'let the sidecar make the new key first (next_key_label in its --config, then SIGHUP) and pass the certificate it writes (next_cert_out) as --to-cert' },
  ERR_REFUSED_PERMISSION_UNKNOWN: { exit: EXIT.refused, hint: '`agent-gateway-registry list` shows the permission ids in the registry' },
  ERR_REFUSED_UNATTESTED: { exit: EXIT.refused, hint: 'enrol the key with TPM evidence first (`agent-gateway-registry enrol-agent-key`, or register-principal with --ek-ca), or pass --allow-unattested to accept a key nothing proves is TPM-resident' },
  ERR_REFUSED_ATTESTATION_MALFORMED: { exit: EXIT.refused, hint: 'the evidence is not what tpm2-tools produces for an ECC P-256 key certified by an ECDSA AK under the RSA EK: collect it again on the machine that owns the TPM' },
  ERR_REFUSED_ATTESTATION_EK_UNTRUSTED: { exit: EXIT.refused, hint: 'the TPM\'s EK certificate must be issued by a CA in --ek-ca / AGENT_GATEWAY_EK_CA_FILE, be valid now, and be an EK certificate (never a CA or TLS certificate): add its manufacturer\'s CA if you trust it, or enrol a key from another TPM' },
  ERR_REFUSED_ATTESTATION_AK_ATTRIBUTES: { exit: EXIT.refused, hint: 'the attestation key must be restricted, sign, fixedTPM and fixedParent (tpm2_createak makes one): anything else can sign forged certify structures' },
  ERR_REFUSED_ATTESTATION_SIGNATURE: { exit: EXIT.refused, hint: 'the certify structure was not signed by the presented attestation key: the evidence was altered or forged' },
  ERR_REFUSED_ATTESTATION_KEY_MISMATCH: { exit: EXIT.refused, hint: 'the TPM certified another key than the one being enrolled: enrol the key the TPM holds under that label' },
  ERR_REFUSED_ATTESTATION_KEY_ATTRIBUTES: { exit: EXIT.refused, hint: 'the key must be generated inside the TPM and bound to it (fixedTPM, fixedParent, sensitiveDataOrigin): generate a new key in the token, never import one' },
  ERR_REFUSED_ATTESTATION_ACTIVATION: { exit: EXIT.refused, hint: 'credential activation failed: the attestation key is not in the TPM that holds this EK, or an old proof was replayed; enrol again from the machine that owns the TPM' },
  ERR_MIGRATION_CHECKSUM: { exit: EXIT.schema, hint: 'restore the applied migration file as it was and put the change in a new, higher-numbered migration' },
  ERR_MIGRATION_ORDER: { exit: EXIT.schema, hint: 'renumber the new migration after the last one applied' },
  ERR_MIGRATION_MISSING: { exit: EXIT.schema, hint: 'run the CLI from a release at least as new as the database (its migrations directory lacks an applied file)' },
  ERR_MIGRATION_FILES: { exit: EXIT.schema, hint: 'the migrations directory must be readable and hold NNNN_name.sql files with distinct numbers' },
  ERR_MIGRATION_BASELINE: { exit: EXIT.schema, hint: 'schema_version does not match the migration files: repair schema_version or migrate a fresh database' },
  ERR_MIGRATION_FAILED: { exit: EXIT.runtime, hint: 'the migration was rolled back: fix the cause in the PostgreSQL message (often privileges or existing objects) and run migrate again' },
  ERR_MIGRATION_LOCK_TIMEOUT: { exit: EXIT.runtime, hint: 'another migrate holds the lock: let it finish, or end its session (pg_stat_activity) if it is stuck' },

  // The TPM layer (tpm/).
  ERR_TPM: { exit: EXIT.runtime, hint: 'a PKCS#11 call failed: the CKR_* name in the message says why; check the token with `tpm2_ptool listtokens`' },
  ERR_TPM_MODULE_LOAD_FAILED: { exit: EXIT.runtime, hint: 'install libtpm2-pkcs11-1, or point --pkcs11-module at libtpm2_pkcs11.so' },
  ERR_TPM_UNAVAILABLE: { exit: EXIT.runtime, hint: 'is the TPM reachable? check TPM2_PKCS11_TCTI (and DBUS_SESSION_BUS_ADDRESS for tpm2-abrmd)' },
  ERR_TPM_TOKEN_NOT_FOUND: { exit: EXIT.runtime, hint: 'register-principal creates the token when AGENT_GATEWAY_TPM_SO_PIN (or --so-pin-file) is set; otherwise check --token / AGENT_GATEWAY_TPM_TOKEN and TPM2_PKCS11_STORE' },
  ERR_TPM_KEY_NOT_FOUND: { exit: EXIT.runtime, hint: 'this TPM token holds no key with that label: run register-principal on the machine that owns the principal key' },
  ERR_TPM_KEY_EXISTS: { exit: EXIT.runtime, hint: 'a key with this label is already in the token: use it, or choose another label' },
  ERR_TPM_KEY_AMBIGUOUS: { exit: EXIT.runtime, hint: 'several keys share this label: remove the extra ones with tpm2_ptool, since labels must name one key' },
  ERR_TPM_KEY_UNSUPPORTED: { exit: EXIT.runtime, hint: 'only ECDSA P-256 keys are supported: generate a new key under another label' },
  ERR_TPM_PIN_INCORRECT: { exit: EXIT.runtime, hint: ENGINE_PIN_HINT },
  ERR_TPM_PIN_LOCKED: { exit: EXIT.runtime, hint: LOCKOUT_HINT },
  ERR_TPM_PIN_INVALID: { exit: EXIT.runtime, hint: 'the PIN has the wrong length or characters, or the token user PIN was never set (re-create the token with the SO PIN)' },
  ERR_TPM_INVALID_ARGUMENT: { exit: EXIT.usage, hint: 'fix the label, PIN or argument named in the message (labels: 1-32 bytes, no control characters)' },
  ERR_TPM_CLOSED: { exit: EXIT.runtime, hint: REPORT_HINT },
  ERR_TPM_ATTESTATION: { exit: EXIT.runtime, hint: 'a tpm2-tools step of the attestation failed (named in the message): check TPM2TOOLS_TCTI / TPM2_PKCS11_TCTI, that the TPM has an EK certificate at NV 0x01c00002 (swtpm_setup --create-ek-cert), and the token\'s user PIN' },

  // The gateway.
  ERR_ADMIN_LISTEN: { exit: EXIT.runtime, hint: 'choose a free [admin] listen_addr (port 0 picks one), or stop what holds the port' },
  ERR_SERVER_LISTEN: { exit: EXIT.runtime, hint: 'choose a free [server] listen_addr (port 0 picks one) that is not [admin] listen_addr, or stop what holds the port' },

  // The sidecar.
  ERR_LISTEN: { exit: EXIT.runtime, hint: 'choose a free --listen-port / --health-port (0 picks one) or another --listen-socket, or stop what holds it' },
  ERR_ISOLATION_UNAVAILABLE: { exit: EXIT.wrapper, hint: 'run needs user, network and PID namespaces: allow user namespaces (user.max_user_namespaces > 0; for non-root users also kernel.unprivileged_userns_clone=1 or kernel.apparmor_restrict_unprivileged_userns=0 where those exist), with util-linux unshare and iproute2 ip installed; or pass --no-isolation to run CMD without isolation, knowingly' },
  ERR_SIDECAR_SOCKET: { exit: EXIT.wrapper, hint: 'start the sidecar with --listen-socket PATH and give run the same --socket PATH (env AGENT_GATEWAY_SIDECAR_SOCKET), as the user the sidecar runs as' },
  ERR_RUN_HIDE_PATH: { exit: EXIT.wrapper, hint: 'give --hide an existing directory (a tmpfs can only cover a directory: hide the directory holding a file or socket); run refuses rather than start CMD with it visible' },
  ERR_RUN_USAGE: { exit: EXIT.wrapper, hint: 'see `agent-gateway-sidecar run --help`: run [--socket PATH] [--hide DIR]... [--no-isolation] -- CMD [ARGS...]' },
  ERR_PORT_FILE: { exit: EXIT.runtime, hint: 'the --port-file directory must exist and be writable by the sidecar' },
  ERR_GATEWAY_UNAVAILABLE: { exit: EXIT.runtime, status: 503, sidecar: 'gateway_unavailable', hint: 'the sidecar has no session to the gateway: check --gateway, the gateway, and the sidecar log for TLS or network errors' },
  ERR_TLS_IDENTITY: { exit: EXIT.runtime, hint: 'loading the TPM-backed TLS identity failed: the message names the step' },
  ERR_TLS_IDENTITY_PIN_INCORRECT: { exit: EXIT.runtime, hint: ENGINE_PIN_HINT },
  ERR_TLS_IDENTITY_PIN_LOCKED: { exit: EXIT.runtime, hint: LOCKOUT_HINT },
  ERR_TLS_IDENTITY_TOKEN_NOT_FOUND: { exit: EXIT.runtime, hint: 'set AGENT_GATEWAY_TPM_SO_PIN (or --so-pin-file) to create it, or check --token-label and TPM2_PKCS11_STORE' },
  ERR_TLS_IDENTITY_KEY_NOT_FOUND: { exit: EXIT.runtime, hint: 'the token has no key with --key-label: check the label and TPM2_PKCS11_STORE, or let the sidecar create the key (SO PIN set)' },
  ERR_TLS_IDENTITY_KEY_MISMATCH: { exit: EXIT.runtime, hint: 'the carrier certificate does not hold the TPM key: check that --key-label names the key the sidecar wrote --cert-out for, and restart it to rewrite the certificate' },
  ERR_TLS_IDENTITY_KEY_EXPORTABLE: { exit: EXIT.runtime, hint: 'the key was not generated inside the TPM as never-extractable: delete it, or choose another --key-label and let the sidecar generate one' },
  ERR_TLS_IDENTITY_TPM_UNAVAILABLE: { exit: EXIT.runtime, hint: 'check --tcti / TPM2_PKCS11_TCTI (and DBUS_SESSION_BUS_ADDRESS for tpm2-abrmd), and --pkcs11-module' },
  ERR_TLS_IDENTITY_ENGINE: { exit: EXIT.runtime, hint: 'install libengine-pkcs11-openssl and libtpm2-pkcs11-1, or pass --pkcs11-engine / --pkcs11-module' },
  ERR_TLS_IDENTITY_CERTIFICATE: { exit: EXIT.runtime, hint: 'the carrier certificate could not be built or written: check that the --cert-out directory exists or can be created, and is writable' },
  ERR_REFUSED_KEY_IN_USE: { exit: EXIT.refused, hint: 'the sidecar\'s certificate (--cert-out) still presents this key: switch the sidecar to the new key (key_label in its --config, then SIGHUP) and wait for its old session to drain first' },
  ERR_REFUSED_KEY_USE_UNKNOWN: { exit: EXIT.refused, hint: 'give the running sidecar\'s --config (or its --cert-out): its certificate says which key it presents, and a key is not destroyed without knowing that' },
  ERR_TLS_IDENTITY_INVALID_ARGUMENT: { exit: EXIT.runtime, hint: 'fix the value named in the message: an --identity of 1-255 bytes without control characters, a non-empty user PIN, labels of 1-32 bytes' },
} as const satisfies Record<`ERR_${string}`, ErrorSpec>;

/** Every error code of the product: a closed union. */
export type ErrorCode = keyof typeof ERROR_CODES;

/** The base of every error we raise. Its `code` is catalogued in ERROR_CODES. */
export class AgentGatewayError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERROR_CODES, code);
}

/** The stable code of any error: its own when it is ours, `ERR_INTERNAL` for anything else. */
export function codeOf(error: unknown): ErrorCode {
  return error instanceof AgentGatewayError && isErrorCode(error.code) ? error.code : 'ERR_INTERNAL';
}

/** The catalogue entry of a code. */
export function errorSpec(code: ErrorCode): ErrorSpec {
  return ERROR_CODES[code];
}

/** The process exit code for any error. */
export function exitCodeFor(error: unknown): ExitCode {
  return errorSpec(codeOf(error)).exit;
}

/** The operator's hint for any error, or undefined where the catalogue has none. */
export function hintFor(error: unknown): string | undefined {
  return errorSpec(codeOf(error)).hint || undefined;
}

/** The CONNECT reason an error ends a CONNECT with: the code's `reason`, else `internal_error`. */
export function reasonForError(error: unknown): ReasonCode {
  return errorSpec(codeOf(error)).reason ?? 'internal_error';
}

/** The sidecar's own answer for an error: the code's `sidecar` reason, else `internal_error`. */
export function sidecarReasonForError(error: unknown): SidecarReason {
  return errorSpec(codeOf(error)).sidecar ?? 'internal_error';
}
