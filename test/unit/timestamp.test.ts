import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  canonicalTimestamp,
  formatTimestampMicros,
  isCanonicalTimestamp,
  parseTimestampMicros,
  sqlCanonicalTimestamp,
  timestampFromDate,
} from '../../registry/timestamp.js';
import { InvalidPermissionFieldError } from '../../registry/errors.js';

// DESIGN §3 "Canonical signed text": timestamps are UTC RFC 3339 with exactly six fractional
// digits and `Z`, and must reach the text without losing PostgreSQL's microseconds.

const MAY_1_2026 = 1777593600000000n; // 2026-05-01T00:00:00Z in microseconds

interface ParseCase {
  readonly input: string;
  readonly micros: bigint;
  readonly canonical: string;
  readonly why: string;
}

const parses: readonly ParseCase[] = [
  { input: '2026-05-01T00:00:00.000000Z', micros: MAY_1_2026, canonical: '2026-05-01T00:00:00.000000Z', why: 'already canonical' },
  { input: '2026-05-01T00:00:00Z', micros: MAY_1_2026, canonical: '2026-05-01T00:00:00.000000Z', why: 'no fraction' },
  { input: '2026-05-01T00:00:00.1Z', micros: MAY_1_2026 + 100000n, canonical: '2026-05-01T00:00:00.100000Z', why: 'one fractional digit is tenths' },
  { input: '2026-05-01T00:00:00.123Z', micros: MAY_1_2026 + 123000n, canonical: '2026-05-01T00:00:00.123000Z', why: 'milliseconds' },
  { input: '2026-05-01T00:00:00.123456Z', micros: MAY_1_2026 + 123456n, canonical: '2026-05-01T00:00:00.123456Z', why: 'microseconds kept (Date would drop them)' },
  { input: '2026-05-01T00:00:00.000001Z', micros: MAY_1_2026 + 1n, canonical: '2026-05-01T00:00:00.000001Z', why: 'one microsecond' },
  { input: '2026-05-01T23:59:59.999999Z', micros: MAY_1_2026 + 86399999999n, canonical: '2026-05-01T23:59:59.999999Z', why: 'last microsecond of the day' },
  { input: '2026-05-01T02:00:00+02:00', micros: MAY_1_2026, canonical: '2026-05-01T00:00:00.000000Z', why: 'positive offset converted to UTC' },
  { input: '2026-04-30T19:30:00.5-04:30', micros: MAY_1_2026 + 500000n, canonical: '2026-05-01T00:00:00.500000Z', why: 'negative half-hour offset crossing midnight' },
  { input: '2026-05-01T05:45:00.000007+05:45', micros: MAY_1_2026 + 7n, canonical: '2026-05-01T00:00:00.000007Z', why: 'odd offset with microseconds' },
  { input: '2026-01-01T00:30:00+01:00', micros: 1767223800000000n, canonical: '2025-12-31T23:30:00.000000Z', why: 'offset crossing a year boundary' },
  { input: '2026-05-01T00:00:00+00:00', micros: MAY_1_2026, canonical: '2026-05-01T00:00:00.000000Z', why: '+00:00 is UTC' },
  { input: '2026-05-01T00:00:00-00:00', micros: MAY_1_2026, canonical: '2026-05-01T00:00:00.000000Z', why: '-00:00 is UTC' },
  { input: '2026-05-01T00:00:00+23:59', micros: MAY_1_2026 - 86340000000n, canonical: '2026-04-30T00:01:00.000000Z', why: 'largest offset' },
  { input: '2026-05-01t00:00:00z', micros: MAY_1_2026, canonical: '2026-05-01T00:00:00.000000Z', why: 'lowercase t and z (RFC 3339 5.6)' },
  { input: '2026-05-01 00:00:00.25Z', micros: MAY_1_2026 + 250000n, canonical: '2026-05-01T00:00:00.250000Z', why: 'space separator (RFC 3339 5.6 note)' },
  { input: '2024-02-29T12:00:00Z', micros: 1709208000000000n, canonical: '2024-02-29T12:00:00.000000Z', why: 'leap day' },
  { input: '2000-02-29T00:00:00Z', micros: 951782400000000n, canonical: '2000-02-29T00:00:00.000000Z', why: 'leap day of a century divisible by 400' },
  { input: '1970-01-01T00:00:00Z', micros: 0n, canonical: '1970-01-01T00:00:00.000000Z', why: 'the epoch' },
  { input: '1969-12-31T23:59:59.999999Z', micros: -1n, canonical: '1969-12-31T23:59:59.999999Z', why: 'one microsecond before the epoch' },
  { input: '1969-12-31T23:59:59.000001Z', micros: -999999n, canonical: '1969-12-31T23:59:59.000001Z', why: 'before the epoch, small fraction' },
  { input: '1969-07-20T20:17:40.123456Z', micros: -14182939876544n, canonical: '1969-07-20T20:17:40.123456Z', why: 'before 1970 with microseconds' },
  { input: '1900-01-01T00:00:00.000001Z', micros: -2208988799999999n, canonical: '1900-01-01T00:00:00.000001Z', why: 'year 1900 with microseconds' },
  { input: '0001-01-01T00:00:00Z', micros: -62135596800000000n, canonical: '0001-01-01T00:00:00.000000Z', why: 'first instant of year 1' },
  { input: '0099-12-31T23:59:59.999999Z', micros: -59011459200000001n, canonical: '0099-12-31T23:59:59.999999Z', why: 'two-digit year is not read as 19xx' },
  { input: '9999-12-31T23:59:59.999999Z', micros: 253402300799999999n, canonical: '9999-12-31T23:59:59.999999Z', why: 'last instant of year 9999' },
];

