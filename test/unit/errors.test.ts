import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import {
  AgentGatewayError,
  classifyDialError,
  codeOf,
  CONNECT_REASONS,
  denialResponse,
  DIAL_ERRORS,
  dialFailureResponse,
  ERROR_CODES,
  errorSpec,
  EXIT,
  exitCodeFor,
  hintFor,
  isErrorCode,
  PROXY_STATUS_NAME,
  reasonForError,
  SIDECAR_PROXY_STATUS_NAME,
  SIDECAR_RESPONSES,
  sidecarReasonForError,
  sidecarResponse,
  type ConnectReasonSpec,
  type ErrorCode,
  type ReasonCode,
  type SidecarReason,
} from '../../core/errors.js';
import { InvalidDestinationError, InvalidIdentityError, RegistryUnavailableError, SchemaVersionError } from '../../registry/errors.js';
import { errorCode, MigrationError, RefusedError, UsageError } from '../../registry-cli/src/errors.js';
import { TpmError } from '../../tpm/errors.js';

/**
 * Keeps the catalogue honest (fastify's errors.test.js habit): every entry is complete, every
 * code the source names is catalogued, every catalogued code is raised somewhere, and the CLI's
 * exit codes are the ones it has always had.
 */

const REPO = fileURLToPath(new URL('../../', import.meta.url));
const CATALOGUE_FILE = 'core/errors.ts';
const SOURCE_DIRS = ['core', 'registry', 'tpm', 'gateway', 'sidecar', 'registry-cli'];
const ERR_CODE = /\bERR_[A-Z0-9_]+\b/g;

/**
 * Codes that belong to Node.js or OpenSSL, not to us: the source compares errors it receives
 * against them and never raises them. Each must still occur in the source (checked below), so
 * the list cannot outlive its use.
 */
const FOREIGN_CODES = new Set([
  'ERR_TLS_HANDSHAKE_TIMEOUT', // node:tls, counted as a handshake timeout (gateway)
  'ERR_OSSL_X509_KEY_VALUES_MISMATCH', // OpenSSL via node:tls, mapped to ERR_TLS_IDENTITY_KEY_MISMATCH (sidecar)
  'ERR_OSSL_PIN_INCORRECT', // libp11 engine, mapped to ERR_TLS_IDENTITY_PIN_INCORRECT (sidecar)
  'ERR_OSSL_PIN_LOCKED', // libp11 engine, mapped to ERR_TLS_IDENTITY_PIN_LOCKED (sidecar)
  'ERR_OSSL_OBJECT_NOT_FOUND', // libp11 engine, mapped to ERR_TLS_IDENTITY_KEY_NOT_FOUND (sidecar)
  'ERR_HTTP2_GOAWAY_SESSION', // node:http2, a CONNECT not sent because the session is going away: re-sent (sidecar)
  'ERR_HTTP2_INVALID_SESSION', // node:http2, the same on a session already destroyed (sidecar)
]);

/**
 * Calls in the gateway and the sidecar whose string arguments are CONNECT reasons (or sidecar
 * answers). Where a parameter is typed `ReasonCode` the compiler checks it already; this catches
 * the ones typed `string` (the decision record) and proxy-status headers written by hand. The
 * registry's own `deny('no_permission')` names registry reasons, which go to the log only.
 */
const REASON_SINKS = new Set(['denialResponse', 'sidecarResponse', 'sidecarReasonForError']);
/** An Outcome literal (`{ reason: 'not_authorized' }`) outside the catalogue itself. */
const REASON_PROPERTIES = new Set(['reason']);
const REASON_DIRS = ['gateway/', 'sidecar/', 'core/'];
/** `details="..."` written by hand into a proxy-status header. */
const DETAILS = /\bdetails="([^"]*)"/g;

const CODES = Object.keys(ERROR_CODES) as ErrorCode[];
const REASONS = Object.keys(CONNECT_REASONS) as ReasonCode[];
const SIDECAR_REASONS = Object.keys(SIDECAR_RESPONSES) as SidecarReason[];
const VALID_EXITS = new Set<number>(Object.values(EXIT));

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(join(REPO, dir), { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      if (entry.name !== 'node_modules') out.push(...sourceFiles(path));
    } else if (/\.(ts|js|mjs)$/.test(entry.name) && !entry.name.endsWith('.d.ts')) {
      out.push(path);
    }
  }
  return out;
}

