import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { resolve as resolvePath } from 'node:path';
import { parse as parseToml, TomlError } from 'smol-toml';
import { z } from 'zod';
import { normaliseDestination } from '../../registry/destination.js';
import { ConfigError } from '../../registry/errors.js';
import { MAX_WINDOW_BYTES, SESSION_WINDOW_BYTES, STREAM_WINDOW_BYTES } from '../../registry/flow-control.js';
import { isDottedOid } from '../../registry/identity.js';
import { isCidr, parseCidrs, type Cidr, type EgressPolicy } from './egress.js';
import { parseLogFilter } from './logger.js';

/**
 * The gateway's configuration: one zod schema is the only source of its type and its checks.
 * `loadConfig` reads TOML, validates, resolves the database URL, and returns a frozen value the
 * rest of the code trusts.
 */

const HOST_PORT = /^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$/;

/** `host:port` for a listener; port 0 picks a free port (tests). */
export function parseListenAddress(text: string): { host: string; port: number } {
  const m = HOST_PORT.exec(text);
  const port = Number(m?.[3]);
  const host = m?.[1] ?? m?.[2];
  if (!m || !host || port > 65535 || (m[1] !== undefined && isIP(m[1]) !== 6)) {
    throw new Error('must be host:port, e.g. 127.0.0.1:8443 or [::1]:8443');
  }
  return { host, port };
}

const listenAddress = z.string().superRefine((value, ctx) => {
  try {
    parseListenAddress(value);
  } catch (error) {
    ctx.addIssue({ code: 'custom', message: (error as Error).message });
  }
});

const millis = (defaultValue: number) => z.number().int().min(1).max(3_600_000).default(defaultValue);

/** 0 switches a limit off; otherwise at least 1 ms. */
const millisOrOff = (defaultValue: number) => z.number().int().min(0).max(86_400_000).default(defaultValue);

const postgresUrl = z.string().superRefine((value, ctx) => {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    ctx.addIssue({ code: 'custom', message: 'is not a URL (expected postgres://user:password@host:port/database)' });
    return;
  }
  if (url.protocol !== 'postgres:' && url.protocol !== 'postgresql:') {
    ctx.addIssue({ code: 'custom', message: `must be a postgres:// or postgresql:// URL, not ${url.protocol}//` });
  }
});

const cidrList = z.array(z.string().refine(isCidr, 'must be a CIDR such as 10.1.2.3/32 or fd00::/8 (IPv4 as a dotted quad without leading zeros, IPv6 without a zone)')).default([]);

const serverSchema = z.strictObject({
  listen_addr: listenAddress.default('127.0.0.1:8443'),
  tls_cert_path: z.string().min(1),
  tls_key_path: z.string().min(1),
  /** How long SIGINT/SIGTERM lets open tunnels run before closing them. */
  shutdown_grace_ms: millis(10_000),
  /**
   * On SIGINT/SIGTERM, /readyz answers 503 for this long first while everything else carries on,
   * so a balancer's health check takes the replica out before it stops accepting and sends GOAWAY
   * (DESIGN §9g). 0 = stop at once.
   */
  drain_delay_ms: millisOrOff(0),
  /**
   * HTTP/2 receive windows (DESIGN §9f): per stream (SETTINGS_INITIAL_WINDOW_SIZE, bounds one
   * tunnel's upload) and per session. Defaults: registry/flow-control.ts, chosen by measurement.
   */
  /**
   * A session older than this gets GOAWAY (its open tunnels run to their end; the sidecar opens a
   * new session, through the balancer, for new CONNECTs): sessions spread over replicas and a
   * drained replica empties (DESIGN §9g). 0 = no bound.
   */
  max_session_age_ms: millisOrOff(0),
  /**
   * Balancers whose PROXY protocol v2 header is trusted (DESIGN §9g): connections from these must
   * start with one, and their client address becomes the agent's; anyone else sending one is
   * refused. Empty: no header is read, and one sent fails the TLS handshake.
   */
  proxy_protocol_from: cidrList,
  stream_window_bytes: z.number().int().min(65_535).max(MAX_WINDOW_BYTES).default(STREAM_WINDOW_BYTES),
  session_window_bytes: z.number().int().min(65_535).max(MAX_WINDOW_BYTES).default(SESSION_WINDOW_BYTES),
});

