import assert from 'node:assert/strict';
import { test } from 'node:test';
import { childTraceparent, parseTraceparent, traceIdFromTraceparent } from '../../core/traceparent.js';

const TRACE = '4bf92f3577b34da6a3ce929d0e0e4736';
const PARENT = '00f067aa0ba902b7';

test('a valid version-00 header is read field by field', () => {
  assert.deepEqual(parseTraceparent(`00-${TRACE}-${PARENT}-01`), { version: '00', traceId: TRACE, parentId: PARENT, flags: '01' });
});

test('a later version may append fields; version 00 may not', () => {
  assert.equal(traceIdFromTraceparent(`01-${TRACE}-${PARENT}-00-extra`), TRACE);
  assert.equal(parseTraceparent(`00-${TRACE}-${PARENT}-01-extra`), undefined);
});

test('invalid headers read as absent', () => {
  for (const bad of [
    undefined,
    ['a', 'b'],
    '',
    `ff-${TRACE}-${PARENT}-01`,
    `00-${'0'.repeat(32)}-${PARENT}-01`,
    `00-${TRACE}-${'0'.repeat(16)}-01`,
    `00-${TRACE.toUpperCase()}-${PARENT}-01`,
    `00-${TRACE}-${PARENT}-1`,
    `0-${TRACE}-${PARENT}-01`,
    `01-${TRACE}-${PARENT}-01-${'x'.repeat(600)}`,
  ]) {
    assert.equal(parseTraceparent(bad as string | undefined), undefined, String(bad).slice(0, 80));
  }
});

test('a child continues the trace and its flags under a fresh parent id, or starts a sampled trace', () => {
  const child = parseTraceparent(childTraceparent(`00-${TRACE}-${PARENT}-00`))!;
  assert.equal(child.traceId, TRACE);
  assert.equal(child.flags, '00');
  assert.notEqual(child.parentId, PARENT);
  assert.equal(parseTraceparent(childTraceparent(`01-${TRACE}-${PARENT}-01-more`))!.version, '00', 'we speak version 00');
  const fresh = parseTraceparent(childTraceparent(`00-${'0'.repeat(32)}-${PARENT}-01`))!;
  assert.notEqual(fresh.traceId, '0'.repeat(32));
  assert.equal(fresh.flags, '01');
});