interface Found {
  /** ERR_* codes in string literals (values and types) and in object keys. */
  readonly named: Map<string, Set<string>>;
  /** ERR_* codes in string literals in value position (a union member names a code, it does not raise it). */
  readonly raised: Map<string, Set<string>>;
  /** Literals handed to a reason sink, or written as `details="..."`. */
  readonly reasons: Map<string, Set<string>>;
}

function add(map: Map<string, Set<string>>, key: string, file: string): void {
  let files = map.get(key);
  if (!files) map.set(key, (files = new Set()));
  files.add(file);
}

function calleeName(call: ts.CallExpression): string | undefined {
  const callee = call.expression;
  if (ts.isIdentifier(callee)) return callee.text;
  if (ts.isPropertyAccessExpression(callee)) return callee.name.text;
  return undefined;
}

/** Inside a type (a union of codes names them; it raises none). */
function inTypePosition(node: ts.Node): boolean {
  for (let at: ts.Node | undefined = node.parent; at && !ts.isStatement(at) && !ts.isSourceFile(at); at = at.parent) {
    if (ts.isTypeNode(at)) return true;
  }
  return false;
}

function scan(): Found {
  const found: Found = { named: new Map(), raised: new Map(), reasons: new Map() };
  for (const file of SOURCE_DIRS.flatMap(sourceFiles)) {
    const source = ts.createSourceFile(file, readFileSync(join(REPO, file), 'utf8'), ts.ScriptTarget.Latest, true);
    const reasonFile = REASON_DIRS.some((dir) => file.startsWith(dir));
    const visit = (node: ts.Node): void => {
      if (ts.isStringLiteralLike(node) || ts.isTemplateHead(node) || ts.isTemplateMiddle(node) || ts.isTemplateTail(node)) {
        const inType = inTypePosition(node);
        // A template literal type (`ERR_TPM_${string}`) is a pattern over codes, not a code.
        if (inType && !ts.isStringLiteralLike(node)) return;
        for (const [code] of node.text.matchAll(ERR_CODE)) {
          add(found.named, code, file);
          if (!inType) add(found.raised, code, file);
        }
        if (reasonFile) for (const [, details] of node.text.matchAll(DETAILS)) add(found.reasons, details!, file);
      } else if ((ts.isPropertyAssignment(node) || ts.isPropertyDeclaration(node)) && ts.isIdentifier(node.name) && /^ERR_/.test(node.name.text)) {
        add(found.named, node.name.text, file);
      } else if (reasonFile && ts.isPropertyAssignment(node) && ts.isIdentifier(node.name) && REASON_PROPERTIES.has(node.name.text) && ts.isStringLiteralLike(node.initializer) && !CATALOGUE_FILE.endsWith(file)) {
        add(found.reasons, node.initializer.text, file);
      } else if (reasonFile && ts.isCallExpression(node) && REASON_SINKS.has(calleeName(node) ?? '')) {
        for (const arg of node.arguments) if (ts.isStringLiteralLike(arg)) add(found.reasons, arg.text, file);
      }
      ts.forEachChild(node, visit);
    };
    visit(source);
  }
  return found;
}

const found = scan();
const where = (files: Set<string> | undefined) => [...(files ?? [])].map((f) => relative('.', f)).join(', ');