const policySchema = z
  .strictObject({
    client_ext_oid: z.string().refine(isDottedOid, 'must be a dotted OID such as 1.3.6.1.4.1.57264.1.1'),
    database_url: postgresUrl.optional(),
    database_url_env: z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be an environment variable name').optional(),
    max_connections: z.number().int().min(1).max(1000).default(5),
    connect_timeout_ms: millis(5000),
    pool_acquire_timeout_ms: millis(1000),
    query_timeout_ms: millis(500),
    /**
     * Distinct registry lookups waiting for a pooled connection (running ones do not count); past
     * it a CONNECT gets 503 registry_unavailable at once. A lookup waits at most
     * pool_acquire_timeout_ms to start.
     */
    lookup_queue_size: z.number().int().min(1).max(1_000_000).default(10_000),
    /**
     * Environment variable holding the URL of a streaming standby for lookups (DESIGN §9g). Used
     * only while it has replayed the newest change the feed (on the primary) has seen; else, or
     * when it fails, the primary answers. Pool and timeouts as for the primary.
     */
    read_database_url_env: z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be an environment variable name').optional(),
  })
  .superRefine((policy, ctx) => {
    if (policy.database_url === undefined && policy.database_url_env === undefined) {
      ctx.addIssue({ code: 'custom', path: ['database_url'], message: 'set database_url or database_url_env' });
    }
    if (policy.database_url !== undefined && policy.database_url_env !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['database_url_env'], message: 'set only one of database_url and database_url_env' });
    }
  });

const observabilitySchema = z.strictObject({
  log_level: z.string().superRefine((value, ctx) => {
    try {
      parseLogFilter(value);
    } catch (error) {
      ctx.addIssue({ code: 'custom', message: (error as Error).message });
    }
  }),
  otlp_endpoint: z.url({ protocol: /^https?$/ }).optional(),
});


const limitsSchema = z
  .strictObject({
    /** Bound on dialling a destination; past it the CONNECT gets 502 connection_timeout. */
    dial_timeout_ms: millis(10_000),
    /** TLS handshakes that take longer are dropped. */
    handshake_timeout_ms: millis(10_000),
    /** HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: open tunnels per session. */
    max_streams_per_session: z.number().int().min(1).max(100_000).default(1000),
    /** Token bucket refill per identity (CONNECTs per second, fractions allowed); 0 = unlimited. */
    connect_rate_per_second: z.number().min(0).max(1_000_000).default(0),
    /** Token bucket size: CONNECTs an idle identity may send at once. Default: one second's worth (at least 1). Ignored at rate 0. */
    connect_burst: z.number().int().min(1).max(1_000_000).optional(),
    /** Open tunnels (plus CONNECTs being decided) per identity; 0 = unlimited. */
    max_tunnels_per_identity: z.number().int().min(0).max(1_000_000).default(0),
    /** A tunnel with no bytes either way for this long is closed; 0 = never. */
    idle_timeout_ms: millisOrOff(600_000),
    /** A session with no open stream for this long gets GOAWAY; 0 = never. */
    session_idle_timeout_ms: millisOrOff(300_000),
    /** A tunnel older than this is closed (detail max_lifetime); 0 = no bound. */
    max_tunnel_lifetime_ms: millisOrOff(0),
    /** TLS connections held at once; more are refused at accept. 0 = no limit. */
    max_connections: z.number().int().min(0).max(10_000_000).default(10_000),
  })
  // connect_burst is kept (and ignored) when the rate is 0, so switching the rate off is a one-line change.
  .transform((limits) => ({
    ...limits,
    connect_burst: limits.connect_burst ?? Math.max(1, Math.ceil(limits.connect_rate_per_second)),
  }));

/**
 * `[admin]`: plain HTTP for probes and scrapes, on loopback by default: it reveals counts, not
 * secrets, but it is unauthenticated, so exposing it is a deliberate choice. It runs when the
 * section is present: a config written to the spec alone never binds a second, fixed port, so
 * several such gateways can share a machine.
 */
const adminSchema = z.strictObject({
  enabled: z.boolean().default(true),
  listen_addr: listenAddress.default('127.0.0.1:9090'),
  /**
   * Label metrics with the client identity / destination. Off by default: label values are
   * series, and only values the registry has authorised are ever used (see README).
   */
  per_identity_metrics: z.boolean().default(false),
  per_destination_metrics: z.boolean().default(false),
  /** prom-client's default process and Node.js runtime metrics (process_*, nodejs_*). */
  process_metrics: z.boolean().default(true),
});

