import { InvalidPermissionFieldError } from './errors.js';

/**
 * Timestamps travel as UTC RFC 3339 text with exactly six fractional digits
 * (`2026-05-01T00:00:00.000000Z`), the form the canonical signed text uses.
 * PostgreSQL keeps microseconds and JavaScript `Date` only milliseconds, so the text form,
 * or microseconds since the epoch as a bigint, is the only representation that round-trips.
 */
export type CanonicalTimestamp = string & { readonly __brand: 'CanonicalTimestamp' };

const CANONICAL = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{6})Z$/;
const RFC3339 = /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$/;
const MICROS_PER_MS = 1000n;
const MIN_MICROS = -62135596800000000n; // 0001-01-01T00:00:00Z
const MAX_MICROS = 253402300799999999n; // 9999-12-31T23:59:59.999999Z

function invalid(text: string, why: string): never {
  throw new InvalidPermissionFieldError(`invalid timestamp ${JSON.stringify(text)}: ${why}`);
}

function fieldsToMicros(text: string, m: RegExpExecArray, fraction: string, offsetMinutes: number): bigint {
  const [year, month, day, hour, minute, second] = [1, 2, 3, 4, 5, 6].map((i) => Number(m[i]));
  if (year === undefined || month === undefined || day === undefined || hour === undefined || minute === undefined || second === undefined) {
    invalid(text, 'missing fields');
  }
  if (month < 1 || month > 12 || day < 1 || hour > 23 || minute > 59 || second > 59) invalid(text, 'field out of range');
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  date.setUTCHours(hour, minute, second, 0);
  if (date.getUTCDate() !== day) invalid(text, 'no such day');
  const micros = BigInt(date.getTime() - offsetMinutes * 60_000) * MICROS_PER_MS + BigInt(fraction.padEnd(6, '0'));
  if (micros < MIN_MICROS || micros > MAX_MICROS) invalid(text, 'outside years 0001-9999');
  return micros;
}

/** Microseconds since the Unix epoch of an RFC 3339 timestamp (any offset, up to six fractional digits). */
export function parseTimestampMicros(text: string): bigint {
  const m = RFC3339.exec(text);
  if (!m) invalid(text, 'expected RFC 3339, e.g. 2026-05-01T00:00:00Z');
  let offsetMinutes = 0;
  if (m[8] === undefined) {
    const hours = Number(m[10]);
    const minutes = Number(m[11]);
    if (hours > 23 || minutes > 59) invalid(text, 'offset out of range');
    offsetMinutes = (m[9] === '-' ? -1 : 1) * (hours * 60 + minutes);
  }
  return fieldsToMicros(text, m, m[7] ?? '', offsetMinutes);
}

/** Formats microseconds since the epoch as the canonical text. */
export function formatTimestampMicros(micros: bigint): CanonicalTimestamp {
  if (micros < MIN_MICROS || micros > MAX_MICROS) invalid(String(micros), 'outside years 0001-9999');
  let ms = micros / MICROS_PER_MS;
  let sub = micros % MICROS_PER_MS;
  if (sub < 0n) {
    sub += MICROS_PER_MS;
    ms -= 1n;
  }
  const date = new Date(Number(ms));
  const pad = (n: number, width = 2) => String(n).padStart(width, '0');
  const fraction = pad(date.getUTCMilliseconds(), 3) + pad(Number(sub), 3);
  return `${pad(date.getUTCFullYear(), 4)}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())}T${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}:${pad(date.getUTCSeconds())}.${fraction}Z` as CanonicalTimestamp;
}

/** Normalises any accepted RFC 3339 text to the canonical form. */
export function canonicalTimestamp(text: string): CanonicalTimestamp {
  return formatTimestampMicros(parseTimestampMicros(text));
}

/** True when `text` is already exactly canonical (what the database hands back). */
export function isCanonicalTimestamp(text: string): text is CanonicalTimestamp {
  const m = CANONICAL.exec(text);
  if (!m) return false;
  try {
    return formatTimestampMicros(fieldsToMicros(text, m, m[7] ?? '', 0)) === text;
  } catch {
    return false;
  }
}

export function timestampFromDate(date: Date): CanonicalTimestamp {
  return formatTimestampMicros(BigInt(date.getTime()) * MICROS_PER_MS);
}

/**
 * The SQL expression that renders a timestamptz column as canonical text, whatever the
 * session's TimeZone setting is.
 */
export function sqlCanonicalTimestamp(column: string): string {
  return `to_char(${column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')`;
}