describe('the catalogue: every entry is complete', () => {
  for (const code of CODES) {
    test(code, () => {
      const spec = errorSpec(code);
      assert.match(code, /^ERR_[A-Z0-9_]+$/);
      assert.ok(VALID_EXITS.has(spec.exit), `exit ${spec.exit}`);
      assert.notEqual(spec.exit, EXIT.ok, 'an error never exits 0');
      assert.ok(spec.hint.trim().length > 0, 'a hint');
      assert.doesNotMatch(spec.hint, /[\r\n]/, 'a hint is one line');
      if (spec.status !== undefined) assert.ok(Number.isInteger(spec.status) && spec.status >= 400 && spec.status <= 599, `status ${spec.status}`);
      // A code that ends a CONNECT or a local request answers with that reason's status.
      if (spec.reason !== undefined) assert.equal(spec.status, CONNECT_REASONS[spec.reason].status, `status of reason ${spec.reason}`);
      if (spec.sidecar !== undefined) assert.equal(spec.status, SIDECAR_RESPONSES[spec.sidecar].status, `status of sidecar answer ${spec.sidecar}`);
      if (spec.status !== undefined) assert.ok(spec.reason !== undefined || spec.sidecar !== undefined, 'a status belongs to an answer: give the reason');
    });
  }

  test('CONNECT reasons: status, error type and hint', () => {
    for (const reason of REASONS) {
      const spec: ConnectReasonSpec = CONNECT_REASONS[reason];
      assert.match(reason, /^[a-z]+(_[a-z]+)*$/, reason);
      assert.ok(Number.isInteger(spec.status) && spec.status >= 200 && spec.status <= 599, `${reason}: status ${spec.status}`);
      assert.ok(spec.hint.trim().length > 0 && !/[\r\n]/.test(spec.hint), `${reason}: a one-line hint`);
    }
    for (const type of Object.keys(DIAL_ERRORS) as (keyof typeof DIAL_ERRORS)[]) assert.ok(DIAL_ERRORS[type].hint.length > 0, type);
  });

  test('sidecar answers: status, error type and hint; each status has its own details code', () => {
    for (const reason of SIDECAR_REASONS) {
      const spec = SIDECAR_RESPONSES[reason];
      assert.match(reason, /^[a-z]+(_[a-z]+)*$/, reason);
      assert.ok(spec.status >= 400 && spec.status <= 599, `${reason}: status ${spec.status}`);
      assert.ok(spec.hint.trim().length > 0 && !/[\r\n]/.test(spec.hint), `${reason}: a one-line hint`);
    }
    // An invalid authority is the agent's mistake, never reported as a gateway outage.
    assert.equal(SIDECAR_RESPONSES.authority_invalid.status, 400);
    assert.ok(SIDECAR_RESPONSES.gateway_unavailable.status >= 500);
  });
});

describe('every code used is catalogued', () => {
  test('ERR_* codes named anywhere in the source', () => {
    const unknown = [...found.named.keys()].filter((code) => !isErrorCode(code) && !FOREIGN_CODES.has(code));
    assert.deepEqual(unknown.map((code) => `${code} (${where(found.named.get(code))})`), []);
  });

  test('the foreign codes are still compared against, and none is ours', () => {
    for (const code of FOREIGN_CODES) {
      assert.ok(found.named.has(code), `${code} is no longer used: drop it from FOREIGN_CODES`);
      assert.ok(!isErrorCode(code), `${code} is catalogued as ours`);
    }
  });

  test('CONNECT reasons and sidecar details in the source', () => {
    const known = new Set<string>([...REASONS, ...SIDECAR_REASONS]);
    const unknown = [...found.reasons.keys()].filter((reason) => !known.has(reason));
    assert.deepEqual(unknown.map((reason) => `${reason} (${where(found.reasons.get(reason))})`), []);
    // The scan sees the gateway's hand-written reasons, so an empty result means it broke.
    for (const reason of ['not_authorized', 'allowed', 'dial_failed', 'client_cancelled', 'authority_invalid']) assert.ok(found.reasons.has(reason), `scan found no ${reason}`);
  });
});

describe('every code catalogued is reachable', () => {
  test('each ERR_* code is raised (named in a value) outside the catalogue', () => {
    const unreachable = CODES.filter((code) => ![...(found.raised.get(code) ?? [])].some((file) => file !== CATALOGUE_FILE));
    assert.deepEqual(unreachable, []);
  });
});