/** `[audit]`: one row per decision and per tunnel close, written in batches off the hot path. */
const auditSchema = z
  .strictObject({
    enabled: z.boolean().default(true),
    /** Default: the `[policy]` database. Set one of these to write as an insert-only role. */
    database_url: postgresUrl.optional(),
    database_url_env: z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be an environment variable name').optional(),
    /** Rows per INSERT; a full batch is written at once. */
    batch_size: z.number().int().min(1).max(10_000).default(500),
    /** A partial batch waits at most this long. */
    flush_interval_ms: millis(1000),
    /** Rows held in memory while the database is slow or down; beyond it new rows are dropped (counted). */
    queue_size: z.number().int().min(1).max(1_000_000).default(10_000),
    /** Per INSERT (client side and statement_timeout). */
    write_timeout_ms: millis(5000),
  })
  .superRefine((audit, ctx) => {
    if (audit.database_url !== undefined && audit.database_url_env !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['database_url_env'], message: 'set only one of database_url and database_url_env' });
    }
    if (audit.batch_size > audit.queue_size) {
      ctx.addIssue({ code: 'custom', path: ['batch_size'], message: `must not exceed queue_size (${audit.queue_size})` });
    }
  });

/** `[cache]`: allowed decisions cached until a registry change or their earliest not_after (DESIGN §9b). */
const cacheSchema = z.strictObject({
  enabled: z.boolean().default(true),
  max_entries: z.number().int().min(1).max(10_000_000).default(100_000),
  /** The registry change counter is read this often, whether or not LISTEN is up. */
  poll_interval_ms: z.number().int().min(50).max(3_600_000).default(1000),
});

/** `[egress]`: which addresses tunnels may reach (DESIGN §9c). */
const egressSchema = z.strictObject({
  /** Ranges allowed although not global unicast (an internal mirror: ["10.1.2.3/32"]). */
  allow_cidrs: cidrList,
  /** Ranges refused even when global unicast or in allow_cidrs. */
  deny_cidrs: cidrList,
  /** ClientHello server_name against the CONNECT host: "match", "require" or "off". */
  sni: z.enum(['match', 'require', 'off']).default('match'),
  sni_timeout_ms: millis(5000),
});

/** `[resolve]`: normalised destination → address actually dialled. Authorization never sees it. */
const resolveSchema = z.record(z.string(), z.string()).superRefine((entries, ctx) => {
  const seen = new Map<string, string>();
  for (const [key, value] of Object.entries(entries)) {
    try {
      const normalised = normaliseDestination(key).authority;
      const previous = seen.get(normalised);
      if (previous !== undefined) ctx.addIssue({ code: 'custom', path: [key], message: `same destination as "${previous}"` });
      seen.set(normalised, key);
    } catch (error) {
      ctx.addIssue({ code: 'custom', path: [key], message: `key ${(error as Error).message}` });
    }
    try {
      normaliseDestination(value);
    } catch (error) {
      ctx.addIssue({ code: 'custom', path: [key], message: `value ${(error as Error).message}` });
    }
  }
});

export const configSchema = z.strictObject({
  server: serverSchema,
  policy: policySchema,
  observability: observabilitySchema,
  limits: limitsSchema.prefault({}),
  admin: adminSchema.optional(),
  audit: auditSchema.prefault({}),
  cache: cacheSchema.prefault({}),
  egress: egressSchema.prefault({}),
  resolve: resolveSchema.default({}),
})
  .superRefine((file, ctx) => {
    // Both listeners on one address: the second bind fails at start, after the first is up. Said here, naming the field.
    const admin = file.admin;
    if (!admin?.enabled) return;
    const key = (text: string) => {
      try {
        const { host, port } = parseListenAddress(text);
        return port === 0 ? undefined : `${host.toLowerCase()}:${port}`;
      } catch {
        return undefined; // the field's own check names it
      }
    };
    const server = key(file.server.listen_addr);
    if (server !== undefined && server === key(admin.listen_addr)) {
      ctx.addIssue({ code: 'custom', path: ['admin', 'listen_addr'], message: `same address as server.listen_addr (${file.server.listen_addr})` });
    }
  });

export type ConfigFile = z.infer<typeof configSchema>;

export interface Dialable {
  readonly host: string;
  readonly port: number;
}

export type GatewayConfig = Readonly<{
  server: Readonly<ConfigFile['server']> & { readonly proxyProtocolFrom: readonly Cidr[] };
  /** `readDatabaseUrl`: the standby named by `read_database_url_env`, if any. */
  policy: Readonly<ConfigFile['policy']> & { readonly databaseUrl: string; readonly readDatabaseUrl?: string };
  observability: Readonly<ConfigFile['observability']>;
  limits: Readonly<ConfigFile['limits']>;
  admin: Readonly<NonNullable<ConfigFile['admin']>>;
  /** `databaseUrl`: where audit rows go (the policy database unless `[audit]` names another). */
  audit: Readonly<ConfigFile['audit']> & { readonly databaseUrl: string };
  cache: Readonly<ConfigFile['cache']>;
  egress: Readonly<ConfigFile['egress']> & { readonly policy: EgressPolicy };
  /** `[resolve]` with normalised keys, ready to look up by normalised destination. */
  resolve: ReadonlyMap<string, Dialable>;
}>;