for (const c of parses) {
  test(`timestamp ${c.input} → ${c.canonical} (${c.why})`, () => {
    assert.equal(parseTimestampMicros(c.input), c.micros);
    assert.equal(canonicalTimestamp(c.input), c.canonical);
    assert.equal(formatTimestampMicros(c.micros), c.canonical);
    assert.equal(parseTimestampMicros(c.canonical), c.micros);
    assert.ok(isCanonicalTimestamp(c.canonical));
    assert.equal(isCanonicalTimestamp(c.input), c.input === c.canonical);
  });
}

const invalid: readonly { readonly input: string; readonly why: string }[] = [
  { input: '', why: 'empty' },
  { input: 'not a timestamp', why: 'not a timestamp' },
  { input: '2026-02-30T00:00:00Z', why: 'February 30' },
  { input: '2026-02-29T00:00:00Z', why: 'February 29 in a common year' },
  { input: '2100-02-29T00:00:00Z', why: 'February 29 in a century not divisible by 400' },
  { input: '2026-04-31T00:00:00Z', why: 'April 31' },
  { input: '2026-13-01T00:00:00Z', why: 'month 13' },
  { input: '2026-00-10T00:00:00Z', why: 'month 0' },
  { input: '2026-01-00T00:00:00Z', why: 'day 0' },
  { input: '2026-01-32T00:00:00Z', why: 'day 32' },
  { input: '2026-05-01T24:00:00Z', why: 'hour 24' },
  { input: '2026-05-01T23:60:00Z', why: 'minute 60' },
  { input: '2026-05-01T23:59:60Z', why: 'second 60 (leap seconds are not representable in PostgreSQL)' },
  { input: '2026-05-01T00:00:00', why: 'missing zone' },
  { input: '2026-05-01T00:00:00.000000', why: 'missing zone with fraction' },
  { input: '2026-05-01', why: 'date only' },
  { input: '2026-05-01T00:00Z', why: 'no seconds' },
  { input: '2026-05-01T00:00:00.Z', why: 'empty fraction' },
  { input: '2026-05-01T00:00:00.1234567Z', why: 'seven fractional digits (would lose precision)' },
  { input: '2026-05-01T00:00:00,5Z', why: 'comma as decimal separator' },
  { input: '2026-05-01T00:00:00+24:00', why: 'offset hour 24' },
  { input: '2026-05-01T00:00:00+02:60', why: 'offset minute 60' },
  { input: '2026-05-01T00:00:00+0200', why: 'offset without colon' },
  { input: '2026-05-01T00:00:00+02', why: 'offset without minutes' },
  { input: '2026-05-01T00:00:00 UTC', why: 'zone name' },
  { input: '2026-05-01T00:00:00ZZ', why: 'two zones' },
  { input: ' 2026-05-01T00:00:00Z', why: 'leading space' },
  { input: '2026-05-01T00:00:00Z ', why: 'trailing space' },
  { input: '2026-05-01T00:00:00Z\n', why: 'trailing newline' },
  { input: '2026-5-1T00:00:00Z', why: 'single-digit month and day' },
  { input: '26-05-01T00:00:00Z', why: 'two-digit year' },
  { input: '+2026-05-01T00:00:00Z', why: 'signed year' },
  { input: '20260501T000000Z', why: 'ISO 8601 basic format' },
  { input: '２０２６-05-01T00:00:00Z', why: 'fullwidth digits' },
  { input: '0000-12-31T23:59:59.999999Z', why: 'year 0 (before 0001)' },
  { input: '0001-01-01T00:00:00+00:01', why: 'before 0001 once converted to UTC' },
  { input: '9999-12-31T23:59:59.999999-00:01', why: 'after 9999 once converted to UTC' },
  { input: '1777593600', why: 'epoch seconds' },
];