describe('mapping errors through the table', () => {
  test('codeOf: ours keep their code, anything else is ERR_INTERNAL', () => {
    assert.equal(codeOf(new RegistryUnavailableError('x')), 'ERR_REGISTRY_UNAVAILABLE');
    assert.equal(codeOf(new TpmError('ERR_TPM_PIN_LOCKED', 'x')), 'ERR_TPM_PIN_LOCKED');
    assert.equal(codeOf(new Error('a bug')), 'ERR_INTERNAL');
    assert.equal(codeOf(Object.assign(new Error('node'), { code: 'ERR_USAGE' })), 'ERR_INTERNAL', 'a foreign error with our code string is still foreign');
    assert.equal(codeOf('a string'), 'ERR_INTERNAL');
    assert.equal(codeOf(undefined), 'ERR_INTERNAL');
    assert.equal(errorCode(new UsageError('x')), 'ERR_USAGE');
  });

  const reasons: [unknown, ReasonCode][] = [
    [new RegistryUnavailableError('x'), 'registry_unavailable'],
    [new SchemaVersionError('x'), 'registry_unavailable'],
    [new InvalidDestinationError('x'), 'authority_invalid'],
    [new InvalidIdentityError('x'), 'identity_invalid'],
    [new TpmError('ERR_TPM', 'x'), 'internal_error'],
    [new AgentGatewayError('ERR_CONFIG', 'x'), 'internal_error'],
    [new TypeError('a bug'), 'internal_error'],
    [null, 'internal_error'],
  ];
  for (const [error, reason] of reasons) {
    test(`reasonForError(${codeOf(error)}) → ${reason}`, () => {
      assert.equal(reasonForError(error), reason);
      if (reason !== 'dial_failed') assert.equal(denialResponse(reason).status, errorSpec(codeOf(error)).status ?? 500);
    });
  }

  test('sidecarReasonForError', () => {
    assert.equal(sidecarReasonForError(new AgentGatewayError('ERR_GATEWAY_UNAVAILABLE', 'x')), 'gateway_unavailable');
    assert.equal(sidecarReasonForError(new InvalidDestinationError('x')), 'authority_invalid');
    assert.equal(sidecarReasonForError(new Error('a bug')), 'internal_error');
  });

  test('hintFor: the catalogue hint of any error', () => {
    assert.equal(hintFor(new SchemaVersionError('x')), 'run `agent-gateway-registry migrate`');
    assert.match(hintFor(new TpmError('ERR_TPM_PIN_INCORRECT', 'x')) ?? '', /^check AGENT_GATEWAY_TPM_USER_PIN or --user-pin-file/);
    assert.equal(hintFor(new Error('a bug')), ERROR_CODES.ERR_INTERNAL.hint);
  });
});

describe('answers', () => {
  const contract: [ReasonCode, number, string | undefined][] = [
    ['method_not_allowed', 405, 'http_request_error'],
    ['authority_invalid', 400, 'http_request_error'],
    ['identity_invalid', 403, 'http_request_denied'],
    ['not_authorized', 403, 'http_request_denied'],
    ['destination_forbidden', 403, 'destination_ip_prohibited'],
    ['rate_limited', 429, 'http_request_denied'],
    ['too_many_tunnels', 429, 'http_request_denied'],
    ['registry_unavailable', 503, 'proxy_internal_error'],
    ['shutting_down', 503, 'proxy_internal_error'],
    ['internal_error', 500, 'proxy_internal_error'],
    ['allowed', 200, undefined],
    ['client_cancelled', 499, undefined],
  ];
  for (const [reason, status, error] of contract) {
    test(`${reason}: ${status}${error ? ` ${error}` : ''} (DESIGN §3, §9)`, () => {
      if (reason === 'dial_failed') return;
      const response = denialResponse(reason);
      assert.equal(response.status, status);
      assert.equal(response.headers['proxy-status'], error ? `agent-gateway; error=${error}; details="${reason}"` : undefined);
    });
  }

  test('every reason is in the contract above, and 405 says what is allowed', () => {
    assert.deepEqual(new Set(REASONS), new Set([...contract.map(([reason]) => reason), 'dial_failed']));
    assert.equal(denialResponse('method_not_allowed').headers.allow, 'CONNECT');
    assert.equal(PROXY_STATUS_NAME, 'agent-gateway');
  });

  test('dial failures: 502 with the dial error type', () => {
    const cases: [NodeJS.ErrnoException | undefined, boolean, string][] = [
      [undefined, true, 'connection_timeout'],
      [Object.assign(new Error('x'), { code: 'ETIMEDOUT' }), false, 'connection_timeout'],
      [Object.assign(new Error('x'), { code: 'ECONNREFUSED' }), false, 'connection_refused'],
      [Object.assign(new Error('x'), { code: 'ENOTFOUND' }), false, 'destination_not_found'],
      [Object.assign(new Error('x'), { code: 'EAI_AGAIN' }), false, 'destination_not_found'],
      [Object.assign(new Error('x'), { code: 'EHOSTUNREACH' }), false, 'destination_unavailable'],
    ];
    for (const [error, timedOut, type] of cases) {
      const classified = classifyDialError(error, timedOut);
      assert.equal(classified, type);
      assert.deepEqual(dialFailureResponse(classified), { status: 502, headers: { 'proxy-status': `agent-gateway; error=${type}; details="dial_failed"` } });
    }
  });

  test("sidecar: each answer carries the sidecar's proxy-status with its own details", () => {
    assert.equal(SIDECAR_PROXY_STATUS_NAME, 'agent-gateway-sidecar');
    assert.deepEqual(sidecarResponse('gateway_unavailable'), { status: 503, headers: { 'proxy-status': 'agent-gateway-sidecar; error=proxy_internal_error; details="gateway_unavailable"' } });
    assert.deepEqual(sidecarResponse('authority_invalid'), { status: 400, headers: { 'proxy-status': 'agent-gateway-sidecar; error=http_request_error; details="authority_invalid"' } });
    for (const reason of SIDECAR_REASONS) {
      const response = sidecarResponse(reason);
      assert.equal(response.status, SIDECAR_RESPONSES[reason].status);
      assert.equal(response.headers['proxy-status'], `agent-gateway-sidecar; error=${SIDECAR_RESPONSES[reason].error}; details="${reason}"`);
    }
  });
});