function describeIssues(error: z.ZodError, source: string): string {
  const lines = error.issues.map((issue) => {
    const path = issue.path.map(String).join('.');
    let message = issue.message;
    if (issue.code === 'unrecognized_keys') {
      const keys = issue.keys;
      return keys.map((key) => `${path ? `${path}.` : ''}${key}: unknown key`).join('\n');
    }
    if (issue.code === 'invalid_type' && /received undefined/.test(message)) message = 'is required';
    return `${path || '(top level)'}: ${message}`;
  });
  return `${source}: invalid configuration\n${lines.map((line) => `  ${line}`).join('\n')}`;
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    for (const inner of Object.values(value)) deepFreeze(inner);
    Object.freeze(value);
  }
  return value;
}

export interface ParseOptions {
  /** Where the values came from, for messages. */
  readonly source?: string;
  /** Relative TLS paths resolve against this directory; default the working directory, as the original gateway did. */
  readonly baseDir?: string;
  readonly env?: NodeJS.ProcessEnv;
}

/** Validates an already-parsed config object. Throws ConfigError naming each bad field. */
export function parseConfig(input: unknown, options: ParseOptions = {}): GatewayConfig {
  const source = options.source ?? 'config';
  const result = configSchema.safeParse(input);
  if (!result.success) throw new ConfigError(describeIssues(result.error, source));
  const file = result.data;
  const env = options.env ?? process.env;
  const invalid = (field: string, message: string) => new ConfigError(`${source}: invalid configuration\n  ${field}: ${message}`);
  /** A URL named by an environment variable gets the same checks as one written in the file. */
  const urlFromEnv = (field: string, name: string): string => {
    const value = env[name];
    if (!value) throw invalid(field, `environment variable ${name} is not set`);
    const check = postgresUrl.safeParse(value);
    if (!check.success) throw invalid(field, `${name} ${check.error.issues[0]?.message}`);
    return value;
  };
  let databaseUrl = file.policy.database_url;
  if (file.policy.database_url_env !== undefined) databaseUrl = urlFromEnv('policy.database_url_env', file.policy.database_url_env);
  let auditUrl = file.audit.database_url ?? databaseUrl!;
  if (file.audit.database_url_env !== undefined && file.audit.enabled) auditUrl = urlFromEnv('audit.database_url_env', file.audit.database_url_env);
  const baseDir = options.baseDir ?? process.cwd();
  const resolve = new Map<string, Dialable>();
  for (const [key, value] of Object.entries(file.resolve)) {
    const target = normaliseDestination(value);
    resolve.set(normaliseDestination(key).authority, { host: target.host, port: target.port });
  }
  return deepFreeze({
    server: { ...file.server, proxyProtocolFrom: parseCidrs(file.server.proxy_protocol_from), tls_cert_path: resolvePath(baseDir, file.server.tls_cert_path), tls_key_path: resolvePath(baseDir, file.server.tls_key_path) },
    policy: {
      ...file.policy,
      databaseUrl: databaseUrl!,
      ...(file.policy.read_database_url_env !== undefined ? { readDatabaseUrl: urlFromEnv('policy.read_database_url_env', file.policy.read_database_url_env) } : {}),
    },
    observability: file.observability,
    limits: file.limits,
    admin: file.admin ?? adminSchema.parse({ enabled: false }),
    audit: { ...file.audit, databaseUrl: auditUrl },
    cache: file.cache,
    egress: { ...file.egress, policy: { allow: parseCidrs(file.egress.allow_cidrs), deny: parseCidrs(file.egress.deny_cidrs) } },
    resolve,
  }) as GatewayConfig;
}

/** Reads and validates a TOML config file. Throws ConfigError with one clear message. */
export function loadConfig(path: string, env: NodeJS.ProcessEnv = process.env): GatewayConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ConfigError(`${path}: cannot read config file (${code === 'ENOENT' ? 'no such file' : code ?? (error as Error).message})`);
  }
  let parsed: unknown;
  try {
    parsed = parseToml(text);
  } catch (error) {
    const where = error instanceof TomlError ? ` at line ${error.line}, column ${error.column}` : '';
    throw new ConfigError(`${path}: not valid TOML${where}: ${(error as Error).message.split('\n')[0]}`);
  }
  return parseConfig(parsed, { source: path, env });
}
