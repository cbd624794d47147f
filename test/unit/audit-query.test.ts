import assert from 'node:assert/strict';
import { test } from 'node:test';
import { AUDIT_COLUMN_TYPES, AUDIT_COLUMNS, AUDIT_INSERT_QUERY, buildAuditQuery, DEFAULT_AUDIT_LIMIT } from '../../registry/audit-query.js';
import { traceIdFromTraceparent } from '../../core/traceparent.js';

test('no filter: newest first, default limit, the limit as the only parameter', () => {
  const query = buildAuditQuery();
  assert.deepEqual(query.values, [DEFAULT_AUDIT_LIMIT]);
  assert.doesNotMatch(query.text, /WHERE/);
  assert.match(query.text, /ORDER BY audit_log\.at DESC, id DESC\s+LIMIT \$1$/);
});

test('every filter is a bind parameter, in a stable order', () => {
  const query = buildAuditQuery({
    identity: "agent'; DROP TABLE audit_log; --",
    destination: 'docstore:443',
    status: 403,
    reason: 'not_authorized',
    permissionId: 'perm-1',
    traceId: 'ABCDEF0123456789ABCDEF0123456789',
    since: '2026-05-01T00:00:00Z',
    until: new Date('2026-06-01T00:00:00Z'),
    limit: 10,
  });
  assert.deepEqual(query.values, [
    "agent'; DROP TABLE audit_log; --",
    'docstore:443',
    403,
    'not_authorized',
    'perm-1',
    'abcdef0123456789abcdef0123456789',
    '2026-05-01T00:00:00Z',
    '2026-06-01T00:00:00.000Z',
    10,
  ]);
  assert.doesNotMatch(query.text, /DROP/);
  for (const clause of ['identity = $1', 'destination = $2', 'status = $3', 'reason = $4', 'permission_id = $5', 'trace_id = $6', 'at >= $7::timestamptz', 'at < $8::timestamptz', 'LIMIT $9']) {
    assert.ok(query.text.includes(clause), clause);
  }
});

test('invalid filters are refused', () => {
  assert.throws(() => buildAuditQuery({ status: 99 }), /status/);
  assert.throws(() => buildAuditQuery({ status: 403.5 }), /status/);
  assert.throws(() => buildAuditQuery({ limit: 0 }), /limit/);
  assert.throws(() => buildAuditQuery({ limit: 1e9 }), /limit/);
  assert.throws(() => buildAuditQuery({ since: '2026-05-01 00:00:00' }), /since: expected an RFC 3339 timestamp with a zone/);
  assert.throws(() => buildAuditQuery({ since: 'yesterday' }), /since/);
  assert.throws(() => buildAuditQuery({ until: new Date('nope') }), /until: invalid date/);
  assert.doesNotThrow(() => buildAuditQuery({ since: '2026-05-01T00:00:00.123456+02:00' }));
});

test('the INSERT names every column once, each typed in the one JSON parameter', () => {
  for (const column of AUDIT_COLUMNS) {
    assert.ok(AUDIT_INSERT_QUERY.includes(`${column} ${AUDIT_COLUMN_TYPES[column]}`), `record definition for ${column}`);
  }
  assert.match(AUDIT_INSERT_QUERY, /json_to_recordset\(\$1::json\)/);
  assert.doesNotMatch(AUDIT_INSERT_QUERY, /\$2/, 'one parameter, whatever the batch size');
  assert.match(AUDIT_INSERT_QUERY, new RegExp(`\\(${AUDIT_COLUMNS.join(', ')}\\)`));
  assert.doesNotMatch(AUDIT_INSERT_QUERY, /RETURNING/, 'INSERT privilege is enough');
});

test('traceparent: the trace id of a valid header, nothing for a malformed one', () => {
  const id = '4bf92f3577b34da6a3ce929d0e0e4736';
  assert.equal(traceIdFromTraceparent(`00-${id}-00f067aa0ba902b7-01`), id);
  assert.equal(traceIdFromTraceparent(`01-${id}-00f067aa0ba902b7-01-future`), id, 'a later version may append fields');
  for (const bad of [
    undefined,
    ['a', 'b'],
    '',
    `00-${id}-00f067aa0ba902b7-01-extra`,
    `00-${'0'.repeat(32)}-00f067aa0ba902b7-01`,
    `00-${id}-${'0'.repeat(16)}-01`,
    `ff-${id}-00f067aa0ba902b7-01`,
    `00-${id.toUpperCase()}-00f067aa0ba902b7-01`,
    `00-${id}-00f067aa0ba902b7`,
  ]) {
    assert.equal(traceIdFromTraceparent(bad as string | undefined), undefined, String(bad));
  }
});