describe('registry CLI exit codes are unchanged', () => {
  // The mapping before the catalogue (registry-cli/src/errors.ts EXIT_BY_CODE, RefusedError → 3,
  // anything else → 1), copied here so a table edit cannot change what scripts see.
  const BEFORE: Readonly<Record<string, number>> = {
    ERR_USAGE: 2,
    ERR_CONFIG: 2,
    ERR_DESTINATION_INVALID: 2,
    ERR_KEY_MATERIAL_INVALID: 2,
    ERR_IDENTITY_INVALID: 2,
    ERR_TPM_INVALID_ARGUMENT: 2,
    ERR_PERMISSION_FIELD_INVALID: 3,
    ERR_SCHEMA_VERSION: 4,
    ERR_MIGRATION_CHECKSUM: 4,
    ERR_MIGRATION_ORDER: 4,
    ERR_MIGRATION_MISSING: 4,
    ERR_MIGRATION_FILES: 4,
    ERR_MIGRATION_BASELINE: 4,
    // `agent-gateway-sidecar run`'s own failures, new with it: 125, so CMD's codes pass through unambiguously.
    ERR_ISOLATION_UNAVAILABLE: 125,
    ERR_SIDECAR_SOCKET: 125,
    ERR_RUN_USAGE: 125,
    ERR_RUN_HIDE_PATH: 125,
  };
  const before = (code: string) => BEFORE[code] ?? (code.startsWith('ERR_REFUSED_') ? 3 : 1);

  for (const code of CODES) {
    test(`${code} → ${before(code)}`, () => assert.equal(ERROR_CODES[code].exit, before(code)));
  }

  test('through the error classes', () => {
    const cases: [unknown, number][] = [
      [new RefusedError('ERR_REFUSED_SCOPE_UNKNOWN', 'x'), 3],
      [new MigrationError('ERR_MIGRATION_LOCK_TIMEOUT', 'x'), 1],
      [new MigrationError('ERR_MIGRATION_ORDER', 'x'), 4],
      [new TpmError('ERR_TPM_INVALID_ARGUMENT', 'x'), 2],
      [new TpmError('ERR_TPM_UNAVAILABLE', 'x'), 1],
      [new Error('a bug'), 1],
      ['thrown string', 1],
    ];
    for (const [error, exit] of cases) assert.equal(exitCodeFor(error), exit, String(error));
  });
});