for (const c of invalid) {
  test(`timestamp ${JSON.stringify(c.input)} is refused (${c.why})`, () => {
    assert.throws(() => parseTimestampMicros(c.input), (error: unknown) => {
      assert.ok(error instanceof InvalidPermissionFieldError, String(error));
      assert.equal(error.code, 'ERR_PERMISSION_FIELD_INVALID');
      return true;
    });
    assert.throws(() => canonicalTimestamp(c.input), InvalidPermissionFieldError);
    assert.equal(isCanonicalTimestamp(c.input), false);
  });
}

const notCanonical: readonly { readonly input: string; readonly why: string }[] = [
  { input: '2026-05-01T00:00:00Z', why: 'no fraction' },
  { input: '2026-05-01T00:00:00.000Z', why: 'three fractional digits' },
  { input: '2026-05-01T00:00:00.0000000Z', why: 'seven fractional digits' },
  { input: '2026-05-01T00:00:00.000000+00:00', why: 'numeric offset instead of Z' },
  { input: '2026-05-01T02:00:00.000000+02:00', why: 'non-UTC offset' },
  { input: '2026-05-01T00:00:00.000000z', why: 'lowercase z' },
  { input: '2026-05-01t00:00:00.000000Z', why: 'lowercase t' },
  { input: '2026-05-01 00:00:00.000000Z', why: 'space separator' },
  { input: '2026-02-30T00:00:00.000000Z', why: 'February 30' },
  { input: '2026-05-01T24:00:00.000000Z', why: 'hour 24' },
  { input: '2026-05-01T23:59:60.000000Z', why: 'second 60' },
  { input: '0000-01-01T00:00:00.000000Z', why: 'year 0' },
  { input: '2026-05-01T00:00:00.000000Z\n', why: 'trailing newline' },
  { input: '2026-05-01 00:00:00+00', why: 'PostgreSQL default text output' },
];

for (const c of notCanonical) {
  test(`isCanonicalTimestamp(${JSON.stringify(c.input)}) is false (${c.why})`, () => {
    assert.equal(isCanonicalTimestamp(c.input), false);
  });
}

const roundTrips: readonly bigint[] = [
  0n, 1n, -1n, 999n, 1000n, 1001n, -999n, -1000n, -1001n, 999999n, 1000000n, -1000000n, -1000001n,
  MAY_1_2026, MAY_1_2026 + 1n, MAY_1_2026 + 123456n, MAY_1_2026 - 1n,
  -2208988799999999n, -62135596800000000n, 253402300799999999n, 951782399999999n,
];

for (const micros of roundTrips) {
  test(`timestamp round trip of ${micros} µs keeps every digit`, () => {
    const text = formatTimestampMicros(micros);
    assert.match(text, /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$/);
    assert.ok(isCanonicalTimestamp(text));
    assert.equal(parseTimestampMicros(text), micros);
    assert.equal(canonicalTimestamp(text), text);
  });
}

test('timestamp: format refuses instants outside years 0001-9999', () => {
  for (const micros of [-62135596800000001n, 253402300800000000n]) {
    assert.throws(() => formatTimestampMicros(micros), InvalidPermissionFieldError);
  }
});

test('timestamp: timestampFromDate keeps milliseconds and pads microseconds with zeros', () => {
  assert.equal(timestampFromDate(new Date('2026-05-01T00:00:00.123Z')), '2026-05-01T00:00:00.123000Z');
  assert.equal(timestampFromDate(new Date(-1)), '1969-12-31T23:59:59.999000Z');
  assert.equal(timestampFromDate(new Date(0)), '1970-01-01T00:00:00.000000Z');
});

test('timestamp: the result does not depend on the process time zone', () => {
  const saved = process.env.TZ;
  try {
    process.env.TZ = 'America/St_Johns';
    assert.equal(canonicalTimestamp('2026-05-01T02:00:00.000001+02:00'), '2026-05-01T00:00:00.000001Z');
    assert.equal(formatTimestampMicros(-1n), '1969-12-31T23:59:59.999999Z');
  } finally {
    if (saved === undefined) delete process.env.TZ;
    else process.env.TZ = saved;
  }
});

test('timestamp: the SQL rendering converts to UTC with six fractional digits whatever the session zone', () => {
  assert.equal(
    sqlCanonicalTimestamp('p.not_before'),
    `to_char(p.not_before AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')`,
  );
});
